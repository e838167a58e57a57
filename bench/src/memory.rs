//! `hookrelay-bench memory`: the relay's and the agent's resident memory in
//! the four situations of issue 8, each against its target.
//!
//! 1. **Uploads**: `--uploads` HTTP/1.1 POSTs of 256 KiB to one tunnel on the
//!    relay's public port, each sending the first half of its body and then
//!    held until all of them are in flight (the local app has every request's
//!    head and the first half of every body: they went through the relay and
//!    the agent); held for `--hold` seconds, then finished. Every answer must be `200`. The
//!    relay's peak RSS over the whole phase, against its RSS before (the
//!    agent connected, nothing in flight). The relay runs with
//!    `--max-connections-per-ip` and `--max-connections` above the upload
//!    count, and `--body-timeout`, `--timeout` longer than the phase and
//!    `--min-body-rate 0`, so that its abuse limits do not cut the test short;
//!    there is no per-source rate limit by default.
//! 2. **Backlog**: the `queue` benchmark with `--backlog` webhooks of 1 KiB
//!    ([`crate::queue::measure`]): the relay's peak while the queue fills and
//!    idles full, and its peak while the queue drains into the agent. Then
//!    the same with `--large-backlog` webhooks of 256 KiB (2,000: 500 MiB
//!    queued), bodies too large for sled values: the relay's peak over the
//!    whole run and the agent's while it drains them, held to the same
//!    128 MiB as the relay's other figures (issue 8 sets none for them).
//! 3. **History**: an agent with `--max-exchanges` raised to `--history`
//!    records that many exchanges of 1 KiB forwarded live through the relay
//!    (32 senders, each answer `200`): its peak RSS while recording; then it
//!    is restarted on the same store and its whole history is listed through
//!    the inspector's `GET /api/exchanges`, page by page: its peak RSS then.
//! 4. **Outbox**: an agent whose outbox holds `--outbox` webhooks of 1 KiB
//!    (queued webhooks taken from the relay and not yet delivered: written
//!    here through the agent's own [`Outbox`], as the agent writes them)
//!    starts with its app down, so that they stay waiting: the time from its
//!    start until it holds its tunnel (`/readyz`), against the same agent's
//!    start on an empty store, and its peak RSS over the first
//!    [`OUTBOX_WATCH`] (the outbox's tidying up runs then).
//! 5. **Idle agents**: `--agents` QUIC connections from this process, each
//!    speaking the real protocol as `relay-client` does (pinned certificate,
//!    hello with the token for its own tunnel, welcome, queue stream, the
//!    agent's keep-alive and idle timeout), then idle for `--idle` seconds
//!    while the relay's `/healthz` must count every tunnel online. Per agent:
//!    (the relay's peak RSS with them all connected − its RSS with none) / N.
//!
//! Each scenario has its own relay (and agent) in its own directory; every
//! process is stopped when its scenario ends. `0` for a count skips that
//! scenario. RSS is sampled every 100 ms from `/proc/PID/status`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::{watch, Semaphore},
};

use crate::{
    app::App,
    binaries::Binaries,
    client,
    process::{command, status_kib, stop_all, temp_dir, Proc, RssSampler, Stream, PROCESS_WAIT},
    queue::{self, cpus, create_token, load_average, show_mib, Posts, Relay},
    quic,
};

/// Issue 8's memory target for the relay and the agent.
const TARGET_RSS_KIB: u64 = 128 * 1024;
/// Issue 8's target for one idle agent's cost to the relay.
const TARGET_PER_AGENT_BYTES: f64 = 100.0 * 1024.0;
/// Body of each upload.
const UPLOAD_BYTES: usize = 256 * 1024;
/// What each upload sends before it is held.
const HELD_BYTES: usize = UPLOAD_BYTES / 2;
/// Connections (uploads, agents) being opened at once.
const OPENING_AT_ONCE: usize = 64;
/// Body size of each recorded exchange and queued webhook.
const SMALL_BODY: u64 = 1024;
/// Senders filling the history.
const HISTORY_SENDERS: u64 = 32;
/// Page size when listing the history (the inspector's most).
const PAGE: u64 = 500;
/// How long the agent with a full outbox is watched after it is ready.
const OUTBOX_WATCH: Duration = Duration::from_secs(5);
/// Longest wait for one upload's answer once it is released.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest response head read from the relay.
const MAX_HEAD: usize = 64 * 1024;
/// Time for a process to settle before its baseline is read.
const SETTLE: Duration = Duration::from_secs(1);
/// File descriptors beyond two per upload, for everything else.
const FD_MARGIN: u64 = 512;

