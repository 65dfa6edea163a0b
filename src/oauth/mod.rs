//! OAuth2 upstreams: providers, the encrypted token store and device
//! credentials. (`[oauth]` is `crate::config::oauth`; the `popbridge oauth`
//! and `popbridge device` commands are in `cli`.)
//!
//! The proxy sees only [`OauthRuntime`]: it checks a device's login locally
//! and hands out access tokens for the account behind it, through
//! [`login::bearer_login`]. Everything else (providers, HTTP, stores,
//! enrolment) lives in submodules.
//!
//! # Layout
//! - [`crypto`]: sealing secrets at rest (XChaCha20-Poly1305, key id).
//! - [`store`]: account and device records, the file backend;
//!   [`redis_store`]: the Redis backend for several replicas.
//! - [`provider`]: HTTP calls to token, device, revocation endpoints.
//! - [`service`]: access-token cache, single-flight refresh, rotation,
//!   re-enrolment state, throttling backoff, device checks.
//! - [`login`]: the IMAP login with an access token and its one-retry
//!   rule, shared by the server, `oauth test` and `migrate`.
//! - [`device`]: argon2id device passwords.

use std::net::IpAddr;
use std::sync::Arc;

use crate::config::{Config, ProviderSasl};
use crate::imap::AccessToken;
use crate::pop3::command::Secret;

pub mod crypto;
pub mod device;
pub mod login;
pub mod provider;
pub mod redis_store;
pub mod service;
pub mod store;

use crate::config::oauth::{check_redis_url, OauthConfig, StoreKind};
use crate::config::UpstreamAuth;
use crypto::StoreKey;
use service::TokenService;
use store::TokenStore;

/// Opens the configured store (file or Redis) with the configured key.
/// Errors are startup errors and name files and keys, never secrets.
pub fn open_store(config: &Config) -> Result<TokenStore, String> {
    let oauth: &OauthConfig = &config.oauth;
    let key = StoreKey::new(&oauth.load_key()?);
    match oauth.store {
        StoreKind::File => {
            let dir = OauthConfig::store_dir(&config.data.dir).ok_or(
                "oauth.store = \"file\" needs data.dir (tokens are kept under <data.dir>/oauth/)",
            )?;
            TokenStore::open_file(dir, key).map_err(|e| e.to_string())
        }
        StoreKind::Redis => {
            // oauth.redis_url when set (it was the only key before
            // [cluster]), else the cluster's Redis.
            let endpoint = match oauth.redis_endpoint(&config.cluster) {
                Some(e) => e,
                None => return Err(check_redis_url("").err().unwrap_or_default()),
            };
            if endpoint.section == "oauth" {
                check_redis_url(&endpoint.url)?;
            }
            TokenStore::open_redis(&endpoint, key).map_err(|e| e.to_string())
        }
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
    /// The device's record is not sealed with the store key, or its seal
    /// does not match it (forged or altered in the store): refused like a
    /// wrong password, logged and counted.
    #[error("device record refused (not sealed, or altered in the store)")]
    UntrustedRecord,
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
    /// The account is backed off (see [`BackoffCause`]); try again later.
    /// Neither the provider nor the IMAP server was asked.
    #[error("account backed off for {retry_after_secs} s: {cause}")]
    BackingOff {
        cause: BackoffCause,
        retry_after_secs: u64,
    },
    /// Network, provider or store failure.
    #[error("token service unavailable: {0}")]
    Unavailable(String),
}

/// Why an account is backed off: no token request and no IMAP login for it
/// until the back-off ends. Logs and the device's answer name the cause, so
/// a mail server refusing tokens is never reported as provider throttling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackoffCause {
    /// The provider's token endpoint throttles (HTTP 429 or 503,
    /// `slow_down`).
    ProviderThrottled,
    /// The IMAP server throttles the account (Gmail's `[THROTTLED]`,
    /// `[UNAVAILABLE]`, connection limits).
    MailServerThrottled,
    /// The IMAP server refused a freshly issued access token too: usually
    /// an enrolment under another identity, or wrong scopes.
    TokenRefused,
}

