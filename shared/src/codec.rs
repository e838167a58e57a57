//! Frame layout: a 4-byte big-endian length, then that many bytes of postcard.
//!
//! This module alone knows the byte layout. Every decoder checks the length
//! against [`MAX_FRAME_LEN`] before allocating, and hostile bytes come back as a
//! [`CodecError`], never a panic.

use std::{io, marker::PhantomData};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame payload, in bytes. Heads carry request headers, which the relay
/// caps far lower (64 KiB); 1 MiB leaves room without letting a peer make us
/// allocate much.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Bytes of the length prefix.
const LEN_PREFIX: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_LEN}")]
    TooLarge { len: usize },
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("malformed frame")]
    Malformed(#[source] postcard::Error),
    #[error("i/o error on frame stream")]
    Io(#[from] io::Error),
}

/// Encodes one message as a frame into `dst`.
///
/// # Errors
/// [`CodecError::TooLarge`] when the encoded message exceeds [`MAX_FRAME_LEN`].
pub fn encode<T: Serialize>(msg: &T, dst: &mut BytesMut) -> Result<(), CodecError> {
    // Sized first, then written in place: through a Vec grown from empty,
    // every delivery head was reallocated several times and copied once more.
    let len = postcard::experimental::serialized_size(msg).map_err(CodecError::Malformed)?;
    if len > MAX_FRAME_LEN {
        return Err(CodecError::TooLarge { len });
    }
    let start = dst.len();
    dst.reserve(LEN_PREFIX + len);
    dst.put_u32(len as u32);
    dst.resize(start + LEN_PREFIX + len, 0);
    if let Err(e) = postcard::to_slice(msg, &mut dst[start + LEN_PREFIX..]) {
        dst.truncate(start);
        return Err(CodecError::Malformed(e));
    }
    Ok(())
}

/// One whole frame as bytes, for writing together with what follows it (a
/// head and the first body chunk in one stream write, so one packet).
///
/// # Errors
/// As [`encode`].
pub fn frame<T: Serialize>(msg: &T) -> Result<Bytes, CodecError> {
    let mut buf = BytesMut::new();
    encode(msg, &mut buf)?;
    Ok(buf.freeze())
}

/// Decodes one frame from the front of `src` when it is complete; `Ok(None)` asks
/// for more bytes. Consumes the frame's bytes only on success.
///
/// # Errors
/// [`CodecError::TooLarge`] as soon as the length prefix is read, and
/// [`CodecError::Malformed`] when the payload is not a `T`.
pub fn decode<T: DeserializeOwned>(src: &mut BytesMut) -> Result<Option<T>, CodecError> {
    if src.len() < LEN_PREFIX {
        return Ok(None);
    }
    let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(CodecError::TooLarge { len });
    }
    if src.len() < LEN_PREFIX + len {
        src.reserve(LEN_PREFIX + len - src.len());
        return Ok(None);
    }
    let msg =
        postcard::from_bytes(&src[LEN_PREFIX..LEN_PREFIX + len]).map_err(CodecError::Malformed)?;
    src.advance(LEN_PREFIX + len);
    Ok(Some(msg))
}

/// Writes one frame. Not cancel safe: a cancelled write leaves a torn frame.
///
/// # Errors
/// Encoding errors as for [`encode`], and I/O errors from `w`.
pub async fn write_frame<T, W>(w: &mut W, msg: &T) -> Result<(), CodecError>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    w.write_all(&frame(msg)?).await?;
    Ok(())
}

/// Reads exactly one frame and nothing past it, so that raw body bytes after a
/// head stay in the stream. `Ok(None)` means the stream ended cleanly before the
/// frame began. Not cancel safe.
///
/// # Errors
/// [`CodecError::Truncated`] when the stream ends inside the frame, and the
/// errors of [`decode`].
pub async fn read_frame<T, R>(r: &mut R) -> Result<Option<T>, CodecError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    match read_payload(r).await? {
        Some(payload) => decode_payload(&payload).map(Some),
        None => Ok(None),
    }
}