#[derive(clap::Args)]
pub struct MemoryArgs {
    /// Concurrent 256 KiB uploads held in flight at once (0 skips them)
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(0..=16_384))]
    uploads: u64,

    /// Webhooks of 1 KiB queued for an offline agent (0 skips the backlog)
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    backlog: u64,

    /// Webhooks of 256 KiB queued for an offline agent, then drained: bodies
    /// that do not fit a sled value (0 skips them)
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    large_backlog: u64,

    /// Exchanges of 1 KiB recorded in the agent's history (0 skips it)
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    history: u64,

    /// Webhooks of 1 KiB waiting in the agent's outbox when it starts (0
    /// skips them)
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    outbox: u64,

    /// Idle agents connected to one relay (0 skips them)
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(0..=16_384))]
    agents: u64,

    /// Seconds the uploads are held mid-body once all are in flight
    #[arg(long, default_value_t = 5, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=600))]
    hold: u64,

    /// Seconds the agents stay connected and idle while the relay is
    /// measured (beyond the 10 s idle timeout, keep-alives hold them)
    #[arg(long, default_value_t = 15, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=600))]
    idle: u64,

    /// Most seconds one phase may take (a fill, a drain, the listing…)
    #[arg(long, default_value_t = 600, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,

    /// Where to create the temporary directory [default: the system's]
    #[arg(long, value_name = "DIR")]
    tmp_dir: Option<PathBuf>,
}

/// What a figure is held to.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// Peak RSS below this many KiB.
    Peak(u64),
    /// RSS added per unit below this many bytes.
    PerUnit(f64),
}

/// One line of the table.
struct Row {
    /// Stable key for the JSON output.
    key: &'static str,
    scenario: String,
    process: &'static str,
    baseline_kib: Option<u64>,
    peak_kib: Option<u64>,
    /// (peak − baseline) / units, in bytes.
    per_unit_bytes: Option<f64>,
    unit: &'static str,
    target: Target,
}

