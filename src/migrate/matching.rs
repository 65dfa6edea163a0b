//! Which IMAP message is which old POP3 message: sizes in order first, then
//! header hashes (the approach of Dovecot's pop3-migration plugin).
//!
//! No I/O: the caller lists both sides, fetches header hashes when
//! [`by_size`] does not settle it, and stores the result.
//!
//! The rule that shapes this module: **never guess**. A wrong pairing would
//! give a message another message's UIDL, so a client that already has the
//! other message skips this one forever (lost mail, from the user's point of
//! view). An unmatched message merely gets a template UIDL and is downloaded
//! once more. So anything ambiguous stays unmatched and is reported.

use std::collections::{BTreeMap, HashMap};

use super::hash::HeaderHash;

/// A message on the old POP3 server, in its POP3 order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldMessage {
    /// Its UIDL on the old server (what clients remember).
    pub uidl: String,
    /// Octets as the old server's LIST reported them.
    pub size: u64,
    /// Header hash, when it was fetched (`TOP n 0`).
    pub hash: Option<HeaderHash>,
}

/// A message in the IMAP mailbox, in UID order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub uid: u32,
    /// RFC822.SIZE.
    pub size: u64,
    /// Header hash, when it was fetched (`BODY.PEEK[HEADER]`).
    pub hash: Option<HeaderHash>,
}

/// The result of matching, with everything the summary reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// UID → old UIDL, ascending by UID.
    pub map: BTreeMap<u32, String>,
    /// Pairs made by the size-in-order fast path.
    pub by_size: usize,
    /// Pairs made by a unique header hash (or hash and size).
    pub by_hash: usize,
    /// Old UIDLs whose header hash is shared with another message and could
    /// not be told apart by size either: left unmatched (template UIDL).
    pub ambiguous_old: Vec<String>,
    /// IMAP UIDs in the same situation.
    pub ambiguous_new: Vec<u32>,
    /// Old UIDLs with no counterpart in the IMAP mailbox.
    pub missing_in_new: Vec<String>,
    /// Old UIDLs without a header hash (a UIDL list file without hashes),
    /// which only the size fast path could have matched.
    pub no_hash: Vec<String>,
    /// IMAP UIDs with no counterpart on the old server (they keep the
    /// template UIDL, like new mail).
    pub missing_in_old: Vec<u32>,
}

/// The fast path: the same number of messages and the same size message by
/// message (POP3 order against UID order) means the mailbox was copied in
/// order, and message i is message i. `None` when that does not hold.
pub fn by_size(old: &[OldMessage], new: &[NewMessage]) -> Option<Outcome> {
    if old.len() != new.len() || old.iter().zip(new).any(|(o, n)| o.size != n.size) {
        return None;
    }
    let map: BTreeMap<u32, String> = old
        .iter()
        .zip(new)
        .map(|(o, n)| (n.uid, o.uidl.clone()))
        .collect();
    Some(Outcome {
        by_size: map.len(),
        map,
        ..Outcome::default()
    })
}

