//! OAuth2 upstreams (issue 8), end to end: a real Dovecot whose `oauth2`
//! passdb validates the bearer tokens popbridge presents (XOAUTH2 and
//! OAUTHBEARER) by introspection at a real OAuth2 authorization server on
//! loopback (`tests/oauth_server.py`), which issues, refreshes, rotates and
//! revokes them.
//!
//! Two layers:
//! - `upstream_*`: popbridge's IMAP connector logging in with a bearer token
//!   (the library, no OAuth2 runtime needed): both mechanisms, SASL-IR and
//!   the two-step exchange, a refused token read from the error challenge,
//!   a temporary failure, a server without the mechanism, and the exact
//!   lines on the wire (scripted server).
//! - `pop3_*`: the popbridge binary with `popbridge oauth add` (device flow,
//!   approved through the server's control endpoint) and `popbridge device
//!   add`, then POP3 clients logging in with device passwords.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::oauth::*;
use crate::common::ports::ClosedPort;
use crate::common::*;
use popbridge::config::{NoUidplus, ProviderSasl, SaslMechanism};
use popbridge::imap::{AccessToken, Connector, Credentials, Upstream, UpstreamError};
use popbridge::imap::{ImapConfig, ImapConnector, UpstreamTlsSetup};
use popbridge::oauth::service::BACKOFF_BASE;

pub(crate) const ACCOUNT: &str = "alice@example.org";
const OTHER: &str = "bob@example.org";
fn oauth_dovecot(oauth: &OauthServer) -> Dovecot {
    oauth_dovecot_for(oauth, &[ACCOUNT, OTHER])
}

fn connector(imap_port: u16) -> ImapConnector {
    ImapConnector::new(ImapConfig {
        address: format!("127.0.0.1:{imap_port}"),
        mailbox: "INBOX".into(),
        connect_timeout: Duration::from_secs(10),
        command_timeout: Duration::from_secs(30),
        no_uidplus: NoUidplus::Refuse,
        login_mechanism: popbridge::config::LoginMechanism::Auto,
        tls: UpstreamTlsSetup::None,
        cache: None,
        send_client_id: false,
        reuse_xuidl: false,
    })
}

fn token(t: &str) -> AccessToken {
    AccessToken::new(t, Instant::now() + Duration::from_secs(3600))
}

const XOAUTH2_IR: ProviderSasl = ProviderSasl {
    mechanism: SaslMechanism::XOauth2,
    two_step: false,
};
const XOAUTH2_TWO_STEP: ProviderSasl = ProviderSasl {
    mechanism: SaslMechanism::XOauth2,
    two_step: true,
};
const OAUTHBEARER_IR: ProviderSasl = ProviderSasl {
    mechanism: SaslMechanism::OauthBearer,
    two_step: false,
};
const OAUTHBEARER_TWO_STEP: ProviderSasl = ProviderSasl {
    mechanism: SaslMechanism::OauthBearer,
    two_step: true,
};

/// Logs in with a bearer token through popbridge's connector; on success
/// the message count of the snapshot.
fn bearer_login(
    imap_port: u16,
    account: &str,
    access: &str,
    sasl: ProviderSasl,
) -> Result<usize, UpstreamError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = connector(imap_port);
        let t = token(access);
        let (conn, snap) = c
            .login(
                Credentials::Bearer {
                    account,
                    token: &t,
                    sasl,
                },
                None,
                None,
            )
            .await?;
        conn.logout().await;
        Ok(snap.messages.len())
    })
}

#[test]
fn upstream_bearer_login_with_both_mechanisms_and_both_exchanges() {
    let oauth = OauthServer::start();
    let dovecot = oauth_dovecot(&oauth);
    dovecot.deliver(ACCOUNT, &corpus_message("plain_crlf"));
    dovecot.deliver(ACCOUNT, &corpus_message("plain_crlf"));
    let (access, _refresh) = oauth.device_flow_token(ACCOUNT);
    for sasl in [
        XOAUTH2_IR,
        XOAUTH2_TWO_STEP,
        OAUTHBEARER_IR,
        OAUTHBEARER_TWO_STEP,
    ] {
        let n = bearer_login(dovecot.imap_port, ACCOUNT, &access, sasl)
            .unwrap_or_else(|e| panic!("{sasl:?}: {e}"));
        assert_eq!(n, 2, "{sasl:?}");
    }
    // Dovecot checked each token by introspection, and found it active.
    let stats = oauth.stats();
    assert_eq!(stats.introspections_active, 4, "{}", stats.raw);
}

#[test]
fn upstream_refused_token_is_token_rejected_with_the_providers_status() {
    let oauth = OauthServer::start();
    let dovecot = oauth_dovecot(&oauth);
    let (access, _refresh) = oauth.device_flow_token(ACCOUNT);
    assert_eq!(oauth.expire_access_tokens(), 1);
    // Dovecot sends {"status":"401",...} for XOAUTH2 and
    // {"status":"invalid_token"} for OAUTHBEARER as the error challenge;
    // popbridge answers it (or Dovecot would wait) and reads the NO.
    for (sasl, status) in [
        (XOAUTH2_IR, "401"),
        (XOAUTH2_TWO_STEP, "401"),
        (OAUTHBEARER_IR, "invalid_token"),
        (OAUTHBEARER_TWO_STEP, "invalid_token"),
    ] {
        match bearer_login(dovecot.imap_port, ACCOUNT, &access, sasl) {
            Err(UpstreamError::TokenRejected { status: s, text }) => {
                assert_eq!(s.as_deref(), Some(status), "{sasl:?}");
                assert!(text.contains("AUTHENTICATIONFAILED"), "{sasl:?}: {text}");
                // The error never carries the token.
                assert!(!text.contains(&access));
            }
            other => panic!("{sasl:?}: expected TokenRejected, got {other:?}"),
        }
    }
    // A token for another account is refused the same way: Dovecot
    // compares the introspected user name with the SASL one.
    let (bobs, _) = oauth.device_flow_token(OTHER);
    assert!(matches!(
        bearer_login(dovecot.imap_port, ACCOUNT, &bobs, XOAUTH2_IR),
        Err(UpstreamError::TokenRejected { .. })
    ));
}

#[test]
fn upstream_introspection_failure_is_throttled_not_a_token_problem() {
    let oauth = OauthServer::start();
    let dovecot = oauth_dovecot(&oauth);
    let (access, _refresh) = oauth.device_flow_token(ACCOUNT);
    // Dovecot answers NO [UNAVAILABLE] when it cannot check the token: the
    // token may be fine, so it must not be thrown away.
    oauth.fail_introspection(1);
    match bearer_login(dovecot.imap_port, ACCOUNT, &access, OAUTHBEARER_IR) {
        Err(UpstreamError::Throttled(text)) => assert!(text.contains("UNAVAILABLE"), "{text}"),
        other => panic!("expected Throttled, got {other:?}"),
    }
    assert_eq!(
        bearer_login(dovecot.imap_port, ACCOUNT, &access, OAUTHBEARER_IR).unwrap(),
        0
    );
}

