//! Directory routing (`[directory]`): a small HTTP directory in the test,
//! the thing the operator controls, routes logins to two real Dovecot
//! instances; static routes win over it; its failures are `-ERR
//! [SYS/TEMP]` and its "no such user" is `-ERR [AUTH]`; its answers are
//! cached; UIDLs are the same as through a static route to the same
//! server.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{self, Dovecot, DovecotOptions, Pop3, Popbridge};

/// Upper bound of every poll in this file.
const POLL: Duration = Duration::from_secs(30);

/// What the test directory answers for a login.
#[derive(Clone, Debug)]
enum Reply {
    /// 200 with this body.
    Json(String),
    /// This status with an empty body.
    Status(u16),
    /// Nothing, until popbridge hangs up.
    Hang,
}

/// One request the directory received.
#[derive(Clone, Debug)]
pub(crate) struct Request {
    /// The request head, as received.
    head: String,
    /// The query's pairs, decoded.
    query: HashMap<String, String>,
}

#[derive(Default)]
struct State {
    /// Replies by `user`; others get 404.
    replies: HashMap<String, Reply>,
    requests: Vec<Request>,
}

/// An HTTP directory on a loopback port, one thread per request.
pub(crate) struct DirectoryService {
    port: u16,
    state: Arc<Mutex<State>>,
}

