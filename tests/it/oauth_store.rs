//! The token store and the token service against real servers: the Redis
//! backend shared by two popbridge processes refreshing at once (the
//! newest refresh token is kept; with the lock, exactly one refresh), the
//! same race on the file backend, and the library's `OauthRuntime`: one
//! refresh for many concurrent requests, device checks that never reach
//! the provider, invalid_grant, and throttling backoff.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::oauth::*;
use crate::common::redis::*;
use crate::oauth_support::*;
use popbridge::config::Config;
use popbridge::oauth::{BackoffCause, DeviceAuthError, OauthRuntime, TokenError};
use popbridge::pop3::command::Secret;

/// Waiting for both processes to reach Redis.
const CONNECT_WAIT: Duration = Duration::from_secs(60);

fn redis_setup(oauth: &OauthServer, redis: &Redis) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pw_file = dir.path().join("redis-password");
    std::fs::write(&pw_file, redis.password.clone().unwrap_or_default()).unwrap();
    let s = Setup::new(
        oauth,
        &format!(
            "store = \"redis\"\nredis_url = \"{}\"\nredis_password_file = \"{}\"",
            redis.url(),
            pw_file.display()
        ),
    );
    // Keep the password file alive with the setup's directory.
    let kept = s.dir.path().join("redis-password");
    std::fs::copy(&pw_file, &kept).unwrap();
    let text = std::fs::read_to_string(&s.config)
        .unwrap()
        .replace(&pw_file.display().to_string(), &kept.display().to_string());
    std::fs::write(&s.config, text).unwrap();
    s
}

fn reuse_detecting_server() -> OauthServer {
    OauthServer::start_with(OauthServerOptions {
        // Reusing a rotated refresh token revokes the whole grant: a lost
        // update would be fatal, not silent.
        reuse_revokes_family: true,
        ..OauthServerOptions::default()
    })
}

fn redis_clients(redis: &Redis) -> usize {
    let list = redis
        .command(&["CLIENT", "LIST"])
        .as_text()
        .expect("CLIENT LIST text");
    list.lines().filter(|l| !l.trim().is_empty()).count()
}

