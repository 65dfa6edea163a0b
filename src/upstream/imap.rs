//! The IMAP upstream, over async-imap and tokio.
//!
//! async-imap's convenience calls lose errors (see `shared/ASYNC_IMAP.md`):
//! its fetch/store/expunge streams end with `Ok` on a tagged NO or BAD and on
//! a clean disconnect. So after login every command here goes through one
//! checked loop ([`ImapConn::send`] + [`ImapConn::finish`]) that reads
//! responses until *our* tagged reply and turns NO, BAD, EOF and timeouts
//! into errors. Any error that leaves a reply unread poisons the connection:
//! it is never used again.
//!
//! Every command line is written by this module with its own tags (`pb0`
//! before login, `pb1` for the login, then `pb2`...): async-imap's command
//! writer logs each line at trace level, login passwords and bearer tokens
//! included, so it only parses responses here. The login exchanges
//! themselves (PLAIN, XOAUTH2, OAUTHBEARER) are in [`super::sasl`].

use std::borrow::Cow;
use std::time::Duration;

use async_imap::imap_proto::{
    AttributeValue, Capability, MailboxDatum, RequestId, Response, ResponseCode, Status,
};
use async_imap::Client;

use tokio::io::BufWriter;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tracing::{debug, info_span, warn, Instrument};

use super::cache::{self, Listing, ListingCache, ListingKey, Plan};
use super::sasl::{self, Failure, Mechanism, ServerStep};
use super::{BodySink, CommitReport, Connector, Credentials, FetchEnd, Flow, Snapshot, Upstream};
use crate::bridge::policy::DeleteAction;
use crate::error::UpstreamError;
use crate::metrics::metrics;
use crate::oauth::SaslMechanism;
use crate::pop3::command::Secret;
use crate::stream::MaybeTls;

/// Octets asked for per `BODY.PEEK[]<offset.length>` when streaming RETR.
/// async-imap buffers each response whole, so this bounds per-session memory
/// (with [`RETR_WINDOW`] chunks in flight) however large the message.
pub const RETR_CHUNK: u64 = 256 * 1024;

/// Chunk requests kept in flight during RETR, so the next chunk is on its way
/// while the current one is written to the client.
pub const RETR_WINDOW: usize = 2;

/// Octets of the first request for TOP, which usually needs only the header
/// and a few lines: `TOP n 0` of a 30 MB message costs one small fetch.
pub const TOP_CHUNK: u64 = 32 * 1024;

/// Octets the server may send for one response before the session is
/// dropped. async-imap buffers each response whole and would grow its buffer
/// to 512 MiB (imap_stream.rs `MAX_CAPACITY`); our own requests stay far
/// below this: body chunks of [`RETR_CHUNK`], a header per FETCH response,
/// a SEARCH of a maildrop of a million messages (about 8 MiB).
pub const MAX_RESPONSE: u64 = 32 * 1024 * 1024;

/// Our commands are short; the write buffer only has to hold one.
const UPSTREAM_WRITE_BUFFER: usize = 4 * 1024;

/// RFC 7162 §4 recommends clients keep command lines under 8192 octets; UID
/// sets longer than this are split over several commands.
pub const MAX_UID_SET_LEN: usize = 7900;

/// What to do at QUIT when the server lacks UIDPLUS (RFC 4315), so `UID
/// EXPUNGE` is not available and a plain `EXPUNGE` would also remove messages
/// that other clients flagged `\Deleted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoUidplus {
    /// Delete nothing and answer QUIT with `-ERR` (the default: never risks
    /// another client's mail).
    #[default]
    Refuse,
    /// Flag the messages, and run `EXPUNGE` only if no other message in the
    /// mailbox is flagged `\Deleted` at that moment. Another client could
    /// flag a message between the check and the `EXPUNGE`.
    ExpungeIfAlone,
}

/// How popbridge reaches and uses the IMAP server.
#[derive(Debug, Clone)]
pub struct ImapConfig {
    /// `host:port`.
    pub address: String,
    /// The mailbox a POP3 session sees.
    pub mailbox: String,
    pub connect_timeout: Duration,
    /// How long to wait for any single upstream response.
    pub command_timeout: Duration,
    pub no_uidplus: NoUidplus,
    /// TLS to the IMAP server.
    pub tls: UpstreamTlsSetup,
    /// Listings shared across sessions; `None` fetches every listing.
    pub cache: Option<std::sync::Arc<ListingCache>>,
    /// Send the client's address with IMAP ID before login.
    pub send_client_id: bool,
    /// Use a message's `X-UIDL:` header as its UIDL (Dovecot's
    /// `pop3_reuse_xuidl`).
    pub reuse_xuidl: bool,
}

impl ImapConfig {
    /// The settings of one configured upstream (`[upstream]` or a route),
    /// as the proxy and `popbridge migrate` both use them: TLS verified
    /// against `ca_file` or the system's roots, under `tls_name` or the
    /// address's host.
    pub fn from_upstream(
        up: &crate::config::UpstreamConfig,
        reuse_xuidl: bool,
        cache: Option<std::sync::Arc<ListingCache>>,
    ) -> Result<ImapConfig, String> {
        use crate::config::UpstreamTls;
        let tls = match up.tls {
            UpstreamTls::None => UpstreamTlsSetup::None,
            mode => {
                let ca = (!up.ca_file.is_empty()).then(|| std::path::Path::new(&up.ca_file));
                let connector = crate::tls::client_connector(ca).map_err(|e| e.to_string())?;
                let name = if up.tls_name.is_empty() {
                    host_of(&up.address).to_string()
                } else {
                    up.tls_name.clone()
                };
                let name = ServerName::try_from(name.clone())
                    .map_err(|e| format!("upstream TLS name {name:?}: {e}"))?;
                if mode == UpstreamTls::Implicit {
                    UpstreamTlsSetup::Implicit(connector, name)
                } else {
                    UpstreamTlsSetup::StartTls(connector, name)
                }
            }
        };
        Ok(ImapConfig {
            address: up.address.clone(),
            mailbox: up.mailbox.clone(),
            connect_timeout: Duration::from_secs(up.connect_timeout_secs),
            command_timeout: Duration::from_secs(up.command_timeout_secs),
            no_uidplus: up.no_uidplus,
            tls,
            cache,
            send_client_id: up.send_client_id,
            reuse_xuidl,
        })
    }
}

/// The host part of `host:port` or `[v6]:port`, without brackets.
pub fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// How the connection to the IMAP server is secured.
#[derive(Clone)]
pub enum UpstreamTlsSetup {
    /// Plaintext, chosen explicitly.
    None,
    /// TLS from the first byte (IMAPS).
    Implicit(TlsConnector, ServerName<'static>),
    /// STARTTLS (RFC 3501 §6.2.1); refused if the server does not offer it,
    /// never a silent fallback to plaintext.
    StartTls(TlsConnector, ServerName<'static>),
}

impl std::fmt::Debug for UpstreamTlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamTlsSetup::None => f.write_str("None"),
            UpstreamTlsSetup::Implicit(_, n) => write!(f, "Implicit({n:?})"),
            UpstreamTlsSetup::StartTls(_, n) => write!(f, "StartTls({n:?})"),
        }
    }
}

/// The connection to the IMAP server, plain or TLS.
pub type UpstreamStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

type Stream = BufWriter<Bounded<UpstreamStream>>;

/// A reader that refuses more than [`MAX_RESPONSE`] octets between two
/// parsed responses ([`Bounded::response_done`] resets the count), so a
/// server cannot make async-imap buffer hundreds of MiB for one response.
/// async-imap reads from the socket only when its buffer holds no whole
/// response, so the count covers the current response plus one read ahead.
#[derive(Debug)]
pub struct Bounded<S> {
    inner: S,
    read: u64,
    limit: u64,
}

