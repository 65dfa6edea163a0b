//! Mailbox listings remembered across sessions (moka, bounded by weight).
//!
//! A message identified by (upstream, account, mailbox, UIDVALIDITY, UID)
//! never changes (RFC 3501 §2.3.1.1), so its size can be reused safely. A
//! warm poll then asks the server only for what is new: `SELECT` tells
//! UIDNEXT and EXISTS; when neither moved, the listing is reused as is; when
//! only UIDNEXT moved and the count adds up, only the new messages are
//! fetched. Anything else (an expunge, a new UIDVALIDITY) takes a full
//! listing.
//!
//! The key always holds the upstream address and the authenticated account,
//! so one user's listing is never served to another, even with the same user
//! name on two upstreams; an entry is only consulted after that account has
//! logged in to that upstream.

use std::sync::Arc;

use moka::sync::Cache;

/// Whose listing: everything that identifies a mailbox on a server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListingKey {
    /// The upstream server, as configured (`host:port`).
    pub upstream: Arc<str>,
    /// The account that logged in (exactly as sent to the server).
    pub account: String,
    /// The mailbox name.
    pub mailbox: String,
}

/// A mailbox listing as of one SELECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub uidvalidity: u32,
    /// Every UID in `messages` is below this (RFC 3501 §2.3.1.1: new
    /// messages get UIDs at or above the UIDNEXT announced before them).
    pub uidnext: u32,
    /// (UID, RFC822.SIZE), ascending by UID, no duplicates.
    pub messages: Arc<Vec<(u32, u64)>>,
    /// `X-UIDL:` values by UID, when they were fetched (headers never
    /// change either); `None` when the listing was taken without them.
    pub xuidl: Option<Arc<std::collections::HashMap<u32, String>>>,
}

/// Bytes a listing is charged for one message (UID and size).
const BYTES_PER_MESSAGE: u64 = 16;
/// Bytes a listing is charged besides its messages (key, bookkeeping).
const BYTES_PER_ENTRY: u64 = 256;

/// The shared cache of listings.
#[derive(Debug)]
pub struct ListingCache {
    cache: Cache<ListingKey, Arc<Listing>>,
}

impl ListingCache {
    /// A cache holding at most about `max_bytes` of listings.
    pub fn new(max_bytes: u64) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_k: &ListingKey, v: &Arc<Listing>| {
                    let w = BYTES_PER_ENTRY + BYTES_PER_MESSAGE * v.messages.len() as u64;
                    u32::try_from(w).unwrap_or(u32::MAX)
                })
                .build(),
        }
    }

    pub fn get(&self, key: &ListingKey) -> Option<Arc<Listing>> {
        self.cache.get(key)
    }

    pub fn insert(&self, key: ListingKey, listing: Listing) {
        self.cache.insert(key, Arc::new(listing));
    }

    pub fn remove(&self, key: &ListingKey) {
        self.cache.invalidate(key);
    }
}

/// What a SELECT said, compared with a cached listing.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing changed: reuse the listing.
    Reuse,
    /// Fetch messages with UID at or above this; keep the cached ones.
    FetchFrom(u32),
    /// Fetch everything.
    Full,
}

/// Decides how much to fetch, given the cached listing and SELECT's
/// UIDVALIDITY, UIDNEXT and EXISTS.
pub fn plan(cached: Option<&Listing>, uidvalidity: u32, uidnext: Option<u32>, exists: u32) -> Plan {
    let (Some(c), Some(uidnext)) = (cached, uidnext) else {
        return Plan::Full;
    };
    if c.uidvalidity != uidvalidity || uidnext < c.uidnext {
        return Plan::Full;
    }
    let cached_len = c.messages.len() as u64;
    if uidnext == c.uidnext {
        // Nothing new; equal counts mean nothing was expunged either.
        return if u64::from(exists) == cached_len {
            Plan::Reuse
        } else {
            Plan::Full
        };
    }
    if u64::from(exists) < cached_len {
        // Something was expunged (and maybe something added): start over.
        return Plan::Full;
    }
    Plan::FetchFrom(c.uidnext)
}

