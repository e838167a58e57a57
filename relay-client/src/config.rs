//! Validated agent configuration.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

use hookrelay_shared::{policy::PolicyRequest, signature::SecretSet, TunnelName, TunnelSettings};

use crate::{export::Redaction, history::Retention, queued::RetryPolicy};

/// Default inspector address: loopback only, the port ngrok users expect.
pub const DEFAULT_INSPECT: &str = "127.0.0.1:4040";

/// Everything the agent needs to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// Relay QUIC address, `HOST:PORT`; the host is also the TLS server name.
    pub relay: String,
    /// Dialled instead of what `relay`'s host resolves to (whose name the
    /// certificate is still checked against): for a relay whose DNS is not
    /// set up, or not from here.
    pub relay_ip: Option<IpAddr>,
    /// Token from `relay-server token create`.
    pub token: Secret,
    /// Tunnel to hold; `None` takes the name stored in the data directory, or
    /// generates one there on first use.
    pub tunnel: Option<TunnelName>,
    /// The local app webhooks go to.
    pub target: Target,
    /// How the relay's certificate is checked.
    pub trust: Trust,
    /// Where the agent keeps its id and tunnel name.
    pub data_dir: PathBuf,
    /// Inspector listener; `None` turns it off.
    pub inspect: Option<SocketAddr>,
    /// Print one line per delivery on stdout.
    pub print_deliveries: bool,
    /// How those lines (and the agent's logs) are written.
    pub log_format: LogFormat,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// Provider secrets for signature verdicts and re-signed replays.
    pub secrets: SecretSet,
    /// Headers whose values exports redact, besides the built-in credentials.
    pub redaction: Redaction,
    /// How much history to keep.
    pub retention: Retention,
    /// Suppress provider retries of events the app already accepted.
    pub dedupe: bool,
    /// Sync or queue, and what the relay does while the agent is offline.
    pub settings: TunnelSettings,
    /// Retries of queued webhooks the app failed.
    pub retry: RetryPolicy,
    /// What the relay is asked to enforce before forwarding or queueing.
    pub policy: PolicyRequest,
    /// Most deliveries the relay may have in flight to this agent at once
    /// (each holds a connection to the app); more wait at the relay.
    pub max_deliveries: u32,
}

/// Default for [`Config::max_deliveries`], lowered at start when the
/// open-files limit has no room for as many connections to the app.
pub const DEFAULT_MAX_DELIVERIES: u32 = 1024;

/// Human-readable lines, or one JSON object per line for log collectors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `12:04:05  POST /github  200  12 ms`, and plain log lines on stderr.
    #[default]
    Text,
    /// One JSON object per line on stdout (exchanges) and stderr (logs).
    Json,
}

/// A secret string whose `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How the agent checks the relay's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// The system's trusted roots (or those in `SSL_CERT_FILE`/`SSL_CERT_DIR`)
    /// and the Mozilla roots built in: a relay with a CA-issued certificate,
    /// e.g. from ACME.
    SystemRoots,
    /// The leaf certificate's SHA-256 must match (self-signed relays).
    Pinned([u8; 32]),
    /// No check at all; for throwaway local testing only.
    InsecureSkipVerify,
}

/// Parses a SHA-256 fingerprint: 64 hex digits, colons and case ignored.
///
/// # Errors
/// A message saying what a fingerprint looks like.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], String> {
    let clean: String = s.chars().filter(|c| *c != ':').collect();
    let mut out = [0u8; 32];
    hex::decode_to_slice(clean.trim(), &mut out).map_err(|_| {
        format!("{s:?} is not a SHA-256 fingerprint (64 hex digits, as printed by relay-server)")
    })?;
    Ok(out)
}

/// The local app: an `http://` base URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `host:port` to connect to.
    pub authority: String,
    /// Path prefix every forwarded path goes below, without a trailing `/`.
    pub base_path: String,
}

impl Target {
    /// The URL of `path` (path and query starting with `/`) on the local app.
    pub fn url(&self, path: &str) -> String {
        ["http://", &self.authority, &self.base_path, path].concat()
    }

    /// What an HTTP/1.1 request for [`url`](Self::url)`(path)` names on its
    /// request line: the base path and `path`, starting with `/`.
    pub fn origin_form(&self, path: &str) -> String {
        let slash = if self.base_path.starts_with('/') || path.starts_with('/') {
            ""
        } else {
            "/"
        };
        [slash, &self.base_path, path].concat()
    }

    /// The target as [`Display`](fmt::Display) writes it: built for every
    /// delivery's record, so without the formatting machinery.
    pub fn text(&self) -> String {
        self.url("")
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority, self.base_path)
    }
}

impl FromStr for Target {
    type Err = String;

    /// `3000`, `localhost:3000`, `http://127.0.0.1:3000/base`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(port) = s.parse::<u16>() {
            if port == 0 {
                return Err("port 0 is not a valid target".into());
            }
            return Ok(Target {
                authority: format!("127.0.0.1:{port}"),
                base_path: String::new(),
            });
        }
        if s.starts_with("https://") {
            return Err(format!("{s:?}: https targets are not supported yet; point the agent at the app's plain http port"));
        }
        let rest = s.strip_prefix("http://").unwrap_or(s);
        if rest.contains("://") {
            return Err(format!("{s:?}: only http:// targets are supported"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let uri: http::uri::Authority = authority
            .parse()
            .map_err(|_| format!("{s:?} is not a port, HOST:PORT or http:// URL"))?;
        if uri.port_u16().is_none() && !s.starts_with("http://") {
            return Err(format!("{s:?} has no port; use e.g. {authority}:3000"));
        }
        if path.contains('?') || path.contains('#') {
            return Err(format!(
                "{s:?}: the target may hold a path but no query or fragment"
            ));
        }
        Ok(Target {
            authority: authority.to_owned(),
            base_path: path.trim_end_matches('/').to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_from_port_host_or_url() {
        let t: Target = "3000".parse().expect("port");
        assert_eq!(t.url("/hook?a=1"), "http://127.0.0.1:3000/hook?a=1");
        let t: Target = "http://127.0.0.1:3000/base/".parse().expect("url");
        assert_eq!(t.url("/hook"), "http://127.0.0.1:3000/base/hook");
        let t: Target = "localhost:8000".parse().expect("host:port");
        assert_eq!(t.to_string(), "http://localhost:8000");
        for t in ["3000", "http://127.0.0.1:3000/base/", "localhost:8000"] {
            let t: Target = t.parse().expect("target");
            assert_eq!(t.text(), t.to_string());
        }
        let t: Target = "http://app.local".parse().expect("url without port");
        assert_eq!(t.authority, "app.local");
        assert!("0".parse::<Target>().is_err());
        assert!("99999".parse::<Target>().is_err());
        assert!("https://x:1".parse::<Target>().is_err());
        assert!("localhost".parse::<Target>().is_err());
        assert!("http://x:1/a?b".parse::<Target>().is_err());
    }

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let hex64 = "ab".repeat(32);
        assert_eq!(parse_fingerprint(&hex64), Ok([0xab; 32]));
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&colons), Ok([0xab; 32]));
        assert!(parse_fingerprint("abc").is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        assert_eq!(format!("{:?}", Secret::new("hkr_x")), "***");
    }
}
