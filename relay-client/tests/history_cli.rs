//! `relay-client history | show | export | replay`, run as the built binary
//! the way a developer would: first through a running agent's inspector API,
//! then straight from the sled store after the agent was killed with SIGKILL.
//! Everything (relay, agent, app, inspector) is on `127.0.0.1:0`.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Output,
    sync::{Arc, Mutex},
};

use base64::Engine as _;
use common::*;
use http::{Request, StatusCode};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{Child, ChildStdout},
};

/// A `relay-client http` process started by this test.
struct AgentProcess {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: Arc<Mutex<String>>,
    /// The inspector address the agent printed.
    inspector: SocketAddr,
}

impl AgentProcess {
    /// Starts an agent for `tunnel` forwarding to `app`, with the inspector on
    /// a free loopback port, and waits until it printed its public URL and
    /// inspector address. `data_dir` is passed as given (it may be relative to
    /// `cwd`).
    async fn start(
        relay: &TestRelay,
        app: &TestApp,
        tunnel: &str,
        cwd: &Path,
        data_dir: &Path,
    ) -> anyhow::Result<AgentProcess> {
        Self::start_with(relay, app, tunnel, cwd, data_dir, &[]).await
    }

    /// [`AgentProcess::start`] with more `http` arguments.
    async fn start_with(
        relay: &TestRelay,
        app: &TestApp,
        tunnel: &str,
        cwd: &Path,
        data_dir: &Path,
        extra: &[&str],
    ) -> anyhow::Result<AgentProcess> {
        let mut child = command(relay_client_bin())
            .current_dir(cwd)
            .args(["http", &app.target(), "--relay"])
            .arg(relay.relay.quic_addr().to_string())
            .args(["--token", &relay.token, "--tunnel", tunnel])
            .args(["--relay-cert-sha256", &hex::encode(relay.fingerprint())])
            .args(["--inspect", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("agent stdout"))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow::anyhow!("agent stderr"))?;
        // Drained all along, so a chatty agent never blocks on a full pipe;
        // kept for failure messages.
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = sink.lock().unwrap_or_else(|p| p.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut stdout = BufReader::new(stdout).lines();
        let url = relay.url(tunnel, "/");
        let banner = tokio::time::timeout(WAIT, async {
            let (mut inspector, mut online) = (None, false);
            while inspector.is_none() || !online {
                let Some(line) = stdout.next_line().await? else {
                    anyhow::bail!("the agent exited during start-up");
                };
                let mut words = line.split_whitespace();
                match (words.next(), words.next()) {
                    (Some("inspector"), Some(addr)) => {
                        let addr = addr.strip_prefix("http://").unwrap_or(addr);
                        inspector = Some(addr.parse::<SocketAddr>().map_err(|e| {
                            anyhow::anyhow!("unparseable inspector line {line:?}: {e}")
                        })?);
                    }
                    (Some("forwarding"), Some(public)) if public == url => online = true,
                    _ => {}
                }
            }
            inspector.ok_or_else(|| anyhow::anyhow!("no inspector line"))
        })
        .await;
        let inspector = match banner {
            Ok(Ok(addr)) => addr,
            Ok(Err(e)) => anyhow::bail!("{e}; agent stderr:\n{}", read(&log)),
            Err(_) => anyhow::bail!("agent not up within {WAIT:?}; stderr:\n{}", read(&log)),
        };
        Ok(AgentProcess {
            child,
            stdout,
            stderr: log,
            inspector,
        })
    }

    /// Waits for the terminal line the agent prints once an exchange on
    /// `path` is recorded (on disk) and returns it.
    async fn printed(&mut self, path: &str) -> anyhow::Result<String> {
        line_with(&mut self.stdout, path)
            .await
            .map_err(|e| anyhow::anyhow!("{e}; agent stderr:\n{}", read(&self.stderr)))
    }

    /// SIGKILL to this agent's process (and only it), then reaps it.
    async fn kill_9(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        // tokio's start_kill is kill(pid, SIGKILL) on Unix.
        self.child.start_kill()?;
        Ok(tokio::time::timeout(WAIT, self.child.wait()).await??)
    }
}

fn read(log: &Mutex<String>) -> String {
    log.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// History commands run against one data directory, through an agent's
/// inspector (`--inspect ADDR`) or straight from the store (`--no-inspect`).
struct HistoryCli {
    data_dir: PathBuf,
    inspect: Option<SocketAddr>,
}

impl HistoryCli {
    async fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = command(relay_client_bin());
        cmd.args(args).arg("--data-dir").arg(&self.data_dir);
        match self.inspect {
            Some(addr) => cmd.arg("--inspect").arg(addr.to_string()),
            None => cmd.arg("--no-inspect"),
        };
        tokio::time::timeout(WAIT, cmd.output())
            .await
            .map_err(|_| anyhow::anyhow!("`relay-client {}` did not finish", args.join(" ")))?
            .map_err(Into::into)
    }

    /// Runs a command that must succeed; returns its stdout.
    async fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.run(args).await?;
        anyhow::ensure!(
            out.status.success(),
            "`relay-client {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Runs a command that must succeed and print JSON.
    async fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let stdout = self.ok(args).await?;
        serde_json::from_str(&stdout).map_err(|e| anyhow::anyhow!("{e}: {stdout}"))
    }

    /// Runs a command that must fail; returns its stderr.
    async fn fails(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.run(args).await?;
        anyhow::ensure!(
            !out.status.success(),
            "`relay-client {}` should have failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(String::from_utf8(out.stderr)?)
    }

    /// `history --json` with extra flags: the listed paths, newest first.
    async fn paths(&self, flags: &[&str]) -> anyhow::Result<Vec<String>> {
        let mut args = vec!["history", "--json"];
        args.extend_from_slice(flags);
        let page = self.json(&args).await?;
        Ok(exchanges(&page)?
            .iter()
            .map(|e| e["path"].as_str().unwrap_or_default().to_owned())
            .collect())
    }
}

fn exchanges(page: &Value) -> anyhow::Result<&Vec<Value>> {
    page["exchanges"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no exchanges array in {page}"))
}

fn id_of(e: &Value) -> anyhow::Result<String> {
    e["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no id in {e}"))
}

fn base64_of(v: &Value) -> anyhow::Result<Vec<u8>> {
    let b64 = v["base64"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no base64 in {v}"))?;
    Ok(base64::engine::general_purpose::STANDARD.decode(b64)?)
}

/// Every field `history --json` documents, with its JSON type.
fn assert_documented_fields(e: &Value) {
    let obj = e.as_object().cloned().unwrap_or_default();
    for key in [
        "id",
        "delivery_id",
        "tunnel",
        "received_at_relay_ms",
        "received_at_ms",
        "remote_addr",
        "method",
        "url",
        "path",
        "target",
        "request",
        "response",
        "outcome",
        "error",
        "duration",
        "provider",
        "signature",
        "replay_of",
    ] {
        assert!(obj.contains_key(key), "{key} missing from {e}");
    }
    assert!(e["id"].as_str().is_some_and(|id| id.len() == 26), "{e}");
    assert!(e["received_at_ms"].is_u64(), "{e}");
    assert!(e["request"]["headers"].is_array(), "{e}");
    assert!(e["request"]["body_len"].is_u64(), "{e}");
    assert!(e["duration"]["total_ms"].is_u64(), "{e}");
    assert!(e["outcome"].is_string(), "{e}");
}

const JSON_BODY: &str = r#"{"action":"opened","marker":"Needle-42"}"#;

/// The agent is running: every command goes through its inspector API (the
/// store itself is locked by the agent, so nothing else could answer).
#[tokio::test]
async fn history_commands_go_through_the_running_agents_inspector() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let dir = tempfile::tempdir()?;
    // The agent gets a relative --data-dir; the commands below name the same
    // directory by its absolute path from another working directory.
    let mut agent =
        AgentProcess::start(&relay, &app, "clihist", dir.path(), Path::new("agent-data")).await?;
    let cli = HistoryCli {
        data_dir: dir.path().join("agent-data"),
        inspect: Some(agent.inspector),
    };

    let (status, headers, _) = send(
        Request::post(relay.url("clihist", "/hooks/github?delivery=1"))
            .header("content-type", "application/json")
            .header("x-keep", "k")
            .header("x-drop", "d")
            .body(full(JSON_BODY))?,
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    let delivery_id = headers
        .get("x-hookrelay-delivery-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let line = agent.printed("/hooks/github").await?;
    assert!(line.contains("POST") && line.contains("200"), "{line}");
    let (status, _, _) =
        send(Request::put(relay.url("clihist", "/status/500")).body(full("boom"))?).await?;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    agent.printed("/status/500").await?;
    assert_eq!(app.received().len(), 2);

    // history --json: both, newest first, in the documented form.
    let page = cli.json(&["history", "--json"]).await?;
    let all = exchanges(&page)?;
    assert_eq!(all.len(), 2, "{page}");
    assert!(page["next_before"].is_null(), "{page}");
    let (failed, hook) = (&all[0], &all[1]);
    for e in all {
        assert_documented_fields(e);
        assert_eq!(e["tunnel"], "clihist");
        assert!(e["replay_of"].is_null());
    }
    assert_eq!(failed["method"], "PUT");
    assert_eq!(failed["path"], "/status/500");
    assert_eq!(failed["response"]["status"], 500);
    assert_eq!(hook["method"], "POST");
    assert_eq!(hook["path"], "/hooks/github?delivery=1");
    assert_eq!(
        hook["url"],
        relay.url("clihist", "/hooks/github?delivery=1")
    );
    assert_eq!(hook["target"], app.target());
    assert_eq!(hook["delivery_id"], delivery_id.as_str());
    assert_eq!(hook["outcome"], "ok");
    assert_eq!(hook["response"]["status"], 200);
    assert_eq!(hook["request"]["body_len"], JSON_BODY.len());
    let hook_id = id_of(hook)?;
    let failed_id = id_of(failed)?;
    assert!(failed_id > hook_id, "ids sort by time");

    // Filters.
    let failed_only = vec!["/status/500".to_owned()];
    let hook_only = vec!["/hooks/github?delivery=1".to_owned()];
    for (flags, expected) in [
        (&["--status", "5xx"][..], &failed_only),
        (&["--status", "failed"], &failed_only),
        (&["--status", "500"], &failed_only),
        (&["--status", "2xx"], &hook_only),
        (&["--method", "put"], &failed_only),
        (&["--method", "POST"], &hook_only),
        (&["--path", "HOOKS/git"], &hook_only),
        (&["--path", "status"], &failed_only),
        (&["--search", "needle-42"], &hook_only),
        (&["--search", "status 500"], &failed_only),
        (&["--header", "x-keep: k"], &hook_only),
        (&["--method", "post", "--status", "5xx"], &vec![]),
        (&["--tunnel", "other"], &vec![]),
    ] {
        assert_eq!(&cli.paths(flags).await?, expected, "history {flags:?}");
    }
    // Paging.
    let first = cli.json(&["history", "--json", "--limit", "1"]).await?;
    assert_eq!(exchanges(&first)?.len(), 1);
    assert_eq!(first["next_before"], failed_id.as_str());
    assert_eq!(
        cli.paths(&["--before", &failed_id]).await?,
        hook_only,
        "the next page"
    );

    // show --json: the exchange with both bodies, as text and as base64.
    let shown = cli.json(&["show", &hook_id, "--json"]).await?;
    assert_eq!(shown["id"], hook_id.as_str());
    assert_eq!(shown["request_body"]["text"], JSON_BODY);
    assert_eq!(base64_of(&shown["request_body"])?, JSON_BODY.as_bytes());
    assert_eq!(shown["request_body"]["len"], JSON_BODY.len());
    assert_eq!(shown["response_body"]["text"], r#"{"ok":true}"#);
    let shown_failed = cli.json(&["show", &failed_id, "--json"]).await?;
    assert_eq!(shown_failed["request_body"]["text"], "boom");
    assert_eq!(shown_failed["response_body"]["text"], "status 500");
    let text = cli.ok(&["show", &hook_id]).await?;
    assert!(
        text.contains(&hook_id)
            && text.contains(&format!(
                "POST {}",
                relay.url("clihist", "/hooks/github?delivery=1")
            ))
            && text.contains("HTTP 200")
            && text.contains("\"Needle-42\""),
        "{text}"
    );

    // export: curl, HAR 1.2, JSON.
    let curl = cli.ok(&["export", &hook_id, "--format", "curl"]).await?;
    assert!(
        curl.starts_with(&format!(
            "curl -X POST '{}'",
            relay.url("clihist", "/hooks/github?delivery=1")
        )),
        "{curl}"
    );
    assert!(
        curl.contains("-H 'x-keep: k'") && curl.contains(&format!("--data-binary '{JSON_BODY}'")),
        "{curl}"
    );
    let har = cli.json(&["export", &hook_id, "--format", "har"]).await?;
    assert_eq!(har["log"]["version"], "1.2", "{har}");
    let entry = &har["log"]["entries"][0];
    assert_eq!(entry["request"]["method"], "POST");
    assert_eq!(
        entry["request"]["url"],
        relay.url("clihist", "/hooks/github?delivery=1")
    );
    assert_eq!(entry["request"]["postData"]["text"], JSON_BODY);
    assert_eq!(entry["response"]["status"], 200);
    let exported = cli
        .json(&["export", &hook_id, "--format", "json", "--show-secrets"])
        .await?;
    assert_eq!(
        exported, shown,
        "export --format json --show-secrets is show --json"
    );
    // Without --show-secrets, credentials (here the app's Set-Cookie) are redacted.
    let redacted = cli.json(&["export", &hook_id, "--format", "json"]).await?;
    let cookies: Vec<&Value> = redacted["response"]["headers"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter(|h| h["name"] == "set-cookie")
                .map(|h| &h["value"])
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        cookies,
        [&Value::from("[redacted]"), &Value::from("[redacted]")]
    );

    // replay: the same request again, recorded as a new, linked exchange.
    let replayed = cli.json(&["replay", &hook_id, "--json"]).await?;
    let replayed = replayed
        .as_array()
        .filter(|a| a.len() == 1)
        .map(|a| a[0].clone())
        .ok_or_else(|| anyhow::anyhow!("one replay expected: {replayed}"))?;
    assert_eq!(replayed["replay_of"], hook_id.as_str());
    assert_eq!(replayed["response"]["status"], 200);
    assert!(replayed["delivery_id"].is_null());
    let got = app.received();
    assert_eq!(got.len(), 3, "the app got the replay");
    assert_eq!(got[2].method, "POST");
    assert_eq!(got[2].uri, "/hooks/github?delivery=1");
    assert_eq!(&got[2].body[..], JSON_BODY.as_bytes());
    assert_eq!(got[2].header("x-keep"), [&b"k"[..]]);
    assert_eq!(got[2].header("x-drop"), [&b"d"[..]]);

    // replay with edits: headers set and removed, body from a file.
    let body_file = dir.path().join("edited.json");
    std::fs::write(&body_file, b"{\"edited\":true}")?;
    let body_file_arg = body_file
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("utf-8 path"))?;
    let edited = cli
        .json(&[
            "replay",
            &hook_id,
            "--set-header",
            "X-A: 1",
            "--set-header",
            "X-Keep: changed",
            "--remove-header",
            "X-Drop",
            "--body-file",
            body_file_arg,
            "--json",
        ])
        .await?;
    let edited = edited
        .as_array()
        .filter(|a| a.len() == 1)
        .map(|a| a[0].clone())
        .ok_or_else(|| anyhow::anyhow!("one replay expected: {edited}"))?;
    assert_eq!(edited["replay_of"], hook_id.as_str());
    assert_eq!(edited["request"]["body_len"], 15);
    let got = app.received();
    assert_eq!(got.len(), 4, "the app got the edited replay");
    let last = &got[3];
    assert_eq!(last.uri, "/hooks/github?delivery=1");
    assert_eq!(&last.body[..], b"{\"edited\":true}");
    assert_eq!(last.header("content-length"), [&b"15"[..]]);
    assert_eq!(last.header("x-a"), [&b"1"[..]]);
    assert_eq!(last.header("x-keep"), [&b"changed"[..]]);
    assert!(last.header("x-drop").is_empty(), "x-drop was removed");
    let edited_shown = cli.json(&["show", &id_of(&edited)?, "--json"]).await?;
    assert_eq!(edited_shown["request_body"]["text"], "{\"edited\":true}");

    // Both replays are in the history, newest first, linked to the original.
    let page = cli.json(&["history", "--json"]).await?;
    let all = exchanges(&page)?;
    let ids: Vec<String> = all.iter().map(id_of).collect::<anyhow::Result<_>>()?;
    assert_eq!(
        ids,
        [
            id_of(&edited)?,
            id_of(&replayed)?,
            failed_id.clone(),
            hook_id.clone()
        ]
    );
    assert_eq!(all[0]["replay_of"], hook_id.as_str());
    assert_eq!(all[1]["replay_of"], hook_id.as_str());

    // The table for people.
    let table = cli.ok(&["history"]).await?;
    let header = table.lines().next().unwrap_or_default();
    for column in ["ID", "METHOD", "PATH", "STATUS"] {
        assert!(header.contains(column), "{table}");
    }
    let row = |id: &str| {
        table
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_default()
            .to_owned()
    };
    let failed_row = row(&failed_id);
    assert!(
        failed_row.contains("PUT")
            && failed_row.contains("/status/500")
            && failed_row.contains(" 500 "),
        "{table}"
    );
    let hook_row = row(&hook_id);
    assert!(
        hook_row.contains("POST")
            && hook_row.contains("/hooks/github?delivery=1")
            && hook_row.contains(" 200 "),
        "{table}"
    );
    assert!(
        row(&id_of(&replayed)?).contains(&format!("replay of {hook_id}")),
        "{table}"
    );

    // Bad and unknown ids fail with a message that says so.
    let err = cli.fails(&["show", "NOTANID"]).await?;
    assert!(
        err.contains("error:") && err.contains("\"NOTANID\" is not an exchange id"),
        "{err}"
    );
    let unknown = relay_client::history::ExchangeId::new().to_string();
    let err = cli.fails(&["show", &unknown, "--json"]).await?;
    assert!(err.contains(&format!("no exchange {unknown}")), "{err}");
    let err = cli.fails(&["export", "NOTANID", "--format", "har"]).await?;
    assert!(err.contains("is not an exchange id"), "{err}");
    let err = cli.fails(&["replay", "NOTANID"]).await?;
    assert!(err.contains("is not an exchange id"), "{err}");
    assert_eq!(app.received().len(), 4, "failed commands sent nothing");

    // Without the inspector address, the locked store is refused with advice.
    let direct = HistoryCli {
        data_dir: cli.data_dir.clone(),
        inspect: None,
    };
    let err = direct.fails(&["history"]).await?;
    assert!(
        err.contains("held by a running agent") && err.contains("--inspect"),
        "{err}"
    );

    agent.kill_9().await?;
    Ok(())
}

/// Killed with SIGKILL right after printing an exchange: everything printed
/// is on disk, the commands read and replay it without an agent, and a
/// restarted agent serves it again.
#[tokio::test]
async fn history_survives_kill_9_and_commands_work_without_an_agent() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let other = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("agent");
    let mut agent = AgentProcess::start(&relay, &app, "crash", dir.path(), &data_dir).await?;
    let dead_inspector = agent.inspector;

    post(&relay.url("crash", "/a/json"), r#"{"n":1}"#).await?;
    agent.printed("/a/json").await?;
    let binary: &'static [u8] = b"\x00\x01\xff";
    send(
        Request::post(relay.url("crash", "/echo/bin"))
            .header("content-type", "application/octet-stream")
            .body(full(binary))?,
    )
    .await?;
    agent.printed("/echo/bin").await?;
    send(Request::delete(relay.url("crash", "/status/503")).body(full(""))?).await?;
    agent.printed("/status/503").await?;
    // Nothing between the last printed line and the kill.
    let status = agent.kill_9().await?;
    assert!(!status.success());
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(status.signal(), Some(9), "{status}");
    }

    // Direct mode, both ways: no inspector, or a dead inspector address.
    let direct = HistoryCli {
        data_dir: data_dir.clone(),
        inspect: None,
    };
    let stale = HistoryCli {
        data_dir: data_dir.clone(),
        inspect: Some(dead_inspector),
    };
    let expected = ["/status/503", "/echo/bin", "/a/json"];
    assert_eq!(direct.paths(&[]).await?, expected);
    assert_eq!(stale.paths(&[]).await?, expected);
    assert_eq!(direct.paths(&["--status", "5xx"]).await?, ["/status/503"]);
    let page = direct.json(&["history", "--json"]).await?;
    let all = exchanges(&page)?;
    for e in all {
        assert_documented_fields(e);
    }
    assert_eq!(all[0]["method"], "DELETE");
    assert_eq!(all[0]["response"]["status"], 503);
    let ids: Vec<String> = all.iter().map(id_of).collect::<anyhow::Result<_>>()?;
    let (bin_id, json_id) = (ids[1].clone(), ids[2].clone());

    // Bodies, exactly.
    let bin = direct.json(&["show", &bin_id, "--json"]).await?;
    assert_eq!(bin["request_body"]["base64"], "AAH/");
    assert!(bin["request_body"]["text"].is_null(), "binary has no text");
    assert_eq!(base64_of(&bin["response_body"])?, binary, "echoed back");
    let json = stale.json(&["show", &json_id, "--json"]).await?;
    assert_eq!(json["request_body"]["text"], r#"{"n":1}"#);
    assert_eq!(json["response_body"]["text"], r#"{"ok":true}"#);
    let har = direct.json(&["export", &bin_id, "--format", "har"]).await?;
    assert_eq!(har["log"]["version"], "1.2");
    assert_eq!(
        har["log"]["entries"][0]["request"]["postData"]["encoding"],
        "base64"
    );
    let table = direct.ok(&["history"]).await?;
    assert!(
        table.contains("/echo/bin") && table.contains("DELETE"),
        "{table}"
    );
    let err = direct.fails(&["show", "NOTANID"]).await?;
    assert!(err.contains("\"NOTANID\" is not an exchange id"), "{err}");

    // Replays without an agent: to another app, and to the recorded target.
    let to_other = direct
        .json(&["replay", &bin_id, "--to", &other.target(), "--json"])
        .await?;
    assert_eq!(to_other[0]["replay_of"], bin_id.as_str(), "{to_other}");
    assert_eq!(to_other[0]["target"], other.target());
    assert_eq!(to_other[0]["response"]["status"], 200);
    let got = other.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].uri, "/echo/bin");
    assert_eq!(&got[0].body[..], binary);
    let before = app.received().len();
    let again = stale.json(&["replay", &json_id, "--json"]).await?;
    assert_eq!(again[0]["replay_of"], json_id.as_str(), "{again}");
    assert_eq!(again[0]["target"], app.target());
    assert_eq!(app.received().len(), before + 1);
    let replay_ids = [id_of(&again[0])?, id_of(&to_other[0])?];
    // The replays were written to the store before the command exited.
    assert_eq!(
        direct.paths(&[]).await?,
        [
            "/a/json",
            "/echo/bin",
            "/status/503",
            "/echo/bin",
            "/a/json"
        ]
    );

    // A restarted agent on the same directory serves all of it over its API.
    let mut agent = AgentProcess::start(&relay, &app, "crash", dir.path(), &data_dir).await?;
    let api = HistoryCli {
        data_dir: data_dir.clone(),
        inspect: Some(agent.inspector),
    };
    let page = api.json(&["history", "--json"]).await?;
    let listed: Vec<String> = exchanges(&page)?
        .iter()
        .map(id_of)
        .collect::<anyhow::Result<_>>()?;
    let mut expected_ids = replay_ids.to_vec();
    expected_ids.extend(ids.iter().cloned());
    assert_eq!(listed, expected_ids);
    let (status, _, body) = send(
        Request::get(format!("http://{}/api/exchanges/{bin_id}", agent.inspector))
            .body(full(""))?,
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    let detail: Value = serde_json::from_slice(&body)?;
    assert_eq!(base64_of(&detail["request_body"])?, binary);
    // And it keeps recording.
    post(&relay.url("crash", "/after/restart"), "{}").await?;
    agent.printed("/after/restart").await?;
    assert_eq!(api.paths(&["--limit", "1"]).await?, ["/after/restart"]);
    agent.kill_9().await?;
    Ok(())
}

/// A large body (in a segment file beside the store, not a sled value) survives SIGKILL
/// right after its exchange was printed, both ways, byte for byte.
#[tokio::test]
async fn large_bodies_survive_kill_9_whole() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("agent");
    let mut agent = AgentProcess::start(&relay, &app, "big", dir.path(), &data_dir).await?;
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (status, _, echoed) = send(
        Request::post(relay.url("big", "/echo/big"))
            .header("content-type", "application/octet-stream")
            .body(full(big.clone()))?,
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echoed.len(), big.len());
    agent.printed("/echo/big").await?;
    agent.kill_9().await?;

    let direct = HistoryCli {
        data_dir: data_dir.clone(),
        inspect: None,
    };
    let page = direct.json(&["history", "--json"]).await?;
    let id = id_of(&exchanges(&page)?[0])?;
    let shown = direct.json(&["show", &id, "--json"]).await?;
    assert_eq!(base64_of(&shown["request_body"])?, big, "request body");
    assert_eq!(base64_of(&shown["response_body"])?, big, "response body");
    let files: Vec<String> = std::fs::read_dir(data_dir.join("history-bodies"))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    assert_eq!(
        files,
        ["0000000000.seg"],
        "both bodies in one segment, not a file each"
    );
    Ok(())
}

/// Large uploads recorded together (their pieces interleaved in one segment
/// file) while others are cut off midway by a SIGKILL of the agent: every
/// exchange the history lists afterwards has both bodies byte for byte, the
/// cut ones are not listed, a restarted agent appends to a new segment, and
/// clearing the history through the API deletes every segment file.
#[tokio::test]
async fn interleaved_large_bodies_survive_kill_9_and_clearing_deletes_their_segments(
) -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("agent");
    let mut agent = AgentProcess::start(&relay, &app, "seg", dir.path(), &data_dir).await?;
    let body_of =
        |n: u32| -> Vec<u8> { (0..200_000u32).map(|i| ((i * 7 + n) % 251) as u8).collect() };

    // Cut off: 150,000 of 300,000 bytes sent, then nothing.
    // The senders are held (the bodies never finish) until the test ends.
    let (mut stalled, mut feeds) = (Vec::new(), Vec::new());
    for n in 0..3u32 {
        let (tx, body) = channel_body();
        let req = Request::post(relay.url("seg", &format!("/echo/cut/{n}")))
            .header("content-length", "300000")
            .body(body)?;
        stalled.push(tokio::spawn(client().request(req)));
        for _ in 0..3 {
            tx.send(bytes::Bytes::from(vec![b'c'; 50_000])).await?;
        }
        feeds.push(tx);
    }
    // Recorded: eight at once.
    let sent = (0..8u32).map(|n| {
        let url = relay.url("seg", &format!("/echo/whole/{n}"));
        let body = body_of(n);
        async move {
            let (status, _, echoed) = send(
                Request::post(url)
                    .header("content-type", "application/octet-stream")
                    .body(full(body.clone()))?,
            )
            .await?;
            anyhow::ensure!(status == StatusCode::OK && echoed == body, "echo {status}");
            Ok(())
        }
    });
    for result in futures_util::future::join_all(sent).await {
        result?;
    }
    // All eight printed (in any order), so all eight are on disk.
    for _ in 0..8 {
        agent.printed("/echo/whole/").await?;
    }
    // The cut uploads' first pieces are in the segment too (past the 64 KiB
    // kept in memory): 8 exchanges x 2 bodies, plus 3 x 128 KiB at least.
    let segment = data_dir.join("history-bodies").join("0000000000.seg");
    until(WAIT, "the cut uploads' first pieces", || {
        std::fs::metadata(&segment).is_ok_and(|m| m.len() >= 16 * 200_000 + 3 * 128 * 1024)
    })
    .await?;
    agent.kill_9().await?;

    let direct = HistoryCli {
        data_dir: data_dir.clone(),
        inspect: None,
    };
    let mut paths = direct.paths(&[]).await?;
    paths.sort();
    let expected: Vec<String> = (0..8).map(|n| format!("/echo/whole/{n}")).collect();
    assert_eq!(paths, expected, "the cut uploads are not recorded");
    let page = direct.json(&["history", "--json"]).await?;
    for exchange in exchanges(&page)? {
        let id = id_of(exchange)?;
        let shown = direct.json(&["show", &id, "--json"]).await?;
        let n: u32 = shown["path"]
            .as_str()
            .and_then(|p| p.rsplit('/').next())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("path of {shown}"))?;
        assert_eq!(
            base64_of(&shown["request_body"])?,
            body_of(n),
            "request {n}"
        );
        assert_eq!(
            base64_of(&shown["response_body"])?,
            body_of(n),
            "response {n}"
        );
    }

    // A restarted agent appends to a segment of its own.
    let mut agent = AgentProcess::start(&relay, &app, "seg", dir.path(), &data_dir).await?;
    let (status, _, _) =
        send(Request::post(relay.url("seg", "/echo/after")).body(full(body_of(9)))?).await?;
    assert_eq!(status, StatusCode::OK);
    agent.printed("/echo/after").await?;
    let segments = || -> anyhow::Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(data_dir.join("history-bodies"))?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        Ok(names)
    };
    assert_eq!(segments()?, ["0000000000.seg", "0000000001.seg"]);
    // Clearing the history deletes them all before it answers.
    let (status, _, _) =
        send(Request::delete(format!("http://{}/api/exchanges", agent.inspector)).body(full(""))?)
            .await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(segments()?, Vec::<String>::new());
    agent.kill_9().await?;
    drop(feeds);
    for task in stalled {
        task.abort();
    }
    Ok(())
}

