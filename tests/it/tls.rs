//! TLS on both sides of popbridge, with real clients (python's poplib and
//! ssl, curl, rustls) and a real IMAP server (Dovecot): POP3S, STLS and its
//! command-injection rule, the plaintext policy, certificate reload on
//! SIGHUP, TLS to the upstream, and SASL AUTH through to Dovecot.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::certs::{write_world_readable, Pki};
use crate::common::logs::wait_for_log;
use crate::common::ports::ClosedPort;
use crate::common::{corpus_message, Dovecot, DovecotOptions, Pop3, Popbridge};
use base64::Engine as _;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for every poll of a log file.
const POLL_LIMIT: Duration = Duration::from_secs(20);

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

// ---------------------------------------------------------------------------
// Helpers: logs, python, popbridge with free-form arguments
// ---------------------------------------------------------------------------

/// What a python script printed.
struct PyOut {
    stdout: String,
    stderr: String,
}

impl PyOut {
    /// The rest of the first stdout line starting with `key` + space.
    fn get(&self, key: &str) -> &str {
        self.try_get(key).unwrap_or_else(|| {
            panic!(
                "python printed no {key:?} line\nstdout:\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    fn try_get(&self, key: &str) -> Option<&str> {
        let prefix = format!("{key} ");
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).or((l == key).then_some("")))
    }
}

/// Runs `python3 -c script args...` (killed after 60 s); panics unless it
/// exits successfully.
fn python(script: &str, args: &[&str]) -> PyOut {
    let dir = tempfile::tempdir().expect("temp dir for python output");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).expect("python stdout file"))
        .stderr(fs::File::create(&err_path).expect("python stderr file"))
        .spawn()
        .expect("run python3");
    let status = wait_child(&mut child, Duration::from_secs(60));
    let out = PyOut {
        stdout: fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: fs::read_to_string(&err_path).unwrap_or_default(),
    };
    assert!(
        status.is_some_and(|s| s.success()),
        "python failed ({status:?})\nstdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    out
}

/// Waits for a child up to `limit`, then kills it (returning None).
fn wait_child(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// popbridge on Dovecot's plain IMAP port with a POP3S listener.
fn popbridge_with_tls(dovecot: &Dovecot, pki: &Pki, extra: &[&str]) -> (Popbridge, u16) {
    let cert = pki.cert_path();
    let key = pki.key_path();
    let mut args = vec![
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let pb = Popbridge::start(dovecot.imap_port, &args);
    let tls_port = pb.tls_port();
    (pb, tls_port)
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("popbridge.toml");
    fs::write(&path, text).expect("write config");
    path
}

// ---------------------------------------------------------------------------
// A small POP3 client over any stream (plain TCP or rustls)
// ---------------------------------------------------------------------------

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Line-oriented POP3 client that reads one byte at a time, so nothing
/// beyond the current line is consumed (needed around STLS).
struct Client<S: Read + Write> {
    s: S,
}

fn tcp_connect(port: u16) -> TcpStream {
    let tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .unwrap_or_else(|e| panic!("connect 127.0.0.1:{port}: {e}"));
    tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    tcp.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    tcp
}

impl<S: Read + Write> Client<S> {
    /// One line without CRLF; panics on EOF or error.
    fn read_line(&mut self) -> String {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => panic!(
                    "connection closed mid-line (partial {:?})",
                    String::from_utf8_lossy(&line)
                ),
                Ok(_) => {
                    line.push(b[0]);
                    if b[0] == b'\n' {
                        break;
                    }
                }
                // See common::connect_client.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!(
                    "read failed: {e} (partial {:?})",
                    String::from_utf8_lossy(&line)
                ),
            }
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        text.trim_end_matches(['\r', '\n']).to_string()
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("write");
        self.s.flush().expect("flush");
    }

    fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.read_line()
    }

    /// The lines of a multi-line body, up to (not including) ".".
    fn body(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let l = self.read_line();
            if l == "." {
                return lines;
            }
            lines.push(l);
        }
    }

    fn capa(&mut self) -> Vec<String> {
        let r = self.cmd("CAPA");
        assert!(r.starts_with("+OK"), "CAPA: {r}");
        self.body()
    }

    fn login(&mut self, user: &str, pass: &str) {
        let r = self.cmd(&format!("USER {user}"));
        assert!(r.starts_with("+OK"), "USER {user}: {r}");
        let r = self.cmd(&format!("PASS {pass}"));
        assert!(r.starts_with("+OK"), "PASS for {user}: {r}");
    }

    fn stat(&mut self) -> String {
        let r = self.cmd("STAT");
        assert!(r.starts_with("+OK "), "STAT: {r}");
        r
    }

    /// In a logged-in session: STAT must answer exactly `want_stat` (so the
    /// login reached the right mailbox), then QUIT must succeed.
    fn stat_and_quit(&mut self, want_stat: &str) {
        assert_eq!(self.stat(), want_stat);
        assert!(self.cmd("QUIT").starts_with("+OK"));
    }
}

