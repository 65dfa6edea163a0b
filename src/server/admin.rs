//! The admin HTTP listener: `/metrics` (Prometheus text format), `/healthz`
//! (the process answers) and `/readyz` (listeners bound, and the default
//! upstream answered within the last check interval).
//!
//! A deliberately small HTTP/1.1 server: GET only, one request per
//! connection, bounded request size and time. It is meant for loopback or a
//! cluster-internal network, never the Internet.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tracing::{debug, warn};

use crate::metrics::metrics;

/// The largest request head we read; probes and scrapers send far less.
const MAX_REQUEST: usize = 8 * 1024;
/// How long a client has to send its request.
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
            if let Err(e) = timeout(REQUEST_TIMEOUT, respond(stream, &ready, interval)).await {
                debug!(%peer, error = %e, "admin request timed out");
            }
        });
    }
}

async fn respond(
    mut stream: TcpStream,
    ready: &Readiness,
    interval: Duration,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return reply(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "too large\n",
            )
            .await;
        }
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return reply(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n",
        )
        .await;
    }
    match path {
        "/metrics" => {
            let body = metrics().encode();
            reply(
                &mut stream,
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                &body,
            )
            .await
        }
        "/healthz" => reply(&mut stream, "200 OK", "text/plain", "ok\n").await,
        "/readyz" if ready.is_ready(interval) => {
            reply(&mut stream, "200 OK", "text/plain", "ready\n").await
        }
        "/readyz" => {
            reply(
                &mut stream,
                "503 Service Unavailable",
                "text/plain",
                "not ready\n",
            )
            .await
        }
        _ => reply(&mut stream, "404 Not Found", "text/plain", "not found\n").await,
    }
}

async fn reply(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
