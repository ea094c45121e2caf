//! Bad input from one client gets the documented error or disconnect code, and harms nobody
//! else: a well-behaved client on the same node keeps receiving, and after a command-level error
//! the offending connection itself keeps its subscriptions and can still subscribe.
//!
//! The table covers the hostile frames of issue #9 (G7): broken encodings (invalid UTF-8, binary
//! frames, frames over the size limit), JSON that is valid but hostile (deep nesting, huge
//! numbers, wrong types, unknown or duplicate fields, reused ids), offsets out of range, channel
//! names that break the rules, and channels of another tenant.

use crate::common;

use std::time::Duration;

use common::{tokens, Client, Cluster, Node};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame as RawFrame;
use tokio_tungstenite::tungstenite::Message;

/// `PGFANOUT_MAX_FRAME_BYTES` for this test: small, so an oversized frame is cheap to send.
const MAX_FRAME_BYTES: usize = 1024;
/// Command id used in the hand-written frames, so the reply can be found.
const BAD_ID: u64 = 100;
const WAIT: Duration = Duration::from_secs(10);
/// The bad clients' subject in [`Setup::Tenant`].
const TENANT_USER: &str = "acme-user";

/// What the bad client sends.
enum Frame {
    Text(String),
    Binary(Vec<u8>),
    /// A text frame whose payload is sent as given, even when it is not UTF-8.
    RawText(Vec<u8>),
}

/// What the gateway must answer.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Close the connection with this code.
    Close(u16),
    /// Reply to the command with this error code and keep the connection.
    Error(u64),
    /// Reply with this many results of this method (a reused id is answered each time).
    Results(&'static str, usize),
    /// A subscribe result that was recovering and did not recover (`recovered` not true).
    NotRecovered,
}

/// How far the bad client got before misbehaving.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Setup {
    /// WebSocket open, no `connect` yet.
    Open,
    /// Anonymous `connect` done.
    Connected,
    /// Anonymous `connect` done and subscribed to `orders`.
    Subscribed,
    /// `connect` with a token of tenant `acme`: `tenant:acme:*` only.
    Tenant,
}

struct Case {
    name: &'static str,
    setup: Setup,
    frame: Frame,
    expect: Expect,
    /// The id the reply carries (`BAD_ID` unless the case is about ids).
    reply_id: u64,
}

impl Case {
    fn new(name: &'static str, setup: Setup, frame: Frame, expect: Expect) -> Case {
        Case {
            name,
            setup,
            frame,
            expect,
            reply_id: BAD_ID,
        }
    }

    fn reply_id(mut self, id: u64) -> Case {
        self.reply_id = id;
        self
    }
}

fn text(text: impl Into<String>) -> Frame {
    Frame::Text(text.into())
}

fn command(body: Value) -> Frame {
    let mut command = json!({"id": BAD_ID});
    if let (Some(target), Some(fields)) = (command.as_object_mut(), body.as_object()) {
        target.extend(fields.clone());
    }
    text(command.to_string())
}

fn subscribe(channel: &str) -> Frame {
    command(json!({"subscribe": {"channel": channel}}))
}

/// What the table needs from the running node.
struct Context {
    /// The current epoch of `orders`.
    epoch: String,
    /// A subscription token of [`TENANT_USER`] for `tenant:acme:orders`.
    acme_subscription: String,
}

/// The connection token of [`Setup::Tenant`].
fn tenant_token() -> String {
    tokens::hs256(&tokens::user(
        TENANT_USER,
        600,
        &["tenant:acme:*"],
        &["tenant:acme:*"],
    ))
}

