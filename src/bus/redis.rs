//! The Redis bus: one script call per batch of publications (`publish`; each one atomic, in
//! order; a batch of one for a single publication), one pub/sub subscription per channel
//! with local subscribers, health checks with reconnect counting.
//!
//! Pushes from the subscriber connection go through the node's cursors (`cursor`), which
//! fill holes in a channel's stream from history (`run_repairs`) before delivering to the hub,
//! and find streams that lost writes Redis had acknowledged (a failover, a restart from
//! older data): those get a new epoch (`reset.lua`), so nobody skips the reused offsets.
//!
//! Keys of a channel share the hash tag `{channel}` so Redis Cluster keeps them on one
//! slot; on a Cluster (`connect_cluster`) publications use sharded pub/sub and the
//! subscriber follows the topology (see `cluster`). Publications travel on pub/sub as `"<offset> <epoch> t<micros> <json>"` (the
//! timestamp is optional: see `split_timestamp`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{PushInfo, PushKind, Script, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod publish;

use super::cluster::{self, ClusterPubSub, PubSub};
use super::connection::{ClusterCommands, RedisConnection};
use super::cursor::{Cursors, Repaired};
use super::{
    assemble_recovery, new_epoch, BusError, HistoryPolicy, HistoryRead, Position, Publication,
    Recovery,
};
use crate::hub::Hub;
use crate::metrics as m;

/// Subscription changes waiting for the subscriber task.
const SUBSCRIPTION_QUEUE: usize = 4096;
/// Subscription changes sent to Redis in one command at most.
const SUBSCRIPTION_BATCH: usize = 512;
const HEALTH_PERIOD: Duration = Duration::from_secs(1);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// Further PINGs (each to a random node) before a Redis Cluster counts as unreachable.
const CLUSTER_PING_ATTEMPTS: usize = 3;
/// Channels waiting for a history read (a channel is queued at most once at a time).
const REPAIR_QUEUE: usize = 65_536;
/// History reads under way at once after a reconnect (one per channel).
const REPAIR_CONCURRENCY: usize = 16;
/// Longest wait between attempts of a history read while Redis does not answer.
const REPAIR_MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Redis key names. All keys of a channel carry its hash tag.
pub mod keys {
    pub fn meta(channel: &str) -> String {
        format!("pgfanout:{{{channel}}}:meta")
    }
    pub fn history(channel: &str) -> String {
        format!("pgfanout:{{{channel}}}:history")
    }
    pub fn dedupe(channel: &str, key: &str) -> String {
        format!("pgfanout:{{{channel}}}:dedupe:{key}")
    }
    pub fn pubsub(channel: &str) -> String {
        format!("pgfanout:{{{channel}}}:pub")
    }
    /// The channel name inside a pub/sub channel name.
    pub fn channel_of_pubsub(name: &[u8]) -> Option<&str> {
        let name = std::str::from_utf8(name).ok()?;
        name.strip_prefix("pgfanout:{")?.strip_suffix("}:pub")
    }
}

#[derive(Clone)]
pub struct RedisBus {
    inner: Arc<Inner>,
}

struct Inner {
    history: Arc<HistoryPolicy>,
    commands: RedisConnection,
    subscriptions: mpsc::Sender<SubscriptionChange>,
    up: AtomicBool,
    /// This node's place in every locally live channel, fed by the subscriber connection.
    cursors: Arc<Cursors>,
    publish: Script,
    recover: Script,
    /// A new epoch for a channel whose stream lost writes (`reset.lua`).
    reset: Script,
    /// The first step of a fenced publication on a Cluster (`fence.lua`).
    fence: Script,
    /// The fence record written after a publication on a Cluster.
    record: Script,
}

enum SubscriptionChange {
    Watch(Arc<str>, oneshot::Sender<Result<(), String>>),
    Unwatch(Arc<str>),
}

