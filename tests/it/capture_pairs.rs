//! Issue 18: `popbridge migrate capture` must never serve one message under
//! another message's old UIDL. End to end with real POP3 clients that keep
//! mail on the server (mpop, fetchmail, getmail6), some of which had
//! fetched only part of the mailbox before the switch.
//!
//! A keeping client skips every UIDL it has seen: serve message B under
//! message A's old UIDL, and a client that had A but not B never gets B.
//! The two ways the old matching did that, reproduced here:
//!
//! 1. another tool moved the mail byte for byte and in order, except two
//!    adjacent messages of equal size and different headers, which it
//!    swapped (the old code paired by size in order);
//! 2. two messages with identical headers, the first in POP3 order longer
//!    by exactly the `Received:` line the other tool adds to every message,
//!    so the second's new size is the first's old size (the old code split
//!    one header hash by size).
//!
//! In each, "partial" clients polled the old server when the mailbox ended
//! just after the first message of the pair, "full" clients after all mail
//! had arrived. After the switch every client must have every message of
//! the mailbox (by content: a token line in each body), and none may
//! download a message it had unless the capture summary named it
//! ("downloaded once more at cut-over").
//!
//! The old server is a parameter ([`OldServer`]: a POP3 port with the
//! login alice/secret, since the clients keep one configuration across the
//! switch, and a way to deliver a message to that mailbox): Dovecot's own
//! POP3, Cyrus's and Courier's (common/servers/). The new mailbox is
//! always a Dovecot behind popbridge.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::common::keepers::{self, Keeper, Row};
use crate::common::servers::{start_courier, start_cyrus, MailServer, ALICE};
use crate::common::{Dovecot, DovecotOptions, Imap, Pop3, Popbridge};

/// The login on both servers (and in the clients' configuration).
const USER: &str = "alice";
const PASS: &str = "secret";

/// The old POP3 server of a scenario.
pub struct OldServer<'a> {
    /// For the output.
    pub name: &'a str,
    /// Its POP3 port on 127.0.0.1 (plain, USER/PASS as alice/secret).
    pub pop3_port: u16,
    /// Delivers one message (exact bytes) to alice's mailbox, after the
    /// ones delivered before (POP3 order is delivery order).
    pub deliver: &'a dyn Fn(&[u8]),
}

/// One scenario: the old mailbox, where the partial clients stopped, and
/// what the other tool does when it moves the mail.
struct Case {
    title: &'static str,
    /// The old server's messages, in delivery (POP3) order.
    messages: Vec<Vec<u8>>,
    /// The partial clients polled the old server when it held this many.
    partial: usize,
    /// The other tool appends these messages (indexes into `messages`) to
    /// the IMAP mailbox, in this order; one left out was not moved (a
    /// duplicate the tool dropped).
    order: Vec<usize>,
    /// The other tool puts [`RECEIVED`] on top of every message it moves.
    received: bool,
    /// Messages whose body the other tool changes (it appends a line).
    rewrite_body: Vec<usize>,
    /// Pairs (a, b) of `messages` whose old LIST size and new RFC822.SIZE
    /// must meet as the issue describes, checked so that a scenario that no
    /// longer sets the trap fails loudly: `old size(a) == old size(b)` when
    /// the tool moves byte for byte, `new size(b) == old size(a)` when it adds
    /// a Received line.
    trap: (usize, usize),
    /// Lines the capture summary must contain.
    summary: Vec<&'static str>,
}

/// The `Received:` field the other tool adds (case 2).
const RECEIVED: &str =
    "Received: from old-isp.example by migrator.example (other tool); Tue, 2 Jan 2024 00:00:00 +0000\r\n";

