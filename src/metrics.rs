//! Every metric the node exports, described once, and the Prometheus recorder.
//!
//! All series carry the label `node` (the node id), so per-instance views work behind a
//! plain load balancer.
//!
//! Adding a metric: a constant here, a `describe_*` line in [`describe`], a line in
//! [`register`] (so it is exported, at zero, from the start: dashboards and `rate()` need
//! the series before the first event), and a row in the README's metrics table —
//! `tests/metrics_names.rs` checks all three against a running node.

use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

pub const CONNECTIONS_OPEN: &str = "pgfanout_connections_open";
pub const CONNECTIONS_ACCEPTED: &str = "pgfanout_connections_accepted_total";
pub const CONNECTIONS_CLOSED: &str = "pgfanout_connections_closed_total";
pub const SUBSCRIPTIONS: &str = "pgfanout_subscriptions";
pub const CHANNELS: &str = "pgfanout_channels";
pub const MESSAGES_DELIVERED: &str = "pgfanout_messages_delivered_total";
pub const MESSAGES_DROPPED: &str = "pgfanout_messages_dropped_total";
pub const BUS_PUBLISHED: &str = "pgfanout_bus_published_total";
pub const BUS_PUBLISH_SECONDS: &str = "pgfanout_bus_publish_seconds";
pub const BUS_PUBLISH_BATCH: &str = "pgfanout_bus_publish_batch_size";
pub const NOTIFICATIONS_RECEIVED: &str = "pgfanout_notifications_received_total";
pub const POSTGRES_RECONNECTS: &str = "pgfanout_postgres_reconnects_total";
pub const REDIS_RECONNECTS: &str = "pgfanout_redis_reconnects_total";
pub const BRIDGE_OWNER: &str = "pgfanout_bridge_owner";
pub const INGEST_SHARDS_OWNED: &str = "pgfanout_ingest_shards_owned";
pub const INGEST_TAKEOVERS: &str = "pgfanout_ingest_takeovers_total";
pub const INGEST_REPUBLISHED: &str = "pgfanout_ingest_republished_total";
pub const INGEST_DUPLICATES: &str = "pgfanout_ingest_duplicates_dropped_total";
pub const INGEST_LOST: &str = "pgfanout_ingest_lost_total";
pub const INGEST_BLIND_TAKEOVERS: &str = "pgfanout_ingest_blind_takeovers_total";
pub const INGEST_BUFFER_BYTES: &str = "pgfanout_ingest_buffer_bytes";
pub const RECOVERIES_ATTEMPTED: &str = "pgfanout_recoveries_attempted_total";
pub const RECOVERIES_SUCCEEDED: &str = "pgfanout_recoveries_succeeded_total";
pub const RECOVERIES_FAILED: &str = "pgfanout_recoveries_failed_total";
pub const MESSAGES_REPLAYED: &str = "pgfanout_messages_replayed_total";
pub const GAPS_REPAIRED: &str = "pgfanout_gaps_repaired_total";
pub const GAPS_UNREPAIRED: &str = "pgfanout_gaps_unrepaired_total";
pub const REDIS_RESUBSCRIPTIONS: &str = "pgfanout_redis_resubscriptions_total";
pub const REDIS_TOPOLOGY_CHANGES: &str = "pgfanout_redis_topology_changes_total";
pub const LOST_WRITES_DETECTED: &str = "pgfanout_lost_writes_detected_total";
pub const MESSAGES_WRITTEN: &str = "pgfanout_messages_written_total";
pub const CLIENT_QUEUE_DEPTH: &str = "pgfanout_client_queue_depth";
pub const DELIVERY_LATENCY: &str = "pgfanout_delivery_latency_seconds";
pub const OUTBOX_PARTITIONS_OWNED: &str = "pgfanout_outbox_partitions_owned";
pub const RATE_LIMIT_DECISIONS: &str = "pgfanout_rate_limit_decisions_total";
pub const RATE_LIMIT_SECONDS: &str = "pgfanout_rate_limit_seconds";
pub const RATE_LIMIT_DEGRADED: &str = "pgfanout_rate_limit_degraded";
pub const API_REQUESTS: &str = "pgfanout_api_requests_total";

/// Buckets of the latency histograms (seconds): 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Buckets of the queue depth histogram (messages), up to the largest queue allowed.
const DEPTH_BUCKETS: &[f64] = &[
    1.0,
    2.0,
    4.0,
    8.0,
    16.0,
    32.0,
    64.0,
    128.0,
    256.0,
    512.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    1_000_000.0,
];
/// Buckets of the publish batch size histogram (publications), up to the largest batch.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
pub const AUTH_FAILURES: &str = "pgfanout_auth_failures_total";
pub const JWKS_RELOADS: &str = "pgfanout_jwks_reloads_total";

