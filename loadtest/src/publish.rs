//! Publishing at a set rate through the real paths: `pg_notify`, `pgfanout.publish`, the
//! HTTP API (pgfanout's and the Socket.IO baseline's `POST /api/publish`, or Nchan's
//! `POST /pub/<channel>`), or a client's `publish` command. Every payload carries its
//! channel, its sequence on that channel and its send time.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::payload;
use crate::scenario::{Protocol, PublishMode, Scenario};

/// One batch: (channel index, channel name, payload) per publication.
type Batch = Vec<(u32, String, String)>;

/// What a step's publishing did.
#[derive(Debug, Default)]
pub struct Published {
    /// Publications accepted per channel index.
    pub per_channel: Vec<u64>,
    pub errors: u64,
    /// Publications handed to the publishers (accepted or not).
    pub attempted: u64,
    /// From the first to the last publication handed out.
    pub elapsed: Duration,
    pub first_error: Option<String>,
}

impl Published {
    pub fn total(&self) -> u64 {
        self.per_channel.iter().sum()
    }
}

/// Publishes at `rate` per second for the scenario's duration (or message cap).
/// `seqs` holds the last sequence of each channel and persists across steps.
pub async fn run(s: &Scenario, rate: f64, seqs: &mut [u64]) -> anyhow::Result<Published> {
    let mut senders = Vec::new();
    let mut workers = Vec::new();
    for w in 0..s.publishers {
        let (tx, rx) = mpsc::channel::<Batch>(2);
        let sink = Sink::open(s, w).await?;
        senders.push(tx);
        workers.push(tokio::spawn(sink.drain(rx, s.channels as usize)));
    }
    let k = s.channels.max(1);
    let cap = if s.messages == 0 {
        u64::MAX
    } else {
        s.messages
    };
    // Each channel belongs to one publisher, so its publications reach the bus in
    // sequence order (as an application's would); batches fill per publisher.
    let mut pending: Vec<Batch> = vec![Vec::with_capacity(s.batch); senders.len()];
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut handed = 0u64;
    let mut last = start;
    'outer: loop {
        tick.tick().await;
        let elapsed = start.elapsed();
        let over = elapsed >= s.duration;
        let due = if over {
            handed
        } else {
            ((rate * elapsed.as_secs_f64()) as u64 + 1).min(cap)
        };
        while handed < due {
            // Publishers that fall behind must not stretch the step past its duration.
            if start.elapsed() >= s.duration {
                break;
            }
            let c = (handed % u64::from(k)) as u32;
            seqs[c as usize] += 1;
            let data = payload::encode(
                s.run,
                c,
                seqs[c as usize],
                payload::now_micros(),
                s.payload_bytes,
            );
            let w = c as usize % senders.len();
            pending[w].push((c, s.channel_name(c), data));
            handed += 1;
            if pending[w].len() >= s.batch {
                // A full queue means the publishers fall behind: waiting here lowers
                // the achieved rate, which the report shows.
                let batch = std::mem::replace(&mut pending[w], Vec::with_capacity(s.batch));
                if senders[w].send(batch).await.is_err() {
                    break 'outer;
                }
                last = Instant::now();
            }
        }
        // What is due goes out now: `batch` is a most per request, never a reason to
        // hold a publication back (that would add to its latency).
        for (w, batch) in pending.iter_mut().enumerate() {
            if !batch.is_empty() {
                let batch = std::mem::replace(batch, Vec::with_capacity(s.batch));
                if senders[w].send(batch).await.is_err() {
                    break 'outer;
                }
                last = Instant::now();
            }
        }
        if over || handed >= cap {
            break;
        }
    }
    drop(senders);
    let mut out = Published {
        per_channel: vec![0; k as usize],
        attempted: handed,
        elapsed: last - start,
        ..Published::default()
    };
    for w in workers {
        let part = w.await.context("publisher task")?;
        for (a, b) in out.per_channel.iter_mut().zip(&part.per_channel) {
            *a += b;
        }
        out.errors += part.errors;
        if out.first_error.is_none() {
            out.first_error = part.first_error;
        }
    }
    Ok(out)
}

/// One publisher connection.
enum Sink {
    Sql {
        client: tokio_postgres::Client,
        one: tokio_postgres::Statement,
        many: tokio_postgres::Statement,
    },
    Api {
        http: reqwest::Client,
        url: String,
        key: String,
    },
    /// Nchan's publisher location: `url` ends in `/pub/`, one publication per request.
    Nchan { http: reqwest::Client, url: String },
    Client {
        ws: Ws,
        next_id: u32,
        reader: tokio::task::JoinHandle<()>,
        errors: std::sync::Arc<std::sync::atomic::AtomicU64>,
    },
}

