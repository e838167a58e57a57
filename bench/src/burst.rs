//! `burst`: many webhooks at once, each on a new connection, through the
//! relay and an agent in sync mode to an app that takes its time: what a
//! deploy that fires thousands of events, or a provider's backfill, does.
//! Every one must be answered by the app and recorded; the figures are how
//! long that took, the latencies, how many the app held at once and the
//! processes' peak RSS. `--agent-open-files` and `--relay-open-files` start
//! a process under `ulimit -n` (soft and hard), as a login shell or a laptop
//! would.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use http_body_util::Full;

use crate::{
    binaries::Binaries,
    client,
    process::{command, stop_all, temp_dir, Proc, RssSampler, Stream},
    queue::{create_token, Latency, Relay},
};

/// The tunnel the burst goes to.
const TUNNEL: &str = "bench";

/// Longest one webhook may take to be answered.
const ANSWER_WAIT: Duration = Duration::from_secs(120);

#[derive(Args)]
pub struct BurstArgs {
    /// Webhooks sent at once, each on a new connection
    #[arg(long, default_value_t = 2000)]
    count: u64,
    /// Request body size in bytes
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// How long the app takes to answer each, in milliseconds
    #[arg(long, default_value_t = 200)]
    app_delay_ms: u64,
    /// Start the agent under `ulimit -n N` (soft and hard limit)
    #[arg(long, value_name = "N")]
    agent_open_files: Option<u64>,
    /// Start the relay under `ulimit -n N` (soft and hard limit)
    #[arg(long, value_name = "N")]
    relay_open_files: Option<u64>,
    /// Send over HTTPS (a TLS handshake per webhook, as providers do) to the
    /// relay's self-signed certificate, pinned
    #[arg(long)]
    https: bool,
    /// Parent of the temporary directory
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
}

/// An app that answers every request `200` after a delay, counting the
/// requests it holds at once.
struct SlowApp {
    addr: SocketAddr,
    held: Arc<AtomicU64>,
    peak: Arc<AtomicU64>,
    answered: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowApp {
    async fn spawn(delay: Duration) -> anyhow::Result<SlowApp> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the local app")?;
        let addr = listener.local_addr()?;
        let held = Arc::new(AtomicU64::new(0));
        let peak = Arc::new(AtomicU64::new(0));
        let answered = Arc::new(AtomicU64::new(0));
        let (h, p, a) = (held.clone(), peak.clone(), answered.clone());
        let router = axum::Router::new().fallback(move |body: Bytes| {
            let (held, peak, answered) = (h.clone(), p.clone(), a.clone());
            async move {
                let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                held.fetch_sub(1, Ordering::SeqCst);
                answered.fetch_add(1, Ordering::SeqCst);
                format!("{{\"received\":{}}}", body.len())
            }
        });
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                eprintln!("the local app stopped: {e}");
            }
        });
        Ok(SlowApp {
            addr,
            held,
            peak,
            answered,
            task,
        })
    }
}

impl Drop for SlowApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `bin`, started by `sh` under `ulimit -n limit` when there is one.
fn limited(bin: &Path, limit: Option<u64>) -> tokio::process::Command {
    match limit {
        None => command(bin),
        Some(n) => {
            let mut cmd = command(Path::new("sh"));
            cmd.arg("-c")
                .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                .arg(bin);
            cmd
        }
    }
}

/// What the burst came to.
struct Outcome {
    statuses: BTreeMap<String, u64>,
    elapsed: Duration,
    latency_us: Latency,
    app_peak: u64,
    app_answered: u64,
    recorded: u64,
    relay_peak_kib: Option<u64>,
    agent_peak_kib: Option<u64>,
    /// The figures a process lowered at start (its warning's last field).
    relay_lowered: Option<String>,
    agent_lowered: Option<String>,
}

