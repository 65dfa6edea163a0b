//! `popbridge oauth ...` and `popbridge device ...`.
//!
//! Secrets never come from the command line: device passwords are read
//! from a file, `POPBRIDGE_DEVICE_PASSWORD` or a terminal prompt (or
//! generated and shown once); the store key and client secrets come from
//! the configuration's files or environment variables.
//!
//! Exit codes: 0 done, 1 failed, 2 usage or configuration error.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;

use crate::config::oauth::Provider;
use crate::config::Config;
use crate::oauth::device;
use crate::oauth::provider::{self, ProviderClient, ProviderError, TokenResponse};
use crate::oauth::service::TokenService;
use crate::oauth::store::{
    now_unix, now_unix_ms, AccountMeta, AccountRecord, AccountStatus, DeviceProblem, DeviceRecord,
    TokenSecrets, TokenStore,
};

/// Environment variable `device add` reads a password from.
pub const DEVICE_PASSWORD_ENV: &str = "POPBRIDGE_DEVICE_PASSWORD";
/// How long `oauth add --browser` waits for the redirect.
const BROWSER_WAIT: Duration = Duration::from_secs(600);
/// Reading one redirect request.
const REDIRECT_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Consecutive network failures tolerated while polling the device flow.
const MAX_POLL_FAILURES: u32 = 5;
/// Longest device login name (a POP3 USER argument; RFC 2449 §4 caps a
/// command line at 255 octets).
const MAX_LOGIN_LEN: usize = 200;

/// `popbridge oauth ...`
#[derive(Debug, Clone, clap::Args)]
pub struct OauthArgs {
    #[command(subcommand)]
    pub command: OauthCommand,
}

/// OAuth2 account commands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum OauthCommand {
    /// Enrol an account: the device authorization grant (RFC 8628) by
    /// default, or the browser flow with PKCE and a loopback redirect.
    Add {
        /// The upstream account (the IMAP user name), e.g. scans@example.org.
        account: String,
        /// The [[oauth.providers]] name. Default: the only one defined.
        #[arg(long)]
        provider: Option<String>,
        /// Authorization-code flow with PKCE: print a URL to open in a
        /// browser on this machine and wait for its redirect to 127.0.0.1.
        #[arg(long)]
        browser: bool,
    },
    /// List enrolled accounts (provider, status, last update; no secrets).
    List,
    /// Forget an account's tokens and revoke its refresh token at the
    /// provider when the provider has a revocation endpoint.
    Remove {
        account: String,
        /// Only delete the local copy; do not revoke at the provider.
        #[arg(long)]
        keep_at_provider: bool,
    },
    /// Get an access token for an account (refreshing it if needed), log
    /// in to the IMAP server of the route that serves the account with it,
    /// select the mailbox and report its message count.
    Test {
        account: String,
        /// Refresh even if the stored access token is still valid, unless
        /// another process refreshed it after this command started.
        #[arg(long)]
        force_refresh: bool,
        /// The route whose IMAP server to log in to. Default: the OAuth2
        /// route of the account's provider whose users or domains match
        /// the account, else the default route if it is that provider's,
        /// else the only route of that provider.
        #[arg(long, value_name = "NAME", conflicts_with = "token_only")]
        route: Option<String>,
        /// Only obtain an access token; do not log in to the IMAP server.
        #[arg(long)]
        token_only: bool,
    },
    /// Make a new random store key (base64) for oauth.key_file: written to
    /// a new file with --output (recommended), else to standard output.
    GenerateKey {
        /// Create FILE with mode 0600 (whatever the umask) and write the
        /// key there; an existing FILE is never overwritten.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

/// `popbridge device ...`
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    #[command(subcommand)]
    pub command: DeviceCommand,
}

/// Device login commands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DeviceCommand {
    /// Add a device login for an account. The password comes from
    /// --password-file, $POPBRIDGE_DEVICE_PASSWORD, a prompt, or --generate.
    Add {
        /// The user name the device sends with USER.
        login: String,
        /// The upstream account it reads.
        #[arg(long)]
        account: String,
        /// Network the device may log in from (repeatable); none: anywhere.
        #[arg(long = "allow", value_name = "CIDR")]
        allow: Vec<ipnet::IpNet>,
        /// File holding the password (one line).
        #[arg(long, value_name = "FILE", conflicts_with = "generate")]
        password_file: Option<PathBuf>,
        /// Generate a strong password and print it once.
        #[arg(long)]
        generate: bool,
    },
    /// Remove a device login; other devices of the account keep working.
    Remove { login: String },
    /// List device logins (login, account, networks, whether the record's
    /// seal checks; never hashes).
    List,
    /// Seal device records written before popbridge sealed them with the
    /// store key (they are refused until then), keeping their passwords.
    /// The records are taken as they are: check them with `device list`
    /// first, since anyone who could write to the store could have added
    /// or changed an unsealed record.
    Seal {
        /// The device logins to seal.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        logins: Vec<String>,
        /// Every unsealed record.
        #[arg(long)]
        all: bool,
    },
}

/// A command's failure: message and exit code.
struct Fail(u8, String);

fn usage(msg: impl Into<String>) -> Fail {
    Fail(2, msg.into())
}

