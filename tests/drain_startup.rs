//! Startup readiness: a node answers `/health` at once, but `/ready` is 200 only once the
//! dependencies it is configured with answer (Redis connected, Postgres connected and
//! LISTENing); until then it refuses WebSocket clients.

use crate::common;

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::time::Duration;

use common::{Balancer, Client, Node, RedisServer, TestDb};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn not_ready_until_redis_answers_then_ready() -> anyhow::Result<()> {
    let mut redis = RedisServer::start().await;
    redis.stop();
    // /health answers at once: liveness does not depend on Redis.
    let node = Node::builder()
        .redis(&redis)
        .only_wait_for_health()
        .start()
        .await;

    let (status, body) = node.ready().await?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["starting"], true, "{body}");
    assert_eq!(body["redis"], "down", "{body}");
    assert!(
        Client::connect(&node.ws_url()).await.is_err(),
        "a WebSocket client was accepted before the node could serve it"
    );

    redis.restart().await;
    let body = node.wait_ready(READY_TIMEOUT).await?;
    assert_eq!(body["starting"], false, "{body}");
    assert_eq!(body["redis"], "up", "{body}");
    let mut client = Client::connect(&node.ws_url()).await?;
    client.subscribe("orders").await?;
    Ok(())
}

#[tokio::test]
async fn not_ready_until_postgres_listens_then_ready() -> anyhow::Result<()> {
    let db = TestDb::create().await;
    // Postgres behind a balancer with no backend: connections are cut at once.
    let proxy = Balancer::start(Vec::new()).await;
    let node = Node::builder()
        .channels(&["orders"])
        .env("PGFANOUT_DATABASE_URL", &through(db.url(), proxy.port()))
        .start()
        .await;

    // Give the node time to try (and fail) a few times.
    let body = node
        .wait_ready_where(READY_TIMEOUT, "postgres down", |status, body| {
            status == 503 && body["postgres"] == "down" && body["starting"] == false
        })
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, later) = node.ready().await?;
    assert_eq!(
        status, 503,
        "ready without Postgres: {later} (before: {body})"
    );

    proxy.set_backends(vec![postgres_addr(db.url())?]);
    let body = node.wait_ready(READY_TIMEOUT).await?;
    assert_eq!(body["postgres"], "up", "{body}");
    // The pgfanout schema is applied at start (PGFANOUT_MIGRATE defaults to true).
    assert_eq!(body["migrations"], "applied", "{body}");

    // Ready means LISTENing: a notification sent now arrives.
    let mut client = Client::connect(&node.ws_url()).await?;
    client.subscribe("orders").await?;
    db.notify("orders", r#"{"after":"ready"}"#).await?;
    let publication = client.next_pub(Duration::from_secs(10)).await?;
    assert_eq!(publication.data, serde_json::json!({"after": "ready"}));
    Ok(())
}

/// `url` with its host and port replaced by 127.0.0.1:`port`.
fn through(url: &str, port: u16) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (userinfo, rest) = match rest.split_once('@') {
        Some((user, rest)) => (format!("{user}@"), rest),
        None => (String::new(), rest),
    };
    let path = rest.find('/').map_or("", |i| &rest[i..]);
    format!("{scheme}://{userinfo}127.0.0.1:{port}{path}")
}

/// The address of the Postgres server in `url`.
fn postgres_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:5432")
    };
    authority
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow::anyhow!("no address for {authority}"))
}
