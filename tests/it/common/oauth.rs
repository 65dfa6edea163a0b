//! A real OAuth 2.0 authorization server on loopback for the tests
//! (`tests/oauth_server.py`, Python standard library only), plus a plain
//! `std::net` HTTP/1.1 client for its endpoints and test controls, a
//! minimal JSON reader, base64, and a raw IMAP SASL exchange that records
//! what Dovecot sends (for XOAUTH2 / OAUTHBEARER, RFC 7628), and an IMAP
//! proxy that answers logins with Gmail's `[THROTTLED]`.
//!
//! Typical use:
//! ```ignore
//! let oauth = OauthServer::start();
//! let dovecot = Dovecot::start_with_oauth2(opts, &oauth.introspect_url());
//! let (access, refresh) = oauth.device_flow_token("alice@example.org");
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use super::{read_lossy, START_TIMEOUT};

/// Read/write timeout of the HTTP client.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest HTTP answer the client accepts (the server's are < 2 KiB).
const MAX_HTTP_RESPONSE: u64 = 1024 * 1024;
/// RFC 8628 §3.4: the device grant's grant_type.
pub const DEVICE_GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// Options of [`OauthServer::start_with`]; every field maps to a
/// command-line flag of `tests/oauth_server.py`.
#[derive(Clone, Debug)]
pub struct OauthServerOptions {
    /// Lifetime of access tokens in seconds (`expires_in`). Tests expire
    /// tokens with [`OauthServer::expire_access_tokens`] rather than by
    /// waiting.
    pub access_ttl_secs: u64,
    /// The one registered client.
    pub client_id: String,
    /// When Some, the client must authenticate (RFC 6749 §2.3.1, HTTP
    /// Basic or body parameters); when None it is a public client.
    pub client_secret: Option<String>,
    /// Device flow polling interval (RFC 8628 §3.2 `interval`), seconds.
    pub interval_secs: u64,
    /// How much `slow_down` adds to the interval (RFC 8628 §3.5: 5 s).
    pub slow_down_increment_secs: u64,
    /// Lifetime of device codes (RFC 8628 §3.2 `expires_in`), seconds.
    pub device_code_ttl_secs: u64,
    /// Reusing a rotated refresh token revokes the whole grant (OAuth 2.0
    /// Security BCP, RFC 9700 §4.14.2). Off: only the reused token fails.
    pub reuse_revokes_family: bool,
}

impl Default for OauthServerOptions {
    fn default() -> Self {
        OauthServerOptions {
            access_ttl_secs: 3600,
            client_id: "popbridge-test".to_string(),
            client_secret: None,
            interval_secs: 1,
            slow_down_increment_secs: 5,
            device_code_ttl_secs: 600,
            reuse_revokes_family: false,
        }
    }
}

