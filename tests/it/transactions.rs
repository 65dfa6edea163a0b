//! POP3 transactions through popbridge against a real Dovecot: what DELE,
//! RSET, RETR, TOP and QUIT (or the lack of QUIT) do to the IMAP mailbox,
//! concurrent changes by other IMAP clients, the no-UIDPLUS policies and
//! login failures. Mailbox state is always checked over IMAP.

use std::net::{Shutdown, SocketAddr};
use std::path::PathBuf;

use crate::common;
use crate::common::ports::ClosedPort;
use crate::common::raw_pop3::RawPop3;
use crate::common::{Dovecot, DovecotOptions, Imap, Pop3, Popbridge};

const USER: &str = "alice";
const PASS: &str = "secret";

/// Dovecot's capabilities after login, minus UIDPLUS (and ESEARCH etc.).
const NO_UIDPLUS_CAPS: &str = "IMAP4rev1 LITERAL+ SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SEARCHRES THREAD=REFERENCES MULTIAPPEND UNSELECT CHILDREN NAMESPACE CONDSTORE QRESYNC MOVE AUTH=PLAIN";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Test message `i`: distinct Subject, distinct size (i body lines), CRLF.
fn message(i: usize) -> Vec<u8> {
    common::text_message(
        "Alice <alice@example.net>",
        &format!("transactions {i}"),
        &format!("txn-{i}"),
        (1..=i).map(|line| format!("body line {line} of message {i}")),
    )
}

/// Delivers messages `1..=n` to alice's INBOX; returns their UIDs, ascending
/// (POP3 message k is UID `uids[k - 1]`).
fn deliver(dovecot: &Dovecot, n: usize) -> Vec<u32> {
    let before = imap(dovecot).uids();
    for i in 1..=n {
        dovecot.deliver(USER, &message(i));
    }
    let uids: Vec<u32> = imap(dovecot)
        .uids()
        .into_iter()
        .filter(|u| !before.contains(u))
        .collect();
    assert_eq!(uids.len(), n, "delivered {n}, IMAP shows new UIDs {uids:?}");
    uids
}

/// A fresh Dovecot with messages `1..=n` in alice's INBOX (see
/// [`deliver`]) and popbridge in front of it with default settings.
/// Returns the Dovecot, the messages' UIDs (ascending) and popbridge.
fn bridge_with_messages(n: usize) -> (Dovecot, Vec<u32>, Popbridge) {
    let dovecot = Dovecot::start();
    let uids = deliver(&dovecot, n);
    let pb = Popbridge::start(dovecot.imap_port, &[]);
    (dovecot, uids, pb)
}

/// A fresh IMAP session for alice with INBOX selected.
fn imap(dovecot: &Dovecot) -> Imap {
    Imap::connect(dovecot.imap_port, USER, PASS)
}

/// Number of messages in alice's INBOX, from a fresh IMAP session.
fn count(dovecot: &Dovecot) -> usize {
    let mut i = imap(dovecot);
    let n = i.uids().len();
    i.logout();
    n
}

fn has_flag(imap: &mut Imap, uid: u32, flag: &str) -> bool {
    imap.flags(uid).iter().any(|f| f.eq_ignore_ascii_case(flag))
}

/// Whether `uid` has `flag`, asked in a fresh IMAP session: a long-lived
/// Dovecot session may not see other sessions' flag changes until it syncs.
fn flagged(dovecot: &Dovecot, uid: u32, flag: &str) -> bool {
    let mut i = imap(dovecot);
    let r = has_flag(&mut i, uid, flag);
    i.logout();
    r
}

/// The Subject of message `uid`, read over IMAP without setting \Seen.
fn subject(imap: &mut Imap, uid: u32) -> String {
    common::subject_of(&imap.fetch_message(uid)).expect("Subject header")
}

/// Starts popbridge with `toml` as its --config file. The harness's own
/// flags (listen, upstream, upstream-tls none) override the file.
fn start_with_config(dovecot_imap_port: u16, toml: &str) -> (Popbridge, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("pbtxn-")
        .tempdir()
        .expect("config temp dir");
    let path: PathBuf = dir.path().join("popbridge.toml");
    std::fs::write(&path, toml).expect("write popbridge.toml");
    let path = path.to_str().expect("UTF-8 temp path").to_string();
    let pb = Popbridge::start(dovecot_imap_port, &["--config", &path]);
    (pb, dir)
}

