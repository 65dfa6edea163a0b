//! `[[routes]]`: more upstreams, chosen by the login name, each inheriting
//! what it does not set from `[upstream]` and `[pop3]`; and the one rule
//! that picks a route for a login ([`RouteIndex`]).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{
    check_upstream, is_safe_atom, Config, ConfigError, DeletePolicy, LoginMechanism, LoginName,
    NoUidplus, Policy, Pop3Config, UpstreamAuth, UpstreamConfig, UpstreamTls,
};

/// Declares the keys a route may override, once: the [`RouteConfig`]
/// struct (each key an `Option`) and the merges onto `[upstream]` and
/// `[pop3]` come from this one list. Every `[upstream]` key must be listed
/// (the merge builds an [`UpstreamConfig`] field by field, so a new key
/// that is missing here does not compile); `[pop3]` keys not listed are
/// global only.
macro_rules! route_keys {
    (
        upstream { $($uk:ident: $ut:ty,)* }
        pop3 { $($pk:ident: $pt:ty,)* }
    ) => {
        /// One `[[routes]]` entry. Unset keys inherit from `[upstream]`
        /// and `[pop3]`; each means what the key of the same name there
        /// means.
        #[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
        #[serde(deny_unknown_fields, default)]
        pub struct RouteConfig {
            /// A name for logs.
            pub name: String,
            /// Login-name domains (after the last `@`), case-insensitive.
            pub domains: Vec<String>,
            /// Exact login names, case-insensitive; they win over domains.
            pub users: Vec<String>,
            $(pub $uk: Option<$ut>,)*
            $(pub $pk: Option<$pt>,)*
        }

        impl RouteConfig {
            /// `[upstream]` with this route's keys on top.
            fn upstream_over(&self, base: &UpstreamConfig) -> UpstreamConfig {
                UpstreamConfig {
                    $($uk: self.$uk.clone().unwrap_or_else(|| base.$uk.clone()),)*
                }
            }

            /// `[pop3]` with this route's keys on top.
            fn pop3_over(&self, base: &Pop3Config) -> Pop3Config {
                Pop3Config {
                    $($pk: self.$pk.clone().unwrap_or_else(|| base.$pk.clone()),)*
                    ..base.clone()
                }
            }
        }
    };
}

route_keys! {
    upstream {
        address: String,
        tls: UpstreamTls,
        mailbox: String,
        connect_timeout_secs: u64,
        command_timeout_secs: u64,
        no_uidplus: NoUidplus,
        ca_file: String,
        tls_name: String,
        login: LoginName,
        send_client_id: bool,
        auth: UpstreamAuth,
        oauth_provider: String,
        login_mechanism: LoginMechanism,
        reuse_idle_secs: u64,
        reuse_max_per_account: usize,
    }
    pop3 {
        uidl_format: String,
        mark_seen_on_retr: bool,
        mark_seen_on_top: bool,
        reuse_xuidl: bool,
        uidl_map: bool,
        delete_policy: DeletePolicy,
        deleted_keyword: String,
        move_to: String,
        create_move_target: bool,
        device_separator: String,
        lock: bool,
    }
}

/// A route with everything inherited filled in and checked.
#[derive(Debug, Clone)]
pub struct EffectiveRoute {
    pub name: String,
    pub domains: Vec<String>,
    pub users: Vec<String>,
    pub upstream: UpstreamConfig,
    /// `[pop3]` with the route's keys on top: its UIDL template (parsed
    /// where it is used), `\Seen` marking, `reuse_xuidl` and `uidl_map`.
    pub pop3: Pop3Config,
    /// Delete policy, per-device views and the session lock.
    pub policy: Policy,
    pub is_default: bool,
}

