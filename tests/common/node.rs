//! [`Node`]: the built `pgfanout` binary running as a child process on a free port.
//!
//! Configured only through `PGFANOUT_*` environment variables (inherited ones are removed, so the
//! developer's shell cannot leak into a test). stdout and stderr go to a log file under the
//! target's tmp dir; its tail is printed when a test panics while the node is alive, and is part
//! of every start failure. Drop kills and reaps the process.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context as _;

use super::{RedisServer, TestDb};

/// How long a spawned node gets to answer `GET /health`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of the node's log shown in failure messages.
const LOG_TAIL_LINES: usize = 80;

/// How to start a node; kept by the [`Node`] so it can be restarted identically.
#[derive(Clone, Debug)]
pub struct NodeBuilder {
    /// `PGFANOUT_NODE_ID`; also names the log file.
    node_id: String,
    /// `PGFANOUT_DATABASE_URL`; `None` runs without ingest.
    database_url: Option<String>,
    /// `PGFANOUT_REDIS_URL`; `None` runs on the in-memory bus.
    redis_url: Option<String>,
    /// `PGFANOUT_CHANNELS`.
    channels: Vec<String>,
    /// Any other `PGFANOUT_*` settings, applied last (so they may override the above).
    env: Vec<(String, String)>,
    /// Whether starting waits until the node has connected its bus (`/ready` says
    /// `"starting": false`), not just until `/health` answers.
    wait_started: bool,
}

impl Default for NodeBuilder {
    fn default() -> Self {
        NodeBuilder {
            node_id: format!("node-{}", &super::random_tag()[..8]),
            database_url: None,
            redis_url: None,
            channels: Vec::new(),
            env: Vec::new(),
            wait_started: true,
        }
    }
}

impl NodeBuilder {
    /// Sets `PGFANOUT_NODE_ID`.
    pub fn node_id(mut self, id: impl Into<String>) -> Self {
        self.node_id = id.into();
        self
    }

    /// LISTENs on the test database.
    pub fn database(mut self, db: &TestDb) -> Self {
        self.database_url = Some(db.url().to_string());
        self
    }

    /// Uses the test's Redis as the bus.
    pub fn redis(mut self, redis: &RedisServer) -> Self {
        self.redis_url = Some(redis.url());
        self
    }

    /// Sets `PGFANOUT_CHANNELS`.
    pub fn channels(mut self, channels: &[&str]) -> Self {
        self.channels = channels.iter().map(|c| c.to_string()).collect();
        self
    }

    /// Sets any other environment variable of the node (e.g. `PGFANOUT_MAX_FRAME_BYTES`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Lets [`NodeBuilder::start`] return as soon as `/health` answers, while the node may
    /// still be connecting to Redis (to test the starting phase).
    pub fn only_wait_for_health(mut self) -> Self {
        self.wait_started = false;
        self
    }

    /// Spawns the node on a free port and waits until `GET /health` answers 200 and the node
    /// has started (its bus connected, WebSocket clients accepted; see
    /// [`NodeBuilder::only_wait_for_health`]).
    ///
    /// # Panics
    /// When it does not come up; the message holds the tail of its log.
    pub async fn start(self) -> Node {
        let log_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("node-logs");
        std::fs::create_dir_all(&log_dir).expect("create node log dir");
        let log_path = log_dir.join(format!("{}-{}.log", self.node_id, super::random_tag()));
        let mut node = Node {
            spec: self,
            port: 0,
            child: None,
            log_path,
            starts: 0,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("build HTTP client"),
        };
        let mut last_error = String::new();
        // A free port can be taken by a parallel test between probing and binding: retry.
        for _ in 0..3 {
            node.port = super::free_port();
            match node.spawn_and_wait_healthy().await {
                Ok(()) => return node,
                Err(err) => last_error = err,
            }
            if !last_error.to_lowercase().contains("in use") {
                break;
            }
        }
        panic!("{last_error}");
    }
}

