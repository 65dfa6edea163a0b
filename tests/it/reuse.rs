//! Upstream session reuse against a real Dovecot: an ended POP3 session's
//! IMAP session serves the account's next login (fresh snapshot), never a
//! login with another password; a UIDVALIDITY change discards it; the
//! per-account cap holds; shutdown logs idle sessions out.

use std::time::{Duration, Instant};

use crate::common::logs::wait_for_log;
use crate::common::oauth::http_request;
use crate::common::{corpus_message, Dovecot, Imap, Pop3, Popbridge};

/// popbridge with the admin listener (metrics) and default reuse.
fn popbridge(dovecot: &Dovecot) -> (Popbridge, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("popbridge.toml");
    std::fs::write(
        &path,
        "[admin]\naddress = \"127.0.0.1:0\"\n[upstream]\nreuse_max_per_account = 2\n",
    )
    .unwrap();
    let pb = Popbridge::start(dovecot.imap_port, &["--config", path.to_str().unwrap()]);
    (pb, dir)
}

/// The value of one metric series (0 when absent).
fn metric(pb: &Popbridge, series: &str) -> u64 {
    let resp = http_request(pb.admin_port(), "GET", "/metrics", &[], b"");
    assert_eq!(resp.status, 200);
    let text = String::from_utf8_lossy(&resp.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

pub(crate) fn sessions(pb: &Popbridge, kind: &str) -> u64 {
    metric(
        pb,
        &format!("popbridge_upstream_sessions_total{{kind=\"{kind}\"}}"),
    )
}

/// Idle upstream sessions in the pool now.
pub(crate) fn idle(pb: &Popbridge) -> u64 {
    metric(pb, "popbridge_upstream_sessions_idle")
}

/// Waits until the idle gauge reads `n` (sessions return to the pool as
/// their POP3 session ends, just after QUIT's answer).
pub(crate) fn wait_idle(pb: &Popbridge, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let idle = metric(pb, "popbridge_upstream_sessions_idle");
        if idle == n {
            return;
        }
        assert!(Instant::now() < deadline, "idle sessions: {idle}, want {n}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The Message-IDs a POP3 session sees.
fn message_ids(pb: &Popbridge, user: &str, pass: &str) -> Vec<String> {
    let mut pop = Pop3::connect(pb.port);
    pop.login(user, pass);
    let (count, _) = pop.stat();
    let ids = (1..=count)
        .map(|n| {
            let body = String::from_utf8_lossy(&pop.retr(n)).into_owned();
            body.lines()
                .find_map(|l| l.strip_prefix("Message-ID: "))
                .unwrap_or("?")
                .to_string()
        })
        .collect();
    pop.quit();
    ids
}

fn message(id: &str) -> Vec<u8> {
    format!("From: a@example.org\r\nMessage-ID: <{id}>\r\nSubject: {id}\r\n\r\nbody {id}\r\n")
        .into_bytes()
}

#[test]
fn a_reused_session_sees_new_mail_and_not_expunged_mail() {
    let dovecot = Dovecot::start();
    dovecot.deliver("alice", &message("one@x"));
    dovecot.deliver("alice", &message("two@x"));
    let (pb, _dir) = popbridge(&dovecot);
    assert_eq!(message_ids(&pb, "alice", "secret"), ["<one@x>", "<two@x>"]);
    wait_idle(&pb, 1);
    // Meanwhile an IMAP client expunges one and new mail arrives.
    let mut imap = Imap::connect(dovecot.imap_port, "alice", "secret");
    let uids = imap.uids();
    imap.uid_store_flags(uids[0], "\\Deleted");
    imap.command("EXPUNGE").unwrap();
    imap.logout();
    dovecot.deliver("alice", &message("three@x"));
    assert_eq!(
        message_ids(&pb, "alice", "secret"),
        ["<two@x>", "<three@x>"]
    );
    assert_eq!(sessions(&pb, "opened"), 1, "one IMAP login for two polls");
    assert_eq!(sessions(&pb, "reused"), 1);
}

#[test]
fn a_wrong_password_never_takes_a_pooled_session() {
    let dovecot = Dovecot::start();
    dovecot.deliver("alice", &corpus_message("plain_crlf"));
    let (pb, _dir) = popbridge(&dovecot);
    message_ids(&pb, "alice", "secret");
    wait_idle(&pb, 1);
    let mut pop = Pop3::connect(pb.port);
    assert!(pop.cmd("USER alice").starts_with("+OK"));
    let r = pop.cmd("PASS wrong");
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    assert_eq!(sessions(&pb, "reused"), 0);
    assert_eq!(sessions(&pb, "opened"), 1, "the failed login went upstream");
    assert_eq!(metric(&pb, "popbridge_upstream_sessions_idle"), 1);
    // Dovecot saw the wrong password: it was checked there, not here.
    wait_for_log(|| dovecot.log(), "auth failed", 1);
    message_ids(&pb, "alice", "secret");
    assert_eq!(sessions(&pb, "reused"), 1);
}

#[test]
fn a_changed_uidvalidity_discards_the_pooled_session() {
    let dovecot = Dovecot::start();
    dovecot.deliver("alice", &message("one@x"));
    let (pb, _dir) = popbridge(&dovecot);
    message_ids(&pb, "alice", "secret");
    wait_idle(&pb, 1);
    dovecot.doveadm(&[
        "mailbox",
        "update",
        "-u",
        "alice",
        "--uid-validity",
        "4242",
        "INBOX",
    ]);
    let mut pop = Pop3::connect(pb.port);
    pop.login("alice", "secret");
    let uidls = pop.uidl();
    assert!(
        uidls.iter().all(|(_, u)| u.ends_with("00001092")),
        "UIDLs of the new UIDVALIDITY (4242 = 0x1092): {uidls:?}"
    );
    pop.quit();
    assert_eq!(sessions(&pb, "stale"), 1);
    assert_eq!(sessions(&pb, "reused"), 0);
    assert_eq!(sessions(&pb, "opened"), 2);
}

#[test]
fn the_per_account_cap_holds_and_shutdown_logs_idle_sessions_out() {
    let dovecot = Dovecot::start();
    dovecot.deliver("alice", &corpus_message("plain_crlf"));
    let (mut pb, _dir) = popbridge(&dovecot);
    // Three sessions at once, then all end: two stay idle, one leaves.
    let mut pops: Vec<Pop3> = (0..3)
        .map(|_| {
            let mut p = Pop3::connect(pb.port);
            p.login("alice", "secret");
            p
        })
        .collect();
    for p in &mut pops {
        p.quit();
    }
    wait_idle(&pb, 2);
    assert_eq!(sessions(&pb, "opened"), 3);
    assert_eq!(sessions(&pb, "evicted"), 1);
    let before = dovecot.log().matches("Logged out").count();
    crate::common::servers::signal(pb.pid(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    while pb.try_wait().is_none() {
        assert!(Instant::now() < deadline, "popbridge did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The two idle sessions ended with LOGOUT (Dovecot logs "Logged out";
    // a dropped connection is "Disconnected").
    wait_for_log(|| dovecot.log(), "Logged out", before + 2);
}
