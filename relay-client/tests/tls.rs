//! TLS at the relay, with the built binaries: one certificate for the HTTPS
//! ingress and the QUIC endpoint, from files (a wildcard from a private CA,
//! reloaded on SIGHUP) or from ACME (Debian's `pebble` on loopback), and
//! agents that check it against trusted roots (`SSL_CERT_FILE`) instead of a
//! pinned fingerprint.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use bytes::Bytes;
use common::*;
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::Child,
    sync::watch,
};

/// The relay's domain in these tests; `*.hookrelay.test` covers its tunnels.
const DOMAIN: &str = "hookrelay.test";

/// The relay's own name: what agents connect to and verify.
const RELAY_HOST: &str = "relay.hookrelay.test";

/// Longest wait for pebble to issue the relay's certificate: validation is
/// immediate (`PEBBLE_VA_NOSLEEP`), rustls-acme polls at 1, 2, 4… s.
const ACME_WAIT: Duration = Duration::from_secs(60);

/// A private CA that signs test certificates.
struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> anyhow::Result<TestCa> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ok(TestCa {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)?,
        })
    }

    /// Writes the CA certificate as PEM to `path`.
    fn write(&self, path: &Path) -> anyhow::Result<PathBuf> {
        std::fs::write(path, self.issuer.pem())?;
        Ok(path.to_owned())
    }

    /// Issues a certificate for `names`, written as PEM to `cert` and `key`.
    fn issue(&self, names: &[&str], cert: &Path, key: &Path) -> anyhow::Result<()> {
        let signing_key = KeyPair::generate()?;
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        let issued = params.signed_by(&signing_key, &self.issuer)?;
        std::fs::write(cert, issued.pem())?;
        std::fs::write(key, signing_key.serialize_pem())?;
        Ok(())
    }
}

/// Lines a child process writes, collected as they come, so that nothing
/// blocks on a full pipe and a failing test can show them.
#[derive(Clone)]
struct Output {
    lines: Arc<Mutex<Vec<String>>>,
    /// Line count, and whether the stream ended.
    progress: watch::Receiver<(usize, bool)>,
}

impl Output {
    fn capture(stream: impl AsyncRead + Unpin + Send + 'static) -> Output {
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, progress) = watch::channel((0, false));
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stream).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let mut all = sink.lock().expect("lock");
                all.push(line);
                tx.send_replace((all.len(), false));
            }
            let count = sink.lock().expect("lock").len();
            tx.send_replace((count, true));
        });
        Output { lines, progress }
    }

    fn text(&self) -> String {
        self.lines.lock().expect("lock").join("\n")
    }

    fn find(&self, needle: &str) -> Option<String> {
        self.lines
            .lock()
            .expect("lock")
            .iter()
            .find(|l| l.contains(needle))
            .cloned()
    }

    /// The first line containing `needle`, waiting up to `wait` for it.
    async fn line_with(&self, needle: &str, wait: Duration) -> anyhow::Result<String> {
        let mut progress = self.progress.clone();
        let found = tokio::time::timeout(wait, async {
            loop {
                if let Some(line) = self.find(needle) {
                    return Ok(line);
                }
                if progress.borrow_and_update().1 {
                    anyhow::bail!("output ended without {needle:?}");
                }
                if progress.changed().await.is_err() {
                    anyhow::bail!("output ended without {needle:?}");
                }
            }
        })
        .await;
        match found {
            Ok(Ok(line)) => Ok(line),
            Ok(Err(err)) => Err(err.context(self.text())),
            Err(_) => Err(anyhow::anyhow!(
                "no line with {needle:?} within {wait:?}:\n{}",
                self.text()
            )),
        }
    }
}

/// A `relay-server` process and what its `relay listening` line says.
struct RelayProcess {
    child: Child,
    log: Output,
    token: String,
    http: Option<SocketAddr>,
    https: SocketAddr,
    quic: SocketAddr,
}

impl RelayProcess {
    /// Creates a token in `dir`, then starts the relay there with `args`
    /// (every listener on loopback).
    async fn start(dir: &Path, args: &[&str]) -> anyhow::Result<RelayProcess> {
        let token = create_token(dir).await?;
        Self::restart(dir, token, args).await
    }

