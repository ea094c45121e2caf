//! Verification keys: the ones given in config (HMAC secret, RSA and ECDSA public keys as PEM
//! or a file path) and those of a JWKS file, which is re-read when it changes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// How often the JWKS file's modification time and size are looked at.
pub const JWKS_POLL: Duration = Duration::from_secs(1);

/// Keys a JWKS file may hold, at most.
const MAX_JWKS_KEYS: usize = 64;

/// Why key material from config or the JWKS file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Key {
        what: &'static str,
        source: jsonwebtoken::errors::Error,
    },
    #[error("JWKS {path}: {reason}")]
    Jwks { path: PathBuf, reason: String },
}

/// One usable key and the one algorithm it verifies.
#[derive(Clone)]
pub struct Key {
    pub kid: Option<String>,
    pub algorithm: Algorithm,
    pub key: DecodingKey,
}

/// The keys from config, plus the JWKS file's (swapped whole on reload).
pub struct KeyStore {
    fixed: Vec<Key>,
    jwks: Option<JwksFile>,
}

struct JwksFile {
    path: PathBuf,
    keys: RwLock<Arc<Vec<Key>>>,
    /// Modification time and size of the version loaded.
    stamp: RwLock<Option<(SystemTime, u64)>>,
}

/// Key material as configured: each value is PEM text or the path of a PEM file.
#[derive(Debug, Clone, Default)]
pub struct KeySources {
    pub hmac_secret: Option<String>,
    pub rsa_public_key: Option<String>,
    pub ecdsa_public_key: Option<String>,
    pub jwks_file: Option<PathBuf>,
}

impl KeySources {
    pub fn is_empty(&self) -> bool {
        self.hmac_secret.is_none()
            && self.rsa_public_key.is_none()
            && self.ecdsa_public_key.is_none()
            && self.jwks_file.is_none()
    }
}

impl KeyStore {
    /// No keys: every token is refused.
    pub fn empty() -> Self {
        Self {
            fixed: Vec::new(),
            jwks: None,
        }
    }

