//! [`RedisCluster`]: a private Redis Cluster of real `redis-server` processes
//! (`cluster-enabled yes`) on free ports, created with `redis-cli --cluster create`.
//!
//! N masters, optionally R replicas each; `cluster-node-timeout` 1 s so a replica takes over
//! within seconds of its master's death; `cluster-require-full-coverage no` so the other
//! shards keep serving meanwhile. Drop kills and reaps every process.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};

/// How long the cluster gets to agree on its slots after `--cluster create`.
const FORM_TIMEOUT: Duration = Duration::from_secs(30);

/// One `redis-server` of the cluster.
struct Member {
    /// Client port (the cluster bus port is another free port).
    port: u16,
    /// `None` once killed.
    child: Option<Child>,
    log_path: PathBuf,
}

/// A Redis Cluster owned by one test.
pub struct RedisCluster {
    members: Vec<Member>,
}

impl RedisCluster {
    /// Starts `masters` masters with `replicas` replicas each and waits until every member
    /// reports `cluster_state:ok`.
    ///
    /// # Panics
    /// When a server does not start or the cluster does not form; the message says why.
    pub async fn start(masters: usize, replicas: usize) -> RedisCluster {
        let mut last = None;
        // A free port can be taken by a parallel test between probing and binding: retry.
        for _ in 0..3 {
            match Self::try_start(masters, replicas).await {
                Ok(cluster) => return cluster,
                Err(err) => last = Some(err),
            }
        }
        panic!(
            "redis cluster did not form: {:#}",
            last.expect("three attempts")
        );
    }