    /// Starts the relay on a data directory that has `token` already.
    async fn restart(dir: &Path, token: String, args: &[&str]) -> anyhow::Result<RelayProcess> {
        let mut child = command(relay_server_bin())
            .arg("--data-dir")
            .arg(dir)
            .args(["--quic", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(args)
            .spawn()?;
        let log = Output::capture(child.stderr.take().context("stderr")?);
        let listening = log.line_with("relay listening", WAIT).await?;
        let http = field(&listening, "http_addr")
            .ok()
            .map(|a| a.parse())
            .transpose()?;
        Ok(RelayProcess {
            child,
            log,
            token,
            http,
            https: field(&listening, "https_addr")?.parse()?,
            quic: field(&listening, "quic_addr")?.parse()?,
        })
    }

    /// What an agent passes as `--relay`: the relay's name and QUIC port.
    fn relay_arg(&self) -> String {
        format!("{RELAY_HOST}:{}", self.quic.port())
    }

    async fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.child.id().context("relay already gone")?;
        let status = tokio::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .await?;
        anyhow::ensure!(status.success(), "kill -{signal} failed");
        Ok(())
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        self.signal("TERM").await?;
        let status = tokio::time::timeout(WAIT, self.child.wait()).await??;
        anyhow::ensure!(
            status.success(),
            "relay exited with {status}:\n{}",
            self.log.text()
        );
        Ok(())
    }
}

/// `relay-client http` for `tunnel`, connecting to the relay by name (dialled
/// at 127.0.0.1) with no fingerprint: it trusts only the CA in `ca_file`.
fn agent_command(
    relay: &RelayProcess,
    tunnel: &str,
    target: &str,
    ca_file: &Path,
    data_dir: &Path,
) -> tokio::process::Command {
    let mut cmd = command(relay_client_bin());
    cmd.args(["http", target, "--relay", &relay.relay_arg()])
        .args(["--relay-ip", "127.0.0.1", "--token", &relay.token])
        .args(["--tunnel", tunnel, "--no-inspect"])
        .arg("--data-dir")
        .arg(data_dir)
        .env("SSL_CERT_FILE", ca_file)
        .env_remove("SSL_CERT_DIR");
    cmd
}

/// A running agent and its `forwarding` lines.
struct AgentProcess {
    child: Child,
    stdout: Output,
    stderr: Output,
}

impl AgentProcess {
    fn spawn(mut cmd: tokio::process::Command) -> anyhow::Result<AgentProcess> {
        let mut child = cmd.spawn()?;
        let stdout = Output::capture(child.stdout.take().context("stdout")?);
        let stderr = Output::capture(child.stderr.take().context("stderr")?);
        Ok(AgentProcess {
            child,
            stdout,
            stderr,
        })
    }

    /// Waits until it holds its tunnel: it prints `forwarding URL`, not
    /// `forwarding (waiting for the relay)`.
    async fn wait_connected(&self) -> anyhow::Result<()> {
        self.stdout
            .line_with("forwarding  https://", WAIT)
            .await
            .with_context(|| self.stderr.text())?;
        Ok(())
    }

    async fn connected(cmd: tokio::process::Command) -> anyhow::Result<AgentProcess> {
        let agent = Self::spawn(cmd)?;
        agent.wait_connected().await?;
        Ok(agent)
    }

    /// The public URLs it printed.
    fn urls(&self) -> Vec<String> {
        self.stdout
            .text()
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("forwarding"))
            .filter_map(|rest| rest.split_whitespace().next())
            .filter(|url| url.starts_with("http"))
            .map(str::to_owned)
            .collect()
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        tokio::time::timeout(WAIT, self.child.wait()).await??;
        Ok(())
    }
}

/// Roots for a test client: the certificates in a PEM file.
fn roots(pem: &Path) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pem)? {
        roots.add(cert?)?;
    }
    Ok(roots)
}

/// What an HTTPS request returned, and the certificate the server showed.
struct HttpsAnswer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    alpn: Option<Vec<u8>>,
    leaf: CertificateDer<'static>,
}

/// Sends `method path` over HTTPS to `addr`, with SNI and Host `host`, trusting
/// only `roots`, offering `alpn` (HTTP/2 when it says `h2`).
async fn https(
    addr: SocketAddr,
    host: &str,
    method: &str,
    path: &str,
    body: &'static str,
    roots: rustls::RootCertStore,
    alpn: &[&[u8]],
) -> anyhow::Result<HttpsAnswer> {
    https_as(addr, host, host, method, path, body, roots, alpn).await
}