/// Reads one frame's raw payload, for callers that decode it in more than one
/// way (the relay reads a [`crate::Hello`] it may not fully understand).
///
/// # Errors
/// As for [`read_frame`], without [`CodecError::Malformed`].
pub async fn read_payload<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, CodecError> {
    let mut prefix = [0u8; LEN_PREFIX];
    let mut filled = 0;
    while filled < LEN_PREFIX {
        match r.read(&mut prefix[filled..]).await? {
            0 if filled == 0 => return Ok(None),
            0 => return Err(CodecError::Truncated),
            n => filled += n,
        }
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        return Err(CodecError::TooLarge { len });
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => CodecError::Truncated,
            _ => CodecError::Io(e),
        })?;
    Ok(Some(payload))
}

/// Decodes a payload read by [`read_payload`].
///
/// # Errors
/// [`CodecError::Malformed`] when the bytes are not a `T`.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    postcard::from_bytes(payload).map_err(CodecError::Malformed)
}

/// Decodes the leading `T` of a payload and ignores the rest: reads the version
/// at the front of a message whose remainder changed shape.
///
/// # Errors
/// [`CodecError::Malformed`] when even the prefix is not a `T`.
pub fn decode_prefix<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    postcard::take_from_bytes(payload)
        .map(|(v, _)| v)
        .map_err(CodecError::Malformed)
}

/// [`tokio_util::codec`] adapter for streams that carry only frames (the control
/// stream): decodes `T`, encodes any serialisable message.
#[derive(Debug)]
pub struct FrameCodec<T> {
    _msg: PhantomData<fn() -> T>,
}

impl<T> FrameCodec<T> {
    /// A codec for frames holding `T`.
    pub fn new() -> Self {
        FrameCodec { _msg: PhantomData }
    }
}

