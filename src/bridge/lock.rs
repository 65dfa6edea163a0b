//! The optional session lock: one POP3 session per account and mailbox at a
//! time, like Dovecot's `pop3_lock_session`.
//!
//! Two layers. The per-process table below always applies (cheap, and it
//! still holds while Redis is away). With `[cluster]`, a session also takes
//! a lease in Redis, so a second session through any replica is refused:
//! `SET key token NX PX lease`, renewed every third of the lease by a task
//! while the session lives, released by a compare-and-delete script on
//! every end of the session, and expiring by itself when a replica dies.
//!
//! The lease fails open: when Redis cannot be reached the session goes on
//! with the per-process lock only (logged, counted). Data safety never
//! depended on the lock: DELE only marks, and QUIT commits exactly the UIDs
//! that session marked. For the same reason a session whose lease was taken
//! over meanwhile (Redis lost it, another replica's session took it) goes
//! on: ending it would cost its client the transaction, and the lease
//! cannot be made good again without ending the other session too.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

use tracing::{info, warn};

use super::cluster::Cluster;
use crate::cluster::random_token;

fn held() -> &'static Mutex<HashSet<String>> {
    static HELD: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    HELD.get_or_init(|| Mutex::new(HashSet::new()))
}

/// KEYS[1] the lease; ARGV[1] our token, ARGV[2] the lease in ms. 1: still
/// ours, extended; 2: it had expired (Redis was away longer than the lease,
/// or restarted) and is ours again; 0: another session holds it.
const RENEW_SCRIPT: &str = r#"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"#;

/// KEYS[1] the lease; ARGV[1] our token: deleted only while it is ours.
const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// A held lock; dropping it releases the mailbox, on every kind of session
/// end (QUIT, drop, timeout, upstream failure, or a panic unwinding the
/// session's task).
#[derive(Debug)]
pub struct MailboxLock {
    /// `<lock scope>/<account>`: the per-process table's entry, and the
    /// lease's name in Redis.
    key: String,
    /// The Redis lease, with `[cluster]` and while Redis answered.
    lease: Option<Lease>,
}

/// A lease in Redis and the task renewing it.
#[derive(Debug)]
struct Lease {
    cluster: Arc<Cluster>,
    /// The Redis key.
    key: String,
    /// Tells this holder from the next one: only the holder deletes.
    token: String,
    /// The renewal task, aborted when the lease is released.
    renew: tokio::task::JoinHandle<()>,
}

impl MailboxLock {
    /// Takes the per-process lock for `key`, or `None` when another session
    /// of this process holds it.
    pub fn try_acquire(key: String) -> Option<Self> {
        let inserted = held()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone());
        // Build the guard only after the table is unlocked, and only when it
        // owns the key: a guard dropped here would remove someone else's.
        if inserted {
            Some(Self { key, lease: None })
        } else {
            None
        }
    }

    /// Takes the lock for `key` in this process and, with a cluster, its
    /// lease in Redis; `None` when another session (of any replica) holds
    /// it. A Redis failure keeps the per-process lock alone.
    pub async fn acquire(key: String, cluster: Option<&Arc<Cluster>>) -> Option<Self> {
        let mut lock = Self::try_acquire(key)?;
        let Some(cluster) = cluster else {
            return Some(lock);
        };
        let redis_key = super::cluster::key("lock", &lock.key);
        let token = random_token();
        let mut set = redis::cmd("SET");
        set.arg(&redis_key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(lease_ms(cluster));
        match cluster.redis.query::<Option<String>>(&set).await {
            Ok(Some(_)) => {
                let renew = tokio::spawn(renew(cluster.clone(), redis_key.clone(), token.clone()));
                lock.lease = Some(Lease {
                    cluster: cluster.clone(),
                    key: redis_key,
                    token,
                    renew,
                });
                Some(lock)
            }
            // Held through another replica; dropping `lock` frees ours.
            Ok(None) => None,
            Err(e) => {
                cluster.outage(
                    "lock_acquire",
                    &e,
                    "the session lock holds in this process only",
                );
                Some(lock)
            }
        }
    }

    /// Releases the lock now, waiting for Redis (bounded) to delete the
    /// lease: a client that reconnects at once, through any replica, is
    /// not refused.
    pub async fn release(mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release().await;
        }
    }
}

fn lease_ms(cluster: &Cluster) -> String {
    cluster.lease.as_millis().to_string()
}

/// Renews the lease every third of its length until aborted or lost.
async fn renew(cluster: Arc<Cluster>, redis_key: String, token: String) {
    let script = redis::Script::new(RENEW_SCRIPT);
    let ms = lease_ms(&cluster);
    loop {
        tokio::time::sleep(cluster.lease / 3).await;
        match cluster
            .redis
            .script::<i64>(&script, &[&redis_key], &[&token, &ms])
            .await
        {
            Ok(1) => {}
            Ok(2) => info!(lock = %redis_key, "session lease had expired and was taken again"),
            Ok(_) => {
                // See the module docs: the session goes on.
                warn!(
                    lock = %redis_key,
                    "session lease lost to another session; this session goes on (QUIT commits only its own deletions)"
                );
                return;
            }
            Err(e) => cluster.outage(
                "lock_renew",
                &e,
                "the session lock holds in this process only until Redis answers",
            ),
        }
    }
}

impl Lease {
    async fn release(self) {
        self.renew.abort();
        let r = self
            .cluster
            .redis
            .script::<i64>(
                &redis::Script::new(RELEASE_SCRIPT),
                &[&self.key],
                &[&self.token],
            )
            .await;
        if let Err(e) = r {
            self.cluster
                .outage("lock_release", &e, "the lease expires by itself");
        }
    }
}

impl Drop for MailboxLock {
    fn drop(&mut self) {
        held()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
        if let Some(lease) = self.lease.take() {
            lease.renew.abort();
            // Dropped without `release` (an error, a panic): delete the
            // lease in the background; without a runtime (process exit)
            // it expires by itself.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(lease.release());
            }
        }
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
