//! The listener and the per-connection driver: the one place where POP3
//! bytes meet sockets and the upstream.
//!
//! Data path: socket → [`LineDecoder`] → [`Session::handle`] → [`Action`] →
//! [`Connector`]/[`Upstream`] → bytes back through one buffered writer,
//! flushed when the client's pipelined input is used up (RFC 2449 §6.6).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::AtomicUsize;
use std::sync::RwLock;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::time::timeout;
use tracing::{debug, error, info, info_span, warn, Instrument, Span};

use crate::bridge::lock::MailboxLock;
use crate::bridge::policy::DeleteAction;
use crate::bridge::policy::{device_keyword, valid_device, DeletePolicy, Policy, SessionView};
use crate::error::UpstreamError;
use crate::limits::{IpLimiter, LoginThrottle, Throttled};
use crate::metrics::{metrics, ListenerLabels};
use crate::migrate::runtime::Lookup as MapLookup;
use crate::migrate::store::MapKey;
use crate::oauth::login::{bearer_login, BearerLoginError};
use crate::oauth::{DeviceAuthError, DeviceGrant, OauthRuntime, TokenError};
use crate::pop3::command::Secret;
use crate::pop3::command::{Line, LineDecoder};
use crate::pop3::maildrop::Maildrop;
use crate::pop3::response::{err, MessageEncoder};
use crate::pop3::session::{
    Action, CommitOutcome, FetchFailure, FetchRequest, LoginOutcome, Session, SessionConfig,
};
use crate::proxy;
use crate::routing::{Route, RouteAuth, Router, UidlMapSource};
use crate::stream::MaybeTls;
use crate::tls::ServerTls;
use crate::upstream::{BodySink, Connector, Credentials, FetchEnd, Flow, Snapshot, Upstream};

/// Bytes read from the client at a time. Pipelined commands arrive in one
/// read; lines are limited to 255 octets, so this holds many.
pub const READ_BUFFER: usize = 4096;

/// The client writer's buffer: replies collect here and go out in few
/// segments. Message chunks larger than this bypass it, so it can stay
/// small: it is allocated for every session, idle ones included.
pub const WRITE_BUFFER: usize = 8 * 1024;

/// `-ERR [AUTH]` text when an OAuth2 account's refresh token is gone or
/// revoked: the device's password was right, and only the operator can fix
/// it (`popbridge oauth add <account>`). Names nothing secret.
pub const NEEDS_ENROLMENT_TEXT: &str =
    "Mail account access expired or was revoked; the administrator must re-enrol the account.";

/// `-ERR [SYS/TEMP]` text when the provider or the IMAP server throttles.
pub const THROTTLED_TEXT: &str = "Mail server is busy for this account, try again later.";

/// `-ERR [SYS/TEMP]` text when the IMAP server refused even a fresh token.
pub const TOKEN_REFUSED_TEXT: &str =
    "Mail server refused the account's access token, try again later.";

/// `-ERR [SYS/TEMP]` text for other upstream failures at login.
pub const UNAVAILABLE_TEXT: &str = "Mail server unavailable, try again later.";

pub use crate::oauth::login::{bearer_step, BearerAttempt, BearerStep};

/// The session view of a device on an OAuth2 route: the account is the one
/// the device belongs to; with the `per-device` policy the device's own
/// view is named after its login's local part (devices are separate logins
/// here, so no `+device` suffix is needed).
pub fn device_view(policy: &Policy, grant: &DeviceGrant) -> Result<SessionView, &'static str> {
    if policy.delete != DeletePolicy::PerDevice {
        let mut view = policy.view(&grant.account)?;
        view.account = grant.account.clone();
        return Ok(view);
    }
    let device = grant
        .device
        .rsplit_once('@')
        .map_or(grant.device.as_str(), |(local, _)| local);
    if !valid_device(device) {
        return Err("Invalid device name: use letters, digits, '-', '_' or '.'.");
    }
    let keyword = device_keyword(device);
    Ok(SessionView {
        account: grant.account.clone(),
        device: Some(device.to_string()),
        action: DeleteAction::Keyword(keyword.clone()),
        hide: Some(keyword),
    })
}

