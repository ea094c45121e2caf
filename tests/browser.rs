//! The live-table demo page in a real browser (Debian's Chromium, driven by playwright-core;
//! tests/browser/live_table.mjs) through a round-robin balancer in front of two nodes: 200 rows
//! inserted through the page's form, the node the page is connected to killed, 200 more
//! inserted while the page is away, and the page shows all 400, each exactly once, having
//! recovered the missed ones without reloading. Then a row changed and one deleted through
//! the page show up as such. A screenshot is kept in `target/artifacts/browser/live-table.png`.
//!
//! Needs `node`, `tests/browser/node_modules` and `/usr/bin/chromium` (scripts/deps.sh installs
//! them); without them the test fails and says so, rather than passing without having run.

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use common::balancer::local;
use common::tokens::{self, SECRET};
use common::{eventually, Balancer, Client, Cluster, Script};
use serde_json::{json, Value};

const CHANNEL: &str = "pgfanout_demo";
const CHROMIUM: &str = "/usr/bin/chromium";
/// Longest a single page command may take (a page load, 200 rows on screen).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(30);
const BATCH: usize = 200;

fn driver_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// `target/artifacts/browser`, created.
fn artifact_dir() -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    let dir = target.join("artifacts/browser");
    std::fs::create_dir_all(&dir).expect("create the artifact directory");
    dir
}

/// Fails with instructions when Node, playwright-core or Chromium is missing.
fn require_browser() {
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|out| out.status.success()),
        "`node` is not installed or does not run ({node:?}): run scripts/deps.sh"
    );
    assert!(
        driver_dir()
            .join("node_modules/playwright-core/package.json")
            .exists(),
        "playwright-core is not installed in {}: run scripts/deps.sh (npm ci there)",
        driver_dir().display()
    );
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: run scripts/deps.sh (apt-get install chromium)"
    );
}

/// The page in the browser.
struct Page(Script);

impl Page {
    async fn open(url: &str) -> anyhow::Result<Page> {
        let script = Script::spawn(
            "node",
            &["live_table.mjs"],
            &driver_dir(),
            &[("CHROMIUM", CHROMIUM)],
        )?;
        let mut page = Page(script);
        page.call(json!({"cmd": "open", "url": url})).await?;
        Ok(page)
    }

    /// Sends a command and returns its answer, which must be `ok`.
    async fn call(&mut self, command: Value) -> anyhow::Result<Value> {
        self.0.send(&command).await?;
        let answer = self.0.next(COMMAND_TIMEOUT).await?;
        anyhow::ensure!(
            answer["ok"] == json!(true),
            "page command {command} failed: {answer}\n{}",
            self.0.stderr_message()
        );
        Ok(answer)
    }

    /// Waits until the JavaScript expression holds in the page.
    async fn wait(&mut self, expr: &str) -> anyhow::Result<Value> {
        let timeout_ms = WAIT.as_millis() as u64;
        self.call(json!({"cmd": "wait", "expr": expr, "timeout_ms": timeout_ms}))
            .await
    }

    /// Fills the page's form and clicks Insert.
    async fn insert(&mut self, label: &str, count: usize) -> anyhow::Result<()> {
        let answer = self
            .call(json!({"cmd": "insert", "label": label, "count": count}))
            .await?;
        assert_eq!(answer["status"], json!(format!("inserted {count}")));
        Ok(())
    }

    /// What the page shows: status fields, row ids (in page order), and its counters.
    async fn read(&mut self) -> anyhow::Result<Value> {
        self.call(json!({"cmd": "read"})).await
    }
}

