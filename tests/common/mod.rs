//! Shared harness for the integration tests: real services, real processes.
//!
//! # Layout
//! - [`postgres`]: [`TestDb`], a fresh database per test on the local server, dropped even on
//!   panic.
//! - [`redis`]: [`RedisServer`], a private `redis-server` child on a free port, stoppable for
//!   faults.
//! - [`redis_cluster`]: [`RedisCluster`], a local Redis Cluster (3 masters, optional replicas) of
//!   real `redis-server` processes, created with `redis-cli --cluster create`.
//! - [`node`]: [`Node`], the built `pgfanout` binary as a child process, with its log kept on disk.
//! - [`cluster`]: [`Cluster`], one database + one Redis + N nodes, and "wait until it bridges".
//! - [`client`]: [`Client`], a small Centrifugo-protocol (v2, JSON) WebSocket client with timeouts.
//! - [`balancer`]: [`Balancer`], a round-robin TCP load balancer without affinity, that reports
//!   where each WebSocket went and can hold new ones back.
//! - [`http`]: [`KeepAlive`], one HTTP/1.1 connection reused across requests.
//! - [`tokens`]: JWTs signed with the test-only keys in `tests/fixtures/keys`.
//! - [`script`]: [`Script`], a driver program (Node, Python) spoken to in JSON lines.
//! - [`sdk`]: [`SdkDriver`], a real client SDK (centrifuge-js, centrifuge-python) behind a [`Script`].
//! - [`traffic`]: [`with_traffic`], steady notifications and an observer that must get them all
//!   while a test misbehaves.
//!
//! Every test owns all of its services (no fixed ports, no shared database, no shared Redis), so
//! nextest can run them in parallel, and every wait has a deadline so no test can hang.

// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code, unused_imports)]

pub mod balancer;
pub mod client;
pub mod cluster;
pub mod http;
pub mod node;
pub mod postgres;
pub mod redis;
pub mod redis_cluster;
pub mod script;
pub mod sdk;
pub mod tokens;
pub mod traffic;

use std::future::Future;
use std::net::TcpListener;
use std::time::Duration;

pub use balancer::Balancer;
pub use client::{Client, ProtoError, Publication};
pub use cluster::Cluster;
pub use http::KeepAlive;
pub use node::{Node, NodeBuilder};
pub use postgres::TestDb;
pub use redis::RedisServer;
pub use redis_cluster::RedisCluster;
pub use script::Script;
pub use sdk::{Sdk, SdkDriver};
pub use traffic::{with_traffic, Traffic};

/// A TCP port that was free a moment ago on 127.0.0.1 (the OS picks it, so parallel tests differ).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("bind 127.0.0.1:0 to find a free port")
}

/// A short random lowercase hex tag for unique names (databases, node ids, channels).
pub fn random_tag() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Polls `check` every 50 ms until it returns `Ok`, or fails after `timeout` naming `what` and
/// the last `Err` description `check` gave (what it saw instead).
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(value) => return Ok(value),
            Err(last) => last,
        };
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last `lines` lines of a text file, for failure messages (empty when it cannot be read).
pub fn tail_of_file(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
