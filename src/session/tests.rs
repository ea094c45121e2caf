//! Session behaviour driven over in-memory channels instead of a socket.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes};
use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{run, ReadError, SessionConfig, Shared};
use crate::bus::memory::MemoryBus;
use crate::bus::{Bus, HistoryPolicy, PublishRequest, Source};
use crate::hub::Hub;

#[derive(Debug)]
struct TestError;

impl std::fmt::Display for TestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("test error")
    }
}

impl ReadError for TestError {
    fn is_bad_input(&self) -> bool {
        true
    }
}

/// A socket made of two channels. While `stalled` is set, writes do not complete (a peer
/// that stopped reading).
struct TestSocket {
    incoming: mpsc::UnboundedReceiver<Result<Message, TestError>>,
    outgoing: mpsc::UnboundedSender<Message>,
    stalled: Arc<AtomicBool>,
}

impl Stream for TestSocket {
    type Item = Result<Message, TestError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.incoming.poll_recv(cx)
    }
}

impl Sink<Message> for TestSocket {
    type Error = TestError;
    fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), TestError>> {
        if self.stalled.load(Ordering::Relaxed) {
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    }
    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), TestError> {
        self.outgoing.send(item).map_err(|_| TestError)
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), TestError>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), TestError>> {
        Poll::Ready(Ok(()))
    }
}

struct Harness {
    to_session: mpsc::UnboundedSender<Result<Message, TestError>>,
    from_session: mpsc::UnboundedReceiver<Message>,
    bus: Bus,
    shutdown: CancellationToken,
    stalled: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

fn config() -> SessionConfig {
    SessionConfig {
        node_id: Arc::from("test"),
        queue_size: 4,
        max_subscriptions: 2,
        ping_interval: Duration::from_secs(25),
        pong_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(10),
        drain_window: Duration::from_secs(2),
    }
}

fn start(config: SessionConfig, stalled: bool) -> Harness {
    let hub = Arc::new(Hub::new());
    let history = HistoryPolicy::uniform(100, Duration::from_secs(60), Duration::from_secs(600));
    let bus = Bus::Memory(MemoryBus::new(hub.clone(), Arc::new(history)));
    let anonymous = crate::auth::Policy {
        allow_anonymous: true,
        anonymous_channels: crate::auth::Patterns::compile(&["*"], None),
        allow_anonymous_publish: true,
        anonymous_publish_channels: crate::auth::Patterns::compile(&["*"], None),
        ..Default::default()
    };
    let auth = Arc::new(crate::auth::Authenticator::disabled());
    let shared = Arc::new(Shared::new(config, hub, bus.clone()).with_auth(auth, anonymous));
    let (to_session, incoming) = mpsc::unbounded_channel();
    let (outgoing, from_session) = mpsc::unbounded_channel();
    let stalled = Arc::new(AtomicBool::new(stalled));
    let socket = TestSocket {
        incoming,
        outgoing,
        stalled: stalled.clone(),
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(socket, shared, shutdown.clone()));
    Harness {
        to_session,
        from_session,
        bus,
        shutdown,
        stalled,
        task,
    }
}

impl Harness {
    fn send(&self, text: &str) {
        self.to_session
            .send(Ok(Message::Text(Utf8Bytes::from(text))))
            .expect("session alive");
    }

