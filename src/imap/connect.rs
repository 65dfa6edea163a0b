//! Connecting: TCP, TLS or STARTTLS, the greeting, capabilities, ID, then
//! the login ([`super::login`]).

use async_imap::imap_proto::{Capability, Response, ResponseCode, Status};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::conn::{Wire, PRE_LOGIN_TAG};
use super::login::{authenticate, host_port, password_login};
use super::sasl;
use super::settings::{ImapConfig, UpstreamStream, UpstreamTlsSetup};
use super::wire::{parse_response, Frame, Parsed};
use super::{Credentials, UpstreamError};
use crate::config::SaslMechanism;
use crate::metrics::metrics;

/// Connects, reads the greeting and authenticates. Every line up to and
/// including the login is written here and in [`super::login`], never by a
/// library that logs commands (the login lines carry passwords and tokens).
pub(super) async fn open_session(
    cfg: &ImapConfig,
    credentials: Credentials<'_>,
    client_addr: Option<std::net::SocketAddr>,
) -> Result<Wire, UpstreamError> {
    let started = std::time::Instant::now();
    let tcp = timeout(cfg.connect_timeout, TcpStream::connect(&cfg.address))
        .await
        .map_err(|_| UpstreamError::Timeout("connect"))?
        .map_err(|source| UpstreamError::Connect {
            addr: cfg.address.clone(),
            source,
        })?;
    // Without TCP_NODELAY each small command waits for the peer's delayed
    // ACK (measured: ~40 ms per command against Cyrus).
    tcp.set_nodelay(true)?;
    let tls_handshake = |connector: &TlsConnector, name: &ServerName<'static>, tcp: TcpStream| {
        let connect = connector.connect(name.clone(), tcp);
        async move {
            match timeout(cfg.command_timeout, connect).await {
                Err(_) => Err(UpstreamError::Timeout("TLS handshake")),
                Ok(Err(e)) => Err(UpstreamError::Tls(e.to_string())),
                Ok(Ok(s)) => Ok(UpstreamStream::Tls(Box::new(s))),
            }
        }
    };
    let stream = match &cfg.tls {
        UpstreamTlsSetup::Implicit(connector, name) => tls_handshake(connector, name, tcp).await?,
        _ => UpstreamStream::Plain(tcp),
    };
    metrics()
        .upstream_connect_seconds
        .observe(started.elapsed().as_secs_f64());
    let mut wire = Wire::new(stream, cfg.command_timeout);

    // RFC 3501 §7.1.1/§7.1.5: the greeting is OK (perhaps with the
    // capabilities), PREAUTH, or BYE.
    let mut caps = greeting(&mut wire).await?;

    if let UpstreamTlsSetup::StartTls(connector, name) = &cfg.tls {
        let before = match caps {
            Some(c) => c,
            None => raw_command(&mut wire, "CAPABILITY", "CAPABILITY").await?,
        };
        if !before.starttls {
            return Err(UpstreamError::Unsupported(
                "upstream.tls = starttls but the IMAP server does not offer STARTTLS".into(),
            ));
        }
        raw_command(&mut wire, "STARTTLS", "STARTTLS").await?;
        let UpstreamStream::Plain(tcp) = wire.into_stream()? else {
            return Err(UpstreamError::Tls(
                "STARTTLS on a connection that is not plain".into(),
            ));
        };
        let tls = tls_handshake(connector, name, tcp).await?;
        wire = Wire::new(tls, cfg.command_timeout);
        // No greeting after STARTTLS; the capabilities may have changed.
        caps = Some(raw_command(&mut wire, "CAPABILITY", "CAPABILITY").await?);
    }
    let caps = match caps {
        Some(c) => c,
        None => raw_command(&mut wire, "CAPABILITY", "CAPABILITY").await?,
    };

    // RFC 2971 ID with the client's address, before login, so the IMAP
    // server's own logs and per-address limits see the real client (Dovecot
    // honours it from login_trusted_networks). Not supported is fine.
    if let (true, Some(client_addr)) = (cfg.send_client_id, client_addr) {
        let id = format!(
            "ID (\"x-originating-ip\" \"{}\" \"x-originating-port\" \"{}\")",
            client_addr.ip(),
            client_addr.port()
        );
        match raw_command(&mut wire, &id, "ID").await {
            Ok(_) => {}
            Err(e @ (UpstreamError::No { .. } | UpstreamError::Bad { .. })) => {
                debug!(error = %e, "upstream did not take ID")
            }
            Err(e) => return Err(e),
        }
    }

    match credentials {
        Credentials::Password { user, pass } => {
            password_login(&mut wire, cfg, &caps, user, pass).await?
        }
        Credentials::Bearer {
            account,
            token,
            sasl,
        } => {
            let mechanism = sasl.mechanism;
            let offered = match mechanism {
                SaslMechanism::XOauth2 => caps.auth_xoauth2,
                SaslMechanism::OauthBearer => caps.auth_oauthbearer,
                // Provider settings only resolve to bearer mechanisms.
                SaslMechanism::Plain => false,
            };
            if !offered {
                return Err(UpstreamError::Unsupported(format!(
                    "the IMAP server does not offer AUTH={} (check the route's oauth_provider)",
                    mechanism.name()
                )));
            }
            let initial = match mechanism {
                SaslMechanism::XOauth2 | SaslMechanism::Plain => {
                    sasl::xoauth2_response(account, token.expose())
                }
                SaslMechanism::OauthBearer => {
                    let (host, port) = host_port(&cfg.address);
                    sasl::oauthbearer_response(account, host, port, token.expose())
                }
            }
            .map_err(|e| UpstreamError::Unsupported(e.to_string()))?;
            // RFC 4959: the initial response may go with the command when
            // the server announced SASL-IR; Microsoft documents the two-step
            // exchange instead, and the provider says which.
            let sasl_ir = caps.sasl_ir && !sasl.two_step;
            authenticate(&mut wire, mechanism, initial, sasl_ir).await?
        }
    }
    Ok(wire)
}

