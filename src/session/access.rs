//! A session's standing: who the client is (its verified token, or anonymous), until when
//! its connection token and each subscription token hold, what to do when one runs out,
//! and its limits (tier, subject, connection slot, strikes).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::auth::Identity;
use crate::limits::{Action, ConnectionGuard, Decision, Tier};

/// Strikes (limited commands) are counted over this window.
const STRIKE_WINDOW: Duration = Duration::from_secs(10);

/// What the expiry timer found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Expired {
    /// The connection token ran out (plus grace) without a `refresh`.
    Connection,
    /// These subscription tokens ran out (plus grace) without a `sub_refresh`.
    Subscriptions(Vec<String>),
}

#[derive(Default)]
pub(super) struct Access {
    /// The verified connection token; None for an anonymous connection.
    /// Boxed, like `slot`: most sessions are idle, many anonymous, so what they rarely
    /// use is kept out of every session task.
    identity: Option<Box<Identity>>,
    /// When the connection must have refreshed its token (`exp` + grace).
    deadline: Option<Instant>,
    /// Subscriptions held by a subscription token, and when each must have been refreshed.
    /// At most one entry per subscription, so bounded like the subscriptions.
    grants: BTreeMap<String, Instant>,
    /// Deadlines changed since the timer was last armed.
    dirty: bool,
    /// The client's address (the limits subject of anonymous connections).
    peer: Option<IpAddr>,
    /// The limits tier, from the token or the default.
    tier: Arc<Tier>,
    /// Who limits count against: `user:<sub>`, `claim:<value>` or `ip:<address>`.
    subject: String,
    /// The concurrent-connection slot, given back when the session ends.
    slot: Option<Box<ConnectionGuard>>,
    /// Start of the strike window and strikes in it.
    strikes: Option<(Instant, u32)>,
    abusive: bool,
}

/// `exp` (seconds since the epoch) as an instant of the runtime's clock, plus `grace`.
pub(super) fn deadline(expires_at: u64, now: u64, grace: Duration) -> Instant {
    Instant::now() + Duration::from_secs(expires_at.saturating_sub(now)) + grace
}

/// Seconds from `now` to `expires_at`, for the `ttl` of replies (at least 1).
pub(super) fn ttl(expires_at: u64, now: u64) -> u32 {
    u32::try_from(expires_at.saturating_sub(now))
        .unwrap_or(u32::MAX)
        .max(1)
}

impl Access {
    pub(super) fn new(peer: Option<IpAddr>, tier: Arc<Tier>) -> Self {
        Self {
            peer,
            tier,
            ..Self::default()
        }
    }

    /// Sets the tier and subject once the client is known (at connect).
    pub(super) fn set_limits(&mut self, tier: Arc<Tier>) {
        self.subject = match &self.identity {
            Some(i) => match &i.subject_claim {
                Some(claim) => format!("claim:{claim}"),
                None => format!("user:{}", i.user),
            },
            None => match self.peer {
                Some(ip) => format!("ip:{ip}"),
                None => "ip:unknown".to_owned(),
            },
        };
        self.tier = tier;
    }

    pub(super) fn tier(&self) -> &Arc<Tier> {
        &self.tier
    }

    pub(super) fn subject(&self) -> &str {
        &self.subject
    }

    pub(super) fn hold(&mut self, slot: Option<ConnectionGuard>) {
        self.slot = slot.map(Box::new);
    }

    /// Counts a limited command; past `threshold` within the strike window the
    /// connection is marked abusive (0: never).
    pub(super) fn strike(&mut self, threshold: u32) {
        let now = Instant::now();
        let (start, n) = match self.strikes {
            Some((start, n)) if now.duration_since(start) < STRIKE_WINDOW => (start, n + 1),
            _ => (now, 1),
        };
        self.strikes = Some((start, n));
        if threshold > 0 && n > threshold {
            self.abusive = true;
        }
    }

    pub(super) fn abusive(&self) -> bool {
        self.abusive
    }

    pub(super) fn identity(&self) -> Option<&Identity> {
        self.identity.as_deref()
    }

    /// The user ("" when anonymous).
    pub(super) fn user(&self) -> &str {
        self.identity.as_ref().map_or("", |i| &*i.user)
    }

    /// Sets (or replaces, on refresh) the connection's identity and its deadline.
    pub(super) fn set_identity(&mut self, identity: Identity, deadline: Instant) {
        self.identity = Some(Box::new(identity));
        self.deadline = Some(deadline);
        self.dirty = true;
    }

    pub(super) fn grant(&mut self, channel: &str, deadline: Instant) {
        self.grants.insert(channel.to_owned(), deadline);
        self.dirty = true;
    }