/// Joins a cached listing with the messages fetched from its UIDNEXT on.
/// Returns `None` when the count does not match EXISTS (something was
/// expunged meanwhile), so the caller fetches everything.
pub fn merge(cached: &Listing, new: Vec<(u32, u64)>, exists: u32) -> Option<Vec<(u32, u64)>> {
    let mut all = Vec::with_capacity(cached.messages.len() + new.len());
    all.extend_from_slice(&cached.messages);
    // `UID FETCH n:*` returns the highest message even when its UID is below
    // n (RFC 3501 §6.4.8): keep only the really new ones.
    all.extend(new.into_iter().filter(|&(uid, _)| uid >= cached.uidnext));
    all.sort_unstable_by_key(|m| m.0);
    all.dedup_by_key(|m| m.0);
    (all.len() as u64 == u64::from(exists)).then_some(all)
}

/// The UIDNEXT to remember with a listing: what SELECT said, or past the
/// highest UID listed (a message may arrive between SELECT and FETCH).
pub fn next_uid(select_uidnext: Option<u32>, messages: &[(u32, u64)]) -> u32 {
    let past_last = messages.last().map_or(0, |m| m.0.saturating_add(1));
    select_uidnext.unwrap_or(0).max(past_last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(uidnext: u32, uids: &[u32]) -> Listing {
        Listing {
            uidvalidity: 7,
            uidnext,
            messages: Arc::new(uids.iter().map(|&u| (u, u64::from(u) * 10)).collect()),
            xuidl: None,
        }
    }

    #[test]
    fn plans() {
        let c = listing(10, &[1, 5, 9]);
        assert_eq!(plan(None, 7, Some(10), 3), Plan::Full);
        assert_eq!(plan(Some(&c), 7, Some(10), 3), Plan::Reuse);
        assert_eq!(
            plan(Some(&c), 8, Some(10), 3),
            Plan::Full,
            "new UIDVALIDITY"
        );
        assert_eq!(plan(Some(&c), 7, Some(10), 2), Plan::Full, "expunged");
        assert_eq!(plan(Some(&c), 7, Some(12), 5), Plan::FetchFrom(10));
        assert_eq!(plan(Some(&c), 7, Some(12), 2), Plan::Full);
        assert_eq!(plan(Some(&c), 7, None, 3), Plan::Full, "no UIDNEXT");
    }

    #[test]
    fn merge_checks_the_count() {
        let c = listing(10, &[1, 5, 9]);
        // The server returned the old highest message too (n:* rule).
        assert_eq!(
            merge(&c, vec![(9, 90), (10, 100), (11, 110)], 5),
            Some(vec![(1, 10), (5, 50), (9, 90), (10, 100), (11, 110)])
        );
        // One old message was expunged while one arrived: counts disagree.
        assert_eq!(merge(&c, vec![(10, 100)], 3), None);
    }

    #[test]
    fn keys_separate_upstreams_and_accounts() {
        let cache = ListingCache::new(1 << 20);
        let key = |up: &str, acct: &str| ListingKey {
            upstream: up.into(),
            account: acct.into(),
            mailbox: "INBOX".into(),
        };
        cache.insert(key("a:143", "alice"), listing(3, &[1, 2]));
        assert!(cache.get(&key("a:143", "alice")).is_some());
        assert!(cache.get(&key("b:143", "alice")).is_none());
        assert!(cache.get(&key("a:143", "bob")).is_none());
    }

    #[test]
    fn weight_bounds_memory() {
        let cache = ListingCache::new(100_000);
        for i in 0..100 {
            let uids: Vec<u32> = (1..=1000).collect();
            cache.insert(
                ListingKey {
                    upstream: "a:143".into(),
                    account: format!("user{i}"),
                    mailbox: "INBOX".into(),
                },
                listing(1001, &uids),
            );
        }
        cache.cache.run_pending_tasks();
        assert!(
            cache.cache.weighted_size() <= 100_000,
            "{}",
            cache.cache.weighted_size()
        );
    }
}
