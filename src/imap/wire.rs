//! The IMAP server's byte stream, cut into bounded responses.
//!
//! # Layout
//! - [`Framer`]: sans-I/O. Bytes go in ([`Framer::space`] + [`Framer::filled`],
//!   or [`Framer::feed`]), [`Frame`]s come out ([`Framer::next_frame`]). It
//!   finds where each response ends (lines and literals, RFC 3501 §2.2.2 and
//!   §4.3), accepts a bare LF wherever CRLF belongs, and hands out each
//!   response CRLF-normalised, ready for `imap_proto::Response::parse`. The
//!   message body of a FETCH can be streamed instead of buffered
//!   ([`Framer::set_stream_bodies`]).
//! - [`ImapReader`]: the one tokio-aware driver. It reads from an
//!   [`AsyncRead`] only when the framer needs more, each read under an
//!   inactivity timeout.
//! - [`parse_response`]: imap-proto's parser, guarded against inputs that
//!   make it panic, with a fallback that still recognises status responses
//!   and EXPUNGE / EXPUNGED when imap-proto cannot.
//!
//! # Memory
//! A framer holds its read buffer ([`READ_BUFFER_IDLE`] octets, growing to
//! [`READ_BUFFER`] while data flows and relaxing back when asked) and the
//! current response's octets as they actually arrive: an announced
//! literal size is never an allocation size. The response buffer grows by
//! doubling (so its capacity is at most twice what it holds, and never more
//! than the response limit) and shrinks back to [`RESPONSE_KEEP`] after a
//! response larger than that. A streamed body is handed out straight from
//! the read buffer and costs nothing more.
//!
//! This module depends on nothing else in the crate.

use std::fmt;
use std::time::Duration;

use async_imap::imap_proto::{Outcome, RequestId, Response, Status};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The read buffer while data flows: four maximum-size TLS records (RFC
/// 8446 §5.1: at most 2^14 octets of plaintext each), so one read takes
/// what TLS has decrypted; a streamed body is handed out in pieces of at
/// most this size. The buffer grows to this when a read fills it or a body
/// streams, and shrinks back to [`READ_BUFFER_IDLE`] when the session goes
/// quiet ([`Framer::relax`]).
pub const READ_BUFFER: usize = 64 * 1024;

/// The read buffer of a quiet session (most responses are a line or two;
/// idle POP3 sessions each hold one upstream session).
pub const READ_BUFFER_IDLE: usize = 4 * 1024;

/// Default bound on a buffered literal, one that is not a streamed body.
/// The literals popbridge asks for besides bodies are header fields (an
/// `X-UIDL:` value is at most 70 octets, RFC 1939 §7) and strings in
/// untagged data; 64 KiB is generous for those while a hostile or broken
/// server cannot make a session hold more. A command that wants more (a
/// whole header) raises it with [`Framer::set_max_literal`].
pub const MAX_SMALL_LITERAL: usize = 64 * 1024;

/// Bound on one response, counted in octets received (a CR added before a
/// bare LF counts too; a streamed body does not, it is never held). The
/// largest response popbridge expects is the `* SEARCH` of a maildrop of a
/// million messages, about 8 MB; 32 MiB was async-imap's bound in
/// popbridge before (imap.rs `MAX_RESPONSE`) and stays the ceiling for
/// [`Limits::max_response`].
pub const MAX_RESPONSE: usize = 32 * 1024 * 1024;

/// Capacity of the response buffer kept between responses. Most responses
/// (a FETCH of UID, size and flags; a tagged OK) are under 200 octets, so
/// this avoids an allocation per response without keeping a large
/// response's memory for the rest of the session.
pub const RESPONSE_KEEP: usize = 4 * 1024;

/// The smallest allocation of the response buffer.
const MIN_RESPONSE_ALLOC: usize = 256;

/// [`parse_response`] does not hand a response containing `BODYSTRUCTURE`
/// to imap-proto when it holds more `(` than this: imap-proto 0.17 parses a
/// body structure by recursion without a depth limit, and a deep enough
/// nesting overflows the stack (an abort, not a panic). Measured in a debug
/// build: about 36 KiB of stack per level, 80 levels overflow a tokio
/// worker's 2 MiB; 32 fit in 1.5 MiB (test `deep_bodystructure`). Counting
/// every `(` overestimates the depth, so a wide but shallow structure can be
/// refused too: popbridge never asks for BODYSTRUCTURE.
pub const MAX_PARSE_PARENS: usize = 32;

/// The framer's limits. Defaults: [`MAX_RESPONSE`], [`MAX_SMALL_LITERAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Octets of one response, streamed body excluded; at most
    /// [`MAX_RESPONSE`] (larger values are lowered to it).
    pub max_response: usize,
    /// Octets of one buffered literal; at most `max_response`.
    pub max_literal: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_response: MAX_RESPONSE,
            max_literal: MAX_SMALL_LITERAL,
        }
    }
}

impl Limits {
    /// The limits as enforced: `max_response` at most [`MAX_RESPONSE`],
    /// `max_literal` at most `max_response`.
    fn clamped(self) -> Self {
        let max_response = self.max_response.min(MAX_RESPONSE);
        Self {
            max_response,
            max_literal: self.max_literal.min(max_response),
        }
    }
}

/// What the framer hands out.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// One complete response: its lines with CRLF line ends and its literals
    /// as received. A streamed body appears in it as the empty literal
    /// `{0}\r\n`.
    Response(&'a [u8]),
    /// A FETCH body literal of `len` octets starts; [`Frame::BodyPiece`]s
    /// with exactly `len` octets in all follow (none when `len` is 0), then
    /// the rest of the response.
    BodyStart { len: u64 },
    /// The next octets of the body announced by [`Frame::BodyStart`]; never
    /// empty.
    BodyPiece(&'a [u8]),
}

/// Response and body bytes are mail and mailbox data: `Debug` shows the
/// length and at most the first 100 octets.
impl fmt::Debug for Frame<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |f: &mut fmt::Formatter<'_>, name: &str, b: &[u8]| {
            let head = &b[..b.len().min(100)];
            write!(f, "{name}({} octets: \"{}\"", b.len(), head.escape_ascii())?;
            if head.len() < b.len() {
                write!(f, "...")?;
            }
            write!(f, ")")
        };
        match self {
            Frame::Response(b) => show(f, "Response", b),
            Frame::BodyStart { len } => write!(f, "BodyStart {{ len: {len} }}"),
            Frame::BodyPiece(b) => show(f, "BodyPiece", b),
        }
    }
}

/// Why the framer gave up. The session is unusable afterwards: the framer
/// returns the same error from then on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("IMAP response longer than {limit} octets")]
    ResponseTooLong { limit: usize },
    #[error("IMAP literal of {announced} octets announced, more than the {limit} allowed")]
    LiteralTooLarge { announced: u64, limit: usize },
    #[error("IMAP literal size of more than 64 bits announced")]
    LiteralSizeOverflow,
}

/// Why [`ImapReader::next_frame`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Wire(#[from] WireError),
    /// No octet arrived for this long.
    #[error("no data from the IMAP server for {0:?}")]
    Timeout(Duration),
    /// The server closed the connection part-way through a response.
    #[error("the IMAP server closed the connection inside a response")]
    EofInResponse,
    /// The server closed the connection between two responses.
    #[error("the IMAP server closed the connection")]
    Closed,
    #[error("reading from the IMAP server: {0}")]
    Io(#[from] std::io::Error),
}

/// Memory a framer holds, for tests and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// Capacity of the read buffer: [`READ_BUFFER_IDLE`] or
    /// [`READ_BUFFER`].
    pub read_buffer: usize,
    /// Capacity of the buffer that holds the current response.
    pub response: usize,
}

/// Where the framer is inside the server's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In a line (or between responses): octets up to LF are line text.
    Line,
    /// In a buffered literal with this many octets still to come.
    Literal { remaining: u64 },
    /// A body literal was announced; `BodyStart` is handed out next.
    BodyStart { len: u64 },
    /// In a streamed body literal with this many octets still to come.
    Body { remaining: u64 },
}

/// What the first line says about the current response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The first line is not complete yet.
    Pending,
    /// `* n FETCH ...`: literals, and maybe a body to stream.
    Fetch,
    /// Another untagged response: literals, nothing streamed.
    Untagged,
    /// A tagged response, a status response (`* OK|NO|BAD|BYE|PREAUTH`) or
    /// a continuation request: resp-text has no literals (RFC 3501 §9,
    /// `resp-text`, `continue-req`), so the first line is the response, even
    /// if its text ends with something like `{5}`.
    NoLiterals,
}

/// The frame handed out last; its octets are released at the next call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Nothing,
    /// The response buffer is on loan.
    Response,
    /// This many octets at the front of the read buffer are on loan.
    Piece(usize),
}

/// A frame to hand out, without a borrow (see [`Framer::view`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Response,
    BodyStart(u64),
    Piece(usize),
}

