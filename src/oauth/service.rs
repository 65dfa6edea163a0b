//! The token service behind [`super::OauthRuntime`]: access tokens cached
//! until shortly before expiry, one refresh in flight per account (in this
//! process by the cache, across replicas by the store's refresh lock),
//! rotation stored before use, `invalid_grant` turned into re-enrolment,
//! and a per-account backoff while the provider or the IMAP server
//! throttles, or the IMAP server refuses fresh tokens.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::device;
use super::provider::{ProviderClient, ProviderError};
use super::store::{now_unix, now_unix_ms, AccountRecord, AccountStatus, StoreError, TokenStore};
use super::{BackoffCause, DeviceAuthError, DeviceGrant, TokenError};
use crate::config::oauth::Provider;
use crate::imap::AccessToken;
use crate::metrics::metrics;
use crate::pop3::command::Secret;

/// First backoff after a throttling signal.
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Longest backoff (and longest `Retry-After` honoured).
pub const BACKOFF_CAP: Duration = Duration::from_secs(300);
/// Access tokens cached at most (accounts × a few hundred bytes).
const MAX_CACHED_TOKENS: u64 = 100_000;
/// How long a token the IMAP server refused stays on the refused list.
const REJECTED_TTL: Duration = Duration::from_secs(2 * 3600);

/// Cache key: provider and account.
fn cache_key(provider: &str, account: &str) -> String {
    format!("{provider}\0{account}")
}

/// Per-entry expiry: each token leaves the cache when popbridge stops
/// using it.
struct TokenExpiry;

impl moka::Expiry<String, AccessToken> for TokenExpiry {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &AccessToken,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(created_at))
    }
}

/// The margin actually applied to a token living `lifetime`: the
/// configured one, but at most half the lifetime (a provider issuing
/// short-lived tokens must not make every token instantly stale).
pub fn effective_margin(configured: Duration, lifetime: Duration) -> Duration {
    configured.min(lifetime / 2)
}

/// When popbridge stops using a token that expires (per the provider) at
/// Unix second `expires_at_unix`, seen at `now_unix`/`now`. `None`: already
/// too late to use it. `lifetime` is what the provider granted.
pub fn usable_until(
    now: Instant,
    now_unix: u64,
    expires_at_unix: u64,
    lifetime: Duration,
    margin: Duration,
) -> Option<Instant> {
    let left = Duration::from_secs(expires_at_unix.checked_sub(now_unix)?);
    let usable = left.checked_sub(effective_margin(margin, lifetime))?;
    (!usable.is_zero()).then(|| now + usable)
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: Instant,
    failures: u32,
    /// What started it, for logs and the device's answer.
    cause: BackoffCause,
    /// The account record's `backoff_reset` when it started (`None`: not
    /// read yet). A different stored value means an enrolment or a
    /// successful `oauth test` since: the back-off is lifted.
    reset_seen: Option<u64>,
}

/// Backoff after `failures` consecutive signals (throttling or refused
/// tokens): doubling from
/// [`BACKOFF_BASE`], capped at [`BACKOFF_CAP`], at least what the provider
/// asked for (capped too).
pub fn backoff_delay(failures: u32, retry_after: Option<Duration>) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    exp.max(retry_after.unwrap_or_default()).min(BACKOFF_CAP)
}

/// Access tokens and device checks.
pub struct TokenService {
    pub store: Arc<TokenStore>,
    providers: HashMap<String, Provider>,
    client: ProviderClient,
    cache: moka::future::Cache<String, AccessToken>,
    margin: Duration,
    backoff: Mutex<HashMap<String, Backoff>>,
    /// The `backoff_reset` of each account's record as last read, for the
    /// next back-off to remember.
    reset_seen: Mutex<HashMap<String, u64>>,
    /// SHA-256 of tokens the IMAP server refused.
    rejected: moka::sync::Cache<[u8; 32], ()>,
    /// Ignore stored access tokens obtained before this (Unix ms):
    /// `oauth test --force-refresh`.
    fresh_since_ms: Option<u64>,
}

fn token_hash(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
    out
}

