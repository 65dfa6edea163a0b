//! POP3 meaning on top of IMAP: delete policies and the session lock.

pub mod lock;
pub mod policy;
