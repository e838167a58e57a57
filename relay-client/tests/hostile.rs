//! Hostile senders at the public HTTP ingress, and hostile answers from the
//! local app behind the tunnel (SECURITY.md §3.3). Every case
//! is a bounded loop on loopback with a named outcome (a status code or a
//! closed connection), and while it runs a well-formed webhook through a real
//! agent to a real local app still gets its 200 in good time.
//!
//! Malformed HTTP goes over raw `TcpStream`s bound to 127.0.0.2, so the
//! per-IP connection cap the relay applies to the attacker never touches the
//! good sender on 127.0.0.1 (Linux routes all of 127/8 to `lo`).

mod common;

use std::{
    future::Future,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::*;
use futures_util::{stream, StreamExt};
use http::{Request, StatusCode};
use relay_client::Agent;
use relay_server::Config as RelayConfig;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

/// The good webhook must be answered within this, attack or not.
const GOOD_BOUND: Duration = Duration::from_secs(10);

/// The attacker's source address.
const HOSTILE_IP: [u8; 4] = [127, 0, 0, 2];

/// What a hostile connection got.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// A response with this status (what follows it is not read).
    Status(u16),
    /// EOF or a reset before any response.
    Closed,
    /// Neither, within the time allowed.
    Open,
}

/// A relay with the tweaks, a local app and an agent holding tunnel `alice`.
struct Setup {
    relay: TestRelay,
    app: TestApp,
    _agent: Agent,
}

impl Setup {
    async fn new(tweak: impl FnOnce(&mut RelayConfig)) -> anyhow::Result<Setup> {
        let app = TestApp::spawn().await?;
        let relay = TestRelay::spawn_with(tweak).await?;
        let agent = relay.agent("alice", &app.target()).await?;
        Ok(Setup {
            relay,
            app,
            _agent: agent,
        })
    }

    fn addr(&self) -> SocketAddr {
        self.relay.http_addr()
    }

    /// Runs `attack` as a task and, while it runs, sends a good webhook that
    /// must get 200 within [`GOOD_BOUND`]; then waits for the attack's result.
    async fn while_attacked<T: Send + 'static>(
        &self,
        attack: impl Future<Output = anyhow::Result<T>> + Send + 'static,
    ) -> anyhow::Result<T> {
        let attack = tokio::spawn(attack);
        // Let the attack get going first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let (status, _, body) = post(&self.relay.url("alice", "/good"), "{\"good\":true}").await?;
        let took = started.elapsed();
        assert_eq!(
            status,
            StatusCode::OK,
            "the good webhook during the attack: {body:?}"
        );
        assert!(took < GOOD_BOUND, "the good webhook took {took:?}");
        assert!(
            self.app.received().iter().any(|r| r.uri == "/good"),
            "the app got the good webhook"
        );
        tokio::time::timeout(Duration::from_secs(40), attack).await??
    }

    /// Paths the app received.
    fn received_paths(&self) -> Vec<String> {
        self.app.received().into_iter().map(|r| r.uri).collect()
    }
}

async fn hostile_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind((HOSTILE_IP, 0).into())?;
    socket.connect(addr).await
}

/// Reads until a status line, EOF or reset, for at most `within`.
async fn outcome(stream: &mut TcpStream, within: Duration) -> Outcome {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return status_of(&buf).map_or(Outcome::Closed, Outcome::Status),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if let Some(status) = status_of(&buf) {
                return Outcome::Status(status);
            }
        }
    })
    .await;
    read.unwrap_or(Outcome::Open)
}

fn status_of(buf: &[u8]) -> Option<u16> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[..line_end]).ok()?;
    line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// The status codes of every response read until the peer closes (or
/// `within` passes).
async fn statuses_until_closed(stream: &mut TcpStream, within: Duration) -> Vec<u16> {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(within, stream.read_to_end(&mut buf)).await;
    let mut statuses = Vec::new();
    let mut rest = &buf[..];
    while let Some(at) = rest.windows(9).position(|w| w == b"HTTP/1.1 ") {
        rest = &rest[at..];
        statuses.extend(status_of(rest));
        rest = &rest[9..];
    }
    statuses
}

