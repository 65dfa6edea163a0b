//! The login decision, from a POP3 user name and password to a logged-in
//! session or a refusal: throttling, the route, the session view of the
//! delete policy, the IMAP login (password passthrough or an OAuth2 device
//! and token), the session lock, and the UIDLs (X-UIDL > imported map >
//! template, as Dovecot does).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tracing::{debug, error, info, warn};

use super::lock::MailboxLock;
use super::policy::{device_keyword, session_view, valid_device, SessionView};
use super::pool::{Credential, Pool, PoolKey, Reuse};
use super::replies::{self, Refusal};
use super::routing::{Resolved, Route, RouteAuth, Router, UidlMapSource};
use super::shared_throttle::{Attempt, Throttle};
use super::throttle::{AccountKey, Throttled};
use crate::config::{DeletePolicy, Policy};
use crate::imap::{Connector, Credentials, DeleteAction, Snapshot, Upstream, UpstreamError};
use crate::metrics::metrics;
use crate::migrate::runtime::Lookup as MapLookup;
use crate::migrate::store::MapKey;
use crate::oauth::login::{bearer_login, BearerLoginError};
use crate::oauth::{DeviceAuthError, DeviceGrant, OauthRuntime};
use crate::pop3::command::Secret;
use crate::pop3::maildrop::Maildrop;
use crate::pop3::session::{LoginFailure, Profile};

/// What every login consults: the routes, the failed-login memory and the
/// OAuth2 machinery (when a route uses it).
pub struct Bridge<C: Connector> {
    /// Which upstream serves which login.
    pub router: Router<C>,
    /// Failed-login memory: per process, or shared through Redis (then
    /// the session lock takes a lease there too).
    pub throttle: Throttle,
    /// Device logins and access tokens, when a route uses `auth = "oauth2"`.
    pub oauth: Option<Arc<OauthRuntime>>,
    /// Upstream sessions kept from ended POP3 sessions, for reuse.
    pub pool: Arc<Pool<C::Conn>>,
}

/// What a logged-in session holds besides its maildrop; these only make
/// sense together, and exist only after a successful login.
pub struct LoggedIn<U: Upstream> {
    /// The IMAP session, with the mailbox selected.
    pub upstream: U,
    /// What QUIT does with DELE'd messages (the route's delete policy).
    pub delete_action: DeleteAction,
    /// The session lock, when the route asks for one; released on drop.
    pub lock: Option<MailboxLock>,
    /// Where the upstream session goes when the POP3 session ends.
    keep: Option<Keep<U>>,
}

/// How an upstream session returns to the pool.
struct Keep<U: Upstream> {
    pool: Arc<Pool<U>>,
    key: PoolKey,
    tag: ring::hmac::Tag,
    reuse: Reuse,
}

impl<U: Upstream> std::fmt::Debug for LoggedIn<U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoggedIn")
            .field("delete_action", &self.delete_action)
            .field("lock", &self.lock)
            .field("keeps", &self.keep.is_some())
            .finish_non_exhaustive()
    }
}

impl<U: Upstream> LoggedIn<U> {
    /// The POP3 session ended (after QUIT's commit, or any other way: RFC
    /// 1939 §6, nothing more is changed). The lock goes first, so a client
    /// that reconnects at once is not refused [IN-USE]; then the upstream
    /// session waits in the pool for the account's next login when it is
    /// in step, or logs out.
    pub async fn end(self) {
        let LoggedIn {
            upstream,
            lock,
            keep,
            ..
        } = self;
        if let Some(lock) = lock {
            lock.release().await;
        }
        match keep {
            Some(k) if upstream.reusable() => k.pool.put(k.key, k.tag, upstream, k.reuse),
            _ => upstream.logout().await,
        }
    }
}

/// A successful login: the session, its snapshot, the route's behaviour.
pub type Login<U> = (LoggedIn<U>, Maildrop, Profile);

