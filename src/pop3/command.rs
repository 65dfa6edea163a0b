//! POP3 command decoding: bytes → lines → [`Command`]s, with no I/O.
//!
//! [`LineDecoder`] is resumable: it can be fed any split of the input (one
//! byte at a time or a whole pipelined batch) and yields the same lines. It
//! never holds more than [`MAX_COMMAND_LINE`] bytes: a longer line is reported
//! once as [`Line::TooLong`] and the rest of it is discarded up to its LF.

use std::fmt;
use std::num::NonZeroU32;

/// RFC 2449 §4: "The maximum length of a command is increased from 47
/// characters ... to 255 octets, including the terminating CRLF."
pub const MAX_COMMAND_LINE: usize = 255;

/// SASL lines (`AUTH` with an initial response, and the client's answers to
/// `+` challenges) are not held to the 255-octet command limit (RFC 5034 §4
/// lets `AUTH` carry the initial response); they are capped at 12288
/// octets, the minimum RFC 4954 §4 asks SMTP AUTH servers to accept. A
/// PLAIN response with long credentials fits easily.
pub const MAX_SASL_LINE: usize = 12288;

/// A line that starts with this (case-insensitively) is an `AUTH` command,
/// which may be as long as [`LineDecoder::set_auth_max`] allows.
const AUTH_PREFIX: &[u8] = b"AUTH ";

/// A complete input line, or the news that one was too long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// The line's bytes without the terminating LF (and without a CR before it).
    Complete(Vec<u8>),
    /// The line exceeded the limit; its bytes up to the next LF are discarded.
    TooLong,
}

/// Splits a byte stream into lines with bounded memory.
#[derive(Debug)]
pub struct LineDecoder {
    /// Bytes of the current, unfinished line (never more than `max`).
    line: Vec<u8>,
    /// True while discarding the remainder of an over-long line.
    discarding: bool,
    /// The line limit, CRLF included.
    max: usize,
    /// The limit for a line that starts with `AUTH ` (an initial response
    /// may follow the mechanism); never below `max`.
    auth_max: usize,
}

impl Default for LineDecoder {
    fn default() -> Self {
        Self::new(MAX_COMMAND_LINE)
    }
}

impl LineDecoder {
    /// A decoder that accepts lines of at most `max` octets including CRLF.
    pub fn new(max: usize) -> Self {
        Self {
            line: Vec::with_capacity(64),
            discarding: false,
            max,
            auth_max: max,
        }
    }

    /// Consumes bytes from the front of `input` up to and including the next
    /// LF, or all of it. Returns a line when one completes, or when the
    /// current line first exceeds the limit.
    pub fn decode(&mut self, input: &mut &[u8]) -> Option<Line> {
        while !input.is_empty() {
            let (chunk, has_lf) = match memchr::memchr(b'\n', input) {
                Some(i) => (&input[..i], true),
                None => (*input, false),
            };
            let consumed = chunk.len() + usize::from(has_lf);
            *input = &input[consumed..];
            if self.discarding {
                if has_lf {
                    self.discarding = false;
                }
                continue;
            }
            // The limit counts CRLF (2 octets): content may be `max - 2` long.
            // A CR at the end may be the first half of a CRLF whose LF is in
            // the next read, so it gets its octet too.
            let content_len = self.line.len() + chunk.len();
            let ends_cr = chunk.last().or(self.line.last()) == Some(&b'\r');
            let max = if self.auth_max > self.max && self.starts_auth(chunk) {
                self.auth_max
            } else {
                self.max
            };
            let limit = max.saturating_sub(2);
            if content_len > limit && !(ends_cr && content_len - 1 <= limit) {
                self.line.clear();
                self.discarding = !has_lf;
                return Some(Line::TooLong);
            }
            self.line.extend_from_slice(chunk);
            if has_lf {
                if self.line.last() == Some(&b'\r') {
                    self.line.pop();
                }
                return Some(Line::Complete(std::mem::take(&mut self.line)));
            }
        }
        None
    }

    /// Changes the line limit for the lines that follow (SASL exchanges
    /// allow longer lines than commands).
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// Changes the limit for `AUTH` command lines that follow (an initial
    /// response makes them longer than other commands); below the general
    /// limit it has no effect.
    pub fn set_auth_max(&mut self, max: usize) {
        self.auth_max = max;
    }