/// Whether the peer closes the connection within `within` (whatever it sends first).
async fn closes(stream: &mut TcpStream, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Sends `head` (and whatever follows it) on a fresh hostile connection and
/// returns the outcome. Write errors are ignored: the relay may close first.
async fn raw(addr: SocketAddr, bytes: Vec<u8>, within: Duration) -> anyhow::Result<Outcome> {
    let mut stream = hostile_connect(addr).await?;
    let (mut rd, mut wr) = stream.split();
    let write = async {
        let _ = wr.write_all(&bytes).await;
    };
    let read = async {
        let mut s = ReadHalfOutcome(&mut rd);
        s.outcome(within).await
    };
    let ((), got) = tokio::join!(write, read);
    Ok(got)
}

/// [`outcome`] on a read half.
/// Declares a `content_length` body on `path`, then sends it one byte every
/// `every`, at most `bytes` of them; what the relay answered, and how long
/// after the first byte. `Outcome::Open` when the bytes ran out unanswered.
async fn trickle(
    addr: SocketAddr,
    path: &str,
    content_length: usize,
    every: Duration,
    bytes: usize,
) -> anyhow::Result<(Outcome, Duration)> {
    let mut s = hostile_connect(addr).await?;
    s.write_all(&head(
        path,
        &format!("Content-Length: {content_length}\r\n"),
    ))
    .await?;
    let (mut rd, mut wr) = s.split();
    let sending = async {
        for _ in 0..bytes {
            if wr.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(every).await;
        }
    };
    let started = Instant::now();
    let mut reader = ReadHalfOutcome(&mut rd);
    let got = tokio::select! {
        () = sending => Outcome::Open,
        got = reader.outcome(every * bytes as u32 + WAIT) => got,
    };
    Ok((got, started.elapsed()))
}

struct ReadHalfOutcome<'a, 'b>(&'a mut tokio::net::tcp::ReadHalf<'b>);

impl ReadHalfOutcome<'_, '_> {
    async fn outcome(&mut self, within: Duration) -> Outcome {
        let mut buf = Vec::new();
        tokio::time::timeout(within, async {
            let mut chunk = [0u8; 4096];
            loop {
                match self.0.read(&mut chunk).await {
                    Ok(0) | Err(_) => {
                        return status_of(&buf).map_or(Outcome::Closed, Outcome::Status)
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                if let Some(status) = status_of(&buf) {
                    return Outcome::Status(status);
                }
            }
        })
        .await
        .unwrap_or(Outcome::Open)
    }
}

fn head(path: &str, extra: &str) -> Vec<u8> {
    format!("POST {path} HTTP/1.1\r\nHost: relay.test\r\n{extra}\r\n").into_bytes()
}

/// 1. Oversized and lying bodies.
#[tokio::test]
async fn oversized_and_lying_bodies_are_refused() -> anyhow::Result<()> {
    let setup = Setup::new(|c| {
        c.body_limit_bytes = 1 << 20;
        c.body_timeout = Duration::from_secs(1);
    })
    .await?;
    let addr = setup.addr();
    setup
        .while_attacked(async move {
            // 26 MiB declared: 413 after the head alone, before any body byte.
            for _ in 0..20 {
                let mut s = hostile_connect(addr).await?;
                s.write_all(&head("/t/alice/big", "Content-Length: 27262976\r\n"))
                    .await?;
                assert_eq!(outcome(&mut s, WAIT).await, Outcome::Status(413));
            }

            // Endless chunked body: 413 once 1 MiB has arrived (at most 4 MiB sent).
            let mut s = hostile_connect(addr).await?;
            let (mut rd, mut wr) = s.split();
            let write = async {
                let _ = wr
                    .write_all(&head("/t/alice/endless", "Transfer-Encoding: chunked\r\n"))
                    .await;
                let chunk = [b'x'; 64 * 1024];
                for _ in 0..64 {
                    if wr.write_all(b"10000\r\n").await.is_err()
                        || wr.write_all(&chunk).await.is_err()
                        || wr.write_all(b"\r\n").await.is_err()
                    {
                        break;
                    }
                }
            };
            let read = async { ReadHalfOutcome(&mut rd).outcome(WAIT).await };
            let ((), got) = tokio::join!(write, read);
            assert_eq!(got, Outcome::Status(413), "endless chunked body");

            // Declares 10 bytes, sends 5, stalls: 408 after the 1 s body timeout.
            let started = Instant::now();
            let mut s = hostile_connect(addr).await?;
            s.write_all(&head("/t/alice/liar", "Content-Length: 10\r\n"))
                .await?;
            s.write_all(b"hello").await?;
            assert_eq!(outcome(&mut s, WAIT).await, Outcome::Status(408));
            let took = started.elapsed();
            assert!(
                took >= Duration::from_millis(900) && took < Duration::from_secs(5),
                "408 after {took:?}"
            );
            assert!(closes(&mut s, Duration::from_secs(5)).await, "then closed");
            Ok(())
        })
        .await?;
    let paths = setup.received_paths();
    assert!(
        !paths
            .iter()
            .any(|p| p.starts_with("/big") || p.starts_with("/endless") || p.starts_with("/liar")),
        "no refused body reached the app complete: {paths:?}"
    );
    Ok(())
}

/// 2. Slowloris: silent or partial heads, trickled bodies.
#[tokio::test]
async fn slow_senders_are_cut_off() -> anyhow::Result<()> {
    let setup = Setup::new(|c| {
        c.header_timeout = Duration::from_secs(1);
        c.body_timeout = Duration::from_millis(500);
    })
    .await?;
    let addr = setup.addr();
    setup
        .while_attacked(async move {
            let started = Instant::now();
            // 200 connections with a partial header line, 20 that send nothing.
            let outcomes: Vec<anyhow::Result<Outcome>> = stream::iter(0..220)
                .map(|i| async move {
                    let mut s = hostile_connect(addr).await?;
                    if i < 200 {
                        s.write_all(b"POST /t/alice/slow HTTP/1.1\r\nHost: relay.test\r\nX-Slo")
                            .await?;
                    }
                    Ok(outcome(&mut s, Duration::from_secs(6)).await)
                })
                .buffer_unordered(220)
                .collect()
                .await;
            for got in outcomes {
                assert_eq!(got?, Outcome::Closed, "a slow head is closed, unanswered");
            }
            let took = started.elapsed();
            assert!(
                took < Duration::from_secs(5),
                "slow heads cut after {took:?}"
            );

            // One body byte a second against a 500 ms body timeout: 408.
            let (got, took) =
                trickle(addr, "/t/alice/trickle", 100, Duration::from_secs(1), 10).await?;
            assert_eq!(got, Outcome::Status(408), "a trickled body");
            assert!(took < Duration::from_secs(3));

            // A byte every 200 ms never leaves the body idle for 500 ms, but
            // averages 5 bytes/s: cut once the grace (the body timeout) has
            // passed and the bytes so far buy no more time at 1 KiB/s.
            let (got, took) =
                trickle(addr, "/t/alice/drip", 1000, Duration::from_millis(200), 100).await?;
            assert_eq!(got, Outcome::Status(408), "a dripped body");
            assert!(
                took >= Duration::from_millis(400) && took < Duration::from_secs(5),
                "dripped body cut after {took:?}"
            );

            // A kept-alive connection idle after its answer: closed once the
            // next head has not come within the header timeout.
            let mut s = hostile_connect(addr).await?;
            s.write_all(&head("/t/alice/keepalive", "Content-Length: 0\r\n"))
                .await?;
            assert_eq!(outcome(&mut s, WAIT).await, Outcome::Status(200));
            let started = Instant::now();
            assert!(
                closes(&mut s, Duration::from_secs(5)).await,
                "idle keep-alive"
            );
            let took = started.elapsed();
            assert!(took >= Duration::from_millis(500), "closed after {took:?}");
            Ok(())
        })
        .await?;
    assert!(!setup
        .received_paths()
        .iter()
        .any(|p| p.starts_with("/slow") || p.starts_with("/drip")));
    Ok(())
}

/// 3. Many connections from one address: the excess gets 503 and is closed.
#[tokio::test]
async fn connections_over_the_per_ip_cap_are_refused_at_once() -> anyhow::Result<()> {
    let setup = Setup::new(|c| c.max_connections_per_ip = 100).await?;
    let addr = setup.addr();
    setup
        .while_attacked(async move {
            let mut held = Vec::new();
            for _ in 0..100 {
                held.push(hostile_connect(addr).await?);
            }
            let started = Instant::now();
            let refused: Vec<anyhow::Result<Outcome>> = stream::iter(0..1900)
                .map(|_| async move {
                    let mut s = hostile_connect(addr).await?;
                    Ok(outcome(&mut s, Duration::from_secs(5)).await)
                })
                .buffer_unordered(50)
                .collect()
                .await;
            for got in refused {
                assert_eq!(got?, Outcome::Status(503), "over the per-IP cap");
            }
            let took = started.elapsed();
            assert!(
                took < Duration::from_secs(20),
                "1,900 refusals took {took:?}"
            );
            // The 100 admitted connections are still open.
            for s in &mut held {
                assert_eq!(outcome(s, Duration::from_millis(5)).await, Outcome::Open);
            }
            Ok(held)
        })
        .await?;
    Ok(())
}

/// 3b. The total cap, across addresses; slots come back when connections close.
#[tokio::test]
async fn connections_over_the_total_cap_are_refused_until_some_close() -> anyhow::Result<()> {
    let setup = Setup::new(|c| c.max_connections = 20).await?;
    let addr = setup.addr();
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(hostile_connect(addr).await?);
    }
    let socket = TcpSocket::new_v4()?;
    socket.bind(([127, 0, 0, 3], 0).into())?;
    let mut other = socket.connect(addr).await?;
    assert_eq!(
        outcome(&mut other, WAIT).await,
        Outcome::Status(503),
        "another address over the total cap"
    );
    drop(held);
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, _, _) = post(&setup.relay.url("alice", "/after"), "{}").await?;
        if status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "slots never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// 4. Header floods: too many header lines, one huge header.
#[tokio::test]
async fn header_floods_get_431_or_a_closed_connection() -> anyhow::Result<()> {
    let setup = Setup::new(|_| {}).await?;
    let addr = setup.addr();
    setup
        .while_attacked(async move {
            let many: String = (0..10_000).map(|i| format!("X-H{i}: v\r\n")).collect();
            let huge = format!("X-Huge: {}\r\n", "a".repeat(1 << 20));
            let just_over: String = (0..101).map(|i| format!("X-H{i}: v\r\n")).collect();
            for _ in 0..10 {
                for (what, extra) in [("10,000 headers", &many), ("1 MiB header", &huge)] {
                    let got = raw(addr, head("/t/alice/flood", extra), WAIT).await?;
                    assert!(
                        got == Outcome::Status(431) || got == Outcome::Closed,
                        "{what}: {got:?}"
                    );
                }
            }
            // Small enough to be read whole: hyper's answer is exactly 431.
            let got = raw(addr, head("/t/alice/flood", &just_over), WAIT).await?;
            assert_eq!(got, Outcome::Status(431), "101 headers");
            // The head limit (16 KiB): a 12 KiB header goes through, 17 KiB not.
            let fits = format!("X-Big: {}\r\n", "a".repeat(12 * 1024));
            let got = raw(addr, head("/t/alice/fits", &fits), WAIT).await?;
            assert_eq!(got, Outcome::Status(200), "12 KiB head");
            let over = format!("X-Big: {}\r\n", "a".repeat(17 * 1024));
            let got = raw(addr, head("/t/alice/flood", &over), WAIT).await?;
            assert!(
                got == Outcome::Status(431) || got == Outcome::Closed,
                "17 KiB head: {got:?}"
            );
            Ok(())
        })
        .await?;
    let paths = setup.received_paths();
    assert!(!paths.iter().any(|p| p.starts_with("/flood")));
    assert!(paths.iter().any(|p| p == "/fits"), "{paths:?}");
    Ok(())
}

/// 5. Request smuggling: ambiguous framing never reaches the app as sent.
#[tokio::test]
async fn ambiguous_framing_is_refused_and_never_smuggled() -> anyhow::Result<()> {
    let setup = Setup::new(|_| {}).await?;
    let addr = setup.addr();
    let smuggled =
        "POST /t/alice/smuggled HTTP/1.1\r\nHost: relay.test\r\nContent-Length: 0\r\n\r\n";
    setup
        .while_attacked(async move {
            for _ in 0..10 {
                // Refused outright, by hyper or by the relay, with 400; the
                // connection is closed after it.
                for (what, extra, body) in [
                    (
                        "gzip, chunked",
                        "Transfer-Encoding: gzip, chunked\r\n",
                        "0\r\n\r\n",
                    ),
                    (
                        "chunked then identity",
                        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
                        "0\r\n\r\n",
                    ),
                    (
                        "chunked twice",
                        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                        "0\r\n\r\n",
                    ),
                    ("identity", "Transfer-Encoding: identity\r\n", "hello"),
                    (
                        "conflicting Content-Length",
                        "Content-Length: 5\r\nContent-Length: 6\r\n",
                        "hello!",
                    ),
                    ("Content-Length list", "Content-Length: 5, 6\r\n", "hello!"),
                    ("negative Content-Length", "Content-Length: -5\r\n", ""),
                    (
                        "Content-Length, then chunked",
                        "Content-Length: 60\r\nTransfer-Encoding: chunked\r\n",
                        "0\r\n\r\n",
                    ),
                    (
                        "chunked, then Content-Length",
                        "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
                        "0\r\n\r\n",
                    ),
                    (
                        "chunked, then Content-Length 0",
                        "transfer-encoding: chunked\r\ncontent-length: 0\r\n",
                        "5\r\nhello\r\n0\r\n\r\n",
                    ),
                ] {
                    let mut bytes = head("/t/alice/refused", extra);
                    bytes.extend_from_slice(body.as_bytes());
                    bytes.extend_from_slice(smuggled.as_bytes());
                    let mut s = hostile_connect(addr).await?;
                    let _ = s.write_all(&bytes).await;
                    assert_eq!(outcome(&mut s, WAIT).await, Outcome::Status(400), "{what}");
                    assert!(closes(&mut s, WAIT).await, "{what}: closed after the 400");
                }
                // `chunked` followed by a tab: the tab is optional whitespace,
                // so hyper and the relay both see a plain `chunked` and frame
                // the body by it; no two parsers disagree on where it ends.
                let mut bytes = head("/t/alice/te-tab", "Transfer-Encoding: chunked\t\r\n");
                bytes.extend_from_slice(b"5\r\nhello\r\n0\r\n\r\n");
                let mut s = hostile_connect(addr).await?;
                s.write_all(&bytes).await?;
                assert_eq!(outcome(&mut s, WAIT).await, Outcome::Status(200), "chunked\\t");

                // HTTP/1.0 has no chunked encoding.
                let mut s = hostile_connect(addr).await?;
                let _ = s
                    .write_all(
                        format!(
                            "POST /t/alice/refused HTTP/1.0\r\nHost: relay.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
                        )
                        .as_bytes(),
                    )
                    .await;
                assert_eq!(outcome(&mut s, WAIT).await, Outcome::Status(400), "TE on 1.0");

                // An ambiguous request behind well-framed ones on the same
                // connection: those are served, it is refused, and the
                // connection ends there.
                let mut bytes = head("/t/alice/first", "Transfer-Encoding: chunked\r\n");
                bytes.extend_from_slice(b"5\r\nhello\r\n0\r\n\r\n");
                bytes.extend_from_slice(&head("/t/alice/second", "Content-Length: 2\r\n"));
                bytes.extend_from_slice(b"hi");
                bytes.extend_from_slice(&head(
                    "/t/alice/refused",
                    "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
                ));
                bytes.extend_from_slice(b"0\r\n\r\n");
                bytes.extend_from_slice(smuggled.as_bytes());
                let mut s = hostile_connect(addr).await?;
                let _ = s.write_all(&bytes).await;
                assert_eq!(statuses_until_closed(&mut s, WAIT).await, [200, 200, 400]);
            }
            Ok(())
        })
        .await?;
    let paths = setup.received_paths();
    assert!(
        !paths
            .iter()
            .any(|p| p.starts_with("/smuggled") || p.starts_with("/refused")),
        "{paths:?}"
    );
    for r in setup.app.received() {
        if r.uri == "/te-tab" {
            assert_eq!(&r.body[..], b"hello", "chunked\\t framed as chunked");
        }
        if r.uri == "/first" {
            assert_eq!(
                &r.body[..],
                b"hello",
                "chunked before the ambiguous request"
            );
        }
        if r.uri == "/second" {
            assert_eq!(&r.body[..], b"hi", "sized before the ambiguous request");
        }
    }
    Ok(())
}

/// 6. Header injection: bare CR, bare LF in a value, obs-fold. (Binary bodies
/// and obs-text header values are forwarded byte-exact: tunnel.rs.)
#[tokio::test]
async fn header_injection_is_refused() -> anyhow::Result<()> {
    let setup = Setup::new(|_| {}).await?;
    let addr = setup.addr();
    setup
        .while_attacked(async move {
            for _ in 0..20 {
                for (what, extra) in [
                    ("bare CR", "X-A: b\rX-Injected: c\r\n"),
                    ("obs-fold", "X-A: b\r\n X-Injected: c\r\n"),
                    ("NUL in a value", "X-A: b\0c\r\n"),
                    ("space before colon", "X-A : b\r\n"),
                ] {
                    let got = raw(
                        addr,
                        head("/t/alice/inject", &format!("Content-Length: 0\r\n{extra}")),
                        WAIT,
                    )
                    .await?;
                    assert_eq!(got, Outcome::Status(400), "{what}");
                }
            }
            Ok(())
        })
        .await?;
    assert!(!setup
        .received_paths()
        .iter()
        .any(|p| p.starts_with("/inject")));
    Ok(())
}

/// 7. Path traversal and Host tricks.
#[tokio::test]
async fn climbing_paths_are_refused_and_hosts_normalised() -> anyhow::Result<()> {
    let setup = Setup::new(|c| c.domain = Some("example.com".into())).await?;
    let addr = setup.addr();
    setup
        .while_attacked(async move {
            for _ in 0..10 {
                for path in [
                    "/t/alice/x/../y",
                    "/t/alice/x/%2e%2e/y",
                    "/t/alice/x/%2E%2e/y",
                    "/t/alice/x/%252e%252e",
                    "/t/alice/x/..%2f..%2fetc/passwd",
                    "/t/alice/x/..%5c..%5cwin.ini",
                    "/t/alice/x/a%00b",
                    "/t/alice/./x",
                ] {
                    let got = raw(
                        addr,
                        format!("GET {path} HTTP/1.1\r\nHost: relay.test\r\n\r\n").into_bytes(),
                        WAIT,
                    )
                    .await?;
                    assert_eq!(got, Outcome::Status(400), "{path}");
                }
                // A raw NUL in the request line: hyper refuses it.
                let got = raw(
                    addr,
                    b"GET /t/alice/a\0b HTTP/1.1\r\nHost: relay.test\r\n\r\n".to_vec(),
                    WAIT,
                )
                .await?;
                assert_eq!(got, Outcome::Status(400), "raw NUL");
            }
            Ok(())
        })
        .await?;

    for host in [
        "ALICE.example.com.:80",
        "ALICE.EXAMPLE.COM",
        "alice.example.com.:8080",
    ] {
        let req = Request::post(format!("http://{addr}/host-check"))
            .header("host", host)
            .body(full("{}"))?;
        let (status, _, _) = send(req).await?;
        assert_eq!(status, StatusCode::OK, "Host: {host}");
    }
    let paths = setup.received_paths();
    assert_eq!(
        paths.iter().filter(|p| *p == "/host-check").count(),
        3,
        "{paths:?}"
    );
    assert!(
        !paths
            .iter()
            .any(|p| p.contains("..") || p.contains("passwd") || p.contains("%")),
        "{paths:?}"
    );
    Ok(())
}

/// 8. HTTP/2: 500 concurrent streams on one h2c connection.
#[tokio::test]
async fn http2_streams_beyond_the_limit_wait() -> anyhow::Result<()> {
    // A local app that counts the requests it holds at once.
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let app_addr = listener.local_addr()?;
    let (f, p) = (in_flight.clone(), peak.clone());
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let (f, p) = (f.clone(), p.clone());
        async move {
            if req.uri().path() != "/h2" {
                return "ok";
            }
            let now = f.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            f.fetch_sub(1, Ordering::SeqCst);
            "ok"
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let relay = TestRelay::spawn().await?;
    let _agent = relay.agent("alice", &format!("http://{app_addr}")).await?;

    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<TestBody>();
    let url = relay.url("alice", "/h2");
    let started = Instant::now();
    let load = tokio::spawn(async move {
        let results: Vec<anyhow::Result<StatusCode>> = stream::iter(0..500)
            .map(|_| {
                let (h2, url) = (h2.clone(), url.clone());
                async move {
                    let req = Request::post(&url)
                        .version(http::Version::HTTP_2)
                        .body(full("{}"))?;
                    let resp = tokio::time::timeout(WAIT, h2.request(req)).await??;
                    Ok(resp.status())
                }
            })
            .buffer_unordered(500)
            .collect()
            .await;
        results
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let good = Instant::now();
    let (status, _, _) = post(&relay.url("alice", "/good"), "{}").await?;
    assert_eq!(
        status,
        StatusCode::OK,
        "the good webhook during the h2 load"
    );
    assert!(good.elapsed() < GOOD_BOUND);
    let (mut ok, mut refused) = (0, 0);
    for result in tokio::time::timeout(Duration::from_secs(40), load).await?? {
        match result {
            Ok(StatusCode::OK) => ok += 1,
            Ok(other) => panic!("an h2 stream got {other}"),
            Err(err) => {
                let text = format!("{err:#}");
                assert!(text.contains("refused"), "an h2 stream failed: {text}");
                refused += 1;
            }
        }
    }
    assert_eq!(ok + refused, 500);
    assert!(ok >= 100, "{ok} served, {refused} refused");
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= 100, "{peak} requests at once on one connection");
    assert!(started.elapsed() < Duration::from_secs(20));
    eprintln!("h2: {ok} served, {refused} refused, peak {peak} at once");
    // The relay still serves HTTP/1.
    let (status, _, _) = post(&relay.url("alice", "/after"), "{}").await?;
    assert_eq!(status, StatusCode::OK);
    Ok(())
}

/// A local app behind the tunnel that answers every request the same
/// hostile way (SECURITY.md §3.3, "local app → relay response abuse"), on raw
/// TCP so nothing tames it (except `POST /next`, answered plainly). Each
/// connection's writing is bounded in bytes and time; it stops when the agent
/// stops reading.
async fn hostile_app(
    answer: fn() -> (&'static str, Vec<u8>, Duration, usize),
) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let target = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(seen) = read_head(&mut conn).await else {
                    return;
                };
                if seen.starts_with(b"POST /next ") {
                    // The webhook after the attack gets a plain answer.
                    let _ = conn
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    return;
                }
                let (head, piece, pause, pieces) = answer();
                if conn.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for _ in 0..pieces {
                    if conn.write_all(&piece).await.is_err() {
                        return;
                    }
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            });
        }
    });
    Ok(target)
}

