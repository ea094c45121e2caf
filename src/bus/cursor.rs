//! The node's cursor in each channel's stream: the last offset (and its epoch) this node
//! handed to its local sessions, for every channel with local subscribers.
//!
//! Redis pub/sub is at most once: what is published while the subscriber connection is
//! down, or lost on the way, never arrives. Every publication carries its offset, so the
//! node notices a hole — a live offset that skips, or a subscriber connection that was
//! re-established — and fills it from the channel's history before it delivers anything
//! newer. Live publications that arrive meanwhile wait, and everything reaches the hub in
//! offset order, once. Where history cannot fill the hole (trimmed, no history, over the
//! recovery cap, a new epoch), the hub sends a position check that makes every session that
//! missed something resubscribe (`unsubscribe` push 2500), so SDKs recover or reload:
//! never silence.
//!
//! This is the state machine only, without I/O: the Redis bus feeds it pushes and does the
//! history reads it asks for (`redis::run_repairs`), so unit tests drive it directly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::sync::mpsc;

use super::{HistoryRead, Position, Publication};
use crate::hub::Hub;
use crate::metrics as m;

/// Live publications one channel keeps waiting during a repair at most. Past it they are
/// dropped (they are in history) and the channel is read again once the repair completes.
const MAX_WAITING: usize = 10_000;

/// Every channel's cursor, and the queue of channels whose history must be read.
pub struct Cursors {
    hub: Arc<Hub>,
    channels: DashMap<Arc<str>, Cursor>,
    /// Channels to read history for; a channel is queued at most once at a time (while its
    /// `waiting` is set), so the queue never holds more than the node's channels.
    repairs: mpsc::Sender<Arc<str>>,
    /// The subscriber connection dropped and has not resubscribed yet (for the
    /// resubscriptions metric).
    lost: AtomicBool,
}

#[derive(Debug)]
struct Cursor {
    epoch: Arc<str>,
    /// The last offset delivered to the hub in `epoch`.
    offset: u64,
    /// Some while a history read is queued or under way: the live publications that came
    /// meanwhile, in arrival order, delivered once the read is.
    waiting: Option<Vec<Publication>>,
    /// Read once more after the current read: the subscriber reconnected while it ran, or
    /// waiting publications were dropped.
    again: bool,
}

impl Cursor {
    fn at(epoch: &str, offset: u64) -> Self {
        Self {
            epoch: Arc::from(epoch),
            offset,
            waiting: None,
            again: false,
        }
    }
}

/// What a live publication does to its channel's cursor.
enum Step {
    Delivered,
    /// Already delivered (same epoch, offset not ahead).
    Duplicate,
    /// It skips offsets: history must be read first.
    Gap,
}

impl Cursors {
    pub fn new(hub: Arc<Hub>, repairs: mpsc::Sender<Arc<str>>) -> Self {
        Self {
            hub,
            channels: DashMap::new(),
            repairs,
            lost: AtomicBool::new(false),
        }
    }

    /// A publication from the subscriber connection: delivered now if it is the next
    /// offset, dropped if it was delivered already, else held until history fills the hole.
    ///
    /// A channel keeps its cursor (and follows its stream) for as long as the subscriber
    /// connection is subscribed to it, even while it has no local session for a moment, so
    /// a session that joins meanwhile gets a contiguous stream.
    pub fn publication(&self, publication: Publication) {
        let mut cursor = match self.channels.entry(publication.channel.clone()) {
            Entry::Vacant(vacant) => {
                if !self.hub.has_subscribers(&publication.channel) {
                    // A message still in flight for a channel this node dropped.
                    return;
                }
                // The first publication since the channel became live here: the sessions
                // placed themselves when they subscribed, and drop what they had.
                vacant.insert(Cursor::at(&publication.epoch, publication.offset));
                self.hub.deliver(&publication);
                return;
            }
            Entry::Occupied(occupied) => occupied.into_ref(),
        };
        let channel = cursor.key().clone();
        let cursor = cursor.value_mut();
        if let Some(waiting) = &mut cursor.waiting {
            if waiting.len() >= MAX_WAITING {
                metrics::counter!(m::MESSAGES_DROPPED, "reason" => "repair_backlog")
                    .increment(waiting.len() as u64);
                waiting.clear();
                cursor.again = true;
            }
            waiting.push(publication);
            return;
        }
        if let Step::Gap = self.advance(cursor, &publication) {
            tracing::debug!(
                %channel,
                have = cursor.offset,
                got = publication.offset,
                "gap in the stream; reading history"
            );
            cursor.waiting = Some(vec![publication]);
            self.schedule(&channel, cursor);
        }
    }

