//! Command line and `HOOKRELAY_*` environment variables into a [`Config`].

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use hookrelay_shared::{
    signature::{parse_secret_spec, Provider, SecretSet},
    DeliveryMode, TunnelName, TunnelSettings, WhenOffline,
};

use crate::{
    agent::{default_data_dir, DEFAULT_MAX_BACKOFF},
    commands::parse_time,
    config::{parse_fingerprint, Config, LogFormat, Secret, Target, Trust, DEFAULT_INSPECT},
    export::Format,
    history::{Filter, Retention, DEFAULT_MAX_EXCHANGES},
    queued::{RetryPolicy, DEFAULT_ATTEMPTS},
    replay::ReplayOptions,
};

/// Hookrelay agent: receives webhooks from your relay over QUIC and forwards
/// them to an app on this machine.
#[derive(Debug, Parser)]
#[command(name = "relay-client", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// What to run.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Forward a tunnel's webhooks to a local HTTP app: `relay-client http 3000`
    Http(HttpArgs),
    /// Run a relay, an agent and a sample app on loopback, in one process, to try Hookrelay
    Demo(DemoArgs),
    /// List recorded exchanges, newest first
    History(HistoryArgs),
    /// Show one exchange with its headers and bodies
    Show(ShowArgs),
    /// Send recorded requests again, as they were or edited, optionally re-signed
    Replay(ReplayArgs),
    /// Export an exchange as a curl command, HAR or JSON
    Export(ExportArgs),
    /// Check a webhook's signature offline; exits 0 when valid, 1 when not
    Verify(VerifyArgs),
}

/// `relay-client http TARGET`
#[derive(Debug, Args)]
pub struct HttpArgs {
    /// The local app: a port (3000), HOST:PORT, or an http:// URL with an optional base path
    #[arg(value_name = "TARGET", value_parser = |s: &str| s.parse::<Target>())]
    pub target: Target,