/// Settings every session shares.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub session: SessionConfig,
    pub greeting: String,
    /// RFC 1939 §3 autologout timer in TRANSACTION (at least 10 minutes).
    pub idle_timeout: Duration,
    /// Time allowed to log in; also bounds the TLS handshake.
    pub login_timeout: Duration,
    pub max_sessions: usize,
    pub max_sessions_per_ip: usize,
    /// Allow USER/PASS and AUTH without TLS from non-loopback clients.
    pub allow_plaintext_auth: bool,
    /// Loopback clients count as secure.
    pub loopback_is_secure: bool,
    /// Expect a PROXY protocol header from peers in `proxy_trusted`.
    pub proxy_protocol: bool,
    /// Peers allowed to send a PROXY header (load balancers).
    pub proxy_trusted: Vec<ipnet::IpNet>,
}

/// What the listeners share: settings, the upstream, TLS and the limits.
pub struct Shared<C: Connector> {
    pub settings: Arc<ServerSettings>,
    /// Which upstream serves which login.
    pub router: Router<C>,
    /// The certificate for POP3S and STLS, when configured.
    pub tls: Option<Arc<ServerTls>>,
    pub throttle: Arc<LoginThrottle>,
    /// Device logins and access tokens, when a route uses `auth = "oauth2"`.
    pub oauth: Option<Arc<OauthRuntime>>,
}

/// A bound listener: plain POP3 (STLS offered when TLS is configured) or
/// POP3S (TLS from the first byte, RFC 8314).
pub struct Listener {
    pub socket: TcpListener,
    pub implicit_tls: bool,
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
        let id = server.ids.fetch_add(1, Ordering::Relaxed);
        let tls = if listener.implicit_tls {
            "implicit"
        } else {
            "none"
        };
        let span = info_span!("session", id, %peer, client = tracing::field::Empty, tls, user = tracing::field::Empty);
        let shared = server.current();
        let permit = server.sessions.try_acquire();
        let per_ip = server.per_ip.clone();
        let closing = server.closing.subscribe();
        let implicit = listener.implicit_tls;
        // Everything, PROXY header and TLS handshake included, runs in the
        // connection's own task, so a slow client never stalls the accept loop.
        tokio::spawn(
            async move {
                let Some(_permit) = permit else {
                    return refuse(stream, implicit, &shared, "session_limit").await;
                };
                let mut stream = stream;
                let settings = &shared.settings;
                let client = if settings.proxy_protocol
                    && settings
                        .proxy_trusted
                        .iter()
                        .any(|n| n.contains(&peer.ip()))
                {
                    match timeout(proxy::HEADER_TIMEOUT, proxy::read_header(&mut stream)).await {
                        Ok(Ok(proxy::Header::Proxied(addr))) => addr,
                        Ok(Ok(proxy::Header::Local)) => peer,
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
                    peer
                };
                Span::current().record("client", tracing::field::display(client));
                // Limits and throttling count the real client.
                let Some(_slot) = per_ip.acquire(client.ip()) else {
                    return refuse(stream, implicit, &shared, "address_limit").await;
                };
                handle(stream, client, implicit, shared, closing).await
            }
            .instrument(span),
        );
    }
}

/// Over a limit: say so and close, rather than leave the client hanging.
async fn refuse<C: Connector>(
    stream: TcpStream,
    implicit: bool,
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
        let mut stream = if implicit {
            match &shared.tls {
                Some(tls) => ClientStream::Tls(Box::new(tls.acceptor().accept(stream).await?)),
                None => return Ok(()),
            }
        } else {
            ClientStream::Plain(stream)
        };
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await;
}

async fn handle<C: Connector>(
    stream: TcpStream,
    peer: SocketAddr,
    implicit: bool,
    shared: Arc<Shared<C>>,
    closing: watch::Receiver<bool>,
) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!(error = %e, "set_nodelay failed");
    }
    let settings = shared.settings.clone();
    let started = Instant::now();
    let labels = ListenerLabels {
        listener: if implicit { "pop3s" } else { "pop3" },
    };
    metrics().sessions_total.get_or_create(&labels).inc();
    let active = metrics().sessions_active.get_or_create(&labels).clone();
    active.inc();
    // Decrements on every way out of this function.
    let _active = Guard(move || {
        active.dec();
    });
    let stream = if implicit {
        let Some(tls) = &shared.tls else {
            return;
        };
        match timeout(settings.login_timeout, tls.acceptor().accept(stream)).await {
            Ok(Ok(s)) => ClientStream::Tls(Box::new(s)),
            Ok(Err(e)) => {
                info!(error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                info!("TLS handshake timed out");
                return;
            }
        }
    } else {
        ClientStream::Plain(stream)
    };
    let mut session_config = settings.session.clone();
    session_config.stls_available = shared.tls.is_some();
    // Like Dovecot, loopback counts as secure: nothing crosses a network.
    session_config.plaintext_ok =
        settings.allow_plaintext_auth || (settings.loopback_is_secure && peer.ip().is_loopback());
    let mut conn = Connection {
        stream: BufWriter::with_capacity(WRITE_BUFFER, stream),
        inbuf: vec![0; READ_BUFFER].into_boxed_slice(),
        pos: 0,
        end: 0,
        decoder: LineDecoder::default(),
        session: Session::new(session_config, implicit),
        out: Vec::with_capacity(512),
        upstream: None,
        peer,
        shared,
        settings,
        stats: Stats::default(),
        user_recorded: false,
        closing,
        delete_action: DeleteAction::Expunge,
        lock: None,
    };
    debug!(%peer, "connected");
    let end = conn.run().await;
    // Free the mailbox before the (up to 5 s) upstream logout, so a client
    // that reconnects at once is not refused [IN-USE].
    drop(conn.lock.take());
    if let Some(up) = conn.upstream.take() {
        // RFC 1939 §6: without QUIT nothing is removed; just log out.
        up.logout().await;
    }
    if let End::ClientError(e) = &end {
        debug!(error = %e, "client connection error");
    }
    let s = &conn.stats;
    info!(
        reason = end.as_str(),
        retr = s.retr,
        retr_octets = s.retr_octets,
        top = s.top,
        deleted = s.deleted,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "session ended"
    );
}

