//! The one `Config`: every setting is a CLI flag and a `PGFANOUT_*` environment variable
//! of the same name, validated at start with errors that name the setting.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::bus::history::{ChannelHistory, HistoryPolicy, HistoryRule};
use crate::protocol;

/// pgfanout: PostgreSQL NOTIFY to every WebSocket client, through a Redis bus, on any node.
#[derive(Debug, Clone, Parser)]
#[command(name = "pgfanout", version, about, long_about = None)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address the HTTP and WebSocket server listens on.
    #[arg(long, env = "PGFANOUT_LISTEN", default_value = "0.0.0.0:8000")]
    pub listen: SocketAddr,

    /// Postgres connection for LISTEN. Must be a direct connection (LISTEN does not work
    /// through a transaction pooler). Unset: no ingest from Postgres.
    #[arg(long, env = "PGFANOUT_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Redis URL of the bus shared by all nodes. Unset: a single node on an in-memory bus.
    /// With PGFANOUT_REDIS_CLUSTER: the seed nodes of the Redis Cluster, comma-separated.
    #[arg(long, env = "PGFANOUT_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// PGFANOUT_REDIS_URL names a Redis Cluster (one or more seed nodes): keys go to their
    /// slot's master, live delivery uses sharded pub/sub (SSUBSCRIBE/SPUBLISH) and follows
    /// resharding and failover.
    #[arg(long, env = "PGFANOUT_REDIS_CLUSTER", default_value_t = false, action = clap::ArgAction::Set)]
    pub redis_cluster: bool,

    /// Comma-separated Postgres channels to LISTEN on.
    #[arg(
        long,
        env = "PGFANOUT_CHANNELS",
        value_delimiter = ',',
        default_value = ""
    )]
    pub channels: Vec<String>,

    /// Identity of this node in metrics, logs and leases [default: hostname-pid].
    #[arg(long, env = "PGFANOUT_NODE_ID")]
    pub node_id: Option<String>,

    /// Publications kept per channel for recovery (0 = no history, channels not recoverable).
    #[arg(long, env = "PGFANOUT_HISTORY_SIZE", default_value_t = 1000)]
    pub history_size: u32,

    /// How long history is kept after a channel's last publication.
    #[arg(long, env = "PGFANOUT_HISTORY_TTL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub history_ttl: Duration,

    /// History per channel pattern, overriding the size and TTL above: comma-separated
    /// `pattern=size[/ttl]`, first match wins, `*` matches any run of characters
    /// (e.g. `chat:*=100/1m,ticks:*=0`). Size 0: the channel keeps no history and is not
    /// recoverable.
    #[arg(
        long,
        env = "PGFANOUT_HISTORY_CHANNELS",
        value_delimiter = ',',
        default_value = ""
    )]
    pub history_channels: Vec<String>,

    /// `history_channels`, parsed by `validate`.
    #[arg(skip)]
    pub history_rules: Vec<HistoryRule>,

    /// Publications one recovery may return. A client that missed more gets
    /// `recovered: false` (and reloads its state) rather than a partial replay.
    #[arg(
        long,
        env = "PGFANOUT_RECOVERY_MAX_PUBLICATIONS",
        default_value_t = 1000
    )]
    pub recovery_max_publications: u32,

    /// How long a channel's offset and epoch outlive its last publication. When they expire
    /// the channel starts a new epoch and clients are told recovery failed.
    #[arg(long, env = "PGFANOUT_HISTORY_META_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub history_meta_ttl: Duration,

    /// Allow connections without a token. They (and every other connection) may then
    /// subscribe to PGFANOUT_ANONYMOUS_CHANNELS without a token.
    #[arg(long, env = "PGFANOUT_ALLOW_ANONYMOUS", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_anonymous: bool,

    /// Channel patterns anyone may subscribe to without a token, when
    /// PGFANOUT_ALLOW_ANONYMOUS is true (`*` any run of characters, e.g. `public.*`).
    #[arg(
        long,
        env = "PGFANOUT_ANONYMOUS_CHANNELS",
        value_delimiter = ',',
        default_value = "*"
    )]
    pub anonymous_channels: Vec<String>,

    /// Allow clients without a token to publish (on PGFANOUT_ANONYMOUS_PUBLISH_CHANNELS).
    #[arg(long, env = "PGFANOUT_ALLOW_ANONYMOUS_PUBLISH", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_anonymous_publish: bool,

    /// Channel patterns anyone may publish on, when PGFANOUT_ALLOW_ANONYMOUS_PUBLISH is true.
    #[arg(
        long,
        env = "PGFANOUT_ANONYMOUS_PUBLISH_CHANNELS",
        value_delimiter = ',',
        default_value = "*"
    )]
    pub anonymous_publish_channels: Vec<String>,

    /// HMAC secret that verifies HS256 tokens.
    #[arg(long, env = "PGFANOUT_TOKEN_HMAC_SECRET_KEY", hide_env_values = true)]
    pub token_hmac_secret_key: Option<String>,

    /// RSA public key that verifies RS256 tokens: PEM text or the path of a PEM file.
    #[arg(long, env = "PGFANOUT_TOKEN_RSA_PUBLIC_KEY", hide_env_values = true)]
    pub token_rsa_public_key: Option<String>,

    /// ECDSA P-256 public key that verifies ES256 tokens: PEM text or the path of a PEM file.
    #[arg(long, env = "PGFANOUT_TOKEN_ECDSA_PUBLIC_KEY", hide_env_values = true)]
    pub token_ecdsa_public_key: Option<String>,

    /// JWKS file whose keys verify tokens (chosen by `kid`); re-read when it changes.
    #[arg(long, env = "PGFANOUT_TOKEN_JWKS_FILE", default_value = "")]
    pub token_jwks_file: String,

    /// Required token audience (`aud`); empty: not checked.
    #[arg(long, env = "PGFANOUT_TOKEN_AUDIENCE", default_value = "")]
    pub token_audience: String,

    /// Required token issuer (`iss`); empty: not checked.
    #[arg(long, env = "PGFANOUT_TOKEN_ISSUER", default_value = "")]
    pub token_issuer: String,

    /// How long a connection or subscription may outlive its token's `exp` while the
    /// client refreshes it; then it is closed (3005) or unsubscribed (2501).
    #[arg(long, env = "PGFANOUT_TOKEN_EXPIRY_GRACE", default_value = "25s", value_parser = humantime::parse_duration)]
    pub token_expiry_grace: Duration,

    /// TOML file of limit tiers (`[tiers.<name>]` with the limits below, `default_tier`).
    /// Empty: only the default tier, from PGFANOUT_LIMIT_*.
    #[arg(long, env = "PGFANOUT_LIMITS_FILE", default_value = "")]
    pub limits_file: String,

    /// While Redis is unreachable: `local` (limits hold per node) or `refuse` (every
    /// limited action is refused).
    #[arg(long, env = "PGFANOUT_LIMITS_FALLBACK", value_enum, default_value_t = crate::limits::Fallback::Local)]
    pub limits_fallback: crate::limits::Fallback,

    /// A token claim whose string value is the subject of limits instead of `sub` (e.g.
    /// `tenant`, to limit a whole tenant); empty: `sub`.
    #[arg(long, env = "PGFANOUT_LIMITS_SUBJECT_CLAIM", default_value = "")]
    pub limits_subject_claim: String,

    /// Limited (111) or denied (103, 109 on connect) commands one connection may get within
    /// 10 s before it is closed with 3013 (too many requests); 0: never.
    #[arg(long, env = "PGFANOUT_LIMITS_ABUSE_THRESHOLD", default_value_t = 50)]
    pub limits_abuse_threshold: u32,

    /// Default tier: connects per second per subject (0: unlimited).
    #[arg(long, env = "PGFANOUT_LIMIT_CONNECT_PER_SECOND", default_value_t = 0)]
    pub limit_connect_per_second: u64,

    /// Default tier: concurrent connections per subject, across all nodes (0: unlimited).
    #[arg(long, env = "PGFANOUT_LIMIT_CONNECTIONS_PER_USER", default_value_t = 0)]
    pub limit_connections_per_user: u64,

    /// Default tier: subscribes per second per subject (0: unlimited).
    #[arg(long, env = "PGFANOUT_LIMIT_SUBSCRIBE_PER_SECOND", default_value_t = 0)]
    pub limit_subscribe_per_second: u64,

    /// Default tier: client publishes per second per subject (0: unlimited).
    #[arg(long, env = "PGFANOUT_LIMIT_PUBLISH_PER_SECOND", default_value_t = 0)]
    pub limit_publish_per_second: u64,

    /// Default tier: inbound WebSocket bytes per second per subject (0: unlimited).
    #[arg(
        long,
        env = "PGFANOUT_LIMIT_INBOUND_BYTES_PER_SECOND",
        default_value_t = 0
    )]
    pub limit_inbound_bytes_per_second: u64,

    /// Publications per second per API key on POST /api/publish (0: unlimited).
    #[arg(
        long,
        env = "PGFANOUT_LIMIT_API_PUBLISH_PER_SECOND",
        default_value_t = 0
    )]
    pub limit_api_publish_per_second: u64,

    /// The header that carries the client's address behind a proxy (e.g.
    /// `x-forwarded-for`, first address taken); empty: the TCP peer. Only set it when every
    /// request passes a proxy that sets it: clients can forge it otherwise.
    #[arg(long, env = "PGFANOUT_CLIENT_IP_HEADER", default_value = "")]
    pub client_ip_header: String,

    /// API keys of POST /api/publish (comma-separated); empty: the API refuses every request.
    #[arg(
        long,
        env = "PGFANOUT_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,

    /// Largest body POST /api/publish accepts (413 past it).
    #[arg(long, env = "PGFANOUT_API_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub api_max_body_bytes: usize,

    /// Browser origins allowed to open a WebSocket (comma-separated patterns, e.g.
    /// `https://app.example.com,https://*.example.org`); empty: no origin check. Requests
    /// without an Origin header (non-browser clients) are not affected.
    #[arg(
        long,
        env = "PGFANOUT_ALLOWED_ORIGINS",
        value_delimiter = ',',
        default_value = ""
    )]
    pub allowed_origins: Vec<String>,

    /// Largest inbound WebSocket message, in bytes; a larger one closes the connection (3501).
    #[arg(long, env = "PGFANOUT_MAX_FRAME_BYTES", default_value_t = 65536)]
    pub max_frame_bytes: usize,

    /// Outbound messages queued per connection; a client that lets it fill is cut as slow (3008).
    #[arg(long, env = "PGFANOUT_CLIENT_QUEUE_SIZE", default_value_t = 1024)]
    pub client_queue_size: usize,

    /// Subscriptions one connection may hold (error 106 past it).
    #[arg(long, env = "PGFANOUT_MAX_SUBSCRIPTIONS", default_value_t = 1000)]
    pub max_subscriptions: usize,

    /// Period of server pings.
    #[arg(long, env = "PGFANOUT_PING_INTERVAL", default_value = "25s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// How long a client has to answer a ping before it is cut (3012).
    #[arg(long, env = "PGFANOUT_PONG_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub pong_timeout: Duration,

    /// How long a client has to send `connect` after the upgrade (3502 past it); also how
    /// long a TCP connection may take to send its HTTP request, or idle between requests,
    /// before it is closed.
    #[arg(long, env = "PGFANOUT_CONNECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Kernel send buffer (SO_SNDBUF) of each client connection in bytes; 0 leaves the
    /// kernel's autotuning (up to net.ipv4.tcp_wmem's maximum). A cap bounds the kernel
    /// memory a client that stops reading can pin, and lets the slow-consumer cut (3008)
    /// come sooner.
    #[arg(long, env = "PGFANOUT_SEND_BUFFER_BYTES", default_value_t = 0)]
    pub send_buffer_bytes: u32,

    /// TTL of the channel-shard leases (and node heartbeats) in Redis; renewed every third
    /// of it. A dead owner's shards move after at most about this long.
    #[arg(long, env = "PGFANOUT_LEASE_TTL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub lease_ttl: Duration,

    /// Channel shards: each is bridged into the bus by one node at a time (a lease), and the
    /// shards are spread over the live nodes. All nodes must use the same value.
    #[arg(long, env = "PGFANOUT_INGEST_SHARDS", default_value_t = 16)]
    pub ingest_shards: usize,

    /// Bytes of notifications each shard's buffer keeps on a standby, so it can republish
    /// what a dying owner had not bridged; must cover a lease TTL of traffic.
    #[arg(long, env = "PGFANOUT_INGEST_BUFFER_BYTES", default_value_t = 4 << 20)]
    pub ingest_buffer_bytes: usize,

    /// Install or upgrade the `pgfanout` schema (outbox, `pgfanout.publish`,
    /// `pgfanout.track_table`) at start. Off: the schema must be there already for the
    /// outbox to run (`pgfanout migrate`); a newer schema than this binary's is refused
    /// either way.
    #[arg(long, env = "PGFANOUT_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,

    /// How often the outbox is swept when no wake-up notification arrives.
    #[arg(long, env = "PGFANOUT_OUTBOX_POLL", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub outbox_poll: Duration,

    /// Outbox claimers per node, each with its own Postgres connection: how many partitions
    /// a node publishes at once.
    #[arg(long, env = "PGFANOUT_OUTBOX_WORKERS", default_value_t = 4)]
    pub outbox_workers: usize,

    /// Outbox rows published per transaction.
    #[arg(long, env = "PGFANOUT_OUTBOX_BATCH", default_value_t = 500)]
    pub outbox_batch: u32,

    /// Largest event `pgfanout.publish()` accepts (bytes of its JSON text); written into
    /// `pgfanout.settings` by migrations.
    #[arg(long, env = "PGFANOUT_OUTBOX_MAX_EVENT_BYTES", default_value_t = 1 << 20)]
    pub outbox_max_event_bytes: u32,

    /// On SIGTERM, client disconnects are spread over this window.
    #[arg(long, env = "PGFANOUT_DRAIN_WINDOW", default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_window: Duration,

    /// Hard limit from SIGTERM to exit.
    #[arg(long, env = "PGFANOUT_SHUTDOWN_GRACE", default_value = "25s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Log format.
    #[arg(long, env = "PGFANOUT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// Log filter, in the syntax of RUST_LOG (e.g. `info,pgfanout=debug`).
    #[arg(long, env = "PGFANOUT_LOG", default_value = "info")]
    pub log: String,

    /// Serve the live-table demo page at /demo/ and let anyone change its table through it
    /// (never in production). Creates the table `pgfanout_demo` and LISTENs on its channel;
    /// needs PGFANOUT_DATABASE_URL, and PGFANOUT_TOKEN_HMAC_SECRET_KEY (the page gets tokens
    /// signed with it) or anonymous access to the channel.
    #[arg(long, env = "PGFANOUT_DEMO", default_value_t = false, action = clap::ArgAction::Set)]
    pub demo: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

