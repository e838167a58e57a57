//! The built binaries, driven the way the README tells a user to: token
//! creation, the relay, the agent, the demo, and their failure exits.

mod common;

use std::{process::ExitStatus, time::Duration};

use common::*;
use http::StatusCode;
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{Child, ChildStderr, ChildStdout, Command},
};

/// The lines a child writes to stderr (spawned with it piped, as `command` does).
fn stderr_lines(child: &mut Child) -> anyhow::Result<Lines<BufReader<ChildStderr>>> {
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("stderr"))?;
    Ok(BufReader::new(stderr).lines())
}

/// The lines a child writes to stdout.
fn stdout_lines(child: &mut Child) -> anyhow::Result<Lines<BufReader<ChildStdout>>> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("stdout"))?;
    Ok(BufReader::new(stdout).lines())
}

async fn sigterm(child: &Child) -> anyhow::Result<()> {
    let pid = child
        .id()
        .ok_or_else(|| anyhow::anyhow!("process already gone"))?;
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .await?;
    anyhow::ensure!(status.success(), "kill failed");
    Ok(())
}

async fn exit_of(child: &mut Child) -> anyhow::Result<ExitStatus> {
    Ok(tokio::time::timeout(WAIT, child.wait()).await??)
}

#[tokio::test]
async fn readme_flow_with_the_built_binaries() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let relay_dir = dir.path().join("relay");
    let relay_dir_arg = relay_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("utf-8 path"))?;

    // 1. A token, printed as the only line on stdout, stored only as a hash.
    let out = command(relay_server_bin())
        .args([
            "token",
            "create",
            "--data-dir",
            relay_dir_arg,
            "--name",
            "alice",
            "--tunnels",
            "alice-*",
        ])
        .output()
        .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout)?;
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let token = lines[0].to_owned();
    assert!(
        token.starts_with("hkr_") && token.len() >= 4 + 32,
        "{token}"
    );
    let stored = std::fs::read_to_string(relay_dir.join("tokens.json"))?;
    assert!(!stored.contains(&token) && stored.contains("alice"));

    let out = command(relay_server_bin())
        .args(["token", "list", "--data-dir", relay_dir_arg])
        .output()
        .await?;
    assert!(String::from_utf8(out.stdout)?.contains("alice-*"));

    // 2. The relay, which logs its addresses and certificate fingerprint.
    let mut relay = command(relay_server_bin())
        .args([
            "--data-dir",
            relay_dir_arg,
            "--http",
            "127.0.0.1:0",
            "--quic",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .spawn()?;
    let mut relay_err: Lines<BufReader<ChildStderr>> = stderr_lines(&mut relay)?;
    let listening = line_with(&mut relay_err, "relay listening").await?;
    let quic = field(&listening, "quic_addr")?;
    let admin = field(&listening, "admin_addr")?;
    let fingerprint = field(&listening, "fingerprint")?;
    assert_eq!(fingerprint.len(), 64, "{listening}");
    let (status, _, _) =
        send(http::Request::get(format!("http://{admin}/healthz")).body(full(""))?).await?;
    assert_eq!(status, StatusCode::OK);

    // 3. The agent, which prints its public URL.
    let app = TestApp::spawn().await?;
    let agent_dir = dir.path().join("agent");
    let mut agent = command(relay_client_bin())
        .args([
            "http",
            &app.addr.port().to_string(),
            "--relay",
            &quic,
            "--token",
            &token,
            "--tunnel",
            "alice-dev",
        ])
        .args([
            "--relay-cert-sha256",
            &fingerprint,
            "--inspect",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&agent_dir)
        .spawn()?;
    let mut agent_out: Lines<BufReader<ChildStdout>> = stdout_lines(&mut agent)?;
    let forwarding = line_with(&mut agent_out, "forwarding").await?;
    let url = forwarding
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("no URL in {forwarding}"))?
        .to_owned();
    assert!(url.ends_with("/t/alice-dev/"), "{forwarding}");

    // 4. A webhook through the public URL reaches the app; the agent prints a line.
    let (status, _, body) = post(&format!("{url}github?delivery=1"), r#"{"zen":"hi"}"#).await?;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(app.received()[0].uri, "/github?delivery=1");
    let line = line_with(&mut agent_out, "/github").await?;
    assert!(line.contains("POST") && line.contains("200"), "{line}");

    // 5. A wrong token ends a second agent with a message and a failure exit.
    let out = tokio::time::timeout(
        WAIT,
        command(relay_client_bin())
            .args([
                "http",
                "3000",
                "--relay",
                &quic,
                "--token",
                "hkr_wrong",
                "--tunnel",
                "alice-x",
            ])
            .args(["--relay-cert-sha256", &fingerprint, "--no-inspect"])
            .arg("--data-dir")
            .arg(dir.path().join("agent2"))
            .output(),
    )
    .await??;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error:") && stderr.contains("token"),
        "{stderr}"
    );

    // 6. SIGTERM stops both cleanly.
    sigterm(&agent).await?;
    assert!(exit_of(&mut agent).await?.success());
    sigterm(&relay).await?;
    assert!(exit_of(&mut relay).await?.success());
    Ok(())
}

#[tokio::test]
async fn bad_configuration_fails_before_binding_and_names_the_setting() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, "http = \"127.0.0.1:0\"\nbody_limit = \"a lot\"\n")?;
    let out = command(relay_server_bin())
        .arg("--config")
        .arg(&file)
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .await?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("body_limit"), "{stderr}");
    assert!(
        !dir.path().join("tls").exists(),
        "nothing was set up before validation"
    );

    let out = command(relay_server_bin())
        .args(["--http", "not-an-address"])
        .output()
        .await?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--http"));

    let out = command(relay_client_bin())
        .args(["http", "https://localhost:3000", "--token", "t"])
        .output()
        .await?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("https"));
    Ok(())
}

