//! Failed-login throttling per client address and per upstream account:
//! guesses stop here, before the IMAP server is asked.
//!
//! The design, and why (the README's security section says the same):
//! - **Attempts in flight count.** A login reserves its place before the
//!   IMAP server is asked and keeps it until the answer; a login that
//!   would reach a limit if every attempt in flight failed waits for one
//!   of them to finish. So 40 guesses sent at once are 10 (the limit)
//!   guesses, not 40, and a burst of good logins from one busy address is
//!   delayed, never refused.
//! - **Fixed windows.** A window opens at the first failure and closes
//!   `window` later; refused attempts are not failures and never extend
//!   it. An attacker who knocks once a minute cannot keep a lock for ever.
//! - **Known addresses are spared the per-user limit.** Once an address
//!   (an IPv6 /64) logged in to an account successfully, the account's
//!   per-user limit does not apply to it for [`KNOWN_ADDRESS_TTL`]: the
//!   real user's devices keep working while guesses from elsewhere are
//!   refused. They stay bound by the per-address limit, and their failures
//!   count for the account like any other. A success does not reset the
//!   account's count: that would give an attacker a fresh budget every
//!   time the real user polls.
//! - **Keys.** The per-user limit counts the upstream account (the route's
//!   server and the IMAP user name, after the device tag and `login =
//!   "local-part"` are applied), so `bob+d0`, `bob+d1`, ... and
//!   `bob@a.example`, `bob@b.example` share one budget. IPv6 addresses
//!   count per prefix (`limits.ipv6_prefix_len`, /64 by default: one
//!   customer's network), IPv4-mapped addresses as IPv4.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moka::sync::Cache;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Settings for [`LoginThrottle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Pause before answering a failed login (Dovecot's
    /// `auth_failure_delay` is 2 s), growing with repeated failures.
    pub failure_delay: Duration,
    /// Failures from one address within a window before further logins
    /// from it are refused without asking the upstream.
    pub max_failures_per_ip: u32,
    /// Failures for one upstream account within a window before further
    /// logins for it from addresses that never logged in to it are refused
    /// without asking the upstream.
    pub max_failures_per_user: u32,
    /// How long a window lasts, from its first failure.
    pub window: Duration,
    /// Entries per table; the oldest are evicted first, so an attacker
    /// cycling through addresses or names cannot grow memory.
    pub max_entries: u64,
    /// IPv6 addresses count per network of this prefix length.
    pub ipv6_prefix_len: u8,
}

/// How long an address that logged in to an account stays known to it
/// (spared the account's per-user limit). A device that polls at least
/// once a month stays known; memory is bounded by `max_entries`.
pub const KNOWN_ADDRESS_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// The largest multiple of `failure_delay` applied to one answer.
const MAX_DELAY_STEPS: u32 = 4;

/// An upstream account, as the throttle counts it: where accounts live (a
/// route's upstream) and the IMAP user name there, lower-cased.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AccountKey(Arc<str>);

impl AccountKey {
    /// The account `user` on the upstream `scope`.
    pub fn new(scope: &str, user: &str) -> Self {
        Self(format!("{scope}\0{}", user.to_lowercase()).into())
    }

    /// The key as text for the shared throttle's Redis keys: the scope and
    /// the account joined by `|` (scopes are `host:port`, without one).
    pub fn id(&self) -> String {
        self.0.replacen('\0', "|", 1)
    }
}

/// Failures in one fixed window.
#[derive(Debug, Clone, Copy)]
struct Window {
    failures: u32,
    opened: Instant,
}

/// Logins between their check and their answer, and the logins waiting
/// for one of them to end, by the key that holds them back.
#[derive(Debug, Default)]
struct InFlight {
    by_ip: HashMap<IpAddr, u32>,
    by_user: HashMap<AccountKey, u32>,
    waiting_ip: HashMap<IpAddr, Arc<Notify>>,
    waiting_user: HashMap<AccountKey, Arc<Notify>>,
}

impl InFlight {
    /// Where logins held back by `which` (of `ip`, `account`) wait.
    fn waiters(&mut self, which: Throttled, ip: IpAddr, account: &AccountKey) -> Arc<Notify> {
        match which {
            Throttled::Address => self.waiting_ip.entry(ip).or_default().clone(),
            Throttled::User => self
                .waiting_user
                .entry(account.clone())
                .or_default()
                .clone(),
        }
    }

