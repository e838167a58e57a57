//! HTTP throughput and latency through the tunnel, against going straight to
//! the app in the same run (and, with `--peers`, against the raw TCP tunnels
//! rathole and bore).
//!
//! Four workloads, each driven for `--duration` after a `--warmup`, by this
//! process's own load generator (hyper HTTP/1.1 clients with TCP_NODELAY):
//!
//! - a: 1 KiB JSON POSTs over 64 keep-alive connections;
//! - b: 256 KiB POSTs over 16 keep-alive connections;
//! - c: 1 KiB POSTs one after the other over one connection (latency);
//! - d: 1 KiB POSTs, a new connection for each (`Connection: close`), 64 at
//!   once: how most webhook senders behave.
//!
//! Every target answers through the same local app (in this process), so the
//! ratio to "direct" is what the tunnel costs. The relay and the agent run as
//! the real release binaries with their defaults: history recording is on.
//! CPU time per request comes from `/proc/PID/stat` (user + system) of each
//! tunnel process over the measured interval; peak RSS is sampled every 100 ms.
//!
//! `--compare DIR` adds a second build as target `compared`, measured right
//! after this one in each workload of each run, and sets the two against each
//! other run by run ([`Paired`]): on a noisy machine the ratio within a run is
//! steadier than either figure across runs.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
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
    peers::{self, Peer},
    process::{command, status_kib, stop_all, temp_dir, Proc, RssSampler, Stream},
    queue::{create_token, Relay},
};

const TUNNEL: &str = "bench";
/// One answer to one request, at most.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A workload of the issue's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// 1 KiB POSTs, 64 keep-alive connections
    A,
    /// 256 KiB POSTs, 16 keep-alive connections
    B,
    /// 1 KiB POSTs, one connection, one at a time
    C,
    /// 1 KiB POSTs, a new connection for each, 64 at once
    D,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::A => "a",
            Workload::B => "b",
            Workload::C => "c",
            Workload::D => "d",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Workload::A => "1 KiB POSTs, 64 keep-alive connections",
            Workload::B => "256 KiB POSTs, 16 keep-alive connections",
            Workload::C => "1 KiB POSTs, one connection, sequential",
            Workload::D => "1 KiB POSTs, a new connection per request, 64 at once",
        }
    }

    fn body_bytes(self) -> usize {
        match self {
            Workload::B => 256 * 1024,
            _ => 1024,
        }
    }

    fn connections(self) -> usize {
        match self {
            Workload::A | Workload::D => 64,
            Workload::B => 16,
            Workload::C => 1,
        }
    }

    fn new_connection_each(self) -> bool {
        self == Workload::D
    }

    /// The issue's goal for Hookrelay, in words.
    fn goal(self) -> &'static str {
        match self {
            Workload::A => "ratio >= 0.40",
            Workload::B => "ratio >= 0.20, p99 < 15 ms",
            Workload::C => "p50 + <= 0.060 ms, p99 + <= 0.5 ms",
            Workload::D => "ratio >= 0.30",
        }
    }
}

#[derive(clap::Args)]
pub struct HttpArgs {
    /// Workloads to run, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "a,b,c,d")]
    workloads: Vec<Workload>,

    /// Measured seconds per workload and target
    #[arg(long, default_value_t = 5, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=600))]
    duration: u64,

    /// Warm-up seconds before each measurement (not counted)
    #[arg(long, default_value_t = 1, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=60))]
    warmup: u64,

    /// Runs of the whole set; the table shows the median of each figure
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=9))]
    runs: u64,

    /// Also measure rathole and bore (`cargo install rathole bore-cli`; found
    /// on PATH) as shipped
    #[arg(long)]
    peers: bool,

    /// Where to create the temporary directory [default: the system's]
    #[arg(long, value_name = "DIR")]
    tmp_dir: Option<PathBuf>,

    /// Also measure the relay-server and relay-client in DIR (an earlier
    /// build, say) as target `compared`, each workload right after this
    /// build's in every run, and print this build against it run by run
    #[arg(long, value_name = "DIR")]
    compare: Option<PathBuf>,
}

/// Name of the target `--compare` adds.
const COMPARED: &str = "compared";

