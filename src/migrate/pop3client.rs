//! A small POP3 client for the old server (RFC 1939): USER/PASS, UIDL,
//! LIST, `TOP n 0`, RETR with dot-unstuffing (whole, or streamed in pieces
//! for hashing), QUIT.
//!
//! It never sends DELE: nothing on the old server is ever removed, so a
//! migration can be repeated, and the old server stays the fallback until
//! the cut-over. (QUIT without DELE commits nothing, RFC 1939 §6.)

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::pop3::command::Secret;
use crate::tls::MaybeTls;

/// RFC 2449 §4: a response line (status or listing) is at most 512 octets
/// with its CRLF.
pub const MAX_RESPONSE_LINE: usize = 512;

/// Largest message RETR accepts (async-imap's own cap on one response is
/// 512 MiB; APPEND sends the message as one literal).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// Messages in one listing at most (bounds the UIDL and LIST memory).
pub const MAX_MESSAGES: usize = 10_000_000;

/// `TOP n 0` commands sent ahead of their answers when the server offers
/// PIPELINING (RFC 2449 §6.6): one round trip per batch instead of per
/// message, which is what makes capturing a large account over a WAN
/// practical. Commands are short, so a batch never fills a send buffer.
pub const TOP_BATCH: usize = 32;

/// `RETR` commands sent ahead of their answers when the server offers
/// PIPELINING, for [`Pop3Client::retr_each`] (streamed, so a batch of large
/// messages costs no memory; the batch is also what an interruption loses).
pub const RETR_BATCH: usize = 16;

/// Waiting for the TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Waiting for any one read or write. RFC 1939 §3 gives servers at least
/// ten minutes of patience; a minute of silence from the server is a fault.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// How the old server is reached.
#[derive(Clone)]
pub enum OldTls {
    /// Plain POP3 (a warning is printed unless the server is on loopback).
    None,
    /// STLS after the greeting (RFC 2595 §4).
    Stls(TlsConnector, ServerName<'static>),
    /// TLS from the first byte (POP3S, RFC 8314).
    Implicit(TlsConnector, ServerName<'static>),
}

impl std::fmt::Debug for OldTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OldTls::None => f.write_str("None"),
            OldTls::Stls(_, n) => write!(f, "Stls({n:?})"),
            OldTls::Implicit(_, n) => write!(f, "Implicit({n:?})"),
        }
    }
}

