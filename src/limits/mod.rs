//! Rate and connection limits shared by every node (G6).
//!
//! Each limit is keyed by tier, subject (the user, a tenant claim, or the client IP of an
//! anonymous connection) and action, and evaluated in Redis in one round trip:
//! - rates (`window.lua`): a sliding window of one second in 100 ms buckets, on Redis'
//!   clock. A request passes when what was counted in the last second (and up to one
//!   bucket more) plus its cost fits the limit, so no one-second span ever holds more than
//!   the limit across all nodes; the price is that a client may be refused up to 100 ms
//!   early;
//! - concurrent connections (`connections.lua`): a lease per connection in a sorted set,
//!   renewed by its node ([`connections`]), dropped on close or when its node stops
//!   renewing it.
//!
//! When Redis does not answer, [`Fallback`] decides: per-node limits (`local`, the
//! default: a subject may then get up to N×L on N nodes) or refusing every limited action
//! (`refuse`). Both show in `/ready` (`limits`) and in metrics.

pub mod connections;
pub mod tiers;
pub mod window;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::Script;

pub use connections::{ConnectionGuard, Connections};
pub use tiers::{Tier, Tiers, TiersError};

use crate::bus::Bus;
use crate::metrics as m;
use window::{Local, LocalWindows};

/// The window every per-second limit counts over.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Its buckets: the bound on how early a client may be refused.
pub const BUCKET: Duration = Duration::from_millis(100);
/// A limiter call slower than this counts as Redis being unreachable.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);
/// After a failed call, Redis is not asked again for this long.
const BACKOFF: Duration = Duration::from_secs(1);

/// What is limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Connect,
    Subscribe,
    Publish,
    InboundBytes,
    ApiPublish,
}

impl Action {
    pub fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Subscribe => "subscribe",
            Self::Publish => "publish",
            Self::InboundBytes => "inbound_bytes",
            Self::ApiPublish => "api_publish",
        }
    }

    /// The tier's limit for this action (0: unlimited).
    pub fn limit(self, tier: &Tier) -> u64 {
        match self {
            Self::Connect => tier.connect_per_second,
            Self::Subscribe => tier.subscribe_per_second,
            Self::Publish | Self::ApiPublish => tier.publish_per_second,
            Self::InboundBytes => tier.inbound_bytes_per_second,
        }
    }
}

/// What to do while Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fallback {
    /// Count on this node only.
    Local,
    /// Refuse every action that has a limit.
    Refuse,
}

/// The answer to a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Limited { retry_after: Duration },
}

/// Where limits are evaluated right now (`/ready`'s `limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// In Redis, for the whole cluster.
    Shared,
    /// On this node: no Redis configured, or the `local` fallback.
    Local,
    /// Redis unreachable and the fallback is `refuse`.
    Refusing,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shared => "shared",
            Self::Local => "local",
            Self::Refusing => "refusing",
        }
    }
}

/// Evaluates limits, in Redis when it answers.
pub struct Limiter {
    tiers: Tiers,
    fallback: Fallback,
    bus: Option<Bus>,
    script: Script,
    local: Mutex<LocalWindows>,
    /// Until when (ms on `epoch`) Redis is skipped after a failure.
    skip_until_ms: AtomicU64,
    epoch: Instant,
    degraded: AtomicBool,
    /// Concurrent connections per subject.
    pub connections: Arc<Connections>,
}

impl Limiter {
    /// `bus` is the node's bus: with Redis, limits are shared through it.
    pub fn new(tiers: Tiers, fallback: Fallback, bus: Option<Bus>, node_id: &str) -> Self {
        let redis = match &bus {
            Some(Bus::Redis(r)) => Some(r.connection()),
            _ => None,
        };
        let bus = bus.filter(|b| matches!(b, Bus::Redis(_)));
        metrics::gauge!(m::RATE_LIMIT_DEGRADED).set(0.0);
        Self {
            tiers,
            fallback,
            bus,
            script: Script::new(include_str!("window.lua")),
            local: Mutex::new(LocalWindows::default()),
            skip_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            degraded: AtomicBool::new(false),
            connections: Arc::new(Connections::new(redis, node_id)),
        }
    }

    /// No limits at all.
    pub fn unlimited() -> Self {
        Self::new(Tiers::single(Tier::default()), Fallback::Local, None, "")
    }

    pub fn tier(&self, name: Option<&str>) -> Arc<Tier> {
        self.tiers.get(name)
    }

    pub fn default_tier(&self) -> Arc<Tier> {
        self.tiers.default_tier()
    }

    /// Where limits are evaluated now; also brings the degraded state (and its gauge) in
    /// line with Redis' health.
    pub fn mode(&self) -> Mode {
        if self.bus.is_none() {
            return Mode::Local;
        }
        self.set_degraded(!self.redis_usable());
        match (self.degraded.load(Ordering::Relaxed), self.fallback) {
            (false, _) => Mode::Shared,
            (true, Fallback::Local) => Mode::Local,
            (true, Fallback::Refuse) => Mode::Refusing,
        }
    }

    /// Keeps the mode current every second and the connection leases renewed, until
    /// cancelled.
    pub async fn run(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        let leases = self.connections.clone().maintain(cancel.clone());
        let watch = async {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                self.mode();
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = leases => {}
            _ = watch => {}
        }
    }

