//! The PROXY protocol (HAProxy's spec, versions 1 and 2): the header a load
//! balancer sends first, carrying the real client's address. The bytes are
//! parsed by the `ppp` crate (no I/O; [`parse`] says what popbridge makes of
//! them); [`read_header`] takes exactly the header's bytes off a socket, so
//! whatever follows (a TLS ClientHello) stays for the next reader.

use std::net::SocketAddr;
use std::time::Duration;

use ppp::PartialResult;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Spec §2.1: a v1 header is at most 107 octets, CRLF included.
pub const V1_MAX: usize = 107;
/// Spec §2.2: the v2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// v2 headers carry TLVs; we accept up to this many octets in all.
pub const V2_MAX: usize = 16 + 1024;
/// How long a trusted peer has to send its header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The proxied client's address.
    Proxied(SocketAddr),
    /// `UNKNOWN` (v1) or `LOCAL` (v2), e.g. a health check: use the peer.
    Local,
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    #[error("PROXY header too long")]
    TooLong,
}

/// Parses a header at the start of `buf`. `Ok(None)`: more bytes needed.
/// `Ok(Some((header, len)))`: the header is the first `len` octets.
///
/// The parsing is the `ppp` crate's; this decides what popbridge accepts:
/// v2 when `buf` starts like the v2 signature, v1 otherwise; TCP over IPv4
/// or IPv6 carries the client's address; v1 `UNKNOWN`, v2 `LOCAL` and v2
/// `UNSPEC` or UNIX addresses mean "use the peer"; UDP is refused.
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    let sig_len = buf.len().min(V2_SIGNATURE.len());
    if buf[..sig_len] == V2_SIGNATURE[..sig_len] {
        parse_v2(buf)
    } else {
        parse_v1(buf)
    }
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    use ppp::v1::{Addresses, BinaryParseError, ParseError};
    let prefix = b"PROXY ";
    let n = buf.len().min(prefix.len());
    if buf[..n] != prefix[..n] {
        return Err(ProxyError::NotProxy);
    }
    // ppp judges a partial line by its last word, and a line cut after a
    // space (`... 6000 `) reads as a bad port: parse whole lines only.
    let Some(cr) = memchr::memchr(b'\r', buf) else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError::TooLong)
        } else {
            Ok(None)
        };
    };
    if cr + 2 > V1_MAX {
        return Err(ProxyError::TooLong);
    }
    let parsed = ppp::v1::Header::try_from(buf);
    if parsed.is_incomplete() {
        return Ok(None);
    }
    let h = parsed.map_err(|e| match e {
        BinaryParseError::Parse(ParseError::InvalidPrefix) => ProxyError::NotProxy,
        BinaryParseError::Parse(ParseError::HeaderTooLong) => ProxyError::TooLong,
        BinaryParseError::InvalidUtf8(_) => ProxyError::Malformed("v1: not ASCII"),
        _ => ProxyError::Malformed("v1 header"),
    })?;
    let header = match h.addresses {
        Addresses::Unknown => Header::Local,
        Addresses::Tcp4(a) => Header::Proxied(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Tcp6(a) => Header::Proxied(SocketAddr::from((a.source_address, a.source_port))),
    };
    Ok(Some((header, h.header.len())))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    use ppp::v2::{Addresses, Command, ParseError, Protocol};
    let parsed = ppp::v2::Header::try_from(buf);
    if let Err(ParseError::Partial(_, len)) = &parsed {
        // Refuse an oversized header before waiting for all of it.
        if V2_SIGNATURE.len() + 4 + len > V2_MAX {
            return Err(ProxyError::TooLong);
        }
    }
    if parsed.is_incomplete() {
        return Ok(None);
    }
    let h = parsed.map_err(|e| match e {
        ParseError::Version(_) => ProxyError::Malformed("v2 version"),
        ParseError::Command(_) => ProxyError::Malformed("v2 command"),
        _ => ProxyError::Malformed("v2 address family or length"),
    })?;
    if h.len() > V2_MAX {
        return Err(ProxyError::TooLong);
    }
    let header = match (h.command, h.protocol, h.addresses) {
        (Command::Local, _, _) => Header::Local,
        (Command::Proxy, Protocol::Stream, Addresses::IPv4(a)) => {
            Header::Proxied(SocketAddr::from((a.source_address, a.source_port)))
        }
        (Command::Proxy, Protocol::Stream, Addresses::IPv6(a)) => {
            Header::Proxied(SocketAddr::from((a.source_address, a.source_port)))
        }
        // UNSPEC or UNIX: no address we can use.
        (Command::Proxy, _, Addresses::Unspecified | Addresses::Unix(_)) => Header::Local,
        (Command::Proxy, _, _) => return Err(ProxyError::Malformed("v2 address family or length")),
    };
    Ok(Some((header, h.len())))
}

