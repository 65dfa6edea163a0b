//! Log output, for the server and the maintenance commands alike.
//!
//! Some libraries log what must never reach a log: async-imap writes whole
//! IMAP commands (a LOGIN's password included) at trace level, and the HTTP
//! stack can log request bodies (OAuth2 refresh tokens, client secrets).
//! Their targets are switched off whatever the configured level, and no
//! `log` bridge is installed, so `log`-crate records never reach the output.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Targets that are never logged, at any level.
pub const SILENCED_TARGETS: &[&str] = &[
    "async_imap",
    "imap_proto",
    "hyper",
    "hyper_util",
    "reqwest",
    "h2",
];

/// `RUST_LOG` if set, else `default_level`, with [`SILENCED_TARGETS`] off.
pub fn filter(default_level: &str) -> EnvFilter {
    let mut filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    for target in SILENCED_TARGETS {
        match format!("{target}=off").parse() {
            Ok(directive) => filter = filter.add_directive(directive),
            Err(e) => eprintln!("popbridge: bad log directive for {target}: {e}"),
        }
    }
    filter
}

/// Logs to stderr (colours only on a terminal). A second call is a no-op.
pub fn init(default_level: &str, format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(default_level))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => tracing::subscriber::set_global_default(builder.finish()),
        LogFormat::Json => tracing::subscriber::set_global_default(builder.json().finish()),
    };
    if let Err(e) = result {
        tracing::debug!("logging already initialised: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silenced_targets_stay_off_at_trace() {
        let f = filter("trace").to_string();
        for target in SILENCED_TARGETS {
            assert!(f.contains(&format!("{target}=off")), "{target} in {f}");
        }
    }
}
