//! popbridge against Dovecot's own POP3 server, in one run, on loopback.
//!
//! One private Dovecot serves both sides: its POP3 port directly ("native")
//! and, through popbridge, its IMAP port. Mailboxes are written straight into
//! Maildir `new/` (named as Dovecot's own delivery names them, with `S=` and
//! `W=` sizes), once per run. Every timed workload runs against both sides,
//! alternating, several times; the table shows medians and popbridge/native.
//!
//! ```text
//! cargo bench --bench pop3_bench -- [--quick] [--reps N] [--scenario NAME[,NAME...]]
//! ```
//!
//! Scenarios: `bulk`, `poll`, `many`, `memory` (= `retr-memory` + `idle`).
//! See docs/BENCHMARKS.md for what each measures.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

// The integration tests' harness (tests/it/common); the benchmark uses a
// few of its helpers, the tests (where unused ones are caught) all of them.
#[allow(dead_code)]
#[path = "../tests/it/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::fs;
use std::future::Future;
use std::net::Ipv4Addr;
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Dovecot, DovecotOptions, Popbridge};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Every benchmark account's password.
const PASSWORD: &str = "secret";

/// Longest any one client session may take before it counts as an error.
const SESSION_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest wait for the greeting after connecting. A connection whose final
/// handshake ACK the server dropped (accept queue full) looks established
/// to the client but never gets a greeting; real clients give up too.
const GREETING_TIMEOUT: Duration = Duration::from_secs(15);

/// The benchmark client's read buffer per connection.
const CLIENT_BUFFER: usize = 64 * 1024;

/// Logins in flight at once while opening the idle sessions (the idle
/// scenario measures holding sessions, not a login storm).
const IDLE_LOGINS_IN_FLIGHT: usize = 100;

/// Settle time before reading memory figures.
const SETTLE: Duration = Duration::from_millis(500);

/// Owner of the Maildirs when the benchmark runs as root: the harness runs
/// Dovecot's mail processes as uid/gid 5000 then.
const MAIL_ID_AS_ROOT: u32 = 5000;

/// popbridge's configuration: limits well above what the benchmark opens,
/// and the admin listener (metrics: upstream logins per POP3 session).
/// Everything else, upstream session reuse included, is default.
const POPBRIDGE_CONFIG: &str = "\
[limits]
max_sessions = 20000
max_sessions_per_ip = 20000

[admin]
address = \"127.0.0.1:0\"
";

/// Idle upstream sessions per account in the many-clients scenario's second
/// popbridge: one per session of an account that runs at once (500 over 10
/// accounts), so a batch finds every session it needs in the pool.
const MANY_POOL_PER_ACCOUNT: usize = 50;

/// Sessions held open against the comparison Dovecots (one process per
/// session; the imapc bridge) in the idle scenario: a few hundred processes
/// show the cost per session without starting thousands.
const IDLE_SESSIONS_OTHERS: usize = 200;

// ---------------------------------------------------------------------------
// What to run
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Bulk,
    Poll,
    Many,
    RetrMemory,
    Idle,
}

impl Scenario {
    const ALL: [Scenario; 5] = [
        Scenario::Bulk,
        Scenario::Poll,
        Scenario::Many,
        Scenario::RetrMemory,
        Scenario::Idle,
    ];

    fn parse(name: &str) -> Result<Vec<Scenario>, String> {
        Ok(match name {
            "all" => Scenario::ALL.to_vec(),
            "bulk" => vec![Scenario::Bulk],
            "poll" => vec![Scenario::Poll],
            "many" => vec![Scenario::Many],
            "memory" => vec![Scenario::RetrMemory, Scenario::Idle],
            "retr-memory" => vec![Scenario::RetrMemory],
            "idle" => vec![Scenario::Idle],
            other => {
                return Err(format!(
                    "unknown scenario {other:?} (bulk, poll, many, memory, retr-memory, idle, all)"
                ))
            }
        })
    }
}

/// Sizes and repetitions.
#[derive(Debug, Clone)]
struct Plan {
    quick: bool,
    reps: usize,
    scenarios: Vec<Scenario>,
    /// Messages in the bulk mailbox, sizes log-uniform in `bulk_sizes`.
    bulk_messages: usize,
    bulk_sizes: (usize, usize),
    /// Mailbox sizes polled (login, STAT, UIDL, QUIT).
    poll_sizes: Vec<usize>,
    /// Concurrent sessions in the many-clients scenario.
    many_sessions: usize,
    /// Accounts those sessions (and the idle ones) spread over.
    many_users: usize,
    many_mailbox: usize,
    many_message: usize,
    /// RETRs per many-clients session.
    many_retr: usize,
    /// Concurrent RETRs of one big message.
    big_sessions: usize,
    big_message: usize,
    /// Sessions held open in the idle scenario.
    idle_sessions: usize,
    /// Which other Dovecot setups run beside Dovecot's tuned POP3 and
    /// popbridge: [`Side::Default`], [`Side::Imapc`].
    compare: Vec<Side>,
}

impl Plan {
    fn new(quick: bool, reps: Option<usize>, scenarios: Vec<Scenario>, compare: Vec<Side>) -> Plan {
        let scenarios = if scenarios.is_empty() {
            Scenario::ALL.to_vec()
        } else {
            scenarios
        };
        let full = Plan {
            quick,
            reps: reps.unwrap_or(5),
            scenarios,
            bulk_messages: 2_000,
            bulk_sizes: (1024, 1024 * 1024),
            poll_sizes: vec![10_000, 100_000],
            many_sessions: 500,
            many_users: 10,
            many_mailbox: 50,
            many_message: 10 * 1024,
            many_retr: 5,
            big_sessions: 100,
            big_message: 20 * 1024 * 1024,
            idle_sessions: 2_000,
            compare,
        };
        if !quick {
            return full;
        }
        Plan {
            reps: reps.unwrap_or(3),
            bulk_messages: 300,
            poll_sizes: vec![2_000, 20_000],
            many_sessions: 100,
            big_sessions: 20,
            idle_sessions: 300,
            ..full
        }
    }

    fn wants(&self, s: Scenario) -> bool {
        self.scenarios.contains(&s)
    }
}

const USAGE: &str = "usage: cargo bench --bench pop3_bench -- [--quick] [--reps N] \
[--scenario bulk|poll|many|memory|retr-memory|idle|all[,...]] [--compare default,imapc|all|none]
environment (the options win): POP3_BENCH_SCENARIO, POP3_BENCH_REPS, POP3_BENCH_COMPARE, \
POP3_BENCH_QUICK=1";

/// Adds the scenarios named in `list` (comma-separated) to `scenarios`.
fn add_scenarios(list: &str, scenarios: &mut Vec<Scenario>) -> Result<(), String> {
    for name in list.split(',') {
        for s in Scenario::parse(name.trim())? {
            if !scenarios.contains(&s) {
                scenarios.push(s);
            }
        }
    }
    Ok(())
}

/// The comparison Dovecots named in `list` (comma-separated).
fn parse_compare(list: &str) -> Result<Vec<Side>, String> {
    let mut sides = Vec::new();
    for name in list.split(',').map(str::trim) {
        let add: &[Side] = match name {
            "all" => &[Side::Default, Side::Imapc],
            "none" | "" => &[],
            "default" => &[Side::Default],
            "imapc" => &[Side::Imapc],
            other => {
                return Err(format!(
                    "unknown comparison {other:?} (default, imapc, all, none)"
                ))
            }
        };
        for s in add {
            if !sides.contains(s) {
                sides.push(*s);
            }
        }
    }
    Ok(sides)
}

fn parse_reps(v: &str) -> Result<usize, String> {
    v.parse::<usize>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or(format!("--reps {v:?}: need a positive number"))
}

