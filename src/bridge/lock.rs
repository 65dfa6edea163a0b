//! The optional session lock: one POP3 session per account and mailbox at a
//! time, like Dovecot's `pop3_lock_session`. It lives in this process only;
//! several replicas need the deployment described in the README.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

fn held() -> &'static Mutex<HashSet<String>> {
    static HELD: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    HELD.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A held lock; dropping it releases the mailbox, on every kind of session
/// end (QUIT, drop, timeout, upstream failure, or a panic unwinding the
/// session's task).
#[derive(Debug)]
pub struct MailboxLock(String);

impl MailboxLock {
    /// Takes the lock for `key`, or `None` when another session holds it.
    pub fn try_acquire(key: String) -> Option<Self> {
        let inserted = held()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone());
        // Build the guard only after the table is unlocked, and only when it
        // owns the key: a guard dropped here would remove someone else's.
        if inserted {
            Some(Self(key))
        } else {
            None
        }
    }
}

impl Drop for MailboxLock {
    fn drop(&mut self) {
        held()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_released_on_drop() {
        let a = MailboxLock::try_acquire("t1/alice/INBOX".into()).unwrap();
        assert!(MailboxLock::try_acquire("t1/alice/INBOX".into()).is_none());
        assert!(MailboxLock::try_acquire("t1/bob/INBOX".into()).is_some());
        drop(a);
        assert!(MailboxLock::try_acquire("t1/alice/INBOX".into()).is_some());
        let r = std::panic::catch_unwind(|| {
            let _held = MailboxLock::try_acquire("t1/carol/INBOX".into()).unwrap();
            panic!("session task panics");
        });
        assert!(r.is_err());
        assert!(MailboxLock::try_acquire("t1/carol/INBOX".into()).is_some());
    }
}
