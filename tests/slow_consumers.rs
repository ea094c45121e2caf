//! Slow consumers (issue #9, G7): clients that stop reading their sockets are disconnected as
//! slow (3008, `connections_closed_total{reason="slow_consumer"}`) within a bounded time, while
//! every other client on the node keeps receiving every message.
//!
//! Each scenario runs two phases on one node in the same run: a baseline in which every client
//! reads, then a phase in which 1% (or more) of them stop reading. Latency (publish in this
//! process → receipt in this process, one clock) of the healthy clients is compared between the
//! phases as a ratio of p99s; it is reported, not asserted (wall-clock figures on a shared
//! machine are not a test). Asserted: every stalled client is cut as slow, no healthy one is,
//! and every healthy client received every notification, in order.
//!
//! `slow_consumers_are_cut_and_the_others_get_everything` is the small version that always
//! runs. `slow_consumers_at_2000_clients` is the measurement (ignored; run it alone):
//!
//! ```sh
//! cargo nextest run --run-ignored only -E 'test(=slow_consumers::slow_consumers_at_2000_clients)' --no-capture
//! ```
//! `SLOW_CLIENTS`, `SLOW_RATE`, `SLOW_PAYLOAD`, `SLOW_RCVBUF` (stalled clients' `SO_RCVBUF`),
//! `SLOW_SNDBUF` (`PGFANOUT_SEND_BUFFER_BYTES`) override its scenario.

use crate::common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context as _};
use common::{Cluster, Node};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

const CHANNEL: &str = "ticks";
const SETUP_CONCURRENCY: usize = 64;
/// How long healthy clients get to read the last notifications once publishing stopped.
const CATCH_UP: Duration = Duration::from_secs(30);

/// One run: how many clients, how many stall, and the traffic.
#[derive(Clone, Debug)]
struct Scenario {
    clients: usize,
    stalled: usize,
    /// Notifications per second on the one channel every client subscribes to.
    rate: u32,
    /// Bytes of padding in each notification.
    payload: usize,
    /// `PGFANOUT_CLIENT_QUEUE_SIZE`; `None` keeps the default.
    queue_size: Option<usize>,
    /// `PGFANOUT_SEND_BUFFER_BYTES`; `None` keeps the default (the kernel's autotuning).
    send_buffer: Option<u32>,
    /// `PGFANOUT_PING_INTERVAL`; `None` keeps the default.
    ping_interval: Option<&'static str>,
    /// `SO_RCVBUF` of the stalled clients' sockets (`None`: the kernel's default), so the
    /// node's writes to them block after this much rather than after megabytes.
    stalled_rcvbuf: Option<u32>,
    baseline: Duration,
    /// The stalled phase ends this long after the last stalled client was cut ...
    after_cut: Duration,
    /// ... or after this long at most.
    stalled_max: Duration,
}

/// What a run measured.
#[derive(Debug)]
struct Report {
    sent: u64,
    deliveries_per_second: f64,
    baseline: Percentiles,
    stalled: Percentiles,
    /// Stalled clients the node closed as slow, and when the last of them was (from the stall).
    cut: u64,
    last_cut_after: Option<Duration>,
    /// Close codes the stalled clients read once they read again (1006: no close frame).
    stalled_closes: Vec<Option<u16>>,
    /// Healthy clients that missed, repeated or reordered something, or were closed.
    healthy_incomplete: Vec<String>,
    max_rss_kib: u64,
}

#[derive(Debug, Default)]
struct Percentiles {
    samples: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Percentiles {
    fn of(mut micros: Vec<u64>) -> Percentiles {
        micros.sort_unstable();
        let at = |q: f64| {
            micros
                .get(((micros.len() as f64 * q) as usize).min(micros.len().saturating_sub(1)))
                .map_or(0.0, |&v| v as f64 / 1000.0)
        };
        Percentiles {
            samples: micros.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: micros.last().map_or(0.0, |&v| v as f64 / 1000.0),
        }
    }
}

/// Where the run is, for the client tasks.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Baseline,
    Stalled,
    /// Publishing stopped after this many notifications.
    Finished(u64),
}

/// What one client task saw.
#[derive(Default)]
struct Seen {
    /// The `n` of every publication, in arrival order.
    received: Vec<u64>,
    /// Latencies in µs, per phase (baseline, stalled).
    latencies: [Vec<u64>; 2],
    /// The close code, if the connection ended (1006 without a close frame).
    close: Option<u16>,
}

