//! Tokens against a real node: valid, expired, wrong signature, wrong algorithm (`none`,
//! HS/RS confusion), missing claims, a channel outside the claims, subscription tokens,
//! refresh and expiry. Each gets its documented answer (proto/README.md §6, §7, §11) and
//! nothing else breaks: the node stays ready and other clients keep working.

use crate::common;

use std::time::Duration;

use common::tokens::{self, hs256, key_file, now, rs256, SECRET};
use common::{Client, Cluster};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

/// One node with an HMAC secret and an RSA key, anonymous access off.
async fn secured(extra: &[(&str, &str)]) -> anyhow::Result<Cluster> {
    let rsa = key_file("rsa_public.pem").display().to_string();
    let mut env = vec![
        ("PGFANOUT_ALLOW_ANONYMOUS", "false"),
        ("PGFANOUT_TOKEN_HMAC_SECRET_KEY", SECRET),
        ("PGFANOUT_TOKEN_RSA_PUBLIC_KEY", rsa.as_str()),
    ];
    env.extend_from_slice(extra);
    let cluster = Cluster::start_with(1, &["orders"], false, &env).await;
    cluster.wait_bridged().await?;
    Ok(cluster)
}

/// Sends `connect` with `token` and returns the reply or the close.
async fn try_connect(url: &str, token: &str) -> anyhow::Result<(Client, Value)> {
    let mut client = Client::open(url).await?;
    client
        .send_json(&json!({"id": 1, "connect": {"token": token}}))
        .await?;
    let reply = client.next_reply(1).await.unwrap_or(Value::Null);
    Ok((client, reply))
}

async fn expect_closed_with(url: &str, token: &str, code: u16, what: &str) -> anyhow::Result<()> {
    let (mut client, reply) = try_connect(url, token).await?;
    assert_eq!(reply, Value::Null, "{what}: no reply expected, got {reply}");
    let (got, reason) = client.expect_close(WAIT).await?;
    assert_eq!(got, code, "{what}: closed with {got} {reason:?}");
    Ok(())
}

#[tokio::test]
async fn each_kind_of_token_gets_its_documented_answer() -> anyhow::Result<()> {
    let cluster = secured(&[]).await?;
    let url = cluster.node().ws_url();

    // Valid, HS256 and RS256: connected, told when the token expires.
    for token in [
        hs256(&tokens::user("alice", 300, &["orders", "user:{sub}"], &[])),
        rs256(&tokens::user("alice", 300, &["orders", "user:{sub}"], &[])),
    ] {
        let (mut client, reply) = try_connect(&url, &token).await?;
        let result = &reply["connect"];
        assert_eq!(result["expires"], json!(true), "{reply}");
        let ttl = result["ttl"].as_u64().unwrap_or(0);
        assert!((290..=300).contains(&ttl), "ttl {ttl}: {reply}");
        client.subscribe("user:alice").await?;
        // A channel outside the claims: 103, and the connection goes on.
        let refused = client.try_subscribe("user:bob").await?.unwrap_err();
        assert_eq!(refused.code, 103, "{refused}");
        let refused = client.publish("orders", json!(1)).await?.unwrap_err();
        assert_eq!(refused.code, 103, "no publish claim: {refused}");
        client.subscribe("orders").await?;
    }

    // Expired: error 109 and the connection stays, so a new token can follow at once.
    let expired = hs256(&json!({"sub": "alice", "exp": now() - 5, "channels": ["orders"]}));
    let (mut client, reply) = try_connect(&url, &expired).await?;
    assert_eq!(reply["error"]["code"], json!(109), "{reply}");
    let fresh = hs256(&tokens::user("alice", 300, &["orders"], &[]));
    let again = client.call("connect", json!({"token": fresh})).await??;
    assert!(again["client"].is_string(), "{again}");

    // Wrong signature, wrong algorithm, missing claims, garbage, no token: closed with 3500.
    let claims = tokens::user("alice", 300, &["*"], &["*"]);
    let other_secret = tokens::sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"not-the-secret-at-all"),
        &claims,
    );
    let b64 = |v: &Value| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims)
    );
    let rsa_public = std::fs::read(key_file("rsa_public.pem"))?;
    let confused = tokens::sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&rsa_public),
        &claims,
    );
    let es256 = tokens::sign(
        Algorithm::ES256,
        &EncodingKey::from_ec_pem(&std::fs::read(key_file("ec_private.pem"))?)?,
        &claims,
    );
    let no_sub = hs256(&json!({"exp": now() + 300, "channels": ["*"]}));
    let no_exp = hs256(&json!({"sub": "alice", "channels": ["*"]}));
    let sub_token_as_connect = hs256(&tokens::subscription("alice", "orders", 300));
    for (token, what) in [
        (other_secret.as_str(), "wrong signature"),
        (none.as_str(), "alg none"),
        (confused.as_str(), "HS256 signed with the RSA public key"),
        (es256.as_str(), "ES256 without an ECDSA key configured"),
        (no_sub.as_str(), "missing sub"),
        (no_exp.as_str(), "missing exp"),
        (
            sub_token_as_connect.as_str(),
            "subscription token used to connect",
        ),
        ("garbage", "not a JWT"),
        ("", "no token while anonymous access is off"),
    ] {
        expect_closed_with(&url, token, 3500, what).await?;
    }

    // Nothing else broke: the node is ready, the earlier client still works.
    cluster.node().wait_ready(WAIT).await?;
    client.subscribe("orders").await?;
    cluster
        .db
        .notify("orders", r#"{"after":"all that"}"#)
        .await?;
    let publication = client.next_pub(WAIT).await?;
    assert_eq!(publication.data, json!({"after": "all that"}));
    let failures = cluster
        .node()
        .metric_sum("pgfanout_auth_failures_total")
        .await?;
    assert!(failures >= 12.0, "auth failures counted: {failures}");
    Ok(())
}

