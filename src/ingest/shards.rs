//! Who bridges which channel shard: leases in Redis, spread over the live nodes, and the
//! takeover that reconciles a node's buffer with what the previous owner put on the bus.
//!
//! Every third of the lease TTL one script call heartbeats this node into the live set,
//! renews the leases it holds, and acquires free shards up to its share,
//! `ceil(shards / live nodes)`; a node holding more than its share (a node joined) releases
//! the surplus. A node whose LISTEN stream is not aligned (connecting, or lost) leaves the
//! live set and releases everything, so a standby takes over. A lease token is new at each
//! acquisition: it fences publications (see `bus/publish.lua`), which also record the
//! shard's stream position atomically.
//!
//! Takeover: after acquiring, the node sends a marker through Postgres and waits until its
//! own stream has passed it. The lease was ours before the marker was sent, so whatever the
//! previous owner published is now in our stream's past; the position it recorded says where
//! we continue ([`StreamState::take_over`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Script;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::stream::{Answer, Job, Position, StreamState};
use crate::bus::connection::RedisConnection;
use crate::bus::{Bus, BusError, Fence, FenceRecord, PublishOutcome, PublishRequest, Source};
use crate::metrics as m;

/// How long a takeover waits for its marker to come back through Postgres, at most (and
/// never past a third of the lease TTL: the other leases must be renewed meanwhile).
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Redis keys of the shard leases. They share the hash tag `{ingest}`: one slot on a Redis
/// Cluster, so the claim script (every lease and the live set at once) and the position
/// read (`MGET`) stay in one slot.
pub mod keys {
    /// Sorted set: node instance → heartbeat expiry (ms, Redis clock).
    pub const NODES: &str = "pgfanout:{ingest}:nodes";
    pub fn lease(shard: usize) -> String {
        format!("pgfanout:{{ingest}}:lease:{shard}")
    }
    /// The stream position of the last notification of the shard on the bus.
    pub fn position(shard: usize) -> String {
        format!("pgfanout:{{ingest}}:pos:{shard}")
    }
    /// Set (to its instance) by a node that left the shard to a longer-listening node: any
    /// other node may then take it beyond its fair share.
    pub fn deferred(shard: usize) -> String {
        format!("pgfanout:{{ingest}}:defer:{shard}")
    }
}

/// Heartbeat, renew, acquire up to the fair share (and deferred shards beyond it); returns
/// {live, share, deferred shards we hold, token per shard, deferred (1/0) per shard}.
const CLAIM: &str = include_str!("claim.lua");

/// Extends a lease we still hold (the drain, while the bridges publish the backlog).
const RENEW: &str = r#"
if redis.call("GET", KEYS[1]) == ARGV[1] then
  return redis.call("PEXPIRE", KEYS[1], ARGV[2])
end
return 0
"#;

const RELEASE: &str = r#"
if redis.call("GET", KEYS[1]) == ARGV[1] then
  return redis.call("DEL", KEYS[1])
end
return 0
"#;

/// The ingest state shared by the LISTEN loop, the lease keeper and the shard bridges.
pub struct Shared {
    pub state: Mutex<StreamState>,
    /// One per shard: a notification or an ownership arrived.
    pub work: Vec<Notify>,
    /// A bridge made progress (an owner's full buffer may take more).
    pub progress: Notify,
}

impl Shared {
    pub fn new(shards: usize, buffer_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(StreamState::new(shards, buffer_bytes)),
            work: (0..shards).map(|_| Notify::new()).collect(),
            progress: Notify::new(),
        })
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn report_owned(&self) {
        let owned = self.lock().owned();
        metrics::gauge!(m::INGEST_SHARDS_OWNED).set(owned as f64);
        metrics::gauge!(m::BRIDGE_OWNER).set(if owned > 0 { 1.0 } else { 0.0 });
        // A release lets a full buffer drop its oldest again.
        self.progress.notify_waiters();
    }
}

/// A request to the LISTEN loop: send a marker and answer once the stream passed it.
pub struct Barrier {
    pub done: oneshot::Sender<()>,
}

/// Keeps this node's share of shard leases and takes shards over.
pub struct Leases {
    pub conn: RedisConnection,
    /// Unique per process: a restarted node never mistakes its predecessor's leases.
    pub instance: String,
    pub ttl: Duration,
    pub shared: Arc<Shared>,
    pub barriers: mpsc::Sender<Barrier>,
    /// Stops the shard bridges: cancelled once every lease is handed off (or this task
    /// ends some other way), so a draining node publishes its backlog before it lets go.
    pub bridges: CancellationToken,
    /// Per shard: since when it came to us with a recorded position older than our stream
    /// (see [`Leases::take_over`]).
    pub unplaceable_since: Mutex<Vec<Option<tokio::time::Instant>>>,
    /// When the ingest stage must be done (set by the drain as it cancels the stage): the
    /// backlog is published until then, less [`HANDOFF_RESERVE`].
    pub stop_deadline: Arc<std::sync::OnceLock<tokio::time::Instant>>,
}