impl<C: Connector> Bridge<C> {
    /// Logs `user` in from `peer`, unless throttling says no. Failed logins
    /// are answered after a delay that grows with repeated failures from
    /// the address. The throttle counts the upstream account the login
    /// would use (see [`super::throttle::LoginThrottle`]).
    pub async fn login(
        &self,
        user: &str,
        pass: &Secret,
        peer: SocketAddr,
    ) -> Result<Login<C::Conn>, LoginFailure> {
        // An address over its failure limit does not get the directory
        // asked either (the account, and so the full check, needs the
        // directory's answer; a guesser's names must not reach it).
        if self.router.asks_directory(user) && self.throttle.address_refused(peer.ip()).await {
            return Err(self.throttled(peer, Throttled::Address).await);
        }
        let (route, directory_login) = match self.router.resolve(user, peer.ip()).await {
            Resolved::Route(route, login) => (route, login),
            Resolved::NoRoute => {
                // No route for this name's domain and no default, or a
                // directory that does not know it: as good as a wrong
                // password, and counted as one (under the login name).
                let attempt = self.begin(peer, &AccountKey::new("", user)).await?;
                info!(user, "no route for this login");
                metrics().auth("no_route");
                tokio::time::sleep(attempt.failed().await).await;
                return Err(LoginFailure::Refused);
            }
            // Not the client's fault, and never a guess at the upstream.
            Resolved::Unavailable => return Err(counted(replies::DIRECTORY_DOWN)),
        };
        match &route.auth {
            RouteAuth::Passthrough => {
                let view = match session_view(&route.policy, user) {
                    Ok(v) => v,
                    Err(why) => return Err(policy_refused(user, why)),
                };
                // The directory's login name, when it gave one, else the
                // route's rule.
                let upstream_user =
                    directory_login.unwrap_or_else(|| route.login.apply(&view.account).to_string());
                let account = AccountKey::new(&route.account_scope, &upstream_user);
                let attempt = self.begin(peer, &account).await?;
                let key = PoolKey {
                    route: route.pool_scope.clone(),
                    account: upstream_user.to_lowercase(),
                    hide: view.hide.clone(),
                    device: None,
                };
                let credential = Credential(pass.expose());
                // A pooled session is taken only with the password it was
                // opened with (a keyed hash, compared in constant time): a
                // reuse is a successful login.
                let session = match self.reuse(&route, &key, &credential).await {
                    Some(s) => s,
                    None => {
                        let credentials = Credentials::Password {
                            user: &upstream_user,
                            pass,
                        };
                        let result = route
                            .connector
                            .login(credentials, view.hide.as_deref(), Some(peer))
                            .await;
                        match result {
                            Ok(s) => {
                                metrics().pool("opened");
                                s
                            }
                            Err(e) => return Err(self.upstream_failed(&e, attempt, user).await),
                        }
                    }
                };
                attempt.succeeded().await;
                let keep = self.keep(&route, key, &credential);
                self.finish(&route, session, &upstream_user, view, keep)
                    .await
            }
            RouteAuth::Oauth2 { provider } => {
                // The device login is what is guessed (its password is
                // checked here): it is the account the throttle counts.
                let attempt = self
                    .begin(peer, &AccountKey::new(&route.account_scope, user))
                    .await?;
                self.oauth_login(&route, provider, user, pass, peer, attempt)
                    .await
            }
        }
    }

    /// Asks the throttle whether this login may go ahead; a refusal is
    /// answered (after the pause a failure would get) without asking the
    /// upstream, and is not counted as a failure.
    async fn begin(&self, peer: SocketAddr, account: &AccountKey) -> Result<Attempt, LoginFailure> {
        match self.throttle.begin(peer.ip(), account).await {
            Ok(attempt) => Ok(attempt),
            Err(which) => Err(self.throttled(peer, which).await),
        }
    }

    /// A login the throttle refused: answered after the pause a failure
    /// would get, without asking the upstream (guesses stop here), and not
    /// counted as a failure.
    async fn throttled(&self, peer: SocketAddr, which: Throttled) -> LoginFailure {
        warn!(throttled = ?which, "login refused: too many failures");
        let r = replies::throttled(which);
        metrics().auth(r.metric);
        tokio::time::sleep(self.throttle.refused_delay(peer.ip()).await).await;
        r.failure
    }

