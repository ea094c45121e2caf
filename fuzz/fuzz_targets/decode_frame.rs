//! The client-command decoder: any bytes a client can put in a WebSocket message.
//!
//! Invalid UTF-8 never reaches the decoder (the WebSocket layer refuses it, 3501), so the
//! bytes are tried as text. The decoder must not panic and must not allocate beyond a small
//! multiple of its input (libFuzzer's `-malloc_limit_mb` in scripts/fuzz.sh); what it accepts
//! must obey the protocol's limits, and every reply we would write about it must be JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgfanout::protocol::command::{check_depth, Method, MAX_COMMANDS_PER_FRAME};
use pgfanout::protocol::{decode_frame, reply, valid_channel, ErrorCode};

fuzz_target!(|data: &[u8]| {
    // The depth check runs on raw bytes first in the session; it must hold on anything.
    let _ = check_depth(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(commands) = decode_frame(text) else {
        return;
    };
    assert!(!commands.is_empty() && commands.len() <= MAX_COMMANDS_PER_FRAME);
    let mut out = Vec::new();
    for command in &commands {
        let channel = match &command.method {
            Method::Subscribe(r) => Some(r.channel.as_str()),
            Method::Unsubscribe(r) => Some(r.channel.as_str()),
            Method::Publish(r) => Some(r.channel.as_str()),
            Method::SubRefresh(r) => Some(r.channel.as_str()),
            _ => None,
        };
        if let Some(channel) = channel {
            // Whatever the client named, the pushes we build about it are JSON.
            let push = reply::encode_unsubscribe_push(channel, 2500, "insufficient state");
            serde_json::from_slice::<serde_json::Value>(&push).expect("unsubscribe push is JSON");
            if valid_channel(channel) {
                let publication = reply::encode_publication(channel, u64::MAX, b"null");
                serde_json::from_slice::<serde_json::Value>(&publication)
                    .expect("publication push is JSON");
            }
        }
        if let Method::Publish(r) = &command.method {
            if let Some(data) = &r.data {
                // Client data goes out verbatim: it must be JSON we would accept again.
                check_depth(data.get().as_bytes()).expect("accepted data nests within the limit");
            }
        }
        out.clear();
        reply::write_error(&mut out, command.id, ErrorCode::BadRequest);
        serde_json::from_slice::<serde_json::Value>(&out).expect("error reply is JSON");
    }
});
