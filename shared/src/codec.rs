//! Frame layout: a 4-byte big-endian length, then that many bytes of postcard.
//!
//! This module alone knows the byte layout. Every decoder checks the length
//! against [`MAX_FRAME_LEN`] before allocating, and hostile bytes come back as a
//! [`CodecError`], never a panic.

use std::{io, marker::PhantomData};

use bytes::{Buf, BufMut, BytesMut};
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
    let payload = postcard::to_allocvec(msg).map_err(CodecError::Malformed)?;
    if payload.len() > MAX_FRAME_LEN {
        return Err(CodecError::TooLarge { len: payload.len() });
    }
    dst.reserve(LEN_PREFIX + payload.len());
    dst.put_u32(payload.len() as u32);
    dst.put_slice(&payload);
    Ok(())
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
    let mut buf = BytesMut::new();
    encode(msg, &mut buf)?;
    w.write_all(&buf).await?;
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
    use crate::protocol::{AgentReply, Hello, RelayToAgent, RequestHead, ResponseHead};
    use crate::{DeliveryId, TunnelName};
    use proptest::prelude::*;

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
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode::<RequestHead>(&mut buf);
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode::<Hello>(&mut buf);
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode::<AgentReply>(&mut buf);
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode::<RelayToAgent>(&mut buf);
        }

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
}
