//! Configuration: a TOML file, then `POPBRIDGE_*` environment variables and
//! command-line flags on top (see `main.rs`), then [`Config::validate`].
//!
//! Every key has a default and a doc comment; unknown keys are errors, so a
//! typo never silently falls back to a default. `config/popbridge.example.toml`
//! documents every key and is parsed by a test.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bridge::policy::{is_safe_atom, DeletePolicy, Policy, DEFAULT_DELETED_KEYWORD};
use crate::error::ConfigError;
use crate::pop3::uidl::UidlFormat;
use crate::routing::LoginName;
use crate::upstream::imap::NoUidplus;

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
    /// POP3 behaviour.
    pub pop3: Pop3Config,
    /// Certificate for POP3S and STLS.
    pub tls: TlsConfig,
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
    /// OAuth2 providers and the token store, for routes with
    /// `auth = "oauth2"`.
    pub oauth: crate::oauth::config::OauthConfig,
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
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            address: "0.0.0.0:110".into(),
            tls_address: String::new(),
            proxy_protocol: false,
            proxy_trusted: Vec::new(),
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

/// Client authentication policy.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Allow USER/PASS and AUTH on unencrypted connections from
    /// non-loopback clients (Dovecot's `disable_plaintext_auth = no`).
    pub allow_plaintext: bool,
    /// Count loopback clients (127.0.0.0/8, ::1) as secure, as Dovecot does:
    /// nothing crosses a network. Turn off when a local relay forwards
    /// remote clients without TLS.
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
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default, clap::ValueEnum)]
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
    /// Seconds to wait for any one IMAP response.
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

/// One `[[routes]]` entry. Unset keys inherit from `[upstream]` / `[pop3]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    /// A name for logs.
    pub name: String,
    /// Login-name domains (after the last `@`), case-insensitive.
    pub domains: Vec<String>,
    /// Exact login names, case-insensitive; they win over domains.
    pub users: Vec<String>,
    pub address: Option<String>,
    pub tls: Option<UpstreamTls>,
    pub ca_file: Option<String>,
    pub tls_name: Option<String>,
    pub mailbox: Option<String>,
    pub login: Option<LoginName>,
    pub send_client_id: Option<bool>,
    pub auth: Option<UpstreamAuth>,
    pub oauth_provider: Option<String>,
    pub no_uidplus: Option<NoUidplus>,
    pub connect_timeout_secs: Option<u64>,
    pub command_timeout_secs: Option<u64>,
    pub uidl_format: Option<String>,
    pub mark_seen_on_retr: Option<bool>,
    pub mark_seen_on_top: Option<bool>,
    pub reuse_xuidl: Option<bool>,
    pub uidl_map: Option<bool>,
    pub delete_policy: Option<DeletePolicy>,
    pub deleted_keyword: Option<String>,
    pub move_to: Option<String>,
    pub create_move_target: Option<bool>,
    pub device_separator: Option<String>,
    pub lock: Option<bool>,
}

/// A route with everything inherited filled in and checked.
#[derive(Debug, Clone)]
pub struct EffectiveRoute {
    pub name: String,
    pub domains: Vec<String>,
    pub users: Vec<String>,
    pub upstream: UpstreamConfig,
    pub uidl: UidlFormat,
    pub mark_seen: bool,
    pub mark_seen_on_top: bool,
    pub reuse_xuidl: bool,
    /// Serve old UIDLs from the imported map (`<data.dir>/uidl-maps/`).
    pub uidl_map: bool,
    pub policy: Policy,
    pub is_default: bool,
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
        }
    }
}

/// POP3 behaviour.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Pop3Config {
    /// UIDL template (Dovecot `pop3_uidl_format` syntax: %u, %v, width, X/x)
    /// or a preset: `dovecot` (%08Xu%08Xv), `cyrus` (%v.%u), `courier`
    /// (%v-%u), `uw` (%08Xv%08Xu).
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
    /// process); a second gets `-ERR [IN-USE]`.
    pub lock: bool,
    /// Seconds a logged-in client may stay silent. RFC 1939 §3: at least 600.
    pub idle_timeout_secs: u64,
    /// Seconds a client has to log in.
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
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_sessions: 1000,
            max_sessions_per_ip: 50,
            listen_backlog: 1024,
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
    /// Seconds between readiness checks of the default upstream (a TCP
    /// connection and its IMAP greeting; no login).
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
fn check_upstream(at: &str, u: &UpstreamConfig) -> Result<(), ConfigError> {
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
    if u.tls != UpstreamTls::None && !u.ca_file.is_empty() {
        crate::tls::client_connector(Some(Path::new(&u.ca_file)))
            .map_err(|e| ConfigError(format!("{at}: {}", e.0)))?;
    }
    Ok(())
}