/// Something went wrong with the old server.
#[derive(Debug, thiserror::Error)]
pub enum Pop3Error {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out waiting for the old server ({0})")]
    Timeout(&'static str),
    #[error("i/o error with the old server: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS with the old server: {0}")]
    Tls(String),
    #[error("the old server answered {command} with: {text}")]
    Err { command: &'static str, text: String },
    #[error("unexpected answer from the old server to {command}: {text}")]
    Protocol { command: &'static str, text: String },
    #[error("the old server closed the connection")]
    Closed,
}

type Stream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

/// One logged-in (or about to be) POP3 session.
pub struct Pop3Client {
    io: BufReader<Stream>,
}

impl Pop3Client {
    /// Connects to `addr` (`host:port`) and reads the greeting; STLS or
    /// implicit TLS as asked.
    pub async fn connect(addr: &str, tls: &OldTls) -> Result<Self, Pop3Error> {
        let tcp = timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| Pop3Error::Timeout("connect"))?
            .map_err(|source| Pop3Error::Connect {
                addr: addr.to_string(),
                source,
            })?;
        tcp.set_nodelay(true)?;
        let stream = match tls {
            OldTls::Implicit(c, name) => handshake(c, name, tcp).await?,
            _ => MaybeTls::Plain(tcp),
        };
        let mut client = Self {
            io: BufReader::new(stream),
        };
        client.status("greeting").await?;
        if let OldTls::Stls(c, name) = tls {
            client.command("STLS", "STLS").await?;
            // RFC 2595 §4: nothing may be pipelined past STLS; the buffer is
            // empty after the +OK line, so the TCP stream can be taken.
            if !client.io.buffer().is_empty() {
                return Err(Pop3Error::Protocol {
                    command: "STLS",
                    text: "data after +OK before the TLS handshake".into(),
                });
            }
            let MaybeTls::Plain(tcp) = client.io.into_inner() else {
                unreachable!("STLS starts on a plain connection")
            };
            client = Self {
                io: BufReader::new(handshake(c, name, tcp).await?),
            };
        }
        Ok(client)
    }

    /// USER and PASS (RFC 1939 §7). The password is never logged.
    pub async fn login(&mut self, user: &str, pass: &Secret) -> Result<(), Pop3Error> {
        if user.contains(['\r', '\n']) || pass.expose().iter().any(|&b| b == b'\r' || b == b'\n') {
            return Err(Pop3Error::Protocol {
                command: "USER",
                text: "user name or password contains a line break".into(),
            });
        }
        self.command(&format!("USER {user}"), "USER").await?;
        let mut line = b"PASS ".to_vec();
        line.extend_from_slice(pass.expose());
        line.extend_from_slice(b"\r\n");
        self.send(&line).await?;
        self.status("PASS").await.map(|_| ())
    }

    /// UIDL: (message number, unique-id) in listing order.
    pub async fn uidl(&mut self) -> Result<Vec<(u32, String)>, Pop3Error> {
        self.command("UIDL", "UIDL").await?;
        let mut out = Vec::new();
        for line in self.listing("UIDL").await? {
            let (n, id) = line.split_once(' ').ok_or_else(|| bad("UIDL", &line))?;
            let n = n.parse().map_err(|_| bad("UIDL", &line))?;
            out.push((n, id.trim().to_string()));
        }
        Ok(out)
    }

    /// LIST: (message number, octets).
    pub async fn list(&mut self) -> Result<Vec<(u32, u64)>, Pop3Error> {
        self.command("LIST", "LIST").await?;
        let mut out = Vec::new();
        for line in self.listing("LIST").await? {
            let mut it = line.split_whitespace();
            let n = it.next().and_then(|n| n.parse().ok());
            let s = it.next().and_then(|s| s.parse().ok());
            match (n, s) {
                (Some(n), Some(s)) => out.push((n, s)),
                _ => return Err(bad("LIST", &line)),
            }
        }
        Ok(out)
    }

    /// CAPA (RFC 2449 §5): the capability lines; empty when the server
    /// does not know CAPA (RFC 1939 servers).
    pub async fn capabilities(&mut self) -> Result<Vec<String>, Pop3Error> {
        match self.command("CAPA", "CAPA").await {
            Ok(_) => self.listing("CAPA").await,
            Err(Pop3Error::Err { .. }) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// `TOP n 0`: the header section, cut at `limit` octets (the rest is
    /// read and dropped, so the session stays in step).
    pub async fn top_header(&mut self, n: u32, limit: usize) -> Result<Vec<u8>, Pop3Error> {
        self.command(&format!("TOP {n} 0"), "TOP").await?;
        self.multiline(limit, false).await
    }

    /// `TOP n 0` for each of `ns`, all sent before the first answer is read.
    /// Only for servers that announced PIPELINING (RFC 2449 §6.6).
    pub async fn top_headers(
        &mut self,
        ns: &[u32],
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, Pop3Error> {
        let mut batch = String::with_capacity(ns.len() * 16);
        for n in ns {
            batch.push_str(&format!("TOP {n} 0\r\n"));
        }
        self.send(batch.as_bytes()).await?;
        let mut out = Vec::with_capacity(ns.len());
        for _ in ns {
            self.status("TOP").await?;
            out.push(self.multiline(limit, false).await?);
        }
        Ok(out)
    }

    /// RETR: the message, dot-unstuffed, with CRLF line ends as sent.
    pub async fn retr(&mut self, n: u32) -> Result<Vec<u8>, Pop3Error> {
        self.command(&format!("RETR {n}"), "RETR").await?;
        self.multiline(MAX_MESSAGE_BYTES, true).await
    }

    /// RETR for each of `ns`, all sent before the first answer is read
    /// (only for servers that announced PIPELINING, RFC 2449 §6.6, unless
    /// `ns` has one element), handing each message to `each(i, piece)` in
    /// pieces as they arrive (`i` indexes `ns`): dot-unstuffed, line ends as
    /// sent. Memory stays bounded however long the messages or their lines.
    pub async fn retr_each(
        &mut self,
        ns: &[u32],
        mut each: impl FnMut(usize, &[u8]),
    ) -> Result<(), Pop3Error> {
        let mut batch = String::with_capacity(ns.len() * 16);
        for n in ns {
            batch.push_str(&format!("RETR {n}\r\n"));
        }
        self.send(batch.as_bytes()).await?;
        for i in 0..ns.len() {
            self.status("RETR").await?;
            self.multiline_each(|piece| each(i, piece)).await?;
        }
        Ok(())
    }

    /// QUIT. Nothing was marked deleted, so nothing is removed.
    pub async fn quit(mut self) {
        let _ = self.command("QUIT", "QUIT").await;
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), Pop3Error> {
        timeout(IO_TIMEOUT, async {
            let w = self.io.get_mut();
            w.write_all(bytes).await?;
            w.flush().await
        })
        .await
        .map_err(|_| Pop3Error::Timeout("write"))??;
        Ok(())
    }

    /// Sends `line` and reads a `+OK` status.
    async fn command(&mut self, line: &str, what: &'static str) -> Result<String, Pop3Error> {
        self.send(format!("{line}\r\n").as_bytes()).await?;
        self.status(what).await
    }

    /// One status line: `+OK ...` (the text is returned) or an error.
    async fn status(&mut self, what: &'static str) -> Result<String, Pop3Error> {
        let mut line = Vec::new();
        self.read_line(&mut line, MAX_RESPONSE_LINE).await?;
        let text = String::from_utf8_lossy(trim_eol(&line)).into_owned();
        if let Some(rest) = text.strip_prefix("+OK") {
            Ok(rest.trim().to_string())
        } else if let Some(rest) = text.strip_prefix("-ERR") {
            Err(Pop3Error::Err {
                command: what,
                // From the server, bound for the log: no control characters.
                text: rest.trim().chars().filter(|c| !c.is_control()).collect(),
            })
        } else {
            Err(bad(what, &text))
        }
    }

    /// The lines of a multi-line listing, up to the terminating ".".
    async fn listing(&mut self, what: &'static str) -> Result<Vec<String>, Pop3Error> {
        let mut out = Vec::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            self.read_line(&mut line, MAX_RESPONSE_LINE).await?;
            let l = trim_eol(&line);
            if l == b"." {
                return Ok(out);
            }
            if out.len() >= MAX_MESSAGES {
                return Err(bad(what, "too many messages"));
            }
            out.push(String::from_utf8_lossy(l).into_owned());
        }
    }

    /// A multi-line body (RFC 1939 §3): lines up to ".", each leading "."
    /// removed (dot-unstuffing). More than `limit` octets is an error when
    /// `strict`, otherwise everything from the first line that does not fit
    /// is read and dropped (what is kept is a prefix of whole lines).
    async fn multiline(&mut self, limit: usize, strict: bool) -> Result<Vec<u8>, Pop3Error> {
        let mut out = Vec::new();
        let mut line = Vec::new();
        let mut full = false;
        loop {
            line.clear();
            // A line longer than what is left is an error (strict) or
            // dropped; it is still read to its end.
            let room = limit.saturating_sub(out.len()).max(MAX_RESPONSE_LINE);
            let complete = self.read_line_capped(&mut line, room).await?;
            if trim_eol(&line) == b"." && complete {
                return Ok(out);
            }
            let data = line.strip_prefix(b".").unwrap_or(&line);
            if full || out.len() + data.len() > limit || !complete {
                full = true;
                if strict {
                    return Err(Pop3Error::Protocol {
                        command: "RETR",
                        text: format!("message larger than {limit} octets"),
                    });
                }
                continue;
            }
            out.extend_from_slice(data);
        }
    }

    /// A multi-line body (RFC 1939 §3) handed to `each` in pieces: lines up
    /// to ".", each leading "." removed. A line's first three octets are
    /// held until it is known whether it is the terminating ".", so pieces
    /// never split a decision and lines of any length pass through.
    async fn multiline_each(&mut self, mut each: impl FnMut(&[u8])) -> Result<(), Pop3Error> {
        /// Octets that decide a line: "." CR LF.
        const HEAD: usize = 3;
        let mut head: Vec<u8> = Vec::with_capacity(HEAD);
        // Whether the current line's head was already handed on.
        let mut decided = false;
        loop {
            let chunk = timeout(IO_TIMEOUT, self.io.fill_buf())
                .await
                .map_err(|_| Pop3Error::Timeout("read"))??;
            if chunk.is_empty() {
                return Err(Pop3Error::Closed);
            }
            let (take, eol) = match memchr::memchr(b'\n', chunk) {
                Some(i) => (i + 1, true),
                None => (chunk.len(), false),
            };
            let mut piece = &chunk[..take];
            if !decided {
                let n = (HEAD - head.len()).min(piece.len());
                head.extend_from_slice(&piece[..n]);
                piece = &piece[n..];
                if head.len() == HEAD || eol {
                    if eol && piece.is_empty() && trim_eol(&head) == b"." {
                        self.io.consume(take);
                        return Ok(());
                    }
                    each(head.strip_prefix(b".").unwrap_or(&head));
                    decided = true;
                }
            }
            if decided && !piece.is_empty() {
                each(piece);
            }
            self.io.consume(take);
            if eol {
                head.clear();
                decided = false;
            }
        }
    }

    /// Reads one line (with its LF) into `buf`; longer than `max` is an error.
    async fn read_line(&mut self, buf: &mut Vec<u8>, max: usize) -> Result<(), Pop3Error> {
        if self.read_line_capped(buf, max).await? {
            Ok(())
        } else {
            Err(bad("response", "line too long"))
        }
    }

    /// Reads one line; keeps at most `max` octets of it in `buf` and returns
    /// whether the whole line fit. Memory stays bounded however long the
    /// line is.
    async fn read_line_capped(&mut self, buf: &mut Vec<u8>, max: usize) -> Result<bool, Pop3Error> {
        let mut fits = true;
        loop {
            let chunk = timeout(IO_TIMEOUT, self.io.fill_buf())
                .await
                .map_err(|_| Pop3Error::Timeout("read"))??;
            if chunk.is_empty() {
                return Err(Pop3Error::Closed);
            }
            let (take, done) = match memchr::memchr(b'\n', chunk) {
                Some(i) => (i + 1, true),
                None => (chunk.len(), false),
            };
            if buf.len() + take <= max {
                buf.extend_from_slice(&chunk[..take]);
            } else {
                fits = false;
            }
            self.io.consume(take);
            if done {
                return Ok(fits);
            }
        }
    }
}

async fn handshake(
    connector: &TlsConnector,
    name: &ServerName<'static>,
    tcp: TcpStream,
) -> Result<Stream, Pop3Error> {
    match timeout(IO_TIMEOUT, connector.connect(name.clone(), tcp)).await {
        Err(_) => Err(Pop3Error::Timeout("TLS handshake")),
        Ok(Err(e)) => Err(Pop3Error::Tls(e.to_string())),
        Ok(Ok(s)) => Ok(MaybeTls::Tls(Box::new(s))),
    }
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Characters of a server's line kept in an error (it reaches the log).
const MAX_ERROR_TEXT: usize = 200;

/// A protocol error quoting (a bounded prefix of) what the server sent.
/// The text comes from the old server: cut on a character boundary (a
/// byte index could split a UTF-8 sequence and panic) and without control
/// characters, so a hostile server cannot forge log lines.
fn bad(command: &'static str, text: &str) -> Pop3Error {
    let text = text
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_ERROR_TEXT)
        .collect();
    Pop3Error::Protocol { command, text }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A scripted server: answers each expected command line in turn, and
    /// records what it got.
    async fn serve(
        script: Vec<(&'static str, Vec<u8>)>,
    ) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"+OK ready\r\n").await.unwrap();
            let mut got = Vec::new();
            let mut buf = Vec::new();
            for (expect, answer) in script {
                loop {
                    if let Some(i) = buf.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=i).collect();
                        let line = String::from_utf8_lossy(&line).trim_end().to_string();
                        assert!(line.starts_with(expect), "expected {expect}, got {line}");
                        got.push(line);
                        break;
                    }
                    let mut b = [0u8; 1024];
                    let n = s.read(&mut b).await.unwrap();
                    if n == 0 {
                        return got;
                    }
                    buf.extend_from_slice(&b[..n]);
                }
                s.write_all(&answer).await.unwrap();
            }
            got
        });
        (addr, task)
    }

    #[tokio::test]
    async fn listing_top_retr_with_dot_unstuffing_and_no_dele() {
        let (addr, task) = serve(vec![
            ("USER", b"+OK\r\n".to_vec()),
            ("PASS", b"+OK logged in\r\n".to_vec()),
            ("UIDL", b"+OK\r\n1 abc\r\n2 def.1\r\n.\r\n".to_vec()),
            (
                "LIST",
                b"+OK 2 messages\r\n1 120\r\n2 300\r\n.\r\n".to_vec(),
            ),
            (
                "TOP 1 0",
                b"+OK\r\nSubject: x\r\n..dotted: y\r\n\r\n.\r\n".to_vec(),
            ),
            (
                "RETR 2",
                b"+OK\r\nA: b\r\n\r\n..leading dot\r\n.\r\n".to_vec(),
            ),
            (
                "TOP 2 0",
                format!(
                    "+OK\r\nA: 1\r\nX: {}\r\nY: z\r\n\r\n.\r\n",
                    "h".repeat(5000)
                )
                .into_bytes(),
            ),
            ("CAPA", b"+OK\r\nTOP\r\nPIPELINING\r\n.\r\n".to_vec()),
            ("TOP 1 0", b"+OK\r\nA: 1\r\n\r\n.\r\n".to_vec()),
            ("TOP 2 0", b"+OK\r\nB: 2\r\n\r\n.\r\n".to_vec()),
            ("QUIT", b"+OK bye\r\n".to_vec()),
        ])
        .await;
        let mut c = Pop3Client::connect(&addr, &OldTls::None).await.unwrap();
        c.login("alice", &Secret::new(b"pw".to_vec()))
            .await
            .unwrap();
        assert_eq!(
            c.uidl().await.unwrap(),
            [(1, "abc".into()), (2, "def.1".into())]
        );
        assert_eq!(c.list().await.unwrap(), [(1, 120), (2, 300)]);
        assert_eq!(
            c.top_header(1, 1000).await.unwrap(),
            b"Subject: x\r\n.dotted: y\r\n\r\n"
        );
        assert_eq!(c.retr(2).await.unwrap(), b"A: b\r\n\r\n.leading dot\r\n");
        // Over the limit: the rest is dropped, the session stays in step.
        assert_eq!(c.top_header(2, 1000).await.unwrap(), b"A: 1\r\n");
        assert_eq!(c.capabilities().await.unwrap(), ["TOP", "PIPELINING"]);
        assert_eq!(
            c.top_headers(&[1, 2], 1000).await.unwrap(),
            [b"A: 1\r\n\r\n".to_vec(), b"B: 2\r\n\r\n".to_vec()]
        );
        c.quit().await;
        let got = task.await.unwrap();
        assert!(got.iter().all(|l| !l.starts_with("DELE")), "{got:?}");
        assert_eq!(got.len(), 11);
    }

    #[tokio::test]
    async fn retr_each_streams_pipelined_messages_in_pieces() {
        let long = "y".repeat(200_000);
        let (addr, task) = serve(vec![
            (
                "RETR 1",
                format!(
                    "+OK\r\nA: 1\r\n\r\n..dot\r\n.\r\n+OK\r\n.\r\n+OK\r\nB: {long}\r\n\r\nx\r\n.\r\n"
                )
                .into_bytes(),
            ),
            ("RETR 2", Vec::new()),
            ("RETR 3", Vec::new()),
            ("RETR 4", b"+OK\r\n.\n".to_vec()),
        ])
        .await;
        let mut c = Pop3Client::connect(&addr, &OldTls::None).await.unwrap();
        let mut got = vec![Vec::new(); 3];
        c.retr_each(&[1, 2, 3], |i, piece| got[i].extend_from_slice(piece))
            .await
            .unwrap();
        assert_eq!(got[0], b"A: 1\r\n\r\n.dot\r\n");
        assert_eq!(got[1], b"", "an empty message");
        assert_eq!(got[2], format!("B: {long}\r\n\r\nx\r\n").as_bytes());
        // A bare-LF "." ends a message too.
        let mut one = Vec::new();
        c.retr_each(&[4], |_, p| one.extend_from_slice(p))
            .await
            .unwrap();
        assert_eq!(one, b"");
        assert_eq!(task.await.unwrap().len(), 4);
    }

    #[tokio::test]
    async fn errors_are_reported() {
        let (addr, _task) = serve(vec![
            ("USER", b"+OK\r\n".to_vec()),
            ("PASS", b"-ERR [AUTH] wrong password\r\n".to_vec()),
        ])
        .await;
        let mut c = Pop3Client::connect(&addr, &OldTls::None).await.unwrap();
        let e = c
            .login("alice", &Secret::new(b"pw".to_vec()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("wrong password"), "{e}");
        assert!(!e.to_string().contains("pw"));
    }

    #[tokio::test]
    async fn a_hostile_listing_line_is_an_error_not_a_panic() {
        // 199 ASCII octets then a 2-octet character: a byte-index cut at 200
        // would split it. No space, so the line is not a UIDL entry.
        let mut answer = b"+OK\r\n".to_vec();
        answer.extend_from_slice("a".repeat(199).as_bytes());
        answer.extend_from_slice("\u{e9}\x1b[2J\r\n.\r\n".as_bytes());
        let (addr, _task) = serve(vec![("UIDL", answer)]).await;
        let mut c = Pop3Client::connect(&addr, &OldTls::None).await.unwrap();
        let e = c.uidl().await.unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, Pop3Error::Protocol { .. }), "{e:?}");
        assert!(!text.contains('\x1b'), "{text:?}");
    }
}
