//! Command line, `HOOKRELAY_*` environment variables and the TOML config file,
//! merged into a validated [`Config`]. Precedence: flag, then environment
//! variable, then file, then default.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use clap::{Parser, Subcommand};
use hookrelay_shared::{
    policy::{parse_cidr, IpNet, Rate},
    signature::{parse_secret_spec, SecretSet},
    TunnelName, TunnelPattern,
};
use serde::Deserialize;

use crate::{
    config::{
        parse_duration, parse_size, AcmeSettings, Config, TlsSource, DEFAULT_ACME_DIRECTORY,
        DEFAULT_BODY_LIMIT_BYTES, DEFAULT_BODY_TIMEOUT, DEFAULT_HEADER_TIMEOUT,
        DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_IP, DEFAULT_MIN_BODY_RATE,
        DEFAULT_SHUTDOWN_GRACE, DEFAULT_TIMEOUT,
    },
    policy::{LimitStatus, PolicyConfig, TunnelPolicyConfig},
    queue::{self, QueueLimits},
};

/// Hookrelay relay: receives webhooks on a public address and streams them over
/// QUIC to the agent on a developer's machine.
#[derive(Debug, Parser)]
#[command(name = "relay-server", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Directory for tokens, the certificate and state [default: the platform's data directory]
    #[arg(long, global = true, env = "HOOKRELAY_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// TOML file with any of the settings below (flags and env vars override it)
    #[arg(long, global = true, env = "HOOKRELAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Public HTTP ingress for webhooks, or `off` [default: 0.0.0.0:8080; 127.0.0.1:8080 with --dev]
    #[arg(long, env = "HOOKRELAY_HTTP", value_name = "ADDR|off")]
    pub http: Option<Listen>,

    /// Public HTTPS ingress for webhooks, with the relay's certificate, e.g. 0.0.0.0:443 [default: off]
    #[arg(long, env = "HOOKRELAY_HTTPS", value_name = "ADDR")]
    pub https: Option<SocketAddr>,

    /// UDP address agents connect to over QUIC [default: 0.0.0.0:4443; 127.0.0.1:4443 with --dev]
    #[arg(long, env = "HOOKRELAY_QUIC", value_name = "ADDR")]
    pub quic: Option<SocketAddr>,

    /// Admin listener with /healthz and the queue API [default: 127.0.0.1:9090]
    #[arg(long, global = true, env = "HOOKRELAY_ADMIN", value_name = "ADDR")]
    pub admin: Option<SocketAddr>,

    /// Domain whose subdomains name tunnels: NAME.DOMAIN reaches tunnel NAME
    #[arg(long, env = "HOOKRELAY_DOMAIN", value_name = "DOMAIN")]
    pub domain: Option<String>,

    /// Base of public URLs when the relay sits behind a proxy, e.g. https://hooks.example.com
    #[arg(long, env = "HOOKRELAY_PUBLIC_URL", value_name = "URL")]
    pub public_url: Option<String>,

    /// Certificate chain (PEM) for HTTPS and QUIC, e.g. a wildcard for DOMAIN and *.DOMAIN; read again on SIGHUP and when it changes [default: self-signed, generated in the data directory]
    #[arg(long, env = "HOOKRELAY_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) for --tls-cert
    #[arg(long, env = "HOOKRELAY_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// Get the certificate for --domain over ACME (TLS-ALPN-01 on --https, which the CA must reach on port 443), renewed by itself and cached in the data directory; no wildcard: NAME.DOMAIN hosts need --acme-names or a wildcard from --tls-cert
    #[arg(long, env = "HOOKRELAY_ACME", conflicts_with_all = ["tls_cert", "tls_key"])]
    pub acme: bool,

    /// More names for the ACME certificate besides --domain, comma-separated, e.g. alice.relay.example.com
    #[arg(
        long,
        env = "HOOKRELAY_ACME_NAMES",
        value_name = "NAMES",
        value_delimiter = ','
    )]
    pub acme_names: Vec<String>,

    /// Contact address for the ACME account (the CA's expiry notices)
    #[arg(long, env = "HOOKRELAY_ACME_EMAIL", value_name = "EMAIL")]
    pub acme_email: Option<String>,

    /// ACME directory URL [default: Let's Encrypt production, https://acme-v02.api.letsencrypt.org/directory]
    #[arg(long, env = "HOOKRELAY_ACME_DIRECTORY", value_name = "URL")]
    pub acme_directory: Option<String>,

    /// Extra CA certificate (PEM) to trust for the ACME server's own HTTPS, for a private or test CA
    #[arg(long, env = "HOOKRELAY_ACME_CA_ROOT", value_name = "FILE")]
    pub acme_ca_root: Option<PathBuf>,

    /// Largest request body accepted, e.g. 25MiB [default: 25MiB]
    #[arg(long, env = "HOOKRELAY_BODY_LIMIT", value_name = "SIZE", value_parser = parse_size)]
    pub body_limit: Option<u64>,

    /// How long to wait for the local app's response, e.g. 30s [default: 30s]
    #[arg(long, env = "HOOKRELAY_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,

    /// How long a sender may take to send a request's headers, e.g. 10s (then the connection is closed) [default: 10s]
    #[arg(long, env = "HOOKRELAY_HEADER_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub header_timeout: Option<Duration>,

    /// How long a request body may go without a byte arriving, e.g. 30s (then 408) [default: 30s]
    #[arg(long, env = "HOOKRELAY_BODY_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub body_timeout: Option<Duration>,

    /// Slowest average rate of a request body once --body-timeout has passed, per second, e.g. 1KiB; 0 turns it off (then 408) [default: 1KiB]
    #[arg(long, env = "HOOKRELAY_MIN_BODY_RATE", value_name = "SIZE", value_parser = parse_size)]
    pub min_body_rate: Option<u64>,

    /// Most open connections on the HTTP and HTTPS ingress together; more are answered 503 and closed [default: 4096; fewer when the open-files limit has no room for as many]
    #[arg(long, env = "HOOKRELAY_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Most open connections on the HTTP and HTTPS ingress from one IP address; more are answered 503 and closed [default: 256]
    #[arg(long, env = "HOOKRELAY_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    pub max_connections_per_ip: Option<usize>,

    /// Development mode: loopback defaults, and a token for every tunnel created and printed at start
    #[arg(long, env = "HOOKRELAY_DEV")]
    pub dev: bool,

    /// How long shutdown (SIGTERM, Ctrl-C) lets deliveries in flight finish, e.g. 30s [default: 10s]
    #[arg(long, env = "HOOKRELAY_SHUTDOWN_GRACE", value_name = "DURATION", value_parser = parse_duration)]
    pub shutdown_grace: Option<Duration>,

    /// Logs for people (text) or for log collectors (json: one object per line) [default: text]
    #[arg(long, env = "HOOKRELAY_LOG_FORMAT", value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Never queue: every tunnel is sync and answers 503 while its agent is offline
    #[arg(long, env = "HOOKRELAY_NO_QUEUE")]
    pub no_queue: bool,

    /// Most webhooks queued per tunnel [default: 100000]
    #[arg(long, env = "HOOKRELAY_QUEUE_MAX_COUNT", value_name = "N")]
    pub queue_max_count: Option<u64>,

    /// Most bytes queued per tunnel, e.g. 1GiB [default: 1GiB]
    #[arg(long, env = "HOOKRELAY_QUEUE_MAX_BYTES", value_name = "SIZE", value_parser = parse_size)]
    pub queue_max_bytes: Option<u64>,

    /// Oldest queued webhook before the tunnel refuses more, e.g. 7d [default: 7d]
    #[arg(long, env = "HOOKRELAY_QUEUE_MAX_AGE", value_name = "DURATION", value_parser = parse_duration)]
    pub queue_max_age: Option<Duration>,

    /// Proxy or load balancer (CIDR) whose X-Forwarded-For / Forwarded headers name the real sender; repeatable
    #[arg(long = "trusted-proxy", env = "HOOKRELAY_TRUSTED_PROXIES", value_delimiter = ',', value_name = "CIDR", value_parser = parse_cidr)]
    pub trusted_proxies: Vec<IpNet>,

    /// Most requests from one source address over all tunnels, e.g. 50/s or '600/min burst 100' [default: unlimited]
    #[arg(long, env = "HOOKRELAY_RATE_LIMIT_PER_SOURCE", value_name = "RATE", value_parser = parse_rate)]
    pub rate_limit_per_source: Option<Rate>,

    /// Status of rate-limited requests: 429, or 503 for senders that only back off on 5xx [default: 429]
    #[arg(long, env = "HOOKRELAY_RATE_LIMIT_STATUS", value_name = "CODE", value_parser = parse_limit_status)]
    pub rate_limit_status: Option<LimitStatus>,
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    s.parse()
}

