//! popbridge: a POP3 server that serves each session from an IMAP mailbox.
//!
//! # Layout
//! - [`pop3`]: the protocol core with no I/O: command parsing
//!   ([`pop3::command`]), the RFC 1939 state machine with STLS and SASL
//!   ([`pop3::session`]) and response encoding with dot-stuffing
//!   ([`pop3::response`]).
//! - [`bridge`]: POP3 meaning on top of IMAP: the maildrop snapshot taken at
//!   login, UIDLs built from UID and UIDVALIDITY (or reused `X-UIDL:`), the
//!   delete policies for shared mailboxes and the optional session lock.
//! - [`upstream`]: the IMAP side behind a narrow trait (log in and snapshot,
//!   stream a message, commit at QUIT), implemented over async-imap, with the
//!   listing cache shared across sessions; [`upstream::sasl`] holds the
//!   login exchanges without I/O (PLAIN, XOAUTH2, OAUTHBEARER and what a
//!   refusal means).
//! - [`server`]: listeners and the per-connection driver, the only place
//!   where sockets, the session and the upstream meet; drain on shutdown.
//! - [`routing`]: which upstream serves a login. [`proxy`]: PROXY protocol
//!   headers. [`tls`]: certificates (reloadable) and upstream verification.
//!   [`stream`]: plain-or-TLS connections. [`limits`]: per-address caps and
//!   failed-login throttling.
//! - [`migrate`]: UIDLs carried over from an old POP3 server (the imported
//!   map and `popbridge migrate`). [`oauth`]: OAuth2 upstreams, the token
//!   store and device logins.
//! - [`admin`] and [`metrics`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`config`]: the TOML file and its validation; [`logging`]: log output
//!   with the libraries that would log secrets switched off; [`error`]: error types
//!   tagged by source.
//!
//! The data path: socket → `LineDecoder` → `Session::handle` → `Action` →
//! `Upstream` → bytes back to the client.

pub mod admin;
pub mod bridge;
pub mod config;
pub mod error;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod migrate;
pub mod oauth;
pub mod pop3;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod stream;
pub mod tls;
pub mod upstream;
