//! The POP3 session state machine (RFC 1939 §§3-6), with no I/O.
//!
//! [`Session::handle`] takes one decoded line, writes any immediate reply into
//! an output buffer and returns an [`Action`]: go on, close, or ask the
//! driver to do upstream work (log in, fetch a message, commit at QUIT). The
//! driver reports back with the `*_result` methods, which write the reply.

use crate::pop3::maildrop::{Lookup, Maildrop};
use crate::pop3::uidl::UidlFormat;
use base64::Engine as _;

use crate::pop3::command::{
    Command, Line, MsgNum, ParseError, Secret, MAX_COMMAND_LINE, MAX_SASL_LINE,
};
use crate::pop3::response::{err, ok};

/// Dovecot disconnects after this many bad commands in a row
/// (`CLIENT_MAX_BAD_COMMANDS`); so do we, so a client stuck in a loop of
/// garbage does not keep a session open forever.
pub const MAX_BAD_COMMANDS: u32 = 20;

/// RFC 2449 §6: capabilities offered in every state and on every connection.
pub const BASE_CAPABILITIES: &[&str] =
    &["TOP", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE"];

/// RFC 2449 §6.9: who we are.
pub const IMPLEMENTATION: &str = concat!("IMPLEMENTATION popbridge-", env!("CARGO_PKG_VERSION"));

/// SASL mechanisms offered (RFC 5034), in CAPA's `SASL` line and bare `AUTH`.
pub const SASL_MECHANISMS: &[&str] = &["PLAIN", "LOGIN"];

/// The reply when credentials would cross an unencrypted connection, in the
/// spirit of Dovecot's `disable_plaintext_auth`.
const PLAINTEXT_REFUSED: &str =
    "Plaintext authentication disallowed on non-secure connections: use STLS (or POP3S, port 995) first.";

/// Settings of the connection that shape replies before login (after
/// login the route's [`Profile`] does).
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// STLS can be offered (a certificate is configured).
    pub stls_available: bool,
    /// Credentials may cross this connection without TLS: the operator allows
    /// it, or the peer is on loopback.
    pub plaintext_ok: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            stls_available: false,
            plaintext_ok: true,
        }
    }
}

/// Where the session is (RFC 1939 §3).
#[derive(Debug)]
enum State {
    /// Before login; `user` is set by USER.
    Authorization { user: Option<String> },
    /// In the middle of an AUTH exchange: the next line is a SASL response.
    Sasl(SaslStep),
    /// Waiting for the upstream login that PASS or AUTH started.
    LoggingIn,
    /// Logged in, with the snapshot.
    Transaction(Maildrop),
    /// QUIT in TRANSACTION was received; changes are being committed.
    Update,
    /// Nothing more to do; the driver closes the connection.
    Closed,
}

/// Where an AUTH exchange is.
#[derive(Debug)]
enum SaslStep {
    /// PLAIN, waiting for the response to an empty challenge.
    Plain,
    /// LOGIN, waiting for the user name.
    LoginUser,
    /// LOGIN, waiting for the password.
    LoginPass { user: String },
}

/// What the driver must do next. Any reply text is already in the output buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send what is buffered and read the next command.
    Continue,
    /// Send what is buffered, then close the connection.
    Close,
    /// Log in to the upstream and take a snapshot; then call
    /// [`Session::login_result`].
    Login { user: String, pass: Secret },
    /// Stream a message to the client; then call [`Session::fetch_result`].
    Fetch(FetchRequest),
    /// Send what is buffered (the `+OK` to STLS), then run the TLS handshake
    /// and call [`Session::tls_started`]. Input read before the handshake is
    /// discarded (RFC 2595 §4; the STARTTLS command injection class).
    StartTls,
    /// QUIT in TRANSACTION: apply these changes upstream; then call
    /// [`Session::commit_result`]. The only path that changes the mailbox.
    Commit(CommitRequest),
}

/// A RETR or TOP to stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRequest {
    pub msg: MsgNum,
    pub uid: u32,
    /// The size from the snapshot; the fetched octets must match it.
    pub size: u64,
    /// `None` for RETR, `Some(n)` for `TOP msg n`.
    pub top_lines: Option<u64>,
}

/// The changes that QUIT commits (RFC 1939 §6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitRequest {
    /// UIDs marked by DELE: to be removed.
    pub delete: Vec<u32>,
    /// UIDs retrieved with RETR and not deleted: to be marked `\Seen`.
    pub seen: Vec<u32>,
}

/// POP3 behaviour that depends on the route a login took.
#[derive(Debug, Clone)]
pub struct Profile {
    pub uidl: UidlFormat,
    pub mark_seen: bool,
    /// TOP marks `\Seen` too.
    pub mark_seen_on_top: bool,
}