impl TokenService {
    pub fn new(
        store: Arc<TokenStore>,
        providers: Vec<Provider>,
        margin: Duration,
    ) -> Result<Self, String> {
        Ok(Self {
            store,
            providers: providers.into_iter().map(|p| (p.name.clone(), p)).collect(),
            client: ProviderClient::new()?,
            cache: moka::future::Cache::builder()
                .max_capacity(MAX_CACHED_TOKENS)
                .expire_after(TokenExpiry)
                .build(),
            margin,
            backoff: Mutex::new(HashMap::new()),
            reset_seen: Mutex::new(HashMap::new()),
            rejected: moka::sync::Cache::builder()
                .max_capacity(MAX_CACHED_TOKENS)
                .time_to_live(REJECTED_TTL)
                .build(),
            fresh_since_ms: None,
        })
    }

    /// Stored access tokens obtained before `ms` (Unix milliseconds) are
    /// not used: a refresh happens unless another process refreshed since.
    pub fn with_fresh_since(mut self, ms: u64) -> Self {
        self.fresh_since_ms = Some(ms);
        self
    }

    pub fn provider(&self, name: &str) -> Option<&Provider> {
        self.providers.get(name)
    }

    pub fn client(&self) -> &ProviderClient {
        &self.client
    }

    /// Remaining backoff for an account, if any.
    fn backing_off(&self, key: &str) -> Option<(Duration, Backoff)> {
        let map = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        let b = map.get(key)?;
        let left = b.until.checked_duration_since(Instant::now())?;
        (!left.is_zero()).then_some((left, *b))
    }

    /// While an account is backed off: whether its record says that an
    /// operator fixed it since (a new enrolment, a successful `oauth
    /// test`, possibly on another host), read from the shared store. A
    /// store that cannot be read keeps the back-off.
    async fn reset_since(&self, account: &str, b: &Backoff) -> bool {
        let Some(seen) = b.reset_seen else {
            return false;
        };
        match self.store.get(account).await {
            Ok(Some(rec)) => rec.meta.backoff_reset != seen,
            Ok(None) => false,
            Err(e) => {
                tracing::debug!(account, error = %e, "cannot read the account while backing off");
                false
            }
        }
    }

    fn remember_reset(&self, key: &str, rec: &AccountRecord) {
        let mut map = self.reset_seen.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(key.to_string(), rec.meta.backoff_reset);
    }

    /// Backs the account off after a signal of `cause`; returns the delay
    /// now in force.
    pub fn back_off(
        &self,
        provider: &str,
        account: &str,
        cause: BackoffCause,
        retry_after: Option<Duration>,
    ) -> Duration {
        let key = cache_key(provider, account);
        let mut map = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        // A signal long after the last backoff ended starts over: the
        // doubling is for bursts, not for a whole day's worth of signals.
        let now = Instant::now();
        let failures = map
            .get(&key)
            .filter(|b| now < b.until + BACKOFF_CAP)
            .map_or(0, |b| b.failures)
            .saturating_add(1);
        let delay = backoff_delay(failures, retry_after);
        let reset_seen = self
            .reset_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .copied();
        map.insert(
            key,
            Backoff {
                until: now + delay,
                failures,
                cause,
                reset_seen,
            },
        );
        warn!(
            provider,
            account,
            failures,
            backoff_secs = delay.as_secs(),
            "backing off the account: {cause}"
        );
        delay
    }

