//! Command line, `HOOKRELAY_*` environment variables and the `--config` TOML
//! file into a [`Config`]. Precedence, as for the relay: flag, then environment
//! variable, then file, then default.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{parser::ValueSource, ArgMatches, Args, FromArgMatches, Parser, Subcommand};
use hookrelay_shared::{
    policy::{parse_cidr, PolicyRequest, Rate},
    signature::{parse_secret_spec, Provider, SecretSet},
    DeliveryMode, TunnelName, TunnelSettings, WhenOffline,
};

use crate::{
    agent::{default_data_dir, DEFAULT_MAX_BACKOFF},
    commands::parse_time,
    config::{
        parse_fingerprint, Config, LogFormat, Secret, Target, Trust, DEFAULT_INSPECT,
        DEFAULT_MAX_DELIVERIES,
    },
    export::{parse_header_name, Format, Redaction},
    history::{Filter, Retention, DEFAULT_MAX_EXCHANGES},
    queued::{RetryPolicy, DEFAULT_ATTEMPTS},
    replay::ReplayOptions,
};
use serde::Deserialize;

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

/// `relay-client http TARGET`: the flags as clap parsed them, plus which ones
/// were actually given (on the command line or in the environment), so that a
/// `--config` file can fill in the rest without clap's defaults hiding it.
#[derive(Debug)]
pub struct HttpArgs {
    /// The flags, with clap's defaults filled in.
    pub flags: HttpFlags,
    /// Ids of the settings given as a flag or an env var.
    given: BTreeSet<String>,
}

/// The flags of `relay-client http`.
#[derive(Debug, Args)]
pub struct HttpFlags {
    /// The local app: a port (3000), HOST:PORT, or an http:// URL with an optional base path
    /// (or `target` in the --config file)
    #[arg(value_name = "TARGET", value_parser = |s: &str| s.parse::<Target>())]
    pub target: Option<Target>,

    /// TOML file with any of these settings, keys as the flags with `_` (flags and env vars override it)
    #[arg(long, env = "HOOKRELAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Relay QUIC address, HOST:PORT
    #[arg(
        long,
        env = "HOOKRELAY_RELAY",
        default_value = "127.0.0.1:4443",
        value_name = "HOST:PORT"
    )]
    pub relay: String,

    /// Connect to this IP instead of what --relay's host resolves to; the certificate is still checked against that host (for a relay whose DNS is not set up yet)
    #[arg(long, env = "HOOKRELAY_RELAY_IP", value_name = "IP")]
    pub relay_ip: Option<IpAddr>,

    /// Token from `relay-server token create`
    #[arg(long, env = "HOOKRELAY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Tunnel name (a DNS label the token grants) [default: one generated once and kept in the data directory]
    #[arg(long, env = "HOOKRELAY_TUNNEL", value_name = "NAME")]
    pub tunnel: Option<TunnelName>,

    /// Trust the relay whose certificate has this SHA-256 fingerprint (printed by relay-server at start) [default: trust a certificate from a CA the system trusts, or from SSL_CERT_FILE]
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

    /// Ask the relay to enforce the --verify secrets: webhooks without a valid, fresh signature get
    /// 401 at the relay and are neither forwarded nor queued
    #[arg(long, env = "HOOKRELAY_ENFORCE")]
    pub enforce: bool,

    /// Ask the relay to accept webhooks only from these sources, CIDR or address (repeatable);
    /// others get 403
    #[arg(long = "allow", env = "HOOKRELAY_ALLOW", value_delimiter = ',', value_name = "CIDR", value_parser = parse_allow)]
    pub allow: Vec<String>,

    /// Ask the relay to cap webhooks to this tunnel, e.g. 100/s or '600/min burst 50'; more get 429
    #[arg(long, env = "HOOKRELAY_RATE_LIMIT", value_name = "RATE", value_parser = parse_rate)]
    pub rate_limit: Option<String>,

    /// Ask the relay to cap webhooks from one source address, e.g. 10/s; more get 429
    #[arg(long, env = "HOOKRELAY_RATE_LIMIT_PER_SOURCE", value_name = "RATE", value_parser = parse_rate)]
    pub rate_limit_per_source: Option<String>,

    /// Also redact this header's value in exports (curl, HAR, JSON; CLI and inspector), as
    /// Authorization and X-Gitlab-Token are, e.g. X-Shopify-Access-Token (repeatable, any case)
    #[arg(long = "redact-header", env = "HOOKRELAY_REDACT_HEADER", value_delimiter = ',', value_name = "NAME", value_parser = parse_header_name)]
    pub redact_headers: Vec<String>,

    /// Most deliveries the local app gets at once, one connection each; more wait at the relay
    /// (lowered at start when the open-files limit has no room for as many)
    #[arg(long, env = "HOOKRELAY_MAX_DELIVERIES", value_name = "N", default_value_t = DEFAULT_MAX_DELIVERIES, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_deliveries: u32,

    /// Most exchanges kept in history (oldest go first)
    #[arg(long, env = "HOOKRELAY_MAX_EXCHANGES", default_value_t = DEFAULT_MAX_EXCHANGES, value_name = "N")]
    pub max_exchanges: u64,

    /// Most bytes of history kept, e.g. 1GiB (oldest go first)
    #[arg(long, env = "HOOKRELAY_MAX_HISTORY_BYTES", value_name = "SIZE", value_parser = relay_server::config::parse_size, default_value = "1GiB")]
    pub max_history_bytes: u64,

    #[command(flatten)]
    pub common: CommonArgs,
}