impl Default for Profile {
    fn default() -> Self {
        Self {
            uidl: UidlFormat::default(),
            mark_seen: true,
            mark_seen_on_top: false,
        }
    }
}

/// How a login attempt ended.
#[derive(Debug)]
pub enum LoginOutcome {
    /// Logged in: the snapshot, and the route's POP3 behaviour.
    Ok(Maildrop, Profile),
    /// Not logged in.
    Failed(LoginFailure),
}

/// Why a login did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginFailure {
    /// The upstream refused the credentials.
    Refused,
    /// The upstream could not be used. `code` is an RFC 3206 response code;
    /// the text is safe for the client (never upstream wording).
    Failed {
        code: &'static str,
        text: &'static str,
    },
}

/// How a fetch ended, when it did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchFailure {
    /// Another client expunged the message.
    Gone,
    /// The upstream failed before anything was sent to the client; the
    /// session can go on.
    Upstream,
}

/// How a commit ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    /// All marked messages were handled (and `\Seen` set); the text says
    /// what happened when it was not a deletion (hidden, moved, kept).
    Done(Option<String>),
    /// Some marked messages could not be removed; the text says why.
    NotRemoved(String),
    /// The upstream failed; nothing can be said about what happened.
    Failed,
}

/// One POP3 session.
#[derive(Debug)]
pub struct Session {
    state: State,
    config: SessionConfig,
    /// The route's POP3 behaviour, from the login on.
    profile: Profile,
    /// TLS is active (POP3S, or after STLS).
    secure: bool,
    /// Bad commands in a row; see [`MAX_BAD_COMMANDS`].
    bad_commands: u32,
    /// The keyword of the last line handled, for metrics: `None` for a SASL
    /// response line, `INVALID` for a line that is no command.
    last_command: Option<&'static str>,
}

impl Session {
    /// A new session in the AUTHORIZATION state. The driver sends the greeting.
    pub fn new(config: SessionConfig, secure: bool) -> Self {
        Self {
            state: State::Authorization { user: None },
            config,
            profile: Profile::default(),
            secure,
            bad_commands: 0,
            last_command: None,
        }
    }

    /// What `line` would ask for if it came next: the RETR or TOP of a
    /// message in the maildrop, or `None`. Changes nothing (the driver uses
    /// it to ask the upstream for a message ahead, RFC 2449 PIPELINING).
    pub fn peek_fetch(&self, line: &[u8]) -> Option<FetchRequest> {
        let State::Transaction(drop) = &self.state else {
            return None;
        };
        let (msg, top_lines) = match Command::parse(line).ok()? {
            Command::Retr(n) => (n, None),
            Command::Top(n, lines) => (n, Some(lines)),
            _ => return None,
        };
        let e = drop.get(msg).ok()?;
        Some(FetchRequest {
            msg,
            uid: e.uid,
            size: e.size,
            top_lines,
        })
    }

