//! Messages between relay and agent.
//!
//! One QUIC connection per agent; the agent is the client. The first
//! bidirectional stream, opened by the agent, is the control stream: the agent
//! writes one [`Hello`] frame and the relay answers with one [`RelayToAgent`]
//! frame (`Welcome` or `Rejected`); further frames on it are [`AgentToRelay`] and
//! [`RelayToAgent`] messages. Every delivery is one more bidirectional stream,
//! opened by the relay: a [`RequestHead`] frame then the raw request body up to
//! the stream's end; the agent answers with an [`AgentReply`] frame then, for a
//! response, the raw response body up to the stream's end. A stream reset means
//! the body was cut short, never that it ended.
//!
//! Queued deliveries (store-and-forward) travel differently: right after the
//! welcome the agent opens one more bidirectional stream, the queue stream, and
//! writes a [`QueueOpen`] frame. The relay sends the tunnel's queued requests on
//! it in queue order, each a [`QueuedDelivery`] frame followed by exactly
//! `body_len` body bytes, with at most `window` of them unacknowledged. The
//! agent answers with [`QueueAck`] frames once the deliveries are on its disk;
//! only then does the relay delete them. One stream keeps the order for free,
//! and the agent's acknowledgements batch naturally behind its fsyncs.

use std::{borrow::Cow, fmt, net::SocketAddr, str::FromStr};

use serde::{Deserialize, Serialize};
use ulid::Ulid;

use crate::{
    policy::{PolicyRequest, PolicySummary},
    TunnelName,
};

/// Identifies one delivery end to end. ULIDs sort by creation time, which is the
/// relay's arrival order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeliveryId(pub Ulid);

impl DeliveryId {
    /// A fresh id for a request arriving now.
    pub fn new() -> Self {
        DeliveryId(Ulid::new())
    }
}

impl Default for DeliveryId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl FromStr for DeliveryId {
    type Err = ulid::DecodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ulid::from_string(s).map(DeliveryId)
    }
}

/// First frame on the control stream. `version` comes first so that a relay can
/// read it even when the rest of the layout changed between versions, and answer
/// with a useful [`RejectReason::VersionMismatch`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The agent's [`crate::PROTOCOL_VERSION`].
    pub version: u16,
    /// Bearer token from `relay-server token create`. Sent only once the TLS
    /// handshake is complete (never in 0-RTT data, which can be replayed).
    pub token: String,
    /// Stable id of the agent installation; a reconnecting agent with the same id
    /// takes its tunnels back from its own stale connection.
    pub agent_id: String,
    /// Tunnels the agent wants to hold.
    pub tunnels: Vec<TunnelName>,
    /// How the agent wants its tunnels to treat webhooks; the relay may narrow
    /// it (the effective settings come back in each [`TunnelGrant`]).
    pub settings: TunnelSettings,
    /// What the agent asks the relay to enforce for its tunnels (signatures,
    /// allowed sources, rate limits) before anything is forwarded or queued;
    /// the relay's own config for a tunnel overrides it.
    pub policy: PolicyRequest,
}

/// Whether the sender waits for the local app's answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeliveryMode {
    /// The sender gets the local app's own answer (needed for handshakes:
    /// Slack and Twitch challenges, Twilio responses).
    #[default]
    Sync,
    /// The relay stores every request, answers `202 Accepted` with its
    /// delivery id at once, and delivers it when it can.
    Queue,
}

/// What happens to a webhook while a tunnel's agent is offline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WhenOffline {
    /// Stored and delivered when the agent is back (`202 Accepted`).
    #[default]
    Queue,
    /// Refused with `503` and `Retry-After`; the sender's own retries take over.
    Reject,
}

/// A tunnel's delivery settings, chosen by its agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TunnelSettings {
    /// Sync or queue.
    pub mode: DeliveryMode,
    /// Queue or reject while offline.
    pub when_offline: WhenOffline,
}

impl fmt::Display for DeliveryMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeliveryMode::Sync => "sync",
            DeliveryMode::Queue => "queue",
        })
    }
}

impl FromStr for DeliveryMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sync" => Ok(DeliveryMode::Sync),
            "queue" => Ok(DeliveryMode::Queue),
            _ => Err(format!("{s:?} is not a mode (use sync or queue)")),
        }
    }
}

impl fmt::Display for WhenOffline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WhenOffline::Queue => "queue",
            WhenOffline::Reject => "reject",
        })
    }
}

impl FromStr for WhenOffline {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "queue" => Ok(WhenOffline::Queue),
            "reject" => Ok(WhenOffline::Reject),
            _ => Err(format!("{s:?} is not a choice (use queue or reject)")),
        }
    }
}

