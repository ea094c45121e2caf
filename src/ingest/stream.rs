//! What this node received on its LISTEN connection, per channel shard: a bounded ring
//! buffer of notifications with their stream positions, the markers that make positions
//! comparable across nodes, and — for the shards this node bridges — the cursor of the
//! next notification to put on the bus.
//!
//! # Positions
//! Postgres delivers notifications to every listener in the same server order, but each
//! listener only sees what was queued after its `LISTEN`, so a count of its own means
//! nothing to another node. Markers fix a common origin: a node sends a marker
//! notification (`pg_notify(MARKER_CHANNEL, id)`) right after it starts listening and
//! again when it takes shards over; every node listens on the marker channel and sees each
//! marker at the same point of the stream. A notification's position is `(m, n)`: the last
//! marker `m` before it, and `n`, its rank among the notifications of its shard since `m`.
//! Two nodes that both saw `m` give the same notification the same position. The
//! notifications a node receives before its first marker have no position (see
//! `docs/ingest.md` for what that means at a takeover).
//!
//! Everything here is plain state under one lock, with no I/O, so the takeover rule is
//! unit-tested below.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

/// Markers remembered; a takeover whose recorded marker was forgotten treats every
/// notification with a position as not yet bridged.
const MAX_MARKERS: usize = 1024;
/// What one buffered notification costs besides its payload and channel name.
const ENTRY_OVERHEAD: usize = 96;

/// A stream position as the bus records it for a shard: `"<marker> <n>"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub marker: Arc<str>,
    pub n: u64,
}

impl Position {
    pub fn encode(&self) -> String {
        format!("{} {}", self.marker, self.n)
    }

    pub fn decode(s: &str) -> Option<Self> {
        let (marker, n) = s.rsplit_once(' ')?;
        Some(Self {
            marker: Arc::from(marker),
            n: n.parse().ok()?,
        })
    }
}

/// One notification as buffered.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Rank in this shard since the connection started (from 1).
    pub idx: u64,
    /// None: received before this connection's first marker.
    pub position: Option<Position>,
    pub channel: Arc<str>,
    /// Valid JSON.
    pub data: Bytes,
    /// When the LISTEN loop received it (µs since the Unix epoch).
    pub received_at: u64,
}

impl Entry {
    fn cost(&self) -> usize {
        self.data.len() + self.channel.len() + ENTRY_OVERHEAD
    }
}

/// The bridge of one shard on this node.
#[derive(Debug, Clone)]
struct Owner {
    /// The lease token (the fence); None on the in-memory bus (no other node).
    token: Option<Arc<str>>,
    /// Distinguishes successive ownerships, so a late publish result of an older one is
    /// ignored.
    generation: u64,
    /// idx of the next notification to publish.
    cursor: u64,
}

#[derive(Debug, Default)]
struct Shard {
    entries: VecDeque<Entry>,
    bytes: usize,
    /// idx the next notification gets.
    next_idx: u64,
    /// Notifications of this shard since the last marker.
    since_marker: u64,
    /// idx of the first notification with a position.
    first_positioned: Option<u64>,
    /// idx of the last notification this node itself put on the bus (0: none), whatever
    /// the bus remembers: a node that gets its own shard back (a Redis restart lost the
    /// lease and the recorded position) does not publish it again.
    bridged: u64,
    owner: Option<Owner>,
}

#[derive(Debug)]
struct Marker {
    id: Arc<str>,
    /// Per shard: the idx of the last notification before the marker.
    base: Vec<u64>,
}

/// What a takeover found in the buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Takeover {
    /// Buffered notifications the previous owner had not bridged: published now.
    pub republish: u64,
    /// Buffered notifications the previous owner had bridged: dropped.
    pub duplicates: u64,
    /// Notifications the previous owner had not bridged that left this buffer (it was
    /// full): lost.
    pub lost: u64,
}

/// Why a buffer cannot take a notification now.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

/// The next notifications the bridge of a shard must publish, in order.
#[derive(Debug, Clone)]
pub struct Job {
    /// Consecutive: the first is the one at the owner's cursor.
    pub entries: Vec<Entry>,
    pub token: Option<Arc<str>>,
    pub generation: u64,
}

/// What the bus answered for one notification of a [`Job`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Published,
    /// Already on the bus (a retry, or the previous owner's).
    Duplicate,
    /// The lease was gone: nothing from here on was published.
    Fenced,
    /// Failed or not attempted: retry from here.
    Failed,
}

