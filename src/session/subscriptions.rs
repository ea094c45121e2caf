//! A session's subscriptions: its membership in the hub and its place in each channel's
//! stream, used to drop duplicates and to notice a lost place.

use std::collections::HashMap;
use std::sync::Arc;

use crate::bus::Bus;
use crate::hub::{Hub, Outbound, SessionHandle, SessionId};
use crate::protocol::codes::unsubscribe;
use crate::protocol::reply;

/// The last offset delivered on a channel, and the epoch it belongs to.
#[derive(Debug)]
struct Place {
    offset: u64,
    epoch: Arc<str>,
}

/// What to write for a publication taken off the queue.
pub(super) enum Accepted {
    /// The publication's own frame.
    Publication,
    /// The session lost its place in the channel (a gap, or a new epoch): this
    /// unsubscribe push makes the SDK resubscribe and recover from history.
    Resubscribe(Vec<u8>),
}

pub(super) struct Subscriptions {
    session: SessionId,
    handle: SessionHandle,
    hub: Arc<Hub>,
    bus: Bus,
    channels: HashMap<Arc<str>, Place>,
}

impl Subscriptions {
    pub(super) fn new(session: SessionId, handle: SessionHandle, hub: Arc<Hub>, bus: Bus) -> Self {
        Self {
            session,
            handle,
            hub,
            bus,
            channels: HashMap::new(),
        }
    }

    pub(super) fn contains(&self, channel: &str) -> bool {
        self.channels.contains_key(channel)
    }

    pub(super) fn len(&self) -> usize {
        self.channels.len()
    }

    /// Joins the channel in the hub; its place is set once the subscribe completes.
    pub(super) fn join(&mut self, channel: &str) {
        let name = self.hub.add(channel, self.session, self.handle.clone());
        self.channels.insert(
            name,
            Place {
                offset: 0,
                epoch: Arc::from(""),
            },
        );
    }

    pub(super) fn set_place(&mut self, channel: &str, offset: u64, epoch: &str) {
        if let Some(place) = self.channels.get_mut(channel) {
            place.offset = offset;
            place.epoch = Arc::from(epoch);
        }
    }

    /// Leaves the channel; returns whether the session was subscribed.
    pub(super) fn leave(&mut self, channel: &str) -> bool {
        if self.channels.remove(channel).is_none() {
            return false;
        }
        if self.hub.remove(channel, self.session) {
            self.bus.unwatch(channel);
        }
        true
    }

    /// Decides what a queued publication becomes for this session.
    pub(super) fn accept(&mut self, out: &Outbound) -> Option<Accepted> {
        let place = self.channels.get_mut(&out.channel)?;
        if out.offset <= place.offset && place.epoch == out.epoch {
            return None;
        }
        // A position check past our place (or in another epoch) means the node could not
        // deliver what we miss; like a gap, only a recovering resubscribe can tell.
        if out.position_only || place.epoch != out.epoch || out.offset != place.offset + 1 {
            tracing::debug!(
                channel = %out.channel,
                have = place.offset,
                got = out.offset,
                "lost place in stream; asking the client to resubscribe"
            );
            let channel = out.channel.clone();
            self.leave(&channel);
            return Some(Accepted::Resubscribe(reply::encode_unsubscribe_push(
                &channel,
                unsubscribe::INSUFFICIENT_STATE,
                "insufficient state",
            )));
        }
        place.offset = out.offset;
        Some(Accepted::Publication)
    }
}

impl Drop for Subscriptions {
    fn drop(&mut self) {
        for channel in std::mem::take(&mut self.channels).into_keys() {
            if self.hub.remove(&channel, self.session) {
                self.bus.unwatch(&channel);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::memory::MemoryBus;
    use crate::bus::HistoryPolicy;
    use bytes::Bytes;
    use std::time::Duration;

    fn subscriptions() -> Subscriptions {
        let hub = Arc::new(Hub::new());
        let policy = HistoryPolicy::uniform(10, Duration::from_secs(60), Duration::from_secs(60));
        let bus = Bus::Memory(MemoryBus::new(hub.clone(), Arc::new(policy)));
        let mut subs = Subscriptions::new(1, crate::mailbox::Mailbox::new(4), hub, bus);
        subs.join("c");
        subs.set_place("c", 5, "e");
        subs
    }

    fn out(offset: u64, epoch: &str, position_only: bool) -> Outbound {
        Outbound {
            channel: Arc::from("c"),
            offset,
            epoch: Arc::from(epoch),
            frame: Bytes::new(),
            ts: 0,
            position_only,
        }
    }

    #[test]
    fn a_position_check_at_or_behind_the_place_changes_nothing() {
        let mut subs = subscriptions();
        assert!(subs.accept(&out(5, "e", true)).is_none());
        assert!(subs.accept(&out(3, "e", true)).is_none());
        assert!(matches!(
            subs.accept(&out(6, "e", false)),
            Some(Accepted::Publication)
        ));
        assert!(subs.contains("c"));
    }

    #[test]
    fn a_position_check_ahead_or_in_another_epoch_makes_the_client_resubscribe() {
        for check in [out(6, "e", true), out(0, "other", true)] {
            let mut subs = subscriptions();
            assert!(
                matches!(subs.accept(&check), Some(Accepted::Resubscribe(_))),
                "{check:?}"
            );
            assert!(!subs.contains("c"), "left the channel: {check:?}");
            assert!(subs.accept(&out(7, "e", false)).is_none(), "nothing after");
        }
    }
}