impl Row {
    fn new(
        key: &'static str,
        scenario: String,
        process: &'static str,
        (baseline_kib, peak_kib): (Option<u64>, Option<u64>),
        (units, unit): (u64, &'static str),
        target: Target,
    ) -> Row {
        let per_unit_bytes = match (baseline_kib, peak_kib) {
            (Some(b), Some(p)) if units > 0 => Some((p as f64 - b as f64) * 1024.0 / units as f64),
            _ => None,
        };
        Row {
            key,
            scenario,
            process,
            baseline_kib,
            peak_kib,
            per_unit_bytes,
            unit,
            target,
        }
    }

    /// Whether the figure meets its target; `None` when it was not measured.
    fn pass(&self) -> Option<bool> {
        match self.target {
            Target::Peak(kib) => self.peak_kib.map(|p| p < kib),
            Target::PerUnit(bytes) => self.per_unit_bytes.map(|u| u < bytes),
        }
    }

    fn target_text(&self) -> String {
        match self.target {
            Target::Peak(kib) => format!("peak < {} MiB", kib / 1024),
            Target::PerUnit(bytes) => format!("< {}/{}", show_bytes(bytes), self.unit),
        }
    }
}

/// Everything the run measured.
struct Report {
    rows: Vec<Row>,
    /// How each scenario ran, one line each.
    notes: Vec<String>,
    load_before: Option<f64>,
    load_after: Option<f64>,
}

pub async fn run(binaries: &Binaries, args: &MemoryArgs, json_out: bool) -> anyhow::Result<()> {
    let dir = temp_dir(args.tmp_dir.as_deref())?;
    let mut report = Report {
        rows: Vec::new(),
        notes: Vec::new(),
        load_before: load_average(),
        load_after: None,
    };
    if args.uploads > 0 {
        eprintln!("memory: {} uploads of 256 KiB in flight", args.uploads);
        uploads(binaries, args, &dir.path().join("uploads"), &mut report).await?;
    }
    if args.backlog > 0 {
        eprintln!("memory: a backlog of {} queued webhooks", args.backlog);
        backlog(binaries, args, &dir.path().join("backlog"), &mut report).await?;
    }
    if args.large_backlog > 0 {
        eprintln!(
            "memory: a backlog of {} queued webhooks of 256 KiB",
            args.large_backlog
        );
        large_backlog(binaries, args, &dir.path().join("large"), &mut report).await?;
    }
    if args.history > 0 {
        eprintln!("memory: {} exchanges in the agent's history", args.history);
        history(binaries, args, &dir.path().join("history"), &mut report).await?;
    }
    if args.outbox > 0 {
        eprintln!("memory: {} webhooks in the agent's outbox", args.outbox);
        outbox(binaries, args, &dir.path().join("outbox"), &mut report).await?;
    }
    if args.agents > 0 {
        eprintln!("memory: {} idle agents", args.agents);
        idle_agents(binaries, args, &dir.path().join("agents"), &mut report).await?;
    }
    report.load_after = load_average();
    if json_out {
        println!("{}", to_json(args, &report));
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

/// The agent (`relay-client http`) for tunnel `bench` in front of `app`.
fn agent_command(
    binaries: &Binaries,
    relay: &Relay,
    token: &str,
    app: SocketAddr,
    data_dir: &Path,
) -> tokio::process::Command {
    let mut cmd = command(&binaries.relay_client);
    cmd.args(["http", &app.to_string()])
        .args(["--relay", &relay.quic.to_string()])
        .args(["--token", token, "--tunnel", "bench"])
        .args(["--relay-cert-sha256", &relay.fingerprint])
        .args(["--quiet", "--data-dir"])
        .arg(data_dir);
    cmd
}

// ---------------------------------------------------------------------------
// 1. Uploads in flight

/// What the uploads share.
struct Uploads {
    http: SocketAddr,
    body: Bytes,
    /// Opening connections and sending first halves, a few at a time.
    opening: Semaphore,
    /// Uploads whose first half is written.
    held: AtomicU64,
    failed: AtomicU64,
    first_failure: OnceLock<String>,
}

impl Uploads {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        let _ = self.first_failure.set(what);
    }
}

async fn uploads(
    binaries: &Binaries,
    args: &MemoryArgs,
    dir: &Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    let n = args.uploads;
    // Two per upload: here its sender's socket and the app's, and the relay
    // (which inherits the limit) lets in half its limit less 128.
    check_open_files(n.saturating_mul(2).saturating_add(FD_MARGIN))?;
    let limit = Duration::from_secs(args.timeout);
    let relay_dir = dir.join("relay");
    let token = create_token(binaries, &relay_dir).await?;
    // Long enough for the whole phase: the relay must not time the held
    // bodies (or the app's answers to them) out.
    let patience = format!("{}s", args.hold + 2 * args.timeout);
    let flags: Vec<String> = vec![
        "--max-connections-per-ip".into(),
        (n + 64).to_string(),
        "--max-connections".into(),
        (n + 64).max(4096).to_string(),
        "--body-timeout".into(),
        patience.clone(),
        "--min-body-rate".into(),
        "0".into(),
        "--timeout".into(),
        patience,
    ];
    let mut relay = Relay::start_with(binaries, &relay_dir, &flags).await?;
    let app = App::spawn(n).await?;
    let (mut agent, _) = Proc::spawn(
        "relay-client",
        {
            let mut cmd = agent_command(binaries, &relay, &token, app.addr(), &dir.join("agent"));
            cmd.arg("--no-inspect");
            cmd
        },
        Stream::Stdout,
        "forwarding",
    )
    .await
    .context("starting the agent")?;
    eprintln!(
        "relay pid {} (http {}), agent pid {}",
        relay.proc.pid(),
        relay.http,
        agent.pid()
    );
    tokio::time::sleep(SETTLE).await;
    let pid = relay.proc.pid();
    let baseline = status_kib(pid, "VmRSS");
    let sampler = RssSampler::start(pid);

    let shared = Arc::new(Uploads {
        http: relay.http,
        body: Bytes::from(vec![b'x'; UPLOAD_BYTES]),
        opening: Semaphore::new(OPENING_AT_ONCE),
        held: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        first_failure: OnceLock::new(),
    });
    let (release, released) = watch::channel(false);
    let started = Instant::now();
    let deadline = started + limit;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (shared, released) = (shared.clone(), released.clone());
        tasks.spawn(async move {
            let result = upload(i, &shared, released).await;
            if let Err(e) = &result {
                shared.fail(format!("upload {i}: {e:#}"));
            }
            result
        });
    }

    // All first halves written, and through the relay and the agent.
    let held_bytes = n * HELD_BYTES as u64;
    loop {
        let failed = shared.failed.load(Ordering::SeqCst);
        anyhow::ensure!(
            failed == 0,
            "{failed} upload(s) failed before all were in flight; the first: {}; relay's last lines:\n{}",
            shared.first_failure.get().map_or("?", String::as_str),
            relay.proc.log().tail()
        );
        relay.proc.check_running()?;
        agent.check_running()?;
        let held = shared.held.load(Ordering::SeqCst);
        let (started, through) = (app.started(), app.body_bytes());
        if held == n && started == n && through >= held_bytes {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not all uploads were in flight within {limit:?}: {held} of {n} sent their first half, the app has {started} of them and {through} of {held_bytes} body bytes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_in_flight = started.elapsed();
    let in_flight_kib = status_kib(pid, "VmRSS");
    eprintln!(
        "uploads: all {n} in flight after {:.1} s, relay RSS {}; holding them {} s",
        all_in_flight.as_secs_f64(),
        show_mib(in_flight_kib),
        args.hold
    );
    tokio::time::sleep(Duration::from_secs(args.hold)).await;
    anyhow::ensure!(
        app.requests() == 0,
        "the app answered {} uploads before their bodies were complete",
        app.requests()
    );
    relay.proc.check_running()?;

    // Let them finish.
    release
        .send(true)
        .context("the uploads are gone before their release")?;
    let mut answered_200 = 0;
    let mut other = Vec::new();
    let finished = tokio::time::timeout_at(deadline.into(), async {
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(200)) => answered_200 += 1,
                Ok(Ok(status)) => other.push(status.to_string()),
                Ok(Err(e)) => other.push(format!("{e:#}")),
                Err(e) => other.push(format!("panicked: {e}")),
            }
        }
    })
    .await;
    anyhow::ensure!(
        finished.is_ok(),
        "the uploads did not finish within {limit:?} ({answered_200} answered 200)"
    );
    let peak = sampler.take_peak();
    let hwm = status_kib(pid, "VmHWM");
    anyhow::ensure!(
        answered_200 == n,
        "{} of {n} uploads were not answered 200; the first: {}",
        other.len(),
        other.first().map_or("?", String::as_str)
    );
    let agent_hwm = status_kib(agent.pid(), "VmHWM");
    drop(sampler);
    stop_all(vec![
        ("relay-client", &mut agent),
        ("relay-server", &mut relay.proc),
    ])
    .await?;

