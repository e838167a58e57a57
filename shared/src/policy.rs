//! Who may send to a tunnel, and how often: signature enforcement, IP
//! allow-lists and rate limits, in the forms both the relay's config and the
//! agent's hello use.
//!
//! The agent may ask the relay to apply a [`PolicyRequest`] to its tunnels; the
//! relay's own config for a tunnel wins over it field by field, and the policy
//! in force comes back to the agent as a [`PolicySummary`].

use std::{fmt, net::IpAddr, num::NonZeroU32, str::FromStr, time::Duration};

pub use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::signature::{Provider, MAX_SECRETS_PER_PROVIDER};

/// Most CIDRs in one allow-list: real provider lists (GitHub's hooks, Stripe's
/// webhook IPs) have a few dozen; the cap bounds the per-request work.
pub const MAX_ALLOW_ENTRIES: usize = 1024;

/// A token-bucket rate: `count` requests per `per` on average, with bursts of
/// up to `burst` requests at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Requests allowed per period.
    pub count: NonZeroU32,
    /// The period.
    pub per: Duration,
    /// Requests that may arrive at once after a quiet spell.
    pub burst: NonZeroU32,
}

impl Rate {
    /// The time one request's token takes to come back: `per / count`.
    pub fn replenish_interval(&self) -> Duration {
        self.per / self.count.get()
    }
}

impl FromStr for Rate {
    type Err = String;

    /// `100/s`, `600/min`, `5000/h`, optionally with a burst: `10/s burst 50`.
    /// The burst defaults to the count (one period's worth at once).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "{s:?} is not a rate: expected COUNT/UNIT with UNIT s, min or h, and an optional \
                 `burst N`, e.g. 100/s or 600/min burst 50"
            )
        };
        let mut words = s.split_whitespace();
        let rate = words.next().ok_or_else(bad)?;
        let burst = match (words.next(), words.next(), words.next()) {
            (None, _, _) => None,
            (Some(w), Some(n), None) if w.eq_ignore_ascii_case("burst") => {
                Some(n.parse::<NonZeroU32>().map_err(|_| bad())?)
            }
            _ => return Err(bad()),
        };
        let (count, unit) = rate.split_once('/').ok_or_else(bad)?;
        let count: NonZeroU32 = count.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim().to_ascii_lowercase().as_str() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        Ok(Rate {
            count,
            per,
            burst: burst.unwrap_or(count),
        })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "min",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)?;
        if self.burst != self.count {
            write!(f, " burst {}", self.burst)?;
        }
        Ok(())
    }
}

/// Parses one allow-list entry: a CIDR (`203.0.113.0/24`, `2001:db8::/32`) or
/// a single address (`192.0.2.7`, taken as /32 or /128). Host bits set below
/// the prefix are cleared (`10.1.2.3/8` is `10.0.0.0/8`).
///
/// # Errors
/// A message naming the entry when it is neither.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
        format!("{s:?} is not an IP address or CIDR (e.g. 192.0.2.0/24 or 2001:db8::/32)")
    })
}

/// Whether `ip` is inside any of `nets`; IPv4-mapped IPv6 addresses
/// (`::ffff:192.0.2.7`) count as their IPv4 address.
pub fn contains(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = canonical(ip);
    nets.iter().any(|n| n.contains(&ip))
}

/// `ip` with IPv4-mapped IPv6 addresses turned into IPv4 ones.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// What an agent asks the relay to enforce for its tunnels, before anything is
/// forwarded or queued. Every field empty means "nothing". `Debug` masks the
/// secrets.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRequest {
    /// Secrets per provider: requests must carry a valid, fresh signature of
    /// one of these providers, else `401`.
    pub verify: Vec<(Provider, String)>,
    /// Source addresses allowed (CIDRs or addresses); empty allows all.
    pub allow: Vec<String>,
    /// Most requests to the tunnel, as a [`Rate`] string.
    pub rate_limit: Option<String>,
    /// Most requests to the tunnel from one source address, as a [`Rate`] string.
    pub rate_limit_per_source: Option<String>,
}

impl PolicyRequest {
    /// Whether the request asks for nothing.
    pub fn is_empty(&self) -> bool {
        self.verify.is_empty()
            && self.allow.is_empty()
            && self.rate_limit.is_none()
            && self.rate_limit_per_source.is_none()
    }

    /// Checks every field, so that a bad one is refused with a message naming
    /// it instead of being half applied.
    ///
    /// # Errors
    /// A message naming the first bad field (never a secret).
    pub fn validate(&self) -> Result<(), String> {
        let mut per_provider = [0usize; Provider::ALL.len()];
        for (provider, secret) in &self.verify {
            if secret.is_empty() {
                return Err(format!("empty secret for {provider} in the verify list"));
            }
            let n = &mut per_provider[*provider as usize];
            *n += 1;
            if *n > MAX_SECRETS_PER_PROVIDER {
                return Err(format!(
                    "at most {MAX_SECRETS_PER_PROVIDER} secrets per provider; {provider} has more"
                ));
            }
        }
        if self.allow.len() > MAX_ALLOW_ENTRIES {
            return Err(format!(
                "the allow-list has {} entries; at most {MAX_ALLOW_ENTRIES}",
                self.allow.len()
            ));
        }
        for entry in &self.allow {
            parse_cidr(entry).map_err(|e| format!("allow-list: {e}"))?;
        }
        for rate in [&self.rate_limit, &self.rate_limit_per_source]
            .into_iter()
            .flatten()
        {
            rate.parse::<Rate>()?;
        }
        Ok(())
    }
}