/// This build against `--compare`'s for one workload: the median over the
/// runs of each run's ratio (or difference), so that a machine whose speed
/// drifts between runs moves both sides of every figure alike, with the
/// lowest and highest run beside it: a median inside the range the same
/// build gives against itself is noise.
#[derive(Clone, Debug)]
pub struct Paired {
    pub runs: usize,
    /// This build's req/s over the compared build's.
    pub req_per_s: Spread,
    /// This build's median latency minus the compared build's, in ms.
    pub p50_ms_delta: Spread,
    /// This build's p99 over the compared build's.
    pub p99: Spread,
    /// This build's CPU per request over the compared build's, per process.
    pub cpu_us_per_req: Vec<Spread>,
}

/// One figure over the runs: its median (the upper one of an even count),
/// lowest and highest.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub mid: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Spread {
    /// `None` without values. A NaN (a figure missing on one side) sorts
    /// last, so it shows as the highest rather than breaking the order.
    fn of(mut v: Vec<f64>) -> Option<Spread> {
        sort_nan_last(&mut v);
        Some(Spread {
            mid: *v.get(v.len() / 2)?,
            lo: *v.first()?,
            hi: *v.last()?,
        })
    }

    /// `x1.002 (0.931-1.080)`: a ratio, and its range when there were runs
    /// enough to have one.
    fn ratio(&self, runs: usize) -> String {
        if runs > 1 {
            format!("x{:.3} ({:.3}-{:.3})", self.mid, self.lo, self.hi)
        } else {
            format!("x{:.3}", self.mid)
        }
    }

    /// `+0.012 ms (-0.020..+0.031)`: a difference, and its range.
    fn delta_ms(&self, runs: usize) -> String {
        if runs > 1 {
            format!("{:+.3} ms ({:+.3}..{:+.3})", self.mid, self.lo, self.hi)
        } else {
            format!("{:+.3} ms", self.mid)
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({"median": self.mid, "min": self.lo, "max": self.hi})
    }
}

impl Paired {
    /// `this[i]` against `other[i]`, run by run; `None` without runs.
    fn of(this: &[Figures], other: &[Figures]) -> Option<Paired> {
        let runs = this.len().min(other.len());
        let pairs = || this.iter().zip(other);
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        let processes = this.first()?.cpu_us_per_req.len();
        Some(Paired {
            runs,
            req_per_s: Spread::of(
                pairs()
                    .map(|(a, b)| ratio(a.req_per_s, b.req_per_s))
                    .collect(),
            )?,
            p50_ms_delta: Spread::of(
                pairs()
                    .map(|(a, b)| (a.p50_us as f64 - b.p50_us as f64) / 1000.0)
                    .collect(),
            )?,
            p99: Spread::of(
                pairs()
                    .map(|(a, b)| ratio(a.p99_us as f64, b.p99_us as f64))
                    .collect(),
            )?,
            cpu_us_per_req: (0..processes)
                .map(|i| {
                    Spread::of(
                        pairs()
                            .map(|(a, b)| {
                                ratio(
                                    a.cpu_us_per_req.get(i).copied().unwrap_or(f64::NAN),
                                    b.cpu_us_per_req.get(i).copied().unwrap_or(f64::NAN),
                                )
                            })
                            .collect(),
                    )
                })
                .collect::<Option<Vec<_>>>()?,
        })
    }
}

/// What one drive of one workload against one target measured.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub requests: u64,
    pub failures: u64,
    pub req_per_s: f64,
    pub mib_per_s: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// CPU microseconds per request of each tunnel process, in [`Target::pids`] order.
    pub cpu_us_per_req: Vec<f64>,
    /// Peak RSS in KiB of each tunnel process.
    pub peak_rss_kib: Vec<Option<u64>>,
    /// UDP sends on this machine per request while it was driven
    /// (`OutDatagrams` of `/proc/net/snmp`, which counts a GSO batch of
    /// packets once): the QUIC link both ways for Hookrelay, about none for
    /// the app and the TCP tunnels. `None` off Linux.
    pub udp_datagrams_per_req: Option<f64>,
}

