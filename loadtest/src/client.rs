//! One client connection: TCP (from a chosen source address), WebSocket upgrade,
//! `connect` + `subscribe` in one frame, then reading pushes until told to stop.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::payload;
use crate::scenario::Protocol;
use crate::stats::Stats;

/// What one connection needs to start.
pub struct Plan {
    pub url: String,
    pub source: Option<Ipv4Addr>,
    pub channels: Vec<String>,
    /// Indices of `channels` (as in the payload's `c`).
    pub channel_ids: Vec<u32>,
    pub timeout: Duration,
    pub protocol: Protocol,
    /// This run's id: publications of other runs are not counted.
    pub run: u64,
}

/// Small buffers: the tool holds as many idle sockets as the gateway does.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(1 << 20)
}

/// Host and port of a `ws://host:port/path` URL.
fn target(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| anyhow!("only ws:// URLs: {url}"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    std::net::ToSocketAddrs::to_socket_addrs(&authority)?
        .next()
        .ok_or_else(|| anyhow!("no address for {authority}"))
}

async fn tcp(addr: SocketAddr, source: Option<Ipv4Addr>) -> anyhow::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let (Some(src), true) = (source, addr.ip().is_loopback()) {
        bind_no_port(&socket);
        socket.bind(SocketAddr::new(IpAddr::V4(src), 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Lets the kernel pick the source port at connect time, by the full 4-tuple, so a
/// bound source address is not limited to one range of ports for all destinations.
fn bind_no_port(socket: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid fd and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

pub type Ws = WebSocketStream<TcpStream>;

/// A WebSocket to `url` from `source` (TCP_NODELAY, small buffers).
pub async fn connect(url: &str, source: Option<Ipv4Addr>) -> anyhow::Result<Ws> {
    let stream = tcp(target(url)?, source).await.context("tcp connect")?;
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config()))
        .await
        .context("websocket upgrade")?;
    Ok(ws)
}

/// Connects and subscribes; returns the socket once every subscribe is answered.
async fn open(plan: &Plan) -> anyhow::Result<Ws> {
    match plan.protocol {
        Protocol::Centrifugo => open_centrifugo(connect(&plan.url, plan.source).await?, plan).await,
        Protocol::Socketio => open_socketio(connect(&plan.url, plan.source).await?, plan).await,
        // No subscribe reply: the upgrade is the subscription. For a channel new to that
        // nginx, Nchan subscribes in Redis after answering the upgrade, so a publication
        // sent within milliseconds may miss it; in the scenarios each channel's first
        // subscriber connects long before the first step.
        Protocol::Nchan => connect(&nchan_url(&plan.url, &plan.channels), plan.source).await,
    }
}

/// Nchan's subscriber URL: the channel ids after the `/sub/` prefix, several joined by
/// the `nchan_channel_id_split_delimiter` of `baselines/nchan/nginx.conf.in` (`,`).
fn nchan_url(prefix: &str, channels: &[String]) -> String {
    format!("{prefix}{}", channels.join(","))
}

/// `connect` and every `subscribe` in one frame; open when every reply is in.
async fn open_centrifugo(mut ws: Ws, plan: &Plan) -> anyhow::Result<Ws> {
    let mut frame = String::from(r#"{"id":1,"connect":{"name":"loadtest"}}"#);
    for (i, channel) in plan.channels.iter().enumerate() {
        frame.push_str(&format!(
            "\n{{\"id\":{},\"subscribe\":{{\"channel\":\"{channel}\"}}}}",
            i + 2
        ));
    }
    ws.send(Message::text(frame)).await?;
    let mut answered = 0;
    while answered < plan.channels.len() + 1 {
        let msg = ws
            .next()
            .await
            .ok_or_else(|| anyhow!("closed during connect"))??;
        let Message::Text(text) = msg else {
            if let Message::Close(frame) = msg {
                bail!("closed during connect: {frame:?}");
            }
            continue;
        };
        for line in text.as_str().lines() {
            if line.starts_with("{\"id\"") {
                if line.contains("\"error\"") {
                    bail!("refused: {line}");
                }
                answered += 1;
            }
        }
    }
    Ok(ws)
}

/// The next text frame, or why there is none.
async fn next_text(ws: &mut Ws) -> anyhow::Result<String> {
    loop {
        match ws
            .next()
            .await
            .ok_or_else(|| anyhow!("closed during connect"))??
        {
            Message::Text(text) => return Ok(text.as_str().to_owned()),
            Message::Close(frame) => bail!("closed during connect: {frame:?}"),
            _ => {}
        }
    }
}

/// Engine.IO open (`0{…}`) → namespace connect (`40`) → one `subscribe` event with an
/// ack per channel (`42<id>[…]` answered by `43<id>[…]`).
async fn open_socketio(mut ws: Ws, plan: &Plan) -> anyhow::Result<Ws> {
    let open = next_text(&mut ws).await?;
    if !open.starts_with('0') {
        bail!("expected an Engine.IO open packet, got {open}");
    }
    ws.send(Message::text("40")).await?;
    loop {
        let text = next_text(&mut ws).await?;
        if text.starts_with("40") {
            break;
        }
        if text.starts_with("44") {
            bail!("namespace refused: {text}");
        }
    }
    for (i, channel) in plan.channels.iter().enumerate() {
        ws.send(Message::text(format!("42{i}[\"subscribe\",\"{channel}\"]")))
            .await?;
    }
    let mut answered = 0;
    while answered < plan.channels.len() {
        let text = next_text(&mut ws).await?;
        if text.starts_with("43") {
            answered += 1;
        } else if text == "2" {
            ws.send(Message::text("3")).await?;
        }
    }
    Ok(ws)
}

/// Where this connection is in each channel's sequence: the highest sequence seen and
/// which of the 64 before it arrived, so a late (reordered) publication is told apart
/// from a duplicate.
struct Seen {
    channel_ids: Vec<u32>,
    last: Vec<u64>,
    window: Vec<u64>,
}

impl Seen {
    fn new(channel_ids: Vec<u32>) -> Self {
        let n = channel_ids.len();
        Self {
            channel_ids,
            last: vec![0; n],
            window: vec![0; n],
        }
    }

    fn record(&mut self, d: payload::Delivered, stats: &mut Stats) {
        let Some(i) = self.channel_ids.iter().position(|&c| c == d.channel) else {
            return;
        };
        let (last, window) = (&mut self.last[i], &mut self.window[i]);
        if d.seq > *last {
            let jump = d.seq - *last;
            // The first publication a connection sees sets its place: earlier ones were
            // published before it subscribed.
            if *last != 0 {
                stats.gaps += jump - 1;
            }
            *window = if jump >= 64 {
                0
            } else {
                (*window << jump) | (1 << (jump - 1))
            };
            *last = d.seq;
        } else {
            let back = *last - d.seq;
            if back == 0 || back > 64 || *window & (1 << (back - 1)) != 0 {
                stats.duplicates += 1;
                return;
            }
            *window |= 1 << (back - 1);
            stats.gaps = stats.gaps.saturating_sub(1);
            stats.reordered += 1;
        }
        stats.deliveries += 1;
        stats.record_latency(payload::now_micros().saturating_sub(d.ts));
    }
}

/// What a server heartbeat looks like in a text frame, and our answer (Nchan's, when it
/// is turned on, are WebSocket pings, which the WebSocket layer answers).
fn heartbeat(protocol: Protocol) -> Option<(&'static [u8], &'static str)> {
    match protocol {
        Protocol::Centrifugo => Some((b"{}", "{}")),
        Protocol::Socketio => Some((b"2", "3")),
        Protocol::Nchan => None,
    }
}

/// Runs one connection until `stop` turns true; counts into `stats`.
pub async fn run(
    plan: Plan,
    stats: Rc<RefCell<Stats>>,
    mut stop: watch::Receiver<bool>,
    opened: Rc<dyn Fn()>,
) {
    let start = Instant::now();
    let result = tokio::time::timeout(plan.timeout, open(&plan)).await;
    let mut ws = match result {
        Ok(Ok(ws)) => {
            let mut s = stats.borrow_mut();
            s.opened += 1;
            s.record_connect(start.elapsed().as_micros() as u64);
            for &c in &plan.channel_ids {
                let c = c as usize;
                if s.subscribed.len() <= c {
                    s.subscribed.resize(c + 1, 0);
                }
                s.subscribed[c] += 1;
            }
            drop(s);
            opened();
            ws
        }
        Ok(Err(e)) => {
            let mut s = stats.borrow_mut();
            s.failed += 1;
            s.error(format!("{e:#}"));
            drop(s);
            opened();
            return;
        }
        Err(_) => {
            let mut s = stats.borrow_mut();
            s.failed += 1;
            s.error(format!("connect+subscribe took over {:?}", plan.timeout));
            drop(s);
            opened();
            return;
        }
    };
    let run = plan.run;
    let mut seen = Seen::new(plan.channel_ids);
    let heartbeat = heartbeat(plan.protocol);
    drop(plan.channels);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            msg = ws.next() => {
                let text = match msg {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        if !*stop.borrow() {
                            stats.borrow_mut().closed_by_server += 1;
                        }
                        return;
                    }
                    Some(Ok(_)) => continue,
                };
                let mut pong = false;
                {
                    let mut s = stats.borrow_mut();
                    s.bytes += text.len() as u64;
                    for line in text.as_bytes().split(|&b| b == b'\n') {
                        if heartbeat.is_some_and(|(ping, _)| line == ping) {
                            pong = true;
                        } else if let Some(d) = payload::decode(line) {
                            if d.run == run {
                                seen.record(d, &mut s);
                            } else {
                                s.foreign += 1;
                            }
                        }
                    }
                }
                if let (true, Some((_, answer))) = (pong, heartbeat) {
                    if ws.send(Message::text(answer)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_target_of_a_url() {
        assert_eq!(
            target("ws://127.0.0.1:8000/connection/websocket").unwrap(),
            "127.0.0.1:8000".parse().unwrap()
        );
        assert!(target("wss://x/").is_err());
    }

    #[test]
    fn nchan_subscribes_to_its_channels_in_the_url() {
        let channels = ["bench3".to_owned(), "bench4".to_owned()];
        assert_eq!(
            nchan_url("ws://127.0.0.1:9000/sub/", &channels[..1]),
            "ws://127.0.0.1:9000/sub/bench3"
        );
        assert_eq!(
            nchan_url("ws://127.0.0.1:9000/sub/", &channels),
            "ws://127.0.0.1:9000/sub/bench3,bench4"
        );
    }

    #[test]
    fn counts_duplicates_and_gaps_by_sequence() {
        let mut stats = Stats::default();
        let mut seen = Seen::new(vec![7]);
        let d = |seq| payload::Delivered {
            run: 0,
            channel: 7,
            seq,
            ts: payload::now_micros(),
        };
        for seq in [1, 2, 2, 5, 3, 6, 3, 200, 1] {
            seen.record(d(seq), &mut stats);
        }
        // 3 arrived late (reordered, not lost); 4 and 7..199 never came.
        assert_eq!(
            (
                stats.deliveries,
                stats.duplicates,
                stats.reordered,
                stats.gaps
            ),
            (6, 3, 1, 1 + 193)
        );
    }
}
