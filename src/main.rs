//! The popbridge binary: parse flags, load the configuration, start logging,
//! serve until SIGTERM or Ctrl-C.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use popbridge::admin::Readiness;
use popbridge::config::{Config, LogFormat, UpstreamAuth, UpstreamConfig, UpstreamTls, Validated};
use popbridge::limits::{LoginThrottle, ThrottleConfig};
use popbridge::migrate::runtime::MapStore;
use popbridge::oauth::OauthRuntime;
use popbridge::pop3::session::Profile;
use popbridge::pop3::session::SessionConfig;
use popbridge::routing::{Route, RouteAuth, Router, UidlMapSource};
use popbridge::server::{Listener, Server, ServerSettings, Shared};
use popbridge::tls::ServerTls;
use popbridge::upstream::cache::ListingCache;
use popbridge::upstream::imap::{host_of, ImapConfig, ImapConnector};
use std::path::Path;
use std::sync::atomic::Ordering;
use tracing::{info, warn};

/// A POP3 server that serves each session from a mailbox on an IMAP server.
///
/// Settings come from the TOML file given with --config, then POPBRIDGE_*
/// environment variables, then these flags (flags win).
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file.
    #[arg(long, env = "POPBRIDGE_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit: 0 if valid, 2 if not.
    #[arg(long)]
    check_config: bool,
    /// Health probe for containers without a shell: GET an http://host:port/path
    /// URL (such as the admin listener's /healthz) and exit 0 on a 2xx
    /// answer, 1 otherwise. No configuration is read.
    #[arg(long, value_name = "URL")]
    probe: Option<String>,
    /// Address:port for POP3 clients (listen.address).
    #[arg(long, env = "POPBRIDGE_LISTEN")]
    listen: Option<String>,
    /// host:port of the IMAP server (upstream.address).
    #[arg(long, env = "POPBRIDGE_UPSTREAM")]
    upstream: Option<String>,
    /// TLS to the IMAP server (upstream.tls).
    #[arg(long, env = "POPBRIDGE_UPSTREAM_TLS", value_enum)]
    upstream_tls: Option<UpstreamTls>,
    /// Mailbox POP3 sessions see (upstream.mailbox).
    #[arg(long, env = "POPBRIDGE_MAILBOX")]
    mailbox: Option<String>,
    /// UIDL template or preset (pop3.uidl_format).
    #[arg(long, env = "POPBRIDGE_UIDL_FORMAT")]
    uidl_format: Option<String>,
    /// Address:port for POP3S, TLS from the first byte (listen.tls_address).
    #[arg(long, env = "POPBRIDGE_TLS_LISTEN")]
    tls_listen: Option<String>,
    /// PEM certificate chain for POP3S and STLS (tls.cert_file).
    #[arg(long, env = "POPBRIDGE_TLS_CERT")]
    tls_cert: Option<String>,
    /// PEM private key for POP3S and STLS (tls.key_file).
    #[arg(long, env = "POPBRIDGE_TLS_KEY")]
    tls_key: Option<String>,
    /// PEM CA bundle that signs the IMAP server's certificate (upstream.ca_file).
    #[arg(long, env = "POPBRIDGE_UPSTREAM_CA_FILE")]
    upstream_ca_file: Option<String>,
    /// Name the IMAP server's certificate must carry (upstream.tls_name).
    #[arg(long, env = "POPBRIDGE_UPSTREAM_TLS_NAME")]
    upstream_tls_name: Option<String>,
    /// Log format (log.format).
    #[arg(long, env = "POPBRIDGE_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// A maintenance command instead of serving.
    #[command(subcommand)]
    command: Option<Command>,
}

/// Maintenance commands; without one, popbridge serves.
#[derive(Debug, Clone, clap::Subcommand)]
enum Command {
    /// Carry POP3 UIDLs over from an old POP3 server.
    Migrate(popbridge::migrate::MigrateArgs),
    /// Enrol, list, test and remove OAuth2 accounts.
    Oauth(popbridge::oauth::OauthArgs),
    /// Add, list and remove device logins for OAuth2 routes.
    Device(popbridge::oauth::DeviceArgs),
}

