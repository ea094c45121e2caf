//! JWTs for tests, signed with the test-only keys in `tests/fixtures/keys`.

use std::path::PathBuf;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// The HMAC secret nodes get in auth tests (`PGFANOUT_TOKEN_HMAC_SECRET_KEY`).
pub const SECRET: &str = "pgfanout-test-secret-0123456789";

/// A file under `tests/fixtures/keys`.
pub fn key_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name)
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `claims` signed with HS256 and [`SECRET`].
pub fn hs256(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        claims,
    )
}

/// `claims` signed with RS256 and `rsa_private.pem`.
pub fn rs256(claims: &Value) -> String {
    let pem = std::fs::read(key_file("rsa_private.pem")).expect("read rsa_private.pem");
    sign(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(&pem).expect("RSA test key"),
        claims,
    )
}

/// `claims` signed with `alg` and `key`.
pub fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    encode(&Header::new(alg), claims, key).expect("sign a test token")
}

/// Connection-token claims for `sub` valid for `ttl_secs`, with `channels` and `publish`.
pub fn user(sub: &str, ttl_secs: u64, channels: &[&str], publish: &[&str]) -> Value {
    json!({"sub": sub, "iat": now(), "exp": now() + ttl_secs, "channels": channels, "publish": publish})
}

/// Subscription-token claims: `sub` may subscribe to `channel` for `ttl_secs`.
pub fn subscription(sub: &str, channel: &str, ttl_secs: u64) -> Value {
    json!({"sub": sub, "channel": channel, "iat": now(), "exp": now() + ttl_secs})
}
