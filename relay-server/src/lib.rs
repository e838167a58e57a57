//! Hookrelay's relay: the public side of the tunnel.
//!
//! Webhooks arrive over HTTP at `/t/NAME/...` (or `NAME.DOMAIN`) and travel over
//! QUIC to the agent holding tunnel `NAME`, one bidirectional stream each.
//!
//! - [`relay`]: [`Relay::spawn`] starts everything and hands back addresses.
//! - [`config`]: validated [`Config`] and its defaults.
//! - [`cli`]: command line, environment and TOML file into a [`Config`].
//! - [`ingress`]: the HTTP side; [`IngressError`] maps failures to statuses.
//! - [`agents`](crate::agents): the QUIC side, handshake and sessions.
//! - [`metrics`]: Prometheus metrics on the admin listener.
//! - [`policy`]: per-tunnel signatures, allow-lists and rate limits.
//! - [`queue`]: the durable per-tunnel [`queue::Queue`] of store-and-forward deliveries.
//! - [`routing`]: the [`Routes`] table of tunnel holders.
//! - [`auth`]: hashed agent tokens.
//! - [`tls`]: certificate files or a persisted self-signed certificate.
//! - [`udp`]: UDP sockets for QUIC with buffers sized for bursts.

pub mod admin;
mod agents;
pub mod auth;
pub mod cli;
pub mod config;
mod drain;
mod edge;
mod framing;
mod guard;
pub mod ingress;
pub mod metrics;
pub mod policy;
pub mod queue;
pub mod relay;
pub mod routing;
pub mod sled_walk;
pub mod tls;
pub mod udp;

pub use config::{Config, TlsSource};
pub use ingress::IngressError;
pub use relay::{Relay, SpawnError};
pub use routing::Routes;

/// The wall clock in Unix milliseconds (0 before 1970, saturating far ahead):
/// arrival stamps, queue ages, what operators are shown.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