type Ws = futures_util::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    Message,
>;

/// Why a batch, or part of it, was not accepted.
struct Refused {
    error: anyhow::Error,
    /// The positions in the batch that failed; `None`: all of them.
    only: Option<Vec<usize>>,
}

impl Refused {
    fn all(error: anyhow::Error) -> Self {
        Self { error, only: None }
    }
}

/// Sends one request; an answer other than 2xx is an error that carries the body.
async fn post(request: reqwest::RequestBuilder) -> anyhow::Result<()> {
    let resp = request.send().await?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        return Err(anyhow!("{status}: {text}"));
    }
    Ok(())
}

/// Nchan takes one message per POST: the batch's channels go out side by side, and each
/// channel's publications one after another, so they reach the bus in sequence order.
async fn publish_each(http: &reqwest::Client, prefix: &str, batch: &Batch) -> Result<(), Refused> {
    let results =
        futures_util::future::join_all(chains(batch).into_iter().map(|positions| async move {
            let mut failed = Vec::new();
            let mut first = None;
            for i in positions {
                let (_, name, data) = &batch[i];
                let request = http
                    .post(format!("{prefix}{name}"))
                    .header("content-type", "application/json")
                    .body(data.clone());
                if let Err(e) = post(request).await {
                    failed.push(i);
                    first.get_or_insert(e.context("nchan"));
                }
            }
            (failed, first)
        }))
        .await;
    let mut failed = Vec::new();
    let mut error = None;
    for (positions, first) in results {
        failed.extend(positions);
        if error.is_none() {
            error = first;
        }
    }
    match error {
        None => Ok(()),
        Some(error) => Err(Refused {
            error,
            only: Some(failed),
        }),
    }
}

/// The positions of a batch grouped by channel, each group in batch (sequence) order.
fn chains(batch: &Batch) -> Vec<Vec<usize>> {
    let mut chains: Vec<(u32, Vec<usize>)> = Vec::new();
    for (i, (c, _, _)) in batch.iter().enumerate() {
        match chains.iter_mut().find(|(channel, _)| channel == c) {
            Some((_, positions)) => positions.push(i),
            None => chains.push((*c, vec![i])),
        }
    }
    chains.into_iter().map(|(_, positions)| positions).collect()
}

impl Sink {
    async fn open(s: &Scenario, index: usize) -> anyhow::Result<Self> {
        if s.protocol != Protocol::Centrifugo && s.publish != PublishMode::Api {
            bail!(
                "the {:?} baseline is published to through its API only (publish = \"api\"), not {:?}",
                s.protocol,
                s.publish
            );
        }
        match s.publish {
            PublishMode::None => bail!("no publish mode"),
            PublishMode::Notify | PublishMode::Outbox => {
                let (client, conn) =
                    tokio_postgres::connect(&s.database_url, tokio_postgres::NoTls)
                        .await
                        .context("publisher: postgres connect")?;
                tokio::spawn(conn);
                let (one, many) = if s.publish == PublishMode::Notify {
                    (
                        "SELECT pg_notify($1::text, $2::text)",
                        "SELECT count(pg_notify(c, p)) FROM unnest($1::text[], $2::text[]) AS t(c, p)",
                    )
                } else {
                    (
                        "SELECT pgfanout.publish($1::text, $2::text::jsonb)",
                        "SELECT count(pgfanout.publish(c, p::jsonb)) FROM unnest($1::text[], $2::text[]) AS t(c, p)",
                    )
                };
                let one = client.prepare(one).await.context("publisher: prepare")?;
                let many = client.prepare(many).await.context("publisher: prepare")?;
                Ok(Sink::Sql { client, one, many })
            }
            PublishMode::Api if s.protocol == Protocol::Nchan => Ok(Sink::Nchan {
                http: reqwest::Client::builder().tcp_nodelay(true).build()?,
                url: s.api_urls[index % s.api_urls.len()].clone(),
            }),
            PublishMode::Api => Ok(Sink::Api {
                http: reqwest::Client::builder().tcp_nodelay(true).build()?,
                url: s.api_urls[index % s.api_urls.len()].clone(),
                key: s.api_key.clone(),
            }),
            PublishMode::Client => {
                let url = &s.urls[index % s.urls.len()];
                let ws = crate::client::connect(url, None)
                    .await
                    .context("publisher: websocket")?;
                let (mut sink, mut stream) = ws.split();
                sink.send(Message::text(
                    r#"{"id":1,"connect":{"name":"loadtest-publisher"}}"#,
                ))
                .await?;
                let errors = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
                let counted = errors.clone();
                let reader = tokio::spawn(async move {
                    while let Some(Ok(msg)) = stream.next().await {
                        if let Message::Text(text) = msg {
                            // A step is shorter than the ping interval and every step opens
                            // new publishers, so pings are not answered.
                            for line in text.as_str().lines() {
                                if line.contains("\"error\"") {
                                    counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                }
                            }
                        }
                    }
                });
                Ok(Sink::Client {
                    ws: sink,
                    next_id: 2,
                    reader,
                    errors,
                })
            }
        }
    }

