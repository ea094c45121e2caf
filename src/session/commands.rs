//! What each client command does.

use super::access::{deadline, ttl};
use super::{new_client_id, Session};
use crate::auth::{unix_now, AuthError, Grant};
use crate::bus::{Position, PublishRequest, Recovery, Source};
use crate::limits::{Action, ConnectionRefused, Decision};
use crate::metrics as m;
use crate::protocol::command::{
    ChannelRequest, ConnectRequest, PublishRequest as ClientPublish, SubRefreshRequest,
    SubscribeRequest, TokenRequest,
};
use crate::protocol::reply::{
    ConnectResult, Empty, PublicationOut, RefreshResult, SubRefreshResult, SubscribeResult,
};
use crate::protocol::{valid_channel, Command, DisconnectCode, ErrorCode, Method};

const VERSION: &str = concat!("pgfanout ", env!("CARGO_PKG_VERSION"));

fn count_recovery(recovery: &Recovery, asked: bool) {
    if !asked {
        return;
    }
    match recovery.failure {
        None => {
            metrics::counter!(m::RECOVERIES_SUCCEEDED).increment(1);
            metrics::counter!(m::MESSAGES_REPLAYED, "path" => "recovery")
                .increment(recovery.publications.len() as u64);
        }
        Some(failure) => {
            tracing::debug!(reason = failure.label(), "recovery failed");
            metrics::counter!(m::RECOVERIES_FAILED, "reason" => failure.label()).increment(1);
        }
    }
}

impl Session {
    /// Handles one command, appending its reply. Returns a code when the connection must close.
    pub(super) async fn handle_command(&mut self, command: Command) -> Option<DisconnectCode> {
        let id = command.id;
        if self.client.is_none() && !matches!(command.method, Method::Connect(_) | Method::Pong) {
            return Some(DisconnectCode::BadRequest);
        }
        match command.method {
            Method::Pong => {}
            Method::Connect(req) => return self.connect(id, req).await,
            Method::Subscribe(req) => self.subscribe(id, req).await,
            Method::Unsubscribe(req) => self.unsubscribe(id, req),
            Method::Publish(req) => self.publish(id, req).await,
            Method::Refresh(req) => return self.refresh(id, req),
            Method::SubRefresh(req) => self.sub_refresh(id, req),
            // `send` expects no reply (Centrifugo closes with 3508 when it has no handler);
            // answering it with id 0 would look like a push to the SDK.
            Method::NotAvailable("send") => return Some(DisconnectCode::NotAvailable),
            Method::NotAvailable(_) => self.reply_error(id, ErrorCode::NotAvailable),
            Method::Unknown => self.reply_error(id, ErrorCode::MethodNotFound),
        }
        None
    }

    async fn connect(&mut self, id: u32, req: ConnectRequest) -> Option<DisconnectCode> {
        if self.client.is_some() {
            return Some(DisconnectCode::BadRequest);
        }
        let now = unix_now();
        let identity = if req.token.is_empty() {
            if !self.shared.policy.allow_anonymous {
                metrics::counter!(crate::metrics::AUTH_FAILURES, "token" => "connect", "reason" => "missing")
                    .increment(1);
                return Some(DisconnectCode::InvalidToken);
            }
            None
        } else {
            match self.shared.auth.verify_connect(&req.token, now) {
                Ok(identity) => Some(identity),
                Err(e) => {
                    e.record("connect");
                    tracing::debug!(error = %e, "connect token refused");
                    if e == AuthError::Expired {
                        // The SDK fetches a new token and connects again.
                        self.reply_error(id, ErrorCode::TokenExpired);
                        self.access.strike(self.shared.abuse_threshold);
                        return None;
                    }
                    return Some(DisconnectCode::InvalidToken);
                }
            }
        };
        let expires_at = identity.as_ref().map(|i| i.expires_at);
        let tier = identity.as_ref().and_then(|i| i.tier.clone());
        if let Some(identity) = identity {
            let grace = self.shared.policy.expiry_grace;
            let at = deadline(identity.expires_at, now, grace);
            self.access.set_identity(identity, at);
        }
        if let Some(code) = self.admit_connection(id, tier.as_deref()).await {
            return code;
        }
        let client = new_client_id();
        let config = &self.shared.config;
        let result = ConnectResult {
            client: &client,
            version: VERSION,
            ping: u32::try_from(config.ping_interval.as_secs()).unwrap_or(u32::MAX),
            pong: true,
            node: &config.node_id,
            expires: expires_at.is_some(),
            ttl: expires_at.map_or(0, |exp| ttl(exp, now)),
        };
        self.replies.result(id, "connect", &result);
        self.client = Some(client);
        None
    }

