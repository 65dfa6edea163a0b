//! Shared by the oauth_cli and oauth_store tests: a data directory,
//! a store key and a configuration pointing at the loopback OAuth2 server,
//! and runs of the real `popbridge oauth|device` binary.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::oauth::{OauthServer, OauthStats};

/// One command must finish long before this (a device-flow enrolment polls
/// once a second; argon2 hashing takes well under a second).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(90);
/// The account most tests enrol.
pub const ACCOUNT: &str = "alice@example.org";
/// The provider name in the generated configuration.
pub const PROVIDER: &str = "test";

/// What one run of the binary did.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn describe(&self) -> String {
        format!(
            "exit code {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    pub fn assert_ok(&self, what: &str) -> &Self {
        assert_eq!(
            self.code,
            Some(0),
            "{what}: expected success\n{}",
            self.describe()
        );
        self
    }

    pub fn assert_code(&self, code: i32, what: &str) -> &Self {
        assert_eq!(self.code, Some(code), "{what}\n{}", self.describe());
        self
    }

    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// A temporary data directory, key file and configuration.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub key_file: PathBuf,
    /// The key as written (base64).
    pub key: String,
}

fn random_key() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_popbridge"))
        .args(["oauth", "generate-key"])
        .output()
        .expect("run popbridge oauth generate-key");
    assert!(out.status.success(), "generate-key failed: {out:?}");
    let key = String::from_utf8(out.stdout).expect("UTF-8 key");
    key.trim().to_string()
}

impl Setup {
    /// `store` is extra `[oauth]` lines (e.g. `store = "redis"`).
    pub fn new(oauth: &OauthServer, store: &str) -> Setup {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = random_key();
        let key_file = dir.path().join("oauth.key");
        crate::common::write_private(&key_file, format!("{key}\n"));
        let data = dir.path().join("data");
        let config = dir.path().join("popbridge.toml");
        let text = format!(
            r#"
[listen]
address = "127.0.0.1:1110"

[upstream]
address = "127.0.0.1:143"
tls = "none"
auth = "oauth2"
oauth_provider = "{PROVIDER}"

[data]
dir = "{data}"

[oauth]
key_file = "{key_file}"
{store}

[[oauth.providers]]
name = "{PROVIDER}"
preset = "generic"
client_id = "{client_id}"
device_authorization_url = "{device}"
authorization_url = "{auth}"
token_url = "{token}"
revocation_url = "{revoke}"
scopes = ["mail"]
mechanism = "xoauth2"
"#,
            data = data.display(),
            key_file = key_file.display(),
            client_id = oauth.options.client_id,
            device = oauth.device_url(),
            auth = oauth.authorize_url(),
            token = oauth.token_url(),
            revoke = oauth.revoke_url(),
        );
        std::fs::write(&config, text).expect("write config");
        Setup {
            dir,
            config,
            key_file,
            key,
        }
    }

    /// `<data.dir>/oauth`.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("data").join("oauth")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_popbridge"));
        c.arg("--config").arg(&self.config).args(args);
        c.env_remove("POPBRIDGE_OAUTH_KEY")
            .env_remove("POPBRIDGE_DEVICE_PASSWORD")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        run_command(self.command(args))
    }

    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut c = self.command(args);
        for (k, v) in env {
            c.env(k, v);
        }
        run_command(c)
    }

    /// Starts a command with stdout piped (for the enrolment prompts).
    pub fn spawn(&self, args: &[&str]) -> Child {
        let mut c = self.command(args);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        c.spawn().expect("spawn popbridge")
    }

    /// Replaces the key file with a freshly generated other key (what an
    /// operator pointing at the wrong key does); returns that key.
    pub fn write_another_key(&self) -> String {
        let other = random_key();
        crate::common::write_private(&self.key_file, format!("{other}\n"));
        other
    }

    /// One round of the refresh race: two processes run
    /// `oauth test --token-only ACCOUNT --force-refresh` at once; both must
    /// succeed, and `oauth` must have seen no `invalid_grant` and no reuse
    /// of a rotated refresh token (`round` names the round in a failure).
    /// Returns the provider's statistics for further checks.
    #[track_caller]
    pub fn race_two_refreshes(&self, oauth: &OauthServer, round: usize) -> OauthStats {
        let args = ["oauth", "test", "--token-only", ACCOUNT, "--force-refresh"];
        let a = self.spawn(&args);
        let b = self.spawn(&args);
        for (name, mut c) in [("a", a), ("b", b)] {
            let out = c.stdout.take().unwrap();
            finish(c, String::new(), BufReader::new(out))
                .assert_ok(&format!("round {round}, process {name}"));
        }
        let stats = oauth.stats();
        assert_eq!(stats.token_error("invalid_grant"), 0, "{}", stats.raw);
        assert_eq!(stats.refresh_reuse, 0, "{}", stats.raw);
        stats
    }

    /// `popbridge oauth add <account>` with the device flow, approved at
    /// the server's control endpoint with the user code the CLI printed.
    pub fn enrol(&self, oauth: &OauthServer, account: &str) -> Run {
        let mut child = self.spawn(&["oauth", "add", account, "--provider", PROVIDER]);
        let stdout = child.stdout.take().expect("stdout");
        let (code, printed, rest) = read_user_code(stdout);
        oauth.approve(&code, account);
        finish(child, printed, rest)
    }
}

/// Reads stdout up to the user code (the line after "enter the code:").
/// Returns the code, what was read, and a reader for the rest.
pub fn read_user_code(stdout: ChildStdout) -> (String, String, BufReader<ChildStdout>) {
    let mut reader = BufReader::new(stdout);
    let mut printed = String::new();
    let mut next_is_code = false;
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).expect("read stdout");
        assert!(
            n > 0,
            "popbridge ended before printing a user code:\n{printed}"
        );
        printed.push_str(&line);
        if next_is_code {
            return (line.trim().to_string(), printed, reader);
        }
        if line.contains("enter the code:") {
            next_is_code = true;
        }
    }
}

/// Reads stdout up to the first line that holds an http URL.
pub fn read_url(stdout: ChildStdout) -> (String, String, BufReader<ChildStdout>) {
    let mut reader = BufReader::new(stdout);
    let mut printed = String::new();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).expect("read stdout");
        assert!(n > 0, "popbridge ended before printing a URL:\n{printed}");
        printed.push_str(&line);
        if let Some(url) = line.trim().strip_prefix("http://") {
            return (format!("http://{url}"), printed, reader);
        }
    }
}

/// Waits for a spawned command (killing it after [`RUN_TIMEOUT`]).
pub fn finish(mut child: Child, mut printed: String, mut rest: BufReader<ChildStdout>) -> Run {
    let mut stderr = child.stderr.take().expect("stderr");
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let out = thread::spawn(move || {
        let _ = rest.read_to_string(&mut printed);
        printed
    });
    let code = wait(&mut child);
    Run {
        code,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn wait(child: &mut Child) -> Option<i32> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("popbridge did not finish within {RUN_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

pub fn run_command(mut c: Command) -> Run {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn popbridge");
    let stdout = child.stdout.take().expect("stdout");
    finish(child, String::new(), BufReader::new(stdout))
}
