//! popbridge's integration tests, as one test crate: the harness is compiled
//! once, and every test runs in one process, so one port allocator
//! (`common/ports`) hands out every port the tests choose.
//!
//! # Layout
//!
//! - `common/`: the harness. Private Dovecot, redis-server and OAuth2
//!   servers, other IMAP upstreams (`common/servers`: Cyrus, Courier,
//!   Mailutils imap4d, Dovecot without UIDPLUS), the popbridge binary as a
//!   server or a command, byte-exact POP3 and minimal IMAP clients, real
//!   POP3 clients that keep mail, a corpus of awkward messages, test
//!   certificates, loopback ports.
//! - `oauth_support`: a data directory, store key and configuration for
//!   the `popbridge oauth|device` commands (`oauth_cli`, `oauth_store`).
//! - one module per area, each against real servers:
//!   - the POP3 session: `transactions`, `parity`, `cache`, `xuidl`,
//!     `policies`;
//!   - real clients and hostile input: `clients`, `security`;
//!   - the upstream side: `compat` (one scenario on every IMAP server of
//!     `common/servers`), `faults`, `client_id`, `tls`;
//!   - several replicas behind HAProxy sharing Redis: `cluster`;
//!   - routing by an HTTP directory (a small one runs in the test):
//!     `directory`;
//!   - old devices on the OpenSSL listener (cargo feature `legacy-tls`,
//!     run by `scripts/test.sh` in a second pass): `legacy_tls`;
//!   - running it: `config_cli`, `operations`, `deploy`, `doctor`,
//!     `monitoring` (deploy/monitoring against a live scrape), `package`
//!     (the Debian package, installed and purged; root only);
//!   - moving users: `cutover`, `migration`, `capture_pairs`;
//!   - OAuth2 upstreams: `oauth`, `oauth_cli`, `oauth_store`,
//!     `oauth_harness`;
//!   - the harness itself: `harness_selftest`, `servers_selftest`.
//!
//! Files the tests read from the repository: `config/` (the example
//! configuration), `deploy/`, `scripts/build-deb.sh` and
//! `tests/oauth_server.py`.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
mod oauth_support;

mod cache;
mod capture_pairs;
mod client_id;
mod clients;
mod cluster;
mod compat;
mod config_cli;
mod cutover;
mod deploy;
mod directory;
mod doctor;
mod faults;
mod hardening;
mod harness_selftest;
#[cfg(feature = "legacy-tls")]
mod legacy_tls;
mod migration;
mod monitoring;
mod oauth;
mod oauth_cli;
mod oauth_harness;
mod oauth_store;
mod operations;
mod package;
mod parity;
mod policies;
mod reuse;
mod security;
mod servers_selftest;
mod tls;
mod transactions;
mod xuidl;