    /// The connect-rate and concurrent-connection limits of the client's tier and subject.
    /// Some(what to do) when the connection is refused: a rate-limited connect is answered
    /// with 111 and closed with 3013 (the SDK retries after its backoff); one connection
    /// too many is closed with 3504.
    async fn admit_connection(
        &mut self,
        id: u32,
        tier: Option<&str>,
    ) -> Option<Option<DisconnectCode>> {
        let tier = self.shared.limits.tier(tier);
        self.access.set_limits(tier.clone());
        if let Decision::Limited { retry_after } = self.limit(Action::Connect, 1).await {
            self.reply_limited(id, retry_after);
            return Some(Some(DisconnectCode::TooManyRequests));
        }
        let limits = self.shared.limits.clone();
        match limits
            .acquire_connection(&tier, self.access.subject())
            .await
        {
            Ok(slot) => {
                self.access.hold(slot);
                None
            }
            Err(ConnectionRefused::AtLimit) => Some(Some(DisconnectCode::ConnectionLimit)),
            Err(ConnectionRefused::Unavailable) => {
                self.reply_limited(id, std::time::Duration::from_secs(1));
                Some(Some(DisconnectCode::TooManyRequests))
            }
        }
    }

    /// Subscriptions this connection may hold: its tier's, within the node's cap.
    fn max_subscriptions(&self) -> usize {
        let cap = self.shared.config.max_subscriptions;
        match usize::try_from(self.access.tier().subscriptions_per_connection) {
            Ok(0) | Err(_) => cap,
            Ok(n) => n.min(cap),
        }
    }

    /// A new connection token for this connection: same user, new expiry and claims.
    fn refresh(&mut self, id: u32, req: TokenRequest) -> Option<DisconnectCode> {
        let client = self.client.clone().unwrap_or_default();
        if self.access.identity().is_none() {
            // Anonymous connections have nothing to refresh.
            let result = RefreshResult {
                client: &client,
                version: VERSION,
                expires: false,
                ttl: 0,
            };
            self.replies.result(id, "refresh", &result);
            return None;
        }
        let now = unix_now();
        let identity = match self.shared.auth.verify_connect(&req.token, now) {
            Ok(identity) => identity,
            Err(e) => {
                e.record("refresh");
                if e == AuthError::Expired {
                    self.reply_error(id, ErrorCode::TokenExpired);
                    return None;
                }
                return Some(DisconnectCode::InvalidToken);
            }
        };
        if identity.user != self.access.identity().map_or("".into(), |i| i.user.clone()) {
            metrics::counter!(crate::metrics::AUTH_FAILURES, "token" => "refresh", "reason" => "other_user")
                .increment(1);
            return Some(DisconnectCode::InvalidToken);
        }
        let expires_at = identity.expires_at;
        let at = deadline(expires_at, now, self.shared.policy.expiry_grace);
        self.access.set_identity(identity, at);
        let result = RefreshResult {
            client: &client,
            version: VERSION,
            expires: true,
            ttl: ttl(expires_at, now),
        };
        self.replies.result(id, "refresh", &result);
        None
    }

    /// A new subscription token for a subscription this connection holds.
    fn sub_refresh(&mut self, id: u32, req: SubRefreshRequest) {
        if !self.subs.contains(&req.channel) {
            return self.reply_error(id, ErrorCode::PermissionDenied);
        }
        let now = unix_now();
        let user = self.access.user().to_owned();
        match self
            .shared
            .auth
            .verify_subscription(&req.token, &user, &req.channel, now)
        {
            Ok(grant) => {
                let at = deadline(grant.expires_at, now, self.shared.policy.expiry_grace);
                self.access.grant(&req.channel, at);
                let result = SubRefreshResult {
                    expires: true,
                    ttl: ttl(grant.expires_at, now),
                };
                self.replies.result(id, "sub_refresh", &result);
            }
            Err(e) => {
                e.record("sub_refresh");
                let code = if e == AuthError::Expired {
                    ErrorCode::TokenExpired
                } else {
                    ErrorCode::PermissionDenied
                };
                self.reply_error(id, code);
            }
        }
    }

    /// Whether this connection may subscribe to `channel`: with a subscription token for
    /// it, or by its connection token's `channels`, or as an anonymous channel.
    ///
    /// # Errors
    /// The error to answer with: 109 for an expired subscription token, else 103.
    fn authorize_subscribe(
        &self,
        req: &SubscribeRequest,
        now: u64,
    ) -> Result<Option<Grant>, ErrorCode> {
        if req.token.is_empty() {
            if self
                .shared
                .policy
                .may_subscribe(self.access.identity(), &req.channel)
            {
                return Ok(None);
            }
            metrics::counter!(crate::metrics::AUTH_FAILURES, "token" => "subscribe", "reason" => "permission")
                .increment(1);
            return Err(ErrorCode::PermissionDenied);
        }
        match self.shared.auth.verify_subscription(
            &req.token,
            self.access.user(),
            &req.channel,
            now,
        ) {
            Ok(grant) => Ok(Some(grant)),
            Err(e) => {
                e.record("subscribe");
                tracing::debug!(error = %e, channel = %req.channel, "subscription token refused");
                Err(if e == AuthError::Expired {
                    ErrorCode::TokenExpired
                } else {
                    ErrorCode::PermissionDenied
                })
            }
        }
    }

