//! The `[oauth]` section: providers and the token store.
//!
//! Secrets (the store key, client secrets, the Redis password) are never
//! written in this file: it names files or environment variables that hold
//! them, and no message built here ever contains their contents.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::cluster::{check_tls_keys, ClusterConfig, RedisEndpoint};
use super::{ConfigError, EffectiveRoute, ProviderSasl, SaslMechanism, UpstreamAuth};

/// Environment variable holding the store key (base64 or hex of 32 bytes)
/// when `oauth.key_file` is empty.
pub const KEY_ENV: &str = "POPBRIDGE_OAUTH_KEY";
/// Environment variable holding the Redis password when
/// `oauth.redis_password_file` is empty.
pub const REDIS_PASSWORD_ENV: &str = "POPBRIDGE_OAUTH_REDIS_PASSWORD";

/// Bound on connecting to the token store's Redis and on each command: a
/// token refresh may wait for it (the cluster state's own bound is
/// shorter, `cluster.redis_timeout_ms`).
pub const OAUTH_REDIS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Prefix of the environment variable holding a provider's client secret
/// when its `client_secret_file` is empty: the provider's name follows,
/// upper-cased, with every character other than a letter or digit as `_`.
pub const CLIENT_SECRET_ENV_PREFIX: &str = "POPBRIDGE_OAUTH_CLIENT_SECRET_";
/// Default for `oauth.refresh_margin_secs`: stop using an access token five
/// minutes before the provider says it expires (clock skew, slow logins).
pub const DEFAULT_REFRESH_MARGIN_SECS: u64 = 300;
/// The store key: 256 bits for ChaCha20-Poly1305 (RFC 8439 §2.8).
pub const KEY_LEN: usize = 32;

/// OAuth2 providers and where tokens are kept.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OauthConfig {
    /// File holding the key that encrypts tokens at rest: 32 random bytes
    /// written as base64 or hex (`popbridge oauth generate-key --output
    /// FILE`). Empty: the `POPBRIDGE_OAUTH_KEY` environment variable. A
    /// missing or short key is a startup error when any route uses `auth =
    /// "oauth2"`; so is a file that every user may read or write (unless
    /// `allow_world_readable_key`). A file its group may read is accepted
    /// with a warning.
    pub key_file: String,
    /// Accept a `key_file` that every user of the host may read or write,
    /// with a warning (e.g. a single-user container whose secret mounts
    /// cannot be made private). Default false: such a file stops popbridge.
    pub allow_world_readable_key: bool,
    /// Where refresh tokens and device logins live: `file` (under
    /// `<data.dir>/oauth/`) or `redis` (shared by several replicas).
    pub store: StoreKind,
    /// For `store = "redis"`: `redis://host:port/db` or `rediss://` (TLS).
    /// No password here: use `redis_password_file` (so the URL can be
    /// logged). Empty: the `[cluster]` Redis (`cluster.redis_url` and its
    /// password, CA and TLS name).
    pub redis_url: String,
    /// For `store = "redis"`: file holding the Redis password (AUTH). Empty:
    /// the `POPBRIDGE_OAUTH_REDIS_PASSWORD` environment variable, or none.
    pub redis_password_file: String,
    /// For a `rediss://` `redis_url`: PEM file of the CA that signed
    /// Redis's certificate. Empty: the system's roots.
    pub redis_ca_file: String,
    /// For a `rediss://` `redis_url`: the name Redis's certificate must
    /// carry, when it is not the URL's host.
    pub redis_tls_name: String,
    /// Seconds before the provider's expiry at which an access token stops
    /// being used and is refreshed (at most half its lifetime).
    pub refresh_margin_secs: u64,
    /// The OAuth2 providers routes can name with `oauth_provider`.
    pub providers: Vec<ProviderConfig>,
}

impl Default for OauthConfig {
    fn default() -> Self {
        Self {
            key_file: String::new(),
            allow_world_readable_key: false,
            store: StoreKind::File,
            redis_url: String::new(),
            redis_password_file: String::new(),
            redis_ca_file: String::new(),
            redis_tls_name: String::new(),
            refresh_margin_secs: DEFAULT_REFRESH_MARGIN_SECS,
            providers: Vec::new(),
        }
    }
}

/// Token store backend.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Files under `<data.dir>/oauth/`, written atomically.
    #[default]
    File,
    /// A Redis server shared by several popbridge replicas.
    Redis,
}

