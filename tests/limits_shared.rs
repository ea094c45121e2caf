//! G6, shared limits, with real processes: three nodes on one Redis hold a limit of L per
//! subject together (not N×L); concurrent connections per user hold wherever clients
//! land; while Redis is down the configured fallback applies, and limits are shared again
//! once it is back.

use crate::common;

use std::time::{Duration, Instant};

use common::tokens::{self, hs256, SECRET};
use common::{Client, Cluster};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

async fn cluster(n: usize, extra: &[(&str, &str)]) -> anyhow::Result<Cluster> {
    let mut env = vec![
        ("PGFANOUT_ALLOW_ANONYMOUS", "false"),
        ("PGFANOUT_TOKEN_HMAC_SECRET_KEY", SECRET),
        ("PGFANOUT_LIMITS_ABUSE_THRESHOLD", "0"),
    ];
    env.extend_from_slice(extra);
    let cluster = Cluster::start_with(n, &[], true, &env).await;
    for node in &cluster.nodes {
        node.wait_ready(WAIT).await?;
    }
    Ok(cluster)
}

fn token(user: &str) -> String {
    hs256(&tokens::user(user, 600, &["*"], &["*"]))
}

#[tokio::test]
async fn three_nodes_accept_at_most_the_limit_of_subscribes_together() -> anyhow::Result<()> {
    const LIMIT: usize = 10;
    let cluster = cluster(3, &[("PGFANOUT_LIMIT_SUBSCRIBE_PER_SECOND", "10")]).await?;
    let mut clients = Vec::new();
    for node in &cluster.nodes {
        clients.push(Client::connect_with_token(&node.ws_url(), &token("spreader")).await?);
    }
    // 100 subscribes, spread over the three nodes, each node's share in one frame, all
    // sent before any reply is read.
    let started = Instant::now();
    for (n, client) in clients.iter_mut().enumerate() {
        let frame: Vec<String> = (0..100)
            .filter(|i| i % 3 == n)
            .map(|i| json!({"id": 100 + i, "subscribe": {"channel": format!("c{i}")}}).to_string())
            .collect();
        client.send_raw(&frame.join("\n")).await?;
    }
    let (mut accepted, mut limited) = (0, 0);
    for (n, client) in clients.iter_mut().enumerate() {
        for i in (0..100u64).filter(|i| i % 3 == n as u64) {
            let reply = client.next_reply(100 + i).await?;
            match reply.get("error") {
                None => accepted += 1,
                Some(e) => {
                    assert_eq!(e["code"], json!(111), "{reply}");
                    assert_eq!(e["temporary"], json!(true), "{reply}");
                    assert!(
                        e["retry_after_ms"]
                            .as_u64()
                            .is_some_and(|ms| ms > 0 && ms <= 1100),
                        "{reply}"
                    );
                    limited += 1;
                }
            }
        }
    }
    let elapsed = started.elapsed();
    eprintln!("accepted {accepted}, limited {limited} in {elapsed:?}");
    assert_eq!(accepted + limited, 100);
    // No one-second span holds more than the limit; the burst spans at most this many.
    let spans = 1 + elapsed.as_secs() as usize;
    assert!(
        accepted <= LIMIT * spans,
        "{accepted} accepted in {elapsed:?}: more than {LIMIT} per second across the nodes"
    );
    assert!(accepted >= 1, "nothing accepted");
    let shared: f64 = {
        let mut sum = 0.0;
        for node in &cluster.nodes {
            let text = node.metrics().await?;
            sum += text
                .lines()
                .filter(|l| {
                    l.starts_with("pgfanout_rate_limit_decisions_total{")
                        && l.contains("scope=\"shared\"")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
        }
        sum
    };
    assert!(shared >= 100.0, "decisions made in Redis: {shared}");

    // A second later the budget is back, on any node.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    clients[1].subscribe("after-a-second").await?;
    Ok(())
}

#[tokio::test]
async fn the_sixth_connection_of_a_user_is_refused_wherever_it_lands() -> anyhow::Result<()> {
    let cluster = cluster(3, &[("PGFANOUT_LIMIT_CONNECTIONS_PER_USER", "5")]).await?;
    let url = |i: usize| cluster.nodes[i % 3].ws_url();
    let mut open = Vec::new();
    for i in 0..5 {
        let node = rand::random::<u32>() as usize;
        open.push(Client::connect_with_token(&url(node + i), &token("five")).await?);
    }
    // The sixth, on every node: closed with 3504.
    for node in 0..3 {
        let mut sixth = Client::open(&url(node)).await?;
        sixth
            .send_json(&json!({"id": 1, "connect": {"token": token("five")}}))
            .await?;
        let (code, reason) = sixth.expect_close(WAIT).await?;
        assert_eq!(
            (code, reason.as_str()),
            (3504, "connection limit"),
            "node {node}"
        );
    }
    // Another user is not affected.
    Client::connect_with_token(&url(0), &token("someone-else")).await?;
    // One closes: a new one is accepted (on another node).
    open.pop().expect("five open").close().await;
    let again = common::eventually(WAIT, "a connection after one closed", || async {
        match Client::connect_with_token(&url(2), &token("five")).await {
            Ok(client) => Ok(client),
            Err(e) => Err(format!("{e:#}")),
        }
    })
    .await?;
    drop(again);
    Ok(())
}

/// Opens `n` connections of one user to `url` at once; returns (accepted, refused with
/// 111 and 3013).
async fn connect_burst(url: &str, user: &str, n: usize) -> anyhow::Result<(usize, usize)> {
    let mut clients = Vec::new();
    for _ in 0..n {
        let mut client = Client::open(url).await?;
        client
            .send_json(&json!({"id": 1, "connect": {"token": token(user)}}))
            .await?;
        clients.push(client);
    }
    let (mut accepted, mut refused) = (0, 0);
    for client in &mut clients {
        let reply: Value = client.next_reply(1).await?;
        if reply.get("connect").is_some() {
            accepted += 1;
        } else {
            assert_eq!(reply["error"]["code"], json!(111), "{reply}");
            let (code, _) = client.expect_close(WAIT).await?;
            assert_eq!(code, 3013);
            refused += 1;
        }
    }
    Ok((accepted, refused))
}

async fn wait_limits_mode(node: &common::Node, mode: &str) -> anyhow::Result<()> {
    node.wait_ready_where(WAIT, &format!("limits {mode}"), |_, body| {
        body["limits"] == json!(mode)
    })
    .await
    .map(|_| ())
}

#[tokio::test]
async fn with_redis_down_the_fallback_applies_and_sharing_resumes_after() -> anyhow::Result<()> {
    let mut cluster = cluster(2, &[("PGFANOUT_LIMIT_CONNECT_PER_SECOND", "3")]).await?;
    let local = cluster.nodes[0].ws_url();
    wait_limits_mode(&cluster.nodes[0], "shared").await?;
    // Shared: 3 per second for the user across both nodes.
    let started = Instant::now();
    let (a, _) = connect_burst(&local, "u1", 4).await?;
    let (b, _) = connect_burst(&cluster.nodes[1].ws_url(), "u1", 4).await?;
    let spans = 1 + started.elapsed().as_secs() as usize;
    assert!(
        a + b <= 3 * spans,
        "shared limit across nodes: {a} + {b} in {spans} s"
    );

    cluster.redis.as_mut().expect("redis").stop();
    wait_limits_mode(&cluster.nodes[0], "local").await?;
    // Local fallback (the default): limits still hold, per node.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let started = Instant::now();
    let (accepted, refused) = connect_burst(&local, "u2", 6).await?;
    // 3 per second on this node (a slow machine may spread the burst over more seconds).
    let spans = 1 + started.elapsed().as_secs() as usize;
    assert!(
        accepted >= 1 && accepted <= 3 * spans && accepted + refused == 6,
        "local: {accepted} accepted, {refused} refused in {spans} s"
    );
    assert!(
        refused >= 1 || spans > 1,
        "nothing refused: the fallback did not limit"
    );
    let degraded = cluster.nodes[0]
        .metric_sum("pgfanout_rate_limit_degraded")
        .await?;
    assert_eq!(degraded, 1.0);

    cluster.redis.as_mut().expect("redis").restart().await;
    wait_limits_mode(&cluster.nodes[0], "shared").await?;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (accepted, _) = connect_burst(&local, "u3", 2).await?;
    assert_eq!(accepted, 2);
    common::eventually(WAIT, "degraded back to 0", || async {
        match cluster.nodes[0]
            .metric_sum("pgfanout_rate_limit_degraded")
            .await
        {
            Ok(v) if v < 0.5 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn with_redis_down_the_refuse_fallback_refuses_limited_actions() -> anyhow::Result<()> {
    let mut cluster = cluster(
        1,
        &[
            ("PGFANOUT_LIMIT_CONNECT_PER_SECOND", "100"),
            ("PGFANOUT_LIMITS_FALLBACK", "refuse"),
        ],
    )
    .await?;
    let url = cluster.node().ws_url();
    assert_eq!(connect_burst(&url, "r", 2).await?, (2, 0));
    cluster.redis.as_mut().expect("redis").stop();
    wait_limits_mode(cluster.node(), "refusing").await?;
    assert_eq!(connect_burst(&url, "r", 2).await?, (0, 2));
    cluster.redis.as_mut().expect("redis").restart().await;
    wait_limits_mode(cluster.node(), "shared").await?;
    common::eventually(WAIT, "connects accepted again", || async {
        match connect_burst(&url, "r", 1).await {
            Ok((1, 0)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await?;
    Ok(())
}