/// Waits (bounded) until popbridge logged "session ended" for the session
/// whose client side is `client`. Every upstream effect of a session (its
/// LOGOUT included) happens before that line.
fn wait_session_ended(pb: &Popbridge, client: SocketAddr) {
    common::logs::wait_session_ended(pb, &format!("peer={client}"));
}

/// `cmd` must be answered with exactly `expected`, and (for RETR/TOP) no
/// multi-line body may follow an -ERR.
fn expect_line(pop: &mut Pop3, cmd: &str, expected: &str) {
    let (status, body) = pop.cmd_multi(cmd);
    assert_eq!(status, expected, "reply to {cmd}");
    assert!(body.is_empty(), "{cmd}: unexpected body {body:?}");
}

// ---------------------------------------------------------------------------
// 1. DELE + QUIT
// ---------------------------------------------------------------------------

#[test]
fn dele_and_quit_remove_exactly_the_marked_messages() {
    let (dovecot, uids, pb) = bridge_with_messages(5);
    let before = count(&dovecot);
    assert_eq!(before, 5);

    let mut pop = Pop3::connect(pb.port);
    pop.login(USER, PASS);
    let full = pop.stat();
    assert_eq!(full.0, 5);
    let sizes = pop.list();
    for n in [2, 4] {
        let r = pop.cmd(&format!("DELE {n}"));
        assert!(r.starts_with("+OK"), "DELE {n}: {r}");
    }
    // Marked messages are hidden from this session, not yet gone.
    let deleted_octets = sizes[1].1 + sizes[3].1;
    assert_eq!(pop.stat(), (3, full.1 - deleted_octets));
    let r = pop.cmd("RETR 2");
    assert!(r.starts_with("-ERR"), "RETR of a DELEd message: {r}");
    let r = pop.cmd("DELE 4");
    assert!(r.starts_with("-ERR"), "second DELE of a message: {r}");
    assert_eq!(
        count(&dovecot),
        5,
        "DELE must not touch the mailbox before QUIT"
    );

    assert_eq!(pop.cmd("QUIT"), "+OK Logging out, messages deleted.");
    assert!(pop.eof(), "popbridge should close after QUIT");

    let mut check = imap(&dovecot);
    assert_eq!(check.uids(), vec![uids[0], uids[2], uids[4]]);
    for (uid, i) in [(uids[0], 1), (uids[2], 3), (uids[4], 5)] {
        assert_eq!(subject(&mut check, uid), format!("transactions {i}"));
        assert!(!has_flag(&mut check, uid, "\\Deleted"), "UID {uid}");
    }
    // Counting guard: exactly the two committed DELEs.
    assert_eq!(before - count(&dovecot), 2);
}

// ---------------------------------------------------------------------------
// 2. Other clients' \Deleted flags are left alone
// ---------------------------------------------------------------------------

#[test]
fn quit_does_not_expunge_messages_flagged_deleted_by_another_client() {
    let (dovecot, uids, pb) = bridge_with_messages(5);

    let mut other = imap(&dovecot);
    // Flagged before the POP3 session starts.
    other.uid_store_flags(uids[0], "\\Deleted");
    let before = count(&dovecot);
    assert_eq!(before, 5);

    let mut pop = Pop3::connect(pb.port);
    pop.login(USER, PASS);
    // Flagged while the POP3 session is open.
    other.uid_store_flags(uids[1], "\\Deleted");
    for n in [3, 4] {
        let r = pop.cmd(&format!("DELE {n}"));
        assert!(r.starts_with("+OK"), "DELE {n}: {r}");
    }
    assert_eq!(pop.cmd("QUIT"), "+OK Logging out, messages deleted.");
    assert!(pop.eof());

    let mut check = imap(&dovecot);
    assert_eq!(
        check.uids(),
        vec![uids[0], uids[1], uids[4]],
        "only the POP3-deleted UIDs {} and {} may go",
        uids[2],
        uids[3]
    );
    assert!(has_flag(&mut check, uids[0], "\\Deleted"));
    assert!(has_flag(&mut check, uids[1], "\\Deleted"));
    assert!(!has_flag(&mut check, uids[4], "\\Deleted"));
    assert_eq!(before - count(&dovecot), 2);
    other.logout();
}

// ---------------------------------------------------------------------------
// 3. No QUIT, no deletion
// ---------------------------------------------------------------------------

