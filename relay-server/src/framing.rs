//! A second look at HTTP/1 request framing, taken from the bytes as they reach
//! hyper, to refuse a request that carries both `Content-Length` and
//! `Transfer-Encoding`.
//!
//! hyper follows RFC 9112 §6.1 for such a request: it frames the body by
//! `chunked`, drops the `Content-Length` before the request reaches the
//! service and closes the connection after the answer. That is safe for the
//! relay itself, but a proxy in front of it may have framed the same bytes by
//! length, and the request leaves no trace of the dropped header. So a
//! [`Scanner`] on the connection's incoming bytes (the edge feeds it what
//! hyper reads) follows request boundaries on its own: it parses each request
//! head with httparse, then skips the body by its length or by its chunks
//! (the chunk grammar is hyper's, byte for byte). The first ambiguous head's
//! number on the connection is recorded in [`Ambiguity`]; the service counts
//! requests as hyper hands them over and refuses that one (hyper closes the
//! connection after it anyway, so there is never a second).
//!
//! hyper stays the authority on framing: the scanner only adds a refusal.
//! When it meets anything it does not follow (bytes hyper will refuse too,
//! HTTP/2, an upgrade, a head over the size limit) it stops looking, and every
//! later request goes through as hyper framed it.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use crate::edge::{MAX_HEADERS, MAX_HEAD_BYTES};

/// No ambiguous head seen.
const NONE: u64 = u64::MAX;

/// Shared by a connection's [`Scanner`] and its service: the number
/// (from 0) of the first request on the connection whose head had both
/// `Content-Length` and `Transfer-Encoding`, and how many requests the service
/// has taken so far.
#[derive(Debug)]
pub(crate) struct Ambiguity {
    first_ambiguous: AtomicU64,
    taken: AtomicU64,
}

impl Default for Ambiguity {
    fn default() -> Self {
        Ambiguity {
            first_ambiguous: AtomicU64::new(NONE),
            taken: AtomicU64::new(0),
        }
    }
}

impl Ambiguity {
    /// Called once per request hyper hands to the service, in order: whether
    /// that request's head was ambiguous. Only for HTTP/1 requests.
    pub(crate) fn next_request_is_ambiguous(&self) -> bool {
        let n = self.taken.fetch_add(1, Ordering::Relaxed);
        // The scanner saw the head before hyper parsed it from the same bytes.
        self.first_ambiguous.load(Ordering::Acquire) == n
    }
}

/// Marks a request whose head had both `Content-Length` and
/// `Transfer-Encoding` (an extension the ingress refuses with `400`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AmbiguousFraming;

/// Where the scanner is in the byte stream.
#[derive(Debug)]
enum State {
    /// Before or inside a request head; the bytes of an incomplete head.
    Head(Vec<u8>),
    /// Inside a body framed by `Content-Length`: bytes left.
    Fixed(u64),
    /// Chunked body states, as hyper's `ChunkedState`.
    Size(u64),
    SizeLws(u64),
    Extension(u64),
    SizeLf(u64),
    Body(u64),
    BodyCr,
    BodyLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
    /// Not following any more.
    Lost,
}

/// The framing scanner of one connection: fed every byte hyper reads, in
/// order.
#[derive(Debug)]
pub(crate) struct Scanner {
    state: State,
    /// Heads parsed so far.
    heads: u64,
    ambiguity: Arc<Ambiguity>,
}

impl Scanner {
    pub(crate) fn new(ambiguity: Arc<Ambiguity>) -> Self {
        Scanner {
            state: State::Head(Vec::new()),
            heads: 0,
            ambiguity,
        }
    }

