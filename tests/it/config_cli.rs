//! The binary's configuration handling: `--check-config`, the order file <
//! `POPBRIDGE_*` environment < flags, the example configuration and `--help`.
//!
//! Runs the real `popbridge` binary; no mail server needed.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::cli::{clear_popbridge_env, BinRun};

/// A `--check-config` run or `--help` must finish long before this.
const RUN_TIMEOUT: Duration = Duration::from_secs(20);

/// The example configuration shipped with the sources.
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/popbridge.example.toml");

/// A configuration that validates: every other case changes one thing.
const VALID: &str = r#"
[listen]
address = "127.0.0.1:1110"

[upstream]
address = "127.0.0.1:143"
tls = "none"
"#;

impl BinRun {
    /// Exit 0 with something on stdout or stderr.
    fn assert_valid(&self, what: &str) {
        assert_eq!(
            self.code,
            Some(0),
            "{what}: expected success\n{}",
            self.describe()
        );
        assert!(
            !(self.stdout.trim().is_empty() && self.stderr.trim().is_empty()),
            "{what}: --check-config printed nothing\n{}",
            self.describe()
        );
    }

    /// Exit 2 with `key` named in the output.
    fn assert_refused(&self, what: &str, key: &str) {
        assert_eq!(
            self.code,
            Some(2),
            "{what}: expected exit code 2\n{}",
            self.describe()
        );
        assert!(
            self.stderr.contains(key) || self.stdout.contains(key),
            "{what}: the message does not name {key:?}\n{}",
            self.describe()
        );
    }
}

/// Runs the binary with `args` and `env` on top of an environment without
/// any `POPBRIDGE_*` variable, in `dir`; kills it after [`RUN_TIMEOUT`].
fn popbridge(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> BinRun {
    let out_path = dir.join(format!("stdout-{}", unique()));
    let err_path = dir.join(format!("stderr-{}", unique()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_popbridge"));
    clear_popbridge_env(&mut cmd)
        .envs(env.iter().copied())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).expect("create stdout file"))
        .stderr(fs::File::create(&err_path).expect("create stderr file"));
    let mut child = cmd.spawn().expect("spawn popbridge");
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for popbridge") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "popbridge {args:?} did not exit within {RUN_TIMEOUT:?} (is it serving instead of checking?)\nstderr: {}",
                fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    BinRun {
        code: status.code(),
        stdout: String::from_utf8_lossy(&fs::read(&out_path).expect("read stdout")).into_owned(),
        stderr: String::from_utf8_lossy(&fs::read(&err_path).expect("read stderr")).into_owned(),
    }
}

fn unique() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A temp dir holding `popbridge.toml` with `text`.
fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("popbridge.toml");
    fs::write(&path, text).expect("write config");
    (dir, path)
}

/// `popbridge --check-config --config FILE EXTRA...` for a file with `text`.
fn check(text: &str, extra: &[&str], env: &[(&str, &str)]) -> BinRun {
    let (dir, path) = config_file(text);
    let path = path.to_str().expect("UTF-8 temp path").to_string();
    let mut args = vec!["--check-config", "--config", path.as_str()];
    args.extend_from_slice(extra);
    popbridge(dir.path(), &args, env)
}

#[test]
fn check_config_accepts_a_valid_file() {
    check(VALID, &[], &[]).assert_valid("valid file");
}

#[test]
fn check_config_refuses_bad_files_and_names_the_key() {
    // An unknown key (a typo) must not fall back to a default.
    let r = check(
        &format!("{VALID}\n[pop3]\nuidl_fromat = \"dovecot\"\n"),
        &[],
        &[],
    );
    r.assert_refused("unknown key pop3.uidl_fromat", "uidl_fromat");
    let r = check(&format!("bogus_top_level = 1\n{VALID}"), &[], &[]);
    r.assert_refused("unknown top-level key", "bogus_top_level");

    let r = check(&VALID.replace("127.0.0.1:1110", "not an address"), &[], &[]);
    r.assert_refused("bad listen address", "listen.address");

    let r = check(
        &format!("{VALID}\n[pop3]\nuidl_format = \"%v\"\n"),
        &[],
        &[],
    );
    r.assert_refused("uidl_format without %u", "uidl_format");

    let r = check(
        &format!("{VALID}\n[pop3]\nidle_timeout_secs = 30\n"),
        &[],
        &[],
    );
    r.assert_refused(
        "idle timeout below RFC 1939's 10 minutes",
        "idle_timeout_secs",
    );

    // Upstream TLS modes are valid; a CA file that cannot be read is not,
    // and "none" never hides it (the CA file is only used with TLS).
    check(&VALID.replace("\"none\"", "\"implicit\""), &[], &[])
        .assert_valid("upstream.tls = implicit");
    check(&VALID.replace("\"none\"", "\"starttls\""), &[], &[])
        .assert_valid("upstream.tls = starttls");
    let r = check(&implicit_with_missing_ca(), &[], &[]);
    r.assert_refused("implicit TLS with a missing CA file", "upstream CA file");
    let r = check(&format!("{VALID}\n[tls]\ncert_file = \"/nonexistent/cert.pem\"\nkey_file = \"/nonexistent/key.pem\"\n"), &[], &[]);
    r.assert_refused("missing certificate file", "/nonexistent/cert.pem");
    let r = check(
        &VALID.replace(
            "address = \"127.0.0.1:1110\"",
            "address = \"127.0.0.1:1110\"\ntls_address = \"127.0.0.1:1995\"",
        ),
        &[],
        &[],
    );
    r.assert_refused("POP3S listener without a certificate", "tls.cert_file");
}

