//! [`Script`]: a helper program (a Node or Python driver of a real SDK or browser) that talks
//! JSON lines: commands on its stdin, events or answers on its stdout, diagnostics on stderr.
//!
//! The process is killed when the `Script` is dropped; its stderr is kept (the last
//! [`STDERR_KEEP`] bytes) for failure messages.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Bytes of stderr kept for failure messages.
pub const STDERR_KEEP: usize = 64 * 1024;

pub struct Script {
    /// What it runs, for messages.
    name: String,
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    /// The tail of its stderr, filled by a reader task.
    stderr: Arc<Mutex<String>>,
}

impl Script {
    /// Starts `program args…` in `dir` with `env` added.
    pub fn spawn(
        program: &str,
        args: &[&str],
        dir: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Script> {
        let mut command = Command::new(program);
        command
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        let name = format!("{program} {}", args.join(" "));
        let mut child = command
            .spawn()
            .with_context(|| format!("spawn `{name}` in {}", dir.display()))?;
        let stdin = child.stdin.take().context("piped stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("piped stdout")?).lines();
        let mut err = child.stderr.take().context("piped stderr")?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let keep = stderr.clone();
        tokio::spawn(async move {
            let mut chunk = vec![0u8; 4096];
            while let Ok(n) = err.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                if let Ok(mut text) = keep.lock() {
                    text.push_str(&String::from_utf8_lossy(&chunk[..n]));
                    if text.len() > STDERR_KEEP {
                        let mut cut = text.len() - STDERR_KEEP;
                        while !text.is_char_boundary(cut) {
                            cut += 1;
                        }
                        text.drain(..cut);
                    }
                }
            }
        });
        Ok(Script {
            name,
            child,
            stdin,
            stdout,
            stderr,
        })
    }

    /// Writes one command line.
    pub async fn send(&mut self, command: &Value) -> anyhow::Result<()> {
        let mut line = command.to_string();
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .with_context(|| format!("write to `{}`; {}", self.name, self.stderr_message()))?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// The next stdout line, parsed; fails on timeout, on exit and on a line that is not JSON.
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<Value> {
        let line = match tokio::time::timeout(timeout, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => anyhow::bail!(
                "`{}` ended its output; {}",
                self.name,
                self.stderr_message()
            ),
            Ok(Err(err)) => anyhow::bail!("reading `{}`: {err}", self.name),
            Err(_) => anyhow::bail!(
                "no output from `{}` within {timeout:?}; {}",
                self.name,
                self.stderr_message()
            ),
        };
        serde_json::from_str(&line).with_context(|| {
            format!(
                "`{}` printed {line:?}; {}",
                self.name,
                self.stderr_message()
            )
        })
    }

    /// Reads lines until one satisfies `accept` (the others are collected and returned too).
    pub async fn next_where(
        &mut self,
        timeout: Duration,
        what: &str,
        accept: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<(Value, Vec<Value>)> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut skipped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let line = self
                .next(left)
                .await
                .with_context(|| format!("waiting for {what}; before it: {skipped:?}"))?;
            if accept(&line) {
                return Ok((line, skipped));
            }
            skipped.push(line);
        }
    }

    /// Waits for the process to exit and returns whether it succeeded.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<bool> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| format!("`{}` still running after {timeout:?}", self.name))??;
        Ok(status.success())
    }

    /// What it wrote to stderr so far (the tail).
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Its stderr, with a header, for failure messages.
    pub fn stderr_message(&self) -> String {
        format!(
            "--- stderr of `{}` ---\n{}\n--- end ---",
            self.name,
            self.stderr()
        )
    }
}
