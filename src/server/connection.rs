//! One client connection, driven: the one place where sockets, the POP3
//! session and the upstream meet. It reads lines, hands them to
//! [`Session::handle`], and carries out the [`Action`] it returns: a login
//! through the [`Bridge`], a message streamed from the upstream, the commit
//! at QUIT. It decides nothing about POP3 or IMAP itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, timeout_at, Instant as Deadline};
use tracing::{debug, error, info, warn, Span};

use super::{ServerSettings, Shared, TlsEngine};
use crate::bridge::{Bridge, LoggedIn};
use crate::imap::{
    BodySink, Connector, DeleteAction, FetchEnd, FetchError, Flow, NextFetch, Upstream,
};
use crate::metrics::{metrics, ListenerLabels};
use crate::pop3::command::{Line, LineDecoder};
use crate::pop3::response::{err, MessageEncoder};
use crate::pop3::session::{
    Action, CommitOutcome, FetchFailure, FetchRequest, LoginOutcome, Session,
};
use crate::tls::{MaybeTls, ServerTlsStream};

/// Bytes read from the client at a time. Pipelined commands arrive in one
/// read; lines are limited to 255 octets, so this holds many.
pub const READ_BUFFER: usize = 4096;

/// The client writer's buffer: replies collect here and go out in few
/// segments. Message chunks larger than this bypass it, so it can stay
/// small: it is allocated for every session, idle ones included.
pub const WRITE_BUFFER: usize = 8 * 1024;

/// How long the farewell to a client that missed the login deadline may
/// take to write (the deadline itself has passed by then), and the TLS
/// close at the end of a session.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(5);

/// Who is at the other end of a connection.
#[derive(Debug, Clone, Copy)]
pub(super) struct Peer {
    /// The client: the socket peer, or the address a trusted PROXY header
    /// declared. Logs, limits, throttling and `plaintext_networks` use it.
    pub client: SocketAddr,
    /// The real socket peer is loopback and no PROXY header declared
    /// another client: nothing crossed a network (`loopback_is_secure`).
    /// A declared address never counts, loopback or not.
    pub direct_loopback: bool,
}

/// The listener a connection came in on.
#[derive(Debug, Clone, Copy)]
pub(super) struct On {
    /// TLS from the first byte (POP3S); otherwise plain, with STLS.
    pub implicit: bool,
    /// rustls, or OpenSSL on the legacy listener.
    pub engine: TlsEngine,
    /// The listener's name in metrics (`pop3`, `pop3s`, ...).
    pub name: &'static str,
}

