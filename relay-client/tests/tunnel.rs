//! The data path: a webhook sent to the public URL reaches the local app exactly,
//! and the app's answer (or a precise error) reaches the sender.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

#[tokio::test]
async fn webhook_reaches_local_app_exactly() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let _agent = relay.agent("exact", &app.target()).await?;

    let url = relay.url("exact", "/hooks/github?a=1&b=%20x&a=2");
    let body: &'static [u8] = b"payload=%7B%22a%22%3A1%7D&raw=\x00\xff\xfe end";
    let req = Request::post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-multi", "1")
        .header("x-github-event", "push")
        .header("x-multi", "2")
        .header("x-bin", HeaderValue::from_bytes(b"caf\xe9 \x80\xff")?)
        .header("connection", "keep-alive, x-private")
        .header("x-private", "hop-by-hop by declaration")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-forwarded-for", "203.0.113.1")
        .body(full(body))?;
    let (status, headers, resp_body) = send(req).await?;

    assert_eq!(status, StatusCode::OK);
    assert_eq!(&resp_body[..], br#"{"ok":true}"#);
    assert_eq!(
        headers.get("x-app").map(|v| v.as_bytes()),
        Some(&b"yes"[..])
    );
    let cookies: Vec<&[u8]> = headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    assert_eq!(
        cookies,
        [&b"a=1"[..], b"b=2"],
        "repeated response headers keep their order"
    );
    assert!(headers.contains_key("x-hookrelay-delivery-id"));

    let got = app.received();
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.uri, "/hooks/github?a=1&b=%20x&a=2");
    assert_eq!(&r.body[..], body, "body bytes are identical");
    assert_eq!(
        r.header("content-length"),
        [body.len().to_string().as_bytes()]
    );
    assert_eq!(
        r.header("content-type"),
        [&b"application/x-www-form-urlencoded"[..]]
    );
    assert_eq!(
        r.header("x-multi"),
        [&b"1"[..], b"2"],
        "repeated headers keep their order"
    );
    assert_eq!(
        r.header("x-bin"),
        [&b"caf\xe9 \x80\xff"[..]],
        "header values are kept as bytes"
    );
    for hop in [
        "connection",
        "x-private",
        "keep-alive",
        "proxy-authorization",
        "transfer-encoding",
    ] {
        assert!(
            r.header(hop).is_empty(),
            "hop-by-hop header {hop} must not reach the app"
        );
    }
    assert_eq!(
        r.header("x-forwarded-for"),
        [&b"203.0.113.1, 127.0.0.1"[..]]
    );
    assert_eq!(r.header("x-forwarded-proto"), [&b"http"[..]]);
    let host = relay.http_addr().to_string();
    assert_eq!(r.header("x-forwarded-host"), [host.as_bytes()]);
    assert_eq!(
        r.header("host"),
        [host.as_bytes()],
        "the sender's Host is passed through"
    );
    assert_eq!(r.header("x-hookrelay-original-url"), [url.as_bytes()]);
    Ok(())
}

/// An HTTP/2 sender names the host in `:authority`, with no `Host` header;
/// the app, which gets HTTP/1.1, sees it as `Host` (RFC 9113, 8.3.1), not
/// the agent's target.
#[tokio::test]
async fn an_http2_senders_authority_reaches_the_app_as_host() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let _agent = relay.agent("h2host", &app.target()).await?;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<TestBody>();
    let req = Request::post(relay.url("h2host", "/h2"))
        .version(http::Version::HTTP_2)
        .body(full("{}"))?;
    let resp = tokio::time::timeout(WAIT, h2.request(req)).await??;
    assert_eq!(resp.status(), StatusCode::OK);
    let r = app
        .received()
        .pop()
        .ok_or_else(|| anyhow::anyhow!("the app got nothing"))?;
    let host = relay.http_addr().to_string();
    assert_eq!(r.header("host"), [host.as_bytes()]);
    assert_eq!(r.header("x-forwarded-host"), [host.as_bytes()]);
    Ok(())
}

