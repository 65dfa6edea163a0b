//! Configuration: a TOML file, then `POPBRIDGE_*` environment variables and
//! command-line flags on top (see `cli`), then [`Config::validate`].
//!
//! Every key has a default and a doc comment; unknown keys are errors, so a
//! typo never silently falls back to a default. `config/popbridge.example.toml`
//! documents every key and is parsed by a test.
//!
//! This module is a leaf: it owns the small types its keys hold and imports
//! nothing else from popbridge. [`Config::validate`] checks what the file
//! says without touching the file system; reading certificates, keys and
//! secrets, and parsing UIDL templates, happens where they are used (see
//! `app::check`).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod cluster;
pub mod directory;
pub mod oauth;
pub mod routes;

pub use directory::{DirectoryConfig, DirectorySettings};
pub use routes::{EffectiveRoute, RouteConfig, RouteIndex};

/// A configuration problem: the text says what and where.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Default for `upstream.reuse_idle_secs`: devices that poll every one to
/// five minutes (printers, scanners, fetchmail's common 300 s) find their
/// session still open, while an idle upstream session, and a password
/// changed meanwhile, last at most five minutes after the last use.
pub const DEFAULT_REUSE_IDLE_SECS: u64 = 300;

/// RFC 1939 §3: "Such a timer MUST be of at least 10 minutes' duration."
pub const MIN_IDLE_TIMEOUT_SECS: u64 = 600;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where POP3 clients connect.
    pub listen: ListenConfig,
    /// The IMAP server behind popbridge: the default route.
    pub upstream: UpstreamConfig,
    /// How logins choose a route.
    pub routing: RoutingConfig,
    /// More upstreams, chosen by the login name's domain or an explicit
    /// user list. Unset keys inherit from `[upstream]` and `[pop3]`.
    pub routes: Vec<RouteConfig>,
    /// An HTTP service asked which upstream serves the logins no
    /// `[[routes]]` entry matches (instead of the default route).
    pub directory: DirectoryConfig,
    /// POP3 behaviour.
    pub pop3: Pop3Config,
    /// Certificate for POP3S and STLS.
    pub tls: TlsConfig,
    /// An extra listener served by OpenSSL for old devices (TLS 1.0/1.1);
    /// only in a build with the `legacy-tls` feature.
    pub legacy_tls: LegacyTlsConfig,
    /// Client authentication policy and failed-login throttling.
    pub auth: AuthConfig,
    /// Resource limits.
    pub limits: LimitsConfig,
    /// What is remembered across sessions.
    pub cache: CacheConfig,
    /// The admin HTTP listener (metrics and health).
    pub admin: AdminConfig,
    /// Shutdown behaviour.
    pub lifecycle: LifecycleConfig,
    /// Logging.
    pub log: LogConfig,
    /// Where popbridge keeps state of its own (imported UIDL maps, OAuth2
    /// tokens and device credentials).
    pub data: DataConfig,
    /// Shared state for several replicas (session locks, login throttles):
    /// a Redis server.
    pub cluster: cluster::ClusterConfig,
    /// OAuth2 providers and the token store, for routes with
    /// `auth = "oauth2"`.
    pub oauth: oauth::OauthConfig,
}

/// The POP3 listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Address and port for plain POP3 (RFC 1939 port 110). STLS is offered
    /// here when `[tls]` has a certificate.
    pub address: String,
    /// Address and port for POP3S, TLS from the first byte (RFC 8314; port
    /// 995). Empty: no POP3S listener. Needs `[tls]`.
    pub tls_address: String,
    /// Expect a PROXY protocol header (v1 or v2) from peers in
    /// `proxy_trusted`, so logs, limits and throttling see the real client
    /// behind a load balancer. Other peers are served as direct clients.
    pub proxy_protocol: bool,
    /// Networks allowed to send a PROXY header, e.g. `["10.0.0.0/8"]`.
    pub proxy_trusted: Vec<ipnet::IpNet>,
    /// Offer STLS (RFC 2595) on the plain listener when `[tls]` has a
    /// certificate. `false` keeps it off: some old clients (PHP's c-client)
    /// try STLS whenever it is offered and then fail the handshake; they
    /// log in without TLS from `auth.plaintext_networks` instead.
    pub stls: bool,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            address: "0.0.0.0:110".into(),
            tls_address: String::new(),
            proxy_protocol: false,
            proxy_trusted: Vec::new(),
            stls: true,
        }
    }
}

