//! The IMAP session: [`Wire`], the socket and its checked command loop, and
//! [`ImapConn`], an authenticated session with the POP3 mailbox selected.
//!
//! popbridge owns the socket: responses are cut by [`super::wire`] (bounded
//! memory, bare LF tolerated, bodies streamed) and parsed by imap-proto
//! (through async-imap's re-export) only as bounded, complete responses.
//! Every command goes through [`Wire::send`] and [`Wire::finish`], which
//! read responses until *our* tagged reply and turn NO, BAD, EOF and
//! timeouts into errors; untagged responses nobody asked for, known or not,
//! are passed on or skipped, never fatal. Any error that may leave a reply
//! unread poisons the connection: it is never used again.

use std::borrow::Cow;
use std::time::Duration;

use async_imap::imap_proto::{Response, ResponseCode, Status};
use tokio::io::AsyncWriteExt;
use tokio::time::timeout;
use tracing::{debug, info_span, Instrument};

use super::connect::open_session;
use super::settings::{ImapConfig, UpstreamStream};
use super::wire::{parse_response, Frame, Framer, ImapReader, Limits, Parsed, ReadError};
use super::{
    BodySink, CommitReport, Connector, Credentials, DeleteAction, FetchEnd, FetchError, NextFetch,
    Snapshot, Upstream, UpstreamError,
};
use crate::metrics::metrics;

pub use super::wire::MAX_RESPONSE;

/// The socket to the IMAP server, and the one loop every command's
/// responses are read through.
pub(super) struct Wire {
    reader: ImapReader<UpstreamStream>,
    /// The number in the next command's tag (`pbN`); `pb0` is the tag of
    /// every command before login and `pb1` the login's.
    next_tag: u32,
    /// The longest wait for the server's next octet, or for a write.
    timeout: Duration,
}

/// The tag of every command before the login (one at a time).
pub(super) const PRE_LOGIN_TAG: &str = "pb0";
/// The tag of the login command (LOGIN or AUTHENTICATE).
pub(super) const AUTH_TAG: &str = "pb1";

impl Wire {
    /// A fresh command loop over `stream` (a new connection, or the TLS
    /// stream after STARTTLS).
    pub(super) fn new(stream: UpstreamStream, timeout: Duration) -> Self {
        Self {
            reader: ImapReader::new(stream, Framer::new(Limits::default()), timeout),
            next_tag: 1,
            timeout,
        }
    }

    /// Writes `bytes` (one command line, or a literal) and flushes, under
    /// the timeout. Lines that carry credentials go through here too:
    /// nothing here logs them.
    pub(super) async fn write(
        &mut self,
        bytes: &[u8],
        what: &'static str,
    ) -> Result<(), UpstreamError> {
        let w = self.reader.get_mut();
        timeout(self.timeout, async {
            w.write_all(bytes).await?;
            w.flush().await
        })
        .await
        .map_err(|_| UpstreamError::Timeout(what))??;
        Ok(())
    }

    /// Writes a long payload (an APPEND literal) in pieces, each under the
    /// timeout: a slow but steady server is not cut off.
    pub(super) async fn write_long(
        &mut self,
        bytes: &[u8],
        what: &'static str,
    ) -> Result<(), UpstreamError> {
        const PIECE: usize = 64 * 1024;
        for piece in bytes.chunks(PIECE) {
            let w = self.reader.get_mut();
            timeout(self.timeout, w.write_all(piece))
                .await
                .map_err(|_| UpstreamError::Timeout(what))??;
        }
        self.write(b"", what).await
    }

    /// Reads until the server's continuation request (`+`) for command
    /// `tag`; its tagged reply instead ends the command: a NO or BAD keeps
    /// the server's words, an OK is out of step.
    pub(super) async fn continuation(
        &mut self,
        tag: &str,
        what: &'static str,
    ) -> Result<(), UpstreamError> {
        loop {
            let Frame::Response(bytes) = self.next(what).await? else {
                return Err(UpstreamError::Protocol(format!("{what}: a literal")));
            };
            match parse_response(bytes) {
                Parsed::Known(Response::Continue(_)) => return Ok(()),
                Parsed::Known(Response::Done {
                    tag: t,
                    status,
                    outcome,
                }) if t.0 == tag => {
                    let text = outcome_text(&outcome.code, &outcome.information);
                    tagged_status(&status, text, what)?;
                    return Err(UpstreamError::Protocol(format!(
                        "{what} answered OK before its literal was sent"
                    )));
                }
                Parsed::Known(Response::Done { tag: t, .. }) => {
                    return Err(UpstreamError::Protocol(format!(
                        "reply to unknown tag {}",
                        t.0
                    )))
                }
                Parsed::Known(_) => {}
                Parsed::Unknown(line) => skip_unknown(line),
            }
        }
    }

