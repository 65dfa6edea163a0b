//! Which upstream serves a login, by the configuration's one rule
//! ([`RouteIndex`]: an explicit per-user entry first, then the domain of the
//! login name, then the default route, or the [`Directory`] when one is
//! configured), and what each route means here. [`RouteBuilder`] is the
//! one place a route is made from its settings, for the static routes at
//! start-up and for the directory's answers on demand.
//!
//! On an OAuth2 route the login name is a device login: the route is chosen
//! by the device login's name the same way (so `phone@example.org` goes to
//! the route for `example.org`), before the device is checked; the account
//! the device acts for only decides which token is used.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::directory::{Directory, Lookup};
use super::pool::Reuse;
use crate::config::{EffectiveRoute, LoginName, Policy, RouteIndex, UpstreamAuth};
use crate::migrate::runtime::MapStore;
use crate::oauth::OauthRuntime;
use crate::pop3::session::Profile;
use crate::pop3::uidl::UidlFormat;

/// How a route logs in upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteAuth {
    /// The POP3 user name and password go to the IMAP server.
    Passthrough,
    /// The POP3 login is a device login checked locally; the IMAP login is
    /// an OAuth2 bearer token for the device's account at `provider` (an
    /// `[[oauth.providers]]` name).
    Oauth2 { provider: String },
}

/// One upstream and how sessions routed to it behave.
#[derive(Debug)]
pub struct Route<C> {
    /// A name for logs: the `[[routes]]` name, or the directory's `route`.
    pub name: String,
    /// What idle upstream sessions are pooled under (with the account): the
    /// route's name for a static route; for a directory route its server,
    /// TLS and mailbox, so every login to one backend shares one pool
    /// whatever the directory calls its route.
    pub pool_scope: String,
    pub connector: Arc<C>,
    pub login: LoginName,
    /// Password passthrough or OAuth2.
    pub auth: RouteAuth,
    /// Per-route POP3 behaviour (UIDL format, `\Seen` policy).
    pub profile: Profile,
    /// Delete policy, per-device views and the session lock.
    pub policy: Policy,
    /// The upstream and mailbox, for session-lock keys.
    pub lock_scope: String,
    /// Where this route's accounts live (its upstream's address): the
    /// throttle counts an account as this plus the IMAP user name, so two
    /// routes to one server share their accounts' budgets.
    pub account_scope: String,
    /// Where imported UIDL maps are looked up (`uidl_map = true`).
    pub uidl_map: Option<UidlMapSource>,
    /// How long, and how many, idle upstream sessions wait for reuse.
    pub reuse: Reuse,
}

/// A route's imported UIDL maps: the store and the part of the key that
/// the route fixes (the login name completes it).
#[derive(Debug, Clone)]
pub struct UidlMapSource {
    pub store: Arc<MapStore>,
    /// The route's `host:port`, as configured.
    pub upstream: String,
    pub mailbox: String,
}

/// Makes a route's connector from the route's settings: the IMAP client
/// for real (given by `app`), a fake in tests.
pub type ConnectorFactory<C> = Arc<dyn Fn(&EffectiveRoute) -> Result<C, String> + Send + Sync>;

/// Makes routes from their settings: what a static route is built with at
/// start-up is what a directory answer is built with when it comes.
pub struct RouteBuilder<C> {
    pub connector: ConnectorFactory<C>,
    /// The OAuth2 runtime, when a route uses `auth = "oauth2"`.
    pub oauth: Option<Arc<OauthRuntime>>,
    /// The imported UIDL maps, when a route uses `uidl_map`.
    pub map_store: Option<Arc<MapStore>>,
}

impl<C> std::fmt::Debug for RouteBuilder<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteBuilder").finish_non_exhaustive()
    }
}

impl<C> RouteBuilder<C> {
    /// A static route, with a connector of its own.
    pub fn build(&self, r: &EffectiveRoute) -> Result<Route<C>, String> {
        let connector = Arc::new((self.connector)(r)?);
        self.with_connector(r, connector, r.name.clone())
    }

