//! Self-test of the four extra upstreams in common/servers: each
//! starts privately with alice and bob@example.org, takes three messages,
//! and serves them back over IMAP (LOGIN, AUTHENTICATE PLAIN where
//! offered, UID FETCH of RFC822.SIZE and BODY.PEEK[]) and, where the server
//! has one, over its own POP3 (USER/PASS, UIDL, RETR): the byte reference
//! popbridge will be compared with. Also: instances side by side, nothing
//! left running after drop, the claimed `served_form` for awkward messages,
//! and a printed report of the quirks in QUIRKS.md
//! (`cargo test --test it -- --nocapture ::report`).

use std::fs;
use std::time::Duration;

use crate::common::servers::{
    start_courier, start_cyrus, start_dovecot_no_uidplus, start_mailutils, MailServer, BOB,
    STANDARD_USERS,
};
use crate::common::{find, literal_len, Imap, Pop3};

/// The three messages of the basic check: plain CRLF, bare LF lines, and
/// lines starting with "." (dot-stuffing in POP3).
fn three_messages() -> Vec<Vec<u8>> {
    let head = |n: u32, subject: &str, eol: &str| {
        format!(
            "From: Sender <sender@example.org>{eol}\
             To: Recipient <recipient@example.net>{eol}\
             Subject: selftest {n} {subject}{eol}\
             Date: Mon, 1 Jan 2024 12:0{n}:00 +0000{eol}\
             Message-ID: <selftest-{n}@popbridge.test>{eol}{eol}"
        )
    };
    vec![
        format!(
            "{}Hello,\r\nthis is plain CRLF.\r\n",
            head(1, "plain", "\r\n")
        )
        .into_bytes(),
        format!(
            "{}every line\nends with a bare LF\n\nhere\n",
            head(2, "bare LF", "\n")
        )
        .into_bytes(),
        format!(
            "{}.leading dot\r\n..two dots\r\n.\r\nafter a lone dot\r\n",
            head(3, "dot lines", "\r\n")
        )
        .into_bytes(),
    ]
}

/// What the test delivers for `message`: servers that refuse bare LF get
/// the CRLF form.
fn deliverable(server: &dyn MailServer, message: &[u8]) -> Vec<u8> {
    if server.accepts_bare_lf() {
        message.to_vec()
    } else {
        crate::common::to_crlf(message)
    }
}

/// (RFC822.SIZE, BODY[] bytes) of `uid` from one UID FETCH.
fn fetch_size_and_body(imap: &mut Imap, uid: u32) -> (u64, Vec<u8>) {
    let lines = imap
        .command(&format!("UID FETCH {uid} (RFC822.SIZE BODY.PEEK[])"))
        .unwrap_or_else(|e| panic!("UID FETCH {uid}: {e}"));
    for line in &lines {
        let Some(pos) = find(line, b"BODY[] {") else {
            continue;
        };
        let header_end = pos + find(&line[pos..], b"\r\n").expect("literal line end");
        let n = literal_len(&line[..header_end]).expect("BODY[] literal length");
        let body = line[header_end + 2..header_end + 2 + n].to_vec();
        // RFC822.SIZE may come before or after the literal.
        let text = format!(
            "{} {}",
            String::from_utf8_lossy(&line[..pos]),
            String::from_utf8_lossy(&line[header_end + 2 + n..])
        );
        let size = text
            .split("RFC822.SIZE ")
            .nth(1)
            .and_then(|s| s.split([' ', ')']).next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no RFC822.SIZE in {text:?}"));
        return (size, body);
    }
    panic!("no BODY[] for UID {uid} in {lines:?}");
}

/// Capabilities from a greeting-less CAPABILITY command.
fn capabilities_before_login(port: u16) -> Vec<String> {
    let mut imap = Imap::connect_only(port);
    let caps = imap.capabilities();
    imap.logout();
    caps
}

/// The basic check, for one server.
fn delivers_and_serves(server: &dyn MailServer) {
    let name = server.name();
    eprintln!("{name}: started in {:?}", server.start_time());
    let messages = three_messages();
    let users = server.users();
    for (user, _) in &users {
        for m in &messages {
            server.deliver(user, &deliverable(server, m));
        }
    }
    let offers_plain = capabilities_before_login(server.imap_port())
        .iter()
        .any(|c| c.eq_ignore_ascii_case("AUTH=PLAIN"));
    for (user, pass) in &users {
        let expected: Vec<Vec<u8>> = messages
            .iter()
            .map(|m| server.served_form(&deliverable(server, m)))
            .collect();
        // LOGIN (quoted strings: bob's password has a space and a quote).
        let mut imap = Imap::connect(server.imap_port(), user, pass);
        let uids = imap.uids();
        assert_eq!(uids.len(), 3, "{name}/{user}: UIDs {uids:?}");
        for (uid, want) in uids.iter().zip(&expected) {
            let (size, body) = fetch_size_and_body(&mut imap, *uid);
            assert_eq!(
                size,
                body.len() as u64,
                "{name}/{user}: RFC822.SIZE of UID {uid}"
            );
            let body = server.comparable(&body);
            assert_eq!(
                String::from_utf8_lossy(&body),
                String::from_utf8_lossy(want),
                "{name}/{user}: BODY[] of UID {uid}"
            );
            assert_eq!(body, *want, "{name}/{user}: BODY[] bytes of UID {uid}");
        }
        imap.logout();

        if offers_plain {
            let mut imap = Imap::connect_only(server.imap_port());
            imap.authenticate_plain(user, pass)
                .unwrap_or_else(|e| panic!("{name}/{user}: AUTHENTICATE PLAIN: {e}"));
            imap.command("SELECT INBOX")
                .unwrap_or_else(|e| panic!("{name}/{user}: SELECT after PLAIN: {e}"));
            assert_eq!(imap.uids(), uids, "{name}/{user}: same UIDs after PLAIN");
            imap.logout();
        }

        if let Some(port) = server.pop3_port() {
            let mut pop = Pop3::connect(port);
            pop.login(user, pass);
            let uidl = pop.uidl();
            assert_eq!(uidl.len(), 3, "{name}/{user}: UIDL {uidl:?}");
            let list = pop.list();
            // Courier numbers by maildir file name, which is not arrival
            // order within one second: match each RETR to a message.
            let mut matched = [false; 3];
            for (n, octets) in list {
                let got = server.comparable(&pop.retr(n));
                let Some(i) = expected.iter().position(|w| *w == got) else {
                    panic!(
                        "{name}/{user}: POP3 RETR {n} is none of the delivered messages:\n{}",
                        String::from_utf8_lossy(&got)
                    );
                };
                assert!(!matched[i], "{name}/{user}: RETR {n} repeats message {i}");
                matched[i] = true;
                assert_eq!(octets, got.len() as u64, "{name}/{user}: POP3 LIST {n}");
            }
            pop.quit();
        }
    }
}

/// A `start_*` function behind the trait.
type Start = fn(&[(&str, &str)]) -> Box<dyn MailServer>;

/// Two instances of the same server at once: each has its own mail.
fn side_by_side(start: Start) {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| start(STANDARD_USERS));
        let b = s.spawn(|| start(STANDARD_USERS));
        (a.join().expect("start a"), b.join().expect("start b"))
    });
    assert_ne!(a.imap_port(), b.imap_port());
    assert_ne!(a.dir(), b.dir());
    let m = &three_messages()[0];
    a.deliver(BOB.0, m);
    let mut ia = Imap::connect(a.imap_port(), BOB.0, BOB.1);
    let mut ib = Imap::connect(b.imap_port(), BOB.0, BOB.1);
    assert_eq!(ia.uids().len(), 1, "{}: a has the message", a.name());
    assert_eq!(ib.uids().len(), 0, "{}: b does not", b.name());
    ia.logout();
    ib.logout();
}

