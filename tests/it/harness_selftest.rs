//! Self-test of the integration-test harness against a real Dovecot
//! (does not need the popbridge binary to work), and of its loopback ports.

use crate::common::*;
use std::collections::HashSet;
use std::thread;

#[test]
fn dovecot_two_messages_via_pop3_and_imap() {
    let dovecot = Dovecot::start();
    assert_ne!(dovecot.imap_port, dovecot.pop3_port);
    assert!(dovecot.conf_path().is_file());

    let first = corpus_message("plain_crlf");
    let second = corpus_message("bare_lf");
    dovecot.deliver("alice", &first);
    dovecot.deliver("alice", &second);

    // Dovecot's own POP3, with the raw client.
    let mut pop = Pop3::connect(dovecot.pop3_port);
    assert!(pop.greeting().starts_with("+OK"), "{}", pop.greeting());
    let (capa, body) = pop.cmd_multi("CAPA");
    assert!(capa.starts_with("+OK"), "{capa}");
    let body = String::from_utf8_lossy(&body).into_owned();
    assert!(
        body.contains("\r\nUIDL\r\n") && body.ends_with("\r\n.\r\n"),
        "{body}"
    );
    pop.login("alice", "secret");
    let (count, octets) = pop.stat();
    assert_eq!(count, 2);
    let list = pop.list();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0], (1, first.len() as u64));
    // Sizes are counted with CRLF line endings.
    assert_eq!(list[1], (2, to_crlf(&second).len() as u64));
    assert_eq!(octets, list[0].1 + list[1].1);
    let uidl = pop.uidl();
    assert_eq!(uidl.len(), 2);
    assert!(
        uidl.iter().all(|(_, u)| u.len() == 16),
        "UIDL %08Xu%08Xv: {uidl:?}"
    );
    assert_eq!(pop.retr(1), first);
    assert_eq!(pop.retr(2), to_crlf(&second));
    let status = pop.cmd("RETR 3");
    assert!(status.starts_with("-ERR"), "{status}");
    let (status, body) = pop.cmd_multi("RETR 99");
    assert!(status.starts_with("-ERR") && body.is_empty(), "{status}");
    pop.quit();
    assert!(pop.eof(), "Dovecot should close after QUIT");

    // Wrong password is refused.
    let mut pop = Pop3::connect(dovecot.pop3_port);
    assert!(pop.cmd("USER alice").starts_with("+OK"));
    let r = pop.cmd("PASS wrong");
    assert!(r.starts_with("-ERR"), "{r}");

    // The same mailbox through IMAP: RETR + QUIT set \Seen.
    let mut imap = Imap::connect(dovecot.imap_port, "alice", "secret");
    let uids = imap.uids();
    assert_eq!(uids.len(), 2, "{uids:?}");
    for &uid in &uids {
        assert!(
            imap.flags(uid).iter().any(|f| f == "\\Seen"),
            "{:?}",
            imap.flags(uid)
        );
    }
    imap.uid_store_flags(uids[0], "\\Flagged $Custom");
    let flags = imap.flags(uids[0]);
    assert!(flags.iter().any(|f| f == "\\Flagged"), "{flags:?}");
    assert!(flags.iter().any(|f| f == "$Custom"), "{flags:?}");
    assert_eq!(imap.fetch_message(uids[0]), first);
    assert_eq!(imap.size(uids[1]), list[1].1);
    assert!(imap.command("FOO BAR").is_err());
    assert!(imap.command("NOOP").is_ok());
    imap.logout();

    // Other users are separate.
    let mut imap = Imap::connect(dovecot.imap_port, "bob", "secret");
    assert!(imap.uids().is_empty());
    imap.logout();
    assert!(dovecot.log().contains("Login: user=<alice>"));
}

