//! [`Cluster`]: one test database, one Redis (optional) and N nodes sharing them.

use std::time::Duration;

use super::{Node, RedisServer, TestDb};

/// How long a fresh cluster gets to become ready and elect a bridge owner.
pub const BRIDGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything a multi-node test needs. Fields drop in order: nodes first, then Redis, then the
/// database.
pub struct Cluster {
    /// The gateway nodes, `n0`, `n1`, … (node ids carry a random suffix).
    pub nodes: Vec<Node>,
    /// The shared bus; `None` for a single node on the in-memory bus.
    pub redis: Option<RedisServer>,
    /// The shared database the nodes LISTEN on.
    pub db: TestDb,
    /// Channel shards the nodes split between them (`PGFANOUT_INGEST_SHARDS`, default 16).
    pub shards: usize,
}

impl Cluster {
    /// `n` nodes LISTENing on `channels` of a fresh database, sharing a fresh Redis.
    pub async fn start(n: usize, channels: &[&str]) -> Cluster {
        Cluster::start_with(n, channels, true, &[]).await
    }

    /// Like [`Cluster::start`]; `with_redis: false` needs `n == 1` (the in-memory bus is per node);
    /// `env` is applied to every node.
    pub async fn start_with(
        n: usize,
        channels: &[&str],
        with_redis: bool,
        env: &[(&str, &str)],
    ) -> Cluster {
        assert!(
            with_redis || n == 1,
            "nodes without Redis do not share a bus"
        );
        let db = TestDb::create().await;
        let redis = if with_redis {
            Some(RedisServer::start().await)
        } else {
            None
        };
        let tag = &super::random_tag()[..6];
        let shards = env
            .iter()
            .find(|(key, _)| *key == "PGFANOUT_INGEST_SHARDS")
            .map_or(DEFAULT_SHARDS, |(_, value)| {
                value.parse().expect("PGFANOUT_INGEST_SHARDS is a number")
            });
        let mut nodes = Vec::with_capacity(n);
        for index in 0..n {
            let mut builder = Node::builder()
                .node_id(format!("n{index}-{tag}"))
                .database(&db)
                .channels(channels);
            if let Some(redis) = &redis {
                builder = builder.redis(redis);
            }
            for (key, value) in env {
                builder = builder.env(key, value);
            }
            nodes.push(builder.start().await);
        }
        Cluster {
            nodes,
            redis,
            db,
            shards,
        }
    }

    /// Waits until every node answers 200 on `/ready` and every channel shard is bridged by
    /// some node (`pgfanout_ingest_shards_owned` summed over the nodes): from then on a NOTIFY
    /// reaches the bus without waiting for a takeover.
    pub async fn wait_bridged(&self) -> anyhow::Result<()> {
        for node in &self.nodes {
            node.wait_ready(BRIDGE_TIMEOUT).await?;
        }
        let running: Vec<&Node> = self.nodes.iter().collect();
        wait_all_shards_owned(&running, self.shards).await
    }

    /// The first node.
    pub fn node(&self) -> &Node {
        &self.nodes[0]
    }
}

/// Shards of a node that sets no `PGFANOUT_INGEST_SHARDS`.
pub const DEFAULT_SHARDS: usize = 16;

/// Waits until `nodes` together bridge all `shards` shards (each node's
/// `pgfanout_ingest_shards_owned`, summed).
pub async fn wait_all_shards_owned(nodes: &[&Node], shards: usize) -> anyhow::Result<()> {
    super::eventually(
        BRIDGE_TIMEOUT,
        &format!("all {shards} shards owned"),
        || async {
            let mut seen = Vec::new();
            let mut total = 0.0;
            for node in nodes {
                match node.metric_sum("pgfanout_ingest_shards_owned").await {
                    Ok(owned) => {
                        total += owned;
                        seen.push(format!("{}={owned}", node.id()));
                    }
                    Err(err) => seen.push(format!("{}: {err:#}", node.id())),
                }
            }
            if total == shards as f64 {
                Ok(())
            } else {
                Err(seen.join(", "))
            }
        },
    )
    .await
}
