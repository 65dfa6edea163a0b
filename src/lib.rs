//! popbridge: a POP3 server that serves each session from an IMAP mailbox.
//!
//! # Layout
//! The data path reads top to bottom: socket → POP3 command → bridge
//! decision → IMAP operation → bytes back. Each module imports only the
//! modules listed below it (a test, `layering`, holds the code to this):
//!
//! - [`cli`]: the command line: serve, `migrate`, `oauth`, `device`,
//!   `--probe`; log output. May use everything below.
//! - [`app`]: turns a configuration into the running service: checks it,
//!   builds routes, bridge and listeners, reloads on SIGHUP.
//! - [`server`]: listeners, connection limits, PROXY protocol, the admin
//!   HTTP listener, and the per-connection driver, the one place where
//!   sockets, the POP3 session and the upstream meet.
//! - [`bridge`]: the decisions: which route a login takes (static routes,
//!   or an HTTP directory for the logins they do not match), throttling, the
//!   IMAP login, delete policies and the session lock, UIDL precedence, and
//!   the one table of what the client is told when something fails.
//! - [`oauth`] and [`migrate`]: OAuth2 upstreams (tokens, device logins)
//!   and UIDL continuity from an old POP3 server (the imported maps). They
//!   do not import each other.
//! - [`cluster`]: the one Redis connection (`redis://`, `rediss://`,
//!   bounded timeouts) shared by the OAuth2 token store and the cluster
//!   state of several replicas (session leases and login throttles, in
//!   [`bridge`]).
//! - [`imap`]: popbridge's IMAP client behind the narrow
//!   [`imap::Connector`] / [`imap::Upstream`] interface: connect, log in,
//!   snapshot, stream a message, commit at QUIT.
//! - Leaves, importing nothing from popbridge: [`pop3`] (the protocol with
//!   no I/O: commands, the state machine, responses, the maildrop snapshot,
//!   UIDL formats), [`config`] (the TOML file, its small types and
//!   validation without I/O), [`tls`] (certificates and plain-or-TLS
//!   streams), [`metrics`] and [`clock`].

pub mod app;
pub mod bridge;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod imap;
pub mod metrics;
pub mod migrate;
pub mod oauth;
pub mod pop3;
pub mod server;
pub mod tls;

#[cfg(test)]
mod layering;
