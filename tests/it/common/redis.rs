//! A private `redis-server` on loopback for the tests (the shared token
//! store backend), with a minimal RESP2 client to check it and to look at
//! what popbridge stored.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{ports, read_lossy, START_TIMEOUT};

/// Read timeout of the RESP client.
const RESP_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest bulk string the RESP client reads.
const MAX_BULK: usize = 16 * 1024 * 1024;

/// Options of [`Redis::start_with`].
#[derive(Clone, Debug, Default)]
pub struct RedisOptions {
    /// `--requirepass`: clients must `AUTH` first.
    pub requirepass: Option<String>,
    /// A TLS listener too (`--tls-port`, clients not asked for a
    /// certificate): the server certificate and key PEM files. The plain
    /// port stays open for the harness's own client.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// A running redis-server (no persistence, 127.0.0.1 only, protected
/// mode). Killed on drop; its log is printed if the test is panicking.
pub struct Redis {
    pub port: u16,
    /// The TLS listener's port, with [`RedisOptions::tls`].
    pub tls_port: Option<u16>,
    pub password: Option<String>,
    child: Child,
    log_path: PathBuf,
    /// Its working directory (`--dir`), removed on drop.
    _dir: tempfile::TempDir,
}

/// A RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    /// None: the null bulk string.
    Bulk(Option<Vec<u8>>),
    /// None: the null array.
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// Bulk or simple string as text.
    pub fn as_text(&self) -> Option<String> {
        match self {
            Resp::Simple(s) => Some(s.clone()),
            Resp::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }
}

impl Redis {
    /// Start without a password.
    pub fn start() -> Redis {
        Redis::start_with(RedisOptions::default())
    }

    /// Start on an allocated port (retrying with another if it was taken
    /// meanwhile) and wait until it answers PING; panics with its log if
    /// it does not.
    pub fn start_with(opts: RedisOptions) -> Redis {
        let mut last = String::new();
        for _attempt in 0..5 {
            match Redis::try_start(&opts) {
                Ok(r) => return r,
                Err((msg, retry)) => {
                    if !retry {
                        panic!("{msg}");
                    }
                    last = msg;
                }
            }
        }
        panic!("redis-server did not start after 5 attempts; last failure:\n{last}");
    }

    fn try_start(opts: &RedisOptions) -> Result<Redis, (String, bool)> {
        let dir = tempfile::Builder::new()
            .prefix("pbredis-")
            .tempdir()
            .expect("create redis temp dir");
        let log_path = dir.path().join("redis.log");
        let log = fs::File::create(&log_path).expect("create redis.log");
        let port = ports::allocate();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--protected-mode", "yes"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--daemonize", "no"]);
        if let Some(pass) = &opts.requirepass {
            cmd.args(["--requirepass", pass]);
        }
        let tls_port = opts.tls.as_ref().map(|(cert, key)| {
            let tls_port = ports::allocate();
            cmd.args(["--tls-port", &tls_port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .args(["--tls-auth-clients", "no"]);
            tls_port
        });
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .map_err(|e| {
                (
                    format!("cannot run `redis-server` (is it installed?): {e}"),
                    false,
                )
            })?;
        let mut redis = Redis {
            port,
            tls_port,
            password: opts.requirepass.clone(),
            child,
            log_path,
            _dir: dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = redis.child.try_wait() {
                let log = redis.log();
                let retry = log.contains("Address already in use");
                return Err((format!("redis-server exited with {status}:\n{log}"), retry));
            }
            // Until it logs that it listens, the port may answer because
            // another program has it.
            if redis.log().contains("Ready to accept connections")
                && matches!(redis.try_command(&["PING"]), Ok(Resp::Simple(pong)) if pong == "PONG")
            {
                return Ok(redis);
            }
            if Instant::now() >= deadline {
                return Err((
                    format!(
                        "redis-server does not answer PING after {START_TIMEOUT:?}:\n{}",
                        redis.log()
                    ),
                    false,
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:PORT` (without the password).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis://:PASSWORD@127.0.0.1:PORT` when a password is set, else
    /// [`Redis::url`].
    pub fn url_with_password(&self) -> String {
        match &self.password {
            Some(p) => format!(
                "redis://:{}@127.0.0.1:{}",
                super::oauth::percent_encode(p),
                self.port
            ),
            None => self.url(),
        }
    }

    /// redis-server's log so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// Run one command on a new connection (after AUTH if a password is
    /// set); panics on I/O errors, returns error replies as `Resp::Error`.
    pub fn command(&self, args: &[&str]) -> Resp {
        self.try_command(args)
            .unwrap_or_else(|e| panic!("redis {:?}: {e}", args.first()))
    }

    fn try_command(&self, args: &[&str]) -> Result<Resp, String> {
        let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port))
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(RESP_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(stream);
        if let Some(pass) = &self.password {
            writer
                .write_all(&resp_encode(&["AUTH", pass]))
                .map_err(|e| e.to_string())?;
            match resp_read(&mut reader)? {
                Resp::Simple(ok) if ok == "OK" => {}
                other => return Err(format!("AUTH failed: {other:?}")),
            }
        }
        writer
            .write_all(&resp_encode(args))
            .map_err(|e| e.to_string())?;
        resp_read(&mut reader)
    }

    /// Keys matching `pattern` (KEYS; fine for a test instance), sorted.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        match self.command(&["KEYS", pattern]) {
            Resp::Array(Some(items)) => {
                let mut keys: Vec<String> = items.iter().filter_map(Resp::as_text).collect();
                keys.sort();
                keys
            }
            other => panic!("KEYS {pattern}: {other:?}"),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- redis.log ({}) ---\n{}",
                self.log_path.display(),
                self.log()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A RESP2 command: an array of bulk strings.
pub fn resp_encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Read one RESP2 reply.
pub fn resp_read(reader: &mut impl BufRead) -> Result<Resp, String> {
    let mut line = Vec::new();
    reader
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("read: {e}"))?;
    if !line.ends_with(b"\r\n") {
        return Err(format!("connection closed or bad line {line:?}"));
    }
    let text = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
    let num = || {
        text.parse::<i64>()
            .map_err(|e| format!("bad number {text:?}: {e}"))
    };
    match line[0] {
        b'+' => Ok(Resp::Simple(text)),
        b'-' => Ok(Resp::Error(text)),
        b':' => Ok(Resp::Int(num()?)),
        b'$' => {
            let n = num()?;
            if n < 0 {
                return Ok(Resp::Bulk(None));
            }
            let n = usize::try_from(n).map_err(|e| e.to_string())?;
            if n > MAX_BULK {
                return Err(format!("bulk string of {n} bytes"));
            }
            let mut data = vec![0u8; n + 2];
            reader.read_exact(&mut data).map_err(|e| e.to_string())?;
            data.truncate(n);
            Ok(Resp::Bulk(Some(data)))
        }
        b'*' => {
            let n = num()?;
            if n < 0 {
                return Ok(Resp::Array(None));
            }
            let mut items = Vec::new();
            for _ in 0..n {
                items.push(resp_read(reader)?);
            }
            Ok(Resp::Array(Some(items)))
        }
        other => Err(format!("unknown RESP type {:?}", other as char)),
    }
}
