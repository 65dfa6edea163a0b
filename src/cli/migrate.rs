//! `popbridge migrate capture | copy | import`: carry POP3 UIDLs over from
//! an old POP3 server. Talks to the old server
//! ([`crate::migrate::pop3client`]) and the IMAP server (the proxy's own
//! [`ImapConnector`]), matches ([`crate::migrate::matching`]) and writes the
//! store ([`crate::migrate::store`]). Nothing is written until everything
//! it depends on was read without error: a map is complete or absent.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use tokio_rustls::rustls::pki_types::ServerName;

use std::process::ExitCode;

use crate::config::routes::route_named;
use crate::config::{Config, EffectiveRoute, LogFormat, RouteIndex, UpstreamTls};
use crate::imap::{
    host_of, BodySink, Connector, Credentials, FetchEnd, FetchError, Flow, ImapConfig, ImapConn,
    ImapConnector, Snapshot, Upstream, UpstreamError,
};
use crate::migrate::hash::{header_hash, BodyHash, HeaderHash, MessageHasher, MAX_HEADER_BYTES};
use crate::migrate::journal::{Hashes, Journal};
use crate::migrate::matching::{self, Group, NewMessage, OldMessage, Outcome};
use crate::migrate::pop3client::{OldTls, Pop3Client, Pop3Error, RETR_BATCH, TOP_BATCH};
use crate::migrate::progress::Progress;
use crate::migrate::store::{
    is_valid_uidl, now_unix, parse_old_line, write_atomic, MapKey, OldList, StoreError, UidlMap,
    MAX_OLD_FILE_BYTES,
};
use crate::oauth::login::{bearer_login, BearerLoginError};
use crate::oauth::OauthRuntime;
use crate::pop3::command::Secret;

/// Environment variable with the old POP3 server's password.
pub const OLD_PASSWORD_ENV: &str = "POPBRIDGE_OLD_PASSWORD";
/// Environment variable with the IMAP password.
pub const NEW_PASSWORD_ENV: &str = "POPBRIDGE_NEW_PASSWORD";

/// `popbridge migrate ...`: carry POP3 UIDLs over from an old POP3 server,
/// so clients that keep mail on the server download nothing again after the
/// cut-over. The IMAP side comes from the configuration file (the route the
/// user's login takes), as when serving; flags override it. Passwords come
/// from files or environment variables, never from the command line.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    #[command(subcommand)]
    pub mode: Box<Mode>,
}

/// What to do.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Mode {
    /// The mail is already in the IMAP mailbox (moved by another tool): read
    /// the old server's UIDL list, hash every message's header and body on
    /// both servers, give an IMAP message an old UIDL only when both are the
    /// same, and store the map. Resumes where an interrupted run stopped.
    /// Serve it with `uidl_map = true`.
    Capture {
        #[command(flatten)]
        old: OldServerArgs,
        #[command(flatten)]
        new: NewServerArgs,
    },
    /// Copy the messages from the old server into the IMAP mailbox with
    /// APPEND, each with `X-UIDL: <old uidl>` on top and its received date.
    /// Messages whose X-UIDL is already in the mailbox are skipped, so a
    /// second run (or a run after an interruption) copies only what is
    /// missing. Serve with `reuse_xuidl = true`.
    Copy {
        #[command(flatten)]
        old: OldServerArgs,
        #[command(flatten)]
        new: NewServerArgs,
        /// Flag copied messages \Seen (POP3 users have read them).
        #[arg(long)]
        seen: bool,
        /// Copy at most this many messages in this run (the rest on the
        /// next run): to spread a large account over several windows.
        #[arg(long, value_name = "N")]
        max_messages: Option<usize>,
    },
    /// Build the map without the old server: from a UIDL list file (one
    /// `uidl size [header-hash [body-hash]]` per line, `#` comments; only
    /// lines with both hashes can be matched), or, without --uidl-file,
    /// from the list an earlier `capture` saved.
    Import {
        /// The old server's list. Without it: the saved list of this account.
        #[arg(long, value_name = "FILE")]
        uidl_file: Option<PathBuf>,
        #[command(flatten)]
        new: NewServerArgs,
    },
}

/// The old POP3 server.
#[derive(Debug, Clone, clap::Args)]
pub struct OldServerArgs {
    /// The old server: `pop3://host[:port]` (port 110; plain, or STLS with
    /// --old-starttls) or `pop3s://host[:port]` (port 995, TLS).
    #[arg(long, value_name = "URL")]
    pub old: String,
    /// Login name on the old server. Default: --user.
    #[arg(long, value_name = "NAME")]
    pub old_user: Option<String>,
    /// File whose first line is the old server's password. Default: the
    /// POPBRIDGE_OLD_PASSWORD environment variable, else the IMAP password
    /// (required on an OAuth2 route, which has none).
    #[arg(long, value_name = "FILE")]
    pub old_password_file: Option<PathBuf>,
    /// Upgrade a pop3:// connection with STLS (RFC 2595) before logging in.
    #[arg(long)]
    pub old_starttls: bool,
    /// PEM CA certificates to trust for the old server (default: the
    /// system's).
    #[arg(long, value_name = "FILE")]
    pub old_ca_file: Option<PathBuf>,
    /// Name the old server's certificate must carry (default: the URL's host).
    #[arg(long, value_name = "NAME")]
    pub old_tls_name: Option<String>,
}

