//! Turns a configuration into the running service: [`check`] is what
//! `--check-config` checks (validation, then the files the configuration
//! names and the templates it holds); [`serve`] builds the routes, the
//! bridge and the listeners, and runs until SIGTERM, reloading on SIGHUP.

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::bridge::cluster::Cluster;
use crate::bridge::directory::{Directory, POOL_SCOPE_PREFIX};
use crate::bridge::pool::{sweep_forever, Pool};
use crate::bridge::routing::{ConnectorFactory, RouteBuilder, Router};
use crate::bridge::shared_throttle::Throttle;
use crate::bridge::throttle::ThrottleConfig;
use crate::bridge::Bridge;
use crate::config::{
    Config, ConfigError, EffectiveRoute, RouteIndex, UpstreamAuth, UpstreamConfig, UpstreamTls,
    Validated,
};
use crate::imap::cache::ListingCache;
use crate::imap::{host_of, ImapConfig, ImapConn, ImapConnector};
use crate::migrate::runtime::MapStore;
use crate::oauth::OauthRuntime;
use crate::pop3::session::SessionConfig;
use crate::pop3::uidl::UidlFormat;
use crate::server::admin::Readiness;
use crate::server::{Listener, Server, ServerSettings, Shared, TlsEngine};
use crate::tls::ServerTls;

/// How a reload reads the configuration again (the file, variables and
/// flags the process started with).
pub type Reload = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// Everything `--check-config` checks: [`Config::validate`], then what the
/// configuration names: the server certificate and key load, upstream CA
/// files load, every route's UIDL template parses, and the OAuth2 key and
/// secret files can be read when a route uses OAuth2.
pub fn check(config: &Config) -> Result<Validated, ConfigError> {
    let valid = config.validate()?;
    if !config.tls.cert_file.is_empty() {
        crate::tls::server_config(
            Path::new(&config.tls.cert_file),
            Path::new(&config.tls.key_file),
        )
        .map_err(|e| ConfigError(e.0))?;
    }
    // OpenSSL reads the same files its own way: check that too.
    #[cfg(feature = "legacy-tls")]
    legacy_tls(&valid).map_err(ConfigError)?;
    for (i, r) in valid.routes.iter().enumerate() {
        let (up_at, pop3_at) = if r.is_default {
            ("upstream".to_string(), "pop3".to_string())
        } else {
            (format!("routes[{i}]"), format!("routes[{i}]"))
        };
        if r.upstream.tls != UpstreamTls::None && !r.upstream.ca_file.is_empty() {
            crate::tls::client_connector(Some(Path::new(&r.upstream.ca_file)))
                .map_err(|e| ConfigError(format!("{up_at}: {}", e.0)))?;
        }
        uidl_format(r).map_err(|e| ConfigError(format!("{pop3_at}.{e}")))?;
    }
    if let Some(d) = &valid.directory {
        let t = &d.template;
        if t.upstream.tls != UpstreamTls::None && !t.upstream.ca_file.is_empty() {
            crate::tls::client_connector(Some(Path::new(&t.upstream.ca_file))).map_err(|e| {
                ConfigError(format!("upstream (the directory's template): {}", e.0))
            })?;
        }
        uidl_format(t).map_err(|e| ConfigError(format!("pop3.{e}")))?;
        crate::bridge::directory::client(&d.config).map_err(ConfigError)?;
    }
    config.oauth.check_secrets(&valid.routes)?;
    Ok(valid)
}

/// What a checked configuration allows but an operator should hear about:
/// `--check-config` prints these, the server logs them at start and after
/// each reload. (Found here rather than while building the service, so the
/// pre-flight check shows them too, before anything is logged.)
pub fn warnings(valid: &Validated) -> Vec<String> {
    let mut out = Vec::new();
    for r in &valid.routes {
        if let Some(w) = upstream_warning(&r.upstream) {
            out.push(format!("route {}: {w}", r.name));
        }
    }
    if let Some(d) = &valid.directory {
        if d.url.scheme() == "http"
            && !is_loopback(&format!("{}:0", d.url.host_str().unwrap_or("")))
        {
            out.push(format!(
                "directory.url {} is plain http to another host: login names (and the token) cross the network unencrypted",
                d.url
            ));
        }
    }
    if valid
        .routes
        .iter()
        .any(|r| r.upstream.auth == UpstreamAuth::Oauth2)
    {
        out.extend(valid.config.oauth.key_file_warning());
    }
    out
}