fn failed(msg: impl Into<String>) -> Fail {
    Fail(1, msg.into())
}

fn finish(what: &str, r: Result<(), Fail>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, msg)) => {
            eprintln!("popbridge {what}: {msg}");
            ExitCode::from(code)
        }
    }
}

fn init_logging() {
    super::logging::init("warn", crate::config::LogFormat::Text);
}

fn runtime() -> Result<tokio::runtime::Runtime, Fail> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failed(format!("cannot start the runtime: {e}")))
}

fn need_config(config: Option<Config>) -> Result<Config, Fail> {
    config.ok_or_else(|| usage("needs --config FILE (the [data] and [oauth] sections)"))
}

/// `oauth generate-key`: a new key to `output` (created 0600, never
/// overwritten) or to standard output.
fn generate_key(output: Option<&std::path::Path>) -> Result<(), Fail> {
    let key = crate::oauth::crypto::random_key_base64().map_err(failed)?;
    let Some(path) = output else {
        private_stdout();
        println!("{key}");
        return Ok(());
    };
    let mut o = std::fs::OpenOptions::new();
    // O_EXCL: an existing key (perhaps the one a store was written with)
    // is never replaced, and no symlink is followed.
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let mut file = o.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            failed(format!(
                "{} exists: refusing to overwrite it (a store can only be read with the key it was written with); remove it first to replace it",
                path.display()
            ))
        } else {
            failed(format!("cannot create {}: {e}", path.display()))
        }
    })?;
    let written = writeln!(file, "{key}").and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(path);
        return Err(failed(format!("cannot write {}: {e}", path.display())));
    }
    println!(
        "wrote a new store key to {} (mode 0600); point oauth.key_file at it and keep a copy somewhere safe",
        path.display()
    );
    Ok(())
}

/// `generate-key > FILE` under umask 022 makes a file everyone may read:
/// when standard output is a regular file that others may read, make it
/// private before the key is written, and say so.
fn private_stdout() {
    #[cfg(unix)]
    {
        use std::os::fd::AsFd;
        use std::os::unix::fs::PermissionsExt;
        let Ok(fd) = std::io::stdout().as_fd().try_clone_to_owned() else {
            return;
        };
        let file = std::fs::File::from(fd);
        let Ok(meta) = file.metadata() else { return };
        if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
            match file.set_permissions(std::fs::Permissions::from_mode(0o600)) {
                Ok(()) => eprintln!(
                    "popbridge oauth generate-key: standard output is a file others could read: made it private (mode 0600); --output FILE creates it private from the start"
                ),
                Err(e) => eprintln!(
                    "popbridge oauth generate-key: warning: standard output is a file others can read and cannot be made private ({e}): use --output FILE"
                ),
            }
        }
    }
}

/// Opens the store; a configuration problem (key, data dir) is a usage
/// error, an unreadable store a failure.
async fn store(config: &Config) -> Result<TokenStore, Fail> {
    if let Err(e) = config.oauth.load_key() {
        return Err(usage(e));
    }
    if let Some(w) = config.oauth.key_file_warning() {
        eprintln!("popbridge: warning: {w}");
    }
    let s = crate::oauth::open_store(config).map_err(failed)?;
    s.check().await.map_err(|e| failed(e.to_string()))?;
    Ok(s)
}

pub fn run_oauth(args: OauthArgs, config: Option<Config>) -> ExitCode {
    init_logging();
    if let OauthCommand::GenerateKey { output } = &args.command {
        return finish("oauth generate-key", generate_key(output.as_deref()));
    }
    let r = (|| {
        let config = need_config(config)?;
        let rt = runtime()?;
        let r = rt.block_on(oauth(args.command, config));
        // Do not wait for a blocked read of standard input (the pasted
        // redirect of `oauth add --browser`).
        rt.shutdown_background();
        r
    })();
    finish("oauth", r)
}

pub fn run_device(args: DeviceArgs, config: Option<Config>) -> ExitCode {
    init_logging();
    let r = (|| {
        let config = need_config(config)?;
        let rt = runtime()?;
        rt.block_on(device_cmd(args.command, config))
    })();
    finish("device", r)
}

fn pick_provider(config: &Config, name: Option<&str>) -> Result<Provider, Fail> {
    let name = match name {
        Some(n) => n.to_string(),
        None => match config.oauth.providers.as_slice() {
            [one] => one.name.clone(),
            [] => return Err(usage("no [[oauth.providers]] in the configuration")),
            _ => {
                return Err(usage(
                    "several providers are defined: name one with --provider",
                ))
            }
        },
    };
    config.oauth.provider(&name).map_err(|e| usage(e.0))
}

fn client_secret(p: &Provider) -> Result<Option<String>, Fail> {
    p.client_secret
        .read()
        .map_err(|e| usage(format!("client secret of {}: {e}", p.name)))
}

