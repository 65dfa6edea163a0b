//! Upstream session reuse: when a POP3 session ends, its authenticated IMAP
//! session (mailbox selected) waits here, idle, for the next login of the
//! same account on the same route, which then skips the TCP connection, the
//! IMAP login (and the server's password check) and gets its snapshot from
//! a re-SELECT and the listing cache.
//!
//! Credentials: an idle session is handed out only to a login whose
//! password matches the one it was opened with, checked in constant time
//! against an HMAC of that password under a key drawn at start-up (the
//! password itself is never kept). A login that does not match never
//! touches a pooled session: it logs in upstream as always, so a wrong
//! password is a failed login as before. OAuth2 routes check the device's
//! password locally first and key by account and device.
//!
//! Bounds: an idle session lives at most its route's `reuse_idle_secs`
//! after its last use; at most `reuse_max_per_account` wait per account and
//! route, and `limits.max_idle_upstream` in all (least recently used
//! first out). Whatever leaves the pool unused is logged out politely.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use ring::hmac;
use tracing::debug;

use crate::imap::Upstream;
use crate::metrics::metrics;

/// Who an idle session belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The route's pool scope (its name, or a directory backend): it fixes
    /// the server, TLS and mailbox.
    pub route: String,
    /// The IMAP account, lower-cased.
    pub account: String,
    /// The keyword that hides messages from this session's view (per-device
    /// and flag policies): a session's snapshot depends on it.
    pub hide: Option<String>,
    /// On OAuth2 routes, the device login.
    pub device: Option<String>,
}

/// How long, and how many, idle sessions a route keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reuse {
    /// How long an idle session waits (zero: reuse is off).
    pub idle: Duration,
    /// Idle sessions per account on the route.
    pub per_account: usize,
}

/// One idle session.
struct Idle<U> {
    conn: U,
    /// HMAC of the password it was opened with.
    tag: hmac::Tag,
    /// When it must be gone.
    expires: Instant,
    /// Insertion order, for least-recently-used eviction.
    seq: u64,
}

struct Inner<U> {
    idle: HashMap<PoolKey, Vec<Idle<U>>>,
    count: usize,
    next_seq: u64,
}

/// The idle upstream sessions of a process.
pub struct Pool<U> {
    /// Drawn at start-up; never leaves the process.
    key: hmac::Key,
    /// Idle sessions in all.
    total: usize,
    inner: Mutex<Inner<U>>,
}

impl<U> std::fmt::Debug for Pool<U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

/// The password of a login, as the pool compares it.
pub struct Credential<'a>(pub &'a [u8]);