    report.rows.push(Row::new(
        "uploads",
        format!("{n} uploads of 256 KiB in flight"),
        "relay",
        (baseline, peak),
        (n, "upload"),
        Target::Peak(TARGET_RSS_KIB),
    ));
    report.notes.push(format!(
        "uploads: all {n} in flight after {:.1} s (the app had every head and first half, {} MiB), held {} s, then all answered 200 after {:.1} s in all; relay RSS {} with all in flight, VmHWM {}; agent VmHWM {}. Relay flags: {}",
        all_in_flight.as_secs_f64(),
        held_bytes / (1024 * 1024),
        args.hold,
        started.elapsed().as_secs_f64(),
        show_mib(in_flight_kib),
        show_mib(hwm),
        show_mib(agent_hwm),
        flags.join(" ")
    ));
    Ok(())
}

/// One upload: the head and the first half of the body, then (once
/// released) the rest; the status of the answer.
async fn upload(
    i: u64,
    shared: &Uploads,
    mut released: watch::Receiver<bool>,
) -> anyhow::Result<u16> {
    let permit = shared.opening.acquire().await?;
    let mut tcp = tokio::net::TcpStream::connect(shared.http)
        .await
        .with_context(|| format!("connecting to {}", shared.http))?;
    tcp.set_nodelay(true)?;
    let head = format!(
        "POST /t/bench/upload/{i} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {UPLOAD_BYTES}\r\n\r\n",
        shared.http
    );
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(&shared.body[..HELD_BYTES]).await?;
    drop(permit);
    shared.held.fetch_add(1, Ordering::SeqCst);
    released
        .wait_for(|go| *go)
        .await
        .context("the release never came")?;
    let answer = async {
        tcp.write_all(&shared.body[HELD_BYTES..]).await?;
        read_status(&mut tcp).await
    };
    tokio::time::timeout(ANSWER_TIMEOUT, answer)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {ANSWER_TIMEOUT:?}"))?
}

/// Reads a response head; its status code.
async fn read_status(tcp: &mut tokio::net::TcpStream) -> anyhow::Result<u16> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        anyhow::ensure!(
            head.len() < MAX_HEAD,
            "a response head over {MAX_HEAD} bytes"
        );
        let read = tcp.read(&mut buf).await?;
        anyhow::ensure!(
            read > 0,
            "the relay closed the connection without a full answer: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.extend_from_slice(&buf[..read]);
    }
    let text = String::from_utf8_lossy(&head);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP/1.1 answer: {text:?}"))
}

/// The sum of every series of `name` in a metrics exposition.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.rsplit_once('}')?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