async fn oauth(cmd: OauthCommand, config: Config) -> Result<(), Fail> {
    match cmd {
        OauthCommand::Add {
            account,
            provider,
            browser,
        } => {
            check_name("account", &account)?;
            let p = pick_provider(&config, provider.as_deref())?;
            let store = store(&config).await?;
            let secret = client_secret(&p)?;
            let client = ProviderClient::new().map_err(failed)?;
            let tokens = if browser {
                browser_flow(&client, &p, secret.as_deref(), &account).await?
            } else {
                device_flow(&client, &p, secret.as_deref(), &account).await?
            };
            enrol(&store, &p, &account, tokens).await
        }
        OauthCommand::List => {
            let store = store(&config).await?;
            let accounts = store.list().await.map_err(|e| failed(e.to_string()))?;
            if accounts.is_empty() {
                println!("no accounts enrolled");
                return Ok(());
            }
            println!(
                "{:<40} {:<16} {:<20} UPDATED",
                "ACCOUNT", "PROVIDER", "STATUS"
            );
            for (account, meta) in accounts {
                let status = match &meta.status {
                    AccountStatus::Active => "active".to_string(),
                    AccountStatus::NeedsReenrolment { .. } => "needs_reenrolment".to_string(),
                };
                println!(
                    "{account:<40} {:<16} {status:<20} {}",
                    meta.provider,
                    format_time(meta.updated)
                );
                if let AccountStatus::NeedsReenrolment { reason, since } = &meta.status {
                    println!(
                        "    since {}: {reason}; fix: popbridge oauth add {account} --provider {}",
                        format_time(*since),
                        meta.provider
                    );
                }
            }
            Ok(())
        }
        OauthCommand::Remove {
            account,
            keep_at_provider,
        } => {
            let store = store(&config).await?;
            let rec = store
                .get(&account)
                .await
                .map_err(|e| failed(e.to_string()))?;
            let Some(rec) = rec else {
                return Err(failed(format!("no account {account:?} is enrolled")));
            };
            let mut revoke_error = None;
            if !keep_at_provider {
                match config.oauth.provider(&rec.meta.provider) {
                    Ok(p) if p.revocation_url.is_some() => {
                        let secret = client_secret(&p)?;
                        let client = ProviderClient::new().map_err(failed)?;
                        match client
                            .revoke(&p, secret.as_deref(), &rec.secrets.refresh_token)
                            .await
                        {
                            Ok(()) => println!("revoked the refresh token at {}", p.name),
                            Err(e) => revoke_error = Some(e.to_string()),
                        }
                    }
                    Ok(p) => println!(
                        "provider {} has no revocation endpoint: revoke popbridge's access in the account's security settings if needed",
                        p.name
                    ),
                    Err(e) => revoke_error = Some(e.0),
                }
            }
            store
                .remove(&account)
                .await
                .map_err(|e| failed(e.to_string()))?;
            println!("removed {account}");
            let devices = store.devices().await.map_err(|e| failed(e.to_string()))?;
            let left: Vec<String> = devices
                .into_iter()
                .filter(|d| d.record.account == account)
                .map(|d| printable(&d.login))
                .collect();
            if !left.is_empty() {
                println!(
                    "devices still mapped to {account} (they fail until it is enrolled again): {}",
                    left.join(", ")
                );
            }
            match revoke_error {
                Some(e) => Err(failed(format!(
                    "removed locally, but revoking at the provider failed: {e}"
                ))),
                None => Ok(()),
            }
        }
        OauthCommand::Test {
            account,
            force_refresh,
            route,
            token_only,
        } => {
            test_account(
                &config,
                &account,
                force_refresh,
                route.as_deref(),
                token_only,
            )
            .await
        }
        OauthCommand::GenerateKey { .. } => Ok(()),
    }
}

/// `popbridge oauth test`: an access token, then (unless `token_only`) an
/// IMAP login with it on the account's route, SELECT, LOGOUT.
async fn test_account(
    config: &Config,
    account: &str,
    force_refresh: bool,
    route: Option<&str>,
    token_only: bool,
) -> Result<(), Fail> {
    let started_ms = now_unix_ms();
    let store = Arc::new(store(config).await?);
    let rec = store
        .get(account)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let Some(rec) = rec else {
        return Err(failed(format!(
            "no account {account:?} is enrolled: run popbridge oauth add {account}"
        )));
    };
    let provider = rec.meta.provider.clone();
    // The route first: a configuration mistake is reported before any
    // request to the provider.
    let imap = if token_only {
        None
    } else {
        let routes = config.effective_routes().map_err(|e| usage(e.0))?;
        let route = account_route(&routes, account, &provider, route).map_err(usage)?;
        if let Some(w) = crate::app::upstream_warning(&route.upstream) {
            eprintln!("popbridge oauth test: warning: {w}");
        }
        let imap = crate::imap::ImapConfig::from_upstream(
            &crate::config::UpstreamConfig {
                // A one-off operator command: no IMAP ID with a client address.
                send_client_id: false,
                ..route.upstream.clone()
            },
            false,
            None,
        )
        .map_err(usage)?;
        Some((route.name.clone(), imap))
    };
    let providers = config.oauth.resolved_providers().map_err(|e| usage(e.0))?;
    let margin = Duration::from_secs(config.oauth.refresh_margin_secs);
    let mut service = TokenService::new(store.clone(), providers, margin).map_err(failed)?;
    if force_refresh {
        service = service.with_fresh_since(started_ms);
    }
    let runtime = crate::oauth::OauthRuntime::from_service(service);
    let before = rec.meta.version;
    let t = runtime
        .access_token(&provider, account)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let after = store
        .get(account)
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_or(before, |r| r.meta.version);
    println!(
        "OK: access token for {account} from {provider} (usable for {} s; {})",
        t.expires_at
            .saturating_duration_since(Instant::now())
            .as_secs(),
        if after != before {
            "refreshed now"
        } else {
            "stored token still valid"
        }
    );
    let Some((route_name, imap)) = imap else {
        return Ok(());
    };
    let address = imap.address.clone();
    let mailbox = imap.mailbox.clone();
    let connector = crate::imap::ImapConnector::new(imap);
    let (conn, snap) =
        crate::oauth::login::bearer_login(&runtime, &connector, &provider, account, None, None)
            .await
            .map_err(|e| {
                failed(format!(
                    "IMAP login to {address} as {account} (route {route_name}) failed: {e}"
                ))
            })?;
    crate::imap::Upstream::logout(conn).await;
    println!(
        "OK: IMAP login to {address} as {account} (route {route_name}): {mailbox} holds {} messages",
        snap.messages.len()
    );
    // The account works: replicas backing it off stop doing so.
    match store.reset_backoff(account).await {
        Ok(_) => println!("back-offs of {account} lifted on every replica sharing the store"),
        Err(e) => eprintln!("popbridge oauth test: could not record the success in the store (replicas keep their back-off until it ends): {e}"),
    }
    Ok(())
}

