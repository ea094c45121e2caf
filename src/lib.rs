//! pgfanout: a realtime WebSocket fan-out gateway. Every node LISTENs on Postgres; each
//! notification enters a Redis bus once; every node delivers it to its own WebSocket
//! clients, which speak the Centrifugo client protocol and may connect to any node.
//!
//! # Layout
//! - [`api`]: `POST /api/publish`, the server-side publish API.
//! - [`auth`]: JWT connection and subscription tokens, channel patterns, anonymous policy.
//! - [`config`]: the one `Config` (CLI flags and `PGFANOUT_*` variables), validated.
//! - [`protocol`]: Centrifugo protocol types and codec; pure, no I/O.
//! - [`session`]: one task per connection: commands, bounded queue, ping/pong, close codes.
//! - [`hub`]: channel → local sessions; fan-out of frames encoded once.
//! - [`bus`]: the Redis (or in-memory) bus: offsets, epochs, history, subscriptions.
//! - [`ingest`]: the Postgres LISTEN loop, channel-shard leases, takeovers and bridges; the
//!   `pgfanout` schema (migrations) and the outbox claimer.
//! - [`limits`]: rate and connection limits per tier and subject, shared in Redis.
//! - [`demo`]: the live-table demo page at `/demo/` and its table (`PGFANOUT_DEMO`).
//! - [`http`]: the axum router: WebSocket, `/health`, `/ready`, `/metrics`.
//! - [`conn`]: accepted TCP connections: socket options and the HTTP request deadline.
//! - [`health`]: readiness state shared by the subsystems.
//! - [`metrics`]: every metric, described once, and the Prometheus recorder.
//! - [`shutdown`]: the drain sequence, the listener that stops accepting, signals.
//!
//! [`run`] wires them together: it binds the listener first (so `/health` answers while
//! dependencies connect), starts the subsystems, and drains on shutdown; `main.rs` only
//! parses config, installs logging and metrics, and turns signals into a cancellation.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod api;
pub mod auth;
pub mod bus;
pub mod config;
pub mod conn;
pub mod demo;
pub mod health;
pub mod http;
pub mod hub;
pub mod ingest;
pub mod limits;
pub mod mailbox;
pub mod metrics;
pub mod protocol;
pub mod session;
pub mod shutdown;

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use bus::{Bus, HistoryPolicy};
use config::Config;
use health::Health;
use hub::Hub;
use shutdown::{Deadlines, Tasks};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("http server: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Drain(#[from] shutdown::DrainError),
    #[error("token keys: {0}")]
    Keys(auth::KeyError),
    #[error("limits: {0}")]
    Tiers(limits::TiersError),
    #[error("demo: {0}")]
    Demo(#[from] demo::DemoError),
    #[error("pgfanout schema: {0}")]
    Schema(ingest::migrate::MigrateError),
}

/// Runs a node until `shutdown` is cancelled, then drains (see [`shutdown`]): `/ready`
/// turns 503, the listener stops accepting, sessions close with "shutdown" (reconnect)
/// spread over the drain window, ingest hands off, background tasks stop, all within the
/// shutdown grace.
///
/// # Errors
/// The listen address cannot be bound, the server fails, the drain overran the grace, or the
/// demo cannot use the database URL.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    metrics: Option<PrometheusHandle>,
) -> Result<(), RunError> {
    // Checked before anything starts, so an error leaves nothing running.
    let demo = match (&config.database_url, config.demo) {
        (Some(url), true) => {
            let signer = (config.token_hmac_secret_key.as_deref())
                .map(|secret| demo::Signer::new(secret, config.token_rules()));
            Some(Arc::new(demo::Demo::new(url, signer)?))
        }
        _ => None,
    };
    let tasks = Tasks::default();
    // Keys first: a node whose keys cannot be read must not start half-armed.
    let keys = Arc::new(auth::KeyStore::load(&config.key_sources()).map_err(RunError::Keys)?);
    if keys.has_jwks() {
        tasks
            .background
            .spawn(keys.clone().watch_jwks(tasks.background.cancel.clone()));
    }
    let auth = Arc::new(auth::Authenticator::new(keys, config.token_rules()));
    let tiers = config.tiers().map_err(RunError::Tiers)?;
    let health = Arc::new(Health::new(config.database_url.is_some()));
    // Cancelled once /ready says 503: closes the listener and starts the sessions' drain.
    let drain = CancellationToken::new();
    let (front, server) = serve(&config, health.clone(), drain.clone()).await?;

    let hub = Arc::new(Hub::new());
    let history = Arc::new(config.history_policy());
    let Some(bus) = connect_bus(&config, hub.clone(), history, &tasks, &shutdown).await else {
        shutdown::begin(&health, &drain);
        let deadlines = Deadlines::new(Instant::now(), config.shutdown_grace, Duration::ZERO);
        shutdown::drain(&tasks, deadlines).await?;
        return finish(server, deadlines.end).await;
    };
    // A schema newer than this binary: the node stops and `run` returns the refusal.
    let refused = Arc::new(std::sync::Mutex::new(None));
    if let Some(url) = &config.database_url {
        let schema = SchemaStart {
            refused: refused.clone(),
            shutdown: shutdown.clone(),
        };
        start_ingest(&config, url, &bus, &health, &tasks, schema);
    }
    if let Some(demo) = &demo {
        let background = &tasks.background;
        background.spawn(demo.clone().setup(background.cancel.clone()));
    }

    let session_config = session::SessionConfig {
        node_id: Arc::from(config.node_id()),
        queue_size: config.client_queue_size,
        max_subscriptions: config.max_subscriptions,
        ping_interval: config.ping_interval,
        pong_timeout: config.pong_timeout,
        connect_timeout: config.connect_timeout,
        drain_window: config.drain_window,
    };
    let limiter = Arc::new(limits::Limiter::new(
        tiers,
        config.limits_fallback,
        Some(bus.clone()),
        config.node_id(),
    ));
    tasks
        .background
        .spawn(limiter.clone().run(tasks.background.cancel.clone()));
    let api = Arc::new(api::PublishApi {
        keys: config.api_keys.clone(),
        bus: bus.clone(),
        limits: limiter.clone(),
        tier: Arc::new(limits::Tier {
            name: "api".into(),
            publish_per_second: config.limit_api_publish_per_second,
            ..Default::default()
        }),
    });
    front.start(http::router(http::AppState {
        shared: Arc::new(
            session::Shared::new(session_config, hub, bus)
                .with_auth(auth, config.policy())
                .with_limits(limiter, config.limits_abuse_threshold),
        ),
        client_ip_header: config.client_ip_header(),
        api,
        api_max_body_bytes: config.api_max_body_bytes,
        health: health.clone(),
        metrics,
        sessions: tasks.sessions.clone(),
        drain: drain.clone(),
        max_frame_bytes: config.max_frame_bytes,
        demo,
    }));
    tracing::info!(node = config.node_id(), "pgfanout started");

    shutdown.cancelled().await;
    let deadlines = Deadlines::new(Instant::now(), config.shutdown_grace, config.drain_window);
    shutdown::begin(&health, &drain);
    let drained = shutdown::drain(&tasks, deadlines).await;
    finish(server, deadlines.end).await?;
    if let Some(e) = refused.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(RunError::Schema(e));
    }
    drained?;
    tracing::info!("stopped");
    Ok(())
}

