//! A rolling restart under load (G8): three nodes behind a round-robin balancer without
//! affinity, 3,000 real centrifuge-js clients with recovery, notifications flowing through
//! Postgres at 500/s. Each node in turn is taken out of the balancer (as a Kubernetes Service
//! drops a pod whose readiness fails), gets SIGTERM, drains, exits, is started again and put
//! back. Afterwards every client has every message of its channel exactly once, in order,
//! and no client saw anything but the drain's reconnect advice (3001).

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::balancer::local;
use common::{Balancer, Cluster, Script};
use serde_json::{json, Value};
use tokio::sync::watch;

const CLIENTS: usize = 3_000;
/// Ten clients a channel: the point is many SDK clients resuming, not fan-out cost (the load
/// tool measures that), so deliveries stay at 10 × RATE and the machine stays responsive.
const CHANNELS: usize = 300;
/// Notifications per second, over all channels.
const RATE: u64 = 500;
const DRAIN_WINDOW: &str = "2s";
const GRACE: Duration = Duration::from_secs(15);

fn channel_names() -> Vec<String> {
    (0..CHANNELS).map(|i| format!("c{i}")).collect()
}

/// Sends `{"seq": n}` round-robin over `channels` at [`RATE`] until `stop` turns true, on its
/// own connection; returns how many each channel got (n counts per channel, from 1).
async fn produce(
    url: String,
    channels: Vec<String>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    let connection = tokio::spawn(connection);
    let mut sent: BTreeMap<String, u64> = channels.iter().map(|c| (c.clone(), 0)).collect();
    // Ticks of 10 ms, RATE/100 notifications each.
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let per_tick = usize::try_from(RATE / 100)?;
    let mut next_channel = 0;
    while !*stop.borrow() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        // One round trip per tick: the tick's notifications in one statement (their payloads
        // differ, so Postgres folds none of them).
        let mut names = Vec::with_capacity(per_tick);
        let mut payloads = Vec::with_capacity(per_tick);
        for _ in 0..per_tick {
            let channel = &channels[next_channel % channels.len()];
            next_channel += 1;
            let seq = sent.get_mut(channel).expect("known channel");
            *seq += 1;
            names.push(channel.clone());
            payloads.push(json!({ "seq": *seq }).to_string());
        }
        client
            .execute(
                "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS t(c, p)",
                &[&names, &payloads],
            )
            .await?;
    }
    drop(client);
    connection.abort();
    Ok(sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let channels = channel_names();
    let channel_refs: Vec<&str> = channels.iter().map(String::as_str).collect();
    let env = [
        ("PGFANOUT_DRAIN_WINDOW", DRAIN_WINDOW),
        ("PGFANOUT_SHUTDOWN_GRACE", "12s"),
    ];
    let mut cluster = Cluster::start_with(3, &channel_refs, true, &env).await;
    cluster.wait_bridged().await?;
    let balancer = Balancer::start_http(backends_of(&cluster.nodes)).await;

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/js");
    anyhow::ensure!(
        dir.join("node_modules/centrifuge/package.json").exists(),
        "centrifuge-js is not installed in {}: run scripts/deps.sh test",
        dir.display()
    );
    let mut fleet = Script::spawn("node", &["fleet.mjs"], &dir, &[])?;
    fleet
        .send(&json!({
            "op": "start", "url": balancer.ws_url(), "clients": CLIENTS,
            "channels": channels, "token": "", "ramp": 1000,
        }))
        .await?;
    let (subscribed, _) = fleet
        .next_where(Duration::from_secs(90), "every client subscribed", |e| {
            e["event"] == "subscribed" || e["event"] == "driver_error"
        })
        .await?;
    assert_eq!(subscribed["clients"], json!(CLIENTS), "{subscribed}");
    let spread = balancer.open_websocket_backends();
    for node in &cluster.nodes {
        let on_node = spread.iter().filter(|&&p| p == node.port()).count();
        assert!(
            on_node > CLIENTS / 6,
            "clients spread over the nodes: {on_node} on {}",
            node.id()
        );
    }

    let (stop, stopped) = watch::channel(false);
    let producer = tokio::spawn(produce(
        cluster.db.url().to_string(),
        channels.clone(),
        stopped,
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;

    for index in 0..cluster.nodes.len() {
        let others: Vec<_> = cluster
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(_, n)| local(n.port()))
            .collect();
        balancer.set_backends(others);
        let node = &mut cluster.nodes[index];
        node.terminate()?;
        let status = node.wait_exit(GRACE).await?;
        assert!(status.success(), "{} exited with {status}", node.id());
        node.restart().await;
        node.wait_ready(Duration::from_secs(30)).await?;
        balancer.set_backends(backends_of(&cluster.nodes));
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    stop.send_replace(true);
    let sent = producer.await??;
    let total: u64 = sent.values().sum();
    fleet
        .send(&json!({"op": "expect", "counts": sent, "timeout_ms": 60_000}))
        .await?;
    let (report, _) = fleet
        .next_where(Duration::from_secs(90), "the fleet's report", |e| {
            e["event"] == "report" || e["event"] == "driver_error"
        })
        .await?;
    eprintln!("sent {total} notifications over {CHANNELS} channels; fleet report: {report}");
    // Into the bus exactly once (G1, G2): each channel's last offset is what was sent to it.
    let redis = cluster.redis.as_ref().expect("cluster has redis");
    let mut in_bus = BTreeMap::new();
    for channel in &channels {
        let reply = redis.command(&format!("HGET pgfanout:{{{channel}}}:meta o"))?;
        let last = reply
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .parse::<u64>()
            .unwrap_or(0);
        in_bus.insert(channel.clone(), last);
    }
    assert_eq!(
        in_bus, sent,
        "last offset per channel in the bus vs notifications sent"
    );

    assert_eq!(
        report["complete"],
        json!(CLIENTS),
        "every client has every message: {report}"
    );
    assert_eq!(report["duplicates"], json!(0), "{report}");
    assert_eq!(report["bad_data"], json!(0), "{report}");
    assert_eq!(report["gaps"], json!([]), "{report}");
    assert_eq!(
        report["errors"],
        json!({}),
        "no error but reconnect advice: {report}"
    );
    let codes = report["reconnect_codes"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    assert!(
        codes.keys().all(|code| code == "3001"),
        "only the drain's reconnect advice: {report}"
    );
    // Every client's node was drained once, so each reconnected and recovered.
    assert!(
        codes.get("3001").and_then(Value::as_u64) >= Some(CLIENTS as u64),
        "{report}"
    );
    assert_eq!(
        report["resubscribes"]["not_recovered"],
        json!(0),
        "{report}"
    );
    Ok(())
}

fn backends_of(nodes: &[common::Node]) -> Vec<std::net::SocketAddr> {
    nodes.iter().map(|n| local(n.port())).collect()
}