    /// The subscriber connection (re)subscribed `channel`: after a reconnect, whatever was
    /// published while it was down is read from history before anything newer goes out.
    pub fn subscribed(&self, channel: &str) {
        if self.lost.swap(false, Ordering::Relaxed) {
            metrics::counter!(m::REDIS_RESUBSCRIPTIONS).increment(1);
            tracing::info!("redis subscriber connection re-established; catching up from history");
        }
        let Some(mut cursor) = self.channels.get_mut(channel) else {
            return;
        };
        let name = cursor.key().clone();
        let cursor = cursor.value_mut();
        if cursor.waiting.is_some() {
            // A read under way may have started before the reconnect.
            cursor.again = true;
            return;
        }
        cursor.waiting = Some(Vec::new());
        self.schedule(&name, cursor);
    }

    /// The subscriber connection dropped; it reconnects and resubscribes by itself.
    pub fn disconnected(&self) {
        self.lost.store(true, Ordering::Relaxed);
    }

    /// A session of this node read the channel's position after its subscription to the
    /// channel was made: a channel without a cursor starts there, so a publication lost
    /// before the first one arrives is noticed too.
    pub fn observe(&self, channel: &str, position: &Position) {
        if !self.hub.has_subscribers(channel) || self.channels.contains_key(channel) {
            return;
        }
        if let Entry::Vacant(vacant) = self.channels.entry(Arc::from(channel)) {
            vacant.insert(Cursor::at(&position.epoch, position.offset));
        }
    }

    /// The subscriber connection dropped its subscription to the channel. A cursor kept
    /// because a session joined meanwhile is caught up when the channel is subscribed again
    /// (`subscribed`).
    pub fn forget(&self, channel: &str) {
        self.channels
            .remove_if(channel, |_, _| !self.hub.has_subscribers(channel));
    }

    /// Where a read of the channel's history starts; None when it has no cursor any more.
    pub fn since(&self, channel: &str) -> Option<Position> {
        self.channels.get(channel).map(|c| Position {
            offset: c.offset,
            epoch: c.epoch.to_string(),
        })
    }

    /// A read of the channel's history after its cursor came back (`history`: whether the
    /// channel keeps any). Delivers what fills the hole, then what waited; where history
    /// falls short, tells the sessions that missed something.
    pub fn repaired(&self, channel: &str, read: HistoryRead, history: bool) {
        let Some(mut entry) = self.channels.get_mut(channel) else {
            return;
        };
        let name = entry.key().clone();
        let cursor = entry.value_mut();
        let waiting = cursor.waiting.take().unwrap_or_default();
        let top = read.position;
        if *top.epoch != *cursor.epoch {
            // The stream restarted (Redis lost its data, or the channel expired): sessions
            // of the old epoch must resubscribe; the new epoch is then read from its start.
            gap_unrepaired("epoch");
            cursor.epoch = Arc::from(top.epoch);
            cursor.offset = 0;
            self.hub.check(&name, &cursor.epoch, 0);
            if top.offset > 0 {
                cursor.waiting = Some(waiting);
                self.schedule(&name, cursor);
                return;
            }
        } else {
            let before = cursor.offset;
            let reason = match &read.entries {
                _ if !history => "no_history",
                None => "over_cap",
                Some(_) => "out_of_history",
            };
            for (offset, data) in read.entries.into_iter().flatten() {
                if offset <= cursor.offset {
                    continue;
                }
                if offset != cursor.offset + 1 {
                    break;
                }
                cursor.offset = offset;
                self.hub.deliver(&Publication {
                    channel: name.clone(),
                    offset,
                    epoch: cursor.epoch.clone(),
                    data,
                    ts: 0,
                });
            }
            let replayed = cursor.offset - before;
            if cursor.offset < top.offset {
                tracing::info!(
                    channel = %name,
                    from = cursor.offset,
                    to = top.offset,
                    reason,
                    "history cannot fill a gap; subscribers are told to resubscribe"
                );
                gap_unrepaired(reason);
                cursor.offset = top.offset;
                self.hub.check(&name, &cursor.epoch, top.offset);
            } else if replayed > 0 {
                metrics::counter!(m::GAPS_REPAIRED).increment(1);
            }
            metrics::counter!(m::MESSAGES_REPLAYED, "path" => "repair").increment(replayed);
        }
        let mut rest = waiting.into_iter();
        while let Some(publication) = rest.next() {
            if let Step::Gap = self.advance(cursor, &publication) {
                let mut still = vec![publication];
                still.extend(rest);
                cursor.waiting = Some(still);
                self.schedule(&name, cursor);
                return;
            }
        }
        if std::mem::take(&mut cursor.again) {
            cursor.waiting = Some(Vec::new());
            self.schedule(&name, cursor);
        }
    }

