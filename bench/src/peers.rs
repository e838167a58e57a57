//! The raw TCP tunnels Hookrelay is compared with, run as shipped on
//! loopback: rathole (server + client, TCP transport, no encryption) and bore
//! (server + local). Both are found on PATH (`cargo install rathole bore-cli`);
//! neither is ever installed by the benchmark.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;

use crate::{
    client,
    http::Target,
    process::{command, Proc},
};

/// How long a peer tunnel may take until a request goes through.
const READY_WAIT: Duration = Duration::from_secs(30);

/// A running peer tunnel.
pub struct Peer {
    name: &'static str,
    /// Server first, then client.
    procs: Vec<Proc>,
    /// Where senders connect.
    addr: SocketAddr,
}

impl Peer {
    pub fn target(&self) -> Target {
        Target {
            name: self.name,
            addr: self.addr,
            prefix: "",
            pids: vec![
                ("server", self.procs[0].pid()),
                ("client", self.procs[1].pid()),
            ],
        }
    }
}

/// rathole and bore in front of `app`.
pub async fn start_all(dir: &Path, app: SocketAddr) -> anyhow::Result<Vec<Peer>> {
    Ok(vec![rathole(dir, app).await?, bore(app).await?])
}

fn on_path(name: &str) -> anyhow::Result<std::path::PathBuf> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(name))
                .find(|p| p.is_file())
        })
        .with_context(|| {
            format!("{name} is not on PATH: install it with `cargo install {}` (outside this repository), or leave out --peers",
                if name == "bore" { "bore-cli" } else { name })
        })
}

/// A port that was free a moment ago.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

async fn rathole(dir: &Path, app: SocketAddr) -> anyhow::Result<Peer> {
    let bin = on_path("rathole")?;
    let control = free_port()?;
    let public = free_port()?;
    let server_toml = dir.join("rathole-server.toml");
    let client_toml = dir.join("rathole-client.toml");
    std::fs::write(
        &server_toml,
        format!(
            "[server]\nbind_addr = \"127.0.0.1:{control}\"\n\n[server.services.bench]\ntoken = \"bench\"\nbind_addr = \"127.0.0.1:{public}\"\n"
        ),
    )?;
    std::fs::write(
        &client_toml,
        format!(
            "[client]\nremote_addr = \"127.0.0.1:{control}\"\n\n[client.services.bench]\ntoken = \"bench\"\nlocal_addr = \"{app}\"\n"
        ),
    )?;
    let mut server = command(&bin);
    server.arg("--server").arg(&server_toml);
    let server = Proc::start("rathole server", server)?;
    let mut client = command(&bin);
    client.arg("--client").arg(&client_toml);
    let client = Proc::start("rathole client", client)?;
    let addr: SocketAddr = ([127, 0, 0, 1], public).into();
    until_through(addr).await.context("rathole")?;
    Ok(Peer {
        name: "rathole",
        procs: vec![server, client],
        addr,
    })
}

async fn bore(app: SocketAddr) -> anyhow::Result<Peer> {
    let bin = on_path("bore")?;
    let public = free_port()?;
    let mut server = command(&bin);
    server.args(["server", "--bind-addr", "127.0.0.1"]);
    server.args([
        "--min-port",
        &public.to_string(),
        "--max-port",
        &public.to_string(),
    ]);
    let server = Proc::start("bore server", server)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut client = command(&bin);
    client.args([
        "local",
        &app.port().to_string(),
        "--local-host",
        "127.0.0.1",
    ]);
    client.args(["--to", "127.0.0.1", "--port", &public.to_string()]);
    let client = Proc::start("bore local", client)?;
    let addr: SocketAddr = ([127, 0, 0, 1], public).into();
    until_through(addr).await.context("bore")?;
    Ok(Peer {
        name: "bore",
        procs: vec![server, client],
        addr,
    })
}

/// Waits until a POST through `addr` reaches the app.
async fn until_through(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + READY_WAIT;
    loop {
        let attempt = async {
            let mut conn = client::connect(addr).await?;
            let request = http::Request::post("/ready")
                .header(http::header::HOST, addr.to_string())
                .body(Full::new(Bytes::from_static(b"{}")))?;
            client::send(&mut conn, request).await
        };
        if let Ok(Ok((status, _))) = tokio::time::timeout(Duration::from_secs(2), attempt).await {
            if status.is_success() {
                return Ok(());
            }
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no request got through {addr} within {READY_WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
