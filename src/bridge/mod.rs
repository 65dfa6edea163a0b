//! POP3 meaning on top of IMAP: the maildrop snapshot and UIDL formats.

pub mod lock;
pub mod maildrop;
pub mod policy;
pub mod uidl;
