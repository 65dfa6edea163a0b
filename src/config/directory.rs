//! `[directory]`: an HTTP service that says which IMAP server serves a
//! login, asked for the logins no static `[[routes]]` entry matches (in
//! the spirit of nginx mail's `auth_http` and Dovecot's proxy passdb).
//!
//! With a directory, `[upstream]` and `[pop3]` are the template of every
//! directory route (timeouts, CA, login mechanism, delete policy, UIDL
//! format, reuse): an answer sets only the server, its TLS mode and name,
//! the mailbox and the upstream login name. `[upstream]` is no longer a
//! route of its own: an unmatched login goes to the directory, never to
//! `[upstream].address`.

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError, EffectiveRoute, RouteConfig, UpstreamAuth};

/// Default for `directory.timeout_ms`: a directory is a local service; two
/// seconds is long for it and short for a POP3 client waiting on PASS.
pub const DEFAULT_TIMEOUT_MS: u64 = 2000;
/// Default for `directory.cache_secs`.
pub const DEFAULT_CACHE_SECS: u64 = 60;
/// Default for `directory.cache_entries`: about 100 bytes each.
pub const DEFAULT_CACHE_ENTRIES: u64 = 100_000;

/// The directory service. Off while `url` is empty.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DirectoryConfig {
    /// `http://` or `https://` URL asked `GET <url>?user=<login>&client=<ip>&protocol=pop3`
    /// for each login no `[[routes]]` entry matches. Empty: no directory
    /// (unmatched logins take the default route).
    pub url: String,
    /// Milliseconds for the whole lookup (connect, request and answer); a
    /// directory slower than this answers the client `-ERR [SYS/TEMP]`.
    pub timeout_ms: u64,
    /// Seconds an answer (a route or "no such user") is remembered. 0: ask
    /// for every login.
    pub cache_secs: u64,
    /// Answers remembered at most (the least used go first).
    pub cache_entries: u64,
    /// File holding a token sent as `Authorization: Bearer <token>`. Empty:
    /// no Authorization header.
    pub token_file: String,
    /// PEM file of CA certificates to trust for an `https://` directory
    /// instead of the system's.
    pub ca_file: String,
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            timeout_ms: DEFAULT_TIMEOUT_MS,
            cache_secs: DEFAULT_CACHE_SECS,
            cache_entries: DEFAULT_CACHE_ENTRIES,
            token_file: String::new(),
            ca_file: String::new(),
        }
    }
}

impl DirectoryConfig {
    /// True when a directory is configured.
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }
}

/// A checked `[directory]`: the URL parsed, and the route every answer is
/// laid over.
#[derive(Debug, Clone)]
pub struct DirectorySettings {
    pub url: url::Url,
    pub config: DirectoryConfig,
    /// `[upstream]` and `[pop3]` as a route: an answer replaces its
    /// address, TLS mode and name, and mailbox.
    pub template: EffectiveRoute,
}

impl Config {
    /// The checked `[directory]` section, or `None` when there is none.
    pub fn directory(&self) -> Result<Option<DirectorySettings>, ConfigError> {
        let d = &self.directory;
        if !d.enabled() {
            return Ok(None);
        }
        let url = url::Url::parse(&d.url)
            .map_err(|e| ConfigError(format!("directory.url {:?} is not a URL: {e}", d.url)))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(ConfigError(format!(
                "directory.url {:?} must be an http:// or https:// URL with a host",
                d.url
            )));
        }
        if url.fragment().is_some() || !url.username().is_empty() || url.password().is_some() {
            return Err(ConfigError(format!(
                "directory.url {:?} must not hold credentials or a #fragment (use directory.token_file)",
                d.url
            )));
        }
        if d.timeout_ms == 0 {
            return Err(ConfigError(
                "directory.timeout_ms must be greater than 0".into(),
            ));
        }
        if d.cache_entries == 0 {
            return Err(ConfigError(
                "directory.cache_entries must be greater than 0".into(),
            ));
        }
        if !d.ca_file.is_empty() && url.scheme() != "https" {
            return Err(ConfigError(
                "directory.ca_file applies to an https:// directory.url only".into(),
            ));
        }
        let template = self.effective(
            "upstream",
            "pop3",
            &RouteConfig {
                name: "directory".into(),
                ..RouteConfig::default()
            },
            false,
        )?;
        if template.upstream.auth != UpstreamAuth::Passthrough {
            return Err(ConfigError(
                "[directory] routes pass the POP3 password on: upstream.auth must be \"passthrough\" (put OAuth2 upstreams in [[routes]])".into(),
            ));
        }
        Ok(Some(DirectorySettings {
            url,
            config: d.clone(),
            template,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(toml: &str) -> Result<Option<DirectorySettings>, String> {
        Config::from_toml(&format!("[upstream]\ntls = \"none\"\n{toml}"))
            .unwrap()
            .directory()
            .map_err(|e| e.0)
    }

    #[test]
    fn off_by_default_and_checked_when_on() {
        assert!(check("").unwrap().is_none());
        let d = check("[directory]\nurl = \"http://127.0.0.1:8080/route\"")
            .unwrap()
            .unwrap();
        assert_eq!(d.config.timeout_ms, 2000);
        assert_eq!(d.config.cache_secs, 60);
        assert_eq!(d.config.cache_entries, 100_000);
        assert_eq!(d.template.pop3.uidl_format, "dovecot");
        for (toml, want) in [
            ("url = \"ftp://x/\"", "http:// or https://"),
            ("url = \"not a url\"", "not a URL"),
            ("url = \"http://u:p@x/\"", "credentials"),
            ("url = \"http://x/\"\ntimeout_ms = 0", "timeout_ms"),
            ("url = \"http://x/\"\ncache_entries = 0", "cache_entries"),
            ("url = \"http://x/\"\nca_file = \"/ca.pem\"", "https://"),
        ] {
            let e = check(&format!("[directory]\n{toml}")).unwrap_err();
            assert!(e.contains(want), "{toml}: {e}");
        }
        let e =
            check("auth = \"oauth2\"\noauth_provider = \"g\"\n[directory]\nurl = \"http://x/\"")
                .unwrap_err();
        assert!(e.contains("upstream.auth"), "{e}");
    }

    /// With a directory, `[upstream]` is a template and not a route: the
    /// routing table holds the `[[routes]]` only, and may be empty.
    #[test]
    fn a_directory_replaces_the_default_route() {
        let c = Config::from_toml(
            "[upstream]\ntls = \"none\"\n[directory]\nurl = \"http://127.0.0.1:1/\"\n\
             [[routes]]\nname = \"a\"\ndomains = [\"a.example\"]\n",
        )
        .unwrap();
        let routes = c.effective_routes().unwrap();
        assert_eq!(routes.len(), 1);
        assert!(!routes[0].is_default);
        let c = Config::from_toml("[directory]\nurl = \"http://127.0.0.1:1/\"").unwrap();
        assert!(c.effective_routes().unwrap().is_empty());
        c.validate().unwrap();
    }
}