impl Client<TcpStream> {
    /// Connects and reads the greeting.
    fn plain(port: u16) -> Client<TcpStream> {
        let mut c = Client {
            s: tcp_connect(port),
        };
        let g = c.read_line();
        assert!(g.starts_with("+OK"), "greeting: {g}");
        c
    }

    /// STLS, then the TLS handshake; returns the TLS client.
    fn stls(mut self, config: Arc<rustls::ClientConfig>) -> Client<TlsStream> {
        let r = self.cmd("STLS");
        assert!(r.starts_with("+OK"), "STLS: {r}");
        Client {
            s: tls_handshake(self.s, config),
        }
    }
}

impl Client<TlsStream> {
    /// POP3S: TLS from the first byte, then the greeting.
    fn implicit(port: u16, config: Arc<rustls::ClientConfig>) -> Client<TlsStream> {
        let mut c = Client {
            s: tls_handshake(tcp_connect(port), config),
        };
        let g = c.read_line();
        assert!(g.starts_with("+OK"), "greeting over TLS: {g}");
        c
    }

    /// The certificate the server presented (DER).
    fn peer_cert(&self) -> Vec<u8> {
        self.s
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .expect("server presented a certificate")
            .to_vec()
    }
}

/// A client config trusting exactly the CA certificates in `ca_files`.
fn client_config(ca_files: &[&Path]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for path in ca_files {
        for cert in CertificateDer::pem_file_iter(path).expect("read CA file") {
            roots.add(cert.expect("parse CA")).expect("add CA");
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Runs the handshake to completion (server name `localhost`).
fn tls_handshake(tcp: TcpStream, config: Arc<rustls::ClientConfig>) -> TlsStream {
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(config, name).expect("client connection");
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn
            .complete_io(&mut s.sock)
            .unwrap_or_else(|e| panic!("TLS handshake with popbridge failed: {e}"));
    }
    s
}

// ---------------------------------------------------------------------------
// 1. POP3S with python's poplib; old TLS versions refused
// ---------------------------------------------------------------------------

const POP3S_SCRIPT: &str = r#"
import base64, poplib, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
p = poplib.POP3_SSL('localhost', port, context=ctx, timeout=30)
print('VERSION', p.sock.version())
print('PEER', base64.b64encode(p.sock.getpeercert(True)).decode())
print(p.user('alice').decode()); print(p.pass_('secret').decode())
print('STAT', *p.stat())
for line in p.uidl()[1]:
    print('UIDL', line.decode())
for n in (1, 2):
    resp, lines, octets = p.retr(n)
    print('RETR%d' % n, base64.b64encode(b'\r\n'.join(lines) + b'\r\n').decode())
print('QUIT', p.quit().decode())
"#;

/// A TLS connection limited to TLS 1.2 works; one limited to TLS 1.0-1.1 is
/// refused. Prints LOCAL-REFUSAL when this OpenSSL will not offer TLS 1.1.
const OLD_TLS_SCRIPT: &str = r#"
import socket, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
def ctx_for(lo, hi, seclevel0):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    if seclevel0:
        ctx.set_ciphers('DEFAULT:@SECLEVEL=0')
    ctx.minimum_version = lo
    ctx.maximum_version = hi
    return ctx
def attempt(label, ctx):
    sock = socket.create_connection(('127.0.0.1', port), timeout=30)
    try:
        s = ctx.wrap_socket(sock, server_hostname='localhost')
        print(label, 'CONNECTED', s.version(), s.recv(100).decode().strip())
        s.close()
    except ssl.SSLError as e:
        print(label, 'SSLERROR', e.reason, '|', str(e).replace('\n', ' '))
    except OSError as e:
        print(label, 'OSERROR', str(e).replace('\n', ' '))
attempt('TLS12', ctx_for(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2, False))
try:
    old = ctx_for(ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1, True)
except (ValueError, ssl.SSLError) as e:
    print('OLD LOCAL-REFUSAL', e)
    sys.exit(0)
attempt('OLD', old)
"#;

#[test]
fn pop3s_with_python_poplib_and_old_tls_refused() {
    let pki = Pki::new("pop3s test CA");
    let dovecot = Dovecot::start();
    dovecot.deliver("alice", &corpus_message("plain_crlf"));
    dovecot.deliver("alice", &corpus_message("dot_lines"));
    let (pb, tls_port) = popbridge_with_tls(&dovecot, &pki, &[]);

    // Dovecot's own POP3 is the reference.
    let mut native = Pop3::connect(dovecot.pop3_port);
    native.login("alice", "secret");
    let (count, octets) = native.stat();
    let uidl = native.uidl();
    let retr: Vec<Vec<u8>> = (1..=2).map(|n| native.retr(n)).collect();
    native.quit();

    let ca = pki.ca_path();
    let out = python(POP3S_SCRIPT, &[&tls_port.to_string(), ca.to_str().unwrap()]);
    let version = out.get("VERSION");
    assert!(
        version == "TLSv1.3" || version == "TLSv1.2",
        "negotiated {version}"
    );
    assert_eq!(
        out.get("PEER"),
        b64(&pki.leaf.der),
        "POP3S presented a certificate other than the configured one"
    );
    assert_eq!(out.get("STAT"), format!("{count} {octets}"));
    let py_uidl: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("UIDL "))
        .collect();
    let want: Vec<String> = uidl.iter().map(|(n, u)| format!("{n} {u}")).collect();
    assert_eq!(py_uidl, want);
    for n in 1..=2 {
        let got = base64::engine::general_purpose::STANDARD
            .decode(out.get(&format!("RETR{n}")))
            .unwrap();
        assert!(
            got == retr[n - 1],
            "RETR {n} over POP3S differs from Dovecot's POP3:\n{:?}\n{:?}",
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&retr[n - 1])
        );
    }
    assert!(out.get("QUIT").starts_with("+OK"), "{}", out.stdout);

    // TLS 1.2 only: accepted. TLS 1.0-1.1 only: refused by popbridge.
    let failures_before = pb.log().matches("TLS handshake failed").count();
    let out = python(
        OLD_TLS_SCRIPT,
        &[&tls_port.to_string(), ca.to_str().unwrap()],
    );
    let tls12 = out.get("TLS12");
    assert!(
        tls12.starts_with("CONNECTED TLSv1.2 +OK"),
        "a TLS 1.2-only client: {tls12}"
    );
    let old = out.get("OLD");
    eprintln!("a TLS 1.0/1.1-only client got: {old}");
    assert!(
        !old.starts_with("CONNECTED"),
        "popbridge accepted a TLS 1.0/1.1-only client: {old}"
    );
    if old.starts_with("LOCAL-REFUSAL") || old.contains("NO_PROTOCOLS_AVAILABLE") {
        eprintln!(
            "SKIPPED (TLS 1.1 part only): the local OpenSSL refuses to offer TLS 1.0/1.1 \
             even at SECLEVEL=0, so no old ClientHello reached popbridge: {old}"
        );
    } else {
        // The ClientHello reached popbridge, which refused it.
        wait_for_log(|| pb.log(), "TLS handshake failed", failures_before + 1);
    }
}

