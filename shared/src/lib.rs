//! Hookrelay's shared rules: the wire protocol between relay and agent, the frame
//! codec that carries it, and the tunnel-name rules. No sockets, no clocks.
//!
//! - [`protocol`]: control messages ([`AgentToRelay`], [`RelayToAgent`]) and the
//!   per-delivery heads ([`RequestHead`], [`AgentReply`]).
//! - [`codec`]: length-prefixed postcard frames with a hard size limit.
//! - [`tunnel_name`]: [`TunnelName`], a DNS label, and [`TunnelPattern`] globs.
//! - [`durable`]: [`durable::GroupCommit`], one fsync for many writers.
//! - [`http`]: header rules both ends apply (hop-by-hop headers).
//! - [`open_files`]: the open-files limit raised at start, and what fits under it.
//! - [`logfmt`]: [`logfmt::PlainFields`], the text log's fields written for less.
//! - [`policy`]: what the relay enforces per tunnel (signatures, sources, rates).
//! - [`signature`]: webhook signature detection, verification and re-signing.

pub mod body_files;
pub mod codec;
pub mod durable;
pub mod http;
pub mod logfmt;
pub mod open_files;
pub mod policy;
pub mod protocol;
pub mod signature;
pub mod tunnel_name;

pub use codec::{CodecError, FrameCodec, MAX_FRAME_LEN};
pub use protocol::{
    AgentReply, AgentToRelay, DeliveryId, DeliveryMode, FailureKind, Hello, QueueAck, QueueOpen,
    QueuedDelivery, RejectReason, RelayToAgent, RequestHead, RequestHeadRef, ResponseHead,
    TunnelGrant, TunnelSettings, WhenOffline,
};
pub use tunnel_name::{TunnelName, TunnelNameError, TunnelPattern};

/// Version of the wire protocol. A relay and an agent must agree on it; a mismatch
/// is answered with [`RejectReason::VersionMismatch`].
pub const PROTOCOL_VERSION: u16 = 3;

/// QUIC application protocol name. An endpoint offering anything else is refused
/// during the TLS handshake, before a single frame is read.
pub const ALPN: &[u8] = b"hookrelay/1";
