//! The HTTP surface: the WebSocket endpoint (origin check, client address), liveness,
//! readiness, metrics, the publish API ([`crate::api`]), and the demo page when it is on
//! ([`crate::demo`]).
//!
//! The listener is bound before the node's dependencies answer, so that liveness works
//! while it starts: [`Front`] serves [`starting_router`] (`/health` 200, `/ready` 503,
//! everything else 503) until [`router`] is ready to take over.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::future::RouteFuture;
use axum::routing::get;
use axum::{Json, Router};
use futures_util::FutureExt as _;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::health::{DependencyState, Health};
use crate::session;

/// Read buffer per connection: small, because most connections are idle (tungstenite's
/// default of 128 KiB would dominate memory per connection). Client frames are small
/// (commands, pongs); a larger one is read in several calls into a buffer reserved for
/// its length. tungstenite also zero-fills up to this much before every read attempt,
/// which happens on every wake-up of the session, so small is cheaper on the hot path too.
const READ_BUFFER: usize = 256;
/// Bytes buffered before a write goes to the socket; we flush after each batch anyway.
const WRITE_BUFFER: usize = 8 * 1024;
/// A peer that does not read cannot make us buffer more than this.
const MAX_WRITE_BUFFER: usize = 1024 * 1024;

/// The TCP peer of a request, for the client's address, and its connection's request
/// deadline ([`crate::conn`]).
#[derive(Debug, Clone)]
pub struct PeerAddr(pub std::net::SocketAddr, pub crate::conn::Deadline);

impl
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'_, crate::shutdown::StopAccepting>,
    > for PeerAddr
{
    fn connect_info(
        stream: axum::serve::IncomingStream<'_, crate::shutdown::StopAccepting>,
    ) -> Self {
        Self(*stream.remote_addr(), stream.io().deadline().clone())
    }
}

#[derive(Clone)]
pub struct AppState {
    pub shared: Arc<session::Shared>,
    pub health: Arc<Health>,
    pub metrics: Option<PrometheusHandle>,
    /// Owns every session task, so shutdown can wait for them.
    pub sessions: TaskTracker,
    /// Cancelled on shutdown: sessions drain.
    pub drain: CancellationToken,
    pub max_frame_bytes: usize,
    /// Header with the client's address behind a proxy (else the TCP peer).
    pub client_ip_header: Option<axum::http::HeaderName>,
    /// `POST /api/publish`.
    pub api: Arc<crate::api::PublishApi>,
    /// Largest body of the publish API.
    pub api_max_body_bytes: usize,
    /// `PGFANOUT_DEMO`: the `/demo/` page and its API.
    pub demo: Option<Arc<crate::demo::Demo>>,
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/publish", axum::routing::post(crate::api::publish))
        .layer(axum::extract::DefaultBodyLimit::max(
            state.api_max_body_bytes,
        ))
        .with_state(state.api.clone());
    let demo = state.demo.clone();
    let router = Router::new()
        .merge(api)
        .route("/connection/websocket", get(websocket))
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state);
    match demo {
        Some(demo) => router.merge(crate::demo::router(demo)),
        None => router,
    }
}

