//! `popbridge oauth ...` and `popbridge device ...` through the real binary
//! against the real loopback OAuth2 server (tests/oauth_server.py): device
//! flow and PKCE enrolment, list, test (refresh with rotation), remove with
//! revocation, invalid_grant turning into re-enrolment, device logins, and
//! secrets staying out of every output.

use crate::common::oauth::*;
use crate::oauth_support::*;

#[test]
fn device_flow_enrolment_list_refresh_and_remove() {
    let oauth = OauthServer::start();
    let s = Setup::new(&oauth, "");

    let run = s.enrol(&oauth, ACCOUNT);
    run.assert_ok("oauth add (device flow)");
    assert!(
        run.stdout.contains("enrolled alice@example.org"),
        "{}",
        run.describe()
    );
    let stats = oauth.stats();
    assert_eq!(stats.grant("device_code"), 1, "{}", stats.raw);
    assert_eq!(stats.active_refresh(ACCOUNT), 1, "{}", stats.raw);

    // The store holds no token in clear: compare with what the server
    // issued (the access token is checked through introspection of what
    // `oauth test` reports as valid below; here the file just must not
    // contain JSON token fields in clear).
    let tokens = std::fs::read_to_string(s.store_dir().join("tokens.json")).unwrap();
    assert!(tokens.contains("\"sealed\""), "{tokens}");
    assert!(!tokens.contains("refresh_token"), "{tokens}");
    assert!(!tokens.contains("access_token"), "{tokens}");

    let list = s.run(&["oauth", "list"]);
    list.assert_ok("oauth list");
    let line = list
        .stdout
        .lines()
        .find(|l| l.starts_with(ACCOUNT))
        .unwrap_or_else(|| panic!("no line for the account\n{}", list.describe()));
    assert!(line.contains(PROVIDER) && line.contains("active"), "{line}");

    // The access token from enrolment is still valid: no refresh.
    let t = s.run(&["oauth", "test", "--token-only", ACCOUNT]);
    t.assert_ok("oauth test");
    assert!(
        t.stdout.contains("stored token still valid"),
        "{}",
        t.describe()
    );
    assert_eq!(oauth.stats().grant("refresh_token"), 0);

    // Forced: one refresh, the rotated refresh token is stored and works
    // for the next refresh (the server invalidates the old one).
    for n in 1..=2 {
        let t = s.run(&["oauth", "test", "--token-only", ACCOUNT, "--force-refresh"]);
        t.assert_ok("oauth test --force-refresh");
        assert!(t.stdout.contains("refreshed now"), "{}", t.describe());
        let stats = oauth.stats();
        assert_eq!(stats.grant("refresh_token"), n, "{}", stats.raw);
        assert_eq!(stats.token_error("invalid_grant"), 0, "{}", stats.raw);
        assert_eq!(stats.active_refresh(ACCOUNT), 1, "{}", stats.raw);
    }

    // Remove revokes at the provider (RFC 7009) and forgets locally.
    let rm = s.run(&["oauth", "remove", ACCOUNT]);
    rm.assert_ok("oauth remove");
    let stats = oauth.stats();
    assert_eq!(stats.revocations, 1, "{}", stats.raw);
    assert_eq!(stats.active_refresh(ACCOUNT), 0, "{}", stats.raw);
    let list = s.run(&["oauth", "list"]);
    list.assert_ok("oauth list after remove");
    assert!(!list.stdout.contains(ACCOUNT), "{}", list.describe());
    s.run(&["oauth", "remove", ACCOUNT])
        .assert_code(1, "removing an unknown account fails");
}

