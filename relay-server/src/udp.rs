//! UDP sockets for QUIC endpoints, with kernel buffers sized for bursts.
//!
//! Linux gives a UDP socket a 208 KiB receive buffer by default
//! (`net.core.rmem_default`). QUIC handshakes arrive in bursts: when a relay
//! restarts, every agent reconnects within a second or two, each sending a
//! padded 1,200-byte Initial and then its Retry echo, and a relay busy with
//! the first handshakes' TLS lets the rest queue. Past the buffer the kernel
//! drops datagrams; each lost Initial costs its sender a probe timeout (1 s,
//! then 2 s, 4 s…). Measured: 200 agents connecting 64 at a time to one
//! debug-build relay lost 300–550 datagrams to a full receive buffer per run
//! (`RcvbufErrors` in `/proc/net/snmp`; `d` in `ss -uam`), and one agent in
//! a CI run went without its welcome for 10 s. QUIC stacks ask for several
//! MiB (quic-go 7 MiB); the kernel grants at most `net.core.rmem_max`.

use std::{io, net::SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// Receive and send buffer asked of the kernel for a QUIC endpoint.
pub const QUIC_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// A UDP socket bound to `addr`, its buffers raised towards `buffer` bytes.
pub struct BoundUdp {
    pub socket: std::net::UdpSocket,
    /// The receive buffer the kernel granted, as it reports it (Linux
    /// reports twice the granted size: half is its bookkeeping).
    pub recv_buffer: usize,
    /// Whether the kernel granted less than asked (capped by
    /// `net.core.rmem_max`); the socket works, with less room for bursts.
    pub capped: bool,
}

/// Binds a UDP socket on `addr` as `std::net::UdpSocket::bind` would (an
/// IPv6 wildcard stays dual-stack where the system makes it so) and asks for
/// `buffer` bytes of receive and send buffer. A refused size is not an
/// error: the socket keeps what the kernel gives and `capped` says so.
pub fn bind(addr: SocketAddr, buffer: usize) -> io::Result<BoundUdp> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Sizes are set before binding so the first burst already has them.
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    socket.bind(&addr.into())?;
    let recv_buffer = socket.recv_buffer_size()?;
    // Linux reports twice what it granted (socket(7), SO_RCVBUF).
    let granted = if cfg!(target_os = "linux") {
        recv_buffer / 2
    } else {
        recv_buffer
    };
    Ok(BoundUdp {
        socket: socket.into(),
        recv_buffer,
        capped: granted < buffer,
    })
}

/// A QUIC endpoint on `addr` with burst-sized buffers: a server when
/// `server` is given, otherwise a client. A server logs a warning when the
/// kernel capped the receive buffer, naming the setting that lifts the cap
/// (many agents connect to one relay at once; an agent's one connection
/// does well enough within the cap, so a client only notes it at debug).
///
/// Also returns the receive buffer the kernel granted, as it reports it.
pub fn quic_endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> io::Result<(quinn::Endpoint, usize)> {
    let bound = bind(addr, QUIC_BUFFER_BYTES)?;
    if bound.capped && server.is_none() {
        tracing::debug!(
            granted_bytes = bound.recv_buffer,
            wanted_bytes = QUIC_BUFFER_BYTES,
            "the kernel capped the QUIC socket's receive buffer"
        );
    } else if bound.capped {
        tracing::warn!(
            granted_bytes = bound.recv_buffer,
            wanted_bytes = QUIC_BUFFER_BYTES,
            "the kernel capped the QUIC socket's receive buffer; bursts of \
             connecting agents may lose packets and wait out retransmissions. \
             Raise the cap with `sysctl -w net.core.rmem_max={QUIC_BUFFER_BYTES}`"
        );
    }
    let runtime =
        quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime found"))?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        bound.socket,
        runtime,
    )?;
    Ok((endpoint, bound.recv_buffer))
}

/// Datagrams the kernel dropped for want of room in the receive buffer of
/// the UDP socket bound to `local`, from `/proc/net/udp` or `/proc/net/udp6`
/// (Linux; `None` elsewhere or when no socket matches).
pub fn receive_drops(local: SocketAddr) -> Option<u64> {
    let table = match local {
        SocketAddr::V4(_) => "/proc/net/udp",
        SocketAddr::V6(_) => "/proc/net/udp6",
    };
    let text = std::fs::read_to_string(table).ok()?;
    drops_in_table(&text, &proc_address(local))
}

/// `local` as `/proc/net/udp{,6}` prints it: the address's 32-bit words in
/// host byte order as `%08X`, a colon, the port as `%04X`.
fn proc_address(local: SocketAddr) -> String {
    let words: String = match local.ip() {
        std::net::IpAddr::V4(ip) => format!("{:08X}", u32::from_ne_bytes(ip.octets())),
        std::net::IpAddr::V6(ip) => ip
            .octets()
            .chunks_exact(4)
            .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
            .collect(),
    };
    format!("{words}:{:04X}", local.port())
}

/// The `drops` column of the row of a `/proc/net/udp{,6}` table whose local
/// address is `address` (`None` when no row is).
fn drops_in_table(table: &str, address: &str) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let mut fields = line.split_whitespace();
        // "sl", then "local_address"; "drops" is the last column.
        (fields.nth(1)? == address).then_some(())?;
        fields.last()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_an_ephemeral_port_and_reports_the_buffer() {
        let bound = bind(SocketAddr::from(([127, 0, 0, 1], 0)), 1024 * 1024).expect("bind");
        assert_ne!(bound.socket.local_addr().expect("addr").port(), 0);
        // Whatever the cap, the kernel gives at least its default.
        assert!(bound.recv_buffer > 0);
        let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if cfg!(target_os = "linux") {
            // Granted min(asked, rmem_max), reported doubled.
            assert_eq!(bound.recv_buffer, 2 * rmem_max.min(1024 * 1024));
            assert_eq!(bound.capped, rmem_max < 1024 * 1024);
        }
    }

    #[test]
    fn drops_are_read_from_the_row_of_the_address() {
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
            \x20 10: 0100007F:A442 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 41925 2 0000000000000000 17\n\
            \x20 11: 0200007F:A442 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 41926 2 0000000000000000 3\n";
        assert_eq!(drops_in_table(table, "0100007F:A442"), Some(17));
        assert_eq!(drops_in_table(table, "0200007F:A442"), Some(3));
        assert_eq!(drops_in_table(table, "0100007F:0050"), None);
        assert_eq!(drops_in_table("header only\n", "0100007F:A442"), None);
    }

    #[cfg(all(target_os = "linux", target_endian = "little"))]
    #[test]
    fn addresses_are_spelled_as_the_kernel_prints_them() {
        let v4: SocketAddr = "127.0.0.1:42050".parse().expect("v4");
        assert_eq!(proc_address(v4), "0100007F:A442");
        let v6: SocketAddr = "[::1]:443".parse().expect("v6");
        assert_eq!(proc_address(v6), "00000000000000000000000001000000:01BB");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_bound_socket_has_a_drops_row() {
        let bound = bind(SocketAddr::from(([127, 0, 0, 1], 0)), 4096).expect("bind");
        let local = bound.socket.local_addr().expect("addr");
        assert_eq!(receive_drops(local), Some(0));
    }

    #[test]
    fn a_taken_address_is_an_error() {
        let first = bind(SocketAddr::from(([127, 0, 0, 1], 0)), 4096).expect("bind");
        let addr = first.socket.local_addr().expect("addr");
        assert!(bind(addr, 4096).is_err());
    }
}