/// The upgrade. While draining it is still accepted (from a connection accepted just
/// before the listener closed): the session then closes with 3001 like every other, which
/// the client takes as reconnect advice, where a refused upgrade would be an error to it.
async fn websocket(
    State(state): State<AppState>,
    headers: HeaderMap,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<PeerAddr>>>,
    ws: WebSocketUpgrade,
) -> Response {
    let origin = headers
        .get(header::ORIGIN)
        .map(|o| o.to_str().unwrap_or("\u{fffd}"));
    if !state.shared.policy.origin_allowed(origin) {
        metrics::counter!(crate::metrics::AUTH_FAILURES, "token" => "upgrade", "reason" => "origin")
            .increment(1);
        tracing::debug!(origin = ?origin, "WebSocket refused: origin not allowed");
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    let forwarded = state.client_ip_header.as_ref().and_then(|name| {
        let value = headers.get(name)?.to_str().ok()?;
        value
            .split(',')
            .next()?
            .trim()
            .parse::<std::net::IpAddr>()
            .ok()
    });
    let ip = forwarded.or(peer.map(|p| p.0 .0 .0.ip()));
    // Counted as a session from here, not from when the upgraded socket reaches the
    // callback: under load the 101 can reach the client (which then sends its connect)
    // well before that, and a drain that saw no session would let the process exit under
    // it, closing the client's connect with an error instead of the drain's 3001.
    let counted = state.sessions.token();
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(state.max_frame_bytes)
        .max_frame_size(state.max_frame_bytes)
        .on_upgrade(move |socket| {
            // No `async` block: one awaiting the session would hold its future twice (the
            // value and the awaited copy), and one taking the socket would keep the socket.
            session::run_from(socket, state.shared, state.drain, ip).map(move |()| drop(counted))
        })
}

/// The body of `/ready`.
#[derive(Serialize)]
struct Readiness<'a> {
    ready: bool,
    /// Still connecting to the bus: nothing but `/health` and `/ready` is served yet.
    starting: bool,
    postgres: &'static str,
    redis: &'static str,
    migrations: &'static str,
    draining: bool,
    node: &'a str,
    /// Where limits are evaluated: `shared` (Redis), `local` (this node: no Redis, or the
    /// local fallback while Redis is unreachable), `refusing` (the refuse fallback).
    #[serde(skip_serializing_if = "Option::is_none")]
    limits: Option<&'static str>,
}

fn readiness(
    health: &Health,
    redis: DependencyState,
    starting: bool,
    node: &str,
    limits: Option<&'static str>,
) -> Response {
    let ready = !starting && health.ready(redis);
    let body = Readiness {
        ready,
        starting,
        postgres: health.postgres().as_str(),
        redis: redis.as_str(),
        migrations: health.migrations().as_str(),
        draining: health.draining(),
        node,
        limits,
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn ready(State(state): State<AppState>) -> Response {
    let redis = match state.shared.bus.redis_up() {
        None => DependencyState::Disabled,
        Some(true) => DependencyState::Up,
        Some(false) => DependencyState::Down,
    };
    let limits = Some(state.shared.limits.mode().as_str());
    readiness(
        &state.health,
        redis,
        false,
        &state.shared.config.node_id,
        limits,
    )
}

async fn metrics(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => handle.render().into_response(),
        None => (StatusCode::NOT_FOUND, "metrics recorder not installed").into_response(),
    }
}

/// What the node serves before its bus is connected.
#[derive(Clone)]
pub struct Starting {
    pub health: Arc<Health>,
    pub node_id: Arc<str>,
    /// Whether a Redis URL is configured (then it is reported down until connected).
    pub redis_configured: bool,
}

/// `/health` (200) and `/ready` (503, `"starting": true`); anything else 503.
pub fn starting_router(state: Starting) -> Router {
    let ready = |State(s): State<Starting>| async move {
        let redis = if s.redis_configured {
            DependencyState::Down
        } else {
            DependencyState::Disabled
        };
        readiness(&s.health, redis, true, &s.node_id, None)
    };
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .fallback(|| async { (StatusCode::SERVICE_UNAVAILABLE, "starting") })
        .with_state(state)
}

/// Routes every request to the started router once it is set, to the starting one before.
#[derive(Clone)]
pub struct Front {
    started: Arc<OnceLock<Router>>,
    starting: Router,
}

impl Front {
    pub fn new(starting: Router) -> Self {
        Self {
            started: Arc::new(OnceLock::new()),
            starting,
        }
    }

    /// Switches to `router` for every later request (the first call wins).
    pub fn start(&self, router: Router) {
        let _ = self.started.set(router);
    }

    /// A router that serves everything through this front.
    pub fn router(&self) -> Router {
        Router::new().fallback_service(self.clone())
    }
}

impl tower_service::Service<Request> for Front {
    type Response = Response;
    type Error = Infallible;
    type Future = RouteFuture<Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let mut router = self.started.get().unwrap_or(&self.starting).clone();
        router.call(req)
    }
}