fn describe() {
    describe_gauge!(CONNECTIONS_OPEN, "WebSocket connections open on this node");
    describe_counter!(CONNECTIONS_ACCEPTED, "WebSocket connections accepted");
    describe_counter!(
        CONNECTIONS_CLOSED,
        "WebSocket connections closed, by reason"
    );
    describe_gauge!(
        SUBSCRIPTIONS,
        "Channel subscriptions held by this node's clients"
    );
    describe_gauge!(CHANNELS, "Channels with at least one local subscriber");
    describe_counter!(
        MESSAGES_DELIVERED,
        "Publications queued to client connections"
    );
    describe_counter!(
        MESSAGES_DROPPED,
        "Publications or notifications not delivered, by reason"
    );
    describe_counter!(
        BUS_PUBLISHED,
        "Messages in: publications this node put on the bus, by source (notify, outbox, \
         client, api)"
    );
    describe_histogram!(
        BUS_PUBLISH_SECONDS,
        Unit::Seconds,
        "Time of one publish on the bus: one message, or one batch of them"
    );
    describe_histogram!(
        BUS_PUBLISH_BATCH,
        "Publications per publish on the bus (a shard bridge or an outbox claimer with a \
         backlog sends up to 256 per Redis round trip)"
    );
    describe_counter!(
        NOTIFICATIONS_RECEIVED,
        "Postgres notifications received by this node"
    );
    describe_counter!(
        POSTGRES_RECONNECTS,
        "Reconnections of the Postgres LISTEN connection"
    );
    describe_counter!(
        REDIS_RECONNECTS,
        "Times Redis became reachable again after an outage"
    );
    describe_gauge!(
        BRIDGE_OWNER,
        "1 while this node bridges at least one channel shard into the bus"
    );
    describe_gauge!(
        INGEST_SHARDS_OWNED,
        "Channel shards this node bridges into the bus (holds the lease of)"
    );
    describe_counter!(
        INGEST_TAKEOVERS,
        "Channel shards this node took over (lease acquired, buffer reconciled)"
    );
    describe_counter!(
        INGEST_REPUBLISHED,
        "Buffered notifications a takeover found missing from the bus and published"
    );
    describe_counter!(
        INGEST_DUPLICATES,
        "Notifications or outbox rows not published because they were on the bus already, \
         by path (notify, outbox)"
    );
    describe_counter!(
        INGEST_LOST,
        "Notifications a takeover found missing from the bus and no longer buffered here"
    );
    describe_counter!(
        INGEST_BLIND_TAKEOVERS,
        "Shards taken over without their recorded position (no live node had listened long \
         enough): what the previous owner left unpublished may be lost"
    );
    describe_gauge!(
        INGEST_BUFFER_BYTES,
        Unit::Bytes,
        "Bytes of notifications buffered by this node's channel shards"
    );
    describe_counter!(
        RECOVERIES_ATTEMPTED,
        "Subscribes that asked to recover from a position"
    );
    describe_counter!(
        RECOVERIES_SUCCEEDED,
        "Recovering subscribes answered with everything the client missed"
    );
    describe_counter!(
        RECOVERIES_FAILED,
        "Recovering subscribes answered recovered:false (or an error), by reason"
    );
    describe_counter!(
        MESSAGES_REPLAYED,
        "Publications replayed from history: to a client in a recovery (path=recovery), or \
         by this node to close a gap in its stream (path=repair)"
    );
    describe_counter!(
        GAPS_REPAIRED,
        "Gaps in this node's stream of a channel (lost pub/sub messages, a Redis reconnect) \
         filled from history before anyone saw them"
    );
    describe_counter!(
        GAPS_UNREPAIRED,
        "Gaps history could not fill, or new epochs: local subscribers were told to \
         resubscribe (unsubscribe push 2500), by reason"
    );
    describe_counter!(
        LOST_WRITES_DETECTED,
        "Times this node found that Redis lost publications it had delivered (a failover to \
         a replica that had not received them, a restart from older data): the channel got a \
         new epoch, so its clients are told instead of skipping the reused offsets"
    );
    describe_counter!(
        REDIS_RESUBSCRIPTIONS,
        "Times the Redis subscriber connection was re-established and every channel resubscribed"
    );
    describe_counter!(
        REDIS_TOPOLOGY_CHANGES,
        "Redis Cluster slot map changes (resharding, failover) after which the subscriptions moved"
    );
    describe_counter!(
        MESSAGES_WRITTEN,
        "Publications written to client sockets (messages out)"
    );
    describe_histogram!(
        CLIENT_QUEUE_DEPTH,
        "Messages waiting in a connection's outbound queue when its writer wakes up"
    );
    describe_histogram!(
        DELIVERY_LATENCY,
        Unit::Seconds,
        "From a message entering the bus (the ingesting node's clock) to its socket write \
         on this node; sampled once per flush, for the oldest publication in it"
    );
    describe_gauge!(
        OUTBOX_PARTITIONS_OWNED,
        "Outbox partitions this node has claimed"
    );
    describe_counter!(
        RATE_LIMIT_DECISIONS,
        "Rate-limit decisions, by action, outcome (allowed, limited) and scope (shared in \
         Redis, or local while Redis is unreachable)"
    );
    describe_histogram!(
        RATE_LIMIT_SECONDS,
        Unit::Seconds,
        "Time to evaluate a shared limit in Redis"
    );
    describe_counter!(
        AUTH_FAILURES,
        "Tokens and requests refused, by token kind and reason"
    );
    describe_counter!(JWKS_RELOADS, "JWKS file reloads, by outcome");
    describe_counter!(
        API_REQUESTS,
        "Requests to POST /api/publish, by HTTP status"
    );
    describe_gauge!(
        RATE_LIMIT_DEGRADED,
        "1 while limits are evaluated without Redis (the configured fallback: local or refuse)"
    );
}

