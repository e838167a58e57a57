//! Who may send to a tunnel, and how often: the relay's side of
//! [`hookrelay_shared::policy`].
//!
//! A tunnel's policy comes from the relay's config file (`[tunnels.NAME]`) or
//! from its agent's hello ([`PolicyRequest`]); the config wins field by field,
//! so an operator's allow-list or secret cannot be loosened by an agent. What
//! agents asked for is kept in `DATA_DIR/policies.json` (mode 0600: it holds
//! signing secrets), so a tunnel whose agent is offline — or a relay that just
//! restarted — still refuses forged webhooks instead of queueing them.
//!
//! Checks, in the order ingress applies them: the client address (from the
//! socket, or from `X-Forwarded-For`/`Forwarded` when the socket is a trusted
//! proxy), the relay-wide per-source rate limit, the tunnel's allow-list (403),
//! its rate limits (429, or 503 when configured), then its signatures (401).

use std::{
    collections::{BTreeMap, HashMap},
    fs, io,
    net::{IpAddr, Ipv6Addr},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

use governor::{
    clock::{Clock, DefaultClock},
    DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter,
};
use hookrelay_shared::{
    policy::{canonical, contains, parse_cidr, IpNet, PolicyRequest, PolicySummary, Rate},
    signature::{self, Provider, SecretSet, SignedRequest, Verdict},
    TunnelName,
};
use http::{HeaderMap, StatusCode};

/// Keyed limiters are swept of idle sources every this many checks.
const SWEEP_EVERY: u64 = 4096;

/// A keyed limiter is swept only once it tracks more sources than this.
const SWEEP_ABOVE: usize = 10_000;

/// The status a rate-limited request gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LimitStatus {
    /// `429 Too Many Requests` (the default).
    #[default]
    TooManyRequests,
    /// `503 Service Unavailable`, for senders that only back off on 5xx.
    ServiceUnavailable,
}

impl LimitStatus {
    /// The HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            LimitStatus::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            LimitStatus::ServiceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// From `429` or `503`.
    ///
    /// # Errors
    /// Any other number.
    pub fn from_code(code: u16) -> Result<Self, String> {
        match code {
            429 => Ok(LimitStatus::TooManyRequests),
            503 => Ok(LimitStatus::ServiceUnavailable),
            _ => Err(format!("rate_limit_status must be 429 or 503, not {code}")),
        }
    }
}

/// One tunnel's policy from the relay's config file; `None` fields are left to
/// the agent.
#[derive(Clone, Debug, Default)]
pub struct TunnelPolicyConfig {
    /// Secrets whose signatures are required.
    pub verify: Option<SecretSet>,
    /// Allowed source networks.
    pub allow: Option<Vec<IpNet>>,
    /// Rate for the tunnel as a whole.
    pub rate_limit: Option<Rate>,
    /// Rate per source address.
    pub rate_limit_per_source: Option<Rate>,
}

/// The policy settings of the relay's config.
#[derive(Clone, Debug, Default)]
pub struct PolicyConfig {
    /// Proxies (CIDRs) whose `X-Forwarded-For`/`Forwarded` are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Relay-wide rate per source address, over all tunnels.
    pub rate_limit_per_source: Option<Rate>,
    /// Status of rate-limited requests.
    pub limit_status: LimitStatus,
    /// Per-tunnel policies.
    pub tunnels: BTreeMap<TunnelName, TunnelPolicyConfig>,
}

/// Why a request was refused before anything was forwarded or queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The source is not in the tunnel's allow-list.
    NotAllowed(IpAddr),
    /// A rate limit ran out; retry after the given time.
    RateLimited {
        /// `"tunnel"` or `"source"`.
        scope: &'static str,
        /// When the next request would be admitted.
        retry_after: Duration,
        /// 429 or 503.
        status: StatusCode,
    },
    /// The signature check failed.
    Signature(Verdict),
}

/// A per-source key: the address, IPv6 cut to its /64 (one host's usual
/// allocation, so one host cannot dodge the limit by rotating addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct SourceKey(IpAddr);

impl SourceKey {
    fn of(ip: IpAddr) -> Self {
        match canonical(ip) {
            IpAddr::V6(v6) => {
                let seg = v6.segments();
                SourceKey(IpAddr::V6(Ipv6Addr::new(
                    seg[0], seg[1], seg[2], seg[3], 0, 0, 0, 0,
                )))
            }
            v4 => SourceKey(v4),
        }
    }
}

