//! Directory routing: an HTTP service says which IMAP server serves a
//! login no static route matches (`[directory]`).
//!
//! The contract (README, "Directory routing"): `GET <url>?user=<login>&
//! client=<ip>&protocol=pop3`, with `Authorization: Bearer <token>` when a
//! token file is configured; never the password (the IMAP server checks
//! it). 200 with a JSON [`Answer`] routes the login; 404 means no such
//! user (refused like a wrong password); anything else, a timeout or a body
//! that is not a valid answer means "try again later" (`-ERR [SYS/TEMP]`),
//! never a guess at the upstream.
//!
//! Answers, "no such user" included, are cached for `cache_secs` per login
//! name (a lookup failure is not). Routes are laid over the `[upstream]`
//! and `[pop3]` template, and their connectors are shared per backend
//! (server, TLS mode and name, mailbox), so the upstream session pool, the
//! listing cache, the session lock and the throttle see one backend the
//! same way whether a static route or the directory leads there.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tracing::{debug, info, warn};

use super::routing::{Route, RouteBuilder};
use crate::config::{
    check_upstream, DirectoryConfig, DirectorySettings, EffectiveRoute, UpstreamTls,
};
use crate::metrics::metrics;

/// The longest answer read: a route is a few hundred bytes of JSON.
const MAX_ANSWER_BYTES: usize = 16 * 1024;

/// Backends (server, TLS, mailbox) whose connector is kept; more are made
/// again when needed (sessions keep theirs).
const MAX_BACKENDS: u64 = 10_000;

/// What the directory answers with 200 (unknown fields are ignored, so a
/// directory may carry its own).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Answer {
    /// `host:port` of the IMAP server.
    pub address: String,
    /// `implicit`, `starttls` or `none`.
    pub tls: UpstreamTls,
    /// The name the server's certificate must carry; default: the host of
    /// `address`.
    #[serde(default)]
    pub tls_name: Option<String>,
    /// The IMAP login name; default: the POP3 login (shaped by
    /// `[upstream].login`).
    #[serde(default)]
    pub login: Option<String>,
    /// The mailbox; default: `[upstream].mailbox` (INBOX).
    #[serde(default)]
    pub mailbox: Option<String>,
    /// A name for logs.
    #[serde(default)]
    pub route: Option<String>,
}

/// A directory route for one login.
pub struct Found<C> {
    pub route: Arc<Route<C>>,
    /// The IMAP login name the directory gave, if any.
    pub login: Option<String>,
}

/// What a lookup found.
pub enum Lookup<C> {
    Found(Arc<Found<C>>),
    /// 404: no such user.
    NotFound,
    /// The directory could not say.
    Unavailable,
}

/// A cached answer.
enum Cached<C> {
    Found(Arc<Found<C>>),
    NotFound,
}

impl<C> Clone for Cached<C> {
    fn clone(&self) -> Self {
        match self {
            Cached::Found(f) => Cached::Found(f.clone()),
            Cached::NotFound => Cached::NotFound,
        }
    }
}

/// The bearer token; never printed.
struct Token(String);

/// What identifies a backend, and so its connector.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Backend {
    address: String,
    tls: UpstreamTls,
    tls_name: String,
    mailbox: String,
}

/// How the pool scopes of directory backends begin.
pub const POOL_SCOPE_PREFIX: &str = "directory \"";

impl Backend {
    /// The pool scope of its routes: every field, so two backends never
    /// share idle sessions.
    fn scope(&self) -> String {
        format!(
            "directory {:?} {:?} {:?} {:?}",
            self.address, self.tls, self.tls_name, self.mailbox
        )
    }
}