/// A provider's defaults.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// Gmail and Google Workspace.
    Google,
    /// Microsoft 365 and Outlook.com (Entra ID v2.0 endpoints).
    Microsoft,
    /// Any RFC 6749 server: endpoints given explicitly.
    #[default]
    Generic,
}

/// One `[[oauth.providers]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// The name routes use in `oauth_provider`.
    pub name: String,
    /// `google`, `microsoft` or `generic`: the defaults for the keys below.
    pub preset: Preset,
    /// The OAuth2 client (application) id registered with the provider.
    pub client_id: String,
    /// File holding the client secret. Empty: the environment variable
    /// `POPBRIDGE_OAUTH_CLIENT_SECRET_<NAME>`, or none (public clients).
    pub client_secret_file: String,
    /// Microsoft: the directory (tenant) id or `common`, `organizations`,
    /// `consumers`. Default `common`.
    pub tenant: String,
    /// RFC 8628 device authorization endpoint. Empty: the preset's.
    pub device_authorization_url: String,
    /// RFC 6749 §3.1 authorization endpoint (browser flow). Empty: the
    /// preset's.
    pub authorization_url: String,
    /// RFC 6749 §3.2 token endpoint. Required for `generic`.
    pub token_url: String,
    /// RFC 7009 revocation endpoint. Empty: the preset's, or none.
    pub revocation_url: String,
    /// Scopes to request. Empty: the preset's.
    pub scopes: Vec<String>,
    /// SASL mechanism for IMAP: `xoauth2` or `oauthbearer`. Empty: the
    /// preset's (`xoauth2` for google and microsoft, `oauthbearer` for
    /// generic).
    pub mechanism: Option<SaslMechanism>,
    /// Send the SASL initial response after the server's `+` instead of with
    /// the AUTHENTICATE command. Empty: the preset's (true for microsoft).
    pub two_step: Option<bool>,
}

/// A provider with its preset applied and its URLs checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Provider {
    pub name: String,
    pub preset: Preset,
    pub client_id: String,
    /// Where the client secret comes from (read when needed).
    pub client_secret: SecretSource,
    pub device_authorization_url: Option<String>,
    pub authorization_url: Option<String>,
    pub token_url: String,
    pub revocation_url: Option<String>,
    pub scopes: Vec<String>,
    pub sasl: ProviderSasl,
    /// Extra query parameters for the authorization URL (Google needs
    /// `access_type=offline` and `prompt=consent` to issue a refresh token).
    pub extra_auth_params: Vec<(&'static str, &'static str)>,
    /// Repeat the scopes when refreshing (RFC 6749 §6 allows it; the
    /// Microsoft identity platform v2.0 expects them).
    pub scope_on_refresh: bool,
}

/// A preset's endpoints and SASL settings.
struct PresetDefaults {
    device: Option<String>,
    auth: Option<String>,
    token: Option<String>,
    revoke: Option<String>,
    scopes: Vec<String>,
    mechanism: SaslMechanism,
    two_step: bool,
    extra: Vec<(&'static str, &'static str)>,
}

/// Where a secret is read from. Its `Debug` shows the source, never the
/// value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

impl SecretSource {
    /// Reads the secret, trimmed; `Ok(None)` when an environment variable
    /// is unset or the file is empty. Errors name the source, never the
    /// contents.
    pub fn read(&self) -> Result<Option<String>, String> {
        match self {
            SecretSource::File(p) => std::fs::read_to_string(p)
                .map(|s| Some(s.trim().to_string()).filter(|s| !s.is_empty()))
                .map_err(|e| format!("cannot read {}: {e}", p.display())),
            SecretSource::Env(var) => Ok(std::env::var(var)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())),
        }
    }

    /// For messages: the file or variable name.
    pub fn describe(&self) -> String {
        match self {
            SecretSource::File(p) => p.display().to_string(),
            SecretSource::Env(v) => format!("${v}"),
        }
    }
}