/// Serves one accepted connection (after its PROXY header) to the end.
/// `login_deadline` is when a client that has not logged in is cut off
/// (`pop3.login_timeout_secs` after accept).
pub(super) async fn handle<C: Connector>(
    stream: TcpStream,
    Peer {
        client: peer,
        direct_loopback,
    }: Peer,
    on: On,
    shared: Arc<Shared<C>>,
    closing: watch::Receiver<bool>,
    login_deadline: Deadline,
) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!(error = %e, "set_nodelay failed");
    }
    let settings = shared.settings.clone();
    let started = Instant::now();
    let labels = ListenerLabels { listener: on.name };
    metrics().sessions_total.get_or_create(&labels).inc();
    let active = metrics().sessions_active.get_or_create(&labels).clone();
    active.inc();
    // Decrements on every way out of this function.
    let _active = Guard(move || {
        active.dec();
    });
    let stream = if on.implicit {
        if !shared.has_tls(on.engine) {
            return;
        }
        match timeout_at(login_deadline, shared.accept_tls(on.engine, stream)).await {
            Ok(Ok(s)) => s,
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
    // The legacy listener in STLS mode offers STLS whatever `listen.stls`
    // says: that is what it is for.
    session_config.stls_available = match on.engine {
        TlsEngine::Rustls => settings.stls,
        #[cfg(feature = "legacy-tls")]
        TlsEngine::Legacy => true,
    } && shared.has_tls(on.engine);
    // Like Dovecot, a loopback peer counts as secure: nothing crosses a
    // network. A listed network is the operator's decision.
    let client_ip = peer.ip().to_canonical();
    session_config.plaintext_ok = (settings.loopback_is_secure && direct_loopback)
        || settings
            .plaintext_networks
            .iter()
            .any(|n| n.contains(&client_ip));
    let mut conn = Connection {
        stream: BufWriter::with_capacity(WRITE_BUFFER, stream),
        inbuf: vec![0; READ_BUFFER].into_boxed_slice(),
        pos: 0,
        end: 0,
        decoder: LineDecoder::default(),
        session: Session::new(session_config, on.implicit),
        out: Vec::with_capacity(512),
        logged_in: None,
        peer,
        engine: on.engine,
        shared,
        settings,
        stats: Stats::default(),
        user_recorded: false,
        closing,
        login_deadline,
        farewell: false,
    };
    debug!(%peer, "connected");
    let end = conn.run().await;
    if let Some(logged_in) = conn.logged_in.take() {
        // RFC 1939 §6: without QUIT nothing is removed. The lock is freed
        // first; the upstream session waits for reuse or logs out.
        logged_in.end().await;
    }
    // An upstream failure may have cut a message short: that connection
    // ends as cut, without close_notify.
    if !matches!(end, End::ClientClosed | End::ClientError(_) | End::Upstream) {
        // popbridge ends the session: on TLS with close_notify (RFC 8446
        // §6.1, RFC 5246 §7.2.1), so the client can tell this end from a
        // cut connection (`openssl s_client` reports an unexpected EOF
        // otherwise); then FIN. After the lock is freed and the upstream
        // session pooled, as before: a client that saw the end can log in
        // again at once. Bounded: a client that reads nothing cannot hold
        // the session open.
        let _ = timeout(FAREWELL_TIMEOUT, conn.stream.shutdown()).await;
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

/// The client connection, plain or TLS (rustls, or OpenSSL on the legacy
/// listener).
pub type ClientStream = MaybeTls<ServerTlsStream>;

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
    /// popbridge itself was out of step (a bug): the client was told.
    Internal,
}

/// Why the driver stopped before the session's own end, by source. (The
/// upstream's failures are [`UpstreamError`]s, handled where they happen.)
#[derive(Debug)]
enum Stop {
    /// The client's connection failed, or the client stayed silent (or did
    /// not read) for too long.
    Client(std::io::Error),
    /// The drain deadline at shutdown.
    Shutdown,
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Self {
        Stop::Client(e)
    }
}

type Result<T> = std::result::Result<T, Stop>;

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
            End::Internal => "internal error",
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
    /// The upstream session, its delete action and lock: set by a
    /// successful login, so present exactly in TRANSACTION.
    logged_in: Option<LoggedIn<C::Conn>>,
    peer: SocketAddr,
    /// Which TLS implementation STLS hands the connection to.
    engine: TlsEngine,
    shared: Arc<Shared<C>>,
    settings: Arc<ServerSettings>,
    stats: Stats,
    /// The session span's `user` field is set (at the first login attempt).
    user_recorded: bool,
    /// Becomes true at the drain deadline: end after the current command.
    closing: watch::Receiver<bool>,
    /// Until login, reads, writes and the STLS handshake end here.
    login_deadline: Deadline,
    /// Writing the last words to a client that missed the login deadline.
    farewell: bool,
}

impl<C: Connector> Connection<C> {
    async fn run(&mut self) -> End {
        match self.drive().await {
            Ok(end) => end,
            Err(Stop::Client(e)) if e.kind() == std::io::ErrorKind::TimedOut => End::Timeout,
            Err(Stop::Client(e)) => End::ClientError(e),
            Err(Stop::Shutdown) => End::Shutdown,
        }
    }

    async fn drive(&mut self) -> Result<End> {
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
                    let bridge: &Bridge<C> = &self.shared.bridge;
                    let outcome = match bridge.login(&user, &pass, self.peer).await {
                        Ok((logged_in, maildrop, profile)) => {
                            self.logged_in = Some(logged_in);
                            LoginOutcome::Ok(maildrop, profile)
                        }
                        Err(failure) => LoginOutcome::Failed(failure),
                    };
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
                    let Some(LoggedIn {
                        upstream,
                        delete_action,
                        ..
                    }) = self.logged_in.as_mut()
                    else {
                        return self.out_of_step().await;
                    };
                    let outcome =
                        match upstream.commit(&req.delete, &req.seen, delete_action).await {
                            Ok(report) if report.not_removed.is_empty() => {
                                // Removed from the mailbox: expunged or moved.
                                if matches!(
                                    delete_action,
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
                    // The lock (and its lease in Redis) goes before the
                    // answer: a client that reconnects at once, through any
                    // replica, is not refused [IN-USE].
                    if let Some(lock) = self.logged_in.as_mut().and_then(|l| l.lock.take()) {
                        lock.release().await;
                    }
                    self.count(name);
                    metrics().messages_deleted.inc_by(self.stats.deleted);
                    self.send_out().await?;
                    self.flush().await?;
                    return Ok(End::Quit);
                }
            }
        }
    }

    /// The session asked for something that needs an upstream session and
    /// there is none: a bug. Say so and close; nothing was changed.
    async fn out_of_step(&mut self) -> Result<End> {
        error!("session state and upstream out of step; closing");
        err(
            &mut self.out,
            Some("SYS/TEMP"),
            "Internal error, try again later.",
        );
        self.send_out().await?;
        self.flush().await?;
        Ok(End::Internal)
    }

    /// STLS: the handshake, then a fresh start. Whatever the client sent
    /// after STLS and before the handshake is dropped unread (RFC 2595 §4:
    /// commands injected in plaintext must not run inside TLS).
    async fn start_tls(&mut self) -> Result<()> {
        if !self.shared.has_tls(self.engine) {
            // The session offers STLS only with a certificate configured.
            return Err(Stop::Client(std::io::Error::other(
                "STLS without a certificate",
            )));
        }
        self.pos = 0;
        self.end = 0;
        self.decoder = LineDecoder::default();
        let old = std::mem::replace(&mut self.stream, BufWriter::new(ClientStream::Upgrading));
        let ClientStream::Plain(tcp) = old.into_inner() else {
            return Err(Stop::Client(std::io::Error::other(
                "STLS on a connection that is not plain",
            )));
        };
        // STLS comes before login: the handshake has what is left of the
        // login deadline.
        let shared = self.shared.clone();
        let tls_stream = timeout_at(self.login_deadline, shared.accept_tls(self.engine, tcp))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        self.stream = BufWriter::with_capacity(WRITE_BUFFER, tls_stream);
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
    ) -> Result<Option<End>> {
        let (end, ok) = self.fetch_inner(req).await?;
        if let Some(name) = name {
            metrics().command(name, ok);
        }
        Ok(end)
    }

    /// Streams RETR/TOP: whether to end the session, and whether it worked.
    async fn fetch_inner(&mut self, req: &FetchRequest) -> Result<(Option<End>, bool)> {
        let next = self.next_fetch();
        let Some(LoggedIn { upstream: up, .. }) = self.logged_in.as_mut() else {
            return Ok((Some(self.out_of_step().await?), false));
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
            written: false,
            pending: Vec::new(),
            write_timeout: self.settings.idle_timeout,
        };
        let mut ok = false;
        up.fetch_next(next);
        let result = up
            .fetch(req.uid, req.size, req.top_lines.is_some(), &mut sink)
            .await;
        let started = sink.written;
        match result {
            Ok(FetchEnd::Complete) => {
                let octets = sink.encoder.consumed();
                sink.finish().await.map_err(Stop::Client)?;
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
            Err(FetchError::Sink(e)) => return Err(Stop::Client(e)),
            Err(FetchError::Upstream(e)) if started => {
                // Part of the message is out after +OK: the only honest end is
                // to close without the terminating "." (never a short +OK).
                metrics().upstream_error(e.kind());
                error!(error = %e, kind = e.kind(), uid = req.uid, "upstream failed mid-message, closing");
                let _ = self.flush().await;
                return Ok((Some(End::Upstream), false));
            }
            Err(FetchError::Upstream(e)) if e.is_fatal() => {
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
            Err(FetchError::Upstream(e)) => {
                metrics().upstream_error(e.kind());
                warn!(error = %e, kind = e.kind(), uid = req.uid, "fetch refused by upstream");
                self.session
                    .fetch_result(req, Err(FetchFailure::Upstream), &mut self.out);
            }
        }
        self.send_out().await?;
        Ok((None, ok))
    }

    /// The message the client's next command, already in the input buffer
    /// (pipelined), will fetch: RETR or TOP of a message that exists.
    fn next_fetch(&self) -> Option<NextFetch> {
        if !self.decoder.is_idle() {
            return None;
        }
        let rest = &self.inbuf[self.pos..self.end];
        let lf = memchr::memchr(b'\n', rest)?;
        let line = rest[..lf].strip_suffix(b"\r").unwrap_or(&rest[..lf]);
        let req = self.session.peek_fetch(line)?;
        Some(NextFetch {
            uid: req.uid,
            prefix_only: req.top_lines.is_some(),
        })
    }

    /// Next input line; flushes pending replies whenever the buffered input
    /// is used up (the end of a pipelined batch). `None` at EOF.
    async fn next_line(&mut self) -> Result<Option<Line>> {
        loop {
            if *self.closing.borrow() {
                return self.shutting_down().await;
            }
            self.decoder.set_max(self.session.max_line());
            self.decoder.set_auth_max(self.session.max_auth_line());
            let mut input = &self.inbuf[self.pos..self.end];
            let before = input.len();
            let line = self.decoder.decode(&mut input);
            self.pos += before - input.len();
            if let Some(line) = line {
                return Ok(Some(line));
            }
            self.flush().await?;
            let authenticated = self.session.is_authenticated();
            let until = if authenticated {
                Deadline::now() + self.settings.idle_timeout
            } else {
                self.login_deadline
            };
            let read = tokio::select! {
                r = timeout_at(until, self.stream.read(&mut self.inbuf)) => r,
                _ = self.closing.changed() => return self.shutting_down().await,
            };
            let n = match read {
                Ok(r) => r?,
                Err(_) => {
                    self.out.clear();
                    if authenticated {
                        info!("client idle too long");
                        err(&mut self.out, None, "Disconnected for inactivity.");
                    } else {
                        info!("login time limit reached");
                        err(
                            &mut self.out,
                            None,
                            "Login time limit reached, disconnecting.",
                        );
                        self.farewell = true;
                    }
                    self.send_out().await?;
                    self.flush().await?;
                    return Err(Stop::Client(std::io::ErrorKind::TimedOut.into()));
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
    async fn shutting_down(&mut self) -> Result<Option<Line>> {
        self.out.clear();
        err(
            &mut self.out,
            Some("SYS/TEMP"),
            "Server shutting down, try again later.",
        );
        self.send_out().await?;
        self.flush().await?;
        Err(Stop::Shutdown)
    }

    async fn send_out(&mut self) -> Result<()> {
        if !self.out.is_empty() {
            let out = std::mem::take(&mut self.out);
            let r = self.write(&out).await;
            self.out = out;
            self.out.clear();
            r?;
        }
        Ok(())
    }

    /// When a write or flush must be done: after an idle timeout, and
    /// before login at the login deadline too (a client that does not read
    /// cannot hold an unauthenticated session either).
    fn write_deadline(&self) -> Deadline {
        let now = Deadline::now();
        if self.farewell {
            now + FAREWELL_TIMEOUT
        } else if self.session.is_authenticated() {
            now + self.settings.idle_timeout
        } else {
            self.login_deadline.min(now + self.settings.idle_timeout)
        }
    }

    async fn write(&mut self, data: &[u8]) -> Result<()> {
        Ok(
            timeout_at(self.write_deadline(), self.stream.write_all(data))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??,
        )
    }

    async fn flush(&mut self) -> Result<()> {
        Ok(timeout_at(self.write_deadline(), self.stream.flush())
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??)
    }
}

/// Writes a message to the client as it arrives from the upstream.
///
/// One encoded piece is kept back until the next arrives, so the end of
/// the message and its terminating `.` leave in one write (one TLS record
/// and segment where they fit): a client library that reads the end of a
/// body and the terminator separately can miscount (seen with node-pop3
/// over POP3S), and Dovecot sends them together too.
struct ClientSink<'a, W> {
    writer: &'a mut BufWriter<W>,
    encoder: MessageEncoder,
    /// The `+OK` line, sent with the first piece, so a failure before any
    /// piece arrived can still be answered with `-ERR`.
    status: Vec<u8>,
    /// Something went to the client: after this, a failure can only end
    /// the connection without the terminating `.`.
    written: bool,
    /// Encoded octets not yet written (the `+OK` line and the last piece).
    pending: Vec<u8>,
    write_timeout: Duration,
}

impl<W: tokio::io::AsyncWrite + Unpin + Send> ClientSink<'_, W> {
    /// Writes what is pending, in one write.
    async fn write_pending(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.written = true;
        timeout(self.write_timeout, self.writer.write_all(&self.pending))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        self.pending.clear();
        Ok(())
    }

    /// The message is complete: its last piece and the terminator (RFC
    /// 1939 §3), in one write.
    async fn finish(mut self) -> std::io::Result<()> {
        if self.pending.is_empty() && !self.written {
            // An empty message, never a piece: the status line still goes.
            self.pending.extend_from_slice(&self.status);
        }
        let encoder = self.encoder.clone();
        encoder.finish(&mut self.pending);
        self.write_pending().await
    }
}

impl<W: tokio::io::AsyncWrite + Unpin + Send> BodySink for ClientSink<'_, W> {
    async fn chunk(&mut self, data: &[u8]) -> std::io::Result<Flow> {
        if !self.written && self.pending.is_empty() {
            self.pending.extend_from_slice(&self.status);
        } else {
            self.write_pending().await?;
        }
        self.encoder.encode(data, &mut self.pending);
        Ok(if self.encoder.is_done() {
            Flow::Stop
        } else {
            Flow::Continue
        })
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// Records every write the socket side sees.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl tokio::io::AsyncWrite for Writes {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.0.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// The last piece of a message (here 20 KiB, more than the writer's
    /// buffer) and the terminating "." reach the socket in one write.
    #[tokio::test]
    async fn the_end_of_a_body_and_its_terminator_leave_together() {
        let mut writer = BufWriter::with_capacity(WRITE_BUFFER, Writes::default());
        let mut sink = ClientSink {
            writer: &mut writer,
            encoder: MessageEncoder::retr(),
            status: b"+OK 40960 octets\r\n".to_vec(),
            written: false,
            pending: Vec::new(),
            write_timeout: Duration::from_secs(5),
        };
        let piece = [b"x".repeat(20 * 1024 - 2), b"\r\n".to_vec()].concat();
        sink.chunk(&piece).await.unwrap();
        sink.chunk(&piece).await.unwrap();
        sink.finish().await.unwrap();
        writer.flush().await.unwrap();
        let writes = &writer.get_ref().0;
        let last = writes.last().unwrap();
        assert!(last.ends_with(b"x\r\n.\r\n"), "{} writes", writes.len());
        assert!(last.len() > 20 * 1024, "the whole last piece is in it");
        assert!(writes[0].starts_with(b"+OK 40960 octets\r\nxxx"));
    }
}