/// Ids of the demo table's rows, straight from Postgres.
async fn table_ids(database_url: &str) -> anyhow::Result<BTreeSet<i64>> {
    let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .context("connect to the test database")?;
    let driver = tokio::spawn(connection);
    let rows = client.query("SELECT id FROM pgfanout_demo", &[]).await?;
    drop(client);
    let _ = driver.await;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

fn ids_shown(read: &Value) -> Vec<i64> {
    read["rows"]
        .as_array()
        .map(|rows| rows.iter().filter_map(|row| row["id"].as_i64()).collect())
        .unwrap_or_default()
}

/// Progress on stderr, with the time since the test started (shown when it fails).
fn step(start: std::time::Instant, what: &str) {
    eprintln!("[{:>6.1}s] {what}", start.elapsed().as_secs_f64());
}

#[tokio::test]
async fn the_demo_page_shows_every_row_exactly_once_across_a_node_kill() -> anyhow::Result<()> {
    require_browser();
    let start = std::time::Instant::now();
    // Anonymous access off: the page connects with the tokens the demo signs.
    let env = [
        ("PGFANOUT_DEMO", "true"),
        ("PGFANOUT_LEASE_TTL", "1s"),
        ("PGFANOUT_ALLOW_ANONYMOUS", "false"),
        ("PGFANOUT_TOKEN_HMAC_SECRET_KEY", SECRET),
    ];
    let mut cluster = Cluster::start_with(2, &[], true, &env).await;
    cluster.wait_bridged().await?;
    for node in &cluster.nodes {
        eventually(WAIT, "the demo table on every node", || async {
            match node.http_get("/demo/api/rows").await {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await?;
    }
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port()).collect();
    let balancer = Balancer::start_http(ports.iter().map(|&p| local(p)).collect()).await;
    step(start, "cluster up");
    let mut page = Page::open(&balancer.http_url("/demo/")).await?;
    step(start, "page open");

    page.insert("before", BATCH).await?;
    page.wait("liveTable.stats().rows === 200").await?;
    let before = page.read().await?;
    step(start, "200 rows shown");

    // The page names the node its WebSocket went through the balancer to.
    let websockets = balancer.open_websocket_backends();
    assert_eq!(websockets.len(), 1, "{:?}", balancer.carried());
    let victim = ports
        .iter()
        .position(|&port| port == websockets[0])
        .context("the WebSocket's backend is not a node")?;
    let survivor = 1 - victim;
    assert_eq!(
        before["shown"]["node"],
        json!(cluster.nodes[victim].id()),
        "{before}"
    );

    // A plain client on the survivor tells when the next rows are on the bus.
    let token = tokens::hs256(&tokens::user("watcher", 600, &[CHANNEL], &[]));
    let mut watcher = Client::open(&cluster.nodes[survivor].ws_url()).await?;
    let connected = watcher.call("connect", json!({"token": token})).await?;
    connected.map_err(|e| anyhow::anyhow!("watcher refused: {e}"))?;
    let position = watcher.subscribe(CHANNEL).await?;
    assert_eq!(position["offset"], json!(BATCH), "{position}");

    // The page loses its node and cannot come back (held at the balancer) until the next 200
    // rows are on the bus.
    balancer.hold_websockets(true);
    cluster.nodes[victim].kill();
    page.wait("liveTable.stats().state !== 'connected'").await?;
    step(start, "node killed, page disconnected");
    let owner = &cluster.nodes[survivor];
    eventually(WAIT, "the survivor bridging notifications", || async {
        match owner.metric_sum("pgfanout_bridge_owner").await {
            Ok(v) if v >= 1.0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await?;
    page.insert("while away", BATCH).await?;
    for n in 1..=BATCH {
        let publication = watcher.next_pub(WAIT).await?;
        assert_eq!(publication.offset, (BATCH + n) as u64);
    }
    let away = page.read().await?;
    assert_eq!(away["stats"]["rows"], json!(BATCH), "{away}");
    step(start, "200 more rows on the bus while the page is away");

    balancer.hold_websockets(false);
    page.wait("(s => s.state === 'connected' && s.rows === 400 && !s.loading)(liveTable.stats())")
        .await?;
    let after = page.read().await?;
    step(start, "page back with 400 rows");

    // Every row of the table, each exactly once, and nothing else.
    let shown = ids_shown(&after);
    let unique: BTreeSet<i64> = shown.iter().copied().collect();
    assert_eq!(shown.len(), 2 * BATCH, "rows on the page");
    assert_eq!(unique.len(), shown.len(), "a row is shown twice: {shown:?}");
    assert_eq!(unique, table_ids(cluster.db.url()).await?);

    // Reconnected to the survivor, and recovered what it missed: every publication once,
    // in order, and the table never reloaded.
    assert_eq!(after["shown"]["node"], json!(cluster.nodes[survivor].id()));
    assert_eq!(balancer.open_websocket_backends(), vec![ports[survivor]]);
    let stats = &after["stats"];
    assert_eq!(stats["publications"], json!(2 * BATCH), "{after}");
    assert_eq!(stats["lastOffset"], json!(2 * BATCH), "{after}");
    assert_eq!(stats["duplicates"], json!(0), "{after}");
    assert_eq!(stats["gaps"], json!(0), "{after}");
    assert_eq!(
        stats["snapshots"],
        json!(1),
        "reloaded instead of recovering: {after}"
    );
    assert_eq!(stats["recoveredReconnects"], json!(1), "{after}");
    assert_eq!(after["shown"]["rows"], json!("400"), "{after}");
    assert_eq!(after["shown"]["offset"], json!("400"), "{after}");

    // A change and a delete, through the page's buttons, show up live.
    let (changed, deleted) = (shown[0], shown[shown.len() - 1]);
    page.call(json!({"cmd": "click", "id": changed, "button": "+1"}))
        .await?;
    page.call(json!({"cmd": "click", "id": deleted, "button": "✕"}))
        .await?;
    page.wait(&format!(
        "(s => s.rows === 399 && s.lastOffset === 402)(liveTable.stats()) && \
         !document.querySelector('#rows tr[data-id=\"{deleted}\"]')"
    ))
    .await?;
    let end = page.read().await?;
    let top = &end["rows"][0];
    assert_eq!(top["id"], json!(changed), "{end}");
    assert_eq!(
        (&top["value"], &top["version"]),
        (&json!(1), &json!(2)),
        "{end}"
    );
    let ids: BTreeSet<i64> = ids_shown(&end).into_iter().collect();
    assert_eq!(ids, table_ids(cluster.db.url()).await?);
    assert_eq!(end["stats"]["gaps"], json!(0), "{end}");
    assert_eq!(end["stats"]["duplicates"], json!(0), "{end}");

    let screenshot = artifact_dir().join("live-table.png");
    page.call(json!({"cmd": "screenshot", "path": screenshot}))
        .await?;
    step(start, &format!("screenshot: {}", screenshot.display()));

    page.call(json!({"cmd": "close"})).await?;
    assert!(page.0.wait_exit(WAIT).await?, "{}", page.0.stderr_message());
    Ok(())
}
