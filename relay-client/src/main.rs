//! `relay-client`: argv and environment into a [`Config`](relay_client::Config),
//! Ctrl-C and SIGTERM into a graceful shutdown, fatal errors into a non-zero exit.

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use hookrelay_shared::open_files;
use relay_client::{
    cli::{
        secret_set, Cli, Command, ExportArgs, HistoryArgs, HttpArgs, HttpConfig, ReplayArgs,
        ShowArgs, VerifyArgs,
    },
    commands::{self, Backend},
    config::LogFormat,
    history::ExchangeId,
    Agent,
};

/// jemalloc instead of glibc's malloc (configured in `.cargo/config.toml`):
/// about a fifth less CPU per request through the tunnel, and freed memory
/// goes back to the system instead of staying in glibc's per-thread arenas
/// (README, Benchmarks).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The agent (`http`) runs on one thread unless TOKIO_WORKER_THREADS asks
    // for a pool of workers: a delivery crosses several tasks (quinn's
    // endpoint and connection drivers, the stream, the app connection), and
    // on one thread each hand-over is a queue push instead of a futex
    // wake-up of another thread. A current-thread runtime rather than a pool
    // of one: the pool runs a task it has just woken next, so quinn's
    // connection driver sent each answer in a datagram of its own (README,
    // Benchmarks). The history's sled reads for the inspector run on the
    // blocking pool, so a long listing does not hold deliveries up. `demo`
    // runs a relay, an agent and an app in one process and keeps one worker
    // per core.
    let one_thread = matches!(cli.command, Command::Http(_))
        && std::env::var_os("TOKIO_WORKER_THREADS").is_none();
    let mut runtime = if one_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    runtime.enable_all();
    match runtime.build() {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> ExitCode {
    if !matches!(cli.command, Command::Http(_)) {
        // `http` starts logging once it knows the log format, which its
        // --config file may set.
        init_tracing(false);
    }
    let result = match cli.command {
        Command::Http(args) => http(&args).await,
        Command::Demo(args) => {
            // A relay and an agent in one process: both sets of connections.
            let _ = open_files::raise_logged();
            relay_client::demo::run(args).await
        }
        Command::History(args) => history(args).await,
        Command::Show(args) => show(args).await,
        Command::Replay(args) => replay(args).await,
        Command::Export(args) => export(args).await,
        Command::Verify(args) => return verify(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the open-files limit and keeps the deliveries in flight, each
/// with its connection to the app, under it: a burst beyond waits at the
/// relay instead of failing to connect (`502`) and leaving the history's
/// flush without a descriptor.
fn fit_deliveries(config: &mut relay_client::Config) {
    let Some(limit) = open_files::raise_logged() else {
        return;
    };
    let wanted = usize::try_from(config.max_deliveries).unwrap_or(usize::MAX);
    // One each: its connection to the app (a large body goes to the shared
    // history segment; queued ones come one stream at a time).
    let fits = open_files::fit(limit.now, 1, wanted, MIN_DELIVERIES);
    if fits < wanted {
        tracing::warn!(
            open_files = limit.now,
            max_deliveries = fits,
            "the open-files limit ({}) leaves room for {fits} deliveries at once, not {wanted}: \
             more wait at the relay; raise it (`ulimit -n`) to allow more",
            limit.now,
        );
        config.max_deliveries = u32::try_from(fits).unwrap_or(config.max_deliveries);
    }
}

/// Deliveries allowed at once however low the open-files limit is.
const MIN_DELIVERIES: usize = 16;

async fn http(args: &HttpArgs) -> anyhow::Result<()> {
    // A bad setting, from a flag, an env var or the --config file, is refused
    // like a bad flag: usage error, exit status 2, before anything starts.
    let HttpConfig {
        agent: mut config,
        disconnect_warning,
        exit_on_disconnect,
    } = args.to_config().unwrap_or_else(|e| {
        let mut cli = Cli::command();
        cli.build();
        let mut http = cli.find_subcommand("http").cloned().unwrap_or(cli);
        http.error(clap::error::ErrorKind::ValueValidation, e)
            .exit()
    });
    init_tracing(config.log_format == LogFormat::Json);
    // The inspector reports this directory so that `history`, `show`… can tell
    // whether this agent serves theirs; a path relative to the agent's working
    // directory would mean something else to a command run elsewhere.
    if let Ok(dir) = std::path::absolute(&config.data_dir) {
        config.data_dir = dir;
    }
    fit_deliveries(&mut config);
    let target = config.target.clone();
    let json = config.log_format == LogFormat::Json;
    let mut agent = Agent::spawn(config).await?;
    let banner = Banner {
        json,
        tunnel: agent.tunnel().to_string(),
        target: target.to_string(),
        inspector: agent.inspector_addr().map(|a| format!("http://{a}")),
    };
    let urls = agent.public_urls();
    banner.start(&urls);
    let mut status = agent.status();
    let watchdog = watch_disconnects(agent.status(), disconnect_warning, exit_on_disconnect, json);
    let mut gave_up = None;
    tokio::select! {
        result = agent.closed() => return result.map_err(Into::into),
        () = wait_for_signal() => {}
        err = watchdog => gave_up = Some(err),
        () = async {
            // Print the URLs again whenever the tunnel comes back after an outage.
            let mut was_connected = !urls.is_empty();
            while status.changed().await.is_ok() {
                let current = status.borrow().clone();
                match current {
                    relay_client::Status::Connected { public_urls } if !was_connected => {
                        banner.online(&public_urls);
                        was_connected = true;
                    }
                    relay_client::Status::Reconnecting { .. } if was_connected => {
                        banner.offline();
                        was_connected = false;
                    }
                    _ => {}
                }
            }
            std::future::pending::<()>().await
        } => {}
    }
    agent.shutdown().await?;
    match gave_up {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// Never lets an agent look alive while it is not: complains on stderr once
/// the link has been down for `warn_after` (and every minute after), and
/// returns the error to exit with once it has been down for `exit_after`.
async fn watch_disconnects(
    mut status: tokio::sync::watch::Receiver<relay_client::Status>,
    warn_after: std::time::Duration,
    exit_after: Option<std::time::Duration>,
    json: bool,
) -> anyhow::Error {
    use std::time::Duration;
    use tokio::time::{sleep_until, Instant};
    const REPEAT: Duration = Duration::from_secs(60);
    let down = |s: &relay_client::Status| matches!(s, relay_client::Status::Reconnecting { .. });
    loop {
        // Wait for the link to go down.
        while !down(&status.borrow_and_update()) {
            if status.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
        let since = Instant::now();
        let mut next_warning = since + warn_after;
        loop {
            let exit_at = exit_after.map(|d| since + d);
            let wake = exit_at.map_or(next_warning, |e| e.min(next_warning));
            tokio::select! {
                changed = status.changed() => {
                    if changed.is_err() {
                        return std::future::pending().await;
                    }
                    if !down(&status.borrow()) {
                        break;
                    }
                }
                () = sleep_until(wake) => {
                    let secs = since.elapsed().as_secs();
                    let reason = match &*status.borrow() {
                        relay_client::Status::Reconnecting { last_error } => last_error.clone(),
                        _ => String::new(),
                    };
                    if exit_at.is_some_and(|e| Instant::now() >= e) {
                        return anyhow::anyhow!(
                            "not connected to the relay for {secs}s ({reason}); exiting as --exit-on-disconnect asks"
                        );
                    }
                    tracing::error!(down_for_s = secs, reason = %reason, "not connected to the relay");
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({ "type": "disconnected", "down_for_s": secs, "reason": reason })
                        );
                    } else {
                        eprintln!(
                            "\n!!! NOT CONNECTED to the relay for {secs}s ({reason}).\n!!! Webhooks are not reaching this machine; the relay answers senders 503 until the agent is back.\n"
                        );
                    }
                    next_warning += REPEAT;
                }
            }
        }
    }
}

/// What `relay-client http` prints about the tunnel itself, as text for
/// people or as JSON lines (`--log-format json`).
struct Banner {
    json: bool,
    tunnel: String,
    target: String,
    inspector: Option<String>,
}

impl Banner {
    fn start(&self, urls: &[String]) {
        if self.json {
            let line = serde_json::json!({
                "type": "started",
                "tunnel": self.tunnel,
                "public_urls": urls,
                "target": self.target,
                "inspector": self.inspector,
            });
            println!("{line}");
            return;
        }
        println!("Hookrelay agent   (Ctrl-C to quit)\n");
        println!("  tunnel      {}", self.tunnel);
        if urls.is_empty() {
            println!("  forwarding  (waiting for the relay) -> {}", self.target);
        }
        for url in urls {
            println!("  forwarding  {url} -> {}", self.target);
        }
        if let Some(inspector) = &self.inspector {
            println!("  inspector   {inspector}");
        }
        println!();
    }

    fn online(&self, urls: &[String]) {
        if self.json {
            let line = serde_json::json!({ "type": "online", "public_urls": urls });
            println!("{line}");
        } else {
            for url in urls {
                println!("  forwarding  {url} -> {}", self.target);
            }
        }
    }

    fn offline(&self) {
        if self.json {
            println!("{}", serde_json::json!({ "type": "offline" }));
        }
        // Text mode: the reconnect warnings on stderr already say so.
    }
}

async fn backend(
    common: &relay_client::cli::CommonArgs,
    secrets: &[(hookrelay_shared::signature::Provider, String)],
) -> anyhow::Result<Backend> {
    Backend::open(&common.data_dir(), common.inspect(), secret_set(secrets)).await
}

async fn history(args: HistoryArgs) -> anyhow::Result<()> {
    let backend = backend(&args.common, &[]).await?;
    let before = args
        .before
        .as_deref()
        .map(str::parse::<ExchangeId>)
        .transpose()?;
    let page = backend
        .list(&args.filters.filter(), before, args.limit)
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&page)?);
    } else {
        commands::print_table(&page);
    }
    backend.close().await
}

async fn show(args: ShowArgs) -> anyhow::Result<()> {
    let backend = backend(&args.common, &[]).await?;
    let detail = backend.get(args.id.parse()?).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&detail)?);
    } else {
        commands::print_detail(&detail);
    }
    backend.close().await
}