/// A keyed limiter that forgets idle sources now and then, so a flood of
/// distinct addresses cannot grow it without bound.
struct SourceLimiter {
    limiter: DefaultKeyedRateLimiter<SourceKey>,
    checks: AtomicU64,
}

impl SourceLimiter {
    fn new(rate: Rate) -> Self {
        SourceLimiter {
            limiter: RateLimiter::keyed(quota(rate)),
            checks: AtomicU64::new(0),
        }
    }

    fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1
            && self.limiter.len() > SWEEP_ABOVE
        {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&SourceKey::of(ip))
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

fn quota(rate: Rate) -> Quota {
    // `replenish_interval` is at least 1/u32::MAX of a second, never zero.
    Quota::with_period(rate.replenish_interval())
        .unwrap_or_else(|| Quota::per_second(rate.count))
        .allow_burst(rate.burst)
}

/// A tunnel's policy in force, with its limiters' state.
pub struct TunnelPolicy {
    secrets: Option<SecretSet>,
    allow: Vec<IpNet>,
    total: Option<DefaultDirectRateLimiter>,
    per_source: Option<SourceLimiter>,
    summary: PolicySummary,
    limit_status: StatusCode,
}

impl std::fmt::Debug for TunnelPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelPolicy")
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

impl TunnelPolicy {
    /// Whether the tunnel requires signatures: the body must then be read
    /// whole before anything is forwarded or queued.
    pub fn verifies(&self) -> bool {
        self.secrets.is_some()
    }

    /// What is enforced, for the agent and the logs.
    pub fn summary(&self) -> &PolicySummary {
        &self.summary
    }

    /// The allow-list, then the tunnel's rate limits, for a request from `client`.
    ///
    /// # Errors
    /// [`Refusal::NotAllowed`] or [`Refusal::RateLimited`].
    pub fn admit(&self, client: IpAddr) -> Result<(), Refusal> {
        if !self.allow.is_empty() && !contains(&self.allow, client) {
            return Err(Refusal::NotAllowed(canonical(client)));
        }
        if let Some(per_source) = &self.per_source {
            per_source
                .check(client)
                .map_err(|retry_after| Refusal::RateLimited {
                    scope: "source",
                    retry_after,
                    status: self.limit_status,
                })?;
        }
        if let Some(total) = &self.total {
            total.check().map_err(|not_until| Refusal::RateLimited {
                scope: "tunnel",
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
                status: self.limit_status,
            })?;
        }
        Ok(())
    }

