//! The POP3 protocol core, free of I/O so it can be unit-tested and fuzzed:
//! [`command`] parses lines, [`session`] is the state machine, [`response`]
//! encodes replies and messages.

pub mod command;
pub mod response;
pub mod session;