fn parse_args() -> Result<Plan, String> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let mut quick = env("POP3_BENCH_QUICK").is_some_and(|v| v != "0");
    let mut reps = env("POP3_BENCH_REPS").map(|v| parse_reps(&v)).transpose()?;
    let mut scenarios = Vec::new();
    let mut from_args = Vec::new();
    if let Some(list) = env("POP3_BENCH_SCENARIO") {
        add_scenarios(&list, &mut scenarios)?;
    }
    let mut compare = parse_compare(&env("POP3_BENCH_COMPARE").unwrap_or("all".into()))?;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or(format!("{name} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            // `cargo bench` passes --bench to every bench binary.
            "--bench" => {}
            "--quick" => quick = true,
            "--reps" => reps = Some(parse_reps(&value("--reps")?)?),
            "--scenario" => add_scenarios(&value("--scenario")?, &mut from_args)?,
            "--compare" => compare = parse_compare(&value("--compare")?)?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if !from_args.is_empty() {
        scenarios = from_args;
    }
    Ok(Plan::new(quick, reps, scenarios, compare))
}

// ---------------------------------------------------------------------------
// Mail
// ---------------------------------------------------------------------------

fn poll_user(size: usize) -> String {
    format!("poll{size}")
}

fn many_user(i: usize) -> String {
    format!("many{i}")
}

/// Deterministic pseudo-random numbers (xorshift64*).
struct Rng(u64);

impl Rng {
    /// Seeded from a name (FNV-1a), so every mailbox has its own sequence.
    fn for_name(name: &str) -> Rng {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        Rng(h | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Log-uniform in [min, max].
    fn log_uniform(&mut self, min: usize, max: usize) -> usize {
        let (lo, hi) = ((min as f64).ln(), (max as f64).ln());
        ((lo + self.unit() * (hi - lo)).exp().round() as usize).clamp(min, max)
    }
}

/// Body text alphabet. No line starts with '.', so POP3 sends every message
/// without dot-stuffing and a RETR answer is exactly LIST's size + ".\r\n".
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
/// Body line length (as base64 attachments have).
const LINE: usize = 76;

/// A message of about `size` octets in CRLF form, stored with bare LF as
/// Dovecot stores mail.
fn message(user: &str, n: usize, size: usize, rng: &mut Rng) -> Vec<u8> {
    let mut m = format!(
        "From: Bench Sender <sender@example.org>\n\
         To: {user} <{user}@example.net>\n\
         Subject: benchmark message {n} for {user}\n\
         Date: Mon, 1 Jan 2024 12:00:00 +0000\n\
         Message-ID: <bench-{user}-{n}@popbridge.test>\n\
         MIME-Version: 1.0\n\
         Content-Type: text/plain; charset=us-ascii\n\
         \n"
    )
    .into_bytes();
    m.reserve(size);
    let mut crlf_len = m.len() + m.iter().filter(|&&b| b == b'\n').count();
    let (mut bits, mut left) = (0u64, 0);
    while crlf_len < size {
        let len = (size - crlf_len).saturating_sub(2).clamp(1, LINE);
        for _ in 0..len {
            if left == 0 {
                bits = rng.next();
                left = 10;
            }
            m.push(ALPHABET[(bits & 63) as usize]);
            bits >>= 6;
            left -= 1;
        }
        m.push(b'\n');
        crlf_len += len + 2;
    }
    m
}

/// Writes messages straight into Maildir `new/`, named like Dovecot's own
/// deliveries: `S=` is the file size and `W=` the CRLF size, so Dovecot
/// knows a message's POP3 size without reading it.
struct MailFiller {
    /// uid/gid to own the files when running as root.
    owner: Option<(u32, u32)>,
    stamp: u64,
    seq: u64,
    files: u64,
    octets: u64,
}

/// What a mailbox holds, for checking what the servers report.
#[derive(Debug, Clone, Copy, Default)]
struct Expected {
    messages: usize,
    octets: u64,
}

impl MailFiller {
    fn new() -> MailFiller {
        // Our own process directory is owned by our effective user.
        let root = std::os::unix::fs::MetadataExt::uid(
            &std::fs::metadata("/proc/self").expect("stat /proc/self"),
        ) == 0;
        MailFiller {
            owner: root.then_some((MAIL_ID_AS_ROOT, MAIL_ID_AS_ROOT)),
            stamp: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1_700_000_000, |d| d.as_secs()),
            seq: 0,
            files: 0,
            octets: 0,
        }
    }

    fn own(&self, path: &Path) {
        if let Some((uid, gid)) = self.owner {
            chown(path, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
        }
    }

    /// Creates `user`'s home and Maildir (cur, new, tmp).
    fn maildir(&self, dovecot: &Dovecot, user: &str) -> PathBuf {
        let home = dovecot.dir.path().join("mail").join(user);
        let maildir = home.join("Maildir");
        for dir in [
            home.clone(),
            maildir.clone(),
            maildir.join("cur"),
            maildir.join("new"),
            maildir.join("tmp"),
        ] {
            fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            self.own(&dir);
        }
        maildir
    }

    /// Writes one message; returns its CRLF size (what LIST reports).
    fn deliver(&mut self, maildir: &Path, message: &[u8]) -> u64 {
        let vsize = (message.len() + message.iter().filter(|&&b| b == b'\n').count()) as u64;
        let name = format!(
            "{}.M{}P{}.popbridge-bench,S={},W={vsize}",
            self.stamp,
            self.seq,
            std::process::id(),
            message.len()
        );
        self.seq += 1;
        let path = maildir.join("new").join(name);
        fs::write(&path, message).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        self.own(&path);
        self.files += 1;
        self.octets += message.len() as u64;
        vsize
    }

    /// Fills `user`'s mailbox with `count` messages of sizes from `size`.
    fn fill(
        &mut self,
        dovecot: &Dovecot,
        user: &str,
        count: usize,
        mut size: impl FnMut(&mut Rng) -> usize,
    ) -> Expected {
        let maildir = self.maildir(dovecot, user);
        let mut rng = Rng::for_name(user);
        let mut expected = Expected::default();
        for n in 0..count {
            let len = size(&mut rng);
            let m = message(user, n, len, &mut rng);
            expected.octets += self.deliver(&maildir, &m);
            expected.messages += 1;
        }
        expected
    }
}

// ---------------------------------------------------------------------------
// POP3 client
// ---------------------------------------------------------------------------

type Res<T> = Result<T, String>;

/// A lean async POP3 client: it checks status lines and counts octets, and
/// does no per-byte work on message bodies.
struct Client {
    io: BufReader<TcpStream>,
    line: Vec<u8>,
}

impl Client {
    async fn connect(port: u16) -> Res<Client> {
        let connect = async {
            let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                .await
                .map_err(|e| format!("connect to port {port}: {e}"))?;
            stream
                .set_nodelay(true)
                .map_err(|e| format!("TCP_NODELAY: {e}"))?;
            let mut c = Client {
                io: BufReader::with_capacity(CLIENT_BUFFER, stream),
                line: Vec::with_capacity(256),
            };
            c.status("greeting").await?;
            Ok(c)
        };
        tokio::time::timeout(GREETING_TIMEOUT, connect)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "connected to port {port} but no greeting within {GREETING_TIMEOUT:?}"
                ))
            })
    }

    async fn send(&mut self, bytes: &[u8], what: &str) -> Res<()> {
        self.io
            .get_mut()
            .write_all(bytes)
            .await
            .map_err(|e| format!("{what}: {e}"))
    }

    async fn read_line(&mut self, what: &str) -> Res<()> {
        self.line.clear();
        let n = self
            .io
            .read_until(b'\n', &mut self.line)
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        if n == 0 || !self.line.ends_with(b"\n") {
            return Err(format!("{what}: connection closed"));
        }
        Ok(())
    }

    /// Reads a status line; an error unless it is +OK.
    async fn status(&mut self, what: &str) -> Res<()> {
        self.read_line(what).await?;
        if self.line.starts_with(b"+OK") {
            Ok(())
        } else {
            Err(format!(
                "{what}: {}",
                String::from_utf8_lossy(&self.line).trim_end()
            ))
        }
    }

    async fn cmd(&mut self, cmd: &str) -> Res<()> {
        self.send(format!("{cmd}\r\n").as_bytes(), cmd).await?;
        self.status(cmd).await
    }

    async fn login(&mut self, user: &str) -> Res<()> {
        self.cmd(&format!("USER {user}")).await?;
        self.cmd(&format!("PASS {PASSWORD}"))
            .await
            .map_err(|e| format!("{user}: {e}"))
    }

    /// STAT as (messages, octets).
    async fn stat(&mut self) -> Res<(usize, u64)> {
        self.cmd("STAT").await?;
        let text = String::from_utf8_lossy(&self.line);
        let mut it = text.split_whitespace().skip(1);
        match (
            it.next().and_then(|s| s.parse().ok()),
            it.next().and_then(|s| s.parse().ok()),
        ) {
            (Some(n), Some(o)) => Ok((n, o)),
            _ => Err(format!("STAT: unparsable {:?}", text.trim_end())),
        }
    }

    /// Calls `each` with every line of a multi-line answer (without CRLF);
    /// returns the number of lines.
    async fn multiline(&mut self, cmd: &str, mut each: impl FnMut(&[u8]) -> Res<()>) -> Res<usize> {
        self.cmd(cmd).await?;
        let mut lines = 0;
        loop {
            self.read_line(cmd).await?;
            if self.line == b".\r\n" {
                return Ok(lines);
            }
            let line = self.line.strip_suffix(b"\r\n").unwrap_or(&self.line);
            each(line)?;
            lines += 1;
        }
    }

    /// LIST: message sizes in message-number order.
    async fn list(&mut self) -> Res<Vec<u64>> {
        let mut sizes = Vec::new();
        self.multiline("LIST", |line| {
            let text = std::str::from_utf8(line).map_err(|_| "LIST: not UTF-8".to_string())?;
            let parsed = text
                .split_once(' ')
                .and_then(|(n, s)| Some((n.parse::<usize>().ok()?, s.parse::<u64>().ok()?)));
            match parsed {
                Some((n, size)) if n == sizes.len() + 1 => {
                    sizes.push(size);
                    Ok(())
                }
                _ => Err(format!("LIST: unexpected line {text:?}")),
            }
        })
        .await?;
        Ok(sizes)
    }

    /// UIDL: the number of listed messages.
    async fn uidl(&mut self) -> Res<usize> {
        self.multiline("UIDL", |line| {
            if line.split(|&b| b == b' ').count() == 2 {
                Ok(())
            } else {
                Err(format!(
                    "UIDL: unexpected line {:?}",
                    String::from_utf8_lossy(line)
                ))
            }
        })
        .await
    }

    /// RETR `n`, reading every octet: exactly `size` (from LIST) plus
    /// ".\r\n", which must end the answer.
    async fn retr(&mut self, n: usize, size: u64) -> Res<()> {
        let what = format!("RETR {n}");
        self.cmd(&what).await?;
        self.message(&what, size).await
    }

    /// The rest of a RETR answer after its status line: `size` octets and
    /// ".\r\n", counted and checked, not kept.
    async fn message(&mut self, what: &str, size: u64) -> Res<()> {
        let tail = drain(&mut self.io, size + 3, what).await?;
        if size >= 2 && &tail != b"\r\n.\r\n" {
            return Err(format!(
                "{what}: the answer does not end after LIST's {size} octets (tail {:?})",
                String::from_utf8_lossy(&tail)
            ));
        }
        Ok(())
    }

    async fn quit(mut self) -> Res<()> {
        self.cmd("QUIT").await
    }
}

/// Reads and drops exactly `n` octets; returns the last five.
async fn drain(io: &mut BufReader<TcpStream>, n: u64, what: &str) -> Res<[u8; 5]> {
    const TAIL: usize = 5;
    let mut left = n;
    let mut tail = [0u8; TAIL];
    while left > 0 {
        let buf = io.fill_buf().await.map_err(|e| format!("{what}: {e}"))?;
        if buf.is_empty() {
            return Err(format!(
                "{what}: connection closed with {left} octets to go"
            ));
        }
        let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let chunk = &buf[..take];
        if take >= TAIL {
            tail.copy_from_slice(&chunk[take - TAIL..]);
        } else {
            tail.rotate_left(take);
            tail[TAIL - take..].copy_from_slice(chunk);
        }
        io.consume(take);
        left -= take as u64;
    }
    Ok(tail)
}

/// Just enough IMAP to download a mailbox directly from Dovecot, as a
/// reference for what popbridge's upstream can deliver.
struct Imap {
    io: BufReader<TcpStream>,
    line: Vec<u8>,
    tag: u32,
}