    /// Relay QUIC address, HOST:PORT
    #[arg(
        long,
        env = "HOOKRELAY_RELAY",
        default_value = "127.0.0.1:4443",
        value_name = "HOST:PORT"
    )]
    pub relay: String,

    /// Token from `relay-server token create`
    #[arg(long, env = "HOOKRELAY_TOKEN", hide_env_values = true)]
    pub token: String,

    /// Tunnel name (a DNS label the token grants) [default: one generated once and kept in the data directory]
    #[arg(long, env = "HOOKRELAY_TUNNEL", value_name = "NAME")]
    pub tunnel: Option<TunnelName>,

    /// Trust the relay whose certificate has this SHA-256 fingerprint (printed by relay-server at start)
    #[arg(long, env = "HOOKRELAY_RELAY_CERT_SHA256", value_name = "HEX", value_parser = parse_fingerprint, conflicts_with = "insecure_skip_verify")]
    pub relay_cert_sha256: Option<[u8; 32]>,

    /// Do not check the relay's certificate at all (local experiments only)
    #[arg(long, env = "HOOKRELAY_INSECURE_SKIP_VERIFY")]
    pub insecure_skip_verify: bool,

    /// Do not print a line per delivery
    #[arg(long, short, env = "HOOKRELAY_QUIET")]
    pub quiet: bool,

    /// Say loudly on stderr when the link to the relay has been down this long (and every minute after)
    #[arg(long, env = "HOOKRELAY_DISCONNECT_WARNING", value_name = "DURATION", value_parser = relay_server::config::parse_duration, default_value = "15s")]
    pub disconnect_warning: Duration,

    /// Exit with status 1 once the link to the relay has been down this long, e.g. 2m, so a supervisor restarts the agent or alerts
    #[arg(long, env = "HOOKRELAY_EXIT_ON_DISCONNECT", value_name = "DURATION", value_parser = relay_server::config::parse_duration)]
    pub exit_on_disconnect: Option<Duration>,

    /// Forward provider retries of events the app already accepted (by default they are answered
    /// with the first answer and recorded as duplicates)
    #[arg(long, env = "HOOKRELAY_NO_DEDUPE")]
    pub no_dedupe: bool,

    /// sync: senders get the app's own answer (needed for Slack/Twitch challenges, Twilio).
    /// queue: the relay stores every webhook, answers 202 with its delivery id at once, and the
    /// agent delivers it in order, retrying while the app fails
    #[arg(
        long,
        env = "HOOKRELAY_MODE",
        value_name = "MODE",
        default_value = "sync"
    )]
    pub mode: DeliveryMode,

    /// While this agent is offline, the relay queues webhooks (202, delivered when the agent is
    /// back) or rejects them (503 + Retry-After, the sender retries)
    #[arg(
        long,
        env = "HOOKRELAY_WHEN_OFFLINE",
        value_name = "queue|reject",
        default_value = "queue"
    )]
    pub when_offline: WhenOffline,

    /// Attempts at a queued webhook the app answers with 5xx/429, times out on or breaks, before it
    /// is marked failed (an app that refuses connections is waited for without using attempts)
    #[arg(long, env = "HOOKRELAY_RETRY_ATTEMPTS", value_name = "N", default_value_t = DEFAULT_ATTEMPTS, value_parser = clap::value_parser!(u32).range(1..))]
    pub retry_attempts: u32,

    /// First retry delay of a queued webhook; doubles per attempt, with jitter
    #[arg(long, env = "HOOKRELAY_RETRY_INITIAL", value_name = "DURATION", value_parser = relay_server::config::parse_duration, default_value = "1s")]
    pub retry_initial: Duration,

    /// Longest retry delay (also caps a Retry-After the app sends)
    #[arg(long, env = "HOOKRELAY_RETRY_MAX", value_name = "DURATION", value_parser = relay_server::config::parse_duration, default_value = "5m")]
    pub retry_max: Duration,

    /// Output for people (text) or for log collectors (json: one object per line)
    #[arg(long, env = "HOOKRELAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Provider secret for signature checks and re-signed replays, PROVIDER=SECRET (repeatable;
    /// up to two per provider during rotation). Providers: stripe, github, slack, shopify,
    /// standard_webhooks (svix), twilio, gitlab, twitch, paddle
    #[arg(long = "verify", env = "HOOKRELAY_VERIFY", hide_env_values = true, value_delimiter = ',', value_name = "PROVIDER=SECRET", value_parser = parse_secret_spec_arg)]
    pub verify: Vec<(Provider, String)>,

    /// Most exchanges kept in history (oldest go first)
    #[arg(long, env = "HOOKRELAY_MAX_EXCHANGES", default_value_t = DEFAULT_MAX_EXCHANGES, value_name = "N")]
    pub max_exchanges: u64,

    /// Most bytes of history kept, e.g. 1GiB (oldest go first)
    #[arg(long, env = "HOOKRELAY_MAX_HISTORY_BYTES", value_name = "SIZE", value_parser = relay_server::config::parse_size, default_value = "1GiB")]
    pub max_history_bytes: u64,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// Options every agent command shares.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Directory for the agent's identity and history [default: the platform's data directory]
    #[arg(long, env = "HOOKRELAY_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Inspector address, on loopback (`http` serves it there; the other commands look for a running agent there)
    #[arg(long, env = "HOOKRELAY_INSPECT", value_name = "ADDR", default_value = DEFAULT_INSPECT, value_parser = parse_loopback)]
    pub inspect: SocketAddr,

    /// `http`: do not start the inspector. Other commands: do not look for a running agent; read the store directly
    #[arg(long, env = "HOOKRELAY_NO_INSPECT")]
    pub no_inspect: bool,
}

/// `relay-client demo`
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Public HTTP address of the demo relay
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub http: SocketAddr,

    /// Inspector address
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_INSPECT, value_parser = parse_loopback)]
    pub inspect: SocketAddr,

    /// Do not send the sample webhook at start
    #[arg(long)]
    pub no_sample: bool,
}

impl HttpArgs {
    /// The validated agent configuration.
    pub fn to_config(&self) -> Config {
        let trust = match (self.relay_cert_sha256, self.insecure_skip_verify) {
            (Some(fp), _) => Trust::Pinned(fp),
            (None, true) => Trust::InsecureSkipVerify,
            (None, false) => Trust::SystemRoots,
        };
        Config {
            relay: self.relay.clone(),
            token: Secret::new(self.token.clone()),
            tunnel: self.tunnel.clone(),
            target: self.target.clone(),
            trust,
            data_dir: self
                .common
                .data_dir
                .clone()
                .unwrap_or_else(default_data_dir),
            inspect: (!self.common.no_inspect).then_some(self.common.inspect),
            print_deliveries: !self.quiet,
            dedupe: !self.no_dedupe,
            settings: TunnelSettings {
                mode: self.mode,
                when_offline: self.when_offline,
            },
            retry: RetryPolicy {
                attempts: self.retry_attempts,
                initial: self.retry_initial,
                max: self.retry_max.max(self.retry_initial),
            },
            log_format: self.log_format,
            max_backoff: DEFAULT_MAX_BACKOFF,
            secrets: secret_set(&self.verify),
            retention: Retention {
                max_exchanges: self.max_exchanges.max(1),
                max_bytes: self.max_history_bytes.max(1),
            },
        }
    }
}