impl std::fmt::Display for BackoffCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackoffCause::ProviderThrottled => "the OAuth2 provider throttles token requests",
            BackoffCause::MailServerThrottled => "the mail server throttles the account",
            BackoffCause::TokenRefused => "the mail server refused a freshly issued access token",
        })
    }
}

/// What the server needs from the OAuth2 machinery, built from the
/// configuration at start-up and on reload.
pub struct OauthRuntime {
    service: TokenService,
}

impl std::fmt::Debug for OauthRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OauthRuntime").finish_non_exhaustive()
    }
}

impl OauthRuntime {
    /// `None` when no route uses `auth = "oauth2"`. Errors are startup
    /// errors (missing key, unreadable store, unknown provider, a store
    /// written with another key). Does a little blocking I/O (reading the
    /// store files, or one Redis round trip with a 5 s timeout); an
    /// unreachable Redis is logged and retried at first use.
    pub fn from_config(config: &Config) -> Result<Option<Arc<OauthRuntime>>, String> {
        let routes = config.effective_routes().map_err(|e| e.to_string())?;
        if !routes
            .iter()
            .any(|r| r.upstream.auth == UpstreamAuth::Oauth2)
        {
            return Ok(None);
        }
        config
            .oauth
            .validate(&routes, &config.data.dir, &config.cluster)
            .map_err(|e| e.to_string())?;
        let providers = config
            .oauth
            .resolved_providers()
            .map_err(|e| e.to_string())?;
        let store = open_store(config)?;
        // A wrong key is a start-up error for Redis too; an unreachable
        // Redis is retried at first use.
        if let Some(unreachable) = store.check_blocking().map_err(|e| e.to_string())? {
            tracing::warn!(error = %unreachable, "token store not reachable at start-up; retrying at first use");
        }
        let store = Arc::new(store);
        let margin = std::time::Duration::from_secs(config.oauth.refresh_margin_secs);
        let service = TokenService::new(store, providers, margin)?;
        Ok(Some(Arc::new(OauthRuntime { service })))
    }

    /// A runtime around an already built token service (the `oauth test`
    /// command builds its own, with `--force-refresh`).
    pub(crate) fn from_service(service: TokenService) -> Arc<OauthRuntime> {
        Arc::new(OauthRuntime { service })
    }

    /// How the provider of `provider` (an `[[oauth.providers]]` name) wants
    /// tokens presented over IMAP.
    pub fn sasl(&self, provider: &str) -> Option<ProviderSasl> {
        self.service.provider(provider).map(|p| p.sasl)
    }

    /// Checks a device login against the local device store. Never contacts
    /// the provider.
    pub async fn authenticate_device(
        &self,
        login: &str,
        password: &Secret,
        peer: IpAddr,
    ) -> Result<DeviceGrant, DeviceAuthError> {
        self.service
            .authenticate_device(login, password, peer)
            .await
    }

    /// An access token for `account` at `provider`: from the cache, or
    /// refreshed (one refresh in flight per account, however many devices
    /// ask at once).
    pub async fn access_token(
        &self,
        provider: &str,
        account: &str,
    ) -> Result<AccessToken, TokenError> {
        self.service.access_token(provider, account).await
    }

    /// The IMAP server refused `token`: forget it so the next
    /// [`OauthRuntime::access_token`] refreshes.
    pub fn token_rejected(&self, provider: &str, account: &str, token: &AccessToken) {
        self.service.reject(provider, account, token);
    }

    /// The IMAP server throttles this account (e.g. Gmail's
    /// `[THROTTLED]`) or refused a fresh token: back off before the next
    /// attempt.
    pub fn back_off(&self, provider: &str, account: &str, cause: BackoffCause) {
        self.service.back_off(provider, account, cause, None);
    }
}
