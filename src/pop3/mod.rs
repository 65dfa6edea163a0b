//! The POP3 protocol core, free of I/O so it can be unit-tested and fuzzed:
//! [`command`] parses lines, [`session`] is the state machine, [`response`]
//! encodes replies and messages, [`maildrop`] is the snapshot a session
//! works on and [`uidl`] the formats of its unique ids.

pub mod command;
pub mod maildrop;
pub mod response;
pub mod session;
pub mod uidl;