pub async fn run(binaries: &Binaries, args: &BurstArgs, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(args.count > 0, "--count must be at least 1");
    // This process holds a connection to the relay for each webhook at once,
    // and one from the agent for each the app holds (at most 1,024).
    let limit = hookrelay_shared::open_files::raise().context("raising the open-files limit")?;
    let need = args.count + args.count.min(1024) + 256;
    anyhow::ensure!(
        limit.now >= need,
        "the open-files limit is {} and {} webhooks at once need {need} here: raise the hard limit \
         (`ulimit -Hn`) or pass a smaller --count",
        limit.now,
        args.count
    );
    let dir = temp_dir(args.tmp_dir.as_deref())?;
    let relay_dir = dir.path().join("relay");
    let agent_dir = dir.path().join("agent");
    let token = create_token(binaries, &relay_dir).await?;

    // One sender address: the per-address cap (256) would refuse what many
    // provider addresses would bring.
    let per_ip = args.count.max(256).to_string();
    let mut extra = vec!["--max-connections-per-ip".to_owned(), per_ip];
    if args.https {
        extra.extend(["--https".to_owned(), "127.0.0.1:0".to_owned()]);
    }
    let mut relay = Relay::start_cmd(
        limited(&binaries.relay_server, args.relay_open_files),
        &relay_dir,
        &extra,
    )
    .await?;
    let target = match (args.https, relay.https) {
        (false, _) => Target::Http(relay.http),
        (true, Some(addr)) => Target::Https(addr, tls_connector(&relay.fingerprint)?),
        (true, None) => anyhow::bail!("the relay did not say where its HTTPS ingress listens"),
    };

    let app = SlowApp::spawn(Duration::from_millis(args.app_delay_ms)).await?;
    let mut cmd = limited(&binaries.relay_client, args.agent_open_files);
    cmd.args(["http", &app.addr.to_string()])
        .args(["--relay", &relay.quic.to_string()])
        .args(["--token", &token, "--tunnel", TUNNEL])
        .args(["--relay-cert-sha256", &relay.fingerprint])
        .args(["--max-exchanges", &args.count.max(10_000).to_string()])
        .args(["--no-inspect", "--quiet", "--data-dir"])
        .arg(&agent_dir);
    let (mut agent, _) = Proc::spawn("relay-client", cmd, Stream::Stdout, "forwarding")
        .await
        .context("starting the agent")?;
    eprintln!(
        "relay pid {}, agent pid {}, app {}; sending {} webhooks at once",
        relay.proc.pid(),
        agent.pid(),
        app.addr,
        args.count
    );

    let relay_rss = RssSampler::start(relay.proc.pid());
    let agent_rss = RssSampler::start(agent.pid());
    let body = Bytes::from(vec![b'x'; args.body_bytes]);
    let started = Instant::now();
    let sends: Vec<_> = (0..args.count)
        .map(|_| tokio::spawn(send_one(target.clone(), body.clone())))
        .collect();
    let mut statuses = BTreeMap::new();
    let mut latencies = Vec::with_capacity(sends.len());
    for send in sends {
        let (status, took) = send.await.context("a sender panicked")?;
        *statuses.entry(status).or_insert(0) += 1;
        latencies.push(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }
    let elapsed = started.elapsed();
    let relay_peak_kib = relay_rss.take_peak();
    let agent_peak_kib = agent_rss.take_peak();
    relay.proc.check_running()?;
    agent.check_running()?;
    let lowered = |proc: &Proc, what: &str| {
        let (_, _, lines) = proc.log().problems();
        lines
            .iter()
            .find(|l| l.contains("open-files limit"))
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with(what)))
            .map(str::to_owned)
    };
    let relay_lowered = lowered(&relay.proc, "max_connections=");
    let agent_lowered = lowered(&agent, "max_deliveries=");
    stop_all(vec![("relay-client", &mut agent)]).await?;
    let recorded = recorded(binaries, &agent_dir).await?;
    stop_all(vec![("relay-server", &mut relay.proc)]).await?;
    anyhow::ensure!(
        app.held.load(Ordering::SeqCst) == 0,
        "the app still holds requests"
    );

    let outcome = Outcome {
        statuses,
        elapsed,
        latency_us: Latency::of(latencies),
        app_peak: app.peak.load(Ordering::SeqCst),
        app_answered: app.answered.load(Ordering::SeqCst),
        recorded,
        relay_peak_kib,
        agent_peak_kib,
        relay_lowered,
        agent_lowered,
    };
    if json {
        println!("{}", to_json(args, &outcome));
    } else {
        print!("{}", table(args, &outcome));
    }
    Ok(())
}

/// Where the senders connect: the relay's HTTP ingress, or its HTTPS one
/// with a client that pins its certificate.
#[derive(Clone)]
enum Target {
    Http(SocketAddr),
    Https(SocketAddr, tokio_rustls::TlsConnector),
}

/// A TLS client for the relay's self-signed certificate, pinned by its
/// SHA-256 `fingerprint` as the agent pins it; HTTP/1.1.
fn tls_connector(fingerprint: &str) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let pin = relay_client::config::parse_fingerprint(fingerprint).map_err(anyhow::Error::msg)?;
    let (mut tls, _) =
        relay_client::tls::rustls_client_config(&relay_client::config::Trust::Pinned(pin))
            .context("a TLS client configuration")?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(tls)))
}

/// An HTTP/1.1 connection to `target`, over TLS for HTTPS.
async fn connect(target: &Target) -> anyhow::Result<client::Conn> {
    match target {
        Target::Http(addr) => client::connect(*addr).await,
        Target::Https(addr, tls) => {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let stream = tls.connect(name, tcp).await.context("TLS handshake")?;
            client::handshake(stream, *addr).await
        }
    }
}