/// A loopback socket address: the inspector shows webhook contents and
/// replays requests, so it never listens beyond this machine.
fn parse_loopback(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an address like 127.0.0.1:4040"))?;
    if addr.ip().is_loopback() {
        Ok(addr)
    } else {
        Err(format!(
            "{addr} is not a loopback address; the inspector shows every webhook, keep it on 127.0.0.1 or [::1]"
        ))
    }
}

fn parse_secret_spec_arg(s: &str) -> Result<(Provider, String), String> {
    parse_secret_spec(s).map_err(|e| e.to_string())
}

/// Builds the secret set; extra secrets beyond two per provider were refused
/// at parse time only per value, so the set is built leniently here.
pub fn secret_set(specs: &[(Provider, String)]) -> SecretSet {
    let mut set = SecretSet::new();
    for (provider, secret) in specs {
        if let Err(err) = set.add(*provider, secret.clone()) {
            tracing::warn!(%provider, "ignoring a secret: {err}");
        }
    }
    set
}

/// Filters shared by `history` and bulk `replay`.
#[derive(Debug, Args, Default)]
pub struct FilterArgs {
    /// Only this method
    #[arg(long)]
    pub method: Option<String>,
    /// Only paths containing this text
    #[arg(long)]
    pub path: Option<String>,
    /// Only this status (404), class (4xx) or `failed` (no answer or 5xx)
    #[arg(long)]
    pub status: Option<String>,
    /// Only exchanges whose request or response body contains this text
    #[arg(long, value_name = "TEXT")]
    pub search: Option<String>,
    /// Only exchanges with this header, NAME or 'NAME: VALUE' (value contains)
    #[arg(long)]
    pub header: Option<String>,
    /// Received at or after: 15m, 2h, 7d (ago), 2026-11-28T17:00:00Z, or Unix seconds
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    pub since: Option<u64>,
    /// Received before (same forms as --since)
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    pub until: Option<u64>,
    /// Only this tunnel
    #[arg(long)]
    pub tunnel: Option<String>,
}

impl FilterArgs {
    /// The filter these flags describe.
    pub fn filter(&self) -> Filter {
        Filter {
            method: self.method.clone(),
            path: self.path.clone(),
            status: self.status.clone(),
            q: self.search.clone(),
            header: self.header.clone(),
            since: self.since,
            until: self.until,
            tunnel: self.tunnel.clone(),
        }
    }

    /// Whether any filter is set.
    pub fn is_set(&self) -> bool {
        self.filter() != Filter::default()
    }
}

/// `relay-client history`
#[derive(Debug, Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub filters: FilterArgs,
    /// How many to list
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// List exchanges older than this id (paging)
    #[arg(long, value_name = "ID")]
    pub before: Option<String>,
    /// Print the stable JSON form: {"exchanges": [...], "next_before": ID|null}
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `relay-client show ID`
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Exchange id (from `history`)
    pub id: String,
    /// Print the exchange as JSON, bodies included (base64 and text)
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `relay-client replay ID...`
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Exchanges to replay; without ids, every exchange matching the filters (oldest first)
    pub ids: Vec<String>,
    /// Send to this base URL instead of the local app, e.g. http://127.0.0.1:4000
    #[arg(long, value_name = "URL")]
    pub to: Option<String>,
    /// Replace the method
    #[arg(long = "set-method", value_name = "METHOD")]
    pub set_method: Option<String>,
    /// Replace the path and query
    #[arg(long = "set-path", value_name = "PATH")]
    pub set_path: Option<String>,
    /// Set a header, 'Name: value' (repeatable; replaces every header of that name)
    #[arg(long = "set-header", value_name = "'NAME: VALUE'")]
    pub set_header: Vec<String>,
    /// Remove a header (repeatable)
    #[arg(long = "remove-header", value_name = "NAME")]
    pub remove_header: Vec<String>,
    /// Replace the body with this file's bytes
    #[arg(long, value_name = "FILE")]
    pub body_file: Option<PathBuf>,
    /// Refresh the timestamp and sign again with the provider's secret (Stripe, Slack, GitHub,
    /// Standard Webhooks, Shopify, Twitch, Paddle), so the app's own check accepts the replay
    #[arg(long)]
    pub resign: bool,
    /// Provider secret for --resign when no agent is running, PROVIDER=SECRET (repeatable)
    #[arg(long = "verify", env = "HOOKRELAY_VERIFY", hide_env_values = true, value_delimiter = ',', value_name = "PROVIDER=SECRET", value_parser = parse_secret_spec_arg)]
    pub verify: Vec<(Provider, String)>,
    #[command(flatten)]
    pub filters: FilterArgs,
    /// Print the new exchanges as JSON (one array)
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl ReplayArgs {
    /// The edits as replay options.
    ///
    /// # Errors
    /// When the body file cannot be read.
    pub fn options(&self) -> std::io::Result<ReplayOptions> {
        use base64::Engine as _;
        let body_base64 = match &self.body_file {
            Some(path) => {
                Some(base64::engine::general_purpose::STANDARD.encode(std::fs::read(path)?))
            }
            None => None,
        };
        Ok(ReplayOptions {
            to: self.to.clone(),
            method: self.set_method.clone(),
            path: self.set_path.clone(),
            set_headers: self.set_header.clone(),
            remove_headers: self.remove_header.clone(),
            body: None,
            body_base64,
            resign: self.resign,
        })
    }
}

