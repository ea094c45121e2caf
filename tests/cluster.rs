//! Three nodes sharing one database and one Redis (G1, G3): a notification enters the bus once,
//! whichever nodes LISTEN, and every client on every node receives every message of its
//! channels once, in offset order, offsets contiguous from 1, with the data that was sent.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Client, Cluster, Publication};
use serde_json::{json, Value};

const NODES: usize = 3;
const CLIENTS_PER_NODE: usize = 2;
const CHANNELS: [&str; 2] = ["orders", "trades"];
const NOTIFICATIONS: usize = 1_000;
/// Notifications per transaction (each is one `SELECT pg_notify(..) FROM generate_series(..)`).
const BATCH: usize = 100;
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// The channel of notification `seq`: they alternate, so each channel gets half.
fn channel_of(seq: usize) -> &'static str {
    CHANNELS[seq % CHANNELS.len()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_on_every_node_receives_each_notification_once_in_offset_order(
) -> anyhow::Result<()> {
    let cluster = Cluster::start(NODES, &CHANNELS).await;
    cluster.wait_bridged().await?;

    let mut readers = Vec::new();
    for node in &cluster.nodes {
        for index in 0..CLIENTS_PER_NODE {
            let mut client = Client::connect(&node.ws_url()).await?;
            for channel in CHANNELS {
                client.subscribe(channel).await?;
            }
            let name = format!("client {index} on node {}", node.id());
            readers.push((name, tokio::spawn(read_all(client))));
        }
    }

    // Postgres delivers a transaction's notifications in call order, and one owner bridges them
    // in that order, so the k-th notification of a channel must get offset k.
    let mut expected: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for seq in 0..NOTIFICATIONS {
        expected
            .entry(channel_of(seq))
            .or_default()
            .push(json!({"seq": seq}));
    }
    for start in (0..NOTIFICATIONS).step_by(BATCH) {
        let end = start + BATCH - 1;
        cluster
            .db
            .execute(&format!(
                "SELECT pg_notify(CASE WHEN i % 2 = 0 THEN '{}' ELSE '{}' END, \
                                  json_build_object('seq', i)::text) \
                 FROM generate_series({start}, {end}) AS i",
                CHANNELS[0], CHANNELS[1]
            ))
            .await?;
    }

    let mut failures = Vec::new();
    for (name, reader) in readers {
        match reader.await? {
            Ok(received) => failures.extend(check_stream(&name, &received, &expected)),
            Err(err) => failures.push(format!("{name}: {err:#}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Exactly once into the bus, counted where it happens: all nodes together published each
    // notification once.
    let mut published = 0.0;
    for node in &cluster.nodes {
        published += node.metric_sum("pgfanout_bus_published_total").await?;
    }
    assert_eq!(
        published, NOTIFICATIONS as f64,
        "pgfanout_bus_published_total summed over all nodes"
    );
    Ok(())
}

/// Reads publications until all were received, then makes sure nothing more (no duplicate) follows.
async fn read_all(mut client: Client) -> anyhow::Result<Vec<Publication>> {
    let deadline = tokio::time::Instant::now() + RECEIVE_TIMEOUT;
    let mut received = Vec::with_capacity(NOTIFICATIONS);
    while received.len() < NOTIFICATIONS {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.next_pub(left).await {
            Ok(publication) => received.push(publication),
            Err(err) => anyhow::bail!(
                "after {} of {NOTIFICATIONS} publications: {err:#}",
                received.len()
            ),
        }
    }
    client.expect_no_pub(Duration::from_millis(500)).await?;
    Ok(received)
}

/// Every problem in one client's stream: per channel, offsets must run 1, 2, 3, … and carry
/// the data sent in that position.
fn check_stream(
    name: &str,
    received: &[Publication],
    expected: &BTreeMap<&str, Vec<Value>>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (channel, sent) in expected {
        let got: Vec<&Publication> = received.iter().filter(|p| p.channel == *channel).collect();
        if got.len() != sent.len() {
            problems.push(format!(
                "{name}: {channel}: {} publications, expected {}",
                got.len(),
                sent.len()
            ));
        }
        for (position, publication) in got.iter().enumerate() {
            let want_offset = position as u64 + 1;
            if publication.offset != want_offset {
                problems.push(format!(
                    "{name}: {channel}: publication #{want_offset} has offset {} (data {})",
                    publication.offset, publication.data
                ));
                break;
            }
            if sent.get(position) != Some(&publication.data) {
                problems.push(format!(
                    "{name}: {channel}: offset {want_offset} carries {}, expected {:?}",
                    publication.data,
                    sent.get(position)
                ));
                break;
            }
        }
    }
    let stray: Vec<&Publication> = received
        .iter()
        .filter(|p| !expected.contains_key(p.channel.as_str()))
        .take(3)
        .collect();
    if !stray.is_empty() {
        problems.push(format!(
            "{name}: publications on channels it never subscribed: {stray:?}"
        ));
    }
    problems
}
