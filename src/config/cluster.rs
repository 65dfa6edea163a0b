//! `[cluster]`: the Redis server several replicas share their session
//! locks and login throttles through (and, unless `[oauth]` names its own,
//! their OAuth2 tokens).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::oauth::SecretSource;
use super::ConfigError;

/// Environment variable read for the password when
/// `cluster.redis_password_file` is empty.
pub const REDIS_PASSWORD_ENV: &str = "POPBRIDGE_CLUSTER_REDIS_PASSWORD";

/// Default lease of a session lock: long enough that a renewal every
/// third of it survives a slow Redis, short enough that the account of a
/// replica that died is free again within half a minute.
pub const DEFAULT_LOCK_LEASE_SECS: u64 = 30;
/// The shortest lease: renewals run every third of it.
pub const MIN_LOCK_LEASE_SECS: u64 = 2;

/// Default bound on connecting to Redis and on each command: a login
/// waits at most this long (twice: lock and throttle) before falling back
/// to the per-process state.
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 500;

/// Shared state for several replicas. Empty `redis_url`: none (one
/// process; the lock and throttle live in memory).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `redis://host:port/db` or `rediss://host:port/db` (TLS). No
    /// credentials in the URL (it is logged): see `redis_password_file`.
    pub redis_url: String,
    /// File holding the Redis password (AUTH). Empty: the
    /// `POPBRIDGE_CLUSTER_REDIS_PASSWORD` environment variable, or none.
    pub redis_password_file: String,
    /// For `rediss://`: PEM file of the CA that signed Redis's
    /// certificate. Empty: the system's roots.
    pub redis_ca_file: String,
    /// For `rediss://`: the name Redis's certificate must carry (and the
    /// SNI sent), when it differs from the URL's host (e.g. a URL with an
    /// IP address). Empty: the URL's host.
    pub redis_tls_name: String,
    /// Lease of a session lock, renewed every third of it while the
    /// session lives. A replica that dies holding one frees the account
    /// after at most this long.
    pub lock_lease_secs: u64,
    /// Bound on connecting and on each command, in milliseconds. After a
    /// failure Redis is not asked again for a second (every operation
    /// falls back to the per-process state at once).
    pub redis_timeout_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            redis_url: String::new(),
            redis_password_file: String::new(),
            redis_ca_file: String::new(),
            redis_tls_name: String::new(),
            lock_lease_secs: DEFAULT_LOCK_LEASE_SECS,
            redis_timeout_ms: DEFAULT_REDIS_TIMEOUT_MS,
        }
    }
}

/// Where a Redis server is and how to reach it: what [`crate::cluster`]
/// connects with, for the cluster state or the OAuth2 token store.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisEndpoint {
    /// The URL, without credentials.
    pub url: String,
    /// Where the password comes from.
    pub password: SecretSource,
    /// For `rediss://`: the CA file, or `None` for the system's roots.
    pub ca_file: Option<PathBuf>,
    /// For `rediss://`: the certificate's name when not the URL's host.
    pub tls_name: Option<String>,
    /// Bound on connecting and on each command.
    pub timeout: Duration,
    /// The configuration key prefix, for messages (`cluster` or `oauth`).
    pub section: &'static str,
}

impl ClusterConfig {
    /// Whether shared state is configured.
    pub fn enabled(&self) -> bool {
        !self.redis_url.is_empty()
    }

    /// The Redis server, when configured.
    pub fn endpoint(&self) -> Option<RedisEndpoint> {
        self.enabled().then(|| RedisEndpoint {
            url: self.redis_url.clone(),
            password: if self.redis_password_file.is_empty() {
                SecretSource::Env(REDIS_PASSWORD_ENV.into())
            } else {
                SecretSource::File(PathBuf::from(&self.redis_password_file))
            },
            ca_file: non_empty(&self.redis_ca_file).map(PathBuf::from),
            tls_name: non_empty(&self.redis_tls_name).map(str::to_string),
            timeout: Duration::from_millis(self.redis_timeout_ms),
            section: "cluster",
        })
    }

