//! The IMAP side: popbridge's client of the upstream server, behind a narrow
//! interface: log in and take a snapshot, stream one message, commit changes
//! at QUIT, log out.
//!
//! Everything POP3 needs from a mail store goes through [`Connector`] and
//! [`Upstream`], and the credential types here; the implementation is
//! [`ImapConnector`] / [`ImapConn`], split by concern:
//! - [`settings`]: how one server is reached ([`ImapConfig`]);
//! - [`connect`]: TCP, TLS or STARTTLS, greeting, capabilities, ID;
//! - [`login`] and [`sasl`]: passwords and SASL exchanges;
//! - [`conn`]: the session and its checked command loop;
//! - [`snapshot`] (with the listing [`cache`]), [`fetch`], [`commit`]: what
//!   a POP3 session asks of it; [`bulk`]: headers and APPEND for
//!   `popbridge migrate`;
//! - [`syntax`]: the IMAP syntax popbridge writes.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Instant;

use crate::config::ProviderSasl;
use crate::pop3::command::Secret;

pub mod cache;
#[macro_use]
mod conn;
mod bulk;
mod commit;
mod connect;
pub mod error;
#[cfg(test)]
pub mod fake;
mod fetch;
mod login;
pub mod sasl;
pub mod settings;
mod snapshot;
pub mod syntax;
#[cfg(test)]
mod tests;
pub mod wire;

pub use conn::{ImapConn, ImapConnector, MAX_RESPONSE};
pub use error::UpstreamError;
pub use fetch::{HOLD_MAX, TOP_CHUNK};
pub use settings::{host_of, ImapConfig, UpstreamStream, UpstreamTlsSetup};
pub use snapshot::capability_name;
pub use syntax::{modified_utf7, uid_sets, x_uidl, MAX_UID_SET_LEN};

/// A bearer token, never printed.
#[derive(Clone)]
pub struct AccessToken {
    token: Arc<str>,
    /// When popbridge stops using it (shortly before the provider's expiry).
    pub expires_at: Instant,
}

impl AccessToken {
    pub fn new(token: impl Into<Arc<str>>, expires_at: Instant) -> Self {
        Self {
            token: token.into(),
            expires_at,
        }
    }

    /// The token itself, for the SASL exchange only.
    pub fn expose(&self) -> &str {
        &self.token
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken(***)")
    }
}

/// What QUIT does with the marked messages, for one session (the route's
/// delete policy applied to the login).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteAction {
    Expunge,
    /// Add this keyword.
    Keyword(String),
    /// Move to this mailbox, creating it first if `create`.
    Move {
        mailbox: String,
        create: bool,
    },
    Keep,
}

/// How popbridge logs in to the IMAP server.
#[derive(Debug, Clone, Copy)]
pub enum Credentials<'a> {
    /// The POP3 client's own user name and password, passed on
    /// (`auth = "passthrough"`).
    Password { user: &'a str, pass: &'a Secret },
    /// An OAuth2 access token for `account` (`auth = "oauth2"`), presented
    /// with the provider's SASL mechanism.
    Bearer {
        account: &'a str,
        token: &'a AccessToken,
        sasl: ProviderSasl,
    },
}

impl Credentials<'_> {
    /// The IMAP user name: the account the session acts for.
    pub fn user(&self) -> &str {
        match self {
            Credentials::Password { user, .. } => user,
            Credentials::Bearer { account, .. } => account,
        }
    }
}

/// The mailbox at login: what the maildrop is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub uidvalidity: u32,
    /// (UID, RFC822.SIZE) of every message.
    pub messages: Vec<(u32, u64)>,
    /// Valid `X-UIDL:` header values by UID, when the route reuses them.
    pub xuidl: std::collections::HashMap<u32, String>,
}

/// A message the client will ask for next (see [`Upstream::fetch_next`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextFetch {
    pub uid: u32,
    /// TOP rather than RETR.
    pub prefix_only: bool,
}