/// The IMAP side: the configuration's route for the user, with overrides.
#[derive(Debug, Clone, clap::Args)]
pub struct NewServerArgs {
    /// The account: the login name POP3 clients will use with popbridge (the
    /// route's `login` rule applies, as when serving); on an
    /// `auth = "oauth2"` route, the enrolled account.
    #[arg(long, value_name = "NAME")]
    pub user: String,
    /// File whose first line is the IMAP password. Default: the
    /// POPBRIDGE_NEW_PASSWORD environment variable. Not used on an
    /// `auth = "oauth2"` route: the enrolled account's token logs in.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// The route to use, by name (`default` is [upstream]). Default: the
    /// route the user's login name takes.
    #[arg(long, value_name = "NAME")]
    pub route: Option<String>,
    /// host:port of the IMAP server (overrides the route's address).
    #[arg(long, value_name = "HOST:PORT")]
    pub upstream: Option<String>,
    /// TLS to the IMAP server (overrides the route's).
    #[arg(long, value_enum)]
    pub upstream_tls: Option<UpstreamTls>,
    /// PEM CA certificates for the IMAP server (overrides the route's).
    #[arg(long, value_name = "FILE")]
    pub upstream_ca_file: Option<String>,
    /// The mailbox (overrides the route's).
    #[arg(long, value_name = "NAME")]
    pub mailbox: Option<String>,
    /// The data directory for the maps (overrides data.dir).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// Runs `popbridge migrate` and prints its summary. Exit codes: 0 done,
/// 1 failed, 2 usage or configuration error.
pub fn run(args: MigrateArgs, config: Config) -> ExitCode {
    super::logging::init("warn", LogFormat::Text);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("popbridge migrate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_mode(args, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("popbridge migrate: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// A password file is read up to this many octets (its first line is the
/// password).
pub const MAX_PASSWORD_FILE: u64 = 4096;

/// Why `popbridge migrate` failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Bad flags, configuration or input files (exit code 2).
    #[error("{0}")]
    Usage(String),
    #[error("old server: {0}")]
    Old(#[from] Pop3Error),
    #[error("IMAP server: {0}")]
    New(#[from] UpstreamError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The IMAP login with the account's OAuth2 token (`auth = "oauth2"`).
    #[error("IMAP login with the OAuth2 token: {0}")]
    Oauth(BearerLoginError),
    /// Failed after some messages were copied (they stay; a re-run resumes).
    #[error(
        "{error}; {copied} messages were copied before that: run the same command again to resume"
    )]
    CopyInterrupted {
        error: Box<MigrateError>,
        copied: usize,
    },
}

impl MigrateError {
    /// 2 for usage errors (as `--check-config`), 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            MigrateError::Usage(_) => 2,
            _ => 1,
        }
    }
}

fn usage(s: impl Into<String>) -> MigrateError {
    MigrateError::Usage(s.into())
}

/// Runs one `popbridge migrate` command and prints its summary.
async fn run_mode(args: MigrateArgs, config: Config) -> Result<(), MigrateError> {
    match *args.mode {
        Mode::Capture { old, new } => {
            let target = Target::resolve(&config, &new, true)?;
            let old_side = OldSide::resolve(&old, &new, &target)?;
            capture(&old_side, &target).await
        }
        Mode::Copy {
            old,
            new,
            seen,
            max_messages,
        } => {
            let target = Target::resolve(&config, &new, false)?;
            let old_side = OldSide::resolve(&old, &new, &target)?;
            copy(&old_side, &target, seen, max_messages).await
        }
        Mode::Import { uidl_file, new } => {
            let target = Target::resolve(&config, &new, true)?;
            import(uidl_file.as_deref(), &target).await
        }
    }
}

// ---------------------------------------------------------------------------
// Where things are
// ---------------------------------------------------------------------------

/// How the migration logs in to the IMAP server.
enum NewLogin {
    /// The account's IMAP password (`auth = "passthrough"` routes).
    Password(Secret),
    /// The enrolled account's access token at `provider` (`auth =
    /// "oauth2"` routes), with the server's one-retry rule.
    Oauth {
        runtime: std::sync::Arc<OauthRuntime>,
        provider: String,
    },
}

/// The IMAP side, resolved from the configuration and the flags.
struct Target {
    route: EffectiveRoute,
    /// The IMAP login name (the route's `login` rule applied; on an OAuth2
    /// route the enrolled account).
    account: String,
    login: NewLogin,
    /// Where maps go (capture and import only).
    data_dir: Option<PathBuf>,
}

