//! What the clients count, per process and per step; mergeable across threads and
//! worker processes (histograms travel as base64 V2 serializations).

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latencies are recorded in microseconds, up to this.
const MAX_MICROS: u64 = 120_000_000;

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("static histogram bounds are valid")
}

/// Counts of one step (or of the open phase) from a set of clients.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    /// Publications received for the first time (by sequence, per connection and channel).
    pub deliveries: u64,
    /// Publications received again (sequence not above the last one seen).
    pub duplicates: u64,
    /// Publications of another run (a previous one still draining), not counted.
    pub foreign: u64,
    /// Publications that arrived after a later one of the same channel.
    pub reordered: u64,
    /// Sequence jumps: publications a connection missed between two it received.
    pub gaps: u64,
    /// Payload bytes of received frames.
    pub bytes: u64,
    /// End-to-end latency (send timestamp in the payload → receive), µs.
    #[serde(with = "hist_b64")]
    pub latency: Histogram<u64>,
    /// Connections that connected and subscribed.
    pub opened: u64,
    /// Connections that failed to connect or subscribe.
    pub failed: u64,
    /// Connections the server closed while we measured.
    pub closed_by_server: u64,
    /// TCP connect → every subscribe answered, µs.
    #[serde(with = "hist_b64")]
    pub connect: Histogram<u64>,
    /// Subscribed connections per channel index.
    pub subscribed: Vec<u64>,
    /// First few failure reasons, for the report.
    pub errors: Vec<String>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            deliveries: 0,
            duplicates: 0,
            reordered: 0,
            foreign: 0,
            gaps: 0,
            bytes: 0,
            latency: histogram(),
            opened: 0,
            failed: 0,
            closed_by_server: 0,
            connect: histogram(),
            subscribed: Vec::new(),
            errors: Vec::new(),
        }
    }
}

impl Stats {
    pub fn merge(&mut self, other: &Stats) {
        self.deliveries += other.deliveries;
        self.duplicates += other.duplicates;
        self.reordered += other.reordered;
        self.foreign += other.foreign;
        self.gaps += other.gaps;
        self.bytes += other.bytes;
        self.opened += other.opened;
        self.failed += other.failed;
        self.closed_by_server += other.closed_by_server;
        // Same bounds everywhere: adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.connect.add(&other.connect);
        if self.subscribed.len() < other.subscribed.len() {
            self.subscribed.resize(other.subscribed.len(), 0);
        }
        for (a, b) in self.subscribed.iter_mut().zip(&other.subscribed) {
            *a += b;
        }
        for e in &other.errors {
            self.error(e.clone());
        }
    }

    /// Keeps the first few distinct reasons.
    pub fn error(&mut self, e: String) {
        if self.errors.len() < 5 && !self.errors.contains(&e) {
            self.errors.push(e);
        }
    }

    pub fn record_latency(&mut self, micros: u64) {
        self.latency.saturating_record(micros.clamp(1, MAX_MICROS));
    }

    pub fn record_connect(&mut self, micros: u64) {
        self.connect.saturating_record(micros.clamp(1, MAX_MICROS));
    }

    /// Takes the counts of the step that ends, leaving the subscription census.
    pub fn take_step(&mut self) -> Stats {
        let out = std::mem::take(self);
        self.subscribed = out.subscribed.clone();
        out
    }
}

mod hist_b64 {
    use super::*;

    pub fn serialize<S: serde::Serializer>(h: &Histogram<u64>, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = Vec::new();
        V2Serializer::new()
            .serialize(h, &mut buf)
            .map_err(serde::ser::Error::custom)?;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(buf))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Histogram<u64>, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)?;
        Deserializer::new()
            .deserialize(&mut &bytes[..])
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_json_round_trip_and_merges() {
        let mut a = Stats::default();
        a.record_latency(1500);
        a.deliveries = 2;
        a.subscribed = vec![1, 2];
        let b: Stats = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        a.merge(&b);
        assert_eq!(a.deliveries, 4);
        assert_eq!(a.latency.len(), 2);
        assert_eq!(a.subscribed, vec![2, 4]);
    }

    #[test]
    fn a_step_keeps_the_census_and_resets_counts() {
        let mut a = Stats {
            deliveries: 5,
            subscribed: vec![3],
            ..Stats::default()
        };
        let step = a.take_step();
        assert_eq!(step.deliveries, 5);
        assert_eq!(a.deliveries, 0);
        assert_eq!(a.subscribed, vec![3]);
    }
}
