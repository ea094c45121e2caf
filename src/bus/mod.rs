//! The bus every node shares: it gives each publication its per-channel offset, keeps the
//! channel's history and epoch, and delivers publications to the local hub in bus order.
//!
//! Two implementations with the same semantics: Redis (one script call per batch of
//! publications, each publication atomic and in order; one pub/sub subscription per locally
//! live channel; one Redis or a Redis Cluster with sharded pub/sub, see `cluster`) and
//! in-memory (a single node).

pub mod cluster;
pub mod connection;
pub mod cursor;
pub mod history;
pub mod memory;
pub mod redis;
pub mod slot;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A publication as it travels from the bus to the hub.
#[derive(Debug, Clone)]
pub struct Publication {
    pub channel: Arc<str>,
    /// Per-channel, from 1, contiguous within an epoch.
    pub offset: u64,
    /// Identifies the channel's stream; a new epoch means history was lost.
    pub epoch: Arc<str>,
    /// Valid JSON.
    pub data: Bytes,
    /// When it reached pgfanout (a notification: its receipt from Postgres; otherwise its
    /// entry into the bus): microseconds since the Unix epoch on the publishing node's clock
    /// (for the delivery latency metric); 0 when unknown (e.g. read from history).
    pub ts: u64,
}

/// Now, in microseconds since the Unix epoch (a publication's `ts`).
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Splits the optional timestamp off a bus message's tail: `"t<micros> <json>"` gives
/// `(micros, json)`, anything else `(0, tail)`. JSON cannot start with `t` and a digit
/// (only `true` starts with `t`), so the two never mix up, and a message without a
/// timestamp (another writer, an older node) still parses.
pub fn split_timestamp(tail: Bytes) -> (u64, Bytes) {
    if tail.first() == Some(&b't') && tail.get(1).is_some_and(u8::is_ascii_digit) {
        if let Some(space) = tail.iter().position(|b| *b == b' ') {
            let ts = std::str::from_utf8(&tail[1..space])
                .ok()
                .and_then(|s| s.parse().ok());
            if let Some(ts) = ts {
                return (ts, tail.slice(space + 1..));
            }
        }
    }
    (0, tail)
}

/// Where a publication comes from (a metric label).
#[derive(Debug, Clone, Copy)]
pub enum Source {
    Notify,
    Client,
    /// `POST /api/publish`.
    Api,
    /// The `pgfanout.outbox` table.
    Outbox,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Self::Notify => "notify",
            Self::Client => "client",
            Self::Api => "api",
            Self::Outbox => "outbox",
        }
    }
}

/// A lease that must still be held for a publication to be accepted (fencing).
#[derive(Debug, Clone)]
pub struct Fence {
    pub key: String,
    pub token: String,
    /// Written with the publication, atomically, when it is accepted.
    pub record: Option<FenceRecord>,
}

/// A value a fenced publication records (ingest: the shard's stream position, so a node
/// that takes the shard over knows what is on the bus already). A publication whose value
/// is already recorded is a [`PublishOutcome::Duplicate`]: a retry after an unknown
/// outcome publishes once. The in-memory bus (a single node) ignores it.
#[derive(Debug, Clone)]
pub struct FenceRecord {
    pub key: String,
    pub value: String,
}

#[derive(Debug, Clone)]
pub struct PublishRequest<'a> {
    pub channel: &'a str,
    /// Valid JSON.
    pub data: Bytes,
    /// A publication with a key seen before (within the dedupe TTL) is not published again.
    pub idempotency_key: Option<&'a str>,
    pub fence: Option<&'a Fence>,
    pub source: Source,
    /// When the message reached pgfanout (µs since the Unix epoch), for the delivery
    /// latency metric: a notification's receipt from Postgres, so a bridge's backlog counts.
    /// `None`: now.
    pub received_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishOutcome {
    Published {
        offset: u64,
        epoch: String,
    },
    /// The idempotency key was seen: the publication already has this offset.
    Duplicate {
        offset: u64,
    },
    /// The fence's lease is no longer held by the caller: nothing was published.
    Fenced,
}

