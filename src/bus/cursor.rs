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
//! Redis can also lose publications that were already delivered: replication is
//! asynchronous, so a master that dies before its replica got the last publications (or a
//! Redis restarted from older data) leaves a stream whose offsets go back, and the next
//! publications reuse offsets this node already delivered with other data. Each cursor keeps
//! a fingerprint of the last publication it delivered, and every history read starts at the
//! cursor's own offset: a stream whose top is below the cursor, or whose entry there has
//! other data, lost writes ([`Repaired::Lost`]). The bus then gives the channel a new epoch
//! in Redis (once, whichever node finds it first), so the sessions of every node and every
//! client recovering from the old epoch are told (`recovered: false`) instead of silently
//! skipping the reused offsets.
//!
//! This is the state machine only, without I/O: the Redis bus feeds it pushes and does the
//! history reads it asks for (`redis::run_repairs`), so unit tests drive it directly.

use std::hash::Hasher as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
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
    /// A fingerprint of the data delivered at `offset`, when this node delivered it (not
    /// when the cursor was placed by a position read): checked against history, so a
    /// stream that lost it and reused the offset for other data is noticed.
    fingerprint: Option<u64>,
    /// The epoch this cursor left for a newer one: its publications still in flight (sent
    /// before the epoch changed) are stale and dropped.
    retired: Option<Arc<str>>,
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
            fingerprint: None,
            retired: None,
            waiting: None,
            again: false,
        }
    }

    /// Moves to `offset`, delivered with `data`.
    fn delivered(&mut self, offset: u64, data: &Bytes) {
        self.offset = offset;
        self.fingerprint = Some(fingerprint(data));
    }

    /// Moves to a newer epoch, before its first publication.
    fn restart(&mut self, epoch: Arc<str>) {
        self.retired = Some(std::mem::replace(&mut self.epoch, epoch));
        self.offset = 0;
        self.fingerprint = None;
    }

    /// Whether a read of the stream (in this cursor's epoch, from the cursor's own offset)
    /// shows that the stream no longer holds what this node delivered: its top went back
    /// below the cursor, or the entry at the cursor has other data. An entry that left
    /// history (trimmed, expired) cannot be checked: that is no evidence either way.
    fn lost_in(&self, top: u64, entries: Option<&[(u64, Bytes)]>) -> bool {
        if top < self.offset {
            return true;
        }
        let at_cursor = entries
            .and_then(|entries| entries.first())
            .filter(|(offset, _)| *offset == self.offset);
        match (self.fingerprint, at_cursor) {
            (Some(mine), Some((_, data))) => fingerprint(data) != mine,
            _ => false,
        }
    }
}

/// A cheap fingerprint of a publication's data (not cryptographic: it tells apart two
/// publications that reuse an offset, which is all it is for).
fn fingerprint(data: &[u8]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    hasher.write(data);
    hasher.finish()
}

/// What a history read did to a channel's cursor.
#[derive(Debug, PartialEq, Eq)]
pub enum Repaired {
    /// Done: delivered what it could, told the sessions what it could not.
    Done,
    /// The stream lost publications this node delivered in `epoch` (a Redis failover or
    /// restart lost acknowledged writes; the next ones reuse their offsets). Nothing was
    /// delivered and the live publications keep waiting: the caller gives the channel a
    /// new epoch in Redis (only if it is still `epoch`) and reads again.
    Lost { epoch: Arc<str> },
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
                let mut cursor = Cursor::at(&publication.epoch, 0);
                cursor.delivered(publication.offset, &publication.data);
                vacant.insert(cursor);
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

    /// The channel's cursor, where a read of its history starts; None when it has no
    /// cursor any more. The read should include the entry at the cursor's own offset (the
    /// one this node delivered last), so [`Self::repaired`] can check it is still there.
    pub fn since(&self, channel: &str) -> Option<Position> {
        self.channels.get(channel).map(|c| Position {
            offset: c.offset,
            epoch: c.epoch.to_string(),
        })
    }

