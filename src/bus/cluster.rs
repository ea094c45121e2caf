//! The bus on a Redis Cluster: sharded pub/sub, the topology watch, and the lease fence
//! across slots.
//!
//! - **Sharded pub/sub.** A channel's publications go out with `SPUBLISH` on its own slot
//!   (`pgfanout:{channel}:pub`), so only that shard's master (and its replicas) carry them;
//!   plain `PUBLISH` would be broadcast over the whole cluster bus. The subscriber holds one
//!   redis-rs Cluster connection with RESP3 pushes: one connection per master it needs,
//!   `SSUBSCRIBE` grouped by slot (a command may not span slots), `MOVED`/`ASK` followed, and
//!   a shard that reconnects resubscribed.
//! - **Topology watch.** When a slot leaves a master (resharding) the master drops its shard
//!   subscribers (`sunsubscribe` push), and when a master dies its replica takes over at
//!   another address; redis-rs does not resubscribe in either case by itself. So every
//!   [`TOPOLOGY_PERIOD`] the subscriber compares the slot map (`CLUSTER SLOTS`) with the last
//!   one and, when it changed, replaces both connections and resubscribes every channel. The
//!   node cursors then read history for whatever was published meanwhile (`cursor`).
//! - **Fence across slots.** The bridge lease is one key, in its own slot, and a script may
//!   only touch keys of one slot, so on a Cluster the publish script cannot read the lease.
//!   A fenced publication takes two steps instead: [`fence_deadline`] checks the token in the
//!   lease's slot and returns when the lease expires (that master's clock); the publish
//!   script, in the channel's slot, accepts it only if it runs before that instant minus
//!   [`FENCE_CLOCK_MARGIN`]. Why that is as safe as the one-step check: a lease that is not
//!   released can only pass to another node after it expired, and we publish strictly
//!   before it expires; the margin covers clock skew between the two masters (keep the
//!   masters on NTP). The one window a one-step check does not have: a holder that
//!   *releases* (shutdown) while a publication of its own is still in flight may see it land
//!   after the release. The lease is released when the ingest stage stops, at the moment
//!   the LISTEN loop is told to stop, so this is at most the publications in flight then
//!   (each already checked against a lease we held, and on the bus before the successor's
//!   reconciliation reads it, or fenced by the deadline).
//! - **Fence records across slots.** A fenced publication may also record a value (ingest:
//!   the shard's stream position) atomically with it; on a Cluster the record lives in the
//!   shard's slot, so the atomic part becomes a dedupe key named after the record in the
//!   channel's slot, and the record follows the publication ([`write_record`]).
//! - **Batches.** A batch checks each lease once, then sends one publish script call per slot
//!   (all slots at once; a call stops at its first publication not applied, so a channel's
//!   order holds), then writes each fence record once: the value of the last publication of
//!   the batch's settled prefix (every publication before it published or a duplicate). What
//!   other slots published past that prefix is unrecorded but carries its dedupe key, so a
//!   retry or a takeover republishing it gets "duplicate".
//!
//! The rule for every key on the bus: one script or pipeline touches one slot. Channel keys
//! share `{channel}`; the ingest keys (leases, live nodes, positions) share `{ingest}`.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{RedisResult, Script, Value};

use super::connection::{cluster_client, RedisConnection};
use super::{Fence, FenceRecord};

/// How often the subscriber compares the Cluster's slot map with the last one it saw.
pub const TOPOLOGY_PERIOD: Duration = Duration::from_secs(1);
/// A fenced publication must run this long before the lease expires (clock skew between
/// the lease's master and the channel's master).
pub const FENCE_CLOCK_MARGIN: Duration = Duration::from_millis(250);

/// The subscriber side of the bus: pub/sub on one Redis, or sharded pub/sub on a Cluster.
pub enum PubSub {
    Single(ConnectionManager),
    Cluster(Box<ClusterPubSub>),
}

/// Sharded pub/sub on a Cluster, replaceable when the topology changes.
pub struct ClusterPubSub {
    /// Builds replacements; carries the push sender, so every connection feeds the cursors.
    client: ClusterClient,
    conn: ClusterConnection,
}

impl ClusterPubSub {
    /// Connects through the seeds with RESP3; every push goes to `push`.
    ///
    /// # Errors
    /// No seed answers, or the URLs are invalid.
    pub async fn connect(
        seeds: &[String],
        push: impl redis::aio::AsyncPushSender,
    ) -> RedisResult<Self> {
        let client = cluster_client(seeds, Some(push))?;
        let conn = client.get_async_connection().await?;
        Ok(Self { client, conn })
    }

    /// Drops the connection (and its subscriptions) for a fresh one built on the current
    /// slot map.
    ///
    /// # Errors
    /// No node answers; the old connection stays.
    pub async fn replace(&mut self) -> RedisResult<()> {
        self.conn = self.client.get_async_connection().await?;
        Ok(())
    }
}

