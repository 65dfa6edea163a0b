//! Dovecot 2.3 advertising no UIDPLUS: the harness's [`Dovecot`] with
//! `imap_capability` set to Dovecot's own post-login list minus UIDPLUS.
//! Dovecot still executes UID EXPUNGE if a client sends it; what changes
//! is what a client that reads CAPABILITY believes.

use std::path::Path;
use std::time::{Duration, Instant};

use super::super::{Dovecot, DovecotOptions};
use super::MailServer;

/// Dovecot 2.3.19's post-login CAPABILITY (measured, Debian 12, no TLS)
/// without UIDPLUS.
pub const CAPABILITY_WITHOUT_UIDPLUS: &str = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE \
     SORT SORT=DISPLAY THREAD=REFERENCES THREAD=REFS THREAD=ORDEREDSUBJECT MULTIAPPEND \
     URL-PARTIAL CATENATE UNSELECT CHILDREN NAMESPACE LIST-EXTENDED I18NLEVEL=1 CONDSTORE \
     QRESYNC ESEARCH ESORT SEARCHRES WITHIN CONTEXT=SEARCH LIST-STATUS BINARY MOVE \
     SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW STATUS=SIZE SAVEDATE LITERAL+ NOTIFY";

/// A private Dovecot (IMAP + POP3), as the reference upstream or (from
/// [`start_dovecot_no_uidplus`]) not advertising UIDPLUS.
pub struct DovecotNoUidplus {
    /// The harness's instance (stopped by its own Drop).
    pub dovecot: Dovecot,
    users: Vec<(String, String)>,
    started_in: Duration,
    name: &'static str,
}

/// The reference Dovecot as a [`MailServer`], with `users`.
pub fn start_dovecot(users: &[(&str, &str)]) -> DovecotNoUidplus {
    start(users, None, "dovecot")
}

/// Start Dovecot without UIDPLUS in its CAPABILITY, with `users`
/// (passwd-file: no ':' in logins or passwords).
pub fn start_dovecot_no_uidplus(users: &[(&str, &str)]) -> DovecotNoUidplus {
    start(
        users,
        Some(CAPABILITY_WITHOUT_UIDPLUS),
        "dovecot-no-uidplus",
    )
}

fn start(users: &[(&str, &str)], capability: Option<&str>, name: &'static str) -> DovecotNoUidplus {
    let began = Instant::now();
    let users: Vec<(String, String)> = users
        .iter()
        .map(|(u, p)| (u.to_string(), p.to_string()))
        .collect();
    let dovecot = Dovecot::start_with(DovecotOptions {
        users: users.clone(),
        imap_capability: capability.map(str::to_string),
        extra_conf: String::new(),
    });
    DovecotNoUidplus {
        dovecot,
        users,
        started_in: began.elapsed(),
        name,
    }
}

impl MailServer for DovecotNoUidplus {
    fn name(&self) -> &'static str {
        self.name
    }
    fn imap_port(&self) -> u16 {
        self.dovecot.imap_port
    }
    fn pop3_port(&self) -> Option<u16> {
        Some(self.dovecot.pop3_port)
    }
    fn users(&self) -> Vec<(String, String)> {
        self.users.clone()
    }
    /// `doveadm save`: the exact bytes go into the Maildir.
    fn deliver(&self, user: &str, message: &[u8]) {
        self.dovecot.deliver(user, message);
    }
    fn accepts_bare_lf(&self) -> bool {
        true
    }
    /// Dovecot sends every bare LF as CRLF (DOVECOT.md).
    fn served_form(&self, delivered: &[u8]) -> Vec<u8> {
        super::lf_to_crlf(delivered)
    }
    fn dir(&self) -> &Path {
        self.dovecot.dir.path()
    }
    fn log(&self) -> String {
        self.dovecot.log()
    }
    fn start_time(&self) -> Duration {
        self.started_in
    }
}