#[test]
fn corpus_is_well_formed() {
    let corpus = corpus();
    let names: HashSet<_> = corpus.iter().map(|(n, _)| *n).collect();
    assert_eq!(names.len(), corpus.len(), "duplicate names");
    let subjects: HashSet<_> = corpus.iter().map(|(_, m)| subject_of(m)).collect();
    assert_eq!(subjects.len(), corpus.len(), "duplicate subjects");
    for (name, msg) in &corpus {
        let text = String::from_utf8_lossy(msg);
        for h in ["From: ", "To: ", "Subject: ", "Date: ", "Message-ID: "] {
            assert!(text.contains(h), "{name} lacks {h}");
        }
    }
    for name in [
        "plain_crlf",
        "bare_lf",
        "dot_lines",
        "eight_bit",
        "no_final_newline",
        "header_only_no_blank",
        "header_only_blank",
        "long_lines",
        "mixed_endings",
        "big_attachment",
        "empty_body",
        "three_body_lines",
        "two_body_lines",
        "bare_cr",
    ] {
        assert!(names.contains(name), "missing {name}");
    }
    let big = corpus_message("big_attachment");
    assert!(big.len() > 3_000_000, "{}", big.len());
    assert_eq!(big, corpus_message("big_attachment"), "not deterministic");
    assert!(big
        .split(|&b| b == b'\n')
        .all(|l| l.len() <= 77 || l.starts_with(b"Content-Type: multipart")));
    assert!(!corpus_message("bare_lf").contains(&b'\r'));
    assert!(!corpus_message("no_final_newline").ends_with(b"\n"));
    assert!(!corpus_message("header_only_no_blank").ends_with(b"\r\n\r\n"));
    assert!(corpus_message("header_only_blank").ends_with(b"\r\n\r\n"));
    assert!(corpus_message("bare_cr").windows(3).any(|w| w == b"f\rw"));
    let eight = corpus_message("eight_bit");
    assert!(eight.contains(&0xe9) && eight.windows(2).any(|w| w == [0xc3, 0xa9]));
}

/// Dovecot's POP3 is the reference behaviour the proxy is compared with:
/// sizes in CRLF octets, RETR = CRLF-normalised message, dot-stuffed, with
/// a CRLF added when the message lacks a final newline.
#[test]
fn corpus_round_trips_through_dovecot() {
    let dovecot = Dovecot::start();
    let corpus = dovecot.deliver_corpus("bob");

    let mut pop = Pop3::connect(dovecot.pop3_port);
    pop.login("bob", "secret");
    let (count, _) = pop.stat();
    assert_eq!(count, corpus.len());
    let list = pop.list();
    let mut imap = Imap::connect(dovecot.imap_port, "bob", "secret");
    let uids = imap.uids();
    assert_eq!(uids.len(), corpus.len());

    for (i, (name, msg)) in corpus.iter().enumerate() {
        let n = i + 1;
        let crlf = to_crlf(msg);
        assert_eq!(list[i], (n, crlf.len() as u64), "LIST size of {name}");
        assert_eq!(imap.size(uids[i]), crlf.len() as u64, "RFC822.SIZE {name}");
        assert_eq!(imap.fetch_message(uids[i]), crlf, "IMAP BODY[] of {name}");
        let (status, raw) = pop.cmd_multi(&format!("RETR {n}"));
        assert!(status.starts_with("+OK"), "RETR {n}: {status}");
        assert!(raw == dot_stuff(&crlf), "RETR of {name} differs");
    }

    for (name, top3_is_whole) in [("three_body_lines", true), ("two_body_lines", true)] {
        let n = corpus.iter().position(|(c, _)| *c == name).unwrap() + 1;
        let (status, raw) = pop.cmd_multi(&format!("TOP {n} 3"));
        assert!(status.starts_with("+OK"), "{status}");
        assert_eq!(raw == dot_stuff(&corpus[n - 1].1), top3_is_whole, "{name}");
    }
    // TOP n 0 of a header-only message without the blank line adds none.
    let n = corpus
        .iter()
        .position(|(c, _)| *c == "header_only_no_blank")
        .unwrap()
        + 1;
    let (_, raw) = pop.cmd_multi(&format!("TOP {n} 0"));
    assert_eq!(raw, dot_stuff(&corpus[n - 1].1));
    pop.quit();
    imap.logout();
}