    /// Follows `data`, the next bytes of the connection.
    pub(crate) fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Lost => return,
                State::Head(buf) => {
                    let consumed = if buf.is_empty() {
                        // The common case: a whole head in one read, parsed in place.
                        match self.head(data) {
                            Some(n) => n,
                            None => {
                                if let State::Head(buf) = &mut self.state {
                                    buf.extend_from_slice(&data[..data.len().min(HEAD_CAP)]);
                                }
                                return;
                            }
                        }
                    } else {
                        let old = buf.len();
                        let take = data.len().min(HEAD_CAP.saturating_sub(old));
                        buf.extend_from_slice(&data[..take]);
                        let joined = std::mem::take(buf);
                        match self.head(&joined) {
                            Some(n) => n.saturating_sub(old),
                            None => {
                                if let State::Head(buf) = &mut self.state {
                                    *buf = joined;
                                }
                                return;
                            }
                        }
                    };
                    data = &data[consumed.min(data.len())..];
                }
                State::Fixed(left) | State::Body(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.state = match self.state {
                            State::Fixed(_) => State::Head(Vec::new()),
                            _ => State::BodyCr,
                        };
                    }
                }
                _ => {
                    self.chunk_byte(data[0]);
                    data = &data[1..];
                }
            }
        }
    }

    /// Parses a head at the start of `bytes`: `Some(length)` when complete
    /// (the state then moves past it), `None` when more bytes are needed (or
    /// the scanner gave up: the state says which).
    fn head(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let len = match req.parse(bytes) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if bytes.len() < HEAD_CAP => return None,
            // Too long, too many headers, malformed or HTTP/2's preface: hyper
            // answers (or serves) these itself.
            _ => {
                self.state = State::Lost;
                return None;
            }
        };
        let number = self.heads;
        self.heads += 1;
        let mut te: Option<&[u8]> = None;
        let mut cl: Option<&[u8]> = None;
        let mut cl_count = 0;
        let mut upgrade = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                // hyper looks at the last one; any but one plain `chunked` is
                // refused by it or by the ingress.
                te = Some(h.value);
            } else if h.name.eq_ignore_ascii_case("content-length") {
                cl = Some(h.value);
                cl_count += 1;
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        if te.is_some() && cl.is_some() {
            // Only the first one matters: hyper closes the connection after it.
            let _ = self.ambiguity.first_ambiguous.compare_exchange(
                NONE,
                number,
                Ordering::Release,
                Ordering::Relaxed,
            );
            self.state = State::Lost;
            return Some(len);
        }
        // What follows the head.
        self.state = if upgrade || req.method == Some("CONNECT") {
            State::Lost
        } else if let Some(te) = te {
            if req.version == Some(1) && is_chunked(te) {
                State::Size(0)
            } else {
                State::Lost
            }
        } else if let Some(cl) = cl {
            match parse_length(cl) {
                Some(0) => State::Head(Vec::new()),
                Some(n) if cl_count == 1 => State::Fixed(n),
                _ => State::Lost,
            }
        } else {
            State::Head(Vec::new())
        };
        Some(len)
    }

    /// One byte of a chunked body outside chunk data, as hyper reads it.
    fn chunk_byte(&mut self, b: u8) {
        self.state = match (&self.state, b) {
            (State::Size(size), _) if b.is_ascii_hexdigit() => (b as char)
                .to_digit(16)
                .and_then(|d| size.checked_mul(16)?.checked_add(u64::from(d)))
                .map_or(State::Lost, State::Size),
            (State::Size(size) | State::SizeLws(size), b'\t' | b' ') => State::SizeLws(*size),
            (State::Size(size) | State::SizeLws(size) | State::Extension(size), b';') => {
                State::Extension(*size)
            }
            (State::Size(size) | State::SizeLws(size) | State::Extension(size), b'\r') => {
                State::SizeLf(*size)
            }
            (State::Extension(_), b'\n') => State::Lost,
            (State::Extension(size), _) => State::Extension(*size),
            (State::SizeLf(0), b'\n') => State::EndCr,
            (State::SizeLf(size), b'\n') => State::Body(*size),
            (State::BodyCr, b'\r') => State::BodyLf,
            (State::BodyLf, b'\n') => State::Size(0),
            (State::EndCr, b'\r') => State::EndLf,
            (State::Trailer, b'\r') => State::TrailerLf,
            (State::EndCr | State::Trailer, _) => State::Trailer,
            (State::TrailerLf, b'\n') => State::EndCr,
            (State::EndLf, b'\n') => State::Head(Vec::new()),
            _ => State::Lost,
        };
    }
}

/// Most bytes of an incomplete head kept: hyper refuses longer heads.
const HEAD_CAP: usize = MAX_HEAD_BYTES + 1024;

/// hyper's test: the last encoding in the list is `chunked`.
fn is_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|b| *b == b',')
        .next()
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