/// Raises this process's open-files limit to its hard limit, as the relay
/// and the agent it starts do theirs, and fails early, with what to do, when
/// that is below `need`.
fn check_open_files(need: u64) -> anyhow::Result<()> {
    let limit = hookrelay_shared::open_files::raise().context("raising the open-files limit")?;
    anyhow::ensure!(
        limit.now >= need,
        "the open-files limit is {} at most (the hard limit); this many uploads need {need}: raise it \
         with `ulimit -Hn {need}` (as root) first, or pass a smaller --uploads",
        limit.now
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. Queue backlog

async fn backlog(
    binaries: &Binaries,
    args: &MemoryArgs,
    dir: &Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    let n = args.backlog;
    let r = queue_run(binaries, args, dir, n, SMALL_BODY, report).await?;
    let full = match (r.relay_fill_peak_kib, r.relay_idle_kib) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    report.rows.push(Row::new(
        "backlog_fill",
        format!("{n} webhooks queued (fill, idle)"),
        "relay",
        (r.relay_before_fill_kib, full),
        (n, "webhook"),
        Target::Peak(TARGET_RSS_KIB),
    ));
    report.rows.push(Row::new(
        "backlog_drain",
        format!("{n} queued webhooks drained"),
        "relay",
        (r.relay_idle_kib, r.relay_drain_peak_kib),
        (n, "webhook"),
        Target::Peak(TARGET_RSS_KIB),
    ));
    Ok(())
}

/// The queue benchmark with `args.large_backlog` bodies of 256 KiB: the
/// relay while they are queued and drained, the agent while it drains them.
async fn large_backlog(
    binaries: &Binaries,
    args: &MemoryArgs,
    dir: &Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    let n = args.large_backlog;
    let r = queue_run(binaries, args, dir, n, UPLOAD_BYTES as u64, report).await?;
    let peak = [
        r.relay_fill_peak_kib,
        r.relay_idle_kib,
        r.relay_drain_peak_kib,
    ]
    .into_iter()
    .flatten()
    .max();
    report.rows.push(Row::new(
        "large_backlog",
        format!("{n} of 256 KiB queued, drained"),
        "relay",
        (r.relay_before_fill_kib, peak),
        (n, "webhook"),
        Target::Peak(TARGET_RSS_KIB),
    ));
    report.rows.push(Row::new(
        "large_backlog_agent",
        format!("{n} of 256 KiB drained"),
        "agent",
        (None, r.agent_drain_peak_kib),
        (n, "webhook"),
        Target::Peak(TARGET_RSS_KIB),
    ));
    Ok(())
}

/// The queue benchmark with `n` webhooks of `body_bytes` (32 senders) in
/// `dir`, noted in the report.
async fn queue_run(
    binaries: &Binaries,
    args: &MemoryArgs,
    dir: &Path,
    n: u64,
    body_bytes: u64,
    report: &mut Report,
) -> anyhow::Result<queue::Results> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let queue_args = queue::QueueArgs {
        count: n,
        body_bytes,
        concurrency: 32,
        timeout: args.timeout,
        tmp_dir: Some(dir.to_owned()),
    };
    let r = queue::measure(binaries, &queue_args).await?;
    report.notes.push(format!(
        "backlog: the queue benchmark with {n} webhooks of {body_bytes} B (32 senders): relay {} idle with all {n} queued, VmHWM {}; the agent peaked at {} during the drain; the app got {} requests",
        show_mib(r.relay_idle_kib),
        show_mib(r.relay_hwm_kib),
        show_mib(r.agent_drain_peak_kib),
        r.app_requests
    ));
    Ok(r)
}

// ---------------------------------------------------------------------------
// 3. History

async fn history(
    binaries: &Binaries,
    args: &MemoryArgs,
    dir: &Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    let n = args.history;
    let limit = Duration::from_secs(args.timeout);
    let relay_dir = dir.join("relay");
    let agent_dir = dir.join("agent");
    let token = create_token(binaries, &relay_dir).await?;
    let mut relay = Relay::start_with(binaries, &relay_dir, &[]).await?;
    let app = App::spawn(n).await?;
    let max_exchanges = n.max(10_000).to_string();
    let start_agent = || {
        let mut cmd = agent_command(binaries, &relay, &token, app.addr(), &agent_dir);
        cmd.args(["--max-exchanges", &max_exchanges]);
        start_inspected(cmd)
    };

    // Fill.
    let (mut agent, _) = start_agent().await?;
    eprintln!(
        "relay pid {} (http {}), agent pid {} with --max-exchanges {max_exchanges}",
        relay.proc.pid(),
        relay.http,
        agent.pid()
    );
    tokio::time::sleep(SETTLE).await;
    let before_fill = status_kib(agent.pid(), "VmRSS");
    let sampler = RssSampler::start(agent.pid());
    let posts = Posts {
        http: relay.http,
        count: n,
        body_bytes: usize::try_from(SMALL_BODY)?,
        concurrency: HISTORY_SENDERS,
        expect: http::StatusCode::OK,
        label: "history",
        watch: vec![("agent", agent.pid()), ("relay", relay.proc.pid())],
    };
    let filled = tokio::time::timeout(limit, queue::post_all(&posts))
        .await
        .map_err(|_| anyhow::anyhow!("recording {n} exchanges took over {limit:?}"))??;
    let fill_peak = sampler.take_peak();
    let fill_hwm = status_kib(agent.pid(), "VmHWM");
    drop(sampler);
    anyhow::ensure!(
        app.requests() == n,
        "the app got {} requests for {n} webhooks",
        app.requests()
    );
    stop_all(vec![("relay-client", &mut agent)]).await?;
    drop(agent);

    // Restart on the same store; list everything.
    let restarting = Instant::now();
    let (mut agent, inspector) = start_agent().await?;
    let restarted_in = restarting.elapsed();
    tokio::time::sleep(SETTLE).await;
    let restarted = status_kib(agent.pid(), "VmRSS");
    let sampler = RssSampler::start(agent.pid());
    let listing = Instant::now();
    let deadline = listing + limit;
    let mut listed = 0u64;
    let mut before: Option<String> = None;
    let most_pages = n / PAGE + 10;
    for _ in 0..most_pages {
        let path = match &before {
            Some(id) => format!("/api/exchanges?limit={PAGE}&before={id}"),
            None => format!("/api/exchanges?limit={PAGE}"),
        };
        let page = client::get_json(inspector, &path).await?;
        listed += page["exchanges"]
            .as_array()
            .with_context(|| format!("GET {path}: no exchanges in {page}"))?
            .len() as u64;
        match page["next_before"].as_str() {
            Some(id) => before = Some(id.to_owned()),
            None => break,
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "listing the history took over {limit:?} ({listed} listed)"
        );
    }
    let listed_in = listing.elapsed();
    let list_peak = sampler.take_peak();
    drop(sampler);
    if listed != n {
        eprintln!("warning: the restarted agent lists {listed} exchanges, not {n}");
    }
    // The slow filter, with a text no body holds: every body is read.
    let searching = Instant::now();
    let found = client::get_json(inspector, "/api/exchanges?q=no-body-holds-this&limit=50").await?;
    let searched_in = searching.elapsed();
    anyhow::ensure!(
        found["exchanges"].as_array().is_some_and(Vec::is_empty),
        "a search for a text no body holds found {found}"
    );
    stop_all(vec![
        ("relay-client", &mut agent),
        ("relay-server", &mut relay.proc),
    ])
    .await?;

    report.rows.push(Row::new(
        "history_fill",
        format!("{n} exchanges recorded"),
        "agent",
        (before_fill, fill_peak),
        (n, "exchange"),
        Target::Peak(TARGET_RSS_KIB),
    ));
    report.rows.push(Row::new(
        "history_list",
        format!("restarted, {listed} exchanges listed"),
        "agent",
        (restarted, list_peak),
        (listed, "exchange"),
        Target::Peak(TARGET_RSS_KIB),
    ));
    report.notes.push(format!(
        "history: agent with --max-exchanges {max_exchanges}; {n} POSTs of {SMALL_BODY} B through the relay ({HISTORY_SENDERS} senders, all 200) in {:.1} s, agent VmHWM {}; restarted, it held its tunnel after {:.2} s and listed {listed} exchanges in pages of {PAGE} in {:.1} s; a body search through all of them took {:.2} s",
        filled.elapsed.as_secs_f64(),
        show_mib(fill_hwm),
        restarted_in.as_secs_f64(),
        listed_in.as_secs_f64(),
        searched_in.as_secs_f64()
    ));
    Ok(())
}

// ---------------------------------------------------------------------------
// 4. Outbox

async fn outbox(
    binaries: &Binaries,
    args: &MemoryArgs,
    dir: &Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    let n = args.outbox;
    let relay_dir = dir.join("relay");
    let agent_dir = dir.join("agent");
    let token = create_token(binaries, &relay_dir).await?;
    let mut relay = Relay::start_with(binaries, &relay_dir, &[]).await?;
    // A port nothing listens on: the webhooks wait for the app.
    let app_down = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let start_agent = |data_dir: PathBuf| {
        let cmd = agent_command(binaries, &relay, &token, app_down, &data_dir);
        async move {
            let started = Instant::now();
            let (agent, inspector) = start_inspected(cmd).await?;
            anyhow::Ok((agent, inspector, started.elapsed()))
        }
    };

    // The same agent on an empty store, for comparison.
    let (mut agent, _, empty_start) = start_agent(dir.join("empty")).await?;
    stop_all(vec![("relay-client", &mut agent)]).await?;
    drop(agent);

    let filling = Instant::now();
    fill_outbox(&agent_dir, n).await?;
    let filled_in = filling.elapsed();

    let (mut agent, inspector, full_start) = start_agent(agent_dir).await?;
    let sampler = RssSampler::start(agent.pid());
    let status = client::get_json(inspector, "/api/status").await?;
    tokio::time::sleep(OUTBOX_WATCH).await;
    let peak = sampler.take_peak();
    drop(sampler);
    stop_all(vec![
        ("relay-client", &mut agent),
        ("relay-server", &mut relay.proc),
    ])
    .await?;
    anyhow::ensure!(
        status["queued_waiting"] == n,
        "the agent reports {} webhooks waiting, not {n}: {status}",
        status["queued_waiting"]
    );
    report.rows.push(Row::new(
        "outbox",
        format!("restarted, {n} webhooks waiting"),
        "agent",
        (None, peak),
        (n, "webhook"),
        Target::Peak(TARGET_RSS_KIB),
    ));
    report.notes.push(format!(
        "outbox: {n} webhooks of {SMALL_BODY} B written to the agent's outbox in {:.1} s; the agent held its tunnel {:.2} s after its start with them waiting, {:.2} s on an empty store",
        filled_in.as_secs_f64(),
        full_start.as_secs_f64(),
        empty_start.as_secs_f64(),
    ));
    Ok(())
}

/// Writes `n` webhooks of [`SMALL_BODY`] into the outbox of the agent
/// store in `data_dir`, flushing every thousand as the agent does.
async fn fill_outbox(data_dir: &Path, n: u64) -> anyhow::Result<()> {
    use hookrelay_shared::protocol::{DeliveryId, RequestHead};
    use relay_client::{
        history::{History, Retention},
        queued::Outbox,
    };

    let history = History::open(data_dir, Retention::default())?;
    let outbox = Outbox::open(&history)?;
    let body = vec![b'x'; usize::try_from(SMALL_BODY)?];
    for i in 0..n {
        let head = RequestHead {
            delivery_id: DeliveryId::new(),
            tunnel: "bench".parse()?,
            method: "POST".into(),
            path: format!("/webhook/{i}"),
            // A provider's usual dozen, as the relay forwards them.
            headers: (0..12)
                .map(|h| {
                    (
                        format!("x-bench-header-{h}"),
                        format!("value {h} of {i}").into_bytes(),
                    )
                })
                .collect(),
            remote_addr: ([127, 0, 0, 1], 40_000).into(),
            public_url: format!("http://bench.localhost/webhook/{i}"),
            received_at_ms: 1,
            timeout_ms: 30_000,
            body_len: Some(SMALL_BODY),
        };
        outbox.store(head, &body)?;
        if i % 1000 == 999 {
            outbox.flush().await?;
        }
    }
    outbox.flush().await?;
    history.close().await?;
    Ok(())
}

/// Starts the agent `cmd` with its inspector on a port the kernel picks,
/// and returns once the inspector says it holds its tunnel.
async fn start_inspected(mut cmd: tokio::process::Command) -> anyhow::Result<(Proc, SocketAddr)> {
    cmd.args(["--inspect", "127.0.0.1:0"]);
    let (agent, line) = Proc::spawn("relay-client", cmd, Stream::Stdout, "inspector")
        .await
        .context("starting the agent")?;
    let inspector: SocketAddr = line
        .split_whitespace()
        .last()
        .and_then(|url| url.strip_prefix("http://"))
        .and_then(|addr| addr.trim_end_matches('/').parse().ok())
        .with_context(|| format!("no inspector address in {line:?}"))?;
    until_ready(inspector).await?;
    Ok((agent, inspector))
}

/// Waits until the agent's inspector says it holds its tunnel.
async fn until_ready(inspector: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + PROCESS_WAIT;
    loop {
        match client::get_json(inspector, "/readyz").await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("the agent was not ready within {PROCESS_WAIT:?}")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

// ---------------------------------------------------------------------------
// 5. Idle agents

async fn idle_agents(
    binaries: &Binaries,
    args: &MemoryArgs,
    dir: &Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    let n = args.agents;
    let relay_dir = dir.join("relay");
    let token: Arc<str> = create_token(binaries, &relay_dir).await?.into();
    let mut relay = Relay::start_with(binaries, &relay_dir, &[]).await?;
    let pid = relay.proc.pid();
    eprintln!("relay pid {} (quic {})", pid, relay.quic);
    tokio::time::sleep(SETTLE).await;
    let baseline = status_kib(pid, "VmRSS");
    let sampler = RssSampler::start(pid);

    let endpoint = quic::endpoint(&relay.fingerprint)?;
    let opening = Arc::new(Semaphore::new(OPENING_AT_ONCE));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (endpoint, opening, token) = (endpoint.clone(), opening.clone(), token.clone());
        let quic_addr = relay.quic;
        tasks.spawn(async move {
            let _permit = opening.acquire().await?;
            quic::connect(&endpoint, quic_addr, &token, &format!("idle-{i}")).await
        });
    }
    let mut agents = Vec::new();
    let limit = Duration::from_secs(args.timeout);
    let joined = tokio::time::timeout(limit, async {
        while let Some(joined) = tasks.join_next().await {
            agents.push(joined.context("a connecting task panicked")??);
        }
        anyhow::Ok(())
    })
    .await;
    match joined {
        Ok(result) => result?,
        Err(_) => anyhow::bail!("{} of {n} agents connected within {limit:?}", agents.len()),
    }
    let connected_in = started.elapsed();
    until_online(relay.admin, n).await?;
    let connected_kib = status_kib(pid, "VmRSS");
    eprintln!(
        "agents: all {n} connected after {:.1} s, relay RSS {}; idle for {} s",
        connected_in.as_secs_f64(),
        show_mib(connected_kib),
        args.idle
    );

    // Idle, every one of them still connected at every look.
    let idle_start = Instant::now();
    while idle_start.elapsed() < Duration::from_secs(args.idle) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let closed = agents
            .iter()
            .filter(|a| a.connection.close_reason().is_some())
            .count();
        anyhow::ensure!(
            closed == 0,
            "{closed} of {n} idle agents were disconnected after {:.0} s idle",
            idle_start.elapsed().as_secs_f64()
        );
        relay.proc.check_running()?;
    }
    let health = client::get_json(relay.admin, "/healthz").await?;
    anyhow::ensure!(
        health["tunnels_online"] == n,
        "after {} s idle the relay reports {} tunnels online, not {n}",
        args.idle,
        health["tunnels_online"]
    );
    let metrics = client::get_text(relay.admin, "/metrics").await?;
    let gauge = metric_sum(&metrics, "hookrelay_relay_agents_connected");
    anyhow::ensure!(
        gauge == n as f64,
        "after {} s idle the relay's hookrelay_relay_agents_connected is {gauge}, not {n}",
        args.idle
    );
    // Datagrams the kernel dropped from the relay's full receive buffer
    // (Linux): each one an Initial or handshake packet waited out by a
    // retransmission while the agents connected.
    let drops = metric_sum(&metrics, "hookrelay_relay_quic_receive_drops_total");
    let peak = sampler.take_peak();
    let end_kib = status_kib(pid, "VmRSS");
    drop(sampler);

    for agent in &agents {
        agent.connection.close(0u32.into(), b"benchmark over");
    }
    drop(agents);
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
    stop_all(vec![("relay-server", &mut relay.proc)]).await?;

    report.rows.push(Row::new(
        "agents",
        format!("{n} idle agents connected"),
        "relay",
        (baseline, peak),
        (n, "agent"),
        Target::PerUnit(TARGET_PER_AGENT_BYTES),
    ));
    report.notes.push(format!(
        "agents: {n} QUIC connections from the benchmark, each with its own tunnel, hello, welcome and queue stream, connected in {:.1} s ({drops} datagrams dropped from the relay's full UDP receive buffer); after {} s idle all {n} still online (/healthz and hookrelay_relay_agents_connected); relay RSS {} with none, {} once connected, {} at the end",
        connected_in.as_secs_f64(),
        args.idle,
        show_mib(baseline),
        show_mib(connected_kib),
        show_mib(end_kib)
    ));
    Ok(())
}

/// Waits until the relay's `/healthz` counts `n` tunnels online.
async fn until_online(admin: SocketAddr, n: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + PROCESS_WAIT;
    loop {
        let health = client::get_json(admin, "/healthz").await?;
        if health["tunnels_online"] == n {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the relay reports {} tunnels online, not {n}: {health}",
            health["tunnels_online"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------
// Output

/// `12.3 KiB` from 12,595 bytes, `850 B` below one KiB.
fn show_bytes(bytes: f64) -> String {
    if bytes.abs() >= 1024.0 {
        format!("{:.1} KiB", bytes / 1024.0)
    } else {
        format!("{bytes:.0} B")
    }
}

fn mark(pass: Option<bool>) -> &'static str {
    match pass {
        Some(true) => "✓",
        Some(false) => "✗",
        None => "?",
    }
}

fn table(report: &Report) -> String {
    let load = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}"));
    let mut out = format!(
        "hookrelay memory benchmark: {} CPU(s), load average {} at the start, {} at the end\n\n",
        cpus(),
        load(report.load_before),
        load(report.load_after)
    );
    out += &format!(
        "{:<38} {:<7} {:>10} {:>10} {:>20}  {:<20}\n",
        "scenario", "process", "before", "peak", "per unit", "target"
    );
    for row in &report.rows {
        let per_unit = row.per_unit_bytes.map_or_else(
            || "n/a".to_owned(),
            |b| format!("{}/{}", show_bytes(b), row.unit),
        );
        out += &format!(
            "{:<38} {:<7} {:>10} {:>10} {:>20}  {:<20} {}\n",
            row.scenario,
            row.process,
            show_mib(row.baseline_kib),
            show_mib(row.peak_kib),
            per_unit,
            row.target_text(),
            mark(row.pass())
        );
    }
    out.push('\n');
    for note in &report.notes {
        out += note;
        out.push('\n');
    }
    out
}

fn to_json(args: &MemoryArgs, report: &Report) -> serde_json::Value {
    let mib = |kib: Option<u64>| queue::mib(kib);
    let rows: Vec<serde_json::Value> = report
        .rows
        .iter()
        .map(|row| {
            json!({
                "scenario": row.key,
                "describe": row.scenario,
                "process": row.process,
                "baseline_mib": mib(row.baseline_kib),
                "peak_mib": mib(row.peak_kib),
                "per_unit_kib": row.per_unit_bytes.map(|b| (b / 1024.0 * 100.0).round() / 100.0),
                "unit": row.unit,
                "target": row.target_text(),
                "pass": row.pass(),
            })
        })
        .collect();
    json!({
        "benchmark": "memory",
        "uploads": args.uploads,
        "backlog": args.backlog,
        "large_backlog": args.large_backlog,
        "history": args.history,
        "outbox": args.outbox,
        "agents": args.agents,
        "hold_s": args.hold,
        "idle_s": args.idle,
        "scenarios": rows,
        "all_pass": report.rows.iter().all(|r| r.pass() == Some(true)),
        "notes": report.notes,
        "machine": {
            "cpus": cpus(),
            "load_average_before": report.load_before,
            "load_average_after": report.load_after,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_series_are_summed() {
        let text = "# TYPE hookrelay_relay_request_bytes counter\n\
            hookrelay_relay_request_bytes_total{tunnel=\"a\"} 100\n\
            hookrelay_relay_request_bytes_total{tunnel=\"b\"} 23\n\
            hookrelay_relay_request_bytes_total_other 5\n\
            hookrelay_relay_agents_connected 7\n";
        assert_eq!(
            metric_sum(text, "hookrelay_relay_request_bytes_total"),
            123.0
        );
        assert_eq!(metric_sum(text, "hookrelay_relay_agents_connected"), 7.0);
        assert_eq!(metric_sum(text, "nothing"), 0.0);
    }

    #[test]
    fn rows_compare_with_their_targets() {
        let peak = Row::new(
            "x",
            "x".into(),
            "relay",
            (Some(10 * 1024), Some(200 * 1024)),
            (1000, "upload"),
            Target::Peak(TARGET_RSS_KIB),
        );
        assert_eq!(peak.pass(), Some(false));
        let per = Row::new(
            "y",
            "y".into(),
            "relay",
            (Some(10 * 1024), Some(60 * 1024)),
            (1000, "agent"),
            Target::PerUnit(TARGET_PER_AGENT_BYTES),
        );
        assert_eq!(per.per_unit_bytes, Some(50.0 * 1024.0 * 1024.0 / 1000.0));
        assert_eq!(per.pass(), Some(true));
        assert_eq!(per.target_text(), "< 100.0 KiB/agent");
        let none = Row::new(
            "z",
            "z".into(),
            "relay",
            (None, None),
            (1, "agent"),
            Target::Peak(1),
        );
        assert_eq!(none.pass(), None);
    }

    #[test]
    fn byte_figures_read_well() {
        assert_eq!(show_bytes(850.0), "850 B");
        assert_eq!(show_bytes(12_595.0), "12.3 KiB");
    }
}
