//! Graceful drain (G8): on SIGTERM a node stops being ready, tells every client to reconnect
//! elsewhere (close 3001) within the drain window, and exits cleanly within the grace period.
//! A node killed outright comes back on restart and takes the bridge lease back.

use crate::common;

use std::time::{Duration, Instant};

use common::{eventually, Client, Cluster};

const DRAIN_WINDOW: Duration = Duration::from_secs(1);
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[tokio::test]
async fn sigterm_turns_node_unready_closes_clients_with_3001_and_exits_cleanly(
) -> anyhow::Result<()> {
    let env = [
        ("PGFANOUT_DRAIN_WINDOW", "1s"),
        ("PGFANOUT_SHUTDOWN_GRACE", "5s"),
    ];
    let mut cluster = Cluster::start_with(1, &["orders"], true, &env).await;
    cluster.wait_bridged().await?;
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut client = Client::connect(&cluster.node().ws_url()).await?;
        client.subscribe("orders").await?;
        clients.push(client);
    }

    let started = Instant::now();
    cluster.node().terminate()?;
    // Unready: 503 (draining) or no longer answering at all.
    eventually(
        Duration::from_secs(5),
        "/ready to stop answering 200",
        || async {
            match cluster.node().ready().await {
                Ok((200, body)) => Err(format!("200 {body}")),
                Ok((503, body)) if body["draining"] == true => Ok(()),
                Ok((status, body)) => Err(format!("{status} {body} (draining should be true)")),
                Err(_) => Ok(()),
            }
        },
    )
    .await?;

    for (index, client) in clients.iter_mut().enumerate() {
        let (code, reason) = client
            .expect_close(DRAIN_WINDOW + Duration::from_secs(3))
            .await?;
        assert_eq!(code, 3001, "client {index} closed with {code} {reason:?}");
    }
    let node = &mut cluster.nodes[0];
    let status = node
        .wait_exit(SHUTDOWN_GRACE + Duration::from_secs(2))
        .await?;
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(
        started.elapsed() <= SHUTDOWN_GRACE + Duration::from_secs(1),
        "took {:?} to exit, grace is {SHUTDOWN_GRACE:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn node_restarted_after_sigkill_takes_the_bridge_back_and_serves_clients(
) -> anyhow::Result<()> {
    let mut cluster = Cluster::start(1, &["orders"]).await;
    cluster.wait_bridged().await?;
    let mut client = Client::connect(&cluster.node().ws_url()).await?;
    client.subscribe("orders").await?;
    cluster.db.notify("orders", "before").await?;
    assert_eq!(client.next_pub(Duration::from_secs(10)).await?.offset, 1);

    // No drain, no lease release: the restarted process must win the lease back once it lapses.
    cluster.nodes[0].kill();
    let ended = client.idle(Duration::from_secs(5)).await;
    assert!(
        ended.is_err(),
        "the connection to a SIGKILLed node is still open"
    );
    cluster.nodes[0].restart().await;
    cluster.wait_bridged().await?;

    let mut client = Client::connect(&cluster.node().ws_url()).await?;
    client.subscribe("orders").await?;
    cluster.db.notify("orders", "after").await?;
    let publication = client.next_pub(Duration::from_secs(10)).await?;
    assert_eq!(
        (publication.offset, publication.data),
        (2, serde_json::json!("after"))
    );
    Ok(())
}