impl Target {
    fn resolve(config: &Config, a: &NewServerArgs, needs_dir: bool) -> Result<Self, MigrateError> {
        let routes = config.effective_routes().map_err(|e| usage(e.0))?;
        let route = match &a.route {
            Some(name) => route_named(&routes, name).map_err(usage)?,
            // The proxy's rule: user entry, domain, default.
            None => RouteIndex::new(&routes)
                .find(&a.user)
                .map(|i| &routes[i])
                .ok_or_else(|| usage(format!("no route for {:?} and no default route", a.user)))?,
        };
        let mut route = route.clone();
        let up = &mut route.upstream;
        if let Some(v) = &a.upstream {
            up.address = v.clone();
        }
        if let Some(v) = a.upstream_tls {
            up.tls = v;
        }
        if let Some(v) = &a.upstream_ca_file {
            up.ca_file = v.clone();
        }
        if let Some(v) = &a.mailbox {
            up.mailbox = v.clone();
        }
        let account = route.upstream.login.apply(&a.user).to_string();
        let login = if route.upstream.auth == crate::config::UpstreamAuth::Oauth2 {
            // No IMAP password: the account's token from the store the
            // proxy uses (`popbridge oauth add` enrolled it).
            if a.password_file.is_some() {
                return Err(usage(format!(
                    "route {} uses auth = \"oauth2\": the IMAP login uses the account's OAuth2 token, not --password-file",
                    route.name
                )));
            }
            let runtime = OauthRuntime::from_config(config)
                .map_err(|e| usage(format!("oauth: {e}")))?
                .ok_or_else(|| usage("oauth: no OAuth2 runtime for an oauth2 route"))?;
            NewLogin::Oauth {
                runtime,
                provider: route.upstream.oauth_provider.clone(),
            }
        } else {
            NewLogin::Password(
                read_password(a.password_file.as_deref(), NEW_PASSWORD_ENV)?.ok_or_else(|| {
                    usage(format!(
                        "no IMAP password: give --password-file or set {NEW_PASSWORD_ENV}"
                    ))
                })?,
            )
        };
        let data_dir = a
            .data_dir
            .clone()
            .or_else(|| (!config.data.dir.is_empty()).then(|| PathBuf::from(&config.data.dir)));
        if needs_dir && data_dir.is_none() {
            return Err(usage(
                "no data directory: set data.dir in the configuration or give --data-dir",
            ));
        }
        Ok(Self {
            route,
            account,
            login,
            data_dir,
        })
    }

    fn key(&self) -> MapKey {
        MapKey::new(
            &self.route.upstream.address,
            &self.account,
            &self.route.upstream.mailbox,
        )
    }

    fn describe(&self) -> String {
        format!(
            "{} ({} on {}, route {})",
            self.account, self.route.upstream.mailbox, self.route.upstream.address, self.route.name
        )
    }

    /// Logs in and selects the mailbox; with `xuidl`, the snapshot carries
    /// every valid X-UIDL header.
    async fn open(&self, xuidl: bool) -> Result<(ImapConn, Snapshot), MigrateError> {
        let connector = ImapConnector::new(imap_config(&self.route, xuidl)?);
        match &self.login {
            NewLogin::Password(pass) => {
                let credentials = Credentials::Password {
                    user: &self.account,
                    pass,
                };
                Ok(connector.login(credentials, None, None).await?)
            }
            NewLogin::Oauth { runtime, provider } => {
                bearer_login(runtime, &connector, provider, &self.account, None, None)
                    .await
                    .map_err(|e| match e {
                        BearerLoginError::Upstream(e) => MigrateError::New(e),
                        e => MigrateError::Oauth(e),
                    })
            }
        }
    }
}

/// The IMAP connection settings of a route (as the proxy builds them).
fn imap_config(route: &EffectiveRoute, reuse_xuidl: bool) -> Result<ImapConfig, MigrateError> {
    // No listing cache and no IMAP ID: a one-off operator command.
    let up = crate::config::UpstreamConfig {
        send_client_id: false,
        ..route.upstream.clone()
    };
    ImapConfig::from_upstream(&up, reuse_xuidl, None).map_err(usage)
}

/// `host`, `host:port`, `[v6]` or `[v6]:port` → `host:port`.
fn parse_host_port(s: &str, default_port: u16) -> Option<String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return None,
        };
        (format!("[{h}]"), port)
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (s.to_string(), None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|&p| p > 0)?,
        None => default_port,
    };
    (!host.is_empty() && host != "[]").then(|| format!("{host}:{port}"))
}

/// The old POP3 server, resolved.
struct OldSide {
    address: String,
    tls: OldTls,
    user: String,
    pass: Secret,
    /// For the saved list and the summary (no password).
    source: String,
}

impl OldSide {
    fn resolve(
        a: &OldServerArgs,
        new: &NewServerArgs,
        target: &Target,
    ) -> Result<Self, MigrateError> {
        let (implicit, rest) = if let Some(r) = a.old.strip_prefix("pop3s://") {
            (true, r)
        } else if let Some(r) = a.old.strip_prefix("pop3://") {
            (false, r)
        } else {
            return Err(usage(format!(
                "--old {:?}: expected pop3://host[:port] or pop3s://host[:port]",
                a.old
            )));
        };
        let hostport = rest.trim_end_matches('/');
        if hostport.is_empty() || hostport.contains(['/', '@', '?']) {
            return Err(usage(format!(
                "--old {:?}: only pop3[s]://host[:port] (user and password go in their own flags)",
                a.old
            )));
        }
        let default_port = if implicit { 995 } else { 110 };
        let address = parse_host_port(hostport, default_port)
            .ok_or_else(|| usage(format!("--old {:?}: bad host or port", a.old)))?;
        if implicit && a.old_starttls {
            return Err(usage(
                "--old-starttls is for pop3:// (pop3s:// is TLS already)",
            ));
        }
        let tls = if implicit || a.old_starttls {
            let connector =
                crate::tls::client_connector(a.old_ca_file.as_deref()).map_err(|e| usage(e.0))?;
            let name = a
                .old_tls_name
                .clone()
                .unwrap_or_else(|| host_of(&address).to_string());
            let name = ServerName::try_from(name.clone())
                .map_err(|e| usage(format!("old server TLS name {name:?}: {e}")))?;
            if implicit {
                OldTls::Implicit(connector, name)
            } else {
                OldTls::Stls(connector, name)
            }
        } else {
            let host = host_of(&address);
            let loopback = host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                eprintln!(
                    "popbridge migrate: warning: {} without TLS: the old password crosses the network in clear (use pop3s:// or --old-starttls)",
                    a.old
                );
            }
            OldTls::None
        };
        let user = a.old_user.clone().unwrap_or_else(|| new.user.clone());
        let pass = match read_password(a.old_password_file.as_deref(), OLD_PASSWORD_ENV)? {
            Some(p) => p,
            None => match &target.login {
                NewLogin::Password(p) => Secret::new(p.expose().to_vec()),
                NewLogin::Oauth { .. } => {
                    return Err(usage(format!(
                    "no old server password: give --old-password-file or set {OLD_PASSWORD_ENV} \
                         (the route uses OAuth2, so there is no IMAP password to reuse)"
                )))
                }
            },
        };
        Ok(Self {
            source: format!("{} user {user}", a.old),
            address,
            tls,
            user,
            pass,
        })
    }

    async fn open(&self) -> Result<Pop3Client, MigrateError> {
        let mut c = Pop3Client::connect(&self.address, &self.tls).await?;
        c.login(&self.user, &self.pass).await?;
        Ok(c)
    }
}

