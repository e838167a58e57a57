//! Bursts of webhooks: the open-files limit (both binaries raise their soft
//! limit to the hard one, and size what holds a descriptor by what they got,
//! so that a burst past it waits or is answered `503` instead of failing on
//! `EMFILE`) and the public listeners' accept backlog. Real processes under
//! `ulimit -n`, real QUIC, real sled.
#![cfg(target_os = "linux")]

mod common;

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::Context;
use common::{
    command, create_token, field, full, line_with, relay_client_bin, relay_server_bin, WAIT,
};
use http::StatusCode;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    process::Child,
};

/// `bin ARGS…` started by `sh` after `ulimit LIMIT` (e.g. `-n 200`: soft and
/// hard, or `-Sn 150`: soft only), with the harness's clean environment.
fn limited(limit: &str, bin: &Path) -> tokio::process::Command {
    let mut cmd = command("sh");
    cmd.arg("-c")
        .arg(format!("ulimit {limit} && exec \"$0\" \"$@\""))
        .arg(bin);
    cmd
}

/// Collects a child's stderr lines, for the test to look through.
fn keep_stderr(child: &mut Child) -> anyhow::Result<Arc<Mutex<Vec<String>>>> {
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("stderr"))?;
    let kept: Arc<Mutex<Vec<String>>> = Arc::default();
    let into = kept.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            into.lock().expect("lock").push(line);
        }
    });
    Ok(kept)
}

/// The first of `kept`'s lines that contains `needle`, once `child` has
/// printed it.
async fn line_in(
    kept: &Mutex<Vec<String>>,
    child: &mut Child,
    needle: &str,
) -> anyhow::Result<String> {
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(line) = kept
            .lock()
            .expect("lock")
            .iter()
            .find(|l| l.contains(needle))
        {
            return Ok(line.clone());
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the process ended ({status}) without a line containing {needle:?}");
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < until,
            "no line containing {needle:?} within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `bodies` POSTed to `url` all at once, each on a connection of its own;
/// each answer's status and body.
async fn post_at_once(
    url: &str,
    bodies: impl Iterator<Item = bytes::Bytes>,
) -> Vec<anyhow::Result<(StatusCode, bytes::Bytes)>> {
    let sends = bodies.map(|body| async move {
        let (status, _, body) = common::send(http::Request::post(url).body(full(body))?).await?;
        Ok((status, body))
    });
    futures_util::future::join_all(sends).await
}

struct Relay {
    child: Child,
    http: SocketAddr,
    quic: SocketAddr,
    fingerprint: String,
    stderr: Arc<Mutex<Vec<String>>>,
}

async fn relay(dir: &Path, limit: &str, extra: &[&str]) -> anyhow::Result<Relay> {
    let mut child = limited(limit, &relay_server_bin())
        .arg("--data-dir")
        .arg(dir)
        .args(["--http", "127.0.0.1:0", "--quic", "127.0.0.1:0"])
        .args(["--admin", "127.0.0.1:0"])
        .args(extra)
        .spawn()?;
    let kept = keep_stderr(&mut child)?;
    let listening = line_in(&kept, &mut child, "relay listening").await?;
    Ok(Relay {
        child,
        http: field(&listening, "http_addr")?.parse()?,
        quic: field(&listening, "quic_addr")?.parse()?,
        fingerprint: field(&listening, "fingerprint")?,
        stderr: kept,
    })
}

/// `relay-client http` under `ulimit LIMIT`, holding tunnel `t`.
async fn agent(
    relay: &Relay,
    token: &str,
    app: SocketAddr,
    dir: &Path,
    limit: &str,
    extra: &[&str],
) -> anyhow::Result<(Child, Arc<Mutex<Vec<String>>>)> {
    let mut child = limited(limit, &relay_client_bin())
        .args(["http", &app.to_string(), "--relay", &relay.quic.to_string()])
        .args(["--token", token, "--tunnel", "t"])
        .args(["--relay-cert-sha256", &relay.fingerprint])
        .args(["--quiet", "--no-inspect", "--data-dir"])
        .arg(dir)
        .args(extra)
        .spawn()?;
    let stderr = keep_stderr(&mut child)?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    line_with(&mut lines, "forwarding").await?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, stderr))
}

