//! The POP3 service on its sockets: listeners, connection limits, PROXY
//! protocol headers, each connection's TLS handshake in its own task, and
//! the drain at shutdown. Each connection is then driven by
//! [`connection`], the one place where sockets, the POP3 session and the
//! upstream meet.
//!
//! Data path: socket → [`crate::pop3::command::LineDecoder`] →
//! [`crate::pop3::session::Session::handle`] → [`crate::bridge::Bridge`] /
//! [`crate::imap::Upstream`] → bytes back through one buffered writer,
//! flushed when the client's pipelined input is used up (RFC 2449 §6.6).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::time::timeout;
use tracing::{info, info_span, warn, Instrument, Span};

use crate::bridge::Bridge;
use crate::imap::Connector;
use crate::metrics::metrics;
use crate::pop3::response::err;
use crate::pop3::session::SessionConfig;
use crate::tls::{ServerTls, ServerTlsStream};

pub mod admin;
mod connection;
pub mod limits;
pub mod proxy;

pub use connection::{ClientStream, READ_BUFFER, WRITE_BUFFER};
use limits::IpLimiter;

/// Settings every session shares.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub session: SessionConfig,
    pub greeting: String,
    /// RFC 1939 §3 autologout timer in TRANSACTION (at least 10 minutes).
    pub idle_timeout: Duration,
    /// Time from accept to a successful login: the PROXY header, the TLS
    /// handshake (POP3S or STLS) and every command before login share it,
    /// so a client that trickles bytes cannot hold a session unauthenticated.
    pub login_timeout: Duration,
    pub max_sessions: usize,
    pub max_sessions_per_ip: usize,
    /// Clients in these networks may log in without TLS (`allow_plaintext`
    /// puts every network here).
    pub plaintext_networks: Vec<ipnet::IpNet>,
    /// A direct loopback peer (no PROXY header declaring another client)
    /// counts as secure.
    pub loopback_is_secure: bool,
    /// Offer STLS on the plain listener (when a certificate is configured).
    pub stls: bool,
    /// Expect a PROXY protocol header from peers in `proxy_trusted`.
    pub proxy_protocol: bool,
    /// Peers allowed to send a PROXY header (load balancers).
    pub proxy_trusted: Vec<ipnet::IpNet>,
}

/// What the listeners share: settings, the bridge and TLS.
pub struct Shared<C: Connector> {
    pub settings: Arc<ServerSettings>,
    /// Routes, throttling and OAuth2: what logins consult.
    pub bridge: Bridge<C>,
    /// The certificate for POP3S and STLS, when configured.
    pub tls: Option<Arc<ServerTls>>,
    /// The same certificate in an OpenSSL context for the legacy listener
    /// (`[legacy_tls]`), when configured.
    #[cfg(feature = "legacy-tls")]
    pub legacy_tls: Option<Arc<crate::tls::legacy::LegacyTls>>,
}

impl<C: Connector> Shared<C> {
    /// Whether `engine` has a certificate to present.
    fn has_tls(&self, engine: TlsEngine) -> bool {
        match engine {
            TlsEngine::Rustls => self.tls.is_some(),
            #[cfg(feature = "legacy-tls")]
            TlsEngine::Legacy => self.legacy_tls.is_some(),
        }
    }

    /// The server side of a TLS handshake on `tcp` with `engine`.
    async fn accept_tls(&self, engine: TlsEngine, tcp: TcpStream) -> std::io::Result<ClientStream> {
        let no_cert = || std::io::Error::other("TLS without a certificate");
        let tls = match engine {
            TlsEngine::Rustls => {
                let tls = self.tls.as_ref().ok_or_else(no_cert)?;
                ServerTlsStream::Rustls(tls.acceptor().accept(tcp).await?)
            }
            #[cfg(feature = "legacy-tls")]
            TlsEngine::Legacy => {
                let tls = self.legacy_tls.as_ref().ok_or_else(no_cert)?;
                let s = tls.accept(tcp).await?;
                tracing::debug!(
                    protocol = s.ssl().version_str(),
                    cipher = s.ssl().current_cipher().map(|c| c.name()),
                    "legacy TLS handshake done"
                );
                ServerTlsStream::OpenSsl(s)
            }
        };
        Ok(ClientStream::Tls(Box::new(tls)))
    }
}

