//! Ingest throughput, measured (not run by default; `--run-ignored only`): how many events per
//! second enter the bus from raw `pg_notify` and from the outbox, on one node with Redis.
//!
//! ```text
//! cargo nextest run --run-ignored only --no-capture -E 'test(/^ingest_throughput::/)'
//! ```

use crate::common;

use std::time::Duration;

use common::{Cluster, Node};
use tokio::time::Instant;

const CHANNELS: [&str; 4] = ["tp_a", "tp_b", "tp_c", "tp_d"];
const EVENTS: u64 = 40_000;
/// Events per producing transaction.
const TX: u64 = 2_000;
const TIMEOUT: Duration = Duration::from_secs(120);

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

async fn produce(cluster: &Cluster, sql: impl Fn(u64, u64) -> String) -> anyhow::Result<()> {
    for first in (0..EVENTS).step_by(TX as usize) {
        cluster.db.execute(&sql(first, first + TX - 1)).await?;
    }
    Ok(())
}

fn report(path: &str, elapsed: Duration) {
    eprintln!(
        "THROUGHPUT {path}: {EVENTS} events into the bus in {elapsed:.2?} = {:.0} events/s",
        EVENTS as f64 / elapsed.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with --run-ignored only"]
async fn raw_notify_ingest_throughput() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &CHANNELS).await;
    cluster.wait_bridged().await?;
    let started = Instant::now();
    produce(&cluster, |a, b| {
        format!(
            "SELECT pg_notify((ARRAY['tp_a','tp_b','tp_c','tp_d'])[i % 4 + 1], \
                              json_build_object('seq', i)::text) \
             FROM generate_series({a}, {b}) AS i"
        )
    })
    .await?;
    let sent = started.elapsed();
    let done = wait_published(cluster.node(), EVENTS).await?;
    eprintln!("(producer sent them in {sent:.2?})");
    report("raw pg_notify, 1 node, 4 channels", done - started);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with --run-ignored only"]
async fn outbox_ingest_throughput() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(1, &[]).await;
    cluster.wait_bridged().await?;
    let publish = |a: u64, b: u64| {
        format!(
            "SELECT pgfanout.publish((ARRAY['tp_a','tp_b','tp_c','tp_d'])[i % 4 + 1], \
                                     jsonb_build_object('seq', i)) \
             FROM generate_series({a}, {b}) AS i"
        )
    };
    // Live: the producer and the claimer at once.
    let started = Instant::now();
    produce(&cluster, publish).await?;
    let sent = started.elapsed();
    let done = wait_published(cluster.node(), EVENTS).await?;
    eprintln!("(producer wrote them in {sent:.2?})");
    report("outbox live, 1 node, 4 channels", done - started);

    // A backlog: written while the node was down, drained after it restarts.
    cluster.nodes[0].kill();
    produce(&cluster, |a, b| publish(a + EVENTS, b + EVENTS)).await?;
    cluster.nodes[0].restart().await;
    let started = Instant::now();
    wait_published(cluster.node(), EVENTS).await?;
    report(
        "outbox backlog drain, 1 node, 4 channels",
        started.elapsed(),
    );
    Ok(())
}