#[test]
fn browser_flow_with_pkce_and_loopback_redirect() {
    let oauth = OauthServer::start();
    let s = Setup::new(&oauth, "");
    // Standard input stays open (a terminal nobody types in): the command
    // must still end once the redirect arrived.
    let mut cmd = s.command(&["oauth", "add", "bob@example.org", "--browser"]);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let _stdin = child.stdin.take().unwrap();
    let (url, printed, rest) = read_url(child.stdout.take().unwrap());
    assert!(url.contains("code_challenge_method=S256"), "{url}");
    assert!(!url.contains("code_verifier"), "{url}");
    // The "browser": GET the authorization URL, follow the redirect to
    // popbridge's loopback listener.
    let path = url
        .strip_prefix(&oauth.base_url())
        .unwrap_or_else(|| panic!("{url} is not on the test server"));
    let resp = oauth.request("GET", path, &[], b"");
    assert_eq!(resp.status, 302, "{}", String::from_utf8_lossy(&resp.body));
    let location = resp.header("location").expect("Location").to_string();
    let rest_of = location
        .strip_prefix("http://127.0.0.1:")
        .expect("loopback");
    let (port, target) = rest_of.split_at(rest_of.find('/').expect("path"));
    let back = http_request(port.parse().unwrap(), "GET", target, &[], b"");
    assert_eq!(back.status, 200);
    assert!(String::from_utf8_lossy(&back.body).contains("authorised"));
    let run = finish(child, printed, rest);
    run.assert_ok("oauth add --browser");
    assert!(
        run.stdout.contains("enrolled bob@example.org"),
        "{}",
        run.describe()
    );
    let stats = oauth.stats();
    assert_eq!(stats.grant("authorization_code"), 1, "{}", stats.raw);
    assert_eq!(stats.active_refresh("bob@example.org"), 1, "{}", stats.raw);
}

#[test]
fn invalid_grant_marks_the_account_for_reenrolment() {
    let oauth = OauthServer::start();
    let s = Setup::new(&oauth, "");
    s.enrol(&oauth, ACCOUNT).assert_ok("enrol");
    assert_eq!(oauth.revoke_refresh_tokens(Some(ACCOUNT)), 1);
    let t = s.run(&["oauth", "test", "--token-only", ACCOUNT, "--force-refresh"]);
    t.assert_code(1, "a revoked refresh token fails");
    assert!(
        t.stderr.contains("needs re-enrolment")
            && t.stderr
                .contains("popbridge oauth add alice@example.org --provider test"),
        "{}",
        t.describe()
    );
    // The log line names the account and the fix; no token appears.
    let list = s.run(&["oauth", "list"]);
    list.assert_ok("list");
    assert!(
        list.stdout.contains("needs_reenrolment"),
        "{}",
        list.describe()
    );
    // Later attempts do not go to the provider again.
    let before = oauth.stats().grant("refresh_token") + oauth.stats().token_error("invalid_grant");
    s.run(&["oauth", "test", "--token-only", ACCOUNT, "--force-refresh"])
        .assert_code(1, "still needs enrolment");
    let after = oauth.stats().grant("refresh_token") + oauth.stats().token_error("invalid_grant");
    assert_eq!(
        before, after,
        "no provider call for an account needing re-enrolment"
    );
    // Re-enrolment makes it active again.
    s.enrol(&oauth, ACCOUNT).assert_ok("re-enrol");
    let list = s.run(&["oauth", "list"]);
    assert!(list.stdout.contains("active"), "{}", list.describe());
    s.run(&["oauth", "test", "--token-only", ACCOUNT, "--force-refresh"])
        .assert_ok("works after re-enrolment");
}

