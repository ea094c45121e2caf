//! pgfanout's load tool. `loadtest run SCENARIOS.toml` opens client connections over the
//! nodes' WebSocket URLs, publishes through a real path at stepped rates, and prints one
//! summary line per step (JSON/CSV on request). See `loadtest/README.md`.
//!
//! Layout: `scenario` (the file), `group` (connections on threads or worker processes),
//! `client` (one connection), `payload` (what a publication carries), `publish` (rate
//! and paths), `stats` (counts and histograms), `procstat` (CPU and RSS of processes),
//! `runner` (one scenario), `report` (rows, line, JSON, CSV).

mod client;
mod group;
mod payload;
mod procstat;
mod publish;
mod report;
mod runner;
mod scenario;
mod stats;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "loadtest", about = "pgfanout load tool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the scenarios of a TOML file.
    Run {
        /// The scenario file.
        file: String,
        /// Only these scenarios (by name; repeatable).
        #[arg(long)]
        only: Vec<String>,
        /// KEY=VALUE (a TOML value) applied to every scenario, e.g. --set connections=500.
        #[arg(long = "set")]
        sets: Vec<String>,
        /// Node pids whose CPU and RSS are reported (repeatable).
        #[arg(long = "node-pid")]
        node_pids: Vec<u32>,
        /// Redis pids whose CPU is reported (repeatable).
        #[arg(long = "redis-pid")]
        redis_pids: Vec<u32>,
        /// Report the CPU of every process named `postgres`.
        #[arg(long)]
        postgres_cpu: bool,
        /// Write the rows as JSON here.
        #[arg(long)]
        json: Option<String>,
        /// Write the rows as CSV here.
        #[arg(long)]
        csv: Option<String>,
        /// Fail (exit 1) when a connection failed, a publication was lost or duplicated,
        /// or a publishing step delivered nothing: for smoke runs.
        #[arg(long)]
        check: bool,
    },
    /// Internal: a worker process holding part of the connections.
    #[command(hide = true)]
    Worker,
}

fn parse_set(s: &str) -> anyhow::Result<(String, toml::Value)> {
    let (k, v) = s.split_once('=').context("--set wants KEY=VALUE")?;
    let table: toml::Table = toml::from_str(&format!("v = {v}"))
        .or_else(|_| toml::from_str(&format!("v = {:?}", v)))
        .with_context(|| format!("--set {k}: not a TOML value"))?;
    Ok((k.trim().to_owned(), table["v"].clone()))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Worker => group::worker_main().await,
        Command::Run {
            file,
            only,
            sets,
            node_pids,
            redis_pids,
            postgres_cpu,
            json,
            csv,
            check,
        } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?;
            let sets = sets
                .iter()
                .map(|s| parse_set(s))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut scenarios = scenario::load(&text, &sets)?;
            if !only.is_empty() {
                scenarios.retain(|s| only.contains(&s.name));
                if scenarios.is_empty() {
                    bail!("no scenario named {only:?} in {file}");
                }
            }
            let targets = runner::Targets {
                node_pids,
                redis_pids,
                postgres: postgres_cpu,
            };
            let mut rows = Vec::new();
            for s in &scenarios {
                rows.extend(
                    runner::run(s, &targets)
                        .await
                        .with_context(|| format!("scenario {}", s.name))?,
                );
            }
            if let Some(path) = json {
                report::write_json(&path, &rows)?;
            }
            if let Some(path) = csv {
                report::write_csv(&path, &rows)?;
            }
            if check {
                let bad: Vec<String> = rows
                    .iter()
                    .filter(|r| {
                        r.failed > 0
                            || r.lost > 0
                            || r.duplicates > 0
                            || r.publish_errors > 0
                            || (r.publish != "none" && r.deliveries == 0)
                    })
                    .map(|r| format!("{}#{}", r.scenario, r.step))
                    .collect();
                if !bad.is_empty() {
                    bail!("check failed for {}", bad.join(", "));
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_takes_toml_values_and_bare_strings() {
        assert_eq!(
            parse_set("connections=5").unwrap().1,
            toml::Value::Integer(5)
        );
        assert_eq!(
            parse_set("urls=[\"ws://a\"]")
                .unwrap()
                .1
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            parse_set("api_key=secret").unwrap().1,
            toml::Value::String("secret".into())
        );
    }
}
