//! Several replicas as one service (issue 15): three popbridge processes
//! behind HAProxy (PROXY protocol v2, `/readyz` health checks), one
//! redis-server holding the shared state (`[cluster]`), one Dovecot, all on
//! loopback. The session lock holds across replicas and a replica killed
//! while holding one frees it within the lease; a brute force spread over
//! the replicas meets one budget; OAuth2 devices work on every replica with
//! one refresh; a rolling restart under polling clients loses and
//! duplicates nothing; a lease taken over while its session runs is
//! logged and the session goes on; a Redis outage fails open; `rediss://`
//! with a CA file and a TLS name; an HTTP directory routes users to two
//! Dovecots on every replica.
//!
//! Figures (sessions, errors, lease expiry, throttle counts) are printed
//! on stderr: `cargo test --test it -- cluster --nocapture`.

use crate::hardening::wait_until_stable;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::certs::Ca;
use crate::common::cluster::{metric, Cluster};
use crate::common::redis::{Redis, RedisOptions, Resp};
use crate::common::{Dovecot, DovecotOptions};
use crate::oauth::{message, pop3_fetch, Setup, ACCOUNT, CORP, CORP_DEVICES};

/// Lease of the session locks in these tests (`cluster.lock_lease_secs`).
const LEASE: Duration = Duration::from_secs(3);
const MAX_PER_USER: usize = 4;
const MAX_PER_IP: usize = 8;

/// Dovecot settings that keep failed logins fast: no 2 s failure delay and
/// no per-address auth penalty (anvil).
const FAST_FAILURES: &str = "auth_failure_delay = 0\n\
service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n";

/// The replicas' configuration: Dovecot upstream, the session lock, the
/// throttle limits above, the shared state in `redis_url`.
fn config(dovecot: &Dovecot, redis_url: &str) -> String {
    format!(
        "[upstream]\naddress = \"127.0.0.1:{}\"\ntls = \"none\"\nreuse_idle_secs = 0\n\
         [pop3]\nlock = true\n\
         [auth]\nplaintext_networks = [\"127.0.0.0/8\"]\nfailure_delay_ms = 10\n\
         max_failures_per_user = {MAX_PER_USER}\nmax_failures_per_ip = {MAX_PER_IP}\n\
         [lifecycle]\ndrain_timeout_secs = 10\n\
         [cluster]\nredis_url = \"{redis_url}\"\nlock_lease_secs = {}\n",
        dovecot.imap_port,
        LEASE.as_secs()
    )
}

fn users(names: &[&str]) -> DovecotOptions {
    DovecotOptions {
        users: names
            .iter()
            .map(|n| (n.to_string(), "secret".to_string()))
            .collect(),
        extra_conf: FAST_FAILURES.into(),
        ..DovecotOptions::default()
    }
}

/// A POP3 client that reports failures instead of panicking (for clients
/// under load, whose errors are counted).
struct Client {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Client {
    /// Connects to `port` from the loopback address `from` (HAProxy passes
    /// it on in its PROXY header) and reads the greeting.
    fn connect(port: u16, from: Ipv4Addr) -> Result<Client, String> {
        let s = connect_from(port, from).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let mut c = Client {
            w: s.try_clone().map_err(|e| e.to_string())?,
            r: BufReader::new(s),
        };
        let g = c.line()?;
        if !g.starts_with("+OK") {
            return Err(format!("greeting: {g}"));
        }
        Ok(c)
    }

    fn line(&mut self) -> Result<String, String> {
        let mut l = String::new();
        match self.r.read_line(&mut l) {
            Ok(0) => Err("connection closed".into()),
            Ok(_) => Ok(l.trim_end().to_string()),
            Err(e) => Err(format!("read: {e}")),
        }
    }

    fn cmd(&mut self, line: &str) -> Result<String, String> {
        self.w
            .write_all(format!("{line}\r\n").as_bytes())
            .map_err(|e| format!("write: {e}"))?;
        self.line()
    }