/// The certificate popbridge presents to POP3 clients. Both files are PEM;
/// they are read again on SIGHUP.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Certificate chain, leaf first. Empty: no TLS for clients.
    pub cert_file: String,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
}

/// The legacy TLS listener: OpenSSL instead of rustls, so the minimum
/// protocol can go down to TLS 1.0 for devices that speak nothing newer
/// (old scanners, printers, phones). Only for a trusted network: TLS 1.0
/// and 1.1 are deprecated (RFC 8996). Needs a build with the `legacy-tls`
/// cargo feature and the `[tls]` certificate.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LegacyTlsConfig {
    /// Address and port of the listener. Empty (the default): none.
    pub address: String,
    /// `implicit`: TLS from the first byte (POP3S); `stls`: plain POP3 that
    /// offers STLS (PHP's c-client `/pop3/tls`).
    pub mode: LegacyTlsMode,
    /// The oldest protocol accepted: `"1.0"` (the default), `"1.1"` or
    /// `"1.2"`. Below 1.2 OpenSSL's security level is lowered to 0 for
    /// this listener (Debian's OpenSSL refuses TLS 1.0 and 1.1 at its
    /// default level, which forbids their SHA-1 handshake signatures).
    pub min_version: LegacyTlsVersion,
}

/// How the legacy listener starts TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LegacyTlsMode {
    /// TLS from the first byte (POP3S).
    #[default]
    Implicit,
    /// Plain POP3 with STLS (RFC 2595).
    Stls,
}

/// The oldest TLS version the legacy listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Deserialize, Serialize)]
pub enum LegacyTlsVersion {
    #[default]
    #[serde(rename = "1.0")]
    Tls10,
    #[serde(rename = "1.1")]
    Tls11,
    #[serde(rename = "1.2")]
    Tls12,
}

/// Client authentication policy.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Allow USER/PASS and AUTH on unencrypted connections from every
    /// network (Dovecot's `disable_plaintext_auth = no`); the same as
    /// `plaintext_networks = ["0.0.0.0/0", "::/0"]`, kept for existing
    /// configurations.
    pub allow_plaintext: bool,
    /// Networks whose clients may log in without TLS, e.g. the LAN of old
    /// scanners: `["192.168.1.0/24"]`. The client's address is the one a
    /// trusted PROXY header declares, when there is one.
    pub plaintext_networks: Vec<ipnet::IpNet>,
    /// Count loopback clients (127.0.0.0/8, ::1) as secure, as Dovecot does:
    /// nothing crosses a network. Only the real socket peer counts, and only
    /// on a connection without a PROXY header declaring an address (behind
    /// a load balancer the client's bytes crossed a network). Turn off when
    /// a local relay forwards remote clients without TLS.
    pub loopback_is_secure: bool,
    /// Milliseconds to wait before answering a failed login; doubles up to
    /// 4x with repeated failures from the same address.
    pub failure_delay_ms: u64,
    /// Failed logins from one address within the window before further
    /// logins from it are refused without asking the IMAP server.
    pub max_failures_per_ip: u32,
    /// Failed logins for one user name within the window before further
    /// logins for it are refused without asking the IMAP server.
    pub max_failures_per_user: u32,
    /// Seconds failures are remembered.
    pub failure_window_secs: u64,
    /// Addresses and user names remembered at most (each table); the
    /// memory for throttling is bounded by this.
    pub throttle_entries: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            allow_plaintext: false,
            plaintext_networks: Vec::new(),
            loopback_is_secure: true,
            failure_delay_ms: 2000,
            max_failures_per_ip: 20,
            max_failures_per_user: 10,
            failure_window_secs: 300,
            throttle_entries: 100_000,
        }
    }
}

/// How the IMAP server is reached.
#[derive(
    Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash, Default, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    /// TLS from the first byte (IMAPS, usually port 993).
    Implicit,
    /// Plain connection upgraded with STARTTLS (usually port 143).
    #[default]
    Starttls,
    /// No TLS: credentials and mail cross the network in clear.
    None,
}

