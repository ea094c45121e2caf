//! No single point of failure for raw channels (G1, G2): three nodes LISTEN, a producer sends
//! 20,000 `pg_notify` at over 1,000/s on four channels, the owner of a busy shard is SIGKILLed
//! mid-run, later another node is killed and restarted. Every subscriber (those whose node died
//! resubscribe elsewhere with recovery) ends with every sequence number exactly once, in order,
//! at offsets 1, 2, 3, … of its channel.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use common::{Client, Cluster};
use serde_json::Value;
use tokio::time::Instant;

const CHANNELS: [&str; 4] = ["chaos_a", "chaos_b", "chaos_c", "chaos_d"];
const NOTIFICATIONS: u64 = 20_000;
/// Notifications per transaction, one transaction per tick.
const BATCH: u64 = 20;
const TICK: Duration = Duration::from_millis(10);
/// Short leases: a dead owner's shards move within about this long.
const LEASE_TTL: &str = "1500ms";
/// History deep enough that a subscriber whose node died can recover everything it missed.
const HISTORY: &str = "20000";
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(90);

/// What a subscriber received on one channel: (offset, data), in arrival order.
pub type Received = BTreeMap<String, Vec<(u64, Value)>>;

/// A client subscribed to some channels on one node, that follows them across node deaths.
pub struct Follower {
    urls: Vec<String>,
    home: usize,
    channels: Vec<String>,
    client: Client,
    epochs: BTreeMap<String, String>,
}

impl Follower {
    /// Subscribes to `channels` on the node at `urls[home]` (before anything is published).
    pub async fn start(
        urls: Vec<String>,
        home: usize,
        channels: Vec<String>,
    ) -> anyhow::Result<Self> {
        let mut client = Client::connect(&urls[home]).await?;
        let mut epochs = BTreeMap::new();
        for channel in &channels {
            let result = client.subscribe(channel).await?;
            let epoch = result["epoch"].as_str().unwrap_or_default().to_string();
            anyhow::ensure!(
                !epoch.is_empty(),
                "subscribe result without epoch: {result}"
            );
            epochs.insert(channel.clone(), epoch);
        }
        Ok(Self {
            urls,
            home,
            channels,
            client,
            epochs,
        })
    }

    /// Follows until `expected` publications arrived on each channel; see [`follow`].
    pub async fn run(self, expected: usize) -> anyhow::Result<Received> {
        follow(self, expected).await
    }
}

/// Reads until `expected` publications arrived on each channel; when its node goes away it
/// resubscribes on the next node that answers, with recovery from the last offset it saw
/// (which must succeed).
async fn follow(follower: Follower, expected: usize) -> anyhow::Result<Received> {
    let Follower {
        urls,
        home,
        channels,
        mut client,
        mut epochs,
    } = follower;
    let deadline = Instant::now() + FOLLOW_TIMEOUT;
    let mut received: Received = channels.iter().map(|c| (c.clone(), Vec::new())).collect();
    let mut at = home;
    let done = |r: &Received| r.values().all(|v| v.len() >= expected);
    while !done(&received) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "follower from node {home} timed out: {}",
            summary(&received)
        );
        match client.next_pub(Duration::from_secs(1)).await {
            Ok(p) => {
                received
                    .get_mut(&p.channel)
                    .with_context(|| format!("publication on {}", p.channel))?
                    .push((p.offset, p.data));
                continue;
            }
            Err(_) if client.close_frame().is_none() => continue,
            Err(_) => {}
        }
        // Our node is gone: the next one that answers, recovering every channel.
        eprintln!(
            "follower from node {home} lost node {at}: {}",
            summary(&received)
        );
        client = loop {
            anyhow::ensure!(Instant::now() < deadline, "no node to resubscribe to");
            at = (at + 1) % urls.len();
            match Client::connect(&urls[at]).await {
                Ok(c) => {
                    eprintln!("follower from node {home} resubscribes on node {at}");
                    break c;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        for channel in &channels {
            let got = &received[channel];
            let offset = got.last().map_or(0, |(o, _)| *o);
            let epoch = epochs[channel].clone();
            let result = client.subscribe_recover(channel, &epoch, offset).await?;
            anyhow::ensure!(
                result["recovered"] == Value::Bool(true),
                "recovery of {channel} from {offset} on {} failed: {result}",
                urls[at]
            );
            if let Some(e) = result["epoch"].as_str() {
                epochs.insert(channel.clone(), e.to_string());
            }
            for p in result["publications"]
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                let offset = p["offset"].as_u64().unwrap_or(0);
                let data = p.get("data").cloned().unwrap_or(Value::Null);
                received
                    .get_mut(channel)
                    .expect("known channel")
                    .push((offset, data));
            }
        }
    }
    client.expect_no_pub(Duration::from_millis(500)).await?;
    Ok(received)
}

