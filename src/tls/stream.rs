//! A TCP connection that is plain or TLS: the client side (POP3S, after
//! STLS) and the upstream side (IMAPS, after STARTTLS) both use it.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A plain or TLS stream over TCP. `T` is tokio-rustls's server or client
/// `TlsStream<TcpStream>`.
#[derive(Debug)]
pub enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
    /// Only while a plain stream is being upgraded (STLS): reads fail,
    /// writes fail, flushes do nothing.
    Upgrading,
}

fn not_connected<R>() -> Poll<std::io::Result<R>> {
    Poll::Ready(Err(std::io::ErrorKind::NotConnected.into()))
}

impl<T: AsyncRead + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            MaybeTls::Upgrading => not_connected(),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            MaybeTls::Upgrading => not_connected(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            MaybeTls::Upgrading => Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            MaybeTls::Upgrading => Poll::Ready(Ok(())),
        }
    }
}

/// The server side of a client's TLS: rustls on every listener but the
/// legacy one, which OpenSSL serves (cargo feature `legacy-tls`). Sessions
/// on either go through the same driver.
// The rustls variant is much larger, but the whole value is boxed once in
// `MaybeTls::Tls`; boxing a variant again would add a second allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ServerTlsStream {
    Rustls(tokio_rustls::server::TlsStream<TcpStream>),
    #[cfg(feature = "legacy-tls")]
    OpenSsl(tokio_openssl::SslStream<TcpStream>),
}

impl AsyncRead for ServerTlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ServerTlsStream::Rustls(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(feature = "legacy-tls")]
            ServerTlsStream::OpenSsl(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerTlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ServerTlsStream::Rustls(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(feature = "legacy-tls")]
            ServerTlsStream::OpenSsl(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ServerTlsStream::Rustls(s) => Pin::new(s).poll_flush(cx),
            #[cfg(feature = "legacy-tls")]
            ServerTlsStream::OpenSsl(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ServerTlsStream::Rustls(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(feature = "legacy-tls")]
            ServerTlsStream::OpenSsl(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