/// The IMAP server.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `host:port` of the IMAP server.
    pub address: String,
    /// `implicit`, `starttls` or `none`. The default is `starttls`: plaintext
    /// must be chosen explicitly, and is never a silent fallback.
    pub tls: UpstreamTls,
    /// The mailbox POP3 sessions see.
    pub mailbox: String,
    /// Seconds to wait for the TCP connection.
    pub connect_timeout_secs: u64,
    /// Seconds the IMAP server may stay silent while popbridge waits for a
    /// response (or octets of a message): a timeout for inactivity, not for
    /// a whole response, so a slow but steady server finishes a large RETR.
    pub command_timeout_secs: u64,
    /// At QUIT, when the server lacks UIDPLUS: `refuse` (delete nothing,
    /// answer -ERR) or `expunge-if-alone` (EXPUNGE only when no other message
    /// is flagged \Deleted).
    pub no_uidplus: NoUidplus,
    /// PEM file of CA certificates to trust for the IMAP server instead of
    /// the system's. Empty: the system's roots.
    pub ca_file: String,
    /// The name the IMAP server's certificate must carry (and the SNI sent).
    /// Empty: the host part of `address` (set this when connecting by IP).
    pub tls_name: String,
    /// How the login name is passed on: `full` or `local-part` (without
    /// `@domain`). With `auth = "oauth2"` only `full` is accepted: the IMAP
    /// user is the device's enrolled account.
    pub login: LoginName,
    /// Send the POP3 client's address with IMAP ID (`x-originating-ip`,
    /// `x-originating-port`) before login, for servers that trust popbridge
    /// (Dovecot's login_trusted_networks).
    pub send_client_id: bool,
    /// How popbridge logs in upstream: `passthrough` (the POP3 user name
    /// and password go to the IMAP server) or `oauth2` (POP3 clients log in
    /// with a device password; popbridge logs in with an OAuth2 access token
    /// for the account the device belongs to). Routes are chosen by the
    /// device login's name, as for passwords.
    pub auth: UpstreamAuth,
    /// For `auth = "oauth2"`: the name of an `[[oauth.providers]]` entry.
    pub oauth_provider: String,
    /// Seconds an upstream session stays open after its POP3 session ended,
    /// for the next login of the same account (same password, same route)
    /// to take instead of connecting and logging in again. 0 turns reuse
    /// off. A pooled session outlives a password change by at most this
    /// long after its last use.
    pub reuse_idle_secs: u64,
    /// Idle upstream sessions kept per account (on this route).
    pub reuse_max_per_account: usize,
    /// How passwords log in (`auth = "passthrough"`): `auto`
    /// (AUTHENTICATE PLAIN when the server offers it, else LOGIN), `plain`
    /// (AUTHENTICATE PLAIN even when not offered) or `login` (the LOGIN
    /// command, for servers whose SASL is broken).
    pub login_mechanism: LoginMechanism,
}

/// How a password logs in to the IMAP server.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LoginMechanism {
    /// `AUTHENTICATE PLAIN` (RFC 4616) when CAPABILITY lists `AUTH=PLAIN`,
    /// else `LOGIN` (RFC 3501 §6.2.3).
    #[default]
    Auto,
    /// `AUTHENTICATE PLAIN` whether offered or not (Courier lists AUTH=
    /// mechanisms only after STARTTLS, yet takes PLAIN).
    Plain,
    /// The `LOGIN` command.
    Login,
}

/// How popbridge authenticates to the IMAP server.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamAuth {
    /// The POP3 credentials are passed on.
    #[default]
    Passthrough,
    /// Device passwords locally, OAuth2 bearer tokens upstream.
    Oauth2,
}

/// How the POP3 login name is passed to the IMAP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoginName {
    /// As the client sent it.
    #[default]
    Full,
    /// Without `@domain`.
    LocalPart,
}

impl LoginName {
    /// The name to send upstream for `login`.
    pub fn apply<'a>(&self, login: &'a str) -> &'a str {
        match self {
            LoginName::Full => login,
            LoginName::LocalPart => login.rsplit_once('@').map_or(login, |(local, _)| local),
        }
    }
}

/// What to do at QUIT when the server lacks UIDPLUS (RFC 4315), so `UID
/// EXPUNGE` is not available and a plain `EXPUNGE` would also remove messages
/// that other clients flagged `\Deleted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoUidplus {
    /// Delete nothing and answer QUIT with `-ERR` (the default: never risks
    /// another client's mail).
    #[default]
    Refuse,
    /// Flag the messages, and run `EXPUNGE` only if no other message in the
    /// mailbox is flagged `\Deleted` at that moment. Another client could
    /// flag a message between the check and the `EXPUNGE`.
    ExpungeIfAlone,
}

