//! [`Client`]: a small Centrifugo client protocol (v2, JSON) client over tokio-tungstenite.
//!
//! It speaks just enough to test the gateway: `connect`, `subscribe` (with recovery),
//! `unsubscribe`, `publish`, raw frames, server pings (`{}` answered with `{}`), pushes, and
//! close frames. Frames may carry several newline-delimited JSON objects; everything read is
//! parsed into an inbox, so a reply that arrives between publications (or the other way round)
//! waits there for whoever asks for it. Every wait has a deadline.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use anyhow::{bail, Context as _};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Deadline for the handshake and for each command's reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A publication push: `{"push":{"channel":..,"pub":{"data":..,"offset":..}}}`.
#[derive(Clone, Debug, PartialEq)]
pub struct Publication {
    pub channel: String,
    /// 0 when the server omitted it.
    pub offset: u64,
    pub data: Value,
}

/// An error reply: `{"id":..,"error":{"code":..,"message":..,"temporary":..}}`.
#[derive(Clone, Debug, PartialEq)]
pub struct ProtoError {
    pub code: u64,
    pub message: String,
    pub temporary: bool,
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error {} {:?}", self.code, self.message)?;
        if self.temporary {
            write!(f, " (temporary)")?;
        }
        Ok(())
    }
}

impl std::error::Error for ProtoError {}

/// One WebSocket connection to a node.
pub struct Client {
    /// The socket.
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Next command id (ids start at 1, like the SDKs).
    next_id: u64,
    /// Replies and pushes read but not yet asked for, in arrival order.
    inbox: VecDeque<Value>,
    /// The close frame (code, reason) once the server sent one; `Some((1006, ..))` if it vanished.
    closed: Option<(u16, String)>,
    /// Client id from the connect reply.
    client_id: Option<String>,
    /// Server pings (`{}`) received so far.
    pings: u64,
    /// Whether to answer server pings (off to test the no-pong disconnect).
    answer_pings: bool,
}

impl Client {
    /// Opens the WebSocket only (no `connect` command), e.g. to test commands before connect.
    pub async fn open(url: &str) -> anyhow::Result<Client> {
        let (ws, _response) =
            tokio::time::timeout(REPLY_TIMEOUT, tokio_tungstenite::connect_async(url))
                .await
                .with_context(|| format!("WebSocket handshake with {url} timed out"))?
                .with_context(|| format!("WebSocket handshake with {url}"))?;
        Ok(Client {
            ws,
            next_id: 1,
            inbox: VecDeque::new(),
            closed: None,
            client_id: None,
            pings: 0,
            answer_pings: true,
        })
    }

    /// Opens the WebSocket and sends `connect`; the client id is then [`Client::id`].
    pub async fn connect(url: &str) -> anyhow::Result<Client> {
        Client::connect_with_token(url, "").await
    }

    /// Like [`Client::connect`], with a connection token (JWT).
    pub async fn connect_with_token(url: &str, token: &str) -> anyhow::Result<Client> {
        let mut client = Client::open(url).await?;
        let result = client
            .call(
                "connect",
                json!({"name": "pgfanout-tests", "version": "0", "token": token}),
            )
            .await?
            .context("connect refused")?;
        let id = result["client"]
            .as_str()
            .with_context(|| format!("connect result has no client id: {result}"))?;
        client.client_id = Some(id.to_string());
        Ok(client)
    }

    /// The client id the server gave on connect ("" before connect).
    pub fn id(&self) -> &str {
        self.client_id.as_deref().unwrap_or("")
    }

    /// How many server pings (`{}`) arrived so far.
    pub fn pings(&self) -> u64 {
        self.pings
    }

    /// Stops (or resumes) answering server pings with `{}`.
    pub fn set_answer_pings(&mut self, answer: bool) {
        self.answer_pings = answer;
    }

    /// Reads (answering pings) until `window` has passed; fails only if the connection closed.
    pub async fn idle(&mut self, window: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + window;
        while self.closed.is_none() && Instant::now() < deadline {
            // Err is the deadline passing (or a frame we cannot parse, which `idle` ignores).
            let _ = self.read_frame(deadline).await;
        }
        match &self.closed {
            Some((code, reason)) => bail!("connection closed ({code} {reason:?}) while idle"),
            None => Ok(()),
        }
    }