impl Config {
    /// The routing table with inherited values filled in, checked: the
    /// `[[routes]]` in order, then the default route (`[upstream]`).
    pub fn effective_routes(&self) -> Result<Vec<EffectiveRoute>, ConfigError> {
        let mut out = Vec::new();
        let mut names = std::collections::HashSet::new();
        let mut domains = std::collections::HashSet::new();
        let mut users = std::collections::HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            if r.name.is_empty() {
                return Err(ConfigError(format!("{at}.name must be set")));
            }
            if r.name == "default" || !names.insert(r.name.clone()) {
                return Err(ConfigError(format!(
                    "{at}.name {:?} is used twice (\"default\" is taken)",
                    r.name
                )));
            }
            if r.domains.is_empty() && r.users.is_empty() {
                return Err(ConfigError(format!(
                    "{at} ({}) has neither domains nor users",
                    r.name
                )));
            }
            for d in &r.domains {
                if d.is_empty() || d.contains('@') || !domains.insert(d.to_lowercase()) {
                    return Err(ConfigError(format!(
                        "{at}.domains: {d:?} is empty, has an @, or is routed twice"
                    )));
                }
            }
            for u in &r.users {
                if u.is_empty() || !users.insert(u.to_lowercase()) {
                    return Err(ConfigError(format!(
                        "{at}.users: {u:?} is empty or routed twice"
                    )));
                }
            }
            out.push(self.effective(&at, &at, r, false)?);
        }
        // With a directory, unmatched logins go there: [upstream] is its
        // template, not a route.
        if self.routing.default_route && !self.directory.enabled() {
            let default = RouteConfig {
                name: "default".into(),
                ..RouteConfig::default()
            };
            out.push(self.effective("upstream", "pop3", &default, true)?);
        }
        if out.is_empty() && !self.directory.enabled() {
            return Err(ConfigError(
                "no route: add [[routes]] or set routing.default_route = true".into(),
            ));
        }
        Ok(out)
    }

    /// One route with `[upstream]` and `[pop3]` underneath; `up_at` and
    /// `pop3_at` name where its keys come from in messages.
    pub(super) fn effective(
        &self,
        up_at: &str,
        pop3_at: &str,
        r: &RouteConfig,
        is_default: bool,
    ) -> Result<EffectiveRoute, ConfigError> {
        let upstream = r.upstream_over(&self.upstream);
        check_upstream(up_at, &upstream)?;
        let pop3 = r.pop3_over(&self.pop3);
        let policy = policy(pop3_at, &pop3)?;
        Ok(EffectiveRoute {
            name: r.name.clone(),
            domains: r.domains.clone(),
            users: r.users.clone(),
            upstream,
            pop3,
            policy,
            is_default,
        })
    }
}

/// A route's shared-mailbox policy from its merged `[pop3]` keys.
fn policy(at: &str, p: &Pop3Config) -> Result<Policy, ConfigError> {
    let policy = Policy {
        delete: p.delete_policy,
        keyword: p.deleted_keyword.clone(),
        move_to: p.move_to.clone(),
        create_move_target: p.create_move_target,
        device_separator: p.device_separator.clone(),
        lock: p.lock,
    };
    // Keywords travel unquoted: only safe atoms (never \Flags or syntax).
    if !is_safe_atom(&policy.keyword) {
        return Err(ConfigError(format!(
            "{at}.deleted_keyword {:?} must be letters, digits, '$', '-', '_' or '.'",
            policy.keyword
        )));
    }
    if policy.move_to.is_empty() || policy.move_to.contains(['\r', '\n', '\0']) {
        return Err(ConfigError(format!(
            "{at}.move_to {:?} is not a valid mailbox name",
            policy.move_to
        )));
    }
    if policy.delete == DeletePolicy::PerDevice
        && (policy.device_separator.is_empty() || policy.device_separator.contains(['@', ' ']))
    {
        return Err(ConfigError(format!(
            "{at}.device_separator {:?} must be non-empty, without '@' or spaces",
            policy.device_separator
        )));
    }
    Ok(policy)
}

/// Which route serves a login: an explicit per-user entry first, then the
/// domain of the login name (after its last `@`), then the default route;
/// names are compared case-insensitively. The one lookup rule, used by the
/// proxy and by the maintenance commands. Indexes are positions in the list
/// the index was built from; earlier entries win on a conflict (validation
/// refuses conflicts in the configuration).
#[derive(Debug, Clone, Default)]
pub struct RouteIndex {
    /// Lower-cased login name → route index.
    by_user: HashMap<String, usize>,
    /// Lower-cased domain → route index.
    by_domain: HashMap<String, usize>,
    default: Option<usize>,
}