    /// Loads every configured key (and the JWKS file once).
    ///
    /// # Errors
    /// A key or the JWKS file cannot be read or parsed: the node must not start half-armed.
    pub fn load(sources: &KeySources) -> Result<Self, KeyError> {
        let mut fixed = Vec::new();
        if let Some(secret) = &sources.hmac_secret {
            fixed.push(Key {
                kid: None,
                algorithm: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.as_bytes()),
            });
        }
        if let Some(pem) = &sources.rsa_public_key {
            let key =
                DecodingKey::from_rsa_pem(&pem_or_file(pem)?).map_err(|source| KeyError::Key {
                    what: "PGFANOUT_TOKEN_RSA_PUBLIC_KEY",
                    source,
                })?;
            fixed.push(Key {
                kid: None,
                algorithm: Algorithm::RS256,
                key,
            });
        }
        if let Some(pem) = &sources.ecdsa_public_key {
            let key =
                DecodingKey::from_ec_pem(&pem_or_file(pem)?).map_err(|source| KeyError::Key {
                    what: "PGFANOUT_TOKEN_ECDSA_PUBLIC_KEY",
                    source,
                })?;
            fixed.push(Key {
                kid: None,
                algorithm: Algorithm::ES256,
                key,
            });
        }
        let jwks = match &sources.jwks_file {
            None => None,
            Some(path) => {
                let (keys, stamp) = read_jwks(path)?;
                Some(JwksFile {
                    path: path.clone(),
                    keys: RwLock::new(Arc::new(keys)),
                    stamp: RwLock::new(Some(stamp)),
                })
            }
        };
        Ok(Self { fixed, jwks })
    }

    /// The keys that may have signed a token with this header: the JWKS key named by `kid`
    /// when there is one, else every key of the algorithm.
    pub fn candidates(&self, algorithm: Algorithm, kid: Option<&str>) -> Vec<Key> {
        let jwks = self
            .jwks
            .as_ref()
            .map(|j| j.keys.read().map(|k| k.clone()).unwrap_or_default())
            .unwrap_or_default();
        if let Some(kid) = kid {
            let named: Vec<Key> = jwks
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid) && k.algorithm == algorithm)
                .cloned()
                .collect();
            if !named.is_empty() {
                return named;
            }
        }
        self.fixed
            .iter()
            .chain(jwks.iter())
            .filter(|k| k.algorithm == algorithm)
            .cloned()
            .collect()
    }

    pub fn has_jwks(&self) -> bool {
        self.jwks.is_some()
    }

    /// Re-reads the JWKS file whenever its modification time or size changes, until
    /// cancelled. A file that fails to parse keeps the previous keys (and is logged).
    pub async fn watch_jwks(self: Arc<Self>, cancel: CancellationToken) {
        let Some(jwks) = &self.jwks else { return };
        let mut tick = tokio::time::interval(JWKS_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Ok(stamp) = file_stamp(&jwks.path) else {
                continue;
            };
            if jwks.stamp.read().is_ok_and(|s| *s == Some(stamp)) {
                continue;
            }
            match read_jwks(&jwks.path) {
                Ok((keys, stamp)) => {
                    tracing::info!(path = %jwks.path.display(), keys = keys.len(), "JWKS reloaded");
                    metrics::counter!(m::JWKS_RELOADS, "outcome" => "ok").increment(1);
                    if let Ok(mut k) = jwks.keys.write() {
                        *k = Arc::new(keys);
                    }
                    if let Ok(mut s) = jwks.stamp.write() {
                        *s = Some(stamp);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "JWKS file changed but cannot be used; keeping the previous keys");
                    metrics::counter!(m::JWKS_RELOADS, "outcome" => "error").increment(1);
                    // Do not retry the same broken version every second.
                    if let Ok(mut s) = jwks.stamp.write() {
                        *s = Some(stamp);
                    }
                }
            }
        }
    }
}

fn pem_or_file(value: &str) -> Result<Vec<u8>, KeyError> {
    if value.trim_start().starts_with("-----BEGIN") {
        return Ok(value.as_bytes().to_vec());
    }
    let path = Path::new(value.trim());
    std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })
}

fn file_stamp(path: &Path) -> std::io::Result<(SystemTime, u64)> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.modified()?, meta.len()))
}

fn read_jwks(path: &Path) -> Result<(Vec<Key>, (SystemTime, u64)), KeyError> {
    let read_err = |source| KeyError::Read {
        path: path.to_owned(),
        source,
    };
    let stamp = file_stamp(path).map_err(read_err)?;
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    let bad = |reason: String| KeyError::Jwks {
        path: path.to_owned(),
        reason,
    };
    let set: JwkSet = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if set.keys.len() > MAX_JWKS_KEYS {
        return Err(bad(format!("more than {MAX_JWKS_KEYS} keys")));
    }
    let mut keys = Vec::with_capacity(set.keys.len());
    for jwk in &set.keys {
        let Some(algorithm) = jwk_algorithm(jwk) else {
            tracing::warn!(kid = ?jwk.common.key_id, "JWKS key skipped: not an HS256, RS256 or ES256 key");
            continue;
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(e.to_string()))?;
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            algorithm,
            key,
        });
    }
    Ok((keys, stamp))
}

/// The algorithm a JWK verifies: its `alg` when given, else what its key type implies.
/// Only HS256, RS256 and ES256 are accepted.
fn jwk_algorithm(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Algorithm> {
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
        _ => return None,
    };
    match jwk.common.key_algorithm {
        None => Some(implied),
        Some(KeyAlgorithm::RS256) if implied == Algorithm::RS256 => Some(implied),
        Some(KeyAlgorithm::ES256) if implied == Algorithm::ES256 => Some(implied),
        Some(KeyAlgorithm::HS256) if implied == Algorithm::HS256 => Some(implied),
        Some(_) => None,
    }
}
