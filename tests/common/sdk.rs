//! [`SdkDriver`]: a real Centrifugo client SDK (centrifuge-js under Node, centrifuge-python)
//! driven through `tests/sdk/<lang>/driver.*`, which speak the same JSON-lines protocol (see
//! the header of `tests/sdk/js/driver.mjs`): commands in, SDK events out.
//!
//! Needs what `scripts/deps.sh test` installs (`node` + `tests/sdk/js/node_modules`, the venv
//! `.tmp/venv` with `tests/sdk/python/requirements.txt`); without it a test fails and says so,
//! rather than passing without having run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{json, Value};

use super::Script;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sdk {
    Js,
    Python,
}

impl Sdk {
    fn dir(self) -> PathBuf {
        let lang = match self {
            Sdk::Js => "js",
            Sdk::Python => "python",
        };
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/sdk")
            .join(lang)
    }

    /// The program and arguments that run the driver, or why they cannot.
    fn command(self) -> anyhow::Result<(String, Vec<&'static str>)> {
        match self {
            Sdk::Js => {
                let sdk = self.dir().join("node_modules/centrifuge/package.json");
                anyhow::ensure!(
                    sdk.exists(),
                    "centrifuge-js is not installed in {}: run scripts/deps.sh test",
                    self.dir().display()
                );
                Ok(("node".into(), vec!["driver.mjs"]))
            }
            Sdk::Python => {
                let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tmp/venv/bin/python");
                let python = std::env::var("PGFANOUT_PYTHON")
                    .ok()
                    .filter(|p| !p.is_empty())
                    .map(PathBuf::from)
                    .unwrap_or(venv);
                anyhow::ensure!(
                    python.exists(),
                    "no Python with centrifuge-python at {}: run scripts/deps.sh test",
                    python.display()
                );
                Ok((python.display().to_string(), vec!["-u", "driver.py"]))
            }
        }
    }
}

/// One SDK client process. Killed on drop.
pub struct SdkDriver {
    pub sdk: Sdk,
    script: Script,
}

impl SdkDriver {
    pub fn start(sdk: Sdk) -> anyhow::Result<SdkDriver> {
        let (program, args) = sdk.command()?;
        let script = Script::spawn(&program, &args, &sdk.dir(), &[])?;
        Ok(SdkDriver { sdk, script })
    }

    /// Connects with `token`; `refresh_tokens` are handed out one per `getToken` call.
    pub async fn connect(
        &mut self,
        url: &str,
        token: &str,
        refresh_tokens: &[String],
    ) -> anyhow::Result<()> {
        self.send(json!({"op": "connect", "url": url, "token": token, "tokens": refresh_tokens}))
            .await
    }

    /// A recoverable subscription to `channel`.
    pub async fn subscribe(&mut self, channel: &str) -> anyhow::Result<()> {
        self.send(json!({"op": "subscribe", "channel": channel}))
            .await
    }

    pub async fn publish(&mut self, channel: &str, data: Value) -> anyhow::Result<()> {
        self.send(json!({"op": "publish", "channel": channel, "data": data}))
            .await
    }

    pub async fn unsubscribe(&mut self, channel: &str) -> anyhow::Result<()> {
        self.send(json!({"op": "unsubscribe", "channel": channel}))
            .await
    }

    async fn send(&mut self, command: Value) -> anyhow::Result<()> {
        self.script.send(&command).await
    }

    /// The next event, whatever it is; a `driver_error` event fails.
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<Value> {
        let event = self.script.next(timeout).await?;
        anyhow::ensure!(
            event["event"] != "driver_error",
            "the {:?} driver failed: {event}; {}",
            self.sdk,
            self.script.stderr_message()
        );
        Ok(event)
    }

    /// Reads events until one has `"event": name` and satisfies `accept`; returns it and the
    /// events read before it. A `driver_error` event fails at once.
    pub async fn until(
        &mut self,
        timeout: Duration,
        name: &str,
        accept: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<(Value, Vec<Value>)> {
        let what = format!("{:?} SDK event {name}", self.sdk);
        let (event, before) = self
            .script
            .next_where(timeout, &what, |event| {
                event["event"] == "driver_error" || (event["event"] == name && accept(event))
            })
            .await?;
        anyhow::ensure!(
            event["event"] != "driver_error",
            "the {:?} driver failed: {event}; before it: {before:?}; {}",
            self.sdk,
            self.script.stderr_message()
        );
        Ok((event, before))
    }

    /// Reads events until `count` publications of `channel` arrived; returns them as
    /// (offset, data) and every other event seen meanwhile.
    pub async fn publications(
        &mut self,
        channel: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<(Vec<(u64, Value)>, Vec<Value>)> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut publications = Vec::with_capacity(count);
        let mut others = Vec::new();
        while publications.len() < count {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let (event, before) = self
                .until(left, "publication", |e| e["channel"] == channel)
                .await
                .with_context(|| {
                    format!(
                        "{} of {count} publications so far: {:?}",
                        publications.len(),
                        publications.iter().map(|(o, _)| o).collect::<Vec<_>>()
                    )
                })?;
            others.extend(before);
            let offset = event["offset"]
                .as_u64()
                .with_context(|| format!("publication without offset: {event}"))?;
            publications.push((offset, event["data"].clone()));
        }
        Ok((publications, others))
    }

    /// Fails when a publication of `channel` arrives within `window` (checked by a ping to
    /// the driver after it, so a driver that died cannot pass for a quiet one).
    pub async fn expect_no_publication(
        &mut self,
        channel: &str,
        window: Duration,
    ) -> anyhow::Result<()> {
        tokio::time::sleep(window).await;
        self.send(json!({"op": "ping"})).await?;
        let (_, before) = self
            .until(Duration::from_secs(10), "pong", |_| true)
            .await?;
        let unexpected: Vec<&Value> = before
            .iter()
            .filter(|e| e["event"] == "publication" && e["channel"] == channel)
            .collect();
        anyhow::ensure!(
            unexpected.is_empty(),
            "unexpected publications: {unexpected:?}"
        );
        Ok(())
    }
}