    /// Login on an OAuth2 route: the device password is checked locally
    /// (a failure is a failed login like a wrong password, and the provider
    /// is never contacted); then the account's access token logs in
    /// upstream, with one retry on a fresh token if the IMAP server refuses
    /// it.
    async fn oauth_login(
        &self,
        route: &Route<C>,
        provider: &str,
        user: &str,
        pass: &Secret,
        peer: SocketAddr,
        attempt: Attempt,
    ) -> Result<Login<C::Conn>, LoginFailure> {
        let Some(oauth) = self.oauth.clone() else {
            // Validation builds the runtime whenever a route needs it.
            error!(route = %route.name, "OAuth2 route without an OAuth2 runtime");
            return Err(self.refuse(replies::OAUTH_MISCONFIGURED, attempt).await);
        };
        let grant = match oauth.authenticate_device(user, pass, peer.ip()).await {
            Ok(g) => g,
            Err(DeviceAuthError::Store(why)) => {
                // Not the client's fault: not counted as a failed login.
                warn!(user, error = %why, "device store unavailable");
                return Err(self.refuse(replies::DEVICE_STORE_DOWN, attempt).await);
            }
            Err(e) => {
                info!(user, reason = %e, "device login refused");
                return Err(self.refuse(replies::REFUSED, attempt).await);
            }
        };
        // The device password was right; what follows is not a guess.
        attempt.succeeded().await;
        let view = match device_view(&route.policy, &grant) {
            Ok(v) => v,
            Err(why) => return Err(policy_refused(user, why)),
        };
        let account = grant.account.as_str();
        // The device's password was checked above: the pool keys by
        // account and device.
        let key = PoolKey {
            route: route.pool_scope.clone(),
            account: account.to_lowercase(),
            hide: view.hide.clone(),
            device: Some(grant.device.to_lowercase()),
        };
        let credential = Credential(b"");
        if let Some(session) = self.reuse(route, &key, &credential).await {
            let keep = self.keep(route, key, &credential);
            let account = account.to_string();
            return self.finish(route, session, &account, view, keep).await;
        }
        let result = bearer_login(
            &oauth,
            &*route.connector,
            provider,
            account,
            view.hide.as_deref(),
            Some(peer),
        )
        .await;
        let session = match result {
            Ok(session) => {
                metrics().pool("opened");
                session
            }
            Err(BearerLoginError::Upstream(e)) => {
                log_upstream_failure(&e, user);
                return Err(counted(replies::upstream(&e)));
            }
            Err(e) => {
                match &e {
                    BearerLoginError::UnknownProvider(_) => {
                        error!(provider, route = %route.name, "unknown OAuth2 provider")
                    }
                    BearerLoginError::Token(crate::oauth::TokenError::NeedsEnrolment {
                        reason,
                        ..
                    }) => warn!(
                        account,
                        provider,
                        reason = %reason,
                        "OAuth2 account needs re-enrolment: run `popbridge oauth add {account} --provider {provider}`"
                    ),
                    BearerLoginError::Token(crate::oauth::TokenError::BackingOff {
                        cause,
                        retry_after_secs,
                    }) => warn!(
                        account,
                        provider, retry_after_secs, "account backed off: {cause}"
                    ),
                    BearerLoginError::Token(crate::oauth::TokenError::Unavailable(why)) => {
                        warn!(account, provider, error = %why, "no access token")
                    }
                    // bearer_login logged these and backed the account off.
                    BearerLoginError::TokenRefused(_)
                    | BearerLoginError::Throttled(_)
                    | BearerLoginError::Upstream(_) => {}
                }
                return Err(counted(replies::bearer(&e)));
            }
        };
        let keep = self.keep(route, key, &credential);
        let account = account.to_string();
        self.finish(route, session, &account, view, keep).await
    }