/// A running (or stopped) gateway process.
pub struct Node {
    /// How it was started, for restarts.
    spec: NodeBuilder,
    /// Its HTTP/WebSocket port on 127.0.0.1, kept across restarts.
    port: u16,
    /// The process; `None` after `kill()` or once it exited and was reaped.
    child: Option<Child>,
    /// stdout + stderr of every run of this node, appended.
    log_path: PathBuf,
    /// How many times it was spawned (marks the log).
    starts: u32,
    /// For /health, /ready and /metrics.
    http: reqwest::Client,
}

impl Node {
    /// A builder with a random node id and no database, Redis or channels.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// `PGFANOUT_NODE_ID`.
    pub fn id(&self) -> &str {
        &self.spec.node_id
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `ws://127.0.0.1:<port>/connection/websocket`.
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/connection/websocket", self.port)
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `GET <path>`: status and body.
    pub async fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let response = self
            .http
            .get(self.http_url(path))
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = response.status().as_u16();
        Ok((status, response.text().await?))
    }

    /// `GET /ready`: status and the parsed JSON body.
    pub async fn ready(&self) -> anyhow::Result<(u16, serde_json::Value)> {
        let (status, body) = self.http_get("/ready").await?;
        let json = serde_json::from_str(&body)
            .with_context(|| format!("/ready body is not JSON: {body:?}"))?;
        Ok((status, json))
    }

