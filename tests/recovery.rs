//! Lossless resume (G4): a client that comes back with its last epoch and offset gets exactly
//! what it missed in the subscribe reply, then live publications, with no gap and no duplicate,
//! on the same node or another one; a position it cannot resume is reported as not recovered.

use crate::common;

use std::time::Duration;

use common::{Client, Cluster};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

/// Offsets and data of the `publications` in a subscribe result.
fn recovered_publications(result: &Value) -> Vec<(u64, Value)> {
    let publications = result["publications"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    publications
        .iter()
        .map(|p| (p["offset"].as_u64().unwrap_or(0), p["data"].clone()))
        .collect()
}

/// Subscribes a client, lets it receive 1–2, disconnects it, publishes 3–4 while it is away,
/// then resubscribes with recovery on node `back_on` and checks it gets 3–4 and then 5 live.
async fn resume_after_missing_two(cluster: &Cluster, back_on: usize) -> anyhow::Result<()> {
    let db = &cluster.db;
    let mut watcher = Client::connect(&cluster.node().ws_url()).await?;
    watcher.subscribe("orders").await?;
    let mut leaving = Client::connect(&cluster.node().ws_url()).await?;
    let first = leaving.subscribe("orders").await?;
    let epoch = first["epoch"].as_str().unwrap_or_default().to_string();
    assert!(
        !epoch.is_empty(),
        "subscribe result carries no epoch, so no SDK can resume: {first}"
    );
    assert_eq!(first["recoverable"], json!(true), "{first}");

    for n in 1..=2 {
        db.notify("orders", &json!({"n": n}).to_string()).await?;
    }
    for n in 1..=2 {
        assert_eq!(leaving.next_pub(WAIT).await?.offset, n);
        assert_eq!(watcher.next_pub(WAIT).await?.offset, n);
    }
    leaving.close().await;

    for n in 3..=4 {
        db.notify("orders", &json!({"n": n}).to_string()).await?;
    }
    for n in 3..=4 {
        // On the bus (and so in history) before the client comes back.
        assert_eq!(watcher.next_pub(WAIT).await?.offset, n);
    }

    let mut back = Client::connect(&cluster.nodes[back_on].ws_url()).await?;
    let result = back.subscribe_recover("orders", &epoch, 2).await?;
    assert_eq!(result["was_recovering"], json!(true), "{result}");
    assert_eq!(result["recovered"], json!(true), "{result}");
    assert_eq!(result["epoch"], json!(epoch), "{result}");
    assert_eq!(result["offset"], json!(4), "{result}");
    assert_eq!(
        recovered_publications(&result),
        vec![(3, json!({"n": 3})), (4, json!({"n": 4}))],
        "{result}"
    );

    db.notify("orders", r#"{"n":5}"#).await?;
    let live = back.next_pub(WAIT).await?;
    assert_eq!((live.offset, live.data), (5, json!({"n": 5})));
    back.expect_no_pub(Duration::from_millis(300)).await?;
    Ok(())
}

#[tokio::test]
async fn resubscribe_with_recover_gets_what_was_missed_then_live_in_memory() -> anyhow::Result<()> {
    let cluster = Cluster::start_with(1, &["orders"], false, &[]).await;
    cluster.wait_bridged().await?;
    resume_after_missing_two(&cluster, 0).await
}

#[tokio::test]
async fn resubscribe_with_recover_on_another_node_gets_what_was_missed_then_live(
) -> anyhow::Result<()> {
    let cluster = Cluster::start(2, &["orders"]).await;
    cluster.wait_bridged().await?;
    resume_after_missing_two(&cluster, 1).await
}

#[tokio::test]
async fn recover_from_an_unknown_epoch_is_reported_as_not_recovered() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &["orders"]).await;
    cluster.wait_bridged().await?;
    let mut watcher = Client::connect(&cluster.node().ws_url()).await?;
    let first = watcher.subscribe("orders").await?;
    cluster.db.notify("orders", "one").await?;
    assert_eq!(watcher.next_pub(WAIT).await?.offset, 1);

    let mut client = Client::connect(&cluster.node().ws_url()).await?;
    let result = client
        .subscribe_recover("orders", "not-the-epoch", 1)
        .await?;
    assert_eq!(result["was_recovering"], json!(true), "{result}");
    assert_ne!(result["recovered"], json!(true), "{result}");
    assert!(recovered_publications(&result).is_empty(), "{result}");
    assert_eq!(
        result["epoch"], first["epoch"],
        "the current epoch: {result}"
    );
    assert_eq!(
        result["offset"],
        json!(1),
        "the current top offset: {result}"
    );

    // Not recovered, but subscribed: live publications flow.
    cluster.db.notify("orders", "two").await?;
    let live = client.next_pub(WAIT).await?;
    assert_eq!((live.offset, live.data), (2, json!("two")));
    Ok(())
}
