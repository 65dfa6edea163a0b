//! Content hashes: how a message on the old POP3 server is recognised in the
//! IMAP mailbox (the header hash is the idea of Dovecot's pop3-migration
//! plugin, written anew; the body hash is what makes a match certain).
//!
//! The header hash covers the header section only (POP3 `TOP n 0` or
//! `RETR` on the old side, IMAP `BODY.PEEK[HEADER]` or `BODY.PEEK[]` on the
//! new side), with the fields that a
//! migration or a mail store changes left out, so the same message hashes
//! the same on both servers:
//! - [`VOLATILE_FIELDS`]: flags and bookkeeping that mbox-era servers and
//!   clients write into the header (Status, X-UID, X-Keywords,
//!   X-Message-Flag...), the old UIDL itself,
//!   Content-Length, and Return-Path (rewritten at delivery);
//! - **every** `Received:` field. Dovecot drops only the Received fields the
//!   migration added; we cannot tell which ones those are when the other tool
//!   is unknown, so all are dropped. The cost: two copies of one message that
//!   differ only in their Received chain hash the same; with the same body
//!   they are identical copies for [`super::matching`].
//!
//! Line endings (CRLF or bare LF), folding (RFC 5322 §2.2.3) and runs of
//! white space are normalised, so a store that re-folds or converts line
//! endings does not change the hash.
//!
//! The header hash alone never pairs two messages (see [`super::matching`]):
//! the body is hashed too, by [`MessageHasher`], from the whole message
//! (POP3 `RETR`, IMAP `BODY.PEEK[]`). [`body_hash`] covers the octets after
//! the first empty line, with every line end (CRLF, bare LF, bare CR) taken
//! as one LF and the line ends at the very end left out: a store that
//! converts line endings, or a POP3 server that ends a message without a
//! final line end with one (RFC 1939 §3 needs the terminating `.` on a line
//! of its own), does not change it. Nothing else is normalised: a tool that
//! re-encodes a body makes it another message, downloaded once more.

/// Fields left out of the hash, lower case. `received` is handled here too
/// (all of them, see the module documentation).
pub const VOLATILE_FIELDS: &[&str] = &[
    "return-path",
    "received",
    "status",
    "x-status",
    "x-uid",
    "x-uidl",
    "x-imap",
    "x-imapbase",
    "x-keywords",
    "x-message-flag",
    "content-length",
];

/// Octets of header that are hashed at most. RFC 5322 sets no limit on the
/// header section; real ones are a few KiB. The bound caps the work per
/// message, and the same bound applies on both sides.
pub const MAX_HEADER_BYTES: usize = 1024 * 1024;

/// Bytes of SHA-256 kept: 128 bits, written as 32 hex digits.
const HASH_BYTES: usize = 16;

/// A header hash as stored: 32 lower-case hex digits.
pub type HeaderHash = String;

/// A body hash as stored: the whole SHA-256, 64 lower-case hex digits (it is
/// what tells two messages with one header apart, so nothing is cut off).
pub type BodyHash = String;

/// Hex digits of a body hash.
pub const BODY_HASH_DIGITS: usize = 64;

/// The header fields of `message` (a whole message or just its header
/// section) as (lower-case name, value with folding and white space runs
/// collapsed), in order, stopping at the first empty line. Lines that are
/// neither a field nor a continuation (an mbox `From ` line) are skipped.
pub fn fields(message: &[u8]) -> Vec<(String, String)> {
    // Past the bound, whole lines only: the same prefix the POP3 side keeps
    // of a `TOP n 0` that is too long.
    let head = match message.get(..MAX_HEADER_BYTES) {
        Some(h) if message.len() > MAX_HEADER_BYTES => {
            &h[..h.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)]
        }
        _ => message,
    };
    let mut out: Vec<(String, String)> = Vec::new();
    for raw in head.split(|&b| b == b'\n') {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.is_empty() {
            break;
        }
        let text = String::from_utf8_lossy(line);
        if line[0] == b' ' || line[0] == b'\t' {
            // RFC 5322 §2.2.3: a continuation line of the previous field.
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(&text);
            }
            continue;
        }
        // RFC 5322 §3.6.8: a field name is printable characters without
        // white space (obsolete syntax allows white space before the colon).
        let Some((name, value)) = text.split_once(':') else {
            continue;
        };
        let name = name.trim_end();
        if name.is_empty() || name.contains(char::is_whitespace) {
            continue;
        }
        out.push((name.to_ascii_lowercase(), value.to_string()));
    }
    for f in &mut out {
        f.1 = f.1.split_whitespace().collect::<Vec<_>>().join(" ");
    }
    out
}