/// Reads exactly one header from `stream`, leaving later bytes unread.
pub async fn read_header(stream: &mut TcpStream) -> Result<Header, ProxyError> {
    let mut peeked = vec![0u8; V2_MAX];
    let mut last = 0;
    loop {
        let n = stream
            .peek(&mut peeked)
            .await
            .map_err(|_| ProxyError::Malformed("connection closed"))?;
        if n == 0 {
            return Err(ProxyError::Malformed("connection closed"));
        }
        if let Some((header, len)) = parse(&peeked[..n])? {
            let mut discard = vec![0u8; len];
            stream
                .read_exact(&mut discard)
                .await
                .map_err(|_| ProxyError::Malformed("connection closed"))?;
            return Ok(header);
        }
        if n == last {
            // Nothing new yet: wait a little rather than spin on peek.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        last = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1() {
        let h = b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 110\r\nUSER x";
        assert_eq!(
            parse(h),
            Ok(Some((
                Header::Proxied("192.0.2.7:5555".parse().unwrap()),
                44
            )))
        );
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 6000 995\r\n";
        assert_eq!(
            parse(h).unwrap().unwrap().0,
            Header::Proxied("[2001:db8::1]:6000".parse().unwrap())
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok(Some((Header::Local, 15))));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Ok(None));
        assert_eq!(parse(b"PRO"), Ok(None));
        assert_eq!(parse(b"USER alice\r\n"), Err(ProxyError::NotProxy));
        assert!(parse(b"PROXY TCP4 2001:db8::1 1.2.3.4 1 2\r\n").is_err());
        assert!(parse(b"PROXY TCP4 1.2.3.4 1.2.3.4 99999 2\r\n").is_err());
        assert_eq!(parse(b""), Ok(None));
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert_eq!(parse(&long), Err(ProxyError::TooLong));
    }

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.push(0x20 | cmd);
        v.push(fam);
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn v2_headers() {
        let body = [192, 0, 2, 9, 198, 51, 100, 1, 0x15, 0xb3, 0, 110];
        let h = v2(1, 0x11, &body);
        assert_eq!(
            parse(&h),
            Ok(Some((
                Header::Proxied("192.0.2.9:5555".parse().unwrap()),
                28
            )))
        );
        // Split anywhere: more bytes needed until complete.
        for cut in 0..h.len() {
            assert_eq!(parse(&h[..cut]), Ok(None), "cut {cut}");
        }
        assert_eq!(parse(&v2(0, 0x00, &[])), Ok(Some((Header::Local, 16))));
        let mut b6 = vec![0u8; 36];
        b6[15] = 1;
        b6[32] = 0x17;
        b6[33] = 0x70;
        assert_eq!(
            parse(&v2(1, 0x21, &b6)).unwrap().unwrap().0,
            Header::Proxied("[::1]:6000".parse().unwrap())
        );
        assert!(parse(&v2(1, 0x11, &[1, 2, 3])).is_err(), "short IPv4 body");
        assert!(parse(&v2(5, 0x11, &body)).is_err(), "bad command");
        let mut bad_version = h.clone();
        bad_version[12] = 0x11;
        assert!(parse(&bad_version).is_err());
        // UDP carries no POP3 client.
        assert!(parse(&v2(1, 0x12, &body)).is_err(), "UDP over IPv4");
        // UNIX sockets: use the peer.
        assert_eq!(
            parse(&v2(1, 0x31, &[0u8; 216])).unwrap().unwrap().0,
            Header::Local
        );
        // A length beyond V2_MAX is refused before it arrives.
        let mut huge = v2(1, 0x11, &body);
        huge[14..16].copy_from_slice(&2000u16.to_be_bytes());
        assert_eq!(parse(&huge), Err(ProxyError::TooLong));
        // TLVs after the addresses are skipped, and what follows the header
        // is not part of it.
        let mut with_tlv = body.to_vec();
        with_tlv.extend_from_slice(&[0x04, 0, 2, 0xab, 0xcd]);
        let mut h = v2(1, 0x11, &with_tlv);
        let len = h.len();
        h.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(
            parse(&h),
            Ok(Some((
                Header::Proxied("192.0.2.9:5555".parse().unwrap()),
                len
            )))
        );
    }

    #[test]
    fn v1_split_anywhere_needs_more_bytes() {
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 6000 995\r\n";
        for cut in 0..h.len() {
            assert_eq!(parse(&h[..cut]), Ok(None), "cut {cut}");
        }
        assert!(parse(h).unwrap().is_some());
    }

    /// Arbitrary bytes never panic, and a header is never longer than the
    /// input (a cheap stand-in for fuzzing what `ppp` is given).
    #[test]
    fn arbitrary_bytes_are_answered() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..20_000 {
            let len = (round % 120) as usize;
            let mut buf: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            // Half the inputs start like a header, so the parsers go deep.
            match round % 4 {
                0 => buf
                    .splice(0..0, b"PROXY TCP4 ".iter().copied())
                    .for_each(drop),
                1 => buf
                    .splice(0..0, V2_SIGNATURE.iter().copied())
                    .for_each(drop),
                _ => {}
            }
            if let Ok(Some((_, n))) = parse(&buf) {
                assert!(n <= buf.len());
            }
        }
    }
}