/// Sends QUIT over POP3S and reads to the end: `END close_notify` when
/// the server closed TLS properly, `END eof` when the TCP connection just
/// ended (with `suppress_ragged_eofs=False` Python's ssl raises
/// SSLEOFError then, instead of returning an empty read).
const QUIT_CLOSE_SCRIPT: &str = r#"
import socket, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
s = ctx.wrap_socket(socket.create_connection(('127.0.0.1', port), timeout=30),
                    server_hostname='localhost', suppress_ragged_eofs=False)
s.sendall(b'QUIT\r\n')
got = b''
try:
    while True:
        d = s.recv(4096)
        if not d:
            break
        got += d
    print('END close_notify')
except ssl.SSLEOFError as e:
    print('END eof', e)
print('GOT', got.decode().replace('\r\n', '|'))
"#;

/// A session popbridge ends (here QUIT before login) closes TLS with
/// close_notify before the connection (RFC 8446 §6.1), so the client can
/// tell the end of the session from a cut connection.
#[test]
fn quit_over_pop3s_ends_with_close_notify() {
    let pki = Pki::new("close_notify test CA");
    let dovecot = Dovecot::start();
    let (_pb, tls_port) = popbridge_with_tls(&dovecot, &pki, &[]);
    let ca = pki.ca_path();
    let out = python(
        QUIT_CLOSE_SCRIPT,
        &[&tls_port.to_string(), ca.to_str().unwrap()],
    );
    assert!(
        out.get("GOT").starts_with("+OK popbridge ready.|+OK"),
        "{}",
        out.stdout
    );
    assert_eq!(out.get("END"), "close_notify", "{}", out.stdout);
}

