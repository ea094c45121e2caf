//! Notification payloads: whatever an application passes to `pg_notify` (or an outbox row
//! carries) becomes the `data` of a publication push sent to every subscriber.
//!
//! `payload_to_json` must not panic, must yield JSON (the payload itself when it is JSON, else
//! the payload as a JSON string, proto/README.md §9), and the push built around it must be
//! JSON whose `data` is exactly that value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgfanout::protocol::{payload_to_json, reply};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    // Postgres hands payloads over as text in the database encoding (UTF-8 here).
    let Ok(payload) = std::str::from_utf8(data) else {
        return;
    };
    let json = payload_to_json(payload);
    // At most every character escaped as \u00XX, plus the quotes.
    assert!(
        json.len() <= payload.len() * 6 + 2,
        "payload grew unboundedly"
    );
    let push = reply::encode_publication("orders", 7, &json);
    // serde_json's recursion limit (128) refuses deeper JSON that payload_to_json passes on
    // as is: the oracle only holds where the parser can follow.
    let Ok(pushed) = serde_json::from_slice::<Value>(&push) else {
        assert!(
            serde_json::from_slice::<serde::de::IgnoredAny>(&json).is_ok(),
            "payload_to_json produced invalid JSON"
        );
        return;
    };
    let delivered = &pushed["push"]["pub"]["data"];
    match serde_json::from_str::<Value>(payload) {
        Ok(value) => assert_eq!(*delivered, value, "a JSON payload is delivered as itself"),
        Err(_) if serde_json::from_str::<serde::de::IgnoredAny>(payload).is_err() => {
            assert_eq!(
                *delivered,
                Value::String(payload.to_owned()),
                "text is delivered as a string"
            );
        }
        // Valid JSON deeper than the parser follows: delivered as itself, checked above.
        Err(_) => {}
    }
    assert_eq!(pushed["push"]["pub"]["offset"], 7);
});
