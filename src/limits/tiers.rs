//! Limits per tier: the default tier from `PGFANOUT_LIMIT_*`, more tiers (and overrides of
//! the default one) from the TOML file `PGFANOUT_LIMITS_FILE`:
//!
//! ```toml
//! default_tier = "free"          # for tokens without `tier` and anonymous clients
//! [tiers.free]
//! subscribe_per_second = 10
//! connections_per_user = 5
//! [tiers.pro]
//! subscribe_per_second = 100
//! ```
//!
//! 0 (or a missing field) means unlimited. The tier `default` starts from the
//! `PGFANOUT_LIMIT_*` values; fields the file gives for it override them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

/// The name of the tier built from `PGFANOUT_LIMIT_*`.
pub const DEFAULT_TIER: &str = "default";

/// One tier's limits; 0 is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Filled from the table name.
    #[serde(skip)]
    pub name: String,
    #[serde(default)]
    pub connect_per_second: u64,
    #[serde(default)]
    pub connections_per_user: u64,
    #[serde(default)]
    pub subscribe_per_second: u64,
    #[serde(default)]
    pub publish_per_second: u64,
    #[serde(default)]
    pub inbound_bytes_per_second: u64,
    /// Subscriptions one connection may hold (never more than `PGFANOUT_MAX_SUBSCRIPTIONS`).
    #[serde(default)]
    pub subscriptions_per_connection: u64,
}

/// The tier of the default tier's fields that a file may override, each optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TierOverride {
    connect_per_second: Option<u64>,
    connections_per_user: Option<u64>,
    subscribe_per_second: Option<u64>,
    publish_per_second: Option<u64>,
    inbound_bytes_per_second: Option<u64>,
    subscriptions_per_connection: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    default_tier: Option<String>,
    #[serde(default)]
    tiers: HashMap<String, TierOverride>,
}

/// Why the tiers file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TiersError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// Every tier, and which one applies to clients that name none.
#[derive(Debug, Clone)]
pub struct Tiers {
    tiers: HashMap<String, Arc<Tier>>,
    default: Arc<Tier>,
}

impl Tiers {
    /// Only the default tier.
    pub fn single(default: Tier) -> Self {
        let default = Arc::new(Tier {
            name: DEFAULT_TIER.into(),
            ..default
        });
        Self {
            tiers: HashMap::from([(DEFAULT_TIER.to_owned(), default.clone())]),
            default,
        }
    }

    /// The default tier from `env` and the tiers of the file at `path`, if any.
    ///
    /// # Errors
    /// The file cannot be read, is not valid TOML of this shape, or names a default tier
    /// it does not define.
    pub fn load(env: Tier, path: Option<&Path>) -> Result<Self, TiersError> {
        let Some(path) = path else {
            return Ok(Self::single(env));
        };
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TiersError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(env, &text).map_err(|reason| TiersError::Invalid {
            path: shown,
            reason,
        })
    }

    fn parse(env: Tier, text: &str) -> Result<Self, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut tiers = HashMap::new();
        tiers.insert(DEFAULT_TIER.to_owned(), env);
        for (name, o) in file.tiers {
            let base = if name == DEFAULT_TIER {
                tiers.remove(DEFAULT_TIER).unwrap_or_default()
            } else {
                Tier::default()
            };
            let tier = Tier {
                name: name.clone(),
                connect_per_second: o.connect_per_second.unwrap_or(base.connect_per_second),
                connections_per_user: o.connections_per_user.unwrap_or(base.connections_per_user),
                subscribe_per_second: o.subscribe_per_second.unwrap_or(base.subscribe_per_second),
                publish_per_second: o.publish_per_second.unwrap_or(base.publish_per_second),
                inbound_bytes_per_second: o
                    .inbound_bytes_per_second
                    .unwrap_or(base.inbound_bytes_per_second),
                subscriptions_per_connection: o
                    .subscriptions_per_connection
                    .unwrap_or(base.subscriptions_per_connection),
            };
            tiers.insert(name, tier);
        }
        let default_name = file.default_tier.unwrap_or_else(|| DEFAULT_TIER.to_owned());
        let tiers: HashMap<String, Arc<Tier>> = tiers
            .into_iter()
            .map(|(name, tier)| {
                let tier = Tier {
                    name: name.clone(),
                    ..tier
                };
                (name, Arc::new(tier))
            })
            .collect();
        let default = tiers
            .get(&default_name)
            .cloned()
            .ok_or_else(|| format!("default_tier {default_name:?} is not defined"))?;
        Ok(Self { tiers, default })
    }

    /// The tier named by a token (the default one when it names none or an unknown one).
    pub fn get(&self, name: Option<&str>) -> Arc<Tier> {
        name.and_then(|n| self.tiers.get(n))
            .unwrap_or(&self.default)
            .clone()
    }

    pub fn default_tier(&self) -> Arc<Tier> {
        self.default.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Tier {
        Tier {
            subscribe_per_second: 7,
            connections_per_user: 3,
            ..Tier::default()
        }
    }

    #[test]
    fn file_tiers_and_the_default_tier_combine_with_env() {
        let tiers = Tiers::parse(
            env(),
            r#"
            default_tier = "free"
            [tiers.free]
            subscribe_per_second = 10
            [tiers.pro]
            subscribe_per_second = 100
            publish_per_second = 50
            [tiers.default]
            connections_per_user = 9
            "#,
        )
        .expect("parses");
        assert_eq!(tiers.get(None).name, "free");
        assert_eq!(tiers.get(None).subscribe_per_second, 10);
        assert_eq!(tiers.get(Some("pro")).publish_per_second, 50);
        assert_eq!(tiers.get(Some("nope")).name, "free");
        let default = tiers.get(Some("default"));
        assert_eq!(
            (default.subscribe_per_second, default.connections_per_user),
            (7, 9),
            "env values, overridden field by field"
        );
    }

    #[test]
    fn bad_files_are_refused() {
        assert!(Tiers::parse(env(), "default_tier = \"gold\"").is_err());
        assert!(Tiers::parse(env(), "[tiers.free]\nsubscribes = 1").is_err());
        assert!(Tiers::parse(env(), "[tiers.free]\nsubscribe_per_second = -1").is_err());
        let only_env = Tiers::parse(env(), "").expect("empty file");
        assert_eq!(only_env.get(None).subscribe_per_second, 7);
    }
}
