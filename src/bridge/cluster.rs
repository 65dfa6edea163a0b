//! What several replicas share through Redis (`[cluster]`): the session
//! leases ([`super::lock`]) and the login throttle
//! ([`super::shared_throttle`]). Every key lives under `popbridge:cluster:`.
//!
//! A Redis outage never stops logins: each operation is bounded by
//! `cluster.redis_timeout_ms`, and a failure falls back to this process's
//! own lock or throttle, with a (rate-limited) warning and the metric
//! `popbridge_cluster_redis_errors_total{op}`.

use std::time::Duration;

use tracing::warn;

use crate::cluster::{RedisConn, RedisError, WarnLimiter};
use crate::config::cluster::ClusterConfig;
use crate::metrics::metrics;

/// Namespace of every cluster key.
pub const PREFIX: &str = "popbridge:cluster:";

/// The shared Redis state of a cluster of replicas.
#[derive(Debug)]
pub struct Cluster {
    pub redis: RedisConn,
    /// Lease of a session lock (`cluster.lock_lease_secs`).
    pub lease: Duration,
    /// One "Redis unavailable" warning per ten seconds, however many
    /// logins fall back meanwhile.
    warn: WarnLimiter,
}

impl Cluster {
    /// The cluster state of `config`, or `None` without `cluster.redis_url`.
    /// Reads the password and CA files; contacts nothing yet.
    pub fn from_config(config: &ClusterConfig) -> Result<Option<Self>, RedisError> {
        let Some(endpoint) = config.endpoint() else {
            return Ok(None);
        };
        Ok(Some(Self {
            redis: RedisConn::new(&endpoint)?,
            lease: config.lock_lease(),
            warn: WarnLimiter::default(),
        }))
    }

    /// A failed operation: counted, and logged at most every ten seconds.
    /// `fallback` says what was done instead.
    pub fn outage(&self, op: &'static str, e: &RedisError, fallback: &'static str) {
        metrics().cluster_redis_error(op);
        if let Some(held_back) = self.warn.allow() {
            warn!(op, error = %e, held_back, "shared state unavailable: {fallback}");
        }
    }
}

/// The Redis key of `parts` under [`PREFIX`].
pub fn key(kind: &str, id: &str) -> String {
    format!("{PREFIX}{kind}:{id}")
}
