//! Prometheus metrics, served by the admin listener at `/metrics`.
//!
//! One process-wide set ([`metrics()`]); counters are cheap atomics, so any
//! layer can count without threading a handle through every call.

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Which listener a session came in on.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `pop3`, `pop3s`, or on the legacy TLS listener (feature
    /// `legacy-tls`) `legacy_pop3` or `legacy_pop3s`.
    pub listener: &'static str,
}

/// A POP3 command and how it ended.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    pub command: &'static str,
    /// `ok` or `err`.
    pub result: &'static str,
}

/// How a login attempt ended.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabels {
    /// `ok`, `refused` (bad credentials, a wrong or unknown device login
    /// included), `throttled` (too many failures), `no_route`,
    /// `plaintext_refused`, `upstream_error`, `in_use`, `mailbox_missing`;
    /// for OAuth2 routes also `oauth_needs_enrolment` (refresh token gone),
    /// `oauth_throttled` (the account is backed off while the provider or
    /// the mail server throttles) and `oauth_unavailable` (the token
    /// service), `oauth_token_rejected` (the mail server refused a fresh
    /// token, and logins while the account is backed off for that),
    /// `upstream_throttled` (the mail server throttles the account) and
    /// `device_store_error`; with a directory, `directory_unavailable`. Token refreshes are counted by the OAuth2
    /// module.
    pub outcome: &'static str,
}

/// A label with one `kind` or `reason`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// An OAuth2 provider: an `[[oauth.providers]]` name from the
/// configuration (bounded; never an account, device or token).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: String,
}

/// A token refresh at a provider and how it ended.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLabels {
    pub provider: String,
    /// `ok`, `invalid_grant` (the account needs re-enrolment), `throttled`
    /// (HTTP 429/503 or `slow_down`), `error` (anything else).
    pub outcome: &'static str,
}

/// How a directory lookup ended.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `hit` (the directory routed the login), `cached` (an answer from
    /// the cache, either kind), `not_found` (404) or `error` (no usable
    /// answer: the login got `-ERR [SYS/TEMP]`).
    pub result: &'static str,
}

/// Every metric popbridge exports.
pub struct Metrics {
    registry: Registry,
    pub sessions_active: Family<ListenerLabels, Gauge>,
    pub sessions_total: Family<ListenerLabels, Counter>,
    /// Sessions that switched to TLS with STLS.
    pub stls_total: Counter,
    pub commands: Family<CommandLabels, Counter>,
    pub auth: Family<AuthLabels, Counter>,
    pub upstream_connect_seconds: Histogram,
    pub upstream_login_seconds: Histogram,
    pub upstream_errors: Family<KindLabels, Counter>,
    pub messages_retrieved: Counter,
    pub octets_retrieved: Counter,
    pub messages_deleted: Counter,
    pub cache_hits: Counter,
    pub cache_partial: Counter,
    pub cache_misses: Counter,
    /// Connections refused before a session started (limits, PROXY header).
    pub connections_refused: Family<KindLabels, Counter>,
    /// OAuth2 refresh-token grants sent, by provider and outcome.
    pub oauth_refreshes: Family<RefreshLabels, Counter>,
    /// Accounts this process found their refresh token refused
    /// (`invalid_grant`) and marked for re-enrolment. A counter of
    /// transitions, not a gauge of accounts: the state lives in the shared
    /// store and is cleared by `popbridge oauth add` in another process, so
    /// no replica could keep a gauge true (`popbridge oauth list` shows the
    /// current state).
    pub oauth_reenrolments: Family<ProviderLabels, Counter>,
    /// Access tokens handed out from the in-memory cache.
    pub oauth_cache_hits: Family<ProviderLabels, Counter>,
    /// Upstream sessions by what happened with the reuse pool: `opened`
    /// (a new IMAP login), `reused`, `stale` (a pooled session that no
    /// longer worked or whose UIDVALIDITY changed, discarded), `evicted`
    /// (pool limits), `expired` (idle too long), `drained` (shutdown,
    /// reload).
    pub pool_events: Family<KindLabels, Counter>,
    /// Idle upstream sessions in the pool now.
    pub pool_idle: Gauge,
    /// Device logins refused because the device's record failed its check
    /// against the store key, by kind: `unsealed` (no seal: written by an
    /// older popbridge, or forged) or `tampered` (a seal that does not
    /// match). Any increase means someone wrote to the store without the
    /// key, or records await `popbridge device seal`.
    pub oauth_device_records_refused: Family<KindLabels, Counter>,
    /// Failed operations on the shared Redis state (`[cluster]`), by `op`:
    /// `lock_acquire`, `lock_renew`, `lock_release`, `throttle_begin`,
    /// `throttle_settle`, `throttle_known`. Each one fell back to the
    /// per-process lock or throttle (or, for a release, left the lease to
    /// expire).
    pub cluster_redis_errors: Family<OpLabels, Counter>,
    /// Directory lookups by result.
    pub directory_lookups: Family<ResultLabels, Counter>,
}