impl fmt::Debug for PolicyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verify: Vec<String> = self
            .verify
            .iter()
            .map(|(p, _)| format!("{p}=***"))
            .collect();
        f.debug_struct("PolicyRequest")
            .field("verify", &verify)
            .field("allow", &self.allow)
            .field("rate_limit", &self.rate_limit)
            .field("rate_limit_per_source", &self.rate_limit_per_source)
            .finish()
    }
}

/// The policy in force for a tunnel, as the relay reports it to the agent
/// (no secrets).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySummary {
    /// Providers whose signatures the relay requires; empty when it enforces none.
    pub enforce: Vec<Provider>,
    /// Allowed source CIDRs; empty allows all.
    pub allow: Vec<String>,
    /// Rate limit for the tunnel as a whole.
    pub rate_limit: Option<String>,
    /// Rate limit per source address.
    pub rate_limit_per_source: Option<String>,
    /// Whether any of it comes from the relay's own config (which overrides
    /// what the agent asked for).
    pub from_relay_config: bool,
}

impl PolicySummary {
    /// Whether nothing is enforced.
    pub fn is_empty(&self) -> bool {
        self.enforce.is_empty()
            && self.allow.is_empty()
            && self.rate_limit.is_none()
            && self.rate_limit_per_source.is_none()
    }
}

impl fmt::Display for PolicySummary {
    /// One line for people: `signatures: stripe · allow: 2 ranges · 100/s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if !self.enforce.is_empty() {
            let names: Vec<&str> = self.enforce.iter().map(|p| p.as_str()).collect();
            parts.push(format!("signatures required: {}", names.join(", ")));
        }
        if !self.allow.is_empty() {
            parts.push(format!("allowed sources: {}", self.allow.join(", ")));
        }
        if let Some(r) = &self.rate_limit {
            parts.push(format!("rate limit {r}"));
        }
        if let Some(r) = &self.rate_limit_per_source {
            parts.push(format!("rate limit per source {r}"));
        }
        if parts.is_empty() {
            return f.write_str("none");
        }
        f.write_str(&parts.join(" · "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_print() {
        let r: Rate = "100/s".parse().expect("rate");
        assert_eq!(r.count.get(), 100);
        assert_eq!(r.burst.get(), 100);
        assert_eq!(r.per, Duration::from_secs(1));
        assert_eq!(r.replenish_interval(), Duration::from_millis(10));
        assert_eq!(r.to_string(), "100/s");
        let r: Rate = "600/min burst 20".parse().expect("rate");
        assert_eq!(r.burst.get(), 20);
        assert_eq!(r.replenish_interval(), Duration::from_millis(100));
        assert_eq!(r.to_string(), "600/min burst 20");
        assert_eq!(
            "5/H".parse::<Rate>().expect("rate").per,
            Duration::from_secs(3600)
        );
        for bad in [
            "",
            "100",
            "0/s",
            "-1/s",
            "10/day",
            "10/s burst",
            "10/s burst 0",
            "10/s x 5",
        ] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cidrs_and_addresses_parse() {
        assert_eq!(
            parse_cidr("10.1.2.3/8").expect("cidr").to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            parse_cidr(" 192.0.2.7 ").expect("ip").to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(
            parse_cidr("2001:db8::1").expect("ip").to_string(),
            "2001:db8::1/128"
        );
        for bad in ["", "10.0.0.0/33", "example.com", "10.0.0/8"] {
            assert!(parse_cidr(bad).is_err(), "{bad:?}");
        }
        let nets = [
            parse_cidr("192.0.2.0/24").expect("v4"),
            parse_cidr("2001:db8::/32").expect("v6"),
        ];
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(contains(&nets, ip("192.0.2.200")));
        assert!(contains(&nets, ip("::ffff:192.0.2.1")));
        assert!(contains(&nets, ip("2001:db8:1::5")));
        assert!(!contains(&nets, ip("192.0.3.1")));
        assert!(!contains(&nets, ip("2001:db9::1")));
    }

    #[test]
    fn requests_are_validated_and_debug_hides_secrets() {
        let mut req = PolicyRequest {
            verify: vec![(Provider::Stripe, "whsec_topsecret".into())],
            allow: vec!["192.0.2.0/24".into()],
            rate_limit: Some("10/s".into()),
            rate_limit_per_source: None,
        };
        assert!(req.validate().is_ok());
        assert!(!format!("{req:?}").contains("topsecret"));
        req.allow.push("nope".into());
        assert!(req.validate().expect_err("bad cidr").contains("nope"));
        req.allow.pop();
        req.verify.push((Provider::Stripe, "b".into()));
        req.verify.push((Provider::Stripe, "c".into()));
        assert!(req.validate().is_err());
        req.verify.truncate(1);
        req.rate_limit = Some("fast".into());
        assert!(req.validate().is_err());
        assert!(PolicyRequest::default().is_empty());
    }
}