/// Matches by header hash. Every message should carry a hash; an old one
/// without is reported in `no_hash`, a new one without as missing on the
/// old side. A hash that occurs once
/// on each side pairs those two. A hash that occurs more than once on either
/// side is split by size, and pairs only where (hash, size) is unique on
/// both sides; the rest is ambiguous and stays unmatched.
pub fn by_hash(old: &[OldMessage], new: &[NewMessage]) -> Outcome {
    let mut out = Outcome::default();
    // hash → indexes, in order.
    let mut olds: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut news: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, o) in old.iter().enumerate() {
        match &o.hash {
            Some(h) => olds.entry(h).or_default().push(i),
            None => out.no_hash.push(o.uidl.clone()),
        }
    }
    for (i, n) in new.iter().enumerate() {
        match &n.hash {
            Some(h) => news.entry(h).or_default().push(i),
            None => out.missing_in_old.push(n.uid),
        }
    }
    // Walk the old side in POP3 order so reports come out in that order.
    let mut done: std::collections::HashSet<&str> = Default::default();
    for o in old {
        let Some(h) = o.hash.as_deref() else { continue };
        if !done.insert(h) {
            continue;
        }
        let os = &olds[h];
        let Some(ns) = news.get(h) else {
            out.missing_in_new
                .extend(os.iter().map(|&i| old[i].uidl.clone()));
            continue;
        };
        if os.len() == 1 && ns.len() == 1 {
            out.map.insert(new[ns[0]].uid, old[os[0]].uidl.clone());
            out.by_hash += 1;
            continue;
        }
        // Several messages share this header: try (hash, size).
        for &i in os {
            let size = old[i].size;
            let same_old = os.iter().filter(|&&k| old[k].size == size).count();
            let same_new: Vec<usize> = ns
                .iter()
                .copied()
                .filter(|&k| new[k].size == size)
                .collect();
            if same_old == 1 && same_new.len() == 1 {
                out.map.insert(new[same_new[0]].uid, old[i].uidl.clone());
                out.by_hash += 1;
            } else {
                out.ambiguous_old.push(old[i].uidl.clone());
            }
        }
        for &k in ns {
            if !out.map.contains_key(&new[k].uid) {
                out.ambiguous_new.push(new[k].uid);
            }
        }
    }
    for n in new {
        if let Some(h) = n.hash.as_deref() {
            if !olds.contains_key(h) {
                out.missing_in_old.push(n.uid);
            }
        }
    }
    out.missing_in_old.sort_unstable();
    out.ambiguous_new.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn old(uidl: &str, size: u64, hash: Option<&str>) -> OldMessage {
        OldMessage {
            uidl: uidl.into(),
            size,
            hash: hash.map(str::to_string),
        }
    }

    fn new(uid: u32, size: u64, hash: Option<&str>) -> NewMessage {
        NewMessage {
            uid,
            size,
            hash: hash.map(str::to_string),
        }
    }

    #[test]
    fn same_sizes_in_order_map_one_to_one() {
        let o = [old("a", 10, None), old("b", 20, None), old("c", 10, None)];
        let n = [new(5, 10, None), new(9, 20, None), new(12, 10, None)];
        let out = by_size(&o, &n).unwrap();
        assert_eq!(out.by_size, 3);
        assert_eq!(
            out.map.into_iter().collect::<Vec<_>>(),
            [(5, "a".into()), (9, "b".into()), (12, "c".into())]
        );
        // One size differs, or the counts differ: no fast path.
        assert!(by_size(&o, &[new(5, 10, None), new(9, 21, None), new(12, 10, None)]).is_none());
        assert!(by_size(&o[..2], &n).is_none());
        // Empty on both sides is trivially fine.
        assert_eq!(by_size(&[], &[]).unwrap().map.len(), 0);
    }

    #[test]
    fn hashes_match_out_of_order_and_with_different_sizes() {
        let o = [
            old("a", 10, Some("h1")),
            old("b", 20, Some("h2")),
            old("c", 30, Some("h3")),
        ];
        // Reordered, and each grew by a Received header.
        let n = [
            new(1, 75, Some("h3")),
            new(2, 55, Some("h1")),
            new(3, 65, Some("h2")),
        ];
        let out = by_hash(&o, &n);
        assert_eq!(out.by_hash, 3);
        assert_eq!(out.map[&1], "c");
        assert_eq!(out.map[&2], "a");
        assert_eq!(out.map[&3], "b");
        assert!(out.ambiguous_old.is_empty() && out.missing_in_new.is_empty());
    }

    #[test]
    fn identical_headers_are_reported_never_swapped() {
        // Two messages with the same header; sizes differ on the new side
        // (a Received was added), so (hash, size) cannot tell them apart.
        let o = [
            old("a", 10, Some("dup")),
            old("b", 20, Some("dup")),
            old("c", 5, Some("h")),
        ];
        let n = [
            new(1, 70, Some("dup")),
            new(2, 60, Some("dup")),
            new(3, 9, Some("h")),
        ];
        let out = by_hash(&o, &n);
        assert_eq!(out.map.len(), 1);
        assert_eq!(out.map[&3], "c");
        assert_eq!(out.ambiguous_old, ["a", "b"]);
        assert_eq!(out.ambiguous_new, [1, 2]);
        // Same header, sizes kept and distinct: (hash, size) settles it.
        let n = [
            new(1, 20, Some("dup")),
            new(2, 10, Some("dup")),
            new(3, 9, Some("h")),
        ];
        let out = by_hash(&o, &n);
        assert_eq!(out.map[&1], "b");
        assert_eq!(out.map[&2], "a");
        assert!(out.ambiguous_old.is_empty());
        // Same header and same size on both: ambiguous even though 2 = 2.
        let o = [old("a", 10, Some("dup")), old("b", 10, Some("dup"))];
        let n = [new(1, 10, Some("dup")), new(2, 10, Some("dup"))];
        let out = by_hash(&o, &n);
        assert!(out.map.is_empty());
        assert_eq!(out.ambiguous_old, ["a", "b"]);
        assert_eq!(out.ambiguous_new, [1, 2]);
    }

    #[test]
    fn messages_missing_on_either_side_are_reported() {
        let o = [
            old("a", 10, Some("h1")),
            old("gone", 20, Some("h2")),
            old("nohash", 1, None),
        ];
        let n = [
            new(1, 10, Some("h1")),
            new(2, 30, Some("extra")),
            new(3, 4, None),
        ];
        let out = by_hash(&o, &n);
        assert_eq!(out.map.len(), 1);
        assert_eq!(out.map[&1], "a");
        assert_eq!(out.missing_in_new, ["gone"]);
        assert_eq!(out.no_hash, ["nohash"]);
        assert_eq!(out.missing_in_old, [2, 3]);
        // A size fast path cannot hide a missing message: counts differ.
        assert!(by_size(&o, &n[..2]).is_none());
    }
}