    /// Delivers a live publication that is next in the stream.
    fn advance(&self, cursor: &mut Cursor, publication: &Publication) -> Step {
        if publication.epoch != cursor.epoch {
            // A new stream: its sessions of the old epoch resubscribe when it reaches them;
            // whatever came before it in the new epoch is read from history.
            gap_unrepaired("epoch");
            cursor.epoch = publication.epoch.clone();
            cursor.offset = 0;
        }
        if publication.offset <= cursor.offset {
            return Step::Duplicate;
        }
        if publication.offset != cursor.offset + 1 {
            return Step::Gap;
        }
        cursor.offset = publication.offset;
        self.hub.deliver(publication);
        Step::Delivered
    }

    /// Queues a history read for a channel whose `waiting` was just set. When the queue is
    /// full (it cannot be while it holds at most one entry per channel, unless the node has
    /// more channels than it holds), the waiting publications go out as they are and the
    /// sessions notice the hole themselves (and resubscribe).
    fn schedule(&self, channel: &Arc<str>, cursor: &mut Cursor) {
        if self.repairs.try_send(channel.clone()).is_ok() {
            return;
        }
        gap_unrepaired("backlog");
        for publication in cursor.waiting.take().unwrap_or_default() {
            cursor.epoch = publication.epoch.clone();
            cursor.offset = cursor.offset.max(publication.offset);
            self.hub.deliver(&publication);
        }
    }
}

