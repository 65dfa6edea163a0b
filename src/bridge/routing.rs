//! Which upstream serves a login, by the configuration's one rule
//! ([`RouteIndex`]: an explicit per-user entry first, then the domain of the
//! login name, then the default route), and what each route means here.
//!
//! On an OAuth2 route the login name is a device login: the route is chosen
//! by the device login's name the same way (so `phone@example.org` goes to
//! the route for `example.org`), before the device is checked; the account
//! the device acts for only decides which token is used.

use std::sync::Arc;

use super::pool::Reuse;
use crate::config::{LoginName, Policy, RouteIndex};
use crate::migrate::runtime::MapStore;
use crate::pop3::session::Profile;

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

/// The routing table: the routes, and the configuration's one lookup rule
/// ([`RouteIndex`]) over them.
#[derive(Debug)]
pub struct Router<C> {
    routes: Vec<Arc<Route<C>>>,
    index: RouteIndex,
}

impl<C> Router<C> {
    /// `routes[i]` serves what `index` maps to `i`.
    pub fn new(routes: Vec<Route<C>>, index: RouteIndex) -> Self {
        Self {
            routes: routes.into_iter().map(Arc::new).collect(),
            index,
        }
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