/// A SASL mechanism popbridge uses to log in to an IMAP server (RFC 3501
/// §6.2.2 `AUTHENTICATE`): PLAIN for passwords, XOAUTH2 or OAUTHBEARER for
/// OAuth2 access tokens (`mechanism` of an `[[oauth.providers]]` entry,
/// which takes only those two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum SaslMechanism {
    /// RFC 4616 `PLAIN`: the password logins.
    #[serde(rename = "plain")]
    Plain,
    /// Google's and Microsoft's `XOAUTH2`.
    #[serde(rename = "xoauth2")]
    XOauth2,
    /// RFC 7628 `OAUTHBEARER`.
    #[serde(rename = "oauthbearer")]
    OauthBearer,
}

impl SaslMechanism {
    /// The name in `AUTHENTICATE` and in CAPABILITY's `AUTH=`.
    pub fn name(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::XOauth2 => "XOAUTH2",
            SaslMechanism::OauthBearer => "OAUTHBEARER",
        }
    }

    /// True for the mechanisms that carry an OAuth2 bearer token.
    pub fn is_bearer(self) -> bool {
        !matches!(self, SaslMechanism::Plain)
    }
}

/// How to present a token to a provider's IMAP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProviderSasl {
    pub mechanism: SaslMechanism,
    /// Send the initial response after a `+` continuation instead of with
    /// the command (SASL-IR, RFC 4959). Microsoft's documented exchange.
    pub two_step: bool,
}

/// Dovecot's `pop3_deleted_flag` is commonly set to this keyword.
pub const DEFAULT_DELETED_KEYWORD: &str = "$POP3Deleted";

/// What DELE + QUIT does, per route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeletePolicy {
    /// `\Deleted` and `UID EXPUNGE` of exactly the marked messages.
    #[default]
    Expunge,
    /// Set a keyword; POP3 sessions stop listing those messages, IMAP users
    /// still see them (Dovecot's `pop3_delete_type = flag`).
    Flag,
    /// Move the messages to another mailbox.
    Move,
    /// Accept DELE and QUIT, change nothing ("leave mail on server").
    Keep,
    /// Hide the messages from the device that deleted them only (a keyword
    /// per device); other devices and IMAP users keep seeing them.
    PerDevice,
}

/// A route's settings for shared mailboxes, resolved from its keys and
/// `[pop3]`'s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub delete: DeletePolicy,
    /// The keyword of the `flag` policy.
    pub keyword: String,
    /// The target of the `move` policy.
    pub move_to: String,
    /// Create `move_to` at QUIT when it does not exist.
    pub create_move_target: bool,
    /// Between account and device in a login (`alice+scanner`), for
    /// `per-device`.
    pub device_separator: String,
    /// One POP3 session per account and mailbox at a time (in this process,
    /// and across replicas with `[cluster]`).
    pub lock: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            delete: DeletePolicy::Expunge,
            keyword: DEFAULT_DELETED_KEYWORD.into(),
            move_to: "Trash".into(),
            create_move_target: false,
            device_separator: "+".into(),
            lock: false,
        }
    }
}

/// True for an IMAP atom made of letters, digits and `$ - _ .` (a strict
/// subset of RFC 3501's atom-char, so it is safe everywhere): what keywords
/// and device tags must be, so they travel unquoted and can never become
/// IMAP syntax.
pub fn is_safe_atom(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'$' | b'-' | b'_' | b'.'))
}

/// How logins choose a route.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Send logins that match no `[[routes]]` entry to `[upstream]`. When
    /// false they get `-ERR [AUTH]`.
    pub default_route: bool,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            default_route: true,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:143".into(),
            tls: UpstreamTls::default(),
            mailbox: "INBOX".into(),
            connect_timeout_secs: 10,
            command_timeout_secs: 60,
            no_uidplus: NoUidplus::default(),
            ca_file: String::new(),
            tls_name: String::new(),
            login: LoginName::Full,
            send_client_id: false,
            auth: UpstreamAuth::Passthrough,
            oauth_provider: String::new(),
            login_mechanism: LoginMechanism::Auto,
            reuse_idle_secs: DEFAULT_REUSE_IDLE_SECS,
            reuse_max_per_account: 2,
        }
    }
}

