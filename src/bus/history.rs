//! History settings: how many publications a channel keeps and for how long, globally and
//! per channel pattern, and how many publications one recovery may return.
//!
//! A channel whose history size is 0 keeps offsets and an epoch but nothing to replay: it is
//! not recoverable, and subscribe results say so (`recoverable` left out).

use std::str::FromStr;
use std::time::Duration;

/// What one channel keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelHistory {
    /// Publications kept (the newest ones); 0 = none.
    pub size: u32,
    /// How long they are kept after the channel's last publication.
    pub ttl: Duration,
}

impl ChannelHistory {
    pub fn enabled(&self) -> bool {
        self.size > 0
    }
}

/// `pattern=size[/ttl]`: channels matching `pattern` keep `size` publications for `ttl`
/// (the global TTL when left out). `*` in a pattern matches any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRule {
    pub pattern: String,
    pub size: u32,
    /// None: the global TTL.
    pub ttl: Option<Duration>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{rule:?}: {reason} (expected pattern=size or pattern=size/ttl, e.g. chat:*=100/1m)")]
pub struct HistoryRuleError {
    rule: String,
    reason: &'static str,
}

impl FromStr for HistoryRule {
    type Err = HistoryRuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| HistoryRuleError {
            rule: s.to_owned(),
            reason,
        };
        let (pattern, setting) = s.trim().rsplit_once('=').ok_or(err("no '='"))?;
        let pattern = pattern.trim();
        if pattern.is_empty() || !crate::protocol::valid_channel(&pattern.replace('*', "x")) {
            return Err(err("the pattern is not a valid channel pattern"));
        }
        let (size, ttl) = match setting.split_once('/') {
            Some((size, ttl)) => (size, Some(ttl)),
            None => (setting, None),
        };
        let size = size
            .trim()
            .parse()
            .map_err(|_| err("the size is not a number"))?;
        let ttl = ttl
            .map(|t| {
                humantime::parse_duration(t.trim()).map_err(|_| err("the ttl is not a duration"))
            })
            .transpose()?;
        Ok(Self {
            pattern: pattern.to_owned(),
            size,
            ttl,
        })
    }
}

/// The node's history settings; every node of a cluster must use the same ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPolicy {
    /// For channels no rule matches.
    pub default: ChannelHistory,
    /// First match wins.
    pub rules: Vec<HistoryRule>,
    /// How long a channel's offset and epoch outlive its last publication.
    pub meta_ttl: Duration,
    /// Publications one recovery may return; a client further behind gets `recovered: false`.
    pub recovery_max: u32,
}

impl HistoryPolicy {
    /// The same history for every channel.
    pub fn uniform(size: u32, ttl: Duration, meta_ttl: Duration) -> Self {
        Self {
            default: ChannelHistory { size, ttl },
            rules: Vec::new(),
            meta_ttl,
            recovery_max: size.max(1),
        }
    }

    pub fn for_channel(&self, channel: &str) -> ChannelHistory {
        self.rules
            .iter()
            .find(|rule| glob_match(&rule.pattern, channel))
            .map_or(self.default, |rule| ChannelHistory {
                size: rule.size,
                ttl: rule.ttl.unwrap_or(self.default.ttl),
            })
    }

    /// The longest TTL any channel may have (the meta TTL must not be shorter).
    pub fn longest_ttl(&self) -> Duration {
        self.rules
            .iter()
            .filter_map(|r| r.ttl)
            .fold(self.default.ttl, Duration::max)
    }
}

/// `*` matches any run of characters (also none); everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return text.is_empty();
    };
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No '*' at all: the whole text must be the prefix.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_any_run_of_characters() {
        assert!(glob_match("orders", "orders"));
        assert!(!glob_match("orders", "orders2"));
        assert!(glob_match("chat:*", "chat:"));
        assert!(glob_match("chat:*", "chat:42"));
        assert!(!glob_match("chat:*", "chats:42"));
        assert!(glob_match("*:ticks", "eu:ticks"));
        assert!(glob_match("a*b*c", "a-b-c"));
        assert!(glob_match("a*b*c", "abc"));
        assert!(!glob_match("a*b*c", "acb"));
        assert!(
            !glob_match("ab*ba", "aba"),
            "prefix and suffix must not overlap"
        );
        assert!(glob_match("*", "anything"));
    }

    #[test]
    fn rules_parse_with_and_without_ttl() {
        let rule: HistoryRule = "chat:*=100/1m".parse().unwrap();
        assert_eq!(rule.pattern, "chat:*");
        assert_eq!(rule.size, 100);
        assert_eq!(rule.ttl, Some(Duration::from_secs(60)));
        let rule: HistoryRule = " ticks.* = 0 ".parse().unwrap();
        assert_eq!(
            (rule.pattern.as_str(), rule.size, rule.ttl),
            ("ticks.*", 0, None)
        );
        assert!("chat:*".parse::<HistoryRule>().is_err());
        assert!("=5".parse::<HistoryRule>().is_err());
        assert!("a=x".parse::<HistoryRule>().is_err());
        assert!("a=5/soon".parse::<HistoryRule>().is_err());
    }

    #[test]
    fn the_first_matching_rule_wins_else_the_default() {
        let mut policy =
            HistoryPolicy::uniform(1000, Duration::from_secs(300), Duration::from_secs(3600));
        policy.rules = vec![
            "chat:vip*=5000/1h".parse().unwrap(),
            "chat:*=50".parse().unwrap(),
            "ticks*=0".parse().unwrap(),
        ];
        let h = |c| policy.for_channel(c);
        assert_eq!(h("chat:vip1").size, 5000);
        assert_eq!(h("chat:vip1").ttl, Duration::from_secs(3600));
        assert_eq!(h("chat:1").size, 50);
        assert_eq!(h("chat:1").ttl, Duration::from_secs(300), "global ttl");
        assert!(!h("ticks:eu").enabled());
        assert_eq!(h("orders").size, 1000);
        assert_eq!(policy.longest_ttl(), Duration::from_secs(3600));
    }
}