impl<U: Upstream> Pool<U> {
    /// An empty pool for at most `total` idle sessions, with a fresh random
    /// key.
    pub fn new(total: usize) -> Result<Self, String> {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| "no randomness for the session pool's key".to_string())?;
        Ok(Self {
            key,
            total,
            inner: Mutex::new(Inner {
                idle: HashMap::new(),
                count: 0,
                next_seq: 0,
            }),
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner<U>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The HMAC of a password: what an idle session remembers of it.
    pub fn tag(&self, credential: &Credential<'_>) -> hmac::Tag {
        hmac::sign(&self.key, credential.0)
    }

    /// An idle session of `key` opened with this `credential`, if there is
    /// one that has not expired (the most recently used). Sessions of
    /// `key` opened with another password stay untouched.
    pub fn take(&self, key: &PoolKey, credential: &Credential<'_>) -> Option<U> {
        let now = Instant::now();
        let mut expired = Vec::new();
        let found = {
            let mut inner = self.inner();
            let Inner { idle, count, .. } = &mut *inner;
            let list = idle.get_mut(key)?;
            let mut i = 0;
            while i < list.len() {
                if list[i].expires <= now {
                    expired.push(list.swap_remove(i).conn);
                    *count -= 1;
                } else {
                    i += 1;
                }
            }
            // Newest first: the one most likely still alive.
            list.sort_by_key(|e| std::cmp::Reverse(e.seq));
            let at = list
                .iter()
                .position(|e| hmac::verify(&self.key, credential.0, e.tag.as_ref()).is_ok());
            let found = at.map(|i| list.remove(i).conn);
            if found.is_some() {
                *count -= 1;
            }
            if list.is_empty() {
                idle.remove(key);
            }
            found
        };
        for conn in expired {
            metrics().pool("expired");
            tokio::spawn(conn.logout());
        }
        found
    }

    /// Keeps `conn` idle under `key` as `reuse` says, remembering `tag`.
    /// The account's oldest idle session leaves when it has too many, the
    /// pool's least recently used when the pool is full; they are logged
    /// out.
    pub fn put(&self, key: PoolKey, tag: hmac::Tag, conn: U, reuse: Reuse) {
        if reuse.idle.is_zero() || self.total == 0 || reuse.per_account == 0 {
            tokio::spawn(conn.logout());
            return;
        }
        let mut evicted = Vec::new();
        {
            let mut inner = self.inner();
            let seq = inner.next_seq;
            inner.next_seq += 1;
            let per_account = reuse.per_account;
            let list = inner.idle.entry(key).or_default();
            list.push(Idle {
                conn,
                tag,
                expires: Instant::now() + reuse.idle,
                seq,
            });
            let mut removed = 0;
            while list.len() > per_account {
                let oldest = list
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, e)| e.seq)
                    .map_or(0, |(i, _)| i);
                evicted.push(list.remove(oldest).conn);
                removed += 1;
            }
            inner.count = inner.count + 1 - removed;
            while inner.count > self.total {
                let Some(oldest_key) = inner
                    .idle
                    .iter()
                    .filter_map(|(k, l)| l.iter().map(|e| e.seq).min().map(|s| (s, k)))
                    .min_by_key(|(s, _)| *s)
                    .map(|(_, k)| k.clone())
                else {
                    break;
                };
                let Inner { idle, count, .. } = &mut *inner;
                if let Some(list) = idle.get_mut(&oldest_key) {
                    if let Some(i) = list
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, e)| e.seq)
                        .map(|(i, _)| i)
                    {
                        evicted.push(list.remove(i).conn);
                        *count -= 1;
                    }
                    if list.is_empty() {
                        idle.remove(&oldest_key);
                    }
                }
            }
            metrics().pool_idle.set(inner.count as i64);
        }
        for conn in evicted {
            metrics().pool("evicted");
            tokio::spawn(conn.logout());
        }
    }

    /// A login under `key` succeeded with `credential`: idle sessions of
    /// `key` opened with another password (one since changed) leave now
    /// rather than at their expiry.
    pub fn forget_other_passwords(&self, key: &PoolKey, credential: &Credential<'_>) {
        let gone = self.remove_where(|k, e| {
            k == key && hmac::verify(&self.key, credential.0, e.tag.as_ref()).is_err()
        });
        for conn in gone {
            metrics().pool("stale");
            tokio::spawn(conn.logout());
        }
    }

    /// Logs out every idle session that expired.
    pub async fn sweep(&self) {
        let now = Instant::now();
        let expired = self.remove_where(|_, e| e.expires <= now);
        for conn in expired {
            metrics().pool("expired");
            conn.logout().await;
        }
    }

    /// Logs out every idle session (`route`: only that route's), politely,
    /// at shutdown or when a reload changed the route. Returns how many.
    pub async fn drain(&self, route: Option<&str>) -> usize {
        self.drain_where(|scope| route.is_none_or(|r| scope == r))
            .await
    }

    /// Logs out the idle sessions whose route's pool scope `gone` picks.
    pub async fn drain_where(&self, gone: impl Fn(&str) -> bool) -> usize {
        let gone = self.remove_where(|k, _| gone(&k.route));
        let n = gone.len();
        for conn in gone {
            metrics().pool("drained");
            conn.logout().await;
        }
        if n > 0 {
            debug!(sessions = n, "idle upstream sessions logged out");
        }
        n
    }

    /// Idle sessions now.
    pub fn idle(&self) -> usize {
        self.inner().count
    }

    fn remove_where(&self, mut gone: impl FnMut(&PoolKey, &Idle<U>) -> bool) -> Vec<U> {
        let mut inner = self.inner();
        let mut out = Vec::new();
        let Inner { idle, count, .. } = &mut *inner;
        idle.retain(|k, list| {
            let mut i = 0;
            while i < list.len() {
                if gone(k, &list[i]) {
                    out.push(list.swap_remove(i).conn);
                    *count -= 1;
                } else {
                    i += 1;
                }
            }
            !list.is_empty()
        });
        metrics().pool_idle.set(*count as i64);
        out
    }
}