/// Somewhere to send the workload: the app itself or a tunnel in front of it.
pub struct Target {
    pub name: &'static str,
    pub addr: SocketAddr,
    /// Request path prefix (`/t/bench` for Hookrelay's path-style URLs).
    pub prefix: &'static str,
    /// The tunnel's processes, with a short label each.
    pub pids: Vec<(&'static str, u32)>,
}

pub async fn run(binaries: &Binaries, args: &HttpArgs, json_out: bool) -> anyhow::Result<()> {
    let dir = temp_dir(args.tmp_dir.as_deref())?;
    let app = App::spawn(u64::MAX).await?;
    let (mut relay, mut agent) = start_tunnel(binaries, dir.path(), app.addr()).await?;
    let mut targets = vec![
        Target {
            name: "direct",
            addr: app.addr(),
            prefix: "",
            pids: Vec::new(),
        },
        tunnel_target("hookrelay", &relay, &agent),
    ];
    let mut compared = match &args.compare {
        Some(other_dir) => {
            let other = crate::binaries::locate(Some(other_dir))?;
            let sub = dir.path().join(COMPARED);
            std::fs::create_dir_all(&sub).with_context(|| format!("creating {}", sub.display()))?;
            let (relay_b, agent_b) = start_tunnel(&other, &sub, app.addr())
                .await
                .with_context(|| format!("starting the build in {}", other_dir.display()))?;
            targets.push(tunnel_target(COMPARED, &relay_b, &agent_b));
            Some((relay_b, agent_b))
        }
        None => None,
    };
    let mut peers: Vec<Peer> = Vec::new();
    if args.peers {
        for peer in peers::start_all(dir.path(), app.addr()).await? {
            targets.push(peer.target());
            peers.push(peer);
        }
    }

    let duration = Duration::from_secs(args.duration);
    let warmup = Duration::from_secs(args.warmup);
    // results[workload][target][run]
    let mut results: Vec<Vec<Vec<Figures>>> = args
        .workloads
        .iter()
        .map(|_| targets.iter().map(|_| Vec::new()).collect())
        .collect();
    for run in 0..args.runs {
        for (wi, &workload) in args.workloads.iter().enumerate() {
            for ti in order(targets.len(), compared.is_some(), run) {
                let target = &targets[ti];
                eprintln!(
                    "run {}/{}: workload {} ({}) via {}",
                    run + 1,
                    args.runs,
                    workload.name(),
                    workload.describe(),
                    target.name
                );
                if !warmup.is_zero() {
                    drive(target, workload, warmup).await?;
                }
                let figures = measure(target, workload, duration).await?;
                if figures.failures > 0 {
                    eprintln!(
                        "warning: {} of {} requests via {} were not answered 200",
                        figures.failures,
                        figures.requests + figures.failures,
                        target.name
                    );
                }
                results[wi][ti].push(figures);
                relay.proc.check_running()?;
                agent.check_running()?;
                if let Some((relay_b, agent_b)) = &mut compared {
                    relay_b.proc.check_running()?;
                    agent_b.check_running()?;
                }
            }
        }
    }
    let relay_hwm = status_kib(relay.proc.pid(), "VmHWM");
    let agent_hwm = status_kib(agent.pid(), "VmHWM");
    stop_all(vec![
        ("relay-client", &mut agent),
        ("relay-server", &mut relay.proc),
    ])
    .await?;
    if let Some((relay_b, agent_b)) = &mut compared {
        stop_all(vec![
            ("compared relay-client", agent_b),
            ("compared relay-server", &mut relay_b.proc),
        ])
        .await?;
    }
    drop(peers);
    let at = |name: &str| targets.iter().position(|t| t.name == name);
    let pair = at("hookrelay").zip(at(COMPARED));
    let paired: Vec<Option<Paired>> = results
        .iter()
        .map(|per_target| {
            pair.and_then(|(this, other)| Paired::of(&per_target[this], &per_target[other]))
        })
        .collect();

    let medians: Vec<Vec<Figures>> = results
        .iter()
        .map(|per_target| per_target.iter().map(|runs| median(runs)).collect())
        .collect();
    if json_out {
        println!(
            "{}",
            to_json(args, &targets, &medians, &paired, relay_hwm, agent_hwm)
        );
    } else {
        print!(
            "{}",
            table(args, &targets, &medians, &paired, relay_hwm, agent_hwm)
        );
    }
    Ok(())
}

/// The order in which run `run` measures `count` targets: as listed, except
/// that with a compared build (listed third, after this build) the two builds
/// take turns going first, so that neither always measures a machine the
/// other has just warmed or loaded.
fn order(count: usize, compared: bool, run: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..count).collect();
    if compared && run % 2 == 1 && count > 2 {
        order.swap(1, 2);
    }
    order
}