#[test]
fn upstream_without_the_mechanism_fails_clearly() {
    // Dovecot without the oauth2 passdb offers PLAIN and LOGIN only.
    let dovecot = Dovecot::start();
    match bearer_login(dovecot.imap_port, "alice", "whatever", XOAUTH2_IR) {
        Err(UpstreamError::Unsupported(text)) => {
            assert!(text.contains("AUTH=XOAUTH2"), "{text}")
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    match bearer_login(dovecot.imap_port, "alice", "whatever", OAUTHBEARER_IR) {
        Err(UpstreamError::Unsupported(text)) => {
            assert!(text.contains("AUTH=OAUTHBEARER"), "{text}")
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    // Nothing was sent: Dovecot logged no authentication attempt.
    assert!(
        !dovecot.log().contains("auth failed") && !dovecot.log().contains("xoauth2"),
        "{}",
        dovecot.log()
    );
}

/// A scripted IMAP server: sends `script` lines in order, where a line
/// starting with `C: ` is instead one line expected from the client (the
/// line read is recorded). Returns the lines the client sent.
fn scripted_server(script: Vec<String>) -> (u16, std::thread::JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut w = stream.try_clone().unwrap();
        let mut r = BufReader::new(stream);
        let mut got = Vec::new();
        for line in script {
            if line.starts_with("C: ") {
                let mut l = String::new();
                if r.read_line(&mut l).unwrap_or(0) == 0 {
                    break;
                }
                got.push(l.trim_end_matches("\r\n").to_string());
            } else {
                w.write_all(format!("{line}\r\n").as_bytes()).unwrap();
            }
        }
        got
    });
    (port, handle)
}

#[test]
fn upstream_wire_lines_for_sasl_ir_two_step_and_error_challenges() {
    let greeting = "* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2 AUTH=OAUTHBEARER] ready";
    let x = |s: &str| s.to_string();
    let ir = base64_encode(b"user=u@x\x01auth=Bearer T0K\x01\x01");
    // SASL-IR: one line; then the server refuses with an error challenge.
    let (port, h) = scripted_server(vec![
        x(greeting),
        x("C: "),
        x("+ eyJzdGF0dXMiOiI0MDEifQ=="),
        x("C: "),
        x("pb1 NO [AUTHENTICATIONFAILED] Authentication failed."),
    ]);
    let r = bearer_login(port, "u@x", "T0K", XOAUTH2_IR);
    assert_eq!(
        h.join().unwrap(),
        vec![format!("pb1 AUTHENTICATE XOAUTH2 {ir}"), String::new()]
    );
    assert!(
        matches!(&r, Err(UpstreamError::TokenRejected { status: Some(s), .. }) if s == "401"),
        "{r:?}"
    );

    // Two steps (Microsoft's documented exchange), even with SASL-IR.
    let (port, h) = scripted_server(vec![
        x(greeting),
        x("C: "),
        x("+ "),
        x("C: "),
        x("+ eyJzdGF0dXMiOiI0MDEifQ=="),
        x("C: "),
        x("pb1 NO [AUTHENTICATIONFAILED] Authentication failed."),
    ]);
    let _ = bearer_login(port, "u@x", "T0K", XOAUTH2_TWO_STEP);
    assert_eq!(
        h.join().unwrap(),
        vec!["pb1 AUTHENTICATE XOAUTH2".to_string(), ir, String::new()]
    );

    // OAUTHBEARER: RFC 7628 §3.1 initial response, the %x01 dummy after
    // the error challenge (§3.2.3).
    let (port, h) = scripted_server(vec![
        x(greeting),
        x("C: "),
        x("+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0="),
        x("C: "),
        x("pb1 NO [AUTHENTICATIONFAILED] Authentication failed."),
    ]);
    let r = bearer_login(port, "u@x", "T0K", OAUTHBEARER_IR);
    let got = h.join().unwrap();
    let expected = base64_encode(
        format!("n,a=u@x,\x01host=127.0.0.1\x01port={port}\x01auth=Bearer T0K\x01\x01").as_bytes(),
    );
    assert_eq!(
        got,
        vec![
            format!("pb1 AUTHENTICATE OAUTHBEARER {expected}"),
            "AQ==".to_string()
        ]
    );
    assert!(
        matches!(&r, Err(UpstreamError::TokenRejected { status: Some(s), .. }) if s == "invalid_token"),
        "{r:?}"
    );

    // Without SASL-IR the initial response waits for the continuation.
    let (port, h) = scripted_server(vec![
        x("* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ready"),
        x("C: "),
        x("+ "),
        x("C: "),
        x("pb1 NO [THROTTLED] Account exceeded command or bandwidth limits."),
    ]);
    let r = bearer_login(port, "u@x", "T0K", XOAUTH2_IR);
    assert_eq!(
        h.join().unwrap(),
        vec![
            "pb1 AUTHENTICATE XOAUTH2".to_string(),
            base64_encode(b"user=u@x\x01auth=Bearer T0K\x01\x01")
        ]
    );
    assert!(matches!(r, Err(UpstreamError::Throttled(_))), "{r:?}");
}

/// Password logins are written by popbridge too now (never by async-imap,
/// which logs command lines): AUTHENTICATE PLAIN with SASL-IR, PLAIN in two
/// steps without it, and LOGIN with quoting when PLAIN is not offered.
#[test]
fn upstream_password_login_lines() {
    let x = |s: &str| s.to_string();
    let login = |port: u16, user: &str, pass: &[u8]| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let pass = popbridge::pop3::command::Secret::new(pass.to_vec());
            connector(port)
                .login(Credentials::Password { user, pass: &pass }, None, None)
                .await
                .map(|_| ())
        })
    };
    let (port, h) = scripted_server(vec![
        x("* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready"),
        x("C: "),
        x("pb1 NO [AUTHENTICATIONFAILED] Authentication failed."),
    ]);
    let r = login(port, "alice", b"s\"e\\cret");
    assert_eq!(
        h.join().unwrap(),
        vec![format!(
            "pb1 AUTHENTICATE PLAIN {}",
            base64_encode(b"\0alice\0s\"e\\cret")
        )]
    );
    assert!(matches!(r, Err(UpstreamError::AuthFailed(_))), "{r:?}");

    let (port, h) = scripted_server(vec![
        x("* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready"),
        x("C: "),
        x("+ "),
        x("C: "),
        x("pb1 NO [UNAVAILABLE] Temporary authentication failure."),
    ]);
    let r = login(port, "alice", b"pw");
    assert_eq!(
        h.join().unwrap(),
        vec![
            "pb1 AUTHENTICATE PLAIN".to_string(),
            base64_encode(b"\0alice\0pw")
        ]
    );
    assert!(matches!(r, Err(UpstreamError::Throttled(_))), "{r:?}");

    let (port, h) = scripted_server(vec![
        x("* OK [CAPABILITY IMAP4rev1] ready"),
        x("C: "),
        x("pb1 NO [AUTHENTICATIONFAILED] Authentication failed."),
    ]);
    let r = login(port, "al\"ice", b"p\\w d");
    assert_eq!(
        h.join().unwrap(),
        vec![r#"pb1 LOGIN "al\"ice" "p\\w d""#.to_string()]
    );
    assert!(matches!(r, Err(UpstreamError::AuthFailed(_))), "{r:?}");

    let (port, h) = scripted_server(vec![x("* OK [CAPABILITY IMAP4rev1 LOGINDISABLED] ready")]);
    let r = login(port, "alice", b"pw");
    h.join().unwrap();
    assert!(matches!(r, Err(UpstreamError::Unsupported(_))), "{r:?}");
}

// ---------------------------------------------------------------------------
// The popbridge binary: enrolment, devices, POP3 logins
// ---------------------------------------------------------------------------

/// The OAUTHBEARER provider (generic preset) and its devices' domain.
pub(crate) const CORP: &str = "corp";
pub(crate) const CORP_DEVICES: &str = "corp.example";
/// The XOAUTH2 provider with Microsoft's two-step exchange, and its
/// devices' domain.
const XO: &str = "xo";
const XO_DEVICES: &str = "xo.example";
/// A client secret and store key: they must never be printed.
const CLIENT_SECRET: &str = "client-secret-5f2a9c";
const STORE_KEY_B64: &str = "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=";
/// Failed logins for one user name before further ones are refused.
const MAX_FAILURES_PER_USER: u32 = 2;