/// A setting with a value that parses but cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid {env} (--{flag}): {reason}")]
pub struct ConfigError {
    pub env: &'static str,
    pub flag: &'static str,
    pub reason: String,
}

fn invalid(env: &'static str, flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        env,
        flag,
        reason: reason.into(),
    }
}

/// What the binary does besides running a node.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Install or upgrade the `pgfanout` schema in PGFANOUT_DATABASE_URL, then exit.
    Migrate,
}

/// Postgres truncates identifiers (and so channel names) longer than this.
const MAX_PG_IDENTIFIER: usize = 63;

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

    /// History size and TTL per channel, and the recovery cap.
    pub fn history_policy(&self) -> HistoryPolicy {
        HistoryPolicy {
            default: ChannelHistory {
                size: self.history_size,
                ttl: self.history_ttl,
            },
            rules: self.history_rules.clone(),
            meta_ttl: self.history_meta_ttl,
            recovery_max: self.recovery_max_publications,
        }
    }

    /// Token key material as configured.
    pub fn key_sources(&self) -> crate::auth::KeySources {
        crate::auth::KeySources {
            hmac_secret: self.token_hmac_secret_key.clone(),
            rsa_public_key: self.token_rsa_public_key.clone(),
            ecdsa_public_key: self.token_ecdsa_public_key.clone(),
            jwks_file: non_empty(&self.token_jwks_file).map(std::path::PathBuf::from),
        }
    }

    /// What clients may do without a token, and the origin check.
    pub fn policy(&self) -> crate::auth::Policy {
        use crate::auth::Patterns;
        crate::auth::Policy {
            allow_anonymous: self.allow_anonymous,
            anonymous_channels: Patterns::compile(&self.anonymous_channels, None),
            allow_anonymous_publish: self.allow_anonymous_publish,
            anonymous_publish_channels: Patterns::compile(&self.anonymous_publish_channels, None),
            allowed_origins: Patterns::compile(&self.allowed_origins, None),
            expiry_grace: self.token_expiry_grace,
        }
    }

    /// Token rules besides the keys.
    pub fn token_rules(&self) -> crate::auth::TokenRules {
        crate::auth::TokenRules {
            audience: non_empty(&self.token_audience),
            issuer: non_empty(&self.token_issuer),
            subject_claim: non_empty(&self.limits_subject_claim),
        }
    }

    /// Socket options and request deadline of accepted client connections.
    pub fn socket_options(&self) -> crate::conn::SocketOptions {
        crate::conn::SocketOptions {
            request_timeout: self.connect_timeout,
            send_buffer: self.send_buffer_bytes,
        }
    }

    /// The header naming the client's address, if configured.
    pub fn client_ip_header(&self) -> Option<axum::http::HeaderName> {
        non_empty(&self.client_ip_header)
            .and_then(|h| axum::http::HeaderName::from_bytes(h.as_bytes()).ok())
    }

    /// The limit tiers: the default one from PGFANOUT_LIMIT_*, more from the file.
    ///
    /// # Errors
    /// The tiers file cannot be read or parsed.
    pub fn tiers(&self) -> Result<crate::limits::Tiers, crate::limits::TiersError> {
        let env = crate::limits::Tier {
            connect_per_second: self.limit_connect_per_second,
            connections_per_user: self.limit_connections_per_user,
            subscribe_per_second: self.limit_subscribe_per_second,
            publish_per_second: self.limit_publish_per_second,
            inbound_bytes_per_second: self.limit_inbound_bytes_per_second,
            ..Default::default()
        };
        let path = non_empty(&self.limits_file).map(std::path::PathBuf::from);
        crate::limits::Tiers::load(env, path.as_deref())
    }

    /// The node id (always set after `validate`).
    pub fn node_id(&self) -> &str {
        self.node_id.as_deref().unwrap_or("pgfanout")
    }
}