#[tokio::test]
async fn every_method_arrives_and_bodiless_requests_stay_bodiless() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let _agent = relay.agent("methods", &app.target()).await?;
    for method in ["GET", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"] {
        let body = if method == "GET" {
            full(Bytes::new())
        } else {
            full(format!("{method} body"))
        };
        let req = Request::builder()
            .method(method)
            .uri(relay.url("methods", "/m"))
            .body(body)?;
        let (status, _, _) = send(req).await?;
        assert_eq!(status, StatusCode::OK, "{method}");
    }
    let got = app.received();
    let methods: Vec<&str> = got.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(
        methods,
        ["GET", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"]
    );
    let get = &got[0];
    assert!(get.body.is_empty());
    assert!(
        get.header("transfer-encoding").is_empty(),
        "a GET must not gain a chunked body"
    );
    assert_eq!(&got[1].body[..], b"PUT body");
    Ok(())
}

#[tokio::test]
async fn target_base_path_prefixes_every_path_and_tunnel_root_maps_to_slash() -> anyhow::Result<()>
{
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let _agent = relay
        .agent("based", &format!("{}/api/base", app.target()))
        .await?;
    post(&relay.url("based", "/stripe"), "{}").await?;
    post(&relay.url("based", ""), "{}").await?;
    post(&format!("{}?q=1", relay.url("based", "")), "{}").await?;
    let uris: Vec<String> = app.received().into_iter().map(|r| r.uri).collect();
    assert_eq!(uris, ["/api/base/stripe", "/api/base/", "/api/base/?q=1"]);
    Ok(())
}

#[tokio::test]
async fn app_status_and_body_come_back_unchanged() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let _agent = relay.agent("status", &app.target()).await?;
    for code in [201u16, 204, 302, 410, 422, 500, 503] {
        let (status, headers, body) =
            post(&relay.url("status", &format!("/status/{code}")), "x").await?;
        assert_eq!(status.as_u16(), code);
        assert_eq!(
            headers.get("x-app").map(|v| v.as_bytes()),
            Some(&b"status"[..])
        );
        if code != 204 {
            assert_eq!(body, format!("status {code}"));
        }
    }
    Ok(())
}

#[tokio::test]
async fn large_bodies_stream_both_ways() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let _agent = relay.agent("large", &app.target()).await?;
    // 25 MiB, the default limit, of non-repeating bytes.
    let len = 25 * 1024 * 1024;
    let mut body = Vec::with_capacity(len);
    let mut x: u32 = 0x1234_5678;
    while body.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        body.extend_from_slice(&x.to_le_bytes());
    }
    body.truncate(len);
    let digest = Sha256::digest(&body);
    let req = Request::post(relay.url("large", "/echo"))
        .header("content-type", "application/octet-stream")
        .body(full(body))?;
    let (status, headers, echoed) = send(req).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echoed.len(), len);
    assert_eq!(
        Sha256::digest(&echoed),
        digest,
        "response body is byte-identical"
    );
    assert_eq!(
        headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/octet-stream"[..])
    );
    let got = app.received();
    assert_eq!(
        Sha256::digest(&got[0].body),
        digest,
        "request body is byte-identical"
    );
    assert_eq!(
        got[0].header("content-length"),
        [len.to_string().as_bytes()]
    );
    Ok(())
}

