//! What every accepted TCP connection gets before HTTP sees it: `TCP_NODELAY`, an optional
//! cap on its kernel send buffer, and a deadline for its HTTP request.
//!
//! hyper (as `axum::serve` runs it) has no timer, so a peer that opens TCP connections and
//! never sends a request, or sends its headers a byte at a time, would hold a socket and a
//! task forever: enough of them exhaust the node's file descriptors. [`Conn`] fails its reads
//! once its [`Deadline`] passes; [`track_requests`] pauses the deadline while a request is
//! served, re-arms it after the response (an idle keep-alive connection gets the same time
//! again), and lifts it for good once the connection became a WebSocket (the session's own
//! connect timeout and ping/pong take over).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// Socket settings for accepted connections.
#[derive(Debug, Clone, Copy)]
pub struct SocketOptions {
    /// How long a connection may take to send its HTTP request (and may idle between
    /// requests on a kept-alive connection).
    pub request_timeout: Duration,
    /// `SO_SNDBUF` in bytes; 0 leaves the kernel's autotuning.
    pub send_buffer: u32,
}

impl Default for SocketOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
            send_buffer: 0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Reads fail from this instant on.
    Until(Instant),
    /// A request is being served.
    Paused,
    /// The connection is a WebSocket now.
    Lifted,
}

/// The request deadline of one connection, shared by its [`Conn`] and its requests.
#[derive(Debug, Clone)]
pub struct Deadline {
    state: Arc<Mutex<State>>,
    timeout: Duration,
}

impl Deadline {
    fn new(timeout: Duration) -> Self {
        Self {
            state: Arc::new(Mutex::new(State::Until(Instant::now() + timeout))),
            timeout,
        }
    }

    fn set(&self, state: State) {
        if let Ok(mut s) = self.state.lock() {
            *s = state;
        }
    }

    fn current(&self) -> Option<Instant> {
        match self.state.lock().map(|s| *s) {
            Ok(State::Until(at)) => Some(at),
            _ => None,
        }
    }

    /// A request arrived: no deadline while it is served.
    pub fn pause(&self) {
        self.set(State::Paused);
    }

    /// The response went out: the next request has the full timeout again.
    pub fn rearm(&self) {
        self.set(State::Until(Instant::now() + self.timeout));
    }

    /// The connection was upgraded: no deadline any more.
    pub fn lift(&self) {
        self.set(State::Lifted);
    }
}

/// An accepted TCP connection whose reads fail with `TimedOut` once its deadline passed.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    deadline: Deadline,
    /// The timer for the deadline it was made for, so a wake-up comes when it passes.
    timer: Option<(Instant, Pin<Box<Sleep>>)>,
}

impl Conn {
    /// Applies `options` to `io` (best effort: a socket option the platform refuses is
    /// skipped) and starts its deadline.
    pub fn new(io: TcpStream, options: SocketOptions) -> Self {
        let _ = io.set_nodelay(true);
        if options.send_buffer > 0 {
            let _ = socket2::SockRef::from(&io).set_send_buffer_size(options.send_buffer as usize);
        }
        Self {
            io,
            deadline: Deadline::new(options.request_timeout),
            timer: None,
        }
    }

    pub fn deadline(&self) -> &Deadline {
        &self.deadline
    }

    /// Whether the deadline passed (registering a wake-up for when it will).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(at) = self.deadline.current() else {
            self.timer = None;
            return false;
        };
        let timer = match &mut self.timer {
            Some((armed, timer)) if *armed == at => timer,
            slot => &mut slot.insert((at, Box::pin(tokio::time::sleep_until(at)))).1,
        };
        timer.as_mut().poll(cx).is_ready()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.expired(cx) {
            tracing::debug!("closing a connection that sent no HTTP request in time");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP request within the request timeout",
            )));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Middleware: pauses the connection's deadline while a request is served, then re-arms it,
/// or lifts it when the response switched protocols (a WebSocket).
pub async fn track_requests(request: Request, next: Next) -> Response {
    let deadline = request
        .extensions()
        .get::<ConnectInfo<crate::http::PeerAddr>>()
        .map(|info| info.0 .1.clone());
    if let Some(deadline) = &deadline {
        deadline.pause();
    }
    let response = next.run(request).await;
    if let Some(deadline) = deadline {
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            deadline.lift();
        } else {
            deadline.rearm();
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair(options: SocketOptions) -> (Conn, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (Conn::new(accepted.unwrap().0, options), client.unwrap())
    }

    fn options(ms: u64) -> SocketOptions {
        SocketOptions {
            request_timeout: Duration::from_millis(ms),
            send_buffer: 16 * 1024,
        }
    }

    #[tokio::test]
    async fn a_silent_peer_times_out_and_a_lifted_deadline_never_does() {
        let (mut conn, _client) = pair(options(100)).await;
        let mut buf = [0u8; 8];
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);

        let (mut conn, mut client) = pair(options(100)).await;
        conn.deadline().lift();
        tokio::time::sleep(Duration::from_millis(200)).await;
        client.write_all(b"hi").await.unwrap();
        assert_eq!(conn.read(&mut buf).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn a_paused_deadline_waits_and_rearming_gives_the_full_time_again() {
        let (mut conn, mut client) = pair(options(150)).await;
        conn.deadline().pause();
        tokio::time::sleep(Duration::from_millis(200)).await;
        client.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(conn.read(&mut buf).await.unwrap(), 1);
        conn.deadline().rearm();
        let started = Instant::now();
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(140));
    }
}
