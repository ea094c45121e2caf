//! The outbox claimer: moves rows of `pgfanout.outbox` onto the bus, each exactly once.
//!
//! One connection per node LISTENs on the wake-up channel (`pgfanout.publish` sends one
//! notification per writing transaction) and sweeps the partitions that have rows: at once
//! on a wake-up, else every `PGFANOUT_OUTBOX_POLL` (a missed wake-up, or rows left by a
//! node that died). A partition is worked on in transactions that each take its advisory
//! lock (`pg_try_advisory_xact_lock`: one node per partition at a time, any node may take
//! any partition), read a batch in id order, publish it with `outbox:<id>` as idempotency
//! key, and delete it. A node that dies between publishing and committing leaves the rows;
//! whoever takes them next publishes them again and the bus drops them as duplicates.
//! A node runs `PGFANOUT_OUTBOX_WORKERS` claimers (one connection each), so several
//! partitions move at once; a batch goes to the bus in one publish (one Redis round trip per
//! 256 rows, or per slot on a Cluster), each channel's rows in id order.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError, PublishOutcome, PublishRequest, Source};
use crate::metrics as m;
use crate::protocol::valid_channel;

/// The wake-up channel `pgfanout.publish()` notifies.
pub const WAKE_CHANNEL: &str = "pgfanout_outbox";
/// `application_name` of the claimer's connection.
pub const APPLICATION_NAME: &str = "pgfanout-outbox";
/// First key of the partitions' advisory locks (`pgfo`).
const LOCK_CLASS: i32 = 0x7067_666f;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("bus: {0}")]
    Bus(#[from] BusError),
    #[error("postgres connect timed out")]
    Timeout,
}

#[derive(Clone)]
pub struct Outbox {
    pub database_url: String,
    pub bus: Bus,
    /// Sweep period without wake-ups.
    pub poll: Duration,
    /// Rows per transaction.
    pub batch: u32,
}

impl Outbox {
    /// Claims and publishes until cancelled, reconnecting with backoff.
    pub async fn run(self, cancel: CancellationToken) {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.serve(&cancel, &mut delay).await {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, retry_in = ?delay, "outbox claimer failed"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn serve(
        &self,
        cancel: &CancellationToken,
        delay: &mut Duration,
    ) -> Result<(), OutboxError> {
        let config = super::connection_config(&self.database_url, APPLICATION_NAME)?;
        let (mut client, mut connection) =
            tokio::time::timeout(Duration::from_secs(10), config.connect(NoTls))
                .await
                .map_err(|_| OutboxError::Timeout)??;
        let wake = Arc::new(Notify::new());
        let woken = wake.clone();
        let lost = CancellationToken::new();
        let lost_guard = lost.clone();
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => woken.notify_one(),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            lost_guard.cancel();
        });
        let _driver = AbortOnDrop(driver.abort_handle());
        client
            .batch_execute(&format!("LISTEN {WAKE_CHANNEL}"))
            .await?;
        let stamp = match client
            .query_one(
                "SELECT current_setting('track_commit_timestamp') = 'on'",
                &[],
            )
            .await
        {
            Ok(row) if row.get::<_, bool>(0) => "pg_xact_commit_timestamp(xmin)",
            _ => "NULL::timestamptz",
        };
        let select = format!(
            "SELECT id, channel, (CASE WHEN stamp_commit THEN jsonb_set(data, '{{commit_time}}', \
             to_jsonb(coalesce({stamp}, created_at))) ELSE data END)::text \
             FROM pgfanout.outbox WHERE part = $1 ORDER BY id LIMIT $2"
        );
        *delay = Duration::from_millis(100);
        tracing::info!("outbox claimer connected");
        loop {
            match self.sweep(&mut client, &select).await {
                Ok(()) => {}
                // The rows stay; the connection is fine.
                Err(OutboxError::Bus(e)) => {
                    tracing::warn!(error = %e, "outbox: bus unavailable; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    continue;
                }
                Err(e) => return Err(e),
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = lost.cancelled() => return Err(OutboxError::Timeout),
                _ = wake.notified() => {}
                _ = tokio::time::sleep(self.poll) => {}
            }
        }
    }

    /// Drains every partition that has rows and that no other node is working on.
    async fn sweep(&self, client: &mut Client, select: &str) -> Result<(), OutboxError> {
        let rows = client
            .query("SELECT DISTINCT part FROM pgfanout.outbox", &[])
            .await?;
        let mut parts: Vec<i16> = rows.iter().map(|r| r.get(0)).collect();
        if parts.is_empty() {
            return Ok(());
        }
        // Nodes sweeping together start at different partitions.
        let start = rand::random_range(0..parts.len());
        parts.rotate_left(start);
        for part in parts {
            while let Some(n) = self.drain_batch(client, select, part).await? {
                if n < self.batch as usize {
                    break;
                }
            }
        }
        Ok(())
    }

    /// One transaction on `part`: lock, read a batch, publish, delete. None: another node
    /// holds the partition.
    async fn drain_batch(
        &self,
        client: &mut Client,
        select: &str,
        part: i16,
    ) -> Result<Option<usize>, OutboxError> {
        let tx = client.transaction().await?;
        let locked: bool = tx
            .query_one(
                "SELECT pg_try_advisory_xact_lock($1, $2)",
                &[&LOCK_CLASS, &i32::from(part)],
            )
            .await?
            .get(0);
        if !locked {
            return Ok(None);
        }
        let _owned = Owned::claim();
        let rows = tx.query(select, &[&part, &i64::from(self.batch)]).await?;
        let rows: Vec<(i64, &str, &str)> = rows
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect();
        let (done, failure) = self.publish_rows(&rows).await;
        if !done.is_empty() {
            tx.execute(
                "DELETE FROM pgfanout.outbox WHERE part = $1 AND id = ANY($2)",
                &[&part, &done],
            )
            .await?;
        }
        tx.commit().await?;
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(Some(rows.len())),
        }
    }