/// `n` and `t` of a publication push of a notification `{"n":..,"t":..,"pad":..}`, read
/// without parsing the padding: with 2,000 clients in one (debug-built) test process, full
/// JSON parsing would make the test's own readers the bottleneck being measured.
fn tick(line: &str) -> Option<(u64, u64)> {
    let data = line
        .strip_prefix("{\"push\":")?
        .split_once("\"pub\":{\"data\":{")?
        .1;
    let number = |key: &str| -> Option<u64> {
        let rest = data.split_once(key)?.1;
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        rest[..end].parse().ok()
    };
    Some((number("\"n\":")?, number("\"t\":")?))
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A connected client subscribed to [`CHANNEL`], on a socket with `rcvbuf` if given.
async fn subscriber(port: u16, rcvbuf: Option<u32>) -> anyhow::Result<Ws> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size)?;
    }
    let stream = socket
        .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .await?;
    let url = format!("ws://127.0.0.1:{port}/connection/websocket");
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    ws.send(Message::text(format!(
        "{{\"id\":1,\"connect\":{{}}}}\n{{\"id\":2,\"subscribe\":{{\"channel\":\"{CHANNEL}\"}}}}"
    )))
    .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let message = tokio::time::timeout_at(deadline, ws.next())
            .await
            .context("subscribe reply")?
            .context("closed before the subscribe reply")??;
        if let Message::Text(text) = message {
            if text.as_str().contains("\"id\":2,\"subscribe\"") {
                return Ok(ws);
            }
            anyhow::ensure!(!text.as_str().contains("\"error\""), "refused: {text}");
        }
    }
}

/// Handles one text message; answers pings. Returns false when the connection broke.
async fn read_text(ws: &mut Ws, text: &str, phase: Phase, seen: &mut Seen) -> bool {
    for line in text.lines() {
        if line == "{}" {
            if ws.send(Message::text("{}")).await.is_err() {
                return false;
            }
            continue;
        }
        let Some((n, t)) = tick(line) else {
            continue;
        };
        seen.received.push(n);
        let slot = match phase {
            Phase::Baseline => 0,
            _ => 1,
        };
        seen.latencies[slot].push(now_micros().saturating_sub(t));
    }
    true
}

/// Reads (answering pings) until the run finishes and everything sent arrived. A `stall`
/// client stops reading when the stalled phase starts, and once the run finished reads what is
/// left in its socket, to learn how the node closed it.
async fn client(mut ws: Ws, stall: bool, mut phase: watch::Receiver<Phase>) -> Seen {
    let mut seen = Seen::default();
    loop {
        let now = *phase.borrow_and_update();
        if stall && now == Phase::Stalled {
            let _ = phase.wait_for(|p| matches!(p, Phase::Finished(_))).await;
            return drain(ws, seen).await;
        }
        if let Phase::Finished(total) = now {
            if seen.received.len() as u64 >= total {
                return seen;
            }
        }
        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    if !read_text(&mut ws, text.as_str(), now, &mut seen).await {
                        seen.close = Some(1006);
                        return seen;
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    seen.close = Some(frame.map_or(1005, |f| u16::from(f.code)));
                    return seen;
                }
                Some(Ok(_)) => {}
                None | Some(Err(_)) => {
                    seen.close = Some(1006);
                    return seen;
                }
            },
            changed = phase.changed() => if changed.is_err() { return seen },
        }
    }
}

/// A stalled client reads again: whatever was buffered, then the close.
async fn drain(mut ws: Ws, mut seen: Seen) -> Seen {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return seen,
            Ok(Some(Ok(Message::Close(frame)))) => {
                seen.close = Some(frame.map_or(1005, |f| u16::from(f.code)));
                return seen;
            }
            Ok(Some(Ok(_))) => {}
            Ok(None | Some(Err(_))) => {
                seen.close = Some(1006);
                return seen;
            }
        }
    }
}

