//! `relay-server queue list|show|purge`: through the running relay's admin
//! listener when it serves this data directory, straight from the store when
//! the relay is stopped (sled allows one process at a time).

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use relay_server::{
    admin::{entry, summary, QueueEntry, QueueSummary},
    cli::QueueCommand,
    queue::{Queue, SledQueue},
    Config,
};
use serde::Deserialize;

/// How long to wait for the admin listener.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(config: &Config, command: &QueueCommand) -> anyhow::Result<()> {
    let source = Source::find(config).await?;
    match command {
        QueueCommand::List { json } => {
            let list = source.list().await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                eprintln!("no webhooks queued");
            } else {
                println!(
                    "{:<32} {:>8} {:>12} {:>12} ONLINE",
                    "TUNNEL", "QUEUED", "BYTES", "OLDEST"
                );
                for s in list {
                    println!(
                        "{:<32} {:>8} {:>12} {:>12} {}",
                        s.tunnel,
                        s.count,
                        s.bytes,
                        s.oldest_age_secs.map(age).unwrap_or_else(|| "-".into()),
                        if s.online { "yes" } else { "no" }
                    );
                }
            }
        }
        QueueCommand::Show {
            tunnel,
            limit,
            json,
        } => {
            let shown = source.show(tunnel.as_str(), *limit).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&shown)?);
            } else {
                let s = &shown.summary;
                println!(
                    "tunnel {}: {} queued, {} bytes, oldest {}, agent {}",
                    s.tunnel,
                    s.count,
                    s.bytes,
                    s.oldest_age_secs
                        .map(|a| format!("{} ago", age(a)))
                        .unwrap_or_else(|| "-".into()),
                    if s.online { "online" } else { "offline" }
                );
                if !shown.entries.is_empty() {
                    println!(
                        "{:<26} {:>10} {:<7} {:>9}  PATH",
                        "DELIVERY", "AGE", "METHOD", "BYTES"
                    );
                }
                let now = relay_server::now_ms();
                for e in &shown.entries {
                    println!(
                        "{:<26} {:>10} {:<7} {:>9}  {}",
                        e.delivery_id,
                        age(now.saturating_sub(e.received_at_ms) / 1000),
                        e.method,
                        e.body_len,
                        e.path
                    );
                }
                if (shown.entries.len() as u64) < s.count {
                    eprintln!(
                        "({} of {} shown; --limit N for more)",
                        shown.entries.len(),
                        s.count
                    );
                }
            }
        }
        QueueCommand::Purge { tunnel } => {
            let purged = source.purge(tunnel.as_str()).await?;
            eprintln!("purged {purged} queued webhook(s) of tunnel {tunnel}");
        }
    }
    Ok(())
}

/// `show`'s answer.
#[derive(Debug, serde::Serialize, Deserialize)]
struct Shown {
    summary: QueueSummary,
    entries: Vec<QueueEntry>,
}

#[derive(Deserialize)]
struct Purged {
    purged: u64,
}

#[derive(Deserialize)]
struct Health {
    data_dir: Option<String>,
}

enum Source {
    Admin(SocketAddr),
    Direct(SledQueue),
}

impl Source {
    /// The running relay of this data directory, or the store itself.
    async fn find(config: &Config) -> anyhow::Result<Source> {
        if let Ok(health) = get::<Health>(config.admin, "/healthz").await {
            let ours = health
                .data_dir
                .is_some_and(|d| same_dir(Path::new(&d), &config.data_dir));
            if ours {
                return Ok(Source::Admin(config.admin));
            }
        }
        if !config.data_dir.join("queue").exists() {
            bail!(
                "no queue in {} (is --data-dir right? a relay creates it at its first start)",
                config.data_dir.display()
            );
        }
        let queue = SledQueue::open(&config.data_dir, config.queue_limits).with_context(|| {
            format!(
                "the relay using {} is running but its admin listener is not at {}; pass --admin ADDR",
                config.data_dir.display(),
                config.admin
            )
        })?;
        Ok(Source::Direct(queue))
    }

    async fn list(&self) -> anyhow::Result<Vec<QueueSummary>> {
        match self {
            Source::Admin(addr) => get(*addr, "/api/queue").await,
            Source::Direct(q) => Ok(q.all_stats().iter().map(|s| summary(s, false)).collect()),
        }
    }

    async fn show(&self, tunnel: &str, limit: usize) -> anyhow::Result<Shown> {
        match self {
            Source::Admin(addr) => get(*addr, &format!("/api/queue/{tunnel}?limit={limit}")).await,
            Source::Direct(q) => {
                let name = tunnel.parse().context("tunnel name")?;
                let items = q.after(&name, None, limit)?;
                Ok(Shown {
                    summary: summary(&q.stats(&name), false),
                    entries: items.iter().map(entry).collect(),
                })
            }
        }
    }

    async fn purge(&self, tunnel: &str) -> anyhow::Result<u64> {
        match self {
            Source::Admin(addr) => {
                Ok(
                    request::<Purged>(*addr, http::Method::DELETE, &format!("/api/queue/{tunnel}"))
                        .await?
                        .purged,
                )
            }
            Source::Direct(q) => {
                let name = tunnel.parse().context("tunnel name")?;
                let n = q.purge(&name)?;
                q.sync().await?;
                Ok(n)
            }
        }
    }
}

async fn get<T: serde::de::DeserializeOwned>(addr: SocketAddr, path: &str) -> anyhow::Result<T> {
    request(addr, http::Method::GET, path).await
}

async fn request<T: serde::de::DeserializeOwned>(
    addr: SocketAddr,
    method: http::Method,
    path: &str,
) -> anyhow::Result<T> {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(hyper_util::rt::TokioExecutor::new()).build(HttpConnector::new());
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(Empty::new())?;
    let resp = tokio::time::timeout(ADMIN_TIMEOUT, client.request(req))
        .await
        .context("the admin listener did not answer in time")??;
    let status = resp.status();
    let body = tokio::time::timeout(ADMIN_TIMEOUT, resp.into_body().collect())
        .await
        .context("the admin listener did not answer in time")??
        .to_bytes();
    if !status.is_success() {
        bail!(
            "the relay answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    serde_json::from_slice(&body).context("unexpected answer from the admin listener")
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// `42s`, `17m`, `5h`, `3d`.
fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}