#[test]
fn session_dropped_without_quit_removes_nothing() {
    let (dovecot, uids, pb) = bridge_with_messages(3);
    let before = count(&dovecot);

    // (a) DELEs answered, then the socket is closed.
    let mut pop = RawPop3::connect_greeted(pb.port);
    pop.login(USER, PASS);
    for n in [1, 2] {
        let r = pop.cmd(&format!("DELE {n}"));
        assert!(r.starts_with("+OK"), "DELE {n}: {r}");
    }
    let client = pop.local;
    drop(pop);
    wait_session_ended(&pb, client);
    assert_eq!(imap(&dovecot).uids(), uids, "after close without QUIT");

    // (b) DELE sent and the connection shut down at once, reply unread.
    let mut pop = RawPop3::connect_greeted(pb.port);
    pop.login(USER, PASS);
    pop.send(b"DELE 1\r\nDELE 3\r\n");
    pop.shutdown(Shutdown::Both).expect("shutdown");
    let client = pop.local;
    drop(pop);
    wait_session_ended(&pb, client);
    assert_eq!(imap(&dovecot).uids(), uids, "after shutdown mid-session");

    // (c) DELE answered, then "QUIT" without its CRLF and a half-close: an
    // incomplete command line is not a QUIT.
    let mut pop = RawPop3::connect_greeted(pb.port);
    pop.login(USER, PASS);
    let r = pop.cmd("DELE 2");
    assert!(r.starts_with("+OK"), "DELE 2: {r}");
    pop.send(b"QUIT");
    pop.shutdown(Shutdown::Write).expect("half-close");
    let rest = pop.read_to_eof();
    assert_eq!(
        String::from_utf8_lossy(&rest),
        "",
        "nothing may answer an unterminated QUIT"
    );
    let client = pop.local;
    drop(pop);
    wait_session_ended(&pb, client);

    let mut check = imap(&dovecot);
    assert_eq!(check.uids(), uids, "after an unterminated QUIT");
    for &uid in &uids {
        assert!(!has_flag(&mut check, uid, "\\Deleted"), "UID {uid}");
    }
    // Counting guard: no DELE was committed.
    assert_eq!(count(&dovecot), before);
}

// ---------------------------------------------------------------------------
// 4. RSET
// ---------------------------------------------------------------------------

#[test]
fn rset_clears_deletion_marks() {
    let (dovecot, uids, pb) = bridge_with_messages(3);
    let before = count(&dovecot);

    let mut pop = Pop3::connect(pb.port);
    pop.login(USER, PASS);
    let full = pop.stat();
    let list = pop.list();
    assert_eq!(full.0, 3);
    let r = pop.cmd("DELE 1");
    assert!(r.starts_with("+OK"), "DELE 1: {r}");
    assert_eq!(pop.stat(), (2, full.1 - list[0].1));
    let r = pop.cmd("RSET");
    assert!(r.starts_with("+OK"), "RSET: {r}");
    assert_eq!(pop.stat(), full, "STAT after RSET");
    assert_eq!(pop.list(), list, "LIST after RSET");
    assert_eq!(pop.retr(1), message(1), "message 1 is usable again");
    assert_eq!(pop.cmd("QUIT"), "+OK Logging out.");
    assert!(pop.eof());

    let mut check = imap(&dovecot);
    assert_eq!(check.uids(), uids);
    assert!(!has_flag(&mut check, uids[0], "\\Deleted"));
    assert_eq!(count(&dovecot), before);
}

// ---------------------------------------------------------------------------
// 5. \Seen
// ---------------------------------------------------------------------------

