//! A bare POP3 client over one TCP connection, for the tests that need what
//! [`super::Pop3`] hides: its own address (to find its session in
//! popbridge's log), a connection closed or half-closed at any point, reads
//! that report the server's close instead of panicking, and the raw bytes
//! after the last reply.

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};

use super::connect_client;

/// One POP3 connection to 127.0.0.1; reads time out as in
/// [`connect_client`].
pub struct RawPop3 {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    /// The client side of the connection, as popbridge logs it.
    pub local: SocketAddr,
}

/// A close by the peer that shows up as an error rather than EOF.
pub fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    )
}

impl RawPop3 {
    /// Connects without reading anything (for servers that may send
    /// something other than a greeting, or nothing).
    pub fn connect(port: u16) -> RawPop3 {
        let (stream, reader) = connect_client(port, "POP3");
        let local = stream.local_addr().expect("local_addr");
        RawPop3 {
            stream,
            reader,
            local,
        }
    }

    /// Connects and requires a "+OK" greeting.
    pub fn connect_greeted(port: u16) -> RawPop3 {
        let mut raw = RawPop3::connect(port);
        let greeting = raw.expect_line("a greeting");
        assert!(greeting.starts_with("+OK"), "greeting: {greeting}");
        raw
    }

    /// Writes `bytes` as they are.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("POP3 write");
        self.stream.flush().expect("POP3 flush");
    }

    /// Shuts down one or both directions of the connection.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.stream.shutdown(how)
    }

    /// One line without CRLF; `None` when the server closed the connection
    /// (EOF or reset) before a line began. Panics on a read timeout or a
    /// connection closed mid-line.
    pub fn try_line(&mut self) -> Option<String> {
        let mut line = Vec::new();
        match self.reader.read_until(b'\n', &mut line) {
            Ok(0) => None,
            Ok(_) if line.ends_with(b"\r\n") => {
                line.truncate(line.len() - 2);
                Some(String::from_utf8_lossy(&line).into_owned())
            }
            Ok(_) => panic!(
                "connection closed mid-line: {:?}",
                String::from_utf8_lossy(&line)
            ),
            Err(e) if is_reset(&e) && line.is_empty() => None,
            Err(e) => panic!(
                "read failed: {e} (partial line {:?})",
                String::from_utf8_lossy(&line)
            ),
        }
    }

    /// One line without CRLF; panics, naming `what` was expected, when the
    /// connection is closed instead.
    pub fn expect_line(&mut self, what: &str) -> String {
        self.try_line()
            .unwrap_or_else(|| panic!("connection closed, expected {what}"))
    }

    /// Sends `cmd` with CRLF and returns the status line.
    pub fn cmd(&mut self, cmd: &str) -> String {
        self.send(format!("{cmd}\r\n").as_bytes());
        self.expect_line(&format!("a reply to {cmd}"))
    }

    /// A multi-line reply's body lines (after +OK), raw (still
    /// dot-stuffed), without the "." terminator.
    pub fn body(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let l = self.expect_line("a multi-line body");
            if l == "." {
                return out;
            }
            out.push(l);
        }
    }

    /// A command whose +OK reply is multi-line: the status line and, after
    /// +OK, the body as [`RawPop3::body`] returns it (empty after -ERR).
    pub fn cmd_multi(&mut self, cmd: &str) -> (String, Vec<String>) {
        let status = self.cmd(cmd);
        let body = if status.starts_with("+OK") {
            self.body()
        } else {
            Vec::new()
        };
        (status, body)
    }

    /// Everything until the server closes the connection (EOF or reset).
    pub fn rest(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                // See super::connect_client.
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if is_reset(&e) => return out,
                Err(e) => panic!(
                    "read failed: {e} (received so far: {:?})",
                    String::from_utf8_lossy(&out)
                ),
            }
        }
    }

    /// Everything until a clean EOF; unlike [`RawPop3::rest`] a reset
    /// panics too.
    pub fn read_to_eof(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        self.reader.read_to_end(&mut out).expect("read to EOF");
        out
    }

    /// USER and PASS; both replies must be +OK.
    pub fn login(&mut self, user: &str, pass: &str) {
        let r = self.cmd(&format!("USER {user}"));
        assert!(r.starts_with("+OK"), "USER {user}: {r}");
        let r = self.cmd(&format!("PASS {pass}"));
        assert!(r.starts_with("+OK"), "PASS for {user}: {r}");
    }

    /// Closes the TCP connection without QUIT; returns the client address
    /// to look for in popbridge's log.
    pub fn drop_connection(self) -> SocketAddr {
        let _ = self.stream.shutdown(Shutdown::Both);
        self.local
    }
}
