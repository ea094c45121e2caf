//! The drain (G8): what happens between SIGTERM and exit, in order.
//!
//! 1. `/ready` turns 503 ([`Health::start_draining`]), then the drain token is cancelled:
//!    the listener closes its socket ([`StopAccepting`]; HTTP connections already open keep
//!    being answered) and every session closes with 3001 (shutdown, reconnect) after its
//!    own random part of the drain window (a session that starts meanwhile, from a
//!    connection accepted just before, too; a session whose connect is not answered yet
//!    when its time comes goes right after the reply, so the SDK never sees its connect
//!    fail). A WebSocket counts as a session from its upgrade request on, so the drain
//!    also waits for one whose 101 went out before the session task started.
//! 2. Once the sessions are gone: the [`Tasks::ingest`] stage stops. Ingest keeps bridging
//!    until then, so nothing published during the drain is missed. Stopping ends the LISTEN
//!    loop and the outbox claimers at once; the shard bridges first publish what was
//!    received (until the stage's deadline, [`Stage::deadline`]), then the leases are
//!    released while Redis is still connected, so that another node takes them over.
//! 3. The [`Tasks::background`] stage stops (bus subscriber, health checks).
//! 4. The HTTP server lets its last connections finish.
//!
//! Every step has a deadline inside the shutdown grace, counted from the signal; a step
//! that overruns is reported and the next one starts anyway, so the process always exits
//! within the grace.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::conn::{Conn, SocketOptions};
use crate::health::Health;

/// Time kept, at most, for the steps after the sessions have closed.
const MAX_RESERVE: Duration = Duration::from_secs(3);
/// After the stop, connections already queued are still taken for this long at most (under
/// a steady stream of new ones the queue is never empty).
const QUEUE_DRAIN: Duration = Duration::from_millis(50);
/// Connections the kernel may queue before we accept them (capped by `somaxconn`): a
/// drain elsewhere sends clients here in bursts, and a full queue turns a connect into
/// seconds of SYN retries.
const LISTEN_BACKLOG: u32 = 4096;

/// A group of tasks stopped together: a token tells them, a tracker waits for them.
#[derive(Debug, Clone, Default)]
pub struct Stage {
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
    /// When the stage must be done, set just before `cancel` fires: a task that has work to
    /// finish after the cancellation (ingest publishing its backlog) uses what it is given.
    pub deadline: Arc<OnceLock<Instant>>,
}

impl Stage {
    /// Spawns a task of this stage; it must return soon after `self.cancel` fires.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task);
    }

    /// Cancels the stage and waits for its tasks until `deadline`; false if some remain.
    pub async fn stop(&self, deadline: Instant) -> bool {
        let _ = self.deadline.set(deadline);
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_ok()
    }
}

/// Every task a node owns, by the step of the drain that stops it.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    /// One task per WebSocket connection; they close themselves on the drain token.
    pub sessions: TaskTracker,
    /// Work that puts messages on the bus: the LISTEN loop, bridge leases, outbox
    /// claimers. Stopped once the sessions are gone, before `background`.
    pub ingest: Stage,
    /// The bus (subscriber, health checks, expiry) and anything else; stopped last.
    pub background: Stage,
}

/// What did not finish in time.
#[derive(Debug, thiserror::Error)]
#[error("drain incomplete at the end of the shutdown grace: {0}")]
pub struct DrainError(String);

/// When each step of the drain must be done.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub sessions: Instant,
    pub ingest: Instant,
    pub end: Instant,
}

impl Deadlines {
    /// From the signal at `start`: the sessions get all of the grace but a reserve (half of
    /// what the drain window leaves, at most 3 s), which ingest and background share.
    pub fn new(start: Instant, grace: Duration, drain_window: Duration) -> Self {
        let reserve = (grace.saturating_sub(drain_window) / 2).min(MAX_RESERVE);
        let end = start + grace;
        Self {
            sessions: end - reserve,
            ingest: end - reserve / 2,
            end,
        }
    }
}