impl Config {
    /// The routing table with inherited values filled in, checked: the
    /// `[[routes]]` in order, then the default route (`[upstream]`).
    pub fn effective_routes(&self) -> Result<Vec<EffectiveRoute>, ConfigError> {
        let mut out = Vec::new();
        let mut names = std::collections::HashSet::new();
        let mut domains = std::collections::HashSet::new();
        let mut users = std::collections::HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            if r.name.is_empty() {
                return Err(ConfigError(format!("{at}.name must be set")));
            }
            if r.name == "default" || !names.insert(r.name.clone()) {
                return Err(ConfigError(format!(
                    "{at}.name {:?} is used twice (\"default\" is taken)",
                    r.name
                )));
            }
            if r.domains.is_empty() && r.users.is_empty() {
                return Err(ConfigError(format!(
                    "{at} ({}) has neither domains nor users",
                    r.name
                )));
            }
            for d in &r.domains {
                if d.is_empty() || d.contains('@') || !domains.insert(d.to_lowercase()) {
                    return Err(ConfigError(format!(
                        "{at}.domains: {d:?} is empty, has an @, or is routed twice"
                    )));
                }
            }
            for u in &r.users {
                if u.is_empty() || !users.insert(u.to_lowercase()) {
                    return Err(ConfigError(format!(
                        "{at}.users: {u:?} is empty or routed twice"
                    )));
                }
            }
            let base = &self.upstream;
            let upstream = UpstreamConfig {
                address: r.address.clone().unwrap_or_else(|| base.address.clone()),
                tls: r.tls.unwrap_or(base.tls),
                mailbox: r.mailbox.clone().unwrap_or_else(|| base.mailbox.clone()),
                connect_timeout_secs: r.connect_timeout_secs.unwrap_or(base.connect_timeout_secs),
                command_timeout_secs: r.command_timeout_secs.unwrap_or(base.command_timeout_secs),
                no_uidplus: r.no_uidplus.unwrap_or(base.no_uidplus),
                ca_file: r.ca_file.clone().unwrap_or_else(|| base.ca_file.clone()),
                tls_name: r.tls_name.clone().unwrap_or_else(|| base.tls_name.clone()),
                login: r.login.unwrap_or(base.login),
                send_client_id: r.send_client_id.unwrap_or(base.send_client_id),
                auth: r.auth.unwrap_or(base.auth),
                oauth_provider: r
                    .oauth_provider
                    .clone()
                    .unwrap_or_else(|| base.oauth_provider.clone()),
            };
            check_upstream(&at, &upstream)?;
            let spec = r.uidl_format.as_deref().unwrap_or(&self.pop3.uidl_format);
            let uidl = UidlFormat::parse(spec).map_err(|e| ConfigError(format!("{at}.{e}")))?;
            out.push(EffectiveRoute {
                name: r.name.clone(),
                domains: r.domains.clone(),
                users: r.users.clone(),
                upstream,
                uidl,
                mark_seen: r.mark_seen_on_retr.unwrap_or(self.pop3.mark_seen_on_retr),
                mark_seen_on_top: r.mark_seen_on_top.unwrap_or(self.pop3.mark_seen_on_top),
                reuse_xuidl: r.reuse_xuidl.unwrap_or(self.pop3.reuse_xuidl),
                uidl_map: r.uidl_map.unwrap_or(self.pop3.uidl_map),
                policy: self.policy(&at, r)?,
                is_default: false,
            });
        }
        if self.routing.default_route {
            check_upstream("upstream", &self.upstream)?;
            let uidl = UidlFormat::parse(&self.pop3.uidl_format)
                .map_err(|e| ConfigError(format!("pop3.{e}")))?;
            out.push(EffectiveRoute {
                name: "default".into(),
                domains: Vec::new(),
                users: Vec::new(),
                upstream: self.upstream.clone(),
                uidl,
                mark_seen: self.pop3.mark_seen_on_retr,
                mark_seen_on_top: self.pop3.mark_seen_on_top,
                reuse_xuidl: self.pop3.reuse_xuidl,
                uidl_map: self.pop3.uidl_map,
                policy: self.policy("pop3", &RouteConfig::default())?,
                is_default: true,
            });
        }
        if out.is_empty() {
            return Err(ConfigError(
                "no route: add [[routes]] or set routing.default_route = true".into(),
            ));
        }
        Ok(out)
    }

    /// A route's shared-mailbox policy: its own keys, else `[pop3]`'s.
    fn policy(&self, at: &str, r: &RouteConfig) -> Result<Policy, ConfigError> {
        let p = &self.pop3;
        let policy = Policy {
            delete: r.delete_policy.unwrap_or(p.delete_policy),
            keyword: r
                .deleted_keyword
                .clone()
                .unwrap_or_else(|| p.deleted_keyword.clone()),
            move_to: r.move_to.clone().unwrap_or_else(|| p.move_to.clone()),
            create_move_target: r.create_move_target.unwrap_or(p.create_move_target),
            device_separator: r
                .device_separator
                .clone()
                .unwrap_or_else(|| p.device_separator.clone()),
            lock: r.lock.unwrap_or(p.lock),
        };
        // Keywords travel unquoted: only safe atoms (never \Flags or syntax).
        if !is_safe_atom(&policy.keyword) {
            return Err(ConfigError(format!(
                "{at}.deleted_keyword {:?} must be letters, digits, '$', '-', '_' or '.'",
                policy.keyword
            )));
        }
        if policy.move_to.is_empty() || policy.move_to.contains(['\r', '\n', '\0']) {
            return Err(ConfigError(format!(
                "{at}.move_to {:?} is not a valid mailbox name",
                policy.move_to
            )));
        }
        if policy.delete == DeletePolicy::PerDevice
            && (policy.device_separator.is_empty() || policy.device_separator.contains(['@', ' ']))
        {
            return Err(ConfigError(format!(
                "{at}.device_separator {:?} must be non-empty, without '@' or spaces",
                policy.device_separator
            )));
        }
        Ok(policy)
    }

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
        if has_cert {
            // Load now so a bad file is reported by --check-config too.
            crate::tls::server_config(
                Path::new(&self.tls.cert_file),
                Path::new(&self.tls.key_file),
            )?;
        }
        let routes = self.effective_routes()?;
        if let Some(r) = routes.iter().find(|r| r.uidl_map) {
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
        // OAuth2 routes: providers defined, store key loadable (issue 8).
        self.oauth.validate(&routes, &self.data.dir)?;
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
        let uidl = UidlFormat::parse(&self.pop3.uidl_format)
            .map_err(|e| ConfigError(format!("pop3.{e}")))?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError(format!("log.level {:?}: {e}", self.log.level)))?;
        Ok(Validated {
            routes,
            admin,
            listen,
            tls_address,
            uidl,
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
    pub admin: Option<SocketAddr>,
    pub listen: SocketAddr,
    pub tls_address: Option<SocketAddr>,
    pub uidl: UidlFormat,
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
        assert_eq!(v.uidl.source(), "dovecot");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(Config::from_toml("[pop3]\nuidl_fromat = \"x\"").is_err());
        assert!(Config::from_toml("bogus = 1").is_err());
        let bad = |toml: &str| {
            let c = Config::from_toml(&format!("[upstream]\ntls = \"none\"\n{toml}")).unwrap();
            c.validate().unwrap_err().0
        };
        assert!(bad("address = \"nohost\"").contains("upstream.address"));
        assert!(
            bad("[[routes]]\nname = \"a\"\ndomains = [\"x.org\"]\naddress = \"bad\"")
                .contains("routes[0].address")
        );
        assert!(bad("[[routes]]\nname = \"a\"").contains("neither domains nor users"));
        assert!(bad("[[routes]]\nname = \"a\"\ndomains = [\"x.org\"]\n[[routes]]\nname = \"b\"\ndomains = [\"X.org\"]").contains("routed twice"));
        assert!(
            bad("[[routes]]\nname = \"a\"\ndomains = [\"x.org\"]\nuidl_format = \"%v\"")
                .contains("routes[0].uidl_format")
        );
        assert!(bad("[routing]\ndefault_route = false").contains("no route"));
        assert!(bad("address = \"h:0\"").contains("upstream.address"));
        assert!(bad("command_timeout_secs = 0").contains("command_timeout_secs"));
        assert!(bad("[pop3]\nidle_timeout_secs = 30").contains("RFC 1939"));
        assert!(bad("[pop3]\nuidl_format = \"%v\"").contains("uidl_format"));
        assert!(bad("[listen]\naddress = \"x\"").contains("listen.address"));
        assert!(bad("[listen]\ntls_address = \"127.0.0.1:995\"").contains("tls.cert_file"));
        assert!(bad("[tls]\ncert_file = \"/nonexistent.pem\"").contains("together"));
        assert!(
            bad("[tls]\ncert_file = \"/nonexistent.pem\"\nkey_file = \"/nonexistent.key\"")
                .contains("/nonexistent.pem")
        );
        assert!(bad("[auth]\nmax_failures_per_ip = 0").contains("max_failures_per_ip"));
        assert!(bad("[pop3]\nuidl_map = true").contains("data.dir"));
        assert!(
            bad("[[routes]]\nname = \"a\"\ndomains = [\"x.org\"]\nuidl_map = true")
                .contains("routes (a).uidl_map needs data.dir")
        );
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
