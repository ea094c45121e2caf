//! The in-memory bus: one node, same offsets, epochs and history as Redis.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use super::{
    assemble_recovery, new_epoch, ChannelHistory, HistoryPolicy, HistoryRead, Position,
    Publication, PublishOutcome, PublishRequest, Recovery, DEDUPE_TTL,
};
use crate::hub::Hub;

/// Idempotency keys remembered at most; the oldest are forgotten first.
const MAX_DEDUPE_KEYS: usize = 100_000;

#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

struct Inner {
    hub: Arc<Hub>,
    history: Arc<HistoryPolicy>,
    streams: DashMap<Arc<str>, Stream>,
    dedupe: Mutex<Dedupe>,
}

struct Stream {
    epoch: Arc<str>,
    top: u64,
    entries: VecDeque<(u64, Bytes, Instant)>,
    touched: Instant,
}

impl Stream {
    fn new() -> Self {
        Self {
            epoch: Arc::from(new_epoch()),
            top: 0,
            entries: VecDeque::new(),
            touched: Instant::now(),
        }
    }

    fn expire(&mut self, history: ChannelHistory, meta_ttl: Duration, now: Instant) {
        if now.duration_since(self.touched) > meta_ttl {
            *self = Self::new();
        }
        while self
            .entries
            .front()
            .is_some_and(|(_, _, at)| now.duration_since(*at) > history.ttl)
        {
            self.entries.pop_front();
        }
    }
}

#[derive(Default)]
struct Dedupe {
    offsets: HashMap<(Arc<str>, String), u64>,
    order: VecDeque<((Arc<str>, String), Instant)>,
}

impl Dedupe {
    fn expire(&mut self, now: Instant) {
        while let Some((key, at)) = self.order.front() {
            if now.duration_since(*at) <= DEDUPE_TTL && self.order.len() <= MAX_DEDUPE_KEYS {
                break;
            }
            self.offsets.remove(key);
            self.order.pop_front();
        }
    }
}

impl MemoryBus {
    pub fn new(hub: Arc<Hub>, history: Arc<HistoryPolicy>) -> Self {
        Self {
            inner: Arc::new(Inner {
                hub,
                history,
                streams: DashMap::new(),
                dedupe: Mutex::new(Dedupe::default()),
            }),
        }
    }

    pub fn history(&self) -> &HistoryPolicy {
        &self.inner.history
    }

    pub fn publish(&self, req: PublishRequest<'_>) -> PublishOutcome {
        let inner = &self.inner;
        let now = Instant::now();
        let history = inner.history.for_channel(req.channel);
        let mut stream = inner
            .streams
            .entry(Arc::from(req.channel))
            .or_insert_with(Stream::new);
        let channel = stream.key().clone();
        if let Some(key) = req.idempotency_key {
            let mut dedupe = inner.dedupe.lock().unwrap_or_else(|p| p.into_inner());
            dedupe.expire(now);
            let k = (channel.clone(), key.to_owned());
            if let Some(offset) = dedupe.offsets.get(&k) {
                return PublishOutcome::Duplicate { offset: *offset };
            }
            dedupe.offsets.insert(k.clone(), stream.top + 1);
            dedupe.order.push_back((k, now));
        }
        stream.expire(history, inner.history.meta_ttl, now);
        stream.top += 1;
        stream.touched = now;
        let offset = stream.top;
        if history.enabled() {
            stream.entries.push_back((offset, req.data.clone(), now));
            while stream.entries.len() > history.size as usize {
                stream.entries.pop_front();
            }
        }
        let publication = Publication {
            ts: req.received_at.unwrap_or_else(super::now_micros),
            channel,
            offset,
            epoch: stream.epoch.clone(),
            data: req.data,
        };
        // Delivered while the stream is held, so local order is offset order.
        inner.hub.deliver(&publication);
        PublishOutcome::Published {
            offset,
            epoch: stream.epoch.to_string(),
        }
    }