    /// Whether the current line (what is buffered, then `chunk`) starts
    /// with `AUTH `. A line too short to tell is not one yet: it is within
    /// every limit anyway.
    fn starts_auth(&self, chunk: &[u8]) -> bool {
        let mut head = [0u8; AUTH_PREFIX.len()];
        let have = self.line.len().min(head.len());
        head[..have].copy_from_slice(&self.line[..have]);
        let more = (head.len() - have).min(chunk.len());
        head[have..have + more].copy_from_slice(&chunk[..more]);
        have + more == head.len() && head.eq_ignore_ascii_case(AUTH_PREFIX)
    }

    /// True when no partial line is buffered (the input so far ended on a
    /// line boundary); the fuzz target checks this after every line.
    pub fn is_idle(&self) -> bool {
        self.line.is_empty() && !self.discarding
    }
}

/// A message number as the client wrote it: 1-based, never zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MsgNum(NonZeroU32);

impl MsgNum {
    /// The message number, 1-based.
    pub fn get(self) -> u32 {
        self.0.get()
    }
    /// The 0-based index into the maildrop.
    pub fn index(self) -> usize {
        (self.0.get() - 1) as usize
    }
    /// A message number from a 1-based value; `None` for zero.
    pub fn new(n: u32) -> Option<Self> {
        NonZeroU32::new(n).map(Self)
    }
}