    /// Wakes one login waiting on `which`, if any. One: an attempt that
    /// ends frees at most one place under each of its keys, so waking every
    /// waiter would only make all but one of them check again for nothing
    /// (thousands of wake-ups per answer when a botnet queues guesses for
    /// one account).
    fn wake_one(&self, which: Throttled, ip: IpAddr, account: &AccountKey) {
        let n = match which {
            Throttled::Address => self.waiting_ip.get(&ip),
            Throttled::User => self.waiting_user.get(account),
        };
        if let Some(n) = n {
            n.notify_one();
        }
    }

    /// Drops the waiting places of `ip` and `account` that nobody holds.
    fn forget_unused(&mut self, ip: IpAddr, account: &AccountKey) {
        if self
            .waiting_ip
            .get(&ip)
            .is_some_and(|n| Arc::strong_count(n) == 1)
        {
            self.waiting_ip.remove(&ip);
        }
        if self
            .waiting_user
            .get(account)
            .is_some_and(|n| Arc::strong_count(n) == 1)
        {
            self.waiting_user.remove(account);
        }
    }

    /// Drops `which`'s waiting place once nobody else holds it.
    fn forget(&mut self, which: Throttled, ip: IpAddr, account: &AccountKey, n: &Arc<Notify>) {
        // Held by the map and by `n`'s owner only: nobody else waits there.
        if Arc::strong_count(n) > 2 {
            return;
        }
        match which {
            Throttled::Address => {
                if self.waiting_ip.get(&ip).is_some_and(|m| Arc::ptr_eq(m, n)) {
                    self.waiting_ip.remove(&ip);
                }
            }
            Throttled::User => {
                if self
                    .waiting_user
                    .get(account)
                    .is_some_and(|m| Arc::ptr_eq(m, n))
                {
                    self.waiting_user.remove(account);
                }
            }
        }
    }
}

/// Failed-login memory, bounded in size and time (moka), and the logins in
/// flight.
#[derive(Debug)]
pub struct LoginThrottle {
    config: ThrottleConfig,
    by_ip: Cache<IpAddr, Window>,
    by_user: Cache<AccountKey, Window>,
    /// (account, address) pairs that logged in successfully.
    known: Cache<(AccountKey, IpAddr), ()>,
    /// Held while checking and changing counts, so a check and its
    /// reservation are one step; never across an await.
    in_flight: Mutex<InFlight>,
}

/// A login that must not be tried now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttled {
    Address,
    User,
}

/// What a check decided.
enum Decision {
    Go,
    Refuse(Throttled),
    /// Attempts in flight under this key could still reach its limit: wait
    /// for one of them to end (there is one: the key has attempts in
    /// flight, or it would be a refusal).
    Wait(Throttled),
}

/// Where a login waited for an attempt in flight to end.
struct Held {
    which: Throttled,
    waiters: Arc<Notify>,
    /// It was woken there (and so holds a freed place to use or pass on).
    woken: bool,
}

/// What one check under the lock came to.
enum Step {
    Done(Result<Attempt, Throttled>),
    Wait(Throttled, Arc<Notify>),
}

/// One login attempt between the check and the answer; it holds its place
/// in the in-flight counts until [`Attempt::failed`], [`Attempt::succeeded`]
/// or drop (a login that ended otherwise: not counted).
#[derive(Debug)]
pub struct Attempt {
    throttle: Arc<LoginThrottle>,
    ip: IpAddr,
    account: AccountKey,
    done: bool,
}

impl LoginThrottle {
    pub fn new(config: ThrottleConfig) -> Self {
        Self {
            by_ip: bounded(config.max_entries, config.window),
            by_user: bounded(config.max_entries, config.window),
            known: bounded(config.max_entries, KNOWN_ADDRESS_TTL),
            in_flight: Mutex::new(InFlight::default()),
            config,
        }
    }

    /// The settings it was built with.
    pub fn config(&self) -> &ThrottleConfig {
        &self.config
    }

