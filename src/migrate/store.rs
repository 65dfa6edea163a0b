//! The UIDL map store: one pair of small text files per account under
//! `<data.dir>/uidl-maps/`, needing no server. Read-mostly: `popbridge
//! migrate` writes a map once; every popbridge replica reads it (see
//! [`super::runtime`]).
//!
//! Files (`<stem>` is [`MapKey::file_stem`], a hash of upstream, account and mailbox,
//! because account names may contain any character):
//! - `<stem>.map`, read at login: which IMAP UID has which old UIDL.
//!   ```text
//!   popbridge-uidl-map<TAB>1<TAB>upstream=..<TAB>account=..<TAB>mailbox=..<TAB>uidvalidity=N<TAB>redownloads=N<TAB>created=UNIX
//!   <uid><TAB><old uidl>            (ascending UIDs)
//!   end<TAB><number of entries>
//!   ```
//!   `redownloads=` (since issue 18) counts the messages `capture` left
//!   with template UIDLs although a message with their header is on the old
//!   server: clients that had it download them once more. Maps written
//!   before it have no such field; readers ignore header fields they do not
//!   know, so a map with it loads in older popbridge versions too.
//! - `<stem>.old`, read only by `popbridge migrate`: the old server's list as
//!   captured, so the map can be rebuilt without the old server.
//!   ```text
//!   popbridge-uidl-old<TAB>1<TAB>upstream=..<TAB>account=..<TAB>mailbox=..<TAB>source=..<TAB>created=UNIX
//!   <old uidl><TAB><size><TAB><header hash or -><TAB><body hash or ->   (POP3 order)
//!   end<TAB><number of messages>
//!   ```
//!
//! - `<stem>.hashes`, read only by `popbridge migrate`: the hashes computed
//!   so far, so an interrupted capture resumes ([`super::journal`]).
//!
//! Header values are percent-encoded (every octet outside 0x21-0x7E, and `%`
//! and `=`). The `end` line makes a truncated file detectable: without it the
//! file is refused as a whole, never used in part. Files are replaced
//! atomically (temporary file in the same directory, fsync, rename, fsync of
//! the directory), so a reader sees the old file or the new one.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::hash::{is_body_hash, is_hash, BodyHash, HeaderHash};
use super::matching::OldMessage;
use crate::pop3::uidl::MAX_UIDL_LEN;

/// Sub-directory of `data.dir` that holds the maps.
pub const MAPS_DIR: &str = "uidl-maps";

/// The format version written and understood.
pub const FORMAT_VERSION: u32 = 1;

/// Largest `.map` file read. An entry is at most 10 + 1 + 70 + 1 octets, so
/// this holds well over half a million messages for one account (and
/// typically two million); a larger file is refused rather than read.
pub const MAX_MAP_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Largest `.old` file read (an entry adds a size, a 32-digit header hash
/// and a 64-digit body hash).
pub const MAX_OLD_FILE_BYTES: u64 = 256 * 1024 * 1024;

const MAP_MAGIC: &str = "popbridge-uidl-map";
const OLD_MAGIC: &str = "popbridge-uidl-old";

/// Why a map file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: larger than {limit} octets; refused")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{path}: line {line}: {why}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        why: String,
    },
}

/// RFC 1939 §7: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
pub fn is_valid_uidl(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_UIDL_LEN && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// Which account a map belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapKey {
    /// The IMAP server's `host:port`, as configured for the route.
    pub upstream: String,
    /// The IMAP login name (after the route's `login` rule). Compared
    /// case-insensitively: stored lower-case.
    pub account: String,
    /// The mailbox POP3 sessions see.
    pub mailbox: String,
}

impl MapKey {
    pub fn new(upstream: &str, account: &str, mailbox: &str) -> Self {
        Self {
            upstream: upstream.to_string(),
            account: account.to_lowercase(),
            mailbox: mailbox.to_string(),
        }
    }

