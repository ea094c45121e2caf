//! [`with_traffic`]: steady notifications on a channel while a test does something hostile, and
//! a well-behaved client that must receive every one of them, in order, while it happens.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Client, TestDb};

/// How often the traffic notifies.
pub const TRAFFIC_PERIOD: Duration = Duration::from_millis(20);
/// The traffic runs at least this long, so even a hostile act that ends at once is measured
/// against some notifications.
const MIN_TRAFFIC: Duration = Duration::from_secs(1);
/// How long the observer may lag behind the last notification once the traffic stopped.
const CATCH_UP: Duration = Duration::from_secs(15);

/// What the well-behaved client saw.
#[derive(Debug)]
pub struct Traffic {
    /// Notifications sent while `hostile` ran.
    pub sent: u64,
    /// Publications the observer received, in arrival order (their `n`).
    pub received: Vec<u64>,
}

impl Traffic {
    /// Fails unless the observer received `1..=sent`, each once, in order.
    pub fn check_complete(&self) -> anyhow::Result<()> {
        let expected: Vec<u64> = (1..=self.sent).collect();
        anyhow::ensure!(
            self.received == expected,
            "the observer received {} of {} notifications (first difference at index {:?})",
            self.received.len(),
            self.sent,
            self.received
                .iter()
                .zip(&expected)
                .position(|(got, want)| got != want)
        );
        Ok(())
    }
}

/// Runs `hostile` while notifying `{"n":1}`, `{"n":2}`, … on `channel` every [`TRAFFIC_PERIOD`]
/// (and for at least [`MIN_TRAFFIC`])
/// and while `observer` (already subscribed to `channel`, and the only source of publications
/// there) reads them as they come (answering pings). Returns what `hostile` returned and what the
/// observer saw once it caught up with the last notification.
pub async fn with_traffic<T>(
    db: &TestDb,
    channel: &str,
    observer: &mut Client,
    hostile: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Traffic)> {
    // (notifications sent, traffic finished)
    let (sent_tx, sent_rx) = watch::channel((0u64, false));
    let (stop_tx, stop_rx) = watch::channel(false);
    let hostile = async {
        let out = hostile.await;
        let _ = stop_tx.send(true);
        out
    };
    let publish = async {
        let mut tick = tokio::time::interval(TRAFFIC_PERIOD);
        let mut n = 0u64;
        let started = Instant::now();
        let result = loop {
            tick.tick().await;
            if *stop_rx.borrow() && started.elapsed() >= MIN_TRAFFIC {
                break Ok(());
            }
            n += 1;
            if let Err(err) = db.notify(channel, &json!({ "n": n }).to_string()).await {
                break Err(err);
            }
            let _ = sent_tx.send((n, false));
        };
        let _ = sent_tx.send((n, true));
        result.map(|()| n)
    };
    let observe = async {
        let mut received = Vec::new();
        let mut finished_at: Option<Instant> = None;
        loop {
            let (sent, finished) = *sent_rx.borrow();
            if finished {
                if received.len() as u64 >= sent {
                    return Ok(received);
                }
                let at = *finished_at.get_or_insert_with(Instant::now);
                anyhow::ensure!(
                    at.elapsed() < CATCH_UP,
                    "observer still missing {} notifications {CATCH_UP:?} after the last one",
                    sent - received.len() as u64
                );
            }
            match observer.next_pub(Duration::from_millis(100)).await {
                Ok(publication) => received.push(publication.data["n"].as_u64().unwrap_or(0)),
                Err(err) if observer.close_frame().is_some() => {
                    return Err(err.context("the observer was disconnected"));
                }
                // Nothing within the poll window: look at the traffic again.
                Err(_) => {}
            }
        }
    };
    let (hostile, sent, received) = tokio::join!(hostile, publish, observe);
    let sent = sent.context("notifying")?;
    let received = received?;
    Ok((hostile?, Traffic { sent, received }))
}