/// The route `oauth test` logs in through for `account` enrolled at
/// `provider`: `--route NAME` if given (it must be that provider's OAuth2
/// route), else the provider's OAuth2 route listing the account among its
/// users, then one listing the account's domain, then the default route if
/// it is the provider's, then the provider's only route. (The proxy routes
/// by device login names, which need not look like the account.)
pub fn account_route<'a>(
    routes: &'a [crate::config::EffectiveRoute],
    account: &str,
    provider: &str,
    name: Option<&str>,
) -> Result<&'a crate::config::EffectiveRoute, String> {
    use crate::config::UpstreamAuth;
    let serves = |r: &&crate::config::EffectiveRoute| {
        r.upstream.auth == UpstreamAuth::Oauth2 && r.upstream.oauth_provider == provider
    };
    if let Some(name) = name {
        let r = crate::config::routes::route_named(routes, name)?;
        if r.upstream.auth != UpstreamAuth::Oauth2 {
            return Err(format!("route {name} does not use auth = \"oauth2\""));
        }
        if r.upstream.oauth_provider != provider {
            return Err(format!(
                "route {name} uses provider {:?}, but {account} is enrolled with {provider:?}",
                r.upstream.oauth_provider
            ));
        }
        return Ok(r);
    }
    // The proxy's rule (user entry, domain, default) among the provider's
    // routes, then the provider's only route.
    let ours: Vec<&crate::config::EffectiveRoute> = routes.iter().filter(serves).collect();
    crate::config::RouteIndex::new(ours.iter().copied())
        .find(account)
        .map(|i| ours[i])
        .or(match ours.as_slice() {
            [one] => Some(*one),
            _ => None,
        })
        .ok_or_else(|| match ours.len() {
            0 => format!("no route uses auth = \"oauth2\" with oauth_provider = {provider:?}"),
            _ => format!(
                "several routes use provider {provider:?} and none matches {account}: name one with --route"
            ),
        })
}

/// Account names and device logins: printable, no spaces (they travel in
/// POP3 and IMAP commands and in log fields).
fn check_name(what: &str, name: &str) -> Result<(), Fail> {
    if name.is_empty()
        || name.len() > MAX_LOGIN_LEN
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(usage(format!(
            "{what} {name:?} must be 1 to {MAX_LOGIN_LEN} characters without spaces"
        )));
    }
    Ok(())
}

/// Stores a fresh enrolment (replacing any previous record).
async fn enrol(
    store: &TokenStore,
    p: &Provider,
    account: &str,
    t: TokenResponse,
) -> Result<(), Fail> {
    let Some(refresh) = t.refresh_token.clone() else {
        return Err(failed(format!(
            "{} issued no refresh token{}",
            p.name,
            match p.preset {
                crate::config::oauth::Preset::Microsoft => " (the scopes need offline_access)",
                crate::config::oauth::Preset::Google =>
                    " (Google issues one with access_type=offline and prompt=consent, which --browser sends)",
                crate::config::oauth::Preset::Generic => " (check the client's grant types and scopes)",
            }
        )));
    };
    let lifetime = t.lifetime();
    let scopes = t
        .scope
        .as_deref()
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_else(|| p.scopes.clone());
    let now = now_unix();
    let created = store
        .get(account)
        .await
        .ok()
        .flatten()
        .map_or(now, |r| r.meta.created);
    let mut rec = AccountRecord {
        account: account.to_string(),
        meta: AccountMeta {
            provider: p.name.clone(),
            scopes,
            status: AccountStatus::Active,
            created,
            updated: now,
            version: 0,
            // Replicas backing the account off (e.g. after an enrolment
            // under the wrong identity) lift their back-off on seeing it.
            backoff_reset: now_unix_ms(),
        },
        secrets: TokenSecrets {
            refresh_token: refresh,
            access_token: Some(t.access_token),
            access_expires_at: Some(now + lifetime),
            access_issued_at_ms: Some(now_unix_ms()),
        },
    };
    store
        .put(&mut rec)
        .await
        .map_err(|e| failed(e.to_string()))?;
    println!(
        "enrolled {account} with {} (refresh token stored encrypted, key id {})",
        p.name,
        store.key_id()
    );
    Ok(())
}

