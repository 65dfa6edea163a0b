//! UIDL continuity for migrations from other POP3 servers (issue 7): the
//! imported UIDL map and the `popbridge migrate` command.

use std::process::ExitCode;

use crate::config::Config;

/// `popbridge migrate ...`
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {}

/// Run `popbridge migrate`; `config` is the loaded configuration file, if any.
pub fn run(_args: MigrateArgs, _config: Option<Config>) -> ExitCode {
    eprintln!("popbridge migrate: not implemented yet");
    ExitCode::from(2)
}
