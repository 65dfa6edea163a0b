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
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// What one connection showed, up to CAPABILITY before login.
#[derive(Debug, Default)]
struct Probe {
    greeting: Option<String>,
    /// CAPABILITY on the plain connection (STARTTLS and none).
    plain_caps: Option<Vec<String>>,
    tls: Option<TlsFacts>,
    /// CAPABILITY popbridge logs in with (after TLS when there is TLS).
    caps: Option<Vec<String>>,
}

#[derive(Debug)]
struct TlsFacts {
    version: String,
    cipher: String,
    /// DER certificates as presented, leaf first.
    chain: Vec<Vec<u8>>,
}

#[derive(Debug)]
enum ProbeError {
    /// The certificate did not verify (the text is rustls's).
    Certificate(String),
    /// Another TLS failure (handshake, protocol version, not TLS at all).
    Tls(String),
    NoStartTls,
    Imap(String),
}

fn reader(stream: UpstreamStream, imap: &ImapConfig) -> ImapReader<UpstreamStream> {
    ImapReader::new(stream, Framer::new(Limits::default()), imap.command_timeout)
}

/// TCP is up: TLS as configured, the greeting, CAPABILITY, LOGOUT. With
/// `verify` false any certificate is accepted (to read a bad one).
async fn run_probe(
    tcp: TcpStream,
    imap: &ImapConfig,
    verify: bool,
    p: &mut Probe,
) -> Result<(), ProbeError> {
    let _ = tcp.set_nodelay(true);
    let mut r = match &imap.tls {
        UpstreamTlsSetup::Implicit(connector, name) => {
            let tls = handshake(tcp, connector, name, verify, imap.command_timeout, p).await?;
            reader(MaybeTls::Tls(Box::new(tls)), imap)
        }
        UpstreamTlsSetup::StartTls(_, _) | UpstreamTlsSetup::None => {
            reader(MaybeTls::Plain(tcp), imap)
        }
    };
    let (greeting, caps) = read_greeting(&mut r).await?;
    p.greeting = Some(greeting);
    let caps = match caps {
        Some(c) => c,
        None => command(&mut r, "d1", "CAPABILITY").await?,
    };
    if let UpstreamTlsSetup::StartTls(connector, name) = &imap.tls {
        p.plain_caps = Some(caps.clone());
        if !has(&caps, "STARTTLS") {
            logout(&mut r).await;
            return Err(ProbeError::NoStartTls);
        }
        command(&mut r, "d2", "STARTTLS").await?;
        let (stream, mut framer) = r.into_parts();
        if framer.has_unread() {
            return Err(ProbeError::Imap(
                "data after the STARTTLS reply, before the TLS handshake: popbridge refuses this (an injection attempt)".into(),
            ));
        }
        let MaybeTls::Plain(tcp) = stream else {
            return Err(ProbeError::Imap(
                "STARTTLS on a connection that is not plain".into(),
            ));
        };
        let tls = handshake(tcp, connector, name, verify, imap.command_timeout, p).await?;
        r = reader(MaybeTls::Tls(Box::new(tls)), imap);
        let caps = command(&mut r, "d3", "CAPABILITY").await?;
        p.caps = Some(caps);
    } else {
        if matches!(imap.tls, UpstreamTlsSetup::None) {
            p.plain_caps = Some(caps.clone());
        }
        p.caps = Some(caps);
    }
    logout(&mut r).await;
    Ok(())
}

type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

async fn handshake(
    tcp: TcpStream,
    connector: &TlsConnector,
    name: &ServerName<'static>,
    verify: bool,
    limit: Duration,
    p: &mut Probe,
) -> Result<ClientTls, ProbeError> {
    let connector = if verify {
        connector.clone()
    } else {
        accept_any_connector()?
    };
    let tls = match timeout(limit, connector.connect(name.clone(), tcp)).await {
        Err(_) => {
            return Err(ProbeError::Tls(format!(
                "no TLS handshake within {limit:?}"
            )))
        }
        Ok(Err(e)) => {
            let bad_cert = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)));
            return Err(if bad_cert {
                ProbeError::Certificate(e.to_string())
            } else {
                ProbeError::Tls(format!("TLS handshake failed: {e}"))
            });
        }
        Ok(Ok(s)) => s,
    };
    let conn = tls.get_ref().1;
    p.tls = Some(TlsFacts {
        version: conn
            .protocol_version()
            .map_or("?".into(), |v| format!("{v:?}")),
        cipher: conn
            .negotiated_cipher_suite()
            .map_or("?".into(), |s| format!("{:?}", s.suite())),
        chain: conn
            .peer_certificates()
            .map(|c| c.iter().map(|d| d.to_vec()).collect())
            .unwrap_or_default(),
    });
    Ok(tls)
}

