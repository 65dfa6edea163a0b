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

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::oauth::*;
use common::*;
use popbridge::error::UpstreamError;
use popbridge::oauth::{AccessToken, ProviderSasl, SaslMechanism};
use popbridge::upstream::imap::{ImapConfig, ImapConnector, NoUidplus, UpstreamTlsSetup};
use popbridge::upstream::{Connector, Credentials, Upstream};

const ACCOUNT: &str = "alice@example.org";
const OTHER: &str = "bob@example.org";
/// Dovecot answers failed logins at once (default: a 2 s delay) and does
/// not penalise the loopback address for them.
const FAST_FAILURES: &str = "auth_failure_delay = 0\n\
service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n";

fn oauth_dovecot(oauth: &OauthServer) -> Dovecot {
    Dovecot::start_with_oauth2(
        DovecotOptions {
            users: vec![
                (ACCOUNT.to_string(), "local-password".to_string()),
                (OTHER.to_string(), "local-password".to_string()),
            ],
            extra_conf: FAST_FAILURES.to_string(),
            ..DovecotOptions::default()
        },
        &oauth.introspect_url(),
    )
}

fn connector(imap_port: u16) -> ImapConnector {
    ImapConnector::new(ImapConfig {
        address: format!("127.0.0.1:{imap_port}"),
        mailbox: "INBOX".into(),
        connect_timeout: Duration::from_secs(10),
        command_timeout: Duration::from_secs(30),
        no_uidplus: NoUidplus::Refuse,
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