/// A running HTTP server and the token that lets its last connections finish.
struct Server {
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    stop: CancellationToken,
}

/// Binds the listener and serves the starting routes until [`http::Front::start`].
async fn serve(
    config: &Config,
    health: Arc<Health>,
    drain: CancellationToken,
) -> Result<(http::Front, Server), RunError> {
    let bind_error = |source| RunError::Bind {
        addr: config.listen,
        source,
    };
    let listener = shutdown::bind(config.listen).map_err(bind_error)?;
    let listener = shutdown::StopAccepting::new(listener, drain)
        .map_err(bind_error)?
        .with_socket_options(config.socket_options());
    tracing::info!(addr = %config.listen, node = config.node_id(), "pgfanout listening");
    let front = http::Front::new(http::starting_router(http::Starting {
        health,
        node_id: Arc::from(config.node_id()),
        redis_configured: config.redis_url.is_some(),
    }));
    let stop = CancellationToken::new();
    let server = axum::serve(
        listener,
        front
            .router()
            .layer(axum::middleware::from_fn(conn::track_requests))
            .into_make_service_with_connect_info::<http::PeerAddr>(),
    )
    .with_graceful_shutdown(stop.clone().cancelled_owned());
    let task = tokio::spawn(async move { server.await });
    Ok((front, Server { task, stop }))
}

/// Lets the HTTP connections still open finish, until `deadline`.
async fn finish(server: Server, deadline: Instant) -> Result<(), RunError> {
    server.stop.cancel();
    match tokio::time::timeout_at(deadline, server.task).await {
        Ok(Ok(result)) => result.map_err(RunError::Serve),
        Ok(Err(join)) => Err(RunError::Serve(std::io::Error::other(join))),
        Err(_) => {
            tracing::warn!("HTTP connections still open at the end of the shutdown grace");
            Ok(())
        }
    }
}

