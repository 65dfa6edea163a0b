//! Which IMAP message is which old POP3 message: by content, header and
//! body, never by position or size.
//!
//! No I/O: the caller lists both sides, hashes headers, asks
//! [`needs_body`] which messages need a body hash, hashes those bodies, and
//! stores what [`pair`] returns.
//!
//! The rule that shapes this module: **a pairing can never hide a
//! message**. A client that keeps mail on the server skips every message
//! whose UIDL it has seen; serve message B under message A's old UIDL and a
//! client that had A but not B never gets B. So a message is given an old
//! UIDL only when the two carry the same content: the same header hash
//! (volatile fields such as `Received:` left out, [`super::hash`]) **and**
//! the same body hash. Sizes and positions are never evidence: another tool
//! adds header lines (so sizes change) and may reorder (so positions lie),
//! and two different messages can share a size. An unmatched message
//! merely gets a template UIDL and is downloaded once more.
//!
//! Messages with the same content (same header hash and body hash) cannot
//! be told apart. When a content occurs as often on the old server as in
//! the mailbox, its copies are paired in order (POP3 order with UID order),
//! which hides nothing: whichever copy a client gets under the old UIDL it
//! remembers has exactly the content of the one it fetched, so a client
//! that had *s* of the *k* copies skips *s* and downloads the other
//! *k* − *s*, and ends with *k* copies of that content, as many as the
//! mailbox holds. (What can differ between such copies are only the fields
//! the header hash leaves out: trace fields such as `Received:` and
//! `Return-Path:`, and mbox bookkeeping such as `Status:`.) When the counts
//! differ (another tool dropped or added a copy), nothing in the group is
//! paired: every copy keeps a template UIDL and is downloaded once more, and
//! the summary names the group so an operator can look.

use std::collections::{BTreeMap, HashMap};

use super::hash::{BodyHash, HeaderHash};

/// A message on the old POP3 server, in its POP3 order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldMessage {
    /// Its UIDL on the old server (what clients remember).
    pub uidl: String,
    /// Octets as the old server's LIST reported them (reported, and a
    /// check on cached hashes; never evidence for a pairing).
    pub size: u64,
    /// Header hash (`TOP n 0` or `RETR`).
    pub hash: Option<HeaderHash>,
    /// Body hash (`RETR`), when it was needed.
    pub body: Option<BodyHash>,
}

/// A message in the IMAP mailbox, in UID order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub uid: u32,
    /// RFC822.SIZE (reported only).
    pub size: u64,
    /// Header hash (`BODY.PEEK[HEADER]` or `BODY.PEEK[]`).
    pub hash: Option<HeaderHash>,
    /// Body hash (`BODY.PEEK[]`), when it was needed.
    pub body: Option<BodyHash>,
}

/// Old UIDLs and IMAP UIDs that [`pair`] reports together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Group {
    /// Old UIDLs, in POP3 order.
    pub old: Vec<String>,
    /// IMAP UIDs, ascending.
    pub new: Vec<u32>,
    /// Whether the group's messages were paired (in order).
    pub paired: bool,
}

/// The result of matching, with everything the summary reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// UID → old UIDL, ascending by UID.
    pub map: BTreeMap<u32, String>,
    /// Pairs of a content that occurs once on each side.
    pub by_content: usize,
    /// Contents that occur more than once on a side (and on both sides):
    /// copies that cannot be told apart. Paired in order when the counts are
    /// equal, else left unmatched. In POP3 order of their first old copy.
    pub identical: Vec<Group>,
    /// Messages with one header hash on both sides whose bodies match
    /// nothing on the other side (another tool changed the body, or a
    /// different message carries the same header): not paired.
    pub other_body: Vec<Group>,
    /// Old UIDLs whose header occurs nowhere in the IMAP mailbox, or whose
    /// content does not while no IMAP message with that header is left.
    pub missing_in_new: Vec<String>,
    /// Old UIDLs without a header or body hash (an old list file without
    /// them): never paired.
    pub no_hash: Vec<String>,
    /// IMAP UIDs with no counterpart on the old server (they keep the
    /// template UIDL, like new mail).
    pub missing_in_old: Vec<u32>,
}