impl Imap {
    async fn connect(port: u16) -> Res<Imap> {
        let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .map_err(|e| format!("IMAP connect to port {port}: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("TCP_NODELAY: {e}"))?;
        let mut imap = Imap {
            io: BufReader::with_capacity(CLIENT_BUFFER, stream),
            line: Vec::with_capacity(256),
            tag: 0,
        };
        imap.read_line("IMAP greeting").await?;
        if !imap.line.starts_with(b"* OK") {
            return Err(format!(
                "IMAP greeting: {}",
                String::from_utf8_lossy(&imap.line).trim_end()
            ));
        }
        Ok(imap)
    }

    async fn read_line(&mut self, what: &str) -> Res<()> {
        self.line.clear();
        let n = self
            .io
            .read_until(b'\n', &mut self.line)
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        if n == 0 || !self.line.ends_with(b"\n") {
            return Err(format!("{what}: connection closed"));
        }
        Ok(())
    }

    /// Sends a command and reads to its tagged reply, dropping literals;
    /// returns the literal octets read.
    async fn command(&mut self, cmd: &str) -> Res<u64> {
        self.tag += 1;
        let tag = format!("b{} ", self.tag);
        self.io
            .get_mut()
            .write_all(format!("{tag}{cmd}\r\n").as_bytes())
            .await
            .map_err(|e| format!("{cmd}: {e}"))?;
        let mut literals = 0;
        loop {
            self.read_line(cmd).await?;
            if let Some(status) = self.line.strip_prefix(tag.as_bytes()) {
                return if status.starts_with(b"OK") {
                    Ok(literals)
                } else {
                    Err(format!(
                        "{cmd}: {}",
                        String::from_utf8_lossy(status).trim_end()
                    ))
                };
            }
            let len = self
                .line
                .strip_suffix(b"}\r\n")
                .and_then(|l| l.iter().rposition(|&b| b == b'{').map(|i| &l[i + 1..]))
                .and_then(|d| std::str::from_utf8(d).ok()?.parse::<u64>().ok());
            if let Some(len) = len {
                drain(&mut self.io, len, cmd).await?;
                literals += len;
            }
        }
    }
}

/// LOGIN, SELECT, `FETCH n (BODY.PEEK[])` of every message one after the
/// other, LOGOUT; returns the octets read.
async fn imap_download(port: u16, user: String, expected: Expected) -> Res<u64> {
    let mut imap = Imap::connect(port).await?;
    imap.command(&format!("LOGIN {user} {PASSWORD}")).await?;
    imap.command("SELECT INBOX").await?;
    let mut total = 0;
    for n in 1..=expected.messages {
        total += imap.command(&format!("FETCH {n} (BODY.PEEK[])")).await?;
    }
    imap.command("LOGOUT").await?;
    if total != expected.octets {
        return Err(format!(
            "IMAP download: {total} octets, expected {}",
            expected.octets
        ));
    }
    Ok(total)
}

/// Runs `fut` with the session timeout; returns its duration too.
async fn timed<T>(fut: impl Future<Output = Res<T>>) -> (Duration, Res<T>) {
    let start = Instant::now();
    let r = tokio::time::timeout(SESSION_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {SESSION_TIMEOUT:?}")));
    (start.elapsed(), r)
}

/// Login, STAT, UIDL, QUIT.
async fn poll_session(port: u16, user: String, expected: Expected) -> Res<()> {
    let mut c = Client::connect(port).await?;
    c.login(&user).await?;
    let (n, octets) = c.stat().await?;
    if n != expected.messages || octets != expected.octets {
        return Err(format!(
            "STAT {n} {octets}, expected {} {}",
            expected.messages, expected.octets
        ));
    }
    let listed = c.uidl().await?;
    if listed != n {
        return Err(format!("UIDL listed {listed} of {n} messages"));
    }
    c.quit().await
}

/// Login, LIST, UIDL, RETR of every message, QUIT; returns the octets read.
/// `pipelined`: all RETR commands go out in one write (as mpop sends them
/// when PIPELINING is offered); otherwise each waits for the last answer.
async fn bulk_session(port: u16, user: String, expected: Expected, pipelined: bool) -> Res<u64> {
    let mut c = Client::connect(port).await?;
    c.login(&user).await?;
    let sizes = c.list().await?;
    let total: u64 = sizes.iter().sum();
    if sizes.len() != expected.messages || total != expected.octets {
        return Err(format!(
            "LIST {} messages {total} octets, expected {} {}",
            sizes.len(),
            expected.messages,
            expected.octets
        ));
    }
    let listed = c.uidl().await?;
    if listed != sizes.len() {
        return Err(format!("UIDL listed {listed} of {}", sizes.len()));
    }
    if pipelined {
        let commands: String = (1..=sizes.len()).map(|n| format!("RETR {n}\r\n")).collect();
        c.send(commands.as_bytes(), "pipelined RETRs").await?;
        for (i, &size) in sizes.iter().enumerate() {
            let what = format!("RETR {}", i + 1);
            c.status(&what).await?;
            c.message(&what, size).await?;
        }
    } else {
        for (i, &size) in sizes.iter().enumerate() {
            c.retr(i + 1, size).await?;
        }
    }
    c.quit().await?;
    Ok(total)
}

/// Login, LIST, UIDL, RETR of the messages `picks`, QUIT.
async fn many_session(port: u16, user: String, picks: Vec<usize>) -> Res<()> {
    let mut c = Client::connect(port).await?;
    c.login(&user).await?;
    let sizes = c.list().await?;
    c.uidl().await?;
    for n in picks {
        let size = *sizes
            .get(n - 1)
            .ok_or(format!("message {n} not in LIST of {}", sizes.len()))?;
        c.retr(n, size).await?;
    }
    c.quit().await
}

/// Login, STAT; the session is handed back to be held open.
async fn idle_session(port: u16, user: String) -> Res<Client> {
    let mut c = Client::connect(port).await?;
    c.login(&user).await?;
    c.stat().await?;
    Ok(c)
}

/// The outcome of sessions run at once.
struct Batch {
    wall: Duration,
    /// Durations of the sessions that succeeded.
    times: Vec<Duration>,
    errors: Vec<String>,
}

impl Batch {
    fn rate(&self) -> f64 {
        self.times.len() as f64 / self.wall.as_secs_f64()
    }
}

/// Starts `n` sessions at once and waits for all of them.
async fn concurrent<F, Fut>(n: usize, session: F) -> Batch
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Res<()>> + Send + 'static,
{
    let start = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..n {
        set.spawn(timed(session(i)));
    }
    let mut batch = Batch {
        wall: Duration::ZERO,
        times: Vec::with_capacity(n),
        errors: Vec::new(),
    };
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((t, Ok(()))) => batch.times.push(t),
            Ok((_, Err(e))) => batch.errors.push(e),
            Err(e) => batch.errors.push(format!("client task: {e}")),
        }
    }
    batch.wall = start.elapsed();
    batch
}

/// Opens `n` sessions (login, STAT) and keeps them; returns them and errors.
async fn open_idle(port: u16, n: usize, users: usize) -> (Vec<Client>, Vec<String>) {
    let gate = Arc::new(Semaphore::new(IDLE_LOGINS_IN_FLIGHT));
    let mut set = JoinSet::new();
    for i in 0..n {
        let gate = gate.clone();
        set.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore open");
            timed(idle_session(port, many_user(i % users))).await.1
        });
    }
    let mut clients = Vec::with_capacity(n);
    let mut errors = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(c)) => clients.push(c),
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(format!("client task: {e}")),
        }
    }
    (clients, errors)
}

/// QUITs every held session; returns the errors.
async fn close_idle(clients: Vec<Client>) -> Vec<String> {
    let mut set = JoinSet::new();
    for c in clients {
        set.spawn(async move { timed(c.quit()).await.1 });
    }
    let mut errors = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(format!("client task: {e}")),
        }
    }
    errors
}

// ---------------------------------------------------------------------------
// Processes: memory and CPU from /proc
// ---------------------------------------------------------------------------

/// A `/proc/PID/status` field in kB (VmRSS, VmHWM...).
fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS").unwrap_or(0)
}

fn hwm_kb(pid: u32) -> u64 {
    status_kb(pid, "VmHWM").unwrap_or(0)
}

/// Proportional set size (shared pages divided among their users).
fn pss_kb(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("Pss:")?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

/// Parent, executable name and CPU ticks (user, system) of a process.
fn proc_stat(pid: u32) -> Option<(u32, String, (u64, u64))> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (open, close) = (s.find('(')?, s.rfind(')')?);
    let comm = s[open + 1..close].to_string();
    let f: Vec<&str> = s[close + 1..].split_whitespace().collect();
    let ticks = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    Some((f.get(1)?.parse().ok()?, comm, ticks))
}

/// Children of `parent` (whose executable is `comm`, if given).
fn children(parent: u32, comm: Option<&str>) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            matches!(proc_stat(pid), Some((pp, c, _))
                if pp == parent && comm.is_none_or(|comm| c == comm))
        })
        .collect()
}

/// CPU seconds a process used so far: (user, system).
fn cpu_split(pid: u32) -> (f64, f64) {
    let hz = clock_ticks_per_second();
    proc_stat(pid).map_or((0.0, 0.0), |(_, _, (u, s))| (u as f64 / hz, s as f64 / hz))
}

/// CPU seconds a Dovecot master used so far, its own and that of the
/// children it has reaped (cutime, cstime): in the default process mode a
/// session's processes are gone by the time it is measured.
fn dovecot_cpu_reaped(pid: u32) -> f64 {
    let Ok(s) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(close) = s.rfind(')') else {
        return 0.0;
    };
    let f: Vec<&str> = s[close + 1..].split_whitespace().collect();
    let ticks: u64 = (11..=14)
        .filter_map(|i| f.get(i)?.parse::<u64>().ok())
        .sum();
    ticks as f64 / clock_ticks_per_second()
}

/// CPU seconds (user + system) a process used so far.
fn cpu_secs(pid: u32) -> f64 {
    let (user, system) = cpu_split(pid);
    user + system
}

/// Our child processes named `dovecot` (Dovecot masters).
fn dovecot_masters() -> Vec<u32> {
    children(std::process::id(), Some("dovecot"))
}

/// The pid of a Dovecot master just started: our child process named
/// `dovecot` that is not in `known`.
fn dovecot_master(known: &[u32]) -> u32 {
    for _ in 0..100 {
        if let Some(pid) = dovecot_masters().into_iter().find(|p| !known.contains(p)) {
            return pid;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("cannot find the Dovecot master process");
}

/// Total PSS (kB) of every process of a Dovecot instance.
fn dovecot_pss_all(master: u32) -> u64 {
    pss_kb(master) + children(master, None).into_iter().map(pss_kb).sum::<u64>()
}

/// Total PSS (kB) of Dovecot's `comm` processes.
fn dovecot_pss(master: u32, comm: &str) -> u64 {
    children(master, Some(comm)).into_iter().map(pss_kb).sum()
}

/// CPU seconds used so far by Dovecot (the master and every process it
/// started that is still running: with `service_count = 0` they all live
/// through the run), popbridge and this benchmark client.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    dovecot: f64,
    popbridge: f64,
    /// popbridge's system (kernel) time, part of `popbridge`.
    popbridge_sys: f64,
    client: f64,
}

impl Cpu {
    fn now(masters: &[u32], popbridge: u32) -> Cpu {
        let dovecot = masters
            .iter()
            .map(|&master| {
                dovecot_cpu_reaped(master)
                    + children(master, None)
                        .into_iter()
                        .map(cpu_secs)
                        .sum::<f64>()
            })
            .sum();
        let (user, system) = cpu_split(popbridge);
        Cpu {
            dovecot,
            popbridge: user + system,
            popbridge_sys: system,
            client: cpu_secs(std::process::id()),
        }
    }

    fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            dovecot: self.dovecot - earlier.dovecot,
            popbridge: self.popbridge - earlier.popbridge,
            popbridge_sys: self.popbridge_sys - earlier.popbridge_sys,
            client: self.client - earlier.client,
        }
    }
}

/// The kernel's TCP counters ListenOverflows and SyncookiesSent (for the
/// whole network namespace): connections a listener's full accept queue
/// turned away or answered with SYN cookies.
fn listen_counters() -> (u64, u64) {
    let text = fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.windows(2) {
        let (Some(names), Some(values)) = (
            pair[0].strip_prefix("TcpExt:"),
            pair[1].strip_prefix("TcpExt:"),
        ) else {
            continue;
        };
        let get = |key: &str| {
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(n, _)| *n == key)
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0)
        };
        return (get("ListenOverflows"), get("SyncookiesSent"));
    }
    (0, 0)
}

