//! popbridge under real POP3 clients and hostile input: pipelined batches,
//! python3 poplib, curl and mpop compared with Dovecot's own POP3 server on
//! the same mailbox, malformed and over-long command lines, secrets kept
//! out of the trace log, and the advertised capabilities.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::common;
use crate::common::logs::wait_for_log;
use crate::common::{
    base64, dot_unstuff, run_program as run, to_crlf, Dovecot, DovecotOptions, Imap, Pop3,
    Popbridge, Run,
};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// True when a successful reply to `cmd` is multi-line (RFC 1939, RFC 2449).
fn is_multiline(cmd: &str) -> bool {
    let mut words = cmd.split_whitespace();
    let keyword = words.next().unwrap_or("").to_ascii_uppercase();
    let args = words.count();
    match keyword.as_str() {
        "RETR" | "TOP" | "CAPA" => true,
        "LIST" | "UIDL" => args == 0,
        _ => false,
    }
}

/// The complete reply to `cmd`: status line plus, for a +OK multi-line
/// reply, the body through ".\r\n". Exact bytes.
fn read_reply(pop: &mut Pop3, cmd: &str) -> Vec<u8> {
    let mut reply = pop.read_line();
    if reply.starts_with(b"+OK") && is_multiline(cmd) {
        reply.extend(pop.read_multiline_body());
    }
    reply
}

/// Sends all `cmds` in a single write, then reads one complete reply per
/// command, in order.
fn pipeline<S: AsRef<str>>(pop: &mut Pop3, cmds: &[S]) -> Vec<Vec<u8>> {
    let mut batch = Vec::new();
    for c in cmds {
        batch.extend_from_slice(c.as_ref().as_bytes());
        batch.extend_from_slice(b"\r\n");
    }
    pop.send_raw(&batch);
    cmds.iter().map(|c| read_reply(pop, c.as_ref())).collect()
}