/// The warning for plaintext IMAP to a host other than this one, if any.
pub fn upstream_warning(up: &UpstreamConfig) -> Option<String> {
    (up.tls == UpstreamTls::None && !is_loopback(&up.address)).then(|| {
        format!(
            "upstream.tls = none towards {}: passwords, access tokens and mail cross the network unencrypted",
            up.address
        )
    })
}

/// A route's UIDL template, parsed.
fn uidl_format(r: &EffectiveRoute) -> Result<UidlFormat, String> {
    UidlFormat::parse(&r.pop3.uidl_format).map_err(|e| e.to_string())
}

/// Serves a checked configuration until SIGTERM or Ctrl-C and the drain
/// that follows; SIGHUP reloads through `reload`. Exit code 0 on a clean
/// drain.
pub fn serve(valid: Validated, reload: Reload) -> ExitCode {
    raise_fd_limit();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("popbridge: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(valid, reload)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("popbridge: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What a reload may carry over from the running configuration.
struct Previous<'a> {
    /// Failed-login memory (and the cluster state), kept when the throttle
    /// and `[cluster]` settings are unchanged.
    throttle: Throttle,
    /// The OAuth2 runtime and the configuration it was built from, kept
    /// (with its cached access tokens and refreshes in flight) when
    /// `[oauth]` and `[data]` are unchanged.
    oauth: Option<(&'a Config, Arc<OauthRuntime>)>,
    /// Idle upstream sessions, kept for the routes whose upstream settings
    /// are unchanged (the others' are logged out).
    pool: Arc<Pool<ImapConn>>,
    /// The running configuration.
    config: &'a Validated,
}

/// How often idle upstream sessions are checked for expiry.
const POOL_SWEEP: Duration = Duration::from_secs(15);

/// The pool for a new configuration: the previous one when its size is
/// unchanged (its sessions of routes whose upstream changed are logged
/// out), else a new one (and the previous one's sessions are logged out).
fn pool_for(
    valid: &Validated,
    previous: Option<(Arc<Pool<ImapConn>>, &Validated)>,
) -> Result<Arc<Pool<ImapConn>>, String> {
    let total = valid.config.limits.max_idle_upstream;
    if let Some((old, old_valid)) = previous {
        if old_valid.config.limits.max_idle_upstream == total {
            for r in &old_valid.routes {
                let same = valid
                    .routes
                    .iter()
                    .any(|n| n.name == r.name && n.upstream == r.upstream && n.pop3 == r.pop3);
                if !same {
                    let (pool, name) = (old.clone(), r.name.clone());
                    tokio::spawn(async move { pool.drain(Some(&name)).await });
                }
            }
            // Directory routes are made from the template: when it changed,
            // their idle sessions go.
            let template = |v: &Validated| {
                v.directory
                    .as_ref()
                    .map(|d| (d.template.upstream.clone(), d.template.pop3.clone()))
            };
            if old_valid.directory.is_some() && template(old_valid) != template(valid) {
                let pool = old.clone();
                tokio::spawn(async move {
                    pool.drain_where(|scope| scope.starts_with(POOL_SCOPE_PREFIX))
                        .await
                });
            }
            return Ok(old);
        }
        tokio::spawn(async move { old.drain(None).await });
    }
    let pool = Arc::new(Pool::new(total)?);
    tokio::spawn(sweep_forever(Arc::downgrade(&pool), POOL_SWEEP));
    Ok(pool)
}

/// Builds what sessions share from a validated configuration; on a reload,
/// `previous` carries state over where the settings allow.
fn build_shared(
    valid: &Validated,
    previous: Option<Previous<'_>>,
) -> Result<Shared<ImapConnector>, String> {
    let cfg = &valid.config;
    let (throttle, old_oauth, old_pool) = match previous {
        Some(p) => (
            Some((p.throttle, p.config.config.cluster.clone())),
            p.oauth,
            Some((p.pool, p.config)),
        ),
        None => (None, None, None),
    };
    let pool = pool_for(valid, old_pool)?;
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
    #[cfg(feature = "legacy-tls")]
    let legacy_tls = legacy_tls(valid)?;
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
        .chain(valid.directory.as_ref().map(|d| &d.template))
        .any(|r| r.pop3.uidl_map)
        .then(|| Arc::new(MapStore::new(Path::new(&cfg.data.dir))));
    // The one connector factory: static routes now, directory routes when
    // their answers come.
    let connector: ConnectorFactory<ImapConnector> = {
        let cache = cache.clone();
        Arc::new(move |r: &EffectiveRoute| {
            Ok(ImapConnector::new(imap_config(
                &r.upstream,
                r.pop3.reuse_xuidl,
                cache.clone(),
            )?))
        })
    };
    let builder = Arc::new(RouteBuilder {
        connector,
        oauth: oauth.clone(),
        map_store,
    });
    let mut routes = Vec::with_capacity(valid.routes.len());
    for route in &valid.routes {
        routes.push(builder.build(route)?);
    }
    let mut router = Router::new(routes, RouteIndex::new(&valid.routes));
    if let Some(settings) = &valid.directory {
        // A new directory on every (re)load: its answers are forgotten.
        let directory = Directory::new(settings, builder.clone())?;
        info!(url = %directory.url(), "directory routing for logins no [[routes]] entry matches");
        router = router.with_directory(Arc::new(directory));
    }
    let settings = Arc::new(ServerSettings {
        session: SessionConfig {
            stls_available: false,
            plaintext_ok: false,
        },
        greeting: cfg.pop3.greeting.clone(),
        idle_timeout: valid.idle_timeout,
        login_timeout: valid.login_timeout,
        max_sessions: cfg.limits.max_sessions,
        max_sessions_per_ip: cfg.limits.max_sessions_per_ip,
        plaintext_networks: plaintext_networks(&cfg.auth),
        loopback_is_secure: cfg.auth.loopback_is_secure,
        stls: cfg.listen.stls,
        proxy_protocol: cfg.listen.proxy_protocol,
        proxy_trusted: cfg.listen.proxy_trusted.clone(),
    });
    let throttle_config = ThrottleConfig {
        failure_delay: Duration::from_millis(cfg.auth.failure_delay_ms),
        max_failures_per_ip: cfg.auth.max_failures_per_ip,
        max_failures_per_user: cfg.auth.max_failures_per_user,
        window: Duration::from_secs(cfg.auth.failure_window_secs),
        max_entries: cfg.auth.throttle_entries,
        ipv6_prefix_len: cfg.limits.ipv6_prefix_len,
    };
    let throttle = match throttle {
        Some((t, old_cluster)) if t.config() == &throttle_config && old_cluster == cfg.cluster => t,
        _ => match Cluster::from_config(&cfg.cluster).map_err(|e| format!("cluster: {e}"))? {
            Some(cluster) => Throttle::shared(throttle_config, Arc::new(cluster)),
            None => Throttle::local(throttle_config),
        },
    };
    Ok(Shared {
        settings,
        bridge: Bridge {
            router,
            throttle,
            oauth,
            pool,
        },
        tls,
        #[cfg(feature = "legacy-tls")]
        legacy_tls,
    })
}

/// The legacy listener's OpenSSL context (`[legacy_tls]`), with the
/// `[tls]` certificate; built again on SIGHUP like the rustls one.
#[cfg(feature = "legacy-tls")]
fn legacy_tls(valid: &Validated) -> Result<Option<Arc<crate::tls::legacy::LegacyTls>>, String> {
    use crate::config::LegacyTlsVersion;
    use crate::tls::legacy::{LegacyTls, SslVersion};
    if valid.legacy_tls_address.is_none() {
        return Ok(None);
    }
    let cfg = &valid.config;
    let min = match cfg.legacy_tls.min_version {
        LegacyTlsVersion::Tls10 => SslVersion::TLS1,
        LegacyTlsVersion::Tls11 => SslVersion::TLS1_1,
        LegacyTlsVersion::Tls12 => SslVersion::TLS1_2,
    };
    let t = LegacyTls::load(
        Path::new(&cfg.tls.cert_file),
        Path::new(&cfg.tls.key_file),
        min,
    )
    .map_err(|e| format!("legacy_tls: {e}"))?;
    Ok(Some(Arc::new(t)))
}

/// The networks allowed to log in without TLS: `plaintext_networks`, or
/// every network with the older `allow_plaintext = true`.
fn plaintext_networks(auth: &crate::config::AuthConfig) -> Vec<ipnet::IpNet> {
    if auth.allow_plaintext {
        vec![
            ipnet::IpNet::V4(ipnet::Ipv4Net::default()),
            ipnet::IpNet::V6(ipnet::Ipv6Net::default()),
        ]
    } else {
        auth.plaintext_networks.clone()
    }
}

/// The IMAP side of one route. (Plaintext to a remote server is allowed
/// and reported by [`warnings`].)
fn imap_config(
    up: &UpstreamConfig,
    reuse_xuidl: bool,
    cache: Option<Arc<ListingCache>>,
) -> Result<ImapConfig, String> {
    ImapConfig::from_upstream(up, reuse_xuidl, cache)
}

/// The IMAP servers the readiness check greets: every route's (the default
/// upstream and each `[[routes]]` address), each once. They share one
/// "last greeting" time, so popbridge is ready while at least one answers:
/// a replica that reaches none of them cannot serve anyone and leaves the
/// load balancer, but one upstream's outage, which every replica sees
/// alike, does not take the routes to the others out of service.
fn readiness_targets(routes: &[EffectiveRoute]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in routes {
        if !out.contains(&r.upstream.address) {
            out.push(r.upstream.address.clone());
        }
    }
    out
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

/// Serves until SIGTERM or Ctrl-C and the drain that follows. Returns true
/// on a clean drain.
async fn run(valid: Validated, reload: Reload) -> Result<bool, String> {
    let cfg = valid.config.clone();
    for w in warnings(&valid) {
        warn!("{w}");
    }
    let signals = Signals::register();
    #[cfg(unix)]
    let Signals { hangup, terminate } = signals;
    #[cfg(not(unix))]
    let (hangup, terminate) = {
        let _ = signals;
        ((), ())
    };
    let mut plan = vec![(valid.listen, false, TlsEngine::Rustls, "stls")];
    if let Some(a) = valid.tls_address {
        plan.push((a, true, TlsEngine::Rustls, "implicit"));
    }
    #[cfg(feature = "legacy-tls")]
    if let Some(a) = valid.legacy_tls_address {
        use crate::config::LegacyTlsMode;
        plan.push(match cfg.legacy_tls.mode {
            LegacyTlsMode::Implicit => (a, true, TlsEngine::Legacy, "legacy-implicit"),
            LegacyTlsMode::Stls => (a, false, TlsEngine::Legacy, "legacy-stls"),
        });
    }
    let mut listeners = Vec::new();
    for (addr, implicit_tls, engine, tls) in plan {
        let socket = bind(addr, cfg.limits.listen_backlog)
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let local = socket.local_addr().map_err(|e| e.to_string())?;
        info!(listen = %local, tls, "listening");
        listeners.push(Listener {
            socket,
            implicit_tls,
            engine,
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
        tokio::spawn(crate::server::admin::serve(admin, ready.clone(), interval));
        // With a directory, [upstream].address (not a route then) is
        // checked too: a replica needs some server to call itself ready.
        let mut targets = readiness_targets(&valid.routes);
        if let Some(d) = &valid.directory {
            if !targets.contains(&d.template.upstream.address) {
                targets.push(d.template.upstream.address.clone());
            }
        }
        for address in targets {
            tokio::spawn(crate::server::admin::watch_upstream(
                address,
                interval,
                ready.clone(),
            ));
        }
    }
    tokio::spawn(reload_on_sighup(server.clone(), reload, valid, hangup));

    if cfg.directory.enabled() {
        info!(directory = %cfg.directory.url, "popbridge ready");
    } else {
        info!(upstream = %cfg.upstream.address, upstream_tls = ?cfg.upstream.tls, mailbox = %cfg.upstream.mailbox, "popbridge ready");
    }
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
    // Idle upstream sessions are logged out politely.
    let idle = server.current().bridge.pool.drain(None).await;
    info!(
        clean,
        open = server.open_sessions(),
        idle_upstream_logged_out = idle,
        "stopped"
    );
    Ok(clean)
}

/// SIGHUP reloads the configuration file (and certificates) for new
/// sessions; running sessions keep what they started with. An invalid new
/// configuration is logged and the old one stays. Listener addresses cannot
/// change without a restart.
async fn reload_on_sighup(
    server: Arc<Server<ImapConnector>>,
    reload: Reload,
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
            let loaded = reload().and_then(|c| check(&c).map_err(|e| e.to_string()));
            let valid = match loaded {
                Ok(v) => v,
                Err(e) => {
                    warn!(error = %e, "reload failed: invalid configuration; keeping the current one");
                    continue;
                }
            };
            for w in warnings(&valid) {
                warn!("{w}");
            }
            if valid.listen != current.listen
                || valid.tls_address != current.tls_address
                || valid.legacy_tls_address != current.legacy_tls_address
                || valid.config.legacy_tls.mode != current.config.legacy_tls.mode
                || valid.admin != current.admin
            {
                warn!("listener addresses changed: they take effect at the next restart");
            }
            let old = server.current();
            let previous = Previous {
                throttle: old.bridge.throttle.clone(),
                oauth: old.bridge.oauth.clone().map(|o| (&current.config, o)),
                pool: old.bridge.pool.clone(),
                config: &current,
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
    let _ = (server, reload, current, hangup);
}

/// Each session holds two sockets (client and upstream): raise the soft
/// limit on open files to the hard limit, as daemons commonly do.
fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(now) => tracing::debug!(limit = now, "open-file limit"),
        Err(e) => tracing::debug!(error = %e, "cannot raise the open-file limit"),
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
    use super::*;

    /// `allow_plaintext = true` is every network, IPv4 and IPv6.
    #[test]
    fn allow_plaintext_means_every_network() {
        let mut auth = crate::config::AuthConfig::default();
        assert!(plaintext_networks(&auth).is_empty());
        auth.allow_plaintext = true;
        let all = plaintext_networks(&auth);
        for ip in ["192.0.2.7", "10.1.2.3", "2001:db8::1", "::ffff:192.0.2.7"] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert!(all.iter().any(|n| n.contains(&ip.to_canonical())), "{ip}");
        }
    }

    /// What `--check-config` refuses, validation and the files and
    /// templates it names alike, and where the message points.
    #[test]
    fn check_config_refuses_unknown_keys_and_bad_values() {
        assert!(Config::from_toml("[pop3]\nuidl_fromat = \"x\"").is_err());
        assert!(Config::from_toml("bogus = 1").is_err());
        let bad = |toml: &str| {
            let c = Config::from_toml(&format!("[upstream]\ntls = \"none\"\n{toml}")).unwrap();
            check(&c).unwrap_err().0
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
        // The removed courier preset says what to do instead.
        let courier = bad("[pop3]\nuidl_format = \"courier\"");
        assert!(courier.contains("pop3.uidl_format"), "{courier}");
        assert!(courier.contains("popbridge migrate capture"), "{courier}");
        assert!(bad("[listen]\naddress = \"x\"").contains("listen.address"));
        assert!(bad("[listen]\ntls_address = \"127.0.0.1:995\"").contains("tls.cert_file"));
        assert!(bad("[tls]\ncert_file = \"/nonexistent.pem\"").contains("together"));
        assert!(
            bad("[tls]\ncert_file = \"/nonexistent.pem\"\nkey_file = \"/nonexistent.key\"")
                .contains("/nonexistent.pem")
        );
        assert!(bad("[auth]\nmax_failures_per_ip = 0").contains("max_failures_per_ip"));
        assert!(bad("[limits]\nipv6_prefix_len = 0").contains("limits.ipv6_prefix_len"));
        assert!(bad("[limits]\nipv6_prefix_len = 129").contains("limits.ipv6_prefix_len"));
        assert!(bad("[pop3]\nuidl_map = true").contains("data.dir"));
        assert!(
            bad("[[routes]]\nname = \"a\"\ndomains = [\"x.org\"]\nuidl_map = true")
                .contains("routes (a).uidl_map needs data.dir")
        );
    }

    /// `--check-config` reads what `[directory]` names, and warns about a
    /// plaintext directory on another host.
    #[test]
    fn check_config_reads_the_directorys_files() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        let config = |more: &str| {
            Config::from_toml(&format!(
                "[upstream]\ntls = \"none\"\n[directory]\nurl = \"http://127.0.0.1:8080/r\"\n{more}"
            ))
            .unwrap()
        };
        let missing = format!("token_file = \"{}\"", token.display());
        let e = check(&config(&missing)).unwrap_err().0;
        assert!(e.contains("directory.token_file"), "{e}");
        std::fs::write(&token, "\n").unwrap();
        let e = check(&config(&missing)).unwrap_err().0;
        assert!(e.contains("empty"), "{e}");
        std::fs::write(&token, "t0ken\n").unwrap();
        let v = check(&config(&missing)).unwrap();
        assert!(warnings(&v).is_empty(), "{:?}", warnings(&v));
        let e = check(&config("[pop3]\nuidl_format = \"%q\""))
            .unwrap_err()
            .0;
        assert!(e.contains("pop3.uidl_format"), "{e}");
        let remote = Config::from_toml(
            "[upstream]\ntls = \"none\"\n[directory]\nurl = \"http://dir.example/r\"",
        )
        .unwrap();
        let w = warnings(&check(&remote).unwrap());
        assert!(w.iter().any(|w| w.contains("plain http")), "{w:?}");
        let https = Config::from_toml(&format!(
            "[upstream]\ntls = \"none\"\n[directory]\nurl = \"https://dir.example/r\"\nca_file = \"{}\"",
            token.display()
        ))
        .unwrap();
        let e = check(&https).unwrap_err().0;
        assert!(e.contains("directory.ca_file"), "{e}");
    }

    #[test]
    fn readiness_follows_every_routes_server_once() {
        let c = Config::from_toml(
            "[upstream]\ntls = \"none\"\naddress = \"d:143\"\n\
             [[routes]]\nname = \"a\"\ndomains = [\"a.org\"]\naddress = \"a:143\"\n\
             [[routes]]\nname = \"b\"\ndomains = [\"b.org\"]\naddress = \"d:143\"",
        )
        .unwrap();
        let v = check(&c).unwrap();
        assert_eq!(readiness_targets(&v.routes), ["a:143", "d:143"]);
        let c = Config::from_toml(
            "[upstream]\ntls = \"none\"\naddress = \"unused:143\"\n\
             [routing]\ndefault_route = false\n\
             [[routes]]\nname = \"a\"\ndomains = [\"a.org\"]\naddress = \"a:143\"\n\
             [[routes]]\nname = \"b\"\ndomains = [\"b.org\"]\naddress = \"b:143\"",
        )
        .unwrap();
        let v = check(&c).unwrap();
        assert_eq!(readiness_targets(&v.routes), ["a:143", "b:143"]);
    }

    #[test]
    fn defaults_pass_the_check() {
        let v = check(&Config::default()).unwrap();
        assert_eq!(uidl_format(&v.routes[0]).unwrap().source(), "dovecot");
    }
}
