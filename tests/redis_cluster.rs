//! The bus on a Redis Cluster (`PGFANOUT_REDIS_CLUSTER=true`), on local clusters of real
//! `redis-server` processes ([`common::RedisCluster`]):
//! - three gateway nodes on 3 masters deliver 10,000 publications of 100 channels exactly
//!   once and in order over sharded pub/sub, with the channels spread over the masters;
//! - a busy channel's slot migrates during traffic (IMPORTING/MIGRATING, MIGRATE,
//!   SETSLOT NODE) and both nodes' subscribers still get everything once, in order;
//! - a master dies and its replica takes over (3 + 3): delivery resumes, gaps are read from
//!   history;
//! - a master dies with publications its replica never got (the replica paused with
//!   `CLIENT PAUSE`), and the promoted replica hands their offsets out again: every
//!   subscriber is told (2500, then `recovered: false` in a new epoch), none skips silently;
//! - NOTIFY ingest (shard leases, the two-step fence), the outbox, and shared limits work
//!   unchanged; the fence itself is checked in-process.

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

/// Per channel the `i`s acknowledged, and how many publish attempts failed (and were retried).
type Acked = (BTreeMap<String, Vec<u64>>, u64);

/// Publishes `{"i": i}` on `channels` round robin through `node`, each with its own
/// idempotency key and retried until the bus accepts it (a retry after an unknown outcome
/// publishes once), until `stop` is set. Returns, per channel, the `i`s acknowledged, and
/// how many attempts failed.
fn publish_until(
    node: &Node,
    channels: Vec<String>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<anyhow::Result<Acked>> {
    let url = node.http_url("/api/publish");
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let mut acked: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut failures = 0;
        let mut i = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let channel = &channels[(i % channels.len() as u64) as usize];
            let n = i / channels.len() as u64;
            let body =
                json!({"channel": channel, "data": {"i": n}, "idempotency_key": format!("m{i}")});
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let sent = http
                    .post(&url)
                    .header("authorization", format!("apikey {KEY}"))
                    .json(&body)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => break,
                    _ if Instant::now() < deadline => {
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => bail!("publication {i} not accepted within 20 s"),
                }
            }
            acked.entry(channel.clone()).or_default().push(n);
            i += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok((acked, failures))
    })
}

/// Reads publications until `expected` arrived (set once publishing stopped) or `deadline`.
fn collect_until(
    mut client: Client,
    expected: tokio::sync::watch::Receiver<Option<usize>>,
    deadline: Duration,
) -> tokio::task::JoinHandle<Vec<common::Publication>> {
    tokio::spawn(async move {
        let end = Instant::now() + deadline;
        let mut got = Vec::new();
        while Instant::now() < end {
            if expected.borrow().is_some_and(|n| got.len() >= n) {
                break;
            }
            if let Ok(p) = client.next_pub(Duration::from_millis(200)).await {
                got.push(p);
            }
        }
        got
    })
}

/// Moves `slot` from its master to `to` the way `redis-cli --cluster reshard` does:
/// IMPORTING on the target, MIGRATING on the source, MIGRATE every key, then SETSLOT NODE
/// everywhere. Returns how many keys moved.
async fn migrate_slot(
    redis: &RedisCluster,
    slot: u16,
    from: u16,
    to: u16,
) -> anyhow::Result<usize> {
    let (from_id, to_id) = (redis.id_of(from).await?, redis.id_of(to).await?);
    let slot_arg = slot.to_string();
    let ok = |reply: String, what: &str| {
        ensure!(reply.trim() == "OK", "{what}: {reply}");
        Ok(())
    };
    ok(
        redis
            .cli(
                to,
                &["CLUSTER", "SETSLOT", &slot_arg, "IMPORTING", &from_id],
            )
            .await?,
        "importing",
    )?;
    ok(
        redis
            .cli(
                from,
                &["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &to_id],
            )
            .await?,
        "migrating",
    )?;
    let mut moved = 0;
    loop {
        let keys = redis
            .cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot_arg, "1000"])
            .await?;
        let keys: Vec<&str> = keys
            .lines()
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .collect();
        if keys.is_empty() {
            break;
        }
        let port = to.to_string();
        let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
        args.extend(keys.iter().copied());
        ok(redis.cli(from, &args).await?, "migrate")?;
        moved += keys.len();
    }
    ok(
        redis
            .cli(to, &["CLUSTER", "SETSLOT", &slot_arg, "NODE", &to_id])
            .await?,
        "node on target",
    )?;
    ok(
        redis
            .cli(from, &["CLUSTER", "SETSLOT", &slot_arg, "NODE", &to_id])
            .await?,
        "node on source",
    )?;
    for master in redis.masters().await? {
        if master != from && master != to {
            redis
                .cli(master, &["CLUSTER", "SETSLOT", &slot_arg, "NODE", &to_id])
                .await?;
        }
    }
    Ok(moved)
}

