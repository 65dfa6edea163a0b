//! The command line: `popbridge` serves; `popbridge migrate | oauth |
//! device` are maintenance commands ([`migrate`], [`oauth`]); `--probe` is
//! a health probe for containers without a shell. Each reads the same
//! configuration (the file, then `POPBRIDGE_*` variables, then flags) and
//! hands it to [`crate::app`] or its command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::config::{Config, LogFormat, UpstreamTls};

pub mod assets;
pub mod doctor;
pub mod logging;
pub mod migrate;
pub mod oauth;
pub mod version;

/// A POP3 server that serves each session from a mailbox on an IMAP server.
///
/// Settings come from the TOML file given with --config, then POPBRIDGE_*
/// environment variables, then these flags (flags win).
#[derive(Debug, Clone, Parser)]
#[command(version = version::VERSION, long_version = version::LONG_VERSION, about)]
pub struct Args {
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
    /// Address:port of the admin HTTP listener: /metrics, /healthz, /readyz
    /// (admin.address).
    #[arg(long, env = "POPBRIDGE_ADMIN")]
    admin: Option<String>,
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
    Migrate(migrate::MigrateArgs),
    /// Enrol, list, test and remove OAuth2 accounts.
    Oauth(oauth::OauthArgs),
    /// Add, list and remove device logins for OAuth2 routes.
    Device(oauth::DeviceArgs),
    /// Check each route's IMAP server as a POP3 session will use it.
    ///
    /// For every route (or --route NAME): address resolution, TCP connect
    /// time, TLS version, the certificate (verified as popbridge verifies
    /// it, the name checked, days to expiry), STARTTLS, CAPABILITY before
    /// and after login, and what popbridge does about what is missing; with
    /// test credentials also a login, SELECT, the message count and the UIDL
    /// message 1 gets. A table, or JSON with --json. Exit 0 when everything
    /// a POP3 session needs works, 1 when something fails, 2 for a usage or
    /// configuration error.
    Doctor(doctor::DoctorArgs),
    /// Write the man pages and shell completions into DIR (for packaging).
    #[command(hide = true)]
    GenerateAssets {
        /// Output directory (man/ and completions/ are made in it).
        dir: PathBuf,
    },
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
        if let Some(v) = self.admin {
            config.admin.address = v;
        }
        if let Some(v) = self.log_format {
            config.log.format = v;
        }
        Ok((config, self.check_config))
    }
}

/// The `popbridge` binary's `main`.
pub fn main() -> ExitCode {
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
    if let Some(Command::GenerateAssets { dir }) = &args.command {
        return match assets::write(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("popbridge: generate-assets {}: {e}", dir.display());
                ExitCode::from(1)
            }
        };
    }
    if let Some(command) = args.command.clone() {
        // The file, then POPBRIDGE_* variables and flags, as when serving:
        // the commands reach the upstream the proxy reaches (and `migrate`
        // writes maps under the key the proxy will look up). `migrate`
        // always has a configuration (its defaults without a file); `oauth`
        // and `device` need the file's [data] and [oauth] sections.
        let config = match (&command, &args.config) {
            (Command::Migrate(_) | Command::Doctor(_), _) | (_, Some(_)) => {
                match args.clone().into_config() {
                    Ok((c, _)) => Some(c),
                    Err(e) => {
                        eprintln!("popbridge: {e}");
                        return ExitCode::from(2);
                    }
                }
            }
            _ => None,
        };
        return match command {
            Command::Migrate(a) => migrate::run(a, config.unwrap_or_default()),
            Command::Oauth(a) => oauth::run_oauth(a, config),
            Command::Device(a) => oauth::run_device(a, config),
            Command::Doctor(a) => doctor::run(a, config.unwrap_or_default()),
            Command::GenerateAssets { .. } => ExitCode::SUCCESS,
        };
    }
    let (config, check_only) = match args.clone().into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("popbridge: {e}");
            return ExitCode::from(2);
        }
    };
    let valid = match crate::app::check(&config) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("popbridge: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if check_only {
        for w in crate::app::warnings(&valid) {
            eprintln!("popbridge: warning: {w}");
        }
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    logging::init(&valid.config.log.level, valid.config.log.format);
    // A reload reads the configuration the same way, from the same flags.
    let reload = move || args.clone().into_config().map(|(c, _)| c);
    crate::app::serve(valid, Box::new(reload))
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