/// The soft and hard open-files limits of process `pid`.
fn limits(pid: &str) -> anyhow::Result<(String, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .ok_or_else(|| anyhow::anyhow!("no open-files line in {text}"))?;
    let mut words = line["Max open files".len()..].split_whitespace();
    match (words.next(), words.next()) {
        (Some(soft), Some(hard)) => Ok((soft.to_owned(), hard.to_owned())),
        _ => anyhow::bail!("cannot read {line:?}"),
    }
}

/// An app that answers every request after 300 ms, counting how many it
/// holds at once.
async fn slow_app() -> anyhow::Result<(SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (n, p) = (now.clone(), peak.clone());
    let app = axum::Router::new().fallback(move || {
        let (now, peak) = (n.clone(), p.clone());
        async move {
            let held = now.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(held, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
            now.fetch_sub(1, Ordering::SeqCst);
            "ok"
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, now, peak))
}

async fn signal(child: &Child, signal: &str) -> anyhow::Result<()> {
    let pid = child.id().ok_or_else(|| anyhow::anyhow!("already gone"))?;
    let status = tokio::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .await?;
    anyhow::ensure!(status.success(), "kill {signal} {pid}");
    Ok(())
}

async fn sigterm(child: &mut Child) -> anyhow::Result<()> {
    let pid = child.id().ok_or_else(|| anyhow::anyhow!("already gone"))?;
    tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    tokio::time::timeout(WAIT, child.wait()).await??;
    Ok(())
}

fn has(lines: &Mutex<Vec<String>>, needle: &str) -> bool {
    lines
        .lock()
        .expect("lock")
        .iter()
        .any(|l| l.contains(needle))
}

#[tokio::test]
async fn both_binaries_raise_their_soft_limit_to_the_hard_one() -> anyhow::Result<()> {
    let (_, hard) = limits("self")?;
    let wanted = match hard.parse::<u64>() {
        Ok(n) => n.min(1 << 20).to_string(),
        Err(_) => (1u64 << 20).to_string(), // "unlimited"
    };
    let dir = tempfile::tempdir()?;
    let token = create_token(&dir.path().join("relay")).await?;
    let mut relay = relay(&dir.path().join("relay"), "-Sn 150", &[]).await?;
    let relay_pid = relay.child.id().ok_or_else(|| anyhow::anyhow!("pid"))?;
    let (app, _, _) = slow_app().await?;
    let (mut agent, agent_err) = agent(
        &relay,
        &token,
        app,
        &dir.path().join("agent"),
        "-Sn 150",
        &[],
    )
    .await?;
    let agent_pid = agent.id().ok_or_else(|| anyhow::anyhow!("pid"))?;
    for (who, pid) in [("relay", relay_pid), ("agent", agent_pid)] {
        let (soft, now_hard) = limits(&pid.to_string())?;
        assert_eq!(now_hard, hard, "{who}: the hard limit is left alone");
        assert_eq!(soft, wanted, "{who}: started with a soft limit of 150");
    }
    // Room for everything: nothing lowered, nothing to warn about.
    assert!(!has(&relay.stderr, "open-files limit"));
    assert!(!has(&agent_err, "open-files limit"));
    sigterm(&mut agent).await?;
    sigterm(&mut relay.child).await?;
    Ok(())
}

/// An agent whose hard limit is 200 takes 72 deliveries at once (200 less
/// the 128 kept for its files): 300 webhooks at once all reach the app, 72
/// at a time, and are all recorded. Before, it took 1,024 at once, ran out
/// of descriptors connecting to the app (`502`) and the history's flush
/// failed for the exchanges waiting on it.
#[tokio::test]
async fn a_burst_past_the_agents_open_files_limit_waits_and_is_all_recorded() -> anyhow::Result<()>
{
    const BURST: usize = 300;
    let dir = tempfile::tempdir()?;
    let token = create_token(&dir.path().join("relay")).await?;
    let mut relay = relay(
        &dir.path().join("relay"),
        "-Sn 1024",
        &["--max-connections-per-ip", "1000"],
    )
    .await?;
    let (app, now, peak) = slow_app().await?;
    let agent_dir = dir.path().join("agent");
    let (mut agent, agent_err) = agent(&relay, &token, app, &agent_dir, "-n 200", &[]).await?;
    assert!(
        has(
            &agent_err,
            "leaves room for 72 deliveries at once, not 1024"
        ),
        "the agent says it lowered its deliveries: {:?}",
        agent_err.lock().expect("lock")
    );

    let url = format!("http://{}/t/t/burst", relay.http);
    let bodies = (0..BURST).map(|i| bytes::Bytes::from(format!("{{\"n\":{i}}}")));
    let statuses: Vec<_> = post_at_once(&url, bodies)
        .await
        .into_iter()
        .map(|answer| answer.map(|(status, _)| status))
        .collect();
    let ok = statuses
        .iter()
        .filter(|s| matches!(s, Ok(StatusCode::OK)))
        .count();
    assert_eq!(
        ok,
        BURST,
        "every webhook answered 200: {:?}",
        statuses
            .iter()
            .filter(|s| !matches!(s, Ok(StatusCode::OK)))
            .collect::<Vec<_>>()
    );
    let peak = peak.load(Ordering::SeqCst);
    assert!(
        (2..=72).contains(&peak),
        "at most 72 at the app at once, got {peak}"
    );
    assert_eq!(now.load(Ordering::SeqCst), 0);
    assert!(!has(&agent_err, "Too many open files"));

    // All of them in the history, read from the store once the agent stopped.
    sigterm(&mut agent).await?;
    let out = command(relay_client_bin())
        .args(["history", "--no-inspect", "--json", "--limit", "1000"])
        .arg("--data-dir")
        .arg(&agent_dir)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let exchanges = listed["exchanges"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no exchanges in {listed}"))?;
    assert_eq!(exchanges.len(), BURST);
    sigterm(&mut relay.child).await?;
    Ok(())
}

/// A relay whose hard limit is 200 serves 64 ingress connections (its floor:
/// half of 200 less 128 is 36) and answers the next with `503` at once.
/// Before, it kept its 4,096 and ran out of descriptors first: accepting
/// stopped, and a new sender waited without an answer.
#[tokio::test]
async fn a_relay_under_a_low_open_files_limit_sheds_with_503_instead_of_running_out(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut relay = relay(&dir.path().join("relay"), "-n 200", &[]).await?;
    assert!(
        has(
            &relay.stderr,
            "leaves room for 64 ingress connections, not 4096"
        ),
        "the relay says it lowered its connections: {:?}",
        relay.stderr.lock().expect("lock")
    );
    // More connections than the process has descriptors left for.
    let mut held = Vec::new();
    for _ in 0..190 {
        held.push(TcpStream::connect(relay.http).await?);
    }
    // The refused ones are closed within a second (the relay waits that long
    // for a refused sender to close, for at most 64 of them at once).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        let mut conn = TcpStream::connect(relay.http).await.context("connect")?;
        conn.write_all(b"POST /t/nobody/x HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n")
            .await
            .context("write")?;
        let mut buf = Vec::new();
        conn.read_to_end(&mut buf).await.context("read")?;
        anyhow::Ok(buf)
    })
    .await
    .map_err(|_| anyhow::anyhow!("no answer within 10 s: the relay stopped accepting"))??;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    // Once they are gone, webhooks are served again (404: no such tunnel).
    drop(held);
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, _, _) = common::send(
            http::Request::post(format!("http://{}/t/nobody/x", relay.http)).body(full(""))?,
        )
        .await?;
        if status == StatusCode::NOT_FOUND {
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        anyhow::ensure!(tokio::time::Instant::now() < until, "still shedding");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!has(&relay.stderr, "Too many open files"));
    sigterm(&mut relay.child).await?;
    Ok(())
}