/// Steps 1–3 of the drain. The caller has cancelled `drain` (which closes the listener
/// and starts the sessions' jittered close) right after [`Health::start_draining`].
///
/// # Errors
/// A step overran its deadline (the others still ran).
pub async fn drain(tasks: &Tasks, deadlines: Deadlines) -> Result<(), DrainError> {
    let mut late = Vec::new();
    tasks.sessions.close();
    if tokio::time::timeout_at(deadlines.sessions, tasks.sessions.wait())
        .await
        .is_err()
    {
        late.push(format!("{} session(s) still open", tasks.sessions.len()));
    }
    tracing::info!("sessions closed; stopping ingest");
    if !tasks.ingest.stop(deadlines.ingest).await {
        late.push(format!("{} ingest task(s)", tasks.ingest.tracker.len()));
    }
    if !tasks.background.stop(deadlines.end).await {
        late.push(format!(
            "{} background task(s)",
            tasks.background.tracker.len()
        ));
    }
    if late.is_empty() {
        Ok(())
    } else {
        Err(DrainError(late.join(", ")))
    }
}

/// Turns the node unready, then starts the drain: in this order, so no client is told to
/// go before `/ready` says 503.
pub fn begin(health: &Health, drain: &CancellationToken) {
    health.start_draining();
    drain.cancel();
    tracing::info!("draining: /ready is 503, listener closed, clients told to reconnect");
}

/// Binds the node's listener (with `SO_REUSEADDR`, so a restarted node gets its port back
/// at once, and a deep accept queue).
///
/// # Errors
/// The address cannot be bound.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// A TCP listener that closes its socket when `stop` is cancelled: new connections are
/// refused at once (a load balancer retries another node), while connections accepted
/// before are still served. Connections the kernel had already completed (its accept
/// queue) are taken before the socket closes, so none of them is reset: they are served,
/// and a WebSocket among them is told to reconnect like the others. Accepted sockets become
/// [`Conn`]s (`TCP_NODELAY`, send buffer, request deadline).
#[derive(Debug)]
pub struct StopAccepting {
    inner: Option<TcpListener>,
    addr: SocketAddr,
    stop: CancellationToken,
    /// Until when queued connections are still taken, once stopped.
    closing_at: Option<Instant>,
    socket: SocketOptions,
}

impl StopAccepting {
    /// # Errors
    /// The listener has no local address.
    pub fn new(listener: TcpListener, stop: CancellationToken) -> std::io::Result<Self> {
        Ok(Self {
            addr: listener.local_addr()?,
            inner: Some(listener),
            stop,
            closing_at: None,
            socket: SocketOptions::default(),
        })
    }

    /// Socket options and request deadline of accepted connections.
    pub fn with_socket_options(mut self, socket: SocketOptions) -> Self {
        self.socket = socket;
        self
    }
}

impl axum::serve::Listener for StopAccepting {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        loop {
            let Some(listener) = &self.inner else {
                return std::future::pending().await;
            };
            let accepted = if self.stop.is_cancelled() {
                // Only what is queued already, for a moment; then the socket closes.
                let closing_at = *self
                    .closing_at
                    .get_or_insert_with(|| Instant::now() + QUEUE_DRAIN);
                if Instant::now() < closing_at {
                    listener.accept().now_or_never()
                } else {
                    None
                }
            } else {
                tokio::select! {
                    biased;
                    () = self.stop.cancelled() => continue,
                    accepted = listener.accept() => Some(accepted),
                }
            };
            match accepted {
                None => {
                    self.inner = None;
                    tracing::info!("listener closed");
                }
                Some(Ok((stream, addr))) => return (Conn::new(stream, self.socket), addr),
                // Out of file descriptors and the like: the listener itself is fine.
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// Waits for SIGTERM or SIGINT, cancels `shutdown`, then waits for a second one and
/// returns (the caller exits at once).
pub async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("signal received: draining (send it again to exit at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: exiting now");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_keep_a_reserve_after_the_sessions() {
        let t0 = Instant::now();
        let d = Deadlines::new(t0, Duration::from_secs(25), Duration::from_secs(5));
        assert_eq!(d.end - t0, Duration::from_secs(25));
        assert_eq!(d.sessions - t0, Duration::from_secs(22));
        assert_eq!(d.ingest - t0, Duration::from_millis(23_500));
        let d = Deadlines::new(t0, Duration::from_secs(3), Duration::from_secs(2));
        assert_eq!(d.sessions - t0, Duration::from_millis(2_500));
        assert!(d.sessions <= d.ingest && d.ingest <= d.end);
    }

    #[tokio::test]
    async fn a_stage_stops_its_tasks_or_reports_them() {
        let stage = Stage::default();
        let cancel = stage.cancel.clone();
        stage.spawn(async move { cancel.cancelled().await });
        assert!(stage.stop(Instant::now() + Duration::from_secs(5)).await);

        let stuck = Stage::default();
        stuck.spawn(std::future::pending());
        assert!(!stuck.stop(Instant::now() + Duration::from_millis(20)).await);
    }
}