/// Whether the consumer of a message wants more of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// TOP has what it needs: stop fetching.
    Stop,
}

/// Receives a message's bytes in order, chunk by chunk.
pub trait BodySink: Send {
    /// Called at least once per successful fetch (with an empty chunk for an
    /// empty message), in order. An error ends the fetch.
    fn chunk(&mut self, data: &[u8]) -> impl Future<Output = io::Result<Flow>> + Send;
}

/// How a fetch ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchEnd {
    /// Every octet (or, after [`Flow::Stop`], as many as were wanted) was
    /// delivered, and the total matched the expected size.
    Complete,
    /// The message no longer exists (expunged by someone else); nothing was
    /// delivered to the sink.
    Gone,
}

/// Why a fetch failed, by side: the IMAP server, or the sink the message
/// was going to (the POP3 client).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("writing the message: {0}")]
    Sink(io::Error),
}

/// What a commit achieved.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommitReport {
    /// UIDs that were asked to be removed and still exist afterwards.
    pub not_removed: Vec<u32>,
    /// Why, when `not_removed` is not empty.
    pub reason: Option<String>,
    /// What happened, for QUIT's `+OK` when it was not a plain deletion
    /// (hidden, moved, kept).
    pub summary: Option<String>,
}

/// Opens authenticated upstream sessions.
pub trait Connector: Send + Sync + 'static {
    type Conn: Upstream;
    /// Connects, logs in with `credentials`, selects the mailbox and takes
    /// the snapshot. Messages with `hide_keyword` are left out of the
    /// snapshot; `client` is the POP3 client's address, which the upstream
    /// may be told.
    fn login(
        &self,
        credentials: Credentials<'_>,
        hide_keyword: Option<&str>,
        client: Option<std::net::SocketAddr>,
    ) -> impl Future<Output = Result<(Self::Conn, Snapshot), UpstreamError>> + Send;
}

/// One authenticated upstream session with the mailbox selected.
pub trait Upstream: Send + 'static {
    /// Streams message `uid` (of `size` octets per the snapshot) into `sink`.
    /// `prefix_only` hints that only the start is wanted (TOP), so fetch in
    /// small pieces. An upstream failure after the first chunk was delivered
    /// is an error, never a shorter `Complete`.
    fn fetch<S: BodySink>(
        &mut self,
        uid: u32,
        size: u64,
        prefix_only: bool,
        sink: &mut S,
    ) -> impl Future<Output = Result<FetchEnd, FetchError>> + Send;

    /// The POP3 client has already sent the command after the next fetch:
    /// a fetch of `next` (RFC 2449 PIPELINING). The next [`Upstream::fetch`]
    /// may ask the server for it ahead, while the current body is still
    /// going out, so it is on its way when asked for. A hint: without it
    /// nothing changes.
    fn fetch_next(&mut self, next: Option<NextFetch>) {
        let _ = next;
    }

    /// Marks `seen` as `\Seen`, then removes exactly the messages `delete`.
    /// `action` says what "remove" means (the delete policy).
    fn commit(
        &mut self,
        delete: &[u32],
        seen: &[u32],
        action: &DeleteAction,
    ) -> impl Future<Output = Result<CommitReport, UpstreamError>> + Send;

    /// Ends the session politely; errors are ignored.
    fn logout(self) -> impl Future<Output = ()> + Send;

    /// A fresh snapshot for a session kept from an earlier POP3 session
    /// (the mailbox selected again, the listing through the cache).
    /// `Ok(None)` when the mailbox's UIDVALIDITY changed meanwhile: the
    /// caller must not use this session for the new one.
    fn refresh(&mut self) -> impl Future<Output = Result<Option<Snapshot>, UpstreamError>> + Send;

    /// Whether the session is in step and idle, so it may be kept for the
    /// next POP3 session.
    fn reusable(&self) -> bool;
}