    /// A route over `connector` (built from `r` or from settings equal to
    /// `r`'s upstream), pooling its sessions under `pool_scope`.
    pub fn with_connector(
        &self,
        r: &EffectiveRoute,
        connector: Arc<C>,
        pool_scope: String,
    ) -> Result<Route<C>, String> {
        let auth = match r.upstream.auth {
            UpstreamAuth::Passthrough => RouteAuth::Passthrough,
            UpstreamAuth::Oauth2 => {
                let provider = r.upstream.oauth_provider.clone();
                let Some(runtime) = &self.oauth else {
                    return Err(format!(
                        "route {:?} uses auth = \"oauth2\" but no OAuth2 runtime was configured",
                        r.name
                    ));
                };
                if runtime.sasl(&provider).is_none() {
                    return Err(format!(
                        "route {:?}: oauth_provider {provider:?} is not an [[oauth.providers]] entry",
                        r.name
                    ));
                }
                RouteAuth::Oauth2 { provider }
            }
        };
        let uidl = UidlFormat::parse(&r.pop3.uidl_format).map_err(|e| e.to_string())?;
        Ok(Route {
            name: r.name.clone(),
            pool_scope,
            connector,
            login: r.upstream.login,
            auth,
            profile: Profile {
                uidl,
                mark_seen: r.pop3.mark_seen_on_retr,
                mark_seen_on_top: r.pop3.mark_seen_on_top,
            },
            policy: r.policy.clone(),
            lock_scope: format!("{}/{}", r.upstream.address, r.upstream.mailbox),
            account_scope: r.upstream.address.clone(),
            uidl_map: match (&self.map_store, r.pop3.uidl_map) {
                (Some(store), true) => Some(UidlMapSource {
                    store: store.clone(),
                    upstream: r.upstream.address.clone(),
                    mailbox: r.upstream.mailbox.clone(),
                }),
                _ => None,
            },
            reuse: Reuse {
                idle: Duration::from_secs(r.upstream.reuse_idle_secs),
                per_account: r.upstream.reuse_max_per_account,
            },
        })
    }
}

/// Where a login goes.
pub enum Resolved<C> {
    /// This route; with the IMAP login name when the directory gave one.
    Route(Arc<Route<C>>, Option<String>),
    /// No static route matches, no default and no directory, or the
    /// directory does not know the login: as good as a wrong password.
    NoRoute,
    /// The directory could not be asked or gave no usable answer: try
    /// again later (never a guess at the upstream).
    Unavailable,
}

/// The routing table: the routes, the configuration's one lookup rule
/// ([`RouteIndex`]) over them, and the directory for logins it does not
/// match.
#[derive(Debug)]
pub struct Router<C> {
    routes: Vec<Arc<Route<C>>>,
    index: RouteIndex,
    directory: Option<Arc<Directory<C>>>,
}

impl<C> Router<C> {
    /// `routes[i]` serves what `index` maps to `i`.
    pub fn new(routes: Vec<Route<C>>, index: RouteIndex) -> Self {
        Self {
            routes: routes.into_iter().map(Arc::new).collect(),
            index,
            directory: None,
        }
    }

    /// Logins no route matches are looked up in `directory` (the index
    /// must then have no default route).
    pub fn with_directory(mut self, directory: Arc<Directory<C>>) -> Self {
        self.directory = Some(directory);
        self
    }

    /// Where a login from `client` goes: a static route by the index, else
    /// the directory's answer.
    pub async fn resolve(&self, login: &str, client: IpAddr) -> Resolved<C>
    where
        C: Send + Sync + 'static,
    {
        if let Some(route) = self.route(login) {
            return Resolved::Route(route, None);
        }
        let Some(directory) = &self.directory else {
            return Resolved::NoRoute;
        };
        match directory.lookup(login, client).await {
            Lookup::Found(found) => Resolved::Route(found.route.clone(), found.login.clone()),
            Lookup::NotFound => Resolved::NoRoute,
            Lookup::Unavailable => Resolved::Unavailable,
        }
    }

    /// Whether [`Router::resolve`] asks the directory for this login (no
    /// static route matches it and a directory is configured).
    pub fn asks_directory(&self, login: &str) -> bool {
        self.directory.is_some() && self.route(login).is_none()
    }

    /// The route for a login name, or `None` (no entry, no domain match, no
    /// default).
    pub fn route(&self, login: &str) -> Option<Arc<Route<C>>> {
        let i = self.index.find(login)?;
        self.routes.get(i).cloned()
    }

    /// The default route, if there is one.
    pub fn default_route(&self) -> Option<Arc<Route<C>>> {
        let i = self.index.default_route()?;
        self.routes.get(i).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str) -> Route<()> {
        Route {
            name: name.into(),
            pool_scope: name.into(),
            connector: Arc::new(()),
            login: LoginName::Full,
            auth: RouteAuth::Passthrough,
            profile: Profile::default(),
            policy: Policy::default(),
            lock_scope: String::new(),
            account_scope: String::new(),
            uidl_map: None,
            reuse: Reuse {
                idle: std::time::Duration::ZERO,
                per_account: 0,
            },
        }
    }

    /// The router hands out the route the index names (the rule itself is
    /// tested with [`RouteIndex`]).
    #[test]
    fn routes_follow_the_index() {
        let mut index = RouteIndex::default();
        index.add(0, &[], &["a.example".into()], false);
        index.add(1, &[], &[], true);
        let r = Router::new(vec![route("a"), route("dflt")], index);
        let name = |login: &str| r.route(login).map(|x| x.name.clone());
        assert_eq!(name("x@A.example").as_deref(), Some("a"));
        assert_eq!(name("x@b.example").as_deref(), Some("dflt"));
        assert_eq!(
            r.default_route().map(|x| x.name.clone()).as_deref(),
            Some("dflt")
        );
        let none = Router::new(vec![route("a")], {
            let mut i = RouteIndex::default();
            i.add(0, &[], &["a.example".into()], false);
            i
        });
        assert!(none.route("plain").is_none());
        assert!(none.default_route().is_none());
    }
}