    /// Sends `cmd` with the next tag (`pb2`, `pb3`...).
    pub(super) async fn send(
        &mut self,
        cmd: &str,
        what: &'static str,
    ) -> Result<String, UpstreamError> {
        self.next_tag += 1;
        let tag = format!("pb{}", self.next_tag);
        self.send_tagged(&tag, cmd, what).await?;
        Ok(tag)
    }

    /// Sends `cmd` with `tag`, in one write.
    pub(super) async fn send_tagged(
        &mut self,
        tag: &str,
        cmd: &str,
        what: &'static str,
    ) -> Result<(), UpstreamError> {
        let line = format!("{tag} {cmd}\r\n");
        self.write(line.as_bytes(), what).await
    }

    /// The next frame from the server, with read failures as errors.
    pub(super) async fn next(&mut self, what: &'static str) -> Result<Frame<'_>, UpstreamError> {
        self.reader
            .next_frame()
            .await
            .map_err(|e| read_error(e, what))
    }

    /// Streams FETCH bodies instead of buffering them ([`Frame::BodyStart`]
    /// and [`Frame::BodyPiece`]), until switched off (then the read buffer
    /// relaxes to its idle size).
    pub(super) fn stream_bodies(&mut self, on: bool) {
        let framer = self.reader.framer_mut();
        framer.set_stream_bodies(on);
        if !on {
            framer.relax();
        }
    }

    /// Buffered literals of the next responses may be up to `max` octets
    /// (`None`: the default bound).
    pub(super) fn max_literal(&mut self, max: Option<usize>) {
        match max {
            Some(n) => self.reader.framer_mut().set_max_literal(n),
            None => self.reader.framer_mut().reset_max_literal(),
        }
    }

    /// Reads until the tagged reply to `tag`, handing every response to
    /// `each` (the tagged reply last, an untagged BYE too). NO and BAD
    /// become errors; the connection stays usable.
    pub(super) async fn finish(
        &mut self,
        tag: &str,
        what: &'static str,
        mut each: impl FnMut(&Response<'_>),
    ) -> Result<String, UpstreamError> {
        loop {
            let frame = self.next(what).await?;
            let Frame::Response(bytes) = frame else {
                // Bodies stream only while a fetch reads them.
                return Err(UpstreamError::Protocol(format!(
                    "{what}: a message body where none was asked for"
                )));
            };
            let response = match parse_response(bytes) {
                Parsed::Known(r) => r,
                Parsed::Unknown(line) => {
                    skip_unknown(line);
                    continue;
                }
            };
            match &response {
                Response::Done {
                    tag: t,
                    status,
                    outcome,
                } if t.0 == tag => {
                    each(&response);
                    let text = outcome_text(&outcome.code, &outcome.information);
                    let r = tagged_status(status, text, what);
                    self.reader.framer_mut().relax();
                    return r;
                }
                Response::Done { tag: t, .. } => {
                    return Err(UpstreamError::Protocol(format!(
                        "reply to unknown tag {}",
                        t.0
                    )));
                }
                Response::Data {
                    status: Status::Bye,
                    outcome,
                } => {
                    debug!(text = ?outcome.information, "server said BYE");
                    each(&response);
                }
                other => each(other),
            }
        }
    }

    /// [`Wire::send`] then [`Wire::finish`].
    pub(super) async fn exec(
        &mut self,
        cmd: &str,
        what: &'static str,
        each: impl FnMut(&Response<'_>),
    ) -> Result<String, UpstreamError> {
        let tag = self.send(cmd, what).await?;
        self.finish(&tag, what, each).await
    }

    /// The stream, for STARTTLS. RFC 3501 §6.2.1: nothing may follow the
    /// server's OK before the handshake; anything that did is an injection
    /// attempt, and the connection is refused.
    pub(super) fn into_stream(self) -> Result<UpstreamStream, UpstreamError> {
        let (stream, mut framer) = self.reader.into_parts();
        if framer.has_unread() {
            return Err(UpstreamError::Protocol(
                "data after the STARTTLS reply, before the TLS handshake".into(),
            ));
        }
        Ok(stream)
    }
}

/// An untagged response that no parser knows: logged at debug (a bounded
/// prefix) and skipped. RFC 3501 §7 responses only grow with extensions,
/// and a server's private ones (Mailutils' `* n EXPUNGED` is recognised;
/// others exist) must not end a session.
fn skip_unknown(line: &[u8]) {
    const SHOWN: usize = 100;
    let shown = &line[..line.len().min(SHOWN)];
    debug!(response = %String::from_utf8_lossy(shown).trim_end(), "skipping a response popbridge does not know");
}

/// How a read failure reads as an upstream error.
fn read_error(e: ReadError, what: &'static str) -> UpstreamError {
    match e {
        ReadError::Timeout(_) => UpstreamError::Timeout(what),
        ReadError::Closed => UpstreamError::ConnectionLost,
        ReadError::EofInResponse => UpstreamError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed inside a response",
        )),
        ReadError::Wire(w) => UpstreamError::Protocol(w.to_string()),
        ReadError::Io(e) => UpstreamError::Io(e),
    }
}

/// The one meaning of a tagged reply's status (RFC 3501 §7.1): OK is
/// success with the text; NO and BAD are errors of `what`, which leave the
/// connection in step.
pub(super) fn tagged_status(
    status: &Status,
    text: String,
    what: &'static str,
) -> Result<String, UpstreamError> {
    match status {
        Status::Ok => Ok(text),
        Status::No => Err(UpstreamError::No {
            command: what,
            text,
        }),
        _ => Err(UpstreamError::Bad {
            command: what,
            text,
        }),
    }
}

/// The text of a tagged reply: code (when imap-proto knows it) and text.
pub(super) fn outcome_text(code: &Option<ResponseCode<'_>>, info: &Option<Cow<'_, str>>) -> String {
    let info = info.as_deref().unwrap_or("");
    match code {
        // Codes imap-proto does not know (AUTHENTICATIONFAILED, EXPUNGEISSUED,
        // UNAVAILABLE...) stay in the text as the server wrote them.
        Some(c) => format!("[{c:?}] {info}"),
        None => info.to_string(),
    }
}

/// Opens IMAP sessions from an [`ImapConfig`].
#[derive(Debug, Clone)]
pub struct ImapConnector {
    config: std::sync::Arc<ImapConfig>,
}

impl ImapConnector {
    pub fn new(config: ImapConfig) -> Self {
        Self {
            config: std::sync::Arc::new(config),
        }
    }
}

impl Connector for ImapConnector {
    type Conn = ImapConn;

