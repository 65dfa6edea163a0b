//! Hardening found by attack and fault runs (issue 17): long SASL initial
//! responses, the login deadline, throttling under concurrency and its
//! keys, IPv6 prefixes, loopback trust behind PROXY headers, and the
//! plaintext policy per network.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::common::logs::wait_for_log;
use crate::common::ports::ClosedPort;
use crate::common::{Dovecot, DovecotOptions, Pop3, Popbridge};

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("popbridge.toml");
    fs::write(&path, text).expect("write config");
    path
}

/// popbridge with `config` (TOML) and an upstream that is never reached.
fn popbridge_with(config: &str) -> (Popbridge, tempfile::TempDir, ClosedPort) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), config);
    let nothing = ClosedPort::new();
    let pb = Popbridge::start(nothing.port(), &["--config", cfg.to_str().unwrap()]);
    (pb, dir, nothing)
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

// ---------------------------------------------------------------------------
// The login deadline (item 1)
// ---------------------------------------------------------------------------

/// How a client that never logs in ended.
#[derive(Debug)]
struct Ended {
    /// popbridge closed the connection (rather than the client giving up).
    closed_by_server: bool,
    /// From the greeting to the close.
    after: Duration,
    /// Everything popbridge sent after the greeting.
    received: String,
}

/// Connects, reads the greeting, then sends `step()` every `pace` (each
/// wait is a read with that timeout, so popbridge's answers and its close
/// are seen as they come) until popbridge closes the connection or
/// `give_up` steps were made.
fn stay_unauthenticated(
    port: u16,
    pace: Duration,
    give_up: usize,
    mut step: impl FnMut(usize) -> Vec<u8>,
) -> Ended {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    s.set_read_timeout(Some(pace)).unwrap();
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let mut greeted = false;
    let mut i = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                received.extend_from_slice(&buf[..n]);
                continue;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
        if !greeted {
            assert!(received.starts_with(b"+OK"), "{received:?}");
            greeted = true;
            received.clear();
        }
        if i == give_up {
            return Ended {
                closed_by_server: false,
                after: started.elapsed(),
                received: String::from_utf8_lossy(&received).into_owned(),
            };
        }
        if s.write_all(&step(i)).is_err() {
            break;
        }
        i += 1;
    }
    Ended {
        closed_by_server: true,
        after: started.elapsed(),
        received: String::from_utf8_lossy(&received).into_owned(),
    }
}

/// `pop3.login_timeout_secs` is the time from accept to a login, not a
/// limit per read: a client sending one byte at a time, and one sending
/// CAPA over and over (which also resets the bad-command count), are both
/// cut off at the deadline, so such clients cannot fill `max_sessions`.
/// They pace themselves at a tenth of the deadline and give up after 15
/// deadlines; only popbridge's deadline can end them before that.
#[test]
fn login_timeout_is_a_deadline_from_accept() {
    let (pb, _dir, _up) = popbridge_with("[pop3]\nlogin_timeout_secs = 2\n");
    let deadline = Duration::from_secs(2);
    let pace = Duration::from_millis(200);
    let give_up = 150;
    let port = pb.port;
    let slow_bytes = thread::spawn(move || {
        let line = b"CAPA\r\n";
        stay_unauthenticated(port, pace, give_up, |i| vec![line[i % line.len()]])
    });
    let capa =
        thread::spawn(move || stay_unauthenticated(port, pace, give_up, |_| b"CAPA\r\n".to_vec()));
    for (what, ended) in [
        ("one byte at a time", slow_bytes.join().unwrap()),
        ("CAPA over and over", capa.join().unwrap()),
    ] {
        assert!(
            ended.closed_by_server,
            "{what}: still connected after {:?} (login deadline {deadline:?})",
            ended.after
        );
        assert!(
            ended.after >= deadline,
            "{what}: closed after {:?}, before the deadline",
            ended.after
        );
        assert!(
            ended
                .received
                .ends_with("-ERR Login time limit reached, disconnecting.\r\n"),
            "{what}: {:?}",
            ended.received
        );
    }
    wait_for_log(|| pb.log(), "login time limit", 2);
}
