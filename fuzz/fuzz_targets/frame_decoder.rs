//! Arbitrary bytes into the frame codec, as one buffer, as a stream cut into
//! chunks, and through the async reader. All three must agree on every frame
//! and on how the stream ends, and every decoded frame must survive a round
//! trip. Input: one byte picks the message type, one seeds the chunk sizes,
//! the rest is the stream.

#![no_main]

use std::{
    fmt::Debug,
    future::Future,
    io,
    pin::{pin, Pin},
    task::{Context, Poll, Waker},
};

use bytes::BytesMut;
use hookrelay_shared::{
    codec::{self, CodecError},
    protocol::HelloVersion,
    AgentReply, AgentToRelay, FrameCodec, Hello, QueueAck, QueueOpen, QueuedDelivery, RelayToAgent,
    RequestHead, TunnelName, MAX_FRAME_LEN,
};
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let [kind, seed, stream @ ..] = data else {
        return;
    };
    let chunks = Chunks::new(*seed);
    match kind % 9 {
        0 => check::<Hello>(stream, chunks),
        1 => check::<AgentToRelay>(stream, chunks),
        2 => check::<RelayToAgent>(stream, chunks),
        3 => check::<QueueOpen>(stream, chunks),
        4 => check::<QueuedDelivery>(stream, chunks),
        5 => check::<QueueAck>(stream, chunks),
        6 => check::<RequestHead>(stream, chunks),
        7 => check::<AgentReply>(stream, chunks),
        _ => check::<TunnelName>(stream, chunks),
    }
});

/// How a stream of frames ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// No complete frame left; this many bytes wait for more.
    NeedMore(usize),
    /// An error, described without its source (errors are not `PartialEq`).
    Error(String),
}

fn describe(err: &CodecError) -> String {
    match err {
        CodecError::TooLarge { len } => {
            assert!(*len > MAX_FRAME_LEN, "refused a frame within the limit");
            format!("too large: {len}")
        }
        CodecError::Truncated => "truncated".into(),
        CodecError::Malformed(_) => "malformed".into(),
        CodecError::Io(_) => "io".into(),
    }
}

/// Every frame in `buf`, in order, and how the stream ended.
fn decode_all<T: DeserializeOwned>(buf: &mut BytesMut, out: &mut Vec<T>) -> Option<End> {
    loop {
        let before = buf.clone();
        match codec::decode::<T>(buf) {
            Ok(Some(msg)) => {
                // Exactly one frame was consumed: its prefix and payload.
                let len = u32::from_be_bytes([before[0], before[1], before[2], before[3]]) as usize;
                assert_eq!(buf[..], before[4 + len..], "consumed more than one frame");
                out.push(msg);
            }
            Ok(None) => {
                assert_eq!(buf[..], before[..], "consumed bytes without a frame");
                return None;
            }
            Err(err) => {
                assert_eq!(buf[..], before[..], "consumed bytes of a bad frame");
                return Some(End::Error(describe(&err)));
            }
        }
    }
}

fn check<T>(stream: &[u8], chunks: Chunks)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    // The whole stream at once.
    let mut whole = Vec::<T>::new();
    let mut buf = BytesMut::from(stream);
    let whole_end = decode_all(&mut buf, &mut whole).unwrap_or(End::NeedMore(buf.len()));
    if let End::NeedMore(left) = whole_end {
        // At EOF, leftover bytes are a torn frame.
        let eof = FrameCodec::<T>::new().decode_eof(&mut buf);
        assert_eq!(eof.is_ok(), left == 0, "decode_eof with {left} bytes left");
    }

    // The same bytes arriving in chunks.
    let mut streamed = Vec::<T>::new();
    let mut buf = BytesMut::new();
    let mut rest = stream;
    let mut streamed_end = None;
    for size in chunks.clone() {
        if rest.is_empty() {
            break;
        }
        let (now, later) = rest.split_at(size.min(rest.len()));
        buf.extend_from_slice(now);
        rest = later;
        if let Some(end) = decode_all(&mut buf, &mut streamed) {
            streamed_end = Some(end);
            break;
        }
    }
    let streamed_end = streamed_end.unwrap_or(End::NeedMore(buf.len()));
    assert_eq!(streamed, whole, "chunked decoding disagrees");
    assert_eq!(streamed_end, whole_end, "chunked decoding ends differently");

    // The async reader, one frame per call, fed in chunks.
    let mut reader = ChunkedReader {
        data: stream,
        chunks,
    };
    let mut read = Vec::<T>::new();
    let read_end = loop {
        match ready(codec::read_frame::<T, _>(&mut reader)) {
            Ok(Some(msg)) => read.push(msg),
            Ok(None) => break End::NeedMore(0),
            Err(err) => break End::Error(describe(&err)),
        }
    };
    assert_eq!(read, whole, "read_frame disagrees");
    let expected = match whole_end {
        End::NeedMore(n) if n > 0 => End::Error("truncated".into()),
        other => other,
    };
    assert_eq!(read_end, expected, "read_frame ends differently");

    // Whatever decoded encodes again, to a frame that decodes to the same.
    for msg in &whole {
        let mut buf = BytesMut::new();
        codec::encode(msg, &mut buf).expect("a decoded frame re-encodes within the limit");
        // The relay reads the version of any hello-shaped payload first.
        let _ = codec::decode_prefix::<HelloVersion>(&buf[4..]);
        let back: T = codec::decode(&mut buf)
            .expect("a re-encoded frame decodes")
            .expect("a re-encoded frame is complete");
        assert_eq!(&back, msg, "round trip changed the message");
        assert!(buf.is_empty(), "round trip left bytes behind");
    }
    if stream.len() >= 4 {
        let _ = codec::decode_prefix::<HelloVersion>(&stream[4..]);
    }
}

/// Chunk sizes from 1 to 64 bytes, a small xorshift sequence per seed.
#[derive(Clone)]
struct Chunks(u32);

impl Chunks {
    fn new(seed: u8) -> Self {
        Chunks(u32::from(seed).wrapping_mul(2_654_435_761) | 1)
    }
}

impl Iterator for Chunks {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        Some(1 + (self.0 % 64) as usize)
    }
}

/// An `AsyncRead` that hands out its bytes in the given chunk sizes and never
/// waits.
struct ChunkedReader<'a> {
    data: &'a [u8],
    chunks: Chunks,
}

impl AsyncRead for ChunkedReader<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let size = this.chunks.next().unwrap_or(1);
        let n = size.min(this.data.len()).min(buf.remaining());
        let (now, later) = this.data.split_at(n);
        buf.put_slice(now);
        this.data = later;
        Poll::Ready(Ok(()))
    }
}

/// Runs a future whose reader never waits.
fn ready<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("the chunked reader never waits"),
    }
}