/// An OAuth2 server, a Dovecot that trusts it, and a popbridge
/// configuration with two providers pointing at that server: `corp`
/// (OAUTHBEARER, SASL-IR) for devices `*@corp.example`, `xo` (XOAUTH2, two
/// steps) for devices `*@xo.example`.
pub(crate) struct Setup {
    pub(crate) oauth: OauthServer,
    pub(crate) dovecot: Dovecot,
    dir: tempfile::TempDir,
    pub(crate) config: std::path::PathBuf,
}

impl Setup {
    fn new() -> Setup {
        Setup::with_corp_route("")
    }

    /// With more keys for the `corp` route (e.g. its delete policy).
    fn with_corp_route(corp_extra: &str) -> Setup {
        Setup::with_keys(corp_extra, "")
    }

    /// With more keys for the `corp` route and for `[oauth]` (e.g. the
    /// Redis store).
    pub(crate) fn with_keys(corp_extra: &str, oauth_extra: &str) -> Setup {
        let oauth = OauthServer::start_with(OauthServerOptions {
            client_secret: Some(CLIENT_SECRET.to_string()),
            ..OauthServerOptions::default()
        });
        let dovecot = oauth_dovecot(&oauth);
        let dir = tempfile::Builder::new()
            .prefix("pboauth-")
            .tempdir()
            .unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let key = dir.path().join("store.key");
        write_private(&key, format!("{STORE_KEY_B64}\n"));
        let secret = dir.path().join("client.secret");
        std::fs::write(&secret, format!("{CLIENT_SECRET}\n")).unwrap();
        let provider = |name: &str, mechanism: &str, two_step: bool| {
            format!(
                "[[oauth.providers]]\n\
                 name = \"{name}\"\n\
                 preset = \"generic\"\n\
                 client_id = \"{}\"\n\
                 client_secret_file = \"{}\"\n\
                 device_authorization_url = \"{}\"\n\
                 token_url = \"{}\"\n\
                 revocation_url = \"{}\"\n\
                 scopes = [\"mail\"]\n\
                 mechanism = \"{mechanism}\"\n\
                 two_step = {two_step}\n",
                oauth.options.client_id,
                secret.display(),
                oauth.device_url(),
                oauth.token_url(),
                oauth.revoke_url(),
            )
        };
        let config = dir.path().join("popbridge.toml");
        // Session reuse off: these tests follow each POP3 login to its own
        // bearer login (the reuse test turns it on).
        let text = format!(
            "[upstream]\n\
             tls = \"none\"\n\
             reuse_idle_secs = 0\n\
             [routing]\n\
             default_route = false\n\
             [[routes]]\n\
             name = \"corp\"\n\
             domains = [\"{CORP_DEVICES}\"]\n\
             auth = \"oauth2\"\n\
             oauth_provider = \"{CORP}\"\n\
             {corp_extra}\
             [[routes]]\n\
             name = \"xo\"\n\
             domains = [\"{XO_DEVICES}\"]\n\
             auth = \"oauth2\"\n\
             oauth_provider = \"{XO}\"\n\
             [auth]\n\
             plaintext_networks = [\"127.0.0.0/8\"]\n\
             failure_delay_ms = 100\n\
             max_failures_per_user = {MAX_FAILURES_PER_USER}\n\
             [data]\n\
             dir = \"{}\"\n\
             [oauth]\n\
             key_file = \"{}\"\n\
             {oauth_extra}\n\
             {}{}",
            data.display(),
            key.display(),
            provider(CORP, "oauthbearer", false),
            provider(XO, "xoauth2", true),
        );
        std::fs::write(&config, text).unwrap();
        Setup {
            oauth,
            dovecot,
            dir,
            config,
        }
    }

    /// `popbridge --config C ARGS...`, run to completion.
    fn run(&self, name: &str, args: &[&str]) -> Run {
        run_program(
            Command::new(env!("CARGO_BIN_EXE_popbridge"))
                .arg("--config")
                .arg(&self.config)
                .args(args),
            self.dir.path(),
            name,
        )
    }

    /// `popbridge oauth add ACCOUNT --provider P`: the device flow. The
    /// test plays the user: it reads the code popbridge prints and approves
    /// it at the server's control endpoint.
    pub(crate) fn enrol(&self, account: &str, provider: &str) {
        self.enrol_approved_by(account, provider, account)
    }

    /// Enrols `account`, but the user who signs in at the provider is
    /// `approver` (so the tokens are `approver`'s).
    fn enrol_approved_by(&self, account: &str, provider: &str, approver: &str) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_popbridge"))
            .arg("--config")
            .arg(&self.config)
            .args(["oauth", "add", account, "--provider", provider])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn popbridge oauth add");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut printed = Vec::new();
        let code = loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    // RFC 8628 §6.1 codes as the server makes them: XXXX-XXXX.
                    let t = line.trim();
                    printed.push(line.clone());
                    if t.len() == 9 && t.as_bytes()[4] == b'-' {
                        break t.to_string();
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let out = child.wait_with_output().unwrap();
                    panic!(
                        "oauth add printed no user code: {printed:?}\nstderr: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        };
        // The printed text names the account and the verification URL.
        let all = printed.join("\n");
        assert!(all.contains(account), "{all}");
        assert!(all.contains(&self.oauth.base_url()), "{all}");
        self.oauth.approve(&code, approver);
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "oauth add did not finish");
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        assert!(status.success(), "oauth add {account}: {status}\n{err}");
        // Nothing secret on the terminal.
        assert!(!err.contains(CLIENT_SECRET) && !all.contains(CLIENT_SECRET));
    }

    /// `popbridge device add LOGIN --account A --password-file F`.
    pub(crate) fn add_device(&self, login: &str, account: &str, password: &str) {
        self.add_device_with(login, account, password, &[])
    }

    /// `device add` with more arguments (e.g. `--allow CIDR`).
    fn add_device_with(&self, login: &str, account: &str, password: &str, more: &[&str]) {
        let file = self.dir.path().join(format!("pw-{login}"));
        std::fs::write(&file, format!("{password}\n")).unwrap();
        let mut args = vec![
            "device",
            "add",
            login,
            "--account",
            account,
            "--password-file",
            file.to_str().unwrap(),
        ];
        args.extend_from_slice(more);
        let r = self.run(&format!("device-add-{login}"), &args);
        assert!(
            r.status.success(),
            "device add {login}: {}\n{}",
            r.status,
            r.stderr
        );
        assert!(!String::from_utf8_lossy(&r.stdout).contains(password));
    }

    /// popbridge serving this configuration, logging at trace level (so a
    /// token that reached any log statement would show).
    fn popbridge(&self) -> Popbridge {
        self.popbridge_to(self.dovecot.imap_port)
    }

    /// popbridge with its upstream at 127.0.0.1:`imap_port` (a proxy).
    fn popbridge_to(&self, imap_port: u16) -> Popbridge {
        Popbridge::start_with_log(
            imap_port,
            &["--config", self.config.to_str().unwrap()],
            "trace",
        )
    }

    pub(crate) fn refreshes(&self) -> u64 {
        self.oauth.stats().grant("refresh_token")
    }
}

/// Logs in and returns the answer to PASS.
fn pop3_pass(port: u16, user: &str, pass: &str) -> String {
    let mut p = Pop3::connect(port);
    let r = p.cmd(&format!("USER {user}"));
    assert!(r.starts_with("+OK"), "USER {user}: {r}");
    let r = p.cmd(&format!("PASS {pass}"));
    let _ = p.cmd("QUIT");
    r
}

/// Logs in, checks the mailbox holds `want` messages and that message 1 is
/// `first`, quits without deleting.
pub(crate) fn pop3_fetch(port: u16, user: &str, pass: &str, want: usize, first: &[u8]) {
    let mut p = Pop3::connect(port);
    p.login(user, pass);
    assert_eq!(p.stat().0, want, "{user}");
    let body = p.retr(1);
    assert_eq!(
        normalize_newlines(&body),
        normalize_newlines(first),
        "{user}: message 1"
    );
    assert!(p.cmd("QUIT").starts_with("+OK"));
}

