//! The hub: which local sessions listen to which channel, and the fan-out of a
//! publication to them.
//!
//! A publication is encoded into its frame once and the same `Bytes` go to every
//! subscriber's bounded queue. A full queue never blocks the fan-out: that session is
//! kicked as a slow consumer (it recovers on reconnect) and everyone else goes on.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;

use crate::bus::Publication;
use crate::mailbox::{Mailbox, PushError};
use crate::metrics as m;
use crate::protocol::{reply, DisconnectCode};

pub type SessionId = u64;

/// What the hub puts on a session's queue.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub channel: Arc<str>,
    pub offset: u64,
    pub epoch: Arc<str>,
    /// The complete push, shared by every subscriber.
    pub frame: Bytes,
    /// When the publication reached pgfanout (µs since the Unix epoch; 0 = unknown): a
    /// notification's receipt from Postgres, or its entry into the bus for other sources.
    pub ts: u64,
    /// Not a publication but a position check (`frame` is empty): the node could not deliver
    /// everything up to `offset` of `epoch`, so a session behind it, or in another epoch,
    /// has lost its place and must resubscribe.
    pub position_only: bool,
}

/// The hub's view of a session: where its publications go and how it is kicked.
pub type SessionHandle = Arc<Mailbox>;

/// channel → local sessions. Sharded (dashmap), so the hot path takes no global lock.
#[derive(Debug, Default)]
pub struct Hub {
    channels: DashMap<Arc<str>, HashMap<SessionId, SessionHandle>>,
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a session to a channel; returns the shared channel name.
    pub fn add(&self, channel: &str, id: SessionId, handle: SessionHandle) -> Arc<str> {
        let mut entry = self.channels.entry(Arc::from(channel)).or_insert_with(|| {
            metrics::gauge!(m::CHANNELS).increment(1.0);
            HashMap::new()
        });
        let name = entry.key().clone();
        if entry.value_mut().insert(id, handle).is_none() {
            metrics::gauge!(m::SUBSCRIPTIONS).increment(1.0);
        }
        name
    }

    /// Removes a session from a channel; returns true when the channel has no local
    /// subscriber left (the bus may then drop its subscription).
    pub fn remove(&self, channel: &str, id: SessionId) -> bool {
        let Some(mut entry) = self.channels.get_mut(channel) else {
            return false;
        };
        if entry.remove(&id).is_some() {
            metrics::gauge!(m::SUBSCRIPTIONS).decrement(1.0);
        }
        let empty = entry.is_empty();
        drop(entry);
        if empty
            && self
                .channels
                .remove_if(channel, |_, sessions| sessions.is_empty())
                .is_some()
        {
            metrics::gauge!(m::CHANNELS).decrement(1.0);
            return true;
        }
        false
    }

    pub fn has_subscribers(&self, channel: &str) -> bool {
        self.channels.get(channel).is_some_and(|s| !s.is_empty())
    }

    /// Channels with at least one local subscriber.
    pub fn channels(&self) -> Vec<Arc<str>> {
        self.channels.iter().map(|e| e.key().clone()).collect()
    }

    /// Fans a publication out to the channel's local sessions. Never blocks.
    pub fn deliver(&self, publication: &Publication) {
        let Some(sessions) = self.channels.get(&*publication.channel) else {
            return;
        };
        let out = Outbound {
            channel: sessions.key().clone(),
            offset: publication.offset,
            epoch: publication.epoch.clone(),
            ts: publication.ts,
            frame: reply::encode_publication(
                &publication.channel,
                publication.offset,
                &publication.data,
            ),
            position_only: false,
        };
        let delivered = fan_out(sessions.values(), &Arc::new(out));
        drop(sessions);
        metrics::counter!(m::MESSAGES_DELIVERED).increment(delivered);
    }

