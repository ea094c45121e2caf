//! One row per measured step: the summary line, JSON and CSV.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Everything one step measured. Times in ms, CPU in seconds of the step's window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Row {
    pub scenario: String,
    pub step: usize,
    pub publish: String,
    pub target_rate: f64,
    pub channels: u32,
    pub connections: usize,
    pub opened: u64,
    pub failed: u64,
    pub connect_per_s: f64,
    pub connect_p50_ms: f64,
    pub connect_p99_ms: f64,
    pub connect_max_ms: f64,
    pub published: u64,
    pub publish_errors: u64,
    pub publish_rate: f64,
    pub expected: u64,
    pub deliveries: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Publications of an earlier run still arriving (a backlog), ignored.
    pub foreign: u64,
    pub gaps: u64,
    pub deliveries_per_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub closed_by_server: u64,
    pub window_s: f64,
    pub node_rss_mb: f64,
    pub node_bytes_per_conn: f64,
    pub node_cpu_s: f64,
    pub redis_cpu_s: f64,
    pub postgres_cpu_s: f64,
    pub tool_cpu_s: f64,
    /// Node cores busy per 100k deliveries/s.
    pub node_cores_per_100k: f64,
    pub tool_cores_per_100k: f64,
    /// The machine's 1-minute load average when the step started.
    pub load1: f64,
    pub errors: String,
}

pub fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    h.value_at_quantile(q) as f64 / 1000.0
}

impl Row {
    /// The one-line summary.
    pub fn line(&self) -> String {
        let mut s = format!(
            "{} #{} {}@{}/s: conns {}/{} ({:.0}/s, p99 {:.1} ms) | pub {} ({:.0}/s, err {}) | deliv {} ({:.0}/s) lost {} dup {} | lat p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2} ms | node {:.1} MB ({:.0} B/conn) cpu {:.2}s ({:.2} cores/100k) | redis {:.2}s pg {:.2}s tool {:.2}s ({:.2} cores/100k) | load {:.2}",
            self.scenario,
            self.step,
            self.publish,
            self.target_rate,
            self.opened,
            self.connections,
            self.connect_per_s,
            self.connect_p99_ms,
            self.published,
            self.publish_rate,
            self.publish_errors,
            self.deliveries,
            self.deliveries_per_s,
            self.lost,
            self.duplicates,
            self.p50_ms,
            self.p90_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms,
            self.node_rss_mb,
            self.node_bytes_per_conn,
            self.node_cpu_s,
            self.node_cores_per_100k,
            self.redis_cpu_s,
            self.postgres_cpu_s,
            self.tool_cpu_s,
            self.tool_cores_per_100k,
            self.load1,
        );
        if !self.errors.is_empty() {
            s.push_str(&format!(" | errors: {}", self.errors));
        }
        s
    }
}

pub fn write_json(path: &str, rows: &[Row]) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(rows)?)?;
    Ok(())
}

pub fn write_csv(path: &str, rows: &[Row]) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    for row in rows {
        w.serialize(row)?;
    }
    w.flush()?;
    Ok(())
}