/// A build without the cargo feature `legacy-tls` (the default build and
/// the image) refuses a configuration that asks for the legacy listener,
/// naming the key and the feature, even with a good certificate.
#[cfg(not(feature = "legacy-tls"))]
#[test]
fn check_config_refuses_legacy_tls_without_the_feature() {
    let pki = crate::common::certs::Pki::new("legacy-tls config CA");
    let text = format!(
        "{VALID}\n[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        pki.cert_path().to_str().unwrap(),
        pki.key_path().to_str().unwrap()
    );
    check(&text, &[], &[]).assert_valid("a certificate without [legacy_tls]");
    let r = check(
        &format!("{text}[legacy_tls]\naddress = \"127.0.0.1:1996\"\n"),
        &[],
        &[],
    );
    r.assert_refused("[legacy_tls] in a build without the feature", "legacy-tls");
    r.assert_refused(
        "[legacy_tls] in a build without the feature",
        "legacy_tls.address",
    );
}

/// A file asking for implicit upstream TLS with a CA file that does not exist.
fn implicit_with_missing_ca() -> String {
    VALID.replace(
        "tls = \"none\"",
        "tls = \"implicit\"\nca_file = \"/nonexistent/ca.pem\"",
    )
}

#[test]
fn check_config_refuses_a_missing_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("no-such-file.toml");
    let missing = missing.to_str().expect("UTF-8 temp path");
    let r = popbridge(
        dir.path(),
        &["--check-config", "--config", missing],
        &[("POPBRIDGE_UPSTREAM_TLS", "none")],
    );
    r.assert_refused("missing config file", "no-such-file.toml");
}

#[test]
fn flags_and_environment_override_the_file() {
    let implicit = implicit_with_missing_ca();

    // Flag over file.
    check(&implicit, &["--upstream-tls", "none"], &[])
        .assert_valid("file tls = implicit, --upstream-tls none");
    // Environment over file.
    check(&implicit, &[], &[("POPBRIDGE_UPSTREAM_TLS", "none")])
        .assert_valid("file tls = implicit, POPBRIDGE_UPSTREAM_TLS=none");
    // Flag over environment, both ways.
    check(
        VALID,
        &["--upstream-tls", "implicit"],
        &[("POPBRIDGE_UPSTREAM_TLS", "none")],
    )
    .assert_valid("POPBRIDGE_UPSTREAM_TLS=none, --upstream-tls implicit");
    check(
        &implicit,
        &["--upstream-tls", "implicit"],
        &[("POPBRIDGE_UPSTREAM_TLS", "none")],
    )
    .assert_refused(
        "file with a missing CA, POPBRIDGE_UPSTREAM_TLS=none, --upstream-tls implicit",
        "upstream CA file",
    );
    check(
        &implicit,
        &["--upstream-tls", "none"],
        &[("POPBRIDGE_UPSTREAM_TLS", "implicit")],
    )
    .assert_valid("file and POPBRIDGE_UPSTREAM_TLS implicit, --upstream-tls none");

    // The same order for another key.
    let bad_listen = VALID.replace("127.0.0.1:1110", "nowhere");
    check(&bad_listen, &["--listen", "127.0.0.1:1110"], &[])
        .assert_valid("bad listen.address in the file, good --listen");
    check(VALID, &[], &[("POPBRIDGE_LISTEN", "nowhere")]).assert_refused(
        "POPBRIDGE_LISTEN=nowhere over a good file",
        "listen.address",
    );
    check(
        VALID,
        &["--listen", "127.0.0.1:1110"],
        &[("POPBRIDGE_LISTEN", "nowhere")],
    )
    .assert_valid("POPBRIDGE_LISTEN=nowhere, good --listen");

    // Flags and environment alone, without a file.
    let dir = tempfile::tempdir().expect("temp dir");
    popbridge(
        dir.path(),
        &["--check-config", "--upstream-tls", "none"],
        &[],
    )
    .assert_valid("no file, --upstream-tls none");
    popbridge(dir.path(), &["--check-config"], &[]).assert_valid("no file: the defaults are valid");
    popbridge(
        dir.path(),
        &[
            "--check-config",
            "--upstream-ca-file",
            "/nonexistent/ca.pem",
        ],
        &[],
    )
    .assert_refused(
        "no file, default starttls with a missing CA file",
        "upstream CA file",
    );
}