/// The first line of `file`, else the environment variable; `None` if
/// neither is given. Never echoed anywhere.
fn read_password(file: Option<&Path>, env: &str) -> Result<Option<Secret>, MigrateError> {
    if let Some(path) = file {
        use std::io::Read;
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_PASSWORD_FILE).read_to_end(&mut bytes))
            .map_err(|e| usage(format!("password file {}: {e}", path.display())))?;
        let line = bytes.split(|&b| b == b'\n').next().unwrap_or(&[]);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return Err(usage(format!("password file {} is empty", path.display())));
        }
        return Ok(Some(Secret::new(line.to_vec())));
    }
    match std::env::var_os(env) {
        Some(v) if !v.is_empty() => {
            use std::os::unix::ffi::OsStrExt;
            Ok(Some(Secret::new(v.as_bytes().to_vec())))
        }
        _ => Ok(None),
    }
}

// ---------------------------------------------------------------------------
// The modes
// ---------------------------------------------------------------------------

/// The old server's listing: (message number, UIDL, size) in POP3 order,
/// checked (RFC 1939 §7: valid and unique UIDLs).
async fn old_listing(c: &mut Pop3Client) -> Result<Vec<(u32, String, u64)>, MigrateError> {
    let uidls = c.uidl().await?;
    let sizes: std::collections::HashMap<u32, u64> = c.list().await?.into_iter().collect();
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(uidls.len());
    for (n, uidl) in uidls {
        if !is_valid_uidl(&uidl) {
            return Err(MigrateError::Old(Pop3Error::Protocol {
                command: "UIDL",
                text: format!("message {n}: {uidl:?} is not a valid UIDL (RFC 1939 §7)"),
            }));
        }
        if !seen.insert(uidl.clone()) {
            return Err(MigrateError::Old(Pop3Error::Protocol {
                command: "UIDL",
                text: format!("message {n}: UIDL {uidl:?} listed twice"),
            }));
        }
        let size = *sizes.get(&n).ok_or_else(|| {
            MigrateError::Old(Pop3Error::Protocol {
                command: "LIST",
                text: format!("message {n} is in UIDL but not in LIST"),
            })
        })?;
        out.push((n, uidl, size));
    }
    Ok(out)
}

/// Whole messages up to this size are fetched from the IMAP server many to
/// a command (`UID FETCH set BODY.PEEK[]`, one response each, well under
/// [`crate::imap::MAX_RESPONSE`]); larger ones are streamed in chunks like a
/// RETR through the proxy.
pub const BULK_MESSAGE_MAX: u64 = 1024 * 1024;

/// Octets one bulk `UID FETCH ... BODY.PEEK[]` asks for at most (by
/// RFC822.SIZE): a few round trips per thousand small messages, and what an
/// interruption loses at most.
pub const BULK_BATCH_BYTES: u64 = 8 * 1024 * 1024;

/// IMAP headers asked for in one `UID FETCH ... BODY.PEEK[HEADER]` (also
/// how often the journal is written in that phase).
pub const HEADER_BATCH: usize = 1000;

/// What a capture (or import) fetched and hashed in this run, for the
/// summary: the cost, and proof that a resumed run redid nothing.
#[derive(Debug, Default)]
struct Fetched {
    old_headers: usize,
    old_bodies: usize,
    imap_headers: usize,
    imap_bodies: usize,
    old_octets: u64,
    imap_octets: u64,
    /// Hashes taken from the journal instead.
    reused: usize,
}

