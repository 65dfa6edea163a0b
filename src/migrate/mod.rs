//! UIDL continuity for migrations from other POP3 servers: the imported
//! UIDL map and what `popbridge migrate` (in `cli::migrate`) is built from.
//!
//! - [`hash`]: header hashes with volatile fields left out.
//! - [`hash`]'s [`hash::MessageHasher`]: the body hash too.
//! - [`matching`]: old POP3 list against the IMAP mailbox by content (header
//!   and body hash); never by position or size, never a guess.
//! - [`journal`]: the hashes computed so far, so a capture resumes.
//! - [`store`]: the map files under `<data.dir>/uidl-maps/`.
//! - [`runtime`]: the map at login, cached in memory.
//! - [`pop3client`]: the old server (read-only: never DELE).
//! - [`progress`] and [`date`]: for the command's output and APPEND dates.

pub mod date;
pub mod hash;
pub mod journal;
pub mod matching;
pub mod pop3client;
pub mod progress;
pub mod runtime;
pub mod store;