    /// The key `ip` is counted under (see [`address_key`]).
    pub fn address_key(&self, ip: IpAddr) -> IpAddr {
        address_key(ip, self.config.ipv6_prefix_len)
    }

    /// Failures in the window still open, if any.
    fn failures<K>(cache: &Cache<K, Window>, key: &K, window: Duration, now: Instant) -> u32
    where
        K: std::hash::Hash + Eq + Send + Sync + 'static,
    {
        cache
            .get(key)
            .filter(|w| now.duration_since(w.opened) < window)
            .map_or(0, |w| w.failures)
    }

    fn decide(&self, counts: &InFlight, ip: IpAddr, account: &AccountKey) -> Decision {
        let now = Instant::now();
        let window = self.config.window;
        let ip_failures = Self::failures(&self.by_ip, &ip, window, now);
        let ip_pending = counts.by_ip.get(&ip).copied().unwrap_or(0);
        if ip_failures >= self.config.max_failures_per_ip {
            return Decision::Refuse(Throttled::Address);
        }
        let mut wait = (ip_failures + ip_pending >= self.config.max_failures_per_ip)
            .then_some(Throttled::Address);
        if !self.known.contains_key(&(account.clone(), ip)) {
            let user_failures = Self::failures(&self.by_user, account, window, now);
            if user_failures >= self.config.max_failures_per_user {
                return Decision::Refuse(Throttled::User);
            }
            let user_pending = counts.by_user.get(account).copied().unwrap_or(0);
            if user_failures + user_pending >= self.config.max_failures_per_user {
                wait = wait.or(Some(Throttled::User));
            }
        }
        match wait {
            Some(which) => Decision::Wait(which),
            None => Decision::Go,
        }
    }

    /// Whether a login from `ip` for `account` may reach the upstream now.
    /// When attempts in flight could still reach a limit, waits until one
    /// of them ends and decides again.
    pub async fn begin(
        self: &Arc<Self>,
        ip: IpAddr,
        account: &AccountKey,
    ) -> Result<Attempt, Throttled> {
        let ip = self.address_key(ip);
        let mut held: Option<Held> = None;
        loop {
            let (which, n) = match self.step(ip, account, held.take()) {
                Step::Done(r) => return r,
                Step::Wait(which, n) => (which, n),
            };
            let mut settled = Box::pin(n.notified());
            settled.as_mut().enable();
            // Checked again now that an attempt ending would wake this
            // login (one may have ended since the check above).
            let again = Held {
                which,
                waiters: n.clone(),
                woken: false,
            };
            match self.step(ip, account, Some(again)) {
                Step::Wait(w, m) if w == which && Arc::ptr_eq(&m, &n) => {}
                other => {
                    // A wake-up `settled` received meanwhile goes on to the
                    // next waiter as it is dropped (tokio's Notified does
                    // that); then the place is forgotten if nobody waits.
                    drop(settled);
                    self.lock().forget(which, ip, account, &n);
                    match other {
                        Step::Done(r) => return r,
                        Step::Wait(w, m) => {
                            held = Some(Held {
                                which: w,
                                waiters: m,
                                woken: false,
                            });
                            continue;
                        }
                    }
                }
            }
            settled.await;
            held = Some(Held {
                which,
                waiters: n.clone(),
                woken: true,
            });
        }
    }

    /// One check under the lock: go (the place is taken), a refusal, or
    /// where to wait. `held` is where this login waited before: a wake-up
    /// from there that it does not use goes on to the next waiter, and the
    /// place is forgotten once nobody waits there.
    fn step(self: &Arc<Self>, ip: IpAddr, account: &AccountKey, held: Option<Held>) -> Step {
        let mut counts = self.lock();
        let decision = self.decide(&counts, ip, account);
        if let Some(h) = held {
            let taken = match decision {
                Decision::Go => true,
                Decision::Wait(w) => w == h.which,
                Decision::Refuse(_) => false,
            };
            if h.woken && !taken {
                counts.wake_one(h.which, ip, account);
            }
            counts.forget(h.which, ip, account, &h.waiters);
        }
        match decision {
            Decision::Refuse(which) => Step::Done(Err(which)),
            Decision::Go => {
                *counts.by_ip.entry(ip).or_insert(0) += 1;
                *counts.by_user.entry(account.clone()).or_insert(0) += 1;
                Step::Done(Ok(Attempt {
                    throttle: self.clone(),
                    ip,
                    account: account.clone(),
                    done: false,
                }))
            }
            Decision::Wait(which) => Step::Wait(which, counts.waiters(which, ip, account)),
        }
    }