#[tokio::test]
async fn subscription_tokens_grant_one_channel_and_expire_with_2501() -> anyhow::Result<()> {
    let cluster = secured(&[("PGFANOUT_TOKEN_EXPIRY_GRACE", "1s")]).await?;
    let url = cluster.node().ws_url();
    let token = hs256(&tokens::user("carol", 300, &[], &[]));
    let mut client = Client::connect_with_token(&url, &token).await?;
    assert_eq!(
        client.try_subscribe("private").await?.unwrap_err().code,
        103
    );

    let grant = hs256(&tokens::subscription("carol", "private", 2));
    let result = client
        .call("subscribe", json!({"channel": "private", "token": grant}))
        .await??;
    assert_eq!(result["expires"], json!(true), "{result}");
    // Another channel with that token, another user's token, an expired one.
    let wrong_channel = client
        .call("subscribe", json!({"channel": "other", "token": grant}))
        .await?
        .unwrap_err();
    assert_eq!(wrong_channel.code, 103);
    let dave = hs256(&tokens::subscription("dave", "secret", 60));
    let wrong_user = client
        .call("subscribe", json!({"channel": "secret", "token": dave}))
        .await?
        .unwrap_err();
    assert_eq!(wrong_user.code, 103);
    let stale = hs256(&json!({"sub": "carol", "channel": "secret", "exp": now() - 1}));
    let expired = client
        .call("subscribe", json!({"channel": "secret", "token": stale}))
        .await?
        .unwrap_err();
    assert_eq!(expired.code, 109);

    // Not refreshed: within exp + grace the server ends the subscription with 2501.
    let push = client.next_push(WAIT).await?;
    assert_eq!(
        push["push"]["unsubscribe"]["code"],
        json!(2501),
        "expected the subscription-expired push: {push}"
    );
    assert_eq!(push["push"]["channel"], json!("private"));

    // Refreshed in time: it lives on past its first token.
    let grant = hs256(&tokens::subscription("carol", "private", 4));
    client
        .call("subscribe", json!({"channel": "private", "token": grant}))
        .await??;
    let longer = hs256(&tokens::subscription("carol", "private", 300));
    let refreshed = client
        .call(
            "sub_refresh",
            json!({"channel": "private", "token": longer}),
        )
        .await??;
    assert_eq!(refreshed["expires"], json!(true), "{refreshed}");
    client.idle(Duration::from_secs(6)).await?;
    // Published by a second connection of the same user, which may publish there.
    let publisher = hs256(&tokens::user("carol", 300, &[], &["private"]));
    let mut publisher = Client::connect_with_token(&url, &publisher).await?;
    publisher.publish("private", json!("still here")).await??;
    let publication = client.next_pub(WAIT).await?;
    assert_eq!(publication.data, json!("still here"));
    Ok(())
}

#[tokio::test]
async fn an_unrefreshed_connection_closes_with_3005_and_a_refreshed_one_lives() -> anyhow::Result<()>
{
    let cluster = secured(&[("PGFANOUT_TOKEN_EXPIRY_GRACE", "1s")]).await?;
    let url = cluster.node().ws_url();
    // Short, with room for a slow machine to refresh in time.
    let short = || hs256(&tokens::user("erin", 4, &["orders"], &[]));

    let mut lazy = Client::connect_with_token(&url, &short()).await?;
    let mut diligent = Client::connect_with_token(&url, &short()).await?;
    let result = diligent
        .call(
            "refresh",
            json!({"token": hs256(&tokens::user("erin", 300, &["orders"], &[]))}),
        )
        .await??;
    assert_eq!(result["expires"], json!(true), "{result}");
    assert!(result["ttl"].as_u64().unwrap_or(0) > 200, "{result}");

    let (code, reason) = lazy.expect_close(WAIT).await?;
    assert_eq!((code, reason.as_str()), (3005, "connection expired"));
    diligent.idle(Duration::from_secs(1)).await?;
    diligent.subscribe("orders").await?;

    // A refresh with another user's token is an invalid token.
    let thief = hs256(&tokens::user("mallory", 300, &["*"], &[]));
    diligent
        .send_json(&json!({"id": 99, "refresh": {"token": thief}}))
        .await?;
    let (code, _) = diligent.expect_close(WAIT).await?;
    assert_eq!(code, 3500);
    Ok(())
}

