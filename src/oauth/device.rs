//! Device passwords: argon2id hashes (RFC 9106), verification without a
//! timing oracle for unknown logins, source-network checks and generated
//! passwords.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::Semaphore;

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

/// argon2 checks running at once, at most. Each holds m = 19 MiB while it
/// runs: unbounded, the default 1000 sessions (`server.max_sessions`)
/// sending PASS together would ask for about 19 GiB, from clients that
/// need no valid login. Further checks wait for a slot; their number is
/// bounded by the session limit and the login throttle.
pub const MAX_CONCURRENT_CHECKS: usize = 4;

/// The slots for [`check`], and how many are in use (with the most ever in
/// use, which a test reads).
struct Gate {
    slots: Arc<Semaphore>,
    in_use: AtomicUsize,
    peak: AtomicUsize,
}

fn gate() -> &'static Gate {
    static GATE: OnceLock<Gate> = OnceLock::new();
    GATE.get_or_init(|| Gate {
        slots: Arc::new(Semaphore::new(MAX_CONCURRENT_CHECKS)),
        in_use: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
    })
}

/// The most argon2 checks that ever ran at once in this process.
pub fn peak_concurrent_checks() -> usize {
    gate().peak.load(Ordering::SeqCst)
}

/// Checks `password` against `phc` on a blocking thread, at most
/// [`MAX_CONCURRENT_CHECKS`] at a time; `None` (an unknown login) spends
/// the same work via [`dummy_verify`] and is `false`. The slot moves into
/// the blocking task, so a session dropped mid-check does not free it
/// before the memory is.
pub async fn check(password: Vec<u8>, phc: Option<String>) -> Result<bool, String> {
    let g = gate();
    let permit = g
        .slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| format!("verification slots: {e}"))?;
    tokio::task::spawn_blocking(move || {
        let g = gate();
        let now = g.in_use.fetch_add(1, Ordering::SeqCst) + 1;
        g.peak.fetch_max(now, Ordering::SeqCst);
        let ok = match phc {
            Some(h) => verify_password(&password, &h),
            None => {
                dummy_verify(&password);
                false
            }
        };
        g.in_use.fetch_sub(1, Ordering::SeqCst);
        drop(permit);
        ok
    })
    .await
    .map_err(|e| format!("verification task: {e}"))
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn argon2_checks_are_bounded() {
        let h = hash_password(b"correct horse battery").unwrap();
        let tasks: Vec<_> = (0..MAX_CONCURRENT_CHECKS * 4)
            .map(|i| {
                let phc = (i % 2 == 0).then(|| h.clone());
                tokio::spawn(check(b"wrong password!".to_vec(), phc))
            })
            .collect();
        for t in tasks {
            assert!(!t.await.unwrap().unwrap());
        }
        assert!(check(b"correct horse battery".to_vec(), Some(h))
            .await
            .unwrap());
        let peak = peak_concurrent_checks();
        assert!(
            (1..=MAX_CONCURRENT_CHECKS).contains(&peak),
            "{peak} checks ran at once"
        );
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