/// A tunnel [`start_tunnel`] started, as target `name`.
fn tunnel_target(name: &'static str, relay: &Relay, agent: &Proc) -> Target {
    Target {
        name,
        addr: relay.http,
        prefix: "/t/bench",
        pids: vec![("relay", relay.proc.pid()), ("agent", agent.pid())],
    }
}

/// The relay and an agent holding tunnel `bench` in front of `app`.
async fn start_tunnel(
    binaries: &Binaries,
    dir: &Path,
    app: SocketAddr,
) -> anyhow::Result<(Relay, Proc)> {
    let relay_dir = dir.join("relay");
    let token = create_token(binaries, &relay_dir).await?;
    let relay = Relay::start_with(binaries, &relay_dir, &[]).await?;
    let mut cmd = command(&binaries.relay_client);
    cmd.args(["http", &app.to_string()])
        .args(["--relay", &relay.quic.to_string()])
        .args(["--token", &token, "--tunnel", TUNNEL])
        .args(["--relay-cert-sha256", &relay.fingerprint])
        .args(["--no-inspect", "--quiet", "--data-dir"])
        .arg(dir.join("agent"));
    let (agent, _) = Proc::spawn("relay-client", cmd, Stream::Stdout, "forwarding")
        .await
        .context("starting the agent")?;
    eprintln!(
        "relay pid {} (http {}), agent pid {}, app {app}",
        relay.proc.pid(),
        relay.http,
        agent.pid()
    );
    Ok((relay, agent))
}

/// Drives `workload` against `target` for `duration` and measures it.
async fn measure(
    target: &Target,
    workload: Workload,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let samplers: Vec<RssSampler> = target
        .pids
        .iter()
        .map(|(_, pid)| RssSampler::start(*pid))
        .collect();
    let cpu_before: Vec<Option<u64>> = target.pids.iter().map(|(_, p)| cpu_ticks(*p)).collect();
    let udp_before = udp_out_datagrams();
    let driven = drive(target, workload, duration).await?;
    let udp_after = udp_out_datagrams();
    let cpu_after: Vec<Option<u64>> = target.pids.iter().map(|(_, p)| cpu_ticks(*p)).collect();
    let tick_us = 1_000_000.0 / clock_ticks_per_s() as f64;
    let done = driven.requests.max(1) as f64;
    let cpu_us_per_req = cpu_before
        .iter()
        .zip(&cpu_after)
        .map(|(b, a)| match (b, a) {
            (Some(b), Some(a)) => a.saturating_sub(*b) as f64 * tick_us / done,
            _ => f64::NAN,
        })
        .collect();
    let peak_rss_kib = samplers.iter().map(RssSampler::take_peak).collect();
    let secs = driven.elapsed.as_secs_f64();
    let mut lat = driven.latencies_us;
    lat.sort_unstable();
    let at = |p: f64| -> u64 {
        if lat.is_empty() {
            return 0;
        }
        let i = ((lat.len() as f64 * p) as usize).min(lat.len() - 1);
        u64::from(lat[i])
    };
    Ok(Figures {
        requests: driven.requests,
        failures: driven.failures,
        req_per_s: driven.requests as f64 / secs,
        mib_per_s: (driven.requests as f64 * workload.body_bytes() as f64) / secs / 1_048_576.0,
        p50_us: at(0.50),
        p99_us: at(0.99),
        max_us: lat.last().copied().map_or(0, u64::from),
        cpu_us_per_req,
        peak_rss_kib,
        udp_datagrams_per_req: udp_before
            .zip(udp_after)
            .map(|(b, a)| a.saturating_sub(b) as f64 / done),
    })
}

/// UDP datagrams this network namespace has sent (`OutDatagrams` in the
/// `Udp:` rows of `/proc/net/snmp`); `None` where there is no such file.
fn udp_out_datagrams() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut rows = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (rows.next()?, rows.next()?);
    let at = names.split_whitespace().position(|n| n == "OutDatagrams")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

