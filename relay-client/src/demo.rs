//! `relay-client demo`: the whole path on loopback in one process — the real
//! relay library, the real agent, and a small sample app that answers webhooks.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use axum::{body::Bytes, extract::Request, response::IntoResponse, Json};
use http_body_util::{BodyExt, Full};
use serde_json::json;

use crate::{
    cli::{DemoArgs, FAST_MAX_BACKOFF},
    config::{parse_fingerprint, Config, Secret, Target, Trust},
    Agent,
};

/// The running demo: relay, agent and sample app.
pub struct Demo {
    /// The relay, in process.
    pub relay: relay_server::Relay,
    /// The agent, connected.
    pub agent: Agent,
    /// The sample app's address.
    pub app_addr: SocketAddr,
    /// The tunnel's public URL.
    pub public_url: String,
    _dir: tempfile::TempDir,
}

impl Demo {
    /// Starts the sample app, the relay and the agent, in that order.
    ///
    /// # Errors
    /// When a listener cannot be bound or a component fails to start.
    pub async fn spawn(args: &DemoArgs, print_deliveries: bool) -> anyhow::Result<Demo> {
        let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
        let app = bind_or_any(([127, 0, 0, 1], 0).into()).await?;
        let app_addr = app.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(app, axum::Router::new().fallback(sample_app)).await;
        });

        let mut relay_config = relay_server::Config::loopback(dir.path().join("relay"));
        relay_config.http = Some(free_or_any(args.http).await);
        let relay = relay_server::Relay::spawn(relay_config)
            .await
            .context("cannot start the relay")?;
        let token = relay
            .tokens()
            .create("demo", vec!["*".parse().context("pattern")?])
            .context("cannot create the demo token")?;
        let fingerprint = relay
            .cert_fingerprint()
            .context("the demo relay's self-signed certificate has a fingerprint")?;
        let fingerprint = parse_fingerprint(&fingerprint).map_err(anyhow::Error::msg)?;

        let agent = Agent::spawn(Config {
            relay: relay.quic_addr().to_string(),
            relay_ip: None,
            token: Secret::new(token),
            tunnel: Some("demo".parse().context("tunnel name")?),
            target: Target {
                authority: app_addr.to_string(),
                base_path: String::new(),
            },
            trust: Trust::Pinned(fingerprint),
            data_dir: dir.path().join("agent"),
            inspect: Some(free_or_any(args.inspect).await),
            print_deliveries,
            dedupe: true,
            log_format: crate::config::LogFormat::Text,
            max_backoff: FAST_MAX_BACKOFF,
            secrets: hookrelay_shared::signature::SecretSet::new(),
            redaction: Default::default(),
            retention: crate::history::Retention::default(),
            settings: Default::default(),
            retry: Default::default(),
            policy: Default::default(),
            max_deliveries: crate::config::DEFAULT_MAX_DELIVERIES,
        })
        .await
        .context("cannot start the agent")?;
        let public_url = tokio::time::timeout(Duration::from_secs(10), agent.connected())
            .await
            .context("the agent did not connect")??
            .into_iter()
            .next()
            .context("the relay granted no public URL")?;
        Ok(Demo {
            relay,
            agent,
            app_addr,
            public_url,
            _dir: dir,
        })
    }

    /// Stops the agent, then the relay.
    pub async fn shutdown(self) {
        let _ = self.agent.shutdown().await;
        self.relay.shutdown().await;
    }
}

/// Runs the demo until Ctrl-C.
///
/// # Errors
/// When it cannot start.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let demo = Demo::spawn(&args, true).await?;
    let url = &demo.public_url;
    let inspector = demo
        .agent
        .inspector_addr()
        .map(|a| format!("http://{a}"))
        .unwrap_or_else(|| "off".into());
    println!(
        "\nHookrelay demo: a relay, an agent and a sample app, all on this machine.\n\n  \
         public URL   {url}\n  local app    http://{}\n  inspector    {inspector}\n\n\
         Send it a webhook:\n  curl -X POST {url}github/events -H 'content-type: application/json' -d '{{\"action\":\"opened\"}}'\n\n\
         Every delivery shows up below. Press Ctrl-C to stop.\n",
        demo.app_addr
    );
    if !args.no_sample {
        if let Err(err) = send_sample(url).await {
            eprintln!("could not send the sample webhook: {err:#}");
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    println!("\nstopping");
    demo.shutdown().await;
    Ok(())
}

async fn send_sample(url: &str) -> anyhow::Result<()> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let body = r#"{"zen":"Keep it logically awesome.","hook_id":1}"#;
    let req = http::Request::post(format!("{url}github/events"))
        .header("content-type", "application/json")
        .header("x-github-event", "ping")
        .body(Full::new(Bytes::from_static(body.as_bytes())))?;
    let resp = client.request(req).await?;
    let _ = resp.into_body().collect().await;
    Ok(())
}

/// The sample app: acknowledges every webhook with a small JSON summary.
async fn sample_app(req: Request) -> impl IntoResponse {
    let method = req.method().to_string();
    let path = req.uri().to_string();
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    Json(
        json!({ "ok": true, "app": "hookrelay demo", "method": method, "path": path, "received_bytes": bytes }),
    )
}

/// `addr` when it is free, else any free port on the same IP (the demo should
/// start even when 8080 or 4040 is taken).
async fn free_or_any(addr: SocketAddr) -> SocketAddr {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(_) => addr,
        Err(_) => {
            eprintln!("{addr} is in use; picking a free port instead");
            SocketAddr::new(addr.ip(), 0)
        }
    }
}

async fn bind_or_any(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}
