//! SASL for IMAP `AUTHENTICATE` (RFC 3501 §6.2.2), with no I/O: the
//! initial responses of PLAIN, XOAUTH2 and OAUTHBEARER, the steps of one
//! exchange, and what a failed exchange means (token refused, throttled,
//! temporary, bad credentials).
//!
//! The driver in [`super::login`] writes what [`Exchange`] says to write and
//! feeds it what the server answers. Secrets live only in the
//! [`SecretBytes`] the exchange hands out for writing; nothing here formats
//! them into a string that could reach a log.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

/// Bytes that carry a credential (a SASL response). `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    /// The bytes, to be written to the server and nowhere else.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBytes(***)")
    }
}

/// RFC 4616 §2: `[authzid] NUL authcid NUL passwd`, authzid empty.
pub fn plain_response(user: &str, pass: &[u8]) -> SecretBytes {
    let mut v = Vec::with_capacity(user.len() + pass.len() + 2);
    v.push(0);
    v.extend_from_slice(user.as_bytes());
    v.push(0);
    v.extend_from_slice(pass);
    SecretBytes(v)
}

/// Why a bearer response cannot be built. Names the field, never its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaslFieldError {
    /// RFC 7628 §3.1: key/value pairs are separated by %x01 and values are
    /// `*(VCHAR / RWS)`; a control character (%x01 above all, or CR/LF)
    /// in the account name or host would end the field early and let the
    /// rest be read as further pairs.
    #[error("the {0} contains a control character and cannot be sent in a SASL response")]
    Control(&'static str),
    /// RFC 6750 §2.1 `b64token`: a bearer token has no spaces or controls.
    #[error("the access token contains characters a bearer token cannot have")]
    BadToken,
}

fn no_controls(what: &'static str, s: &str) -> Result<(), SaslFieldError> {
    if s.chars().any(char::is_control) {
        return Err(SaslFieldError::Control(what));
    }
    Ok(())
}

/// RFC 6750 §2.1: `b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" /
/// "+" / "/" ) *"="`; only the absence of spaces and controls is enforced
/// (what keeps the framing intact), not the exact alphabet.
fn check_token(token: &str) -> Result<(), SaslFieldError> {
    if token.is_empty() || !token.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(SaslFieldError::BadToken);
    }
    Ok(())
}

/// Google's XOAUTH2 (developers.google.com/gmail/imap/xoauth2-protocol),
/// also Microsoft's: `user=<account>^Aauth=Bearer <token>^A^A`. XOAUTH2 has
/// no escaping, so an account name with a control character is refused.
pub fn xoauth2_response(account: &str, token: &str) -> Result<SecretBytes, SaslFieldError> {
    no_controls("account name", account)?;
    check_token(token)?;
    Ok(SecretBytes(
        format!("user={account}\x01auth=Bearer {token}\x01\x01").into_bytes(),
    ))
}

/// RFC 7628 §3.1: a GS2 header without channel binding naming the account
/// (`n,a=<saslname>,`), then `host`, `port` and `auth` key/value pairs,
/// each ended by %x01, and a final %x01.
pub fn oauthbearer_response(
    account: &str,
    host: &str,
    port: u16,
    token: &str,
) -> Result<SecretBytes, SaslFieldError> {
    no_controls("account name", account)?;
    no_controls("host", host)?;
    check_token(token)?;
    Ok(SecretBytes(
        format!(
            "n,a={},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01",
            gs2_saslname(account)
        )
        .into_bytes(),
    ))
}

/// RFC 5801 §4: in a GS2 `saslname`, `=` is written `=3D` and `,` `=2C`.
fn gs2_saslname(name: &str) -> String {
    let mut s = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '=' => s.push_str("=3D"),
            ',' => s.push_str("=2C"),
            c => s.push(c),
        }
    }
    s
}

/// RFC 7628 §3.2.3: after a failure the server sends an error as a
/// challenge and the client answers with a single %x01 ("AQ==" in base64).
pub const OAUTHBEARER_DUMMY: &str = "AQ==";

use crate::config::SaslMechanism;

/// Octets of a server's base64 error challenge we decode at most. Real
/// ones are under 200 (`{"status":"401","schemes":"bearer","scope":"..."}`).
pub const MAX_ERROR_CHALLENGE: usize = 4096;