struct Driven {
    requests: u64,
    failures: u64,
    elapsed: Duration,
    latencies_us: Vec<u32>,
}

/// The load: `workload.connections()` senders, each posting back to back
/// until `duration` has passed.
async fn drive(target: &Target, workload: Workload, duration: Duration) -> anyhow::Result<Driven> {
    let body = Bytes::from(payload(workload.body_bytes()));
    let path: Arc<str> = format!("{}/hook", target.prefix).into();
    let host: Arc<str> = target.addr.to_string().into();
    let start = Instant::now();
    let deadline = start + duration;
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..workload.connections() {
        let (body, path, host) = (body.clone(), path.clone(), host.clone());
        let addr = target.addr;
        let new_each = workload.new_connection_each();
        senders.spawn(async move { sender(addr, &host, &path, body, new_each, deadline).await });
    }
    let mut out = Driven {
        requests: 0,
        failures: 0,
        elapsed: Duration::ZERO,
        latencies_us: Vec::new(),
    };
    while let Some(joined) = senders.join_next().await {
        let (ok, failed, mut lat) = joined.context("a sender panicked")??;
        out.requests += ok;
        out.failures += failed;
        out.latencies_us.append(&mut lat);
    }
    out.elapsed = start.elapsed();
    Ok(out)
}

async fn sender(
    addr: SocketAddr,
    host: &str,
    path: &str,
    body: Bytes,
    new_each: bool,
    deadline: Instant,
) -> anyhow::Result<(u64, u64, Vec<u32>)> {
    let mut ok = 0;
    let mut failed = 0;
    let mut lat = Vec::with_capacity(1 << 16);
    let mut conn: Option<client::Conn> = None;
    while Instant::now() < deadline {
        let started = Instant::now();
        let mut c = match conn.take() {
            Some(mut c) => match c.ready().await {
                Ok(()) => c,
                Err(_) => client::connect(addr).await?,
            },
            None => client::connect(addr).await?,
        };
        let mut request = http::Request::post(path)
            .header(http::header::HOST, host)
            .header(http::header::CONTENT_TYPE, "application/json");
        if new_each {
            request = request.header(http::header::CONNECTION, "close");
        }
        let request = request.body(Full::new(body.clone()))?;
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, client::send(&mut c, request)).await;
        lat.push(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX));
        match answer {
            Ok(Ok((status, _))) if status == http::StatusCode::OK => ok += 1,
            _ => failed += 1,
        }
        if !new_each {
            conn = Some(c);
        }
    }
    Ok((ok, failed, lat))
}

/// A JSON body of exactly `size` bytes.
fn payload(size: usize) -> Vec<u8> {
    let head = br#"{"type":"bench.event","pad":""#;
    let tail = br#""}"#;
    let mut bytes = Vec::with_capacity(size);
    bytes.extend_from_slice(head);
    bytes.resize(size.saturating_sub(tail.len()).max(head.len()), b'x');
    bytes.extend_from_slice(tail);
    bytes
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields count from after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `getconf CLK_TCK`, 100 on Linux unless told otherwise.
fn clock_ticks_per_s() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// Sorts `v` ascending with any value not comparable with itself (a NaN: a
/// figure a run could not measure) last, which keeps the order total:
/// `sort_by` may panic on a comparison that is not.
fn sort_nan_last<T: PartialOrd>(v: &mut [T]) {
    let incomparable = |x: &T| x.partial_cmp(x).is_none();
    v.sort_by(|a, b| match (incomparable(a), incomparable(b)) {
        (false, false) => a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal),
        (a, b) => a.cmp(&b),
    });
}

/// The median of `v` (the upper one of an even count); `v` must not be empty.
fn mid<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    sort_nan_last(&mut v);
    v[v.len() / 2]
}

