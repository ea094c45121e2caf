//! Ingest from Postgres: the LISTEN loop on one dedicated connection, reconnecting with
//! backoff, and the bridge that puts each notification on the bus exactly once.
//!
//! Every node LISTENs; with Redis only the holder of the bridge lease publishes (fenced
//! by the lease token), so N nodes put a notification on the bus once. The in-memory bus
//! is its own single owner.

pub mod lease;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls, Notification};
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, PublishOutcome, PublishRequest, Source};
use crate::health::Health;
use crate::metrics as m;
use crate::protocol::payload_to_json;
use lease::Lease;

/// `application_name` of the LISTEN connection, so operators (and tests) can find it.
pub const APPLICATION_NAME: &str = "pgfanout-listen";
/// Notifications read from the socket but not yet bridged.
const NOTIFICATION_QUEUE: usize = 1024;
/// A silent connection (a cut network) is detected by this query at least this often.
const LIVENESS_PERIOD: Duration = Duration::from_secs(5);
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(3);
const PUBLISH_ATTEMPTS: u32 = 3;

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
    pub bus: Bus,
    /// None on the in-memory bus: this node is the only bridge.
    pub lease: Option<Arc<Lease>>,
    pub health: Arc<Health>,
}

impl Ingest {
    /// LISTENs until cancelled, reconnecting with exponential backoff (100 ms to 5 s).
    pub async fn run(self, cancel: CancellationToken) {
        let mut delay = Duration::from_millis(100);
        let mut first = true;
        loop {
            if !first {
                metrics::counter!(m::POSTGRES_RECONNECTS).increment(1);
            }
            first = false;
            let result = self.listen_once(&cancel, &mut delay).await;
            self.health.set_postgres(false);
            match result {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "postgres LISTEN connection lost")
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(jitter(delay)) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// One connection's life: connect, LISTEN, bridge until it fails or we are cancelled.
    async fn listen_once(
        &self,
        cancel: &CancellationToken,
        delay: &mut Duration,
    ) -> Result<(), IngestError> {
        let mut config: tokio_postgres::Config = self.database_url.parse()?;
        config
            .application_name(APPLICATION_NAME)
            .connect_timeout(Duration::from_secs(5))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10));
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

        for channel in &self.channels {
            client
                .batch_execute(&format!("LISTEN {}", quote_ident(channel)))
                .await?;
        }
        self.health.set_postgres(true);
        *delay = Duration::from_millis(100);
        tracing::info!(channels = ?self.channels, "listening on postgres");

        let mut liveness = tokio::time::interval(LIVENESS_PERIOD);
        liveness.tick().await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                n = notifications.recv() => match n {
                    Some(n) => self.bridge(&n).await,
                    None => {
                        return match driver.await {
                            Ok(Err(e)) => Err(e.into()),
                            _ => Err(IngestError::Closed),
                        };
                    }
                },
                _ = liveness.tick() => {
                    match tokio::time::timeout(LIVENESS_TIMEOUT, client.simple_query("SELECT 1")).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(e.into()),
                        Err(_) => return Err(IngestError::Timeout),
                    }
                }
            }
        }
    }

    /// Puts one notification on the bus, if this node is the bridge.
    async fn bridge(&self, n: &Notification) {
        metrics::counter!(m::NOTIFICATIONS_RECEIVED).increment(1);
        let fence = match &self.lease {
            Some(lease) if lease.is_held() => Some(lease.fence()),
            Some(_) => {
                metrics::counter!(m::MESSAGES_DROPPED, "reason" => "standby").increment(1);
                return;
            }
            None => None,
        };
        let data = payload_to_json(n.payload());
        for attempt in 1..=PUBLISH_ATTEMPTS {
            let request = PublishRequest {
                channel: n.channel(),
                data: data.clone(),
                idempotency_key: None,
                fence,
                source: Source::Notify,
            };
            match self.bus.publish(request).await {
                Ok(PublishOutcome::Fenced) => {
                    metrics::counter!(m::MESSAGES_DROPPED, "reason" => "fenced").increment(1);
                    return;
                }
                Ok(_) => return,
                Err(e) if attempt < PUBLISH_ATTEMPTS => {
                    tracing::warn!(error = %e, attempt, "bus publish failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, channel = n.channel(), "notification not bridged");
                    metrics::counter!(m::MESSAGES_DROPPED, "reason" => "bus_error").increment(1);
                }
            }
        }
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
