//! Runs one scenario: open the connections (spread over groups), hold, then one measured
//! step per rate; returns one report row per step.

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::group::{Group, Local, Remote, Share};
use crate::procstat;
use crate::publish;
use crate::report::{ms, Row};
use crate::scenario::{PublishMode, Scenario};
use crate::stats::Stats;

/// The processes whose cost is reported.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    pub node_pids: Vec<u32>,
    pub redis_pids: Vec<u32>,
    /// Sum the CPU of every process named `postgres`.
    pub postgres: bool,
}

/// CPU of everything we watch at one instant.
struct Sample {
    at: Instant,
    node: procstat::Usage,
    redis: f64,
    postgres: std::collections::HashMap<u32, f64>,
    tool: f64,
}

impl Sample {
    fn take(t: &Targets, workers: &[u32]) -> Self {
        Self {
            at: Instant::now(),
            node: procstat::total(&t.node_pids),
            redis: procstat::total(&t.redis_pids).cpu,
            postgres: if t.postgres {
                procstat::postgres_cpu()
            } else {
                Default::default()
            },
            tool: procstat::own_cpu() + procstat::total(workers).cpu,
        }
    }
}

pub async fn run(s: &Scenario, targets: &Targets) -> anyhow::Result<Vec<Row>> {
    let mut s = s.clone();
    // Unique enough: tells this run's publications from an earlier run's backlog.
    s.run = (crate::payload::now_micros() ^ u64::from(std::process::id()) << 40) & ((1 << 52) - 1);
    let s = &s;
    let baseline = procstat::total(&targets.node_pids);
    let open_start = Instant::now();
    let mut groups = Vec::new();
    let per = s.conns_per_worker.max(1);
    if s.connections <= per {
        groups.push(Group::Local(Local::start(&Share {
            scenario: s.clone(),
            start: 0,
            end: s.connections,
        })?));
    } else {
        let mut start = 0;
        while start < s.connections {
            let end = (start + per).min(s.connections);
            let share = Share {
                scenario: s.clone(),
                start,
                end,
            };
            groups.push(Group::Remote(Box::new(Remote::start(&share).await?)));
            start = end;
        }
    }
    let workers: Vec<u32> = groups.iter().filter_map(Group::pid).collect();
    let mut open = Stats::default();
    for g in &mut groups {
        open.merge(&g.opened().await.context("opening connections")?);
    }
    let open_secs = open_start.elapsed().as_secs_f64();
    if !s.hold.is_zero() {
        tokio::time::sleep(s.hold).await;
    }
    let mut base = Row {
        scenario: s.name.clone(),
        publish: format!("{:?}", s.publish).to_lowercase(),
        channels: s.channels,
        connections: s.connections,
        opened: open.opened,
        failed: open.failed,
        connect_per_s: open.opened as f64 / open_secs.max(1e-9),
        connect_p50_ms: ms(&open.connect, 0.5),
        connect_p99_ms: ms(&open.connect, 0.99),
        connect_max_ms: ms(&open.connect, 1.0),
        errors: open.errors.join("; "),
        ..Row::default()
    };
    let subscribed = open.subscribed.clone();
    let mut rows = Vec::new();
    let mut seqs = vec![0u64; s.channels.max(1) as usize];
    let steps: Vec<f64> = if s.publish == PublishMode::None {
        vec![0.0]
    } else {
        s.rates.clone()
    };
    for (i, &rate) in steps.iter().enumerate() {
        for g in &mut groups {
            g.snapshot().await?;
        }
        let load1 = procstat::load1();
        let before = Sample::take(targets, &workers);
        let published = if s.publish == PublishMode::None {
            tokio::time::sleep(s.duration.min(Duration::from_secs(1))).await;
            publish::Published::default()
        } else {
            publish::run(s, rate, &mut seqs).await?
        };
        tokio::time::sleep(s.settle).await;
        let mut step = Stats::default();
        for g in &mut groups {
            step.merge(&g.snapshot().await?);
        }
        let after = Sample::take(targets, &workers);
        let window = (after.at - before.at).as_secs_f64();
        let expected: u64 = published
            .per_channel
            .iter()
            .enumerate()
            .map(|(c, n)| n * subscribed.get(c).copied().unwrap_or(0))
            .sum();
        // Deliveries per second of publishing time: what the system sustained at this rate.
        let busy = published.elapsed.as_secs_f64().max(1e-3);
        let mut row = Row {
            step: i,
            target_rate: rate,
            published: published.total(),
            publish_errors: published.errors,
            publish_rate: published.attempted as f64 / busy,
            expected,
            deliveries: step.deliveries,
            lost: expected.saturating_sub(step.deliveries),
            duplicates: step.duplicates,
            reordered: step.reordered,
            foreign: step.foreign,
            gaps: step.gaps,
            deliveries_per_s: if published.attempted > 0 {
                step.deliveries as f64 / busy
            } else {
                0.0
            },
            p50_ms: ms(&step.latency, 0.5),
            p90_ms: ms(&step.latency, 0.9),
            p99_ms: ms(&step.latency, 0.99),
            p999_ms: ms(&step.latency, 0.999),
            max_ms: ms(&step.latency, 1.0),
            closed_by_server: step.closed_by_server,
            window_s: window,
            node_rss_mb: after.node.rss as f64 / 1048576.0,
            node_bytes_per_conn: if open.opened > 0 {
                after.node.rss.saturating_sub(baseline.rss) as f64 / open.opened as f64
            } else {
                0.0
            },
            node_cpu_s: after.node.cpu - before.node.cpu,
            redis_cpu_s: after.redis - before.redis,
            postgres_cpu_s: procstat::cpu_delta(&before.postgres, &after.postgres),
            tool_cpu_s: after.tool - before.tool,
            load1,
            ..base.clone()
        };
        let delivered_per_s = step.deliveries as f64 / window.max(1e-3);
        if delivered_per_s > 0.0 {
            row.node_cores_per_100k = row.node_cpu_s / window * 1e5 / delivered_per_s;
            row.tool_cores_per_100k = row.tool_cpu_s / window * 1e5 / delivered_per_s;
        }
        let mut errors: Vec<String> = step.errors.clone();
        if let Some(e) = &published.first_error {
            errors.push(format!("publish: {e}"));
        }
        if !errors.is_empty() {
            if !row.errors.is_empty() {
                row.errors.push_str("; ");
            }
            row.errors.push_str(&errors.join("; "));
        }
        println!("{}", row.line());
        rows.push(row);
        base.errors.clear();
    }
    for g in groups {
        g.stop().await?;
    }
    Ok(rows)
}