/// 64 KiB chunks of `x`, in chunked encoding.
fn chunk_of_64k() -> Vec<u8> {
    let mut piece = b"10000\r\n".to_vec();
    piece.extend(std::iter::repeat_n(b'x', 65_536));
    piece.extend_from_slice(b"\r\n");
    piece
}

/// The newest exchange the agent recorded, once there is one.
async fn newest(agent: &Agent) -> anyhow::Result<relay_client::history::Exchange> {
    recorded(agent, 1).await?;
    let page = agent
        .history()
        .list(&relay_client::history::Filter::default(), None, 1)?;
    page.exchanges
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("nothing recorded"))
}

/// Reads a response until it ends or breaks (or `within` passes): the
/// status, whether it ended cleanly and how many bytes came.
async fn read_answer(url: &str, within: Duration) -> anyhow::Result<(StatusCode, bool, u64)> {
    use http_body_util::BodyExt;
    let req = Request::post(url).body(full("{}"))?;
    let resp = tokio::time::timeout(within, client().request(req)).await??;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut got = 0u64;
    let read = tokio::time::timeout(within, async {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => got += frame.data_ref().map_or(0, |d| d.len() as u64),
                Err(_) => return false,
            }
        }
        true
    })
    .await;
    Ok((status, matches!(read, Ok(true)), got))
}