/// Which TLS implementation serves a listener's handshakes (POP3S or STLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsEngine {
    /// rustls, TLS 1.2 and 1.3: the plain and POP3S listeners.
    Rustls,
    /// OpenSSL, down to `legacy_tls.min_version`: the legacy listener
    /// (cargo feature `legacy-tls`).
    #[cfg(feature = "legacy-tls")]
    Legacy,
}

/// A bound listener: plain POP3 (STLS offered when TLS is configured) or
/// POP3S (TLS from the first byte, RFC 8314); rustls, or OpenSSL on the
/// legacy listener.
pub struct Listener {
    pub socket: TcpListener,
    pub implicit_tls: bool,
    pub engine: TlsEngine,
}

impl Listener {
    /// The listener's name in metrics and session logs.
    pub fn name(&self) -> &'static str {
        match (self.engine, self.implicit_tls) {
            (TlsEngine::Rustls, false) => "pop3",
            (TlsEngine::Rustls, true) => "pop3s",
            #[cfg(feature = "legacy-tls")]
            (TlsEngine::Legacy, false) => "legacy_pop3",
            #[cfg(feature = "legacy-tls")]
            (TlsEngine::Legacy, true) => "legacy_pop3s",
        }
    }
}

/// Counts open sessions against a limit that a reload may change, and
/// lets shutdown wait for the count to reach zero.
#[derive(Debug)]
pub struct ActiveSessions {
    count: AtomicUsize,
    max: AtomicUsize,
    idle: Notify,
}

/// One session's place in [`ActiveSessions`]; dropping it frees the place.
pub struct SessionPermit(Arc<ActiveSessions>);

