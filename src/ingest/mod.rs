//! Ingest from Postgres: the LISTEN loop on one dedicated connection, reconnecting with
//! backoff, that feeds every notification into the per-shard buffers of [`stream`]; the
//! shard leases and takeovers of [`shards`]; one bridge task per shard that puts what this
//! node owns on the bus, exactly once. The durable path: the `pgfanout` schema
//! ([`migrate`], `schema_v1.sql`) and the [`outbox`] claimer.
//!
//! Every node LISTENs on every channel (a warm standby for every shard). With Redis, the
//! holder of a shard's lease bridges it (fenced by the lease token); the in-memory bus is
//! its own single owner. The rule that makes a takeover lose nothing and repeat nothing is
//! in `docs/ingest.md`.

pub mod migrate;
pub mod outbox;
pub mod shards;
pub mod stream;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{AsyncMessage, NoTls, Notification};
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::metrics as m;
use crate::protocol::payload_to_json;
use shards::{Barrier, Shared};

/// `application_name` of the LISTEN connection, so operators (and tests) can find it.
pub const APPLICATION_NAME: &str = "pgfanout-listen";

/// A connection to `url` for ingest work: named in `pg_stat_activity`, with keepalives so
/// that a server gone silent is noticed.
pub(crate) fn connection_config(
    url: &str,
    application_name: &str,
) -> Result<tokio_postgres::Config, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    config
        .application_name(application_name)
        .connect_timeout(Duration::from_secs(5))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10));
    Ok(config)
}
/// The Postgres channel of stream markers (see [`stream`]): every node listens on it.
pub const MARKER_CHANNEL: &str = "pgfanout_ingest_marker";
/// Notifications read from the socket but not yet buffered.
const NOTIFICATION_QUEUE: usize = 1024;
/// Notifications the LISTEN loop takes from that queue at once (buffered under one lock).
const READ_BATCH: usize = 256;
/// A silent connection (a cut network) is detected by this query at least this often.
const LIVENESS_PERIOD: Duration = Duration::from_secs(5);
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an owner's full buffer waits for its bridge before looking again.
const BACKPRESSURE_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("postgres connection closed")]
    Closed,
    #[error("postgres liveness check timed out")]
    Timeout,
}

pub struct Ingest {
    pub database_url: String,
    pub channels: Vec<String>,
    pub shared: Arc<Shared>,
    /// Takeovers waiting for a marker; None on the in-memory bus, where this node bridges
    /// every shard.
    pub barriers: Option<mpsc::Receiver<Barrier>>,
    /// Prefix of this process' marker ids (unique per process).
    pub instance: String,
    pub health: Arc<Health>,
}