/// The kernel completes a burst's TCP handshakes and holds them until the
/// relay accepts them: 600 senders connecting at once to a relay that is not
/// running at all (stopped) all get their connection. With the 128 that
/// tokio's `TcpListener::bind` asks for, the 130th on had their handshake
/// dropped and sent again a second later (a second added to their webhooks,
/// then three).
#[tokio::test]
async fn a_burst_of_senders_is_held_by_the_kernel_while_the_relay_is_busy() -> anyhow::Result<()> {
    const SENDERS: usize = 600;
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")?
        .trim()
        .parse()?;
    assert!(
        somaxconn > SENDERS,
        "net.core.somaxconn is {somaxconn}: this machine caps every backlog below {SENDERS}"
    );
    let dir = tempfile::tempdir()?;
    let mut relay = relay(&dir.path().join("relay"), "-Sn 1024", &[]).await?;
    signal(&relay.child, "-STOP").await?;
    // While the relay is stopped the backlog never empties: a handshake
    // dropped for want of room is dropped again each time it is sent again,
    // so the time given to connect only has to be ample.
    let connects = (0..SENDERS)
        .map(|_| tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(relay.http)));
    let results = futures_util::future::join_all(connects).await;
    signal(&relay.child, "-CONT").await?;
    let connected = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
    assert_eq!(connected, SENDERS, "connections completed by the kernel");
    drop(results);
    // Served once it runs again (404: no such tunnel).
    let (status, _, _) = common::send(
        http::Request::post(format!("http://{}/t/nobody/x", relay.http)).body(full(""))?,
    )
    .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    sigterm(&mut relay.child).await?;
    Ok(())
}

