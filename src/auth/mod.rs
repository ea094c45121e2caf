//! Who a client is and what it may do.
//!
//! - Connection tokens (`connect.token`, renewed by `refresh`) and subscription tokens
//!   (`subscribe.token`, renewed by `sub_refresh`) are JWTs signed with HS256, RS256 or
//!   ES256; keys come from config or a JWKS file ([`keys`]). The header's algorithm must be
//!   the algorithm of the key that verifies it, so `none` and HS/RS confusion fail.
//! - Claims: `sub` and `exp` (required), `iat`, `channels` and `publish` (channel patterns,
//!   [`pattern`]), `tier`; a subscription token also carries `channel`, the one channel it
//!   grants. A connection token with a `channel` claim is refused, and the other way round,
//!   so neither can stand in for the other.
//! - [`Policy`]: what clients without a token may do, and the browser origin check.

pub mod keys;
pub mod pattern;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::{decode, decode_header, Algorithm, Validation};
use serde::Deserialize;

pub use keys::{KeyError, KeySources, KeyStore};
pub use pattern::{Pattern, Patterns};

use crate::metrics as m;

/// A token `iat` this far in the future is refused (clock skew allowance).
const MAX_IAT_SKEW_SECS: u64 = 60;

/// Why a token is refused. Only [`AuthError::Expired`] is something the client can cure by
/// itself (it fetches a new token); everything else means the token is not ours.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("algorithm not accepted: {0}")]
    Algorithm(String),
    #[error("no key configured for {0}")]
    NoKey(String),
    #[error("signature does not verify")]
    Signature,
    #[error("claims: {0}")]
    Claims(String),
}

impl AuthError {
    /// The `reason` label of the auth-failures metric.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::Malformed(_) => "malformed",
            Self::Algorithm(_) => "algorithm",
            Self::NoKey(_) => "no_key",
            Self::Signature => "signature",
            Self::Claims(_) => "claims",
        }
    }

    /// Counts the failure by reason, for `kind` ("connect", "subscribe", ...).
    pub fn record(&self, kind: &'static str) {
        metrics::counter!(m::AUTH_FAILURES, "token" => kind, "reason" => self.label()).increment(1);
    }
}

/// A verified connection token.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `sub`: the user.
    pub user: Arc<str>,
    /// `exp`, seconds since the epoch.
    pub expires_at: u64,
    /// `channels`: what the user may subscribe to without a subscription token.
    pub channels: Patterns,
    /// `publish`: what the user may publish on.
    pub publish: Patterns,
    /// `tier`: the limits tier, if the token names one.
    pub tier: Option<String>,
    /// The value of the configured subject claim (e.g. a tenant), if the token has it.
    pub subject_claim: Option<String>,
}

/// A verified subscription token: it grants its channel until `expires_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub expires_at: u64,
}

/// The claims we read, all optional here so that a missing one is reported as such.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<u64>,
    iat: Option<u64>,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
    tier: Option<String>,
    channel: Option<String>,
    #[serde(flatten)]
    rest: HashMap<String, serde_json::Value>,
}

/// Token verification settings besides the keys.
#[derive(Debug, Clone, Default)]
pub struct TokenRules {
    /// Required `aud` (any of the token's audiences); None: `aud` is not checked.
    pub audience: Option<String>,
    /// Required `iss`; None: not checked.
    pub issuer: Option<String>,
    /// A claim whose string value keys the limits instead of `sub` (e.g. `tenant`).
    pub subject_claim: Option<String>,
}

/// Verifies tokens.
pub struct Authenticator {
    keys: Arc<KeyStore>,
    rules: TokenRules,
}

impl Authenticator {
    pub fn new(keys: Arc<KeyStore>, rules: TokenRules) -> Self {
        Self { keys, rules }
    }

    /// No keys at all: every token is refused with [`AuthError::NoKey`].
    pub fn disabled() -> Self {
        Self::new(Arc::new(KeyStore::empty()), TokenRules::default())
    }

    /// Verifies a connection token.
    ///
    /// # Errors
    /// Any reason the token is not valid right now, [`AuthError::Expired`] last (only a
    /// token that is otherwise valid is reported as expired).
    pub fn verify_connect(&self, token: &str, now: u64) -> Result<Identity, AuthError> {
        let claims = self.decode(token, now)?;
        if claims.channel.is_some() {
            return Err(AuthError::Claims(
                "a subscription token (with `channel`) cannot connect".into(),
            ));
        }
        let user = claims.sub.unwrap_or_default();
        if user.is_empty() {
            return Err(AuthError::Claims("`sub` is empty".into()));
        }
        let subject_claim = self
            .rules
            .subject_claim
            .as_ref()
            .and_then(|name| claims.rest.get(name))
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
            .map(str::to_owned);
        Ok(Identity {
            channels: Patterns::compile(&claims.channels, Some(&user)),
            publish: Patterns::compile(&claims.publish, Some(&user)),
            user: Arc::from(user),
            expires_at: claims.exp.unwrap_or_default(),
            tier: claims.tier.filter(|t| !t.is_empty()),
            subject_claim,
        })
    }