/// What the server announced before login.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Caps {
    pub(super) auth_plain: bool,
    pub(super) auth_xoauth2: bool,
    pub(super) auth_oauthbearer: bool,
    /// RFC 4959: the initial response may go with AUTHENTICATE.
    pub(super) sasl_ir: bool,
    pub(super) login_disabled: bool,
    pub(super) starttls: bool,
}

impl From<&Vec<Capability<'_>>> for Caps {
    fn from(list: &Vec<Capability<'_>>) -> Self {
        let mut caps = Caps::default();
        for c in list {
            match c {
                Capability::Auth(m) if m.eq_ignore_ascii_case("PLAIN") => caps.auth_plain = true,
                Capability::Auth(m) if m.eq_ignore_ascii_case("XOAUTH2") => {
                    caps.auth_xoauth2 = true
                }
                Capability::Auth(m) if m.eq_ignore_ascii_case("OAUTHBEARER") => {
                    caps.auth_oauthbearer = true
                }
                Capability::Atom(a) if a.eq_ignore_ascii_case("SASL-IR") => caps.sasl_ir = true,
                Capability::Atom(a) if a.eq_ignore_ascii_case("LOGINDISABLED") => {
                    caps.login_disabled = true
                }
                Capability::Atom(a) if a.eq_ignore_ascii_case("STARTTLS") => caps.starttls = true,
                _ => {}
            }
        }
        caps
    }
}

/// Reads the greeting: the capabilities when it carries them; an error
/// for BYE (the server refuses the session) or anything else.
async fn greeting(wire: &mut Wire) -> Result<Option<Caps>, UpstreamError> {
    let Frame::Response(bytes) = wire.next("greeting").await? else {
        return Err(UpstreamError::Protocol("greeting: a literal".into()));
    };
    match parse_response(bytes) {
        Parsed::Known(Response::Data {
            status: Status::Ok,
            outcome,
        }) => Ok(match &outcome.code {
            Some(ResponseCode::Capabilities(c)) => Some(Caps::from(c)),
            _ => None,
        }),
        Parsed::Known(Response::Data { status, outcome }) => Err(UpstreamError::Greeting(format!(
            "{status:?} {}",
            outcome.information.as_deref().unwrap_or("")
        ))),
        Parsed::Known(other) => Err(UpstreamError::Protocol(format!("greeting: {other:?}"))),
        Parsed::Unknown(line) => Err(UpstreamError::Protocol(format!(
            "greeting: {}",
            String::from_utf8_lossy(&line[..line.len().min(100)]).trim_end()
        ))),
    }
}

/// Runs one command before login (tag `pb0`) to its tagged reply. Returns
/// the capabilities seen (from a CAPABILITY response or code); an untagged
/// BYE is the server's refusal.
pub(super) async fn raw_command(
    wire: &mut Wire,
    cmd: &str,
    what: &'static str,
) -> Result<Caps, UpstreamError> {
    wire.send_tagged(PRE_LOGIN_TAG, cmd, what).await?;
    let mut caps = Caps::default();
    let mut bye = None;
    let r = wire
        .finish(PRE_LOGIN_TAG, what, |r| match r {
            Response::Capabilities(c) => caps = Caps::from(c),
            Response::Done { outcome, .. } => {
                if let Some(ResponseCode::Capabilities(c)) = &outcome.code {
                    caps = Caps::from(c);
                }
            }
            Response::Data {
                status: Status::Bye,
                outcome,
            } => bye = Some(outcome.information.as_deref().unwrap_or("").to_string()),
            _ => {}
        })
        .await;
    match (r, bye) {
        (Ok(_), _) => Ok(caps),
        (Err(UpstreamError::ConnectionLost), Some(text)) => {
            Err(UpstreamError::Greeting(format!("BYE {text}")))
        }
        (Err(e), _) => Err(e),
    }
}
