//! Channel patterns: what a token (or the anonymous policy) allows.
//!
//! A pattern is a channel name in which `*` stands for any run of characters (including
//! none) and `{sub}` for the token's subject. `orders.*` allows `orders.eu` and
//! `orders.eu.paid`; `user:{sub}` allows `user:42` to the holder of a token for `42` only.
//! The subject is inserted literally: a `*` inside a subject is no wildcard. A pattern with
//! `{sub}` never matches without a subject (anonymous clients).

/// Patterns one token may carry, at most (a bound on the work of a permission check).
pub const MAX_PATTERNS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Star,
}

/// One compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// None: the pattern names `{sub}` and there is no subject, so it matches nothing.
    pieces: Option<Vec<Piece>>,
}

impl Pattern {
    /// Compiles `text`, inserting `sub` for `{sub}`.
    pub fn compile(text: &str, sub: Option<&str>) -> Self {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix("{sub}") {
                let Some(sub) = sub.filter(|s| !s.is_empty()) else {
                    return Self { pieces: None };
                };
                literal.push_str(sub);
                rest = after;
            } else if let Some(after) = rest.strip_prefix('*') {
                if !literal.is_empty() {
                    pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                }
                if pieces.last() != Some(&Piece::Star) {
                    pieces.push(Piece::Star);
                }
                rest = after;
            } else {
                let mut chars = rest.chars();
                if let Some(c) = chars.next() {
                    literal.push(c);
                }
                rest = chars.as_str();
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        Self {
            pieces: Some(pieces),
        }
    }

    /// Whether `channel` matches. Linear in the channel's length: `*` only, matched greedily.
    pub fn matches(&self, channel: &str) -> bool {
        let Some(pieces) = &self.pieces else {
            return false;
        };
        let mut rest = channel;
        let mut after_star = false;
        for (i, piece) in pieces.iter().enumerate() {
            match piece {
                Piece::Star => after_star = true,
                Piece::Literal(lit) => {
                    let last = i + 1 == pieces.len();
                    if !after_star {
                        let Some(r) = rest.strip_prefix(lit.as_str()) else {
                            return false;
                        };
                        rest = r;
                    } else if last {
                        return rest.ends_with(lit.as_str());
                    } else {
                        let Some(at) = rest.find(lit.as_str()) else {
                            return false;
                        };
                        rest = &rest[at + lit.len()..];
                    }
                    after_star = false;
                }
            }
        }
        after_star || rest.is_empty()
    }
}

/// A set of patterns; a channel is allowed when any of them matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patterns(Vec<Pattern>);

impl Patterns {
    /// Compiles each of `texts` (at most [`MAX_PATTERNS`] are kept), inserting `sub`.
    pub fn compile<S: AsRef<str>>(texts: &[S], sub: Option<&str>) -> Self {
        Self(
            texts
                .iter()
                .take(MAX_PATTERNS)
                .map(|t| Pattern::compile(t.as_ref().trim(), sub))
                .collect(),
        )
    }

    pub fn allows(&self, channel: &str) -> bool {
        self.0.iter().any(|p| p.matches(channel))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, sub: Option<&str>, channel: &str) -> bool {
        Pattern::compile(pattern, sub).matches(channel)
    }

    #[test]
    fn literals_stars_and_subjects() {
        assert!(m("orders", None, "orders"));
        assert!(!m("orders", None, "orders2"));
        assert!(m("orders.*", None, "orders.eu"));
        assert!(m("orders.*", None, "orders.eu.paid"));
        assert!(!m("orders.*", None, "orders"));
        assert!(m("*", None, "anything:at/all"));
        assert!(m("*.paid", None, "orders.eu.paid"));
        assert!(!m("*.paid", None, "orders.eu.paid.not"));
        assert!(m("a*b*c", None, "a-b-b-c"));
        assert!(!m("a*b*c", None, "a-c-b"));
        assert!(m("user:{sub}", Some("42"), "user:42"));
        assert!(!m("user:{sub}", Some("42"), "user:43"));
        assert!(!m("user:{sub}", Some("4"), "user:42"));
        assert!(m("user:{sub}:*", Some("42"), "user:42:inbox"));
        assert!(!m("user:{sub}", None, "user:"), "no subject, no match");
        assert!(!m("user:{sub}", Some(""), "user:"));
    }

    #[test]
    fn a_subject_with_a_star_is_not_a_wildcard() {
        assert!(!m("user:{sub}", Some("*"), "user:42"));
        assert!(m("user:{sub}", Some("*"), "user:*"));
    }

    #[test]
    fn sets_allow_when_any_pattern_matches_and_are_bounded() {
        let p = Patterns::compile(&["a", "b.*"], None);
        assert!(p.allows("a") && p.allows("b.x") && !p.allows("c"));
        assert!(!Patterns::default().allows("a"));
        let many: Vec<String> = (0..1000).map(|i| format!("c{i}")).collect();
        let p = Patterns::compile(&many, None);
        assert!(p.allows("c255") && !p.allows("c256"));
    }

    proptest::proptest! {
        #[test]
        fn a_literal_pattern_matches_only_itself(a in "[a-z:.]{0,12}", b in "[a-z:.]{0,12}") {
            proptest::prop_assert_eq!(m(&a, None, &b), a == b);
        }

        #[test]
        fn star_suffix_is_a_prefix_test(a in "[a-z:.]{0,8}", b in "[a-z:.]{0,12}") {
            proptest::prop_assert_eq!(m(&format!("{a}*"), None, &b), b.starts_with(&a));
        }
    }
}
