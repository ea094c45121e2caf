//! One task per WebSocket connection: the connect handshake, the command loop, the
//! bounded outbound queue, ping/pong, and the close codes.
//!
//! The session is generic over any `Sink + Stream` of WebSocket messages, so unit tests
//! drive it with in-memory channels and the transport can change in one place.

mod access;
mod commands;
mod deadlines;
mod subscriptions;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;

use crate::auth::{Authenticator, Policy};
use crate::bus::Bus;
use crate::hub::Hub;
use crate::limits::Limiter;
use crate::mailbox::{Mailbox, Signal};
use crate::metrics as m;
use crate::protocol::{reply, DisconnectCode};
use deadlines::{Deadlines, Due};
use subscriptions::Subscriptions;

/// Outbound publications written per flush at most, so replies are not starved.
const WRITE_BATCH: usize = 64;
/// How long we try to deliver a close frame to a peer that may not read.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Settings every session of a node shares.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub node_id: Arc<str>,
    pub queue_size: usize,
    pub max_subscriptions: usize,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub connect_timeout: Duration,
    /// On shutdown each session waits a random part of this before closing.
    pub drain_window: Duration,
}

/// What a session needs from its node.
pub struct Shared {
    pub config: SessionConfig,
    pub hub: Arc<Hub>,
    pub bus: Bus,
    /// Verifies connection and subscription tokens.
    pub auth: Arc<Authenticator>,
    /// What clients may do without a token, origins, token grace.
    pub policy: Policy,
    /// Rate and connection limits.
    pub limits: Arc<Limiter>,
    /// Limited commands within 10 s that close a connection (0: never).
    pub abuse_threshold: u32,
    meters: Meters,
    next_id: AtomicU64,
}

impl Shared {
    /// Without [`Shared::with_auth`] no token verifies and nothing is allowed anonymously.
    pub fn new(config: SessionConfig, hub: Arc<Hub>, bus: Bus) -> Self {
        Self {
            config,
            hub,
            bus,
            auth: Arc::new(Authenticator::disabled()),
            policy: Policy::default(),
            limits: Arc::new(Limiter::unlimited()),
            abuse_threshold: 0,
            meters: Meters::new(),
            next_id: AtomicU64::new(1),
        }
    }

    pub fn with_limits(mut self, limits: Arc<Limiter>, abuse_threshold: u32) -> Self {
        self.limits = limits;
        self.abuse_threshold = abuse_threshold;
        self
    }

    pub fn with_auth(mut self, auth: Arc<Authenticator>, policy: Policy) -> Self {
        self.auth = auth;
        self.policy = policy;
        self
    }
}

/// A transport read error, classified: did the peer send something we refuse (too large,
/// invalid UTF-8, a protocol violation), or did the connection just break?
pub trait ReadError: std::fmt::Display {
    fn is_bad_input(&self) -> bool;
}

impl ReadError for axum::Error {
    fn is_bad_input(&self) -> bool {
        use std::error::Error as _;
        use tungstenite::error::ProtocolError;
        match self
            .source()
            .and_then(|e| e.downcast_ref::<tungstenite::Error>())
        {
            // A peer that vanished without a close frame just left (counted as
            // `client_closed`, not `bad_request`).
            Some(tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                false
            }
            Some(
                tungstenite::Error::Capacity(_)
                | tungstenite::Error::Protocol(_)
                | tungstenite::Error::Utf8(_)
                | tungstenite::Error::AttackAttempt,
            ) => true,
            _ => false,
        }
    }
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// We close with this code.
    Disconnect(DisconnectCode),
    /// The peer closed or vanished; nothing to send.
    PeerGone,
}

