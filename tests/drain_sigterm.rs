//! SIGTERM on a node with clients (G8): `/ready` turns 503 before any client is told to
//! go, the listener stops accepting, every client gets 3001 (shutdown, reconnect) spread
//! over the drain window, the bridge lease is released, and the process exits with 0
//! within the grace. A second signal cuts the drain short.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::{Client, Cluster, KeepAlive};
use tokio::sync::Mutex;
use tokio::time::Instant;

const CLIENTS: usize = 40;
const DRAIN_WINDOW: Duration = Duration::from_secs(3);
const GRACE: Duration = Duration::from_secs(8);
/// Shutdown "reconnect" close code (proto/README.md).
const SHUTDOWN_CODE: u16 = 3001;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_unready_stops_accepting_spreads_reconnects_and_exits_zero(
) -> anyhow::Result<()> {
    let env = [
        ("PGFANOUT_DRAIN_WINDOW", "3s"),
        ("PGFANOUT_SHUTDOWN_GRACE", "8s"),
        // Long enough that only a release (not an expiry) can remove it during the test.
        ("PGFANOUT_LEASE_TTL", "60s"),
    ];
    let mut cluster = Cluster::start_with(1, &["orders"], true, &env).await;
    cluster.wait_bridged().await?;
    let port = cluster.node().port();
    let redis = cluster.redis.as_ref().expect("cluster has redis");
    let leases = (0..16)
        .map(|shard| format!("pgfanout:{{ingest}}:lease:{shard}"))
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(
        redis.command(&format!("EXISTS {leases}"))?.trim(),
        ":16",
        "the node holds every shard lease"
    );

    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut client = Client::connect(&cluster.node().ws_url()).await?;
        client.subscribe("orders").await?;
        clients.push(client);
    }
    // Opened before the signal: the node keeps answering it after it stopped accepting.
    let probe = Arc::new(Mutex::new(KeepAlive::open(port).await?));
    assert_eq!(probe.lock().await.get("/ready").await?.0, 200);

    let signalled = Instant::now();
    cluster.nodes[0].terminate()?;

    // Every client, when told to go, finds /ready already 503.
    let mut closes = Vec::new();
    for mut client in clients {
        let probe = probe.clone();
        closes.push(tokio::spawn(async move {
            let close = client.expect_close(GRACE).await?;
            let at = signalled.elapsed();
            let ready = probe.lock().await.get("/ready").await?;
            anyhow::Ok((close, at, ready))
        }));
    }

    let unready_after = common::eventually(Duration::from_secs(2), "/ready 503", || {
        let probe = probe.clone();
        async move {
            match probe.lock().await.get("/ready").await {
                Ok((503, body)) => Ok(body),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await?;
    let body: serde_json::Value = serde_json::from_str(&unready_after)?;
    assert_eq!(body["draining"], true, "{body}");
    let refused_after = common::eventually(Duration::from_secs(2), "connect refused", || async {
        match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(signalled.elapsed()),
            other => Err(format!("{other:?}")),
        }
    })
    .await?;

    let mut times = Vec::new();
    for close in closes {
        let ((code, reason), at, (ready_status, ready_body)) = close.await??;
        assert_eq!(code, SHUTDOWN_CODE, "close code ({reason})");
        assert_eq!(
            ready_status, 503,
            "a client was told to go while /ready said {ready_body}"
        );
        times.push(at);
    }
    times.sort();
    let (first, last) = (times[0], times[times.len() - 1]);
    let median = times[times.len() / 2];
    eprintln!(
        "drain: listener refused {refused_after:?} after SIGTERM; {CLIENTS} closes from \
         {first:?} to {last:?} (median {median:?}, spread {:?}) over a {DRAIN_WINDOW:?} window",
        last - first
    );
    assert!(
        last - first >= DRAIN_WINDOW / 4,
        "closes are not spread over the drain window: {times:?}"
    );
    assert!(
        last < GRACE,
        "last close {last:?} after SIGTERM, past the grace"
    );

    let status = cluster.nodes[0]
        .wait_exit(GRACE + Duration::from_secs(5))
        .await?;
    let exited = signalled.elapsed();
    eprintln!("drain: process exited {exited:?} after SIGTERM with {status}");
    assert_eq!(status.code(), Some(0), "exit status");
    assert!(
        exited < GRACE + Duration::from_secs(1),
        "exited after {exited:?}"
    );
    let held = redis.command(&format!("EXISTS {leases}"))?;
    assert_eq!(held.trim(), ":0", "shard leases released at exit");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() -> anyhow::Result<()> {
    let env = [
        ("PGFANOUT_DRAIN_WINDOW", "30s"),
        ("PGFANOUT_SHUTDOWN_GRACE", "40s"),
    ];
    let mut cluster = Cluster::start_with(1, &["orders"], true, &env).await;
    cluster.wait_bridged().await?;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut client = Client::connect(&cluster.node().ws_url()).await?;
        client.subscribe("orders").await?;
        clients.push(client);
    }
    let mut probe = KeepAlive::open(cluster.node().port()).await?;
    cluster.nodes[0].terminate()?;
    // Draining for sure before the second signal.
    let deadline = Instant::now() + Duration::from_secs(2);
    while probe.get("/ready").await?.0 != 503 {
        assert!(Instant::now() < deadline, "/ready never turned 503");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let second = Instant::now();
    cluster.nodes[0].terminate()?;
    let exit = cluster.nodes[0].wait_exit(Duration::from_secs(5)).await?;
    let took = second.elapsed();
    eprintln!("second signal: exited {took:?} after it with {exit}");
    assert_eq!(exit.code(), Some(130), "exit status after a second signal");

    // The drain was cut short: clients still connected lost their connection without
    // the shutdown close (with a 30 s window, most had not been told yet).
    let mut cut = 0;
    for mut client in clients {
        match client.expect_close(Duration::from_secs(5)).await {
            Ok((SHUTDOWN_CODE, _)) => {}
            _ => cut += 1,
        }
    }
    assert!(
        cut > 0,
        "every client got its 3001 before the exit: the drain was not cut short"
    );
    Ok(())
}