    /// Polls `/ready` until it answers 200 and returns its body.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<serde_json::Value> {
        self.wait_ready_where(timeout, "200 from /ready", |status, _| status == 200)
            .await
    }

    /// Polls `/ready` until `accept(status, body)` holds and returns the body that satisfied it.
    pub async fn wait_ready_where(
        &self,
        timeout: Duration,
        what: &str,
        accept: impl Fn(u16, &serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let what = format!("{what} on node {}", self.id());
        let result = super::eventually(timeout, &what, || async {
            match self.ready().await {
                Ok((status, body)) if accept(status, &body) => Ok(body),
                Ok((status, body)) => Err(format!("{status} {body}")),
                Err(err) => Err(format!("{err:#}")),
            }
        })
        .await;
        result.map_err(|err| err.context(self.log_tail_message()))
    }

    /// `GET /metrics` (Prometheus text).
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let (status, body) = self.http_get("/metrics").await?;
        anyhow::ensure!(status == 200, "/metrics answered {status}: {body}");
        Ok(body)
    }

    /// The sum of every series of metric `name` (any labels); 0 when absent.
    pub async fn metric_sum(&self, name: &str) -> anyhow::Result<f64> {
        Ok(sum_metric(&self.metrics().await?, name))
    }

    /// The process id while it runs (e.g. to read its memory from `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The sum of the series of metric `name` whose labels contain every comma-separated
    /// part of `label` (e.g. `reason="slow_consumer"`, `action="connect",scope="local"`); 0
    /// when absent.
    pub async fn metric_where(&self, name: &str, label: &str) -> anyhow::Result<f64> {
        let text = self.metrics().await?;
        let selected: String = text
            .lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix('{'))
                    .is_some_and(|labels| {
                        labels
                            .split('}')
                            .next()
                            .is_some_and(|l| label.split(',').all(|part| l.contains(part)))
                    })
            })
            .map(|line| format!("{line}\n"))
            .collect();
        Ok(sum_metric(&selected, name))
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the node with SIGKILL (no drain) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM (graceful drain); use [`Node::wait_exit`] to reap it.
    pub fn terminate(&self) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("node is not running")?;
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        anyhow::ensure!(
            status.success(),
            "kill -TERM {} failed: {status}",
            child.id()
        );
        Ok(())
    }

    /// Waits until the process exits and returns its status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().context("node is not running")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "node {} still running after {timeout:?}\n{}",
                    self.id(),
                    self.log_tail_message()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the node if it runs, then starts it again with the same settings and port.
    ///
    /// # Panics
    /// When it does not come back up.
    pub async fn restart(&mut self) {
        self.kill();
        let mut last_error = String::new();
        // The old socket may linger for a moment; the port is ours, so wait for it.
        for _ in 0..5 {
            match self.spawn_and_wait_healthy().await {
                Ok(()) => return,
                Err(err) => last_error = err,
            }
            if !last_error.to_lowercase().contains("in use") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("{last_error}");
    }

    /// Everything the node wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last lines of the node's log, with a header naming the node and the file.
    pub fn log_tail_message(&self) -> String {
        format!(
            "--- last {LOG_TAIL_LINES} lines of node {} log ({}) ---\n{}\n--- end of node {} ---",
            self.id(),
            self.log_path.display(),
            super::tail_of_file(&self.log_path, LOG_TAIL_LINES),
            self.id()
        )
    }

    async fn spawn_and_wait_healthy(&mut self) -> Result<(), String> {
        self.spawn()?;
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Ok((200, _)) = self.http_get("/health").await {
                if !self.spec.wait_started {
                    return Ok(());
                }
                if let Ok((_, body)) = self.ready().await {
                    if body["starting"] == false {
                        return Ok(());
                    }
                }
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if exited.is_some() || tokio::time::Instant::now() >= deadline {
                self.kill();
                let why = exited.map_or(
                    format!("not started (/health 200 and /ready not starting) within {START_TIMEOUT:?}"),
                    |status| format!("exited before answering /health: {status}"),
                );
                return Err(format!(
                    "node {} on port {}: {why}\n{}",
                    self.id(),
                    self.port,
                    self.log_tail_message()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn spawn(&mut self) -> Result<(), String> {
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|err| format!("open {}: {err}", self.log_path.display()))?;
        use std::io::Write as _;
        let _ = writeln!(
            log,
            "=== pgfanout start #{} on port {} ===",
            self.starts, self.port
        );
        let log_err = log.try_clone().map_err(|err| format!("clone log: {err}"))?;

        let mut command = Command::new(binary());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PGFANOUT_") {
                command.env_remove(key);
            }
        }
        let spec = &self.spec;
        command
            .env("PGFANOUT_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("PGFANOUT_NODE_ID", &spec.node_id)
            .env("PGFANOUT_CHANNELS", spec.channels.join(","))
            .env("PGFANOUT_LOG_FORMAT", "text")
            // Anonymous access is off by default in pgfanout; most tests connect without a
            // token, so the harness turns it on (a test may set it back with `env`).
            .env("PGFANOUT_ALLOW_ANONYMOUS", "true")
            .env(
                "PGFANOUT_LOG",
                std::env::var("PGFANOUT_TEST_LOG").unwrap_or_else(|_| "info".into()),
            );
        if let Some(url) = &spec.database_url {
            command.env("PGFANOUT_DATABASE_URL", url);
        }
        if let Some(url) = &spec.redis_url {
            command.env("PGFANOUT_REDIS_URL", url);
        }
        for (key, value) in &spec.env {
            command.env(key, value);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|err| format!("spawn {}: {err}", binary()))?;
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail_message());
        }
        self.kill();
    }
}

/// The `pgfanout` binary nodes run: this build's, or `PGFANOUT_TEST_BIN` (another build, e.g.
/// to measure before and after a change with the same test).
fn binary() -> String {
    std::env::var("PGFANOUT_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_pgfanout").into())
}

/// Sums the samples of metric `name` in Prometheus text (any labels, comments skipped).
pub fn sum_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|line| line.strip_prefix(name))
        .filter_map(|rest| match rest.strip_prefix('{') {
            Some(labelled) => labelled.split_once('}').map(|(_, after)| after),
            None => rest.starts_with(' ').then_some(rest),
        })
        .filter_map(|after| after.split_whitespace().next()?.parse::<f64>().ok())
        .sum()
}