#[tokio::test]
async fn demo_serves_the_whole_path_in_one_command() -> anyhow::Result<()> {
    let mut demo = command(relay_client_bin())
        .args([
            "demo",
            "--http",
            "127.0.0.1:0",
            "--inspect",
            "127.0.0.1:0",
            "--no-sample",
        ])
        .spawn()?;
    let mut out: Lines<BufReader<ChildStdout>> = stdout_lines(&mut demo)?;
    let line = line_with(&mut out, "public URL").await?;
    let url = line
        .split_whitespace()
        .last()
        .ok_or_else(|| anyhow::anyhow!("no URL"))?
        .to_owned();
    let curl = line_with(&mut out, "curl -X POST").await?;
    assert!(curl.contains(&url), "{curl}");
    let (status, _, body) = post(&format!("{url}github/events"), r#"{"action":"opened"}"#).await?;
    assert_eq!(status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_slice(&body)?;
    assert_eq!(json["received_bytes"], 19);
    let line = line_with(&mut out, "/github/events").await?;
    assert!(line.contains("200"), "{line}");
    demo.start_kill()?;
    let _ = tokio::time::timeout(Duration::from_secs(10), demo.wait()).await;
    Ok(())
}

#[tokio::test]
async fn log_format_json_prints_one_object_per_line() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let dir = tempfile::tempdir()?;
    let mut agent = command(relay_client_bin())
        .args(["http", &app.target(), "--relay"])
        .arg(relay.relay.quic_addr().to_string())
        .args(["--token", &relay.token, "--tunnel", "jsonlog"])
        .args(["--relay-cert-sha256", &hex::encode(relay.fingerprint())])
        .args(["--inspect", "127.0.0.1:0", "--log-format", "json"])
        .arg("--data-dir")
        .arg(dir.path())
        .spawn()?;
    let mut out: Lines<BufReader<ChildStdout>> = stdout_lines(&mut agent)?;
    let mut err: Lines<BufReader<ChildStderr>> = stderr_lines(&mut agent)?;

    let started: serde_json::Value = serde_json::from_str(&line_with(&mut out, "{").await?)?;
    assert_eq!(started["type"], "started");
    assert_eq!(started["tunnel"], "jsonlog");
    assert_eq!(started["public_urls"][0], relay.url("jsonlog", "/"));
    let inspector = started["inspector"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no inspector in {started}"))?
        .to_owned();

    let (status, _, _) = post(&relay.url("jsonlog", "/hooks/a?b=1"), r#"{"x":1}"#).await?;
    assert_eq!(status, StatusCode::OK);
    let line: serde_json::Value = serde_json::from_str(&line_with(&mut out, "{").await?)?;
    assert_eq!(line["type"], "exchange");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["path"], "/hooks/a?b=1");
    assert_eq!(line["status"], 200);
    assert_eq!(line["outcome"], "ok");
    assert!(line["id"].as_str().is_some_and(|id| id.len() == 26));
    assert!(line["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert!(line["duration_ms"].is_u64());

    // A replay made through the inspector gets its line too.
    let id = line["id"].as_str().unwrap_or_default().to_owned();
    let (status, _, _) =
        send(http::Request::post(format!("{inspector}/api/exchanges/{id}/replay")).body(full(""))?)
            .await?;
    assert_eq!(status, StatusCode::CREATED);
    let line: serde_json::Value = serde_json::from_str(&line_with(&mut out, "{").await?)?;
    assert_eq!(line["replay_of"], id.as_str());
    assert_eq!(line["status"], 200);

    let (status, _, _) = post(&relay.url("jsonlog", "/status/503"), "{}").await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let line: serde_json::Value = serde_json::from_str(&line_with(&mut out, "{").await?)?;
    assert_eq!(line["path"], "/status/503");
    assert_eq!(line["status"], 503);

    // Logs on stderr are JSON too (the shutdown is logged).
    sigterm(&agent).await?;
    assert!(exit_of(&mut agent).await?.success());
    let mut log_lines = 0;
    while let Ok(Some(l)) = tokio::time::timeout(WAIT, err.next_line()).await? {
        let parsed: serde_json::Value =
            serde_json::from_str(&l).map_err(|e| anyhow::anyhow!("{e}: {l}"))?;
        assert!(parsed["level"].is_string(), "{l}");
        log_lines += 1;
    }
    assert!(log_lines > 0, "the agent logged nothing");
    Ok(())
}

/// `relay-client verify` over every signature test vector: exit 0 exactly
/// when the vector says valid.
#[tokio::test]
async fn verify_command_agrees_with_every_signature_vector() -> anyhow::Result<()> {
    let vectors: serde_json::Value = serde_json::from_str(include_str!(
        "../../shared/tests/data/signature-vectors.json"
    ))?;
    let vectors = vectors
        .as_array()
        .or_else(|| vectors["vectors"].as_array())
        .ok_or_else(|| anyhow::anyhow!("no vectors"))?;
    assert_eq!(vectors.len(), 68);
    let dir = tempfile::tempdir()?;
    for v in vectors {
        let id = v["id"].as_str().unwrap_or_default();
        let body_file = dir.path().join(format!("{id}.body"));
        std::fs::write(&body_file, v["body"].as_str().unwrap_or_default())?;
        let mut cmd = command(relay_client_bin());
        cmd.args([
            "verify",
            "--provider",
            v["provider"].as_str().unwrap_or_default(),
        ])
        .args(["--secret", v["secret"].as_str().unwrap_or_default()])
        .args(["--now", &v["now_unix"].to_string()])
        .arg("--body-file")
        .arg(&body_file)
        .arg("--json");
        if let Some(t) = v["tolerance_s"].as_u64() {
            cmd.args(["--tolerance", &t.to_string()]);
        }
        if let Some(url) = v["url"].as_str() {
            cmd.args(["--url", url]);
        }
        for (name, value) in v["headers"].as_object().into_iter().flatten() {
            cmd.args([
                "--header",
                &format!("{name}: {}", value.as_str().unwrap_or_default()),
            ]);
        }
        let out = cmd.output().await?;
        let verdict: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| anyhow::anyhow!("{id}: {e}: {}", String::from_utf8_lossy(&out.stderr)))?;
        let expect_valid = v["expect_valid"].as_bool() == Some(true);
        assert_eq!(
            out.status.code(),
            Some(if expect_valid { 0 } else { 1 }),
            "{id}: {verdict}"
        );
        assert_eq!(
            verdict["verdict"] == "valid",
            expect_valid,
            "{id}: {verdict}"
        );
    }

    // Usage errors are neither valid nor invalid: exit 2 with a message.
    let out = command(relay_client_bin())
        .args(["verify", "--secret", "s", "--body-file"])
        .arg(dir.path().join("missing"))
        .args(["--header", "stripe-signature: t=1,v1=00"])
        .output()
        .await?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
    Ok(())
}

/// The agent never looks alive while it is not: it complains once the link
/// has been down a while, and `--exit-on-disconnect` ends it with status 1.
#[tokio::test]
async fn a_long_disconnect_is_loud_and_can_end_the_agent() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let dir = tempfile::tempdir()?;
    let mut agent = command(relay_client_bin())
        .args(["http", &app.target(), "--relay"])
        .arg(relay.relay.quic_addr().to_string())
        .args(["--token", &relay.token, "--tunnel", "watched"])
        .args(["--relay-cert-sha256", &hex::encode(relay.fingerprint())])
        .args(["--no-inspect", "--disconnect-warning", "1s"])
        .args(["--exit-on-disconnect", "3s"])
        .arg("--data-dir")
        .arg(dir.path())
        .spawn()?;
    let mut out: Lines<BufReader<ChildStdout>> = stdout_lines(&mut agent)?;
    let mut err: Lines<BufReader<ChildStderr>> = stderr_lines(&mut agent)?;
    line_with(&mut out, "forwarding").await?;

    // Connected for longer than both limits: nothing happens.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(
        agent.try_wait()?.is_none(),
        "a connected agent keeps running"
    );

    // The relay goes away for good.
    let TestRelay { relay: server, .. } = relay;
    server.shutdown().await;
    let started = std::time::Instant::now();
    line_with(&mut err, "NOT CONNECTED").await?;
    let last = line_with(&mut err, "exit-on-disconnect").await?;
    assert!(last.starts_with("error:"), "{last}");
    let status = exit_of(&mut agent).await?;
    assert_eq!(status.code(), Some(1));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(20),
        "exited after {took:?}"
    );
    Ok(())
}

