//! OAuth2 upstreams (issue 8): providers, the encrypted token store, device
//! credentials and the `popbridge oauth` / `popbridge device` commands.

use std::process::ExitCode;

use crate::config::Config;

/// `popbridge oauth ...`
#[derive(Debug, Clone, clap::Args)]
pub struct OauthArgs {}

/// `popbridge device ...`
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {}

/// Run `popbridge oauth`; `config` is the loaded configuration file, if any.
pub fn run_oauth(_args: OauthArgs, _config: Option<Config>) -> ExitCode {
    eprintln!("popbridge oauth: not implemented yet");
    ExitCode::from(2)
}

/// Run `popbridge device`; `config` is the loaded configuration file, if any.
pub fn run_device(_args: DeviceArgs, _config: Option<Config>) -> ExitCode {
    eprintln!("popbridge device: not implemented yet");
    ExitCode::from(2)
}
