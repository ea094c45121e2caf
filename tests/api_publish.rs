//! `POST /api/publish` on real nodes: a retried request with the same idempotency key is
//! published once (subscribers on another node get it once, the retry is answered with the
//! same offset), batches, and the JSON errors 400, 401, 413, 429.

use crate::common;

use std::time::Duration;

use common::{Client, Cluster};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);
const KEY: &str = "test-api-key-0123456789";

async fn cluster(extra: &[(&str, &str)]) -> anyhow::Result<Cluster> {
    let mut env = vec![
        ("PGFANOUT_API_KEYS", KEY),
        ("PGFANOUT_API_MAX_BODY_BYTES", "4096"),
    ];
    env.extend_from_slice(extra);
    let cluster = Cluster::start_with(2, &[], true, &env).await;
    for node in &cluster.nodes {
        node.wait_ready(WAIT).await?;
    }
    Ok(cluster)
}

async fn post(
    node: &common::Node,
    key: Option<&str>,
    headers: &[(&str, &str)],
    body: String,
) -> anyhow::Result<(u16, Value, reqwest::header::HeaderMap)> {
    let mut request = reqwest::Client::new()
        .post(node.http_url("/api/publish"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(key) = key {
        request = request.header("authorization", format!("apikey {key}"));
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await?;
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, json, headers))
}

#[tokio::test]
async fn a_retried_publish_with_the_same_idempotency_key_is_published_once() -> anyhow::Result<()> {
    let cluster = cluster(&[]).await?;
    let mut subscriber = Client::connect(&cluster.nodes[1].ws_url()).await?;
    subscriber.subscribe("orders").await?;

    let body = json!({"channel": "orders", "data": {"id": 7}}).to_string();
    let retry_key = [("idempotency-key", "order-7")];
    let (status, first, _) = post(&cluster.nodes[0], Some(KEY), &retry_key, body.clone()).await?;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["result"]["duplicate"], json!(false), "{first}");
    let offset = first["result"]["offset"].clone();
    // The client timed out and retries, on another node.
    let (status, second, _) = post(&cluster.nodes[1], Some(KEY), &retry_key, body).await?;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["result"]["duplicate"], json!(true), "{second}");
    assert_eq!(second["result"]["offset"], offset);

    let publication = subscriber.next_pub(WAIT).await?;
    assert_eq!(publication.data, json!({"id": 7}));
    subscriber.expect_no_pub(Duration::from_millis(500)).await?;

    // A batch: each item gets its result; the header key is suffixed per item.
    let batch = json!([
        {"channel": "orders", "data": 1},
        {"channel": "orders", "data": 2, "idempotency_key": "own"},
    ])
    .to_string();
    let (status, results, _) = post(
        &cluster.nodes[0],
        Some(KEY),
        &[("idempotency-key", "b1")],
        batch.clone(),
    )
    .await?;
    assert_eq!(status, 200, "{results}");
    assert_eq!(
        results["results"].as_array().map(Vec::len),
        Some(2),
        "{results}"
    );
    let (_, again, _) = post(
        &cluster.nodes[0],
        Some(KEY),
        &[("idempotency-key", "b1")],
        batch,
    )
    .await?;
    assert_eq!(
        again["results"][0]["result"]["duplicate"],
        json!(true),
        "{again}"
    );
    assert_eq!(
        again["results"][1]["result"]["duplicate"],
        json!(true),
        "{again}"
    );
    for expected in [1, 2] {
        assert_eq!(subscriber.next_pub(WAIT).await?.data, json!(expected));
    }
    subscriber.expect_no_pub(Duration::from_millis(500)).await?;
    Ok(())
}

#[tokio::test]
async fn errors_are_json_with_the_documented_status() -> anyhow::Result<()> {
    let cluster = cluster(&[("PGFANOUT_LIMIT_API_PUBLISH_PER_SECOND", "3")]).await?;
    let node = &cluster.nodes[0];
    let ok = json!({"channel": "c", "data": 1}).to_string();

    let (status, body, _) = post(node, None, &[], ok.clone()).await?;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (401, json!("unauthorized")),
        "{body}"
    );
    let (status, _, _) = post(node, Some("wrong-key-0123456789"), &[], ok.clone()).await?;
    assert_eq!(status, 401);
    for bad in [
        "{not json",
        r#"{"channel":"c"}"#,
        r#"{"channel":"a b","data":1}"#,
        "[]",
    ] {
        let (status, body, _) = post(node, Some(KEY), &[], bad.into()).await?;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["code"], json!("bad_request"), "{body}");
    }
    let big = json!({"channel": "c", "data": "x".repeat(5000)}).to_string();
    let (status, body, _) = post(node, Some(KEY), &[], big).await?;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (413, json!("too_large")),
        "{body}"
    );

    let mut limited = None;
    for _ in 0..6 {
        let (status, body, headers) = post(node, Some(KEY), &[], ok.clone()).await?;
        if status == 429 {
            limited = Some((body, headers));
            break;
        }
        assert_eq!(status, 200, "{body}");
    }
    let (body, headers) = limited.expect("the fourth publish within a second is limited");
    assert_eq!(body["error"]["code"], json!("too_many_requests"), "{body}");
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    Ok(())
}
