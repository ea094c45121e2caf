//! The one `Config`: every setting is a CLI flag and a `PGFANOUT_*` environment variable
//! of the same name, validated at start with errors that name the setting.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::bus::history::{ChannelHistory, HistoryPolicy, HistoryRule};
use crate::protocol;

#[cfg(test)]
mod tests;
mod validate;

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
