//! Real POP3 clients that keep mail on the server, each with its own UIDL
//! memory: mpop (`keep on`), fetchmail (`keep` + `uidl`) and getmail6
//! (`read_all = false`, `delete = false`). A client's configuration can be
//! pointed at another port between polls while its memory stays, which is
//! what a cut-over looks like to it.
//!
//! Counting: every test message carries a unique `Message-ID:`; a poll's
//! result is how many more messages the client has delivered.

use std::borrow::Borrow;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::run_program as run;
use super::{Popbridge, Run};

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A POP3 client with its own UIDL memory.
pub trait Keeper {
    fn name(&self) -> &'static str;
    /// Polls 127.0.0.1:`port` once; returns how many messages it delivered.
    fn poll(&mut self, port: u16, label: &str) -> usize;
}

/// mpop, fetchmail and getmail6 for `user`/`pass`, under `dir`.
pub fn all(dir: &Path, user: &str, pass: &str) -> Vec<Box<dyn Keeper>> {
    vec![
        Box::new(Mpop::new(dir, user, pass)),
        Box::new(Fetchmail::new(dir, user, pass)),
        Box::new(Getmail::new(dir, user, pass)),
    ]
}

/// What one client delivered over a cut-over: (client, first poll (the
/// server it used before), right after the cut-over, new mail, again).
pub type Row = (&'static str, usize, usize, usize, usize);

/// Polls 127.0.0.1:`port` once with every client; what each delivered, in
/// the clients' order.
fn poll_all(clients: &mut [Box<dyn Keeper>], port: u16, label: &str) -> Vec<usize> {
    clients.iter_mut().map(|c| c.poll(port, label)).collect()
}

/// The cut-over the keeper tests share: every client polls the server it
/// used so far (`before`: its port, and a label for the output files);
/// `switch` returns the popbridge they are pointed at next (kept up until
/// the last poll); they poll it right after the cut-over, again after
/// `deliver_new` delivered one message, and once more. One row a client.
pub fn cut_over<B: Borrow<Popbridge>>(
    clients: &mut [Box<dyn Keeper>],
    before: (u16, &str),
    switch: impl FnOnce() -> B,
    deliver_new: impl FnOnce(),
) -> Vec<Row> {
    let first = poll_all(clients, before.0, before.1);
    let bridge = switch();
    let port = bridge.borrow().port;
    let after = poll_all(clients, port, "cutover");
    deliver_new();
    let new = poll_all(clients, port, "new");
    let again = poll_all(clients, port, "again");
    clients
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name(), first[i], after[i], new[i], again[i]))
        .collect()
}

/// Prints `rows` as a table under `title`; `first` heads the column of the
/// first poll (the server the clients used before the cut-over).
pub fn print_rows(title: &str, first: &str, rows: &[Row]) {
    println!("{title}");
    println!(
        "{:<10} {first:>10} {:>15} {:>9} {:>6}",
        "client", "after cut-over", "new mail", "again"
    );
    for (name, a, b, c, d) in rows {
        println!("{name:<10} {a:>10} {b:>15} {c:>9} {d:>6}");
    }
}

/// Asserts that every client fetched all `initial` messages on its first
/// poll (`first` names it), nothing again after the cut-over, exactly the
/// one new message, and then nothing.
#[track_caller]
pub fn assert_no_redownloads(rows: &[Row], initial: usize, first: &str) {
    for &(name, first_poll, after, new, again) in rows {
        assert_eq!(
            (first_poll, after, new, again),
            (initial, 0, 1, 0),
            "{name}: ({first}, after cut-over (re-downloads), new mail, again)"
        );
    }
}

fn maildir_count(maildir: &Path) -> usize {
    ["new", "cur"]
        .iter()
        .map(|sub| {
            fs::read_dir(maildir.join(sub))
                .expect("read maildir")
                .count()
        })
        .sum()
}

/// Fails the test with `client`'s exit status and output unless `ok` (the
/// caller's verdict on the exit status) holds.
#[track_caller]
fn assert_ran(client: &str, label: &str, r: &Run, ok: bool) {
    assert!(
        ok,
        "{client} ({label}) failed ({}):\n{}\n{}",
        r.status,
        lossy(&r.stdout),
        r.stderr
    );
}