    /// A pooled session of `key` opened with `credential`, made current
    /// (re-SELECT, listing): `None` when there is none, or it no longer
    /// works, or the mailbox's UIDVALIDITY changed (then it is discarded).
    async fn reuse(
        &self,
        route: &Route<C>,
        key: &PoolKey,
        credential: &Credential<'_>,
    ) -> Option<(C::Conn, Snapshot)> {
        if route.reuse.idle.is_zero() {
            return None;
        }
        let mut conn = self.pool.take(key, credential)?;
        match conn.refresh().await {
            Ok(Some(snapshot)) => {
                metrics().pool("reused");
                debug!("upstream session reused");
                Some((conn, snapshot))
            }
            Ok(None) => {
                info!("pooled upstream session discarded: the mailbox's UIDVALIDITY changed");
                metrics().pool("stale");
                tokio::spawn(conn.logout());
                None
            }
            Err(e) => {
                debug!(error = %e, "pooled upstream session no longer works");
                metrics().pool("stale");
                if conn.reusable() {
                    tokio::spawn(conn.logout());
                }
                None
            }
        }
    }

    /// Where this login's upstream session goes when its POP3 session
    /// ends; idle sessions of the key opened with another password are
    /// dropped now (the password changed).
    fn keep(
        &self,
        route: &Route<C>,
        key: PoolKey,
        credential: &Credential<'_>,
    ) -> Option<Keep<C::Conn>> {
        if route.reuse.idle.is_zero() {
            return None;
        }
        self.pool.forget_other_passwords(&key, credential);
        let tag = self.pool.tag(credential);
        Some(Keep {
            pool: self.pool.clone(),
            key,
            tag,
            reuse: route.reuse,
        })
    }

    /// The IMAP side said no: logged, counted, and (for a refused password)
    /// throttled and delayed.
    async fn upstream_failed(
        &self,
        e: &UpstreamError,
        attempt: Attempt,
        user: &str,
    ) -> LoginFailure {
        log_upstream_failure(e, user);
        self.refuse(replies::upstream(e), attempt).await
    }

    /// Counts a refusal; a failed login (wrong credentials) also counts
    /// against the throttle and waits its delay before the answer. Other
    /// refusals end the attempt uncounted.
    async fn refuse(&self, r: Refusal, attempt: Attempt) -> LoginFailure {
        metrics().auth(r.metric);
        if r.failed_login {
            tokio::time::sleep(attempt.failed().await).await;
        }
        r.failure
    }

    /// After the IMAP login: the session lock, the maildrop with its UIDLs.
    async fn finish(
        &self,
        route: &Route<C>,
        (conn, snap): (C::Conn, Snapshot),
        upstream_user: &str,
        view: SessionView,
        keep: Option<Keep<C::Conn>>,
    ) -> Result<Login<C::Conn>, LoginFailure> {
        let lock = if route.policy.lock {
            let key = format!("{}/{}", route.lock_scope, upstream_user.to_lowercase());
            match MailboxLock::acquire(key, self.throttle.cluster()).await {
                Some(lock) => Some(lock),
                None => {
                    info!(route = %route.name, "mailbox locked by another POP3 session");
                    metrics().auth(replies::IN_USE.metric);
                    tokio::spawn(conn.logout());
                    // RFC 2449 §8.1.2: IN-USE, the maildrop is locked.
                    return Err(replies::IN_USE.failure);
                }
            }
        } else {
            None
        };
        info!(route = %route.name, account = upstream_user, messages = snap.messages.len(), "logged in");
        metrics().auth("ok");
        let mut maildrop = Maildrop::new(snap.uidvalidity, snap.messages);
        // Precedence as in Dovecot: X-UIDL > imported map > template.
        let mut overrides = match &route.uidl_map {
            Some(source) => imported_uidls(source, upstream_user, &maildrop).await,
            None => HashMap::new(),
        };
        overrides.extend(snap.xuidl);
        maildrop.set_uidls(overrides, &route.profile.uidl);
        let session = LoggedIn {
            upstream: conn,
            delete_action: view.action,
            lock,
            keep,
        };
        Ok((session, maildrop, route.profile.clone()))
    }
}

