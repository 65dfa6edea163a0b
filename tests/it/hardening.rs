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

use crate::common::certs::Pki;
use crate::common::logs::wait_for_log;
use crate::common::ports::ClosedPort;
use crate::common::{run_program, Dovecot, DovecotOptions, Pop3, Popbridge};

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

// ---------------------------------------------------------------------------
// Plaintext logins: loopback behind PROXY headers (item 6), networks and
// STLS on the plain listener (item 18)
// ---------------------------------------------------------------------------

/// The refusal of a password on an unencrypted connection.
const PLAINTEXT_REFUSED: &str = "-ERR [AUTH] Plaintext authentication disallowed";

/// A raw POP3 connection that first sends `header` (a PROXY header).
fn connect_with(port: u16, header: &str) -> Pop3 {
    Pop3::connect_after(port, header.as_bytes())
}

/// Whether CAPA offers `name`.
fn capa_has(c: &mut Pop3, name: &str) -> bool {
    let (status, body) = c.cmd_multi("CAPA");
    assert!(status.starts_with("+OK"), "CAPA: {status}");
    String::from_utf8_lossy(&body)
        .lines()
        .any(|l| l == name || l.starts_with(&format!("{name} ")))
}

/// A PROXY header declaring 127.0.0.1 is not loopback: the client's bytes
/// crossed the network between the load balancer and popbridge. Only a
/// connection whose real socket peer is loopback, with no address declared
/// for it (`PROXY UNKNOWN`, a health check), is trusted by
/// `loopback_is_secure`. Checked with raw commands and with curl's own
/// PROXY header (`--haproxy-protocol` declares curl's 127.0.0.1).
#[test]
fn loopback_trust_is_for_the_socket_peer_never_a_proxy_header() {
    let dovecot = Dovecot::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "[listen]\nproxy_protocol = true\nproxy_trusted = [\"127.0.0.0/8\"]\n",
    );
    let pb = Popbridge::start_exact(&[
        "--upstream",
        &format!("127.0.0.1:{}", dovecot.imap_port),
        "--upstream-tls",
        "none",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    // Declared loopback: refused, and CAPA offers no login.
    let mut c = connect_with(pb.port, "PROXY TCP4 127.0.0.1 127.0.0.1 40000 110\r\n");
    assert!(
        !capa_has(&mut c, "USER"),
        "USER offered to a proxied client"
    );
    let r = c.cmd("USER alice");
    assert!(
        r.starts_with(PLAINTEXT_REFUSED),
        "USER from a declared 127.0.0.1: {r}"
    );
    let r = c.cmd(&format!("AUTH PLAIN {}", b64(b"\0alice\0secret")));
    assert!(
        r.starts_with(PLAINTEXT_REFUSED),
        "AUTH from a declared 127.0.0.1: {r}"
    );
    c.quit();
    // No declared address: the socket peer, loopback, is trusted.
    let mut c = connect_with(pb.port, "PROXY UNKNOWN\r\n");
    assert!(capa_has(&mut c, "USER"));
    c.login("alice", "secret");
    c.quit();
    // curl with its own PROXY header: the login is refused.
    let r = run_program(
        std::process::Command::new("curl")
            .args(["-s", "-S", "-v", "--max-time", "30", "--haproxy-protocol"])
            .arg(format!("pop3://alice:secret@127.0.0.1:{}/", pb.port)),
        dir.path(),
        "curl-proxied",
    );
    assert!(
        !r.status.success() && !r.stderr.contains("+OK Logged in"),
        "curl logged in in clear behind a PROXY header declaring 127.0.0.1:\n{}",
        r.stderr
    );
}

/// python's poplib, connecting through a PROXY v1 header that declares
/// `client` (as a load balancer in front of popbridge would), then USER,
/// PASS and STAT; prints `stat N` or `error <reply>`. With `stls`, it
/// first asks for STLS and prints what happened.
const POPLIB_PROXIED: &str = r#"
import poplib, socket, sys
port, client, stls = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "stls"
class Proxied(poplib.POP3):
    def _create_socket(self, timeout):
        s = socket.create_connection((self.host, self.port), timeout)
        s.sendall(("PROXY TCP4 %s 127.0.0.1 40000 110\r\n" % client).encode())
        return s
p = Proxied("127.0.0.1", port, timeout=30)
if stls:
    try:
        p.stls()
        print("stls ok")
    except poplib.error_proto as e:
        print("stls error", e)
try:
    p.user("alice")
    p.pass_("secret")
    print("stat", p.stat()[0])
    p.quit()
except poplib.error_proto as e:
    print("error", e)
"#;

/// Runs [`POPLIB_PROXIED`]; returns its output.
fn poplib_proxied(dir: &Path, port: u16, client: &str, stls: bool) -> String {
    let script = dir.join("poplib_proxied.py");
    fs::write(&script, POPLIB_PROXIED).unwrap();
    let r = run_program(
        std::process::Command::new("python3")
            .arg(&script)
            .arg(port.to_string())
            .arg(client)
            .arg(if stls { "stls" } else { "plain" }),
        dir,
        "poplib",
    );
    assert!(r.status.success(), "poplib script failed: {}", r.stderr);
    String::from_utf8_lossy(&r.stdout).into_owned()
}

/// `auth.plaintext_networks` lists the networks whose clients may log in
/// without TLS (the scanners' LAN); everyone else must use TLS. The
/// client address is the one a trusted PROXY header declares. The old
/// `allow_plaintext = true` still means every network.
#[test]
fn plaintext_logins_only_from_listed_networks() {
    let dovecot = Dovecot::start();
    let dir = tempfile::tempdir().unwrap();
    let start = |auth: &str| {
        let cfg = write_config(
            dir.path(),
            &format!(
                "[listen]\nproxy_protocol = true\nproxy_trusted = [\"127.0.0.0/8\"]\n[auth]\n{auth}"
            ),
        );
        Popbridge::start_exact(&[
            "--upstream",
            &format!("127.0.0.1:{}", dovecot.imap_port),
            "--upstream-tls",
            "none",
            "--config",
            cfg.to_str().unwrap(),
        ])
    };
    let pb = start("plaintext_networks = [\"192.168.1.0/24\", \"2001:db8:1::/48\"]\n");
    let lan = poplib_proxied(dir.path(), pb.port, "192.168.1.20", false);
    assert_eq!(lan.trim(), "stat 0", "a client on a listed network");
    let other = poplib_proxied(dir.path(), pb.port, "192.168.2.20", false);
    assert!(
        other.starts_with("error b'-ERR [AUTH] Plaintext authentication disallowed"),
        "a client elsewhere: {other}"
    );
    // IPv6 networks too, raw.
    let mut c = connect_with(pb.port, "PROXY TCP6 2001:db8:1:2::7 ::1 40000 110\r\n");
    assert!(capa_has(&mut c, "USER"));
    c.login("alice", "secret");
    c.quit();
    let mut c = connect_with(pb.port, "PROXY TCP6 2001:db8:2::7 ::1 40000 110\r\n");
    assert!(!capa_has(&mut c, "USER"));
    assert!(c.cmd("USER alice").starts_with(PLAINTEXT_REFUSED));
    c.quit();
    drop(pb);
    // The old key: every network.
    let pb = start("allow_plaintext = true\n");
    let other = poplib_proxied(dir.path(), pb.port, "192.168.2.20", false);
    assert_eq!(other.trim(), "stat 0", "allow_plaintext = true");
}

/// `listen.stls = false`: the plain listener does not offer STLS even with
/// a certificate (PHP's c-client tries STLS whenever it is offered and then
/// fails the handshake); POP3S still serves TLS. curl with `--ssl` (use TLS
/// when offered) then logs in without it, from loopback; poplib's stls()
/// is told there is none.
#[test]
fn stls_can_be_left_off_the_plain_listener() {
    let dovecot = Dovecot::start();
    let pki = Pki::new("popbridge stls test");
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[listen]\nstls = false\ntls_address = \"127.0.0.1:0\"\n[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            pki.cert_path(),
            pki.key_path()
        ),
    );
    let pb = Popbridge::start(dovecot.imap_port, &["--config", cfg.to_str().unwrap()]);
    let mut c = Pop3::connect(pb.port);
    assert!(
        !capa_has(&mut c, "STLS"),
        "STLS offered with listen.stls = false"
    );
    assert!(c.cmd("STLS").starts_with("-ERR"));
    c.login("alice", "secret");
    c.quit();
    // A client that takes TLS when offered (and would fail to verify this
    // certificate) logs in without it.
    let r = run_program(
        std::process::Command::new("curl")
            .args(["-s", "-S", "-v", "--max-time", "30", "--ssl"])
            .arg(format!("pop3://alice:secret@127.0.0.1:{}/", pb.port)),
        dir.path(),
        "curl-ssl",
    );
    assert!(r.status.success(), "curl --ssl: {}", r.stderr);
    assert!(
        !r.stderr.contains("> STLS"),
        "curl was offered STLS:\n{}",
        r.stderr
    );
    let out = poplib_plain_stls(dir.path(), pb.port);
    assert!(out.starts_with("stls error"), "poplib stls(): {out}");
    // POP3S is unaffected.
    let r = run_program(
        std::process::Command::new("curl")
            .args(["-s", "-S", "--max-time", "30", "--cacert"])
            .arg(pki.ca_path())
            .arg(format!("pop3s://alice:secret@127.0.0.1:{}/", pb.tls_port())),
        dir.path(),
        "curl-pop3s",
    );
    assert!(r.status.success(), "curl over POP3S: {}", r.stderr);
}

/// poplib's stls() on a direct connection; prints `stls ok` or `stls error ...`.
fn poplib_plain_stls(dir: &Path, port: u16) -> String {
    let script = dir.join("poplib_stls.py");
    fs::write(
        &script,
        "import poplib, sys\np = poplib.POP3('127.0.0.1', int(sys.argv[1]), timeout=30)\ntry:\n    p.stls()\n    print('stls ok')\nexcept poplib.error_proto as e:\n    print('stls error', e)\np.quit()\n",
    )
    .unwrap();
    let r = run_program(
        std::process::Command::new("python3")
            .arg(&script)
            .arg(port.to_string()),
        dir,
        "poplib-stls",
    );
    assert!(r.status.success(), "{}", r.stderr);
    String::from_utf8_lossy(&r.stdout).into_owned()
}
