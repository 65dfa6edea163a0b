//! The one Redis connection code, shared by the OAuth2 token store and the
//! cluster state (session leases, login throttles): `redis://` or
//! `rediss://` (TLS through tokio-rustls with a CA file and a server name,
//! as towards the upstream), a password from a file, and every connect and
//! command bounded by a timeout so a slow or unreachable Redis never hangs
//! a login.
//!
//! TLS is done here rather than by the redis crate's own TLS feature: that
//! one always verifies (and sends as SNI) the URL's host, while operators
//! need a `redis_tls_name` when the URL holds an address, like
//! `upstream.tls_name`. The redis crate runs its protocol over the stream
//! handed to it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::config::cluster::RedisEndpoint;

/// How long Redis is not asked again after a connection failed: every
/// operation in that time fails at once (and falls back), so an outage
/// costs a login nothing, not a timeout each.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The least time between two "Redis unavailable" warnings of one kind.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A Redis error, with the server's URL (never a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("redis {url}: {message}")]
pub struct RedisError {
    pub url: String,
    pub message: String,
}

/// How to reach the server, built once from a [`RedisEndpoint`].
struct Target {
    /// The URL's host (brackets of an IPv6 address removed) and port.
    host: String,
    port: u16,
    /// The TLS connector and the name to verify, for `rediss://`.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Database number and password (AUTH), sent on each new connection.
    info: redis::RedisConnectionInfo,
}

/// A multiplexed Redis connection, opened on first use and again after a
/// failure.
pub struct RedisConn {
    /// The URL (no credentials), for messages.
    url: String,
    /// Bound on connecting and on each command.
    timeout: Duration,
    target: Target,
    /// The open connection and its generation; `None` until first use and
    /// after a failure. An async mutex: connecting happens under it, so
    /// concurrent first uses open one connection.
    conn: Mutex<Option<(MultiplexedConnection, u64)>>,
    /// Counts connections opened, so users can check things once per
    /// connection (the OAuth2 store's key id).
    generation: AtomicU64,
    /// Until when a failed server is not asked again.
    down_until: StdMutex<Option<Instant>>,
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConn")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl RedisConn {
    /// Prepares a connection (reads the password and CA files); nothing is
    /// contacted until first use.
    pub fn new(endpoint: &RedisEndpoint) -> Result<Self, RedisError> {
        let url = endpoint.url.clone();
        let err = |message: String| RedisError {
            url: url.clone(),
            message,
        };
        let parsed = url::Url::parse(&url).map_err(|e| err(e.to_string()))?;
        let tls = match parsed.scheme() {
            "redis" => false,
            "rediss" => true,
            other => return Err(err(format!("scheme {other:?} is not redis or rediss"))),
        };
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| err("no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = parsed.port().unwrap_or(6379);
        let db = match parsed.path().trim_matches('/') {
            "" => 0,
            n => n
                .parse::<i64>()
                .map_err(|_| err(format!("database {n:?} is not a number")))?,
        };
        let password = endpoint
            .password
            .read()
            .map_err(|e| err(format!("{}.redis_password_file: {e}", endpoint.section)))?;
        let tls = if tls {
            let connector = crate::tls::client_connector(endpoint.ca_file.as_deref())
                .map_err(|e| err(e.to_string()))?;
            let name = endpoint.tls_name.clone().unwrap_or_else(|| host.clone());
            let name = ServerName::try_from(name).map_err(|e| err(format!("TLS name: {e}")))?;
            Some((connector, name))
        } else {
            None
        };
        Ok(Self {
            url,
            timeout: endpoint.timeout,
            target: Target {
                host,
                port,
                tls,
                info: redis::RedisConnectionInfo {
                    db,
                    password,
                    ..Default::default()
                },
            },
            conn: Mutex::new(None),
            generation: AtomicU64::new(0),
            down_until: StdMutex::new(None),
        })
    }

    /// The URL, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The bound on one command.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// An error naming this server.
    pub fn error(&self, message: impl std::fmt::Display) -> RedisError {
        RedisError {
            url: self.url.clone(),
            message: message.to_string(),
        }
    }

    /// The current connection and its generation (a number that changes
    /// with each new connection), opening one when there is none.
    pub async fn get(&self) -> Result<(MultiplexedConnection, u64), RedisError> {
        if let Some(until) = *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) {
            if Instant::now() < until {
                return Err(self.error("unavailable (retrying shortly)"));
            }
        }
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        match tokio::time::timeout(self.timeout, self.open()).await {
            Ok(Ok(c)) => {
                let g = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
                *guard = Some((c.clone(), g));
                *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Ok((c, g))
            }
            Ok(Err(e)) => {
                self.mark_down();
                Err(e)
            }
            Err(_) => {
                self.mark_down();
                Err(self.error("connection timed out"))
            }
        }
    }

