//! Header hashes: how a message on the old POP3 server is recognised in the
//! IMAP mailbox when sizes alone do not line up (the idea of Dovecot's
//! pop3-migration plugin, written anew).
//!
//! The hash covers the header section only (POP3 `TOP n 0` on the old side,
//! IMAP `BODY.PEEK[HEADER]` on the new side), with the fields that a
//! migration or a mail store changes left out, so the same message hashes
//! the same on both servers:
//! - [`VOLATILE_FIELDS`]: flags and bookkeeping that mbox-era servers and
//!   clients write into the header (Status, X-UID, X-Keywords,
//!   X-Message-Flag...), the old UIDL itself,
//!   Content-Length, and Return-Path (rewritten at delivery);
//! - **every** `Received:` field. Dovecot drops only the Received fields the
//!   migration added; we cannot tell which ones those are when the other tool
//!   is unknown, so all are dropped. The cost: two copies of one message that
//!   differ only in their Received chain hash the same, and are then reported
//!   as ambiguous rather than matched (see [`super::matching`]).
//!
//! Line endings (CRLF or bare LF), folding (RFC 5322 §2.2.3) and runs of
//! white space are normalised, so a store that re-folds or converts line
//! endings does not change the hash.

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
    s.len() == HASH_BYTES * 2 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
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
}
