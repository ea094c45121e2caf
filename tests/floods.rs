//! Floods (issue #9, G7): a client sending commands as fast as it can, one opening connections
//! as fast as it can, one subscribing to 10,000 channels, one sending 10 MB messages, clients that
//! open the WebSocket and never speak (or never even send their HTTP request), and a half-open
//! connection that stops reading and writing.
//! Each is limited or cut with its documented code (proto/README.md §6, §7, §10), and a
//! well-behaved client on the same node receives every notification sent meanwhile, in order.
//!
//! Flooders that write without pause use a raw split WebSocket, so they read while they write.
//! The node may reset such a connection (it closes with unread input in its socket buffer),
//! and the reset can overtake the close frame: so the close is checked on the node's
//! `connections_closed_total{reason}` metric, and on the close frame whenever one arrived.

use crate::common;

use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use common::{with_traffic, Client, Cluster, Node};
use futures_util::{SinkExt as _, Stream, StreamExt as _};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::{self, Message};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const CHANNEL: &str = "orders";
const WAIT: Duration = Duration::from_secs(30);

/// One node on Redis LISTENing on [`CHANNEL`], and an observer subscribed to it.
async fn start(env: &[(&str, &str)]) -> anyhow::Result<(Cluster, Client)> {
    let cluster = Cluster::start_with(1, &[CHANNEL], true, env).await;
    cluster.wait_bridged().await?;
    let mut observer = Client::connect(&cluster.node().ws_url()).await?;
    observer.subscribe(CHANNEL).await?;
    Ok((cluster, observer))
}

/// A raw WebSocket that has sent `connect` (id 1) and read its result.
async fn raw_connected(url: &str) -> anyhow::Result<Ws> {
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .context("handshake timed out")??;
    ws.send(Message::text(r#"{"id":1,"connect":{}}"#)).await?;
    let (code, replies) = read_until(&mut ws, WAIT, |v| v["id"] == 1).await?;
    ensure!(
        code.is_none(),
        "closed with {code:?} before the connect reply"
    );
    ensure!(
        replies.last().is_some_and(|r| r.get("connect").is_some()),
        "connect refused: {replies:?}"
    );
    Ok(ws)
}

/// Reads JSON lines until `stop` accepts one, the server closes, or `timeout` passes.
/// Returns the close code (`Some` once closed; 1006 when the connection ended without a close
/// frame) and every JSON value read.
async fn read_until<S>(
    stream: &mut S,
    timeout: Duration,
    mut stop: impl FnMut(&Value) -> bool,
) -> anyhow::Result<(Option<u16>, Vec<Value>)>
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let deadline = Instant::now() + timeout;
    let mut values = Vec::new();
    loop {
        let message = match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => bail!("timed out after {timeout:?}; read {} values", values.len()),
            Ok(None | Some(Err(_))) => return Ok((Some(1006), values)),
            Ok(Some(Ok(message))) => message,
        };
        match message {
            Message::Text(text) => {
                for line in text.as_str().lines().filter(|l| !l.trim().is_empty()) {
                    let value: Value = serde_json::from_str(line)?;
                    let done = stop(&value);
                    values.push(value);
                    if done {
                        return Ok((None, values));
                    }
                }
            }
            Message::Close(frame) => {
                return Ok((Some(frame.map_or(1005, |f| u16::from(f.code))), values));
            }
            _ => {}
        }
    }
}

/// `connections_closed_total{reason}` of the node.
async fn closed(node: &Node, reason: &str) -> anyhow::Result<f64> {
    node.metric_where(
        "pgfanout_connections_closed_total",
        &format!("reason=\"{reason}\""),
    )
    .await
}

/// Waits until the node counted `n` connections closed for `reason`.
async fn wait_closed(node: &Node, reason: &str, n: f64) -> anyhow::Result<()> {
    common::eventually(WAIT, &format!("{n} closed as {reason}"), || async {
        match closed(node, reason).await {
            Ok(got) if got >= n => Ok(()),
            Ok(got) => Err(format!("{got}")),
            Err(err) => Err(format!("{err:#}")),
        }
    })
    .await
}