/// Writes a client's configuration (it holds the password) readable by
/// its owner only; mpop and fetchmail refuse a configuration others can read.
fn write_private(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Messages in an mbox-style delivery file that `client` appended to,
/// counted by their `Message-ID:` lines (every test message has one).
fn message_ids_in(mbox: &Path, client: &str) -> usize {
    lossy(&fs::read(mbox).unwrap_or_else(|e| panic!("read {client} delivery file: {e}")))
        .lines()
        .filter(|l| l.starts_with("Message-ID: <"))
        .count()
}

/// How many messages a poll delivered, given the client's running total
/// `now`; moves `delivered` (the total before the poll) up to `now`.
fn newly_delivered(delivered: &mut usize, now: usize) -> usize {
    let new = now - *delivered;
    *delivered = now;
    new
}

// ---------------------------------------------------------------------------
// mpop
// ---------------------------------------------------------------------------

pub struct Mpop {
    dir: PathBuf,
    maildir: PathBuf,
    user: String,
    pass: String,
    delivered: usize,
}

impl Mpop {
    pub fn new(dir: &Path, user: &str, pass: &str) -> Mpop {
        let dir = dir.join("mpop");
        let maildir = dir.join("maildir");
        for sub in ["cur", "new", "tmp"] {
            fs::create_dir_all(maildir.join(sub)).expect("create maildir");
        }
        Mpop {
            dir,
            maildir,
            user: user.into(),
            pass: pass.into(),
            delivered: 0,
        }
    }
}

impl Keeper for Mpop {
    fn name(&self) -> &'static str {
        "mpop"
    }

    fn poll(&mut self, port: u16, label: &str) -> usize {
        let conf = format!(
            "defaults\n\
             timeout 60\n\
             \n\
             account acct\n\
             host 127.0.0.1\n\
             port {port}\n\
             user {user}\n\
             password {pass}\n\
             auth user\n\
             tls off\n\
             tls_starttls off\n\
             pipelining auto\n\
             keep on\n\
             only_new on\n\
             received_header off\n\
             uidls_file {d}/uidls\n\
             delivery maildir {m}\n",
            user = self.user,
            pass = self.pass,
            d = self.dir.display(),
            m = self.maildir.display(),
        );
        let path = self.dir.join("mpoprc");
        write_private(&path, &conf);
        let r = run(
            Command::new("mpop").arg("-C").arg(&path).arg("acct"),
            &self.dir,
            &format!("mpop-{label}"),
        );
        assert_ran("mpop", label, &r, r.status.success());
        newly_delivered(&mut self.delivered, maildir_count(&self.maildir))
    }
}

// ---------------------------------------------------------------------------
// fetchmail
// ---------------------------------------------------------------------------

pub struct Fetchmail {
    dir: PathBuf,
    mbox: PathBuf,
    user: String,
    pass: String,
    delivered: usize,
}

impl Fetchmail {
    pub fn new(dir: &Path, user: &str, pass: &str) -> Fetchmail {
        let dir = dir.join("fetchmail");
        fs::create_dir_all(&dir).expect("create fetchmail dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
        let mbox = dir.join("delivered.mbox");
        fs::write(&mbox, b"").expect("create mbox");
        Fetchmail {
            dir,
            mbox,
            user: user.into(),
            pass: pass.into(),
            delivered: 0,
        }
    }

    /// Messages in the delivery file, counted by their Message-ID lines.
    fn count(&self) -> usize {
        message_ids_in(&self.mbox, "fetchmail")
    }
}

impl Keeper for Fetchmail {
    fn name(&self) -> &'static str {
        "fetchmail"
    }

    fn poll(&mut self, port: u16, label: &str) -> usize {
        let rc = format!(
            "poll 127.0.0.1 protocol pop3 port {port} auth password uidl\n  \
             user \"{}\" there with password \"{}\"\n  \
             keep sslproto '' mda \"cat >> {}\"\n",
            self.user,
            self.pass,
            self.mbox.display()
        );
        let rcfile = self.dir.join("fetchmailrc");
        write_private(&rcfile, &rc);
        let r = run(
            Command::new("fetchmail")
                .arg("--nosyslog")
                .arg("--nodetach")
                .arg("-v")
                .arg("-f")
                .arg(&rcfile)
                .arg("-i")
                .arg(self.dir.join("fetchids"))
                .arg("--pidfile")
                .arg(self.dir.join("fetchmail.pid"))
                .env("HOME", &self.dir)
                .env("FETCHMAILHOME", &self.dir),
            &self.dir,
            &format!("fetchmail-{label}"),
        );
        // 0: mail delivered, 1: no new mail.
        assert_ran(
            "fetchmail",
            label,
            &r,
            matches!(r.status.code(), Some(0) | Some(1)),
        );
        let now = self.count();
        newly_delivered(&mut self.delivered, now)
    }
}