/// Every subscriber's stream of every channel, checked against what was acknowledged:
/// exactly once and in order.
fn check_streams(
    who: &str,
    got: &[common::Publication],
    acked: &BTreeMap<String, Vec<u64>>,
) -> anyhow::Result<()> {
    let streams = by_channel(got);
    for (channel, acked) in acked {
        let stream = streams.get(channel).map(Vec::as_slice).unwrap_or_default();
        exactly_once_in_order(channel, stream, acked.len() as u64)
            .with_context(|| format!("subscriber on {who}"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_channel_keeps_delivering_while_its_slot_migrates() -> anyhow::Result<()> {
    let redis = RedisCluster::start(3, 0).await;
    let nodes = gateways(&redis, 2, None).await;
    let channel = "busy";
    let (expected_tx, expected) = tokio::sync::watch::channel(None);
    let mut readers = Vec::new();
    for node in &nodes {
        let mut client = Client::connect(&node.ws_url()).await?;
        client.subscribe(channel).await?;
        readers.push(collect_until(
            client,
            expected.clone(),
            Duration::from_secs(40),
        ));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = publish_until(&nodes[0], vec![channel.to_string()], stop.clone());

    tokio::time::sleep(Duration::from_secs(1)).await;
    let slot = redis.slot_of(channel).await?;
    let any = redis.running()[0];
    let from = redis.master_of_slot(any, slot).await?;
    let to = *redis
        .masters()
        .await?
        .iter()
        .find(|m| **m != from)
        .context("another master")?;
    let started = Instant::now();
    let moved = migrate_slot(&redis, slot, from, to).await?;
    let migrated_in = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, failures) = publisher.await??;
    let total = acked.values().map(Vec::len).sum::<usize>();
    expected_tx.send(Some(total))?;

    ensure!(
        redis.master_of_slot(to, slot).await? == to,
        "slot {slot} did not move to :{to}"
    );
    let meta_on_target = redis.cli(to, &["EXISTS", "pgfanout:{busy}:meta"]).await?;
    ensure!(
        meta_on_target.trim() == "1",
        "the channel's keys are not on the target"
    );
    for (reader, node) in readers.into_iter().zip(&nodes) {
        let got = reader.await?;
        check_streams(node.id(), &got, &acked)?;
    }
    let mut changes = Vec::new();
    for node in &nodes {
        changes.push(
            node.metric_sum("pgfanout_redis_topology_changes_total")
                .await?,
        );
    }
    println!(
        "slot {slot} of {channel:?} moved :{from} -> :{to} ({moved} keys) in {migrated_in:?} \
         during traffic; {total} publications, {failures} publish attempts retried, every one \
         delivered once in order on both nodes; topology changes seen per node {changes:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delivery_resumes_after_a_master_dies_and_its_replica_takes_over() -> anyhow::Result<()> {
    let mut redis = RedisCluster::start(3, 1).await;
    let nodes = gateways(&redis, 2, None).await;
    let channels: Vec<String> = (0..6).map(|c| format!("f{c}")).collect();
    let (expected_tx, expected) = tokio::sync::watch::channel(None);
    let mut readers = Vec::new();
    for node in &nodes {
        let mut client = Client::connect(&node.ws_url()).await?;
        for channel in &channels {
            client.subscribe(channel).await?;
        }
        readers.push(collect_until(
            client,
            expected.clone(),
            Duration::from_secs(45),
        ));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = publish_until(&nodes[0], channels.clone(), stop.clone());

    tokio::time::sleep(Duration::from_secs(1)).await;
    let slot = redis.slot_of(&channels[0]).await?;
    let victim = redis.master_of_slot(redis.running()[0], slot).await?;
    let killed = Instant::now();
    redis.kill(victim);
    redis.wait_healthy(3).await?;
    let promoted = redis.master_of_slot(redis.running()[0], slot).await?;
    let failed_over_in = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, failures) = publisher.await??;
    let total = acked.values().map(Vec::len).sum::<usize>();
    expected_tx.send(Some(total))?;

    let mut report = Vec::new();
    for (reader, node) in readers.into_iter().zip(&nodes) {
        let got = reader.await?;
        check_streams(node.id(), &got, &acked)?;
        report.push(format!(
            "{}: {} received, gaps repaired {}",
            node.id(),
            got.len(),
            node.metric_sum("pgfanout_gaps_repaired_total").await?
        ));
    }
    println!(
        "master :{victim} of slot {slot} killed; replica :{promoted} serves it after \
         {failed_over_in:?}; {total} publications acknowledged ({failures} attempts retried \
         during the failover), all delivered once in order: {}",
        report.join("; ")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_limits_hold_across_nodes_on_the_cluster() -> anyhow::Result<()> {
    use common::tokens::{self, hs256, SECRET};
    let redis = RedisCluster::start(3, 0).await;
    let tag = &common::random_tag()[..6];
    let mut nodes = Vec::new();
    for index in 0..3 {
        nodes.push(
            Node::builder()
                .node_id(format!("l{index}-{tag}"))
                .env("PGFANOUT_REDIS_URL", &redis.seeds())
                .env("PGFANOUT_REDIS_CLUSTER", "true")
                .env("PGFANOUT_ALLOW_ANONYMOUS", "false")
                .env("PGFANOUT_TOKEN_HMAC_SECRET_KEY", SECRET)
                .env("PGFANOUT_LIMITS_ABUSE_THRESHOLD", "0")
                .env("PGFANOUT_LIMIT_CONNECTIONS_PER_USER", "5")
                .env("PGFANOUT_LIMIT_SUBSCRIBE_PER_SECOND", "10")
                .start()
                .await,
        );
    }
    let token = |user: &str| hs256(&tokens::user(user, 600, &["*"], &["*"]));

    // Connections per user: five anywhere, the sixth refused on every node. Users whose
    // keys live in other slots are counted apart (and released in per-slot pipelines).
    let mut open = Vec::new();
    for i in 0..5 {
        open.push(Client::connect_with_token(&nodes[i % 3].ws_url(), &token("five")).await?);
    }
    let mut others = Vec::new();
    for (i, user) in ["u-a", "u-b", "u-c", "u-d"].iter().enumerate() {
        others.push(Client::connect_with_token(&nodes[i % 3].ws_url(), &token(user)).await?);
    }
    for node in &nodes {
        let mut sixth = Client::open(&node.ws_url()).await?;
        sixth
            .send_json(&json!({"id": 1, "connect": {"token": token("five")}}))
            .await?;
        let (code, _) = sixth.expect_close(Duration::from_secs(10)).await?;
        ensure!(
            code == 3504,
            "sixth connection on {} closed with {code}",
            node.id()
        );
    }
    for client in others {
        client.close().await;
    }
    open.pop().context("five open")?.close().await;
    common::eventually(
        Duration::from_secs(10),
        "a connection after one closed",
        || async {
            Client::connect_with_token(&nodes[2].ws_url(), &token("five"))
                .await
                .map_err(|e| format!("{e:#}"))
        },
    )
    .await?;

    // Subscribes: at most 10 per second across the three nodes together.
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(Client::connect_with_token(&node.ws_url(), &token("spreader")).await?);
    }
    let started = Instant::now();
    for (n, client) in clients.iter_mut().enumerate() {
        let frame: Vec<String> = (0..60)
            .filter(|i| i % 3 == n)
            .map(|i| json!({"id": 100 + i, "subscribe": {"channel": format!("c{i}")}}).to_string())
            .collect();
        client.send_raw(&frame.join("\n")).await?;
    }
    let mut accepted = 0;
    for (n, client) in clients.iter_mut().enumerate() {
        for i in (0..60u64).filter(|i| i % 3 == n as u64) {
            if client.next_reply(100 + i).await?.get("error").is_none() {
                accepted += 1;
            }
        }
    }
    let spans = 1 + started.elapsed().as_secs() as usize;
    ensure!(
        (1..=10 * spans).contains(&accepted),
        "{accepted} subscribes accepted across the nodes in {spans} s"
    );
    let mut shared = 0.0;
    for node in &nodes {
        shared += node
            .metric_where("pgfanout_rate_limit_decisions_total", "scope=\"shared\"")
            .await?;
    }
    ensure!(shared >= 60.0, "decisions made in Redis: {shared}");
    println!("limits on the cluster: 5 connections per user held; {accepted} of 60 subscribes accepted in {spans} s (limit 10/s), {shared} shared decisions");
    Ok(())
}

/// A node's Redis bus on `redis`, without a node around it: its tasks stop when the token is
/// cancelled and the tracker waited for.
async fn bus_on(
    redis: &RedisCluster,
) -> anyhow::Result<(
    pgfanout::bus::redis::RedisBus,
    tokio_util::task::TaskTracker,
    tokio_util::sync::CancellationToken,
)> {
    use pgfanout::bus::redis::{RedisBus, Target};
    let seeds: Vec<String> = redis.seeds().split(',').map(str::to_owned).collect();
    let tracker = tokio_util::task::TaskTracker::new();
    let cancel = tokio_util::sync::CancellationToken::new();
    let history = std::sync::Arc::new(pgfanout::bus::HistoryPolicy::uniform(
        100,
        Duration::from_secs(60),
        Duration::from_secs(600),
    ));
    let hub = std::sync::Arc::new(pgfanout::hub::Hub::new());
    let bus = RedisBus::connect_to(
        Target::Cluster(&seeds),
        hub,
        history,
        &tracker,
        cancel.clone(),
    )
    .await?;
    Ok((bus, tracker, cancel))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_fence_holds_across_slots() -> anyhow::Result<()> {
    use pgfanout::bus::{Fence, FenceRecord, PublishOutcome, PublishRequest, Source};
    let redis = RedisCluster::start(3, 0).await;
    let (bus, tracker, cancel) = bus_on(&redis).await?;
    // The lease and the channel live on different masters.
    let lease = "pgfanout:{ingest}:lease:3";
    let any = redis.running()[0];
    let lease_master = redis
        .master_of_slot(any, pgfanout::bus::slot::of(b"ingest"))
        .await?;
    let mut channel = None;
    for i in 0..100 {
        let c = format!("fenced{i}");
        let slot = pgfanout::bus::slot::of(c.as_bytes());
        if redis.master_of_slot(any, slot).await? != lease_master {
            channel = Some(c);
            break;
        }
    }
    let channel = channel.context("a channel on another master")?;
    redis
        .cli(any, &["-c", "SET", lease, "mine", "PX", "10000"])
        .await?;
    let fence = |token: &str, value: &str| Fence {
        key: lease.to_string(),
        token: token.to_string(),
        record: Some(FenceRecord {
            key: "pgfanout:{ingest}:pos:3".to_string(),
            value: value.to_string(),
        }),
    };
    let publish = |fence: Fence| {
        let bus = bus.clone();
        let channel = channel.clone();
        async move {
            bus.publish(PublishRequest {
                channel: &channel,
                data: bytes::Bytes::from_static(b"{}"),
                idempotency_key: None,
                fence: Some(&fence),
                source: Source::Notify,
                received_at: None,
            })
            .await
        }
    };
    let first = publish(fence("mine", "m1:1")).await?;
    ensure!(
        matches!(first, PublishOutcome::Published { offset: 1, .. }),
        "{first:?}"
    );
    let record = redis
        .cli(any, &["-c", "GET", "pgfanout:{ingest}:pos:3"])
        .await?;
    ensure!(record.trim() == "m1:1", "record after publishing: {record}");
    // A retry of the same position is a duplicate (the dedupe key in the channel's slot).
    let retry = publish(fence("mine", "m1:1")).await?;
    ensure!(
        matches!(retry, PublishOutcome::Duplicate { .. }),
        "{retry:?}"
    );
    // Another token is fenced, and so is ours once the lease is about to expire.
    let stale = publish(fence("someone-else", "m1:2")).await?;
    ensure!(stale == PublishOutcome::Fenced, "{stale:?}");
    redis.cli(any, &["-c", "PEXPIRE", lease, "100"]).await?;
    let expiring = publish(fence("mine", "m1:2")).await?;
    ensure!(
        expiring == PublishOutcome::Fenced,
        "inside the clock margin: {expiring:?}"
    );
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_batch_across_slots_records_its_settled_prefix() -> anyhow::Result<()> {
    use pgfanout::bus::{Fence, FenceRecord, PublishOutcome, PublishRequest, Source};
    let redis = RedisCluster::start(3, 0).await;
    let (bus, tracker, cancel) = bus_on(&redis).await?;
    // Two channels on two different masters.
    let any = redis.running()[0];
    let mut by_master: BTreeMap<u16, String> = BTreeMap::new();
    for i in 0..100 {
        let c = format!("batch{i}");
        let master = redis
            .master_of_slot(any, pgfanout::bus::slot::of(c.as_bytes()))
            .await?;
        by_master.entry(master).or_insert(c);
        if by_master.len() == 2 {
            break;
        }
    }
    let channels: Vec<String> = by_master.into_values().collect();
    ensure!(channels.len() == 2, "two masters");
    let lease = "pgfanout:{ingest}:lease:5";
    let record = "pgfanout:{ingest}:pos:5";
    redis
        .cli(any, &["-c", "SET", lease, "mine", "PX", "10000"])
        .await?;
    let fences: Vec<Fence> = (1..=4)
        .map(|n| Fence {
            key: lease.to_string(),
            token: "mine".to_string(),
            record: Some(FenceRecord {
                key: record.to_string(),
                value: format!("m {n}"),
            }),
        })
        .collect();
    let (a, b) = (channels[0].as_str(), channels[1].as_str());
    let order = [a, b, a, b];
    let requests: Vec<PublishRequest<'_>> = order
        .iter()
        .zip(&fences)
        .map(|(channel, fence)| PublishRequest {
            channel,
            data: bytes::Bytes::from_static(b"{}"),
            idempotency_key: None,
            fence: Some(fence),
            source: Source::Notify,
            received_at: None,
        })
        .collect();
    let offsets = |outcomes: &[Result<PublishOutcome, pgfanout::bus::BusError>]| {
        outcomes
            .iter()
            .map(|o| match o {
                Ok(PublishOutcome::Published { offset, .. }) => format!("P{offset}"),
                Ok(PublishOutcome::Duplicate { .. }) => "D".to_string(),
                other => format!("{other:?}"),
            })
            .collect::<Vec<_>>()
    };
    let first = bus.publish_batch(&requests[..3]).await;
    ensure!(
        offsets(&first) == ["P1", "P1", "P2"],
        "{:?}",
        offsets(&first)
    );
    let recorded = redis.cli(any, &["-c", "GET", record]).await?;
    ensure!(
        recorded.trim() == "m 3",
        "record after the batch: {recorded}"
    );
    // A retry (or a takeover republishing from an older record) only adds what is new.
    let retry = bus.publish_batch(&requests).await;
    ensure!(
        offsets(&retry) == ["D", "D", "D", "P2"],
        "{:?}",
        offsets(&retry)
    );
    let recorded = redis.cli(any, &["-c", "GET", record]).await?;
    ensure!(
        recorded.trim() == "m 4",
        "record after the retry: {recorded}"
    );
    // Another holder's token: every publication is fenced, nothing recorded.
    redis
        .cli(any, &["-c", "SET", lease, "theirs", "PX", "10000"])
        .await?;
    let fenced = bus.publish_batch(&requests).await;
    ensure!(
        fenced.iter().all(|o| matches!(
            o,
            Ok(PublishOutcome::Fenced) | Err(pgfanout::bus::BusError::NotAttempted)
        )),
        "{fenced:?}"
    );
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_events_are_published_once_on_the_cluster() -> anyhow::Result<()> {
    let db = TestDb::create().await;
    let redis = RedisCluster::start(3, 0).await;
    let nodes = gateways(&redis, 2, Some(&db)).await;
    let mut clients = Vec::new();
    for node in &nodes {
        node.wait_ready(Duration::from_secs(30)).await?;
        let mut client = Client::connect(&node.ws_url()).await?;
        client.subscribe("evts").await?;
        clients.push(client);
    }
    db.execute(
        "SELECT pgfanout.publish('evts', jsonb_build_object('i', g)) \
         FROM generate_series(0, 49) AS g",
    )
    .await?;
    for client in &mut clients {
        let mut stream = Vec::new();
        for _ in 0..50 {
            let p = client.next_pub(Duration::from_secs(15)).await?;
            stream.push((p.offset, p.data["i"].as_u64().unwrap_or(u64::MAX)));
        }
        exactly_once_in_order("evts", &stream, 50)?;
        client.expect_no_pub(Duration::from_millis(500)).await?;
    }
    Ok(())
}

/// Publishes `{"i": i}` on `channel` through `node`'s API, retrying (with an idempotency key)
/// until the bus accepts it; returns its (offset, epoch).
async fn publish_acked(
    http: &reqwest::Client,
    node: &Node,
    channel: &str,
    i: u64,
) -> anyhow::Result<(u64, String)> {
    let body =
        json!({"channel": channel, "data": {"i": i}, "idempotency_key": format!("{channel}-{i}")});
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match post(http, node, &body).await {
            Ok(reply) => {
                let result = &reply["result"];
                let offset = result["offset"].as_u64().context("offset")?;
                return Ok((offset, result["epoch"].as_str().unwrap_or("").to_string()));
            }
            // Refused or unreachable while the cluster fails over: the same key publishes once.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.context(format!("publication {i} not accepted in 30 s"))),
        }
    }
}

/// What a subscriber saw after the failover: the `i`s of the publications it received, and
/// whether it was told to resubscribe (unsubscribe push 2500) instead.
async fn after_failover(
    client: &mut Client,
    channel: &str,
    want: &[u64],
) -> anyhow::Result<(Vec<u64>, bool)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while Instant::now() < deadline && !want.iter().all(|i| got.contains(i)) {
        let Ok(push) = client.next_push(deadline - Instant::now()).await else {
            break;
        };
        let push = &push["push"];
        if push["channel"] != json!(channel) {
            continue;
        }
        if let Some(i) = push["pub"]["data"]["i"].as_u64() {
            got.push(i);
        } else if push.get("unsubscribe").is_some() {
            ensure!(
                push["unsubscribe"]["code"] == json!(2500),
                "unexpected unsubscribe push: {push}"
            );
            return Ok((got, true));
        }
    }
    Ok((got, false))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_a_failover_lost_are_reported_never_skipped() -> anyhow::Result<()> {
    let mut redis = RedisCluster::start(3, 1).await;
    let nodes = gateways(&redis, 2, None).await;
    let channel = "lossy";
    let http = reqwest::Client::new();
    let mut clients = Vec::new();
    let mut epoch = String::new();
    for node in &nodes {
        let mut client = Client::connect(&node.ws_url()).await?;
        let result = client.subscribe(channel).await?;
        epoch = result["epoch"].as_str().context("epoch")?.to_string();
        clients.push(client);
    }
    let slot = redis.slot_of(channel).await?;
    let master = redis.master_of_slot(redis.running()[0], slot).await?;
    let replica = *redis
        .replicas_of(master)
        .await?
        .first()
        .context("a replica")?;
    let offset_of = |i: u64| i + 1;

    // 0..3: published, delivered and replicated.
    for i in 0..3 {
        let (offset, e) = publish_acked(&http, &nodes[0], channel, i).await?;
        ensure!(
            offset == offset_of(i) && e == epoch,
            "{i} at {offset} in {e}"
        );
    }
    let written = redis
        .replication_offset(master, "master_repl_offset")
        .await?;
    common::eventually(Duration::from_secs(10), "the replica in sync", || async {
        match redis.replication_offset(replica, "slave_repl_offset").await {
            Ok(at) if at >= written => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await?;

    // 3..6: acknowledged and delivered live while the replica applies nothing (CLIENT PAUSE
    // holds the commands of its master link too; nothing, not even CLIENT UNPAUSE, is
    // answered until it ends), then the master dies with them. The replica drops the dead
    // link, and what it had not applied, at once, and takes over meanwhile.
    let pause = Duration::from_secs(3);
    let pause_ms = pause.as_millis().to_string();
    let paused_at = Instant::now();
    let paused = redis
        .cli(replica, &["CLIENT", "PAUSE", &pause_ms, "ALL"])
        .await?;
    ensure!(paused.trim() == "OK", "CLIENT PAUSE: {paused}");
    for i in 3..6 {
        let (offset, e) = publish_acked(&http, &nodes[0], channel, i).await?;
        ensure!(
            offset == offset_of(i) && e == epoch,
            "{i} at {offset} in {e}"
        );
    }
    for client in &mut clients {
        let mut stream = Vec::new();
        for _ in 0..6 {
            let p = client.next_pub(Duration::from_secs(10)).await?;
            stream.push((p.offset, p.data["i"].as_u64().unwrap_or(u64::MAX)));
        }
        exactly_once_in_order(channel, &stream, 6)?;
    }
    ensure!(
        paused_at.elapsed() < pause,
        "publishing took longer than the pause"
    );
    redis.kill(master);
    tokio::time::sleep(pause.saturating_sub(paused_at.elapsed()) + Duration::from_millis(200))
        .await;
    redis.wait_healthy(3).await?;
    ensure!(
        redis.master_of_slot(replica, slot).await? == replica,
        "the replica :{replica} did not take slot {slot} over"
    );
    let meta = redis
        .cli(
            replica,
            &["HMGET", &format!("pgfanout:{{{channel}}}:meta"), "e", "o"],
        )
        .await?;
    let meta: Vec<&str> = meta.lines().map(str::trim).collect();
    ensure!(
        meta == [epoch.as_str(), "3"] || meta.first().is_some_and(|e| *e != epoch),
        "the promoted replica should have lost offsets 4..6 (it has {meta:?}): no lost write \
         to test"
    );

    // 6..9: acknowledged after the failover, on offsets the subscribers already had.
    let mut after = Vec::new();
    for i in 6..9 {
        after.push(publish_acked(&http, &nodes[0], channel, i).await?);
    }
    let want: Vec<u64> = (6..9).collect();
    let mut told = 0;
    for (client, node) in clients.iter_mut().zip(&nodes) {
        let (got, resubscribe) = after_failover(client, channel, &want).await?;
        ensure!(
            resubscribe || want.iter().all(|i| got.contains(i)),
            "subscriber on {}: received {got:?} of {want:?} published after the failover \
             ({after:?}) and was not told it missed anything",
            node.id()
        );
        if resubscribe {
            // What the SDK does next: recover from its position, which the bus no longer
            // has: it must hear so, and reload.
            let result = client.subscribe_recover(channel, &epoch, 6).await?;
            ensure!(result["recovered"] != json!(true), "{result}");
            ensure!(result["epoch"] != json!(epoch), "same epoch: {result}");
            told += 1;
        }
    }
    ensure!(told > 0, "no subscriber was told");
    // A client that saw offset 6 and comes back anywhere is not told it missed nothing.
    let mut late = Client::connect(&nodes[1].ws_url()).await?;
    let result = late.subscribe_recover(channel, &epoch, 6).await?;
    ensure!(
        result["recovered"] != json!(true),
        "recovering from the lost offset 6 answered {result}"
    );
    let mut detected = 0.0;
    for node in &nodes {
        detected += node
            .metric_sum("pgfanout_lost_writes_detected_total")
            .await?;
    }
    ensure!(detected >= 1.0, "lost writes detected: {detected}");

    // And the channel goes on in its new epoch.
    let (offset, new_epoch) = publish_acked(&http, &nodes[0], channel, 9).await?;
    ensure!(new_epoch != epoch, "still the lost epoch");
    for client in &mut clients {
        let p = client.next_pub(Duration::from_secs(10)).await?;
        ensure!(p.data["i"] == json!(9) && p.offset == offset, "{p:?}");
    }
    println!(
        "master :{master} died with offsets 4..6 of {channel:?} unreplicated; :{replica} took \
         over at offset 3; publications after it: {after:?}; {told} subscribers told \
         (2500, recovered:false), {detected} detections; next publication at offset {offset} \
         of a new epoch"
    );
    Ok(())
}
