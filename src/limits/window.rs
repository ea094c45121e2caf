//! The sliding window of `window.lua`, kept in this process: the fallback while Redis is
//! unreachable (limits then hold per node, not per cluster).

use std::collections::HashMap;

/// Subjects tracked at most; past it, entries whose window passed are dropped, and a new
/// subject that still finds no room is let through untracked (counted in metrics).
pub const MAX_LOCAL_KEYS: usize = 100_000;

/// Per key: (bucket number, cost) of the buckets still inside the window.
#[derive(Debug, Default)]
pub struct LocalWindows {
    keys: HashMap<String, Vec<(u64, u64)>>,
}

/// What a local check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    Allowed,
    Limited {
        retry_after_ms: u64,
    },
    /// No room to track this key.
    Untracked,
}

impl LocalWindows {
    /// All-or-nothing check of `checks` (key, limit, cost) at `now_ms`, the same rule as
    /// `window.lua`.
    pub fn check(
        &mut self,
        checks: &[(String, u64, u64)],
        now_ms: u64,
        window_ms: u64,
        bucket_ms: u64,
    ) -> Local {
        let span = window_ms / bucket_ms;
        let cur = now_ms / bucket_ms;
        let oldest = cur.saturating_sub(span);
        let mut retry = 0;
        for (key, limit, cost) in checks {
            let Some(buckets) = self.keys.get_mut(key) else {
                if cost > limit {
                    retry = retry.max(window_ms + bucket_ms);
                }
                continue;
            };
            buckets.retain(|(b, _)| *b >= oldest);
            let used: u64 = buckets.iter().map(|(_, c)| c).sum();
            if used + cost > *limit {
                let mut wait = window_ms + bucket_ms;
                if cost <= limit {
                    let need = used + cost - limit;
                    let mut freed = 0;
                    for (b, c) in buckets.iter() {
                        freed += c;
                        if freed >= need {
                            wait = ((b + span + 1) * bucket_ms).saturating_sub(now_ms);
                            break;
                        }
                    }
                }
                retry = retry.max(wait);
            }
        }
        if retry > 0 {
            return Local::Limited {
                retry_after_ms: retry,
            };
        }
        if self.keys.len() + checks.len() > MAX_LOCAL_KEYS {
            self.keys.retain(|_, b| b.iter().any(|(x, _)| *x >= oldest));
        }
        for (key, _, cost) in checks {
            if !self.keys.contains_key(key) && self.keys.len() >= MAX_LOCAL_KEYS {
                return Local::Untracked;
            }
            let buckets = self.keys.entry(key.clone()).or_default();
            match buckets.last_mut() {
                Some((b, c)) if *b == cur => *c += cost,
                _ => buckets.push((cur, *cost)),
            }
        }
        Local::Allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(w: &mut LocalWindows, key: &str, limit: u64, now: u64) -> Local {
        w.check(&[(key.to_owned(), limit, 1)], now, 1000, 100)
    }

    #[test]
    fn no_one_second_span_holds_more_than_the_limit() {
        let mut w = LocalWindows::default();
        let mut accepted = Vec::new();
        // Every 10 ms for 5 s, against a limit of 10 per second.
        for t in (0..5000).step_by(10) {
            if check(&mut w, "k", 10, t) == Local::Allowed {
                accepted.push(t);
            }
        }
        for start in 0..5000 {
            let in_span = accepted
                .iter()
                .filter(|t| **t >= start && **t < start + 1000)
                .count();
            assert!(in_span <= 10, "{in_span} in [{start}, {start}+1s)");
        }
        // Conservative by at most one bucket: about 10 per 1.1 s.
        assert!(accepted.len() >= 40, "{}", accepted.len());
    }

    #[test]
    fn a_limited_check_says_when_to_retry_and_counts_nothing() {
        let mut w = LocalWindows::default();
        for t in 0..3 {
            assert_eq!(check(&mut w, "k", 3, t * 10), Local::Allowed);
        }
        let Local::Limited { retry_after_ms } = check(&mut w, "k", 3, 500) else {
            panic!("limited")
        };
        assert_eq!(retry_after_ms, 600, "bucket 0 leaves the window at 1100 ms");
        assert_eq!(check(&mut w, "k", 3, 1100), Local::Allowed);
        // All or nothing: a failing second check counts neither.
        let both = [("a".to_owned(), 5, 1), ("k".to_owned(), 1, 5)];
        assert!(matches!(
            w.check(&both, 1200, 1000, 100),
            Local::Limited { .. }
        ));
        assert_eq!(
            w.check(&[("a".to_owned(), 1, 1)], 1200, 1000, 100),
            Local::Allowed
        );
    }
}
