//! Scenarios: what a run does, read from a TOML file (`[defaults]` then `[[scenario]]`
//! tables that override them). One scenario opens its connections once and then runs
//! one measured step per entry of `rates`.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Deserializer, Serialize};

/// How publications enter the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PublishMode {
    /// No publishing (idle memory, churn).
    None,
    /// `SELECT pg_notify(channel, payload)`, `batch` notifications per transaction.
    Notify,
    /// `SELECT pgfanout.publish(channel, data)` (the outbox), `batch` per transaction.
    Outbox,
    /// `POST /api/publish`, `batch` publications per request.
    Api,
    /// A client `publish` command over its own WebSocket, `batch` commands per frame.
    Client,
}

/// What the clients speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// pgfanout's: the Centrifugo client protocol v2, JSON.
    Centrifugo,
    /// Socket.IO v4 over a WebSocket (Engine.IO 4), for the baseline in
    /// `loadtest/baselines/socketio`: `subscribe` events with an ack, `pub` events.
    Socketio,
    /// Nchan (`loadtest/baselines/nchan`): the channels are in the URL (`urls` end in
    /// `/sub/`, the tool appends `<a>,<b>`), each message is one text frame holding the
    /// bare payload; `api_urls` end in `/pub/` and take one publication per POST.
    Nchan,
}

/// How connections pick their channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Distribution {
    /// Connection i subscribes channels i, i+1, ... (mod K): equal subscribers per channel.
    Uniform,
    /// Zipf-like (s = 1): channel 0 is the most popular.
    Skewed,
}

/// One scenario, fully resolved (defaults applied).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// WebSocket URLs of the nodes; connections go round-robin.
    pub urls: Vec<String>,
    /// Use only the first this many of `urls` and `api_urls` (0: all), e.g. 1 to load
    /// one node.
    pub nodes: usize,
    pub protocol: Protocol,
    /// Client connections to open.
    pub connections: usize,
    /// New connections per second while opening (0: all at once).
    pub ramp: f64,
    /// Channels `<prefix>0` .. `<prefix>K-1`.
    pub channels: u32,
    pub channel_prefix: String,
    /// Channels each connection subscribes to.
    pub subs_per_conn: u32,
    pub distribution: Distribution,
    pub publish: PublishMode,
    /// Publications per transaction / request / frame at most (what is due each
    /// millisecond goes out at once, in batches up to this size).
    pub batch: usize,
    /// Concurrent publishers (database connections, HTTP requests in flight, sockets).
    pub publishers: usize,
    /// Publications per second of each step (all channels together).
    pub rates: Vec<f64>,
    /// Length of each step's publishing.
    #[serde(with = "duration_str")]
    pub duration: Duration,
    /// Publications per step at most (0: bounded by `duration` only).
    pub messages: u64,
    /// Approximate size of each payload in bytes.
    pub payload_bytes: usize,
    /// Wait after a step's publishing for late deliveries before counting.
    #[serde(with = "duration_str")]
    pub settle: Duration,
    /// Wait with the connections open and idle before the first step (idle memory).
    #[serde(with = "duration_str")]
    pub hold: Duration,
    /// How long one connection may take to connect and subscribe.
    #[serde(with = "duration_str")]
    pub connect_timeout: Duration,
    /// Spread connections over this many source addresses 127.0.0.1.. (loopback targets
    /// only), so more than one address's worth of ephemeral ports can be used.
    pub source_addrs: u8,
    /// Client connections per worker process at most; more are spread over workers.
    pub conns_per_worker: usize,
    /// Client threads per process.
    pub client_threads: usize,
    /// Postgres URL (notify and outbox modes).
    pub database_url: String,
    /// `POST /api/publish` URLs (api mode), round-robin.
    pub api_urls: Vec<String>,
    pub api_key: String,
    /// Set by the runner for each run (not in files): payloads carry it, and clients
    /// ignore publications of other runs.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub run: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            name: String::new(),
            urls: vec!["ws://127.0.0.1:8000/connection/websocket".into()],
            nodes: 0,
            protocol: Protocol::Centrifugo,
            connections: 100,
            ramp: 1000.0,
            channels: 1,
            channel_prefix: "bench".into(),
            subs_per_conn: 1,
            distribution: Distribution::Uniform,
            publish: PublishMode::None,
            batch: 1,
            publishers: 4,
            rates: vec![],
            duration: Duration::from_secs(5),
            messages: 0,
            payload_bytes: 100,
            settle: Duration::from_secs(1),
            hold: Duration::ZERO,
            connect_timeout: Duration::from_secs(20),
            source_addrs: 1,
            conns_per_worker: 18_000,
            client_threads: 1,
            database_url: String::new(),
            api_urls: vec![],
            api_key: String::new(),
            run: 0,
        }
    }
}

impl Scenario {
    pub fn channel_name(&self, channel: u32) -> String {
        format!("{}{}", self.channel_prefix, channel)
    }

