//! Integration-test harness: a private Dovecot instance per test, the
//! popbridge binary, a byte-exact raw POP3 client, a minimal IMAP client
//! and a corpus of awkward test messages.
//!
//! Blocking std code only; the only extra crate is `tempfile`.

use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};
pub mod certs;
pub mod cli;
pub mod cluster;
pub mod keepers;
pub mod logs;
pub mod oauth;
pub mod ports;
pub mod raw_pop3;
pub mod redis;
pub mod servers;

/// How long to wait for a server to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Read timeout of the test clients.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------

/// Poll until the port accepts a connection (Ok(true)), the deadline
/// passes (Ok(false)), or `give_up` returns a reason (Err(reason)).
fn poll_port(
    port: u16,
    timeout: Duration,
    mut give_up: impl FnMut() -> Option<String>,
) -> Result<bool, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            return Ok(true);
        }
        if let Some(reason) = give_up() {
            return Err(reason);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn read_lossy(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Send `signal` (e.g. "TERM") to `pid` with the `kill` command.
fn send_signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Wait up to `timeout` for the child to exit; SIGKILL it after that.
fn wait_or_kill(child: &mut Child, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            Ok(None) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

// ---------------------------------------------------------------------------
// Dovecot
// ---------------------------------------------------------------------------

/// Options for a private Dovecot instance.
#[derive(Clone, Debug)]
pub struct DovecotOptions {
    /// (user, password) pairs for the passwd-file (no ':' allowed).
    pub users: Vec<(String, String)>,
    /// Value for `imap_capability` (overrides what IMAP advertises).
    pub imap_capability: Option<String>,
    /// Appended verbatim to the generated dovecot.conf.
    pub extra_conf: String,
}

impl Default for DovecotOptions {
    fn default() -> Self {
        DovecotOptions {
            users: vec![
                ("alice".to_string(), "secret".to_string()),
                ("bob".to_string(), "secret".to_string()),
            ],
            imap_capability: None,
            extra_conf: String::new(),
        }
    }
}

/// A running Dovecot (IMAP + POP3, plaintext, 127.0.0.1) in its own temp dir.
/// Stopped with SIGTERM on drop; its log is printed if the test is panicking.
pub struct Dovecot {
    pub dir: tempfile::TempDir,
    pub imap_port: u16,
    pub pop3_port: u16,
    child: Child,
    conf: PathBuf,
}

static INSTANCE_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Owner of the mailboxes and the accounts Dovecot's helper processes use.
struct MailIdentity {
    uid: u32,
    gid: u32,
    /// Some(user name) when not running as root: Dovecot's internal and
    /// login processes must then run as ourselves.
    unprivileged_user: Option<(String, String)>,
}

fn mail_identity() -> MailIdentity {
    let id = |flag: &str| -> String {
        let out = Command::new("id").arg(flag).output().expect("run `id`");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let uid: u32 = id("-u").parse().expect("numeric uid from `id -u`");
    if uid == 0 {
        MailIdentity {
            uid: 5000,
            gid: 5000,
            unprivileged_user: None,
        }
    } else {
        MailIdentity {
            uid,
            gid: id("-g").parse().expect("numeric gid from `id -g`"),
            unprivileged_user: Some((id("-un"), id("-gn"))),
        }
    }
}

/// `dovecot` from PATH, else /usr/sbin/dovecot (often not in a normal
/// user's PATH).
fn dovecot_binary() -> PathBuf {
    let in_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("dovecot").is_file()))
        .unwrap_or(false);
    let sbin = Path::new("/usr/sbin/dovecot");
    if !in_path && sbin.is_file() {
        sbin.to_path_buf()
    } else {
        PathBuf::from("dovecot")
    }
}

impl Dovecot {
    /// Start with [`DovecotOptions::default`].
    pub fn start() -> Dovecot {
        Dovecot::start_with(DovecotOptions::default())
    }

    /// Start a private instance; panics (with Dovecot's log) if it does not
    /// come up. Retries with new ports if a port was taken meanwhile.
    pub fn start_with(opts: DovecotOptions) -> Dovecot {
        Dovecot::start_inner(opts, None, None).0
    }

    /// Like [`Dovecot::start_with`], with one more listener on a port the
    /// harness allocates: `listener(port)` is appended to `opts.extra_conf`
    /// (e.g. a `service imap-login { inet_listener imaps { port = PORT } }`
    /// with its `ssl` settings). Returns the instance and that port, which
    /// accepts connections by then.
    pub fn start_with_listener(
        opts: DovecotOptions,
        listener: impl Fn(u16) -> String,
    ) -> (Dovecot, u16) {
        let (dovecot, port) = Dovecot::start_inner(opts, None, Some(&listener));
        (dovecot, port.expect("the extra listener's port"))
    }

    /// Start a private instance that also accepts SASL XOAUTH2 and
    /// OAUTHBEARER (RFC 7628), validating the bearer token with Dovecot's
    /// `oauth2` passdb against `introspection_url` (RFC 7662,
    /// `introspection_mode = post`, e.g. [`oauth::OauthServer::introspect_url`]).
    /// PLAIN and LOGIN still use the passwd-file, so every OAuth2 account
    /// must also be in `opts.users` (the userdb; its password is unused by
    /// the OAuth2 mechanisms). A separate constructor rather than a field of
    /// [`DovecotOptions`] because some tests build that struct exhaustively.
    pub fn start_with_oauth2(opts: DovecotOptions, introspection_url: &str) -> Dovecot {
        Dovecot::start_inner(opts, Some(introspection_url), None).0
    }

    /// Starts Dovecot on newly allocated ports until it comes up (at most
    /// five times); returns it and the extra listener's port, if any.
    fn start_inner(
        opts: DovecotOptions,
        oauth2_introspection_url: Option<&str>,
        listener: Option<&dyn Fn(u16) -> String>,
    ) -> (Dovecot, Option<u16>) {
        let mut last_failure = String::new();
        for _attempt in 0..5 {
            let ports = DovecotPorts {
                imap: ports::allocate(),
                pop3: ports::allocate(),
                extra: listener.map(|_| ports::allocate()),
            };
            let mut opts = opts.clone();
            if let (Some(listener), Some(port)) = (listener, ports.extra) {
                opts.extra_conf.push('\n');
                opts.extra_conf.push_str(&listener(port));
            }
            match Dovecot::try_start(&opts, oauth2_introspection_url, &ports) {
                Ok(d) => return (d, ports.extra),
                Err((msg, retry)) => {
                    if !retry {
                        panic!("{msg}");
                    }
                    last_failure = msg;
                }
            }
        }
        panic!("Dovecot did not start after 5 attempts; last failure:\n{last_failure}");
    }

    /// Err((message, worth retrying with other ports)).
    fn try_start(
        opts: &DovecotOptions,
        oauth2_introspection_url: Option<&str>,
        ports: &DovecotPorts,
    ) -> Result<Dovecot, (String, bool)> {
        let dir = tempfile::Builder::new()
            .prefix("pbdc-")
            .tempdir()
            .expect("create Dovecot temp dir");
        let root = dir.path().to_path_buf();
        // The auth process runs as `dovecot` and must read the passwd-file.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
        let mail = root.join("mail");
        fs::create_dir(&mail).expect("create mail dir");
        fs::set_permissions(&mail, fs::Permissions::from_mode(0o1777)).expect("chmod mail dir");

        let users_path = root.join("users");
        let mut users = String::new();
        for (user, pass) in &opts.users {
            assert!(
                !user.contains(':') && !pass.contains(':') && !pass.contains('\n'),
                "passwd-file cannot hold user {user:?} / password {pass:?}"
            );
            users.push_str(&format!("{user}:{{PLAIN}}{pass}::::::\n"));
        }
        fs::write(&users_path, users).expect("write passwd-file");
        fs::set_permissions(&users_path, fs::Permissions::from_mode(0o644))
            .expect("chmod passwd-file");

        let (imap_port, pop3_port) = (ports.imap, ports.pop3);
        let ident = mail_identity();
        let n = INSTANCE_COUNTER.fetch_add(1, Ordering::SeqCst);
        let instance = format!(
            "pbtest-{}-{n}-{}",
            std::process::id(),
            root.file_name().unwrap().to_string_lossy()
        );
        let d = root.display();
        // With OAuth2, the passwd-file passdb serves only PLAIN and LOGIN,
        // so a bearer token is never compared with a password.
        let passwd_mechanisms = if oauth2_introspection_url.is_some() {
            "\n  mechanisms = plain login"
        } else {
            ""
        };
        let mut conf = format!(
            r#"# generated by popbridge tests/it/common/mod.rs
instance_name = {instance}
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
mail_location = maildir:{d}/mail/%u/Maildir
mail_fsync = never
mail_max_userip_connections = 1000
default_process_limit = 200
default_client_limit = 1000
default_vsz_limit = 1G
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {d}/users{passwd_mechanisms}
}}
userdb {{
  driver = passwd-file
  args = {d}/users
  default_fields = uid={uid} gid={gid} home={d}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service anvil {{
  client_limit = 1000
}}
service auth {{
  client_limit = 1000
}}
"#,
            uid = ident.uid,
            gid = ident.gid,
        );
        if let Some((user, group)) = &ident.unprivileged_user {
            conf.push_str(&format!(
                "default_internal_user = {user}\ndefault_internal_group = {group}\n\
                 default_login_user = {user}\n\
                 first_valid_uid = 1\nfirst_valid_gid = 1\n\
                 service anvil {{\n  chroot =\n}}\nservice imap-login {{\n  chroot =\n}}\nservice pop3-login {{\n  chroot =\n}}\n"
            ));
        }
        if let Some(url) = oauth2_introspection_url {
            conf.push_str(&oauth2_conf(&root, url));
        }
        if let Some(cap) = &opts.imap_capability {
            conf.push_str(&format!("imap_capability = {cap}\n"));
        }
        conf.push_str(&opts.extra_conf);
        conf.push('\n');
        let conf_path = root.join("dovecot.conf");
        fs::write(&conf_path, conf).expect("write dovecot.conf");

        let stderr_path = root.join("dovecot.stderr");
        let out = fs::File::create(&stderr_path).expect("create dovecot.stderr");
        let child = Command::new(dovecot_binary())
            .arg("-F")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup stderr file"))
            .stderr(out)
            .spawn()
            .map_err(|e| {
                (
                    format!("cannot run `dovecot` (is it installed?): {e}"),
                    false,
                )
            })?;

        let mut dovecot = Dovecot {
            dir,
            imap_port,
            pop3_port,
            child,
            conf: conf_path,
        };

        let deadline = Instant::now() + START_TIMEOUT;
        // The master logs "starting up" once it holds all its listeners;
        // before that, a port may answer because another program has it.
        loop {
            if let Ok(Some(status)) = dovecot.child.try_wait() {
                let report = dovecot.failure_report(&format!("Dovecot exited with {status}"));
                let retry = report.contains("Address already in use");
                return Err((report, retry));
            }
            if dovecot.log().contains(" starting up for ") {
                break;
            }
            if Instant::now() >= deadline {
                let what = format!("Dovecot did not log \"starting up\" within {START_TIMEOUT:?}");
                return Err((dovecot.failure_report(&what), false));
            }
            thread::sleep(Duration::from_millis(10));
        }
        for port in [imap_port, pop3_port].into_iter().chain(ports.extra) {
            let child = &mut dovecot.child;
            let left = deadline.saturating_duration_since(Instant::now());
            match poll_port(port, left, || match child.try_wait() {
                Ok(Some(status)) => Some(format!("Dovecot exited with {status}")),
                _ => None,
            }) {
                Ok(true) => {}
                Ok(false) => {
                    let what =
                        format!("Dovecot is not listening on port {port} after {START_TIMEOUT:?}");
                    return Err((dovecot.failure_report(&what), false));
                }
                Err(reason) => {
                    let report = dovecot.failure_report(&reason);
                    let retry = report.contains("Address already in use");
                    return Err((report, retry));
                }
            }
        }
        // The master binds its inet listeners before starting the other
        // services, so a listening port alone does not mean it came up.
        if let Ok(Some(status)) = dovecot.child.try_wait() {
            let report = dovecot.failure_report(&format!("Dovecot exited with {status}"));
            return Err((report, false));
        }
        if dovecot.log().contains(" Fatal: ") {
            return Err((
                dovecot.failure_report("Dovecot logged a fatal error"),
                false,
            ));
        }
        Ok(dovecot)
    }

    fn failure_report(&self, what: &str) -> String {
        format!(
            "{what}\n--- dovecot.conf ---\n{}\n--- dovecot stdout/stderr ---\n{}\n--- dovecot.log ---\n{}",
            read_lossy(&self.conf),
            read_lossy(&self.dir.path().join("dovecot.stderr")),
            self.log()
        )
    }

    /// Path of the generated dovecot.conf.
    pub fn conf_path(&self) -> PathBuf {
        self.conf.clone()
    }

    /// Dovecot's log file (log_path) so far.
    pub fn log(&self) -> String {
        read_lossy(&self.dir.path().join("dovecot.log"))
    }

    /// The Maildir of `user` (exists after the first delivery or login).
    pub fn maildir(&self, user: &str) -> PathBuf {
        self.dir.path().join("mail").join(user).join("Maildir")
    }

    /// Run `doveadm -c CONF ARGS...`, panicking with its output on failure.
    /// Returns stdout.
    pub fn doveadm(&self, args: &[&str]) -> String {
        let out = Command::new("doveadm")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .expect("run doveadm");
        if !out.status.success() {
            panic!(
                "doveadm {args:?} failed ({}):\nstdout: {}\nstderr: {}\n--- dovecot.log ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Deliver `message` (exact bytes on stdin, no conversion) to `user`'s
    /// INBOX with `doveadm save`; panics on failure.
    pub fn deliver(&self, user: &str, message: &[u8]) {
        let mut child = Command::new("doveadm")
            .arg("-c")
            .arg(&self.conf)
            .arg("save")
            .arg("-u")
            .arg(user)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run doveadm save");
        // Write from a thread so a large message cannot deadlock against
        // doveadm filling its output pipes.
        let mut stdin = child.stdin.take().expect("doveadm stdin");
        let data = message.to_vec();
        let writer = thread::spawn(move || stdin.write_all(&data));
        let out = child.wait_with_output().expect("wait for doveadm save");
        let written = writer.join().expect("stdin writer thread");
        if !out.status.success() || written.is_err() {
            panic!(
                "doveadm save -u {user} failed ({}, stdin write: {written:?}):\nstdout: {}\nstderr: {}\n--- dovecot.log ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
    }

    /// Deliver every message of [`corpus`] in order; returns the corpus.
    pub fn deliver_corpus(&self, user: &str) -> Vec<(&'static str, Vec<u8>)> {
        let corpus = corpus();
        for (_, msg) in &corpus {
            self.deliver(user, msg);
        }
        corpus
    }
}

/// The ports of one attempt to start Dovecot.
struct DovecotPorts {
    imap: u16,
    pop3: u16,
    /// For [`Dovecot::start_with_listener`].
    extra: Option<u16>,
}

/// The Dovecot settings for [`Dovecot::start_with_oauth2`]; writes
/// `root/dovecot-oauth2.conf.ext`. A later `auth_mechanisms` overrides the
/// earlier one in dovecot.conf; each passdb has a `mechanisms =` filter, so
/// the oauth2 passdb alone validates XOAUTH2/OAUTHBEARER and the
/// passwd-file one alone PLAIN/LOGIN.
fn oauth2_conf(root: &Path, introspection_url: &str) -> String {
    let ext = root.join("dovecot-oauth2.conf.ext");
    // No tokeninfo_url: Dovecot then goes straight to introspection.
    // `post` sends `token=<token>` as application/x-www-form-urlencoded.
    fs::write(
        &ext,
        format!(
            "introspection_mode = post\n\
             introspection_url = {introspection_url}\n\
             username_attribute = username\n\
             active_attribute = active\n\
             active_value = true\n"
        ),
    )
    .expect("write dovecot-oauth2.conf.ext");
    fs::set_permissions(&ext, fs::Permissions::from_mode(0o644)).expect("chmod oauth2 conf");
    format!(
        "auth_mechanisms = plain login xoauth2 oauthbearer\n\
         passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {}\n}}\n",
        ext.display()
    )
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- dovecot.log ({}) ---\n{}",
                self.dir.path().display(),
                self.log()
            );
        }
        send_signal(self.child.id(), "TERM");
        wait_or_kill(&mut self.child, Duration::from_secs(15));
    }
}

// ---------------------------------------------------------------------------
// popbridge
// ---------------------------------------------------------------------------

/// A configuration file that turns upstream session reuse off, for tests
/// that follow each POP3 login to its own IMAP login (what reaches the
/// server, which connection a relay cuts). Keep the directory alive while
/// popbridge runs.
pub fn no_reuse_config() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("no-reuse.toml");
    fs::write(&path, "[upstream]\nreuse_idle_secs = 0\n").expect("write config");
    (dir, path)
}

/// The popbridge binary serving on loopback ports it chose itself (every
/// listener is given port 0; the ports are read back from its log),
/// logging to a file. Killed on drop; its log is printed if the test is
/// panicking.
pub struct Popbridge {
    /// The plain POP3 (STLS) listener's port.
    pub port: u16,
    pub log_path: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Popbridge {
    /// Start with `RUST_LOG=debug` (or `$POPBRIDGE_TEST_LOG` if set).
    pub fn start(upstream_imap_port: u16, extra_args: &[&str]) -> Popbridge {
        Popbridge::start_with_log(upstream_imap_port, extra_args, &test_log_level())
    }

    /// Spawn `popbridge --listen 127.0.0.1:0 --upstream 127.0.0.1:IMAP
    /// --upstream-tls none EXTRA...` with `RUST_LOG=log_level` (it must
    /// show info lines), stdout and stderr going to `log_path`; returns
    /// once the POP3 port accepted a connection (that probe is a session
    /// in popbridge's log).
    pub fn start_with_log(
        upstream_imap_port: u16,
        extra_args: &[&str],
        log_level: &str,
    ) -> Popbridge {
        let upstream = format!("127.0.0.1:{upstream_imap_port}");
        let mut args = vec!["--upstream", &upstream, "--upstream-tls", "none"];
        args.extend_from_slice(extra_args);
        let mut pb = Popbridge::spawn(&args, log_level);
        let port = pb.port;
        let child = &mut pb.child;
        match poll_port(port, START_TIMEOUT, || match child.try_wait() {
            Ok(Some(status)) => Some(format!("popbridge exited with {status}")),
            _ => None,
        }) {
            Ok(true) => {}
            // Drop prints the log while panicking.
            Ok(false) => {
                panic!("popbridge does not accept connections on 127.0.0.1:{port} after {START_TIMEOUT:?}")
            }
            Err(reason) => panic!("{reason} before accepting a connection on 127.0.0.1:{port}"),
        }
        pb
    }

    /// Spawn `popbridge --listen 127.0.0.1:0 ARGS...` exactly (no upstream
    /// arguments added), logging like [`Popbridge::start`]; returns once
    /// it logged its POP3 port, without connecting to it.
    pub fn start_exact(args: &[&str]) -> Popbridge {
        Popbridge::spawn(args, &test_log_level())
    }

    fn spawn(args: &[&str], log_level: &str) -> Popbridge {
        let dir = tempfile::Builder::new()
            .prefix("pbproxy-")
            .tempdir()
            .expect("create popbridge temp dir");
        let log_path = dir.path().join("popbridge.log");
        let log = fs::File::create(&log_path).expect("create popbridge.log");
        let child = Command::new(env!("CARGO_BIN_EXE_popbridge"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", log_level)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log file"))
            .stderr(log)
            .spawn()
            .expect("spawn popbridge");
        let mut pb = Popbridge {
            port: 0,
            log_path,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        pb.port = loop {
            if let Some(port) = listener_port(&pb.log(), "stls") {
                break port;
            }
            // Drop prints the log while panicking.
            if let Ok(Some(status)) = pb.child.try_wait() {
                panic!("popbridge exited with {status} before listening");
            }
            assert!(
                Instant::now() < deadline,
                "popbridge logged no \"listening\" line within {START_TIMEOUT:?} (RUST_LOG={log_level} must show info lines)"
            );
            thread::sleep(Duration::from_millis(10));
        };
        pb
    }

    /// The implicit-TLS (POP3S) listener's port; popbridge must have been
    /// given one on port 0 (`--tls-listen 127.0.0.1:0` or
    /// `listen.tls_address`). Waits until it is logged.
    pub fn tls_port(&self) -> u16 {
        self.wait_logged_port("POP3S listener", |log| listener_port(log, "implicit"))
    }

    /// The legacy TLS listener's port (`[legacy_tls]` on port 0): `mode`
    /// is `"implicit"` or `"stls"`. Waits until it is logged.
    #[cfg(feature = "legacy-tls")]
    pub fn legacy_port(&self, mode: &str) -> u16 {
        let kind = format!("legacy-{mode}");
        self.wait_logged_port("legacy TLS listener", |log| listener_port(log, &kind))
    }

    /// The admin listener's port; popbridge must have been given one on
    /// port 0 (`admin.address = "127.0.0.1:0"`). Waits until it is logged.
    pub fn admin_port(&self) -> u16 {
        self.wait_logged_port("admin listener", |log| {
            log.lines()
                .filter(|l| l.contains("admin listener"))
                .find_map(|l| logged_port(l, "admin"))
        })
    }

    /// Polls the log until `find` returns a port; panics after
    /// [`START_TIMEOUT`].
    fn wait_logged_port(&self, what: &str, find: impl Fn(&str) -> Option<u16>) -> u16 {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(port) = find(&self.log()) {
                return port;
            }
            assert!(
                Instant::now() < deadline,
                "popbridge logged no {what} within {START_TIMEOUT:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The whole log so far (lossy UTF-8).
    pub fn log(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// Process id of the proxy (e.g. to send it signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` if the proxy has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

/// `$POPBRIDGE_TEST_LOG`, else "debug".
fn test_log_level() -> String {
    std::env::var("POPBRIDGE_TEST_LOG").unwrap_or_else(|_| "debug".to_string())
}

/// The port of the listener popbridge logged as `listening` with
/// `tls=<kind>` ("stls": plain POP3, "implicit": POP3S, "legacy-implicit"
/// and "legacy-stls": the legacy TLS listener).
fn listener_port(log: &str, kind: &str) -> Option<u16> {
    log.lines()
        .filter(|l| logged_field(l, "tls") == Some(kind))
        .find_map(|l| logged_port(l, "listen"))
}

/// The port of the `ip:port` address in field `name` of a log line.
fn logged_port(line: &str, name: &str) -> Option<u16> {
    let addr: SocketAddr = logged_field(line, name)?.parse().ok()?;
    Some(addr.port())
}

/// The value of field `name` in a log line of popbridge's text format
/// (`name=value` or `name="value"`) or JSON format (`"name":"value"`).
fn logged_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    if let Some(at) = line.find(&format!("\"{name}\":\"")) {
        let rest = &line[at + name.len() + 4..];
        return rest.split('"').next();
    }
    let at = line.find(&format!(" {name}="))?;
    let rest = &line[at + name.len() + 2..];
    match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next(),
        None => rest.split_whitespace().next(),
    }
}

impl Drop for Popbridge {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- popbridge log ({}) ---\n{}",
                self.log_path.display(),
                self.log()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Raw POP3 client
// ---------------------------------------------------------------------------

/// Byte-exact POP3 client. All reads time out after 30 s (panic).
pub struct Pop3 {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    greeting: String,
}

/// A test client's connection to 127.0.0.1:`port` (`what` names the
/// protocol in the panic if nothing listens): TCP_NODELAY, reads time out
/// after [`CLIENT_TIMEOUT`] (so a missing reply fails instead of hanging),
/// and a buffered reader over a clone of the stream.
///
/// With a read timeout, a read fails with EINTR when the process is stopped
/// and continued, even without signal handlers (signal(7)); that happened
/// on the shared test machine. `read_until`, `read_exact` and `read_to_end`
/// retry it; a loop over bare `read` calls must do so itself.
pub fn connect_client(port: u16, what: &str) -> (TcpStream, BufReader<TcpStream>) {
    let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .unwrap_or_else(|e| panic!("{what} connect to 127.0.0.1:{port}: {e}"));
    stream.set_nodelay(true).expect("TCP_NODELAY");
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .expect("read timeout");
    let reader = BufReader::new(stream.try_clone().expect("clone stream"));
    (stream, reader)
}

fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

impl Pop3 {
    /// Connect to 127.0.0.1:`port` and read the greeting line.
    pub fn connect(port: u16) -> Pop3 {
        Pop3::connect_after(port, b"")
    }

    /// Connect to 127.0.0.1:`port`, send `preamble` (such as a PROXY
    /// protocol header) and read the greeting line.
    pub fn connect_after(port: u16, preamble: &[u8]) -> Pop3 {
        let (stream, reader) = connect_client(port, "POP3");
        stream
            .set_write_timeout(Some(CLIENT_TIMEOUT))
            .expect("write timeout");
        let mut pop = Pop3 {
            stream,
            reader,
            greeting: String::new(),
        };
        if !preamble.is_empty() {
            pop.send_raw(preamble);
        }
        let line = pop.read_line();
        pop.greeting = String::from_utf8_lossy(strip_eol(&line)).into_owned();
        pop
    }

    /// The greeting line without CRLF.
    pub fn greeting(&self) -> &str {
        &self.greeting
    }

    /// Write exactly these bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("POP3 write");
        self.stream.flush().expect("POP3 flush");
    }

    /// One line including its line ending, exact bytes. Panics on EOF,
    /// timeout, or a connection closed in the middle of a line.
    pub fn read_line(&mut self) -> Vec<u8> {
        let mut line = Vec::new();
        match self.reader.read_until(b'\n', &mut line) {
            Ok(_) if line.ends_with(b"\n") => line,
            Ok(_) => panic!(
                "POP3 connection closed while reading a line (partial: {:?})",
                String::from_utf8_lossy(&line)
            ),
            Err(e) => panic!(
                "POP3 read failed: {e} (partial: {:?})",
                String::from_utf8_lossy(&line)
            ),
        }
    }

    /// Exact bytes of a multi-line response body (after its +OK status
    /// line), up to and including the terminating ".\r\n".
    pub fn read_multiline_body(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line();
            body.extend_from_slice(&line);
            if line == b".\r\n" {
                return body;
            }
        }
    }

    /// Send `line` + CRLF; return the status line without CRLF.
    pub fn cmd(&mut self, line: &str) -> String {
        let mut bytes = line.as_bytes().to_vec();
        bytes.extend_from_slice(b"\r\n");
        self.send_raw(&bytes);
        let status = self.read_line();
        String::from_utf8_lossy(strip_eol(&status)).into_owned()
    }

    /// Like [`Pop3::cmd`]; if the status is +OK, also the raw multi-line
    /// body including ".\r\n", otherwise an empty body.
    pub fn cmd_multi(&mut self, line: &str) -> (String, Vec<u8>) {
        let status = self.cmd(line);
        if status.starts_with("+OK") {
            let body = self.read_multiline_body();
            (status, body)
        } else {
            (status, Vec::new())
        }
    }

    /// USER + PASS, asserting +OK for both.
    pub fn login(&mut self, user: &str, pass: &str) {
        let r = self.cmd(&format!("USER {user}"));
        assert!(r.starts_with("+OK"), "USER {user}: {r}");
        let r = self.cmd(&format!("PASS {pass}"));
        assert!(r.starts_with("+OK"), "PASS for {user}: {r}");
    }

    /// STAT parsed as (count, octets); panics unless +OK.
    pub fn stat(&mut self) -> (usize, u64) {
        let r = self.cmd("STAT");
        let mut it = r.split_whitespace();
        assert_eq!(it.next(), Some("+OK"), "STAT: {r}");
        let count = it.next().and_then(|s| s.parse().ok());
        let size = it.next().and_then(|s| s.parse().ok());
        match (count, size) {
            (Some(c), Some(s)) => (c, s),
            _ => panic!("unparsable STAT reply: {r}"),
        }
    }

    /// LIST parsed as [(msgno, octets)]; panics unless +OK.
    pub fn list(&mut self) -> Vec<(usize, u64)> {
        let (r, body) = self.cmd_multi("LIST");
        assert!(r.starts_with("+OK"), "LIST: {r}");
        parse_pairs(&body)
            .into_iter()
            .map(|(n, s)| (n, s.parse().expect("LIST size")))
            .collect()
    }

    /// UIDL parsed as [(msgno, uid)]; panics unless +OK.
    pub fn uidl(&mut self) -> Vec<(usize, String)> {
        let (r, body) = self.cmd_multi("UIDL");
        assert!(r.starts_with("+OK"), "UIDL: {r}");
        parse_pairs(&body)
    }

    /// RETR n, returning the message with dot-stuffing removed and without
    /// the terminating ".\r\n"; panics unless +OK.
    pub fn retr(&mut self, n: usize) -> Vec<u8> {
        let (r, body) = self.cmd_multi(&format!("RETR {n}"));
        assert!(r.starts_with("+OK"), "RETR {n}: {r}");
        dot_unstuff(&body)
    }

    /// QUIT, asserting +OK.
    pub fn quit(&mut self) {
        let r = self.cmd("QUIT");
        assert!(r.starts_with("+OK"), "QUIT: {r}");
    }

    /// True when the server has closed the connection (read returns 0 or
    /// the connection was reset). False if data arrives or the read times out.
    pub fn eof(&mut self) -> bool {
        loop {
            return match self.reader.fill_buf() {
                Ok(buf) => buf.is_empty(),
                // See connect_client.
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::BrokenPipe
                ),
            };
        }
    }
}

/// Parse "N value\r\n" lines of a LIST/UIDL body (".\r\n" ignored).
fn parse_pairs(body: &[u8]) -> Vec<(usize, String)> {
    let text = String::from_utf8_lossy(body);
    text.split("\r\n")
        .filter(|l| !l.is_empty() && *l != ".")
        .map(|l| {
            let (n, v) = l
                .split_once(' ')
                .unwrap_or_else(|| panic!("bad listing line {l:?}"));
            (n.parse().expect("message number"), v.to_string())
        })
        .collect()
}

/// Undo POP3 dot-stuffing of a multi-line body and drop the final ".\r\n"
/// (if present). Lines are split on LF; a leading "." is removed from each.
pub fn dot_unstuff(body: &[u8]) -> Vec<u8> {
    let body = body.strip_suffix(b".\r\n").unwrap_or(body);
    let mut out = Vec::with_capacity(body.len());
    for line in body.split_inclusive(|&b| b == b'\n') {
        out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
    }
    out
}

/// Dot-stuff a CRLF message and append the terminator, as a POP3 server
/// sends it after "+OK". Adds a CRLF first if the message does not end
/// with a newline.
pub fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 16);
    for line in message.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    if !out.is_empty() && !out.ends_with(b"\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// Convert every bare LF to CRLF (existing CRLF and bare CR are kept).
pub fn to_crlf(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + message.len() / 32);
    let mut prev = 0u8;
    for &b in message {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    out
}

// ---------------------------------------------------------------------------
// Minimal IMAP client
// ---------------------------------------------------------------------------

/// Minimal blocking IMAP client for checking the upstream mailbox.
pub struct Imap {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    tag: u32,
}

impl Imap {
    /// Connect, read the greeting, LOGIN and SELECT INBOX (panics on failure).
    pub fn connect(port: u16, user: &str, pass: &str) -> Imap {
        let mut imap = Imap::connect_only(port);
        imap.command(&format!("LOGIN {} {}", imap_quote(user), imap_quote(pass)))
            .unwrap_or_else(|e| panic!("IMAP LOGIN {user}: {e}"));
        imap.command("SELECT INBOX")
            .unwrap_or_else(|e| panic!("IMAP SELECT INBOX: {e}"));
        imap
    }

    /// Connect and read the greeting only (no login).
    pub fn connect_only(port: u16) -> Imap {
        let (stream, reader) = connect_client(port, "IMAP");
        let mut imap = Imap {
            stream,
            reader,
            tag: 0,
        };
        let greeting = imap.read_response_line();
        assert!(
            greeting.starts_with(b"* OK"),
            "IMAP greeting: {}",
            String::from_utf8_lossy(&greeting)
        );
        imap
    }

    fn read_raw_line(&mut self) -> Vec<u8> {
        let mut line = Vec::new();
        match self.reader.read_until(b'\n', &mut line) {
            Ok(_) if line.ends_with(b"\n") => line,
            Ok(_) => panic!(
                "IMAP connection closed (partial: {:?})",
                String::from_utf8_lossy(&line)
            ),
            Err(e) => panic!("IMAP read failed: {e}"),
        }
    }

    /// One logical response line without its final CRLF; literals are read
    /// and appended inline (the "{n}\r\n" marker stays in the text).
    fn read_response_line(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let line = self.read_raw_line();
            let body = strip_eol(&line);
            let literal = literal_len(body);
            match literal {
                Some(n) => {
                    out.extend_from_slice(&line);
                    let mut data = vec![0u8; n];
                    self.reader.read_exact(&mut data).expect("IMAP literal");
                    out.extend_from_slice(&data);
                }
                None => {
                    out.extend_from_slice(body);
                    return out;
                }
            }
        }
    }

    /// Send "tN cmd"; return the untagged lines (without CRLF, literals
    /// inline) up to the tagged reply, or Err(tagged text) on NO/BAD.
    pub fn command(&mut self, cmd: &str) -> Result<Vec<Vec<u8>>, String> {
        self.tag += 1;
        let tag = format!("t{}", self.tag);
        self.stream
            .write_all(format!("{tag} {cmd}\r\n").as_bytes())
            .expect("IMAP write");
        let prefix = format!("{tag} ");
        let mut lines = Vec::new();
        loop {
            let line = self.read_response_line();
            if let Some(rest) = line.strip_prefix(prefix.as_bytes()) {
                let text = String::from_utf8_lossy(rest).into_owned();
                return if text.starts_with("OK") {
                    Ok(lines)
                } else {
                    Err(text)
                };
            }
            lines.push(line);
        }
    }

    /// APPEND `message` (exact bytes) to `mailbox` with a non-synchronising
    /// literal (RFC 7888 LITERAL+, which Dovecot offers); panics on failure.
    pub fn append(&mut self, mailbox: &str, message: &[u8]) {
        self.tag += 1;
        let tag = format!("t{}", self.tag);
        let mut cmd = format!(
            "{tag} APPEND {} {{{}+}}\r\n",
            imap_quote(mailbox),
            message.len()
        )
        .into_bytes();
        cmd.extend_from_slice(message);
        cmd.extend_from_slice(b"\r\n");
        self.stream.write_all(&cmd).expect("IMAP write");
        let prefix = format!("{tag} ");
        loop {
            let line = self.read_response_line();
            if let Some(rest) = line.strip_prefix(prefix.as_bytes()) {
                assert!(
                    rest.starts_with(b"OK"),
                    "APPEND: {}",
                    String::from_utf8_lossy(rest)
                );
                return;
            }
        }
    }

    /// All UIDs in the selected mailbox, sorted.
    pub fn uids(&mut self) -> Vec<u32> {
        let lines = self
            .command("UID SEARCH ALL")
            .unwrap_or_else(|e| panic!("UID SEARCH ALL: {e}"));
        let mut uids: Vec<u32> = lines
            .iter()
            .filter_map(|l| l.strip_prefix(b"* SEARCH"))
            .flat_map(|rest| {
                String::from_utf8_lossy(rest)
                    .split_whitespace()
                    .map(|n| n.parse::<u32>().expect("UID in SEARCH"))
                    .collect::<Vec<_>>()
            })
            .collect();
        uids.sort_unstable();
        uids
    }

    /// Flags of message `uid`; panics if there is no such message.
    pub fn flags(&mut self, uid: u32) -> Vec<String> {
        let lines = self
            .command(&format!("UID FETCH {uid} (FLAGS)"))
            .unwrap_or_else(|e| panic!("UID FETCH {uid} (FLAGS): {e}"));
        for line in &lines {
            let text = String::from_utf8_lossy(line);
            if !text.starts_with("* ") || !text.contains(" FETCH (") {
                continue;
            }
            if fetch_item(&text, "UID").as_deref() != Some(&uid.to_string()) {
                continue;
            }
            if let Some(start) = text.find("FLAGS (") {
                let rest = &text[start + "FLAGS (".len()..];
                let end = rest.find(')').expect("closing paren of FLAGS");
                return rest[..end].split_whitespace().map(String::from).collect();
            }
        }
        panic!("no FLAGS for UID {uid} in {lines:?}");
    }

    /// UID STORE uid +FLAGS (flags); panics on failure.
    pub fn uid_store_flags(&mut self, uid: u32, flags: &str) {
        self.command(&format!("UID STORE {uid} +FLAGS ({flags})"))
            .unwrap_or_else(|e| panic!("UID STORE {uid} +FLAGS ({flags}): {e}"));
    }

    /// Full raw message `uid` (BODY.PEEK[], does not set \Seen).
    pub fn fetch_message(&mut self, uid: u32) -> Vec<u8> {
        let lines = self
            .command(&format!("UID FETCH {uid} (BODY.PEEK[])"))
            .unwrap_or_else(|e| panic!("UID FETCH {uid} BODY.PEEK[]: {e}"));
        for line in &lines {
            let Some(pos) = find(line, b"BODY[] {") else {
                continue;
            };
            let after = &line[pos + b"BODY[] {".len()..];
            let close = find(after, b"}\r\n").expect("literal marker");
            let n: usize = std::str::from_utf8(&after[..close])
                .ok()
                .and_then(|s| s.parse().ok())
                .expect("literal length");
            let data = &after[close + 3..];
            return data[..n].to_vec();
        }
        panic!("no BODY[] for UID {uid}");
    }

    /// RFC822.SIZE of message `uid`.
    pub fn size(&mut self, uid: u32) -> u64 {
        let lines = self
            .command(&format!("UID FETCH {uid} (RFC822.SIZE)"))
            .unwrap_or_else(|e| panic!("UID FETCH {uid} RFC822.SIZE: {e}"));
        for line in &lines {
            let text = String::from_utf8_lossy(line);
            if fetch_item(&text, "UID").as_deref() == Some(&uid.to_string()) {
                if let Some(s) = fetch_item(&text, "RFC822.SIZE") {
                    return s.parse().expect("RFC822.SIZE");
                }
            }
        }
        panic!("no RFC822.SIZE for UID {uid}");
    }

    /// CAPABILITY atoms (as advertised now).
    pub fn capabilities(&mut self) -> Vec<String> {
        let lines = self.command("CAPABILITY").expect("CAPABILITY");
        lines
            .iter()
            .filter_map(|l| l.strip_prefix(b"* CAPABILITY "))
            .flat_map(|rest| {
                String::from_utf8_lossy(rest)
                    .split_whitespace()
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// LOGOUT and close (errors ignored).
    pub fn logout(mut self) {
        self.tag += 1;
        let tag = format!("t{} ", self.tag);
        if self
            .stream
            .write_all(format!("{tag}LOGOUT\r\n").as_bytes())
            .is_err()
        {
            return;
        }
        let mut line = Vec::new();
        loop {
            line.clear();
            match self.reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line.starts_with(tag.as_bytes()) => return,
                Ok(_) => {}
            }
        }
    }
}

/// "{123}" or "{123+}" at the end of a line -> Some(123): an IMAP
/// literal (RFC 3501 §4.3; "+" is LITERAL+, RFC 7888) follows.
pub fn literal_len(line: &[u8]) -> Option<usize> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let digits = &inner[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Where `needle` (not empty) first occurs in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The value after "NAME " in a FETCH response (simple atoms only).
fn fetch_item(text: &str, name: &str) -> Option<String> {
    let pat = format!("{name} ");
    let mut search = text;
    while let Some(pos) = search.find(&pat) {
        let before = search[..pos].chars().last();
        let rest = &search[pos + pat.len()..];
        if matches!(before, Some('(') | Some(' ')) {
            let end = rest.find([' ', ')']).unwrap_or(rest.len());
            return Some(rest[..end].to_string());
        }
        search = rest;
    }
    None
}

fn imap_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

// ---------------------------------------------------------------------------
// Test corpus
// ---------------------------------------------------------------------------

fn headers(subject: &str, n: u32) -> String {
    format!(
        "From: Sender <sender@example.org>\r\n\
         To: Recipient <recipient@example.net>\r\n\
         Subject: {subject}\r\n\
         Date: Mon, 1 Jan 2024 12:{:02}:00 +0000\r\n\
         Message-ID: <corpus-{n}@popbridge.test>\r\n",
        n % 60
    )
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        let v = seed.wrapping_mul(0x2545_F491_4F6C_DD1D);
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Standard base64 (RFC 4648 §4) with padding, no line breaks.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(ALPHABET[(n >> 18) as usize & 63] as char);
        out.push(ALPHABET[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            ALPHABET[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            ALPHABET[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// A plain test message with CRLF line endings: From sender@example.org,
/// To `to`, Subject `subject`, Message-ID `<{id}@popbridge.test>`, a blank
/// line, then each of `body_lines` followed by CRLF. Distinct subjects and
/// line counts give distinct messages and sizes.
pub fn text_message(
    to: &str,
    subject: &str,
    id: &str,
    body_lines: impl IntoIterator<Item = String>,
) -> Vec<u8> {
    let mut m = format!(
        "From: Sender <sender@example.org>\r\n\
         To: {to}\r\n\
         Subject: {subject}\r\n\
         Message-ID: <{id}@popbridge.test>\r\n\
         \r\n"
    );
    for line in body_lines {
        m.push_str(&line);
        m.push_str("\r\n");
    }
    m.into_bytes()
}

/// Size of the raw attachment in `big_attachment` (base64 text is ~3 MiB).
pub const BIG_ATTACHMENT_RAW_LEN: usize = 3 * 1024 * 1024 / 4 * 3;

/// Named raw test messages, to pass to [`Dovecot::deliver`] as they are.
/// Each has a distinct Subject (`corpus: <name>` plus details).
pub fn corpus() -> Vec<(&'static str, Vec<u8>)> {
    let mut v: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let mut n = 0u32;
    let mut h = |subject: &str| {
        n += 1;
        headers(subject, n)
    };

    // Ordinary CRLF message.
    v.push((
        "plain_crlf",
        format!(
            "{}\r\nHello Bob,\r\n\r\nthis is a plain CRLF message.\r\n\r\n-- \r\nAlice\r\n",
            h("corpus: plain_crlf")
        )
        .into_bytes(),
    ));

    // Bare LF everywhere (headers included).
    v.push((
        "bare_lf",
        format!(
            "{}\r\nLine one.\r\nLine two.\r\n\r\nLast line.\r\n",
            h("corpus: bare_lf")
        )
        .replace("\r\n", "\n")
        .into_bytes(),
    ));

    // Lines needing dot-stuffing; "." alone in the middle and at the end.
    v.push((
        "dot_lines",
        format!(
            "{}\r\n.leading dot\r\n..two leading dots\r\n...three\r\n.\r\nafter a lone dot\r\n. space after dot\r\n.\r\n",
            h("corpus: dot_lines")
        )
        .into_bytes(),
    ));

    // 8-bit: UTF-8 in Subject, latin-1 in another header, both in the body.
    {
        let mut m = h("corpus: eight_bit caf\u{e9} \u{fc}ber \u{2603}").into_bytes();
        m.extend_from_slice(b"X-Latin1: Gr\xfc\xdfe aus K\xf6ln\r\n");
        m.extend_from_slice(b"MIME-Version: 1.0\r\n");
        m.extend_from_slice(b"Content-Type: text/plain; charset=unknown-8bit\r\n");
        m.extend_from_slice(b"Content-Transfer-Encoding: 8bit\r\n\r\n");
        m.extend_from_slice(b"latin-1: caf\xe9 na\xefve \xa9 \xff\r\n");
        m.extend_from_slice("utf-8: caf\u{e9} na\u{ef}ve \u{a9} \u{1f600}\r\n".as_bytes());
        m.extend_from_slice(b"high bytes: \x80\x81\xfe\r\n");
        v.push(("eight_bit", m));
    }

    // Last body line has no line ending at all.
    v.push((
        "no_final_newline",
        format!(
            "{}\r\nfirst line\r\nlast line without newline",
            h("corpus: no_final_newline")
        )
        .into_bytes(),
    ));

    // Only headers: no blank line, no body.
    v.push((
        "header_only_no_blank",
        h("corpus: header_only_no_blank").into_bytes(),
    ));

    // Only headers, ending with the blank line.
    v.push((
        "header_only_blank",
        format!("{}\r\n", h("corpus: header_only_blank")).into_bytes(),
    ));

    // A 5000-char body line and a 1000-char header line (excluding CRLF).
    {
        let name = "X-Long-Header: ";
        let header = format!("{name}{}\r\n", "h".repeat(1000 - name.len()));
        let mut body_line = String::new();
        while body_line.len() < 5000 {
            body_line.push_str("0123456789");
        }
        v.push((
            "long_lines",
            format!(
                "{}{header}\r\nbefore\r\n{body_line}\r\nafter\r\n",
                h("corpus: long_lines")
            )
            .into_bytes(),
        ));
    }

    // CRLF headers; body alternates CRLF and bare LF.
    v.push((
        "mixed_endings",
        format!(
            "{}\r\ncrlf line 1\r\nlf line 2\ncrlf line 3\r\nlf line 4\n\nafter empty lf line\r\n",
            h("corpus: mixed_endings")
        )
        .into_bytes(),
    ));

    // ~3 MiB base64 attachment, 76-char lines, deterministic.
    {
        let mut m = h("corpus: big_attachment").into_bytes();
        m.extend_from_slice(
            b"MIME-Version: 1.0\r\n\
              Content-Type: multipart/mixed; boundary=\"=_popbridge_boundary\"\r\n\
              \r\n\
              This is a multi-part message in MIME format.\r\n\
              \r\n\
              --=_popbridge_boundary\r\n\
              Content-Type: text/plain; charset=us-ascii\r\n\
              \r\n\
              See the attachment.\r\n\
              \r\n\
              --=_popbridge_boundary\r\n\
              Content-Type: application/octet-stream\r\n\
              Content-Transfer-Encoding: base64\r\n\
              Content-Disposition: attachment; filename=\"random.bin\"\r\n\
              \r\n",
        );
        let encoded = base64(&pseudo_random(BIG_ATTACHMENT_RAW_LEN, 0x5EED_0FB1_6A77)).into_bytes();
        for line in encoded.chunks(76) {
            m.extend_from_slice(line);
            m.extend_from_slice(b"\r\n");
        }
        m.extend_from_slice(b"\r\n--=_popbridge_boundary--\r\n");
        v.push(("big_attachment", m));
    }

    // Headers, blank line, empty body.
    v.push((
        "empty_body",
        format!(
            "{}MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n",
            h("corpus: empty_body")
        )
        .into_bytes(),
    ));

    // Headers, blank line, a body that is one empty line.
    v.push((
        "single_empty_body_line",
        format!("{}\r\n\r\n", h("corpus: single_empty_body_line")).into_bytes(),
    ));

    // Exactly three body lines (TOP n 3 returns the whole body).
    v.push((
        "three_body_lines",
        format!(
            "{}\r\nbody line 1\r\nbody line 2\r\nbody line 3\r\n",
            h("corpus: three_body_lines")
        )
        .into_bytes(),
    ));

    // Exactly two body lines (TOP n 3 asks for more than there is).
    v.push((
        "two_body_lines",
        format!(
            "{}\r\nbody line 1\r\nbody line 2\r\n",
            h("corpus: two_body_lines")
        )
        .into_bytes(),
    ));

    // A bare CR in the middle of a body line.
    v.push((
        "bare_cr",
        format!(
            "{}\r\nbefore\r\nhalf\rway\r\nafter\r\n",
            h("corpus: bare_cr")
        )
        .into_bytes(),
    ));

    v
}

/// One corpus message by name; panics if unknown.
pub fn corpus_message(name: &str) -> Vec<u8> {
    corpus()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, m)| m)
        .unwrap_or_else(|| panic!("no corpus message named {name}"))
}

/// The Subject header value of a raw message (lossy), if any.
pub fn subject_of(message: &[u8]) -> Option<String> {
    for line in message.split(|&b| b == b'\n') {
        let line = strip_eol(line);
        if line.is_empty() {
            return None;
        }
        if line.len() >= 8 && line[..8].eq_ignore_ascii_case(b"subject:") {
            return Some(String::from_utf8_lossy(&line[8..]).trim().to_string());
        }
    }
    None
}

// ---------------------------------------------------------------------------
// External programs (POP3 clients)
// ---------------------------------------------------------------------------

/// How long a real client (curl, mpop, fetchmail) may run.
pub const CLIENT_RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// Output of an external program.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// Runs `cmd` with stdout and stderr going to files in `dir` (no pipe can
/// fill up), killing it after [`CLIENT_RUN_TIMEOUT`].
pub fn run_program(cmd: &mut Command, dir: &Path, name: &str) -> Run {
    let out_path = dir.join(format!("{name}.stdout"));
    let err_path = dir.join(format!("{name}.stderr"));
    let out = fs::File::create(&out_path).expect("create stdout file");
    let err = fs::File::create(&err_path).expect("create stderr file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("{name}: cannot run {cmd:?}: {e}"));
    let deadline = Instant::now() + CLIENT_RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{name}: {cmd:?} still running after {CLIENT_RUN_TIMEOUT:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&fs::read(&out_path).unwrap_or_default()),
                String::from_utf8_lossy(&fs::read(&err_path).unwrap_or_default())
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    Run {
        status,
        stdout: fs::read(&out_path).expect("read stdout file"),
        stderr: String::from_utf8_lossy(&fs::read(&err_path).expect("read stderr file"))
            .into_owned(),
    }
}

/// Writes `contents` to `path` with mode 0600 (a new file) or keeps the
/// mode of an existing one: popbridge refuses a store key file every user
/// may read, which `fs::write` makes under the usual umask 022.
pub fn write_private(path: &Path, contents: impl AsRef<[u8]>) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(contents.as_ref())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
