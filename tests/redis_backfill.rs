//! The node fills holes in its own stream (G3, G5) so that even a plain client, which never
//! resubscribes, gets every publication once and in order: after the Redis subscriber
//! connections of every node are killed again and again while publications flow at 500+/s,
//! and when a publication's pub/sub message is lost (its `PUBLISH` skipped on purpose, the
//! rest of the publish script run). Where history cannot fill a hole, or Redis lost its data, the node's
//! subscribers are told at once (unsubscribe push 2500) instead of waiting in silence; and
//! when Redis comes back with older data (publications it had delivered are gone and their
//! offsets are handed out again), the channel gets a new epoch instead of a silent skip.

use crate::common;

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use common::{Client, Cluster, RedisServer};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);
/// `unsubscribe` push code that tells an SDK to resubscribe with recovery.
const INSUFFICIENT_STATE: u64 = 2500;

/// One node on Redis that lets anonymous clients publish, with extra settings.
async fn node_with(env: &[(&str, &str)]) -> anyhow::Result<Cluster> {
    let mut all = vec![("PGFANOUT_ALLOW_ANONYMOUS_PUBLISH", "true")];
    all.extend_from_slice(env);
    let cluster = Cluster::start_with(1, &["orders"], true, &all).await;
    cluster.wait_bridged().await?;
    Ok(cluster)
}

async fn publish(client: &mut Client, n: u64) -> anyhow::Result<()> {
    client
        .publish("orders", json!({ "n": n }))
        .await?
        .map_err(|e| anyhow::anyhow!("publish {n} refused: {e}"))?;
    Ok(())
}

/// Runs the node's publish script (src/bus/publish.lua) on `channel` without its `PUBLISH`:
/// the publication gets its offset and its place in history, but its pub/sub message is lost
/// on the way to every node. Returns its offset. The keys and arguments follow the script's
/// header, as a batch of one (no dedupe, no fence: the unused keys are the meta key again).
async fn publish_without_pubsub(
    redis: &RedisServer,
    channel: &str,
    data: &Value,
    history_size: u32,
) -> anyhow::Result<u64> {
    let source = include_str!("../src/bus/publish.lua");
    let publish = source
        .lines()
        .find(|line| line.trim_start().starts_with("redis.call(\"PUBLISH\""))
        .context("publish.lua has no PUBLISH line")?;
    let script = redis::Script::new(&source.replace(publish, "-- PUBLISH skipped by the test"));
    let mut conn = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    let meta = format!("pgfanout:{{{channel}}}:meta");
    let (status, offset, _epoch): (i64, u64, String) = script
        .key(&meta)
        .key(format!("pgfanout:{{{channel}}}:history"))
        .key(&meta)
        .key(&meta)
        .key(&meta)
        .arg(86_400) // meta ttl
        .arg(0) // dedupe ttl
        .arg("PUBLISH")
        .arg("epoch-of-the-test")
        .arg(data.to_string())
        .arg(history_size)
        .arg(300) // history ttl
        .arg(format!("pgfanout:{{{channel}}}:pub"))
        .arg("0") // no dedupe
        .arg("") // no fence
        .arg(0) // entered the bus
        .arg("") // no fence record
        .arg("0") // no Cluster deadline
        .invoke_async(&mut conn)
        .await?;
    ensure!(status == 1, "publish script answered {status}");
    Ok(offset)
}

/// The next `n` pushes, which must all be publications: (offset, data).
async fn next_publications(client: &mut Client, n: usize) -> anyhow::Result<Vec<(u64, Value)>> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let push = client
            .next_push(WAIT)
            .await
            .with_context(|| format!("after {got:?}"))?;
        let Some(publication) = push["push"].get("pub") else {
            bail!("expected a publication after {got:?}, got {push}");
        };
        got.push((
            publication["offset"].as_u64().unwrap_or(0),
            publication["data"].clone(),
        ));
    }
    Ok(got)
}

fn numbered(range: std::ops::RangeInclusive<u64>) -> Vec<(u64, Value)> {
    range.map(|n| (n, json!({ "n": n }))).collect()
}