/// An optional setting given as a string: empty means unset (the chart renders every
/// setting, so "unset" arrives as an empty value).
fn non_empty(value: &str) -> Option<String> {
    let value = value.trim();
    (!value.is_empty()).then(|| value.to_owned())
}

fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "pgfanout".to_owned());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["pgfanout"];
        argv.extend_from_slice(args);
        Config::try_parse_from(argv).expect("parses").validate()
    }

    #[test]
    fn defaults_are_valid_and_fill_the_node_id() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.port(), 8000);
        assert_eq!(c.max_frame_bytes, 65536);
        assert!(!c.allow_anonymous, "anonymous access is opt-in");
        assert_eq!(c.anonymous_channels, vec!["*"]);
        assert!(c.key_sources().is_empty());
        assert!(c.node_id().contains('-'));
    }

    #[test]
    fn errors_name_the_setting() {
        let e = parse(&["--max-frame-bytes", "10"]).unwrap_err();
        assert!(e.to_string().contains("PGFANOUT_MAX_FRAME_BYTES"), "{e}");
        let e = parse(&["--channels", "orders"]).unwrap_err();
        assert!(e.to_string().contains("PGFANOUT_DATABASE_URL"), "{e}");
        let e = parse(&[
            "--channels",
            "bad name",
            "--database-url",
            "postgres://x@localhost/db",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("PGFANOUT_CHANNELS"), "{e}");
        let e = parse(&["--redis-url", "nonsense://"]).unwrap_err();
        assert!(e.to_string().contains("PGFANOUT_REDIS_URL"), "{e}");
    }

    #[test]
    fn history_rules_are_parsed_and_checked() {
        let c = parse(&[
            "--history-channels",
            "chat:*=100/1m,ticks:*=0",
            "--recovery-max-publications",
            "50",
        ])
        .unwrap();
        let policy = c.history_policy();
        assert_eq!(policy.for_channel("chat:1").size, 100);
        assert!(!policy.for_channel("ticks:eu").enabled());
        assert_eq!(policy.for_channel("orders").size, 1000);
        assert_eq!(policy.recovery_max, 50);
        let e = parse(&["--history-channels", "a=1/48h"]).unwrap_err();
        assert!(e.to_string().contains("PGFANOUT_HISTORY_META_TTL"), "{e}");
        let e = parse(&["--history-channels", "a=2000000"]).unwrap_err();
        assert!(e.to_string().contains("PGFANOUT_HISTORY_CHANNELS"), "{e}");
        let e = parse(&["--recovery-max-publications", "0"]).unwrap_err();
        assert!(
            e.to_string().contains("PGFANOUT_RECOVERY_MAX_PUBLICATIONS"),
            "{e}"
        );
        let e = parse(&["--history-channels", "nonsense"]).unwrap_err();
        assert!(e.to_string().contains("PGFANOUT_HISTORY_CHANNELS"), "{e}");
        assert!(parse(&["--history-channels", ""])
            .unwrap()
            .history_rules
            .is_empty());
    }

    #[test]
    fn channels_are_split_and_trimmed() {
        let c = parse(&[
            "--channels",
            "orders, events,",
            "--database-url",
            "postgres://x@localhost/db",
        ])
        .unwrap();
        assert_eq!(c.channels, vec!["orders", "events"]);
    }

    #[test]
    fn a_redis_cluster_is_named_by_its_seed_urls() {
        let c = parse(&[
            "--redis-cluster",
            "true",
            "--redis-url",
            "redis://a:7000, redis://b:7001",
        ])
        .unwrap();
        assert!(c.redis_cluster);
        let e = parse(&["--redis-cluster", "true"]).unwrap_err();
        assert!(e.to_string().contains("PGFANOUT_REDIS_CLUSTER"), "{e}");
        let e = parse(&["--redis-cluster", "true", "--redis-url", " , "]).unwrap_err();
        assert!(e.to_string().contains("PGFANOUT_REDIS_URL"), "{e}");
        let e = parse(&["--redis-cluster", "true", "--redis-url", "redis://a:1,nope"]).unwrap_err();
        assert!(e.to_string().contains("PGFANOUT_REDIS_URL"), "{e}");
        // Without the flag a comma is just part of one (invalid) URL.
        assert!(parse(&["--redis-url", "redis://a:1,redis://b:2"]).is_err());
    }

    #[test]
    fn the_demo_is_off_by_default_and_needs_a_database() {
        let c = parse(&[]).unwrap();
        assert!(!c.demo);
        let e = parse(&["--demo", "true"]).unwrap_err();
        assert!(e.to_string().contains("PGFANOUT_DATABASE_URL"), "{e}");
    }

    #[test]
    fn the_demo_needs_a_way_for_its_page_to_connect() {
        let db = "postgres://x@localhost/db";
        let e = parse(&["--demo", "true", "--database-url", db]).unwrap_err();
        assert!(
            e.to_string().contains("PGFANOUT_TOKEN_HMAC_SECRET_KEY"),
            "{e}"
        );
        let only_public = [
            "--demo",
            "true",
            "--database-url",
            db,
            "--allow-anonymous",
            "true",
            "--anonymous-channels",
            "public.*",
        ];
        assert!(parse(&only_public).is_err());
        let secret = "0123456789abcdef0123";
        let signed = [
            "--demo",
            "true",
            "--database-url",
            db,
            "--token-hmac-secret-key",
            secret,
        ];
        assert!(parse(&signed).is_ok());
        let open = [
            "--demo",
            "true",
            "--database-url",
            db,
            "--allow-anonymous",
            "true",
        ];
        assert!(parse(&open).is_ok());
    }

    #[test]
    fn the_demo_listens_on_its_channel_once() {
        let db = "postgres://x@localhost/db";
        let c = parse(&[
            "--demo",
            "true",
            "--database-url",
            db,
            "--allow-anonymous",
            "true",
            "--channels",
            "orders",
        ])
        .unwrap();
        assert_eq!(c.channels, vec!["orders", crate::demo::CHANNEL]);
        let both = format!("orders,{}", crate::demo::CHANNEL);
        let c = parse(&[
            "--demo",
            "true",
            "--database-url",
            db,
            "--allow-anonymous",
            "true",
            "--channels",
            &both,
        ])
        .unwrap();
        assert_eq!(c.channels, vec!["orders", crate::demo::CHANNEL]);
    }
}