fn normalize_newlines(b: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(b)
        .replace("\r\n", "\n")
        .into_bytes()
}

/// No bearer token, SASL response or password in popbridge's log: the
/// base64 of the XOAUTH2 (`user=`) and OAUTHBEARER (`n,a=`) responses, the
/// `auth=Bearer` field, and the given secrets.
fn assert_log_has_no_secrets(log: &str, secrets: &[&str]) {
    // HTTP Basic client authentication (RFC 6749 §2.3.1), a token request
    // body, a token response body.
    let basic = base64_encode(format!("popbridge-test:{CLIENT_SECRET}").as_bytes());
    let fixed = [
        "dXNlcj0",
        "bixhPS",
        "Bearer ",
        "auth=Bearer",
        CLIENT_SECRET,
        STORE_KEY_B64,
        basic.as_str(),
        "refresh_token=",
        "\"access_token\"",
        "\"refresh_token\"",
    ];
    for needle in fixed.iter().chain(secrets) {
        assert!(!log.contains(needle), "popbridge's log holds {needle:?}");
    }
}

pub(crate) fn message(subject: &str) -> Vec<u8> {
    format!(
        "From: a@example.org\r\nTo: b@example.org\r\nSubject: {subject}\r\nMessage-ID: <{subject}@example.org>\r\n\r\nBody of {subject}.\r\n"
    )
    .into_bytes()
}

#[test]
fn pop3_enrol_two_devices_expire_rotate_revoke() {
    let s = Setup::new();
    s.enrol(ACCOUNT, CORP);
    assert_eq!(s.oauth.stats().grant("device_code"), 1);
    let phone = format!("phone@{CORP_DEVICES}");
    let laptop = format!("laptop@{CORP_DEVICES}");
    s.add_device(&phone, ACCOUNT, "phone-pass-1");
    s.add_device(&laptop, ACCOUNT, "laptop-pass-2");
    let first = message("first");
    s.dovecot.deliver(ACCOUNT, &first);
    s.dovecot.deliver(ACCOUNT, &message("second"));
    let pb = s.popbridge();

    // Each device password reads the account's mailbox.
    pop3_fetch(pb.port, &phone, "phone-pass-1", 2, &first);
    pop3_fetch(pb.port, &laptop, "laptop-pass-2", 2, &first);
    // A real client too: python's poplib.
    let script = format!(
        "import poplib\n\
         p = poplib.POP3('127.0.0.1', {})\n\
         p.user('{laptop}')\n\
         p.pass_('laptop-pass-2')\n\
         print(p.stat()[0])\n\
         print(b'\\n'.join(p.retr(1)[1]).decode())\n\
         p.quit()\n",
        pb.port
    );
    let r = run_program(
        Command::new("python3").arg("-c").arg(&script),
        s.dir.path(),
        "poplib",
    );
    assert!(r.status.success(), "poplib: {}", r.stderr);
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.starts_with("2\n"), "{out}");
    assert!(out.contains("Subject: first"), "{out}");
    let warm = s.refreshes();

    // The access token expires at the server: the next fetch works, with
    // exactly one refresh, and the other device uses the new token.
    assert!(s.oauth.expire_access_tokens() >= 1);
    pop3_fetch(pb.port, &phone, "phone-pass-1", 2, &first);
    assert_eq!(s.refreshes(), warm + 1, "{}", s.oauth.stats().raw);
    pop3_fetch(pb.port, &laptop, "laptop-pass-2", 2, &first);
    assert_eq!(s.refreshes(), warm + 1, "{}", s.oauth.stats().raw);

    // The refresh rotated the refresh token: the old one is dead, one is
    // valid, and it is the one popbridge kept (the next refresh works).
    let stats = s.oauth.stats();
    assert!(stats.rotated_refresh_tokens >= 1, "{}", stats.raw);
    assert_eq!(stats.active_refresh(ACCOUNT), 1, "{}", stats.raw);
    assert_eq!(stats.refresh_reuse, 0, "{}", stats.raw);
    s.oauth.expire_access_tokens();
    pop3_fetch(pb.port, &laptop, "laptop-pass-2", 2, &first);
    assert_eq!(s.refreshes(), warm + 2, "{}", s.oauth.stats().raw);
    assert_eq!(s.oauth.stats().refresh_reuse, 0);

    // The user revokes popbridge's access: devices get a clear -ERR [AUTH]
    // and the log names the account and the command that fixes it.
    assert_eq!(s.oauth.revoke_refresh_tokens(Some(ACCOUNT)), 1);
    s.oauth.expire_access_tokens();
    let r = pop3_pass(pb.port, &phone, "phone-pass-1");
    assert_eq!(
        r,
        format!(
            "-ERR [AUTH] {}",
            popbridge::bridge::replies::NEEDS_ENROLMENT_TEXT
        )
    );
    assert!(s.oauth.stats().token_error("invalid_grant") >= 1);
    let log = pb.log();
    let line = log
        .lines()
        .find(|l| l.contains("needs re-enrolment"))
        .unwrap_or_else(|| panic!("no re-enrolment log line:\n{log}"));
    assert!(line.contains(ACCOUNT), "{line}");
    assert!(
        line.contains(&format!("popbridge oauth add {ACCOUNT} --provider {CORP}")),
        "{line}"
    );
    // The answer stays the same for the other device, without asking the
    // provider again for a grant it knows is gone.
    let errors = s.oauth.stats().token_error("invalid_grant");
    let r = pop3_pass(pb.port, &laptop, "laptop-pass-2");
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    assert_eq!(s.oauth.stats().token_error("invalid_grant"), errors);

    // Re-enrolment brings the devices back.
    s.enrol(ACCOUNT, CORP);
    pop3_fetch(pb.port, &phone, "phone-pass-1", 2, &first);

    assert_log_has_no_secrets(&pb.log(), &["phone-pass-1", "laptop-pass-2"]);
}

#[test]
fn pop3_wrong_device_password_is_throttled_and_never_reaches_the_provider() {
    let s = Setup::new();
    s.enrol(ACCOUNT, CORP);
    let phone = format!("phone@{CORP_DEVICES}");
    s.add_device(&phone, ACCOUNT, "right-password");
    // A device allowed only from another network.
    let remote = format!("remote@{CORP_DEVICES}");
    s.add_device_with(
        &remote,
        ACCOUNT,
        "remote-password",
        &["--allow", "10.9.0.0/16"],
    );
    let pb = s.popbridge();
    let before = s.oauth.stats();
    let dovecot_log = s.dovecot.log();

    // A wrong password and an unknown device: -ERR [AUTH], like any
    // refused password.
    let r = pop3_pass(pb.port, &phone, "wrong-password");
    assert_eq!(r, "-ERR [AUTH] Authentication failed.");
    let r = pop3_pass(pb.port, &format!("nobody@{CORP_DEVICES}"), "x");
    assert_eq!(r, "-ERR [AUTH] Authentication failed.");
    let r = pop3_pass(pb.port, &remote, "remote-password");
    assert_eq!(r, "-ERR [AUTH] Authentication failed.");
    // MAX_FAILURES_PER_USER = 2: after the second failure for the name,
    // even the right password is refused without being checked.
    let r = pop3_pass(pb.port, &phone, "wrong-again");
    assert_eq!(r, "-ERR [AUTH] Authentication failed.");
    let r = pop3_pass(pb.port, &phone, "right-password");
    assert_eq!(
        r,
        "-ERR [SYS/TEMP] Too many failed logins for this user, try again later."
    );

    // Neither the OAuth2 server nor Dovecot heard of any of it.
    let after = s.oauth.stats();
    assert_eq!(after.grants, before.grants, "{}", after.raw);
    assert_eq!(after.token_errors, before.token_errors, "{}", after.raw);
    assert_eq!(after.introspections, before.introspections, "{}", after.raw);
    assert_eq!(after.throttled, before.throttled);
    let new_log = &s.dovecot.log()[dovecot_log.len()..];
    assert!(
        !new_log.contains("imap-login") && !new_log.contains("oauth2"),
        "Dovecot saw a login attempt:\n{new_log}"
    );
    let log = pb.log();
    assert!(log.contains("device login refused"), "{log}");
    assert_log_has_no_secrets(
        &log,
        &[
            "wrong-password",
            "wrong-again",
            "right-password",
            "remote-password",
        ],
    );
}

