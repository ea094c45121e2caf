//! The Centrifugo client protocol (v2, JSON encoding): command decoding, reply and push
//! encoding, codes, and the rules for channel names and payloads.
//!
//! Pure functions and types only, no I/O, so everything here can be unit tested and fuzzed.
//! The subset we speak is specified in `proto/README.md`.

pub mod codes;
pub mod command;
pub mod reply;

pub use codes::{DisconnectCode, ErrorCode};
pub use command::{decode_frame, Command, DecodeError, Method};

use bytes::Bytes;

/// Longest channel name we accept, in bytes.
pub const MAX_CHANNEL_BYTES: usize = 255;

/// A channel name is 1..=255 bytes with no whitespace and no control characters.
pub fn valid_channel(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_CHANNEL_BYTES
        && !name.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// The JSON a notification payload is delivered as: the payload itself when it is valid
/// JSON, otherwise the payload as a JSON string.
pub fn payload_to_json(payload: &str) -> Bytes {
    if serde_json::from_str::<serde::de::IgnoredAny>(payload).is_ok() {
        Bytes::copy_from_slice(payload.trim().as_bytes())
    } else {
        // A &str always serialises.
        Bytes::from(serde_json::to_vec(payload).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_payloads_pass_through_and_others_become_strings() {
        assert_eq!(&payload_to_json(r#"{"id":1}"#)[..], br#"{"id":1}"#);
        assert_eq!(&payload_to_json(" 42 ")[..], b"42");
        assert_eq!(&payload_to_json("hello")[..], br#""hello""#);
        assert_eq!(&payload_to_json("")[..], br#""""#);
        assert_eq!(&payload_to_json("{\"a\":")[..], br#""{\"a\":""#);
    }

    #[test]
    fn channel_names_are_checked() {
        assert!(valid_channel("orders"));
        assert!(valid_channel("user:42#tenant.a"));
        assert!(!valid_channel(""));
        assert!(!valid_channel("a b"));
        assert!(!valid_channel("a\u{7}b"));
        assert!(!valid_channel(&"x".repeat(256)));
        assert!(valid_channel(&"x".repeat(255)));
    }

    proptest::proptest! {
        #[test]
        fn payload_to_json_always_yields_valid_json(s in ".*") {
            let out = payload_to_json(&s);
            proptest::prop_assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok());
        }

        #[test]
        fn decoder_never_panics(s in ".{0,300}") {
            let _ = decode_frame(&s);
        }
    }
}