/// [`https`] with a TLS server name (SNI) of its own, apart from the Host.
#[allow(clippy::too_many_arguments)]
async fn https_as(
    addr: SocketAddr,
    sni: &str,
    host: &str,
    method: &str,
    path: &str,
    body: &'static str,
    roots: rustls::RootCertStore,
    alpn: &[&[u8]],
) -> anyhow::Result<HttpsAnswer> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let answer = tokio::time::timeout(WAIT, async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let tls = connector
            .connect(ServerName::try_from(sni.to_owned())?, tcp)
            .await?;
        let (_, session) = tls.get_ref();
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        let leaf = session
            .peer_certificates()
            .and_then(|c| c.first())
            .context("no server certificate")?
            .clone()
            .into_owned();
        let authority = if host.contains(':') {
            host.to_owned()
        } else {
            format!("{host}:{}", addr.port())
        };
        let io = hyper_util::rt::TokioIo::new(tls);
        let request = |uri: String| {
            http::Request::builder()
                .method(method)
                .uri(uri)
                .header("content-type", "application/json")
                .body(full(body))
        };
        let response = if alpn.as_deref() == Some(b"h2") {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await?;
            tokio::spawn(conn);
            sender
                .send_request(request(format!("https://{authority}{path}"))?)
                .await?
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            let mut req = request(path.to_owned())?;
            req.headers_mut().insert("host", authority.parse()?);
            sender.send_request(req).await?
        };
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok::<_, anyhow::Error>(HttpsAnswer {
            status: parts.status,
            headers: parts.headers,
            body,
            alpn,
            leaf,
        })
    })
    .await??;
    Ok(answer)
}

fn header<'a>(received: &'a Received, name: &str) -> &'a str {
    received
        .header(name)
        .first()
        .and_then(|v| std::str::from_utf8(v).ok())
        .unwrap_or("")
}

