//! Security properties of popbridge against a real Dovecot: credentials
//! reach the IMAP server intact and never as IMAP syntax, session limits,
//! failed-login throttling, hostile input, a client that stops reading, and
//! passwords kept out of the logs.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::logs::wait_for_log;
use crate::common::ports::ClosedPort;
use crate::common::{
    corpus_message, find, literal_len, Dovecot, DovecotOptions, Imap, Pop3, Popbridge,
};
use base64::Engine as _;

/// Upper bound for every poll.
const POLL_LIMIT: Duration = Duration::from_secs(20);

/// Dovecot settings that keep failed logins fast: no 2 s failure delay and
/// no per-address auth penalty (anvil), which would otherwise slow every
/// later login from 127.0.0.1 by up to 15 s.
const FAST_FAILURES: &str = "auth_failure_delay = 0\n\
service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n";

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + POLL_LIMIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("popbridge.toml");
    fs::write(&path, text).expect("write config");
    path
}

fn users(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(u, p)| (u.to_string(), p.to_string()))
        .collect()
}

// ---------------------------------------------------------------------------
// A recording TCP relay between popbridge and Dovecot
// ---------------------------------------------------------------------------

/// One relayed connection: what popbridge sent, and whether both
/// directions have ended.
struct RelayConn {
    to_server: Mutex<Vec<u8>>,
    ended: AtomicUsize,
}

