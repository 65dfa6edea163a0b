//! The legacy TLS listener (cargo feature `legacy-tls`; issue 17 item 19):
//! clients that speak only TLS 1.0 or 1.1 log in and RETR through the
//! OpenSSL listener against a real Dovecot, while the rustls listeners
//! still refuse them. Real clients: `openssl s_client` and PHP's imap
//! extension (UW c-client), the library of osTicket and WordPress
//! mail-to-post plugins.
//!
//! Debian's OpenSSL refuses TLS 1.0/1.1 at its default security level on
//! the client side as well, so the clients here lower theirs (`-cipher
//! DEFAULT:@SECLEVEL=0`, or an `OPENSSL_CONF` for PHP): that is what an old
//! device's TLS stack does anyway. The server side is popbridge's own.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::certs::Pki;
use crate::common::logs::wait_for_log;
use crate::common::{text_message, Dovecot, Popbridge};

/// A client run (s_client, php) must end long before this.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// A line only the test message has.
const MARKER: &str = "legacy-tls body line 7f3a";

/// Dovecot with one message for alice, and popbridge with a rustls POP3S
/// listener and the legacy listener (`legacy` is appended to its
/// `[legacy_tls]` section).
struct Setup {
    _dovecot: Dovecot,
    pki: Pki,
    pb: Popbridge,
    dir: tempfile::TempDir,
}

fn setup(legacy: &str) -> Setup {
    let dovecot = Dovecot::start();
    dovecot.deliver(
        "alice",
        &text_message(
            "alice@example.org",
            "old device",
            "legacy-1",
            ["first line".to_string(), MARKER.to_string()],
        ),
    );
    let pki = Pki::new("legacy-tls test CA");
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = dir.path().join("popbridge.toml");
    fs::write(
        &cfg,
        format!(
            "[listen]\ntls_address = \"127.0.0.1:0\"\n\
             [tls]\ncert_file = {:?}\nkey_file = {:?}\n\
             [legacy_tls]\naddress = \"127.0.0.1:0\"\n{legacy}\n",
            pki.cert_path().to_str().unwrap(),
            pki.key_path().to_str().unwrap(),
        ),
    )
    .expect("write config");
    let pb = Popbridge::start(dovecot.imap_port, &["--config", cfg.to_str().unwrap()]);
    Setup {
        _dovecot: dovecot,
        pki,
        pb,
        dir,
    }
}

/// What a client printed, and whether it exited successfully.
struct Run {
    ok: bool,
    out: String,
}

/// Runs `cmd` with `input` on stdin, killed after [`RUN_LIMIT`].
fn run(mut cmd: Command, input: &str) -> Run {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = |name: &str| -> PathBuf { dir.path().join(name) };
    fs::write(path("stdin"), input).expect("write stdin");
    let mut child = cmd
        .stdin(fs::File::open(path("stdin")).unwrap())
        .stdout(fs::File::create(path("stdout")).unwrap())
        .stderr(fs::File::create(path("stderr")).unwrap())
        .spawn()
        .expect("spawn client");
    let ok = wait(&mut child).is_some_and(|s| s.success());
    let read = |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
    Run {
        ok,
        out: format!(
            "{}\n--- stderr ---\n{}",
            read(&path("stdout")),
            read(&path("stderr"))
        ),
    }
}

/// Waits for `child` up to [`RUN_LIMIT`], then kills it (None).
fn wait(child: &mut Child) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + RUN_LIMIT;
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

/// `openssl s_client -<version>` to 127.0.0.1:`port`, TLS from the first
/// byte, sending `input` (lines, CRLF added). `-ign_eof` keeps it reading
/// until the server closes, and makes it send lines starting with `R` or
/// `Q` instead of taking them as its own commands.
fn s_client(port: u16, version: &str, input: &str) -> Run {
    s_client_with(port, version, &[], input)
}

/// [`s_client`] with more options.
fn s_client_with(port: u16, version: &str, extra: &[&str], input: &str) -> Run {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", &format!("-{version}")])
        .args(["-cipher", "DEFAULT:@SECLEVEL=0", "-crlf", "-ign_eof"])
        .args(["-servername", "localhost"])
        .args(extra)
        .args(["-connect", &format!("127.0.0.1:{port}")]);
    run(cmd, input)
}