impl DirectoryService {
    pub(crate) fn start() -> DirectoryService {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the directory");
        let port = listener.local_addr().expect("directory address").port();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let state = shared.clone();
                thread::spawn(move || serve(stream, &state));
            }
        });
        DirectoryService { port, state }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}/route", self.port)
    }

    fn set(&self, user: &str, reply: Reply) {
        self.state
            .lock()
            .unwrap()
            .replies
            .insert(user.to_string(), reply);
    }

    /// Routes `user` to the Dovecot on `imap_port`, plaintext, with more
    /// JSON fields (`, "key": value...`).
    pub(crate) fn route_to(&self, user: &str, imap_port: u16, more: &str) {
        self.set(
            user,
            Reply::Json(format!(
                r#"{{"address": "127.0.0.1:{imap_port}", "tls": "none"{more}}}"#
            )),
        );
    }

    /// The requests for `user` so far.
    pub(crate) fn requests_for(&self, user: &str) -> Vec<Request> {
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|r| r.query.get("user").map(String::as_str) == Some(user))
            .cloned()
            .collect()
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone the stream"));
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let target = head.split_whitespace().nth(1).unwrap_or("").to_string();
    let query: HashMap<String, String> = target
        .split_once('?')
        .map(|(_, q)| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let reply = {
        let mut s = state.lock().unwrap();
        s.requests.push(Request {
            head: head.clone(),
            query: query.clone(),
        });
        let user = query.get("user").cloned().unwrap_or_default();
        s.replies.get(&user).cloned().unwrap_or(Reply::Status(404))
    };
    let mut stream = stream;
    let (status, body) = match reply {
        Reply::Json(body) => (200, body),
        Reply::Status(code) => (code, String::new()),
        Reply::Hang => {
            // Read until popbridge gives up and closes the connection.
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink);
            return;
        }
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// A Dovecot with exactly these users.
fn dovecot(users: &[(&str, &str)]) -> Dovecot {
    Dovecot::start_with(DovecotOptions {
        users: users
            .iter()
            .map(|(u, p)| (u.to_string(), p.to_string()))
            .collect(),
        imap_capability: None,
        extra_conf: String::new(),
    })
}

/// Delivers `n` messages tagged `tag` to `user`, message i with `i * k`
/// body lines.
fn deliver(d: &Dovecot, user: &str, tag: &str, n: usize, k: usize) {
    for i in 1..=n {
        d.deliver(
            user,
            &common::text_message(
                "Someone <someone@example.net>",
                &format!("{tag} {i}"),
                &format!("dir-{tag}-{i}"),
                (1..=i * k).map(|l| format!("{tag} line {l}")),
            ),
        );
    }
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("popbridge.toml");
    std::fs::write(&path, text).expect("write popbridge.toml");
    path
}

/// popbridge with `toml` as its configuration; `[upstream]` (the
/// template) is `template_port`, plaintext.
fn start(template_port: u16, toml: &str) -> (Popbridge, tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("pbdir-")
        .tempdir()
        .expect("config temp dir");
    let path = write_config(dir.path(), toml);
    let pb = Popbridge::start(
        template_port,
        &["--config", path.to_str().expect("UTF-8 temp path")],
    );
    (pb, dir, path)
}

/// STAT and UIDL of a mailbox through POP3 (login, look, QUIT).
fn view(port: u16, user: &str, pass: &str) -> ((usize, u64), Vec<(usize, String)>) {
    let mut p = Pop3::connect(port);
    p.login(user, pass);
    let v = (p.stat(), p.uidl());
    p.quit();
    v
}

/// USER + PASS; the PASS reply (then QUIT).
fn pass_reply(port: u16, user: &str, pass: &str) -> String {
    let mut p = Pop3::connect(port);
    let r = p.cmd(&format!("USER {user}"));
    assert!(r.starts_with("+OK"), "USER {user}: {r}");
    let r = p.cmd(&format!("PASS {pass}"));
    let _ = p.cmd("QUIT");
    r
}

/// One HTTP GET to the admin listener: the body of a 200.
fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect admin");
    s.set_read_timeout(Some(POLL)).expect("read timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("write request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    raw.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Waits (bounded) until the log has a line with every needle.
fn wait_log(pb: &Popbridge, needles: &[&str]) {
    let deadline = Instant::now() + POLL;
    while !pb
        .log()
        .lines()
        .any(|l| needles.iter().all(|n| l.contains(n)))
    {
        assert!(Instant::now() < deadline, "no log line with {needles:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Two Dovecots, one directory: each user gets their own server's mail
/// (the directory's `login` picks the IMAP user); a static route wins over
/// the directory, which is not asked for it; an unknown login is refused
/// like a wrong password even though `[upstream]` would know it; the
/// request carries the login, the client, the token and never the
/// password; a second login within `cache_secs` does not ask again.
#[test]
fn directory_routes_users_to_their_own_dovecot() {
    let a = dovecot(&[("alice", "pw-a"), ("carol", "pw-c")]);
    let b = dovecot(&[("bob", "pw-b"), ("dave", "pw-d")]);
    deliver(&a, "alice", "alice", 2, 1);
    deliver(&a, "carol", "carol", 1, 1);
    deliver(&b, "bob", "bob", 3, 2);
    deliver(&b, "dave", "dave", 4, 1);
    let alice_direct = view(a.pop3_port, "alice", "pw-a");
    let bob_direct = view(b.pop3_port, "bob", "pw-b");
    let dave_direct = view(b.pop3_port, "dave", "pw-d");

    let dir = DirectoryService::start();
    dir.route_to("alice", a.imap_port, r#", "route": "pod-a""#);
    dir.route_to(
        "bob@b.example",
        b.imap_port,
        r#", "login": "bob", "mailbox": "INBOX", "route": "pod-b""#,
    );
    // The directory would send dave to A; the static route says B.
    dir.route_to("dave", a.imap_port, "");

    let token_dir = tempfile::tempdir().expect("temp dir");
    let token = token_dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").expect("write token");
    let toml = format!(
        "[auth]\nfailure_delay_ms = 50\n\n\
         [admin]\naddress = \"127.0.0.1:0\"\n\n\
         [directory]\nurl = \"{}\"\ntoken_file = \"{}\"\n\n\
         [[routes]]\nname = \"static-b\"\nusers = [\"dave\"]\naddress = \"127.0.0.1:{}\"\ntls = \"none\"\n",
        dir.url(),
        token.display(),
        b.imap_port
    );
    // [upstream] is Dovecot A, where carol lives: with a directory it is a
    // template, not a route.
    let (pb, _cfg, _) = start(a.imap_port, &toml);

    assert_eq!(view(pb.port, "alice", "pw-a"), alice_direct);
    assert_eq!(view(pb.port, "bob@b.example", "pw-b"), bob_direct);
    assert_eq!(
        view(pb.port, "dave", "pw-d"),
        dave_direct,
        "the static route"
    );
    assert!(
        dir.requests_for("dave").is_empty(),
        "the directory is not asked for a static route's user"
    );
    let r = pass_reply(pb.port, "carol", "pw-c");
    assert!(
        r.starts_with("-ERR [AUTH]"),
        "unknown to the directory: {r}"
    );
    // A wrong password through the directory is the IMAP server's refusal.
    let r = pass_reply(pb.port, "alice", "wrong");
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");

    let req = &dir.requests_for("bob@b.example")[0];
    assert_eq!(
        req.query.get("client").map(String::as_str),
        Some("127.0.0.1")
    );
    assert_eq!(req.query.get("protocol").map(String::as_str), Some("pop3"));
    assert!(req.head.starts_with("GET /route?"), "{}", req.head);
    assert!(
        req.head
            .lines()
            .any(|l| l.eq_ignore_ascii_case("authorization: bearer s3cret-token")),
        "{}",
        req.head
    );
    assert!(!req.head.contains("pw-b"), "{}", req.head);
    assert!(!pb.log().contains("s3cret-token"), "the token is logged");

    // Cached: alice logged in twice (once with a wrong password) and the
    // directory was asked once; carol's 404 is cached too.
    assert_eq!(dir.requests_for("alice").len(), 1);
    assert_eq!(view(pb.port, "alice", "pw-a"), alice_direct);
    assert_eq!(dir.requests_for("alice").len(), 1);
    let r = pass_reply(pb.port, "carol", "pw-c");
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    assert_eq!(dir.requests_for("carol").len(), 1);

    let metrics = http_get(pb.admin_port(), "/metrics");
    let series = |result: &str| {
        metric(
            &metrics,
            &format!("popbridge_directory_lookups_total{{result=\"{result}\"}}"),
        )
    };
    assert_eq!(series("hit"), Some(2.0), "{metrics}");
    assert_eq!(series("not_found"), Some(1.0), "{metrics}");
    assert_eq!(series("cached"), Some(3.0), "{metrics}");
    assert_eq!(series("error"), None, "{metrics}");
}

/// A directory that hangs, answers 500 or answers nonsense gets the client
/// `-ERR [SYS/TEMP]` (within `timeout_ms` for the hang: the test would
/// wait forever otherwise), never the `[upstream]` server that knows the
/// user; failures are not cached, so the next login after the directory
/// recovers is routed; a 404 is `-ERR [AUTH]`.
#[test]
fn directory_failures_are_temporary_and_not_cached() {
    let a = dovecot(&[
        ("alice", "pw-a"),
        ("hang", "pw"),
        ("oops", "pw"),
        ("junk", "pw"),
        ("bad", "pw"),
    ]);
    deliver(&a, "alice", "alice", 1, 1);
    let dir = DirectoryService::start();
    dir.set("hang", Reply::Hang);
    dir.set("oops", Reply::Status(500));
    dir.set("junk", Reply::Json("not JSON".into()));
    dir.set(
        "bad",
        Reply::Json(r#"{"address": "no-port", "tls": "none"}"#.into()),
    );
    dir.set("alice", Reply::Status(503));
    let toml = format!(
        "[auth]\nfailure_delay_ms = 50\nmax_failures_per_user = 1\n\n\
         [directory]\nurl = \"{}\"\ntimeout_ms = 300\n",
        dir.url()
    );
    let (pb, _cfg, _) = start(a.imap_port, &toml);
    for user in ["hang", "oops", "junk", "bad", "alice"] {
        for _ in 0..2 {
            let r = pass_reply(pb.port, user, "pw");
            assert!(r.starts_with("-ERR [SYS/TEMP]"), "{user}: {r}");
        }
        assert_eq!(
            dir.requests_for(user).len(),
            2,
            "{user}: a failure is not cached"
        );
    }
    wait_log(&pb, &["directory lookup failed", "hang"]);
    wait_log(&pb, &["directory lookup failed", "junk"]);
    wait_log(&pb, &["directory answer unusable", "bad"]);
    // The directory recovers: alice is routed (the SYS/TEMP answers were
    // not failed logins, or max_failures_per_user = 1 would stop her).
    dir.route_to("alice", a.imap_port, "");
    let alice = view(pb.port, "alice", "pw-a");
    assert_eq!(alice.0 .0, 1);
    let r = pass_reply(pb.port, "nobody", "pw");
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
}

/// UIDLs through a directory route are those of a static route to the
/// same server (same template), so moving a user from `[[routes]]` to the
/// directory changes none: here by a SIGHUP reload that drops the static
/// entry (and the directory's cache).
#[test]
fn uidls_do_not_change_when_a_user_moves_to_the_directory() {
    let a = dovecot(&[("alice", "pw-a"), ("bob", "pw-b")]);
    deliver(&a, "alice", "alice", 3, 2);
    deliver(&a, "bob", "bob", 1, 1);
    let dir = DirectoryService::start();
    dir.route_to("alice", a.imap_port, "");
    dir.route_to("bob", a.imap_port, "");
    let header = format!(
        "[auth]\nfailure_delay_ms = 50\n\n[pop3]\nuidl_format = \"%v.%u\"\n\n\
         [directory]\nurl = \"{}\"\n\n",
        dir.url()
    );
    let static_alice = format!(
        "{header}[[routes]]\nname = \"static\"\nusers = [\"alice\"]\n\
         address = \"127.0.0.1:{}\"\ntls = \"none\"\n",
        a.imap_port
    );
    let closed = common::ports::ClosedPort::new();
    // [upstream] leads nowhere: only the routes reach Dovecot.
    let (pb, cfg, path) = start(closed.port(), &static_alice);
    let before = view(pb.port, "alice", "pw-a");
    assert_eq!(before.1.len(), 3);
    assert!(
        before.1[0].1.contains('.'),
        "the %v.%u template: {before:?}"
    );
    assert!(dir.requests_for("alice").is_empty());
    view(pb.port, "bob", "pw-b");
    assert_eq!(dir.requests_for("bob").len(), 1);

    assert_eq!(write_config(cfg.path(), &header), path);
    let ok = Command::new("kill")
        .args(["-HUP", &pb.pid().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok);
    wait_log(&pb, &["configuration reloaded"]);

    let after = view(pb.port, "alice", "pw-a");
    assert_eq!(
        dir.requests_for("alice").len(),
        1,
        "now routed by the directory"
    );
    assert_eq!(after, before, "the same UIDLs through the directory");
    view(pb.port, "bob", "pw-b");
    assert_eq!(
        dir.requests_for("bob").len(),
        2,
        "the reload dropped the cached answer"
    );
}

/// `popbridge doctor` says where unmatched logins go (it does not ask the
/// directory: answers are per login), and `--check-config` accepts the
/// section and refuses a token file that is not there.
#[test]
fn doctor_and_check_config_name_the_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let token = dir.path().join("token");
    let toml = format!(
        "[upstream]\ntls = \"none\"\n\n[directory]\nurl = \"http://127.0.0.1:9/route\"\ntoken_file = \"{}\"\n",
        token.display()
    );
    let path = write_config(dir.path(), &toml);
    let run = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_popbridge"));
        crate::common::cli::clear_popbridge_env(&mut cmd);
        let out = cmd
            .arg("--config")
            .arg(&path)
            .args(args)
            .output()
            .expect("run popbridge");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = run(&["--check-config"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("directory.token_file"), "{out}");
    std::fs::write(&token, "t\n").expect("write token");
    let (code, out) = run(&["--check-config"]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = run(&["doctor"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("directory: http://127.0.0.1:9/route, asked for unmatched logins"),
        "{out}"
    );
}

/// A guesser's names never reach the directory once its address is over
/// `max_failures_per_ip`: names the directory does not know (404) are
/// failed logins, and after the limit the next unknown names are refused
/// by the throttle without a lookup (the directory sees no request for
/// them).
#[test]
fn an_address_over_its_failure_limit_does_not_reach_the_directory() {
    let a = dovecot(&[("alice", "pw-a")]);
    let dir = DirectoryService::start();
    let toml = format!(
        "[auth]\nfailure_delay_ms = 10\nmax_failures_per_ip = 3\nmax_failures_per_user = 100\n\n\
         [directory]\nurl = \"{}\"\ncache_secs = 0\n",
        dir.url()
    );
    let (pb, _cfg, _) = start(a.imap_port, &toml);
    for i in 0..3 {
        let user = format!("guess{i}");
        let r = pass_reply(pb.port, &user, "pw");
        assert!(r.starts_with("-ERR [AUTH]"), "{user}: {r}");
        assert_eq!(dir.requests_for(&user).len(), 1, "{user} was looked up");
    }
    for i in 3..6 {
        let user = format!("guess{i}");
        let r = pass_reply(pb.port, &user, "pw");
        assert!(r.starts_with("-ERR"), "{user}: {r}");
        assert!(
            dir.requests_for(&user).is_empty(),
            "{user} reached the directory from an address over its limit"
        );
    }
}
