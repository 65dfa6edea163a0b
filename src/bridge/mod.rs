//! The bridge decisions: what a POP3 login and its session mean on the IMAP
//! side. [`login`] turns a user name and password into a logged-in session
//! or a refusal ([`replies`] is the one table of what the client is told),
//! through [`routing`] (and the [`directory`] for logins no static route
//! matches), the [`throttle`], the delete [`policy`] and the
//! session [`lock`].

pub mod cluster;
pub mod directory;
pub mod lock;
pub mod login;
pub mod policy;
pub mod pool;
pub mod replies;
pub mod routing;
pub mod shared_throttle;
pub mod throttle;

pub use login::{Bridge, LoggedIn};
