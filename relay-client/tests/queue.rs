//! Store-and-forward: webhooks the relay accepts with `202` while the agent is
//! offline (or in queue mode) reach the local app exactly once and in order,
//! whatever is killed meanwhile; full queues answer 503; failing apps are
//! retried; provider duplicates are suppressed.
//!
//! The kill -9 tests run the built `relay-server` and `relay-client` binaries.

mod common;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{body::Body, extract::Request, response::Response};
use common::*;
use hookrelay_shared::{
    signature::{self, Provider, SecretSet},
    DeliveryMode, TunnelSettings, WhenOffline,
};
use http::StatusCode;
use relay_client::{history::Filter, queued::RetryPolicy, Agent};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Child,
};

/// Generous bound for a whole drain of 1,000 webhooks on a slow CI machine.
const DRAIN_WAIT: Duration = Duration::from_secs(180);

fn queue_mode() -> TunnelSettings {
    TunnelSettings {
        mode: DeliveryMode::Queue,
        when_offline: WhenOffline::Queue,
    }
}

/// Waits until the in-process relay's queue for `tunnel` is empty.
async fn until_queue_empty(relay: &TestRelay, tunnel: &str) -> anyhow::Result<()> {
    let name = tunnel.parse()?;
    until(WAIT, "the relay's queue to empty", || {
        relay.relay.queue().stats(&name).count == 0
    })
    .await
}

/// Exchanges in the agent's history.
fn recorded(agent: &Agent) -> usize {
    agent
        .history()
        .list(&Filter::default(), None, 1000)
        .map(|p| p.exchanges.len())
        .unwrap_or(0)
}

/// The delivery ids the app received, in arrival order.
fn delivery_ids(app: &TestApp) -> Vec<String> {
    app.received()
        .iter()
        .map(|r| {
            r.header("x-hookrelay-delivery-id")
                .first()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        })
        .collect()
}

/// Posts `/n/{i}` for each i and expects 202 with a delivery id each time.
async fn post_queued(
    relay_http: SocketAddr,
    tunnel: &str,
    range: std::ops::Range<usize>,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    for i in range {
        let url = format!("http://{relay_http}/t/{tunnel}/n/{i}");
        let (status, headers, body) =
            send(http::Request::post(&url).body(full(format!("{{\"n\":{i}}}")))?).await?;
        anyhow::ensure!(
            status == StatusCode::ACCEPTED,
            "webhook {i}: {status} {}",
            String::from_utf8_lossy(&body)
        );
        let json: serde_json::Value = serde_json::from_slice(&body)?;
        let id = json["delivery_id"].as_str().unwrap_or_default().to_owned();
        anyhow::ensure!(
            headers.get("x-hookrelay-delivery-id").map(|v| v.as_bytes()) == Some(id.as_bytes()),
            "the 202 names its delivery id in the header too"
        );
        ids.push(id);
    }
    Ok(ids)
}

// ---------------------------------------------------------------- in-process

#[tokio::test]
async fn sync_tunnel_queues_while_offline_and_delivers_on_reconnect() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = relay.agent("laptop", &app.target()).await?;
    // Sync while online: the sender gets the app's own answer.
    assert_eq!(
        post(&relay.url("laptop", "/live"), "{}").await?.0,
        StatusCode::OK
    );
    agent.shutdown().await?;

    let ids = post_queued(relay.http_addr(), "laptop", 0..20).await?;
    assert_eq!(relay.relay.queue().stats(&"laptop".parse()?).count, 20);
    assert_eq!(
        app.received().len(),
        1,
        "nothing reaches the app while the agent is away"
    );

    let agent = relay.agent("laptop", &app.target()).await?;
    until(WAIT, "20 queued webhooks at the app", || {
        app.received().len() == 21
    })
    .await?;
    let got = delivery_ids(&app);
    assert_eq!(got[1..], ids[..], "every webhook once, in arrival order");
    let paths: Vec<String> = app.received()[1..].iter().map(|r| r.uri.clone()).collect();
    let expected: Vec<String> = (0..20).map(|i| format!("/n/{i}")).collect();
    assert_eq!(paths, expected);
    // Acknowledged ones leave the relay's queue.
    until_queue_empty(&relay, "laptop").await?;
    // Recorded as queued deliveries, first attempt, not failed.
    let page = agent.history().list(&Filter::default(), None, 100)?;
    let queued: Vec<_> = page
        .exchanges
        .iter()
        .filter(|e| e.queued.is_some())
        .collect();
    assert_eq!(queued.len(), 20);
    assert!(queued.iter().all(|e| e
        .queued
        .as_ref()
        .is_some_and(|q| q.attempt == 1 && !q.failed)));
    agent.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn queue_mode_answers_202_at_once_even_while_online() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let mut config = relay.agent_config(Some("async"), &app.target());
    config.settings = queue_mode();
    let agent = connected_agent(config).await?;
    // The app takes 3 s on /slow; the sender does not wait for it.
    let started = Instant::now();
    let (status, _, body) = post(&relay.url("async", "/slow"), "{}").await?;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "202 came after the app"
    );
    let json: serde_json::Value = serde_json::from_slice(&body)?;
    assert_eq!(json["status"], "queued");
    assert_eq!(json["tunnel"], "async");
    until(WAIT, "the queued webhook at the app", || {
        !app.received().is_empty()
    })
    .await?;
    assert_eq!(
        delivery_ids(&app),
        [json["delivery_id"].as_str().unwrap_or_default().to_owned()]
    );
    agent.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn when_offline_reject_answers_503_and_keeps_nothing() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let mut config = relay.agent_config(Some("strict"), &app.target());
    config.settings.when_offline = WhenOffline::Reject;
    let agent = connected_agent(config).await?;
    agent.shutdown().await?;
    let (status, headers, body) = post(&relay.url("strict", "/x"), "{}").await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(&body), "agent_offline");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(relay.relay.queue().stats(&"strict".parse()?).count, 0);
    Ok(())
}