/// What [`StreamState::settle`] made of a job's answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settled {
    /// Notifications the cursor moved past (published or duplicates), from the first.
    pub settled: usize,
    pub duplicates: usize,
    /// The ownership ended (fenced).
    pub fenced: bool,
    /// The rest of the job must be retried.
    pub failed: bool,
}

/// The ingest state of one LISTEN connection (reset when it reconnects).
#[derive(Debug)]
pub struct StreamState {
    shards: Vec<Shard>,
    markers: VecDeque<Marker>,
    /// Bytes a shard may buffer.
    cap: usize,
    generations: u64,
}

impl StreamState {
    pub fn new(shards: usize, cap: usize) -> Self {
        let mut state = Self {
            shards: (0..shards).map(|_| Shard::default()).collect(),
            markers: VecDeque::new(),
            cap,
            generations: 0,
        };
        state.reset();
        state
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// A new connection: what the old one received cannot be lined up with the new one, and
    /// this node bridges nothing until it takes shards again.
    pub fn reset(&mut self) {
        for shard in &mut self.shards {
            *shard = Shard {
                next_idx: 1,
                ..Shard::default()
            };
        }
        self.markers.clear();
    }

    /// Whether this connection has seen a marker (positions exist).
    pub fn aligned(&self) -> bool {
        !self.markers.is_empty()
    }

    /// Buffers a notification of `shard`.
    ///
    /// # Errors
    /// [`Full`]: the shard is bridged here and its unpublished notifications fill the
    /// buffer; retry after the bridge made progress.
    pub fn push(&mut self, shard: usize, channel: Arc<str>, data: Bytes) -> Result<(), Full> {
        let latest = self.markers.back().map(|m| m.id.clone());
        let cap = self.cap;
        let s = &mut self.shards[shard];
        let position = latest.map(|marker| Position {
            marker,
            n: s.since_marker + 1,
        });
        let entry = Entry {
            idx: s.next_idx,
            position,
            channel,
            data,
            received_at: crate::bus::now_micros(),
        };
        let cost = entry.cost();
        while s.bytes + cost > cap {
            let Some(front) = s.entries.front() else {
                break;
            };
            if s.owner.as_ref().is_some_and(|o| front.idx >= o.cursor) {
                return Err(Full);
            }
            s.bytes -= front.cost();
            s.entries.pop_front();
        }
        if entry.position.is_some() {
            s.first_positioned.get_or_insert(entry.idx);
            s.since_marker += 1;
        }
        s.next_idx += 1;
        s.bytes += cost;
        s.entries.push_back(entry);
        Ok(())
    }

    /// A marker went by: positions after it count from it.
    pub fn mark(&mut self, id: &str) {
        let base = self
            .shards
            .iter_mut()
            .map(|s| {
                s.since_marker = 0;
                s.next_idx - 1
            })
            .collect();
        self.markers.push_back(Marker {
            id: Arc::from(id),
            base,
        });
        if self.markers.len() > MAX_MARKERS {
            self.markers.pop_front();
        }
    }

    /// Bridges every shard from what arrives next, unfenced: the in-memory bus, where this
    /// node is the only one.
    pub fn own_all(&mut self) {
        for shard in 0..self.shards.len() {
            self.generations += 1;
            let s = &mut self.shards[shard];
            s.owner = Some(Owner {
                token: None,
                generation: self.generations,
                cursor: s.entries.front().map_or(s.next_idx, |e| e.idx),
            });
        }
    }

    /// Whether this connection can place `recorded` in its stream: nothing was recorded, or
    /// it saw the record's marker. When it cannot, what the previous owner had not bridged
    /// before this connection's first marker is in no buffer here.
    pub fn can_place(&self, recorded: Option<&Position>) -> bool {
        recorded.is_none_or(|p| self.markers.iter().any(|m| m.id == p.marker))
    }

    /// Takes `shard` over with lease `token`, given the position the bus recorded for it
    /// (`None`: nothing recorded). The caller made sure this connection has seen a marker
    /// sent after the lease was acquired, so everything the previous owner bridged is in
    /// this connection's past.
    ///
    /// The rule: the first notification to publish is the one after the recorded position
    /// when this connection saw its marker; otherwise (never recorded, or recorded before
    /// this connection's markers) the first one with a position.
    pub fn take_over(
        &mut self,
        shard: usize,
        token: Arc<str>,
        recorded: Option<&Position>,
    ) -> Takeover {
        let base = recorded.and_then(|p| {
            let marker = self.markers.iter().find(|m| m.id == p.marker)?;
            Some(marker.base[shard] + p.n + 1)
        });
        self.generations += 1;
        let s = &mut self.shards[shard];
        let start = base
            .or(s.first_positioned)
            .unwrap_or(s.next_idx)
            .max(s.bridged + 1)
            .min(s.next_idx);
        let first_kept = s.entries.front().map_or(s.next_idx, |e| e.idx);
        let report = Takeover {
            republish: s.next_idx - start.max(first_kept),
            duplicates: start.saturating_sub(first_kept),
            lost: first_kept.saturating_sub(start),
        };
        s.owner = Some(Owner {
            token: Some(token),
            generation: self.generations,
            cursor: start.max(first_kept),
        });
        report
    }

    /// Stops bridging `shard` (lease released or lost).
    pub fn release(&mut self, shard: usize) {
        self.shards[shard].owner = None;
    }

    /// The lease token this node bridges `shard` with.
    pub fn token(&self, shard: usize) -> Option<Arc<str>> {
        self.shards[shard].owner.as_ref()?.token.clone()
    }

    /// idx of the last notification of `shard` received so far.
    pub fn head(&self, shard: usize) -> u64 {
        self.shards[shard].next_idx - 1
    }

    /// Whether this node bridges `shard` and has published it through `idx`.
    pub fn published_through(&self, shard: usize, idx: u64) -> bool {
        self.shards[shard]
            .owner
            .as_ref()
            .is_some_and(|o| o.cursor > idx)
    }

    pub fn owned(&self) -> usize {
        self.shards.iter().filter(|s| s.owner.is_some()).count()
    }

    pub fn buffered_bytes(&self) -> usize {
        self.shards.iter().map(|s| s.bytes).sum()
    }

    /// The next notifications to publish on `shard` (at most `max`, from the cursor, in
    /// order), if this node bridges it and has any.
    pub fn next_job(&self, shard: usize, max: usize) -> Option<Job> {
        let s = &self.shards[shard];
        let owner = s.owner.as_ref()?;
        let first = s.entries.front()?.idx;
        let at = usize::try_from(owner.cursor.checked_sub(first)?).ok()?;
        if at >= s.entries.len() {
            return None;
        }
        let entries: Vec<Entry> = s.entries.range(at..).take(max.max(1)).cloned().collect();
        Some(Job {
            entries,
            token: owner.token.clone(),
            generation: owner.generation,
        })
    }

    /// Applies the bus's answers to `job`, in order: the cursor moves past every published
    /// or duplicate notification up to the first other answer; a fenced one ends the
    /// ownership; a failed one (and everything after it, whatever it answered) is retried.
    /// Answers of an older ownership change nothing.
    pub fn settle(&mut self, shard: usize, job: &Job, answers: &[Answer]) -> Settled {
        let mut out = Settled::default();
        for (entry, answer) in job.entries.iter().zip(answers) {
            match answer {
                Answer::Published | Answer::Duplicate => {
                    if !self.done(shard, job.generation, entry.idx) {
                        return out;
                    }
                    out.settled += 1;
                    if *answer == Answer::Duplicate {
                        out.duplicates += 1;
                    }
                }
                Answer::Fenced => {
                    self.fenced(shard, job.generation);
                    out.fenced = true;
                    return out;
                }
                Answer::Failed => {
                    out.failed = true;
                    return out;
                }
            }
        }
        // Fewer answers than notifications: the rest is retried.
        out.failed |= answers.len() < job.entries.len();
        out
    }

    /// The publication of `idx` is settled (published, or found on the bus already): true
    /// when that moved the cursor of the current ownership.
    pub fn done(&mut self, shard: usize, generation: u64, idx: u64) -> bool {
        let s = &mut self.shards[shard];
        if let Some(owner) = &mut s.owner {
            if owner.generation == generation && owner.cursor == idx {
                owner.cursor += 1;
                s.bridged = s.bridged.max(idx);
                return true;
            }
        }
        false
    }

    /// The lease of this ownership was gone when we published.
    pub fn fenced(&mut self, shard: usize, generation: u64) {
        let s = &mut self.shards[shard];
        if s.owner.as_ref().is_some_and(|o| o.generation == generation) {
            s.owner = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(s: &mut StreamState, shard: usize, seq: u64) {
        s.push(shard, Arc::from("c"), Bytes::from(seq.to_string()))
            .unwrap();
    }

    fn drain(s: &mut StreamState, shard: usize) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(job) = s.next_job(shard, 1) {
            out.push(data(&job.entries[0]));
            s.done(shard, job.generation, job.entries[0].idx);
        }
        out
    }

    fn data(entry: &Entry) -> String {
        String::from_utf8(entry.data.to_vec()).unwrap()
    }

    fn pos(marker: &str, n: u64) -> Position {
        Position {
            marker: Arc::from(marker),
            n,
        }
    }

    #[test]
    fn positions_encode_and_decode() {
        let p = pos("node-a:1f:2", 42);
        assert_eq!(Position::decode(&p.encode()), Some(p));
        assert_eq!(Position::decode("x"), None);
    }

    #[test]
    fn a_takeover_publishes_exactly_what_follows_the_recorded_position() {
        // Two nodes joined at different times: b saw 1..=2 before its marker.
        let mut a = StreamState::new(2, 1 << 20);
        let mut b = StreamState::new(2, 1 << 20);
        a.mark("m1");
        for seq in 1..=2 {
            push(&mut a, 0, seq);
            push(&mut b, 0, seq);
        }
        a.mark("m2");
        b.mark("m2");
        for seq in 3..=10 {
            push(&mut a, 0, seq);
            push(&mut b, 0, seq);
            push(&mut b, 1, 100 + seq);
        }
        // a bridged through seq 6, i.e. m2 + 4.
        let report = b.take_over(0, Arc::from("t"), Some(&pos("m2", 4)));
        assert_eq!(
            report,
            Takeover {
                republish: 4,
                duplicates: 6,
                lost: 0
            }
        );
        assert_eq!(drain(&mut b, 0), ["7", "8", "9", "10"]);
        assert!(b.next_job(1, 8).is_none(), "shard 1 is not ours");
        push(&mut b, 0, 11);
        assert_eq!(drain(&mut b, 0), ["11"]);
    }

    #[test]
    fn an_unknown_marker_means_everything_positioned_is_new() {
        let mut b = StreamState::new(1, 1 << 20);
        push(&mut b, 0, 1); // before b's marker: no position, never republished
        b.mark("mb");
        push(&mut b, 0, 2);
        let report = b.take_over(0, Arc::from("t"), Some(&pos("older", 9)));
        assert_eq!((report.republish, report.duplicates), (1, 1));
        assert_eq!(drain(&mut b, 0), ["2"]);

        let mut fresh = StreamState::new(1, 1 << 20);
        fresh.mark("m");
        push(&mut fresh, 0, 1);
        fresh.take_over(0, Arc::from("t"), None);
        assert_eq!(drain(&mut fresh, 0), ["1"]);
    }

    #[test]
    fn a_full_standby_buffer_drops_its_oldest_and_a_takeover_counts_them_lost() {
        let one = "1".len() + "c".len() + ENTRY_OVERHEAD;
        let mut b = StreamState::new(1, one * 3);
        b.mark("m");
        for seq in 1..=5 {
            push(&mut b, 0, seq);
        }
        // The owner had bridged 1; 2 was evicted here.
        let report = b.take_over(0, Arc::from("t"), Some(&pos("m", 1)));
        assert_eq!(report.lost, 1);
        assert_eq!(drain(&mut b, 0), ["3", "4", "5"]);
    }

    #[test]
    fn an_owner_with_a_full_buffer_pushes_back_instead_of_dropping() {
        let one = "1".len() + "c".len() + ENTRY_OVERHEAD;
        let mut a = StreamState::new(1, one * 2);
        a.mark("m");
        a.take_over(0, Arc::from("t"), None);
        push(&mut a, 0, 1);
        push(&mut a, 0, 2);
        assert_eq!(a.push(0, Arc::from("c"), Bytes::from("3")), Err(Full));
        let job = a.next_job(0, 1).unwrap();
        a.done(0, job.generation, job.entries[0].idx);
        push(&mut a, 0, 3);
        assert_eq!(drain(&mut a, 0), ["2", "3"]);
    }

    #[test]
    fn a_node_that_gets_its_shard_back_without_a_record_skips_what_it_published() {
        let mut a = StreamState::new(1, 1 << 20);
        a.mark("m");
        push(&mut a, 0, 1);
        a.take_over(0, Arc::from("t1"), None);
        assert_eq!(drain(&mut a, 0), ["1"]);
        a.release(0);
        push(&mut a, 0, 2);
        // Redis restarted empty: no record.
        a.take_over(0, Arc::from("t2"), None);
        assert_eq!(drain(&mut a, 0), ["2"]);
    }

    #[test]
    fn a_stale_result_does_not_move_a_newer_ownership() {
        let mut a = StreamState::new(1, 1 << 20);
        a.mark("m");
        push(&mut a, 0, 1);
        a.take_over(0, Arc::from("t1"), None);
        let old = a.next_job(0, 1).unwrap();
        a.take_over(0, Arc::from("t2"), None);
        a.fenced(0, old.generation);
        a.done(0, old.generation, old.entries[0].idx);
        assert_eq!(a.token(0).as_deref(), Some("t2"));
        assert_eq!(drain(&mut a, 0), ["1"]);
    }

    fn owner_with(n: u64) -> StreamState {
        let mut a = StreamState::new(1, 1 << 20);
        a.mark("m");
        a.take_over(0, Arc::from("t"), None);
        for seq in 1..=n {
            push(&mut a, 0, seq);
        }
        a
    }

    use Answer::{Duplicate as D, Failed as F, Fenced as X, Published as P};

    #[test]
    fn a_batch_is_the_backlog_in_order_and_bounded() {
        let mut a = owner_with(10);
        let job = a.next_job(0, 4).unwrap();
        let seqs: Vec<String> = job.entries.iter().map(data).collect();
        assert_eq!(seqs, ["1", "2", "3", "4"]);
        assert_eq!(a.settle(0, &job, &[P, D, P, P]).settled, 4);
        let job = a.next_job(0, 100).unwrap();
        assert_eq!(job.entries.first().map(data).as_deref(), Some("5"));
        assert_eq!(job.entries.len(), 6, "the rest of the backlog");
        let settled = a.settle(0, &job, &[P; 6]);
        assert_eq!((settled.settled, settled.failed), (6, false));
        assert!(a.next_job(0, 100).is_none(), "nothing left");
        assert!(a.published_through(0, 10));
    }

    #[test]
    fn a_partly_failed_batch_is_retried_from_its_first_failure() {
        let mut a = owner_with(5);
        let job = a.next_job(0, 8).unwrap();
        // 3 failed; 4 answered published (another slot of a Cluster): retried anyway, so
        // the bus answers it a duplicate then.
        let settled = a.settle(0, &job, &[P, D, F, P, P]);
        assert_eq!(
            settled,
            Settled {
                settled: 2,
                duplicates: 1,
                fenced: false,
                failed: true
            }
        );
        let retry = a.next_job(0, 8).unwrap();
        let seqs: Vec<String> = retry.entries.iter().map(data).collect();
        assert_eq!(seqs, ["3", "4", "5"]);
        // Fewer answers than notifications (a short reply): the rest is retried too.
        let settled = a.settle(0, &retry, &[P]);
        assert_eq!((settled.settled, settled.failed), (1, true));
        assert_eq!(drain(&mut a, 0), ["4", "5"]);
    }

    #[test]
    fn a_batch_fenced_midway_settles_its_head_and_ends_the_ownership() {
        let mut a = owner_with(5);
        let job = a.next_job(0, 8).unwrap();
        let settled = a.settle(0, &job, &[P, P, X, F, F]);
        assert_eq!((settled.settled, settled.fenced), (2, true));
        assert!(a.next_job(0, 8).is_none(), "no longer ours");
        assert_eq!(a.token(0), None);
        // The next owner, here this node again, continues after what was published.
        a.take_over(0, Arc::from("t2"), Some(&pos("m", 2)));
        assert_eq!(drain(&mut a, 0), ["3", "4", "5"]);
    }

    #[test]
    fn answers_to_an_older_ownership_change_nothing() {
        let mut a = owner_with(3);
        let old = a.next_job(0, 8).unwrap();
        a.take_over(0, Arc::from("t2"), None);
        assert_eq!(a.settle(0, &old, &[P, P, P]).settled, 0);
        assert!(a.settle(0, &old, &[X]).fenced);
        assert_eq!(
            a.token(0).as_deref(),
            Some("t2"),
            "the newer ownership stays"
        );
        assert_eq!(drain(&mut a, 0), ["1", "2", "3"]);
    }
}
