//! Checks of what clap cannot check: ranges and relations between settings.

use super::*;

impl Config {
    /// Checks what clap cannot: ranges and relations between settings. Fills the node id.
    ///
    /// # Errors
    /// The first invalid setting, named by its environment variable and flag.
    pub fn validate(mut self) -> Result<Self, ConfigError> {
        for list in [
            &mut self.api_keys,
            &mut self.anonymous_channels,
            &mut self.anonymous_publish_channels,
            &mut self.allowed_origins,
        ] {
            list.retain(|p| !p.trim().is_empty());
            for p in list.iter_mut() {
                *p = p.trim().to_owned();
            }
        }
        for key in [
            &mut self.token_hmac_secret_key,
            &mut self.token_rsa_public_key,
            &mut self.token_ecdsa_public_key,
        ] {
            if key.as_deref().is_some_and(|k| k.trim().is_empty()) {
                *key = None;
            }
        }
        if self
            .token_hmac_secret_key
            .as_deref()
            .is_some_and(|k| k.len() < 16)
        {
            return Err(invalid(
                "PGFANOUT_TOKEN_HMAC_SECRET_KEY",
                "token-hmac-secret-key",
                "must be at least 16 bytes",
            ));
        }
        if self.api_keys.iter().any(|k| k.len() < 16) {
            return Err(invalid(
                "PGFANOUT_API_KEYS",
                "api-keys",
                "every key must be at least 16 characters",
            ));
        }
        if !(256..=64 * 1024 * 1024).contains(&self.api_max_body_bytes) {
            return Err(invalid(
                "PGFANOUT_API_MAX_BODY_BYTES",
                "api-max-body-bytes",
                "must be between 256 and 67108864",
            ));
        }
        if let Some(h) = non_empty(&self.client_ip_header) {
            if axum::http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(invalid(
                    "PGFANOUT_CLIENT_IP_HEADER",
                    "client-ip-header",
                    "not a valid header name",
                ));
            }
        }
        if self.token_expiry_grace > Duration::from_secs(3600) {
            return Err(invalid(
                "PGFANOUT_TOKEN_EXPIRY_GRACE",
                "token-expiry-grace",
                "must be at most 1h",
            ));
        }
        self.channels.retain(|c| !c.trim().is_empty());
        for c in &mut self.channels {
            *c = c.trim().to_owned();
            if c.len() > MAX_PG_IDENTIFIER || !protocol::valid_channel(c) {
                return Err(invalid(
                    "PGFANOUT_CHANNELS",
                    "channels",
                    format!("{c:?} is not a valid channel (1..=63 bytes, no whitespace or control characters)"),
                ));
            }
        }
        if self.demo {
            if self.database_url.is_none() {
                return Err(invalid(
                    "PGFANOUT_DATABASE_URL",
                    "database-url",
                    "required when PGFANOUT_DEMO is true",
                ));
            }
            if !self.channels.iter().any(|c| c == crate::demo::CHANNEL) {
                self.channels.push(crate::demo::CHANNEL.to_owned());
            }
            let anonymous = self.allow_anonymous
                && crate::auth::Patterns::compile(&self.anonymous_channels, None)
                    .allows(crate::demo::CHANNEL);
            if !anonymous && self.token_hmac_secret_key.is_none() {
                return Err(invalid(
                    "PGFANOUT_DEMO",
                    "demo",
                    "the demo page needs PGFANOUT_TOKEN_HMAC_SECRET_KEY (the demo signs its \
                     tokens with it) or PGFANOUT_ALLOW_ANONYMOUS=true with pgfanout_demo in \
                     PGFANOUT_ANONYMOUS_CHANNELS",
                ));
            }
        }
        if !self.channels.is_empty() && self.database_url.is_none() {
            return Err(invalid(
                "PGFANOUT_DATABASE_URL",
                "database-url",
                "required when PGFANOUT_CHANNELS is set",
            ));
        }
        if let Some(url) = &self.database_url {
            url.parse::<tokio_postgres::Config>()
                .map_err(|e| invalid("PGFANOUT_DATABASE_URL", "database-url", e.to_string()))?;
        }
        if let Some(url) = &self.redis_url {
            let urls = if self.redis_cluster {
                crate::bus::connection::seeds(url)
            } else {
                vec![url.clone()]
            };
            if urls.is_empty() {
                return Err(invalid("PGFANOUT_REDIS_URL", "redis-url", "no seed URL"));
            }
            for url in urls {
                redis::Client::open(url.as_str())
                    .map_err(|e| invalid("PGFANOUT_REDIS_URL", "redis-url", e.to_string()))?;
            }
        } else if self.redis_cluster {
            return Err(invalid(
                "PGFANOUT_REDIS_CLUSTER",
                "redis-cluster",
                "needs PGFANOUT_REDIS_URL (the seed nodes)",
            ));
        }
        if !(256..=16 * 1024 * 1024).contains(&self.max_frame_bytes) {
            return Err(invalid(
                "PGFANOUT_MAX_FRAME_BYTES",
                "max-frame-bytes",
                "must be between 256 and 16777216",
            ));
        }
        if !(1..=1_000_000).contains(&self.client_queue_size) {
            return Err(invalid(
                "PGFANOUT_CLIENT_QUEUE_SIZE",
                "client-queue-size",
                "must be between 1 and 1000000",
            ));
        }
        if self.max_subscriptions == 0 {
            return Err(invalid(
                "PGFANOUT_MAX_SUBSCRIPTIONS",
                "max-subscriptions",
                "must be at least 1",
            ));
        }
        self.validate_history()?;
        if self.ping_interval < Duration::from_secs(1) {
            return Err(invalid(
                "PGFANOUT_PING_INTERVAL",
                "ping-interval",
                "must be at least 1s",
            ));
        }
        if self.pong_timeout.is_zero() || self.pong_timeout >= self.ping_interval * 4 {
            return Err(invalid(
                "PGFANOUT_PONG_TIMEOUT",
                "pong-timeout",
                "must be above 0 and below 4 ping intervals",
            ));
        }
        if self.send_buffer_bytes != 0
            && !(4096..=64 * 1024 * 1024).contains(&self.send_buffer_bytes)
        {
            return Err(invalid(
                "PGFANOUT_SEND_BUFFER_BYTES",
                "send-buffer-bytes",
                "must be 0 (kernel default) or between 4096 and 67108864",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(invalid(
                "PGFANOUT_CONNECT_TIMEOUT",
                "connect-timeout",
                "must be above 0",
            ));
        }
        if self.lease_ttl < Duration::from_millis(300) {
            return Err(invalid(
                "PGFANOUT_LEASE_TTL",
                "lease-ttl",
                "must be at least 300ms",
            ));
        }
        if self.outbox_poll.is_zero() {
            return Err(invalid(
                "PGFANOUT_OUTBOX_POLL",
                "outbox-poll",
                "must be above 0",
            ));
        }
        if !(1..=64).contains(&self.outbox_workers) {
            return Err(invalid(
                "PGFANOUT_OUTBOX_WORKERS",
                "outbox-workers",
                "must be between 1 and 64",
            ));
        }
        if !(1..=10_000).contains(&self.outbox_batch) {
            return Err(invalid(
                "PGFANOUT_OUTBOX_BATCH",
                "outbox-batch",
                "must be between 1 and 10000",
            ));
        }
        if self.outbox_max_event_bytes == 0 || self.outbox_max_event_bytes > i32::MAX as u32 {
            return Err(invalid(
                "PGFANOUT_OUTBOX_MAX_EVENT_BYTES",
                "outbox-max-event-bytes",
                "must be between 1 and 2147483647",
            ));
        }
        if !(1..=1024).contains(&self.ingest_shards) {
            return Err(invalid(
                "PGFANOUT_INGEST_SHARDS",
                "ingest-shards",
                "must be between 1 and 1024",
            ));
        }
        if self.ingest_buffer_bytes < 64 << 10 {
            return Err(invalid(
                "PGFANOUT_INGEST_BUFFER_BYTES",
                "ingest-buffer-bytes",
                "must be at least 65536",
            ));
        }
        if self.drain_window >= self.shutdown_grace {
            return Err(invalid(
                "PGFANOUT_DRAIN_WINDOW",
                "drain-window",
                "must be shorter than PGFANOUT_SHUTDOWN_GRACE",
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log) {
            return Err(invalid("PGFANOUT_LOG", "log", e.to_string()));
        }
        match &self.node_id {
            Some(id) if id.trim().is_empty() || id.len() > 128 => {
                return Err(invalid(
                    "PGFANOUT_NODE_ID",
                    "node-id",
                    "must be 1..=128 bytes",
                ));
            }
            Some(_) => {}
            None => self.node_id = Some(default_node_id()),
        }
        Ok(self)
    }

    fn validate_history(&mut self) -> Result<(), ConfigError> {
        const MAX_SIZE: u32 = 1_000_000;
        self.history_rules = self
            .history_channels
            .iter()
            .filter(|rule| !rule.trim().is_empty())
            .map(|rule| rule.parse::<HistoryRule>())
            .collect::<Result<_, _>>()
            .map_err(|e| {
                invalid(
                    "PGFANOUT_HISTORY_CHANNELS",
                    "history-channels",
                    e.to_string(),
                )
            })?;
        if self.history_size > MAX_SIZE {
            return Err(invalid(
                "PGFANOUT_HISTORY_SIZE",
                "history-size",
                "must be at most 1000000",
            ));
        }
        if self.history_size > 0 && self.history_ttl < Duration::from_secs(1) {
            return Err(invalid(
                "PGFANOUT_HISTORY_TTL",
                "history-ttl",
                "must be at least 1s when history is on",
            ));
        }
        for rule in &self.history_rules {
            let bad = |reason: &str| {
                invalid(
                    "PGFANOUT_HISTORY_CHANNELS",
                    "history-channels",
                    format!("{}: {reason}", rule.pattern),
                )
            };
            if rule.size > MAX_SIZE {
                return Err(bad("size must be at most 1000000"));
            }
            if rule.size > 0 && rule.ttl.is_some_and(|t| t < Duration::from_secs(1)) {
                return Err(bad("ttl must be at least 1s when history is on"));
            }
        }
        if self.history_meta_ttl < self.history_policy().longest_ttl() {
            return Err(invalid(
                "PGFANOUT_HISTORY_META_TTL",
                "history-meta-ttl",
                "must not be shorter than PGFANOUT_HISTORY_TTL or any TTL in PGFANOUT_HISTORY_CHANNELS",
            ));
        }
        if !(1..=MAX_SIZE).contains(&self.recovery_max_publications) {
            return Err(invalid(
                "PGFANOUT_RECOVERY_MAX_PUBLICATIONS",
                "recovery-max-publications",
                "must be between 1 and 1000000",
            ));
        }
        Ok(())
    }
}