/// RFC 8628: print the URL and code, poll until approved.
async fn device_flow(
    client: &ProviderClient,
    p: &Provider,
    secret: Option<&str>,
    account: &str,
) -> Result<TokenResponse, Fail> {
    if p.device_authorization_url.is_none() {
        return Err(usage(format!(
            "provider {} has no device_authorization_url: use --browser",
            p.name
        )));
    }
    let auth = match client.device_authorization(p, secret).await {
        Ok(a) => a,
        Err(e) => {
            let hint = if p.preset == crate::config::oauth::Preset::Google {
                " (Google's device flow does not grant the Gmail scope: use --browser)"
            } else {
                ""
            };
            return Err(failed(format!("device authorization failed: {e}{hint}")));
        }
    };
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "To let popbridge read {account}, sign in as {account} at:\n  {}\nand enter the code:\n  {}",
        // The provider's words go to a terminal: printable ASCII only, so
        // a hostile endpoint cannot send escape sequences.
        printable(&auth.verification_uri),
        printable(&auth.user_code)
    );
    if let Some(c) = &auth.verification_uri_complete {
        let _ = writeln!(out, "(or open {})", printable(c));
    }
    let _ = writeln!(
        out,
        "Waiting for approval (the code expires in {} s)...",
        auth.lifetime()
    );
    let _ = out.flush();
    let deadline = Instant::now() + Duration::from_secs(auth.lifetime());
    let mut interval = provider::poll_interval(&auth);
    let mut failures = 0;
    loop {
        // RFC 8628 §3.5: wait `interval` between requests.
        tokio::time::sleep(interval).await;
        if Instant::now() >= deadline {
            return Err(failed(
                "the code expired before it was approved; run the command again",
            ));
        }
        match client.poll_device(p, secret, &auth.device_code).await {
            Ok(t) => return Ok(t),
            Err(ProviderError::Pending) => failures = 0,
            Err(ProviderError::SlowDown) | Err(ProviderError::Throttled { .. }) => {
                interval += provider::SLOW_DOWN_STEP;
            }
            Err(ProviderError::AccessDenied) => {
                return Err(failed("the request was denied at the provider"))
            }
            Err(ProviderError::ExpiredToken) => {
                return Err(failed(
                    "the code expired before it was approved; run the command again",
                ))
            }
            Err(ProviderError::Transport(e)) => {
                failures += 1;
                if failures >= MAX_POLL_FAILURES {
                    return Err(failed(format!("polling the provider failed: {e}")));
                }
            }
            Err(e) => return Err(failed(format!("enrolment failed: {e}"))),
        }
    }
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// RFC 6749 §4.1 with PKCE S256 (RFC 7636) and a loopback redirect
/// (RFC 8252 §7.3: `http://127.0.0.1:<any port>/`).
async fn browser_flow(
    client: &ProviderClient,
    p: &Provider,
    secret: Option<&str>,
    account: &str,
) -> Result<TokenResponse, Fail> {
    let Some(auth_url) = p.authorization_url.as_deref() else {
        return Err(usage(format!(
            "provider {} has no authorization_url: use the device flow (without --browser)",
            p.name
        )));
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| failed(format!("cannot listen on 127.0.0.1: {e}")))?;
    let port = listener
        .local_addr()
        .map_err(|e| failed(e.to_string()))?
        .port();
    let redirect_uri = format!("http://127.0.0.1:{port}/");
    let mut rnd = [0u8; 48];
    getrandom::getrandom(&mut rnd).map_err(|e| failed(format!("no randomness: {e}")))?;
    // RFC 7636 §4.1: 32 octets base64url = 43 characters of verifier.
    let verifier = b64url(&rnd[..32]);
    let challenge =
        b64url(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()).as_ref());
    let state = b64url(&rnd[32..]);
    let mut url = reqwest::Url::parse(auth_url).map_err(|e| usage(e.to_string()))?;
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("response_type", "code")
            .append_pair("client_id", &p.client_id)
            .append_pair("redirect_uri", &redirect_uri)
            .append_pair("scope", &p.scope_param())
            .append_pair("state", &state)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256")
            .append_pair("login_hint", account);
        for (k, v) in &p.extra_auth_params {
            q.append_pair(k, v);
        }
    }
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "Open this URL in a browser on this machine and sign in as {account}:\n  {url}\nWaiting for the redirect to {redirect_uri} ...\n(With the browser on another machine, the redirect fails there: paste the address it shows here and press Enter.)"
    );
    let _ = out.flush();
    let code = tokio::time::timeout(BROWSER_WAIT, async {
        tokio::select! {
            r = wait_for_code(&listener, &state) => r,
            r = pasted_code(&state) => r,
        }
    })
    .await
    .map_err(|_| failed("no redirect arrived in time; run the command again"))??;
    client
        .exchange_code(p, secret, &code, &verifier, &redirect_uri)
        .await
        .map_err(|e| failed(format!("exchanging the code failed: {e}")))
}

