//! Logging in with a password (AUTHENTICATE PLAIN or LOGIN) or a SASL
//! exchange ([`super::sasl`]). Every line is written here, so no credential
//! passes through a library that logs commands.

use async_imap::imap_proto::{Response, Status};

use super::conn::{outcome_text, Wire, AUTH_TAG};
use super::connect::Caps;
use super::sasl::{self, Failure, ServerStep};
use super::settings::ImapConfig;
use super::syntax::quote;
use super::wire::{parse_response, Frame, Parsed};
use super::UpstreamError;
use crate::config::{LoginMechanism, SaslMechanism};
use crate::pop3::command::Secret;

/// What the server said during a login, owned (the next write needs the
/// connection back).
enum Reply {
    /// A continuation request (`+ text`).
    Continue(String),
    /// The login's tagged reply.
    Done { status: Status, text: String },
    /// An untagged BYE: the server's refusal, throttling included.
    Bye(String),
}

/// The next login reply; other untagged responses are skipped.
async fn reply(wire: &mut Wire, what: &'static str) -> Result<Reply, UpstreamError> {
    loop {
        let Frame::Response(bytes) = wire.next(what).await? else {
            return Err(UpstreamError::Protocol(format!("{what}: a literal")));
        };
        let Parsed::Known(r) = parse_response(bytes) else {
            continue;
        };
        return Ok(match r {
            Response::Continue(o) => Reply::Continue(o.information.as_deref().unwrap_or("").into()),
            Response::Done {
                tag,
                status,
                outcome,
            } if tag.0 == AUTH_TAG => Reply::Done {
                status,
                text: outcome_text(&outcome.code, &outcome.information),
            },
            Response::Done { tag, .. } => {
                return Err(UpstreamError::Protocol(format!(
                    "reply to unknown tag {}",
                    tag.0
                )))
            }
            Response::Data {
                status: Status::Bye,
                outcome,
            } => Reply::Bye(outcome.information.as_deref().unwrap_or("").into()),
            _ => continue,
        });
    }
}

/// Logs in with the POP3 client's password.
pub(super) async fn password_login(
    wire: &mut Wire,
    cfg: &ImapConfig,
    caps: &Caps,
    user: &str,
    pass: &Secret,
) -> Result<(), UpstreamError> {
    // Prefer AUTHENTICATE PLAIN: base64 carries any octet except NUL (which
    // the POP3 side already refused), so quotes, backslashes, braces and
    // non-ASCII reach the server intact and never as IMAP syntax.
    let plain = match cfg.login_mechanism {
        LoginMechanism::Auto => caps.auth_plain,
        LoginMechanism::Plain => true,
        LoginMechanism::Login => false,
    };
    if plain {
        let initial = sasl::plain_response(user, pass.expose());
        return authenticate(wire, SaslMechanism::Plain, initial, caps.sasl_ir).await;
    }
    if caps.login_disabled {
        return Err(UpstreamError::Unsupported(
            "the IMAP server refuses LOGIN (LOGINDISABLED) and offers no AUTH=PLAIN".into(),
        ));
    }
    // LOGIN sends each as a quoted string when it is 7-bit, otherwise as a
    // synchronizing literal (RFC 3501 §4.3: a quoted string holds 7-bit
    // characters only; a literal any octet but NUL). CR, LF and NUL are
    // refused either way: they never reach the server.
    let (Some(user_arg), Some(pass_arg)) = (login_arg(user.as_bytes()), login_arg(pass.expose()))
    else {
        return Err(UpstreamError::AuthFailed(
            "user name or password holds CR, LF or NUL".into(),
        ));
    };
    let mut line = format!("{AUTH_TAG} LOGIN ").into_bytes();
    for (i, arg) in [user_arg, pass_arg].into_iter().enumerate() {
        if i > 0 {
            line.push(b' ');
        }
        match arg {
            LoginArg::Quoted(q) => line.extend_from_slice(q.as_bytes()),
            LoginArg::Literal(bytes) => {
                line.extend_from_slice(format!("{{{}}}\r\n", bytes.len()).as_bytes());
                wire.write(&line, "LOGIN").await?;
                // RFC 3501 §7.5: the literal's octets go only after the
                // server's `+`; a tagged reply instead ends the command.
                match reply(wire, "LOGIN").await? {
                    Reply::Continue(_) => {}
                    Reply::Done { status, text } => {
                        return Err(match login_status(&status, text) {
                            Ok(()) => UpstreamError::Protocol(
                                "LOGIN answered OK before its arguments were sent".into(),
                            ),
                            Err(e) => e,
                        });
                    }
                    Reply::Bye(text) => return Err(login_bye(&text)),
                }
                line = bytes.to_vec();
            }
        }
    }
    line.extend_from_slice(b"\r\n");
    wire.write(&line, "LOGIN").await?;
    drop(line);
    loop {
        match reply(wire, "LOGIN").await? {
            Reply::Done { status, text } => return login_status(&status, text),
            Reply::Bye(text) => return Err(login_bye(&text)),
            Reply::Continue(_) => {}
        }
    }
}