/// Per channel: how many arrived and the first offsets missing or repeated.
fn summary(received: &Received) -> String {
    received
        .iter()
        .map(|(c, v)| {
            let mut offsets: Vec<u64> = v.iter().map(|(o, _)| *o).collect();
            offsets.sort_unstable();
            let top = offsets.last().copied().unwrap_or(0);
            let missing: Vec<u64> = (1..=top)
                .filter(|o| offsets.binary_search(o).is_err())
                .take(10)
                .collect();
            let repeated = offsets.windows(2).filter(|w| w[0] == w[1]).count();
            format!(
                "{c}: {} (top {top}, missing {missing:?}, repeated {repeated})",
                v.len()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Every problem with one follower's channel: offsets must run 1, 2, 3, … and carry `want`.
pub fn check(name: &str, channel: &str, got: &[(u64, Value)], want: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    if got.len() != want.len() {
        problems.push(format!(
            "{name}: {channel}: {} publications, expected {}",
            got.len(),
            want.len()
        ));
    }
    for (i, (offset, data)) in got.iter().enumerate() {
        if *offset != i as u64 + 1 || want.get(i) != Some(data) {
            problems.push(format!(
                "{name}: {channel}: publication #{} is offset {offset} with {data}, expected {:?}",
                i + 1,
                want.get(i)
            ));
            break;
        }
    }
    problems
}

/// The node id whose process holds the lease of `shard` (its token starts with the id).
async fn owner_of(cluster: &Cluster, shard: usize) -> anyhow::Result<usize> {
    let redis = cluster.redis.as_ref().context("redis")?;
    common::eventually(Duration::from_secs(10), "a lease holder", || async {
        let reply = redis
            .command(&format!("GET pgfanout:{{ingest}}:lease:{shard}"))
            .map_err(|e| e.to_string())?;
        cluster
            .nodes
            .iter()
            .position(|n| reply.contains(&format!("{}-", n.id())))
            .ok_or(reply)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_channels_lose_and_repeat_nothing_when_owners_die() -> anyhow::Result<()> {
    let env = [
        ("PGFANOUT_LEASE_TTL", LEASE_TTL),
        ("PGFANOUT_HISTORY_SIZE", HISTORY),
        ("PGFANOUT_RECOVERY_MAX_PUBLICATIONS", HISTORY),
    ];
    let mut cluster = Cluster::start_with(3, &CHANNELS, true, &env).await;
    cluster.wait_bridged().await?;
    let shards = cluster.shards;

    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.ws_url()).collect();
    let channels: Vec<String> = CHANNELS.iter().map(|c| c.to_string()).collect();
    let per_channel = (NOTIFICATIONS / CHANNELS.len() as u64) as usize;
    let mut followers = Vec::new();
    for home in 0..cluster.nodes.len() {
        let follower = Follower::start(urls.clone(), home, channels.clone()).await?;
        followers.push(tokio::spawn(follower.run(per_channel)));
    }

    let busy = pgfanout::ingest::shards::shard_of(CHANNELS[0], shards);
    let victim = owner_of(&cluster, busy).await?;
    let producer = tokio::spawn(produce(cluster.db.url().to_string()));

    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    eprintln!(
        "killing {} (owner of shard {busy}, {})",
        cluster.nodes[victim].id(),
        CHANNELS[0]
    );
    cluster.nodes[victim].kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = (victim + 1) % cluster.nodes.len();
    eprintln!("killing {} and restarting it", cluster.nodes[second].id());
    cluster.nodes[second].kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.nodes[second].restart().await;
    // Both kills and the restart must fall inside the production (a slower machine only
    // widens the overlap, so this, not the producer's rate, is what the run is checked for).
    let overlapped = !producer.is_finished();

    let (sent, elapsed) = producer.await??;
    let rate = sent as f64 / elapsed.as_secs_f64();
    eprintln!("produced {sent} notifications in {elapsed:?} ({rate:.0}/s)");
    assert!(
        overlapped,
        "the producer finished before the restart: the chaos was not under load"
    );
    assert!(
        started.elapsed() > Duration::from_secs(7),
        "the run ended before the chaos did"
    );

    let mut problems = Vec::new();
    for (home, follower) in followers.into_iter().enumerate() {
        let name = format!("follower from node {home}");
        match follower.await? {
            Ok(received) => {
                for (i, channel) in CHANNELS.iter().enumerate() {
                    let want: Vec<Value> = (0..NOTIFICATIONS)
                        .filter(|seq| seq % CHANNELS.len() as u64 == i as u64)
                        .map(|seq| serde_json::json!({ "seq": seq }))
                        .collect();
                    problems.extend(check(&name, channel, &received[*channel], &want));
                }
            }
            Err(err) => problems.push(format!("{name}: {err:#}")),
        }
    }
    let mut takeovers = 0.0;
    let mut republished = 0.0;
    for node in cluster.nodes.iter_mut() {
        if !node.is_running() {
            continue;
        }
        takeovers += node.metric_sum("pgfanout_ingest_takeovers_total").await?;
        republished += node.metric_sum("pgfanout_ingest_republished_total").await?;
    }
    eprintln!("surviving nodes: {takeovers} takeovers, {republished} republished");
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(takeovers > 0.0, "no takeover counted");
    Ok(())
}

/// Sends notifications `0..NOTIFICATIONS` as `{"seq": n}`, round-robin over the channels, in
/// transactions of `BATCH` every `TICK`; returns how many and how long it took.
async fn produce(url: String) -> anyhow::Result<(u64, Duration)> {
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let started = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    for first in (0..NOTIFICATIONS).step_by(BATCH as usize) {
        tick.tick().await;
        let last = (first + BATCH).min(NOTIFICATIONS) - 1;
        client
            .batch_execute(&format!(
                "SELECT pg_notify((ARRAY['{}','{}','{}','{}'])[i % 4 + 1], \
                                  json_build_object('seq', i)::text) \
                 FROM generate_series({first}, {last}) AS i",
                CHANNELS[0], CHANNELS[1], CHANNELS[2], CHANNELS[3]
            ))
            .await?;
    }
    Ok((NOTIFICATIONS, started.elapsed()))
}

/// A node that joins during bursts of thousands of notifications per transaction aligns its
/// stream, takes its share of the shards, and the handovers in the middle of the bursts lose
/// and repeat nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joining_during_bursts_aligns_and_the_handover_is_exact() -> anyhow::Result<()> {
    const BURSTS: u64 = 20;
    const PER_BURST: u64 = 2_000;
    let env = [
        ("PGFANOUT_LEASE_TTL", LEASE_TTL),
        ("PGFANOUT_HISTORY_SIZE", "100000"),
        ("PGFANOUT_RECOVERY_MAX_PUBLICATIONS", "100000"),
    ];
    let channels: Vec<String> = CHANNELS.iter().map(|c| c.to_string()).collect();
    let cluster = Cluster::start_with(1, &CHANNELS, true, &env).await;
    cluster.wait_bridged().await?;
    let follower = Follower::start(vec![cluster.node().ws_url()], 0, channels).await?;
    let total = BURSTS * PER_BURST;
    let reader = tokio::spawn(follower.run((total / CHANNELS.len() as u64) as usize));

    let url = cluster.db.url().to_string();
    let producer = tokio::spawn(async move {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        for burst in 0..BURSTS {
            let first = burst * PER_BURST;
            client
                .batch_execute(&format!(
                    "SELECT pg_notify((ARRAY['{}','{}','{}','{}'])[i % 4 + 1], \
                                      json_build_object('seq', i)::text) \
                     FROM generate_series({first}, {}) AS i",
                    CHANNELS[0],
                    CHANNELS[1],
                    CHANNELS[2],
                    CHANNELS[3],
                    first + PER_BURST - 1
                ))
                .await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok(())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut joiner = common::Node::builder()
        .node_id("joiner")
        .database(&cluster.db)
        .redis(cluster.redis.as_ref().context("redis")?)
        .channels(&CHANNELS);
    for (key, value) in env {
        joiner = joiner.env(key, value);
    }
    let joiner = joiner.start().await;
    joiner.wait_ready(Duration::from_secs(20)).await?;
    producer.await??;
    common::cluster::wait_all_shards_owned(&[cluster.node(), &joiner], cluster.shards).await?;
    let joined = joiner.metric_sum("pgfanout_ingest_shards_owned").await?;
    assert!(joined >= 1.0, "the joiner took no shard");

    let received = reader.await??;
    let mut problems = Vec::new();
    for (i, channel) in CHANNELS.iter().enumerate() {
        let want: Vec<Value> = (0..total)
            .filter(|seq| seq % CHANNELS.len() as u64 == i as u64)
            .map(|seq| serde_json::json!({ "seq": seq }))
            .collect();
        problems.extend(check("follower", channel, &received[*channel], &want));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}