/// popbridge's configuration: [`POPBRIDGE_CONFIG`] and whatever
/// `POP3_BENCH_POPBRIDGE_CONFIG` adds (TOML tables other than `[limits]`,
/// `[admin]` and `[upstream]`, e.g. `[auth] max_failures_per_ip = 1000`).
fn popbridge_config() -> String {
    let extra = std::env::var("POP3_BENCH_POPBRIDGE_CONFIG").unwrap_or_default();
    format!("{POPBRIDGE_CONFIG}\n{extra}\n")
}

/// popbridge's log level: `POP3_BENCH_POPBRIDGE_LOG`, else `info` (its
/// production default).
fn popbridge_log_level() -> String {
    std::env::var("POP3_BENCH_POPBRIDGE_LOG").unwrap_or_else(|_| "info".into())
}

/// popbridge's `popbridge_upstream_sessions_total` counters by kind
/// (opened, reused, ...), read from its admin listener's `/metrics`.
fn upstream_sessions(admin_port: u16) -> HashMap<String, f64> {
    let resp = common::oauth::http_request(admin_port, "GET", "/metrics", &[], b"");
    let text = String::from_utf8_lossy(&resp.body).into_owned();
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("popbridge_upstream_sessions_total{kind=\"")?;
            let (kind, value) = rest.split_once("\"}")?;
            Some((kind.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Values with two decimals, comma-separated.
fn fmt_list(values: Option<&Vec<f64>>) -> String {
    values.map_or_else(String::new, |v| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    })
}

/// Raises the open-files limit to its hard maximum (inherited by Dovecot
/// and popbridge); returns the new soft limit.
fn raise_nofile() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0)
}

/// The kernel's clock ticks per second (`/proc/<pid>/stat` counts in
/// them), from `getconf CLK_TCK`; 100 (Linux's USER_HZ) if that fails.
fn clock_ticks_per_second() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .filter(|hz| *hz > 0.0)
            .unwrap_or(100.0)
    })
}

// ---------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Unit {
    Secs,
    Millis,
    PerSec,
    MBps,
    MiB,
    KiB,
    Count,
    /// A plain number with two decimals (per-session averages).
    Ratio,
}

/// What popbridge should reach.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// popbridge/native at most this.
    RatioAtMost(f64),
    /// popbridge/native at least this.
    RatioAtLeast(f64),
    /// popbridge's value at most this.
    AtMost(f64),
}

#[derive(Debug, Clone)]
struct Row {
    scenario: String,
    metric: String,
    native: Option<f64>,
    popbridge: Option<f64>,
    /// Dovecot's POP3 in its default process mode ([`Side::Default`]).
    default: Option<f64>,
    /// Dovecot's imapc bridge ([`Side::Imapc`]).
    imapc: Option<f64>,
    /// Smallest and largest popbridge/Dovecot ratio of one repetition (the
    /// two sides ran back to back), when there were several.
    spread: Option<(f64, f64)>,
    unit: Unit,
    target: Option<Target>,
}

impl Row {
    fn new(scenario: &str, metric: &str, unit: Unit) -> Row {
        Row {
            scenario: scenario.to_string(),
            metric: metric.to_string(),
            native: None,
            popbridge: None,
            default: None,
            imapc: None,
            spread: None,
            unit,
            target: None,
        }
    }

    fn native(mut self, v: Option<f64>) -> Row {
        self.native = v;
        self
    }

    fn popbridge(mut self, v: Option<f64>) -> Row {
        self.popbridge = v;
        self
    }

    fn spread(mut self, spread: Option<(f64, f64)>) -> Row {
        self.spread = spread;
        self
    }

    fn target(mut self, t: Target) -> Row {
        self.target = Some(t);
        self
    }

    fn ratio(&self) -> Option<f64> {
        self.ratio_of(self.popbridge)
    }

    /// `v` / Dovecot's (tuned POP3) value.
    fn ratio_of(&self, v: Option<f64>) -> Option<f64> {
        match (self.native, v) {
            (Some(n), Some(p)) if n > 0.0 => Some(p / n),
            _ => None,
        }
    }

    fn target_text(&self) -> String {
        match self.target {
            None => String::new(),
            Some(Target::RatioAtMost(x)) => format!("≤ {x}x"),
            Some(Target::RatioAtLeast(x)) => format!("≥ {x}x"),
            Some(Target::AtMost(x)) => format!("≤ {}", fmt_value(x, self.unit)),
        }
    }

    fn verdict(&self) -> &'static str {
        let met = match self.target {
            None => return "",
            Some(Target::RatioAtMost(x)) => self.ratio().map(|r| r <= x),
            Some(Target::RatioAtLeast(x)) => self.ratio().map(|r| r >= x),
            Some(Target::AtMost(x)) => self.popbridge.map(|v| v <= x),
        };
        match met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "n/a",
        }
    }
}

/// Measurements per side.
#[derive(Debug, Default)]
struct Samples(HashMap<Side, Vec<f64>>);

impl Samples {
    fn push(&mut self, side: Side, v: f64) {
        self.0.entry(side).or_default().push(v);
    }

    fn median(&self, side: Side) -> Option<f64> {
        self.0.get(&side).and_then(|v| median(v))
    }

    fn total(&self, side: Side) -> f64 {
        self.0.get(&side).map_or(0.0, |v| v.iter().sum())
    }

    /// A row with every side's totals (error counts): popbridge must have
    /// none.
    fn errors_row(&self, scenario: &str) -> Row {
        let total = |side| self.0.contains_key(&side).then(|| self.total(side));
        let mut row = Row::new(scenario, "errors (all reps)", Unit::Count)
            .native(Some(self.total(Side::Native)))
            .popbridge(Some(self.total(Side::Proxy)))
            .target(Target::AtMost(0.0));
        row.default = total(Side::Default);
        row.imapc = total(Side::Imapc);
        row
    }

    /// A row with every side's medians and the spread of popbridge's
    /// per-repetition ratio.
    fn row(&self, scenario: &str, metric: &str, unit: Unit) -> Row {
        let mut row = Row::new(scenario, metric, unit)
            .native(self.median(Side::Native))
            .popbridge(self.median(Side::Proxy));
        row.default = self.median(Side::Default);
        row.imapc = self.median(Side::Imapc);
        row.spread = self.ratio_range();
        row
    }

    /// The smallest and largest popbridge/Dovecot ratio over repetitions
    /// (sample i of one side against sample i of the other).
    fn ratio_range(&self) -> Option<(f64, f64)> {
        let (n, p) = (self.0.get(&Side::Native)?, self.0.get(&Side::Proxy)?);
        if n.len() != p.len() || n.len() < 2 {
            return None;
        }
        let ratios: Vec<f64> = n
            .iter()
            .zip(p)
            .filter(|(n, _)| **n > 0.0)
            .map(|(n, p)| p / n)
            .collect();
        let min = ratios.iter().copied().reduce(f64::min)?;
        let max = ratios.iter().copied().reduce(f64::max)?;
        Some((min, max))
    }
}

fn fmt_value(v: f64, unit: Unit) -> String {
    match unit {
        Unit::Secs if v < 1.0 => format!("{:.1} ms", v * 1000.0),
        Unit::Secs => format!("{v:.2} s"),
        Unit::Millis => format!("{v:.1} ms"),
        Unit::PerSec => format!("{v:.0} /s"),
        Unit::MBps => format!("{v:.0} MB/s"),
        Unit::MiB => format!("{v:.1} MiB"),
        Unit::KiB => format!("{v:.1} KiB"),
        Unit::Count => format!("{v:.0}"),
        Unit::Ratio => format!("{v:.2}"),
    }
}

fn cell(v: Option<f64>, unit: Unit) -> String {
    v.map_or_else(|| "–".to_string(), |v| fmt_value(v, unit))
}

fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// Nearest-rank percentile of durations, in milliseconds.
fn percentile_ms(times: &[Duration], p: f64) -> Option<f64> {
    if times.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1000.0).collect();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    Some(v[rank.min(v.len()) - 1])
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------
// The benchmark
// ---------------------------------------------------------------------------

/// Dovecot settings beyond the harness's, the same for the POP3 and the
/// IMAP side: long-lived login and mail processes that serve many clients
/// each (`service_count = 0`; the default, one process per session, would
/// need thousands of processes for the idle scenario), at least two of each
/// (one per core), room for 10,000 sessions.
fn dovecot_conf() -> String {
    let mut conf = String::from("mail_max_userip_connections = 100000\n");
    for proto in ["pop3", "imap"] {
        conf.push_str(&format!(
            "service {proto}-login {{\n  service_count = 0\n  process_min_avail = 2\n  \
             client_limit = 1000\n  process_limit = 8\n}}\n\
             service {proto} {{\n  service_count = 0\n  client_limit = 250\n  \
             process_limit = 40\n  process_min_avail = 2\n}}\n"
        ));
    }
    conf
}

/// Who serves a measured session.
/// The second Dovecot: POP3 on the first instance's Maildirs (and so its
/// index files) in Dovecot's default process mode, `service_count = 1` for
/// pop3-login and pop3: a process per login and per session. Only the
/// process limits are raised, so 500 sessions at once (and the idle
/// scenario's sessions) are not queued behind Dovecot's default limit of 100.
fn default_mode_conf(main: &Dovecot) -> String {
    format!(
        "mail_location = maildir:{}/mail/%u/Maildir\n\
         mail_max_userip_connections = 100000\n\
         service pop3-login {{\n  process_limit = 1500\n}}\n\
         service pop3 {{\n  process_limit = 1500\n}}\n\
         service auth {{\n  client_limit = 5000\n}}\n\
         service anvil {{\n  client_limit = 5000\n}}\n",
        main.dir.path().display()
    )
}

/// The third Dovecot: Dovecot's POP3-over-IMAP bridge as its documentation
/// sets it up. The password is checked by logging in to the first
/// instance's IMAP server (passdb imap); the pop3 process reads the mailbox
/// from that IMAP server (`mail_location = imapc:`, keeping its own index
/// under `home`), with `imapc_features = rfc822.size` so sizes come from
/// the server instead of from downloading every message. Its harness
/// passwd-file is empty, so every login reaches passdb imap. Same
/// long-lived processes as the tuned instance.
fn imapc_conf(main: &Dovecot, home: &Path) -> String {
    let meta = fs::metadata("/proc/self").expect("stat /proc/self");
    let (uid, gid) = if std::os::unix::fs::MetadataExt::uid(&meta) == 0 {
        (MAIL_ID_AS_ROOT, MAIL_ID_AS_ROOT)
    } else {
        (
            std::os::unix::fs::MetadataExt::uid(&meta),
            std::os::unix::fs::MetadataExt::gid(&meta),
        )
    };
    let port = main.imap_port;
    format!(
        "mail_location = imapc:~/imapc\n\
         imapc_host = 127.0.0.1\n\
         imapc_port = {port}\n\
         imapc_features = rfc822.size\n\
         passdb {{\n  driver = imap\n  args = host=127.0.0.1 port={port}\n  \
         default_fields = userdb_imapc_user=%u userdb_imapc_password=%w \
         userdb_uid={uid} userdb_gid={gid} userdb_home={home}/%u\n}}\n\
         userdb {{\n  driver = prefetch\n}}\n\
         service auth {{\n  client_limit = 5000\n}}\n{}",
        dovecot_conf(),
        home = home.display()
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Side {
    /// Dovecot's own POP3 server, tuned (long-lived processes): the
    /// baseline every ratio is taken against.
    Native,
    /// popbridge in front of the same Dovecot's IMAP server.
    Proxy,
    /// Dovecot's own POP3 on the same Maildirs in Dovecot's default mode:
    /// one login and one pop3 process per session (a second instance).
    Default,
    /// Dovecot's POP3-over-IMAP bridge: a third instance whose pop3 reads
    /// the first one's IMAP server (`mail_location = imapc:`, passdb imap).
    Imapc,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Native => "Dovecot POP3",
            Side::Proxy => "popbridge",
            Side::Default => "Dovecot POP3 (1 process/session)",
            Side::Imapc => "Dovecot imapc bridge",
        }
    }
}