/// The redirect address pasted on standard input (the browser ran on
/// another machine). Never resolves when standard input ends without one,
/// so the loopback listener keeps waiting.
async fn pasted_code(state: &str) -> Result<String, Fail> {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let target = line.find('?').map_or("", |i| &line[i..]);
        match redirect_params(&format!("/{target}")) {
            (Some(code), _, Some(s)) if s == state => return Ok(code),
            (_, Some(e), Some(s)) if s == state => {
                return Err(failed(format!(
                    "the provider answered {}",
                    provider::sanitise(&e)
                )))
            }
            (Some(_) | None, _, _) => eprintln!(
                "popbridge oauth: that is not the redirect address (it needs code= and the right state=); paste it again"
            ),
        }
    }
    std::future::pending().await
}

/// `code`, `error` and `state` of a redirect request target.
fn redirect_params(target: &str) -> (Option<String>, Option<String>, Option<String>) {
    let parsed = reqwest::Url::parse(&format!("http://127.0.0.1{target}")).ok();
    let get = |name: &str| {
        parsed.as_ref().and_then(|u| {
            u.query_pairs()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        })
    };
    (get("code"), get("error"), get("state"))
}

/// Serves the loopback redirect (HTTP/1.1 through hyper, one connection at
/// a time, one request each, a head of at most 8 KiB (the admin
/// listener's [`crate::server::admin::MAX_REQUEST`]; hyper answers a longer
/// one with 431) read within [`REDIRECT_READ_TIMEOUT`]) until a request carries
/// `code` (or `error`) with our `state`.
async fn wait_for_code(listener: &tokio::net::TcpListener, state: &str) -> Result<String, Fail> {
    use hyper::{Response, StatusCode};
    use std::sync::Mutex;
    loop {
        let (sock, _) = listener
            .accept()
            .await
            .map_err(|e| failed(format!("redirect listener: {e}")))?;
        // What the request decided: set by the service, read after the
        // connection ends.
        let outcome: Arc<Mutex<Option<Result<String, Fail>>>> = Arc::new(Mutex::new(None));
        let seen = outcome.clone();
        let state = state.to_string();
        let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
            let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let (status, page, decided) = redirect_answer(target, &state);
            if let Some(d) = decided {
                if let Ok(mut slot) = seen.lock() {
                    *slot = Some(d);
                }
            }
            let mut r = Response::new(http_body_util::Full::new(bytes::Bytes::from(page)));
            *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            std::future::ready(Ok::<_, std::convert::Infallible>(r))
        });
        let conn = crate::server::admin::http1_server(REDIRECT_READ_TIMEOUT)
            .serve_connection(hyper_util::rt::TokioIo::new(sock), service);
        let _ = tokio::time::timeout(REDIRECT_READ_TIMEOUT, conn).await;
        let decided = outcome.lock().ok().and_then(|mut o| o.take());
        if let Some(d) = decided {
            return d;
        }
    }
}

/// The answer to one request on the loopback redirect listener: status,
/// page, and the flow's outcome when the request decided it (a code with
/// our state, the provider's error, or a wrong state).
fn redirect_answer(target: &str, state: &str) -> (u16, &'static str, Option<Result<String, Fail>>) {
    let (code, error, got_state) = redirect_params(target);
    if code.is_none() && error.is_none() {
        // A favicon or a stray request: not the redirect.
        return (404, "", None);
    }
    let ok = got_state.as_deref() == Some(state) && code.is_some();
    let page = if ok {
        "popbridge: authorised. You can close this window."
    } else {
        "popbridge: authorisation failed. See the terminal."
    };
    let decided = if got_state.as_deref() != Some(state) {
        // RFC 6749 §10.12: a redirect without our state is not ours.
        Err(failed(
            "the redirect carried a wrong state parameter (CSRF?)",
        ))
    } else if let Some(e) = error {
        Err(failed(format!(
            "the provider answered {}",
            provider::sanitise(&e)
        )))
    } else {
        match code {
            Some(c) => Ok(c),
            None => Err(failed("the redirect carried no code")),
        }
    };
    (200, page, Some(decided))
}

#[cfg(test)]
mod redirect_tests {
    use super::redirect_answer;

    #[test]
    fn the_redirect_decides_only_with_a_code_or_error_and_our_state() {
        let (status, _, decided) = redirect_answer("/favicon.ico", "s1");
        assert_eq!((status, decided.is_none()), (404, true));
        let (status, page, decided) = redirect_answer("/?code=abc&state=s1", "s1");
        assert_eq!(status, 200);
        assert!(page.contains("authorised"), "{page}");
        assert_eq!(decided.and_then(|d| d.ok()).as_deref(), Some("abc"));
        let (_, page, decided) = redirect_answer("/?code=abc&state=other", "s1");
        assert!(page.contains("failed"), "{page}");
        let err = decided
            .and_then(|d| d.err())
            .map(|f| f.1)
            .unwrap_or_default();
        assert!(err.contains("wrong state"), "{err}");
        let (_, _, decided) = redirect_answer("/?error=access_denied&state=s1", "s1");
        let err = decided
            .and_then(|d| d.err())
            .map(|f| f.1)
            .unwrap_or_default();
        assert!(err.contains("access_denied"), "{err}");
    }
}