    /// Whether `ip` has reached its failure limit in the current window:
    /// any login from it would be refused, whatever the account.
    pub fn address_refused(&self, ip: IpAddr) -> bool {
        let n = Self::failures(
            &self.by_ip,
            &self.address_key(ip),
            self.config.window,
            Instant::now(),
        );
        n >= self.config.max_failures_per_ip
    }

    /// How long to wait before answering a login the throttle refused
    /// (the same pause a failure from this address would get; not counted).
    pub fn refused_delay(&self, ip: IpAddr) -> Duration {
        let now = Instant::now();
        let n = Self::failures(&self.by_ip, &self.address_key(ip), self.config.window, now);
        self.config.failure_delay * n.clamp(1, MAX_DELAY_STEPS)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InFlight> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a failure to `key`'s window (opening a new one if it closed);
    /// returns the failures in it.
    fn count_failure<K>(cache: &Cache<K, Window>, key: K, window: Duration) -> u32
    where
        K: std::hash::Hash + Eq + Send + Sync + Clone + 'static,
    {
        let now = Instant::now();
        cache
            .entry(key)
            .and_upsert_with(|e| match e.map(|e| e.into_value()) {
                Some(w) if now.duration_since(w.opened) < window => Window {
                    failures: w.failures.saturating_add(1),
                    opened: w.opened,
                },
                _ => Window {
                    failures: 1,
                    opened: now,
                },
            })
            .into_value()
            .failures
    }

    /// Ends an attempt: releases its place and, for a failure, counts it.
    fn settle(&self, a: &Attempt, failed: bool) -> u32 {
        let mut ip_failures = 0;
        let mut counts = self.lock();
        release(&mut counts.by_ip, &a.ip);
        release(&mut counts.by_user, &a.account);
        if failed {
            ip_failures = Self::count_failure(&self.by_ip, a.ip, self.config.window);
            Self::count_failure(&self.by_user, a.account.clone(), self.config.window);
        }
        counts.wake_one(Throttled::Address, a.ip, &a.account);
        counts.wake_one(Throttled::User, a.ip, &a.account);
        counts.forget_unused(a.ip, &a.account);
        ip_failures
    }
}

/// A cache of at most `entries`, each kept at most `ttl` after its last write.
fn bounded<K, V>(entries: u64, ttl: Duration) -> Cache<K, V>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    Cache::builder()
        .max_capacity(entries)
        .time_to_live(ttl)
        .build()
}

/// Takes one from a count, removing it at zero.
fn release<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, u32>, key: &K) {
    if let Some(n) = counts.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(key);
        }
    }
}

impl Attempt {
    /// A failed login (wrong credentials): counted; returns how long to
    /// wait before answering.
    pub fn failed(mut self) -> Duration {
        self.done = true;
        let n = self.throttle.settle(&self, true);
        self.throttle.config.failure_delay * n.clamp(1, MAX_DELAY_STEPS)
    }

    /// The credentials were right: the address becomes known to the account.
    pub fn succeeded(mut self) {
        self.done = true;
        self.throttle.settle(&self, false);
        self.throttle
            .known
            .insert((self.account.clone(), self.ip), ());
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.done {
            self.throttle.settle(self, false);
        }
    }
}