#[test]
fn devices_add_list_remove_without_leaking_passwords_or_hashes() {
    let oauth = OauthServer::start();
    let s = Setup::new(&oauth, "");
    s.enrol(&oauth, ACCOUNT).assert_ok("enrol");
    let pw_file = s.dir.path().join("pw");
    std::fs::write(&pw_file, "scanner-password-1\n").unwrap();
    let add = s.run(&[
        "device",
        "add",
        "scanner",
        "--account",
        ACCOUNT,
        "--password-file",
        pw_file.to_str().unwrap(),
        "--allow",
        "10.0.0.0/8",
    ]);
    add.assert_ok("device add --password-file");
    assert!(
        !add.all().contains("scanner-password-1"),
        "{}",
        add.describe()
    );
    let add2 = s.run_env(
        &["device", "add", "printer", "--account", ACCOUNT],
        &[("POPBRIDGE_DEVICE_PASSWORD", "printer-password-2")],
    );
    add2.assert_ok("device add from the environment");
    let gen = s.run(&["device", "add", "alarm", "--account", ACCOUNT, "--generate"]);
    gen.assert_ok("device add --generate");
    let generated = gen
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("password (shown once): "))
        .unwrap_or_else(|| panic!("{}", gen.describe()))
        .to_string();
    assert!(generated.len() >= 20, "{generated}");

    // Same login twice: refused, nothing changed.
    s.run_env(
        &["device", "add", "printer", "--account", ACCOUNT],
        &[("POPBRIDGE_DEVICE_PASSWORD", "another-password-3")],
    )
    .assert_code(1, "duplicate login");
    // Short passwords and no password source: usage errors.
    s.run_env(
        &["device", "add", "short", "--account", ACCOUNT],
        &[("POPBRIDGE_DEVICE_PASSWORD", "short")],
    )
    .assert_code(2, "short password");
    s.run(&["device", "add", "nopw", "--account", ACCOUNT])
        .assert_code(2, "no password source without a terminal");

    let list = s.run(&["device", "list"]);
    list.assert_ok("device list");
    for login in ["scanner", "printer", "alarm"] {
        assert!(list.stdout.contains(login), "{}", list.describe());
    }
    assert!(list.stdout.contains("10.0.0.0/8"), "{}", list.describe());
    assert!(!list.all().contains("argon2"), "{}", list.describe());
    assert!(!list.all().contains(&generated), "{}", list.describe());

    // The device file holds argon2id hashes, not passwords, and those
    // sealed with the store key (not even the hash in clear).
    let devices = std::fs::read_to_string(s.store_dir().join("devices.json")).unwrap();
    assert_eq!(devices.matches("\"sealed\"").count(), 3, "{devices}");
    assert!(!devices.contains("$argon2id$"), "{devices}");
    for pw in [
        "scanner-password-1",
        "printer-password-2",
        generated.as_str(),
    ] {
        assert!(!devices.contains(pw));
    }

    // Removing one device leaves the others.
    s.run(&["device", "remove", "printer"])
        .assert_ok("device remove");
    let list = s.run(&["device", "list"]);
    assert!(!list.stdout.contains("printer"), "{}", list.describe());
    assert!(list.stdout.contains("scanner") && list.stdout.contains("alarm"));
    s.run(&["device", "remove", "printer"])
        .assert_code(1, "removing twice fails");
    // Devices never touched the provider.
    assert_eq!(oauth.stats().grant("refresh_token"), 0);
}

#[test]
fn wrong_missing_and_short_keys_are_refused_clearly() {
    let oauth = OauthServer::start();
    let s = Setup::new(&oauth, "");
    s.enrol(&oauth, ACCOUNT).assert_ok("enrol");

    // Another key: named as such, not as corruption, and nothing printed
    // from the store.
    let other = s.write_another_key();
    let r = s.run(&["oauth", "list"]);
    r.assert_code(1, "wrong key");
    assert!(
        r.stderr.contains("written with another key"),
        "{}",
        r.describe()
    );
    assert!(!r.all().contains(other.trim()), "the key is never printed");
    let r = s.run(&["oauth", "test", "--token-only", ACCOUNT]);
    r.assert_code(1, "wrong key for test");
    assert!(r.stderr.contains("another key"), "{}", r.describe());

    // Missing key file: a configuration error (2), also at --check-config.
    std::fs::remove_file(&s.key_file).unwrap();
    let r = s.run(&["oauth", "list"]);
    r.assert_code(2, "missing key");
    assert!(r.stderr.contains("key_file"), "{}", r.describe());
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_popbridge"));
    c.arg("--config").arg(&s.config).arg("--check-config");
    c.env_remove("POPBRIDGE_OAUTH_KEY");
    let r = run_command(c);
    r.assert_code(2, "--check-config without the key");
    assert!(r.stderr.contains("key_file"), "{}", r.describe());

    // A short key: refused, not echoed.
    crate::common::write_private(&s.key_file, "c2hvcnQta2V5LW9ubHk=\n");
    let r = s.run(&["oauth", "list"]);
    r.assert_code(2, "short key");
    assert!(
        r.stderr.contains("bytes") && !r.all().contains("c2hvcnQta2V5"),
        "{}",
        r.describe()
    );

    // The right key again: everything is still there.
    crate::common::write_private(&s.key_file, &s.key);
    let r = s.run(&["oauth", "list"]);
    r.assert_ok("right key");
    assert!(r.stdout.contains(ACCOUNT));
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_popbridge"));
    c.arg("--config").arg(&s.config).arg("--check-config");
    let r = run_command(c);
    r.assert_ok("--check-config with the key");
    assert!(!r.all().contains(s.key.trim()), "the key is never printed");
}