    /// A command whose `+OK` answer is followed by lines up to ".".
    fn multi(&mut self, line: &str) -> Result<Vec<String>, String> {
        let first = self.cmd(line)?;
        if !first.starts_with("+OK") {
            return Err(format!("{line}: {first}"));
        }
        let mut out = Vec::new();
        loop {
            let l = self.line()?;
            if l == "." {
                return Ok(out);
            }
            out.push(l.strip_prefix('.').map_or(l.clone(), str::to_string));
        }
    }

    /// USER + PASS; the answer to PASS.
    fn login(&mut self, user: &str, pass: &str) -> Result<String, String> {
        let r = self.cmd(&format!("USER {user}"))?;
        if !r.starts_with("+OK") {
            return Err(format!("USER: {r}"));
        }
        self.cmd(&format!("PASS {pass}"))
    }
}

/// A TCP connection to 127.0.0.1:`port` from `from`.
fn connect_from(port: u16, from: Ipv4Addr) -> std::io::Result<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.bind(SocketAddr::from((from, 0)))?;
        let stream = s
            .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .await?;
        let std = stream.into_std()?;
        std.set_nonblocking(false)?;
        Ok(std)
    })
}

fn lock_keys(redis: &Redis) -> Vec<String> {
    redis.keys("popbridge:cluster:lock:*")
}

// ---------------------------------------------------------------------------
// The session lock
// ---------------------------------------------------------------------------

/// A session through replica 0 holds alice's lock: through replicas 1 and
/// 2 she gets `-ERR [IN-USE]`; QUIT frees it at once for any replica. A
/// replica killed with SIGKILL (no release) while holding it: the lease
/// expires and another replica lets her in within the lease.
#[test]
fn cluster_lock_holds_across_replicas_and_a_killed_replicas_lease_expires() {
    let dovecot = Dovecot::start_with(users(&["alice"]));
    dovecot.deliver("alice", b"Subject: one\r\n\r\nbody\r\n");
    let redis = Redis::start();
    let mut cluster = Cluster::start(3, &config(&dovecot, &redis.url()));
    let pinned = cluster.haproxy.pinned.clone();
    let home = Ipv4Addr::new(127, 0, 0, 1);

    let mut a = Client::connect(pinned[0], home).unwrap();
    assert!(a.login("alice", "secret").unwrap().starts_with("+OK"));
    assert_eq!(lock_keys(&redis).len(), 1, "one lease in Redis");
    for &p in &pinned[1..] {
        let mut b = Client::connect(p, home).unwrap();
        let r = b.login("alice", "secret").unwrap();
        assert!(r.starts_with("-ERR [IN-USE]"), "second session: {r}");
    }
    // QUIT releases the lease before answering: another replica admits
    // her at once.
    assert!(a.cmd("QUIT").unwrap().starts_with("+OK"));
    assert!(lock_keys(&redis).is_empty(), "{:?}", lock_keys(&redis));
    let mut c = Client::connect(pinned[1], home).unwrap();
    assert!(c.login("alice", "secret").unwrap().starts_with("+OK"));

    // SIGKILL the replica holding it: the lease stays until it expires.
    cluster.replicas[1].kill();
    let killed = Instant::now();
    let key = lock_keys(&redis);
    assert_eq!(key.len(), 1, "the killed replica's lease is still there");
    let ttl = match redis.command(&["PTTL", &key[0]]) {
        Resp::Int(ms) => ms,
        other => panic!("PTTL: {other:?}"),
    };
    assert!(ttl > 0 && ttl <= LEASE.as_millis() as i64, "PTTL {ttl}");
    let mut refused = 0;
    let freed_after = loop {
        let mut d = Client::connect(pinned[2], home).unwrap();
        let r = d.login("alice", "secret").unwrap();
        if r.starts_with("+OK") {
            let _ = d.cmd("QUIT");
            break killed.elapsed();
        }
        assert!(r.starts_with("-ERR [IN-USE]"), "{r}");
        refused += 1;
        // Bounded: a lease that never expired fails here.
        assert!(
            killed.elapsed() < LEASE * 5,
            "the killed replica's lock is still held after {:?}",
            killed.elapsed()
        );
        thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "cluster lock: lease {LEASE:?}, PTTL at the kill {ttl} ms, freed {freed_after:?} after SIGKILL ({refused} logins refused [IN-USE] meanwhile)"
    );
    assert!(refused >= 1, "the lease was gone before it expired");
    drop(c);
}