    /// The file name stem: 32 hex digits of SHA-256 over the three parts.
    pub fn file_stem(&self) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [&self.upstream, &self.account, &self.mailbox] {
            ctx.update(part.as_bytes());
            ctx.update(b"\0");
        }
        hex::encode(&ctx.finish().as_ref()[..16])
    }

    /// `<dir>/uidl-maps/<stem>.map`.
    pub fn map_path(&self, data_dir: &Path) -> PathBuf {
        data_dir
            .join(MAPS_DIR)
            .join(format!("{}.map", self.file_stem()))
    }

    /// `<dir>/uidl-maps/<stem>.hashes`: the capture's journal
    /// ([`super::journal`]).
    pub fn journal_path(&self, data_dir: &Path) -> PathBuf {
        data_dir
            .join(MAPS_DIR)
            .join(format!("{}.hashes", self.file_stem()))
    }

    /// `<dir>/uidl-maps/<stem>.old`.
    pub fn old_path(&self, data_dir: &Path) -> PathBuf {
        data_dir
            .join(MAPS_DIR)
            .join(format!("{}.old", self.file_stem()))
    }
}

/// A parsed `.map` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidlMap {
    pub key: MapKey,
    /// UIDVALIDITY of the mailbox the UIDs belong to.
    pub uidvalidity: u32,
    /// Seconds since the Unix epoch when the map was written.
    pub created: u64,
    /// Messages that will be downloaded once more at the cut-over (see the
    /// module documentation); `None` in maps written before it was kept.
    pub redownloads: Option<u64>,
    /// UID → old UIDL.
    pub entries: BTreeMap<u32, String>,
}

/// A parsed `.old` file: the old server's listing as captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldList {
    pub key: MapKey,
    /// Where it came from (old server URL and user), for people.
    pub source: String,
    pub created: u64,
    pub messages: Vec<OldMessage>,
}

fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'%' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn dec(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

pub(super) fn header_line(
    magic: &str,
    key: &MapKey,
    extra: &[(&str, String)],
    created: u64,
) -> String {
    let mut s = format!(
        "{magic}\t{FORMAT_VERSION}\tupstream={}\taccount={}\tmailbox={}",
        enc(&key.upstream),
        enc(&key.account),
        enc(&key.mailbox),
    );
    for (k, v) in extra {
        s.push_str(&format!("\t{k}={}", enc(v)));
    }
    s.push_str(&format!("\tcreated={created}\n"));
    s
}

impl UidlMap {
    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut extra = vec![("uidvalidity", self.uidvalidity.to_string())];
        if let Some(n) = self.redownloads {
            extra.push(("redownloads", n.to_string()));
        }
        let mut s = header_line(MAP_MAGIC, &self.key, &extra, self.created);
        for (uid, uidl) in &self.entries {
            s.push_str(&format!("{uid}\t{uidl}\n"));
        }
        s.push_str(&format!("end\t{}\n", self.entries.len()));
        s.into_bytes()
    }

    /// Parses a `.map` file; `path` is for error messages.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, StoreError> {
        let (head, lines) = split_file(bytes, path, MAP_MAGIC)?;
        let corrupt = |line: usize, why: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            line,
            why,
        };
        let uidvalidity = head
            .extra
            .get("uidvalidity")
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or_else(|| corrupt(1, "no valid uidvalidity".into()))?;
        let redownloads = match head.extra.get("redownloads") {
            None => None,
            Some(v) => Some(
                v.parse::<u64>()
                    .map_err(|_| corrupt(1, "bad redownloads=".into()))?,
            ),
        };
        let mut entries = BTreeMap::new();
        let mut last = 0u32;
        for (n, line) in lines {
            let (uid, uidl) = line
                .split_once('\t')
                .ok_or_else(|| corrupt(n, "expected <uid><TAB><uidl>".into()))?;
            let uid: u32 = uid
                .parse()
                .ok()
                .filter(|&u| u > last)
                .ok_or_else(|| corrupt(n, format!("UID {uid:?} is not ascending")))?;
            if !is_valid_uidl(uidl) {
                return Err(corrupt(n, "not a valid UIDL (RFC 1939 §7)".into()));
            }
            last = uid;
            entries.insert(uid, uidl.to_string());
        }
        if entries.len() != head.count {
            return Err(corrupt(
                head.end_line,
                format!("end says {} entries, found {}", head.count, entries.len()),
            ));
        }
        Ok(Self {
            key: head.key,
            uidvalidity,
            created: head.created,
            redownloads,
            entries,
        })
    }

    /// Reads and parses a `.map` file (at most [`MAX_MAP_FILE_BYTES`]).
    /// `Ok(None)` when it does not exist.
    pub fn load(path: &Path) -> Result<Option<Self>, StoreError> {
        match read_limited(path, MAX_MAP_FILE_BYTES)? {
            None => Ok(None),
            Some(bytes) => Self::parse(&bytes, path).map(Some),
        }
    }
}