    fn clear_backoff(&self, provider: &str, account: &str) {
        let mut map = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&cache_key(provider, account));
    }

    pub fn reject(&self, provider: &str, account: &str, token: &AccessToken) {
        self.rejected.insert(token_hash(token.expose()), ());
        info!(
            provider,
            account, "the IMAP server refused an access token; it will be refreshed"
        );
    }

    fn is_rejected(&self, token: &str) -> bool {
        self.rejected.contains_key(&token_hash(token))
    }

    /// See [`super::OauthRuntime::access_token`].
    pub async fn access_token(
        &self,
        provider: &str,
        account: &str,
    ) -> Result<AccessToken, TokenError> {
        let key = cache_key(provider, account);
        if let Some((left, b)) = self.backing_off(&key) {
            if !self.reset_since(account, &b).await {
                return Err(TokenError::BackingOff {
                    cause: b.cause,
                    retry_after_secs: left.as_secs().max(1),
                });
            }
            info!(
                provider,
                account,
                cause = %b.cause,
                "account enrolled again or tested successfully since it was backed off: back-off lifted"
            );
            self.clear_backoff(provider, account);
            // A token cached before the fix may be the old enrolment's.
            self.cache.invalidate(&key).await;
        }
        // A cached token that the IMAP server did not refuse: a hit.
        if let Some(token) = self.cache.get(&key).await {
            if !self.is_rejected(token.expose()) {
                metrics().oauth_cache_hit(provider);
                return Ok(token);
            }
        }
        for _ in 0..2 {
            let token = self
                .cache
                .try_get_with(key.clone(), self.obtain(provider, account))
                .await
                .map_err(|e: Arc<TokenError>| (*e).clone())?;
            if !self.is_rejected(token.expose()) {
                return Ok(token);
            }
            // The IMAP server refused this one: drop it and refresh.
            self.cache.invalidate(&key).await;
        }
        Err(TokenError::Unavailable(
            "the provider keeps issuing tokens the IMAP server refuses".into(),
        ))
    }

    /// Cache miss: take the refresh lock, then use the stored access token
    /// if another replica refreshed meanwhile, else refresh.
    async fn obtain(&self, provider: &str, account: &str) -> Result<AccessToken, TokenError> {
        let p = self.providers.get(provider).ok_or_else(|| {
            TokenError::Unavailable(format!("provider {provider:?} is not configured"))
        })?;
        let lock = self.store.lock(account).await.map_err(store_err)?;
        let out = self.obtain_locked(p, account).await;
        self.store.unlock(lock).await;
        out
    }

    async fn obtain_locked(&self, p: &Provider, account: &str) -> Result<AccessToken, TokenError> {
        let provider = p.name.as_str();
        let mut rec = self
            .store
            .get(account)
            .await
            .map_err(store_err)?
            .ok_or_else(|| TokenError::NeedsEnrolment {
                account: account.into(),
                reason: format!(
                    "not enrolled: run `popbridge oauth add {account} --provider {provider}`"
                ),
            })?;
        self.remember_reset(&cache_key(provider, account), &rec);
        if rec.meta.provider != provider {
            return Err(TokenError::NeedsEnrolment {
                account: account.into(),
                reason: format!(
                    "enrolled with provider {:?} but its route uses {provider:?}: run `popbridge oauth add {account} --provider {provider}`",
                    rec.meta.provider
                ),
            });
        }
        if let AccountStatus::NeedsReenrolment { reason, .. } = &rec.meta.status {
            return Err(TokenError::NeedsEnrolment {
                account: account.into(),
                reason: format!(
                    "{reason}; run `popbridge oauth add {account} --provider {provider}`"
                ),
            });
        }
        if let Some(t) = self.stored_token(&rec) {
            return Ok(t);
        }
        let secret = p
            .client_secret
            .read()
            .map_err(|e| TokenError::Unavailable(format!("client secret: {e}")))?;
        let started = Instant::now();
        let answer = self
            .client
            .refresh(p, secret.as_deref(), &rec.secrets.refresh_token)
            .await;
        metrics().oauth_refresh(
            provider,
            match &answer {
                Ok(_) => "ok",
                Err(ProviderError::InvalidGrant(_)) => "invalid_grant",
                Err(ProviderError::Throttled { .. } | ProviderError::SlowDown) => "throttled",
                Err(_) => "error",
            },
        );
        match answer {
            Ok(t) => {
                self.clear_backoff(provider, account);
                let lifetime = t.lifetime();
                let rotated = t.refresh_token.is_some();
                let expected = rec.meta.version;
                if let Some(rt) = t.refresh_token {
                    rec.secrets.refresh_token = rt;
                }
                rec.secrets.access_token = Some(t.access_token.clone());
                rec.secrets.access_expires_at = Some(now_unix() + lifetime);
                rec.secrets.access_issued_at_ms = Some(now_unix_ms());
                // Store first (a rotated refresh token is the only copy),
                // then hand out the access token.
                let stored = self
                    .store
                    .compare_and_set(&mut rec, expected)
                    .await
                    .map_err(store_err)?;
                if !stored {
                    // Someone wrote meanwhile (our lock expired): their
                    // record is newer; never overwrite it.
                    warn!(
                        provider,
                        account, "token record changed during refresh; using the stored one"
                    );
                    let newer = self.store.get(account).await.map_err(store_err)?;
                    return newer
                        .as_ref()
                        .and_then(|r| self.stored_token(r))
                        .ok_or_else(|| {
                            TokenError::Unavailable("concurrent token update; retry".into())
                        });
                }
                info!(
                    provider,
                    account,
                    rotated,
                    expires_in = lifetime,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "access token refreshed"
                );
                let until = usable_until(
                    Instant::now(),
                    now_unix(),
                    now_unix() + lifetime,
                    Duration::from_secs(lifetime),
                    self.margin,
                )
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
                Ok(AccessToken::new(t.access_token, until))
            }
            Err(ProviderError::InvalidGrant(detail)) => {
                let reason = format!("the provider refused the refresh token: {detail}");
                error!(
                    provider,
                    account,
                    reason = %detail,
                    fix = %format!("popbridge oauth add {account} --provider {provider}"),
                    "refresh token refused (invalid_grant): the account needs re-enrolment; its devices get -ERR [AUTH] until then"
                );
                metrics().oauth_reenrolment_needed(provider);
                let expected = rec.meta.version;
                rec.meta.status = AccountStatus::NeedsReenrolment {
                    reason: reason.clone(),
                    since: now_unix(),
                };
                rec.secrets.access_token = None;
                rec.secrets.access_expires_at = None;
                rec.secrets.access_issued_at_ms = None;
                if let Err(e) = self.store.compare_and_set(&mut rec, expected).await {
                    warn!(account, error = %e, "could not record the re-enrolment state");
                }
                Err(TokenError::NeedsEnrolment {
                    account: account.into(),
                    reason: format!(
                        "{reason}; run `popbridge oauth add {account} --provider {provider}`"
                    ),
                })
            }
            Err(ProviderError::Throttled { retry_after, .. }) => {
                let cause = BackoffCause::ProviderThrottled;
                let d = self.back_off(provider, account, cause, retry_after);
                Err(TokenError::BackingOff {
                    cause,
                    retry_after_secs: d.as_secs().max(1),
                })
            }
            Err(ProviderError::SlowDown) => {
                let cause = BackoffCause::ProviderThrottled;
                let d = self.back_off(provider, account, cause, None);
                Err(TokenError::BackingOff {
                    cause,
                    retry_after_secs: d.as_secs().max(1),
                })
            }
            Err(e) => {
                warn!(provider, account, error = %e, "token refresh failed");
                Err(TokenError::Unavailable(e.to_string()))
            }
        }
    }

    /// The access token kept in the store, if still usable and not
    /// refused by the IMAP server.
    fn stored_token(&self, rec: &AccountRecord) -> Option<AccessToken> {
        let token = rec.secrets.access_token.as_ref()?;
        let exp = rec.secrets.access_expires_at?;
        if self.is_rejected(token) {
            return None;
        }
        if let Some(since) = self.fresh_since_ms {
            if rec.secrets.access_issued_at_ms.unwrap_or(0) < since {
                return None;
            }
        }
        // The original lifetime is unknown here; assume the provider's
        // usual hour unless less is left, which keeps the margin rule.
        let now = now_unix();
        let lifetime = Duration::from_secs(exp.saturating_sub(rec.meta.updated.min(now)).max(1));
        let until = usable_until(Instant::now(), now, exp, lifetime, self.margin)?;
        Some(AccessToken::new(token.clone(), until))
    }

    /// See [`super::OauthRuntime::authenticate_device`].
    pub async fn authenticate_device(
        &self,
        login: &str,
        password: &Secret,
        peer: IpAddr,
    ) -> Result<DeviceGrant, DeviceAuthError> {
        let pw = password.expose().to_vec();
        let rec = match self.store.device(login).await {
            Ok(rec) => rec,
            Err(StoreError::UntrustedDevice { login, problem }) => {
                metrics().oauth_device_record_refused(problem.kind());
                let e = StoreError::UntrustedDevice { login, problem };
                error!(device = %e, "device record refused");
                // The same work as any check, and a failed login.
                let _ = device::check(pw, None).await;
                return Err(DeviceAuthError::UntrustedRecord);
            }
            Err(e) => return Err(DeviceAuthError::Store(e.to_string())),
        };
        let Some(rec) = rec else {
            // Same work as a real check: no timing oracle for names.
            let _ = device::check(pw, None).await;
            return Err(DeviceAuthError::UnknownDevice);
        };
        // Bounded: at most device::MAX_CONCURRENT_CHECKS argon2 runs at once.
        let ok = device::check(pw, Some(rec.hash.clone()))
            .await
            .map_err(DeviceAuthError::Store)?;
        if !ok {
            return Err(DeviceAuthError::BadPassword);
        }
        if !device::address_allowed(&rec.allow, peer) {
            return Err(DeviceAuthError::AddressNotAllowed);
        }
        Ok(DeviceGrant {
            account: rec.account,
            device: rec.login,
        })
    }
}