const SESSION: &str = "USER alice\nPASS secret\nRETR 1\nQUIT\n";

/// A client that speaks only TLS 1.0, then one that speaks only TLS 1.1,
/// logs in on the legacy listener and retrieves the message; the same
/// TLS 1.0 client gets no further than the handshake on the rustls POP3S
/// listener of the same process.
#[test]
fn tls_1_0_and_1_1_clients_log_in_and_retrieve_on_the_legacy_listener_only() {
    let s = setup("");
    let legacy = s.pb.legacy_port("implicit");
    for (flag, protocol) in [("tls1", "TLSv1\n"), ("tls1_1", "TLSv1.1\n")] {
        let r = s_client(legacy, flag, SESSION);
        // Exit 0: the session ended with the server's close_notify.
        assert!(r.ok, "{flag}: s_client failed\n{}", r.out);
        assert!(
            r.out.contains(&format!("Protocol  : {protocol}")),
            "{flag}: not negotiated\n{}",
            r.out
        );
        let body_at = r.out.find(MARKER).unwrap_or_else(|| {
            panic!("{flag}: the message did not arrive\n{}", r.out);
        });
        assert!(
            r.out[..body_at].contains(" octets"),
            "{flag}: no RETR status line before the body\n{}",
            r.out
        );
    }
    let log = s.pb.log();
    assert!(
        log.contains("listener=\"legacy_pop3s\"") && log.contains("protocol=\"TLSv1\""),
        "the sessions are not logged as the legacy listener's:\n{log}"
    );

    // The rustls listener: a TLS 1.0 ClientHello ends the handshake.
    let r = s_client(s.pb.tls_port(), "tls1", SESSION);
    assert!(!r.ok, "TLS 1.0 accepted by the rustls listener\n{}", r.out);
    assert!(
        !r.out.contains(MARKER) && !r.out.contains("+OK"),
        "{}",
        r.out
    );
}

/// `min_version = "1.2"`: the legacy listener refuses TLS 1.0 and 1.1
/// (the security level stays the system's) and serves TLS 1.2.
#[test]
fn legacy_listener_with_min_version_1_2_refuses_tls_1_0_and_1_1() {
    let s = setup("min_version = \"1.2\"");
    let legacy = s.pb.legacy_port("implicit");
    for flag in ["tls1", "tls1_1"] {
        let r = s_client(legacy, flag, SESSION);
        assert!(!r.ok, "{flag} accepted with min_version 1.2\n{}", r.out);
        assert!(!r.out.contains("+OK"), "{flag}\n{}", r.out);
    }
    let r = s_client(legacy, "tls1_2", SESSION);
    assert!(r.out.contains("Protocol  : TLSv1.2\n"), "{}", r.out);
    assert!(r.out.contains(MARKER), "{}", r.out);
}

/// SIGHUP reloads the legacy listener's certificate with the `[tls]` one:
/// a TLS 1.0 client that trusts only the new CA gets through after the
/// reload, not before.
#[test]
fn sighup_reloads_the_legacy_listeners_certificate() {
    let s = setup("");
    let legacy = s.pb.legacy_port("implicit");
    let b = Pki::new("legacy-tls reload CA two");
    let trusting = |pki: &Pki| {
        let ca = pki.ca_path();
        s_client_with(
            legacy,
            "tls1",
            &["-CAfile", ca.to_str().unwrap(), "-verify_return_error"],
            "QUIT\n",
        )
    };
    let r = trusting(&s.pki);
    assert!(
        r.ok && r.out.contains("+OK"),
        "first certificate\n{}",
        r.out
    );
    let r = trusting(&b);
    assert!(!r.ok && !r.out.contains("+OK"), "{}", r.out);

    // The configuration names the first Pki's files: overwrite them.
    b.leaf.write(&s.pki.cert_path(), &s.pki.key_path());
    let ok = Command::new("kill")
        .args(["-HUP", &s.pb.pid().to_string()])
        .status()
        .is_ok_and(|st| st.success());
    assert!(ok, "kill -HUP failed");
    wait_for_log(|| s.pb.log(), "configuration reloaded", 1);
    let r = trusting(&b);
    assert!(
        r.ok && r.out.contains("+OK"),
        "not the new certificate after SIGHUP\n{}",
        r.out
    );
}

// ---------------------------------------------------------------------------
// PHP's imap extension (c-client)
// ---------------------------------------------------------------------------