/// A connection queueing a body too large for sled holds two descriptors,
/// its socket and the body's file: a relay whose hard limit is 400 lets in
/// 136 connections (half of 400 less 128), and 300 webhooks of 256 KiB sent
/// at once to a queueing tunnel are each queued (`202`) or, past the cap,
/// refused at once with the bare `503`. Counted as one each (272 let in),
/// such a burst ran out of descriptors, and webhooks were answered
/// `503 queue_unavailable` after their whole upload.
#[tokio::test]
async fn queued_large_bodies_past_the_relays_open_files_limit_are_never_lost_mid_upload(
) -> anyhow::Result<()> {
    const BURST: usize = 300;
    let dir = tempfile::tempdir()?;
    let token = create_token(&dir.path().join("relay")).await?;
    let mut relay = relay(
        &dir.path().join("relay"),
        "-n 400",
        &["--max-connections-per-ip", "1000"],
    )
    .await?;
    assert!(
        has(
            &relay.stderr,
            "leaves room for 136 ingress connections, not 4096"
        ),
        "{:?}",
        relay.stderr.lock().expect("lock")
    );
    let (app, _, _) = slow_app().await?;
    let (mut agent, _) = agent(
        &relay,
        &token,
        app,
        &dir.path().join("agent"),
        "-Sn 1024",
        &["--mode", "queue"],
    )
    .await?;
    let url = format!("http://{}/t/t/large", relay.http);
    let body = bytes::Bytes::from(vec![b'x'; 256 * 1024]);
    let mut queued = 0;
    for answer in post_at_once(&url, std::iter::repeat_n(body, BURST)).await {
        match answer {
            Ok((StatusCode::ACCEPTED, _)) => queued += 1,
            // The cap's bare 503, before the body was read.
            Ok((StatusCode::SERVICE_UNAVAILABLE, body)) if body.is_empty() => {}
            // A refused connection may also end before its answer is read.
            Err(_) => {}
            Ok((status, body)) => panic!("{status} {}", String::from_utf8_lossy(&body)),
        }
    }
    assert!(queued >= 136, "only {queued} queued");
    assert!(!has(&relay.stderr, "Too many open files"));
    sigterm(&mut agent).await?;
    sigterm(&mut relay.child).await?;
    Ok(())
}
