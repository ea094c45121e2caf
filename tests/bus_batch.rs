//! Batched publishing on one Redis (`Bus::publish_batch`), against the real publish script:
//! order, a batch stopped by a fence, a script error midway and the exact retry, the
//! idempotency keys of the outbox, and the memory bus answering the same.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::ensure;
use bytes::Bytes;
use common::RedisServer;
use pgfanout::bus::redis::{RedisBus, Target};
use pgfanout::bus::{
    Bus, BusError, Fence, FenceRecord, HistoryPolicy, PublishOutcome, PublishRequest, Source,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const LEASE: &str = "pgfanout:{ingest}:lease:0";
const RECORD: &str = "pgfanout:{ingest}:pos:0";

struct Harness {
    _redis: RedisServer,
    bus: Bus,
    conn: redis::aio::MultiplexedConnection,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Harness {
    async fn start() -> anyhow::Result<Self> {
        let redis = RedisServer::start().await;
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let history = Arc::new(HistoryPolicy::uniform(
            100,
            Duration::from_secs(60),
            Duration::from_secs(600),
        ));
        let hub = Arc::new(pgfanout::hub::Hub::new());
        let url = redis.url();
        let bus =
            RedisBus::connect_to(Target::Single(&url), hub, history, &tracker, cancel.clone())
                .await?;
        let conn = redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await?;
        Ok(Self {
            _redis: redis,
            bus: Bus::Redis(bus),
            conn,
            tracker,
            cancel,
        })
    }

    async fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> anyhow::Result<T> {
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        Ok(cmd.query_async(&mut self.conn.clone()).await?)
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

fn fence(token: &str, position: u64) -> Fence {
    Fence {
        key: LEASE.to_string(),
        token: token.to_string(),
        record: Some(FenceRecord {
            key: RECORD.to_string(),
            value: format!("m {position}"),
        }),
    }
}

/// Notification-like requests: `(channel, position)`, each fenced by `fences[i]`.
fn requests<'a>(items: &[(&'a str, u64)], fences: &'a [Fence]) -> Vec<PublishRequest<'a>> {
    items
        .iter()
        .zip(fences)
        .map(|((channel, position), fence)| PublishRequest {
            channel,
            data: Bytes::from(format!("{{\"p\":{position}}}")),
            idempotency_key: None,
            fence: Some(fence),
            source: Source::Notify,
            received_at: None,
        })
        .collect()
}

/// `P<offset>`, `D`, `F` or `E` per answer, for compact assertions.
fn summary(outcomes: &[Result<PublishOutcome, BusError>]) -> Vec<String> {
    outcomes
        .iter()
        .map(|o| match o {
            Ok(PublishOutcome::Published { offset, .. }) => format!("P{offset}"),
            Ok(PublishOutcome::Duplicate { .. }) => "D".to_string(),
            Ok(PublishOutcome::Fenced) => "F".to_string(),
            Err(BusError::NotAttempted) => "-".to_string(),
            Err(_) => "E".to_string(),
        })
        .collect()
}

/// The data of a channel's history, oldest first.
async fn history(h: &Harness, channel: &str) -> anyhow::Result<Vec<String>> {
    let entries: Vec<(String, Vec<(String, String)>)> = h
        .cmd(&[
            "XRANGE",
            &format!("pgfanout:{{{channel}}}:history"),
            "-",
            "+",
        ])
        .await?;
    Ok(entries
        .into_iter()
        .flat_map(|(_, fields)| fields.into_iter().map(|(_, v)| v))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_publishes_in_order_and_a_retry_skips_what_it_applied() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.cmd::<()>(&["SET", LEASE, "t"]).await?;
    let fences: Vec<Fence> = (1..=6).map(|p| fence("t", p)).collect();
    let all = [("a", 1), ("b", 2), ("a", 3), ("a", 4), ("b", 5), ("a", 6)];
    let first = h
        .bus
        .publish_batch(&requests(&all[..3], &fences[..3]))
        .await;
    ensure!(
        summary(&first) == ["P1", "P1", "P2"],
        "{:?}",
        summary(&first)
    );
    let record: String = h.cmd(&["GET", RECORD]).await?;
    ensure!(record == "m 3", "recorded {record}");
    // The caller did not learn the outcome and retries from its cursor, with more: what the
    // first call applied is a duplicate (the record names a later publication of the batch).
    let retry = h.bus.publish_batch(&requests(&all, &fences)).await;
    ensure!(
        summary(&retry) == ["D", "D", "D", "P3", "P2", "P4"],
        "{:?}",
        summary(&retry)
    );
    ensure!(history(&h, "a").await? == [r#"{"p":1}"#, r#"{"p":3}"#, r#"{"p":4}"#, r#"{"p":6}"#]);
    ensure!(history(&h, "b").await? == [r#"{"p":2}"#, r#"{"p":5}"#]);
    let record: String = h.cmd(&["GET", RECORD]).await?;
    ensure!(record == "m 6", "recorded {record}");
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stops_at_its_first_fenced_publication() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.cmd::<()>(&["SET", LEASE, "t"]).await?;
    let fences = vec![fence("t", 1), fence("t", 2), fence("old", 3), fence("t", 4)];
    let items = [("a", 1), ("a", 2), ("a", 3), ("a", 4)];
    let outcomes = h.bus.publish_batch(&requests(&items, &fences)).await;
    ensure!(
        summary(&outcomes) == ["P1", "P2", "F", "-"],
        "{:?}",
        summary(&outcomes)
    );
    let record: String = h.cmd(&["GET", RECORD]).await?;
    ensure!(record == "m 2", "recorded {record}");
    ensure!(history(&h, "a").await?.len() == 2);
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_error_midway_keeps_the_head_and_the_retry_completes_it() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.cmd::<()>(&["SET", LEASE, "t"]).await?;
    // A key of the wrong type makes the second publication fail inside the script.
    h.cmd::<()>(&["SET", "pgfanout:{broken}:meta", "not a hash"])
        .await?;
    let fences: Vec<Fence> = (1..=3).map(|p| fence("t", p)).collect();
    let items = [("a", 1), ("broken", 2), ("a", 3)];
    let outcomes = h.bus.publish_batch(&requests(&items, &fences)).await;
    ensure!(
        summary(&outcomes) == ["E", "E", "E"],
        "a failed call: every outcome unknown, {:?}",
        summary(&outcomes)
    );
    let record: String = h.cmd(&["GET", RECORD]).await?;
    ensure!(record == "m 1", "the head was applied: {record}");
    ensure!(
        history(&h, "a").await? == [r#"{"p":1}"#],
        "nothing after the error"
    );
    h.cmd::<()>(&["DEL", "pgfanout:{broken}:meta"]).await?;
    let retry = h.bus.publish_batch(&requests(&items, &fences)).await;
    ensure!(
        summary(&retry) == ["D", "P1", "P2"],
        "{:?}",
        summary(&retry)
    );
    ensure!(history(&h, "a").await? == [r#"{"p":1}"#, r#"{"p":3}"#]);
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_dedupe_within_and_across_batches_on_both_buses() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let memory = {
        let history = Arc::new(HistoryPolicy::uniform(
            100,
            Duration::from_secs(60),
            Duration::from_secs(600),
        ));
        Bus::memory(
            Arc::new(pgfanout::hub::Hub::new()),
            history,
            &h.tracker,
            h.cancel.clone(),
        )
    };
    let keys: Vec<String> = (1..=4).map(|id| format!("outbox:{id}")).collect();
    let request = |i: usize, channel: &'static str| PublishRequest {
        channel,
        data: Bytes::from(format!("{{\"id\":{}}}", i + 1)),
        idempotency_key: Some(&keys[i]),
        fence: None,
        source: Source::Outbox,
        received_at: None,
    };
    for bus in [&h.bus, &memory] {
        let first = bus
            .publish_batch(&[request(0, "x"), request(1, "y"), request(0, "x")])
            .await;
        ensure!(
            summary(&first) == ["P1", "P1", "D"],
            "{:?}",
            summary(&first)
        );
        let again = bus
            .publish_batch(&[request(1, "y"), request(2, "x"), request(3, "y")])
            .await;
        ensure!(
            summary(&again) == ["D", "P2", "P2"],
            "{:?}",
            summary(&again)
        );
        ensure!(bus.publish_batch(&[]).await.is_empty());
    }
    h.stop().await;
    Ok(())
}