/// The directory client, its answer cache and the backends' connectors.
pub struct Directory<C> {
    http: reqwest::Client,
    url: url::Url,
    token: Option<Token>,
    timeout: Duration,
    /// Answers by login name; `None` when `cache_secs = 0`.
    answers: Option<moka::future::Cache<String, Cached<C>>>,
    connectors: moka::sync::Cache<Backend, Arc<C>>,
    builder: Arc<RouteBuilder<C>>,
    /// `[upstream]` and `[pop3]`, which answers are laid over.
    template: EffectiveRoute,
}

impl<C> std::fmt::Debug for Directory<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory")
            .field("url", &self.url.as_str())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// The HTTP client for `[directory]` (its CA file read) and the token (its
/// file read): what `--check-config` checks and the server builds.
pub fn client(config: &DirectoryConfig) -> Result<(reqwest::Client, Option<String>), String> {
    let timeout = Duration::from_millis(config.timeout_ms);
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        // A directory answers itself; following a redirect could send the
        // token somewhere else.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("popbridge/", env!("CARGO_PKG_VERSION")));
    if !config.ca_file.is_empty() {
        let pem = std::fs::read(&config.ca_file)
            .map_err(|e| format!("directory.ca_file {}: {e}", config.ca_file))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("directory.ca_file {}: {e}", config.ca_file))?;
        if certs.is_empty() {
            return Err(format!(
                "directory.ca_file {}: no certificate",
                config.ca_file
            ));
        }
        builder = builder.tls_built_in_root_certs(false);
        for c in certs {
            builder = builder.add_root_certificate(c);
        }
    }
    let http = builder
        .build()
        .map_err(|e| format!("directory HTTP client: {e}"))?;
    let token = if config.token_file.is_empty() {
        None
    } else {
        let text = std::fs::read_to_string(&config.token_file)
            .map_err(|e| format!("directory.token_file {}: {e}", config.token_file))?;
        let token = text.trim().to_string();
        if token.is_empty() || token.contains(|c: char| c.is_control()) {
            return Err(format!(
                "directory.token_file {}: empty, or not one line",
                config.token_file
            ));
        }
        Some(token)
    };
    Ok((http, token))
}