/// Runs its closure when dropped.
struct Guard<F: FnMut()>(F);

impl<F: FnMut()> Drop for Guard<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// The client connection, plain or TLS.
pub type ClientStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;

/// Counters for the end-of-session log line (as Dovecot's pop3_logout_format).
#[derive(Debug, Default)]
struct Stats {
    retr: u64,
    retr_octets: u64,
    top: u64,
    deleted: u64,
}

/// Why a session ended.
enum End {
    Quit,
    ClientClosed,
    Timeout,
    ClientError(std::io::Error),
    Upstream,
    /// QUIT before login, or too many bad commands.
    Closed,
    /// Ended by the drain deadline at shutdown.
    Shutdown,
}

impl End {
    fn as_str(&self) -> &'static str {
        match self {
            End::Quit => "quit",
            End::ClientClosed => "client closed",
            End::Timeout => "idle timeout",
            End::ClientError(_) => "client i/o error",
            End::Upstream => "upstream failure",
            End::Closed => "closed",
            End::Shutdown => "shutdown",
        }
    }
}

struct Connection<C: Connector> {
    /// The client connection; writes are buffered and flushed once per
    /// response or pipelined batch, reads pass straight through.
    stream: BufWriter<ClientStream>,
    /// Client input; `pos..end` is not yet decoded.
    inbuf: Box<[u8]>,
    pos: usize,
    end: usize,
    decoder: LineDecoder,
    session: Session,
    /// Replies produced by the session, moved to `stream` after each command.
    out: Vec<u8>,
    upstream: Option<C::Conn>,
    peer: SocketAddr,
    shared: Arc<Shared<C>>,
    settings: Arc<ServerSettings>,
    stats: Stats,
    /// The session span's `user` field is set (at the first login attempt).
    user_recorded: bool,
    /// Becomes true at the drain deadline: end after the current command.
    closing: watch::Receiver<bool>,
    /// What QUIT does with DELE'd messages (the route's delete policy).
    delete_action: DeleteAction,
    /// The session lock, when the route asks for one; released on drop.
    lock: Option<MailboxLock>,
}

impl<C: Connector> Connection<C> {
    async fn run(&mut self) -> End {
        match self.drive().await {
            Ok(end) => end,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => End::Timeout,
            Err(e) if e.get_ref().is_some_and(|i| i.is::<ShuttingDown>()) => End::Shutdown,
            Err(e) => End::ClientError(e),
        }
    }

