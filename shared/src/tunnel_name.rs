//! Tunnel names and the patterns tokens grant them by.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// Longest tunnel name, in bytes: a DNS label holds at most 63 octets, and names
/// double as subdomains (`NAME.relay.example.com`).
pub const MAX_TUNNEL_NAME_LEN: usize = 63;

/// A validated tunnel name: one DNS label of lowercase ASCII letters, digits and
/// inner hyphens. Parsing lowercases, so `Alice-Dev` and `alice-dev` are one tunnel.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct TunnelName(String);

impl TunnelName {
    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TunnelName {
    type Err = TunnelNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // A trailing dot is the DNS root, not part of the label.
        let s = s.strip_suffix('.').unwrap_or(s);
        if s.is_empty() {
            return Err(TunnelNameError::Empty);
        }
        if s.len() > MAX_TUNNEL_NAME_LEN {
            return Err(TunnelNameError::TooLong { len: s.len() });
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(TunnelNameError::BadChar(c));
        }
        if s.starts_with('-') || s.ends_with('-') {
            return Err(TunnelNameError::EdgeHyphen);
        }
        Ok(TunnelName(s.to_ascii_lowercase()))
    }
}

impl<'de> Deserialize<'de> for TunnelName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for TunnelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a string is not a tunnel name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TunnelNameError {
    #[error("tunnel name is empty")]
    Empty,
    #[error("tunnel name is {len} bytes long; a DNS label holds at most {MAX_TUNNEL_NAME_LEN}")]
    TooLong { len: usize },
    #[error("tunnel name may hold only letters, digits and '-', not {0:?}")]
    BadChar(char),
    #[error("tunnel name may not start or end with '-'")]
    EdgeHyphen,
}

/// A glob over tunnel names, as granted to a token: `alice-*`, `*`, `ci`.
/// `*` matches any run of characters (possibly empty); everything else is literal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TunnelPattern(String);

impl TunnelPattern {
    /// Whether `name` is granted by this pattern.
    pub fn matches(&self, name: &TunnelName) -> bool {
        glob_match(self.0.as_bytes(), name.as_str().as_bytes())
    }

    /// The pattern as written (lowercased).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TunnelPattern {
    type Err = TunnelNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(TunnelNameError::Empty);
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '*'))
        {
            return Err(TunnelNameError::BadChar(c));
        }
        Ok(TunnelPattern(s.to_ascii_lowercase()))
    }
}

impl TryFrom<String> for TunnelPattern {
    type Error = TunnelNameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<TunnelName> for String {
    fn from(n: TunnelName) -> String {
        n.0
    }
}

impl From<TunnelPattern> for String {
    fn from(p: TunnelPattern) -> String {
        p.0
    }
}

impl fmt::Display for TunnelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Iterative glob match with backtracking to the last `*`: linear in practice,
/// never recursive, so a hostile pattern cannot blow the stack.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> TunnelName {
        s.parse().expect("valid name in test")
    }

    #[test]
    fn names_follow_dns_label_rules() {
        assert_eq!(name("Alice-Dev.").as_str(), "alice-dev");
        assert_eq!("".parse::<TunnelName>(), Err(TunnelNameError::Empty));
        assert_eq!("-a".parse::<TunnelName>(), Err(TunnelNameError::EdgeHyphen));
        assert_eq!("a-".parse::<TunnelName>(), Err(TunnelNameError::EdgeHyphen));
        assert_eq!(
            "a_b".parse::<TunnelName>(),
            Err(TunnelNameError::BadChar('_'))
        );
        assert_eq!(
            "a.b".parse::<TunnelName>(),
            Err(TunnelNameError::BadChar('.'))
        );
        assert_eq!(
            "../x".parse::<TunnelName>(),
            Err(TunnelNameError::BadChar('.'))
        );
        assert!("a".repeat(63).parse::<TunnelName>().is_ok());
        assert_eq!(
            "a".repeat(64).parse::<TunnelName>(),
            Err(TunnelNameError::TooLong { len: 64 })
        );
    }

    #[test]
    fn patterns_glob_over_names() {
        let p: TunnelPattern = "alice-*".parse().expect("pattern");
        assert!(p.matches(&name("alice-dev")));
        assert!(!p.matches(&name("bob-dev")));
        assert!(!p.matches(&name("alice")));
        let any: TunnelPattern = "*".parse().expect("pattern");
        assert!(any.matches(&name("x")));
        let mid: TunnelPattern = "a*b*c".parse().expect("pattern");
        assert!(mid.matches(&name("abc")));
        assert!(mid.matches(&name("axxbyyc")));
        assert!(!mid.matches(&name("axxbyy")));
        let exact: TunnelPattern = "CI".parse().expect("pattern");
        assert!(exact.matches(&name("ci")));
        assert!(!exact.matches(&name("cid")));
        assert!("a/b".parse::<TunnelPattern>().is_err());
    }
}