/// Resident memory of the node process, in KiB (0 when unknown).
pub fn rss_kib(node: &Node) -> u64 {
    let Some(pid) = node.pid() else { return 0 };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// One client writing cheap commands (50 per message, each answered 108) as fast as the socket
/// takes them, while reading; returns messages sent, replies read and the close code.
async fn command_flood(url: &str) -> anyhow::Result<(u64, Vec<Value>, Option<u16>)> {
    let (mut sink, mut stream) = raw_connected(url).await?.split();
    let message: String = (2..52)
        .map(|id| format!("{{\"id\":{id},\"history\":{{\"channel\":\"{CHANNEL}\"}}}}\n"))
        .collect();
    let sent = std::cell::Cell::new(0u64);
    let writer = async {
        while sink.send(Message::text(message.clone())).await.is_ok() {
            sent.set(sent.get() + 1);
        }
    };
    let reader = read_until(&mut stream, WAIT, |_| false);
    tokio::pin!(reader, writer);
    let (code, replies) = tokio::select! {
        read = &mut reader => read?,
        () = &mut writer => reader.await?,
    };
    Ok((sent.get(), replies, code))
}

#[tokio::test]
async fn command_flood_is_cut_with_too_many_requests_and_spares_others() -> anyhow::Result<()> {
    const FLOODERS: usize = 5;
    let (cluster, mut observer) =
        start(&[("PGFANOUT_LIMIT_INBOUND_BYTES_PER_SECOND", "20000")]).await?;
    let node = cluster.node();
    let flood = async {
        let mut outcomes = Vec::new();
        for _ in 0..FLOODERS {
            outcomes.push(command_flood(&node.ws_url()).await?);
        }
        Ok(outcomes)
    };
    let (outcomes, traffic) = with_traffic(&cluster.db, CHANNEL, &mut observer, flood).await?;
    traffic.check_complete()?;
    for (sent, replies, code) in &outcomes {
        let limited = replies.iter().filter(|r| r["error"]["code"] == 111).count();
        eprintln!(
            "command flood: {sent} messages of 50 commands sent, {} replies read ({limited} of \
             them 111), close {code:?}",
            replies.len()
        );
        ensure!(
            matches!(code, Some(3013 | 1006)),
            "flooder closed with {code:?}"
        );
    }
    eprintln!(
        "observer got {} of {} notifications",
        traffic.received.len(),
        traffic.sent
    );
    wait_closed(node, "too_many_requests", FLOODERS as f64).await?;
    Ok(())
}

/// What one connection of the connection flood got.
enum Attempt {
    /// Connected; kept open until the end of the flood (dropping it closes it).
    Held(#[allow(dead_code)] Box<Client>),
    /// Closed with this code, after this error reply (if any).
    Refused(u16, Option<u64>),
}

async fn attempt(url: String) -> anyhow::Result<Attempt> {
    let mut client = Client::open(&url).await?;
    match client.call("connect", json!({})).await {
        Ok(Ok(_)) => Ok(Attempt::Held(Box::new(client))),
        Ok(Err(error)) => {
            let (code, _) = client.expect_close(WAIT).await?;
            Ok(Attempt::Refused(code, Some(error.code)))
        }
        Err(err) => match client.close_frame() {
            Some((code, _)) => Ok(Attempt::Refused(*code, None)),
            None => Err(err),
        },
    }
}

#[tokio::test]
async fn connection_flood_is_refused_by_connect_rate_and_connection_limits() -> anyhow::Result<()> {
    const ATTEMPTS: usize = 400;
    const CONCURRENCY: usize = 50;
    const PER_USER: usize = 30;
    let per_user = PER_USER.to_string();
    let (cluster, mut observer) = start(&[
        ("PGFANOUT_LIMIT_CONNECT_PER_SECOND", "50"),
        ("PGFANOUT_LIMIT_CONNECTIONS_PER_USER", &per_user),
    ])
    .await?;
    let node = cluster.node();
    let url = node.ws_url();
    let flood = async {
        let started = Instant::now();
        let attempts: Vec<anyhow::Result<Attempt>> =
            futures_util::stream::iter((0..ATTEMPTS).map(|_| attempt(url.clone())))
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
        Ok((attempts, started.elapsed()))
    };
    let ((attempts, took), traffic) =
        with_traffic(&cluster.db, CHANNEL, &mut observer, flood).await?;
    traffic.check_complete()?;
    let (mut held, mut rate_limited, mut at_limit, mut other) = (0, 0, 0, Vec::new());
    for attempt in attempts {
        match attempt? {
            Attempt::Held(_) => held += 1,
            Attempt::Refused(3013, Some(111)) => rate_limited += 1,
            Attempt::Refused(3504, None) => at_limit += 1,
            Attempt::Refused(code, error) => other.push((code, error)),
        }
    }
    eprintln!(
        "connection flood: {ATTEMPTS} attempts in {took:?}: {held} held, {rate_limited} refused \
         111+3013 (connect rate), {at_limit} closed 3504 (connections per user); observer got {} \
         of {}",
        traffic.received.len(),
        traffic.sent
    );
    ensure!(other.is_empty(), "unexpected outcomes: {other:?}");
    // When a limiter call to Redis fails (a loaded machine: its timeout is short), the node
    // counts locally meanwhile, and those connections are not in Redis' count afterwards
    // (README, Limits): on one node the bound is then the limit twice.
    let degraded = node
        .metric_where(
            "pgfanout_rate_limit_decisions_total",
            "action=\"connections\",outcome=\"allowed\",scope=\"local\"",
        )
        .await?;
    let bound = if degraded > 0.0 {
        2 * PER_USER
    } else {
        PER_USER
    };
    eprintln!(
        "connection flood: {} connections admitted by the local fallback",
        degraded as u64
    );
    // The observer is the same subject (127.0.0.1) and holds one of the slots.
    ensure!(held < bound, "{held} connections held (bound {bound})");
    ensure!(rate_limited > 0 && at_limit > 0, "both limits should bite");
    Ok(())
}

#[tokio::test]
async fn subscribing_to_10000_channels_stops_at_the_channel_limit() -> anyhow::Result<()> {
    const CHANNELS: usize = 10_000;
    const LIMIT: usize = 1000;
    let limit = LIMIT.to_string();
    let (cluster, mut observer) = start(&[("PGFANOUT_MAX_SUBSCRIPTIONS", &limit)]).await?;
    let node = cluster.node();
    let flood = async {
        let (mut sink, mut stream) = raw_connected(&node.ws_url()).await?.split();
        let writer = async {
            // 100 commands per message: the most one message may carry.
            for batch in 0..CHANNELS / 100 {
                let message: String = (0..100)
                    .map(|i| {
                        let id = 2 + batch * 100 + i;
                        format!("{{\"id\":{id},\"subscribe\":{{\"channel\":\"many.{id}\"}}}}\n")
                    })
                    .collect();
                sink.send(Message::text(message)).await?;
            }
            anyhow::Ok(sink)
        };
        let mut replies = 0;
        let reader = read_until(&mut stream, Duration::from_secs(120), |v| {
            replies += usize::from(v.get("id").is_some());
            replies == CHANNELS
        });
        let (sink, read) = tokio::join!(writer, reader);
        let (code, values) = read?;
        ensure!(code.is_none(), "closed with {code:?}");
        let mut sink = sink?;
        // The connection lives on and answers.
        sink.send(Message::text(
            r#"{"id":99999,"unsubscribe":{"channel":"many.2"}}"#,
        ))
        .await?;
        let (code, after) = read_until(&mut stream, WAIT, |v| v["id"] == 99999).await?;
        ensure!(code.is_none(), "closed with {code:?} after the flood");
        ensure!(
            after.last().is_some_and(|v| v.get("unsubscribe").is_some()),
            "unsubscribe after the flood: {after:?}"
        );
        // Read while the flooder still holds its subscriptions.
        let subscriptions = node.metric_sum("pgfanout_subscriptions").await?;
        Ok((values, subscriptions))
    };
    let ((values, subscriptions), traffic) =
        with_traffic(&cluster.db, CHANNEL, &mut observer, flood).await?;
    traffic.check_complete()?;
    let ok = values
        .iter()
        .filter(|v| v.get("subscribe").is_some())
        .count();
    let refused = values.iter().filter(|v| v["error"]["code"] == 106).count();
    eprintln!(
        "10,000 subscribes: {ok} accepted, {refused} refused with 106; node holds \
         {subscriptions} subscriptions; RSS {} KiB",
        rss_kib(node)
    );
    ensure!(
        (ok, refused) == (LIMIT, CHANNELS - LIMIT),
        "{ok} accepted, {refused} refused"
    );
    // The observer's one, and the limit less the one unsubscribed.
    ensure!(
        subscriptions == LIMIT as f64,
        "{subscriptions} subscriptions"
    );
    Ok(())
}

/// Sends one message of `bytes` as a single frame (`fragment` 0) or in fragments of
/// `fragment` bytes, while reading; returns the close code seen, if any.
async fn send_huge(url: &str, bytes: usize, fragment: usize) -> anyhow::Result<Option<u16>> {
    let (mut sink, mut stream) = raw_connected(url).await?.split();
    let payload = format!(
        "{{\"id\":2,\"publish\":{{\"channel\":\"{CHANNEL}\",\"data\":\"{}\"}}}}",
        "x".repeat(bytes)
    );
    let writer = async {
        if fragment == 0 {
            let _ = sink.send(Message::text(payload)).await;
            return;
        }
        let chunks: Vec<&[u8]> = payload.as_bytes().chunks(fragment).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let opcode = if i == 0 {
                OpCode::Data(Data::Text)
            } else {
                OpCode::Data(Data::Continue)
            };
            let frame = Frame::message(chunk.to_vec(), opcode, i + 1 == chunks.len());
            if sink.send(Message::Frame(frame)).await.is_err() {
                return;
            }
        }
    };
    let reader = read_until(&mut stream, WAIT, |_| false);
    tokio::pin!(reader, writer);
    let (code, _) = tokio::select! {
        read = &mut reader => read?,
        () = &mut writer => reader.await?,
    };
    Ok(code)
}

#[tokio::test]
async fn ten_megabyte_messages_are_cut_with_bad_request() -> anyhow::Result<()> {
    const TEN_MB: usize = 10 * 1024 * 1024;
    let (cluster, mut observer) = start(&[]).await?;
    let node = cluster.node();
    let before = rss_kib(node);
    let flood = async {
        let whole = send_huge(&node.ws_url(), TEN_MB, 0).await?;
        let fragmented = send_huge(&node.ws_url(), TEN_MB, 16 * 1024).await?;
        Ok((whole, fragmented))
    };
    let ((whole, fragmented), traffic) =
        with_traffic(&cluster.db, CHANNEL, &mut observer, flood).await?;
    traffic.check_complete()?;
    eprintln!(
        "10 MB messages: one frame closed {whole:?}, 16 KiB fragments closed {fragmented:?}; \
         node RSS {before} KiB before, {} KiB after",
        rss_kib(node)
    );
    for code in [whole, fragmented] {
        ensure!(matches!(code, Some(3501 | 1006)), "closed with {code:?}");
    }
    wait_closed(node, "bad_request", 2.0).await?;
    Ok(())
}

#[tokio::test]
async fn clients_that_never_speak_are_closed_as_stale() -> anyhow::Result<()> {
    const SILENT: usize = 100;
    let (cluster, mut observer) = start(&[("PGFANOUT_CONNECT_TIMEOUT", "2s")]).await?;
    let node = cluster.node();
    let url = node.ws_url();
    let flood = async {
        let started = Instant::now();
        let silent = (0..SILENT).map(|_| async {
            let mut client = Client::open(&url).await?;
            let (code, _) = client.expect_close(WAIT).await?;
            anyhow::Ok((code, started.elapsed()))
        });
        // Below the WebSocket: TCP connections that never send their HTTP request, or send
        // half of its headers, are closed too (else each would hold a socket forever).
        let below = (0..SILENT).map(|i| async move {
            let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", node.port())).await?;
            if i % 2 == 1 {
                tcp.write_all(b"GET /connection/websocket HTTP/1.1\r\nHost: x\r\n")
                    .await?;
            }
            let mut buf = [0u8; 64];
            // EOF or a reset both mean the node closed it.
            let _ = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await?;
            anyhow::Ok(started.elapsed())
        });
        let (silent, below) = tokio::join!(
            futures_util::future::join_all(silent),
            futures_util::future::join_all(below)
        );
        let below: anyhow::Result<Vec<Duration>> = below.into_iter().collect();
        (silent, below)
    };
    let ((closes, below), traffic) = with_traffic(&cluster.db, CHANNEL, &mut observer, async {
        Ok(flood.await)
    })
    .await?;
    traffic.check_complete()?;
    let below_slowest = below?.into_iter().max().unwrap_or_default();
    eprintln!(
        "{SILENT} TCP connections without an HTTP request closed, the last after {below_slowest:?}"
    );
    ensure!(
        below_slowest < Duration::from_secs(6),
        "the last TCP connection without a request closed after {below_slowest:?}"
    );
    let mut slowest = Duration::ZERO;
    for close in closes {
        let (code, after) = close?;
        ensure!(code == 3502, "closed with {code}");
        slowest = slowest.max(after);
    }
    eprintln!("{SILENT} silent WebSockets closed 3502, the last after {slowest:?}");
    ensure!(
        slowest < Duration::from_secs(6),
        "last closed after {slowest:?}"
    );
    wait_closed(node, "stale", SILENT as f64).await?;
    Ok(())
}

#[tokio::test]
async fn a_half_open_connection_is_cut_by_the_pong_timeout() -> anyhow::Result<()> {
    let (cluster, mut observer) = start(&[
        ("PGFANOUT_PING_INTERVAL", "1s"),
        ("PGFANOUT_PONG_TIMEOUT", "1s"),
    ])
    .await?;
    let node = cluster.node();
    let mut silent = Client::connect(&node.ws_url()).await?;
    silent.subscribe(CHANNEL).await?;
    silent.set_answer_pings(false);
    let started = Instant::now();
    // The silent client neither reads nor writes (no FIN either) while traffic flows.
    let flood = async {
        wait_closed(node, "no_pong", 1.0).await?;
        Ok(started.elapsed())
    };
    let (cut_after, traffic) = with_traffic(&cluster.db, CHANNEL, &mut observer, flood).await?;
    traffic.check_complete()?;
    // What the node wrote before it gave up is still in the socket, the close frame last.
    let (code, reason) = silent.expect_close(WAIT).await?;
    eprintln!("half-open connection cut after {cut_after:?} with {code} {reason:?}");
    ensure!(code == 3012, "closed with {code} {reason:?}");
    ensure!(
        cut_after < Duration::from_secs(5),
        "cut after {cut_after:?} (ping 1 s + pong timeout 1 s)"
    );
    Ok(())
}