impl OldList {
    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut s = header_line(
            OLD_MAGIC,
            &self.key,
            &[("source", self.source.clone())],
            self.created,
        );
        for m in &self.messages {
            s.push_str(&format!(
                "{}\t{}\t{}\t{}\n",
                m.uidl,
                m.size,
                m.hash.as_deref().unwrap_or("-"),
                m.body.as_deref().unwrap_or("-"),
            ));
        }
        s.push_str(&format!("end\t{}\n", self.messages.len()));
        s.into_bytes()
    }

    /// Parses a `.old` file.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, StoreError> {
        let (head, lines) = split_file(bytes, path, OLD_MAGIC)?;
        let mut messages = Vec::new();
        for (n, line) in lines {
            messages.push(parse_old_line(line).map_err(|why| StoreError::Corrupt {
                path: path.to_path_buf(),
                line: n,
                why,
            })?);
        }
        if messages.len() != head.count {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                line: head.end_line,
                why: format!("end says {} messages, found {}", head.count, messages.len()),
            });
        }
        Ok(Self {
            key: head.key,
            source: head.extra.get("source").cloned().unwrap_or_default(),
            created: head.created,
            messages,
        })
    }

    /// Reads and parses a `.old` file; `Ok(None)` when it does not exist.
    pub fn load(path: &Path) -> Result<Option<Self>, StoreError> {
        match read_limited(path, MAX_OLD_FILE_BYTES)? {
            None => Ok(None),
            Some(bytes) => Self::parse(&bytes, path).map(Some),
        }
    }
}

/// One old-list line: `uidl<TAB>size[<TAB>hash|-[<TAB>body hash|-]]` (also
/// the format of the UIDL list files `popbridge migrate import` reads, where
/// the separator may be any white space). Lists written before body hashes
/// existed have three fields.
pub fn parse_old_line(line: &str) -> Result<OldMessage, String> {
    let mut parts = line.split(['\t', ' ']).filter(|p| !p.is_empty());
    let uidl = parts.next().ok_or("empty line")?;
    if !is_valid_uidl(uidl) {
        return Err(format!("{uidl:?} is not a valid UIDL (RFC 1939 §7)"));
    }
    let size = parts
        .next()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or("expected <uidl> <size> [<header hash> [<body hash>]]")?;
    let hash = match parts.next() {
        None | Some("-") => None,
        Some(h) if is_hash(h) => Some(h.to_string() as HeaderHash),
        Some(h) => return Err(format!("{h:?} is not a header hash (32 hex digits)")),
    };
    let body = match parts.next() {
        None | Some("-") => None,
        Some(h) if is_body_hash(h) => Some(h.to_string() as BodyHash),
        Some(h) => return Err(format!("{h:?} is not a body hash (64 hex digits)")),
    };
    if parts.next().is_some() {
        return Err("too many fields".into());
    }
    Ok(OldMessage {
        uidl: uidl.to_string(),
        size,
        hash,
        body,
    })
}

/// The common header line and `end` trailer.
struct Head {
    key: MapKey,
    extra: std::collections::HashMap<String, String>,
    created: u64,
    count: usize,
    end_line: usize,
}

/// Body lines with their line numbers (1-based).
type Lines<'a> = Vec<(usize, &'a str)>;

/// Checks magic, version, header fields and the trailer; returns the header
/// and the numbered body lines in between.
fn split_file<'a>(
    bytes: &'a [u8],
    path: &Path,
    magic: &str,
) -> Result<(Head, Lines<'a>), StoreError> {
    let corrupt = |line: usize, why: &str| StoreError::Corrupt {
        path: path.to_path_buf(),
        line,
        why: why.to_string(),
    };
    let text = std::str::from_utf8(bytes).map_err(|_| corrupt(0, "not UTF-8"))?;
    let Some(body) = text.strip_suffix('\n') else {
        return Err(corrupt(0, "truncated (no final newline)"));
    };
    let mut lines: Vec<(usize, &str)> = body.split('\n').zip(1..).map(|(l, n)| (n, l)).collect();
    if lines.len() < 2 {
        return Err(corrupt(0, "truncated (no end line)"));
    }
    let (_, first) = lines.remove(0);
    let (end_line, last) = lines.pop().unwrap_or((0, ""));
    let (key, extra, created) = parse_head(first, path, magic)?;
    let count = last
        .strip_prefix("end\t")
        .and_then(|c| c.parse::<usize>().ok())
        .ok_or_else(|| corrupt(end_line, "truncated (no end line)"))?;
    Ok((
        Head {
            key,
            extra,
            created,
            count,
            end_line,
        },
        lines,
    ))
}