/// `capture`: the old server's list and the messages' content hashes,
/// matched against the mailbox by content ([`matching`]).
///
/// Cost per message, in octets transferred: every message's header once on
/// each side (`TOP n 0`, `BODY.PEEK[HEADER]`); and, for each message whose
/// header hash occurs on both sides (normally all of them), the whole
/// message once more on each side (`RETR`, `BODY.PEEK[]`): about its size
/// plus its header, from each server. Every hash is appended to the journal
/// ([`Journal`]) as soon as it is made, so an interrupted capture run again
/// fetches only what it had not hashed yet, and a later capture (after more
/// mail was moved) only the new messages.
async fn capture(old: &OldSide, target: &Target) -> Result<(), MigrateError> {
    println!("popbridge migrate capture: {}", target.describe());
    let dir = target.data_dir.as_deref().unwrap_or(Path::new("."));
    let key = target.key();
    let mut journal = open_journal(dir, &key, Some(&old.source))?;
    let mut cost = Fetched::default();
    // The IMAP side first: its headers decide which old bodies are needed.
    let (uidvalidity, mut new) = imap_headers(target, &mut journal, &mut cost).await?;
    let mut pop = old.open().await?;
    let listing = old_listing(&mut pop).await?;
    let pipelining = pop
        .capabilities()
        .await?
        .iter()
        .any(|c| c.eq_ignore_ascii_case("PIPELINING"));
    let mut messages = old_headers(&mut pop, &listing, pipelining, &mut journal, &mut cost).await?;
    let (old_need, _) = matching::needs_body(&messages, &new);
    old_bodies(
        &mut pop,
        &listing,
        &mut messages,
        &old_need,
        pipelining,
        &mut journal,
        &mut cost,
    )
    .await?;
    pop.quit().await;
    // Recomputed: RETR's header hash is the one that counts.
    let (_, new_need) = matching::needs_body(&messages, &new);
    imap_bodies(
        target,
        uidvalidity,
        &mut new,
        &new_need,
        &mut journal,
        &mut cost,
    )
    .await?;
    let list = OldList {
        key,
        source: old.source.clone(),
        created: now_unix(),
        messages,
    };
    write_map(list, uidvalidity, &new, target, true, &cost)
}

fn open_journal(dir: &Path, key: &MapKey, source: Option<&str>) -> Result<Journal, MigrateError> {
    let journal = Journal::open(dir, key, source)?;
    if journal.dropped > 0 {
        eprintln!(
            "popbridge migrate: {} unreadable lines of the journal dropped (an interrupted run); those messages are hashed again",
            journal.dropped
        );
    }
    Ok(journal)
}

/// The mailbox's UIDVALIDITY and messages with their header hashes (and
/// any body hashes the journal has).
async fn imap_headers(
    target: &Target,
    journal: &mut Journal,
    cost: &mut Fetched,
) -> Result<(u32, Vec<NewMessage>), MigrateError> {
    let (mut conn, snap) = target.open(false).await?;
    let v = snap.uidvalidity;
    let mut new: Vec<NewMessage> = snap
        .messages
        .iter()
        .map(|&(uid, size)| {
            let cached = journal.imap(v, uid, size);
            NewMessage {
                uid,
                size,
                hash: cached.map(|h| h.header.clone()),
                body: cached.and_then(|h| h.body.clone()),
            }
        })
        .collect();
    cost.reused += new.iter().filter(|m| m.hash.is_some()).count();
    let index: HashMap<u32, usize> = new.iter().enumerate().map(|(i, m)| (m.uid, i)).collect();
    let todo: Vec<u32> = new
        .iter()
        .filter(|m| m.hash.is_none())
        .map(|m| m.uid)
        .collect();
    let mut progress = Progress::new("IMAP headers", todo.len());
    for chunk in todo.chunks(HEADER_BATCH) {
        let mut got = Vec::with_capacity(chunk.len());
        conn.for_each_header(chunk, |uid, _, header| {
            got.push((uid, header.len(), header_hash(header)));
            progress.inc();
        })
        .await?;
        for (uid, octets, hash) in got {
            // A UID the server sent unasked is not in the snapshot: ignored.
            let Some(&i) = index.get(&uid) else { continue };
            let m = &mut new[i];
            journal.record_new(
                v,
                uid,
                Hashes {
                    size: m.size,
                    header: hash.clone(),
                    body: None,
                },
            )?;
            m.hash = Some(hash);
            cost.imap_headers += 1;
            cost.imap_octets += octets as u64;
        }
    }
    progress.finish();
    conn.logout().await;
    Ok((v, new))
}

/// The old server's messages with their header hashes: from the journal,
/// else `TOP n 0` (pipelined when the server allows).
async fn old_headers(
    pop: &mut Pop3Client,
    listing: &[(u32, String, u64)],
    pipelining: bool,
    journal: &mut Journal,
    cost: &mut Fetched,
) -> Result<Vec<OldMessage>, MigrateError> {
    let mut messages: Vec<OldMessage> = listing
        .iter()
        .map(|(_, uidl, size)| {
            let cached = journal.pop3(uidl, *size);
            OldMessage {
                uidl: uidl.clone(),
                size: *size,
                hash: cached.map(|h| h.header.clone()),
                body: cached.and_then(|h| h.body.clone()),
            }
        })
        .collect();
    cost.reused += messages.iter().filter(|m| m.hash.is_some()).count();
    let todo: Vec<usize> = (0..listing.len())
        .filter(|&i| messages[i].hash.is_none())
        .collect();
    let batch = if pipelining { TOP_BATCH } else { 1 };
    let mut progress = Progress::new("old server headers", todo.len());
    for chunk in todo.chunks(batch) {
        let ns: Vec<u32> = chunk.iter().map(|&i| listing[i].0).collect();
        let headers = pop.top_headers(&ns, MAX_HEADER_BYTES).await?;
        for (&i, header) in chunk.iter().zip(headers) {
            let m = &mut messages[i];
            let hash = header_hash(&header);
            journal.record_old(
                &m.uidl,
                Hashes {
                    size: m.size,
                    header: hash.clone(),
                    body: None,
                },
            )?;
            m.hash = Some(hash);
            cost.old_headers += 1;
            cost.old_octets += header.len() as u64;
            progress.inc();
        }
    }
    progress.finish();
    Ok(messages)
}

