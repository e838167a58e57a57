//! `hookrelay-bench queue`: how fast the relay accepts webhooks into a
//! tunnel's store-and-forward queue while the agent is offline (each `202`
//! comes after the webhook is flushed to disk), how fast a returning agent
//! drains them into the local app, and how much memory the relay and the
//! agent use meanwhile.
//!
//! 1. A token and a relay (`relay-server`) in a temporary directory, on
//!    ports the kernel picks.
//! 2. A local app in this process that answers 200 `{"ok":true}` and counts.
//! 3. The agent (`relay-client http`) connects once so the tunnel exists,
//!    and is stopped with SIGTERM; the relay then has no tunnel online.
//! 4. Fill: `--count` webhooks of `--body-bytes` posted by `--concurrency`
//!    senders over keep-alive connections; every answer must be `202`.
//! 5. The admin API must show all of them queued.
//! 6. Drain: the agent starts again; the drain time runs from its start to
//!    the app's last request, then the relay's queue must empty.
//! 7. Both stopped with SIGTERM; the figures printed.
//!
//! The relay's RSS is sampled every 100 ms from `/proc/PID/status` during
//! the fill and the drain (peaks), and read once with the full backlog; the
//! agent's during the drain.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use serde_json::json;

use crate::{
    app::App,
    binaries::Binaries,
    client,
    process::{command, status_kib, stop_all, temp_dir, Proc, RssSampler, Stream},
};

const TUNNEL: &str = "bench";
/// The relay's defaults for `--queue-max-count` and `--queue-max-bytes`;
/// raised only when the run needs more.
const DEFAULT_QUEUE_MAX_COUNT: u64 = 100_000;
const DEFAULT_QUEUE_MAX_BYTES: u64 = 1 << 30;
/// One answer to one webhook, at most.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the relay's queue is looked at during the drain.
const QUEUE_POLL: Duration = Duration::from_millis(250);
/// Said on stderr when the drain makes no progress for this long.
const STALL_WARNING: Duration = Duration::from_secs(30);

#[derive(clap::Args)]
pub struct QueueArgs {
    /// Webhooks to queue, then drain
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) count: u64,

    /// Body size of each webhook in bytes (JSON padded to this size)
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(0..=25 * 1024 * 1024))]
    pub(crate) body_bytes: u64,

    /// Senders posting at once, each over its own keep-alive connection
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub(crate) concurrency: u64,

    /// Most seconds the fill may take, and the drain as well
    #[arg(long, default_value_t = 600, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) timeout: u64,

    /// Where to create the temporary directory for the relay's and the
    /// agent's data [default: the system's temporary directory]
    #[arg(long, value_name = "DIR")]
    pub(crate) tmp_dir: Option<PathBuf>,
}

/// The figures of one run.
pub(crate) struct Results {
    enqueue: Duration,
    latency_us: Latency,
    agent_connected: Duration,
    first_delivery: Option<Duration>,
    drain: Duration,
    /// From the agent's start until the relay's queue was seen empty.
    handed_over: Option<Duration>,
    pub(crate) app_requests: u64,
    /// With the tunnel registered and its agent gone, before the fill.
    pub(crate) relay_before_fill_kib: Option<u64>,
    pub(crate) relay_fill_peak_kib: Option<u64>,
    pub(crate) relay_idle_kib: Option<u64>,
    pub(crate) relay_drain_peak_kib: Option<u64>,
    pub(crate) relay_hwm_kib: Option<u64>,
    pub(crate) agent_drain_peak_kib: Option<u64>,
    pub(crate) agent_hwm_kib: Option<u64>,
    load_before: Option<f64>,
    load_after: Option<f64>,
}

pub async fn run(binaries: &Binaries, args: &QueueArgs, json: bool) -> anyhow::Result<()> {
    let results = measure(binaries, args).await?;
    if json {
        println!("{}", to_json(args, &results));
    } else {
        print!("{}", table(args, &results));
    }
    Ok(())
}