/// Characters of a provider's `status` kept for the log.
pub const MAX_STATUS_LEN: usize = 64;

/// The JSON error a server sends as a challenge when it refuses a bearer
/// token (RFC 7628 §3.2.2; Google and Microsoft send the same shape for
/// XOAUTH2). Only `status` is kept: it is all the log needs, and holds no
/// secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BearerError {
    /// e.g. `invalid_token`, `401`, `400`.
    pub status: String,
}

/// Decodes an error challenge (the base64 text after `+ `). `None` when
/// it is not base64 of a JSON object with a `status` string; the status is
/// cut to printable ASCII of bounded length, as it goes to the log.
pub fn decode_bearer_error(challenge_b64: &str) -> Option<BearerError> {
    let text = challenge_b64.trim();
    if text.is_empty() || text.len() > MAX_ERROR_CHALLENGE {
        return None;
    }
    let raw = B64.decode(text).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    let status = match value.get("status")? {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => return None,
    };
    let status: String = status
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(MAX_STATUS_LEN)
        .collect();
    Some(BearerError { status })
}

/// What to write next in an exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// The command with our tag in front: `AUTHENTICATE <mech>[ <b64>]`.
    /// It holds the base64 credential with SASL-IR, so it is secret.
    Command(SecretBytes),
    /// A line in answer to a `+` continuation (secret: the credential, or
    /// the %x01 dummy / empty line after an error challenge).
    Line(SecretBytes),
}

/// How a failed AUTHENTICATE is to be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The server refused the bearer token (expired, revoked, wrong
    /// account): forget it and try once more with a fresh one.
    TokenRejected {
        /// The provider's status from the error challenge, when sent.
        status: Option<String>,
        /// The tagged reply's text, for the log.
        text: String,
    },
    /// The server throttles this account (Gmail's `[THROTTLED]`, too many
    /// connections): back off, do not retry now.
    Throttled(String),
    /// A temporary condition (RFC 5530 `[UNAVAILABLE]`, `[SERVERBUG]`...).
    Temporary(String),
    /// The credentials were refused (PLAIN), or the server's answer means
    /// no token will do (BAD).
    Refused(String),
}

/// One AUTHENTICATE exchange as a state machine.
#[derive(Debug)]
pub struct Exchange {
    mechanism: SaslMechanism,
    initial: SecretBytes,
    /// The initial response went with the command (RFC 4959 SASL-IR).
    sent_initial: bool,
    /// An error challenge came (and was answered).
    error: Option<BearerError>,
    /// A challenge came after the error dummy was sent: the server is out
    /// of step; we cancel (RFC 3501 §6.2.2: `*`).
    answered_error: bool,
}

/// What the server said, as the exchange needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerStep<'a> {
    /// `+ <base64>` (or `+` alone).
    Continue(&'a str),
    /// Our tagged reply: OK, or NO/BAD with the text (code included).
    Done { ok: bool, bad: bool, text: &'a str },
}

/// What the driver does after a server step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Write this line and read on.
    Write(Write),
    /// Authenticated.
    Authenticated,
    /// Failed; the tagged reply was read, the connection is in step.
    Failed(Failure),
}

impl Exchange {
    /// `sasl_ir`: send the initial response with the command (the server
    /// announced SASL-IR and the provider does not want two steps).
    pub fn new(mechanism: SaslMechanism, initial: SecretBytes) -> Self {
        Self {
            mechanism,
            initial,
            sent_initial: false,
            error: None,
            answered_error: false,
        }
    }

    /// The command to send first (after the tag and a space).
    pub fn start(&mut self, sasl_ir: bool) -> Write {
        let mut cmd = format!("AUTHENTICATE {}", self.mechanism.name()).into_bytes();
        if sasl_ir {
            cmd.push(b' ');
            // RFC 4959 §3: an empty initial response is sent as "=".
            if self.initial.0.is_empty() {
                cmd.push(b'=');
            } else {
                cmd.extend_from_slice(B64.encode(&self.initial.0).as_bytes());
            }
            self.sent_initial = true;
        }
        Write::Command(SecretBytes(cmd))
    }