    /// Whether Redis should be asked now (configured, up, not backing off).
    fn redis_usable(&self) -> bool {
        let Some(bus) = &self.bus else { return false };
        bus.redis_up() == Some(true)
            && self.elapsed_ms() >= self.skip_until_ms.load(Ordering::Relaxed)
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn set_degraded(&self, degraded: bool) {
        if self.degraded.swap(degraded, Ordering::Relaxed) != degraded {
            metrics::gauge!(m::RATE_LIMIT_DEGRADED).set(if degraded { 1.0 } else { 0.0 });
            if degraded {
                tracing::warn!(fallback = ?self.fallback, "limits: Redis unreachable, falling back");
                self.connections.resync_later();
            } else {
                tracing::info!("limits: shared in Redis again");
            }
        }
    }

    /// Checks and counts `action` with `cost` for `subject` in `tier`: one Redis round trip
    /// (none when the tier has no such limit).
    pub async fn check(&self, tier: &Tier, subject: &str, action: Action, cost: u64) -> Decision {
        let limit = action.limit(tier);
        if limit == 0 {
            return Decision::Allowed;
        }
        let key = format!(
            "pgfanout:limit:{{{}:{subject}}}:{}",
            tier.name,
            action.label()
        );
        let (decision, scope) = if self.redis_usable() {
            match self.check_redis(&key, limit, cost).await {
                Ok(decision) => {
                    self.set_degraded(false);
                    (decision, "shared")
                }
                Err(e) => {
                    tracing::debug!(error = %e, "limiter call failed");
                    self.skip_until_ms.store(
                        self.elapsed_ms() + BACKOFF.as_millis() as u64,
                        Ordering::Relaxed,
                    );
                    self.set_degraded(true);
                    self.fall_back(&key, limit, cost)
                }
            }
        } else {
            if self.bus.is_some() {
                self.set_degraded(true);
            }
            self.fall_back(&key, limit, cost)
        };
        let outcome = match decision {
            Decision::Allowed => "allowed",
            Decision::Limited { .. } => "limited",
        };
        metrics::counter!(m::RATE_LIMIT_DECISIONS, "action" => action.label(), "outcome" => outcome, "scope" => scope)
            .increment(1);
        decision
    }

    async fn check_redis(&self, key: &str, limit: u64, cost: u64) -> Result<Decision, String> {
        let Some(Bus::Redis(bus)) = &self.bus else {
            return Err("no redis".into());
        };
        let mut conn = bus.connection();
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(key)
            .arg(WINDOW.as_millis() as u64)
            .arg(BUCKET.as_millis() as u64)
            .arg(limit)
            .arg(cost);
        let started = Instant::now();
        let reply = tokio::time::timeout(
            REDIS_TIMEOUT,
            invocation.invoke_async::<(i64, u64, i64)>(&mut conn),
        )
        .await;
        metrics::histogram!(m::RATE_LIMIT_SECONDS).record(started.elapsed().as_secs_f64());
        match reply {
            Err(_) => Err("timed out".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok((1, _, _))) => Ok(Decision::Allowed),
            Ok(Ok((_, retry_ms, _))) => Ok(Decision::Limited {
                retry_after: Duration::from_millis(retry_ms.max(1)),
            }),
        }
    }

    fn fall_back(&self, key: &str, limit: u64, cost: u64) -> (Decision, &'static str) {
        if self.bus.is_some() && self.fallback == Fallback::Refuse {
            return (
                Decision::Limited {
                    retry_after: BACKOFF,
                },
                "unavailable",
            );
        }
        let now = self.elapsed_ms();
        let outcome = match self.local.lock() {
            Ok(mut local) => local.check(
                &[(key.to_owned(), limit, cost)],
                now,
                WINDOW.as_millis() as u64,
                BUCKET.as_millis() as u64,
            ),
            Err(_) => Local::Untracked,
        };
        match outcome {
            Local::Allowed | Local::Untracked => (Decision::Allowed, "local"),
            Local::Limited { retry_after_ms } => (
                Decision::Limited {
                    retry_after: Duration::from_millis(retry_after_ms),
                },
                "local",
            ),
        }
    }

    /// Takes a connection slot for `subject` if the tier limits concurrent connections.
    ///
    /// # Errors
    /// [`Decision::Limited`] when the subject is at its limit (or, with the `refuse`
    /// fallback, when Redis cannot tell).
    pub async fn acquire_connection(
        &self,
        tier: &Tier,
        subject: &str,
    ) -> Result<Option<ConnectionGuard>, ConnectionRefused> {
        let limit = tier.connections_per_user;
        if limit == 0 {
            return Ok(None);
        }
        let key = format!("pgfanout:limit:{{{}:{subject}}}:connections", tier.name);
        let shared = if self.redis_usable() {
            match self.connections.acquire_shared(&key, limit).await {
                Ok(result) => {
                    self.set_degraded(false);
                    Some(result)
                }
                Err(e) => {
                    tracing::debug!(error = %e, "connection limiter call failed");
                    self.set_degraded(true);
                    None
                }
            }
        } else {
            if self.bus.is_some() {
                self.set_degraded(true);
            }
            None
        };
        let (result, scope) = match shared {
            Some(r) => (r, "shared"),
            None if self.bus.is_some() && self.fallback == Fallback::Refuse => {
                (Err(ConnectionRefused::Unavailable), "unavailable")
            }
            None => (self.connections.acquire_local(&key, limit), "local"),
        };
        let outcome = if result.is_ok() { "allowed" } else { "limited" };
        metrics::counter!(m::RATE_LIMIT_DECISIONS, "action" => "connections", "outcome" => outcome, "scope" => scope)
            .increment(1);
        result.map(Some)
    }
}

/// Why a connection slot was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionRefused {
    /// The subject holds as many connections as its tier allows.
    AtLimit,
    /// Redis is unreachable and the fallback is `refuse`.
    Unavailable,
}
