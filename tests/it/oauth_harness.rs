//! Self-test of the OAuth2 test harness (issue 8): the loopback
//! authorization server (`tests/oauth_server.py`) really runs the device,
//! PKCE and refresh flows and refuses what it must; a real Dovecot with its
//! `oauth2` passdb really validates XOAUTH2 and OAUTHBEARER bearer tokens by
//! introspection; redis-server starts. Needs neither popbridge's OAuth2 code
//! nor its binary.
//!
//! What Dovecot 2.3.19 sends when an OAuth2 login fails (observed by
//! `dovecot_validates_bearer_tokens`, which asserts these exact lines):
//!
//! XOAUTH2 with a bad, expired or revoked token:
//! ```text
//! S: * OK [CAPABILITY ...] Dovecot (Debian) ready.
//! C: a1 AUTHENTICATE XOAUTH2 <base64 of user=..^Aauth=Bearer ..^A^A>
//! S: + eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=
//!    (base64 of {"status":"401","schemes":"bearer","scope":"mail"})
//! C: <empty line>
//! S: a1 NO [AUTHENTICATIONFAILED] Authentication failed.
//! ```
//! OAUTHBEARER (RFC 7628 §3.2.2 error, §3.2.3: the client must answer the
//! error challenge with a dummy response, `^A`, base64 `AQ==`):
//! ```text
//! C: a1 AUTHENTICATE OAUTHBEARER <base64 of n,a=..,^Ahost=..^Aport=..^Aauth=Bearer ..^A^A>
//! S: + eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=
//!    (base64 of {"status":"invalid_token"})
//! C: AQ==
//! S: a1 NO [AUTHENTICATIONFAILED] Authentication failed.
//! ```
//! So a client that waits for the tagged NO without answering the `+`
//! continuation hangs: popbridge's upstream login must answer it (an empty
//! line or `AQ==`; Dovecot accepts either) and then read the tagged NO.
//! When the introspection endpoint itself fails (HTTP 503), there is NO
//! continuation: the tagged answer comes at once,
//! `a1 NO [UNAVAILABLE] Temporary authentication failure. [host:YYYY-MM-DD HH:MM:SS]`
//! (RFC 5530 UNAVAILABLE: a temporary failure, not a bad token) — see
//! `dovecot_introspection_failure_is_temporary`. So the client must accept
//! either a `+` challenge or the tagged answer after its initial response.

use crate::common::oauth::*;
use crate::common::redis::*;
use crate::common::*;

const ACCOUNT: &str = "alice@example.org";
const OTHER: &str = "bob@example.org";
/// RFC 7636 appendix B: this verifier's S256 challenge.
const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
/// A loopback redirect URI (RFC 8252 §7.3); nothing needs to listen there
/// because the test reads the 302 instead of following it.
const REDIRECT: &str = "http://127.0.0.1:9/callback";

fn expect_error(result: Result<Tokens, OauthError>, error: &str) -> OauthError {
    match result {
        Ok(t) => panic!("expected {error}, got tokens (expires_in {})", t.expires_in),
        Err(e) => {
            assert_eq!(e.error, error, "{e:?}");
            e
        }
    }
}