/// The LISTEN loop, one bridge per channel shard and, with Redis, the shard leases: all in
/// the ingest stage, so they run until the sessions are gone and then hand off.
fn start_ingest(
    config: &Config,
    url: &str,
    bus: &Bus,
    health: &Arc<Health>,
    tasks: &Tasks,
    schema: SchemaStart,
) {
    let stage = &tasks.ingest;
    // Not ready until the schema is in place (set before the node serves).
    health.set_migrations(health::MigrationState::Pending);
    let claimer = ingest::outbox::Outbox {
        database_url: url.to_owned(),
        bus: bus.clone(),
        poll: config.outbox_poll,
        batch: config.outbox_batch,
    };
    let (migrate, max_event_bytes) = (config.migrate, config.outbox_max_event_bytes);
    let workers = config.outbox_workers;
    let (health_, cancel) = (health.clone(), stage.cancel.clone());
    stage.spawn(async move {
        match prepare_schema(
            &claimer.database_url,
            migrate,
            max_event_bytes,
            &health_,
            &cancel,
        )
        .await
        {
            Ok(true) => {
                let claimers = (0..workers).map(|_| claimer.clone().run(cancel.clone()));
                futures_util::future::join_all(claimers).await;
            }
            Ok(false) => {}
            Err(e) => {
                *schema.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                schema.shutdown.cancel();
            }
        }
    });
    let shared = ingest::shards::Shared::new(config.ingest_shards, config.ingest_buffer_bytes);
    // Unique per process, so a restarted node never takes its predecessor's leases or
    // markers for its own.
    let instance = format!("{}-{:08x}", config.node_id(), rand::random::<u32>());
    // With leases, the bridges stop only after the leases are handed off (see Leases).
    let bridges = match bus {
        Bus::Redis(_) => CancellationToken::new(),
        Bus::Memory(_) => stage.cancel.clone(),
    };
    let barriers = match bus {
        Bus::Redis(redis) => {
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            let leases = ingest::shards::Leases {
                conn: redis.connection(),
                instance: instance.clone(),
                ttl: config.lease_ttl,
                shared: shared.clone(),
                barriers: tx,
                bridges: bridges.clone(),
                unplaceable_since: Default::default(),
                stop_deadline: stage.deadline.clone(),
            };
            stage.spawn(leases.run(stage.cancel.clone()));
            Some(rx)
        }
        Bus::Memory(_) => None,
    };
    for shard in 0..config.ingest_shards {
        stage.spawn(ingest::shards::bridge(
            shard,
            shared.clone(),
            bus.clone(),
            bridges.clone(),
        ));
    }
    let ingest = ingest::Ingest {
        database_url: url.to_owned(),
        channels: config.channels.clone(),
        shared,
        barriers,
        instance,
        health: health.clone(),
    };
    stage.spawn(ingest.run(stage.cancel.clone()));
}

/// Where a refusal to run on the database's schema goes: the node stops and `run` fails.
struct SchemaStart {
    refused: Arc<std::sync::Mutex<Option<ingest::migrate::MigrateError>>>,
    shutdown: CancellationToken,
}

/// Applies (or, with `PGFANOUT_MIGRATE=false`, checks) the `pgfanout` schema, retrying while
/// the database is unreachable; `/ready` says `pending` meanwhile. Ok(true): the outbox can
/// run.
///
/// # Errors
/// The schema is newer than this binary: the node refuses to run on it.
async fn prepare_schema(
    url: &str,
    apply: bool,
    max_event_bytes: u32,
    health: &Health,
    shutdown: &CancellationToken,
) -> Result<bool, ingest::migrate::MigrateError> {
    use health::MigrationState;
    use ingest::migrate::{self, MigrateError};
    let mut delay = Duration::from_millis(200);
    loop {
        let result = if apply {
            migrate::migrate(url, max_event_bytes).await.map(|m| m.to)
        } else {
            migrate::check(url).await
        };
        match result {
            Ok(version) => {
                tracing::info!(version, "pgfanout schema ready; outbox enabled");
                health.set_migrations(MigrationState::Applied);
                return Ok(true);
            }
            Err(MigrateError::Missing) => {
                tracing::warn!(
                    "pgfanout schema not installed and PGFANOUT_MIGRATE=false: outbox disabled"
                );
                health.set_migrations(MigrationState::NotRequired);
                return Ok(false);
            }
            Err(e) if e.is_fatal() => {
                health.set_migrations(MigrationState::Failed);
                tracing::error!(error = %e, "refusing to run; stopping");
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "cannot apply the pgfanout schema yet");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// The bus from config, its tasks in the background stage; Redis is retried with backoff
/// until it answers or we are told to stop (None).
async fn connect_bus(
    config: &Config,
    hub: Arc<Hub>,
    history: Arc<HistoryPolicy>,
    tasks: &Tasks,
    shutdown: &CancellationToken,
) -> Option<Bus> {
    let background = &tasks.background;
    let Some(url) = &config.redis_url else {
        return Some(Bus::memory(
            hub,
            history,
            &background.tracker,
            background.cancel.clone(),
        ));
    };
    let seeds = bus::connection::seeds(url);
    let mut delay = Duration::from_millis(200);
    loop {
        let target = if config.redis_cluster {
            bus::redis::Target::Cluster(&seeds)
        } else {
            bus::redis::Target::Single(url)
        };
        let connected = Bus::redis_at(
            target,
            hub.clone(),
            history.clone(),
            &background.tracker,
            background.cancel.clone(),
        );
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            result = connected => match result {
                Ok(bus) => return Some(bus),
                Err(e) => tracing::warn!(error = %e, retry_in = ?delay, "cannot reach redis"),
            },
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
