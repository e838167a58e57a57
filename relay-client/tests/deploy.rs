//! The files in `deploy/` are loaded the way a user's relay and agent load
//! them, and checked against each other: the example configs parse into the
//! documented values, the systemd units and the Dockerfile start the binaries
//! with the paths the README gives, and the monitoring files name only metrics
//! the binaries export. Nothing is served and nothing is written: the relay's
//! data directory (`/var/lib/hookrelay`) is only parsed, never created.

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{CommandFactory, Parser};
use hookrelay_shared::{DeliveryMode, WhenOffline};
use relay_client::{
    cli::{Cli as AgentCli, Command as AgentCommand},
    config::LogFormat,
    Trust,
};
use relay_server::{
    cli::Cli as RelayCli,
    config::{AcmeSettings, TlsSource, DEFAULT_ACME_DIRECTORY},
};

const RELAY_TOML: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/relay.toml");
const AGENT_TOML: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/agent.toml");
const RELAY_UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/hookrelay-relay.service"
);
const AGENT_UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/hookrelay-agent.service"
);
const DOCKERFILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/Dockerfile");
const DOCKERIGNORE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../.dockerignore");
const PROMETHEUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus.yml");
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/grafana-dashboard.json"
);
const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");

/// Where the units, the image and the README install the relay's config.
const ETC_RELAY_TOML: &str = "/etc/hookrelay/relay.toml";

/// The metrics the relay (admin `/metrics`) and the agent (inspector
/// `/metrics`) export; the dashboard may use these and nothing else.
const METRICS: &[&str] = &[
    "hookrelay_relay_requests_total",
    "hookrelay_relay_request_duration_seconds_bucket",
    "hookrelay_relay_request_bytes_total",
    "hookrelay_relay_response_bytes_total",
    "hookrelay_relay_agents_connected",
    "hookrelay_relay_auth_failures_total",
    "hookrelay_relay_quic_retries_total",
    "hookrelay_relay_quic_receive_drops_total",
    "hookrelay_relay_quic_receive_buffer_bytes",
    "hookrelay_relay_queue_depth",
    "hookrelay_relay_queue_bytes",
    "hookrelay_relay_queue_oldest_age_seconds",
    "hookrelay_relay_queue_delivered_total",
    "hookrelay_agent_deliveries_total",
    "hookrelay_agent_app_duration_seconds_bucket",
    "hookrelay_agent_delivery_attempts_total",
    "hookrelay_agent_delivery_retries_total",
    "hookrelay_agent_delivery_failures_total",
    "hookrelay_agent_signature_verdicts_total",
    "hookrelay_agent_duplicates_total",
    "hookrelay_agent_queued_repeats_total",
    "hookrelay_agent_history_exchanges",
    "hookrelay_agent_history_disk_bytes",
    "hookrelay_agent_disk_bytes",
    "hookrelay_agent_connected",
    "hookrelay_agent_queued_waiting",
];

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// Whether `text` sets `key`, or shows it commented out (`# key = …`).
fn mentions_key(text: &str, key: &str) -> bool {
    text.lines().any(|line| {
        let line = line.trim_start().trim_start_matches('#').trim_start();
        line.strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='))
    })
}

/// The value of `Key=` in a systemd unit (the last one, as systemd reads it).
fn unit_value<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines()
        .rev()
        .find_map(|line| line.trim().strip_prefix(key)?.strip_prefix('='))
}

/// The relay as `relay-server --config deploy/relay.toml` would configure it.
fn relay_config() -> relay_server::Config {
    RelayCli::try_parse_from(["relay-server", "--config", RELAY_TOML])
        .expect("valid arguments")
        .to_config()
        .unwrap_or_else(|e| panic!("deploy/relay.toml: {e}"))
}

/// The agent as `relay-client http ARGS…` would configure it.
fn agent_config(args: &[&str]) -> relay_client::cli::HttpConfig {
    let mut argv = vec!["relay-client", "http"];
    argv.extend_from_slice(args);
    let cli = AgentCli::try_parse_from(argv).expect("valid arguments");
    let AgentCommand::Http(http) = cli.command else {
        panic!("http command")
    };
    http.to_config()
        .unwrap_or_else(|e| panic!("deploy/agent.toml: {e}"))
}