/// Cuts an IMAP server's byte stream into [`Frame`]s. Sans-I/O: see the
/// module documentation.
pub struct Framer {
    /// Octets from the server, [`READ_BUFFER_IDLE`] or [`READ_BUFFER`]
    /// long; `buf[start..end]` are not consumed yet. The only read buffer.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The current response so far, line ends normalised to CRLF, literals
    /// as received. Grows only as octets arrive.
    resp: Vec<u8>,
    /// Where the current line segment starts in `resp`: the line's start, or
    /// just after the literal the line continues from. A CR ending a literal
    /// is not part of the line end.
    seg_start: usize,
    state: State,
    kind: Kind,
    /// Parenthesis depth of the current response outside quoted strings and
    /// literals, up to the end of the last complete segment: a body literal
    /// is an attribute of the FETCH's msg-att list, depth 1.
    depth: u32,
    /// Whether FETCH body literals are streamed rather than buffered.
    stream_bodies: bool,
    /// The framer's limits, clamped.
    limits: Limits,
    /// The bound for the next buffered literal (per command).
    max_literal: usize,
    pending: Pending,
    /// The error that made the framer unusable, returned again on each call.
    failed: Option<WireError>,
}

impl fmt::Debug for Framer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Framer")
            .field("unread", &(self.end - self.start))
            .field("response_octets", &self.resp.len())
            .field("state", &self.state)
            .field("kind", &self.kind)
            .field("stream_bodies", &self.stream_bodies)
            .field("max_literal", &self.max_literal)
            .field("failed", &self.failed)
            .finish()
    }
}

impl Default for Framer {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl Framer {
    pub fn new(limits: Limits) -> Self {
        let limits = limits.clamped();
        Self {
            buf: vec![0; READ_BUFFER_IDLE].into_boxed_slice(),
            start: 0,
            end: 0,
            resp: Vec::new(),
            seg_start: 0,
            state: State::Line,
            kind: Kind::Pending,
            depth: 0,
            stream_bodies: false,
            limits,
            max_literal: limits.max_literal,
            pending: Pending::Nothing,
            failed: None,
        }
    }

    /// Streams FETCH body literals (`BODY[]`, `BODY[]<origin>`, `BINARY[]`,
    /// `RFC822`) instead of buffering them. Takes effect at the next literal.
    pub fn set_stream_bodies(&mut self, on: bool) {
        self.stream_bodies = on;
        if on {
            self.grow();
        }
    }

    /// The read buffer at its full size ([`READ_BUFFER`]), unread octets
    /// kept.
    pub fn grow(&mut self) {
        self.resize(READ_BUFFER);
    }

    /// The read buffer back at [`READ_BUFFER_IDLE`] when what is unread
    /// fits: for a session between commands.
    pub fn relax(&mut self) {
        if !self.stream_bodies && self.end - self.start <= READ_BUFFER_IDLE {
            self.resize(READ_BUFFER_IDLE);
        }
    }

    fn resize(&mut self, size: usize) {
        if self.buf.len() == size {
            return;
        }
        let unread = self.end - self.start;
        let mut buf = vec![0; size.max(unread)].into_boxed_slice();
        buf[..unread].copy_from_slice(&self.buf[self.start..self.end]);
        self.buf = buf;
        self.start = 0;
        self.end = unread;
    }

    /// Bounds the next buffered literals at `max` octets (at most the
    /// response limit), e.g. for a command that fetches whole headers.
    pub fn set_max_literal(&mut self, max: usize) {
        self.max_literal = max.min(self.limits.max_response);
    }