    async fn try_start(masters: usize, replicas: usize) -> anyhow::Result<RedisCluster> {
        let log_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("redis-cluster");
        std::fs::create_dir_all(&log_dir)?;
        let tag = super::random_tag();
        let mut cluster = RedisCluster {
            members: Vec::new(),
        };
        let members = masters * (1 + replicas);
        let ports = distinct_free_ports(2 * members)?;
        for index in 0..members {
            let (port, bus_port) = (ports[2 * index], ports[2 * index + 1]);
            let log_path = log_dir.join(format!("{tag}-{index}-{port}.log"));
            let log = std::fs::File::create(&log_path)?;
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string()])
                .args(["--cluster-port", &bus_port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes"])
                .args([
                    "--cluster-config-file",
                    &format!("nodes-{tag}-{index}.conf"),
                ])
                .args(["--cluster-node-timeout", "1000"])
                .args(["--cluster-require-full-coverage", "no"])
                // A replica may take over however long it was cut off (a loaded test
                // machine delays replication; the test kills masters on purpose).
                .args(["--cluster-replica-validity-factor", "0"])
                .args(["--dir", &log_dir.to_string_lossy()])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("spawn redis-server (install it with scripts/deps.sh)")?;
            cluster.members.push(Member {
                port,
                child: Some(child),
                log_path,
            });
        }
        for member in &mut cluster.members {
            if let Some(status) = member
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "redis-server on {} exited: {status}\n{}",
                    member.port,
                    super::tail_of_file(&member.log_path, 20)
                );
            }
        }
        for member in &cluster.members {
            super::eventually(Duration::from_secs(10), "redis-server PING", || async {
                match cli(member.port, &["PING"]).await {
                    Ok(reply) if reply.trim() == "PONG" => Ok(()),
                    Ok(reply) => Err(reply),
                    Err(err) => Err(format!("{err:#}")),
                }
            })
            .await
            .with_context(|| super::tail_of_file(&member.log_path, 20))?;
        }
        let addresses: Vec<String> = cluster
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.port))
            .collect();
        let output = tokio::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .await
            .context("run redis-cli --cluster create")?;
        if !output.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        cluster.wait_healthy(masters).await?;
        Ok(cluster)
    }

    /// Waits until every running member says `cluster_state:ok` and sees `masters` masters
    /// serving slots, and every replica is in sync with its master.
    pub async fn wait_healthy(&self, masters: usize) -> anyhow::Result<()> {
        super::eventually(FORM_TIMEOUT, "cluster_state:ok everywhere", || async {
            for member in self.members.iter().filter(|m| m.child.is_some()) {
                let info = cli(member.port, &["CLUSTER", "INFO"])
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                if !info.contains("cluster_state:ok") {
                    return Err(format!(
                        "{}: {}",
                        member.port,
                        info.lines().next().unwrap_or("")
                    ));
                }
                let seen = self
                    .masters_seen_by(member.port)
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                if seen.len() != masters {
                    return Err(format!("{} sees masters {seen:?}", member.port));
                }
                let replication = cli(member.port, &["INFO", "replication"])
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                if replication.contains("role:slave")
                    && !replication.contains("master_link_status:up")
                {
                    return Err(format!("replica {} not in sync yet", member.port));
                }
            }
            Ok(())
        })
        .await
    }

    /// `PGFANOUT_REDIS_URL` for the nodes: every member, comma-separated.
    pub fn seeds(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("redis://127.0.0.1:{}", m.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Ports of the members still running.
    pub fn running(&self) -> Vec<u16> {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.port)
            .collect()
    }

    /// The ports of the masters that serve slots, as a running member sees them.
    pub async fn masters(&self) -> anyhow::Result<Vec<u16>> {
        let port = *self.running().first().context("no member running")?;
        self.masters_seen_by(port).await
    }

    async fn masters_seen_by(&self, port: u16) -> anyhow::Result<Vec<u16>> {
        let nodes = cli(port, &["CLUSTER", "NODES"]).await?;
        let mut masters: Vec<u16> = nodes
            .lines()
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.get(2).is_some_and(|f| f.contains("master"))
                    && !fields.get(2).is_some_and(|f| f.contains("fail"))
                    && fields.len() > 8
            })
            .filter_map(port_of)
            .collect();
        masters.sort_unstable();
        Ok(masters)
    }

    /// The slot of `key`.
    pub async fn slot_of(&self, key: &str) -> anyhow::Result<u16> {
        let port = *self.running().first().context("no member running")?;
        Ok(cli(port, &["CLUSTER", "KEYSLOT", key])
            .await?
            .trim()
            .parse()?)
    }

    /// The port of the master that serves `slot`, as the member on `port` sees it.
    pub async fn master_of_slot(&self, port: u16, slot: u16) -> anyhow::Result<u16> {
        let nodes = cli(port, &["CLUSTER", "NODES"]).await?;
        nodes
            .lines()
            .find(|line| {
                let flags = line.split_whitespace().nth(2).unwrap_or_default();
                flags.contains("master") && !flags.contains("fail") && serves(line, slot)
            })
            .and_then(port_of)
            .with_context(|| format!("no master serves slot {slot}"))
    }

    /// The ports of the replicas of the master on `master`, as it sees them.
    pub async fn replicas_of(&self, master: u16) -> anyhow::Result<Vec<u16>> {
        let id = self.id_of(master).await?;
        let lines = cli(master, &["CLUSTER", "REPLICAS", &id]).await?;
        Ok(lines.lines().filter_map(port_of).collect())
    }

    /// A replication offset from `INFO replication` on `port` (`field`: `master_repl_offset`
    /// on a master, `slave_repl_offset` on a replica).
    pub async fn replication_offset(&self, port: u16, field: &str) -> anyhow::Result<u64> {
        let info = cli(port, &["INFO", "replication"]).await?;
        info.lines()
            .find_map(|line| line.trim().strip_prefix(field)?.strip_prefix(':'))
            .with_context(|| format!("no {field} in INFO replication of :{port}"))?
            .parse()
            .with_context(|| format!("{field} of :{port}"))
    }

    /// The node id of the member on `port`.
    pub async fn id_of(&self, port: u16) -> anyhow::Result<String> {
        Ok(cli(port, &["CLUSTER", "MYID"]).await?.trim().to_string())
    }

    /// Runs `redis-cli -p port args…` and returns its output.
    pub async fn cli(&self, port: u16, args: &[&str]) -> anyhow::Result<String> {
        cli(port, args).await
    }

    /// Kills the member on `port` (SIGKILL) and reaps it.
    pub fn kill(&mut self, port: u16) {
        for member in self.members.iter_mut().filter(|m| m.port == port) {
            if let Some(mut child) = member.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// `n` different ports that were free a moment ago (the listeners are held until all are
/// picked, so no two members get the same one).
fn distinct_free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()?)
}

/// Whether a `CLUSTER NODES` line lists `slot` among its ranges.
fn serves(line: &str, slot: u16) -> bool {
    line.split_whitespace().skip(8).any(|range| {
        if range.starts_with('[') {
            return false;
        }
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        match (first.parse::<u16>(), last.parse::<u16>()) {
            (Ok(first), Ok(last)) => (first..=last).contains(&slot),
            _ => false,
        }
    })
}

async fn cli(port: u16, args: &[&str]) -> anyhow::Result<String> {
    let output = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .context("redis-cli timed out")?
    .context("run redis-cli")?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The port of the node a `CLUSTER NODES` (or `CLUSTER REPLICAS`) line describes: its second
/// field is `ip:port@cport`.
fn port_of(line: &str) -> Option<u16> {
    line.split_whitespace()
        .nth(1)?
        .split(['@', ':'])
        .nth(1)?
        .parse()
        .ok()
}