/// POP3 behaviour.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Pop3Config {
    /// UIDL template (Dovecot `pop3_uidl_format` syntax: %u, %v, width, X/x)
    /// or a preset: `dovecot` (%08Xu%08Xv), `cyrus` (%v.%u), `uw`
    /// (%08Xv%08Xu). (No `courier`: see [`crate::pop3::uidl::COURIER_REMOVED`].)
    pub uidl_format: String,
    /// Mark messages fetched with RETR as \Seen at QUIT.
    pub mark_seen_on_retr: bool,
    /// Mark messages read with TOP as \Seen at QUIT too.
    pub mark_seen_on_top: bool,
    /// Use a message's `X-UIDL:` header as its UIDL when it is a valid one
    /// (Dovecot's `pop3_reuse_xuidl`), for mail migrated from a POP3 server
    /// that wrote it. Costs one header field per message, once (cached).
    pub reuse_xuidl: bool,
    /// Give messages the UIDLs of the old POP3 server they were migrated
    /// from, from the map `popbridge migrate` wrote under
    /// `<data.dir>/uidl-maps/` (needs `data.dir`). An X-UIDL header (with
    /// `reuse_xuidl`) wins over the map; messages not in the map get the
    /// template. Accounts without a map are served as usual.
    pub uidl_map: bool,
    /// What DELE + QUIT does: `expunge`, `flag` (a keyword hides the
    /// message from POP3), `move` (to `move_to`), `keep` (nothing), or
    /// `per-device` (a keyword per device hides it from that device only).
    pub delete_policy: DeletePolicy,
    /// The keyword of the `flag` policy (Dovecot's `pop3_deleted_flag`).
    pub deleted_keyword: String,
    /// The mailbox the `move` policy moves to.
    pub move_to: String,
    /// Create `move_to` at QUIT if it does not exist (otherwise QUIT answers
    /// -ERR and nothing moves).
    pub create_move_target: bool,
    /// Separates account and device in a login for `per-device`
    /// (`alice+scanner` logs in as `alice`, device `scanner`).
    pub device_separator: String,
    /// Allow one POP3 session per account and mailbox at a time (in this
    /// process, and across replicas with `[cluster]`); a second gets
    /// `-ERR [IN-USE]`.
    pub lock: bool,
    /// Seconds a logged-in client may stay silent. RFC 1939 §3: at least 600.
    pub idle_timeout_secs: u64,
    /// Seconds from accept to a successful login: a deadline for the whole
    /// AUTHORIZATION state (PROXY header, TLS handshake, every command), not
    /// a limit per read, so a client that trickles bytes or repeats CAPA
    /// cannot keep a session unauthenticated.
    pub login_timeout_secs: u64,
    /// Text after "+OK " in the greeting.
    pub greeting: String,
}

impl Default for Pop3Config {
    fn default() -> Self {
        Self {
            uidl_format: "dovecot".into(),
            mark_seen_on_retr: true,
            mark_seen_on_top: false,
            reuse_xuidl: false,
            uidl_map: false,
            delete_policy: DeletePolicy::Expunge,
            deleted_keyword: DEFAULT_DELETED_KEYWORD.into(),
            move_to: "Trash".into(),
            create_move_target: false,
            device_separator: "+".into(),
            lock: false,
            idle_timeout_secs: 600,
            login_timeout_secs: 60,
            greeting: "popbridge ready.".into(),
        }
    }
}

/// Resource limits.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Concurrent POP3 sessions; more get `-ERR [SYS/TEMP]` and are closed.
    pub max_sessions: usize,
    /// Concurrent sessions from one client address.
    pub max_sessions_per_ip: usize,
    /// Connections the kernel may queue before popbridge accepts them
    /// (listen(2) backlog; the kernel caps it at net.core.somaxconn).
    pub listen_backlog: u32,
    /// Idle upstream sessions kept for reuse, all routes together (the
    /// least recently used leaves first).
    pub max_idle_upstream: usize,
    /// IPv6 clients count as one address per network of this prefix length
    /// for `max_sessions_per_ip`, `auth.max_failures_per_ip` and the
    /// throttle's known addresses. 64: one customer's network (RFC 6177
    /// gives sites a /48 or /56 and every LAN a /64), so an attacker cannot
    /// rotate through the 2^64 addresses of one LAN. 128: every address on
    /// its own. IPv4 addresses count one by one.
    pub ipv6_prefix_len: u8,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_sessions: 1000,
            max_sessions_per_ip: 50,
            listen_backlog: 1024,
            max_idle_upstream: 1000,
            ipv6_prefix_len: 64,
        }
    }
}

/// The admin HTTP listener: `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address and port, e.g. `127.0.0.1:9110`. Empty (the default): off.
    /// Keep it on loopback or an internal network.
    pub address: String,
    /// Seconds between readiness checks of every route's IMAP server (a
    /// TCP connection and its IMAP greeting; no login). Ready while at
    /// least one answers.
    pub check_interval_secs: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            address: String::new(),
            check_interval_secs: 10,
        }
    }
}