#[tokio::test]
async fn relay_without_queueing_narrows_the_agents_settings() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn_with(|c| c.queue_enabled = false).await?;
    let mut config = relay.agent_config(Some("noq"), &app.target());
    config.settings = queue_mode();
    let agent = connected_agent(config).await?;
    // Sync despite asking for queue: the app's own answer comes back.
    assert_eq!(
        post(&relay.url("noq", "/status/201"), "{}").await?.0,
        StatusCode::CREATED
    );
    agent.shutdown().await?;
    assert_eq!(
        post(&relay.url("noq", "/x"), "{}").await?.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    Ok(())
}

/// (e) A full queue answers 503 with Retry-After, never a 4xx, and accepts
/// again once drained.
#[tokio::test]
async fn full_queue_answers_503_and_accepts_again_once_drained() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn_with(|c| {
        c.queue_limits.max_count = 5;
        c.queue_limits.max_bytes = 64 * 1024;
    })
    .await?;
    relay
        .agent("small", &app.target())
        .await?
        .shutdown()
        .await?;

    post_queued(relay.http_addr(), "small", 0..5).await?;
    let (status, headers, body) = post(&relay.url("small", "/n/5"), "{}").await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(&body), "queue_full");
    assert!(headers.contains_key("retry-after"), "{headers:?}");

    let agent = relay.agent("small", &app.target()).await?;
    until(WAIT, "the five at the app", || app.received().len() == 5).await?;
    until_queue_empty(&relay, "small").await?;
    agent.shutdown().await?;
    post_queued(relay.http_addr(), "small", 5..10).await?;

    // The byte bound too, with a body bigger than what is left.
    let big = vec![b'x'; 60 * 1024];
    let (status, _, body) =
        send(http::Request::post(relay.url("small", "/big")).body(full(big))?).await?;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(error_code(&body), "queue_full");
    Ok(())
}

/// An app whose answers the test scripts: `/flaky/N` fails with 503 (and
/// `Retry-After: 0`) until it has been called N times; `/always-500` always
/// fails; `/gone` answers 410; `/busy` answers 429 with `Retry-After: 2`
/// the first time. Records each path it is called with, and when.
#[derive(Clone, Default)]
struct ScriptedApp {
    calls: Arc<Mutex<Vec<(String, Instant)>>>,
}