#[tokio::test]
async fn wildcard_certificate_from_files_serves_https_and_quic_without_a_fingerprint(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new("Hookrelay test CA")?;
    let ca_file = ca.write(&dir.path().join("ca.pem"))?;
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    ca.issue(&[DOMAIN, &format!("*.{DOMAIN}")], &cert, &key)?;
    let cert_arg = cert.to_str().context("utf-8 path")?;
    let key_arg = key.to_str().context("utf-8 path")?;
    let relay = RelayProcess::start(
        &dir.path().join("relay"),
        &[
            "--domain",
            DOMAIN,
            "--http",
            "127.0.0.1:0",
            "--https",
            "127.0.0.1:0",
            "--tls-cert",
            cert_arg,
            "--tls-key",
            key_arg,
            "--header-timeout",
            "1s",
        ],
    )
    .await?;
    let http = relay.http.context("http ingress on")?;

    // The edge's limits hold for HTTPS too: a connection that never starts
    // its handshake is closed after the header timeout.
    let mut silent = tokio::net::TcpStream::connect(relay.https).await?;
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut silent, &mut buf))
        .await
        .context("a silent TLS connection stays open")?;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "closed, not answered: {read:?}"
    );

    // The agent trusts the CA through SSL_CERT_FILE and verifies QUIC with it.
    let app = TestApp::spawn().await?;
    let agent = AgentProcess::connected(agent_command(
        &relay,
        "alice",
        &app.target(),
        &ca_file,
        &dir.path().join("agent"),
    ))
    .await?;
    let port = relay.https.port();
    agent
        .stdout
        .line_with(&format!("https://alice.{DOMAIN}"), WAIT)
        .await?;
    assert_eq!(
        agent.urls(),
        [
            format!("https://{DOMAIN}:{port}/t/alice/"),
            format!("https://alice.{DOMAIN}:{port}/"),
        ],
        "public URLs say https when the relay serves it"
    );

    // A webhook to alice.hookrelay.test over HTTPS (HTTP/1.1, then HTTP/2)
    // reaches the app, which learns that it came over TLS.
    let host = format!("alice.{DOMAIN}");
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let answer = https(
            relay.https,
            &host,
            "POST",
            "/github?via=https",
            r#"{"zen":"tls"}"#,
            roots(&ca_file)?,
            &[alpn],
        )
        .await?;
        assert_eq!(answer.alpn.as_deref(), Some(alpn));
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(answer.headers["x-app"], "yes");
        let received = app.received().last().cloned().context("app got it")?;
        assert_eq!(received.uri, "/github?via=https");
        assert_eq!(received.body, r#"{"zen":"tls"}"#);
        assert_eq!(header(&received, "x-forwarded-proto"), "https");
        assert_eq!(
            header(&received, "x-hookrelay-original-url"),
            format!("https://{host}:{port}/github?via=https")
        );
    }

    // A connection opened for alice that asks for bob (Host ≠ SNI, which the
    // wildcard certificate would allow) is refused with 421 and never routed.
    let before = app.received().len();
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let answer = https_as(
            relay.https,
            &host,
            &format!("bob.{DOMAIN}"),
            "POST",
            "/fronted",
            "{}",
            roots(&ca_file)?,
            &[alpn],
        )
        .await?;
        assert_eq!(answer.status, StatusCode::MISDIRECTED_REQUEST);
        assert_eq!(error_code(&answer.body), "misdirected_request");
    }
    // Case, port and a trailing dot are not a mismatch.
    let answer = https_as(
        relay.https,
        &host,
        &format!("ALICE.{DOMAIN}.:{port}"),
        "POST",
        "/same-host",
        "{}",
        roots(&ca_file)?,
        &[b"http/1.1"],
    )
    .await?;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        app.received().len(),
        before + 1,
        "only the matching request"
    );

    // Plain HTTP still works, and says so.
    let (status, _, _) = post(&format!("http://{http}/t/alice/plain"), "{}").await?;
    assert_eq!(status, StatusCode::OK);
    let received = app.received().last().cloned().context("app got it")?;
    assert_eq!(received.uri, "/plain");
    assert_eq!(header(&received, "x-forwarded-proto"), "http");

    // An agent that trusts another CA refuses the relay, says which relay and
    // what to do, and exits.
    let other = TestCa::new("Some other CA")?;
    let other_file = other.write(&dir.path().join("other-ca.pem"))?;
    let out = tokio::time::timeout(
        WAIT,
        agent_command(
            &relay,
            "mallory",
            &app.target(),
            &other_file,
            &dir.path().join("agent2"),
        )
        .output(),
    )
    .await??;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(RELAY_HOST)
            && stderr.contains("not signed by a CA this machine trusts")
            && stderr.contains("SSL_CERT_FILE")
            && stderr.contains("--relay-cert-sha256"),
        "{stderr}"
    );
    // So does an HTTPS sender that does not trust it.
    let refused = https(
        relay.https,
        &host,
        "POST",
        "/github",
        "{}",
        roots(&other_file)?,
        &[b"http/1.1"],
    )
    .await;
    assert!(refused.is_err(), "a sender without the CA must not connect");

    // certbot renews: new files, then SIGHUP. New connections get the new
    // certificate; the agent's link stays up.
    let before = https(
        relay.https,
        &host,
        "GET",
        "/",
        "",
        roots(&ca_file)?,
        &[b"http/1.1"],
    )
    .await?
    .leaf;
    ca.issue(&[DOMAIN, &format!("*.{DOMAIN}")], &cert, &key)?;
    relay.signal("HUP").await?;
    relay
        .log
        .line_with("SIGHUP: new certificate in use", WAIT)
        .await?;
    let after = https(
        relay.https,
        &host,
        "POST",
        "/renewed",
        "{}",
        roots(&ca_file)?,
        &[b"h2"],
    )
    .await?;
    assert_ne!(after.leaf, before, "the renewed certificate is served");
    assert_eq!(
        after.status,
        StatusCode::OK,
        "the agent's link survived the reload"
    );

    agent.stop().await?;
    relay.stop().await
}

/// Pebble (the ACME server) and pebble-challtestsrv (a DNS responder that
/// answers every name with 127.0.0.1, so pebble validates
/// relay.hookrelay.test against the relay's HTTPS port), running.
struct Pebble {
    _challtestsrv: Child,
    _pebble: Child,
    /// Pebble's ACME port.
    acme: u16,
    /// The port pebble validates TLS-ALPN-01 on: the relay's HTTPS port.
    relay_https: u16,
    /// Pebble's issuing root, PEM, from its management API.
    root: Vec<u8>,
    log: PathBuf,
}

