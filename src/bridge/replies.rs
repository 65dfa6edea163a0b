//! The one table from what went wrong at login to what the POP3 client is
//! told: an RFC 3206 response code and a fixed text (never upstream
//! wording), and the label the `popbridge_auth_total` metric counts it
//! under.

use crate::imap::UpstreamError;
use crate::oauth::login::BearerLoginError;
use crate::oauth::{BackoffCause, TokenError};
use crate::pop3::session::LoginFailure;

use super::throttle::Throttled;

/// `-ERR [AUTH]` text when an OAuth2 account's refresh token is gone or
/// revoked: the device's password was right, and only the operator can fix
/// it (`popbridge oauth add <account>`). Names nothing secret.
pub const NEEDS_ENROLMENT_TEXT: &str =
    "Mail account access expired or was revoked; the administrator must re-enrol the account.";

/// `-ERR [SYS/TEMP]` text when the provider or the IMAP server throttles.
pub const THROTTLED_TEXT: &str = "Mail server is busy for this account, try again later.";

/// `-ERR [SYS/TEMP]` text when the IMAP server refused even a fresh token.
pub const TOKEN_REFUSED_TEXT: &str =
    "Mail server refused the account's access token, try again later.";

/// `-ERR [SYS/TEMP]` text for other upstream failures at login.
pub const UNAVAILABLE_TEXT: &str = "Mail server unavailable, try again later.";

/// `-ERR [SYS/TEMP]` text when the directory could not say where a login
/// goes.
pub const DIRECTORY_DOWN_TEXT: &str = "Mail service temporarily unavailable, try again later.";

/// `-ERR [IN-USE]` text: RFC 2449 §8.1.2, the maildrop is locked.
pub const IN_USE_TEXT: &str = "Mailbox is in use by another POP3 session.";

/// A login that did not happen: what the client is told, and the metric
/// label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub failure: LoginFailure,
    pub metric: &'static str,
    /// Counted as a failed login by the throttle, and answered only after
    /// the throttle's delay (guesses, and logins the throttle stopped).
    pub failed_login: bool,
}

const fn failed(code: &'static str, text: &'static str, metric: &'static str) -> Refusal {
    Refusal {
        failure: LoginFailure::Failed { code, text },
        metric,
        failed_login: false,
    }
}

/// Wrong credentials, unknown device, no route: a failed login (counted by
/// the throttle, answered after its delay).
pub const REFUSED: Refusal = Refusal {
    failure: LoginFailure::Refused,
    metric: "refused",
    failed_login: true,
};

/// The directory did not answer usably: try again later; not a failed
/// login.
pub const DIRECTORY_DOWN: Refusal =
    failed("SYS/TEMP", DIRECTORY_DOWN_TEXT, "directory_unavailable");

/// Another POP3 session holds the mailbox's lock.
pub const IN_USE: Refusal = failed("IN-USE", IN_USE_TEXT, "in_use");

/// The device store cannot be read: not the client's fault.
pub const DEVICE_STORE_DOWN: Refusal = failed("SYS/TEMP", UNAVAILABLE_TEXT, "device_store_error");

/// An OAuth2 route whose runtime or provider is missing (validation
/// prevents it; never a silent success).
pub const OAUTH_MISCONFIGURED: Refusal = failed("SYS/TEMP", UNAVAILABLE_TEXT, "upstream_error");

/// The throttle stops a login before the IMAP server is asked.
pub fn throttled(which: Throttled) -> Refusal {
    let r = failed(
        "SYS/TEMP",
        match which {
            Throttled::Address => "Too many failed logins from your address, try again later.",
            Throttled::User => "Too many failed logins for this user, try again later.",
        },
        "throttled",
    );
    Refusal {
        failed_login: true,
        ..r
    }
}

/// The route's device policy refuses the login name (RFC 3206 AUTH).
pub fn policy(why: &'static str) -> Refusal {
    failed("AUTH", why, "refused")
}

/// The IMAP login or SELECT failed.
pub fn upstream(e: &UpstreamError) -> Refusal {
    match e {
        UpstreamError::AuthFailed(_) => REFUSED,
        UpstreamError::Throttled(_) => failed("SYS/TEMP", THROTTLED_TEXT, "upstream_throttled"),
        UpstreamError::No {
            command: "SELECT", ..
        } => failed("SYS/PERM", "Mailbox not available.", "mailbox_missing"),
        _ => failed("SYS/TEMP", UNAVAILABLE_TEXT, "upstream_error"),
    }
}

/// The OAuth2 side of a bearer login failed (an upstream error inside it
/// goes through [`upstream`]).
pub fn bearer(e: &BearerLoginError) -> Refusal {
    match e {
        BearerLoginError::Upstream(e) => upstream(e),
        BearerLoginError::UnknownProvider(_) => OAUTH_MISCONFIGURED,
        BearerLoginError::Token(TokenError::NeedsEnrolment { .. }) => {
            failed("AUTH", NEEDS_ENROLMENT_TEXT, "oauth_needs_enrolment")
        }
        // Backed off after a refused fresh token: the device hears the
        // same as at the refusal, not "busy".
        BearerLoginError::Token(TokenError::BackingOff {
            cause: BackoffCause::TokenRefused,
            ..
        }) => failed("SYS/TEMP", TOKEN_REFUSED_TEXT, "oauth_token_rejected"),
        BearerLoginError::Token(TokenError::BackingOff { .. }) => {
            failed("SYS/TEMP", THROTTLED_TEXT, "oauth_throttled")
        }
        BearerLoginError::Token(TokenError::Unavailable(_)) => {
            failed("SYS/TEMP", UNAVAILABLE_TEXT, "oauth_unavailable")
        }
        BearerLoginError::TokenRefused(_) => {
            failed("SYS/TEMP", TOKEN_REFUSED_TEXT, "oauth_token_rejected")
        }
        BearerLoginError::Throttled(_) => failed("SYS/TEMP", THROTTLED_TEXT, "upstream_throttled"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_failures_never_leak_the_servers_words() {
        let r = upstream(&UpstreamError::No {
            command: "SELECT",
            text: "secret internal path /var/mail".into(),
        });
        assert_eq!(
            r.failure,
            LoginFailure::Failed {
                code: "SYS/PERM",
                text: "Mailbox not available."
            }
        );
        assert_eq!(upstream(&UpstreamError::AuthFailed("x".into())), REFUSED);
        let r = upstream(&UpstreamError::ConnectionLost);
        assert_eq!(r.metric, "upstream_error");
        let r = bearer(&BearerLoginError::Token(TokenError::NeedsEnrolment {
            account: "a".into(),
            reason: "r".into(),
        }));
        assert_eq!(
            r.failure,
            LoginFailure::Failed {
                code: "AUTH",
                text: NEEDS_ENROLMENT_TEXT
            }
        );
    }
}