impl Outcome {
    /// Old UIDLs paired inside identical groups.
    pub fn identical_paired(&self) -> usize {
        self.identical
            .iter()
            .filter(|g| g.paired)
            .map(|g| g.new.len())
            .sum()
    }

    /// IMAP messages that keep a template UIDL although a message with the
    /// same header is on the old server: a client that had that one
    /// downloads them once more at the cut-over. (Messages only in the
    /// mailbox are downloaded too, as any new mail is.)
    pub fn redownloads(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .identical
            .iter()
            .filter(|g| !g.paired)
            .chain(&self.other_body)
            .flat_map(|g| g.new.iter().copied())
            .collect();
        v.sort_unstable();
        v
    }
}

/// The messages whose body must be hashed before [`pair`]: those whose
/// header hash occurs on both sides (no other message can be paired, so no
/// other body is worth fetching). Indexes into `old` and `new`.
pub fn needs_body(old: &[OldMessage], new: &[NewMessage]) -> (Vec<usize>, Vec<usize>) {
    let olds: std::collections::HashSet<&str> =
        old.iter().filter_map(|m| m.hash.as_deref()).collect();
    let news: std::collections::HashSet<&str> =
        new.iter().filter_map(|m| m.hash.as_deref()).collect();
    let o = (0..old.len())
        .filter(|&i| old[i].hash.as_deref().is_some_and(|h| news.contains(h)))
        .collect();
    let n = (0..new.len())
        .filter(|&i| new[i].hash.as_deref().is_some_and(|h| olds.contains(h)))
        .collect();
    (o, n)
}

/// Pairs old and new messages by content (header hash and body hash; see
/// the module documentation). `old` in POP3 order, `new` in UID order.
pub fn pair(old: &[OldMessage], new: &[NewMessage]) -> Outcome {
    let mut out = Outcome::default();
    // Header hash → indexes, in order.
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
        pair_header_group(old, new, os, ns, &mut out);
    }
    for n in new {
        if let Some(h) = n.hash.as_deref() {
            if !olds.contains_key(h) {
                out.missing_in_old.push(n.uid);
            }
        }
    }
    out.missing_in_old.sort_unstable();
    out
}