/// Where the bus lives.
pub enum Target<'a> {
    /// One Redis, by URL.
    Single(&'a str),
    /// A Redis Cluster, by its seed URLs.
    Cluster(&'a [String]),
}

impl RedisBus {
    /// Connects the command and subscriber connections, on one Redis or on a Redis
    /// Cluster, and starts the subscriber and health tasks.
    ///
    /// # Errors
    /// Redis unreachable or a URL invalid.
    pub async fn connect_to(
        target: Target<'_>,
        hub: Arc<Hub>,
        history: Arc<HistoryPolicy>,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<Self, BusError> {
        let (repairs_tx, repairs) = mpsc::channel(REPAIR_QUEUE);
        let cursors = Arc::new(Cursors::new(hub.clone(), repairs_tx));
        let push_cursors = cursors.clone();
        let push = move |push: PushInfo| {
            on_push(&push_cursors, push);
            Ok::<(), redis::aio::SendError>(())
        };
        let (commands, pubsub) = match target {
            Target::Single(url) => {
                let (commands, pubsub) = connect_single(url, push).await?;
                (RedisConnection::Single(commands), PubSub::Single(pubsub))
            }
            Target::Cluster(seeds) => {
                let commands = ClusterCommands::connect(seeds).await?;
                let pubsub = ClusterPubSub::connect(seeds, push).await?;
                (
                    RedisConnection::Cluster(commands),
                    PubSub::Cluster(Box::new(pubsub)),
                )
            }
        };
        let health_pubsub = match &pubsub {
            PubSub::Single(conn) => Some(conn.clone()),
            PubSub::Cluster(_) => None,
        };

        let (tx, rx) = mpsc::channel(SUBSCRIPTION_QUEUE);
        let bus = Self {
            inner: Arc::new(Inner {
                history,
                commands,
                subscriptions: tx,
                up: AtomicBool::new(true),
                cursors,
                publish: Script::new(include_str!("publish.lua")),
                recover: Script::new(include_str!("recover.lua")),
                reset: Script::new(include_str!("reset.lua")),
                fence: Script::new(include_str!("fence.lua")),
                record: Script::new(cluster::WRITE_RECORD),
            }),
        };
        tracker.spawn(run_subscriber(
            pubsub,
            bus.inner.commands.clone(),
            hub,
            bus.inner.cursors.clone(),
            rx,
            cancel.clone(),
        ));
        tracker.spawn(run_repairs(bus.clone(), repairs, cancel.clone()));
        tracker.spawn(bus.clone().check_health(health_pubsub, cancel));
        Ok(bus)
    }
}

/// The command and subscriber connections to one Redis; pushes of the subscriber go to `push`.
async fn connect_single(
    url: &str,
    push: impl redis::aio::AsyncPushSender,
) -> Result<(ConnectionManager, ConnectionManager), BusError> {
    {
        let client = redis::Client::open(url)?;
        let manager_config = || {
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(COMMAND_TIMEOUT))
                .set_response_timeout(Some(COMMAND_TIMEOUT))
                .set_max_delay(Duration::from_secs(2))
        };
        let commands = client
            .get_connection_manager_with_config(manager_config())
            .await?;

        let info = client.get_connection_info().clone();
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let resp3 = redis::Client::open(info.set_redis_settings(settings))?;
        let pubsub_config = manager_config()
            .set_automatic_resubscription()
            .set_push_sender(push);
        let pubsub = resp3
            .get_connection_manager_with_config(pubsub_config)
            .await?;
        Ok((commands, pubsub))
    }
}

impl RedisBus {
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Relaxed)
    }

    /// A clone of the command connection, for other users of Redis on this node (leases,
    /// limits): on a Cluster, their scripts and pipelines must keep to one slot each.
    pub fn connection(&self) -> RedisConnection {
        self.inner.commands.clone()
    }

    pub fn history(&self) -> &HistoryPolicy {
        &self.inner.history
    }

    pub async fn recover(
        &self,
        channel: &str,
        since: Option<&Position>,
    ) -> Result<Recovery, BusError> {
        let policy = &self.inner.history;
        let history = policy.for_channel(channel);
        let cap = policy.recovery_max;
        let read = self.read_history(channel, since, cap, cap).await?;
        // Read after the caller watched the channel: from here on, what the node misses of
        // it is a hole its cursor notices.
        self.inner.cursors.observe(channel, &read.position);
        Ok(assemble_recovery(read, since, cap, history.enabled()))
    }

    /// Reads the channel's position and, with `since` in the current epoch, up to `count`
    /// history entries after it; none when the reader missed more than `limit` (0 = no
    /// limit).
    ///
    /// # Errors
    /// Redis unreachable or a script failure.
    pub async fn read_history(
        &self,
        channel: &str,
        since: Option<&Position>,
        count: u32,
        limit: u32,
    ) -> Result<HistoryRead, BusError> {
        let mut invocation = self.inner.recover.prepare_invoke();
        invocation
            .key(keys::meta(channel))
            .key(keys::history(channel))
            .arg(new_epoch())
            .arg(ttl_secs(self.inner.history.meta_ttl))
            .arg(since.map_or(String::new(), |p| p.offset.to_string()))
            .arg(since.map_or("", |p| p.epoch.as_str()))
            .arg(count.max(1))
            .arg(limit);
        let mut conn = self.inner.commands.clone();
        let reply: Value = invocation.invoke_async(&mut conn).await?;
        parse_recover_reply(reply)
    }

    pub async fn watch(&self, channel: &str) -> Result<(), BusError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .subscriptions
            .send(SubscriptionChange::Watch(Arc::from(channel), tx))
            .await
            .map_err(|_| BusError::Closed)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BusError::Protocol(format!("subscribe failed: {e}"))),
            Err(_) => Err(BusError::Closed),
        }
    }

    pub fn unwatch(&self, channel: &str) {
        // A full queue only delays dropping an unused subscription until the next change.
        let _ = self
            .inner
            .subscriptions
            .try_send(SubscriptionChange::Unwatch(Arc::from(channel)));
    }

    /// Pings both connections every second; `up` is true while both answer.
    /// (On a Cluster, the command connection only: a PING goes to a random node, and the
    /// subscriber connection keeps its own per-shard connections up.)
    async fn check_health(self, pubsub: Option<ConnectionManager>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(HEALTH_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let commands = self.inner.commands.clone();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let ping = |conn: &RedisConnection| {
                let mut conn = conn.clone();
                async move {
                    tokio::time::timeout(
                        COMMAND_TIMEOUT,
                        redis::cmd("PING").query_async::<()>(&mut conn),
                    )
                    .await
                    .is_ok_and(|r| r.is_ok())
                }
            };
            let mut up = ping(&commands).await;
            if !up && commands.is_cluster() {
                // A PING goes to a random node: one dead master (until its replica takes
                // over) must not make the whole bus look down every other second.
                for _ in 0..CLUSTER_PING_ATTEMPTS {
                    if ping(&commands).await {
                        up = true;
                        break;
                    }
                }
            }
            if let Some(pubsub) = &pubsub {
                up = up && ping(&RedisConnection::Single(pubsub.clone())).await;
            }
            let was_up = self.inner.up.swap(up, Ordering::Relaxed);
            match (was_up, up) {
                (true, false) => tracing::warn!("redis unreachable"),
                (false, true) => {
                    tracing::info!("redis reachable again");
                    metrics::counter!(m::REDIS_RECONNECTS).increment(1);
                }
                _ => {}
            }
        }
    }
}

