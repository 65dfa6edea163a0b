//! The legacy listener's TLS, with OpenSSL (cargo feature `legacy-tls`):
//! for old devices that speak only TLS 1.0 or 1.1, which rustls does not
//! implement. Everything else in popbridge stays on rustls.
//!
//! RFC 8996 §2 and §3: TLS 1.0 and 1.1 MUST NOT be used. This listener
//! departs from that on purpose, off unless built in and configured, for
//! devices that cannot be upgraded and sit on a trusted network.
//!
//! OpenSSL rather than native-tls: native-tls can lower the minimum
//! protocol but not the cipher string, and Debian's OpenSSL 3 refuses TLS
//! 1.0 and 1.1 at its default security level whatever the minimum says
//! (their handshake signs with MD5+SHA-1, which level 1 and up forbid).
//! Here the level is lowered for this listener's context alone.

use std::path::Path;
use std::pin::Pin;

use openssl::ssl::{Ssl, SslAcceptor, SslFiletype, SslMethod, SslOptions};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

pub use openssl::ssl::SslVersion;

use super::TlsError;

/// Below TLS 1.2: OpenSSL's own default list, at security level 0. Level
/// 0 is what lets TLS 1.0/1.1 handshakes (MD5+SHA-1 signatures) and their
/// CBC-SHA suites through on an OpenSSL 3 built with level 2 as the
/// system default (Debian's `/etc/ssl/openssl.cnf`).
const LEGACY_CIPHERS: &str = "DEFAULT:@SECLEVEL=0";

/// A server context for the legacy listener: the `[tls]` certificate,
/// TLS from `min` up to 1.3.
pub struct LegacyTls {
    acceptor: SslAcceptor,
    /// The oldest protocol accepted (shown by `Debug`).
    min: SslVersion,
}

impl std::fmt::Debug for LegacyTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LegacyTls")
            .field("min", &version_name(self.min))
            .finish_non_exhaustive()
    }
}

/// "TLSv1", "TLSv1.1", ... as OpenSSL names them.
fn version_name(v: SslVersion) -> &'static str {
    if v == SslVersion::TLS1 {
        "TLSv1"
    } else if v == SslVersion::TLS1_1 {
        "TLSv1.1"
    } else if v == SslVersion::TLS1_2 {
        "TLSv1.2"
    } else {
        "TLSv1.3"
    }
}

impl LegacyTls {
    /// Reads the PEM certificate chain and key (the same files as the
    /// rustls listeners) into an OpenSSL context accepting `min` and newer.
    pub fn load(cert_file: &Path, key_file: &Path, min: SslVersion) -> Result<Self, TlsError> {
        let ssl_err = |what: &str, e: openssl::error::ErrorStack| TlsError(format!("{what}: {e}"));
        // Mozilla's intermediate profile (options, curves, DH parameters),
        // then opened downwards as far as `min` asks.
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())
            .map_err(|e| ssl_err("legacy TLS (OpenSSL)", e))?;
        b.set_certificate_chain_file(cert_file)
            .map_err(|e| ssl_err(&format!("TLS certificate {}", cert_file.display()), e))?;
        b.set_private_key_file(key_file, SslFiletype::PEM)
            .map_err(|e| ssl_err(&format!("TLS key {}", key_file.display()), e))?;
        b.check_private_key().map_err(|e| {
            ssl_err(
                &format!(
                    "TLS certificate {} and key {}",
                    cert_file.display(),
                    key_file.display()
                ),
                e,
            )
        })?;
        // A client may not renegotiate (a CPU cost it could make us pay
        // over and over; no old POP3 client needs it).
        b.set_options(SslOptions::NO_RENEGOTIATION);
        if min == SslVersion::TLS1 || min == SslVersion::TLS1_1 {
            b.clear_options(SslOptions::NO_TLSV1 | SslOptions::NO_TLSV1_1);
            b.set_cipher_list(LEGACY_CIPHERS)
                .map_err(|e| ssl_err("legacy TLS cipher list", e))?;
        }
        b.set_min_proto_version(Some(min))
            .map_err(|e| ssl_err("legacy TLS minimum version", e))?;
        Ok(Self {
            acceptor: b.build(),
            min,
        })
    }

    /// The server side of a handshake on `tcp`.
    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<SslStream<TcpStream>> {
        let ssl = Ssl::new(self.acceptor.context()).map_err(std::io::Error::other)?;
        let mut stream = SslStream::new(ssl, tcp).map_err(std::io::Error::other)?;
        Pin::new(&mut stream).accept().await.map_err(|e| {
            e.into_io_error()
                .unwrap_or_else(|e| std::io::Error::other(e.to_string()))
        })?;
        Ok(stream)
    }
}