#[test]
fn device_flow_pending_approve_deny_expire() {
    let oauth = OauthServer::start();
    let dev = oauth.device_authorization("mail");
    assert_eq!(dev.interval, 1);
    assert_eq!(dev.expires_in, 600);
    // RFC 8628 §6.1: 8 letters from a consonant alphabet, shown as XXXX-XXXX.
    assert_eq!(dev.user_code.len(), 9, "{}", dev.user_code);
    assert_eq!(dev.user_code.as_bytes()[4], b'-');
    assert!(dev.verification_uri.starts_with(&oauth.base_url()));
    assert!(dev.verification_uri_complete.contains(&dev.user_code));

    let pending = expect_error(oauth.poll_device(&dev.device_code), "authorization_pending");
    assert_eq!(pending.status, 400);
    // User codes are case-insensitive (RFC 8628 §6.1).
    oauth.approve(&dev.user_code.to_lowercase(), ACCOUNT);
    let tokens = oauth.poll_device(&dev.device_code).expect("approved");
    assert_eq!(tokens.token_type, "Bearer");
    assert_eq!(tokens.expires_in, 3600);
    assert_eq!(tokens.scope, "mail");
    assert_ne!(tokens.access_token, tokens.refresh_token);
    let info = oauth.introspect(&tokens.access_token);
    assert_eq!(info.get("active").and_then(Json::as_bool), Some(true));
    assert_eq!(info.get("username").and_then(Json::as_str), Some(ACCOUNT));
    // A refresh token is no bearer token.
    let info = oauth.introspect(&tokens.refresh_token);
    assert_eq!(info, Json::Obj(vec![("active".into(), Json::Bool(false))]));
    // A device code gives tokens once.
    expect_error(oauth.poll_device(&dev.device_code), "invalid_grant");

    let denied = oauth.device_authorization("mail");
    oauth.deny(&denied.user_code);
    expect_error(oauth.poll_device(&denied.device_code), "access_denied");

    let late = oauth.device_authorization("mail");
    oauth.expire_device_codes();
    expect_error(oauth.poll_device(&late.device_code), "expired_token");

    let stats = oauth.stats();
    assert_eq!(stats.grant("device_code"), 1, "{}", stats.raw);
    assert_eq!(stats.token_error("authorization_pending"), 1);
    assert_eq!(stats.token_error("access_denied"), 1);
    assert_eq!(stats.token_error("expired_token"), 1);
    assert_eq!(stats.active_refresh(ACCOUNT), 1);
    assert_eq!(stats.device_authorizations, 3);
}

#[test]
fn device_flow_slow_down() {
    // A long interval, so the second poll is too fast however slow the
    // machine is.
    let oauth = OauthServer::start_with(OauthServerOptions {
        interval_secs: 60,
        ..OauthServerOptions::default()
    });
    let dev = oauth.device_authorization("mail");
    assert_eq!(dev.interval, 60);
    expect_error(oauth.poll_device(&dev.device_code), "authorization_pending");
    let slow = expect_error(oauth.poll_device(&dev.device_code), "slow_down");
    assert_eq!(slow.status, 400);
    assert!(
        slow.description.as_deref().unwrap_or("").contains("65 s"),
        "RFC 8628 §3.5: +5 s: {slow:?}"
    );
    oauth.approve(&dev.user_code, ACCOUNT);
    oauth.poll_device(&dev.device_code).expect("approved");
    assert_eq!(oauth.stats().token_error("slow_down"), 1);
}

fn authorize(oauth: &OauthServer, query: &[(&str, &str)]) -> HttpResponse {
    oauth.request(
        "GET",
        &format!("/authorize?{}", form_encode(query)),
        &[],
        b"",
    )
}