#[test]
fn redis_two_processes_refreshing_at_once_make_one_refresh_and_keep_the_newest_token() {
    let oauth = reuse_detecting_server();
    let redis = Redis::start_with(RedisOptions {
        requirepass: Some("redis-test-password".into()),
        ..RedisOptions::default()
    });
    let s = redis_setup(&oauth, &redis);
    s.enrol(&oauth, ACCOUNT).assert_ok("enrol into Redis");

    // Namespaced keys; the record is sealed.
    let keys = redis.keys("popbridge:oauth:*");
    assert!(
        keys.contains(&"popbridge:oauth:accounts".to_string()),
        "{keys:?}"
    );
    assert!(
        keys.contains(&"popbridge:oauth:meta".to_string()),
        "{keys:?}"
    );
    let record = redis
        .command(&["HGET", "popbridge:oauth:accounts", ACCOUNT])
        .as_text()
        .expect("account record");
    assert!(
        record.contains("\"sealed\"") && !record.contains("refresh_token"),
        "{record}"
    );

    // Hold the refresh lock ourselves so both processes are waiting for it
    // before either can refresh; then let go.
    let lock = format!("popbridge:oauth:lock:{ACCOUNT}");
    assert_eq!(
        redis.command(&["SET", &lock, "test-holder", "NX", "PX", "120000"]),
        Resp::Simple("OK".into())
    );
    let before = redis_clients(&redis);
    let a = s.spawn(&["oauth", "test", "--token-only", ACCOUNT, "--force-refresh"]);
    let b = s.spawn(&["oauth", "test", "--token-only", ACCOUNT, "--force-refresh"]);
    let finish_child = |mut c: std::process::Child| {
        let out = c.stdout.take().unwrap();
        finish(c, String::new(), std::io::BufReader::new(out))
    };
    let deadline = Instant::now() + CONNECT_WAIT;
    while redis_clients(&redis) < before + 2 {
        if Instant::now() >= deadline {
            // What the processes and Redis were doing, for the report.
            let clients = redis.command(&["CLIENT", "LIST"]);
            let runs: Vec<String> = [a, b]
                .into_iter()
                .map(|mut c| {
                    let _ = c.kill();
                    finish_child(c).describe()
                })
                .collect();
            panic!(
                "the two processes never reached Redis ({before} clients before, now {clients:?})\n{}",
                runs.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        oauth.stats().grant("refresh_token"),
        0,
        "nobody refreshed under our lock"
    );
    redis.command(&["DEL", &lock]);
    let ra = finish_child(a);
    let rb = finish_child(b);
    ra.assert_ok("first process");
    rb.assert_ok("second process");
    let stats = oauth.stats();
    assert_eq!(
        stats.grant("refresh_token"),
        1,
        "one refresh for both\n{}",
        stats.raw
    );
    assert_eq!(stats.token_error("invalid_grant"), 0, "{}", stats.raw);
    assert_eq!(stats.refresh_reuse, 0, "{}", stats.raw);

    // The stored refresh token is the newest one: it still works.
    s.run(&["oauth", "test", "--token-only", ACCOUNT, "--force-refresh"])
        .assert_ok("refresh with the stored (newest) token");
    let stats = oauth.stats();
    assert_eq!(stats.grant("refresh_token"), 2, "{}", stats.raw);
    assert_eq!(stats.active_refresh(ACCOUNT), 1, "{}", stats.raw);
    assert_eq!(stats.refresh_reuse, 0, "{}", stats.raw);
    // Our lock is gone, theirs released.
    assert!(redis.keys("popbridge:oauth:lock:*").is_empty());
}

#[test]
fn redis_free_race_never_loses_the_rotated_token() {
    let oauth = reuse_detecting_server();
    let redis = Redis::start();
    let s = redis_setup(&oauth, &redis);
    s.enrol(&oauth, ACCOUNT).assert_ok("enrol");
    for round in 0..3 {
        let stats = s.race_two_refreshes(&oauth, round);
        assert_eq!(stats.active_refresh(ACCOUNT), 1, "{}", stats.raw);
    }
}

#[test]
fn file_store_race_between_processes_never_loses_the_rotated_token() {
    let oauth = reuse_detecting_server();
    let s = Setup::new(&oauth, "");
    s.enrol(&oauth, ACCOUNT).assert_ok("enrol");
    for round in 0..3 {
        s.race_two_refreshes(&oauth, round);
    }
    s.run(&["oauth", "test", "--token-only", ACCOUNT, "--force-refresh"])
        .assert_ok("the stored token is the newest");
}

#[test]
fn redis_wrong_key_and_bad_urls_are_refused() {
    let oauth = OauthServer::start();
    let redis = Redis::start_with(RedisOptions {
        requirepass: Some("sekrit-redis-pw".into()),
        ..RedisOptions::default()
    });
    let s = redis_setup(&oauth, &redis);
    s.enrol(&oauth, ACCOUNT).assert_ok("enrol");
    let other = s.write_another_key();
    let r = s.run(&["oauth", "list"]);
    r.assert_code(1, "wrong key on Redis");
    assert!(r.stderr.contains("another key"), "{}", r.describe());
    // The server's start-up refuses it too (called inside a runtime, as
    // the server does).
    let config = Config::from_file(&s.config).unwrap();
    let e = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { OauthRuntime::from_config(&config).map(|_| ()) })
        .unwrap_err();
    assert!(
        e.contains("another key") && !e.contains(other.trim()),
        "{e}"
    );
    crate::common::write_private(&s.key_file, &s.key);
    s.run(&["oauth", "list"]).assert_ok("right key");
    let config = Config::from_file(&s.config).unwrap();
    assert!(OauthRuntime::from_config(&config).unwrap().is_some());

    // A wrong Redis password: a clear failure, the password not printed.
    std::fs::write(s.dir.path().join("redis-password"), "wrong-pw").unwrap();
    let r = s.run(&["oauth", "list"]);
    r.assert_code(1, "wrong Redis password");
    assert!(
        !r.all().contains("wrong-pw") && !r.all().contains("sekrit"),
        "{}",
        r.describe()
    );

    // Credentials in the URL are refused at --check-config, not echoed.
    let text = std::fs::read_to_string(&s.config).unwrap().replace(
        &redis.url(),
        &format!("redis://:sekrit-redis-pw@127.0.0.1:{}", redis.port),
    );
    std::fs::write(&s.config, text).unwrap();
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_popbridge"));
    c.arg("--config").arg(&s.config).arg("--check-config");
    let r = run_command(c);
    r.assert_code(2, "password in redis_url");
    assert!(
        r.stderr.contains("redis_url") && !r.all().contains("sekrit"),
        "{}",
        r.describe()
    );
}

fn runtime_for(s: &Setup) -> Arc<OauthRuntime> {
    let config = Config::from_file(&s.config).expect("config");
    config.validate().expect("valid config");
    OauthRuntime::from_config(&config)
        .expect("runtime")
        .expect("an oauth2 route exists")
}

fn add_device(s: &Setup, login: &str, password: &str, allow: Option<&str>) {
    let mut args = vec!["device", "add", login, "--account", ACCOUNT];
    if let Some(a) = allow {
        args.extend(["--allow", a]);
    }
    s.run_env(&args, &[("POPBRIDGE_DEVICE_PASSWORD", password)])
        .assert_ok("device add");
}

#[test]
fn runtime_single_flight_refresh_devices_and_reenrolment() {
    let oauth = reuse_detecting_server();
    let s = Setup::new(&oauth, "");
    s.enrol(&oauth, ACCOUNT).assert_ok("enrol");
    add_device(&s, "scanner", "scanner-password-1", None);
    add_device(&s, "printer", "printer-password-2", Some("10.0.0.0/8"));
    let rt = runtime_for(&s);
    let tokio = tokio::runtime::Runtime::new().unwrap();
    tokio.block_on(async {
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let pw = |p: &str| Secret::new(p.as_bytes().to_vec());

        // Devices: both map to the account; wrong password, unknown login
        // and a disallowed address fail; none of it reaches the provider.
        let g = rt
            .authenticate_device("scanner", &pw("scanner-password-1"), local)
            .await
            .unwrap();
        assert_eq!(
            (g.account.as_str(), g.device.as_str()),
            (ACCOUNT, "scanner")
        );
        let g = rt
            .authenticate_device(
                "printer",
                &pw("printer-password-2"),
                "10.1.2.3".parse().unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(g.account, ACCOUNT);
        assert_eq!(
            rt.authenticate_device("printer", &pw("printer-password-2"), local)
                .await,
            Err(DeviceAuthError::AddressNotAllowed)
        );
        assert_eq!(
            rt.authenticate_device("scanner", &pw("printer-password-2"), local)
                .await,
            Err(DeviceAuthError::BadPassword)
        );
        assert_eq!(
            rt.authenticate_device("nobody", &pw("whatever-password"), local)
                .await,
            Err(DeviceAuthError::UnknownDevice)
        );
        let stats = oauth.stats();
        assert_eq!(stats.grant("refresh_token"), 0, "{}", stats.raw);

        // The enrolment's access token is used as is.
        let sasl = rt.sasl(PROVIDER).expect("provider SASL");
        assert_eq!(sasl.mechanism, popbridge::config::SaslMechanism::XOauth2);
        let first = rt.access_token(PROVIDER, ACCOUNT).await.unwrap();
        assert_eq!(
            oauth
                .introspect(first.expose())
                .get("active")
                .and_then(Json::as_bool),
            Some(true)
        );
        assert!(!format!("{first:?}").contains(first.expose()));
        assert_eq!(oauth.stats().grant("refresh_token"), 0);

        // The IMAP server refused it: 20 devices at once make one refresh.
        oauth.expire_access_tokens();
        rt.token_rejected(PROVIDER, ACCOUNT, &first);
        let calls = (0..20).map(|_| rt.access_token(PROVIDER, ACCOUNT));
        let tokens = futures::future::join_all(calls).await;
        let tokens: Vec<_> = tokens.into_iter().map(|t| t.expect("token")).collect();
        let stats = oauth.stats();
        assert_eq!(stats.grant("refresh_token"), 1, "{}", stats.raw);
        assert!(tokens.iter().all(|t| t.expose() == tokens[0].expose()));
        assert_ne!(tokens[0].expose(), first.expose());
        assert_eq!(
            oauth
                .introspect(tokens[0].expose())
                .get("active")
                .and_then(Json::as_bool),
            Some(true)
        );

        // Throttling: backed off, not hammered.
        rt.token_rejected(PROVIDER, ACCOUNT, &tokens[0]);
        oauth.throttle(100);
        let throttled_before = oauth.stats().throttled;
        for _ in 0..5 {
            match rt.access_token(PROVIDER, ACCOUNT).await {
                Err(TokenError::BackingOff {
                    cause: BackoffCause::ProviderThrottled,
                    retry_after_secs,
                }) => assert!(retry_after_secs >= 1),
                other => panic!("expected Throttled, got {other:?}"),
            }
        }
        assert_eq!(
            oauth.stats().throttled - throttled_before,
            1,
            "one provider request, then the backoff answers"
        );
    });
}

#[test]
fn runtime_invalid_grant_needs_reenrolment_with_the_operator_command() {
    let oauth = OauthServer::start();
    let s = Setup::new(&oauth, "");
    s.enrol(&oauth, ACCOUNT).assert_ok("enrol");
    let rt = runtime_for(&s);
    let tokio = tokio::runtime::Runtime::new().unwrap();
    tokio.block_on(async {
        let t = rt.access_token(PROVIDER, ACCOUNT).await.unwrap();
        oauth.revoke_refresh_tokens(Some(ACCOUNT));
        rt.token_rejected(PROVIDER, ACCOUNT, &t);
        let e = rt.access_token(PROVIDER, ACCOUNT).await.unwrap_err();
        match &e {
            TokenError::NeedsEnrolment { account, reason } => {
                assert_eq!(account, ACCOUNT);
                assert!(
                    reason.contains("popbridge oauth add alice@example.org"),
                    "{reason}"
                );
                assert!(reason.contains("invalid_grant"), "{reason}");
            }
            other => panic!("expected NeedsEnrolment, got {other:?}"),
        }
        // No second provider call while it waits for an operator.
        let errors = oauth.stats().token_error("invalid_grant");
        assert!(matches!(
            rt.access_token(PROVIDER, ACCOUNT).await,
            Err(TokenError::NeedsEnrolment { .. })
        ));
        assert_eq!(oauth.stats().token_error("invalid_grant"), errors);
        // Unknown account: needs enrolment, no provider call.
        assert!(matches!(
            rt.access_token(PROVIDER, "nobody@example.org").await,
            Err(TokenError::NeedsEnrolment { .. })
        ));
    });
    let list = s.run(&["oauth", "list"]);
    assert!(
        list.stdout.contains("needs_reenrolment"),
        "{}",
        list.describe()
    );
}

/// Where a test reads and writes raw device records: the Redis hash or
/// the file store's devices.json.
enum RawDevices<'a> {
    Redis(&'a Redis),
    File(std::path::PathBuf),
}

impl RawDevices<'_> {
    fn get(&self, login: &str) -> Option<String> {
        match self {
            RawDevices::Redis(r) => r
                .command(&["HGET", "popbridge:oauth:devices", login])
                .as_text(),
            RawDevices::File(path) => {
                let file: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(path).unwrap())
                        .expect("devices.json");
                file.get("devices")
                    .and_then(|d| d.get(login))
                    .map(|v| v.to_string())
            }
        }
    }

    /// Writes `json` as `login`'s record, as someone with write access to
    /// the store but without the key could.
    fn put(&self, login: &str, json: &str) {
        match self {
            RawDevices::Redis(r) => {
                r.command(&["HSET", "popbridge:oauth:devices", login, json]);
            }
            RawDevices::File(path) => {
                let mut file: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
                let record: serde_json::Value = serde_json::from_str(json).unwrap();
                file.as_object_mut()
                    .unwrap()
                    .get_mut("devices")
                    .unwrap()
                    .as_object_mut()
                    .unwrap()
                    .insert(login.to_string(), record);
                std::fs::write(path, serde_json::to_string_pretty(&file).unwrap()).unwrap();
            }
        }
    }
}

