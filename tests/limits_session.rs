//! Limits as one connection sees them, on one node without Redis (limits then count on
//! the node): the tier from the token and the tiers file, the retry advice of 111, the
//! inbound-bytes limit, subscriptions per connection, and the disconnect of a client that
//! keeps hammering.

use crate::common;

use std::time::Duration;

use common::tokens::{self, hs256, SECRET};
use common::{Client, Cluster};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

const TIERS: &str = r#"
default_tier = "free"
[tiers.free]
subscribe_per_second = 2
subscriptions_per_connection = 3
publish_per_second = 1
[tiers.pro]
subscribe_per_second = 50
inbound_bytes_per_second = 4000
"#;

async fn node(extra: &[(&str, &str)]) -> anyhow::Result<(Cluster, std::path::PathBuf)> {
    let dir = std::env::temp_dir().join(format!("pgfanout-tiers-{}", common::random_tag()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("tiers.toml");
    std::fs::write(&file, TIERS)?;
    let path = file.display().to_string();
    let mut env = vec![
        ("PGFANOUT_TOKEN_HMAC_SECRET_KEY", SECRET),
        ("PGFANOUT_LIMITS_FILE", path.as_str()),
    ];
    env.extend_from_slice(extra);
    let cluster = Cluster::start_with(1, &[], false, &env).await;
    cluster.node().wait_ready(WAIT).await?;
    Ok((cluster, dir))
}

fn token(user: &str, tier: Option<&str>) -> String {
    let mut claims = tokens::user(user, 600, &["*"], &["*"]);
    if let Some(tier) = tier {
        claims["tier"] = json!(tier);
    }
    hs256(&claims)
}

#[tokio::test]
async fn tiers_from_the_file_apply_by_token_claim() -> anyhow::Result<()> {
    let (cluster, _dir) = node(&[]).await?;
    let url = cluster.node().ws_url();
    // free (the file's default tier): 2 subscribes per second, 3 subscriptions.
    let mut free = Client::connect_with_token(&url, &token("f", None)).await?;
    free.subscribe("a").await?;
    free.subscribe("b").await?;
    let limited = free.try_subscribe("c").await?.unwrap_err();
    assert_eq!((limited.code, limited.temporary), (111, true), "{limited}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    free.subscribe("c").await?;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        free.try_subscribe("d").await?.unwrap_err().code,
        106,
        "3 per connection"
    );
    // pro: 50 per second.
    let mut pro = Client::connect_with_token(&url, &token("p", Some("pro"))).await?;
    for i in 0..20 {
        pro.subscribe(&format!("p{i}")).await?;
    }
    // Client publishes: permission first (103), then the tier's rate (111).
    free.publish("a", json!(1)).await??;
    let limited = free.publish("a", json!(2)).await?.unwrap_err();
    assert_eq!(limited.code, 111, "{limited}");
    Ok(())
}

#[tokio::test]
async fn anonymous_clients_are_limited_per_address_from_the_proxy_header() -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

    let (cluster, _dir) = node(&[
        ("PGFANOUT_ALLOW_ANONYMOUS", "true"),
        ("PGFANOUT_LIMIT_CONNECTIONS_PER_USER", "2"),
        ("PGFANOUT_LIMITS_FILE", ""),
        ("PGFANOUT_CLIENT_IP_HEADER", "x-forwarded-for"),
    ])
    .await?;
    let url = cluster.node().ws_url();
    let open_from = |ip: &'static str| {
        let url = url.clone();
        async move {
            let mut request = url.as_str().into_client_request()?;
            request
                .headers_mut()
                .insert("x-forwarded-for", format!("{ip}, 10.0.0.1").parse()?);
            let (mut ws, _) = tokio_tungstenite::connect_async(request).await?;
            use futures_util::{SinkExt as _, StreamExt as _};
            ws.send(tokio_tungstenite::tungstenite::Message::text(
                json!({"id": 1, "connect": {}}).to_string(),
            ))
            .await?;
            let answer = tokio::time::timeout(WAIT, ws.next()).await?;
            anyhow::Ok((ws, answer))
        }
    };
    let mut held = Vec::new();
    for ip in ["192.0.2.1", "192.0.2.1", "192.0.2.2", "192.0.2.2"] {
        let (ws, answer) = open_from(ip).await?;
        let text = match answer {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => t.to_string(),
            other => panic!("{ip}: expected a connect reply, got {other:?}"),
        };
        assert!(text.contains("\"connect\""), "{ip}: {text}");
        held.push(ws);
    }
    let (_ws, answer) = open_from("192.0.2.1").await?;
    match answer {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 3504);
        }
        other => panic!("third connection from 192.0.2.1: {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn inbound_bytes_over_the_limit_get_111_for_every_command_of_the_frame() -> anyhow::Result<()>
{
    let (cluster, _dir) = node(&[]).await?;
    let mut pro =
        Client::connect_with_token(&cluster.node().ws_url(), &token("b", Some("pro"))).await?;
    let padding = "x".repeat(1500);
    let mut limited = 0;
    for i in 0..4u64 {
        let id = 10 + i;
        pro.send_json(&json!({"id": id, "publish": {"channel": "bytes", "data": padding}}))
            .await?;
        let reply = pro.next_reply(id).await?;
        if reply["error"]["code"] == json!(111) {
            assert!(
                reply["error"]["retry_after_ms"].as_u64().is_some(),
                "{reply}"
            );
            limited += 1;
        }
    }
    assert!(limited >= 1, "4 × 1.5 kB over 4 kB/s must be limited");
    Ok(())
}

#[tokio::test]
async fn a_client_that_keeps_hammering_is_closed_with_3013() -> anyhow::Result<()> {
    let (cluster, _dir) = node(&[("PGFANOUT_LIMITS_ABUSE_THRESHOLD", "5")]).await?;
    let mut client =
        Client::connect_with_token(&cluster.node().ws_url(), &token("h", None)).await?;
    let frame: Vec<String> = (0..20)
        .map(|i| json!({"id": 100 + i, "subscribe": {"channel": format!("h{i}")}}).to_string())
        .collect();
    client.send_raw(&frame.join("\n")).await?;
    let (code, reason) = client.expect_close(WAIT).await?;
    assert_eq!((code, reason.as_str()), (3013, "too many requests"));
    // The replies before the close said why.
    let first_limited = client.next_reply(102).await;
    assert!(first_limited.is_ok_and(|r| r["error"]["code"] == json!(111)));
    Ok(())
}