#[test]
fn pkce_authorization_code_flow() {
    let oauth = OauthServer::start();
    let client_id = oauth.options.client_id.clone();
    let base = [
        ("response_type", "code"),
        ("client_id", client_id.as_str()),
        ("redirect_uri", REDIRECT),
        ("state", "st4te"),
        ("code_challenge", CHALLENGE),
        ("code_challenge_method", "S256"),
    ];
    let mut with_hint = base.to_vec();
    with_hint.push(("login_hint", ACCOUNT));
    let resp = authorize(&oauth, &with_hint);
    assert_eq!(resp.status, 302);
    let location = resp.header("location").expect("Location").to_string();
    assert!(location.starts_with(&format!("{REDIRECT}?")), "{location}");
    let params = query_params(&location);
    assert_eq!(params.get("state").map(String::as_str), Some("st4te"));
    let code = params.get("code").expect("code").clone();

    let exchange = |verifier: &str, redirect: &str| {
        oauth.token_request(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", redirect),
            ("code_verifier", verifier),
        ])
    };
    // RFC 7636 §4.6: a well-formed but wrong verifier.
    let wrong = "A".repeat(43);
    expect_error(exchange(&wrong, REDIRECT), "invalid_grant");
    // RFC 6749 §4.1.3: redirect_uri must be the same.
    expect_error(
        exchange(VERIFIER, "http://127.0.0.1:9/other"),
        "invalid_grant",
    );
    let tokens = exchange(VERIFIER, REDIRECT).expect("right verifier");
    let info = oauth.introspect(&tokens.access_token);
    assert_eq!(info.get("username").and_then(Json::as_str), Some(ACCOUNT));
    // Codes are single-use.
    expect_error(exchange(VERIFIER, REDIRECT), "invalid_grant");

    // Not loopback: an error page, no redirect (RFC 6749 §4.1.2.1).
    let mut bad = with_hint.clone();
    bad[2] = ("redirect_uri", "https://evil.example/cb");
    let resp = authorize(&oauth, &bad);
    assert_eq!(resp.status, 400);
    assert!(resp.header("location").is_none());
    // No PKCE: redirected with error=invalid_request.
    let no_pkce: Vec<_> = with_hint
        .iter()
        .filter(|(k, _)| !k.starts_with("code_challenge"))
        .copied()
        .collect();
    let resp = authorize(&oauth, &no_pkce);
    let params = query_params(resp.header("location").expect("Location"));
    assert_eq!(
        params.get("error").map(String::as_str),
        Some("invalid_request")
    );
    assert_eq!(params.get("state").map(String::as_str), Some("st4te"));
    // No login_hint and no default user: access_denied; with one: a code.
    let resp = authorize(&oauth, &base);
    let params = query_params(resp.header("location").expect("Location"));
    assert_eq!(
        params.get("error").map(String::as_str),
        Some("access_denied")
    );
    oauth.set_default_user(Some(OTHER));
    let resp = authorize(&oauth, &base);
    let params = query_params(resp.header("location").expect("Location"));
    let code = params.get("code").expect("code for the default user");
    let tokens = oauth
        .token_request(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", VERIFIER),
        ])
        .expect("default user's code");
    let info = oauth.introspect(&tokens.access_token);
    assert_eq!(info.get("username").and_then(Json::as_str), Some(OTHER));
    assert_eq!(oauth.stats().grant("authorization_code"), 2);
}

#[test]
fn refresh_rotation_keeps_newest() {
    let oauth = OauthServer::start();
    let (a0, r1) = oauth.device_flow_token(ACCOUNT);
    let t2 = oauth.refresh(&r1).expect("first refresh");
    assert_ne!(t2.refresh_token, r1, "rotation issues a new refresh token");
    assert_ne!(t2.access_token, a0);
    // The old one is spent; reuse is refused but does not hurt the newest.
    expect_error(oauth.refresh(&r1), "invalid_grant");
    let t3 = oauth
        .refresh(&t2.refresh_token)
        .expect("newest still works");
    let stats = oauth.stats();
    assert_eq!(stats.grant("refresh_token"), 2, "{}", stats.raw);
    assert_eq!(stats.refresh_reuse, 1);
    assert_eq!(stats.active_refresh(ACCOUNT), 1);
    assert_eq!(stats.rotated_refresh_tokens, 2);
    // The user revokes access: every refresh token of the account dies.
    assert_eq!(oauth.revoke_refresh_tokens(Some(ACCOUNT)), 1);
    expect_error(oauth.refresh(&t3.refresh_token), "invalid_grant");
    assert_eq!(oauth.stats().active_refresh(ACCOUNT), 0);
    // Access tokens expire by test control.
    assert!(oauth.expire_access_tokens() >= 1);
    let info = oauth.introspect(&t3.access_token);
    assert_eq!(info.get("active").and_then(Json::as_bool), Some(false));
}