/// 7a. An app streaming an endless answer: cut off at the response limit; the
/// sender's response breaks, the exchange is an app error, and the history
/// keeps no more than the limit.
#[tokio::test]
async fn an_endless_answer_is_cut_off_at_the_limit() -> anyhow::Result<()> {
    // 40 MiB at most, well past the 25 MiB limit.
    let target = hostile_app(|| {
        (
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            chunk_of_64k(),
            Duration::ZERO,
            640,
        )
    })
    .await?;
    let relay = TestRelay::spawn().await?;
    let agent = relay.agent("alice", &target).await?;
    let (status, whole, got) = read_answer(&relay.url("alice", "/endless"), WAIT * 4).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !whole,
        "the cut answer must not look complete ({got} bytes)"
    );
    let limit = 25 << 20;
    assert!(got <= limit, "{got} bytes relayed");
    let e = newest(&agent).await?;
    assert_eq!(
        e.outcome,
        relay_client::history::Outcome::LocalAppError,
        "{e:?}"
    );
    assert!(
        e.error
            .as_deref()
            .is_some_and(|m| m.contains("over 25 MiB")),
        "{e:?}"
    );
    let kept = agent
        .history()
        .body(e.id, relay_client::history::Part::Response)?;
    assert!(kept.len() as u64 <= limit, "{} bytes kept", kept.len());
    // A replay reads the whole answer back: it stops at the limit too.
    let replayer = relay_client::replay::Replayer::new(
        agent.history().clone(),
        None,
        std::sync::Arc::default(),
    );
    let replayed = replayer.replay(e.id, &Default::default()).await?;
    assert_eq!(
        replayed.outcome,
        relay_client::history::Outcome::LocalAppError,
        "{replayed:?}"
    );
    assert!(
        replayed
            .error
            .as_deref()
            .is_some_and(|m| m.contains("over 25 MiB")),
        "{replayed:?}"
    );
    // The relay still serves the next webhook.
    let (status, _, _) = post(&relay.url("alice", "/next"), "{}").await?;
    assert_eq!(status, StatusCode::OK);
    Ok(())
}