fn gap_unrepaired(reason: &'static str) {
    metrics::counter!(m::GAPS_UNREPAIRED, "reason" => reason).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::Mailbox;
    use bytes::Bytes;

    struct Fixture {
        cursors: Cursors,
        repairs: mpsc::Receiver<Arc<str>>,
        session: Arc<Mailbox>,
    }

    fn fixture() -> Fixture {
        let hub = Arc::new(Hub::new());
        let session = Mailbox::new(1000);
        hub.add("c", 1, session.clone());
        let (repairs_tx, repairs) = mpsc::channel(16);
        Fixture {
            cursors: Cursors::new(hub, repairs_tx),
            repairs,
            session,
        }
    }

    fn publication(epoch: &str, offset: u64) -> Publication {
        Publication {
            channel: Arc::from("c"),
            offset,
            epoch: Arc::from(epoch),
            data: Bytes::from(offset.to_string()),
            ts: 1,
        }
    }

    fn read(epoch: &str, top: u64, entries: Option<std::ops::RangeInclusive<u64>>) -> HistoryRead {
        HistoryRead {
            position: Position {
                offset: top,
                epoch: epoch.into(),
            },
            entries: entries.map(|r| r.map(|o| (o, Bytes::from(o.to_string()))).collect()),
        }
    }

    impl Fixture {
        /// (offset, is a position check) of everything queued to the session so far.
        fn delivered(&mut self) -> Vec<(u64, bool)> {
            let mut out = Vec::new();
            while let Some(o) = self.session.pop() {
                out.push((o.offset, o.position_only));
            }
            out
        }

        fn queued_repairs(&mut self) -> usize {
            let mut n = 0;
            while self.repairs.try_recv().is_ok() {
                n += 1;
            }
            n
        }
    }

    #[test]
    fn a_skipped_offset_waits_for_history_then_everything_goes_out_in_order() {
        let mut f = fixture();
        f.cursors.publication(publication("e", 1));
        f.cursors.publication(publication("e", 1));
        f.cursors.publication(publication("e", 4));
        f.cursors.publication(publication("e", 5));
        assert_eq!(f.delivered(), vec![(1, false)], "duplicate dropped, 4 held");
        assert_eq!(f.queued_repairs(), 1, "one read for the hole");
        assert_eq!(f.cursors.since("c").map(|p| p.offset), Some(1));
        f.cursors.repaired("c", read("e", 5, Some(2..=5)), true);
        assert_eq!(
            f.delivered(),
            vec![(2, false), (3, false), (4, false), (5, false)]
        );
        f.cursors.publication(publication("e", 6));
        assert_eq!(f.delivered(), vec![(6, false)]);
        assert_eq!(f.queued_repairs(), 0);
    }

    #[test]
    fn a_reconnect_reads_history_before_newer_publications() {
        let mut f = fixture();
        f.cursors.observe(
            "c",
            &Position {
                offset: 3,
                epoch: "e".into(),
            },
        );
        f.cursors.disconnected();
        f.cursors.subscribed("c");
        f.cursors.publication(publication("e", 6));
        assert!(f.delivered().is_empty(), "6 waits for the catch-up");
        assert_eq!(f.queued_repairs(), 1);
        f.cursors.repaired("c", read("e", 5, Some(4..=5)), true);
        assert_eq!(f.delivered(), vec![(4, false), (5, false), (6, false)]);
    }

    #[test]
    fn a_hole_history_cannot_fill_tells_the_sessions() {
        let mut f = fixture();
        f.cursors.publication(publication("e", 1));
        f.cursors.publication(publication("e", 9));
        f.cursors.repaired("c", read("e", 9, Some(5..=9)), true);
        assert_eq!(
            f.delivered(),
            vec![(1, false), (9, true)],
            "a position check at the top instead of a partial replay"
        );
        f.cursors.publication(publication("e", 10));
        assert_eq!(f.delivered(), vec![(10, false)]);
    }

    #[test]
    fn a_new_epoch_found_by_a_catch_up_is_checked_then_read_from_its_start() {
        let mut f = fixture();
        f.cursors.publication(publication("old", 5));
        f.cursors.subscribed("c");
        f.cursors.repaired("c", read("new", 2, None), true);
        assert_eq!(f.delivered(), vec![(5, false), (0, true)]);
        assert_eq!(f.queued_repairs(), 2, "the catch-up, then the new epoch");
        assert_eq!(f.cursors.since("c").map(|p| p.epoch), Some("new".into()));
        f.cursors.repaired("c", read("new", 2, Some(1..=2)), true);
        assert_eq!(f.delivered(), vec![(1, false), (2, false)]);
    }

    #[test]
    fn a_channel_without_sessions_for_a_moment_keeps_following_its_stream() {
        let mut f = fixture();
        f.cursors.publication(publication("e", 1));
        f.cursors.hub.remove("c", 1);
        f.cursors.publication(publication("e", 2));
        f.cursors.forget("c");
        assert_eq!(f.cursors.since("c"), None, "forgotten once unsubscribed");
        f.cursors.publication(publication("e", 3));
        assert_eq!(f.cursors.since("c"), None, "a late message starts nothing");
        assert_eq!(f.delivered(), vec![(1, false)]);
    }

    #[test]
    fn a_reconnect_during_a_read_reads_again() {
        let mut f = fixture();
        f.cursors.publication(publication("e", 1));
        f.cursors.publication(publication("e", 3));
        f.cursors.subscribed("c");
        assert_eq!(f.queued_repairs(), 1);
        f.cursors.repaired("c", read("e", 3, Some(2..=3)), true);
        assert_eq!(f.queued_repairs(), 1, "read again after the reconnect");
        f.cursors.repaired("c", read("e", 4, Some(4..=4)), true);
        assert_eq!(
            f.delivered(),
            vec![(1, false), (2, false), (3, false), (4, false)]
        );
    }
}
