//! Decoding client commands: one WebSocket text message holds one or more JSON
//! commands separated by newlines.

use serde::Deserialize;
use serde_json::value::RawValue;

/// A decoded client command.
#[derive(Debug)]
pub struct Command {
    /// Correlates the reply; 0 only for the pong (`{}`).
    pub id: u32,
    pub method: Method,
}

#[derive(Debug)]
pub enum Method {
    /// `{}` without id: the answer to a server ping.
    Pong,
    Connect(ConnectRequest),
    Subscribe(SubscribeRequest),
    Unsubscribe(ChannelRequest),
    Publish(PublishRequest),
    Refresh(TokenRequest),
    SubRefresh(SubRefreshRequest),
    /// A method of the Centrifugo protocol that we do not implement (presence, history, rpc, send...).
    NotAvailable(&'static str),
    /// An id with no method we know: answered with "method not found".
    Unknown,
}

impl Method {
    /// Name used in logs and in the reply's result field.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pong => "pong",
            Self::Connect(_) => "connect",
            Self::Subscribe(_) => "subscribe",
            Self::Unsubscribe(_) => "unsubscribe",
            Self::Publish(_) => "publish",
            Self::Refresh(_) => "refresh",
            Self::SubRefresh(_) => "sub_refresh",
            Self::NotAvailable(name) => name,
            Self::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct ConnectRequest {
    #[serde(default)]
    pub token: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub version: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct SubscribeRequest {
    pub channel: String,
    #[serde(default)]
    pub token: String,
    #[serde(default)]
    pub recover: bool,
    #[serde(default)]
    pub epoch: String,
    #[serde(default)]
    pub offset: u64,
}

#[derive(Debug, Default, Deserialize)]
pub struct ChannelRequest {
    pub channel: String,
}

#[derive(Debug, Deserialize)]
pub struct PublishRequest {
    pub channel: String,
    /// Missing data is a bad request (107), not a malformed frame.
    pub data: Option<Box<RawValue>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct TokenRequest {
    #[serde(default)]
    pub token: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct SubRefreshRequest {
    pub channel: String,
    #[serde(default)]
    pub token: String,
}

/// The wire shape: every method is an optional field; exactly one may be set.
/// Unknown fields are ignored so newer SDKs keep working.
#[derive(Deserialize)]
struct WireCommand {
    #[serde(default)]
    id: u32,
    connect: Option<ConnectRequest>,
    subscribe: Option<SubscribeRequest>,
    unsubscribe: Option<ChannelRequest>,
    publish: Option<PublishRequest>,
    refresh: Option<TokenRequest>,
    sub_refresh: Option<SubRefreshRequest>,
    presence: Option<serde::de::IgnoredAny>,
    presence_stats: Option<serde::de::IgnoredAny>,
    history: Option<serde::de::IgnoredAny>,
    rpc: Option<serde::de::IgnoredAny>,
    send: Option<serde::de::IgnoredAny>,
    /// A client-initiated ping: servers ping in this protocol version.
    ping: Option<serde::de::IgnoredAny>,
}

/// Why a frame could not be decoded; any of these ends the connection with "bad request".
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("malformed command: {0}")]
    Malformed(String),
    #[error("command carries more than one method")]
    SeveralMethods,
    #[error("command without id")]
    MissingId,
    #[error("too many commands in one frame (limit {0})")]
    TooManyCommands(usize),
    #[error("JSON nested deeper than {0} levels")]
    TooDeep(usize),
}

/// Commands one frame may carry: bounds the work and the replies one message can cause.
pub const MAX_COMMANDS_PER_FRAME: usize = 100;

/// Arrays and objects one command may nest, the command object included. serde_json
/// skips unknown fields and captures `data` without a depth limit (iteratively, so our
/// stack is safe), but subscribers' JSON parsers are often recursive (Python's stops near
/// 1000 levels): a publisher must not be able to hand them a 30,000-level `data`.
pub const MAX_JSON_DEPTH: usize = 64;

/// Decodes every command of one text frame, in order.
///
/// # Errors
/// The first command that is not valid JSON of the expected shape fails the whole frame:
/// the protocol has no way to answer a command whose id we could not read.
pub fn decode_frame(text: &str) -> Result<Vec<Command>, DecodeError> {
    let mut commands = Vec::new();
    for line in text.split('\n') {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if commands.len() == MAX_COMMANDS_PER_FRAME {
            return Err(DecodeError::TooManyCommands(MAX_COMMANDS_PER_FRAME));
        }
        commands.push(decode_command(line)?);
    }
    if commands.is_empty() {
        return Err(DecodeError::Malformed("empty frame".into()));
    }
    Ok(commands)
}

/// Checks that `json` nests at most [`MAX_JSON_DEPTH`] arrays and objects, in one pass
/// over the bytes and before any parsing. Brackets inside strings do not count; anything
/// else that is not JSON is left for the parser to refuse.
///
/// # Errors
/// [`DecodeError::TooDeep`] at the first bracket past the limit.
pub fn check_depth(json: &[u8]) -> Result<(), DecodeError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(DecodeError::TooDeep(MAX_JSON_DEPTH));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// serde_json's message without the input it quotes (`invalid type: string "…"`): a client
/// that puts its token where a number belongs must not find it in our logs.
fn withhold_input(e: &serde_json::Error) -> String {
    let message = e.to_string();
    match (message.find('"'), message.rfind('"')) {
        (Some(first), Some(last)) if first < last => {
            format!("{}\u{2026}{}", &message[..=first], &message[last..])
        }
        _ => message,
    }
}

fn decode_command(line: &str) -> Result<Command, DecodeError> {
    check_depth(line.as_bytes())?;
    let wire: WireCommand =
        serde_json::from_str(line).map_err(|e| DecodeError::Malformed(withhold_input(&e)))?;
    let mut methods = Vec::with_capacity(1);
    if let Some(r) = wire.connect {
        methods.push(Method::Connect(r));
    }
    if let Some(r) = wire.subscribe {
        methods.push(Method::Subscribe(r));
    }
    if let Some(r) = wire.unsubscribe {
        methods.push(Method::Unsubscribe(r));
    }
    if let Some(r) = wire.publish {
        methods.push(Method::Publish(r));
    }
    if let Some(r) = wire.refresh {
        methods.push(Method::Refresh(r));
    }
    if let Some(r) = wire.sub_refresh {
        methods.push(Method::SubRefresh(r));
    }
    let unsupported = [
        (wire.presence.is_some(), "presence"),
        (wire.presence_stats.is_some(), "presence_stats"),
        (wire.history.is_some(), "history"),
        (wire.rpc.is_some(), "rpc"),
        (wire.send.is_some(), "send"),
        (wire.ping.is_some(), "ping"),
    ];
    for (present, name) in unsupported {
        if present {
            methods.push(Method::NotAvailable(name));
        }
    }
    let method = match (methods.len(), wire.id) {
        (0, 0) => Method::Pong,
        (0, _) => Method::Unknown,
        (1, _) => methods.pop().unwrap_or(Method::Unknown),
        _ => return Err(DecodeError::SeveralMethods),
    };
    // `send` is fire-and-forget in Centrifugo and carries no id; every other method needs one.
    if wire.id == 0 && !matches!(method, Method::Pong | Method::NotAvailable("send")) {
        return Err(DecodeError::MissingId);
    }
    Ok(Command {
        id: wire.id,
        method,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_object_is_a_pong() {
        let cmds = decode_frame("{}").unwrap();
        assert!(matches!(cmds[0].method, Method::Pong));
    }

    #[test]
    fn several_commands_per_frame_decode_in_order() {
        let text = "{\"id\":1,\"connect\":{}}\n{\"id\":2,\"subscribe\":{\"channel\":\"a\",\"recover\":true,\"epoch\":\"x\",\"offset\":7}}\n";
        let cmds = decode_frame(text).unwrap();
        assert_eq!(cmds.len(), 2);
        assert!(matches!(cmds[0].method, Method::Connect(_)));
        match &cmds[1].method {
            Method::Subscribe(s) => {
                assert_eq!(
                    (s.channel.as_str(), s.recover, s.epoch.as_str(), s.offset),
                    ("a", true, "x", 7)
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn publish_keeps_raw_json_data() {
        let cmds =
            decode_frame(r#"{"id":3,"publish":{"channel":"c","data":{"a":[1,2]}}}"#).unwrap();
        match &cmds[0].method {
            Method::Publish(p) => assert_eq!(p.data.as_ref().unwrap().get(), r#"{"a":[1,2]}"#),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn id_without_known_method_is_unknown() {
        let cmds = decode_frame(r#"{"id":4,"frobnicate":{}}"#).unwrap();
        assert!(matches!(cmds[0].method, Method::Unknown));
    }

    #[test]
    fn bad_frames_are_rejected() {
        assert!(matches!(
            decode_frame("{not json"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(decode_frame(""), Err(DecodeError::Malformed(_))));
        assert_eq!(
            decode_frame(r#"{"id":1,"connect":{},"subscribe":{"channel":"a"}}"#).unwrap_err(),
            DecodeError::SeveralMethods
        );
        assert_eq!(
            decode_frame(r#"{"subscribe":{"channel":"a"}}"#).unwrap_err(),
            DecodeError::MissingId
        );
        assert!(matches!(
            decode_frame(r#"{"id":-1,"connect":{}}"#),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_frame(r#"{"id":1,"subscribe":{"channel":"a","offset":-5}}"#),
            Err(DecodeError::Malformed(_))
        ));
        let deep = "[".repeat(10_000);
        assert_eq!(
            decode_frame(&format!(
                "{{\"id\":1,\"publish\":{{\"channel\":\"a\",\"data\":{deep}}}}}"
            ))
            .unwrap_err(),
            DecodeError::TooDeep(MAX_JSON_DEPTH)
        );
    }

    #[test]
    fn nesting_is_limited_and_brackets_in_strings_do_not_count() {
        let nest = |d: usize| format!("{}{}", "[".repeat(d), "]".repeat(d));
        // The command and `publish` objects are two levels.
        let publish =
            |data: &str| format!(r#"{{"id":1,"publish":{{"channel":"a","data":{data}}}}}"#);
        assert!(decode_frame(&publish(&nest(MAX_JSON_DEPTH - 2))).is_ok());
        assert_eq!(
            decode_frame(&publish(&nest(MAX_JSON_DEPTH - 1))).unwrap_err(),
            DecodeError::TooDeep(MAX_JSON_DEPTH)
        );
        let brackets = format!("\"{}\\\"{}\"", "[".repeat(500), "{".repeat(500));
        assert!(decode_frame(&publish(&brackets)).is_ok());
        assert_eq!(
            check_depth("[".repeat(100_000).as_bytes()),
            Err(DecodeError::TooDeep(MAX_JSON_DEPTH))
        );
    }

    #[test]
    fn decode_errors_do_not_quote_the_input() {
        let err = decode_frame(r#"{"id":"secret-token-value","connect":{}}"#).unwrap_err();
        let text = err.to_string();
        assert!(!text.contains("secret-token-value"), "{text}");
        assert!(text.contains("expected u32"), "{text}");
    }

    #[test]
    fn too_many_commands_in_one_frame_are_refused() {
        let text = "{}\n".repeat(MAX_COMMANDS_PER_FRAME + 1);
        assert_eq!(
            decode_frame(&text).unwrap_err(),
            DecodeError::TooManyCommands(MAX_COMMANDS_PER_FRAME)
        );
    }
}
