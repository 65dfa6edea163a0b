//! Operating popbridge: routing across several upstreams, per-route UIDL
//! formats, the PROXY protocol, the admin listener (metrics, health,
//! readiness), SIGTERM drain, SIGHUP reload and JSON logs. Everything runs
//! against real Dovecot instances; mailbox state is checked over IMAP or
//! against Dovecot's own POP3 server.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::common;
use crate::common::logs::wait_session_ended;
use crate::common::raw_pop3::{is_reset, RawPop3};
use crate::common::{base64, Dovecot, DovecotOptions, Imap, Pop3, Popbridge};

/// Upper bound of every poll in this file.
const POLL: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A Dovecot with exactly these users.
fn dovecot(users: &[(&str, &str)], extra_conf: &str) -> Dovecot {
    Dovecot::start_with(DovecotOptions {
        users: users
            .iter()
            .map(|(u, p)| (u.to_string(), p.to_string()))
            .collect(),
        imap_capability: None,
        extra_conf: extra_conf.to_string(),
    })
}

/// Test message: distinct Subject, `lines` body lines (so distinct sizes).
fn message(tag: &str, i: usize, lines: usize) -> Vec<u8> {
    common::text_message(
        "Someone <someone@example.net>",
        &format!("{tag} {i}"),
        &format!("ops-{tag}-{i}"),
        (1..=lines).map(|l| format!("{tag} body line {l} of message {i}")),
    )
}

/// Delivers `n` messages tagged `tag` to `user`, message i with
/// `i * lines_factor` body lines.
fn deliver(d: &Dovecot, user: &str, tag: &str, n: usize, lines_factor: usize) {
    for i in 1..=n {
        d.deliver(user, &message(tag, i, i * lines_factor));
    }
}

/// Writes `text` to `dir/popbridge.toml`.
fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("popbridge.toml");
    std::fs::write(&path, text).expect("write popbridge.toml");
    path
}

/// popbridge in front of `imap_port` (the default route) with `toml` as its
/// --config file, plus `extra` flags. Returns the config path to rewrite.
fn start(imap_port: u16, toml: &str, extra: &[&str]) -> (Popbridge, tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("pbops-")
        .tempdir()
        .expect("config temp dir");
    let path = write_config(dir.path(), toml);
    let mut args = vec!["--config", path.to_str().expect("UTF-8 temp path")];
    args.extend_from_slice(extra);
    let pb = Popbridge::start(imap_port, &args);
    (pb, dir, path)
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{sig} {pid} failed");
}

/// Lines of the log containing every needle.
fn log_lines<'a>(log: &'a str, needles: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .collect()
}