impl Provider {
    /// The preset's endpoints under explicit settings.
    pub fn resolve(p: &ProviderConfig) -> Result<Provider, ConfigError> {
        let at = format!("oauth.providers ({})", p.name);
        if p.name.is_empty() || p.name.contains(|c: char| c.is_whitespace() || c == ':') {
            return Err(ConfigError(format!(
                "oauth.providers: name {:?} must be non-empty, without spaces or ':'",
                p.name
            )));
        }
        if p.client_id.is_empty() {
            return Err(ConfigError(format!("{at}.client_id is empty")));
        }
        let tenant = if p.tenant.is_empty() {
            "common"
        } else {
            p.tenant.as_str()
        };
        if p.preset != Preset::Microsoft && !p.tenant.is_empty() {
            return Err(ConfigError(format!(
                "{at}.tenant is only for preset = \"microsoft\""
            )));
        }
        if !tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(ConfigError(format!(
                "{at}.tenant {tenant:?} is not a tenant id or domain"
            )));
        }
        let ms = |ep: &str| format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/{ep}");
        // Presets: Google's "Using OAuth 2.0 for Web Server / Installed
        // Applications" and "OAuth 2.0 for TV and Limited-Input Device
        // Applications"; Microsoft's "Authenticate an IMAP, POP or SMTP
        // connection using OAuth" (scope IMAP.AccessAsUser.All on the
        // outlook.office.com resource, plus offline_access for a refresh
        // token). Microsoft has no RFC 7009 revocation endpoint.
        let d = match p.preset {
            Preset::Google => PresetDefaults {
                device: Some("https://oauth2.googleapis.com/device/code".into()),
                auth: Some("https://accounts.google.com/o/oauth2/v2/auth".into()),
                token: Some("https://oauth2.googleapis.com/token".into()),
                revoke: Some("https://oauth2.googleapis.com/revoke".into()),
                scopes: vec!["https://mail.google.com/".into()],
                mechanism: SaslMechanism::XOauth2,
                two_step: false,
                extra: vec![("access_type", "offline"), ("prompt", "consent")],
            },
            Preset::Microsoft => PresetDefaults {
                device: Some(ms("devicecode")),
                auth: Some(ms("authorize")),
                token: Some(ms("token")),
                revoke: None,
                scopes: vec![
                    "https://outlook.office.com/IMAP.AccessAsUser.All".into(),
                    "offline_access".into(),
                ],
                mechanism: SaslMechanism::XOauth2,
                two_step: true,
                extra: Vec::new(),
            },
            Preset::Generic => PresetDefaults {
                device: None,
                auth: None,
                token: None,
                revoke: None,
                scopes: Vec::new(),
                mechanism: SaslMechanism::OauthBearer,
                two_step: false,
                extra: Vec::new(),
            },
        };
        let PresetDefaults {
            device,
            auth,
            token,
            revoke,
            scopes,
            mechanism: mech,
            two_step,
            extra,
        } = d;
        let pick = |explicit: &str, preset: Option<String>| {
            if explicit.is_empty() {
                preset
            } else {
                Some(explicit.to_string())
            }
        };
        let device = pick(&p.device_authorization_url, device);
        let auth = pick(&p.authorization_url, auth);
        let revoke = pick(&p.revocation_url, revoke);
        let token = pick(&p.token_url, token).ok_or_else(|| {
            ConfigError(format!(
                "{at}.token_url is required for preset = \"generic\""
            ))
        })?;
        for (key, url) in [
            ("device_authorization_url", device.as_deref()),
            ("authorization_url", auth.as_deref()),
            ("token_url", Some(token.as_str())),
            ("revocation_url", revoke.as_deref()),
        ] {
            if let Some(url) = url {
                check_endpoint(url).map_err(|e| ConfigError(format!("{at}.{key}: {e}")))?;
            }
        }
        let scopes = if p.scopes.is_empty() {
            scopes
        } else {
            p.scopes.clone()
        };
        // RFC 6749 §3.3: scope tokens are %x21 / %x23-5B / %x5D-7E.
        for s in &scopes {
            if s.is_empty()
                || !s
                    .bytes()
                    .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
            {
                return Err(ConfigError(format!(
                    "{at}.scopes: {s:?} is not a valid scope token (RFC 6749 §3.3)"
                )));
            }
        }
        let mechanism = p.mechanism.unwrap_or(mech);
        if !mechanism.is_bearer() {
            return Err(ConfigError(format!(
                "{at}.mechanism must be \"xoauth2\" or \"oauthbearer\""
            )));
        }
        let client_secret = if p.client_secret_file.is_empty() {
            SecretSource::Env(client_secret_env(&p.name))
        } else {
            SecretSource::File(PathBuf::from(&p.client_secret_file))
        };
        Ok(Provider {
            name: p.name.clone(),
            preset: p.preset,
            client_id: p.client_id.clone(),
            client_secret,
            device_authorization_url: device,
            authorization_url: auth,
            token_url: token,
            revocation_url: revoke,
            scopes,
            sasl: ProviderSasl {
                mechanism,
                two_step: p.two_step.unwrap_or(two_step),
            },
            extra_auth_params: extra,
            scope_on_refresh: p.preset == Preset::Microsoft,
        })
    }

    /// The scopes as one space-separated parameter (RFC 6749 §3.3).
    pub fn scope_param(&self) -> String {
        self.scopes.join(" ")
    }
}