/// 7b. An app that drips its answer forever: cut off once it has taken the
/// delivery timeout to produce the body.
#[tokio::test]
async fn a_dripping_answer_is_cut_off_after_the_timeout() -> anyhow::Result<()> {
    // A byte every 100 ms for up to 30 s.
    let target = hostile_app(|| {
        (
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            b"1\r\nx\r\n".to_vec(),
            Duration::from_millis(100),
            300,
        )
    })
    .await?;
    let relay = TestRelay::spawn_with(|c| c.timeout = Duration::from_secs(1)).await?;
    let agent = relay.agent("alice", &target).await?;
    let started = Instant::now();
    let (status, whole, got) = read_answer(&relay.url("alice", "/drip"), WAIT * 2).await?;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::OK);
    assert!(
        !whole,
        "the cut answer must not look complete ({got} bytes)"
    );
    assert!(took < Duration::from_secs(10), "cut off after {took:?}");
    let e = newest(&agent).await?;
    assert_eq!(
        e.outcome,
        relay_client::history::Outcome::LocalAppTimeout,
        "{e:?}"
    );
    Ok(())
}

/// 7c. A sender that never reads a large answer: the relay closes its
/// connection once writes have been blocked for the body timeout, which
/// stops the delivery; it does not hold the answer (or the app) forever.
#[tokio::test]
async fn a_sender_that_does_not_read_its_answer_is_cut_off() -> anyhow::Result<()> {
    const SIZE: usize = 20 << 20;
    let target = hostile_app(|| {
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 20971520\r\n\r\n",
            vec![b'y'; 1 << 20],
            Duration::ZERO,
            20,
        )
    })
    .await?;
    let relay = TestRelay::spawn_with(|c| c.body_timeout = Duration::from_secs(1)).await?;
    let agent = relay.agent("alice", &target).await?;
    let mut s = TcpStream::connect(relay.http_addr()).await?;
    s.write_all(b"POST /t/alice/big HTTP/1.1\r\nHost: relay.test\r\nContent-Length: 0\r\n\r\n")
        .await?;
    // Not reading: the answer fills the socket buffers and the relay's writes
    // block. The agent records the delivery as given up once the relay stops it.
    let e = newest(&agent).await?;
    assert_eq!(
        e.outcome,
        relay_client::history::Outcome::Cancelled,
        "{e:?}"
    );
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await;
    assert!(
        got.len() < SIZE,
        "{} bytes: the whole answer came",
        got.len()
    );
    let (status, _, _) = post(&relay.url("alice", "/next"), "{}").await?;
    assert_eq!(status, StatusCode::OK);
    Ok(())
}

