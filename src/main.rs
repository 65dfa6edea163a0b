//! The popbridge binary: parse flags, load the configuration, start logging,
//! serve until SIGTERM or Ctrl-C.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use popbridge::config::{Config, LogFormat, UpstreamTls, Validated};
use popbridge::pop3::session::SessionConfig;
use popbridge::server::{serve, ServerSettings};
use popbridge::upstream::imap::{ImapConfig, ImapConnector};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// A POP3 server that serves each session from a mailbox on an IMAP server.
///
/// Settings come from the TOML file given with --config, then POPBRIDGE_*
/// environment variables, then these flags (flags win).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file.
    #[arg(long, env = "POPBRIDGE_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit: 0 if valid, 2 if not.
    #[arg(long)]
    check_config: bool,
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
    /// Log format (log.format).
    #[arg(long, env = "POPBRIDGE_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
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
        if let Some(v) = self.log_format {
            config.log.format = v;
        }
        Ok((config, self.check_config))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (config, check_only) = match args.into_config() {
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
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("popbridge: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(valid)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("popbridge: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr. async-imap logs whole commands, LOGIN passwords included,
/// through the `log` crate at trace level: no `log` bridge is installed and
/// its targets are switched off, so that never reaches the output.
fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(&config.log.level))
        .add_directive("async_imap=off".parse().expect("static directive"))
        .add_directive("imap_proto=off".parse().expect("static directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match config.log.format {
        LogFormat::Text => tracing::subscriber::set_global_default(builder.finish()),
        LogFormat::Json => tracing::subscriber::set_global_default(builder.json().finish()),
    };
    if let Err(e) = result {
        eprintln!("popbridge: logging not initialised: {e}");
    }
}

async fn run(valid: Validated) -> Result<(), String> {
    let cfg = &valid.config;
    let listener = tokio::net::TcpListener::bind(valid.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", valid.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    if cfg.upstream.tls == UpstreamTls::None && !is_loopback(&cfg.upstream.address) {
        warn!(upstream = %cfg.upstream.address, "upstream.tls = none: passwords and mail cross the network unencrypted");
    }
    let connector = Arc::new(ImapConnector::new(ImapConfig {
        address: cfg.upstream.address.clone(),
        mailbox: cfg.upstream.mailbox.clone(),
        connect_timeout: Duration::from_secs(cfg.upstream.connect_timeout_secs),
        command_timeout: Duration::from_secs(cfg.upstream.command_timeout_secs),
        no_uidplus: cfg.upstream.no_uidplus,
    }));
    let settings = Arc::new(ServerSettings {
        session: SessionConfig {
            uidl: valid.uidl.clone(),
            mark_seen: cfg.pop3.mark_seen_on_retr,
        },
        greeting: cfg.pop3.greeting.clone(),
        idle_timeout: valid.idle_timeout,
        login_timeout: valid.login_timeout,
        max_sessions: cfg.limits.max_sessions,
    });
    info!(listen = %local, upstream = %cfg.upstream.address, mailbox = %cfg.upstream.mailbox, "popbridge listening");
    serve(listener, connector, settings, shutdown_signal()).await;
    info!("shutting down");
    Ok(())
}

fn is_loopback(address: &str) -> bool {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