/// Body hashes (and header hashes again, from the same octets) of the old
/// messages `which` that the journal does not have: RETR, streamed.
async fn old_bodies(
    pop: &mut Pop3Client,
    listing: &[(u32, String, u64)],
    messages: &mut [OldMessage],
    which: &[usize],
    pipelining: bool,
    journal: &mut Journal,
    cost: &mut Fetched,
) -> Result<(), MigrateError> {
    let todo: Vec<usize> = which
        .iter()
        .copied()
        .filter(|&i| messages[i].body.is_none())
        .collect();
    let batch = if pipelining { RETR_BATCH } else { 1 };
    let mut progress = Progress::new("old server messages", todo.len());
    for chunk in todo.chunks(batch) {
        let ns: Vec<u32> = chunk.iter().map(|&i| listing[i].0).collect();
        let mut hashers: Vec<MessageHasher> = chunk.iter().map(|_| MessageHasher::new()).collect();
        let mut octets = 0u64;
        pop.retr_each(&ns, |k, piece| {
            octets += piece.len() as u64;
            hashers[k].update(piece);
        })
        .await?;
        cost.old_octets += octets;
        for (&i, hasher) in chunk.iter().zip(hashers) {
            let (header, body) = hasher.finish();
            let m = &mut messages[i];
            journal.record_old(
                &m.uidl,
                Hashes {
                    size: m.size,
                    header: header.clone(),
                    body: Some(body.clone()),
                },
            )?;
            m.hash = Some(header);
            m.body = Some(body);
            cost.old_bodies += 1;
            progress.inc();
        }
    }
    progress.finish();
    Ok(())
}

/// A [`BodySink`] that hashes what it is given.
struct HashSink(MessageHasher);

impl BodySink for HashSink {
    async fn chunk(&mut self, data: &[u8]) -> std::io::Result<Flow> {
        self.0.update(data);
        Ok(Flow::Continue)
    }
}

/// Body hashes of the IMAP messages `which` that the journal does not have:
/// small ones many to a command, large ones streamed. Logs in again (the
/// old server was read in between); a mailbox whose UIDVALIDITY changed
/// meanwhile is an error, since the UIDs read before name nothing now.
async fn imap_bodies(
    target: &Target,
    uidvalidity: u32,
    new: &mut [NewMessage],
    which: &[usize],
    journal: &mut Journal,
    cost: &mut Fetched,
) -> Result<(), MigrateError> {
    let todo: Vec<usize> = which
        .iter()
        .copied()
        .filter(|&i| new[i].body.is_none())
        .collect();
    if todo.is_empty() {
        return Ok(());
    }
    let (mut conn, snap) = target.open(false).await?;
    if snap.uidvalidity != uidvalidity {
        conn.logout().await;
        return Err(MigrateError::New(UpstreamError::Protocol(format!(
            "the mailbox's UIDVALIDITY changed from {uidvalidity} to {} during the capture \
             (it was recreated): run the capture again",
            snap.uidvalidity
        ))));
    }
    let index: HashMap<u32, usize> = new.iter().enumerate().map(|(i, m)| (m.uid, i)).collect();
    let mut progress = Progress::new("IMAP messages", todo.len());
    let (small, large): (Vec<usize>, Vec<usize>) = todo
        .into_iter()
        .partition(|&i| new[i].size <= BULK_MESSAGE_MAX);
    // Small messages: batches of at most BULK_BATCH_BYTES.
    let mut batches: Vec<Vec<u32>> = Vec::new();
    let mut bytes = 0u64;
    for i in small {
        if batches.is_empty() || bytes + new[i].size > BULK_BATCH_BYTES {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += new[i].size;
        if let Some(b) = batches.last_mut() {
            b.push(new[i].uid);
        }
    }
    let mut record = |uid: u32,
                      (header, body): (HeaderHash, BodyHash),
                      octets: u64,
                      new: &mut [NewMessage],
                      cost: &mut Fetched|
     -> Result<(), MigrateError> {
        let Some(&i) = index.get(&uid) else {
            return Ok(());
        };
        let m = &mut new[i];
        journal.record_new(
            uidvalidity,
            uid,
            Hashes {
                size: m.size,
                header: header.clone(),
                body: Some(body.clone()),
            },
        )?;
        m.hash = Some(header);
        m.body = Some(body);
        cost.imap_bodies += 1;
        cost.imap_octets += octets;
        Ok(())
    };
    for uids in batches {
        let mut got = Vec::with_capacity(uids.len());
        conn.for_each_message(&uids, |uid, _, message| {
            let mut h = MessageHasher::new();
            h.update(message);
            got.push((uid, h.finish(), message.len() as u64));
            progress.inc();
        })
        .await?;
        for (uid, hashes, octets) in got {
            record(uid, hashes, octets, new, cost)?;
        }
    }
    for i in large {
        let (uid, size) = (new[i].uid, new[i].size);
        let mut sink = HashSink(MessageHasher::new());
        let end = conn
            .fetch(uid, size, false, &mut sink)
            .await
            .map_err(|e| match e {
                FetchError::Upstream(e) => MigrateError::New(e),
                FetchError::Sink(e) => MigrateError::New(UpstreamError::Io(e)),
            })?;
        progress.inc();
        // Expunged meanwhile: no hash, so never paired.
        if end == FetchEnd::Complete {
            record(uid, sink.0.finish(), size, new, cost)?;
        }
    }
    progress.finish();
    conn.logout().await;
    Ok(())
}

/// `import`: the old list from a file or from an earlier capture, matched
/// against the mailbox (whose hashes come from the journal or are made now).
async fn import(file: Option<&Path>, target: &Target) -> Result<(), MigrateError> {
    println!("popbridge migrate import: {}", target.describe());
    let dir = target.data_dir.as_deref().unwrap_or(Path::new("."));
    let (list, save) = match file {
        Some(path) => (read_uidl_file(path, target)?, true),
        None => {
            let path = target.key().old_path(dir);
            let list = OldList::load(&path)?.ok_or_else(|| {
                usage(format!(
                    "no saved list for this account ({}): give --uidl-file or run capture",
                    path.display()
                ))
            })?;
            if list.key != target.key() {
                return Err(usage(format!(
                    "{} was saved for {}/{}/{}, not this account",
                    path.display(),
                    list.key.upstream,
                    list.key.account,
                    list.key.mailbox
                )));
            }
            (list, false)
        }
    };
    let mut journal = open_journal(dir, &target.key(), None)?;
    let mut cost = Fetched::default();
    let (uidvalidity, mut new) = imap_headers(target, &mut journal, &mut cost).await?;
    // Only old messages with a body hash can be paired: no other IMAP body
    // is worth fetching.
    let complete: Vec<OldMessage> = list
        .messages
        .iter()
        .filter(|m| m.body.is_some())
        .cloned()
        .collect();
    let (_, need) = matching::needs_body(&complete, &new);
    imap_bodies(
        target,
        uidvalidity,
        &mut new,
        &need,
        &mut journal,
        &mut cost,
    )
    .await?;
    write_map(list, uidvalidity, &new, target, save, &cost)
}

/// A UIDL list file: `uidl size [header-hash [body-hash]]` per line, `#`
/// comments.
fn read_uidl_file(path: &Path, target: &Target) -> Result<OldList, MigrateError> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_OLD_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| usage(format!("{}: {e}", path.display())))?;
    if bytes.len() as u64 > MAX_OLD_FILE_BYTES {
        return Err(usage(format!(
            "{}: larger than {MAX_OLD_FILE_BYTES} octets",
            path.display()
        )));
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| usage(format!("{}: not UTF-8 text", path.display())))?;
    let mut messages = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let m = parse_old_line(line)
            .map_err(|e| usage(format!("{}:{}: {e}", path.display(), i + 1)))?;
        if !seen.insert(m.uidl.clone()) {
            return Err(usage(format!(
                "{}:{}: UIDL {:?} listed twice",
                path.display(),
                i + 1,
                m.uidl
            )));
        }
        messages.push(m);
    }
    Ok(OldList {
        key: target.key(),
        source: format!("file {}", path.display()),
        created: now_unix(),
        messages,
    })
}