#[test]
fn retr_marks_seen_at_quit_top_never_and_drop_never() {
    let (dovecot, uids, pb) = bridge_with_messages(4);
    for &uid in &uids {
        assert!(!flagged(&dovecot, uid, "\\Seen"), "new UID {uid}");
    }

    // RETR 1, TOP 2 and 3, then QUIT.
    let mut pop = Pop3::connect(pb.port);
    pop.login(USER, PASS);
    assert_eq!(pop.retr(1), message(1));
    for cmd in ["TOP 2 0", "TOP 3 100"] {
        let (r, _) = pop.cmd_multi(cmd);
        assert!(r.starts_with("+OK"), "{cmd}: {r}");
    }
    assert!(
        !flagged(&dovecot, uids[0], "\\Seen"),
        "RETR must not set \\Seen before QUIT"
    );
    assert_eq!(pop.cmd("QUIT"), "+OK Logging out.");
    assert!(pop.eof());
    assert!(flagged(&dovecot, uids[0], "\\Seen"), "RETR + QUIT");
    assert!(!flagged(&dovecot, uids[1], "\\Seen"), "TOP n 0");
    assert!(!flagged(&dovecot, uids[2], "\\Seen"), "TOP n 100");

    // RETR 2 and 4, then the connection drops without QUIT.
    let mut pop = RawPop3::connect_greeted(pb.port);
    pop.login(USER, PASS);
    for n in [2, 4] {
        let (r, body) = pop.cmd_multi(&format!("RETR {n}"));
        assert!(r.starts_with("+OK"), "RETR {n}: {r}");
        assert!(!body.is_empty());
    }
    let client = pop.local;
    drop(pop);
    wait_session_ended(&pb, client);
    assert!(!flagged(&dovecot, uids[1], "\\Seen"), "RETR 2, no QUIT");
    assert!(!flagged(&dovecot, uids[3], "\\Seen"), "RETR 4, no QUIT");

    // mark_seen_on_retr = false: RETR + QUIT leaves \Seen alone.
    let (pb2, _cfg) = start_with_config(dovecot.imap_port, "[pop3]\nmark_seen_on_retr = false\n");
    let mut pop = Pop3::connect(pb2.port);
    pop.login(USER, PASS);
    assert_eq!(pop.retr(3), message(3));
    assert_eq!(pop.retr(4), message(4));
    assert_eq!(pop.cmd("QUIT"), "+OK Logging out.");
    assert!(pop.eof());
    assert!(
        !flagged(&dovecot, uids[2], "\\Seen"),
        "mark_seen_on_retr = false"
    );
    assert!(
        !flagged(&dovecot, uids[3], "\\Seen"),
        "mark_seen_on_retr = false"
    );
    // The earlier \Seen stays.
    assert!(flagged(&dovecot, uids[0], "\\Seen"));
}

// ---------------------------------------------------------------------------
// 6. Mail arriving during a session
// ---------------------------------------------------------------------------

#[test]
fn new_mail_during_a_session_is_invisible_until_the_next_session() {
    let (dovecot, uids, pb) = bridge_with_messages(3);

    let mut pop = Pop3::connect(pb.port);
    pop.login(USER, PASS);
    let stat = pop.stat();
    let list = pop.list();
    let uidl = pop.uidl();
    assert_eq!(stat.0, 3);

    dovecot.deliver(USER, &message(4));
    dovecot.deliver(USER, &message(5));
    let before = count(&dovecot);
    assert_eq!(before, 5, "the new mail is in the mailbox");

    assert_eq!(pop.stat(), stat, "STAT after new mail");
    assert_eq!(pop.list(), list, "LIST after new mail");
    assert_eq!(pop.uidl(), uidl, "UIDL after new mail");
    for cmd in ["LIST 4", "UIDL 4", "RETR 4", "TOP 5 0", "DELE 4"] {
        let (r, body) = pop.cmd_multi(cmd);
        assert!(r.starts_with("-ERR"), "{cmd}: {r}");
        assert!(body.is_empty());
    }
    for n in 1..=3 {
        assert_eq!(pop.retr(n), message(n), "message {n} keeps its number");
    }
    let r = pop.cmd("DELE 1");
    assert!(r.starts_with("+OK"), "DELE 1: {r}");
    assert_eq!(pop.cmd("QUIT"), "+OK Logging out, messages deleted.");
    assert!(pop.eof());

    let mut check = imap(&dovecot);
    let now = check.uids();
    assert_eq!(now.len(), 4);
    assert_eq!(&now[..2], &uids[1..], "old messages 2 and 3 remain");
    assert_eq!(subject(&mut check, now[2]), "transactions 4");
    assert_eq!(subject(&mut check, now[3]), "transactions 5");
    assert_eq!(before - count(&dovecot), 1);

    // A new session sees the new mail, after the surviving old messages.
    let mut pop = Pop3::connect(pb.port);
    pop.login(USER, PASS);
    assert_eq!(pop.stat().0, 4);
    let uidl2 = pop.uidl();
    assert_eq!(uidl2.len(), 4);
    assert_eq!(uidl2[0].1, uidl[1].1, "UIDL of old message 2");
    assert_eq!(uidl2[1].1, uidl[2].1, "UIDL of old message 3");
    assert!(!uidl
        .iter()
        .any(|(_, u)| *u == uidl2[2].1 || *u == uidl2[3].1));
    assert_eq!(pop.retr(3), message(4));
    assert_eq!(pop.retr(4), message(5));
    pop.quit();
}