/// A comparison Dovecot ([`Side::Default`], [`Side::Imapc`]).
struct Other {
    dovecot: Dovecot,
    /// Its master process.
    master: u32,
}

struct Bench {
    plan: Plan,
    rt: Runtime,
    dovecot: Dovecot,
    master: u32,
    /// The comparison Dovecots the plan asks for.
    others: HashMap<Side, Other>,
    expected: HashMap<String, Expected>,
    config_path: PathBuf,
    _config_dir: tempfile::TempDir,
    rows: Vec<Row>,
    notes: Vec<String>,
    /// /proc/loadavg when the run began (other work on the machine skews
    /// the results).
    load_at_start: String,
}

impl Bench {
    fn popbridge(&self) -> Popbridge {
        let config = self.config_path.to_str().expect("UTF-8 temp path");
        let pb = Popbridge::start_with_log(
            self.dovecot.imap_port,
            &["--config", config],
            &popbridge_log_level(),
        );
        std::thread::sleep(Duration::from_millis(100));
        pb
    }

    /// A popbridge with its own configuration file holding `config`.
    fn popbridge_with(&self, config: &str) -> Popbridge {
        let path = self.config_path.with_file_name("popbridge-variant.toml");
        fs::write(&path, config).expect("write popbridge config");
        let path = path.to_str().expect("UTF-8 temp path");
        let pb = Popbridge::start_with_log(
            self.dovecot.imap_port,
            &["--config", path],
            &popbridge_log_level(),
        );
        std::thread::sleep(Duration::from_millis(100));
        pb
    }

    /// Notes warnings and errors from a popbridge log, then stops it. With
    /// `POP3_BENCH_KEEP_LOGS` set, the log is kept in the target folder.
    fn retire(&mut self, pb: Popbridge, label: &str) {
        let log = pb.log();
        if std::env::var_os("POP3_BENCH_KEEP_LOGS").is_some() {
            let name = format!(
                "pop3_bench-popbridge-{}.log",
                label.replace([' ', ','], "_")
            );
            let saved = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
            if fs::write(&saved, &log).is_ok() {
                eprintln!("popbridge's log ({label}): {}", saved.display());
            }
        }
        let bad: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        if !bad.is_empty() {
            let mut note = format!(
                "popbridge ({label}) logged {} warnings/errors, e.g.:",
                bad.len()
            );
            for l in bad.iter().take(3) {
                note.push_str(&format!("\n    {l}"));
            }
            self.notes.push(note);
        }
        drop(pb);
    }

    fn expected(&self, user: &str) -> Expected {
        self.expected[user]
    }

    fn port(&self, side: Side, pb: &Popbridge) -> u16 {
        match side {
            Side::Native => self.dovecot.pop3_port,
            Side::Proxy => pb.port,
            other => self.others[&other].dovecot.pop3_port,
        }
    }

    /// Every side that runs: Dovecot's tuned POP3, popbridge, then the
    /// comparison Dovecots.
    fn sides(&self) -> Vec<Side> {
        let mut sides = vec![Side::Native, Side::Proxy];
        sides.extend(
            self.plan
                .compare
                .iter()
                .filter(|s| self.others.contains_key(s)),
        );
        sides
    }

    /// The comparison sides only.
    fn other_sides(&self) -> Vec<Side> {
        self.sides().into_iter().skip(2).collect()
    }

    /// The Dovecot masters whose processes serve `side`: the imapc bridge
    /// uses the first instance's IMAP server too.
    fn masters(&self, side: Side) -> Vec<u32> {
        match side {
            Side::Native | Side::Proxy => vec![self.master],
            Side::Default => vec![self.others[&side].master],
            Side::Imapc => vec![self.others[&side].master, self.master],
        }
    }

    /// CPU used so far by the Dovecot processes serving `side`, popbridge
    /// and this client.
    fn cpu(&self, side: Side, pb: &Popbridge) -> Cpu {
        Cpu::now(&self.masters(side), pb.pid())
    }

    fn note_errors(&mut self, what: &str, side: Side, errors: &[String]) {
        if !errors.is_empty() {
            self.notes.push(format!(
                "{what}: {} errors against {}; first: {}",
                errors.len(),
                side.name(),
                errors[0]
            ));
        }
    }