#[test]
fn relay_example_config_loads_with_the_documented_values() {
    let data_dir_existed = std::path::Path::new("/var/lib/hookrelay").exists();
    let config = relay_config();
    assert_eq!(config.data_dir, PathBuf::from("/var/lib/hookrelay"));
    assert_eq!(config.http, Some(addr("0.0.0.0:8080")));
    assert_eq!(config.https, Some(addr("0.0.0.0:443")));
    assert_eq!(config.quic, addr("0.0.0.0:4443"));
    assert_eq!(config.admin, addr("127.0.0.1:9090"));
    assert!(
        config.admin.ip().is_loopback(),
        "the admin API can purge queues"
    );
    assert_eq!(config.domain.as_deref(), Some("relay.example.com"));
    assert_eq!(config.public_url, None);
    assert_eq!(
        config.tls,
        TlsSource::Acme(AcmeSettings {
            names: vec!["relay.example.com".into()],
            email: None,
            directory: DEFAULT_ACME_DIRECTORY.into(),
            ca_root: None,
        })
    );
    assert_eq!(config.body_limit_bytes, 25 << 20);
    assert_eq!(config.timeout, Duration::from_secs(30));
    assert!(!config.dev, "never dev mode in production");
    assert!(config.queue_enabled);
    assert_eq!(config.queue_limits.max_count, 100_000);
    assert_eq!(config.queue_limits.max_bytes, 1 << 30);
    assert_eq!(
        config.queue_limits.max_age,
        Duration::from_secs(7 * 24 * 3600)
    );
    if !data_dir_existed {
        assert!(
            !std::path::Path::new("/var/lib/hookrelay").exists(),
            "loading the config must not create the data directory"
        );
    }
}

#[test]
fn relay_example_config_shows_every_setting() {
    let text = read(RELAY_TOML);
    let mut missing = Vec::new();
    for arg in RelayCli::command().get_arguments() {
        let key = match arg.get_id().as_str() {
            "config" | "help" | "version" => continue,
            "no_queue" => "queue",
            id => id,
        };
        if !mentions_key(&text, key) {
            missing.push(key.to_owned());
        }
    }
    assert!(
        missing.is_empty(),
        "deploy/relay.toml lacks {missing:?} (set them or show them commented out)"
    );
}

#[test]
fn agent_example_config_loads_with_the_documented_values() {
    let settings = agent_config(&["--config", AGENT_TOML]);
    let config = &settings.agent;
    assert_eq!(config.relay, "relay.example.com:4443");
    assert!(config.token.expose().starts_with("hkr_"));
    assert_eq!(
        config.tunnel.as_ref().map(|t| t.as_str()),
        Some("alice-dev")
    );
    assert_eq!(config.target.to_string(), "http://127.0.0.1:3000");
    assert_eq!(
        config.trust,
        Trust::SystemRoots,
        "the example relay has an ACME certificate"
    );
    assert_eq!(config.relay_ip, None);
    assert_eq!(config.settings.mode, DeliveryMode::Sync);
    assert_eq!(config.settings.when_offline, WhenOffline::Queue);
    assert_eq!(config.retry.attempts, 10);
    assert_eq!(config.retry.initial, Duration::from_secs(1));
    assert_eq!(config.retry.max, Duration::from_secs(300));
    assert_eq!(config.inspect, Some(addr("127.0.0.1:4040")));
    assert_eq!(config.log_format, LogFormat::Text);
    assert!(config.print_deliveries && config.dedupe);
    assert_eq!(settings.disconnect_warning, Duration::from_secs(15));
    assert_eq!(settings.exit_on_disconnect, None);
    // The example never carries a real secret, nor prints the placeholder.
    assert!(config.secrets.is_empty());
    assert!(!format!("{config:?}").contains("hkr_"));

    let text = read(AGENT_TOML);
    let mut missing = Vec::new();
    for arg in AgentCli::command()
        .find_subcommand("http")
        .expect("http command")
        .get_arguments()
    {
        let key = arg.get_id().as_str();
        if !matches!(key, "config" | "help") && !mentions_key(&text, key) {
            missing.push(key.to_owned());
        }
    }
    assert!(
        missing.is_empty(),
        "deploy/agent.toml lacks {missing:?} (set them or show them commented out)"
    );
}