impl FromArgMatches for HttpArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(HttpArgs {
            flags: HttpFlags::from_arg_matches(matches)?,
            given: given_ids(matches),
        })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        self.flags.update_from_arg_matches(matches)?;
        self.given.extend(given_ids(matches));
        Ok(())
    }
}

impl Args for HttpArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        HttpFlags::augment_args(cmd)
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        HttpFlags::augment_args_for_update(cmd)
    }

    fn group_id() -> Option<clap::Id> {
        HttpFlags::group_id()
    }
}

/// The arguments whose value came from the command line or the environment,
/// not from a clap default.
fn given_ids(matches: &ArgMatches) -> BTreeSet<String> {
    matches
        .ids()
        .filter(|id| {
            matches!(
                matches.value_source(id.as_str()),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        })
        .map(|id| id.as_str().to_owned())
        .collect()
}

/// What `relay-client http` runs: the agent, and the watchdog around its link.
#[derive(Debug)]
pub struct HttpConfig {
    /// The agent's own configuration.
    pub agent: Config,
    /// Complain on stderr once the link has been down this long.
    pub disconnect_warning: Duration,
    /// Exit with status 1 once the link has been down this long.
    pub exit_on_disconnect: Option<Duration>,
}

/// A setting that is missing or wrong; the message names it (and the file),
/// never a secret's value.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// `relay-client http --config FILE`: any of `http`'s settings, keys as the
/// flags with `_`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    target: Option<Scalar>,
    relay: Option<String>,
    relay_ip: Option<String>,
    token: Option<String>,
    tunnel: Option<String>,
    relay_cert_sha256: Option<String>,
    insecure_skip_verify: Option<bool>,
    quiet: Option<bool>,
    disconnect_warning: Option<Scalar>,
    exit_on_disconnect: Option<Scalar>,
    no_dedupe: Option<bool>,
    mode: Option<String>,
    when_offline: Option<String>,
    retry_attempts: Option<u32>,
    retry_initial: Option<Scalar>,
    retry_max: Option<Scalar>,
    log_format: Option<String>,
    verify: Option<OneOrMany>,
    enforce: Option<bool>,
    allow: Option<OneOrMany>,
    rate_limit: Option<String>,
    rate_limit_per_source: Option<String>,
    redact_headers: Option<OneOrMany>,
    max_deliveries: Option<u32>,
    max_exchanges: Option<u64>,
    max_history_bytes: Option<Scalar>,
    data_dir: Option<PathBuf>,
    inspect: Option<String>,
    no_inspect: Option<bool>,
}

/// A port, size or duration: `3000`, `"1GiB"`, `"30s"`, or a bare number.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Number(u64),
    Text(String),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Scalar::Number(n) => n.to_string(),
            Scalar::Text(s) => s.clone(),
        }
    }
}

/// `verify = "stripe=…"` or `verify = ["stripe=…", "github=…"]` (and the same
/// for `redact_headers`). Untagged, so that a value of the wrong type is
/// refused without echoing a secret.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Reads the file. Errors give the line and column and the parser's message,
/// but never the offending line itself: it may hold the token.
fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        let at = e
            .span()
            .map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(" at line {line}, column {column}")
            })
            .unwrap_or_default();
        ConfigError(format!(
            "invalid config file {}{at}: {}",
            path.display(),
            e.message().trim_end()
        ))
    })
}

