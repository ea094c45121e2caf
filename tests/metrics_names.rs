//! The metrics a node exports are the ones the README lists: every metric in the README's
//! table is on `/metrics` from the start, with its type, a help text and the `node` label;
//! nothing unlisted is exported; and every metric name defined in `src/metrics.rs` is listed.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;

use common::Cluster;

/// `pgfanout_<name>` → the type the README gives (`counter`, `gauge`, `histogram`).
fn readme_metrics() -> BTreeMap<String, String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md");
    let section = readme
        .split("\n## Metrics\n")
        .nth(1)
        .expect("README has a Metrics section");
    let section = section.split("\n## ").next().unwrap_or(section);
    section
        .lines()
        .filter_map(|line| {
            let mut cells = line.split('|').map(str::trim).skip(1);
            let name = cells.next()?.strip_prefix('`')?.split('`').next()?;
            let name = name.split('{').next()?;
            let kind = cells.next()?.split_whitespace().next()?.to_string();
            Some((format!("pgfanout_{name}"), kind))
        })
        .collect()
}

/// The metric names `src/metrics.rs` defines as constants.
fn defined_metrics() -> Vec<String> {
    let source =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/metrics.rs"))
            .expect("read src/metrics.rs");
    source
        .lines()
        .filter(|line| line.trim_start().starts_with("pub const") && line.contains("&str"))
        .filter_map(|line| line.split('"').nth(1))
        .filter(|name| name.starts_with("pgfanout_"))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn metrics_endpoint_exports_exactly_the_metrics_the_readme_lists() -> anyhow::Result<()> {
    let listed = readme_metrics();
    assert!(
        listed.len() >= 20,
        "README metrics table not found or too short: {listed:?}"
    );
    let cluster = Cluster::start(1, &["orders"]).await;
    cluster.wait_bridged().await?;
    let node = cluster.node();
    let text = node.metrics().await?;

    let mut problems = Vec::new();
    let mut exported: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, kind)) = rest.split_once(' ') {
                exported.insert(name.to_string(), kind.to_string());
            }
        } else if line.starts_with("pgfanout_")
            && !line.contains(&format!("node=\"{}\"", node.id()))
        {
            problems.push(format!("series without the node label: {line}"));
        }
    }
    for (name, kind) in &listed {
        match exported.get(name) {
            None => problems.push(format!("{name} is in the README but not on /metrics")),
            Some(actual) if actual != kind => problems.push(format!(
                "{name}: README says {kind}, /metrics says {actual}"
            )),
            Some(_) => {}
        }
        if !text.contains(&format!("# HELP {name} ")) {
            problems.push(format!("{name} has no help text"));
        }
    }
    for name in exported.keys().filter(|n| n.starts_with("pgfanout_")) {
        if !listed.contains_key(name) {
            problems.push(format!("{name} is on /metrics but not in the README"));
        }
    }
    for name in defined_metrics() {
        if !listed.contains_key(&name) {
            problems.push(format!(
                "{name} is defined in src/metrics.rs but not in the README"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
    Ok(())
}

#[tokio::test]
async fn messages_in_and_out_queue_depths_and_delivery_latency_are_counted() -> anyhow::Result<()> {
    const NOTIFICATIONS: usize = 10;
    const CLIENTS: usize = 2;
    let cluster = Cluster::start(1, &["orders"]).await;
    cluster.wait_bridged().await?;
    let node = cluster.node();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut client = common::Client::connect(&node.ws_url()).await?;
        client.subscribe("orders").await?;
        clients.push(client);
    }
    for i in 0..NOTIFICATIONS {
        cluster
            .db
            .notify("orders", &format!("{{\"i\":{i}}}"))
            .await?;
    }
    for client in &mut clients {
        for _ in 0..NOTIFICATIONS {
            client.next_pub(std::time::Duration::from_secs(10)).await?;
        }
    }
    // Counted just after the socket write, so possibly a moment after the client read it.
    let out = (NOTIFICATIONS * CLIENTS) as f64;
    let text = common::eventually(
        std::time::Duration::from_secs(5),
        "every write counted",
        || async {
            let text = node.metrics().await.map_err(|e| format!("{e:#}"))?;
            let written = common::node::sum_metric(&text, "pgfanout_messages_written_total");
            if written >= out {
                Ok(text)
            } else {
                Err(format!("messages_written_total {written}"))
            }
        },
    )
    .await?;
    let sum = |name: &str| common::node::sum_metric(&text, name);
    let published = text
        .lines()
        .find(|l| l.starts_with("pgfanout_bus_published_total") && l.contains("source=\"notify\""))
        .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok());
    assert_eq!(
        published,
        Some(NOTIFICATIONS as f64),
        "messages in (notify)"
    );
    assert_eq!(sum("pgfanout_messages_delivered_total"), out, "queued");
    assert_eq!(sum("pgfanout_messages_written_total"), out, "written");
    let flushes = sum("pgfanout_client_queue_depth_count");
    assert!(
        flushes >= CLIENTS as f64 && flushes <= out,
        "queue depth sampled once per write: {flushes}"
    );
    assert!(sum("pgfanout_client_queue_depth_sum") >= flushes);
    // Every flush wrote publications that crossed Redis with their timestamp.
    assert_eq!(
        sum("pgfanout_delivery_latency_seconds_count"),
        flushes,
        "one latency sample per flush"
    );
    let latency = sum("pgfanout_delivery_latency_seconds_sum") / flushes;
    assert!(
        (0.0..60.0).contains(&latency),
        "mean delivery latency {latency} s is not a plausible duration"
    );
    Ok(())
}