    /// The channels connection `conn` subscribes to (deterministic, so every process
    /// agrees without talking).
    pub fn subscriptions(&self, conn: usize) -> Vec<u32> {
        let k = self.channels.max(1);
        let n = self.subs_per_conn.clamp(1, k);
        match self.distribution {
            Distribution::Uniform => (0..n)
                .map(|j| ((conn as u64 * u64::from(n) + u64::from(j)) % u64::from(k)) as u32)
                .collect(),
            Distribution::Skewed => {
                let mut picked = Vec::with_capacity(n as usize);
                let mut state = (conn as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                while picked.len() < n as usize {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let c = zipf(k, (state >> 11) as f64 / (1u64 << 53) as f64);
                    if !picked.contains(&c) {
                        picked.push(c);
                    }
                }
                picked
            }
        }
    }

    /// The source address of connection `conn`, when spreading is on.
    pub fn source_addr(&self, conn: usize) -> Option<Ipv4Addr> {
        (self.source_addrs > 1)
            .then(|| Ipv4Addr::new(127, 0, 0, 1 + (conn % usize::from(self.source_addrs)) as u8))
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.name.is_empty() {
            bail!("a scenario needs a name");
        }
        if self.urls.is_empty() {
            bail!("{}: no urls", self.name);
        }
        if self.publish != PublishMode::None && self.rates.is_empty() {
            bail!(
                "{}: publish is {:?} but rates is empty",
                self.name,
                self.publish
            );
        }
        if self.publish == PublishMode::Api && (self.api_urls.is_empty() || self.api_key.is_empty())
        {
            bail!("{}: api mode needs api_urls and api_key", self.name);
        }
        if matches!(self.publish, PublishMode::Notify | PublishMode::Outbox)
            && self.database_url.is_empty()
        {
            bail!("{}: {:?} mode needs database_url", self.name, self.publish);
        }
        if self.batch == 0
            || self.publishers == 0
            || self.client_threads == 0
            || self.conns_per_worker == 0
        {
            bail!(
                "{}: batch, publishers, client_threads and conns_per_worker must be > 0",
                self.name
            );
        }
        if self.source_addrs == 0 {
            bail!("{}: source_addrs must be >= 1", self.name);
        }
        Ok(())
    }
}

/// Inverse CDF of a Zipf(s = 1) distribution over `k` items, approximated continuously.
fn zipf(k: u32, u: f64) -> u32 {
    // CDF(x) ~ ln(1 + x) / ln(1 + k) for x in [0, k).
    let x = ((1.0 + f64::from(k)).ln() * u).exp() - 1.0;
    (x as u32).min(k - 1)
}

/// The file: `[defaults]` (any scenario key) and `[[scenario]]` entries.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    defaults: toml::Table,
    #[serde(default)]
    scenario: Vec<toml::Table>,
}

/// Reads a scenario file; `overrides` (key = TOML value) apply to every scenario, after
/// the file's defaults.
pub fn load(text: &str, overrides: &[(String, toml::Value)]) -> anyhow::Result<Vec<Scenario>> {
    let file: File = toml::from_str(text).context("scenario file")?;
    let mut out = Vec::new();
    for table in file.scenario {
        let mut merged = toml::Table::try_from(Scenario::default()).context("defaults")?;
        merged.extend(file.defaults.clone());
        merged.extend(table);
        for (k, v) in overrides {
            merged.insert(k.clone(), v.clone());
        }
        let mut scenario: Scenario = merged.try_into().context("scenario")?;
        if scenario.nodes > 0 {
            scenario.urls.truncate(scenario.nodes);
            scenario.api_urls.truncate(scenario.nodes);
        }
        scenario.validate()?;
        out.push(scenario);
    }
    Ok(out)
}

/// Durations as humantime strings ("5s", "250ms").
mod duration_str {
    use super::*;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_then_scenario_then_overrides() {
        let text = r#"
            [defaults]
            connections = 10
            rates = [100.0]
            publish = "api"
            api_urls = ["http://x/api/publish"]
            api_key = "k"
            [[scenario]]
            name = "a"
            channels = 4
            duration = "250ms"
        "#;
        let s = load(text, &[("connections".into(), toml::Value::Integer(3))]).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].connections, 3);
        assert_eq!(s[0].channels, 4);
        assert_eq!(s[0].duration, Duration::from_millis(250));
        assert_eq!(s[0].publish, PublishMode::Api);
    }

    #[test]
    fn uniform_spreads_subscribers_evenly() {
        let s = Scenario {
            channels: 20,
            connections: 2000,
            ..Scenario::default()
        };
        let mut counts = [0u32; 20];
        for conn in 0..2000 {
            for c in s.subscriptions(conn) {
                counts[c as usize] += 1;
            }
        }
        assert!(counts.iter().all(|&n| n == 100), "{counts:?}");
    }

    #[test]
    fn skewed_favours_low_channels_and_never_repeats() {
        let s = Scenario {
            channels: 50,
            subs_per_conn: 3,
            distribution: Distribution::Skewed,
            ..Scenario::default()
        };
        let mut counts = [0u32; 50];
        for conn in 0..5000 {
            let subs = s.subscriptions(conn);
            assert_eq!(subs.len(), 3);
            assert!(subs[0] != subs[1] && subs[1] != subs[2] && subs[0] != subs[2]);
            for c in subs {
                counts[c as usize] += 1;
            }
        }
        assert!(counts[0] > counts[49] * 3, "{counts:?}");
    }

    #[test]
    fn source_addresses_cycle_when_spread() {
        let s = Scenario {
            source_addrs: 3,
            ..Scenario::default()
        };
        assert_eq!(s.source_addr(0), Some(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(s.source_addr(4), Some(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(Scenario::default().source_addr(4), None);
    }
}
