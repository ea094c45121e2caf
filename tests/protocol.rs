//! The Centrifugo client protocol as CONTRACT/proto document it, beyond plain delivery: the
//! connect reply, several commands per frame, ping/pong and its disconnects, unsubscribe, and
//! client publish (refused by default, delivered when anonymous publishing is allowed).

use crate::common;

use std::time::Duration;

use common::{Client, Cluster};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

/// One node on the in-memory bus (protocol behaviour does not depend on the bus).
async fn node(env: &[(&str, &str)]) -> anyhow::Result<Cluster> {
    let cluster = Cluster::start_with(1, &["orders"], false, env).await;
    cluster.wait_bridged().await?;
    Ok(cluster)
}

#[tokio::test]
async fn connect_reply_gives_client_id_node_and_ping_settings() -> anyhow::Result<()> {
    let cluster = node(&[]).await?;
    let mut client = Client::open(&cluster.node().ws_url()).await?;
    let result = client.call("connect", json!({"name": "test"})).await??;

    let id = result["client"].as_str().unwrap_or_default();
    assert_eq!(id.len(), 36, "client id should be a UUID: {result}");
    assert_eq!(result["node"], json!(cluster.node().id()), "{result}");
    assert_eq!(
        (&result["ping"], &result["pong"]),
        (&json!(25), &json!(true)),
        "{result}"
    );
    let version = result["version"].as_str().unwrap_or_default();
    assert!(version.starts_with("pgfanout "), "version {version:?}");
    Ok(())
}

#[tokio::test]
async fn several_commands_in_one_frame_each_get_their_reply() -> anyhow::Result<()> {
    let cluster = node(&[]).await?;
    let mut client = Client::open(&cluster.node().ws_url()).await?;
    let frame = [
        json!({"id": 1, "connect": {}}),
        json!({"id": 2, "subscribe": {"channel": "orders"}}),
        json!({"id": 3, "subscribe": {"channel": "orders"}}),
        json!({"id": 4, "unsubscribe": {"channel": "orders"}}),
    ]
    .map(|command| command.to_string())
    .join("\n");
    client.send_raw(&frame).await?;

    let connect = client.next_reply(1).await?;
    assert!(connect["connect"]["client"].is_string(), "{connect}");
    let subscribe = client.next_reply(2).await?;
    assert!(subscribe.get("subscribe").is_some(), "{subscribe}");
    let twice = client.next_reply(3).await?;
    assert_eq!(twice["error"]["code"], json!(105), "{twice}");
    let unsubscribe = client.next_reply(4).await?;
    assert_eq!(unsubscribe["unsubscribe"], json!({}), "{unsubscribe}");
    Ok(())
}

#[tokio::test]
async fn answered_server_pings_keep_the_connection_open() -> anyhow::Result<()> {
    let cluster = node(&[
        ("PGFANOUT_PING_INTERVAL", "1s"),
        ("PGFANOUT_PONG_TIMEOUT", "1s"),
    ])
    .await?;
    let mut client = Client::connect(&cluster.node().ws_url()).await?;
    client.subscribe("orders").await?;

    client.idle(Duration::from_millis(4_500)).await?;
    assert!(
        client.pings() >= 2,
        "{} server pings in 4.5 s with a 1 s interval",
        client.pings()
    );

    cluster.db.notify("orders", "still here").await?;
    let publication = client.next_pub(WAIT).await?;
    assert_eq!(
        (publication.offset, publication.data),
        (1, json!("still here"))
    );
    Ok(())
}

#[tokio::test]
async fn client_that_does_not_answer_pings_is_closed_with_no_pong() -> anyhow::Result<()> {
    let cluster = node(&[
        ("PGFANOUT_PING_INTERVAL", "1s"),
        ("PGFANOUT_PONG_TIMEOUT", "1s"),
    ])
    .await?;
    let mut client = Client::connect(&cluster.node().ws_url()).await?;
    client.set_answer_pings(false);

    let (code, reason) = client.expect_close(WAIT).await?;
    assert_eq!(code, 3012, "closed with {code} {reason:?}");
    assert!(
        client.pings() >= 1,
        "closed for no pong without having pinged"
    );
    Ok(())
}

#[tokio::test]
async fn connection_that_never_sends_connect_is_closed_as_stale() -> anyhow::Result<()> {
    let cluster = node(&[("PGFANOUT_CONNECT_TIMEOUT", "1s")]).await?;
    let mut client = Client::open(&cluster.node().ws_url()).await?;

    let (code, reason) = client.expect_close(WAIT).await?;
    assert_eq!(code, 3502, "closed with {code} {reason:?}");
    Ok(())
}

#[tokio::test]
async fn unsubscribed_client_receives_nothing_more() -> anyhow::Result<()> {
    let cluster = node(&[]).await?;
    let mut leaving = Client::connect(&cluster.node().ws_url()).await?;
    let mut staying = Client::connect(&cluster.node().ws_url()).await?;
    leaving.subscribe("orders").await?;
    staying.subscribe("orders").await?;

    cluster.db.notify("orders", "one").await?;
    assert_eq!(leaving.next_pub(WAIT).await?.offset, 1);
    assert_eq!(staying.next_pub(WAIT).await?.offset, 1);

    assert_eq!(leaving.unsubscribe("orders").await?, json!({}));
    cluster.db.notify("orders", "two").await?;
    let second = staying.next_pub(WAIT).await?;
    assert_eq!((second.offset, second.data), (2, json!("two")));
    leaving.expect_no_pub(Duration::from_millis(300)).await?;
    Ok(())
}

#[tokio::test]
async fn client_publish_is_refused_without_anonymous_publish() -> anyhow::Result<()> {
    let cluster = node(&[]).await?;
    let mut publisher = Client::connect(&cluster.node().ws_url()).await?;
    let mut subscriber = Client::connect(&cluster.node().ws_url()).await?;
    subscriber.subscribe("orders").await?;

    let refused = publisher
        .publish("orders", json!({"from": "client"}))
        .await?;
    let error = refused
        .expect_err("publish must be refused when PGFANOUT_ALLOW_ANONYMOUS_PUBLISH is false");
    assert_eq!(error.code, 103, "{error}");
    subscriber.expect_no_pub(Duration::from_millis(300)).await?;

    // The publisher's connection survives the refusal.
    publisher.subscribe("orders").await?;
    Ok(())
}

#[tokio::test]
async fn client_publish_reaches_subscribers_when_anonymous_publish_is_allowed() -> anyhow::Result<()>
{
    let cluster = node(&[("PGFANOUT_ALLOW_ANONYMOUS_PUBLISH", "true")]).await?;
    let mut publisher = Client::connect(&cluster.node().ws_url()).await?;
    let mut subscriber = Client::connect(&cluster.node().ws_url()).await?;
    subscriber.subscribe("orders").await?;

    let accepted = publisher
        .publish("orders", json!({"from": "client"}))
        .await?;
    assert_eq!(accepted?, json!({}));
    let publication = subscriber.next_pub(WAIT).await?;
    assert_eq!(
        (publication.offset, publication.data),
        (1, json!({"from": "client"}))
    );

    // Client publications and notifications share one offset sequence.
    cluster
        .db
        .notify("orders", r#"{"from":"postgres"}"#)
        .await?;
    let next = subscriber.next_pub(WAIT).await?;
    assert_eq!((next.offset, next.data), (2, json!({"from": "postgres"})));
    Ok(())
}