    /// Back to [`Limits::max_literal`].
    pub fn reset_max_literal(&mut self) {
        self.max_literal = self.limits.max_literal;
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn memory(&self) -> Memory {
        Memory {
            read_buffer: self.buf.len(),
            response: self.resp.capacity(),
        }
    }

    /// Whether octets of a response have arrived that no frame has completed:
    /// an EOF now would cut a response.
    pub fn in_response(&mut self) -> bool {
        self.release();
        self.state != State::Line || !self.resp.is_empty() || self.start < self.end
    }

    /// Whether octets received are not yet consumed (after STARTTLS's tagged
    /// OK there must be none: they would be plaintext injected before TLS).
    pub fn has_unread(&mut self) -> bool {
        self.release();
        self.start < self.end
    }

    /// Where to put octets read from the server; follow with
    /// [`Framer::filled`]. Never empty once [`Framer::next_frame`] returned
    /// `Ok(None)`.
    pub fn space(&mut self) -> &mut [u8] {
        self.release();
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// `n` octets were written at the front of [`Framer::space`].
    pub fn filled(&mut self, n: usize) {
        debug_assert!(n <= self.buf.len() - self.end, "filled past the space");
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Copies as much of `data` as fits into the read buffer; returns how
    /// much. Drain [`Framer::next_frame`] before feeding the rest.
    pub fn feed(&mut self, data: &[u8]) -> usize {
        let space = self.space();
        let n = space.len().min(data.len());
        space[..n].copy_from_slice(&data[..n]);
        self.filled(n);
        n
    }

    /// The next frame, or `None` when more octets are needed (all octets
    /// given so far are then consumed). After an error the framer is
    /// unusable and returns that error again.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, WireError> {
        Ok(self.step()?.map(|event| self.view(event)))
    }

    /// The next event without a borrow, so a driver can read more in a loop
    /// and borrow the frame only when there is one.
    fn step(&mut self) -> Result<Option<Event>, WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.release();
        let r = self.advance();
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    fn view(&self, event: Event) -> Frame<'_> {
        match event {
            Event::Response => Frame::Response(&self.resp),
            Event::BodyStart(len) => Frame::BodyStart { len },
            Event::Piece(n) => Frame::BodyPiece(&self.buf[self.start..self.start + n]),
        }
    }

    /// Gives back what the last frame borrowed.
    fn release(&mut self) {
        match std::mem::replace(&mut self.pending, Pending::Nothing) {
            Pending::Nothing => {}
            Pending::Piece(n) => self.start += n,
            Pending::Response => {
                self.resp.clear();
                if self.resp.capacity() > RESPONSE_KEEP {
                    self.resp.shrink_to(RESPONSE_KEEP);
                }
            }
        }
    }

    fn advance(&mut self) -> Result<Option<Event>, WireError> {
        loop {
            match self.state {
                State::BodyStart { len } => {
                    self.state = State::Body { remaining: len };
                    return Ok(Some(Event::BodyStart(len)));
                }
                State::Body { remaining } | State::Literal { remaining } if remaining == 0 => {
                    // The line goes on after the literal (RFC 3501 §4.3: the
                    // octets are followed by the rest of the line).
                    self.state = State::Line;
                    self.seg_start = self.resp.len();
                }
                State::Body { remaining } => {
                    let avail = self.end - self.start;
                    if avail == 0 {
                        return Ok(None);
                    }
                    let n = usize::try_from(remaining).map_or(avail, |r| r.min(avail));
                    self.state = State::Body {
                        remaining: remaining - n as u64,
                    };
                    self.pending = Pending::Piece(n);
                    return Ok(Some(Event::Piece(n)));
                }
                State::Literal { remaining } => {
                    let avail = self.end - self.start;
                    if avail == 0 {
                        return Ok(None);
                    }
                    // Literal octets are copied as they are: CR and LF
                    // inside them are data (RFC 3501 §4.3).
                    let n = usize::try_from(remaining).map_or(avail, |r| r.min(avail));
                    push(
                        &mut self.resp,
                        &self.buf[self.start..self.start + n],
                        self.limits.max_response,
                    )?;
                    self.start += n;
                    self.state = State::Literal {
                        remaining: remaining - n as u64,
                    };
                }
                State::Line => {
                    let data = &self.buf[self.start..self.end];
                    if data.is_empty() {
                        return Ok(None);
                    }
                    let limit = self.limits.max_response;
                    let Some(lf) = memchr::memchr(b'\n', data) else {
                        push(&mut self.resp, data, limit)?;
                        self.start = self.end;
                        return Ok(None);
                    };
                    push(&mut self.resp, &data[..lf], limit)?;
                    self.start += lf + 1;
                    // RFC 3501 §2.2: lines end with CRLF. A bare LF ends one
                    // too (GNU Mailutils ends a tagged reply with one); the
                    // parser is given CRLF either way. The CR may have come
                    // in an earlier read, but not from a literal.
                    if self.resp.len() > self.seg_start && self.resp.last() == Some(&b'\r') {
                        push(&mut self.resp, b"\n", limit)?;
                    } else {
                        push(&mut self.resp, b"\r\n", limit)?;
                    }
                    if let Some(event) = self.line_end()? {
                        return Ok(Some(event));
                    }
                }
            }
        }
    }

    /// A line segment ended (its CRLF is in `resp`): the response is
    /// complete, or a literal follows.
    fn line_end(&mut self) -> Result<Option<Event>, WireError> {
        let seg_end = self.resp.len() - 2;
        let seg = &self.resp[self.seg_start..seg_end];
        if self.kind == Kind::Pending {
            self.kind = classify(seg);
        }
        if self.kind == Kind::Fetch {
            self.depth = scan_depth(seg, self.depth);
        }
        let marker = match self.kind {
            Kind::Fetch | Kind::Untagged => literal_marker(seg)?,
            Kind::Pending | Kind::NoLiterals => None,
        };
        let Some((at, len)) = marker else {
            // RFC 3501 §2.2.2: a line not ending in a literal ends the
            // response.
            self.pending = Pending::Response;
            self.seg_start = 0;
            self.kind = Kind::Pending;
            self.depth = 0;
            return Ok(Some(Event::Response));
        };
        let marker_start = self.seg_start + at;
        if self.stream_bodies
            && self.kind == Kind::Fetch
            && self.depth == 1
            && is_body_attribute(&seg[..at])
        {
            // The parser still sees the attribute, with an empty literal.
            self.resp.truncate(marker_start);
            push(&mut self.resp, b"{0}\r\n", self.limits.max_response)?;
            self.state = State::BodyStart { len };
        } else {
            if len > self.max_literal as u64 {
                return Err(WireError::LiteralTooLarge {
                    announced: len,
                    limit: self.max_literal,
                });
            }
            self.state = State::Literal { remaining: len };
        }
        Ok(None)
    }
}

/// Appends `data` to the response, refusing to pass `limit`. Capacity
/// doubles (amortised copies) but never passes `limit`, and only ever
/// follows octets actually appended.
fn push(resp: &mut Vec<u8>, data: &[u8], limit: usize) -> Result<(), WireError> {
    let need = resp
        .len()
        .checked_add(data.len())
        .filter(|&n| n <= limit)
        .ok_or(WireError::ResponseTooLong { limit })?;
    if need > resp.capacity() {
        let target = need
            .max(resp.capacity().saturating_mul(2))
            .max(MIN_RESPONSE_ALLOC)
            .min(limit);
        resp.reserve_exact(target - resp.len());
    }
    resp.extend_from_slice(data);
    Ok(())
}

/// What the first line segment says about the response (RFC 3501 §7:
/// status responses, server data, continuation requests; §9 `response`).
fn classify(first: &[u8]) -> Kind {
    let Some(rest) = first.strip_prefix(b"* ") else {
        // A tagged response or a continuation request (or garbage): no
        // literals in `response-tagged` or `continue-req`.
        return Kind::NoLiterals;
    };
    let word_len = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
    let (word, after) = rest.split_at(word_len);
    if status_word(word).is_some() {
        Kind::NoLiterals
    } else if !word.is_empty()
        && word.iter().all(u8::is_ascii_digit)
        && starts_with_ci(after, b" FETCH ")
    {
        Kind::Fetch
    } else {
        Kind::Untagged
    }
}

/// `OK`, `NO`, `BAD`, `BYE`, `PREAUTH` in any case.
fn status_word(word: &[u8]) -> Option<Status> {
    [
        (&b"OK"[..], Status::Ok),
        (b"NO", Status::No),
        (b"BAD", Status::Bad),
        (b"BYE", Status::Bye),
        (b"PREAUTH", Status::PreAuth),
    ]
    .into_iter()
    .find(|(w, _)| word.eq_ignore_ascii_case(w))
    .map(|(_, s)| s)
}

fn starts_with_ci(s: &[u8], prefix: &[u8]) -> bool {
    s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

fn ends_with_ci(s: &[u8], suffix: &[u8]) -> bool {
    s.len() >= suffix.len() && s[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

/// The parenthesis depth after `seg`, starting from `depth`, outside quoted
/// strings (RFC 3501 §4.3: a quoted string cannot hold CR or LF, so it never
/// spans a literal or a line).
fn scan_depth(seg: &[u8], mut depth: u32) -> u32 {
    let mut quoted = false;
    let mut escaped = false;
    for &b in seg {
        if quoted {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                quoted = false;
            }
        } else {
            match b {
                b'"' => quoted = true,
                b'(' => depth = depth.saturating_add(1),
                b')' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    depth
}

/// A literal announced at the end of a line segment: `{n}` (RFC 3501 §4.3),
/// `{n+}` (RFC 7888 §3, a client's form, accepted anyway) or `~{n}`
/// (literal8, RFC 3516 §4.2 and RFC 9051 §4.3, whose sizes are `number64`).
/// Returns where the marker starts in `seg` and the announced size.
fn literal_marker(seg: &[u8]) -> Result<Option<(usize, u64)>, WireError> {
    let Some(rest) = seg.strip_suffix(b"}") else {
        return Ok(None);
    };
    let rest = rest.strip_suffix(b"+").unwrap_or(rest);
    let digits = rest.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    let open = rest.len() - digits;
    if digits == 0 || open == 0 || rest[open - 1] != b'{' {
        return Ok(None);
    }
    let mut len: u64 = 0;
    for &d in &rest[open..] {
        len = len
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(d - b'0')))
            .ok_or(WireError::LiteralSizeOverflow)?;
    }
    let brace = open - 1;
    let at = if brace > 0 && rest[brace - 1] == b'~' {
        brace - 1
    } else {
        brace
    };
    Ok(Some((at, len)))
}

/// Whether the text before a literal marker ends with a message body
/// attribute and its space: `BODY[]`, `BODY[]<origin>`, `BINARY[]`,
/// `BINARY[]<origin>` or `RFC822` (RFC 3501 §7.4.2, RFC 3516 §4.2), in any
/// case, starting the segment's text after `(` or a space.
fn is_body_attribute(before: &[u8]) -> bool {
    let Some(name) = before.strip_suffix(b" ") else {
        return false;
    };
    let mut with_origin = false;
    let mut name = name;
    if let Some(inner) = name.strip_suffix(b">") {
        let digits = inner
            .iter()
            .rev()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if let Some(n) = inner[..inner.len() - digits].strip_suffix(b"<") {
            if digits > 0 {
                name = n;
                with_origin = true;
            }
        }
    }
    let attrs: [(&[u8], bool); 3] = [(b"BODY[]", true), (b"BINARY[]", true), (b"RFC822", false)];
    attrs.iter().any(|&(attr, origin_allowed)| {
        (origin_allowed || !with_origin)
            && ends_with_ci(name, attr)
            && matches!(
                name.len().checked_sub(attr.len() + 1).map(|i| name[i]),
                Some(b'(' | b' ')
            )
    })
}

/// The async driver: reads from `io` only when the framer needs more.
///
/// Commands are written by the caller: on the same stream through
/// [`ImapReader::get_mut`], or on the write half when `R` is a read half.
/// Dropping a pending [`ImapReader::next_frame`] loses nothing (tokio's
/// `read` is cancel-safe and octets enter the framer only once read).
pub struct ImapReader<R> {
    io: R,
    framer: Framer,
    /// The longest wait for the next octet: a server that keeps sending,
    /// however slowly, is never cut off; one that stalls is, mid-response or
    /// not.
    inactivity: Duration,
}

impl<R> fmt::Debug for ImapReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImapReader")
            .field("framer", &self.framer)
            .field("inactivity", &self.inactivity)
            .finish_non_exhaustive()
    }
}

impl<R: AsyncRead + Unpin> ImapReader<R> {
    pub fn new(io: R, framer: Framer, inactivity: Duration) -> Self {
        Self {
            io,
            framer,
            inactivity,
        }
    }

    /// The next frame, reading from the server as needed, each read under
    /// the inactivity timeout. EOF inside a response is
    /// [`ReadError::EofInResponse`], between responses [`ReadError::Closed`].
    pub async fn next_frame(&mut self) -> Result<Frame<'_>, ReadError> {
        loop {
            if let Some(event) = self.framer.step()? {
                return Ok(self.framer.view(event));
            }
            let space = self.framer.space();
            let room = space.len();
            let n = match tokio::time::timeout(self.inactivity, self.io.read(space)).await {
                Err(_) => return Err(ReadError::Timeout(self.inactivity)),
                Ok(r) => r?,
            };
            if n == room {
                // More is probably waiting: read in larger pieces.
                self.framer.filled(n);
                self.framer.grow();
                continue;
            }
            if n == 0 {
                return Err(if self.framer.in_response() {
                    ReadError::EofInResponse
                } else {
                    ReadError::Closed
                });
            }
            self.framer.filled(n);
        }
    }

    /// To switch body streaming and literal bounds per command.
    pub fn framer_mut(&mut self) -> &mut Framer {
        &mut self.framer
    }

    pub fn get_ref(&self) -> &R {
        &self.io
    }

    /// The stream, e.g. to write a command on it.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.io
    }