/// The hash of a message's header section, volatile fields left out.
pub fn header_hash(message: &[u8]) -> HeaderHash {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (name, value) in fields(message) {
        if VOLATILE_FIELDS.contains(&name.as_str()) {
            continue;
        }
        ctx.update(name.as_bytes());
        ctx.update(b":");
        ctx.update(value.as_bytes());
        ctx.update(b"\n");
    }
    hex::encode(&ctx.finish().as_ref()[..HASH_BYTES])
}

/// True when `s` looks like a stored hash (32 lower-case hex digits).
pub fn is_hash(s: &str) -> bool {
    s.len() == HASH_BYTES * 2 && is_lower_hex(s)
}

/// True when `s` looks like a stored body hash (64 lower-case hex digits).
pub fn is_body_hash(s: &str) -> bool {
    s.len() == BODY_HASH_DIGITS && is_lower_hex(s)
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The body hash of a whole message (see the module documentation).
pub fn body_hash(message: &[u8]) -> BodyHash {
    let mut h = MessageHasher::new();
    h.update(message);
    h.finish().1
}

/// Where [`MessageHasher`] is in the header: how the current line began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineStart {
    /// Nothing on this line yet.
    Empty,
    /// Only a CR so far (a CRLF line end would make it an empty line).
    Cr,
    /// Anything else: not the empty line that ends the header.
    Text,
}

/// Header and body hash of a message fed in chunks of any size (a POP3
/// line at a time, or IMAP's `BODY.PEEK[]<offset.length>` pieces), in
/// memory bounded by [`MAX_HEADER_BYTES`] however large the message: the
/// header is kept (up to the bound) for [`header_hash`], the body goes
/// straight into SHA-256. The results do not depend on how the message
/// was cut into chunks.
pub struct MessageHasher {
    /// The header section so far, at most `MAX_HEADER_BYTES + 1` octets
    /// (one more than [`fields`] looks at, so it sees the header is long).
    header: Vec<u8>,
    /// `Some` while in the header.
    line: Option<LineStart>,
    body: ring::digest::Context,
    /// A CR not yet known to be part of a CRLF.
    cr: bool,
    /// Line ends not yet hashed: dropped if nothing but line ends follows.
    held: u64,
}

impl Default for MessageHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl MessageHasher {
    pub fn new() -> Self {
        Self {
            header: Vec::new(),
            line: Some(LineStart::Empty),
            body: ring::digest::Context::new(&ring::digest::SHA256),
            cr: false,
            held: 0,
        }
    }

    /// The next octets of the message.
    pub fn update(&mut self, mut data: &[u8]) {
        while let Some(line) = self.line {
            if data.is_empty() {
                return;
            }
            let (seg, rest, end) = match memchr::memchr(b'\n', data) {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (data, &data[data.len()..], false),
            };
            let keep = (MAX_HEADER_BYTES + 1).saturating_sub(self.header.len());
            let taken = data.len() - rest.len();
            self.header.extend_from_slice(&data[..taken.min(keep)]);
            let now = match (line, seg) {
                (l, []) => l,
                (LineStart::Empty, b"\r") => LineStart::Cr,
                _ => LineStart::Text,
            };
            self.line = match (end, now) {
                // RFC 5322 §2.1: the first empty line ends the header.
                (true, LineStart::Empty | LineStart::Cr) => None,
                (true, LineStart::Text) => Some(LineStart::Empty),
                (false, l) => Some(l),
            };
            data = rest;
        }
        self.body_bytes(data);
    }