/// Runs one connection to its end. `shutdown` starts the drain.
pub fn run<S, E>(
    socket: S,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()>
where
    S: Sink<Message, Error = E> + Stream<Item = Result<Message, E>> + Unpin,
    E: ReadError,
{
    run_from(socket, shared, shutdown, None)
}

/// [`run`] for a client at `peer` (the subject of limits for anonymous clients).
///
/// Not an `async fn`: the socket is split (moved into its shared half) before the future
/// is made, so the future does not also keep the moved-from socket's space (368 bytes of
/// every session's task).
pub fn run_from<S, E>(
    socket: S,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    peer: Option<std::net::IpAddr>,
) -> impl std::future::Future<Output = ()>
where
    S: Sink<Message, Error = E> + Stream<Item = Result<Message, E>> + Unpin,
    E: ReadError,
{
    metrics::counter!(m::CONNECTIONS_ACCEPTED).increment(1);
    metrics::gauge!(m::CONNECTIONS_OPEN).increment(1.0);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let mailbox = Mailbox::new(shared.config.queue_size);
    let mut session = Session {
        shared: shared.clone(),
        client: None,
        subs: Subscriptions::new(id, mailbox.clone(), shared.hub.clone(), shared.bus.clone()),
        replies: Replies::default(),
        access: access::Access::new(peer, shared.limits.default_tier()),
    };
    let (mut sink, mut stream) = socket.split();
    // A block, not an `async fn` taking these: an `async fn` would keep each argument twice.
    async move {
        let end = session
            .drive(&mut sink, &mut stream, &mailbox, &shutdown)
            .await;
        // Nothing is read from here on: the hub's pushes are refused until the session has
        // left every channel (when it is dropped below).
        mailbox.close();
        let reason = match end {
            End::Disconnect(code) => {
                let frame = CloseFrame {
                    code: code.code(),
                    reason: Utf8Bytes::from_static(code.reason()),
                };
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.send(Message::Close(Some(frame))))
                    .await;
                code.label()
            }
            End::PeerGone => "client_closed",
        };
        tracing::debug!(session = id, reason, "connection closed");
        metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => reason).increment(1);
        metrics::gauge!(m::CONNECTIONS_OPEN).decrement(1.0);
        // Dropping `session` removes its subscriptions from the hub.
    }
}

struct Session {
    shared: Arc<Shared>,
    /// The client id, once `connect` succeeded.
    client: Option<String>,
    subs: Subscriptions,
    /// Replies to the frame being handled.
    replies: Replies,
    /// Identity and token deadlines.
    access: access::Access,
}

/// Metric handles of the write path, looked up once per node rather than per message
/// (they carry no labels, so every session shares them).
struct Meters {
    written: metrics::Counter,
    queue_depth: metrics::Histogram,
    latency: metrics::Histogram,
}

impl Meters {
    fn new() -> Self {
        Self {
            written: metrics::counter!(m::MESSAGES_WRITTEN),
            queue_depth: metrics::histogram!(m::CLIENT_QUEUE_DEPTH),
            latency: metrics::histogram!(m::DELIVERY_LATENCY),
        }
    }
}