    /// Feeds one server response.
    pub fn step(&mut self, server: ServerStep<'_>) -> Next {
        match server {
            ServerStep::Continue(challenge) => {
                if !self.sent_initial {
                    // The empty challenge of the two-step exchange.
                    self.sent_initial = true;
                    return Next::Write(Write::Line(SecretBytes(
                        B64.encode(&self.initial.0).into_bytes(),
                    )));
                }
                if self.answered_error || !self.mechanism.is_bearer() {
                    // RFC 3501 §6.2.2: "*" cancels the exchange; the server
                    // answers BAD.
                    self.answered_error = true;
                    return Next::Write(Write::Line(SecretBytes(b"*".to_vec())));
                }
                // RFC 7628 §3.2.3 (and Google's XOAUTH2 documentation): an
                // error challenge; answer with the dummy response, then the
                // tagged NO follows.
                self.error = decode_bearer_error(challenge).or(Some(BearerError {
                    status: String::new(),
                }));
                self.answered_error = true;
                let dummy: &[u8] = match self.mechanism {
                    SaslMechanism::OauthBearer => OAUTHBEARER_DUMMY.as_bytes(),
                    // XOAUTH2: an empty response.
                    _ => b"",
                };
                Next::Write(Write::Line(SecretBytes(dummy.to_vec())))
            }
            ServerStep::Done { ok: true, .. } => Next::Authenticated,
            ServerStep::Done { bad, text, .. } => Next::Failed(self.classify(bad, text)),
        }
    }

    fn classify(&self, bad: bool, text: &str) -> Failure {
        let text = text.to_string();
        if is_throttled(&text) {
            return Failure::Throttled(text);
        }
        if is_temporary(&text) {
            return Failure::Temporary(text);
        }
        if bad {
            return Failure::Refused(format!("BAD {text}"));
        }
        if self.mechanism.is_bearer() {
            // A NO to a bearer token means the token: the account behind it
            // is the provider's business, and a fresh token is the cure
            // when it is only expired or revoked.
            let status = self
                .error
                .as_ref()
                .map(|e| e.status.clone())
                .filter(|s| !s.is_empty());
            return Failure::TokenRejected { status, text };
        }
        Failure::Refused(text)
    }
}

/// Answers that mean "this account is throttled": Gmail's `[THROTTLED]`
/// (developers.google.com/gmail/imap/imap-extensions), RFC 5530
/// `[UNAVAILABLE]` and `[LIMIT]`, and connection-limit texts as Exchange
/// Online words them. Case-insensitive.
pub fn is_throttled(text: &str) -> bool {
    const NEEDLES: &[&str] = &[
        "[throttled]",
        "[unavailable]",
        "[limit]",
        "throttl",
        "too many simultaneous connections",
        "too many concurrent connections",
        "concurrent connection limit",
        "maximum number of connections",
        "server unavailable",
    ];
    let lower = text.to_ascii_lowercase();
    NEEDLES.iter().any(|n| lower.contains(n))
}