#[test]
fn truncated_store_file_is_refused_and_the_backup_named() {
    let oauth = OauthServer::start();
    let s = Setup::new(&oauth, "");
    s.enrol(&oauth, ACCOUNT).assert_ok("enrol");
    s.enrol(&oauth, "bob@example.org").assert_ok("enrol bob");
    let path = s.store_dir().join("tokens.json");
    let full = std::fs::read(&path).unwrap();
    // A crash mid-write leaves a temp file beside an intact store: ignored.
    std::fs::write(
        s.store_dir().join("tokens.json.tmp-0123456789abcdef"),
        &full[..10],
    )
    .unwrap();
    let r = s.run(&["oauth", "list"]);
    r.assert_ok("stray temp file");
    assert!(r.stdout.contains(ACCOUNT) && r.stdout.contains("bob@example.org"));
    // The store file itself truncated: refused, never read as empty.
    std::fs::write(&path, &full[..full.len() / 2]).unwrap();
    let r = s.run(&["oauth", "list"]);
    r.assert_code(1, "truncated store");
    assert!(
        r.stderr.contains("truncated or corrupt") && r.stderr.contains("tokens.json.bak"),
        "{}",
        r.describe()
    );
    let r = s.run(&["oauth", "test", "--token-only", ACCOUNT]);
    r.assert_code(1, "truncated store for test");
    // The backup is the previous generation (alice only): copying it back
    // recovers, as the message says.
    std::fs::copy(s.store_dir().join("tokens.json.bak"), &path).unwrap();
    let r = s.run(&["oauth", "list"]);
    r.assert_ok("recovered from the backup");
    assert!(r.stdout.contains(ACCOUNT), "{}", r.describe());
}

#[test]
fn commands_need_a_configuration_and_valid_arguments() {
    let r = run_command({
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_popbridge"));
        c.args(["oauth", "list"]);
        c
    });
    r.assert_code(2, "no --config");
    assert!(r.stderr.contains("--config"), "{}", r.describe());
    let oauth = OauthServer::start();
    let s = Setup::new(&oauth, "");
    s.run(&["oauth", "add", "a b"])
        .assert_code(2, "space in account");
    s.run(&["oauth", "add", ACCOUNT, "--provider", "nope"])
        .assert_code(2, "unknown provider");
    s.run(&[
        "device",
        "add",
        "x",
        "--account",
        ACCOUNT,
        "--allow",
        "not-a-net",
        "--generate",
    ])
    .assert_code(2, "bad network");
    s.run(&["oauth", "test", "--token-only", "nobody@example.org"])
        .assert_code(1, "not enrolled");
}

#[test]
fn denied_device_flow_fails_without_storing() {
    let oauth = OauthServer::start();
    let s = Setup::new(&oauth, "");
    let mut child = s.spawn(&["oauth", "add", ACCOUNT]);
    let (code, printed, rest) = read_user_code(child.stdout.take().unwrap());
    oauth.deny(&code);
    let r = finish(child, printed, rest);
    r.assert_code(1, "denied");
    assert!(r.stderr.contains("denied"), "{}", r.describe());
    let list = s.run(&["oauth", "list"]);
    assert!(list.stdout.contains("no accounts"), "{}", list.describe());
}

