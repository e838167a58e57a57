//! History, the inspector API, the live feed and replay, against a real relay,
//! agent and app.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use hookrelay_shared::signature::{self, Provider, SecretSet, SignedRequest};
use http::{Request, StatusCode};
use relay_client::{history::Outcome, Agent};
use serde_json::{json, Value};

const STRIPE_SECRET: &str = "whsec_test_secret";

/// An agent with the inspector on and a Stripe secret configured.
async fn inspected_agent(relay: &TestRelay, tunnel: &str, target: &str) -> anyhow::Result<Agent> {
    let mut config = relay.agent_config(Some(tunnel), target);
    config.inspect = Some("127.0.0.1:0".parse()?);
    let mut secrets = SecretSet::new();
    secrets.add(Provider::Stripe, STRIPE_SECRET.into())?;
    secrets.add(
        Provider::StandardWebhooks,
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
    )?;
    config.secrets = secrets;
    let agent = connected_agent(config).await?;
    Ok(agent)
}

fn api(agent: &Agent, path: &str) -> String {
    format!(
        "http://{}{path}",
        agent.inspector_addr().expect("inspector on")
    )
}

async fn get_json(url: &str) -> anyhow::Result<Value> {
    let (status, _, body) = send(Request::get(url).body(full(""))?).await?;
    anyhow::ensure!(
        status.is_success(),
        "{url}: {status} {}",
        String::from_utf8_lossy(&body)
    );
    Ok(serde_json::from_slice(&body)?)
}