/// Reading history without an agent never prunes it: the agent may keep more
/// than the default limits (`--max-exchanges`), and `history` is a read.
#[tokio::test]
async fn direct_mode_commands_keep_history_beyond_the_default_limits() -> anyhow::Result<()> {
    use relay_client::history::{
        Durations, Exchange, ExchangeId, History, Outcome, RequestRecord, Retention,
        DEFAULT_MAX_EXCHANGES,
    };
    let dir = tempfile::tempdir()?;
    // An agent run with --max-exchanges above the default filled its store.
    let total = DEFAULT_MAX_EXCHANGES + 5;
    let mut first = None;
    {
        let history = History::open(
            dir.path(),
            Retention {
                max_exchanges: total * 2,
                max_bytes: u64::MAX,
            },
        )?;
        let mut pending = Vec::new();
        for i in 0..total {
            let id = ExchangeId::new();
            first.get_or_insert(id);
            let exchange = Exchange {
                id,
                delivery_id: None,
                tunnel: "big".into(),
                received_at_relay_ms: None,
                received_at_ms: relay_client::history::now_ms(),
                remote_addr: None,
                method: "POST".into(),
                url: format!("http://relay/t/big/n/{i}"),
                path: format!("/n/{i}"),
                target: "http://127.0.0.1:9".into(),
                request: RequestRecord {
                    headers: vec![],
                    body_len: 0,
                },
                response: None,
                outcome: Outcome::LocalAppUnreachable,
                error: None,
                duration: Durations::default(),
                provider: None,
                signature: None,
                replay_of: None,
                event_id: None,
                duplicate_of: None,
                queued: None,
            };
            // Recorded concurrently so that the flushes are shared.
            let h = history.clone();
            pending.push(tokio::spawn(async move { h.record(exchange, &[]).await }));
            if pending.len() == 500 {
                for p in pending.drain(..) {
                    p.await??;
                }
            }
        }
        for p in pending.drain(..) {
            p.await??;
        }
        history.flush().await?;
    }
    let first = first
        .ok_or_else(|| anyhow::anyhow!("nothing recorded"))?
        .to_string();
    let direct = HistoryCli {
        data_dir: dir.path().to_path_buf(),
        inspect: None,
    };
    // Before the fix, opening the store with the default limits dropped the
    // five oldest here.
    direct.ok(&["history", "--limit", "1"]).await?;
    let oldest = direct.json(&["show", &first, "--json"]).await?;
    assert_eq!(oldest["path"], "/n/0", "the oldest exchange is still there");
    Ok(())
}

