//! Migrating from another POP3 server without re-downloads (issue 7), end to
//! end with real clients that keep mail on the server (mpop, fetchmail,
//! getmail6, each with its own UIDL memory).
//!
//! The "old ISP" is a Dovecot whose POP3 server uses another UIDL format
//! (`%v.%u`); the new mailbox is a second Dovecot behind popbridge. Clients
//! poll the old server first, the mail moves (by "another tool" plus
//! `popbridge migrate capture`, or by `popbridge migrate copy`), the clients
//! switch to popbridge, and their next poll must download nothing.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::common;
use crate::common::keepers::{self, Keeper, Row};
use crate::common::{Dovecot, DovecotOptions, Imap, Pop3, Popbridge};

/// Messages on the old server before the cut-over.
const N: usize = 20;

/// The old ISP's POP3 server: another UIDL format than popbridge's default.
fn old_isp() -> Dovecot {
    Dovecot::start_with(DovecotOptions {
        extra_conf: "pop3_uidl_format = %v.%u\n".into(),
        ..DovecotOptions::default()
    })
}

/// The old ISP with messages 0..N for alice, and the new (empty) mailbox.
fn old_with_mail_and_new() -> (Dovecot, Dovecot) {
    let old = old_isp();
    let new = Dovecot::start();
    for i in 0..N {
        old.deliver("alice", &message(i));
    }
    (old, new)
}

/// A test message with a unique Message-ID. Every third carries the
/// bookkeeping fields mbox-era servers write (volatile for the hash).
fn message(i: usize) -> Vec<u8> {
    let volatile = if i.is_multiple_of(3) {
        format!("Status: RO\r\nX-Status: A\r\nX-UID: {i}\r\n")
    } else {
        String::new()
    };
    format!(
        "From: Sender <sender@example.org>\r\n\
         To: Alice <alice@example.net>\r\n\
         Subject: migrated message {i}\r\n\
         Date: Mon, 1 Jan 2024 12:{:02}:00 +0000\r\n\
         Message-ID: <migration-{i}@popbridge.test>\r\n\
         {volatile}\
         \r\n\
         Body of message {i}.\r\n{}",
        i % 60,
        "padding line\r\n".repeat(i % 4)
    )
    .into_bytes()
}

/// What another migration tool does: copies every message from the old
/// server into the new mailbox, adding its own Received field and dropping
/// the mbox bookkeeping fields (so sizes differ and popbridge must match by
/// header hash), and not in the old order.
fn move_with_other_tool(old: &Dovecot, new: &Dovecot, which: impl Fn(usize) -> bool) {
    let mut pop = Pop3::connect(old.pop3_port);
    pop.login("alice", "secret");
    let count = pop.list().len();
    let mut messages: Vec<Vec<u8>> = (1..=count)
        .filter(|n| which(n - 1))
        .map(|n| pop.retr(n))
        .collect();
    pop.quit();
    // The first five go in last.
    let k = messages.len().min(5);
    messages.rotate_left(k);
    let mut imap = Imap::connect(new.imap_port, "alice", "secret");
    for m in messages {
        let text = String::from_utf8(m).expect("test messages are UTF-8");
        let kept: String = text
            .split_inclusive("\r\n")
            .filter(|l| {
                !["Status:", "X-Status:", "X-UID:"]
                    .iter()
                    .any(|p| l.starts_with(p))
            })
            .collect();
        let moved = format!(
            "Received: from old-isp.example by migrator.example (other tool);\r\n\
             \tTue, 2 Jan 2024 00:00:00 +0000\r\n{kept}"
        );
        imap.append("INBOX", moved.as_bytes());
    }
    imap.logout();
}

/// Runs `popbridge migrate ARGS` with the IMAP password in the environment.
/// Returns (success, stdout, stderr).
fn migrate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_popbridge"))
        .arg("migrate")
        .args(args)
        .env("POPBRIDGE_NEW_PASSWORD", "secret")
        .env_remove("POPBRIDGE_OLD_PASSWORD")
        .stdin(Stdio::null())
        .output()
        .expect("run popbridge migrate");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    println!("$ popbridge migrate {}\n{stdout}{stderr}", args.join(" "));
    (out.status.success(), stdout, stderr)
}

/// The flags every migrate run here shares: old server, account, new IMAP.
fn side_args(old: &Dovecot, new: &Dovecot) -> Vec<String> {
    vec![
        "--old".into(),
        format!("pop3://127.0.0.1:{}", old.pop3_port),
        "--user".into(),
        "alice".into(),
        "--upstream".into(),
        format!("127.0.0.1:{}", new.imap_port),
        "--upstream-tls".into(),
        "none".into(),
    ]
}