    /// The keyword of the last line handled (see the field).
    pub fn last_command(&self) -> Option<&'static str> {
        self.last_command
    }

    /// The longest line the next input may be.
    pub fn max_line(&self) -> usize {
        match self.state {
            State::Sasl(_) => MAX_SASL_LINE,
            _ => MAX_COMMAND_LINE,
        }
    }

    /// The longest an `AUTH` command line may be now: in AUTHORIZATION it
    /// may carry an initial response (RFC 5034 §4) as long as any SASL
    /// line; elsewhere it is a command like the others.
    pub fn max_auth_line(&self) -> usize {
        match self.state {
            State::Authorization { .. } | State::Sasl(_) => MAX_SASL_LINE,
            _ => MAX_COMMAND_LINE,
        }
    }

    /// TLS is active.
    pub fn is_secure(&self) -> bool {
        self.secure
    }

    /// The STLS handshake succeeded. RFC 2595 §4: the server forgets what
    /// the client said before TLS (such as a USER name).
    pub fn tls_started(&mut self) {
        self.secure = true;
        self.state = State::Authorization { user: None };
    }

    fn plaintext_ok(&self) -> bool {
        self.secure || self.config.plaintext_ok
    }

    fn write_capabilities(&self, out: &mut Vec<u8>) {
        ok(out, "");
        let mut line = |s: &str| {
            out.extend_from_slice(s.as_bytes());
            out.extend_from_slice(b"\r\n");
        };
        for c in BASE_CAPABILITIES {
            line(c);
        }
        let authorization = matches!(self.state, State::Authorization { .. });
        if authorization && self.config.stls_available && !self.secure {
            line("STLS");
        }
        // Offer login methods only where they would be accepted.
        if self.plaintext_ok() {
            line("USER");
            line(&format!("SASL {}", SASL_MECHANISMS.join(" ")));
        }
        line(IMPLEMENTATION);
        out.extend_from_slice(b".\r\n");
    }

    /// True in TRANSACTION (logged in).
    pub fn is_authenticated(&self) -> bool {
        matches!(self.state, State::Transaction(_))
    }

    /// The snapshot, once logged in.
    pub fn maildrop(&self) -> Option<&Maildrop> {
        match &self.state {
            State::Transaction(m) => Some(m),
            _ => None,
        }
    }

    /// Handles one input line.
    pub fn handle(&mut self, line: Line, out: &mut Vec<u8>) -> Action {
        if let State::Sasl(_) = self.state {
            self.last_command = None;
            let result = self.sasl_response(line, out);
            return self.count(result, out);
        }
        let parsed = match line {
            Line::Complete(bytes) => Command::parse(&bytes),
            Line::TooLong => Err(ParseError::LineTooLong),
        };
        self.last_command = Some(parsed.as_ref().map_or("INVALID", Command::name));
        let action = match parsed {
            Ok(cmd) => self.command(cmd, out),
            Err(e) => {
                err(out, None, &e.to_string());
                Err(())
            }
        };
        self.count(action, out)
    }

    /// Counts bad commands; too many in a row close the session.
    fn count(&mut self, action: Result<Action, ()>, out: &mut Vec<u8>) -> Action {
        match action {
            Ok(a) => {
                self.bad_commands = 0;
                a
            }
            Err(()) => {
                self.bad_commands += 1;
                if self.bad_commands >= MAX_BAD_COMMANDS {
                    err(out, None, "Too many invalid commands.");
                    self.state = State::Closed;
                    Action::Close
                } else {
                    Action::Continue
                }
            }
        }
    }

    /// Runs a parsed command. `Err(())` means the command was refused (a
    /// `-ERR` is already written) and counts as a bad command.
    fn command(&mut self, cmd: Command, out: &mut Vec<u8>) -> Result<Action, ()> {
        // Commands valid in every state.
        match &cmd {
            Command::Capa => {
                self.write_capabilities(out);
                return Ok(Action::Continue);
            }
            Command::Noop if self.is_authenticated() => {
                ok(out, "");
                return Ok(Action::Continue);
            }
            _ => {}
        }
        let plaintext_ok = self.plaintext_ok();
        match &mut self.state {
            State::Authorization { .. }
                if !plaintext_ok
                    && matches!(
                        cmd,
                        Command::User(_) | Command::Pass(_) | Command::Auth { .. }
                    ) =>
            {
                err(out, Some("AUTH"), PLAINTEXT_REFUSED);
                Err(())
            }
            State::Authorization { .. } if matches!(cmd, Command::Stls) => {
                if self.secure {
                    err(out, None, "TLS is already active.");
                    Err(())
                } else if !self.config.stls_available {
                    err(out, None, "STLS is not available.");
                    Err(())
                } else {
                    ok(out, "Begin TLS negotiation.");
                    Ok(Action::StartTls)
                }
            }
            State::Authorization { .. } if matches!(cmd, Command::Auth { .. }) => {
                let Command::Auth { mechanism, initial } = cmd else {
                    unreachable!()
                };
                self.auth(mechanism, initial, out)
            }
            State::Authorization { user } => match cmd {
                Command::User(name) => match String::from_utf8(name) {
                    Ok(name) if valid_credential(name.as_bytes()) => {
                        *user = Some(name);
                        ok(out, "");
                        Ok(Action::Continue)
                    }
                    _ => {
                        *user = None;
                        err(out, Some("AUTH"), "Invalid characters in user name.");
                        Err(())
                    }
                },
                Command::Pass(pass) => {
                    let Some(name) = user.take() else {
                        err(out, None, "No username given.");
                        return Err(());
                    };
                    self.login_with(name, pass, out)
                }
                Command::Quit => {
                    ok(out, "Logging out.");
                    self.state = State::Closed;
                    Ok(Action::Close)
                }
                other => {
                    err(
                        out,
                        None,
                        &format!("{} is not allowed before login.", other.name()),
                    );
                    Err(())
                }
            },
            State::Transaction(drop) => transaction(drop, cmd, out, &self.profile),
            State::Sasl(_) | State::LoggingIn | State::Update | State::Closed => {
                // The driver never feeds input while upstream work is pending.
                err(out, None, "Command not allowed now.");
                Err(())
            }
        }
        .map(|action| {
            if let Action::Commit(_) = action {
                // RFC 1939 §6: QUIT in TRANSACTION enters UPDATE.
                let State::Transaction(_) = std::mem::replace(&mut self.state, State::Update)
                else {
                    unreachable!("commit is only issued in TRANSACTION")
                };
            }
            action
        })
    }

    /// `AUTH` (RFC 5034 §4).
    fn auth(
        &mut self,
        mechanism: Option<String>,
        initial: Option<Secret>,
        out: &mut Vec<u8>,
    ) -> Result<Action, ()> {
        let Some(mechanism) = mechanism else {
            // Bare AUTH lists the mechanisms (RFC 1734 clients ask this way).
            ok(out, "");
            for m in SASL_MECHANISMS {
                out.extend_from_slice(m.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b".\r\n");
            return Ok(Action::Continue);
        };
        match (mechanism.as_str(), initial) {
            ("PLAIN", Some(initial)) => self.sasl_plain(initial.expose(), out),
            ("PLAIN", None) => {
                out.extend_from_slice(b"+ \r\n");
                self.state = State::Sasl(SaslStep::Plain);
                Ok(Action::Continue)
            }
            ("LOGIN", Some(initial)) => self.sasl_login_user(initial.expose(), out),
            ("LOGIN", None) => {
                // base64("Username:")
                out.extend_from_slice(b"+ VXNlcm5hbWU6\r\n");
                self.state = State::Sasl(SaslStep::LoginUser);
                Ok(Action::Continue)
            }
            _ => {
                err(out, None, "Unsupported authentication mechanism.");
                Err(())
            }
        }
    }

    /// A line in the middle of an AUTH exchange.
    fn sasl_response(&mut self, line: Line, out: &mut Vec<u8>) -> Result<Action, ()> {
        let State::Sasl(step) =
            std::mem::replace(&mut self.state, State::Authorization { user: None })
        else {
            unreachable!("only called in the SASL state")
        };
        let Line::Complete(line) = line else {
            err(out, Some("AUTH"), "Authentication response too long.");
            return Err(());
        };
        // RFC 5034 §4: "*" cancels the exchange, answered with -ERR.
        if line == b"*" {
            err(out, None, "Authentication cancelled.");
            return Ok(Action::Continue);
        }
        match step {
            SaslStep::Plain => self.sasl_plain(&line, out),
            SaslStep::LoginUser => self.sasl_login_user(&line, out),
            SaslStep::LoginPass { user } => {
                let Some(pass) = decode_sasl(&line, out) else {
                    return Err(());
                };
                self.login_with(user, Secret::new(pass), out)
            }
        }
    }

    /// RFC 4616: `[authzid] NUL authcid NUL passwd`.
    fn sasl_plain(&mut self, b64: &[u8], out: &mut Vec<u8>) -> Result<Action, ()> {
        let Some(data) = decode_sasl(b64, out) else {
            return Err(());
        };
        let mut parts = data.split(|&b| b == 0);
        let (Some(authzid), Some(authcid), Some(pass), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            err(out, Some("AUTH"), "Invalid PLAIN response.");
            return Err(());
        };
        // We cannot act on behalf of another user: the IMAP login is authcid's.
        if !authzid.is_empty() && authzid != authcid {
            err(
                out,
                Some("AUTH"),
                "Authorization identity must be empty or equal the user name.",
            );
            return Err(());
        }
        let Ok(user) = String::from_utf8(authcid.to_vec()) else {
            err(out, Some("AUTH"), "Invalid characters in user name.");
            return Err(());
        };
        self.login_with(user, Secret::new(pass.to_vec()), out)
    }

    fn sasl_login_user(&mut self, b64: &[u8], out: &mut Vec<u8>) -> Result<Action, ()> {
        let Some(user) = decode_sasl(b64, out) else {
            return Err(());
        };
        let Ok(user) = String::from_utf8(user) else {
            err(out, Some("AUTH"), "Invalid characters in user name.");
            return Err(());
        };
        // base64("Password:")
        out.extend_from_slice(b"+ UGFzc3dvcmQ6\r\n");
        self.state = State::Sasl(SaslStep::LoginPass { user });
        Ok(Action::Continue)
    }

    /// Checks credentials from PASS or AUTH and asks for the upstream login.
    fn login_with(&mut self, user: String, pass: Secret, out: &mut Vec<u8>) -> Result<Action, ()> {
        if !valid_credential(user.as_bytes()) {
            err(out, Some("AUTH"), "Invalid characters in user name.");
            return Err(());
        }
        if !valid_credential(pass.expose()) {
            err(out, Some("AUTH"), "Invalid characters in password.");
            return Err(());
        }
        self.state = State::LoggingIn;
        Ok(Action::Login { user, pass })
    }

    /// Reports how the upstream login started by [`Action::Login`] ended.
    pub fn login_result(&mut self, outcome: LoginOutcome, out: &mut Vec<u8>) -> Action {
        match outcome {
            LoginOutcome::Ok(maildrop, profile) => {
                self.profile = profile;
                self.state = State::Transaction(maildrop);
                ok(out, "Logged in.");
                Action::Continue
            }
            LoginOutcome::Failed(LoginFailure::Refused) => {
                self.state = State::Authorization { user: None };
                // RFC 3206 §4: AUTH means the credentials were wrong.
                err(out, Some("AUTH"), "Authentication failed.");
                Action::Continue
            }
            LoginOutcome::Failed(LoginFailure::Failed { code, text }) => {
                self.state = State::Authorization { user: None };
                // RFC 3206 §4: SYS/TEMP means try again later, SYS/PERM
                // that retrying will not help.
                err(out, Some(code), text);
                Action::Continue
            }
        }
    }

    /// Reports how a fetch ended. On success the response was already sent
    /// by the driver; failures get their `-ERR` here.
    pub fn fetch_result(
        &mut self,
        req: &FetchRequest,
        result: Result<(), FetchFailure>,
        out: &mut Vec<u8>,
    ) {
        match result {
            Ok(()) => {
                let seen = match req.top_lines {
                    None => self.profile.mark_seen,
                    Some(_) => self.profile.mark_seen_on_top,
                };
                if seen {
                    if let State::Transaction(m) = &mut self.state {
                        m.mark_retrieved(req.msg);
                    }
                }
            }
            Err(FetchFailure::Gone) => {
                err(out, None, &format!("Message {} expunged.", req.msg));
            }
            Err(FetchFailure::Upstream) => {
                err(
                    out,
                    Some("SYS/TEMP"),
                    "Message could not be read from the mail server, try again later.",
                );
            }
        }
    }

    /// Reports how the commit started by QUIT ended; the session then closes.
    pub fn commit_result(
        &mut self,
        outcome: CommitOutcome,
        deleted: usize,
        out: &mut Vec<u8>,
    ) -> Action {
        self.state = State::Closed;
        match outcome {
            CommitOutcome::Done(_) if deleted == 0 => ok(out, "Logging out."),
            // The delete policy did something else than delete: say what.
            CommitOutcome::Done(Some(summary)) => ok(out, &format!("Logging out. {summary}")),
            CommitOutcome::Done(None) => ok(out, "Logging out, messages deleted."),
            // RFC 1939 §6: if the server cannot remove marked messages, QUIT
            // must answer -ERR.
            CommitOutcome::NotRemoved(why) => err(out, Some("SYS/PERM"), &why),
            CommitOutcome::Failed => err(
                out,
                Some("SYS/TEMP"),
                "The mail server failed; some changes may not have been saved.",
            ),
        }
        Action::Close
    }
}