    async fn drive(&mut self) -> std::io::Result<End> {
        self.out.clear();
        crate::pop3::response::ok(&mut self.out, &self.settings.greeting);
        self.send_out().await?;
        loop {
            let Some(line) = self.next_line().await? else {
                return Ok(End::ClientClosed);
            };
            let action = self.session.handle(line, &mut self.out);
            let name = self.session.last_command();
            match action {
                Action::Continue => {
                    self.count(name);
                    self.send_out().await?
                }
                Action::Close => {
                    self.count(name);
                    self.send_out().await?;
                    self.flush().await?;
                    return Ok(End::Closed);
                }
                Action::Login { user, pass } => {
                    // A span field can be recorded once; later attempts
                    // with other names show in their own log lines.
                    if !self.user_recorded {
                        Span::current().record("user", user.as_str());
                        self.user_recorded = true;
                    }
                    let outcome = self.login(&user, &pass).await;
                    self.session.login_result(outcome, &mut self.out);
                    self.count(name);
                    self.send_out().await?;
                }
                Action::StartTls => {
                    self.count(name);
                    self.send_out().await?;
                    self.flush().await?;
                    self.start_tls().await?;
                }
                Action::Fetch(req) => {
                    if let Some(end) = self.fetch(&req, name).await? {
                        return Ok(end);
                    }
                }
                Action::Commit(req) => {
                    let Some(up) = self.upstream.as_mut() else {
                        unreachable!("TRANSACTION always has an upstream");
                    };
                    let outcome =
                        match up.commit(&req.delete, &req.seen, &self.delete_action).await {
                            Ok(report) if report.not_removed.is_empty() => {
                                // Removed from the mailbox: expunged or moved.
                                if matches!(
                                    self.delete_action,
                                    DeleteAction::Expunge | DeleteAction::Move { .. }
                                ) {
                                    self.stats.deleted = req.delete.len() as u64;
                                }
                                CommitOutcome::Done(report.summary)
                            }
                            Ok(report) => {
                                let n = report.not_removed.len();
                                self.stats.deleted = (req.delete.len() - n) as u64;
                                warn!(
                                    not_removed = n,
                                    "QUIT could not remove every marked message"
                                );
                                CommitOutcome::NotRemoved(report.reason.unwrap_or_else(|| {
                                    "Some messages could not be deleted.".into()
                                }))
                            }
                            Err(e) => {
                                metrics().upstream_error(e.kind());
                                error!(error = %e, kind = e.kind(), "commit failed");
                                CommitOutcome::Failed
                            }
                        };
                    self.session
                        .commit_result(outcome, req.delete.len(), &mut self.out);
                    self.count(name);
                    metrics().messages_deleted.inc_by(self.stats.deleted);
                    self.send_out().await?;
                    self.flush().await?;
                    return Ok(End::Quit);
                }
            }
        }
    }

    /// Logs in upstream, unless throttling says no; failures are answered
    /// after a delay that grows with repeated failures from the address.
    async fn login(&mut self, user: &str, pass: &Secret) -> LoginOutcome {
        let throttle = self.shared.throttle.clone();
        let ip = self.peer.ip();
        if let Err(which) = throttle.check(ip, user) {
            // The upstream is not asked: guesses stop here.
            warn!(throttled = ?which, "login refused: too many failures");
            metrics().auth("throttled");
            tokio::time::sleep(throttle.failed(ip, user)).await;
            return LoginOutcome::Failed {
                code: "SYS/TEMP",
                text: match which {
                    Throttled::Address => {
                        "Too many failed logins from your address, try again later."
                    }
                    Throttled::User => "Too many failed logins for this user, try again later.",
                },
            };
        }
        let Some(route) = self.shared.router.route(user) else {
            // No route for this name's domain and no default: as good as a
            // wrong password, and counted as one.
            info!(user, "no route for this login");
            metrics().auth("no_route");
            tokio::time::sleep(throttle.failed(ip, user)).await;
            return LoginOutcome::Refused;
        };
        match &route.auth {
            RouteAuth::Passthrough => {
                let view = match route.policy.view(user) {
                    Ok(v) => v,
                    Err(why) => return policy_refused(user, why),
                };
                let upstream_user = route.login.apply(&view.account).to_string();
                let credentials = Credentials::Password {
                    user: &upstream_user,
                    pass,
                };
                let result = route
                    .connector
                    .login(credentials, view.hide.as_deref(), Some(self.peer))
                    .await;
                self.finish_login(&route, result, &upstream_user, view, user)
                    .await
            }
            RouteAuth::Oauth2 { provider } => self.oauth_login(&route, provider, user, pass).await,
        }
    }