/// One whole run: fill, idle, drain; the processes stopped, the figures
/// returned (the `memory` benchmark takes its backlog figures from here).
pub(crate) async fn measure(binaries: &Binaries, args: &QueueArgs) -> anyhow::Result<Results> {
    let limit = Duration::from_secs(args.timeout);
    // Declared first, so dropped last: after every process is killed.
    let dir = temp_dir(args.tmp_dir.as_deref())?;
    let relay_dir = dir.path().join("relay");
    let agent_dir = dir.path().join("agent");

    // 1. Token and relay.
    let token = create_token(binaries, &relay_dir).await?;
    let mut relay = Relay::start(binaries, &relay_dir, args).await?;
    eprintln!(
        "relay pid {}: http {} quic {} admin {}; data in {}",
        relay.proc.pid(),
        relay.http,
        relay.quic,
        relay.admin,
        dir.path().display()
    );
    let relay_rss = RssSampler::start(relay.proc.pid());

    // 2. The local app.
    let app = App::spawn(args.count).await?;

    // 3. The tunnel exists once an agent held it; then the agent leaves.
    let agent_command = || {
        let mut cmd = command(&binaries.relay_client);
        cmd.args(["http", &app.addr().to_string()])
            .args(["--relay", &relay.quic.to_string()])
            .args(["--token", &token, "--tunnel", TUNNEL])
            .args(["--relay-cert-sha256", &relay.fingerprint])
            .args(["--no-inspect", "--quiet", "--data-dir"])
            .arg(&agent_dir);
        cmd
    };
    let (mut agent, _) = Proc::spawn(
        "relay-client",
        agent_command(),
        Stream::Stdout,
        "forwarding",
    )
    .await
    .context("registering the tunnel")?;
    stop_all(vec![("relay-client (registration)", &mut agent)]).await?;
    drop(agent);
    until_offline(relay.admin).await?;

    // 4. Fill.
    eprintln!(
        "fill: {} webhooks of {} B, {} senders",
        args.count, args.body_bytes, args.concurrency
    );
    let load_before = load_average();
    let relay_before_fill_kib = status_kib(relay.proc.pid(), "VmRSS");
    relay_rss.take_peak();
    let posts = Posts {
        http: relay.http,
        count: args.count,
        body_bytes: usize::try_from(args.body_bytes).context("--body-bytes")?,
        concurrency: args.concurrency,
        expect: http::StatusCode::ACCEPTED,
        label: "fill",
        watch: vec![("relay", relay.proc.pid())],
    };
    let filled = tokio::time::timeout(limit, post_all(&posts))
        .await
        .map_err(|_| anyhow::anyhow!("the fill did not finish within {limit:?}"))??;
    let relay_fill_peak_kib = relay_rss.take_peak();
    relay.proc.check_running()?;
    anyhow::ensure!(
        app.requests() == 0,
        "the app got {} requests while the agent was offline",
        app.requests()
    );

    // 5. All of them queued; the relay's memory with the full backlog.
    let list = client::get_json(relay.admin, "/api/queue").await?;
    let queued = list
        .as_array()
        .and_then(|tunnels| tunnels.iter().find(|t| t["tunnel"] == TUNNEL))
        .and_then(|t| t["count"].as_u64());
    anyhow::ensure!(
        queued == Some(args.count),
        "{} webhooks were accepted, but the relay's /api/queue shows {list}",
        args.count
    );
    let relay_idle_kib = status_kib(relay.proc.pid(), "VmRSS");

    // 6. Drain.
    eprintln!("drain: starting the agent again");
    relay_rss.take_peak();
    let drain_start = Instant::now();
    let (mut agent, _) = Proc::spawn(
        "relay-client",
        agent_command(),
        Stream::Stdout,
        "forwarding",
    )
    .await
    .context("starting the agent for the drain")?;
    let agent_connected = drain_start.elapsed();
    let agent_rss = RssSampler::start(agent.pid());
    let deadline = drain_start + limit;
    let mut progress = Progress::new(
        "drain",
        args.count,
        vec![("relay", relay.proc.pid()), ("agent", agent.pid())],
    );
    let mut last_change = (0, Instant::now(), false);
    // The relay's side of the drain: its queue empties as the agent
    // acknowledges webhooks stored in its own outbox, ahead of the app.
    let mut relay_queued = args.count;
    let mut relay_emptied_at = None;
    let mut last_poll = Instant::now();
    loop {
        let n = app.requests();
        if relay_emptied_at.is_none() && last_poll.elapsed() >= QUEUE_POLL {
            last_poll = Instant::now();
            relay_queued = queued_count(relay.admin).await?;
            if relay_queued == 0 {
                relay_emptied_at = Some(last_poll);
            }
        }
        progress.update(n, &format!(", relay queue {relay_queued}"));
        if n >= args.count {
            break;
        }
        relay.proc.check_running()?;
        agent.check_running()?;
        if n != last_change.0 {
            last_change = (n, Instant::now(), false);
        } else if last_change.1.elapsed() >= STALL_WARNING && !last_change.2 {
            last_change.2 = true;
            eprintln!(
                "warning: no webhook reached the app for {STALL_WARNING:?} ({n} of {}); relay's last lines:\n{}agent's last lines:\n{}",
                args.count,
                relay.proc.log().tail(),
                agent.log().tail()
            );
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the drain did not finish within {limit:?}: {n} of {} at the app (raise --timeout); relay's last lines:\n{}agent's last lines:\n{}",
            args.count,
            relay.proc.log().tail(),
            agent.log().tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last_at = app.reached_at().unwrap_or_else(Instant::now);
    let drain = last_at.duration_since(drain_start);
    let first_delivery = app.first_at().map(|t| t.duration_since(drain_start));
    // Acknowledged ones leave the relay's queue.
    let empty_deadline = deadline.max(Instant::now() + Duration::from_secs(60));
    loop {
        let list = client::get_json(relay.admin, "/api/queue").await?;
        if list == json!([]) {
            relay_emptied_at.get_or_insert_with(Instant::now);
            break;
        }
        anyhow::ensure!(
            Instant::now() < empty_deadline,
            "the app got all {} webhooks, but the relay's queue still shows {list}",
            args.count
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let handed_over = relay_emptied_at.map(|t| t.duration_since(drain_start));
    let relay_drain_peak_kib = relay_rss.take_peak();
    let agent_drain_peak_kib = agent_rss.take_peak();
    let relay_hwm_kib = status_kib(relay.proc.pid(), "VmHWM");
    let agent_hwm_kib = status_kib(agent.pid(), "VmHWM");
    let load_after = load_average();
    // Anything delivered twice would show up by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let app_requests = app.requests();
    if app_requests != args.count {
        eprintln!(
            "warning: the app got {app_requests} requests for {} queued webhooks",
            args.count
        );
    }

    // 7. Stop both; report.
    drop(agent_rss);
    drop(relay_rss);
    stop_all(vec![
        ("relay-client", &mut agent),
        ("relay-server", &mut relay.proc),
    ])
    .await?;

    Ok(Results {
        enqueue: filled.elapsed,
        latency_us: filled.latency_us,
        agent_connected,
        first_delivery,
        drain,
        handed_over,
        app_requests,
        relay_before_fill_kib,
        relay_fill_peak_kib,
        relay_idle_kib,
        relay_drain_peak_kib,
        relay_hwm_kib,
        agent_drain_peak_kib,
        agent_hwm_kib,
        load_before,
        load_after,
    })
}

/// `relay-server token create`: the token.
pub(crate) async fn create_token(binaries: &Binaries, relay_dir: &Path) -> anyhow::Result<String> {
    let output = command(&binaries.relay_server)
        .args(["token", "create", "--data-dir"])
        .arg(relay_dir)
        .args(["--name", "bench", "--tunnels", "*"])
        .output()
        .await
        .context("running relay-server token create")?;
    anyhow::ensure!(
        output.status.success(),
        "relay-server token create failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout)
        .context("the token is not UTF-8")?
        .trim()
        .to_owned();
    anyhow::ensure!(
        !token.is_empty(),
        "relay-server token create printed no token"
    );
    Ok(token)
}

/// The running `relay-server` and what its "relay listening" line says.
pub(crate) struct Relay {
    pub proc: Proc,
    pub http: SocketAddr,
    /// The HTTPS ingress, when started with `--https`.
    pub https: Option<SocketAddr>,
    pub quic: SocketAddr,
    pub admin: SocketAddr,
    pub fingerprint: String,
}

impl Relay {
    async fn start(binaries: &Binaries, dir: &Path, args: &QueueArgs) -> anyhow::Result<Relay> {
        let mut extra = Vec::new();
        if args.count > DEFAULT_QUEUE_MAX_COUNT {
            extra.extend(["--queue-max-count".to_owned(), args.count.to_string()]);
        }
        let bytes = args.count.saturating_mul(args.body_bytes);
        if bytes > DEFAULT_QUEUE_MAX_BYTES {
            extra.extend(["--queue-max-bytes".to_owned(), bytes.to_string()]);
        }
        Self::start_with(binaries, dir, &extra).await
    }

    /// The relay on loopback ports the kernel picks, with `extra` flags.
    pub(crate) async fn start_with(
        binaries: &Binaries,
        dir: &Path,
        extra: &[String],
    ) -> anyhow::Result<Relay> {
        Self::start_cmd(command(&binaries.relay_server), dir, extra).await
    }

    /// [`Relay::start_with`] from `cmd`, the relay's command as far as the
    /// binary (and whatever starts it, e.g. `sh` for a `ulimit`).
    pub(crate) async fn start_cmd(
        mut cmd: tokio::process::Command,
        dir: &Path,
        extra: &[String],
    ) -> anyhow::Result<Relay> {
        cmd.arg("--data-dir").arg(dir).args([
            "--http",
            "127.0.0.1:0",
            "--quic",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ]);
        cmd.args(extra);
        let (proc, line) =
            Proc::spawn("relay-server", cmd, Stream::Stderr, "relay listening").await?;
        let addr = |key: &str| -> anyhow::Result<SocketAddr> {
            field(&line, key)?
                .parse()
                .with_context(|| format!("{key} in {line:?}"))
        };
        Ok(Relay {
            http: addr("http_addr")?,
            https: line
                .contains("https_addr=")
                .then(|| addr("https_addr"))
                .transpose()?,
            quic: addr("quic_addr")?,
            admin: addr("admin_addr")?,
            fingerprint: field(&line, "fingerprint")?,
            proc,
        })
    }
}

/// The value of `key=value` in a log line (quotes removed).
fn field(line: &str, key: &str) -> anyhow::Result<String> {
    let needle = format!("{key}=");
    let start = line
        .find(&needle)
        .with_context(|| format!("no {key} in {line:?}"))?
        + needle.len();
    Ok(line[start..]
        .split_whitespace()
        .next()
        .unwrap_or("")
        .trim_matches('"')
        .to_owned())
}

/// How many webhooks the relay holds for the tunnel, from `/api/queue`
/// (which leaves out tunnels with none).
async fn queued_count(admin: SocketAddr) -> anyhow::Result<u64> {
    let list = client::get_json(admin, "/api/queue").await?;
    let tunnels = list
        .as_array()
        .with_context(|| format!("/api/queue is not a list: {list}"))?;
    match tunnels.iter().find(|t| t["tunnel"] == TUNNEL) {
        None => Ok(0),
        Some(t) => t["count"]
            .as_u64()
            .with_context(|| format!("/api/queue has no count for {TUNNEL}: {list}")),
    }
}

/// Waits until the relay routes no tunnel: the departed agent's goodbye is
/// read, so webhooks are queued rather than forwarded.
async fn until_offline(admin: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + crate::process::PROCESS_WAIT;
    loop {
        let health = client::get_json(admin, "/healthz").await?;
        if health["tunnels_online"] == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the relay still shows a tunnel online after the agent exited: {health}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Prints "label: 10% …" on stderr each time another tenth is done: the
/// overall rate, the rate since the last line, and the RSS of `watch`.
struct Progress {
    label: &'static str,
    total: u64,
    watch: Vec<(&'static str, u32)>,
    next_tenth: u64,
    start: Instant,
    last: (u64, Instant),
}

impl Progress {
    fn new(label: &'static str, total: u64, watch: Vec<(&'static str, u32)>) -> Progress {
        let now = Instant::now();
        Progress {
            label,
            total,
            watch,
            next_tenth: 1,
            start: now,
            last: (0, now),
        }
    }

    fn update(&mut self, done: u64, extra: &str) {
        let mut crossed = false;
        while self.next_tenth <= 10 && done.saturating_mul(10) >= self.next_tenth * self.total {
            self.next_tenth += 1;
            crossed = true;
        }
        if crossed {
            let now = Instant::now();
            let secs = now.duration_since(self.start).as_secs_f64();
            let recent = per_sec(
                done - self.last.0,
                now.duration_since(self.last.1).as_secs_f64(),
            );
            self.last = (done, now);
            let rss: String = self
                .watch
                .iter()
                .map(|(name, pid)| format!(", {name} RSS {}", show_mib(status_kib(*pid, "VmRSS"))))
                .collect();
            eprintln!(
                "{}: {:>3}% ({done}/{}) {secs:.1} s, {:.0}/s overall, {recent:.0}/s lately{rss}{extra}",
                self.label,
                (self.next_tenth - 1) * 10,
                self.total,
                per_sec(done, secs),
            );
        }
    }
}

/// The 1-minute load average: other work on the machine skews the figures.
pub(crate) fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// Latency percentiles, in microseconds.
#[derive(Clone, Copy, Default)]
pub(crate) struct Latency {
    pub(crate) p50: u64,
    pub(crate) p90: u64,
    pub(crate) p99: u64,
    pub(crate) max: u64,
}

impl Latency {
    pub(crate) fn of(mut samples: Vec<u64>) -> Latency {
        samples.sort_unstable();
        let at = |p: usize| {
            let i = (samples.len() * p / 100).min(samples.len().saturating_sub(1));
            samples.get(i).copied().unwrap_or(0)
        };
        Latency {
            p50: at(50),
            p90: at(90),
            p99: at(99),
            max: samples.last().copied().unwrap_or(0),
        }
    }
}

pub(crate) struct Filled {
    pub(crate) elapsed: Duration,
    latency_us: Latency,
}

/// What [`post_all`] sends: `count` webhooks of `body_bytes` to tunnel
/// `bench` at `http`, from `concurrency` senders.
pub(crate) struct Posts {
    pub(crate) http: SocketAddr,
    pub(crate) count: u64,
    pub(crate) body_bytes: usize,
    pub(crate) concurrency: u64,
    /// The answer every webhook must get.
    pub(crate) expect: http::StatusCode,
    /// Names the progress lines on stderr.
    pub(crate) label: &'static str,
    /// Processes whose RSS the progress lines show.
    pub(crate) watch: Vec<(&'static str, u32)>,
}

/// What the senders share.
struct FillState {
    http: SocketAddr,
    count: u64,
    body_bytes: usize,
    expect: http::StatusCode,
    next: AtomicU64,
    done: AtomicU64,
    failures: AtomicU64,
    stop: AtomicBool,
    first_failure: OnceLock<String>,
}

/// Posts every webhook; each must be answered `posts.expect`.
pub(crate) async fn post_all(posts: &Posts) -> anyhow::Result<Filled> {
    let state = Arc::new(FillState {
        http: posts.http,
        count: posts.count,
        body_bytes: posts.body_bytes,
        expect: posts.expect,
        next: AtomicU64::new(0),
        done: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        first_failure: OnceLock::new(),
    });
    let start = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..posts.concurrency {
        senders.spawn(sender(state.clone()));
    }
    // In a set of its own, so that it is aborted if the fill is abandoned.
    let mut reporter = tokio::task::JoinSet::new();
    {
        let state = state.clone();
        let (label, watch) = (posts.label, posts.watch.clone());
        reporter.spawn(async move {
            let mut progress = Progress::new(label, state.count, watch);
            loop {
                let done = state.done.load(Ordering::Relaxed);
                progress.update(done, "");
                if done >= state.count || state.stop.load(Ordering::Relaxed) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    let mut latencies = Vec::with_capacity(usize::try_from(posts.count).unwrap_or(0));
    let mut error = None;
    while let Some(joined) = senders.join_next().await {
        match joined {
            Ok(Ok(mut samples)) => latencies.append(&mut samples),
            Ok(Err(e)) => {
                state.stop.store(true, Ordering::SeqCst);
                error.get_or_insert(e);
            }
            Err(e) => {
                state.stop.store(true, Ordering::SeqCst);
                error.get_or_insert(anyhow::Error::new(e).context("a sender panicked"));
            }
        }
    }
    let elapsed = start.elapsed();
    state.stop.store(true, Ordering::SeqCst);
    while reporter.join_next().await.is_some() {}
    let failures = state.failures.load(Ordering::SeqCst);
    if failures > 0 {
        anyhow::bail!(
            "{failures} webhook(s) were not answered {} ({} were); the first: {}",
            posts.expect.as_u16(),
            state.done.load(Ordering::SeqCst),
            state.first_failure.get().map(String::as_str).unwrap_or("?")
        );
    }
    if let Some(e) = error {
        return Err(e.context(format!(
            "the {} stopped after {} webhooks",
            posts.label,
            state.done.load(Ordering::SeqCst)
        )));
    }
    let done = state.done.load(Ordering::SeqCst);
    anyhow::ensure!(
        done == posts.count,
        "only {done} of {} webhooks were sent",
        posts.count
    );
    Ok(Filled {
        elapsed,
        latency_us: Latency::of(latencies),
    })
}

/// One sender: takes the next webhook number until none are left, over one
/// keep-alive connection (a new one if the relay closed it). Returns the
/// latency of each webhook in microseconds.
async fn sender(state: Arc<FillState>) -> anyhow::Result<Vec<u64>> {
    let mut samples = Vec::new();
    let mut conn: Option<client::Conn> = None;
    let host = state.http.to_string();
    while !state.stop.load(Ordering::Relaxed) {
        let i = state.next.fetch_add(1, Ordering::Relaxed);
        if i >= state.count {
            break;
        }
        let request = http::Request::post(format!("/t/{TUNNEL}/n/{i}"))
            .header(http::header::HOST, host.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body(i, state.body_bytes)))?;
        let mut ready = match conn.take() {
            Some(mut c) => match c.ready().await {
                Ok(()) => c,
                Err(_) => client::connect(state.http).await?,
            },
            None => client::connect(state.http).await?,
        };
        let sent = Instant::now();
        let (status, answer) =
            tokio::time::timeout(REQUEST_TIMEOUT, client::send(&mut ready, request))
                .await
                .map_err(|_| anyhow::anyhow!("webhook {i}: no answer within {REQUEST_TIMEOUT:?}"))?
                .with_context(|| format!("webhook {i}"))?;
        samples.push(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX));
        if status != state.expect {
            state.failures.fetch_add(1, Ordering::SeqCst);
            state.stop.store(true, Ordering::SeqCst);
            let _ = state.first_failure.set(format!(
                "webhook {i}: {status} {}",
                String::from_utf8_lossy(&answer)
            ));
            break;
        }
        state.done.fetch_add(1, Ordering::Relaxed);
        conn = Some(ready);
    }
    Ok(samples)
}

/// Webhook `i`'s body: `{"n":i,"pad":"xxx…"}` of exactly `size` bytes (just
/// `x`s when `size` is too small for that).
fn body(i: u64, size: usize) -> Bytes {
    let head = format!("{{\"n\":{i},\"pad\":\"");
    let tail = "\"}";
    let mut bytes = Vec::with_capacity(size);
    if size >= head.len() + tail.len() {
        bytes.extend_from_slice(head.as_bytes());
        bytes.resize(size - tail.len(), b'x');
        bytes.extend_from_slice(tail.as_bytes());
    } else {
        bytes.resize(size, b'x');
    }
    Bytes::from(bytes)
}

pub(crate) fn mib(kib: Option<u64>) -> Option<f64> {
    kib.map(|k| (k as f64 / 1024.0 * 10.0).round() / 10.0)
}

pub(crate) fn show_mib(kib: Option<u64>) -> String {
    mib(kib).map_or_else(|| "n/a".to_owned(), |m| format!("{m:.1} MiB"))
}

fn ms(us: u64) -> f64 {
    (us as f64 / 100.0).round() / 10.0
}

fn rate(n: u64, d: Duration) -> f64 {
    per_sec(n, d.as_secs_f64()).round()
}

pub(crate) fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, usize::from)
}

fn load(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}"))
}

fn table(args: &QueueArgs, r: &Results) -> String {
    let secs = |d: Duration| format!("{:.1} s", d.as_secs_f64());
    let l = r.latency_us;
    let mut out = format!(
        "hookrelay queue benchmark: {} webhooks of {} B, {} senders\n",
        args.count, args.body_bytes, args.concurrency
    );
    out += &format!(
        "enqueue (202 after fsync)  {:>7} webhooks/s {:>7}\n",
        rate(args.count, r.enqueue),
        secs(r.enqueue)
    );
    if let Some(d) = r.handed_over {
        out += &format!(
            "relay queue to the agent   {:>7} webhooks/s {:>7}   (acknowledged into its outbox)\n",
            rate(args.count, d),
            secs(d)
        );
    }
    out += &format!(
        "drain to the local app     {:>7} webhooks/s {:>7}\n",
        rate(args.count, r.drain),
        secs(r.drain)
    );
    out += &format!(
        "relay RSS: peak {} during fill, {} idle with {} queued, peak {} during drain (VmHWM {})\n",
        show_mib(r.relay_fill_peak_kib),
        show_mib(r.relay_idle_kib),
        args.count,
        show_mib(r.relay_drain_peak_kib),
        show_mib(r.relay_hwm_kib)
    );
    out += &format!(
        "agent RSS: peak {} during drain (VmHWM {})\n",
        show_mib(r.agent_drain_peak_kib),
        show_mib(r.agent_hwm_kib)
    );
    out += &format!(
        "202 latency: p50 {} ms, p90 {} ms, p99 {} ms, max {} ms\n",
        ms(l.p50),
        ms(l.p90),
        ms(l.p99),
        ms(l.max)
    );
    out += &format!(
        "drain: agent connected after {:.2} s, first webhook at the app after {} (the relay's queue is polled every {} ms)\n",
        r.agent_connected.as_secs_f64(),
        r.first_delivery
            .map_or_else(|| "n/a".to_owned(), |d| format!("{:.2} s", d.as_secs_f64())),
        QUEUE_POLL.as_millis()
    );
    out += &format!(
        "machine: {} CPUs, load average {} before the fill, {} after the drain\n",
        cpus(),
        load(r.load_before),
        load(r.load_after)
    );
    if r.app_requests != args.count {
        out += &format!(
            "the app got {} requests for {} webhooks\n",
            r.app_requests, args.count
        );
    }
    out
}

fn to_json(args: &QueueArgs, r: &Results) -> serde_json::Value {
    let secs = |d: Duration| (d.as_secs_f64() * 1000.0).round() / 1000.0;
    let l = r.latency_us;
    json!({
        "benchmark": "queue",
        "count": args.count,
        "body_bytes": args.body_bytes,
        "concurrency": args.concurrency,
        "enqueue": {
            "webhooks_per_sec": rate(args.count, r.enqueue),
            "secs": secs(r.enqueue),
            "latency_ms": { "p50": ms(l.p50), "p90": ms(l.p90), "p99": ms(l.p99), "max": ms(l.max) },
        },
        "drain": {
            "webhooks_per_sec": rate(args.count, r.drain),
            "secs": secs(r.drain),
            "agent_connected_secs": secs(r.agent_connected),
            "first_delivery_secs": r.first_delivery.map(secs),
            "relay_queue_empty_secs": r.handed_over.map(secs),
            "relay_queue_webhooks_per_sec": r.handed_over.map(|d| rate(args.count, d)),
            "app_requests": r.app_requests,
        },
        "relay_rss_mib": {
            "fill_peak": mib(r.relay_fill_peak_kib),
            "idle_full": mib(r.relay_idle_kib),
            "drain_peak": mib(r.relay_drain_peak_kib),
            "hwm": mib(r.relay_hwm_kib),
        },
        "agent_rss_mib": {
            "drain_peak": mib(r.agent_drain_peak_kib),
            "hwm": mib(r.agent_hwm_kib),
        },
        "machine": {
            "cpus": cpus(),
            "load_average_before": r.load_before,
            "load_average_after": r.load_after,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_the_exact_size_and_are_json_when_they_can_be() {
        for size in [0, 5, 13, 14, 1024] {
            assert_eq!(body(7, size).len(), size);
        }
        let big = body(12345, 1024);
        let parsed: serde_json::Value = serde_json::from_slice(&big).expect("JSON");
        assert_eq!(parsed["n"], 12345);
    }

    #[test]
    fn fields_of_the_listening_line() {
        let line = r#"INFO relay_server::relay: relay listening http_addr=127.0.0.1:1 quic_addr=127.0.0.1:2 admin_addr=127.0.0.1:3 fingerprint="ab12""#;
        assert_eq!(field(line, "quic_addr").expect("field"), "127.0.0.1:2");
        assert_eq!(field(line, "fingerprint").expect("field"), "ab12");
        assert!(field(line, "nope").is_err());
    }

    #[test]
    fn percentiles() {
        let l = Latency::of((1..=100).collect());
        assert_eq!((l.p50, l.p90, l.p99, l.max), (51, 91, 100, 100));
        assert_eq!(Latency::of(Vec::new()).max, 0);
    }
}
