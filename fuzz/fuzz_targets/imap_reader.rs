//! IMAP server bytes → `imap::wire::Framer` → frames → `parse_response`.
//!
//! Input layout: byte 0 is a header (bits 0-2: how many chunk-size bytes
//! follow, minus one; bit 3: FETCH bodies are streamed; bits 4-5: the
//! literal bound, default / 16 / 256 / 4096 octets; bit 6: a response bound
//! of 512 octets instead of the default), then that many chunk sizes (byte
//! value + 1 octets each, used in turn; 255 means "all the rest"), then the
//! server's byte stream.
//!
//! Properties:
//! - nothing panics (framer, imap-proto behind `parse_response`, fallback);
//! - memory: the read buffer is always `READ_BUFFER`, the response buffer
//!   never above the response bound, and never above what the octets fed so
//!   far can justify (an announced literal size is not an allocation);
//! - `next_frame` returning `None` means every octet fed was consumed;
//! - a response frame ends with CRLF, a body piece is never empty, and the
//!   pieces after a `BodyStart { len }` add up to `len` before the next
//!   frame that is not a piece;
//! - the frames (pieces merged) and the error that ends them are identical
//!   whatever the chunking (checked against feeding the stream in one read).
#![no_main]

use libfuzzer_sys::fuzz_target;
use popbridge::imap::wire::{
    parse_response, Frame, Framer, Limits, Parsed, WireError, MAX_RESPONSE, MAX_SMALL_LITERAL,
    READ_BUFFER, RESPONSE_KEEP,
};

#[derive(Debug, PartialEq, Eq)]
enum Out {
    Response(Vec<u8>),
    BodyStart(u64),
    Body(Vec<u8>),
}

struct Run {
    out: Vec<Out>,
    err: Option<WireError>,
}

fn run(stream: &[u8], chunks: &[usize], limits: Limits, bodies: bool, parse: bool) -> Run {
    let mut f = Framer::new(limits);
    f.set_stream_bodies(bodies);
    let limits = f.limits();
    let mut out = Vec::new();
    let mut fed = 0usize;
    // Octets of the current body still expected.
    let mut body_left: Option<u64> = None;
    let mut rest = stream;
    let mut sizes = chunks.iter().cycle();
    loop {
        loop {
            let m = f.memory();
            assert_eq!(m.read_buffer, READ_BUFFER);
            assert!(
                m.response <= limits.max_response,
                "response buffer {} over the bound {}",
                m.response,
                limits.max_response
            );
            assert!(
                m.response <= RESPONSE_KEEP.max(4 * fed),
                "response buffer {} after only {fed} octets fed",
                m.response
            );
            let frame = match f.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    assert!(!f.has_unread(), "None with octets left");
                    break;
                }
                Err(e) => {
                    assert_eq!(f.next_frame(), Err(e.clone()), "framer not left failed");
                    return Run { out, err: Some(e) };
                }
            };
            if !matches!(frame, Frame::BodyPiece(_)) {
                if let Some(left) = body_left.take() {
                    assert_eq!(left, 0, "body ended {left} octets short");
                }
            }
            match frame {
                Frame::Response(b) => {
                    assert!(b.ends_with(b"\r\n"), "response without CRLF");
                    if parse {
                        if let Parsed::Known(r) = parse_response(b) {
                            // Owned copies must not panic either.
                            let _ = r.into_owned();
                        }
                    }
                    out.push(Out::Response(b.to_vec()));
                }
                Frame::BodyStart { len } => {
                    body_left = Some(len);
                    out.push(Out::BodyStart(len));
                }
                Frame::BodyPiece(b) => {
                    assert!(!b.is_empty(), "empty body piece");
                    let left = body_left.as_mut().expect("piece without BodyStart");
                    *left = left
                        .checked_sub(b.len() as u64)
                        .expect("piece past the body's end");
                    match out.last_mut() {
                        Some(Out::Body(prev)) => prev.extend_from_slice(b),
                        _ => out.push(Out::Body(b.to_vec())),
                    }
                }
            }
        }
        if rest.is_empty() {
            return Run { out, err: None };
        }
        let want = (*sizes.next().expect("at least one size")).min(rest.len());
        let n = f.feed(&rest[..want]);
        assert!(n > 0, "no space in a drained framer");
        fed += n;
        rest = &rest[n..];
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&header, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(header & 7) + 1;
    if rest.len() < n {
        return;
    }
    let (sizes, stream) = rest.split_at(n);
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
    let bodies = header & 8 != 0;
    let limits = Limits {
        max_literal: [MAX_SMALL_LITERAL, 16, 256, 4096][usize::from((header >> 4) & 3)],
        max_response: if header & 0x40 != 0 {
            512
        } else {
            MAX_RESPONSE
        },
    };

    let whole = run(stream, &[usize::MAX], limits, bodies, true);
    let chunked = run(stream, &chunks, limits, bodies, false);
    if whole.out != chunked.out {
        let i = whole
            .out
            .iter()
            .zip(&chunked.out)
            .position(|(a, b)| a != b)
            .unwrap_or(whole.out.len().min(chunked.out.len()));
        panic!(
            "chunking {chunks:?} changed frame {i}: whole {:?} vs chunked {:?}",
            whole.out.get(i),
            chunked.out.get(i)
        );
    }
    assert_eq!(
        whole.err, chunked.err,
        "chunking {chunks:?} changed the error"
    );
});
