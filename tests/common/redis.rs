//! [`RedisServer`]: a private `redis-server` child process on a free port, one per test.
//!
//! No persistence (`--save ""`, `--appendonly no`), bound to 127.0.0.1. `stop()` and `restart()`
//! (same port) inject bus outages; `snapshot()` then `restart()` brings it back with older
//! data (what was written after the snapshot is lost). Drop kills and reaps the process.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long `redis-server` gets to answer PING after it is spawned.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A `redis-server` owned by one test.
pub struct RedisServer {
    /// The port it listens on; kept across `restart()` so nodes reconnect to the same URL.
    port: u16,
    /// The running process; `None` while stopped.
    child: Option<Child>,
    /// Where its stdout/stderr go, shown when it fails to start.
    log_path: PathBuf,
    /// The server's snapshot file (`--dbfilename`, its own in the shared directory).
    dbfile: String,
    /// A `snapshot()` was written to `dbfile`: the next start loads it (else it gets a new,
    /// empty file).
    snapshot_taken: bool,
}

impl RedisServer {
    /// Starts `redis-server` on a free port and waits until it answers PING.
    ///
    /// # Panics
    /// When `redis-server` is missing or does not come up: the message names `scripts/deps.sh`.
    pub async fn start() -> RedisServer {
        let mut last_error = String::new();
        // A free port can be taken by a parallel test between probing and binding: retry.
        for _ in 0..3 {
            let mut server = RedisServer {
                port: super::free_port(),
                child: None,
                log_path: PathBuf::new(),
                dbfile: String::new(),
                snapshot_taken: false,
            };
            match server.spawn_and_wait().await {
                Ok(()) => return server,
                Err(err) => last_error = err,
            }
        }
        panic!("{last_error}");
    }

    /// `redis://127.0.0.1:<port>`, for `PGFANOUT_REDIS_URL`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id while it runs (e.g. to read its CPU time from `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL, so clients see their connections drop) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Writes the data as it is now to a snapshot file of this server's own (`SAVE`): the
    /// next `restart()` loads it, so what is written after it is lost, like a Redis that
    /// comes back from an old snapshot or a lagging replica.
    ///
    /// # Errors
    /// Redis does not answer, or refuses.
    pub fn snapshot(&mut self) -> anyhow::Result<()> {
        let reply = self.command("SAVE")?;
        anyhow::ensure!(reply.starts_with("+OK"), "SAVE: {reply}");
        self.snapshot_taken = true;
        Ok(())
    }

    /// Starts the server again on the same port (empty, or with the last `snapshot()`).
    ///
    /// # Panics
    /// When it does not come back.
    pub async fn restart(&mut self) {
        self.stop();
        if let Err(err) = self.spawn_and_wait().await {
            panic!("{err}");
        }
    }

    /// Sends one inline command and returns the raw reply (e.g. `command("PING")` → `+PONG\r\n`).
    pub fn command(&self, line: &str) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.set_write_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(format!("{line}\r\n").as_bytes())?;
        let mut buf = [0u8; 4096];
        let read = stream.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..read]).into_owned())
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("redis-logs");
        std::fs::create_dir_all(&log_dir)
            .map_err(|err| format!("create {}: {err}", log_dir.display()))?;
        self.log_path = log_dir.join(format!("redis-{}-{}.log", self.port, super::random_tag()));
        let log =
            std::fs::File::create(&self.log_path).map_err(|err| format!("create log: {err}"))?;
        let log_err = log.try_clone().map_err(|err| format!("clone log: {err}"))?;
        if !std::mem::take(&mut self.snapshot_taken) {
            self.dbfile = format!("dump-{}-{}.rdb", self.port, super::random_tag());
        }
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", &log_dir.to_string_lossy()])
            .args(["--dbfilename", &self.dbfile])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|err| {
                format!("cannot spawn redis-server ({err}); install it with scripts/deps.sh")
            })?;
        self.child = Some(child);

        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if self
                .command("PING")
                .is_ok_and(|reply| reply.starts_with("+PONG"))
            {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if exited.is_some() || tokio::time::Instant::now() >= deadline {
                self.stop();
                return Err(format!(
                    "redis-server on port {} did not answer PING ({}); its log:\n{}",
                    self.port,
                    exited.map_or("timed out".to_string(), |status| format!(
                        "exited: {status}"
                    )),
                    super::tail_of_file(&self.log_path, 30)
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