/// Matches `list` against the mailbox's messages `new`, writes the map (and
/// the list, when `save_list`) and prints the summary.
fn write_map(
    list: OldList,
    uidvalidity: u32,
    new: &[NewMessage],
    target: &Target,
    save_list: bool,
    cost: &Fetched,
) -> Result<(), MigrateError> {
    let outcome = matching::pair(&list.messages, new);
    let redownloads = outcome.redownloads();
    let dir = target.data_dir.as_deref().unwrap_or(Path::new("."));
    let key = target.key();
    if save_list {
        write_atomic(&key.old_path(dir), &list.to_bytes())?;
    }
    let map = UidlMap {
        key: key.clone(),
        uidvalidity,
        created: now_unix(),
        redownloads: Some(redownloads.len() as u64),
        entries: outcome.map.clone(),
    };
    let path = key.map_path(dir);
    write_atomic(&path, &map.to_bytes())?;
    print_match_summary(list.messages.len(), new.len(), &outcome, cost);
    println!(
        "  map written: {} ({} entries, UIDVALIDITY {}, {} downloaded once more)",
        path.display(),
        map.entries.len(),
        map.uidvalidity,
        redownloads.len()
    );
    Ok(())
}

/// Groups shown in the summary at most (the count says how many more).
const GROUPS_SHOWN: usize = 20;

fn print_match_summary(old: usize, new: usize, o: &Outcome, cost: &Fetched) {
    let uids = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>();
    println!("  old server messages: {old}");
    println!("  IMAP mailbox messages: {new}");
    println!("  matched by content (header and body): {}", o.by_content);
    println!(
        "  identical messages (cannot be told apart): {} groups, {} paired in order",
        o.identical.len(),
        o.identical_paired()
    );
    print_groups(&o.identical, |g| {
        if g.paired {
            format!("paired in order ({} on each side)", g.old.len())
        } else {
            format!(
                "not paired ({} old, {} IMAP): template UIDLs",
                g.old.len(),
                g.new.len()
            )
        }
    });
    println!(
        "  same header, other body (not paired): {} groups",
        o.other_body.len()
    );
    print_groups(&o.other_body, |_| "template UIDLs".to_string());
    if !o.no_hash.is_empty() {
        println!(
            "  without content hashes (not matched; run capture for them): {}{}",
            o.no_hash.len(),
            listed("UIDLs", &o.no_hash)
        );
    }
    println!(
        "  only on the old server: {}{}",
        o.missing_in_new.len(),
        listed("UIDLs", &o.missing_in_new)
    );
    println!(
        "  only in the IMAP mailbox: {}{}",
        o.missing_in_old.len(),
        listed("UIDs", &uids(&o.missing_in_old))
    );
    let again = o.redownloads();
    println!(
        "  downloaded once more at cut-over: {}{}",
        again.len(),
        listed("UIDs", &uids(&again))
    );
    println!(
        "  hashed in this run: old server {} headers + {} messages ({} octets), \
         IMAP {} headers + {} messages ({} octets), {} from the journal",
        cost.old_headers,
        cost.old_bodies,
        cost.old_octets,
        cost.imap_headers,
        cost.imap_bodies,
        cost.imap_octets,
        cost.reused
    );
}