fn parse_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` split at every `step` bytes; the number of the first
    /// ambiguous head (if any) and whether the scanner still follows.
    fn scan(bytes: &[u8], step: usize) -> (Option<u64>, bool) {
        let ambiguity = Arc::new(Ambiguity::default());
        let mut scanner = Scanner::new(ambiguity.clone());
        for piece in bytes.chunks(step) {
            scanner.feed(piece);
        }
        let first = ambiguity.first_ambiguous.load(Ordering::Relaxed);
        (
            (first != NONE).then_some(first),
            !matches!(scanner.state, State::Lost),
        )
    }

    fn every_split(bytes: &[u8]) -> (Option<u64>, bool) {
        let whole = scan(bytes, bytes.len().max(1));
        for step in 1..bytes.len().min(64) {
            assert_eq!(scan(bytes, step), whole, "split every {step} bytes");
        }
        whole
    }

    const CHUNKED: &str = "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
        5\r\nhello\r\n1a;ext=\"Content-Length: 3\"\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: 1\r\n\r\n";
    const FIXED: &str = "POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 44\r\n\r\n\
        POST /c HTTP/1.1\r\nTransfer-Encoding: chunked";
    const PLAIN: &str = "GET /c HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn well_framed_requests_are_followed_across_any_split() {
        let stream = [CHUNKED, FIXED, PLAIN, "\r\n", CHUNKED, PLAIN].concat();
        assert_eq!(every_split(stream.as_bytes()), (None, true));
    }

    #[test]
    fn the_first_ambiguous_head_is_numbered_whatever_the_header_order() {
        for extra in [
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            "transfer-encoding: chunked\r\ncontent-length: 0\r\n",
        ] {
            let ambiguous = format!("POST /d HTTP/1.1\r\n{extra}\r\n0\r\n\r\n");
            let stream = [CHUNKED, FIXED, PLAIN, &ambiguous, PLAIN].concat();
            assert_eq!(every_split(stream.as_bytes()), (Some(3), false), "{extra}");
        }
    }

    #[test]
    fn a_body_that_looks_like_an_ambiguous_head_is_skipped() {
        let inner = "POST /e HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let fixed = format!(
            "POST /f HTTP/1.1\r\nContent-Length: {}\r\n\r\n{inner}",
            inner.len()
        );
        let chunked = format!(
            "POST /g HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{inner}\r\n0\r\n\r\n",
            inner.len()
        );
        let stream = [fixed.as_str(), &chunked, PLAIN].concat();
        assert_eq!(every_split(stream.as_bytes()), (None, true));
    }

    #[test]
    fn what_hyper_refuses_or_serves_otherwise_stops_the_scanner() {
        for bad in [
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "POST /h HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "POST /h HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXY",
            "POST /h HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;a\nb\r\n",
            "POST /h HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST /h HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST /h HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
            "GET /h HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "POST /h HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
        ] {
            let stream = [bad, PLAIN].concat();
            assert_eq!(every_split(stream.as_bytes()), (None, false), "{bad:?}");
        }
        let long = format!("GET / HTTP/1.1\r\nX-Long: {}\r\n", "a".repeat(HEAD_CAP));
        assert_eq!(scan(long.as_bytes(), 4096), (None, false));
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_any_split_agrees() {
        // Mutations of well-framed traffic (the interesting inputs), from a
        // fixed xorshift seed so a failure reproduces.
        let base = [CHUNKED, FIXED, PLAIN, CHUNKED].concat().into_bytes();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..300 {
            let mut bytes = base.clone();
            for _ in 0..(next() % 4) {
                let at = (next() as usize) % bytes.len();
                bytes[at] = b"\r\n0123456789abcdef;: \t\x00\xff"[(next() % 23) as usize];
            }
            every_split(&bytes);
        }
    }

    #[test]
    fn the_service_side_counts_requests_in_order() {
        let ambiguity = Ambiguity::default();
        ambiguity.first_ambiguous.store(2, Ordering::Relaxed);
        let seen: Vec<bool> = (0..4)
            .map(|_| ambiguity.next_request_is_ambiguous())
            .collect();
        assert_eq!(seen, [false, false, true, false]);
    }
}