#[test]
fn trace_logging_shows_no_tokens_or_secrets() {
    let oauth = OauthServer::start_with(OauthServerOptions {
        client_secret: Some("client-secret-value".into()),
        ..OauthServerOptions::default()
    });
    let s = Setup::new(&oauth, "");
    let secret_file = s.dir.path().join("client-secret");
    std::fs::write(&secret_file, "client-secret-value\n").unwrap();
    let text = std::fs::read_to_string(&s.config).unwrap().replace(
        "mechanism = \"xoauth2\"",
        &format!(
            "mechanism = \"xoauth2\"\nclient_secret_file = \"{}\"",
            secret_file.display()
        ),
    );
    std::fs::write(&s.config, text).unwrap();
    s.enrol(&oauth, ACCOUNT)
        .assert_ok("enrol with a client secret");
    let r = s.run_env(
        &["oauth", "test", "--token-only", ACCOUNT, "--force-refresh"],
        &[("RUST_LOG", "trace")],
    );
    r.assert_ok("refresh at trace level");
    assert!(
        r.stderr.contains("access token refreshed"),
        "{}",
        r.describe()
    );
    assert!(
        r.stderr.contains("TRACE"),
        "trace logging is on\n{}",
        r.describe()
    );
    // The tokens the server issued: take the newest pair from a fresh
    // refresh of our own is impossible without the refresh token, so
    // check for every token-bearing parameter and field name instead.
    for needle in [
        "client-secret-value",
        "refresh_token=",
        "\"refresh_token\"",
        "\"access_token\"",
        "access_token=",
        "Bearer ",
        "client_secret=",
    ] {
        assert!(
            !r.all().contains(needle),
            "{needle:?} in the output\n{}",
            r.describe()
        );
    }
}

#[test]
fn browser_flow_accepts_the_redirect_address_pasted_on_stdin() {
    use std::io::Write;
    let oauth = OauthServer::start();
    let s = Setup::new(&oauth, "");
    let mut cmd = s.command(&["oauth", "add", "carol@example.org", "--browser"]);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let (url, printed, rest) = read_url(child.stdout.take().unwrap());
    let path = url.strip_prefix(&oauth.base_url()).unwrap();
    let resp = oauth.request("GET", path, &[], b"");
    assert_eq!(resp.status, 302);
    let location = resp.header("location").unwrap().to_string();
    // Something else first: refused with a hint, then the real address.
    writeln!(stdin, "not the address").unwrap();
    writeln!(stdin, "{location}").unwrap();
    drop(stdin);
    let run = finish(child, printed, rest);
    run.assert_ok("oauth add --browser with a pasted redirect");
    assert!(
        run.stderr.contains("not the redirect address"),
        "{}",
        run.describe()
    );
    assert!(
        run.stdout.contains("enrolled carol@example.org"),
        "{}",
        run.describe()
    );
    assert_eq!(oauth.stats().grant("authorization_code"), 1);
}

/// The file's permission bits.
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn chmod(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `sh -c SCRIPT` under umask 022 with the popbridge binary as `$PB`.
fn sh_umask_022(script: &str) -> Run {
    let mut c = std::process::Command::new("sh");
    c.arg("-c")
        .arg(format!("umask 022; {script}"))
        .env("PB", env!("CARGO_BIN_EXE_popbridge"));
    run_command(c)
}

/// `generate-key --output FILE` creates FILE 0600 whatever the umask and
/// never overwrites a key; `generate-key > FILE` (the old instructions)
/// leaves a private file too.
#[test]
fn generate_key_writes_a_private_file_and_never_overwrites_one() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("oauth.key");
    let r = sh_umask_022(&format!(
        "exec \"$PB\" oauth generate-key --output '{}'",
        key.display()
    ));
    r.assert_ok("generate-key --output");
    assert_eq!(mode(&key), 0o600);
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(popbridge::config::oauth::parse_key(&text).is_ok(), "{text}");
    assert!(!r.all().contains(text.trim()), "the key is not printed");
    let r = sh_umask_022(&format!(
        "exec \"$PB\" oauth generate-key --output '{}'",
        key.display()
    ));
    r.assert_code(1, "an existing key file");
    assert!(
        r.stderr.contains("refusing to overwrite"),
        "{}",
        r.describe()
    );
    assert_eq!(std::fs::read_to_string(&key).unwrap(), text, "unchanged");

    let redirected = dir.path().join("redirected.key");
    let r = sh_umask_022(&format!(
        "exec \"$PB\" oauth generate-key > '{}'",
        redirected.display()
    ));
    r.assert_ok("generate-key > FILE");
    assert_eq!(mode(&redirected), 0o600, "{}", r.describe());
    let text = std::fs::read_to_string(&redirected).unwrap();
    assert!(popbridge::config::oauth::parse_key(&text).is_ok(), "{text}");
}

