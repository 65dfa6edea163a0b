//! Sessions per client address: one address cannot take every session.
//! The caller chooses the key (an IPv6 client counts by its network; see
//! [`crate::bridge::throttle::address_key`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Counts open sessions per client address.
#[derive(Debug)]
pub struct IpLimiter {
    /// Changed by a configuration reload.
    max_per_ip: AtomicUsize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// Holds one session's place; dropping it frees the place.
#[derive(Debug)]
pub struct IpSlot {
    limiter: Arc<IpLimiter>,
    ip: IpAddr,
}

impl IpLimiter {
    pub fn new(max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            max_per_ip: AtomicUsize::new(max_per_ip),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Changes the limit for sessions that start from now on.
    pub fn set_max(&self, max: usize) {
        self.max_per_ip.store(max, Ordering::Relaxed);
    }

    /// A place for a new session from `ip`, or `None` when it has too many.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max_per_ip.load(Ordering::Relaxed) {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            limiter: self.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.limiter.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_limiter_counts_and_releases() {
        let l = IpLimiter::new(2);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = l.acquire(ip).unwrap();
        let _b = l.acquire(ip).unwrap();
        assert!(l.acquire(ip).is_none());
        assert!(l.acquire("192.0.2.2".parse().unwrap()).is_some());
        drop(a);
        assert!(l.acquire(ip).is_some());
    }
}