async fn post_json(url: &str, body: Value) -> anyhow::Result<(StatusCode, Value)> {
    let req = Request::post(url)
        .header("content-type", "application/json")
        .body(full(body.to_string()))?;
    let (status, _, body) = send(req).await?;
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

#[tokio::test]
async fn every_exchange_is_recorded_exactly() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = inspected_agent(&relay, "rec", &app.target()).await?;
    let body: &'static [u8] = b"{\"id\":\"evt_1\",\"bin\":\"\xff\"}";
    let req = Request::post(relay.url("rec", "/hooks/x?y=1"))
        .header("content-type", "application/json")
        .header("x-multi", "1")
        .header("x-multi", "2")
        .body(full(body))?;
    let (status, headers, _) = send(req).await?;
    assert_eq!(status, StatusCode::OK);
    let delivery_id = headers
        .get("x-hookrelay-delivery-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    recorded(&agent, 1).await?;

    let page = get_json(&api(&agent, "/api/exchanges")).await?;
    let e = &page["exchanges"][0];
    assert_eq!(e["delivery_id"], delivery_id.as_str());
    assert_eq!(e["tunnel"], "rec");
    assert_eq!(e["method"], "POST");
    assert_eq!(e["path"], "/hooks/x?y=1");
    assert_eq!(e["url"], relay.url("rec", "/hooks/x?y=1"));
    assert_eq!(e["outcome"], "ok");
    assert_eq!(e["response"]["status"], 200);
    assert_eq!(e["request"]["body_len"], body.len());
    assert!(
        e["received_at_relay_ms"].as_u64().is_some()
            && e["duration"]["total_ms"].as_u64().is_some()
    );
    let multi: Vec<&Value> = e["request"]["headers"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter(|h| h["name"] == "x-multi")
                .map(|h| &h["value"])
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(multi, [&json!("1"), &json!("2")]);

    let id = e["id"].as_str().unwrap_or_default().to_owned();
    let detail = get_json(&api(&agent, &format!("/api/exchanges/{id}"))).await?;
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(detail["request_body"]["base64"].as_str().unwrap_or(""))?;
    assert_eq!(bytes, body, "the stored body is byte-exact");
    assert!(
        detail["request_body"]["text"].is_null(),
        "not valid UTF-8, so no text view"
    );
    assert_eq!(detail["response_body"]["text"], r#"{"ok":true}"#);
    Ok(())
}

#[tokio::test]
async fn list_filters_and_pages_newest_first() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = inspected_agent(&relay, "filter", &app.target()).await?;
    post(&relay.url("filter", "/github/push"), r#"{"ref":"main"}"#).await?;
    post(&relay.url("filter", "/status/404"), "nope").await?;
    post(&relay.url("filter", "/status/500"), "boom").await?;
    send(
        Request::put(relay.url("filter", "/stripe"))
            .header("x-tag", "blue")
            .body(full("needle in here"))?,
    )
    .await?;
    recorded(&agent, 4).await?;

    let paths = |v: &Value| -> Vec<String> {
        v["exchanges"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| e["path"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let all = get_json(&api(&agent, "/api/exchanges")).await?;
    assert_eq!(
        paths(&all),
        ["/stripe", "/status/500", "/status/404", "/github/push"]
    );
    for (query, expected) in [
        ("method=put", vec!["/stripe"]),
        ("path=github", vec!["/github/push"]),
        ("status=4xx", vec!["/status/404"]),
        ("status=failed", vec!["/status/500"]),
        ("q=NEEDLE", vec!["/stripe"]),
        ("header=x-tag:blue", vec!["/stripe"]),
        ("tunnel=other", vec![]),
        (
            "since=1h",
            vec!["/stripe", "/status/500", "/status/404", "/github/push"],
        ),
        ("until=1h", vec![]),
    ] {
        let got = get_json(&api(&agent, &format!("/api/exchanges?{query}"))).await?;
        assert_eq!(paths(&got), expected, "{query}");
    }
    let first = get_json(&api(&agent, "/api/exchanges?limit=3")).await?;
    assert_eq!(paths(&first).len(), 3);
    let before = first["next_before"].as_str().unwrap_or_default().to_owned();
    let rest = get_json(&api(
        &agent,
        &format!("/api/exchanges?limit=3&before={before}"),
    ))
    .await?;
    assert_eq!(paths(&rest), ["/github/push"]);
    assert!(rest["next_before"].is_null());

    // Delete one, then clear.
    let id = all["exchanges"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let (status, _, _) =
        send(Request::delete(api(&agent, &format!("/api/exchanges/{id}"))).body(full(""))?).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, _) =
        send(Request::get(api(&agent, &format!("/api/exchanges/{id}"))).body(full(""))?).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) =
        send(Request::delete(api(&agent, "/api/exchanges")).body(full(""))?).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        paths(&get_json(&api(&agent, "/api/exchanges")).await?).len(),
        0
    );
    let (status, _, _) =
        send(Request::get(api(&agent, "/api/exchanges/not-an-id")).body(full(""))?).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    Ok(())
}

#[tokio::test]
async fn inspector_refuses_foreign_hosts_and_origins() -> anyhow::Result<()> {
    let relay = TestRelay::spawn().await?;
    let agent = inspected_agent(&relay, "guard", "3000").await?;
    let url = api(&agent, "/api/exchanges");
    for (host, origin) in [
        ("evil.example", None),
        ("127.0.0.1.evil.example", None),
        ("localhost", Some("http://evil.example")),
        ("localhost", Some("null")),
    ] {
        let mut req = Request::delete(&url).header("host", host);
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        let (status, _, body) = send(req.body(full(""))?).await?;
        assert_eq!(status, StatusCode::FORBIDDEN, "{host} {origin:?}");
        assert_eq!(error_code(&body), "forbidden_host");
    }
    let (status, _, _) = send(
        Request::get(&url)
            .header("origin", "http://localhost:4040")
            .body(full(""))?,
    )
    .await?;
    assert_eq!(status, StatusCode::OK);

    // The WebSocket too: a rebinding page cannot open the live feed.
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        api(&agent, "/api/live").replace("http", "ws"),
    )?;
    req.headers_mut()
        .insert("origin", "http://evil.example".parse()?);
    assert!(
        tokio_tungstenite::connect_async(req).await.is_err(),
        "cross-origin websocket refused"
    );
    Ok(())
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next JSON message of the live feed.
async fn next(ws: &mut Ws) -> anyhow::Result<Value> {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("feed closed"))??;
        if msg.is_text() {
            return Ok(serde_json::from_str(msg.to_text()?)?);
        }
    }
}

#[tokio::test]
async fn live_feed_pushes_each_exchange_as_it_completes() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = inspected_agent(&relay, "live", &app.target()).await?;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(api(&agent, "/api/live").replace("http", "ws")).await?;
    let hello = next(&mut ws).await?;
    assert_eq!(hello["type"], "status");
    assert_eq!(hello["status"]["state"], "connected");
    assert_eq!(hello["status"]["public_urls"][0], relay.url("live", "/"));
    for i in 0..3 {
        post(&relay.url("live", &format!("/event/{i}")), "{}").await?;
        let event = next(&mut ws).await?;
        assert_eq!(event["type"], "exchange");
        assert_eq!(event["exchange"]["path"], format!("/event/{i}"));
        assert_eq!(event["exchange"]["response"]["status"], 200);
    }
    ws.send(tokio_tungstenite::tungstenite::Message::Close(None))
        .await?;
    Ok(())
}

#[tokio::test]
async fn replay_and_edited_replay_create_linked_exchanges() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let other = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = inspected_agent(&relay, "again", &app.target()).await?;
    let req = Request::post(relay.url("again", "/echo/orig?x=1"))
        .header("content-type", "text/plain")
        .header("x-keep", "k")
        .header("x-drop", "d")
        .body(full("original body"))?;
    send(req).await?;
    recorded(&agent, 1).await?;
    let original = get_json(&api(&agent, "/api/exchanges")).await?["exchanges"][0].clone();
    let id = original["id"].as_str().unwrap_or_default().to_owned();

    // Plain replay: same request to the same app.
    let (status, replayed) = post_json(
        &api(&agent, &format!("/api/exchanges/{id}/replay")),
        json!({}),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{replayed}");
    assert_eq!(replayed["replay_of"], id.as_str());
    assert_eq!(replayed["response"]["status"], 200);
    let got = app.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].uri, "/echo/orig?x=1");
    assert_eq!(&got[1].body[..], b"original body");
    assert_eq!(got[1].header("x-keep"), [&b"k"[..]]);

    // Edited replay to another app.
    let edits = json!({
        "to": other.target(),
        "method": "PUT",
        "path": "/echo/edited",
        "set_headers": ["X-Keep: changed", "X-New: n"],
        "remove_headers": ["x-drop"],
        "body": "edited body",
    });
    let (status, edited) =
        post_json(&api(&agent, &format!("/api/exchanges/{id}/replay")), edits).await?;
    assert_eq!(status, StatusCode::CREATED, "{edited}");
    let got = other.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].method, "PUT");
    assert_eq!(got[0].uri, "/echo/edited");
    assert_eq!(&got[0].body[..], b"edited body");
    assert_eq!(got[0].header("content-length"), [&b"11"[..]]);
    assert_eq!(got[0].header("x-keep"), [&b"changed"[..]]);
    assert_eq!(got[0].header("x-new"), [&b"n"[..]]);
    assert!(got[0].header("x-drop").is_empty());
    assert_eq!(app.received().len(), 2, "the edited replay went elsewhere");

    let detail = get_json(&api(
        &agent,
        &format!("/api/exchanges/{}", edited["id"].as_str().unwrap_or("")),
    ))
    .await?;
    assert_eq!(detail["replay_of"], id.as_str());
    assert_eq!(detail["request_body"]["text"], "edited body");
    assert_eq!(detail["response_body"]["text"], "edited body");
    let all = get_json(&api(&agent, "/api/exchanges")).await?;
    assert_eq!(all["exchanges"].as_array().map(Vec::len), Some(3));

    // Bad edits are refused with a reason, and nothing is sent.
    let (status, err) = post_json(
        &api(&agent, &format!("/api/exchanges/{id}/replay")),
        json!({ "set_headers": ["no colon"] }),
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    let (status, _) = post_json(
        &api(
            &agent,
            &format!(
                "/api/exchanges/{}/replay",
                relay_client::history::ExchangeId::new()
            ),
        ),
        json!({}),
    )
    .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    Ok(())
}