/// The address `ip` is counted as: IPv4 as it is (IPv4-mapped IPv6 too),
/// IPv6 as its network of `prefix_len` bits (one customer usually has a
/// whole /64, so counting single addresses would let one attacker have as
/// many budgets as addresses).
pub fn address_key(ip: IpAddr, prefix_len: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u32::from(prefix_len.min(128));
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(per_ip: u32, per_user: u32) -> Arc<LoginThrottle> {
        Arc::new(LoginThrottle::new(ThrottleConfig {
            failure_delay: Duration::from_millis(10),
            max_failures_per_ip: per_ip,
            max_failures_per_user: per_user,
            window: Duration::from_secs(60),
            max_entries: 100,
            ipv6_prefix_len: 64,
        }))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn acct(user: &str) -> AccountKey {
        AccountKey::new("imap.example:143", user)
    }

    #[tokio::test(start_paused = true)]
    async fn throttle_refuses_after_limits_and_is_bounded() {
        let t = throttle(3, 2);
        let (a, other) = (ip("192.0.2.1"), ip("192.0.2.9"));
        assert_eq!(
            t.begin(a, &acct("alice")).await.unwrap().failed(),
            Duration::from_millis(10)
        );
        assert_eq!(
            t.begin(a, &acct("Alice")).await.unwrap().failed(),
            Duration::from_millis(20)
        );
        // The account's limit is reached (case-insensitive), from any
        // address that never logged in to it.
        assert_eq!(
            t.begin(other, &acct("ALICE")).await.err(),
            Some(Throttled::User)
        );
        t.begin(a, &acct("bob")).await.unwrap().failed();
        assert_eq!(
            t.begin(a, &acct("carol")).await.err(),
            Some(Throttled::Address)
        );
        assert!(t.begin(other, &acct("carol")).await.is_ok());
        // Another upstream's alice is another account.
        assert!(t
            .begin(other, &AccountKey::new("other:143", "alice"))
            .await
            .is_ok());
        // Many distinct keys never exceed the bound.
        for i in 0..10_000u32 {
            t.begin(IpAddr::from(i.to_be_bytes()), &acct(&format!("user{i}")))
                .await
                .unwrap()
                .failed();
        }
        t.by_ip.run_pending_tasks();
        t.by_user.run_pending_tasks();
        assert!(t.by_ip.entry_count() <= 100, "{}", t.by_ip.entry_count());
        assert!(t.by_user.entry_count() <= 100);
        assert!(t.lock().by_ip.is_empty() && t.lock().by_user.is_empty());
    }

    /// Refused attempts are not failures: the window closes one window
    /// after its first failure however often the throttle refused since.
    #[tokio::test(start_paused = true)]
    async fn refusals_never_extend_the_window() {
        let t = throttle(100, 2);
        let bob = acct("bob");
        for i in 0..2u8 {
            t.begin(IpAddr::from([203, 0, 113, i]), &bob)
                .await
                .unwrap()
                .failed();
        }
        for i in 0..59u8 {
            tokio::time::advance(Duration::from_secs(1)).await;
            let from = IpAddr::from([198, 51, 100, i]);
            assert_eq!(
                t.begin(from, &bob).await.err(),
                Some(Throttled::User),
                "{i}"
            );
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(t.begin(ip("198.51.100.200"), &bob).await.is_ok());
    }

    /// An address that logged in to the account is spared its per-user
    /// limit (not the per-address one), and a success resets nothing.
    #[tokio::test(start_paused = true)]
    async fn known_addresses_are_spared_the_per_user_limit() {
        let t = throttle(3, 2);
        let (home, away) = (ip("192.0.2.10"), ip("203.0.113.5"));
        let bob = acct("bob");
        t.begin(home, &bob).await.unwrap().succeeded();
        for i in 0..2u8 {
            t.begin(IpAddr::from([198, 51, 100, i]), &bob)
                .await
                .unwrap()
                .failed();
        }
        assert_eq!(t.begin(away, &bob).await.err(), Some(Throttled::User));
        t.begin(home, &bob).await.unwrap().succeeded();
        assert_eq!(t.begin(away, &bob).await.err(), Some(Throttled::User));
        // The home address's own failures still count against it.
        for _ in 0..3 {
            t.begin(home, &bob).await.unwrap().failed();
        }
        assert_eq!(t.begin(home, &bob).await.err(), Some(Throttled::Address));
    }

    /// Attempts in flight count: with a limit of 2, a third concurrent
    /// attempt waits, and is refused when both fail; when one succeeds
    /// instead, it goes ahead. A dropped attempt releases its place.
    #[tokio::test(start_paused = true)]
    async fn attempts_in_flight_count_against_the_limits() {
        let t = throttle(100, 2);
        let bob = acct("bob");
        let a = t.begin(ip("192.0.2.1"), &bob).await.unwrap();
        let b = t.begin(ip("192.0.2.2"), &bob).await.unwrap();
        let third = {
            let t = t.clone();
            let bob = bob.clone();
            tokio::spawn(async move { t.begin(ip("192.0.2.3"), &bob).await.map(drop) })
        };
        tokio::task::yield_now().await;
        assert!(!third.is_finished(), "the third attempt went ahead");
        a.failed();
        tokio::task::yield_now().await;
        assert!(
            !third.is_finished(),
            "one failure and one in flight make two"
        );
        b.failed();
        assert_eq!(third.await.unwrap(), Err(Throttled::User));

        let t = throttle(100, 2);
        let a = t.begin(ip("192.0.2.1"), &bob).await.unwrap();
        let b = t.begin(ip("192.0.2.2"), &bob).await.unwrap();
        let third = {
            let t = t.clone();
            let bob = bob.clone();
            tokio::spawn(async move { t.begin(ip("192.0.2.3"), &bob).await.map(drop) })
        };
        a.succeeded();
        drop(b);
        assert_eq!(third.await.unwrap(), Ok(()));
    }

    /// A burst of good logins from one address, many more than its limit:
    /// every one goes ahead in turn, never more than the limit at once, and
    /// no waiting place is left behind. Then a burst of guesses for one
    /// account from many addresses: as many reach the server as the limit
    /// allows, the rest are refused, none is left waiting.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bursts_wait_their_turn_and_leave_nothing_behind() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let t = throttle(5, 1000);
        let busy = Arc::new(AtomicU32::new(0));
        let most = Arc::new(AtomicU32::new(0));
        let logins: Vec<_> = (0..200)
            .map(|i| {
                let (t, busy, most) = (t.clone(), busy.clone(), most.clone());
                tokio::spawn(async move {
                    let a = t.begin(ip("192.0.2.1"), &acct(&format!("u{i}"))).await?;
                    let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    busy.fetch_sub(1, Ordering::SeqCst);
                    a.succeeded();
                    Ok::<(), Throttled>(())
                })
            })
            .collect();
        for l in logins {
            assert_eq!(l.await.unwrap(), Ok(()));
        }
        assert!(most.load(Ordering::SeqCst) <= 5, "{most:?} at once");
        {
            let counts = t.lock();
            assert!(counts.by_ip.is_empty() && counts.by_user.is_empty());
            assert!(
                counts.waiting_ip.is_empty(),
                "{:?}",
                counts.waiting_ip.len()
            );
            assert!(counts.waiting_user.is_empty());
        }

        let t = throttle(1000, 3);
        let bob = acct("bob");
        let guesses: Vec<_> = (0..100)
            .map(|i| {
                let (t, bob) = (t.clone(), bob.clone());
                tokio::spawn(async move {
                    let a = t.begin(ip(&format!("198.51.100.{i}")), &bob).await?;
                    tokio::task::yield_now().await;
                    let _ = a.failed();
                    Ok::<(), Throttled>(())
                })
            })
            .collect();
        let mut reached = 0;
        for g in guesses {
            match g.await.unwrap() {
                Ok(()) => reached += 1,
                Err(which) => assert_eq!(which, Throttled::User),
            }
        }
        assert_eq!(reached, 3, "guesses that reached the server");
        let counts = t.lock();
        assert!(counts.waiting_user.is_empty() && counts.waiting_ip.is_empty());
    }

    #[test]
    fn addresses_count_per_ipv6_prefix() {
        assert_eq!(address_key(ip("192.0.2.7"), 64), ip("192.0.2.7"));
        assert_eq!(address_key(ip("::ffff:192.0.2.7"), 64), ip("192.0.2.7"));
        assert_eq!(
            address_key(ip("2001:db8:1:2:a:b:c:d"), 64),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            address_key(ip("2001:db8:1:2:a:b:c:d"), 48),
            ip("2001:db8:1::")
        );
        assert_eq!(address_key(ip("2001:db8::7"), 128), ip("2001:db8::7"));
        assert_eq!(address_key(ip("2001:db8::7"), 0), ip("::"));
    }
}