/// A channel's current place: the offset of its last publication and its epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub offset: u64,
    pub epoch: String,
}

/// The answer to a subscribe: where the stream is and, when asked, what came after the
/// client's position.
#[derive(Debug, Clone)]
pub struct Recovery {
    pub position: Position,
    /// Publications after the client's offset, in order (only when `recovered`).
    pub publications: Vec<(u64, Bytes)>,
    /// True when `publications` is exactly what the client missed.
    pub recovered: bool,
    /// Why not, when a position was given and `recovered` is false.
    pub failure: Option<RecoveryFailure>,
}

/// Why a client's position could not be recovered; it then reloads its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryFailure {
    /// The stream has another epoch (history was lost, or the client's epoch is unknown).
    Epoch,
    /// The client's offset is ahead of the stream.
    Ahead,
    /// The client missed more than one recovery may return.
    OverCap,
    /// The channel keeps no history.
    NoHistory,
    /// Part of what the client missed has left history (trimmed by size or TTL).
    OutOfHistory,
}

impl RecoveryFailure {
    /// A metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Epoch => "epoch",
            Self::Ahead => "ahead",
            Self::OverCap => "over_cap",
            Self::NoHistory => "no_history",
            Self::OutOfHistory => "out_of_history",
        }
    }
}

/// A raw read of a channel's stream: its position and, when asked and possible, the
/// history entries after the reader's offset (oldest first).
#[derive(Debug, Clone)]
pub struct HistoryRead {
    pub position: Position,
    /// None: not read (no position given, another epoch, or further behind than the
    /// read's limit allows).
    pub entries: Option<Vec<(u64, Bytes)>>,
}

pub use history::{ChannelHistory, HistoryPolicy};

/// How long an idempotency key is remembered.
pub const DEDUPE_TTL: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// A script call for several publications failed: the outcome of each is unknown.
    #[error("redis: {0}")]
    Batch(Arc<::redis::RedisError>),
    #[error("unexpected reply from the bus script: {0}")]
    Protocol(String),
    /// Not sent: an earlier publication of the batch (on its channel) was not applied.
    #[error("not attempted: an earlier publication of the batch was not applied")]
    NotAttempted,
    #[error("the bus is shutting down")]
    Closed,
}

/// The node's bus.
#[derive(Clone)]
pub enum Bus {
    Memory(memory::MemoryBus),
    Redis(redis::RedisBus),
}

impl Bus {
    /// Publishes into the channel's stream; every node's subscribers receive it.
    ///
    /// # Errors
    /// Redis unreachable or a script failure; the publication may or may not have
    /// happened (retry with the same idempotency key to be sure).
    pub async fn publish(&self, req: PublishRequest<'_>) -> Result<PublishOutcome, BusError> {
        self.publish_batch(std::slice::from_ref(&req))
            .await
            .pop()
            .unwrap_or(Err(BusError::NotAttempted))
    }