impl Ingest {
    /// LISTENs until cancelled, reconnecting with exponential backoff (100 ms to 5 s).
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut barriers = self.barriers.take();
        let mut delay = Duration::from_millis(100);
        let mut first = true;
        let mut markers = 0u64;
        loop {
            if !first {
                metrics::counter!(m::POSTGRES_RECONNECTS).increment(1);
            }
            first = false;
            let result = self
                .listen_once(&cancel, &mut delay, &mut markers, &mut barriers)
                .await;
            self.health.set_postgres(false);
            match result {
                // Stopped (the drain): what was buffered stays, with the ownerships, so the
                // bridges publish the backlog and the lease keeper hands the leases off
                // after that. Resetting here would stop the bridges mid-backlog and forget
                // the tokens the leases are released with.
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "postgres LISTEN connection lost")
                }
            }
            // What this connection buffered cannot be lined up with the next one.
            self.shared.lock().reset();
            self.shared.report_owned();
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(jitter(delay)) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// One connection's life: connect, LISTEN, mark, buffer until it fails or we are
    /// cancelled.
    async fn listen_once(
        &self,
        cancel: &CancellationToken,
        delay: &mut Duration,
        markers: &mut u64,
        barriers: &mut Option<mpsc::Receiver<Barrier>>,
    ) -> Result<(), IngestError> {
        let config = connection_config(&self.database_url, APPLICATION_NAME)?;
        let (client, mut connection) = config.connect(NoTls).await?;
        let (tx, mut notifications) = mpsc::channel::<Notification>(NOTIFICATION_QUEUE);
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                let sent = match message? {
                    AsyncMessage::Notification(n) => tx.send(n).await.is_ok(),
                    AsyncMessage::Notice(notice) => {
                        tracing::debug!(%notice, "postgres notice");
                        true
                    }
                    _ => true,
                };
                if !sent {
                    break;
                }
            }
            Ok::<(), tokio_postgres::Error>(())
        });
        // The driver dies with this connection's life, whatever ends it.
        let _driver_guard = AbortOnDrop(driver.abort_handle());

        {
            let mut state = self.shared.lock();
            state.reset();
            if barriers.is_none() {
                state.own_all();
            }
        }
        self.shared.report_owned();
        let mut listen = format!("LISTEN {};", quote_ident(MARKER_CHANNEL));
        for channel in &self.channels {
            listen.push_str(&format!("LISTEN {};", quote_ident(channel)));
        }
        client.batch_execute(&listen).await?;
        // Positions start at our first marker: we are listening before it is sent, so
        // everything after it in the server's order reaches us.
        let mut pending: HashMap<String, Vec<oneshot::Sender<()>>> = HashMap::new();
        // Queries run beside the reading of notifications, never awaited in line: the
        // connection's driver stops reading the socket (query replies included) while the
        // notification queue is full, which only this loop empties.
        let mut queries: FuturesUnordered<BoxFuture<'_, Result<(), IngestError>>> =
            FuturesUnordered::new();
        let first_marker = self.next_marker(markers);
        queries.push(send_marker(&client, first_marker.clone()));
        *delay = Duration::from_millis(100);
        tracing::info!(channels = ?self.channels, "listening on postgres");

        let mut liveness = tokio::time::interval(LIVENESS_PERIOD);
        liveness.tick().await;
        let mut batch = Vec::with_capacity(READ_BATCH);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                n = notifications.recv_many(&mut batch, READ_BATCH) => {
                    if n == 0 {
                        return match driver.await {
                            Ok(Err(e)) => Err(e.into()),
                            _ => Err(IngestError::Closed),
                        };
                    }
                    // In stream order: a marker between two notifications stays there.
                    let mut run = Vec::with_capacity(batch.len());
                    for n in batch.drain(..) {
                        if n.channel() != MARKER_CHANNEL {
                            run.push(n);
                            continue;
                        }
                        if !self.buffer(std::mem::take(&mut run), cancel).await {
                            return Ok(());
                        }
                        self.shared.lock().mark(n.payload());
                        if n.payload() == first_marker {
                            self.health.set_postgres(true);
                            tracing::info!("ingest stream aligned");
                        }
                        for done in pending.remove(n.payload()).unwrap_or_default() {
                            let _ = done.send(());
                        }
                    }
                    if !self.buffer(run, cancel).await {
                        return Ok(());
                    }
                }
                Some(barrier) = recv_barrier(barriers) => {
                    let id = self.next_marker(markers);
                    pending.entry(id.clone()).or_default().push(barrier.done);
                    queries.push(send_marker(&client, id));
                }
                Some(result) = queries.next(), if !queries.is_empty() => result?,
                _ = liveness.tick() => {
                    let bytes = self.shared.lock().buffered_bytes();
                    metrics::gauge!(m::INGEST_BUFFER_BYTES).set(bytes as f64);
                    let probe = tokio::time::timeout(LIVENESS_TIMEOUT, client.simple_query("SELECT 1"));
                    queries.push(Box::pin(async move {
                        match probe.await {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err(e)) => Err(e.into()),
                            Err(_) => Err(IngestError::Timeout),
                        }
                    }));
                }
            }
        }
    }

    /// A new marker id, unique to this process.
    fn next_marker(&self, markers: &mut u64) -> String {
        *markers += 1;
        format!("{}:{:x}", self.instance, *markers)
    }

    /// Buffers notifications, in order, under one lock while they fit; an owner whose
    /// bridge is behind by a full buffer waits for it (Postgres keeps the rest queued)
    /// rather than drop. False when cancelled.
    async fn buffer(&self, batch: Vec<Notification>, cancel: &CancellationToken) -> bool {
        if batch.is_empty() {
            return true;
        }
        metrics::counter!(m::NOTIFICATIONS_RECEIVED).increment(batch.len() as u64);
        let shards = self.shared.lock().shard_count();
        let mut items = batch.iter().map(|n| {
            (
                shards::shard_of(n.channel(), shards),
                Arc::<str>::from(n.channel()),
                payload_to_json(n.payload()),
            )
        });
        let mut next = items.next();
        let mut woken = vec![false; shards];
        while let Some((shard, channel, data)) = next.take() {
            let full = {
                let mut state = self.shared.lock();
                let mut item = Some((shard, channel, data));
                while let Some((shard, channel, data)) = item.take() {
                    if state.push(shard, channel.clone(), data.clone()).is_err() {
                        item = Some((shard, channel, data));
                        break;
                    }
                    woken[shard] = true;
                    item = items.next();
                }
                item
            };
            for (shard, woken) in woken.iter_mut().enumerate() {
                if std::mem::take(woken) {
                    self.shared.work[shard].notify_one();
                }
            }
            let Some(full) = full else { break };
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = self.shared.progress.notified() => {}
                _ = tokio::time::sleep(BACKPRESSURE_POLL) => {}
            }
            next = Some(full);
        }
        true
    }
}

/// Sends marker `id` through Postgres (see [`stream`]).
fn send_marker(
    client: &tokio_postgres::Client,
    id: String,
) -> BoxFuture<'_, Result<(), IngestError>> {
    Box::pin(async move {
        client
            .execute("SELECT pg_notify($1, $2)", &[&MARKER_CHANNEL, &id])
            .await?;
        Ok(())
    })
}

async fn recv_barrier(barriers: &mut Option<mpsc::Receiver<Barrier>>) -> Option<Barrier> {
    match barriers {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A Postgres identifier, quoted so any channel name LISTENs as written.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.8..1.2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("orders"), "\"orders\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
