//! Connecting: TCP, TLS or STARTTLS, the greeting, capabilities, ID, then
//! the login ([`super::login`]).

use async_imap::imap_proto::{Capability, Response, ResponseCode, Status};
use async_imap::Client;
use tokio::io::BufWriter;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::conn::{outcome_text, Bounded, Stream, UPSTREAM_WRITE_BUFFER};
use super::login::{authenticate, host_port, password_login};
use super::sasl;
use super::settings::{ImapConfig, UpstreamStream, UpstreamTlsSetup};
use super::{Credentials, UpstreamError};
use crate::config::SaslMechanism;
use crate::metrics::metrics;

/// Connects, reads the greeting and authenticates.
///
/// Everything up to and including the login is written by this module, not
/// by async-imap: its `ImapStream::encode` logs every command line at trace
/// level, and the login lines carry passwords and bearer tokens. async-imap
/// only parses the server's responses here.
pub(super) async fn open_session(
    cfg: &ImapConfig,
    credentials: Credentials<'_>,
    client_addr: Option<std::net::SocketAddr>,
) -> Result<Client<Stream>, UpstreamError> {
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
    // async-imap writes tag, command and CRLF separately; the buffer makes
    // them one segment, sent at its flush.
    let mut client = Client::new(BufWriter::with_capacity(
        UPSTREAM_WRITE_BUFFER,
        Bounded::new(stream),
    ));

    // async-imap's login skips untagged lines, so a `* BYE` greeting would go
    // unnoticed: read the greeting ourselves.
    let greeting = timeout(cfg.command_timeout, async { read_bounded!(client) })
        .await
        .map_err(|_| UpstreamError::Timeout("greeting"))?
        .map_err(UpstreamError::Io)?
        .ok_or(UpstreamError::ConnectionLost)?;
    let mut caps = match greeting.parsed() {
        Response::Data {
            status: Status::Ok,
            outcome,
        } => match &outcome.code {
            Some(ResponseCode::Capabilities(c)) => Some(Caps::from(c)),
            _ => None,
        },
        Response::Data { status, outcome } => {
            return Err(UpstreamError::Greeting(format!(
                "{status:?} {}",
                outcome.information.as_deref().unwrap_or("")
            )))
        }
        other => return Err(UpstreamError::Protocol(format!("greeting: {other:?}"))),
    };
    drop(greeting);

    if let UpstreamTlsSetup::StartTls(connector, name) = &cfg.tls {
        let before = match caps {
            Some(c) => c,
            None => raw_command(&mut client, cfg, "CAPABILITY", "CAPABILITY").await?,
        };
        if !before.starttls {
            return Err(UpstreamError::Unsupported(
                "upstream.tls = starttls but the IMAP server does not offer STARTTLS".into(),
            ));
        }
        raw_command(&mut client, cfg, "STARTTLS", "STARTTLS").await?;
        // Whatever the server sent after its OK is dropped with the old
        // buffer (RFC 3501 §6.2.1: nothing may follow before the handshake).
        let UpstreamStream::Plain(tcp) = client.into_inner().into_inner().inner else {
            unreachable!("STARTTLS starts on a plain connection")
        };
        let tls = tls_handshake(connector, name, tcp).await?;
        client = Client::new(BufWriter::with_capacity(
            UPSTREAM_WRITE_BUFFER,
            Bounded::new(tls),
        ));
        // No greeting after STARTTLS; the capabilities may have changed.
        caps = Some(raw_command(&mut client, cfg, "CAPABILITY", "CAPABILITY").await?);
    }
    let caps = match caps {
        Some(c) => c,
        None => raw_command(&mut client, cfg, "CAPABILITY", "CAPABILITY").await?,
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
        match raw_command(&mut client, cfg, &id, "ID").await {
            Ok(_) => {}
            Err(e @ (UpstreamError::No { .. } | UpstreamError::Bad { .. })) => {
                debug!(error = %e, "upstream did not take ID")
            }
            Err(e) => return Err(e),
        }
    }

    match credentials {
        Credentials::Password { user, pass } => {
            password_login(&mut client, cfg, &caps, user, pass).await?
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
            authenticate(&mut client, cfg, mechanism, initial, sasl_ir).await?
        }
    }
    Ok(client)
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

/// Runs a command before login, where async-imap offers no checked command
/// loop: writes it with our own tag and reads to the tagged reply.
/// Returns the capabilities seen (from a CAPABILITY response or code).
pub(super) async fn raw_command(
    client: &mut Client<Stream>,
    cfg: &ImapConfig,
    cmd: &str,
    what: &'static str,
) -> Result<Caps, UpstreamError> {
    use tokio::io::AsyncWriteExt as _;
    const TAG: &str = "pb0";
    let line = format!("{TAG} {cmd}\r\n");
    timeout(cfg.command_timeout, async {
        let w = client.get_mut();
        w.write_all(line.as_bytes()).await?;
        w.flush().await
    })
    .await
    .map_err(|_| UpstreamError::Timeout(what))??;
    let mut caps = Caps::default();
    loop {
        let resp = timeout(cfg.command_timeout, async { read_bounded!(client) })
            .await
            .map_err(|_| UpstreamError::Timeout(what))?
            .map_err(UpstreamError::Io)?
            .ok_or(UpstreamError::ConnectionLost)?;
        match resp.parsed() {
            Response::Capabilities(c) => caps = Caps::from(c),
            Response::Done {
                tag,
                status,
                outcome,
            } if tag.0 == TAG => {
                if let Some(ResponseCode::Capabilities(c)) = &outcome.code {
                    caps = Caps::from(c);
                }
                let text = outcome_text(&outcome.code, &outcome.information);
                return match status {
                    Status::Ok => Ok(caps),
                    Status::No => Err(UpstreamError::No {
                        command: what,
                        text,
                    }),
                    _ => Err(UpstreamError::Bad {
                        command: what,
                        text,
                    }),
                };
            }
            Response::Data {
                status: Status::Bye,
                outcome,
            } => {
                return Err(UpstreamError::Greeting(format!(
                    "BYE {}",
                    outcome.information.as_deref().unwrap_or("")
                )))
            }
            _ => {}
        }
    }
}
