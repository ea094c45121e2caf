//! SDK conformance: the real centrifuge-js (Node) and centrifuge-python SDKs, unchanged, against
//! a real two-node cluster. Every case runs once per SDK (`sdk_conformance::js::…` and
//! `sdk_conformance::python::…`): connect with a token, subscribe and receive publications
//! with offsets, publish from the client, unsubscribe, token refresh, recovery after the node
//! dies, and a server-side disconnect with reconnect advice (drain).
//!
//! The SDKs run behind `tests/sdk/<lang>/driver.*` (see [`common::sdk`]); what they do that we
//! do not support is listed in proto/README.md.

use crate::common;

use std::time::Duration;

use common::tokens::{self, hs256, now, SECRET};
use common::{Balancer, Client, Cluster, Node, Sdk, SdkDriver};
use serde_json::{json, Value};

/// Generous: the SDKs start interpreters and back off between attempts, on a shared machine.
const WAIT: Duration = Duration::from_secs(30);

macro_rules! for_each_sdk {
    ($($case:ident),* $(,)?) => {
        mod js {
            $(
                #[tokio::test]
                async fn $case() -> anyhow::Result<()> {
                    super::$case(super::Sdk::Js).await
                }
            )*
        }
        mod python {
            $(
                #[tokio::test]
                async fn $case() -> anyhow::Result<()> {
                    super::$case(super::Sdk::Python).await
                }
            )*
        }
    };
}

for_each_sdk!(
    receives_publications_with_offsets,
    publishes_from_the_client,
    unsubscribes_and_subscribes_again,
    refreshes_expired_and_expiring_tokens,
    recovers_on_another_node_after_its_node_dies,
    reconnects_elsewhere_when_the_server_drains,
);

/// Two nodes with token auth (anonymous access off) and a short drain window.
async fn cluster() -> anyhow::Result<Cluster> {
    let cluster = Cluster::start_with(
        2,
        &["orders"],
        true,
        &[
            ("PGFANOUT_ALLOW_ANONYMOUS", "false"),
            ("PGFANOUT_TOKEN_HMAC_SECRET_KEY", SECRET),
            // The SDKs refresh when the ttl runs out: the grace covers that round trip.
            ("PGFANOUT_TOKEN_EXPIRY_GRACE", "5s"),
            ("PGFANOUT_DRAIN_WINDOW", "1s"),
        ],
    )
    .await;
    cluster.wait_bridged().await?;
    Ok(cluster)
}

/// A token for `sub` that may subscribe to and publish on `chat`, and subscribe to `orders`.
fn token(sub: &str) -> String {
    hs256(&tokens::user(sub, 600, &["orders", "chat"], &["chat"]))
}

/// A driver connected to `url` with a valid token; returns its client id.
async fn connected(sdk: Sdk, url: &str) -> anyhow::Result<(SdkDriver, String)> {
    let mut driver = SdkDriver::start(sdk)?;
    driver.connect(url, &token("sdk"), &[]).await?;
    let (event, before) = driver.until(WAIT, "connected", |_| true).await?;
    assert!(
        !before.iter().any(|e| e["event"] == "error"),
        "errors before connecting: {before:?}"
    );
    let client = event["client"].as_str().unwrap_or_default().to_string();
    Ok((driver, client))
}

/// Subscribes and returns the `subscribed` event.
async fn subscribed(driver: &mut SdkDriver, channel: &str) -> anyhow::Result<Value> {
    driver.subscribe(channel).await?;
    let (event, _) = driver
        .until(WAIT, "subscribed", |e| e["channel"] == channel)
        .await?;
    Ok(event)
}

/// A protocol client on `node` that may publish on `chat`.
async fn publisher(node: &Node) -> anyhow::Result<Client> {
    Client::connect_with_token(&node.ws_url(), &token("publisher")).await
}

/// Publishes `{"n": n}` on `chat` for each `n`.
async fn publish_range(
    client: &mut Client,
    range: std::ops::RangeInclusive<u64>,
) -> anyhow::Result<()> {
    for n in range {
        client
            .publish("chat", json!({ "n": n }))
            .await?
            .map_err(|err| anyhow::anyhow!("publish {n}: {err:?}"))?;
    }
    Ok(())
}

/// The `n` of each publication, checking that offsets and `n` agree.
fn numbers(publications: &[(u64, Value)]) -> Vec<u64> {
    publications
        .iter()
        .map(|(offset, data)| {
            assert_eq!(data["n"], json!(offset), "offset {offset} carries {data}");
            *offset
        })
        .collect()
}