    async fn send(&mut self, batch: &Batch) -> Result<(), Refused> {
        match self {
            Sink::Nchan { http, url } => publish_each(http, url, batch).await,
            whole => whole.send_whole(batch).await.map_err(Refused::all),
        }
    }

    /// Sends a batch that is accepted or refused as a whole (by Nchan, one by one).
    async fn send_whole(&mut self, batch: &Batch) -> anyhow::Result<()> {
        match self {
            Sink::Nchan { http, url } => publish_each(http, url, batch).await.map_err(|r| r.error),
            Sink::Sql { client, one, many } => {
                if batch.len() == 1 {
                    client.execute(&*one, &[&batch[0].1, &batch[0].2]).await?;
                } else {
                    let names: Vec<&str> = batch.iter().map(|b| b.1.as_str()).collect();
                    let data: Vec<&str> = batch.iter().map(|b| b.2.as_str()).collect();
                    client.query_one(&*many, &[&names, &data]).await?;
                }
                Ok(())
            }
            Sink::Api { http, url, key } => {
                let items: Vec<String> = batch
                    .iter()
                    .map(|(_, name, data)| format!("{{\"channel\":\"{name}\",\"data\":{data}}}"))
                    .collect();
                let body = if items.len() == 1 {
                    items[0].clone()
                } else {
                    format!("[{}]", items.join(","))
                };
                let request = http
                    .post(url.as_str())
                    .header("authorization", format!("apikey {key}"))
                    .header("content-type", "application/json")
                    .body(body);
                post(request).await.context("api")
            }
            Sink::Client { ws, next_id, .. } => {
                let mut frame = String::new();
                for (_, name, data) in batch {
                    if !frame.is_empty() {
                        frame.push('\n');
                    }
                    frame.push_str(&format!("{{\"id\":{next_id},\"publish\":{{\"channel\":\"{name}\",\"data\":{data}}}}}"));
                    *next_id = next_id.wrapping_add(1).max(2);
                }
                ws.send(Message::text(frame)).await?;
                Ok(())
            }
        }
    }

    /// Publishes every batch it is handed until the queue closes; returns its counts.
    async fn drain(mut self, mut rx: mpsc::Receiver<Batch>, channels: usize) -> Published {
        let mut out = Published {
            per_channel: vec![0; channels.max(1)],
            ..Published::default()
        };
        while let Some(batch) = rx.recv().await {
            let mut failed = vec![false; batch.len()];
            if let Err(refused) = self.send(&batch).await {
                match refused.only {
                    Some(positions) => positions.into_iter().for_each(|i| failed[i] = true),
                    None => failed.fill(true),
                }
                if out.first_error.is_none() {
                    out.first_error = Some(format!("{:#}", refused.error));
                }
            }
            for ((c, _, _), failed) in batch.iter().zip(failed) {
                if failed {
                    out.errors += 1;
                } else {
                    out.per_channel[*c as usize] += 1;
                }
            }
        }
        if let Sink::Client {
            mut ws,
            reader,
            errors,
            ..
        } = self
        {
            // Replies to the last publishes arrive after the send.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let refused = errors.load(std::sync::atomic::Ordering::Relaxed);
            if refused > 0 {
                out.errors += refused;
                out.first_error
                    .get_or_insert_with(|| "publish refused by the server".into());
            }
            let _ = ws.close().await;
            reader.abort();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_chain_per_channel_in_sequence_order() {
        let batch: Batch = [4, 6, 4, 8, 6, 4]
            .into_iter()
            .map(|c| (c, format!("bench{c}"), String::new()))
            .collect();
        assert_eq!(chains(&batch), vec![vec![0, 2, 5], vec![1, 4], vec![3]]);
        assert!(chains(&Batch::new()).is_empty());
    }
}