    /// The stream and the framer (e.g. for STARTTLS: check
    /// [`Framer::has_unread`] first, then wrap the stream).
    pub fn into_parts(self) -> (R, Framer) {
        (self.io, self.framer)
    }
}

/// A response frame, parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// Parsed by imap-proto, or, when it could not, recognised here: a
    /// tagged `OK`/`NO`/`BAD` ([`Response::Done`]), an untagged
    /// `OK`/`NO`/`BAD`/`BYE`/`PREAUTH` ([`Response::Data`]) or continuation
    /// ([`Response::Continue`]) with the whole text (response code included,
    /// e.g. `[EXPUNGEISSUED] ...`) as `information` and no `code`, and
    /// `* n EXPUNGE` or GNU Mailutils' `* n EXPUNGED` ([`Response::Expunge`]).
    Known(Response<'a>),
    /// Neither: the caller logs it (at debug) and skips it.
    Unknown(&'a [u8]),
}

/// Parses one [`Frame::Response`].
///
/// imap-proto 0.17 is not given inputs known to make it panic or overflow
/// the stack (see [`imap_proto_would_crash`]); those, and everything it
/// cannot parse, go to a small fallback parser.
pub fn parse_response(frame: &[u8]) -> Parsed<'_> {
    if !imap_proto_would_crash(frame) {
        if let Ok((rest, response)) = Response::parse(frame) {
            if rest.is_empty() {
                return Parsed::Known(response);
            }
        }
    }
    fallback(frame)
}

/// Inputs on which imap-proto 0.17 panics or recurses without bound (read
/// from its source, confirmed by the tests below):
/// - `INTERNALDATE NIL` in a FETCH: `msg_att_internal_date` unwraps the
///   nstring;
/// - a response code followed directly by a non-ASCII octet, e.g.
///   `a OK [ALERT]\xc3\xa9`: `Outcome::parse` slices `text[1..]` inside a
///   multi-byte character (only on the first line: resp-text ends there);
/// - `* METADATA` with non-UTF-8 octets: rfc5464's `slice_to_str` unwraps
///   `from_utf8`;
/// - a deeply nested `BODYSTRUCTURE` (see [`MAX_PARSE_PARENS`]).
///
/// Each test is a superset of the trigger, searched over the whole frame
/// (literals included, as imap-proto may not see a literal where the framer
/// did, e.g. `{n+}`).
fn imap_proto_would_crash(frame: &[u8]) -> bool {
    let first_line = &frame[..memchr::memchr(b'\n', frame).unwrap_or(frame.len())];
    find_ci(frame, b"INTERNALDATE NIL")
        || first_line
            .windows(2)
            .any(|w| w[0] == b']' && !w[1].is_ascii())
        || (starts_with_ci(frame, b"* METADATA") && !frame.is_ascii())
        || (find_ci(frame, b"BODYSTRUCTURE")
            && memchr::memchr_iter(b'(', frame).count() > MAX_PARSE_PARENS)
}

/// Whether `needle` (ASCII, upper case, not empty) occurs in `hay` in any
/// case.
fn find_ci(hay: &[u8], needle: &[u8]) -> bool {
    let (first, rest) = match needle.split_first() {
        Some(split) => split,
        None => return true,
    };
    memchr::memchr2_iter(*first, first.to_ascii_lowercase(), hay)
        .any(|i| starts_with_ci(&hay[i + 1..], rest))
}

/// resp-text as information, without a code (the code stays in the text).
fn outcome(text: &[u8]) -> Outcome<'_> {
    Outcome {
        code: None,
        information: (!text.is_empty()).then(|| String::from_utf8_lossy(text)),
    }
}

/// `word SP rest`, or `word` at the end of the line.
fn split_word(s: &[u8]) -> (&[u8], &[u8]) {
    match s.iter().position(|&b| b == b' ') {
        Some(i) => (&s[..i], &s[i + 1..]),
        None => (s, &[]),
    }
}

/// Status responses and EXPUNGE(D) when imap-proto failed on them: one line
/// (no literals), recognised by its first words only.
fn fallback(frame: &[u8]) -> Parsed<'_> {
    let unknown = Parsed::Unknown(frame);
    let Some(line) = frame.strip_suffix(b"\r\n") else {
        return unknown;
    };
    if memchr::memchr2(b'\r', b'\n', line).is_some() {
        return unknown;
    }
    if let Some(rest) = line.strip_prefix(b"+") {
        // continue-req (RFC 3501 §7.5); some servers omit the space.
        let rest = rest.strip_prefix(b" ").unwrap_or(rest);
        return Parsed::Known(Response::Continue(outcome(rest)));
    }
    if let Some(rest) = line.strip_prefix(b"* ") {
        let (word, after) = split_word(rest);
        if let Some(status) = status_word(word) {
            // RFC 3501 §7.1: untagged status responses.
            return Parsed::Known(Response::Data {
                status,
                outcome: outcome(after),
            });
        }
        // RFC 3501 §7.4.1 `* n EXPUNGE`; GNU Mailutils sends `EXPUNGED`.
        let (what, tail) = split_word(after);
        let n = std::str::from_utf8(word)
            .ok()
            .filter(|w| w.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|w| w.parse::<u32>().ok())
            .filter(|&n| n > 0);
        if let Some(n) = n {
            if (what.eq_ignore_ascii_case(b"EXPUNGE") || what.eq_ignore_ascii_case(b"EXPUNGED"))
                && tail.iter().all(|&b| b == b' ')
            {
                return Parsed::Known(Response::Expunge(n));
            }
        }
        return unknown;
    }
    // RFC 3501 §7.1 / §9: response-tagged = tag SP resp-cond-state. Tag
    // characters: ASTRING-CHAR except "+", here ASCII only.
    let (tag, after) = split_word(line);
    let (word, rest) = split_word(after);
    let tag_ok = !tag.is_empty()
        && tag
            .iter()
            .all(|&b| b.is_ascii_graphic() && !b"(){%*\"\\+".contains(&b));
    match status_word(word) {
        Some(status @ (Status::Ok | Status::No | Status::Bad)) if tag_ok => {
            Parsed::Known(Response::Done {
                tag: RequestId(String::from_utf8_lossy(tag).into_owned()),
                status,
                outcome: outcome(rest),
            })
        }
        _ => unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_imap::imap_proto::{AttributeValue, MailboxDatum};
    use std::borrow::Cow;

    /// A frame, owned; consecutive body pieces are merged so that results
    /// compare across chunkings.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Out {
        Response(String),
        BodyStart(u64),
        Body(Vec<u8>),
    }

    fn show(b: &[u8]) -> String {
        b.escape_ascii().to_string()
    }

    fn record(out: &mut Vec<Out>, frame: Frame<'_>) {
        match frame {
            Frame::Response(b) => {
                assert!(b.ends_with(b"\r\n"), "response without CRLF: {frame:?}");
                out.push(Out::Response(show(b)));
            }
            Frame::BodyStart { len } => out.push(Out::BodyStart(len)),
            Frame::BodyPiece(b) => {
                assert!(!b.is_empty(), "empty body piece");
                if let Some(Out::Body(prev)) = out.last_mut() {
                    prev.extend_from_slice(b);
                } else {
                    out.push(Out::Body(b.to_vec()));
                }
            }
        }
    }

    /// Feeds `stream` in reads of `chunk` octets; returns the frames and the
    /// error that ended them, if any. Checks the memory bounds throughout.
    fn run_with(stream: &[u8], chunk: usize, framer: &mut Framer) -> (Vec<Out>, Option<WireError>) {
        let mut out = Vec::new();
        let mut rest = stream;
        loop {
            loop {
                let m = framer.memory();
                assert!(m.read_buffer <= READ_BUFFER, "{m:?}");
                assert!(m.response <= framer.limits().max_response, "{m:?}");
                match framer.next_frame() {
                    Ok(Some(frame)) => record(&mut out, frame),
                    Ok(None) => break,
                    Err(e) => {
                        // The framer stays failed.
                        assert_eq!(framer.next_frame().err(), Some(e.clone()));
                        return (out, Some(e));
                    }
                }
            }
            if rest.is_empty() {
                return (out, None);
            }
            let n = framer.feed(&rest[..chunk.min(rest.len())]);
            assert!(n > 0, "no space after a drained framer");
            rest = &rest[n..];
        }
    }

    fn run(stream: &[u8], chunk: usize, bodies: bool) -> (Vec<Out>, Option<WireError>) {
        let mut f = Framer::default();
        f.set_stream_bodies(bodies);
        run_with(stream, chunk, &mut f)
    }

    /// Frames of a stream fed whole, which must end cleanly.
    fn frames(stream: &[u8], bodies: bool) -> Vec<Out> {
        let (out, err) = run(stream, usize::MAX, bodies);
        assert_eq!(err, None, "{out:?}");
        out
    }

    fn resp(s: &str) -> Out {
        Out::Response(show(s.as_bytes()))
    }

    /// The response frames of a stream, fed whole, as bytes.
    fn responses(stream: &[u8]) -> Vec<Vec<u8>> {
        let mut f = Framer::default();
        f.set_stream_bodies(true);
        let mut all = Vec::new();
        let mut rest = stream;
        loop {
            while let Some(frame) = f.next_frame().expect("frame") {
                if let Frame::Response(b) = frame {
                    all.push(b.to_vec());
                }
            }
            if rest.is_empty() {
                return all;
            }
            let n = f.feed(rest);
            rest = &rest[n..];
        }
    }

    fn parse_one(b: &[u8]) -> Parsed<'_> {
        parse_response(b)
    }

    /// Dovecot, GNU Mailutils and Cyrus shapes, literals of every kind,
    /// line ends of both kinds.
    const TRANSCRIPT: &[u8] = b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n\
