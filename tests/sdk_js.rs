//! The real centrifuge-js SDK (npm `centrifuge`, pinned in tests/sdk/js/package-lock.json) run
//! with Node: it connects to a node, subscribes, and receives notifications sent through Postgres.
//!
//! Needs `node` and `tests/sdk/js/node_modules` (scripts/deps.sh installs both); without them
//! this test fails and says so, rather than passing without having run.

use crate::common;

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Client, Cluster};
use serde_json::{json, Value};

const SDK_TIMEOUT: Duration = Duration::from_secs(30);

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/js")
}

/// Fails with instructions when Node or the installed SDK is missing.
fn require_node_and_sdk() {
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|out| out.status.success()),
        "`node` is not installed or does not run ({node:?}): run scripts/deps.sh"
    );
    let sdk = sdk_dir().join("node_modules/centrifuge/package.json");
    assert!(
        sdk.exists() && sdk_dir().join("node_modules/ws/package.json").exists(),
        "the centrifuge-js SDK is not installed in {}: run scripts/deps.sh (npm ci there)",
        sdk_dir().display()
    );
}

/// The Node process; killed on drop so a failing test leaves nothing behind.
struct SdkScript {
    child: Child,
    /// stdout lines, read by a thread (std pipes block).
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl SdkScript {
    fn spawn(url: &str, channel: &str, count: usize) -> SdkScript {
        let mut child = Command::new("node")
            .arg("subscribe.mjs")
            .args([
                url,
                channel,
                &count.to_string(),
                &SDK_TIMEOUT.as_millis().to_string(),
            ])
            .current_dir(sdk_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn node subscribe.mjs");
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        SdkScript { child, lines }
    }

    /// The next stdout line, parsed.
    async fn next_line(&mut self, timeout: Duration) -> anyhow::Result<Value> {
        match tokio::time::timeout(timeout, self.lines.recv()).await {
            Ok(Some(line)) => {
                serde_json::from_str(&line).map_err(|err| anyhow::anyhow!("{line:?}: {err}"))
            }
            Ok(None) => anyhow::bail!("the script ended its output; stderr:\n{}", self.stderr()),
            Err(_) => anyhow::bail!("no output from the script within {timeout:?}"),
        }
    }

    /// Kills the script (if still running) and returns what it wrote to stderr.
    fn stderr(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut text = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ = stderr.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for SdkScript {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn centrifuge_js_sdk_receives_notifications_with_offsets() -> anyhow::Result<()> {
    require_node_and_sdk();
    let cluster = Cluster::start(1, &["orders"]).await;
    cluster.wait_bridged().await?;

    let mut script = SdkScript::spawn(&cluster.node().ws_url(), "orders", 2);
    let first = script.next_line(SDK_TIMEOUT).await;
    let subscribed = first.map_err(|err| {
        err.context(format!(
            "waiting for the SDK to subscribe; stderr:\n{}",
            script.stderr()
        ))
    })?;
    assert_eq!(subscribed, json!({"subscribed": true, "channel": "orders"}));

    cluster.db.notify("orders", r#"{"id":1}"#).await?;
    cluster.db.notify("orders", "plain text").await?;
    let mut received = Vec::new();
    for _ in 0..2 {
        match script.next_line(SDK_TIMEOUT).await {
            Ok(line) => received.push(line),
            Err(err) => panic!(
                "SDK got {received:?} then: {err:#}\nstderr:\n{}",
                script.stderr()
            ),
        }
    }
    assert_eq!(
        received,
        vec![
            json!({"offset": 1, "data": {"id": 1}}),
            json!({"offset": 2, "data": "plain text"})
        ],
        "what the SDK printed"
    );

    let status = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(status) = script.child.try_wait()? {
                return anyhow::Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await??;
    assert!(
        status.success(),
        "script exited with {status}; stderr:\n{}",
        script.stderr()
    );

    // The node still serves our own client after the SDK left.
    let mut client = Client::connect(&cluster.node().ws_url()).await?;
    client.subscribe("orders").await?;
    Ok(())
}
