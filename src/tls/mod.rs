//! TLS on both sides, with rustls: the server certificate that POP3S and
//! STLS present (reloadable on SIGHUP), and the client configuration that
//! verifies the IMAP server; and [`MaybeTls`], a connection that is plain
//! or TLS. With the cargo feature `legacy-tls`, [`legacy`] adds an OpenSSL
//! context for one extra listener that old devices (TLS 1.0/1.1) can use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{info, warn};

#[cfg(feature = "legacy-tls")]
pub mod legacy;
pub mod stream;

pub use stream::{MaybeTls, ServerTlsStream};

/// A certificate, key or CA file that cannot be used: the text names the
/// file and the problem.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

/// RFC 8996 deprecates TLS 1.0 and 1.1; RFC 8314 §4.1 wants at least 1.2.
static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain and private key into a server config.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<ServerConfig, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError(format!("TLS certificate {}: {e}", cert_file.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "TLS certificate {}: no certificate found",
            cert_file.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| TlsError(format!("TLS key {}: {e}", key_file.display())))?;
    ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(|e| TlsError(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            TlsError(format!(
                "TLS certificate {} and key {}: {e}",
                cert_file.display(),
                key_file.display()
            ))
        })
}

/// The certificate popbridge presents, swapped atomically on reload. Each
/// new connection takes the current acceptor; sessions already running keep
/// theirs.
pub struct ServerTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<TlsAcceptor>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert_file", &self.cert_file)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the certificate and key; an error here stops startup.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, TlsError> {
        let config = server_config(cert_file, key_file)?;
        Ok(Self {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            current: RwLock::new(TlsAcceptor::from(Arc::new(config))),
        })
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        match self.current.read() {
            Ok(a) => a.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Re-reads the files. A bad new pair keeps the old one and says why.
    pub fn reload(&self) -> Result<(), TlsError> {
        match server_config(&self.cert_file, &self.key_file) {
            Ok(config) => {
                let acceptor = TlsAcceptor::from(Arc::new(config));
                match self.current.write() {
                    Ok(mut cur) => *cur = acceptor,
                    Err(poisoned) => *poisoned.into_inner() = acceptor,
                }
                info!(cert = %self.cert_file.display(), "TLS certificate reloaded");
                Ok(())
            }
            Err(e) => {
                warn!(error = %e, "TLS certificate reload failed; keeping the previous certificate");
                Err(e)
            }
        }
    }
}

/// A connector that verifies the IMAP server against the system's roots, or
/// against `ca_file` alone when one is given.
pub fn client_connector(ca_file: Option<&Path>) -> Result<TlsConnector, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| TlsError(format!("upstream CA file {}: {e}", path.display())))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsError(format!(
                    "upstream CA file {}: no usable certificate",
                    path.display()
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                warn!(error = %e, "while loading the system's CA certificates");
            }
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsError(
                    "no system CA certificates found (install ca-certificates or set upstream.ca_file)".into(),
                ));
            }
        }
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(|e| TlsError(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}