    /// Login on an OAuth2 route: the device password is checked locally
    /// (a failure is a failed login like a wrong password, and the
    /// provider is never contacted); then the account's access token logs
    /// in upstream, with one retry on a fresh token if the IMAP server
    /// refuses it.
    async fn oauth_login(
        &mut self,
        route: &Route<C>,
        provider: &str,
        user: &str,
        pass: &Secret,
    ) -> LoginOutcome {
        let throttle = self.shared.throttle.clone();
        let ip = self.peer.ip();
        let Some(oauth) = self.shared.oauth.clone() else {
            // Validation builds the runtime whenever a route needs it.
            error!(route = %route.name, "OAuth2 route without an OAuth2 runtime");
            metrics().auth("upstream_error");
            return LoginOutcome::Failed {
                code: "SYS/TEMP",
                text: UNAVAILABLE_TEXT,
            };
        };
        let grant = match oauth.authenticate_device(user, pass, ip).await {
            Ok(g) => g,
            Err(DeviceAuthError::Store(why)) => {
                // Not the client's fault: not counted as a failed login.
                warn!(user, error = %why, "device store unavailable");
                metrics().auth("device_store_error");
                return LoginOutcome::Failed {
                    code: "SYS/TEMP",
                    text: UNAVAILABLE_TEXT,
                };
            }
            Err(e) => {
                info!(user, reason = %e, "device login refused");
                metrics().auth("refused");
                tokio::time::sleep(throttle.failed(ip, user)).await;
                return LoginOutcome::Refused;
            }
        };
        let view = match device_view(&route.policy, &grant) {
            Ok(v) => v,
            Err(why) => return policy_refused(user, why),
        };
        let account = grant.account.as_str();
        let result = bearer_login(
            &oauth,
            &*route.connector,
            provider,
            account,
            view.hide.as_deref(),
            Some(self.peer),
        )
        .await;
        let result = match result {
            Ok(session) => Ok(session),
            Err(BearerLoginError::Upstream(e)) => Err(e),
            Err(BearerLoginError::UnknownProvider(_)) => {
                error!(provider, route = %route.name, "unknown OAuth2 provider");
                metrics().auth("upstream_error");
                return LoginOutcome::Failed {
                    code: "SYS/TEMP",
                    text: UNAVAILABLE_TEXT,
                };
            }
            Err(BearerLoginError::Token(TokenError::NeedsEnrolment { reason, .. })) => {
                warn!(
                    account,
                    provider,
                    reason = %reason,
                    "OAuth2 account needs re-enrolment: run `popbridge oauth add {account} --provider {provider}`"
                );
                metrics().auth("oauth_needs_enrolment");
                return LoginOutcome::Failed {
                    code: "AUTH",
                    text: NEEDS_ENROLMENT_TEXT,
                };
            }
            Err(BearerLoginError::Token(TokenError::Throttled { retry_after_secs })) => {
                warn!(
                    account,
                    provider, retry_after_secs, "OAuth2 provider throttles token requests"
                );
                metrics().auth("oauth_throttled");
                return LoginOutcome::Failed {
                    code: "SYS/TEMP",
                    text: THROTTLED_TEXT,
                };
            }
            Err(BearerLoginError::Token(TokenError::Unavailable(why))) => {
                warn!(account, provider, error = %why, "no access token");
                metrics().auth("oauth_unavailable");
                return LoginOutcome::Failed {
                    code: "SYS/TEMP",
                    text: UNAVAILABLE_TEXT,
                };
            }
            // bearer_login logged it and backed the account off.
            Err(BearerLoginError::TokenRefused(_)) => {
                metrics().auth("oauth_token_rejected");
                return LoginOutcome::Failed {
                    code: "SYS/TEMP",
                    text: TOKEN_REFUSED_TEXT,
                };
            }
            Err(BearerLoginError::Throttled(_)) => {
                metrics().auth("upstream_throttled");
                return LoginOutcome::Failed {
                    code: "SYS/TEMP",
                    text: THROTTLED_TEXT,
                };
            }
        };
        let account = account.to_string();
        self.finish_login(route, result, &account, view, user).await
    }