async fn device_cmd(cmd: DeviceCommand, config: Config) -> Result<(), Fail> {
    match cmd {
        DeviceCommand::Add {
            login,
            account,
            allow,
            password_file,
            generate,
        } => {
            check_name("login", &login)?;
            check_name("account", &account)?;
            let (password, show) = if generate {
                (device::generate_password().map_err(failed)?, true)
            } else {
                (read_password(password_file.as_deref())?, false)
            };
            if password.len() < device::MIN_PASSWORD_LEN {
                return Err(usage(format!(
                    "device passwords need at least {} characters (or use --generate)",
                    device::MIN_PASSWORD_LEN
                )));
            }
            if password.len() > device::MAX_PASSWORD_LEN {
                return Err(usage(format!(
                    "device passwords are at most {} bytes",
                    device::MAX_PASSWORD_LEN
                )));
            }
            let store = store(&config).await?;
            let pw = password.clone();
            let hash = tokio::task::spawn_blocking(move || device::hash_password(pw.as_bytes()))
                .await
                .map_err(|e| failed(e.to_string()))?
                .map_err(failed)?;
            let rec = DeviceRecord {
                login: login.clone(),
                hash,
                account: account.clone(),
                allow: allow.clone(),
                created: now_unix(),
            };
            if !store
                .add_device(rec)
                .await
                .map_err(|e| failed(e.to_string()))?
            {
                return Err(failed(format!(
                    "device {login:?} exists; remove it first to change its password"
                )));
            }
            println!("added device {login} for {account}");
            if !allow.is_empty() {
                let nets: Vec<String> = allow.iter().map(|n| n.to_string()).collect();
                println!("allowed from: {}", nets.join(", "));
            }
            if show {
                println!("password (shown once): {password}");
            }
            if store
                .get(&account)
                .await
                .map_err(|e| failed(e.to_string()))?
                .is_none()
            {
                eprintln!(
                    "popbridge device: note: {account} is not enrolled yet; run popbridge oauth add {account}"
                );
            }
            Ok(())
        }
        DeviceCommand::Remove { login } => {
            let store = store(&config).await?;
            if store
                .remove_device(&login)
                .await
                .map_err(|e| failed(e.to_string()))?
            {
                println!("removed device {login}");
                Ok(())
            } else {
                Err(failed(format!("no device {login:?}")))
            }
        }
        DeviceCommand::List => {
            let store = store(&config).await?;
            let devices = store.devices().await.map_err(|e| failed(e.to_string()))?;
            if devices.is_empty() {
                println!("no devices");
                return Ok(());
            }
            println!(
                "{:<32} {:<40} {:<20} {:<20} STATUS",
                "LOGIN", "ACCOUNT", "ALLOW", "CREATED"
            );
            let mut refused = 0;
            for listing in devices {
                let d = &listing.record;
                let checked = &listing.check;
                let allow = if d.allow.is_empty() {
                    "any".to_string()
                } else {
                    d.allow
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                };
                let status = match checked {
                    Ok(()) => "sealed".to_string(),
                    Err(DeviceProblem::Unsealed) => {
                        "REFUSED: not sealed (device seal, if it is yours)".to_string()
                    }
                    Err(DeviceProblem::Tampered(why)) => format!("REFUSED: tampered ({why})"),
                };
                refused += usize::from(checked.is_err());
                // Store contents may come from whoever could write to it:
                // nothing but printable ASCII reaches the terminal.
                println!(
                    "{:<32} {:<40} {allow:<20} {:<20} {status}",
                    printable(&listing.login),
                    printable(&d.account),
                    format_time(d.created)
                );
            }
            if refused > 0 {
                eprintln!(
                    "popbridge device: {refused} device record(s) are refused at login (see STATUS)"
                );
            }
            Ok(())
        }
        DeviceCommand::Seal { logins, all } => {
            let store = store(&config).await?;
            let logins = if all {
                store
                    .devices()
                    .await
                    .map_err(|e| failed(e.to_string()))?
                    .into_iter()
                    .filter(|d| d.check == Err(DeviceProblem::Unsealed))
                    .map(|d| d.login)
                    .collect()
            } else {
                logins
            };
            let mut missing = Vec::new();
            for login in &logins {
                if store
                    .seal_unsealed_device(login)
                    .await
                    .map_err(|e| failed(e.to_string()))?
                {
                    println!("sealed device {}", printable(login));
                } else {
                    missing.push(printable(login));
                }
            }
            if all && logins.is_empty() {
                println!("no unsealed device records");
            }
            match missing.as_slice() {
                [] => Ok(()),
                _ => Err(failed(format!(
                    "no unsealed record for: {} (already sealed, changed meanwhile, or absent)",
                    missing.join(", ")
                ))),
            }
        }
    }
}