    pub(super) fn forget(&mut self, channel: &str) {
        if self.grants.remove(channel).is_some() {
            self.dirty = true;
        }
    }

    /// The next deadline, if they changed since the last call (Some(None): disarm).
    pub(super) fn rearm(&mut self) -> Option<Option<Instant>> {
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        Some(self.grants.values().copied().chain(self.deadline).min())
    }

    /// What has run out by `now`; expired grants are removed.
    pub(super) fn expire(&mut self, now: Instant) -> Option<Expired> {
        self.dirty = true;
        if self.deadline.is_some_and(|d| d <= now) {
            return Some(Expired::Connection);
        }
        let gone: Vec<String> = self
            .grants
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(c, _)| c.clone())
            .collect();
        for channel in &gone {
            self.grants.remove(channel);
        }
        (!gone.is_empty()).then_some(Expired::Subscriptions(gone))
    }
}

impl super::Session {
    /// Checks `action` against this connection's limits.
    pub(super) async fn limit(&self, action: Action, cost: u64) -> Decision {
        let tier = self.access.tier().clone();
        self.shared
            .limits
            .check(&tier, self.access.subject(), action, cost)
            .await
    }

    /// Counts a frame's bytes; Some(retry advice) when they are over the limit (every
    /// command of the frame is then answered with 111).
    pub(super) async fn admit_bytes(&mut self, len: usize) -> Option<Duration> {
        if self.client.is_none() || self.access.tier().inbound_bytes_per_second == 0 {
            return None;
        }
        match self.limit(Action::InboundBytes, len as u64).await {
            Decision::Allowed => None,
            Decision::Limited { retry_after } => Some(retry_after),
        }
    }

    /// Called when the expiry timer fires: closes an expired connection (3005, the SDK
    /// reconnects and gets error 109 for its old token, so it fetches a new one), or ends
    /// each expired subscription with an `unsubscribe` push (2501, the SDK resubscribes
    /// with a new subscription token).
    ///
    /// # Errors
    /// How the session ends: expired, or the peer is gone.
    pub(super) async fn expire<W, E>(
        &mut self,
        sink: &mut W,
        mailbox: &crate::mailbox::Mailbox,
        write_limit: Duration,
    ) -> Result<(), super::End>
    where
        W: futures_util::Sink<axum::extract::ws::Message, Error = E> + Unpin,
    {
        match self.access.expire(Instant::now()) {
            None => Ok(()),
            Some(Expired::Connection) => {
                crate::auth::AuthError::Expired.record("connect_refresh");
                Err(super::End::Disconnect(
                    crate::protocol::DisconnectCode::Expired,
                ))
            }
            Some(Expired::Subscriptions(channels)) => {
                for channel in channels {
                    if !self.subs.leave(&channel) {
                        continue;
                    }
                    crate::auth::AuthError::Expired.record("subscription_refresh");
                    let push = crate::protocol::reply::encode_unsubscribe_push(
                        &channel,
                        crate::protocol::codes::unsubscribe::SUBSCRIPTION_EXPIRED,
                        "subscription expired",
                    );
                    let message = axum::extract::ws::Message::Text(
                        axum::extract::ws::Utf8Bytes::try_from(push).unwrap_or_default(),
                    );
                    super::guarded(mailbox, write_limit, super::send(sink, message)).await?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Patterns;

    fn identity() -> Identity {
        Identity {
            user: "u".into(),
            expires_at: 0,
            channels: Patterns::default(),
            publish: Patterns::default(),
            tier: None,
            subject_claim: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_earliest_deadline_arms_and_expiry_reports_what_ran_out() {
        let mut a = Access::default();
        assert_eq!(a.rearm(), None, "nothing changed");
        let t0 = Instant::now();
        a.set_identity(identity(), t0 + Duration::from_secs(60));
        a.grant("a", t0 + Duration::from_secs(10));
        a.grant("b", t0 + Duration::from_secs(20));
        assert_eq!(a.rearm(), Some(Some(t0 + Duration::from_secs(10))));
        assert_eq!(
            a.expire(t0 + Duration::from_secs(15)),
            Some(Expired::Subscriptions(vec!["a".into()]))
        );
        assert_eq!(a.rearm(), Some(Some(t0 + Duration::from_secs(20))));
        a.forget("b");
        assert_eq!(a.rearm(), Some(Some(t0 + Duration::from_secs(60))));
        assert_eq!(a.expire(t0 + Duration::from_secs(30)), None);
        assert_eq!(
            a.expire(t0 + Duration::from_secs(60)),
            Some(Expired::Connection)
        );
        assert_eq!(ttl(100, 40), 60);
        assert_eq!(ttl(100, 140), 1);
    }
}
