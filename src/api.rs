//! `POST /api/publish`: the server-side publish API.
//!
//! Authenticated by an API key (`Authorization: apikey <key>` or `X-API-Key: <key>`, keys
//! from `PGFANOUT_API_KEYS`). The body is one publication `{"channel", "data",
//! "idempotency_key"?}` or a JSON array of them (a batch, at most [`MAX_BATCH`]). A
//! publication goes through the same bus script as every other source (offsets, history,
//! recovery); its idempotency key (the field, or the `Idempotency-Key` header, suffixed
//! `:<index>` in a batch) becomes the bus dedupe key, so a retried request is published
//! once and answered with the offset it got the first time (`"duplicate": true`).
//!
//! Errors are JSON `{"error":{"code","message"}}`: 400 invalid body, 401 missing or wrong
//! key, 413 body over `PGFANOUT_API_MAX_BODY_BYTES`, 429 over
//! `PGFANOUT_LIMIT_API_PUBLISH_PER_SECOND` (with `Retry-After`), 503 bus unavailable.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::bus::{Bus, PublishOutcome, PublishRequest, Source};
use crate::limits::{Action, Decision, Limiter, Tier};
use crate::metrics as m;
use crate::protocol::valid_channel;

/// Publications one request may carry.
pub const MAX_BATCH: usize = 1000;
/// Longest idempotency key accepted.
const MAX_IDEMPOTENCY_KEY: usize = 256;

/// What the publish API needs.
pub struct PublishApi {
    /// Accepted keys; empty: every request is refused (401).
    pub keys: Vec<String>,
    pub bus: Bus,
    pub limits: Arc<Limiter>,
    /// `publish_per_second` is the per-key limit.
    pub tier: Arc<Tier>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Item {
    channel: String,
    data: Option<Box<RawValue>>,
    idempotency_key: Option<String>,
}

#[derive(Serialize)]
struct Published {
    offset: u64,
    #[serde(skip_serializing_if = "str::is_empty")]
    epoch: String,
    duplicate: bool,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: String,
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    metrics::counter!(m::API_REQUESTS, "status" => status.as_str().to_owned()).increment(1);
    let body = serde_json::json!({ "error": ErrorBody { code, message: message.into() } });
    (status, Json(body)).into_response()
}

/// Equal-length comparison that does not stop at the first difference.
fn same_key(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Which configured key the request carries, by index.
fn authenticate(keys: &[String], headers: &HeaderMap) -> Option<usize> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("apikey ")
                .or_else(|| v.strip_prefix("Bearer "))
        })
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))?
        .trim();
    let mut found = None;
    for (i, key) in keys.iter().enumerate() {
        if same_key(key, given) && found.is_none() {
            found = Some(i);
        }
    }
    found
}

/// The handler of `POST /api/publish`.
pub async fn publish(
    State(api): State<Arc<PublishApi>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(key_index) = authenticate(&api.keys, &headers) else {
        metrics::counter!(m::AUTH_FAILURES, "token" => "api", "reason" => "api_key").increment(1);
        let message = if api.keys.is_empty() {
            "the publish API is disabled: PGFANOUT_API_KEYS is not set"
        } else {
            "missing or unknown API key (Authorization: apikey <key>, or X-API-Key)"
        };
        return error(StatusCode::UNAUTHORIZED, "unauthorized", message);
    };
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "body over PGFANOUT_API_MAX_BODY_BYTES",
            );
        }
        Err(rejection) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                rejection.body_text(),
            )
        }
    };
    let (items, batch) = match parse(&body) {
        Ok(parsed) => parsed,
        Err(message) => return error(StatusCode::BAD_REQUEST, "bad_request", message),
    };
    let header_key = match headers.get("idempotency-key").map(HeaderValue::to_str) {
        None => None,
        Some(Ok(k)) if !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY => Some(k.to_owned()),
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "Idempotency-Key must be 1..=256 visible ASCII characters",
            )
        }
    };
    let subject = format!("key{key_index}");
    let cost = items.len() as u64;
    if let Decision::Limited { retry_after } = api
        .limits
        .check(&api.tier, &subject, Action::ApiPublish, cost)
        .await
    {
        let mut response = error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            format!(
                "over PGFANOUT_LIMIT_API_PUBLISH_PER_SECOND; retry after {} ms",
                retry_after.as_millis()
            ),
        );
        let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return response;
    }
    let keys =
        items
            .iter()
            .enumerate()
            .map(|(index, item)| match (&item.idempotency_key, &header_key) {
                (Some(k), _) => Some(k.clone()),
                (None, Some(h)) if batch => Some(format!("{h}:{index}")),
                (None, Some(h)) => Some(h.clone()),
                (None, None) => None,
            });
    let mut results = publish_all(&api.bus, &items, keys.collect()).await;
    if !batch {
        return match results.pop() {
            Some(Ok(published)) => {
                metrics::counter!(m::API_REQUESTS, "status" => "200").increment(1);
                Json(serde_json::json!({ "result": published })).into_response()
            }
            Some(Err(message)) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message),
            None => error(StatusCode::BAD_REQUEST, "bad_request", "nothing to publish"),
        };
    }
    metrics::counter!(m::API_REQUESTS, "status" => "200").increment(1);
    let results: Vec<serde_json::Value> = results
        .into_iter()
        .map(|r| match r {
            Ok(p) => serde_json::json!({ "result": p }),
            Err(message) => {
                serde_json::json!({ "error": ErrorBody { code: "unavailable", message } })
            }
        })
        .collect();
    Json(serde_json::json!({ "results": results })).into_response()
}

