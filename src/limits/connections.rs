//! Concurrent connections per subject, across nodes: each connection holds a lease (a
//! member `node:n` of its subject's sorted set in Redis, scored by its expiry). The node
//! renews the leases of its live connections every third of [`LEASE`] in one pipeline and
//! removes a lease when its connection closes; a node that dies stops renewing, so its
//! leases lapse within [`LEASE`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Script;

use crate::bus::connection::RedisConnection;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ConnectionRefused;

/// How long a lease outlives its last renewal.
pub const LEASE: Duration = Duration::from_secs(30);
/// Lease removals waiting to be sent; past it a lease simply lapses.
const REMOVALS: usize = 4096;

/// Where a connection's slot is held.
enum Slot {
    Shared { key: String, member: String },
    Local { key: String },
}

/// A held connection slot; dropping it gives the slot back.
pub struct ConnectionGuard {
    slot: Option<Slot>,
    owner: Arc<Connections>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        match self.slot.take() {
            Some(Slot::Shared { key, member }) => {
                if let Ok(mut live) = self.owner.live.lock() {
                    live.remove(&member);
                }
                // A full queue (Redis down for long) leaves the lease to lapse.
                let _ = self.owner.removals.try_send((key, member));
            }
            Some(Slot::Local { key }) => {
                if let Ok(mut counts) = self.owner.local.lock() {
                    if let Some(n) = counts.get_mut(&key) {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            counts.remove(&key);
                        }
                    }
                }
            }
            None => {}
        }
    }
}

/// The node's connection slots.
pub struct Connections {
    redis: Option<RedisConnection>,
    node_id: String,
    next: AtomicU64,
    acquire: Script,
    /// member → key of every shared lease this node holds (one per live connection).
    live: Mutex<HashMap<String, String>>,
    /// key → connections counted on this node while Redis was unreachable.
    local: Mutex<HashMap<String, u64>>,
    removals: mpsc::Sender<(String, String)>,
    removals_rx: Mutex<Option<mpsc::Receiver<(String, String)>>>,
    /// Renew with plain ZADD (re-create leases Redis may have lost) on the next round.
    resync: AtomicBool,
}

impl Connections {
    pub fn new(redis: Option<RedisConnection>, node_id: &str) -> Self {
        let (tx, rx) = mpsc::channel(REMOVALS);
        Self {
            redis,
            node_id: node_id.to_owned(),
            next: AtomicU64::new(1),
            acquire: Script::new(include_str!("connections.lua")),
            live: Mutex::new(HashMap::new()),
            local: Mutex::new(HashMap::new()),
            removals: tx,
            removals_rx: Mutex::new(Some(rx)),
            resync: AtomicBool::new(false),
        }
    }

    pub fn resync_later(&self) {
        self.resync.store(true, Ordering::Relaxed);
    }

    pub(super) async fn acquire_shared(
        self: &Arc<Self>,
        key: &str,
        limit: u64,
    ) -> Result<Result<ConnectionGuard, ConnectionRefused>, String> {
        let Some(redis) = &self.redis else {
            return Err("no redis".into());
        };
        let member = format!(
            "{}:{}",
            self.node_id,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let mut conn = redis.clone();
        let mut invocation = self.acquire.prepare_invoke();
        invocation
            .key(key)
            .arg(limit)
            .arg(&member)
            .arg(LEASE.as_millis() as u64);
        let reply = tokio::time::timeout(
            Duration::from_millis(500),
            invocation.invoke_async::<(i64, u64)>(&mut conn),
        )
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
        if reply.0 != 1 {
            return Ok(Err(ConnectionRefused::AtLimit));
        }
        if let Ok(mut live) = self.live.lock() {
            live.insert(member.clone(), key.to_owned());
        }
        Ok(Ok(ConnectionGuard {
            slot: Some(Slot::Shared {
                key: key.to_owned(),
                member,
            }),
            owner: self.clone(),
        }))
    }

    pub(super) fn acquire_local(
        self: &Arc<Self>,
        key: &str,
        limit: u64,
    ) -> Result<ConnectionGuard, ConnectionRefused> {
        let Ok(mut counts) = self.local.lock() else {
            return Err(ConnectionRefused::Unavailable);
        };
        let n = counts.entry(key.to_owned()).or_default();
        if *n >= limit {
            return Err(ConnectionRefused::AtLimit);
        }
        *n += 1;
        Ok(ConnectionGuard {
            slot: Some(Slot::Local {
                key: key.to_owned(),
            }),
            owner: self.clone(),
        })
    }

    /// Renews this node's leases and sends removals, until cancelled.
    pub async fn maintain(self: Arc<Self>, cancel: CancellationToken) {
        let Some(redis) = self.redis.clone() else {
            return;
        };
        let Some(mut removals) = self.removals_rx.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        let mut renew = tokio::time::interval(LEASE / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                Some(first) = removals.recv() => {
                    let mut batch = vec![first];
                    while batch.len() < 512 {
                        match removals.try_recv() {
                            Ok(r) => batch.push(r),
                            Err(_) => break,
                        }
                    }
                    // One pipeline per slot: a Cluster refuses pipelines across slots.
                    for group in redis.group_by_slot(batch, |(key, _)| key) {
                        let mut pipe = redis::pipe();
                        for (key, member) in &group {
                            pipe.cmd("ZREM").arg(key).arg(member).ignore();
                        }
                        let mut conn = redis.clone();
                        if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                            tracing::debug!(error = %e, "removing connection leases failed; they lapse");
                        }
                    }
                }
                _ = renew.tick() => self.renew(&redis).await,
            }
        }
    }

    async fn renew(&self, redis: &RedisConnection) {
        let live: Vec<(String, String)> = match self.live.lock() {
            Ok(live) => live.iter().map(|(m, k)| (m.clone(), k.clone())).collect(),
            Err(_) => return,
        };
        if live.is_empty() {
            return;
        }
        let mut conn = redis.clone();
        let Ok((secs, micros)) = redis::cmd("TIME")
            .query_async::<(u64, u64)>(&mut conn)
            .await
        else {
            self.resync_later();
            return;
        };
        let expiry = secs * 1000 + micros / 1000 + LEASE.as_millis() as u64;
        // Normally only existing leases are renewed (a lease removed meanwhile stays
        // removed); after Redis was unreachable they are written again, since Redis may
        // have lost them.
        let resync = self.resync.swap(false, Ordering::Relaxed);
        // One pipeline per slot on a Cluster (there, TIME above came from a random master:
        // the masters' clocks must agree to well inside the lease, as NTP gives).
        for group in redis.group_by_slot(live, |(_, key)| key) {
            let mut pipe = redis::pipe();
            for (member, key) in &group {
                let cmd = pipe.cmd("ZADD").arg(key);
                if !resync {
                    cmd.arg("XX");
                }
                cmd.arg(expiry).arg(member).ignore();
                pipe.cmd("PEXPIRE")
                    .arg(key)
                    .arg(2 * LEASE.as_millis() as u64)
                    .ignore();
            }
            if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                tracing::debug!(error = %e, "renewing connection leases failed");
                self.resync_later();
            }
        }
    }
}
