//! Test certificates made with rcgen: a CA and leaf certificates it signs,
//! written as PEM files. rustls refuses a self-signed `CA:TRUE` certificate
//! as a server certificate, so servers always get a leaf (`CA:FALSE`, SAN
//! `localhost` and `127.0.0.1` unless told otherwise).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A date as (year, month, day).
pub type Ymd = (i32, u8, u8);

/// A certificate authority that can sign leaf certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
}

/// A leaf (server) certificate and its private key.
pub struct Leaf {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The certificate, DER (what a TLS peer presents).
    pub der: Vec<u8>,
}

impl Ca {
    /// A new CA whose subject common name is `name`.
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("generate CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-sign CA");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        self.leaf_valid(names, None)
    }

    /// A server certificate for `names` valid from `from` to `until`
    /// (year, month, day), e.g. one that has expired; `None`: rcgen's
    /// default validity (1975 to 4096).
    pub fn leaf_valid(&self, names: &[&str], validity: Option<(Ymd, Ymd)>) -> Leaf {
        let key = KeyPair::generate().expect("generate leaf key");
        let sans: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("leaf params");
        params.is_ca = IsCa::ExplicitNoCa;
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        if let Some(((y0, m0, d0), (y1, m1, d1))) = validity {
            params.not_before = rcgen::date_time_ymd(y0, m0, d0);
            params.not_after = rcgen::date_time_ymd(y1, m1, d1);
        }
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

impl Leaf {
    /// Writes the certificate and key (mode 0644, so Dovecot can read them).
    pub fn write(&self, cert_path: &Path, key_path: &Path) {
        write_world_readable(cert_path, self.cert_pem.as_bytes());
        write_world_readable(key_path, self.key_pem.as_bytes());
    }
}

/// Writes `data` to `path` with mode 0644.
pub fn write_world_readable(path: &Path, data: &[u8]) {
    fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// A CA and one leaf for `localhost` and `127.0.0.1`, as PEM files in a
/// world-readable temp dir: `ca.pem`, `cert.pem`, `key.pem`.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    pub leaf: Leaf,
}

impl Pki {
    /// A new CA named `name` and its leaf, written to disk.
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("pbcerts-")
            .tempdir()
            .expect("create cert temp dir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod cert dir");
        let ca = Ca::new(name);
        let leaf = ca.leaf(&["localhost", "127.0.0.1"]);
        let pki = Pki { dir, ca, leaf };
        write_world_readable(&pki.ca_path(), pki.ca.pem.as_bytes());
        pki.leaf.write(&pki.cert_path(), &pki.key_path());
        pki
    }

    /// The CA certificate (PEM file).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The leaf certificate (PEM file).
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// The leaf's private key (PEM file).
    pub fn key_path(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }
}
