//! Untrusted bytes read by the UIDL migration code: map files and saved
//! lists (`<data.dir>/uidl-maps/`, possibly shipped from elsewhere), UIDL
//! list files given to `popbridge migrate import`, and message headers
//! (hashed, and searched for a date).
//!
//! Properties:
//! - nothing panics;
//! - a map or list that parses is written back to bytes that parse to the
//!   same value, and every UIDL in it is valid (RFC 1939 §7);
//! - the header hash is 32 hex digits and does not depend on line endings
//!   (CRLF and bare LF hash the same);
//! - an internal date, when found, has the IMAP date-time shape.
#![no_main]

use libfuzzer_sys::fuzz_target;
use popbridge::migrate::date::internal_date;
use popbridge::migrate::hash::{header_hash, is_hash};
use popbridge::migrate::store::{is_valid_uidl, parse_old_line, OldList, UidlMap};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let p = Path::new("fuzz");
    if let Ok(m) = UidlMap::parse(data, p) {
        assert!(m.entries.values().all(|u| is_valid_uidl(u)));
        let again = UidlMap::parse(&m.to_bytes(), p).expect("written map parses");
        assert_eq!(again, m);
    }
    if let Ok(l) = OldList::parse(data, p) {
        assert!(l.messages.iter().all(|m| is_valid_uidl(&m.uidl)));
        let again = OldList::parse(&l.to_bytes(), p).expect("written list parses");
        assert_eq!(again, l);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        for line in text.lines() {
            if let Ok(m) = parse_old_line(line) {
                assert!(is_valid_uidl(&m.uidl));
            }
        }
    }
    let h = header_hash(data);
    assert!(is_hash(&h));
    // Bare LF → CRLF must not change the hash (only where no CR precedes).
    let mut crlf = Vec::with_capacity(data.len() + 16);
    let mut prev = 0u8;
    for &b in data {
        if b == b'\n' && prev != b'\r' {
            crlf.push(b'\r');
        }
        crlf.push(b);
        prev = b;
    }
    if !data.contains(&b'\r') {
        assert_eq!(header_hash(&crlf), h, "CRLF changed the hash");
    }
    if let Some(d) = internal_date(data) {
        // "dd-Mon-yyyy hh:mm:ss +zzzz", quoted.
        assert_eq!(d.len(), 28, "{d}");
        assert!(d.starts_with('"') && d.ends_with('"'), "{d}");
    }
});