/// Proves streaming rather than buffering: the app sees the first request chunk
/// while the sender still holds back the rest, and the sender sees the first
/// response chunk while the app still holds back the rest. A relay or agent that
/// buffered whole bodies would deadlock here and time out.
#[tokio::test]
async fn bodies_are_streamed_not_buffered() -> anyhow::Result<()> {
    use axum::{body::Body, extract::Request as AxumRequest};
    use tokio::sync::{mpsc, oneshot};

    let (first_in_tx, first_in_rx) = oneshot::channel::<usize>();
    let (release_out_tx, release_out_rx) = oneshot::channel::<()>();
    let slots = std::sync::Arc::new(std::sync::Mutex::new(Some((first_in_tx, release_out_rx))));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let app_addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(move |req: AxumRequest| {
        let slots = slots.clone();
        async move {
            let Some((first_in, release_out)) = slots.lock().expect("lock").take() else {
                return axum::response::Response::new(Body::from("again"));
            };
            let mut body = req.into_body();
            let first = body
                .frame()
                .await
                .and_then(|f| f.ok())
                .and_then(|f| f.into_data().ok());
            let _ = first_in.send(first.map(|b| b.len()).unwrap_or(0));
            let mut total = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                total += frame.into_data().map(|d| d.len()).unwrap_or(0);
            }
            let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(2);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Bytes::from_static(b"first-chunk;"))).await;
                let _ = release_out.await;
                let _ = tx.send(Ok(Bytes::from(format!("rest:{total}")))).await;
            });
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| (b, rx))
            });
            axum::response::Response::new(Body::from_stream(stream))
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let relay = TestRelay::spawn().await?;
    let _agent = relay.agent("stream", &format!("http://{app_addr}")).await?;

    let (chunks, body) = channel_body();
    let req = Request::post(relay.url("stream", "/s")).body(body)?;
    let response = tokio::spawn(async move { client().request(req).await });
    chunks.send(Bytes::from(vec![b'a'; 64 * 1024])).await?;
    let first = tokio::time::timeout(WAIT, first_in_rx).await??;
    assert!(
        first > 0,
        "the app got the first chunk before the sender finished"
    );
    chunks.send(Bytes::from(vec![b'b'; 1024 * 1024])).await?;
    drop(chunks);

    let resp = tokio::time::timeout(WAIT, response).await???;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first_out = tokio::time::timeout(WAIT, body.frame()).await?;
    let first_out = first_out.context_data()?;
    assert!(
        first_out.starts_with(b"first-chunk;"),
        "sender got the first response chunk early"
    );
    release_out_tx
        .send(())
        .map_err(|_| anyhow::anyhow!("app gone"))?;
    let rest = tokio::time::timeout(WAIT, body.collect())
        .await??
        .to_bytes();
    let all = [first_out.as_ref(), rest.as_ref()].concat();
    assert_eq!(
        all,
        format!("first-chunk;rest:{}", 1024 * 1024 + 64 * 1024 - first).into_bytes()
    );
    Ok(())
}

trait FrameData {
    fn context_data(self) -> anyhow::Result<Bytes>;
}

impl<E: std::fmt::Debug> FrameData for Option<Result<hyper::body::Frame<Bytes>, E>> {
    fn context_data(self) -> anyhow::Result<Bytes> {
        self.ok_or_else(|| anyhow::anyhow!("body ended"))?
            .map_err(|e| anyhow::anyhow!("body error: {e:?}"))?
            .into_data()
            .map_err(|_| anyhow::anyhow!("not a data frame"))
    }
}

#[tokio::test]
async fn hundred_concurrent_deliveries_share_one_connection() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let _agent = relay.agent("busy", &app.target()).await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let url = relay.url("busy", &format!("/concurrent/{i}"));
        tasks.push(tokio::spawn(async move {
            let req = Request::post(url).body(full(format!("delivery {i}")))?;
            send(req).await
        }));
    }
    for t in tasks {
        let (status, _, _) = t.await??;
        assert_eq!(status, StatusCode::OK);
    }
    // Each takes 200 ms at the app; one at a time would need 20 s.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "deliveries ran one by one: {:?}",
        started.elapsed()
    );
    let mut bodies: Vec<String> = app
        .received()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    bodies.sort();
    bodies.dedup();
    assert_eq!(bodies.len(), 100, "every delivery arrived exactly once");
    Ok(())
}

#[tokio::test]
async fn unknown_tunnel_and_unrouted_paths_are_404_with_a_code() -> anyhow::Result<()> {
    let relay = TestRelay::spawn().await?;
    let (status, _, body) = post(&relay.url("nobody", "/x"), "{}").await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "unknown_tunnel");
    let json: serde_json::Value = serde_json::from_slice(&body)?;
    assert!(json["message"]
        .as_str()
        .is_some_and(|m| m.contains("nobody")));
    assert!(json["delivery_id"].as_str().is_some_and(|d| d.len() == 26));

    let (status, _, body) = post(&format!("http://{}/github", relay.http_addr()), "{}").await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "not_found");
    let (status, _, body) = post(&relay.url("Bad_Name", "/x"), "{}").await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "unknown_tunnel");
    Ok(())
}