// ---------------------------------------------------------------------------
// getmail6
// ---------------------------------------------------------------------------

/// getmail6 names its UIDL memory `oldmail-<host>-<port>-<user>`. A real
/// cut-over keeps the server's name and port (the name is pointed at
/// popbridge); a test cannot give two servers one port, so when the port
/// changes the memory file is carried over to the new name first, exactly
/// as getmail would find it after a DNS switch.
///
/// Delivery goes through a small script (`MDA_external`) rather than
/// getmail's Maildir writer, to work around a race in getmail 6.18: it
/// forks the delivery child *before* installing its SIGCHLD handler, and
/// wakes up on a condition variable that is only notified if it is already
/// waiting; a child that exits too early leaves getmail waiting for its
/// socket timeout (measured: 1 poll in 7 stuck for minutes on this 2-core
/// machine). The script waits until its parent catches SIGCHLD
/// (`SigCgt` in /proc) and lingers briefly after delivering, so the parent
/// is waiting when the child exits.
pub struct Getmail {
    dir: PathBuf,
    mbox: PathBuf,
    user: String,
    pass: String,
    last_port: Option<u16>,
    delivered: usize,
}

impl Getmail {
    pub fn new(dir: &Path, user: &str, pass: &str) -> Getmail {
        let dir = dir.join("getmail");
        fs::create_dir_all(&dir).expect("create getmail dir");
        let mbox = dir.join("delivered.mbox");
        fs::write(&mbox, b"").expect("create getmail delivery file");
        let script = format!(
            "#!/bin/sh\n\
             # Wait until getmail (the parent) catches SIGCHLD (signal 17, bit 16).\n\
             while :; do\n\
             \x20 m=$(sed -n 's/^SigCgt:[[:space:]]*//p' /proc/$PPID/status)\n\
             \x20 [ $(( (0x$m >> 16) & 1 )) = 1 ] && break\n\
             \x20 sleep 0.01\n\
             done\n\
             cat >> {}\n\
             sleep 0.1\n",
            mbox.display()
        );
        let script_path = dir.join("deliver.sh");
        fs::write(&script_path, script).expect("write delivery script");
        fs::set_permissions(&script_path, fs::Permissions::from_mode(0o755)).expect("chmod");
        Getmail {
            dir,
            mbox,
            user: user.into(),
            pass: pass.into(),
            last_port: None,
            delivered: 0,
        }
    }

    fn memory(&self, port: u16) -> PathBuf {
        self.dir
            .join(format!("oldmail-127.0.0.1-{port}-{}", self.user))
    }

    /// Messages in the delivery file, counted by their Message-ID lines.
    fn count(&self) -> usize {
        message_ids_in(&self.mbox, "getmail")
    }
}

impl Keeper for Getmail {
    fn name(&self) -> &'static str {
        "getmail6"
    }

    fn poll(&mut self, port: u16, label: &str) -> usize {
        if let Some(last) = self.last_port.filter(|&p| p != port) {
            let from = self.memory(last);
            assert!(from.is_file(), "getmail left no UIDL memory at {from:?}");
            fs::copy(&from, self.memory(port)).expect("carry getmail's memory over");
        }
        self.last_port = Some(port);
        let rc = format!(
            "[retriever]\n\
             type = SimplePOP3Retriever\n\
             server = 127.0.0.1\n\
             port = {port}\n\
             username = {}\n\
             password = {}\n\
             \n\
             [destination]\n\
             type = MDA_external\n\
             path = /bin/sh\n\
             arguments = (\"{}\",)\n\
             allow_root_commands = true\n\
             \n\
             [options]\n\
             read_all = false\n\
             delete = false\n\
             verbose = 1\n",
            self.user,
            self.pass,
            self.dir.join("deliver.sh").display()
        );
        let rcfile = self.dir.join("getmailrc");
        write_private(&rcfile, &rc);
        let r = run(
            Command::new("getmail")
                .arg("--getmaildir")
                .arg(&self.dir)
                .arg("--rcfile")
                .arg(&rcfile),
            &self.dir,
            &format!("getmail-{label}"),
        );
        assert_ran("getmail", label, &r, r.status.success());
        let now = self.count();
        newly_delivered(&mut self.delivered, now)
    }
}