impl PubSub {
    /// Subscribes the pub/sub channels `names` (one `SSUBSCRIBE` per slot on a Cluster).
    ///
    /// # Errors
    /// Redis unreachable; on a Cluster some slots may have been subscribed.
    pub async fn subscribe(&mut self, names: Vec<String>) -> RedisResult<()> {
        match self {
            Self::Single(conn) => conn.subscribe(names).await,
            Self::Cluster(cluster) => {
                per_slot(&cluster.conn, names, |mut conn, group| async move {
                    conn.ssubscribe(group).await
                })
                .await
            }
        }
    }

    /// Unsubscribes `names` (one `SUNSUBSCRIBE` per slot on a Cluster).
    ///
    /// # Errors
    /// Redis unreachable.
    pub async fn unsubscribe(&mut self, names: Vec<String>) -> RedisResult<()> {
        match self {
            Self::Single(conn) => conn.unsubscribe(names).await,
            Self::Cluster(cluster) => {
                per_slot(&cluster.conn, names, |mut conn, group| async move {
                    conn.sunsubscribe(group).await
                })
                .await
            }
        }
    }
}

/// Runs `op` once per slot's group of `names`, all at once; the first error wins.
async fn per_slot<F, Fut>(conn: &ClusterConnection, names: Vec<String>, op: F) -> RedisResult<()>
where
    F: Fn(ClusterConnection, Vec<String>) -> Fut,
    Fut: std::future::Future<Output = RedisResult<()>>,
{
    let mut groups: std::collections::BTreeMap<u16, Vec<String>> = Default::default();
    for name in names {
        groups
            .entry(super::slot::of(name.as_bytes()))
            .or_default()
            .push(name);
    }
    let calls = groups.into_values().map(|group| op(conn.clone(), group));
    futures_util::future::join_all(calls)
        .await
        .into_iter()
        .collect()
}

/// The slot map as `CLUSTER SLOTS` reports it: (first slot, last slot, master address),
/// sorted; compared between rounds to notice resharding and failover.
///
/// # Errors
/// Redis unreachable, or a reply of another shape.
pub async fn topology(conn: &mut RedisConnection) -> RedisResult<Vec<(i64, i64, String)>> {
    let reply: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
    let bad = || redis::RedisError::from((redis::ErrorKind::Parse, "CLUSTER SLOTS reply"));
    let Value::Array(ranges) = reply else {
        return Err(bad());
    };
    let mut map = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Value::Array(parts) = range else {
            return Err(bad());
        };
        let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(master))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            return Err(bad());
        };
        let host = match master.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => return Err(bad()),
        };
        let port = match master.get(1) {
            Some(Value::Int(port)) => *port,
            _ => return Err(bad()),
        };
        map.push((*first, *last, format!("{host}:{port}")));
    }
    map.sort();
    Ok(map)
}

/// The first step of a fenced publication on a Cluster: until when (ms since the Unix
/// epoch) the publish script may accept it, or None when the lease is not held by the
/// fence's token. See the module docs for why two steps stay safe.
///
/// # Errors
/// Redis unreachable or a script failure.
pub async fn fence_deadline(
    conn: &mut RedisConnection,
    script: &Script,
    fence: &Fence,
) -> RedisResult<Option<u64>> {
    let mut invocation = script.prepare_invoke();
    invocation.key(&fence.key).arg(&fence.token);
    let expires: i64 = invocation.invoke_async(conn).await?;
    let margin = u64::try_from(FENCE_CLOCK_MARGIN.as_millis()).unwrap_or(u64::MAX);
    Ok(u64::try_from(expires)
        .ok()
        .and_then(|expires| expires.checked_sub(margin))
        .filter(|deadline| *deadline > 0))
}

/// Writes a fence record after its publication, while the lease is still the caller's.
/// KEYS[1] lease, KEYS[2] record (both in one slot: the ingest keys share a hash tag).
pub const WRITE_RECORD: &str = r#"
if redis.call("GET", KEYS[1]) == ARGV[1] then
  redis.call("SET", KEYS[2], ARGV[2])
  return 1
end
return 0
"#;

/// The second half of a fenced publication's record on a Cluster: the record (a shard's
/// stream position) lives in the shard's slot, not the channel's, so it is written just
/// after the publication, guarded by the lease. Exactly once still holds: a publication
/// whose record was not written yet (a crash in between, a retry) carries a dedupe key
/// named after the record in the channel's slot, written atomically with it, so publishing
/// it again answers "duplicate" for [`super::DEDUPE_TTL`]. A record left behind by at most
/// the publications in flight is therefore harmless to a takeover.
///
/// # Errors
/// Redis unreachable, or the two keys in different slots.
pub async fn write_record(
    conn: &mut RedisConnection,
    script: &Script,
    fence: &Fence,
    record: &FenceRecord,
) -> RedisResult<()> {
    let mut invocation = script.prepare_invoke();
    invocation
        .key(&fence.key)
        .key(&record.key)
        .arg(&fence.token)
        .arg(&record.value);
    invocation.invoke_async::<i64>(conn).await.map(|_| ())
}