/// RFC 5530 codes that mean "not your credentials, try later".
pub fn is_temporary(text: &str) -> bool {
    ["[UNAVAILABLE]", "[SERVERBUG]", "[INUSE]", "[LIMIT]"]
        .iter()
        .any(|code| text.to_ascii_uppercase().contains(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(w: Write) -> Vec<u8> {
        match w {
            Write::Command(b) => b.0,
            other => panic!("expected a command, got {other:?}"),
        }
    }

    fn line(n: Next) -> Vec<u8> {
        match n {
            Next::Write(Write::Line(b)) => b.0,
            other => panic!("expected a line, got {other:?}"),
        }
    }

    #[test]
    fn xoauth2_bytes_match_googles_example() {
        // developers.google.com/gmail/imap/xoauth2-protocol, "SASL XOAUTH2
        // initial client response": user someuser@example.com, token
        // ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg.
        let r = xoauth2_response(
            "someuser@example.com",
            "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg",
        )
        .unwrap();
        assert_eq!(
            r.expose(),
            b"user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01"
        );
        assert_eq!(
            B64.encode(r.expose()),
            "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
        );
    }

    #[test]
    fn oauthbearer_bytes_match_rfc7628() {
        // RFC 7628 §4.1 example (its token, host and port).
        let r = oauthbearer_response(
            "user@example.com",
            "server.example.com",
            143,
            "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==",
        )
        .unwrap();
        assert_eq!(
            r.expose(),
            b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
        );
        // RFC 5801 §4 escaping of "=" and ",".
        let r = oauthbearer_response("a=b,c", "h", 1, "t").unwrap();
        assert!(r
            .expose()
            .starts_with(b"n,a=a=3Db=2Cc,\x01host=h\x01port=1\x01"));
    }

    #[test]
    fn control_characters_cannot_break_the_framing() {
        // XOAUTH2 has no escaping: ^A would start a forged key/value pair.
        for account in ["a\x01auth=Bearer forged", "a\r\nb", "a\nb", "a\x7f"] {
            assert_eq!(
                xoauth2_response(account, "t"),
                Err(SaslFieldError::Control("account name")),
                "{account:?}"
            );
            assert_eq!(
                oauthbearer_response(account, "h", 1, "t"),
                Err(SaslFieldError::Control("account name")),
                "{account:?}"
            );
        }
        assert_eq!(
            oauthbearer_response("a", "h\x01auth=Bearer x", 1, "t"),
            Err(SaslFieldError::Control("host"))
        );
        for token in ["", "t\x01", "t u", "t\r\n"] {
            assert_eq!(
                xoauth2_response("a", token),
                Err(SaslFieldError::BadToken),
                "{token:?}"
            );
        }
        // Printable names, "," "=" and non-ASCII letters are fine.
        assert!(xoauth2_response("j\u{f6}rg,x=y@example.org", "ya29.A-b_c~d+e/f==").is_ok());
    }

    #[test]
    fn plain_bytes() {
        assert_eq!(plain_response("alice", b"s3").expose(), b"\0alice\0s3");
    }

    #[test]
    fn secrets_do_not_print() {
        let r = xoauth2_response("a", "TOKEN").unwrap();
        assert_eq!(format!("{r:?}"), "SecretBytes(***)");
        let mut x = Exchange::new(SaslMechanism::XOauth2, r);
        assert!(!format!("{x:?}").contains("TOKEN"));
        assert!(!format!("{:?}", x.start(true)).contains("VE9LRU4"));
    }

    #[test]
    fn sasl_ir_sends_everything_with_the_command() {
        let mut x = Exchange::new(SaslMechanism::XOauth2, xoauth2_response("u", "t").unwrap());
        assert_eq!(
            cmd(x.start(true)),
            format!(
                "AUTHENTICATE XOAUTH2 {}",
                B64.encode(b"user=u\x01auth=Bearer t\x01\x01")
            )
            .into_bytes()
        );
        assert_eq!(
            x.step(ServerStep::Done {
                ok: true,
                bad: false,
                text: "Logged in"
            }),
            Next::Authenticated
        );
    }

    #[test]
    fn two_step_waits_for_the_continuation() {
        let mut x = Exchange::new(SaslMechanism::XOauth2, xoauth2_response("u", "t").unwrap());
        assert_eq!(cmd(x.start(false)), b"AUTHENTICATE XOAUTH2");
        assert_eq!(
            line(x.step(ServerStep::Continue(""))),
            B64.encode(b"user=u\x01auth=Bearer t\x01\x01").into_bytes()
        );
        assert_eq!(
            x.step(ServerStep::Done {
                ok: true,
                bad: false,
                text: ""
            }),
            Next::Authenticated
        );
    }

    #[test]
    fn oauthbearer_error_challenge_gets_the_dummy_then_no_means_token_rejected() {
        let mut x = Exchange::new(
            SaslMechanism::OauthBearer,
            oauthbearer_response("u", "h", 143, "t").unwrap(),
        );
        x.start(true);
        let challenge =
            B64.encode(br#"{"status":"invalid_token","schemes":"bearer","scope":"mail"}"#);
        assert_eq!(line(x.step(ServerStep::Continue(&challenge))), b"AQ==");
        assert_eq!(
            x.step(ServerStep::Done {
                ok: false,
                bad: false,
                text: "[AUTHENTICATIONFAILED] Authentication failed"
            }),
            Next::Failed(Failure::TokenRejected {
                status: Some("invalid_token".into()),
                text: "[AUTHENTICATIONFAILED] Authentication failed".into()
            })
        );
    }

    #[test]
    fn xoauth2_error_challenge_gets_an_empty_line() {
        let mut x = Exchange::new(SaslMechanism::XOauth2, xoauth2_response("u", "t").unwrap());
        x.start(false);
        line(x.step(ServerStep::Continue("")));
        let challenge = B64
            .encode(br#"{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}"#);
        assert_eq!(line(x.step(ServerStep::Continue(&challenge))), b"");
        // A second challenge after the dummy: cancel.
        assert_eq!(line(x.step(ServerStep::Continue(&challenge))), b"*");
        match x.step(ServerStep::Done {
            ok: false,
            bad: false,
            text: "Invalid credentials (Failure)",
        }) {
            Next::Failed(Failure::TokenRejected { status, .. }) => {
                assert_eq!(status.as_deref(), Some("401"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn throttling_and_temporary_answers_are_not_token_problems() {
        for (text, want_throttled) in [
            (
                "[THROTTLED] Account exceeded command or bandwidth limits.",
                true,
            ),
            ("[UNAVAILABLE] Temporary authentication failure", true),
            ("Too many simultaneous connections. (Failure)", true),
            (
                "User is authenticated but not connected. Request is throttled.",
                true,
            ),
            ("[SERVERBUG] Internal error", false),
        ] {
            let mut x = Exchange::new(SaslMechanism::XOauth2, xoauth2_response("u", "t").unwrap());
            x.start(true);
            let got = x.step(ServerStep::Done {
                ok: false,
                bad: false,
                text,
            });
            match got {
                Next::Failed(Failure::Throttled(_)) if want_throttled => {}
                Next::Failed(Failure::Temporary(_)) if !want_throttled => {}
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn plain_no_is_refused_and_bad_is_never_a_token_problem() {
        let mut x = Exchange::new(SaslMechanism::Plain, plain_response("u", b"p"));
        x.start(true);
        assert_eq!(
            x.step(ServerStep::Done {
                ok: false,
                bad: false,
                text: "[AUTHENTICATIONFAILED] Authentication failed."
            }),
            Next::Failed(Failure::Refused(
                "[AUTHENTICATIONFAILED] Authentication failed.".into()
            ))
        );
        let mut x = Exchange::new(SaslMechanism::XOauth2, xoauth2_response("u", "t").unwrap());
        x.start(true);
        assert!(matches!(
            x.step(ServerStep::Done {
                ok: false,
                bad: true,
                text: "Unknown command"
            }),
            Next::Failed(Failure::Refused(_))
        ));
    }

    #[test]
    fn empty_initial_response_is_an_equals_sign() {
        let mut x = Exchange::new(SaslMechanism::Plain, SecretBytes(Vec::new()));
        assert_eq!(cmd(x.start(true)), b"AUTHENTICATE PLAIN =");
    }

    #[test]
    fn error_json_decoding() {
        let enc = |s: &str| B64.encode(s.as_bytes());
        assert_eq!(
            decode_bearer_error(&enc(r#"{"status":"invalid_token"}"#)),
            Some(BearerError {
                status: "invalid_token".into()
            })
        );
        assert_eq!(
            decode_bearer_error(&enc(r#"{"status":401}"#)).map(|e| e.status),
            Some("401".into())
        );
        // Control characters and length are cut for the log.
        let long = format!(r#"{{"status":"a\nb{}"}}"#, "x".repeat(500));
        let st = decode_bearer_error(&enc(&long)).unwrap().status;
        assert!(st.starts_with("abx") && st.len() == MAX_STATUS_LEN);
        assert_eq!(decode_bearer_error("not base64!"), None);
        assert_eq!(decode_bearer_error(&enc("not json")), None);
        assert_eq!(decode_bearer_error(&enc(r#"{"schemes":"bearer"}"#)), None);
        assert_eq!(decode_bearer_error(""), None);
        assert_eq!(
            decode_bearer_error(&"A".repeat(MAX_ERROR_CHALLENGE + 4)),
            None
        );
    }
}