/// Resident memory of the node, in KiB (0 when unknown).
fn rss_kib(node: &Node) -> u64 {
    let Some(pid) = node.pid() else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

async fn slow_consumers(node: &Node) -> anyhow::Result<f64> {
    node.metric_where(
        "pgfanout_connections_closed_total",
        "reason=\"slow_consumer\"",
    )
    .await
}

async fn run(scenario: &Scenario) -> anyhow::Result<Report> {
    let mut env = Vec::new();
    let queue = scenario.queue_size.map(|q| q.to_string());
    if let Some(queue) = &queue {
        env.push(("PGFANOUT_CLIENT_QUEUE_SIZE", queue.as_str()));
    }
    let send_buffer = scenario.send_buffer.map(|b| b.to_string());
    if let Some(bytes) = &send_buffer {
        env.push(("PGFANOUT_SEND_BUFFER_BYTES", bytes.as_str()));
    }
    if let Some(ping) = scenario.ping_interval {
        env.push(("PGFANOUT_PING_INTERVAL", ping));
    }
    // One node on its in-memory bus: the fan-out under test is the same with Redis.
    let cluster = Cluster::start_with(1, &[CHANNEL], false, &env).await;
    cluster.wait_bridged().await?;
    let node = cluster.node();
    let port = node.port();

    let sockets: Vec<anyhow::Result<(bool, Ws)>> =
        futures_util::stream::iter((0..scenario.clients).map(|i| async move {
            // Spread the stalled ones over the fleet.
            let stall = i % (scenario.clients / scenario.stalled.max(1)) == 0
                && i / (scenario.clients / scenario.stalled.max(1)) < scenario.stalled;
            let rcvbuf = if stall { scenario.stalled_rcvbuf } else { None };
            Ok((stall, subscriber(port, rcvbuf).await?))
        }))
        .buffer_unordered(SETUP_CONCURRENCY)
        .collect()
        .await;
    let (phase_tx, phase_rx) = watch::channel(Phase::Baseline);
    let mut tasks = Vec::with_capacity(scenario.clients);
    for socket in sockets {
        let (stall, ws) = socket?;
        tasks.push((stall, tokio::spawn(client(ws, stall, phase_rx.clone()))));
    }
    let stalled = tasks.iter().filter(|(stall, _)| *stall).count() as u64;
    eprintln!("slow consumers: {} clients subscribed", tasks.len());
    ensure!(stalled == scenario.stalled as u64, "{stalled} stalled");

    // Publish at the rate until the run ends.
    let sent = Arc::new(AtomicU64::new(0));
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let publish = {
        let sent = sent.clone();
        let pad = "x".repeat(scenario.payload);
        let period = Duration::from_secs(1) / scenario.rate;
        let db = &cluster.db;
        async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop_rx.changed() => return anyhow::Ok(()),
                }
                let n = sent.load(Ordering::Relaxed) + 1;
                let payload = json!({"n": n, "t": now_micros(), "pad": pad}).to_string();
                db.notify(CHANNEL, &payload).await?;
                sent.store(n, Ordering::Relaxed);
            }
        }
    };
    let started = Instant::now();
    let drive = async {
        let mut max_rss = rss_kib(node);
        tokio::time::sleep(scenario.baseline).await;
        max_rss = max_rss.max(rss_kib(node));
        let stalled_at = Instant::now();
        let _ = phase_tx.send(Phase::Stalled);
        eprintln!("slow consumers: baseline done, {stalled} clients stop reading");
        let mut last_cut_after = None;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            max_rss = max_rss.max(rss_kib(node));
            let cut = slow_consumers(node).await? as u64;
            if cut >= stalled && last_cut_after.is_none() {
                last_cut_after = Some(stalled_at.elapsed());
            }
            let done =
                last_cut_after.is_some_and(|at| stalled_at.elapsed() >= at + scenario.after_cut);
            if done || stalled_at.elapsed() >= scenario.stalled_max {
                break;
            }
        }
        let _ = stop_tx.send(true);
        anyhow::Ok((last_cut_after, max_rss))
    };
    let (published, driven) = tokio::join!(publish, drive);
    published?;
    let (last_cut_after, max_rss_kib) = driven?;
    let elapsed = started.elapsed();
    let sent = sent.load(Ordering::Relaxed);
    let _ = phase_tx.send(Phase::Finished(sent));

    let mut baseline = Vec::new();
    let mut stalled_phase = Vec::new();
    let mut stalled_closes = Vec::new();
    let mut healthy_incomplete = Vec::new();
    let expected: Vec<u64> = (1..=sent).collect();
    for (i, (stall, task)) in tasks.into_iter().enumerate() {
        let seen = match tokio::time::timeout(CATCH_UP, task).await {
            Ok(seen) => seen?,
            Err(_) => {
                healthy_incomplete.push(format!("client {i}: still reading after {CATCH_UP:?}"));
                continue;
            }
        };
        if stall {
            stalled_closes.push(seen.close);
            continue;
        }
        if seen.received != expected || seen.close.is_some() {
            healthy_incomplete.push(format!(
                "client {i}: {} of {sent} received, closed {:?}",
                seen.received.len(),
                seen.close
            ));
        }
        let [b, s] = seen.latencies;
        baseline.extend(b);
        stalled_phase.extend(s);
    }
    let healthy = (scenario.clients - scenario.stalled) as f64;
    Ok(Report {
        sent,
        deliveries_per_second: sent as f64 * scenario.clients as f64 / elapsed.as_secs_f64(),
        baseline: Percentiles::of(baseline),
        stalled: Percentiles::of(stalled_phase),
        cut: slow_consumers(node).await? as u64,
        last_cut_after,
        stalled_closes,
        healthy_incomplete,
        max_rss_kib: max_rss_kib.max(rss_kib(node)),
    })
    .inspect(|report| {
        eprintln!(
            "slow consumers: {} clients ({} stalled), {} notifications of {} B at {}/s = {:.0} \
             deliveries/s; healthy p50/p99/max: baseline {:.1}/{:.1}/{:.1} ms ({} samples), \
             with stalled clients {:.1}/{:.1}/{:.1} ms ({} samples); p99 ratio {:.2}; {} cut \
             as slow, the last {:?} after the stall; stalled clients read closes {:?}; node RSS \
             max {} KiB ({:.1} KiB per client)",
            scenario.clients,
            scenario.stalled,
            report.sent,
            scenario.payload,
            scenario.rate,
            report.deliveries_per_second,
            report.baseline.p50_ms,
            report.baseline.p99_ms,
            report.baseline.max_ms,
            report.baseline.samples,
            report.stalled.p50_ms,
            report.stalled.p99_ms,
            report.stalled.max_ms,
            report.stalled.samples,
            report.stalled.p99_ms / report.baseline.p99_ms.max(f64::MIN_POSITIVE),
            report.cut,
            report.last_cut_after,
            summarize(&report.stalled_closes),
            report.max_rss_kib,
            report.max_rss_kib as f64 / healthy.max(1.0),
        )
    })
}