async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let options = args.options().context("cannot read --body-file")?;
    let backend = backend(&args.common, &args.verify).await?;
    if args.resign && backend.is_api() && !args.verify.is_empty() {
        eprintln!("note: the running agent re-signs with its own --verify secrets");
    }
    let results: Vec<Result<relay_client::history::Exchange, String>> = if args.ids.is_empty() {
        if !args.filters.is_set() {
            anyhow::bail!("name exchanges to replay, or select them with filters (e.g. --status failed --since 1h)");
        }
        backend
            .replay_matching(&args.filters.filter(), &options)
            .await?
    } else {
        let mut out = Vec::new();
        for id in &args.ids {
            let id: ExchangeId = id.parse()?;
            out.push(
                backend
                    .replay(id, &options)
                    .await
                    .map_err(|e| format!("{e:#}")),
            );
        }
        out
    };
    let failures = results.iter().filter(|r| r.is_err()).count();
    if args.json {
        let ok: Vec<&relay_client::history::Exchange> =
            results.iter().filter_map(|r| r.as_ref().ok()).collect();
        println!("{}", serde_json::to_string_pretty(&ok)?);
    }
    for r in &results {
        match r {
            Ok(e) if !args.json => {
                let status = e
                    .status()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| e.error.clone().unwrap_or_default());
                println!(
                    "{}  replay of {}  {} {}  -> {status}",
                    e.id,
                    e.replay_of.map(|i| i.to_string()).unwrap_or_default(),
                    e.method,
                    e.path
                );
            }
            Ok(_) => {}
            Err(message) => eprintln!("error: {message}"),
        }
    }
    backend.close().await?;
    if results.is_empty() {
        eprintln!("nothing matched");
    }
    if failures > 0 {
        anyhow::bail!("{failures} of {} replays could not be sent", results.len());
    }
    Ok(())
}