/// A test message: its identity for the checks is the `token=` line in its
/// body (two messages with one header, as in case 2, differ only there).
fn message(subject: &str, id: &str, token: &str, padding: usize) -> Vec<u8> {
    format!(
        "From: Sender <sender@example.org>\r\n\
         To: Alice <alice@example.net>\r\n\
         Subject: {subject}\r\n\
         Date: Mon, 1 Jan 2024 12:00:00 +0000\r\n\
         Message-ID: <{id}@capture-pairs.test>\r\n\
         \r\n\
         token={token}\r\n{}",
        "padding\r\n".repeat(padding)
    )
    .into_bytes()
}

/// Case 1: the swapped neighbours, with two identical copies (one before
/// the boundary, one after) that must pair without a re-download.
fn case_swapped_neighbours() -> Case {
    let a = message("swap A", "swap-a", "swap-A", 2);
    let b = message("swap B", "swap-b", "swap-B", 2);
    assert_eq!(a.len(), b.len());
    let copy = message("the same twice", "copy", "copy", 1);
    Case {
        title: "case 1: equal-size neighbours swapped by the other tool",
        messages: vec![
            message("zero", "m0", "m0", 0),
            copy.clone(),
            message("one", "m1", "m1", 3),
            a,
            // The partial clients stop here: they had A, not B.
            b,
            message("two", "m2", "m2", 1),
            copy,
            message("three", "m3", "m3", 4),
        ],
        partial: 4,
        order: vec![0, 1, 2, 4, 3, 5, 6, 7],
        received: false,
        rewrite_body: vec![],
        trap: (3, 4),
        summary: vec![
            "old server messages: 8\n",
            "IMAP mailbox messages: 8\n",
            "matched by content (header and body): 6\n",
            "identical messages (cannot be told apart): 1 groups, 2 paired in order\n",
            "same header, other body (not paired): 0 groups\n",
            "downloaded once more at cut-over: 0\n",
        ],
    }
}

/// Case 2: the twins, plus two identical copies of which the other tool
/// moved only one (not paired, named), and a message whose body it changed
/// (not paired, named).
fn case_received_line_twins() -> Case {
    let short = message("twins", "twin", "twin-short", 1);
    // Longer by exactly the Received field the tool adds: one more body
    // line of that length (the tokens have one length too).
    let long = {
        let mut m = message("twins", "twin", "twin-long_", 1);
        let line = "x".repeat(RECEIVED.len() - 2);
        m.extend_from_slice(format!("{line}\r\n").as_bytes());
        m
    };
    assert_eq!(long.len(), short.len() + RECEIVED.len());
    let dup = message("sent twice", "dup", "dup", 2);
    Case {
        title: "case 2: one header, the first longer by the added Received line",
        messages: vec![
            message("zero", "m0", "m0", 0),
            dup.clone(),
            long,
            // The partial clients stop here: they had the long twin only.
            short,
            dup,
            message("changed by the tool", "m5", "m5", 2),
            message("six", "m6", "m6", 3),
        ],
        partial: 3,
        // The tool dropped the second copy of `dup`.
        order: vec![0, 1, 2, 3, 5, 6],
        received: true,
        rewrite_body: vec![5],
        trap: (2, 3),
        summary: vec![
            "old server messages: 7\n",
            "IMAP mailbox messages: 6\n",
            "matched by content (header and body): 4\n",
            "identical messages (cannot be told apart): 1 groups, 0 paired in order\n",
            ": not paired (2 old, 1 IMAP): template UIDLs\n",
            "same header, other body (not paired): 1 groups\n",
            "downloaded once more at cut-over: 2 (UIDs: 2 5)\n",
        ],
    }
}

/// Content tokens and how often each occurs.
type Tokens = BTreeMap<String, usize>;

fn tokens_in(text: &str, into: &mut Tokens) {
    for t in text.lines().filter_map(|l| l.strip_prefix("token=")) {
        *into.entry(t.trim().to_string()).or_default() += 1;
    }
}