impl RouteIndex {
    /// The index of `routes`, in order.
    pub fn new<'a>(routes: impl IntoIterator<Item = &'a EffectiveRoute>) -> Self {
        let mut index = RouteIndex::default();
        for (i, r) in routes.into_iter().enumerate() {
            index.add(i, &r.users, &r.domains, r.is_default);
        }
        index
    }

    /// Route `i` serves these users and domains, and is the default if
    /// `default` (the first such wins).
    pub fn add(&mut self, i: usize, users: &[String], domains: &[String], default: bool) {
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

    /// The route for a login name: its index, or `None` (no entry, no
    /// domain match, no default).
    pub fn find(&self, login: &str) -> Option<usize> {
        let lower = login.to_lowercase();
        let by_domain = || {
            let (_, domain) = lower.rsplit_once('@')?;
            self.by_domain.get(domain).copied()
        };
        self.by_user
            .get(&lower)
            .copied()
            .or_else(by_domain)
            .or(self.default)
    }

    /// The default route's index, if there is one.
    pub fn default_route(&self) -> Option<usize> {
        self.default
    }
}

/// The route called `name`, or a message listing the routes there are.
pub fn route_named<'a>(
    routes: &'a [EffectiveRoute],
    name: &str,
) -> Result<&'a EffectiveRoute, String> {
    routes.iter().find(|r| r.name == name).ok_or_else(|| {
        format!(
            "no route named {name:?} (routes: {})",
            routes
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: &[(&[&str], &[&str], bool)]) -> RouteIndex {
        let mut index = RouteIndex::default();
        for (i, (users, domains, default)) in entries.iter().enumerate() {
            let users: Vec<String> = users.iter().map(|s| s.to_string()).collect();
            let domains: Vec<String> = domains.iter().map(|s| s.to_string()).collect();
            index.add(i, &users, &domains, *default);
        }
        index
    }

    #[test]
    fn users_then_domains_then_default() {
        let r = index(&[
            (&["boss@b.example"], &["a.example"], false),
            (&[], &["b.example", "B2.example"], false),
            (&[], &[], true),
        ]);
        assert_eq!(r.find("x@a.example"), Some(0));
        assert_eq!(r.find("X@A.EXAMPLE"), Some(0));
        assert_eq!(r.find("boss@b.example"), Some(0), "user entry beats domain");
        assert_eq!(r.find("y@b.example"), Some(1));
        assert_eq!(r.find("y@b2.example"), Some(1));
        assert_eq!(r.find("nodomain"), Some(2));
        assert_eq!(r.find("z@other.example"), Some(2));
    }

    #[test]
    fn no_default_means_no_route() {
        let r = index(&[(&[], &["a.example"], false)]);
        assert_eq!(r.find("z@other.example"), None);
        assert_eq!(r.find("plain"), None);
        assert_eq!(r.default_route(), None);
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

    /// A route inherits every key it does not set, from `[upstream]` and
    /// `[pop3]`, and overrides the ones it sets.
    #[test]
    fn routes_inherit_and_override() {
        let c = Config::from_toml(
            "[upstream]\ntls = \"none\"\naddress = \"base:143\"\ncommand_timeout_secs = 7\n\
             [pop3]\nmark_seen_on_retr = false\ndelete_policy = \"flag\"\n\
             [[routes]]\nname = \"r\"\ndomains = [\"r.example\"]\naddress = \"other:993\"\n\
             tls = \"implicit\"\nlock = true\nuidl_format = \"%u\"\n",
        )
        .unwrap();
        let routes = c.effective_routes().unwrap();
        let (r, d) = (&routes[0], &routes[1]);
        assert_eq!(r.upstream.address, "other:993");
        assert_eq!(r.upstream.tls, UpstreamTls::Implicit);
        assert_eq!(r.upstream.command_timeout_secs, 7);
        assert!(!r.pop3.mark_seen_on_retr);
        assert_eq!(r.pop3.uidl_format, "%u");
        assert_eq!(r.policy.delete, DeletePolicy::Flag);
        assert!(r.policy.lock);
        assert!(d.is_default && !d.policy.lock);
        assert_eq!(d.upstream.address, "base:143");
        assert_eq!(d.pop3.uidl_format, "dovecot");
    }
}