/// The running authorization server (killed on drop; its request log is
/// printed if the test is panicking). The log never holds token values.
pub struct OauthServer {
    pub port: u16,
    pub options: OauthServerOptions,
    child: Child,
    _stdout: ChildStdout,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// An HTTP answer.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// First header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON; panics if it is not.
    pub fn json(&self) -> Json {
        Json::parse(&String::from_utf8_lossy(&self.body)).unwrap_or_else(|e| {
            panic!(
                "HTTP {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// A token endpoint success (RFC 6749 §5.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    pub access_token: String,
    pub refresh_token: String,
    pub token_type: String,
    pub expires_in: u64,
    pub scope: String,
}

/// An RFC 6749 §5.2 error answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OauthError {
    pub status: u16,
    pub error: String,
    pub description: Option<String>,
    /// `Retry-After` (set when throttled).
    pub retry_after: Option<String>,
}

/// RFC 8628 §3.2 device authorization response.
#[derive(Clone, Debug)]
pub struct DeviceAuthorization {
    pub device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: String,
    pub expires_in: u64,
    pub interval: u64,
}

/// `GET /test/stats`.
#[derive(Clone, Debug, Default)]
pub struct OauthStats {
    /// Successful token requests per grant: "device_code",
    /// "authorization_code", "refresh_token".
    pub grants: BTreeMap<String, u64>,
    /// Token endpoint error answers per RFC 6749 error code.
    pub token_errors: BTreeMap<String, u64>,
    pub device_authorizations: u64,
    /// Calls of /introspect (Dovecot's token checks) and how many were active.
    pub introspections: u64,
    pub introspections_active: u64,
    pub revocations: u64,
    /// Requests answered 429 because of [`OauthServer::throttle`].
    pub throttled: u64,
    /// Refresh requests with an already rotated refresh token.
    pub refresh_reuse: u64,
    /// Currently valid refresh tokens per account.
    pub active_refresh_tokens: BTreeMap<String, u64>,
    /// Refresh tokens invalidated by rotation.
    pub rotated_refresh_tokens: u64,
    /// The stats JSON as sent.
    pub raw: String,
}

impl OauthStats {
    /// Successful token requests of `grant` ("refresh_token", ...).
    pub fn grant(&self, grant: &str) -> u64 {
        self.grants.get(grant).copied().unwrap_or(0)
    }
    /// Token endpoint errors with code `error`.
    pub fn token_error(&self, error: &str) -> u64 {
        self.token_errors.get(error).copied().unwrap_or(0)
    }
    /// Valid refresh tokens of `account`.
    pub fn active_refresh(&self, account: &str) -> u64 {
        self.active_refresh_tokens
            .get(account)
            .copied()
            .unwrap_or(0)
    }
}

/// Dovecot settings so failed logins answer at once (default: a 2 s delay)
/// and the loopback address is not penalised for them.
const FAST_FAILURES: &str = "auth_failure_delay = 0\n\
service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n";

/// A Dovecot that checks bearer tokens at `oauth`'s introspection endpoint
/// and answers failed logins at once; each of `accounts` also has the
/// local password `local-password`.
pub fn oauth_dovecot_for(oauth: &OauthServer, accounts: &[&str]) -> super::Dovecot {
    super::Dovecot::start_with_oauth2(
        super::DovecotOptions {
            users: accounts
                .iter()
                .map(|a| (a.to_string(), "local-password".to_string()))
                .collect(),
            extra_conf: FAST_FAILURES.to_string(),
            ..super::DovecotOptions::default()
        },
        &oauth.introspect_url(),
    )
}

impl OauthServer {
    /// Start with [`OauthServerOptions::default`].
    pub fn start() -> OauthServer {
        OauthServer::start_with(OauthServerOptions::default())
    }

    /// Run `python3 tests/oauth_server.py --port 0 ...` and wait for its
    /// `READY <port>` line; panics (with its stderr) if it does not come up.
    pub fn start_with(options: OauthServerOptions) -> OauthServer {
        let dir = tempfile::Builder::new()
            .prefix("pboauth-")
            .tempdir()
            .expect("create oauth server temp dir");
        let stderr_path = dir.path().join("oauth_server.log");
        let log = fs::File::create(&stderr_path).expect("create oauth_server.log");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/oauth_server.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .args(["--port", "0"])
            .args(["--access-ttl", &options.access_ttl_secs.to_string()])
            .args(["--client-id", &options.client_id])
            .args(["--interval", &options.interval_secs.to_string()])
            .args([
                "--slow-down-increment",
                &options.slow_down_increment_secs.to_string(),
            ])
            .args([
                "--device-code-ttl",
                &options.device_code_ttl_secs.to_string(),
            ]);
        if let Some(secret) = &options.client_secret {
            cmd.args(["--client-secret", secret]);
        }
        if options.reuse_revokes_family {
            cmd.arg("--reuse-revokes-family");
        }
        let mut child = cmd
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run python3 {script} (is python3 installed?): {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let res = reader.read_line(&mut line).map(|_| line);
            let _ = tx.send((res, reader.into_inner()));
        });
        let (line, stdout) = match rx.recv_timeout(START_TIMEOUT) {
            Ok((Ok(line), stdout)) => (line, stdout),
            Ok((Err(e), _)) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "reading oauth_server.py stdout: {e}\n{}",
                    read_lossy(&stderr_path)
                );
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "oauth_server.py did not print READY within {START_TIMEOUT:?}\n{}",
                    read_lossy(&stderr_path)
                );
            }
        };
        let port: u16 = match line.trim().strip_prefix("READY ").map(str::parse) {
            Some(Ok(port)) => port,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "oauth_server.py did not start (first line {line:?}):\n{}",
                    read_lossy(&stderr_path)
                );
            }
        };
        OauthServer {
            port,
            options,
            child,
            _stdout: stdout,
            stderr_path,
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    /// Token endpoint (RFC 6749 §3.2).
    pub fn token_url(&self) -> String {
        format!("{}/token", self.base_url())
    }
    /// Device authorization endpoint (RFC 8628 §3.1).
    pub fn device_url(&self) -> String {
        format!("{}/device_authorization", self.base_url())
    }
    /// Authorization endpoint (RFC 6749 §3.1).
    pub fn authorize_url(&self) -> String {
        format!("{}/authorize", self.base_url())
    }
    /// Introspection endpoint (RFC 7662), what Dovecot calls.
    pub fn introspect_url(&self) -> String {
        format!("{}/introspect", self.base_url())
    }
    /// Revocation endpoint (RFC 7009).
    pub fn revoke_url(&self) -> String {
        format!("{}/revoke", self.base_url())
    }

    /// The server's request log so far (method, path, status; no tokens).
    pub fn log(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    // ------------------------------------------------------------------
    // Raw HTTP
    // ------------------------------------------------------------------

    /// One HTTP/1.1 request (`Connection: close`) to this server.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpResponse {
        http_request(self.port, method, path, headers, body)
    }

    /// POST form parameters to `path` with no client authentication added.
    pub fn post_form_raw(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        params: &[(&str, &str)],
    ) -> HttpResponse {
        let mut all = vec![("Content-Type", "application/x-www-form-urlencoded")];
        all.extend_from_slice(headers);
        self.request("POST", path, &all, form_encode(params).as_bytes())
    }

    /// POST form parameters to `path`, authenticating as the configured
    /// client with body parameters (client_id, client_secret if any).
    pub fn post_form(&self, path: &str, params: &[(&str, &str)]) -> HttpResponse {
        let mut all: Vec<(&str, &str)> = params.to_vec();
        all.push(("client_id", &self.options.client_id));
        if let Some(secret) = &self.options.client_secret {
            all.push(("client_secret", secret));
        }
        self.post_form_raw(path, &[], &all)
    }

    fn control(&self, name: &str, body: &str) -> Json {
        let resp = self.request(
            "POST",
            &format!("/test/{name}"),
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        assert_eq!(
            resp.status,
            200,
            "POST /test/{name}: {}",
            String::from_utf8_lossy(&resp.body)
        );
        resp.json()
    }

    // ------------------------------------------------------------------
    // Test controls
    // ------------------------------------------------------------------

    /// Approve the pending device authorization `user_code` as `account`
    /// (the user typed the code and consented). Panics if none is pending.
    pub fn approve(&self, user_code: &str, account: &str) {
        self.control(
            "approve",
            &format!(
                "{{\"user_code\":{},\"account\":{}}}",
                json_string(user_code),
                json_string(account)
            ),
        );
    }

    /// Deny the pending device authorization `user_code`.
    pub fn deny(&self, user_code: &str) {
        self.control(
            "deny",
            &format!("{{\"user_code\":{}}}", json_string(user_code)),
        );
    }

    /// Every access token issued so far becomes inactive (introspection
    /// answers `{"active": false}`); returns how many were active.
    pub fn expire_access_tokens(&self) -> u64 {
        self.control("expire_access", "{}")
            .get("expired")
            .and_then(Json::as_u64)
            .expect("expired count")
    }

    /// Every pending or approved device code expires (`expired_token`).
    pub fn expire_device_codes(&self) {
        self.control("expire_device_codes", "{}");
    }

    /// All refresh tokens of `account` (or of everyone) become invalid
    /// (`invalid_grant`), as when the user revokes the app's access.
    /// Returns how many were revoked.
    pub fn revoke_refresh_tokens(&self, account: Option<&str>) -> u64 {
        let body = match account {
            Some(a) => format!("{{\"account\":{}}}", json_string(a)),
            None => "{}".to_string(),
        };
        self.control("revoke_refresh", &body)
            .get("revoked")
            .and_then(Json::as_u64)
            .expect("revoked count")
    }

    /// The next `n` requests to /token or /device_authorization answer
    /// HTTP 429, `Retry-After: 1`, `{"error":"temporarily_unavailable"}`.
    pub fn throttle(&self, n: u32) {
        self.control("throttle", &format!("{{\"count\":{n}}}"));
    }

    /// The next `n` introspection calls answer HTTP 503 (Dovecot then
    /// fails the login as an internal error).
    pub fn fail_introspection(&self, n: u32) {
        self.control("fail_introspection", &format!("{{\"count\":{n}}}"));
    }

    /// The account that `GET /authorize` logs in when there is no
    /// `login_hint` (None: it answers `error=access_denied`).
    pub fn set_default_user(&self, account: Option<&str>) {
        let body = match account {
            Some(a) => format!("{{\"account\":{}}}", json_string(a)),
            None => "{\"account\":null}".to_string(),
        };
        self.control("default_user", &body);
    }

    /// Switch refresh-token reuse detection at run time (see
    /// [`OauthServerOptions::reuse_revokes_family`]).
    pub fn set_reuse_revokes_family(&self, on: bool) {
        self.control("config", &format!("{{\"reuse_revokes_family\":{on}}}"));
    }

    /// Counters and token state (`GET /test/stats`).
    pub fn stats(&self) -> OauthStats {
        let resp = self.request("GET", "/test/stats", &[], b"");
        assert_eq!(resp.status, 200, "GET /test/stats");
        let json = resp.json();
        let num = |k: &str| json.get(k).and_then(Json::as_u64).unwrap_or(0);
        let map = |k: &str| -> BTreeMap<String, u64> {
            match json.get(k) {
                Some(Json::Obj(fields)) => fields
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                    .collect(),
                _ => BTreeMap::new(),
            }
        };
        OauthStats {
            grants: map("grants"),
            token_errors: map("token_errors"),
            device_authorizations: num("device_authorizations"),
            introspections: num("introspections"),
            introspections_active: num("introspections_active"),
            revocations: num("revocations"),
            throttled: num("throttled"),
            refresh_reuse: num("refresh_reuse"),
            active_refresh_tokens: map("active_refresh_tokens"),
            rotated_refresh_tokens: num("rotated_refresh_tokens"),
            raw: String::from_utf8_lossy(&resp.body).into_owned(),
        }
    }

    // ------------------------------------------------------------------
    // A client doing the flows by hand
    // ------------------------------------------------------------------

    /// RFC 8628 §3.1 device authorization request.
    pub fn device_authorization(&self, scope: &str) -> DeviceAuthorization {
        let resp = self.post_form("/device_authorization", &[("scope", scope)]);
        assert_eq!(
            resp.status,
            200,
            "device authorization: {}",
            String::from_utf8_lossy(&resp.body)
        );
        let j = resp.json();
        let s = |k: &str| {
            j.get(k)
                .and_then(Json::as_str)
                .unwrap_or_else(|| panic!("device authorization lacks {k}"))
                .to_string()
        };
        let n = |k: &str| {
            j.get(k)
                .and_then(Json::as_u64)
                .unwrap_or_else(|| panic!("device authorization lacks {k}"))
        };
        DeviceAuthorization {
            device_code: s("device_code"),
            user_code: s("user_code"),
            verification_uri: s("verification_uri"),
            verification_uri_complete: s("verification_uri_complete"),
            expires_in: n("expires_in"),
            interval: n("interval"),
        }
    }

    /// A token request with these parameters (client auth added).
    pub fn token_request(&self, params: &[(&str, &str)]) -> Result<Tokens, OauthError> {
        parse_token_response(&self.post_form("/token", params))
    }

    /// One device-grant poll (RFC 8628 §3.4).
    pub fn poll_device(&self, device_code: &str) -> Result<Tokens, OauthError> {
        self.token_request(&[
            ("grant_type", DEVICE_GRANT_TYPE),
            ("device_code", device_code),
        ])
    }

    /// A refresh (RFC 6749 §6).
    pub fn refresh(&self, refresh_token: &str) -> Result<Tokens, OauthError> {
        self.token_request(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ])
    }

    /// The whole device flow for `account`: authorize, approve, one poll.
    /// Returns (access token, refresh token).
    pub fn device_flow_token(&self, account: &str) -> (String, String) {
        let dev = self.device_authorization("mail");
        self.approve(&dev.user_code, account);
        let tokens = self
            .poll_device(&dev.device_code)
            .unwrap_or_else(|e| panic!("device flow for {account}: {e:?}"));
        (tokens.access_token, tokens.refresh_token)
    }

    /// RFC 7662 introspection as Dovecot does it (`token=` form, no client
    /// credentials).
    pub fn introspect(&self, token: &str) -> Json {
        let resp = self.post_form_raw("/introspect", &[], &[("token", token)]);
        assert_eq!(resp.status, 200, "introspect");
        resp.json()
    }

    /// RFC 7009 revocation (always 200 unless the client is wrong).
    pub fn revoke(&self, token: &str) -> HttpResponse {
        self.post_form("/revoke", &[("token", token)])
    }
}

