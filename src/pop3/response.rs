//! POP3 response encoding, with no I/O: status lines and the multi-line
//! message encoder (CRLF normalisation, dot-stuffing, TOP's line limit).

/// Appends `+OK` and optional text, then CRLF.
pub fn ok(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(b"+OK");
    if !text.is_empty() {
        out.push(b' ');
        out.extend_from_slice(text.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends `-ERR`, an optional RFC 2449 §8 response code in brackets, the
/// text, and CRLF.
pub fn err(out: &mut Vec<u8>, code: Option<&str>, text: &str) {
    out.extend_from_slice(b"-ERR ");
    if let Some(code) = code {
        out.push(b'[');
        out.extend_from_slice(code.as_bytes());
        out.extend_from_slice(b"] ");
    }
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The line that ends a multi-line response (RFC 1939 §3).
pub const TERMINATOR: &[u8] = b".\r\n";

/// Turns message bytes into the body of a RETR or TOP response.
///
/// The transformation matches Dovecot's POP3 server (`fetch_callback` in
/// `src/pop3/pop3-commands.c`) so that clients get the same bytes from
/// either server:
/// - an LF without a CR before it gets one (bare LF → CRLF);
/// - a "." at the start of a line is doubled (RFC 1939 §3, byte-stuffing);
/// - a message that does not end in LF gets a final CRLF before the ".";
/// - for TOP, the header ends at the first line that starts with CR or LF
///   (an empty line; also a line starting with a bare CR, as in Dovecot), and
///   output stops after that line plus `n` more body lines (RFC 1939 §7).
///
/// One deliberate difference: Dovecot does not stuff a "." that is the very
/// first byte of a message; we do, since an unstuffed "." there could end
/// the response early (RFC 1939 §3). Such a message is not valid RFC 5322.
///
/// State carries across calls, so a message can be fed in chunks of any size.
#[derive(Debug, Clone)]
pub struct MessageEncoder {
    /// The previous input byte; `\n` at the start so a leading "." is stuffed.
    prev: u8,
    /// True once the empty line that ends the header has been seen.
    in_body: bool,
    /// For TOP: body lines still to send, counting the empty separator line.
    /// `None` for RETR (everything).
    lines_left: Option<u64>,
    /// True when the TOP limit has been reached; later input is ignored.
    done: bool,
    /// Message octets consumed (before CRLF normalisation).
    consumed: u64,
}

impl MessageEncoder {
    /// An encoder for RETR: the whole message.
    pub fn retr() -> Self {
        Self::new(None)
    }

    /// An encoder for `TOP n lines`.
    pub fn top(lines: u64) -> Self {
        // The empty line between header and body is counted too, as Dovecot does.
        Self::new(Some(lines.saturating_add(1)))
    }

    fn new(lines_left: Option<u64>) -> Self {
        Self {
            prev: b'\n',
            in_body: false,
            lines_left,
            done: false,
            consumed: 0,
        }
    }

    /// True when TOP has all it needs; the caller may stop feeding input.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Message octets consumed so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Encodes `input` (the next piece of the message) into `out`. Returns
    /// how many input bytes were used: fewer than `input.len()` only when the
    /// TOP limit was reached.
    pub fn encode(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        if self.done {
            return 0;
        }
        out.reserve(input.len() + input.len() / 32 + 8);
        let mut start = 0; // first byte not yet copied to `out`
        let mut pos = 0; // next byte to look at; `self.prev` is the byte before it
        let mut used = input.len();
        // Line by line: memchr finds each LF, so the bytes in between are
        // copied in bulk rather than inspected one at a time.
        while pos < input.len() {
            if self.prev == b'\n' {
                // At the start of a line.
                let b = input[pos];
                if !self.in_body && (b == b'\r' || b == b'\n') {
                    self.in_body = true;
                }
                if b == b'.' {
                    out.extend_from_slice(&input[start..pos]);
                    out.push(b'.');
                    start = pos;
                }
            }
            let Some(off) = memchr::memchr(b'\n', &input[pos..]) else {
                self.prev = input[input.len() - 1];
                break;
            };
            let lf = pos + off;
            let before = if lf > pos { input[lf - 1] } else { self.prev };
            if before != b'\r' {
                out.extend_from_slice(&input[start..lf]);
                out.push(b'\r');
                start = lf;
            }
            self.prev = b'\n';
            pos = lf + 1;
            if self.in_body {
                if let Some(left) = self.lines_left.as_mut() {
                    *left -= 1;
                    if *left == 0 {
                        self.done = true;
                        used = pos;
                        break;
                    }
                }
            }
        }
        out.extend_from_slice(&input[start..used]);
        self.consumed += used as u64;
        used
    }

    /// Ends the response: a CRLF if the message did not end with a line
    /// break, then the terminating ".".
    pub fn finish(self, out: &mut Vec<u8>) {
        // An empty message counts as not ending in a line break (as in Dovecot).
        if self.prev != b'\n' || self.consumed == 0 {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(TERMINATOR);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retr(msg: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = MessageEncoder::retr();
        enc.encode(msg, &mut out);
        enc.finish(&mut out);
        out
    }

    fn top(msg: &[u8], n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = MessageEncoder::top(n);
        enc.encode(msg, &mut out);
        enc.finish(&mut out);
        out
    }

    #[test]
    fn status_lines() {
        let mut out = Vec::new();
        ok(&mut out, "2 320");
        ok(&mut out, "");
        err(&mut out, Some("AUTH"), "Authentication failed.");
        err(&mut out, None, "No such message");
        assert_eq!(
            out,
            b"+OK 2 320\r\n+OK\r\n-ERR [AUTH] Authentication failed.\r\n-ERR No such message\r\n"
        );
    }

    #[test]
    fn dot_stuffing() {
        assert_eq!(
            retr(b"A: b\r\n\r\n.\r\n..x\r\n.y\r\nz.\r\n"),
            b"A: b\r\n\r\n..\r\n...x\r\n..y\r\nz.\r\n.\r\n"
        );
        // A leading "." is stuffed too (unlike Dovecot, see the type's docs).
        assert_eq!(retr(b".x\r\n"), b"..x\r\n.\r\n");
    }

    #[test]
    fn bare_lf_becomes_crlf() {
        assert_eq!(
            retr(b"A: b\n\nline\n.dot\nmixed\r\nend\n"),
            b"A: b\r\n\r\nline\r\n..dot\r\nmixed\r\nend\r\n.\r\n"
        );
        // A leading LF (empty header) too.
        assert_eq!(retr(b"\nbody\n"), b"\r\nbody\r\n.\r\n");
    }

    #[test]
    fn bare_cr_is_kept() {
        assert_eq!(retr(b"A: b\r\n\r\nx\ry\r\n"), b"A: b\r\n\r\nx\ry\r\n.\r\n");
        assert_eq!(retr(b"A: b\r\n\r\nx\r"), b"A: b\r\n\r\nx\r\r\n.\r\n");
    }

    #[test]
    fn missing_final_newline() {
        assert_eq!(retr(b"A: b\r\n\r\nlast"), b"A: b\r\n\r\nlast\r\n.\r\n");
        assert_eq!(retr(b"A: b\r\n\r\n."), b"A: b\r\n\r\n..\r\n.\r\n");
        assert_eq!(retr(b""), b"\r\n.\r\n");
    }

    #[test]
    fn top_zero_is_header_and_blank_line() {
        let msg = b"A: b\r\nC: d\r\n\r\nl1\r\nl2\r\nl3\r\nl4\r\n";
        assert_eq!(top(msg, 0), b"A: b\r\nC: d\r\n\r\n.\r\n");
        assert_eq!(top(msg, 1), b"A: b\r\nC: d\r\n\r\nl1\r\n.\r\n");
        assert_eq!(top(msg, 3), b"A: b\r\nC: d\r\n\r\nl1\r\nl2\r\nl3\r\n.\r\n");
        assert_eq!(top(msg, 4), retr(msg));
        assert_eq!(top(msg, 100), retr(msg));
        assert_eq!(top(msg, u64::MAX), retr(msg));
    }

    #[test]
    fn top_edge_cases() {
        // Header only, no blank line: all of it, plus the final CRLF.
        assert_eq!(top(b"A: b\r\nC: d", 0), b"A: b\r\nC: d\r\n.\r\n");
        assert_eq!(top(b"A: b\r\nC: d\r\n", 0), b"A: b\r\nC: d\r\n.\r\n");
        // Bare LF separator.
        assert_eq!(top(b"A: b\n\nl1\nl2\n", 1), b"A: b\r\n\r\nl1\r\n.\r\n");
        // Body lines are dot-stuffed and the last one may lack its newline.
        assert_eq!(
            top(b"A: b\r\n\r\n.x\r\ny", 5),
            b"A: b\r\n\r\n..x\r\ny\r\n.\r\n"
        );
        // Empty header: the first line is the separator.
        assert_eq!(top(b"\r\nl1\r\nl2\r\n", 1), b"\r\nl1\r\n.\r\n");
    }

    #[test]
    fn chunked_input_gives_the_same_bytes() {
        let msg: &[u8] = b"A: b\n.C: d\r\n\n..\n.\r\nx\ry\nz\r\n\nlast.";
        for n in [0u64, 1, 2, 3, 10] {
            let whole = top(msg, n);
            for size in 1..msg.len() {
                let mut out = Vec::new();
                let mut enc = MessageEncoder::top(n);
                for piece in msg.chunks(size) {
                    enc.encode(piece, &mut out);
                }
                enc.finish(&mut out);
                assert_eq!(out, whole, "top {n} chunk {size}");
            }
        }
        let whole = retr(msg);
        for size in 1..msg.len() {
            let mut out = Vec::new();
            let mut enc = MessageEncoder::retr();
            for piece in msg.chunks(size) {
                enc.encode(piece, &mut out);
            }
            assert_eq!(enc.consumed(), msg.len() as u64);
            enc.finish(&mut out);
            assert_eq!(out, whole, "retr chunk {size}");
        }
    }
}