/// Sends each command and reads its reply before sending the next.
fn one_by_one<S: AsRef<str>>(pop: &mut Pop3, cmds: &[S]) -> Vec<Vec<u8>> {
    cmds.iter()
        .map(|c| {
            pop.send_raw(format!("{}\r\n", c.as_ref()).as_bytes());
            read_reply(pop, c.as_ref())
        })
        .collect()
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Panics with the first differing position and some context unless the
/// byte strings are equal.
fn assert_bytes_eq(what: &str, expected: &[u8], actual: &[u8]) {
    if expected == actual {
        return;
    }
    let first = expected
        .iter()
        .zip(actual)
        .position(|(a, b)| a != b)
        .unwrap_or(expected.len().min(actual.len()));
    let from = first.saturating_sub(80);
    panic!(
        "{what}: differs at byte {first} (expected {} bytes, got {} bytes)\n expected: {:?}\n got:      {:?}",
        expected.len(),
        actual.len(),
        lossy(&expected[from..(first + 80).min(expected.len())]),
        lossy(&actual[from..(first + 80).min(actual.len())]),
    );
}

/// The status line of a reply, without CRLF.
fn status_of(reply: &[u8]) -> String {
    let end = reply
        .iter()
        .position(|&b| b == b'\n')
        .map_or(reply.len(), |i| i + 1);
    lossy(&reply[..end]).trim_end().to_string()
}

/// The body of a multi-line reply (after the status line), unstuffed and
/// without the terminating ".\r\n".
fn body_of(reply: &[u8]) -> Vec<u8> {
    let start = reply
        .iter()
        .position(|&b| b == b'\n')
        .map_or(reply.len(), |i| i + 1);
    dot_unstuff(&reply[start..])
}

/// One line read from the connection, as text (CRLF kept).
fn line(pop: &mut Pop3) -> String {
    lossy(&pop.read_line())
}

/// Runs `cmd` and panics with its output unless it exits with status 0.
fn run_ok(cmd: &mut Command, dir: &Path, name: &str) -> Run {
    let r = run(cmd, dir, name);
    assert!(
        r.status.success(),
        "{name}: {cmd:?} failed ({})\nstdout: {}\nstderr: {}",
        r.status,
        lossy(&r.stdout[..r.stdout.len().min(4000)]),
        r.stderr
    );
    r
}

/// Number of messages in `user`'s INBOX, counted over IMAP.
fn imap_count(dovecot: &Dovecot, user: &str, pass: &str) -> usize {
    let mut imap = Imap::connect(dovecot.imap_port, user, pass);
    let n = imap.uids().len();
    imap.logout();
    n
}

// ---------------------------------------------------------------------------
// 1. Pipelining
// ---------------------------------------------------------------------------

#[test]
fn pipelined_login_and_commands_are_answered_completely_and_in_order() {
    let dovecot = Dovecot::start();
    let corpus = dovecot.deliver_corpus("alice");
    let bridge = Popbridge::start(dovecot.imap_port, &[]);
    let cmds = [
        "STAT", "LIST", "RETR 1", "RETR 2", "UIDL", "TOP 1 0", "NOOP",
    ];

    // Reference: Dovecot's own POP3 on the same mailbox, same batch. No
    // QUIT, so it changes nothing.
    let mut native = Pop3::connect(dovecot.pop3_port);
    native.send_raw(b"USER alice\r\nPASS secret\r\n");
    assert_eq!(line(&mut native), "+OK\r\n");
    assert_eq!(line(&mut native), "+OK Logged in.\r\n");
    let expected = pipeline(&mut native, &cmds);
    drop(native);

    let mut pop = Pop3::connect(bridge.port);
    pop.send_raw(b"USER alice\r\nPASS secret\r\n");
    assert_eq!(line(&mut pop), "+OK\r\n", "reply to pipelined USER");
    assert_eq!(
        line(&mut pop),
        "+OK Logged in.\r\n",
        "reply to pipelined PASS"
    );
    let got = pipeline(&mut pop, &cmds);
    for ((cmd, want), have) in cmds.iter().zip(&expected).zip(&got) {
        assert!(
            want.starts_with(b"+OK"),
            "Dovecot refused {cmd}: {}",
            lossy(want)
        );
        assert_bytes_eq(&format!("pipelined {cmd}"), want, have);
    }
    // The message bodies are the corpus messages, with CRLF line endings.
    assert_bytes_eq("RETR 1 body", &to_crlf(&corpus[0].1), &body_of(&got[2]));
    assert_bytes_eq("RETR 2 body", &to_crlf(&corpus[1].1), &body_of(&got[3]));
    assert_eq!(status_of(&got[6]), "+OK", "NOOP");
    // Nothing else was sent: the next reply belongs to the next command.
    assert_eq!(pop.cmd("QUIT"), "+OK Logging out.");
    assert!(pop.eof(), "popbridge should close after QUIT");
}

#[test]
fn fifty_pipelined_retrs_and_a_batch_larger_than_one_read() {
    let dovecot = Dovecot::start();
    let corpus = dovecot.deliver_corpus("alice");
    let n = corpus.len();
    let bridge = Popbridge::start(dovecot.imap_port, &[]);

    // 50 RETRs cycling through the whole corpus (the 3 MiB message
    // included), and ~7 KB of short commands (more than one 4 KiB read).
    let retrs: Vec<String> = (0..50).map(|i| format!("RETR {}", i % n + 1)).collect();
    let mut mixed: Vec<String> = Vec::new();
    for i in 0..700 {
        let k = i % n + 1;
        mixed.push(match i % 7 {
            0 => format!("LIST {k}"),
            1 => format!("UIDL {k}"),
            2 => "STAT".to_string(),
            3 => "NOOP".to_string(),
            4 => format!("TOP {k} 0"),
            5 => "RETR 1".to_string(),
            // Refused commands in between must not upset the order.
            _ => format!("RETR {}", n + 1 + i),
        });
    }
    let mixed_len: usize = mixed.iter().map(|c| c.len() + 2).sum();
    assert!(mixed_len > 4096, "batch is only {mixed_len} bytes");

    let mut native = Pop3::connect(dovecot.pop3_port);
    native.login("alice", "secret");
    let reference: Vec<Vec<u8>> = one_by_one(
        &mut native,
        &(1..=n).map(|k| format!("RETR {k}")).collect::<Vec<_>>(),
    );
    let expected_mixed = one_by_one(&mut native, &mixed);
    drop(native);

    let mut pop = Pop3::connect(bridge.port);
    pop.login("alice", "secret");
    let got = pipeline(&mut pop, &retrs);
    assert_eq!(got.len(), 50);
    for (i, reply) in got.iter().enumerate() {
        let k = i % n;
        assert_bytes_eq(
            &format!(
                "pipelined RETR #{} (message {}, {})",
                i + 1,
                k + 1,
                corpus[k].0
            ),
            &reference[k],
            reply,
        );
    }
    let got_mixed = pipeline(&mut pop, &mixed);
    for (i, ((cmd, want), have)) in mixed
        .iter()
        .zip(&expected_mixed)
        .zip(&got_mixed)
        .enumerate()
    {
        let refused = cmd == &format!("RETR {}", n + 1 + i);
        assert_eq!(
            want.starts_with(b"-ERR"),
            refused,
            "Dovecot's reply to {cmd}: {}",
            lossy(want)
        );
        assert_bytes_eq(
            &format!("command #{i} of the mixed batch: {cmd}"),
            want,
            have,
        );
    }
    assert_eq!(pop.cmd("QUIT"), "+OK Logging out.");
    assert!(pop.eof(), "popbridge should close after QUIT");
}

// ---------------------------------------------------------------------------
// 2. python3 poplib
// ---------------------------------------------------------------------------

const POPLIB_SCRIPT: &str = r#"
import hashlib, poplib, sys

# poplib refuses lines longer than 2048 octets by default; the corpus has a
# 5000-character body line.
poplib._MAXLINE = 1 << 20

host, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
crlf = b"\r\n"

def digest(lines):
    return hashlib.sha256(crlf.join(lines)).hexdigest()

p = poplib.POP3(host, port, timeout=60)
out = []
out.append("user %r" % p.user(user))
out.append("pass %r" % p.pass_(password))
count, size = p.stat()
out.append("stat %d %d" % (count, size))
resp, lines, octets = p.list()
out.append("list %r %r %d" % (resp, lines, octets))
resp, lines, octets = p.uidl()
out.append("uidl %r %r %d" % (resp, lines, octets))
for i in range(1, count + 1):
    resp, lines, octets = p.retr(i)
    out.append("retr %d %r %d %d %s" % (i, resp, octets, len(lines), digest(lines)))
resp, lines, octets = p.top(1, 0)
out.append("top 1 0 %r %d %d %s" % (resp, octets, len(lines), digest(lines)))
out.append("quit %r" % p.quit())
print("\n".join(out))
"#;

#[test]
fn python_poplib_sees_the_same_as_with_dovecot() {
    let dovecot = Dovecot::start();
    let corpus = dovecot.deliver_corpus("alice");
    let bridge = Popbridge::start(dovecot.imap_port, &[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("poplib_check.py");
    fs::write(&script, POPLIB_SCRIPT).expect("write script");

    let poplib = |port: u16, name: &str| {
        let r = run_ok(
            Command::new("python3")
                .arg(&script)
                .arg("127.0.0.1")
                .arg(port.to_string())
                .arg("alice")
                .arg("secret"),
            dir.path(),
            name,
        );
        lossy(&r.stdout)
    };
    // popbridge first: its QUIT must then have marked every message \Seen.
    let through_bridge = poplib(bridge.port, "poplib-popbridge");
    let mut imap = Imap::connect(dovecot.imap_port, "alice", "secret");
    let uids = imap.uids();
    assert_eq!(uids.len(), corpus.len(), "messages left after poplib QUIT");
    for uid in &uids {
        assert!(
            imap.flags(*uid).iter().any(|f| f == "\\Seen"),
            "UID {uid} not \\Seen after RETR + QUIT through popbridge"
        );
    }
    imap.logout();
    let through_dovecot = poplib(dovecot.pop3_port, "poplib-dovecot");

    assert!(
        through_dovecot.contains(&format!("\nstat {} ", corpus.len())),
        "unexpected reference output:\n{through_dovecot}"
    );
    assert_eq!(
        through_dovecot
            .lines()
            .filter(|l| l.starts_with("retr "))
            .count(),
        corpus.len()
    );
    let (want, have): (Vec<&str>, Vec<&str>) = (
        through_dovecot.lines().collect(),
        through_bridge.lines().collect(),
    );
    for (i, (w, h)) in want.iter().zip(&have).enumerate() {
        assert_eq!(h, w, "poplib output line {} differs", i + 1);
    }
    assert_eq!(have.len(), want.len(), "poplib output line count");
}

// ---------------------------------------------------------------------------
// 3. curl
// ---------------------------------------------------------------------------

#[test]
fn curl_lists_and_retrieves_like_from_dovecot() {
    let dovecot = Dovecot::start();
    let corpus = dovecot.deliver_corpus("alice");
    let bridge = Popbridge::start(dovecot.imap_port, &[]);
    let dir = tempfile::tempdir().expect("temp dir");

    let curl = |port: u16, path: &str, pass: &str, verbose: bool, name: &str| {
        let mut cmd = Command::new("curl");
        cmd.arg("-s").arg("-S").arg("--max-time").arg("60");
        if verbose {
            cmd.arg("-v");
        }
        cmd.arg(format!("pop3://alice:{pass}@127.0.0.1:{port}/{path}"));
        run(&mut cmd, dir.path(), name)
    };
    let ok = |r: Run, what: &str| -> Run {
        assert!(
            r.status.success(),
            "{what} failed ({}): {}",
            r.status,
            r.stderr
        );
        r
    };

    // Listing.
    let want = ok(
        curl(dovecot.pop3_port, "", "secret", false, "list-dovecot"),
        "curl LIST from Dovecot",
    );
    let have = ok(
        curl(bridge.port, "", "secret", true, "list-popbridge"),
        "curl LIST from popbridge",
    );
    assert_eq!(
        lossy(&want.stdout).lines().count(),
        corpus.len(),
        "Dovecot listing via curl:\n{}",
        lossy(&want.stdout)
    );
    assert_bytes_eq("curl listing", &want.stdout, &have.stdout);
    // popbridge offers SASL PLAIN on loopback, so curl logs in with AUTH
    // PLAIN, as it does with Dovecot.
    assert!(
        have.stderr.contains("> AUTH PLAIN"),
        "curl did not use AUTH PLAIN:\n{}",
        have.stderr
    );

    // Every message.
    for (i, (name, raw)) in corpus.iter().enumerate() {
        let n = i + 1;
        let want = ok(
            curl(
                dovecot.pop3_port,
                &n.to_string(),
                "secret",
                false,
                "retr-dovecot",
            ),
            &format!("curl RETR {n} from Dovecot"),
        );
        let have = ok(
            curl(
                bridge.port,
                &n.to_string(),
                "secret",
                false,
                "retr-popbridge",
            ),
            &format!("curl RETR {n} from popbridge"),
        );
        assert_bytes_eq(
            &format!("curl message {n} ({name})"),
            &want.stdout,
            &have.stdout,
        );
        if n == 1 {
            // plain_crlf: curl hands out exactly the stored message.
            assert_bytes_eq("curl message 1 vs corpus", &to_crlf(raw), &have.stdout);
        }
    }

    // A wrong password fails the same way with both servers.
    let want = curl(dovecot.pop3_port, "", "wrong", false, "bad-dovecot");
    let have = curl(bridge.port, "", "wrong", false, "bad-popbridge");
    assert!(!want.status.success(), "Dovecot accepted a wrong password");
    assert_eq!(
        have.status.code(),
        want.status.code(),
        "curl exit code for a wrong password (popbridge stderr: {})",
        have.stderr
    );
    assert!(have.stdout.is_empty(), "output despite a wrong password");
}

// ---------------------------------------------------------------------------
// 4. mpop with PIPELINING
// ---------------------------------------------------------------------------

/// Files of a maildir's new/ and cur/, contents only, sorted.
fn maildir_contents(dir: &Path) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    for sub in ["new", "cur"] {
        for entry in fs::read_dir(dir.join(sub)).expect("read maildir") {
            let path = entry.expect("dir entry").path();
            v.push(fs::read(&path).expect("read delivered message"));
        }
    }
    v.sort();
    v
}

fn make_maildir(dir: &Path) {
    for sub in ["cur", "new", "tmp"] {
        fs::create_dir_all(dir.join(sub)).expect("create maildir");
    }
}

/// Writes an mpop configuration (mode 0600) with one account `name`.
fn mpop_config(dir: &Path, name: &str, port: u16) -> std::path::PathBuf {
    let maildir = dir.join(format!("maildir-{name}"));
    make_maildir(&maildir);
    let conf = format!(
        "defaults\n\
         timeout 60\n\
         \n\
         account {name}\n\
         host 127.0.0.1\n\
         port {port}\n\
         user alice\n\
         password secret\n\
         auth user\n\
         tls off\n\
         tls_starttls off\n\
         pipelining auto\n\
         keep on\n\
         only_new on\n\
         received_header off\n\
         uidls_file {d}/uidls-{name}\n\
         delivery maildir {m}\n",
        d = dir.display(),
        m = maildir.display(),
    );
    let path = dir.join(format!("mpoprc-{name}"));
    fs::write(&path, conf).expect("write mpoprc");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod mpoprc");
    path
}

#[test]
fn mpop_fetches_everything_with_pipelining_and_keeps_it() {
    let dovecot = Dovecot::start();
    let corpus = dovecot.deliver_corpus("alice");
    let bridge = Popbridge::start(dovecot.imap_port, &[]);
    let dir = tempfile::tempdir().expect("temp dir");

    let conf = mpop_config(dir.path(), "bridge", bridge.port);
    let first = run_ok(
        Command::new("mpop")
            .arg("--debug")
            .arg("-C")
            .arg(&conf)
            .arg("bridge"),
        dir.path(),
        "mpop-bridge",
    );
    let transcript = lossy(&first.stdout);
    let delivered = maildir_contents(&dir.path().join("maildir-bridge"));
    assert_eq!(
        delivered.len(),
        corpus.len(),
        "messages delivered by mpop through popbridge; mpop said:\n{}\n{}",
        &transcript[..transcript.len().min(6000)],
        first.stderr
    );
    // Each corpus message arrived exactly once (by its distinct Subject).
    for (name, raw) in &corpus {
        let subject = common::subject_of(raw).expect("corpus Subject");
        let hits = delivered
            .iter()
            .filter(|m| common::subject_of(m).as_deref() == Some(subject.as_str()))
            .count();
        assert_eq!(hits, 1, "{name}: delivered {hits} times");
    }

    // mpop saw PIPELINING and used it: PASS went out before the reply to
    // USER came back, and RETRs were sent ahead of the replies.
    let proto: Vec<&str> = transcript
        .lines()
        .filter(|l| l.starts_with("--> ") || l.starts_with("<-- "))
        .collect();
    let user_at = proto
        .iter()
        .position(|l| l.starts_with("--> USER "))
        .unwrap_or_else(|| panic!("no USER in mpop's transcript:\n{transcript}"));
    assert!(
        proto
            .get(user_at + 1)
            .is_some_and(|l| l.starts_with("--> PASS ")),
        "mpop did not pipeline USER and PASS: {:?}",
        &proto[user_at..(user_at + 4).min(proto.len())]
    );
    let first_retr = proto
        .iter()
        .position(|l| l.starts_with("--> RETR "))
        .expect("no RETR in mpop's transcript");
    assert!(
        proto
            .get(first_retr + 1)
            .is_some_and(|l| l.starts_with("--> RETR ")),
        "mpop did not pipeline RETRs: {:?}",
        &proto[first_retr..(first_retr + 4).min(proto.len())]
    );
    assert!(
        !proto.iter().any(|l| l.starts_with("--> DELE")),
        "mpop sent DELE despite keep on"
    );

    // Nothing was deleted on the server.
    assert_eq!(imap_count(&dovecot, "alice", "secret"), corpus.len());

    // Same client against Dovecot's own POP3: the same files.
    let conf_native = mpop_config(dir.path(), "dovecot", dovecot.pop3_port);
    run_ok(
        Command::new("mpop")
            .arg("-C")
            .arg(&conf_native)
            .arg("dovecot"),
        dir.path(),
        "mpop-dovecot",
    );
    let native = maildir_contents(&dir.path().join("maildir-dovecot"));
    assert_eq!(native.len(), corpus.len());
    assert_eq!(native.len(), delivered.len());
    for (i, (w, h)) in native.iter().zip(&delivered).enumerate() {
        assert_bytes_eq(&format!("mpop delivery #{i} (sorted)"), w, h);
    }

    // A second run knows every UIDL already and fetches nothing.
    let again = run_ok(
        Command::new("mpop").arg("-C").arg(&conf).arg("bridge"),
        dir.path(),
        "mpop-bridge-again",
    );
    assert_eq!(
        maildir_contents(&dir.path().join("maildir-bridge")).len(),
        corpus.len(),
        "second mpop run fetched again:\n{}\n{}",
        lossy(&again.stdout),
        again.stderr
    );
    assert_eq!(imap_count(&dovecot, "alice", "secret"), corpus.len());
}

// ---------------------------------------------------------------------------
// 5. Hostile input
// ---------------------------------------------------------------------------

#[test]
fn unknown_and_overlong_commands_get_err_and_the_session_goes_on() {
    let dovecot = Dovecot::start();
    dovecot.deliver_corpus("alice");
    let bridge = Popbridge::start(dovecot.imap_port, &[]);
    let mut pop = Pop3::connect(bridge.port);

    // Unknown command in AUTHORIZATION.
    let r = pop.cmd("XYZZY");
    assert!(r.starts_with("-ERR "), "XYZZY: {r}");
    // A 300-byte line (298 + CRLF > 255).
    let mut long = b"USER ".to_vec();
    long.resize(298, b'a');
    long.extend_from_slice(b"\r\n");
    assert_eq!(long.len(), 300);
    pop.send_raw(&long);
    let r = line(&mut pop);
    assert!(r.starts_with("-ERR "), "300-byte line: {r:?}");
    // The next command works.
    assert_eq!(pop.cmd("USER alice"), "+OK");
    // An endless line in AUTHORIZATION: one -ERR for it, then NOOP's -ERR
    // (NOOP needs a login), then USER and PASS work.
    let mut endless = vec![b'x'; 1024 * 1024];
    endless.extend_from_slice(b"\r\nNOOP\r\n");
    pop.send_raw(&endless);
    let r = line(&mut pop);
    assert!(r.starts_with("-ERR "), "1 MB line before login: {r:?}");
    let r = line(&mut pop);
    assert!(r.starts_with("-ERR "), "NOOP before login: {r:?}");
    assert_eq!(pop.cmd("USER alice"), "+OK");
    assert_eq!(pop.cmd("PASS secret"), "+OK Logged in.");

    // Unknown command in TRANSACTION.
    let r = pop.cmd("XYZZY 1 2");
    assert!(r.starts_with("-ERR "), "XYZZY in TRANSACTION: {r}");
    let (count, octets) = pop.stat();

    // Lowercase works.
    assert_eq!(pop.cmd("stat"), format!("+OK {count} {octets}"));
    let r = pop.cmd("noop");
    assert_eq!(r, "+OK");

    // An endless line: 1 MB without LF, then CRLF and NOOP. Exactly one
    // -ERR for the long line, then NOOP's +OK, then STAT's reply.
    let mut endless = vec![b'x'; 1024 * 1024];
    endless.extend_from_slice(b"\r\nNOOP\r\n");
    pop.send_raw(&endless);
    let r = line(&mut pop);
    assert!(r.starts_with("-ERR "), "1 MB line: {r:?}");
    assert_eq!(line(&mut pop), "+OK\r\n", "NOOP after the 1 MB line");
    assert_eq!(pop.cmd("STAT"), format!("+OK {count} {octets}"));

    // Message numbers that are not message numbers.
    for bad in [
        "RETR 99999999999999999999",
        "RETR 4294967296",
        "RETR 0",
        "RETR -1",
        "RETR 1x",
        "TOP 1 -1",
        "TOP 1 x",
        "TOP 1",
        "TOP 99999999999999999999 0",
        "TOP 1 99999999999999999999",
        "LIST 99999999999999999999",
        "UIDL 99999999999999999999",
        "DELE 99999999999999999999",
        &format!("RETR {}", count + 1),
    ] {
        let r = pop.cmd(bad);
        assert!(r.starts_with("-ERR "), "{bad}: {r}");
    }
    // None of that deleted or changed anything.
    assert_eq!(pop.cmd("STAT"), format!("+OK {count} {octets}"));
    assert_eq!(pop.cmd("QUIT"), "+OK Logging out.");
    assert!(pop.eof());
    assert_eq!(imap_count(&dovecot, "alice", "secret"), count);
}

#[test]
fn binary_garbage_and_nul_bytes_get_err_without_harm() {
    let dovecot = Dovecot::start();
    dovecot.deliver_corpus("alice");
    let mut bridge = Popbridge::start(dovecot.imap_port, &[]);

    // Deterministic garbage with every byte value except LF.
    let mut noise: Vec<u8> = (0u16..=255)
        .map(|b| b as u8)
        .filter(|&b| b != b'\n')
        .collect();
    noise.truncate(200);
    let garbage: Vec<Vec<u8>> = vec![
        b"\x00\r\n".to_vec(),
        b"\x00\x00\x00\x00\x00\x00\r\n".to_vec(),
        b"ST\x00T\r\n".to_vec(),
        b"\xff\xfe\xfd\xfc\r\n".to_vec(),
        b"\x1b[2J\x07\x08\r\n".to_vec(),
        b"\r\n".to_vec(),
        b"\x80\x81 \x82\x83\r\n".to_vec(),
        [noise.clone(), b"\r\n".to_vec()].concat(),
    ];

    let mut pop = Pop3::connect(bridge.port);
    for g in &garbage {
        pop.send_raw(g);
        let r = line(&mut pop);
        assert!(r.starts_with("-ERR "), "{:?}: {r:?}", lossy(g));
    }
    // NUL inside the credentials is refused before it reaches IMAP.
    let r = pop.cmd("USER al\0ice");
    assert!(r.starts_with("-ERR "), "USER with NUL: {r}");
    assert!(pop.cmd("USER alice").starts_with("+OK"));
    let r = pop.cmd("PASS sec\0ret");
    assert!(r.starts_with("-ERR "), "PASS with NUL: {r}");
    // The session still works.
    pop.login("alice", "secret");
    for g in &garbage {
        pop.send_raw(g);
        let r = line(&mut pop);
        assert!(
            r.starts_with("-ERR "),
            "in TRANSACTION, {:?}: {r:?}",
            lossy(g)
        );
    }
    let (count, _) = pop.stat();
    assert!(count > 0);
    // All of it at once, then STAT.
    let mut batch: Vec<u8> = garbage.concat();
    batch.extend_from_slice(b"STAT\r\n");
    pop.send_raw(&batch);
    for g in &garbage {
        let r = line(&mut pop);
        assert!(r.starts_with("-ERR "), "pipelined {:?}: {r:?}", lossy(g));
    }
    assert!(line(&mut pop).starts_with(&format!("+OK {count} ")));
    drop(pop);

    // Garbage and then a hang-up mid-line.
    let mut pop = Pop3::connect(bridge.port);
    pop.send_raw(&noise);
    drop(pop);

    // The proxy is alive and serves a new connection.
    let mut pop = Pop3::connect(bridge.port);
    assert!(pop.greeting().starts_with("+OK"), "{}", pop.greeting());
    pop.login("alice", "secret");
    assert_eq!(pop.stat().0, count);
    pop.quit();
    assert!(bridge.try_wait().is_none(), "popbridge exited");
}

#[test]
fn twenty_bad_commands_in_a_row_close_the_connection() {
    let dovecot = Dovecot::start();
    dovecot.deliver_corpus("alice");
    let bridge = Popbridge::start(dovecot.imap_port, &[]);

    // 19 bad, one good, 19 bad: the count restarts, nothing closes.
    let mut pop = Pop3::connect(bridge.port);
    for round in 0..2 {
        for i in 0..19 {
            let r = pop.cmd("BOGUS");
            assert!(
                r.starts_with("-ERR "),
                "round {round}, bad command {i}: {r}"
            );
        }
        let (r, _) = pop.cmd_multi("CAPA");
        assert_eq!(r, "+OK", "CAPA after 19 bad commands (round {round})");
    }

    // One at a time, in AUTHORIZATION: the 20th closes.
    for i in 1..=19 {
        let r = pop.cmd("BOGUS");
        assert!(r.starts_with("-ERR "), "bad command {i}: {r}");
    }
    let r = pop.cmd("BOGUS");
    assert!(r.starts_with("-ERR "), "bad command 20: {r}");
    assert_eq!(line(&mut pop), "-ERR Too many invalid commands.\r\n");
    assert!(pop.eof(), "connection still open after 20 bad commands");

    // Pipelined, in TRANSACTION (commands refused there count too).
    let mut pop = Pop3::connect(bridge.port);
    pop.login("alice", "secret");
    let mut batch = Vec::new();
    for i in 0..20 {
        batch.extend_from_slice(if i % 2 == 0 {
            b"RETR 0\r\n"
        } else {
            b"HELO\r\n"
        });
    }
    pop.send_raw(&batch);
    for i in 1..=20 {
        let r = line(&mut pop);
        assert!(r.starts_with("-ERR "), "pipelined bad command {i}: {r:?}");
    }
    assert_eq!(line(&mut pop), "-ERR Too many invalid commands.\r\n");
    assert!(pop.eof(), "connection still open after 20 bad commands");
}

// ---------------------------------------------------------------------------
// 6. No secret in the logs
// ---------------------------------------------------------------------------

#[test]
fn trace_log_holds_no_password_and_no_message_content() {
    const USER: &str = "carol";
    const PASSWORD: &str = "Quokka-Pw-7Zr9Kd2Lmx";
    const WRONG: &str = "Pangolin-Wrong-4q1Xv8";
    const MARKER: &str = "BodyMarker-Ocelot-55821-zq";
    let dovecot = Dovecot::start_with(DovecotOptions {
        users: vec![(USER.to_string(), PASSWORD.to_string())],
        ..DovecotOptions::default()
    });
    let message = format!(
        "From: a@example.org\r\nTo: carol@example.net\r\nSubject: log test\r\n\
         Message-ID: <logtest@popbridge.test>\r\n\r\nThe marker is {MARKER} here.\r\n"
    );
    dovecot.deliver(USER, message.as_bytes());
    let bridge = Popbridge::start_with_log(dovecot.imap_port, &[], "trace");

    // Wrong password, one command at a time and pipelined.
    let mut pop = Pop3::connect(bridge.port);
    assert!(pop.cmd(&format!("USER {USER}")).starts_with("+OK"));
    let r = pop.cmd(&format!("PASS {WRONG}"));
    assert!(r.starts_with("-ERR [AUTH]"), "wrong password: {r}");
    pop.send_raw(format!("USER {USER}\r\nPASS {WRONG}\r\n").as_bytes());
    assert_eq!(line(&mut pop), "+OK\r\n");
    assert!(line(&mut pop).starts_with("-ERR [AUTH]"));
    // Right password, then read the message.
    pop.login(USER, PASSWORD);
    let body = pop.retr(1);
    assert!(
        lossy(&body).contains(MARKER),
        "RETR did not return the marker"
    );
    let (r, top) = pop.cmd_multi("TOP 1 5");
    assert!(r.starts_with("+OK") && lossy(&top).contains(MARKER));
    pop.quit();
    // Pipelined right password too.
    let mut pop = Pop3::connect(bridge.port);
    pop.send_raw(format!("USER {USER}\r\nPASS {PASSWORD}\r\nRETR 1\r\nQUIT\r\n").as_bytes());
    assert_eq!(line(&mut pop), "+OK\r\n");
    assert_eq!(line(&mut pop), "+OK Logged in.\r\n");
    let reply = read_reply(&mut pop, "RETR 1");
    assert!(lossy(&reply).contains(MARKER));
    assert_eq!(line(&mut pop), "+OK Logging out.\r\n");

    let log = wait_for_log(|| bridge.log(), "session ended reason=\"quit\"", 2);
    // The log is really at trace level and saw these sessions.
    assert!(log.contains("logged in"), "no login in the log:\n{log}");
    assert!(
        log.contains("login refused"),
        "no refusal in the log:\n{log}"
    );

    let mut forbidden: Vec<(String, String)> = Vec::new();
    for (what, pass) in [("password", PASSWORD), ("wrong password", WRONG)] {
        forbidden.push((what.to_string(), pass.to_string()));
        forbidden.push((format!("{what} in base64"), base64(pass.as_bytes())));
        forbidden.push((
            format!("{what} as AUTH PLAIN"),
            base64(format!("\0{USER}\0{pass}").as_bytes()),
        ));
        forbidden.push((
            format!("{what} as AUTH PLAIN with authzid"),
            base64(format!("{USER}\0{USER}\0{pass}").as_bytes()),
        ));
    }
    forbidden.push(("message body marker".to_string(), MARKER.to_string()));
    for (what, needle) in &forbidden {
        if let Some(pos) = log.find(needle.as_str()) {
            let start = log[..pos].rfind('\n').map_or(0, |i| i + 1);
            let end = log[pos..].find('\n').map_or(log.len(), |i| pos + i);
            panic!(
                "the {what} ({needle:?}) is in popbridge's trace log:\n{}",
                &log[start..end]
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 7. CAPA
// ---------------------------------------------------------------------------

fn capa_lines(pop: &mut Pop3) -> Vec<String> {
    let (status, body) = pop.cmd_multi("CAPA");
    assert!(status.starts_with("+OK"), "CAPA: {status}");
    let text = lossy(&body);
    assert!(text.ends_with("\r\n.\r\n"), "CAPA body: {text:?}");
    text.split("\r\n")
        .filter(|l| !l.is_empty() && *l != ".")
        .map(String::from)
        .collect()
}

fn assert_capabilities(lines: &[String], when: &str) {
    for cap in [
        "TOP",
        "USER",
        "UIDL",
        "RESP-CODES",
        "PIPELINING",
        "AUTH-RESP-CODE",
    ] {
        assert!(
            lines.iter().any(|l| l == cap),
            "CAPA {when} lacks {cap}: {lines:?}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("IMPLEMENTATION popbridge")),
        "CAPA {when} lacks IMPLEMENTATION popbridge: {lines:?}"
    );
}

#[test]
fn capa_before_and_after_login() {
    let dovecot = Dovecot::start();
    let bridge = Popbridge::start(dovecot.imap_port, &[]);
    let mut pop = Pop3::connect(bridge.port);
    let before = capa_lines(&mut pop);
    assert_capabilities(&before, "before login");
    assert!(pop.cmd("USER alice").starts_with("+OK"));
    let between = capa_lines(&mut pop);
    assert_capabilities(&between, "after USER");
    assert!(pop.cmd("PASS secret").starts_with("+OK"));
    let after = capa_lines(&mut pop);
    assert_capabilities(&after, "after login");
    // Each capability is named once.
    let mut seen = BTreeMap::new();
    for l in &after {
        *seen
            .entry(l.split_whitespace().next().unwrap_or(""))
            .or_insert(0) += 1;
    }
    assert!(
        seen.values().all(|&n| n == 1),
        "duplicates in CAPA: {after:?}"
    );
    pop.quit();
}
