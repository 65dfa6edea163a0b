//! `popbridge doctor`: for every route (or `--route NAME`), what a POP3
//! session will need from its IMAP server, checked the way popbridge does
//! it, and what popbridge will do about anything missing.
//!
//! Per route:
//! 1. the host's addresses, and the TCP connect time;
//! 2. TLS (implicit, or STARTTLS): version and cipher, and the certificate
//!    verified exactly as the proxy verifies it (`upstream.ca_file` or the
//!    system's roots, under `tls_name` or the address's host), with the
//!    leaf's names and days to expiry. When verification fails, a second
//!    handshake that accepts any certificate reads it to say why; only
//!    `CAPABILITY` and `LOGOUT` are sent over that connection;
//! 3. the greeting, STARTTLS offered or not, CAPABILITY before login, and
//!    the login mechanism popbridge will pick;
//! 4. given test credentials (`--credentials FILE`, or
//!    `POPBRIDGE_DOCTOR_USER` and `POPBRIDGE_DOCTOR_PASSWORD`), popbridge's
//!    own login and SELECT (the proxy's IMAP client, [`ImapConnector`]),
//!    the message count, CAPABILITY after login, and the UIDL message 1
//!    gets (X-UIDL > imported map > `uidl_format`, as in a session);
//! 5. what the capabilities mean with this route's settings (UIDPLUS and
//!    `no_uidplus`, MOVE and `delete_policy`, ID and `send_client_id`).
//!
//! The pre-login part reads the server with [`crate::imap::wire`] (the
//! proxy's response framer and parser); nothing here logs in on its own.
//!
//! Exit codes: 0 when everything a POP3 session needs works on every
//! checked route (warnings allowed), 1 when something fails, 2 for a usage
//! or configuration error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_imap::imap_proto::{Response, ResponseCode, Status as ImapStatus};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::rustls::{self, pki_types::ServerName};
use tokio_rustls::TlsConnector;

use crate::config::{
    Config, DeletePolicy, EffectiveRoute, LoginMechanism, NoUidplus, RouteIndex, UpstreamAuth,
    UpstreamTls,
};
use crate::imap::wire::{parse_response, Frame, Framer, ImapReader, Limits, Parsed};
use crate::imap::{
    capability_name, Connector, Credentials, ImapConfig, ImapConnector, Upstream, UpstreamError,
    UpstreamStream, UpstreamTlsSetup,
};
use crate::pop3::command::{MsgNum, Secret};
use crate::pop3::maildrop::Maildrop;
use crate::tls::MaybeTls;

/// Environment variable with the test login's user name.
pub const USER_ENV: &str = "POPBRIDGE_DOCTOR_USER";
/// Environment variable with the test login's password.
pub const PASSWORD_ENV: &str = "POPBRIDGE_DOCTOR_PASSWORD";
/// A certificate closer to its expiry than this is a warning: renewals
/// (ACME clients renew 30 days ahead) should have happened by then.
mod checks;
mod probe;

use checks::*;
use probe::*;

const EXPIRY_WARNING_DAYS: i64 = 14;
/// The longest credentials file read (two short lines).
const MAX_CREDENTIALS_FILE: u64 = 4096;
/// Greeting text shown at most, in characters.
const MAX_SHOWN: usize = 160;