fn run_migrate(mode: &str, old: &Dovecot, new: &Dovecot, extra: &[&str]) -> String {
    let mut args: Vec<String> = vec![mode.into()];
    args.extend(side_args(old, new));
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, stdout, stderr) = migrate(&refs);
    assert!(ok, "popbridge migrate {mode} failed:\n{stdout}\n{stderr}");
    stdout
}

/// popbridge in front of `new` with `toml` as its configuration file.
fn bridge(new: &Dovecot, dir: &Path, toml: &str) -> Popbridge {
    let cfg = dir.join("popbridge.toml");
    fs::write(&cfg, toml).expect("write popbridge.toml");
    Popbridge::start(new.imap_port, &["--config", cfg.to_str().unwrap()])
}

/// The UIDL listing of a POP3 server, sorted.
fn uidls(port: u16) -> Vec<String> {
    let mut p = Pop3::connect(port);
    p.login("alice", "secret");
    let mut v: Vec<String> = p.uidl().into_iter().map(|(_, u)| u).collect();
    p.quit();
    v.sort();
    v
}

/// Clients poll the old server; `cut_over` moves the mail and returns the
/// popbridge to switch to; then the polls that must download 0, 1, 0.
fn scenario(
    title: &str,
    old: &Dovecot,
    new: &Dovecot,
    cut_over: impl FnOnce() -> Popbridge,
) -> Vec<Row> {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut clients: Vec<Box<dyn Keeper>> = keepers::all(dir.path(), "alice", "secret");
    let rows = keepers::cut_over(&mut clients, (old.pop3_port, "old"), cut_over, || {
        new.deliver("alice", &message(N))
    });
    keepers::print_rows(
        &format!("{title} ({N} messages on the old server):"),
        "old server",
        &rows,
    );
    rows
}

fn assert_rows(rows: &[Row]) {
    assert_eq!(rows.len(), 3, "mpop, fetchmail and getmail6");
    keepers::assert_no_redownloads(rows, N, "old server");
}

#[test]
fn capture_then_cut_over_downloads_nothing_again() {
    let (old, new) = old_with_mail_and_new();
    let data = tempfile::tempdir().expect("data dir");
    let data_dir = data.path().to_str().unwrap().to_string();
    let rows = scenario("migrate capture + uidl_map", &old, &new, || {
        move_with_other_tool(&old, &new, |_| true);
        let out = run_migrate("capture", &old, &new, &["--data-dir", &data_dir]);
        for line in [
            &format!("old server messages: {N}"),
            &format!("IMAP mailbox messages: {N}"),
            &format!("matched by content (header and body): {N}"),
            "identical messages (cannot be told apart): 0 groups",
            "same header, other body (not paired): 0 groups",
            "only on the old server: 0",
            "only in the IMAP mailbox: 0",
            "downloaded once more at cut-over: 0",
        ] {
            assert!(out.contains(line), "missing {line:?} in:\n{out}");
        }
        let b = bridge(
            &new,
            data.path(),
            &format!("[pop3]\nuidl_map = true\n[data]\ndir = {data_dir:?}\n"),
        );
        // popbridge now lists exactly the old server's UIDLs.
        assert_eq!(uidls(b.port), uidls(old.pop3_port));
        b
    });
    assert_rows(&rows);
}

#[test]
fn copy_twice_and_resumed_then_cut_over_downloads_nothing_again() {
    let (old, new) = old_with_mail_and_new();
    let dir = tempfile::tempdir().expect("temp dir");
    let rows = scenario("migrate copy + reuse_xuidl", &old, &new, || {
        // An operator spreading the copy over two runs (or a run that was
        // interrupted): the second run copies only the rest.
        let out = run_migrate("copy", &old, &new, &["--max-messages", "7"]);
        assert!(out.contains("copied: 7\n"), "{out}");
        assert!(
            out.contains(&format!("left for the next run: {}", N - 7)),
            "{out}"
        );
        let out = run_migrate("copy", &old, &new, &[]);
        assert!(
            out.contains("already in the mailbox (skipped): 7\n"),
            "{out}"
        );
        assert!(out.contains(&format!("copied: {}\n", N - 7)), "{out}");
        // Idempotent: a third run copies nothing and the mailbox is unchanged.
        let out = run_migrate("copy", &old, &new, &[]);
        assert!(out.contains("copied: 0\n"), "{out}");
        assert!(
            out.contains(&format!("already in the mailbox (skipped): {N}")),
            "{out}"
        );
        let mut imap = Imap::connect(new.imap_port, "alice", "secret");
        assert_eq!(imap.uids().len(), N, "each message exactly once");
        // The internal date is the message's date, not the time of the copy.
        let lines = imap.command("UID FETCH 1 (INTERNALDATE)").unwrap();
        let text = String::from_utf8_lossy(&lines[0]).into_owned();
        assert!(text.contains("\"01-Jan-2024 12:00:00 +0000\""), "{text}");
        let body = imap.fetch_message(1);
        assert!(body.starts_with(b"X-UIDL: "), "X-UIDL on top");
        imap.logout();
        let b = bridge(&new, dir.path(), "[pop3]\nreuse_xuidl = true\n");
        assert_eq!(uidls(b.port), uidls(old.pop3_port));
        b
    });
    assert_rows(&rows);
}