/// 9. HTTP/2 rapid reset (CVE-2023-44487): streams opened and reset at once,
/// in a loop, on one connection. The relay (h2's reset-stream accounting)
/// ends the connection; next to nothing reaches the app.
#[tokio::test]
async fn http2_rapid_reset_is_cut_off() -> anyhow::Result<()> {
    const STREAMS: usize = 10_000;
    // A header timeout longer than the wait below: the connection's end must
    // come from the reset accounting, not from the idle cut-off.
    let setup = Setup::new(|c| c.header_timeout = WAIT * 2).await?;
    let addr = setup.addr();
    let (opened, end) = setup
        .while_attacked(async move {
            let tcp = hostile_connect(addr).await?;
            let (mut client, connection) = h2::client::handshake(tcp).await?;
            let driver = tokio::spawn(connection);
            let mut opened = 0;
            let mut held = None;
            for _ in 0..STREAMS {
                let Ok(ready) = client.ready().await else {
                    break;
                };
                client = ready;
                let req = Request::post("http://relay.test/t/alice/reset").body(())?;
                let Ok((_resp, mut stream)) = client.send_request(req, false) else {
                    break;
                };
                stream.send_reset(h2::Reason::CANCEL);
                opened += 1;
                if opened == STREAMS {
                    held = Some(client);
                    break;
                }
            }
            // The connection must end from the relay's side (the client
            // handle is still held when every stream went out), not linger.
            let end = tokio::time::timeout(WAIT, driver).await;
            drop(held);
            Ok((opened, end))
        })
        .await?;
    let reached = setup
        .received_paths()
        .iter()
        .filter(|p| p.as_str() == "/reset")
        .count();
    eprintln!("rapid reset: {opened} streams opened and reset, connection end {end:?}, {reached} reached the app");
    assert!(
        matches!(end, Ok(Ok(Err(_)))),
        "the relay did not end the connection: {end:?}"
    );
    assert!(reached < 100, "{reached} reset streams reached the app");
    Ok(())
}

