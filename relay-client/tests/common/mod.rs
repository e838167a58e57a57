//! Test harness: a real relay, real agents and a real local app, all on
//! `127.0.0.1:0`, plus a plain HTTP client for senders.
#![allow(dead_code)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use axum::{body::Body, extract::Request, response::Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use relay_client::{Agent, Config as AgentConfig, Secret, Target, Trust};
use relay_server::{Config as RelayConfig, Relay};
use tokio::sync::mpsc;

/// Generous bound on every network wait in tests.
pub const WAIT: Duration = Duration::from_secs(30);

/// A relay on loopback with a token that grants every tunnel.
pub struct TestRelay {
    pub relay: Relay,
    pub token: String,
    pub dir: tempfile::TempDir,
}

impl TestRelay {
    pub async fn spawn() -> anyhow::Result<TestRelay> {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(tweak: impl FnOnce(&mut RelayConfig)) -> anyhow::Result<TestRelay> {
        let dir = tempfile::tempdir()?;
        let mut config = RelayConfig::loopback(dir.path().join("relay"));
        tweak(&mut config);
        let relay = Relay::spawn(config).await.context("relay spawn")?;
        let token = relay.tokens().create("test", vec!["*".parse()?])?;
        Ok(TestRelay { relay, token, dir })
    }

    /// Public path-style URL of `path` on `tunnel`.
    pub fn url(&self, tunnel: &str, path: &str) -> String {
        format!("http://{}/t/{tunnel}{path}", self.http_addr())
    }

    /// The HTTP ingress's address (on in every test relay).
    pub fn http_addr(&self) -> SocketAddr {
        self.relay.http_addr().expect("test relays listen for HTTP")
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        let fingerprint = self
            .relay
            .cert_fingerprint()
            .expect("a self-signed test relay has a fingerprint");
        relay_client::config::parse_fingerprint(&fingerprint)
            .expect("relay prints a valid fingerprint")
    }

    /// Agent settings for `tunnel`, forwarding to `target`, with its own data dir.
    pub fn agent_config(&self, tunnel: Option<&str>, target: &str) -> AgentConfig {
        self.agent_config_in(
            &self
                .dir
                .path()
                .join(format!("agent-{}", tunnel.unwrap_or("default"))),
            tunnel,
            target,
        )
    }

    pub fn agent_config_in(
        &self,
        data_dir: &Path,
        tunnel: Option<&str>,
        target: &str,
    ) -> AgentConfig {
        AgentConfig {
            relay: self.relay.quic_addr().to_string(),
            relay_ip: None,
            token: Secret::new(self.token.clone()),
            tunnel: tunnel.map(|t| t.parse().expect("valid tunnel name in test")),
            target: target.parse::<Target>().expect("valid target in test"),
            trust: Trust::Pinned(self.fingerprint()),
            data_dir: data_dir.to_path_buf(),
            inspect: None,
            print_deliveries: false,
            dedupe: true,
            log_format: relay_client::config::LogFormat::Text,
            max_backoff: Duration::from_millis(500),
            secrets: Default::default(),
            redaction: Default::default(),
            retention: Default::default(),
            settings: Default::default(),
            retry: Default::default(),
            policy: Default::default(),
            max_deliveries: relay_client::config::DEFAULT_MAX_DELIVERIES,
        }
    }

    /// An agent holding `tunnel` and forwarding to `target`, connected.
    pub async fn agent(&self, tunnel: &str, target: &str) -> anyhow::Result<Agent> {
        connected_agent(self.agent_config(Some(tunnel), target)).await
    }

    /// The same, with its inspector on a free loopback port.
    pub async fn inspected_agent(&self, tunnel: &str, target: &str) -> anyhow::Result<Agent> {
        let mut config = self.agent_config(Some(tunnel), target);
        config.inspect = Some("127.0.0.1:0".parse()?);
        connected_agent(config).await
    }
}

/// Starts an agent with `config` and waits until it holds its tunnel.
pub async fn connected_agent(config: AgentConfig) -> anyhow::Result<Agent> {
    let agent = tokio::time::timeout(WAIT, Agent::spawn(config)).await??;
    tokio::time::timeout(WAIT, agent.connected()).await??;
    Ok(agent)
}

/// Polls `check` every 50 ms until it holds or `limit` passes.
pub async fn until(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Waits until the agent has recorded `n` exchanges (recording completes just
/// after the sender has its answer).
pub async fn recorded(agent: &Agent, n: usize) -> anyhow::Result<()> {
    tokio::time::timeout(WAIT, async {
        while agent.history().len() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await?;
    Ok(())
}

/// What the local app received.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
}

impl Received {
    pub fn header(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    }
}

/// A local app on loopback that records every request it fully received.
///
/// Paths: `/echo…` answers with the request body and content type; `/slow…`
/// waits 3 s; `/status/N` answers with status N; `/concurrent…` waits 200 ms;
/// anything else answers 200 with JSON and two `set-cookie` headers.
pub struct TestApp {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
}

impl TestApp {
    pub async fn spawn() -> anyhow::Result<TestApp> {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let log = received.clone();
        let app = axum::Router::new().fallback(move |req: Request| {
            let log = log.clone();
            async move { record_and_answer(req, log).await }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(TestApp { addr, received })
    }

    pub fn target(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }
}

async fn record_and_answer(req: Request, log: Arc<Mutex<Vec<Received>>>) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Body::from("body broke"))
            .expect("static response");
    };
    let uri = parts.uri.to_string();
    let headers = parts
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    log.lock().expect("lock").push(Received {
        method: parts.method.to_string(),
        uri: uri.clone(),
        headers,
        body: body.clone(),
    });
    let path = parts.uri.path();
    if path.starts_with("/echo") {
        let mut b = Response::builder().status(200);
        if let Some(ct) = parts.headers.get("content-type") {
            b = b.header("content-type", ct);
        }
        return b.body(Body::from(body)).expect("valid response");
    }
    if path.starts_with("/slow") {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    if path.starts_with("/concurrent") {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(code) = path
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
    {
        return Response::builder()
            .status(code)
            .header("x-app", "status")
            .body(Body::from(format!("status {code}")))
            .expect("valid response");
    }
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("x-app", "yes")
        .header("set-cookie", "a=1")
        .header("set-cookie", "b=2")
        .body(Body::from(r#"{"ok":true}"#))
        .expect("valid response")
}

pub type TestBody = BoxBody<Bytes, std::io::Error>;

/// A plain HTTP/1.1 client for senders.
pub fn client() -> Client<HttpConnector, TestBody> {
    Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

pub fn full(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

/// A chunked body fed from a channel: the test decides when each chunk goes.
pub fn channel_body() -> (mpsc::Sender<Bytes>, TestBody) {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::io::Error>(Frame::data(b)), rx))
    });
    (tx, StreamBody::new(stream).boxed())
}

/// Sends a request and collects the whole answer.
pub async fn send(req: http::Request<TestBody>) -> anyhow::Result<(StatusCode, HeaderMap, Bytes)> {
    let resp = tokio::time::timeout(WAIT, client().request(req)).await??;
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(WAIT, body.collect())
        .await??
        .to_bytes();
    Ok((parts.status, parts.headers, body))
}

pub async fn post(url: &str, body: &'static str) -> anyhow::Result<(StatusCode, HeaderMap, Bytes)> {
    send(http::Request::post(url).body(full(body))?).await
}

/// The JSON `error` code of a relay error response.
pub fn error_code(body: &Bytes) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| format!("<not a relay error: {}>", String::from_utf8_lossy(body)))
}

/// A loopback port with nothing listening on it.
pub async fn dead_port() -> anyhow::Result<u16> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(l.local_addr()?.port())
}

pub fn data_dir(base: &Path, name: &str) -> PathBuf {
    base.join(name)
}

/// The agent binary cargo built for these tests.
pub fn relay_client_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_relay-client"))
}

/// The relay binary; `cargo test --workspace` builds every package's
/// binaries before running tests.
pub fn relay_server_bin() -> PathBuf {
    let path =
        relay_client_bin().with_file_name(format!("relay-server{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`",
        path.display()
    );
    path
}

/// The value of `key=value` in a log line.
pub fn field(line: &str, key: &str) -> anyhow::Result<String> {
    let start = line
        .find(&format!("{key}="))
        .ok_or_else(|| anyhow::anyhow!("no {key} in {line}"))?
        + key.len()
        + 1;
    Ok(line[start..]
        .split_whitespace()
        .next()
        .unwrap_or("")
        .trim_matches('"')
        .to_owned())
}

/// `bin` with a clean environment (no `HOOKRELAY_*` or `RUST_LOG` from the
/// caller), piped output, and killed if the test drops it.
pub fn command(bin: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (key, _) in std::env::vars() {
        if key.starts_with("HOOKRELAY_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Reads lines until one contains `needle`; returns it.
pub async fn line_with<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut tokio::io::Lines<R>,
    needle: &str,
) -> anyhow::Result<String> {
    let found = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await? {
            if line.contains(needle) {
                return Ok(line);
            }
        }
        anyhow::bail!("output ended without a line containing {needle:?}")
    })
    .await
    .map_err(|_| anyhow::anyhow!("no line containing {needle:?} within {WAIT:?}"))??;
    Ok(found)
}

/// A token for every tunnel, made with `relay-server token create` in
/// `relay_dir`.
pub async fn create_token(relay_dir: &std::path::Path) -> anyhow::Result<String> {
    let out = command(relay_server_bin())
        .arg("token")
        .arg("create")
        .arg("--data-dir")
        .arg(relay_dir)
        .args(["--name", "t", "--tunnels", "*"])
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// Reads from `conn` until a whole request head has arrived: the bytes so
/// far (for raw-TCP apps that answer however a test needs).
pub async fn read_head(conn: &mut tokio::net::TcpStream) -> anyhow::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "the request ended before its head");
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(seen)
}