    /// Body octets: line ends become LF, and are held back until something
    /// other than a line end follows them.
    fn body_bytes(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.cr {
                self.cr = false;
                self.held += 1;
                if data[0] == b'\n' {
                    data = &data[1..];
                    continue;
                }
            }
            match memchr::memchr2(b'\r', b'\n', data) {
                Some(0) => {
                    if data[0] == b'\r' {
                        self.cr = true;
                    } else {
                        self.held += 1;
                    }
                    data = &data[1..];
                }
                found => {
                    let text = found.unwrap_or(data.len());
                    self.flush_held();
                    self.body.update(&data[..text]);
                    data = &data[text..];
                }
            }
        }
    }

    fn flush_held(&mut self) {
        const LFS: [u8; 64] = [b'\n'; 64];
        while self.held > 0 {
            let n = self.held.min(LFS.len() as u64);
            self.body.update(&LFS[..n as usize]);
            self.held -= n;
        }
    }

    /// (header hash, body hash). Line ends at the end are left out.
    pub fn finish(self) -> (HeaderHash, BodyHash) {
        (
            header_hash(&self.header),
            hex::encode(self.body.finish().as_ref()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "From: a@example.org\r\nTo: b@example.org\r\nSubject: hello\r\nMessage-ID: <1@x>\r\n\r\nbody\r\n";

    #[test]
    fn volatile_fields_do_not_change_the_hash() {
        let h = header_hash(BASE.as_bytes());
        for extra in [
            "Received: from mx by migration; Mon, 1 Jan 2024 00:00:00 +0000\r\n",
            "Return-Path: <bounce@example.org>\r\n",
            "Status: RO\r\nX-Status: A\r\nX-UID: 42\r\nX-Keywords: $Label1\r\n",
            "X-UIDL: 12345.abc\r\nX-IMAP: 1 2\r\nX-IMAPbase: 1 2\r\nContent-Length: 5\r\n",
            "RECEIVED: by x\r\n\tfolded; Mon, 1 Jan 2024\r\n",
        ] {
            let changed = format!("{extra}{BASE}");
            assert_eq!(header_hash(changed.as_bytes()), h, "{extra:?}");
            // Anywhere in the header, not only on top.
            let middle = BASE.replacen("Subject", &format!("{extra}Subject"), 1);
            assert_eq!(header_hash(middle.as_bytes()), h, "{extra:?} in the middle");
        }
    }

    #[test]
    fn other_fields_and_values_change_the_hash() {
        let h = header_hash(BASE.as_bytes());
        assert_ne!(header_hash(BASE.replace("hello", "hallo").as_bytes()), h);
        assert_ne!(
            header_hash(format!("X-Mailer: m\r\n{BASE}").as_bytes()),
            h,
            "a non-volatile field counts"
        );
        // The body is not hashed.
        assert_eq!(
            header_hash(BASE.replace("body", "other body").as_bytes()),
            h
        );
    }

    #[test]
    fn line_endings_folding_and_white_space_are_normalised() {
        let h = header_hash(BASE.as_bytes());
        assert_eq!(header_hash(BASE.replace("\r\n", "\n").as_bytes()), h);
        let folded = BASE.replace("Subject: hello", "Subject:\r\n  hello");
        assert_eq!(header_hash(folded.as_bytes()), h);
        let spaced = BASE.replace("Subject: hello", "Subject:   hello   ");
        assert_eq!(header_hash(spaced.as_bytes()), h);
        // Only the header section: TOP n 0 output and a whole message agree.
        let header_only = &BASE[..BASE.find("\r\n\r\n").unwrap() + 4];
        assert_eq!(header_hash(header_only.as_bytes()), h);
        assert!(is_hash(&h));
    }

    #[test]
    fn over_the_bound_only_whole_lines_count() {
        // What the IMAP side sees (the whole header) and what the POP3 side
        // keeps of it (whole lines up to the bound) hash the same.
        let line = format!("X-Big: {}\r\n", "b".repeat(1000));
        let mut whole = String::from("Subject: big\r\n");
        while whole.len() <= MAX_HEADER_BYTES + 5000 {
            whole.push_str(&line);
        }
        whole.push_str("\r\nbody\r\n");
        let mut kept = String::new();
        for l in whole.split_inclusive("\r\n") {
            if kept.len() + l.len() > MAX_HEADER_BYTES {
                break;
            }
            kept.push_str(l);
        }
        assert_eq!(header_hash(whole.as_bytes()), header_hash(kept.as_bytes()));
    }

    #[test]
    fn field_names_are_case_insensitive_and_garbage_lines_skipped() {
        let h = header_hash(BASE.as_bytes());
        assert_eq!(
            header_hash(BASE.replace("Subject:", "SUBJECT:").as_bytes()),
            h
        );
        assert_eq!(
            header_hash(format!("From someone Mon Jan  1 00:00:00 2024\n{BASE}").as_bytes()),
            h
        );
        assert_eq!(header_hash(b""), header_hash(b"\r\n"));
    }

    #[test]
    fn the_hasher_gives_the_same_hashes_in_any_chunking() {
        let long_header = format!("X-Long: {}\r\n", "h".repeat(3000));
        let messages: Vec<Vec<u8>> = vec![
            BASE.as_bytes().to_vec(),
            format!("{long_header}{BASE}").into_bytes(),
            b"Subject: no body\r\n".to_vec(),
            b"Subject: empty body\r\n\r\n".to_vec(),
            b"\r\nno header at all\r\n".to_vec(),
            b"A: 1\n\nbare\nLF\n\n\n".to_vec(),
            b"A: 1\r\n\r\nx\r\r\ny\rz\r\n\r\n\r".to_vec(),
        ];
        for m in &messages {
            let whole = {
                let mut h = MessageHasher::new();
                h.update(m);
                h.finish()
            };
            assert_eq!(whole.0, header_hash(m), "{m:?}");
            assert!(is_body_hash(&whole.1));
            for size in [1, 2, 3, 4, 7, 16, 64, 512] {
                let mut h = MessageHasher::new();
                for c in m.chunks(size) {
                    h.update(c);
                }
                assert_eq!(h.finish(), whole, "chunks of {size}: {m:?}");
            }
        }
    }

    #[test]
    fn body_hash_covers_the_body_with_line_ends_normalised() {
        let h = body_hash(BASE.as_bytes());
        // The header does not count (header_hash covers it).
        assert_eq!(body_hash(BASE.replace("hello", "other").as_bytes()), h);
        assert_eq!(body_hash(format!("Received: by x\r\n{BASE}").as_bytes()), h);
        // Line ends, and line ends at the very end.
        assert_eq!(body_hash(BASE.replace("\r\n", "\n").as_bytes()), h);
        assert_eq!(body_hash(BASE.trim_end().as_bytes()), h);
        assert_eq!(body_hash(format!("{BASE}\r\n\r\n").as_bytes()), h);
        // Any other change is another body.
        for other in [
            BASE.replace("body", "Body"),
            BASE.replace("body", "body "),
            BASE.replace("body", "bo\r\ndy"),
            format!("{BASE}more\r\n"),
            format!("{BASE}\r\n\r\nmore"),
            BASE.replace("\r\n\r\nbody", "\r\n\r\n\r\nbody"),
        ] {
            assert_ne!(body_hash(other.as_bytes()), h, "{other:?}");
        }
        // Where the header ends decides what the body is.
        assert_ne!(
            body_hash(b"A: 1\r\n\r\nB: 2\r\n\r\nx"),
            body_hash(b"A: 1\r\nB: 2\r\n\r\nx")
        );
        assert_eq!(body_hash(b"A: 1\r\n"), body_hash(b"A: 1\r\n\r\n"));
    }

    #[test]
    fn a_huge_header_is_kept_only_to_the_bound() {
        let line = format!("X-Big: {}\r\n", "b".repeat(1000));
        let mut m = String::from("Subject: big\r\n");
        while m.len() <= MAX_HEADER_BYTES * 2 {
            m.push_str(&line);
        }
        m.push_str("\r\nthe body\r\n");
        let mut h = MessageHasher::new();
        for c in m.as_bytes().chunks(4096) {
            h.update(c);
            assert!(h.header.len() <= MAX_HEADER_BYTES + 1);
        }
        let (head, body) = h.finish();
        assert_eq!(head, header_hash(m.as_bytes()));
        assert_eq!(body, body_hash(b"\r\nthe body\r\n"));
    }
}