fn parse_limit_status(s: &str) -> Result<LimitStatus, String> {
    let code: u16 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a status code (429 or 503)"))?;
    LimitStatus::from_code(code)
}

/// A listener address, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    /// Listen here.
    At(SocketAddr),
    /// No listener.
    Off,
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().eq_ignore_ascii_case("off") {
            return Ok(Listen::Off);
        }
        s.trim()
            .parse()
            .map(Listen::At)
            .map_err(|_| format!("{s:?} is not IP:PORT or off"))
    }
}

impl Listen {
    fn addr(self) -> Option<SocketAddr> {
        match self {
            Listen::At(addr) => Some(addr),
            Listen::Off => None,
        }
    }
}

/// How the relay writes its logs (stderr).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the span fields (session, delivery).
    Json,
}

/// Subcommands; without one, the relay runs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the tokens agents authenticate with
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Inspect or purge the store-and-forward queue (through the running relay's admin listener, or straight from the data directory when it is stopped)
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
}

/// `relay-server token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it (the only time it is shown; only its hash is stored)
    Create {
        /// Unique name for the token, e.g. who it is for
        #[arg(long)]
        name: String,
        /// Tunnel names it may hold: comma-separated globs such as 'alice-*' or '*'
        #[arg(long, value_delimiter = ',', required = true, value_name = "PATTERNS")]
        tunnels: Vec<TunnelPattern>,
    },
    /// List tokens (names and grants; tokens themselves are not stored)
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by name; agents using it are refused from their next connection
    Revoke {
        /// Name given at creation
        name: String,
    },
}