#[tokio::test]
async fn offline_agent_is_503_with_retry_after_when_it_rejects_while_offline() -> anyhow::Result<()>
{
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let mut config = relay.agent_config(Some("sleepy"), &app.target());
    config.settings.when_offline = hookrelay_shared::WhenOffline::Reject;
    let agent = connected_agent(config).await?;
    assert_eq!(
        post(&relay.url("sleepy", "/x"), "{}").await?.0,
        StatusCode::OK
    );
    agent.shutdown().await?;
    let (status, headers, body) = post(&relay.url("sleepy", "/x"), "{}").await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(&body), "agent_offline");
    assert_eq!(
        headers.get("retry-after").map(|v| v.as_bytes()),
        Some(&b"10"[..])
    );
    Ok(())
}

#[tokio::test]
async fn dead_local_app_is_502() -> anyhow::Result<()> {
    let relay = TestRelay::spawn().await?;
    let port = dead_port().await?;
    let _agent = relay.agent("dead", &port.to_string()).await?;
    let (status, _, body) = post(&relay.url("dead", "/x"), "{}").await?;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(error_code(&body), "local_app_unreachable");
    let json: serde_json::Value = serde_json::from_slice(&body)?;
    assert!(
        json["message"]
            .as_str()
            .is_some_and(|m| m.contains(&port.to_string())),
        "{json}"
    );
    Ok(())
}

#[tokio::test]
async fn slow_local_app_is_504_after_the_configured_timeout() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn_with(|c| c.timeout = Duration::from_secs(1)).await?;
    let _agent = relay.agent("slow", &app.target()).await?;
    let started = Instant::now();
    let (status, _, body) = post(&relay.url("slow", "/slow"), "{}").await?;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(error_code(&body), "local_app_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered before the app did"
    );
    // The tunnel still works afterwards.
    assert_eq!(
        post(&relay.url("slow", "/fine"), "{}").await?.0,
        StatusCode::OK
    );
    Ok(())
}

/// An agent takes `max_deliveries` at once; the relay holds the rest until
/// one ends, but no longer than the time it gives the app's answer: with one
/// at a time and an app slower than the 1 s timeout, six webhooks at once
/// are all answered `504` within the first one's deadline (3 s: the timeout
/// and the agent's grace), the later ones without ever reaching the agent.
#[tokio::test]
async fn deliveries_past_the_agents_max_wait_at_the_relay_within_the_timeout() -> anyhow::Result<()>
{
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn_with(|c| c.timeout = Duration::from_secs(1)).await?;
    let mut config = relay.agent_config(Some("one"), &app.target());
    config.max_deliveries = 1;
    let _agent = connected_agent(config).await?;
    let started = Instant::now();
    let url = relay.url("one", "/slow");
    let answers = futures_util::future::join_all((0..6).map(|_| post(&url, "{}"))).await;
    let elapsed = started.elapsed();
    let mut waited = 0;
    for answer in answers {
        let (status, _, body) = answer?;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(error_code(&body), "local_app_timeout");
        if String::from_utf8_lossy(&body).contains("deliveries in flight") {
            waited += 1;
        }
    }
    // One at a time, each cut at about 1 s by the agent: three or four reach
    // the app before the 3 s deadline of those still waiting (fewer on a
    // loaded machine). Before, none waited out its deadline: the sixth got
    // to the app after five seconds.
    assert!((1..=4).contains(&waited), "{waited} timed out waiting");
    assert_eq!(
        app.received().len(),
        6 - waited,
        "the others reached the app"
    );
    assert!(
        elapsed < Duration::from_secs(15),
        "took {elapsed:?}: waiting is bounded by the timeout"
    );
    Ok(())
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_declared_or_streamed() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn_with(|c| c.body_limit_bytes = 1024 * 1024).await?;
    let _agent = relay.agent("limited", &app.target()).await?;

    // Declared length over the limit: refused before anything is forwarded.
    let req =
        Request::post(relay.url("limited", "/declared")).body(full(vec![b'x'; 1024 * 1024 + 1]))?;
    let (status, _, body) = send(req).await?;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(&body), "body_too_large");

    // Chunked, no declared length: cut off once the limit is crossed.
    let (chunks, body) = channel_body();
    let req = Request::post(relay.url("limited", "/chunked")).body(body)?;
    let response = tokio::spawn(async move { send(req).await });
    for _ in 0..20 {
        if chunks
            .send(Bytes::from(vec![b'y'; 128 * 1024]))
            .await
            .is_err()
        {
            break;
        }
    }
    drop(chunks);
    let (status, _, body) = tokio::time::timeout(WAIT, response).await???;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(&body), "body_too_large");

    // Exactly at the limit passes.
    let req = Request::post(relay.url("limited", "/exact")).body(full(vec![b'z'; 1024 * 1024]))?;
    assert_eq!(send(req).await?.0, StatusCode::OK);
    let uris: Vec<String> = app.received().into_iter().map(|r| r.uri).collect();
    assert_eq!(
        uris,
        ["/exact"],
        "nothing over the limit was delivered complete"
    );
    Ok(())
}

