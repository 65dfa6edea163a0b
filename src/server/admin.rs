//! The admin HTTP listener: `/metrics` (Prometheus text format), `/healthz`
//! (the process answers) and `/readyz` (listeners bound, and the default
//! upstream answered within the last check interval).
//!
//! HTTP/1.1 through hyper, with this listener's limits: GET (and HEAD)
//! only, one request per connection, a request head of at most 8 KiB that
//! must arrive within 5 seconds, and 5 seconds for the whole exchange. It
//! is meant for loopback or a cluster-internal network, never the Internet.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tracing::{debug, warn};

use crate::metrics::metrics;

/// The largest request head we read; probes and scrapers send far less.
/// (Also hyper's smallest allowed read buffer.)
pub const MAX_REQUEST: usize = 8 * 1024;
/// How long a client has to send its request, and the whole exchange.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What `/readyz` reports.
#[derive(Debug, Default)]
pub struct Readiness {
    /// Every POP3 listener is bound.
    pub listeners_bound: AtomicBool,
    /// Unix time (seconds) when the default upstream last answered with an
    /// IMAP greeting; 0 if never.
    pub upstream_ok_at: AtomicU64,
    /// Set when shutting down: not ready for new clients.
    pub draining: AtomicBool,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Readiness {
    /// Ready: bound, not draining, upstream seen within `2 * interval`.
    pub fn is_ready(&self, interval: Duration) -> bool {
        let seen = self.upstream_ok_at.load(Ordering::Relaxed);
        self.listeners_bound.load(Ordering::Relaxed)
            && !self.draining.load(Ordering::Relaxed)
            && seen > 0
            && now().saturating_sub(seen) <= 2 * interval.as_secs().max(1)
    }
}

/// Checks every `interval` that `address` accepts a TCP connection and sends
/// an IMAP greeting (`* OK` or `* PREAUTH`), without logging in.
pub async fn watch_upstream(address: String, interval: Duration, ready: Arc<Readiness>) {
    loop {
        let check = async {
            let mut s = TcpStream::connect(&address).await?;
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await?;
            let line = &buf[..n];
            Ok::<bool, std::io::Error>(line.starts_with(b"* OK") || line.starts_with(b"* PREAUTH"))
        };
        match timeout(interval.max(Duration::from_secs(1)), check).await {
            Ok(Ok(true)) => ready.upstream_ok_at.store(now(), Ordering::Relaxed),
            Ok(Ok(false)) => warn!(%address, "readiness check: upstream did not greet with OK"),
            Ok(Err(e)) => warn!(%address, error = %e, "readiness check: upstream unreachable"),
            Err(_) => warn!(%address, "readiness check: upstream timed out"),
        }
        tokio::time::sleep(interval).await;
    }
}

/// Serves the admin endpoints forever.
pub async fn serve(listener: TcpListener, ready: Arc<Readiness>, interval: Duration) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let ready = ready.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let response = respond(req.method(), req.uri().path(), &ready, interval);
                std::future::ready(Ok::<_, Infallible>(response))
            });
            let conn =
                http1_server(REQUEST_TIMEOUT).serve_connection(TokioIo::new(stream), service);
            match timeout(REQUEST_TIMEOUT, conn).await {
                Err(_) => debug!(%peer, "admin request timed out"),
                Ok(Err(e)) => debug!(%peer, error = %e, "admin request failed"),
                Ok(Ok(())) => {}
            }
        });
    }
}

/// hyper's HTTP/1.1 server with this listener's limits: one request per
/// connection, a request head of at most [`MAX_REQUEST`] octets (hyper
/// answers a longer one with 431) that must arrive within `head_timeout`.
/// Shared with the OAuth2 loopback redirect (`popbridge oauth add
/// --browser`).
pub fn http1_server(head_timeout: Duration) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.keep_alive(false)
        .max_buf_size(MAX_REQUEST)
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout);
    b
}

/// The answer to one request: GET (or HEAD, which hyper answers without
/// the body) of `/metrics`, `/healthz` or `/readyz`.
fn respond(
    method: &Method,
    path: &str,
    ready: &Readiness,
    interval: Duration,
) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET only\n".into());
    }
    match path {
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics().encode(),
        ),
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" if ready.is_ready(interval) => reply(StatusCode::OK, TEXT, "ready\n".into()),
        "/readyz" => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n".into()),
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
    }
}

const TEXT: &str = "text/plain";

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(method: &str, path: &str, ready: &Readiness) -> StatusCode {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        respond(&method, path, ready, Duration::from_secs(10)).status()
    }

    #[test]
    fn get_only_and_known_paths() {
        let ready = Readiness::default();
        assert_eq!(status("GET", "/healthz", &ready), StatusCode::OK);
        assert_eq!(status("HEAD", "/healthz", &ready), StatusCode::OK);
        assert_eq!(status("GET", "/metrics", &ready), StatusCode::OK);
        assert_eq!(
            status("POST", "/healthz", &ready),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(status("GET", "/nope", &ready), StatusCode::NOT_FOUND);
        assert_eq!(
            status("GET", "/readyz", &ready),
            StatusCode::SERVICE_UNAVAILABLE
        );
        ready.listeners_bound.store(true, Ordering::Relaxed);
        ready.upstream_ok_at.store(now(), Ordering::Relaxed);
        assert_eq!(status("GET", "/readyz", &ready), StatusCode::OK);
    }

    /// Over a socket: one answer, then the connection closes; a head
    /// larger than [`MAX_REQUEST`] gets 431; a PUT gets 405.
    #[tokio::test]
    async fn limits_over_a_socket() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            Arc::new(Readiness::default()),
            Duration::from_secs(10),
        ));
        let exchange = |request: Vec<u8>| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            // The server may answer and close before all of it is written.
            let _ = s.write_all(&request).await;
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).into_owned()
        };
        let ok = exchange(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nok\n"), "{ok}");
        let head = ok.to_ascii_lowercase();
        assert!(head.contains("connection: close"), "{ok}");
        let big = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(MAX_REQUEST)
        );
        let r = exchange(big.into_bytes()).await;
        assert!(r.starts_with("HTTP/1.1 431"), "{r}");
        let r = exchange(b"PUT /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".to_vec())
            .await;
        assert!(r.starts_with("HTTP/1.1 405"), "{r}");
    }

    /// A client that never finishes its request head is dropped after
    /// [`REQUEST_TIMEOUT`] (paused clock: no real wait).
    #[tokio::test(start_paused = true)]
    async fn an_unfinished_request_is_dropped() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            Arc::new(Readiness::default()),
            Duration::from_secs(10),
        ));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        assert!(
            started.elapsed() >= REQUEST_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
        assert!(!String::from_utf8_lossy(&out).contains("200 OK"));
    }
}