/// `relay-server queue ...`
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Tunnels with queued webhooks: count, bytes, oldest age
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// The webhooks queued for one tunnel, oldest first
    Show {
        /// The tunnel
        #[arg(long, value_name = "NAME")]
        tunnel: TunnelName,
        /// Most entries shown
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Delete every webhook queued for one tunnel (they are lost for good)
    Purge {
        /// The tunnel
        #[arg(long, value_name = "NAME")]
        tunnel: TunnelName,
    },
}

/// Settings read from the TOML file; keys mirror the flags (with `_`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    http: Option<String>,
    https: Option<String>,
    quic: Option<String>,
    admin: Option<String>,
    domain: Option<String>,
    public_url: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    acme: Option<bool>,
    acme_names: Option<Vec<String>>,
    acme_email: Option<String>,
    acme_directory: Option<String>,
    acme_ca_root: Option<PathBuf>,
    body_limit: Option<SizeSetting>,
    timeout: Option<SizeSetting>,
    header_timeout: Option<SizeSetting>,
    body_timeout: Option<SizeSetting>,
    min_body_rate: Option<SizeSetting>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    dev: Option<bool>,
    queue: Option<bool>,
    shutdown_grace: Option<SizeSetting>,
    log_format: Option<LogFormat>,
    queue_max_count: Option<u64>,
    queue_max_bytes: Option<SizeSetting>,
    queue_max_age: Option<SizeSetting>,
    trusted_proxies: Option<Vec<String>>,
    rate_limit_per_source: Option<String>,
    rate_limit_status: Option<u16>,
    tunnels: Option<BTreeMap<String, FileTunnelPolicy>>,
}

/// `[tunnels.NAME]`: what the relay enforces for one tunnel, whatever its
/// agent asks for.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTunnelPolicy {
    /// `"provider=secret"` entries; signatures are then required.
    verify: Option<Vec<String>>,
    /// Allowed source CIDRs or addresses.
    allow: Option<Vec<String>>,
    rate_limit: Option<String>,
    rate_limit_per_source: Option<String>,
}

/// A size or duration in the file: `"25MiB"` / `"30s"`, or a bare number.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeSetting {
    Number(u64),
    Text(String),
}

impl SizeSetting {
    fn text(&self) -> String {
        match self {
            SizeSetting::Number(n) => n.to_string(),
            SizeSetting::Text(s) => s.clone(),
        }
    }
}