#[tokio::test]
async fn a_data_dir_without_history_is_an_error_not_an_empty_list() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let typo = dir.path().join("no-such-agent");
    let out = tokio::time::timeout(
        WAIT,
        command(relay_client_bin())
            .args(["history", "--no-inspect", "--data-dir"])
            .arg(&typo)
            .output(),
    )
    .await??;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no history in"), "{stderr}");
    assert!(!typo.exists(), "nothing was created at the mistyped path");
    Ok(())
}

#[tokio::test]
async fn configured_secret_headers_are_redacted_in_exports_unless_asked() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("agent");
    // The agent's own list comes from its config file, in another case.
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "redact_headers = [\"X-Shop-TOKEN\"]\n")?;
    let config = config.to_string_lossy().into_owned();
    let mut agent = AgentProcess::start_with(
        &relay,
        &app,
        "redacted",
        dir.path(),
        &data_dir,
        &["--config", &config],
    )
    .await?;
    send(
        Request::post(relay.url("redacted", "/shop"))
            .header("content-type", "application/json")
            .header("x-shop-token", "shop-s3cret")
            .header("x-cli-token", "cli-s3cret")
            .header("authorization", "Bearer auth-s3cret")
            .header("stripe-signature", "t=1,v1=00")
            .header("x-visible", "shown")
            .body(full(JSON_BODY))?,
    )
    .await?;
    agent.printed("/shop").await?;
    let through_agent = HistoryCli {
        data_dir: data_dir.clone(),
        inspect: Some(agent.inspector),
    };
    let page = through_agent.json(&["history", "--json"]).await?;
    let id = id_of(&exchanges(&page)?[0])?;

    // `NAME: VALUE` as each format writes a header, so that a value's absence
    // is not just an accident of quoting.
    let check = |format: &str, text: &str, hidden: &[&str], shown: &[&str]| {
        for secret in hidden {
            assert!(!text.contains(secret), "{format} shows {secret}: {text}");
        }
        for value in shown {
            assert!(text.contains(value), "{format} lacks {value}: {text}");
        }
    };
    let formats = ["curl", "har", "json"];
    let redacted = ["shop-s3cret", "auth-s3cret"];
    let kept = ["[redacted]", "t=1,v1=00", "shown", "cli-s3cret"];
    for format in formats {
        // The CLI, through the running agent.
        let text = through_agent
            .ok(&["export", &id, "--format", format])
            .await?;
        check(format, &text, &redacted, &kept);
        let text = through_agent
            .ok(&[
                "export",
                &id,
                "--format",
                format,
                "--redact-header",
                "X-CLI-Token",
            ])
            .await?;
        check(
            format,
            &text,
            &["shop-s3cret", "cli-s3cret"],
            &["[redacted]"],
        );
        let text = through_agent
            .ok(&["export", &id, "--format", format, "--show-secrets"])
            .await?;
        check(
            format,
            &text,
            &["[redacted]"],
            &["shop-s3cret", "cli-s3cret", "auth-s3cret"],
        );

        // The inspector's export, as the web UI's "Copy as curl" and "HAR" fetch it.
        let url = format!(
            "http://{}/api/exchanges/{id}/export?format={format}",
            agent.inspector
        );
        let (status, _, body) = send(Request::get(&url).body(full(""))?).await?;
        assert_eq!(status, StatusCode::OK);
        check(format, &String::from_utf8_lossy(&body), &redacted, &kept);
        let (_, _, body) =
            send(Request::get(format!("{url}&secrets=true")).body(full(""))?).await?;
        check(
            format,
            &String::from_utf8_lossy(&body),
            &["[redacted]"],
            &["shop-s3cret"],
        );
    }
    let (status, _, body) = send(
        Request::get(format!(
            "http://{}/api/exchanges/{id}/export?format=curl&redact=bad%20name",
            agent.inspector
        ))
        .body(full(""))?,
    )
    .await?;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(&body)
    );

    // The agent left its list in the store: exports without it still hide the value.
    agent.kill_9().await?;
    let direct = HistoryCli {
        data_dir,
        inspect: None,
    };
    for format in formats {
        let text = direct.ok(&["export", &id, "--format", format]).await?;
        check(format, &text, &redacted, &kept);
        let text = direct
            .ok(&[
                "export",
                &id,
                "--format",
                format,
                "--redact-header",
                "x-cli-token",
            ])
            .await?;
        check(
            format,
            &text,
            &["shop-s3cret", "cli-s3cret"],
            &["[redacted]"],
        );
        let text = direct
            .ok(&["export", &id, "--format", format, "--show-secrets"])
            .await?;
        check(
            format,
            &text,
            &["[redacted]"],
            &["shop-s3cret", "auth-s3cret"],
        );
    }
    let err = direct
        .fails(&[
            "export",
            &id,
            "--format",
            "curl",
            "--redact-header",
            "X-Key:",
        ])
        .await?;
    assert!(err.contains("not a header name"), "{err}");
    Ok(())
}