/// Decodes a SASL response; RFC 5034 §4: "=" is an empty response.
fn decode_sasl(b64: &[u8], out: &mut Vec<u8>) -> Option<Vec<u8>> {
    if b64 == b"=" {
        return Some(Vec::new());
    }
    match base64::engine::general_purpose::STANDARD.decode(b64) {
        Ok(v) => Some(v),
        Err(_) => {
            err(out, Some("AUTH"), "Invalid base64 data.");
            None
        }
    }
}

/// Refuses bytes that must never reach the upstream as syntax, or that a
/// string cannot carry: NUL (CR and LF cannot occur inside a line).
fn valid_credential(b: &[u8]) -> bool {
    !b.is_empty() && !b.iter().any(|&c| c == 0 || c == b'\r' || c == b'\n')
}

fn lookup_error(out: &mut Vec<u8>, e: Lookup) {
    match e {
        Lookup::NoSuchMessage(n) => err(out, None, &format!("There's no message {n}.")),
        Lookup::Deleted => err(out, None, "Message is deleted."),
    }
}

/// TRANSACTION-state commands (RFC 1939 §5). Reply texts follow Dovecot's
/// POP3 server, so clients see the same bytes from either.
fn transaction(
    drop: &mut Maildrop,
    cmd: Command,
    out: &mut Vec<u8>,
    profile: &Profile,
) -> Result<Action, ()> {
    let lookup = |drop: &Maildrop, n: MsgNum, out: &mut Vec<u8>| {
        drop.get(n).cloned().map_err(|e| lookup_error(out, e))
    };
    match cmd {
        Command::Stat => {
            let (count, octets) = drop.stat();
            ok(out, &format!("{count} {octets}"));
        }
        Command::List(None) => {
            let (count, _) = drop.stat();
            ok(out, &format!("{count} messages:"));
            for (n, e) in drop.visible() {
                out.extend_from_slice(format!("{n} {}\r\n", e.size).as_bytes());
            }
            out.extend_from_slice(b".\r\n");
        }
        Command::List(Some(n)) => {
            let e = lookup(drop, n, out)?;
            ok(out, &format!("{n} {}", e.size));
        }
        Command::Uidl(None) => {
            ok(out, "");
            for (n, e) in drop.visible() {
                out.extend_from_slice(
                    format!("{n} {}\r\n", drop.uidl(e, &profile.uidl)).as_bytes(),
                );
            }
            out.extend_from_slice(b".\r\n");
        }
        Command::Uidl(Some(n)) => {
            let e = lookup(drop, n, out)?;
            ok(out, &format!("{n} {}", drop.uidl(&e, &profile.uidl)));
        }
        Command::Retr(n) => {
            let e = lookup(drop, n, out)?;
            return Ok(Action::Fetch(FetchRequest {
                msg: n,
                uid: e.uid,
                size: e.size,
                top_lines: None,
            }));
        }
        Command::Top(n, lines) => {
            let e = lookup(drop, n, out)?;
            return Ok(Action::Fetch(FetchRequest {
                msg: n,
                uid: e.uid,
                size: e.size,
                top_lines: Some(lines),
            }));
        }
        Command::Dele(n) => {
            drop.delete(n).map_err(|e| lookup_error(out, e))?;
            ok(out, "Marked to be deleted.");
        }
        Command::Rset => {
            drop.reset();
            ok(out, "");
        }
        Command::Quit => {
            return Ok(Action::Commit(CommitRequest {
                delete: drop.deleted_uids(),
                // Only messages the \Seen policy marked are here.
                seen: drop.retrieved_uids(),
            }));
        }
        Command::User(_) | Command::Pass(_) | Command::Auth { .. } | Command::Stls => {
            err(out, None, "Already logged in.");
            return Err(());
        }
        Command::Capa | Command::Noop => unreachable!("handled for every state"),
    }
    Ok(Action::Continue)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(s: &str) -> Line {
        Line::Complete(s.as_bytes().to_vec())
    }

    fn run(s: &mut Session, input: &str) -> (Action, String) {
        let mut out = Vec::new();
        let a = s.handle(line(input), &mut out);
        (a, String::from_utf8(out).unwrap())
    }

    fn logged_in() -> Session {
        let mut s = Session::new(SessionConfig::default(), false);
        run(&mut s, "USER alice");
        let (a, _) = run(&mut s, "PASS secret");
        assert!(matches!(a, Action::Login { .. }));
        let mut out = Vec::new();
        let drop = Maildrop::new(0x5f5e100, vec![(4, 100), (7, 250), (9, 30)]);
        s.login_result(LoginOutcome::Ok(drop, Profile::default()), &mut out);
        assert_eq!(out, b"+OK Logged in.\r\n");
        s
    }

    #[test]
    fn authorization() {
        let mut s = Session::new(SessionConfig::default(), false);
        assert_eq!(
            run(&mut s, "STAT").1,
            "-ERR STAT is not allowed before login.\r\n"
        );
        assert_eq!(run(&mut s, "PASS x").1, "-ERR No username given.\r\n");
        assert_eq!(run(&mut s, "USER alice").1, "+OK\r\n");
        let (a, out) = run(&mut s, "PASS  sp ace");
        assert_eq!(out, "");
        assert_eq!(
            a,
            Action::Login {
                user: "alice".into(),
                pass: Secret::new(b" sp ace".to_vec())
            }
        );
        let mut out = Vec::new();
        s.login_result(LoginOutcome::Failed(LoginFailure::Refused), &mut out);
        assert_eq!(out, b"-ERR [AUTH] Authentication failed.\r\n");
        // USER must be given again after a failed PASS.
        assert_eq!(run(&mut s, "PASS x").1, "-ERR No username given.\r\n");
        assert_eq!(
            run(&mut s, "USER a\0b").1,
            "-ERR [AUTH] Invalid characters in user name.\r\n"
        );
        run(&mut s, "USER alice");
        assert_eq!(
            run(&mut s, "PASS a\0b").1,
            "-ERR [AUTH] Invalid characters in password.\r\n"
        );
        assert_eq!(
            run(&mut s, "QUIT"),
            (Action::Close, "+OK Logging out.\r\n".into())
        );
    }

    #[test]
    fn capa_lists_required_capabilities() {
        let mut s = Session::new(SessionConfig::default(), false);
        let (_, out) = run(&mut s, "CAPA");
        for c in [
            "TOP",
            "USER",
            "UIDL",
            "RESP-CODES",
            "PIPELINING",
            "AUTH-RESP-CODE",
        ] {
            assert!(out.contains(&format!("\r\n{c}\r\n")), "{c} in {out}");
        }
        assert!(out.contains("\r\nIMPLEMENTATION popbridge"));
        assert!(out.starts_with("+OK\r\n") && out.ends_with("\r\n.\r\n"));
    }

    #[test]
    fn transaction_replies_match_dovecot() {
        let mut s = logged_in();
        assert_eq!(run(&mut s, "STAT").1, "+OK 3 380\r\n");
        assert_eq!(
            run(&mut s, "LIST").1,
            "+OK 3 messages:\r\n1 100\r\n2 250\r\n3 30\r\n.\r\n"
        );
        assert_eq!(run(&mut s, "LIST 2").1, "+OK 2 250\r\n");
        assert_eq!(run(&mut s, "LIST 4").1, "-ERR There's no message 4.\r\n");
        assert_eq!(
            run(&mut s, "UIDL").1,
            "+OK\r\n1 0000000405f5e100\r\n2 0000000705f5e100\r\n3 0000000905f5e100\r\n.\r\n"
        );
        assert_eq!(run(&mut s, "UIDL 3").1, "+OK 3 0000000905f5e100\r\n");
        assert_eq!(run(&mut s, "DELE 2").1, "+OK Marked to be deleted.\r\n");
        assert_eq!(run(&mut s, "DELE 2").1, "-ERR Message is deleted.\r\n");
        assert_eq!(run(&mut s, "RETR 2").1, "-ERR Message is deleted.\r\n");
        assert_eq!(run(&mut s, "STAT").1, "+OK 2 130\r\n");
        assert_eq!(
            run(&mut s, "LIST").1,
            "+OK 2 messages:\r\n1 100\r\n3 30\r\n.\r\n"
        );
        assert_eq!(run(&mut s, "UIDL 2").1, "-ERR Message is deleted.\r\n");
        assert_eq!(run(&mut s, "RSET").1, "+OK\r\n");
        assert_eq!(run(&mut s, "STAT").1, "+OK 3 380\r\n");
        assert_eq!(run(&mut s, "NOOP").1, "+OK\r\n");
        assert_eq!(run(&mut s, "USER bob").1, "-ERR Already logged in.\r\n");
    }

    #[test]
    fn retr_top_and_quit_ask_the_driver() {
        let mut s = logged_in();
        let (a, out) = run(&mut s, "RETR 3");
        assert_eq!(out, "");
        let Action::Fetch(req) = a else {
            panic!("{a:?}")
        };
        assert_eq!((req.uid, req.size, req.top_lines), (9, 30, None));
        let mut out = Vec::new();
        s.fetch_result(&req, Ok(()), &mut out);
        let (a, _) = run(&mut s, "TOP 1 0");
        let Action::Fetch(top) = a else { panic!() };
        assert_eq!(top.top_lines, Some(0));
        s.fetch_result(&top, Err(FetchFailure::Gone), &mut out);
        assert_eq!(out, b"-ERR Message 1 expunged.\r\n");
        run(&mut s, "DELE 1");
        let (a, _) = run(&mut s, "QUIT");
        assert_eq!(
            a,
            Action::Commit(CommitRequest {
                delete: vec![4],
                seen: vec![9]
            })
        );
        let mut out = Vec::new();
        assert_eq!(
            s.commit_result(CommitOutcome::Done(None), 1, &mut out),
            Action::Close
        );
        assert_eq!(out, b"+OK Logging out, messages deleted.\r\n");
    }

    fn b64(s: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn remote(stls: bool) -> Session {
        Session::new(
            SessionConfig {
                stls_available: stls,
                plaintext_ok: false,
            },
            false,
        )
    }

    #[test]
    fn auth_plain_with_initial_response_and_continuation() {
        let mut s = Session::new(SessionConfig::default(), false);
        let (a, out) = run(&mut s, &format!("AUTH PLAIN {}", b64(b"\0alice\0s p\"{5}")));
        assert_eq!(out, "");
        assert_eq!(
            a,
            Action::Login {
                user: "alice".into(),
                pass: Secret::new(b"s p\"{5}".to_vec())
            }
        );
        let mut s = Session::new(SessionConfig::default(), false);
        assert_eq!(s.max_auth_line(), MAX_SASL_LINE);
        assert_eq!(run(&mut s, "AUTH PLAIN").1, "+ \r\n");
        assert_eq!(s.max_line(), MAX_SASL_LINE);
        let (a, _) = run(&mut s, &b64(b"alice\0alice\0pw"));
        assert!(matches!(a, Action::Login { ref user, .. } if user == "alice"));
        assert_eq!(s.max_line(), MAX_COMMAND_LINE);
    }

    #[test]
    fn auth_login_cancel_and_bad_base64() {
        let mut s = Session::new(SessionConfig::default(), false);
        assert_eq!(run(&mut s, "AUTH LOGIN").1, "+ VXNlcm5hbWU6\r\n");
        assert_eq!(run(&mut s, &b64(b"bob")).1, "+ UGFzc3dvcmQ6\r\n");
        let (a, _) = run(&mut s, &b64(b"pw"));
        assert_eq!(
            a,
            Action::Login {
                user: "bob".into(),
                pass: Secret::new(b"pw".to_vec())
            }
        );
        let mut s = Session::new(SessionConfig::default(), false);
        run(&mut s, "AUTH PLAIN");
        assert_eq!(run(&mut s, "*").1, "-ERR Authentication cancelled.\r\n");
        assert_eq!(
            run(&mut s, "AUTH PLAIN !!!notbase64").1,
            "-ERR [AUTH] Invalid base64 data.\r\n"
        );
        assert_eq!(
            run(&mut s, &format!("AUTH PLAIN {}", b64(b"x\0alice\0pw"))).1,
            "-ERR [AUTH] Authorization identity must be empty or equal the user name.\r\n"
        );
        assert_eq!(
            run(&mut s, &format!("AUTH PLAIN {}", b64(b"alice\0pw"))).1,
            "-ERR [AUTH] Invalid PLAIN response.\r\n"
        );
        assert_eq!(
            run(&mut s, &format!("AUTH PLAIN {}", b64(b"\0alice\0p\0w"))).1,
            "-ERR [AUTH] Invalid PLAIN response.\r\n"
        );
        assert_eq!(
            run(&mut s, "AUTH CRAM-MD5").1,
            "-ERR Unsupported authentication mechanism.\r\n"
        );
        assert_eq!(run(&mut s, "AUTH").1, "+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n");
        // A too-long SASL line ends the exchange.
        run(&mut s, "AUTH PLAIN");
        let mut out = Vec::new();
        s.handle(Line::TooLong, &mut out);
        assert_eq!(out, b"-ERR [AUTH] Authentication response too long.\r\n");
        assert_eq!(s.max_line(), MAX_COMMAND_LINE);
    }

    #[test]
    fn plaintext_policy_and_stls() {
        let mut s = remote(true);
        let (_, capa) = run(&mut s, "CAPA");
        assert!(capa.contains("\r\nSTLS\r\n"), "{capa}");
        assert!(!capa.contains("USER") && !capa.contains("SASL"), "{capa}");
        for cmd in ["USER alice", "PASS x", "AUTH PLAIN", "AUTH"] {
            let (_, out) = run(&mut s, cmd);
            assert!(
                out.starts_with("-ERR [AUTH] Plaintext authentication disallowed"),
                "{cmd}: {out}"
            );
            assert!(out.contains("STLS"));
        }
        assert_eq!(
            run(&mut s, "STLS"),
            (Action::StartTls, "+OK Begin TLS negotiation.\r\n".into())
        );
        s.tls_started();
        assert!(s.is_secure());
        let (_, capa) = run(&mut s, "CAPA");
        assert!(!capa.contains("STLS"), "{capa}");
        assert!(
            capa.contains("\r\nUSER\r\n") && capa.contains("\r\nSASL PLAIN LOGIN\r\n"),
            "{capa}"
        );
        assert_eq!(run(&mut s, "STLS").1, "-ERR TLS is already active.\r\n");
        assert_eq!(run(&mut s, "USER alice").1, "+OK\r\n");
        // Without a certificate STLS is neither offered nor accepted.
        let mut s = remote(false);
        assert!(!run(&mut s, "CAPA").1.contains("STLS"));
        assert_eq!(run(&mut s, "STLS").1, "-ERR STLS is not available.\r\n");
    }

    #[test]
    fn stls_forgets_the_user_name() {
        let mut s = Session::new(
            SessionConfig {
                stls_available: true,
                ..SessionConfig::default()
            },
            false,
        );
        run(&mut s, "USER alice");
        run(&mut s, "STLS");
        s.tls_started();
        assert_eq!(run(&mut s, "PASS secret").1, "-ERR No username given.\r\n");
    }

    #[test]
    fn stls_not_allowed_after_login() {
        let mut s = logged_in();
        assert_eq!(run(&mut s, "STLS").1, "-ERR Already logged in.\r\n");
        assert_eq!(run(&mut s, "AUTH PLAIN").1, "-ERR Already logged in.\r\n");
    }

    #[test]
    fn too_many_bad_commands_close_the_session() {
        let mut s = Session::new(SessionConfig::default(), false);
        for _ in 1..MAX_BAD_COMMANDS {
            assert_eq!(run(&mut s, "BOGUS").0, Action::Continue);
        }
        let (a, out) = run(&mut s, "BOGUS");
        assert_eq!(a, Action::Close);
        assert!(out.ends_with("-ERR Too many invalid commands.\r\n"));
    }

    #[test]
    fn overlong_line_is_an_error_and_the_session_goes_on() {
        let mut s = Session::new(SessionConfig::default(), false);
        let mut out = Vec::new();
        assert_eq!(s.handle(Line::TooLong, &mut out), Action::Continue);
        assert_eq!(out, b"-ERR Line too long\r\n");
        assert_eq!(run(&mut s, "USER a").1, "+OK\r\n");
    }
}
