//! How popbridge reaches and uses one IMAP server: [`ImapConfig`], built
//! from a route's `[upstream]` keys.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::cache::ListingCache;
use crate::config::{LoginMechanism, NoUidplus, UpstreamConfig, UpstreamTls};
use crate::tls::MaybeTls;

/// How popbridge reaches and uses the IMAP server.
#[derive(Debug, Clone)]
pub struct ImapConfig {
    /// `host:port`.
    pub address: String,
    /// The mailbox a POP3 session sees.
    pub mailbox: String,
    pub connect_timeout: Duration,
    /// The longest wait for the server's next octet (or for a write):
    /// inactivity, not a bound on a whole response, so a slow but steady
    /// server completes a large message.
    pub command_timeout: Duration,
    pub no_uidplus: NoUidplus,
    /// How passwords log in.
    pub login_mechanism: LoginMechanism,
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
        up: &UpstreamConfig,
        reuse_xuidl: bool,
        cache: Option<std::sync::Arc<ListingCache>>,
    ) -> Result<ImapConfig, String> {
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
            login_mechanism: up.login_mechanism,
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