impl ScriptedApp {
    async fn spawn_on(listener: tokio::net::TcpListener) -> ScriptedApp {
        let app = ScriptedApp::default();
        let calls = app.calls.clone();
        let router = axum::Router::new().fallback(move |req: Request| {
            let calls = calls.clone();
            async move {
                let path = req.uri().path().to_owned();
                let n = {
                    let mut calls = calls.lock().expect("lock");
                    calls.push((path.clone(), Instant::now()));
                    calls.iter().filter(|(p, _)| **p == path).count()
                };
                if path == "/busy" && n == 1 {
                    return Response::builder()
                        .status(429)
                        .header("retry-after", "2")
                        .body(Body::from("slow down"))
                        .expect("valid response");
                }
                let status = if let Some(k) = path.strip_prefix("/flaky/") {
                    let needed: usize = k.parse().unwrap_or(1);
                    if n < needed {
                        503
                    } else {
                        200
                    }
                } else if path == "/always-500" {
                    500
                } else if path == "/gone" {
                    410
                } else {
                    200
                };
                Response::builder()
                    .status(status)
                    .header("retry-after", "0")
                    .body(Body::from(format!("call {n}")))
                    .expect("valid response")
            }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        app
    }

    fn calls(&self) -> Vec<String> {
        self.calls
            .lock()
            .expect("lock")
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    }

    fn times(&self, path: &str) -> Vec<Instant> {
        self.calls
            .lock()
            .expect("lock")
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, t)| *t)
            .collect()
    }
}

/// (d) An app that is down for a while gets everything once it is back, in
/// order; 5xx answers are retried with backoff, and a webhook that keeps
/// failing is marked failed after the last attempt and can be replayed.
#[tokio::test]
async fn down_app_gets_everything_when_back_and_failures_are_retried_then_marked(
) -> anyhow::Result<()> {
    let relay = TestRelay::spawn().await?;
    let port = dead_port().await?;
    let mut config = relay.agent_config(Some("retry"), &format!("127.0.0.1:{port}"));
    config.settings = queue_mode();
    config.inspect = Some("127.0.0.1:0".parse()?);
    config.retry = RetryPolicy {
        attempts: 3,
        initial: Duration::from_millis(50),
        max: Duration::from_millis(200),
    };
    let agent = connected_agent(config).await?;

    for path in ["/a", "/flaky/3", "/always-500", "/gone", "/b"] {
        let (status, _, _) = post(&relay.url("retry", path), "{}").await?;
        assert_eq!(status, StatusCode::ACCEPTED, "{path}");
    }
    // The app is down for a while: nothing is lost, no attempt is used up,
    // and the inspector says how many wait.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let inspector = agent
        .inspector_addr()
        .ok_or_else(|| anyhow::anyhow!("inspector"))?;
    let (_, _, body) =
        send(http::Request::get(format!("http://{inspector}/api/status")).body(full(""))?).await?;
    let status: serde_json::Value = serde_json::from_slice(&body)?;
    assert_eq!(status["queued_waiting"], 5, "{status}");
    assert_eq!(status["mode"], "queue");
    assert_eq!(
        agent
            .history()
            .list(&Filter::default(), None, 100)?
            .exchanges
            .len(),
        0,
        "connection refusals are not recorded as attempts"
    );
    let app =
        ScriptedApp::spawn_on(tokio::net::TcpListener::bind(("127.0.0.1", port)).await?).await;
    until(WAIT, "every webhook settled", || recorded(&agent) >= 9).await?;
    // In order: /a, /flaky/3 three times (503, 503, 200), /always-500 three
    // times, /gone once (410 is final), /b.
    assert_eq!(
        app.calls(),
        [
            "/a",
            "/flaky/3",
            "/flaky/3",
            "/flaky/3",
            "/always-500",
            "/always-500",
            "/always-500",
            "/gone",
            "/b"
        ]
    );
    let page = agent.history().list(&Filter::default(), None, 100)?;
    let failed: Vec<_> = page
        .exchanges
        .iter()
        .filter(|e| e.queued.as_ref().is_some_and(|q| q.failed))
        .collect();
    assert_eq!(failed.len(), 1, "only /always-500 is marked failed");
    assert_eq!(failed[0].path, "/always-500");
    assert_eq!(failed[0].queued.as_ref().map(|q| q.attempt), Some(3));
    let retried = page
        .exchanges
        .iter()
        .filter(|e| {
            e.path == "/flaky/3"
                && e.queued
                    .as_ref()
                    .is_some_and(|q| q.next_attempt_at_ms.is_some())
        })
        .count();
    assert_eq!(
        retried, 2,
        "the first two /flaky attempts scheduled another"
    );
    // The failed one is replayable from the history.
    let replay = relay_client::replay::Replayer::new(
        agent.history().clone(),
        None,
        Arc::new(SecretSet::new()),
    );
    let again = replay.replay(failed[0].id, &Default::default()).await?;
    assert_eq!(again.status(), Some(500));
    agent.shutdown().await?;
    Ok(())
}

