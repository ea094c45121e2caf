//! The live-table demo (`PGFANOUT_DEMO`): off by default; when on, every node creates (or finds)
//! the demo table, serves the page and its vendored SDK, and the tiny API changes rows whose
//! trigger notifies the demo channel, which clients receive like any other.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::tokens::SECRET;
use common::{eventually, Client, Cluster, Node};
use serde_json::{json, Value};

const CHANNEL: &str = "pgfanout_demo";
const WAIT: Duration = Duration::from_secs(20);

async fn post_json(url: &str, body: Value) -> anyhow::Result<(u16, Value)> {
    let response = reqwest::Client::new().post(url).json(&body).send().await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

async fn request(method: reqwest::Method, url: &str) -> anyhow::Result<u16> {
    let response = reqwest::Client::new().request(method, url).send().await?;
    Ok(response.status().as_u16())
}

/// Waits until the node answers the snapshot (its demo table exists) and returns the rows.
async fn wait_table(node: &Node) -> anyhow::Result<Vec<Value>> {
    eventually(WAIT, "the demo table", || async {
        match node.http_get("/demo/api/rows").await {
            Ok((200, body)) => serde_json::from_str::<Value>(&body)
                .map_err(|e| format!("{e}: {body}"))
                .map(|v| v["rows"].as_array().cloned().unwrap_or_default()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

#[tokio::test]
async fn the_demo_is_off_by_default() -> anyhow::Result<()> {
    let cluster = Cluster::start_with(1, &["orders"], false, &[]).await;
    cluster.wait_bridged().await?;
    for path in ["/demo/", "/demo/api/rows", "/demo/vendor/centrifuge.js"] {
        let (status, _) = cluster.node().http_get(path).await?;
        assert_eq!(status, 404, "{path}");
    }
    Ok(())
}

#[tokio::test]
async fn serves_the_page_with_its_vendored_sdk() -> anyhow::Result<()> {
    let cluster = Cluster::start_with(1, &[], false, &[("PGFANOUT_DEMO", "true")]).await;
    let node = cluster.node();
    let page = reqwest::get(node.http_url("/demo")).await?;
    assert_eq!(page.url().path(), "/demo/", "/demo redirects to /demo/");
    assert!(page.headers()["content-type"]
        .to_str()?
        .starts_with("text/html"));
    let html = page.text().await?;
    assert!(
        html.contains(r#"<script src="vendor/centrifuge.js">"#),
        "{html}"
    );

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/live-table");
    for (path, file) in [
        ("/demo/app.js", "app.js"),
        ("/demo/style.css", "style.css"),
        ("/demo/vendor/centrifuge.js", "vendor/centrifuge.js"),
    ] {
        let (status, body) = node.http_get(path).await?;
        assert_eq!(status, 200, "{path}");
        assert_eq!(body, std::fs::read_to_string(root.join(file))?, "{path}");
    }
    let (_, config) = node.http_get("/demo/api/config").await?;
    assert_eq!(
        serde_json::from_str::<Value>(&config)?,
        json!({"channel": CHANNEL, "table": "pgfanout_demo", "tokens": false})
    );
    // Without a key there is nothing to sign tokens with: the page connects anonymously.
    assert_eq!(node.http_get("/demo/api/token").await?.0, 404);
    Ok(())
}

/// With a signing key and anonymous access off, the page's token lets it subscribe to the demo
/// channel, and to nothing else.
#[tokio::test]
async fn hands_out_tokens_for_the_demo_channel_only() -> anyhow::Result<()> {
    let env = [
        ("PGFANOUT_DEMO", "true"),
        ("PGFANOUT_ALLOW_ANONYMOUS", "false"),
        ("PGFANOUT_TOKEN_HMAC_SECRET_KEY", SECRET),
    ];
    let cluster = Cluster::start_with(1, &[], false, &env).await;
    let node = cluster.node();
    let (_, config) = node.http_get("/demo/api/config").await?;
    assert_eq!(
        serde_json::from_str::<Value>(&config)?["tokens"],
        json!(true)
    );
    let (status, body) = node.http_get("/demo/api/token").await?;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body)?;
    assert_eq!(body["expires_in"], json!(300));
    let token = body["token"].as_str().unwrap_or_default();

    let mut anonymous = Client::open(&node.ws_url()).await?;
    anonymous
        .send_json(&json!({"id": 1, "connect": {}}))
        .await?;
    let (code, _) = anonymous.expect_close(WAIT).await?;
    assert_eq!(code, 3500, "anonymous access is off");

    let mut client = Client::open(&node.ws_url()).await?;
    let connected = client.call("connect", json!({"token": token})).await?;
    let connected = connected.map_err(|e| anyhow::anyhow!("connect refused: {e:?}"))?;
    assert_eq!(connected["expires"], json!(true), "{connected}");
    client.subscribe(CHANNEL).await?;
    let other = client.try_subscribe("orders").await?;
    assert_eq!(other.err().map(|e| e.code), Some(103));
    Ok(())
}

/// The vendored bundle is the pinned npm package's (`npm run vendor` in examples/live-table).
#[test]
fn the_vendored_sdk_is_the_pinned_package() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/live-table");
    let lock: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("package-lock.json")).expect("package-lock.json"),
    )
    .expect("lock is JSON");
    let pinned = lock["packages"]["node_modules/centrifuge"]["version"]
        .as_str()
        .expect("centrifuge in the lock");
    let vendored = std::fs::read_to_string(root.join("vendor/VERSION")).expect("vendor/VERSION");
    assert_eq!(vendored.trim(), format!("centrifuge {pinned}"));
    let bundle = std::fs::read_to_string(root.join("vendor/centrifuge.js")).expect("bundle");
    assert!(
        bundle.contains("globalThis.Centrifuge="),
        "not the browser bundle"
    );
    // With the package installed, the copy is byte for byte (but the source map line).
    let dist = root.join("node_modules/centrifuge/dist/centrifuge.js");
    if let Ok(original) = std::fs::read_to_string(dist) {
        let original = original
            .rsplit_once("\n//# sourceMappingURL=")
            .map_or(original.as_str(), |(code, _)| code);
        assert_eq!(
            bundle.trim_end(),
            original.trim_end(),
            "run `npm run vendor`"
        );
    }
}

#[tokio::test]
async fn row_changes_reach_subscribers_on_every_node() -> anyhow::Result<()> {
    let cluster = Cluster::start_with(2, &[], true, &[("PGFANOUT_DEMO", "true")]).await;
    cluster.wait_bridged().await?;
    // Both nodes set the table up at the same time, without tripping over each other.
    for node in &cluster.nodes {
        assert_eq!(wait_table(node).await?, Vec::<Value>::new());
    }
    let mut watcher = Client::connect(&cluster.nodes[1].ws_url()).await?;
    watcher.subscribe(CHANNEL).await?;

    let rows_url = cluster.nodes[0].http_url("/demo/api/rows");
    let (status, body) = post_json(&rows_url, json!({"label": "pear", "count": 2})).await?;
    assert_eq!((status, body), (200, json!({"inserted": 2})));
    for (offset, label) in [(1, "pear 1"), (2, "pear 2")] {
        let publication = watcher.next_pub(WAIT).await?;
        assert_eq!(publication.offset, offset);
        assert_eq!(publication.data["op"], json!("INSERT"), "{publication:?}");
        assert_eq!(publication.data["row"]["label"], json!(label));
        assert_eq!(publication.data["row"]["version"], json!(1));
    }

    let bump = cluster.nodes[0].http_url("/demo/api/rows/1/bump");
    assert_eq!(request(reqwest::Method::POST, &bump).await?, 204);
    let changed = watcher.next_pub(WAIT).await?;
    assert_eq!(changed.data["op"], json!("UPDATE"));
    assert_eq!(
        (
            &changed.data["row"]["value"],
            &changed.data["row"]["version"]
        ),
        (&json!(1), &json!(2))
    );

    let row2 = cluster.nodes[1].http_url("/demo/api/rows/2");
    assert_eq!(request(reqwest::Method::DELETE, &row2).await?, 204);
    let gone = watcher.next_pub(WAIT).await?;
    assert_eq!(gone.data["op"], json!("DELETE"));
    assert_eq!(gone.data["row"]["id"], json!(2));
    assert_eq!(request(reqwest::Method::DELETE, &row2).await?, 404);

    // The snapshot has the rows as the trigger sends them.
    let rows = wait_table(&cluster.nodes[1]).await?;
    assert_eq!(rows, vec![changed.data["row"].clone()]);

    // Plain psql changes notify too.
    cluster
        .db
        .execute("UPDATE pgfanout_demo SET label = 'apple'")
        .await?;
    let renamed = watcher.next_pub(WAIT).await?;
    assert_eq!(renamed.data["row"]["label"], json!("apple"));
    assert_eq!(renamed.data["row"]["version"], json!(3));
    Ok(())
}

#[tokio::test]
async fn bad_requests_are_refused_and_change_nothing() -> anyhow::Result<()> {
    let cluster = Cluster::start_with(1, &[], false, &[("PGFANOUT_DEMO", "true")]).await;
    let node = cluster.node();
    wait_table(node).await?;
    let rows_url = node.http_url("/demo/api/rows");
    for body in [
        json!({"label": "", "count": 1}),
        json!({"label": "x".repeat(101), "count": 1}),
        json!({"label": "x", "count": 0}),
        json!({"label": "x", "count": 501}),
        json!({"count": 1}),
    ] {
        let (status, answer) = post_json(&rows_url, body.clone()).await?;
        assert!((400..500).contains(&status), "{body} → {status} {answer}");
    }
    let big = json!({"label": "x".repeat(10_000), "count": 1});
    assert_eq!(post_json(&rows_url, big).await?.0, 413);
    let missing = node.http_url("/demo/api/rows/999/bump");
    assert_eq!(request(reqwest::Method::POST, &missing).await?, 404);
    let nonsense = node.http_url("/demo/api/rows/abc");
    assert_eq!(request(reqwest::Method::DELETE, &nonsense).await?, 400);
    assert_eq!(wait_table(node).await?, Vec::<Value>::new());
    Ok(())
}

#[tokio::test]
async fn a_restarted_node_keeps_the_rows() -> anyhow::Result<()> {
    let mut cluster = Cluster::start_with(1, &[], false, &[("PGFANOUT_DEMO", "true")]).await;
    wait_table(cluster.node()).await?;
    let rows_url = cluster.node().http_url("/demo/api/rows");
    assert_eq!(post_json(&rows_url, json!({"label": "kept"})).await?.0, 200);
    cluster.nodes[0].restart().await;
    let rows = wait_table(cluster.node()).await?;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["label"], json!("kept"));
    Ok(())
}