#[test]
fn pop3_xoauth2_two_step_route() {
    let s = Setup::new();
    s.enrol(OTHER, XO);
    let scanner = format!("scanner@{XO_DEVICES}");
    s.add_device(&scanner, OTHER, "scanner-pass-99");
    let first = message("for-bob");
    s.dovecot.deliver(OTHER, &first);
    let pb = s.popbridge();
    pop3_fetch(pb.port, &scanner, "scanner-pass-99", 1, &first);
    // And with curl, a second real client (AUTH PLAIN with SASL-IR).
    let r = run_program(
        Command::new("curl")
            .arg("-sS")
            .arg("--user")
            .arg(format!("{scanner}:scanner-pass-99"))
            .arg(format!("pop3://127.0.0.1:{}/1", pb.port)),
        s.dir.path(),
        "curl",
    );
    assert!(r.status.success(), "curl: {}", r.stderr);
    assert!(
        String::from_utf8_lossy(&r.stdout).contains("Subject: for-bob"),
        "{}",
        String::from_utf8_lossy(&r.stdout)
    );
    // Expired token: refused (XOAUTH2 error challenge), one refresh, retry.
    let warm = s.refreshes();
    s.oauth.expire_access_tokens();
    pop3_fetch(pb.port, &scanner, "scanner-pass-99", 1, &first);
    assert_eq!(s.refreshes(), warm + 1);
    assert_log_has_no_secrets(&pb.log(), &["scanner-pass-99"]);
}

#[test]
fn pop3_many_devices_after_expiry_share_one_refresh() {
    const DEVICES: usize = 8;
    let s = Setup::new();
    s.enrol(ACCOUNT, CORP);
    let logins: Vec<String> = (0..DEVICES)
        .map(|i| format!("dev{i}@{CORP_DEVICES}"))
        .collect();
    for (i, l) in logins.iter().enumerate() {
        s.add_device(l, ACCOUNT, &format!("device-pass-{i:04}"));
    }
    let first = message("shared");
    s.dovecot.deliver(ACCOUNT, &first);
    let pb = s.popbridge();
    pop3_fetch(pb.port, &logins[0], "device-pass-0000", 1, &first);
    let warm = s.refreshes();
    s.oauth.expire_access_tokens();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(DEVICES));
    let port = pb.port;
    let threads: Vec<_> = logins
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let barrier = barrier.clone();
            let l = l.clone();
            let first = first.clone();
            std::thread::spawn(move || {
                let mut p = Pop3::connect(port);
                assert!(p.cmd(&format!("USER {l}")).starts_with("+OK"));
                barrier.wait();
                let r = p.cmd(&format!("PASS device-pass-{i:04}"));
                assert!(r.starts_with("+OK"), "{l}: {r}");
                assert_eq!(p.stat().0, 1);
                assert_eq!(normalize_newlines(&p.retr(1)), normalize_newlines(&first));
                p.cmd("QUIT");
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a device failed");
    }
    assert_eq!(s.refreshes(), warm + 1, "{}", s.oauth.stats().raw);
}

