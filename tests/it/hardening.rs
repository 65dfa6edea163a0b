//! Hardening found by attack and fault runs (issue 17): long SASL initial
//! responses, the login deadline, throttling under concurrency and its
//! keys, IPv6 prefixes, loopback trust behind PROXY headers, and the
//! plaintext policy per network.

use base64::Engine as _;

use crate::common::{Dovecot, DovecotOptions, Pop3, Popbridge};

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

// ---------------------------------------------------------------------------
// AUTH PLAIN with a long initial response (item 11)
// ---------------------------------------------------------------------------

/// RFC 5034 §4 lets `AUTH` carry the initial response on the command line:
/// a PLAIN response with a long password (a 2,300-octet application token)
/// is a login, not `-ERR Line too long`. (The 9 KB case, past what Dovecot
/// itself takes, is `security::a_9_kb_initial_response_reaches_the_imap_server`.)
#[test]
fn auth_plain_with_a_long_initial_response_logs_in() {
    let pass = "p".repeat(2_300);
    let dovecot = Dovecot::start_with(DovecotOptions {
        users: vec![("carol".into(), pass.clone())],
        ..DovecotOptions::default()
    });
    let pb = Popbridge::start(dovecot.imap_port, &[]);
    let blob = b64(format!("\0carol\0{pass}").as_bytes());
    assert!(blob.len() > 3_000, "{}", blob.len());
    let mut c = Pop3::connect(pb.port);
    let r = c.cmd(&format!("AUTH PLAIN {blob}"));
    assert!(
        r.starts_with("+OK"),
        "AUTH PLAIN with {} octets: {r}",
        blob.len()
    );
    assert_eq!(c.stat().0, 0);
    c.quit();
    // A wrong password in as long a line is a failed login, and a command
    // line that long that is not AUTH is still refused.
    let mut c = Pop3::connect(pb.port);
    let wrong = b64(format!("\0carol\0{}", "q".repeat(2_300)).as_bytes());
    let r = c.cmd(&format!("AUTH PLAIN {wrong}"));
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    let r = c.cmd(&format!("USER {}", "u".repeat(3_000)));
    assert_eq!(r, "-ERR Line too long");
    c.quit();
}