// ---------------------------------------------------------------------------
// The throttle
// ---------------------------------------------------------------------------

/// How many password checks for `user` (any user: `None`) Dovecot logged as
/// failed.
fn dovecot_failures(dovecot: &Dovecot, user: Option<&str>) -> usize {
    let needle = user.map(|u| format!("passwd-file({u},"));
    dovecot
        .log()
        .lines()
        .filter(|l| needle.as_ref().is_none_or(|n| l.contains(n.as_str())))
        .filter(|l| l.contains("Password mismatch") || l.contains("unknown user"))
        .count()
}

/// Sends `n` wrong passwords through HAProxy's round robin from `from`, 8
/// at a time; `who(i)` is the user of guess `i`. Returns the answers.
fn guesses(
    port: u16,
    from: Ipv4Addr,
    n: usize,
    who: impl Fn(usize) -> String + Sync,
) -> Vec<String> {
    let next = AtomicUsize::new(0);
    let answers = Mutex::new(Vec::new());
    thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let mut c = Client::connect(port, from).unwrap();
                let r = c.login(&who(i), &format!("guess{i}")).unwrap();
                let _ = c.cmd("QUIT");
                answers.lock().unwrap().push(r);
            });
        }
    });
    answers.into_inner().unwrap()
}

/// 24 wrong passwords for bob through every replica reach Dovecot at most
/// `max_failures_per_user` times, and 24 for 24 users from one address at
/// most `max_failures_per_ip` times: one budget across replicas (three
/// per-process throttles would let three times as many through).
#[test]
fn cluster_brute_force_over_three_replicas_is_held_to_the_limits() {
    let names: Vec<String> = std::iter::once("bob".to_string())
        .chain((0..24).map(|i| format!("user{i}")))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let dovecot = Dovecot::start_with(users(&refs));
    let redis = Redis::start();
    let cluster = Cluster::start(3, &config(&dovecot, &redis.url()));
    let port = cluster.haproxy.port;

    // Bob's own device logs in first, from its usual address.
    let home = Ipv4Addr::new(127, 0, 0, 21);
    let mut c = Client::connect(port, home).unwrap();
    assert!(c.login("bob", "secret").unwrap().starts_with("+OK"));
    assert!(c.cmd("QUIT").unwrap().starts_with("+OK"));

    let answers = guesses(port, Ipv4Addr::new(127, 0, 0, 11), 24, |_| "bob".into());
    assert!(answers.iter().all(|a| a.starts_with("-ERR")), "{answers:?}");
    let refused = answers
        .iter()
        .filter(|a| a.contains("Too many failed logins"))
        .count();
    wait_until_stable(|| dovecot_failures(&dovecot, Some("bob")));
    let bob = dovecot_failures(&dovecot, Some("bob"));
    eprintln!(
        "cluster throttle, one user: 24 guesses sent over 3 replicas, {bob} reached Dovecot (limit {MAX_PER_USER}), {refused} refused by popbridge"
    );
    assert!(
        (1..=MAX_PER_USER).contains(&bob),
        "{bob} guesses for bob reached Dovecot"
    );
    assert_eq!(bob + refused, 24, "{answers:?}");
    // Bob's budget is spent on every replica: the right password from
    // elsewhere is refused, while his known address (known through
    // whichever replica he used) is spared the per-user limit on each of
    // the three.
    let mut c = Client::connect(port, Ipv4Addr::new(127, 0, 0, 22)).unwrap();
    let r = c.login("bob", "secret").unwrap();
    assert!(r.contains("Too many failed logins"), "{r}");
    for _ in 0..3 {
        let mut c = Client::connect(port, home).unwrap();
        let r = c.login("bob", "secret").unwrap();
        assert!(r.starts_with("+OK"), "bob from his known address: {r}");
        assert!(c.cmd("QUIT").unwrap().starts_with("+OK"));
    }

    let answers = guesses(port, Ipv4Addr::new(127, 0, 0, 12), 24, |i| {
        format!("user{i}")
    });
    let refused = answers
        .iter()
        .filter(|a| a.contains("Too many failed logins"))
        .count();
    wait_until_stable(|| dovecot_failures(&dovecot, None));
    let reached = dovecot_failures(&dovecot, None) - bob;
    eprintln!(
        "cluster throttle, one address: 24 guesses for 24 users sent over 3 replicas, {reached} reached Dovecot (limit {MAX_PER_IP}), {refused} refused by popbridge"
    );
    assert!(
        reached <= MAX_PER_IP,
        "{reached} guesses from one address reached Dovecot"
    );
    assert_eq!(reached + refused, 24, "{answers:?}");
    // Every replica took part (round robin).
    for (i, r) in cluster.replicas.iter().enumerate() {
        assert!(
            r.metrics().contains("popbridge_auth_total{"),
            "replica {i} served no guess"
        );
    }
}

