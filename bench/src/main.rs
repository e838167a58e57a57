//! `hookrelay-bench`: benchmarks that drive the real `relay-server` and
//! `relay-client` binaries on 127.0.0.1, the way an operator runs them.
//!
//! ```sh
//! cargo run --release -p hookrelay-bench -- queue                 # 100,000 webhooks of 1 KiB
//! cargo run --release -p hookrelay-bench -- queue --count 2000 --json
//! cargo run --release -p hookrelay-bench -- http                  # workloads a-d, 5 s each
//! cargo run --release -p hookrelay-bench -- http --runs 3 --peers # median of 3, with rathole and bore
//! cargo run --release -p hookrelay-bench -- memory                # issue 8's four memory targets
//! cargo run --release -p hookrelay-bench -- burst                 # 2,000 webhooks at once
//! ```
//!
//! Run it with `--release`: the benchmark itself is the load generator and the
//! local app, and a debug build of it would be measured along with the relay.
//!
//! # Which binaries are measured
//!
//! Before it starts anything, the benchmark runs
//! `cargo build --release -p relay-server -p relay-client --bins` itself,
//! against this workspace's manifest, with the cargo that runs it (`$CARGO`,
//! which `cargo run` sets, else the cargo that compiled this binary). So it
//! never measures stale or missing binaries, whatever was built before; when
//! they are up to date the build is a no-op. The paths of the executables are
//! read from cargo's JSON messages, so `CARGO_TARGET_DIR` and `--target-dir`
//! set in cargo's config are followed. Cargo's own progress goes to stderr.
//!
//! `--bin-dir DIR` skips the build and uses `DIR/relay-server` and
//! `DIR/relay-client` as they are (for binaries built elsewhere, or without the
//! sources at hand); the benchmark stops with a message naming the build
//! command when one of them is missing.
//!
//! # Processes and files
//!
//! Everything listens on 127.0.0.1 with ports chosen by the kernel, in a
//! fresh temporary directory (`--tmp-dir` picks where; it is deleted at the
//! end). Every process the benchmark starts is spawned with `kill_on_drop`, so
//! it is killed, by its PID, on every way out: success, error, timeout or
//! Ctrl-C. On success they are stopped with SIGTERM first. No other process is
//! ever signalled.
//!
//! Results go to stdout (a table, or one JSON object with `--json`); progress
//! and the relay's and agent's warnings go to stderr.

mod app;
mod binaries;
mod burst;
mod client;
mod http;
mod memory;
mod peers;
mod process;
mod queue;
mod quic;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "hookrelay-bench",
    version,
    about = "Benchmarks for Hookrelay's relay-server and relay-client"
)]
struct Cli {
    /// Print the results as one JSON object instead of a table
    #[arg(long, global = true)]
    json: bool,

    /// Use DIR/relay-server and DIR/relay-client as they are instead of
    /// building them with `cargo build --release`
    #[arg(long, global = true, value_name = "DIR")]
    bin_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Store-and-forward: fill a tunnel's queue while its agent is offline,
    /// then drain it into a local app; rates and memory
    Queue(queue::QueueArgs),
    /// Throughput, latency, CPU and memory of HTTP workloads a-d through the
    /// tunnel, against going straight to the app (and rathole/bore with --peers)
    Http(http::HttpArgs),
    /// Relay and agent memory against issue 8's targets: uploads in flight,
    /// a queue backlog, a long history, many idle agents
    Memory(memory::MemoryArgs),
    /// Many webhooks at once, each on a new connection, to an app that takes
    /// its time: every one answered and recorded, how long it took
    Burst(burst::BurstArgs),
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}`: the whole chain of causes, without a backtrace.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let binaries = binaries::locate(cli.bin_dir.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let work = async {
            match cli.command {
                Command::Queue(args) => queue::run(&binaries, &args, cli.json).await,
                Command::Http(args) => http::run(&binaries, &args, cli.json).await,
                Command::Memory(args) => memory::run(&binaries, &args, cli.json).await,
                Command::Burst(args) => burst::run(&binaries, &args, cli.json).await,
            }
        };
        // Leaving on Ctrl-C drops `work`, and with it every child process.
        tokio::select! {
            result = work => result,
            signal = tokio::signal::ctrl_c() => {
                signal.context("listening for Ctrl-C")?;
                anyhow::bail!("interrupted; the processes the benchmark started were killed")
            }
        }
    })
}
