//! Hookrelay's agent: the developer's side of the tunnel.
//!
//! It connects to a relay over QUIC, holds a tunnel, and forwards every delivery
//! to a local app, streaming bodies both ways.
//!
//! - [`agent`]: [`Agent::spawn`] runs the agent and reconnects on its own.
//! - [`config`]: validated [`Config`], targets, trust settings.
//! - [`cli`]: command line and environment into a [`Config`].
//! - [`session`]: one QUIC connection: handshake and delivery streams.
//! - [`tls`]: certificate checks (public roots, pinned fingerprint).
//! - [`demo`]: relay, agent and sample app in one process.
//! - [`history`]: exchanges recorded in sled, with retention and a live feed.
//! - [`metrics`]: Prometheus metrics served by the inspector.
//! - [`queued`]: webhooks the relay queued: the agent's outbox, in-order delivery, retries.
//! - [`replay`]: re-sends recorded requests, edited and re-signed on demand.
//! - [`export`]: curl, HAR and JSON renderings.
//! - [`commands`]: `history`, `show`, `replay`, `export` over the API or the store.
//! - `forward`: hands deliveries to the local app (keep-alive pool).
//! - `inspector`: loopback-only status API and web UI.
//! - `terminal`: one line per delivery on stdout.

pub mod agent;
mod app_pool;
pub mod cli;
pub mod commands;
pub mod config;
pub mod dedupe;
pub mod demo;
pub mod export;
mod forward;
pub mod history;
mod inspector;
pub mod metrics;
pub mod queued;
pub mod replay;
pub mod session;
mod terminal;
pub mod tls;

pub use agent::{Agent, AgentError, Status};
pub use config::{Config, Secret, Target, Trust};
