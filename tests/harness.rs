//! The test harness itself: a test database is fresh, notifies, finds and kills LISTEN
//! backends, and is dropped afterwards; a private Redis answers, stops and comes back.
//! (These run without the gateway, so a broken harness is told apart from a broken node.)

use crate::common;

use std::time::Duration;

use common::{postgres::LISTEN_APPLICATION_NAME, RedisServer, TestDb};
use futures_util::StreamExt as _;
use tokio_postgres::{AsyncMessage, NoTls};

async fn database_exists(admin_url: &str, name: &str) -> anyhow::Result<bool> {
    let (client, connection) = tokio_postgres::connect(admin_url, NoTls).await?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .await?;
    Ok(row.get::<_, i64>(0) == 1)
}

#[tokio::test]
async fn test_database_notifies_listeners_finds_and_kills_them_and_is_dropped() -> anyhow::Result<()>
{
    let db = TestDb::create().await;
    let (name, admin_url) = (db.name().to_string(), db.admin_url().to_string());
    assert!(
        database_exists(&admin_url, &name).await?,
        "{name} was not created"
    );

    // A listener that looks like the gateway's.
    let url = format!("{}?application_name={LISTEN_APPLICATION_NAME}", db.url());
    let (listener, mut connection) = tokio_postgres::connect(&url, NoTls).await?;
    let (sender, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let _ = sender.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    listener.batch_execute("LISTEN harness").await?;

    db.notify("harness", r#"{"id":1}"#).await?;
    let got = tokio::time::timeout(Duration::from_secs(10), notifications.recv()).await?;
    assert_eq!(
        got,
        Some(("harness".to_string(), r#"{"id":1}"#.to_string()))
    );

    let pids = db.listener_pids().await?;
    assert_eq!(pids.len(), 1, "listener pids {pids:?}");
    assert_eq!(db.terminate_listeners().await?, pids);
    tokio::time::timeout(Duration::from_secs(10), driver).await??;

    drop(db);
    assert!(
        !database_exists(&admin_url, &name).await?,
        "{name} was not dropped"
    );
    Ok(())
}

#[tokio::test]
async fn redis_server_answers_stops_and_restarts_on_the_same_port() -> anyhow::Result<()> {
    let mut redis = RedisServer::start().await;
    assert!(redis.command("PING")?.starts_with("+PONG"));
    assert!(redis.command("SET k v")?.starts_with("+OK"));

    let port = redis.port();
    redis.stop();
    assert!(
        redis.command("PING").is_err(),
        "still answering after stop()"
    );

    redis.restart().await;
    assert_eq!(redis.port(), port);
    assert!(
        redis.command("GET k")?.starts_with("$-1"),
        "data survived a restart without persistence"
    );
    Ok(())
}
