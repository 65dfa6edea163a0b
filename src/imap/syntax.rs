//! IMAP syntax popbridge writes: quoted strings, mailbox names, UID sets;
//! and the `X-UIDL:` header it reads.

use super::UpstreamError;

/// RFC 7162 §4 recommends clients keep command lines under 8192 octets; UID
/// sets longer than this are split over several commands.
pub const MAX_UID_SET_LEN: usize = 7900;

/// An IMAP quoted string (RFC 3501 §4.3): `\` and `"` escaped; `None` if
/// the text holds CR, LF or NUL, which a quoted string cannot carry.
pub(crate) fn quote(s: &str) -> Option<String> {
    if s.contains(['\r', '\n', '\0']) {
        return None;
    }
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    Some(q)
}

/// Quotes a mailbox name as an IMAP quoted string (RFC 3501 §4.3), encoding
/// non-ASCII names in modified UTF-7 (RFC 3501 §5.1.3).
pub(crate) fn quote_mailbox(name: &str) -> Result<String, UpstreamError> {
    if name.is_empty() || name.chars().any(|c| c == '\r' || c == '\n' || c == '\0') {
        return Err(UpstreamError::Unsupported(format!(
            "invalid mailbox name {name:?}"
        )));
    }
    // Modified UTF-7 is ASCII without CR, LF or NUL: `quote` accepts it.
    quote(&modified_utf7(name))
        .ok_or_else(|| UpstreamError::Unsupported(format!("invalid mailbox name {name:?}")))
}

/// RFC 3501 §5.1.3: printable ASCII stands for itself ("&" as "&-"); other
/// characters are UTF-16 in modified base64 between "&" and "-".
pub fn modified_utf7(name: &str) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,";
    let mut out = String::with_capacity(name.len());
    let mut pending: Vec<u16> = Vec::new();
    let flush = |pending: &mut Vec<u16>, out: &mut String| {
        if pending.is_empty() {
            return;
        }
        out.push('&');
        let bytes: Vec<u8> = pending.iter().flat_map(|u| u.to_be_bytes()).collect();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            let chars = chunk.len() + 1;
            for i in 0..chars {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out.push('-');
        pending.clear();
    };
    for c in name.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut pending, &mut out);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut buf = [0u16; 2];
            pending.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    flush(&mut pending, &mut out);
    out
}

/// The value of the first `X-UIDL:` field in `header`, if it is a usable
/// UIDL (RFC 1939 §7: 1 to 70 characters in 0x21-0x7E); otherwise the
/// message gets the template UIDL.
pub fn x_uidl(header: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(header).ok()?;
    let line = text
        .lines()
        .find(|l| l.len() > 7 && l[..7].eq_ignore_ascii_case("x-uidl:"))?;
    let value = line[7..].trim();
    let ok = !value.is_empty()
        && value.len() <= crate::pop3::uidl::MAX_UIDL_LEN
        && value.bytes().all(|b| (0x21..=0x7e).contains(&b));
    ok.then(|| value.to_string())
}

/// "1 message", "2 messages".
pub(super) fn messages(n: usize) -> String {
    if n == 1 {
        "1 message".into()
    } else {
        format!("{n} messages")
    }
}

/// Compresses ascending UIDs into IMAP sequence sets ("1:3,7,9:10"), split so
/// no set exceeds [`MAX_UID_SET_LEN`].
pub fn uid_sets(uids: &[u32]) -> Vec<String> {
    let mut sorted = uids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut sets = Vec::new();
    let mut cur = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        i += 1;
        let piece = if start == end {
            start.to_string()
        } else {
            format!("{start}:{end}")
        };
        if !cur.is_empty() && cur.len() + 1 + piece.len() > MAX_UID_SET_LEN {
            sets.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(',');
        }
        cur.push_str(&piece);
    }
    if !cur.is_empty() {
        sets.push(cur);
    }
    sets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_sets_compress_and_split() {
        assert_eq!(uid_sets(&[]), Vec::<String>::new());
        assert_eq!(uid_sets(&[5, 1, 2, 3, 7, 9, 10]), vec!["1:3,5,7,9:10"]);
        let many: Vec<u32> = (0..10_000).map(|i| i * 2).collect();
        let sets = uid_sets(&many);
        assert!(sets.len() > 1);
        assert!(sets.iter().all(|s| s.len() <= MAX_UID_SET_LEN));
        let back: Vec<u32> = sets
            .iter()
            .flat_map(|s| {
                s.split(',')
                    .map(|p| p.parse::<u32>().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(back, many);
    }

    #[test]
    fn mailbox_names_are_quoted_and_utf7_encoded() {
        assert_eq!(quote_mailbox("INBOX").unwrap(), "\"INBOX\"");
        assert_eq!(
            quote_mailbox("My \"Mail\"\\x").unwrap(),
            "\"My \\\"Mail\\\"\\\\x\""
        );
        // RFC 3501 §5.1.3 example.
        assert_eq!(
            modified_utf7("~peter/mail/台北/日本語"),
            "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
        );
        assert_eq!(modified_utf7("A&B"), "A&-B");
        assert_eq!(modified_utf7("Entwürfe"), "Entw&APw-rfe");
        assert!(quote_mailbox("a\r\nb").is_err());
    }
}