    async fn subscribe(&mut self, id: u32, req: SubscribeRequest) {
        if !valid_channel(&req.channel) {
            return self.reply_error(id, ErrorCode::BadRequest);
        }
        if self.subs.contains(&req.channel) {
            return self.reply_error(id, ErrorCode::AlreadySubscribed);
        }
        if self.subs.len() >= self.max_subscriptions() {
            return self.reply_error(id, ErrorCode::LimitExceeded);
        }
        let now = unix_now();
        let grant = match self.authorize_subscribe(&req, now) {
            Ok(grant) => grant,
            Err(code) => {
                self.access.strike(self.shared.abuse_threshold);
                return self.reply_error(id, code);
            }
        };
        if let Decision::Limited { retry_after } = self.limit(Action::Subscribe, 1).await {
            return self.reply_limited(id, retry_after);
        }
        // Join the hub, then make sure the bus delivers here, then read the position: a
        // publication is either in the read or arrives live (duplicates drop by offset).
        self.subs.join(&req.channel);
        if let Err(e) = self.shared.bus.watch(&req.channel).await {
            tracing::warn!(error = %e, channel = %req.channel, "subscribe failed");
            self.subs.leave(&req.channel);
            return self.reply_error(id, ErrorCode::Internal);
        }
        let since = req.recover.then(|| Position {
            offset: req.offset,
            epoch: req.epoch.clone(),
        });
        if req.recover {
            metrics::counter!(m::RECOVERIES_ATTEMPTED).increment(1);
        }
        let recovery = match self.shared.bus.recover(&req.channel, since.as_ref()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, channel = %req.channel, "reading the channel position failed");
                if req.recover {
                    metrics::counter!(m::RECOVERIES_FAILED, "reason" => "error").increment(1);
                }
                self.subs.leave(&req.channel);
                return self.reply_error(id, ErrorCode::Internal);
            }
        };
        count_recovery(&recovery, req.recover);
        let position = &recovery.position;
        self.subs
            .set_place(&req.channel, position.offset, &position.epoch);
        // The bus only carries valid JSON, so nothing is filtered out here in practice.
        let publications = recovery
            .publications
            .iter()
            .filter_map(|(offset, data)| {
                let data: &serde_json::value::RawValue = serde_json::from_slice(data).ok()?;
                Some(PublicationOut {
                    data,
                    offset: *offset,
                })
            })
            .collect();
        let history = self
            .shared
            .bus
            .history()
            .for_channel(&req.channel)
            .enabled();
        let result = SubscribeResult {
            recoverable: history,
            epoch: &position.epoch,
            offset: position.offset,
            publications,
            was_recovering: req.recover,
            recovered: req.recover && recovery.recovered,
            positioned: history,
            expires: grant.is_some(),
            ttl: grant.map_or(0, |g| ttl(g.expires_at, now)),
        };
        self.replies.result(id, "subscribe", &result);
        match grant {
            Some(grant) => {
                let at = deadline(grant.expires_at, now, self.shared.policy.expiry_grace);
                self.access.grant(&req.channel, at);
            }
            // A grant left from an earlier subscription must not end this one.
            None => self.access.forget(&req.channel),
        }
    }

    fn unsubscribe(&mut self, id: u32, req: ChannelRequest) {
        if !valid_channel(&req.channel) {
            return self.reply_error(id, ErrorCode::BadRequest);
        }
        self.subs.leave(&req.channel);
        self.access.forget(&req.channel);
        self.replies.result(id, "unsubscribe", &Empty {});
    }

    async fn publish(&mut self, id: u32, req: ClientPublish) {
        if !valid_channel(&req.channel) {
            return self.reply_error(id, ErrorCode::BadRequest);
        }
        if !self
            .shared
            .policy
            .may_publish(self.access.identity(), &req.channel)
        {
            metrics::counter!(crate::metrics::AUTH_FAILURES, "token" => "publish", "reason" => "permission")
                .increment(1);
            self.access.strike(self.shared.abuse_threshold);
            return self.reply_error(id, ErrorCode::PermissionDenied);
        }
        let Some(data) = req.data else {
            return self.reply_error(id, ErrorCode::BadRequest);
        };
        if let Decision::Limited { retry_after } = self.limit(Action::Publish, 1).await {
            return self.reply_limited(id, retry_after);
        }
        let request = PublishRequest {
            channel: &req.channel,
            data: bytes::Bytes::copy_from_slice(data.get().as_bytes()),
            idempotency_key: None,
            fence: None,
            source: Source::Client,
            received_at: None,
        };
        match self.shared.bus.publish(request).await {
            Ok(_) => self.replies.result(id, "publish", &Empty {}),
            Err(e) => {
                tracing::warn!(error = %e, "client publish failed");
                self.reply_error(id, ErrorCode::Internal);
            }
        }
    }
}