/// The messages of one header hash, present on both sides: pairs by body.
fn pair_header_group(
    old: &[OldMessage],
    new: &[NewMessage],
    os: &[usize],
    ns: &[usize],
    out: &mut Outcome,
) {
    // Body hash → indexes, in order; without a body hash: left over.
    let mut by_body: Vec<(&str, Vec<usize>, Vec<usize>)> = Vec::new();
    let mut slot: HashMap<&str, usize> = HashMap::new();
    let mut old_left: Vec<usize> = Vec::new();
    let mut new_left: Vec<usize> = Vec::new();
    for &i in os {
        match old[i].body.as_deref() {
            Some(b) => {
                let k = *slot.entry(b).or_insert_with(|| {
                    by_body.push((b, Vec::new(), Vec::new()));
                    by_body.len() - 1
                });
                by_body[k].1.push(i);
            }
            None => out.no_hash.push(old[i].uidl.clone()),
        }
    }
    for &i in ns {
        match new[i].body.as_deref().and_then(|b| slot.get(b)) {
            Some(&k) => by_body[k].2.push(i),
            None => new_left.push(i),
        }
    }
    for (_, o, n) in by_body {
        match (o.len(), n.len()) {
            (_, 0) => old_left.extend(o),
            (1, 1) => {
                out.map.insert(new[n[0]].uid, old[o[0]].uidl.clone());
                out.by_content += 1;
            }
            (k, m) => {
                let paired = k == m;
                if paired {
                    for (&oi, &ni) in o.iter().zip(&n) {
                        out.map.insert(new[ni].uid, old[oi].uidl.clone());
                    }
                }
                out.identical.push(Group {
                    old: o.iter().map(|&i| old[i].uidl.clone()).collect(),
                    new: n.iter().map(|&i| new[i].uid).collect(),
                    paired,
                });
            }
        }
    }
    match (old_left.is_empty(), new_left.is_empty()) {
        (_, true) => out
            .missing_in_new
            .extend(old_left.iter().map(|&i| old[i].uidl.clone())),
        (true, false) => out
            .missing_in_old
            .extend(new_left.iter().map(|&i| new[i].uid)),
        (false, false) => {
            old_left.sort_unstable();
            out.other_body.push(Group {
                old: old_left.iter().map(|&i| old[i].uidl.clone()).collect(),
                new: new_left.iter().map(|&i| new[i].uid).collect(),
                paired: false,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn old(uidl: &str, hash: Option<&str>, body: Option<&str>) -> OldMessage {
        OldMessage {
            uidl: uidl.into(),
            size: 0,
            hash: hash.map(str::to_string),
            body: body.map(str::to_string),
        }
    }

    fn new(uid: u32, hash: Option<&str>, body: Option<&str>) -> NewMessage {
        NewMessage {
            uid,
            size: 0,
            hash: hash.map(str::to_string),
            body: body.map(str::to_string),
        }
    }

    #[test]
    fn content_pairs_out_of_order() {
        let o = [
            old("a", Some("h1"), Some("b1")),
            old("b", Some("h2"), Some("b2")),
            old("c", Some("h3"), Some("b3")),
        ];
        let n = [
            new(1, Some("h3"), Some("b3")),
            new(2, Some("h1"), Some("b1")),
            new(3, Some("h2"), Some("b2")),
        ];
        let out = pair(&o, &n);
        assert_eq!(out.by_content, 3);
        assert_eq!(out.map[&1], "c");
        assert_eq!(out.map[&2], "a");
        assert_eq!(out.map[&3], "b");
        assert!(out.identical.is_empty() && out.other_body.is_empty());
        assert!(out.missing_in_new.is_empty() && out.missing_in_old.is_empty());
        assert!(out.redownloads().is_empty());
    }

    #[test]
    fn one_header_is_told_apart_by_the_body() {
        let o = [
            old("a", Some("dup"), Some("x")),
            old("b", Some("dup"), Some("y")),
        ];
        let n = [
            new(1, Some("dup"), Some("y")),
            new(2, Some("dup"), Some("x")),
        ];
        let out = pair(&o, &n);
        assert_eq!(out.by_content, 2);
        assert_eq!(out.map[&1], "b");
        assert_eq!(out.map[&2], "a");
    }

    #[test]
    fn one_header_without_a_matching_body_is_never_paired() {
        // A unique header on both sides is not enough: the bodies differ
        // (another tool changed it, or it is another message).
        let o = [
            old("a", Some("h"), Some("x")),
            old("z", Some("h2"), Some("q")),
        ];
        let n = [new(1, Some("h"), Some("x2")), new(2, Some("h2"), Some("q"))];
        let out = pair(&o, &n);
        assert_eq!(out.map, BTreeMap::from([(2, "z".to_string())]));
        assert_eq!(
            out.other_body,
            [Group {
                old: vec!["a".into()],
                new: vec![1],
                paired: false
            }]
        );
        assert_eq!(out.redownloads(), [1]);
        // Partly: one body matches, the others are left over together.
        let o = [
            old("a", Some("h"), Some("x")),
            old("b", Some("h"), Some("y")),
            old("c", Some("h"), Some("z")),
        ];
        let n = [
            new(1, Some("h"), Some("y")),
            new(2, Some("h"), Some("w")),
            new(3, Some("h"), Some("v")),
        ];
        let out = pair(&o, &n);
        assert_eq!(out.map, BTreeMap::from([(1, "b".to_string())]));
        assert_eq!(out.other_body[0].old, ["a", "c"]);
        assert_eq!(out.other_body[0].new, [2, 3]);
        // Left over on one side only: missing there, not "other body".
        let n = [new(1, Some("h"), Some("y"))];
        let out = pair(&o, &n);
        assert_eq!(out.missing_in_new, ["a", "c"]);
        assert!(out.other_body.is_empty() && out.redownloads().is_empty());
        let out = pair(
            &o[1..2],
            &[new(1, Some("h"), Some("y")), new(2, Some("h"), Some("v"))],
        );
        assert_eq!(out.missing_in_old, [2]);
    }

    #[test]
    fn identical_copies_pair_in_order_only_when_the_counts_agree() {
        let o = [
            old("a", Some("h"), Some("x")),
            old("m", Some("k"), Some("k")),
            old("b", Some("h"), Some("x")),
        ];
        let n = [
            new(7, Some("h"), Some("x")),
            new(8, Some("k"), Some("k")),
            new(9, Some("h"), Some("x")),
        ];
        let out = pair(&o, &n);
        assert_eq!(out.map[&7], "a");
        assert_eq!(out.map[&9], "b");
        assert_eq!(out.map[&8], "m");
        assert_eq!(out.by_content, 1);
        assert_eq!(out.identical_paired(), 2);
        assert_eq!(
            out.identical,
            [Group {
                old: vec!["a".into(), "b".into()],
                new: vec![7, 9],
                paired: true
            }]
        );
        assert!(out.redownloads().is_empty());
        // Another tool dropped a copy: 2 old, 1 new: nothing paired.
        let out = pair(&o, &n[..2]);
        assert_eq!(out.map, BTreeMap::from([(8, "m".to_string())]));
        assert_eq!(
            out.identical,
            [Group {
                old: vec!["a".into(), "b".into()],
                new: vec![7],
                paired: false
            }]
        );
        assert_eq!(out.redownloads(), [7]);
        // ... or added one: 1 old, 2 new.
        let out = pair(&o[..2], &n);
        assert_eq!(out.identical[0].old, ["a"]);
        assert_eq!(out.identical[0].new, [7, 9]);
        assert!(!out.identical[0].paired);
        assert_eq!(out.redownloads(), [7, 9]);
    }

    #[test]
    fn messages_missing_on_either_side_or_without_hashes_are_reported() {
        let o = [
            old("a", Some("h1"), Some("b1")),
            old("gone", Some("h2"), None),
            old("nohash", None, None),
            old("nobody", Some("h3"), None),
        ];
        let n = [
            new(1, Some("h1"), Some("b1")),
            new(2, Some("extra"), None),
            new(3, None, None),
            new(4, Some("h3"), Some("b3")),
        ];
        let out = pair(&o, &n);
        assert_eq!(out.map, BTreeMap::from([(1, "a".to_string())]));
        assert_eq!(out.missing_in_new, ["gone"]);
        assert_eq!(out.no_hash, ["nohash", "nobody"]);
        assert_eq!(out.missing_in_old, [2, 3, 4]);
        assert!(out.redownloads().is_empty());
    }

    #[test]
    fn only_messages_with_a_header_on_both_sides_need_a_body() {
        let o = [
            old("a", Some("h1"), None),
            old("b", Some("h2"), None),
            old("c", None, None),
        ];
        let n = [
            new(1, Some("h2"), None),
            new(2, Some("h9"), None),
            new(3, None, None),
        ];
        assert_eq!(needs_body(&o, &n), (vec![1], vec![0]));
    }
}

/// The two failures of issue 18, as `capture` met them: each case is built
/// from message bytes (old side as the old server's LIST and TOP/RETR show
/// it, new side after the other tool moved it) and run through what
/// `capture` does with them.
#[cfg(test)]
mod issue18 {
    use super::*;
    use crate::migrate::hash::{body_hash, header_hash};

    /// What `capture` does with the two sides: header hashes, then body
    /// hashes where a header occurs on both sides, then [`pair`]. (On the
    /// code before issue 18: a size-in-order fast path, then header
    /// hashes split by size; both tests failed there.)
    fn capture(old: &[(&str, Vec<u8>)], new: &[(u32, Vec<u8>)]) -> Outcome {
        let mut o: Vec<OldMessage> = old
            .iter()
            .map(|(uidl, m)| OldMessage {
                uidl: uidl.to_string(),
                size: m.len() as u64,
                hash: Some(header_hash(m)),
                body: None,
            })
            .collect();
        let mut n: Vec<NewMessage> = new
            .iter()
            .map(|(uid, m)| NewMessage {
                uid: *uid,
                size: m.len() as u64,
                hash: Some(header_hash(m)),
                body: None,
            })
            .collect();
        let (oi, ni) = needs_body(&o, &n);
        for i in oi {
            o[i].body = Some(body_hash(&old[i].1));
        }
        for i in ni {
            n[i].body = Some(body_hash(&new[i].1));
        }
        pair(&o, &n)
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
