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
        Cluster { nodes, redis, db }
    }

    /// Waits until every node answers 200 on `/ready` and (with Redis) one node reports itself
    /// bridge owner (`pgfanout_bridge_owner` 1): from then on a NOTIFY reaches the bus.
    pub async fn wait_bridged(&self) -> anyhow::Result<()> {
        for node in &self.nodes {
            node.wait_ready(BRIDGE_TIMEOUT).await?;
        }
        if self.redis.is_none() {
            return Ok(());
        }
        super::eventually(
            BRIDGE_TIMEOUT,
            "a node with pgfanout_bridge_owner 1",
            || async {
                let mut seen = Vec::new();
                for node in &self.nodes {
                    match node.metric_sum("pgfanout_bridge_owner").await {
                        Ok(owner) if owner >= 1.0 => return Ok(()),
                        Ok(owner) => seen.push(format!("{}={owner}", node.id())),
                        Err(err) => seen.push(format!("{}: {err:#}", node.id())),
                    }
                }
                Err(seen.join(", "))
            },
        )
        .await
    }

    /// The first node.
    pub fn node(&self) -> &Node {
        &self.nodes[0]
    }
}
