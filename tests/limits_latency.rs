//! The latency cost of the shared limiter per command: a benchmark that reports figures and
//! asserts none (wall-clock numbers depend on the machine). Ignored by default; run it with
//!
//!     cargo nextest run --run-ignored only -E 'test(/^limits_latency::/)' --no-capture
//!
//! Two nodes on one Redis, one with a subscribe limit high enough never to refuse (every
//! subscribe then makes its round trip to the limiter script) and one without limits; the
//! same client loop times `subscribe` round trips (then unsubscribes) on each, interleaved
//! in rounds so that both see the same machine load.

use crate::common;

use std::time::{Duration, Instant};

use common::tokens::{self, hs256, SECRET};
use common::{Client, Node, RedisServer};

const ROUNDS: usize = 10;
const PER_ROUND: usize = 200;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

async fn time_subscribes(
    client: &mut Client,
    round: usize,
    into: &mut Vec<Duration>,
) -> anyhow::Result<()> {
    for i in 0..PER_ROUND {
        let channel = format!("bench-{round}-{i}");
        let started = Instant::now();
        client.subscribe(&channel).await?;
        into.push(started.elapsed());
        client.unsubscribe(&channel).await?;
    }
    Ok(())
}

#[tokio::test]
#[ignore = "benchmark: reports figures, run on demand"]
async fn limiter_cost_per_subscribe() -> anyhow::Result<()> {
    let redis = RedisServer::start().await;
    let start = |limit: &str| {
        Node::builder()
            .redis(&redis)
            .env("PGFANOUT_TOKEN_HMAC_SECRET_KEY", SECRET)
            .env("PGFANOUT_LIMIT_SUBSCRIBE_PER_SECOND", limit)
            .env("PGFANOUT_LOG", "warn")
            .start()
    };
    let limited = start("100000000").await;
    let unlimited = start("0").await;
    let token = hs256(&tokens::user("bench", 3600, &["*"], &[]));
    let mut on = Client::connect_with_token(&limited.ws_url(), &token).await?;
    let mut off = Client::connect_with_token(&unlimited.ws_url(), &token).await?;
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        time_subscribes(&mut on, round, &mut with).await?;
        time_subscribes(&mut off, round, &mut without).await?;
    }
    with.sort();
    without.sort();
    let report = |name: &str, v: &[Duration]| {
        println!(
            "{name:>15}: n={} p50={:?} p99={:?}",
            v.len(),
            percentile(v, 0.5),
            percentile(v, 0.99)
        );
    };
    report("with limits", &with);
    report("without limits", &without);
    let decisions = limited
        .metric_sum("pgfanout_rate_limit_decisions_total")
        .await?;
    println!("limiter decisions on the limited node: {decisions}");
    assert!(
        decisions >= (ROUNDS * PER_ROUND) as f64,
        "the limiter was not on the path"
    );
    Ok(())
}