    /// Publishes `reqs` in order with as few bus round trips as possible (Redis: one script
    /// call per up to 256 publications, or per slot on a Cluster), each publication with the
    /// guarantees of [`Bus::publish`]. One answer per request, in order. A request is never
    /// applied after an earlier request of its channel that was not (fenced, failed, or
    /// [`BusError::NotAttempted`]); a failed call answers an error for each of its requests
    /// (their outcome is unknown: retry them, in order, with the same idempotency keys or
    /// fence records).
    pub async fn publish_batch(
        &self,
        reqs: &[PublishRequest<'_>],
    ) -> Vec<Result<PublishOutcome, BusError>> {
        if reqs.is_empty() {
            return Vec::new();
        }
        let started = std::time::Instant::now();
        let outcomes = match self {
            Self::Memory(b) => reqs.iter().map(|r| Ok(b.publish(r.clone()))).collect(),
            Self::Redis(b) => b.publish_batch(reqs).await,
        };
        metrics::histogram!(crate::metrics::BUS_PUBLISH_SECONDS)
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!(crate::metrics::BUS_PUBLISH_BATCH).record(reqs.len() as f64);
        for (req, outcome) in reqs.iter().zip(&outcomes) {
            if let Ok(PublishOutcome::Published { .. }) = outcome {
                metrics::counter!(crate::metrics::BUS_PUBLISHED, "source" => req.source.label())
                    .increment(1);
            }
        }
        outcomes
    }

    /// Makes sure publications of `channel` reach this node's hub; call after adding a
    /// session to the hub and before reading history, so nothing falls in between.
    ///
    /// # Errors
    /// The subscription could not be made (Redis unreachable).
    pub async fn watch(&self, channel: &str) -> Result<(), BusError> {
        match self {
            Self::Memory(_) => Ok(()),
            Self::Redis(b) => b.watch(channel).await,
        }
    }

    /// Tells the bus a channel may have lost its last local subscriber.
    pub fn unwatch(&self, channel: &str) {
        if let Self::Redis(b) = self {
            b.unwatch(channel);
        }
    }

    /// The channel's position and, with `since`, the publications after it: all of them
    /// (at most the recovery cap) or none.
    ///
    /// # Errors
    /// Redis unreachable or a script failure.
    pub async fn recover(
        &self,
        channel: &str,
        since: Option<&Position>,
    ) -> Result<Recovery, BusError> {
        match self {
            Self::Memory(b) => Ok(b.recover(channel, since)),
            Self::Redis(b) => b.recover(channel, since).await,
        }
    }

    /// The history settings of the node.
    pub fn history(&self) -> &HistoryPolicy {
        match self {
            Self::Memory(b) => b.history(),
            Self::Redis(b) => b.history(),
        }
    }

    /// None for the in-memory bus, else whether Redis answers.
    pub fn redis_up(&self) -> Option<bool> {
        match self {
            Self::Memory(_) => None,
            Self::Redis(b) => Some(b.is_up()),
        }
    }

    /// The in-memory bus, with its expiry task owned by `tracker`.
    pub fn memory(
        hub: Arc<crate::hub::Hub>,
        history: Arc<HistoryPolicy>,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let bus = memory::MemoryBus::new(hub, history);
        tracker.spawn(bus.clone().maintain(cancel));
        Self::Memory(bus)
    }

    /// The Redis bus on one Redis or a Redis Cluster, with its tasks owned by `tracker`.
    ///
    /// # Errors
    /// Redis unreachable or a URL invalid.
    pub async fn redis_at(
        target: redis::Target<'_>,
        hub: Arc<crate::hub::Hub>,
        history: Arc<HistoryPolicy>,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<Self, BusError> {
        Ok(Self::Redis(
            redis::RedisBus::connect_to(target, hub, history, tracker, cancel).await?,
        ))
    }
}

/// A fresh random epoch.
pub fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Decides what a subscriber at `since` gets, given a read of the stream after `since`
/// (limited to `cap` publications) and whether the channel keeps history. Shared by both
/// buses so they agree exactly: all that was missed, or nothing and the reason.
pub fn assemble_recovery(
    read: HistoryRead,
    since: Option<&Position>,
    cap: u32,
    history: bool,
) -> Recovery {
    let position = read.position;
    let failure = since.and_then(|since| {
        let missed = position.offset.saturating_sub(since.offset);
        let entries = read.entries.as_deref().unwrap_or_default();
        let complete = entries.len() as u64 == missed
            && entries
                .iter()
                .enumerate()
                .all(|(i, (offset, _))| *offset == since.offset + 1 + i as u64);
        if since.epoch != position.epoch {
            Some(RecoveryFailure::Epoch)
        } else if since.offset > position.offset {
            Some(RecoveryFailure::Ahead)
        } else if missed == 0 {
            None
        } else if !history {
            Some(RecoveryFailure::NoHistory)
        } else if missed > u64::from(cap) {
            Some(RecoveryFailure::OverCap)
        } else if !complete {
            Some(RecoveryFailure::OutOfHistory)
        } else {
            None
        }
    });
    let recovered = since.is_some() && failure.is_none();
    Recovery {
        position,
        publications: if recovered {
            read.entries.unwrap_or_default()
        } else {
            Vec::new()
        },
        recovered,
        failure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(offset: u64, epoch: &str) -> Position {
        Position {
            offset,
            epoch: epoch.into(),
        }
    }

    fn entries(range: std::ops::RangeInclusive<u64>) -> Vec<(u64, Bytes)> {
        range.map(|o| (o, Bytes::from(o.to_string()))).collect()
    }

    fn read(top: u64, epoch: &str, entries: Option<Vec<(u64, Bytes)>>) -> HistoryRead {
        HistoryRead {
            position: pos(top, epoch),
            entries,
        }
    }

    #[test]
    fn recovery_succeeds_only_with_same_epoch_and_a_gapless_tail() {
        let ok = |r: &Recovery| r.recovered && r.failure.is_none();
        let r = assemble_recovery(
            read(5, "e", Some(entries(3..=5))),
            Some(&pos(2, "e")),
            10,
            true,
        );
        assert!(ok(&r));
        assert_eq!(r.publications.len(), 3);

        let r = assemble_recovery(read(5, "e", Some(vec![])), Some(&pos(5, "e")), 10, true);
        assert!(ok(&r) && r.publications.is_empty());

        let r = assemble_recovery(read(5, "f", None), Some(&pos(2, "e")), 10, true);
        assert_eq!(r.failure, Some(RecoveryFailure::Epoch));
        assert!(!r.recovered && r.publications.is_empty());

        let r = assemble_recovery(
            read(5, "e", Some(entries(3..=5))),
            Some(&pos(1, "e")),
            10,
            true,
        );
        assert_eq!(
            r.failure,
            Some(RecoveryFailure::OutOfHistory),
            "offset 2 left history"
        );
        assert!(r.publications.is_empty());

        let r = assemble_recovery(read(5, "e", Some(vec![])), Some(&pos(7, "e")), 10, true);
        assert_eq!(r.failure, Some(RecoveryFailure::Ahead));

        let r = assemble_recovery(read(5, "e", None), None, 10, true);
        assert!(!r.recovered && r.failure.is_none(), "not recovering");
    }

    #[test]
    fn recovery_past_the_cap_or_without_history_fails_whole() {
        let r = assemble_recovery(read(500, "e", None), Some(&pos(0, "e")), 100, true);
        assert_eq!(r.failure, Some(RecoveryFailure::OverCap));
        let r = assemble_recovery(
            read(100, "e", Some(entries(1..=100))),
            Some(&pos(0, "e")),
            100,
            true,
        );
        assert!(r.recovered, "exactly the cap is fine");
        let r = assemble_recovery(read(3, "e", Some(vec![])), Some(&pos(1, "e")), 100, false);
        assert_eq!(r.failure, Some(RecoveryFailure::NoHistory));
        let r = assemble_recovery(read(3, "e", Some(vec![])), Some(&pos(3, "e")), 100, false);
        assert!(r.recovered, "nothing missed: nothing to recover");
    }

    #[test]
    fn a_bus_message_tail_may_carry_a_timestamp() {
        let split = |s: &'static str| split_timestamp(Bytes::from_static(s.as_bytes()));
        assert_eq!(
            split("t123 {\"a\":1}"),
            (123, Bytes::from_static(b"{\"a\":1}"))
        );
        assert_eq!(split("true"), (0, Bytes::from_static(b"true")));
        assert_eq!(split("{\"a\":1}"), (0, Bytes::from_static(b"{\"a\":1}")));
        assert_eq!(split("t12x {}"), (0, Bytes::from_static(b"t12x {}")));
        assert_eq!(split("t1"), (0, Bytes::from_static(b"t1")));
        assert!(now_micros() > 1_600_000_000_000_000);
    }
}