/// Logs why the IMAP side refused a login.
fn log_upstream_failure(e: &UpstreamError, user: &str) {
    match e {
        UpstreamError::AuthFailed(text) => info!(user, upstream = %text, "login refused"),
        UpstreamError::Throttled(_) => warn!(error = %e, "mail server throttles this account"),
        UpstreamError::No {
            command: "SELECT", ..
        } => warn!(error = %e, "mailbox not available"),
        _ => {
            warn!(error = %e, kind = e.kind(), "upstream login failed");
            metrics().upstream_error(e.kind());
        }
    }
}

/// Counts a refusal after the credentials were accepted (the attempt is
/// settled): never a failed login.
fn counted(r: Refusal) -> LoginFailure {
    metrics().auth(r.metric);
    r.failure
}

/// The session view of a device on an OAuth2 route: the account is the one
/// the device belongs to; with the `per-device` policy the device's own
/// view is named after its login's local part (devices are separate logins
/// here, so no `+device` suffix is needed).
pub fn device_view(policy: &Policy, grant: &DeviceGrant) -> Result<SessionView, &'static str> {
    if policy.delete != DeletePolicy::PerDevice {
        let mut view = session_view(policy, &grant.account)?;
        view.account = grant.account.clone();
        return Ok(view);
    }
    let device = grant
        .device
        .rsplit_once('@')
        .map_or(grant.device.as_str(), |(local, _)| local);
    if !valid_device(device) {
        return Err("Invalid device name: use letters, digits, '-', '_' or '.'.");
    }
    let keyword = device_keyword(device);
    Ok(SessionView {
        account: grant.account.clone(),
        device: Some(device.to_string()),
        action: DeleteAction::Keyword(keyword.clone()),
        hide: Some(keyword),
    })
}

/// A login the route's device policy refuses (RFC 3206 AUTH): logged and
/// counted, answered with the policy's reason.
fn policy_refused(user: &str, why: &'static str) -> LoginFailure {
    info!(user, why, "login refused by the route's device policy");
    let r = replies::policy(why);
    metrics().auth(r.metric);
    r.failure
}