impl<T> Default for FrameCodec<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: DeserializeOwned> tokio_util::codec::Decoder for FrameCodec<T> {
    type Item = T;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<T>, CodecError> {
        decode(src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<T>, CodecError> {
        match decode(src)? {
            Some(msg) => Ok(Some(msg)),
            None if src.is_empty() => Ok(None),
            None => Err(CodecError::Truncated),
        }
    }
}

impl<T, S: Serialize> tokio_util::codec::Encoder<S> for FrameCodec<T> {
    type Error = CodecError;

    fn encode(&mut self, msg: S, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode(&msg, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{
        AgentReply, AgentToRelay, DeliveryMode, FailureKind, Hello, HelloVersion, QueueAck,
        QueueOpen, QueuedDelivery, RejectReason, RelayToAgent, RequestHead, ResponseHead,
        TunnelGrant, TunnelSettings, WhenOffline,
    };
    use crate::{DeliveryId, TunnelName};
    use proptest::{collection::vec, prelude::*, sample::Index};
    use std::{
        future::Future,
        net::{IpAddr, SocketAddr},
        pin::{pin, Pin},
        task::{Context, Poll, Waker},
    };
    use tokio::io::ReadBuf;
    use ulid::Ulid;

    fn head() -> RequestHead {
        RequestHead {
            delivery_id: DeliveryId::new(),
            tunnel: "alice".parse().expect("name"),
            method: "POST".into(),
            path: "/hook?x=1".into(),
            headers: vec![("x-bin".into(), vec![0, 0xff, b'a'])],
            remote_addr: "127.0.0.1:5000".parse().expect("addr"),
            public_url: "http://relay/t/alice/hook?x=1".into(),
            received_at_ms: 1,
            timeout_ms: 30_000,
            body_len: Some(3),
        }
    }

    #[test]
    fn frames_round_trip() {
        let mut buf = BytesMut::new();
        encode(&head(), &mut buf).expect("encode");
        let reply = AgentReply::Response(ResponseHead {
            status: 200,
            headers: vec![],
        });
        encode(&reply, &mut buf).expect("encode");
        let first: RequestHead = decode(&mut buf).expect("decode").expect("complete");
        assert_eq!(first.path, "/hook?x=1");
        let second: AgentReply = decode(&mut buf).expect("decode").expect("complete");
        assert_eq!(second, reply);
        assert!(buf.is_empty());
    }

    #[test]
    fn very_long_frame_is_refused_before_allocating() {
        let mut buf = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        assert!(matches!(
            decode::<RequestHead>(&mut buf),
            Err(CodecError::TooLarge { len }) if len == u32::MAX as usize
        ));
    }

    #[test]
    fn oversized_message_is_refused_on_encode() {
        let mut h = head();
        h.headers = vec![("x".into(), vec![b'a'; MAX_FRAME_LEN + 1])];
        assert!(matches!(
            encode(&h, &mut BytesMut::new()),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn garbage_is_malformed() {
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(
            decode::<RelayToAgent>(&mut buf),
            Err(CodecError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn async_reader_leaves_body_bytes_in_the_stream() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        write_frame(&mut a, &head()).await.expect("write");
        a.write_all(b"body").await.expect("write");
        drop(a);
        let h: RequestHead = read_frame(&mut b).await.expect("read").expect("frame");
        assert_eq!(h.body_len, Some(3));
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.expect("read");
        assert_eq!(rest, b"body");
    }

    #[tokio::test]
    async fn clean_eof_is_none_and_torn_frame_is_an_error() {
        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        assert!(read_frame::<Hello, _>(&mut b)
            .await
            .expect("clean eof")
            .is_none());

        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 10, 1, 2]).await.expect("write");
        drop(a);
        assert!(matches!(
            read_frame::<Hello, _>(&mut b).await,
            Err(CodecError::Truncated)
        ));

        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0]).await.expect("write");
        drop(a);
        assert!(matches!(
            read_frame::<Hello, _>(&mut b).await,
            Err(CodecError::Truncated)
        ));
    }

    proptest! {
        #[test]
        fn random_payload_behind_a_valid_prefix_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096)
        ) {
            let mut buf = BytesMut::new();
            buf.put_u32(bytes.len() as u32);
            buf.put_slice(&bytes);
            let _ = decode::<RequestHead>(&mut buf);
        }

        #[test]
        fn every_truncation_of_a_valid_frame_asks_for_more_or_errs(cut in 0usize..200) {
            let mut full = BytesMut::new();
            encode(&head(), &mut full).expect("encode");
            let cut = cut.min(full.len() - 1);
            let mut part = BytesMut::from(&full[..cut]);
            prop_assert!(matches!(decode::<RequestHead>(&mut part), Ok(None)));
            let mut codec = FrameCodec::<RequestHead>::new();
            let res = tokio_util::codec::Decoder::decode_eof(&mut codec, &mut part);
            prop_assert!(cut == 0 && matches!(res, Ok(None)) || matches!(res, Err(CodecError::Truncated)));
        }

        #[test]
        fn names_survive_the_wire(name in "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?") {
            let tunnel: TunnelName = name.parse().expect("generated names are valid");
            let mut buf = BytesMut::new();
            encode(&tunnel, &mut buf).expect("encode");
            let back: TunnelName = decode(&mut buf).expect("decode").expect("complete");
            prop_assert_eq!(back, tunnel);
        }
    }

    /// One message of any type that travels in a frame, so that one test can
    /// mix them the way a connection does.
    #[derive(Clone, Debug, PartialEq)]
    enum AnyFrame {
        Hello(Hello),
        AgentToRelay(AgentToRelay),
        RelayToAgent(RelayToAgent),
        QueueOpen(QueueOpen),
        QueuedDelivery(QueuedDelivery),
        QueueAck(QueueAck),
        RequestHead(RequestHead),
        AgentReply(AgentReply),
    }

    /// Applies `$body` to the message inside any variant, with `$decode`
    /// standing for "decode a frame of this variant's type".
    macro_rules! each_variant {
        ($frame:expr, |$msg:ident, $wrap:ident| $body:expr) => {
            match $frame {
                AnyFrame::Hello($msg) => {
                    let $wrap = AnyFrame::Hello;
                    $body
                }
                AnyFrame::AgentToRelay($msg) => {
                    let $wrap = AnyFrame::AgentToRelay;
                    $body
                }
                AnyFrame::RelayToAgent($msg) => {
                    let $wrap = AnyFrame::RelayToAgent;
                    $body
                }
                AnyFrame::QueueOpen($msg) => {
                    let $wrap = AnyFrame::QueueOpen;
                    $body
                }
                AnyFrame::QueuedDelivery($msg) => {
                    let $wrap = AnyFrame::QueuedDelivery;
                    $body
                }
                AnyFrame::QueueAck($msg) => {
                    let $wrap = AnyFrame::QueueAck;
                    $body
                }
                AnyFrame::RequestHead($msg) => {
                    let $wrap = AnyFrame::RequestHead;
                    $body
                }
                AnyFrame::AgentReply($msg) => {
                    let $wrap = AnyFrame::AgentReply;
                    $body
                }
            }
        };
    }

    impl AnyFrame {
        fn encode(&self, dst: &mut BytesMut) -> Result<(), CodecError> {
            each_variant!(self, |msg, _wrap| encode(msg, dst))
        }

        /// Decodes the next frame of `src` as a message of this one's type.
        fn decode_same(&self, src: &mut BytesMut) -> Result<Option<AnyFrame>, CodecError> {
            each_variant!(self, |_msg, wrap| Ok(decode(src)?.map(wrap)))
        }

        /// Reads the next frame of `r` as a message of this one's type.
        fn read_same<R: AsyncRead + Unpin>(
            &self,
            r: &mut R,
        ) -> Result<Option<AnyFrame>, CodecError> {
            each_variant!(self, |_msg, wrap| Ok(ready(read_frame(r))?.map(wrap)))
        }
    }

    fn tunnel() -> impl Strategy<Value = TunnelName> {
        "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
            .prop_map(|s| s.parse().expect("generated names are valid"))
    }

    fn delivery_id() -> impl Strategy<Value = DeliveryId> {
        any::<u128>().prop_map(|n| DeliveryId(Ulid(n)))
    }

    fn settings() -> impl Strategy<Value = TunnelSettings> {
        (any::<bool>(), any::<bool>()).prop_map(|(queue, reject)| TunnelSettings {
            mode: if queue {
                DeliveryMode::Queue
            } else {
                DeliveryMode::Sync
            },
            when_offline: if reject {
                WhenOffline::Reject
            } else {
                WhenOffline::Queue
            },
        })
    }

    fn headers() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
        vec((".{0,12}", vec(any::<u8>(), 0..24)), 0..5)
    }

    fn request_head() -> impl Strategy<Value = RequestHead> {
        (
            (delivery_id(), tunnel(), ".{0,8}", ".{0,24}", headers()),
            (any::<IpAddr>(), any::<u16>(), ".{0,24}"),
            (any::<u64>(), any::<u64>(), any::<Option<u64>>()),
        )
            .prop_map(
                |(
                    (delivery_id, tunnel, method, path, headers),
                    (ip, port, public_url),
                    (received_at_ms, timeout_ms, body_len),
                )| RequestHead {
                    delivery_id,
                    tunnel,
                    method,
                    path,
                    headers,
                    // Only IP and port go on the wire (not IPv6 flow info).
                    remote_addr: SocketAddr::new(ip, port),
                    public_url,
                    received_at_ms,
                    timeout_ms,
                    body_len,
                },
            )
    }

    fn reject_reason() -> impl Strategy<Value = RejectReason> {
        prop_oneof![
            Just(RejectReason::BadToken),
            any::<u16>().prop_map(|relay_version| RejectReason::VersionMismatch { relay_version }),
            Just(RejectReason::TunnelNotAllowed),
            Just(RejectReason::TunnelTaken),
            Just(RejectReason::InvalidHello),
            Just(RejectReason::TooManyAttempts),
        ]
    }

    fn failure_kind() -> impl Strategy<Value = FailureKind> {
        prop_oneof![
            Just(FailureKind::LocalAppUnreachable),
            Just(FailureKind::LocalAppTimeout),
            Just(FailureKind::LocalAppError),
            Just(FailureKind::BadRequest),
        ]
    }

    fn provider() -> impl Strategy<Value = crate::signature::Provider> {
        (0..crate::signature::Provider::ALL.len()).prop_map(|i| crate::signature::Provider::ALL[i])
    }

    fn policy_request() -> impl Strategy<Value = crate::policy::PolicyRequest> {
        (
            vec((provider(), ".{0,16}"), 0..3),
            vec(".{0,16}", 0..3),
            proptest::option::of(".{0,8}"),
            proptest::option::of(".{0,8}"),
        )
            .prop_map(|(verify, allow, rate_limit, rate_limit_per_source)| {
                crate::policy::PolicyRequest {
                    verify,
                    allow,
                    rate_limit,
                    rate_limit_per_source,
                }
            })
    }

    fn policy_summary() -> impl Strategy<Value = crate::policy::PolicySummary> {
        (
            vec(provider(), 0..3),
            vec(".{0,16}", 0..3),
            proptest::option::of(".{0,8}"),
            proptest::option::of(".{0,8}"),
            any::<bool>(),
        )
            .prop_map(
                |(enforce, allow, rate_limit, rate_limit_per_source, from_relay_config)| {
                    crate::policy::PolicySummary {
                        enforce,
                        allow,
                        rate_limit,
                        rate_limit_per_source,
                        from_relay_config,
                    }
                },
            )
    }

    /// Every message type, with every variant and field drawn at random.
    fn any_frame() -> impl Strategy<Value = AnyFrame> {
        let grant = (
            tunnel(),
            vec(".{0,16}", 0..3),
            settings(),
            any::<u64>(),
            policy_summary(),
        )
            .prop_map(
                |(name, public_urls, settings, queued, policy)| TunnelGrant {
                    name,
                    public_urls,
                    settings,
                    queued,
                    policy,
                },
            );
        prop_oneof![
            (
                any::<u16>(),
                ".{0,16}",
                ".{0,16}",
                vec(tunnel(), 0..3),
                settings(),
                policy_request()
            )
                .prop_map(|(version, token, agent_id, tunnels, settings, policy)| {
                    AnyFrame::Hello(Hello {
                        version,
                        token,
                        agent_id,
                        tunnels,
                        settings,
                        policy,
                    })
                }),
            Just(AnyFrame::AgentToRelay(AgentToRelay::Goodbye)),
            (any::<u16>(), vec(grant, 0..3)).prop_map(|(relay_version, tunnels)| {
                AnyFrame::RelayToAgent(RelayToAgent::Welcome {
                    relay_version,
                    tunnels,
                })
            }),
            (reject_reason(), ".{0,24}").prop_map(|(reason, message)| {
                AnyFrame::RelayToAgent(RelayToAgent::Rejected { reason, message })
            }),
            any::<u32>().prop_map(|window| AnyFrame::QueueOpen(QueueOpen { window })),
            (request_head(), any::<u64>()).prop_map(|(head, body_len)| {
                AnyFrame::QueuedDelivery(QueuedDelivery { head, body_len })
            }),
            delivery_id().prop_map(|up_to| AnyFrame::QueueAck(QueueAck { up_to })),
            request_head().prop_map(AnyFrame::RequestHead),
            (any::<u16>(), headers()).prop_map(|(status, headers)| {
                AnyFrame::AgentReply(AgentReply::Response(ResponseHead { status, headers }))
            }),
            (failure_kind(), ".{0,24}").prop_map(|(kind, message)| {
                AnyFrame::AgentReply(AgentReply::Failed { kind, message })
            }),
        ]
    }

    /// Decodes `bytes` as `T` and checks that a frame consumed exactly its
    /// own bytes and that anything else consumed nothing.
    fn decodes_within_bounds<T: DeserializeOwned>(bytes: &[u8]) -> Result<(), TestCaseError> {
        let mut buf = BytesMut::from(bytes);
        match decode::<T>(&mut buf) {
            Ok(Some(_)) => {
                let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
                prop_assert!(len <= MAX_FRAME_LEN);
                prop_assert_eq!(&buf[..], &bytes[LEN_PREFIX + len..]);
            }
            Ok(None) | Err(_) => prop_assert_eq!(&buf[..], bytes),
        }
        Ok(())
    }

    /// An `AsyncRead` that hands out its bytes in the given chunk sizes (then
    /// the rest at once) and never waits, so a test can poll it without a
    /// runtime.
    struct Chunked<'a> {
        data: &'a [u8],
        sizes: std::vec::IntoIter<usize>,
    }

    impl AsyncRead for Chunked<'_> {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let size = this.sizes.next().unwrap_or(usize::MAX).max(1);
            let n = size.min(this.data.len()).min(buf.remaining());
            let (now, later) = this.data.split_at(n);
            buf.put_slice(now);
            this.data = later;
            Poll::Ready(Ok(()))
        }
    }

    /// Runs a future that never waits (its reader is [`Chunked`]).
    fn ready<F: Future>(f: F) -> F::Output {
        match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(out) => out,
            Poll::Pending => panic!("a Chunked reader never waits"),
        }
    }

    /// `bytes` cut at the given positions, in order, empty pieces dropped.
    fn cut(bytes: &[u8], at: &[Index]) -> Vec<usize> {
        let mut points: Vec<usize> = at.iter().map(|i| i.index(bytes.len() + 1)).collect();
        points.push(0);
        points.push(bytes.len());
        points.sort_unstable();
        points.dedup();
        points.windows(2).map(|w| w[1] - w[0]).collect()
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_nor_read_past_their_frame(
            bytes in prop_oneof![
                vec(any::<u8>(), 0..512),
                // A plausible prefix, so that payloads get decoded too.
                (0u32..600, vec(any::<u8>(), 0..512)).prop_map(|(len, rest)| {
                    let mut b = len.to_be_bytes().to_vec();
                    b.extend(rest);
                    b
                }),
            ]
        ) {
            decodes_within_bounds::<Hello>(&bytes)?;
            decodes_within_bounds::<AgentToRelay>(&bytes)?;
            decodes_within_bounds::<RelayToAgent>(&bytes)?;
            decodes_within_bounds::<QueueOpen>(&bytes)?;
            decodes_within_bounds::<QueuedDelivery>(&bytes)?;
            decodes_within_bounds::<QueueAck>(&bytes)?;
            decodes_within_bounds::<RequestHead>(&bytes)?;
            decodes_within_bounds::<AgentReply>(&bytes)?;
            decodes_within_bounds::<TunnelName>(&bytes)?;
            if bytes.len() >= LEN_PREFIX {
                let _ = decode_prefix::<HelloVersion>(&bytes[LEN_PREFIX..]);
            }
        }

        #[test]
        fn every_frame_type_round_trips(frame in any_frame(), tail in vec(any::<u8>(), 0..32)) {
            let mut buf = BytesMut::new();
            frame.encode(&mut buf).expect("small messages encode");
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            prop_assert_eq!(len, buf.len() - LEN_PREFIX);
            let bytes = buf.to_vec();
            if let AnyFrame::Hello(hello) = &frame {
                let version: HelloVersion = decode_prefix(&bytes[LEN_PREFIX..]).expect("a hello's version");
                prop_assert_eq!(version.version, hello.version);
            }
            // Bytes after the frame (a body, the next frame) stay where they are.
            buf.extend_from_slice(&tail);
            prop_assert_eq!(frame.decode_same(&mut buf)?, Some(frame.clone()));
            prop_assert_eq!(&buf[..], &tail[..]);
            let mut reader = Chunked { data: &bytes, sizes: Vec::new().into_iter() };
            prop_assert_eq!(frame.read_same(&mut reader)?, Some(frame.clone()));
            prop_assert!(reader.data.is_empty());
        }

        #[test]
        fn frames_split_anywhere_decode_identically(
            frames in vec(any_frame(), 1..6),
            at in vec(any::<Index>(), 0..12),
        ) {
            let mut stream = BytesMut::new();
            for f in &frames {
                f.encode(&mut stream).expect("small messages encode");
            }
            let sizes = cut(&stream, &at);

            // Decoder: bytes arrive chunk by chunk; decode whatever is complete.
            let mut decoded = Vec::new();
            let mut buf = BytesMut::new();
            let mut offset = 0;
            for size in &sizes {
                buf.extend_from_slice(&stream[offset..offset + size]);
                offset += size;
                while let Some(next) = frames.get(decoded.len()) {
                    match next.decode_same(&mut buf)? {
                        Some(frame) => decoded.push(frame),
                        None => break,
                    }
                }
            }
            prop_assert_eq!(&decoded, &frames);
            prop_assert!(buf.is_empty());
            let mut codec = FrameCodec::<AgentToRelay>::new();
            prop_assert!(tokio_util::codec::Decoder::decode_eof(&mut codec, &mut buf)?.is_none());

            // Reader: the same chunks from a stream, one frame per call.
            let mut reader = Chunked { data: &stream, sizes: sizes.clone().into_iter() };
            let mut read = Vec::new();
            for f in &frames {
                read.push(f.read_same(&mut reader)?);
            }
            prop_assert_eq!(read, frames.iter().cloned().map(Some).collect::<Vec<_>>());
            prop_assert!(ready(read_payload(&mut reader))?.is_none(), "clean end after the last frame");
        }

        #[test]
        fn oversized_length_prefixes_are_refused_without_allocating(
            len in (MAX_FRAME_LEN as u32 + 1)..=u32::MAX,
            tail in vec(any::<u8>(), 0..64),
            at in vec(any::<Index>(), 0..4),
        ) {
            let mut bytes = len.to_be_bytes().to_vec();
            bytes.extend_from_slice(&tail);
            let mut buf = BytesMut::from(&bytes[..]);
            let capacity = buf.capacity();
            let refused = matches!(
                decode::<RequestHead>(&mut buf),
                Err(CodecError::TooLarge { len: l }) if l == len as usize
            );
            prop_assert!(refused);
            prop_assert_eq!(buf.capacity(), capacity, "reserved room for the frame");
            prop_assert_eq!(&buf[..], &bytes[..]);

            // The reader stops at the prefix, however it arrives.
            let mut reader = Chunked { data: &bytes, sizes: cut(&bytes[..LEN_PREFIX], &at).into_iter() };
            let refused = matches!(
                ready(read_payload(&mut reader)),
                Err(CodecError::TooLarge { len: l }) if l == len as usize
            );
            prop_assert!(refused);
            prop_assert_eq!(reader.data, &tail[..], "read past the length prefix");
        }

        /// Header values written as byte strings (`raw_headers`) are the bytes
        /// the plain `Vec<u8>` fields wrote, in postcard (the wire, the relay's
        /// queue) and serde_json (the agent's outbox), and either reads back:
        /// relays, agents and stores from before the change understand it. The
        /// relay's borrowed head (`RequestHeadRef`) writes the same bytes too.
        #[test]
        fn heads_encode_as_with_plain_byte_vectors(head in request_head(), status in any::<u16>()) {
            #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
            struct PlainResponseHead {
                status: u16,
                headers: Vec<(String, Vec<u8>)>,
            }
            #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
            struct PlainRequestHead {
                delivery_id: DeliveryId,
                tunnel: TunnelName,
                method: String,
                path: String,
                headers: Vec<(String, Vec<u8>)>,
                remote_addr: SocketAddr,
                public_url: String,
                received_at_ms: u64,
                timeout_ms: u64,
                body_len: Option<u64>,
            }
            let plain = PlainRequestHead {
                delivery_id: head.delivery_id,
                tunnel: head.tunnel.clone(),
                method: head.method.clone(),
                path: head.path.clone(),
                headers: head.headers.clone(),
                remote_addr: head.remote_addr,
                public_url: head.public_url.clone(),
                received_at_ms: head.received_at_ms,
                timeout_ms: head.timeout_ms,
                body_len: head.body_len,
            };
            let wire = postcard::to_stdvec(&head).expect("postcard");
            prop_assert_eq!(&wire, &postcard::to_stdvec(&plain).expect("postcard"));
            prop_assert_eq!(&postcard::from_bytes::<RequestHead>(&wire).expect("decode"), &head);
            let json = serde_json::to_vec(&head).expect("json");
            prop_assert_eq!(&json, &serde_json::to_vec(&plain).expect("json"));
            prop_assert_eq!(&serde_json::from_slice::<RequestHead>(&json).expect("decode"), &head);

            // The relay's borrowed head writes the same bytes, and owns back to the head.
            let headers: Vec<(&str, std::borrow::Cow<'_, [u8]>)> = head
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), std::borrow::Cow::Borrowed(&v[..])))
                .collect();
            let borrowed = crate::protocol::RequestHeadRef {
                delivery_id: head.delivery_id,
                tunnel: &head.tunnel,
                method: &head.method,
                path: &head.path,
                headers: &headers,
                remote_addr: head.remote_addr,
                public_url: &head.public_url,
                received_at_ms: head.received_at_ms,
                timeout_ms: head.timeout_ms,
                body_len: head.body_len,
            };
            prop_assert_eq!(&postcard::to_stdvec(&borrowed).expect("postcard"), &wire);
            prop_assert_eq!(&serde_json::to_vec(&borrowed).expect("json"), &json);
            prop_assert_eq!(&borrowed.to_owned_head(), &head);

            let reply = ResponseHead { status, headers: head.headers.clone() };
            let plain = PlainResponseHead { status, headers: head.headers };
            let wire = postcard::to_stdvec(&reply).expect("postcard");
            prop_assert_eq!(&wire, &postcard::to_stdvec(&plain).expect("postcard"));
            prop_assert_eq!(&postcard::from_bytes::<ResponseHead>(&wire).expect("decode"), &reply);
            let json = serde_json::to_vec(&reply).expect("json");
            prop_assert_eq!(&json, &serde_json::to_vec(&plain).expect("json"));
            prop_assert_eq!(&serde_json::from_slice::<ResponseHead>(&json).expect("decode"), &reply);
        }
    }
}