/// Shutdown behaviour.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleConfig {
    /// On SIGTERM popbridge stops accepting, lets sessions go on for up to
    /// this many seconds, then ends the ones still open after their current
    /// command with `-ERR [SYS/TEMP]`. Sessions that never sent QUIT delete
    /// nothing.
    pub drain_timeout_secs: u64,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            drain_timeout_secs: 30,
        }
    }
}

/// Caches.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// MiB for mailbox listings (UID and size of every message) kept between
    /// sessions, so a poll of an unchanged mailbox fetches nothing but the
    /// SELECT. About 16 bytes per message. 0 turns the cache off.
    pub listing_mb: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self { listing_mb: 64 }
    }
}

/// State popbridge keeps on disk.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Directory for popbridge's own files: imported UIDL maps
    /// (`uidl-maps/`) and the OAuth2 token and device stores. Empty: none;
    /// the features that need it say so at `--check-config`.
    pub dir: String,
}

/// Log output.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Logging.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `popbridge=debug`; `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Checks one upstream's settings; `at` names it in messages.
pub(crate) fn check_upstream(at: &str, u: &UpstreamConfig) -> Result<(), ConfigError> {
    let a = &u.address;
    match a.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
        _ => {
            return Err(ConfigError(format!(
                "{at}.address {a:?} is not host:port such as imap.example.org:143"
            )))
        }
    }
    let mailbox = &u.mailbox;
    if mailbox.is_empty() || mailbox.contains(['\r', '\n', '\0']) {
        return Err(ConfigError(format!(
            "{at}.mailbox {mailbox:?} is not a valid mailbox name"
        )));
    }
    for (key, v) in [
        ("connect_timeout_secs", u.connect_timeout_secs),
        ("command_timeout_secs", u.command_timeout_secs),
    ] {
        if v == 0 {
            return Err(ConfigError(format!("{at}.{key} must be greater than 0")));
        }
    }
    if u.auth == UpstreamAuth::Oauth2 {
        // Whether the provider exists is the OAuth2 runtime's check (at
        // start-up and reload); here only that one is named.
        if u.oauth_provider.trim().is_empty() {
            return Err(ConfigError(format!(
                "{at}.oauth_provider must name an [[oauth.providers]] entry when auth = \"oauth2\""
            )));
        }
        // The IMAP user is the enrolled account the token was issued for,
        // not a form of the POP3 login name.
        if u.login == LoginName::LocalPart {
            return Err(ConfigError(format!(
                "{at}.login = \"local-part\" does not apply with auth = \"oauth2\" (the IMAP user is the device's enrolled account); remove it or set login = \"full\""
            )));
        }
    }
    Ok(())
}