    /// The lease of a session lock.
    pub fn lock_lease(&self) -> Duration {
        Duration::from_secs(self.lock_lease_secs)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        check_redis_url("cluster", &self.redis_url).map_err(ConfigError)?;
        check_tls_keys(
            "cluster",
            &self.redis_url,
            &self.redis_ca_file,
            &self.redis_tls_name,
        )
        .map_err(ConfigError)?;
        if self.lock_lease_secs < MIN_LOCK_LEASE_SECS {
            return Err(ConfigError(format!(
                "cluster.lock_lease_secs must be at least {MIN_LOCK_LEASE_SECS}"
            )));
        }
        if !(10..=10_000).contains(&self.redis_timeout_ms) {
            return Err(ConfigError(
                "cluster.redis_timeout_ms must be between 10 and 10000".into(),
            ));
        }
        Ok(())
    }
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// `redis://` or `rediss://host[:port][/db]` without credentials
/// (`section` names the configuration section in messages).
pub fn check_redis_url(section: &str, url: &str) -> Result<(), String> {
    if url.is_empty() {
        return Err(format!(
            "{section}.redis_url is empty (redis://host:6379/0 or rediss://host:6379/0)"
        ));
    }
    let parsed = url::Url::parse(url).map_err(|e| {
        format!("{section}.redis_url is not a URL such as redis://host:6379/0: {e}")
    })?;
    if !matches!(parsed.scheme(), "redis" | "rediss") {
        return Err(format!(
            "{section}.redis_url: scheme {:?} is not supported (redis:// or rediss://)",
            parsed.scheme()
        ));
    }
    if parsed.password().is_some() || !parsed.username().is_empty() {
        // Not echoed: the URL holds a password.
        return Err(format!(
            "{section}.redis_url must not contain credentials: put the password in {section}.redis_password_file"
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{section}.redis_url has no host"));
    }
    Ok(())
}

/// The CA file and TLS name make sense with `rediss://` only.
pub fn check_tls_keys(
    section: &str,
    url: &str,
    ca_file: &str,
    tls_name: &str,
) -> Result<(), String> {
    if !url.starts_with("rediss://") && (!ca_file.is_empty() || !tls_name.is_empty()) {
        return Err(format!(
            "{section}.redis_ca_file and {section}.redis_tls_name need a rediss:// URL"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> ClusterConfig {
        ClusterConfig {
            redis_url: url.into(),
            ..ClusterConfig::default()
        }
    }

    #[test]
    fn urls_and_tls_keys_are_checked() {
        assert!(ClusterConfig::default().validate().is_ok());
        assert!(ClusterConfig::default().endpoint().is_none());
        assert!(cfg("redis://127.0.0.1:6379/0").validate().is_ok());
        assert!(cfg("rediss://redis.example:6380").validate().is_ok());
        let e = cfg("redis://:hunter2@127.0.0.1/").validate().unwrap_err();
        assert!(!e.0.contains("hunter2"), "{e}");
        assert!(cfg("http://127.0.0.1/").validate().is_err());
        let mut c = cfg("redis://127.0.0.1/");
        c.redis_ca_file = "/etc/ca.pem".into();
        assert!(c.validate().unwrap_err().0.contains("rediss://"));
        let mut c = cfg("rediss://10.0.0.5/");
        c.redis_tls_name = "redis.internal".into();
        let ep = c.endpoint().unwrap();
        assert_eq!(ep.tls_name.as_deref(), Some("redis.internal"));
        assert_eq!(ep.timeout, Duration::from_millis(500));
        c.lock_lease_secs = 1;
        assert!(c.validate().is_err());
        let mut c = cfg("redis://127.0.0.1/");
        c.redis_timeout_ms = 0;
        assert!(c.validate().is_err());
    }
}