    /// Verifies a subscription token for `channel`, held by `user` ("" when anonymous).
    ///
    /// # Errors
    /// As [`Authenticator::verify_connect`]; also when the token is for another channel or
    /// another user.
    pub fn verify_subscription(
        &self,
        token: &str,
        user: &str,
        channel: &str,
        now: u64,
    ) -> Result<Grant, AuthError> {
        let claims = self.decode(token, now)?;
        match claims.channel.as_deref() {
            None => {
                return Err(AuthError::Claims(
                    "a subscription token needs `channel`".into(),
                ))
            }
            Some(c) if c != channel => {
                return Err(AuthError::Claims("the token is for another channel".into()))
            }
            Some(_) => {}
        }
        if claims.sub.as_deref().unwrap_or_default() != user {
            return Err(AuthError::Claims("the token is for another user".into()));
        }
        Ok(Grant {
            expires_at: claims.exp.unwrap_or_default(),
        })
    }

    fn decode(&self, token: &str, now: u64) -> Result<Claims, AuthError> {
        let header = decode_header(token).map_err(|e| header_error(token, &e))?;
        let algorithm = header.alg;
        if !matches!(
            algorithm,
            Algorithm::HS256 | Algorithm::RS256 | Algorithm::ES256
        ) {
            return Err(AuthError::Algorithm(format!("{algorithm:?}")));
        }
        let candidates = self.keys.candidates(algorithm, header.kid.as_deref());
        if candidates.is_empty() {
            return Err(AuthError::NoKey(format!("{algorithm:?}")));
        }
        let mut validation = Validation::new(algorithm);
        validation.leeway = 0;
        // Expiry is judged below, after the signature, with the caller's clock.
        validation.validate_exp = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_aud = self.rules.audience.is_some();
        if let Some(aud) = &self.rules.audience {
            validation.set_audience(&[aud]);
        }
        if let Some(iss) = &self.rules.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        let mut last = AuthError::Signature;
        for key in &candidates {
            match decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => return check_times(data.claims, now),
                Err(e) => {
                    last = claim_error(&e);
                    if last != AuthError::Signature {
                        // The signature verified: this key is the one, the claims are wrong.
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

fn check_times(claims: Claims, now: u64) -> Result<Claims, AuthError> {
    if claims.iat.is_some_and(|iat| iat > now + MAX_IAT_SKEW_SECS) {
        return Err(AuthError::Claims("`iat` is in the future".into()));
    }
    if claims.exp.is_some_and(|exp| exp <= now) {
        return Err(AuthError::Expired);
    }
    Ok(claims)
}

/// A header we cannot read: say whether it named an algorithm we do not accept (`none`,
/// `HS512`...), or is not a JWT header at all.
fn header_error(token: &str, e: &jsonwebtoken::errors::Error) -> AuthError {
    let alg = token
        .split('.')
        .next()
        .and_then(|h| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .ok()
        })
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("alg").and_then(|a| a.as_str()).map(str::to_owned));
    match alg {
        Some(alg) => AuthError::Algorithm(alg),
        None => AuthError::Malformed(e.to_string()),
    }
}

fn claim_error(e: &jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => AuthError::Signature,
        K::InvalidAlgorithm | K::InvalidAlgorithmName | K::UnsupportedAlgorithm => {
            AuthError::Algorithm(e.to_string())
        }
        K::MissingRequiredClaim(c) => AuthError::Claims(format!("`{c}` is missing")),
        K::InvalidClaimFormat(c) => AuthError::Claims(format!("`{c}` is malformed")),
        K::InvalidIssuer => AuthError::Claims("`iss` is not accepted".into()),
        K::InvalidAudience => AuthError::Claims("`aud` is not accepted".into()),
        K::ExpiredSignature => AuthError::Expired,
        K::Json(_) => AuthError::Claims(e.to_string()),
        // A key of the right family that cannot verify (e.g. an RSA key too short).
        K::InvalidRsaKey(_) | K::InvalidEcdsaKey | K::InvalidKeyFormat => AuthError::Signature,
        _ => AuthError::Malformed(e.to_string()),
    }
}

/// What clients without a connection token may do, and which browser origins may connect.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Connect without a token.
    pub allow_anonymous: bool,
    /// Channels anyone connected (with or without a token) may subscribe to without a
    /// subscription token, when `allow_anonymous`.
    pub anonymous_channels: Patterns,
    /// Publish without a token.
    pub allow_anonymous_publish: bool,
    /// Channels anyone may publish on, when `allow_anonymous_publish`.
    pub anonymous_publish_channels: Patterns,
    /// Allowed `Origin` values (patterns); empty: no origin check.
    pub allowed_origins: Patterns,
    /// How long a connection or subscription may outlive its token's `exp` while the
    /// client refreshes it.
    pub expiry_grace: Duration,
}

impl Policy {
    /// Whether a WebSocket upgrade with this `Origin` header may proceed. Requests without
    /// the header (non-browser clients) always may.
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        match origin {
            None => true,
            Some(_) if self.allowed_origins.is_empty() => true,
            Some(o) => self.allowed_origins.allows(o),
        }
    }

    /// Whether `identity` (None: anonymous) may subscribe to `channel` without a
    /// subscription token.
    pub fn may_subscribe(&self, identity: Option<&Identity>, channel: &str) -> bool {
        identity.is_some_and(|i| i.channels.allows(channel))
            || (self.allow_anonymous && self.anonymous_channels.allows(channel))
    }

    /// Whether `identity` (None: anonymous) may publish on `channel`.
    pub fn may_publish(&self, identity: Option<&Identity>, channel: &str) -> bool {
        identity.is_some_and(|i| i.publish.allows(channel))
            || (self.allow_anonymous_publish && self.anonymous_publish_channels.allows(channel))
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests;