#[tokio::test]
async fn an_agent_that_never_reaches_its_relay_exits_when_asked() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // A UDP port with nobody behind it.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
    let out = tokio::time::timeout(
        WAIT,
        command(relay_client_bin())
            .args(["http", "3000", "--relay", &dead.to_string()])
            .args([
                "--token",
                "hkr_x",
                "--tunnel",
                "nowhere",
                "--insecure-skip-verify",
            ])
            .args(["--no-inspect", "--exit-on-disconnect", "2s"])
            .arg("--data-dir")
            .arg(dir.path())
            .output(),
    )
    .await??;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("exit-on-disconnect"), "{stderr}");
    Ok(())
}

#[tokio::test]
async fn relay_logs_json_lines_with_spans_when_asked() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut relay = command(relay_server_bin())
        .arg("--data-dir")
        .arg(dir.path())
        .args([
            "--http",
            "127.0.0.1:0",
            "--quic",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .args(["--log-format", "json", "--shutdown-grace", "2s"])
        .env("RUST_LOG", "relay_server=debug")
        .spawn()?;
    let mut err = stderr_lines(&mut relay)?;
    let line = line_with(&mut err, "relay listening").await?;
    let json: serde_json::Value = serde_json::from_str(&line)?;
    assert_eq!(json["level"], "INFO", "{line}");
    assert_eq!(json["fields"]["message"], "relay listening");
    let http = json["fields"]["http_addr"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("http_addr in {line}"))?
        .to_owned();
    // A request for an unknown tunnel logs inside its delivery span.
    let (status, _, _) = post(&format!("http://{http}/t/ghost/x"), "{}").await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let line = line_with(&mut err, "delivery failed").await?;
    let json: serde_json::Value = serde_json::from_str(&line)?;
    assert_eq!(json["span"]["name"], "delivery", "{line}");
    assert_eq!(json["span"]["tunnel"], "ghost", "{line}");
    assert!(json["span"]["delivery_id"].is_string(), "{line}");
    sigterm(&relay).await?;
    assert!(exit_of(&mut relay).await?.success());
    Ok(())
}

/// Everything left on a child's stderr, until it exits.
async fn rest_of(lines: &mut Lines<BufReader<ChildStderr>>) -> String {
    let mut out = String::new();
    while let Ok(Ok(Some(line))) = tokio::time::timeout(WAIT, lines.next_line()).await {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[tokio::test]
async fn enforcing_agent_is_told_the_policy_and_no_log_shows_the_secret() -> anyhow::Result<()> {
    const SECRET: &str = "whsec_never_in_any_log_4711";
    let dir = tempfile::tempdir()?;
    let relay_dir = dir.path().join("relay");
    let out = command(relay_server_bin())
        .arg("--data-dir")
        .arg(&relay_dir)
        .args(["token", "create", "--name", "ci", "--tunnels", "*"])
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "token create failed");
    let token = String::from_utf8(out.stdout)?.trim().to_owned();
    let mut relay = command(relay_server_bin())
        .arg("--data-dir")
        .arg(&relay_dir)
        .args(["--http", "127.0.0.1:0", "--quic", "127.0.0.1:0"])
        .args(["--admin", "127.0.0.1:0", "--shutdown-grace", "2s"])
        .env("RUST_LOG", "debug")
        .spawn()?;
    let mut relay_err = stderr_lines(&mut relay)?;
    let listening = line_with(&mut relay_err, "relay listening").await?;
    let quic = field(&listening, "quic_addr")?;
    let http_addr = field(&listening, "http_addr")?;
    let fingerprint = field(&listening, "fingerprint")?;

    let app = TestApp::spawn().await?;
    let mut agent = command(relay_client_bin())
        .args(["http", &app.addr.port().to_string(), "--relay", &quic])
        .args(["--token", &token, "--tunnel", "locked"])
        .args(["--relay-cert-sha256", &fingerprint, "--no-inspect"])
        .args(["--verify", &format!("stripe={SECRET}"), "--enforce"])
        .args(["--allow", "127.0.0.0/8", "--rate-limit", "100/s"])
        .arg("--data-dir")
        .arg(dir.path().join("agent"))
        .env("RUST_LOG", "debug")
        .spawn()?;
    let mut agent_err = stderr_lines(&mut agent)?;
    let told = line_with(&mut agent_err, "the relay enforces").await?;
    assert!(
        told.contains("signatures required: stripe")
            && told.contains("127.0.0.0/8")
            && told.contains("100/s"),
        "{told}"
    );

    let (status, _, body) = post(&format!("http://{http_addr}/t/locked/hook"), "{}").await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body), "signature_missing");
    assert!(app.received().is_empty());
    let line = line_with(&mut relay_err, "refused by signature check").await?;
    assert!(line.contains("signature_missing"), "{line}");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(relay_dir.join("policies.json"))?
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "the relay's copy of the secret is private"
        );
    }
    sigterm(&agent).await?;
    sigterm(&relay).await?;
    let logs = format!(
        "{}{}",
        rest_of(&mut relay_err).await,
        rest_of(&mut agent_err).await
    );
    exit_of(&mut agent).await?;
    exit_of(&mut relay).await?;
    assert!(!logs.is_empty());
    assert!(!logs.contains(SECRET), "a secret reached a log");
    assert!(!told.contains(SECRET));
    Ok(())
}
