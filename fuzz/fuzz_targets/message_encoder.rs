//! Message bytes → `MessageEncoder` (RETR and TOP n), fed in chunks.
//!
//! Input layout: byte 0 is a header (bits 0-2: how many chunk-size bytes
//! follow, minus one), then that many chunk sizes (byte value + 1 octets
//! each, used in turn; 255 means "all the rest"), then one byte for TOP's
//! line count n (0..=253 as is; 254 and 255 are u64::MAX - 1 and u64::MAX),
//! then the message.
//!
//! Properties:
//! - RETR and TOP output do not depend on the chunking; `encode` uses all of
//!   its input unless TOP is done, then uses nothing more and writes nothing;
//! - RETR consumes the whole message; its output ends with "\r\n.\r\n"
//!   (and is exactly that for an empty message);
//! - round trip: undoing dot-stuffing and dropping the final ".\r\n" gives
//!   the message with every LF not preceded by CR turned into CRLF, plus a
//!   CRLF if the message did not end with LF; no line before the terminator
//!   is "." and every line that starts with "." starts with "..";
//! - TOP n: when not done its output is RETR's; when done (stopped early)
//!   it is the RETR output of exactly the consumed prefix, which ends with an
//!   LF, its body is a prefix of RETR's body, and it holds the header plus
//!   exactly n + 1 lines from the header's end (the first line beginning
//!   with CR or LF, Dovecot's rule) and at most n + 1 lines from the first
//!   truly empty line ("\r\n" or "\n").
#![no_main]

use libfuzzer_sys::fuzz_target;
use popbridge::pop3::response::{MessageEncoder, TERMINATOR};

struct Encoded {
    out: Vec<u8>,
    consumed: u64,
    done: bool,
}

fn encode(mut enc: MessageEncoder, msg: &[u8], chunks: &[usize]) -> Encoded {
    let mut out = Vec::new();
    let mut rest = msg;
    let mut sizes = chunks.iter().cycle();
    let mut used_total = 0u64;
    while !rest.is_empty() {
        let size = (*sizes.next().unwrap()).min(rest.len());
        let (piece, tail) = rest.split_at(size);
        rest = tail;
        let was_done = enc.is_done();
        let before = out.len();
        let used = enc.encode(piece, &mut out);
        assert!(used <= piece.len());
        if was_done {
            assert_eq!(used, 0, "encode used input after TOP was done");
            assert_eq!(out.len(), before, "encode wrote after TOP was done");
        }
        if used < piece.len() {
            assert!(enc.is_done(), "encode stopped early without being done");
        }
        used_total += used as u64;
        assert_eq!(enc.consumed(), used_total);
    }
    let consumed = enc.consumed();
    let done = enc.is_done();
    enc.finish(&mut out);
    Encoded {
        out,
        consumed,
        done,
    }
}

/// The message as a client should reassemble it: bare LF → CRLF, and a final
/// CRLF when the message does not end with LF.
fn normalized(msg: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(msg.len() * 2 + 2);
    for (i, &b) in msg.iter().enumerate() {
        if b == b'\n' && (i == 0 || msg[i - 1] != b'\r') {
            v.push(b'\r');
        }
        v.push(b);
    }
    if msg.last() != Some(&b'\n') {
        v.extend_from_slice(b"\r\n");
    }
    v
}

/// Undoes dot-stuffing in a response body (terminator removed), checking
/// that every line starting with "." was stuffed.
fn unstuff(body: &[u8]) -> Vec<u8> {
    assert!(body.ends_with(b"\r\n"), "body does not end with CRLF");
    let mut v = Vec::with_capacity(body.len());
    for line in body.split_inclusive(|&b| b == b'\n') {
        assert!(line.ends_with(b"\r\n"), "line without CRLF: {line:?}");
        assert_ne!(line, b".\r\n", "a lone \".\" line before the terminator");
        if line.starts_with(b".") {
            assert!(line.starts_with(b".."), "unstuffed leading dot: {line:?}");
            v.extend_from_slice(&line[1..]);
        } else {
            v.extend_from_slice(line);
        }
    }
    v
}

/// Start offsets of the lines of `msg` (0 and after each LF).
fn line_starts(msg: &[u8]) -> impl Iterator<Item = usize> + '_ {
    std::iter::once(0).chain(
        msg.iter()
            .enumerate()
            .filter(|&(i, &b)| b == b'\n' && i + 1 < msg.len())
            .map(|(i, _)| i + 1),
    )
}

