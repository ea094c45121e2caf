//! The integration suite: one test binary, so the suite links once (CI disk and time), while
//! nextest still runs every test in its own process. Each module starts real Postgres
//! databases, redis-server children and gateway nodes through `common`.

mod common;

mod api_publish;
mod auth_tokens;
mod bad_input;
mod browser;
mod bus_batch;
mod cluster;
mod delivery;
mod demo;
mod drain;
mod drain_sigterm;
mod drain_startup;
mod floods;
mod harness;
mod ingest_chaos;
mod ingest_throughput;
mod limits_latency;
mod limits_session;
mod limits_shared;
mod log_redaction;
mod metrics_names;
mod outbox;
mod postgres_outage;
mod protocol;
mod recovery;
mod recovery_history;
mod redis_backfill;
mod redis_cluster;
mod redis_outage;
mod rolling_restart;
mod sdk_conformance;
mod sdk_js_resume;
mod slow_consumers;