a1 OK AUTHENTICATE Completed\n\
* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\n\
* 3 EXISTS\r\n\
* OK [UIDVALIDITY 1700000000] UIDs valid\r\n\
a2 OK [READ-WRITE] Select completed (0.001 + 0.000 secs).\r\n\
* 1 FETCH (UID 7 RFC822.SIZE 120 BODY[HEADER.FIELDS (X-UIDL)] {18}\r\nX-UIDL: abc\r\n\r\n\n\r\n FLAGS (\\Seen))\r\n\
* 2 FETCH (UID 8 BODY[HEADER.FIELDS (X-UIDL)] {3}\nab\r\n)\n\
* 3 FETCH (UID 9 BODY[HEADER.FIELDS (X-UIDL)] ~{4}\r\na\0b\n FLAGS ())\r\n\
* 3 FETCH (UID 9 X-LIT {2+}\r\nxy)\r\n\
a3 OK Fetch completed.\r\n\
* 1 FETCH (UID 7 BODY[]<0> {12}\r\nab\rcd\nef\r\n\r\n)\r\n\
* 2 FETCH (UID 8 BODY[] {0}\r\n FLAGS (\\Seen))\r\n\
* 3 FETCH (body[] {5}\nhello UID 9)\n\
a4 OK Fetch completed.\n\
* 6 FETCH (UID 10 BODY[] NIL)\r\n\
* 6 EXPUNGE\r\n\
a5 OK [EXPUNGEISSUED] Some messages were expunged\r\n\
A6 OK Completed (0.001 secs 1 calls)\r\n\
* 1 EXPUNGED\n\
a7 NO can't {5}\r\n\
* OK still here {3}\r\n\
\n\
* BYE Logging out\r\n\
a8 OK Logout completed.\r\n";

    /// A quiet framer holds a small read buffer; streaming a body grows it,
    /// and relaxing (between commands) shrinks it back, unread octets kept.
    #[test]
    fn the_read_buffer_grows_for_bodies_and_relaxes_when_quiet() {
        let mut f = Framer::default();
        assert_eq!(f.memory().read_buffer, READ_BUFFER_IDLE);
        f.set_stream_bodies(true);
        assert_eq!(f.memory().read_buffer, READ_BUFFER);
        f.feed(b"* 1 FETCH (UID 1 BODY[] {3}\r\nabc)\r\na OK");
        while let Ok(Some(_)) = f.next_frame() {}
        f.set_stream_bodies(false);
        f.relax();
        assert_eq!(f.memory().read_buffer, READ_BUFFER_IDLE);
        f.feed(b" done\r\n");
        let mut last = Vec::new();
        while let Ok(Some(frame)) = f.next_frame() {
            if let Frame::Response(r) = frame {
                last = r.to_vec();
            }
        }
        assert_eq!(last, b"a OK done\r\n", "the unread part survived");
    }

    #[test]
    fn transcript_frames() {
        let got = frames(TRANSCRIPT, true);
        let want = vec![
            resp("* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n"),
            resp("a1 OK AUTHENTICATE Completed\r\n"),
            resp("* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"),
            resp("* 3 EXISTS\r\n"),
            resp("* OK [UIDVALIDITY 1700000000] UIDs valid\r\n"),
            resp("a2 OK [READ-WRITE] Select completed (0.001 + 0.000 secs).\r\n"),
            // Literal contents untouched (CRLF, a bare LF), line ends CRLF.
            resp("* 1 FETCH (UID 7 RFC822.SIZE 120 BODY[HEADER.FIELDS (X-UIDL)] {18}\r\nX-UIDL: abc\r\n\r\n\n\r\n FLAGS (\\Seen))\r\n"),
            // A CR ending a literal is data, not half of a line end.
            resp("* 2 FETCH (UID 8 BODY[HEADER.FIELDS (X-UIDL)] {3}\r\nab\r\r\n"),
            resp(")\r\n"),
            resp("* 3 FETCH (UID 9 BODY[HEADER.FIELDS (X-UIDL)] ~{4}\r\na\0b\n FLAGS ())\r\n"),
            resp("* 3 FETCH (UID 9 X-LIT {2+}\r\nxy)\r\n"),
            resp("a3 OK Fetch completed.\r\n"),
            Out::BodyStart(12),
            Out::Body(b"ab\rcd\nef\r\n\r\n".to_vec()),
            resp("* 1 FETCH (UID 7 BODY[]<0> {0}\r\n)\r\n"),
            Out::BodyStart(0),
            resp("* 2 FETCH (UID 8 BODY[] {0}\r\n FLAGS (\\Seen))\r\n"),
            Out::BodyStart(5),
            Out::Body(b"hello".to_vec()),
            resp("* 3 FETCH (body[] {0}\r\n UID 9)\r\n"),
            resp("a4 OK Fetch completed.\r\n"),
            resp("* 6 FETCH (UID 10 BODY[] NIL)\r\n"),
            resp("* 6 EXPUNGE\r\n"),
            resp("a5 OK [EXPUNGEISSUED] Some messages were expunged\r\n"),
            resp("A6 OK Completed (0.001 secs 1 calls)\r\n"),
            resp("* 1 EXPUNGED\r\n"),
            // resp-text has no literals.
            resp("a7 NO can't {5}\r\n"),
            resp("* OK still here {3}\r\n"),
            resp("\r\n"),
            resp("* BYE Logging out\r\n"),
            resp("a8 OK Logout completed.\r\n"),
        ];
        assert_eq!(got, want);

        // Without streaming, bodies are literals like any other.
        let got = frames(TRANSCRIPT, false);
        assert!(got.contains(&resp(
            "* 1 FETCH (UID 7 BODY[]<0> {12}\r\nab\rcd\nef\r\n\r\n)\r\n"
        )));
        assert!(!got
            .iter()
            .any(|o| matches!(o, Out::BodyStart(_) | Out::Body(_))));
    }

    /// Stalwart's idea: the same transcript in reads of 1, 2, 3 … 512 octets
    /// gives the same frames as in one read.
    #[test]
    fn chunking_does_not_change_frames() {
        for bodies in [true, false] {
            let whole = run(TRANSCRIPT, usize::MAX, bodies);
            assert_eq!(whole.1, None);
            for chunk in 1..=512 {
                assert_eq!(run(TRANSCRIPT, chunk, bodies), whole, "chunk {chunk}");
            }
        }
    }

    /// A body split at every offset, CR and LF inside it, attributes after.
    #[test]
    fn body_piece_boundary_at_every_offset() {
        let body: Vec<u8> = (0..300u32)
            .map(|i| b"ab\r\ncd\n\r."[i as usize % 9])
            .collect();
        let mut stream = b"* 4 FETCH (UID 11 BODY[] {300}\r\n".to_vec();
        stream.extend_from_slice(&body);
        stream.extend_from_slice(b" FLAGS (\\Seen))\r\na9 OK done\r\n");
        let want = vec![
            Out::BodyStart(300),
            Out::Body(body.clone()),
            resp("* 4 FETCH (UID 11 BODY[] {0}\r\n FLAGS (\\Seen))\r\n"),
            resp("a9 OK done\r\n"),
        ];
        for cut in 0..=stream.len() {
            let mut f = Framer::default();
            f.set_stream_bodies(true);
            let mut out = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                assert_eq!(f.feed(part), part.len());
                while let Some(frame) = f.next_frame().expect("frame") {
                    record(&mut out, frame);
                }
            }
            assert_eq!(out, want, "cut at {cut}");
        }
    }

    /// `)` after the body with more attributes: the parser sees them all.
    #[test]
    fn attributes_after_body() {
        let stream = b"* 1 FETCH (BODY[] {5}\r\nhello UID 10 FLAGS (\\Seen))\r\n";
        assert_eq!(
            frames(stream, true),
            vec![
                Out::BodyStart(5),
                Out::Body(b"hello".to_vec()),
                resp("* 1 FETCH (BODY[] {0}\r\n UID 10 FLAGS (\\Seen))\r\n"),
            ]
        );
        let r = responses(stream);
        assert_eq!(
            parse_one(&r[0]),
            Parsed::Known(Response::Fetch(
                1,
                vec![
                    AttributeValue::BodySection {
                        section: None,
                        index: None,
                        data: Some(Cow::Borrowed(&b""[..])),
                    },
                    AttributeValue::Uid(10),
                    AttributeValue::Flags(vec![Cow::Borrowed("\\Seen")]),
                ]
            ))
        );
    }

    /// Which literals are bodies: only the message's, at the msg-att level.
    #[test]
    fn body_attributes() {
        let streamed = |line: &str| {
            let stream = format!("{line} {{3}}\r\nabc)\r\n");
            frames(stream.as_bytes(), true)
                .iter()
                .any(|o| matches!(o, Out::BodyStart(3)))
        };
        for yes in [
            "* 1 FETCH (BODY[]",
            "* 1 FETCH (UID 5 BODY[]<0>",
            "* 1 FETCH (UID 5 BODY[]<1024>",
            "* 12 fetch (uid 5 body[]",
            "* 1 FETCH (BINARY[]",
            "* 1 FETCH (UID 2 RFC822",
            "* 1 FETCH (FLAGS (\\Seen) BODY[]",
        ] {
            assert!(streamed(yes), "{yes}");
        }
        for no in [
            "* 1 FETCH (BODY[HEADER]",
            "* 1 FETCH (BODY[TEXT]",
            "* 1 FETCH (BODY[1]",
            "* 1 FETCH (RFC822.HEADER",
            "* 1 FETCH (RFC822.TEXT",
            "* 1 FETCH (RFC822<0>",
            "* 1 FETCH (XBODY[]",
            "* 1 FETCH (X (BODY[]",
            "* 1 FETCH (X \"(\" BODY[] (",
            "* 1 FETCH (BODY[]<>",
            "* 1 SEARCH BODY[]",
            "* 1 FETCH(BODY[]",
        ] {
            assert!(!streamed(no), "{no}");
        }
        // After a buffered literal, on the continuation line.
        let stream = b"* 1 FETCH (BODY[HEADER] {2}\r\nab BODY[] {3}\r\nxyz)\r\n";
        assert_eq!(
            frames(stream, true),
            vec![
                Out::BodyStart(3),
                Out::Body(b"xyz".to_vec()),
                resp("* 1 FETCH (BODY[HEADER] {2}\r\nab BODY[] {0}\r\n)\r\n"),
            ]
        );
        // A quoted `)` does not end the list.
        let stream = b"* 1 FETCH (X \")\" BODY[] {3}\r\nxyz)\r\n";
        assert!(frames(stream, true).contains(&Out::BodyStart(3)));
        // literal8 and non-synchronising markers are replaced whole.
        let stream = b"* 1 FETCH (BINARY[] ~{3}\r\nx\0z RFC822 {2+}\r\nab)\r\n";
        assert_eq!(
            frames(stream, true),
            vec![
                Out::BodyStart(3),
                Out::Body(b"x\0z".to_vec()),
                Out::BodyStart(2),
                Out::Body(b"ab".to_vec()),
                resp("* 1 FETCH (BINARY[] {0}\r\n RFC822 {0}\r\n)\r\n"),
            ]
        );
    }

    /// A literal marker at the very end of a read, and CR and LF in
    /// different reads.
    #[test]
    fn marker_at_end_of_read() {
        for parts in [
            &[&b"* 1 FETCH (BODY[HEADER] {5}"[..], b"\r\nhel", b"lo)\r\n"][..],
            &[b"* 1 FETCH (BODY[HEADER] {5}\r", b"\nhello", b")\r", b"\n"],
            &[b"* 1 FETCH (BODY[HEADER] {5}\r\n", b"hello)", b"\n"],
            &[
                b"* 1 FETCH (BODY[HEADER] {",
                b"5",
                b"}",
                b"\n",
                b"hello",
                b")\n",
            ],
        ] {
            let mut f = Framer::default();
            let mut out = Vec::new();
            for p in parts {
                assert_eq!(f.feed(p), p.len());
                while let Some(frame) = f.next_frame().expect("frame") {
                    record(&mut out, frame);
                }
            }
            assert_eq!(
                out,
                vec![resp("* 1 FETCH (BODY[HEADER] {5}\r\nhello)\r\n")],
                "{parts:?}"
            );
            assert!(!f.in_response());
        }
    }

    /// An announced size is not an allocation size.
    #[test]
    fn announced_size_does_not_grow_the_buffer() {
        let head = b"* 1 FETCH (UID 1 BODY[]<0> {500000000}\r\n";
        // Streamed: nothing is buffered for the body.
        let mut f = Framer::default();
        f.set_stream_bodies(true);
        f.feed(head);
        assert_eq!(
            f.next_frame(),
            Ok(Some(Frame::BodyStart { len: 500_000_000 }))
        );
        assert_eq!(f.next_frame(), Ok(None));
        assert!(
            f.memory().response <= MIN_RESPONSE_ALLOC,
            "{:?}",
            f.memory()
        );
        f.feed(b"some octets");
        assert_eq!(f.next_frame(), Ok(Some(Frame::BodyPiece(b"some octets"))));
        assert!(f.memory().response <= MIN_RESPONSE_ALLOC);
        assert!(f.in_response());

        // Not streamed, the bound raised to the response limit: the buffer
        // grows with the octets that arrive, not with the announcement.
        let mut f = Framer::default();
        f.set_max_literal(MAX_RESPONSE);
        f.feed(b"* 1 FETCH (UID 1 BODY[] {30000000}\r\n");
        assert_eq!(f.next_frame(), Ok(None));
        assert!(
            f.memory().response <= MIN_RESPONSE_ALLOC,
            "{:?}",
            f.memory()
        );
        let kib = [b'x'; 1024];
        for _ in 0..100 {
            f.feed(&kib);
            assert_eq!(f.next_frame(), Ok(None));
        }
        let m = f.memory();
        assert!(
            m.response >= 100 * 1024 && m.response <= 2 * (100 * 1024 + 64),
            "{m:?}"
        );

        // Not streamed, default bound: refused at the announcement.
        let mut f = Framer::default();
        f.feed(head);
        assert_eq!(
            f.next_frame(),
            Err(WireError::LiteralTooLarge {
                announced: 500_000_000,
                limit: MAX_SMALL_LITERAL
            })
        );
        assert!(f.memory().response <= MIN_RESPONSE_ALLOC);
    }

    #[test]
    fn small_literal_over_its_bound() {
        let (out, err) = run(
            b"* 1 EXISTS\r\n* 1 FETCH (BODY[HEADER] {65537}\r\nabc",
            7,
            true,
        );
        assert_eq!(out, vec![resp("* 1 EXISTS\r\n")]);
        assert_eq!(
            err,
            Some(WireError::LiteralTooLarge {
                announced: 65537,
                limit: 65536
            })
        );
        let mut f = Framer::default();
        f.set_max_literal(100);
        let mut ok = b"* 1 FETCH (BODY[HEADER] {100}\r\n".to_vec();
        ok.extend_from_slice(&[b'h'; 100]);
        ok.extend_from_slice(b")\r\n");
        let (out, err) = run_with(&ok, 13, &mut f);
        assert_eq!((out.len(), err), (1, None));
        let (_, err) = run_with(b"* 1 FETCH (BODY[HEADER] {101}\r\n", 13, &mut f);
        assert!(matches!(err, Some(WireError::LiteralTooLarge { .. })));
        let mut f = Framer::default();
        f.set_max_literal(100);
        f.reset_max_literal();
        let (_, err) = run_with(&ok, 13, &mut f);
        assert_eq!(err, None);
        // A size past 64 bits.
        let (_, err) = run(b"* 1 FETCH (BODY[] {99999999999999999999}\r\n", 5, true);
        assert_eq!(err, Some(WireError::LiteralSizeOverflow));
    }

    #[test]
    fn response_bound() {
        let limits = Limits {
            max_response: 100,
            max_literal: 50,
        };
        let ok = format!("* SEARCH {}\r\n", "1 ".repeat(44));
        assert_eq!(ok.len(), 99);
        let long = format!("* SEARCH {}\r\n", "1 ".repeat(46));
        for chunk in [1, 7, 100, usize::MAX] {
            let mut f = Framer::new(limits);
            let (out, err) = run_with(ok.as_bytes(), chunk, &mut f);
            assert_eq!((out.len(), err), (1, None));
            let mut f = Framer::new(limits);
            let (out, err) = run_with(long.as_bytes(), chunk, &mut f);
            assert_eq!(out, vec![]);
            assert_eq!(err, Some(WireError::ResponseTooLong { limit: 100 }));
            // Many small literals add up.
            let mut f = Framer::new(limits);
            let many = "* 1 FETCH (X {4}\r\nabcd".repeat(10);
            let (_, err) = run_with(many.as_bytes(), chunk, &mut f);
            assert_eq!(err, Some(WireError::ResponseTooLong { limit: 100 }));
            // A streamed body does not count.
            let mut f = Framer::new(limits);
            f.set_stream_bodies(true);
            let body = format!("* 1 FETCH (BODY[] {{1000}}\r\n{})\r\n", "b".repeat(1000));
            let (out, err) = run_with(body.as_bytes(), chunk, &mut f);
            assert_eq!((out.len(), err), (3, None));
        }
        // The ceiling.
        let f = Framer::new(Limits {
            max_response: usize::MAX,
            max_literal: usize::MAX,
        });
        assert_eq!(
            f.limits(),
            Limits {
                max_response: MAX_RESPONSE,
                max_literal: MAX_RESPONSE
            }
        );
    }

    /// The buffer of a large response is not kept.
    #[test]
    fn large_response_memory_is_released() {
        let big = format!("* SEARCH {}\r\n* 1 EXISTS\r\n", "12345 ".repeat(20_000));
        let mut f = Framer::default();
        let (out, err) = run_with(big.as_bytes(), 4096, &mut f);
        assert_eq!((out.len(), err), (2, None));
        assert!(f.memory().response <= RESPONSE_KEEP, "{:?}", f.memory());
    }

    #[test]
    fn in_response_and_unread() {
        let mut f = Framer::default();
        assert!(!f.in_response());
        f.feed(b"a1 OK begin TLS\r\n* garbage");
        assert!(f.has_unread());
        assert!(matches!(f.next_frame(), Ok(Some(Frame::Response(_)))));
        assert!(f.has_unread());
        assert_eq!(f.next_frame(), Ok(None));
        assert!(!f.has_unread());
        assert!(f.in_response());
    }

    #[test]
    fn shared_doc_shapes_parse() {
        let all = responses(TRANSCRIPT);
        let parsed: Vec<Parsed<'_>> = all.iter().map(|b| parse_one(b)).collect();
        let done = |tag: &str, status: Status, info: &'static str| {
            Parsed::Known(Response::Done {
                tag: RequestId(tag.into()),
                status,
                outcome: Outcome {
                    code: None,
                    information: Some(Cow::Borrowed(info)),
                },
            })
        };
        // Mailutils: bare LF after AUTHENTICATE.
        assert_eq!(parsed[1], done("a1", Status::Ok, "AUTHENTICATE Completed"));
        // Dovecot: BODY[] NIL, EXPUNGE, [EXPUNGEISSUED] in the text.
        let nil = all
            .iter()
            .position(|b| b.starts_with(b"* 6 FETCH"))
            .expect("BODY[] NIL");
        assert_eq!(
            parsed[nil],
            Parsed::Known(Response::Fetch(
                6,
                vec![
                    AttributeValue::Uid(10),
                    AttributeValue::BodySection {
                        section: None,
                        index: None,
                        data: None
                    },
                ]
            ))
        );
        assert_eq!(parsed[nil + 1], Parsed::Known(Response::Expunge(6)));
        assert_eq!(
            parsed[nil + 2],
            done(
                "a5",
                Status::Ok,
                "[EXPUNGEISSUED] Some messages were expunged"
            )
        );
        // Cyrus: OK without any item.
        assert_eq!(
            parsed[nil + 3],
            done("A6", Status::Ok, "Completed (0.001 secs 1 calls)")
        );
        // Mailutils: EXPUNGED, which imap-proto does not know.
        assert!(Response::parse(&all[nil + 4]).is_err());
        assert_eq!(parsed[nil + 4], Parsed::Known(Response::Expunge(1)));
        // The empty line.
        assert_eq!(parsed[nil + 7], Parsed::Unknown(b"\r\n"));
        // The streamed body as an empty literal, with its origin.
        let body = all
            .iter()
            .position(|b| b.starts_with(b"* 1 FETCH (UID 7 BODY[]<0>"))
            .expect("body");
        assert_eq!(
            parsed[body],
            Parsed::Known(Response::Fetch(
                1,
                vec![
                    AttributeValue::Uid(7),
                    AttributeValue::BodySection {
                        section: None,
                        index: Some(0),
                        data: Some(Cow::Borrowed(&b""[..])),
                    },
                ]
            ))
        );
        // Everything else in the transcript is understood too, except the
        // literal8 response, the FETCH cut short by a bare LF right after
        // its literal (and its tail), and the empty line. (The `{2+}`
        // literal of an unknown attribute is swallowed, CRLF and all, by
        // imap-proto's catch-all for unknown attributes.)
        for (b, p) in all.iter().zip(&parsed) {
            let expected_unknown = b.starts_with(b"* 3 FETCH (UID 9 BODY[HEADER")
                || b.starts_with(b"* 2 FETCH (UID 8 BODY[HEADER")
                || b.starts_with(b")")
                || b == b"\r\n";
            assert_eq!(
                matches!(p, Parsed::Unknown(_)),
                expected_unknown,
                "{}: {p:?}",
                show(b)
            );
        }
    }

    /// What imap-proto 0.17 makes of the shapes popbridge will see.
    #[test]
    fn imap_proto_behaviour() {
        fn parse(s: &[u8]) -> Result<(usize, Response<'_>), ()> {
            Response::parse(s)
                .map(|(rest, r)| (rest.len(), r))
                .map_err(|_| ())
        }
        // {0} is an empty string, not NIL.
        assert_eq!(
            parse(b"* 1 FETCH (RFC822 {0}\r\n)\r\n"),
            Ok((
                0,
                Response::Fetch(
                    1,
                    vec![AttributeValue::Rfc822(Some(Cow::Borrowed(&b""[..])))]
                )
            ))
        );
        // BINARY[] is not understood at all: the whole FETCH fails.
        assert!(parse(b"* 1 FETCH (UID 3 BINARY[] {0}\r\n)\r\n").is_err());
        // literal8 neither.
        assert!(parse(b"* 1 FETCH (UID 3 BODY[] ~{1}\r\nx)\r\n").is_err());
        // {n+} neither.
        assert!(parse(b"* 1 FETCH (UID 3 BODY[] {1+}\r\nx)\r\n").is_err());
        // An unknown response code stays in the text.
        assert_eq!(
            parse(b"a OK [EXPUNGEISSUED] x\r\n"),
            Ok((
                0,
                Response::Done {
                    tag: RequestId("a".into()),
                    status: Status::Ok,
                    outcome: Outcome {
                        code: None,
                        information: Some(Cow::Borrowed("[EXPUNGEISSUED] x"))
                    }
                }
            ))
        );
        // A bare LF is not a line end.
        assert!(parse(b"a OK x\n").is_err());
        // An unknown FETCH attribute is skipped.
        assert_eq!(
            parse(b"* 1 FETCH (UID 3 SAVEDATE \"x\" RFC822.SIZE 4)\r\n"),
            Ok((
                0,
                Response::Fetch(
                    1,
                    vec![
                        AttributeValue::Uid(3),
                        AttributeValue::Unknown,
                        AttributeValue::Rfc822Size(4)
                    ]
                )
            ))
        );
        // RFC822.SIZE is a u32: the size of a message of 4 GiB or more
        // becomes an Unknown attribute, silently.
        assert_eq!(
            parse(b"* 1 FETCH (UID 3 RFC822.SIZE 4294967296)\r\n"),
            Ok((
                0,
                Response::Fetch(1, vec![AttributeValue::Uid(3), AttributeValue::Unknown])
            ))
        );
        // CAPABILITY must list IMAP4rev1: an IMAP4rev2-only server's
        // (RFC 9051) untagged CAPABILITY is unparseable, its response code
        // stays in the text.
        assert!(parse(b"* CAPABILITY IMAP4rev2 AUTH=PLAIN\r\n").is_err());
        assert!(matches!(
            parse(b"* OK [CAPABILITY IMAP4rev2 AUTH=PLAIN] hi\r\n"),
            Ok((
                0,
                Response::Data {
                    outcome: Outcome { code: None, .. },
                    ..
                }
            ))
        ));
        // The octet after a response code is dropped as if it were the space.
        assert!(matches!(
            parse(b"a OK [READ-WRITE]Done\r\n"),
            Ok((0, Response::Done { outcome: Outcome { information: Some(i), .. }, .. })) if i == "one"
        ));
        // A SEARCH of a million UIDs is fine.
        let mut search = b"* SEARCH".to_vec();
        for i in 1..=1_000_000u32 {
            search.extend_from_slice(format!(" {i}").as_bytes());
        }
        search.extend_from_slice(b"\r\n");
        match parse_response(&search) {
            Parsed::Known(Response::MailboxData(MailboxDatum::Search(v))) => {
                assert_eq!(v.len(), 1_000_000)
            }
            other => panic!("{:?}", matches!(other, Parsed::Unknown(_))),
        }
    }

    /// The inputs that make imap-proto 0.17 panic do panic it, and
    /// `parse_response` does not hand them over.
    #[test]
    fn imap_proto_panics_are_avoided() {
        let cases: [&[u8]; 4] = [
            b"* 1 FETCH (INTERNALDATE NIL)\r\n",
            "a OK [ALERT]\u{e9}t\u{e9}\r\n".as_bytes(),
            b"* OK [READ-ONLY]\xff\r\n",
            b"* METADATA \"INBOX\" (/private/comment \"\xff\")\r\n",
        ];
        for case in cases {
            let panicked = std::panic::catch_unwind(|| {
                let _ = Response::parse(case);
            })
            .is_err();
            assert!(panicked, "imap-proto no longer panics on {}", show(case));
            let _ = parse_response(case);
        }
        assert_eq!(parse_response(cases[0]), Parsed::Unknown(cases[0]));
        assert_eq!(
            parse_response(cases[1]),
            Parsed::Known(Response::Done {
                tag: RequestId("a".into()),
                status: Status::Ok,
                outcome: Outcome {
                    code: None,
                    information: Some(Cow::Borrowed("[ALERT]\u{e9}t\u{e9}"))
                }
            })
        );
        assert!(matches!(
            parse_response(cases[2]),
            Parsed::Known(Response::Data {
                status: Status::Ok,
                ..
            })
        ));
        assert_eq!(parse_response(cases[3]), Parsed::Unknown(cases[3]));
        // An ASCII-only METADATA still goes to imap-proto.
        assert!(matches!(
            parse_response(b"* METADATA \"INBOX\" (/private/comment \"x\")\r\n"),
            Parsed::Known(Response::MailboxData(_))
        ));
    }

    /// A body structure with [`MAX_PARSE_PARENS`] parentheses parses in
    /// 1.5 MiB of stack (debug build); a deeper one is not handed to
    /// imap-proto.
    #[test]
    fn deep_bodystructure() {
        fn nested(levels: usize) -> Vec<u8> {
            let mut s = b"* 1 FETCH (BODYSTRUCTURE ".to_vec();
            s.extend(std::iter::repeat_n(b'(', levels));
            s.extend_from_slice(b"(\"text\" \"plain\" NIL NIL NIL \"7bit\" 0 0)");
            s.extend(std::iter::repeat_n(&b" \"mixed\")"[..], levels).flatten());
            s.extend_from_slice(b")\r\n");
            s
        }
        // `levels` multiparts, the text part and the msg-att list.
        let ok = nested(MAX_PARSE_PARENS - 2);
        assert_eq!(memchr::memchr_iter(b'(', &ok).count(), MAX_PARSE_PARENS);
        let parsed = std::thread::Builder::new()
            .stack_size(1536 * 1024)
            .spawn(move || matches!(parse_response(&ok), Parsed::Known(Response::Fetch(1, _))))
            .expect("thread")
            .join()
            .expect("no stack overflow");
        assert!(parsed);
        let deep = nested(100_000);
        assert_eq!(parse_response(&deep), Parsed::Unknown(&deep[..]));
    }

    #[test]
    fn fallback_shapes() {
        let k = |s: &'static [u8]| parse_response(s);
        assert_eq!(
            k(b"* 7 EXPUNGED  \r\n"),
            Parsed::Known(Response::Expunge(7))
        );
        assert_eq!(k(b"* 7 expunged\r\n"), Parsed::Known(Response::Expunge(7)));
        assert!(matches!(k(b"* 0 EXPUNGED\r\n"), Parsed::Unknown(_)));
        assert!(matches!(k(b"* 7 EXPUNGED x\r\n"), Parsed::Unknown(_)));
        assert!(matches!(
            k(b"* 99999999999 EXPUNGED\r\n"),
            Parsed::Unknown(_)
        ));
        assert!(matches!(
            k(b"* BYE [UNAVAILABLE]\xff\r\n"),
            Parsed::Known(Response::Data {
                status: Status::Bye,
                ..
            })
        ));
        assert!(matches!(
            k(b"+ [X]\xc3\xa9\r\n"),
            Parsed::Known(Response::Continue(_))
        ));
        assert!(matches!(k(b"a+ OK [X]\xc3\xa9\r\n"), Parsed::Unknown(_)));
        assert!(matches!(
            k(b"a PREAUTH [X]\xc3\xa9\r\n"),
            Parsed::Unknown(_)
        ));
        assert!(matches!(k(b"* 1 FETCH (X)\r\n"), Parsed::Unknown(_)));
        assert!(matches!(k(b"* 1 FROB\r\n"), Parsed::Unknown(_)));
        assert!(matches!(k(b"no line end"), Parsed::Unknown(_)));
        assert!(matches!(k(b""), Parsed::Unknown(_)));
    }

    #[tokio::test]
    async fn reader_frames_and_clean_eof() {
        let (client, mut server) = tokio::io::duplex(64);
        let mut r = ImapReader::new(client, Framer::default(), Duration::from_secs(60));
        r.framer_mut().set_stream_bodies(true);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            server.write_all(TRANSCRIPT).await.expect("write");
        });
        let mut out = Vec::new();
        let err = loop {
            match r.next_frame().await {
                Ok(frame) => record(&mut out, frame),
                Err(e) => break e,
            }
        };
        writer.await.expect("writer");
        assert!(matches!(err, ReadError::Closed), "{err:?}");
        assert_eq!(out, frames(TRANSCRIPT, true));
    }

    #[tokio::test]
    async fn reader_eof_inside_a_response() {
        for cut in [
            &b"* 1 FETCH (BODY[] {10}\r\nabc"[..],
            b"* 1 FETCH (UID",
            b"* 1 FETCH (BODY[] {10}\r\n0123456789",
            b"* 1 FETCH (BODY[HEADER] {3}\r\nab",
        ] {
            let (client, mut server) = tokio::io::duplex(64);
            let mut r = ImapReader::new(client, Framer::default(), Duration::from_secs(60));
            r.framer_mut().set_stream_bodies(true);
            {
                use tokio::io::AsyncWriteExt;
                server.write_all(cut).await.expect("write");
                drop(server);
            }
            let err = loop {
                match r.next_frame().await {
                    Ok(_) => {}
                    Err(e) => break e,
                }
            };
            assert!(
                matches!(err, ReadError::EofInResponse),
                "{}: {err:?}",
                show(cut)
            );
        }
    }

    /// A server that stops sending mid-response is cut off after the
    /// inactivity timeout (paused clock: no real waiting).
    #[tokio::test(start_paused = true)]
    async fn reader_times_out_on_a_stall() {
        let (client, mut server) = tokio::io::duplex(64);
        let inactivity = Duration::from_secs(60);
        let mut r = ImapReader::new(client, Framer::default(), inactivity);
        r.framer_mut().set_stream_bodies(true);
        {
            use tokio::io::AsyncWriteExt;
            server
                .write_all(b"* 1 FETCH (BODY[] {10}\r\nabcde")
                .await
                .expect("write");
        }
        assert_eq!(
            r.next_frame().await.ok(),
            Some(Frame::BodyStart { len: 10 })
        );
        assert_eq!(r.next_frame().await.ok(), Some(Frame::BodyPiece(b"abcde")));
        let started = tokio::time::Instant::now();
        let err = r.next_frame().await.err();
        assert!(
            matches!(err, Some(ReadError::Timeout(d)) if d == inactivity),
            "{err:?}"
        );
        assert!(started.elapsed() >= inactivity);
        drop(server);
    }

    /// The timeout is per octet, not per response: a server sending steadily
    /// but slowly finishes a body that takes many timeouts to arrive (60
    /// pieces 25 s apart under a 60 s timeout; paused clock).
    #[tokio::test(start_paused = true)]
    async fn reader_slow_steady_server_is_not_cut_off() {
        let (client, mut server) = tokio::io::duplex(64);
        let inactivity = Duration::from_secs(60);
        let mut r = ImapReader::new(client, Framer::default(), inactivity);
        r.framer_mut().set_stream_bodies(true);
        let pieces = 60;
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let head = format!("* 1 FETCH (UID 4 BODY[] {{{}}}\r\n", pieces * 10);
            server.write_all(head.as_bytes()).await.expect("write");
            for _ in 0..pieces {
                tokio::time::sleep(Duration::from_secs(25)).await;
                server.write_all(b"0123456789").await.expect("write");
            }
            server
                .write_all(b")\r\na OK done\r\n")
                .await
                .expect("write");
            server
        });
        let started = tokio::time::Instant::now();
        let mut out = Vec::new();
        loop {
            let frame = r.next_frame().await.expect("no timeout");
            let last = matches!(frame, Frame::Response(b) if b.starts_with(b"a OK"));
            record(&mut out, frame);
            if last {
                break;
            }
        }
        assert!(started.elapsed() > inactivity * 20);
        assert_eq!(out[0], Out::BodyStart(600));
        assert_eq!(out[1], Out::Body(b"0123456789".repeat(60)));
        let _server = writer.await.expect("writer");
    }
}
