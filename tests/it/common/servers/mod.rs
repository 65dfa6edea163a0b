//! Four more real IMAP upstreams behind one interface, for proving the IMAP
//! side on several servers (issue 13) and for capturing their behaviour
//! (issue 18): Cyrus IMAP 3.6, Courier-IMAP 5.0, GNU Mailutils imap4d 3.15
//! and Dovecot 2.3 advertising no UIDPLUS.
//!
//! # Layout
//! - `mod.rs`: the [`MailServer`] trait, the standard test users, the
//!   process-group owner [`Daemon`], and IMAP helpers every server needs
//!   (APPEND with a synchronising literal, AUTHENTICATE PLAIN).
//! - one file per server with its `start_*` function; each instance has its
//!   own temp dir, ports, configuration, pid files and (for Courier) its own
//!   mount and PID namespace, so instances run side by side and leave
//!   nothing behind. `QUIRKS.md` records what was measured.
//!
//! The servers come from `scripts/install-test-deps.sh`: Cyrus and Courier
//! are unpacked under [`OPT_DIR`] (their packages conflict with Dovecot's),
//! Mailutils and the helpers are installed normally. Every server except
//! Dovecot needs root (we run as root here and in CI).

use std::fs;
use std::io::{BufRead, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

// Private items of the shared harness, for the server files below.
use super::{base64, find, imap_quote, poll_port, ports, read_lossy, to_crlf, Imap};

pub mod courier;
pub mod cyrus;
pub mod dovecot;
pub mod mailutils;

// Every test crate compiles this module; most use none of it.
#[allow(unused_imports)]
pub use courier::{start_courier, Courier};
#[allow(unused_imports)]
pub use cyrus::{start_cyrus, Cyrus};
#[allow(unused_imports)]
pub use dovecot::{start_dovecot, start_dovecot_no_uidplus, DovecotNoUidplus};
#[allow(unused_imports)]
pub use mailutils::{start_mailutils, Mailutils};

/// Where `install-test-deps.sh` unpacks the server packages that conflict
/// with Dovecot's (`cyrus/`, `courier/`).
pub const OPT_DIR: &str = "/opt/popbridge-test";

/// A plain local user.
pub const ALICE: (&str, &str) = ("alice", "secret");
/// A `name@domain` user whose password has a space and a double quote: the
/// compatibility scenario needs exactly that (quoting in LOGIN, PLAIN
/// encoding, domain handling per server).
pub const BOB: (&str, &str) = ("bob@example.org", "pa ss\"word");
/// [`ALICE`] and [`BOB`], what most tests start a server with.
pub const STANDARD_USERS: &[(&str, &str)] = &[ALICE, BOB];

/// Owner of every mailbox file (as in the Dovecot harness; uid 0 is refused
/// by several servers).
pub const MAIL_UID: u32 = 5000;
/// Group of every mailbox file.
pub const MAIL_GID: u32 = 5000;

/// How long a server may take to listen (they take 0.05–0.5 s here; the
/// margin is for a loaded 2-core machine).
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a start is retried when a port from [`ports::allocate`] was
/// taken meanwhile.
const START_ATTEMPTS: usize = 4;

/// A running IMAP server with users and mail, the same for every kind.
pub trait MailServer: Send {
    /// Short name for messages and test names ("cyrus", "courier", ...).
    fn name(&self) -> &'static str;
    /// IMAP port on 127.0.0.1 (plaintext).
    fn imap_port(&self) -> u16;
    /// The server's own POP3 port on 127.0.0.1 if it has one: the byte
    /// reference popbridge is compared with.
    fn pop3_port(&self) -> Option<u16>;
    /// (login, password) of every user it was started with.
    fn users(&self) -> Vec<(String, String)>;
    /// Store `message` in `user`'s INBOX as these bytes (CRLF as given);
    /// panics on failure. Servers that refuse bare LF panic for it: check
    /// [`MailServer::accepts_bare_lf`] first.
    fn deliver(&self, user: &str, message: &[u8]);
    /// True if a message with bare LF lines can be delivered.
    fn accepts_bare_lf(&self) -> bool;
    /// The bytes BODY[] (and its own POP3 RETR, before dot-stuffing)
    /// returns for a message delivered as `delivered`, up to what
    /// [`MailServer::comparable`] removes.
    fn served_form(&self, delivered: &[u8]) -> Vec<u8>;
    /// `served` (BODY[] or RETR bytes) without what the server adds on its
    /// own and changes over time (Mailutils' X-IMAPbase, X-UID and Status
    /// headers); the bytes as they are for every other server. Compare
    /// `comparable(served)` with `served_form(delivered)`.
    fn comparable(&self, served: &[u8]) -> Vec<u8> {
        served.to_vec()
    }
    /// Its private directory (configuration, mail, logs).
    fn dir(&self) -> &Path;
    /// Whatever log it wrote (for failure reports; Cyrus logs only to
    /// syslog, which is not captured).
    fn log(&self) -> String;
    /// Seconds it took to start (spawn until every port answers).
    fn start_time(&self) -> Duration;
    /// Password of `user` as started; panics for an unknown user.
    fn password(&self, user: &str) -> String {
        self.users()
            .into_iter()
            .find(|(u, _)| u == user)
            .map(|(_, p)| p)
            .unwrap_or_else(|| panic!("{}: no user {user:?}", self.name()))
    }
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// A server process that leads its own process group; the whole group is
/// stopped (SIGTERM, then SIGKILL after `grace`) on drop, so forked
/// children of the server go too.
pub struct Daemon {
    child: Child,
    /// How long SIGTERM may take before SIGKILL.
    grace: Duration,
}

impl Daemon {
    /// Spawn `cmd` as the leader of a new process group.
    pub fn spawn(cmd: &mut Command, what: &str, grace: Duration) -> Daemon {
        use std::os::unix::process::CommandExt;
        let child = cmd
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {what} ({cmd:?}): {e}"));
        Daemon { child, grace }
    }

    /// Process id (= process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Some(status) once the leader has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Signal the group, wait for the leader, SIGKILL the group after
    /// `grace`. Idempotent.
    pub fn stop(&mut self) {
        let pgid = self.child.id();
        signal_group(pgid, "TERM");
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if self.try_wait().is_some() {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        // Stragglers in the group (a child that ignored SIGTERM) go too.
        signal_group(pgid, "KILL");
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Send SIG`signal` to process `pid` with the `kill` command (the crate
/// forbids unsafe code, so no kill(2) here).
pub fn signal(pid: u32, signal: &str) {
    kill_command(&pid.to_string(), signal);
}

/// Send SIG`signal` to every process of process group `pgid`.
pub fn signal_group(pgid: u32, signal: &str) {
    kill_command(&format!("-{pgid}"), signal);
}

fn kill_command(target: &str, signal: &str) {
    let _ = Command::new("kill")
        .args(["-s", signal, "--", target])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// Wait until every port accepts a connection; Err(reason) if the daemon
/// exits or the time runs out.
pub fn wait_ready(daemon: &mut Daemon, ports: &[u16]) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    for &port in ports {
        let left = deadline.saturating_duration_since(Instant::now());
        match poll_port(port, left, || {
            daemon.try_wait().map(|s| format!("exited with {s}"))
        }) {
            Ok(true) => {}
            Ok(false) => return Err(format!("port {port} not listening after {START_TIMEOUT:?}")),
            Err(reason) => return Err(reason),
        }
    }
    Ok(())
}

/// Call `attempt` with fresh ports until it works (another program can
/// take a port from [`ports::allocate`] before the server binds it);
/// panics with the last failure.
pub fn start_with_retries<T>(what: &str, mut attempt: impl FnMut() -> Result<T, String>) -> T {
    let mut last = String::new();
    for _ in 0..START_ATTEMPTS {
        match attempt() {
            Ok(server) => return server,
            Err(report) => last = report,
        }
    }
    panic!("{what} did not start after {START_ATTEMPTS} attempts; last failure:\n{last}");
}

/// A private temp dir, mode 0755 (servers drop privileges and must reach
/// their files).
pub fn private_dir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create server temp dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
    dir
}

/// Create `path` (and parents) owned by `uid:gid` with `mode`.
pub fn mkdir_owned(path: &Path, uid: u32, gid: u32, mode: u32) {
    fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// `chown -R uid:gid path`.
pub fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    if path.is_dir() && !path.is_symlink() {
        for entry in fs::read_dir(path).expect("read_dir") {
            chown_tree(&entry.expect("dir entry").path(), uid, gid);
        }
    }
}

/// Panic with a hint if an unpacked or installed binary is missing.
pub fn require_binary(path: &Path) {
    assert!(
        path.is_file(),
        "{} is missing: run scripts/install-test-deps.sh (as root)",
        path.display()
    );
}

/// Panic with a clear message unless we are root: Cyrus, Courier and
/// Mailutils need it (chown to service users, namespaces, setuid).
pub fn require_root(what: &str) {
    let euid = run_ok(Command::new("id").arg("-u"), "id -u");
    assert_eq!(euid.trim(), "0", "{what} needs root (we run as uid {euid})");
}

/// Run a helper program to completion, panicking with its output if it
/// fails. Returns stdout.
pub fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what} ({cmd:?}): {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `program` with `input` on stdin (written from a thread so a full pipe
/// cannot deadlock); panics on failure.
pub fn run_with_stdin(cmd: &mut Command, input: &[u8], what: &str) {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let mut stdin = child.stdin.take().expect("stdin");
    let data = input.to_vec();
    let writer = thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().expect("wait");
    let written = writer.join().expect("stdin writer");
    assert!(
        out.status.success() && written.is_ok(),
        "{what} failed ({}, stdin: {written:?}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deliver by logging in as the user over IMAP and APPENDing to INBOX with
/// a synchronising literal (not every server has LITERAL+).
pub fn deliver_by_append(imap_port: u16, user: &str, pass: &str, message: &[u8]) {
    let mut imap = Imap::connect_only(imap_port);
    imap.command(&format!("LOGIN {} {}", imap_quote(user), imap_quote(pass)))
        .unwrap_or_else(|e| panic!("LOGIN {user} to deliver: {e}"));
    if let Err(e) = imap.append_synchronizing("INBOX", message) {
        panic!(
            "APPEND to {user}'s INBOX refused: {e}\nmessage: {:?}",
            String::from_utf8_lossy(message)
        );
    }
    imap.logout();
}

/// Convert bare LF to CRLF (keeps CRLF and bare CR), as Dovecot sends.
pub fn lf_to_crlf(message: &[u8]) -> Vec<u8> {
    to_crlf(message)
}

// ---------------------------------------------------------------------------
// IMAP client additions (kept here so the shared harness file stays as is)
// ---------------------------------------------------------------------------

impl Imap {
    /// APPEND `message` to `mailbox` with a synchronising literal (RFC 3501
    /// §7.5: wait for "+" before sending the bytes). Err(tagged text or
    /// the refusal) if the server says NO/BAD.
    pub fn append_synchronizing(&mut self, mailbox: &str, message: &[u8]) -> Result<(), String> {
        self.tag += 1;
        let tag = format!("t{} ", self.tag);
        let head = format!(
            "{tag}APPEND {} {{{}}}\r\n",
            imap_quote(mailbox),
            message.len()
        );
        self.stream.write_all(head.as_bytes()).expect("IMAP write");
        loop {
            let line = self.read_response_line();
            if line.starts_with(b"+") {
                break;
            }
            if let Some(rest) = line.strip_prefix(tag.as_bytes()) {
                return Err(String::from_utf8_lossy(rest).into_owned());
            }
        }
        let mut body = message.to_vec();
        body.extend_from_slice(b"\r\n");
        self.stream.write_all(&body).expect("IMAP write");
        loop {
            let line = self.read_response_line();
            if let Some(rest) = line.strip_prefix(tag.as_bytes()) {
                let text = String::from_utf8_lossy(rest).into_owned();
                return if text.starts_with("OK") {
                    Ok(())
                } else {
                    Err(text)
                };
            }
        }
    }

    /// AUTHENTICATE PLAIN (RFC 4616) without an initial response, so it
    /// also works where SASL-IR is not offered. Ok(every line the server
    /// sent after the credentials, raw with its line ending, the tagged OK
    /// last: Mailutils ends that one with a bare LF) or Err(tagged text).
    pub fn authenticate_plain(&mut self, user: &str, pass: &str) -> Result<Vec<Vec<u8>>, String> {
        self.tag += 1;
        let tag = format!("t{} ", self.tag);
        self.stream
            .write_all(format!("{tag}AUTHENTICATE PLAIN\r\n").as_bytes())
            .expect("IMAP write");
        let mut lines = Vec::new();
        let mut sent = false;
        loop {
            let mut raw = Vec::new();
            let n = self.reader.read_until(b'\n', &mut raw).expect("IMAP read");
            assert!(n > 0, "IMAP connection closed during AUTHENTICATE");
            if raw.starts_with(b"+") && !sent {
                let mut creds = vec![0u8];
                creds.extend_from_slice(user.as_bytes());
                creds.push(0);
                creds.extend_from_slice(pass.as_bytes());
                self.stream
                    .write_all(format!("{}\r\n", base64(&creds)).as_bytes())
                    .expect("IMAP write");
                sent = true;
                continue;
            }
            if let Some(rest) = raw.strip_prefix(tag.as_bytes()) {
                let text = String::from_utf8_lossy(rest).into_owned();
                return if text.starts_with("OK") {
                    lines.push(raw);
                    Ok(lines)
                } else {
                    Err(text)
                };
            }
            lines.push(raw);
        }
    }
}
