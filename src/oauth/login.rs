//! The IMAP login with an account's access token, and the one-retry rule
//! every caller shares (the POP3 server's login path, `popbridge oauth
//! test`, `popbridge migrate` on an OAuth2 route): a token the IMAP server
//! refuses is forgotten and a fresh one tried once; a fresh token refused
//! too, or a server that throttles the account, backs the account off.
//!
//! [`bearer_step`] is the decision without I/O; [`bearer_login`] drives it.

use std::net::SocketAddr;

use tracing::{info, warn};

use super::{BackoffCause, OauthRuntime, TokenError};
use crate::imap::{Connector, Credentials, Snapshot, UpstreamError};

/// Which bearer login this is: a token refused on the first try gets one
/// retry with a fresh token, never more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BearerAttempt {
    First,
    Retry,
}

/// What to do after a bearer login attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BearerStep {
    /// Success or an error handled like any login's.
    Proceed,
    /// The token was refused: forget it, get a fresh one, try once more.
    RetryWithFreshToken,
    /// A fresh token was refused too: stop, and back the account off.
    GiveUp,
    /// The server throttles the account: back off, no retry now.
    Throttled,
}

/// The retry decision after a bearer login, without I/O.
pub fn bearer_step<T>(attempt: BearerAttempt, result: &Result<T, UpstreamError>) -> BearerStep {
    match (result, attempt) {
        (Err(UpstreamError::TokenRejected { .. }), BearerAttempt::First) => {
            BearerStep::RetryWithFreshToken
        }
        (Err(UpstreamError::TokenRejected { .. }), BearerAttempt::Retry) => BearerStep::GiveUp,
        (Err(UpstreamError::Throttled(_)), _) => BearerStep::Throttled,
        _ => BearerStep::Proceed,
    }
}

/// Why a bearer login produced no session. None of the texts holds a token.
#[derive(Debug, thiserror::Error)]
pub enum BearerLoginError {
    /// The route names a provider the runtime does not know.
    #[error("OAuth2 provider {0:?} is not configured")]
    UnknownProvider(String),
    /// No access token: re-enrolment needed, the account is backed off,
    /// or the token service is unavailable.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The IMAP server refused a freshly issued token too (after refusing
    /// the first one); the account is backed off.
    #[error("the IMAP server refused a freshly issued access token too (check the account name and the provider's scopes): {0}")]
    TokenRefused(UpstreamError),
    /// The IMAP server throttles the account; the account is backed off.
    #[error("the IMAP server throttles the account: {0}")]
    Throttled(UpstreamError),
    /// Any other upstream failure (connection, refused login, SELECT...),
    /// handled as for a password login.
    #[error(transparent)]
    Upstream(UpstreamError),
}

/// Logs in to `connector`'s IMAP server as `account` with its access token
/// at `provider`, with the one-retry rule (see the module docs), and
/// returns the session with the mailbox selected. `hide_keyword` and
/// `client` are passed to [`Connector::login`].
pub async fn bearer_login<C: Connector>(
    oauth: &OauthRuntime,
    connector: &C,
    provider: &str,
    account: &str,
    hide_keyword: Option<&str>,
    client: Option<SocketAddr>,
) -> Result<(C::Conn, Snapshot), BearerLoginError> {
    let Some(sasl) = oauth.sasl(provider) else {
        return Err(BearerLoginError::UnknownProvider(provider.to_string()));
    };
    let mut attempt = BearerAttempt::First;
    loop {
        let token = oauth.access_token(provider, account).await?;
        let credentials = Credentials::Bearer {
            account,
            token: &token,
            sasl,
        };
        let result = connector.login(credentials, hide_keyword, client).await;
        match (bearer_step(attempt, &result), result) {
            (BearerStep::Proceed, result) | (_, result @ Ok(_)) => {
                return result.map_err(BearerLoginError::Upstream)
            }
            (BearerStep::RetryWithFreshToken, Err(e)) => {
                oauth.token_rejected(provider, account, &token);
                info!(account, error = %e, "mail server refused the access token; retrying with a fresh one");
                attempt = BearerAttempt::Retry;
            }
            (BearerStep::GiveUp, Err(e)) => {
                oauth.token_rejected(provider, account, &token);
                // Back off the account as for throttling: without it
                // every poll of every device would cost a refresh while
                // the mail server refuses the account's tokens.
                oauth.back_off(provider, account, BackoffCause::TokenRefused);
                warn!(account, provider, error = %e, "mail server refused a freshly issued access token too; backing off (check the account name and the provider's scopes)");
                return Err(BearerLoginError::TokenRefused(e));
            }
            (BearerStep::Throttled, Err(e)) => {
                oauth.back_off(provider, account, BackoffCause::MailServerThrottled);
                warn!(account, provider, error = %e, "mail server throttles the account; backing off");
                return Err(BearerLoginError::Throttled(e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected() -> Result<(), UpstreamError> {
        Err(UpstreamError::TokenRejected {
            status: Some("invalid_token".into()),
            text: "[AUTHENTICATIONFAILED] Authentication failed.".into(),
        })
    }

    #[test]
    fn a_refused_token_is_retried_once_only() {
        assert_eq!(
            bearer_step(BearerAttempt::First, &rejected()),
            BearerStep::RetryWithFreshToken
        );
        assert_eq!(
            bearer_step(BearerAttempt::Retry, &rejected()),
            BearerStep::GiveUp
        );
    }

    #[test]
    fn throttling_is_never_retried() {
        for attempt in [BearerAttempt::First, BearerAttempt::Retry] {
            let r: Result<(), _> = Err(UpstreamError::Throttled("[THROTTLED]".into()));
            assert_eq!(bearer_step(attempt, &r), BearerStep::Throttled);
        }
    }

    #[test]
    fn success_and_other_errors_proceed_as_for_any_login() {
        assert_eq!(
            bearer_step(BearerAttempt::First, &Ok::<(), UpstreamError>(())),
            BearerStep::Proceed
        );
        for e in [
            UpstreamError::AuthFailed("BAD".into()),
            UpstreamError::ConnectionLost,
            UpstreamError::Unsupported("no AUTH=XOAUTH2".into()),
            UpstreamError::No {
                command: "SELECT",
                text: "no mailbox".into(),
            },
        ] {
            assert_eq!(
                bearer_step::<()>(BearerAttempt::First, &Err(e)),
                BearerStep::Proceed
            );
        }
    }
}