#[test]
fn concurrent_refresh_has_one_winner() {
    // Two clients refresh with the same token at once (two popbridge
    // processes): rotation lets exactly one win; the loser's answer is
    // invalid_grant and the winner's refresh token stays valid.
    let oauth = std::sync::Arc::new(OauthServer::start());
    for round in 0..5 {
        let (_a, r) = oauth.device_flow_token(ACCOUNT);
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let (oauth, barrier, r) = (oauth.clone(), barrier.clone(), r.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    oauth.refresh(&r)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let winners: Vec<&Tokens> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        let loser = results.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert_eq!(loser.error, "invalid_grant");
        oauth
            .refresh(&winners[0].refresh_token)
            .expect("winner's token is valid");
    }
    assert_eq!(oauth.stats().refresh_reuse, 5);
}

#[test]
fn refresh_reuse_revokes_family_when_asked() {
    let oauth = OauthServer::start_with(OauthServerOptions {
        reuse_revokes_family: true,
        ..OauthServerOptions::default()
    });
    let (_a0, r1) = oauth.device_flow_token(ACCOUNT);
    let t2 = oauth.refresh(&r1).expect("first refresh");
    expect_error(oauth.refresh(&r1), "invalid_grant");
    // RFC 9700 §4.14.2: the reuse revoked the whole grant.
    expect_error(oauth.refresh(&t2.refresh_token), "invalid_grant");
    let info = oauth.introspect(&t2.access_token);
    assert_eq!(info.get("active").and_then(Json::as_bool), Some(false));
    assert_eq!(oauth.stats().active_refresh(ACCOUNT), 0);
    // Switchable at run time.
    oauth.set_reuse_revokes_family(false);
    let (_a, r) = oauth.device_flow_token(ACCOUNT);
    let t = oauth.refresh(&r).expect("refresh");
    expect_error(oauth.refresh(&r), "invalid_grant");
    oauth.refresh(&t.refresh_token).expect("newest kept");
}

#[test]
fn client_authentication_throttling_and_revocation() {
    let oauth = OauthServer::start_with(OauthServerOptions {
        client_secret: Some("s3cret".into()),
        ..OauthServerOptions::default()
    });
    // Body credentials (post_form adds client_id and client_secret).
    let (_a, r1) = oauth.device_flow_token(ACCOUNT);
    // HTTP Basic (RFC 6749 §2.3.1).
    let basic = format!("Basic {}", base64_encode(b"popbridge-test:s3cret"));
    let resp = oauth.post_form_raw(
        "/token",
        &[("Authorization", &basic)],
        &[("grant_type", "refresh_token"), ("refresh_token", &r1)],
    );
    let t2 = parse_token_response(&resp).expect("Basic client auth");
    // Wrong or missing secret: 401 invalid_client with WWW-Authenticate.
    let wrong = format!("Basic {}", base64_encode(b"popbridge-test:nope"));
    let refresh = [
        ("grant_type", "refresh_token"),
        ("refresh_token", t2.refresh_token.as_str()),
    ];
    let resp = oauth.post_form_raw("/token", &[("Authorization", &wrong)], &refresh);
    let e = expect_error(parse_token_response(&resp), "invalid_client");
    assert_eq!(e.status, 401);
    assert!(resp.header("www-authenticate").is_some());
    let mut no_secret = refresh.to_vec();
    no_secret.push(("client_id", "popbridge-test"));
    let resp = oauth.post_form_raw("/token", &[], &no_secret);
    assert_eq!(
        expect_error(parse_token_response(&resp), "invalid_client").status,
        401
    );
    // Two methods at once is invalid_request.
    let mut both = no_secret.clone();
    both.push(("client_secret", "s3cret"));
    let basic2 = format!("Basic {}", base64_encode(b"popbridge-test:s3cret"));
    let resp = oauth.post_form_raw("/token", &[("Authorization", &basic2)], &both);
    expect_error(parse_token_response(&resp), "invalid_request");
    // Not form-encoded.
    let resp = oauth.request(
        "POST",
        "/token",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &basic2),
        ],
        b"{\"grant_type\":\"refresh_token\"}",
    );
    expect_error(parse_token_response(&resp), "invalid_request");
    expect_error(
        oauth.token_request(&[("grant_type", "password")]),
        "unsupported_grant_type",
    );

    // Throttling: 429 with Retry-After, then normal again.
    oauth.throttle(2);
    for _ in 0..2 {
        let e = expect_error(oauth.refresh(&t2.refresh_token), "temporarily_unavailable");
        assert_eq!(e.status, 429);
        assert_eq!(e.retry_after.as_deref(), Some("1"));
    }
    let t3 = oauth.refresh(&t2.refresh_token).expect("after throttling");
    assert_eq!(oauth.stats().throttled, 2);

    // RFC 7009: revoking the refresh token kills it and its access tokens.
    let resp = oauth.revoke(&t3.refresh_token);
    assert_eq!(resp.status, 200);
    expect_error(oauth.refresh(&t3.refresh_token), "invalid_grant");
    let info = oauth.introspect(&t3.access_token);
    assert_eq!(info.get("active").and_then(Json::as_bool), Some(false));
    // Unknown tokens are not an error (RFC 7009 §2.2).
    assert_eq!(oauth.revoke("no-such-token").status, 200);
}