/// A label with one `op`: a shared-state operation.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("popbridge");
        let latency = || Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let m = Metrics {
            sessions_active: Family::default(),
            sessions_total: Family::default(),
            stls_total: Counter::default(),
            commands: Family::default(),
            auth: Family::default(),
            upstream_connect_seconds: latency(),
            upstream_login_seconds: latency(),
            upstream_errors: Family::default(),
            messages_retrieved: Counter::default(),
            octets_retrieved: Counter::default(),
            messages_deleted: Counter::default(),
            cache_hits: Counter::default(),
            cache_partial: Counter::default(),
            cache_misses: Counter::default(),
            connections_refused: Family::default(),
            oauth_refreshes: Family::default(),
            oauth_reenrolments: Family::default(),
            oauth_cache_hits: Family::default(),
            pool_events: Family::default(),
            pool_idle: Gauge::default(),
            oauth_device_records_refused: Family::default(),
            cluster_redis_errors: Family::default(),
            directory_lookups: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "sessions_active",
            "POP3 sessions open now",
            m.sessions_active.clone(),
        );
        r.register(
            "sessions",
            "POP3 sessions started",
            m.sessions_total.clone(),
        );
        r.register("stls", "Sessions upgraded with STLS", m.stls_total.clone());
        r.register(
            "commands",
            "POP3 commands by name and result",
            m.commands.clone(),
        );
        r.register("auth", "Login attempts by outcome", m.auth.clone());
        r.register(
            "upstream_connect_seconds",
            "Time to open the TCP (and TLS) connection to the IMAP server",
            m.upstream_connect_seconds.clone(),
        );
        r.register(
            "upstream_login_seconds",
            "Time from connecting to a selected mailbox with its listing",
            m.upstream_login_seconds.clone(),
        );
        r.register(
            "upstream_errors",
            "Upstream errors by kind",
            m.upstream_errors.clone(),
        );
        r.register(
            "messages_retrieved",
            "Messages sent with RETR",
            m.messages_retrieved.clone(),
        );
        r.register(
            "octets_retrieved",
            "Message octets sent with RETR",
            m.octets_retrieved.clone(),
        );
        r.register(
            "messages_deleted",
            "Messages removed at QUIT",
            m.messages_deleted.clone(),
        );
        r.register(
            "listing_cache_hits",
            "Logins whose listing came from the cache",
            m.cache_hits.clone(),
        );
        r.register(
            "listing_cache_partial_hits",
            "Logins that fetched only new messages",
            m.cache_partial.clone(),
        );
        r.register(
            "listing_cache_misses",
            "Logins that fetched the whole listing",
            m.cache_misses.clone(),
        );
        r.register(
            "upstream_sessions",
            "Upstream IMAP sessions by what the reuse pool did: opened, reused, stale, evicted, expired, drained",
            m.pool_events.clone(),
        );
        r.register(
            "upstream_sessions_idle",
            "Idle upstream IMAP sessions kept for reuse",
            m.pool_idle.clone(),
        );
        r.register(
            "connections_refused",
            "Connections refused by limits or a bad PROXY header",
            m.connections_refused.clone(),
        );
        r.register(
            "oauth_token_refreshes",
            "OAuth2 token refreshes by provider and outcome",
            m.oauth_refreshes.clone(),
        );
        r.register(
            "oauth_reenrolments_needed",
            "OAuth2 accounts marked for re-enrolment (refresh token refused) by this process",
            m.oauth_reenrolments.clone(),
        );
        r.register(
            "oauth_access_token_cache_hits",
            "OAuth2 access tokens served from the in-memory cache",
            m.oauth_cache_hits.clone(),
        );
        r.register(
            "cluster_redis_errors",
            "Failed operations on the shared Redis state, by operation (each fell back to the per-process lock or throttle)",
            m.cluster_redis_errors.clone(),
        );
        r.register(
            "oauth_device_records_refused",
            "Device logins refused because the device record failed its check against the store key",
            m.oauth_device_records_refused.clone(),
        );
        r.register(
            "directory_lookups",
            "Directory lookups by result: hit, cached, not_found, error",
            m.directory_lookups.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a POP3 command.
    pub fn command(&self, command: &'static str, ok: bool) {
        self.commands
            .get_or_create(&CommandLabels {
                command,
                result: if ok { "ok" } else { "err" },
            })
            .inc();
    }

    /// Counts a login outcome.
    pub fn auth(&self, outcome: &'static str) {
        self.auth.get_or_create(&AuthLabels { outcome }).inc();
    }

    /// Counts an upstream error.
    /// Counts what the upstream session pool did.
    pub fn directory(&self, result: &'static str) {
        self.directory_lookups
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn pool(&self, event: &'static str) {
        self.pool_events
            .get_or_create(&KindLabels { kind: event })
            .inc();
    }

    pub fn upstream_error(&self, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// Counts a refused connection.
    pub fn refused(&self, kind: &'static str) {
        self.connections_refused
            .get_or_create(&KindLabels { kind })
            .inc();
    }
}

impl Metrics {
    /// Counts a token refresh at `provider` (a configured provider name).
    pub fn oauth_refresh(&self, provider: &str, outcome: &'static str) {
        self.oauth_refreshes
            .get_or_create(&RefreshLabels {
                provider: provider.to_string(),
                outcome,
            })
            .inc();
    }

    /// Counts an account of `provider` turning to "needs re-enrolment".
    pub fn oauth_reenrolment_needed(&self, provider: &str) {
        self.oauth_reenrolments
            .get_or_create(&ProviderLabels {
                provider: provider.to_string(),
            })
            .inc();
    }

    /// Counts a device record refused at login (`kind`: `unsealed` or
    /// `tampered`).
    pub fn oauth_device_record_refused(&self, kind: &'static str) {
        self.oauth_device_records_refused
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// Counts a failed shared-state operation (`op`, see
    /// [`Metrics::cluster_redis_errors`]).
    pub fn cluster_redis_error(&self, op: &'static str) {
        self.cluster_redis_errors
            .get_or_create(&OpLabels { op })
            .inc();
    }

    /// Counts an access token served from the cache.
    pub fn oauth_cache_hit(&self, provider: &str) {
        self.oauth_cache_hits
            .get_or_create(&ProviderLabels {
                provider: provider.to_string(),
            })
            .inc();
    }
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_the_metrics() {
        let m = metrics();
        m.command("RETR", true);
        m.auth("ok");
        m.upstream_login_seconds.observe(0.01);
        let text = m.encode();
        assert!(
            text.contains("popbridge_commands_total{command=\"RETR\",result=\"ok\"}"),
            "{text}"
        );
        assert!(
            text.contains("popbridge_auth_total{outcome=\"ok\"}"),
            "{text}"
        );
        assert!(
            text.contains("popbridge_upstream_login_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains("# EOF"), "{text}");
    }

    #[test]
    fn oauth_series_carry_only_provider_and_outcome() {
        let m = metrics();
        m.oauth_refresh("m365", "invalid_grant");
        m.oauth_reenrolment_needed("m365");
        m.oauth_cache_hit("m365");
        let text = m.encode();
        for series in [
            "popbridge_oauth_token_refreshes_total{provider=\"m365\",outcome=\"invalid_grant\"} 1",
            "popbridge_oauth_reenrolments_needed_total{provider=\"m365\"} 1",
            "popbridge_oauth_access_token_cache_hits_total{provider=\"m365\"} 1",
        ] {
            assert!(text.contains(series), "{series}:\n{text}");
        }
    }
}