    /// Publishes rows (in id order) in one bus batch, each with its idempotency key: the ids
    /// settled (published, duplicates, or dropped for an invalid channel), and the first
    /// failure. A channel's rows after its first failure stay for the next batch.
    async fn publish_rows(&self, rows: &[(i64, &str, &str)]) -> (Vec<i64>, Option<BusError>) {
        let mut done = Vec::with_capacity(rows.len());
        let mut sent = Vec::with_capacity(rows.len());
        for (id, channel, data) in rows {
            if valid_channel(channel) {
                sent.push((*id, *channel, format!("outbox:{id}"), *data));
            } else {
                tracing::warn!(
                    id,
                    channel,
                    "outbox row on an invalid channel name; dropped"
                );
                metrics::counter!(m::MESSAGES_DROPPED, "reason" => "invalid_channel").increment(1);
                done.push(*id);
            }
        }
        let requests: Vec<PublishRequest<'_>> = sent
            .iter()
            .map(|(_, channel, key, data)| PublishRequest {
                channel,
                data: Bytes::copy_from_slice(data.as_bytes()),
                idempotency_key: Some(key),
                fence: None,
                source: Source::Outbox,
                received_at: None,
            })
            .collect();
        let outcomes = self.bus.publish_batch(&requests).await;
        let mut failure = None;
        let mut stopped: Vec<&str> = Vec::new();
        let mut duplicates = 0u64;
        for ((id, channel, _, _), outcome) in sent.iter().zip(outcomes) {
            if stopped.contains(channel) {
                continue;
            }
            match outcome {
                Ok(PublishOutcome::Published { .. }) => done.push(*id),
                Ok(PublishOutcome::Duplicate { .. }) => {
                    duplicates += 1;
                    done.push(*id);
                }
                // Unfenced: not an answer the bus gives here; kept for the next batch.
                Ok(PublishOutcome::Fenced) => stopped.push(channel),
                Err(e) => {
                    if !matches!(e, BusError::NotAttempted) {
                        failure.get_or_insert(e);
                    }
                    stopped.push(channel);
                }
            }
        }
        if duplicates > 0 {
            metrics::counter!(m::INGEST_DUPLICATES, "path" => "outbox").increment(duplicates);
        }
        if failure.is_none() && !stopped.is_empty() {
            failure = Some(BusError::NotAttempted);
        }
        (done, failure)
    }
}

/// A partition this node works on: counted in `outbox_partitions_owned` while it lives.
struct Owned;

impl Owned {
    fn claim() -> Self {
        metrics::gauge!(m::OUTBOX_PARTITIONS_OWNED).increment(1.0);
        Self
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        metrics::gauge!(m::OUTBOX_PARTITIONS_OWNED).decrement(1.0);
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
