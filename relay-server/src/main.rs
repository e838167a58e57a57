//! `relay-server`: argv and environment into a [`Config`](relay_server::Config),
//! Ctrl-C and SIGTERM into a graceful shutdown.

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use hookrelay_shared::open_files;
use relay_server::{
    auth::TokenStore,
    cli::{Cli, Command, LogFormat, TokenCommand},
    Relay,
};

mod queue_cli;

/// jemalloc instead of glibc's malloc (configured in `.cargo/config.toml`):
/// about a fifth less CPU per request through the tunnel, and freed memory
/// goes back to the system instead of staying in glibc's per-thread arenas
/// (README, Benchmarks).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One thread for everything unless TOKIO_WORKER_THREADS asks for a pool
    // of workers, as for the agent: a delivery crosses several tasks (the
    // sender's connection, quinn's endpoint and connection drivers, the
    // delivery stream), and with one worker per core each hand-over can wake
    // another thread. A current-thread runtime rather than a pool of one:
    // the pool's worker runs a task it has just woken next (its LIFO slot),
    // so quinn's connection driver ran after each request's stream write and
    // sent one datagram per webhook; queued behind the other ready
    // connections, it sends the data of several in one go (README,
    // Benchmarks). Blocking work (flushes, large queued bodies' commits)
    // runs on the blocking pool.
    let mut runtime = if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    runtime.enable_all();
    match runtime.build() {
        Ok(runtime) => match runtime.block_on(run(cli)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        },
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::Token { command }) = &cli.command {
        let dir = cli
            .resolved_data_dir()
            .unwrap_or_else(|e| exit_usage(&e.to_string()));
        return token_command(&TokenStore::open(&dir)?, command);
    }
    if let Some(Command::Queue { command }) = &cli.command {
        let config = cli
            .to_config()
            .unwrap_or_else(|e| exit_usage(&e.to_string()));
        return queue_cli::run(&config, command).await;
    }
    let mut config = cli
        .to_config()
        .unwrap_or_else(|e| exit_usage(&e.to_string()));
    init_tracing(config.log_format);
    fit_connections(&mut config);
    let dev = config.dev;
    let relay = Relay::spawn(config)
        .await
        .context("cannot start the relay")?;
    if dev {
        let _ = relay.tokens().revoke("dev");
        let pattern = "*".parse().context("pattern")?;
        let token = relay.tokens().create("dev", vec![pattern])?;
        println!("dev token:          {token}");
        match relay.cert_fingerprint() {
            Some(fingerprint) => {
                println!("relay cert sha256:  {fingerprint}");
                println!(
                    "connect an agent:   relay-client http 3000 --relay {} --token {token} --relay-cert-sha256 {fingerprint}",
                    relay.quic_addr(),
                );
            }
            None => println!(
                "connect an agent:   relay-client http 3000 --relay {} --token {token}",
                relay.quic_addr(),
            ),
        }
    }
    wait_for_signal(&relay).await;
    tracing::info!("shutting down");
    relay.shutdown().await;
    Ok(())
}

/// Raises the open-files limit and keeps the ingress connections under it,
/// so that a burst past the limit is answered `503` like one past
/// `--max-connections`, with descriptors left for the stores, rather than
/// running out of them. A connection holds two while it queues a body too
/// large for sled (its socket and the body's file): counted as one, 452 of
/// 900 webhooks of 256 KiB sent at once to a queueing tunnel under a limit
/// of 1,024 were answered `503` after their whole upload (`cannot write the
/// body … Too many open files`); now those past the cap are answered at
/// once, and every one let in is queued.
fn fit_connections(config: &mut relay_server::Config) {
    let Some(limit) = open_files::raise_logged() else {
        return;
    };
    let fits = open_files::fit(limit.now, 2, config.max_connections, MIN_CONNECTIONS);
    if fits < config.max_connections {
        tracing::warn!(
            open_files = limit.now,
            max_connections = fits,
            "the open-files limit ({}) leaves room for {fits} ingress connections, not {}: more are \
             answered 503; raise it (`ulimit -n`, systemd's LimitNOFILE=) to allow more",
            limit.now,
            config.max_connections,
        );
        config.max_connections = fits;
        config.max_connections_per_ip = config.max_connections_per_ip.min(fits);
    }
}

/// Ingress connections kept however low the open-files limit is.
const MIN_CONNECTIONS: usize = 64;

fn token_command(store: &TokenStore, command: &TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create { name, tunnels } => {
            let token = store.create(name, tunnels.clone())?;
            println!("{token}");
        }
        TokenCommand::List { json } => {
            let records = store.list()?;
            if *json {
                let out: Vec<_> = records
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "name": r.name,
                            "tunnels": r.tunnels.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
                            "created_at": r.created_at,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else if records.is_empty() {
                eprintln!("no tokens; create one with `relay-server token create --name NAME --tunnels 'NAME-*'`");
            } else {
                println!("{:<24} TUNNELS", "NAME");
                for r in records {
                    let tunnels: Vec<&str> = r.tunnels.iter().map(|p| p.as_str()).collect();
                    println!("{:<24} {}", r.name, tunnels.join(","));
                }
            }
        }
        TokenCommand::Revoke { name } => {
            if !store.revoke(name)? {
                anyhow::bail!("no token named {name:?}");
            }
            eprintln!("revoked token {name:?}");
        }
    }
    Ok(())
}

fn exit_usage(message: &str) -> ! {
    Cli::command()
        .error(clap::error::ErrorKind::ValueValidation, message)
        .exit()
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .fmt_fields(hookrelay_shared::logfmt::PlainFields)
            .init(),
    }
}

/// Returns on Ctrl-C or SIGTERM; on SIGHUP reads the certificate files again
/// (what certbot's deploy hook sends after a renewal).
async fn wait_for_signal(relay: &Relay) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(mut term), Ok(mut hup)) => loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => return,
                    _ = term.recv() => return,
                    _ = hup.recv() => reload_tls(relay),
                }
            },
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = relay;
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(unix)]
fn reload_tls(relay: &Relay) {
    match relay.reload_tls() {
        Ok(true) => tracing::info!(
            fingerprint = relay.cert_fingerprint(),
            "SIGHUP: new certificate in use"
        ),
        Ok(false) => tracing::info!("SIGHUP: certificate unchanged"),
        Err(err) => tracing::error!(
            error = &err as &dyn std::error::Error,
            "SIGHUP: cannot reload the certificate; keeping the current one"
        ),
    }
}
