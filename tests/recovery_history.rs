//! History limits and recovery (G4's "otherwise it is told plainly"): a position older than
//! the retained history, a channel without history, a per-pattern history size, and the
//! recovery cap all answer `recovered: false` with the current position and no partial
//! replay; inside the limits the replay is whole.

use crate::common;

use std::time::Duration;

use common::{Client, Cluster, Node};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

fn offsets(result: &Value) -> Vec<u64> {
    result["publications"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["offset"].as_u64()).collect())
        .unwrap_or_default()
}

/// Publishes `n` messages `{"n": first..}` through a client publish (acknowledged once on
/// the bus with their offsets).
async fn publish_many(node: &Node, channel: &str, first: u64, n: u64) -> anyhow::Result<()> {
    let mut publisher = Client::connect(&node.ws_url()).await?;
    for i in first..first + n {
        publisher
            .publish(channel, json!({ "n": i }))
            .await?
            .map_err(|e| anyhow::anyhow!("publish refused: {e}"))?;
    }
    publisher.close().await;
    Ok(())
}

/// A node allowing client publishes, with extra settings.
async fn node_with(env: &[(&str, &str)], with_redis: bool) -> Cluster {
    let mut all = vec![("PGFANOUT_ALLOW_ANONYMOUS_PUBLISH", "true")];
    all.extend_from_slice(env);
    Cluster::start_with(1, &["orders"], with_redis, &all).await
}

