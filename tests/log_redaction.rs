//! No secrets in logs (issue #9): the database and Redis passwords of the connection URLs,
//! the token verification key, API keys and the clients' tokens never appear in a node's
//! output, at `debug`, whatever the clients send and whichever dependency fails, nor in the
//! message of a configuration refused at start.

use crate::common;

use std::time::Duration;

use anyhow::ensure;
use common::{free_port, tokens, Client, Node, RedisServer, TestDb};
use serde_json::json;

const DB_PASSWORD: &str = "dbpw-7f3a9c1e55";
const REDIS_PASSWORD: &str = "redispw-4be21d90aa";
const API_KEY: &str = "apikey-5d0c2b7e91aa3f";

/// `url` with `user:password@` for its user.
fn with_password(url: &str, password: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((user, host)) => format!("{scheme}://{user}:{password}@{host}"),
            None => format!("{scheme}://postgres:{password}@{rest}"),
        },
        None => url.to_string(),
    }
}

/// Every secret the node or its clients handled, and where it must not appear.
struct Secrets(Vec<(String, &'static str)>);

impl Secrets {
    fn token(&mut self, token: &str, what: &'static str) {
        // The signature alone would do as much harm as the whole token.
        if let Some(signature) = token.rsplit('.').next().filter(|s| s.len() >= 16) {
            self.0.push((signature.to_string(), what));
        }
        self.0.push((token.to_string(), what));
    }

    fn check(&self, name: &str, text: &str) -> anyhow::Result<()> {
        let leaked: Vec<&str> = self
            .0
            .iter()
            .filter(|(secret, _)| text.contains(secret.as_str()))
            .map(|(_, what)| *what)
            .collect();
        ensure!(leaked.is_empty(), "{name} leaks: {leaked:?}\n{text}");
        Ok(())
    }
}

#[tokio::test]
async fn node_logs_and_config_errors_hold_no_secrets() -> anyhow::Result<()> {
    let mut secrets = Secrets(vec![
        (DB_PASSWORD.into(), "database password"),
        (REDIS_PASSWORD.into(), "redis password"),
        (API_KEY.into(), "API key"),
        (tokens::SECRET.into(), "HMAC key"),
    ]);
    let db = TestDb::create().await;
    let redis = RedisServer::start().await;
    // The test server trusts local connections, so the password is carried but never asked.
    let db_url = with_password(db.url(), DB_PASSWORD);
    let node = Node::builder()
        .database(&db)
        .redis(&redis)
        .channels(&["orders"])
        .env("PGFANOUT_DATABASE_URL", &db_url)
        .env("PGFANOUT_LOG", "debug")
        .env("PGFANOUT_TOKEN_HMAC_SECRET_KEY", tokens::SECRET)
        .env("PGFANOUT_API_KEYS", API_KEY)
        .env("PGFANOUT_ALLOW_ANONYMOUS", "false")
        .start()
        .await;
    node.wait_ready(Duration::from_secs(30)).await?;

    let valid = tokens::hs256(&tokens::user("alice", 600, &["orders"], &[]));
    let expired = {
        let mut claims = tokens::user("alice", 600, &["orders"], &[]);
        claims["exp"] = json!(tokens::now() - 3600);
        tokens::hs256(&claims)
    };
    let forged = {
        let mut parts: Vec<String> = valid.split('.').map(str::to_string).collect();
        parts[2] = "Zm9yZ2VkLXNpZ25hdHVyZS1mb3JnZWQtc2lnbmF0dXJl".into();
        parts.join(".")
    };
    let subscription = tokens::hs256(&tokens::subscription("alice", "private", 600));
    secrets.token(&valid, "connection token");
    secrets.token(&expired, "expired token");
    secrets.token(&forged, "forged token");
    secrets.token(&subscription, "subscription token");

    // Tokens accepted, refused, expired, misplaced; a refresh with a forged one.
    let mut alice = Client::connect_with_token(&node.ws_url(), &valid).await?;
    alice.subscribe("orders").await?;
    let body = json!({"channel": "private", "token": subscription});
    let _ = alice.call("subscribe", body).await?;
    let _ = alice.call("refresh", json!({"token": forged})).await;
    for (frame, expect) in [
        (json!({"id": 1, "connect": {"token": expired}}), None),
        (json!({"id": 1, "connect": {"token": forged}}), Some(3500)),
        // A token where a number belongs: the decoder's error must not quote it.
        (json!({"id": valid, "connect": {}}), Some(3501)),
        (
            json!({"id": 1, "connect": {"token": valid, "name": 7}}),
            Some(3501),
        ),
    ] {
        let mut client = Client::open(&node.ws_url()).await?;
        client.send_json(&frame).await?;
        match expect {
            Some(code) => ensure!(client.expect_close(Duration::from_secs(10)).await?.0 == code),
            None => ensure!(client.next_reply(1).await?["error"]["code"] == 109),
        }
    }
    // The publish API with its key, and with a wrong one.
    let http = reqwest::Client::new();
    for key in [API_KEY.to_string(), format!("{API_KEY}x")] {
        let _ = http
            .post(node.http_url("/api/publish"))
            .header("authorization", format!("apikey {key}"))
            .body(json!({"channel": "orders", "data": 1}).to_string())
            .send()
            .await?;
    }
    // Dependencies that refuse, with passwords in their URLs: a database that is not there,
    // and a Redis that is not there.
    let dead = free_port();
    let dead_url = format!("postgres://postgres@127.0.0.1:{dead}/x");
    let no_database = Node::builder()
        .channels(&["orders"])
        .env(
            "PGFANOUT_DATABASE_URL",
            &with_password(&dead_url, DB_PASSWORD),
        )
        .env("PGFANOUT_LOG", "debug")
        .only_wait_for_health()
        .start()
        .await;
    let no_redis = Node::builder()
        .env(
            "PGFANOUT_REDIS_URL",
            &format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{dead}/0"),
        )
        .env("PGFANOUT_LOG", "debug")
        .only_wait_for_health()
        .start()
        .await;
    for (node, what) in [
        (&no_database, "postgres"),
        (&no_redis, "cannot reach redis"),
    ] {
        common::eventually(Duration::from_secs(60), what, || async {
            let log = node.log();
            if log.contains(what) {
                Ok(())
            } else {
                Err(log)
            }
        })
        .await?;
    }

    secrets.check("the node's log", &node.log())?;
    secrets.check(
        "the log of the node without its database",
        &no_database.log(),
    )?;
    secrets.check("the log of the node without its Redis", &no_redis.log())?;

    // Settings refused at start: their messages name the setting, not its value.
    for (key, value) in [
        (
            "PGFANOUT_REDIS_URL",
            format!("redis://:{REDIS_PASSWORD}@127.0.0.1:notaport/0"),
        ),
        (
            "PGFANOUT_REDIS_URL",
            format!("rediss://:{REDIS_PASSWORD}@/0"),
        ),
        (
            "PGFANOUT_DATABASE_URL",
            format!("postgres://u:{DB_PASSWORD}@127.0.0.1:99999/x"),
        ),
        (
            "PGFANOUT_DATABASE_URL",
            format!("postgres://u:{DB_PASSWORD}@127.0.0.1/x?sslmode=bogus"),
        ),
        ("PGFANOUT_API_KEYS", format!("{API_KEY},short")),
        ("PGFANOUT_TOKEN_HMAC_SECRET_KEY", "short".to_string()),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_pgfanout"))
            .env_clear()
            .env(key, &value)
            .env("PGFANOUT_LISTEN", "127.0.0.1:0")
            .output()?;
        ensure!(!output.status.success(), "{key}={value} was accepted");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        secrets.check(&format!("the error for a bad {key}"), &text)?;
    }
    Ok(())
}