/// A Stripe-signed webhook replayed after the provider's tolerance: the app's
/// own check refuses the plain replay and accepts the re-signed one.
#[tokio::test]
async fn resigned_replay_passes_the_apps_own_signature_check() -> anyhow::Result<()> {
    use axum::{body::Body, extract::Request as AxumRequest, response::Response};
    use http_body_util::BodyExt;

    // The "app": verifies Stripe signatures against the real clock, like stripe-go.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let app_addr = listener.local_addr()?;
    let checker = axum::Router::new().fallback(|req: AxumRequest| async move {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let headers: Vec<(String, Vec<u8>)> = parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        let now = i64::try_from(relay_client::history::now_ms() / 1000).unwrap_or(0);
        let verdict = signature::verify(
            Provider::Stripe,
            &[STRIPE_SECRET],
            &SignedRequest {
                headers: &headers,
                body: &body,
                url: None,
            },
            now,
            None,
        );
        let status = if verdict.is_valid() { 200 } else { 400 };
        Response::builder()
            .status(status)
            .body(Body::from(format!("{verdict:?}")))
            .expect("response")
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, checker).await;
    });

    let relay = TestRelay::spawn().await?;
    let agent = inspected_agent(&relay, "resign", &format!("http://{app_addr}")).await?;
    // Signed 20 minutes ago: a delivery that waited, or one replayed later.
    let body = r#"{"id":"evt_1","type":"payment_intent.succeeded"}"#;
    let t = relay_client::history::now_ms() / 1000 - 1200;
    let mut headers = vec![("stripe-signature".to_owned(), Vec::new())];
    signature::resign(
        Provider::Stripe,
        STRIPE_SECRET,
        &mut headers,
        body.as_bytes(),
        i64::try_from(t)?,
    )?;
    let sig = String::from_utf8(headers[0].1.clone())?;
    let (status, _, _) = send(
        Request::post(relay.url("resign", "/stripe"))
            .header("stripe-signature", &sig)
            .body(full(body))?,
    )
    .await?;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "the app refuses a stale signature"
    );
    recorded(&agent, 1).await?;
    let original = get_json(&api(&agent, "/api/exchanges")).await?["exchanges"][0].clone();
    assert_eq!(original["provider"], "stripe");
    assert_eq!(original["signature"]["verdict"], "stale", "{original}");
    let id = original["id"].as_str().unwrap_or_default().to_owned();

    let (_, plain) = post_json(
        &api(&agent, &format!("/api/exchanges/{id}/replay")),
        json!({}),
    )
    .await?;
    assert_eq!(
        plain["response"]["status"], 400,
        "a plain replay is still stale"
    );
    let (_, resigned) = post_json(
        &api(&agent, &format!("/api/exchanges/{id}/replay")),
        json!({ "resign": true }),
    )
    .await?;
    assert_eq!(resigned["response"]["status"], 200, "{resigned}");
    assert_eq!(resigned["signature"]["verdict"], "valid");
    // Re-signing also covers an edited body.
    let (_, edited) = post_json(
        &api(&agent, &format!("/api/exchanges/{id}/replay")),
        json!({ "resign": true, "body": "{\"id\":\"evt_2\"}" }),
    )
    .await?;
    assert_eq!(edited["response"]["status"], 200, "{edited}");
    Ok(())
}

