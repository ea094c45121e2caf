//! Lossless resume on any node (G3, G4) with the real centrifuge-js SDK, driven through the
//! shared SDK driver ([`common::sdk`]): the SDK reaches node A through a round-robin balancer
//! and receives 1..100; node A is killed (SIGKILL, no drain) and 101..300 are published on
//! node B at a steady pace *while* the SDK notices, backs off and reconnects; it lands on B,
//! resubscribes with recovery and ends with exactly 1..300, once each, in order, having
//! reported `recovered`. (sdk_conformance covers the same move for both SDKs with the
//! publications sent in one burst before the SDK is back.)

use crate::common;

use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use common::balancer::local;
use common::tokens::{self, hs256, SECRET};
use common::{Balancer, Client, Cluster, Sdk, SdkDriver};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

/// Publishes `{"n": n}` on `orders` for each `n`, each acknowledged (so with offset n on a
/// fresh channel), pausing `pause` after each.
async fn publish_range(
    client: &mut Client,
    range: std::ops::RangeInclusive<u64>,
    pause: Duration,
) -> anyhow::Result<()> {
    for n in range {
        client
            .publish("orders", json!({ "n": n }))
            .await?
            .map_err(|e| anyhow::anyhow!("publish {n} refused: {e}"))?;
        tokio::time::sleep(pause).await;
    }
    Ok(())
}

#[tokio::test]
async fn centrifuge_js_resumes_on_another_node_while_publications_flow() -> anyhow::Result<()> {
    let mut cluster = Cluster::start_with(
        2,
        &["orders"],
        true,
        &[
            ("PGFANOUT_ALLOW_ANONYMOUS_PUBLISH", "true"),
            ("PGFANOUT_TOKEN_HMAC_SECRET_KEY", SECRET),
        ],
    )
    .await;
    cluster.wait_bridged().await?;
    let (a, b) = (cluster.nodes[0].port(), cluster.nodes[1].port());
    // Only node A at first, so the SDK surely starts there; B joins once it is subscribed.
    let balancer = Balancer::start_http(vec![local(a)]).await;

    let mut driver = SdkDriver::start(Sdk::Js)?;
    // With a token: the driver's SDK asks for one when it has none.
    let token = hs256(&tokens::user("sdk", 600, &["orders"], &[]));
    driver.connect(&balancer.ws_url(), &token, &[]).await?;
    let (connected, _) = driver.until(WAIT, "connected", |_| true).await?;
    driver.subscribe("orders").await?;
    let (subscribed, _) = driver.until(WAIT, "subscribed", |_| true).await?;
    ensure!(subscribed["recoverable"] == json!(true), "{subscribed}");
    ensure!(
        balancer.open_websocket_backends() == vec![a],
        "the SDK should be on node A: {:?}",
        balancer.carried()
    );
    balancer.set_backends(vec![local(a), local(b)]);

    let mut publisher = Client::connect(&cluster.nodes[1].ws_url()).await?;
    publish_range(&mut publisher, 1..=100, Duration::ZERO).await?;
    let (mut publications, _) = driver.publications("orders", 100, WAIT).await?;

    cluster.nodes[0].kill();
    // 200 publications over about 2 s: the SDK reconnects (100 ms..1 s backoff) meanwhile.
    publish_range(&mut publisher, 101..=300, Duration::from_millis(10)).await?;

    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while publications.len() < 300 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let event = driver.next(left).await.with_context(|| {
            format!(
                "{} of 300 publications; other events: {events:?}",
                publications.len()
            )
        })?;
        if event["event"] == "publication" {
            let offset = event["offset"].as_u64().unwrap_or_default();
            publications.push((offset, event["data"].clone()));
        } else {
            events.push(event);
        }
    }
    driver
        .expect_no_publication("orders", Duration::from_millis(300))
        .await?;

    let expected: Vec<(u64, Value)> = (1..=300).map(|n| (n, json!({ "n": n }))).collect();
    if publications != expected {
        let got: Vec<u64> = publications.iter().map(|(o, _)| *o).collect();
        bail!("not exactly 1..300 once each in order: {got:?}; events: {events:?}");
    }
    let resubscribed: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "subscribed")
        .collect();
    ensure!(
        !resubscribed.is_empty()
            && resubscribed
                .iter()
                .all(|e| e["was_recovering"] == json!(true) && e["recovered"] == json!(true)),
        "every resubscribe after the kill recovered: {events:?}"
    );
    ensure!(
        events
            .iter()
            .any(|e| e["event"] == "connected" && e["client"] != connected["client"]),
        "a new connection: {events:?}"
    );
    ensure!(
        balancer.open_websocket_backends() == vec![b],
        "the SDK is now on node B: {:?}",
        balancer.carried()
    );
    let metrics = cluster.nodes[1].metrics().await?;
    let recovered = metrics
        .lines()
        .find(|l| {
            l.starts_with("pgfanout_messages_replayed_total") && l.contains("path=\"recovery\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    eprintln!("node B replayed {recovered} publications to the SDK in its recovery");
    ensure!(
        recovered >= 1.0,
        "the SDK came back only after everything was published: nothing was recovered"
    );
    Ok(())
}