fn oauth_dovecot(oauth: &OauthServer) -> Dovecot {
    oauth_dovecot_for(oauth, &[ACCOUNT, OTHER])
}

fn show(outcome: &SaslOutcome) -> String {
    outcome.transcript.join("\n")
}

/// Dovecot's tagged answer to a refused AUTHENTICATE (RFC 5530 response code).
const AUTH_FAILED: &str = "a1 NO [AUTHENTICATIONFAILED] Authentication failed.";

/// Asserts that Dovecot refused a bogus token the way RFC 7628 §3.2.2 has
/// it (XOAUTH2 works alike): the single error `challenge` (JSON), sent as
/// the line `challenge_line` (base64), then the client's dummy answer
/// `answer_line`, then the tagged NO.
#[track_caller]
fn assert_refused_after_challenge(
    bad: &SaslOutcome,
    challenge: &str,
    challenge_line: &str,
    answer_line: &str,
) {
    assert!(!bad.ok);
    assert_eq!(bad.challenges, vec![challenge.to_string()], "{}", show(bad));
    assert_eq!(bad.transcript[2], challenge_line);
    assert_eq!(bad.transcript[3], answer_line);
    assert_eq!(bad.tagged, AUTH_FAILED);
}

#[test]
fn dovecot_validates_bearer_tokens() {
    let oauth = OauthServer::start();
    let dovecot = oauth_dovecot(&oauth);
    let conf = std::fs::read_to_string(dovecot.conf_path()).unwrap();
    assert!(conf.contains("driver = oauth2"), "{conf}");
    let mut imap = Imap::connect_only(dovecot.imap_port);
    let caps = imap.capabilities();
    assert!(caps.iter().any(|c| c == "AUTH=XOAUTH2"), "{caps:?}");
    assert!(caps.iter().any(|c| c == "AUTH=OAUTHBEARER"), "{caps:?}");
    assert!(caps.iter().any(|c| c == "SASL-IR"), "{caps:?}");
    dovecot.deliver(ACCOUNT, &corpus_message("plain_crlf"));

    let (access, _refresh) = oauth.device_flow_token(ACCOUNT);
    let port = dovecot.imap_port;

    // Valid token, both mechanisms; imap_sasl also SELECTs INBOX.
    let ok = imap_sasl(
        port,
        "XOAUTH2",
        &xoauth2_initial_response(ACCOUNT, &access),
        false,
    );
    assert!(ok.ok, "{}", show(&ok));
    assert!(ok.challenges.is_empty(), "{}", show(&ok));
    let ok = imap_sasl(
        port,
        "OAUTHBEARER",
        &oauthbearer_initial_response(ACCOUNT, "127.0.0.1", port, &access),
        false,
    );
    assert!(ok.ok, "{}", show(&ok));
    let stats = oauth.stats();
    assert_eq!(
        stats.introspections_active, 2,
        "Dovecot asked: {}",
        stats.raw
    );

    // A bogus token: the XOAUTH2 error challenge, an empty answer, NO.
    let bad = imap_sasl(
        port,
        "XOAUTH2",
        &xoauth2_initial_response(ACCOUNT, "bogus"),
        false,
    );
    eprintln!("XOAUTH2 failure:\n{}", show(&bad));
    assert_refused_after_challenge(
        &bad,
        r#"{"status":"401","schemes":"bearer","scope":"mail"}"#,
        "S: + eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=",
        "C: ",
    );

    // OAUTHBEARER: RFC 7628 error JSON, the client's ^A, NO.
    let bad = imap_sasl(
        port,
        "OAUTHBEARER",
        &oauthbearer_initial_response(ACCOUNT, "127.0.0.1", port, "bogus"),
        true,
    );
    eprintln!("OAUTHBEARER failure:\n{}", show(&bad));
    assert_refused_after_challenge(
        &bad,
        r#"{"status":"invalid_token"}"#,
        "S: + eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=",
        "C: AQ==",
    );

    // Dovecot takes either dummy answer (empty or ^A) for either mechanism.
    let swapped = imap_sasl(
        port,
        "XOAUTH2",
        &xoauth2_initial_response(ACCOUNT, "bogus"),
        true,
    );
    assert_eq!(swapped.tagged, AUTH_FAILED);
    let swapped = imap_sasl(
        port,
        "OAUTHBEARER",
        &oauthbearer_initial_response(ACCOUNT, "127.0.0.1", port, "bogus"),
        false,
    );
    assert_eq!(swapped.tagged, AUTH_FAILED);

    // A valid token of another account does not log in as this one.
    let (bobs, _) = oauth.device_flow_token(OTHER);
    let wrong_user = imap_sasl(
        port,
        "XOAUTH2",
        &xoauth2_initial_response(ACCOUNT, &bobs),
        false,
    );
    assert!(!wrong_user.ok, "{}", show(&wrong_user));

    // Expired access token: refused; the refreshed one works.
    let (access2, refresh2) = oauth.device_flow_token(ACCOUNT);
    assert!(oauth.expire_access_tokens() >= 2);
    for mech in ["XOAUTH2", "OAUTHBEARER"] {
        let ir = if mech == "XOAUTH2" {
            xoauth2_initial_response(ACCOUNT, &access2)
        } else {
            oauthbearer_initial_response(ACCOUNT, "127.0.0.1", port, &access2)
        };
        let expired = imap_sasl(port, mech, &ir, mech == "OAUTHBEARER");
        assert!(
            !expired.ok,
            "{mech} accepted an expired token: {}",
            show(&expired)
        );
        assert_eq!(expired.challenges.len(), 1, "{}", show(&expired));
    }
    let fresh = oauth.refresh(&refresh2).expect("refresh");
    let ok = imap_sasl(
        port,
        "XOAUTH2",
        &xoauth2_initial_response(ACCOUNT, &fresh.access_token),
        false,
    );
    assert!(ok.ok, "{}", show(&ok));
    // A refresh token is not accepted as a bearer token.
    let wrong_kind = imap_sasl(
        port,
        "XOAUTH2",
        &xoauth2_initial_response(ACCOUNT, &fresh.refresh_token),
        false,
    );
    assert!(!wrong_kind.ok, "{}", show(&wrong_kind));

    // The account's passwd-file password is no bearer token: only the
    // oauth2 passdb serves the OAuth2 mechanisms.
    let before = oauth.stats().introspections;
    let password_as_token = imap_sasl(
        port,
        "XOAUTH2",
        &xoauth2_initial_response(ACCOUNT, "local-password"),
        false,
    );
    assert!(!password_as_token.ok, "{}", show(&password_as_token));
    assert_eq!(oauth.stats().introspections, before + 1);

    // Password logins still go to the passwd-file.
    let mut imap = Imap::connect(port, ACCOUNT, "local-password");
    assert_eq!(imap.uids().len(), 1);
    imap.logout();
    // The token is never a password.
    let mut imap = Imap::connect_only(port);
    assert!(imap
        .command(&format!("LOGIN {ACCOUNT} {}", fresh.access_token))
        .is_err());
    assert!(!oauth.log().contains(&fresh.access_token));
}