// ---------------------------------------------------------------------------
// 7. Message expunged by another client mid-session
// ---------------------------------------------------------------------------

#[test]
fn message_expunged_by_another_client_gives_err_and_the_session_goes_on() {
    let (dovecot, uids, pb) = bridge_with_messages(3);

    let mut pop = Pop3::connect(pb.port);
    pop.login(USER, PASS);
    assert_eq!(pop.stat().0, 3);

    let mut other = imap(&dovecot);
    other.uid_store_flags(uids[1], "\\Deleted");
    other
        .command(&format!("UID EXPUNGE {}", uids[1]))
        .unwrap_or_else(|e| panic!("UID EXPUNGE: {e}"));
    assert_eq!(imap(&dovecot).uids(), vec![uids[0], uids[2]]);

    expect_line(&mut pop, "RETR 2", "-ERR Message 2 expunged.");
    expect_line(&mut pop, "TOP 2 0", "-ERR Message 2 expunged.");
    // The session goes on.
    assert_eq!(pop.retr(3), message(3));
    assert_eq!(pop.retr(1), message(1));
    let r = pop.cmd("NOOP");
    assert!(r.starts_with("+OK"), "NOOP: {r}");
    assert_eq!(pop.cmd("QUIT"), "+OK Logging out.");
    assert!(pop.eof());

    let mut check = imap(&dovecot);
    assert_eq!(check.uids(), vec![uids[0], uids[2]]);
    assert!(has_flag(&mut check, uids[0], "\\Seen"));
    assert!(has_flag(&mut check, uids[2], "\\Seen"));
    other.logout();
}

// ---------------------------------------------------------------------------
// 8. Upstream without UIDPLUS
// ---------------------------------------------------------------------------

fn dovecot_without_uidplus() -> Dovecot {
    let dovecot = Dovecot::start_with(DovecotOptions {
        imap_capability: Some(NO_UIDPLUS_CAPS.into()),
        ..Default::default()
    });
    let caps = imap(&dovecot).capabilities();
    assert!(caps.iter().any(|c| c == "IMAP4rev1"), "{caps:?}");
    assert!(
        !caps.iter().any(|c| c.eq_ignore_ascii_case("UIDPLUS")),
        "UIDPLUS still advertised after login: {caps:?}"
    );
    dovecot
}

#[test]
fn without_uidplus_the_default_policy_refuses_to_delete() {
    let dovecot = dovecot_without_uidplus();
    let uids = deliver(&dovecot, 3);
    let pb = Popbridge::start(dovecot.imap_port, &[]);
    let before = count(&dovecot);

    let mut pop = Pop3::connect(pb.port);
    pop.login(USER, PASS);
    let r = pop.cmd("DELE 2");
    assert!(r.starts_with("+OK"), "DELE 2: {r}");
    let r = pop.cmd("QUIT");
    assert!(r.starts_with("-ERR [SYS/PERM] "), "QUIT: {r}");
    assert!(pop.eof());

    let mut check = imap(&dovecot);
    assert_eq!(check.uids(), uids);
    assert!(
        !has_flag(&mut check, uids[1], "\\Deleted"),
        "refused deletion must not leave a \\Deleted flag behind"
    );
    assert_eq!(count(&dovecot), before);
}

#[test]
fn without_uidplus_expunge_if_alone_removes_the_marked_message() {
    let dovecot = dovecot_without_uidplus();
    let uids = deliver(&dovecot, 3);
    let (pb, _cfg) = start_with_config(
        dovecot.imap_port,
        "[upstream]\nno_uidplus = \"expunge-if-alone\"\n",
    );
    let before = count(&dovecot);

    let mut pop = Pop3::connect(pb.port);
    pop.login(USER, PASS);
    let r = pop.cmd("DELE 2");
    assert!(r.starts_with("+OK"), "DELE 2: {r}");
    assert_eq!(pop.cmd("QUIT"), "+OK Logging out, messages deleted.");
    assert!(pop.eof());

    assert_eq!(imap(&dovecot).uids(), vec![uids[0], uids[2]]);
    assert_eq!(before - count(&dovecot), 1);
}

