//! Writes the seed corpus in `fuzz/seeds/`: frames of every message type, the
//! signature test vectors as requests, and a few tunnel names. Regenerate
//! after a protocol change:
//! `cargo run --manifest-path fuzz/Cargo.toml --example seeds`.

use std::{fs, path::Path};

use bytes::BytesMut;
use hookrelay_shared::{
    codec, AgentReply, AgentToRelay, DeliveryId, FailureKind, Hello, QueueAck, QueueOpen,
    QueuedDelivery, RejectReason, RelayToAgent, RequestHead, ResponseHead, TunnelGrant, TunnelName,
    TunnelSettings, PROTOCOL_VERSION,
};
use serde::{Deserialize, Serialize};

const VECTORS: &str = include_str!("../../shared/tests/data/signature-vectors.json");

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    frames(&seeds.join("frame_decoder"))?;
    signatures(&seeds.join("signature_headers"))?;
    let names = seeds.join("tunnel_name");
    fs::create_dir_all(&names)?;
    for (file, text) in [
        ("star", "*\nalice-dev"),
        ("prefix", "alice-*\nAlice-Dev."),
        ("exact", "ci\nci"),
        ("longest", &format!("a*b*c\n{}", "a".repeat(63))),
    ] {
        fs::write(names.join(file), text)?;
    }
    Ok(())
}

/// `[kind, chunk seed, frame, frame…]`, the frame_decoder input layout; `kind`
/// is the index of the type in the target's `match`.
fn frames(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    fs::create_dir_all(dir)?;
    let tunnel: TunnelName = "alice-dev".parse()?;
    let head = RequestHead {
        delivery_id: DeliveryId::new(),
        tunnel: tunnel.clone(),
        method: "POST".into(),
        path: "/stripe/webhook?x=1".into(),
        headers: vec![
            ("content-type".into(), b"application/json".to_vec()),
            ("stripe-signature".into(), b"t=1700000000,v1=00ff".to_vec()),
        ],
        remote_addr: "127.0.0.1:50000".parse()?,
        public_url: "https://relay.example.com/t/alice-dev/stripe/webhook?x=1".into(),
        received_at_ms: 1_700_000_000_000,
        timeout_ms: 30_000,
        body_len: Some(2),
    };
    let hello = Hello {
        version: PROTOCOL_VERSION,
        token: "hkr_seed".into(),
        agent_id: "agent-1".into(),
        tunnels: vec![tunnel.clone()],
        settings: TunnelSettings::default(),
        policy: hookrelay_shared::policy::PolicyRequest {
            verify: vec![(hookrelay_shared::signature::Provider::Stripe, "whsec_seed".into())],
            allow: vec!["192.0.2.0/24".into()],
            rate_limit: Some("100/s".into()),
            rate_limit_per_source: None,
        },
    };
    let welcome = RelayToAgent::Welcome {
        relay_version: PROTOCOL_VERSION,
        tunnels: vec![TunnelGrant {
            name: tunnel.clone(),
            public_urls: vec!["https://relay.example.com/t/alice-dev/".into()],
            settings: TunnelSettings::default(),
            queued: 3,
            policy: hookrelay_shared::policy::PolicySummary::default(),
        }],
    };
    let rejected = RelayToAgent::Rejected {
        reason: RejectReason::VersionMismatch { relay_version: 1 },
        message: "upgrade the agent".into(),
    };
    let reply = AgentReply::Response(ResponseHead {
        status: 200,
        headers: vec![("content-length".into(), b"2".to_vec())],
    });
    let failed = AgentReply::Failed {
        kind: FailureKind::LocalAppTimeout,
        message: "no answer".into(),
    };
    write(dir, "hello", 0, &[hello])?;
    write(
        dir,
        "goodbye",
        1,
        &[AgentToRelay::Goodbye, AgentToRelay::Goodbye],
    )?;
    write(dir, "welcome-rejected", 2, &[welcome, rejected])?;
    write(dir, "queue-open", 3, &[QueueOpen { window: 64 }])?;
    let queued = QueuedDelivery {
        head: head.clone(),
        body_len: 2,
    };
    write(dir, "queued", 4, &[queued])?;
    let ack = QueueAck {
        up_to: head.delivery_id,
    };
    write(dir, "queue-ack", 5, &[ack])?;
    write(dir, "request-head", 6, &[head])?;
    write(dir, "replies", 7, &[reply, failed])?;
    write(dir, "tunnel-name", 8, &[tunnel])?;
    Ok(())
}

fn write<T: Serialize>(
    dir: &Path,
    name: &str,
    kind: u8,
    msgs: &[T],
) -> Result<(), Box<dyn std::error::Error>> {
    let mut buf = BytesMut::from(&[kind, 7][..]);
    for msg in msgs {
        codec::encode(msg, &mut buf)?;
    }
    fs::write(dir.join(name), &buf)?;
    Ok(())
}

#[derive(Deserialize)]
struct Vector {
    id: String,
    secret: String,
    url: Option<String>,
    headers: std::collections::BTreeMap<String, String>,
    body: String,
    now_unix: i64,
}

/// Each vector in the signature_headers layout: now, secret, URL, headers,
/// an empty line, the body.
fn signatures(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    fs::create_dir_all(dir)?;
    let vectors: Vec<Vector> = serde_json::from_str(VECTORS)?;
    for v in vectors {
        let mut text = format!(
            "{}\n{}\n{}\n",
            v.now_unix,
            v.secret,
            v.url.unwrap_or_default()
        );
        for (name, value) in &v.headers {
            text.push_str(&format!("{name}: {value}\n"));
        }
        text.push('\n');
        text.push_str(&v.body);
        fs::write(dir.join(&v.id), text)?;
    }
    Ok(())
}
