//! Validated relay configuration, and the human-friendly size and duration
//! formats that flags, environment variables and the TOML file share.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{cli::LogFormat, policy::PolicyConfig, queue::QueueLimits};

/// Default cap on a request body: 25 MiB, enough for any provider's webhook
/// (GitHub caps payloads at 25 MB) and small enough to refuse abuse early.
pub const DEFAULT_BODY_LIMIT_BYTES: u64 = 25 * 1024 * 1024;

/// Default time the relay waits for the local app's response head. Most senders
/// give up after 10–30 s; matching the longest keeps slow handlers working.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// `Retry-After` sent with 503 while a tunnel's agent is offline: short enough
/// that a sender honouring it comes back soon after a laptop wakes.
pub const OFFLINE_RETRY_AFTER: Duration = Duration::from_secs(10);

/// Default time shutdown lets deliveries in flight finish.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Default time a sender has to send a complete request head (and, on a
/// kept-alive connection, the next one). Real senders need milliseconds.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Default time a request body may go without a single byte arriving.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Default slowest average rate of a request body once the body timeout has
/// passed: 1 KiB/s. Webhook senders are servers; only a trickle falls below.
pub const DEFAULT_MIN_BODY_RATE: u64 = 1024;

/// Default cap on open ingress connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// Default cap on open ingress connections from one IP address.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 256;

/// Default ACME directory: Let's Encrypt's production CA, whose certificates
/// every webhook sender and agent trusts.
pub const DEFAULT_ACME_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// Everything the relay needs to run, validated.
#[derive(Clone, Debug)]
pub struct Config {
    /// Directory for tokens, the self-signed certificate and known tunnels.
    pub data_dir: PathBuf,
    /// Public HTTP ingress for webhooks; `None` serves HTTPS only.
    pub http: Option<SocketAddr>,
    /// Public HTTPS ingress for webhooks, with the relay's certificate.
    pub https: Option<SocketAddr>,
    /// UDP address of the QUIC endpoint agents connect to.
    pub quic: SocketAddr,
    /// Admin listener (`/healthz`); keep it on loopback or behind a firewall.
    pub admin: SocketAddr,
    /// Domain whose subdomains name tunnels (`NAME.DOMAIN`).
    pub domain: Option<String>,
    /// Base of path-style public URLs, e.g. `https://relay.example.com`; derived
    /// from `domain` or the bound address when absent.
    pub public_url: Option<String>,
    /// Where the certificate for HTTPS and QUIC comes from.
    pub tls: TlsSource,
    /// Largest request body accepted, in bytes.
    pub body_limit_bytes: u64,
    /// How long to wait for the local app's response head.
    pub timeout: Duration,
    /// How long a sender may take to send a request head.
    pub header_timeout: Duration,
    /// How long a request body may go without a byte arriving.
    pub body_timeout: Duration,
    /// Slowest average rate of a request body, in bytes per second, once
    /// `body_timeout` has passed; 0 turns the check off.
    pub min_body_rate: u64,
    /// Most open ingress connections.
    pub max_connections: usize,
    /// Most open ingress connections from one IP address.
    pub max_connections_per_ip: usize,
    /// Create and print a token granting every tunnel at start.
    pub dev: bool,
    /// Whether tunnels may queue (store-and-forward); without it every tunnel
    /// is sync and rejects while its agent is offline.
    pub queue_enabled: bool,
    /// Per-tunnel bounds of the queue.
    pub queue_limits: QueueLimits,
    /// How long shutdown lets deliveries in flight finish.
    pub shutdown_grace: Duration,
    /// How logs are written (read by the binary when it sets up logging).
    pub log_format: LogFormat,
    /// Trusted proxies, rate limits and per-tunnel policies.
    pub policy: PolicyConfig,
}

/// Source of the relay's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsSource {
    /// Generated on first start and kept in the data directory; agents pin its
    /// SHA-256 fingerprint.
    SelfSigned,
    /// PEM files: a certificate chain and its private key, read again when
    /// they change on disk (a renewal) or on SIGHUP.
    Files {
        /// Certificate chain, leaf first.
        cert: PathBuf,
        /// Private key (PKCS#8, PKCS#1 or SEC1).
        key: PathBuf,
    },
    /// Obtained and renewed over ACME (TLS-ALPN-01, answered on the HTTPS
    /// listener), cached in the data directory's `acme/`.
    Acme(AcmeSettings),
}

/// What the relay asks an ACME CA for, and how it reaches the CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcmeSettings {
    /// Names on the certificate: the relay's domain first, then any listed
    /// tunnel hosts. TLS-ALPN-01 cannot prove wildcards, so none is here.
    pub names: Vec<String>,
    /// Contact address the CA may write to about the account (expiry notices).
    pub email: Option<String>,
    /// The CA's directory URL.
    pub directory: String,
    /// Extra root (PEM) to trust for the CA's own HTTPS API, for a private or
    /// test CA; public roots are always trusted.
    pub ca_root: Option<PathBuf>,
}

impl Config {
    /// Every listener on `127.0.0.1:0`, defaults elsewhere: what tests and the
    /// demo use.
    pub fn loopback(data_dir: impl Into<PathBuf>) -> Self {
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        Config {
            data_dir: data_dir.into(),
            http: Some(any),
            https: None,
            quic: any,
            admin: any,
            domain: None,
            public_url: None,
            tls: TlsSource::SelfSigned,
            body_limit_bytes: DEFAULT_BODY_LIMIT_BYTES,
            timeout: DEFAULT_TIMEOUT,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            min_body_rate: DEFAULT_MIN_BODY_RATE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            dev: false,
            queue_enabled: true,
            queue_limits: QueueLimits::default(),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            log_format: LogFormat::Text,
            policy: PolicyConfig::default(),
        }
    }
}

/// Parses `25MiB`, `512KiB`, `1GiB`, `10MB` or a plain byte count.
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (use e.g. 25MiB, 512KiB or a byte count)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1000 * 1000,
        "mib" => 1 << 20,
        "g" | "gb" => 1000 * 1000 * 1000,
        "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "{s:?} has an unknown unit (use B, KiB, MiB, GiB, KB, MB or GB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses `30s`, `500ms`, `2m`, `1h`, `7d` or a plain number of seconds.
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (use e.g. 30s, 500ms, 2m)"))?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" | "min" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86_400)),
        _ => return Err(format!("{s:?} has an unknown unit (use ms, s, m, h or d)")),
    };
    if d.is_zero() {
        return Err(format!("{s:?} must be longer than zero"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse_with_units() {
        assert_eq!(parse_size("25MiB"), Ok(25 * 1024 * 1024));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("2 KB"), Ok(2000));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