    /// Tells the channel's local sessions that the stream is at `offset` of `epoch` although
    /// this node could not deliver everything up to there (history did not reach back, or a
    /// new epoch): every session behind it resubscribes. Never blocks.
    pub fn check(&self, channel: &str, epoch: &Arc<str>, offset: u64) {
        let Some(sessions) = self.channels.get(channel) else {
            return;
        };
        let out = Outbound {
            channel: sessions.key().clone(),
            offset,
            epoch: epoch.clone(),
            ts: 0,
            frame: Bytes::new(),
            position_only: true,
        };
        fan_out(sessions.values(), &Arc::new(out));
    }
}

/// Queues `out` to every session without waiting; a full queue kicks that session as slow.
/// Returns how many were queued.
fn fan_out<'a>(sessions: impl Iterator<Item = &'a SessionHandle>, out: &Arc<Outbound>) -> u64 {
    let (mut delivered, mut dropped) = (0u64, 0u64);
    for handle in sessions {
        match handle.push(out.clone()) {
            Ok(()) => delivered += 1,
            Err(PushError::Full) => {
                dropped += 1;
                handle.kick(DisconnectCode::Slow);
            }
            // The session is closing; it removes itself from the hub.
            Err(PushError::Closed) => {}
        }
    }
    if dropped > 0 {
        metrics::counter!(m::MESSAGES_DROPPED, "reason" => "slow_consumer").increment(dropped);
    }
    delivered
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publication(channel: &str, offset: u64) -> Publication {
        Publication {
            ts: 0,
            channel: Arc::from(channel),
            offset,
            epoch: Arc::from("e"),
            data: Bytes::from_static(b"1"),
        }
    }

    fn session(cap: usize) -> (SessionHandle, SessionHandle) {
        let mailbox = Mailbox::new(cap);
        (mailbox.clone(), mailbox)
    }

    #[test]
    fn delivers_the_same_frame_bytes_to_every_subscriber() {
        let hub = Hub::new();
        let (a, ra) = session(4);
        let (b, rb) = session(4);
        hub.add("c", 1, a);
        hub.add("c", 2, b);
        hub.deliver(&publication("c", 1));
        let (fa, fb) = (ra.pop().unwrap(), rb.pop().unwrap());
        assert_eq!(
            fa.frame.as_ptr(),
            fb.frame.as_ptr(),
            "frame must be shared, not copied"
        );
        assert_eq!(fa.offset, 1);
    }

    #[test]
    fn a_full_queue_kicks_only_that_session_as_slow() {
        let hub = Hub::new();
        let (slow, _keep) = session(1);
        let (fast, rf) = session(8);
        hub.add("c", 1, slow.clone());
        hub.add("c", 2, fast);
        hub.deliver(&publication("c", 1));
        hub.deliver(&publication("c", 2));
        assert_eq!(slow.kicked(), Some(DisconnectCode::Slow));
        assert_eq!(rf.pop().unwrap().offset, 1);
        assert_eq!(rf.pop().unwrap().offset, 2);
    }

    #[test]
    fn removing_the_last_session_reports_the_channel_dead() {
        let hub = Hub::new();
        let (a, _ra) = session(1);
        let (b, _rb) = session(1);
        hub.add("c", 1, a);
        hub.add("c", 2, b);
        assert!(!hub.remove("c", 1));
        assert!(hub.has_subscribers("c"));
        assert!(hub.remove("c", 2));
        assert!(!hub.has_subscribers("c"));
        assert!(!hub.remove("c", 2));
        assert!(hub.channels().is_empty());
    }

    #[test]
    fn a_position_check_reaches_every_session_without_a_frame() {
        let hub = Hub::new();
        let (a, ra) = session(4);
        let (b, rb) = session(4);
        hub.add("c", 1, a);
        hub.add("c", 2, b);
        hub.check("c", &Arc::from("e"), 7);
        for rx in [&ra, &rb] {
            let out = rx.pop().unwrap();
            assert!(out.position_only && out.frame.is_empty());
            assert_eq!((out.offset, &*out.epoch), (7, "e"));
        }
        hub.check("nobody", &Arc::from("e"), 1);
    }

    #[test]
    fn publications_for_channels_without_subscribers_are_ignored() {
        let hub = Hub::new();
        hub.deliver(&publication("nobody", 1));
        assert!(hub.channels().is_empty());
    }
}