fn refused_metric(kind: &str) -> f64 {
    let text = popbridge::metrics::metrics().encode();
    let series = format!("popbridge_oauth_device_records_refused_total{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Device records carry no clear hash and are sealed; a record added,
/// altered or copied by someone who can write to the store but lacks the
/// key is refused (logged and counted), even with the right password for
/// the hash it holds; `device list` marks it; a record of the old, unsealed
/// format is refused until `device seal` seals it.
fn forged_device_records_are_refused(s: &Setup, raw: &RawDevices) {
    add_device(s, "scanner", "scanner-password-1", Some("10.0.0.0/8"));
    let stored = raw.get("scanner").expect("the scanner's record");
    assert!(
        stored.contains("\"sealed\"") && !stored.contains("argon2"),
        "{stored}"
    );
    let rt = runtime_for(s);
    let lan: IpAddr = "10.1.2.3".parse().unwrap();
    let anywhere: IpAddr = "192.0.2.1".parse().unwrap();
    let pw = |p: &str| Secret::new(p.as_bytes().to_vec());
    let tokio = tokio::runtime::Runtime::new().unwrap();

    // A device of the attacker's own, in the old (unsealed) format, with
    // a hash of a password the attacker knows.
    let hash = popbridge::oauth::device::hash_password(b"attacker-password").unwrap();
    let forged = format!(
        r#"{{"login":"evil","hash":"{hash}","account":"{ACCOUNT}","allow":[],"created":1}}"#
    );
    raw.put("evil", &forged);
    // The scanner's sealed record, widened to every network; and copied
    // under another name.
    let widened = stored
        .replace("\"10.0.0.0/8\"", "")
        .replace("[,", "[")
        .replace(",]", "]");
    assert_ne!(widened, stored);
    let copied = stored.clone();
    let unsealed_before = refused_metric("unsealed");
    let tampered_before = refused_metric("tampered");
    tokio.block_on(async {
        assert_eq!(
            rt.authenticate_device("evil", &pw("attacker-password"), anywhere)
                .await,
            Err(DeviceAuthError::UntrustedRecord),
            "a forged device must not log in"
        );
        raw.put("copy", &copied);
        assert_eq!(
            rt.authenticate_device("copy", &pw("scanner-password-1"), lan)
                .await,
            Err(DeviceAuthError::UntrustedRecord),
            "a record copied under another name"
        );
        assert!(rt
            .authenticate_device("scanner", &pw("scanner-password-1"), lan)
            .await
            .is_ok());
        raw.put("scanner", &widened);
        assert_eq!(
            rt.authenticate_device("scanner", &pw("scanner-password-1"), anywhere)
                .await,
            Err(DeviceAuthError::UntrustedRecord),
            "a record whose networks were changed"
        );
        raw.put("scanner", &stored);
        assert!(rt
            .authenticate_device("scanner", &pw("scanner-password-1"), lan)
            .await
            .is_ok());
    });
    assert!(refused_metric("unsealed") > unsealed_before);
    assert!(refused_metric("tampered") >= tampered_before + 2.0);
    let r = s.run(&["device", "list"]);
    r.assert_ok("device list");
    let line = |login: &str| {
        r.stdout
            .lines()
            .find(|l| l.starts_with(&format!("{login} ")))
            .unwrap_or_else(|| panic!("no {login} in\n{}", r.describe()))
            .to_string()
    };
    assert!(line("scanner").ends_with("sealed"), "{}", r.describe());
    assert!(
        line("evil").contains("REFUSED: not sealed"),
        "{}",
        r.describe()
    );
    assert!(
        line("copy").contains("REFUSED: tampered"),
        "{}",
        r.describe()
    );
    assert!(!r.all().contains("argon2"), "{}", r.describe());

    // Upgrading: the operator vouches for an old record and seals it; its
    // password keeps working. (Here the "old" record is the forgery: the
    // command trusts what it seals, which is why it is explicit.)
    s.run(&["device", "seal", "scanner"])
        .assert_code(1, "a sealed record is not sealed again");
    s.run(&["device", "seal", "--all"])
        .assert_ok("device seal --all");
    let sealed = raw.get("evil").unwrap();
    assert!(
        sealed.contains("\"sealed\"") && !sealed.contains("argon2"),
        "{sealed}"
    );
    tokio.block_on(async {
        assert!(rt
            .authenticate_device("evil", &pw("attacker-password"), anywhere)
            .await
            .is_ok());
    });
}

#[test]
fn redis_device_records_are_sealed_and_forged_ones_refused() {
    let oauth = OauthServer::start();
    let redis = Redis::start();
    let s = redis_setup(&oauth, &redis);
    s.enrol(&oauth, ACCOUNT).assert_ok("enrol");
    forged_device_records_are_refused(&s, &RawDevices::Redis(&redis));
}

#[test]
fn file_device_records_are_sealed_and_forged_ones_refused() {
    let oauth = OauthServer::start();
    let s = Setup::new(&oauth, "");
    s.enrol(&oauth, ACCOUNT).assert_ok("enrol");
    let file = s.store_dir().join("devices.json");
    forged_device_records_are_refused(&s, &RawDevices::File(file));
}