/// A TLS client that accepts any certificate (handshake signatures are
/// still checked). Only ever used to read a certificate that failed
/// verification; no credentials are sent over it.
fn accept_any_connector() -> Result<TlsConnector, ProbeError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ProbeError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Text fit for a terminal: printable ASCII, at most [`MAX_SHOWN`].
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .trim_end()
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .take(MAX_SHOWN)
        .collect()
}

fn imap_error(e: impl std::fmt::Display) -> ProbeError {
    ProbeError::Imap(e.to_string())
}

/// The greeting (RFC 3501 §7.1: OK, PREAUTH or BYE) and the capabilities
/// it carries, if any.
async fn read_greeting(
    r: &mut ImapReader<UpstreamStream>,
) -> Result<(String, Option<Vec<String>>), ProbeError> {
    let frame = r.next_frame().await.map_err(imap_error)?;
    let Frame::Response(bytes) = frame else {
        return Err(ProbeError::Imap("the greeting is a literal".into()));
    };
    let text = printable(bytes);
    match parse_response(bytes) {
        Parsed::Known(Response::Data {
            status: ImapStatus::Ok,
            outcome,
        }) => {
            let caps = match &outcome.code {
                Some(ResponseCode::Capabilities(c)) => {
                    Some(c.iter().map(capability_name).collect())
                }
                _ => None,
            };
            Ok((text, caps))
        }
        _ => Err(ProbeError::Imap(format!(
            "the server does not greet with OK: {text}"
        ))),
    }
}

/// Runs one command before login to its tagged OK; returns the
/// capabilities it announced (a CAPABILITY response or code).
async fn command(
    r: &mut ImapReader<UpstreamStream>,
    tag: &str,
    cmd: &str,
) -> Result<Vec<String>, ProbeError> {
    let line = format!("{tag} {cmd}\r\n");
    r.get_mut()
        .write_all(line.as_bytes())
        .await
        .map_err(imap_error)?;
    r.get_mut().flush().await.map_err(imap_error)?;
    let mut caps = Vec::new();
    loop {
        let frame = r.next_frame().await.map_err(imap_error)?;
        let Frame::Response(bytes) = frame else {
            continue;
        };
        let shown = printable(bytes);
        match parse_response(bytes) {
            Parsed::Known(Response::Capabilities(c)) => {
                caps = c.iter().map(capability_name).collect()
            }
            Parsed::Known(Response::Done {
                tag: t,
                status,
                outcome,
            }) if t.0 == tag => {
                if let Some(ResponseCode::Capabilities(c)) = &outcome.code {
                    caps = c.iter().map(capability_name).collect();
                }
                return match status {
                    ImapStatus::Ok => Ok(caps),
                    _ => Err(ProbeError::Imap(format!("{cmd} refused: {shown}"))),
                };
            }
            _ => {}
        }
    }
}

/// LOGOUT, politely and briefly; errors do not matter.
async fn logout(r: &mut ImapReader<UpstreamStream>) {
    let _ = timeout(Duration::from_secs(2), command(r, "d9", "LOGOUT")).await;
}

fn has(caps: &[String], name: &str) -> bool {
    caps.iter().any(|c| c.eq_ignore_ascii_case(name))
}

fn auth_mechanisms(caps: &[String]) -> Vec<String> {
    caps.iter()
        .filter_map(|c| {
            c.get(..5)
                .filter(|p| p.eq_ignore_ascii_case("AUTH="))
                .map(|_| c[5..].to_string())
        })
        .collect()
}

/// The certificate's facts, parsed from DER.
struct CertFacts {
    subject: String,
    issuer: String,
    names: Vec<String>,
    not_after_unix: i64,
}

