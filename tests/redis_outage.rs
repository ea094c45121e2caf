//! The bus dropping (G5): `/ready` shows Redis down and up again; a Redis that lost its data is
//! reported to subscribers (new epoch, `unsubscribe` push 2500, `recovered: false`) instead of
//! silently restarting offsets; and what a node missed while its Redis subscription was cut
//! reaches a client that follows the stream the way the SDKs do, with no gap.

use crate::common;

use std::time::Duration;

use anyhow::{bail, ensure};
use common::{Client, Cluster};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// `unsubscribe` push code that tells an SDK to resubscribe with recovery.
const INSUFFICIENT_STATE: u64 = 2500;

#[tokio::test]
async fn ready_reports_redis_down_and_a_restarted_empty_redis_is_a_new_epoch() -> anyhow::Result<()>
{
    let mut cluster = Cluster::start(1, &["orders"]).await;
    cluster.wait_bridged().await?;
    let mut client = Client::connect(&cluster.node().ws_url()).await?;
    let subscribed = client.subscribe("orders").await?;
    let old_epoch = subscribed["epoch"].as_str().unwrap_or_default().to_string();
    cluster.db.notify("orders", "before").await?;
    assert_eq!(client.next_pub(WAIT).await?.offset, 1);

    let redis = cluster.redis.as_mut().expect("cluster has Redis");
    redis.stop();
    let down = cluster
        .node()
        .wait_ready_where(RECOVERY_TIMEOUT, "503 with redis down", |status, body| {
            status == 503 && body["redis"] == "down"
        })
        .await?;
    assert_eq!(
        (&down["ready"], &down["postgres"]),
        (&json!(false), &json!("up")),
        "{down}"
    );

    cluster
        .redis
        .as_mut()
        .expect("cluster has Redis")
        .restart()
        .await;
    cluster
        .node()
        .wait_ready_where(RECOVERY_TIMEOUT, "200 with redis up", |status, body| {
            status == 200 && body["redis"] == "up"
        })
        .await?;
    cluster.wait_bridged().await?;

    // A client that joins now simply sees the new stream.
    let mut newcomer = Client::connect(&cluster.node().ws_url()).await?;
    newcomer.subscribe("orders").await?;
    cluster.db.notify("orders", "after").await?;
    let fresh = newcomer.next_pub(WAIT).await?;
    assert_eq!((fresh.offset, fresh.data), (1, json!("after")));

    // The old client must not be handed offset 1 again as if nothing happened.
    let push = client.next_push(WAIT).await?;
    assert_eq!(
        push["push"]["unsubscribe"]["code"],
        json!(INSUFFICIENT_STATE),
        "expected an unsubscribe push 2500 after the epoch changed, got {push}"
    );
    let result = client.subscribe_recover("orders", &old_epoch, 1).await?;
    assert_eq!(result["was_recovering"], json!(true), "{result}");
    assert_ne!(
        result["recovered"],
        json!(true),
        "recovered across a lost history: {result}"
    );
    assert_ne!(result["epoch"], json!(old_epoch), "{result}");

    cluster.db.notify("orders", "later").await?;
    let later = client.next_pub(WAIT).await?;
    assert_eq!((later.offset, later.data), (2, json!("later")));
    Ok(())
}

/// Follows one channel as centrifuge-js does: each publication must be the next offset; an
/// `unsubscribe` push 2500 is answered by a recovering subscribe from the last position.
struct Follower {
    client: Client,
    epoch: String,
    /// Offset and data of everything received, live or recovered, in order.
    received: Vec<(u64, Value)>,
    resubscribes: u32,
}

impl Follower {
    async fn subscribe(mut client: Client) -> anyhow::Result<Follower> {
        let result = client.subscribe("orders").await?;
        let epoch = result["epoch"].as_str().unwrap_or_default().to_string();
        Ok(Follower {
            client,
            epoch,
            received: Vec::new(),
            resubscribes: 0,
        })
    }

    fn offset(&self) -> u64 {
        self.received.last().map_or(0, |(offset, _)| *offset)
    }

    /// Handles pushes until `window` passes without one.
    async fn pump(&mut self, window: Duration) -> anyhow::Result<()> {
        while let Ok(push) = self.client.next_push(window).await {
            let push = &push["push"];
            if let Some(publication) = push.get("pub") {
                let offset = publication["offset"].as_u64().unwrap_or(0);
                ensure!(
                    offset == self.offset() + 1,
                    "live offset {offset} after {}",
                    self.offset()
                );
                self.received.push((offset, publication["data"].clone()));
            } else if push["unsubscribe"]["code"] == json!(INSUFFICIENT_STATE) {
                self.resubscribes += 1;
                let result = self
                    .client
                    .subscribe_recover("orders", &self.epoch, self.offset())
                    .await?;
                ensure!(
                    result["recovered"] == json!(true),
                    "not recovered: {result}"
                );
                for publication in result["publications"].as_array().into_iter().flatten() {
                    let offset = publication["offset"].as_u64().unwrap_or(0);
                    ensure!(
                        offset == self.offset() + 1,
                        "recovered {offset} after {}",
                        self.offset()
                    );
                    self.received.push((offset, publication["data"].clone()));
                }
                self.epoch = result["epoch"].as_str().unwrap_or_default().to_string();
            } else {
                bail!("unexpected push {push}");
            }
        }
        if let Some((code, reason)) = self.client.close_frame() {
            bail!("connection closed: {code} {reason:?}");
        }
        Ok(())
    }
}

#[tokio::test]
async fn publications_missed_while_the_redis_subscription_was_cut_reach_the_client(
) -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &["orders"]).await;
    cluster.wait_bridged().await?;
    let redis = cluster.redis.as_ref().expect("cluster has Redis");
    let mut follower =
        Follower::subscribe(Client::connect(&cluster.node().ws_url()).await?).await?;
    cluster.db.notify("orders", r#"{"n":1}"#).await?;
    follower.pump(Duration::from_millis(300)).await?;
    assert_eq!(follower.offset(), 1);

    // Cut the node's subscriber connection (its publishing connection stays) again and again
    // while publishing, so some publications reach the bus while the node is not listening.
    let mut sent = 1;
    let mut cuts = 0;
    for _ in 0..50 {
        let killed = redis.command("CLIENT KILL TYPE pubsub")?;
        cuts += u32::from(killed.starts_with(':') && !killed.starts_with(":0"));
        sent += 1;
        cluster
            .db
            .notify("orders", &json!({"n": sent}).to_string())
            .await?;
        follower.pump(Duration::from_millis(20)).await?;
    }
    assert!(
        cuts > 0,
        "CLIENT KILL TYPE pubsub never found the node's subscriber"
    );
    // Later publications reveal any gap at the end; stop once everything sent has arrived.
    let deadline = tokio::time::Instant::now() + RECOVERY_TIMEOUT;
    while follower.offset() < sent {
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "after {RECOVERY_TIMEOUT:?}: {} of {sent} received",
                follower.offset()
            );
        }
        sent += 1;
        cluster
            .db
            .notify("orders", &json!({"n": sent}).to_string())
            .await?;
        follower.pump(Duration::from_millis(300)).await?;
    }

    let expected: Vec<(u64, Value)> = (1..=sent).map(|n| (n, json!({"n": n}))).collect();
    assert_eq!(follower.received, expected);
    eprintln!(
        "{} resubscribe(s) with recovery were needed",
        follower.resubscribes
    );
    Ok(())
}