#[test]
fn identical_headers_are_told_apart_by_the_body_and_missing_messages_reported() {
    let old = old_isp();
    let new = Dovecot::start();
    // 0 and 1: identical header sections, different bodies (the body tells
    // them apart). 2: mbox bookkeeping fields the other tool drops. 3:
    // never moved.
    let twin = |body: &str| {
        format!(
            "From: a@example.org\r\nTo: alice@example.net\r\nSubject: twin\r\n\
             Message-ID: <twin@popbridge.test>\r\n\r\n{body}\r\n"
        )
        .into_bytes()
    };
    old.deliver("alice", &twin("first"));
    old.deliver("alice", &twin("second, a longer body"));
    old.deliver("alice", &message(3));
    old.deliver("alice", &message(4));
    let old_list = {
        let mut p = Pop3::connect(old.pop3_port);
        p.login("alice", "secret");
        let u: Vec<String> = p.uidl().into_iter().map(|(_, u)| u).collect();
        p.quit();
        u
    };
    move_with_other_tool(&old, &new, |i| i < 3);
    // Mail that reached the new server only.
    new.deliver("alice", &message(99));
    let data = tempfile::tempdir().expect("data dir");
    let data_dir = data.path().to_str().unwrap().to_string();
    let out = run_migrate("capture", &old, &new, &["--data-dir", &data_dir]);
    for line in [
        "matched by content (header and body): 3\n".to_string(),
        format!("only on the old server: 1 (UIDLs: {})", old_list[3]),
        "only in the IMAP mailbox: 1 (UIDs: 4)".to_string(),
        "downloaded once more at cut-over: 0\n".to_string(),
        // What was fetched: every header, and whole messages only where a
        // header is on both sides (3 of 4 on each).
        "hashed in this run: old server 4 headers + 3 messages (".to_string(),
        "IMAP 4 headers + 3 messages (".to_string(),
        ", 0 from the journal".to_string(),
    ] {
        assert!(out.contains(&line), "missing {line:?} in:\n{out}");
    }
    let b = bridge(
        &new,
        data.path(),
        &format!("[pop3]\nuidl_map = true\n[data]\ndir = {data_dir:?}\n"),
    );
    // Each moved message keeps its own old UIDL (the twins never each
    // other's); the new-only message gets a template UIDL.
    let mut p = Pop3::connect(b.port);
    p.login("alice", "secret");
    let served = p.uidl();
    assert_eq!(served.len(), 4);
    for (n, uidl) in &served {
        let text = String::from_utf8_lossy(&p.retr(*n)).into_owned();
        let expected = if text.contains("\r\n\r\nfirst\r\n") {
            Some(&old_list[0])
        } else if text.contains("second, a longer body") {
            Some(&old_list[1])
        } else if text.contains("Body of message 3.") {
            Some(&old_list[2])
        } else {
            assert!(text.contains("Body of message 99."), "{text}");
            None
        };
        match expected {
            Some(u) => assert_eq!(uidl, u, "{text}"),
            None => assert!(!old_list.contains(uidl), "{uidl}"),
        }
    }
    p.quit();
    // Run again: everything comes from the journal, nothing is fetched.
    let out = run_migrate("capture", &old, &new, &["--data-dir", &data_dir]);
    assert!(
        out.contains(
            "hashed in this run: old server 0 headers + 0 messages (0 octets), \
             IMAP 0 headers + 0 messages (0 octets), 8 from the journal"
        ),
        "{out}"
    );

    // Re-matching later without the old server gives the same map.
    let map_files: Vec<_> = fs::read_dir(data.path().join("uidl-maps"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "map"))
        .collect();
    assert_eq!(map_files.len(), 1);
    let entries = |p: &Path| -> Vec<String> {
        fs::read_to_string(p)
            .unwrap()
            .lines()
            .skip(1)
            .map(String::from)
            .collect()
    };
    let before = entries(&map_files[0]);
    let mut args = vec!["import".to_string()];
    args.extend(side_args(&old, &new).into_iter().skip(2));
    args.extend(["--data-dir".to_string(), data_dir.clone()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = migrate(&refs);
    assert!(ok, "import from the saved list: {out}\n{err}");
    assert!(
        out.contains("matched by content (header and body): 3\n"),
        "{out}"
    );
    assert_eq!(entries(&map_files[0]), before);

    // The same list exported by another tool (`uidl size hash` per line).
    let old_file = map_files[0].with_extension("old");
    let exported: String = fs::read_to_string(&old_file)
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| !l.starts_with("end\t"))
        .map(|l| format!("{}\n", l.replace('\t', " ")))
        .collect();
    let list = data.path().join("exported.txt");
    fs::write(&list, format!("# from the other tool\n{exported}")).unwrap();
    let mut with_file = vec!["import", "--uidl-file", list.to_str().unwrap()];
    with_file.extend(&refs[1..]);
    let (ok, out, err) = migrate(&with_file);
    assert!(ok, "import --uidl-file: {out}\n{err}");
    assert!(
        out.contains("matched by content (header and body): 3\n"),
        "{out}"
    );
    assert_eq!(entries(&map_files[0]), before);

    // A bad UIDL list file is a usage error (exit code 2) naming the line.
    let list = data.path().join("list.txt");
    fs::write(&list, "# uidl size\nok-1 100\nbad uidl here\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_popbridge"))
        .args(["migrate", "import", "--uidl-file"])
        .arg(&list)
        .args(&refs[1..])
        .env("POPBRIDGE_NEW_PASSWORD", "secret")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("list.txt:3"), "{err}");

    // A map made for another UIDVALIDITY (the mailbox was recreated since)
    // is ignored with a warning: its UIDs would name other messages.
    let text = fs::read_to_string(&map_files[0]).unwrap();
    let start = text.find("uidvalidity=").unwrap() + "uidvalidity=".len();
    let end = start + text[start..].find('\t').unwrap();
    let stale: u32 = text[start..end].parse::<u32>().unwrap() + 1;
    let stale_text = format!("{}{stale}{}", &text[..start], &text[end..]);
    fs::write(&map_files[0], stale_text).unwrap();
    let served = uidls(b.port);
    assert!(served.iter().all(|u| !old_list.contains(u)), "{served:?}");
    assert!(b.log().contains("imported UIDL map ignored"), "{}", b.log());

    // A corrupt map never fails a login: logged, template UIDLs served.
    fs::write(&map_files[0], "popbridge-uidl-map\t1\tgarbage\n").unwrap();
    let served = uidls(b.port);
    assert_eq!(served.len(), 4);
    assert!(served.iter().all(|u| !old_list.contains(u)), "{served:?}");
    assert!(
        b.log().contains("imported UIDL map unusable"),
        "{}",
        b.log()
    );
}