/// A LOGIN argument (RFC 3501 §4.3): quoted when 7-bit, else a literal.
enum LoginArg<'a> {
    Quoted(String),
    Literal(&'a [u8]),
}

/// `None` when `value` holds CR, LF or NUL.
fn login_arg(value: &[u8]) -> Option<LoginArg<'_>> {
    if value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        return None;
    }
    match std::str::from_utf8(value) {
        Ok(s) if s.is_ascii() => quote(s).map(LoginArg::Quoted),
        _ => Some(LoginArg::Literal(value)),
    }
}

/// What LOGIN's tagged reply means.
fn login_status(status: &Status, text: String) -> Result<(), UpstreamError> {
    match status {
        Status::Ok => Ok(()),
        Status::No if sasl::is_temporary(&text) => Err(UpstreamError::No {
            command: "LOGIN",
            text,
        }),
        Status::No => Err(UpstreamError::AuthFailed(text)),
        _ => Err(UpstreamError::AuthFailed(format!("BAD {text}"))),
    }
}

/// An untagged BYE while logging in: the server's refusal, throttling
/// included, rather than an anonymous lost connection.
fn login_bye(text: &str) -> UpstreamError {
    if sasl::is_throttled(text) {
        UpstreamError::Throttled(format!("BYE {text}"))
    } else {
        UpstreamError::Greeting(format!("BYE {text}"))
    }
}

/// Drives one AUTHENTICATE exchange ([`sasl::Exchange`]) to its tagged
/// reply, writing every line itself.
pub(super) async fn authenticate(
    wire: &mut Wire,
    mechanism: SaslMechanism,
    initial: sasl::SecretBytes,
    sasl_ir: bool,
) -> Result<(), UpstreamError> {
    let mut exchange = sasl::Exchange::new(mechanism, initial);
    let command = match exchange.start(sasl_ir) {
        sasl::Write::Command(c) | sasl::Write::Line(c) => c,
    };
    let mut line = Vec::with_capacity(command.expose().len() + 8);
    line.extend_from_slice(AUTH_TAG.as_bytes());
    line.push(b' ');
    line.extend_from_slice(command.expose());
    line.extend_from_slice(b"\r\n");
    wire.write(&line, "AUTHENTICATE").await?;
    drop(line);
    loop {
        let next = match reply(wire, "AUTHENTICATE").await? {
            Reply::Continue(text) => exchange.step(ServerStep::Continue(&text)),
            Reply::Done { status, text } => exchange.step(ServerStep::Done {
                ok: matches!(status, Status::Ok),
                bad: matches!(status, Status::Bad),
                text: &text,
            }),
            Reply::Bye(text) => return Err(login_bye(&text)),
        };
        match next {
            sasl::Next::Write(sasl::Write::Line(l) | sasl::Write::Command(l)) => {
                let mut line = Vec::with_capacity(l.expose().len() + 2);
                line.extend_from_slice(l.expose());
                line.extend_from_slice(b"\r\n");
                wire.write(&line, "AUTHENTICATE").await?;
            }
            sasl::Next::Authenticated => return Ok(()),
            sasl::Next::Failed(f) => {
                return Err(match f {
                    Failure::TokenRejected { status, text } => {
                        UpstreamError::TokenRejected { status, text }
                    }
                    Failure::Throttled(text) => UpstreamError::Throttled(text),
                    Failure::Temporary(text) => UpstreamError::No {
                        command: "AUTHENTICATE",
                        text,
                    },
                    Failure::Refused(text) => UpstreamError::AuthFailed(text),
                })
            }
        }
    }
}

/// Host and port of a `host:port` address (`[v6]:port` too), for the
/// OAUTHBEARER `host` and `port` keys.
pub(super) fn host_port(address: &str) -> (&str, u16) {
    let (host, port) = address.rsplit_once(':').unwrap_or((address, "0"));
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, port.parse().unwrap_or(0))
}