/// (f) Provider duplicates in the queue are suppressed and shown.
#[tokio::test]
async fn queued_provider_duplicates_are_suppressed_and_recorded() -> anyhow::Result<()> {
    const SECRET: &str = "It's a Secret to Everybody";
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let mut config = relay.agent_config(Some("gh"), &app.target());
    config.settings = queue_mode();
    let mut secrets = SecretSet::new();
    secrets.add(Provider::Github, SECRET.into())?;
    config.secrets = secrets;
    let agent = connected_agent(config).await?;

    let now = i64::try_from(relay_client::history::now_ms() / 1000)?;
    let body = r#"{"action":"opened"}"#;
    for _ in 0..3 {
        let mut headers = vec![
            (
                "x-github-delivery".to_owned(),
                b"72d3162e-cc78-11e3-81ab-4c9367dc0958".to_vec(),
            ),
            ("x-github-event".to_owned(), b"issues".to_vec()),
        ];
        signature::resign(Provider::Github, SECRET, &mut headers, body.as_bytes(), now)?;
        let mut req = http::Request::post(relay.url("gh", "/github"));
        for (n, v) in &headers {
            req = req.header(n.as_str(), v.as_slice());
        }
        let (status, _, _) = send(req.body(full(body))?).await?;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    until(WAIT, "three recorded", || recorded(&agent) == 3).await?;
    assert_eq!(app.received().len(), 1, "the app gets the event once");
    let page = agent.history().list(&Filter::default(), None, 10)?;
    let first = page
        .exchanges
        .iter()
        .find(|e| e.duplicate_of.is_none())
        .ok_or_else(|| anyhow::anyhow!("no first"))?;
    let dups: Vec<_> = page
        .exchanges
        .iter()
        .filter(|e| e.duplicate_of == Some(first.id))
        .collect();
    assert_eq!(dups.len(), 2);
    assert!(dups.iter().all(|e| e.status() == Some(200)));
    agent.shutdown().await?;
    Ok(())
}

// ------------------------------------------------------------ real processes

/// A `relay-server` process.
struct RelayProcess {
    child: Child,
    http: SocketAddr,
    quic: SocketAddr,
    admin: SocketAddr,
    fingerprint: String,
}

impl RelayProcess {
    /// Starts the relay on `data_dir`, on the given addresses (or free ones).
    async fn start(
        data_dir: &Path,
        addrs: Option<(SocketAddr, SocketAddr, SocketAddr)>,
        extra: &[&str],
    ) -> anyhow::Result<RelayProcess> {
        let (http, quic, admin) = match addrs {
            Some((h, q, a)) => (h.to_string(), q.to_string(), a.to_string()),
            None => (
                "127.0.0.1:0".into(),
                "127.0.0.1:0".into(),
                "127.0.0.1:0".into(),
            ),
        };
        let mut child = command(relay_server_bin())
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--http", &http, "--quic", &quic, "--admin", &admin])
            .args(extra)
            .spawn()?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow::anyhow!("stderr"))?;
        let mut lines = BufReader::new(stderr).lines();
        let listening = line_with(&mut lines, "relay listening").await?;
        // Keep reading so the relay never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(RelayProcess {
            child,
            http: field(&listening, "http_addr")?.parse()?,
            quic: field(&listening, "quic_addr")?.parse()?,
            admin: field(&listening, "admin_addr")?.parse()?,
            fingerprint: field(&listening, "fingerprint")?,
        })
    }

    fn addrs(&self) -> (SocketAddr, SocketAddr, SocketAddr) {
        (self.http, self.quic, self.admin)
    }
}

async fn kill9(child: &mut Child) -> anyhow::Result<()> {
    let pid = child
        .id()
        .ok_or_else(|| anyhow::anyhow!("process already gone"))?;
    let status = tokio::process::Command::new("kill")
        .arg("-KILL")
        .arg(pid.to_string())
        .status()
        .await?;
    anyhow::ensure!(status.success(), "kill -9 failed");
    tokio::time::timeout(WAIT, child.wait()).await??;
    Ok(())
}