// ---------------------------------------------------------------------------
// 2. STLS with python's poplib
// ---------------------------------------------------------------------------

const STLS_SCRIPT: &str = r#"
import poplib, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
p = poplib.POP3('127.0.0.1', port, timeout=30)
print('CAPA1', ' '.join(sorted(p.capa())))
print('STLS', p.stls(ctx).decode())
print('TLS', p.sock.version())
print('CAPA2', ' '.join(sorted(p.capa())))
def raw(cmd):
    try:
        return p._shortcmd(cmd).decode()
    except poplib.error_proto as e:
        return e.args[0].decode()
print('STLS2', raw('STLS'))
print('USER', p.user('alice').decode()); print('PASS', p.pass_('secret').decode())
print('STAT', *p.stat())
print('STLS3', raw('STLS'))
print('STAT2', *p.stat())
print('QUIT', p.quit().decode())
"#;

#[test]
fn stls_with_python_poplib() {
    let pki = Pki::new("stls test CA");
    let dovecot = Dovecot::start();
    dovecot.deliver("alice", &corpus_message("plain_crlf"));
    let (pb, _) = popbridge_with_tls(&dovecot, &pki, &[]);
    let ca = pki.ca_path();
    let out = python(STLS_SCRIPT, &[&pb.port.to_string(), ca.to_str().unwrap()]);
    let capa1: Vec<&str> = out.get("CAPA1").split(' ').collect();
    assert!(capa1.contains(&"STLS"), "CAPA before TLS: {capa1:?}");
    assert!(out.get("STLS").starts_with("+OK"), "{}", out.stdout);
    assert!(out.get("TLS").starts_with("TLSv1."), "{}", out.stdout);
    let capa2: Vec<&str> = out.get("CAPA2").split(' ').collect();
    assert!(!capa2.contains(&"STLS"), "CAPA after TLS: {capa2:?}");
    assert!(
        capa2.contains(&"USER") && capa2.contains(&"SASL"),
        "CAPA after TLS: {capa2:?}"
    );
    assert!(
        out.get("STLS2").starts_with("-ERR"),
        "STLS inside TLS: {}",
        out.get("STLS2")
    );
    assert!(out.get("PASS").starts_with("+OK"), "{}", out.stdout);
    assert!(out.get("STAT").starts_with("1 "), "{}", out.stdout);
    assert!(
        out.get("STLS3").starts_with("-ERR"),
        "STLS after login: {}",
        out.get("STLS3")
    );
    assert!(out.get("STAT2").starts_with("1 "), "{}", out.stdout);
    assert!(out.get("QUIT").starts_with("+OK"), "{}", out.stdout);
}

// ---------------------------------------------------------------------------
// 3. STLS command injection (RFC 2595 §4)
// ---------------------------------------------------------------------------