#[test]
fn pop3_provider_and_mail_server_throttling_answer_sys_temp() {
    let s = Setup::new();
    s.enrol(ACCOUNT, CORP);
    let phone = format!("phone@{CORP_DEVICES}");
    s.add_device(&phone, ACCOUNT, "device-pass-1234");
    let first = message("t");
    s.dovecot.deliver(ACCOUNT, &first);
    let pb = s.popbridge();
    pop3_fetch(pb.port, &phone, "device-pass-1234", 1, &first);

    // The mail server cannot check tokens now ([UNAVAILABLE]): a temporary
    // answer, and the token is not thrown away (no refresh).
    let refreshes = s.refreshes();
    s.oauth.fail_introspection(1);
    let r = pop3_pass(pb.port, &phone, "device-pass-1234");
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    assert_eq!(s.refreshes(), refreshes);

    // The provider throttles the refresh (HTTP 429): -ERR [SYS/TEMP], not
    // [AUTH], and the account is not marked for re-enrolment.
    s.oauth.expire_access_tokens();
    s.oauth.throttle(1);
    let r = pop3_pass(pb.port, &phone, "device-pass-1234");
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let r = loop {
        let r = pop3_pass(pb.port, &phone, "device-pass-1234");
        if !r.starts_with("-ERR [SYS/TEMP]") || Instant::now() > deadline {
            break r;
        }
        // Backing off: popbridge asks the provider again only later.
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(r.starts_with("+OK"), "after the throttling: {r}");
    let stats = s.oauth.stats();
    assert_eq!(stats.throttled, 1, "{}", stats.raw);
    assert!(!pb.log().contains("needs re-enrolment"));
}

#[test]
fn pop3_sighup_keeps_the_cached_token() {
    let s = Setup::new();
    s.enrol(ACCOUNT, CORP);
    let phone = format!("phone@{CORP_DEVICES}");
    s.add_device(&phone, ACCOUNT, "device-pass-1234");
    let first = message("r");
    s.dovecot.deliver(ACCOUNT, &first);
    let pb = s.popbridge();
    pop3_fetch(pb.port, &phone, "device-pass-1234", 1, &first);
    let before = s.oauth.stats();
    let reloaded = pb.log().matches("configuration reloaded").count();
    let r = run_program(
        Command::new("kill").args(["-HUP", &pb.pid().to_string()]),
        s.dir.path(),
        "kill-hup",
    );
    assert!(r.status.success(), "kill -HUP: {}", r.stderr);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pb.log().matches("configuration reloaded").count() == reloaded {
        assert!(Instant::now() < deadline, "no reload:\n{}", pb.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    pop3_fetch(pb.port, &phone, "device-pass-1234", 1, &first);
    // [oauth] did not change: same runtime, same cached access token.
    let after = s.oauth.stats();
    assert_eq!(after.grants, before.grants, "{}", after.raw);
}

#[test]
fn check_config_prints_no_secrets() {
    let s = Setup::new();
    let r = s.run("check", &["--check-config"]);
    let out = format!("{}{}", String::from_utf8_lossy(&r.stdout), r.stderr);
    assert!(r.status.success(), "{out}");
    assert!(
        !out.contains(CLIENT_SECRET) && !out.contains(STORE_KEY_B64),
        "{out}"
    );
    // A route naming no provider is refused, still without secrets.
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        text.replacen(&format!("oauth_provider = \"{XO}\""), "", 1),
    )
    .unwrap();
    let r = s.run("check-bad", &["--check-config"]);
    let out = format!("{}{}", String::from_utf8_lossy(&r.stdout), r.stderr);
    assert_eq!(r.status.code(), Some(2), "{out}");
    assert!(out.contains("routes[1].oauth_provider"), "{out}");
    assert!(
        !out.contains(CLIENT_SECRET) && !out.contains(STORE_KEY_B64),
        "{out}"
    );
}

#[test]
fn pop3_per_device_policy_and_lock_use_the_enrolled_account() {
    let s = Setup::with_corp_route("delete_policy = \"per-device\"\nlock = true\n");
    s.enrol(ACCOUNT, CORP);
    let phone = format!("phone@{CORP_DEVICES}");
    let laptop = format!("laptop@{CORP_DEVICES}");
    s.add_device(&phone, ACCOUNT, "phone-pass-1");
    s.add_device(&laptop, ACCOUNT, "laptop-pass-2");
    let first = message("one");
    s.dovecot.deliver(ACCOUNT, &first);
    s.dovecot.deliver(ACCOUNT, &message("two"));
    let pb = s.popbridge();

    // The lock is per account: the laptop cannot log in while the phone's
    // session is open, although their logins differ.
    let mut p = Pop3::connect(pb.port);
    p.login(&phone, "phone-pass-1");
    let r = pop3_pass(pb.port, &laptop, "laptop-pass-2");
    assert_eq!(
        r,
        "-ERR [IN-USE] Mailbox is in use by another POP3 session."
    );
    // The phone deletes message 1: hidden from the phone only (its own
    // keyword, named after the device login's local part).
    assert!(p.cmd("DELE 1").starts_with("+OK"));
    assert!(p.cmd("QUIT").starts_with("+OK"));
    let mut p = Pop3::connect(pb.port);
    p.login(&phone, "phone-pass-1");
    assert_eq!(p.stat().0, 1);
    assert!(p.cmd("QUIT").starts_with("+OK"));
    pop3_fetch(pb.port, &laptop, "laptop-pass-2", 2, &first);
    // On the server, message 1 is still there, flagged for the phone.
    let flags = s.dovecot.doveadm(&[
        "fetch", "-u", ACCOUNT, "flags", "mailbox", "INBOX", "uid", "1",
    ]);
    assert!(flags.contains("$POP3Del-phone"), "{flags}");
}

#[test]
fn pop3_gmail_throttled_backs_off_and_keeps_the_token() {
    let s = Setup::new();
    s.enrol(OTHER, XO);
    let scanner = format!("scanner@{XO_DEVICES}");
    s.add_device(&scanner, OTHER, "scanner-pass-99");
    let first = message("g");
    s.dovecot.deliver(OTHER, &first);
    let proxy = ThrottlingImapProxy::start(s.dovecot.imap_port);
    let pb = s.popbridge_to(proxy.port);
    pop3_fetch(pb.port, &scanner, "scanner-pass-99", 1, &first);
    let refreshes = s.refreshes();
    let auths = proxy.auth_commands();

    // Gmail's NO [THROTTLED] to AUTHENTICATE: a temporary answer, no retry.
    proxy.throttle_logins(1);
    let r = pop3_pass(pb.port, &scanner, "scanner-pass-99");
    let throttled_at = Instant::now();
    assert_eq!(
        r,
        format!(
            "-ERR [SYS/TEMP] {}",
            popbridge::bridge::replies::THROTTLED_TEXT
        )
    );
    assert_eq!(proxy.throttled(), 1);
    assert_eq!(
        proxy.auth_commands(),
        auths + 1,
        "retried after [THROTTLED]"
    );
    // Backing off: a login right after is answered without asking the
    // mail server (unless the machine was so slow that the backoff, at
    // least popbridge::oauth::service::BACKOFF_BASE, already ended).
    let r = pop3_pass(pb.port, &scanner, "scanner-pass-99");
    if throttled_at.elapsed() < popbridge::oauth::service::BACKOFF_BASE {
        assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
        assert_eq!(proxy.auth_commands(), auths + 1, "hammered the mail server");
    }
    // After the backoff the same token works: no refresh was needed.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = pop3_pass(pb.port, &scanner, "scanner-pass-99");
        if r.starts_with("+OK") {
            break;
        }
        assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
        assert!(Instant::now() < deadline, "still refused: {r}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(s.refreshes(), refreshes);
    let log = pb.log();
    assert!(log.contains("throttles the account"), "{log}");
}

#[test]
fn pop3_a_fresh_token_refused_too_is_retried_once_then_backed_off() {
    let s = Setup::new();
    // Enrolled as alice, but bob signed in: every token is bob's, and
    // Dovecot refuses them for alice, fresh or not.
    s.enrol_approved_by(ACCOUNT, CORP, OTHER);
    let phone = format!("phone@{CORP_DEVICES}");
    s.add_device(&phone, ACCOUNT, "phone-pass-1");
    let pb = s.popbridge();
    let refreshes = s.refreshes();
    let r = pop3_pass(pb.port, &phone, "phone-pass-1");
    let refused_at = Instant::now();
    assert_eq!(
        r,
        format!(
            "-ERR [SYS/TEMP] {}",
            popbridge::bridge::replies::TOKEN_REFUSED_TEXT
        )
    );
    // Exactly one retry: the stored token, then one fresh one.
    assert_eq!(s.refreshes(), refreshes + 1, "{}", s.oauth.stats().raw);
    let log = pb.log();
    assert!(
        log.contains("refused a freshly issued access token"),
        "{log}"
    );
    // Backed off: the next login does not cost another refresh.
    let r = pop3_pass(pb.port, &phone, "phone-pass-1");
    if refused_at.elapsed() < popbridge::oauth::service::BACKOFF_BASE {
        assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
        assert_eq!(s.refreshes(), refreshes + 1, "{}", s.oauth.stats().raw);
    }
    // Never bob's mail for alice's devices, never [AUTH] for a right password.
    assert!(!log.contains("logged in"), "{log}");
}

/// Refuses `device`'s login twice on every replica, the second time after
/// the first back-off ended, so each replica now backs the account off for
/// twice [`BACKOFF_BASE`]; `refused` is the expected answer. Returns when
/// the last replica refused.
fn back_off_twice(replicas: &[&Popbridge], device: &str, pass: &str, refused: &str) -> Instant {
    for round in 0..2 {
        if round == 1 {
            std::thread::sleep(BACKOFF_BASE + Duration::from_millis(500));
        }
        for pb in replicas {
            let r = pop3_pass(pb.port, device, pass);
            assert!(r.starts_with(refused), "round {round}: {r}\n{}", pb.log());
        }
    }
    Instant::now()
}

/// An enrolment under the wrong identity backs the account off; the
/// operator's correct `oauth add` lifts the back-off at once on every
/// replica sharing the store (here Redis), not when it runs out.
#[test]
fn pop3_re_enrolment_lifts_the_back_off_on_every_replica() {
    let redis = crate::common::redis::Redis::start();
    let s = Setup::with_keys(
        "",
        &format!("store = \"redis\"\nredis_url = \"{}\"", redis.url()),
    );
    s.enrol_approved_by(ACCOUNT, CORP, OTHER);
    let phone = format!("phone@{CORP_DEVICES}");
    s.add_device(&phone, ACCOUNT, "phone-pass-1");
    let first = message("back");
    s.dovecot.deliver(ACCOUNT, &first);
    let (a, b) = (s.popbridge(), s.popbridge());
    let backed_off_at = back_off_twice(&[&a, &b], &phone, "phone-pass-1", "-ERR [SYS/TEMP]");
    s.enrol(ACCOUNT, CORP);
    for pb in [&a, &b] {
        pop3_fetch(pb.port, &phone, "phone-pass-1", 1, &first);
        assert!(
            backed_off_at.elapsed() < 2 * BACKOFF_BASE,
            "inconclusive: re-enrolling took {:?}, longer than the back-off",
            backed_off_at.elapsed()
        );
        assert!(pb.log().contains("back-off lifted"), "{}", pb.log());
    }
}

/// An `oauth test` whose IMAP login succeeds lifts a back-off too (here the
/// mail server had throttled the account).
#[test]
fn pop3_a_successful_oauth_test_lifts_the_back_off() {
    let s = Setup::new();
    s.enrol(OTHER, XO);
    let scanner = format!("scanner@{XO_DEVICES}");
    s.add_device(&scanner, OTHER, "scanner-pass-99");
    let first = message("t");
    s.dovecot.deliver(OTHER, &first);
    let proxy = ThrottlingImapProxy::start(s.dovecot.imap_port);
    let pb = s.popbridge_to(proxy.port);
    proxy.throttle_logins(1);
    let throttled = format!(
        "-ERR [SYS/TEMP] {}",
        popbridge::bridge::replies::THROTTLED_TEXT
    );
    let r = pop3_pass(pb.port, &scanner, "scanner-pass-99");
    assert_eq!(r, throttled);
    std::thread::sleep(BACKOFF_BASE + Duration::from_millis(500));
    proxy.throttle_logins(1);
    let r = pop3_pass(pb.port, &scanner, "scanner-pass-99");
    assert_eq!(r, throttled);
    let backed_off_at = Instant::now();
    let upstream = format!("127.0.0.1:{}", s.dovecot.imap_port);
    let r = s.run(
        "oauth-test",
        &["--upstream", &upstream, "oauth", "test", OTHER],
    );
    assert!(r.status.success(), "{}", r.stderr);
    pop3_fetch(pb.port, &scanner, "scanner-pass-99", 1, &first);
    assert!(
        backed_off_at.elapsed() < 2 * BACKOFF_BASE,
        "inconclusive: oauth test took {:?}, longer than the back-off",
        backed_off_at.elapsed()
    );
    assert!(pb.log().contains("back-off lifted"), "{}", pb.log());
}

/// The mail server refusing a fresh token is logged as what it is, at the
/// refusal and while the account is backed off; the provider, which never
/// throttled, is not blamed.
#[test]
fn pop3_a_refused_token_is_logged_as_refused_not_as_provider_throttling() {
    let s = Setup::new();
    s.enrol_approved_by(ACCOUNT, CORP, OTHER);
    let phone = format!("phone@{CORP_DEVICES}");
    s.add_device(&phone, ACCOUNT, "phone-pass-1");
    let pb = s.popbridge();
    let refused = format!(
        "-ERR [SYS/TEMP] {}",
        popbridge::bridge::replies::TOKEN_REFUSED_TEXT
    );
    assert_eq!(pop3_pass(pb.port, &phone, "phone-pass-1"), refused);
    let refused_at = Instant::now();
    // During the back-off the device is told the same, not "busy".
    let r = pop3_pass(pb.port, &phone, "phone-pass-1");
    if refused_at.elapsed() < popbridge::oauth::service::BACKOFF_BASE {
        assert_eq!(r, refused);
        assert!(
            pb.log().contains(
                "account backed off: the mail server refused a freshly issued access token"
            ),
            "{}",
            pb.log()
        );
    }
    let stats = s.oauth.stats();
    assert_eq!(
        stats.throttled, 0,
        "the provider never throttled\n{}",
        stats.raw
    );
    let log = pb.log();
    assert!(
        log.contains("mail server refused a freshly issued access token too"),
        "{log}"
    );
    for wrong in ["provider throttling", "provider throttles"] {
        assert!(!log.contains(wrong), "logged {wrong:?}:\n{log}");
    }
}

#[test]
fn oauth_test_logs_in_to_the_routes_imap_server_and_counts_messages() {
    let s = Setup::new();
    s.enrol(ACCOUNT, CORP);
    s.enrol(OTHER, XO);
    s.dovecot.deliver(ACCOUNT, &message("one"));
    s.dovecot.deliver(ACCOUNT, &message("two"));
    s.dovecot.deliver(OTHER, &message("three"));
    let upstream = format!("127.0.0.1:{}", s.dovecot.imap_port);
    let introspected = s.oauth.stats().introspections_active;
    // The route is found by the account's provider (corp: OAUTHBEARER),
    // and named explicitly (xo: XOAUTH2 in two steps).
    for (account, route, count) in [(ACCOUNT, None, 2), (OTHER, Some(XO), 1)] {
        let mut args = vec!["--upstream", upstream.as_str(), "oauth", "test", account];
        if let Some(r) = route {
            args.extend(["--route", r]);
        }
        let r = s.run(&format!("oauth-test-{account}"), &args);
        let out = String::from_utf8_lossy(&r.stdout).to_string();
        assert!(
            r.status.success(),
            "{account}: {}\n{out}\n{}",
            r.status,
            r.stderr
        );
        assert!(
            out.contains(&format!(
                "OK: IMAP login to {upstream} as {account} (route {}): INBOX holds {count} messages",
                route.unwrap_or(CORP)
            )),
            "{out}"
        );
    }
    // Dovecot checked both tokens.
    assert_eq!(s.oauth.stats().introspections_active, introspected + 2);
    // A route of another provider is refused before anything is asked.
    let r = s.run(
        "oauth-test-wrong-route",
        &[
            "--upstream",
            &upstream,
            "oauth",
            "test",
            ACCOUNT,
            "--route",
            XO,
        ],
    );
    assert_eq!(r.status.code(), Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("enrolled with \"corp\""), "{}", r.stderr);
}

#[test]
fn oauth_test_fails_clearly_when_the_imap_server_refuses_the_token() {
    let s = Setup::new();
    // Enrolled as alice, but bob signed in: Dovecot refuses every token
    // for alice, the stored one and one fresh one (the server's rule).
    s.enrol_approved_by(ACCOUNT, CORP, OTHER);
    let refreshes = s.refreshes();
    let upstream = format!("127.0.0.1:{}", s.dovecot.imap_port);
    let r = s.run(
        "oauth-test-refused",
        &["--upstream", &upstream, "oauth", "test", ACCOUNT],
    );
    let out = String::from_utf8_lossy(&r.stdout).to_string();
    assert_eq!(r.status.code(), Some(1), "{out}\n{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "IMAP login to {upstream} as {ACCOUNT} (route {CORP}) failed: the IMAP server refused a freshly issued access token too"
        )),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("AUTHENTICATIONFAILED"), "{}", r.stderr);
    assert!(!out.contains("IMAP login"), "{out}");
    // Exactly one retry, with one refresh.
    assert_eq!(s.refreshes(), refreshes + 1, "{}", s.oauth.stats().raw);
    assert_log_has_no_secrets(&format!("{out}\n{}", r.stderr), &[]);
    // An unreachable IMAP server fails too (exit 1), naming the address.
    let nothing = ClosedPort::new();
    let dead = nothing.addr.to_string();
    let r = s.run(
        "oauth-test-dead",
        &["--upstream", &dead, "oauth", "test", ACCOUNT],
    );
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    assert!(r.stderr.contains(&dead), "{}", r.stderr);
}

/// The value of `series` (name and labels exactly) in a /metrics text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[test]
fn metrics_count_refreshes_cache_hits_and_reenrolments_by_provider_only() {
    // The [admin] table ends the corp route's keys; the next [[routes]]
    // continues the array.
    let s = Setup::with_corp_route("[admin]\naddress = \"127.0.0.1:0\"\n");
    s.enrol(ACCOUNT, CORP);
    let phone = format!("phone@{CORP_DEVICES}");
    s.add_device(&phone, ACCOUNT, "phone-pass-1");
    let first = message("m");
    s.dovecot.deliver(ACCOUNT, &first);
    let pb = s.popbridge();
    let admin = pb.admin_port();
    // 1: the token from enrolment, read from the store (a cache miss).
    // 2: from the cache.
    pop3_fetch(pb.port, &phone, "phone-pass-1", 1, &first);
    pop3_fetch(pb.port, &phone, "phone-pass-1", 1, &first);
    // 3: expired at the server: the cached token (a hit) is refused, one
    // refresh succeeds.
    s.oauth.expire_access_tokens();
    pop3_fetch(pb.port, &phone, "phone-pass-1", 1, &first);
    // 4: revoked: the cached token (a hit) is refused, the refresh gets
    // invalid_grant, the account turns to "needs re-enrolment".
    s.oauth.revoke_refresh_tokens(Some(ACCOUNT));
    s.oauth.expire_access_tokens();
    assert!(pop3_pass(pb.port, &phone, "phone-pass-1").starts_with("-ERR [AUTH]"));
    let resp = http_request(admin, "GET", "/metrics", &[], b"");
    assert_eq!(resp.status, 200);
    let text = String::from_utf8_lossy(&resp.body).to_string();
    for (series, want) in [
        (
            "popbridge_oauth_token_refreshes_total{provider=\"corp\",outcome=\"ok\"}",
            1.0,
        ),
        (
            "popbridge_oauth_token_refreshes_total{provider=\"corp\",outcome=\"invalid_grant\"}",
            1.0,
        ),
        (
            "popbridge_oauth_reenrolments_needed_total{provider=\"corp\"}",
            1.0,
        ),
        (
            "popbridge_oauth_access_token_cache_hits_total{provider=\"corp\"}",
            3.0,
        ),
    ] {
        assert_eq!(metric(&text, series), Some(want), "{series}:\n{text}");
    }
    // The other provider was never used: no series for it.
    assert!(!text.contains("provider=\"xo\""), "{text}");
    // Labels name providers only: no account, device or token.
    for needle in [ACCOUNT, "phone", "alice", CORP_DEVICES] {
        assert!(!text.contains(needle), "{needle} in /metrics:\n{text}");
    }
    assert_log_has_no_secrets(&text, &["phone-pass-1"]);
    // The OAuth2 names deploy/monitoring's rules and dashboard use are in
    // this scrape (the others: monitoring's own live scrape).
    crate::monitoring::assert_scraped(
        &text,
        crate::monitoring::used_names()
            .into_iter()
            .filter(|n| n.starts_with(crate::monitoring::OAUTH_PREFIX)),
    );
}

#[test]
fn migrate_copy_into_an_oauth2_mailbox_keeps_the_old_uidls_for_devices() {
    // The old ISP: a plain Dovecot POP3 server with its own UIDL format.
    let old = Dovecot::start_with(DovecotOptions {
        extra_conf: "pop3_uidl_format = %v.%u\n".into(),
        ..DovecotOptions::default()
    });
    for i in 0..3 {
        old.deliver("alice", &message(&format!("old-{i}")));
    }
    let old_uidls = |port: u16, user: &str, pass: &str| {
        let mut p = Pop3::connect(port);
        p.login(user, pass);
        let mut v: Vec<String> = p.uidl().into_iter().map(|(_, u)| u).collect();
        p.quit();
        v.sort();
        v
    };
    let before = old_uidls(old.pop3_port, "alice", "secret");
    assert_eq!(before.len(), 3);
    // The new mailbox is alice@example.org's at the OAuth2 provider.
    let s = Setup::with_corp_route("reuse_xuidl = true\n");
    s.enrol(ACCOUNT, CORP);
    let upstream = format!("127.0.0.1:{}", s.dovecot.imap_port);
    let old_url = format!("pop3://127.0.0.1:{}", old.pop3_port);
    let pw = s.dir.path().join("old.pw");
    std::fs::write(&pw, "secret\n").unwrap();
    let base = [
        "--upstream",
        upstream.as_str(),
        "migrate",
        "copy",
        "--old",
        old_url.as_str(),
        "--old-user",
        "alice",
        "--user",
        ACCOUNT,
        "--route",
        CORP,
    ];
    // No IMAP password on an OAuth2 route, so none to reuse for the old
    // server: its password must be given.
    let r = s.run("migrate-no-old-pw", &base);
    assert_eq!(r.status.code(), Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("--old-password-file"), "{}", r.stderr);
    let mut args = base.to_vec();
    args.extend(["--old-password-file", pw.to_str().unwrap()]);
    let introspected = s.oauth.stats().introspections_active;
    for (run, copied) in [(1, 3), (2, 0)] {
        let r = s.run(&format!("migrate-copy-{run}"), &args);
        let out = String::from_utf8_lossy(&r.stdout).to_string();
        assert!(
            r.status.success(),
            "run {run}: {}\n{out}\n{}",
            r.status,
            r.stderr
        );
        assert!(
            out.contains(&format!("  copied: {copied}\n")),
            "run {run}: {out}"
        );
    }
    // Each run logged in with the account's token (Dovecot checked it).
    assert_eq!(s.oauth.stats().introspections_active, introspected + 2);
    // A device of the account sees the old server's UIDLs.
    let phone = format!("phone@{CORP_DEVICES}");
    s.add_device(&phone, ACCOUNT, "phone-pass-1");
    let pb = s.popbridge();
    assert_eq!(old_uidls(pb.port, &phone, "phone-pass-1"), before);
    // A revoked account fails clearly, naming the fix.
    s.oauth.revoke_refresh_tokens(Some(ACCOUNT));
    s.oauth.expire_access_tokens();
    let r = s.run("migrate-revoked", &args);
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("popbridge oauth add {ACCOUNT} --provider {CORP}")),
        "{}",
        r.stderr
    );
    assert_log_has_no_secrets(&r.stderr, &["secret\n"]);
}

