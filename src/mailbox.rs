//! A session's mailbox: its bounded queue of outbound publications and its kick, in one
//! small allocation.
//!
//! The hub pushes without waiting; a full mailbox is the hub's cue to kick the session as
//! slow. The session waits on one signal for both "something to write" and "you are
//! kicked". It replaced a tokio `mpsc` channel (≈ 800 bytes per session with its first
//! block and cache-padded halves) plus a `CancellationToken` (another ≈ 150): idle
//! connections are most of a node's connections, so this is most of its memory.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

use crate::hub::Outbound;
use crate::protocol::DisconnectCode;

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The session is that far behind: it should be kicked as slow.
    Full,
    /// The session has ended.
    Closed,
}

/// What the session is woken for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Publications are waiting.
    Ready,
    /// Close with this code; the first kick wins.
    Kicked(DisconnectCode),
}

#[derive(Debug)]
pub struct Mailbox {
    state: Mutex<State>,
    waker: AtomicWaker,
    capacity: usize,
}

#[derive(Debug, Default)]
struct State {
    /// Grows with what is queued (never past `capacity`), nothing while idle.
    queue: VecDeque<Arc<Outbound>>,
    kicked: Option<DisconnectCode>,
    closed: bool,
}

impl Mailbox {
    /// A mailbox holding at most `capacity` publications (at least one).
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            waker: AtomicWaker::new(),
            capacity: capacity.max(1),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned one is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `out` without waiting.
    ///
    /// # Errors
    /// [`PushError::Full`] at capacity, [`PushError::Closed`] after [`Mailbox::close`].
    pub fn push(&self, out: Arc<Outbound>) -> Result<(), PushError> {
        let was_empty = {
            let mut state = self.state();
            if state.closed {
                return Err(PushError::Closed);
            }
            if state.queue.len() >= self.capacity {
                return Err(PushError::Full);
            }
            state.queue.push_back(out);
            state.queue.len() == 1
        };
        // The session empties the queue before it waits again, so only the first
        // publication of a batch needs to wake it.
        if was_empty {
            self.waker.wake();
        }
        Ok(())
    }

    /// Asks the session to close with `code` (a later kick keeps the first code).
    pub fn kick(&self, code: DisconnectCode) {
        self.state().kicked.get_or_insert(code);
        self.waker.wake();
    }

    /// The code the session was kicked with, if it was.
    pub fn kicked(&self) -> Option<DisconnectCode> {
        self.state().kicked
    }

    /// How many publications wait.
    pub fn len(&self) -> usize {
        self.state().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next queued publication.
    pub fn pop(&self) -> Option<Arc<Outbound>> {
        self.state().queue.pop_front()
    }

    /// Refuses further pushes and drops what is queued (the session ended).
    pub fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        state.queue = VecDeque::new();
    }

    fn poll_signal(&self, cx: &mut Context<'_>) -> Poll<Signal> {
        // Registered before looking, so a push or kick in between still wakes us.
        self.waker.register(cx.waker());
        let state = self.state();
        match (state.kicked, state.queue.is_empty()) {
            (Some(code), _) => Poll::Ready(Signal::Kicked(code)),
            (None, false) => Poll::Ready(Signal::Ready),
            (None, true) => Poll::Pending,
        }
    }

    /// Waits until publications are queued or the session is kicked (a kick first).
    pub async fn signal(&self) -> Signal {
        poll_fn(|cx| self.poll_signal(cx)).await
    }

    /// Waits until the session is kicked.
    pub async fn until_kicked(&self) -> DisconnectCode {
        poll_fn(|cx| {
            self.waker.register(cx.waker());
            self.state().kicked.map_or(Poll::Pending, Poll::Ready)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures_util::FutureExt;

    fn out(offset: u64) -> Arc<Outbound> {
        Arc::new(Outbound {
            channel: Arc::from("c"),
            offset,
            epoch: Arc::from("e"),
            frame: Bytes::new(),
            ts: 0,
            position_only: false,
        })
    }

    #[test]
    fn publications_come_out_in_order_up_to_the_capacity() {
        let mailbox = Mailbox::new(2);
        assert_eq!(mailbox.signal().now_or_never(), None, "nothing queued yet");
        mailbox.push(out(1)).unwrap();
        mailbox.push(out(2)).unwrap();
        assert_eq!(mailbox.push(out(3)), Err(PushError::Full));
        assert_eq!(mailbox.signal().now_or_never(), Some(Signal::Ready));
        assert_eq!(mailbox.len(), 2);
        assert_eq!(mailbox.pop().map(|o| o.offset), Some(1));
        assert_eq!(mailbox.pop().map(|o| o.offset), Some(2));
        assert!(mailbox.pop().is_none());
        assert!(mailbox.is_empty());
    }

    #[test]
    fn a_kick_wins_over_queued_publications_and_the_first_code_stays() {
        let mailbox = Mailbox::new(4);
        mailbox.push(out(1)).unwrap();
        mailbox.kick(DisconnectCode::Slow);
        mailbox.kick(DisconnectCode::Shutdown);
        let kicked = Some(Signal::Kicked(DisconnectCode::Slow));
        assert_eq!(mailbox.signal().now_or_never(), kicked);
        assert_eq!(
            mailbox.until_kicked().now_or_never(),
            Some(DisconnectCode::Slow)
        );
        assert_eq!(mailbox.kicked(), Some(DisconnectCode::Slow));
    }

    #[test]
    fn a_closed_mailbox_refuses_pushes_and_holds_nothing() {
        let mailbox = Mailbox::new(4);
        mailbox.push(out(1)).unwrap();
        mailbox.close();
        assert_eq!(mailbox.push(out(2)), Err(PushError::Closed));
        assert!(mailbox.is_empty());
    }

    #[tokio::test]
    async fn a_waiting_session_wakes_for_a_push_from_another_thread() {
        let mailbox = Mailbox::new(4);
        let pusher = mailbox.clone();
        let waiter = tokio::spawn(async move { mailbox.signal().await });
        tokio::task::yield_now().await;
        std::thread::spawn(move || pusher.push(out(1)))
            .join()
            .unwrap()
            .unwrap();
        let woke = tokio::time::timeout(std::time::Duration::from_secs(10), waiter).await;
        assert_eq!(woke.unwrap().unwrap(), Signal::Ready);
    }
}