/// `POPBRIDGE_OAUTH_CLIENT_SECRET_<NAME>` for a provider name.
pub fn client_secret_env(name: &str) -> String {
    let suffix: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{CLIENT_SECRET_ENV_PREFIX}{suffix}")
}

/// Endpoints must be https, except http on a loopback host (a local test
/// server): tokens and client secrets travel in these requests.
pub fn check_endpoint(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("credentials in an endpoint URL are not allowed".into());
    }
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if is_loopback_host(&parsed) => Ok(()),
        "http" => Err(format!(
            "{url:?}: http:// is only allowed for loopback hosts (127.0.0.1, ::1, localhost); use https://"
        )),
        s => Err(format!("{url:?}: scheme {s:?} is not https")),
    }
}

fn is_loopback_host(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// The store key, as loaded from its file or variable.
pub struct KeyMaterial(pub [u8; KEY_LEN]);

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyMaterial(***)")
    }
}

/// Decodes a key written as base64 (standard or URL-safe, padded or not) or
/// hex. Errors never contain the text.
pub fn parse_key(text: &str) -> Result<KeyMaterial, String> {
    use base64::Engine;
    let t = text.trim();
    let decoded = if t.len() == 2 * KEY_LEN && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(t).ok()
    } else {
        [
            &base64::engine::general_purpose::STANDARD,
            &base64::engine::general_purpose::STANDARD_NO_PAD,
            &base64::engine::general_purpose::URL_SAFE,
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ]
        .iter()
        .find_map(|e| e.decode(t).ok())
    };
    match decoded {
        Some(bytes) if bytes.len() == KEY_LEN => {
            let mut k = [0u8; KEY_LEN];
            k.copy_from_slice(&bytes);
            Ok(KeyMaterial(k))
        }
        Some(bytes) => Err(format!(
            "the key is {} bytes; it must be {KEY_LEN} random bytes (openssl rand -base64 32)",
            bytes.len()
        )),
        None => Err(format!(
            "the key is neither base64 nor hex; write {KEY_LEN} random bytes as base64 (openssl rand -base64 32)"
        )),
    }
}

/// Who besides its owner may read or write a key file, by its mode bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFileExposure {
    /// Owner only (0600, 0400).
    Private,
    /// Its group may read or write it (e.g. 0640; Kubernetes secret volumes
    /// with `fsGroup` are 0440).
    Group,
    /// Every user may read or write it (e.g. 0644, what `generate-key >
    /// FILE` makes under umask 022).
    World,
}

impl KeyFileExposure {
    /// From a Unix mode (`st_mode`).
    pub fn of_mode(mode: u32) -> Self {
        if mode & 0o006 != 0 {
            KeyFileExposure::World
        } else if mode & 0o060 != 0 {
            KeyFileExposure::Group
        } else {
            KeyFileExposure::Private
        }
    }
}

/// The warning for a key file at `path` with `mode` and group `file_gid`
/// read by a process whose effective group is `own_gid`. A file only its
/// group may read is popbridge's own business when that group is
/// popbridge's own (a service user's private group; Kubernetes'
/// `runAsGroup`/`fsGroup`, whose secret volumes cannot be 0400 for a
/// non-root user): no warning then.
fn key_file_warning(
    path: &str,
    mode: u32,
    file_gid: Option<u32>,
    own_gid: Option<u32>,
) -> Option<String> {
    let who = match KeyFileExposure::of_mode(mode) {
        KeyFileExposure::Private => return None,
        KeyFileExposure::Group if file_gid.is_some() && file_gid == own_gid => return None,
        KeyFileExposure::Group => match file_gid {
            Some(gid) => format!("its group (gid {gid}, not popbridge's own)"),
            None => "its group".into(),
        },
        KeyFileExposure::World => "every user (allowed by oauth.allow_world_readable_key)".into(),
    };
    Some(format!(
        "oauth.key_file {path} is readable or writable by {who} (mode {:04o}); the key decrypts every stored refresh token: make sure no other user can read it (chmod 600, owned by popbridge's user)",
        mode & 0o7777
    ))
}