impl Drop for SessionPermit {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl ActiveSessions {
    fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            count: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
            idle: Notify::new(),
        })
    }

    fn try_acquire(self: &Arc<Self>) -> Option<SessionPermit> {
        let before = self.count.fetch_add(1, Ordering::AcqRel);
        let permit = SessionPermit(self.clone());
        (before < self.max.load(Ordering::Relaxed)).then_some(permit)
    }

    /// Sessions open now.
    pub fn open(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// The server: what survives a configuration reload (session counts,
/// per-address counts, the shutdown signal) plus the current configuration.
pub struct Server<C: Connector> {
    shared: RwLock<Arc<Shared<C>>>,
    sessions: Arc<ActiveSessions>,
    per_ip: Arc<IpLimiter>,
    ids: AtomicU64,
    /// Set at the drain deadline: sessions end after their current command.
    closing: watch::Sender<bool>,
}

impl<C: Connector> Server<C> {
    pub fn new(shared: Shared<C>) -> Arc<Self> {
        Arc::new(Self {
            sessions: ActiveSessions::new(shared.settings.max_sessions),
            per_ip: IpLimiter::new(shared.settings.max_sessions_per_ip),
            shared: RwLock::new(Arc::new(shared)),
            ids: AtomicU64::new(1),
            closing: watch::channel(false).0,
        })
    }

    /// The configuration new sessions get.
    pub fn current(&self) -> Arc<Shared<C>> {
        self.shared
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Installs a new configuration for new sessions; running sessions keep
    /// theirs. Limits apply from now on.
    pub fn reload(&self, shared: Shared<C>) {
        self.sessions
            .max
            .store(shared.settings.max_sessions, Ordering::Relaxed);
        self.per_ip.set_max(shared.settings.max_sessions_per_ip);
        *self.shared.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(shared);
    }

    /// Sessions open now.
    pub fn open_sessions(&self) -> usize {
        self.sessions.open()
    }

    /// Accepts connections on every listener until `shutdown` resolves, then
    /// drains: no new connections, open sessions go on for up to `drain`,
    /// then the rest end after their current command with `-ERR [SYS/TEMP]`.
    /// Returns true when every session ended in time.
    pub async fn serve(
        self: Arc<Self>,
        listeners: Vec<Listener>,
        shutdown: impl std::future::Future<Output = ()>,
        drain: Duration,
    ) -> bool {
        let mut tasks = tokio::task::JoinSet::new();
        for l in listeners {
            tasks.spawn(accept_loop(l, self.clone()));
        }
        shutdown.await;
        // Ending the accept loops closes the listening sockets.
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        info!(
            open = self.open_sessions(),
            deadline_secs = drain.as_secs(),
            "draining"
        );
        if timeout(drain, self.sessions.wait_idle()).await.is_ok() {
            return true;
        }
        info!(
            open = self.open_sessions(),
            "drain deadline: closing the remaining sessions"
        );
        let _ = self.closing.send(true);
        // Sessions end after their current command; give that a bound.
        timeout(DRAIN_GRACE, self.sessions.wait_idle())
            .await
            .is_ok()
    }
}

/// After the drain deadline, how long sessions get to finish the command
/// they are running (a large RETR, a commit) before the process exits anyway.
pub const DRAIN_GRACE: Duration = Duration::from_secs(30);

async fn accept_loop<C: Connector>(listener: Listener, server: Arc<Server<C>>) {
    loop {
        let (stream, peer) = match listener.socket.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // The login deadline counts from here.
        let accepted = tokio::time::Instant::now();
        let id = server.ids.fetch_add(1, Ordering::Relaxed);
        let tls = if listener.implicit_tls {
            "implicit"
        } else {
            "none"
        };
        let name = listener.name();
        let span = info_span!("session", id, %peer, listener = name, client = tracing::field::Empty, tls, user = tracing::field::Empty);
        let shared = server.current();
        let permit = server.sessions.try_acquire();
        let per_ip = server.per_ip.clone();
        let closing = server.closing.subscribe();
        let on = connection::On {
            implicit: listener.implicit_tls,
            engine: listener.engine,
            name,
        };
        // Everything, PROXY header and TLS handshake included, runs in the
        // connection's own task, so a slow client never stalls the accept loop.
        tokio::spawn(
            async move {
                let Some(_permit) = permit else {
                    return refuse(stream, on, &shared, "session_limit").await;
                };
                let mut stream = stream;
                let settings = &shared.settings;
                // `proxied`: a trusted PROXY header declared the client, so
                // the socket peer is the load balancer, not the client.
                let (client, proxied) = if settings.proxy_protocol
                    && settings
                        .proxy_trusted
                        .iter()
                        .any(|n| n.contains(&peer.ip()))
                {
                    match timeout(proxy::HEADER_TIMEOUT, proxy::read_header(&mut stream)).await {
                        Ok(Ok(proxy::Header::Proxied(addr))) => (addr, true),
                        Ok(Ok(proxy::Header::Local)) => (peer, false),
                        Ok(Err(e)) => {
                            warn!(error = %e, "bad PROXY header, closing");
                            metrics().refused("proxy_header");
                            return;
                        }
                        Err(_) => {
                            warn!("no PROXY header in time, closing");
                            metrics().refused("proxy_header");
                            return;
                        }
                    }
                } else {
                    (peer, false)
                };
                Span::current().record("client", tracing::field::display(client));
                // Limits and throttling count the real client (an IPv6
                // client by its network: limits.ipv6_prefix_len).
                let key = shared.bridge.throttle.address_key(client.ip());
                let Some(_slot) = per_ip.acquire(key) else {
                    return refuse(stream, on, &shared, "address_limit").await;
                };
                let login_deadline = accepted + shared.settings.login_timeout;
                let peer = connection::Peer {
                    client,
                    direct_loopback: !proxied && peer.ip().to_canonical().is_loopback(),
                };
                connection::handle(stream, peer, on, shared, closing, login_deadline).await
            }
            .instrument(span),
        );
    }
}

/// Over a limit: say so and close, rather than leave the client hanging.
async fn refuse<C: Connector>(
    stream: TcpStream,
    on: connection::On,
    shared: &Shared<C>,
    why: &'static str,
) {
    warn!(reason = why, "connection refused");
    metrics().refused(why);
    let mut out = Vec::new();
    err(
        &mut out,
        Some("SYS/TEMP"),
        "Too many connections, try again later.",
    );
    let _ = timeout(Duration::from_secs(5), async {
        let mut stream = if on.implicit {
            if !shared.has_tls(on.engine) {
                return Ok(());
            }
            shared.accept_tls(on.engine, stream).await?
        } else {
            ClientStream::Plain(stream)
        };
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests;
