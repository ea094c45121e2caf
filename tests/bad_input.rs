//! Bad input from one client gets the documented error or disconnect code, and harms nobody
//! else: a well-behaved client on the same node keeps receiving, and after a command-level error
//! the offending connection itself keeps its subscriptions and can still subscribe.

use crate::common;

use std::time::Duration;

use common::{Client, Cluster, Node};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// `PGFANOUT_MAX_FRAME_BYTES` for this test: small, so an oversized frame is cheap to send.
const MAX_FRAME_BYTES: usize = 1024;
/// Command id used in the hand-written frames, so the reply can be found.
const BAD_ID: u64 = 100;
const WAIT: Duration = Duration::from_secs(10);

/// What the bad client sends.
enum Frame {
    Text(String),
    Binary(Vec<u8>),
}

/// What the gateway must answer.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Close the connection with this code.
    Close(u16),
    /// Reply to command `BAD_ID` with this error code and keep the connection.
    Error(u64),
}

/// How far the bad client got before misbehaving.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Setup {
    /// WebSocket open, no `connect` yet.
    Open,
    /// `connect` done.
    Connected,
    /// `connect` done and subscribed to `orders`.
    Subscribed,
}

struct Case {
    name: &'static str,
    setup: Setup,
    frame: Frame,
    expect: Expect,
}

impl Case {
    fn new(name: &'static str, setup: Setup, frame: Frame, expect: Expect) -> Case {
        Case {
            name,
            setup,
            frame,
            expect,
        }
    }
}

fn text(text: impl Into<String>) -> Frame {
    Frame::Text(text.into())
}

fn subscribe(channel: &str) -> Frame {
    text(json!({"id": BAD_ID, "subscribe": {"channel": channel}}).to_string())
}

// One line per case reads as a table; rustfmt would spread each over six lines.
#[rustfmt::skip]
fn cases() -> Vec<Case> {
    use Expect::{Close, Error};
    use Setup::{Connected, Open, Subscribed};
    let too_big = "x".repeat(2 * MAX_FRAME_BYTES);
    let oversized = json!({"id": BAD_ID, "publish": {"channel": "orders", "data": too_big}})
        .to_string();
    let binary = br#"{"id":100,"subscribe":{"channel":"orders"}}"#.to_vec();
    vec![
        Case::new("malformed JSON", Connected, text(r#"{"id":2,"subscribe":{"#), Close(3501)),
        Case::new("malformed JSON as the first frame", Open, text("hello?"), Close(3501)),
        Case::new("unknown command", Connected, text(r#"{"id":100,"frobnicate":{}}"#), Error(104)),
        Case::new("frame over the size limit", Subscribed, text(oversized), Close(3501)),
        Case::new("binary frame", Connected, Frame::Binary(binary), Close(3501)),
        Case::new("empty channel name", Connected, subscribe(""), Error(107)),
        Case::new("300-byte channel name", Connected, subscribe(&"c".repeat(300)), Error(107)),
        Case::new("control character in channel", Connected, subscribe("ord\u{1}ers"), Error(107)),
        Case::new("whitespace in channel name", Connected, subscribe("or ders"), Error(107)),
        Case::new("subscribe twice to a channel", Subscribed, subscribe("orders"), Error(105)),
        Case::new("command before connect", Open, subscribe("orders"), Close(3501)),
        Case::new("second connect", Connected, text(r#"{"id":100,"connect":{}}"#), Close(3501)),
        Case::new("command without id", Connected, text(r#"{"subscribe":{"channel":"x"}}"#), Close(3501)),
    ]
}

#[tokio::test]
async fn each_bad_input_gets_its_documented_code_and_spares_other_clients() -> anyhow::Result<()> {
    let max_frame = MAX_FRAME_BYTES.to_string();
    let cluster = Cluster::start_with(
        1,
        &["orders"],
        true,
        &[("PGFANOUT_MAX_FRAME_BYTES", &max_frame)],
    )
    .await;
    cluster.wait_bridged().await?;
    let node = cluster.node();
    let mut observer = Client::connect(&node.ws_url()).await?;
    observer.subscribe("orders").await?;

    let mut sent = 0u64;
    let mut failures = Vec::new();
    for case in cases() {
        if let Err(err) = run_case(&cluster, node, &mut observer, &mut sent, &case).await {
            failures.push(format!(
                "{} (expected {:?}): {err:#}",
                case.name, case.expect
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases().len(),
        failures.join("\n")
    );
    Ok(())
}

/// One case: the bad client misbehaves, then a notification must reach the observer (and, after
/// a command-level error, the bad client too, exactly once).
async fn run_case(
    cluster: &Cluster,
    node: &Node,
    observer: &mut Client,
    sent: &mut u64,
    case: &Case,
) -> anyhow::Result<()> {
    let mut bad = match case.setup {
        Setup::Open => Client::open(&node.ws_url()).await?,
        Setup::Connected | Setup::Subscribed => Client::connect(&node.ws_url()).await?,
    };
    if case.setup == Setup::Subscribed {
        bad.subscribe("orders").await?;
    }
    let message = match &case.frame {
        Frame::Text(text) => Message::text(text.as_str()),
        Frame::Binary(bytes) => Message::binary(bytes.clone()),
    };
    bad.send_message(message).await?;

    match case.expect {
        Expect::Close(code) => {
            let (got, reason) = bad.expect_close(WAIT).await?;
            anyhow::ensure!(got == code, "closed with {got} {reason:?}");
        }
        Expect::Error(code) => {
            let reply = bad.next_reply(BAD_ID).await?;
            let got = reply["error"]["code"].as_u64();
            anyhow::ensure!(got == Some(code), "reply {reply}");
            if case.setup != Setup::Subscribed {
                bad.subscribe("orders")
                    .await
                    .map_err(|err| err.context("same connection after the error"))?;
            }
        }
    }

    let data = json!({"case": case.name});
    cluster.db.notify("orders", &data.to_string()).await?;
    *sent += 1;
    let got = next_pub_with(observer, &data)
        .await
        .map_err(|err| err.context("the observer client"))?;
    anyhow::ensure!(got == *sent, "observer got offset {got}, expected {sent}");
    if let Expect::Error(_) = case.expect {
        let got = next_pub_with(&mut bad, &data)
            .await
            .map_err(|err| err.context("the same connection"))?;
        anyhow::ensure!(
            got == *sent,
            "same connection got offset {got}, expected {sent}"
        );
        bad.expect_no_pub(Duration::from_millis(200))
            .await
            .map_err(|err| err.context("the same connection received it twice"))?;
    }
    Ok(())
}

/// Skips publications of earlier (failed) cases until the one carrying `data`; returns its offset.
async fn next_pub_with(client: &mut Client, data: &Value) -> anyhow::Result<u64> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let publication = client
            .next_pub(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await?;
        if publication.data == *data {
            return Ok(publication.offset);
        }
    }
}