/// A key of the config file, for parsing its value with an error that names
/// the key and the file.
struct FileKey<'a> {
    key: &'static str,
    source: &'a str,
}

impl FileKey<'_> {
    /// Parses the value when the file has one: `invalid value "x" for \`mode\`
    /// in agent.toml: …`.
    fn parse<T>(
        &self,
        value: Option<String>,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        value
            .map(|v| {
                parse(&v).map_err(|e| {
                    ConfigError(format!(
                        "invalid value {v:?} for `{}` in {}: {e}",
                        self.key, self.source
                    ))
                })
            })
            .transpose()
    }
}

impl HttpArgs {
    /// Whether a setting was given as a flag or an env var.
    fn given(&self, id: &str) -> bool {
        self.given.contains(id)
    }

    /// Flag or env var, then the file, then the default (clap's, already in
    /// `flag` when nothing was given).
    fn layer<T>(&self, id: &str, flag: T, file: Option<T>) -> T {
        if self.given(id) {
            flag
        } else {
            file.unwrap_or(flag)
        }
    }

    /// Merges flags, environment variables and the `--config` file into the
    /// validated configuration. Precedence: flag, env var, file, default.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the setting at fault, and the file when the
    /// value came from it.
    pub fn to_config(&self) -> Result<HttpConfig, ConfigError> {
        let f = &self.flags;
        let file = match &f.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let source = f
            .config
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        // A value from the file, parsed; an error names the key and the file.
        let key = |key: &'static str| FileKey {
            key,
            source: &source,
        };

