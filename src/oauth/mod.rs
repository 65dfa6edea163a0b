//! OAuth2 upstreams (issue 8): providers, the encrypted token store, device
//! credentials and the `popbridge oauth` / `popbridge device` commands.
//!
//! The rest of popbridge sees only [`OauthRuntime`]: it checks a device's
//! login locally and hands out access tokens for the account behind it.
//! Everything else (providers, HTTP, stores, enrolment) lives in submodules.
//!
//! INTERFACE CONTRACT (kept stable for the integration work on another
//! branch): the items in this file, `config::OauthConfig` and the
//! `SaslMechanism`/`ProviderSasl` types. Bodies are stubs until filled in.

use std::net::IpAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use crate::config::Config;
use crate::pop3::command::Secret;

pub mod config;

/// `popbridge oauth ...`
#[derive(Debug, Clone, clap::Args)]
pub struct OauthArgs {}

/// `popbridge device ...`
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {}

/// Run `popbridge oauth`; `config` is the loaded configuration file, if any.
pub fn run_oauth(_args: OauthArgs, _config: Option<Config>) -> ExitCode {
    eprintln!("popbridge oauth: not implemented yet");
    ExitCode::from(2)
}

/// Run `popbridge device`; `config` is the loaded configuration file, if any.
pub fn run_device(_args: DeviceArgs, _config: Option<Config>) -> ExitCode {
    eprintln!("popbridge device: not implemented yet");
    ExitCode::from(2)
}

/// The SASL mechanism a provider expects for IMAP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    /// Google's and Microsoft's `XOAUTH2`.
    XOauth2,
    /// RFC 7628 `OAUTHBEARER`.
    OauthBearer,
}

/// How to present a token to a provider's IMAP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProviderSasl {
    pub mechanism: SaslMechanism,
    /// Send the initial response after a `+` continuation instead of with
    /// the command (SASL-IR, RFC 4959). Microsoft's documented exchange.
    pub two_step: bool,
}

/// A bearer token, never printed.
#[derive(Clone)]
pub struct AccessToken {
    token: Arc<str>,
    /// When popbridge stops using it (shortly before the provider's expiry).
    pub expires_at: Instant,
}

impl AccessToken {
    pub fn new(token: impl Into<Arc<str>>, expires_at: Instant) -> Self {
        Self {
            token: token.into(),
            expires_at,
        }
    }

    /// The token itself, for the SASL exchange only.
    pub fn expose(&self) -> &str {
        &self.token
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken(***)")
    }
}

/// A device login that passed: which account it acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceGrant {
    /// The upstream account (the IMAP user name the token is for).
    pub account: String,
    /// The device's login name, for logs.
    pub device: String,
}

/// Why a device login failed. Every variant counts as a failed login for
/// throttling; none of them contacts the provider.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceAuthError {
    #[error("unknown device")]
    UnknownDevice,
    #[error("wrong device password")]
    BadPassword,
    #[error("device not allowed from this address")]
    AddressNotAllowed,
    #[error("device store: {0}")]
    Store(String),
}

/// Why no access token could be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No refresh token, or the provider answered `invalid_grant`: an
    /// operator must run `popbridge oauth add <account>` again.
    #[error("account {account} needs re-enrolment: {reason}")]
    NeedsEnrolment { account: String, reason: String },
    /// The provider throttles us; try again later.
    #[error("provider throttling, retry in {retry_after_secs} s")]
    Throttled { retry_after_secs: u64 },
    /// Network, provider or store failure.
    #[error("token service unavailable: {0}")]
    Unavailable(String),
}

/// What the server needs from the OAuth2 machinery, built from the
/// configuration at start-up and on reload.
pub struct OauthRuntime {}

impl std::fmt::Debug for OauthRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OauthRuntime").finish_non_exhaustive()
    }
}

impl OauthRuntime {
    /// `None` when no route uses `auth = "oauth2"`. Errors are startup
    /// errors (missing key, unreadable store, unknown provider).
    pub fn from_config(_config: &Config) -> Result<Option<Arc<OauthRuntime>>, String> {
        Ok(None)
    }

    /// How the provider of `provider` (an `[[oauth.providers]]` name) wants
    /// tokens presented over IMAP.
    pub fn sasl(&self, _provider: &str) -> Option<ProviderSasl> {
        None
    }

    /// Checks a device login against the local device store. Never contacts
    /// the provider.
    pub async fn authenticate_device(
        &self,
        _login: &str,
        _password: &Secret,
        _peer: IpAddr,
    ) -> Result<DeviceGrant, DeviceAuthError> {
        Err(DeviceAuthError::Store("not implemented".into()))
    }

    /// An access token for `account` at `provider`: from the cache, or
    /// refreshed (one refresh in flight per account, however many devices
    /// ask at once).
    pub async fn access_token(
        &self,
        _provider: &str,
        _account: &str,
    ) -> Result<AccessToken, TokenError> {
        Err(TokenError::Unavailable("not implemented".into()))
    }

    /// The IMAP server refused `token`: forget it so the next
    /// [`OauthRuntime::access_token`] refreshes.
    pub fn token_rejected(&self, _provider: &str, _account: &str, _token: &AccessToken) {}

    /// The IMAP server said it throttles this account (e.g. Gmail's
    /// `[THROTTLED]`): back off before the next attempt.
    pub fn upstream_throttled(&self, _provider: &str, _account: &str) {}
}