/// Upstream session reuse on an OAuth2 route: the pool keys by account and
/// device, so a device's next poll takes its own ended session (no bearer
/// login, no token), another device of the same account opens its own, and
/// a wrong device password is refused before the pool is looked at.
#[test]
fn pop3_devices_reuse_their_own_upstream_sessions() {
    use crate::reuse::{sessions, wait_idle};
    let s = Setup::with_corp_route("reuse_idle_secs = 300\n[admin]\naddress = \"127.0.0.1:0\"\n");
    s.enrol(ACCOUNT, CORP);
    let phone = format!("phone@{CORP_DEVICES}");
    let scanner = format!("scanner@{CORP_DEVICES}");
    s.add_device(&phone, ACCOUNT, "phone-pass-1234");
    s.add_device(&scanner, ACCOUNT, "scanner-pass-1234");
    let first = message("r1");
    s.dovecot.deliver(ACCOUNT, &first);
    let pb = s.popbridge();
    let logins = || s.dovecot.log().matches("imap-login: Info: Login: ").count();
    let before = logins();

    pop3_fetch(pb.port, &phone, "phone-pass-1234", 1, &first);
    wait_idle(&pb, 1);
    assert_eq!((sessions(&pb, "opened"), sessions(&pb, "reused")), (1, 0));
    // The phone's next poll takes its session back, and sees new mail.
    s.dovecot.deliver(ACCOUNT, &message("r2"));
    pop3_fetch(pb.port, &phone, "phone-pass-1234", 2, &first);
    wait_idle(&pb, 1);
    assert_eq!((sessions(&pb, "opened"), sessions(&pb, "reused")), (1, 1));
    // Another device of the account: its own session.
    pop3_fetch(pb.port, &scanner, "scanner-pass-1234", 2, &first);
    wait_idle(&pb, 2);
    assert_eq!((sessions(&pb, "opened"), sessions(&pb, "reused")), (2, 1));
    // A wrong device password: refused, the pool untouched.
    let r = pop3_pass(pb.port, &phone, "wrong-password");
    assert_eq!(r, "-ERR [AUTH] Authentication failed.");
    assert_eq!((sessions(&pb, "opened"), sessions(&pb, "reused")), (2, 1));
    assert_eq!(crate::reuse::idle(&pb), 2);
    // Dovecot saw one bearer login per device, not one per poll.
    let deadline = Instant::now() + Duration::from_secs(5);
    while logins() - before < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(logins() - before, 2, "{}", s.dovecot.log());
    assert_log_has_no_secrets(
        &pb.log(),
        &["phone-pass-1234", "scanner-pass-1234", "wrong-password"],
    );
}
