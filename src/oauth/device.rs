//! Device passwords: argon2id hashes (RFC 9106), verification without a
//! timing oracle for unknown logins, source-network checks and generated
//! passwords.

use std::net::IpAddr;
use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// Shortest device password accepted by `device add`.
pub const MIN_PASSWORD_LEN: usize = 12;
/// Longest password hashed (POP3 PASS lines are short anyway; this bounds
/// the work an attacker can ask for).
pub const MAX_PASSWORD_LEN: usize = 512;
/// Characters in a generated password: 24 from a 56-symbol alphabet without
/// look-alikes is about 139 bits.
const GENERATED_LEN: usize = 24;
const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";

/// argon2id with the crate's defaults (m = 19 MiB, t = 2, p = 1: OWASP's
/// first recommended setting).
fn hasher() -> Argon2<'static> {
    Argon2::default()
}

/// A PHC string for `password`.
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    if password.len() > MAX_PASSWORD_LEN {
        return Err(format!("passwords are at most {MAX_PASSWORD_LEN} bytes"));
    }
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).map_err(|e| format!("no randomness: {e}"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    hasher()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash: {e}"))
}

/// True when `password` matches `phc`. A malformed hash never matches.
pub fn verify_password(password: &[u8], phc: &str) -> bool {
    if password.len() > MAX_PASSWORD_LEN {
        return false;
    }
    match PasswordHash::new(phc) {
        Ok(h) => hasher().verify_password(password, &h).is_ok(),
        Err(_) => false,
    }
}

/// Spends the same work as a real check, for logins that do not exist, so
/// response times do not tell which device names are enrolled.
pub fn dummy_verify(password: &[u8]) {
    static DUMMY: OnceLock<String> = OnceLock::new();
    let phc =
        DUMMY.get_or_init(|| hash_password(b"popbridge-dummy-device-password").unwrap_or_default());
    let _ = verify_password(password, phc);
}

/// `::ffff:a.b.c.d` is the IPv4 client a.b.c.d on a dual-stack socket.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `peer` may use a device limited to `allow` (empty: anywhere).
pub fn address_allowed(allow: &[ipnet::IpNet], peer: IpAddr) -> bool {
    let peer = canonical(peer);
    allow.is_empty() || allow.iter().any(|n| n.contains(&peer))
}

/// A strong random password for `device add --generate`.
pub fn generate_password() -> Result<String, String> {
    let mut out = String::with_capacity(GENERATED_LEN);
    while out.len() < GENERATED_LEN {
        let mut b = [0u8; 32];
        getrandom::getrandom(&mut b).map_err(|e| format!("no randomness: {e}"))?;
        // Rejection sampling keeps the distribution uniform.
        let limit = 256 - (256 % ALPHABET.len());
        for x in b {
            if (x as usize) < limit && out.len() < GENERATED_LEN {
                out.push(ALPHABET[x as usize % ALPHABET.len()] as char);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let h = hash_password(b"correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password(b"correct horse battery", &h));
        assert!(!verify_password(b"correct horse batterx", &h));
        assert!(!verify_password(b"x", "not a hash"));
        let h2 = hash_password(b"correct horse battery").unwrap();
        assert_ne!(h, h2, "salts differ");
        dummy_verify(b"anything");
    }

    #[test]
    fn networks_and_mapped_addresses() {
        let allow: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(address_allowed(&allow, "10.1.2.3".parse().unwrap()));
        assert!(address_allowed(&allow, "::ffff:10.1.2.3".parse().unwrap()));
        assert!(!address_allowed(&allow, "192.0.2.1".parse().unwrap()));
        assert!(address_allowed(&[], "192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn generated_passwords() {
        let a = generate_password().unwrap();
        let b = generate_password().unwrap();
        assert_eq!(a.len(), GENERATED_LEN);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| ALPHABET.contains(&c)));
    }
}
