//! The LISTEN connection dropping (G5): the node reconnects and re-LISTENs, `/ready` shows the
//! outage and the recovery, and notifications sent afterwards reach clients again.

use crate::common;

use std::time::Duration;

use common::{eventually, Client, Cluster};
use serde_json::json;

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(15);
/// Reconnecting may wait out a backoff; this is the longest a test waits for it.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// One node on Redis with a client subscribed to `orders` that already received offset 1.
async fn node_with_one_delivery() -> anyhow::Result<(Cluster, Client)> {
    let cluster = Cluster::start(1, &["orders"]).await;
    cluster.wait_bridged().await?;
    let mut client = Client::connect(&cluster.node().ws_url()).await?;
    client.subscribe("orders").await?;
    cluster
        .db
        .notify("orders", r#"{"before":"outage"}"#)
        .await?;
    let first = client.next_pub(DELIVERY_TIMEOUT).await?;
    assert_eq!((first.offset, first.data), (1, json!({"before": "outage"})));
    Ok((cluster, client))
}

/// Terminates the node's LISTEN backend (waiting until there is one) and returns its pids.
async fn kill_listen_backend(cluster: &Cluster) -> anyhow::Result<Vec<i32>> {
    eventually(
        Duration::from_secs(10),
        "a LISTEN backend to terminate",
        || async {
            match cluster.db.terminate_listeners().await {
                Ok(pids) if !pids.is_empty() => Ok(pids),
                Ok(_) => Err("no backend with application_name pgfanout-listen".to_string()),
                Err(err) => Err(format!("{err:#}")),
            }
        },
    )
    .await
}

/// Waits for a LISTEN backend that is not one of `old` (the node reconnected).
async fn wait_new_listen_backend(cluster: &Cluster, old: &[i32]) -> anyhow::Result<()> {
    eventually(RECOVERY_TIMEOUT, "a new LISTEN backend", || async {
        match cluster.db.listener_pids().await {
            Ok(pids) if pids.iter().any(|pid| !old.contains(pid)) => Ok(()),
            Ok(pids) => Err(format!("listener pids {pids:?}, terminated {old:?}")),
            Err(err) => Err(format!("{err:#}")),
        }
    })
    .await
    .map_err(|err| err.context(cluster.node().log_tail_message()))
}

#[tokio::test]
async fn listener_reconnects_after_pg_terminate_backend_and_notifications_flow_again(
) -> anyhow::Result<()> {
    let (cluster, mut client) = node_with_one_delivery().await?;

    let killed = kill_listen_backend(&cluster).await?;
    wait_new_listen_backend(&cluster, &killed).await?;
    let node = cluster.node();
    node.wait_ready_where(RECOVERY_TIMEOUT, "postgres up again", |status, body| {
        status == 200 && body["postgres"] == "up"
    })
    .await?;

    cluster.db.notify("orders", r#"{"after":"outage"}"#).await?;
    let next = client.next_pub(DELIVERY_TIMEOUT).await?;
    assert_eq!((next.offset, next.data), (2, json!({"after": "outage"})));

    let reconnects = node
        .metric_sum("pgfanout_postgres_reconnects_total")
        .await?;
    assert!(
        reconnects >= 1.0,
        "pgfanout_postgres_reconnects_total is {reconnects} after a reconnect"
    );
    Ok(())
}

#[tokio::test]
async fn ready_reports_postgres_down_during_outage_and_up_after() -> anyhow::Result<()> {
    let (cluster, mut client) = node_with_one_delivery().await?;
    let node = cluster.node();
    let (status, body) = node.ready().await?;
    assert_eq!(status, 200, "/ready before the outage: {body}");
    assert_eq!(
        (&body["postgres"], &body["redis"], &body["ready"]),
        (&json!("up"), &json!("up"), &json!(true))
    );

    // Hold the outage open: the database refuses new connections until we allow them again.
    cluster.db.set_allow_connections(false).await?;
    kill_listen_backend(&cluster).await?;
    let down = node
        .wait_ready_where(
            RECOVERY_TIMEOUT,
            "503 with postgres down",
            |status, body| status == 503 && body["postgres"] == "down",
        )
        .await?;
    assert_eq!(
        down["ready"],
        json!(false),
        "/ready during the outage: {down}"
    );
    assert_eq!(
        down["redis"],
        json!("up"),
        "/ready during the outage: {down}"
    );

    cluster.db.set_allow_connections(true).await?;
    let up = node
        .wait_ready_where(RECOVERY_TIMEOUT, "200 with postgres up", |status, body| {
            status == 200 && body["postgres"] == "up"
        })
        .await?;
    assert_eq!(up["ready"], json!(true), "/ready after the outage: {up}");

    cluster.db.notify("orders", r#"{"after":"outage"}"#).await?;
    let next = client.next_pub(DELIVERY_TIMEOUT).await?;
    assert_eq!((next.offset, next.data), (2, json!({"after": "outage"})));
    Ok(())
}
