//! A session's deadlines, served by one timer.
//!
//! Every `tokio::time::Sleep` lives in the session's task (112 bytes each) and an idle
//! session has six deadlines (connect, drain, its grace, pong, token expiry, ping): one
//! timer reset to the earliest of them keeps idle sessions small. Deliveries change no
//! deadline, so the hot path never touches the timer.

use tokio::time::Instant;

/// Which deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Due {
    /// The client did not connect in time.
    Connect,
    /// This session's moment in the node's drain.
    Drain,
    /// The drain waited for a connect in flight long enough.
    DrainLate,
    /// The client did not answer a ping.
    Pong,
    /// A token (the connection's or a subscription's) expired.
    Expiry,
    /// Time to ping.
    Ping,
}

/// The armed deadlines; `None` is disarmed.
#[derive(Debug, Default)]
pub(super) struct Deadlines {
    pub connect: Option<Instant>,
    pub drain: Option<Instant>,
    pub drain_late: Option<Instant>,
    pub pong: Option<Instant>,
    pub expiry: Option<Instant>,
    pub ping: Option<Instant>,
}

impl Deadlines {
    fn slots(&mut self) -> [(Due, &mut Option<Instant>); 6] {
        [
            (Due::Connect, &mut self.connect),
            (Due::Drain, &mut self.drain),
            (Due::DrainLate, &mut self.drain_late),
            (Due::Pong, &mut self.pong),
            (Due::Expiry, &mut self.expiry),
            (Due::Ping, &mut self.ping),
        ]
    }

    /// The earliest armed deadline.
    pub fn next(&self) -> Option<Instant> {
        [
            self.connect,
            self.drain,
            self.drain_late,
            self.pong,
            self.expiry,
            self.ping,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// A deadline that passed by `now`, disarmed; the earliest first.
    pub fn take_due(&mut self, now: Instant) -> Option<Due> {
        let (due, slot) = self
            .slots()
            .into_iter()
            .filter(|(_, at)| at.is_some_and(|at| at <= now))
            .min_by_key(|(_, at)| **at)?;
        *slot = None;
        Some(due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_earliest_passed_deadline_comes_first_and_once() {
        let now = Instant::now();
        let s = Duration::from_secs(1);
        let mut d = Deadlines {
            ping: Some(now - s),
            pong: Some(now - 2 * s),
            expiry: Some(now + s),
            ..Default::default()
        };
        assert_eq!(d.next(), Some(now - 2 * s));
        assert_eq!(d.take_due(now), Some(Due::Pong));
        assert_eq!(d.take_due(now), Some(Due::Ping));
        assert_eq!(d.take_due(now), None, "expiry is still ahead");
        assert_eq!(d.next(), Some(now + s));
        assert_eq!(d.take_due(now + s), Some(Due::Expiry));
        assert_eq!(d.next(), None);
    }
}