    fn mark_down(&self) {
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Instant::now() + RETRY_AFTER);
    }

    async fn open(&self) -> Result<MultiplexedConnection, RedisError> {
        let t = &self.target;
        let tcp = TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(|e| self.error(e))?;
        let _ = tcp.set_nodelay(true);
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(self.timeout);
        let (conn, driver) = match &t.tls {
            Some((connector, name)) => {
                let stream = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| self.error(format!("TLS: {e}")))?;
                let (c, d) = MultiplexedConnection::new_with_config(&t.info, stream, config)
                    .await
                    .map_err(|e| self.error(e))?;
                (
                    c,
                    Box::pin(d) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
                )
            }
            None => {
                let (c, d) = MultiplexedConnection::new_with_config(&t.info, tcp, config)
                    .await
                    .map_err(|e| self.error(e))?;
                (
                    c,
                    Box::pin(d) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
                )
            }
        };
        // The driver reads replies; it ends when the connection does.
        tokio::spawn(driver);
        Ok(conn)
    }

    /// Drops the connection of generation `generation` (a failed one), so
    /// the next use opens a new one.
    pub async fn reset(&self, generation: u64) {
        let mut guard = self.conn.lock().await;
        if guard.as_ref().is_some_and(|(_, g)| *g == generation) {
            *guard = None;
        }
    }

    /// Drops the current connection, if any: one opened on a runtime that
    /// is about to end (a start-up check) would be dead afterwards.
    pub async fn disconnect(&self) {
        *self.conn.lock().await = None;
    }

    /// Runs `cmd` within the timeout; a connection that failed is dropped.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        let (mut c, generation) = self.get().await?;
        let r = tokio::time::timeout(self.timeout, cmd.query_async(&mut c)).await;
        self.settle(r, generation).await
    }

    /// Runs `script` with `keys` and `args` within the timeout (EVALSHA,
    /// loading the script when Redis does not know it).
    pub async fn script<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        keys: &[&str],
        args: &[&str],
    ) -> Result<T, RedisError> {
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(*k);
        }
        for a in args {
            inv.arg(*a);
        }
        let (mut c, generation) = self.get().await?;
        let r = tokio::time::timeout(self.timeout, inv.invoke_async(&mut c)).await;
        self.settle(r, generation).await
    }

    async fn settle<T>(
        &self,
        r: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
        generation: u64,
    ) -> Result<T, RedisError> {
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    self.reset(generation).await;
                    self.mark_down();
                }
                Err(self.error(e))
            }
            Err(_) => {
                // A server that does not answer is not asked again for a
                // while: logins must not each wait a timeout.
                self.reset(generation).await;
                self.mark_down();
                Err(self.error("command timed out"))
            }
        }
    }
}

/// Rate-limits one kind of warning: `true` at most once per
/// [`WARN_EVERY`]; counts what it held back.
#[derive(Debug, Default)]
pub struct WarnLimiter {
    /// When the last warning was allowed, and how many were held back since.
    last: StdMutex<Option<(Instant, u64)>>,
}

impl WarnLimiter {
    /// `Some(n)` when a warning may be logged now (`n`: warnings held back
    /// since the last one), `None` when it must be held back.
    pub fn allow(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match *last {
            Some((at, held)) if now.duration_since(at) < WARN_EVERY => {
                *last = Some((at, held + 1));
                None
            }
            Some((_, held)) => {
                *last = Some((now, 0));
                Some(held)
            }
            None => {
                *last = Some((now, 0));
                Some(0)
            }
        }
    }
}

/// A random token (128 bits, hex): a lease's owner.
pub fn random_token() -> String {
    let mut rnd = [0u8; 16];
    // getrandom fails only without an OS random source; a token from the
    // clock is still unique enough to tell two holders apart.
    if getrandom::getrandom(&mut rnd).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        rnd = t.to_le_bytes();
    }
    hex::encode(rnd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::oauth::SecretSource;

    fn endpoint(url: &str) -> RedisEndpoint {
        RedisEndpoint {
            url: url.into(),
            password: SecretSource::Env("POPBRIDGE_TEST_UNSET_VARIABLE".into()),
            ca_file: None,
            tls_name: None,
            timeout: Duration::from_millis(200),
            section: "cluster",
        }
    }

    #[test]
    fn urls_parse_into_targets() {
        let c = RedisConn::new(&endpoint("redis://127.0.0.1:6390/3")).unwrap();
        assert_eq!((c.target.host.as_str(), c.target.port), ("127.0.0.1", 6390));
        assert_eq!(c.target.info.db, 3);
        assert!(c.target.tls.is_none());
        let c = RedisConn::new(&endpoint("redis://[::1]/")).unwrap();
        assert_eq!((c.target.host.as_str(), c.target.port), ("::1", 6379));
        assert!(RedisConn::new(&endpoint("redis://127.0.0.1/x")).is_err());
        assert!(RedisConn::new(&endpoint("http://127.0.0.1/")).is_err());
    }

    /// A refused connection fails fast, and then at once for a while
    /// (never a wait per operation during an outage).
    #[tokio::test]
    async fn an_unreachable_server_fails_fast() {
        // A port nothing listens on: bind one and close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = RedisConn::new(&endpoint(&format!("redis://127.0.0.1:{port}/"))).unwrap();
        let e = c.query::<String>(&redis::cmd("PING")).await.unwrap_err();
        assert!(e.to_string().starts_with("redis redis://127.0.0.1"), "{e}");
        let e = c.query::<String>(&redis::cmd("PING")).await.unwrap_err();
        assert!(e.message.contains("retrying shortly"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn warnings_are_rate_limited() {
        let w = WarnLimiter::default();
        assert_eq!(w.allow(), Some(0));
        assert_eq!(w.allow(), None);
        assert_eq!(w.allow(), None);
        tokio::time::advance(WARN_EVERY).await;
        assert_eq!(w.allow(), Some(2));
    }
}