async fn export(args: ExportArgs) -> anyhow::Result<()> {
    let backend = backend(&args.common, &[]).await?;
    let extra = relay_client::export::Redaction::new(&args.redact_headers);
    let text = backend
        .export(args.id.parse()?, args.format, args.show_secrets, &extra)
        .await?;
    println!("{text}");
    backend.close().await
}

fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .fmt_fields(hookrelay_shared::logfmt::PlainFields)
            .init();
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// `relay-client verify`: exit 0 valid, 1 invalid or stale or unsigned, 2 on
/// bad usage (unreadable body file, malformed header).
fn verify(args: VerifyArgs) -> ExitCode {
    use hookrelay_shared::signature::{self, SignedRequest, Verdict};
    let read = |path: &std::path::Path| -> std::io::Result<Vec<u8>> {
        if path.as_os_str() == "-" {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
            Ok(buf)
        } else {
            std::fs::read(path)
        }
    };
    let body = match read(&args.body_file) {
        Ok(body) => body,
        Err(err) => {
            eprintln!("error: cannot read {}: {err}", args.body_file.display());
            return ExitCode::from(2);
        }
    };
    let mut headers = Vec::new();
    for h in &args.headers {
        let Some((name, value)) = h.split_once(':') else {
            eprintln!("error: --header {h:?} is not `Name: value`");
            return ExitCode::from(2);
        };
        // Only the one space after the colon goes: a trailing space can be
        // the difference between a valid and a forged value.
        let value = value.strip_prefix(' ').unwrap_or(value);
        headers.push((name.trim().to_ascii_lowercase(), value.as_bytes().to_vec()));
    }
    let Some(provider) = args.provider.or_else(|| signature::detect(&headers)) else {
        // Nothing to check against: not valid, so exit 1 like any other failure.
        if args.json {
            println!("{}", serde_json::json!({ "verdict": "unsigned" }));
        } else {
            println!("unsigned: no signature header recognised (name the scheme with --provider)");
        }
        return ExitCode::FAILURE;
    };
    let now = args.now.unwrap_or_else(|| {
        i64::try_from(relay_client::history::now_ms() / 1000).unwrap_or(i64::MAX)
    });
    let secrets: Vec<&str> = args.secrets.iter().map(String::as_str).collect();
    let req = SignedRequest {
        headers: &headers,
        body: &body,
        url: args.url.as_deref(),
    };
    let tolerance = args.tolerance.or(provider.default_tolerance_s());
    let verdict = signature::verify(provider, &secrets, &req, now, tolerance);
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&verdict).unwrap_or_else(|_| "{}".into())
        );
    } else {
        match &verdict {
            Verdict::Valid { provider } => println!("valid ({provider})"),
            Verdict::Invalid { provider, reason } => println!("invalid ({provider}): {reason}"),
            Verdict::Stale { provider, age_s } => {
                println!("stale ({provider}): signed {age_s} s ago, outside the tolerance")
            }
            other => println!("{}", serde_json::to_string(other).unwrap_or_default()),
        }
    }
    if matches!(verdict, Verdict::Valid { .. }) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
