//! Encryption at rest for token and device records: XChaCha20-Poly1305 (an
//! AEAD with a 192-bit nonce, so a fresh random nonce per write never
//! repeats in practice), with associated data binding a sealed blob to its
//! store format version, key id and record (the account of a token record;
//! every clear field of a device record), so a blob copied to another
//! record, a clear field changed, or a blob read with another key fails to
//! open instead of being misused.

use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use crate::config::oauth::{KeyMaterial, KEY_LEN};

/// XChaCha20-Poly1305 nonce length (draft-irtf-cfrg-xchacha §2).
const NONCE_LEN: usize = 24;
/// Bytes of SHA-256 kept as the key id: enough to tell keys apart, useless
/// for guessing the key.
const KEY_ID_LEN: usize = 8;
/// Domain separation for the key id hash.
const KEY_ID_CONTEXT: &[u8] = b"popbridge oauth store key id v1\0";
/// Version of the sealed format; part of the associated data.
pub const SEAL_VERSION: u32 = 1;

/// The store key. `Debug` never shows it.
#[derive(Clone)]
pub struct StoreKey {
    cipher: XChaCha20Poly1305,
    id: String,
}

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreKey(id {})", self.id)
    }
}

/// A sealed secret as stored: nonce and ciphertext (with tag), base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// The key id the blob was sealed with.
    pub key_id: String,
    pub nonce: String,
    pub ciphertext: String,
}

/// Why a sealed blob does not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("token store was written with another key (key id {found}; the configured key has id {expected}): configure the key it was written with, or re-enrol the accounts")]
    WrongKey { found: String, expected: String },
    #[error("token record for {account} is corrupt or was tampered with (authentication failed)")]
    Tampered { account: String },
    #[error("device record {login:?} is corrupt or was tampered with (authentication failed)")]
    DeviceTampered { login: String },
}

impl StoreKey {
    pub fn new(key: &KeyMaterial) -> Self {
        let mut h = ring::digest::Context::new(&ring::digest::SHA256);
        h.update(KEY_ID_CONTEXT);
        h.update(&key.0);
        let id = hex::encode(&h.finish().as_ref()[..KEY_ID_LEN]);
        Self {
            cipher: XChaCha20Poly1305::new((&key.0).into()),
            id,
        }
    }

    /// A hash of the key, for headers and messages.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn aad(&self, account: &str) -> Vec<u8> {
        let mut aad = format!("popbridge-oauth-v{SEAL_VERSION}\0{}\0", self.id).into_bytes();
        aad.extend_from_slice(account.as_bytes());
        aad
    }

    /// Seals `plaintext` for `account` with a fresh random nonce.
    pub fn seal(&self, account: &str, plaintext: &[u8]) -> Result<Sealed, String> {
        self.seal_with(&self.aad(account), plaintext)
    }

    fn seal_with(&self, aad: &[u8], plaintext: &[u8]) -> Result<Sealed, String> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).map_err(|e| format!("no randomness: {e}"))?;
        let ct = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| "encryption failed".to_string())?;
        let b64 = base64::engine::general_purpose::STANDARD;
        Ok(Sealed {
            key_id: self.id.clone(),
            nonce: b64.encode(nonce),
            ciphertext: b64.encode(ct),
        })
    }

    /// Opens a blob sealed for `account`. A blob from another key is
    /// reported as such, not as corruption.
    pub fn open(&self, account: &str, sealed: &Sealed) -> Result<Vec<u8>, OpenError> {
        self.open_with(&self.aad(account), sealed, || OpenError::Tampered {
            account: account.to_string(),
        })
    }

    fn open_with(
        &self,
        aad: &[u8],
        sealed: &Sealed,
        tampered: impl Fn() -> OpenError,
    ) -> Result<Vec<u8>, OpenError> {
        if sealed.key_id != self.id {
            return Err(OpenError::WrongKey {
                found: sealed.key_id.clone(),
                expected: self.id.clone(),
            });
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let nonce = b64.decode(&sealed.nonce).map_err(|_| tampered())?;
        if nonce.len() != NONCE_LEN {
            return Err(tampered());
        }
        let ct = b64.decode(&sealed.ciphertext).map_err(|_| tampered())?;
        self.cipher
            .decrypt(XNonce::from_slice(&nonce), Payload { msg: &ct, aad })
            .map_err(|_| tampered())
    }
}

/// Domain of device records' associated data (and its format version).
const DEVICE_CONTEXT: &str = "popbridge-device-v1";

impl StoreKey {
    /// Associated data for a device record: the domain, the key id, then
    /// each field length-prefixed (so no two field lists encode alike).
    fn device_aad(&self, fields: &[&[u8]]) -> Vec<u8> {
        let mut aad = format!("{DEVICE_CONTEXT}\0{}\0", self.id).into_bytes();
        for f in fields {
            aad.extend_from_slice(&(f.len() as u64).to_be_bytes());
            aad.extend_from_slice(f);
        }
        aad
    }

