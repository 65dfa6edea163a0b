//! The listing cache: warm polls reuse the listing, new mail and expunges
//! are seen, and every poll still answers exactly what Dovecot's own POP3
//! server answers.

use std::time::{Duration, Instant};

use crate::common::{Dovecot, Imap, Pop3, Popbridge};

fn message(i: usize) -> Vec<u8> {
    format!(
        "From: a@example.org\r\nTo: alice@example.org\r\nSubject: cache {i}\r\nMessage-ID: <c{i}@example.org>\r\n\r\nbody {i}\r\n{}\r\n",
        "x".repeat(i * 7)
    )
    .into_bytes()
}

/// STAT, LIST and UIDL as one string, from a fresh session.
fn poll(port: u16) -> String {
    let mut p = Pop3::connect(port);
    p.login("alice", "secret");
    let stat = p.cmd("STAT");
    let (list_status, list) = p.cmd_multi("LIST");
    let (uidl_status, uidl) = p.cmd_multi("UIDL");
    assert_eq!(p.cmd("QUIT"), "+OK Logging out.");
    format!(
        "{stat}\n{list_status}\n{}{uidl_status}\n{}",
        String::from_utf8_lossy(&list),
        String::from_utf8_lossy(&uidl)
    )
}

/// Waits until popbridge has logged `n` snapshot lines, and returns how
/// each listing was obtained (cached, new only, full).
fn plans(bridge: &Popbridge, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = bridge.log();
        let plans: Vec<String> = log
            .lines()
            .filter(|l| l.contains("snapshot taken"))
            .map(|l| {
                let p = l.split("listing=\"").nth(1).unwrap_or("?");
                p.split('"').next().unwrap_or("?").to_string()
            })
            .collect();
        if plans.len() >= n || Instant::now() > deadline {
            return plans;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn warm_polls_reuse_the_listing_and_stay_identical_to_dovecot() {
    let dovecot = Dovecot::start();
    for i in 1..=20 {
        dovecot.deliver("alice", &message(i));
    }
    let bridge = Popbridge::start(dovecot.imap_port, &[]);

    // Cold, then warm: same answers as Dovecot both times.
    assert_eq!(poll(bridge.port), poll(dovecot.pop3_port));
    assert_eq!(poll(bridge.port), poll(dovecot.pop3_port));

    // New mail: only the new messages are fetched.
    dovecot.deliver("alice", &message(21));
    dovecot.deliver("alice", &message(22));
    assert_eq!(poll(bridge.port), poll(dovecot.pop3_port));

    // Another client expunges one message: a full listing again.
    let mut imap = Imap::connect(dovecot.imap_port, "alice", "secret");
    let uids = imap.uids();
    imap.uid_store_flags(uids[4], "\\Deleted");
    imap.command(&format!("UID EXPUNGE {}", uids[4]))
        .expect("UID EXPUNGE");
    imap.logout();
    let after_expunge = poll(bridge.port);
    assert_eq!(after_expunge, poll(dovecot.pop3_port));
    assert!(after_expunge.starts_with("+OK 21 "), "{after_expunge}");

    // Expunge and delivery together, with the count unchanged: the cache must
    // not be fooled by an equal EXISTS.
    let mut imap = Imap::connect(dovecot.imap_port, "alice", "secret");
    let uids = imap.uids();
    imap.uid_store_flags(uids[0], "\\Deleted");
    imap.command(&format!("UID EXPUNGE {}", uids[0]))
        .expect("UID EXPUNGE");
    imap.logout();
    dovecot.deliver("alice", &message(23));
    assert_eq!(poll(bridge.port), poll(dovecot.pop3_port));

    // And a warm poll once more.
    assert_eq!(poll(bridge.port), poll(dovecot.pop3_port));

    assert_eq!(
        plans(&bridge, 6),
        ["full", "cached", "new only", "full", "full", "cached"],
        "{}",
        bridge.log()
    );
}

#[test]
fn listings_are_per_account() {
    let dovecot = Dovecot::start();
    for i in 1..=3 {
        dovecot.deliver("alice", &message(i));
    }
    dovecot.deliver("bob", &message(9));
    let bridge = Popbridge::start(dovecot.imap_port, &[]);
    let alice = poll(bridge.port);
    let mut p = Pop3::connect(bridge.port);
    p.login("bob", "secret");
    assert_eq!(p.stat(), (1, message(9).len() as u64));
    p.quit();
    assert_eq!(poll(bridge.port), alice);
}