    /// A read of the channel's history from its cursor's own offset (see [`Self::since`];
    /// `history`: whether the channel keeps any). Delivers what fills the hole, then what
    /// waited; where history falls short, tells the sessions that missed something; where
    /// the stream lost what this node delivered, delivers nothing and says so.
    pub fn repaired(&self, channel: &str, read: HistoryRead, history: bool) -> Repaired {
        let Some(mut entry) = self.channels.get_mut(channel) else {
            return Repaired::Done;
        };
        let name = entry.key().clone();
        let cursor = entry.value_mut();
        let waiting = cursor.waiting.take().unwrap_or_default();
        let top = read.position;
        if *top.epoch != *cursor.epoch {
            // The stream restarted (Redis lost its data, the channel expired, or a node
            // reset it after lost writes): sessions of the old epoch must resubscribe; the
            // new epoch is then read from its start.
            gap_unrepaired("epoch");
            cursor.restart(Arc::from(top.epoch));
            self.hub.check(&name, &cursor.epoch, 0);
            if top.offset > 0 {
                cursor.waiting = Some(waiting);
                self.schedule(&name, cursor);
                return Repaired::Done;
            }
        } else if cursor.lost_in(top.offset, read.entries.as_deref()) {
            tracing::warn!(
                channel = %name,
                delivered = cursor.offset,
                top = top.offset,
                "redis lost publications this node delivered (a failover to a replica that \
                 had not received them, or a restart from older data); the channel gets a \
                 new epoch"
            );
            metrics::counter!(m::LOST_WRITES_DETECTED).increment(1);
            cursor.waiting = Some(waiting);
            return Repaired::Lost {
                epoch: cursor.epoch.clone(),
            };
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
                cursor.delivered(offset, &data);
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
                cursor.fingerprint = None;
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
                return Repaired::Done;
            }
        }
        if std::mem::take(&mut cursor.again) {
            cursor.waiting = Some(Vec::new());
            self.schedule(&name, cursor);
        }
        Repaired::Done
    }

    /// Delivers a live publication that is next in the stream.
    fn advance(&self, cursor: &mut Cursor, publication: &Publication) -> Step {
        if publication.epoch != cursor.epoch {
            if cursor.retired.as_ref() == Some(&publication.epoch) {
                // Sent before the stream moved to the cursor's epoch.
                return Step::Duplicate;
            }
            // A new stream: its sessions of the old epoch resubscribe when it reaches them;
            // whatever came before it in the new epoch is read from history.
            gap_unrepaired("epoch");
            cursor.restart(publication.epoch.clone());
        }
        if publication.offset <= cursor.offset {
            return Step::Duplicate;
        }
        if publication.offset != cursor.offset + 1 {
            return Step::Gap;
        }
        cursor.delivered(publication.offset, &publication.data);
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
            if publication.offset >= cursor.offset {
                cursor.delivered(publication.offset, &publication.data);
            }
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

    /// A read of epoch `epoch` with top `top` and the given entries.
    fn read_of(epoch: &str, top: u64, entries: &[(u64, &'static str)]) -> HistoryRead {
        HistoryRead {
            position: Position {
                offset: top,
                epoch: epoch.into(),
            },
            entries: Some(
                entries
                    .iter()
                    .map(|(o, d)| (*o, Bytes::from_static(d.as_bytes())))
                    .collect(),
            ),
        }
    }

    #[test]
    fn a_stream_that_went_back_below_the_cursor_lost_writes() {
        let mut f = fixture();
        for offset in 1..=6 {
            f.cursors.publication(publication("e", offset));
        }
        assert_eq!(f.delivered().len(), 6);
        // A failover: the promoted replica had offsets up to 3 only.
        f.cursors.disconnected();
        f.cursors.subscribed("c");
        assert_eq!(f.queued_repairs(), 1);
        f.cursors.publication(publication("e", 4));
        let lost = f.cursors.repaired("c", read_of("e", 3, &[]), true);
        assert_eq!(lost, Repaired::Lost { epoch: "e".into() });
        assert!(
            f.delivered().is_empty(),
            "nothing delivered from a lost stream"
        );
        // The bus reset the epoch; the read after it finds the new one.
        f.cursors.publication(publication("e", 5));
        let done = f.cursors.repaired("c", read("new", 1, None), true);
        assert_eq!(done, Repaired::Done);
        assert_eq!(
            f.delivered(),
            vec![(0, true)],
            "sessions of the old epoch are told"
        );
        assert_eq!(
            f.queued_repairs(),
            1,
            "the new epoch is read from its start"
        );
        f.cursors.repaired("c", read("new", 1, Some(1..=1)), true);
        f.cursors.publication(publication("e", 6));
        f.cursors.publication(publication("new", 2));
        assert_eq!(
            f.delivered(),
            vec![(1, false), (2, false)],
            "publications of the lost epoch still in flight are dropped"
        );
        assert_eq!(f.queued_repairs(), 0);
    }

    #[test]
    fn a_reused_offset_with_other_data_lost_writes() {
        let mut f = fixture();
        for offset in 1..=5 {
            f.cursors.publication(publication("e", offset));
        }
        f.delivered();
        f.cursors.subscribed("c");
        // The promoted replica had 4 and took two publications since: 5 is another one.
        let lost = f
            .cursors
            .repaired("c", read_of("e", 6, &[(5, "other"), (6, "6")]), true);
        assert_eq!(lost, Repaired::Lost { epoch: "e".into() });
        assert!(f.delivered().is_empty());
        assert_eq!(f.cursors.since("c").map(|p| p.offset), Some(5));
    }

    #[test]
    fn the_entry_at_the_cursor_unchanged_or_unknown_is_no_loss() {
        let mut f = fixture();
        for offset in 1..=3 {
            f.cursors.publication(publication("e", offset));
        }
        f.cursors.subscribed("c");
        let done = f.cursors.repaired("c", read("e", 5, Some(3..=5)), true);
        assert_eq!(done, Repaired::Done);
        assert_eq!(
            f.delivered(),
            vec![(1, false), (2, false), (3, false), (4, false), (5, false)]
        );
        // The entry at the cursor left history: nothing to compare, nothing to say.
        f.cursors.subscribed("c");
        let done = f.cursors.repaired("c", read_of("e", 6, &[(6, "6")]), true);
        assert_eq!(done, Repaired::Done);
        assert_eq!(f.delivered(), vec![(6, false)]);
        // A cursor placed by a position read has no fingerprint: only its offset counts.
        let g = fixture();
        g.cursors.observe(
            "c",
            &Position {
                offset: 2,
                epoch: "e".into(),
            },
        );
        g.cursors.subscribed("c");
        let done = g
            .cursors
            .repaired("c", read_of("e", 2, &[(2, "whatever")]), true);
        assert_eq!(done, Repaired::Done);
        g.cursors.subscribed("c");
        let lost = g.cursors.repaired("c", read_of("e", 1, &[]), true);
        assert_eq!(lost, Repaired::Lost { epoch: "e".into() });
    }

    #[test]
    fn a_late_publication_of_the_previous_epoch_is_dropped() {
        let mut f = fixture();
        f.cursors.publication(publication("old", 1));
        f.cursors.publication(publication("new", 1));
        f.cursors.publication(publication("old", 2));
        f.cursors.publication(publication("new", 2));
        assert_eq!(f.delivered(), vec![(1, false), (1, false), (2, false)]);
        assert_eq!(f.queued_repairs(), 0, "no read for a stale publication");
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