/// Kept from the stage deadline for releasing the leases after the backlog was published.
const HANDOFF_RESERVE: Duration = Duration::from_millis(500);

impl Leases {
    /// Heartbeats, claims and takes over until cancelled, then releases every lease.
    pub async fn run(self, cancel: CancellationToken) {
        let _stop_bridges = self.bridges.clone().drop_guard();
        let claim = Script::new(CLAIM);
        let shards = self.shared.lock().shard_count();
        let first = (fnv1a(self.instance.as_bytes()) % shards as u64).to_string();
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let mut nonce = 0u64;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            nonce += 1;
            let aligned = self.shared.lock().aligned();
            let mut invocation = claim.prepare_invoke();
            invocation.key(keys::NODES);
            for shard in 0..shards {
                invocation.key(keys::lease(shard));
            }
            for shard in 0..shards {
                invocation.key(keys::deferred(shard));
            }
            invocation
                .arg(&self.instance)
                .arg(ttl_ms)
                .arg(if aligned { "1" } else { "0" })
                .arg(format!("{nonce:x}"))
                .arg(&first);
            let mut conn = self.conn.clone();
            let reply = tokio::time::timeout(
                REDIS_TIMEOUT,
                invocation.invoke_async::<Vec<redis::Value>>(&mut conn),
            )
            .await;
            let claim = match reply {
                Ok(Ok(values)) => match parse_claim(values, shards) {
                    Some(parsed) => parsed,
                    None => {
                        tracing::warn!("unexpected reply from the shard claim script");
                        continue;
                    }
                },
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot renew shard leases");
                    continue;
                }
                Err(_) => {
                    tracing::warn!("renewing shard leases timed out");
                    continue;
                }
            };
            self.apply(claim, &cancel).await;
        }
        self.release_all().await;
    }

    /// Brings local ownership in line with what Redis says we hold.
    async fn apply(&self, claim: Claim, cancel: &CancellationToken) {
        let Claim {
            share,
            extra,
            tokens,
            deferred,
        } = claim;
        // Handovers and takeovers share one budget: the next renewal is due a third of the
        // TTL from now.
        let deadline = tokio::time::Instant::now() + self.ttl / 3;
        let mut acquired = Vec::new();
        let mut held = Vec::new();
        {
            let mut state = self.shared.lock();
            for (shard, remote) in tokens.into_iter().enumerate() {
                let local = state.token(shard);
                match (local, remote) {
                    (Some(l), Some(r)) if *l == *r => held.push(shard),
                    (Some(_), remote) => {
                        tracing::warn!(shard, "shard lease lost");
                        state.release(shard);
                        if let Some(r) = remote {
                            acquired.push((shard, r));
                        }
                    }
                    (None, Some(r)) => acquired.push((shard, r)),
                    (None, None) => {}
                }
            }
        }
        // Over our share (a node joined): hand the surplus over, shards not taken over yet
        // first. Deferred shards are beyond the share (counted in `extra`) and stay: others
        // left them because they cannot place their position.
        let mut surplus = (held.len() + acquired.len()).saturating_sub(share + extra);
        let (kept_acquired, mut acquired): (Vec<_>, Vec<_>) =
            acquired.into_iter().partition(|(s, _)| deferred[*s]);
        held.retain(|s| !deferred[*s]);
        while surplus > 0 {
            let (shard, token) = match acquired.pop() {
                Some(a) => a,
                None => match held.pop() {
                    Some(shard) => match self.shared.lock().token(shard) {
                        Some(t) => (shard, t.to_string()),
                        None => continue,
                    },
                    None => break,
                },
            };
            surplus -= 1;
            if !self.caught_up(shard, deadline, cancel).await {
                // Handing over a backlog would leave it to a node that may not have it
                // (one that just joined): keep the shard until the next round.
                continue;
            }
            self.shared.lock().release(shard);
            self.release(shard, &token).await;
            tracing::info!(shard, "shard handed over (over this node's share)");
        }
        acquired.extend(kept_acquired);
        if !acquired.is_empty() {
            let deadline = deadline.max(tokio::time::Instant::now() + Duration::from_millis(100));
            self.take_over(acquired, deadline, cancel).await;
        }
        self.shared.report_owned();
    }

    /// Waits (until `deadline`: the next renewal) until this node published everything it has
    /// received of `shard`; true at once for a shard it does not bridge yet.
    async fn caught_up(
        &self,
        shard: usize,
        deadline: tokio::time::Instant,
        cancel: &CancellationToken,
    ) -> bool {
        let (head, owned) = {
            let state = self.shared.lock();
            (state.head(shard), state.token(shard).is_some())
        };
        if !owned {
            return true;
        }
        loop {
            {
                let state = self.shared.lock();
                // Fenced meanwhile: nothing more to publish here; the next owner continues.
                if state.published_through(shard, head) || state.token(shard).is_none() {
                    return true;
                }
            }
            if tokio::time::Instant::now() >= deadline || cancel.is_cancelled() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until our stream passed a fresh marker, then continues each shard from the
    /// position the bus recorded for it.
    async fn take_over(
        &self,
        acquired: Vec<(usize, String)>,
        deadline: tokio::time::Instant,
        cancel: &CancellationToken,
    ) {
        let (done, passed) = oneshot::channel();
        let sent = self.barriers.try_send(Barrier { done }).is_ok();
        let passed = sent
            && tokio::select! {
                _ = cancel.cancelled() => false,
                r = tokio::time::timeout_at(
                    deadline.min(tokio::time::Instant::now() + BARRIER_TIMEOUT),
                    passed,
                ) => matches!(r, Ok(Ok(()))),
            };
        let positions = if passed {
            self.read_positions(&acquired).await
        } else {
            None
        };
        let Some(positions) = positions else {
            tracing::warn!("takeover not possible now (stream not caught up or Redis); releasing");
            for (shard, token) in &acquired {
                self.release(*shard, token).await;
            }
            return;
        };
        for ((shard, token), recorded) in acquired.into_iter().zip(positions) {
            if !self.may_take(shard, recorded.as_ref()) {
                self.defer(shard).await;
                self.release(shard, &token).await;
                continue;
            }
            let report = self
                .shared
                .lock()
                .take_over(shard, Arc::from(token), recorded.as_ref());
            tracing::info!(
                shard,
                recorded = ?recorded.as_ref().map(Position::encode),
                republish = report.republish,
                duplicates = report.duplicates,
                lost = report.lost,
                "took shard over"
            );
            metrics::counter!(m::INGEST_TAKEOVERS).increment(1);
            metrics::counter!(m::INGEST_REPUBLISHED).increment(report.republish);
            metrics::counter!(m::INGEST_DUPLICATES, "path" => "notify")
                .increment(report.duplicates);
            metrics::counter!(m::INGEST_LOST).increment(report.lost);
            self.shared.work[shard].notify_one();
        }
    }

    /// A node that cannot place the recorded position (it started listening after the
    /// previous owner's last publication) lacks whatever that owner left unpublished before
    /// our first marker; a longer-listening node has it. So leave the shard to the others
    /// for one TTL, and take it only if it is still ours to take after that (no live node
    /// could place it either), warning that notifications may be lost.
    fn may_take(&self, shard: usize, recorded: Option<&Position>) -> bool {
        let now = tokio::time::Instant::now();
        let mut since = self
            .unplaceable_since
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if since.len() <= shard {
            since.resize(shard + 1, None);
        }
        if self.shared.lock().can_place(recorded) {
            since[shard] = None;
            return true;
        }
        let first = *since[shard].get_or_insert(now);
        if now.duration_since(first) < self.ttl {
            tracing::info!(
                shard,
                "leaving the shard to a node that saw its recorded position"
            );
            return false;
        }
        since[shard] = None;
        tracing::warn!(
            shard,
            "taking the shard over without its recorded position (no live node had it): \
             notifications the previous owner left unpublished may be lost"
        );
        metrics::counter!(m::INGEST_BLIND_TAKEOVERS).increment(1);
        true
    }

    /// Lets the other nodes take `shard` beyond their share for two TTLs.
    async fn defer(&self, shard: usize) {
        let ttl_ms = u64::try_from(self.ttl.as_millis() * 2).unwrap_or(u64::MAX);
        let mut conn = self.conn.clone();
        let mut set = redis::cmd("SET");
        set.arg(keys::deferred(shard))
            .arg(&self.instance)
            .arg("PX")
            .arg(ttl_ms);
        let reply = tokio::time::timeout(REDIS_TIMEOUT, set.query_async::<()>(&mut conn)).await;
        if let Ok(Err(e)) = reply {
            tracing::warn!(error = %e, shard, "cannot flag the shard as deferred");
        }
    }

    async fn read_positions(&self, acquired: &[(usize, String)]) -> Option<Vec<Option<Position>>> {
        let mut cmd = redis::cmd("MGET");
        for (shard, _) in acquired {
            cmd.arg(keys::position(*shard));
        }
        let mut conn = self.conn.clone();
        let values: Vec<Option<String>> =
            match tokio::time::timeout(REDIS_TIMEOUT, cmd.query_async(&mut conn)).await {
                Ok(Ok(v)) => v,
                _ => return None,
            };
        Some(
            values
                .into_iter()
                .map(|v| v.as_deref().and_then(Position::decode))
                .collect(),
        )
    }

    /// Extends the leases this node still bridges (not the live-set heartbeat: a draining
    /// node takes nothing new).
    async fn renew_held(&self) {
        let held: Vec<(usize, Arc<str>)> = {
            let state = self.shared.lock();
            (0..state.shard_count())
                .filter_map(|s| Some((s, state.token(s)?)))
                .collect()
        };
        let script = Script::new(RENEW);
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        for (shard, token) in held {
            let mut invocation = script.prepare_invoke();
            invocation.key(keys::lease(shard)).arg(&*token).arg(ttl_ms);
            let mut conn = self.conn.clone();
            let renewed =
                tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async::<i64>(&mut conn))
                    .await;
            if !matches!(renewed, Ok(Ok(1))) {
                // Gone (expired under load, or Redis): the bridge is fenced from now on and
                // the next owner continues from the recorded position.
                tracing::warn!(shard, "shard lease lost while publishing the backlog");
            }
        }
    }

    async fn release(&self, shard: usize, token: &str) {
        let script = Script::new(RELEASE);
        let mut invocation = script.prepare_invoke();
        invocation.key(keys::lease(shard)).arg(token);
        let mut conn = self.conn.clone();
        let _ =
            tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async::<i64>(&mut conn)).await;
    }

    /// Hands every lease off: first waits until the bridges published what this node
    /// received (all shards at once, renewing the leases meanwhile), so the next owner does
    /// not depend on having seen that backlog itself: it may have joined a moment ago, and
    /// then it cannot place positions older than its stream. The wait lasts until the
    /// ingest stage's deadline (less a reserve for the releases), or a third of the TTL
    /// when this task stops for another reason.
    async fn release_all(&self) {
        let still_bridging = CancellationToken::new();
        let shards = self.shared.lock().shard_count();
        let now = tokio::time::Instant::now();
        let deadline = match self.stop_deadline.get() {
            Some(end) => end.checked_sub(HANDOFF_RESERVE).unwrap_or(now).max(now),
            None => now + self.ttl / 3,
        };
        let flush = futures_util::future::join_all(
            (0..shards).map(|shard| self.caught_up(shard, deadline, &still_bridging)),
        );
        tokio::pin!(flush);
        let mut renew = tokio::time::interval_at(now + self.ttl / 3, self.ttl / 3);
        let flushed = loop {
            tokio::select! {
                flushed = &mut flush => break flushed,
                _ = renew.tick() => self.renew_held().await,
            }
        };
        let behind = flushed.iter().filter(|done| !**done).count();
        if behind > 0 {
            tracing::warn!(
                shards = behind,
                "handing off shards with notifications not yet published"
            );
        }
        let held: Vec<(usize, Arc<str>)> = {
            let mut state = self.shared.lock();
            let held = (0..state.shard_count())
                .filter_map(|s| Some((s, state.token(s)?)))
                .collect();
            for shard in 0..state.shard_count() {
                state.release(shard);
            }
            held
        };
        let mut conn = self.conn.clone();
        let _ = tokio::time::timeout(
            REDIS_TIMEOUT,
            redis::cmd("ZREM")
                .arg(keys::NODES)
                .arg(&self.instance)
                .query_async::<i64>(&mut conn),
        )
        .await;
        for (shard, token) in &held {
            self.release(*shard, token).await;
        }
        if !held.is_empty() {
            tracing::info!(shards = held.len(), "shard leases released");
        }
        self.shared.report_owned();
    }
}