#[test]
fn capability_override_and_instances_side_by_side() {
    let plain = Dovecot::start();
    let limited = Dovecot::start_with(DovecotOptions {
        users: vec![("carol".into(), "pw with spaces".into())],
        imap_capability: Some("IMAP4rev1 LITERAL+ IDLE".into()),
        extra_conf: "# extra conf goes last\n".into(),
    });
    assert_ne!(plain.imap_port, limited.imap_port);
    assert!(std::fs::read_to_string(limited.conf_path())
        .unwrap()
        .ends_with("# extra conf goes last\n\n"));

    let mut imap = Imap::connect(plain.imap_port, "alice", "secret");
    assert!(imap.capabilities().iter().any(|c| c == "UIDPLUS"));
    imap.logout();

    // The override applies before login too.
    let mut imap = Imap::connect_only(limited.imap_port);
    let caps = imap.capabilities();
    assert!(caps.iter().any(|c| c == "IDLE"), "{caps:?}");
    imap.logout();
    let mut imap = Imap::connect(limited.imap_port, "carol", "pw with spaces");
    let caps = imap.capabilities();
    assert!(!caps.iter().any(|c| c == "UIDPLUS"), "{caps:?}");
    assert!(caps.iter().any(|c| c == "IDLE"), "{caps:?}");
    imap.logout();

    limited.deliver("carol", b"Subject: x\r\n\r\nhi\r\n");
    let mut pop = Pop3::connect(limited.pop3_port);
    pop.login("carol", "pw with spaces");
    assert_eq!(pop.stat().0, 1);
    // Default users do not exist there.
    let mut pop = Pop3::connect(limited.pop3_port);
    pop.cmd("USER alice");
    assert!(pop.cmd("PASS secret").starts_with("-ERR"));
}

/// Checks the process/connection limits: 100 sessions of one user from
/// 127.0.0.1 open at the same time (50 POP3, 50 IMAP).
#[test]
fn one_hundred_concurrent_sessions() {
    enum Session {
        Pop3(Pop3),
        Imap(Imap),
    }
    let dovecot = Dovecot::start();
    dovecot.deliver("alice", &corpus_message("plain_crlf"));
    let (pop3_port, imap_port) = (dovecot.pop3_port, dovecot.imap_port);
    let handles: Vec<_> = (0..100)
        .map(|i| {
            thread::spawn(move || {
                if i % 2 == 0 {
                    let mut pop = Pop3::connect(pop3_port);
                    pop.login("alice", "secret");
                    assert_eq!(pop.stat().0, 1);
                    Session::Pop3(pop)
                } else {
                    let mut imap = Imap::connect(imap_port, "alice", "secret");
                    assert_eq!(imap.uids().len(), 1);
                    Session::Imap(imap)
                }
            })
        })
        .collect();
    let sessions: Vec<Session> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(sessions.len(), 100);
    for session in sessions {
        match session {
            Session::Pop3(mut pop) => pop.quit(),
            Session::Imap(imap) => imap.logout(),
        }
    }
}

/// Ports allocated from many threads at once are all different, none is
/// in Linux's ephemeral range, and a [`ports::ClosedPort`] refuses
/// connections.
#[test]
fn allocated_ports_are_distinct_and_a_closed_port_refuses() {
    let handles: Vec<_> = (0..4)
        .map(|_| thread::spawn(|| (0..50).map(|_| ports::allocate()).collect::<Vec<u16>>()))
        .collect();
    let all: Vec<u16> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let distinct: HashSet<u16> = all.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "a port was handed out twice");
    assert!(all.iter().all(|&p| p < 32768), "{all:?}");

    let closed = ports::ClosedPort::new();
    let err = std::net::TcpStream::connect(closed.addr).expect_err("nothing listens there");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
}