/// This process's effective group id: the group of `/proc/self` (Linux;
/// `None` elsewhere, and then every group-readable key file is warned
/// about).
fn own_gid() -> Option<u32> {
    #[cfg(unix)]
    {
        std::fs::metadata("/proc/self")
            .ok()
            .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
    }
    #[cfg(not(unix))]
    None
}

/// The mode of an open file, as a Unix mode (`None` elsewhere).
fn file_mode(meta: &std::fs::Metadata) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some(meta.mode())
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        None
    }
}

impl OauthConfig {
    /// Loads the store key from `key_file` or `POPBRIDGE_OAUTH_KEY`. A key
    /// file every user may read or write is refused (see
    /// [`KeyFileExposure`]) unless `allow_world_readable_key`.
    pub fn load_key(&self) -> Result<KeyMaterial, String> {
        if self.key_file.is_empty() {
            let v = std::env::var(KEY_ENV).map_err(|_| {
                format!("no token store key: set oauth.key_file or the {KEY_ENV} environment variable (32 random bytes, base64: popbridge oauth generate-key)")
            })?;
            parse_key(&v).map_err(|e| format!("{KEY_ENV}: {e}"))
        } else {
            use std::io::Read;
            let at = || format!("oauth.key_file {}", self.key_file);
            let mut file =
                std::fs::File::open(&self.key_file).map_err(|e| format!("{}: {e}", at()))?;
            // The mode of the file read, not of the path looked up again.
            let meta = file.metadata().map_err(|e| format!("{}: {e}", at()))?;
            if let Some(mode) = file_mode(&meta) {
                if KeyFileExposure::of_mode(mode) == KeyFileExposure::World
                    && !self.allow_world_readable_key
                {
                    return Err(format!(
                        "{} is readable or writable by every user (mode {:04o}): it decrypts every stored refresh token. Make it private (chmod 600 {}, owned by popbridge's user), or set oauth.allow_world_readable_key = true where no other user can reach it",
                        at(),
                        mode & 0o7777,
                        self.key_file
                    ));
                }
            }
            let mut text = String::new();
            file.read_to_string(&mut text)
                .map_err(|e| format!("{}: {e}", at()))?;
            parse_key(&text).map_err(|e| format!("{}: {e}", at()))
        }
    }

    /// A warning about `key_file`'s permissions that does not stop
    /// popbridge: readable by a group other than popbridge's own, or by
    /// everyone where `allow_world_readable_key` accepts it. `None` for a
    /// private file, no file, or one that cannot be read (that is
    /// [`OauthConfig::load_key`]'s error).
    pub fn key_file_warning(&self) -> Option<String> {
        if self.key_file.is_empty() {
            return None;
        }
        let meta = std::fs::metadata(&self.key_file).ok()?;
        let mode = file_mode(&meta)?;
        #[cfg(unix)]
        let file_gid = Some(std::os::unix::fs::MetadataExt::gid(&meta));
        #[cfg(not(unix))]
        let file_gid = None;
        key_file_warning(&self.key_file, mode, file_gid, own_gid())
    }

    /// Where the Redis password comes from.
    pub fn redis_password_source(&self) -> SecretSource {
        if self.redis_password_file.is_empty() {
            SecretSource::Env(REDIS_PASSWORD_ENV.into())
        } else {
            SecretSource::File(PathBuf::from(&self.redis_password_file))
        }
    }

    /// The Redis server of `store = "redis"`: `oauth.redis_*` when
    /// `oauth.redis_url` is set (as before `[cluster]` existed), else the
    /// `[cluster]` one; `None` when neither is set.
    pub fn redis_endpoint(&self, cluster: &ClusterConfig) -> Option<RedisEndpoint> {
        if self.redis_url.is_empty() {
            return cluster.endpoint().map(|mut e| {
                // Token refreshes wait for the store: the OAuth2 store's
                // own, longer bound.
                e.timeout = e.timeout.max(OAUTH_REDIS_TIMEOUT);
                e
            });
        }
        Some(RedisEndpoint {
            url: self.redis_url.clone(),
            password: self.redis_password_source(),
            ca_file: (!self.redis_ca_file.is_empty()).then(|| PathBuf::from(&self.redis_ca_file)),
            tls_name: (!self.redis_tls_name.is_empty()).then(|| self.redis_tls_name.clone()),
            timeout: OAUTH_REDIS_TIMEOUT,
            section: "oauth",
        })
    }

