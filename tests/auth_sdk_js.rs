//! centrifuge-js (the real SDK, tests/sdk/js) through token expiry: it connects with an
//! expired token, gets 109, fetches a new one and connects; that token is short, so the SDK
//! refreshes it before it runs out (`refresh` with the next token), and the connection lives
//! on past the first token's expiry plus grace, without reconnecting, still receiving.
//!
//! Needs `node` and `tests/sdk/js/node_modules` (scripts/deps.sh); fails without them.

use crate::common;

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::tokens::{self, hs256, now, SECRET};
use common::Cluster;
use serde_json::{json, Value};

const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/js")
}

struct Script {
    child: Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Script {
    fn spawn(args: &[String]) -> Script {
        assert!(
            sdk_dir()
                .join("node_modules/centrifuge/package.json")
                .exists(),
            "the centrifuge-js SDK is not installed in {}: run scripts/deps.sh",
            sdk_dir().display()
        );
        let mut child = Command::new("node")
            .arg("refresh.mjs")
            .args(args)
            .current_dir(sdk_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn node refresh.mjs (is node installed? scripts/deps.sh)");
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Script { child, lines }
    }

    /// Reads lines until one satisfies `pick`; returns it and everything read before it.
    async fn until(
        &mut self,
        timeout: Duration,
        pick: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<(Value, Vec<Value>)> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    let value: Value = serde_json::from_str(&line)?;
                    if pick(&value) {
                        return Ok((value, seen));
                    }
                    seen.push(value);
                }
                Ok(None) | Err(_) => {
                    anyhow::bail!("seen {seen:?}; stderr:\n{}", self.stderr())
                }
            }
        }
    }

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

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn centrifuge_js_refreshes_expired_and_expiring_tokens() -> anyhow::Result<()> {
    let cluster = Cluster::start_with(
        1,
        &["orders"],
        false,
        &[
            ("PGFANOUT_ALLOW_ANONYMOUS", "false"),
            ("PGFANOUT_TOKEN_HMAC_SECRET_KEY", SECRET),
            // centrifuge-js refreshes when the ttl runs out, so the grace covers the refresh
            // round trip; generous, because a loaded machine (CI) may be slow.
            ("PGFANOUT_TOKEN_EXPIRY_GRACE", "5s"),
        ],
    )
    .await;
    cluster.wait_bridged().await?;

    let expired = hs256(&json!({"sub": "js", "exp": now() - 10, "channels": ["orders"]}));
    // Long enough that a slow start still connects with it before it expires.
    let short = hs256(&tokens::user("js", 10, &["orders"], &[]));
    let long = hs256(&tokens::user("js", 600, &["orders"], &[]));
    let mut script = Script::spawn(&[
        cluster.node().ws_url(),
        "orders".into(),
        SCRIPT_TIMEOUT.as_millis().to_string(),
        expired,
        short,
        long,
    ]);

    // 109 for the expired token → getToken → connected with the short one.
    let (connected, before) = script
        .until(SCRIPT_TIMEOUT, |v| v["connected"] == json!(true))
        .await?;
    assert!(
        before.contains(&json!({"getToken": 1})),
        "the SDK fetched a token after 109: {before:?}"
    );
    let client = connected["client"].clone();
    script
        .until(SCRIPT_TIMEOUT, |v| v["subscribed"] == json!(true))
        .await?;

    // Before the short token runs out, the SDK refreshes it with the long one.
    let (_, between) = script
        .until(Duration::from_secs(30), |v| v["getToken"] == json!(2))
        .await?;
    assert!(
        between.is_empty(),
        "nothing else happened meanwhile: {between:?}"
    );

    // Past the short token's expiry + grace the same connection still receives.
    tokio::time::sleep(Duration::from_secs(7)).await;
    cluster
        .db
        .notify("orders", r#"{"after":"refresh"}"#)
        .await?;
    let (publication, meanwhile) = script
        .until(Duration::from_secs(15), |v| v.get("offset").is_some())
        .await?;
    assert_eq!(publication["data"], json!({"after": "refresh"}));
    assert!(
        !meanwhile.iter().any(|v| v.get("connected").is_some()),
        "no reconnect (client {client}): {meanwhile:?}"
    );
    let metrics = cluster.node().metrics().await?;
    let expired_closes: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("pgfanout_connections_closed_total") && l.contains("\"expired\""))
        .collect();
    assert!(
        expired_closes.is_empty(),
        "closed as expired: {expired_closes:?}"
    );
    Ok(())
}
