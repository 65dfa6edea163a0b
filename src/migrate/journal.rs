//! The capture's journal: every header and body hash `popbridge migrate`
//! computed, appended as it goes, so a capture that is interrupted (or run
//! again after more mail was moved) fetches only what it has not hashed
//! yet. Hashing is the expensive part of a capture: a body hash costs the
//! whole message from each server.
//!
//! `<data.dir>/uidl-maps/<stem>.hashes`:
//! ```text
//! popbridge-uidl-hashes<TAB>1<TAB>upstream=..<TAB>account=..<TAB>mailbox=..<TAB>source=..<TAB>created=UNIX
//! old<TAB><old uidl><TAB><size><TAB><header hash><TAB><body hash or ->
//! new<TAB><uidvalidity><TAB><uid><TAB><size><TAB><header hash><TAB><body hash or ->
//! ```
//! A later line for the same message replaces an earlier one. There is no
//! `end` line: the file grows while a capture runs, and a line cut short by
//! an interruption (or anything that does not parse) is dropped when the
//! journal is opened, which also rewrites it with only the lines kept.
//!
//! What makes a cached hash safe to reuse: an old server's UIDL names one
//! message for as long as it exists (RFC 1939 §7), so old records count only
//! for the old server and login they were made from (`source`), and only
//! while the size LIST reports is unchanged; an IMAP message's content never
//! changes under one UIDVALIDITY and UID (RFC 3501 §2.3.1.1), and the
//! RFC822.SIZE must agree too.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::hash::{is_body_hash, is_hash, BodyHash, HeaderHash};
use super::store::{
    header_line, is_valid_uidl, now_unix, parse_head, write_atomic, MapKey, StoreError,
};

const MAGIC: &str = "popbridge-uidl-hashes";

/// Largest journal read; a larger one is started afresh (it is a cache).
/// A line is at most some 200 octets: millions of messages.
pub const MAX_JOURNAL_BYTES: u64 = 512 * 1024 * 1024;

/// The hashes of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashes {
    /// LIST size (old) or RFC822.SIZE (IMAP) when hashed.
    pub size: u64,
    pub header: HeaderHash,
    /// `None` until the body was hashed.
    pub body: Option<BodyHash>,
}

/// An open journal: what it holds, and the file to append to.
pub struct Journal {
    path: PathBuf,
    file: std::fs::File,
    /// Old UIDL → hashes.
    old: HashMap<String, Hashes>,
    /// (UIDVALIDITY, UID) → hashes.
    new: HashMap<(u32, u32), Hashes>,
    /// Lines dropped when it was opened (cut short or unreadable).
    pub dropped: usize,
}