/// What `client` (one of [`keepers::all`] under `dir`) has delivered so
/// far, by token. Reads the delivery places the keepers write to.
fn delivered(dir: &Path, client: &str) -> Tokens {
    let mut t = Tokens::new();
    let read = |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap()).into_owned();
    match client {
        "mpop" => {
            for sub in ["new", "cur"] {
                for e in fs::read_dir(dir.join("mpop/maildir").join(sub)).unwrap() {
                    tokens_in(&read(&e.unwrap().path()), &mut t);
                }
            }
        }
        "fetchmail" => tokens_in(&read(&dir.join("fetchmail/delivered.mbox")), &mut t),
        "getmail6" => tokens_in(&read(&dir.join("getmail/delivered.mbox")), &mut t),
        other => panic!("unknown client {other}"),
    }
    t
}

fn minus(a: &Tokens, b: &Tokens) -> Tokens {
    a.iter()
        .filter_map(|(k, &n)| {
            let d = n - b.get(k).copied().unwrap_or(0);
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

fn tokens_of(messages: &[Vec<u8>]) -> Tokens {
    let mut t = Tokens::new();
    for m in messages {
        tokens_in(&String::from_utf8_lossy(m), &mut t);
    }
    t
}

/// The token of a message (its identity for these tests).
fn token_of(m: &[u8]) -> String {
    let mut t = Tokens::new();
    tokens_in(&String::from_utf8_lossy(m), &mut t);
    assert_eq!(t.len(), 1, "one token per message");
    t.into_keys().next().unwrap()
}

/// The old server's messages as its POP3 serves them: token → (LIST size,
/// RETR bytes) of each copy. By content, not position: Courier's POP3
/// numbers messages that arrived within one second by file name, not in
/// arrival order (tests/it/common/servers/QUIRKS.md).
fn read_old(old: &OldServer, case: &Case) -> BTreeMap<String, Vec<(u64, Vec<u8>)>> {
    let mut pop = Pop3::connect(old.pop3_port);
    pop.login(USER, PASS);
    let list = pop.list();
    assert_eq!(list.len(), case.messages.len(), "{}: old mailbox", old.name);
    let mut out: BTreeMap<String, Vec<(u64, Vec<u8>)>> = BTreeMap::new();
    for (n, size) in list {
        let m = pop.retr(n);
        out.entry(token_of(&m)).or_default().push((size, m));
    }
    pop.quit();
    out
}

/// The other tool: appends the messages it read from the old server to the
/// IMAP mailbox, as `case` says.
fn move_with_other_tool(old: &BTreeMap<String, Vec<(u64, Vec<u8>)>>, new: &Dovecot, case: &Case) {
    let mut left = old.clone();
    let mut imap = Imap::connect(new.imap_port, USER, PASS);
    for &i in &case.order {
        let mut m = if case.received {
            RECEIVED.as_bytes().to_vec()
        } else {
            Vec::new()
        };
        let (_, bytes) = left
            .get_mut(&token_of(&case.messages[i]))
            .and_then(Vec::pop)
            .unwrap();
        m.extend_from_slice(&bytes);
        if case.rewrite_body.contains(&i) {
            m.extend_from_slice(b"-- \r\nmoved by the other tool\r\n");
        }
        imap.append("INBOX", &m);
    }
    imap.logout();
}

/// `popbridge migrate capture` from `old` into `new`; its stdout.
fn capture(old: &OldServer, new: &Dovecot, data_dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_popbridge"))
        .args(["migrate", "capture", "--old"])
        .arg(format!("pop3://127.0.0.1:{}", old.pop3_port))
        .args(["--user", USER, "--upstream"])
        .arg(format!("127.0.0.1:{}", new.imap_port))
        .args(["--upstream-tls", "none", "--data-dir"])
        .arg(data_dir)
        .env("POPBRIDGE_NEW_PASSWORD", PASS)
        .env_remove("POPBRIDGE_OLD_PASSWORD")
        .stdin(Stdio::null())
        .output()
        .expect("run popbridge migrate capture");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!(
        "$ popbridge migrate capture ({})\n{stdout}{stderr}",
        old.name
    );
    assert!(out.status.success(), "capture failed:\n{stdout}\n{stderr}");
    stdout
}

/// The IMAP UIDs the summary says will be downloaded once more.
fn named_in(summary: &str) -> Vec<u32> {
    let Some(line) = summary
        .lines()
        .find_map(|l| l.strip_prefix("  downloaded once more at cut-over: "))
    else {
        return Vec::new();
    };
    match line.split_once(" (UIDs: ") {
        Some((_, rest)) => rest
            .trim_end_matches(')')
            .split(' ')
            .map(|u| u.parse().unwrap())
            .collect(),
        None => Vec::new(),
    }
}

/// Keeping clients (mpop, fetchmail, getmail6) that first polled the old
/// server when it held `upto` messages.
struct Clients {
    dir: PathBuf,
    clients: Vec<Box<dyn Keeper>>,
    upto: usize,
}

impl Clients {
    fn new(dir: &Path, upto: usize) -> Self {
        Self {
            dir: dir.to_path_buf(),
            clients: keepers::all(dir, USER, PASS),
            upto,
        }
    }
}

/// Runs `case` against `old`: partial and full clients, the move, the
/// capture, the switch, and the checks.
fn run(old: &OldServer, case: &Case) {
    println!("=== {} ({})", case.title, old.name);
    let new = Dovecot::start();
    let dir = tempfile::tempdir().unwrap();
    let (partial_dir, full_dir) = (dir.path().join("partial"), dir.path().join("full"));
    let mut groups = [
        Clients::new(&partial_dir, case.partial),
        Clients::new(&full_dir, case.messages.len()),
    ];

    // Before the switch: the partial clients poll the old server when it
    // holds the first messages, the full clients when it holds them all.
    let mut delivered_so_far = 0;
    let mut first = Vec::new();
    for g in &mut groups {
        for m in &case.messages[delivered_so_far..g.upto] {
            (old.deliver)(m);
        }
        delivered_so_far = g.upto;
        for c in g.clients.iter_mut() {
            first.push(c.poll(old.pop3_port, "old"));
        }
    }
    let mut had: Vec<Tokens> = Vec::new();
    for g in &groups {
        for c in &g.clients {
            let h = delivered(&g.dir, c.name());
            assert_eq!(h, tokens_of(&case.messages[..g.upto]), "{}", c.name());
            had.push(h);
        }
    }

    // The switch: the other tool moves the mail, capture, popbridge.
    let served = read_old(old, case);
    let old_size = |i: usize| served[&token_of(&case.messages[i])][0].0;
    move_with_other_tool(&served, &new, case);
    let data = tempfile::tempdir().unwrap();
    let summary = capture(old, &new, data.path());
    let named = named_in(&summary);
    let mut imap = Imap::connect(new.imap_port, USER, PASS);
    let mailbox: BTreeMap<u32, Vec<u8>> = imap
        .uids()
        .into_iter()
        .map(|u| (u, imap.fetch_message(u)))
        .collect();
    // The trap is set as the issue describes.
    let (a, b) = case.trap;
    let mut new_size = |i: usize| {
        let pos = case.order.iter().position(|&k| k == i).unwrap();
        imap.size(*mailbox.keys().nth(pos).unwrap())
    };
    if case.received {
        assert_eq!(new_size(b), old_size(a), "{}: new size of {b}", old.name);
    } else {
        assert_eq!(old_size(a), old_size(b), "{}: old sizes", old.name);
        assert_eq!((new_size(a), new_size(b)), (old_size(a), old_size(b)));
    }
    imap.logout();
    let in_box = tokens_of(&mailbox.values().cloned().collect::<Vec<_>>());
    let again_tokens = tokens_of(&named.iter().map(|u| mailbox[u].clone()).collect::<Vec<_>>());
    let cfg = data.path().join("popbridge.toml");
    fs::write(
        &cfg,
        format!(
            "[pop3]\nuidl_map = true\n[data]\ndir = {:?}\n",
            data.path().to_str().unwrap()
        ),
    )
    .unwrap();
    let bridge = Popbridge::start(new.imap_port, &["--config", cfg.to_str().unwrap()]);

    // After the switch: nothing missed, nothing had downloaded again unless
    // the summary named it.
    // Every client is polled and judged before the test fails, so a
    // failure shows which clients missed what.
    let mut after = Vec::new();
    let mut problems = Vec::new();
    let mut k = 0;
    for g in &mut groups {
        let dir = &g.dir;
        for c in g.clients.iter_mut() {
            let n = c.poll(bridge.port, "cutover");
            let now = delivered(dir, c.name());
            let got = minus(&now, &had[k]);
            let who = format!("{} ({})", c.name(), dir.display());
            for (token, &want) in &in_box {
                let total = now.get(token).copied().unwrap_or(0);
                if total < want {
                    problems.push(format!(
                        "{who}: MISSED {token}: has {total} of {want} after the switch \
                         (had {:?}, got {got:?})",
                        had[k]
                    ));
                }
            }
            for (token, &n_got) in &got {
                let needed = in_box
                    .get(token)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(had[k].get(token).copied().unwrap_or(0));
                let named = again_tokens.get(token).copied().unwrap_or(0);
                if n_got > needed + named {
                    problems.push(format!(
                        "{who}: downloaded {token} {n_got} times, {needed} needed and \
                         {named} named in the summary (had {:?})",
                        had[k]
                    ));
                }
            }
            after.push(n);
            k += 1;
        }
    }
    assert!(
        problems.is_empty(),
        "{} ({}):\n{}\n{summary}",
        case.title,
        old.name,
        problems.join("\n")
    );

    // New mail: exactly it, then nothing.
    new.deliver(USER, &message("new mail", "new", "new", 0));
    let mut rows: Vec<Row> = Vec::new();
    k = 0;
    for g in &mut groups {
        for c in g.clients.iter_mut() {
            let fresh = c.poll(bridge.port, "new");
            let again = c.poll(bridge.port, "again");
            rows.push((c.name(), first[k], after[k], fresh, again));
            k += 1;
        }
    }
    keepers::print_rows(
        &format!(
            "{} ({}): partial clients first, then full",
            case.title, old.name
        ),
        "old server",
        &rows,
    );
    for &(name, _, _, fresh, again) in &rows {
        assert_eq!((fresh, again), (1, 0), "{name}: new mail, then nothing");
    }

    // The summary says what happened, and the map's header counts it.
    for line in &case.summary {
        assert!(summary.contains(line), "missing {line:?} in:\n{summary}");
    }
    let map = fs::read_dir(data.path().join("uidl-maps"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "map"))
        .unwrap();
    let head = fs::read_to_string(&map).unwrap();
    let head = head.lines().next().unwrap();
    assert!(
        head.contains(&format!("\tredownloads={}\t", named.len())),
        "{head}"
    );
}

/// `case` with `server`'s own POP3 as the old server.
fn run_on(server: &dyn MailServer, case: &Case) {
    assert_eq!(server.password(USER), PASS);
    let deliver = |m: &[u8]| server.deliver(USER, m);
    let old = OldServer {
        name: server.name(),
        pop3_port: server.pop3_port().expect("a server with its own POP3"),
        deliver: &deliver,
    };
    run(&old, case);
}

#[test]
fn swapped_equal_size_neighbours_from_cyrus_pop3() {
    run_on(&start_cyrus(&[ALICE]), &case_swapped_neighbours());
}

#[test]
fn identical_headers_longer_by_the_received_line_from_cyrus_pop3() {
    run_on(&start_cyrus(&[ALICE]), &case_received_line_twins());
}

#[test]
fn swapped_equal_size_neighbours_from_courier_pop3() {
    run_on(&start_courier(&[ALICE]), &case_swapped_neighbours());
}

#[test]
fn identical_headers_longer_by_the_received_line_from_courier_pop3() {
    run_on(&start_courier(&[ALICE]), &case_received_line_twins());
}

/// Dovecot's own POP3 server as the old server (another UIDL format than
/// the new mailbox's, so an old UIDL can never equal a template one).
fn dovecot_old_server() -> Dovecot {
    Dovecot::start_with(DovecotOptions {
        extra_conf: "pop3_uidl_format = %v.%u\n".into(),
        ..DovecotOptions::default()
    })
}

#[test]
fn swapped_equal_size_neighbours_from_dovecot_pop3() {
    let old = dovecot_old_server();
    let deliver = |m: &[u8]| old.deliver(USER, m);
    let server = OldServer {
        name: "Dovecot POP3",
        pop3_port: old.pop3_port,
        deliver: &deliver,
    };
    run(&server, &case_swapped_neighbours());
}

#[test]
fn identical_headers_longer_by_the_received_line_from_dovecot_pop3() {
    let old = dovecot_old_server();
    let deliver = |m: &[u8]| old.deliver(USER, m);
    let server = OldServer {
        name: "Dovecot POP3",
        pop3_port: old.pop3_port,
        deliver: &deliver,
    };
    run(&server, &case_received_line_twins());
}

/// A capture cut short (here: its journal cut after the IMAP headers, the
/// old headers and three old messages, with a torn line at the end, as a
/// kill leaves it) is run again: it fetches only what it had not hashed,
/// and writes the same map as an uninterrupted run.
#[test]
fn an_interrupted_capture_resumes_without_fetching_again() {
    let old = dovecot_old_server();
    let new = Dovecot::start();
    let case = case_swapped_neighbours();
    for m in &case.messages {
        old.deliver(USER, m);
    }
    let deliver = |m: &[u8]| old.deliver(USER, m);
    let server = OldServer {
        name: "Dovecot POP3",
        pop3_port: old.pop3_port,
        deliver: &deliver,
    };
    move_with_other_tool(&read_old(&server, &case), &new, &case);
    let data = tempfile::tempdir().unwrap();
    let first = capture(&server, &new, data.path());
    assert!(first.contains(", 0 from the journal"), "{first}");
    let maps = data.path().join("uidl-maps");
    let file = |ext: &str| {
        fs::read_dir(&maps)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == ext))
            .unwrap()
    };
    let entries = |p: &Path| -> Vec<String> {
        let text = fs::read_to_string(p).unwrap();
        text.lines().skip(1).map(String::from).collect()
    };
    let map = file("map");
    let before = entries(&map);
    // The journal in the order a capture writes it: its header, the IMAP
    // headers (8), the old headers (8), the old messages (8), the IMAP
    // messages (8).
    let journal = file("hashes");
    let text = fs::read_to_string(&journal).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1 + 4 * 8, "{text}");
    let kept = lines[..1 + 8 + 8 + 3].join("\n");
    fs::write(&journal, format!("{kept}\n{}", &lines[20][..30])).unwrap();
    fs::remove_file(&map).unwrap();
    let (ok, out, err) = {
        let o = Command::new(env!("CARGO_BIN_EXE_popbridge"))
            .args(["migrate", "capture", "--old"])
            .arg(format!("pop3://127.0.0.1:{}", old.pop3_port))
            .args(["--user", USER, "--upstream"])
            .arg(format!("127.0.0.1:{}", new.imap_port))
            .args(["--upstream-tls", "none", "--data-dir"])
            .arg(data.path())
            .env("POPBRIDGE_NEW_PASSWORD", PASS)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    println!("{out}{err}");
    assert!(ok, "{out}\n{err}");
    assert!(
        err.contains("1 unreadable lines of the journal dropped"),
        "{err}"
    );
    // Only the old messages and IMAP messages it had not hashed: 5 and 8.
    for part in [
        "hashed in this run: old server 0 headers + 5 messages (",
        "IMAP 0 headers + 8 messages (",
        ", 16 from the journal",
    ] {
        assert!(out.contains(part), "{part:?} in {out}");
    }
    assert_eq!(entries(&map), before, "the same map");
}