impl Args {
    fn into_config(self) -> Result<(Config, bool), String> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path).map_err(|e| e.to_string())?,
            None => Config::default(),
        };
        if let Some(v) = self.listen {
            config.listen.address = v;
        }
        if let Some(v) = self.upstream {
            config.upstream.address = v;
        }
        if let Some(v) = self.upstream_tls {
            config.upstream.tls = v;
        }
        if let Some(v) = self.mailbox {
            config.upstream.mailbox = v;
        }
        if let Some(v) = self.uidl_format {
            config.pop3.uidl_format = v;
        }
        if let Some(v) = self.tls_listen {
            config.listen.tls_address = v;
        }
        if let Some(v) = self.tls_cert {
            config.tls.cert_file = v;
        }
        if let Some(v) = self.tls_key {
            config.tls.key_file = v;
        }
        if let Some(v) = self.upstream_ca_file {
            config.upstream.ca_file = v;
        }
        if let Some(v) = self.upstream_tls_name {
            config.upstream.tls_name = v;
        }
        if let Some(v) = self.log_format {
            config.log.format = v;
        }
        Ok((config, self.check_config))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(url) = &args.probe {
        return match probe(url) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("popbridge: probe {url}: {e}");
                ExitCode::from(1)
            }
        };
    }
    if let Some(Command::Migrate(a)) = args.command.clone() {
        // As when serving: the file, then POPBRIDGE_* variables and flags, so
        // the command reaches the upstream the proxy reaches and writes maps
        // under the key the proxy will look up.
        return match args.clone().into_config() {
            Ok((config, _)) => popbridge::migrate::run(a, Some(config)),
            Err(e) => {
                eprintln!("popbridge: {e}");
                ExitCode::from(2)
            }
        };
    }
    if let Some(command) = args.command.clone() {
        // The file, then POPBRIDGE_* variables and flags as when serving:
        // `oauth test` logs in to the IMAP server the proxy would reach.
        let config = match &args.config {
            Some(_) => match args.clone().into_config() {
                Ok((c, _)) => Some(c),
                Err(e) => {
                    eprintln!("popbridge: {e}");
                    return ExitCode::from(2);
                }
            },
            None => None,
        };
        return match command {
            Command::Migrate(a) => popbridge::migrate::run(a, config),
            Command::Oauth(a) => popbridge::oauth::run_oauth(a, config),
            Command::Device(a) => popbridge::oauth::run_device(a, config),
        };
    }
    let (config, check_only) = match args.clone().into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("popbridge: {e}");
            return ExitCode::from(2);
        }
    };
    let valid = match config.validate() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("popbridge: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if check_only {
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    init_logging(&valid.config);
    raise_fd_limit();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("popbridge: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(valid, args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("popbridge: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--probe`: one HTTP GET with a 3-second budget (Docker's HEALTHCHECK
/// default timeout is 5 s). Exit code 2 is avoided: Docker reserves it.
fn probe(url: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    const BUDGET: Duration = Duration::from_secs(3);
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("{hostport}: {e}"))?
        .next()
        .ok_or_else(|| format!("{hostport}: no address"))?;
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, BUDGET).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(BUDGET))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(BUDGET))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    // The status line may arrive in several segments: read until its end
    // (or 64 octets, plenty for "HTTP/1.1 200 OK"), not just once.
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < head.len() && !head[..n].contains(&b'\n') {
        match stream.read(&mut head[n..]).map_err(|e| e.to_string())? {
            0 => break,
            got => n += got,
        }
    }
    let line = String::from_utf8_lossy(&head[..n]);
    let status = line.split_whitespace().nth(1).unwrap_or("");
    if status.len() == 3 && status.starts_with('2') {
        Ok(())
    } else {
        Err(format!("answered {:?}", line.lines().next().unwrap_or("")))
    }
}

/// Logs to stderr, with the targets that would log secrets switched off
/// (see [`popbridge::logging`]).
fn init_logging(config: &Config) {
    popbridge::logging::init(&config.log.level, config.log.format);
}

/// What a reload may carry over from the running configuration.
struct Previous<'a> {
    /// Failed-login memory, kept when the throttle settings are unchanged.
    throttle: Arc<LoginThrottle>,
    /// The OAuth2 runtime and the configuration it was built from, kept
    /// (with its cached access tokens and refreshes in flight) when
    /// `[oauth]` and `[data]` are unchanged.
    oauth: Option<(&'a Config, Arc<OauthRuntime>)>,
}

/// Builds what sessions share from a validated configuration; on a reload,
/// `previous` carries state over where the settings allow.
fn build_shared(
    valid: &Validated,
    previous: Option<Previous<'_>>,
) -> Result<Shared<ImapConnector>, String> {
    let cfg = &valid.config;
    let (throttle, old_oauth) = match previous {
        Some(p) => (Some(p.throttle), p.oauth),
        None => (None, None),
    };
    let oauth = match old_oauth {
        Some((old, runtime)) if old.oauth == cfg.oauth && old.data == cfg.data => Some(runtime),
        _ => OauthRuntime::from_config(cfg).map_err(|e| format!("oauth: {e}"))?,
    };
    let tls = if cfg.tls.cert_file.is_empty() {
        None
    } else {
        let t = ServerTls::load(Path::new(&cfg.tls.cert_file), Path::new(&cfg.tls.key_file))
            .map_err(|e| e.to_string())?;
        Some(Arc::new(t))
    };
    // One listing cache for every route: its key holds the upstream.
    let cache = (cfg.cache.listing_mb > 0).then(|| {
        Arc::new(ListingCache::new(
            cfg.cache.listing_mb.saturating_mul(1024 * 1024),
        ))
    });
    // One map store (and cache) for every route: its key holds the upstream.
    let map_store = valid
        .routes
        .iter()
        .any(|r| r.uidl_map)
        .then(|| Arc::new(MapStore::new(Path::new(&cfg.data.dir))));
    let mut router = Router::new();
    for route in &valid.routes {
        let auth = match route.upstream.auth {
            UpstreamAuth::Passthrough => RouteAuth::Passthrough,
            UpstreamAuth::Oauth2 => {
                let provider = route.upstream.oauth_provider.clone();
                let Some(runtime) = &oauth else {
                    return Err(format!(
                        "route {:?} uses auth = \"oauth2\" but no OAuth2 runtime was configured",
                        route.name
                    ));
                };
                if runtime.sasl(&provider).is_none() {
                    return Err(format!(
                        "route {:?}: oauth_provider {provider:?} is not an [[oauth.providers]] entry",
                        route.name
                    ));
                }
                RouteAuth::Oauth2 { provider }
            }
        };
        let connector = Arc::new(ImapConnector::new(imap_config(
            &route.upstream,
            route.reuse_xuidl,
            cache.clone(),
        )?));
        let profile = Profile {
            uidl: route.uidl.clone(),
            mark_seen: route.mark_seen,
            mark_seen_on_top: route.mark_seen_on_top,
        };
        router.add(
            Route {
                name: route.name.clone(),
                connector,
                login: route.upstream.login,
                auth,
                profile,
                policy: route.policy.clone(),
                lock_scope: format!("{}/{}", route.upstream.address, route.upstream.mailbox),
                uidl_map: match (&map_store, route.uidl_map) {
                    (Some(store), true) => Some(UidlMapSource {
                        store: store.clone(),
                        upstream: route.upstream.address.clone(),
                        mailbox: route.upstream.mailbox.clone(),
                    }),
                    _ => None,
                },
            },
            &route.users,
            &route.domains,
            route.is_default,
        );
    }
    let settings = Arc::new(ServerSettings {
        session: SessionConfig {
            uidl: valid.uidl.clone(),
            mark_seen: cfg.pop3.mark_seen_on_retr,
            mark_seen_on_top: cfg.pop3.mark_seen_on_top,
            stls_available: false,
            plaintext_ok: false,
        },
        greeting: cfg.pop3.greeting.clone(),
        idle_timeout: valid.idle_timeout,
        login_timeout: valid.login_timeout,
        max_sessions: cfg.limits.max_sessions,
        max_sessions_per_ip: cfg.limits.max_sessions_per_ip,
        allow_plaintext_auth: cfg.auth.allow_plaintext,
        loopback_is_secure: cfg.auth.loopback_is_secure,
        proxy_protocol: cfg.listen.proxy_protocol,
        proxy_trusted: cfg.listen.proxy_trusted.clone(),
    });
    let throttle_config = ThrottleConfig {
        failure_delay: Duration::from_millis(cfg.auth.failure_delay_ms),
        max_failures_per_ip: cfg.auth.max_failures_per_ip,
        max_failures_per_user: cfg.auth.max_failures_per_user,
        window: Duration::from_secs(cfg.auth.failure_window_secs),
        max_entries: cfg.auth.throttle_entries,
    };
    let throttle = match throttle {
        Some(t) if t.config() == &throttle_config => t,
        _ => Arc::new(LoginThrottle::new(throttle_config)),
    };
    Ok(Shared {
        settings,
        router,
        tls,
        throttle,
        oauth,
    })
}

/// The IMAP side of one route.
fn imap_config(
    up: &UpstreamConfig,
    reuse_xuidl: bool,
    cache: Option<Arc<ListingCache>>,
) -> Result<ImapConfig, String> {
    if up.tls == UpstreamTls::None && !is_loopback(&up.address) {
        warn!(upstream = %up.address, "upstream.tls = none: passwords and mail cross the network unencrypted");
    }
    ImapConfig::from_upstream(up, reuse_xuidl, cache)
}

/// Binds a listener with an explicit accept backlog. tokio's
/// `TcpListener::bind` uses 128; when hundreds of clients connect at once
/// the kernel's queue overflows, connections wait a second for a SYN retry,
/// and with SYN cookies a client can even believe it is connected while no
/// greeting ever comes (measured with 500 simultaneous clients).
fn bind(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Serves until SIGTERM or Ctrl-C and the drain that follows. Returns true
/// on a clean drain.
/// SIGHUP and SIGTERM streams, registered before any listener opens: a
/// signal that arrives as soon as the port answers must be handled, not
/// take the default action (which for both is to end the process).
#[derive(Default)]
struct Signals {
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn register() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let hangup = signal(SignalKind::hangup())
                .inspect_err(|e| warn!(error = %e, "cannot listen for SIGHUP; configuration will not be reloaded"))
                .ok();
            let terminate = signal(SignalKind::terminate())
                .inspect_err(|e| warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C drains"))
                .ok();
            Signals { hangup, terminate }
        }
        #[cfg(not(unix))]
        Signals::default()
    }
}

async fn run(valid: Validated, args: Args) -> Result<bool, String> {
    let cfg = valid.config.clone();
    let signals = Signals::register();
    #[cfg(unix)]
    let Signals { hangup, terminate } = signals;
    #[cfg(not(unix))]
    let (hangup, terminate) = {
        let _ = signals;
        ((), ())
    };
    let mut listeners = Vec::new();
    for (addr, implicit_tls) in
        std::iter::once((valid.listen, false)).chain(valid.tls_address.map(|a| (a, true)))
    {
        let socket = bind(addr, cfg.limits.listen_backlog)
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let local = socket.local_addr().map_err(|e| e.to_string())?;
        info!(listen = %local, tls = if implicit_tls { "implicit" } else { "stls" }, "listening");
        listeners.push(Listener {
            socket,
            implicit_tls,
        });
    }
    let server = Server::new(build_shared(&valid, None)?);

    let ready = Arc::new(Readiness::default());
    ready.listeners_bound.store(true, Ordering::Relaxed);
    if let Some(addr) = valid.admin {
        let admin = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} (admin): {e}"))?;
        let interval = Duration::from_secs(cfg.admin.check_interval_secs);
        info!(admin = %admin.local_addr().map_err(|e| e.to_string())?, "admin listener (metrics, health)");
        tokio::spawn(popbridge::admin::serve(admin, ready.clone(), interval));
        // Readiness follows the default route, or the first route.
        let route = valid
            .routes
            .iter()
            .find(|r| r.is_default)
            .or(valid.routes.first());
        if let Some(r) = route {
            let address = r.upstream.address.clone();
            tokio::spawn(popbridge::admin::watch_upstream(
                address,
                interval,
                ready.clone(),
            ));
        }
    }
    tokio::spawn(reload_on_sighup(server.clone(), args, valid, hangup));

    info!(upstream = %cfg.upstream.address, upstream_tls = ?cfg.upstream.tls, mailbox = %cfg.upstream.mailbox, "popbridge ready");
    let drain = Duration::from_secs(cfg.lifecycle.drain_timeout_secs);
    let shutdown = {
        let ready = ready.clone();
        async move {
            shutdown_signal(terminate).await;
            ready.draining.store(true, Ordering::Relaxed);
            info!("shutdown requested");
        }
    };
    let clean = server.clone().serve(listeners, shutdown, drain).await;
    info!(clean, open = server.open_sessions(), "stopped");
    Ok(clean)
}

/// SIGHUP reloads the configuration file (and certificates) for new
/// sessions; running sessions keep what they started with. An invalid new
/// configuration is logged and the old one stays. Listener addresses cannot
/// change without a restart.
async fn reload_on_sighup(
    server: Arc<Server<ImapConnector>>,
    args: Args,
    mut current: Validated,
    #[cfg(unix)] hangup: Option<tokio::signal::unix::Signal>,
    #[cfg(not(unix))] hangup: (),
) {
    #[cfg(unix)]
    {
        let Some(mut hup) = hangup else {
            return;
        };
        while hup.recv().await.is_some() {
            info!("SIGHUP: reloading the configuration");
            let loaded = args
                .clone()
                .into_config()
                .and_then(|(c, _)| c.validate().map_err(|e| e.to_string()));
            let valid = match loaded {
                Ok(v) => v,
                Err(e) => {
                    warn!(error = %e, "reload failed: invalid configuration; keeping the current one");
                    continue;
                }
            };
            if valid.listen != current.listen
                || valid.tls_address != current.tls_address
                || valid.admin != current.admin
            {
                warn!("listener addresses changed: they take effect at the next restart");
            }
            let old = server.current();
            let previous = Previous {
                throttle: old.throttle.clone(),
                oauth: old.oauth.clone().map(|o| (&current.config, o)),
            };
            match build_shared(&valid, Some(previous)) {
                Ok(shared) => {
                    server.reload(shared);
                    info!("configuration reloaded");
                    current = valid;
                }
                Err(e) => warn!(error = %e, "reload failed; keeping the current configuration"),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (server, args, current, hangup);
}

/// Each session holds two sockets (client and upstream): raise the soft
/// limit on open files to the hard limit, as daemons commonly do.
fn raise_fd_limit() {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct given.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
                let before = lim.rlim_cur;
                lim.rlim_cur = lim.rlim_max;
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                    tracing::debug!(before, after = lim.rlim_cur, "raised the open-file limit");
                }
            }
        }
    }
}

fn is_loopback(address: &str) -> bool {
    let host = host_of(address);
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

async fn shutdown_signal(
    #[cfg(unix)] terminate: Option<tokio::signal::unix::Signal>,
    #[cfg(not(unix))] terminate: (),
) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let Some(mut term) = terminate else {
            let _ = ctrl_c.await;
            return;
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = terminate;
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::probe;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::time::Duration;

    /// Serves one request, writing the status line in two segments.
    fn split_status_server(status: &'static str) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            s.set_nodelay(true).expect("nodelay");
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 ");
            let _ = s.flush();
            // A pause so the two writes leave as separate segments.
            std::thread::sleep(Duration::from_millis(100));
            let _ = write!(s, "{status}\r\nContent-Length: 0\r\n\r\n");
        });
        port
    }

    #[test]
    fn probe_reads_a_status_line_that_arrives_in_pieces() {
        let port = split_status_server("200 OK");
        assert_eq!(probe(&format!("http://127.0.0.1:{port}/healthz")), Ok(()));
        let port = split_status_server("503 Service Unavailable");
        let err = probe(&format!("http://127.0.0.1:{port}/healthz")).unwrap_err();
        assert!(err.contains("503"), "{err}");
    }
}