impl Config {
    /// Reads and parses a TOML file (not yet validated).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
    }

    /// Parses TOML text (not yet validated).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError(e.to_string()))
    }

    /// Checks every value; the first problem is reported.
    pub fn validate(&self) -> Result<Validated, ConfigError> {
        let listen: SocketAddr = self.listen.address.parse().map_err(|_| {
            ConfigError(format!(
                "listen.address {:?} is not an address:port such as 0.0.0.0:110",
                self.listen.address
            ))
        })?;
        let tls_address = match self.listen.tls_address.as_str() {
            "" => None,
            a => Some(a.parse::<SocketAddr>().map_err(|_| {
                ConfigError(format!(
                    "listen.tls_address {a:?} is not an address:port such as 0.0.0.0:995"
                ))
            })?),
        };
        if self.listen.proxy_protocol && self.listen.proxy_trusted.is_empty() {
            return Err(ConfigError(
                "listen.proxy_protocol needs listen.proxy_trusted (the load balancers' networks)"
                    .into(),
            ));
        }
        let has_cert = !self.tls.cert_file.is_empty() || !self.tls.key_file.is_empty();
        if has_cert && (self.tls.cert_file.is_empty() || self.tls.key_file.is_empty()) {
            return Err(ConfigError(
                "tls.cert_file and tls.key_file must be set together".into(),
            ));
        }
        if tls_address.is_some() && !has_cert {
            return Err(ConfigError(
                "listen.tls_address needs tls.cert_file and tls.key_file".into(),
            ));
        }
        let legacy_tls_address = match self.legacy_tls.address.as_str() {
            "" => None,
            a => {
                let addr = a.parse::<SocketAddr>().map_err(|_| {
                    ConfigError(format!(
                        "legacy_tls.address {a:?} is not an address:port such as 192.168.1.10:995"
                    ))
                })?;
                if !cfg!(feature = "legacy-tls") {
                    return Err(ConfigError(
                        "legacy_tls.address needs popbridge built with the legacy-tls feature (cargo build --features legacy-tls); this build has rustls only".into(),
                    ));
                }
                if !has_cert {
                    return Err(ConfigError(
                        "legacy_tls.address needs tls.cert_file and tls.key_file".into(),
                    ));
                }
                Some(addr)
            }
        };
        let routes = self.effective_routes()?;
        let directory = self.directory()?;
        let template_maps = directory.as_ref().is_some_and(|d| d.template.pop3.uidl_map);
        if template_maps && self.data.dir.is_empty() {
            return Err(ConfigError(
                "pop3.uidl_map (the [directory] routes' template) needs data.dir (the directory that holds uidl-maps/)".into(),
            ));
        }
        if let Some(r) = routes.iter().find(|r| r.pop3.uidl_map) {
            if self.data.dir.is_empty() {
                let key = if r.is_default {
                    "pop3.uidl_map".to_string()
                } else {
                    format!("routes ({}).uidl_map", r.name)
                };
                return Err(ConfigError(format!(
                    "{key} needs data.dir (the directory that holds uidl-maps/)"
                )));
            }
        }
        // OAuth2 routes name defined providers (the key and secrets are
        // read where they are used).
        self.oauth
            .validate(&routes, &self.data.dir, &self.cluster)?;
        self.cluster.validate()?;
        for (key, v) in [
            ("auth.failure_window_secs", self.auth.failure_window_secs),
            (
                "auth.max_failures_per_ip",
                u64::from(self.auth.max_failures_per_ip),
            ),
            (
                "auth.max_failures_per_user",
                u64::from(self.auth.max_failures_per_user),
            ),
            ("auth.throttle_entries", self.auth.throttle_entries),
            (
                "limits.max_sessions_per_ip",
                self.limits.max_sessions_per_ip as u64,
            ),
            (
                "limits.listen_backlog",
                u64::from(self.limits.listen_backlog),
            ),
        ] {
            if v == 0 {
                return Err(ConfigError(format!("{key} must be greater than 0")));
            }
        }
        for (key, v) in [
            ("pop3.login_timeout_secs", self.pop3.login_timeout_secs),
            ("limits.max_sessions", self.limits.max_sessions as u64),
        ] {
            if v == 0 {
                return Err(ConfigError(format!("{key} must be greater than 0")));
            }
        }
        if !(1..=128).contains(&self.limits.ipv6_prefix_len) {
            return Err(ConfigError(format!(
                "limits.ipv6_prefix_len = {} must be between 1 and 128 (64 counts one IPv6 LAN as one address)",
                self.limits.ipv6_prefix_len
            )));
        }
        if self.pop3.idle_timeout_secs < MIN_IDLE_TIMEOUT_SECS {
            return Err(ConfigError(format!(
                "pop3.idle_timeout_secs = {} is below {MIN_IDLE_TIMEOUT_SECS}: RFC 1939 §3 requires at least 10 minutes",
                self.pop3.idle_timeout_secs
            )));
        }
        if self.pop3.greeting.contains(['\r', '\n']) {
            return Err(ConfigError("pop3.greeting must be one line".into()));
        }
        let admin = match self.admin.address.as_str() {
            "" => None,
            a => Some(a.parse::<SocketAddr>().map_err(|_| {
                ConfigError(format!(
                    "admin.address {a:?} is not an address:port such as 127.0.0.1:9110"
                ))
            })?),
        };
        if self.admin.check_interval_secs == 0 {
            return Err(ConfigError(
                "admin.check_interval_secs must be greater than 0".into(),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError(format!("log.level {:?}: {e}", self.log.level)))?;
        Ok(Validated {
            routes,
            directory,
            admin,
            listen,
            tls_address,
            legacy_tls_address,
            idle_timeout: Duration::from_secs(self.pop3.idle_timeout_secs),
            login_timeout: Duration::from_secs(self.pop3.login_timeout_secs),
            config: self.clone(),
        })
    }
}

/// A configuration that passed [`Config::validate`], with values parsed.
#[derive(Debug, Clone)]
pub struct Validated {
    /// Every route, the default (if any) included, in table order.
    pub routes: Vec<EffectiveRoute>,
    /// `[directory]`, when configured.
    pub directory: Option<DirectorySettings>,
    pub admin: Option<SocketAddr>,
    pub listen: SocketAddr,
    pub tls_address: Option<SocketAddr>,
    /// The legacy TLS listener (`[legacy_tls]`), in a build that has it.
    pub legacy_tls_address: Option<SocketAddr>,
    pub idle_timeout: Duration,
    pub login_timeout: Duration,
    pub config: Config,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_use_starttls_upstream() {
        assert_eq!(Config::default().upstream.tls, UpstreamTls::Starttls);
        let c = Config::default();
        let v = c.validate().unwrap();
        assert_eq!(v.listen.port(), 110);
        assert_eq!(v.routes[0].pop3.uidl_format, "dovecot");
    }

    /// `[legacy_tls]`: its keys parse; an address needs the certificate,
    /// and a build without the `legacy-tls` feature refuses it by name.
    #[test]
    fn legacy_tls_address_needs_the_feature_and_a_certificate() {
        let validate = |toml: &str| {
            Config::from_toml(&format!("[upstream]\ntls = \"none\"\n{toml}"))
                .unwrap()
                .validate()
                .map_err(|e| e.0)
        };
        let cert = "[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n";
        let c = Config::from_toml(
            "[legacy_tls]\naddress = \"127.0.0.1:995\"\nmode = \"stls\"\nmin_version = \"1.1\"\n",
        )
        .unwrap();
        assert_eq!(c.legacy_tls.mode, LegacyTlsMode::Stls);
        assert_eq!(c.legacy_tls.min_version, LegacyTlsVersion::Tls11);
        assert!(Config::from_toml("[legacy_tls]\nmin_version = \"1.3\"\n").is_err());
        // Empty (the default): nothing to refuse in any build.
        assert_eq!(
            validate(cert).unwrap().legacy_tls_address,
            None,
            "no legacy listener by default"
        );
        let with_address = format!("{cert}[legacy_tls]\naddress = \"127.0.0.1:995\"\n");
        if cfg!(feature = "legacy-tls") {
            let v = validate(&with_address).unwrap();
            assert_eq!(v.legacy_tls_address, Some("127.0.0.1:995".parse().unwrap()));
            let e = validate("[legacy_tls]\naddress = \"127.0.0.1:995\"\n").unwrap_err();
            assert!(e.contains("tls.cert_file"), "{e}");
        } else {
            let e = validate(&with_address).unwrap_err();
            assert!(
                e.contains("legacy_tls.address") && e.contains("legacy-tls"),
                "{e}"
            );
        }
        let e = validate(&format!("{cert}[legacy_tls]\naddress = \"nowhere\"\n")).unwrap_err();
        assert!(e.contains("legacy_tls.address"), "{e}");
    }

    #[test]
    fn oauth2_routes_need_a_provider_and_full_logins() {
        // The routes' own checks; whether the provider exists is the OAuth2
        // module's part of validate().
        let check = |toml: &str| {
            Config::from_toml(&format!("[upstream]\ntls = \"none\"\n{toml}"))
                .unwrap()
                .effective_routes()
                .map(|_| ())
                .map_err(|e| e.0)
        };
        assert!(check("auth = \"oauth2\"")
            .unwrap_err()
            .contains("upstream.oauth_provider"));
        assert!(check("auth = \"oauth2\"\noauth_provider = \" \"")
            .unwrap_err()
            .contains("upstream.oauth_provider"));
        assert!(
            check("auth = \"oauth2\"\noauth_provider = \"google\"\nlogin = \"local-part\"")
                .unwrap_err()
                .contains("upstream.login")
        );
        check("auth = \"oauth2\"\noauth_provider = \"google\"").unwrap();
        // A route inherits auth and provider, and may override them.
        let route = "[[routes]]\nname = \"g\"\ndomains = [\"g.example\"]\n";
        assert!(check(&format!("{route}auth = \"oauth2\""))
            .unwrap_err()
            .contains("routes[0].oauth_provider"));
        check(&format!(
            "{route}auth = \"oauth2\"\noauth_provider = \"google\""
        ))
        .unwrap();
        assert!(check(&format!(
            "login = \"local-part\"\n{route}auth = \"oauth2\"\noauth_provider = \"g\""
        ))
        .unwrap_err()
        .contains("routes[0].login"));
        let c = Config::from_toml(&format!(
            "[upstream]\ntls = \"none\"\nauth = \"oauth2\"\noauth_provider = \"ms\"\n{route}"
        ))
        .unwrap();
        let routes = c.effective_routes().unwrap();
        assert_eq!(routes[0].upstream.auth, UpstreamAuth::Oauth2);
        assert_eq!(routes[0].upstream.oauth_provider, "ms");
    }
}