/// One line per group: its old UIDLs and IMAP UIDs together, and `what`.
fn print_groups(groups: &[Group], what: impl Fn(&Group) -> String) {
    for g in groups.iter().take(GROUPS_SHOWN) {
        let uids: Vec<String> = g.new.iter().map(u32::to_string).collect();
        println!(
            "    old UIDLs {} = IMAP UIDs {}: {}",
            shown(&g.old),
            shown(&uids),
            what(g)
        );
    }
    if groups.len() > GROUPS_SHOWN {
        println!("    and {} more groups", groups.len() - GROUPS_SHOWN);
    }
}

/// " (UIDLs: a b c)" for a non-empty list (`what` names the items).
fn listed(what: &str, items: &[String]) -> String {
    if items.is_empty() {
        String::new()
    } else {
        format!(" ({what}: {})", shown(items))
    }
}

/// "a b c", or the first 20 and "and N more".
fn shown(items: &[String]) -> String {
    const SHOWN: usize = 20;
    let more = items.len().saturating_sub(SHOWN);
    let shown = items[..items.len().min(SHOWN)].join(" ");
    if more > 0 {
        format!("{shown} and {more} more")
    } else {
        shown
    }
}

/// `copy`: APPEND what the mailbox lacks, each with its old UIDL.
async fn copy(
    old: &OldSide,
    target: &Target,
    seen: bool,
    max: Option<usize>,
) -> Result<(), MigrateError> {
    println!("popbridge migrate copy: {}", target.describe());
    let mut pop = old.open().await?;
    let listing = old_listing(&mut pop).await?;
    // Every valid X-UIDL already in the mailbox: what an earlier (maybe
    // interrupted) run copied. Read once, so each message costs one RETR
    // and one APPEND.
    let (mut conn, snap) = target.open(true).await?;
    let without = snap.messages.len().saturating_sub(snap.xuidl.len());
    if without > 0 {
        eprintln!(
            "popbridge migrate: warning: {without} messages in the mailbox have no X-UIDL header; \
             if another tool copied them from the old server, they will be copied again \
             (use capture for mail moved by another tool)"
        );
    }
    let mut present: HashSet<String> = snap.xuidl.into_values().collect();
    let already = listing
        .iter()
        .filter(|(_, u, _)| present.contains(u))
        .count();
    let todo = listing.len() - already;
    let limit = max.unwrap_or(usize::MAX);
    let mut copied = 0usize;
    let mut progress = Progress::new("copying", todo.min(limit));
    let flags = seen.then_some("(\\Seen)");
    for (n, uidl, _) in &listing {
        if present.contains(uidl) || copied >= limit {
            continue;
        }
        let step = async {
            let message = pop.retr(*n).await?;
            let mut data = Vec::with_capacity(message.len() + uidl.len() + 10);
            // RFC 1939 §7 UIDLs are 0x21-0x7E: safe as a header value.
            data.extend_from_slice(format!("X-UIDL: {uidl}\r\n").as_bytes());
            data.extend_from_slice(&message);
            let header_end = message.len().min(MAX_HEADER_BYTES);
            let date = crate::migrate::date::internal_date(&message[..header_end]);
            conn.append(&data, flags, date.as_deref()).await?;
            Ok::<(), MigrateError>(())
        };
        if let Err(e) = step.await {
            progress.finish();
            return Err(MigrateError::CopyInterrupted {
                error: Box::new(e),
                copied,
            });
        }
        present.insert(uidl.clone());
        copied += 1;
        progress.inc();
    }
    progress.finish();
    pop.quit().await;
    conn.logout().await;
    println!("  old server messages: {}", listing.len());
    println!("  already in the mailbox (skipped): {already}");
    println!("  copied: {copied}");
    println!("  left for the next run: {}", todo - copied);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_server_addresses() {
        assert_eq!(
            parse_host_port("old.example", 110).unwrap(),
            "old.example:110"
        );
        assert_eq!(
            parse_host_port("old.example:1110", 110).unwrap(),
            "old.example:1110"
        );
        assert_eq!(parse_host_port("[::1]", 995).unwrap(), "[::1]:995");
        assert_eq!(parse_host_port("[::1]:2", 995).unwrap(), "[::1]:2");
        for bad in ["", "h:", "h:0", "h:x", "[::1", "[]:1", "a:1:2"] {
            assert!(parse_host_port(bad, 110).is_none(), "{bad}");
        }
        assert_eq!(host_of("[::1]:2"), "::1");
    }
}