impl Pebble {
    /// Starts both with fresh ports, and again with others if a port was
    /// taken before they bound it (a busy machine); at most three times.
    async fn start(dir: &Path, ca_file: &Path) -> anyhow::Result<Self> {
        let mut failed = String::new();
        for attempt in 1..=3 {
            match Self::try_start(dir, ca_file).await? {
                Ok(pebble) => return Ok(pebble),
                Err(log) if log.contains("address already in use") => {
                    failed.push_str(&format!("attempt {attempt}:\n{log}\n"));
                }
                Err(log) => anyhow::bail!("pebble did not start:\n{log}"),
            }
        }
        anyhow::bail!("pebble found no free ports in three attempts:\n{failed}")
    }

    /// `Ok(Err(log))` when either process exited before pebble answered.
    async fn try_start(dir: &Path, ca_file: &Path) -> anyhow::Result<Result<Self, String>> {
        let path = |name: &str| dir.join(name);
        let dns = free_port().await?;
        let dns_management = free_port().await?;
        let mut challtestsrv = logged("/usr/bin/pebble-challtestsrv", &path("challtestsrv.log"))?
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-management", &format!("127.0.0.1:{dns_management}")])
            .spawn()?;

        let (acme, management, relay_https) =
            (free_port().await?, free_port().await?, free_port().await?);
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{acme}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": path("pebble-cert.pem"),
                "privateKey": path("pebble-key.pem"),
                "httpPort": dead_port().await?,
                "tlsPort": relay_https,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        std::fs::write(path("pebble.json"), serde_json::to_vec_pretty(&config)?)?;
        let log = path("pebble.log");
        let mut pebble = logged("/usr/bin/pebble", &log)?
            .arg("-config")
            .arg(path("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .spawn()?;
        let logs = || {
            let read = |name| std::fs::read_to_string(path(name)).unwrap_or_default();
            format!(
                "pebble:\n{}\nchalltestsrv:\n{}",
                read("pebble.log"),
                read("challtestsrv.log")
            )
        };

        // Pebble is up once its management API answers; its issuing root is
        // generated at start and served there.
        let mgmt: SocketAddr = ([127, 0, 0, 1], management).into();
        let root = tokio::time::timeout(WAIT, async {
            loop {
                if pebble.try_wait()?.is_some() || challtestsrv.try_wait()?.is_some() {
                    return Ok(None);
                }
                match https(
                    mgmt,
                    "127.0.0.1",
                    "GET",
                    "/roots/0",
                    "",
                    roots(ca_file)?,
                    &[b"http/1.1"],
                )
                .await
                {
                    Ok(answer) if answer.status == StatusCode::OK => {
                        return Ok::<_, anyhow::Error>(Some(answer.body))
                    }
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })
        .await
        .with_context(|| format!("pebble did not start within {WAIT:?}:\n{}", logs()))??;
        Ok(match root {
            Some(root) => Ok(Self {
                _challtestsrv: challtestsrv,
                _pebble: pebble,
                acme,
                relay_https,
                root: root.to_vec(),
                log,
            }),
            None => Err(logs()),
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A loopback port that was free a moment ago, for a server whose port must
/// be known before it starts (pebble's config names them all). Drawn from
/// below the kernel's ephemeral range, so no other socket's `connect` or
/// `bind(0)` in the suite is handed it before the server binds it (one was,
/// in CI, when this took `bind(0)`'s port).
async fn free_port() -> anyhow::Result<u16> {
    let range =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let low = range
        .split_whitespace()
        .next()
        .and_then(|low| low.parse::<u16>().ok())
        .unwrap_or(32768)
        .max(12_000);
    for _ in 0..100 {
        let port = fastrand::u16(10_000..low);
        let Ok(_tcp) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await else {
            continue;
        };
        // The DNS responder binds UDP and TCP on its port.
        if tokio::net::UdpSocket::bind(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port below {low} in 100 tries")
}

/// A process whose output goes to a file in the test's directory, for the
/// failure message.
fn logged(program: &str, log: &Path) -> anyhow::Result<tokio::process::Command> {
    let out = std::fs::File::create(log)?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true);
    Ok(cmd)
}

#[tokio::test]
async fn acme_certificate_from_pebble_serves_https_and_quic() -> anyhow::Result<()> {
    anyhow::ensure!(
        Path::new("/usr/bin/pebble").exists() && Path::new("/usr/bin/pebble-challtestsrv").exists(),
        "Debian's pebble is not installed: `apt-get install pebble` (scripts/test does)"
    );
    let dir = tempfile::tempdir()?;
    let path = |name: &str| dir.path().join(name);

    // Pebble's own HTTPS certificate, from a CA the relay is told to trust.
    let ca = TestCa::new("Pebble API CA")?;
    let ca_file = ca.write(&path("pebble-api-ca.pem"))?;
    ca.issue(
        &["127.0.0.1", "localhost"],
        &path("pebble-cert.pem"),
        &path("pebble-key.pem"),
    )?;

    // Pebble and its DNS responder, on ports picked for them.
    let pebble = Pebble::start(dir.path(), &ca_file).await?;
    let (acme, relay_https) = (pebble.acme, pebble.relay_https);
    let pebble_log = || pebble.log();
    let root_file = path("pebble-root.pem");
    std::fs::write(&root_file, &pebble.root)?;

    let acme_directory = format!("https://127.0.0.1:{acme}/dir");
    let https_arg = format!("127.0.0.1:{relay_https}");
    let relay_args = [
        "--domain",
        RELAY_HOST,
        "--http",
        "off",
        "--https",
        &https_arg,
        "--acme",
        "--acme-email",
        "ops@hookrelay.test",
        "--acme-directory",
        &acme_directory,
        "--acme-ca-root",
        ca_file.to_str().context("utf-8 path")?,
    ];
    let relay = RelayProcess::start(&path("relay"), &relay_args).await?;
    assert!(relay.http.is_none(), "HTTPS only");

    // An agent that starts before the certificate is issued is turned away,
    // retries, and gets in once it is: it verifies QUIC against pebble's
    // root, with no pin.
    let app = TestApp::spawn().await?;
    let agent = AgentProcess::spawn(agent_command(
        &relay,
        "acme",
        &app.target(),
        &root_file,
        &path("agent"),
    ))?;

    // Bounded wait until the relay serves a certificate pebble issued.
    let issued = tokio::time::timeout(ACME_WAIT, async {
        loop {
            match https(
                relay.https,
                RELAY_HOST,
                "GET",
                "/",
                "",
                roots(&root_file)?,
                &[b"http/1.1"],
            )
            .await
            {
                Ok(answer) => return Ok::<_, anyhow::Error>(answer),
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    })
    .await
    .with_context(|| {
        format!(
            "no certificate from pebble within {ACME_WAIT:?}\nrelay:\n{}\npebble:\n{}",
            relay.log.text(),
            pebble_log()
        )
    })??;
    // No tunnel at the bare domain: the relay's own answer, over TLS.
    assert_eq!(issued.status, StatusCode::NOT_FOUND);
    relay
        .log
        .line_with("certificate issued over ACME", WAIT)
        .await?;

    agent.wait_connected().await?;
    assert_eq!(
        agent.urls().first().map(String::as_str),
        Some(format!("https://{RELAY_HOST}:{relay_https}/t/acme/").as_str())
    );
    let answer = https(
        relay.https,
        RELAY_HOST,
        "POST",
        "/t/acme/stripe",
        r#"{"id":"evt_1"}"#,
        roots(&root_file)?,
        &[b"h2", b"http/1.1"],
    )
    .await?;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let received = app.received().last().cloned().context("app got it")?;
    assert_eq!(received.uri, "/stripe");
    assert_eq!(header(&received, "x-forwarded-proto"), "https");
    agent.stop().await?;
    let token = relay.token.clone();
    relay.stop().await?;

    // A restart serves the cached certificate at once instead of ordering
    // another one.
    let relay = RelayProcess::restart(&path("relay"), token, &relay_args).await?;
    relay
        .log
        .line_with("ACME certificate loaded from the cache", WAIT)
        .await?;
    let again = https(
        relay.https,
        RELAY_HOST,
        "GET",
        "/",
        "",
        roots(&root_file)?,
        &[b"http/1.1"],
    )
    .await?;
    assert_eq!(
        again.leaf, issued.leaf,
        "the same certificate, from the cache"
    );
    assert!(
        relay.log.find("certificate issued over ACME").is_none(),
        "{}",
        relay.log.text()
    );
    relay.stop().await
}