#[test]
fn dovecot_introspection_failure_is_temporary() {
    let oauth = OauthServer::start();
    let dovecot = oauth_dovecot(&oauth);
    let (access, _) = oauth.device_flow_token(ACCOUNT);
    oauth.fail_introspection(1);
    let failed = imap_sasl(
        dovecot.imap_port,
        "XOAUTH2",
        &xoauth2_initial_response(ACCOUNT, &access),
        false,
    );
    eprintln!("introspection failure:\n{}", show(&failed));
    assert!(!failed.ok);
    assert!(
        failed
            .tagged
            .starts_with("a1 NO [UNAVAILABLE] Temporary authentication failure."),
        "{}",
        show(&failed)
    );
    // No error challenge on an internal failure: the tagged NO comes at once.
    assert!(failed.challenges.is_empty(), "{}", show(&failed));
    assert_eq!(failed.transcript.len(), 3, "{}", show(&failed));
    let ok = imap_sasl(
        dovecot.imap_port,
        "XOAUTH2",
        &xoauth2_initial_response(ACCOUNT, &access),
        false,
    );
    assert!(ok.ok, "{}", show(&ok));
}

#[test]
fn redis_starts_and_answers() {
    let redis = Redis::start();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port));
    assert_eq!(redis.command(&["PING"]), Resp::Simple("PONG".into()));
    assert_eq!(redis.command(&["SET", "k", "v"]), Resp::Simple("OK".into()));
    assert_eq!(redis.command(&["GET", "k"]).as_text().as_deref(), Some("v"));
    assert_eq!(redis.keys("*"), vec!["k".to_string()]);

    let locked = Redis::start_with(RedisOptions {
        requirepass: Some("p@ss".into()),
        ..RedisOptions::default()
    });
    assert_ne!(locked.port, redis.port);
    assert_eq!(locked.command(&["PING"]), Resp::Simple("PONG".into()));
    assert_eq!(
        locked.url_with_password(),
        format!("redis://:p%40ss@127.0.0.1:{}", locked.port)
    );
    // Without AUTH the server refuses.
    let stream = std::net::TcpStream::connect(("127.0.0.1", locked.port)).unwrap();
    let mut w = stream.try_clone().unwrap();
    std::io::Write::write_all(&mut w, &resp_encode(&["GET", "k"])).unwrap();
    let reply = resp_read(&mut std::io::BufReader::new(stream)).unwrap();
    assert!(
        matches!(&reply, Resp::Error(e) if e.starts_with("NOAUTH")),
        "{reply:?}"
    );
}