/// Forwards connections to Dovecot's IMAP port, recording the bytes
/// popbridge sends. With `hide_auth_plain`, " AUTH=PLAIN" is removed from
/// the server's CAPABILITY lines, so popbridge must use LOGIN.
struct Relay {
    port: u16,
    conns: Arc<Mutex<Vec<Arc<RelayConn>>>>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn start(upstream: u16, hide_auth_plain: bool) -> Relay {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind relay");
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<Arc<RelayConn>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (conns.clone(), stop.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let server = TcpStream::connect((Ipv4Addr::LOCALHOST, upstream))
                    .expect("relay: connect to Dovecot");
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let rec = Arc::new(RelayConn {
                    to_server: Mutex::default(),
                    ended: AtomicUsize::new(0),
                });
                c.lock().unwrap().push(rec.clone());
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let r = rec.clone();
                thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    loop {
                        match c_in.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                r.to_server.lock().unwrap().extend_from_slice(&buf[..n]);
                                if s_out.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = s_out.shutdown(Shutdown::Write);
                    r.ended.fetch_add(1, Ordering::SeqCst);
                });
                let (s_in, mut c_out) = (server, client);
                thread::spawn(move || {
                    let mut reader = BufReader::new(s_in);
                    let mut line = Vec::new();
                    loop {
                        line.clear();
                        match reader.read_until(b'\n', &mut line) {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                        if hide_auth_plain && find(&line, b"CAPABILITY").is_some() {
                            while let Some(i) = find(&line, b" AUTH=PLAIN") {
                                line.drain(i..i + b" AUTH=PLAIN".len());
                            }
                        }
                        if c_out.write_all(&line).is_err() {
                            break;
                        }
                    }
                    let _ = c_out.shutdown(Shutdown::Write);
                    rec.ended.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Relay { port, conns, stop }
    }

    fn count(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    /// What popbridge sent on connection `i`, once it has ended.
    fn sent(&self, i: usize) -> Vec<u8> {
        let conn = self.conns.lock().unwrap()[i].clone();
        wait_until("the relayed IMAP connection to end", || {
            conn.ended.load(Ordering::SeqCst) == 2
        });
        let bytes = conn.to_server.lock().unwrap().clone();
        bytes
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
    }
}

/// Splits a client's IMAP byte stream into logical lines (without CRLF); a
/// line ending in a literal marker `{n}` or `{n+}` goes on after the n
/// literal octets (kept inline).
fn logical_lines(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut lines = Vec::new();
    let mut cur = Vec::new();
    while !bytes.is_empty() {
        let Some(lf) = bytes.iter().position(|&b| b == b'\n') else {
            cur.extend_from_slice(bytes);
            break;
        };
        let line = &bytes[..=lf];
        bytes = &bytes[lf + 1..];
        let body = line.strip_suffix(b"\r\n").unwrap_or(line);
        if let Some(n) = literal_len(body) {
            cur.extend_from_slice(line);
            let n = n.min(bytes.len());
            cur.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
        } else {
            cur.extend_from_slice(body);
            lines.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

/// The arguments of one logical IMAP line: atoms, quoted strings (unescaped)
/// and literals. Panics on malformed syntax.
fn imap_args(line: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < line.len() {
        match line[i] {
            b' ' => i += 1,
            b'"' => {
                let mut s = Vec::new();
                i += 1;
                loop {
                    match line.get(i) {
                        None => panic!("unterminated quoted string in {:?}", show(line)),
                        Some(b'\\') => {
                            s.push(*line.get(i + 1).expect("escape at end"));
                            i += 2;
                        }
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(&c) => {
                            s.push(c);
                            i += 1;
                        }
                    }
                }
                out.push(s);
            }
            b'{' => {
                let close = i + line[i..]
                    .iter()
                    .position(|&b| b == b'}')
                    .expect("literal }");
                let n = literal_len(&line[i..=close]).expect("literal length");
                let start = close + 3; // "}\r\n"
                out.push(line[start..start + n].to_vec());
                i = start + n;
            }
            _ => {
                let end = line[i..]
                    .iter()
                    .position(|&b| b == b' ')
                    .map_or(line.len(), |p| i + p);
                out.push(line[i..end].to_vec());
                i = end;
            }
        }
    }
    out
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Checks one relayed IMAP session: a login carrying exactly `user` and
/// `pass` (AUTHENTICATE PLAIN plus one continuation, or LOGIN), then
/// CAPABILITY, SELECT, at most one UID FETCH (none when popbridge reuses a
/// cached listing) and a final LOGOUT; one line per command, nothing else.
fn check_session(sent: &[u8], user: &str, pass: &str, want_login: bool) {
    let lines = logical_lines(sent);
    let context = || {
        format!(
            "user {user:?}, password {pass:?}; popbridge sent:\n{}",
            show(sent)
        )
    };
    let login = if want_login { "LOGIN" } else { "AUTHENTICATE" };
    // SELECT is followed by `UID SEARCH KEYWORD $PopbridgeExpunge` (an
    // interrupted QUIT's flags) and, unless the listing is cached, the
    // listing's UID FETCH.
    let listed = [login, "CAPABILITY", "SELECT", "UID", "UID", "LOGOUT"];
    let cached = [login, "CAPABILITY", "SELECT", "UID", "LOGOUT"];
    let mut tags = Vec::new();
    let mut names = Vec::new();
    let mut it = lines.iter();
    while let Some(line) = it.next() {
        let args = imap_args(line);
        assert!(
            args.len() >= 2,
            "not a command line {:?}; {}",
            show(line),
            context()
        );
        let tag = &args[0];
        assert!(
            tag.iter().all(u8::is_ascii_alphanumeric),
            "odd tag in {:?}; {}",
            show(line),
            context()
        );
        assert!(
            !tags.contains(tag),
            "tag reused in {:?}; {}",
            show(line),
            context()
        );
        tags.push(tag.clone());
        let name = show(&args[1]).to_ascii_uppercase();
        match name.as_str() {
            "AUTHENTICATE" => {
                assert_eq!(
                    show(&args[2]).to_ascii_uppercase(),
                    "PLAIN",
                    "{}",
                    context()
                );
                // The response: an initial response (SASL-IR) or one line.
                let response = match args.get(3) {
                    Some(r) => r.clone(),
                    None => it
                        .next()
                        .unwrap_or_else(|| panic!("no SASL response; {}", context()))
                        .clone(),
                };
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(&response)
                    .unwrap_or_else(|e| panic!("SASL response is not base64 ({e}); {}", context()));
                let mut want = vec![0u8];
                want.extend_from_slice(user.as_bytes());
                want.push(0);
                want.extend_from_slice(pass.as_bytes());
                assert!(
                    decoded == want,
                    "PLAIN response {:?} differs; {}",
                    show(&decoded),
                    context()
                );
            }
            "LOGIN" => {
                assert_eq!(
                    args.len(),
                    4,
                    "LOGIN must have two arguments; {}",
                    context()
                );
                assert_eq!(show(&args[2]), user, "LOGIN user name; {}", context());
                assert_eq!(show(&args[3]), pass, "LOGIN password; {}", context());
            }
            _ => {}
        }
        names.push(name);
    }
    assert!(
        names == listed || names == cached,
        "commands {names:?}, want {listed:?} or {cached:?}; {}",
        context()
    );
    if names == listed {
        let fetch = show(lines.iter().rev().nth(1).unwrap());
        assert!(
            fetch.ends_with(" (UID RFC822.SIZE)") && fetch.contains(" UID FETCH "),
            "unexpected UID command {fetch:?}; {}",
            context()
        );
    }
}

// ---------------------------------------------------------------------------
// 1. Credentials arrive intact, never as syntax
// ---------------------------------------------------------------------------

/// (login name, passwd-file name, password). Dovecot's passwd-file looks a
/// name up with `"` and `\` escaped, so the file must hold the escaped form.
const AWKWARD: &[(&str, &str, &str)] = &[
    ("quote", "quote", "pa\"ss"),
    ("backslash", "backslash", "pa\\ss\\"),
    ("literal", "literal", "{5}"),
    ("literalplus", "literalplus", "x{5+}"),
    ("spaces", "spaces", " lead mid  trail "),
    ("specials", "specials", ")(*%]["),
    ("utf8", "utf8", "\u{e9}\u{65e5}\u{672c}"),
    ("logout1", "logout1", "x\" LOGOUT"),
    ("logout2", "logout2", "a} A0002 LOGOUT {3}"),
    ("logout3", "logout3", "\\\" A9 LOGOUT \\"),
    ("q\"uote", "q\\\"uote", "pw\""),
    ("back\\slash", "back\\\\slash", "\\"),
    ("us\u{e9}r", "us\u{e9}r", "p w"),
];

fn awkward_dovecot() -> Dovecot {
    let mut list: Vec<(String, String)> = AWKWARD
        .iter()
        .map(|(_, file, pass)| (file.to_string(), pass.to_string()))
        .collect();
    list.push(("nul".into(), "a".into()));
    list.push(("alice".into(), "secret".into()));
    Dovecot::start_with(DovecotOptions {
        users: list,
        // Quotes and backslashes are not in the default auth_username_chars.
        extra_conf: format!("auth_username_chars =\n{FAST_FAILURES}"),
        ..DovecotOptions::default()
    })
}

fn login_all(pb: &Popbridge, relay: &Relay, dovecot: &Dovecot, want_login: bool) {
    for (user, _, pass) in AWKWARD {
        for method in ["USER/PASS", "AUTH PLAIN"] {
            let before = relay.count();
            let mut c = Pop3::connect(pb.port);
            if method == "USER/PASS" {
                let r = c.cmd(&format!("USER {user}"));
                assert!(r.starts_with("+OK"), "USER {user:?}: {r}");
                let r = c.cmd(&format!("PASS {pass}"));
                assert!(
                    r.starts_with("+OK"),
                    "{method} for {user:?} with password {pass:?}: {r}\n{}",
                    dovecot.log()
                );
            } else {
                let blob = format!("\0{user}\0{pass}");
                let r = c.cmd(&format!("AUTH PLAIN {}", b64(blob.as_bytes())));
                assert!(
                    r.starts_with("+OK"),
                    "{method} for {user:?} with password {pass:?}: {r}\n{}",
                    dovecot.log()
                );
            }
            assert_eq!(c.stat().0, 1, "{user:?}");
            c.quit();
            assert_eq!(relay.count(), before + 1, "one IMAP connection per login");
            check_session(&relay.sent(before), user, pass, want_login);
        }
    }
}

#[test]
fn awkward_credentials_arrive_intact_and_never_as_syntax() {
    let dovecot = awkward_dovecot();
    for (user, _, _) in AWKWARD {
        dovecot.deliver(user, &corpus_message("plain_crlf"));
    }
    // AUTHENTICATE PLAIN (Dovecot offers AUTH=PLAIN). One IMAP login per
    // POP3 login: no session reuse.
    let (_dir, no_reuse) = crate::common::no_reuse_config();
    let no_reuse = ["--config", no_reuse.to_str().unwrap()];
    let relay = Relay::start(dovecot.imap_port, false);
    let pb = Popbridge::start(relay.port, &no_reuse);
    login_all(&pb, &relay, &dovecot, false);
    drop(pb);
    // LOGIN with quoted strings (AUTH=PLAIN hidden by the relay).
    let relay = Relay::start(dovecot.imap_port, true);
    let pb = Popbridge::start(relay.port, &no_reuse);
    login_all(&pb, &relay, &dovecot, true);
    let logins = AWKWARD.len() * 4;
    let log = wait_for_log(|| dovecot.log(), "imap-login: Info: Login: ", logins);
    assert!(
        !log.contains("auth failed") && !log.contains("Password mismatch"),
        "a login failed at Dovecot:\n{log}"
    );

    // NUL never reaches the upstream: a password "a\0b" cut at the NUL
    // would be "a", nul's real password.
    let before = relay.count();
    let mut c = Pop3::connect(pb.port);
    assert!(c.cmd("USER nul").starts_with("+OK"));
    let r = c.cmd("PASS a\0b");
    assert!(r.starts_with("-ERR [AUTH]"), "PASS with NUL: {r}");
    let r = c.cmd(&format!("AUTH PLAIN {}", b64(b"\0nul\0a\0b")));
    assert!(
        r.starts_with("-ERR [AUTH]"),
        "AUTH PLAIN with NUL in password: {r}"
    );
    assert_eq!(c.cmd("AUTH LOGIN"), "+ VXNlcm5hbWU6");
    assert_eq!(c.cmd(&b64(b"nul")), "+ UGFzc3dvcmQ6");
    let r = c.cmd(&b64(b"a\0b"));
    assert!(
        r.starts_with("-ERR [AUTH]"),
        "AUTH LOGIN with NUL in password: {r}"
    );
    assert_eq!(c.cmd("AUTH LOGIN"), "+ VXNlcm5hbWU6");
    let mut r = c.cmd(&b64(b"nul\0x"));
    if r == "+ UGFzc3dvcmQ6" {
        // Refused once the password is in, rather than at once: fine.
        r = c.cmd(&b64(b"a"));
    }
    assert!(
        r.starts_with("-ERR [AUTH]"),
        "AUTH LOGIN with NUL in user name: {r}"
    );
    let r = c.cmd("USER nul\0x");
    assert!(r.starts_with("-ERR"), "USER with NUL: {r}");
    c.quit();
    assert_eq!(
        relay.count(),
        before,
        "a NUL credential reached the IMAP server"
    );
    assert!(
        !dovecot.log().contains("nul,") && !dovecot.log().contains("user=<nul"),
        "Dovecot saw an auth attempt for nul:\n{}",
        dovecot.log()
    );
}

/// A 9 KB `AUTH PLAIN` initial response (RFC 5034 §4; the README promises
/// SASL lines up to 12,288 octets) is taken, and its credentials reach the
/// IMAP server intact. Dovecot refuses a SASL response over 8 KB itself
/// ("Authentication response too large"), so the login ends there with a
/// temporary error; what matters here is popbridge's side.
#[test]
fn a_9_kb_initial_response_reaches_the_imap_server() {
    let dovecot = Dovecot::start();
    let relay = Relay::start(dovecot.imap_port, false);
    let pb = Popbridge::start(relay.port, &[]);
    let pass = "p".repeat(6_800);
    let blob = b64(format!("\0alice\0{pass}").as_bytes());
    assert!(blob.len() > 9_000, "{}", blob.len());
    let mut c = Pop3::connect(pb.port);
    let r = c.cmd(&format!("AUTH PLAIN {blob}"));
    assert!(
        r.starts_with("-ERR [AUTH]") || r.starts_with("-ERR [SYS/TEMP]"),
        "AUTH PLAIN with a 9 KB initial response: {r}"
    );
    c.quit();
    assert_eq!(relay.count(), 1, "the login never reached the IMAP server");
    let sent = relay.sent(0);
    let lines = logical_lines(&sent);
    let at = lines
        .iter()
        .position(|l| find(l, b" AUTHENTICATE PLAIN").is_some())
        .unwrap_or_else(|| panic!("no AUTHENTICATE PLAIN in {}", show(&sent)));
    let args = imap_args(&lines[at]);
    let response = match args.get(3) {
        Some(r) => r.clone(),
        None => lines[at + 1].clone(),
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(&response)
        .expect("base64 SASL response");
    assert!(
        decoded == format!("\0alice\0{pass}").into_bytes(),
        "the credentials changed on the way ({} octets)",
        decoded.len()
    );
}

/// With `auth_mechanisms = login`, Dovecot offers neither AUTH=PLAIN nor
/// the LOGIN command (LOGINDISABLED): popbridge must answer with a
/// temporary error and send no credentials at all.
#[test]
fn upstream_without_plain_or_login_is_a_temporary_error() {
    let dovecot = Dovecot::start_with(DovecotOptions {
        extra_conf: "auth_mechanisms = login\n".into(),
        ..DovecotOptions::default()
    });
    let relay = Relay::start(dovecot.imap_port, false);
    let pb = Popbridge::start(relay.port, &[]);
    let mut c = Pop3::connect(pb.port);
    c.login_expect_err("alice", "secret", "-ERR [SYS/TEMP]");
    let sent = relay.sent(0);
    assert!(
        find(&sent, b"secret").is_none()
            && find(&sent, &b64(b"\0alice\0secret").into_bytes()).is_none(),
        "credentials were sent: {}",
        show(&sent)
    );
}

trait LoginExpect {
    fn login_expect_err(&mut self, user: &str, pass: &str, prefix: &str) -> String;
}

impl LoginExpect for Pop3 {
    fn login_expect_err(&mut self, user: &str, pass: &str, prefix: &str) -> String {
        let r = self.cmd(&format!("USER {user}"));
        assert!(r.starts_with("+OK"), "USER {user}: {r}");
        let r = self.cmd(&format!("PASS {pass}"));
        assert!(r.starts_with(prefix), "PASS for {user}: {r}, want {prefix}");
        r
    }
}

// ---------------------------------------------------------------------------
// 2, 3. Session limits
// ---------------------------------------------------------------------------

/// Opens connections until `limit` are in; the next is refused with
/// "-ERR [SYS/TEMP]" and closed; after one QUITs a new one is served.
fn check_session_limit(config: &str, limit: usize) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), config);
    // No login happens: the upstream is never used.
    let nothing = ClosedPort::new();
    let pb = Popbridge::start(nothing.port(), &["--config", cfg.to_str().unwrap()]);
    // The harness's readiness probe is a session too; let it end first.
    wait_for_log(|| pb.log(), "session ended", 1);
    let mut open: Vec<Pop3> = (0..limit).map(|_| Pop3::connect(pb.port)).collect();
    for c in &mut open {
        assert!(c.greeting().starts_with("+OK"), "{}", c.greeting());
        assert!(c.cmd("NOOP").starts_with("-ERR"), "session is live");
    }
    let mut over = Pop3::connect(pb.port);
    assert!(
        over.greeting().starts_with("-ERR [SYS/TEMP]"),
        "connection {} over the limit got {:?}",
        limit + 1,
        over.greeting()
    );
    assert!(over.eof(), "the refused connection must be closed");
    let mut first = open.remove(0);
    first.cmd("QUIT");
    assert!(first.eof());
    // The place is freed when popbridge finishes the session: poll.
    let deadline = Instant::now() + POLL_LIMIT;
    let mut fresh = loop {
        let c = Pop3::connect(pb.port);
        if c.greeting().starts_with("+OK") {
            break c;
        }
        assert!(Instant::now() < deadline, "no place freed after QUIT");
        thread::sleep(Duration::from_millis(20));
    };
    assert!(fresh.cmd("USER alice").starts_with("+OK"));
    // Still full.
    let mut over = Pop3::connect(pb.port);
    assert!(
        over.greeting().starts_with("-ERR [SYS/TEMP]"),
        "{}",
        over.greeting()
    );
    assert!(over.eof());
}

#[test]
fn per_address_session_limit() {
    check_session_limit("[limits]\nmax_sessions_per_ip = 2\n", 2);
}

#[test]
fn global_session_limit() {
    check_session_limit("[limits]\nmax_sessions = 2\n", 2);
}

// ---------------------------------------------------------------------------
// 4. Failed-login throttling
// ---------------------------------------------------------------------------

fn mismatches(dovecot: &Dovecot, user: &str) -> usize {
    let needle = format!("passwd-file({user},");
    dovecot
        .log()
        .lines()
        .filter(|l| {
            l.contains(&needle) && (l.contains("Password mismatch") || l.contains("unknown user"))
        })
        .count()
}

#[test]
fn failed_logins_are_throttled_per_user_and_per_address() {
    let dovecot = Dovecot::start_with(DovecotOptions {
        extra_conf: FAST_FAILURES.into(),
        ..DovecotOptions::default()
    });
    let dir = tempfile::tempdir().unwrap();

    // Per user name.
    let cfg = write_config(
        dir.path(),
        "[auth]\nfailure_delay_ms = 10\nmax_failures_per_user = 3\nmax_failures_per_ip = 100\n",
    );
    let relay = Relay::start(dovecot.imap_port, false);
    let pb = Popbridge::start(relay.port, &["--config", cfg.to_str().unwrap()]);
    let mut c = Pop3::connect(pb.port);
    for i in 0..3 {
        let r = c.login_expect_err("bob", &format!("wrong{i}"), "-ERR [AUTH]");
        assert!(r.contains("Authentication failed"), "{r}");
    }
    assert_eq!(relay.count(), 3);
    let r = c.login_expect_err("bob", "secret", "-ERR [SYS/TEMP]");
    assert!(r.contains("Too many failed logins"), "{r}");
    // Other spellings of the name count as the same user.
    let r = c.login_expect_err("BOB", "secret", "-ERR [SYS/TEMP]");
    assert!(r.contains("Too many failed logins"), "{r}");
    assert_eq!(
        relay.count(),
        3,
        "a throttled login reached the IMAP server"
    );
    wait_until("Dovecot to log 3 failures for bob", || {
        mismatches(&dovecot, "bob") >= 3
    });
    // alice, from the same address, is not affected.
    c.login("alice", "secret");
    assert_eq!(c.stat().0, 0);
    c.quit();
    wait_for_log(|| dovecot.log(), "Login: user=<alice>", 1);
    let log = dovecot.log();
    assert_eq!(
        mismatches(&dovecot, "bob"),
        3,
        "Dovecot saw other than 3 attempts for bob:\n{log}"
    );
    assert!(!log.contains("Login: user=<bob>"), "{log}");
    drop(pb);

    // Per address.
    let cfg = write_config(
        dir.path(),
        "[auth]\nfailure_delay_ms = 10\nmax_failures_per_user = 100\nmax_failures_per_ip = 3\n",
    );
    let relay = Relay::start(dovecot.imap_port, false);
    let pb = Popbridge::start(relay.port, &["--config", cfg.to_str().unwrap()]);
    for user in ["x1", "x2", "x3"] {
        let mut c = Pop3::connect(pb.port);
        c.login_expect_err(user, "guess", "-ERR [AUTH]");
    }
    assert_eq!(relay.count(), 3);
    let mut c = Pop3::connect(pb.port);
    let r = c.login_expect_err("alice", "secret", "-ERR [SYS/TEMP]");
    assert!(r.contains("Too many failed logins"), "{r}");
    assert_eq!(
        relay.count(),
        3,
        "a throttled login reached the IMAP server"
    );
    for user in ["x1", "x2", "x3"] {
        wait_until("Dovecot to log the failures", || {
            mismatches(&dovecot, user) >= 1
        });
    }
    assert_eq!(
        dovecot.log().matches("Login: user=<alice>").count(),
        1,
        "the throttled alice login reached Dovecot"
    );
}

// ---------------------------------------------------------------------------
// 5. A huge line without LF
// ---------------------------------------------------------------------------

#[test]
fn huge_line_without_lf_then_close_does_not_hurt() {
    let nothing = ClosedPort::new();
    let mut pb = Popbridge::start(nothing.port(), &[]);
    // In AUTHORIZATION, and inside a SASL exchange (longer line limit).
    for prefix in [&b""[..], b"AUTH PLAIN\r\n"] {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, pb.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(prefix).unwrap();
        let mut junk = vec![b'A'; 100 * 1024];
        junk[5000] = b'\r';
        junk[7000] = 0;
        let _ = s.write_all(&junk);
        let _ = s.shutdown(Shutdown::Write);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        let text = show(&rest);
        assert!(text.starts_with("+OK"), "{text}");
        assert!(
            !text.contains("\r\n+OK\r\n"),
            "a command ran from the junk: {text}"
        );
    }
    assert!(pb.try_wait().is_none(), "popbridge exited");
    let mut c = Pop3::connect(pb.port);
    assert!(c.cmd("USER alice").starts_with("+OK"));
    assert!(c.cmd("QUIT").starts_with("+OK"));
}

// ---------------------------------------------------------------------------
// 6. A client that stops reading
// ---------------------------------------------------------------------------

/// Logs in, asks for RETR 1 four times (pipelined) with a 4 KB receive
/// buffer, and reads nothing until a line arrives on stdin; then closes.
/// Four copies, because the kernel's send buffer on popbridge's side grows
/// to 4 MB (tcp_wmem) and would take one 3 MB message whole.
const SLOW_READER: &str = r#"
import socket, sys
port = int(sys.argv[1])
RETRS = 4
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.connect(('127.0.0.1', port))
def line():
    buf = b''
    while not buf.endswith(b'\n'):
        c = s.recv(1)
        if not c:
            break
        buf += c
    return buf.decode().strip()
print('GREETING', line())
s.sendall(b'USER alice\r\n'); print('USER', line())
s.sendall(b'PASS secret\r\n'); print('PASS', line())
s.sendall(b'RETR 1\r\n' * RETRS)
print('LOCALPORT', s.getsockname()[1], flush=True)
sys.stdin.readline()
s.close()
print('CLOSED', flush=True)
"#;

fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// Bytes in the kernel queues of the TCP connection 127.0.0.1:a <-> :b
/// (send queue on one end plus receive queue on the other), from
/// /proc/net/tcp.
fn queued(a: u16, b: u16) -> u64 {
    let table = fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let mut total = 0;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let port = |s: &str| u16::from_str_radix(s.rsplit(':').next().unwrap(), 16).unwrap();
        let (local, remote) = (port(f[1]), port(f[2]));
        if (local, remote) == (a, b) || (local, remote) == (b, a) {
            let (tx, rx) = f[4].split_once(':').unwrap();
            total += u64::from_str_radix(tx, 16).unwrap() + u64::from_str_radix(rx, 16).unwrap();
        }
    }
    total
}

#[test]
fn slow_reader_does_not_grow_memory_or_block_others() {
    const LIMIT_KIB: u64 = 64 * 1024;
    let dovecot = Dovecot::start();
    let message = corpus_message("big_attachment");
    dovecot.deliver("alice", &message);
    let pb = Popbridge::start(dovecot.imap_port, &[]);
    let pid = pb.pid();
    let idle_rss = rss_kib(pid);

    let mut slow = Command::new("python3")
        .arg("-c")
        .arg(SLOW_READER)
        .arg(pb.port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run python3");
    let mut slow_out = BufReader::new(slow.stdout.take().unwrap());
    let mut slow_in = slow.stdin.take().unwrap();
    let mut local_port = 0u16;
    let mut transcript = String::new();
    for _ in 0..4 {
        let mut l = String::new();
        slow_out.read_line(&mut l).unwrap();
        transcript.push_str(&l);
        if let Some(p) = l.trim().strip_prefix("LOCALPORT ") {
            local_port = p.parse().unwrap();
        }
    }
    assert!(transcript.contains("PASS +OK"), "slow reader: {transcript}");
    assert!(local_port != 0, "{transcript}");

    // Stalled: popbridge wrote something, the queues stopped growing, and
    // they hold far less than the message, so popbridge is waiting.
    let mut last = u64::MAX;
    wait_until("the slow connection's queues to stop growing", || {
        let q = queued(pb.port, local_port);
        let settled = q > 0 && q == last;
        last = q;
        if !settled {
            thread::sleep(Duration::from_millis(200));
        }
        settled
    });
    let requested = 4 * message.len() as u64;
    assert!(
        last < requested / 2,
        "the kernel took {last} of {requested} octets: the slow reader is not stalled, \
         so this test cannot check popbridge's memory"
    );
    eprintln!("slow reader stalled with {last} of {requested} octets in kernel queues");

    // Meanwhile another client gets the whole message.
    let mut peak = rss_kib(pid);
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        thread::spawn(move || {
            let mut peak = 0;
            while sampling.load(Ordering::SeqCst) {
                peak = peak.max(rss_kib(pid));
                thread::sleep(Duration::from_millis(5));
            }
            peak
        })
    };
    let mut fast = Pop3::connect(pb.port);
    fast.login("alice", "secret");
    let got = fast.retr(1);
    fast.quit();
    sampling.store(false, Ordering::SeqCst);
    peak = peak.max(sampler.join().unwrap()).max(rss_kib(pid));
    assert!(
        got == message,
        "the second client's RETR differs ({} vs {} octets)",
        got.len(),
        message.len()
    );
    let still = queued(pb.port, local_port);
    assert!(
        still < requested / 2,
        "the slow reader stopped being stalled ({still} octets queued)"
    );
    eprintln!("popbridge RSS: idle {idle_rss} KiB, peak {peak} KiB while a reader was stalled");
    assert!(
        peak < LIMIT_KIB,
        "popbridge RSS reached {peak} KiB (limit {LIMIT_KIB})"
    );

    // The slow reader goes away: its session ends and nothing is deleted.
    slow_in.write_all(b"go\n").unwrap();
    drop(slow_in);
    let mut l = String::new();
    slow_out.read_line(&mut l).unwrap();
    assert_eq!(l.trim(), "CLOSED");
    let _ = slow.wait();
    wait_for_log(|| pb.log(), "session ended", 2);
    let mut imap = Imap::connect(dovecot.imap_port, "alice", "secret");
    let uids = imap.uids();
    assert_eq!(uids.len(), 1, "message count changed");
    let flags = imap.flags(uids[0]);
    assert!(!flags.iter().any(|f| f == "\\Deleted"), "{flags:?}");
    imap.logout();
}

// ---------------------------------------------------------------------------
// 7. No passwords in the logs, even at trace level
// ---------------------------------------------------------------------------

#[test]
fn passwords_never_reach_the_log_at_trace_level() {
    const GOOD: &str = "Zebra-Secret-9137";
    const BAD: &str = "Wrong-Guess-4242";
    let dovecot = Dovecot::start_with(DovecotOptions {
        users: users(&[("carol", GOOD)]),
        extra_conf: FAST_FAILURES.into(),
        ..DovecotOptions::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "[auth]\nfailure_delay_ms = 10\n");
    let pb = Popbridge::start_with_log(
        dovecot.imap_port,
        &["--config", cfg.to_str().unwrap()],
        "trace",
    );
    let mut sent_b64: Vec<String> = Vec::new();
    let mut plain = |c: &mut Pop3, authzid: &str, pass: &str, inline: bool| -> String {
        let blob = b64(format!("{authzid}\0carol\0{pass}").as_bytes());
        sent_b64.push(blob.clone());
        if inline {
            c.cmd(&format!("AUTH PLAIN {blob}"))
        } else {
            assert_eq!(c.cmd("AUTH PLAIN"), "+ ");
            c.cmd(&blob)
        }
    };
    let mut c = Pop3::connect(pb.port);
    assert!(plain(&mut c, "", BAD, true).starts_with("-ERR [AUTH]"));
    assert!(plain(&mut c, "", BAD, false).starts_with("-ERR [AUTH]"));
    assert!(plain(&mut c, "other", GOOD, true).starts_with("-ERR [AUTH]"));
    assert!(plain(&mut c, "", &format!("{GOOD}\0x"), true).starts_with("-ERR [AUTH]"));
    assert!(plain(&mut c, "carol", GOOD, false).starts_with("+OK"));
    c.quit();
    let mut c = Pop3::connect(pb.port);
    assert!(plain(&mut c, "", GOOD, true).starts_with("+OK"));
    c.quit();
    for pass in [BAD, GOOD] {
        let mut c = Pop3::connect(pb.port);
        assert_eq!(c.cmd("AUTH LOGIN"), "+ VXNlcm5hbWU6");
        assert_eq!(c.cmd(&b64(b"carol")), "+ UGFzc3dvcmQ6");
        let r = c.cmd(&b64(pass.as_bytes()));
        assert_eq!(r.starts_with("+OK"), pass == GOOD, "AUTH LOGIN: {r}");
        c.cmd("QUIT");
        let mut c = Pop3::connect(pb.port);
        assert!(c.cmd("USER carol").starts_with("+OK"));
        let r = c.cmd(&format!("PASS {pass}"));
        assert_eq!(r.starts_with("+OK"), pass == GOOD, "PASS: {r}");
        c.cmd("QUIT");
    }
    wait_for_log(|| pb.log(), "session ended", 6);
    let log = pb.log();
    assert!(
        log.contains("carol"),
        "the log does not show the logins at all:\n{log}"
    );
    assert!(log.contains("DEBUG"), "trace/debug output missing:\n{log}");
    let mut forbidden: Vec<String> = vec![
        GOOD.into(),
        BAD.into(),
        "Zebra".into(),
        "Wrong-Guess".into(),
        b64(GOOD.as_bytes()),
        b64(BAD.as_bytes()),
    ];
    forbidden.extend(sent_b64);
    for f in &forbidden {
        assert!(!log.contains(f.as_str()), "the log contains {f:?}:\n{log}");
    }
}