    fn fill(&mut self) {
        let plan = self.plan.clone();
        let started = Instant::now();
        let mut filler = MailFiller::new();
        let mut users: Vec<(String, Expected)> = Vec::new();
        if plan.wants(Scenario::Bulk) {
            let (lo, hi) = plan.bulk_sizes;
            let e = filler.fill(&self.dovecot, "bulk", plan.bulk_messages, |r| {
                r.log_uniform(lo, hi)
            });
            users.push(("bulk".into(), e));
        }
        if plan.wants(Scenario::Poll) {
            for &n in &plan.poll_sizes {
                let user = poll_user(n);
                let e = filler.fill(&self.dovecot, &user, n, |r| r.log_uniform(1024, 3072));
                users.push((user, e));
            }
        }
        if plan.wants(Scenario::Many) || plan.wants(Scenario::Idle) {
            for i in 0..plan.many_users {
                let user = many_user(i);
                let size = plan.many_message;
                let e = filler.fill(&self.dovecot, &user, plan.many_mailbox, |r| {
                    size * 3 / 4 + (r.next() % (size as u64 / 2)) as usize
                });
                users.push((user, e));
            }
        }
        if plan.wants(Scenario::RetrMemory) {
            let size = plan.big_message;
            let e = filler.fill(&self.dovecot, "big", 1, |_| size);
            users.push(("big".into(), e));
        }
        for (user, e) in users {
            self.expected.insert(user, e);
        }
        eprintln!(
            "filled {} messages ({:.0} MB on disk) in {:.1} s",
            filler.files,
            filler.octets as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
    }

    // -- 1. bulk download ---------------------------------------------------

    fn bulk(&mut self) {
        let n = self.plan.bulk_messages;
        let name = format!("1. bulk download ({} messages)", thousands(n));
        let expected = self.expected("bulk");
        let pb = self.popbridge();
        // Untimed warm-up: the first session moves new/ to cur/, builds the
        // index and sets \Seen on every message (Maildir renames); the imapc
        // bridge builds its own index.
        for side in self.sides() {
            let port = self.port(side, &pb);
            let (_, r) =
                self.rt
                    .block_on(timed(bulk_session(port, "bulk".into(), expected, false)));
            if let Err(e) = r {
                self.note_errors("bulk warm-up", side, &[e]);
            }
        }
        let mut times = Samples::default();
        let mut piped = Samples::default();
        let mut cpu_dovecot = Samples::default();
        let mut cpu_pb = Samples::default();
        let mut cpu_pb_sys = Samples::default();
        let mut cpu_client = Samples::default();
        let mut imap = Vec::new();
        for rep in 0..self.plan.reps {
            let port = self.dovecot.imap_port;
            let (t, r) = self
                .rt
                .block_on(timed(imap_download(port, "bulk".into(), expected)));
            match r {
                Ok(_) => imap.push(t.as_secs_f64()),
                Err(e) => self.notes.push(format!("bulk over IMAP: {e}")),
            }
            for pipelined in [false, true] {
                for side in self.sides() {
                    let port = self.port(side, &pb);
                    let before = self.cpu(side, &pb);
                    let (t, r) = self.rt.block_on(timed(bulk_session(
                        port,
                        "bulk".into(),
                        expected,
                        pipelined,
                    )));
                    let cpu = self.cpu(side, &pb).since(before);
                    eprintln!(
                        "bulk rep {}/{}{}: {} {:.2} s",
                        rep + 1,
                        self.plan.reps,
                        if pipelined { " (pipelined)" } else { "" },
                        side.name(),
                        t.as_secs_f64()
                    );
                    if let Err(e) = r {
                        self.note_errors("bulk", side, &[e]);
                        continue;
                    }
                    if pipelined {
                        piped.push(side, t.as_secs_f64());
                        continue;
                    }
                    times.push(side, t.as_secs_f64());
                    cpu_dovecot.push(side, cpu.dovecot);
                    cpu_client.push(side, cpu.client);
                    if side == Side::Proxy {
                        cpu_pb.push(side, cpu.popbridge);
                        cpu_pb_sys.push(side, cpu.popbridge_sys);
                    }
                }
            }
        }
        let mb = expected.octets as f64 / 1e6;
        let rate = |t: Option<f64>| t.map(|t| mb / t);
        self.rows.push(
            times
                .row(
                    &name,
                    "session time, one RETR at a time (median)",
                    Unit::Secs,
                )
                .target(Target::RatioAtMost(1.15)),
        );
        self.rows.push(
            piped
                .row(&name, "session time, RETRs pipelined (median)", Unit::Secs)
                .target(Target::RatioAtMost(1.0)),
        );
        let mut row = Row::new(&name, &format!("throughput ({mb:.0} MB)"), Unit::MBps)
            .native(rate(times.median(Side::Native)))
            .popbridge(rate(times.median(Side::Proxy)));
        row.default = rate(times.median(Side::Default));
        row.imapc = rate(times.median(Side::Imapc));
        self.rows.push(row);
        self.rows
            .push(cpu_dovecot.row(&name, "CPU: Dovecot (all processes)", Unit::Secs));
        self.rows
            .push(cpu_pb.row(&name, "CPU: popbridge", Unit::Secs));
        self.rows.push(cpu_pb_sys.row(
            &name,
            "CPU: popbridge, of which system (kernel)",
            Unit::Secs,
        ));
        self.rows
            .push(cpu_client.row(&name, "CPU: benchmark client", Unit::Secs));
        self.rows.push(
            Row::new(
                &name,
                "reference: Dovecot IMAP directly, FETCH BODY.PEEK[] one by one",
                Unit::Secs,
            )
            .native(median(&imap)),
        );
        self.retire(pb, "bulk");
    }

    // -- 2. polls -----------------------------------------------------------

    fn poll(&mut self) {
        for n in self.plan.poll_sizes.clone() {
            self.poll_one(n);
        }
    }

    fn poll_one(&mut self, n: usize) {
        let name = format!("2. poll {} messages", thousands(n));
        let user = poll_user(n);
        let expected = self.expected(&user);
        let native = self.dovecot.pop3_port;
        let run = |bench: &mut Bench, port: u16, side: Side, what: &str| -> Option<f64> {
            let (t, r) = bench
                .rt
                .block_on(timed(poll_session(port, user.clone(), expected)));
            eprintln!("poll {n} {what}: {} {:.3} s", side.name(), t.as_secs_f64());
            match r {
                Ok(()) => Some(t.as_secs_f64()),
                Err(e) => {
                    bench.note_errors(&format!("poll {n} ({what})"), side, &[e]);
                    None
                }
            }
        };
        let index_build = run(self, native, Side::Native, "first ever");
        let native_cold = run(self, native, Side::Native, "cold");
        let pb = self.popbridge();
        let rss0 = rss_kb(pb.pid());
        let hwm0 = hwm_kb(pb.pid());
        let pb_cold = run(self, pb.port, Side::Proxy, "cold");
        // The process-per-session Dovecot shares the first one's index, so
        // its first poll is its cold poll; the imapc bridge's first poll
        // builds its own index (reported with Dovecot's), its second is
        // its cold poll.
        let mut first =
            Row::new(&name, "first poll ever (builds the index)", Unit::Secs).native(index_build);
        let mut cold = Row::new(&name, "cold poll", Unit::Secs)
            .native(native_cold)
            .popbridge(pb_cold);
        if n == self.plan.poll_sizes.iter().copied().max().unwrap_or(n) {
            cold = cold.target(Target::RatioAtMost(1.0));
        }
        for side in self.other_sides() {
            let port = self.port(side, &pb);
            if side == Side::Imapc {
                first.imapc = run(self, port, side, "first ever");
                cold.imapc = run(self, port, side, "cold");
            } else {
                cold.default = run(self, port, side, "cold");
            }
        }
        let mut warm = Samples::default();
        let mut rss_after = Vec::new();
        for _ in 0..self.plan.reps {
            for side in self.sides() {
                let port = self.port(side, &pb);
                if let Some(t) = run(self, port, side, "warm") {
                    warm.push(side, t);
                }
            }
            rss_after.push(rss_kb(pb.pid()));
        }
        let hwm1 = hwm_kb(pb.pid());
        self.rows.push(first);
        self.rows.push(cold);
        self.rows.push(
            warm.row(&name, "warm poll (median)", Unit::Secs)
                .target(Target::RatioAtMost(0.5)),
        );
        self.rows.push(
            Row::new(&name, "popbridge peak RSS over these polls", Unit::MiB)
                .popbridge(Some(mib(hwm1.max(hwm0)))),
        );
        self.rows.push(
            Row::new(&name, "popbridge peak RSS minus RSS before", Unit::MiB)
                .popbridge(Some(mib(hwm1.saturating_sub(rss0)))),
        );
        if rss_after.len() > 1 {
            self.notes.push(format!(
                "poll {n}: popbridge VmRSS before {:.1} MiB, after each warm rep: {}",
                mib(rss0),
                rss_after
                    .iter()
                    .map(|&k| format!("{:.1}", mib(k)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        self.retire(pb, &format!("poll {n}"));
    }

    // -- 3. many clients ----------------------------------------------------

    fn many_batch(&self, port: u16) -> Batch {
        let p = self.plan.clone();
        self.rt.block_on(concurrent(p.many_sessions, move |i| {
            let picks = (0..p.many_retr)
                .map(|k| (i * 7 + k * 11) % p.many_mailbox + 1)
                .collect();
            many_session(port, many_user(i % p.many_users), picks)
        }))
    }

    fn many(&mut self) {
        let p = self.plan.clone();
        let name = format!(
            "3. many clients ({} at once; LIST, UIDL, {} RETR of ~{} KB)",
            p.many_sessions,
            p.many_retr,
            p.many_message / 1024
        );
        let pool_name = format!(
            "3. many clients, popbridge with upstream.reuse_max_per_account = {MANY_POOL_PER_ACCOUNT}"
        );
        let pb = self.popbridge();
        // A second popbridge whose pool keeps an idle upstream session for
        // every session of an account that runs at once.
        let pool_pb = self.popbridge_with(&format!(
            "{}\n[upstream]\nreuse_max_per_account = {MANY_POOL_PER_ACCOUNT}\n",
            popbridge_config()
        ));
        let admin = (pb.admin_port(), pool_pb.admin_port());
        // Untimed warm-up (index building, \Seen flags; the pools fill).
        for side in self.sides() {
            let b = self.many_batch(self.port(side, &pb));
            self.note_errors("many clients warm-up", side, &b.errors);
        }
        let b = self.many_batch(pool_pb.port);
        self.note_errors("many clients warm-up (pool)", Side::Proxy, &b.errors);
        let mut rate = Samples::default();
        let mut p50 = Samples::default();
        let mut p99 = Samples::default();
        let mut errors = Samples::default();
        let mut overflows = Samples::default();
        let mut clean_rate = Samples::default();
        let mut cpu_dovecot = Samples::default();
        let mut cpu_pb = Samples::default();
        let mut cpu_pb_sys = Samples::default();
        let mut logins = Samples::default();
        let mut reused = Samples::default();
        // The popbridge with the larger pool, against the same Dovecot
        // batches.
        let mut pool_rate = Samples::default();
        let mut pool_p99 = Samples::default();
        let mut pool_errors = Samples::default();
        let mut pool_logins = Samples::default();
        let mut pool_cpu_dovecot = Samples::default();
        let mut pool_cpu_pb = Samples::default();
        let mut rss = Vec::new();
        let mut per_rep = Vec::new();
        let sessions = p.many_sessions as f64;
        let counters0 = (upstream_sessions(admin.0), upstream_sessions(admin.1));
        for rep in 0..p.reps {
            for side in self.sides() {
                let before = listen_counters();
                let cpu0 = self.cpu(side, &pb);
                let pool0 = upstream_sessions(admin.0);
                let b = self.many_batch(self.port(side, &pb));
                let cpu = self.cpu(side, &pb).since(cpu0);
                let after = listen_counters();
                cpu_dovecot.push(side, cpu.dovecot * 1000.0 / sessions);
                if side == Side::Proxy {
                    cpu_pb.push(side, cpu.popbridge * 1000.0 / sessions);
                    cpu_pb_sys.push(side, cpu.popbridge_sys * 1000.0 / sessions);
                    let pool1 = upstream_sessions(admin.0);
                    let delta =
                        |k: &str| pool1.get(k).unwrap_or(&0.0) - pool0.get(k).unwrap_or(&0.0);
                    logins.push(side, delta("opened") / sessions);
                    reused.push(side, delta("reused") / sessions);
                }
                if b.errors.is_empty() {
                    clean_rate.push(side, b.rate());
                }
                eprintln!(
                    "many rep {}/{}: {} {:.0} sessions/s, {} errors",
                    rep + 1,
                    p.reps,
                    side.name(),
                    b.rate(),
                    b.errors.len()
                );
                rate.push(side, b.rate());
                p50.0
                    .entry(side)
                    .or_default()
                    .extend(percentile_ms(&b.times, 50.0));
                p99.0
                    .entry(side)
                    .or_default()
                    .extend(percentile_ms(&b.times, 99.0));
                errors.push(side, b.errors.len() as f64);
                overflows.push(side, after.0.saturating_sub(before.0) as f64);
                per_rep.push(format!(
                    "{} {:.0}/s ({} errors, ListenOverflows +{})",
                    side.name(),
                    b.rate(),
                    b.errors.len(),
                    after.0.saturating_sub(before.0)
                ));
                if after.1 > before.1 {
                    self.notes.push(format!(
                        "many clients rep {} ({}): the kernel sent {} SYN cookies \
                         (accept queue full; ListenOverflows +{})",
                        rep + 1,
                        side.name(),
                        after.1 - before.1,
                        after.0 - before.0
                    ));
                }
                self.note_errors(&format!("many clients rep {}", rep + 1), side, &b.errors);
            }
            rss.push(rss_kb(pb.pid()));
            let pool0 = upstream_sessions(admin.1);
            let cpu0 = self.cpu(Side::Proxy, &pool_pb);
            let b = self.many_batch(pool_pb.port);
            let cpu = self.cpu(Side::Proxy, &pool_pb).since(cpu0);
            pool_cpu_dovecot.push(Side::Proxy, cpu.dovecot * 1000.0 / sessions);
            pool_cpu_pb.push(Side::Proxy, cpu.popbridge * 1000.0 / sessions);
            let pool1 = upstream_sessions(admin.1);
            let opened = pool1.get("opened").unwrap_or(&0.0) - pool0.get("opened").unwrap_or(&0.0);
            eprintln!(
                "many rep {}/{}: popbridge (pool {MANY_POOL_PER_ACCOUNT}) {:.0} sessions/s, {} errors, {opened} upstream logins",
                rep + 1,
                p.reps,
                b.rate(),
                b.errors.len()
            );
            per_rep.push(format!(
                "popbridge (pool {MANY_POOL_PER_ACCOUNT}) {:.0}/s ({} errors)",
                b.rate(),
                b.errors.len()
            ));
            pool_rate.push(Side::Proxy, b.rate());
            pool_p99
                .0
                .entry(Side::Proxy)
                .or_default()
                .extend(percentile_ms(&b.times, 99.0));
            pool_errors.push(Side::Proxy, b.errors.len() as f64);
            pool_logins.push(Side::Proxy, opened / sessions);
            self.note_errors(
                &format!("many clients rep {} (pool)", rep + 1),
                Side::Proxy,
                &b.errors,
            );
        }
        self.rows.push(
            rate.row(&name, "sessions per second (median)", Unit::PerSec)
                .target(Target::RatioAtLeast(1.0)),
        );
        self.rows.push(clean_rate.row(
            &name,
            "sessions per second, reps without errors (median)",
            Unit::PerSec,
        ));
        self.rows
            .push(p50.row(&name, "p50 session time (median)", Unit::Millis));
        self.rows.push(
            p99.row(&name, "p99 session time (median)", Unit::Millis)
                .target(Target::RatioAtMost(1.2)),
        );
        self.rows.push(errors.errors_row(&name));
        self.rows.push(
            logins
                .row(
                    &name,
                    "popbridge: upstream IMAP logins per POP3 session (metrics: opened / sessions)",
                    Unit::Ratio,
                )
                .target(Target::AtMost(0.1)),
        );
        self.rows.push(reused.row(
            &name,
            "popbridge: upstream sessions reused per POP3 session",
            Unit::Ratio,
        ));
        self.rows.push(cpu_dovecot.row(
            &name,
            "CPU per session: Dovecot (all processes)",
            Unit::Millis,
        ));
        self.rows
            .push(cpu_pb.row(&name, "CPU per session: popbridge", Unit::Millis));
        self.rows.push(cpu_pb_sys.row(
            &name,
            "CPU per session: popbridge, of which system (kernel)",
            Unit::Millis,
        ));
        let mut row = Row::new(&name, "kernel ListenOverflows (all reps)", Unit::Count)
            .native(Some(overflows.total(Side::Native)))
            .popbridge(Some(overflows.total(Side::Proxy)));
        row.default = overflows.0.get(&Side::Default).map(|v| v.iter().sum());
        row.imapc = overflows.0.get(&Side::Imapc).map(|v| v.iter().sum());
        self.rows.push(row);
        // The larger pool, against the Dovecot batches above.
        let with_native = |mut s: Samples, from: &Samples| {
            if let Some(v) = from.0.get(&Side::Native) {
                s.0.insert(Side::Native, v.clone());
            }
            s
        };
        let pool_rate = with_native(pool_rate, &rate);
        let pool_p99 = with_native(pool_p99, &p99);
        self.rows.push(
            Row::new(&pool_name, "sessions per second (median)", Unit::PerSec)
                .native(pool_rate.median(Side::Native))
                .popbridge(pool_rate.median(Side::Proxy))
                .spread(pool_rate.ratio_range())
                .target(Target::RatioAtLeast(1.0)),
        );
        self.rows.push(
            Row::new(&pool_name, "p99 session time (median)", Unit::Millis)
                .native(pool_p99.median(Side::Native))
                .popbridge(pool_p99.median(Side::Proxy))
                .spread(pool_p99.ratio_range())
                .target(Target::RatioAtMost(1.2)),
        );
        self.rows.push(
            Row::new(&pool_name, "errors (all reps)", Unit::Count)
                .popbridge(Some(pool_errors.total(Side::Proxy)))
                .target(Target::AtMost(0.0)),
        );
        self.rows.push(
            Row::new(
                &pool_name,
                "upstream IMAP logins per POP3 session",
                Unit::Ratio,
            )
            .popbridge(pool_logins.median(Side::Proxy))
            .target(Target::AtMost(0.1)),
        );
        let pool_cpu_dovecot = with_native(pool_cpu_dovecot, &cpu_dovecot);
        self.rows.push(
            Row::new(
                &pool_name,
                "CPU per session: Dovecot (all processes)",
                Unit::Millis,
            )
            .native(pool_cpu_dovecot.median(Side::Native))
            .popbridge(pool_cpu_dovecot.median(Side::Proxy))
            .spread(pool_cpu_dovecot.ratio_range()),
        );
        self.rows.push(
            Row::new(&pool_name, "CPU per session: popbridge", Unit::Millis)
                .popbridge(pool_cpu_pb.median(Side::Proxy)),
        );
        self.notes
            .push(format!("many clients, each rep: {}", per_rep.join("; ")));
        self.notes.push(format!(
            "many clients: popbridge VmRSS after each rep: {} MiB (peak {:.1} MiB); \
             with the larger pool: {:.1} MiB (peak {:.1} MiB)",
            rss.iter()
                .map(|&k| format!("{:.1}", mib(k)))
                .collect::<Vec<_>>()
                .join(", "),
            mib(hwm_kb(pb.pid())),
            mib(rss_kb(pool_pb.pid())),
            mib(hwm_kb(pool_pb.pid()))
        ));
        self.notes.push(format!(
            "many clients: upstream logins per POP3 session, each rep: {}; with the larger pool: {}",
            fmt_list(logins.0.get(&Side::Proxy)),
            fmt_list(pool_logins.0.get(&Side::Proxy)),
        ));
        let counters = |before: &HashMap<String, f64>, port: u16| {
            let mut kinds: Vec<String> = upstream_sessions(port)
                .into_iter()
                .map(|(k, v)| format!("{k} {}", v - before.get(&k).unwrap_or(&0.0)))
                .collect();
            kinds.sort();
            kinds.join(", ")
        };
        self.notes.push(format!(
            "many clients: popbridge_upstream_sessions_total over the timed reps ({} POP3 sessions in all): \
             default pool: {}; larger pool: {}",
            p.many_sessions * p.reps,
            counters(&counters0.0, admin.0),
            counters(&counters0.1, admin.1)
        ));
        self.retire(pb, "many clients");
        self.retire(pool_pb, "many clients, larger pool");
    }

    // -- 4a. RETR of a big message, many at once ------------------------------

    fn big_batch(&self, port: u16) -> Batch {
        let expected = self.expected("big");
        self.rt
            .block_on(concurrent(self.plan.big_sessions, move |_| async move {
                let mut c = Client::connect(port).await?;
                c.login("big").await?;
                let sizes = c.list().await?;
                if sizes != [expected.octets] {
                    return Err(format!("LIST {sizes:?}, expected [{}]", expected.octets));
                }
                c.retr(1, sizes[0]).await?;
                c.quit().await
            }))
    }

    fn retr_memory(&mut self) {
        let p = self.plan.clone();
        let name = format!(
            "4. memory: {} concurrent RETRs of a {} MB message",
            p.big_sessions,
            p.big_message / (1024 * 1024)
        );
        let mut times = Samples::default();
        let mut errors = Samples::default();
        let mut base = Vec::new();
        let mut added = Vec::new();
        let mut peak = Vec::new();
        let mut after = Vec::new();
        for rep in 0..p.reps {
            // A fresh popbridge each time, so VmHWM is this run's peak.
            let pb = self.popbridge();
            let rss0 = rss_kb(pb.pid());
            for side in self.sides() {
                let b = self.big_batch(self.port(side, &pb));
                eprintln!(
                    "retr-memory rep {}/{}: {} {:.2} s, {} errors",
                    rep + 1,
                    p.reps,
                    side.name(),
                    b.wall.as_secs_f64(),
                    b.errors.len()
                );
                errors.push(side, b.errors.len() as f64);
                self.note_errors("big RETR", side, &b.errors);
                times.push(side, b.wall.as_secs_f64());
            }
            let hwm = hwm_kb(pb.pid());
            std::thread::sleep(SETTLE);
            base.push(mib(rss0));
            peak.push(mib(hwm));
            added.push(mib(hwm.saturating_sub(rss0)));
            after.push(mib(rss_kb(pb.pid())));
            self.retire(pb, "big RETR");
        }
        let mb = (p.big_sessions * p.big_message) as f64 / 1e6;
        self.rows
            .push(times.row(&name, "all RETRs done (median)", Unit::Secs));
        let mut row = Row::new(&name, &format!("throughput ({mb:.0} MB)"), Unit::MBps)
            .native(times.median(Side::Native).map(|t| mb / t))
            .popbridge(times.median(Side::Proxy).map(|t| mb / t))
            .target(Target::RatioAtLeast(0.9));
        row.default = times.median(Side::Default).map(|t| mb / t);
        row.imapc = times.median(Side::Imapc).map(|t| mb / t);
        row.spread = times.ratio_range().map(|(lo, hi)| (1.0 / hi, 1.0 / lo));
        self.rows.push(row);
        self.rows.push(errors.errors_row(&name));
        self.rows.push(
            Row::new(&name, "popbridge RSS before (median)", Unit::MiB).popbridge(median(&base)),
        );
        self.rows.push(
            Row::new(
                &name,
                "popbridge peak RSS during the RETRs (median)",
                Unit::MiB,
            )
            .popbridge(median(&peak)),
        );
        self.rows.push(
            Row::new(&name, "popbridge peak RSS added (median)", Unit::MiB)
                .popbridge(median(&added))
                .target(Target::AtMost(32.0)),
        );
        self.rows.push(
            Row::new(&name, "popbridge RSS after the sessions closed", Unit::MiB)
                .popbridge(median(&after)),
        );
        self.notes.push(format!(
            "big RETR: popbridge peak RSS added per rep: {} MiB",
            added
                .iter()
                .map(|v| format!("{v:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }

    // -- 4b. idle sessions ----------------------------------------------------

    /// Opens the idle sessions against one side, waits, calls `measure`
    /// with the number held, QUITs them all. Returns the time to open them.
    fn hold_idle(
        &mut self,
        side: Side,
        port: u16,
        n: usize,
        errors: &mut Samples,
        measure: impl FnOnce(&Bench, usize),
    ) -> Duration {
        let users = self.plan.many_users;
        let start = Instant::now();
        let (clients, open_errors) = self.rt.block_on(open_idle(port, n, users));
        let opened = start.elapsed();
        std::thread::sleep(SETTLE);
        measure(self, clients.len());
        eprintln!(
            "idle: {} held {} sessions, opened in {:.2} s",
            side.name(),
            clients.len(),
            opened.as_secs_f64()
        );
        let quit_errors = self.rt.block_on(close_idle(clients));
        errors.push(side, (open_errors.len() + quit_errors.len()) as f64);
        self.note_errors("idle login", side, &open_errors);
        self.note_errors("idle QUIT", side, &quit_errors);
        std::thread::sleep(SETTLE);
        opened
    }

    fn idle(&mut self) {
        let p = self.plan.clone();
        let name = format!(
            "4. memory: {} idle sessions (login, STAT, hold)",
            thousands(p.idle_sessions)
        );
        let mut per_session = Vec::new();
        let mut second_round = Vec::new();
        let mut leftover = Vec::new();
        let mut dovecot_per = Samples::default();
        let mut dovecot_all = Samples::default();
        let mut together = Vec::new();
        let mut open_time = Samples::default();
        let mut errors = Samples::default();
        let others_n = IDLE_SESSIONS_OTHERS.min(p.idle_sessions);
        for _ in 0..p.reps {
            let pb = self.popbridge();
            let (pid, port) = (pb.pid(), pb.port);
            // One session per account first: one-time costs (the listing
            // cache entry, lazily built runtime state) are not per-session.
            let warmup = self
                .rt
                .block_on(concurrent(p.many_users, move |i| async move {
                    idle_session(port, many_user(i)).await?.quit().await
                }));
            self.note_errors("idle warm-up", Side::Proxy, &warmup.errors);
            std::thread::sleep(SETTLE);
            let rss0 = rss_kb(pid);
            // Native, then popbridge twice on the same process: the second
            // round shows whether memory freed by the first is reused.
            let rounds = [
                (Side::Native, self.dovecot.pop3_port),
                (Side::Proxy, port),
                (Side::Proxy, port),
            ];
            let mut held_rss = Vec::new();
            for (round, (side, port)) in rounds.into_iter().enumerate() {
                let comm = if side == Side::Native { "pop3" } else { "imap" };
                let pss0 = dovecot_pss(self.master, comm);
                let all0 = dovecot_pss_all(self.master);
                let mut sample = None;
                let n = p.idle_sessions;
                let opened = self.hold_idle(side, port, n, &mut errors, |b, held| {
                    let pss = dovecot_pss(b.master, comm).saturating_sub(pss0);
                    let all = dovecot_pss_all(b.master).saturating_sub(all0);
                    sample = Some((held, pss, all, rss_kb(pid)));
                });
                let Some((held, pss, all, rss)) = sample.filter(|s| s.0 > 0) else {
                    continue;
                };
                if round < 2 {
                    open_time.push(side, opened.as_secs_f64());
                    dovecot_per.push(side, pss as f64 / held as f64);
                    dovecot_all.push(side, all as f64 / held as f64);
                }
                if side == Side::Proxy {
                    held_rss.push(rss);
                    if round == 1 {
                        let pb_per = rss.saturating_sub(rss0) as f64 / held as f64;
                        per_session.push(pb_per);
                        together.push(pb_per + all as f64 / held as f64);
                    }
                }
            }
            // The comparison Dovecots, with fewer sessions: every process
            // of the instance (and, for the imapc bridge, of the IMAP
            // server it reads) counts.
            for side in self.other_sides() {
                let masters = self.masters(side);
                let all =
                    |masters: &[u32]| masters.iter().map(|&m| dovecot_pss_all(m)).sum::<u64>();
                let all0 = all(&masters);
                let mut sample = None;
                let port = self.port(side, &pb);
                let opened = self.hold_idle(side, port, others_n, &mut errors, |_, held| {
                    sample = Some((held, all(&masters).saturating_sub(all0)));
                });
                if let Some((held, pss)) = sample.filter(|s| s.0 > 0) {
                    open_time.push(side, opened.as_secs_f64());
                    dovecot_all.push(side, pss as f64 / held as f64);
                }
            }
            if let [first, second] = held_rss[..] {
                second_round.push(mib(second) - mib(first));
            }
            leftover.push(mib(rss_kb(pid).saturating_sub(rss0)));
            self.retire(pb, "idle");
        }
        self.rows.push(
            Row::new(&name, "popbridge RSS per idle session (median)", Unit::KiB)
                .popbridge(median(&per_session))
                .target(Target::AtMost(32.0)),
        );
        self.rows
            .push(dovecot_per.row(&name, "Dovecot pop3 / imap PSS per session", Unit::KiB));
        self.rows.push(dovecot_all.row(
            &name,
            &format!(
                "Dovecot, all processes' PSS per session (comparison Dovecots: {others_n} sessions)"
            ),
            Unit::KiB,
        ));
        self.rows.push(
            Row::new(
                &name,
                "memory per session, Dovecot's processes plus popbridge",
                Unit::KiB,
            )
            .native(dovecot_all.median(Side::Native))
            .popbridge(median(&together)),
        );
        self.rows.push(open_time.row(
            &name,
            &format!("time to open all sessions (median; comparison Dovecots: {others_n})"),
            Unit::Secs,
        ));
        self.rows.push(errors.errors_row(&name));
        self.rows.push(
            Row::new(
                &name,
                "popbridge RSS held, 2nd round minus 1st (same process)",
                Unit::MiB,
            )
            .popbridge(median(&second_round)),
        );
        self.rows.push(
            Row::new(&name, "popbridge RSS growth left after all QUIT", Unit::MiB)
                .popbridge(median(&leftover)),
        );
    }

    fn dovecot_log_notes(&mut self) {
        let mut logs = vec![("Dovecot", "dovecot", self.dovecot.log())];
        for side in self.other_sides() {
            let file = match side {
                Side::Default => "dovecot-default",
                _ => "dovecot-imapc",
            };
            logs.push((side.name(), file, self.others[&side].dovecot.log()));
        }
        for (name, file, log) in logs {
            self.log_notes(name, file, &log);
        }
    }

    /// Keeps a Dovecot instance's log in the target folder and notes its
    /// errors and warnings.
    fn log_notes(&mut self, name: &str, file: &str, log: &str) {
        let saved = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pop3_bench-{file}.log"));
        if fs::write(&saved, log).is_ok() {
            eprintln!("{name}'s log: {}", saved.display());
        }
        let bad: Vec<&str> = log
            .lines()
            .filter(|l| {
                [" Error: ", " Warning: ", " Fatal: ", " Panic: "]
                    .iter()
                    .any(|k| l.contains(k))
            })
            .collect();
        if !bad.is_empty() {
            let mut note = format!("{name} logged {} errors/warnings, e.g.:", bad.len());
            for l in bad.iter().take(5) {
                note.push_str(&format!("\n    {l}"));
            }
            self.notes.push(note);
        }
    }
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

fn command_output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn machine_info() -> Vec<(String, String)> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown".into(), |(_, m)| m.trim().to_string());
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB"))
                .and_then(|k| k.trim().parse::<u64>().ok())
        })
        .map_or("unknown".into(), |k| {
            format!("{:.1} GiB", k as f64 / 1024.0 / 1024.0)
        });
    let dovecot = if Path::new("/usr/sbin/dovecot").is_file() {
        "/usr/sbin/dovecot"
    } else {
        "dovecot"
    };
    vec![
        (
            "nproc".into(),
            std::thread::available_parallelism().map_or("unknown".into(), |n| n.to_string()),
        ),
        ("CPU".into(), model),
        ("memory".into(), mem),
        (
            "kernel".into(),
            fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or("unknown".into(), |s| s.trim().to_string()),
        ),
        ("rustc".into(), command_output("rustc", &["--version"])),
        ("Dovecot".into(), command_output(dovecot, &["--version"])),
        (
            "popbridge binary".into(),
            env!("CARGO_BIN_EXE_popbridge").to_string(),
        ),
    ]
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.is_empty() {
        "cargo bench --bench pop3_bench".into()
    } else {
        format!("cargo bench --bench pop3_bench -- {}", args.join(" "))
    }
}

fn print_report(bench: &Bench, elapsed: Duration) {
    println!();
    println!("## popbridge benchmark results");
    println!();
    println!("Command: `{}`", command_line());
    println!();
    for (k, v) in machine_info() {
        println!("- {k}: {v}");
    }
    println!(
        "- load average at start / end: {} / {}",
        bench.load_at_start,
        load_average()
    );
    println!(
        "- mode: {}, {} repetitions, total run time {:.0} s",
        if bench.plan.quick { "quick" } else { "default" },
        bench.plan.reps,
        elapsed.as_secs_f64()
    );
    println!();
    let others = &bench.plan.compare;
    let mut header = String::from(
        "| Scenario | Metric | Dovecot | popbridge | popbridge / Dovecot | per-rep ratio (min–max) | Target | |",
    );
    let mut rule = String::from("|---|---|---|---|---|---|---|---|");
    for side in others {
        header.push_str(&format!(" {} (/ Dovecot) |", side.name()));
        rule.push_str("---|");
    }
    println!("{header}");
    println!("{rule}");
    let mut last = String::new();
    for row in &bench.rows {
        let scenario = if row.scenario == last {
            String::new()
        } else {
            row.scenario.clone()
        };
        last = row.scenario.clone();
        let mut line = format!(
            "| {scenario} | {} | {} | {} | {} | {} | {} | {} |",
            row.metric,
            cell(row.native, row.unit),
            cell(row.popbridge, row.unit),
            row.ratio().map_or(String::new(), |r| format!("{r:.2}x")),
            row.spread
                .map_or(String::new(), |(lo, hi)| format!("{lo:.2}–{hi:.2}x")),
            row.target_text(),
            row.verdict()
        );
        for side in others {
            let v = match side {
                Side::Default => row.default,
                _ => row.imapc,
            };
            let ratio = row
                .ratio_of(v)
                .map_or(String::new(), |r| format!(" ({r:.2}x)"));
            line.push_str(&format!(
                " {}{ratio} |",
                v.map_or(String::new(), |v| fmt_value(v, row.unit))
            ));
        }
        println!("{line}");
    }
    if !bench.notes.is_empty() {
        println!();
        println!("Notes:");
        for n in &bench.notes {
            println!("- {n}");
        }
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this
    // binary without it, and a test run must not take ten minutes.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("pop3_bench: not run under `cargo test`; use `cargo bench --bench pop3_bench`");
        return;
    }
    let plan = match parse_args() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    let nofile = raise_nofile();
    let needed = plan.idle_sessions as u64 * 2 + 1000;
    if nofile < needed {
        eprintln!(
            "warning: open-files limit {nofile} is below the {needed} the idle scenario needs"
        );
    }
    if !env!("CARGO_BIN_EXE_popbridge").contains("/release/") {
        eprintln!(
            "warning: {} is not a release build; run with `cargo bench`",
            env!("CARGO_BIN_EXE_popbridge")
        );
    }
    eprintln!("{}", command_line());
    eprintln!("plan: {plan:?}");

    let mut users = vec!["bulk".to_string(), "big".to_string()];
    users.extend(plan.poll_sizes.iter().map(|&n| poll_user(n)));
    users.extend((0..plan.many_users).map(many_user));
    let dovecot = Dovecot::start_with(DovecotOptions {
        users: users.iter().map(|u| (u.clone(), PASSWORD.into())).collect(),
        imap_capability: None,
        extra_conf: dovecot_conf(),
    });
    let master = dovecot_master(&[]);
    let config_dir = tempfile::Builder::new()
        .prefix("pbbench-")
        .tempdir()
        .expect("temp dir");
    let mut others = HashMap::new();
    for &side in &plan.compare {
        let known = dovecot_masters();
        let dovecot = match side {
            Side::Default => Dovecot::start_with(DovecotOptions {
                users: users.iter().map(|u| (u.clone(), PASSWORD.into())).collect(),
                imap_capability: None,
                extra_conf: default_mode_conf(&dovecot),
            }),
            _ => {
                // The bridge's own index, per user; its mail processes run
                // as the mail user, so the folder must be open to it.
                let home = config_dir.path().join("imapc");
                fs::create_dir(&home).expect("mkdir imapc home");
                for dir in [config_dir.path(), home.as_path()] {
                    let mode = if dir == home { 0o1777 } else { 0o755 };
                    fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(mode))
                        .expect("chmod imapc home");
                }
                Dovecot::start_with(DovecotOptions {
                    users: Vec::new(),
                    imap_capability: None,
                    extra_conf: imapc_conf(&dovecot, &home),
                })
            }
        };
        let master = dovecot_master(&known);
        eprintln!("started {} (master pid {master})", side.name());
        others.insert(side, Other { dovecot, master });
    }
    let config_path = config_dir.path().join("popbridge.toml");
    fs::write(&config_path, popbridge_config()).expect("write popbridge config");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");

    let mut bench = Bench {
        plan: plan.clone(),
        rt,
        dovecot,
        master,
        others,
        expected: HashMap::new(),
        config_path,
        _config_dir: config_dir,
        rows: Vec::new(),
        notes: Vec::new(),
        load_at_start: load_average(),
    };
    bench.fill();
    for s in Scenario::ALL {
        if !plan.wants(s) {
            continue;
        }
        let t = Instant::now();
        match s {
            Scenario::Bulk => bench.bulk(),
            Scenario::Poll => bench.poll(),
            Scenario::Many => bench.many(),
            Scenario::RetrMemory => bench.retr_memory(),
            Scenario::Idle => bench.idle(),
        }
        eprintln!("{s:?} took {:.0} s", t.elapsed().as_secs_f64());
    }
    bench.dovecot_log_notes();
    print_report(&bench, started.elapsed());
}
