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

// ---------------------------------------------------------------------------
// Throttling: concurrency (item 2), lockout (item 3), the upstream account
// (item 4), IPv6 prefixes (item 5)
// ---------------------------------------------------------------------------

/// Dovecot settings that keep failed logins fast: no 2 s failure delay and
/// no per-address auth penalty (anvil).
const FAST_FAILURES: &str = "auth_failure_delay = 0\n\
service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n";

/// How many password checks for `user` Dovecot has logged as failed.
fn dovecot_failures(dovecot: &Dovecot, user: &str) -> usize {
    let needle = format!("passwd-file({user},");
    dovecot
        .log()
        .lines()
        .filter(|l| {
            l.contains(&needle) && (l.contains("Password mismatch") || l.contains("unknown user"))
        })
        .count()
}

/// Every password check Dovecot has logged as failed, any user.
fn all_dovecot_failures(dovecot: &Dovecot) -> usize {
    dovecot
        .log()
        .lines()
        .filter(|l| l.contains("Password mismatch") || l.contains("unknown user"))
        .count()
}

fn fast_dovecot() -> Dovecot {
    Dovecot::start_with(DovecotOptions {
        extra_conf: FAST_FAILURES.into(),
        ..DovecotOptions::default()
    })
}

/// popbridge in front of `dovecot`, trusting PROXY headers from loopback
/// (so tests can speak for many client addresses), with `config` added.
fn proxied_popbridge(dovecot: &Dovecot, dir: &Path, config: &str) -> Popbridge {
    let cfg = write_config(
        dir,
        &format!(
            "[listen]\nproxy_protocol = true\nproxy_trusted = [\"127.0.0.0/8\"]\n[auth]\nplaintext_networks = [\"0.0.0.0/0\", \"::/0\"]\n{config}"
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
}

/// A PROXY v1 header declaring `ip` as the client.
fn from(ip: &str) -> String {
    if ip.contains(':') {
        format!("PROXY TCP6 {ip} ::1 40000 110\r\n")
    } else {
        format!("PROXY TCP4 {ip} 127.0.0.1 40000 110\r\n")
    }
}

/// USER + PASS from `ip`; the answer to PASS.
fn try_login(port: u16, ip: &str, user: &str, pass: &str) -> String {
    let mut c = connect_with(port, &from(ip));
    let r = c.cmd(&format!("USER {user}"));
    assert!(r.starts_with("+OK"), "USER {user}: {r}");
    let r = c.cmd(&format!("PASS {pass}"));
    let _ = c.cmd("QUIT");
    r
}

/// Runs `n` logins at once (released together by a barrier); returns the
/// answers to PASS.
fn parallel_logins(
    port: u16,
    n: usize,
    login: impl Fn(usize) -> (String, String, String) + Sync,
) -> Vec<String> {
    let barrier = std::sync::Barrier::new(n);
    thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (barrier, login) = (&barrier, &login);
                s.spawn(move || {
                    let (ip, user, pass) = login(i);
                    let mut c = connect_with(port, &from(&ip));
                    let r = c.cmd(&format!("USER {user}"));
                    assert!(r.starts_with("+OK"), "USER {user}: {r}");
                    barrier.wait();
                    let r = c.cmd(&format!("PASS {pass}"));
                    let _ = c.cmd("QUIT");
                    r
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// 40 wrong passwords for one user, all at once, from one address: only
/// `max_failures_per_user` reach Dovecot (attempts in flight count against
/// the limit); and 40 at once for 40 users from one address: only
/// `max_failures_per_ip` do.
#[test]
fn concurrent_guesses_do_not_pass_the_throttle() {
    let dovecot = fast_dovecot();
    let dir = tempfile::tempdir().unwrap();
    let pb = proxied_popbridge(
        &dovecot,
        dir.path(),
        "failure_delay_ms = 10\nmax_failures_per_user = 10\nmax_failures_per_ip = 20\n",
    );
    let answers = parallel_logins(pb.port, 40, |i| {
        ("198.51.100.7".into(), "bob".into(), format!("guess{i}"))
    });
    for a in &answers {
        assert!(a.starts_with("-ERR"), "{a}");
    }
    let refused = answers
        .iter()
        .filter(|a| a.contains("Too many failed logins"))
        .count();
    wait_until_stable(|| dovecot_failures(&dovecot, "bob"));
    let reached = dovecot_failures(&dovecot, "bob");
    assert!(
        reached <= 10,
        "{reached} of 40 parallel guesses for bob reached Dovecot (limit 10); {refused} were refused"
    );
    assert_eq!(reached + refused, 40, "{answers:?}");

    // Per address: 40 users at once from one address.
    let answers = parallel_logins(pb.port, 40, |i| {
        ("198.51.100.8".into(), format!("nobody{i}"), "guess".into())
    });
    let refused = answers
        .iter()
        .filter(|a| a.contains("Too many failed logins"))
        .count();
    let before = reached;
    wait_until_stable(|| all_dovecot_failures(&dovecot));
    let reached = all_dovecot_failures(&dovecot) - before;
    assert!(
        reached <= 20,
        "{reached} of 40 parallel guesses from one address reached Dovecot (limit 20)"
    );
    assert_eq!(reached + refused, 40, "{answers:?}");
}

/// Waits until `count()` has stopped changing for a while (Dovecot logs
/// failures a little after it answers); bounded.
pub(crate) fn wait_until_stable(count: impl Fn() -> usize) {
    let mut last = count();
    let mut same = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while same < 10 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        let now = count();
        if now == last {
            same += 1;
        } else {
            same = 0;
            last = now;
        }
    }
}

/// The per-user limit is not a switch that locks the real user out: an
/// address that logged in to the account before keeps logging in while
/// guesses from elsewhere are refused; refused attempts do not extend the
/// lock, which ends one window after it began however often the attacker
/// knocks.
#[test]
fn guessing_cannot_lock_the_real_user_out() {
    let dovecot = fast_dovecot();
    let dir = tempfile::tempdir().unwrap();
    let window = Duration::from_secs(2);
    let pb = proxied_popbridge(
        &dovecot,
        dir.path(),
        "failure_delay_ms = 10\nmax_failures_per_user = 3\nmax_failures_per_ip = 100\nfailure_window_secs = 2\n",
    );
    // The real user's device logs in as usual.
    let home = "192.0.2.10";
    assert!(try_login(pb.port, home, "bob", "secret").starts_with("+OK"));
    // An attacker uses up the per-user limit from other addresses.
    for i in 0..3 {
        let r = try_login(pb.port, &format!("203.0.113.{i}"), "bob", "guess");
        assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    }
    let locked_at = Instant::now();
    let r = try_login(pb.port, "203.0.113.50", "bob", "secret");
    assert!(
        r.contains("Too many failed logins"),
        "a new address during the lock: {r}"
    );
    // The real user's address is spared.
    let r = try_login(pb.port, home, "bob", "secret");
    assert!(
        r.starts_with("+OK"),
        "the real user's known address during the lock: {r}"
    );
    // The attacker keeps knocking; each knock is refused without reaching
    // Dovecot and without extending the lock, so within some 10 windows a
    // knock gets through to Dovecot again (-ERR [AUTH], not the throttle).
    let reached_before = dovecot_failures(&dovecot, "bob");
    let mut knocks = 0;
    let got_through = loop {
        let r = try_login(
            pb.port,
            &format!("203.0.113.{}", 100 + knocks % 100),
            "bob",
            "guess",
        );
        knocks += 1;
        if r.starts_with("-ERR [AUTH]") {
            break true;
        }
        assert!(r.contains("Too many failed logins"), "{r}");
        if locked_at.elapsed() > window * 10 {
            break false;
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert!(
        got_through,
        "{knocks} refused knocks kept bob locked for {:?} (window {window:?})",
        locked_at.elapsed()
    );
    assert!(locked_at.elapsed() >= window / 2, "the lock ended early");
    wait_until_stable(|| dovecot_failures(&dovecot, "bob"));
    assert_eq!(
        dovecot_failures(&dovecot, "bob"),
        reached_before + 1,
        "refused knocks reached Dovecot"
    );
}

/// The per-user count is per upstream account: `per-device` logins
/// `bob+d0`, `bob+d1`, ... are all bob upstream; with `login =
/// "local-part"`, bob@a.example and bob@b.example are too.
#[test]
fn the_per_user_limit_counts_the_upstream_account() {
    let dovecot = fast_dovecot();
    let dir = tempfile::tempdir().unwrap();
    let pb = proxied_popbridge(
        &dovecot,
        dir.path(),
        "failure_delay_ms = 10\nmax_failures_per_user = 3\nmax_failures_per_ip = 100\n[pop3]\ndelete_policy = \"per-device\"\n",
    );
    let mut refused = 0;
    for i in 0..15 {
        let r = try_login(
            pb.port,
            &format!("203.0.113.{i}"),
            &format!("bob+d{i}"),
            "guess",
        );
        if r.contains("Too many failed logins") {
            refused += 1;
        }
    }
    wait_until_stable(|| dovecot_failures(&dovecot, "bob"));
    assert_eq!(dovecot_failures(&dovecot, "bob"), 3, "per-device logins");
    assert_eq!(refused, 12);
    drop(pb);

    let dovecot = fast_dovecot();
    let pb = proxied_popbridge(
        &dovecot,
        dir.path(),
        "failure_delay_ms = 10\nmax_failures_per_user = 3\nmax_failures_per_ip = 100\n[upstream]\nlogin = \"local-part\"\n",
    );
    for i in 0..15 {
        try_login(
            pb.port,
            &format!("203.0.113.{i}"),
            &format!("bob@d{i}.example"),
            "guess",
        );
    }
    wait_until_stable(|| dovecot_failures(&dovecot, "bob"));
    assert_eq!(
        dovecot_failures(&dovecot, "bob"),
        3,
        "login = local-part across domains"
    );
}

/// IPv6 clients count per /64 (`limits.ipv6_prefix_len`): addresses of one
/// /64 share the per-address failure limit and session limit; another /64
/// is another client. With a prefix of 128, every address is its own.
#[test]
fn ipv6_clients_count_per_prefix() {
    let dovecot = fast_dovecot();
    let dir = tempfile::tempdir().unwrap();
    let pb = proxied_popbridge(
        &dovecot,
        dir.path(),
        "failure_delay_ms = 10\nmax_failures_per_user = 100\nmax_failures_per_ip = 3\n[limits]\nmax_sessions_per_ip = 2\n",
    );
    let mut refused = 0;
    for i in 1..=25 {
        let r = try_login(
            pb.port,
            &format!("2001:db8:1:2::{i:x}"),
            &format!("user{i}"),
            "guess",
        );
        if r.contains("Too many failed logins") {
            refused += 1;
        }
    }
    wait_until_stable(|| all_dovecot_failures(&dovecot));
    assert_eq!(
        all_dovecot_failures(&dovecot),
        3,
        "guesses from one /64 reached Dovecot"
    );
    assert_eq!(refused, 22);
    // Another /64 is another client.
    let r = try_login(pb.port, "2001:db8:1:3::1", "alice", "secret");
    assert!(r.starts_with("+OK"), "{r}");
    // Sessions: two from one /64, the third (another address in it) refused.
    let a = connect_with(pb.port, &from("2001:db8:1:4::1"));
    let b = connect_with(pb.port, &from("2001:db8:1:4::2"));
    let c = connect_with(pb.port, &from("2001:db8:1:4::3"));
    assert!(a.greeting().starts_with("+OK") && b.greeting().starts_with("+OK"));
    assert!(
        c.greeting().starts_with("-ERR [SYS/TEMP]"),
        "{}",
        c.greeting()
    );
    drop(pb);

    let dovecot = fast_dovecot();
    let pb = proxied_popbridge(
        &dovecot,
        dir.path(),
        "failure_delay_ms = 10\nmax_failures_per_user = 100\nmax_failures_per_ip = 3\n[limits]\nipv6_prefix_len = 128\n",
    );
    for i in 1..=6 {
        let r = try_login(
            pb.port,
            &format!("2001:db8:1:2::{i:x}"),
            &format!("user{i}"),
            "guess",
        );
        assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    }
}

// ---------------------------------------------------------------------------
// Memory across waves of sessions (item 14): a measurement, not a check
// ---------------------------------------------------------------------------

/// popbridge's VmRSS in KiB.
fn vm_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// Opens `n` sessions (USER, PASS, STAT) over `users` accounts from 8
/// threads and holds them; returns them.
fn open_sessions(port: u16, n: usize, users: usize) -> Vec<Pop3> {
    let per = n.div_ceil(8);
    thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                s.spawn(move || {
                    (t * per..((t + 1) * per).min(n))
                        .map(|i| {
                            let mut c = Pop3::connect(port);
                            c.login(&format!("wave{}", i % users), "secret");
                            c.stat();
                            c
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

/// Waves of 2,000 idle sessions (login, STAT, hold, QUIT) against one
/// popbridge process, printing VmRSS at each step: memory that grows wave
/// after wave is a leak, memory that comes back to the same plateau is the
/// allocator keeping freed pages. Run by hand:
/// `cargo test --test it -- --ignored --nocapture rss_across_waves`
/// (`POPBRIDGE_WAVES`, at least 3, and `POPBRIDGE_WAVE_SESSIONS` change the
/// plan; the environment reaches popbridge, so `MALLOC_ARENA_MAX=2` and the
/// like can be compared).
///
/// Measured (issue 17 item 14; glibc 2.36, 2 cores): a release build
/// holds 12 MB after warm-up, then 73.3, 80.1, 81.3, 82.3, 82.4, 82.5 MB
/// after each of six waves' QUIT (+61, +6.7, +1.2, +1.0, +0.1, +0.04 MB); a
/// debug build 27 MB, then 88, 95, 97, 98, 98, 98, 98, 98 MB over eight
/// waves. The first wave's peak is kept (glibc does not hand the freed
/// heap back), later waves add less and less, then nothing: allocator
/// retention, not a leak. `MALLOC_ARENA_MAX=2` gave the same numbers.
///
/// Ignored because the numbers depend on the machine, but it fails on a
/// leak: the last wave may add at most a quarter of what the first added
/// (measured: 3% or less at wave 3, nothing from wave 6). A session's
/// whole memory (about 30 KiB) kept would add as much every wave as the
/// first; anything above about 8 KiB a session fails.
#[test]
#[ignore = "a measurement (minutes), not a check"]
fn rss_across_waves_of_idle_sessions() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (waves, sessions, users) = (
        env("POPBRIDGE_WAVES", 4).max(3),
        env("POPBRIDGE_WAVE_SESSIONS", 2000),
        20,
    );
    // Each session is a socket here (and two in popbridge, which raises
    // its own limit).
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let mut conf = String::from("mail_max_userip_connections = 100000\n");
    for proto in ["pop3", "imap"] {
        conf.push_str(&format!(
            "service {proto}-login {{\n  service_count = 0\n  process_min_avail = 2\n  \
             client_limit = 1000\n  process_limit = 8\n}}\n\
             service {proto} {{\n  service_count = 0\n  client_limit = 250\n  \
             process_limit = 40\n  process_min_avail = 2\n}}\n"
        ));
    }
    let dovecot = Dovecot::start_with(DovecotOptions {
        users: (0..users)
            .map(|i| (format!("wave{i}"), "secret".to_string()))
            .collect(),
        extra_conf: conf,
        ..DovecotOptions::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "[limits]\nmax_sessions = 10000\nmax_sessions_per_ip = 10000\n",
    );
    let pb = Popbridge::start_with_log(
        dovecot.imap_port,
        &["--config", cfg.to_str().unwrap()],
        "info",
    );
    let pid = pb.pid();
    let settle = || thread::sleep(Duration::from_secs(3));
    // Warm-up: one session per account (listing cache, runtime state).
    drop(open_sessions(pb.port, users, users));
    settle();
    let base = vm_rss_kib(pid);
    eprintln!("rss: start {} KiB (after warm-up)", base);
    // RSS after each wave's QUIT, the warm-up first.
    let mut after_wave = vec![base];
    for wave in 1..=waves {
        let open = open_sessions(pb.port, sessions, users);
        let held = vm_rss_kib(pid);
        for mut c in open {
            c.quit();
        }
        settle();
        let after = vm_rss_kib(pid);
        eprintln!(
            "rss: wave {wave}: {sessions} sessions held {held} KiB ({:.1} KiB/session), after QUIT {after} KiB (+{} KiB)",
            (held.saturating_sub(base)) as f64 / sessions as f64,
            after.saturating_sub(after_wave[wave - 1]),
        );
        after_wave.push(after);
    }
    let growth = |w: usize| after_wave[w].saturating_sub(after_wave[w - 1]);
    let (first, last) = (growth(1), growth(waves));
    assert!(
        last * 4 < first.max(1),
        "RSS still grows: wave 1 added {first} KiB, wave {waves} {last} KiB (more than a quarter): a leak? {after_wave:?}"
    );
}