/// expunge-if-alone with message 1 flagged \Deleted by another IMAP client
/// before the POP3 login (`during` false) or between DELE and QUIT (`during`
/// true): QUIT must answer -ERR and remove neither message.
fn expunge_if_alone_with_another_deleted_flag(during: bool) {
    let dovecot = dovecot_without_uidplus();
    let uids = deliver(&dovecot, 3);
    let (pb, _cfg) = start_with_config(
        dovecot.imap_port,
        "[upstream]\nno_uidplus = \"expunge-if-alone\"\n",
    );
    let before = count(&dovecot);
    let mut other = imap(&dovecot);
    if !during {
        other.uid_store_flags(uids[0], "\\Deleted");
    }

    let mut pop = Pop3::connect(pb.port);
    pop.login(USER, PASS);
    let r = pop.cmd("DELE 2");
    assert!(r.starts_with("+OK"), "DELE 2: {r}");
    if during {
        other.uid_store_flags(uids[0], "\\Deleted");
    }
    assert!(flagged(&dovecot, uids[0], "\\Deleted"));
    let r = pop.cmd("QUIT");
    assert!(r.starts_with("-ERR"), "QUIT: {r}");
    assert!(pop.eof());

    let mut check = imap(&dovecot);
    assert_eq!(check.uids(), uids, "neither message may be removed");
    assert!(has_flag(&mut check, uids[0], "\\Deleted"));
    assert!(
        !has_flag(&mut check, uids[1], "\\Deleted"),
        "refused deletion must not leave a \\Deleted flag behind"
    );
    assert_eq!(count(&dovecot), before);
    other.logout();
}

#[test]
fn without_uidplus_expunge_if_alone_refuses_when_another_was_flagged_before_login() {
    expunge_if_alone_with_another_deleted_flag(false);
}

#[test]
fn without_uidplus_expunge_if_alone_refuses_when_another_is_flagged_during_the_session() {
    expunge_if_alone_with_another_deleted_flag(true);
}

// ---------------------------------------------------------------------------
// 9, 10. Login failures
// ---------------------------------------------------------------------------

#[test]
fn wrong_password_gives_auth_error_and_a_retry_can_log_in() {
    let dovecot = Dovecot::start();
    deliver(&dovecot, 2);
    let pb = Popbridge::start(dovecot.imap_port, &[]);

    let mut pop = Pop3::connect(pb.port);
    let r = pop.cmd(&format!("USER {USER}"));
    assert!(r.starts_with("+OK"), "USER: {r}");
    let r = pop.cmd("PASS wrong");
    assert!(r.starts_with("-ERR [AUTH]"), "PASS wrong: {r}");
    // Still in AUTHORIZATION: transaction commands are refused ...
    let r = pop.cmd("STAT");
    assert!(r.starts_with("-ERR"), "STAT before login: {r}");
    // ... and a correct USER/PASS works on the same connection.
    pop.login(USER, PASS);
    assert_eq!(pop.stat().0, 2);
    assert_eq!(pop.cmd("QUIT"), "+OK Logging out.");
    assert!(pop.eof());
}

#[test]
fn unreachable_upstream_gives_sys_temp_at_pass() {
    let nothing = ClosedPort::new();
    let pb = Popbridge::start(nothing.port(), &[]);
    let mut pop = Pop3::connect(pb.port);
    let r = pop.cmd(&format!("USER {USER}"));
    assert!(r.starts_with("+OK"), "USER: {r}");
    let r = pop.cmd(&format!("PASS {PASS}"));
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "PASS: {r}");
    assert_eq!(pop.cmd("QUIT"), "+OK Logging out.");
    assert!(pop.eof());
}

#[test]
fn missing_mailbox_gives_sys_perm_at_pass() {
    let dovecot = Dovecot::start();
    deliver(&dovecot, 1);
    let (pb, _cfg) = start_with_config(
        dovecot.imap_port,
        "[upstream]\nmailbox = \"Does Not Exist\"\n",
    );
    let mut pop = Pop3::connect(pb.port);
    let r = pop.cmd(&format!("USER {USER}"));
    assert!(r.starts_with("+OK"), "USER: {r}");
    let r = pop.cmd(&format!("PASS {PASS}"));
    assert!(r.starts_with("-ERR [SYS/PERM]"), "PASS: {r}");
    assert_eq!(pop.cmd("QUIT"), "+OK Logging out.");
    assert!(pop.eof());

    // Control: once the mailbox exists, the same login works, and it shows
    // that mailbox (empty), not INBOX.
    dovecot.doveadm(&["mailbox", "create", "-u", USER, "Does Not Exist"]);
    let mut pop = Pop3::connect(pb.port);
    pop.login(USER, PASS);
    assert_eq!(pop.stat(), (0, 0), "the newly created, empty mailbox");
    assert_eq!(pop.cmd("QUIT"), "+OK Logging out.");
}