/// One webhook on a connection of its own: its status (or what went
/// wrong) and how long the answer took.
async fn send_one(target: Target, body: Bytes) -> (String, Duration) {
    let started = Instant::now();
    let (Target::Http(addr) | Target::Https(addr, _)) = &target;
    let host = addr.to_string();
    let attempt = async {
        let mut conn = connect(&target).await?;
        let request = http::Request::post(format!("/t/{TUNNEL}/burst"))
            .header(http::header::HOST, host)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CONNECTION, "close")
            .body(Full::new(body))?;
        client::send(&mut conn, request).await
    };
    let status = match tokio::time::timeout(ANSWER_WAIT, attempt).await {
        Ok(Ok((status, _))) => status.as_u16().to_string(),
        Ok(Err(err)) => format!("error: {}", err.root_cause()),
        Err(_) => format!("no answer within {ANSWER_WAIT:?}"),
    };
    (status, started.elapsed())
}

/// How many exchanges the stopped agent's history holds, listed page by
/// page (`relay-client history` lists at most 500 at a time).
async fn recorded(binaries: &Binaries, agent_dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    let mut before: Option<String> = None;
    loop {
        let mut cmd = command(&binaries.relay_client);
        cmd.args(["history", "--no-inspect", "--json", "--limit", "500"])
            .arg("--data-dir")
            .arg(agent_dir);
        if let Some(id) = &before {
            cmd.args(["--before", id]);
        }
        let out = cmd.output().await.context("running relay-client history")?;
        anyhow::ensure!(
            out.status.success(),
            "relay-client history failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let listed: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("relay-client history --json")?;
        let page = listed["exchanges"]
            .as_array()
            .context("no exchanges in relay-client history --json")?;
        total += page.len() as u64;
        match listed["next_before"].as_str() {
            Some(id) if !page.is_empty() => before = Some(id.to_owned()),
            _ => return Ok(total),
        }
    }
}

fn table(args: &BurstArgs, o: &Outcome) -> String {
    let ms = |us: u64| us as f64 / 1000.0;
    let mib = |kib: Option<u64>| {
        kib.map_or("n/a".to_owned(), |k| {
            format!("{:.1} MiB", k as f64 / 1024.0)
        })
    };
    let limit = |n: Option<u64>, lowered: &Option<String>| {
        let n = n.map_or("as inherited".to_owned(), |n| format!("ulimit -n {n}"));
        match lowered {
            Some(l) => format!("{n}, lowered to {l}"),
            None => n,
        }
    };
    let statuses: Vec<String> = o
        .statuses
        .iter()
        .map(|(s, n)| format!("{n} x {s}"))
        .collect();
    let mut out = format!(
        "hookrelay burst benchmark: {} webhooks of {} B at once, each on a new {} connection; the app answers each after {} ms\n",
        args.count,
        args.body_bytes,
        if args.https { "HTTPS" } else { "HTTP" },
        args.app_delay_ms
    );
    out += &format!(
        "relay: {}; agent: {}\n",
        limit(args.relay_open_files, &o.relay_lowered),
        limit(args.agent_open_files, &o.agent_lowered)
    );
    out += &format!(
        "answered: {} in {:.2} s; latency p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms\n",
        statuses.join(", "),
        o.elapsed.as_secs_f64(),
        ms(o.latency_us.p50),
        ms(o.latency_us.p90),
        ms(o.latency_us.p99),
        ms(o.latency_us.max)
    );
    out += &format!(
        "the app answered {}, at most {} at once; the agent's history holds {}\n",
        o.app_answered, o.app_peak, o.recorded
    );
    out += &format!(
        "peak RSS: relay {}, agent {}\n",
        mib(o.relay_peak_kib),
        mib(o.agent_peak_kib)
    );
    out
}

fn to_json(args: &BurstArgs, o: &Outcome) -> serde_json::Value {
    serde_json::json!({
        "count": args.count,
        "https": args.https,
        "body_bytes": args.body_bytes,
        "app_delay_ms": args.app_delay_ms,
        "relay_open_files": args.relay_open_files,
        "agent_open_files": args.agent_open_files,
        "relay_lowered": o.relay_lowered,
        "agent_lowered": o.agent_lowered,
        "statuses": o.statuses,
        "elapsed_s": o.elapsed.as_secs_f64(),
        "latency_ms": {
            "p50": o.latency_us.p50 as f64 / 1000.0,
            "p90": o.latency_us.p90 as f64 / 1000.0,
            "p99": o.latency_us.p99 as f64 / 1000.0,
            "max": o.latency_us.max as f64 / 1000.0,
        },
        "app_answered": o.app_answered,
        "app_peak_at_once": o.app_peak,
        "recorded": o.recorded,
        "relay_peak_rss_kib": o.relay_peak_kib,
        "agent_peak_rss_kib": o.agent_peak_kib,
    })
}