/// `relay-client export ID --format F`
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Exchange id (from `history`)
    pub id: String,
    /// Output format
    #[arg(long, value_enum)]
    pub format: Format,
    /// Keep credentials (Authorization, X-Gitlab-Token, Cookie…) instead of `[redacted]`
    #[arg(long)]
    pub show_secrets: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `relay-client verify --provider P --secret S --header 'K: V'... --body-file F`
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Provider whose scheme to check [default: detected from the signature header]
    #[arg(long, value_name = "PROVIDER")]
    pub provider: Option<Provider>,
    /// Signing secret (repeat for two during a rotation)
    #[arg(long = "secret", required = true, value_name = "SECRET")]
    pub secrets: Vec<String>,
    /// A request header, as `Name: value` (repeatable)
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// File holding the exact request body bytes (`-` for stdin)
    #[arg(long, value_name = "FILE")]
    pub body_file: PathBuf,
    /// The full URL the sender called (Twilio signs it)
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Check as of this Unix time in seconds [default: now]
    #[arg(long, value_name = "UNIX")]
    pub now: Option<i64>,
    /// Timestamp tolerance in seconds [default: the provider's own]
    #[arg(long, value_name = "SECONDS")]
    pub tolerance: Option<u64>,
    /// Print the verdict as JSON
    #[arg(long)]
    pub json: bool,
}

impl CommonArgs {
    /// The data directory to use.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(default_data_dir)
    }

    /// Where a running agent's inspector would be.
    pub fn inspect(&self) -> Option<SocketAddr> {
        (!self.no_inspect).then_some(self.inspect)
    }
}

/// Reconnect cap used by tests and the demo, where waiting 30 s helps nobody.
pub const FAST_MAX_BACKOFF: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_command_parses_the_documented_contract() {
        let cli = Cli::try_parse_from([
            "relay-client",
            "http",
            "http://127.0.0.1:3000/base",
            "--relay",
            "relay.example.com:4443",
            "--token",
            "hkr_x",
            "--tunnel",
            "Alice-Dev",
            "--relay-cert-sha256",
            &"ab".repeat(32),
            "--data-dir",
            "/tmp/x",
            "--inspect",
            "127.0.0.1:4041",
        ])
        .expect("valid");
        let Command::Http(args) = cli.command else {
            panic!("http command")
        };
        let config = args.to_config();
        assert_eq!(
            config.tunnel.as_ref().map(|t| t.as_str()),
            Some("alice-dev")
        );
        assert_eq!(config.trust, Trust::Pinned([0xab; 32]));
        assert_eq!(
            config.inspect,
            Some("127.0.0.1:4041".parse().expect("addr"))
        );
        assert_eq!(config.target.base_path, "/base");
    }

    #[test]
    fn bad_arguments_are_refused() {
        let base = ["relay-client", "http", "3000", "--token", "t"];
        let with = |extra: &[&str]| {
            let mut v: Vec<&str> = base.to_vec();
            v.extend_from_slice(extra);
            Cli::try_parse_from(v)
        };
        assert!(with(&[]).is_ok());
        assert!(with(&["--tunnel", "bad_name"]).is_err());
        assert!(with(&["--relay-cert-sha256", "xyz"]).is_err());
        assert!(with(&[
            "--relay-cert-sha256",
            &"ab".repeat(32),
            "--insecure-skip-verify"
        ])
        .is_err());
        assert!(
            Cli::try_parse_from(["relay-client", "http", "https://x:1", "--token", "t"]).is_err()
        );
        assert!(
            Cli::try_parse_from(["relay-client", "http", "3000"]).is_err(),
            "token is required"
        );
        let err = with(&["--inspect", "0.0.0.0:4040"])
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("not a loopback address")),
            "{err:?}"
        );
        assert!(with(&["--inspect", "[::1]:4040"]).is_ok());
        assert!(
            Cli::try_parse_from(["relay-client", "history", "--inspect", "10.0.0.1:4040"]).is_err()
        );
    }
}