    /// Sends `{"id":n,"<method>":body}` and waits for the reply with that id: its result object,
    /// or the protocol error it carries.
    pub async fn call(
        &mut self,
        method: &str,
        body: Value,
    ) -> anyhow::Result<Result<Value, ProtoError>> {
        let id = self.next_id;
        self.next_id += 1;
        self.send_json(&json!({"id": id, method: body})).await?;
        let reply = self.next_reply(id).await?;
        if let Some(error) = reply.get("error") {
            return Ok(Err(ProtoError {
                code: error["code"].as_u64().unwrap_or(0),
                message: error["message"].as_str().unwrap_or_default().to_string(),
                temporary: error["temporary"].as_bool().unwrap_or(false),
            }));
        }
        match reply.get(method) {
            Some(result) => Ok(Ok(result.clone())),
            None => bail!("reply to {method} #{id} has neither {method:?} nor \"error\": {reply}"),
        }
    }

    /// `subscribe`; an error reply is returned as the inner `Err`.
    pub async fn try_subscribe(
        &mut self,
        channel: &str,
    ) -> anyhow::Result<Result<Value, ProtoError>> {
        self.call("subscribe", json!({"channel": channel})).await
    }

    /// `subscribe`, failing on an error reply; returns the subscribe result.
    pub async fn subscribe(&mut self, channel: &str) -> anyhow::Result<Value> {
        let result = self.try_subscribe(channel).await?;
        result.with_context(|| format!("subscribe to {channel:?} refused"))
    }

    /// `subscribe` with `recover` from (`epoch`, `offset`); returns the subscribe result.
    pub async fn subscribe_recover(
        &mut self,
        channel: &str,
        epoch: &str,
        offset: u64,
    ) -> anyhow::Result<Value> {
        let body = json!({"channel": channel, "recover": true, "epoch": epoch, "offset": offset});
        let result = self.call("subscribe", body).await?;
        result.with_context(|| format!("recovering subscribe to {channel:?} refused"))
    }

    /// `unsubscribe`; returns its (empty) result.
    pub async fn unsubscribe(&mut self, channel: &str) -> anyhow::Result<Value> {
        let result = self
            .call("unsubscribe", json!({"channel": channel}))
            .await?;
        result.with_context(|| format!("unsubscribe from {channel:?} refused"))
    }

    /// `publish`; an error reply is returned as the inner `Err`.
    pub async fn publish(
        &mut self,
        channel: &str,
        data: Value,
    ) -> anyhow::Result<Result<Value, ProtoError>> {
        self.call("publish", json!({"channel": channel, "data": data}))
            .await
    }

    /// Sends one JSON value as a text frame.
    pub async fn send_json(&mut self, value: &Value) -> anyhow::Result<()> {
        self.send_message(Message::text(value.to_string())).await
    }

    /// Sends `text` as one text frame, exactly as given.
    pub async fn send_raw(&mut self, text: &str) -> anyhow::Result<()> {
        self.send_message(Message::text(text)).await
    }

    /// Sends any WebSocket message (e.g. a binary frame).
    pub async fn send_message(&mut self, message: Message) -> anyhow::Result<()> {
        tokio::time::timeout(REPLY_TIMEOUT, self.ws.send(message))
            .await
            .context("WebSocket send timed out")?
            .context("WebSocket send")
    }

    /// Waits for the reply with command id `id` and returns it whole (`{"id":..,..}`).
    pub async fn next_reply(&mut self, id: u64) -> anyhow::Result<Value> {
        self.wait_for(REPLY_TIMEOUT, &format!("reply #{id}"), |v| {
            v.get("id").and_then(Value::as_u64) == Some(id)
        })
        .await
    }

