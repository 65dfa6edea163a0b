//! Running the popbridge binary as a command (configuration checks,
//! probes, `--help`) rather than as a server.

use std::process::Command;

/// What one finished run of the binary did.
#[derive(Debug)]
pub struct BinRun {
    /// The exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl BinRun {
    /// Exit code and both outputs, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "exit code {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Removes every inherited `POPBRIDGE_*` variable and `RUST_LOG` from
/// `cmd`'s environment, so only what a test sets can reach the binary.
pub fn clear_popbridge_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name.starts_with("POPBRIDGE_") || name == "RUST_LOG" {
            cmd.env_remove(&key);
        }
    }
    cmd
}