/// Creates every series whose labels are known in advance, at zero, so that `/metrics`
/// lists every metric from the start. Labelled metrics whose label values are open get
/// one unlabelled series.
pub fn register() {
    metrics::gauge!(CONNECTIONS_OPEN).set(0.0);
    metrics::counter!(CONNECTIONS_ACCEPTED).absolute(0);
    for reason in [
        "client_closed",
        "shutdown",
        "slow_consumer",
        "no_pong",
        "stale",
        "bad_request",
    ] {
        metrics::counter!(CONNECTIONS_CLOSED, "reason" => reason).absolute(0);
    }
    metrics::gauge!(SUBSCRIPTIONS).set(0.0);
    metrics::gauge!(CHANNELS).set(0.0);
    metrics::counter!(MESSAGES_DELIVERED).absolute(0);
    metrics::counter!(MESSAGES_WRITTEN).absolute(0);
    for reason in ["slow_consumer", "bus_error"] {
        metrics::counter!(MESSAGES_DROPPED, "reason" => reason).absolute(0);
    }
    for source in ["notify", "outbox", "client", "api"] {
        metrics::counter!(BUS_PUBLISHED, "source" => source).absolute(0);
    }
    // Registering a histogram is creating its handle; it renders with zero counts.
    for histogram in [
        BUS_PUBLISH_SECONDS,
        BUS_PUBLISH_BATCH,
        CLIENT_QUEUE_DEPTH,
        DELIVERY_LATENCY,
    ] {
        let _ = metrics::histogram!(histogram);
    }
    metrics::counter!(NOTIFICATIONS_RECEIVED).absolute(0);
    metrics::counter!(POSTGRES_RECONNECTS).absolute(0);
    metrics::counter!(REDIS_RECONNECTS).absolute(0);
    metrics::counter!(REDIS_RESUBSCRIPTIONS).absolute(0);
    metrics::counter!(REDIS_TOPOLOGY_CHANGES).absolute(0);
    metrics::gauge!(BRIDGE_OWNER).set(0.0);
    metrics::gauge!(INGEST_SHARDS_OWNED).set(0.0);
    metrics::counter!(INGEST_TAKEOVERS).absolute(0);
    metrics::counter!(INGEST_REPUBLISHED).absolute(0);
    for path in ["notify", "outbox"] {
        metrics::counter!(INGEST_DUPLICATES, "path" => path).absolute(0);
    }
    metrics::counter!(INGEST_LOST).absolute(0);
    metrics::counter!(INGEST_BLIND_TAKEOVERS).absolute(0);
    metrics::gauge!(INGEST_BUFFER_BYTES).set(0.0);
    metrics::gauge!(OUTBOX_PARTITIONS_OWNED).set(0.0);
    metrics::counter!(RECOVERIES_ATTEMPTED).absolute(0);
    metrics::counter!(RECOVERIES_SUCCEEDED).absolute(0);
    for reason in [
        "epoch",
        "ahead",
        "over_cap",
        "no_history",
        "out_of_history",
        "error",
    ] {
        metrics::counter!(RECOVERIES_FAILED, "reason" => reason).absolute(0);
    }
    for path in ["recovery", "repair"] {
        metrics::counter!(MESSAGES_REPLAYED, "path" => path).absolute(0);
    }
    metrics::counter!(GAPS_REPAIRED).absolute(0);
    metrics::counter!(LOST_WRITES_DETECTED).absolute(0);
    for reason in [
        "epoch",
        "out_of_history",
        "over_cap",
        "no_history",
        "backlog",
    ] {
        metrics::counter!(GAPS_UNREPAIRED, "reason" => reason).absolute(0);
    }
    metrics::counter!(RATE_LIMIT_DECISIONS).absolute(0);
    let _ = metrics::histogram!(RATE_LIMIT_SECONDS);
    metrics::counter!(AUTH_FAILURES).absolute(0);
    metrics::gauge!(RATE_LIMIT_DEGRADED).set(0.0);
    metrics::counter!(API_REQUESTS).absolute(0);
    for outcome in ["ok", "error"] {
        metrics::counter!(JWKS_RELOADS, "outcome" => outcome).absolute(0);
    }
}

/// Installs the global recorder with the `node` label and starts its upkeep task, which
/// stops with `cancel`.
///
/// # Errors
/// A recorder is already installed.
pub fn install(node_id: &str, cancel: CancellationToken) -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .add_global_label("node", node_id)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(CLIENT_QUEUE_DEPTH.to_owned()), DEPTH_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BUS_PUBLISH_BATCH.to_owned()), BATCH_BUCKETS)?
        .install_recorder()?;
    describe();
    register();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => upkeep.run_upkeep(),
            }
        }
    });
    Ok(handle)
}