/// A key file every user may read stops `--check-config`, the server and
/// the commands, naming the fix; `allow_world_readable_key` turns that
/// into a warning; a file another group may read is a warning (at
/// `--check-config` on stderr, in the server's log at start), one that
/// only popbridge's own group may read is fine.
#[test]
fn a_key_file_others_can_read_is_refused_and_one_the_group_can_read_is_warned() {
    let oauth = OauthServer::start();
    let s = Setup::new(&oauth, "");
    let check = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_popbridge"));
        c.arg("--config").arg(&s.config).arg("--check-config");
        c.env_remove("POPBRIDGE_OAUTH_KEY");
        run_command(c)
    };
    assert_eq!(mode(&s.key_file), 0o600);
    let r = check();
    r.assert_ok("private key file");
    assert!(!r.stderr.contains("warning"), "{}", r.describe());

    chmod(&s.key_file, 0o644);
    let r = check();
    r.assert_code(2, "--check-config, world-readable key");
    assert!(
        r.stderr.contains("every user")
            && r.stderr.contains("0644")
            && r.stderr.contains("chmod 600"),
        "{}",
        r.describe()
    );
    assert!(!r.all().contains(&s.key), "the key is never printed");
    s.run(&["oauth", "list"])
        .assert_code(2, "oauth list, world-readable key");
    s.run(&["device", "list"])
        .assert_code(2, "device list, world-readable key");
    let r = s.run(&["--listen", "127.0.0.1:0"]);
    r.assert_code(2, "serving, world-readable key");
    assert!(r.stderr.contains("every user"), "{}", r.describe());

    // Readable by popbridge's own group (Kubernetes' fsGroup, 0440): fine.
    chmod(&s.key_file, 0o440);
    let r = check();
    r.assert_ok("key file readable by popbridge's own group");
    assert!(!r.stderr.contains("warning"), "{}", r.describe());
    // Readable by another group: a warning. (Needs a group to give the
    // file to: root can; another user only to a group it is in.)
    chmod(&s.key_file, 0o640);
    let own = std::os::unix::fs::MetadataExt::gid(&std::fs::metadata("/proc/self").unwrap());
    let other = if own == 65534 { 65533 } else { 65534 };
    match std::os::unix::fs::chown(&s.key_file, None, Some(other)) {
        Err(e) => eprintln!("skipped the other-group case: cannot chown to gid {other}: {e}"),
        Ok(()) => {
            let r = check();
            r.assert_ok("group-readable key file");
            assert!(
                r.stderr.contains("warning")
                    && r.stderr.contains(&format!("gid {other}"))
                    && r.stderr.contains("0640"),
                "{}",
                r.describe()
            );
            let r = s.run(&["oauth", "list"]);
            r.assert_ok("oauth list, group-readable key");
            assert!(r.stderr.contains("warning"), "{}", r.describe());
            let pb =
                crate::common::Popbridge::start_exact(&["--config", s.config.to_str().unwrap()]);
            let line = pb
                .log()
                .lines()
                .find(|l| l.contains("oauth.key_file"))
                .map(str::to_string);
            assert!(
                line.as_deref()
                    .is_some_and(|l| l.contains("WARN") && l.contains("0640")),
                "{}",
                pb.log()
            );
        }
    }

    // Allowed explicitly: a warning instead of a refusal.
    chmod(&s.key_file, 0o644);
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        text.replace("[oauth]\n", "[oauth]\nallow_world_readable_key = true\n"),
    )
    .unwrap();
    let r = check();
    r.assert_ok("world-readable key, allowed");
    assert!(
        r.stderr.contains("warning") && r.stderr.contains("every user"),
        "{}",
        r.describe()
    );
}