    async fn login(
        &self,
        credentials: Credentials<'_>,
        hide_keyword: Option<&str>,
        client: Option<std::net::SocketAddr>,
    ) -> Result<(ImapConn, Snapshot), UpstreamError> {
        let cfg = self.config.clone();
        let span = info_span!("upstream", op = "login", addr = %cfg.address);
        async move {
            let started = std::time::Instant::now();
            let wire = open_session(&cfg, credentials, client).await?;
            let mut conn = ImapConn {
                wire,
                config: cfg,
                uidplus: false,
                poisoned: false,
                account: credentials.user().to_string(),
                has_move: false,
                hide_keyword: hide_keyword.map(str::to_string),
                uidvalidity: None,
                next: None,
                ahead: None,
                capabilities: Vec::new(),
                marks_expunging: false,
            };
            let r = conn.select_and_snapshot().await;
            let snapshot = conn.note(r)?;
            metrics()
                .upstream_login_seconds
                .observe(started.elapsed().as_secs_f64());
            Ok((conn, snapshot))
        }
        .instrument(span)
        .await
    }
}

/// An authenticated IMAP session with the POP3 mailbox selected.
pub struct ImapConn {
    /// The socket and the command loop.
    pub(super) wire: Wire,
    pub(super) config: std::sync::Arc<ImapConfig>,
    /// The server offers UIDPLUS (RFC 4315): `UID EXPUNGE` is safe.
    pub(super) uidplus: bool,
    /// Set after an error that may have left a reply unread.
    pub(super) poisoned: bool,
    /// The account that logged in: part of the listing cache's key.
    pub(super) account: String,
    /// The server offers MOVE (RFC 6851).
    pub(super) has_move: bool,
    /// Messages carrying this keyword are left out of the snapshot (the
    /// `flag` and `per-device` delete policies).
    pub(super) hide_keyword: Option<String>,
    /// The mailbox's UIDVALIDITY at the last snapshot.
    pub(super) uidvalidity: Option<u32>,
    /// What the client will fetch next, from [`Upstream::fetch_next`].
    pub(super) next: Option<NextFetch>,
    /// A FETCH sent ahead for the next message, not yet read.
    pub(super) ahead: Option<Ahead>,
    /// What the server announced after login, as written (for `popbridge
    /// doctor`; `uidplus` and `has_move` are what the session uses).
    pub(super) capabilities: Vec<String>,
    /// The mailbox takes [`EXPUNGING_KEYWORD`](super::commit::EXPUNGING_KEYWORD)
    /// (PERMANENTFLAGS lists it or `\*`): QUIT marks what it flags
    /// `\Deleted` with it, so a later login can take the flags back when
    /// the expunge never happened.
    pub(super) marks_expunging: bool,
}

/// A body FETCH sent ahead of time (pipelined, RFC 3501 §5.5).
#[derive(Debug)]
pub(super) struct Ahead {
    pub(super) uid: u32,
    /// The section's origin and length; `None` for the whole message.
    pub(super) range: Option<(u64, u64)>,
    pub(super) tag: String,
    /// Its body arrived before it was asked for (a server that answered
    /// out of order) and was dropped: it must be fetched again.
    pub(super) dropped: bool,
    /// Its tagged reply was read already.
    pub(super) done: bool,
}

impl std::fmt::Debug for ImapConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImapConn")
            .field("address", &self.config.address)
            .field("uidplus", &self.uidplus)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl ImapConn {
    /// The capabilities the server announced after login.
    pub fn capabilities(&self) -> &[String] {
        &self.capabilities
    }

    /// Refuses to use a connection that an earlier error left out of step.
    pub(super) fn ensure_usable(&self) -> Result<(), UpstreamError> {
        if self.poisoned {
            Err(UpstreamError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Poisons the connection after an error that may leave a reply unread.
    pub(super) fn note<T>(&mut self, r: Result<T, UpstreamError>) -> Result<T, UpstreamError> {
        if let Err(e) = &r {
            if e.is_fatal() {
                self.poisoned = true;
            }
        }
        r
    }

    /// Runs one command to its tagged reply (see [`Wire::finish`]), after
    /// any FETCH sent ahead was read.
    pub(super) async fn exec(
        &mut self,
        cmd: &str,
        what: &'static str,
        each: impl FnMut(&Response<'_>),
    ) -> Result<String, UpstreamError> {
        self.settle().await?;
        self.wire.exec(cmd, what, each).await
    }

    /// Reads to the end of a FETCH sent ahead and not used (its body is
    /// dropped), so the next command's responses are its own.
    pub(super) async fn settle(&mut self) -> Result<(), UpstreamError> {
        let Some(ahead) = self.ahead.take() else {
            return Ok(());
        };
        if ahead.done {
            return Ok(());
        }
        self.wire.stream_bodies(true);
        let r = self.drop_until(&ahead.tag).await;
        self.wire.stream_bodies(false);
        r
    }

    /// Reads and drops everything up to the tagged reply to `tag`.
    async fn drop_until(&mut self, tag: &str) -> Result<(), UpstreamError> {
        loop {
            if let Frame::Response(bytes) = self.wire.next("UID FETCH").await? {
                if let Parsed::Known(Response::Done { tag: t, .. }) = parse_response(bytes) {
                    if t.0 == tag {
                        return Ok(());
                    }
                    return Err(UpstreamError::Protocol(format!(
                        "reply to unknown tag {}",
                        t.0
                    )));
                }
            }
        }
    }
}

impl Upstream for ImapConn {
    async fn fetch<S: BodySink>(
        &mut self,
        uid: u32,
        size: u64,
        prefix_only: bool,
        sink: &mut S,
    ) -> Result<FetchEnd, FetchError> {
        let span = info_span!(
            "upstream",
            op = if prefix_only { "top" } else { "retr" },
            uid
        );
        async move {
            self.ensure_usable()?;
            let r = self.fetch_inner(uid, size, prefix_only, sink).await;
            // A sink failure leaves the connection in step: the fetch read
            // on to its tagged reply.
            if let Err(FetchError::Upstream(e)) = &r {
                if e.is_fatal() {
                    self.poisoned = true;
                }
            }
            r
        }
        .instrument(span)
        .await
    }

    async fn commit(
        &mut self,
        delete: &[u32],
        seen: &[u32],
        action: &DeleteAction,
    ) -> Result<CommitReport, UpstreamError> {
        let span = info_span!(
            "upstream",
            op = "commit",
            delete = delete.len(),
            seen = seen.len()
        );
        let mut delete = delete.to_vec();
        delete.sort_unstable();
        async move {
            self.ensure_usable()?;
            let r = self.commit_inner(&delete, seen, action).await;
            self.note(r)
        }
        .instrument(span)
        .await
    }

    async fn refresh(&mut self) -> Result<Option<Snapshot>, UpstreamError> {
        let span = info_span!("upstream", op = "refresh", addr = %self.config.address);
        async move {
            self.ensure_usable()?;
            let before = self.uidvalidity;
            let r = self.select_and_snapshot().await;
            let snapshot = self.note(r)?;
            Ok((before == Some(snapshot.uidvalidity)).then_some(snapshot))
        }
        .instrument(span)
        .await
    }

    fn reusable(&self) -> bool {
        !self.poisoned && self.ahead.is_none()
    }

    fn fetch_next(&mut self, next: Option<NextFetch>) {
        self.next = next;
    }

    async fn logout(mut self) {
        if !self.poisoned {
            let _ = timeout(
                Duration::from_secs(5),
                self.exec("LOGOUT", "LOGOUT", |_| {}),
            )
            .await;
        }
    }
}