#[tokio::test]
async fn subdomains_of_the_relay_domain_name_tunnels() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn_with(|c| c.domain = Some("relay.test".into())).await?;
    let agent = relay.agent("alice", &app.target()).await?;
    let port = relay.http_addr().port();
    assert_eq!(
        agent.public_urls(),
        [
            format!("http://relay.test:{port}/t/alice/"),
            format!("http://alice.relay.test:{port}/"),
        ]
    );
    let addr = relay.http_addr();
    for host in [
        format!("alice.relay.test:{port}"),
        "ALICE.Relay.Test.".to_string(),
    ] {
        let req = Request::post(format!("http://{addr}/hooks/stripe?x=1"))
            .header("host", &host)
            .body(full("{}"))?;
        let (status, _, body) = send(req).await?;
        assert_eq!(
            status,
            StatusCode::OK,
            "{host}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let req = Request::post(format!("http://{addr}/x"))
        .header("host", "bob.relay.test")
        .body(full("{}"))?;
    let (status, _, body) = send(req).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "unknown_tunnel");
    let got = app.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].uri, "/hooks/stripe?x=1");
    assert_eq!(
        got[0].header("x-hookrelay-original-url"),
        [format!("http://alice.relay.test:{port}/hooks/stripe?x=1").as_bytes()]
    );
    Ok(())
}

/// A compression bomb (SECURITY.md §3.3): 10 MiB of zeros gzipped to ~10 KiB.
/// Nothing on the way inflates it: the app gets the bytes as sent, with their
/// `Content-Encoding`, and the history keeps those ~10 KiB, not 10 MiB.
#[tokio::test]
async fn a_compressed_body_is_forwarded_and_kept_as_sent() -> anyhow::Result<()> {
    const BOMB: &[u8] = include_bytes!("data/zeros-10mib.gz");
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = relay.agent("gz", &app.target()).await?;
    let req = Request::post(relay.url("gz", "/bomb"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(full(BOMB))?;
    let (status, _, _) = send(req).await?;
    assert_eq!(status, StatusCode::OK);
    let got = app.received();
    let r = got
        .last()
        .ok_or_else(|| anyhow::anyhow!("the app got nothing"))?;
    assert_eq!(
        &r.body[..],
        BOMB,
        "the body arrives compressed, byte for byte"
    );
    assert_eq!(r.header("content-encoding"), [&b"gzip"[..]]);
    recorded(&agent, 1).await?;
    let page = agent.history().list(&Default::default(), None, 1)?;
    let e = page
        .exchanges
        .first()
        .ok_or_else(|| anyhow::anyhow!("not recorded"))?;
    let kept = agent
        .history()
        .body(e.id, relay_client::history::Part::Request)?;
    assert_eq!(kept, BOMB, "the history keeps what was sent");
    Ok(())
}