/// Runs [`Pool::sweep`] every `every` until the pool is gone.
pub async fn sweep_forever<U: Upstream>(pool: std::sync::Weak<Pool<U>>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        pool.sweep().await;
    }
}

/// A pool shared by every route of a configuration.
pub type SharedPool<U> = Arc<Pool<U>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::fake::{FakeConn, FakeConnector};
    use crate::imap::{Connector, Credentials};
    use crate::pop3::command::Secret;

    async fn conn(up: &FakeConnector) -> FakeConn {
        let pass = Secret::new(b"pw".to_vec());
        up.login(
            Credentials::Password {
                user: "alice",
                pass: &pass,
            },
            None,
            None,
        )
        .await
        .unwrap()
        .0
    }

    const REUSE: Reuse = Reuse {
        idle: Duration::from_secs(60),
        per_account: 2,
    };

    fn key(account: &str) -> PoolKey {
        PoolKey {
            route: "default".into(),
            account: account.into(),
            hide: None,
            device: None,
        }
    }

    #[tokio::test]
    async fn only_the_same_password_takes_a_session() {
        let up = FakeConnector::new(&[("alice", "pw")], &[]);
        let pool = Pool::new(10).unwrap();
        let tag = pool.tag(&Credential(b"pw"));
        pool.put(key("alice"), tag, conn(&up).await, REUSE);
        assert!(pool.take(&key("alice"), &Credential(b"wrong")).is_none());
        assert_eq!(pool.idle(), 1, "a wrong password leaves it alone");
        assert!(pool.take(&key("bob"), &Credential(b"pw")).is_none());
        assert!(pool.take(&key("alice"), &Credential(b"pw")).is_some());
        assert_eq!(pool.idle(), 0);
    }

    #[tokio::test]
    async fn limits_per_account_and_in_all_hold() {
        let up = FakeConnector::new(&[("alice", "pw")], &[]);
        let pool = Pool::new(3).unwrap();
        let tag = || pool.tag(&Credential(b"pw"));
        for _ in 0..3 {
            pool.put(key("a"), tag(), conn(&up).await, REUSE);
        }
        assert_eq!(pool.idle(), 2, "per account");
        pool.put(key("b"), tag(), conn(&up).await, REUSE);
        pool.put(key("c"), tag(), conn(&up).await, REUSE);
        assert_eq!(pool.idle(), 3, "in all");
        assert!(
            pool.take(&key("c"), &Credential(b"pw")).is_some(),
            "the newest stays"
        );
        tokio::task::yield_now().await;
        assert_eq!(pool.drain(None).await, 2);
        assert_eq!(pool.idle(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_sessions_expire() {
        let up = FakeConnector::new(&[("alice", "pw")], &[]);
        let pool = Pool::new(10).unwrap();
        let tag = pool.tag(&Credential(b"pw"));
        pool.put(key("a"), tag, conn(&up).await, REUSE);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(pool.take(&key("a"), &Credential(b"pw")).is_none());
        tokio::task::yield_now().await;
        assert_eq!(up.state().logouts, 1, "logged out politely");
    }
}
