//! Encoding replies and pushes. Publications are written by hand around the already
//! encoded payload so a message is serialised once for all its subscribers.

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use super::codes::ErrorCode;

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Serialize)]
pub struct ConnectResult<'a> {
    pub client: &'a str,
    pub version: &'a str,
    /// Seconds between server pings.
    pub ping: u32,
    /// The client must answer pings.
    pub pong: bool,
    pub node: &'a str,
    /// The connection's token expires: refresh it within `ttl` seconds.
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ttl: u32,
}

#[derive(Debug, Serialize)]
pub struct RefreshResult<'a> {
    pub client: &'a str,
    pub version: &'a str,
    pub expires: bool,
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ttl: u32,
}

/// The answer to `sub_refresh`: when the new subscription token expires.
#[derive(Debug, Serialize)]
pub struct SubRefreshResult {
    pub expires: bool,
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ttl: u32,
}

/// One publication in a subscribe result (recovered history).
#[derive(Debug, Serialize)]
pub struct PublicationOut<'a> {
    pub data: &'a RawValue,
    pub offset: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct SubscribeResult<'a> {
    #[serde(skip_serializing_if = "is_false")]
    pub recoverable: bool,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub epoch: &'a str,
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub publications: Vec<PublicationOut<'a>>,
    #[serde(skip_serializing_if = "is_false")]
    pub was_recovering: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub recovered: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub positioned: bool,
    /// The subscription token expires: refresh it within `ttl` seconds (`sub_refresh`).
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ttl: u32,
}

/// An empty result object: `{}`.
#[derive(Debug, Serialize)]
pub struct Empty {}

#[derive(Serialize)]
struct ErrorBody {
    code: u32,
    message: &'static str,
    #[serde(skip_serializing_if = "is_false")]
    temporary: bool,
    /// pgfanout's addition for rate-limit errors (111): milliseconds until a retry may
    /// succeed. SDKs ignore it and retry with their own backoff.
    #[serde(skip_serializing_if = "is_zero")]
    retry_after_ms: u64,
}

/// Appends `{"id":N,"<method>":<result>}` to `out`.
pub fn write_result<T: Serialize>(out: &mut Vec<u8>, id: u32, method: &str, result: &T) {
    out.extend_from_slice(b"{\"id\":");
    out.extend_from_slice(itoa(u64::from(id)).as_bytes());
    out.extend_from_slice(b",\"");
    out.extend_from_slice(method.as_bytes());
    out.extend_from_slice(b"\":");
    // Serialising our own result structs into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, result);
    out.push(b'}');
}

/// Appends `{"id":N,"error":{"code":C,"message":"..."}}` to `out`.
pub fn write_error(out: &mut Vec<u8>, id: u32, code: ErrorCode) {
    write_error_retry(out, id, code, 0);
}

/// Like [`write_error`], with `"retry_after_ms"` when it is not 0.
pub fn write_error_retry(out: &mut Vec<u8>, id: u32, code: ErrorCode, retry_after_ms: u64) {
    out.extend_from_slice(b"{\"id\":");
    out.extend_from_slice(itoa(u64::from(id)).as_bytes());
    out.extend_from_slice(b",\"error\":");
    let body = ErrorBody {
        code: code.code(),
        message: code.message(),
        temporary: code.temporary(),
        retry_after_ms,
    };
    let _ = serde_json::to_writer(&mut *out, &body);
    out.push(b'}');
}

/// `{"push":{"channel":"<c>","pub":{"data":<data>,"offset":N}}}`, built once per message.
///
/// `data` must be valid JSON (the bus only carries valid JSON).
pub fn encode_publication(channel: &str, offset: u64, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(48 + channel.len() + data.len());
    out.extend_from_slice(b"{\"push\":{\"channel\":");
    let _ = serde_json::to_writer(&mut out, channel);
    out.extend_from_slice(b",\"pub\":{\"data\":");
    out.extend_from_slice(data);
    out.extend_from_slice(b",\"offset\":");
    out.extend_from_slice(itoa(offset).as_bytes());
    out.extend_from_slice(b"}}}");
    Bytes::from(out)
}

/// `{"push":{"channel":"<c>","unsubscribe":{"code":C,"reason":"..."}}}`.
pub fn encode_unsubscribe_push(channel: &str, code: u32, reason: &str) -> Vec<u8> {
    #[derive(Serialize)]
    struct Unsub<'a> {
        code: u32,
        reason: &'a str,
    }
    #[derive(Serialize)]
    struct Push<'a> {
        channel: &'a str,
        unsubscribe: Unsub<'a>,
    }
    #[derive(Serialize)]
    struct Envelope<'a> {
        push: Push<'a>,
    }
    let envelope = Envelope {
        push: Push {
            channel,
            unsubscribe: Unsub { code, reason },
        },
    };
    serde_json::to_vec(&envelope).unwrap_or_default()
}

fn itoa(n: u64) -> String {
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publication_push_is_valid_json_with_channel_escaped() {
        let frame = encode_publication("a\"b", 7, br#"{"id":1}"#);
        let v: serde_json::Value = serde_json::from_slice(&frame).unwrap();
        assert_eq!(v["push"]["channel"], "a\"b");
        assert_eq!(v["push"]["pub"]["offset"], 7);
        assert_eq!(v["push"]["pub"]["data"]["id"], 1);
    }

    #[test]
    fn results_omit_false_and_empty_fields() {
        let mut out = Vec::new();
        let result = SubscribeResult {
            recoverable: true,
            epoch: "e",
            offset: 0,
            ..Default::default()
        };
        write_result(&mut out, 2, "subscribe", &result);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"id":2,"subscribe":{"recoverable":true,"epoch":"e"}}"#
        );
    }

    #[test]
    fn errors_carry_code_message_and_temporary() {
        let mut out = Vec::new();
        write_error(&mut out, 9, ErrorCode::Internal);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["id"], 9);
        assert_eq!(v["error"]["code"], 100);
        assert_eq!(v["error"]["temporary"], true);
        out.clear();
        write_error(&mut out, 1, ErrorCode::AlreadySubscribed);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"id":1,"error":{"code":105,"message":"already subscribed"}}"#
        );
        out.clear();
        write_error_retry(&mut out, 2, ErrorCode::TooManyRequests, 250);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"id":2,"error":{"code":111,"message":"too many requests","temporary":true,"retry_after_ms":250}}"#
        );
    }

    #[test]
    fn unsubscribe_push_shape() {
        let v: serde_json::Value =
            serde_json::from_slice(&encode_unsubscribe_push("c", 2500, "insufficient state"))
                .unwrap();
        assert_eq!(v["push"]["unsubscribe"]["code"], 2500);
    }
}