/// A file's first line: magic, version, account, the other `name=value`
/// fields (percent-decoded) and `created`.
pub(super) fn parse_head(
    first: &str,
    path: &Path,
    magic: &str,
) -> Result<(MapKey, std::collections::HashMap<String, String>, u64), StoreError> {
    let corrupt = |line: usize, why: &str| StoreError::Corrupt {
        path: path.to_path_buf(),
        line,
        why: why.to_string(),
    };
    let mut fields = first.split('\t');
    if fields.next() != Some(magic) {
        return Err(corrupt(1, &format!("not a {magic} file")));
    }
    match fields.next().and_then(|v| v.parse::<u32>().ok()) {
        Some(FORMAT_VERSION) => {}
        Some(v) => {
            return Err(corrupt(
                1,
                &format!("format version {v}; this popbridge reads {FORMAT_VERSION}"),
            ))
        }
        None => return Err(corrupt(1, "no format version")),
    }
    let mut extra = std::collections::HashMap::new();
    for f in fields {
        let (k, v) = f.split_once('=').ok_or_else(|| corrupt(1, "bad field"))?;
        let v = dec(v).ok_or_else(|| corrupt(1, "bad percent-encoding"))?;
        extra.insert(k.to_string(), v);
    }
    let mut take = |k: &str| {
        extra
            .remove(k)
            .ok_or_else(|| corrupt(1, &format!("no {k}=")))
    };
    let key = MapKey {
        upstream: take("upstream")?,
        account: take("account")?,
        mailbox: take("mailbox")?,
    };
    let created = take("created")?
        .parse()
        .map_err(|_| corrupt(1, "bad created="))?;
    Ok((key, extra, created))
}

/// Reads at most `limit` octets; `Ok(None)` when the file does not exist.
fn read_limited(path: &Path, limit: u64) -> Result<Option<Vec<u8>>, StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(StoreError::TooLarge {
            path: path.to_path_buf(),
            limit,
        });
    }
    Ok(Some(bytes))
}

/// Replaces `path` atomically with `bytes`: a temporary file in the same
/// directory, fsync, rename over `path`, fsync of the directory. Readers see
/// the old file or the new one, never a mix; a crash leaves at worst a
/// stray temporary file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