    /// Checks the request's signature when the tunnel requires one: valid and
    /// fresh passes; invalid, stale, unsigned, or signed by a provider without
    /// a secret here is refused. `now` is unix seconds.
    ///
    /// # Errors
    /// [`Refusal::Signature`] with the verdict.
    pub fn verify(&self, req: &SignedRequest<'_>, now: i64) -> Result<(), Refusal> {
        let Some(secrets) = &self.secrets else {
            return Ok(());
        };
        match signature::verify_detected(secrets, req, now) {
            Verdict::Valid { .. } => Ok(()),
            other => Err(Refusal::Signature(other)),
        }
    }
}

/// Every tunnel's policy, the relay-wide per-source limit and the trusted proxies.
pub struct Policies {
    config: PolicyConfig,
    per_source: Option<SourceLimiter>,
    requested: Mutex<BTreeMap<TunnelName, PolicyRequest>>,
    effective: RwLock<HashMap<TunnelName, Arc<TunnelPolicy>>>,
    file: Option<PathBuf>,
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policies")
            .field("trusted_proxies", &self.config.trusted_proxies)
            .field("tunnels", &self.config.tunnels.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The file of agents' policy requests could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot save tunnel policies to {path}: {source}")]
pub struct SaveError {
    path: String,
    #[source]
    source: io::Error,
}

impl Policies {
    /// The policies of `config`, plus what agents asked for earlier (read from
    /// `file` when it exists; an unreadable file is reported and ignored, since
    /// each agent sends its request again when it reconnects).
    pub fn open(config: PolicyConfig, file: Option<PathBuf>) -> Self {
        let requested: BTreeMap<TunnelName, PolicyRequest> = file
            .as_ref()
            .and_then(|p| match fs::read_to_string(p) {
                Ok(text) => match serde_json::from_str(&text) {
                    Ok(map) => Some(map),
                    Err(err) => {
                        tracing::warn!(path = %p.display(), error = &err as &dyn std::error::Error, "ignoring unreadable tunnel policies");
                        None
                    }
                },
                Err(_) => None,
            })
            .unwrap_or_default();
        let per_source = config.rate_limit_per_source.map(SourceLimiter::new);
        let policies = Policies {
            config,
            per_source,
            requested: Mutex::new(requested),
            effective: RwLock::new(HashMap::new()),
            file,
        };
        let names: Vec<TunnelName> = {
            let requested = policies.requested.lock().unwrap_or_else(|p| p.into_inner());
            policies
                .config
                .tunnels
                .keys()
                .chain(requested.keys())
                .cloned()
                .collect()
        };
        for name in names {
            policies.rebuild(&name);
        }
        policies
    }

    /// No policies at all: every request is admitted.
    pub fn none() -> Self {
        Self::open(PolicyConfig::default(), None)
    }

    /// The policy in force for `tunnel`; `None` when nothing is enforced.
    pub fn tunnel(&self, tunnel: &TunnelName) -> Option<Arc<TunnelPolicy>> {
        self.effective
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(tunnel)
            .cloned()
    }

    /// What is enforced for `tunnel`.
    pub fn summary(&self, tunnel: &TunnelName) -> PolicySummary {
        self.tunnel(tunnel)
            .map(|p| p.summary.clone())
            .unwrap_or_default()
    }

    /// Records what an agent asked for its `tunnels` (an empty request clears
    /// an earlier one) and saves it. Limiter state is kept when the request is
    /// unchanged, so reconnecting does not refill a rate limit.
    ///
    /// # Errors
    /// A message naming the bad field (never a secret) when `request` does not
    /// validate, or when it could not be saved: then nothing changes.
    pub fn request(&self, tunnels: &[TunnelName], request: &PolicyRequest) -> Result<(), String> {
        request.validate()?;
        let changed: Vec<TunnelName> = {
            let mut requested = self.requested.lock().unwrap_or_else(|p| p.into_inner());
            let before = requested.clone();
            let mut changed = Vec::new();
            for name in tunnels {
                let old = requested.get(name);
                if request.is_empty() {
                    if old.is_some() {
                        requested.remove(name);
                        changed.push(name.clone());
                    }
                } else if old != Some(request) {
                    requested.insert(name.clone(), request.clone());
                    changed.push(name.clone());
                }
            }
            if !changed.is_empty() {
                if let Err(err) = self.save(&requested) {
                    *requested = before;
                    return Err(err.to_string());
                }
            }
            changed
        };
        for name in &changed {
            self.rebuild(name);
        }
        Ok(())
    }

    /// The relay-wide per-source limit.
    ///
    /// # Errors
    /// [`Refusal::RateLimited`] with scope `source`.
    pub fn admit_source(&self, client: IpAddr) -> Result<(), Refusal> {
        match &self.per_source {
            Some(limiter) => limiter
                .check(client)
                .map_err(|retry_after| Refusal::RateLimited {
                    scope: "source",
                    retry_after,
                    status: self.config.limit_status.status(),
                }),
            None => Ok(()),
        }
    }

    /// The address a request comes from: the socket's peer, unless that peer is
    /// a trusted proxy; then the nearest address in `X-Forwarded-For` (or, if
    /// absent, `Forwarded: for=`) that is not a trusted proxy itself, walking
    /// from the right (the entries to the left are whatever the sender wrote).
    /// An unreadable entry stops the walk at the last trusted hop.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let trusted = &self.config.trusted_proxies;
        if trusted.is_empty() || !contains(trusted, peer) {
            return canonical(peer);
        }
        let chain = forwarded_chain(headers);
        let mut client = canonical(peer);
        for entry in chain.iter().rev() {
            match entry {
                Some(ip) => {
                    client = canonical(*ip);
                    if !contains(trusted, client) {
                        break;
                    }
                }
                None => break,
            }
        }
        client
    }

    /// The scheme a trusted proxy says the sender used (`X-Forwarded-Proto`,
    /// or `Forwarded: proto=`); `None` from anyone else or when absent.
    pub fn forwarded_proto(&self, peer: IpAddr, headers: &HeaderMap) -> Option<&'static str> {
        let trusted = &self.config.trusted_proxies;
        if trusted.is_empty() || !contains(trusted, peer) {
            return None;
        }
        let from_xfp = headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.rsplit(',').next().unwrap_or(v).trim().to_owned());
        let from_forwarded = || {
            let last = forwarded_elements(headers).into_iter().flatten().last()?;
            forwarded_param(last, "proto").map(str::to_owned)
        };
        match from_xfp
            .or_else(from_forwarded)?
            .to_ascii_lowercase()
            .as_str()
        {
            "https" => Some("https"),
            "http" => Some("http"),
            _ => None,
        }
    }