    /// Turns the upstream login's result into the POP3 answer: the session
    /// lock, the maildrop, or the failure (a refused password is a failed
    /// login, throttled and delayed).
    async fn finish_login(
        &mut self,
        route: &Route<C>,
        result: Result<(C::Conn, Snapshot), UpstreamError>,
        upstream_user: &str,
        view: SessionView,
        user: &str,
    ) -> LoginOutcome {
        let throttle = self.shared.throttle.clone();
        let ip = self.peer.ip();
        match result {
            Ok((conn, snap)) => {
                if route.policy.lock {
                    let key = format!("{}/{}", route.lock_scope, upstream_user.to_lowercase());
                    match MailboxLock::try_acquire(key) {
                        Some(lock) => self.lock = Some(lock),
                        None => {
                            info!(route = %route.name, "mailbox locked by another POP3 session");
                            metrics().auth("in_use");
                            tokio::spawn(conn.logout());
                            // RFC 2449 §8.1.2: IN-USE, the maildrop is locked.
                            return LoginOutcome::Failed {
                                code: "IN-USE",
                                text: "Mailbox is in use by another POP3 session.",
                            };
                        }
                    }
                }
                info!(route = %route.name, account = upstream_user, messages = snap.messages.len(), "logged in");
                throttle.succeeded(user);
                metrics().auth("ok");
                self.upstream = Some(conn);
                self.delete_action = view.action;
                let mut maildrop = Maildrop::new(snap.uidvalidity, snap.messages);
                // Precedence as in Dovecot: X-UIDL > imported map > template.
                let mut overrides = match &route.uidl_map {
                    Some(source) => imported_uidls(source, upstream_user, &maildrop).await,
                    None => std::collections::HashMap::new(),
                };
                overrides.extend(snap.xuidl);
                maildrop.set_uidls(overrides, &route.profile.uidl);
                LoginOutcome::Ok(maildrop, route.profile.clone())
            }
            Err(UpstreamError::AuthFailed(text)) => {
                info!(user, upstream = %text, "login refused");
                metrics().auth("refused");
                tokio::time::sleep(throttle.failed(ip, user)).await;
                LoginOutcome::Refused
            }
            Err(e @ UpstreamError::Throttled(_)) => {
                warn!(error = %e, "mail server throttles this account");
                metrics().auth("upstream_throttled");
                LoginOutcome::Failed {
                    code: "SYS/TEMP",
                    text: THROTTLED_TEXT,
                }
            }
            Err(
                e @ UpstreamError::No {
                    command: "SELECT", ..
                },
            ) => {
                warn!(error = %e, "mailbox not available");
                metrics().auth("mailbox_missing");
                LoginOutcome::Failed {
                    code: "SYS/PERM",
                    text: "Mailbox not available.",
                }
            }
            Err(e) => {
                warn!(error = %e, kind = e.kind(), "upstream login failed");
                metrics().auth("upstream_error");
                metrics().upstream_error(e.kind());
                LoginOutcome::Failed {
                    code: "SYS/TEMP",
                    text: UNAVAILABLE_TEXT,
                }
            }
        }
    }

    /// STLS: the handshake, then a fresh start. Whatever the client sent
    /// after STLS and before the handshake is dropped unread (RFC 2595 §4:
    /// commands injected in plaintext must not run inside TLS).
    async fn start_tls(&mut self) -> std::io::Result<()> {
        let Some(tls) = self.shared.tls.clone() else {
            unreachable!("STLS is only offered with TLS configured");
        };
        self.pos = 0;
        self.end = 0;
        self.decoder = LineDecoder::default();
        let old = std::mem::replace(&mut self.stream, BufWriter::new(ClientStream::Upgrading));
        let ClientStream::Plain(tcp) = old.into_inner() else {
            return Err(std::io::Error::other(
                "STLS on a connection that is not plain",
            ));
        };
        let tls_stream = timeout(self.settings.login_timeout, tls.acceptor().accept(tcp))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        self.stream =
            BufWriter::with_capacity(WRITE_BUFFER, ClientStream::Tls(Box::new(tls_stream)));
        self.session.tls_started();
        metrics().stls_total.inc();
        Span::current().record("tls", "stls");
        debug!("STLS handshake done");
        Ok(())
    }

    /// Counts a command in the metrics; its reply is in `out`.
    fn count(&self, name: Option<&'static str>) {
        if let Some(name) = name {
            metrics().command(name, self.out.first() == Some(&b'+'));
        }
    }

    /// Streams RETR/TOP. Returns `Some(end)` when the session must close.
    async fn fetch(
        &mut self,
        req: &FetchRequest,
        name: Option<&'static str>,
    ) -> std::io::Result<Option<End>> {
        let (end, ok) = self.fetch_inner(req).await?;
        if let Some(name) = name {
            metrics().command(name, ok);
        }
        Ok(end)
    }