impl Drop for OauthServer {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- oauth_server.py log ({}) ---\n{}",
                self.stderr_path.display(),
                self.log()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Tokens or the RFC 6749 §5.2 error of a token endpoint answer.
pub fn parse_token_response(resp: &HttpResponse) -> Result<Tokens, OauthError> {
    let j = resp.json();
    if resp.status == 200 {
        let s = |k: &str| {
            j.get(k)
                .and_then(Json::as_str)
                .unwrap_or_else(|| panic!("token answer lacks {k}: {j:?}"))
                .to_string()
        };
        Ok(Tokens {
            access_token: s("access_token"),
            refresh_token: s("refresh_token"),
            token_type: s("token_type"),
            expires_in: j
                .get("expires_in")
                .and_then(Json::as_u64)
                .expect("expires_in"),
            scope: s("scope"),
        })
    } else {
        Err(OauthError {
            status: resp.status,
            error: j
                .get("error")
                .and_then(Json::as_str)
                .unwrap_or_else(|| panic!("error answer lacks error: {j:?}"))
                .to_string(),
            description: j
                .get("error_description")
                .and_then(Json::as_str)
                .map(String::from),
            retry_after: resp.header("retry-after").map(String::from),
        })
    }
}

// ---------------------------------------------------------------------------
// HTTP/1.1 client (blocking, Connection: close)
// ---------------------------------------------------------------------------

/// One request to 127.0.0.1:`port`; panics on I/O errors or a malformed
/// answer.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .unwrap_or_else(|e| panic!("HTTP connect 127.0.0.1:{port}: {e}"));
    stream
        .set_read_timeout(Some(HTTP_TIMEOUT))
        .expect("timeout");
    stream
        .set_write_timeout(Some(HTTP_TIMEOUT))
        .expect("timeout");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).expect("HTTP write");
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_HTTP_RESPONSE)
        .read_to_end(&mut raw)
        .expect("HTTP read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("HTTP answer without header end: {raw:?}"));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad HTTP status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if let Some(len) = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.truncate(len);
    }
    HttpResponse {
        status,
        headers,
        body,
    }
}