// ---------------------------------------------------------------------------
// OAuth2
// ---------------------------------------------------------------------------

/// Devices log in through every replica with the tokens in the shared
/// Redis (`oauth.store = "redis"` without its own URL: the cluster's), and
/// after the access token expired, devices on all three replicas at once
/// make one refresh.
#[test]
fn cluster_oauth2_devices_work_on_every_replica_with_one_refresh() {
    let redis = Redis::start();
    let s = Setup::with_keys("", "store = \"redis\"");
    // The routes inherit [upstream]'s address (the other OAuth2 tests give
    // it on the command line).
    let mut text = std::fs::read_to_string(&s.config).unwrap().replacen(
        "[upstream]\n",
        &format!(
            "[upstream]\naddress = \"127.0.0.1:{}\"\n",
            s.dovecot.imap_port
        ),
        1,
    );
    text.push_str(&format!("\n[cluster]\nredis_url = \"{}\"\n", redis.url()));
    std::fs::write(&s.config, &text).unwrap();
    s.enrol(ACCOUNT, CORP);
    let devices: Vec<String> = (0..3).map(|i| format!("dev{i}@{CORP_DEVICES}")).collect();
    for (i, d) in devices.iter().enumerate() {
        s.add_device(d, ACCOUNT, &format!("device-pass-{i}"));
    }
    assert!(
        !redis.keys("popbridge:oauth:*").is_empty(),
        "tokens in the cluster's Redis"
    );
    let first = message("shared");
    s.dovecot.deliver(ACCOUNT, &first);
    let cluster = Cluster::start(3, &text);
    let pinned = cluster.haproxy.pinned.clone();
    for (i, d) in devices.iter().enumerate() {
        pop3_fetch(pinned[i], d, &format!("device-pass-{i}"), 1, &first);
    }
    let warm = s.refreshes();
    s.oauth.expire_access_tokens();
    let barrier = std::sync::Barrier::new(3);
    thread::scope(|sc| {
        for (i, d) in devices.iter().enumerate() {
            let (barrier, first, port) = (&barrier, &first, pinned[i]);
            sc.spawn(move || {
                barrier.wait();
                pop3_fetch(port, d, &format!("device-pass-{i}"), 1, first);
            });
        }
    });
    let refreshes = s.refreshes() - warm;
    eprintln!("cluster oauth2: 3 devices on 3 replicas after expiry: {refreshes} refresh");
    assert_eq!(refreshes, 1, "{}", s.oauth.stats().raw);
}

// ---------------------------------------------------------------------------
// Rolling restart
// ---------------------------------------------------------------------------

/// What the polling clients saw.
#[derive(Default, Debug)]
struct Tally {
    sessions: usize,
    errors: Vec<String>,
    /// Message-ID → how many times a client downloaded it.
    downloaded: BTreeMap<String, usize>,
}

