//! The `pgfanout` schema: `pgfanout migrate` is idempotent and a newer schema is refused;
//! `pgfanout.track_table` turns row changes into events; events far over NOTIFY's 8000 bytes
//! arrive whole; and the outbox loses and repeats nothing while every node dies at once.

use crate::common;
use crate::ingest_chaos::{check, Follower};

use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use common::{Client, Cluster, TestDb};
use serde_json::{json, Value};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(15);

/// Runs `pgfanout migrate` on `db`: exit success and stdout.
fn migrate(db: &TestDb) -> anyhow::Result<(bool, String, String)> {
    let output = Command::new(env!("CARGO_BIN_EXE_pgfanout"))
        .arg("migrate")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PGFANOUT_DATABASE_URL", db.url())
        .env("PGFANOUT_LOG_FORMAT", "text")
        .output()?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// The definition of everything in schema `pgfanout` (tables, columns, functions, rows of
/// the version table), to compare before and after.
async fn schema_fingerprint(db: &TestDb) -> anyhow::Result<String> {
    let (client, connection) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT (SELECT string_agg(c.relname || ':' || c.relkind::text || ':' || c.oid::text, ',' ORDER BY c.relname)
                       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname = 'pgfanout')
                 || '|' || (SELECT string_agg(p.proname || ':' || p.oid::text, ',' ORDER BY p.proname)
                       FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                      WHERE n.nspname = 'pgfanout')
                 || '|' || (SELECT string_agg(version::text || '@' || applied_at::text, ',')
                       FROM pgfanout.schema_version)",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn migrate_twice_in_a_row_is_a_no_op() -> anyhow::Result<()> {
    let db = TestDb::create().await;
    let (ok, out, err) = migrate(&db)?;
    assert!(ok, "first migrate failed: {out}{err}");
    assert!(out.contains("from version 0 to 1"), "{out}");
    let before = schema_fingerprint(&db).await?;
    let (ok, out, err) = migrate(&db)?;
    assert!(ok, "second migrate failed: {out}{err}");
    assert!(out.contains("already at version 1"), "{out}");
    assert_eq!(
        schema_fingerprint(&db).await?,
        before,
        "the second migrate changed the schema"
    );
    Ok(())
}

#[tokio::test]
async fn a_schema_newer_than_the_binary_makes_the_node_refuse_to_start() -> anyhow::Result<()> {
    let db = TestDb::create().await;
    assert!(migrate(&db)?.0);
    db.execute("INSERT INTO pgfanout.schema_version (version) VALUES (99)")
        .await?;
    let output = tokio::task::spawn_blocking({
        let url = db.url().to_string();
        move || {
            Command::new(env!("CARGO_BIN_EXE_pgfanout"))
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("PGFANOUT_DATABASE_URL", url)
                .env(
                    "PGFANOUT_LISTEN",
                    format!("127.0.0.1:{}", common::free_port()),
                )
                .env("PGFANOUT_LOG_FORMAT", "text")
                .output()
        }
    });
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .context("the node did not exit")???;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "exit status: {}", output.status);
    assert!(
        stderr.contains("schema is at version 99, newer than this pgfanout supports (1)"),
        "stderr: {stderr}"
    );
    let (ok, _, err) = migrate(&db)?;
    assert!(
        !ok && err.contains("version 99"),
        "migrate must refuse too: {err}"
    );
    Ok(())
}

#[tokio::test]
async fn track_table_publishes_row_changes_and_large_events_arrive_whole() -> anyhow::Result<()> {
    let cluster = Cluster::start(2, &[]).await;
    cluster.wait_bridged().await?;
    let db = &cluster.db;
    db.execute(
        "CREATE TABLE public.orders (id int PRIMARY KEY, status text NOT NULL);
         SELECT pgfanout.track_table('public.orders', 'orders_changes');",
    )
    .await?;
    let mut client = Client::connect(&cluster.nodes[1].ws_url()).await?;
    client.subscribe("orders_changes").await?;

    db.execute("INSERT INTO public.orders VALUES (7, 'new')")
        .await?;
    db.execute("UPDATE public.orders SET status = 'paid' WHERE id = 7")
        .await?;
    db.execute("DELETE FROM public.orders WHERE id = 7").await?;
    let mut events = Vec::new();
    for _ in 0..3 {
        events.push(client.next_pub(WAIT).await?);
    }
    let strip = |mut v: Value| {
        let at = v["commit_time"].take();
        assert!(at.is_string(), "commit_time missing: {v}");
        v
    };
    let base = json!({"schema": "public", "table": "orders", "key": {"id": 7}});
    let with = |extra: Value| {
        let mut v = base.clone();
        for (k, x) in extra.as_object().expect("object") {
            v[k] = x.clone();
        }
        v
    };
    let got: Vec<(u64, Value)> = events
        .into_iter()
        .map(|p| (p.offset, strip(p.data)))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                1,
                with(
                    json!({"op": "INSERT", "new": {"id": 7, "status": "new"}, "commit_time": null})
                )
            ),
            (
                2,
                with(json!({"op": "UPDATE", "new": {"id": 7, "status": "paid"},
                            "old": {"id": 7, "status": "new"}, "commit_time": null}))
            ),
            (
                3,
                with(
                    json!({"op": "DELETE", "old": {"id": 7, "status": "paid"}, "commit_time": null})
                )
            ),
        ]
    );

    // 100 KB: far over NOTIFY's 8000 bytes.
    let big: String = (0..100_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    db.execute(&format!(
        "SELECT pgfanout.publish('orders_changes', jsonb_build_object('blob', '{big}'))"
    ))
    .await?;
    let p = client.next_pub(WAIT).await?;
    assert_eq!(p.offset, 4);
    assert_eq!(
        p.data,
        json!({ "blob": big }),
        "the 100 KB event arrived altered"
    );

    // Over the limit (1 MiB by default): a clear SQL error, nothing published.
    let huge = "x".repeat(1_100_000);
    let refused = db
        .execute(&format!(
            "SELECT pgfanout.publish('orders_changes', to_jsonb('{huge}'::text))"
        ))
        .await;
    let message = format!(
        "{:#}",
        refused.expect_err("an over-limit event was accepted")
    );
    assert!(
        message.contains("is over the limit of 1048576 bytes"),
        "{}",
        &message[message.len().saturating_sub(400)..]
    );
    client.expect_no_pub(Duration::from_millis(500)).await?;
    Ok(())
}