async fn receives_publications_with_offsets(sdk: Sdk) -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let (mut driver, _) = connected(sdk, &cluster.nodes[1].ws_url()).await?;
    let subscribed = subscribed(&mut driver, "orders").await?;
    assert_eq!(subscribed["recoverable"], json!(true), "{subscribed}");
    assert_eq!(subscribed["was_recovering"], json!(false), "{subscribed}");

    cluster.db.notify("orders", r#"{"id":1}"#).await?;
    cluster.db.notify("orders", "plain text").await?;
    cluster.db.notify("orders", r#"[1,2,3]"#).await?;
    let (publications, _) = driver.publications("orders", 3, WAIT).await?;
    assert_eq!(
        publications,
        vec![
            (1, json!({"id": 1})),
            (2, json!("plain text")),
            (3, json!([1, 2, 3]))
        ]
    );
    Ok(())
}

async fn publishes_from_the_client(sdk: Sdk) -> anyhow::Result<()> {
    let cluster = cluster().await?;
    // A subscriber on the other node sees what the SDK publishes.
    let mut other = publisher(&cluster.nodes[0]).await?;
    other.subscribe("chat").await?;
    let (mut driver, _) = connected(sdk, &cluster.nodes[1].ws_url()).await?;
    subscribed(&mut driver, "chat").await?;

    driver.publish("chat", json!({"text": "hi"})).await?;
    let own = published_and_received(&mut driver).await?;
    assert_eq!(own, vec![(1, json!({"text": "hi"}))]);
    let seen = other.next_pub(WAIT).await?;
    assert_eq!((seen.offset, seen.data), (1, json!({"text": "hi"})));

    // The token does not allow publishing on `orders`: a clear error, the connection lives on.
    driver.publish("orders", json!({"text": "no"})).await?;
    let (failed, _) = driver.until(WAIT, "publish_failed", |_| true).await?;
    assert_eq!(failed["code"], json!(103), "{failed}");
    driver.publish("chat", json!({"text": "again"})).await?;
    let again = published_and_received(&mut driver).await?;
    assert_eq!(again, vec![(2, json!({"text": "again"}))]);
    Ok(())
}

/// Waits for the SDK's own publication on `chat` to come back and for the publish to be
/// acknowledged, in whichever order they arrive (the push may overtake the reply).
async fn published_and_received(driver: &mut SdkDriver) -> anyhow::Result<Vec<(u64, Value)>> {
    let (publications, others) = driver.publications("chat", 1, WAIT).await?;
    if !others.iter().any(|e| e["event"] == "published") {
        driver.until(WAIT, "published", |_| true).await?;
    }
    Ok(publications)
}

async fn unsubscribes_and_subscribes_again(sdk: Sdk) -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let (mut driver, _) = connected(sdk, &cluster.node().ws_url()).await?;
    subscribed(&mut driver, "orders").await?;
    cluster.db.notify("orders", r#"{"n":1}"#).await?;
    driver.publications("orders", 1, WAIT).await?;

    driver.unsubscribe("orders").await?;
    let (unsubscribed, _) = driver
        .until(WAIT, "unsubscribed", |e| e["channel"] == "orders")
        .await?;
    assert_eq!(
        unsubscribed["code"],
        json!(0),
        "unsubscribe called: {unsubscribed}"
    );
    cluster.db.notify("orders", r#"{"n":2}"#).await?;
    driver
        .expect_no_publication("orders", Duration::from_secs(1))
        .await?;

    // The server forgot the subscription: subscribing again is accepted, not "already subscribed".
    subscribed(&mut driver, "orders").await?;
    cluster.db.notify("orders", r#"{"n":3}"#).await?;
    let (publications, _) = driver.publications("orders", 1, WAIT).await?;
    assert_eq!(publications, vec![(3, json!({"n": 3}))]);
    Ok(())
}

async fn refreshes_expired_and_expiring_tokens(sdk: Sdk) -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let expired = hs256(&json!({"sub": "sdk", "exp": now() - 10, "channels": ["orders"]}));
    // Long enough that a slow start still connects with it before it expires.
    let short = hs256(&tokens::user("sdk", 10, &["orders"], &[]));
    let long = hs256(&tokens::user("sdk", 600, &["orders"], &[]));

    let mut driver = SdkDriver::start(sdk)?;
    driver
        .connect(&cluster.node().ws_url(), &expired, &[short, long])
        .await?;
    // 109 for the expired token → getToken → connected with the short one.
    let (connected, before) = driver.until(WAIT, "connected", |_| true).await?;
    assert!(
        before
            .iter()
            .any(|e| e["event"] == "get_token" && e["n"] == 1),
        "the SDK fetched a token after 109: {before:?}"
    );
    let client = connected["client"].clone();
    subscribed(&mut driver, "orders").await?;

    // Before the short token runs out, the SDK refreshes it with the long one.
    let (_, between) = driver.until(WAIT, "get_token", |e| e["n"] == 2).await?;
    assert!(
        !between
            .iter()
            .any(|e| e["event"] == "connected" || e["event"] == "disconnected"),
        "no reconnect while refreshing: {between:?}"
    );

    // Past the short token's expiry + grace the same connection still receives.
    tokio::time::sleep(Duration::from_secs(7)).await;
    cluster
        .db
        .notify("orders", r#"{"after":"refresh"}"#)
        .await?;
    let (publications, meanwhile) = driver.publications("orders", 1, WAIT).await?;
    assert_eq!(publications[0].1, json!({"after": "refresh"}));
    assert!(
        !meanwhile
            .iter()
            .any(|e| e["event"] == "connected" || e["event"] == "connecting"),
        "no reconnect (client {client}): {meanwhile:?}"
    );
    let metrics = cluster.node().metrics().await?;
    let expired_closes: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("pgfanout_connections_closed_total") && l.contains("\"expired\""))
        .collect();
    assert!(
        expired_closes.is_empty(),
        "closed as expired: {expired_closes:?}"
    );
    Ok(())
}

/// Index in `cluster.nodes` of the node carrying the balancer's only open WebSocket.
fn node_behind(cluster: &Cluster, balancer: &Balancer) -> anyhow::Result<usize> {
    let open = balancer.open_websocket_backends();
    anyhow::ensure!(open.len() == 1, "one open WebSocket expected, got {open:?}");
    cluster
        .nodes
        .iter()
        .position(|n| n.port() == open[0])
        .ok_or_else(|| anyhow::anyhow!("no node on port {}", open[0]))
}

/// Reads events until `chat` publications up to offset `last` arrived (after `have`) and a
/// `subscribed` event that was recovering; returns the publications, that event and the other
/// events seen.
async fn recovered_through(
    driver: &mut SdkDriver,
    last: u64,
    mut publications: Vec<(u64, Value)>,
) -> anyhow::Result<(Vec<(u64, Value)>, Value, Vec<Value>)> {
    let mut resubscribed = None;
    let mut others = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while publications.last().map(|(offset, _)| *offset) < Some(last) || resubscribed.is_none() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let event = driver.next(left).await.map_err(|err| {
            err.context(format!(
                "up to offset {:?} of {last}; resubscribed: {resubscribed:?}; other events: {others:?}",
                publications.last().map(|(offset, _)| offset)
            ))
        })?;
        match event["event"].as_str() {
            Some("publication") if event["channel"] == "chat" => {
                let offset = event["offset"].as_u64().unwrap_or_default();
                publications.push((offset, event["data"].clone()));
            }
            Some("subscribed") if event["was_recovering"] == json!(true) => {
                resubscribed = Some(event)
            }
            _ => others.push(event),
        }
    }
    let resubscribed = resubscribed.unwrap_or_default();
    Ok((publications, resubscribed, others))
}

/// Connects an SDK through a round-robin balancer over both nodes, receives 1..=50, then
/// `stop`s the node it is on; 51..=100 are published on the other node meanwhile. The SDK must
/// end with exactly 1..=100 in order, having reconnected to the other node and recovered.
/// Returns the events other than publications and the recovering `subscribed`.
async fn across_a_node_loss(sdk: Sdk, stop: fn(&mut Node)) -> anyhow::Result<Vec<Value>> {
    let mut cluster = cluster().await?;
    let ports = cluster
        .nodes
        .iter()
        .map(|n| common::balancer::local(n.port()));
    let balancer = Balancer::start_http(ports.collect()).await;
    let (mut driver, first_client) = connected(sdk, &balancer.ws_url()).await?;
    subscribed(&mut driver, "chat").await?;
    let victim = node_behind(&cluster, &balancer)?;
    let survivor = 1 - victim;
    let mut publisher = publisher(&cluster.nodes[survivor]).await?;

    publish_range(&mut publisher, 1..=50).await?;
    let (before, _) = driver.publications("chat", 50, WAIT).await?;
    stop(&mut cluster.nodes[victim]);
    publish_range(&mut publisher, 51..=100).await?;

    let (publications, resubscribed, others) = recovered_through(&mut driver, 100, before).await?;
    assert_eq!(
        numbers(&publications),
        (1..=100).collect::<Vec<u64>>(),
        "every publication once, in order"
    );
    assert_eq!(resubscribed["recovered"], json!(true), "{resubscribed}");
    let reconnected = others
        .iter()
        .filter(|e| e["event"] == "connected")
        .collect::<Vec<_>>();
    assert!(
        reconnected
            .iter()
            .any(|e| e["client"] != json!(first_client)),
        "a new connection: {others:?}"
    );
    assert_eq!(
        node_behind(&cluster, &balancer)?,
        survivor,
        "now on the other node"
    );
    Ok(others)
}

async fn recovers_on_another_node_after_its_node_dies(sdk: Sdk) -> anyhow::Result<()> {
    across_a_node_loss(sdk, Node::kill).await?;
    Ok(())
}

async fn reconnects_elsewhere_when_the_server_drains(sdk: Sdk) -> anyhow::Result<()> {
    let others = across_a_node_loss(sdk, |node| {
        node.terminate().expect("SIGTERM the node");
    })
    .await?;
    // The drain told the SDK to reconnect (3001 shutdown), and nothing went wrong besides.
    assert!(
        others
            .iter()
            .any(|e| e["event"] == "connecting" && e["code"] == json!(3001)),
        "reconnect advice 3001: {others:?}"
    );
    let errors: Vec<&Value> = others
        .iter()
        .filter(|e| e["event"] == "error" || e["event"] == "disconnected")
        .collect();
    assert!(errors.is_empty(), "no errors during the drain: {errors:?}");
    Ok(())
}