/// The two failures of issue 18, as `capture` met them: each case is built
/// from message bytes (old side as the old server's LIST and TOP/RETR show
/// it, new side after the other tool moved it) and run through what
/// `capture` does with them.
#[cfg(test)]
mod issue18 {
    use super::*;
    use crate::migrate::hash::header_hash;

    /// What `capture` does with the two sides (on main: the size fast path,
    /// then header hashes).
    fn capture(old: &[(&str, Vec<u8>)], new: &[(u32, Vec<u8>)]) -> Outcome {
        let old: Vec<OldMessage> = old
            .iter()
            .map(|(uidl, m)| OldMessage {
                uidl: uidl.to_string(),
                size: m.len() as u64,
                hash: Some(header_hash(m)),
            })
            .collect();
        let new: Vec<NewMessage> = new
            .iter()
            .map(|(uid, m)| NewMessage {
                uid: *uid,
                size: m.len() as u64,
                hash: Some(header_hash(m)),
            })
            .collect();
        by_size(&old, &new).unwrap_or_else(|| by_hash(&old, &new))
    }

    fn message(subject: &str, id: &str, body: &str) -> Vec<u8> {
        format!(
            "From: sender@example.org\r\nTo: alice@example.net\r\n\
             Subject: {subject}\r\nMessage-ID: <{id}@example.org>\r\n\r\n{body}"
        )
        .into_bytes()
    }

    /// The Received field the other tool puts on top of every message it
    /// moves (in case 2).
    const RECEIVED: &str =
        "Received: from old-isp.example by migrator.example; Tue, 2 Jan 2024 00:00:00 +0000\r\n";

    fn received(m: &[u8]) -> Vec<u8> {
        let mut out = RECEIVED.as_bytes().to_vec();
        out.extend_from_slice(m);
        out
    }

    /// Case 1: the other tool moved everything byte for byte and in order,
    /// except two adjacent messages of equal size and different headers,
    /// which it swapped. Each must keep its own old UIDL.
    #[test]
    fn swapped_equal_size_neighbours_keep_their_own_uidls() {
        let m: Vec<Vec<u8>> = vec![
            message("first", "1", "one\r\n"),
            message("swap A", "A", "body A\r\n"),
            message("swap B", "B", "body B\r\n"),
            message("last", "4", "four, longer\r\n"),
        ];
        assert_eq!(m[1].len(), m[2].len(), "the swapped pair has one size");
        let old = [
            ("u1", m[0].clone()),
            ("uA", m[1].clone()),
            ("uB", m[2].clone()),
            ("u4", m[3].clone()),
        ];
        let new = [
            (11, m[0].clone()),
            (12, m[2].clone()),
            (13, m[1].clone()),
            (14, m[3].clone()),
        ];
        let out = capture(&old, &new);
        assert_eq!(
            out.map,
            BTreeMap::from([
                (11, "u1".to_string()),
                (12, "uB".to_string()),
                (13, "uA".to_string()),
                (14, "u4".to_string()),
            ]),
            "B must never be served under A's old UIDL (or A under B's)"
        );
    }

    /// Case 2: two messages with identical headers; in the old order the
    /// longer comes first, and it is longer by exactly the Received field
    /// the other tool adds to every message. After the move the shorter one
    /// has the longer one's old size. Each must keep its own old UIDL.
    #[test]
    fn identical_headers_longer_by_the_added_received_line_are_not_crossed() {
        let short = message("twins", "twin", "short body\r\n");
        let long = message(
            "twins",
            "twin",
            &format!("short body\r\n{}", "x".repeat(RECEIVED.len() - 2) + "\r\n"),
        );
        assert_eq!(long.len(), short.len() + RECEIVED.len());
        let other = message("other", "o", "other\r\n");
        let old = [
            ("uLong", long.clone()),
            ("uShort", short.clone()),
            ("uOther", other.clone()),
        ];
        let new = [
            (1, received(&long)),
            (2, received(&short)),
            (3, received(&other)),
        ];
        assert_eq!(new[1].1.len(), long.len(), "short's new size = long's old");
        let out = capture(&old, &new);
        assert_eq!(
            out.map,
            BTreeMap::from([
                (1, "uLong".to_string()),
                (2, "uShort".to_string()),
                (3, "uOther".to_string()),
            ]),
            "the short twin must never be served under the long twin's old UIDL"
        );
    }
}
