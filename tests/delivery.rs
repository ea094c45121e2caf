//! One node: a Postgres NOTIFY reaches a subscribed WebSocket client, on the Redis bus and on
//! the in-memory bus, with per-channel offsets from 1 and the payload as JSON (or as a string).

use crate::common;

use std::time::Duration;

use common::{Client, Cluster};
use serde_json::{json, Value};

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(15);

/// Starts one node (Redis bus or in-memory), subscribes a client to `orders`, and waits until
/// a notification sent now would be bridged.
async fn subscribed_node(with_redis: bool) -> anyhow::Result<(Cluster, Client)> {
    let cluster = Cluster::start_with(1, &["orders", "other"], with_redis, &[]).await;
    cluster.wait_bridged().await?;
    let mut client = Client::connect(&cluster.node().ws_url()).await?;
    client.subscribe("orders").await?;
    Ok((cluster, client))
}

async fn json_payload_arrives_as_json_with_offset_one(with_redis: bool) -> anyhow::Result<()> {
    let (cluster, mut client) = subscribed_node(with_redis).await?;

    cluster.db.notify("orders", r#"{"id":1}"#).await?;
    let first = client.next_pub(DELIVERY_TIMEOUT).await?;
    assert_eq!(
        (first.channel.as_str(), first.offset, &first.data),
        ("orders", 1, &json!({"id": 1}))
    );

    // Valid JSON of any kind is delivered as that value; the offset counts on.
    cluster.db.notify("orders", "[1,2.5,null]").await?;
    let second = client.next_pub(DELIVERY_TIMEOUT).await?;
    assert_eq!((second.offset, &second.data), (2, &json!([1, 2.5, null])));

    client.expect_no_pub(Duration::from_millis(300)).await?;
    Ok(())
}

async fn non_json_payload_arrives_as_json_string(with_redis: bool) -> anyhow::Result<()> {
    let (cluster, mut client) = subscribed_node(with_redis).await?;

    for (offset, payload) in [(1, "hello world"), (2, r#"{"id":1"#), (3, "")] {
        cluster.db.notify("orders", payload).await?;
        let publication = client.next_pub(DELIVERY_TIMEOUT).await?;
        assert_eq!(
            (publication.offset, &publication.data),
            (offset, &Value::String(payload.to_string())),
            "payload {payload:?}"
        );
    }
    Ok(())
}

async fn channels_count_offsets_separately_and_deliver_only_what_is_subscribed(
    with_redis: bool,
) -> anyhow::Result<()> {
    let (cluster, mut client) = subscribed_node(with_redis).await?;
    let mut other = Client::connect(&cluster.node().ws_url()).await?;
    other.subscribe("other").await?;

    cluster.db.notify("other", r#"{"o":1}"#).await?;
    cluster.db.notify("orders", r#"{"id":1}"#).await?;
    cluster.db.notify("other", r#"{"o":2}"#).await?;

    let orders = client.next_pub(DELIVERY_TIMEOUT).await?;
    assert_eq!(
        (orders.channel.as_str(), orders.offset, &orders.data),
        ("orders", 1, &json!({"id": 1}))
    );
    client.expect_no_pub(Duration::from_millis(300)).await?;

    for (offset, data) in [(1, json!({"o": 1})), (2, json!({"o": 2}))] {
        let publication = other.next_pub(DELIVERY_TIMEOUT).await?;
        assert_eq!(
            (
                publication.channel.as_str(),
                publication.offset,
                publication.data
            ),
            ("other", offset, data)
        );
    }
    Ok(())
}

#[tokio::test]
async fn json_payload_arrives_as_json_with_offset_one_via_redis() -> anyhow::Result<()> {
    json_payload_arrives_as_json_with_offset_one(true).await
}

#[tokio::test]
async fn json_payload_arrives_as_json_with_offset_one_in_memory() -> anyhow::Result<()> {
    json_payload_arrives_as_json_with_offset_one(false).await
}

#[tokio::test]
async fn non_json_payload_arrives_as_json_string_via_redis() -> anyhow::Result<()> {
    non_json_payload_arrives_as_json_string(true).await
}

#[tokio::test]
async fn non_json_payload_arrives_as_json_string_in_memory() -> anyhow::Result<()> {
    non_json_payload_arrives_as_json_string(false).await
}

#[tokio::test]
async fn channels_count_offsets_separately_via_redis() -> anyhow::Result<()> {
    channels_count_offsets_separately_and_deliver_only_what_is_subscribed(true).await
}

#[tokio::test]
async fn channels_count_offsets_separately_in_memory() -> anyhow::Result<()> {
    channels_count_offsets_separately_and_deliver_only_what_is_subscribed(false).await
}
