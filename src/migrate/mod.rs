//! UIDL continuity for migrations from other POP3 servers (issue 7): the
//! imported UIDL map and the `popbridge migrate` command.
//!
//! - [`hash`]: header hashes with volatile fields left out.
//! - [`matching`]: old POP3 list against the IMAP mailbox (sizes in order,
//!   then hashes; never a guess).
//! - [`store`]: the map files under `<data.dir>/uidl-maps/`.
//! - [`runtime`]: the map at login, cached in memory.
//! - [`pop3client`]: the old server (read-only: never DELE).
//! - [`command`]: `popbridge migrate capture | copy | import`;
//!   [`progress`] and [`date`] help it.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{Config, UpstreamTls};

pub mod command;
pub mod date;
pub mod hash;
pub mod matching;
pub mod pop3client;
pub mod progress;
pub mod runtime;
pub mod store;

/// Environment variable with the old POP3 server's password.
pub const OLD_PASSWORD_ENV: &str = "POPBRIDGE_OLD_PASSWORD";
/// Environment variable with the IMAP password.
pub const NEW_PASSWORD_ENV: &str = "POPBRIDGE_NEW_PASSWORD";

/// `popbridge migrate ...`: carry POP3 UIDLs over from an old POP3 server,
/// so clients that keep mail on the server download nothing again after the
/// cut-over. The IMAP side comes from the configuration file (the route the
/// user's login takes), as when serving; flags override it. Passwords come
/// from files or environment variables, never from the command line.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    #[command(subcommand)]
    pub mode: Box<Mode>,
}

/// What to do.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Mode {
    /// The mail is already in the IMAP mailbox (moved by another tool): read
    /// the old server's UIDL list and header hashes, match them to the IMAP
    /// messages and store the map. Serve it with `uidl_map = true`.
    Capture {
        #[command(flatten)]
        old: OldServerArgs,
        #[command(flatten)]
        new: NewServerArgs,
    },
    /// Copy the messages from the old server into the IMAP mailbox with
    /// APPEND, each with `X-UIDL: <old uidl>` on top and its received date.
    /// Messages whose X-UIDL is already in the mailbox are skipped, so a
    /// second run (or a run after an interruption) copies only what is
    /// missing. Serve with `reuse_xuidl = true`.
    Copy {
        #[command(flatten)]
        old: OldServerArgs,
        #[command(flatten)]
        new: NewServerArgs,
        /// Flag copied messages \Seen (POP3 users have read them).
        #[arg(long)]
        seen: bool,
        /// Copy at most this many messages in this run (the rest on the
        /// next run): to spread a large account over several windows.
        #[arg(long, value_name = "N")]
        max_messages: Option<usize>,
    },
    /// Build the map without the old server: from a UIDL list file (one
    /// `uidl size [header-hash]` per line, `#` comments), or, without
    /// --uidl-file, from the list an earlier `capture` saved.
    Import {
        /// The old server's list. Without it: the saved list of this account.
        #[arg(long, value_name = "FILE")]
        uidl_file: Option<PathBuf>,
        #[command(flatten)]
        new: NewServerArgs,
    },
}

/// The old POP3 server.
#[derive(Debug, Clone, clap::Args)]
pub struct OldServerArgs {
    /// The old server: `pop3://host[:port]` (port 110; plain, or STLS with
    /// --old-starttls) or `pop3s://host[:port]` (port 995, TLS).
    #[arg(long, value_name = "URL")]
    pub old: String,
    /// Login name on the old server. Default: --user.
    #[arg(long, value_name = "NAME")]
    pub old_user: Option<String>,
    /// File whose first line is the old server's password. Default: the
    /// POPBRIDGE_OLD_PASSWORD environment variable, else the IMAP password
    /// (required on an OAuth2 route, which has none).
    #[arg(long, value_name = "FILE")]
    pub old_password_file: Option<PathBuf>,
    /// Upgrade a pop3:// connection with STLS (RFC 2595) before logging in.
    #[arg(long)]
    pub old_starttls: bool,
    /// PEM CA certificates to trust for the old server (default: the
    /// system's).
    #[arg(long, value_name = "FILE")]
    pub old_ca_file: Option<PathBuf>,
    /// Name the old server's certificate must carry (default: the URL's host).
    #[arg(long, value_name = "NAME")]
    pub old_tls_name: Option<String>,
}

/// The IMAP side: the configuration's route for the user, with overrides.
#[derive(Debug, Clone, clap::Args)]
pub struct NewServerArgs {
    /// The account: the login name POP3 clients will use with popbridge (the
    /// route's `login` rule applies, as when serving); on an
    /// `auth = "oauth2"` route, the enrolled account.
    #[arg(long, value_name = "NAME")]
    pub user: String,
    /// File whose first line is the IMAP password. Default: the
    /// POPBRIDGE_NEW_PASSWORD environment variable. Not used on an
    /// `auth = "oauth2"` route: the enrolled account's token logs in.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// The route to use, by name (`default` is [upstream]). Default: the
    /// route the user's login name takes.
    #[arg(long, value_name = "NAME")]
    pub route: Option<String>,
    /// host:port of the IMAP server (overrides the route's address).
    #[arg(long, value_name = "HOST:PORT")]
    pub upstream: Option<String>,
    /// TLS to the IMAP server (overrides the route's).
    #[arg(long, value_enum)]
    pub upstream_tls: Option<UpstreamTls>,
    /// PEM CA certificates for the IMAP server (overrides the route's).
    #[arg(long, value_name = "FILE")]
    pub upstream_ca_file: Option<String>,
    /// The mailbox (overrides the route's).
    #[arg(long, value_name = "NAME")]
    pub mailbox: Option<String>,
    /// The data directory for the maps (overrides data.dir).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// Run `popbridge migrate`; `config` is the loaded configuration file, if any.
pub fn run(args: MigrateArgs, config: Option<Config>) -> ExitCode {
    crate::logging::init("warn", crate::config::LogFormat::Text);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("popbridge migrate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command::run(args, config.unwrap_or_default())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("popbridge migrate: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