    fn rebuild(&self, tunnel: &TunnelName) {
        let requested = self
            .requested
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tunnel)
            .cloned()
            .unwrap_or_default();
        let policy = self.build(self.config.tunnels.get(tunnel), &requested);
        let mut effective = self.effective.write().unwrap_or_else(|p| p.into_inner());
        match policy {
            Some(policy) => effective.insert(tunnel.clone(), Arc::new(policy)),
            None => effective.remove(tunnel),
        };
    }

    /// The config's fields, each falling back to the agent's. Agents' requests
    /// were validated on arrival; an entry that no longer parses (a file edited
    /// by hand) is skipped with a warning.
    fn build(
        &self,
        config: Option<&TunnelPolicyConfig>,
        requested: &PolicyRequest,
    ) -> Option<TunnelPolicy> {
        let config = config.cloned().unwrap_or_default();
        let from_relay_config = config.verify.is_some()
            || config.allow.is_some()
            || config.rate_limit.is_some()
            || config.rate_limit_per_source.is_some();
        let secrets = config.verify.or_else(|| {
            let mut set = SecretSet::new();
            for (provider, secret) in &requested.verify {
                if set.add(*provider, secret.clone()).is_err() {
                    tracing::warn!(%provider, "ignoring a requested secret");
                }
            }
            (!set.is_empty()).then_some(set)
        });
        let allow = config.allow.unwrap_or_else(|| {
            requested
                .allow
                .iter()
                .filter_map(|s| {
                    parse_cidr(s)
                        .map_err(
                            |e| tracing::warn!(error = %e, "ignoring a requested allow-list entry"),
                        )
                        .ok()
                })
                .collect()
        });
        let rate = |configured: Option<Rate>, asked: &Option<String>| {
            configured.or_else(|| asked.as_deref().and_then(|s| s.parse().ok()))
        };
        let rate_limit = rate(config.rate_limit, &requested.rate_limit);
        let rate_limit_per_source = rate(
            config.rate_limit_per_source,
            &requested.rate_limit_per_source,
        );
        let enforce: Vec<Provider> = secrets
            .as_ref()
            .map(SecretSet::providers)
            .unwrap_or_default();
        let summary = PolicySummary {
            enforce,
            allow: allow.iter().map(ToString::to_string).collect(),
            rate_limit: rate_limit.map(|r| r.to_string()),
            rate_limit_per_source: rate_limit_per_source.map(|r| r.to_string()),
            from_relay_config,
        };
        if summary.is_empty() {
            return None;
        }
        Some(TunnelPolicy {
            secrets,
            allow,
            total: rate_limit.map(|r| RateLimiter::direct(quota(r))),
            per_source: rate_limit_per_source.map(SourceLimiter::new),
            summary,
            limit_status: self.config.limit_status.status(),
        })
    }

    fn save(&self, requested: &BTreeMap<TunnelName, PolicyRequest>) -> Result<(), SaveError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let err = |source| SaveError {
            path: path.display().to_string(),
            source,
        };
        let text = serde_json::to_string_pretty(requested).map_err(|e| err(io::Error::other(e)))?;
        let tmp = path.with_extension("json.tmp");
        crate::auth::write_private(&tmp, text.as_bytes()).map_err(err)?;
        fs::rename(&tmp, path).map_err(err)
    }
}

/// The addresses a request passed through, oldest first, from every
/// `X-Forwarded-For` line or, without one, every `Forwarded` `for=` parameter.
/// `None` marks an entry that is not an address (`unknown`, an obfuscated
/// identifier, garbage).
fn forwarded_chain(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let xff: Vec<Option<IpAddr>> = headers
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|v| {
            v.to_str()
                .unwrap_or("\u{0}")
                .split(',')
                .map(|s| parse_node(s.trim()))
                .collect::<Vec<_>>()
        })
        .collect();
    if !xff.is_empty() {
        return xff;
    }
    // An element without `for=` says nothing about the sender; one that is
    // not text is unreadable and stops the walk like garbage would.
    forwarded_elements(headers)
        .into_iter()
        .filter_map(|element| match element {
            Some(element) => forwarded_param(element, "for").map(parse_node),
            None => Some(None),
        })
        .collect()
}