impl<C: Send + Sync + 'static> Directory<C> {
    /// The directory of a checked `[directory]` section; routes are made
    /// by `builder`.
    pub fn new(
        settings: &DirectorySettings,
        builder: Arc<RouteBuilder<C>>,
    ) -> Result<Self, String> {
        let config = &settings.config;
        let (http, token) = client(config)?;
        let answers = (config.cache_secs > 0).then(|| {
            moka::future::Cache::builder()
                .max_capacity(config.cache_entries)
                .time_to_live(Duration::from_secs(config.cache_secs))
                .build()
        });
        Ok(Self {
            http,
            url: settings.url.clone(),
            token: token.map(Token),
            timeout: Duration::from_millis(config.timeout_ms),
            answers,
            connectors: moka::sync::Cache::new(MAX_BACKENDS),
            builder,
            template: settings.template.clone(),
        })
    }

    /// The configured URL, for logs.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// The route for `login`, from the cache or the directory. Lookups for
    /// one login at the same time ask the directory once.
    pub async fn lookup(&self, login: &str, client: IpAddr) -> Lookup<C> {
        let asked = AtomicBool::new(false);
        let ask = async {
            asked.store(true, Ordering::Relaxed);
            self.ask(login, client).await
        };
        let answer = match &self.answers {
            Some(cache) => cache
                .try_get_with(login.to_string(), ask)
                .await
                .map_err(|_| ()),
            None => ask.await,
        };
        if !asked.load(Ordering::Relaxed) {
            metrics().directory("cached");
        }
        match answer {
            Ok(Cached::Found(f)) => Lookup::Found(f),
            Ok(Cached::NotFound) => Lookup::NotFound,
            Err(()) => Lookup::Unavailable,
        }
    }

    /// One request to the directory, counted and logged.
    async fn ask(&self, login: &str, client: IpAddr) -> Result<Cached<C>, ()> {
        let result = tokio::time::timeout(self.timeout, self.request(login, client)).await;
        let outcome = match result {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
        };
        match outcome {
            Ok(Some(answer)) => match self.route(&answer) {
                Ok(found) => {
                    metrics().directory("hit");
                    info!(
                        user = login,
                        route = %found.route.name,
                        upstream = %answer.address,
                        "directory answer"
                    );
                    Ok(Cached::Found(Arc::new(found)))
                }
                Err(why) => {
                    metrics().directory("error");
                    warn!(user = login, error = %why, "directory answer unusable");
                    Err(())
                }
            },
            Ok(None) => {
                metrics().directory("not_found");
                info!(user = login, "directory: no such user");
                Ok(Cached::NotFound)
            }
            Err(why) => {
                metrics().directory("error");
                warn!(user = login, url = %self.url, error = %why, "directory lookup failed");
                Err(())
            }
        }
    }

    /// The HTTP exchange: `Some(answer)` on 200, `None` on 404.
    async fn request(&self, login: &str, client: IpAddr) -> Result<Option<Answer>, String> {
        let mut url = self.url.clone();
        url.query_pairs_mut()
            .append_pair("user", login)
            .append_pair("client", &client.to_canonical().to_string())
            .append_pair("protocol", "pop3");
        let mut request = self.http.get(url);
        if let Some(Token(t)) = &self.token {
            request = request.bearer_auth(t);
        }
        let mut response = request.send().await.map_err(|e| without_url(&e))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if status != reqwest::StatusCode::OK {
            return Err(format!("HTTP status {status}"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| without_url(&e))? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_ANSWER_BYTES {
                return Err(format!("answer longer than {MAX_ANSWER_BYTES} bytes"));
            }
        }
        let answer =
            serde_json::from_slice(&body).map_err(|e| format!("answer is not valid: {e}"))?;
        Ok(Some(answer))
    }

    /// The route an answer describes, over the backend's shared connector.
    fn route(&self, answer: &Answer) -> Result<Found<C>, String> {
        let effective = laid_over(&self.template, answer)?;
        let up = &effective.upstream;
        let backend = Backend {
            address: up.address.clone(),
            tls: up.tls,
            tls_name: up.tls_name.clone(),
            mailbox: up.mailbox.clone(),
        };
        let connector = self
            .connectors
            .try_get_with(backend.clone(), || {
                debug!(upstream = %up.address, "connector for a directory backend");
                if up.tls == UpstreamTls::None && !is_loopback(&up.address) {
                    warn!(
                        upstream = %up.address,
                        "the directory routes to a server with tls = none: passwords and mail cross the network unencrypted"
                    );
                }
                (self.builder.connector)(&effective).map(Arc::new)
            })
            .map_err(|e| e.to_string())?;
        let route = self
            .builder
            .with_connector(&effective, connector, backend.scope())?;
        Ok(Found {
            route: Arc::new(route),
            login: answer.login.clone(),
        })
    }
}

