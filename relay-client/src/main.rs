//! `relay-client`: argv and environment into a [`Config`](relay_client::Config),
//! Ctrl-C and SIGTERM into a graceful shutdown, fatal errors into a non-zero exit.

use std::process::ExitCode;

use clap::Parser;
use relay_client::{
    cli::{Cli, Command, HttpArgs},
    Agent,
};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.command {
        Command::Http(args) => http(args).await,
        Command::Demo(args) => relay_client::demo::run(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn http(args: HttpArgs) -> anyhow::Result<()> {
    let config = args.to_config();
    let target = config.target.clone();
    let mut agent = Agent::spawn(config).await?;
    println!("Hookrelay agent   (Ctrl-C to quit)\n");
    println!("  tunnel      {}", agent.tunnel());
    let urls = agent.public_urls();
    if urls.is_empty() {
        println!("  forwarding  (waiting for the relay) -> {target}");
    }
    for url in &urls {
        println!("  forwarding  {url} -> {target}");
    }
    if let Some(addr) = agent.inspector_addr() {
        println!("  inspector   http://{addr}");
    }
    println!();
    let mut status = agent.status();
    tokio::select! {
        result = agent.closed() => return result.map_err(Into::into),
        () = wait_for_signal() => {}
        () = async {
            // Print the URLs again whenever the tunnel comes back after an outage.
            let mut was_connected = !urls.is_empty();
            while status.changed().await.is_ok() {
                let current = status.borrow().clone();
                match current {
                    relay_client::Status::Connected { public_urls } if !was_connected => {
                        for url in public_urls {
                            println!("  forwarding  {url} -> {target}");
                        }
                        was_connected = true;
                    }
                    relay_client::Status::Reconnecting { .. } => was_connected = false,
                    _ => {}
                }
            }
            std::future::pending::<()>().await
        } => {}
    }
    agent.shutdown().await?;
    Ok(())
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
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