fn cert_facts(der: &[u8]) -> Option<CertFacts> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_string()),
                GeneralName::IPAddress(ip) => match ip.len() {
                    4 => names
                        .push(std::net::Ipv4Addr::from([ip[0], ip[1], ip[2], ip[3]]).to_string()),
                    16 => {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(ip);
                        names.push(std::net::Ipv6Addr::from(a).to_string())
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Some(CertFacts {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        names,
        not_after_unix: cert.validity().not_after.timestamp(),
    })
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The `tls` and `certificate` lines. `failed`: rustls's verdict when the
/// certificate did not verify (then `p` is the accept-any connection).
fn report_tls(
    report: &mut RouteReport,
    imap: &ImapConfig,
    ca_file: &str,
    p: &Probe,
    failed: Option<&String>,
) {
    let name = match &imap.tls {
        UpstreamTlsSetup::None => {
            report.push(
                "tls",
                Status::Warn,
                "none (upstream.tls = \"none\"): passwords travel in plaintext to the IMAP server",
            );
            return;
        }
        UpstreamTlsSetup::Implicit(_, n) | UpstreamTlsSetup::StartTls(_, n) => {
            n.to_str().to_string()
        }
    };
    let Some(tls) = &p.tls else {
        if let Some(why) = failed {
            report.push("certificate", Status::Fail, why.clone());
        }
        return;
    };
    report.push_data(
        "tls",
        Status::Ok,
        format!("{}, {}", tls.version, tls.cipher),
        serde_json::json!({ "version": tls.version, "cipher": tls.cipher }),
    );
    let roots = if ca_file.is_empty() {
        "the system's CA certificates".to_string()
    } else {
        format!("upstream.ca_file {ca_file}")
    };
    let leaf = tls.chain.first().and_then(|d| cert_facts(d));
    let days = leaf
        .as_ref()
        .map(|c| (c.not_after_unix - now_unix()).div_euclid(86_400));
    let expiry = match (&leaf, days) {
        (Some(c), Some(d)) => format!(
            "expires {} ({d} days)",
            super::oauth::format_time(c.not_after_unix.max(0) as u64)
        ),
        _ => "expiry unknown".to_string(),
    };
    let names = leaf
        .as_ref()
        .map(|c| c.names.join(", "))
        .unwrap_or_default();
    let data = serde_json::json!({
        "verified": failed.is_none(),
        "error": failed,
        "name_checked": name,
        "trusted_roots": roots,
        "chain_length": tls.chain.len(),
        "subject": leaf.as_ref().map(|c| c.subject.clone()),
        "issuer": leaf.as_ref().map(|c| c.issuer.clone()),
        "names": leaf.as_ref().map(|c| c.names.clone()),
        "not_after_unix": leaf.as_ref().map(|c| c.not_after_unix),
        "days_left": days,
    });
    match failed {
        Some(why) => report.push_data(
            "certificate",
            Status::Fail,
            format!(
                "NOT trusted: {why}; name checked {name:?} against {roots}; certificate for [{names}], {expiry}; popbridge refuses this server"
            ),
            data,
        ),
        None => {
            let status = match days {
                Some(d) if d < EXPIRY_WARNING_DAYS => Status::Warn,
                _ => Status::Ok,
            };
            report.push_data(
                "certificate",
                status,
                format!(
                    "valid for {name:?} (chain of {} verified against {roots}), {expiry}",
                    tls.chain.len()
                ),
                data,
            );
        }
    }
}

/// The `greeting`, `starttls`, `capabilities` and `sasl` lines.
fn report_session(
    report: &mut RouteReport,
    config: &Config,
    route: &EffectiveRoute,
    p: &Probe,
    verified: bool,
) {
    let Some(greeting) = &p.greeting else {
        return;
    };
    let unverified = if verified {
        ""
    } else {
        " (read over an unverified connection)"
    };
    report.push("greeting", Status::Ok, format!("{greeting}{unverified}"));
    if let Some(plain) = &p.plain_caps {
        let offered = has(plain, "STARTTLS");
        // STARTTLS configured but not offered is the `starttls` failure
        // reported after the probe.
        let line = match (route.upstream.tls, offered) {
            (UpstreamTls::Starttls, true) => Some((Status::Ok, "offered, used")),
            (UpstreamTls::Starttls, false) => None,
            (_, true) => Some((Status::Info, "offered, not used (upstream.tls = \"none\")")),
            (_, false) => Some((Status::Info, "not offered")),
        };
        if let Some((status, detail)) = line {
            report.push_data(
                "starttls",
                status,
                detail,
                serde_json::json!({ "offered": offered }),
            );
        }
    } else if route.upstream.tls == UpstreamTls::Implicit {
        report.push("starttls", Status::Info, "not used (implicit TLS)");
    }
    let Some(caps) = &p.caps else {
        return;
    };
    report.push_data(
        "capabilities",
        Status::Ok,
        format!("before login: {}{unverified}", caps.join(" ")),
        serde_json::json!({ "before_login": caps }),
    );
    let mechanisms = auth_mechanisms(caps);
    let offered = |m: &str| mechanisms.iter().any(|x| x.eq_ignore_ascii_case(m));
    let listed = if mechanisms.is_empty() {
        "none".to_string()
    } else {
        mechanisms.join(" ")
    };
    let (status, detail) = match route.upstream.auth {
        UpstreamAuth::Oauth2 => match config.oauth.provider(&route.upstream.oauth_provider) {
            Ok(provider) => {
                let m = provider.sasl.mechanism.name();
                if offered(m) {
                    (
                        Status::Ok,
                        format!("offered: {listed}; popbridge will use AUTHENTICATE {m} (provider {})", provider.name),
                    )
                } else {
                    (
                        Status::Fail,
                        format!(
                            "offered: {listed}; provider {} needs AUTH={m}: popbridge cannot log in",
                            provider.name
                        ),
                    )
                }
            }
            Err(e) => (Status::Fail, e.to_string()),
        },
        UpstreamAuth::Passthrough => match route.upstream.login_mechanism {
            LoginMechanism::Auto if offered("PLAIN") => (
                Status::Ok,
                format!("offered: {listed}; popbridge will use AUTHENTICATE PLAIN"),
            ),
            LoginMechanism::Auto | LoginMechanism::Login if has(caps, "LOGINDISABLED") => (
                Status::Fail,
                format!(
                    "offered: {listed}; the server refuses LOGIN (LOGINDISABLED) and popbridge has no other way in"
                ),
            ),
            LoginMechanism::Auto => (
                Status::Ok,
                format!("offered: {listed}; no AUTH=PLAIN, so popbridge will use LOGIN"),
            ),
            LoginMechanism::Plain if offered("PLAIN") => (
                Status::Ok,
                format!("offered: {listed}; AUTHENTICATE PLAIN (login_mechanism = \"plain\")"),
            ),
            LoginMechanism::Plain => (
                Status::Warn,
                format!(
                    "offered: {listed}; AUTH=PLAIN not announced, popbridge sends AUTHENTICATE PLAIN anyway (login_mechanism = \"plain\")"
                ),
            ),
            LoginMechanism::Login => (
                Status::Ok,
                format!("offered: {listed}; LOGIN (login_mechanism = \"login\")"),
            ),
        },
    };
    report.push_data(
        "sasl",
        status,
        detail,
        serde_json::json!({ "mechanisms": mechanisms }),
    );
}

/// popbridge's own login and SELECT with the test credentials, the message
/// count and message 1's UIDL. Returns the capabilities after login.
async fn test_login_select(
    report: &mut RouteReport,
    config: &Config,
    route: &EffectiveRoute,
    imap: &ImapConfig,
    login: &TestLogin,
) -> Option<Vec<String>> {
    // The session view a POP3 login of this user gets (per-device names,
    // hidden messages), as in the proxy.
    let view = match crate::bridge::policy::session_view(&route.policy, &login.user) {
        Ok(v) => v,
        Err(why) => {
            report.push("login", Status::Fail, format!("{}: {why}", login.user));
            return None;
        }
    };
    let user = route.upstream.login.apply(&view.account).to_string();
    let connector = ImapConnector::new(imap.clone());
    let started = Instant::now();
    let result = connector
        .login(
            Credentials::Password {
                user: &user,
                pass: &login.pass,
            },
            view.hide.as_deref(),
            None,
        )
        .await;
    let (conn, snap) = match result {
        Ok(x) => x,
        Err(e) => {
            let check = match &e {
                UpstreamError::No { command, .. } | UpstreamError::Bad { command, .. }
                    if *command == "SELECT" =>
                {
                    "select"
                }
                _ => "login",
            };
            report.push(check, Status::Fail, format!("as {user}: {e}"));
            return None;
        }
    };
    report.push_data(
        "login",
        Status::Ok,
        format!("as {user} in {}", millis(started.elapsed())),
        serde_json::json!({ "user": user, "ms": ms(started.elapsed()) }),
    );
    let caps = conn.capabilities().to_vec();
    report.push_data(
        "capabilities",
        Status::Ok,
        format!("after login: {}", caps.join(" ")),
        serde_json::json!({ "after_login": caps }),
    );
    let count = snap.messages.len();
    let octets: u64 = snap.messages.iter().map(|&(_, s)| s).sum();
    report.push_data(
        "select",
        Status::Ok,
        format!(
            "{}: {count} message{}, {octets} octets (UIDVALIDITY {})",
            route.upstream.mailbox,
            if count == 1 { "" } else { "s" },
            snap.uidvalidity
        ),
        serde_json::json!({ "messages": count, "octets": octets, "uidvalidity": snap.uidvalidity }),
    );
    report_uidl(report, config, route, &user, snap);
    conn.logout().await;
    Some(caps)
}

/// The UIDL message 1 gets, by the session's precedence: a valid X-UIDL
/// header (`reuse_xuidl`) > the imported map (`uidl_map`) > `uidl_format`
/// (as `bridge::login` applies them).
fn report_uidl(
    report: &mut RouteReport,
    config: &Config,
    route: &EffectiveRoute,
    account: &str,
    snap: crate::imap::Snapshot,
) {
    let format = match crate::pop3::uidl::UidlFormat::parse(&route.pop3.uidl_format) {
        Ok(f) => f,
        Err(e) => {
            report.push("uidl", Status::Fail, e.to_string());
            return;
        }
    };
    let xuidl = snap.xuidl;
    let mut maildrop = Maildrop::new(snap.uidvalidity, snap.messages);
    let mut overrides = std::collections::HashMap::new();
    let mut source = format!("uidl_format {:?}", route.pop3.uidl_format);
    if route.pop3.uidl_map {
        let store = crate::migrate::runtime::MapStore::new(Path::new(&config.data.dir));
        let key = crate::migrate::store::MapKey::new(
            &route.upstream.address,
            account,
            &route.upstream.mailbox,
        );
        let uids: Vec<u32> = maildrop.visible().map(|(_, e)| e.uid).collect();
        match store.lookup(&key, maildrop.uidvalidity, uids.into_iter()) {
            Ok(crate::migrate::runtime::Lookup::Overrides(o)) => overrides = o,
            Ok(crate::migrate::runtime::Lookup::None) => {
                source.push_str("; no imported map for this account")
            }
            Ok(crate::migrate::runtime::Lookup::StaleUidvalidity { .. }) => {
                source.push_str("; the imported map is for another UIDVALIDITY and is ignored")
            }
            Err(e) => source.push_str(&format!("; the imported map is unusable: {e}")),
        }
    }
    let from_map: std::collections::HashSet<u32> = overrides.keys().copied().collect();
    let from_header: std::collections::HashSet<u32> = xuidl.keys().copied().collect();
    overrides.extend(xuidl);
    maildrop.set_uidls(overrides, &format);
    let Some(first) = MsgNum::new(1).and_then(|n| maildrop.get(n).ok()) else {
        report.push(
            "uidl",
            Status::Info,
            format!("the mailbox is empty: no message 1 ({source})"),
        );
        return;
    };
    let uidl = maildrop.uidl(first, &format);
    let from = if from_header.contains(&first.uid) {
        "its X-UIDL header".to_string()
    } else if from_map.contains(&first.uid) {
        "the imported map".to_string()
    } else {
        source
    };
    report.push_data(
        "uidl",
        Status::Ok,
        format!(
            "message 1 (UID {}, {} octets): {uidl} (from {from})",
            first.uid, first.size
        ),
        serde_json::json!({ "uid": first.uid, "size": first.size, "uidl": uidl }),
    );
}

/// What popbridge will do about what the server has or lacks, with this
/// route's settings. `after`: the capabilities after login, when known.
fn consequences(
    report: &mut RouteReport,
    route: &EffectiveRoute,
    before: &[String],
    after: Option<&[String]>,
) {
    let caps = after.unwrap_or(before);
    let known = after.is_some();
    let policy = route.policy.delete;
    let policy_name = match policy {
        DeletePolicy::Expunge => "expunge",
        DeletePolicy::Flag => "flag",
        DeletePolicy::Move => "move",
        DeletePolicy::Keep => "keep",
        DeletePolicy::PerDevice => "per-device",
    };
    let uidplus = has(caps, "UIDPLUS");
    let has_move = has(caps, "MOVE");
    let (status, detail) = if uidplus {
        (
            Status::Ok,
            "UIDPLUS: QUIT removes exactly the DELE'd messages (UID EXPUNGE)".to_string(),
        )
    } else if !known {
        (
            Status::Info,
            "UIDPLUS not announced before login (servers often announce it only after): give test credentials to know".to_string(),
        )
    } else {
        match (policy, route.upstream.no_uidplus, has_move) {
            (DeletePolicy::Expunge, NoUidplus::Refuse, _) => (
                Status::Fail,
                "no UIDPLUS: QUIT will refuse deletions (no_uidplus = \"refuse\"); set no_uidplus = \"expunge-if-alone\" or another delete_policy".to_string(),
            ),
            (DeletePolicy::Expunge, NoUidplus::ExpungeIfAlone, _) => (
                Status::Warn,
                "no UIDPLUS: QUIT flags the messages and expunges only when no other message is flagged \\Deleted (no_uidplus = \"expunge-if-alone\")".to_string(),
            ),
            (DeletePolicy::Move, _, true) => (
                Status::Ok,
                "no UIDPLUS: not needed, MOVE moves the DELE'd messages (delete_policy = \"move\")".to_string(),
            ),
            (DeletePolicy::Move, _, false) => (
                Status::Fail,
                "neither UIDPLUS nor MOVE: QUIT will refuse to move deleted messages (delete_policy = \"move\")".to_string(),
            ),
            _ => (
                Status::Info,
                format!("no UIDPLUS: not needed (delete_policy = \"{policy_name}\" expunges nothing)"),
            ),
        }
    };
    report.push_data(
        "uidplus",
        status,
        detail,
        serde_json::json!({ "offered": uidplus, "known": known }),
    );
    if policy == DeletePolicy::Move {
        let (status, detail) = match (has_move, uidplus, known) {
            (true, _, _) => (Status::Ok, "MOVE: QUIT moves with UID MOVE".to_string()),
            (false, true, _) => (
                Status::Ok,
                "no MOVE: QUIT copies, flags and expunges exactly those messages (UID COPY + UID EXPUNGE)".to_string(),
            ),
            (false, false, true) => (Status::Info, "no MOVE (see uidplus)".to_string()),
            (false, false, false) => (
                Status::Info,
                "MOVE not announced before login: give test credentials to know".to_string(),
            ),
        };
        report.push_data(
            "move",
            status,
            detail,
            serde_json::json!({ "offered": has_move }),
        );
    } else {
        report.push_data(
            "move",
            Status::Info,
            format!(
                "{} (used only with delete_policy = \"move\")",
                if has_move { "offered" } else { "not offered" }
            ),
            serde_json::json!({ "offered": has_move }),
        );
    }
    let literal_plus = has(caps, "LITERAL+") || has(caps, "LITERAL-");
    report.push_data(
        "literal+",
        Status::Info,
        format!(
            "{}: popbridge does not need it (LOGIN waits for the server's + before a literal)",
            if literal_plus {
                "offered"
            } else {
                "not offered"
            }
        ),
        serde_json::json!({ "offered": literal_plus }),
    );
    let id = has(caps, "ID") || has(before, "ID");
    let (status, detail) = match (route.upstream.send_client_id, id) {
        (true, true) => (
            Status::Ok,
            "offered: popbridge tells the server each client's address (send_client_id = true)"
                .to_string(),
        ),
        (true, false) => (
            Status::Warn,
            "not offered: the server will not learn client addresses, its logs and penalties see popbridge (send_client_id = true)".to_string(),
        ),
        (false, offered) => (
            Status::Info,
            format!(
                "{}: not used (send_client_id = false)",
                if offered { "offered" } else { "not offered" }
            ),
        ),
    };
    report.push_data("id", status, detail, serde_json::json!({ "offered": id }));
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