impl Session {
    async fn drive<W, R, E>(
        &mut self,
        sink: &mut W,
        stream: &mut R,
        mailbox: &Mailbox,
        shutdown: &CancellationToken,
    ) -> End
    where
        W: Sink<Message, Error = E> + Unpin,
        R: Stream<Item = Result<Message, E>> + Unpin,
        E: ReadError,
    {
        let shared = self.shared.clone();
        let config = &shared.config;
        let mut deadlines = Deadlines {
            connect: Some(Instant::now() + config.connect_timeout),
            ..Deadlines::default()
        };
        // One timer for every deadline, reset only when the earliest one changes.
        let timer = sleep(Duration::MAX / 4);
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        // A session that starts while the node drains (its connection was accepted just
        // before the listener closed) is told to go as soon as its connect is answered (a
        // close before that would be an error to the SDK), or after the window at the latest.
        let late = shutdown.is_cancelled();
        let shutdown_seen = shutdown.cancelled();
        tokio::pin!(shutdown_seen);
        let mut draining = false;
        // The same for a session whose drain time came before its connect was answered (a
        // client that had just reconnected here): it goes right after the reply, or one
        // drain window later at the latest.
        let mut drain_due = false;
        let mut pinging = false;
        let mut awaiting_pong = false;

        loop {
            if (late || drain_due) && self.client.is_some() {
                return End::Disconnect(DisconnectCode::Shutdown);
            }
            if !pinging && self.client.is_some() {
                pinging = true;
                deadlines.connect = None;
                deadlines.ping = Some(Instant::now() + config.ping_interval);
            }
            if let Some(next) = self.access.rearm() {
                deadlines.expiry = next;
            }
            let next = deadlines.next();
            if next != armed {
                if let Some(at) = next {
                    timer.as_mut().reset(at);
                }
                armed = next;
            }
            tokio::select! {
                () = &mut shutdown_seen, if !draining => {
                    draining = true;
                    let part = if late { 1.0 } else { rand::random::<f64>() };
                    deadlines.drain = Some(Instant::now() + config.drain_window.mul_f64(part));
                }
                () = &mut timer, if armed.is_some() => {
                    armed = None;
                    while let Some(due) = deadlines.take_due(Instant::now()) {
                        match due {
                            Due::Connect | Due::DrainLate | Due::Pong => {
                                return End::Disconnect(match due {
                                    Due::Connect => DisconnectCode::Stale,
                                    Due::Pong => DisconnectCode::NoPong,
                                    _ => DisconnectCode::Shutdown,
                                });
                            }
                            Due::Drain => {
                                if late || self.client.is_some() {
                                    return End::Disconnect(DisconnectCode::Shutdown);
                                }
                                drain_due = true;
                                deadlines.drain_late = Some(Instant::now() + config.drain_window);
                            }
                            Due::Expiry => {
                                if let Err(end) = Box::pin(self.expire(sink, mailbox, config.pong_timeout)).await {
                                    return end;
                                }
                            }
                            Due::Ping => {
                                deadlines.ping = Some(Instant::now() + config.ping_interval);
                                let ping = Message::Text(Utf8Bytes::from_static("{}"));
                                if let Err(end) = guarded(mailbox, config.pong_timeout, send(sink, ping)).await {
                                    return end;
                                }
                                if !awaiting_pong {
                                    awaiting_pong = true;
                                    deadlines.pong = Some(Instant::now() + config.pong_timeout);
                                }
                            }
                        }
                    }
                }
                signal = mailbox.signal() => {
                    if let Signal::Kicked(code) = signal {
                        return End::Disconnect(code);
                    }
                    let write = self.write_publications(sink, mailbox);
                    if let Err(end) = guarded(mailbox, config.pong_timeout, write).await {
                        return end;
                    }
                }
                frame = stream.next() => {
                    let text = match frame {
                        None | Some(Ok(Message::Close(_))) => return End::PeerGone,
                        Some(Err(e)) if e.is_bad_input() => {
                            tracing::debug!(error = %e, "refusing client input");
                            return End::Disconnect(DisconnectCode::BadRequest);
                        }
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "websocket read failed");
                            return End::PeerGone;
                        }
                        Some(Ok(Message::Binary(_))) => return End::Disconnect(DisconnectCode::BadRequest),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        Some(Ok(Message::Text(text))) => text,
                    };
                    // Boxed: commands await Redis and Postgres, and their futures are large;
                    // inline they would make every idle session task that much bigger.
                    let handled = Box::pin(self.handle_frame(&text)).await;
                    if !self.replies.is_empty() {
                        // Replies go out even when the frame ends the connection, so the
                        // client learns why (e.g. a rate-limit error before the close).
                        let frame = Message::Text(Utf8Bytes::try_from(self.replies.take()).unwrap_or_default());
                        if let Err(end) = guarded(mailbox, config.pong_timeout, send(sink, frame)).await {
                            return end;
                        }
                    }
                    match handled {
                        Ok(true) => {
                            awaiting_pong = false;
                            deadlines.pong = None;
                        }
                        Ok(false) => {}
                        Err(code) => return End::Disconnect(code),
                    }
                }
            }
        }
    }

    /// Writes queued publications (up to a batch) and flushes once.
    async fn write_publications<W, E>(&mut self, sink: &mut W, mailbox: &Mailbox) -> Result<(), End>
    where
        W: Sink<Message, Error = E> + Unpin,
    {
        self.shared.meters.queue_depth.record(mailbox.len() as f64);
        let mut next = mailbox.pop();
        let mut written = 0;
        let mut publications = 0u64;
        // The oldest timestamp written: one latency sample per flush, the worst in it.
        let mut oldest = u64::MAX;
        while let Some(out) = next.take() {
            if let Some(frame) = self.subs.accept(&out) {
                let text = match frame {
                    subscriptions::Accepted::Publication => {
                        publications += 1;
                        if out.ts > 0 {
                            oldest = oldest.min(out.ts);
                        }
                        Utf8Bytes::try_from(out.frame.clone()).unwrap_or_default()
                    }
                    subscriptions::Accepted::Resubscribe(push) => {
                        Utf8Bytes::try_from(push).unwrap_or_default()
                    }
                };
                sink.feed(Message::Text(text))
                    .await
                    .map_err(|_| End::PeerGone)?;
                written += 1;
            }
            if written < WRITE_BATCH {
                next = mailbox.pop();
            }
        }
        sink.flush().await.map_err(|_| End::PeerGone)?;
        self.shared.meters.written.increment(publications);
        if oldest != u64::MAX {
            let micros = crate::bus::now_micros().saturating_sub(oldest);
            self.shared.meters.latency.record(micros as f64 / 1e6);
        }
        Ok(())
    }

    /// Handles every command of a text frame, appending replies. Returns whether the
    /// frame carried a pong.
    ///
    /// # Errors
    /// The disconnect code when the frame or a command ends the connection.
    async fn handle_frame(&mut self, text: &str) -> Result<bool, DisconnectCode> {
        let commands = crate::protocol::decode_frame(text).map_err(|e| {
            tracing::debug!(error = %e, "bad frame");
            DisconnectCode::BadRequest
        })?;
        let mut pong = false;
        // Inbound bytes count against the sender's limit once it is connected.
        let over_budget = self.admit_bytes(text.len()).await;
        for command in commands {
            pong |= matches!(command.method, crate::protocol::Method::Pong);
            if let Some(retry_after) = over_budget {
                if command.id != 0 {
                    self.reply_limited(command.id, retry_after);
                }
                continue;
            }
            if let Some(code) = self.handle_command(command).await {
                return Err(code);
            }
        }
        if self.access.abusive() {
            return Err(DisconnectCode::TooManyRequests);
        }
        Ok(pong)
    }

    fn reply_error(&mut self, id: u32, code: crate::protocol::ErrorCode) {
        self.replies.error(id, code);
    }

    /// Error 111 with retry advice; counts toward closing an abusive connection.
    fn reply_limited(&mut self, id: u32, retry_after: Duration) {
        let ms = u64::try_from(retry_after.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        reply::write_error_retry(
            self.replies.next(),
            id,
            crate::protocol::ErrorCode::TooManyRequests,
            ms,
        );
        self.access.strike(self.shared.abuse_threshold);
    }
}