/// What the claim script says this node holds.
struct Claim {
    /// The fair share.
    share: usize,
    /// Deferred shards acquired beyond the share this time: not surplus to hand back yet.
    extra: usize,
    /// Per shard: our lease token, if we hold it.
    tokens: Vec<Option<String>>,
    /// Per shard: deferred by another node (held beyond the share).
    deferred: Vec<bool>,
}

fn parse_claim(values: Vec<redis::Value>, shards: usize) -> Option<Claim> {
    use redis::Value;
    if values.len() != 2 * shards + 3 {
        return None;
    }
    let count = |v: Value| match v {
        Value::Int(n) => usize::try_from(n).ok(),
        _ => None,
    };
    let mut it = values.into_iter();
    let _live = it.next()?;
    let share = count(it.next()?)?;
    let extra = count(it.next()?)?;
    let tokens = it
        .by_ref()
        .take(shards)
        .map(|v| match v {
            Value::BulkString(b) if !b.is_empty() => String::from_utf8(b).ok(),
            _ => None,
        })
        .collect();
    let deferred = it.map(|v| matches!(v, Value::Int(1))).collect();
    Some(Claim {
        share,
        extra,
        tokens,
        deferred,
    })
}

/// Notifications a bridge sends per bus publish at most (its backlog, in order; the bus
/// splits what goes beyond one script call). A bridge without a backlog sends what it has.
pub const BRIDGE_BATCH: usize = 256;

