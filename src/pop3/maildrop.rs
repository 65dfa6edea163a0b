//! The maildrop: a POP3 session's fixed view of an IMAP mailbox.
//!
//! RFC 1939 §4 requires message numbers that do not change during a session.
//! The maildrop is a snapshot taken at login, ordered by UID; mail that
//! arrives later is not in it, and DELE only sets a mark here.

use std::collections::HashMap;

use crate::pop3::command::MsgNum;
use crate::pop3::uidl::UidlFormat;

/// One message as POP3 sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The IMAP UID: the key for every upstream operation.
    pub uid: u32,
    /// RFC822.SIZE: octets in CRLF form, which is what RETR sends before
    /// dot-stuffing (RFC 1939 §11 "exact size").
    pub size: u64,
    /// Marked by DELE; cleared by RSET.
    pub deleted: bool,
    /// Retrieved with RETR in this session (for the `\Seen` policy).
    pub retrieved: bool,
}

/// The snapshot of a mailbox taken at login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maildrop {
    /// UIDVALIDITY of the mailbox when the snapshot was taken.
    pub uidvalidity: u32,
    entries: Vec<Entry>,
    /// Running totals so STAT does not walk the list.
    deleted_count: usize,
    deleted_octets: u64,
    total_octets: u64,
    /// UIDLs that are not the template's: reused `X-UIDL:` values, and
    /// renamed duplicates. Usually empty.
    uidl_overrides: HashMap<u32, String>,
}

/// Why a message number cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// No such message in this session's snapshot.
    NoSuchMessage(u32),
    /// Marked deleted in this session (RFC 1939 §5: "may not refer to a
    /// message marked as deleted").
    Deleted,
}

impl Maildrop {
    /// Builds a maildrop from (uid, size) pairs in any order.
    pub fn new(uidvalidity: u32, mut messages: Vec<(u32, u64)>) -> Self {
        messages.sort_unstable_by_key(|&(uid, _)| uid);
        messages.dedup_by_key(|m| m.0);
        let total_octets = messages.iter().map(|&(_, s)| s).sum();
        let entries = messages
            .into_iter()
            .map(|(uid, size)| Entry {
                uid,
                size,
                deleted: false,
                retrieved: false,
            })
            .collect();
        Self {
            uidvalidity,
            entries,
            deleted_count: 0,
            deleted_octets: 0,
            total_octets,
            uidl_overrides: HashMap::new(),
        }
    }

    /// Sets the UIDLs: `x_uidl` values where given, `format` for the rest.
    /// No UIDL is served twice in one listing: a later duplicate (in UID
    /// order) gets `-2`, `-3`... appended, as Dovecot's
    /// `pop3_uidl_duplicates = rename` does, and is logged.
    pub fn set_uidls(&mut self, x_uidl: HashMap<u32, String>, format: &UidlFormat) {
        self.uidl_overrides = x_uidl;
        if self.uidl_overrides.is_empty() {
            // Template UIDLs all contain the UID: unique by construction.
            return;
        }
        let mut seen: HashMap<String, u32> = HashMap::with_capacity(self.entries.len());
        for e in &self.entries {
            let mut uidl = self.uidl(e, format);
            if seen.contains_key(&uidl) {
                let base = uidl.clone();
                while let Some(count) = seen.get_mut(&base) {
                    *count += 1;
                    // RFC 1939 §7: at most 70 characters, so a long UIDL
                    // gives up its tail to the suffix (a map or X-UIDL value
                    // of 70 characters would otherwise be served as 72).
                    let suffix = format!("-{count}");
                    let keep = crate::pop3::uidl::MAX_UIDL_LEN.saturating_sub(suffix.len());
                    uidl = base.chars().take(keep).collect::<String>() + &suffix;
                    if !seen.contains_key(&uidl) {
                        break;
                    }
                }
                tracing::warn!(uid = e.uid, uidl = %uidl, "duplicate UIDL renamed");
                self.uidl_overrides.insert(e.uid, uidl.clone());
            }
            seen.insert(uidl, 1);
        }
    }

    /// The UIDL of a message.
    pub fn uidl(&self, e: &Entry, format: &UidlFormat) -> String {
        match self.uidl_overrides.get(&e.uid) {
            Some(u) => u.clone(),
            None => format.render(e.uid, self.uidvalidity),
        }
    }

    /// A message that may be used (exists and is not marked deleted).
    pub fn get(&self, n: MsgNum) -> Result<&Entry, Lookup> {
        match self.entries.get(n.index()) {
            None => Err(Lookup::NoSuchMessage(n.get())),
            Some(e) if e.deleted => Err(Lookup::Deleted),
            Some(e) => Ok(e),
        }
    }

    /// Marks a message deleted (DELE).
    pub fn delete(&mut self, n: MsgNum) -> Result<(), Lookup> {
        let size = self.get(n)?.size;
        self.entries[n.index()].deleted = true;
        self.deleted_count += 1;
        self.deleted_octets += size;
        Ok(())
    }