#[tokio::test]
async fn resign_without_a_secret_is_refused_with_a_reason() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = inspected_agent(&relay, "nosecret", &app.target()).await?;
    post(&relay.url("nosecret", "/plain"), "{}").await?;
    send(
        Request::post(relay.url("nosecret", "/slack"))
            .header("x-slack-signature", "v0=00")
            .header("x-slack-request-timestamp", "1")
            .body(full("a=b"))?,
    )
    .await?;
    recorded(&agent, 2).await?;
    let all = get_json(&api(&agent, "/api/exchanges")).await?;
    let slack = all["exchanges"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let plain = all["exchanges"][1]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(all["exchanges"][0]["signature"]["verdict"], "no_secret");
    let (status, err) = post_json(
        &api(&agent, &format!("/api/exchanges/{plain}/replay")),
        json!({ "resign": true }),
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        err["message"]
            .as_str()
            .is_some_and(|m| m.contains("no known signature")),
        "{err}"
    );
    let (status, err) = post_json(
        &api(&agent, &format!("/api/exchanges/{slack}/replay")),
        json!({ "resign": true }),
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        err["message"]
            .as_str()
            .is_some_and(|m| m.contains("--verify slack=")),
        "{err}"
    );
    assert_eq!(app.received().len(), 2, "refused replays send nothing");
    Ok(())
}

