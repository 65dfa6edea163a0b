//! Cut-over without re-downloads: POP3 clients that keep mail on the server
//! (mpop `keep on`, fetchmail `keep` + `uidl`, getmail6 `read_all = false`)
//! first poll Dovecot's own POP3
//! server, then the same clients (same UIDL memory) are pointed at popbridge
//! in front of the same Dovecot. They must not fetch anything again, must
//! fetch exactly the one new message, and then nothing.

use std::fs;
use std::path::Path;

use crate::common::keepers::{self, Keeper, Row};
use crate::common::{Dovecot, DovecotOptions, Popbridge};

/// Number of messages delivered before the first poll.
const INITIAL: usize = 30;

/// A test message with a unique Message-ID (and an optional X-UIDL header).
fn message(i: usize, x_uidl: Option<&str>) -> Vec<u8> {
    let header = x_uidl.map_or(String::new(), |u| format!("X-UIDL: {u}\r\n"));
    format!(
        "From: Sender <sender@example.org>\r\n\
         To: Alice <alice@example.net>\r\n\
         {header}Subject: cut-over message {i}\r\n\
         Date: Mon, 1 Jan 2024 12:{:02}:00 +0000\r\n\
         Message-ID: <cutover-{i}@popbridge.test>\r\n\
         \r\n\
         Body of message {i}.\r\n",
        i % 60
    )
    .into_bytes()
}

fn clients(dir: &Path) -> Vec<Box<dyn Keeper>> {
    keepers::all(dir, "alice", "secret")
}

/// Runs the whole cut-over with all clients and returns their counts.
fn cut_over(
    dovecot: &Dovecot,
    bridge: &Popbridge,
    x_uidl: impl Fn(usize) -> Option<String>,
) -> Vec<Row> {
    for i in 0..INITIAL {
        dovecot.deliver("alice", &message(i, x_uidl(i).as_deref()));
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut clients = clients(dir.path());
    keepers::cut_over(
        &mut clients,
        (dovecot.pop3_port, "dovecot"),
        || bridge,
        || dovecot.deliver("alice", &message(INITIAL, x_uidl(INITIAL).as_deref())),
    )
}

fn print_table(title: &str, rows: &[Row]) {
    keepers::print_rows(title, "first poll", rows);
}

fn assert_rows(rows: &[Row]) {
    keepers::assert_no_redownloads(rows, INITIAL, "first poll");
}

#[test]
fn clients_keeping_mail_do_not_redownload_after_cut_over() {
    let dovecot = Dovecot::start();
    let bridge = Popbridge::start(dovecot.imap_port, &[]);
    let rows = cut_over(&dovecot, &bridge, |_| None);
    print_table("cut-over, uidl_format = dovecot (default):", &rows);
    assert_rows(&rows);
}

#[test]
fn clients_keeping_mail_do_not_redownload_after_cut_over_with_x_uidl() {
    let dovecot = Dovecot::start_with(DovecotOptions {
        extra_conf: "pop3_reuse_xuidl = yes\n".into(),
        ..DovecotOptions::default()
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = dir.path().join("popbridge.toml");
    fs::write(&cfg, "[pop3]\nreuse_xuidl = true\n").expect("write popbridge.toml");
    let bridge = Popbridge::start(dovecot.imap_port, &["--config", cfg.to_str().unwrap()]);
    let rows = cut_over(&dovecot, &bridge, |i| Some(format!("legacy-server.{i:05}")));
    print_table("cut-over, reuse_xuidl = true (X-UIDL headers):", &rows);
    assert_rows(&rows);
}