/// application/x-www-form-urlencoded (RFC 6749 appendix B).
pub fn form_encode(params: &[(&str, &str)]) -> String {
    params
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encode everything but RFC 3986 unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decode %XX and '+' (form encoding) in a query value.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The query parameters of a URL (e.g. a redirect `Location`).
pub fn query_params(url: &str) -> BTreeMap<String, String> {
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    let query = query.split('#').next().unwrap_or("");
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// base64 (RFC 4648 §4 and §5), with the base64 crate
// ---------------------------------------------------------------------------

use base64::Engine as _;

/// Standard base64 with padding (what SASL uses, RFC 4648 §4).
pub fn base64_encode(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Decode standard base64; None if malformed.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

// ---------------------------------------------------------------------------
// SASL XOAUTH2 / OAUTHBEARER against an IMAP server
// ---------------------------------------------------------------------------

/// XOAUTH2 initial client response (Google's format):
/// `user=<account>^Aauth=Bearer <token>^A^A`, base64.
pub fn xoauth2_initial_response(account: &str, token: &str) -> String {
    base64_encode(format!("user={account}\x01auth=Bearer {token}\x01\x01").as_bytes())
}

/// OAUTHBEARER initial client response (RFC 7628 §3.1): GS2 header
/// `n,a=<authzid>,` (',' and '=' escaped as =2C / =3D, RFC 5801 §5), then
/// `^Ahost=..^Aport=..^Aauth=Bearer <token>^A^A`, base64.
pub fn oauthbearer_initial_response(account: &str, host: &str, port: u16, token: &str) -> String {
    let authzid = account.replace('=', "=3D").replace(',', "=2C");
    base64_encode(
        format!("n,a={authzid},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01")
            .as_bytes(),
    )
}

/// What happened in one IMAP `AUTHENTICATE` exchange.
#[derive(Clone, Debug)]
pub struct SaslOutcome {
    /// The tagged answer was OK.
    pub ok: bool,
    /// The tagged answer line (e.g. `a1 NO [AUTHENTICATIONFAILED] ...`).
    pub tagged: String,
    /// Decoded payloads of the server's `+ ...` continuation requests
    /// (for a failed OAuth2 login: Dovecot's JSON error).
    pub challenges: Vec<String>,
    /// The whole exchange, `C: ` / `S: ` lines (the client's initial
    /// response is shown as `<initial response>`, never the token).
    pub transcript: Vec<String>,
}

/// Connect to the IMAP server on 127.0.0.1:`port`, read the greeting and
/// run `a1 AUTHENTICATE <mechanism> <initial_response>` (SASL-IR, RFC 4959).
/// Any `+ <challenge>` is answered with an empty line (RFC 7628 §3.2.3:
/// after an error challenge the client sends a dummy response; for
/// OAUTHBEARER it is `^A`, `AQ==`, see `oauthbearer_dummy`). Then, if
/// `ok`, it runs `a2 SELECT INBOX` to prove the session works.
pub fn imap_sasl(
    port: u16,
    mechanism: &str,
    initial_response: &str,
    oauthbearer_dummy: bool,
) -> SaslOutcome {
    let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .unwrap_or_else(|e| panic!("IMAP connect 127.0.0.1:{port}: {e}"));
    stream
        .set_read_timeout(Some(HTTP_TIMEOUT))
        .expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    let mut transcript = Vec::new();
    let mut read = |transcript: &mut Vec<String>| -> String {
        let mut line = String::new();
        reader.read_line(&mut line).expect("IMAP read");
        assert!(line.ends_with("\r\n"), "IMAP line without CRLF: {line:?}");
        transcript.push(format!("S: {}", line.trim_end_matches("\r\n")));
        line.trim_end_matches("\r\n").to_string()
    };
    let greeting = read(&mut transcript);
    assert!(greeting.starts_with("* OK"), "greeting {greeting:?}");
    writer
        .write_all(format!("a1 AUTHENTICATE {mechanism} {initial_response}\r\n").as_bytes())
        .expect("IMAP write");
    transcript.push(format!("C: a1 AUTHENTICATE {mechanism} <initial response>"));
    let mut challenges = Vec::new();
    let tagged = loop {
        let line = read(&mut transcript);
        if let Some(rest) = line.strip_prefix("+") {
            let payload = rest.trim_start();
            challenges.push(
                base64_decode(payload)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_else(|| format!("<not base64: {payload}>")),
            );
            let answer = if oauthbearer_dummy { "AQ==" } else { "" };
            writer
                .write_all(format!("{answer}\r\n").as_bytes())
                .expect("IMAP write");
            transcript.push(format!("C: {answer}"));
        } else if line.starts_with("a1 ") {
            break line;
        }
    };
    let ok = tagged.starts_with("a1 OK");
    if ok {
        writer
            .write_all(b"a2 SELECT INBOX\r\n")
            .expect("IMAP write");
        transcript.push("C: a2 SELECT INBOX".to_string());
        loop {
            let line = read(&mut transcript);
            if line.starts_with("a2 ") {
                assert!(
                    line.starts_with("a2 OK"),
                    "SELECT after AUTHENTICATE: {line}"
                );
                break;
            }
        }
    }
    let _ = writer.write_all(b"a9 LOGOUT\r\n");
    SaslOutcome {
        ok,
        tagged,
        challenges,
        transcript,
    }
}

// ---------------------------------------------------------------------------
// Minimal JSON reader (RFC 8259), enough for the server's answers
// ---------------------------------------------------------------------------

/// A parsed JSON value; objects keep their field order.
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// Parse a whole document.
    pub fn parse(text: &str) -> Result<Json, String> {
        let mut p = JsonParser {
            s: text.as_bytes(),
            i: 0,
        };
        let v = p.value(0)?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("trailing data at {}", p.i));
        }
        Ok(v)
    }
    /// Field `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Num(n) if *n >= 0.0 && n.fract() == 0.0 => Some(*n as u64),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

/// Nesting limit of the JSON reader.
const MAX_JSON_DEPTH: usize = 32;

/// Quote `s` as a JSON string.
pub fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

struct JsonParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && b" \t\r\n".contains(&self.s[self.i]) {
            self.i += 1;
        }
    }
    fn eat(&mut self, lit: &str) -> Result<(), String> {
        if self.s[self.i..].starts_with(lit.as_bytes()) {
            self.i += lit.len();
            Ok(())
        } else {
            Err(format!("expected {lit} at {}", self.i))
        }
    }
    fn value(&mut self, depth: usize) -> Result<Json, String> {
        if depth > MAX_JSON_DEPTH {
            return Err("JSON nested too deeply".into());
        }
        self.ws();
        match self.s.get(self.i) {
            None => Err("unexpected end".into()),
            Some(b'n') => self.eat("null").map(|_| Json::Null),
            Some(b't') => self.eat("true").map(|_| Json::Bool(true)),
            Some(b'f') => self.eat("false").map(|_| Json::Bool(false)),
            Some(b'"') => self.string().map(Json::Str),
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(items));
                        }
                        _ => return Err(format!("bad array at {}", self.i)),
                    }
                }
            }
            Some(b'{') => {
                self.i += 1;
                let mut fields = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(fields));
                }
                loop {
                    self.ws();
                    if self.s.get(self.i) != Some(&b'"') {
                        return Err(format!("expected key at {}", self.i));
                    }
                    let k = self.string()?;
                    self.ws();
                    self.eat(":")?;
                    let v = self.value(depth + 1)?;
                    fields.push((k, v));
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(fields));
                        }
                        _ => return Err(format!("bad object at {}", self.i)),
                    }
                }
            }
            Some(_) => {
                let start = self.i;
                while self.i < self.s.len() && b"+-0123456789.eE".contains(&self.s[self.i]) {
                    self.i += 1;
                }
                std::str::from_utf8(&self.s[start..self.i])
                    .ok()
                    .and_then(|t| t.parse::<f64>().ok())
                    .map(Json::Num)
                    .ok_or_else(|| format!("bad value at {start}"))
            }
        }
    }
    fn string(&mut self) -> Result<String, String> {
        self.i += 1; // opening quote
        let mut out = String::new();
        loop {
            let start = self.i;
            while self.i < self.s.len() && self.s[self.i] != b'"' && self.s[self.i] != b'\\' {
                self.i += 1;
            }
            out.push_str(std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?);
            match self.s.get(self.i) {
                None => return Err("unterminated string".into()),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(_) => {
                    self.i += 1;
                    let c = *self.s.get(self.i).ok_or("bad escape")?;
                    self.i += 1;
                    match c {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hex = self.s.get(self.i..self.i + 4).ok_or("bad \\u")?;
                            let code = u32::from_str_radix(
                                std::str::from_utf8(hex).map_err(|e| e.to_string())?,
                                16,
                            )
                            .map_err(|e| e.to_string())?;
                            self.i += 4;
                            // Surrogate pairs are not needed by the tests.
                            out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                        }
                        _ => return Err("bad escape".into()),
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Provider throttling in front of Dovecot (Gmail's `[THROTTLED]`)
// ---------------------------------------------------------------------------

/// Gmail's answer when it throttles an account (the `THROTTLED` response
/// code is Gmail's, not registered in RFC 5530; Dovecot never sends it).
pub const GMAIL_THROTTLED: &str =
    "NO [THROTTLED] Account exceeded command or bandwidth limits. (Failure)";

/// How often the proxy's accept loop looks at its stop flag.
const PROXY_POLL: Duration = Duration::from_millis(10);
/// Longest client line the proxy inspects (RFC 7162 §4: 8192 octets is
/// the recommended minimum a server accepts; this is generous).
const PROXY_MAX_LINE: u64 = 64 * 1024;

struct ProxyState {
    /// How many of the next AUTHENTICATE/LOGIN commands to refuse.
    throttle: AtomicU32,
    /// AUTHENTICATE/LOGIN commands seen (refused or passed on).
    auth_commands: AtomicU64,
    /// AUTHENTICATE/LOGIN commands refused with the throttling reply.
    throttled: AtomicU64,
    /// Client sockets, shut down on drop.
    open: Mutex<Vec<TcpStream>>,
}

/// A TCP proxy on 127.0.0.1 in front of an IMAP server (e.g. Dovecot)
/// that passes everything through byte for byte, except that while
/// [`ThrottlingImapProxy::throttle_logins`] has a count left it answers an
/// `AUTHENTICATE` or `LOGIN` command itself with `<tag> NO [THROTTLED] ...`
/// (the upstream never sees it). It follows IMAP literals (`{n}`/`{n+}`)
/// so message data is never mistaken for a command. Point popbridge's
/// upstream at `proxy.port`. Stopped on drop.
pub struct ThrottlingImapProxy {
    pub port: u16,
    state: Arc<ProxyState>,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
}

impl ThrottlingImapProxy {
    /// Listen on a free loopback port, forwarding to 127.0.0.1:`upstream_port`.
    pub fn start(upstream_port: u16) -> ThrottlingImapProxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind proxy");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let port = listener.local_addr().expect("proxy addr").port();
        let state = Arc::new(ProxyState {
            throttle: AtomicU32::new(0),
            auth_commands: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            open: Mutex::new(Vec::new()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let state = Arc::clone(&state);
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let state = Arc::clone(&state);
                            thread::spawn(move || proxy_connection(client, upstream_port, state));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(PROXY_POLL),
                        Err(_) => thread::sleep(PROXY_POLL),
                    }
                }
            })
        };
        ThrottlingImapProxy {
            port,
            state,
            stop,
            accept: Some(accept),
        }
    }

    /// Refuse the next `n` AUTHENTICATE/LOGIN commands (across all
    /// connections) with the throttling reply.
    pub fn throttle_logins(&self, n: u32) {
        self.state.throttle.store(n, Ordering::SeqCst);
    }

    /// AUTHENTICATE/LOGIN commands seen so far (refused or passed on).
    pub fn auth_commands(&self) -> u64 {
        self.state.auth_commands.load(Ordering::SeqCst)
    }

    /// AUTHENTICATE/LOGIN commands refused so far.
    pub fn throttled(&self) -> u64 {
        self.state.throttled.load(Ordering::SeqCst)
    }
}

impl Drop for ThrottlingImapProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.accept.take() {
            let _ = handle.join();
        }
        for s in self.state.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// The literal length announced at the end of an IMAP command line
/// (`{n}` or `{n+}` before CRLF, RFC 3501 §4.3, RFC 7888).
fn trailing_literal(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line = line.strip_suffix(b"}")?;
    let open = line.iter().rposition(|&b| b == b'{')?;
    let digits = &line[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn proxy_connection(client: TcpStream, upstream_port: u16, state: Arc<ProxyState>) {
    let Ok(upstream) = TcpStream::connect((Ipv4Addr::LOCALHOST, upstream_port)) else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    if let Ok(c) = client.try_clone() {
        state.open.lock().unwrap().push(c);
    }
    // Writes to the client come from two threads (upstream data and our
    // own throttling replies): one lock keeps them whole.
    let client_writer = Arc::new(Mutex::new(client.try_clone().expect("clone client")));
    let down = {
        let mut upstream = upstream.try_clone().expect("clone upstream");
        let client_writer = Arc::clone(&client_writer);
        thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match upstream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if client_writer.lock().unwrap().write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = client_writer.lock().unwrap().shutdown(Shutdown::Write);
        })
    };
    let mut reader = BufReader::new(client);
    let mut to_upstream = upstream;
    loop {
        let mut line = Vec::new();
        match (&mut reader)
            .take(PROXY_MAX_LINE)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let mut words = text.split_whitespace();
        let tag = words.next().unwrap_or("").to_string();
        let verb = words.next().unwrap_or("").to_ascii_uppercase();
        if verb == "AUTHENTICATE" || verb == "LOGIN" {
            state.auth_commands.fetch_add(1, Ordering::SeqCst);
            let refuse = state
                .throttle
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if refuse {
                state.throttled.fetch_add(1, Ordering::SeqCst);
                let reply = format!("{tag} {GMAIL_THROTTLED}\r\n");
                if client_writer
                    .lock()
                    .unwrap()
                    .write_all(reply.as_bytes())
                    .is_err()
                {
                    break;
                }
                continue;
            }
        }
        if to_upstream.write_all(&line).is_err() {
            break;
        }
        if let Some(n) = trailing_literal(&line) {
            // Literal data passes through uninspected.
            if std::io::copy(&mut (&mut reader).take(n), &mut to_upstream).is_err() {
                break;
            }
        }
    }
    let _ = to_upstream.shutdown(Shutdown::Write);
    let _ = down.join();
}