#[test]
fn bad_invocations_fail_with_clear_errors() {
    let (ok, _, err) = migrate(&["copy", "--old", "imap://x", "--user", "a"]);
    assert!(!ok);
    assert!(err.contains("pop3://host[:port]"), "{err}");
    let (ok, _, err) = migrate(&["capture", "--old", "pop3://127.0.0.1:1", "--user", "a"]);
    assert!(!ok);
    assert!(err.contains("data directory"), "{err}");
    // Nothing listens on port 1: a connection error, exit code 1.
    let d = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_popbridge"))
        .args([
            "migrate",
            "copy",
            "--old",
            "pop3://127.0.0.1:1",
            "--user",
            "a",
        ])
        .args(["--upstream", "127.0.0.1:1", "--upstream-tls", "none"])
        .arg("--data-dir")
        .arg(d.path())
        .env("POPBRIDGE_NEW_PASSWORD", "secret")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("old server: cannot connect to 127.0.0.1:1"),
        "{err}"
    );
    assert!(!err.contains("secret"));
}

#[test]
fn old_server_over_pop3s_and_stls_is_verified() {
    let pki = common::certs::Pki::new("old ISP test CA");
    let other = common::certs::Pki::new("unrelated CA");
    let (old, pop3s) = Dovecot::start_with_listener(DovecotOptions::default(), |pop3s| {
        format!(
            "pop3_uidl_format = %v.%u\nssl = yes\nssl_cert = <{}\nssl_key = <{}\n\
             ssl_min_protocol = TLSv1.2\n\
             service pop3-login {{\n  inet_listener pop3s {{\n    port = {pop3s}\n  }}\n}}\n",
            pki.cert_path().display(),
            pki.key_path().display()
        )
    });
    let new = Dovecot::start();
    for i in 0..3 {
        old.deliver("alice", &message(i));
    }
    move_with_other_tool(&old, &new, |_| true);
    let data = tempfile::tempdir().expect("data dir");
    let data_dir = data.path().to_str().unwrap();
    let ca = pki.ca_path();
    let ca = ca.to_str().unwrap();
    let new_side = [
        "--user",
        "alice",
        "--upstream",
        &format!("127.0.0.1:{}", new.imap_port),
        "--upstream-tls",
        "none",
        "--data-dir",
        data_dir,
    ];
    let implicit = format!("pop3s://127.0.0.1:{pop3s}");
    let plain = format!("pop3://127.0.0.1:{}", old.pop3_port);
    for old_args in [
        vec!["--old", &implicit, "--old-ca-file", ca],
        vec!["--old", &plain, "--old-starttls", "--old-ca-file", ca],
    ] {
        let mut args = vec!["capture"];
        args.extend(&old_args);
        args.extend(&new_side);
        let (ok, out, err) = migrate(&args);
        assert!(ok, "{out}\n{err}");
        assert!(
            out.contains("matched by content (header and body): 3\n"),
            "{out}"
        );
    }
    // A certificate from another CA is refused before any password is sent.
    let other_ca = other.ca_path();
    let mut args = vec![
        "capture",
        "--old",
        &implicit,
        "--old-ca-file",
        other_ca.to_str().unwrap(),
    ];
    args.extend(&new_side);
    let (ok, out, err) = migrate(&args);
    assert!(!ok, "{out}");
    assert!(err.contains("old server: TLS"), "{err}");
}