fn ttl_secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}

/// Called by the Redis connection for every push, in order: publications go through the
/// channel's cursor straight to the hub (non-blocking), so no queue sits between Redis and
/// the sessions; subscription confirmations after a reconnect start the catch-up.
fn on_push(cursors: &Cursors, push: PushInfo) {
    match push.kind {
        PushKind::Message | PushKind::SMessage => {
            if let Some(publication) = parse_message(push.data) {
                cursors.publication(publication);
            } else {
                metrics::counter!(m::MESSAGES_DROPPED, "reason" => "malformed_bus_message")
                    .increment(1);
            }
        }
        PushKind::Subscribe | PushKind::SSubscribe => {
            if let Some(Value::BulkString(name)) = push.data.first() {
                if let Some(channel) = keys::channel_of_pubsub(name) {
                    cursors.subscribed(channel);
                }
            }
        }
        PushKind::Disconnection => {
            tracing::warn!("redis subscriber connection lost; it reconnects and resubscribes");
            cursors.disconnected();
        }
        _ => {}
    }
}

/// Reads history for the channels whose cursors ask for it (a hole, a reconnect), several
/// at a time, each until it succeeds (with backoff while Redis does not answer) or its
/// channel is no longer live here.
async fn run_repairs(bus: RedisBus, requests: mpsc::Receiver<Arc<str>>, cancel: CancellationToken) {
    use futures_util::StreamExt as _;
    let requests = futures_util::stream::unfold(requests, |mut requests| async move {
        requests.recv().await.map(|channel| (channel, requests))
    });
    let bus = &bus;
    let work = requests.for_each_concurrent(REPAIR_CONCURRENCY, |channel| bus.repair(channel));
    tokio::select! {
        () = cancel.cancelled() => {}
        () = work => {}
    }
}

