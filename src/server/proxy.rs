//! The PROXY protocol (HAProxy's spec, versions 1 and 2): the header a load
//! balancer sends first, carrying the real client's address. Parsing has no
//! I/O; [`read_header`] takes exactly the header's bytes off a socket, so
//! whatever follows (a TLS ClientHello) stays for the next reader.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

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
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    let sig_len = buf.len().min(12);
    if buf[..sig_len] == V2_SIGNATURE[..sig_len] {
        return parse_v2(buf);
    }
    let v1_prefix = b"PROXY ";
    let n = buf.len().min(v1_prefix.len());
    if buf[..n] != v1_prefix[..n] {
        return Err(ProxyError::NotProxy);
    }
    parse_v1(buf)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError::TooLong)
        } else {
            Ok(None)
        };
    };
    if end + 2 > V1_MAX {
        return Err(ProxyError::TooLong);
    }
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ProxyError::Malformed("not ASCII"))?;
    let mut parts = line.split(' ');
    let _proxy = parts.next();
    let header = match parts.next() {
        Some("UNKNOWN") => Header::Local,
        Some(fam @ ("TCP4" | "TCP6")) => {
            let (Some(src), Some(_dst), Some(sport), Some(_dport), None) = (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
            ) else {
                return Err(ProxyError::Malformed("v1 needs four addresses and ports"));
            };
            let ip: IpAddr = src
                .parse()
                .map_err(|_| ProxyError::Malformed("v1 source address"))?;
            if (fam == "TCP4") != ip.is_ipv4() {
                return Err(ProxyError::Malformed("v1 address family"));
            }
            let port: u16 = sport
                .parse()
                .map_err(|_| ProxyError::Malformed("v1 source port"))?;
            Header::Proxied(SocketAddr::new(ip, port))
        }
        _ => return Err(ProxyError::Malformed("v1 protocol")),
    };
    Ok(Some((header, end + 2)))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Malformed("v2 version"));
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let total = 16 + len;
    if total > V2_MAX {
        return Err(ProxyError::TooLong);
    }
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[16..total];
    let header = match ver_cmd & 0x0f {
        0 => Header::Local,
        1 => match buf[13] {
            // TCP over IPv4: src addr, dst addr, src port, dst port.
            0x11 if body.len() >= 12 => Header::Proxied(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(body[0], body[1], body[2], body[3])),
                u16::from_be_bytes([body[8], body[9]]),
            )),
            // TCP over IPv6.
            0x21 if body.len() >= 36 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(&body[..16]);
                Header::Proxied(SocketAddr::new(
                    IpAddr::V6(Ipv6Addr::from(a)),
                    u16::from_be_bytes([body[32], body[33]]),
                ))
            }
            // UNSPEC or UNIX: no address we can use.
            0x00 | 0x31 | 0x32 => Header::Local,
            _ => return Err(ProxyError::Malformed("v2 address family or length")),
        },
        _ => return Err(ProxyError::Malformed("v2 command")),
    };
    Ok(Some((header, total)))
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
    }
}