#[test]
fn copy_interrupted_by_a_full_mailbox_resumes_after_the_fix() {
    let old = old_isp();
    let quota = |n: usize| {
        format!(
            "mail_plugins = $mail_plugins quota\n\
             plugin {{\n  quota = count:User quota\n  quota_rule = *:messages={n}\n  quota_vsizes = yes\n}}\n"
        )
    };
    let new = Dovecot::start_with(DovecotOptions {
        extra_conf: quota(7),
        ..DovecotOptions::default()
    });
    for i in 0..N {
        old.deliver("alice", &message(i));
    }
    // The mailbox fills up after 7 messages: the run fails clearly and says
    // what it did.
    let mut args: Vec<String> = vec!["copy".into()];
    args.extend(side_args(&old, &new));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = migrate(&refs);
    assert!(!ok, "{out}");
    assert!(
        err.contains("NO to APPEND") && err.contains("OVERQUOTA"),
        "{err}"
    );
    assert!(
        err.contains("7 messages were copied before that: run the same command again to resume"),
        "{err}"
    );
    // The operator raises the quota and runs the same command again.
    let conf = fs::read_to_string(new.conf_path()).unwrap();
    fs::write(new.conf_path(), conf.replace(&quota(7), &quota(1000))).unwrap();
    new.doveadm(&["reload"]);
    // The reload reaches new IMAP sessions a moment later: until then a run
    // still meets the old quota at its first APPEND and copies nothing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let out = loop {
        let (ok, out, err) = migrate(&refs);
        if ok {
            break out;
        }
        assert!(
            err.contains("OVERQUOTA") && err.contains("; 0 messages were copied"),
            "{err}"
        );
        assert!(std::time::Instant::now() < deadline, "quota never raised");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(
        out.contains("already in the mailbox (skipped): 7\n"),
        "{out}"
    );
    assert!(out.contains(&format!("copied: {}\n", N - 7)), "{out}");
    let mut imap = Imap::connect(new.imap_port, "alice", "secret");
    assert_eq!(imap.uids().len(), N, "each message exactly once");
    imap.logout();
    assert_eq!(uidls_via_xuidl(&new), uidls(old.pop3_port));
}

/// The UIDLs popbridge serves from `new` with `reuse_xuidl = true`.
fn uidls_via_xuidl(new: &Dovecot) -> Vec<String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let b = bridge(new, dir.path(), "[pop3]\nreuse_xuidl = true\n");
    uidls(b.port)
}