        let target = key("target").parse(file.target.as_ref().map(Scalar::text), str::parse)?;
        let target = self
            .layer("target", f.target.clone(), target.map(Some))
            .ok_or_else(|| {
                ConfigError(
                    "no TARGET: name the local app on the command line (`relay-client http 3000`) or as `target` in the --config file"
                        .into(),
                )
            })?;
        let token = self
            .layer("token", f.token.clone(), file.token.clone().map(Some))
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ConfigError(
                    "no token: pass --token, set HOOKRELAY_TOKEN, or set `token` in the --config file"
                        .into(),
                )
            })?;
        let tunnel = key("tunnel").parse(file.tunnel.clone(), |s| {
            s.parse::<TunnelName>().map_err(|e| e.to_string())
        })?;
        let tunnel = self.layer("tunnel", f.tunnel.clone(), tunnel.map(Some));
        let relay_ip = key("relay_ip").parse(file.relay_ip.clone(), |s| {
            s.parse::<IpAddr>()
                .map_err(|_| format!("{s:?} is not an IP address"))
        })?;
        let relay_ip = self.layer("relay_ip", f.relay_ip, relay_ip.map(Some));

        // Trust is one setting written with two keys. A fingerprint or
        // --insecure-skip-verify given as a flag or env var beats anything in
        // the file; `insecure_skip_verify` layers like any other flag.
        let file_pin =
            key("relay_cert_sha256").parse(file.relay_cert_sha256.clone(), parse_fingerprint)?;
        if file_pin.is_some() && file.insecure_skip_verify == Some(true) {
            return Err(ConfigError(format!(
                "`relay_cert_sha256` and `insecure_skip_verify` in {source} cannot both be set"
            )));
        }
        let insecure = self.layer(
            "insecure_skip_verify",
            f.insecure_skip_verify,
            file.insecure_skip_verify,
        );
        let trust = match (f.relay_cert_sha256, insecure, file_pin) {
            (Some(fp), _, _) => Trust::Pinned(fp),
            (None, true, _) => Trust::InsecureSkipVerify,
            (None, false, Some(fp)) => Trust::Pinned(fp),
            (None, false, None) => Trust::SystemRoots,
        };

        let mode = key("mode").parse(file.mode.clone(), str::parse::<DeliveryMode>)?;
        let when_offline =
            key("when_offline").parse(file.when_offline.clone(), str::parse::<WhenOffline>)?;
        let log_format = key("log_format").parse(file.log_format.clone(), |s| {
            <LogFormat as clap::ValueEnum>::from_str(s, true)
                .map_err(|_| "expected text or json".to_owned())
        })?;
        if file.max_deliveries == Some(0) {
            return Err(ConfigError(format!(
                "invalid value 0 for `max_deliveries` in {source}: at least 1 delivery"
            )));
        }
        if file.retry_attempts == Some(0) {
            return Err(ConfigError(format!(
                "invalid value 0 for `retry_attempts` in {source}: at least 1 attempt"
            )));
        }
        let duration = |name: &'static str, v: &Option<Scalar>| {
            key(name).parse(
                v.as_ref().map(Scalar::text),
                relay_server::config::parse_duration,
            )
        };
        let retry_initial = self.layer(
            "retry_initial",
            f.retry_initial,
            duration("retry_initial", &file.retry_initial)?,
        );
        let retry_max = self.layer(
            "retry_max",
            f.retry_max,
            duration("retry_max", &file.retry_max)?,
        );
        let max_history_bytes = key("max_history_bytes").parse(
            file.max_history_bytes.as_ref().map(Scalar::text),
            relay_server::config::parse_size,
        )?;
        let verify = match file.verify {
            // The spec is not echoed: it holds the secret.
            Some(specs) => Some(
                specs
                    .into_vec()
                    .iter()
                    .map(|s| {
                        parse_secret_spec(s).map_err(|e| {
                            ConfigError(format!("invalid value for `verify` in {source}: {e}"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => None,
        };
        let redact_headers = match file.redact_headers {
            Some(names) => Some(
                names
                    .into_vec()
                    .into_iter()
                    .map(|name| key("redact_headers").parse(Some(name), parse_header_name))
                    .filter_map(Result::transpose)
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => None,
        };
        let verify = self.layer("verify", f.verify.clone(), verify);
        let allow = match file.allow {
            Some(list) => Some(
                list.into_vec()
                    .into_iter()
                    .map(|s| {
                        parse_allow(&s).map_err(|e| {
                            ConfigError(format!("invalid entry in `allow` in {source}: {e}"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => None,
        };
        let rate_limit = key("rate_limit").parse(file.rate_limit.clone(), parse_rate)?;
        let rate_limit_per_source =
            key("rate_limit_per_source").parse(file.rate_limit_per_source.clone(), parse_rate)?;
        let enforce = self.layer("enforce", f.enforce, file.enforce);
        if enforce && verify.is_empty() {
            return Err(ConfigError(
                "--enforce needs at least one --verify PROVIDER=SECRET: the relay can only check signatures it has secrets for"
                    .into(),
            ));
        }
        let policy = PolicyRequest {
            verify: if enforce { verify.clone() } else { Vec::new() },
            allow: self.layer("allow", f.allow.clone(), allow),
            rate_limit: self.layer("rate_limit", f.rate_limit.clone(), rate_limit.map(Some)),
            rate_limit_per_source: self.layer(
                "rate_limit_per_source",
                f.rate_limit_per_source.clone(),
                rate_limit_per_source.map(Some),
            ),
        };
        policy.validate().map_err(ConfigError)?;
        let inspect = key("inspect").parse(file.inspect.clone(), parse_loopback)?;
        let no_inspect = self.layer("no_inspect", f.common.no_inspect, file.no_inspect);
        let inspect = self.layer("inspect", f.common.inspect, inspect);
        let disconnect_warning = duration("disconnect_warning", &file.disconnect_warning)?;
        let exit_on_disconnect = duration("exit_on_disconnect", &file.exit_on_disconnect)?;

        let agent = Config {
            relay: self.layer("relay", f.relay.clone(), file.relay.clone()),
            relay_ip,
            token: Secret::new(token),
            tunnel,
            target,
            trust,
            data_dir: self
                .layer(
                    "data_dir",
                    f.common.data_dir.clone(),
                    file.data_dir.map(Some),
                )
                .unwrap_or_else(default_data_dir),
            inspect: (!no_inspect).then_some(inspect),
            print_deliveries: !self.layer("quiet", f.quiet, file.quiet),
            dedupe: !self.layer("no_dedupe", f.no_dedupe, file.no_dedupe),
            settings: TunnelSettings {
                mode: self.layer("mode", f.mode, mode),
                when_offline: self.layer("when_offline", f.when_offline, when_offline),
            },
            retry: RetryPolicy {
                attempts: self.layer("retry_attempts", f.retry_attempts, file.retry_attempts),
                initial: retry_initial,
                max: retry_max.max(retry_initial),
            },
            log_format: self.layer("log_format", f.log_format, log_format),
            max_backoff: DEFAULT_MAX_BACKOFF,
            secrets: secret_set(&verify),
            policy,
            redaction: Redaction::new(self.layer(
                "redact_headers",
                f.redact_headers.clone(),
                redact_headers,
            )),
            max_deliveries: self.layer("max_deliveries", f.max_deliveries, file.max_deliveries),
            retention: Retention {
                max_exchanges: self
                    .layer("max_exchanges", f.max_exchanges, file.max_exchanges)
                    .max(1),
                max_bytes: self
                    .layer("max_history_bytes", f.max_history_bytes, max_history_bytes)
                    .max(1),
            },
        };
        Ok(HttpConfig {
            agent,
            disconnect_warning: self.layer(
                "disconnect_warning",
                f.disconnect_warning,
                disconnect_warning,
            ),
            exit_on_disconnect: self.layer(
                "exit_on_disconnect",
                f.exit_on_disconnect,
                exit_on_disconnect.map(Some),
            ),
        })
    }
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

/// A valid allow-list entry, kept as written for the hello.
fn parse_allow(s: &str) -> Result<String, String> {
    parse_cidr(s).map(|net| net.to_string())
}

/// A valid rate, kept in its canonical form for the hello.
fn parse_rate(s: &str) -> Result<String, String> {
    s.parse::<Rate>().map(|r| r.to_string())
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
    /// Keep credentials (Authorization, X-Gitlab-Token, Cookie…, and every --redact-header) instead
    /// of `[redacted]`
    #[arg(long)]
    pub show_secrets: bool,
    /// Also redact this header's value (repeatable, any case), on top of the agent's own
    /// --redact-header list
    #[arg(long = "redact-header", env = "HOOKRELAY_REDACT_HEADER", value_delimiter = ',', value_name = "NAME", value_parser = parse_header_name)]
    pub redact_headers: Vec<String>,
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
        let config = args.to_config().expect("valid config").agent;
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
        let err = http(&["3000"]).to_config().expect_err("token is required");
        assert!(err.to_string().contains("no token"), "{err}");
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

    /// Held while clap reads `HOOKRELAY_*` variables that a test has set.
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// `relay-client http ARGS…`, parsed.
    fn http(args: &[&str]) -> HttpArgs {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        parse_http(args)
    }

    fn parse_http(args: &[&str]) -> HttpArgs {
        let mut argv = vec!["relay-client", "http"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).expect("valid arguments").command {
            Command::Http(args) => args,
            other => panic!("http command, got {other:?}"),
        }
    }

    /// A config file in a temporary directory, with its path.
    fn agent_toml(content: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, content).expect("write");
        let path = path.to_str().expect("utf-8").to_owned();
        (dir, path)
    }

    #[test]
    fn the_config_file_fills_in_what_flags_leave_out() {
        let (_dir, path) = agent_toml(
            r#"
target = 3000
relay = "relay.example.com:4443"
relay_ip = "203.0.113.10"
token = "hkr_from_file"
tunnel = "alice-dev"
relay_cert_sha256 = "abababababababababababababababababababababababababababababababab"
quiet = true
disconnect_warning = "30s"
exit_on_disconnect = "2m"
no_dedupe = true
mode = "queue"
when_offline = "reject"
retry_attempts = 3
retry_initial = 2
retry_max = "1m"
log_format = "json"
verify = ["stripe=whsec_a", "github=gh"]
redact_headers = ["X-Shop-Token", "x-api-secret"]
max_deliveries = 8
max_exchanges = 500
max_history_bytes = "10MiB"
data_dir = "/tmp/hookrelay-agent"
inspect = "127.0.0.1:4041"
"#,
        );
        let settings = http(&["--config", &path]).to_config().expect("valid");
        let config = &settings.agent;
        assert_eq!(config.target.to_string(), "http://127.0.0.1:3000");
        assert_eq!(config.relay, "relay.example.com:4443");
        assert_eq!(config.relay_ip, Some([203, 0, 113, 10].into()));
        assert_eq!(config.token.expose(), "hkr_from_file");
        assert_eq!(
            config.tunnel.as_ref().map(|t| t.as_str()),
            Some("alice-dev")
        );
        assert_eq!(config.trust, Trust::Pinned([0xab; 32]));
        assert!(!config.print_deliveries && !config.dedupe);
        assert_eq!(settings.disconnect_warning, Duration::from_secs(30));
        assert_eq!(settings.exit_on_disconnect, Some(Duration::from_secs(120)));
        assert_eq!(config.settings.mode, DeliveryMode::Queue);
        assert_eq!(config.settings.when_offline, WhenOffline::Reject);
        assert_eq!(
            (
                config.retry.attempts,
                config.retry.initial,
                config.retry.max
            ),
            (3, Duration::from_secs(2), Duration::from_secs(60))
        );
        assert_eq!(config.log_format, LogFormat::Json);
        assert!(!config.secrets.get(Provider::Stripe).is_empty());
        assert!(!config.secrets.get(Provider::Github).is_empty());
        assert_eq!(config.redaction.extra(), ["x-api-secret", "x-shop-token"]);
        assert_eq!(config.max_deliveries, 8);
        assert_eq!(config.retention.max_exchanges, 500);
        assert_eq!(config.retention.max_bytes, 10 << 20);
        assert_eq!(config.data_dir, PathBuf::from("/tmp/hookrelay-agent"));
        assert_eq!(
            config.inspect,
            Some("127.0.0.1:4041".parse().expect("addr"))
        );

        // Without a file, clap's defaults.
        let settings = http(&["3000", "--token", "t"]).to_config().expect("valid");
        let config = &settings.agent;
        assert_eq!(config.relay, "127.0.0.1:4443");
        assert_eq!(config.relay_ip, None);
        assert_eq!(config.settings.mode, DeliveryMode::Sync);
        assert_eq!(config.settings.when_offline, WhenOffline::Queue);
        assert_eq!(config.retry.attempts, DEFAULT_ATTEMPTS);
        assert_eq!(config.max_deliveries, DEFAULT_MAX_DELIVERIES);
        assert_eq!(config.trust, Trust::SystemRoots);
        let flag = http(&["3000", "--token", "t", "--max-deliveries", "4"]);
        assert_eq!(flag.to_config().expect("valid").agent.max_deliveries, 4);
        let zero = Cli::try_parse_from(["relay-client", "http", "3000", "--max-deliveries", "0"]);
        assert!(zero.is_err(), "at least one delivery");
        assert_eq!(settings.disconnect_warning, Duration::from_secs(15));
        assert_eq!(settings.exit_on_disconnect, None);
        assert_eq!(config.inspect, Some(DEFAULT_INSPECT.parse().expect("addr")));
        assert!(config.print_deliveries && config.dedupe);
        assert!(config.redaction.extra().is_empty());
    }

    #[test]
    fn flags_win_over_the_file_even_when_they_repeat_a_default() {
        let (_dir, path) = agent_toml(
            "target = \"http://127.0.0.1:3000/base\"\ntoken = \"hkr_file\"\nmode = \"queue\"\nretry_attempts = 3\nrelay = \"file.example.com:4443\"\ninsecure_skip_verify = true\ninspect = \"127.0.0.1:4041\"\nverify = \"stripe=whsec_file\"\nredact_headers = \"X-File\"\n",
        );
        let settings = http(&[
            "4000",
            "--config",
            &path,
            "--token",
            "hkr_flag",
            // The default value, given explicitly: it still wins over the file.
            "--mode",
            "sync",
            "--retry-attempts",
            "10",
            "--relay-cert-sha256",
            &"cd".repeat(32),
            "--verify",
            "github=gh",
            "--redact-header",
            "X-Flag-One",
            "--redact-header",
            "x-flag-two",
        ])
        .to_config()
        .expect("valid");
        let config = &settings.agent;
        assert_eq!(config.target.to_string(), "http://127.0.0.1:4000");
        assert_eq!(config.token.expose(), "hkr_flag");
        assert_eq!(config.settings.mode, DeliveryMode::Sync);
        assert_eq!(config.retry.attempts, 10);
        assert_eq!(
            config.relay, "file.example.com:4443",
            "not given: the file's"
        );
        assert_eq!(config.trust, Trust::Pinned([0xcd; 32]));
        assert_eq!(
            config.inspect,
            Some("127.0.0.1:4041".parse().expect("addr"))
        );
        assert!(config.secrets.get(Provider::Stripe).is_empty());
        assert!(!config.secrets.get(Provider::Github).is_empty());
        assert_eq!(config.redaction.extra(), ["x-flag-one", "x-flag-two"]);

        // The file's TARGET when the command line has none.
        let config = http(&["--config", &path]).to_config().expect("valid").agent;
        assert_eq!(config.redaction.extra(), ["x-file"]);
        assert_eq!(config.target.to_string(), "http://127.0.0.1:3000/base");
        assert_eq!(config.trust, Trust::InsecureSkipVerify);
        assert_eq!(config.settings.mode, DeliveryMode::Queue);
    }

    #[test]
    fn env_vars_sit_between_flags_and_the_file() {
        let (_dir, path) =
            agent_toml("target = 3000\ntoken = \"t\"\nretry_initial = \"3s\"\nmax_exchanges = 5\nquiet = true\n");
        let (from_env, from_flag) = {
            // Clap reads the environment while parsing; nothing else parses meanwhile.
            let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
            std::env::set_var("HOOKRELAY_RETRY_INITIAL", "7s");
            std::env::set_var("HOOKRELAY_MAX_EXCHANGES", "77");
            std::env::set_var("HOOKRELAY_QUIET", "false");
            let from_env = parse_http(&["--config", &path]);
            let from_flag = parse_http(&["--config", &path, "--max-exchanges", "9"]);
            std::env::remove_var("HOOKRELAY_RETRY_INITIAL");
            std::env::remove_var("HOOKRELAY_MAX_EXCHANGES");
            std::env::remove_var("HOOKRELAY_QUIET");
            (from_env.to_config(), from_flag.to_config())
        };
        let from_file = http(&["--config", &path]).to_config();

        let config = from_env.expect("valid").agent;
        assert_eq!(config.retry.initial, Duration::from_secs(7));
        assert_eq!(config.retention.max_exchanges, 77);
        assert!(
            config.print_deliveries,
            "HOOKRELAY_QUIET=false beats the file"
        );
        let config = from_flag.expect("valid").agent;
        assert_eq!(config.retention.max_exchanges, 9);
        let config = from_file.expect("valid").agent;
        assert_eq!(config.retry.initial, Duration::from_secs(3));
        assert_eq!(config.retention.max_exchanges, 5);
        assert!(!config.print_deliveries);
    }

    #[test]
    fn bad_file_settings_are_named_with_the_file() {
        for (content, needle) in [
            ("mode = \"x\"", "invalid value \"x\" for `mode` in "),
            ("when_offline = \"later\"", "`when_offline`"),
            ("target = \"https://x:1\"", "`target`"),
            ("target = 0", "`target`"),
            ("tunnel = \"bad_name\"", "`tunnel`"),
            ("relay_ip = \"relay.example.com\"", "`relay_ip`"),
            ("relay_cert_sha256 = \"xyz\"", "`relay_cert_sha256`"),
            (
                "relay_cert_sha256 = \"abababababababababababababababababababababababababababababababab\"\ninsecure_skip_verify = true",
                "cannot both be set",
            ),
            ("retry_attempts = 0", "`retry_attempts`"),
            ("max_deliveries = 0", "`max_deliveries`"),
            ("retry_max = \"soon\"", "`retry_max`"),
            ("exit_on_disconnect = \"never\"", "`exit_on_disconnect`"),
            ("max_history_bytes = \"lots\"", "`max_history_bytes`"),
            ("log_format = \"xml\"", "`log_format`"),
            ("redact_headers = [\"X-Key:\"]", "`redact_headers`"),
            ("inspect = \"0.0.0.0:4040\"", "not a loopback address"),
            ("tokn = \"t\"", "tokn"),
            ("quiet = \"yes\"", "line 2, column 9"),
            ("allow = [\"10.0.0.0/8\", \"nope\"]", "`allow`"),
            ("allow = \"10.0.0.1/40\"", "`allow`"),
            ("rate_limit = \"fast\"", "`rate_limit`"),
            ("rate_limit_per_source = \"1/year\"", "`rate_limit_per_source`"),
        ] {
            let (_dir, path) = agent_toml(&format!("token = \"t\"\n{content}\n"));
            let err = http(&["3000", "--config", &path])
                .to_config()
                .expect_err(content)
                .to_string();
            assert!(err.contains(needle), "{content}: {err}");
            assert!(err.contains("agent.toml"), "names the file: {err}");
        }

        let (_dir, path) = agent_toml("token = \"t\"\n");
        let err = http(&["--config", &path])
            .to_config()
            .expect_err("no target");
        assert!(err.to_string().contains("no TARGET"), "{err}");
        let err = http(&[
            "3000",
            "--config",
            "/nonexistent/agent.toml",
            "--token",
            "t",
        ])
        .to_config()
        .expect_err("missing file");
        assert!(err.to_string().contains("/nonexistent/agent.toml"), "{err}");
    }

    #[test]
    fn policy_requests_come_from_flags_or_the_file() {
        let config = http(&[
            "3000",
            "--token",
            "t",
            "--verify",
            "stripe=whsec_a",
            "--enforce",
            "--allow",
            "192.0.2.0/24,2001:db8::1",
            "--rate-limit",
            "600/min",
        ])
        .to_config()
        .expect("valid")
        .agent;
        assert_eq!(config.policy.verify, [(Provider::Stripe, "whsec_a".into())]);
        assert_eq!(config.policy.allow, ["192.0.2.0/24", "2001:db8::1/128"]);
        assert_eq!(config.policy.rate_limit.as_deref(), Some("600/min"));
        assert!(!format!("{config:?}").contains("whsec_a"));
        // Without --enforce the secrets stay on the laptop.
        let config = http(&["3000", "--token", "t", "--verify", "stripe=whsec_a"])
            .to_config()
            .expect("valid")
            .agent;
        assert!(config.policy.is_empty());
        let err = http(&["3000", "--token", "t", "--enforce"])
            .to_config()
            .expect_err("nothing to enforce");
        assert!(err.to_string().contains("--verify"), "{err}");
        assert!(Cli::try_parse_from(["relay-client", "http", "3000", "--allow", "x"]).is_err());
        assert!(
            Cli::try_parse_from(["relay-client", "http", "3000", "--rate-limit", "9"]).is_err()
        );

        let (_dir, path) = agent_toml(
            "target = 3000\ntoken = \"t\"\nverify = \"github=gh\"\nenforce = true\nallow = \"203.0.113.7\"\nrate_limit_per_source = \"10/s burst 20\"\n",
        );
        let policy = http(&["--config", &path])
            .to_config()
            .expect("valid")
            .agent
            .policy;
        assert_eq!(policy.verify, [(Provider::Github, "gh".into())]);
        assert_eq!(policy.allow, ["203.0.113.7/32"]);
        assert_eq!(
            policy.rate_limit_per_source.as_deref(),
            Some("10/s burst 20")
        );
    }

    #[test]
    fn every_http_flag_is_a_file_key() {
        // deny_unknown_fields lists the keys it knows.
        let (_dir, path) = agent_toml("no_such_key = 1\n");
        let err = http(&["3000", "--token", "t", "--config", &path])
            .to_config()
            .expect_err("unknown key")
            .to_string();
        let cli = <Cli as clap::CommandFactory>::command();
        let flags = cli.find_subcommand("http").expect("http command");
        for arg in flags.get_arguments() {
            let id = arg.get_id().as_str();
            if !matches!(id, "config" | "help") {
                assert!(err.contains(&format!("`{id}`")), "no `{id}` key: {err}");
            }
        }
    }

    #[test]
    fn secrets_in_the_file_are_never_echoed() {
        for content in [
            // A syntax error on the token's line.
            "target = 3000\ntoken = hkr_supersecret\n",
            // The wrong type for verify, and a spec without a provider.
            "target = 3000\ntoken = \"t\"\nverify = { stripe = \"hkr_supersecret\" }\n",
            "target = 3000\ntoken = \"t\"\nverify = [\"hkr_supersecret\"]\n",
            "target = 3000\ntoken = \"t\"\nverify = [\"nobody=hkr_supersecret\"]\n",
        ] {
            let (_dir, path) = agent_toml(content);
            let err = http(&["--config", &path])
                .to_config()
                .expect_err(content)
                .to_string();
            assert!(!err.contains("supersecret"), "{content}: {err}");
            assert!(err.contains("agent.toml"), "{err}");
        }
        let (_dir, path) = agent_toml("target = 3000\ntoken = \"hkr_supersecret\"\n");
        let settings = http(&["--config", &path]).to_config().expect("valid");
        assert!(!format!("{settings:?}").contains("supersecret"));
    }
}