    /// Streams RETR/TOP: whether to end the session, and whether it worked.
    async fn fetch_inner(&mut self, req: &FetchRequest) -> std::io::Result<(Option<End>, bool)> {
        let Some(up) = self.upstream.as_mut() else {
            unreachable!("TRANSACTION always has an upstream");
        };
        // Anything already produced goes first, in order.
        self.stream.write_all(&self.out).await?;
        self.out.clear();
        let status = match req.top_lines {
            None => format!("+OK {} octets\r\n", req.size),
            Some(_) => "+OK\r\n".to_string(),
        };
        let mut sink = ClientSink {
            writer: &mut self.stream,
            encoder: match req.top_lines {
                None => MessageEncoder::retr(),
                Some(n) => MessageEncoder::top(n),
            },
            status: status.into_bytes(),
            started: false,
            scratch: Vec::new(),
            write_timeout: self.settings.idle_timeout,
        };
        let mut ok = false;
        let result = up
            .fetch(req.uid, req.size, req.top_lines.is_some(), &mut sink)
            .await;
        let started = sink.started;
        match result {
            Ok(FetchEnd::Complete) => {
                let ClientSink {
                    encoder,
                    mut scratch,
                    ..
                } = sink;
                let octets = encoder.consumed();
                scratch.clear();
                encoder.finish(&mut scratch);
                self.write(&scratch).await?;
                match req.top_lines {
                    None => {
                        self.stats.retr += 1;
                        self.stats.retr_octets += octets;
                        metrics().messages_retrieved.inc();
                        metrics().octets_retrieved.inc_by(octets);
                    }
                    Some(_) => self.stats.top += 1,
                }
                self.session.fetch_result(req, Ok(()), &mut self.out);
                ok = true;
            }
            Ok(FetchEnd::Gone) => {
                info!(
                    uid = req.uid,
                    msg = req.msg.get(),
                    "message expunged by another client"
                );
                self.session
                    .fetch_result(req, Err(FetchFailure::Gone), &mut self.out);
            }
            Err(UpstreamError::Io(e)) if started && is_client_error(&e) => {
                return Err(e);
            }
            Err(e) if started => {
                // Part of the message is out after +OK: the only honest end is
                // to close without the terminating "." (never a short +OK).
                metrics().upstream_error(e.kind());
                error!(error = %e, kind = e.kind(), uid = req.uid, "upstream failed mid-message, closing");
                let _ = self.flush().await;
                return Ok((Some(End::Upstream), false));
            }
            Err(e) if e.is_fatal() => {
                metrics().upstream_error(e.kind());
                error!(error = %e, kind = e.kind(), uid = req.uid, "upstream failed");
                err(
                    &mut self.out,
                    Some("SYS/TEMP"),
                    "Lost connection to the mail server, try again later.",
                );
                self.send_out().await?;
                self.flush().await?;
                return Ok((Some(End::Upstream), false));
            }
            Err(e) => {
                metrics().upstream_error(e.kind());
                warn!(error = %e, kind = e.kind(), uid = req.uid, "fetch refused by upstream");
                self.session
                    .fetch_result(req, Err(FetchFailure::Upstream), &mut self.out);
            }
        }
        self.send_out().await?;
        Ok((None, ok))
    }

    /// Next input line; flushes pending replies whenever the buffered input
    /// is used up (the end of a pipelined batch). `None` at EOF.
    async fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        loop {
            if *self.closing.borrow() {
                return self.shutting_down().await;
            }
            self.decoder.set_max(self.session.max_line());
            let mut input = &self.inbuf[self.pos..self.end];
            let before = input.len();
            let line = self.decoder.decode(&mut input);
            self.pos += before - input.len();
            if let Some(line) = line {
                return Ok(Some(line));
            }
            self.flush().await?;
            let wait = if self.session.is_authenticated() {
                self.settings.idle_timeout
            } else {
                self.settings.login_timeout
            };
            let read = tokio::select! {
                r = timeout(wait, self.stream.read(&mut self.inbuf)) => r,
                _ = self.closing.changed() => return self.shutting_down().await,
            };
            let n = match read {
                Ok(r) => r?,
                Err(_) => {
                    info!("client idle too long");
                    self.out.clear();
                    err(&mut self.out, None, "Disconnected for inactivity.");
                    self.send_out().await?;
                    self.flush().await?;
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
            };
            if n == 0 {
                return Ok(None);
            }
            self.pos = 0;
            self.end = n;
        }
    }

    /// The drain deadline passed: tell the client and end the session
    /// (nothing is committed: only QUIT commits).
    async fn shutting_down(&mut self) -> std::io::Result<Option<Line>> {
        self.out.clear();
        err(
            &mut self.out,
            Some("SYS/TEMP"),
            "Server shutting down, try again later.",
        );
        self.send_out().await?;
        self.flush().await?;
        Err(std::io::Error::other(ShuttingDown))
    }

    async fn send_out(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            let out = std::mem::take(&mut self.out);
            let r = self.write(&out).await;
            self.out = out;
            self.out.clear();
            r?;
        }
        Ok(())
    }

    async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        timeout(self.settings.idle_timeout, self.stream.write_all(data))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        timeout(self.settings.idle_timeout, self.stream.flush())
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
    }
}

