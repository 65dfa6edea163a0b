//! Which upstream serves a login: an explicit per-user entry first, then the
//! domain of the login name (`alice@example.org`), then the default route.
//!
//! On an OAuth2 route the login name is a device login: the route is chosen
//! by the device login's name the same way (so `phone@example.org` goes to
//! the route for `example.org`), before the device is checked; the account
//! the device acts for only decides which token is used.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bridge::policy::Policy;
use crate::pop3::session::Profile;

/// How the POP3 login name is passed to the IMAP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoginName {
    /// As the client sent it.
    #[default]
    Full,
    /// Without `@domain`.
    LocalPart,
}

impl LoginName {
    /// The name to send upstream for `login`.
    pub fn apply<'a>(&self, login: &'a str) -> &'a str {
        match self {
            LoginName::Full => login,
            LoginName::LocalPart => login.rsplit_once('@').map_or(login, |(local, _)| local),
        }
    }
}

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
    pub name: String,
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
    /// Where imported UIDL maps are looked up (`uidl_map = true`).
    pub uidl_map: Option<UidlMapSource>,
}

/// A route's imported UIDL maps: the store and the part of the key that
/// the route fixes (the login name completes it).
#[derive(Debug, Clone)]
pub struct UidlMapSource {
    pub store: Arc<crate::migrate::runtime::MapStore>,
    /// The route's `host:port`, as configured.
    pub upstream: String,
    pub mailbox: String,
}

/// The routing table.
#[derive(Debug)]
pub struct Router<C> {
    routes: Vec<Arc<Route<C>>>,
    /// Lower-cased login name → route index.
    by_user: HashMap<String, usize>,
    /// Lower-cased domain → route index.
    by_domain: HashMap<String, usize>,
    default: Option<usize>,
}

impl<C> Router<C> {
    /// An empty table; add routes with [`Router::add`].
    pub fn new() -> Self {
        Self {
            routes: Vec::new(),
            by_user: HashMap::new(),
            by_domain: HashMap::new(),
            default: None,
        }
    }

    /// Adds a route for these users and domains, and as the default if
    /// `default`. Earlier entries win on a conflict (validation refuses
    /// conflicts before this is reached).
    pub fn add(&mut self, route: Route<C>, users: &[String], domains: &[String], default: bool) {
        let i = self.routes.len();
        self.routes.push(Arc::new(route));
        for u in users {
            self.by_user.entry(u.to_lowercase()).or_insert(i);
        }
        for d in domains {
            self.by_domain.entry(d.to_lowercase()).or_insert(i);
        }
        if default && self.default.is_none() {
            self.default = Some(i);
        }
    }

    /// The route for a login name, or `None` (no entry, no domain match, no
    /// default).
    pub fn route(&self, login: &str) -> Option<Arc<Route<C>>> {
        let lower = login.to_lowercase();
        let by_domain = || {
            let (_, domain) = lower.rsplit_once('@')?;
            self.by_domain.get(domain).copied()
        };
        let i = self
            .by_user
            .get(&lower)
            .copied()
            .or_else(by_domain)
            .or(self.default)?;
        Some(self.routes[i].clone())
    }

    /// The default route, if there is one.
    pub fn default_route(&self) -> Option<Arc<Route<C>>> {
        self.default.map(|i| self.routes[i].clone())
    }
}

impl<C> Default for Router<C> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str) -> Route<()> {
        Route {
            name: name.into(),
            connector: Arc::new(()),
            login: LoginName::Full,
            auth: RouteAuth::Passthrough,
            profile: Profile::default(),
            policy: Policy::default(),
            lock_scope: String::new(),
            uidl_map: None,
        }
    }

    #[test]
    fn users_then_domains_then_default() {
        let mut r = Router::new();
        r.add(
            route("a"),
            &["boss@b.example".into()],
            &["a.example".into()],
            false,
        );
        r.add(
            route("b"),
            &[],
            &["b.example".into(), "B2.example".into()],
            false,
        );
        r.add(route("dflt"), &[], &[], true);
        let name = |login: &str| r.route(login).map(|x| x.name.clone());
        assert_eq!(name("x@a.example").as_deref(), Some("a"));
        assert_eq!(name("X@A.EXAMPLE").as_deref(), Some("a"));
        assert_eq!(
            name("boss@b.example").as_deref(),
            Some("a"),
            "user entry beats domain"
        );
        assert_eq!(name("y@b.example").as_deref(), Some("b"));
        assert_eq!(name("y@b2.example").as_deref(), Some("b"));
        assert_eq!(name("nodomain").as_deref(), Some("dflt"));
        assert_eq!(name("z@other.example").as_deref(), Some("dflt"));
    }

    #[test]
    fn no_default_means_no_route() {
        let mut r = Router::new();
        r.add(route("a"), &[], &["a.example".into()], false);
        assert!(r.route("z@other.example").is_none());
        assert!(r.route("plain").is_none());
        assert!(r.default_route().is_none());
    }

    #[test]
    fn login_name_forms() {
        assert_eq!(
            LoginName::Full.apply("alice@example.org"),
            "alice@example.org"
        );
        assert_eq!(LoginName::LocalPart.apply("alice@example.org"), "alice");
        assert_eq!(LoginName::LocalPart.apply("a@b@example.org"), "a@b");
        assert_eq!(LoginName::LocalPart.apply("alice"), "alice");
    }
}