/// Close codes and how often each came.
fn summarize(closes: &[Option<u16>]) -> Vec<(Option<u16>, usize)> {
    let mut counts: Vec<(Option<u16>, usize)> = Vec::new();
    for close in closes {
        match counts.iter_mut().find(|(c, _)| c == close) {
            Some((_, n)) => *n += 1,
            None => counts.push((*close, 1)),
        }
    }
    counts
}

fn check(scenario: &Scenario, report: &Report) -> anyhow::Result<()> {
    ensure!(
        report.healthy_incomplete.is_empty(),
        "healthy clients did not get everything:\n{}",
        report.healthy_incomplete.join("\n")
    );
    ensure!(
        report.cut == scenario.stalled as u64,
        "{} connections cut as slow, {} stalled",
        report.cut,
        scenario.stalled
    );
    ensure!(
        report.last_cut_after.is_some(),
        "not every stalled client was cut within {:?}",
        scenario.stalled_max
    );
    for close in &report.stalled_closes {
        // The close frame arrives when the node could still write it; a connection whose
        // buffers are full just ends.
        ensure!(
            matches!(close, Some(3008 | 1006)),
            "a stalled client read close {close:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn slow_consumers_are_cut_and_the_others_get_everything() -> anyhow::Result<()> {
    let scenario = Scenario {
        clients: 40,
        stalled: 4,
        rate: 50,
        payload: 4000,
        queue_size: Some(64),
        send_buffer: Some(16 * 1024),
        ping_interval: None,
        stalled_rcvbuf: Some(4096),
        baseline: Duration::from_secs(2),
        after_cut: Duration::from_secs(1),
        stalled_max: Duration::from_secs(30),
    };
    let report = run(&scenario).await?;
    check(&scenario, &report)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test]
#[ignore = "measurement: 2,000 clients; run alone (see the module docs)"]
async fn slow_consumers_at_2000_clients() -> anyhow::Result<()> {
    let clients = env_or("SLOW_CLIENTS", 2000usize);
    let rcvbuf = env_or("SLOW_RCVBUF", 8192u32);
    let sndbuf = env_or("SLOW_SNDBUF", 32768u32);
    let scenario = Scenario {
        clients,
        stalled: (clients / 100).max(1),
        rate: env_or("SLOW_RATE", 5u32),
        payload: env_or("SLOW_PAYLOAD", 2000usize),
        queue_size: None,
        send_buffer: (sndbuf > 0).then_some(sndbuf),
        // Longer than the default 25 s, so a stalled client is cut by the slow-consumer path
        // (what this measures) rather than by its missing pong (3012, also within bounds).
        ping_interval: Some("60s"),
        stalled_rcvbuf: (rcvbuf > 0).then_some(rcvbuf),
        baseline: Duration::from_secs(15),
        after_cut: Duration::from_secs(15),
        stalled_max: Duration::from_secs(90),
    };
    let report = run(&scenario).await?;
    check(&scenario, &report)
}