/// `popbridge doctor`
#[derive(Debug, Clone, clap::Args)]
pub struct DoctorArgs {
    /// Check only this route: a [[routes]] name, or "default" for [upstream].
    #[arg(long, value_name = "NAME")]
    route: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Test credentials: a file with the user name on the first line and
    /// the password on the second. Default: $POPBRIDGE_DOCTOR_USER and
    /// $POPBRIDGE_DOCTOR_PASSWORD; without either, no login is tried.
    #[arg(long, value_name = "FILE")]
    credentials: Option<PathBuf>,
}

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Works, but worth knowing (a certificate close to expiry, deletions
    /// that depend on no_uidplus = "expunge-if-alone").
    Warn,
    /// A POP3 session on this route will not work (or not fully).
    Fail,
    /// Not checked, or not needed with these settings.
    Info,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Info => "-",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub status: Status,
    /// What an administrator reads.
    pub detail: String,
    /// The same facts for programs (`--json`).
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

/// Everything found about one route.
#[derive(Debug, Clone, Serialize)]
pub struct RouteReport {
    pub route: String,
    pub address: String,
    pub tls: &'static str,
    pub mailbox: String,
    /// No check failed.
    pub ok: bool,
    pub checks: Vec<Check>,
}

impl RouteReport {
    fn push(&mut self, check: &'static str, status: Status, detail: impl Into<String>) {
        self.push_data(check, status, detail, serde_json::Value::Null);
    }

    fn push_data(
        &mut self,
        check: &'static str,
        status: Status,
        detail: impl Into<String>,
        data: serde_json::Value,
    ) {
        if status == Status::Fail {
            self.ok = false;
        }
        self.checks.push(Check {
            check,
            status,
            detail: detail.into(),
            data,
        });
    }
}

/// The test login.
struct TestLogin {
    user: String,
    pass: Secret,
}

/// Runs `popbridge doctor` with a loaded (not yet checked) configuration.
pub fn run(args: DoctorArgs, config: Config) -> ExitCode {
    let valid = match crate::app::check(&config) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("popbridge doctor: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let login = match test_login(args.credentials.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("popbridge doctor: {e}");
            return ExitCode::from(2);
        }
    };
    let routes: Vec<&EffectiveRoute> = match &args.route {
        Some(name) => match crate::config::routes::route_named(&valid.routes, name) {
            Ok(r) => vec![r],
            Err(e) => {
                eprintln!("popbridge doctor: {e}");
                return ExitCode::from(2);
            }
        },
        None => valid.routes.iter().collect(),
    };
    // The route a POP3 login of the test user takes (the proxy's rule).
    let login_route = login.as_ref().and_then(|l| {
        RouteIndex::new(&valid.routes)
            .find(&l.user)
            .map(|i| valid.routes[i].name.clone())
    });
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("popbridge doctor: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let reports: Vec<RouteReport> = runtime.block_on(async {
        let mut out = Vec::new();
        for route in routes {
            // With --route the login is tried there; otherwise on the route
            // the user's logins take.
            let here = args.route.is_some() || login_route.as_deref() == Some(&route.name);
            let attempt = match &login {
                Some(l) if here => LoginAttempt::Try(l),
                Some(l) => LoginAttempt::Elsewhere(&l.user, login_route.as_deref()),
                None => LoginAttempt::NoCredentials,
            };
            out.push(diagnose(&valid.config, route, attempt).await);
        }
        out
    });
    let ok = reports.iter().all(|r| r.ok);
    if args.json {
        let doc = serde_json::json!({ "ok": ok, "routes": reports });
        match serde_json::to_string_pretty(&doc) {
            Ok(text) => emit(&format!("{text}\n")),
            Err(e) => {
                eprintln!("popbridge doctor: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        emit(&table(&reports));
        // Not checked here: the directory answers per login.
        if let Some(d) = &valid.directory {
            emit(&format!(
                "directory: {}, asked for unmatched logins\n",
                d.url
            ));
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Writes the report to stdout; a reader that went away (`| head`) is not
/// an error worth a panic, and the exit code still says what was found.
fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// The test credentials: `--credentials FILE`, else the environment.
fn test_login(file: Option<&Path>) -> Result<Option<TestLogin>, String> {
    if let Some(f) = file {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::open(f)
            .and_then(|fh| fh.take(MAX_CREDENTIALS_FILE).read_to_string(&mut text))
            .map_err(|e| format!("--credentials {}: {e}", f.display()))?;
        let mut lines = text.lines();
        let (Some(user), Some(pass)) = (lines.next(), lines.next()) else {
            return Err(format!(
                "--credentials {}: needs the user name on the first line and the password on the second",
                f.display()
            ));
        };
        return Ok(Some(TestLogin {
            user: user.trim().to_string(),
            pass: Secret::new(pass.trim_end_matches('\r').as_bytes().to_vec()),
        }));
    }
    match (std::env::var(USER_ENV), std::env::var(PASSWORD_ENV)) {
        (Ok(user), Ok(pass)) => Ok(Some(TestLogin {
            user,
            pass: Secret::new(pass.into_bytes()),
        })),
        (Ok(_), Err(_)) | (Err(_), Ok(_)) => Err(format!(
            "set both {USER_ENV} and {PASSWORD_ENV}, or neither"
        )),
        _ => Ok(None),
    }
}

/// Whether this route's report includes a test login.
enum LoginAttempt<'a> {
    Try(&'a TestLogin),
    /// The user's logins go to another route (or none).
    Elsewhere(&'a str, Option<&'a str>),
    NoCredentials,
}

fn tls_mode(t: UpstreamTls) -> &'static str {
    match t {
        UpstreamTls::Implicit => "implicit",
        UpstreamTls::Starttls => "starttls",
        UpstreamTls::None => "none",
    }
}

/// Checks one route.
async fn diagnose(config: &Config, route: &EffectiveRoute, login: LoginAttempt<'_>) -> RouteReport {
    let up = &route.upstream;
    let mut report = RouteReport {
        route: route.name.clone(),
        address: up.address.clone(),
        tls: tls_mode(up.tls),
        mailbox: up.mailbox.clone(),
        ok: true,
        checks: Vec::new(),
    };
    let imap = match ImapConfig::from_upstream(up, route.pop3.reuse_xuidl, None) {
        Ok(c) => c,
        Err(e) => {
            report.push("tls", Status::Fail, e);
            return report;
        }
    };

    // 1. Addresses and TCP.
    let started = Instant::now();
    let addrs: Vec<SocketAddr> =
        match timeout(imap.connect_timeout, tokio::net::lookup_host(&imap.address)).await {
            Ok(Ok(found)) => found.collect(),
            Ok(Err(e)) => {
                report.push("resolve", Status::Fail, format!("{}: {e}", imap.address));
                return report;
            }
            Err(_) => {
                report.push(
                    "resolve",
                    Status::Fail,
                    format!(
                        "{}: no answer within {:?}",
                        imap.address, imap.connect_timeout
                    ),
                );
                return report;
            }
        };
    let shown: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
    report.push_data(
        "resolve",
        if addrs.is_empty() {
            Status::Fail
        } else {
            Status::Ok
        },
        format!(
            "{} -> {} ({})",
            crate::imap::host_of(&imap.address),
            if shown.is_empty() {
                "no address".to_string()
            } else {
                shown.join(", ")
            },
            millis(started.elapsed())
        ),
        serde_json::json!({ "addresses": shown, "ms": ms(started.elapsed()) }),
    );
    let mut failures = Vec::new();
    let mut connected = None;
    for addr in &addrs {
        let started = Instant::now();
        match timeout(imap.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                connected = Some((tcp, *addr, started.elapsed()));
                break;
            }
            Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
            Err(_) => failures.push(format!(
                "{addr}: no answer within {:?}",
                imap.connect_timeout
            )),
        }
    }
    let Some((tcp, addr, took)) = connected else {
        if !addrs.is_empty() {
            report.push_data(
                "connect",
                Status::Fail,
                failures.join("; "),
                serde_json::json!({ "errors": failures }),
            );
        }
        return report;
    };
    let mut detail = format!("{addr} in {}", millis(took));
    if !failures.is_empty() {
        detail.push_str(&format!(" (before that: {})", failures.join("; ")));
    }
    report.push_data(
        "connect",
        Status::Ok,
        detail,
        serde_json::json!({ "address": addr.to_string(), "ms": ms(took), "errors": failures }),
    );

    // 2 and 3. TLS, greeting, capabilities.
    let mut probe = Probe::default();
    let outcome = run_probe(tcp, &imap, true, &mut probe).await;
    let mut verified = outcome.is_ok();
    if let Err(ProbeError::Certificate(why)) = &outcome {
        // Read the certificate over a connection that accepts it, to say
        // what is wrong with it; popbridge itself refuses this server.
        let mut second = Probe::default();
        if let Ok(Ok(tcp)) = timeout(imap.connect_timeout, TcpStream::connect(addr)).await {
            let _ = run_probe(tcp, &imap, false, &mut second).await;
        }
        report_tls(&mut report, &imap, up.ca_file.as_str(), &second, Some(why));
        report_session(&mut report, config, route, &second, false);
    } else {
        report_tls(&mut report, &imap, up.ca_file.as_str(), &probe, None);
        report_session(&mut report, config, route, &probe, true);
    }
    match outcome {
        Ok(()) | Err(ProbeError::Certificate(_)) => {}
        Err(ProbeError::NoStartTls) => {
            verified = false;
            report.push(
                "starttls",
                Status::Fail,
                "upstream.tls = \"starttls\" but the server does not offer STARTTLS: popbridge refuses to log in (it never falls back to plaintext)",
            );
        }
        Err(ProbeError::Tls(e)) => report.push("tls", Status::Fail, e),
        Err(ProbeError::Imap(e)) => report.push("imap", Status::Fail, e),
    }
    let caps_before = probe.caps.clone().unwrap_or_default();

    // 4. The test login.
    let mut caps_after = None;
    match login {
        LoginAttempt::NoCredentials => report.push(
            "login",
            Status::Info,
            format!("not tried: no test credentials (--credentials FILE, or {USER_ENV} and {PASSWORD_ENV})"),
        ),
        LoginAttempt::Elsewhere(user, to) => report.push(
            "login",
            Status::Info,
            match to {
                Some(r) => format!("not tried here: {user} logs in through route {r}"),
                None => format!("not tried: no route takes {user}"),
            },
        ),
        LoginAttempt::Try(_) if route.upstream.auth == UpstreamAuth::Oauth2 => report.push(
            "login",
            Status::Info,
            format!(
                "OAuth2 route: test an enrolled account with popbridge oauth test ACCOUNT --route {}",
                route.name
            ),
        ),
        LoginAttempt::Try(_) if !verified => report.push(
            "login",
            Status::Fail,
            "not tried: popbridge does not log in to this server (see above)",
        ),
        LoginAttempt::Try(l) => {
            caps_after = test_login_select(&mut report, config, route, &imap, l).await;
        }
    }

    // 5. What the capabilities mean here.
    if probe.caps.is_some() || caps_after.is_some() {
        consequences(&mut report, route, &caps_before, caps_after.as_deref());
    }
    report
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

fn millis(d: Duration) -> String {
    format!("{} ms", ms(d))
}

/// The readable report.
pub fn table(reports: &[RouteReport]) -> String {
    let mut out = String::new();
    for r in reports {
        out.push_str(&format!(
            "route {}: {} (tls = {}, mailbox {})\n",
            r.route, r.address, r.tls, r.mailbox
        ));
        let width = r.checks.iter().map(|c| c.check.len()).max().unwrap_or(0);
        for c in &r.checks {
            out.push_str(&format!(
                "  {:<width$}  {:<4}  {}\n",
                c.check,
                c.status.label(),
                c.detail
            ));
        }
        out.push_str(if r.ok {
            "  => OK: what a POP3 session needs works\n\n"
        } else {
            "  => FAILED: POP3 sessions on this route will not (fully) work\n\n"
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mechanisms_come_from_auth_capabilities() {
        let caps: Vec<String> = ["IMAP4rev1", "AUTH=PLAIN", "auth=XOAUTH2", "AUTH"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(auth_mechanisms(&caps), vec!["PLAIN", "XOAUTH2"]);
        assert!(has(&caps, "imap4REV1"));
    }

    #[test]
    fn terminal_text_is_printable() {
        assert_eq!(printable(b"* OK \x1b[31mhi\r\n"), "* OK ?[31mhi");
        assert_eq!(printable(&[b'a'; 500]).len(), MAX_SHOWN);
    }

    #[test]
    fn a_failed_check_fails_the_route() {
        let mut r = RouteReport {
            route: "x".into(),
            address: "a:1".into(),
            tls: "none",
            mailbox: "INBOX".into(),
            ok: true,
            checks: Vec::new(),
        };
        r.push("a", Status::Warn, "w");
        r.push("b", Status::Info, "i");
        assert!(r.ok);
        r.push("c", Status::Fail, "f");
        assert!(!r.ok);
        let t = table(&[r]);
        assert!(t.contains("  c  FAIL  f\n"), "{t}");
        assert!(t.contains("FAILED"), "{t}");
    }
}