#[tokio::test]
async fn failed_exchanges_since_a_time_replay_in_one_call() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = inspected_agent(&relay, "bulk", &app.target()).await?;
    for path in [
        "/status/500",
        "/ok/1",
        "/status/503",
        "/ok/2",
        "/status/502",
    ] {
        post(&relay.url("bulk", path), "{}").await?;
    }
    recorded(&agent, 5).await?;
    let (status, out) = post_json(
        &api(&agent, "/api/replay"),
        json!({ "filter": { "status": "failed", "since": 0 } }),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{out}");
    let results = out["results"].as_array().cloned().unwrap_or_default();
    let paths: Vec<&str> = results
        .iter()
        .map(|r| r["exchange"]["path"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        paths,
        ["/status/500", "/status/503", "/status/502"],
        "oldest first, failures only"
    );
    assert_eq!(app.received().len(), 8);
    Ok(())
}

#[tokio::test]
async fn exports_render_curl_har_and_json() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = inspected_agent(&relay, "export", &app.target()).await?;
    send(
        Request::post(relay.url("export", "/hook?a=1"))
            .header("content-type", "application/json")
            .header("x-quote", "it's")
            .body(full(r#"{"a":"it's"}"#))?,
    )
    .await?;
    send(
        Request::post(relay.url("export", "/bin"))
            .body(full(Bytes::from_static(b"\x00\x01\xff")))?,
    )
    .await?;
    recorded(&agent, 2).await?;
    let all = get_json(&api(&agent, "/api/exchanges")).await?;
    let bin = all["exchanges"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let text = all["exchanges"][1]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    let (status, headers, curl) = send(
        Request::get(api(
            &agent,
            &format!("/api/exchanges/{text}/export?format=curl"),
        ))
        .body(full(""))?,
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    assert!(headers
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/plain")));
    let curl = String::from_utf8(curl.to_vec())?;
    assert!(
        curl.starts_with(&format!(
            "curl -X POST '{}'",
            relay.url("export", "/hook?a=1")
        )),
        "{curl}"
    );
    assert!(
        curl.contains(r"-H 'x-quote: it'\''s'")
            && curl.contains(r#"--data-binary '{"a":"it'\''s"}'"#),
        "{curl}"
    );
    let (_, _, curl_bin) = send(
        Request::get(api(
            &agent,
            &format!("/api/exchanges/{bin}/export?format=curl"),
        ))
        .body(full(""))?,
    )
    .await?;
    assert!(
        String::from_utf8(curl_bin.to_vec())?.starts_with("printf %s 'AAH/' | base64 -d | curl")
    );

    let har = get_json(&api(
        &agent,
        &format!("/api/exchanges/{text}/export?format=har"),
    ))
    .await?;
    assert_eq!(har["log"]["version"], "1.2");
    let entry = &har["log"]["entries"][0];
    assert_eq!(entry["request"]["method"], "POST");
    assert_eq!(entry["request"]["postData"]["text"], r#"{"a":"it's"}"#);
    assert_eq!(entry["request"]["queryString"][0]["name"], "a");
    assert_eq!(entry["response"]["status"], 200);
    assert!(entry["startedDateTime"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z') && t.len() == 24));
    let har_bin = get_json(&api(
        &agent,
        &format!("/api/exchanges/{bin}/export?format=har"),
    ))
    .await?;
    assert_eq!(
        har_bin["log"]["entries"][0]["request"]["postData"]["encoding"],
        "base64"
    );

    let full_json = get_json(&api(
        &agent,
        &format!("/api/exchanges/{text}/export?format=json"),
    ))
    .await?;
    assert_eq!(full_json["request_body"]["text"], r#"{"a":"it's"}"#);
    Ok(())
}

#[tokio::test]
async fn history_survives_agent_restarts_and_keeps_to_its_limits() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let dir = relay.dir.path().join("persist");
    let mut config = relay.agent_config_in(&dir, Some("persist"), &app.target());
    config.retention.max_exchanges = 3;
    let agent = Agent::spawn(config.clone()).await?;
    tokio::time::timeout(WAIT, agent.connected()).await??;
    for i in 0..5 {
        post(&relay.url("persist", &format!("/n/{i}")), "{}").await?;
    }
    recorded(&agent, 3).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(agent.history().len(), 3);
    agent.shutdown().await?;

    let agent = Agent::spawn(config).await?;
    let page = agent.history().list(&Default::default(), None, 10)?;
    let paths: Vec<&str> = page.exchanges.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        ["/n/4", "/n/3", "/n/2"],
        "the newest three survive the restart"
    );
    assert!(page.exchanges.iter().all(|e| e.outcome == Outcome::Ok));
    Ok(())
}

/// Bytes covering every value, in an order no compressor or chunker flatters.
fn noise(len: usize) -> Vec<u8> {
    let mut state: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect()
}

#[tokio::test]
async fn binary_bodies_at_the_size_limit_are_recorded_whole() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = inspected_agent(&relay, "big", &app.target()).await?;
    // The relay's default limit is 25 MiB: the largest body it accepts.
    let body = noise(25 * 1024 * 1024);
    let req = Request::post(relay.url("big", "/echo/blob"))
        .header("content-type", "application/octet-stream")
        .body(full(body.clone()))?;
    let (status, _, echoed) = send(req).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(echoed == body, "the app echoed the body back whole");
    recorded(&agent, 1).await?;

    let page = agent
        .history()
        .list(&Default::default(), None, 10)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let e = &page.exchanges[0];
    assert_eq!(e.request.body_len, body.len() as u64);
    let h = agent.history();
    let stored = h
        .body(e.id, relay_client::history::Part::Request)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(
        stored == body,
        "request body stored byte for byte, not truncated"
    );
    let stored = h
        .body(e.id, relay_client::history::Part::Response)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(stored == body, "response body stored byte for byte");

    // The API serves it back exactly too (base64, no text view for binary).
    let detail = get_json(&api(&agent, &format!("/api/exchanges/{}", e.id))).await?;
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(detail["request_body"]["base64"].as_str().unwrap_or(""))?;
    assert!(decoded == body);
    assert!(detail["request_body"]["text"].is_null());
    Ok(())
}

/// Runs an exported curl command with `sh`, as a user would paste it.
async fn run_shell(script: &str) -> anyhow::Result<()> {
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{script} --silent --show-error --output /dev/null"))
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    anyhow::ensure!(
        out.status.success(),
        "the exported command failed: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Headers as the app saw them, minus those the relay adds on every hop.
fn sender_headers(r: &Received) -> Vec<(String, Vec<u8>)> {
    let mut h: Vec<(String, Vec<u8>)> = r
        .headers
        .iter()
        .filter(|(n, _)| {
            !n.starts_with("x-forwarded-") && !n.starts_with("x-hookrelay-") && n != "forwarded"
        })
        .cloned()
        .collect();
    h.sort();
    h
}

#[tokio::test]
async fn exported_curl_reproduces_the_request_byte_for_byte() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = inspected_agent(&relay, "curl", &app.target()).await?;
    // A text body with shell metacharacters, and a binary body with no
    // content-type (curl would add one of its own if not told otherwise).
    send(
        Request::post(relay.url("curl", "/hook?a=1&b=%20x"))
            .header("content-type", "application/json")
            .header("x-quote", "it's $HOME `id` \"q\" \\n")
            .header("x-multi", "1")
            .header("x-multi", "2")
            .body(full("{\"text\":\"it's $HOME\\n `id`\"}\n"))?,
    )
    .await?;
    send(Request::put(relay.url("curl", "/bin")).body(full(noise(4096)))?).await?;
    recorded(&agent, 2).await?;
    let originals = app.received();
    assert_eq!(originals.len(), 2);

    let all = get_json(&api(&agent, "/api/exchanges")).await?;
    for (i, original) in originals.iter().enumerate() {
        // Newest first in the list.
        let id = all["exchanges"][1 - i]["id"].as_str().unwrap_or_default();
        let (status, _, script) = send(
            Request::get(api(
                &agent,
                &format!("/api/exchanges/{id}/export?format=curl"),
            ))
            .body(full(""))?,
        )
        .await?;
        assert_eq!(status, StatusCode::OK);
        run_shell(&String::from_utf8(script.to_vec())?).await?;
        let again = app
            .received()
            .get(2 + i)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("the curl command did not reach the app"))?;
        assert_eq!(again.method, original.method);
        assert_eq!(again.uri, original.uri);
        assert!(again.body == original.body, "body differs");
        assert_eq!(sender_headers(&again), sender_headers(original));
    }
    Ok(())
}

/// Checks the fields HAR 1.2 requires (http://www.softwareishard.com/blog/har-12-spec/).
fn assert_valid_har(har: &Value) {
    fn has(v: &Value, path: &str, check: fn(&Value) -> bool) {
        let mut cur = v;
        for key in path.split('.') {
            cur = &cur[key];
        }
        assert!(check(cur), "HAR: {path} is missing or mistyped: {cur}");
    }
    let s = |v: &Value| v.is_string();
    let n = |v: &Value| v.is_number();
    let a = |v: &Value| v.is_array();
    let o = |v: &Value| v.is_object();
    has(har, "log.version", |v| v == "1.2");
    has(har, "log.creator.name", s);
    has(har, "log.creator.version", s);
    has(har, "log.entries", a);
    for entry in har["log"]["entries"].as_array().into_iter().flatten() {
        has(entry, "startedDateTime", s);
        has(entry, "time", n);
        for key in [
            "request.method",
            "request.url",
            "request.httpVersion",
            "response.statusText",
            "response.httpVersion",
            "response.redirectURL",
            "response.content.mimeType",
        ] {
            has(entry, key, s);
        }
        for key in [
            "request.headersSize",
            "request.bodySize",
            "response.status",
            "response.headersSize",
            "response.bodySize",
            "response.content.size",
            "timings.send",
            "timings.wait",
            "timings.receive",
        ] {
            has(entry, key, n);
        }
        for key in [
            "request.cookies",
            "request.headers",
            "request.queryString",
            "response.cookies",
            "response.headers",
        ] {
            has(entry, key, a);
        }
        has(entry, "cache", o);
        for h in entry["request"]["headers"].as_array().into_iter().flatten() {
            has(h, "name", s);
            has(h, "value", s);
        }
        if !entry["request"]["postData"].is_null() {
            has(entry, "request.postData.mimeType", s);
            has(entry, "request.postData.text", s);
        }
        let started = entry["startedDateTime"].as_str().unwrap_or_default();
        assert!(
            started.len() >= 20 && started.as_bytes()[10] == b'T',
            "ISO 8601: {started}"
        );
    }
}

#[tokio::test]
async fn har_export_is_valid_har_1_2_for_every_kind_of_exchange() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = inspected_agent(&relay, "har", &app.target()).await?;
    post(&relay.url("har", "/echo/json?x=1"), r#"{"a":1}"#).await?;
    send(Request::post(relay.url("har", "/echo/bin")).body(full(noise(64)))?).await?;
    send(Request::get(relay.url("har", "/status/404")).body(full(""))?).await?;
    recorded(&agent, 3).await?;
    let all = get_json(&api(&agent, "/api/exchanges")).await?;
    for e in all["exchanges"].as_array().into_iter().flatten() {
        let id = e["id"].as_str().unwrap_or_default();
        let har = get_json(&api(
            &agent,
            &format!("/api/exchanges/{id}/export?format=har"),
        ))
        .await?;
        assert_valid_har(&har);
    }
    Ok(())
}

#[tokio::test]
async fn a_dead_app_still_gets_the_whole_request_recorded_and_replayable() -> anyhow::Result<()> {
    let relay = TestRelay::spawn().await?;
    let dead = format!("http://127.0.0.1:{}", dead_port().await?);
    // Secrets configured, so an unsigned request is flagged as such.
    let agent = inspected_agent(&relay, "down", &dead).await?;
    let body = noise(300 * 1024);
    let req = Request::post(relay.url("down", "/hook"))
        .header("content-type", "application/octet-stream")
        .body(full(body.clone()))?;
    let (status, _, _) = send(req).await?;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    recorded(&agent, 1).await?;
    let page = get_json(&api(&agent, "/api/exchanges")).await?;
    let e = &page["exchanges"][0];
    assert_eq!(e["outcome"], "local_app_unreachable");
    assert_eq!(e["request"]["body_len"], body.len(), "{e}");
    assert_eq!(e["signature"]["verdict"], "unsigned");
    let id: relay_client::history::ExchangeId = e["id"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let stored = agent
        .history()
        .body(id, relay_client::history::Part::Request)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(
        stored == body,
        "the body the app never read is in the history"
    );

    // Once the app is back, replaying the failure delivers that whole body,
    // marked as a replay and without the relay's delivery id.
    let app = TestApp::spawn().await?;
    let (status, replay) = post_json(
        &api(&agent, &format!("/api/exchanges/{id}/replay")),
        json!({ "to": app.target() }),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{replay}");
    let got = app.received();
    assert!(got[0].body == body);
    assert_eq!(
        got[0].header("x-hookrelay-replay-of"),
        [id.to_string().as_bytes()]
    );
    assert!(got[0].header("x-hookrelay-delivery-id").is_empty());
    Ok(())
}

#[tokio::test]
async fn retention_evictions_reach_the_live_feed() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let mut config = relay.agent_config(Some("evict"), &app.target());
    config.inspect = Some("127.0.0.1:0".parse()?);
    config.retention.max_exchanges = 2;
    let agent = connected_agent(config).await?;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(api(&agent, "/api/live").replace("http", "ws")).await?;
    assert_eq!(next(&mut ws).await?["type"], "status");
    let mut ids = Vec::new();
    let mut deleted = Vec::new();
    for i in 0..3 {
        post(&relay.url("evict", &format!("/{i}")), "{}").await?;
        let mut event = next(&mut ws).await?;
        if event["type"] == "deleted" {
            deleted.push(event["id"].clone());
            event = next(&mut ws).await?;
        }
        assert_eq!(event["type"], "exchange", "{event}");
        ids.push(event["exchange"]["id"].clone());
    }
    assert_eq!(
        deleted,
        [ids[0].clone()],
        "the oldest went, and the feed said so"
    );
    assert_eq!(agent.history().len(), 2);
    Ok(())
}

#[tokio::test]
async fn every_api_error_is_json_with_a_code() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = inspected_agent(&relay, "errors", &app.target()).await?;
    let cases: Vec<(Request<TestBody>, StatusCode, &str)> = vec![
        (
            Request::get(api(&agent, "/api/exchanges?bogus=1")).body(full(""))?,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Request::get(api(&agent, "/api/exchanges?since=yesterday")).body(full(""))?,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Request::put(api(&agent, "/api/exchanges")).body(full(""))?,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            Request::get(api(&agent, "/api/exchanges/NOTANID")).body(full(""))?,
            StatusCode::BAD_REQUEST,
            "bad_id",
        ),
        (
            Request::get(api(
                &agent,
                "/api/exchanges/01JD0000000000000000000000/export",
            ))
            .body(full(""))?,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Request::post(api(&agent, "/api/replay"))
                .header("content-type", "application/json")
                .body(full("{not json"))?,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Request::post(api(&agent, "/api/replay"))
                .header("content-type", "application/json")
                .body(full(r#"{"filter":{}}"#))?,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Request::post(api(&agent, "/api/replay"))
                .header("content-type", "application/json")
                .body(full(r#"{"idz":[]}"#))?,
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_request",
        ),
        (
            Request::post(api(&agent, "/")).body(full(""))?,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            Request::get(api(&agent, "/nothing-here")).body(full(""))?,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ];
    for (req, want, code) in cases {
        let what = format!("{} {}", req.method(), req.uri());
        let (status, headers, body) = send(req).await?;
        assert_eq!(status, want, "{what}: {}", String::from_utf8_lossy(&body));
        assert!(
            headers
                .get("content-type")
                .is_some_and(|v| v.as_bytes().starts_with(b"application/json")),
            "{what}"
        );
        let json: Value = serde_json::from_slice(&body)?;
        assert_eq!(json["error"], code, "{what}: {json}");
        assert!(
            json["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {json}"
        );
    }
    // Bulk replay filters take the same time forms as the list.
    let (status, body) = post_json(
        &api(&agent, "/api/replay"),
        json!({ "filter": { "status": "failed", "since": "2h" } }),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"], json!([]));
    Ok(())
}

#[tokio::test]
async fn an_edited_replay_can_carry_a_large_body() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = inspected_agent(&relay, "bigedit", &app.target()).await?;
    post(&relay.url("bigedit", "/x"), "{}").await?;
    recorded(&agent, 1).await?;
    let id = get_json(&api(&agent, "/api/exchanges")).await?["exchanges"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    use base64::Engine as _;
    let body = noise(8 * 1024 * 1024);
    let (status, replay) = post_json(
        &api(&agent, &format!("/api/exchanges/{id}/replay")),
        json!({ "body_base64": base64::engine::general_purpose::STANDARD.encode(&body) }),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{replay}");
    assert!(app.received()[1].body == body);
    Ok(())
}

#[tokio::test]
async fn exports_redact_credentials_unless_asked() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = inspected_agent(&relay, "redact", &app.target()).await?;
    send(
        Request::post(relay.url("redact", "/hook"))
            .header("authorization", "Bearer s3cr3t-token")
            .header("x-gitlab-token", "gl-s3cr3t")
            .header("x-other", "visible")
            .body(full("{}"))?,
    )
    .await?;
    recorded(&agent, 1).await?;
    let id = get_json(&api(&agent, "/api/exchanges")).await?["exchanges"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    for format in ["curl", "har", "json"] {
        let export = |secrets: &str| {
            Request::get(api(
                &agent,
                &format!("/api/exchanges/{id}/export?format={format}{secrets}"),
            ))
            .body(full(""))
        };
        let (status, _, body) = send(export("")?).await?;
        assert_eq!(status, StatusCode::OK);
        let text = String::from_utf8_lossy(&body);
        assert!(
            !text.contains("s3cr3t") && text.contains("[redacted]") && text.contains("visible"),
            "{format}: {text}"
        );
        let (_, _, body) = send(export("&secrets=true")?).await?;
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.contains("Bearer s3cr3t-token") && text.contains("gl-s3cr3t"),
            "{format} with secrets: {text}"
        );
    }
    Ok(())
}

/// An app whose answer breaks off after its head (it promised 100 bytes and
/// closed): the sender never gets a complete-looking answer, and the history
/// records a local app error, not a delivered exchange.
#[tokio::test]
async fn an_answer_that_breaks_off_is_recorded_as_an_app_error() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let target = format!("http://{}", listener.local_addr()?);
    let app = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await?;
        read_head(&mut conn).await?;
        conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
            .await?;
        anyhow::Ok(())
    });
    let relay = TestRelay::spawn().await?;
    let agent = inspected_agent(&relay, "cut", &target).await?;
    // An error (the connection cut) is what a broken answer should look like.
    if let Ok((status, _, body)) = post(&relay.url("cut", "/hook"), "").await {
        assert!(
            status != StatusCode::OK || body.len() < 100,
            "a cut answer looked whole: {status} {} bytes",
            body.len()
        );
    }
    tokio::time::timeout(WAIT, app).await???;
    recorded(&agent, 1).await?;
    let page = get_json(&api(&agent, "/api/exchanges")).await?;
    let e = &page["exchanges"][0];
    assert_eq!(e["outcome"], "local_app_error", "{e}");
    Ok(())
}
