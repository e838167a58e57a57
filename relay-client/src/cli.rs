//! Command line and `HOOKRELAY_*` environment variables into a [`Config`].

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use hookrelay_shared::TunnelName;

use crate::{
    agent::{default_data_dir, DEFAULT_MAX_BACKOFF},
    config::{parse_fingerprint, Config, Secret, Target, Trust, DEFAULT_INSPECT},
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

    #[command(flatten)]
    pub common: CommonArgs,
}

/// Options every agent command shares.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Directory for the agent's identity (id and generated tunnel name) [default: the platform's data directory]
    #[arg(long, env = "HOOKRELAY_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Inspector address (keep it on loopback)
    #[arg(long, env = "HOOKRELAY_INSPECT", value_name = "ADDR", default_value = DEFAULT_INSPECT)]
    pub inspect: SocketAddr,

    /// Do not start the inspector
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
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_INSPECT)]
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
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
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
    }
}