/// A `relay-client http` process holding `tunnel`.
async fn start_agent(
    relay: &RelayProcess,
    token: &str,
    tunnel: &str,
    target: &str,
    data_dir: &Path,
    extra: &[&str],
) -> anyhow::Result<Child> {
    let mut child = command(relay_client_bin())
        .args([
            "http",
            target,
            "--relay",
            &relay.quic.to_string(),
            "--token",
            token,
            "--tunnel",
            tunnel,
        ])
        .args(["--relay-cert-sha256", &relay.fingerprint, "--quiet"])
        // The inspector only when the test asks for one.
        .args((!extra.contains(&"--inspect")).then_some("--no-inspect"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    line_with(&mut lines, "forwarding").await?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("stderr"))?;
    let mut errs = BufReader::new(stderr).lines();
    tokio::spawn(async move { while let Ok(Some(_)) = errs.next_line().await {} });
    Ok(child)
}

/// Waits until the relay holds no tunnel: a departed agent's goodbye is read.
async fn until_offline(relay: &RelayProcess) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, _, body) =
            send(http::Request::get(format!("http://{}/healthz", relay.admin)).body(full(""))?)
                .await?;
        let health: serde_json::Value = serde_json::from_slice(&body)?;
        if health["tunnels_online"] == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the relay still routes to a stopped agent"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn sigterm(child: &mut Child) -> anyhow::Result<()> {
    let pid = child
        .id()
        .ok_or_else(|| anyhow::anyhow!("process already gone"))?;
    tokio::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .await?;
    tokio::time::timeout(WAIT, child.wait()).await??;
    Ok(())
}

/// What the process-level queue tests start from: a relay, a token, an app,
/// and `tunnel` registered by an agent that then stopped (a tunnel must have
/// been held once to be queued for).
struct Offline {
    /// Holds the relay's and the agent's directories.
    _dir: tempfile::TempDir,
    relay_dir: PathBuf,
    agent_dir: PathBuf,
    token: String,
    app: TestApp,
    relay: RelayProcess,
}

impl Offline {
    async fn start(tunnel: &str) -> anyhow::Result<Offline> {
        let dir = tempfile::tempdir()?;
        let relay_dir = dir.path().join("relay");
        let agent_dir = dir.path().join("agent");
        let token = create_token(&relay_dir).await?;
        let app = TestApp::spawn().await?;
        let relay = RelayProcess::start(&relay_dir, None, &[]).await?;
        let mut agent = start_agent(&relay, &token, tunnel, &app.target(), &agent_dir, &[]).await?;
        sigterm(&mut agent).await?;
        until_offline(&relay).await?;
        Ok(Offline {
            _dir: dir,
            relay_dir,
            agent_dir,
            token,
            app,
            relay,
        })
    }
}

/// (a) + (b): 1,000 webhooks posted while the agent is offline all get 202;
/// the relay is killed with SIGKILL right after and restarted; then the agent
/// connects and the app gets all 1,000 exactly once, in order.
#[tokio::test]
async fn thousand_offline_webhooks_survive_relay_kill_and_arrive_once_in_order(
) -> anyhow::Result<()> {
    let Offline {
        _dir,
        relay_dir,
        agent_dir,
        token,
        app,
        mut relay,
    } = Offline::start("bulk").await?;

    let ids = post_queued(relay.http, "bulk", 0..1000).await?;
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        1000,
        "distinct delivery ids"
    );

    // Every 202 was flushed before it was sent: SIGKILL loses nothing.
    let addrs = relay.addrs();
    kill9(&mut relay.child).await?;
    let relay = RelayProcess::start(&relay_dir, Some(addrs), &[]).await?;
    let (_, _, body) =
        send(http::Request::get(format!("http://{}/api/queue", relay.admin)).body(full(""))?)
            .await?;
    let list: serde_json::Value = serde_json::from_slice(&body)?;
    assert_eq!(list[0]["tunnel"], "bulk");
    assert_eq!(list[0]["count"], 1000, "{list}");
    assert!(list[0]["oldest_age_secs"].is_u64());

    let _agent = start_agent(&relay, &token, "bulk", &app.target(), &agent_dir, &[]).await?;
    until(DRAIN_WAIT, "1,000 webhooks at the app", || {
        app.received().len() >= 1000
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        delivery_ids(&app),
        ids,
        "exactly once each, in arrival order"
    );
    // Acknowledged, so gone from the relay.
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, _, body) =
            send(http::Request::get(format!("http://{}/api/queue", relay.admin)).body(full(""))?)
                .await?;
        if serde_json::from_slice::<serde_json::Value>(&body)? == serde_json::json!([]) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "queue never emptied: {}",
            String::from_utf8_lossy(&body)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// (c): the agent is killed with SIGKILL eight times while draining 1,000