    pub fn recover(&self, channel: &str, since: Option<&Position>) -> Recovery {
        let now = Instant::now();
        let policy = &self.inner.history;
        let history = policy.for_channel(channel);
        let cap = policy.recovery_max;
        let mut stream = self
            .inner
            .streams
            .entry(Arc::from(channel))
            .or_insert_with(Stream::new);
        stream.expire(history, policy.meta_ttl, now);
        let position = Position {
            offset: stream.top,
            epoch: stream.epoch.to_string(),
        };
        // The same rule as the Redis script: entries only in the current epoch, and none
        // for a reader that missed more than the cap.
        let entries = since
            .filter(|since| {
                *since.epoch == *stream.epoch
                    && stream.top.saturating_sub(since.offset) <= u64::from(cap)
            })
            .map(|since| {
                stream
                    .entries
                    .iter()
                    .filter(|(offset, _, _)| *offset > since.offset)
                    .map(|(offset, data, _)| (*offset, data.clone()))
                    .collect()
            });
        let read = HistoryRead { position, entries };
        assemble_recovery(read, since, cap, history.enabled())
    }

    /// Forgets streams idle for longer than the meta TTL, so the map cannot grow forever.
    pub async fn maintain(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {
                    let now = Instant::now();
                    let meta_ttl = self.inner.history.meta_ttl;
                    self.inner.streams.retain(|_, s| now.duration_since(s.touched) <= meta_ttl);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Source;
    use crate::mailbox::Mailbox;

    fn bus(size: u32) -> (MemoryBus, Arc<Hub>) {
        let hub = Arc::new(Hub::new());
        let history =
            HistoryPolicy::uniform(size, Duration::from_secs(60), Duration::from_secs(600));
        (MemoryBus::new(hub.clone(), Arc::new(history)), hub)
    }

    fn publish(
        bus: &MemoryBus,
        channel: &str,
        data: &'static str,
        key: Option<&str>,
    ) -> PublishOutcome {
        bus.publish(PublishRequest {
            channel,
            data: Bytes::from_static(data.as_bytes()),
            idempotency_key: key,
            fence: None,
            source: Source::Client,
            received_at: None,
        })
    }

    #[test]
    fn offsets_start_at_one_per_channel_and_history_is_capped() {
        let (bus, _) = bus(2);
        for i in 1..=3 {
            assert!(
                matches!(publish(&bus, "a", "1", None), PublishOutcome::Published { offset, .. } if offset == i)
            );
        }
        assert!(matches!(
            publish(&bus, "b", "1", None),
            PublishOutcome::Published { offset: 1, .. }
        ));
        let top = bus.recover("a", None).position;
        assert_eq!(top.offset, 3);
        let r = bus.recover(
            "a",
            Some(&Position {
                offset: 1,
                epoch: top.epoch.clone(),
            }),
        );
        assert_eq!(
            r.publications.iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(r.recovered);
        let r = bus.recover(
            "a",
            Some(&Position {
                offset: 0,
                epoch: top.epoch,
            }),
        );
        assert!(!r.recovered, "offset 1 was trimmed");
    }

    #[test]
    fn a_repeated_idempotency_key_is_published_once() {
        let (bus, _) = bus(10);
        assert!(matches!(
            publish(&bus, "a", "1", Some("k")),
            PublishOutcome::Published { offset: 1, .. }
        ));
        assert_eq!(
            publish(&bus, "a", "1", Some("k")),
            PublishOutcome::Duplicate { offset: 1 }
        );
        assert_eq!(bus.recover("a", None).position.offset, 1);
    }

    #[test]
    fn publications_reach_local_subscribers_in_order() {
        let (bus, hub) = bus(10);
        let rx = Mailbox::new(8);
        hub.add("a", 1, rx.clone());
        publish(&bus, "a", "\"x\"", None);
        publish(&bus, "a", "\"y\"", None);
        assert_eq!(rx.pop().unwrap().offset, 1);
        assert_eq!(rx.pop().unwrap().offset, 2);
    }

    #[test]
    fn a_publication_carries_when_it_reached_pgfanout_or_else_now() {
        let (bus, hub) = bus(10);
        let rx = Mailbox::new(8);
        hub.add("a", 1, rx.clone());
        let before = super::super::now_micros();
        let received = before - 2_000_000;
        bus.publish(PublishRequest {
            channel: "a",
            data: Bytes::from_static(b"1"),
            idempotency_key: None,
            fence: None,
            source: Source::Notify,
            received_at: Some(received),
        });
        publish(&bus, "a", "2", None);
        assert_eq!(rx.pop().unwrap().ts, received);
        assert!(rx.pop().unwrap().ts >= before);
    }
}
