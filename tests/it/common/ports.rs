//! Loopback ports for the servers the tests start, without races.
//!
//! Binding port 0, reading the port and closing the socket (what the
//! harness once did) leaves a window in which another test, or another
//! program, takes the port. So:
//! - popbridge and the OAuth2 server bind port 0 themselves and say which
//!   port they got (in popbridge's log; on the OAuth2 server's stdout);
//! - Dovecot (where port 0 switches a listener off), redis-server, Cyrus and
//!   Courier cannot, so they get ports from [`allocate`]: no port is handed
//!   out twice in this process, and none is handed out from Linux's
//!   ephemeral range, where port-0 binds and outgoing connections take
//!   theirs. Another process can still take an allocated port before the
//!   server binds it; the starters see that ("Address already in use", or
//!   Cyrus's admin login failing) and retry with new ports. (Mailutils'
//!   imap4d is handed a socket the harness bound to port 0.)
//! - a test that needs an address where nothing listens holds a
//!   [`ClosedPort`].

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// First port [`allocate`] hands out: above the ports of common services.
const FIRST: u16 = 20000;
/// Last port [`allocate`] hands out: just below Linux's default ephemeral
/// range (`net.ipv4.ip_local_port_range` = 32768 60999).
const LAST: u16 = 32767;

/// Ports handed out so far by this process.
static HANDED_OUT: AtomicU32 = AtomicU32::new(0);

/// A loopback port no other test of this process has been given, that
/// nothing held when it was handed out. Each process starts at its own
/// place in the range, so test runs at the same time rarely meet.
pub fn allocate() -> u16 {
    let span = u32::from(LAST - FIRST) + 1;
    let start = std::process::id().wrapping_mul(1009) % span;
    for _ in 0..span {
        let n = HANDED_OUT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + u16::try_from((start + n) % span).expect("offset below span");
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}-{LAST}");
}

/// A loopback port where nothing listens, for as long as this value lives:
/// a socket bound to it that never calls listen(2), so connections to it
/// are refused and no other socket can bind it meanwhile.
pub struct ClosedPort {
    /// Holds the port.
    _socket: tokio::net::TcpSocket,
    /// The address, 127.0.0.1:port.
    pub addr: SocketAddr,
}

impl ClosedPort {
    /// Binds 127.0.0.1:0 (a port of the ephemeral range).
    pub fn new() -> ClosedPort {
        let socket = tokio::net::TcpSocket::new_v4().expect("create a TCP socket");
        socket
            .bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .expect("bind 127.0.0.1:0");
        let addr = socket
            .local_addr()
            .expect("local address of the bound socket");
        ClosedPort {
            _socket: socket,
            addr,
        }
    }

    /// The port number.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}