/// A setting that is missing or wrong; the message names it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Cli {
    /// The data directory: flag or env, then the config file, then the default.
    ///
    /// # Errors
    /// When the config file cannot be read.
    pub fn resolved_data_dir(&self) -> Result<PathBuf, ConfigError> {
        let file = self.file()?;
        Ok(self
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(default_data_dir))
    }

    fn file(&self) -> Result<FileConfig, ConfigError> {
        match &self.config {
            Some(path) => read_file(path),
            None => Ok(FileConfig::default()),
        }
    }

    /// Merges flags, environment and file into a validated [`Config`].
    ///
    /// # Errors
    /// A [`ConfigError`] naming the setting at fault.
    pub fn to_config(&self) -> Result<Config, ConfigError> {
        let file = self.file()?;
        let source = self
            .config
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let addr = |key: &str, v: &Option<String>| -> Result<Option<SocketAddr>, ConfigError> {
            v.as_deref()
                .map(|s| {
                    s.parse().map_err(|_| {
                        ConfigError(format!(
                            "invalid value {s:?} for `{key}` in {source}: expected IP:PORT"
                        ))
                    })
                })
                .transpose()
        };
        let dev = self.dev || file.dev.unwrap_or(false);
        let (http_default, quic_default): (SocketAddr, SocketAddr) = if dev {
            (([127, 0, 0, 1], 8080).into(), ([127, 0, 0, 1], 4443).into())
        } else {
            (([0, 0, 0, 0], 8080).into(), ([0, 0, 0, 0], 4443).into())
        };
        let http = match (self.http, &file.http) {
            (Some(listen), _) => listen.addr(),
            (None, Some(s)) => s
                .parse::<Listen>()
                .map_err(|_| {
                    ConfigError(format!(
                        "invalid value {s:?} for `http` in {source}: expected IP:PORT or \"off\""
                    ))
                })?
                .addr(),
            (None, None) => Some(http_default),
        };
        let https = self.https.or(addr("https", &file.https)?);
        if http.is_none() && https.is_none() {
            return Err(ConfigError(
                "`http` is off and `https` is not set: the relay would take no webhooks".into(),
            ));
        }
        let quic = self
            .quic
            .or(addr("quic", &file.quic)?)
            .unwrap_or(quic_default);
        let admin = self
            .admin
            .or(addr("admin", &file.admin)?)
            .unwrap_or(([127, 0, 0, 1], 9090).into());
        let body_limit_bytes = match (self.body_limit, &file.body_limit) {
            (Some(n), _) => n,
            (None, Some(s)) => parse_size(&s.text()).map_err(|e| {
                ConfigError(format!("invalid value for `body_limit` in {source}: {e}"))
            })?,
            (None, None) => DEFAULT_BODY_LIMIT_BYTES,
        };
        if body_limit_bytes == 0 {
            return Err(ConfigError("`body_limit` must be larger than zero".into()));
        }
        let timeout = match (self.timeout, &file.timeout) {
            (Some(d), _) => d,
            (None, Some(s)) => parse_duration(&s.text()).map_err(|e| {
                ConfigError(format!("invalid value for `timeout` in {source}: {e}"))
            })?,
            (None, None) => DEFAULT_TIMEOUT,
        };
        let duration =
            |key: &str, flag: Option<Duration>, file: &Option<SizeSetting>, default| match (
                flag, file,
            ) {
                (Some(d), _) => Ok(d),
                (None, Some(s)) => parse_duration(&s.text()).map_err(|e| {
                    ConfigError(format!("invalid value for `{key}` in {source}: {e}"))
                }),
                (None, None) => Ok(default),
            };
        let header_timeout = duration(
            "header_timeout",
            self.header_timeout,
            &file.header_timeout,
            DEFAULT_HEADER_TIMEOUT,
        )?;
        let body_timeout = duration(
            "body_timeout",
            self.body_timeout,
            &file.body_timeout,
            DEFAULT_BODY_TIMEOUT,
        )?;
        let min_body_rate = match (self.min_body_rate, &file.min_body_rate) {
            (Some(n), _) => n,
            (None, Some(s)) => parse_size(&s.text()).map_err(|e| {
                ConfigError(format!(
                    "invalid value for `min_body_rate` in {source}: {e}"
                ))
            })?,
            (None, None) => DEFAULT_MIN_BODY_RATE,
        };
        let max_connections = self
            .max_connections
            .or(file.max_connections)
            .unwrap_or(DEFAULT_MAX_CONNECTIONS);
        let max_connections_per_ip = self
            .max_connections_per_ip
            .or(file.max_connections_per_ip)
            .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_IP);
        if max_connections == 0 || max_connections_per_ip == 0 {
            return Err(ConfigError(
                "`max_connections` and `max_connections_per_ip` must be larger than zero".into(),
            ));
        }
        let queue_limits = QueueLimits {
            max_count: self
                .queue_max_count
                .or(file.queue_max_count)
                .unwrap_or(queue::DEFAULT_MAX_COUNT),
            max_bytes: match (self.queue_max_bytes, &file.queue_max_bytes) {
                (Some(n), _) => n,
                (None, Some(s)) => parse_size(&s.text()).map_err(|e| {
                    ConfigError(format!(
                        "invalid value for `queue_max_bytes` in {source}: {e}"
                    ))
                })?,
                (None, None) => queue::DEFAULT_MAX_BYTES,
            },
            max_age: match (self.queue_max_age, &file.queue_max_age) {
                (Some(d), _) => d,
                (None, Some(s)) => parse_duration(&s.text()).map_err(|e| {
                    ConfigError(format!(
                        "invalid value for `queue_max_age` in {source}: {e}"
                    ))
                })?,
                (None, None) => queue::DEFAULT_MAX_AGE,
            },
        };
        if queue_limits.max_count == 0 || queue_limits.max_bytes == 0 {
            return Err(ConfigError(
                "`queue_max_count` and `queue_max_bytes` must be larger than zero (use --no-queue to turn queueing off)"
                    .into(),
            ));
        }
        let queue_enabled = !self.no_queue && file.queue.unwrap_or(true);
        let shutdown_grace = match (self.shutdown_grace, &file.shutdown_grace) {
            (Some(d), _) => d,
            (None, Some(s)) => parse_duration(&s.text()).map_err(|e| {
                ConfigError(format!(
                    "invalid value for `shutdown_grace` in {source}: {e}"
                ))
            })?,
            (None, None) => DEFAULT_SHUTDOWN_GRACE,
        };
        let log_format = self.log_format.or(file.log_format).unwrap_or_default();
        let policy = self.policy_config(&file, &source)?;
        let domain = self
            .domain
            .clone()
            .or(file.domain)
            .map(|d| d.trim_end_matches('.').to_ascii_lowercase());
        if let Some(d) = &domain {
            if !is_dns_name(d) {
                return Err(ConfigError(format!(
                    "invalid value {d:?} for `domain`: expected a DNS name like relay.example.com"
                )));
            }
        }
        let public_url = self.public_url.clone().or(file.public_url);
        if let Some(u) = &public_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(ConfigError(format!(
                    "invalid value {u:?} for `public_url`: expected http://… or https://…"
                )));
            }
        }
        let cert = self.tls_cert.clone().or(file.tls_cert);
        let key = self.tls_key.clone().or(file.tls_key);
        let acme = self.acme || file.acme.unwrap_or(false);
        let tls = if acme {
            if cert.is_some() || key.is_some() {
                return Err(ConfigError(
                    "`acme` and `tls_cert`/`tls_key` are two sources for one certificate: set only one".into(),
                ));
            }
            let Some(domain) = &domain else {
                return Err(ConfigError(
                    "`acme` needs `domain`: the certificate is issued for it".into(),
                ));
            };
            if https.is_none() {
                return Err(ConfigError(
                    "`acme` needs `https`: the CA's TLS-ALPN-01 challenge is answered there (the CA connects to port 443)".into(),
                ));
            }
            let extra = if self.acme_names.is_empty() {
                file.acme_names.clone().unwrap_or_default()
            } else {
                self.acme_names.clone()
            };
            let mut names = vec![domain.clone()];
            for name in extra {
                let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
                if name.starts_with("*.") {
                    return Err(ConfigError(format!(
                        "invalid value {name:?} for `acme_names`: ACME's TLS-ALPN-01 challenge cannot issue wildcard certificates; get one over DNS-01 (e.g. certbot) and pass it with `tls_cert`/`tls_key`"
                    )));
                }
                if !is_dns_name(&name) {
                    return Err(ConfigError(format!(
                        "invalid value {name:?} for `acme_names`: expected DNS names like alice.relay.example.com"
                    )));
                }
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            let email = self.acme_email.clone().or(file.acme_email.clone());
            if let Some(e) = &email {
                if !e.contains('@') || e.contains(char::is_whitespace) || e.starts_with("mailto:") {
                    return Err(ConfigError(format!(
                        "invalid value {e:?} for `acme_email`: expected an address like ops@example.com"
                    )));
                }
            }
            let directory = self
                .acme_directory
                .clone()
                .or(file.acme_directory.clone())
                .unwrap_or_else(|| DEFAULT_ACME_DIRECTORY.to_owned());
            if !directory.starts_with("https://") {
                return Err(ConfigError(format!(
                    "invalid value {directory:?} for `acme_directory`: expected an https:// URL"
                )));
            }
            TlsSource::Acme(AcmeSettings {
                names,
                email,
                directory,
                ca_root: self.acme_ca_root.clone().or(file.acme_ca_root.clone()),
            })
        } else {
            let stray = [
                (
                    "acme_names",
                    !self.acme_names.is_empty() || file.acme_names.is_some(),
                ),
                (
                    "acme_email",
                    self.acme_email.is_some() || file.acme_email.is_some(),
                ),
                (
                    "acme_directory",
                    self.acme_directory.is_some() || file.acme_directory.is_some(),
                ),
                (
                    "acme_ca_root",
                    self.acme_ca_root.is_some() || file.acme_ca_root.is_some(),
                ),
            ];
            if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
                return Err(ConfigError(format!("`{key}` is set but `acme` is not")));
            }
            match (cert, key) {
                (Some(cert), Some(key)) => TlsSource::Files { cert, key },
                (None, None) => TlsSource::SelfSigned,
                (Some(_), None) => {
                    return Err(ConfigError("`tls_cert` is set but `tls_key` is not".into()))
                }
                (None, Some(_)) => {
                    return Err(ConfigError("`tls_key` is set but `tls_cert` is not".into()))
                }
            }
        };
        Ok(Config {
            data_dir: self
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(default_data_dir),
            http,
            https,
            quic,
            admin,
            domain,
            public_url,
            tls,
            body_limit_bytes,
            timeout,
            header_timeout,
            body_timeout,
            min_body_rate,
            max_connections,
            max_connections_per_ip,
            dev,
            queue_enabled,
            queue_limits,
            shutdown_grace,
            log_format,
            policy,
        })
    }

    /// Trusted proxies, rate limits and `[tunnels.NAME]` policies.
    fn policy_config(&self, file: &FileConfig, source: &str) -> Result<PolicyConfig, ConfigError> {
        let trusted_proxies = if self.trusted_proxies.is_empty() {
            file.trusted_proxies
                .iter()
                .flatten()
                .map(|s| {
                    parse_cidr(s).map_err(|e| {
                        ConfigError(format!(
                            "invalid entry in `trusted_proxies` in {source}: {e}"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        } else {
            self.trusted_proxies.clone()
        };
        let rate = |what: &str, text: &Option<String>| -> Result<Option<Rate>, ConfigError> {
            text.as_deref()
                .map(|t| {
                    t.parse::<Rate>()
                        .map_err(|e| ConfigError(format!("invalid value for {what}: {e}")))
                })
                .transpose()
        };
        let rate_limit_per_source = match self.rate_limit_per_source {
            Some(r) => Some(r),
            None => rate(
                &format!("`rate_limit_per_source` in {source}"),
                &file.rate_limit_per_source,
            )?,
        };
        let limit_status = match (self.rate_limit_status, file.rate_limit_status) {
            (Some(s), _) => s,
            (None, Some(code)) => LimitStatus::from_code(code)
                .map_err(|e| ConfigError(format!("invalid value in {source}: {e}")))?,
            (None, None) => LimitStatus::default(),
        };
        let mut tunnels = BTreeMap::new();
        for (name, t) in file.tunnels.iter().flatten() {
            let tunnel: TunnelName = name.parse().map_err(|e| {
                ConfigError(format!(
                    "invalid tunnel name [tunnels.{name}] in {source}: {e}"
                ))
            })?;
            let at = |key: &str| format!("`{key}` of [tunnels.{name}] in {source}");
            let verify = match &t.verify {
                None => None,
                Some(specs) => {
                    let mut set = SecretSet::new();
                    for spec in specs {
                        let (provider, secret) = parse_secret_spec(spec).map_err(|e| {
                            ConfigError(format!("invalid entry in {}: {e}", at("verify")))
                        })?;
                        set.add(provider, secret).map_err(|e| {
                            ConfigError(format!("invalid entry in {}: {e}", at("verify")))
                        })?;
                    }
                    if set.is_empty() {
                        return Err(ConfigError(format!(
                            "{} is empty: list provider=secret entries, or leave it out",
                            at("verify")
                        )));
                    }
                    Some(set)
                }
            };
            let allow = t
                .allow
                .as_ref()
                .map(|list| {
                    list.iter()
                        .map(|s| {
                            parse_cidr(s).map_err(|e| {
                                ConfigError(format!("invalid entry in {}: {e}", at("allow")))
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?;
            tunnels.insert(
                tunnel,
                TunnelPolicyConfig {
                    verify,
                    allow,
                    rate_limit: rate(&at("rate_limit"), &t.rate_limit)?,
                    rate_limit_per_source: rate(
                        &at("rate_limit_per_source"),
                        &t.rate_limit_per_source,
                    )?,
                },
            );
        }
        Ok(PolicyConfig {
            trusted_proxies,
            rate_limit_per_source,
            limit_status,
            tunnels,
        })
    }
}

/// A DNS name like `relay.example.com`: labels of letters, digits and `-`.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
    toml::from_str(&text)
        .map_err(|e| ConfigError(format!("invalid config file {}: {e}", path.display())))
}

/// `~/.local/share/hookrelay/relay` on Linux, the platform's equivalent elsewhere.
pub fn default_data_dir() -> PathBuf {
    directories::ProjectDirs::from("", "", "hookrelay")
        .map(|d| d.data_dir().join("relay"))
        .unwrap_or_else(|| PathBuf::from("hookrelay-relay"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut argv = vec!["relay-server"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect("valid arguments")
    }

    #[test]
    fn flags_override_file_and_file_overrides_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("relay.toml");
        std::fs::write(
            &file,
            "http = \"127.0.0.1:7000\"\nquic = \"127.0.0.1:7001\"\nbody_limit = \"1MiB\"\ntimeout = 5\ndomain = \"Relay.Example.com.\"\n",
        )
        .expect("write");
        let config = cli(&[
            "--config",
            file.to_str().expect("utf-8"),
            "--quic",
            "127.0.0.1:9999",
        ])
        .to_config()
        .expect("valid config");
        assert_eq!(config.http, Some("127.0.0.1:7000".parse().expect("addr")));
        assert_eq!(config.https, None);
        assert_eq!(config.quic, "127.0.0.1:9999".parse().expect("addr"));
        assert_eq!(config.body_limit_bytes, 1 << 20);
        assert_eq!(config.timeout, Duration::from_secs(5));
        assert_eq!(config.domain.as_deref(), Some("relay.example.com"));
        assert_eq!(config.tls, TlsSource::SelfSigned);
    }

    #[test]
    fn bad_settings_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("relay.toml");
        for (content, needle) in [
            ("http = \"nowhere\"", "`http`"),
            ("body_limit = \"lots\"", "`body_limit`"),
            ("timeout = \"soon\"", "`timeout`"),
            ("htp = \"127.0.0.1:1\"", "htp"),
            ("tls_cert = \"/x.pem\"", "tls_key"),
            ("domain = \"bad domain\"", "`domain`"),
            ("queue_max_age = \"forever\"", "`queue_max_age`"),
            ("queue_max_count = 0", "`queue_max_count`"),
            ("shutdown_grace = \"later\"", "`shutdown_grace`"),
            ("log_format = \"xml\"", "log_format"),
            ("header_timeout = \"0s\"", "`header_timeout`"),
            ("body_timeout = \"slow\"", "`body_timeout`"),
            ("min_body_rate = \"fast\"", "`min_body_rate`"),
            ("max_connections = 0", "`max_connections`"),
            ("max_connections_per_ip = 0", "`max_connections_per_ip`"),
            ("trusted_proxies = [\"10.0.0.0/33\"]", "`trusted_proxies`"),
            (
                "rate_limit_per_source = \"fast\"",
                "`rate_limit_per_source`",
            ),
            ("rate_limit_status = 418", "429 or 503"),
            ("[tunnels.Bad_Name]\nallow = []", "[tunnels.Bad_Name]"),
            (
                "[tunnels.shop]\nallow = [\"nope\"]",
                "`allow` of [tunnels.shop]",
            ),
            (
                "[tunnels.shop]\nrate_limit = \"1/fortnight\"",
                "`rate_limit` of [tunnels.shop]",
            ),
            (
                "[tunnels.shop]\nverify = [\"stripe\"]",
                "`verify` of [tunnels.shop]",
            ),
            ("[tunnels.shop]\nverify = []", "`verify` of [tunnels.shop]"),
            ("[tunnels.shop]\nverify = [\"acme=x\"]", "unknown provider"),
            ("[tunnels.shop]\nallowed = []", "allowed"),
        ] {
            std::fs::write(&file, content).expect("write");
            let err = cli(&["--config", file.to_str().expect("utf-8")])
                .to_config()
                .expect_err(content);
            assert!(err.to_string().contains(needle), "{content}: {err}");
        }
        assert!(Cli::try_parse_from(["relay-server", "--http", "nope"]).is_err());
        assert!(Cli::try_parse_from(["relay-server", "--body-limit", "12 bananas"]).is_err());
    }

    #[test]
    fn tunnel_policies_come_from_the_file_and_secrets_stay_out_of_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("relay.toml");
        std::fs::write(
            &file,
            r#"
trusted_proxies = ["10.0.0.0/8", "fd00::/8"]
rate_limit_per_source = "50/s burst 100"
rate_limit_status = 503

[tunnels.stripe-prod]
verify = ["stripe=whsec_top_secret", "stripe=whsec_previous"]
allow = ["3.18.12.63", "2600:1f18::/32"]
rate_limit = "100/s"
"#,
        )
        .expect("write");
        let config = cli(&["--config", file.to_str().expect("utf-8")])
            .to_config()
            .expect("valid config");
        let p = &config.policy;
        assert_eq!(p.trusted_proxies.len(), 2);
        assert_eq!(
            p.rate_limit_per_source.map(|r| r.to_string()).as_deref(),
            Some("50/s burst 100")
        );
        assert_eq!(p.limit_status, LimitStatus::ServiceUnavailable);
        let t = &p.tunnels[&"stripe-prod".parse::<TunnelName>().expect("name")];
        assert_eq!(
            t.verify
                .as_ref()
                .map(|s| s.get(hookrelay_shared::signature::Provider::Stripe).len()),
            Some(2)
        );
        assert_eq!(t.allow.as_ref().map(Vec::len), Some(2));
        assert!(!format!("{config:?}").contains("whsec_top_secret"));
        // Flags win over the file.
        let config = cli(&[
            "--config",
            file.to_str().expect("utf-8"),
            "--trusted-proxy",
            "192.0.2.1",
            "--rate-limit-status",
            "429",
        ])
        .to_config()
        .expect("valid config");
        assert_eq!(config.policy.trusted_proxies.len(), 1);
        assert_eq!(config.policy.limit_status, LimitStatus::TooManyRequests);
        // A bad secret spec is named without repeating it.
        std::fs::write(&file, "[tunnels.x]\nverify = [\"stripe=\"]\n").expect("write");
        let err = cli(&["--config", file.to_str().expect("utf-8")])
            .to_config()
            .expect_err("empty secret");
        assert!(err.to_string().contains("empty secret"), "{err}");
        assert!(Cli::try_parse_from(["relay-server", "--rate-limit-status", "200"]).is_err());
        assert!(Cli::try_parse_from(["relay-server", "--trusted-proxy", "proxy.local"]).is_err());
    }

    #[test]
    fn edge_limits_have_defaults_and_come_from_flags_env_or_file() {
        let config = cli(&[]).to_config().expect("valid");
        assert_eq!(config.header_timeout, DEFAULT_HEADER_TIMEOUT);
        assert_eq!(config.body_timeout, DEFAULT_BODY_TIMEOUT);
        assert_eq!(config.max_connections, 4096);
        assert_eq!(config.max_connections_per_ip, 256);

        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("relay.toml");
        std::fs::write(
            &file,
            "header_timeout = \"5s\"\nbody_timeout = 20\nmax_connections = 100\nmax_connections_per_ip = 10\n",
        )
        .expect("write");
        let config = cli(&[
            "--config",
            file.to_str().expect("utf-8"),
            "--body-timeout",
            "1500ms",
            "--max-connections-per-ip",
            "7",
        ])
        .to_config()
        .expect("valid config");
        assert_eq!(config.header_timeout, Duration::from_secs(5));
        assert_eq!(config.body_timeout, Duration::from_millis(1500));
        assert_eq!(config.max_connections, 100);
        assert_eq!(config.max_connections_per_ip, 7);
        assert!(Cli::try_parse_from(["relay-server", "--max-connections", "many"]).is_err());
        assert!(Cli::try_parse_from(["relay-server", "--header-timeout", "0s"]).is_err());
    }

    #[test]
    fn https_and_acme_settings_are_checked() {
        let config = cli(&["--http", "off", "--https", "127.0.0.1:8443"])
            .to_config()
            .expect("https only");
        assert_eq!(config.http, None);
        assert_eq!(config.https, Some("127.0.0.1:8443".parse().expect("addr")));
        let err = cli(&["--http", "off"]).to_config().expect_err("no ingress");
        assert!(err.to_string().contains("`https`"), "{err}");
        assert!(Cli::try_parse_from(["relay-server", "--http", "of"]).is_err());

        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("relay.toml");
        std::fs::write(
            &file,
            "domain = \"relay.example.com\"\nhttps = \"0.0.0.0:443\"\nhttp = \"off\"\nacme = true\nacme_names = [\"Alice.relay.example.com\"]\nacme_email = \"ops@example.com\"\n",
        )
        .expect("write");
        let path = file.to_str().expect("utf-8");
        let config = cli(&["--config", path]).to_config().expect("valid acme");
        assert_eq!(config.http, None);
        assert_eq!(
            config.tls,
            TlsSource::Acme(AcmeSettings {
                names: vec!["relay.example.com".into(), "alice.relay.example.com".into()],
                email: Some("ops@example.com".into()),
                directory: DEFAULT_ACME_DIRECTORY.into(),
                ca_root: None,
            })
        );
        let config = cli(&[
            "--config",
            path,
            "--acme-directory",
            "https://127.0.0.1:14000/dir",
            "--acme-ca-root",
            "/tmp/pebble.pem",
        ])
        .to_config()
        .expect("valid acme");
        let TlsSource::Acme(acme) = config.tls else {
            panic!("acme")
        };
        assert_eq!(acme.directory, "https://127.0.0.1:14000/dir");
        assert_eq!(acme.ca_root, Some(PathBuf::from("/tmp/pebble.pem")));
        assert!(
            Cli::try_parse_from(["relay-server", "--acme", "--tls-cert", "/c.pem"]).is_err(),
            "two certificate sources"
        );

        for (content, needle) in [
            ("acme = true\nhttps = \"0.0.0.0:443\"", "needs `domain`"),
            ("acme = true\ndomain = \"r.example.com\"", "needs `https`"),
            (
                "acme = true\ndomain = \"r.example.com\"\nhttps = \"0.0.0.0:443\"\nacme_names = [\"*.r.example.com\"]",
                "wildcard",
            ),
            (
                "acme = true\ndomain = \"r.example.com\"\nhttps = \"0.0.0.0:443\"\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"",
                "only one",
            ),
            (
                "acme = true\ndomain = \"r.example.com\"\nhttps = \"0.0.0.0:443\"\nacme_directory = \"http://ca\"",
                "`acme_directory`",
            ),
            (
                "acme = true\ndomain = \"r.example.com\"\nhttps = \"0.0.0.0:443\"\nacme_email = \"nobody\"",
                "`acme_email`",
            ),
            ("acme_email = \"ops@example.com\"", "`acme` is not"),
            ("https = \"everywhere\"", "`https`"),
            ("http = \"of\"", "`http`"),
        ] {
            std::fs::write(&file, content).expect("write");
            let err = cli(&["--config", path]).to_config().expect_err(content);
            assert!(err.to_string().contains(needle), "{content}: {err}");
        }
    }

    #[test]
    fn dev_mode_binds_loopback() {
        let config = cli(&["--dev"]).to_config().expect("valid");
        assert!(
            config.http.is_some_and(|a| a.ip().is_loopback()) && config.quic.ip().is_loopback()
        );
        let config = cli(&[]).to_config().expect("valid");
        assert!(config.http.is_some_and(|a| a.ip().is_unspecified()));
    }
}