#[tokio::test]
async fn a_publication_lost_on_pubsub_is_repaired_from_history() -> anyhow::Result<()> {
    let cluster = node_with(&[]).await?;
    let node = cluster.node();
    let redis = cluster.redis.as_ref().context("Redis")?;
    let mut subscriber = Client::connect(&node.ws_url()).await?;
    subscriber.subscribe("orders").await?;
    let mut publisher = Client::connect(&node.ws_url()).await?;

    publish(&mut publisher, 1).await?;
    assert_eq!(
        next_publications(&mut subscriber, 1).await?,
        numbered(1..=1)
    );
    let lost = publish_without_pubsub(redis, "orders", &json!({"n": 2}), 1000).await?;
    assert_eq!(lost, 2);
    subscriber.expect_no_pub(Duration::from_millis(300)).await?;

    // The next publication reveals the hole: the node reads 2 from history and delivers it
    // before 3.
    publish(&mut publisher, 3).await?;
    publish(&mut publisher, 4).await?;
    assert_eq!(
        next_publications(&mut subscriber, 3).await?,
        numbered(2..=4)
    );
    assert_eq!(node.metric_sum("pgfanout_gaps_repaired_total").await?, 1.0);
    assert_eq!(
        node.metric_sum("pgfanout_gaps_unrepaired_total").await?,
        0.0
    );
    let metrics = node.metrics().await?;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("pgfanout_messages_replayed_total")
                && l.contains("path=\"repair\"")
                && !l.ends_with(" 0")),
        "publications replayed by the node:\n{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn a_hole_older_than_history_is_reported_to_subscribers() -> anyhow::Result<()> {
    let cluster = node_with(&[("PGFANOUT_HISTORY_SIZE", "2")]).await?;
    let node = cluster.node();
    let redis = cluster.redis.as_ref().context("Redis")?;
    let mut subscriber = Client::connect(&node.ws_url()).await?;
    let subscribed = subscriber.subscribe("orders").await?;
    let epoch = subscribed["epoch"].as_str().unwrap_or_default().to_string();
    let mut publisher = Client::connect(&node.ws_url()).await?;

    publish(&mut publisher, 1).await?;
    assert_eq!(
        next_publications(&mut subscriber, 1).await?,
        numbered(1..=1)
    );
    for n in 2..=5 {
        publish_without_pubsub(redis, "orders", &json!({ "n": n }), 2).await?;
    }
    // History keeps 5 and 6 only: 2..4 are gone, so no partial replay, but a push that makes
    // the SDK resubscribe (and learn `recovered: false`).
    publish(&mut publisher, 6).await?;
    let push = subscriber.next_push(WAIT).await?;
    assert_eq!(
        push["push"]["unsubscribe"]["code"],
        json!(INSUFFICIENT_STATE),
        "{push}"
    );
    let result = subscriber.subscribe_recover("orders", &epoch, 1).await?;
    assert_eq!(result["was_recovering"], json!(true), "{result}");
    assert_ne!(result["recovered"], json!(true), "{result}");
    assert_eq!(result["offset"], json!(6), "{result}");
    publish(&mut publisher, 7).await?;
    assert_eq!(
        next_publications(&mut subscriber, 1).await?,
        numbered(7..=7)
    );
    let metrics = node.metrics().await?;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("pgfanout_gaps_unrepaired_total")
                && l.contains("reason=\"out_of_history\"")
                && l.ends_with(" 1")),
        "one gap history could not fill:\n{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn subscribers_are_told_at_once_when_redis_comes_back_without_its_data() -> anyhow::Result<()>
{
    let mut cluster = node_with(&[]).await?;
    let mut subscriber = Client::connect(&cluster.node().ws_url()).await?;
    subscriber.subscribe("orders").await?;
    let mut publisher = Client::connect(&cluster.node().ws_url()).await?;
    publish(&mut publisher, 1).await?;
    assert_eq!(
        next_publications(&mut subscriber, 1).await?,
        numbered(1..=1)
    );

    cluster.redis.as_mut().context("Redis")?.restart().await;
    // Nothing is published: the node's catch-up after it resubscribed finds a new epoch.
    let push = subscriber.next_push(Duration::from_secs(30)).await?;
    assert_eq!(
        push["push"]["unsubscribe"]["code"],
        json!(INSUFFICIENT_STATE),
        "{push}"
    );
    let node = cluster.node();
    assert!(
        node.metric_sum("pgfanout_redis_resubscriptions_total")
            .await?
            >= 1.0
    );
    let metrics = node.metrics().await?;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("pgfanout_gaps_unrepaired_total")
                && l.contains("reason=\"epoch\"")
                && !l.ends_with(" 0")),
        "a new epoch counted:\n{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn subscribers_are_told_when_redis_comes_back_with_older_data() -> anyhow::Result<()> {
    let mut cluster = node_with(&[]).await?;
    let mut subscriber = Client::connect(&cluster.node().ws_url()).await?;
    let epoch = subscriber.subscribe("orders").await?["epoch"]
        .as_str()
        .context("epoch")?
        .to_string();
    let mut publisher = Client::connect(&cluster.node().ws_url()).await?;
    for n in 1..=3 {
        publish(&mut publisher, n).await?;
    }
    assert_eq!(
        next_publications(&mut subscriber, 3).await?,
        numbered(1..=3)
    );
    let redis = cluster.redis.as_mut().context("Redis")?;
    redis.snapshot()?;
    for n in 4..=5 {
        publish(&mut publisher, n).await?;
    }
    assert_eq!(
        next_publications(&mut subscriber, 2).await?,
        numbered(4..=5)
    );

    // Back from the snapshot: offsets 4 and 5 are gone, the epoch is the same.
    redis.restart().await;
    let push = subscriber.next_push(Duration::from_secs(30)).await?;
    assert_eq!(
        push["push"]["unsubscribe"]["code"],
        json!(INSUFFICIENT_STATE),
        "{push}"
    );
    let result = subscriber.subscribe_recover("orders", &epoch, 5).await?;
    assert_ne!(result["recovered"], json!(true), "{result}");
    assert_ne!(result["epoch"], json!(epoch), "{result}");
    let node = cluster.node();
    assert_eq!(
        node.metric_sum("pgfanout_lost_writes_detected_total")
            .await?,
        1.0
    );
    // The channel goes on in its new epoch.
    let mut publisher = Client::connect(&node.ws_url()).await?;
    publish(&mut publisher, 6).await?;
    let p = subscriber.next_pub(WAIT).await?;
    assert_eq!((p.offset, &p.data), (1, &json!({ "n": 6 })));
    Ok(())
}

