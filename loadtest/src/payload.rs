//! The payload every publication carries, and reading it back out of a delivered frame
//! without a JSON parser (the tool must stay cheaper than the gateway it measures).
//!
//! Payload: `{"r":<run>,"c":<channel>,"s":<seq>,"t":<send µs since the Unix epoch>,"p":"xx…"}`,
//! padded with `p` to about the requested size. `r` tells this run's publications from
//! a previous run's that a slow path may still be delivering on the same channels. Keys are searched by name, so the
//! gateway may reorder them.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now in microseconds since the Unix epoch (the clock every process on the machine shares).
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The JSON payload of publication `seq` on `channel`, about `size` bytes long.
pub fn encode(run: u64, channel: u32, seq: u64, ts: u64, size: usize) -> String {
    let mut s = format!("{{\"r\":{run},\"c\":{channel},\"s\":{seq},\"t\":{ts},\"p\":\"");
    let pad = size.saturating_sub(s.len() + 2);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s
}

/// What a delivered publication tells us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// 0 when the payload has no run.
    pub run: u64,
    pub channel: u32,
    pub seq: u64,
    pub ts: u64,
}

/// Reads one line of a server frame: `Some` for a `pub` push carrying our payload (a
/// Centrifugo push, a Socket.IO `pub` event, or the bare payload as Nchan sends it).
pub fn decode(line: &[u8]) -> Option<Delivered> {
    let line = if line.starts_with(b"{\"push\"") {
        &line[find(line, b"\"pub\":")?..]
    } else if line.starts_with(b"42[\"pub\",") || line.starts_with(b"{\"r\":") {
        line
    } else {
        return None;
    };
    Some(Delivered {
        run: number_after(line, b"\"r\":").unwrap_or(0),
        channel: u32::try_from(number_after(line, b"\"c\":")?).ok()?,
        seq: number_after(line, b"\"s\":")?,
        ts: number_after(line, b"\"t\":")?,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn number_after(hay: &[u8], key: &[u8]) -> Option<u64> {
    let mut start = find(hay, key)? + key.len();
    // jsonb (the outbox path) prints `"s": 17`, with a space.
    while hay.get(start) == Some(&b' ') {
        start += 1;
    }
    let digits = hay[start..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    if digits == 0 {
        return None;
    }
    std::str::from_utf8(&hay[start..start + digits])
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_has_about_the_requested_size() {
        let p = encode(9, 3, 17, 1_700_000_000_000_000, 100);
        assert_eq!(p.len(), 100);
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert_eq!(v["s"], 17);
        assert_eq!(
            decode(
                format!(r#"{{"push":{{"channel":"c","pub":{{"data":{p},"offset":1}}}}}}"#)
                    .as_bytes()
            )
            .unwrap()
            .run,
            9
        );
        // Too small a size still gives valid JSON.
        assert!(serde_json::from_str::<serde_json::Value>(&encode(1, 1, 1, 1, 5)).is_ok());
    }

    #[test]
    fn reads_a_push_in_any_key_order() {
        let line = br#"{"push":{"channel":"bench3","pub":{"data":{"c":3,"p":"xx","s":17,"t":99},"offset":5}}}"#;
        assert_eq!(
            decode(line),
            Some(Delivered {
                run: 0,
                channel: 3,
                seq: 17,
                ts: 99
            })
        );
        let reordered =
            br#"{"push":{"channel":"c","pub":{"offset":5,"data":{"t":99,"s":17,"c":3}}}}"#;
        assert_eq!(
            decode(reordered),
            Some(Delivered {
                run: 0,
                channel: 3,
                seq: 17,
                ts: 99
            })
        );
    }

    #[test]
    fn reads_jsonb_spacing() {
        let line = br#"{"push":{"channel":"c","pub":{"data":{"c": 3, "p": "xx", "r": 7, "s": 17, "t": 99},"offset":5}}}"#;
        assert_eq!(
            decode(line),
            Some(Delivered {
                run: 7,
                channel: 3,
                seq: 17,
                ts: 99
            })
        );
    }

    #[test]
    fn reads_a_socketio_event() {
        let line = br#"42["pub",{"c":1,"s":2,"t":3,"p":"x"}]"#;
        assert_eq!(
            decode(line),
            Some(Delivered {
                run: 0,
                channel: 1,
                seq: 2,
                ts: 3
            })
        );
    }

    #[test]
    fn reads_a_bare_payload() {
        let p = encode(9, 3, 17, 1_700_000_000_000_000, 100);
        assert_eq!(
            decode(p.as_bytes()),
            Some(Delivered {
                run: 9,
                channel: 3,
                seq: 17,
                ts: 1_700_000_000_000_000
            })
        );
        // A bare object that is not ours (no run first) is not a publication.
        assert_eq!(decode(br#"{"c":1,"s":2,"t":3}"#), None);
    }

    #[test]
    fn ignores_replies_pings_and_foreign_data() {
        assert_eq!(decode(b"{}"), None);
        assert_eq!(decode(br#"{"id":2,"subscribe":{}}"#), None);
        assert_eq!(
            decode(br#"{"push":{"channel":"c","pub":{"data":"hi","offset":1}}}"#),
            None
        );
    }
}
