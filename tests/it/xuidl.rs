//! `pop3.reuse_xuidl`: a message's `X-UIDL:` header is its UIDL, as with
//! Dovecot's `pop3_reuse_xuidl`, duplicates are renamed (`-2`), and the
//! answers equal Dovecot's own POP3 server configured the same way.

use crate::common::{Dovecot, DovecotOptions, Pop3, Popbridge};

fn message(i: usize, x_uidl: Option<&str>) -> Vec<u8> {
    let header = x_uidl.map_or(String::new(), |u| format!("X-UIDL: {u}\n"));
    format!(
        "From: a@example.org\nTo: alice@example.org\n{header}Subject: m{i}\nMessage-ID: <x{i}@example.org>\n\nbody {i}\n"
    )
    .into_bytes()
}

fn uidl(port: u16) -> (String, Vec<u8>) {
    let mut p = Pop3::connect(port);
    p.login("alice", "secret");
    let (_, list) = p.cmd_multi("LIST");
    let (status, body) = p.cmd_multi("UIDL");
    assert_eq!(status, "+OK");
    p.quit();
    (String::from_utf8_lossy(&list).into_owned(), body)
}

#[test]
fn x_uidl_headers_are_reused_like_dovecot_does() {
    let dovecot = Dovecot::start_with(DovecotOptions {
        extra_conf: "pop3_reuse_xuidl = yes\npop3_uidl_duplicates = rename\n".into(),
        ..DovecotOptions::default()
    });
    for (i, x) in [
        Some("UID1234-old-server"),
        None,
        Some("legacy.9876"),
        Some("legacy.9876"), // a duplicate: the second becomes legacy.9876-2
        Some("00000aaa"),
    ]
    .iter()
    .enumerate()
    {
        dovecot.deliver("alice", &message(i, *x));
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("popbridge.toml");
    std::fs::write(&cfg, "[pop3]\nreuse_xuidl = true\n").unwrap();
    let bridge = Popbridge::start(dovecot.imap_port, &["--config", cfg.to_str().unwrap()]);

    let native = uidl(dovecot.pop3_port);
    let text = String::from_utf8_lossy(&native.1).into_owned();
    assert!(text.contains("1 UID1234-old-server\r\n"), "{text}");
    assert!(text.contains("4 legacy.9876-2\r\n"), "{text}");
    // Cold, then warm (from the listing cache): both equal Dovecot's.
    assert_eq!(uidl(bridge.port), native);
    assert_eq!(uidl(bridge.port), native);
    // New mail with and without the header.
    dovecot.deliver("alice", &message(6, Some("late-arrival")));
    dovecot.deliver("alice", &message(7, None));
    let native = uidl(dovecot.pop3_port);
    assert_eq!(uidl(bridge.port), native);
    assert!(String::from_utf8_lossy(&native.1).contains("6 late-arrival\r\n"));
}

#[test]
fn without_the_setting_or_with_a_bad_value_the_template_is_used() {
    let dovecot = Dovecot::start();
    dovecot.deliver("alice", &message(1, Some("has space")));
    dovecot.deliver("alice", &message(2, Some("fine-value")));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("popbridge.toml");
    std::fs::write(&cfg, "[pop3]\nreuse_xuidl = true\n").unwrap();
    let on = Popbridge::start(dovecot.imap_port, &["--config", cfg.to_str().unwrap()]);
    let off = Popbridge::start(dovecot.imap_port, &[]);
    let on_uidl = String::from_utf8_lossy(&uidl(on.port).1).into_owned();
    let off_uidl = String::from_utf8_lossy(&uidl(off.port).1).into_owned();
    // The default is Dovecot's template for both messages.
    assert_eq!(
        off_uidl,
        String::from_utf8_lossy(&uidl(dovecot.pop3_port).1)
    );
    let lines: Vec<&str> = on_uidl.lines().collect();
    let off_lines: Vec<&str> = off_uidl.lines().collect();
    // "has space" is not a valid UIDL (RFC 1939 §7): the template is used.
    assert_eq!(lines[0], off_lines[0], "{on_uidl}");
    assert_eq!(lines[1], "2 fine-value", "{on_uidl}");
}