impl fmt::Display for MsgNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Bytes that must never be printed: passwords. `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps secret bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
    /// The secret bytes; call only where they are sent on.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A parsed POP3 command (RFC 1939 §§4-7, RFC 2449 §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `USER name` (RFC 1939 §7).
    User(Vec<u8>),
    /// `PASS string`: everything after the first space, spaces included (RFC 1939 §7).
    Pass(Secret),
    Quit,
    /// `CAPA` (RFC 2449 §5).
    Capa,
    Stat,
    List(Option<MsgNum>),
    Retr(MsgNum),
    Dele(MsgNum),
    Noop,
    Rset,
    /// `TOP msg n`: header plus `n` body lines.
    Top(MsgNum, u64),
    Uidl(Option<MsgNum>),
    /// `STLS` (RFC 2595 §4).
    Stls,
    /// `AUTH [mechanism [initial-response]]` (RFC 5034 §4). Without a
    /// mechanism it lists the mechanisms (as Dovecot and RFC 1734 clients
    /// expect). The initial response is still base64.
    Auth {
        mechanism: Option<String>,
        initial: Option<Secret>,
    },
}

impl Command {
    /// The command's keyword, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Command::User(_) => "USER",
            Command::Pass(_) => "PASS",
            Command::Quit => "QUIT",
            Command::Capa => "CAPA",
            Command::Stat => "STAT",
            Command::List(_) => "LIST",
            Command::Retr(_) => "RETR",
            Command::Dele(_) => "DELE",
            Command::Noop => "NOOP",
            Command::Rset => "RSET",
            Command::Top(..) => "TOP",
            Command::Uidl(_) => "UIDL",
            Command::Stls => "STLS",
            Command::Auth { .. } => "AUTH",
        }
    }
}

/// Why a line is not a valid command. `Display` is the `-ERR` text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("Line too long")]
    LineTooLong,
    #[error("Empty command")]
    Empty,
    #[error("Unknown command")]
    Unknown,
    #[error("{0} takes no arguments")]
    UnexpectedArgument(&'static str),
    #[error("{0} needs an argument")]
    MissingArgument(&'static str),
    #[error("Invalid message number")]
    InvalidMessageNumber,
    #[error("Message number too large")]
    MessageNumberTooLarge,
    #[error("There's no message 0.")]
    MessageZero,
    #[error("Invalid line count")]
    InvalidLineCount,
    #[error("Noise after arguments")]
    Noise,
    #[error("Invalid SASL mechanism name")]
    InvalidMechanism,
}

impl Command {
    /// Parses one line (without CRLF). Keywords are case-insensitive
    /// (RFC 1939 §3); arguments are separated by single spaces, but runs of
    /// spaces are tolerated as Dovecot does.
    pub fn parse(line: &[u8]) -> Result<Command, ParseError> {
        let (keyword, rest) = match line.iter().position(|&b| b == b' ') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &b""[..]),
        };
        if keyword.is_empty() {
            return Err(ParseError::Empty);
        }
        // RFC 2449 §3: keywords are 3 or 4 printable ASCII characters.
        let mut kw = [0u8; 4];
        if keyword.len() > 4 || keyword.len() < 3 {
            return Err(ParseError::Unknown);
        }
        for (d, s) in kw.iter_mut().zip(keyword) {
            *d = s.to_ascii_uppercase();
        }
        let kw = &kw[..keyword.len()];
        // PASS keeps its argument verbatim; other commands ignore trailing blanks.
        if kw == b"PASS" {
            if rest.is_empty() {
                return Err(ParseError::MissingArgument("PASS"));
            }
            return Ok(Command::Pass(Secret::new(rest.to_vec())));
        }
        let args = trim_spaces(rest);
        let mut words = args.split(|&b| b == b' ').filter(|w| !w.is_empty());
        let first = words.next();
        let second = words.next();
        let extra = words.next().is_some();
        let none = |name| match first {
            None => Ok(()),
            Some(_) => Err(ParseError::UnexpectedArgument(name)),
        };
        let cmd = match kw {
            b"USER" => match first {
                // The name is everything after "USER " (it may not contain
                // spaces in practice, but we pass what the client sent).
                Some(_) => return Ok(Command::User(args.to_vec())),
                None => return Err(ParseError::MissingArgument("USER")),
            },
            b"QUIT" => none("QUIT").map(|_| Command::Quit)?,
            b"CAPA" => none("CAPA").map(|_| Command::Capa)?,
            b"STAT" => none("STAT").map(|_| Command::Stat)?,
            b"NOOP" => none("NOOP").map(|_| Command::Noop)?,
            b"RSET" => none("RSET").map(|_| Command::Rset)?,
            b"STLS" => none("STLS").map(|_| Command::Stls)?,
            b"AUTH" => {
                if extra {
                    return Err(ParseError::Noise);
                }
                let mechanism = match first {
                    None => None,
                    Some(m) if m.len() <= 20 && m.iter().all(|b| b.is_ascii_graphic()) => {
                        Some(String::from_utf8_lossy(m).to_ascii_uppercase())
                    }
                    Some(_) => return Err(ParseError::InvalidMechanism),
                };
                return Ok(Command::Auth {
                    mechanism,
                    initial: second.map(|s| Secret::new(s.to_vec())),
                });
            }
            b"LIST" => Command::List(first.map(parse_msgnum).transpose()?),
            b"UIDL" => Command::Uidl(first.map(parse_msgnum).transpose()?),
            b"RETR" => Command::Retr(parse_msgnum(
                first.ok_or(ParseError::MissingArgument("RETR"))?,
            )?),
            b"DELE" => Command::Dele(parse_msgnum(
                first.ok_or(ParseError::MissingArgument("DELE"))?,
            )?),
            b"TOP" => {
                let n = parse_msgnum(first.ok_or(ParseError::MissingArgument("TOP"))?)?;
                let lines = second.ok_or(ParseError::MissingArgument("TOP"))?;
                let lines = parse_u64(lines).ok_or(ParseError::InvalidLineCount)?;
                if extra {
                    return Err(ParseError::Noise);
                }
                return Ok(Command::Top(n, lines));
            }
            _ => return Err(ParseError::Unknown),
        };
        if second.is_some() {
            return Err(ParseError::Noise);
        }
        Ok(cmd)
    }
}

fn trim_spaces(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ').unwrap_or(s.len());
    let end = s.iter().rposition(|&b| b != b' ').map_or(start, |i| i + 1);
    &s[start..end.max(start)]
}

fn parse_msgnum(s: &[u8]) -> Result<MsgNum, ParseError> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return Err(ParseError::InvalidMessageNumber);
    }
    let n = parse_u64(s).ok_or(ParseError::MessageNumberTooLarge)?;
    let n = u32::try_from(n).map_err(|_| ParseError::MessageNumberTooLarge)?;
    MsgNum::new(n).ok_or(ParseError::MessageZero)
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], chunk: usize) -> Vec<Line> {
        let mut dec = LineDecoder::default();
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            let mut piece = piece;
            while let Some(line) = dec.decode(&mut piece) {
                out.push(line);
            }
        }
        out
    }

    #[test]
    fn chunking_does_not_change_the_result() {
        let mut transcript = Vec::new();
        transcript.extend_from_slice(b"USER alice\r\nPASS se cret \r\ncapa\nSTAT\r\n");
        transcript.extend_from_slice(b"LIST 1\r\nretr 2\r\nTOP 1 10\r\n");
        transcript.extend(std::iter::repeat_n(b'x', 600));
        transcript.extend_from_slice(b"\r\nNOOP\r\n\r\nUIDL\r\nDELE 99999999999\r\nQUIT\r\n");
        let reference = lines(&transcript, transcript.len());
        assert_eq!(reference.len(), 13);
        assert_eq!(reference[7], Line::TooLong);
        for chunk in 1..=512 {
            assert_eq!(lines(&transcript, chunk), reference, "chunk size {chunk}");
        }
        let parsed: Vec<_> = reference
            .iter()
            .map(|l| match l {
                Line::Complete(b) => Command::parse(b).map(|c| c.name()),
                Line::TooLong => Err(ParseError::LineTooLong),
            })
            .collect();
        assert_eq!(
            parsed,
            vec![
                Ok("USER"),
                Ok("PASS"),
                Ok("CAPA"),
                Ok("STAT"),
                Ok("LIST"),
                Ok("RETR"),
                Ok("TOP"),
                Err(ParseError::LineTooLong),
                Ok("NOOP"),
                Err(ParseError::Empty),
                Ok("UIDL"),
                Err(ParseError::MessageNumberTooLarge),
                Ok("QUIT"),
            ]
        );
    }

    #[test]
    fn line_limit_counts_crlf() {
        let ok = [vec![b'a'; 253], b"\r\n".to_vec()].concat();
        assert_eq!(lines(&ok, 7), vec![Line::Complete(vec![b'a'; 253])]);
        let long = [vec![b'a'; 254], b"\r\n".to_vec()].concat();
        assert_eq!(lines(&long, 7), vec![Line::TooLong]);
        // A bare LF terminator leaves room for one more content octet? No: the
        // limit is on content plus CRLF as RFC 2449 counts it.
        let lf = [vec![b'a'; 253], b"\n".to_vec()].concat();
        assert_eq!(lines(&lf, 3), vec![Line::Complete(vec![b'a'; 253])]);
    }

    /// An `AUTH` line may be as long as the AUTH limit (RFC 5034 §4
    /// initial responses), whatever the chunking; other lines keep the
    /// command limit.
    #[test]
    fn auth_lines_may_be_longer_in_any_chunking() {
        let ir = vec![b'Q'; 9_000];
        let transcript = [
            b"auth PLAIN ".to_vec(),
            ir.clone(),
            b"\r\nUSER ".to_vec(),
            vec![b'u'; 300],
            b"\r\nAUTH PLAIN ".to_vec(),
            vec![b'Q'; MAX_SASL_LINE],
            b"\r\nNOOP\r\n".to_vec(),
        ]
        .concat();
        let want = vec![
            Line::Complete([b"auth PLAIN ".to_vec(), ir].concat()),
            Line::TooLong,
            Line::TooLong,
            Line::Complete(b"NOOP".to_vec()),
        ];
        for chunk in [1, 2, 3, 4, 5, 6, 7, 64, 255, 4096, transcript.len()] {
            let mut dec = LineDecoder::default();
            dec.set_auth_max(MAX_SASL_LINE);
            let mut out = Vec::new();
            for piece in transcript.chunks(chunk) {
                let mut piece = piece;
                while let Some(line) = dec.decode(&mut piece) {
                    out.push(line);
                }
                assert!(dec.line.len() <= MAX_SASL_LINE);
            }
            assert_eq!(out, want, "chunk size {chunk}");
        }
        // Without the AUTH limit, AUTH lines are commands like any other.
        assert_eq!(
            lines(
                &[b"AUTH PLAIN ".to_vec(), vec![b'Q'; 300], b"\r\n".to_vec()].concat(),
                9
            ),
            vec![Line::TooLong]
        );
    }

    #[test]
    fn crlf_split_across_reads_at_the_limit() {
        // Found by fuzzing: 253 octets, CR in one read, LF in the next.
        let mut dec = LineDecoder::default();
        let first = [vec![b'a'; 253], b"\r".to_vec()].concat();
        let mut s = &first[..];
        assert_eq!(dec.decode(&mut s), None);
        let mut s = &b"\n"[..];
        assert_eq!(dec.decode(&mut s), Some(Line::Complete(vec![b'a'; 253])));
        // A bare CR that is not followed by LF still makes the line too long.
        let mut dec = LineDecoder::default();
        let mut s = &first[..];
        assert_eq!(dec.decode(&mut s), None);
        let mut s = &b"x\r\n"[..];
        assert_eq!(dec.decode(&mut s), Some(Line::TooLong));
    }

    #[test]
    fn endless_line_is_reported_once_and_memory_stays_bounded() {
        let mut dec = LineDecoder::default();
        let junk = vec![b'z'; 4096];
        let mut reports = 0;
        for _ in 0..1000 {
            let mut s = &junk[..];
            while let Some(l) = dec.decode(&mut s) {
                assert_eq!(l, Line::TooLong);
                reports += 1;
            }
            assert!(dec.line.capacity() <= 1024);
        }
        assert_eq!(reports, 1);
        let mut s = &b"tail\r\nNOOP\r\n"[..];
        assert_eq!(dec.decode(&mut s), Some(Line::Complete(b"NOOP".to_vec())));
    }

    #[test]
    fn keywords_are_case_insensitive_and_arguments_checked() {
        assert_eq!(Command::parse(b"sTaT"), Ok(Command::Stat));
        assert_eq!(Command::parse(b"STAT "), Ok(Command::Stat));
        assert_eq!(
            Command::parse(b"STAT 1"),
            Err(ParseError::UnexpectedArgument("STAT"))
        );
        assert_eq!(Command::parse(b"list 3"), Ok(Command::List(MsgNum::new(3))));
        assert_eq!(Command::parse(b"LIST 0"), Err(ParseError::MessageZero));
        assert_eq!(
            Command::parse(b"RETR -1"),
            Err(ParseError::InvalidMessageNumber)
        );
        assert_eq!(
            Command::parse(b"RETR 4294967296"),
            Err(ParseError::MessageNumberTooLarge)
        );
        assert_eq!(
            Command::parse(b"RETR 4294967295"),
            Ok(Command::Retr(MsgNum::new(u32::MAX).unwrap()))
        );
        assert_eq!(Command::parse(b"RETR 1 2"), Err(ParseError::Noise));
        assert_eq!(
            Command::parse(b"RETR"),
            Err(ParseError::MissingArgument("RETR"))
        );
        assert_eq!(
            Command::parse(b"TOP 1 18446744073709551615"),
            Ok(Command::Top(MsgNum::new(1).unwrap(), u64::MAX))
        );
        assert_eq!(
            Command::parse(b"TOP 1 18446744073709551616"),
            Err(ParseError::InvalidLineCount)
        );
        assert_eq!(
            Command::parse(b"TOP 1"),
            Err(ParseError::MissingArgument("TOP"))
        );
        assert_eq!(Command::parse(b"TOP 1 2 3"), Err(ParseError::Noise));
        assert_eq!(Command::parse(b"XYZZY"), Err(ParseError::Unknown));
        assert_eq!(Command::parse(b"RETRX 1"), Err(ParseError::Unknown));
        assert_eq!(Command::parse(b""), Err(ParseError::Empty));
        assert_eq!(Command::parse(b" STAT"), Err(ParseError::Empty));
    }

    #[test]
    fn pass_keeps_spaces_and_is_redacted() {
        let cmd = Command::parse(b"PASS  two words ").unwrap();
        assert_eq!(cmd, Command::Pass(Secret::new(b" two words ".to_vec())));
        assert!(!format!("{cmd:?}").contains("two"));
        assert_eq!(
            Command::parse(b"PASS"),
            Err(ParseError::MissingArgument("PASS"))
        );
    }
}