impl fmt::Debug for Hello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hello")
            .field("version", &self.version)
            .field("token", &"***")
            .field("agent_id", &self.agent_id)
            .field("tunnels", &self.tunnels)
            .field("settings", &self.settings)
            .field("policy", &self.policy)
            .finish()
    }
}

/// Just the leading version of a [`Hello`], for reading one we cannot fully decode.
#[derive(Debug, Deserialize)]
pub struct HelloVersion {
    /// The agent's protocol version.
    pub version: u16,
}

/// Control messages from agent to relay, after the [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentToRelay {
    /// The agent is leaving on purpose; the relay frees its tunnels at once.
    Goodbye,
}

/// Control messages from relay to agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayToAgent {
    /// The hello was accepted; the agent now holds these tunnels.
    Welcome {
        /// The relay's protocol version.
        relay_version: u16,
        /// One entry per requested tunnel, with its public URLs.
        tunnels: Vec<TunnelGrant>,
    },
    /// The hello was refused; the relay closes the connection after this frame.
    Rejected {
        /// Machine-readable cause; decides whether the agent retries.
        reason: RejectReason,
        /// Human-readable explanation, printed by the agent.
        message: String,
    },
}

/// A tunnel the relay granted, and where senders reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelGrant {
    /// The tunnel's name.
    pub name: TunnelName,
    /// Public URLs, path-style first (`http://HOST:PORT/t/NAME/`), then the
    /// subdomain form when the relay has a domain.
    pub public_urls: Vec<String>,
    /// The settings in force: the agent's, narrowed by the relay's config.
    pub settings: TunnelSettings,
    /// Deliveries waiting in the relay's queue for this tunnel right now.
    pub queued: u64,
    /// What the relay enforces for this tunnel.
    pub policy: PolicySummary,
}

/// First frame on the queue stream, from the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueOpen {
    /// Most deliveries the relay may send before the agent acknowledges them.
    pub window: u32,
}

/// One queued delivery on the queue stream; exactly `body_len` body bytes
/// follow the frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedDelivery {
    /// The request as the relay received it; `head.delivery_id` is the id the
    /// sender got with its `202`.
    pub head: RequestHead,
    /// Bytes of body after this frame.
    pub body_len: u64,
}

/// From the agent on the queue stream: every delivery sent on this stream up
/// to and including `up_to` is on the agent's disk; the relay may delete them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueAck {
    /// The last delivery covered, in stream order.
    pub up_to: DeliveryId,
}

/// Why a relay refused an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    /// The token is unknown or revoked.
    BadToken,
    /// Agent and relay speak different protocol versions.
    VersionMismatch {
        /// The relay's version, so the agent can say which side to upgrade.
        relay_version: u16,
    },
    /// The token does not grant one of the requested tunnel names.
    TunnelNotAllowed,
    /// Another agent holds one of the requested tunnels.
    TunnelTaken,
    /// The hello could not be decoded or asked for nothing.
    InvalidHello,
    /// Too many failed attempts from this address; retry later.
    TooManyAttempts,
}

impl RejectReason {
    /// Whether retrying with the same settings can ever succeed. Fatal reasons end
    /// the agent with a message instead of an endless retry loop.
    pub fn is_fatal(self) -> bool {
        !matches!(self, RejectReason::TooManyAttempts)
    }
}

/// Everything about a webhook request except its body, sent by the relay as the
/// first frame of a delivery stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHead {
    /// The relay's id for this delivery.
    pub delivery_id: DeliveryId,
    /// The tunnel it arrived on.
    pub tunnel: TunnelName,
    /// HTTP method, as sent.
    pub method: String,
    /// Path and query below the tunnel's root, always starting with `/`.
    pub path: String,
    /// Request headers in arrival order, values as raw bytes, hop-by-hop headers
    /// removed and `X-Forwarded-*` added by the relay.
    #[serde(with = "raw_headers")]
    pub headers: Vec<(String, Vec<u8>)>,
    /// The sender's address as the relay saw it.
    pub remote_addr: SocketAddr,
    /// The full public URL the sender used.
    pub public_url: String,
    /// When the relay received the request, in milliseconds since the Unix epoch.
    pub received_at_ms: u64,
    /// How long the relay waits for the local app's response head.
    pub timeout_ms: u64,
    /// The body length when the sender declared it.
    pub body_len: Option<u64>,
}