/// Opens `mailbox` with PHP's `imap_open` as alice and prints `COUNT n`
/// and `HAS_MARKER yes|no` for message 1, or `ERR ...`.
const PHP_SCRIPT: &str = r#"
$m = @imap_open($argv[1], "alice", "secret", 0, 0);
if (!$m) { echo "ERR ", implode(" | ", imap_errors() ?: []), "\n"; exit(0); }
echo "COUNT ", imap_num_msg($m), "\n";
$body = imap_body($m, 1);
echo "HAS_MARKER ", (strpos($body, $argv[2]) !== false ? "yes" : "no"), "\n";
imap_close($m);
"#;

/// Whether php with the imap extension is here; prints why not.
fn php_imap_available() -> bool {
    let ok = Command::new("php")
        .args(["-r", "exit(function_exists('imap_open') ? 0 : 1);"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "SKIPPED: php or its imap extension is not installed (Debian: php-cli php-imap; scripts/install-test-deps.sh installs them)"
        );
    }
    ok
}

/// `imap_open` on `mailbox`; `openssl_conf`: a client-side OpenSSL
/// configuration (`OPENSSL_CONF`).
fn php_open(mailbox: &str, openssl_conf: Option<&Path>) -> Run {
    let mut cmd = Command::new("php");
    cmd.args(["-r", PHP_SCRIPT, "--", mailbox, MARKER]);
    if let Some(conf) = openssl_conf {
        cmd.env("OPENSSL_CONF", conf);
    }
    run(cmd, "")
}

/// PHP with `/pop3/ssl` (TLS from the first byte) reads the message
/// through the legacy listener.
#[test]
fn php_imap_open_pop3_ssl_reads_mail_through_the_legacy_listener() {
    if !php_imap_available() {
        return;
    }
    let s = setup("");
    let port = s.pb.legacy_port("implicit");
    let r = php_open(
        &format!("{{127.0.0.1:{port}/pop3/ssl/novalidate-cert}}INBOX"),
        None,
    );
    assert!(
        r.ok && r.out.contains("COUNT 1\n") && r.out.contains("HAS_MARKER yes\n"),
        "{}",
        r.out
    );
    assert!(
        s.pb.log().contains("legacy TLS handshake done"),
        "not served by the legacy listener:\n{}",
        s.pb.log()
    );
}

/// A c-client whose OpenSSL still allows TLS 1.0 (an older distribution's
/// PHP; here the client's level is lowered through `OPENSSL_CONF`): with
/// `/pop3/tls` c-client offers TLS 1.0 alone after STLS (its TLSv1 method).
/// The legacy listener in `stls` mode serves it; the rustls plain listener
/// of the same process cannot (this is the failure of issue 17 item 18).
#[test]
fn php_imap_open_pop3_tls_negotiates_tls_1_0_on_the_legacy_stls_listener() {
    if !php_imap_available() {
        return;
    }
    let s = setup("mode = \"stls\"");
    let conf = s.dir.path().join("old-client-openssl.cnf");
    fs::write(
        &conf,
        "openssl_conf = openssl_init\n[openssl_init]\nssl_conf = ssl_sect\n\
         [ssl_sect]\nsystem_default = system_default_sect\n\
         [system_default_sect]\nMinProtocol = TLSv1\nCipherString = DEFAULT:@SECLEVEL=0\n",
    )
    .unwrap();
    let port = s.pb.legacy_port("stls");
    let r = php_open(
        &format!("{{127.0.0.1:{port}/pop3/tls/novalidate-cert}}INBOX"),
        Some(&conf),
    );
    assert!(
        r.ok && r.out.contains("COUNT 1\n") && r.out.contains("HAS_MARKER yes\n"),
        "{}",
        r.out
    );
    let log = s.pb.log();
    assert!(
        log.contains("listener=\"legacy_pop3\"") && log.contains("protocol=\"TLSv1\""),
        "no TLS 1.0 session on the legacy listener:\n{log}"
    );

    let r = php_open(
        &format!("{{127.0.0.1:{}/pop3/tls/novalidate-cert}}INBOX", s.pb.port),
        Some(&conf),
    );
    assert!(
        r.out.contains("ERR ") && !r.out.contains("COUNT"),
        "the rustls listener served a TLS 1.0 client:\n{}",
        r.out
    );
}