/// 10. Idle HTTP/2 connections: hyper's header timeout does not cover them,
/// the relay closes them after it; a connection whose request is still
/// being answered stays.
#[tokio::test]
async fn idle_http2_connections_are_closed_and_busy_ones_kept() -> anyhow::Result<()> {
    let setup = Setup::new(|c| c.header_timeout = Duration::from_secs(1)).await?;
    let addr = setup.addr();
    setup
        .while_attacked(async move {
            // 50 connections that open and then say nothing.
            let mut idle = Vec::new();
            for _ in 0..50 {
                let tcp = hostile_connect(addr).await?;
                let (client, connection) = h2::client::handshake(tcp).await?;
                idle.push((client, tokio::spawn(connection)));
            }
            let started = Instant::now();
            for (client, driver) in idle {
                let end = tokio::time::timeout(WAIT, driver).await;
                assert!(end.is_ok(), "an idle h2 connection stayed open");
                drop(client);
            }
            let took = started.elapsed();
            assert!(took < Duration::from_secs(15), "closed after {took:?}");

            // A request the app takes 3 s to answer outlives the 1 s limit.
            let tcp = hostile_connect(addr).await?;
            let (client, connection) = h2::client::handshake(tcp).await?;
            let driver = tokio::spawn(connection);
            let mut client = client.ready().await?;
            let req = Request::post("http://relay.test/t/alice/slow").body(())?;
            let (resp, _) = client.send_request(req, true)?;
            let resp = tokio::time::timeout(WAIT, resp).await??;
            assert_eq!(resp.status(), StatusCode::OK, "the slow request on h2");
            drop(client);
            let _ = tokio::time::timeout(WAIT, driver).await;
            Ok(())
        })
        .await?;
    assert!(setup.received_paths().iter().any(|p| p == "/slow"));
    Ok(())
}