/// Publishes a batch: channels concurrently (their bus round trips overlap on the shared
/// Redis connection, instead of one round trip after another), each channel's items one
/// after another in body order, so a channel's offsets follow the body.
async fn publish_all(
    bus: &Bus,
    items: &[Item],
    keys: Vec<Option<String>>,
) -> Vec<Result<Published, String>> {
    let mut lane_of: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut by_channel: Vec<Vec<usize>> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let lane = *lane_of.entry(&item.channel).or_insert_with(|| {
            by_channel.push(Vec::new());
            by_channel.len() - 1
        });
        by_channel[lane].push(i);
    }
    let keys = &keys;
    let lanes = by_channel.into_iter().map(|indices| async move {
        let mut out = Vec::with_capacity(indices.len());
        for i in indices {
            out.push((i, publish_one(bus, &items[i], keys[i].clone()).await));
        }
        out
    });
    let mut results: Vec<Option<Result<Published, String>>> = items.iter().map(|_| None).collect();
    for (i, result) in futures_util::future::join_all(lanes)
        .await
        .into_iter()
        .flatten()
    {
        results[i] = Some(result);
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err("not published".into())))
        .collect()
}

/// The publications of a body, and whether it was a batch.
fn parse(body: &[u8]) -> Result<(Vec<Item>, bool), String> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let (items, batch) = if first == Some(&b'[') {
        let items: Vec<Item> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        (items, true)
    } else {
        let item: Item = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        (vec![item], false)
    };
    if items.is_empty() {
        return Err("empty batch".into());
    }
    if items.len() > MAX_BATCH {
        return Err(format!("a batch holds at most {MAX_BATCH} publications"));
    }
    for (i, item) in items.iter().enumerate() {
        let at = if batch {
            format!("[{i}]: ")
        } else {
            String::new()
        };
        if !valid_channel(&item.channel) {
            return Err(format!("{at}invalid channel {:?}", item.channel));
        }
        if item.data.is_none() {
            return Err(format!("{at}`data` is required"));
        }
        if let Some(k) = &item.idempotency_key {
            if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY || k.chars().any(char::is_control) {
                return Err(format!("{at}idempotency_key must be 1..=256 characters"));
            }
        }
    }
    Ok((items, batch))
}

async fn publish_one(bus: &Bus, item: &Item, key: Option<String>) -> Result<Published, String> {
    let data = item
        .data
        .as_ref()
        .map(|d| bytes::Bytes::copy_from_slice(d.get().as_bytes()))
        .unwrap_or_default();
    // Namespaced so API keys never meet the dedupe keys of other sources.
    let dedupe = key.map(|k| format!("api:{k}"));
    let request = PublishRequest {
        channel: &item.channel,
        data,
        idempotency_key: dedupe.as_deref(),
        fence: None,
        source: Source::Api,
        received_at: None,
    };
    match bus.publish(request).await {
        Ok(PublishOutcome::Published { offset, epoch }) => Ok(Published {
            offset,
            epoch,
            duplicate: false,
        }),
        Ok(PublishOutcome::Duplicate { offset }) => Ok(Published {
            offset,
            epoch: String::new(),
            duplicate: true,
        }),
        Ok(other) => Err(format!("not published: {other:?}")),
        Err(e) => {
            tracing::warn!(error = %e, channel = %item.channel, "API publish failed");
            Err("the bus is unavailable; retry with the same idempotency key".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_by_either_header() {
        let keys = vec!["k-one".to_owned(), "k-two".to_owned()];
        let mut h = HeaderMap::new();
        assert_eq!(authenticate(&keys, &h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("apikey k-two"),
        );
        assert_eq!(authenticate(&keys, &h), Some(1));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("apikey k-tw"),
        );
        assert_eq!(authenticate(&keys, &h), None);
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("k-one"));
        assert_eq!(authenticate(&keys, &h), Some(0));
        assert_eq!(authenticate(&[], &h), None);
    }

    #[test]
    fn bodies_parse_as_one_or_a_batch() {
        let (items, batch) = parse(br#"{"channel":"a","data":{"x":1}}"#).expect("single");
        assert!(!batch && items.len() == 1);
        let (items, batch) = parse(
            br#" [{"channel":"a","data":1},{"channel":"b","data":"s","idempotency_key":"k"}]"#,
        )
        .expect("batch");
        assert!(batch && items.len() == 2);
        assert!(parse(b"[]").is_err());
        assert!(parse(br#"{"channel":"a"}"#).is_err(), "data required");
        assert!(parse(br#"{"channel":"a b","data":1}"#).is_err());
        assert!(parse(br#"{"channel":"a","data":1,"extra":1}"#).is_err());
        assert!(parse(b"{not json").is_err());
    }
}