impl<S> Bounded<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            read: 0,
            limit: MAX_RESPONSE,
        }
    }

    fn response_done(&mut self) {
        self.read = 0;
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Bounded<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &r {
            this.read += (buf.filled().len() - before) as u64;
            if this.read > this.limit {
                return std::task::Poll::Ready(Err(std::io::Error::other(format!(
                    "upstream response longer than {} octets",
                    this.limit
                ))));
            }
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Bounded<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Reads the next response, bounded by [`MAX_RESPONSE`] (not by time).
macro_rules! read_bounded {
    ($client:expr) => {{
        let r = $client.read_response().await;
        $client.get_mut().get_mut().response_done();
        r
    }};
}

/// Opens IMAP sessions from an [`ImapConfig`].
#[derive(Debug, Clone)]
pub struct ImapConnector {
    config: std::sync::Arc<ImapConfig>,
}

impl ImapConnector {
    pub fn new(config: ImapConfig) -> Self {
        Self {
            config: std::sync::Arc::new(config),
        }
    }
}

impl Connector for ImapConnector {
    type Conn = ImapConn;

    async fn login(
        &self,
        credentials: Credentials<'_>,
        hide_keyword: Option<&str>,
        client: Option<std::net::SocketAddr>,
    ) -> Result<(ImapConn, Snapshot), UpstreamError> {
        let cfg = self.config.clone();
        let span = info_span!("upstream", op = "login", addr = %cfg.address);
        async move {
            let started = std::time::Instant::now();
            let session = open_session(&cfg, credentials, client).await?;
            let mut conn = ImapConn {
                session,
                next_tag: 1,
                config: cfg,
                uidplus: false,
                poisoned: false,
                account: credentials.user().to_string(),
                has_move: false,
                hide_keyword: hide_keyword.map(str::to_string),
            };
            let r = conn.select_and_snapshot().await;
            let snapshot = conn.note(r)?;
            metrics()
                .upstream_login_seconds
                .observe(started.elapsed().as_secs_f64());
            Ok((conn, snapshot))
        }
        .instrument(span)
        .await
    }
}

/// Connects, reads the greeting and authenticates.
///
/// Everything up to and including the login is written by this module, not
/// by async-imap: its `ImapStream::encode` logs every command line at trace
/// level, and the login lines carry passwords and bearer tokens. async-imap
/// only parses the server's responses here.
async fn open_session(
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
            let mechanism = Mechanism::from(sasl.mechanism);
            let offered = match sasl.mechanism {
                SaslMechanism::XOauth2 => caps.auth_xoauth2,
                SaslMechanism::OauthBearer => caps.auth_oauthbearer,
            };
            if !offered {
                return Err(UpstreamError::Unsupported(format!(
                    "the IMAP server does not offer AUTH={} (check the route's oauth_provider)",
                    mechanism.name()
                )));
            }
            let initial = match sasl.mechanism {
                SaslMechanism::XOauth2 => sasl::xoauth2_response(account, token.expose()),
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

/// The next response during login, with timeout and EOF as errors. A
/// macro, because async-imap's response type cannot be named.
macro_rules! login_response {
    ($client:expr, $cfg:expr, $what:expr) => {
        match timeout($cfg.command_timeout, async { read_bounded!($client) }).await {
            Err(_) => Err(UpstreamError::Timeout($what)),
            Ok(Err(e)) => Err(UpstreamError::Io(e)),
            Ok(Ok(None)) => Err(UpstreamError::ConnectionLost),
            Ok(Ok(Some(r))) => Ok(r),
        }
    };
}

/// Logs in with the POP3 client's password.
async fn password_login(
    client: &mut Client<Stream>,
    cfg: &ImapConfig,
    caps: &Caps,
    user: &str,
    pass: &Secret,
) -> Result<(), UpstreamError> {
    // Prefer AUTHENTICATE PLAIN: base64 carries any octet except NUL (which
    // the POP3 side already refused), so quotes, backslashes, braces and
    // non-ASCII reach the server intact and never as IMAP syntax.
    if caps.auth_plain {
        let initial = sasl::plain_response(user, pass.expose());
        return authenticate(client, cfg, Mechanism::Plain, initial, caps.sasl_ir).await;
    }
    if caps.login_disabled {
        return Err(UpstreamError::Unsupported(
            "the IMAP server refuses LOGIN (LOGINDISABLED) and offers no AUTH=PLAIN".into(),
        ));
    }
    // LOGIN sends each as a quoted string when it is 7-bit, otherwise as a
    // synchronizing literal (RFC 3501 §4.3: a quoted string holds 7-bit
    // characters only; a literal any octet but NUL). CR, LF and NUL are
    // refused either way: they never reach the server.
    let (Some(user_arg), Some(pass_arg)) = (login_arg(user.as_bytes()), login_arg(pass.expose()))
    else {
        return Err(UpstreamError::AuthFailed(
            "user name or password holds CR, LF or NUL".into(),
        ));
    };
    let mut line = format!("{AUTH_TAG} LOGIN ").into_bytes();
    for (i, arg) in [user_arg, pass_arg].into_iter().enumerate() {
        if i > 0 {
            line.push(b' ');
        }
        match arg {
            LoginArg::Quoted(q) => line.extend_from_slice(q.as_bytes()),
            LoginArg::Literal(bytes) => {
                line.extend_from_slice(format!("{{{}}}\r\n", bytes.len()).as_bytes());
                write_secret(client, cfg, &line, "LOGIN").await?;
                // RFC 3501 §7.5: the literal's octets go only after the
                // server's `+`; a tagged reply instead ends the command.
                loop {
                    let resp = login_response!(client, cfg, "LOGIN")?;
                    match resp.parsed() {
                        Response::Continue { .. } => break,
                        Response::Done {
                            tag,
                            status,
                            outcome,
                        } if tag.0 == AUTH_TAG => {
                            let text = outcome_text(&outcome.code, &outcome.information);
                            return Err(match login_status(status, text) {
                                Ok(()) => UpstreamError::Protocol(
                                    "LOGIN answered OK before its arguments were sent".into(),
                                ),
                                Err(e) => e,
                            });
                        }
                        Response::Data {
                            status: Status::Bye,
                            outcome,
                        } => return Err(login_bye(outcome.information.as_deref())),
                        _ => {}
                    }
                }
                line = bytes.to_vec();
            }
        }
    }
    line.extend_from_slice(b"\r\n");
    write_secret(client, cfg, &line, "LOGIN").await?;
    drop(line);
    loop {
        let resp = login_response!(client, cfg, "LOGIN")?;
        match resp.parsed() {
            Response::Done {
                tag,
                status,
                outcome,
            } if tag.0 == AUTH_TAG => {
                let text = outcome_text(&outcome.code, &outcome.information);
                return login_status(status, text);
            }
            Response::Data {
                status: Status::Bye,
                outcome,
            } => return Err(login_bye(outcome.information.as_deref())),
            _ => {}
        }
    }
}

/// A LOGIN argument (RFC 3501 §4.3): quoted when 7-bit, else a literal.
enum LoginArg<'a> {
    Quoted(String),
    Literal(&'a [u8]),
}

/// `None` when `value` holds CR, LF or NUL.
fn login_arg(value: &[u8]) -> Option<LoginArg<'_>> {
    if value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        return None;
    }
    match std::str::from_utf8(value) {
        Ok(s) if s.is_ascii() => quote(s).map(LoginArg::Quoted),
        _ => Some(LoginArg::Literal(value)),
    }
}

/// What LOGIN's tagged reply means.
fn login_status(status: &Status, text: String) -> Result<(), UpstreamError> {
    match status {
        Status::Ok => Ok(()),
        Status::No if sasl::is_temporary(&text) => Err(UpstreamError::No {
            command: "LOGIN",
            text,
        }),
        Status::No => Err(UpstreamError::AuthFailed(text)),
        _ => Err(UpstreamError::AuthFailed(format!("BAD {text}"))),
    }
}

/// An untagged BYE while logging in: the server's refusal, throttling
/// included, rather than an anonymous lost connection.
fn login_bye(text: Option<&str>) -> UpstreamError {
    let text = text.unwrap_or("");
    if sasl::is_throttled(text) {
        UpstreamError::Throttled(format!("BYE {text}"))
    } else {
        UpstreamError::Greeting(format!("BYE {text}"))
    }
}

/// The tag of the login command (LOGIN or AUTHENTICATE).
const AUTH_TAG: &str = "pb1";

/// An IMAP quoted string (RFC 3501 §4.3): `\` and `"` escaped; `None` if
/// the text holds CR, LF or NUL, which a quoted string cannot carry.
fn quote(s: &str) -> Option<String> {
    if s.contains(['\r', '\n', '\0']) {
        return None;
    }
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    Some(q)
}

/// Writes a line that carries a credential, flushed, under the command
/// timeout. Never logged.
async fn write_secret(
    client: &mut Client<Stream>,
    cfg: &ImapConfig,
    line: &[u8],
    what: &'static str,
) -> Result<(), UpstreamError> {
    use tokio::io::AsyncWriteExt as _;
    timeout(cfg.command_timeout, async {
        let w = client.get_mut();
        w.write_all(line).await?;
        w.flush().await
    })
    .await
    .map_err(|_| UpstreamError::Timeout(what))??;
    Ok(())
}

/// Drives one AUTHENTICATE exchange ([`sasl::Exchange`]) to its tagged
/// reply, writing every line itself.
async fn authenticate(
    client: &mut Client<Stream>,
    cfg: &ImapConfig,
    mechanism: Mechanism,
    initial: sasl::SecretBytes,
    sasl_ir: bool,
) -> Result<(), UpstreamError> {
    let mut exchange = sasl::Exchange::new(mechanism, initial);
    let command = match exchange.start(sasl_ir) {
        sasl::Write::Command(c) | sasl::Write::Line(c) => c,
    };
    let mut line = Vec::with_capacity(command.expose().len() + 8);
    line.extend_from_slice(AUTH_TAG.as_bytes());
    line.push(b' ');
    line.extend_from_slice(command.expose());
    line.extend_from_slice(b"\r\n");
    write_secret(client, cfg, &line, "AUTHENTICATE").await?;
    loop {
        let resp = login_response!(client, cfg, "AUTHENTICATE")?;
        let next = match resp.parsed() {
            Response::Continue(outcome) => exchange.step(ServerStep::Continue(
                outcome.information.as_deref().unwrap_or(""),
            )),
            Response::Done {
                tag,
                status,
                outcome,
            } if tag.0 == AUTH_TAG => {
                let text = outcome_text(&outcome.code, &outcome.information);
                exchange.step(ServerStep::Done {
                    ok: matches!(status, Status::Ok),
                    bad: matches!(status, Status::Bad),
                    text: &text,
                })
            }
            Response::Data {
                status: Status::Bye,
                outcome,
            } => {
                let text = outcome.information.as_deref().unwrap_or("").to_string();
                return Err(if sasl::is_throttled(&text) {
                    UpstreamError::Throttled(format!("BYE {text}"))
                } else {
                    UpstreamError::Greeting(format!("BYE {text}"))
                });
            }
            _ => continue,
        };
        match next {
            sasl::Next::Write(sasl::Write::Line(l) | sasl::Write::Command(l)) => {
                let mut line = Vec::with_capacity(l.expose().len() + 2);
                line.extend_from_slice(l.expose());
                line.extend_from_slice(b"\r\n");
                write_secret(client, cfg, &line, "AUTHENTICATE").await?;
            }
            sasl::Next::Authenticated => return Ok(()),
            sasl::Next::Failed(f) => {
                return Err(match f {
                    Failure::TokenRejected { status, text } => {
                        UpstreamError::TokenRejected { status, text }
                    }
                    Failure::Throttled(text) => UpstreamError::Throttled(text),
                    Failure::Temporary(text) => UpstreamError::No {
                        command: "AUTHENTICATE",
                        text,
                    },
                    Failure::Refused(text) => UpstreamError::AuthFailed(text),
                })
            }
        }
    }
}

/// Host and port of a `host:port` address (`[v6]:port` too), for the
/// OAUTHBEARER `host` and `port` keys.
fn host_port(address: &str) -> (&str, u16) {
    let (host, port) = address.rsplit_once(':').unwrap_or((address, "0"));
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, port.parse().unwrap_or(0))
}

/// What the server announced before login.
#[derive(Debug, Clone, Copy, Default)]
struct Caps {
    auth_plain: bool,
    auth_xoauth2: bool,
    auth_oauthbearer: bool,
    /// RFC 4959: the initial response may go with AUTHENTICATE.
    sasl_ir: bool,
    login_disabled: bool,
    starttls: bool,
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
async fn raw_command(
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

/// An authenticated IMAP session with the POP3 mailbox selected.
pub struct ImapConn {
    /// async-imap parses responses; commands are written by
    /// [`ImapConn::send`] with our own tags.
    session: Client<Stream>,
    /// The number in the next command's tag (`pbN`; `pb0` and `pb1` are
    /// used before login).
    next_tag: u32,
    config: std::sync::Arc<ImapConfig>,
    /// The server offers UIDPLUS (RFC 4315): `UID EXPUNGE` is safe.
    uidplus: bool,
    /// Set after an error that may have left a reply unread.
    poisoned: bool,
    /// The account that logged in: part of the listing cache's key.
    account: String,
    /// The server offers MOVE (RFC 6851).
    has_move: bool,
    /// Messages carrying this keyword are left out of the snapshot (the
    /// `flag` and `per-device` delete policies).
    hide_keyword: Option<String>,
}

impl std::fmt::Debug for ImapConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImapConn")
            .field("address", &self.config.address)
            .field("uidplus", &self.uidplus)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

/// Reads the next response, turning timeout and EOF into errors. A macro,
/// because async-imap's response type cannot be named in a signature.
macro_rules! next_response {
    ($conn:expr, $what:expr) => {
        match timeout($conn.config.command_timeout, async {
            read_bounded!($conn.session)
        })
        .await
        {
            Err(_) => Err(UpstreamError::Timeout($what)),
            Ok(Err(e)) => Err(UpstreamError::Io(e)),
            Ok(Ok(None)) => Err(UpstreamError::ConnectionLost),
            Ok(Ok(Some(r))) => Ok(r),
        }
    };
}

/// The text of a tagged reply: code (when imap-proto knows it) and text.
fn outcome_text(code: &Option<ResponseCode<'_>>, info: &Option<Cow<'_, str>>) -> String {
    let info = info.as_deref().unwrap_or("");
    match code {
        // Codes imap-proto does not know (AUTHENTICATIONFAILED, EXPUNGEISSUED,
        // UNAVAILABLE...) stay in the text as the server wrote them.
        Some(c) => format!("[{c:?}] {info}"),
        None => info.to_string(),
    }
}

impl ImapConn {
    /// Refuses to use a connection that an earlier error left out of step.
    fn ensure_usable(&self) -> Result<(), UpstreamError> {
        if self.poisoned {
            Err(UpstreamError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Poisons the connection after an error that may leave a reply unread.
    fn note<T>(&mut self, r: Result<T, UpstreamError>) -> Result<T, UpstreamError> {
        if let Err(e) = &r {
            if e.is_fatal() {
                self.poisoned = true;
            }
        }
        r
    }

    /// Sends a tagged command (tags `pb2`, `pb3`...).
    async fn send(&mut self, cmd: &str, what: &'static str) -> Result<RequestId, UpstreamError> {
        use tokio::io::AsyncWriteExt as _;
        self.next_tag += 1;
        let tag = format!("pb{}", self.next_tag);
        let line = format!("{tag} {cmd}\r\n");
        let w = self.session.get_mut();
        timeout(self.config.command_timeout, async {
            w.write_all(line.as_bytes()).await?;
            w.flush().await
        })
        .await
        .map_err(|_| UpstreamError::Timeout(what))??;
        Ok(RequestId(tag))
    }

    /// Reads until the tagged reply to `tag`, handing every other response
    /// to `each`. NO and BAD become errors; the connection stays usable.
    async fn finish(
        &mut self,
        tag: &RequestId,
        what: &'static str,
        mut each: impl FnMut(&Response<'_>),
    ) -> Result<String, UpstreamError> {
        loop {
            let resp = next_response!(self, what)?;
            match resp.parsed() {
                Response::Done {
                    tag: t,
                    status,
                    outcome,
                } if t == tag => {
                    let text = outcome_text(&outcome.code, &outcome.information);
                    return match status {
                        Status::Ok => Ok(text),
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
                Response::Done { tag: t, .. } => {
                    return Err(UpstreamError::Protocol(format!(
                        "reply to unknown tag {}",
                        t.0
                    )));
                }
                Response::Data {
                    status: Status::Bye,
                    outcome,
                } => {
                    debug!(text = ?outcome.information, "server said BYE");
                }
                other => each(other),
            }
        }
    }

    async fn exec(
        &mut self,
        cmd: &str,
        what: &'static str,
        each: impl FnMut(&Response<'_>),
    ) -> Result<String, UpstreamError> {
        let tag = self.send(cmd, what).await?;
        self.finish(&tag, what, each).await
    }

    /// CAPABILITY (pipelined with SELECT), then the snapshot.
    async fn select_and_snapshot(&mut self) -> Result<Snapshot, UpstreamError> {
        let mailbox = quote_mailbox(&self.config.mailbox)?;
        // The capabilities may change at login, so ask again.
        let cap_tag = self.send("CAPABILITY", "CAPABILITY").await?;
        let select_tag = self.send(&format!("SELECT {mailbox}"), "SELECT").await?;
        let mut uidplus = false;
        let mut has_move = false;
        self.finish(&cap_tag, "CAPABILITY", |r| {
            if let Response::Capabilities(caps) = r {
                has_move = caps
                    .iter()
                    .any(|c| matches!(c, Capability::Atom(a) if a.eq_ignore_ascii_case("MOVE")));
                uidplus = caps
                    .iter()
                    .any(|c| matches!(c, Capability::Atom(a) if a.eq_ignore_ascii_case("UIDPLUS")));
            }
        })
        .await?;
        self.uidplus = uidplus;
        self.has_move = has_move;

        let mut exists = None;
        let mut uidvalidity = None;
        let mut uidnext = None;
        self.finish(&select_tag, "SELECT", |r| match r {
            Response::MailboxData(MailboxDatum::Exists(n)) => exists = Some(*n),
            Response::Data {
                status: Status::Ok,
                outcome,
            } => match outcome.code {
                Some(ResponseCode::UidValidity(v)) => uidvalidity = Some(v),
                Some(ResponseCode::UidNext(n)) => uidnext = Some(n),
                _ => {}
            },
            _ => {}
        })
        .await?;
        let (Some(exists), Some(uidvalidity)) = (exists, uidvalidity) else {
            return Err(UpstreamError::Protocol(
                "SELECT without EXISTS or UIDVALIDITY".into(),
            ));
        };

        let key = self.config.cache.as_ref().map(|_| ListingKey {
            upstream: self.config.address.as_str().into(),
            account: self.account.clone(),
            mailbox: self.config.mailbox.clone(),
        });
        let cached = match (&self.config.cache, &key) {
            (Some(cache), Some(key)) => cache.get(key),
            _ => None,
        };
        let want_xuidl = self.config.reuse_xuidl;
        // A listing cached without X-UIDLs cannot serve a route that wants them.
        let cached = cached.filter(|c| !want_xuidl || c.xuidl.is_some());
        let plan = cache::plan(cached.as_deref(), uidvalidity, uidnext, exists);
        let items = if want_xuidl {
            "(UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (X-UIDL)])"
        } else {
            "(UID RFC822.SIZE)"
        };
        let mut xuidl = std::collections::HashMap::new();
        let messages = match (&plan, &cached) {
            (Plan::Reuse, Some(c)) => {
                if let Some(x) = &c.xuidl {
                    xuidl = (**x).clone();
                }
                Some(c.messages.to_vec())
            }
            (Plan::FetchFrom(from), Some(c)) => {
                let (new, new_x) = self.list(&format!("UID FETCH {from}:* {items}")).await?;
                let merged = cache::merge(c, new, exists);
                if merged.is_some() {
                    if let Some(x) = &c.xuidl {
                        xuidl = (**x).clone();
                    }
                    xuidl.extend(new_x);
                }
                merged
            }
            _ => None,
        };
        // How the listing was obtained, for the log: "cached", "new only",
        // "full" (a FetchFrom whose count did not add up ends as "full").
        let mut listing = if plan == Plan::Reuse {
            "cached"
        } else {
            "new only"
        };
        let messages = match messages {
            Some(m) => {
                let counters = metrics();
                if plan == Plan::Reuse {
                    counters.cache_hits.inc();
                } else {
                    counters.cache_partial.inc();
                }
                m
            }
            // `FETCH 1:*` on an empty mailbox is a BAD in Dovecot: skip it.
            None if exists == 0 => {
                listing = "empty";
                Vec::new()
            }
            None => {
                listing = "full";
                if self.config.cache.is_some() {
                    metrics().cache_misses.inc();
                }
                let (mut m, x) = self.list(&format!("UID FETCH 1:* {items}")).await?;
                xuidl = x;
                m.sort_unstable_by_key(|x| x.0);
                m.dedup_by_key(|x| x.0);
                m
            }
        };
        if let (Some(cache), Some(key)) = (&self.config.cache, key) {
            let listing = Listing {
                uidvalidity,
                uidnext: cache::next_uid(uidnext, &messages),
                messages: std::sync::Arc::new(messages.clone()),
                xuidl: want_xuidl.then(|| std::sync::Arc::new(xuidl.clone())),
            };
            if cached.as_deref() != Some(&listing) {
                cache.insert(key, listing);
            }
        }
        // Hidden messages stay in the cached listing (it describes the
        // mailbox); flags change, so they are asked for at every login.
        let mut messages = messages;
        if let Some(keyword) = self.hide_keyword.clone() {
            if !messages.is_empty() {
                let mut hidden = Vec::new();
                self.exec(
                    &format!("UID SEARCH KEYWORD {keyword}"),
                    "UID SEARCH",
                    |r| {
                        if let Response::MailboxData(MailboxDatum::Search(v)) = r {
                            hidden.extend_from_slice(v);
                        }
                    },
                )
                .await?;
                hidden.sort_unstable();
                messages.retain(|m| hidden.binary_search(&m.0).is_err());
            }
        }
        debug!(
            exists,
            uidvalidity,
            listed = messages.len(),
            uidplus,
            listing,
            "snapshot taken"
        );
        Ok(Snapshot {
            uidvalidity,
            messages,
            xuidl,
        })
    }

    /// Runs a `UID FETCH ... (UID RFC822.SIZE [X-UIDL header])` and
    /// collects (UID, size) and any valid X-UIDL values.
    async fn list(
        &mut self,
        cmd: &str,
    ) -> Result<(Vec<(u32, u64)>, std::collections::HashMap<u32, String>), UpstreamError> {
        let mut messages = Vec::new();
        let mut xuidl = std::collections::HashMap::new();
        self.exec(cmd, "UID FETCH", |r| {
            if let Response::Fetch(_, attrs) = r {
                let mut uid = None;
                let mut size = None;
                let mut header = None;
                for a in attrs {
                    match a {
                        AttributeValue::Uid(u) => uid = Some(*u),
                        AttributeValue::Rfc822Size(s) => size = Some(u64::from(*s)),
                        AttributeValue::BodySection { data: Some(d), .. } => header = x_uidl(d),
                        _ => {}
                    }
                }
                // Unsolicited FETCH (flag changes) carry no size: skip them.
                if let (Some(u), Some(s)) = (uid, size) {
                    messages.push((u, s));
                    if let Some(h) = header {
                        xuidl.insert(u, h);
                    }
                }
            }
        })
        .await?;
        Ok((messages, xuidl))
    }

    async fn fetch_inner<S: BodySink>(
        &mut self,
        uid: u32,
        size: u64,
        prefix_only: bool,
        sink: &mut S,
    ) -> Result<FetchEnd, UpstreamError> {
        // TOP starts small and one request at a time (the header is usually
        // in the first chunk), then grows to RETR's pace, since clients such
        // as fetchmail download whole messages with `TOP n 99999999`.
        let mut chunk = if prefix_only { TOP_CHUNK } else { RETR_CHUNK };
        // Ask for one octet more than the snapshot's size, so a message that
        // is longer than announced is noticed rather than cut short.
        let end = size + 1;
        let mut next_offset = 0u64;
        // Requests sent and not yet answered: (tag, offset, length, data seen).
        let mut in_flight: Vec<(RequestId, u64, u64, bool)> = Vec::new();
        // Dovecot answers pipelined FETCHes out of order: chunks that arrive
        // early wait here (at most `window - 1` of them).
        let mut early: std::collections::BTreeMap<u64, Vec<u8>> = Default::default();
        let mut delivered = 0u64;
        let mut stopped = false;
        let mut failure: Option<UpstreamError> = None;
        let mut gone = false;

        loop {
            let window = if prefix_only && delivered == 0 {
                1
            } else {
                RETR_WINDOW
            };
            while failure.is_none()
                && !stopped
                && !gone
                && in_flight.len() < window
                && next_offset < end
            {
                let len = chunk.min(end - next_offset);
                chunk = (chunk * 2).min(RETR_CHUNK);
                let cmd = format!("UID FETCH {uid} (UID BODY.PEEK[]<{next_offset}.{len}>)");
                let tag = self.send(&cmd, "UID FETCH").await?;
                in_flight.push((tag, next_offset, len, false));
                next_offset += len;
            }
            if in_flight.is_empty() {
                break;
            }
            let resp = next_response!(self, "UID FETCH")?;
            match resp.parsed() {
                Response::Done {
                    tag,
                    status,
                    outcome,
                } => {
                    let Some(i) = in_flight.iter().position(|f| f.0 == *tag) else {
                        return Err(UpstreamError::Protocol(format!(
                            "reply to unknown tag {}",
                            tag.0
                        )));
                    };
                    let (_, _, _, seen) = in_flight.remove(i);
                    let text = outcome_text(&outcome.code, &outcome.information);
                    if text.contains("EXPUNGEISSUED") {
                        gone = true;
                    }
                    match status {
                        Status::Ok if !seen => gone = true, // no item for our UID
                        Status::Ok => {}
                        Status::No => {
                            failure.get_or_insert(UpstreamError::No {
                                command: "UID FETCH",
                                text,
                            });
                        }
                        _ => {
                            failure.get_or_insert(UpstreamError::Bad {
                                command: "UID FETCH",
                                text,
                            });
                        }
                    }
                }
                Response::Fetch(_, attrs)
                    if attrs
                        .iter()
                        .any(|a| matches!(a, AttributeValue::Uid(u) if *u == uid)) =>
                {
                    for a in attrs {
                        let AttributeValue::BodySection { data, index, .. } = a else {
                            continue;
                        };
                        let offset = index.map(u64::from).unwrap_or(0);
                        let Some(req) = in_flight.iter_mut().find(|f| f.1 == offset && !f.3) else {
                            failure.get_or_insert(UpstreamError::Protocol(format!(
                                "unrequested body offset {offset}"
                            )));
                            continue;
                        };
                        req.3 = true;
                        let len = req.2;
                        let Some(data) = data else {
                            // `BODY[] NIL`: Dovecot's answer for a message
                            // expunged by another session.
                            gone = true;
                            continue;
                        };
                        let n = data.len() as u64;
                        if offset + n > size || (n < len && offset + n < size) {
                            // Longer than RFC822.SIZE, or shorter.
                            failure.get_or_insert(UpstreamError::SizeMismatch {
                                uid,
                                expected: size,
                                got: offset + n,
                            });
                            continue;
                        }
                        if failure.is_some() || stopped || gone {
                            continue;
                        }
                        if offset != delivered {
                            early.insert(offset, data.to_vec());
                            continue;
                        }
                        let mut flow = sink.chunk(data).await;
                        delivered += n;
                        while let (Ok(Flow::Continue), Some(next)) =
                            (&flow, early.remove(&delivered))
                        {
                            flow = sink.chunk(&next).await;
                            delivered += next.len() as u64;
                        }
                        match flow {
                            Ok(Flow::Continue) => {}
                            Ok(Flow::Stop) => stopped = true,
                            // The client is gone; finish reading so the
                            // connection stays in step, then fail.
                            Err(e) => {
                                failure.get_or_insert(UpstreamError::Io(e));
                            }
                        }
                    }
                }
                Response::Data {
                    status: Status::Bye,
                    outcome,
                } => {
                    debug!(text = ?outcome.information, "server said BYE");
                }
                _ => {}
            }
        }
        if gone && failure.is_none() && delivered > 0 && !stopped {
            failure = Some(UpstreamError::VanishedMidStream { uid });
        }
        if let Some(f) = failure {
            return Err(f);
        }
        if gone && !stopped {
            return Ok(FetchEnd::Gone);
        }
        if !stopped && delivered != size {
            return Err(UpstreamError::SizeMismatch {
                uid,
                expected: size,
                got: delivered,
            });
        }
        Ok(FetchEnd::Complete)
    }

    async fn commit_inner(
        &mut self,
        delete: &[u32],
        seen: &[u32],
        action: &DeleteAction,
    ) -> Result<CommitReport, UpstreamError> {
        self.store(seen, "+FLAGS.SILENT", "\\Seen").await?;
        if delete.is_empty() {
            return Ok(CommitReport::default());
        }
        match action {
            DeleteAction::Expunge => {}
            DeleteAction::Keep => {
                return Ok(CommitReport {
                    summary: Some(format!(
                        "{} kept on the server as configured.",
                        messages(delete.len())
                    )),
                    ..CommitReport::default()
                })
            }
            DeleteAction::Keyword(keyword) => {
                self.store(delete, "+FLAGS.SILENT", keyword).await?;
                return Ok(CommitReport {
                    summary: Some(format!(
                        "{} hidden from POP3, kept on the server.",
                        messages(delete.len())
                    )),
                    ..CommitReport::default()
                });
            }
            DeleteAction::Move { mailbox, create } => {
                return self.move_to(delete, mailbox, *create).await
            }
        }
        if !self.uidplus {
            match self.config.no_uidplus {
                NoUidplus::Refuse => {
                    return Ok(CommitReport {
                        not_removed: delete.to_vec(),
                        reason: Some(
                            "Mail server lacks UIDPLUS; nothing was deleted (see no_uidplus)."
                                .into(),
                        ),
                        summary: None,
                    });
                }
                NoUidplus::ExpungeIfAlone => return self.expunge_if_alone(delete).await,
            }
        }
        self.expunge_exactly(delete).await?;
        self.verify_removed(delete, None).await
    }

    /// Flags `uids` `\Deleted` and removes exactly them with `UID EXPUNGE`
    /// (RFC 4315 §2.1: others flagged `\Deleted` stay). When the server
    /// refuses a step (NO/BAD, the connection still in step), our
    /// `\Deleted` is taken back before the error is returned: QUIT answers
    /// -ERR, and another client's EXPUNGE must not remove these messages
    /// later. (A message another client had flagged `\Deleted` loses the
    /// flag too; that keeps mail, never loses it.)
    async fn expunge_exactly(&mut self, uids: &[u32]) -> Result<(), UpstreamError> {
        let r = async {
            self.store(uids, "+FLAGS.SILENT", "\\Deleted").await?;
            for set in uid_sets(uids) {
                self.exec(&format!("UID EXPUNGE {set}"), "UID EXPUNGE", |_| {})
                    .await?;
            }
            Ok::<(), UpstreamError>(())
        }
        .await;
        if let Err(e) = &r {
            if !e.is_fatal() {
                if let Err(undo) = self.store(uids, "-FLAGS.SILENT", "\\Deleted").await {
                    warn!(error = %undo, "could not take \\Deleted back after a failed expunge");
                    if undo.is_fatal() {
                        self.poisoned = true;
                    }
                }
            }
        }
        r
    }

    /// `UID STORE <uids> <op> (<flags>)`, split into sets of bounded length.
    async fn store(&mut self, uids: &[u32], op: &str, flags: &str) -> Result<(), UpstreamError> {
        for set in uid_sets(uids) {
            self.exec(
                &format!("UID STORE {set} {op} ({flags})"),
                "UID STORE",
                |_| {},
            )
            .await?;
        }
        Ok(())
    }

    /// The `move` policy: `UID MOVE` (RFC 6851) where offered, otherwise
    /// `UID COPY`, `\Deleted` and `UID EXPUNGE` of exactly these UIDs (which
    /// needs UIDPLUS; never a plain EXPUNGE). A missing target is created
    /// when allowed, otherwise nothing is moved and QUIT answers -ERR.
    async fn move_to(
        &mut self,
        uids: &[u32],
        mailbox: &str,
        create: bool,
    ) -> Result<CommitReport, UpstreamError> {
        let target = quote_mailbox(mailbox)?;
        let refuse = |why: String| CommitReport {
            not_removed: uids.to_vec(),
            reason: Some(why),
            summary: None,
        };
        if !self.has_move && !self.uidplus {
            return Ok(refuse(
                "Mail server offers neither MOVE nor UIDPLUS; nothing was moved.".into(),
            ));
        }
        let verb = if self.has_move {
            "UID MOVE"
        } else {
            "UID COPY"
        };
        let sets = uid_sets(uids);
        let mut created = false;
        let mut i = 0;
        while i < sets.len() {
            match self
                .exec(&format!("{verb} {} {target}", sets[i]), verb, |_| {})
                .await
            {
                Ok(_) => i += 1,
                Err(UpstreamError::No { text, .. })
                    if text.to_ascii_uppercase().contains("TRYCREATE") =>
                {
                    if !create || created {
                        return Ok(refuse(format!(
                            "Mailbox {mailbox:?} does not exist; nothing was moved."
                        )));
                    }
                    self.exec(&format!("CREATE {target}"), "CREATE", |_| {})
                        .await?;
                    created = true;
                }
                Err(e) => return Err(e),
            }
        }
        if !self.has_move {
            self.expunge_exactly(uids).await?;
        }
        let mut report = self.verify_removed(uids, None).await?;
        if report.not_removed.is_empty() {
            report.summary = Some(format!("{} moved to {mailbox}.", messages(uids.len())));
        }
        Ok(report)
    }

    /// UIDs flagged `\Deleted` that are not ours. NOOP first: a server
    /// answers SEARCH from the session's last view of the mailbox, which
    /// lacks flags other sessions set since (measured on Dovecot: another
    /// session's `\Deleted` was invisible to SEARCH until a NOOP).
    async fn others_deleted(&mut self, ours: &[u32]) -> Result<Vec<u32>, UpstreamError> {
        self.exec("NOOP", "NOOP", |_| {}).await?;
        let mut others = Vec::new();
        self.exec("UID SEARCH DELETED", "UID SEARCH", |r| {
            if let Response::MailboxData(MailboxDatum::Search(v)) = r {
                others.extend(v.iter().copied().filter(|u| ours.binary_search(u).is_err()));
            }
        })
        .await?;
        Ok(others)
    }

    /// Without UIDPLUS: EXPUNGE only when no other message is flagged
    /// `\Deleted`, checked before and again after flagging ours. Between
    /// the last check and the EXPUNGE another client could still flag one.
    async fn expunge_if_alone(&mut self, delete: &[u32]) -> Result<CommitReport, UpstreamError> {
        let refused = || {
            CommitReport {
            summary: None,
            not_removed: delete.to_vec(),
            reason: Some("Other messages are flagged \\Deleted and the mail server lacks UIDPLUS; nothing was deleted.".into()),
        }
        };
        if !self.others_deleted(delete).await?.is_empty() {
            return Ok(refused());
        }
        self.store(delete, "+FLAGS.SILENT", "\\Deleted").await?;
        if !self.others_deleted(delete).await?.is_empty() {
            self.store(delete, "-FLAGS.SILENT", "\\Deleted").await?;
            return Ok(refused());
        }
        self.exec("EXPUNGE", "EXPUNGE", |_| {}).await?;
        self.verify_removed(delete, None).await
    }

    /// Checks that none of `delete` still exists.
    async fn verify_removed(
        &mut self,
        delete: &[u32],
        reason: Option<String>,
    ) -> Result<CommitReport, UpstreamError> {
        let mut left = Vec::new();
        for set in uid_sets(delete) {
            self.exec(&format!("UID SEARCH UID {set}"), "UID SEARCH", |r| {
                if let Response::MailboxData(MailboxDatum::Search(v)) = r {
                    left.extend(
                        v.iter()
                            .copied()
                            .filter(|u| delete.binary_search(u).is_ok()),
                    );
                }
            })
            .await?;
        }
        left.sort_unstable();
        left.dedup();
        let reason = if left.is_empty() {
            reason
        } else {
            warn!(
                count = left.len(),
                "messages still present after UID EXPUNGE"
            );
            Some(format!("{} messages could not be deleted.", left.len()))
        };
        Ok(CommitReport {
            not_removed: left,
            reason,
            summary: None,
        })
    }
}

impl Upstream for ImapConn {
    async fn fetch<S: BodySink>(
        &mut self,
        uid: u32,
        size: u64,
        prefix_only: bool,
        sink: &mut S,
    ) -> Result<FetchEnd, UpstreamError> {
        let span = info_span!(
            "upstream",
            op = if prefix_only { "top" } else { "retr" },
            uid
        );
        async move {
            self.ensure_usable()?;
            let r = self.fetch_inner(uid, size, prefix_only, sink).await;
            self.note(r)
        }
        .instrument(span)
        .await
    }

    async fn commit(
        &mut self,
        delete: &[u32],
        seen: &[u32],
        action: &DeleteAction,
    ) -> Result<CommitReport, UpstreamError> {
        let span = info_span!(
            "upstream",
            op = "commit",
            delete = delete.len(),
            seen = seen.len()
        );
        let mut delete = delete.to_vec();
        delete.sort_unstable();
        async move {
            self.ensure_usable()?;
            let r = self.commit_inner(&delete, seen, action).await;
            self.note(r)
        }
        .instrument(span)
        .await
    }

    async fn logout(mut self) {
        if !self.poisoned {
            let _ = timeout(
                Duration::from_secs(5),
                self.exec("LOGOUT", "LOGOUT", |_| {}),
            )
            .await;
        }
    }
}

// ---------------------------------------------------------------------------
// For `popbridge migrate` (src/migrate): headers of many messages, APPEND.
// ---------------------------------------------------------------------------

impl ImapConn {
    /// `UID FETCH <uids> (UID RFC822.SIZE BODY.PEEK[HEADER])`, in sets of
    /// bounded length, calling `each(uid, size, header)` per message as it
    /// arrives (nothing is collected here).
    pub async fn for_each_header(
        &mut self,
        uids: &[u32],
        mut each: impl FnMut(u32, u64, &[u8]) + Send,
    ) -> Result<(), UpstreamError> {
        self.ensure_usable()?;
        for set in uid_sets(uids) {
            let cmd = format!("UID FETCH {set} (UID RFC822.SIZE BODY.PEEK[HEADER])");
            let r = self
                .exec(&cmd, "UID FETCH", |r| {
                    if let Response::Fetch(_, attrs) = r {
                        let (mut uid, mut size, mut header) = (None, None, None);
                        for a in attrs {
                            match a {
                                AttributeValue::Uid(u) => uid = Some(*u),
                                AttributeValue::Rfc822Size(n) => size = Some(u64::from(*n)),
                                AttributeValue::BodySection { data: Some(d), .. } => {
                                    header = Some(d.as_ref())
                                }
                                _ => {}
                            }
                        }
                        if let (Some(u), Some(n), Some(h)) = (uid, size, header) {
                            each(u, n, h);
                        }
                    }
                })
                .await;
            self.note(r)?;
        }
        Ok(())
    }

    /// APPENDs `message` to the mailbox this connection serves (RFC 3501
    /// §6.3.11), with optional flags (`(\\Seen)`) and internal date
    /// (`"01-Jan-2024 12:00:00 +0000"`), through the checked loop so a
    /// refusal keeps the server's words (`[OVERQUOTA] ...`). The literal is
    /// sent after the server's continuation; the time allowed for it grows
    /// with the size (the command timeout plus a second per MiB).
    pub async fn append(
        &mut self,
        message: &[u8],
        flags: Option<&str>,
        internal_date: Option<&str>,
    ) -> Result<(), UpstreamError> {
        self.ensure_usable()?;
        let r = self.append_inner(message, flags, internal_date).await;
        self.note(r)
    }

    async fn append_inner(
        &mut self,
        message: &[u8],
        flags: Option<&str>,
        internal_date: Option<&str>,
    ) -> Result<(), UpstreamError> {
        use tokio::io::AsyncWriteExt as _;
        let mut cmd = format!("APPEND {}", quote_mailbox(&self.config.mailbox)?);
        for extra in [flags, internal_date].into_iter().flatten() {
            cmd.push(' ');
            cmd.push_str(extra);
        }
        cmd.push_str(&format!(" {{{}}}", message.len()));
        let tag = self.send(&cmd, "APPEND").await?;
        loop {
            let resp = next_response!(self, "APPEND")?;
            match resp.parsed() {
                Response::Continue { .. } => break,
                // Refused before the literal (quota, no such mailbox): the
                // tagged reply is read, the connection stays in step.
                Response::Done {
                    tag: t,
                    status,
                    outcome,
                } if *t == tag => {
                    let text = outcome_text(&outcome.code, &outcome.information);
                    return Err(match status {
                        Status::Ok => UpstreamError::Protocol(
                            "APPEND answered OK before the message was sent".into(),
                        ),
                        Status::No => UpstreamError::No {
                            command: "APPEND",
                            text,
                        },
                        _ => UpstreamError::Bad {
                            command: "APPEND",
                            text,
                        },
                    });
                }
                _ => {}
            }
        }
        let budget =
            self.config.command_timeout + Duration::from_secs(message.len() as u64 / (1024 * 1024));
        timeout(budget, async {
            let w = self.session.get_mut();
            w.write_all(message).await?;
            w.write_all(b"\r\n").await?;
            w.flush().await
        })
        .await
        .map_err(|_| UpstreamError::Timeout("APPEND"))??;
        self.finish(&tag, "APPEND", |_| {}).await.map(|_| ())
    }
}

/// Quotes a mailbox name as an IMAP quoted string (RFC 3501 §4.3), encoding
/// non-ASCII names in modified UTF-7 (RFC 3501 §5.1.3).
fn quote_mailbox(name: &str) -> Result<String, UpstreamError> {
    if name.is_empty() || name.chars().any(|c| c == '\r' || c == '\n' || c == '\0') {
        return Err(UpstreamError::Unsupported(format!(
            "invalid mailbox name {name:?}"
        )));
    }
    // Modified UTF-7 is ASCII without CR, LF or NUL: `quote` accepts it.
    quote(&modified_utf7(name))
        .ok_or_else(|| UpstreamError::Unsupported(format!("invalid mailbox name {name:?}")))
}

/// RFC 3501 §5.1.3: printable ASCII stands for itself ("&" as "&-"); other
/// characters are UTF-16 in modified base64 between "&" and "-".
pub fn modified_utf7(name: &str) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,";
    let mut out = String::with_capacity(name.len());
    let mut pending: Vec<u16> = Vec::new();
    let flush = |pending: &mut Vec<u16>, out: &mut String| {
        if pending.is_empty() {
            return;
        }
        out.push('&');
        let bytes: Vec<u8> = pending.iter().flat_map(|u| u.to_be_bytes()).collect();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            let chars = chunk.len() + 1;
            for i in 0..chars {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out.push('-');
        pending.clear();
    };
    for c in name.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut pending, &mut out);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut buf = [0u16; 2];
            pending.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    flush(&mut pending, &mut out);
    out
}

/// The value of the first `X-UIDL:` field in `header`, if it is a usable
/// UIDL (RFC 1939 §7: 1 to 70 characters in 0x21-0x7E); otherwise the
/// message gets the template UIDL.
pub fn x_uidl(header: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(header).ok()?;
    let line = text
        .lines()
        .find(|l| l.len() > 7 && l[..7].eq_ignore_ascii_case("x-uidl:"))?;
    let value = line[7..].trim();
    let ok = !value.is_empty()
        && value.len() <= crate::pop3::uidl::MAX_UIDL_LEN
        && value.bytes().all(|b| (0x21..=0x7e).contains(&b));
    ok.then(|| value.to_string())
}

/// "1 message", "2 messages".
fn messages(n: usize) -> String {
    if n == 1 {
        "1 message".into()
    } else {
        format!("{n} messages")
    }
}

/// Compresses ascending UIDs into IMAP sequence sets ("1:3,7,9:10"), split so
/// no set exceeds [`MAX_UID_SET_LEN`].
pub fn uid_sets(uids: &[u32]) -> Vec<String> {
    let mut sorted = uids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut sets = Vec::new();
    let mut cur = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        i += 1;
        let piece = if start == end {
            start.to_string()
        } else {
            format!("{start}:{end}")
        };
        if !cur.is_empty() && cur.len() + 1 + piece.len() > MAX_UID_SET_LEN {
            sets.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(',');
        }
        cur.push_str(&piece);
    }
    if !cur.is_empty() {
        sets.push(cur);
    }
    sets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_sets_compress_and_split() {
        assert_eq!(uid_sets(&[]), Vec::<String>::new());
        assert_eq!(uid_sets(&[5, 1, 2, 3, 7, 9, 10]), vec!["1:3,5,7,9:10"]);
        let many: Vec<u32> = (0..10_000).map(|i| i * 2).collect();
        let sets = uid_sets(&many);
        assert!(sets.len() > 1);
        assert!(sets.iter().all(|s| s.len() <= MAX_UID_SET_LEN));
        let back: Vec<u32> = sets
            .iter()
            .flat_map(|s| {
                s.split(',')
                    .map(|p| p.parse::<u32>().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(back, many);
    }

    #[test]
    fn mailbox_names_are_quoted_and_utf7_encoded() {
        assert_eq!(quote_mailbox("INBOX").unwrap(), "\"INBOX\"");
        assert_eq!(
            quote_mailbox("My \"Mail\"\\x").unwrap(),
            "\"My \\\"Mail\\\"\\\\x\""
        );
        // RFC 3501 §5.1.3 example.
        assert_eq!(
            modified_utf7("~peter/mail/台北/日本語"),
            "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
        );
        assert_eq!(modified_utf7("A&B"), "A&-B");
        assert_eq!(modified_utf7("Entwürfe"), "Entw&APw-rfe");
        assert!(quote_mailbox("a\r\nb").is_err());
    }
}

/// Tests against a scripted in-process IMAP server: what popbridge writes is
/// recorded line by line, and the server answers exactly as scripted.
#[cfg(test)]
mod scripted {
    use super::*;
    use crate::pop3::command::Secret;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    /// One step of the server's script.
    pub(super) enum Step {
        /// Write these bytes.
        Send(&'static str),
        /// Write these bytes (built at run time).
        SendOwned(String),
        /// Read one line (to LF) and record it.
        Read,
        /// Read exactly this many octets (a literal) and record them.
        Literal(usize),
    }
    use Step::*;

    /// Starts a server that plays `script` on one connection; the handle
    /// gives back what was read. The server ends at the script's end or at
    /// the client's EOF.
    pub(super) async fn serve(
        script: Vec<Step>,
    ) -> (String, tokio::task::JoinHandle<Vec<Vec<u8>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handle = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let (r, mut w) = sock.into_split();
            let mut r = BufReader::new(r);
            let mut got = Vec::new();
            for step in script {
                match step {
                    Send(s) => {
                        if w.write_all(s.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                    SendOwned(s) => {
                        if w.write_all(s.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                    Read => {
                        let mut line = Vec::new();
                        if r.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                            break;
                        }
                        got.push(line);
                    }
                    Literal(n) => {
                        let mut buf = vec![0; n];
                        if r.read_exact(&mut buf).await.is_err() {
                            break;
                        }
                        got.push(buf);
                    }
                }
            }
            // Hold the connection until the client is done with it.
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest).await;
            if !rest.is_empty() {
                got.push(rest);
            }
            got
        });
        (addr, handle)
    }

    pub(super) fn config(address: String) -> ImapConfig {
        ImapConfig {
            address,
            mailbox: "INBOX".into(),
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(3),
            no_uidplus: NoUidplus::Refuse,
            tls: UpstreamTlsSetup::None,
            cache: None,
            send_client_id: false,
            reuse_xuidl: false,
        }
    }

    /// A SELECT answer for a mailbox of `exists` messages.
    pub(super) const SELECT_EMPTY: &str = "* 0 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n\
        * OK [UIDNEXT 1] n\r\npb3 OK [READ-WRITE] selected\r\n";

    pub(super) async fn login(
        addr: String,
        user: &str,
        pass: &[u8],
    ) -> Result<(ImapConn, Snapshot), UpstreamError> {
        let pass = Secret::new(pass.to_vec());
        ImapConnector::new(config(addr))
            .login(Credentials::Password { user, pass: &pass }, None, None)
            .await
    }

    fn text(lines: &[Vec<u8>]) -> Vec<String> {
        lines
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect()
    }

    /// RFC 3501 §4.3: a quoted string holds 7-bit characters only, so a
    /// non-ASCII password goes to LOGIN as a literal (§4.3, after the
    /// server's continuation, §7.5), never raw inside quotes.
    #[tokio::test]
    async fn login_sends_non_ascii_credentials_as_literals() {
        let pass = "pä\"ss\\wörd".as_bytes();
        let (addr, server) = serve(vec![
            Send("* OK [CAPABILITY IMAP4rev1] ready\r\n"),
            Read, // pb1 LOGIN "alice" {n}
            Send("+ go on\r\n"),
            Literal(pass.len()),
            Read, // CRLF ending the command
            Send("pb1 OK logged in\r\n"),
            Read, // CAPABILITY
            Read, // SELECT
            Send("* CAPABILITY IMAP4rev1 UIDPLUS\r\npb2 OK done\r\n"),
            Send(SELECT_EMPTY),
        ])
        .await;
        let r = login(addr, "alice", pass).await;
        let (conn, snap) = r.expect("login");
        assert!(snap.messages.is_empty());
        drop(conn);
        let got = server.await.unwrap();
        assert_eq!(
            got[0],
            format!("pb1 LOGIN \"alice\" {{{}}}\r\n", pass.len()).into_bytes()
        );
        assert_eq!(got[1], pass);
        assert_eq!(got[2], b"\r\n");
        assert_eq!(
            text(&got[3..5]),
            ["pb2 CAPABILITY\r\n", "pb3 SELECT \"INBOX\"\r\n"]
        );
    }

    /// ASCII credentials stay quoted, with `"` and `\` escaped.
    #[tokio::test]
    async fn login_quotes_ascii_credentials() {
        let (addr, server) = serve(vec![
            Send("* OK [CAPABILITY IMAP4rev1] ready\r\n"),
            Read,
            Send("pb1 OK logged in\r\n"),
            Read,
            Read,
            Send("* CAPABILITY IMAP4rev1\r\npb2 OK done\r\n"),
            Send(SELECT_EMPTY),
        ])
        .await;
        login(addr, "al\"ice", b"p\\w").await.expect("login");
        let got = server.await.unwrap();
        assert_eq!(text(&got[..1]), ["pb1 LOGIN \"al\\\"ice\" \"p\\\\w\"\r\n"]);
    }

    /// A server that refuses the literal (tagged NO instead of `+`) fails
    /// the login, and the password never goes out.
    #[tokio::test]
    async fn login_literal_refused_before_the_password() {
        let (addr, server) = serve(vec![
            Send("* OK [CAPABILITY IMAP4rev1] ready\r\n"),
            Read,
            Send("pb1 NO [AUTHENTICATIONFAILED] no\r\n"),
        ])
        .await;
        let r = login(addr, "alice", "wörd".as_bytes()).await;
        assert!(matches!(r, Err(UpstreamError::AuthFailed(_))), "{r:?}");
        let got = server.await.unwrap();
        let secret = "wörd".as_bytes();
        assert!(!got.concat().windows(secret.len()).any(|w| w == secret));
    }

    /// An untagged BYE during LOGIN is the server's answer (Gmail throttles
    /// this way), not an anonymous lost connection.
    #[tokio::test]
    async fn bye_during_login_is_reported() {
        let (addr, _server) = serve(vec![
            Send("* OK [CAPABILITY IMAP4rev1] ready\r\n"),
            Read,
            Send("* BYE [UNAVAILABLE] Too many simultaneous connections\r\n"),
        ])
        .await;
        let r = login(addr, "alice", b"pw").await;
        assert!(matches!(r, Err(UpstreamError::Throttled(_))), "{r:?}");
    }

    /// The login and snapshot of a mailbox holding UID 10 of `size` octets;
    /// the session's next tag is pb5.
    fn one_message(size: u64) -> Vec<Step> {
        vec![
            Send("* OK [CAPABILITY IMAP4rev1] ready\r\n"),
            Read,
            Send("pb1 OK logged in\r\n"),
            Read,
            Read,
            Send("* CAPABILITY IMAP4rev1 UIDPLUS\r\npb2 OK done\r\n"),
            Send(
                "* 1 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n* OK [UIDNEXT 11] n\r\n\
                 pb3 OK [READ-WRITE] selected\r\n",
            ),
            Read,
            SendOwned(format!(
                "* 1 FETCH (UID 10 RFC822.SIZE {size})\r\npb4 OK done\r\n"
            )),
        ]
    }

    /// Collects what a fetch delivers.
    #[derive(Default)]
    pub(super) struct Collect(pub Vec<u8>);

    impl BodySink for Collect {
        async fn chunk(&mut self, data: &[u8]) -> std::io::Result<Flow> {
            self.0.extend_from_slice(data);
            Ok(Flow::Continue)
        }
    }

    async fn fetch_with(
        script: Vec<Step>,
        size: u64,
    ) -> (
        ImapConn,
        Result<FetchEnd, UpstreamError>,
        Vec<u8>,
        tokio::task::JoinHandle<Vec<Vec<u8>>>,
    ) {
        let mut all = one_message(size);
        all.extend(script);
        let (addr, server) = serve(all).await;
        let (mut conn, snap) = login(addr, "alice", b"pw").await.expect("login");
        assert_eq!(snap.messages, vec![(10, size)]);
        let mut sink = Collect::default();
        let r = conn.fetch(10, size, false, &mut sink).await;
        (conn, r, sink.0, server)
    }

    /// UID FETCH answered OK without an item: the message was expunged by
    /// someone else; nothing was delivered.
    #[tokio::test]
    async fn fetch_with_no_item_is_gone() {
        let (_c, r, got, _s) = fetch_with(vec![Read, Send("pb5 OK done\r\n")], 5).await;
        assert!(matches!(r, Ok(FetchEnd::Gone)), "{r:?}");
        assert!(got.is_empty());
    }

    /// Dovecot's answer for a message expunged meanwhile: BODY[] NIL.
    #[tokio::test]
    async fn fetch_body_nil_is_gone() {
        let (_c, r, got, _s) = fetch_with(
            vec![
                Read,
                Send("* 1 FETCH (UID 10 BODY[]<0> NIL)\r\n* 1 EXPUNGE\r\npb5 OK [EXPUNGEISSUED] x\r\n"),
            ],
            5,
        )
        .await;
        assert!(matches!(r, Ok(FetchEnd::Gone)), "{r:?}");
        assert!(got.is_empty());
    }

    /// Pipelined chunks answered out of order arrive in order; the last
    /// chunk asks one octet past the size.
    #[tokio::test]
    async fn fetch_chunks_out_of_order() {
        let size = RETR_CHUNK + 10;
        let first = "a".repeat(RETR_CHUNK as usize);
        let (c, r, got, server) = fetch_with(
            vec![
                Read,
                Read,
                Send("* 1 FETCH (UID 10 BODY[]<262144> {10}\r\nbbbbbbbbbb)\r\npb6 OK done\r\n"),
                SendOwned(format!(
                    "* 1 FETCH (UID 10 BODY[]<0> {{{}}}\r\n{first})\r\npb5 OK done\r\n",
                    first.len()
                )),
            ],
            size,
        )
        .await;
        assert!(matches!(r, Ok(FetchEnd::Complete)), "{r:?}");
        assert_eq!(got, format!("{first}bbbbbbbbbb").into_bytes());
        drop(c);
        let lines = server.await.unwrap();
        assert_eq!(
            text(&lines[4..6]),
            [
                "pb5 UID FETCH 10 (UID BODY.PEEK[]<0.262144>)\r\n",
                "pb6 UID FETCH 10 (UID BODY.PEEK[]<262144.11>)\r\n"
            ]
        );
    }

    /// A NO on the second chunk after the first was delivered: an error,
    /// never a shorter Complete; the connection stays in step.
    #[tokio::test]
    async fn fetch_no_on_a_later_chunk_is_an_error() {
        let first = "a".repeat(RETR_CHUNK as usize);
        let (mut c, r, _got, _s) = fetch_with(
            vec![
                Read,
                Read,
                SendOwned(format!(
                    "* 1 FETCH (UID 10 BODY[]<0> {{{}}}\r\n{first})\r\npb5 OK done\r\n",
                    first.len()
                )),
                Send("pb6 NO [SERVERBUG] broken\r\n"),
                Read,
                Send("pb7 OK noop\r\n"),
            ],
            RETR_CHUNK + 10,
        )
        .await;
        assert!(matches!(r, Err(UpstreamError::No { .. })), "{r:?}");
        c.exec("NOOP", "NOOP", |_| {}).await.expect("in step");
    }

    /// A tagged reply to a tag we never sent: out of step, so the
    /// connection is never used again.
    #[tokio::test]
    async fn fetch_reply_to_another_tag_poisons() {
        let (mut c, r, _got, _s) =
            fetch_with(vec![Read, Send("pb4 OK late\r\npb5 OK done\r\n")], 5).await;
        assert!(matches!(r, Err(UpstreamError::Protocol(_))), "{r:?}");
        let r = c.fetch(10, 5, false, &mut Collect::default()).await;
        assert!(matches!(r, Err(UpstreamError::Poisoned)), "{r:?}");
        let r = c.commit(&[10], &[], &DeleteAction::Expunge).await;
        assert!(matches!(r, Err(UpstreamError::Poisoned)), "{r:?}");
    }

    /// A timeout leaves a reply unread: the connection is not reused.
    #[tokio::test]
    async fn fetch_timeout_poisons() {
        let (mut c, r, _got, _s) = fetch_with(vec![Read], 5).await;
        assert!(matches!(r, Err(UpstreamError::Timeout(_))), "{r:?}");
        let r = c.commit(&[10], &[], &DeleteAction::Expunge).await;
        assert!(matches!(r, Err(UpstreamError::Poisoned)), "{r:?}");
    }

    /// The connection cut inside the literal: an error after whatever was
    /// delivered, never Complete.
    #[tokio::test]
    async fn fetch_cut_mid_literal_is_an_error() {
        let mut all = one_message(100);
        all.extend([Read, Send("* 1 FETCH (UID 10 BODY[]<0> {100}\r\nabc")]);
        let (addr, server) = serve(all).await;
        let (mut conn, _) = login(addr, "alice", b"pw").await.expect("login");
        let mut sink = Collect::default();
        let fetch = conn.fetch(10, 100, false, &mut sink);
        // The server closes once the script is played.
        let abort = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            server.abort();
        };
        let (r, _) = tokio::join!(fetch, abort);
        assert!(r.is_err(), "{r:?}");
    }

    /// More octets than RFC822.SIZE said: an error, not a silent cut.
    #[tokio::test]
    async fn fetch_longer_than_size_is_an_error() {
        let (_c, r, _got, _s) = fetch_with(
            vec![
                Read,
                Send("* 1 FETCH (UID 10 BODY[]<0> {6}\r\nabcdef)\r\npb5 OK done\r\n"),
            ],
            5,
        )
        .await;
        assert!(
            matches!(r, Err(UpstreamError::SizeMismatch { .. })),
            "{r:?}"
        );
    }

    /// One response longer than [`MAX_RESPONSE`] ends the session instead
    /// of growing async-imap's buffer towards 512 MiB.
    #[tokio::test]
    async fn oversized_response_is_refused() {
        let n = MAX_RESPONSE as usize + 1024;
        let huge = format!(
            "* 1 FETCH (UID 10 BODY[]<0> {{{n}}}\r\n{})\r\npb5 OK done\r\n",
            "a".repeat(n)
        );
        let (_c, r, got, _s) = fetch_with(vec![Read, SendOwned(huge)], 5).await;
        assert!(got.is_empty());
        match r {
            Err(UpstreamError::Io(e)) => assert!(e.to_string().contains("longer than"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    /// Many responses that are each small add up to more than the limit
    /// without tripping it (the count is per response).
    #[tokio::test]
    async fn many_small_responses_are_fine() {
        let line = format!("* OK {}\r\n", "x".repeat(1000));
        let many = line.repeat((MAX_RESPONSE / 1000) as usize + 100);
        let (addr, _server) = serve(vec![
            Send("* OK [CAPABILITY IMAP4rev1] ready\r\n"),
            Read,
            Send("pb1 OK logged in\r\n"),
            Read,
            Read,
            SendOwned(many),
            Send("* CAPABILITY IMAP4rev1\r\npb2 OK done\r\n"),
            Send(SELECT_EMPTY),
        ])
        .await;
        login(addr, "alice", b"pw").await.expect("login");
    }

    /// UID EXPUNGE refused after our `\Deleted` was set: QUIT fails, and
    /// the flag is taken back, so no other client's EXPUNGE removes mail
    /// the POP3 client was told was not deleted.
    #[tokio::test]
    async fn refused_uid_expunge_takes_the_deleted_flag_back() {
        let mut all = one_message(5);
        all.extend([
            Read,
            Send("pb5 OK stored\r\n"),
            Read,
            Send("pb6 NO [SERVERBUG] cannot expunge\r\n"),
            Read,
            Send("pb7 OK stored\r\n"),
        ]);
        let (addr, server) = serve(all).await;
        let (mut conn, _) = login(addr, "alice", b"pw").await.expect("login");
        let r = conn.commit(&[10], &[], &DeleteAction::Expunge).await;
        assert!(matches!(r, Err(UpstreamError::No { .. })), "{r:?}");
        drop(conn);
        let lines = server.await.unwrap();
        assert_eq!(
            text(&lines[4..7]),
            [
                "pb5 UID STORE 10 +FLAGS.SILENT (\\Deleted)\r\n",
                "pb6 UID EXPUNGE 10\r\n",
                "pb7 UID STORE 10 -FLAGS.SILENT (\\Deleted)\r\n",
            ]
        );
    }

    /// The happy path: STORE, UID EXPUNGE of exactly our UIDs, then the
    /// check that they are gone; one still there is reported.
    #[tokio::test]
    async fn commit_reports_what_uid_expunge_left() {
        let mut all = one_message(5);
        all.extend([
            Read,
            Send("pb5 OK stored\r\n"),
            Read,
            Send("pb6 OK expunged\r\n"),
            Read,
            Send("* SEARCH 10\r\npb7 OK searched\r\n"),
        ]);
        let (addr, server) = serve(all).await;
        let (mut conn, _) = login(addr, "alice", b"pw").await.expect("login");
        let r = conn
            .commit(&[10], &[], &DeleteAction::Expunge)
            .await
            .expect("commit");
        assert_eq!(r.not_removed, vec![10]);
        drop(conn);
        let lines = server.await.unwrap();
        assert_eq!(
            text(&lines[4..7]),
            [
                "pb5 UID STORE 10 +FLAGS.SILENT (\\Deleted)\r\n",
                "pb6 UID EXPUNGE 10\r\n",
                "pb7 UID SEARCH UID 10\r\n",
            ]
        );
    }
}
