//! The authenticated IMAP session ([`ImapConn`]) and its checked command
//! loop: every command goes through [`ImapConn::send`] and
//! [`ImapConn::finish`], which read responses until *our* tagged reply and
//! turn NO, BAD, EOF and timeouts into errors. Any error that may leave a
//! reply unread poisons the connection: it is never used again.

use std::borrow::Cow;
use std::time::Duration;

use async_imap::imap_proto::{RequestId, Response, ResponseCode, Status};
use async_imap::Client;
use tokio::io::BufWriter;
use tokio::time::timeout;
use tracing::{debug, info_span, Instrument};

use super::connect::open_session;
use super::settings::{ImapConfig, UpstreamStream};
use super::{
    BodySink, CommitReport, Connector, Credentials, DeleteAction, FetchEnd, FetchError, Snapshot,
    Upstream, UpstreamError,
};
use crate::metrics::metrics;

/// dropped. async-imap buffers each response whole and would grow its buffer
/// to 512 MiB (imap_stream.rs `MAX_CAPACITY`); our own requests stay far
/// below this: body chunks of [`RETR_CHUNK`], a header per FETCH response,
/// a SEARCH of a maildrop of a million messages (about 8 MiB).
pub const MAX_RESPONSE: u64 = 32 * 1024 * 1024;

/// Our commands are short; the write buffer only has to hold one.
pub(super) const UPSTREAM_WRITE_BUFFER: usize = 4 * 1024;

pub(super) type Stream = BufWriter<Bounded<UpstreamStream>>;

/// A reader that refuses more than [`MAX_RESPONSE`] octets between two
/// parsed responses ([`Bounded::response_done`] resets the count), so a
/// server cannot make async-imap buffer hundreds of MiB for one response.
/// async-imap reads from the socket only when its buffer holds no whole
/// response, so the count covers the current response plus one read ahead.
#[derive(Debug)]
pub(super) struct Bounded<S> {
    pub(super) inner: S,
    read: u64,
    limit: u64,
}

impl<S> Bounded<S> {
    pub(super) fn new(inner: S) -> Self {
        Self {
            inner,
            read: 0,
            limit: MAX_RESPONSE,
        }
    }

    pub(super) fn response_done(&mut self) {
        self.read = 0;
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Bounded<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &r {
            this.read += (buf.filled().len() - before) as u64;
            if this.read > this.limit {
                return std::task::Poll::Ready(Err(std::io::Error::other(format!(
                    "upstream response longer than {} octets",
                    this.limit
                ))));
            }
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Bounded<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Reads the next response, bounded by [`MAX_RESPONSE`] (not by time).
macro_rules! read_bounded {
    ($client:expr) => {{
        let r = $client.read_response().await;
        $client.get_mut().get_mut().response_done();
        r
    }};
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
            let session = open_session(&cfg, credentials, client).await?;
            let mut conn = ImapConn {
                session,
                next_tag: 1,
                config: cfg,
                uidplus: false,
                poisoned: false,
                account: credentials.user().to_string(),
                has_move: false,
                hide_keyword: hide_keyword.map(str::to_string),
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
    /// async-imap parses responses; commands are written by
    /// [`ImapConn::send`] with our own tags.
    pub(super) session: Client<Stream>,
    /// The number in the next command's tag (`pbN`; `pb0` and `pb1` are
    /// used before login).
    pub(super) next_tag: u32,
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

/// Reads the next response, turning timeout and EOF into errors. A macro,
/// because async-imap's response type cannot be named in a signature.
macro_rules! next_response {
    ($conn:expr, $what:expr) => {
        match timeout($conn.config.command_timeout, async {
            read_bounded!($conn.session)
        })
        .await
        {
            Err(_) => Err(UpstreamError::Timeout($what)),
            Ok(Err(e)) => Err(UpstreamError::Io(e)),
            Ok(Ok(None)) => Err(UpstreamError::ConnectionLost),
            Ok(Ok(Some(r))) => Ok(r),
        }
    };
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

impl ImapConn {
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

    /// Sends a tagged command (tags `pb2`, `pb3`...).
    pub(super) async fn send(
        &mut self,
        cmd: &str,
        what: &'static str,
    ) -> Result<RequestId, UpstreamError> {
        use tokio::io::AsyncWriteExt as _;
        self.next_tag += 1;
        let tag = format!("pb{}", self.next_tag);
        let line = format!("{tag} {cmd}\r\n");
        let w = self.session.get_mut();
        timeout(self.config.command_timeout, async {
            w.write_all(line.as_bytes()).await?;
            w.flush().await
        })
        .await
        .map_err(|_| UpstreamError::Timeout(what))??;
        Ok(RequestId(tag))
    }

    /// Reads until the tagged reply to `tag`, handing every other response
    /// to `each`. NO and BAD become errors; the connection stays usable.
    pub(super) async fn finish(
        &mut self,
        tag: &RequestId,
        what: &'static str,
        mut each: impl FnMut(&Response<'_>),
    ) -> Result<String, UpstreamError> {
        loop {
            let resp = next_response!(self, what)?;
            match resp.parsed() {
                Response::Done {
                    tag: t,
                    status,
                    outcome,
                } if t == tag => {
                    let text = outcome_text(&outcome.code, &outcome.information);
                    return match status {
                        Status::Ok => Ok(text),
                        Status::No => Err(UpstreamError::No {
                            command: what,
                            text,
                        }),
                        _ => Err(UpstreamError::Bad {
                            command: what,
                            text,
                        }),
                    };
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
                }
                other => each(other),
            }
        }
    }

    pub(super) async fn exec(
        &mut self,
        cmd: &str,
        what: &'static str,
        each: impl FnMut(&Response<'_>),
    ) -> Result<String, UpstreamError> {
        let tag = self.send(cmd, what).await?;
        self.finish(&tag, what, each).await
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
