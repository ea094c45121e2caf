//! A lease in Redis: one holder at a time, renewed every third of its TTL. The token is
//! the fence the publish script checks, so a holder that lost the lease cannot publish.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::Script;
use tokio_util::sync::CancellationToken;

use crate::bus::Fence;
use crate::metrics as m;

const ACQUIRE_OR_RENEW: &str = r#"
if redis.call("GET", KEYS[1]) == ARGV[1] then
  redis.call("PEXPIRE", KEYS[1], ARGV[2])
  return 1
end
if redis.call("SET", KEYS[1], ARGV[1], "NX", "PX", ARGV[2]) then
  return 1
end
return 0
"#;

const RELEASE: &str = r#"
if redis.call("GET", KEYS[1]) == ARGV[1] then
  return redis.call("DEL", KEYS[1])
end
return 0
"#;

pub struct Lease {
    conn: ConnectionManager,
    fence: Fence,
    ttl: Duration,
    /// Until when we may act as the holder, by our own clock (a margin inside the TTL).
    held_until: Mutex<Option<Instant>>,
}

impl Lease {
    pub fn new(conn: ConnectionManager, key: String, node_id: &str, ttl: Duration) -> Arc<Self> {
        let token = format!("{node_id}:{:016x}", rand::random::<u64>());
        Arc::new(Self {
            conn,
            fence: Fence { key, token },
            ttl,
            held_until: Mutex::new(None),
        })
    }

    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    pub fn is_held(&self) -> bool {
        let until = *self.held_until.lock().unwrap_or_else(|p| p.into_inner());
        until.is_some_and(|t| Instant::now() < t)
    }

    /// Acquires or renews until cancelled, then releases.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let script = Script::new(ACQUIRE_OR_RENEW);
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let started = Instant::now();
            let mut conn = self.conn.clone();
            let held: bool = script
                .key(&self.fence.key)
                .arg(&self.fence.token)
                .arg(ttl_ms)
                .invoke_async::<i64>(&mut conn)
                .await
                .is_ok_and(|r| r == 1);
            let was_held = self.is_held();
            // Counted from before the request, minus a margin for clock drift.
            let until = held.then(|| started + self.ttl - self.ttl / 10);
            *self.held_until.lock().unwrap_or_else(|p| p.into_inner()) = until;
            if held != was_held {
                tracing::info!(key = %self.fence.key, held, "bridge lease changed hands");
                metrics::gauge!(m::BRIDGE_OWNER).set(if held { 1.0 } else { 0.0 });
            }
        }
        self.release().await;
    }

    async fn release(&self) {
        *self.held_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
        metrics::gauge!(m::BRIDGE_OWNER).set(0.0);
        let mut conn = self.conn.clone();
        let script = Script::new(RELEASE);
        let mut invocation = script.prepare_invoke();
        invocation.key(&self.fence.key).arg(&self.fence.token);
        let released = invocation.invoke_async::<i64>(&mut conn);
        if let Ok(Ok(1)) = tokio::time::timeout(Duration::from_secs(1), released).await {
            tracing::info!(key = %self.fence.key, "bridge lease released");
        }
    }
}