/// True for `localhost` and loopback addresses.
fn is_loopback(address: &str) -> bool {
    let host = crate::imap::host_of(address);
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A reqwest error without its URL (which holds the login name: that is
/// logged as `user` already).
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "HTTP error"
    };
    let mut text = kind.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The template with the answer's server, TLS and mailbox on top, checked
/// like a configured route.
pub fn laid_over(template: &EffectiveRoute, answer: &Answer) -> Result<EffectiveRoute, String> {
    let mut r = template.clone();
    r.name = match &answer.route {
        Some(name) if !name.is_empty() => name.clone(),
        _ => "directory".into(),
    };
    if let Some(login) = &answer.login {
        if login.is_empty() || login.contains(|c: char| c.is_control()) {
            return Err(format!(
                "login {login:?} is empty or has control characters"
            ));
        }
    }
    let up = &mut r.upstream;
    up.address = answer.address.clone();
    up.tls = answer.tls;
    // The template's name belongs to the template's server.
    up.tls_name = answer.tls_name.clone().unwrap_or_default();
    if let Some(m) = &answer.mailbox {
        up.mailbox = m.clone();
    }
    check_upstream("answer", up).map_err(|e| e.0)?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn template() -> EffectiveRoute {
        Config::from_toml(
            "[upstream]\ntls = \"implicit\"\ntls_name = \"old.example\"\ncommand_timeout_secs = 9\n\
             [directory]\nurl = \"http://127.0.0.1:1/\"",
        )
        .unwrap()
        .directory()
        .unwrap()
        .unwrap()
        .template
    }

    fn answer(json: &str) -> Result<EffectiveRoute, String> {
        let a: Answer = serde_json::from_str(json).map_err(|e| e.to_string())?;
        laid_over(&template(), &a)
    }

    #[test]
    fn answers_are_laid_over_the_template() {
        let r = answer(r#"{"address": "imap1.example:143", "tls": "starttls"}"#).unwrap();
        assert_eq!(r.name, "directory");
        assert_eq!(r.upstream.address, "imap1.example:143");
        assert_eq!(r.upstream.tls, UpstreamTls::Starttls);
        assert_eq!(r.upstream.tls_name, "", "not the template's server name");
        assert_eq!(r.upstream.mailbox, "INBOX");
        assert_eq!(r.upstream.command_timeout_secs, 9, "from the template");
        let r = answer(
            r#"{"address": "10.0.0.2:993", "tls": "implicit", "tls_name": "imap2.example",
                "mailbox": "POP", "route": "pod-2", "login": "u2", "extra": 1}"#,
        )
        .unwrap();
        assert_eq!(r.name, "pod-2");
        assert_eq!(r.upstream.tls_name, "imap2.example");
        assert_eq!(r.upstream.mailbox, "POP");
    }

    #[test]
    fn bad_answers_are_refused() {
        for json in [
            r#"{"tls": "none"}"#,
            r#"{"address": "x:143"}"#,
            r#"{"address": "x:143", "tls": "ssl"}"#,
            r#"{"address": "nohost", "tls": "none"}"#,
            r#"{"address": "x:0", "tls": "none"}"#,
            r#"{"address": "x:143", "tls": "none", "mailbox": ""}"#,
            r#"{"address": "x:143", "tls": "none", "mailbox": "a\r\nb"}"#,
            r#"{"address": "x:143", "tls": "none", "login": ""}"#,
            r#"{"address": "x:143", "tls": "none", "login": "a\nb"}"#,
            "[]",
        ] {
            assert!(answer(json).is_err(), "{json}");
        }
    }

    #[test]
    fn backends_differ_in_every_field() {
        let b = Backend {
            address: "a:143".into(),
            tls: UpstreamTls::None,
            tls_name: String::new(),
            mailbox: "INBOX".into(),
        };
        let mut scopes = std::collections::HashSet::new();
        scopes.insert(b.scope());
        for other in [
            Backend {
                address: "b:143".into(),
                ..b.clone()
            },
            Backend {
                tls: UpstreamTls::Starttls,
                ..b.clone()
            },
            Backend {
                tls_name: "n".into(),
                ..b.clone()
            },
            Backend {
                mailbox: "Other".into(),
                ..b.clone()
            },
        ] {
            assert!(other.scope().starts_with(POOL_SCOPE_PREFIX));
            assert!(scopes.insert(other.scope()), "{other:?}");
        }
    }
}

/// Logins through the directory against an in-process mailbox
/// ([`crate::imap::fake`]) and a directory on a loopback socket.
#[cfg(test)]
mod with_fake_upstream {
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::bridge::pool::Pool;
    use crate::bridge::routing::{ConnectorFactory, Router};
    use crate::bridge::shared_throttle::Throttle;
    use crate::bridge::throttle::ThrottleConfig;
    use crate::bridge::Bridge;
    use crate::config::{Config, RouteIndex};
    use crate::imap::fake::FakeConnector;
    use crate::pop3::command::Secret;

    /// A directory answering `answers` (user → JSON; others 404), counting
    /// requests.
    async fn directory(
        answers: &'static [(&'static str, &'static str)],
    ) -> (u16, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let asked = Arc::new(AtomicUsize::new(0));
        let count = asked.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::Relaxed);
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let query = target.split_once('?').map_or("", |(_, q)| q).to_string();
                let user = url::form_urlencoded::parse(query.as_bytes())
                    .find(|(k, _)| k == "user")
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
                let found = answers.iter().find(|(u, _)| *u == user);
                let (status, body) = match found {
                    Some((_, json)) => ("200 OK", *json),
                    None => ("404 Not Found", ""),
                };
                let reply = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        (port, asked)
    }

    fn bridge(port: u16, up: &FakeConnector, built: Arc<AtomicUsize>) -> Bridge<FakeConnector> {
        let config = Config::from_toml(&format!(
            "[upstream]\ntls = \"none\"\n[directory]\nurl = \"http://127.0.0.1:{port}/\"\n"
        ))
        .unwrap();
        let settings = config.directory().unwrap().unwrap();
        let fake = up.clone();
        let connector: ConnectorFactory<FakeConnector> = Arc::new(move |_| {
            built.fetch_add(1, Ordering::Relaxed);
            Ok(fake.clone())
        });
        let builder = Arc::new(RouteBuilder {
            connector,
            oauth: None,
            map_store: None,
        });
        let directory = Directory::new(&settings, builder).unwrap();
        Bridge {
            router: Router::new(Vec::new(), RouteIndex::default())
                .with_directory(Arc::new(directory)),
            throttle: Throttle::local(ThrottleConfig {
                failure_delay: Duration::from_millis(1),
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
        "192.0.2.7:40000".parse().unwrap()
    }

    /// Two login names the directory sends to one backend under two route
    /// names and one IMAP login: one connector, and the first session's
    /// upstream session serves the second (pooled by backend, not by the
    /// directory's route name); the directory's `login` is the IMAP user.
    #[tokio::test]
    async fn one_backend_shares_a_connector_and_the_pool() {
        static ANSWERS: &[(&str, &str)] = &[
            (
                "home",
                r#"{"address": "fake:143", "tls": "none", "login": "alice", "route": "one"}"#,
            ),
            (
                "work",
                r#"{"address": "fake:143", "tls": "none", "login": "alice", "route": "two"}"#,
            ),
        ];
        let (port, asked) = directory(ANSWERS).await;
        let up = FakeConnector::new(&[("alice", "pw")], &[b"a\r\n"]);
        let built = Arc::new(AtomicUsize::new(0));
        let b = bridge(port, &up, built.clone());
        let pw = Secret::new(b"pw".to_vec());
        let (session, maildrop, _) = b.login("home", &pw, peer()).await.unwrap();
        assert_eq!(maildrop.stat().0, 1);
        assert_eq!(up.state().logins, ["alice"]);
        session.end().await;
        assert_eq!(b.pool.idle(), 1);
        let (session, _, _) = b.login("work", &pw, peer()).await.unwrap();
        assert_eq!(up.state().logins.len(), 1, "the pooled session served it");
        session.end().await;
        assert_eq!(built.load(Ordering::Relaxed), 1, "one connector");
        assert_eq!(asked.load(Ordering::Relaxed), 2);
        // Cached, both answers: no more requests.
        let (session, _, _) = b.login("home", &pw, peer()).await.unwrap();
        session.end().await;
        assert_eq!(asked.load(Ordering::Relaxed), 2);
        // Unknown: refused like a wrong password; the upstream is not asked.
        let r = b.login("nobody", &pw, peer()).await;
        assert_eq!(r.err(), Some(crate::pop3::session::LoginFailure::Refused));
        assert_eq!(up.state().logins.len(), 1);
    }
}