/// Publishes the notifications of one shard, in order, while this node bridges it: what has
/// arrived since the last publish (up to [`BRIDGE_BATCH`]) in one bus publish.
pub async fn bridge(shard: usize, shared: Arc<Shared>, bus: Bus, cancel: CancellationToken) {
    let mut delay = Duration::from_millis(50);
    loop {
        let job = shared.lock().next_job(shard, BRIDGE_BATCH);
        let Some(job) = job else {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = shared.work[shard].notified() => continue,
            }
        };
        let (answers, error) = publish_job(shard, &job, &bus).await;
        let settled = shared.lock().settle(shard, &job, &answers);
        if settled.duplicates > 0 {
            metrics::counter!(m::INGEST_DUPLICATES, "path" => "notify")
                .increment(settled.duplicates as u64);
        }
        if settled.fenced {
            metrics::counter!(m::MESSAGES_DROPPED, "reason" => "fenced").increment(1);
        }
        if settled.settled > 0 || settled.fenced {
            shared.progress.notify_waiters();
        }
        if !settled.failed {
            delay = Duration::from_millis(50);
            continue;
        }
        // The position records make the retry exact: what the failed publish did put on
        // the bus answers "duplicate" (see `bus/publish.lua`).
        let error = error.map_or_else(|| "no answer".to_owned(), |e| e.to_string());
        tracing::warn!(%error, shard, retry_in = ?delay, "bus publish failed");
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Publishes a job's notifications, each fenced by the shard's lease and recording its
/// position: the bus's answers, in order, and its first error.
async fn publish_job(shard: usize, job: &Job, bus: &Bus) -> (Vec<Answer>, Option<BusError>) {
    let fences: Vec<Option<Fence>> = job
        .entries
        .iter()
        .map(|entry| {
            job.token.as_ref().map(|token| Fence {
                key: keys::lease(shard),
                token: token.to_string(),
                record: entry.position.as_ref().map(|p| FenceRecord {
                    key: keys::position(shard),
                    value: p.encode(),
                }),
            })
        })
        .collect();
    let requests: Vec<PublishRequest<'_>> = job
        .entries
        .iter()
        .zip(&fences)
        .map(|(entry, fence)| PublishRequest {
            channel: &entry.channel,
            data: entry.data.clone(),
            idempotency_key: None,
            fence: fence.as_ref(),
            source: Source::Notify,
            received_at: Some(entry.received_at),
        })
        .collect();
    let mut error = None;
    let answers = bus
        .publish_batch(&requests)
        .await
        .into_iter()
        .map(|outcome| match outcome {
            Ok(PublishOutcome::Published { .. }) => Answer::Published,
            Ok(PublishOutcome::Duplicate { .. }) => Answer::Duplicate,
            Ok(PublishOutcome::Fenced) => Answer::Fenced,
            Err(e) => {
                error.get_or_insert(e);
                Answer::Failed
            }
        })
        .collect();
    (answers, error)
}

/// The shard of a channel: FNV-1a, stable across nodes, versions and restarts.
pub fn shard_of(channel: &str, shards: usize) -> usize {
    (fnv1a(channel.as_bytes()) % shards.max(1) as u64) as usize
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_stable_and_spread() {
        assert_eq!(shard_of("orders", 16), shard_of("orders", 16));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        let used: std::collections::HashSet<usize> =
            (0..64).map(|i| shard_of(&format!("ch{i}"), 16)).collect();
        assert!(used.len() > 10, "{used:?}");
    }
}