/// Each figure's median over the runs (upper median for even counts).
fn median(runs: &[Figures]) -> Figures {
    let Some(first) = runs.first() else {
        return Figures::default();
    };
    Figures {
        requests: mid(runs.iter().map(|f| f.requests).collect()),
        failures: runs.iter().map(|f| f.failures).sum(),
        req_per_s: mid(runs.iter().map(|f| f.req_per_s).collect()),
        mib_per_s: mid(runs.iter().map(|f| f.mib_per_s).collect()),
        p50_us: mid(runs.iter().map(|f| f.p50_us).collect()),
        p99_us: mid(runs.iter().map(|f| f.p99_us).collect()),
        max_us: mid(runs.iter().map(|f| f.max_us).collect()),
        cpu_us_per_req: (0..first.cpu_us_per_req.len())
            .map(|i| mid(runs.iter().map(|f| f.cpu_us_per_req[i]).collect()))
            .collect(),
        peak_rss_kib: (0..first.peak_rss_kib.len())
            .map(|i| runs.iter().filter_map(|f| f.peak_rss_kib[i]).max())
            .collect(),
        udp_datagrams_per_req: runs
            .iter()
            .map(|f| f.udp_datagrams_per_req)
            .collect::<Option<Vec<f64>>>()
            .map(mid),
    }
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

fn table(
    args: &HttpArgs,
    targets: &[Target],
    medians: &[Vec<Figures>],
    paired: &[Option<Paired>],
    relay_hwm: Option<u64>,
    agent_hwm: Option<u64>,
) -> String {
    let mut out = format!(
        "hookrelay http benchmark: {} s per workload and target after {} s warm-up, median of {} run(s), {} CPU(s)\n",
        args.duration,
        args.warmup,
        args.runs,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    for (wi, workload) in args.workloads.iter().enumerate() {
        let direct = &medians[wi][0];
        out.push_str(&format!(
            "\nworkload {}: {} (goal: {})\n",
            workload.name(),
            workload.describe(),
            workload.goal()
        ));
        out.push_str(&format!(
            "{:<10} {:>9} {:>8} {:>8} {:>8} {:>8} {:>6} {:>9} {:>10}  {}\n",
            "target",
            "req/s",
            "MiB/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "ratio",
            "+p50 ms",
            "CPU us/req",
            "peak RSS"
        ));
        for (ti, target) in targets.iter().enumerate() {
            let f = &medians[wi][ti];
            let ratio = if direct.req_per_s > 0.0 {
                f.req_per_s / direct.req_per_s
            } else {
                0.0
            };
            let cpu = if target.pids.is_empty() {
                "-".to_owned()
            } else {
                target
                    .pids
                    .iter()
                    .zip(&f.cpu_us_per_req)
                    .map(|((label, _), us)| format!("{label} {us:.1}"))
                    .collect::<Vec<_>>()
                    .join(" + ")
            };
            let rss = target
                .pids
                .iter()
                .zip(&f.peak_rss_kib)
                .map(|((label, _), kib)| match kib {
                    Some(k) => format!("{label} {:.1} MiB", *k as f64 / 1024.0),
                    None => format!("{label} n/a"),
                })
                .collect::<Vec<_>>()
                .join(", ");
            let added = if ti == 0 {
                "-".to_owned()
            } else {
                format!("{:+.3}", (f.p50_us as f64 - direct.p50_us as f64) / 1000.0)
            };
            out.push_str(&format!(
                "{:<10} {:>9.0} {:>8.1} {:>8} {:>8} {:>8} {:>6.2} {:>9} {:>10}  {}\n",
                target.name,
                f.req_per_s,
                f.mib_per_s,
                ms(f.p50_us),
                ms(f.p99_us),
                ms(f.max_us),
                ratio,
                added,
                cpu,
                rss
            ));
            if f.failures > 0 {
                out.push_str(&format!(
                    "{:<10} {} request(s) not answered 200\n",
                    "", f.failures
                ));
            }
        }
        for name in ["hookrelay", COMPARED] {
            if let Some(n) = targets
                .iter()
                .position(|t| t.name == name)
                .and_then(|ti| medians[wi][ti].udp_datagrams_per_req)
            {
                out.push_str(&format!(
                    "{name}'s QUIC link: {n:.2} UDP sends per request, both ways (a GSO batch counts once)\n"
                ));
            }
        }
        if let Some(p) = paired.get(wi).and_then(Option::as_ref) {
            out.push_str(&format!(
                "hookrelay against compared, median of {} paired run(s){}: req/s {}, p50 {}, p99 {}, CPU per request {}\n",
                p.runs,
                if p.runs > 1 { " (lowest-highest)" } else { "" },
                p.req_per_s.ratio(p.runs),
                p.p50_ms_delta.delta_ms(p.runs),
                p.p99.ratio(p.runs),
                ["relay", "agent"]
                    .iter()
                    .zip(&p.cpu_us_per_req)
                    .map(|(label, r)| format!("{label} {}", r.ratio(p.runs)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    out.push_str(&format!(
        "\nhigh-water RSS over the whole run: relay {}, agent {}\n",
        relay_hwm.map_or("n/a".to_owned(), |k| format!(
            "{:.1} MiB",
            k as f64 / 1024.0
        )),
        agent_hwm.map_or("n/a".to_owned(), |k| format!(
            "{:.1} MiB",
            k as f64 / 1024.0
        )),
    ));
    out
}

fn to_json(
    args: &HttpArgs,
    targets: &[Target],
    medians: &[Vec<Figures>],
    paired: &[Option<Paired>],
    relay_hwm: Option<u64>,
    agent_hwm: Option<u64>,
) -> serde_json::Value {
    let workloads: Vec<serde_json::Value> = args
        .workloads
        .iter()
        .enumerate()
        .map(|(wi, w)| {
            let direct_rps = medians[wi][0].req_per_s;
            let rows: Vec<serde_json::Value> = targets
                .iter()
                .enumerate()
                .map(|(ti, t)| {
                    let f = &medians[wi][ti];
                    json!({
                        "target": t.name,
                        "requests": f.requests,
                        "failures": f.failures,
                        "req_per_s": f.req_per_s.round(),
                        "mib_per_s": (f.mib_per_s * 10.0).round() / 10.0,
                        "p50_ms": f.p50_us as f64 / 1000.0,
                        "p99_ms": f.p99_us as f64 / 1000.0,
                        "max_ms": f.max_us as f64 / 1000.0,
                        "ratio_to_direct": if direct_rps > 0.0 { ((f.req_per_s / direct_rps) * 1000.0).round() / 1000.0 } else { 0.0 },
                        "cpu_us_per_req": t.pids.iter().zip(&f.cpu_us_per_req).map(|((l, _), us)| (l.to_string(), json!((us * 10.0).round() / 10.0))).collect::<serde_json::Map<_, _>>(),
                        "udp_datagrams_per_req": f.udp_datagrams_per_req.map(|n| (n * 100.0).round() / 100.0),
                        "peak_rss_mib": t.pids.iter().zip(&f.peak_rss_kib).map(|((l, _), k)| (l.to_string(), json!(k.map(|k| (k as f64 / 102.4).round() / 10.0)))).collect::<serde_json::Map<_, _>>(),
                    })
                })
                .collect();
            let against = paired.get(wi).and_then(Option::as_ref).map(|p| {
                json!({
                    "runs": p.runs,
                    "req_per_s_ratio": p.req_per_s.mid,
                    "p50_ms_delta": p.p50_ms_delta.mid,
                    "p99_ratio": p.p99.mid,
                    "cpu_us_per_req_ratio": {
                        "relay": p.cpu_us_per_req.first().map(|r| r.mid),
                        "agent": p.cpu_us_per_req.get(1).map(|r| r.mid),
                    },
                    "spread": {
                        "req_per_s_ratio": p.req_per_s.json(),
                        "p50_ms_delta": p.p50_ms_delta.json(),
                        "p99_ratio": p.p99.json(),
                        "cpu_us_per_req_ratio": {
                            "relay": p.cpu_us_per_req.first().map(Spread::json),
                            "agent": p.cpu_us_per_req.get(1).map(Spread::json),
                        },
                    },
                })
            });
            json!({"workload": w.name(), "describe": w.describe(), "goal": w.goal(), "targets": rows, "against_compared": against})
        })
        .collect();
    json!({
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "runs": args.runs,
        "workloads": workloads,
        "relay_hwm_mib": relay_hwm.map(|k| (k as f64 / 102.4).round() / 10.0),
        "agent_hwm_mib": agent_hwm.map(|k| (k as f64 / 102.4).round() / 10.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compared_build_takes_turns_going_first() {
        assert_eq!(order(4, false, 1), vec![0, 1, 2, 3]);
        assert_eq!(order(3, true, 0), vec![0, 1, 2]);
        assert_eq!(order(3, true, 1), vec![0, 2, 1]);
        assert_eq!(order(5, true, 3), vec![0, 2, 1, 3, 4]);
    }

    #[test]
    fn pairs_are_set_against_each_other_run_by_run() {
        let run = |rps: f64, p50_us: u64, cpu: f64| Figures {
            req_per_s: rps,
            p50_us,
            p99_us: p50_us * 2,
            cpu_us_per_req: vec![cpu, cpu * 2.0],
            ..Figures::default()
        };
        // The machine slows by half in the second run: both builds with it.
        let this = [
            run(1100.0, 400, 90.0),
            run(550.0, 800, 180.0),
            run(1000.0, 420, 95.0),
        ];
        let other = [
            run(1000.0, 420, 100.0),
            run(500.0, 840, 200.0),
            run(1000.0, 400, 100.0),
        ];
        let p = Paired::of(&this, &other).expect("three pairs");
        assert_eq!(p.runs, 3);
        let near = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(near(p.req_per_s.mid, 1.1), "{p:?}");
        assert!(near(p.cpu_us_per_req[0].mid, 0.9), "{p:?}");
        assert!(near(p.cpu_us_per_req[1].mid, 0.9), "{p:?}");
        assert!(near(p.p50_ms_delta.mid, -0.02), "{p:?}");
        assert!(near(p.p99.mid, 400.0 / 420.0), "{p:?}");
        // The lowest and highest run of each figure, beside its median.
        assert!(
            near(p.req_per_s.lo, 1.0) && near(p.req_per_s.hi, 1.1),
            "{p:?}"
        );
        assert!(near(p.cpu_us_per_req[0].lo, 0.9), "{p:?}");
        assert!(near(p.cpu_us_per_req[0].hi, 0.95), "{p:?}");
        assert!(near(p.p50_ms_delta.lo, -0.04), "{p:?}");
        assert!(near(p.p50_ms_delta.hi, 0.02), "{p:?}");
        assert_eq!(p.req_per_s.ratio(3), "x1.100 (1.000-1.100)");
        assert_eq!(p.p50_ms_delta.delta_ms(3), "-0.020 ms (-0.040..+0.020)");
        assert_eq!(p.req_per_s.ratio(1), "x1.100");
        let missing = Spread::of(vec![f64::NAN, 1.0, 0.5]).expect("values");
        assert_eq!((missing.lo, missing.mid), (0.5, 1.0));
        assert!(missing.hi.is_nan());
        assert!(Spread::of(Vec::new()).is_none());
        assert!(Paired::of(&[], &other).is_none());
    }

    #[test]
    fn payloads_have_the_exact_size() {
        for size in [1024, 256 * 1024] {
            let p = payload(size);
            assert_eq!(p.len(), size);
            assert!(serde_json::from_slice::<serde_json::Value>(&p).is_ok());
        }
    }

    #[test]
    fn cpu_ticks_of_this_process_are_read() {
        assert!(cpu_ticks(std::process::id()).is_some());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn udp_datagrams_sent_are_counted() {
        let before = udp_out_datagrams().expect("/proc/net/snmp has a Udp row");
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = socket.local_addr().expect("address");
        for _ in 0..10 {
            socket.send_to(b"x", to).expect("send");
        }
        let after = udp_out_datagrams().expect("still there");
        // Other processes may send some too, never fewer.
        assert!(after >= before + 10, "{before} -> {after}");
    }

    #[test]
    fn medians_take_the_middle_run() {
        let f = |rps: f64| Figures {
            req_per_s: rps,
            cpu_us_per_req: vec![rps],
            peak_rss_kib: vec![Some(rps as u64)],
            ..Figures::default()
        };
        let m = median(&[f(3.0), f(1.0), f(2.0)]);
        assert_eq!(m.req_per_s, 2.0);
        assert_eq!(m.cpu_us_per_req, vec![2.0]);
        assert_eq!(m.peak_rss_kib, vec![Some(3)], "the peak is the highest");
        // A run that could not measure a figure: its NaN goes last.
        let m = median(&[f(3.0), f(f64::NAN), f(1.0), f(f64::NAN), f(2.0)]);
        assert_eq!(m.req_per_s, 3.0);
        let odd: Vec<f64> = (0..40)
            .map(|i| if i % 3 == 0 { f64::NAN } else { f64::from(i) })
            .collect();
        assert_eq!(mid(odd), 31.0);
    }
}