/// queued webhooks — five times as it starts (while the relay streams it the
/// backlog), then at 100, 500 and 900 — and restarted: no webhook reaches the
/// app twice, and every one reaches it or (at most one per kill, the one in
/// the app's hands) is recorded as interrupted. (Kills as it starts once
/// found a webhook stored twice: see the outbox's
/// `an_entry_on_disk_without_its_delivery_id_is_not_stored_twice_and_strays_go`.)
#[tokio::test]
async fn agent_killed_mid_drain_loses_none_and_duplicates_none() -> anyhow::Result<()> {
    let Offline {
        _dir,
        agent_dir,
        token,
        app,
        relay,
        ..
    } = Offline::start("kill").await?;
    let ids = post_queued(relay.http, "kill", 0..1000).await?;

    let kills = [1usize, 2, 3, 5, 8, 100, 500, 900];
    for kill_at in kills {
        let mut agent = start_agent(&relay, &token, "kill", &app.target(), &agent_dir, &[]).await?;
        until(DRAIN_WAIT, "the drain to get going", || {
            app.received().len() >= kill_at
        })
        .await?;
        kill9(&mut agent).await?;
    }
    let (mut agent, inspect) =
        start_agent_inspected(&relay, &token, "kill", &app.target(), &agent_dir).await?;
    until_drained(&relay, &inspect, &app, 0).await?;
    sigterm(&mut agent).await?;

    let got = delivery_ids(&app);
    let mut counts: HashMap<&String, usize> = HashMap::new();
    for id in &got {
        *counts.entry(id).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered twice: {twice:?}");
    let expected_order: Vec<String> = ids
        .iter()
        .filter(|id| counts.contains_key(id))
        .cloned()
        .collect();
    assert_eq!(got, expected_order, "in arrival order");

    // A webhook in the app's hands at a kill is not sent again (at most
    // once); it must be in the history as interrupted, replayable.
    let history = relay_client::history::History::open(
        &agent_dir,
        relay_client::history::Retention {
            max_exchanges: u64::MAX,
            max_bytes: u64::MAX,
        },
    )?;
    // Every page: a list answers at most MAX_PAGE (500) exchanges, and the
    // first kill's interrupted record is among the oldest.
    let mut interrupted: HashSet<String> = HashSet::new();
    let mut before = None;
    loop {
        let page = history.list(&Filter::default(), before, usize::MAX)?;
        interrupted.extend(
            page.exchanges
                .iter()
                .filter(|e| e.queued.as_ref().is_some_and(|q| q.interrupted))
                .filter_map(|e| e.delivery_id.clone()),
        );
        match page.next_before {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    assert!(
        interrupted.len() <= kills.len(),
        "at most one per kill: {interrupted:?}"
    );
    let missing: Vec<&String> = ids.iter().filter(|id| !counts.contains_key(id)).collect();
    for id in &missing {
        assert!(
            interrupted.contains(*id),
            "{id} neither reached the app nor is recorded as interrupted"
        );
    }
    Ok(())
}

/// Bodies over 4 KiB are files on both sides (the relay's `queue-bodies/`,
/// the agent's `outbox-bodies/`), not sled values: 40 of 20-330 KB posted
/// while the agent is offline, the relay killed with SIGKILL and restarted,
/// the agent killed mid-drain and restarted. Every body reaches the app byte
/// for byte (but the one the app may have had at the kill, recorded as
/// interrupted), none twice, and once all are through neither directory
/// holds a file.
#[tokio::test]
async fn large_queued_bodies_survive_kills_byte_for_byte_and_their_files_go() -> anyhow::Result<()>
{
    let Offline {
        _dir,
        relay_dir,
        agent_dir,
        token,
        app,
        mut relay,
    } = Offline::start("large").await?;
    let mut posted: HashMap<String, Vec<u8>> = HashMap::new();
    for i in 0..40usize {
        let body: Vec<u8> = (0..20_000 + i * 7_919)
            .map(|j| ((j * 31 + i * 17) % 251) as u8)
            .collect();
        let url = format!("http://{}/t/large/big/{i}", relay.http);
        let (status, _, answer) = send(http::Request::post(&url).body(full(body.clone()))?).await?;
        anyhow::ensure!(status == StatusCode::ACCEPTED, "webhook {i}: {status}");
        let json: serde_json::Value = serde_json::from_slice(&answer)?;
        let id = json["delivery_id"].as_str().unwrap_or_default().to_owned();
        posted.insert(id, body);
    }
    let files = |dir: PathBuf| std::fs::read_dir(dir).map_or(0, Iterator::count);
    assert_eq!(files(relay_dir.join("queue-bodies")), 40);

    let addrs = relay.addrs();
    kill9(&mut relay.child).await?;
    let relay = RelayProcess::start(&relay_dir, Some(addrs), &[]).await?;
    let mut agent = start_agent(&relay, &token, "large", &app.target(), &agent_dir, &[]).await?;
    until(DRAIN_WAIT, "the drain to get going", || {
        app.received().len() >= 10
    })
    .await?;
    kill9(&mut agent).await?;
    let (mut agent, inspect) =
        start_agent_inspected(&relay, &token, "large", &app.target(), &agent_dir).await?;
    until_drained(&relay, &inspect, &app, 39).await?;
    until(WAIT, "the delivered bodies' files to go", || {
        files(relay_dir.join("queue-bodies")) == 0 && files(agent_dir.join("outbox-bodies")) == 0
    })
    .await?;
    sigterm(&mut agent).await?;

    let mut seen = HashSet::new();
    for got in app.received() {
        let id = got
            .header("x-hookrelay-delivery-id")
            .first()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        let Some(body) = posted.get(&id) else {
            anyhow::bail!("the app got an unknown delivery {id}");
        };
        assert!(got.body.as_ref() == body.as_slice(), "body of {id} differs");
        assert!(seen.insert(id.clone()), "{id} delivered twice");
    }
    assert!(seen.len() >= 39, "{} of 40 delivered", seen.len());
    Ok(())
}

/// `relay-server queue list|show|purge`, through the running relay and
/// straight from the store once it is stopped.
#[tokio::test]
async fn operators_list_show_and_purge_queues() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let relay_dir = dir.path().join("relay");
    let token = create_token(&relay_dir).await?;
    let app = TestApp::spawn().await?;
    let mut relay = RelayProcess::start(&relay_dir, None, &[]).await?;
    for tunnel in ["ops-a", "ops-b"] {
        let mut agent = start_agent(
            &relay,
            &token,
            tunnel,
            &app.target(),
            &dir.path().join(tunnel),
            &[],
        )
        .await?;
        sigterm(&mut agent).await?;
    }
    until_offline(&relay).await?;
    let ids = post_queued(relay.http, "ops-a", 0..3).await?;
    post_queued(relay.http, "ops-b", 0..2).await?;

    let queue_cmd = |args: &[&str]| {
        let mut cmd = command(relay_server_bin());
        cmd.arg("queue")
            .args(args)
            .arg("--data-dir")
            .arg(&relay_dir)
            .args(["--admin", &relay.admin.to_string()]);
        cmd
    };
    let out = queue_cmd(&["list", "--json"]).output().await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(list[0]["tunnel"], "ops-a");
    assert_eq!(list[0]["count"], 3);
    assert_eq!(list[1]["count"], 2);
    let out = queue_cmd(&["list"]).output().await?;
    let table = String::from_utf8(out.stdout)?;
    assert!(
        table.contains("ops-a") && table.contains("ops-b"),
        "{table}"
    );

    let out = queue_cmd(&["show", "--tunnel", "ops-a", "--json"])
        .output()
        .await?;
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let listed: Vec<&str> = shown["entries"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["delivery_id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(listed, ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(shown["entries"][0]["path"], "/n/0");

    let out = queue_cmd(&["purge", "--tunnel", "ops-a"]).output().await?;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("purged 3"));

    // Stopped relay: the same commands read the store itself.
    sigterm(&mut relay.child).await?;
    let out = queue_cmd(&["list", "--json"]).output().await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["tunnel"], "ops-b");
    let out = queue_cmd(&["show", "--tunnel", "ops-b"]).output().await?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("/n/1"));
    Ok(())
}

/// A 429 with `Retry-After` is honoured: the next attempt waits at least that
/// long, not the (much shorter) backoff step.
#[tokio::test]
async fn retry_after_from_the_app_is_honoured() -> anyhow::Result<()> {
    let relay = TestRelay::spawn().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let app = ScriptedApp::spawn_on(listener).await;
    let mut config = relay.agent_config(Some("busy"), &format!("127.0.0.1:{port}"));
    config.settings = queue_mode();
    config.retry = RetryPolicy {
        attempts: 3,
        initial: Duration::from_millis(50),
        max: Duration::from_secs(10),
    };
    let agent = connected_agent(config).await?;
    assert_eq!(
        post(&relay.url("busy", "/busy"), "{}").await?.0,
        StatusCode::ACCEPTED
    );
    until(WAIT, "the second attempt", || app.times("/busy").len() == 2).await?;
    let times = app.times("/busy");
    let gap = times[1] - times[0];
    assert!(
        gap >= Duration::from_millis(1900),
        "retried after {gap:?}, before Retry-After: 2"
    );
    until(WAIT, "both attempts recorded", || recorded(&agent) == 2).await?;
    agent.shutdown().await?;
    Ok(())
}

/// The relay is killed with SIGKILL while it streams a backlog into the
/// agent, and restarted: the app still gets every webhook exactly once, in
/// arrival order. What the relay sends again (acknowledged by the agent, its
/// removal not yet on the relay's disk, which it syncs every 256 removals, or
/// sent and not yet acknowledged: at most 64) the agent recognises and counts.
#[tokio::test]
async fn relay_killed_mid_drain_loses_none_and_the_app_gets_each_once() -> anyhow::Result<()> {
    const N: usize = 2000;
    let Offline {
        _dir,
        relay_dir,
        agent_dir,
        token,
        app,
        mut relay,
    } = Offline::start("crash").await?;
    let ids = post_queued(relay.http, "crash", 0..N).await?;

    let (mut agent, inspect) =
        start_agent_inspected(&relay, &token, "crash", &app.target(), &agent_dir).await?;
    // Killed once a good part of the backlog is in the agent's hands (more
    // than two of the relay's syncs), before all of it is.
    let deadline = Instant::now() + DRAIN_WAIT;
    let left_at_kill = loop {
        let left = queued_count(&relay).await?;
        if left <= (N - 700) as u64 {
            break left;
        }
        anyhow::ensure!(Instant::now() < deadline, "the drain never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let addrs = relay.addrs();
    kill9(&mut relay.child).await?;
    anyhow::ensure!(
        left_at_kill > 0,
        "the relay had handed over the whole backlog before the kill: nothing tested"
    );
    let relay = RelayProcess::start(&relay_dir, Some(addrs), &[]).await?;
    let left_after = queued_count(&relay).await?;

    until_drained(&relay, &inspect, &app, N).await?;
    let (_, _, body) =
        send(http::Request::get(format!("http://{inspect}/metrics")).body(full(""))?).await?;
    let text = String::from_utf8(body.to_vec())?;
    let repeats = text
        .lines()
        .find_map(|l| l.strip_prefix("hookrelay_agent_queued_repeats_total "))
        .ok_or_else(|| anyhow::anyhow!("no repeats counter in {text}"))?
        .trim()
        .parse::<u64>()?;
    sigterm(&mut agent).await?;
    assert_eq!(
        delivery_ids(&app),
        ids,
        "exactly once each, in arrival order"
    );
    // Sent again: at most one sync interval of acknowledged removals and
    // one window of unacknowledged sends.
    assert!(
        repeats <= 256 + 64,
        "{repeats} repeats; {left_at_kill} queued shortly before the kill, {left_after} after the restart"
    );
    Ok(())
}

/// [`start_agent`] with the inspector on a free port, whose address it returns.
async fn start_agent_inspected(
    relay: &RelayProcess,
    token: &str,
    tunnel: &str,
    target: &str,
    data_dir: &Path,
) -> anyhow::Result<(Child, String)> {
    let inspect = format!("127.0.0.1:{}", dead_port().await?);
    let agent = start_agent(
        relay,
        token,
        tunnel,
        target,
        data_dir,
        &["--inspect", &inspect],
    )
    .await?;
    Ok((agent, inspect))
}

/// Waits until the relay's queue and the agent's outbox are both empty and
/// the app has received at least `at_app` requests.
async fn until_drained(
    relay: &RelayProcess,
    inspect: &str,
    app: &TestApp,
    at_app: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + DRAIN_WAIT;
    loop {
        let (_, _, body) =
            send(http::Request::get(format!("http://{inspect}/api/status")).body(full(""))?)
                .await?;
        let status: serde_json::Value = serde_json::from_slice(&body)?;
        let n = app.received().len();
        if queued_count(relay).await? == 0 && status["queued_waiting"] == 0 && n >= at_app {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "drain did not finish: {n} at the app"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Webhooks the relay holds queued, over all tunnels.
async fn queued_count(relay: &RelayProcess) -> anyhow::Result<u64> {
    let (_, _, body) =
        send(http::Request::get(format!("http://{}/api/queue", relay.admin)).body(full(""))?)
            .await?;
    let list: serde_json::Value = serde_json::from_slice(&body)?;
    Ok(list
        .as_array()
        .map(|tunnels| tunnels.iter().filter_map(|t| t["count"].as_u64()).sum())
        .unwrap_or(0))
}
