//! The bytes a client receives from popbridge for STAT, LIST, UIDL, RETR and
//! TOP equal what Dovecot's own POP3 server sends for the same mailbox.

use crate::common::{Dovecot, Pop3, Popbridge};

/// Sends `cmd` to both servers and returns both complete replies (status
/// line plus multi-line body when the status is +OK and `multi`).
fn both(native: &mut Pop3, bridge: &mut Pop3, cmd: &str, multi: bool) -> (Vec<u8>, Vec<u8>) {
    let get = |p: &mut Pop3| {
        p.send_raw(format!("{cmd}\r\n").as_bytes());
        let mut reply = p.read_line();
        if multi && reply.starts_with(b"+OK") {
            reply.extend(p.read_multiline_body());
        }
        reply
    };
    (get(native), get(bridge))
}

fn assert_same(native: &mut Pop3, bridge: &mut Pop3, cmd: &str, multi: bool) {
    let (a, b) = both(native, bridge, cmd, multi);
    assert!(
        a.starts_with(b"+OK"),
        "Dovecot refused {cmd}: {}",
        String::from_utf8_lossy(&a)
    );
    if a != b {
        let first = a
            .iter()
            .zip(&b)
            .position(|(x, y)| x != y)
            .unwrap_or(a.len().min(b.len()));
        let from = first.saturating_sub(60);
        panic!(
            "{cmd}: popbridge differs from Dovecot at byte {first} (lengths {} vs {}):\n dovecot:   {:?}\n popbridge: {:?}",
            a.len(),
            b.len(),
            String::from_utf8_lossy(&a[from..(first + 60).min(a.len())]),
            String::from_utf8_lossy(&b[from..(first + 60).min(b.len())]),
        );
    }
}

#[test]
fn stat_list_uidl_retr_top_are_byte_identical_to_dovecot() {
    let dovecot = Dovecot::start();
    let corpus = dovecot.deliver_corpus("alice");
    let bridge_proc = Popbridge::start(dovecot.imap_port, &[]);

    let mut native = Pop3::connect(dovecot.pop3_port);
    native.login("alice", "secret");
    let mut bridge = Pop3::connect(bridge_proc.port);
    bridge.login("alice", "secret");

    assert_same(&mut native, &mut bridge, "STAT", false);
    assert_same(&mut native, &mut bridge, "LIST", true);
    assert_same(&mut native, &mut bridge, "UIDL", true);
    for n in 1..=corpus.len() {
        let name = corpus[n - 1].0;
        for cmd in [format!("LIST {n}"), format!("UIDL {n}")] {
            assert_same(&mut native, &mut bridge, &cmd, false);
        }
        for cmd in [
            format!("RETR {n}"),
            format!("TOP {n} 0"),
            format!("TOP {n} 1"),
            format!("TOP {n} 3"),
            format!("TOP {n} 100000"),
        ] {
            let (a, b) = both(&mut native, &mut bridge, &cmd, true);
            assert!(a.starts_with(b"+OK"), "{name}: Dovecot refused {cmd}");
            assert!(
                a == b,
                "{name}: {cmd} differs: dovecot {} bytes, popbridge {} bytes\n{:?}\n{:?}",
                a.len(),
                b.len(),
                String::from_utf8_lossy(&a[..a.len().min(400)]),
                String::from_utf8_lossy(&b[..b.len().min(400)])
            );
        }
    }
    // Errors for numbers out of range agree too.
    let past = corpus.len() + 1;
    assert_same_err(&mut native, &mut bridge, &format!("RETR {past}"));
    assert_same_err(&mut native, &mut bridge, &format!("LIST {past}"));

    // Neither session changed anything: leave without committing.
    drop(native);
    drop(bridge);
}

fn assert_same_err(native: &mut Pop3, bridge: &mut Pop3, cmd: &str) {
    let (a, b) = both(native, bridge, cmd, false);
    assert!(
        a.starts_with(b"-ERR"),
        "{cmd}: {}",
        String::from_utf8_lossy(&a)
    );
    assert_eq!(
        String::from_utf8_lossy(&a),
        String::from_utf8_lossy(&b),
        "{cmd}"
    );
}

#[test]
fn empty_mailbox_matches_dovecot() {
    let dovecot = Dovecot::start();
    let bridge_proc = Popbridge::start(dovecot.imap_port, &[]);
    let mut native = Pop3::connect(dovecot.pop3_port);
    native.login("bob", "secret");
    let mut bridge = Pop3::connect(bridge_proc.port);
    bridge.login("bob", "secret");
    assert_same(&mut native, &mut bridge, "STAT", false);
    assert_same(&mut native, &mut bridge, "LIST", true);
    assert_same(&mut native, &mut bridge, "UIDL", true);
    assert_same_err(&mut native, &mut bridge, "RETR 1");
    assert_eq!(bridge.cmd("QUIT"), "+OK Logging out.");
}