#[test]
fn systemd_units_and_the_image_start_the_relay_the_same_way() {
    let unit = read(RELAY_UNIT);
    let exec = format!("/usr/local/bin/relay-server --config {ETC_RELAY_TOML}");
    assert_eq!(unit_value(&unit, "ExecStart"), Some(exec.as_str()));
    assert_eq!(unit_value(&unit, "User"), Some("hookrelay"));
    assert_eq!(unit_value(&unit, "Restart"), Some("on-failure"));
    assert_eq!(unit_value(&unit, "KillSignal"), Some("SIGTERM"));
    assert_eq!(unit_value(&unit, "NoNewPrivileges"), Some("true"));
    assert_eq!(unit_value(&unit, "ProtectSystem"), Some("strict"));
    // ProtectSystem=strict leaves only the StateDirectory writable: it must be
    // the data directory of relay.toml.
    let state = unit_value(&unit, "StateDirectory").expect("StateDirectory");
    assert_eq!(
        relay_config().data_dir,
        PathBuf::from("/var/lib").join(state)
    );
    // systemd waits longer than the relay lets deliveries finish.
    let stop = unit_value(&unit, "TimeoutStopSec").expect("TimeoutStopSec");
    let stop = relay_server::config::parse_duration(stop).expect("duration");
    let relay: toml::Table = toml::from_str(&read(RELAY_TOML)).expect("toml");
    if let Some(grace) = relay.get("shutdown_grace").and_then(|v| v.as_str()) {
        let grace = relay_server::config::parse_duration(grace).expect("duration");
        assert!(grace < stop, "shutdown_grace {grace:?} >= TimeoutStopSec");
    }

    let docker = read(DOCKERFILE);
    assert!(docker.contains("FROM rust:1-bookworm AS build"));
    assert!(docker.contains("cargo build --release --locked -p relay-server"));
    assert!(docker.contains("FROM debian:bookworm-slim"));
    assert!(docker.contains(&format!("COPY deploy/relay.toml {ETC_RELAY_TOML}")));
    assert!(docker.contains(r#"ENTRYPOINT ["/usr/local/bin/relay-server"]"#));
    assert!(docker.contains(&format!(r#"CMD ["--config", "{ETC_RELAY_TOML}"]"#)));
    assert!(docker.contains("USER hookrelay"));
    assert!(docker.contains("VOLUME /var/lib/hookrelay"));
    let config = relay_config();
    let expose = format!(
        "EXPOSE {}/tcp {}/tcp {}/udp {}/tcp",
        config.http.expect("http on").port(),
        config.https.expect("https on").port(),
        config.quic.port(),
        config.admin.port()
    );
    assert!(docker.contains(&expose), "Dockerfile lacks {expose:?}");
    let ignore = read(DOCKERIGNORE);
    for dir in ["target/", "artifacts/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == dir),
            ".dockerignore: {dir}"
        );
    }

    let readme = read(README);
    assert!(readme.contains("## Run the relay on a VPS"));
    for needle in [
        ETC_RELAY_TOML,
        "docker build -f deploy/Dockerfile -t hookrelay-relay .",
        "deploy/hookrelay-relay.service",
        "deploy/hookrelay-agent.service",
    ] {
        assert!(readme.contains(needle), "README lacks {needle:?}");
    }
}

#[test]
fn the_agent_user_unit_runs_a_valid_command_line() {
    let unit = read(AGENT_UNIT);
    let exec = unit_value(&unit, "ExecStart").expect("ExecStart");
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("%h/.local/bin/relay-client"));
    // The unit's own arguments, with the example config in place of the user's.
    let args: Vec<&str> = words
        .map(|w| {
            if w == "%h/.config/hookrelay/agent.toml" {
                AGENT_TOML
            } else {
                w
            }
        })
        .collect();
    assert_eq!(args.first(), Some(&"http"));
    let settings = agent_config(&args[1..]);
    assert_eq!(settings.exit_on_disconnect, Some(Duration::from_secs(120)));
    assert_eq!(settings.agent.relay, "relay.example.com:4443");
    assert_eq!(unit_value(&unit, "Restart"), Some("on-failure"));
    assert_eq!(unit_value(&unit, "WantedBy"), Some("default.target"));
    // Root-only directives have no place in a user unit.
    assert_eq!(unit_value(&unit, "User"), None);
}

/// Every string under an `expr` key (panel queries), and the templating
/// queries, anywhere in the dashboard.
fn queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query", serde_json::Value::String(s)) if s.contains('(') => {
                        out.push(s.clone())
                    }
                    _ => queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

/// The `hookrelay_…` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> Vec<&str> {
    expr.match_indices("hookrelay_")
        .map(|(start, _)| {
            let rest = &expr[start..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
}

#[test]
fn the_grafana_dashboard_queries_only_exported_metrics() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(DASHBOARD)).expect("grafana-dashboard.json is JSON");
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let vars = dashboard["templating"]["list"]
        .as_array()
        .expect("templating variables");
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "a Prometheus data source variable"
    );

    let mut exprs = Vec::new();
    queries(&dashboard, &mut exprs);
    assert!(exprs.len() > 10, "{exprs:?}");
    let known: BTreeSet<&str> = METRICS.iter().copied().collect();
    let mut used = BTreeSet::new();
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "no hookrelay metric in {expr:?}");
        for name in names {
            assert!(known.contains(name), "unknown metric {name:?} in {expr:?}");
            used.insert(name);
        }
    }
    let unused: Vec<_> = known.difference(&used).collect();
    assert!(unused.is_empty(), "no panel shows {unused:?}");

    // Every panel and query uses the data source variable, so the dashboard
    // imports into any Grafana.
    let panels = dashboard["panels"].as_array().expect("panels");
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        for target in panel["targets"].as_array().expect("targets") {
            assert_eq!(target["datasource"]["uid"], "${datasource}");
        }
    }
    // Grafana tells panels apart by id: two with one id break editing.
    let mut ids = BTreeSet::new();
    for panel in panels {
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "two panels with id {id}");
    }
}

#[test]
fn prometheus_scrapes_the_relay_admin_and_the_agent_inspector() {
    let text = read(PROMETHEUS);
    assert!(text.contains("scrape_interval: 15s"));
    let relay = relay_config().admin;
    let agent = agent_config(&["--config", AGENT_TOML])
        .agent
        .inspect
        .expect("inspector on");
    for target in [relay, agent] {
        assert!(
            text.contains(&format!("targets: [\"{target}\"]")),
            "prometheus.yml does not scrape {target}"
        );
    }
    assert_eq!(text.matches("metrics_path: /metrics").count(), 2);
}