#[test]
fn stls_discards_commands_pipelined_before_the_handshake() {
    let pki = Pki::new("injection test CA");
    // No login happens: the upstream is never used.
    let nothing = ClosedPort::new();
    let (cert, key) = (pki.cert_path(), pki.key_path());
    let pb = Popbridge::start(
        nothing.port(),
        &[
            "--tls-listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let config = client_config(&[&pki.ca_path()]);
    let mut c = Client::plain(pb.port);
    // One write: STLS and a command an attacker injected in plaintext.
    c.send(b"STLS\r\nCAPA\r\n");
    let r = c.read_line();
    assert!(r.starts_with("+OK"), "STLS: {r}");
    let mut t = Client {
        s: tls_handshake(c.s, config),
    };
    let first = t.cmd("NOOP");
    assert!(
        first.starts_with("-ERR"),
        "the first reply inside TLS must answer NOOP (an -ERR before login), \
         not the CAPA injected before the handshake; got {first:?}"
    );
    // And the session is usable inside TLS.
    let capa = t.capa();
    assert!(capa.iter().any(|l| l == "USER"), "{capa:?}");
}

// ---------------------------------------------------------------------------
// 4. Plaintext policy
// ---------------------------------------------------------------------------

#[test]
fn plaintext_policy_requires_stls_unless_allowed() {
    let pki = Pki::new("policy test CA");
    let dovecot = Dovecot::start();
    dovecot.deliver("alice", &corpus_message("plain_crlf"));
    let dir = tempfile::tempdir().unwrap();
    let strict = write_config(
        dir.path(),
        &format!(
            "[tls]\ncert_file = {:?}\nkey_file = {:?}\n[auth]\nloopback_is_secure = false\n",
            pki.cert_path(),
            pki.key_path()
        ),
    );
    let pb = Popbridge::start(dovecot.imap_port, &["--config", strict.to_str().unwrap()]);
    let config = client_config(&[&pki.ca_path()]);

    let mut c = Client::plain(pb.port);
    let capa = c.capa();
    assert!(capa.iter().any(|l| l == "STLS"), "{capa:?}");
    assert!(
        !capa.iter().any(|l| l == "USER" || l.starts_with("SASL")),
        "CAPA offers login methods on an insecure connection: {capa:?}"
    );
    let auth_plain = format!("AUTH PLAIN {}", b64(b"\0alice\0secret"));
    for cmd in [
        "USER alice",
        "PASS secret",
        "AUTH PLAIN",
        auth_plain.as_str(),
        "AUTH LOGIN",
    ] {
        let r = c.cmd(cmd);
        assert!(
            r.starts_with("-ERR [AUTH] ") && r.contains("STLS"),
            "{cmd} without TLS: {r}"
        );
    }
    let mut t = c.stls(config.clone());
    let capa = t.capa();
    assert!(!capa.iter().any(|l| l == "STLS"), "{capa:?}");
    assert!(capa.iter().any(|l| l == "USER"), "{capa:?}");
    assert!(capa.iter().any(|l| l == "SASL PLAIN LOGIN"), "{capa:?}");
    t.login("alice", "secret");
    let stat = t.stat();
    assert!(stat.starts_with("+OK 1 "), "STAT after STLS: {stat}");
    assert!(t.cmd("QUIT").starts_with("+OK"));

    // AUTH also works after STLS.
    let mut t = Client::plain(pb.port).stls(config);
    let r = t.cmd(&auth_plain);
    assert!(r.starts_with("+OK"), "AUTH PLAIN after STLS: {r}");
    t.stat();
    drop(pb);

    // allow_plaintext = true: the same without TLS.
    let lax = write_config(
        dir.path(),
        "[auth]\nloopback_is_secure = false\nallow_plaintext = true\n",
    );
    let pb = Popbridge::start(dovecot.imap_port, &["--config", lax.to_str().unwrap()]);
    let mut c = Client::plain(pb.port);
    let capa = c.capa();
    assert!(capa.iter().any(|l| l == "USER"), "{capa:?}");
    assert!(
        !capa.iter().any(|l| l == "STLS"),
        "no certificate: {capa:?}"
    );
    c.login("alice", "secret");
    c.stat();
    let mut c = Client::plain(pb.port);
    let r = c.cmd(&auth_plain);
    assert!(r.starts_with("+OK"), "AUTH PLAIN with allow_plaintext: {r}");
}

// ---------------------------------------------------------------------------
// 5. Certificate reload on SIGHUP
// ---------------------------------------------------------------------------

fn sighup(pid: u32) {
    let ok = Command::new("kill")
        .arg("-HUP")
        .arg(pid.to_string())
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -HUP {pid} failed");
}

#[test]
fn sighup_reloads_the_certificate_and_keeps_it_when_the_new_one_is_bad() {
    let a = Pki::new("reload CA one");
    let b = Pki::new("reload CA two");
    let dovecot = Dovecot::start();
    dovecot.deliver("alice", &corpus_message("plain_crlf"));
    let live = tempfile::tempdir().unwrap();
    let cert = live.path().join("cert.pem");
    let key = live.path().join("key.pem");
    a.leaf.write(&cert, &key);
    let pb = Popbridge::start(
        dovecot.imap_port,
        &[
            "--tls-listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let tls_port = pb.tls_port();
    let trust_both = client_config(&[&a.ca_path(), &b.ca_path()]);

    let mut s1 = Client::implicit(tls_port, client_config(&[&a.ca_path()]));
    assert!(s1.peer_cert() == a.leaf.der, "first certificate is not A");
    s1.login("alice", "secret");
    let stat1 = s1.stat();

    // The success line is "TLS certificate reloaded" or, where SIGHUP
    // reloads the whole configuration, "configuration reloaded".
    let reloaded = |log: &str| log.matches(" reloaded").count();
    assert_eq!(reloaded(&pb.log()), 0);
    b.leaf.write(&cert, &key);
    sighup(pb.pid());
    wait_for_log(|| pb.log(), " reloaded", 1);
    let mut s2 = Client::implicit(tls_port, trust_both.clone());
    assert!(
        s2.peer_cert() == b.leaf.der,
        "after SIGHUP a new connection does not get certificate B"
    );
    // STLS on the plain listener uses the new certificate too.
    let s3 = Client::plain(pb.port).stls(client_config(&[&b.ca_path()]));
    assert!(s3.peer_cert() == b.leaf.der, "STLS after reload");
    // The session from before the reload goes on.
    assert_eq!(s1.stat(), stat1);
    assert!(s1.cmd("QUIT").starts_with("+OK"));
    assert!(s2.cmd("QUIT").starts_with("+OK"));

    // A broken certificate file: the reload fails and B stays.
    write_world_readable(&cert, b"-----BEGIN CERTIFICATE-----\ngarbage\n");
    sighup(pb.pid());
    wait_for_log(|| pb.log(), "reload failed", 1);
    let mut s4 = Client::implicit(tls_port, trust_both);
    assert!(
        s4.peer_cert() == b.leaf.der,
        "after a failed reload the previous certificate must stay"
    );
    s4.login("alice", "secret");
    s4.stat();
    assert_eq!(
        reloaded(&pb.log()),
        1,
        "the broken pair was reported as reloaded"
    );
}

/// Operators (and log rotation) send SIGHUP to daemons; without a
/// certificate there is nothing to reload, but popbridge must not die.
#[test]
fn sighup_without_a_certificate_does_not_kill_popbridge() {
    let dovecot = Dovecot::start();
    let mut pb = Popbridge::start(dovecot.imap_port, &[]);
    sighup(pb.pid());
    // Serving a session needs popbridge's threads to run, and a pending
    // fatal signal is taken before they return to user space.
    let greeting = TcpStream::connect((Ipv4Addr::LOCALHOST, pb.port)).and_then(|tcp| {
        tcp.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(tcp), &mut line)?;
        Ok(line)
    });
    if !greeting.as_ref().is_ok_and(|g| g.starts_with("+OK")) {
        let deadline = Instant::now() + POLL_LIMIT;
        let status = loop {
            match pb.try_wait() {
                Some(status) => break Some(status),
                None if Instant::now() >= deadline => break None,
                None => thread::sleep(Duration::from_millis(20)),
            }
        };
        panic!("no greeting after SIGHUP ({greeting:?}); popbridge exit status {status:?}");
    }
    let mut c = Pop3::connect(pb.port);
    c.login("alice", "secret");
    c.stat();
    c.quit();
    assert_eq!(pb.try_wait(), None, "popbridge exited after SIGHUP");
}

// ---------------------------------------------------------------------------
// 6. TLS to the upstream (Dovecot with a certificate)
// ---------------------------------------------------------------------------

fn dovecot_tls_conf(pki: &Pki, imaps_port: u16) -> String {
    format!(
        "ssl = yes\nssl_cert = <{}\nssl_key = <{}\nssl_min_protocol = TLSv1.2\n\
         service imap-login {{\n  inet_listener imaps {{\n    port = {imaps_port}\n  }}\n}}\n",
        pki.cert_path().display(),
        pki.key_path().display()
    )
}

/// USER then PASS on a new connection to `port`: the client and the PASS reply.
fn try_login(port: u16, user: &str, pass: &str) -> (Client<TcpStream>, String) {
    let mut c = Client::plain(port);
    let r = c.cmd(&format!("USER {user}"));
    assert!(r.starts_with("+OK"), "USER: {r}");
    let r = c.cmd(&format!("PASS {pass}"));
    (c, r)
}

#[test]
fn upstream_tls_implicit_and_starttls_verify_the_server() {
    let pki = Pki::new("upstream test CA");
    let other = Pki::new("unrelated CA");
    let (dovecot, imaps) = Dovecot::start_with_listener(DovecotOptions::default(), |port| {
        dovecot_tls_conf(&pki, port)
    });
    let message = corpus_message("dot_lines");
    dovecot.deliver("alice", &message);
    let mut native = Pop3::connect(dovecot.pop3_port);
    native.login("alice", "secret");
    let (status, body) = native.cmd_multi("RETR 1");
    assert!(status.starts_with("+OK"));
    native.quit();

    let ca = pki.ca_path();
    let ca = ca.to_str().unwrap();
    let wrong_ca = other.ca_path();
    let wrong_ca = wrong_ca.to_str().unwrap();
    let imaps_addr = format!("127.0.0.1:{imaps}");
    let imap_addr = format!("127.0.0.1:{}", dovecot.imap_port);

    let good: [(&str, Vec<&str>); 3] = [
        (
            "implicit, name localhost",
            vec![
                "--upstream",
                &imaps_addr,
                "--upstream-tls",
                "implicit",
                "--upstream-ca-file",
                ca,
                "--upstream-tls-name",
                "localhost",
            ],
        ),
        (
            "implicit, by IP address",
            vec![
                "--upstream",
                &imaps_addr,
                "--upstream-tls",
                "implicit",
                "--upstream-ca-file",
                ca,
            ],
        ),
        (
            "starttls",
            vec![
                "--upstream",
                &imap_addr,
                "--upstream-tls",
                "starttls",
                "--upstream-ca-file",
                ca,
                "--upstream-tls-name",
                "localhost",
            ],
        ),
    ];
    for (i, (label, args)) in good.iter().enumerate() {
        let bridge = Popbridge::start_exact(args);
        let (mut c, r) = try_login(bridge.port, "alice", "secret");
        assert!(r.starts_with("+OK"), "{label}: PASS answered {r}");
        assert_eq!(c.stat(), format!("+OK 1 {}", message.len()), "{label}");
        let r = c.cmd("RETR 1");
        assert!(r.starts_with("+OK"), "{label}: RETR {r}");
        let mut got = Vec::new();
        for line in c.body() {
            got.extend_from_slice(line.as_bytes());
            got.extend_from_slice(b"\r\n");
        }
        got.extend_from_slice(b".\r\n");
        assert!(
            got == body,
            "{label}: RETR differs from Dovecot's POP3\n{:?}\n{:?}",
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&body)
        );
        assert!(c.cmd("QUIT").starts_with("+OK"));
        // Dovecot saw a TLS login.
        let log = wait_for_log(
            || dovecot.log(),
            "imap-login: Info: Login: user=<alice>",
            i + 1,
        );
        let line = log
            .lines()
            .filter(|l| l.contains("imap-login: Info: Login: user=<alice>"))
            .nth(i)
            .unwrap();
        assert!(line.contains(", TLS"), "{label}: not a TLS login: {line}");
    }

    let bad: [(&str, Vec<&str>); 3] = [
        (
            "implicit, CA that did not sign the server",
            vec![
                "--upstream",
                &imaps_addr,
                "--upstream-tls",
                "implicit",
                "--upstream-ca-file",
                wrong_ca,
                "--upstream-tls-name",
                "localhost",
            ],
        ),
        (
            "starttls, CA that did not sign the server",
            vec![
                "--upstream",
                &imap_addr,
                "--upstream-tls",
                "starttls",
                "--upstream-ca-file",
                wrong_ca,
                "--upstream-tls-name",
                "localhost",
            ],
        ),
        (
            "implicit, wrong name",
            vec![
                "--upstream",
                &imaps_addr,
                "--upstream-tls",
                "implicit",
                "--upstream-ca-file",
                ca,
                "--upstream-tls-name",
                "wrong.example",
            ],
        ),
    ];
    for (label, args) in &bad {
        let bridge = Popbridge::start_exact(args);
        let (_c, r) = try_login(bridge.port, "bob", "secret");
        assert!(
            r.starts_with("-ERR [SYS/TEMP]"),
            "{label}: PASS answered {r}, want -ERR [SYS/TEMP]"
        );
        let log = wait_for_log(|| bridge.log(), "upstream login failed", 1);
        assert!(
            log.contains("kind=\"tls\"") || log.contains("kind=tls"),
            "{label}"
        );
    }
    assert!(
        !dovecot.log().contains("user=<bob>"),
        "credentials reached Dovecot over an unverified connection:\n{}",
        dovecot.log()
    );
}

#[test]
fn upstream_starttls_never_falls_back_to_plaintext() {
    let pki = Pki::new("fallback test CA");
    // The harness's Dovecot has ssl = no: no STARTTLS.
    let dovecot = Dovecot::start();
    let ca = pki.ca_path();
    let upstream = format!("127.0.0.1:{}", dovecot.imap_port);
    let bridge = Popbridge::start_exact(&[
        "--upstream",
        &upstream,
        "--upstream-tls",
        "starttls",
        "--upstream-ca-file",
        ca.to_str().unwrap(),
        "--upstream-tls-name",
        "localhost",
    ]);
    let (mut c, r) = try_login(bridge.port, "alice", "secret");
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "PASS answered {r}");
    assert!(c.cmd("QUIT").starts_with("+OK"));
    let pb_log = wait_for_log(|| bridge.log(), "upstream login failed", 1);
    assert!(pb_log.contains("does not offer STARTTLS"), "{pb_log}");
    // Dovecot logs popbridge's connection when it ends; nothing may show alice.
    let log = wait_for_log(|| dovecot.log(), "no auth attempts", 1);
    assert!(
        !log.contains("user=<alice>"),
        "alice's credentials reached Dovecot without TLS:\n{log}"
    );
}

// ---------------------------------------------------------------------------
// 7. SASL AUTH through to Dovecot
// ---------------------------------------------------------------------------

#[test]
fn auth_plain_and_login_reach_dovecot() {
    let dovecot = Dovecot::start();
    let m1 = corpus_message("plain_crlf");
    let m2 = corpus_message("three_body_lines");
    dovecot.deliver("alice", &m1);
    dovecot.deliver("alice", &m2);
    // Every POP3 login must reach Dovecot: no session reuse.
    let (_dir, no_reuse) = crate::common::no_reuse_config();
    let pb = Popbridge::start(dovecot.imap_port, &["--config", no_reuse.to_str().unwrap()]);
    let want_stat = format!("+OK 2 {}", m1.len() + m2.len());
    let mut logins = 0;

    // PLAIN with an initial response.
    let mut c = Client::plain(pb.port);
    let r = c.cmd(&format!("AUTH PLAIN {}", b64(b"\0alice\0secret")));
    assert!(r.starts_with("+OK"), "AUTH PLAIN initial response: {r}");
    c.stat_and_quit(&want_stat);
    logins += 1;

    // PLAIN with a continuation (authzid = authcid is allowed).
    let mut c = Client::plain(pb.port);
    assert_eq!(c.cmd("AUTH PLAIN"), "+ ");
    let r = c.cmd(&b64(b"alice\0alice\0secret"));
    assert!(r.starts_with("+OK"), "AUTH PLAIN continuation: {r}");
    c.stat_and_quit(&want_stat);
    logins += 1;

    // LOGIN.
    let mut c = Client::plain(pb.port);
    assert_eq!(c.cmd("AUTH LOGIN"), "+ VXNlcm5hbWU6");
    assert_eq!(c.cmd(&b64(b"alice")), "+ UGFzc3dvcmQ6");
    let r = c.cmd(&b64(b"secret"));
    assert!(r.starts_with("+OK"), "AUTH LOGIN: {r}");
    c.stat_and_quit(&want_stat);
    logins += 1;

    // "*" cancels; bad base64 is an error; the session goes on.
    let mut c = Client::plain(pb.port);
    assert_eq!(c.cmd("AUTH PLAIN"), "+ ");
    let r = c.cmd("*");
    assert!(r.starts_with("-ERR"), "cancelled AUTH PLAIN: {r}");
    assert_eq!(c.cmd("AUTH LOGIN"), "+ VXNlcm5hbWU6");
    let r = c.cmd("*");
    assert!(r.starts_with("-ERR"), "cancelled AUTH LOGIN: {r}");
    let r = c.cmd("AUTH PLAIN !!!not-base64!!!");
    assert!(r.starts_with("-ERR"), "bad base64 initial response: {r}");
    assert_eq!(c.cmd("AUTH PLAIN"), "+ ");
    let r = c.cmd("%%%%");
    assert!(r.starts_with("-ERR"), "bad base64 continuation: {r}");
    assert_eq!(c.cmd("AUTH LOGIN"), "+ VXNlcm5hbWU6");
    let r = c.cmd("@@@");
    assert!(r.starts_with("-ERR"), "bad base64 LOGIN user name: {r}");
    c.login("alice", "secret");
    c.stat_and_quit(&want_stat);
    logins += 1;

    // Every login reached Dovecot as alice.
    wait_for_log(|| dovecot.log(), "Login: user=<alice>", logins);

    // curl uses AUTH PLAIN when SASL is advertised.
    let url = format!("pop3://alice:secret@127.0.0.1:{}/", pb.port);
    let out = Command::new("curl")
        .args(["-sS", "-v", "--max-time", "30", &url])
        .output()
        .expect("run curl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "curl failed: {stderr}");
    assert!(
        stderr.contains("> AUTH PLAIN"),
        "curl did not use AUTH PLAIN:\n{stderr}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("1 {}\r\n2 {}\r\n", m1.len(), m2.len())
    );
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", &format!("{url}1")])
        .output()
        .expect("run curl");
    assert!(out.status.success());
    assert!(out.stdout == m1, "curl RETR 1 differs from the message");
    wait_for_log(|| dovecot.log(), "Login: user=<alice>", logins + 2);
}