impl RedisBus {
    /// Reads the channel's history from its cursor and hands it back to the cursor; when
    /// the cursor finds that the stream lost what this node delivered, gives the channel a
    /// new epoch and reads again.
    async fn repair(&self, channel: Arc<str>) {
        let policy = &self.inner.history;
        let cap = policy.recovery_max;
        let history = policy.for_channel(&channel).enabled();
        let mut backoff = Duration::from_millis(50);
        loop {
            let Some(cursor) = self.inner.cursors.since(&channel) else {
                return;
            };
            // From the cursor's own entry (one more than the hole), so the cursor can check
            // that the stream still holds what it delivered there.
            let (since, extra) = match cursor.offset.checked_sub(1) {
                Some(offset) => (
                    Position {
                        offset,
                        epoch: cursor.epoch,
                    },
                    1,
                ),
                None => (cursor, 0),
            };
            let limit = if cap == 0 {
                0
            } else {
                cap.saturating_add(extra)
            };
            let step = match self
                .read_history(&channel, Some(&since), cap.saturating_add(extra), limit)
                .await
            {
                Ok(read) => match self.inner.cursors.repaired(&channel, read, history) {
                    Repaired::Done => return,
                    Repaired::Lost { epoch } => self.reset_epoch(&channel, &epoch).await,
                },
                Err(e) => Err(e),
            };
            if let Err(e) = step {
                tracing::warn!(error = %e, %channel, "reading history (or resetting a stream that lost writes) failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(REPAIR_MAX_BACKOFF);
            }
        }
    }

    /// Gives `channel` a new epoch if it is still `lost` (see `reset.lua`), so that every
    /// node and every client recovering from `lost` is told the stream restarted.
    ///
    /// # Errors
    /// Redis unreachable or a script failure.
    async fn reset_epoch(&self, channel: &str, lost: &str) -> Result<(), BusError> {
        let mut invocation = self.inner.reset.prepare_invoke();
        invocation
            .key(keys::meta(channel))
            .key(keys::history(channel))
            .arg(lost)
            .arg(new_epoch())
            .arg(ttl_secs(self.inner.history.meta_ttl));
        let mut conn = self.inner.commands.clone();
        let (reset, epoch): (i64, String) = invocation.invoke_async(&mut conn).await?;
        if reset == 1 {
            tracing::warn!(%channel, lost, %epoch, "channel reset to a new epoch after lost writes");
        }
        Ok(())
    }
}

fn parse_message(mut data: Vec<Value>) -> Option<Publication> {
    let payload = match data.pop()? {
        Value::BulkString(b) => Bytes::from(b),
        _ => return None,
    };
    let channel = match data.pop()? {
        Value::BulkString(name) => Arc::<str>::from(keys::channel_of_pubsub(&name)?),
        _ => return None,
    };
    let space = payload.iter().position(|b| *b == b' ')?;
    let offset = std::str::from_utf8(&payload[..space]).ok()?.parse().ok()?;
    let rest = payload.slice(space + 1..);
    let space = rest.iter().position(|b| *b == b' ')?;
    let epoch = Arc::<str>::from(std::str::from_utf8(&rest[..space]).ok()?);
    let (ts, data) = super::split_timestamp(rest.slice(space + 1..));
    Some(Publication {
        channel,
        offset,
        epoch,
        data,
        ts,
    })
}

fn parse_recover_reply(reply: Value) -> Result<HistoryRead, BusError> {
    let bad = |what: &str| BusError::Protocol(format!("recover reply: {what}"));
    let Value::Array(mut parts) = reply else {
        return Err(bad("not an array"));
    };
    let entries = if parts.len() == 3 { parts.pop() } else { None };
    let offset = match parts.pop() {
        Some(Value::Int(n)) => u64::try_from(n).map_err(|_| bad("negative offset"))?,
        _ => return Err(bad("offset")),
    };
    let epoch = match parts.pop() {
        Some(Value::BulkString(b)) => String::from_utf8(b).map_err(|_| bad("epoch"))?,
        _ => return Err(bad("epoch")),
    };
    let entries = match entries {
        None => None,
        Some(Value::Array(items)) => Some(
            items
                .into_iter()
                .map(|item| parse_stream_entry(item).ok_or_else(|| bad("stream entry")))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(_) => return Err(bad("entries")),
    };
    Ok(HistoryRead {
        position: Position { offset, epoch },
        entries,
    })
}

/// `[id, [field, value]]` with id `"<offset>-1"` and field `d`.
fn parse_stream_entry(item: Value) -> Option<(u64, Bytes)> {
    let Value::Array(mut pair) = item else {
        return None;
    };
    let fields = pair.pop()?;
    let id = match pair.pop()? {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        _ => return None,
    };
    let id = std::str::from_utf8(&id).ok()?;
    let offset = id.split_once('-')?.0.parse().ok()?;
    let Value::Array(mut fv) = fields else {
        return None;
    };
    match fv.pop()? {
        Value::BulkString(b) => Some((offset, Bytes::from(b))),
        _ => None,
    }
}

/// Owns the subscriber connection's subscription set: one SUBSCRIBE (SSUBSCRIBE on a
/// Cluster) per channel with local interest, changes applied in order and in batches. On a
/// Cluster it also watches the slot map and moves every subscription when it changes.
async fn run_subscriber(
    mut pubsub: PubSub,
    mut commands: RedisConnection,
    hub: Arc<Hub>,
    cursors: Arc<Cursors>,
    mut changes: mpsc::Receiver<SubscriptionChange>,
    cancel: CancellationToken,
) {
    let mut subscribed: HashSet<Arc<str>> = HashSet::new();
    let mut topology_tick = tokio::time::interval(cluster::TOPOLOGY_PERIOD);
    topology_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut topology = None;
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => return,
            change = changes.recv() => match change {
                Some(c) => c,
                None => return,
            },
            _ = topology_tick.tick(), if commands.is_cluster() => {
                follow_topology(&mut pubsub, &mut commands, &mut topology, &subscribed).await;
                continue;
            }
        };
        let mut batch = vec![first];
        while batch.len() < SUBSCRIPTION_BATCH {
            match changes.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let mut to_subscribe: HashSet<Arc<str>> = HashSet::new();
        let mut watchers = Vec::new();
        let mut unwatched = Vec::new();
        for change in batch {
            match change {
                SubscriptionChange::Watch(channel, reply) => {
                    if !subscribed.contains(&channel) {
                        to_subscribe.insert(channel);
                    }
                    watchers.push(reply);
                }
                SubscriptionChange::Unwatch(channel) => unwatched.push(channel),
            }
        }
        let result = if to_subscribe.is_empty() {
            Ok(())
        } else {
            let names: Vec<String> = to_subscribe.iter().map(|c| keys::pubsub(c)).collect();
            pubsub.subscribe(names).await.map_err(|e| e.to_string())
        };
        if result.is_ok() {
            subscribed.extend(to_subscribe);
        }
        for watcher in watchers {
            let _ = watcher.send(result.clone());
        }
        // Decided against the hub's current state, after the subscribes: a session that
        // joined meanwhile keeps its channel.
        let to_unsubscribe: HashSet<Arc<str>> = unwatched
            .into_iter()
            .filter(|c| subscribed.contains(c) && !hub.has_subscribers(c))
            .collect();
        if !to_unsubscribe.is_empty() {
            let names: Vec<String> = to_unsubscribe.iter().map(|c| keys::pubsub(c)).collect();
            match pubsub.unsubscribe(names).await {
                Ok(()) => {
                    subscribed.retain(|c| !to_unsubscribe.contains(c));
                    for channel in &to_unsubscribe {
                        cursors.forget(channel);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "unsubscribe failed; kept for the next change")
                }
            }
        }
    }
}

/// One round of the Cluster topology watch: when the slot map differs from the last one seen
/// (resharding, failover), both connections are replaced and every channel is subscribed
/// again on its slot's current master; each confirmation makes the channel's cursor read
/// what it missed from history.
async fn follow_topology(
    pubsub: &mut PubSub,
    commands: &mut RedisConnection,
    last: &mut Option<Vec<(i64, i64, String)>>,
    subscribed: &HashSet<Arc<str>>,
) {
    let now = match cluster::topology(commands).await {
        Ok(now) => now,
        Err(e) => {
            tracing::debug!(error = %e, "reading the cluster slot map failed");
            return;
        }
    };
    if last.as_ref().is_none_or(|last| *last == now) {
        *last = Some(now);
        return;
    }
    tracing::info!(masters = ?now, "redis cluster topology changed; moving subscriptions");
    metrics::counter!(m::REDIS_TOPOLOGY_CHANGES).increment(1);
    if let RedisConnection::Cluster(cluster) = commands {
        if let Err(e) = cluster.replace().await {
            tracing::warn!(error = %e, "replacing the cluster command connection failed");
        }
    }
    let PubSub::Cluster(cluster) = pubsub else {
        return;
    };
    if let Err(e) = cluster.replace().await {
        // Kept as `last` unchanged: the next round tries again.
        tracing::warn!(error = %e, "replacing the cluster subscriber connection failed");
        return;
    }
    let names: Vec<String> = subscribed.iter().map(|c| keys::pubsub(c)).collect();
    if !names.is_empty() {
        if let Err(e) = pubsub.subscribe(names).await {
            tracing::warn!(error = %e, "resubscribing after a topology change failed; retrying");
            return;
        }
    }
    *last = Some(now);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_messages_parse_into_publications() {
        let data = vec![
            Value::BulkString(keys::pubsub("orders").into_bytes()),
            Value::BulkString(b"12 abcd {\"id\":1}".to_vec()),
        ];
        let p = parse_message(data).unwrap();
        assert_eq!(&*p.channel, "orders");
        assert_eq!(p.offset, 12);
        assert_eq!(&*p.epoch, "abcd");
        assert_eq!(&p.data[..], b"{\"id\":1}");
        assert_eq!(p.ts, 0, "no timestamp");

        let p = parse_message(vec![
            Value::BulkString(keys::pubsub("orders").into_bytes()),
            Value::BulkString(b"13 abcd t1700000000000000 true".to_vec()),
        ])
        .unwrap();
        assert_eq!(
            (p.offset, p.ts, &p.data[..]),
            (13, 1_700_000_000_000_000, &b"true"[..])
        );
    }

    #[test]
    fn malformed_bus_messages_are_rejected() {
        let bad = |payload: &[u8]| {
            parse_message(vec![
                Value::BulkString(keys::pubsub("c").into_bytes()),
                Value::BulkString(payload.to_vec()),
            ])
        };
        assert!(bad(b"x e {}").is_none());
        assert!(bad(b"12").is_none());
        assert!(bad(b"12 e").is_none());
        assert!(parse_message(vec![
            Value::BulkString(b"other".to_vec()),
            Value::BulkString(b"1 e 1".to_vec())
        ])
        .is_none());
    }

    #[test]
    fn channel_keys_share_a_hash_tag() {
        assert_eq!(keys::meta("a"), "pgfanout:{a}:meta");
        assert_eq!(
            keys::channel_of_pubsub(keys::pubsub("a:b").as_bytes()),
            Some("a:b")
        );
    }
}
