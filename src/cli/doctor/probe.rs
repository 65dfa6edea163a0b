//! The pre-login probe: TCP, TLS (and the certificate read again when it
//! does not verify), the greeting, STARTTLS and CAPABILITY, through the
//! proxy's own framer and parser.

use super::*;

/// What one connection showed, up to CAPABILITY before login.
#[derive(Debug, Default)]
pub(super) struct Probe {
    pub(super) greeting: Option<String>,
    /// CAPABILITY on the plain connection (STARTTLS and none).
    pub(super) plain_caps: Option<Vec<String>>,
    pub(super) tls: Option<TlsFacts>,
    /// CAPABILITY popbridge logs in with (after TLS when there is TLS).
    pub(super) caps: Option<Vec<String>>,
}

#[derive(Debug)]
pub(super) struct TlsFacts {
    pub(super) version: String,
    pub(super) cipher: String,
    /// DER certificates as presented, leaf first.
    pub(super) chain: Vec<Vec<u8>>,
}

#[derive(Debug)]
pub(super) enum ProbeError {
    /// The certificate did not verify (the text is rustls's).
    Certificate(String),
    /// Another TLS failure (handshake, protocol version, not TLS at all).
    Tls(String),
    NoStartTls,
    Imap(String),
}

pub(super) fn reader(stream: UpstreamStream, imap: &ImapConfig) -> ImapReader<UpstreamStream> {
    ImapReader::new(stream, Framer::new(Limits::default()), imap.command_timeout)
}

/// TCP is up: TLS as configured, the greeting, CAPABILITY, LOGOUT. With
/// `verify` false any certificate is accepted (to read a bad one).
pub(super) async fn run_probe(
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

pub(super) async fn handshake(
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
pub(super) fn accept_any_connector() -> Result<TlsConnector, ProbeError> {
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
pub(super) struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

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
pub(super) fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .trim_end()
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .take(MAX_SHOWN)
        .collect()
}

pub(super) fn imap_error(e: impl std::fmt::Display) -> ProbeError {
    ProbeError::Imap(e.to_string())
}

/// The greeting (RFC 3501 §7.1: OK, PREAUTH or BYE) and the capabilities
/// it carries, if any.
pub(super) async fn read_greeting(
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
pub(super) async fn command(
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
pub(super) async fn logout(r: &mut ImapReader<UpstreamStream>) {
    let _ = timeout(Duration::from_secs(2), command(r, "d9", "LOGOUT")).await;
}

pub(super) fn has(caps: &[String], name: &str) -> bool {
    caps.iter().any(|c| c.eq_ignore_ascii_case(name))
}

pub(super) fn auth_mechanisms(caps: &[String]) -> Vec<String> {
    caps.iter()
        .filter_map(|c| {
            c.get(..5)
                .filter(|p| p.eq_ignore_ascii_case("AUTH="))
                .map(|_| c[5..].to_string())
        })
        .collect()
}

/// The certificate's facts, parsed from DER.
pub(super) struct CertFacts {
    pub(super) subject: String,
    pub(super) issuer: String,
    pub(super) names: Vec<String>,
    pub(super) not_after_unix: i64,
}

pub(super) fn cert_facts(der: &[u8]) -> Option<CertFacts> {
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