fn count_lf(s: &[u8]) -> u64 {
    s.iter().filter(|&&b| b == b'\n').count() as u64
}

fn check_retr(msg: &[u8], chunks: &[usize]) -> Vec<u8> {
    let whole = encode(MessageEncoder::retr(), msg, &[usize::MAX]);
    let chunked = encode(MessageEncoder::retr(), msg, chunks);
    assert_eq!(
        whole.out, chunked.out,
        "RETR output depends on chunking {chunks:?}"
    );
    assert_eq!(whole.consumed, msg.len() as u64);
    assert_eq!(chunked.consumed, msg.len() as u64);
    assert!(!whole.done && !chunked.done, "RETR reported done");
    let out = whole.out;
    if msg.is_empty() {
        assert_eq!(out, b"\r\n.\r\n");
    }
    assert!(
        out.ends_with(b"\r\n.\r\n"),
        "RETR output lacks \\r\\n.\\r\\n"
    );
    let body = &out[..out.len() - TERMINATOR.len()];
    assert_eq!(
        unstuff(body),
        normalized(msg),
        "round trip failed for message {msg:?}"
    );
    out
}

fn check_top(msg: &[u8], chunks: &[usize], n: u64, retr_out: &[u8]) {
    let whole = encode(MessageEncoder::top(n), msg, &[usize::MAX]);
    let chunked = encode(MessageEncoder::top(n), msg, chunks);
    assert_eq!(
        whole.out, chunked.out,
        "TOP {n} output depends on chunking {chunks:?}"
    );
    assert_eq!(whole.consumed, chunked.consumed);
    assert_eq!(whole.done, chunked.done);
    let out = &whole.out;
    let c = usize::try_from(whole.consumed).unwrap();
    let limit = n.saturating_add(1);
    // Dovecot's header end: the first line that begins with CR or LF.
    let hdr_end = line_starts(msg).find(|&i| matches!(msg.get(i), Some(b'\r' | b'\n')));
    // The RFC 5322 header end: the first empty line.
    let empty_line =
        line_starts(msg).find(|&i| msg[i..].starts_with(b"\n") || msg[i..].starts_with(b"\r\n"));
    if !whole.done {
        assert_eq!(c, msg.len(), "TOP stopped without being done");
        assert_eq!(
            out, retr_out,
            "TOP {n} that read everything differs from RETR"
        );
        if let Some(h) = hdr_end {
            assert!(count_lf(&msg[h..]) < limit, "TOP {n} should have stopped");
        }
        return;
    }
    // Stopped early: after an LF, having sent exactly n + 1 lines from the
    // header end.
    assert!(c > 0 && msg[c - 1] == b'\n', "TOP stopped inside a line");
    let h = hdr_end.expect("TOP done without a header end");
    assert!(h < c);
    assert_eq!(
        count_lf(&msg[h..c]),
        limit,
        "TOP {n}: wrong number of lines"
    );
    if let Some(e) = empty_line {
        assert!(count_lf(&msg[e.min(c)..c]) <= limit);
    }
    // Its output is RETR of the consumed prefix, a prefix of RETR's body.
    let prefix = encode(MessageEncoder::retr(), &msg[..c], &[usize::MAX]);
    assert_eq!(
        out, &prefix.out,
        "TOP {n} differs from RETR of the consumed prefix"
    );
    let top_body = &out[..out.len() - TERMINATOR.len()];
    let retr_body = &retr_out[..retr_out.len() - TERMINATOR.len()];
    assert!(top_body.ends_with(b"\r\n"));
    assert!(
        retr_body.starts_with(top_body),
        "TOP {n} body is not a prefix of RETR's"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&header, rest)) = data.split_first() else {
        return;
    };
    let k = usize::from(header & 7) + 1;
    if rest.len() < k + 1 {
        return;
    }
    let (sizes, rest) = rest.split_at(k);
    let chunks: Vec<usize> = sizes
        .iter()
        .map(|&b| {
            if b == 255 {
                usize::MAX
            } else {
                usize::from(b) + 1
            }
        })
        .collect();
    let n = match rest[0] {
        255 => u64::MAX,
        254 => u64::MAX - 1,
        b => u64::from(b),
    };
    let msg = &rest[1..];
    let retr_out = check_retr(msg, &chunks);
    check_top(msg, &chunks, n, &retr_out);
});