fn store_err(e: StoreError) -> TokenError {
    TokenError::Unavailable(format!("token store: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margin_is_at_most_half_the_lifetime() {
        let m = Duration::from_secs(300);
        assert_eq!(effective_margin(m, Duration::from_secs(3600)), m);
        assert_eq!(
            effective_margin(m, Duration::from_secs(60)),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn usable_until_arithmetic() {
        let now = Instant::now();
        let m = Duration::from_secs(300);
        let h = Duration::from_secs(3600);
        let u = usable_until(now, 1000, 4600, h, m).unwrap();
        assert_eq!(u - now, Duration::from_secs(3300));
        assert!(
            usable_until(now, 1000, 1200, h, m).is_none(),
            "inside the margin"
        );
        assert!(usable_until(now, 5000, 4600, h, m).is_none(), "expired");
        let short = usable_until(now, 1000, 1060, Duration::from_secs(60), m).unwrap();
        assert_eq!(short - now, Duration::from_secs(30));
    }

    #[tokio::test]
    async fn upstream_throttling_backs_off_without_touching_the_provider() {
        let dir = tempfile::tempdir().unwrap();
        let key = super::super::crypto::StoreKey::new(&crate::config::oauth::KeyMaterial([1; 32]));
        let store = Arc::new(TokenStore::open_file(dir.path().into(), key).unwrap());
        // No provider is configured: any attempt to refresh would fail
        // with Unavailable, so Throttled proves nothing was attempted.
        let svc = TokenService::new(store, Vec::new(), Duration::from_secs(300)).unwrap();
        let throttled = BackoffCause::MailServerThrottled;
        assert_eq!(svc.back_off("p", "a", throttled, None), BACKOFF_BASE);
        assert_eq!(svc.back_off("p", "a", throttled, None), BACKOFF_BASE * 2);
        match svc.access_token("p", "a").await {
            Err(TokenError::BackingOff {
                cause,
                retry_after_secs,
            }) => {
                assert!((1..=10).contains(&retry_after_secs), "{retry_after_secs}");
                assert_eq!(cause, throttled);
            }
            other => panic!("{other:?}"),
        }
        // A refused token is reported as such, never as throttling.
        svc.back_off("p", "c", BackoffCause::TokenRefused, None);
        let e = svc.access_token("p", "c").await.unwrap_err();
        assert!(
            matches!(
                e,
                TokenError::BackingOff {
                    cause: BackoffCause::TokenRefused,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .contains("refused a freshly issued access token"),
            "{e}"
        );
        assert!(!e.to_string().contains("throttl"), "{e}");
        // Other accounts are not affected.
        assert!(matches!(
            svc.access_token("p", "b").await,
            Err(TokenError::Unavailable(_))
        ));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff_delay(1, None), BACKOFF_BASE);
        assert_eq!(backoff_delay(2, None), BACKOFF_BASE * 2);
        assert_eq!(backoff_delay(3, None), BACKOFF_BASE * 4);
        assert_eq!(backoff_delay(40, None), BACKOFF_CAP);
        assert_eq!(
            backoff_delay(1, Some(Duration::from_secs(60))),
            Duration::from_secs(60)
        );
        assert_eq!(
            backoff_delay(1, Some(Duration::from_secs(99_999))),
            BACKOFF_CAP
        );
    }
}