    /// The file store's directory: `<data.dir>/oauth`.
    pub fn store_dir(data_dir: &str) -> Option<PathBuf> {
        (!data_dir.is_empty()).then(|| Path::new(data_dir).join("oauth"))
    }

    /// Every provider, resolved.
    pub fn resolved_providers(&self) -> Result<Vec<Provider>, ConfigError> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for p in &self.providers {
            let r = Provider::resolve(p)?;
            if !seen.insert(r.name.clone()) {
                return Err(ConfigError(format!(
                    "oauth.providers: {:?} is defined twice",
                    r.name
                )));
            }
            out.push(r);
        }
        Ok(out)
    }

    /// A provider by name.
    pub fn provider(&self, name: &str) -> Result<Provider, ConfigError> {
        let p = self
            .providers
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.providers.iter().map(|p| p.name.as_str()).collect();
                ConfigError(format!(
                    "no [[oauth.providers]] entry named {name:?} (defined: {names:?})"
                ))
            })?;
        Provider::resolve(p)
    }

    /// Checks the section against the routes, without reading any file:
    /// every oauth2 route names a defined provider, the providers resolve,
    /// the store is described completely. Messages name keys and files,
    /// never secrets. [`OauthConfig::check_secrets`] reads them.
    pub fn validate(
        &self,
        routes: &[EffectiveRoute],
        data_dir: &str,
        cluster: &ClusterConfig,
    ) -> Result<(), ConfigError> {
        let providers = self.resolved_providers()?;
        let mut any = false;
        for r in routes {
            if r.upstream.auth != UpstreamAuth::Oauth2 {
                continue;
            }
            any = true;
            let name = &r.upstream.oauth_provider;
            if name.is_empty() {
                return Err(ConfigError(format!(
                    "route {:?}: auth = \"oauth2\" needs oauth_provider (an [[oauth.providers]] name)",
                    r.name
                )));
            }
            if !providers.iter().any(|p| &p.name == name) {
                return Err(ConfigError(format!(
                    "route {:?}: oauth_provider {name:?} is not defined in [[oauth.providers]]",
                    r.name
                )));
            }
        }
        match self.store {
            StoreKind::File => {}
            StoreKind::Redis if self.redis_url.is_empty() && cluster.enabled() => {}
            StoreKind::Redis => {
                check_redis_url(&self.redis_url).map_err(ConfigError)?;
                check_tls_keys(
                    "oauth",
                    &self.redis_url,
                    &self.redis_ca_file,
                    &self.redis_tls_name,
                )
                .map_err(ConfigError)?;
            }
        }
        if !any {
            return Ok(());
        }
        if self.store == StoreKind::File && data_dir.is_empty() {
            return Err(ConfigError(
                "oauth.store = \"file\" needs data.dir (tokens are kept under <data.dir>/oauth/)"
                    .into(),
            ));
        }
        if self.refresh_margin_secs > 3600 {
            return Err(ConfigError(
                "oauth.refresh_margin_secs must be at most 3600 (access tokens often live one hour)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Reads what [`OauthConfig::validate`] only names, when any route uses
    /// OAuth2: the store key loads, and the Redis password and client
    /// secret files (when files are named) can be read.
    pub fn check_secrets(&self, routes: &[EffectiveRoute]) -> Result<(), ConfigError> {
        if !routes
            .iter()
            .any(|r| r.upstream.auth == UpstreamAuth::Oauth2)
        {
            return Ok(());
        }
        self.load_key().map_err(ConfigError)?;
        if let SecretSource::File(_) = self.redis_password_source() {
            if self.store == StoreKind::Redis {
                self.redis_password_source()
                    .read()
                    .map_err(|e| ConfigError(format!("oauth.redis_password_file: {e}")))?;
            }
        }
        for p in &self.resolved_providers()? {
            if let SecretSource::File(_) = p.client_secret {
                p.client_secret.read().map_err(|e| {
                    ConfigError(format!(
                        "oauth.providers ({}).client_secret_file: {e}",
                        p.name
                    ))
                })?;
            }
        }
        Ok(())
    }
}

/// `redis://` or `rediss://host[:port][/db]` without credentials.
pub fn check_redis_url(url: &str) -> Result<(), String> {
    if url.is_empty() {
        return Err(
            "oauth.store = \"redis\" needs oauth.redis_url (redis://host:6379/0) or cluster.redis_url"
                .into(),
        );
    }
    super::cluster::check_redis_url("oauth", url)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn provider(toml_text: &str) -> Result<Provider, ConfigError> {
        let p: ProviderConfig = toml::from_str(toml_text).unwrap();
        Provider::resolve(&p)
    }

    #[test]
    fn presets_fill_endpoints_scopes_and_sasl() {
        let g = provider("name = \"g\"\npreset = \"google\"\nclient_id = \"x\"").unwrap();
        assert_eq!(g.token_url, "https://oauth2.googleapis.com/token");
        assert_eq!(
            g.device_authorization_url.as_deref(),
            Some("https://oauth2.googleapis.com/device/code")
        );
        assert_eq!(g.scopes, vec!["https://mail.google.com/"]);
        assert_eq!(g.sasl.mechanism, SaslMechanism::XOauth2);
        assert!(!g.sasl.two_step);
        let m = provider("name = \"m\"\npreset = \"microsoft\"\nclient_id = \"x\"\ntenant = \"contoso.onmicrosoft.com\"").unwrap();
        assert_eq!(
            m.token_url,
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert!(m.scope_param().contains("IMAP.AccessAsUser.All"));
        assert!(m.scope_param().contains("offline_access"));
        assert!(m.sasl.two_step);
        assert!(m.scope_on_refresh && !g.scope_on_refresh);
        assert_eq!(m.revocation_url, None);
        let m2 = provider("name = \"m\"\npreset = \"microsoft\"\nclient_id = \"x\"").unwrap();
        assert!(m2.token_url.contains("/common/"));
    }

    #[test]
    fn generic_needs_a_token_url_and_https_off_loopback() {
        let e = provider("name = \"x\"\nclient_id = \"c\"").unwrap_err();
        assert!(e.0.contains("token_url"), "{e}");
        let e = provider(
            "name = \"x\"\nclient_id = \"c\"\ntoken_url = \"http://oauth.example.org/token\"",
        )
        .unwrap_err();
        assert!(e.0.contains("loopback"), "{e}");
        for ok in [
            "http://127.0.0.1:8080/token",
            "http://[::1]:9/t",
            "http://localhost/t",
            "https://oauth.example.org/token",
        ] {
            let p = provider(&format!(
                "name = \"x\"\nclient_id = \"c\"\ntoken_url = \"{ok}\""
            ))
            .unwrap();
            assert_eq!(p.sasl.mechanism, SaslMechanism::OauthBearer);
        }
        let e = provider("name = \"x\"\nclient_id = \"c\"\ntoken_url = \"https://u:secretpw@h/t\"")
            .unwrap_err();
        assert!(!e.0.contains("secretpw"), "{e}");
        let e = provider(
            "name = \"x\"\nclient_id = \"c\"\ntoken_url = \"https://h/t\"\nscopes = [\"a b\"]",
        )
        .unwrap_err();
        assert!(e.0.contains("scope"), "{e}");
    }

    #[test]
    fn keys_parse_as_base64_or_hex_and_short_keys_are_refused() {
        let k = [7u8; 32];
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(k);
        assert_eq!(parse_key(&format!("{b64}\n")).unwrap().0, k);
        assert_eq!(parse_key(&hex::encode(k)).unwrap().0, k);
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 16]);
        let e = parse_key(&short).unwrap_err();
        assert!(e.contains("16 bytes") && !e.contains(&short), "{e}");
        let e = parse_key("not a key at all!").unwrap_err();
        assert!(!e.contains("not a key"), "{e}");
    }

    fn config(extra: &str) -> Config {
        Config::from_toml(&format!(
            "[upstream]\ntls = \"none\"\nauth = \"oauth2\"\noauth_provider = \"p\"\n{extra}"
        ))
        .unwrap()
    }

    /// What `--check-config` checks of the section: validation, then the
    /// secrets it names.
    fn check(c: Config) -> Result<(), ConfigError> {
        let v = c.validate()?;
        c.oauth.check_secrets(&v.routes)
    }

    #[test]
    fn validation_names_the_problem_without_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, hex::encode([9u8; 32])).unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "c2VjcmV0LWJ1dC1zaG9ydA==").unwrap();
        set_mode(&key, 0o600);
        set_mode(&short, 0o600);
        let providers = "[[oauth.providers]]\nname = \"p\"\nclient_id = \"c\"\ntoken_url = \"http://127.0.0.1:1/t\"\n";
        let good = format!(
            "[data]\ndir = \"{}\"\n[oauth]\nkey_file = \"{}\"\n{providers}",
            dir.path().display(),
            key.display()
        );
        check(config(&good)).unwrap();
        // Unknown provider.
        let e = Config::from_toml(&good.replace("name = \"p\"", "name = \"q\""))
            .and_then(|c| {
                let mut c = c;
                c.upstream.auth = UpstreamAuth::Oauth2;
                c.upstream.oauth_provider = "p".into();
                c.upstream.tls = crate::config::UpstreamTls::None;
                check(c)
            })
            .unwrap_err();
        assert!(e.0.contains("\"p\" is not defined"), "{e}");
        // Short key: named, not echoed.
        let e = check(config(
            &good.replace(&key.display().to_string(), &short.display().to_string()),
        ))
        .unwrap_err();
        assert!(e.0.contains("key_file") && !e.0.contains("c2VjcmV0"), "{e}");
        // No data dir.
        let e = check(config(&format!(
            "[oauth]\nkey_file = \"{}\"\n{providers}",
            key.display()
        )))
        .unwrap_err();
        assert!(e.0.contains("data.dir"), "{e}");
        // Redis URL with a password is refused and not echoed.
        let e = check(config(&format!("{good}\n").replace(
            "[oauth]\n",
            "[oauth]\nstore = \"redis\"\nredis_url = \"redis://:hunter2@127.0.0.1/\"\n",
        )))
        .unwrap_err();
        assert!(
            e.0.contains("credentials") && !e.0.contains("hunter2"),
            "{e}"
        );
    }

    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn key_file_modes() {
        use KeyFileExposure::*;
        for (mode, want) in [
            (0o100600, Private),
            (0o400, Private),
            (0o700, Private),
            (0o640, Group),
            (0o620, Group),
            (0o440, Group),
            (0o644, World),
            (0o604, World),
            (0o602, World),
            (0o666, World),
        ] {
            assert_eq!(KeyFileExposure::of_mode(mode), want, "{mode:o}");
        }
    }

    /// A key file everyone may read stops popbridge unless allowed; one its
    /// group may read only warns; a private one neither.
    #[test]
    fn world_readable_key_files_are_refused_group_readable_warned() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, hex::encode([9u8; 32])).unwrap();
        let mut oauth = OauthConfig {
            key_file: key.display().to_string(),
            ..OauthConfig::default()
        };
        set_mode(&key, 0o600);
        assert!(oauth.load_key().is_ok());
        assert_eq!(oauth.key_file_warning(), None);
        set_mode(&key, 0o640);
        assert!(oauth.load_key().is_ok());
        // Readable by a group other than popbridge's: a warning; by its
        // own group (e.g. Kubernetes' fsGroup): nothing to warn about.
        let w = key_file_warning("/k", 0o100640, Some(4), Some(7)).unwrap();
        assert!(
            w.contains("group") && w.contains("0640") && w.contains("gid 4"),
            "{w}"
        );
        assert_eq!(key_file_warning("/k", 0o100440, Some(7), Some(7)), None);
        assert!(key_file_warning("/k", 0o100440, Some(7), None).is_some());
        assert_eq!(key_file_warning("/k", 0o100400, Some(4), Some(7)), None);
        set_mode(&key, 0o644);
        let e = oauth.load_key().unwrap_err();
        assert!(
            e.contains("every user") && e.contains("0644") && e.contains("chmod 600"),
            "{e}"
        );
        assert!(e.contains("allow_world_readable_key"), "{e}");
        assert!(!e.contains(&hex::encode([9u8; 32])), "{e}");
        oauth.allow_world_readable_key = true;
        assert!(oauth.load_key().is_ok());
        let w = oauth.key_file_warning().unwrap();
        assert!(w.contains("every user"), "{w}");
    }

    #[test]
    fn unused_oauth_section_needs_no_key() {
        let c = Config::from_toml("[upstream]\ntls = \"none\"\n[[oauth.providers]]\nname = \"g\"\npreset = \"google\"\nclient_id = \"x\"").unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn client_secret_variable_names() {
        assert_eq!(
            client_secret_env("my-google"),
            "POPBRIDGE_OAUTH_CLIENT_SECRET_MY_GOOGLE"
        );
    }
}