#[tokio::test]
async fn anonymous_access_is_per_channel_pattern_and_tokens_add_to_it() -> anyhow::Result<()> {
    let cluster = secured(&[
        ("PGFANOUT_ALLOW_ANONYMOUS", "true"),
        ("PGFANOUT_ANONYMOUS_CHANNELS", "public.*"),
        ("PGFANOUT_ALLOW_ANONYMOUS_PUBLISH", "true"),
        ("PGFANOUT_ANONYMOUS_PUBLISH_CHANNELS", "public.chat"),
    ])
    .await?;
    let url = cluster.node().ws_url();
    let mut anonymous = Client::connect(&url).await?;
    anonymous.subscribe("public.news").await?;
    assert_eq!(
        anonymous.try_subscribe("orders").await?.unwrap_err().code,
        103
    );
    assert_eq!(
        anonymous
            .publish("public.news", json!(1))
            .await?
            .unwrap_err()
            .code,
        103
    );
    anonymous.subscribe("public.chat").await?;
    anonymous.publish("public.chat", json!("hi")).await??;
    assert_eq!(anonymous.next_pub(WAIT).await?.data, json!("hi"));

    let token = hs256(&tokens::user("frank", 300, &["orders"], &[]));
    let mut user = Client::connect_with_token(&url, &token).await?;
    user.subscribe("orders").await?;
    user.subscribe("public.news").await?;
    Ok(())
}

#[tokio::test]
async fn browsers_from_other_origins_are_refused_before_the_upgrade() -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

    let cluster = secured(&[
        ("PGFANOUT_ALLOW_ANONYMOUS", "true"),
        (
            "PGFANOUT_ALLOWED_ORIGINS",
            "https://app.example.com,https://*.example.org",
        ),
    ])
    .await?;
    let url = cluster.node().ws_url();
    let with_origin = |origin: &str| {
        let mut request = url.as_str().into_client_request().expect("request");
        request
            .headers_mut()
            .insert("origin", origin.parse().expect("header value"));
        request
    };
    for (origin, allowed) in [
        ("https://app.example.com", true),
        ("https://eu.example.org", true),
        ("https://evil.example.com", false),
        ("null", false),
    ] {
        let outcome = tokio_tungstenite::connect_async(with_origin(origin)).await;
        match (outcome, allowed) {
            (Ok(_), true) => {}
            (Err(tokio_tungstenite::tungstenite::Error::Http(response)), false) => {
                assert_eq!(response.status().as_u16(), 403, "{origin}");
            }
            (other, _) => panic!("{origin}: allowed={allowed}, got {:?}", other.map(|_| ())),
        }
    }
    // No Origin header: not a browser, not checked.
    Client::connect(&url).await?;
    Ok(())
}

#[tokio::test]
async fn jwks_file_keys_verify_tokens_and_rotate_without_restart() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("pgfanout-jwks-{}", common::random_tag()));
    std::fs::create_dir_all(&dir)?;
    let jwks = dir.join("jwks.json");
    std::fs::copy(key_file("jwks_k1.json"), &jwks)?;
    let path = jwks.display().to_string();
    let cluster = Cluster::start_with(
        1,
        &[],
        false,
        &[
            ("PGFANOUT_ALLOW_ANONYMOUS", "false"),
            ("PGFANOUT_TOKEN_JWKS_FILE", path.as_str()),
        ],
    )
    .await;
    let url = cluster.node().ws_url();
    let signed = |private: &str, kid: &str| -> anyhow::Result<String> {
        let mut header = jsonwebtoken::Header::new(Algorithm::RS256);
        header.kid = Some(kid.into());
        let key = EncodingKey::from_rsa_pem(&std::fs::read(key_file(private))?)?;
        Ok(jsonwebtoken::encode(
            &header,
            &tokens::user("gina", 300, &["x"], &[]),
            &key,
        )?)
    };
    Client::connect_with_token(&url, &signed("rsa_private.pem", "k1")?).await?;
    expect_closed_with(
        &url,
        &signed("rsa_other_private.pem", "k2")?,
        3500,
        "k2 unknown",
    )
    .await?;

    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::copy(key_file("jwks_k2.json"), &jwks)?;
    let token = signed("rsa_other_private.pem", "k2")?;
    common::eventually(WAIT, "the rotated JWKS key to verify", || async {
        match Client::connect_with_token(&url, &token).await {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("{e:#}")),
        }
    })
    .await?;
    expect_closed_with(
        &url,
        &signed("rsa_private.pem", "k1")?,
        3500,
        "k1 rotated out",
    )
    .await?;
    let reloads = cluster
        .node()
        .metric_sum("pgfanout_jwks_reloads_total")
        .await?;
    assert!(reloads >= 1.0, "reloads {reloads}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