// One line per case reads as a table; rustfmt would spread each over six lines.
#[rustfmt::skip]
fn cases(cx: &Context) -> Vec<Case> {
    use Expect::{Close, Error, NotRecovered, Results};
    use Setup::{Connected, Open, Subscribed, Tenant};
    let too_big = "x".repeat(2 * MAX_FRAME_BYTES);
    let oversized = json!({"id": BAD_ID, "publish": {"channel": "orders", "data": too_big}})
        .to_string();
    let binary = br#"{"id":100,"subscribe":{"channel":"orders"}}"#.to_vec();
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    // The limit counts the command and `publish` objects: data may nest 62 levels.
    let publish_nested = |depth: usize| format!(r#"{{"id":100,"publish":{{"channel":"open.nested","data":{}}}}}"#, nested(depth));
    let deep_unknown = format!(r#"{{"id":100,"subscribe":{{"channel":"open.deep"}},"x":{}}}"#, nested(200));
    let brackets_in_string = format!(r#"{{"id":100,"publish":{{"channel":"open.nested","data":"{}"}}}}"#, "[{".repeat(200));
    let huge_numbers = r#"{"id":100,"publish":{"channel":"open.numbers","data":[1e999999,123456789012345678901234567890,-0.0e-999999]}}"#;
    let mut invalid_utf8 = br#"{"id":100,"subscribe":{"channel":"or"#.to_vec();
    invalid_utf8.extend_from_slice(b"\xff\xfe\"}}");
    let reused_ids = r#"{"id":100,"subscribe":{"channel":"open.a"}}
{"id":100,"subscribe":{"channel":"open.b"}}"#;
    let ahead = json!({"id": BAD_ID, "subscribe": {"channel": "orders", "recover": true, "epoch": cx.epoch, "offset": u64::MAX}});
    let other_subscription = json!({"subscribe": {"channel": "tenant:globex:orders", "token": cx.acme_subscription}});
    vec![
        // Encodings and frames.
        Case::new("malformed JSON", Connected, text(r#"{"id":2,"subscribe":{"#), Close(3501)),
        Case::new("malformed JSON as the first frame", Open, text("hello?"), Close(3501)),
        Case::new("invalid UTF-8 in a text frame", Connected, Frame::RawText(invalid_utf8.clone()), Close(3501)),
        Case::new("invalid UTF-8 before connect", Open, Frame::RawText(invalid_utf8), Close(3501)),
        Case::new("frame over the size limit", Subscribed, text(oversized), Close(3501)),
        Case::new("binary frame with JSON", Connected, Frame::Binary(binary.clone()), Close(3501)),
        Case::new("binary frame before connect", Open, Frame::Binary(binary), Close(3501)),
        Case::new("empty binary frame", Connected, Frame::Binary(Vec::new()), Close(3501)),
        Case::new("empty text frame", Connected, text(""), Close(3501)),
        Case::new("only newlines and spaces", Connected, text("\n  \n\t\n"), Close(3501)),
        Case::new("trailing garbage after the JSON", Connected, text(r#"{"id":100,"subscribe":{"channel":"open.t"}} tail"#), Close(3501)),
        Case::new("top-level array", Connected, text(r#"[{"id":100,"subscribe":{"channel":"open.t"}}]"#), Close(3501)),
        Case::new("top-level number", Connected, text("42"), Close(3501)),
        Case::new("101 commands in one frame", Connected, text("{}\n".repeat(101)), Close(3501)),
        // Hostile JSON.
        Case::new("JSON nested 63 deep in data (65 in all)", Connected, text(publish_nested(63)), Close(3501)),
        Case::new("JSON nested 200 deep in data", Connected, text(publish_nested(200)), Close(3501)),
        Case::new("JSON nested 200 deep in an unknown field", Connected, text(deep_unknown), Close(3501)),
        Case::new("JSON nested 62 deep in data (64 in all)", Connected, text(publish_nested(62)), Results("publish", 1)),
        Case::new("brackets inside a string do not nest", Connected, text(brackets_in_string), Results("publish", 1)),
        Case::new("huge numbers in data pass through", Connected, text(huge_numbers), Results("publish", 1)),
        Case::new("id over uint32", Connected, text(r#"{"id":4294967296,"subscribe":{"channel":"open.t"}}"#), Close(3501)),
        Case::new("id at uint32 max", Connected, text(r#"{"id":4294967295,"subscribe":{"channel":"open.max-id"}}"#), Results("subscribe", 1)).reply_id(u64::from(u32::MAX)),
        Case::new("negative id", Connected, text(r#"{"id":-100,"subscribe":{"channel":"open.t"}}"#), Close(3501)),
        Case::new("fractional id", Connected, text(r#"{"id":100.5,"subscribe":{"channel":"open.t"}}"#), Close(3501)),
        Case::new("id in exponent notation", Connected, text(r#"{"id":1e2,"subscribe":{"channel":"open.t"}}"#), Close(3501)),
        Case::new("id as a string", Connected, text(r#"{"id":"100","subscribe":{"channel":"open.t"}}"#), Close(3501)),
        Case::new("channel as a number", Connected, command(json!({"subscribe": {"channel": 42}})), Close(3501)),
        Case::new("method body as a string", Connected, command(json!({"subscribe": "open.t"})), Close(3501)),
        Case::new("recover as a string", Connected, command(json!({"subscribe": {"channel": "open.t", "recover": "yes"}})), Close(3501)),
        Case::new("connect token as a number", Open, command(json!({"connect": {"token": 7}})), Close(3501)),
        Case::new("method body null", Connected, command(json!({"subscribe": null})), Error(104)),
        Case::new("unknown fields are ignored", Connected, command(json!({"subscribe": {"channel": "open.u", "delta": "fossil", "x": [1]}, "extra": {"a": 1}})), Results("subscribe", 1)),
        Case::new("duplicate key", Connected, text(r#"{"id":100,"id":101,"subscribe":{"channel":"open.t"}}"#), Close(3501)),
        Case::new("two methods in one command", Connected, command(json!({"subscribe": {"channel": "open.t"}, "unsubscribe": {"channel": "open.t"}})), Close(3501)),
        Case::new("command id reused in one frame", Connected, text(reused_ids), Results("subscribe", 2)),
        Case::new("id of the connect reused", Connected, text(r#"{"id":1,"subscribe":{"channel":"open.reused"}}"#), Results("subscribe", 1)).reply_id(1),
        Case::new("unknown command", Connected, text(r#"{"id":100,"frobnicate":{}}"#), Error(104)),
        Case::new("command without id", Connected, text(r#"{"subscribe":{"channel":"x"}}"#), Close(3501)),
        Case::new("command before connect", Open, subscribe("orders"), Close(3501)),
        Case::new("second connect", Connected, text(r#"{"id":100,"connect":{}}"#), Close(3501)),
        Case::new("client ping command", Connected, command(json!({"ping": {}})), Error(108)),
        Case::new("history command", Connected, command(json!({"history": {"channel": "orders", "limit": 1000000}})), Error(108)),
        Case::new("send (no handler)", Connected, text(r#"{"send":{"data":{"x":1}}}"#), Close(3508)),
        // Offsets.
        Case::new("negative offset", Connected, command(json!({"subscribe": {"channel": "open.t", "recover": true, "epoch": "e", "offset": -5}})), Close(3501)),
        Case::new("offset over uint64", Connected, text(r#"{"id":100,"subscribe":{"channel":"open.t","recover":true,"epoch":"e","offset":18446744073709551616}}"#), Close(3501)),
        Case::new("recover from uint64 max in the current epoch", Connected, text(ahead.to_string()), NotRecovered),
        Case::new("recover from uint64 max in an unknown epoch", Connected, command(json!({"subscribe": {"channel": "open.r", "recover": true, "epoch": "nope", "offset": u64::MAX}})), NotRecovered),
        // Channel names.
        Case::new("empty channel name", Connected, subscribe(""), Error(107)),
        Case::new("300-byte channel name", Connected, subscribe(&"c".repeat(300)), Error(107)),
        Case::new("256-byte channel name", Connected, subscribe(&format!("open.{}", "c".repeat(251))), Error(107)),
        Case::new("255-byte channel name", Connected, subscribe(&format!("open.{}", "c".repeat(250))), Results("subscribe", 1)),
        Case::new("256 bytes of two-byte characters", Connected, subscribe(&format!("open.x{}", "\u{e9}".repeat(125))), Error(107)),
        Case::new("control character in channel", Connected, subscribe("ord\u{1}ers"), Error(107)),
        Case::new("NUL in channel", Connected, subscribe("orders\u{0}"), Error(107)),
        Case::new("DEL in channel", Connected, subscribe("ord\u{7f}ers"), Error(107)),
        Case::new("C1 control (NEL) in channel", Connected, subscribe("ord\u{85}ers"), Error(107)),
        Case::new("escaped newline in channel", Connected, subscribe("ord\ners"), Error(107)),
        Case::new("whitespace in channel name", Connected, subscribe("or ders"), Error(107)),
        Case::new("lone surrogate in channel", Connected, text(r#"{"id":100,"subscribe":{"channel":"or\ud800ders"}}"#), Close(3501)),
        Case::new("subscribe twice to a channel", Subscribed, subscribe("orders"), Error(105)),
        Case::new("unsubscribe with a bad channel name", Subscribed, command(json!({"unsubscribe": {"channel": "or ders"}})), Error(107)),
        Case::new("unsubscribe from a channel not held", Connected, command(json!({"unsubscribe": {"channel": "open.never"}})), Results("unsubscribe", 1)),
        Case::new("sub_refresh for a channel not held", Connected, command(json!({"sub_refresh": {"channel": "open.never", "token": "x"}})), Error(103)),
        Case::new("publish without data", Connected, command(json!({"publish": {"channel": "open.p"}})), Error(107)),
        Case::new("publish where not allowed", Connected, command(json!({"publish": {"channel": "orders", "data": 1}})), Error(103)),
        // Auth and tenants.
        Case::new("connect with a token that is not a JWT", Open, command(json!({"connect": {"token": "not.a.jwt"}})), Close(3500)),
        Case::new("channel of another tenant", Tenant, subscribe("tenant:globex:orders"), Error(103)),
        Case::new("own tenant's channel", Tenant, subscribe("tenant:acme:orders"), Results("subscribe", 1)),
        Case::new("another tenant's prefix inside the name", Tenant, subscribe("tenant:globex:tenant:acme:x"), Error(103)),
        Case::new("subscription token for another channel", Tenant, command(other_subscription), Error(103)),
        Case::new("publish to another tenant", Tenant, command(json!({"publish": {"channel": "tenant:globex:orders", "data": 1}})), Error(103)),
        Case::new("refresh with a token that is not a JWT", Tenant, command(json!({"refresh": {"token": "garbage"}})), Close(3500)),
    ]
}

#[tokio::test]
async fn each_bad_input_gets_its_documented_code_and_spares_other_clients() -> anyhow::Result<()> {
    let max_frame = MAX_FRAME_BYTES.to_string();
    let cluster = Cluster::start_with(
        1,
        &["orders"],
        true,
        &[
            ("PGFANOUT_MAX_FRAME_BYTES", &max_frame),
            ("PGFANOUT_TOKEN_HMAC_SECRET_KEY", tokens::SECRET),
            ("PGFANOUT_ANONYMOUS_CHANNELS", "orders,open.*"),
            ("PGFANOUT_ALLOW_ANONYMOUS_PUBLISH", "true"),
            ("PGFANOUT_ANONYMOUS_PUBLISH_CHANNELS", "open.*"),
        ],
    )
    .await;
    cluster.wait_bridged().await?;
    let node = cluster.node();
    let mut observer = Client::connect(&node.ws_url()).await?;
    let subscribed = observer.subscribe("orders").await?;
    let cx = Context {
        epoch: subscribed["epoch"].as_str().unwrap_or_default().to_string(),
        acme_subscription: tokens::hs256(&tokens::subscription(
            TENANT_USER,
            "tenant:acme:orders",
            600,
        )),
    };

    let cases = cases(&cx);
    assert!(cases.len() >= 30, "the table holds {} cases", cases.len());
    let mut sent = 0u64;
    let mut failures = Vec::new();
    for case in &cases {
        if let Err(err) = run_case(&cluster, node, &mut observer, &mut sent, case).await {
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
        cases.len(),
        failures.join("\n")
    );
    Ok(())
}

/// One case: the bad client misbehaves, then a notification must reach the observer (and, when
/// the connection stays, the bad client too, exactly once).
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
        Setup::Tenant => Client::connect_with_token(&node.ws_url(), &tenant_token()).await?,
    };
    if case.setup == Setup::Subscribed {
        bad.subscribe("orders").await?;
    }
    let message = match &case.frame {
        Frame::Text(text) => Message::text(text.as_str()),
        Frame::Binary(bytes) => Message::binary(bytes.clone()),
        Frame::RawText(bytes) => Message::Frame(RawFrame::message(
            bytes.clone(),
            OpCode::Data(Data::Text),
            true,
        )),
    };
    bad.send_message(message).await?;

    let stays = match case.expect {
        Expect::Close(code) => {
            let (got, reason) = bad.expect_close(WAIT).await?;
            anyhow::ensure!(got == code, "closed with {got} {reason:?}");
            false
        }
        Expect::Error(code) => {
            let reply = bad.next_reply(case.reply_id).await?;
            let got = reply["error"]["code"].as_u64();
            anyhow::ensure!(got == Some(code), "reply {reply}");
            true
        }
        Expect::Results(method, n) => {
            for _ in 0..n {
                let reply = bad.next_reply(case.reply_id).await?;
                anyhow::ensure!(
                    reply.get(method).is_some() && reply.get("error").is_none(),
                    "reply {reply}"
                );
            }
            true
        }
        Expect::NotRecovered => {
            let reply = bad.next_reply(case.reply_id).await?;
            let result = &reply["subscribe"];
            anyhow::ensure!(
                result["was_recovering"] == true && result["recovered"] != true,
                "reply {reply}"
            );
            true
        }
    };
    if stays {
        // The same connection still works: it can subscribe (or already holds `orders`).
        match bad.try_subscribe("orders").await? {
            Ok(_) => {}
            Err(err) if err.code == 105 => {}
            Err(err) => anyhow::bail!("same connection after the answer: subscribe got {err}"),
        }
    }

    let data = json!({"case": case.name});
    cluster.db.notify("orders", &data.to_string()).await?;
    *sent += 1;
    let got = next_pub_with(observer, &data)
        .await
        .map_err(|err| err.context("the observer client"))?;
    anyhow::ensure!(got == *sent, "observer got offset {got}, expected {sent}");
    if stays {
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