const CHANNELS: [&str; 4] = ["box_a", "box_b", "box_c", "box_d"];
const EVENTS: u64 = 20_000;
/// Events per transaction, one transaction per tick: 2,500/s (headroom over the 2,000/s asked).
const BATCH: u64 = 100;
const TICK: Duration = Duration::from_millis(40);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_loses_and_repeats_nothing_when_every_node_dies() -> anyhow::Result<()> {
    let env = [
        ("PGFANOUT_LEASE_TTL", "1500ms"),
        ("PGFANOUT_HISTORY_SIZE", "20000"),
        ("PGFANOUT_RECOVERY_MAX_PUBLICATIONS", "20000"),
        // The restarted nodes drain the backlog in batches of hundreds per round trip: a
        // follower (a debug-build test client) must not be cut as a slow consumer meanwhile.
        ("PGFANOUT_CLIENT_QUEUE_SIZE", "20000"),
    ];
    let mut cluster = Cluster::start_with(3, &[], true, &env).await;
    cluster.wait_bridged().await?;
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.ws_url()).collect();
    let channels: Vec<String> = CHANNELS.iter().map(|c| c.to_string()).collect();
    let per_channel = (EVENTS / CHANNELS.len() as u64) as usize;
    let mut followers = Vec::new();
    for home in 0..cluster.nodes.len() {
        let follower = Follower::start(urls.clone(), home, channels.clone()).await?;
        followers.push(tokio::spawn(follower.run(per_channel)));
    }
    let producer = tokio::spawn(produce(cluster.db.url().to_string()));

    tokio::time::sleep(Duration::from_secs(3)).await;
    eprintln!("killing every node");
    for node in &mut cluster.nodes {
        node.kill();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for node in &mut cluster.nodes {
        node.restart().await;
    }
    eprintln!("every node restarted");
    // The outage must fall inside the production (a slower machine only widens the overlap,
    // so this, not the producer's rate, is what the run is checked for).
    let overlapped = !producer.is_finished();

    let (sent, elapsed) = producer.await??;
    let rate = sent as f64 / elapsed.as_secs_f64();
    eprintln!("published {sent} outbox events in {elapsed:?} ({rate:.0}/s)");
    assert!(
        overlapped,
        "the producer finished before the nodes came back: no outage under load"
    );

    let mut problems = Vec::new();
    for (home, follower) in followers.into_iter().enumerate() {
        let name = format!("follower from node {home}");
        match follower.await? {
            Ok(received) => {
                for (i, channel) in CHANNELS.iter().enumerate() {
                    let want: Vec<Value> = (0..EVENTS)
                        .filter(|seq| seq % CHANNELS.len() as u64 == i as u64)
                        .map(|seq| json!({ "seq": seq }))
                        .collect();
                    problems.extend(check(&name, channel, &received[*channel], &want));
                }
            }
            Err(err) => problems.push(format!("{name}: {err:#}")),
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
    let (client, connection) =
        tokio_postgres::connect(cluster.db.url(), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    common::eventually(WAIT, "an empty outbox", || async {
        let left: i64 = client
            .query_one("SELECT count(*) FROM pgfanout.outbox", &[])
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        if left == 0 {
            Ok(())
        } else {
            Err(format!("{left} rows"))
        }
    })
    .await?;
    Ok(())
}

/// Publishes events `0..EVENTS` as `{"seq": n}` round-robin over the channels through
/// `pgfanout.publish`, `BATCH` per transaction every `TICK`.
async fn produce(url: String) -> anyhow::Result<(u64, Duration)> {
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let started = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    for first in (0..EVENTS).step_by(BATCH as usize) {
        tick.tick().await;
        let last = (first + BATCH).min(EVENTS) - 1;
        client
            .batch_execute(&format!(
                "SELECT pgfanout.publish((ARRAY['{}','{}','{}','{}'])[i % 4 + 1], \
                                         jsonb_build_object('seq', i)) \
                 FROM generate_series({first}, {last}) AS i",
                CHANNELS[0], CHANNELS[1], CHANNELS[2], CHANNELS[3]
            ))
            .await?;
    }
    Ok((EVENTS, started.elapsed()))
}