/// After drop: no process mentions the instance's directory, its ports
/// are closed, and the directory is gone.
fn leaves_nothing_behind(server: Box<dyn MailServer>) {
    let dir = server.dir().to_path_buf();
    let port = server.imap_port();
    // A session still open at drop time must not keep anything alive.
    let open = Imap::connect(port, BOB.0, BOB.1);
    drop(server);
    drop(open);
    let needle = dir.to_string_lossy().into_owned();
    let mut stray = Vec::new();
    for entry in fs::read_dir("/proc").expect("/proc") {
        let path = entry.expect("proc entry").path();
        if let Ok(cmdline) = fs::read(path.join("cmdline")) {
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                stray.push(path.display().to_string());
            }
        }
    }
    assert!(stray.is_empty(), "processes left for {needle}: {stray:?}");
    assert!(!dir.exists(), "{needle} still exists");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still open"
    );
}

/// Awkward messages come back as `served_form` says (what popbridge
/// comparisons rely on): bare CR, no final newline, 8-bit header,
/// header-only, mixed endings, a body line starting with "From ". Each
/// has a From: header (Mailutils refuses APPEND without one).
fn served_form_holds(server: &dyn MailServer) {
    let name = server.name();
    let from = b"From: Sender <sender@example.org>\r\n".as_slice();
    let mut awkward: Vec<Vec<u8>> = [
        b"Subject: a1 no final newline\r\n\r\nfirst\r\nlast without newline".as_slice(),
        b"Subject: a2 bare CR\r\n\r\nbefore\r\nhalf\rway\r\nafter\r\n",
        b"Subject: a3 8-bit caf\xc3\xa9\r\nX-Latin1: Gr\xfc\xdfe\r\n\r\nbody \xe9\xff\r\n",
        b"Subject: a4 header only\r\nX-Other: y\r\n",
        b"Subject: a5 mixed\r\n\r\ncrlf\r\nlf\ncrlf again\r\n",
        b"Subject: a6 From line\r\n\r\nFrom here on\r\n>From quoted\r\n",
        b"Subject: a7 empty body\r\n\r\n",
        b"Subject: a8 one empty body line\r\n\r\n\r\n",
    ]
    .iter()
    .map(|m| [from, m].concat())
    .collect();
    if !server.accepts_bare_lf() {
        awkward.retain(|m| !m.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'));
    }
    let (user, pass) = (BOB.0, BOB.1);
    for m in &awkward {
        server.deliver(user, m);
    }
    let mut imap = Imap::connect(server.imap_port(), user, pass);
    let uids = imap.uids();
    assert_eq!(uids.len(), awkward.len(), "{name}: UIDs");
    for (uid, m) in uids.iter().zip(&awkward) {
        let (size, body) = fetch_size_and_body(&mut imap, *uid);
        assert_eq!(size, body.len() as u64, "{name}: RFC822.SIZE of UID {uid}");
        let body = server.comparable(&body);
        let want = server.served_form(m);
        assert_eq!(
            String::from_utf8_lossy(&body),
            String::from_utf8_lossy(&want),
            "{name}: served form of {:?}",
            String::from_utf8_lossy(m)
        );
        assert_eq!(body, want, "{name}: served bytes");
    }
    imap.logout();
}

/// Print what QUIRKS.md records, measured now: CAPABILITY before and after
/// login, UIDL of its POP3, what a FETCH of a UID that another session
/// expunged returns, how the expunge is announced.
fn report(server: &dyn MailServer) {
    let name = server.name();
    let port = server.imap_port();
    let show = |lines: &[Vec<u8>]| -> String {
        lines
            .iter()
            .map(|l| format!("    {}", String::from_utf8_lossy(l)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    eprintln!("===== {name} (started in {:?}) =====", server.start_time());
    eprintln!(
        "  before login: {}",
        capabilities_before_login(port).join(" ")
    );
    for m in &three_messages()[..1] {
        server.deliver(BOB.0, m);
        server.deliver(BOB.0, m);
    }
    let mut a = Imap::connect(port, BOB.0, BOB.1);
    eprintln!("  after login: {}", a.capabilities().join(" "));
    let uids = a.uids();
    let mut plain = Imap::connect_only(port);
    match plain.authenticate_plain(BOB.0, BOB.1) {
        Ok(lines) => eprintln!(
            "  AUTHENTICATE PLAIN: {:?}",
            lines
                .iter()
                .map(|l| String::from_utf8_lossy(l).into_owned())
                .collect::<Vec<_>>()
        ),
        Err(e) => eprintln!("  AUTHENTICATE PLAIN refused: {e}"),
    }
    if let Some(pop3) = server.pop3_port() {
        let mut pop = Pop3::connect(pop3);
        eprintln!("  POP3 greeting: {}", pop.greeting());
        pop.login(BOB.0, BOB.1);
        eprintln!("  POP3 UIDL: {:?}", pop.uidl());
        pop.quit();
    }
    let mut b = Imap::connect(port, BOB.0, BOB.1);
    let first = uids[0];
    b.command(&format!("UID STORE {first} +FLAGS.SILENT (\\Deleted)"))
        .expect("STORE");
    let expunged = b.command("EXPUNGE").expect("EXPUNGE");
    eprintln!("  EXPUNGE in the deleting session:\n{}", show(&expunged));
    b.logout();
    let fetch = a.command(&format!("UID FETCH {first} (RFC822.SIZE BODY.PEEK[])"));
    match fetch {
        Ok(lines) => eprintln!(
            "  UID FETCH of the UID expunged elsewhere: OK\n{}",
            show(&lines)
        ),
        Err(e) => eprintln!("  UID FETCH of the UID expunged elsewhere: {e}"),
    }
    let noop = a.command("NOOP").expect("NOOP");
    eprintln!("  NOOP afterwards:\n{}", show(&noop));
    a.logout();
    std::thread::sleep(Duration::from_millis(10));
}

macro_rules! server_tests {
    ($server:ident, $start:expr) => {
        mod $server {
            use super::*;

            fn start(users: &[(&str, &str)]) -> Box<dyn MailServer> {
                Box::new($start(users))
            }

            #[test]
            fn delivers_and_serves_the_same_bytes() {
                delivers_and_serves(&*start(STANDARD_USERS));
            }

            #[test]
            fn two_instances_side_by_side() {
                side_by_side(start);
            }

            #[test]
            fn nothing_left_after_drop() {
                leaves_nothing_behind(start(STANDARD_USERS));
            }

            #[test]
            fn served_form_of_awkward_messages() {
                served_form_holds(&*start(STANDARD_USERS));
            }

            #[test]
            fn report() {
                super::report(&*start(STANDARD_USERS));
            }
        }
    };
}

server_tests!(cyrus, start_cyrus);
server_tests!(courier, start_courier);
server_tests!(mailutils, start_mailutils);
server_tests!(dovecot_no_uidplus, start_dovecot_no_uidplus);

/// Dovecot's variant really hides UIDPLUS (and keeps the rest).
#[test]
fn dovecot_variant_advertises_no_uidplus() {
    let server = start_dovecot_no_uidplus(STANDARD_USERS);
    let mut imap = Imap::connect(server.imap_port(), BOB.0, BOB.1);
    let caps = imap.capabilities();
    assert!(!caps.iter().any(|c| c == "UIDPLUS"), "{caps:?}");
    assert!(caps.iter().any(|c| c == "MOVE"), "{caps:?}");
    imap.logout();
}