/// A [`RequestHead`] borrowing its strings and headers from the request it
/// describes, for sending: it serializes to exactly the bytes the owned head
/// would (tested), so the relay writes a live delivery's head without copying
/// every header into a `String` and a `Vec` first (two allocations each).
#[derive(Clone, Debug, Serialize)]
pub struct RequestHeadRef<'a> {
    /// See [`RequestHead::delivery_id`].
    pub delivery_id: DeliveryId,
    /// See [`RequestHead::tunnel`].
    pub tunnel: &'a TunnelName,
    /// See [`RequestHead::method`].
    pub method: &'a str,
    /// See [`RequestHead::path`].
    pub path: &'a str,
    /// See [`RequestHead::headers`].
    #[serde(serialize_with = "raw_headers::serialize")]
    pub headers: &'a [(&'a str, Cow<'a, [u8]>)],
    /// See [`RequestHead::remote_addr`].
    pub remote_addr: SocketAddr,
    /// See [`RequestHead::public_url`].
    pub public_url: &'a str,
    /// See [`RequestHead::received_at_ms`].
    pub received_at_ms: u64,
    /// See [`RequestHead::timeout_ms`].
    pub timeout_ms: u64,
    /// See [`RequestHead::body_len`].
    pub body_len: Option<u64>,
}

impl RequestHeadRef<'_> {
    /// The owned head, for a delivery that is queued instead of sent.
    pub fn to_owned_head(&self) -> RequestHead {
        RequestHead {
            delivery_id: self.delivery_id,
            tunnel: self.tunnel.clone(),
            method: self.method.to_owned(),
            path: self.path.to_owned(),
            headers: self
                .headers
                .iter()
                .map(|(name, value)| ((*name).to_owned(), value.to_vec()))
                .collect(),
            remote_addr: self.remote_addr,
            public_url: self.public_url.to_owned(),
            received_at_ms: self.received_at_ms,
            timeout_ms: self.timeout_ms,
            body_len: self.body_len,
        }
    }
}

/// The agent's answer on a delivery stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentReply {
    /// The local app answered; its body follows on the stream.
    Response(ResponseHead),
    /// The local app could not be reached or did not answer in time.
    Failed {
        /// What went wrong, for the status code the sender gets.
        kind: FailureKind,
        /// Human-readable detail.
        message: String,
    },
}

/// Status and headers of the local app's response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseHead {
    /// HTTP status code.
    pub status: u16,
    /// Response headers in order, values as raw bytes, hop-by-hop headers removed.
    #[serde(with = "raw_headers")]
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Why the agent could not hand a request to the local app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// Connection refused or the address is unreachable (sender gets 502).
    LocalAppUnreachable,
    /// No response head within the timeout (sender gets 504).
    LocalAppTimeout,
    /// The connection broke or the app spoke broken HTTP (sender gets 502).
    LocalAppError,
    /// The relayed request could not be rebuilt as HTTP by the agent (sender gets 502).
    BadRequest,
}

/// Header values as byte strings (`serialize_bytes`) rather than sequences of
/// `u8`. The bytes written are the same in both formats these heads travel
/// and rest in: postcard writes a length then the bytes either way, and
/// serde_json an array of numbers either way (tests below compare them). But a
/// sequence is decoded one element at a time through serde's visitor, a
/// byte string at once: decoding a head of ten headers took about 7,000
/// instructions in the agent (callgrind), per webhook.
mod raw_headers {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    /// Owned headers (`RequestHead`, `ResponseHead`) and headers borrowed
    /// from a request (`RequestHeadRef`) alike.
    pub fn serialize<S: Serializer, N: AsRef<str>, V: AsRef<[u8]>>(
        headers: &[(N, V)],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            headers
                .iter()
                .map(|(name, value)| (name.as_ref(), Bytes::new(value.as_ref()))),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<(String, Vec<u8>)>, D::Error> {
        // `ByteBuf` takes a byte string, or a sequence of numbers (serde_json).
        let headers = Vec::<(String, ByteBuf)>::deserialize(deserializer)?;
        Ok(headers
            .into_iter()
            .map(|(name, value)| (name, value.into_vec()))
            .collect())
    }
}

/// QUIC application close codes.
pub mod close {
    /// The relay or agent is shutting down normally.
    pub const SHUTDOWN: u32 = 0;
    /// The hello was refused; the reason came on the control stream.
    pub const REJECTED: u32 = 1;
    /// The peer broke the protocol.
    pub const PROTOCOL_ERROR: u32 = 2;
    /// Another connection of the same agent took over its tunnels.
    pub const REPLACED: u32 = 3;
}

/// QUIC stream reset codes.
pub mod reset {
    /// The sender's request body ended early or broke a limit.
    pub const BODY_ABORTED: u32 = 1;
    /// The delivery was given up (timeout, shutdown).
    pub const CANCELLED: u32 = 2;
}