/// Waits (bounded) until at least `count` log lines contain every needle;
/// returns the log.
fn wait_log(pb: &Popbridge, needles: &[&str], count: usize) -> String {
    let deadline = Instant::now() + POLL;
    loop {
        let log = pb.log();
        if log_lines(&log, needles).len() >= count {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "popbridge did not log {count} line(s) with {needles:?} within {POLL:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// STAT, LIST and UIDL of one mailbox as a POP3 server shows it.
#[derive(Debug, Clone, PartialEq)]
struct View {
    stat: (usize, u64),
    list: Vec<(usize, u64)>,
    uidl: Vec<(usize, String)>,
}

fn view_of(p: &mut Pop3) -> View {
    View {
        stat: p.stat(),
        list: p.list(),
        uidl: p.uidl(),
    }
}

/// The mailbox through a POP3 server on `port` (login, view, QUIT).
fn pop3_view(port: u16, user: &str, pass: &str) -> View {
    let mut p = Pop3::connect(port);
    assert!(
        p.greeting().starts_with("+OK"),
        "greeting: {}",
        p.greeting()
    );
    p.login(user, pass);
    let v = view_of(&mut p);
    p.quit();
    v
}

/// USER + PASS through popbridge; returns the PASS reply (the session is
/// closed with QUIT afterwards, whatever the reply).
fn pass_reply(port: u16, user: &str, pass: &str) -> String {
    let mut p = Pop3::connect(port);
    let r = p.cmd(&format!("USER {user}"));
    assert!(r.starts_with("+OK"), "USER {user}: {r}");
    let r = p.cmd(&format!("PASS {pass}"));
    let _ = p.cmd("QUIT");
    r
}

/// UIDVALIDITY of `user`'s INBOX, from SELECT over IMAP.
fn uidvalidity(d: &Dovecot, user: &str, pass: &str) -> u32 {
    let mut i = Imap::connect_only(d.imap_port);
    i.command(&format!("LOGIN \"{user}\" \"{pass}\""))
        .unwrap_or_else(|e| panic!("IMAP LOGIN {user}: {e}"));
    let lines = i.command("SELECT INBOX").expect("SELECT INBOX");
    i.logout();
    for l in &lines {
        let text = String::from_utf8_lossy(l);
        if let Some(pos) = text.find("[UIDVALIDITY ") {
            let rest = &text[pos + "[UIDVALIDITY ".len()..];
            let end = rest.find(']').expect("] after UIDVALIDITY");
            return rest[..end].parse().expect("numeric UIDVALIDITY");
        }
    }
    panic!("no UIDVALIDITY in SELECT response: {lines:?}");
}

/// One HTTP GET to the admin listener: (status code, body).
fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .unwrap_or_else(|e| panic!("connect admin 127.0.0.1:{port}: {e}"));
    s.set_read_timeout(Some(POLL)).expect("read timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .expect("write request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_string())
}

/// Polls `path` until it answers `want`; panics after [`POLL`].
fn wait_http_status(port: u16, path: &str, want: u16) {
    let deadline = Instant::now() + POLL;
    loop {
        let (status, body) = http_get(port, path);
        if status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} still answers {status} ({body:?}), not {want}, after {POLL:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// The value of one series (`name{labels}` exactly as exposed) in the
/// Prometheus text; `None` if absent.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

fn assert_metric(text: &str, series: &str, want: f64) {
    assert_eq!(
        metric(text, series),
        Some(want),
        "{series} in /metrics:\n{text}"
    );
}

/// A route to Dovecot `port` in TOML.
fn route(name: &str, key: &str, values: &[&str], port: u16, more: &str) -> String {
    let list = values
        .iter()
        .map(|v| format!("\"{v}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[[routes]]\nname = \"{name}\"\n{key} = [{list}]\naddress = \"127.0.0.1:{port}\"\n\
         tls = \"none\"\nlogin = \"local-part\"\n{more}\n"
    )
}

// ---------------------------------------------------------------------------
// 1. Routing across two Dovecot instances
// ---------------------------------------------------------------------------

#[test]
fn routes_send_each_login_to_its_upstream_and_the_cache_keeps_them_apart() {
    let a = dovecot(&[("alice", "secret")], "");
    let b = dovecot(&[("alice", "other-secret"), ("carol", "x")], "");
    // Same number of messages for both alices (so the same count and
    // UIDNEXT: a listing cache keyed without the upstream would reuse one
    // for the other), but different sizes.
    deliver(&a, "alice", "alice-at-a", 3, 1);
    deliver(&b, "alice", "alice-at-b", 3, 5);
    deliver(&b, "carol", "carol-at-b", 2, 2);
    // And the same UIDVALIDITY, so that only the upstream tells the two
    // listings apart.
    for (d, pass) in [(&a, "secret"), (&b, "other-secret")] {
        d.doveadm(&[
            "mailbox",
            "update",
            "-u",
            "alice",
            "--uid-validity",
            "1234567890",
            "INBOX",
        ]);
        assert_eq!(uidvalidity(d, "alice", pass), 1_234_567_890);
    }

    let a_alice = pop3_view(a.pop3_port, "alice", "secret");
    let b_alice = pop3_view(b.pop3_port, "alice", "other-secret");
    let b_carol = pop3_view(b.pop3_port, "carol", "x");
    assert_ne!(a_alice, b_alice, "the two mailboxes must differ");
    assert_eq!(a_alice.stat.0, 3);
    assert_eq!(b_alice.stat.0, 3);
    assert_eq!(b_carol.stat.0, 2);

    let routes = format!(
        "{}{}",
        route("b", "domains", &["b.example"], b.imap_port, ""),
        route(
            "carol",
            "users",
            &["carol@elsewhere.example"],
            b.imap_port,
            ""
        )
    );
    let toml = format!("[auth]\nfailure_delay_ms = 50\n\n{routes}");
    let (pb, _dir, _) = start(a.imap_port, &toml, &[]);

    // Alternate between the two alices: each poll must show its own
    // Dovecot's mailbox, the listing cache notwithstanding.
    for round in 0..2 {
        assert_eq!(
            pop3_view(pb.port, "alice", "secret"),
            a_alice,
            "round {round}: `alice` must reach Dovecot A"
        );
        assert_eq!(
            pop3_view(pb.port, "alice@b.example", "other-secret"),
            b_alice,
            "round {round}: `alice@b.example` must reach Dovecot B as alice"
        );
    }
    assert_eq!(
        pop3_view(pb.port, "carol@elsewhere.example", "x"),
        b_carol,
        "the users route must reach Dovecot B as carol"
    );
    assert_eq!(
        pop3_view(pb.port, "alice", "secret"),
        a_alice,
        "`alice` after the others"
    );
    // The passwords prove where each login went.
    let r = pass_reply(pb.port, "alice@b.example", "secret");
    assert!(
        r.starts_with("-ERR [AUTH]"),
        "A's password on the b.example route: {r}"
    );
    let r = pass_reply(pb.port, "carol", "x");
    assert!(
        r.starts_with("-ERR [AUTH]"),
        "`carol` without the routed name goes to A, which has no carol: {r}"
    );
    let log = pb.log();
    assert!(
        !log_lines(&log, &["logged in", "route=b"]).is_empty(),
        "no login on route b logged"
    );
    assert!(
        !log_lines(&log, &["logged in", "route=carol"]).is_empty(),
        "no login on route carol logged"
    );
    drop(pb);

    // Without the default route, names matching no route are refused.
    let toml =
        format!("[auth]\nfailure_delay_ms = 50\n\n[routing]\ndefault_route = false\n\n{routes}");
    let (pb, _dir, _) = start(a.imap_port, &toml, &[]);
    let r = pass_reply(pb.port, "alice", "secret");
    assert!(
        r.starts_with("-ERR [AUTH]"),
        "`alice` without a default route: {r}"
    );
    let r = pass_reply(pb.port, "alice@nowhere.example", "secret");
    assert!(
        r.starts_with("-ERR [AUTH]"),
        "an unrouted domain without a default route: {r}"
    );
    assert_eq!(
        pop3_view(pb.port, "alice@b.example", "other-secret"),
        b_alice,
        "the b.example route still works without a default route"
    );
    wait_log(&pb, &["no route for this login"], 2);
}

// ---------------------------------------------------------------------------
// 2. Per-route UIDL format
// ---------------------------------------------------------------------------

#[test]
fn a_route_can_have_its_own_uidl_format() {
    let a = dovecot(&[("alice", "secret")], "");
    // B's own POP3 server uses Cyrus's format too, for a direct comparison.
    let b = dovecot(&[("alice", "other-secret")], "pop3_uidl_format = %v.%u\n");
    deliver(&a, "alice", "uidl-a", 2, 1);
    deliver(&b, "alice", "uidl-b", 3, 1);

    let toml = route(
        "b",
        "domains",
        &["b.example"],
        b.imap_port,
        "uidl_format = \"cyrus\"",
    );
    let (pb, _dir, _) = start(a.imap_port, &toml, &[]);

    let v = uidvalidity(&b, "alice", "other-secret");
    let mut imap = Imap::connect(b.imap_port, "alice", "other-secret");
    let uids = imap.uids();
    imap.logout();
    assert_eq!(uids.len(), 3);
    let want: Vec<(usize, String)> = uids
        .iter()
        .enumerate()
        .map(|(i, uid)| (i + 1, format!("{v}.{uid}")))
        .collect();

    let mut p = Pop3::connect(pb.port);
    p.login("alice@b.example", "other-secret");
    let (status, body) = p.cmd_multi("UIDL");
    assert!(status.starts_with("+OK"), "UIDL: {status}");
    let expected_body: String = want
        .iter()
        .map(|(n, u)| format!("{n} {u}\r\n"))
        .chain(std::iter::once(".\r\n".to_string()))
        .collect();
    assert_eq!(String::from_utf8_lossy(&body), expected_body);
    let r = p.cmd("UIDL 2");
    assert_eq!(r, format!("+OK 2 {v}.{}", uids[1]));
    p.quit();

    assert_eq!(
        pop3_view(pb.port, "alice@b.example", "other-secret").uidl,
        pop3_view(b.pop3_port, "alice", "other-secret").uidl,
        "route b's UIDLs equal Dovecot's with pop3_uidl_format = %v.%u"
    );
    // The default route keeps the default (Dovecot) format.
    assert_eq!(
        pop3_view(pb.port, "alice", "secret").uidl,
        pop3_view(a.pop3_port, "alice", "secret").uidl,
        "the default route's UIDLs equal Dovecot's default ones"
    );
}

// ---------------------------------------------------------------------------
// 3. PROXY protocol
// ---------------------------------------------------------------------------

/// A PROXY v2 header for TCP over IPv4 from `src:sport` to 127.0.0.1:110.
fn proxy_v2(src: [u8; 4], sport: u16) -> Vec<u8> {
    let mut v = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v.push(0x21); // version 2, PROXY
    v.push(0x11); // TCP over IPv4
    v.extend_from_slice(&12u16.to_be_bytes());
    v.extend_from_slice(&src);
    v.extend_from_slice(&[127, 0, 0, 1]);
    v.extend_from_slice(&sport.to_be_bytes());
    v.extend_from_slice(&110u16.to_be_bytes());
    v
}

/// Connects, sends `header`, reads the first line (None: closed).
fn proxied(port: u16, header: &[u8]) -> (RawPop3, Option<String>) {
    let mut c = RawPop3::connect(port);
    c.send(header);
    let first = c.try_line();
    (c, first)
}

#[test]
fn proxy_protocol_headers_give_the_real_client_address() {
    let d = dovecot(&[("alice", "secret")], "");
    deliver(&d, "alice", "proxy", 2, 1);
    let want = pop3_view(d.pop3_port, "alice", "secret");
    let toml = "[listen]\nproxy_protocol = true\nproxy_trusted = [\"127.0.0.1/32\"]\n\n\
                [auth]\nallow_plaintext = true\nfailure_delay_ms = 50\n";
    let (pb, _dir, _) = start(d.imap_port, toml, &[]);

    // v1
    let (mut c, greeting) = proxied(pb.port, b"PROXY TCP4 192.0.2.77 127.0.0.1 40000 110\r\n");
    let greeting = greeting.expect("greeting after a v1 header");
    assert!(greeting.starts_with("+OK"), "greeting: {greeting}");
    c.login("alice", "secret");
    assert_eq!(
        c.cmd("STAT"),
        format!("+OK {} {}", want.stat.0, want.stat.1)
    );
    assert!(c.cmd("QUIT").starts_with("+OK"));
    let line = wait_session_ended(&pb, "client=192.0.2.77:40000");
    assert!(
        line.contains("reason=\"quit\"") || line.contains("reason=quit"),
        "{line}"
    );

    // v2 (binary)
    let (mut c, greeting) = proxied(pb.port, &proxy_v2([198, 51, 100, 9], 5555));
    let greeting = greeting.expect("greeting after a v2 header");
    assert!(greeting.starts_with("+OK"), "greeting: {greeting}");
    c.login("alice", "secret");
    assert_eq!(
        c.cmd("STAT"),
        format!("+OK {} {}", want.stat.0, want.stat.1)
    );
    assert!(c.cmd("QUIT").starts_with("+OK"));
    wait_session_ended(&pb, "client=198.51.100.9:5555");

    // A trusted peer that sends something else is closed without greeting.
    let mut c = RawPop3::connect(pb.port);
    c.send(b"USER alice\r\n");
    let got = c.rest();
    assert!(
        got.is_empty(),
        "a trusted peer without a PROXY header got {:?}",
        String::from_utf8_lossy(&got)
    );
    // A trusted peer that sends nothing is closed too (after 5 s).
    let mut c = RawPop3::connect(pb.port);
    let got = c.rest();
    assert!(
        got.is_empty(),
        "a silent trusted peer got {:?}",
        String::from_utf8_lossy(&got)
    );
    wait_log(&pb, &["no PROXY header in time"], 1);
    drop(pb);

    // The plaintext policy follows the proxied client too.
    let toml = "[listen]\nproxy_protocol = true\nproxy_trusted = [\"127.0.0.1/32\"]\n";
    let (pb, _dir, _) = start(d.imap_port, toml, &[]);
    let (mut c, greeting) = proxied(pb.port, b"PROXY TCP4 192.0.2.77 127.0.0.1 40001 110\r\n");
    assert!(greeting.expect("greeting").starts_with("+OK"));
    let r = c.cmd("USER alice");
    assert!(
        r.starts_with("-ERR [AUTH]"),
        "USER from a remote proxied client without TLS: {r}"
    );
    // A declared loopback source is not loopback (the client is wherever
    // the proxy heard it): no plaintext login either.
    let (mut c, greeting) = proxied(pb.port, b"PROXY TCP4 127.0.0.5 127.0.0.1 40002 110\r\n");
    assert!(greeting.expect("greeting").starts_with("+OK"));
    let r = c.cmd("USER alice");
    assert!(
        r.starts_with("-ERR [AUTH]"),
        "USER from a proxied client declaring a loopback address: {r}"
    );
    drop(pb);

    // An untrusted peer is a direct client: greeted at once, and a PROXY
    // line is just a bad command.
    let toml = "[listen]\nproxy_protocol = true\nproxy_trusted = [\"10.0.0.0/8\"]\n";
    let (pb, _dir, _) = start(d.imap_port, toml, &[]);
    let mut c = RawPop3::connect_greeted(pb.port);
    let r = c.cmd("PROXY TCP4 192.0.2.77 127.0.0.1 40000 110");
    assert!(r.starts_with("-ERR"), "a PROXY line as a command: {r}");
    c.login("alice", "secret");
    assert!(c.cmd("QUIT").starts_with("+OK"));
    let line = wait_session_ended(&pb, &format!("client={}", c.local));
    assert!(!line.contains("192.0.2.77"), "{line}");
    assert!(!pb.log().contains("192.0.2.77:40000"), "{}", pb.log());
    drop(pb);

    // Per-address limits count the proxied client.
    let toml = "[listen]\nproxy_protocol = true\nproxy_trusted = [\"127.0.0.1/32\"]\n\n\
                [limits]\nmax_sessions_per_ip = 1\n";
    let (pb, _dir, _) = start(d.imap_port, toml, &[]);
    let (c1, g1) = proxied(pb.port, b"PROXY TCP4 192.0.2.1 127.0.0.1 1001 110\r\n");
    assert!(g1.expect("greeting 1").starts_with("+OK"));
    let (_c2, g2) = proxied(pb.port, b"PROXY TCP4 192.0.2.2 127.0.0.1 1002 110\r\n");
    assert!(
        g2.expect("greeting 2").starts_with("+OK"),
        "another client address must get in"
    );
    let (mut c3, g3) = proxied(pb.port, &proxy_v2([192, 0, 2, 1], 1003));
    let g3 = g3.expect("a refusal line");
    assert!(
        g3.starts_with("-ERR [SYS/TEMP]"),
        "a second session from 192.0.2.1: {g3}"
    );
    assert!(c3.rest().is_empty(), "more after the refusal");
    // Once the first session is gone, 192.0.2.1 gets in again.
    drop(c1);
    let deadline = Instant::now() + POLL;
    loop {
        let (_c, g) = proxied(pb.port, b"PROXY TCP4 192.0.2.1 127.0.0.1 1004 110\r\n");
        let g = g.expect("a first line");
        if g.starts_with("+OK") {
            break;
        }
        assert!(g.starts_with("-ERR [SYS/TEMP]"), "{g}");
        assert!(
            Instant::now() < deadline,
            "192.0.2.1 still refused after its session closed"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------
// 4. Metrics and health
// ---------------------------------------------------------------------------

#[test]
fn admin_listener_serves_metrics_health_and_readiness() {
    let d = dovecot(&[("alice", "secret")], "");
    deliver(&d, "alice", "metrics", 2, 3);
    let toml = "[admin]\naddress = \"127.0.0.1:0\"\ncheck_interval_secs = 1\n\n\
         [auth]\nfailure_delay_ms = 50\n";
    let (pb, _dir, _) = start(d.imap_port, toml, &[]);
    let admin = pb.admin_port();

    let (status, body) = http_get(admin, "/healthz");
    assert_eq!(status, 200, "/healthz: {body}");
    wait_http_status(admin, "/readyz", 200);
    let (status, _) = http_get(admin, "/nonexistent");
    assert_eq!(status, 404);

    let mut p = Pop3::connect(pb.port);
    p.login("alice", "secret");
    let (n, _) = p.stat();
    assert_eq!(n, 2);
    let size1 = p.list()[0].1;
    let msg = p.retr(1);
    assert!(!msg.is_empty());
    assert!(p.cmd("DELE 1").starts_with("+OK"));
    p.quit();
    assert!(p.eof(), "connection open after QUIT");

    // The session's own counters are final once it has ended.
    let deadline = Instant::now() + POLL;
    let text = loop {
        let (status, text) = http_get(admin, "/metrics");
        assert_eq!(status, 200);
        if metric(&text, "popbridge_sessions_active{listener=\"pop3\"}") == Some(0.0) {
            break text;
        }
        assert!(Instant::now() < deadline, "sessions_active not 0:\n{text}");
        thread::sleep(Duration::from_millis(50));
    };
    let sessions = metric(&text, "popbridge_sessions_total{listener=\"pop3\"}");
    assert!(
        sessions.is_some_and(|s| s >= 1.0),
        "sessions_total:\n{text}"
    );
    assert_metric(
        &text,
        "popbridge_commands_total{command=\"RETR\",result=\"ok\"}",
        1.0,
    );
    assert_metric(
        &text,
        "popbridge_commands_total{command=\"DELE\",result=\"ok\"}",
        1.0,
    );
    assert_metric(
        &text,
        "popbridge_commands_total{command=\"STAT\",result=\"ok\"}",
        1.0,
    );
    assert_metric(&text, "popbridge_auth_total{outcome=\"ok\"}", 1.0);
    assert_metric(&text, "popbridge_messages_deleted_total", 1.0);
    assert_metric(&text, "popbridge_messages_retrieved_total", 1.0);
    assert_metric(&text, "popbridge_octets_retrieved_total", size1 as f64);
    assert_metric(&text, "popbridge_upstream_login_seconds_count", 1.0);
    assert_eq!(
        metric(&text, "popbridge_auth_total{outcome=\"refused\"}").unwrap_or(0.0),
        0.0,
        "no failed login yet:\n{text}"
    );
    assert!(text.contains("# EOF"), "{text}");

    // A failed login.
    let r = pass_reply(pb.port, "alice", "wrong");
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    let (_, text) = http_get(admin, "/metrics");
    assert_metric(&text, "popbridge_auth_total{outcome=\"refused\"}", 1.0);
    assert_metric(&text, "popbridge_auth_total{outcome=\"ok\"}", 1.0);

    // Over IMAP the deletion happened.
    let mut imap = Imap::connect(d.imap_port, "alice", "secret");
    assert_eq!(imap.uids().len(), 1);
    imap.logout();

    // Without its upstream popbridge is not ready, but healthy.
    drop(d);
    wait_http_status(admin, "/readyz", 503);
    let (status, _) = http_get(admin, "/healthz");
    assert_eq!(status, 200);
}

/// Without a default route there is no default upstream: readiness
/// follows every route's IMAP server, and popbridge is ready while at least
/// one of them greets (the first route's server being down does not take
/// the replica out of service); with none answering it is not ready.
#[test]
fn readiness_without_a_default_route_follows_every_routes_server() {
    let d = dovecot(&[("alice", "secret")], "");
    let down = crate::common::ports::ClosedPort::new();
    let toml = format!(
        "[routing]\ndefault_route = false\n\n\
         [admin]\naddress = \"127.0.0.1:0\"\ncheck_interval_secs = 1\n\n\
         [[routes]]\nname = \"first\"\ndomains = [\"first.example\"]\n\
         address = \"{}\"\ntls = \"none\"\n\n{}",
        down.addr,
        route("second", "domains", &["second.example"], d.imap_port, "")
    );
    let (pb, _dir, _) = start(d.imap_port, &toml, &[]);
    let admin = pb.admin_port();
    wait_http_status(admin, "/readyz", 200);
    // Each server is checked, and the unreachable one named in the log.
    let log = wait_log(&pb, &["readiness check", &down.addr.to_string()], 1);
    assert!(
        !log_lines(&log, &["readiness check", &d.imap_port.to_string()])
            .iter()
            .any(|l| l.contains("WARN")),
        "{log}"
    );
    drop(d);
    wait_http_status(admin, "/readyz", 503);
}

// ---------------------------------------------------------------------------
// 5. SIGTERM drain
// ---------------------------------------------------------------------------

/// Polls until the POP3 port no longer greets new clients: the connect
/// fails, or the connection closes without a greeting.
fn wait_not_accepting(port: u16) {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + POLL;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Err(_) => return,
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(2)))
                    .expect("read timeout");
                let mut buf = [0u8; 64];
                match s.read(&mut buf) {
                    Ok(0) => return,
                    Err(e) if is_reset(&e) => return,
                    // Greeted (or undecided): still accepting; close at once.
                    _ => {}
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "popbridge still accepts connections {POLL:?} after SIGTERM"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Polls until popbridge exits; returns its exit code.
fn wait_exit(pb: &mut Popbridge, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = pb.try_wait() {
            return status.code();
        }
        assert!(
            Instant::now() < deadline,
            "popbridge still running {limit:?} after SIGTERM"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The start of the drain tests: alice has two messages tagged `tag`,
/// popbridge runs with `drain_timeout_secs = drain_secs`, and one logged-in
/// session has marked message 1 deleted. Returns the Dovecot, the two UIDs,
/// popbridge with its config dir, and that session.
fn drain_scene(
    tag: &str,
    drain_secs: u64,
) -> (Dovecot, Vec<u32>, Popbridge, tempfile::TempDir, RawPop3) {
    let d = dovecot(&[("alice", "secret")], "");
    deliver(&d, "alice", tag, 2, 1);
    let mut imap = Imap::connect(d.imap_port, "alice", "secret");
    let uids = imap.uids();
    imap.logout();
    assert_eq!(uids.len(), 2);

    let toml = format!("[lifecycle]\ndrain_timeout_secs = {drain_secs}\n");
    let (pb, dir, _) = start(d.imap_port, &toml, &[]);
    let mut c = RawPop3::connect_greeted(pb.port);
    c.login("alice", "secret");
    assert!(c.cmd("DELE 1").starts_with("+OK"));
    (d, uids, pb, dir, c)
}

#[test]
fn sigterm_drains_then_ends_sessions_without_deleting() {
    let (d, uids, mut pb, _dir, mut c) = drain_scene("drain", 3);

    signal(pb.pid(), "TERM");
    // The session goes on during the drain.
    let r = c.cmd("STAT");
    assert!(r.starts_with("+OK 1 "), "STAT right after SIGTERM: {r}");
    wait_log(&pb, &["draining"], 1);
    // With a 3 s drain this cannot tell a closed listener from an exited
    // process; the next test (long drain) checks the listener strictly.
    wait_not_accepting(pb.port);

    // At the deadline the idle session is told and closed.
    let r = c.expect_line("the shutdown notice");
    assert!(
        r.starts_with("-ERR [SYS/TEMP]"),
        "at the drain deadline: {r}"
    );
    let rest = c.rest();
    assert!(
        rest.is_empty(),
        "after the notice: {:?}",
        String::from_utf8_lossy(&rest)
    );
    let code = wait_exit(&mut pb, Duration::from_secs(60));
    assert_eq!(code, Some(0), "exit code after a drain");
    let log = pb.log();
    assert_eq!(
        log_lines(&log, &["session ended", "shutdown"]).len(),
        1,
        "{log}"
    );

    // Nothing was deleted, nothing flagged.
    let mut imap = Imap::connect(d.imap_port, "alice", "secret");
    assert_eq!(imap.uids(), uids);
    assert!(
        !imap.flags(uids[0]).iter().any(|f| f == "\\Deleted"),
        "message 1 flagged \\Deleted"
    );
    imap.logout();
}

#[test]
fn sigterm_lets_a_session_quit_and_commit_during_the_drain() {
    // A long drain: popbridge must exit when the last session ends, not
    // at the deadline.
    let (d, uids, mut pb, _dir, mut c) = drain_scene("drain-quit", 120);

    signal(pb.pid(), "TERM");
    wait_log(&pb, &["draining"], 1);
    wait_not_accepting(pb.port);
    let r = c.cmd("QUIT");
    assert!(r.starts_with("+OK"), "QUIT during the drain: {r}");
    assert!(c.rest().is_empty());
    let code = wait_exit(&mut pb, Duration::from_secs(60));
    assert_eq!(code, Some(0), "exit code after the last session quit");
    assert!(
        !pb.log().contains("drain deadline"),
        "popbridge waited for the deadline:\n{}",
        pb.log()
    );

    let mut imap = Imap::connect(d.imap_port, "alice", "secret");
    assert_eq!(
        imap.uids(),
        vec![uids[1]],
        "QUIT in the drain commits DELE 1"
    );
    imap.logout();
}

// ---------------------------------------------------------------------------
// 6. SIGHUP reload
// ---------------------------------------------------------------------------

#[test]
fn sighup_reloads_routes_for_new_sessions_and_ignores_a_broken_file() {
    let a = dovecot(&[("alice", "secret")], "");
    let b = dovecot(&[("alice", "other-secret")], "");
    deliver(&a, "alice", "reload-a", 2, 1);
    deliver(&b, "alice", "reload-b", 3, 4);
    let a_view = pop3_view(a.pop3_port, "alice", "secret");
    let b_view = pop3_view(b.pop3_port, "alice", "other-secret");
    assert_ne!(a_view, b_view);
    let mut imap = Imap::connect(b.imap_port, "alice", "other-secret");
    let first_uid = imap.uids()[0];
    let b_first = imap.fetch_message(first_uid);
    imap.logout();

    let header = "[auth]\nfailure_delay_ms = 50\n\n";
    let to_b = format!(
        "{header}{}",
        route("b", "domains", &["b.example"], b.imap_port, "")
    );
    let (mut pb, dir, path) = start(a.imap_port, &to_b, &[]);
    assert_eq!(
        pop3_view(pb.port, "alice@b.example", "other-secret"),
        b_view,
        "before the reload b.example is Dovecot B"
    );
    // A session that stays open across the reload.
    let mut old = RawPop3::connect_greeted(pb.port);
    old.login("alice@b.example", "other-secret");

    let to_a = format!(
        "{header}{}",
        route("b", "domains", &["b.example"], a.imap_port, "")
    );
    assert_eq!(write_config(dir.path(), &to_a), path);
    signal(pb.pid(), "HUP");
    wait_log(&pb, &["configuration reloaded"], 1);

    assert_eq!(
        pop3_view(pb.port, "alice@b.example", "secret"),
        a_view,
        "after the reload b.example is Dovecot A"
    );
    let r = pass_reply(pb.port, "alice@b.example", "other-secret");
    assert!(
        r.starts_with("-ERR [AUTH]"),
        "B's password after the reload: {r}"
    );

    // The old session still works against B.
    assert_eq!(
        old.cmd("STAT"),
        format!("+OK {} {}", b_view.stat.0, b_view.stat.1)
    );
    let r = old.cmd("UIDL");
    assert!(r.starts_with("+OK"), "{r}");
    let uidl: Vec<String> = b_view
        .uidl
        .iter()
        .map(|(n, u)| format!("{n} {u}"))
        .collect();
    assert_eq!(old.body(), uidl);
    let r = old.cmd("RETR 1");
    assert!(r.starts_with("+OK"), "RETR 1 in the old session: {r}");
    let body = old.body();
    let mut got = Vec::new();
    for l in &body {
        got.extend_from_slice(l.strip_prefix('.').unwrap_or(l).as_bytes());
        got.extend_from_slice(b"\r\n");
    }
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&b_first),
        "RETR 1 in the old session is B's message"
    );
    assert!(old.cmd("QUIT").starts_with("+OK"));

    // A broken file is refused; the last good configuration stays.
    std::fs::write(&path, format!("{to_b}\nbogus_key = 1\n")).expect("write broken config");
    signal(pb.pid(), "HUP");
    wait_log(&pb, &["reload failed"], 1);
    assert_eq!(
        log_lines(&pb.log(), &["configuration reloaded"]).len(),
        1,
        "the broken file must not count as a reload"
    );
    assert_eq!(
        pop3_view(pb.port, "alice@b.example", "secret"),
        a_view,
        "after a failed reload b.example is still Dovecot A"
    );
    assert_eq!(
        pop3_view(pb.port, "alice", "secret"),
        a_view,
        "the default route still works"
    );
    assert!(pb.try_wait().is_none(), "popbridge exited");
}

// ---------------------------------------------------------------------------
// 7. JSON logs
// ---------------------------------------------------------------------------

#[test]
fn json_logs_are_json_lines_without_secrets() {
    const PASS: &str = "Sw0rdf1sh-Qx7-zz";
    const WRONG: &str = "Wr0ng-Guess-Kp9";
    const BODY_MARKER: &str = "BODY-MARKER-Jq4w";
    let d = dovecot(&[("alice", PASS)], "");
    d.deliver(
        "alice",
        format!("Subject: json\r\n\r\n{BODY_MARKER} line\r\n").as_bytes(),
    );
    let toml = "[auth]\nfailure_delay_ms = 50\n";
    let (pb, _dir, _) = start(d.imap_port, toml, &["--log-format", "json"]);

    // USER/PASS, with a RETR.
    let mut c = RawPop3::connect_greeted(pb.port);
    c.login("alice", PASS);
    assert!(c.cmd("RETR 1").starts_with("+OK"));
    assert!(c.body().iter().any(|l| l.contains(BODY_MARKER)));
    assert!(c.cmd("QUIT").starts_with("+OK"));
    wait_session_ended(&pb, &c.local.to_string());

    // AUTH PLAIN.
    let sasl = base64(format!("\0alice\0{PASS}").as_bytes());
    let mut c = RawPop3::connect_greeted(pb.port);
    let r = c.cmd(&format!("AUTH PLAIN {sasl}"));
    assert!(r.starts_with("+OK"), "AUTH PLAIN: {r}");
    assert!(c.cmd("QUIT").starts_with("+OK"));
    wait_session_ended(&pb, &c.local.to_string());

    // A failed login.
    let mut c = RawPop3::connect_greeted(pb.port);
    assert!(c.cmd("USER alice").starts_with("+OK"));
    let r = c.cmd(&format!("PASS {WRONG}"));
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    assert!(c.cmd("QUIT").starts_with("+OK"));
    wait_session_ended(&pb, &c.local.to_string());

    let log = pb.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 5, "too few log lines:\n{log}");
    for l in &lines {
        assert!(
            l.starts_with('{') && l.ends_with('}'),
            "not a JSON object: {l}"
        );
        assert!(
            l.contains("\"message\"") || l.contains("\"fields\""),
            "no message or fields: {l}"
        );
    }
    assert!(
        lines.iter().any(|l| l.contains("\"logged in\"")),
        "no login logged:\n{log}"
    );
    for secret in [
        PASS,
        WRONG,
        sasl.as_str(),
        &base64(PASS.as_bytes()),
        BODY_MARKER,
    ] {
        assert!(
            !log.contains(secret),
            "{secret:?} appears in the log:\n{log}"
        );
    }
}