    /// Seals a device record's secret (its password hash) bound to the
    /// record's clear `fields`: changing any of them makes it fail to open.
    pub fn seal_device(&self, fields: &[&[u8]], plaintext: &[u8]) -> Result<Sealed, String> {
        self.seal_with(&self.device_aad(fields), plaintext)
    }

    /// Opens what [`StoreKey::seal_device`] sealed for the same `fields`;
    /// `login` names the record in the error.
    pub fn open_device(
        &self,
        login: &str,
        fields: &[&[u8]],
        sealed: &Sealed,
    ) -> Result<Vec<u8>, OpenError> {
        self.open_with(&self.device_aad(fields), sealed, || {
            OpenError::DeviceTampered {
                login: login.to_string(),
            }
        })
    }
}

/// 32 fresh random bytes as base64, e.g. for a new key.
pub fn random_key_base64() -> Result<String, String> {
    let mut k = [0u8; KEY_LEN];
    getrandom::getrandom(&mut k).map_err(|e| format!("no randomness: {e}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> StoreKey {
        StoreKey::new(&KeyMaterial([b; KEY_LEN]))
    }

    #[test]
    fn round_trip_with_fresh_nonces() {
        let k = key(1);
        let a = k.seal("alice@example.org", b"refresh-token").unwrap();
        let b = k.seal("alice@example.org", b"refresh-token").unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
        assert!(!a.ciphertext.contains("refresh"));
        assert_eq!(k.open("alice@example.org", &a).unwrap(), b"refresh-token");
    }

    #[test]
    fn wrong_key_is_named_not_called_corrupt() {
        let a = key(1).seal("alice", b"x").unwrap();
        let e = key(2).open("alice", &a).unwrap_err();
        assert!(matches!(e, OpenError::WrongKey { .. }));
        assert!(e.to_string().contains("another key"), "{e}");
        // A forged key id with the wrong key still fails authentication.
        let mut forged = a.clone();
        forged.key_id = key(2).id().to_string();
        assert!(matches!(
            key(2).open("alice", &forged),
            Err(OpenError::Tampered { .. })
        ));
    }

    #[test]
    fn tampering_and_moving_between_accounts_fail() {
        let k = key(3);
        let a = k.seal("alice", b"secret").unwrap();
        assert!(matches!(k.open("bob", &a), Err(OpenError::Tampered { .. })));
        let mut t = a.clone();
        let mut ct = base64::engine::general_purpose::STANDARD
            .decode(&t.ciphertext)
            .unwrap();
        ct[0] ^= 1;
        t.ciphertext = base64::engine::general_purpose::STANDARD.encode(ct);
        assert!(matches!(
            k.open("alice", &t),
            Err(OpenError::Tampered { .. })
        ));
        let mut t = a.clone();
        t.ciphertext.truncate(4);
        assert!(k.open("alice", &t).is_err());
        let mut t = a;
        t.nonce = "!!".into();
        assert!(k.open("alice", &t).is_err());
    }

    #[test]
    fn device_seals_bind_every_field() {
        let k = key(4);
        let fields: [&[u8]; 3] = [b"scanner", b"alice@example.org", b"10.0.0.0/8"];
        let s = k.seal_device(&fields, b"$argon2id$hash").unwrap();
        assert_eq!(
            k.open_device("scanner", &fields, &s).unwrap(),
            b"$argon2id$hash"
        );
        for changed in [
            [&b"printer"[..], b"alice@example.org", b"10.0.0.0/8"],
            [b"scanner", b"mallory@example.org", b"10.0.0.0/8"],
            [b"scanner", b"alice@example.org", b""],
            // Moving bytes between fields is a change too.
            [b"scanne", b"ralice@example.org", b"10.0.0.0/8"],
        ] {
            let e = k.open_device("scanner", &changed, &s).unwrap_err();
            assert!(matches!(e, OpenError::DeviceTampered { .. }), "{e:?}");
            assert!(e.to_string().contains("\"scanner\""), "{e}");
        }
        // A token seal never opens as a device seal, nor the reverse.
        let t = k.seal("scanner", b"x").unwrap();
        assert!(k.open_device("scanner", &[b"scanner"], &t).is_err());
        let d = k.seal_device(&[b"scanner"], b"x").unwrap();
        assert!(k.open("scanner", &d).is_err());
        assert!(matches!(
            key(5).open_device("scanner", &fields, &s),
            Err(OpenError::WrongKey { .. })
        ));
    }

    #[test]
    fn key_ids_differ_and_hide_the_key() {
        assert_ne!(key(1).id(), key(2).id());
        assert_eq!(key(1).id().len(), 2 * KEY_ID_LEN);
        assert!(!format!("{:?}", key(1)).contains("0101"));
    }
}