/// One keeping client's poll: downloads the messages whose UIDL it has not
/// seen; QUIT without DELE.
fn poll(
    port: u16,
    user: &str,
    seen: &mut BTreeSet<String>,
    tally: &Mutex<Tally>,
) -> Result<(), String> {
    let mut c = Client::connect(port, Ipv4Addr::LOCALHOST)?;
    let r = c.login(user, "secret")?;
    if !r.starts_with("+OK") {
        return Err(format!("PASS: {r}"));
    }
    let listing = c.multi("UIDL")?;
    for l in listing {
        let (n, uidl) = l
            .split_once(' ')
            .ok_or_else(|| format!("UIDL line {l:?}"))?;
        if seen.contains(uidl) {
            continue;
        }
        let body = c.multi(&format!("RETR {n}"))?;
        let id = body
            .iter()
            .find_map(|h| h.strip_prefix("Message-ID: "))
            .ok_or("no Message-ID")?
            .to_string();
        *tally.lock().unwrap().downloaded.entry(id).or_insert(0) += 1;
        seen.insert(uidl.to_string());
    }
    let q = c.cmd("QUIT")?;
    if !q.starts_with("+OK") {
        return Err(format!("QUIT: {q}"));
    }
    Ok(())
}

/// Six keeping clients poll through HAProxy while mail arrives and each
/// replica in turn gets SIGTERM (drain), is started again, and is seen up
/// by HAProxy before the next. Every message delivered is downloaded
/// exactly once (UIDLs are the same on every replica), and no poll fails:
/// HAProxy retries a connection a stopped replica refused and stops sending
/// to a draining one after one health check (its `/readyz` answers 503 as
/// soon as the drain starts), and a draining replica finishes the sessions
/// it has. The bound allowed is one failed poll per restart (a connection
/// accepted by the kernel in the instant between the drain and the
/// listener closing); a failed poll is retried at once (a reconnect).
#[test]
fn cluster_rolling_restart_under_polling_clients_loses_and_duplicates_nothing() {
    const CLIENTS: usize = 6;
    let names: Vec<String> = (0..CLIENTS).map(|i| format!("poller{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let dovecot = Arc::new(Dovecot::start_with(users(&refs)));
    let redis = Redis::start();
    let mut cluster = Cluster::start(3, &config(&dovecot, &redis.url()));
    let port = cluster.haproxy.port;
    let stop = AtomicBool::new(false);
    let tally = Mutex::new(Tally::default());
    let reconnects = AtomicUsize::new(0);
    let delivered = Mutex::new(Vec::new());
    let started = Instant::now();
    thread::scope(|s| {
        for name in &names {
            let (stop, tally, reconnects) = (&stop, &tally, &reconnects);
            s.spawn(move || {
                let mut seen = BTreeSet::new();
                // One last poll after the restarts picks up the rest.
                let mut last = false;
                loop {
                    last |= stop.load(Ordering::Relaxed);
                    match poll(port, name, &mut seen, tally) {
                        Ok(()) => tally.lock().unwrap().sessions += 1,
                        Err(e) => {
                            tally.lock().unwrap().errors.push(format!("{name}: {e}"));
                            reconnects.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                    if last {
                        return;
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            });
        }
        let (dovecot, delivered, stop) = (&dovecot, &delivered, &stop);
        let deliverer = s.spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let user = format!("poller{}", n % CLIENTS);
                let id = format!("<m{n}@cluster.test>");
                dovecot.deliver(
                    &user,
                    format!("Subject: m{n}\r\nMessage-ID: {id}\r\n\r\nbody {n}\r\n").as_bytes(),
                );
                delivered.lock().unwrap().push(id);
                n += 1;
                thread::sleep(Duration::from_millis(100));
            }
        });
        thread::sleep(Duration::from_secs(1));
        for i in 0..cluster.replicas.len() {
            cluster.replicas[i].stop();
            cluster.haproxy.wait_for(i, false);
            cluster.replicas[i].start();
            cluster.haproxy.wait_for(i, true);
            thread::sleep(Duration::from_secs(1));
        }
        stop.store(true, Ordering::Relaxed);
        deliverer.join().unwrap();
    });
    let tally = tally.into_inner().unwrap();
    let delivered = delivered.into_inner().unwrap();
    let reconnects = reconnects.load(Ordering::Relaxed);
    let (econ, wretr, wredis) = cluster.haproxy.retries();
    eprintln!(
        "cluster rolling restart: {} s, {} sessions, {} errors, {} client reconnects, HAProxy: {econ} connection errors, {wretr} retries, {wredis} redispatches; {} messages delivered, {} downloaded; errors: {:?}",
        started.elapsed().as_secs(),
        tally.sessions,
        tally.errors.len(),
        reconnects,
        delivered.len(),
        tally.downloaded.values().sum::<usize>(),
        tally.errors
    );
    let twice: Vec<_> = tally.downloaded.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "downloaded twice (a UIDL changed): {twice:?}"
    );
    let missing: Vec<_> = delivered
        .iter()
        .filter(|id| !tally.downloaded.contains_key(*id))
        .collect();
    assert!(missing.is_empty(), "never downloaded: {missing:?}");
    assert!(
        tally.errors.len() <= cluster.replicas.len(),
        "{} failed polls over {} restarts: {:?}",
        tally.errors.len(),
        cluster.replicas.len(),
        tally.errors
    );
    assert!(tally.sessions > 3 * CLIENTS, "{} sessions", tally.sessions);
}

// ---------------------------------------------------------------------------
// A Redis outage, and rediss://
// ---------------------------------------------------------------------------

/// Redis accepts connections and never answers (the worst case: no refusal
/// to notice): logins still go through (the lock and the throttle fall
/// back to the process's own), bounded by `redis_timeout_ms`, with a
/// warning and `popbridge_cluster_redis_errors_total`. The lock still holds
/// within the process.
#[test]
fn cluster_a_silent_redis_fails_open_with_a_metric_and_no_hang() {
    let silent = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    // Accepts, holds, never reads or writes.
    let held = Arc::new(Mutex::new(Vec::new()));
    {
        let held = held.clone();
        let silent = silent.try_clone().unwrap();
        thread::spawn(move || {
            for s in silent.incoming().flatten() {
                held.lock().unwrap().push(s);
            }
        });
    }
    let dovecot = Dovecot::start_with(users(&["alice"]));
    let cluster = Cluster::start(
        1,
        &format!(
            "{}redis_timeout_ms = 200\n",
            config(&dovecot, &format!("redis://127.0.0.1:{silent_port}"))
        ),
    );
    let port = cluster.haproxy.port;
    let mut a = Client::connect(port, Ipv4Addr::LOCALHOST).unwrap();
    assert!(a.login("alice", "secret").unwrap().starts_with("+OK"));
    let mut b = Client::connect(port, Ipv4Addr::LOCALHOST).unwrap();
    let r = b.login("alice", "secret").unwrap();
    assert!(r.starts_with("-ERR [IN-USE]"), "the per-process lock: {r}");
    assert!(a.cmd("QUIT").unwrap().starts_with("+OK"));
    let r = &cluster.replicas[0];
    let m = r.metrics();
    for op in ["throttle_begin", "lock_acquire"] {
        let v = metric(
            &m,
            &format!("popbridge_cluster_redis_errors_total{{op=\"{op}\"}}"),
        );
        assert!(v.is_some_and(|v| v >= 1.0), "{op}: {v:?}\n{m}");
    }
    assert!(r.log().contains("shared state unavailable"), "{}", r.log());
    assert!(
        !held.lock().unwrap().is_empty(),
        "popbridge never tried Redis"
    );
}

/// `rediss://` with a CA file, a TLS name other than the URL's host and a
/// password file: the shared connection code verifies the name (the wrong
/// one is refused) and authenticates; the OAuth2 token store and a
/// replica's session leases both work over it; the password is never
/// logged.
#[test]
fn cluster_rediss_with_a_ca_file_and_a_tls_name() {
    use popbridge::cluster::RedisConn;
    use popbridge::config::cluster::RedisEndpoint;
    use popbridge::config::oauth::SecretSource;

    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("redis test CA");
    let leaf = ca.leaf(&["redis.cluster.test"]);
    let (cert, key, ca_path) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("ca.pem"),
    );
    leaf.write(&cert, &key);
    std::fs::write(&ca_path, &ca.pem).unwrap();
    const PASSWORD: &str = "redis-pw-7f3a9c";
    let password_file = dir.path().join("redis-password");
    crate::common::write_private(&password_file, format!("{PASSWORD}\n"));
    let redis = Redis::start_with(RedisOptions {
        requirepass: Some(PASSWORD.into()),
        tls: Some((cert, key)),
    });
    let tls_port = redis.tls_port.unwrap();
    let url = format!("rediss://127.0.0.1:{tls_port}/0");
    let endpoint = |name: &str| RedisEndpoint {
        url: url.clone(),
        password: SecretSource::File(password_file.clone()),
        ca_file: Some(ca_path.clone()),
        tls_name: Some(name.into()),
        timeout: Duration::from_secs(5),
        section: "cluster",
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ok = RedisConn::new(&endpoint("redis.cluster.test")).unwrap();
        let mut set = redis::cmd("SET");
        set.arg("popbridge:test").arg("over-tls");
        let _: () = ok.query(&set).await.unwrap();
        let wrong = RedisConn::new(&endpoint("other.test")).unwrap();
        let e = wrong
            .query::<String>(&redis::cmd("PING"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("TLS"), "{e}");
    });
    assert_eq!(
        redis
            .command(&["GET", "popbridge:test"])
            .as_text()
            .as_deref(),
        Some("over-tls")
    );

    // The OAuth2 token store over the same connection code: its own
    // oauth.redis_* keys, rediss with the CA and the TLS name.
    let key_file = dir.path().join("oauth.key");
    crate::common::write_private(&key_file, "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=\n");
    let oauth_config = popbridge::config::Config::from_toml(&format!(
        "[oauth]\nkey_file = \"{}\"\nstore = \"redis\"\nredis_url = \"{url}\"\n\
         redis_ca_file = \"{}\"\nredis_tls_name = \"redis.cluster.test\"\n\
         redis_password_file = \"{}\"\n",
        key_file.display(),
        ca_path.display(),
        password_file.display()
    ))
    .unwrap();
    oauth_config.validate().unwrap();
    let store = popbridge::oauth::open_store(&oauth_config).unwrap();
    assert_eq!(store.check_blocking().unwrap(), None, "reachable over TLS");
    rt.block_on(store.check()).unwrap();
    assert_eq!(redis.keys("popbridge:oauth:meta").len(), 1);

    let dovecot = Dovecot::start_with(users(&["alice"]));
    let cluster = Cluster::start(
        1,
        &format!(
            "{}redis_ca_file = \"{}\"\nredis_tls_name = \"redis.cluster.test\"\nredis_password_file = \"{}\"\n",
            config(&dovecot, &url),
            ca_path.display(),
            password_file.display()
        ),
    );
    let mut a = Client::connect(cluster.haproxy.port, Ipv4Addr::LOCALHOST).unwrap();
    assert!(a.login("alice", "secret").unwrap().starts_with("+OK"));
    assert_eq!(lock_keys(&redis).len(), 1, "{}", cluster.logs());
    assert!(a.cmd("QUIT").unwrap().starts_with("+OK"));
    assert!(lock_keys(&redis).is_empty());
    let m = cluster.replicas[0].metrics();
    assert!(!m.contains("popbridge_cluster_redis_errors_total{"), "{m}");
    // The password (AUTH) never reaches a log.
    assert!(!cluster.logs().contains(PASSWORD));
}

/// A lease taken over while its session runs (here: another token written
/// into Redis, as after an outage longer than the lease) is noticed at the
/// next renewal and logged; the session goes on (its QUIT commits only its
/// own deletions), and its end does not delete the other holder's lease.
#[test]
fn cluster_a_lease_lost_while_the_session_runs_is_logged_and_the_session_goes_on() {
    let dovecot = Dovecot::start_with(users(&["alice"]));
    dovecot.deliver("alice", b"Subject: one\r\n\r\nbody\r\n");
    let redis = Redis::start();
    let cluster = Cluster::start(1, &config(&dovecot, &redis.url()));
    let mut a = Client::connect(cluster.haproxy.port, Ipv4Addr::LOCALHOST).unwrap();
    assert!(a.login("alice", "secret").unwrap().starts_with("+OK"));
    let key = lock_keys(&redis);
    assert_eq!(key.len(), 1);
    redis.command(&["SET", &key[0], "another-session", "PX", "60000"]);
    let deadline = Instant::now() + LEASE * 5;
    while !cluster.replicas[0].log().contains("session lease lost") {
        assert!(Instant::now() < deadline, "{}", cluster.logs());
        thread::sleep(Duration::from_millis(50));
    }
    assert!(a.cmd("STAT").unwrap().starts_with("+OK 1 "));
    assert!(a.cmd("QUIT").unwrap().starts_with("+OK"));
    assert_eq!(
        redis.command(&["GET", &key[0]]).as_text().as_deref(),
        Some("another-session"),
        "the session's end deleted a lease it no longer held"
    );
}

/// The directory behind the cluster: a small HTTP directory routes alice
/// to one Dovecot and bob to another, and every replica, reached through
/// HAProxy, serves each of them their own mailbox; each replica asks the
/// directory at most once per user (its cache), and the lock (in Redis)
/// holds across replicas for a directory route too.
#[test]
fn cluster_directory_routes_users_to_two_dovecots_on_every_replica() {
    let a = Dovecot::start_with(users(&["alice"]));
    let b = Dovecot::start_with(users(&["bob"]));
    a.deliver("alice", b"Subject: for alice\r\n\r\nalice's mail\r\n");
    for i in 0..2 {
        b.deliver(
            "bob",
            format!("Subject: for bob {i}\r\n\r\nbob's mail\r\n").as_bytes(),
        );
    }
    let dir = crate::directory::DirectoryService::start();
    dir.route_to("alice", a.imap_port, "");
    dir.route_to("bob", b.imap_port, "");
    let redis = Redis::start();
    let toml = format!(
        "{}[directory]\nurl = \"{}\"\ncache_secs = 300\n",
        config(&a, &redis.url()),
        dir.url()
    );
    let cluster = Cluster::start(3, &toml);
    let home = Ipv4Addr::new(127, 0, 0, 1);
    for &port in &cluster.haproxy.pinned {
        for (user, want) in [("alice", 1), ("bob", 2)] {
            let mut c = Client::connect(port, home).unwrap();
            let r = c.login(user, "secret").unwrap();
            assert!(r.starts_with("+OK"), "{user} via {port}: {r}");
            let stat = c.cmd("STAT").unwrap();
            assert!(
                stat.starts_with(&format!("+OK {want} ")),
                "{user} via {port}: {stat}"
            );
            let body = c.multi("RETR 1").unwrap().join("\n");
            assert!(body.contains(&format!("{user}'s mail")), "{user}: {body}");
            assert!(c.cmd("QUIT").unwrap().starts_with("+OK"));
        }
    }
    // Through the balanced port, twice more each: answered from the
    // replicas' caches.
    for _ in 0..2 {
        for user in ["alice", "bob"] {
            let mut c = Client::connect(cluster.haproxy.port, home).unwrap();
            assert!(c.login(user, "secret").unwrap().starts_with("+OK"));
            assert!(c.cmd("QUIT").unwrap().starts_with("+OK"));
        }
    }
    for user in ["alice", "bob"] {
        let asked = dir.requests_for(user).len();
        assert!(
            (1..=3).contains(&asked),
            "{user}: the directory was asked {asked} times by 3 replicas"
        );
    }
    // The lock holds across replicas on a directory route.
    let pinned = &cluster.haproxy.pinned;
    let mut first = Client::connect(pinned[0], home).unwrap();
    assert!(first.login("bob", "secret").unwrap().starts_with("+OK"));
    let mut second = Client::connect(pinned[1], home).unwrap();
    let r = second.login("bob", "secret").unwrap();
    assert!(
        r.starts_with("-ERR [IN-USE]"),
        "second session for bob: {r}"
    );
    assert!(first.cmd("QUIT").unwrap().starts_with("+OK"));
}