/// History size 50, a client away while 500 notifications go through Postgres: it comes back
/// to `recovered: false` with the current epoch and top offset, and no publications at all.
async fn older_than_history_is_not_recovered(with_redis: bool) -> anyhow::Result<()> {
    let cluster = Cluster::start_with(
        1,
        &["orders"],
        with_redis,
        &[("PGFANOUT_HISTORY_SIZE", "50")],
    )
    .await;
    cluster.wait_bridged().await?;
    let node = cluster.node();
    let mut watcher = Client::connect(&node.ws_url()).await?;
    watcher.subscribe("orders").await?;
    let mut leaving = Client::connect(&node.ws_url()).await?;
    let first = leaving.subscribe("orders").await?;
    let epoch = first["epoch"].as_str().unwrap_or_default().to_string();
    cluster.db.notify("orders", r#"{"n":1}"#).await?;
    assert_eq!(leaving.next_pub(WAIT).await?.offset, 1);
    assert_eq!(watcher.next_pub(WAIT).await?.offset, 1);
    leaving.close().await;

    for n in 2..=501 {
        cluster
            .db
            .notify("orders", &json!({ "n": n }).to_string())
            .await?;
    }
    for n in 2..=501 {
        assert_eq!(watcher.next_pub(WAIT).await?.offset, n, "on the bus first");
    }

    let mut back = Client::connect(&node.ws_url()).await?;
    let result = back.subscribe_recover("orders", &epoch, 1).await?;
    assert_eq!(result["was_recovering"], json!(true), "{result}");
    assert_ne!(result["recovered"], json!(true), "{result}");
    assert!(offsets(&result).is_empty(), "no partial replay: {result}");
    assert_eq!(result["epoch"], json!(epoch), "{result}");
    assert_eq!(result["offset"], json!(501), "{result}");
    assert_eq!(result["recoverable"], json!(true), "{result}");

    // Within the last 50 it still recovers, whole.
    let mut near = Client::connect(&node.ws_url()).await?;
    let result = near.subscribe_recover("orders", &epoch, 460).await?;
    assert_eq!(result["recovered"], json!(true), "{result}");
    assert_eq!(offsets(&result), (461..=501).collect::<Vec<_>>());

    // And the one that was not recovered goes on live.
    cluster.db.notify("orders", r#"{"n":502}"#).await?;
    assert_eq!(back.next_pub(WAIT).await?.offset, 502);
    let metrics = node.metrics().await?;
    assert!(
        metrics.contains(r#"pgfanout_recoveries_failed_total{node="#)
            && metrics.contains(r#"reason="out_of_history"} 1"#),
        "failure counted by reason:\n{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn an_offset_older_than_history_gets_recovered_false_via_redis() -> anyhow::Result<()> {
    older_than_history_is_not_recovered(true).await
}

#[tokio::test]
async fn an_offset_older_than_history_gets_recovered_false_in_memory() -> anyhow::Result<()> {
    older_than_history_is_not_recovered(false).await
}

#[tokio::test]
async fn channels_without_history_are_not_recoverable_and_say_so() -> anyhow::Result<()> {
    let cluster = node_with(&[("PGFANOUT_HISTORY_CHANNELS", "live:*=0")], true).await;
    let node = cluster.node();
    let mut client = Client::connect(&node.ws_url()).await?;
    let live = client.subscribe("live:prices").await?;
    assert_eq!(live.get("recoverable"), None, "{live}");
    assert_eq!(live.get("positioned"), None, "{live}");
    let epoch = live["epoch"].as_str().unwrap_or_default().to_string();
    assert!(!epoch.is_empty(), "offsets and epoch still exist: {live}");
    let other = client.subscribe("orders").await?;
    assert_eq!(other["recoverable"], json!(true), "{other}");

    publish_many(node, "live:prices", 1, 3).await?;
    for n in 1..=3 {
        assert_eq!(client.next_pub(WAIT).await?.offset, n, "delivered live");
    }
    let mut back = Client::connect(&node.ws_url()).await?;
    let result = back.subscribe_recover("live:prices", &epoch, 1).await?;
    assert_eq!(result["was_recovering"], json!(true), "{result}");
    assert_ne!(result["recovered"], json!(true), "{result}");
    assert!(offsets(&result).is_empty(), "{result}");
    assert_eq!(result["offset"], json!(3), "{result}");
    Ok(())
}

#[tokio::test]
async fn history_size_and_ttl_follow_the_first_matching_pattern() -> anyhow::Result<()> {
    let cluster = node_with(
        &[("PGFANOUT_HISTORY_CHANNELS", "small:*=5,brief:*=100/1s")],
        true,
    )
    .await;
    let node = cluster.node();
    let mut client = Client::connect(&node.ws_url()).await?;
    let small = client.subscribe("small:a").await?;
    let big = client.subscribe("big:a").await?;
    let brief = client.subscribe("brief:a").await?;
    publish_many(node, "small:a", 1, 10).await?;
    publish_many(node, "big:a", 1, 10).await?;
    publish_many(node, "brief:a", 1, 3).await?;

    let mut back = Client::connect(&node.ws_url()).await?;
    let epoch = |r: &Value| r["epoch"].as_str().unwrap_or_default().to_string();
    let r = back.subscribe_recover("small:a", &epoch(&small), 0).await?;
    assert_ne!(r["recovered"], json!(true), "only 5 kept: {r}");
    let r = back.subscribe_recover("small:a-x", "", 0).await?;
    assert_ne!(r["recovered"], json!(true), "unknown epoch: {r}");
    let r = back.subscribe_recover("big:a", &epoch(&big), 0).await?;
    assert_eq!(r["recovered"], json!(true), "default size 1000: {r}");
    assert_eq!(offsets(&r), (1..=10).collect::<Vec<_>>());
    let mut again = Client::connect(&node.ws_url()).await?;
    let r = again
        .subscribe_recover("small:a", &epoch(&small), 5)
        .await?;
    assert_eq!(r["recovered"], json!(true), "the last 5 are kept: {r}");
    assert_eq!(offsets(&r), (6..=10).collect::<Vec<_>>());

    // History of brief:* expires a second after its last publication.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = again
        .subscribe_recover("brief:a", &epoch(&brief), 0)
        .await?;
    assert_ne!(r["recovered"], json!(true), "expired: {r}");
    assert_eq!(
        r["offset"],
        json!(3),
        "the offset outlives the history: {r}"
    );
    Ok(())
}

async fn recovery_cap_is_all_or_nothing(with_redis: bool) -> anyhow::Result<()> {
    let cluster = node_with(&[("PGFANOUT_RECOVERY_MAX_PUBLICATIONS", "20")], with_redis).await;
    let node = cluster.node();
    let mut first = Client::connect(&node.ws_url()).await?;
    let result = first.subscribe("orders").await?;
    let epoch = result["epoch"].as_str().unwrap_or_default().to_string();
    publish_many(node, "orders", 1, 21).await?;

    let mut back = Client::connect(&node.ws_url()).await?;
    let r = back.subscribe_recover("orders", &epoch, 0).await?;
    assert_ne!(r["recovered"], json!(true), "21 missed, cap 20: {r}");
    assert!(offsets(&r).is_empty(), "nothing partial: {r}");
    assert_eq!(r["offset"], json!(21), "{r}");

    let mut within = Client::connect(&node.ws_url()).await?;
    let r = within.subscribe_recover("orders", &epoch, 1).await?;
    assert_eq!(r["recovered"], json!(true), "exactly the cap: {r}");
    assert_eq!(offsets(&r), (2..=21).collect::<Vec<_>>());

    let metrics = node.metrics().await?;
    let sum = |name| common::node::sum_metric(&metrics, name);
    assert_eq!(sum("pgfanout_recoveries_attempted_total"), 2.0, "{metrics}");
    assert_eq!(sum("pgfanout_recoveries_succeeded_total"), 1.0, "{metrics}");
    assert!(metrics.contains(r#"reason="over_cap"} 1"#), "{metrics}");
    assert!(
        metrics.contains(r#"pgfanout_messages_replayed_total{node="#)
            && metrics.contains(r#"path="recovery"} 20"#),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn a_recovery_past_the_cap_fails_whole_via_redis() -> anyhow::Result<()> {
    recovery_cap_is_all_or_nothing(true).await
}

#[tokio::test]
async fn a_recovery_past_the_cap_fails_whole_in_memory() -> anyhow::Result<()> {
    recovery_cap_is_all_or_nothing(false).await
}
