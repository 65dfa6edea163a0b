//! Failed-login throttling per client address and per user name: guesses
//! stop here, before the IMAP server is asked.

use std::net::IpAddr;
use std::time::Duration;

use moka::sync::Cache;

/// Settings for [`LoginThrottle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Pause before answering a failed login (Dovecot's
    /// `auth_failure_delay` is 2 s), growing with repeated failures.
    pub failure_delay: Duration,
    /// Failures from one address within `window` before further logins
    /// from it are refused without asking the upstream.
    pub max_failures_per_ip: u32,
    /// Failures for one user name within `window` before further logins
    /// for it are refused without asking the upstream.
    pub max_failures_per_user: u32,
    /// How long failures are remembered.
    pub window: Duration,
    /// Entries per table; the oldest are evicted first, so an attacker
    /// cycling through addresses or names cannot grow memory.
    pub max_entries: u64,
}

/// Failed-login memory, bounded in size and time (moka).
#[derive(Debug)]
pub struct LoginThrottle {
    config: ThrottleConfig,
    by_ip: Cache<IpAddr, u32>,
    by_user: Cache<String, u32>,
}

/// A login that must not be tried now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttled {
    Address,
    User,
}

/// The largest multiple of `failure_delay` applied to one answer.
const MAX_DELAY_STEPS: u32 = 4;

impl LoginThrottle {
    pub fn new(config: ThrottleConfig) -> Self {
        Self {
            by_ip: Cache::builder()
                .max_capacity(config.max_entries)
                .time_to_live(config.window)
                .build(),
            by_user: Cache::builder()
                .max_capacity(config.max_entries)
                .time_to_live(config.window)
                .build(),
            config,
        }
    }

    /// The settings it was built with.
    pub fn config(&self) -> &ThrottleConfig {
        &self.config
    }

    fn user_key(user: &str) -> String {
        user.to_lowercase()
    }

    /// Whether a login from `ip` for `user` may reach the upstream.
    pub fn check(&self, ip: IpAddr, user: &str) -> Result<(), Throttled> {
        if self.by_ip.get(&ip).unwrap_or(0) >= self.config.max_failures_per_ip {
            return Err(Throttled::Address);
        }
        if self.by_user.get(&Self::user_key(user)).unwrap_or(0) >= self.config.max_failures_per_user
        {
            return Err(Throttled::User);
        }
        Ok(())
    }

    /// Records a failure; returns how long to wait before answering.
    pub fn failed(&self, ip: IpAddr, user: &str) -> Duration {
        let ip_count = self
            .by_ip
            .entry(ip)
            .and_upsert_with(|e| e.map_or(1, |e| e.into_value().saturating_add(1)))
            .into_value();
        self.by_user
            .entry(Self::user_key(user))
            .and_upsert_with(|e| e.map_or(1, |e| e.into_value().saturating_add(1)));
        self.config.failure_delay * ip_count.clamp(1, MAX_DELAY_STEPS)
    }

    /// A successful login forgets the user name's failures.
    pub fn succeeded(&self, user: &str) {
        self.by_user.invalidate(&Self::user_key(user));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_refuses_after_limits_and_is_bounded() {
        let t = LoginThrottle::new(ThrottleConfig {
            failure_delay: Duration::from_millis(10),
            max_failures_per_ip: 3,
            max_failures_per_user: 2,
            window: Duration::from_secs(60),
            max_entries: 100,
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.9".parse().unwrap();
        assert_eq!(t.check(ip, "alice"), Ok(()));
        assert_eq!(t.failed(ip, "alice"), Duration::from_millis(10));
        assert_eq!(t.failed(ip, "Alice"), Duration::from_millis(20));
        // User name limit reached (case-insensitive), from any address.
        assert_eq!(t.check(other, "ALICE"), Err(Throttled::User));
        assert_eq!(t.check(ip, "bob"), Ok(()));
        t.failed(ip, "bob");
        assert_eq!(t.check(ip, "carol"), Err(Throttled::Address));
        assert_eq!(t.check(other, "carol"), Ok(()));
        t.succeeded("alice");
        assert_eq!(t.check(other, "alice"), Ok(()));
        // Many distinct keys never exceed the bound.
        for i in 0..10_000u32 {
            t.failed(IpAddr::from(i.to_be_bytes()), &format!("user{i}"));
        }
        t.by_ip.run_pending_tasks();
        t.by_user.run_pending_tasks();
        assert!(t.by_ip.entry_count() <= 100, "{}", t.by_ip.entry_count());
        assert!(t.by_user.entry_count() <= 100);
    }
}