pub use crate::clock::now_unix;

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MapKey {
        MapKey::new("imap.example.org:143", "Al ice\t%=ü@Example.org", "INBOX")
    }

    fn map() -> UidlMap {
        UidlMap {
            key: key(),
            uidvalidity: 1234,
            created: 1_700_000_000,
            redownloads: Some(3),
            entries: BTreeMap::from([(1, "old-1".into()), (7, "0000000100000002".into())]),
        }
    }

    #[test]
    fn maps_without_redownloads_load_and_unknown_header_fields_are_ignored() {
        let p = Path::new("m");
        // A map as written before issue 18 (no redownloads=).
        let before = "popbridge-uidl-map\t1\tupstream=h:143\taccount=alice\tmailbox=INBOX\t\
                      uidvalidity=9\tcreated=5\n3\tx\nend\t1\n";
        let m = UidlMap::parse(before.as_bytes(), p).unwrap();
        assert_eq!(m.redownloads, None);
        assert_eq!(m.entries, BTreeMap::from([(3, "x".to_string())]));
        // Written back, it stays without the field.
        assert_eq!(String::from_utf8(m.to_bytes()).unwrap(), before);
        // The header now has redownloads=; a field this version does not
        // know is ignored, as the reader has always done (so older
        // popbridge versions read maps with redownloads= too).
        let now = String::from_utf8(map().to_bytes()).unwrap();
        assert!(
            now.contains("\tuidvalidity=1234\tredownloads=3\tcreated="),
            "{now}"
        );
        let later = now.replace("\tcreated=", "\tsomething-new=1\tcreated=");
        assert_eq!(UidlMap::parse(later.as_bytes(), p).unwrap(), map());
        let bad = now.replace("redownloads=3", "redownloads=x");
        assert!(UidlMap::parse(bad.as_bytes(), p).is_err());
    }

    #[test]
    fn map_round_trip_and_odd_account_names() {
        let m = map();
        assert_eq!(m.key.account, "al ice\t%=ü@example.org", "lower-cased");
        let bytes = m.to_bytes();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with("popbridge-uidl-map\t1\t"), "{text}");
        assert!(
            text.contains("account=al%20ice%09%25%3D%C3%BC@example.org"),
            "{text}"
        );
        assert!(
            text.contains("\n1\told-1\n7\t0000000100000002\nend\t2\n"),
            "{text}"
        );
        assert_eq!(UidlMap::parse(&bytes, Path::new("m")).unwrap(), m);
        // The file name does not depend on the account's case.
        assert_eq!(
            MapKey::new("imap.example.org:143", "AL ICE\t%=ü@EXAMPLE.ORG", "INBOX").file_stem(),
            m.key.file_stem()
        );
        assert_ne!(
            MapKey::new("imap.example.org:143", "bob", "INBOX").file_stem(),
            m.key.file_stem()
        );
        assert_eq!(m.key.file_stem().len(), 32);
    }

    #[test]
    fn old_list_round_trip() {
        let l = OldList {
            key: key(),
            source: "pop3://old.example.org:110 user alice".into(),
            created: 5,
            messages: vec![
                OldMessage {
                    uidl: "a".into(),
                    size: 10,
                    hash: Some("0123456789abcdef0123456789abcdef".into()),
                    body: Some("ab".repeat(32)),
                },
                OldMessage {
                    uidl: "b".into(),
                    size: 20,
                    hash: None,
                    body: None,
                },
                OldMessage {
                    uidl: "c".into(),
                    size: 30,
                    hash: Some("0123456789abcdef0123456789abcdef".into()),
                    body: None,
                },
            ],
        };
        assert_eq!(OldList::parse(&l.to_bytes(), Path::new("o")).unwrap(), l);
        // A list written before body hashes: three fields a line.
        let old = parse_old_line("a\t10\t0123456789abcdef0123456789abcdef").unwrap();
        assert_eq!((old.hash.is_some(), old.body), (true, None));
        assert!(parse_old_line(&format!("a 10 - {}", "ab".repeat(31))).is_err());
        assert!(parse_old_line(&format!("a 10 - {} x", "ab".repeat(32))).is_err());
        assert!(parse_old_line("a 10 notahash").is_err());
        assert!(parse_old_line("has\u{7f} 10").is_err());
        assert!(parse_old_line("a").is_err());
        assert_eq!(parse_old_line("a   10").unwrap().size, 10);
    }

    #[test]
    fn truncated_or_corrupt_files_are_refused_whole() {
        let bytes = map().to_bytes();
        let p = Path::new("m");
        // Every truncation is refused, never read in part.
        for cut in 0..bytes.len() {
            assert!(
                UidlMap::parse(&bytes[..cut], p).is_err(),
                "accepted a file cut at {cut}"
            );
        }
        let text = String::from_utf8(bytes).unwrap();
        for (from, to) in [
            ("\t1\t", "\t2\t"),   // unknown version
            ("7\t", "1\t"),       // not ascending
            ("old-1", "old 1"),   // invalid UIDL
            ("end\t2", "end\t3"), // count mismatch
            ("uidvalidity=1234", "uidvalidity=x"),
            ("popbridge-uidl-map", "popbridge-uidl-old"),
            ("account=", "acct="),
        ] {
            let bad = text.replacen(from, to, 1);
            let e = UidlMap::parse(bad.as_bytes(), p).unwrap_err();
            assert!(
                matches!(e, StoreError::Corrupt { .. }),
                "{from} -> {to}: {e}"
            );
        }
        assert!(UidlMap::parse(b"\xff\xfe\n", p).is_err());
    }

    #[test]
    fn atomic_write_load_and_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let m = map();
        let path = m.key.map_path(dir.path());
        assert!(UidlMap::load(&path).unwrap().is_none(), "missing = none");
        write_atomic(&path, &m.to_bytes()).unwrap();
        assert_eq!(UidlMap::load(&path).unwrap().unwrap(), m);
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "no temporary file left: {left:?}");
        // Over the limit: refused without reading it all.
        let big = dir.path().join("big");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_MAP_FILE_BYTES + 1).unwrap();
        assert!(matches!(
            UidlMap::load(&big),
            Err(StoreError::TooLarge { .. })
        ));
    }
}