impl Journal {
    /// Opens the journal of `key` under `data_dir`, or starts one. With
    /// `source` (a capture), old-server records made from another source are
    /// dropped; without (an import), they are kept as they are.
    pub fn open(data_dir: &Path, key: &MapKey, source: Option<&str>) -> Result<Self, StoreError> {
        let path = key.journal_path(data_dir);
        let (kept_source, mut old, new, dropped) = match read(&path)? {
            Some(text) => parse(&text, &path, key),
            None => (None, HashMap::new(), HashMap::new(), 0),
        };
        let source = match (source, kept_source) {
            (Some(s), Some(k)) if s != k => {
                old.clear();
                s.to_string()
            }
            (Some(s), _) => s.to_string(),
            (None, k) => k.unwrap_or_default(),
        };
        let mut text = header_line(MAGIC, key, &[("source", source)], now_unix());
        for (uidl, h) in &old {
            text.push_str(&old_line(uidl, h));
        }
        for ((v, u), h) in &new {
            text.push_str(&new_line(*v, *u, h));
        }
        write_atomic(&path, text.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(Self {
            path,
            file,
            old,
            new,
            dropped,
        })
    }

    /// The hashes of an old message, if they were made at this size.
    pub fn pop3(&self, uidl: &str, size: u64) -> Option<&Hashes> {
        self.old.get(uidl).filter(|h| h.size == size)
    }

    /// The hashes of an IMAP message, if they were made at this size.
    pub fn imap(&self, uidvalidity: u32, uid: u32, size: u64) -> Option<&Hashes> {
        self.new.get(&(uidvalidity, uid)).filter(|h| h.size == size)
    }

    /// Records an old message's hashes.
    pub fn record_old(&mut self, uidl: &str, h: Hashes) -> Result<(), StoreError> {
        self.append(&old_line(uidl, &h))?;
        self.old.insert(uidl.to_string(), h);
        Ok(())
    }

    /// Records an IMAP message's hashes.
    pub fn record_new(&mut self, uidvalidity: u32, uid: u32, h: Hashes) -> Result<(), StoreError> {
        self.append(&new_line(uidvalidity, uid, &h))?;
        self.new.insert((uidvalidity, uid), h);
        Ok(())
    }

    /// One whole line per write on a file opened for appending, so an
    /// interruption leaves at worst the last line cut short.
    fn append(&mut self, line: &str) -> Result<(), StoreError> {
        self.file
            .write_all(line.as_bytes())
            .map_err(|source| StoreError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

fn old_line(uidl: &str, h: &Hashes) -> String {
    format!(
        "old\t{uidl}\t{}\t{}\t{}\n",
        h.size,
        h.header,
        h.body.as_deref().unwrap_or("-")
    )
}

fn new_line(uidvalidity: u32, uid: u32, h: &Hashes) -> String {
    format!(
        "new\t{uidvalidity}\t{uid}\t{}\t{}\t{}\n",
        h.size,
        h.header,
        h.body.as_deref().unwrap_or("-")
    )
}

/// The file's text, `None` if it does not exist or cannot be used whole
/// (too large, not UTF-8): a cache is then started afresh.
fn read(path: &Path) -> Result<Option<String>, StoreError> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StoreError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mut bytes = Vec::new();
    file.take(MAX_JOURNAL_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > MAX_JOURNAL_BYTES {
        return Ok(None);
    }
    Ok(String::from_utf8(bytes).ok())
}

type Parsed = (
    Option<String>,
    HashMap<String, Hashes>,
    HashMap<(u32, u32), Hashes>,
    usize,
);

/// The records of a journal made for `key`: (source, old, new, lines
/// dropped). A journal for another account (or with a bad first line)
/// yields nothing.
fn parse(text: &str, path: &Path, key: &MapKey) -> Parsed {
    let mut old = HashMap::new();
    let mut new = HashMap::new();
    let mut dropped = 0;
    // Only whole lines: a last line without its newline was cut short.
    let (whole, cut) = match text.rfind('\n') {
        Some(i) => (&text[..i], !text[i + 1..].is_empty()),
        None => ("", !text.is_empty()),
    };
    dropped += usize::from(cut);
    let mut lines = whole.split('\n');
    let source = match lines.next().map(|l| parse_head(l, path, MAGIC)) {
        Some(Ok((k, mut extra, _))) if k == *key => extra.remove("source"),
        _ => return (None, old, new, dropped + whole.split('\n').count()),
    };
    for line in lines {
        let f: Vec<&str> = line.split('\t').collect();
        let hashes = |size: &str, header: &str, body: &str| -> Option<Hashes> {
            Some(Hashes {
                size: size.parse().ok()?,
                header: is_hash(header).then(|| header.to_string())?,
                body: match body {
                    "-" => None,
                    b if is_body_hash(b) => Some(b.to_string()),
                    _ => return None,
                },
            })
        };
        let ok = match f.as_slice() {
            ["old", uidl, size, header, body] if is_valid_uidl(uidl) => {
                hashes(size, header, body).map(|h| old.insert(uidl.to_string(), h))
            }
            ["new", v, uid, size, header, body] => match (v.parse::<u32>(), uid.parse::<u32>()) {
                (Ok(v), Ok(u)) if u > 0 => {
                    hashes(size, header, body).map(|h| new.insert((v, u), h))
                }
                _ => None,
            },
            _ => None,
        };
        if ok.is_none() {
            dropped += 1;
        }
    }
    (source, old, new, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(size: u64, body: bool) -> Hashes {
        Hashes {
            size,
            header: "0123456789abcdef0123456789abcdef".into(),
            body: body.then(|| "ab".repeat(32)),
        }
    }

    #[test]
    fn records_survive_a_reopen_and_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let key = MapKey::new("h:143", "alice", "INBOX");
        let mut j = Journal::open(dir.path(), &key, Some("pop3://old user a")).unwrap();
        j.record_old("u1", h(10, false)).unwrap();
        j.record_old("u1", h(10, true)).unwrap();
        j.record_old("u2", h(20, true)).unwrap();
        j.record_new(7, 1, h(30, true)).unwrap();
        drop(j);
        // An interruption in the middle of a line.
        let path = key.journal_path(dir.path());
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"new\t7\t2\t40\t0123").unwrap();
        drop(f);
        let j = Journal::open(dir.path(), &key, Some("pop3://old user a")).unwrap();
        assert_eq!(j.dropped, 1);
        assert_eq!(j.pop3("u1", 10), Some(&h(10, true)), "the later line wins");
        assert_eq!(j.pop3("u1", 11), None, "another size: hashed again");
        assert_eq!(j.pop3("u2", 20), Some(&h(20, true)));
        assert_eq!(j.imap(7, 1, 30), Some(&h(30, true)));
        assert_eq!(j.imap(8, 1, 30), None, "another UIDVALIDITY");
        assert_eq!(j.imap(7, 2, 40), None);
        // The reopen rewrote the file without the torn line: appending goes
        // on cleanly.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with('\n') && !text.contains("\t0123\n"), "{text}");
        assert_eq!(text.lines().count(), 4, "{text}");
        // Another old server (or login): its UIDLs mean other messages.
        let j = Journal::open(dir.path(), &key, Some("pop3://other user a")).unwrap();
        assert_eq!(j.pop3("u2", 20), None);
        assert_eq!(j.imap(7, 1, 30), Some(&h(30, true)));
        drop(j);
        // An import keeps what is there.
        let mut j = Journal::open(dir.path(), &key, None).unwrap();
        j.record_old("u3", h(1, true)).unwrap();
        drop(j);
        let j = Journal::open(dir.path(), &key, Some("pop3://other user a")).unwrap();
        assert_eq!(j.pop3("u3", 1), Some(&h(1, true)));
    }

    #[test]
    fn garbage_and_other_accounts_are_never_used() {
        let dir = tempfile::tempdir().unwrap();
        let key = MapKey::new("h:143", "alice", "INBOX");
        let path = key.journal_path(dir.path());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let bob = MapKey::new("h:143", "bob", "INBOX");
        let mut text = header_line(MAGIC, &bob, &[("source", "s".into())], 1);
        text.push_str(&old_line("u1", &h(1, true)));
        std::fs::write(&path, &text).unwrap();
        let j = Journal::open(dir.path(), &key, Some("s")).unwrap();
        assert_eq!(j.pop3("u1", 1), None, "made for bob");
        drop(j);
        let mut text = header_line(MAGIC, &key, &[("source", "s".into())], 1);
        for bad in [
            "old\tu1\t1\tnothex\t-\n",
            "old\tu 1\t1\t0123456789abcdef0123456789abcdef\t-\n",
            "new\t1\t0\t1\t0123456789abcdef0123456789abcdef\t-\n",
            "new\t1\t2\t1\t0123456789abcdef0123456789abcdef\tshort\n",
            "what\n",
        ] {
            text.push_str(bad);
        }
        std::fs::write(&path, &text).unwrap();
        let j = Journal::open(dir.path(), &key, Some("s")).unwrap();
        assert_eq!(j.dropped, 5);
        assert!(j.old.is_empty() && j.new.is_empty());
        std::fs::write(&path, b"\xff\xfe").unwrap();
        assert!(Journal::open(dir.path(), &key, Some("s")).is_ok());
    }
}
