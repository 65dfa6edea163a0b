//! UIDL continuity for migrations from other POP3 servers (issue 7): the
//! imported UIDL map and the `popbridge migrate` command.
//!
//! - [`hash`]: header hashes with volatile fields left out.
//! - [`matching`]: old POP3 list against the IMAP mailbox (sizes in order,
//!   then hashes; never a guess).
//! - [`store`]: the map files under `<data.dir>/uidl-maps/`.
//! - [`runtime`]: the map at login, cached in memory.

use std::process::ExitCode;

use crate::config::Config;

pub mod hash;
pub mod matching;
pub mod runtime;
pub mod store;

/// `popbridge migrate ...`
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {}

/// Run `popbridge migrate`; `config` is the loaded configuration file, if any.
pub fn run(_args: MigrateArgs, _config: Option<Config>) -> ExitCode {
    eprintln!("popbridge migrate: not implemented yet");
    ExitCode::from(2)
}
