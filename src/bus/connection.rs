//! The command connection a node shares between the bus scripts, the leases and the limits:
//! one Redis (a `ConnectionManager` that reconnects), or a Redis Cluster.
//!
//! On a Cluster, redis-rs routes each command to the master of its key's slot and follows
//! `MOVED`/`ASK`; what it cannot follow by itself (a master that died and whose slots a
//! replica took over, while commands keep going to the dead address) the topology watch of
//! the bus repairs by replacing the connection ([`ClusterCommands::replace`]). A clone of
//! [`RedisConnection`] always uses the current one.
//!
//! One rule for everything sent on it: all keys of one script, one pipeline or one
//! `SSUBSCRIBE` live in one slot (a Cluster refuses anything else with `CROSSSLOT`). Channel
//! keys share the hash tag `{channel}`; [`RedisConnection::group_by_slot`] splits pipelines
//! that touch many subjects.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// The node's Redis command connection; cheap to clone.
#[derive(Clone)]
pub enum RedisConnection {
    Single(ConnectionManager),
    Cluster(Arc<ClusterCommands>),
}

/// A Cluster command connection that the topology watch can swap for a fresh one.
pub struct ClusterCommands {
    /// Builds replacements (from the configured seed nodes).
    client: ClusterClient,
    /// The connection in use; commands clone it (a handle to its driver task), so a swap
    /// never waits for a command in flight.
    current: RwLock<ClusterConnection>,
}

/// How long one attempt to reach a Cluster node may take.
pub const CLUSTER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a Cluster command may wait for its reply (redirects and retries included).
pub const CLUSTER_RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Attempts of a command on a Cluster (redirects, `TRYAGAIN` during a slot migration).
const CLUSTER_RETRIES: u32 = 8;

/// The seed URLs of a Cluster: `PGFANOUT_REDIS_URL` split at commas, blanks dropped.
pub fn seeds(url: &str) -> Vec<String> {
    url.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A Cluster client for `seeds`; `resp3_push` makes it a pub/sub client that hands every
/// push to the sender.
///
/// # Errors
/// A seed URL is invalid.
pub fn cluster_client(
    seeds: &[String],
    resp3_push: Option<impl redis::aio::AsyncPushSender>,
) -> RedisResult<ClusterClient> {
    let mut builder = ClusterClient::builder(seeds.iter().map(String::as_str))
        .connection_timeout(CLUSTER_CONNECT_TIMEOUT)
        .response_timeout(CLUSTER_RESPONSE_TIMEOUT)
        .retries(CLUSTER_RETRIES)
        .max_retry_wait(500)
        .min_retry_wait(20);
    if let Some(sender) = resp3_push {
        builder = builder
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(sender);
    }
    builder.build()
}

impl ClusterCommands {
    /// Connects to the Cluster through its seed nodes.
    ///
    /// # Errors
    /// No seed answers, or the URLs are invalid.
    pub async fn connect(seeds: &[String]) -> RedisResult<Arc<Self>> {
        let client = cluster_client(seeds, None::<NoPush>)?;
        let conn = client.get_async_connection().await?;
        Ok(Arc::new(Self {
            client,
            current: RwLock::new(conn),
        }))
    }

    fn get(&self) -> ClusterConnection {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Builds a fresh connection (a new slot map, new node connections) and uses it from now on.
    ///
    /// # Errors
    /// No node answers; the old connection stays in use.
    pub async fn replace(&self) -> RedisResult<()> {
        let conn = self.client.get_async_connection().await?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = conn;
        Ok(())
    }
}

/// A push sender type for clients without pushes.
type NoPush = fn(redis::PushInfo) -> Result<(), ()>;

impl RedisConnection {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// Splits `items` into groups whose keys share a slot on a Cluster (one group per slot, so
    /// each can go in one pipeline); one group on a single Redis.
    pub fn group_by_slot<T>(&self, items: Vec<T>, key: impl Fn(&T) -> &str) -> Vec<Vec<T>> {
        if !self.is_cluster() {
            return if items.is_empty() {
                Vec::new()
            } else {
                vec![items]
            };
        }
        let mut groups: std::collections::BTreeMap<u16, Vec<T>> = Default::default();
        for item in items {
            groups
                .entry(super::slot::of(key(&item).as_bytes()))
                .or_default()
                .push(item);
        }
        groups.into_values().collect()
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(cluster) => {
                let mut conn = cluster.get();
                Box::pin(async move { conn.req_packed_command(cmd).await })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(cluster) => {
                let mut conn = cluster.get();
                Box::pin(async move { conn.req_packed_commands(pipeline, offset, count).await })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_urls_split_at_commas() {
        assert_eq!(
            seeds(" redis://a:1, redis://b:2,,"),
            vec!["redis://a:1".to_string(), "redis://b:2".to_string()]
        );
        assert_eq!(seeds("redis://a:1"), vec!["redis://a:1".to_string()]);
    }
}