/// Publications per 10 ms tick, one frame each: 600/s.
const PER_TICK: u64 = 6;
const TICK: Duration = Duration::from_millis(10);

/// Publishes `{"n": 1..=total}` from one connection at `PER_TICK` per `TICK`, each tick's
/// publications in one frame (handled in order, so offset n carries n). Returns the rate
/// achieved, from the first send to the last acknowledgement.
async fn publish_steadily(node_url: String, total: u64) -> anyhow::Result<f64> {
    let mut client = Client::connect(&node_url).await?;
    let mut tick = tokio::time::interval(TICK);
    let started = Instant::now();
    let mut next = 1;
    while next <= total {
        tick.tick().await;
        let last = (next + PER_TICK - 1).min(total);
        let frame: Vec<String> = (next..=last)
            .map(|n| {
                json!({"id": 1000 + n, "publish": {"channel": "orders", "data": {"n": n}}})
                    .to_string()
            })
            .collect();
        client.send_raw(&frame.join("\n")).await?;
        for n in next..=last {
            let reply = client.next_reply(1000 + n).await?;
            ensure!(reply.get("error").is_none(), "publish {n}: {reply}");
        }
        next = last + 1;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

#[tokio::test]
async fn plain_clients_on_every_node_get_everything_while_the_redis_subscribers_are_killed(
) -> anyhow::Result<()> {
    const TOTAL: u64 = 3000;
    let cluster = Cluster::start_with(
        2,
        &["orders"],
        true,
        &[("PGFANOUT_ALLOW_ANONYMOUS_PUBLISH", "true")],
    )
    .await;
    cluster.wait_bridged().await?;
    let redis = cluster.redis.as_ref().context("Redis")?;
    // Two plain clients on node 0 (where the publisher is) and one on node 1. A plain client:
    // any push but a publication (such as unsubscribe 2500) fails the test.
    let mut readers = Vec::new();
    for node in [0, 0, 1] {
        let mut subscriber = Client::connect(&cluster.nodes[node].ws_url()).await?;
        subscriber.subscribe("orders").await?;
        readers.push(tokio::spawn(async move {
            next_publications(&mut subscriber, TOTAL as usize)
                .await
                .map(|got| (got, subscriber))
        }));
    }
    let publisher = tokio::spawn(publish_steadily(cluster.nodes[0].ws_url(), TOTAL));

    // Each kill cuts the subscriber connection of both nodes (their publishing connections stay).
    let mut kills = 0;
    while !publisher.is_finished() {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let reply = redis.command("CLIENT KILL TYPE pubsub")?;
        kills += u32::from(reply.starts_with(':') && !reply.starts_with(":0"));
    }
    let rate = publisher.await??;
    for (i, reader) in readers.into_iter().enumerate() {
        let (received, mut subscriber) = reader.await?.with_context(|| format!("client {i}"))?;
        if received != numbered(1..=TOTAL) {
            let offsets: Vec<u64> = received.iter().map(|(o, _)| *o).collect();
            bail!("client {i}: not every publication once in order: {offsets:?}");
        }
        subscriber.expect_no_pub(Duration::from_millis(300)).await?;
    }

    let mut report = Vec::new();
    for node in &cluster.nodes {
        let resubscriptions = node
            .metric_sum("pgfanout_redis_resubscriptions_total")
            .await?;
        let repaired = node.metric_sum("pgfanout_gaps_repaired_total").await?;
        let unrepaired = node.metric_sum("pgfanout_gaps_unrepaired_total").await?;
        let metrics = node.metrics().await?;
        let replayed = metrics
            .lines()
            .find(|l| l.starts_with("pgfanout_messages_replayed_total") && l.contains("repair"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        report.push(format!(
            "{}: {resubscriptions} resubscriptions, {repaired} gaps repaired, {replayed} \
             publications replayed",
            node.id()
        ));
        ensure!(resubscriptions >= 10.0, "{}", report.join("; "));
        ensure!(
            unrepaired == 0.0,
            "gaps left unrepaired: {}",
            report.join("; ")
        );
        ensure!(
            replayed > 0.0,
            "no kill made the node miss anything: {}",
            report.join("; ")
        );
    }
    eprintln!(
        "{TOTAL} publications at {rate:.0}/s; {kills} kills; {}",
        report.join("; ")
    );
    // What makes the run count is that kills hit subscribers while publications flowed (and
    // that some made a node miss publications, checked above), not how fast this machine
    // published: a slower publisher only means more kills per publication.
    ensure!(kills >= 10, "only {kills} kills hit a subscriber");
    Ok(())
}
