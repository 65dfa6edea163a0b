//! Several popbridge replicas behind HAProxy, on loopback: each replica on
//! ports allocated once (so a restarted replica comes back where HAProxy
//! expects it), HAProxy sending PROXY protocol v2 and checking each
//! replica's `/readyz`. HAProxy listens on one round-robin port and on one
//! port pinned to each replica (to reach a given replica through the same
//! path); its runtime API (a unix socket) tells when a replica is up.

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{ports, read_lossy, START_TIMEOUT};

/// How often HAProxy checks each replica's `/readyz` (ms).
pub const CHECK_INTERVAL_MS: u64 = 200;

/// One popbridge process of the cluster.
pub struct Replica {
    /// Its POP3 listener (PROXY protocol from HAProxy).
    pub port: u16,
    /// Its admin listener (`/readyz`, `/metrics`).
    pub admin_port: u16,
    pub config: PathBuf,
    /// All its runs' output, appended.
    pub log_path: PathBuf,
    child: Option<Child>,
}

impl Replica {
    fn spawn(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open replica log");
        let child = Command::new(env!("CARGO_BIN_EXE_popbridge"))
            .arg("--config")
            .arg(&self.config)
            .env(
                "RUST_LOG",
                std::env::var("POPBRIDGE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn popbridge");
        self.child = Some(child);
    }

    /// Starts it and waits until `/readyz` answers 200.
    pub fn start(&mut self) {
        self.spawn();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if http_status(self.admin_port, "/readyz") == Some(200) {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("replica exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "replica not ready after {START_TIMEOUT:?}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no drain, no lease released.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the process to drain and exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "replica did not exit after SIGTERM"
                );
                thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn log(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// `/metrics` text.
    pub fn metrics(&self) -> String {
        http_get(self.admin_port, "/metrics").unwrap_or_default()
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

impl Drop for Replica {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- replica log ({}) ---\n{}",
                self.log_path.display(),
                self.log()
            );
        }
        self.kill();
    }
}

/// HAProxy in front of the replicas.
pub struct Haproxy {
    /// Round robin over every replica.
    pub port: u16,
    /// `pinned[i]` reaches replica `i` only.
    pub pinned: Vec<u16>,
    socket: PathBuf,
    log_path: PathBuf,
    child: Child,
}

impl Haproxy {
    /// Whether HAProxy's check currently sees replica `i` up.
    pub fn is_up(&self, i: usize) -> bool {
        self.server_status(i).is_some_and(|s| s.starts_with("UP"))
    }

    /// The `status` column of `show stat` for replica `i` in the round-robin
    /// backend.
    pub fn server_status(&self, i: usize) -> Option<String> {
        let text = self.runtime("show stat").ok()?;
        let name = format!("r{i}");
        text.lines().find_map(|l| {
            let cols: Vec<&str> = l.split(',').collect();
            (cols.first() == Some(&"pool") && cols.get(1) == Some(&name.as_str()))
                .then(|| cols.get(17).map(|s| s.to_string()))
                .flatten()
        })
    }

    /// The round-robin backend's connection errors, retries and
    /// redispatches so far (`econ`, `wretr`, `wredis` of `show stat`):
    /// connections a stopped replica refused that HAProxy sent elsewhere
    /// instead of failing the client.
    pub fn retries(&self) -> (u64, u64, u64) {
        let text = self.runtime("show stat").unwrap_or_default();
        let row = text
            .lines()
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|c| c.first() == Some(&"pool") && c.get(1) == Some(&"BACKEND"))
            .unwrap_or_default();
        let n = |i: usize| row.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
        (n(13), n(15), n(16))
    }

    /// Waits until HAProxy sees replica `i` up (or down, `up = false`).
    pub fn wait_for(&self, i: usize, up: bool) {
        let deadline = Instant::now() + START_TIMEOUT;
        while self.is_up(i) != up {
            assert!(
                Instant::now() < deadline,
                "HAProxy does not see replica {i} {}: {:?}\n{}",
                if up { "up" } else { "down" },
                self.server_status(i),
                read_lossy(&self.log_path)
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn runtime(&self, command: &str) -> std::io::Result<String> {
        let mut s = UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(format!("{command}\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("--- haproxy log ---\n{}", read_lossy(&self.log_path));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replicas and their load balancer.
pub struct Cluster {
    pub replicas: Vec<Replica>,
    pub haproxy: Haproxy,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// `n` replicas, each with `config` (TOML, without `[listen]` and
    /// `[admin]`, which are added: PROXY protocol from loopback, allocated
    /// ports) and started, then HAProxy, returning once it sees every
    /// replica up.
    pub fn start(n: usize, config: &str) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("pbcluster-")
            .tempdir()
            .expect("temp dir");
        let mut replicas = Vec::new();
        for i in 0..n {
            let (port, admin_port) = (ports::allocate(), ports::allocate());
            let path = dir.path().join(format!("replica{i}.toml"));
            fs::write(
                &path,
                format!(
                    "{config}\n[listen]\naddress = \"127.0.0.1:{port}\"\nproxy_protocol = true\nproxy_trusted = [\"127.0.0.1/32\"]\n\
                     [admin]\naddress = \"127.0.0.1:{admin_port}\"\n"
                ),
            )
            .expect("write replica config");
            let mut r = Replica {
                port,
                admin_port,
                config: path,
                log_path: dir.path().join(format!("replica{i}.log")),
                child: None,
            };
            r.start();
            replicas.push(r);
        }
        let haproxy = start_haproxy(dir.path(), &replicas);
        for i in 0..n {
            haproxy.wait_for(i, true);
        }
        Cluster {
            replicas,
            haproxy,
            _dir: dir,
        }
    }

    /// Every replica's log, for messages.
    pub fn logs(&self) -> String {
        self.replicas
            .iter()
            .enumerate()
            .map(|(i, r)| format!("--- replica {i} ---\n{}", r.log()))
            .collect()
    }
}

fn start_haproxy(dir: &Path, replicas: &[Replica]) -> Haproxy {
    let mut last = String::new();
    for _attempt in 0..5 {
        let port = ports::allocate();
        let pinned: Vec<u16> = replicas.iter().map(|_| ports::allocate()).collect();
        let socket = dir.join("haproxy.sock");
        let _ = fs::remove_file(&socket);
        let server = |i: usize, r: &Replica| {
            format!(
                "  server r{i} 127.0.0.1:{} send-proxy-v2 check port {} inter {CHECK_INTERVAL_MS} fall 1 rise 1\n",
                r.port, r.admin_port
            )
        };
        let mut conf = format!(
            "global\n  maxconn 2000\n  stats socket {} mode 600 level admin\n\
             defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n  \
             timeout check 1s\n  retries 3\n  option redispatch 1\n\
             backend pool\n  balance roundrobin\n  option httpchk GET /readyz\n  http-check expect status 200\n",
            socket.display()
        );
        for (i, r) in replicas.iter().enumerate() {
            conf.push_str(&server(i, r));
        }
        conf.push_str(&format!(
            "frontend all\n  bind 127.0.0.1:{port}\n  default_backend pool\n"
        ));
        for (i, r) in replicas.iter().enumerate() {
            conf.push_str(&format!(
                "backend only{i}\n  option httpchk GET /readyz\n  http-check expect status 200\n{}\
                 frontend pinned{i}\n  bind 127.0.0.1:{}\n  default_backend only{i}\n",
                server(i, r),
                pinned[i]
            ));
        }
        let conf_path = dir.join("haproxy.cfg");
        fs::write(&conf_path, conf).expect("write haproxy.cfg");
        let log_path = dir.join("haproxy.log");
        let log = fs::File::create(&log_path).expect("create haproxy.log");
        let child = Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("run haproxy (is it installed? scripts/install-test-deps.sh)");
        let mut h = Haproxy {
            port,
            pinned,
            socket,
            log_path,
            child,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = h.child.try_wait() {
                last = format!("haproxy exited with {status}:\n{}", read_lossy(&h.log_path));
                break;
            }
            if h.runtime("show info").is_ok()
                && TcpStream::connect((Ipv4Addr::LOCALHOST, h.port)).is_ok()
            {
                return h;
            }
            if Instant::now() >= deadline {
                panic!("haproxy did not start:\n{}", read_lossy(&h.log_path));
            }
            thread::sleep(Duration::from_millis(20));
        }
        if !last.contains("cannot bind") && !last.contains("Address already in use") {
            panic!("{last}");
        }
    }
    panic!("haproxy did not start after 5 attempts:\n{last}");
}

/// The status code of `GET path` on the admin port, `None` when it does not
/// answer.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let (status, _) = http(port, path)?;
    Some(status)
}

/// The body of `GET path` when the answer is 200.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    match http(port, path)? {
        (200, body) => Some(body),
        _ => None,
    }
}

fn http(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let status = line.split_whitespace().nth(1)?.parse().ok()?;
    let mut rest = String::new();
    let _ = r.read_to_string(&mut rest);
    let body = rest.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Some((status, body))
}

/// The value of a Prometheus series (`name{labels}`) in `text`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
