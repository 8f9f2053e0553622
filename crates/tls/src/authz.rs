//! Authorization of a TLS peer by its identity: QEMU's `authz-simple` (one exact identity) and
//! `authz-list` (ordered rules, first match wins, `exact` or `glob` match, a default policy).
//!
//! The identity is the client certificate's distinguished name in QEMU's text form
//! (`CN=client.example.com,O=Example`), or a PSK username. This module only decides; extracting
//! the name from a certificate belongs to the TLS layer.

use std::fmt;

/// What a rule (or a list's default) says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthzPolicy {
    /// The identity is allowed.
    Allow,
    /// The identity is refused.
    Deny,
}

impl AuthzPolicy {
    /// Parses QEMU's names (`allow`, `deny`).
    pub fn parse(s: &str) -> Result<Self, AuthzError> {
        match s {
            "allow" => Ok(Self::Allow),
            "deny" => Ok(Self::Deny),
            _ => Err(AuthzError::BadValue {
                what: "policy",
                value: s.to_string(),
                expected: "'allow' or 'deny'",
            }),
        }
    }
}

/// How a rule's `match` is compared with the identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AuthzFormat {
    /// Byte-for-byte equality (QEMU's default).
    #[default]
    Exact,
    /// Shell-style pattern: `*` any run of characters, `?` one character (QEMU's
    /// `g_pattern_match_simple`); nothing else is special.
    Glob,
}

impl AuthzFormat {
    /// Parses QEMU's names (`exact`, `glob`).
    pub fn parse(s: &str) -> Result<Self, AuthzError> {
        match s {
            "exact" => Ok(Self::Exact),
            "glob" => Ok(Self::Glob),
            _ => Err(AuthzError::BadValue {
                what: "format",
                value: s.to_string(),
                expected: "'exact' or 'glob'",
            }),
        }
    }
}

/// One `authz-list` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthzRule {
    /// The identity (or pattern) compared.
    pub pattern: String,
    /// What a match decides.
    pub policy: AuthzPolicy,
    /// How `pattern` is compared.
    pub format: AuthzFormat,
}

impl AuthzRule {
    fn matches(&self, identity: &str) -> bool {
        match self.format {
            AuthzFormat::Exact => self.pattern == identity,
            AuthzFormat::Glob => glob_match(self.pattern.as_bytes(), identity.as_bytes()),
        }
    }
}

/// An authorization object, as created by `object-add`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authz {
    /// `authz-simple`: only this identity is allowed.
    Simple {
        /// The one allowed identity.
        identity: String,
    },
    /// `authz-list`: the first matching rule decides, else `policy`.
    List {
        /// The default when no rule matches (QEMU's default: deny).
        policy: AuthzPolicy,
        /// Rules in order.
        rules: Vec<AuthzRule>,
    },
}

/// Errors of authorization.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthzError {
    /// A property has a value outside its set.
    #[error("invalid {what} '{value}': expected {expected}")]
    BadValue {
        /// The property.
        what: &'static str,
        /// What was given.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },
    /// The peer's identity is not allowed.
    #[error("peer '{identity}' is not authorized by '{authz_id}'")]
    NotAuthorized {
        /// The peer's identity (certificate DN or PSK username).
        identity: String,
        /// The authorization object's id.
        authz_id: String,
    },
}

impl Authz {
    /// Whether `identity` is allowed.
    pub fn allows(&self, identity: &str) -> bool {
        match self {
            Self::Simple { identity: allowed } => allowed == identity,
            Self::List { policy, rules } => {
                let decided = rules.iter().find(|r| r.matches(identity)).map(|r| r.policy);
                decided.unwrap_or(*policy) == AuthzPolicy::Allow
            }
        }
    }

    /// [`Self::allows`] as a result naming the object (`authz_id`) and the refused identity.
    pub fn check(&self, authz_id: &str, identity: &str) -> Result<(), AuthzError> {
        if self.allows(identity) {
            Ok(())
        } else {
            Err(AuthzError::NotAuthorized {
                identity: identity.to_string(),
                authz_id: authz_id.to_string(),
            })
        }
    }
}

impl fmt::Display for Authz {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Simple { .. } => f.write_str("authz-simple"),
            Self::List { .. } => f.write_str("authz-list"),
        }
    }
}

/// `*` and `?` matching over bytes, iterative with one backtrack point (linear in practice, no
/// recursion a hostile identity could deepen).
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pattern: &str, policy: AuthzPolicy, format: AuthzFormat) -> AuthzRule {
        AuthzRule {
            pattern: pattern.into(),
            policy,
            format,
        }
    }

    #[test]
    fn simple_allows_only_its_identity() {
        let a = Authz::Simple {
            identity: "CN=client.example.com,O=Example".into(),
        };
        assert!(a.allows("CN=client.example.com,O=Example"));
        assert!(!a.allows("CN=client.example.com,O=Example "));
        assert!(!a.allows("CN=other.example.com,O=Example"));
        assert_eq!(
            a.check("auth0", "CN=x").unwrap_err().to_string(),
            "peer 'CN=x' is not authorized by 'auth0'"
        );
    }

    #[test]
    fn list_first_match_wins_then_default() {
        let a = Authz::List {
            policy: AuthzPolicy::Deny,
            rules: vec![
                rule(
                    "CN=bad.example.com,O=Example",
                    AuthzPolicy::Deny,
                    AuthzFormat::Exact,
                ),
                rule(
                    "CN=*.example.com,O=Example",
                    AuthzPolicy::Allow,
                    AuthzFormat::Glob,
                ),
            ],
        };
        assert!(a.allows("CN=good.example.com,O=Example"));
        assert!(!a.allows("CN=bad.example.com,O=Example"));
        assert!(!a.allows("CN=good.example.org,O=Example"));
        let open = Authz::List {
            policy: AuthzPolicy::Allow,
            rules: vec![],
        };
        assert!(open.allows("anything"));
    }

    #[test]
    fn exact_format_does_not_treat_star_as_wildcard() {
        let a = Authz::List {
            policy: AuthzPolicy::Deny,
            rules: vec![rule("CN=*", AuthzPolicy::Allow, AuthzFormat::Exact)],
        };
        assert!(!a.allows("CN=x"));
        assert!(a.allows("CN=*"));
    }

    #[test]
    fn glob_semantics() {
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"a?c", b"abc"));
        assert!(!glob_match(b"a?c", b"ac"));
        assert!(glob_match(b"*b*d", b"abcbd"));
        assert!(!glob_match(b"*b*d", b"abcbe"));
        assert!(glob_match(b"a**", b"a"));
        assert!(!glob_match(b"", b"a"));
        // A long hostile identity against many stars stays fast (no exponential backtracking).
        let text = vec![b'a'; 10_000];
        assert!(!glob_match(b"*a*a*a*a*a*a*a*b", &text));
    }

    #[test]
    fn names_parse_as_qemu_spells_them() {
        assert_eq!(AuthzPolicy::parse("allow"), Ok(AuthzPolicy::Allow));
        assert_eq!(AuthzFormat::parse("glob"), Ok(AuthzFormat::Glob));
        assert!(AuthzPolicy::parse("Allow")
            .unwrap_err()
            .to_string()
            .contains("'allow' or 'deny'"));
        assert!(AuthzFormat::parse("regex").is_err());
    }
}