/// `section.key` for every leaf of a TOML table.
fn dotted_keys(table: &toml::Table, prefix: &str, out: &mut BTreeSet<String>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => dotted_keys(t, &key, out),
            _ => {
                out.insert(key);
            }
        }
    }
}

/// `section.key` for every key line of a TOML text, including keys that are
/// only shown in comments (`# key = value`), so a documented default counts.
fn documented_keys(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim_start();
        let line = line.strip_prefix('#').map_or(line, str::trim_start);
        if let Some(rest) = line.strip_prefix('[') {
            if let Some(name) = rest.strip_suffix(']') {
                if !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
                {
                    section = name.to_string();
                }
            }
            continue;
        }
        if let Some((key, _)) = line.split_once('=') {
            let key = key.trim();
            if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                out.insert(if section.is_empty() {
                    key.to_string()
                } else {
                    format!("{section}.{key}")
                });
            }
        }
    }
    out
}

#[test]
fn example_config_is_valid_and_documents_every_key() {
    let example = Path::new(EXAMPLE);
    let text = fs::read_to_string(example).unwrap_or_else(|e| panic!("{}: {e}", example.display()));

    let dir = tempfile::tempdir().expect("temp dir");
    popbridge(dir.path(), &["--check-config", "--config", EXAMPLE], &[])
        .assert_valid("the example configuration");

    let defaults = toml::to_string(&popbridge::config::Config::default())
        .expect("serialize Config::default()");
    let defaults: toml::Table = toml::from_str(&defaults).expect("parse serialized defaults");
    let mut keys = BTreeSet::new();
    dotted_keys(&defaults, "", &mut keys);
    assert!(
        keys.len() >= 10,
        "suspiciously few keys in Config::default(): {keys:?}"
    );

    let documented = documented_keys(&text);
    let missing: Vec<&String> = keys.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "{} does not document these keys of Config::default(): {missing:?}\n(documented: {documented:?})",
        example.display()
    );

    // And the file parses with the library as well (every live key known).
    popbridge::config::Config::from_toml(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", example.display()));
}

/// `flag` occurs as a whole flag (so `--upstream` is not found inside
/// `--upstream-tls`).
fn mentions_flag(text: &str, flag: &str) -> bool {
    text.match_indices(flag).any(|(i, _)| {
        !text[i + flag.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

#[test]
fn help_mentions_the_main_flags() {
    let dir = tempfile::tempdir().expect("temp dir");
    let r = popbridge(dir.path(), &["--help"], &[]);
    assert_eq!(r.code, Some(0), "--help\n{}", r.describe());
    for flag in [
        "--listen",
        "--upstream",
        "--upstream-tls",
        "--config",
        "--check-config",
    ] {
        assert!(
            mentions_flag(&r.stdout, flag),
            "--help does not mention {flag}\n{}",
            r.describe()
        );
    }
}

/// Plaintext IMAP to another host is allowed but never silent: the
/// pre-flight `--check-config` prints the warning, and the server logs it
/// at start; towards loopback there is nothing to warn about.
#[test]
fn plaintext_upstream_to_another_host_is_warned_at_check_and_at_start() {
    let remote = ["--upstream", "192.0.2.1:143", "--upstream-tls", "none"];
    let r = check(VALID, &remote, &[]);
    r.assert_valid("plaintext to 192.0.2.1");
    let warning = "upstream.tls = none towards 192.0.2.1:143";
    assert!(
        r.stderr.contains("warning") && r.stderr.contains(warning),
        "{}",
        r.describe()
    );
    let r = check(VALID, &[], &[]);
    r.assert_valid("plaintext to 127.0.0.1");
    assert!(!r.stderr.contains("warning"), "{}", r.describe());

    let pb = crate::common::Popbridge::start_exact(&remote);
    let deadline = Instant::now() + RUN_TIMEOUT;
    while !pb.log().contains(warning) {
        assert!(
            Instant::now() < deadline,
            "no warning in the log:\n{}",
            pb.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let line = pb
        .log()
        .lines()
        .find(|l| l.contains(warning))
        .unwrap()
        .to_string();
    assert!(line.contains("WARN"), "{line}");
}