/// The imported map's UIDLs for this login's snapshot. Never fails the
/// login: a missing map is normal, and a map that cannot be used (corrupt,
/// unreadable, another UIDVALIDITY) is logged and the template serves.
async fn imported_uidls(
    source: &UidlMapSource,
    account: &str,
    maildrop: &Maildrop,
) -> HashMap<u32, String> {
    let key = MapKey::new(&source.upstream, account, &source.mailbox);
    let store = source.store.clone();
    let uidvalidity = maildrop.uidvalidity;
    let uids: Vec<u32> = maildrop.visible().map(|(_, e)| e.uid).collect();
    // File I/O (a stat, and a read when the file changed) off the runtime.
    let found =
        tokio::task::spawn_blocking(move || store.lookup(&key, uidvalidity, uids.into_iter()))
            .await;
    match found {
        Ok(Ok(MapLookup::Overrides(o))) => {
            debug!(entries = o.len(), "imported UIDL map applied");
            o
        }
        Ok(Ok(MapLookup::None)) => HashMap::new(),
        Ok(Ok(MapLookup::StaleUidvalidity { map, mailbox })) => {
            warn!(
                map_uidvalidity = map,
                mailbox_uidvalidity = mailbox,
                "imported UIDL map ignored: the mailbox's UIDVALIDITY changed since it was made"
            );
            HashMap::new()
        }
        Ok(Err(e)) => {
            error!(error = %e, "imported UIDL map unusable; serving template UIDLs");
            HashMap::new()
        }
        Err(e) => {
            error!(error = %e, "imported UIDL map lookup failed; serving template UIDLs");
            HashMap::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_views_use_the_grants_account() {
        let grant = DeviceGrant {
            account: "alice+work@gmail.example".into(),
            device: "phone@example.org".into(),
        };
        // Not split on the device separator: the account is the enrolled one.
        let v = device_view(&Policy::default(), &grant).unwrap();
        assert_eq!(v.account, "alice+work@gmail.example");
        assert_eq!(v.action, DeleteAction::Expunge);
        let per_device = Policy {
            delete: DeletePolicy::PerDevice,
            ..Policy::default()
        };
        let v = device_view(&per_device, &grant).unwrap();
        assert_eq!(v.account, "alice+work@gmail.example");
        assert_eq!(v.device.as_deref(), Some("phone"));
        assert_eq!(v.hide.as_deref(), Some("$POP3Del-phone"));
        let odd = DeviceGrant {
            account: "a@b".into(),
            device: "bad name@example.org".into(),
        };
        assert!(device_view(&per_device, &odd).is_err());
    }
}

/// The login decisions against an in-process mailbox
/// ([`crate::imap::fake`]): no IMAP server, no real time.
#[cfg(test)]
mod with_fake_upstream {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::bridge::pool::{Pool, Reuse};
    use crate::bridge::throttle::ThrottleConfig;
    use crate::config::{LoginName, RouteIndex};
    use crate::imap::fake::FakeConnector;

    const PEER: &str = "192.0.2.7:40000";

    fn bridge(connector: &FakeConnector, policy: Policy) -> Bridge<FakeConnector> {
        let route = Route {
            name: "default".into(),
            pool_scope: "default".into(),
            connector: Arc::new(connector.clone()),
            login: LoginName::Full,
            auth: RouteAuth::Passthrough,
            profile: Profile::default(),
            policy,
            lock_scope: "fake/INBOX".into(),
            account_scope: "fake".into(),
            uidl_map: None,
            reuse: Reuse {
                idle: Duration::from_secs(300),
                per_account: 2,
            },
        };
        let mut index = RouteIndex::default();
        index.add(0, &[], &[], true);
        Bridge {
            router: Router::new(vec![route], index),
            throttle: Throttle::local(ThrottleConfig {
                failure_delay: Duration::from_secs(2),
                max_failures_per_ip: 20,
                max_failures_per_user: 3,
                window: Duration::from_secs(300),
                max_entries: 100,
                ipv6_prefix_len: 64,
            }),
            oauth: None,
            pool: Arc::new(Pool::new(10).unwrap()),
        }
    }

    fn peer() -> SocketAddr {
        PEER.parse().unwrap()
    }

    fn secret(s: &str) -> Secret {
        Secret::new(s.as_bytes().to_vec())
    }

    #[tokio::test(start_paused = true)]
    async fn a_right_password_gives_the_snapshot() {
        let up = FakeConnector::new(&[("alice", "pw")], &[b"a\r\n", b"bb\r\n"]);
        let b = bridge(&up, Policy::default());
        let (session, maildrop, _) = b.login("alice", &secret("pw"), peer()).await.unwrap();
        assert_eq!(maildrop.stat(), (2, 7));
        assert_eq!(session.delete_action, DeleteAction::Expunge);
        assert!(session.lock.is_none());
    }

    /// Wrong passwords are failed logins: answered after the throttle's
    /// delay, and after the per-user limit the IMAP server is not asked.
    #[tokio::test(start_paused = true)]
    async fn guesses_are_delayed_and_then_stop_at_the_throttle() {
        let up = FakeConnector::new(&[("alice", "pw")], &[]);
        let b = bridge(&up, Policy::default());
        for _ in 0..3 {
            let started = tokio::time::Instant::now();
            let r = b.login("alice", &secret("guess"), peer()).await;
            assert_eq!(r.err(), Some(LoginFailure::Refused));
            assert!(started.elapsed() >= Duration::from_secs(2));
        }
        let r = b.login("alice", &secret("guess"), peer()).await;
        assert!(
            matches!(
                r,
                Err(LoginFailure::Failed {
                    code: "SYS/TEMP",
                    ..
                })
            ),
            "{:?}",
            r.err()
        );
        assert_eq!(
            up.state().logins.len(),
            3,
            "the 4th guess never went upstream"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_lock_refuses_a_second_session_until_the_first_ends() {
        let up = FakeConnector::new(&[("alice", "pw")], &[b"x\r\n"]);
        let b = bridge(
            &up,
            Policy {
                lock: true,
                ..Policy::default()
            },
        );
        let first = b.login("alice", &secret("pw"), peer()).await.unwrap();
        let second = b.login("alice", &secret("pw"), peer()).await;
        assert_eq!(second.err(), Some(replies::IN_USE.failure));
        drop(first);
        assert!(b.login("alice", &secret("pw"), peer()).await.is_ok());
    }

    /// `per-device`: the device tag goes, the account logs in, and QUIT
    /// hides rather than deletes; messages the device hid are not listed.
    #[tokio::test(start_paused = true)]
    async fn per_device_logins_see_their_own_view() {
        let up = FakeConnector::new(&[("bob", "pw")], &[b"1\r\n", b"2\r\n"]);
        up.state()
            .messages
            .get_mut(&1)
            .unwrap()
            .flags
            .insert("$POP3Del-scanner".into());
        let b = bridge(
            &up,
            Policy {
                delete: DeletePolicy::PerDevice,
                ..Policy::default()
            },
        );
        let (session, maildrop, _) = b.login("bob+scanner", &secret("pw"), peer()).await.unwrap();
        assert_eq!(up.state().logins, ["bob"]);
        assert_eq!(maildrop.stat().0, 1);
        assert_eq!(
            session.delete_action,
            DeleteAction::Keyword("$POP3Del-scanner".into())
        );
        let r = b.login("bob+a)b", &secret("pw"), peer()).await;
        assert!(matches!(r, Err(LoginFailure::Failed { code: "AUTH", .. })));
    }

    /// An upstream that fails for another reason is SYS/TEMP, in fixed
    /// words, and not a failed login.
    #[tokio::test(start_paused = true)]
    async fn upstream_failures_are_temporary_and_not_counted() {
        let up = FakeConnector::new(&[("alice", "pw")], &[]);
        let b = bridge(&up, Policy::default());
        for _ in 0..5 {
            up.state().fail_next_login = Some(UpstreamError::ConnectionLost);
            let r = b.login("alice", &secret("pw"), peer()).await;
            assert_eq!(
                r.err(),
                Some(LoginFailure::Failed {
                    code: "SYS/TEMP",
                    text: replies::UNAVAILABLE_TEXT
                })
            );
        }
        assert!(b.login("alice", &secret("pw"), peer()).await.is_ok());
    }

    /// An ended session's upstream session serves the account's next login
    /// with the same password: no second IMAP login, and the snapshot is
    /// current (mail that arrived meanwhile is there, mail expunged
    /// meanwhile is not).
    #[tokio::test(start_paused = true)]
    async fn the_next_login_reuses_the_upstream_session() {
        let up = FakeConnector::new(&[("alice", "pw")], &[b"a\r\n", b"b\r\n"]);
        let b = bridge(&up, Policy::default());
        let (session, maildrop, _) = b.login("alice", &secret("pw"), peer()).await.unwrap();
        assert_eq!(maildrop.stat().0, 2);
        session.end().await;
        assert_eq!(b.pool.idle(), 1);
        up.deliver(b"c\r\n");
        up.state().messages.remove(&1);
        let (session, maildrop, _) = b.login("alice", &secret("pw"), peer()).await.unwrap();
        assert_eq!(up.state().logins.len(), 1, "no second IMAP login");
        let uids: Vec<u32> = maildrop.visible().map(|(_, e)| e.uid).collect();
        assert_eq!(uids, [2, 3]);
        session.end().await;
        // A wrong password never gets the pooled session: it logs in
        // upstream, and fails there.
        let r = b.login("alice", &secret("nope"), peer()).await;
        assert_eq!(r.err(), Some(LoginFailure::Refused));
        assert_eq!(up.state().logins.len(), 2);
        assert_eq!(b.pool.idle(), 1, "the pooled session is untouched");
        // A changed UIDVALIDITY discards it.
        up.state().uidvalidity = 8;
        let (_session, maildrop, _) = b.login("alice", &secret("pw"), peer()).await.unwrap();
        assert_eq!(
            up.state().logins.len(),
            3,
            "a fresh login after UIDVALIDITY changed"
        );
        assert_eq!(maildrop.uidvalidity, 8);
    }
}