/// The imported map's UIDLs for this login's snapshot. Never fails the
/// login: a missing map is normal, and a map that cannot be used (corrupt,
/// unreadable, another UIDVALIDITY) is logged and the template serves.
async fn imported_uidls(
    source: &UidlMapSource,
    account: &str,
    maildrop: &Maildrop,
) -> std::collections::HashMap<u32, String> {
    let key = MapKey::new(&source.upstream, account, &source.mailbox);
    let store = source.store.clone();
    let uidvalidity = maildrop.uidvalidity;
    let uids: Vec<u32> = maildrop.visible().map(|(_, e)| e.uid).collect();
    // File I/O (a stat, and a read when the file changed) off the runtime.
    let found =
        tokio::task::spawn_blocking(move || store.lookup(&key, uidvalidity, uids.into_iter()))
            .await;
    match found {
        Ok(Ok(MapLookup::Overrides(o))) => {
            debug!(entries = o.len(), "imported UIDL map applied");
            o
        }
        Ok(Ok(MapLookup::None)) => Default::default(),
        Ok(Ok(MapLookup::StaleUidvalidity { map, mailbox })) => {
            warn!(
                map_uidvalidity = map,
                mailbox_uidvalidity = mailbox,
                "imported UIDL map ignored: the mailbox's UIDVALIDITY changed since it was made"
            );
            Default::default()
        }
        Ok(Err(e)) => {
            error!(error = %e, "imported UIDL map unusable; serving template UIDLs");
            Default::default()
        }
        Err(e) => {
            error!(error = %e, "imported UIDL map lookup failed; serving template UIDLs");
            Default::default()
        }
    }
}

/// A login the route's device policy refuses (RFC 3206 AUTH): logged and
/// counted, answered with the policy's reason.
fn policy_refused(user: &str, why: &'static str) -> LoginOutcome {
    info!(user, why, "login refused by the route's device policy");
    metrics().auth("refused");
    LoginOutcome::Failed {
        code: "AUTH",
        text: why,
    }
}

/// Errors the client side produces (as opposed to the upstream's I/O).
fn is_client_error(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<ClientIoError>())
}

#[derive(Debug, thiserror::Error)]
#[error("client: {0}")]
struct ClientIoError(std::io::Error);

/// The session was ended by the drain deadline.
#[derive(Debug, thiserror::Error)]
#[error("server shutting down")]
struct ShuttingDown;

fn client_io(e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), ClientIoError(e))
}

/// Writes a message to the client as it arrives from the upstream.
struct ClientSink<'a> {
    writer: &'a mut BufWriter<ClientStream>,
    encoder: MessageEncoder,
    /// The `+OK` line, sent only once the first chunk arrived, so a failure
    /// before that can still be answered with `-ERR`.
    status: Vec<u8>,
    started: bool,
    scratch: Vec<u8>,
    write_timeout: Duration,
}

impl ClientSink<'_> {
    async fn write(&mut self, data_is_scratch: bool) -> std::io::Result<()> {
        let data: &[u8] = if data_is_scratch {
            &self.scratch
        } else {
            &self.status
        };
        timeout(self.write_timeout, self.writer.write_all(data))
            .await
            .map_err(|_| client_io(std::io::ErrorKind::TimedOut.into()))?
            .map_err(client_io)
    }
}

impl BodySink for ClientSink<'_> {
    async fn chunk(&mut self, data: &[u8]) -> std::io::Result<Flow> {
        if !self.started {
            self.started = true;
            self.write(false).await?;
        }
        self.scratch.clear();
        self.encoder.encode(data, &mut self.scratch);
        self.write(true).await?;
        Ok(if self.encoder.is_done() {
            Flow::Stop
        } else {
            Flow::Continue
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_views_use_the_grants_account() {
        let grant = DeviceGrant {
            account: "alice+work@gmail.example".into(),
            device: "phone@example.org".into(),
        };
        // Not split on the device separator: the account is the enrolled one.
        let v = device_view(&Policy::default(), &grant).unwrap();
        assert_eq!(v.account, "alice+work@gmail.example");
        assert_eq!(v.action, DeleteAction::Expunge);
        let per_device = Policy {
            delete: DeletePolicy::PerDevice,
            ..Policy::default()
        };
        let v = device_view(&per_device, &grant).unwrap();
        assert_eq!(v.account, "alice+work@gmail.example");
        assert_eq!(v.device.as_deref(), Some("phone"));
        assert_eq!(v.hide.as_deref(), Some("$POP3Del-phone"));
        let odd = DeviceGrant {
            account: "a@b".into(),
            device: "bad name@example.org".into(),
        };
        assert!(device_view(&per_device, &odd).is_err());
    }
}