    /// Records that a message was retrieved (RETR).
    pub fn mark_retrieved(&mut self, n: MsgNum) {
        if let Some(e) = self.entries.get_mut(n.index()) {
            e.retrieved = true;
        }
    }

    /// Clears every deletion mark (RSET, RFC 1939 §5).
    pub fn reset(&mut self) {
        for e in &mut self.entries {
            e.deleted = false;
        }
        self.deleted_count = 0;
        self.deleted_octets = 0;
    }

    /// Messages not marked deleted, and their octets (STAT).
    pub fn stat(&self) -> (usize, u64) {
        (
            self.entries.len() - self.deleted_count,
            self.total_octets - self.deleted_octets,
        )
    }

    /// Every message not marked deleted, with its number.
    pub fn visible(&self) -> impl Iterator<Item = (MsgNum, &Entry)> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.deleted)
            .filter_map(|(i, e)| Some((MsgNum::new(u32::try_from(i + 1).ok()?)?, e)))
    }

    /// UIDs marked deleted, ascending.
    pub fn deleted_uids(&self) -> Vec<u32> {
        self.entries
            .iter()
            .filter(|e| e.deleted)
            .map(|e| e.uid)
            .collect()
    }

    /// UIDs retrieved and not deleted, ascending.
    pub fn retrieved_uids(&self) -> Vec<u32> {
        self.entries
            .iter()
            .filter(|e| e.retrieved && !e.deleted)
            .map(|e| e.uid)
            .collect()
    }

    /// Number of messages in the snapshot, deleted or not.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the snapshot holds no messages.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u32) -> MsgNum {
        MsgNum::new(i).unwrap()
    }

    #[test]
    fn snapshot_is_ordered_by_uid_and_dele_hides() {
        let mut m = Maildrop::new(9, vec![(30, 300), (10, 100), (20, 200)]);
        assert_eq!(m.stat(), (3, 600));
        assert_eq!(m.get(n(1)).unwrap().uid, 10);
        assert_eq!(m.get(n(3)).unwrap().uid, 30);
        assert_eq!(m.get(n(4)), Err(Lookup::NoSuchMessage(4)));
        m.delete(n(2)).unwrap();
        assert_eq!(m.delete(n(2)), Err(Lookup::Deleted));
        assert_eq!(m.get(n(2)), Err(Lookup::Deleted));
        assert_eq!(m.stat(), (2, 400));
        let vis: Vec<_> = m.visible().map(|(k, e)| (k.get(), e.uid)).collect();
        assert_eq!(vis, vec![(1, 10), (3, 30)]);
        assert_eq!(m.deleted_uids(), vec![20]);
        m.reset();
        assert_eq!(m.stat(), (3, 600));
        assert!(m.deleted_uids().is_empty());
    }

    #[test]
    fn x_uidl_reuse_and_duplicates_renamed() {
        let f = UidlFormat::parse("%u").unwrap();
        let mut m = Maildrop::new(1, vec![(1, 1), (2, 2), (3, 3), (4, 4)]);
        // 2 reuses "abc", 3 repeats it, 4's X-UIDL collides with 1's template UIDL.
        let x = HashMap::from([
            (2, "abc".to_string()),
            (3, "abc".to_string()),
            (4, "1".to_string()),
        ]);
        m.set_uidls(x, &f);
        let all: Vec<String> = m.visible().map(|(_, e)| m.uidl(e, &f)).collect();
        assert_eq!(all, ["1", "abc", "abc-2", "1-2"]);
    }

    #[test]
    fn renamed_duplicates_stay_valid_uidls() {
        let f = UidlFormat::parse("%u").unwrap();
        let long = "x".repeat(crate::pop3::uidl::MAX_UIDL_LEN);
        let mut m = Maildrop::new(1, (1..=12).map(|u| (u, 1)).collect());
        m.set_uidls((1..=12).map(|u| (u, long.clone())).collect(), &f);
        let all: Vec<String> = m.visible().map(|(_, e)| m.uidl(e, &f)).collect();
        let unique: std::collections::HashSet<&String> = all.iter().collect();
        assert_eq!(unique.len(), all.len(), "{all:?}");
        for u in &all {
            // RFC 1939 §7: 1 to 70 characters in 0x21-0x7E.
            assert!(
                (1..=crate::pop3::uidl::MAX_UIDL_LEN).contains(&u.len())
                    && u.bytes().all(|b| (0x21..=0x7e).contains(&b)),
                "{u:?} ({} chars)",
                u.len()
            );
        }
        assert_eq!(all[0], long);
        assert!(all[11].ends_with("-12"), "{}", all[11]);
    }

    #[test]
    fn retrieved_excludes_deleted() {
        let mut m = Maildrop::new(1, vec![(1, 1), (2, 2)]);
        m.mark_retrieved(n(1));
        m.mark_retrieved(n(2));
        m.delete(n(2)).unwrap();
        assert_eq!(m.retrieved_uids(), vec![1]);
    }
}