/// Text from a provider, fit for a terminal: printable ASCII only (URLs
/// and user codes are ASCII, RFC 8628 §3.2), at most 2,048 characters.
fn printable(text: &str) -> String {
    text.chars()
        .filter(|c| (' '..='~').contains(c))
        .take(2048)
        .collect()
}

/// The password from a file (first line), the environment, or a prompt.
fn read_password(file: Option<&std::path::Path>) -> Result<String, Fail> {
    if let Some(f) = file {
        let fh = std::fs::File::open(f)
            .map_err(|e| usage(format!("--password-file {}: {e}", f.display())))?;
        let mut line = String::new();
        // One line of at most a password's length (plus CRLF): a wrong
        // --password-file (a log, a device node) is not read whole.
        let cap = (crate::oauth::device::MAX_PASSWORD_LEN + 2) as u64;
        BufReader::new(std::io::Read::take(fh, cap))
            .read_line(&mut line)
            .map_err(|e| usage(format!("--password-file {}: {e}", f.display())))?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_string());
    }
    if let Ok(v) = std::env::var(DEVICE_PASSWORD_ENV) {
        return Ok(v);
    }
    if std::io::stdin().is_terminal() {
        let a = rpassword::prompt_password("Device password: ")
            .map_err(|e| failed(format!("cannot read the password: {e}")))?;
        let b = rpassword::prompt_password("Again: ")
            .map_err(|e| failed(format!("cannot read the password: {e}")))?;
        if a != b {
            return Err(usage("the passwords differ"));
        }
        return Ok(a);
    }
    Err(usage(format!(
        "no password: use --password-file FILE, ${DEVICE_PASSWORD_ENV}, a terminal, or --generate"
    )))
}

/// `YYYY-MM-DD HH:MM:SSZ` for Unix seconds (UTC).
pub fn format_time(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_text_for_the_terminal_has_no_escape_sequences() {
        assert_eq!(
            printable("https://example.org/device\x1b]0;pwned\x07\r\n"),
            "https://example.org/device]0;pwned"
        );
        assert_eq!(printable("WDJB-MJHT"), "WDJB-MJHT");
        assert_eq!(printable(&"a".repeat(5000)).len(), 2048);
    }

    #[test]
    fn a_password_file_is_read_up_to_one_password() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "correct horse battery\nsecond line\n").unwrap();
        assert_eq!(
            read_password(Some(&f)).ok().as_deref(),
            Some("correct horse battery")
        );
        // No newline in a huge file: only the first MAX+2 bytes are read,
        // and the result is refused later as too long, not slurped whole.
        let huge = "x".repeat(10 * crate::oauth::device::MAX_PASSWORD_LEN);
        std::fs::write(&f, &huge).unwrap();
        let got = read_password(Some(&f)).ok().unwrap_or_default();
        assert_eq!(got.len(), crate::oauth::device::MAX_PASSWORD_LEN + 2);
    }

    #[test]
    fn times_format_in_utc() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00Z");
        assert_eq!(format_time(1_700_000_000), "2023-11-14 22:13:20Z");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00Z");
    }

    #[test]
    fn oauth_test_finds_the_accounts_route() {
        let toml = r#"
[upstream]
auth = "oauth2"
oauth_provider = "g"
[[routes]]
name = "users"
users = ["Boss@Example.org"]
auth = "oauth2"
oauth_provider = "g"
[[routes]]
name = "domain"
domains = ["example.org"]
auth = "oauth2"
oauth_provider = "g"
[[routes]]
name = "other-provider"
domains = ["example.net"]
auth = "oauth2"
oauth_provider = "m"
[[routes]]
name = "passwords"
domains = ["example.com"]
auth = "passthrough"
"#;
        let config = Config::from_toml(toml).unwrap();
        let routes = config.effective_routes().unwrap();
        let name = |account: &str, provider: &str, explicit: Option<&str>| {
            account_route(&routes, account, provider, explicit).map(|r| r.name.clone())
        };
        assert_eq!(name("boss@example.org", "g", None).unwrap(), "users");
        assert_eq!(name("alice@EXAMPLE.org", "g", None).unwrap(), "domain");
        // No match: the default route, which is g's.
        assert_eq!(name("x@example.com", "g", None).unwrap(), "default");
        // m's only route, whatever the account's domain.
        assert_eq!(name("x@example.com", "m", None).unwrap(), "other-provider");
        assert!(name("x@example.com", "none", None)
            .unwrap_err()
            .contains("no route uses"));
        assert_eq!(
            name("x@example.com", "g", Some("domain")).unwrap(),
            "domain"
        );
        let e = name("x@example.com", "g", Some("other-provider")).unwrap_err();
        assert!(e.contains("enrolled with \"g\""), "{e}");
        let e = name("x@example.com", "g", Some("passwords")).unwrap_err();
        assert!(e.contains("does not use"), "{e}");
        assert!(name("x@example.com", "g", Some("nope"))
            .unwrap_err()
            .contains("no route named"));
    }

    #[test]
    fn names_without_spaces() {
        assert!(check_name("login", "scanner-1").is_ok());
        assert!(check_name("login", "").is_err());
        assert!(check_name("login", "a b").is_err());
        assert!(check_name("login", "a\u{7}").is_err());
    }
}
