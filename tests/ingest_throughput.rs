//! Ingest throughput, measured (not run by default; `--run-ignored only`): how many events per
//! second enter the bus from raw `pg_notify` and from the outbox, on one node with Redis, next
//! to how fast Postgres alone accepts the same statements (nobody listening or claiming), so
//! the ratio says who limits the path.
//!
//! ```text
//! cargo nextest run --release --run-ignored only --no-capture -E 'test(/^ingest_throughput::/)'
//! ```
//!
//! `PGFANOUT_TEST_BIN=<path to a pgfanout binary>` runs the nodes from another build (a
//! before/after comparison with the same measurement).

use crate::common;

use std::time::Duration;

use common::{Cluster, Node, TestDb};
use tokio::time::Instant;

const EVENTS: u64 = 100_000;
/// Events per producing transaction.
const TX: u64 = 2_000;
const TIMEOUT: Duration = Duration::from_secs(180);

fn notify(a: u64, b: u64) -> String {
    format!(
        "SELECT pg_notify((ARRAY['tp_a','tp_b','tp_c','tp_d'])[i % 4 + 1], \
                          json_build_object('seq', i)::text) \
         FROM generate_series({a}, {b}) AS i"
    )
}

fn outbox(a: u64, b: u64) -> String {
    format!(
        "SELECT pgfanout.publish((ARRAY['tp_a','tp_b','tp_c','tp_d'])[i % 4 + 1], \
                                 jsonb_build_object('seq', i)) \
         FROM generate_series({a}, {b}) AS i"
    )
}

/// Waits until `node` has put `count` messages on the bus; returns when it got there.
async fn wait_published(node: &Node, count: u64) -> anyhow::Result<Instant> {
    common::eventually(TIMEOUT, &format!("{count} publications"), || async {
        match node.metric_sum("pgfanout_bus_published_total").await {
            Ok(n) if n >= count as f64 => Ok(Instant::now()),
            Ok(n) => Err(format!("{n}")),
            Err(e) => Err(format!("{e:#}")),
        }
    })
    .await
}

/// Runs `sql` for events `from .. from + EVENTS`, `TX` per transaction; how long it took.
async fn produce(
    db: &TestDb,
    from: u64,
    sql: impl Fn(u64, u64) -> String,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    for first in (from..from + EVENTS).step_by(TX as usize) {
        db.execute(&sql(first, first + TX - 1)).await?;
    }
    Ok(started.elapsed())
}

fn rate(elapsed: Duration) -> f64 {
    EVENTS as f64 / elapsed.as_secs_f64()
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Mean publications per bus publish on `node` (0 when the node does not export it).
async fn mean_batch(node: &Node) -> f64 {
    let sum = node
        .metric_sum("pgfanout_bus_publish_batch_size_sum")
        .await
        .unwrap_or(0.0);
    let count = node
        .metric_sum("pgfanout_bus_publish_batch_size_count")
        .await
        .unwrap_or(0.0);
    if count > 0.0 {
        sum / count
    } else {
        0.0
    }
}

/// CPU seconds (user + system) a process has used so far; 0 when unknown.
fn cpu_secs(pid: Option<u32>) -> f64 {
    let Some(stat) = pid.and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
    else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds of the node and of Redis, for what a measurement window cost each.
fn cpu(cluster: &Cluster) -> (f64, f64) {
    (
        cpu_secs(cluster.node().pid()),
        cpu_secs(cluster.redis.as_ref().and_then(|r| r.pid())),
    )
}

fn report(path: &str, postgres: Duration, bus: Duration, batch: f64, cpu: (f64, f64)) {
    eprintln!(
        "THROUGHPUT {path}: Postgres alone {:.0}/s ({EVENTS} in {postgres:.2?}); into the bus \
         {:.0}/s ({EVENTS} in {bus:.2?}); bus/Postgres {:.2}; mean batch {:.1}; CPU node \
         {:.2} s, redis {:.2} s; load {}",
        rate(postgres),
        rate(bus),
        postgres.as_secs_f64() / bus.as_secs_f64(),
        batch,
        cpu.0,
        cpu.1,
        load(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with --run-ignored only"]
async fn raw_notify_ingest_throughput() -> anyhow::Result<()> {
    // Postgres alone: the same notifications on a database nobody listens on.
    let alone = TestDb::create().await;
    let postgres = produce(&alone, 0, notify).await?;

    let cluster = Cluster::start(1, &["tp_a", "tp_b", "tp_c", "tp_d"]).await;
    cluster.wait_bridged().await?;
    let cpu_before = cpu(&cluster);
    let started = Instant::now();
    let sent = produce(&cluster.db, 0, notify).await?;
    let done = wait_published(cluster.node(), EVENTS).await?;
    let cpu_after = cpu(&cluster);
    eprintln!("(raw pg_notify: the producer sent them in {sent:.2?} while the node listened)");
    report(
        "raw pg_notify, 1 node, 4 channels",
        postgres,
        done - started,
        mean_batch(cluster.node()).await,
        (cpu_after.0 - cpu_before.0, cpu_after.1 - cpu_before.1),
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with --run-ignored only"]
async fn outbox_ingest_throughput() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(1, &[]).await;
    cluster.wait_bridged().await?;
    // Live: the producer and the claimers at once.
    let cpu_before = cpu(&cluster);
    let started = Instant::now();
    let sent = produce(&cluster.db, 0, outbox).await?;
    let done = wait_published(cluster.node(), EVENTS).await?;
    let live = done - started;
    let cpu_live = cpu(&cluster);
    let cpu_live = (cpu_live.0 - cpu_before.0, cpu_live.1 - cpu_before.1);
    let live_batch = mean_batch(cluster.node()).await;

    // Postgres alone: the same inserts while the node is down (nobody claims), which leaves
    // a backlog for the node to drain after it restarts.
    cluster.nodes[0].kill();
    let postgres = produce(&cluster.db, EVENTS, outbox).await?;
    let redis_before = cpu(&cluster).1;
    cluster.nodes[0].restart().await;
    let started = Instant::now();
    wait_published(cluster.node(), EVENTS).await?;
    let drain = started.elapsed();
    // The node's CPU since it started (its start included).
    let (node_drain, redis_after) = cpu(&cluster);
    eprintln!("(outbox live: the producer wrote them in {sent:.2?} while the node claimed)");
    report(
        "outbox live, 1 node, 4 channels",
        postgres,
        live,
        live_batch,
        cpu_live,
    );
    report(
        "outbox backlog drain, 1 node, 4 channels",
        postgres,
        drain,
        mean_batch(cluster.node()).await,
        (node_drain, redis_after - redis_before),
    );
    Ok(())
}
