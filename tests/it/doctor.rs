//! `popbridge doctor` through the real binary against real upstreams:
//! Dovecot with TLS (implicit and STARTTLS, certificates from a test CA),
//! a certificate for another name, an expired certificate, Dovecot without
//! UIDPLUS, Dovecot without STARTTLS, a wrong password and a closed port.
//! Each case checks the exit code, the table's line for the check that
//! matters and the same fact in `--json`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::certs::{write_world_readable, Pki};
use crate::common::cli::{clear_popbridge_env, BinRun};
use crate::common::ports::ClosedPort;
use crate::common::servers::start_dovecot_no_uidplus;
use crate::common::{text_message, Dovecot, DovecotOptions, Pop3};

/// A small message for alice.
fn message(subject: &str) -> Vec<u8> {
    text_message(
        "alice@example.org",
        subject,
        &format!("<{subject}@doctor.test>"),
        ["hello".to_string()],
    )
}

/// Runs `popbridge --config FILE doctor ARGS` with `env` set.
fn doctor(config: &Path, args: &[&str], env: &[(&str, &str)]) -> BinRun {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_popbridge"));
    clear_popbridge_env(&mut cmd);
    cmd.arg("--config").arg(config).arg("doctor").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run popbridge doctor");
    BinRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The table line of `check` in `route`'s section: (status, detail).
fn line(run: &BinRun, route: &str, check: &str) -> (String, String) {
    let section = run
        .stdout
        .split("\nroute ")
        .map(|s| s.trim_start_matches("route "))
        .find(|s| s.starts_with(&format!("{route}:")))
        .unwrap_or_else(|| panic!("no section for route {route}\n{}", run.describe()));
    section
        .lines()
        .skip(1)
        .find_map(|l| {
            let mut parts = l.trim_start().splitn(2, ' ');
            (parts.next()? == check).then(|| {
                let rest = parts.next().unwrap_or("").trim_start();
                let (status, detail) = rest.split_once("  ").unwrap_or((rest, ""));
                (status.to_string(), detail.trim().to_string())
            })
        })
        .unwrap_or_else(|| panic!("no {check} line for route {route}\n{}", run.describe()))
}

/// Every line of `check` in `route`'s section (capabilities appear twice).
fn details(run: &BinRun, route: &str, check: &str) -> Vec<String> {
    let section = run
        .stdout
        .split("\nroute ")
        .map(|s| s.trim_start_matches("route "))
        .find(|s| s.starts_with(&format!("{route}:")))
        .unwrap_or_default();
    section
        .lines()
        .filter(|l| l.trim_start().starts_with(&format!("{check} ")))
        .map(|l| l.trim().to_string())
        .collect()
}

/// `--json`'s check `name` of route `route`.
fn json_check(run: &BinRun, route: &str, name: &str) -> serde_json::Value {
    let doc: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("--json output is not JSON ({e})\n{}", run.describe()));
    doc["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == route)
        .unwrap_or_else(|| panic!("no route {route} in\n{}", run.stdout))["checks"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|c| c["check"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no check {name} in\n{}", run.stdout))
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Dovecot with `ssl = yes` (STARTTLS on its IMAP port) and an implicit-TLS
/// listener, serving `cert.pem`/`key.pem` from `dir`.
fn tls_dovecot(cert: &Path, key: &Path) -> (Dovecot, u16) {
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    Dovecot::start_with_listener(DovecotOptions::default(), move |port| {
        format!(
            "ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}\nssl_min_protocol = TLSv1.2\n\
             service imap-login {{\n  inet_listener imaps {{\n    port = {port}\n  }}\n}}\n"
        )
    })
}

#[test]
fn doctor_reports_a_healthy_tls_upstream_its_mailbox_and_message_1s_uidl() {
    let pki = Pki::new("doctor test CA");
    let (dovecot, imaps) = tls_dovecot(&pki.cert_path(), &pki.key_path());
    dovecot.deliver("alice", &message("first"));
    dovecot.deliver("alice", &message("second"));
    // Dovecot's own POP3 says what message 1's UIDL is (popbridge's
    // default uidl_format is Dovecot's).
    let mut native = Pop3::connect(dovecot.pop3_port);
    native.login("alice", "secret");
    let native_uidl = native.uidl()[0].1.clone();
    native.quit();

    let dir = tempfile::tempdir().unwrap();
    let ca = pki.ca_path().display().to_string();
    let config = write(
        dir.path(),
        "popbridge.toml",
        &format!(
            "[upstream]\naddress = \"127.0.0.1:{imaps}\"\ntls = \"implicit\"\nca_file = \"{ca}\"\n\
             tls_name = \"localhost\"\n\n\
             [[routes]]\nname = \"viastarttls\"\ndomains = [\"starttls.example\"]\n\
             address = \"127.0.0.1:{}\"\ntls = \"starttls\"\nca_file = \"{ca}\"\n\
             tls_name = \"localhost\"\nlogin = \"local-part\"\n",
            dovecot.imap_port
        ),
    );
    let creds = write(dir.path(), "creds", "alice\nsecret\n");
    let creds = creds.to_str().unwrap();

    let run = doctor(&config, &["--credentials", creds], &[]);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let (status, tls) = line(&run, "default", "tls");
    assert_eq!(status, "ok");
    assert!(
        tls.starts_with("TLSv1_3") || tls.starts_with("TLSv1_2"),
        "{tls}"
    );
    let (status, cert) = line(&run, "default", "certificate");
    assert_eq!(status, "ok", "{cert}");
    assert!(cert.contains("valid for \"localhost\""), "{cert}");
    assert!(cert.contains("days)"), "{cert}");
    assert!(cert.contains(&ca), "the roots are named: {cert}");
    let (status, login) = line(&run, "default", "login");
    assert_eq!(
        (status.as_str(), login.starts_with("as alice")),
        ("ok", true)
    );
    let (_, select) = line(&run, "default", "select");
    assert!(select.starts_with("INBOX: 2 messages"), "{select}");
    let (_, uidl) = line(&run, "default", "uidl");
    assert!(
        uidl.contains(&format!(": {native_uidl} (from uidl_format \"dovecot\")")),
        "{uidl} vs Dovecot's {native_uidl}"
    );
    let caps = details(&run, "default", "capabilities");
    assert!(caps.iter().any(|c| c.contains("before login:")), "{caps:?}");
    assert!(
        caps.iter()
            .any(|c| c.contains("after login:") && c.contains("UIDPLUS")),
        "{caps:?}"
    );
    let (status, uidplus) = line(&run, "default", "uidplus");
    assert_eq!(status, "ok", "{uidplus}");
    let (_, sasl) = line(&run, "default", "sasl");
    assert!(sasl.contains("AUTHENTICATE PLAIN"), "{sasl}");
    // The STARTTLS route is checked too, without a login (alice routes
    // to the default route).
    let (status, starttls) = line(&run, "viastarttls", "starttls");
    assert_eq!(
        (status.as_str(), starttls.as_str()),
        ("ok", "offered, used")
    );
    let (status, cert) = line(&run, "viastarttls", "certificate");
    assert_eq!(status, "ok", "{cert}");
    let (status, login) = line(&run, "viastarttls", "login");
    assert_eq!(status, "-");
    assert!(login.contains("through route default"), "{login}");
    assert!(!run.stdout.contains("secret"), "no password in the output");

    // --json, credentials from the environment, one route by name.
    let run = doctor(
        &config,
        &["--json", "--route", "viastarttls"],
        &[
            ("POPBRIDGE_DOCTOR_USER", "alice@starttls.example"),
            ("POPBRIDGE_DOCTOR_PASSWORD", "secret"),
        ],
    );
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["routes"].as_array().unwrap().len(), 1);
    assert_eq!(
        json_check(&run, "viastarttls", "starttls")["data"]["offered"],
        true
    );
    let cert = json_check(&run, "viastarttls", "certificate");
    assert_eq!(cert["data"]["verified"], true);
    assert_eq!(cert["data"]["name_checked"], "localhost");
    assert!(cert["data"]["days_left"].as_i64().unwrap() > 365);
    assert_eq!(
        json_check(&run, "viastarttls", "login")["data"]["user"],
        "alice"
    );
    assert_eq!(
        json_check(&run, "viastarttls", "select")["data"]["messages"],
        2
    );
    assert_eq!(
        json_check(&run, "viastarttls", "uidl")["data"]["uidl"],
        native_uidl.as_str()
    );
    let after = json_check(&run, "viastarttls", "capabilities");
    assert!(
        after["data"]["after_login"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "UIDPLUS"),
        "{after}"
    );

    // A wrong password: the login fails, with the server's reason.
    let run = doctor(
        &config,
        &["--route", "default"],
        &[
            ("POPBRIDGE_DOCTOR_USER", "alice"),
            ("POPBRIDGE_DOCTOR_PASSWORD", "wrong"),
        ],
    );
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let (status, login) = line(&run, "default", "login");
    assert_eq!(status, "FAIL", "{login}");
    assert!(login.contains("as alice"), "{login}");
    assert!(!run.stdout.contains("wrong"), "no password in the output");
}

#[test]
fn doctor_refuses_a_certificate_for_another_name() {
    let pki = Pki::new("doctor test CA");
    let (_dovecot, imaps) = tls_dovecot(&pki.cert_path(), &pki.key_path());
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "popbridge.toml",
        &format!(
            "[upstream]\naddress = \"127.0.0.1:{imaps}\"\ntls = \"implicit\"\nca_file = \"{}\"\n\
             tls_name = \"imap.wrong.example\"\n",
            pki.ca_path().display()
        ),
    );
    let env = [
        ("POPBRIDGE_DOCTOR_USER", "alice"),
        ("POPBRIDGE_DOCTOR_PASSWORD", "secret"),
    ];
    let run = doctor(&config, &[], &env);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let (status, cert) = line(&run, "default", "certificate");
    assert_eq!(status, "FAIL", "{cert}");
    assert!(cert.starts_with("NOT trusted"), "{cert}");
    assert!(cert.contains("\"imap.wrong.example\""), "{cert}");
    // What the certificate is for, read over the second connection.
    assert!(cert.contains("[localhost, 127.0.0.1]"), "{cert}");
    let (status, login) = line(&run, "default", "login");
    assert_eq!(status, "FAIL");
    assert!(
        login.contains("not tried"),
        "no credentials to a server that failed: {login}"
    );
    // The greeting and capabilities still show, marked.
    let (_, greeting) = line(&run, "default", "greeting");
    assert!(greeting.contains("unverified"), "{greeting}");

    let run = doctor(&config, &["--json"], &env);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let cert = json_check(&run, "default", "certificate");
    assert_eq!(cert["status"], "fail");
    assert_eq!(cert["data"]["verified"], false);
    assert_eq!(cert["data"]["name_checked"], "imap.wrong.example");
}

#[test]
fn doctor_reports_an_expired_certificate_and_its_days() {
    let pki = Pki::new("doctor test CA");
    let expired = pki.ca.leaf_valid(
        &["localhost", "127.0.0.1"],
        Some(((2020, 1, 1), (2021, 1, 1))),
    );
    let dir = tempfile::Builder::new()
        .prefix("pbexpired-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    write_world_readable(&cert, expired.cert_pem.as_bytes());
    write_world_readable(&key, expired.key_pem.as_bytes());
    let (_dovecot, imaps) = tls_dovecot(&cert, &key);
    let config = write(
        dir.path(),
        "popbridge.toml",
        &format!(
            "[upstream]\naddress = \"127.0.0.1:{imaps}\"\ntls = \"implicit\"\nca_file = \"{}\"\n\
             tls_name = \"localhost\"\n",
            pki.ca_path().display()
        ),
    );
    let run = doctor(&config, &[], &[]);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let (status, detail) = line(&run, "default", "certificate");
    assert_eq!(status, "FAIL", "{detail}");
    assert!(detail.to_lowercase().contains("expired"), "{detail}");
    assert!(detail.contains("expires 2021-01-01"), "{detail}");

    let run = doctor(&config, &["--json"], &[]);
    let cert = json_check(&run, "default", "certificate");
    assert_eq!(cert["data"]["verified"], false);
    assert!(cert["data"]["days_left"].as_i64().unwrap() < -365, "{cert}");
}

#[test]
fn doctor_says_what_quit_does_without_uidplus_and_without_starttls() {
    let server = start_dovecot_no_uidplus(&[("alice", "secret")]);
    let dovecot = &server.dovecot;
    dovecot.deliver("alice", &message("only"));
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("POPBRIDGE_DOCTOR_USER", "alice"),
        ("POPBRIDGE_DOCTOR_PASSWORD", "secret"),
    ];
    let upstream = |more: &str| {
        format!(
            "[upstream]\naddress = \"127.0.0.1:{}\"\ntls = \"none\"\n{more}",
            dovecot.imap_port
        )
    };

    let config = write(dir.path(), "refuse.toml", &upstream(""));
    let run = doctor(&config, &[], &env);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let (status, detail) = line(&run, "default", "uidplus");
    assert_eq!(status, "FAIL");
    assert!(
        detail.starts_with("no UIDPLUS: QUIT will refuse deletions (no_uidplus = \"refuse\")"),
        "{detail}"
    );
    let (status, _) = line(&run, "default", "login");
    assert_eq!(status, "ok", "the login itself works");
    let (status, detail) = line(&run, "default", "tls");
    assert_eq!(status, "WARN", "{detail}");

    let config = write(
        dir.path(),
        "alone.toml",
        &upstream("no_uidplus = \"expunge-if-alone\"\n"),
    );
    let run = doctor(&config, &[], &env);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let (status, detail) = line(&run, "default", "uidplus");
    assert_eq!(status, "WARN");
    assert!(detail.contains("expunge-if-alone"), "{detail}");

    // delete_policy = "flag" expunges nothing: UIDPLUS is not needed.
    let config = write(
        dir.path(),
        "flag.toml",
        &format!("{}\n[pop3]\ndelete_policy = \"flag\"\n", upstream("")),
    );
    let run = doctor(&config, &[], &env);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let (status, detail) = line(&run, "default", "uidplus");
    assert_eq!(status, "-");
    assert!(detail.contains("not needed"), "{detail}");

    // The harness's Dovecot has ssl = no: no STARTTLS.
    let config = write(
        dir.path(),
        "starttls.toml",
        &format!(
            "[upstream]\naddress = \"127.0.0.1:{}\"\ntls = \"starttls\"\ntls_name = \"localhost\"\n",
            dovecot.imap_port
        ),
    );
    let run = doctor(&config, &[], &env);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let (status, detail) = line(&run, "default", "starttls");
    assert_eq!(status, "FAIL");
    assert!(detail.contains("does not offer STARTTLS"), "{detail}");
    let (status, _) = line(&run, "default", "login");
    assert_eq!(status, "FAIL", "no login without STARTTLS");
}

#[test]
fn doctor_reports_a_closed_port() {
    let closed = ClosedPort::new();
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "popbridge.toml",
        &format!(
            "[upstream]\naddress = \"127.0.0.1:{}\"\ntls = \"implicit\"\n",
            closed.port()
        ),
    );
    let run = doctor(&config, &[], &[]);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let (status, detail) = line(&run, "default", "connect");
    assert_eq!(status, "FAIL");
    assert!(detail.contains("refused"), "{detail}");
    let run = doctor(&config, &["--json"], &[]);
    let connect = json_check(&run, "default", "connect");
    assert_eq!(connect["status"], "fail");

    // A configuration error is exit 2.
    let run = doctor(&config, &["--route", "nonexistent"], &[]);
    assert_eq!(run.code, Some(2), "{}", run.describe());
}