/// The comma-separated elements of every `Forwarded` line, in order; a line
/// that is not text counts as one unreadable element (`None`).
fn forwarded_elements(headers: &HeaderMap) -> Vec<Option<&str>> {
    headers
        .get_all("forwarded")
        .iter()
        .flat_map(|v| match v.to_str() {
            Ok(text) => text.split(',').map(Some).collect::<Vec<_>>(),
            Err(_) => vec![None],
        })
        .collect()
}

/// The value of `key` in one `Forwarded` element (`for=…;proto=…`), trimmed
/// and unquoted; the key is matched without case.
fn forwarded_param<'a>(element: &'a str, key: &str) -> Option<&'a str> {
    element.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(key)
            .then(|| v.trim().trim_matches('"'))
    })
}

/// `192.0.2.7`, `192.0.2.7:4711`, `2001:db8::1`, `[2001:db8::1]:4711`.
fn parse_node(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    let (host, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn name(s: &str) -> TunnelName {
        s.parse().expect("tunnel name")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn with_proxies(proxies: &[&str]) -> Policies {
        Policies::open(
            PolicyConfig {
                trusted_proxies: proxies
                    .iter()
                    .map(|p| parse_cidr(p).expect("cidr"))
                    .collect(),
                ..PolicyConfig::default()
            },
            None,
        )
    }

    #[test]
    fn forwarded_headers_count_only_from_trusted_proxies() {
        let p = with_proxies(&["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "198.51.100.9, 203.0.113.5")]);
        // Not from a proxy: the header is whatever the sender wrote.
        assert_eq!(p.client_ip(ip("192.0.2.1"), &h), ip("192.0.2.1"));
        // From the proxy: the rightmost untrusted entry, not the spoofable leftmost.
        assert_eq!(p.client_ip(ip("10.1.1.1"), &h), ip("203.0.113.5"));
        // A chain of trusted proxies is walked through.
        let h = headers(&[("x-forwarded-for", "203.0.113.5, 10.2.2.2")]);
        assert_eq!(p.client_ip(ip("10.1.1.1"), &h), ip("203.0.113.5"));
        // No header: the proxy itself.
        assert_eq!(
            p.client_ip(ip("10.1.1.1"), &HeaderMap::new()),
            ip("10.1.1.1")
        );
        // Garbage stops the walk at the last trusted hop.
        let h = headers(&[("x-forwarded-for", "203.0.113.5, bogus")]);
        assert_eq!(p.client_ip(ip("10.1.1.1"), &h), ip("10.1.1.1"));
        // RFC 7239, with quotes, ports and IPv6 brackets.
        let h = headers(&[(
            "forwarded",
            "for=192.0.2.60;proto=http, for=\"[2001:db8::7]:4711\"",
        )]);
        assert_eq!(p.client_ip(ip("10.1.1.1"), &h), ip("2001:db8::7"));
        // Several header lines form one list.
        let h = headers(&[
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-for", "198.51.100.2:80"),
        ]);
        assert_eq!(p.client_ip(ip("10.1.1.1"), &h), ip("198.51.100.2"));
        // Without trusted proxies nothing is believed.
        let none = Policies::none();
        let h = headers(&[("x-forwarded-for", "203.0.113.5")]);
        assert_eq!(none.client_ip(ip("10.1.1.1"), &h), ip("10.1.1.1"));
        // The scheme, likewise.
        let h = headers(&[("x-forwarded-proto", "https")]);
        assert_eq!(p.forwarded_proto(ip("10.1.1.1"), &h), Some("https"));
        assert_eq!(p.forwarded_proto(ip("192.0.2.1"), &h), None);
        assert_eq!(none.forwarded_proto(ip("10.1.1.1"), &h), None);
        let h = headers(&[("forwarded", "for=192.0.2.60;proto=HTTPS")]);
        assert_eq!(p.forwarded_proto(ip("10.1.1.1"), &h), Some("https"));
        let h = headers(&[("x-forwarded-proto", "gopher")]);
        assert_eq!(p.forwarded_proto(ip("10.1.1.1"), &h), None);
    }

    #[test]
    fn config_wins_over_the_agent_field_by_field() {
        let mut config = PolicyConfig::default();
        config.tunnels.insert(
            name("shop"),
            TunnelPolicyConfig {
                allow: Some(vec![parse_cidr("192.0.2.0/24").expect("cidr")]),
                ..TunnelPolicyConfig::default()
            },
        );
        let p = Policies::open(config, None);
        let asked = PolicyRequest {
            verify: vec![(Provider::Shopify, "s3cret".into())],
            allow: vec!["0.0.0.0/0".into()],
            rate_limit: Some("5/s".into()),
            rate_limit_per_source: None,
        };
        p.request(&[name("shop"), name("other")], &asked)
            .expect("valid request");
        let shop = p.tunnel(&name("shop")).expect("policy");
        assert_eq!(shop.summary().allow, ["192.0.2.0/24"]);
        assert_eq!(shop.summary().enforce, [Provider::Shopify]);
        assert_eq!(shop.summary().rate_limit.as_deref(), Some("5/s"));
        assert!(shop.summary().from_relay_config);
        assert_eq!(
            shop.admit(ip("198.51.100.1")),
            Err(Refusal::NotAllowed(ip("198.51.100.1")))
        );
        assert!(shop.admit(ip("192.0.2.9")).is_ok());
        let other = p.tunnel(&name("other")).expect("policy");
        assert!(!other.summary().from_relay_config);
        assert!(other.admit(ip("198.51.100.1")).is_ok());
        // An empty request clears what the agent asked, not the config.
        p.request(&[name("shop"), name("other")], &PolicyRequest::default())
            .expect("empty request");
        assert!(p.tunnel(&name("other")).is_none());
        assert_eq!(p.summary(&name("shop")).enforce, []);
        assert_eq!(p.summary(&name("shop")).allow, ["192.0.2.0/24"]);
    }

    #[test]
    fn rate_limits_refuse_with_a_retry_time_and_per_source_keys_by_v6_prefix() {
        let p = Policies::open(PolicyConfig::default(), None);
        let asked = PolicyRequest {
            rate_limit_per_source: Some("1/min burst 2".into()),
            rate_limit: Some("1/h burst 5".into()),
            ..PolicyRequest::default()
        };
        p.request(&[name("t")], &asked).expect("valid");
        let t = p.tunnel(&name("t")).expect("policy");
        assert!(t.admit(ip("2001:db8:1:1::1")).is_ok());
        assert!(t.admit(ip("2001:db8:1:1::2")).is_ok());
        // Third from the same /64: the per-source burst of 2 is spent.
        match t.admit(ip("2001:db8:1:1:ffff::3")) {
            Err(Refusal::RateLimited {
                scope: "source",
                retry_after,
                status,
            }) => {
                assert!(
                    retry_after > Duration::from_secs(1) && retry_after <= Duration::from_secs(60)
                );
                assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
            }
            other => panic!("expected a per-source refusal, got {other:?}"),
        }
        // Other sources share the tunnel's total of 5.
        for i in 0..3 {
            let addr: IpAddr = format!("192.0.2.{i}").parse().expect("ip");
            assert!(t.admit(addr).is_ok());
        }
        assert!(matches!(
            t.admit(ip("192.0.2.200")),
            Err(Refusal::RateLimited {
                scope: "tunnel",
                ..
            })
        ));
    }

    #[test]
    fn requests_persist_privately_and_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("policies.json");
        let asked = PolicyRequest {
            verify: vec![(Provider::Github, "gh-secret".into())],
            ..PolicyRequest::default()
        };
        Policies::open(PolicyConfig::default(), Some(file.clone()))
            .request(&[name("gh")], &asked)
            .expect("saved");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&file).expect("file").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let reopened = Policies::open(PolicyConfig::default(), Some(file));
        let gh = reopened.tunnel(&name("gh")).expect("kept across restarts");
        assert!(gh.verifies());
        let body = b"{}";
        let hdrs = vec![("x-hub-signature-256".to_owned(), b"sha256=00".to_vec())];
        let req = SignedRequest {
            headers: &hdrs,
            body,
            url: None,
        };
        assert!(matches!(
            gh.verify(&req, 0),
            Err(Refusal::Signature(Verdict::Invalid { .. }))
        ));
        let unsigned: Vec<(String, Vec<u8>)> = Vec::new();
        let req = SignedRequest {
            headers: &unsigned,
            body,
            url: None,
        };
        assert_eq!(
            gh.verify(&req, 0),
            Err(Refusal::Signature(Verdict::Unsigned))
        );
    }

    #[test]
    fn invalid_requests_change_nothing() {
        let p = Policies::none();
        let bad = PolicyRequest {
            allow: vec!["not-an-ip".into()],
            ..PolicyRequest::default()
        };
        assert!(p.request(&[name("x")], &bad).is_err());
        assert!(p.tunnel(&name("x")).is_none());
    }
}