    async fn recv_text(&mut self) -> String {
        match tokio::time::timeout(Duration::from_secs(60), self.from_session.recv()).await {
            Ok(Some(Message::Text(t))) => t.to_string(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The close code the session ended with.
    async fn close_code(&mut self) -> u16 {
        loop {
            match tokio::time::timeout(Duration::from_secs(120), self.from_session.recv()).await {
                Ok(Some(Message::Close(Some(frame)))) => return frame.code,
                Ok(Some(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    async fn connect_and_subscribe(&mut self, channel: &str) {
        self.send(&format!(
            "{{\"id\":1,\"connect\":{{}}}}\n{{\"id\":2,\"subscribe\":{{\"channel\":\"{channel}\"}}}}"
        ));
        let replies = self.recv_text().await;
        assert!(
            replies.contains("\"connect\"") && replies.contains("\"subscribe\""),
            "{replies}"
        );
    }

    async fn publish(&self, channel: &str, n: u32) {
        self.bus
            .publish(PublishRequest {
                channel,
                data: Bytes::from(n.to_string()),
                idempotency_key: None,
                fence: None,
                source: Source::Client,
                received_at: None,
            })
            .await
            .expect("memory bus publishes");
    }
}

#[tokio::test(start_paused = true)]
async fn silence_after_upgrade_is_closed_as_stale() {
    let mut h = start(config(), false);
    assert_eq!(h.close_code().await, 3502);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_answers_pings_is_closed_with_no_pong() {
    let mut h = start(config(), false);
    h.connect_and_subscribe("c").await;
    assert_eq!(h.recv_text().await, "{}", "server ping");
    assert_eq!(h.close_code().await, 3012);
}

#[tokio::test(start_paused = true)]
async fn answered_pings_keep_the_connection() {
    let mut h = start(config(), false);
    h.connect_and_subscribe("c").await;
    for _ in 0..3 {
        assert_eq!(h.recv_text().await, "{}");
        h.send("{}");
    }
    h.publish("c", 7).await;
    let push = h.recv_text().await;
    assert!(push.contains("\"offset\":1"), "{push}");
}

#[tokio::test(start_paused = true)]
async fn a_reader_that_stalls_is_cut_as_slow_without_blocking_publishers() {
    let mut h = start(config(), true);
    h.send("{\"id\":1,\"connect\":{}}\n{\"id\":2,\"subscribe\":{\"channel\":\"c\"}}");
    // The session subscribes, then blocks writing its reply to the stalled peer.
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Publications pile up past its queue of 4; the publisher is never blocked.
    for n in 0..10 {
        h.publish("c", n).await;
    }
    // Let the close frame through so the code can be read.
    h.stalled.store(false, Ordering::Relaxed);
    assert_eq!(h.close_code().await, 3008);
    assert!(
        tokio::time::timeout(Duration::from_secs(5), h.task)
            .await
            .is_ok(),
        "session ended"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_closes_with_reconnect_advice_within_the_drain_window() {
    let mut h = start(config(), false);
    h.connect_and_subscribe("c").await;
    h.shutdown.cancel();
    let started = tokio::time::Instant::now();
    assert_eq!(h.close_code().await, 3001);
    assert!(started.elapsed() <= Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn a_session_that_starts_while_draining_goes_right_after_its_connect_reply() {
    let mut h = start(config(), false);
    // Before the session task first runs: it starts on a draining node.
    h.shutdown.cancel();
    let started = tokio::time::Instant::now();
    h.send("{\"id\":1,\"connect\":{}}");
    let reply = h.recv_text().await;
    assert!(
        reply.contains("\"connect\""),
        "connect answered first: {reply}"
    );
    assert_eq!(h.close_code().await, 3001);
    assert_eq!(started.elapsed(), Duration::ZERO, "no drain delay");
}

#[tokio::test(start_paused = true)]
async fn a_session_whose_drain_time_comes_before_its_connect_goes_after_the_reply() {
    let mut h = start(config(), false);
    // The session runs (not late), then the drain starts before the client's connect.
    tokio::time::sleep(Duration::from_millis(1)).await;
    h.shutdown.cancel();
    tokio::time::sleep(config().drain_window).await;
    h.send("{\"id\":1,\"connect\":{}}");
    let reply = h.recv_text().await;
    assert!(
        reply.contains("\"connect\""),
        "connect answered, not closed under it: {reply}"
    );
    assert_eq!(h.close_code().await, 3001);
}

#[tokio::test(start_paused = true)]
async fn a_late_session_that_never_connects_goes_at_the_end_of_the_window() {
    let mut h = start(config(), false);
    h.shutdown.cancel();
    let started = tokio::time::Instant::now();
    assert_eq!(h.close_code().await, 3001);
    assert_eq!(started.elapsed(), config().drain_window);
}

#[tokio::test(start_paused = true)]
async fn command_errors_keep_the_connection_and_its_subscriptions() {
    let mut h = start(config(), false);
    h.connect_and_subscribe("c").await;
    h.send("{\"id\":3,\"subscribe\":{\"channel\":\"c\"}}\n{\"id\":4,\"nope\":{}}\n{\"id\":5,\"subscribe\":{\"channel\":\"bad name\"}}\n{\"id\":6,\"history\":{\"channel\":\"c\"}}");
    let replies = h.recv_text().await;
    for (id, code) in [(3, 105), (4, 104), (5, 107), (6, 108)] {
        assert!(
            replies.contains(&format!("{{\"id\":{id},\"error\":{{\"code\":{code}")),
            "{id}: {replies}"
        );
    }
    h.send("{\"id\":7,\"subscribe\":{\"channel\":\"d\"}}\n{\"id\":8,\"subscribe\":{\"channel\":\"e\"}}");
    let replies = h.recv_text().await;
    assert!(
        replies.contains("{\"id\":8,\"error\":{\"code\":106"),
        "subscription limit: {replies}"
    );
    h.publish("c", 1).await;
    assert!(h.recv_text().await.contains("\"channel\":\"c\""));
}

#[tokio::test(start_paused = true)]
async fn subscribe_with_recover_returns_what_was_missed() {
    let mut h = start(config(), false);
    h.connect_and_subscribe("c").await;
    for n in 1..=3 {
        h.publish("c", n).await;
        h.recv_text().await;
    }
    let epoch = match h.bus.recover("c", None).await {
        Ok(r) => r.position.epoch,
        Err(e) => panic!("{e}"),
    };
    h.send("{\"id\":9,\"unsubscribe\":{\"channel\":\"c\"}}");
    h.recv_text().await;
    h.publish("c", 4).await;
    h.publish("c", 5).await;
    h.send(&format!("{{\"id\":10,\"subscribe\":{{\"channel\":\"c\",\"recover\":true,\"epoch\":\"{epoch}\",\"offset\":3}}}}"));
    let reply: serde_json::Value = serde_json::from_str(&h.recv_text().await).expect("json");
    let sub = &reply["subscribe"];
    assert_eq!(sub["recovered"], true);
    assert_eq!(sub["was_recovering"], true);
    assert_eq!(sub["offset"], 5);
    let offsets: Vec<_> = sub["publications"]
        .as_array()
        .expect("publications")
        .iter()
        .map(|p| p["offset"].clone())
        .collect();
    assert_eq!(offsets, vec![4, 5]);
}

#[tokio::test(start_paused = true)]
async fn frames_that_break_the_protocol_close_with_bad_request() {
    for frame in ["{not json", "{\"id\":1,\"subscribe\":{\"channel\":\"c\"}}"] {
        let mut h = start(config(), false);
        h.send(frame);
        assert_eq!(h.close_code().await, 3501, "{frame}");
    }
    let mut h = start(config(), false);
    h.to_session
        .send(Ok(Message::Binary(Bytes::from_static(b"\x00"))))
        .expect("alive");
    assert_eq!(h.close_code().await, 3501, "binary frame");
}

/// Every idle connection is one session task: its future is most of a connection's memory
/// (3.4 KB before the single timer, the boxed command path, the mailbox and run_from
/// building its future outside an `async fn`; 1.4 KB after, with this 24-byte socket).
/// A change that brings a large future or a moved-from value back into it fails here.
#[test]
fn an_idle_session_task_stays_small() {
    let hub = Arc::new(Hub::new());
    let history = HistoryPolicy::uniform(100, Duration::from_secs(60), Duration::from_secs(600));
    let bus = Bus::Memory(MemoryBus::new(hub.clone(), Arc::new(history)));
    let shared = Arc::new(Shared::new(config(), hub, bus));
    let (_to_session, incoming) = mpsc::unbounded_channel();
    let (outgoing, _from_session) = mpsc::unbounded_channel();
    let socket = TestSocket {
        incoming,
        outgoing,
        stalled: Arc::new(AtomicBool::new(false)),
    };
    let session = run(socket, shared, CancellationToken::new());
    let size = std::mem::size_of_val(&session);
    assert!(size <= 1600, "the session future grew to {size} bytes");
}