/// Replies to one inbound frame, newline-delimited into one outbound frame.
#[derive(Default)]
struct Replies(Vec<u8>);

impl Replies {
    fn next(&mut self) -> &mut Vec<u8> {
        if !self.0.is_empty() {
            self.0.push(b'\n');
        }
        &mut self.0
    }

    fn result<T: serde::Serialize>(&mut self, id: u32, method: &str, result: &T) {
        reply::write_result(self.next(), id, method, result);
    }

    fn error(&mut self, id: u32, code: crate::protocol::ErrorCode) {
        reply::write_error(self.next(), id, code);
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

async fn send<W, E>(sink: &mut W, message: Message) -> Result<(), End>
where
    W: Sink<Message, Error = E> + Unpin,
{
    sink.send(message).await.map_err(|_| End::PeerGone)
}

/// Runs a write unless the session is kicked first or the peer stops reading for
/// longer than `limit` (then it is cut as slow).
async fn guarded<F>(mailbox: &Mailbox, limit: Duration, write: F) -> Result<(), End>
where
    F: std::future::Future<Output = Result<(), End>>,
{
    // Most writes complete at once (the socket has room): only a write that has to wait
    // pays for the kick watch and the timer.
    let mut write = std::pin::pin!(write);
    if let Some(result) = futures_util::FutureExt::now_or_never(write.as_mut()) {
        return result;
    }
    // Boxed, so the kick watch and the timer are not part of every idle session's task.
    Box::pin(async move {
        tokio::select! {
            biased;
            code = mailbox.until_kicked() => Err(End::Disconnect(code)),
            result = tokio::time::timeout(limit, write) => result.unwrap_or(Err(End::Disconnect(DisconnectCode::Slow))),
        }
    })
    .await
}

/// A random client id in the UUID v4 format SDKs expect.
fn new_client_id() -> String {
    let b: [u8; 16] = rand::random();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-4{}-{}{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        ["8", "9", "a", "b"][usize::from(b[8] & 3)],
        &hex[17..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests;