#[test]
fn throttling_proxy_answers_like_gmail() {
    let oauth = OauthServer::start();
    let dovecot = oauth_dovecot(&oauth);
    let proxy = ThrottlingImapProxy::start(dovecot.imap_port);
    let (access, _) = oauth.device_flow_token(ACCOUNT);
    let ir = xoauth2_initial_response(ACCOUNT, &access);

    proxy.throttle_logins(1);
    let throttled = imap_sasl(proxy.port, "XOAUTH2", &ir, false);
    assert_eq!(
        throttled.tagged,
        format!("a1 {GMAIL_THROTTLED}"),
        "{}",
        show(&throttled)
    );
    assert!(throttled.challenges.is_empty());
    assert_eq!(oauth.stats().introspections, 0, "Dovecot never saw it");
    let ok = imap_sasl(proxy.port, "XOAUTH2", &ir, false);
    assert!(ok.ok, "{}", show(&ok));
    assert_eq!((proxy.auth_commands(), proxy.throttled()), (2, 1));

    // Literal data is passed through, never taken for a command.
    let mut imap = Imap::connect(proxy.port, ACCOUNT, "local-password");
    proxy.throttle_logins(1);
    let message = "Subject: literal\r\n\r\na9 LOGIN x y\r\nb9 AUTHENTICATE PLAIN\r\n";
    imap.command(&format!("APPEND INBOX {{{}+}}\r\n{message}", message.len()))
        .expect("APPEND through the proxy");
    assert_eq!(proxy.throttled(), 1);
    assert_eq!(imap.uids().len(), 1);
    imap.logout();
    // The pending throttle hits the next LOGIN.
    let mut imap = Imap::connect_only(proxy.port);
    let refused = imap
        .command(&format!("LOGIN {ACCOUNT} local-password"))
        .expect_err("throttled LOGIN");
    assert!(refused.starts_with("NO [THROTTLED]"), "{refused}");
    assert_eq!((proxy.auth_commands(), proxy.throttled()), (4, 2));
}