    /// Waits for the next publication push (of any channel), answering pings meanwhile.
    pub async fn next_pub(&mut self, timeout: Duration) -> anyhow::Result<Publication> {
        let push = self
            .wait_for(timeout, "a publication", is_publication)
            .await?;
        let publication = &push["push"]["pub"];
        Ok(Publication {
            channel: push["push"]["channel"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            offset: publication["offset"].as_u64().unwrap_or(0),
            data: publication.get("data").cloned().unwrap_or(Value::Null),
        })
    }

    /// Waits for the next push of any kind (`{"push":{..}}`) and returns it whole.
    pub async fn next_push(&mut self, timeout: Duration) -> anyhow::Result<Value> {
        self.wait_for(timeout, "a push", |v| v.get("push").is_some())
            .await
    }

    /// Succeeds when no publication arrives within `window` (a close or silence both count).
    pub async fn expect_no_pub(&mut self, window: Duration) -> anyhow::Result<()> {
        match self.wait_for(window, "a publication", is_publication).await {
            Ok(unexpected) => bail!("unexpected publication: {unexpected}"),
            Err(_) => Ok(()),
        }
    }

    /// Waits until the server closes the connection and returns the close code and reason.
    /// Anything else received meanwhile stays in the inbox.
    ///
    /// # Errors
    /// On timeout, and when the connection ends without a close frame (reported as code 1006).
    pub async fn expect_close(&mut self, timeout: Duration) -> anyhow::Result<(u16, String)> {
        let deadline = Instant::now() + timeout;
        while self.closed.is_none() {
            if let Err(err) = self.read_frame(deadline).await {
                bail!(
                    "waiting for a close frame: {err:#}; received meanwhile: {}",
                    self.inbox_summary()
                );
            }
        }
        match self.closed.clone() {
            Some((1006, reason)) => bail!("connection ended without a close frame ({reason})"),
            Some(close) => Ok(close),
            None => unreachable!("loop ends only once closed"),
        }
    }

    /// The close frame, if the server closed the connection.
    pub fn close_frame(&self) -> Option<&(u16, String)> {
        self.closed.as_ref()
    }

    /// Closes the connection politely (code 1000).
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.close(None)).await;
    }

    /// Takes the first inbox value that `pick` accepts, reading more frames until `timeout`.
    async fn wait_for(
        &mut self,
        timeout: Duration,
        what: &str,
        pick: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.inbox.iter().position(&pick) {
                return Ok(self.inbox.remove(at).expect("position is in range"));
            }
            if let Some((code, reason)) = &self.closed {
                bail!(
                    "connection closed ({code} {reason:?}) while waiting for {what}; unread: {}",
                    self.inbox_summary()
                );
            }
            if let Err(err) = self.read_frame(deadline).await {
                bail!(
                    "waiting for {what}: {err:#}; unread: {}",
                    self.inbox_summary()
                );
            }
        }
    }

    /// Reads one WebSocket message into the inbox (or `closed`), answering server pings.
    async fn read_frame(&mut self, deadline: Instant) -> anyhow::Result<()> {
        let message = match tokio::time::timeout_at(deadline, self.ws.next()).await {
            Err(_) => bail!("timed out"),
            Ok(None) => {
                self.closed.get_or_insert((1006, "stream ended".into()));
                return Ok(());
            }
            Ok(Some(Err(err))) => {
                self.closed.get_or_insert((1006, err.to_string()));
                return Ok(());
            }
            Ok(Some(Ok(message))) => message,
        };
        match message {
            Message::Text(text) => {
                for line in text
                    .as_str()
                    .split('\n')
                    .filter(|line| !line.trim().is_empty())
                {
                    let value: Value = serde_json::from_str(line)
                        .with_context(|| format!("server sent invalid JSON: {line:?}"))?;
                    if value.as_object().is_some_and(|fields| fields.is_empty()) {
                        // Server ping: answer with an empty command (pong).
                        self.pings += 1;
                        if self.answer_pings {
                            self.send_raw("{}").await?;
                        }
                    } else {
                        self.inbox.push_back(value);
                    }
                }
            }
            Message::Close(frame) => {
                let close = frame.map_or((1005, String::new()), |f| {
                    (u16::from(f.code), f.reason.to_string())
                });
                self.closed = Some(close);
            }
            Message::Binary(bytes) => bail!("unexpected binary frame of {} bytes", bytes.len()),
            // WebSocket-level pings are answered by tungstenite itself.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
        Ok(())
    }

    /// The first few unread values, for error messages.
    fn inbox_summary(&self) -> String {
        let shown: Vec<String> = self.inbox.iter().take(5).map(Value::to_string).collect();
        format!("{} message(s) [{}]", self.inbox.len(), shown.join(", "))
    }
}

fn is_publication(value: &Value) -> bool {
    value.get("push").and_then(|push| push.get("pub")).is_some()
}
