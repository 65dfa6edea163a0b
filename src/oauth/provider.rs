//! HTTP calls to a provider's endpoints: token refresh (RFC 6749 §6), the
//! device authorization grant (RFC 8628), the authorization-code exchange
//! with PKCE (RFC 7636) and revocation (RFC 7009).
//!
//! Plain reqwest (rustls, no default features) rather than the `oauth2`
//! crate: popbridge needs exact control over what it keeps from error
//! answers (only `error` and a truncated `error_description`), over
//! throttling signals (HTTP 429/503, `Retry-After`, `slow_down`) and over
//! body sizes and timeouts, and the requests themselves are a handful of
//! form posts.

use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;

use crate::config::oauth::Provider;

/// Whole request budget for one call to a provider.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(20);
/// TCP + TLS connection budget.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A token answer is a few KiB; anything longer is refused.
const MAX_BODY: usize = 64 * 1024;
/// Longest provider error text kept for logs and messages.
pub const MAX_ERROR_TEXT: usize = 160;
/// RFC 8628 §3.2: "If no value is provided, clients MUST use 5 as the
/// default" polling interval.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// RFC 8628 §3.5: on `slow_down` "the interval MUST be increased by 5
/// seconds for this and all subsequent requests".
pub const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// Lifetime assumed when a token answer has no `expires_in` (RFC 6749 §5.1
/// makes it optional; one hour is what Google and Microsoft issue).
pub const DEFAULT_EXPIRES_IN: u64 = 3600;
/// Longest access-token lifetime believed (a bogus `expires_in` must not
/// keep a token for years or overflow time arithmetic).
pub const MAX_EXPIRES_IN: u64 = 24 * 3600;
/// Longest device-code lifetime honoured (Google: 30 min, Microsoft: 15).
pub const MAX_DEVICE_CODE_LIFETIME: u64 = 3600;
/// Longest interval honoured from a provider (a broken answer must not
/// stall enrolment for hours).
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(60);

/// RFC 8628 §3.4: the device-code grant type.
const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// What went wrong talking to a provider. Texts are sanitised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// RFC 6749 §5.2 `invalid_grant`: the refresh token (or code) is dead.
    #[error("invalid_grant: {0}")]
    InvalidGrant(String),
    /// HTTP 429/503, `slow_down` or `temporarily_unavailable`.
    #[error("throttled by the provider: {detail}")]
    Throttled {
        retry_after: Option<Duration>,
        detail: String,
    },
    /// RFC 8628 §3.5 `authorization_pending`.
    #[error("authorization pending")]
    Pending,
    /// RFC 8628 §3.5 `slow_down` while polling.
    #[error("slow down")]
    SlowDown,
    /// RFC 8628 §3.5 `access_denied`.
    #[error("the user denied the request")]
    AccessDenied,
    /// RFC 8628 §3.5 `expired_token`.
    #[error("the device code expired before it was approved")]
    ExpiredToken,
    /// Any other error answer (`invalid_client`, …).
    #[error("{0}")]
    Refused(String),
    /// Network failure, timeout, malformed answer.
    #[error("{0}")]
    Transport(String),
}

/// A token endpoint answer (RFC 6749 §5.1). `Debug` hides the tokens.
#[derive(Clone, Deserialize)]
pub struct TokenResponse {
    pub access_token: String,
    #[serde(default)]
    pub expires_in: Option<u64>,
    #[serde(default)]
    pub refresh_token: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub token_type: Option<String>,
}

impl TokenResponse {
    /// `expires_in`, defaulted and bounded to 1 s ..= [`MAX_EXPIRES_IN`].
    pub fn lifetime(&self) -> u64 {
        self.expires_in
            .unwrap_or(DEFAULT_EXPIRES_IN)
            .clamp(1, MAX_EXPIRES_IN)
    }
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("expires_in", &self.expires_in)
            .field("rotated", &self.refresh_token.is_some())
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// RFC 8628 §3.2 device authorization answer.
#[derive(Clone, Deserialize)]
pub struct DeviceAuthorization {
    pub device_code: String,
    pub user_code: String,
    /// Google calls it `verification_url`.
    #[serde(alias = "verification_url")]
    pub verification_uri: String,
    #[serde(default)]
    pub verification_uri_complete: Option<String>,
    pub expires_in: u64,
    #[serde(default)]
    pub interval: Option<u64>,
}

impl DeviceAuthorization {
    /// `expires_in`, bounded to [`MAX_DEVICE_CODE_LIFETIME`].
    pub fn lifetime(&self) -> u64 {
        self.expires_in.min(MAX_DEVICE_CODE_LIFETIME)
    }
}

impl std::fmt::Debug for DeviceAuthorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceAuthorization")
            .field("verification_uri", &self.verification_uri)
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// RFC 6749 §5.2 error answer.
#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// Keeps printable ASCII (RFC 6749 §5.2 allows nothing else in these
/// fields), truncated to [`MAX_ERROR_TEXT`].
pub fn sanitise(text: &str) -> String {
    let clean: String = text
        .chars()
        .filter(|c| (' '..='~').contains(c))
        .take(MAX_ERROR_TEXT)
        .collect();
    if text.chars().count() > MAX_ERROR_TEXT {
        format!("{clean}...")
    } else {
        clean
    }
}

/// The HTTP side of every provider.
#[derive(Debug, Clone)]
pub struct ProviderClient {
    http: reqwest::Client,
}

impl ProviderClient {
    pub fn new() -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            // Token endpoints do not redirect; following one could send a
            // refresh token somewhere unexpected.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("popbridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Self { http })
    }

    /// POSTs a form (client_secret_post, RFC 6749 §2.3.1) and returns the
    /// body of a 2xx answer, or the classified error.
    async fn post(
        &self,
        url: &str,
        provider: &Provider,
        secret: Option<&str>,
        form: &[(&str, &str)],
    ) -> Result<Vec<u8>, ProviderError> {
        let mut fields: Vec<(&str, &str)> = form.to_vec();
        fields.push(("client_id", &provider.client_id));
        if let Some(s) = secret {
            fields.push(("client_secret", s));
        }
        let resp = self
            .http
            .post(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&fields)
            .send()
            .await
            .map_err(|e| ProviderError::Transport(transport_text(url, e)))?;
        let status = resp.status();
        // Names and status only: the form carries tokens and secrets.
        tracing::trace!(
            provider = %provider.name,
            host = %host_of(url),
            grant = %form
                .iter()
                .find(|(k, _)| *k == "grant_type")
                .map_or("", |(_, v)| *v),
            status = status.as_u16(),
            "provider answered"
        );
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = read_limited(resp)
            .await
            .map_err(|e| ProviderError::Transport(format!("{}: {e}", host_of(url))))?;
        if status.is_success() {
            return Ok(body);
        }
        Err(classify(status, retry_after, &body))
    }

    /// RFC 6749 §6: a new access token from a refresh token.
    pub async fn refresh(
        &self,
        provider: &Provider,
        secret: Option<&str>,
        refresh_token: &str,
    ) -> Result<TokenResponse, ProviderError> {
        let scope = provider.scope_param();
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ];
        if provider.scope_on_refresh {
            form.push(("scope", &scope));
        }
        let body = self
            .post(&provider.token_url, provider, secret, &form)
            .await?;
        parse_token(&body)
    }

    /// RFC 8628 §3.1: starts a device authorization.
    pub async fn device_authorization(
        &self,
        provider: &Provider,
        secret: Option<&str>,
    ) -> Result<DeviceAuthorization, ProviderError> {
        let url = provider
            .device_authorization_url
            .as_deref()
            .ok_or_else(|| {
                ProviderError::Refused(format!(
                    "provider {} has no device_authorization_url",
                    provider.name
                ))
            })?;
        let scope = provider.scope_param();
        // RFC 8628 §3.1 names client_id and scope; a confidential client
        // also authenticates (§3.1 refers to RFC 6749 §2.3).
        let body = self
            .post(url, provider, secret, &[("scope", &scope)])
            .await?;
        serde_json::from_slice(&body).map_err(|_| {
            ProviderError::Transport(format!(
                "{}: the device authorization answer is not RFC 8628 JSON",
                host_of(url)
            ))
        })
    }

    /// RFC 8628 §3.4: one poll of the token endpoint.
    pub async fn poll_device(
        &self,
        provider: &Provider,
        secret: Option<&str>,
        device_code: &str,
    ) -> Result<TokenResponse, ProviderError> {
        let body = self
            .post(
                &provider.token_url,
                provider,
                secret,
                &[("grant_type", DEVICE_GRANT), ("device_code", device_code)],
            )
            .await?;
        parse_token(&body)
    }

    /// RFC 6749 §4.1.3 with RFC 7636 §4.5: exchanges an authorization code.
    pub async fn exchange_code(
        &self,
        provider: &Provider,
        secret: Option<&str>,
        code: &str,
        verifier: &str,
        redirect_uri: &str,
    ) -> Result<TokenResponse, ProviderError> {
        let body = self
            .post(
                &provider.token_url,
                provider,
                secret,
                &[
                    ("grant_type", "authorization_code"),
                    ("code", code),
                    ("code_verifier", verifier),
                    ("redirect_uri", redirect_uri),
                ],
            )
            .await?;
        parse_token(&body)
    }

    /// RFC 7009 §2.1: revokes a refresh token.
    pub async fn revoke(
        &self,
        provider: &Provider,
        secret: Option<&str>,
        token: &str,
    ) -> Result<(), ProviderError> {
        let Some(url) = provider.revocation_url.as_deref() else {
            return Ok(());
        };
        self.post(
            url,
            provider,
            secret,
            &[("token", token), ("token_type_hint", "refresh_token")],
        )
        .await
        .map(|_| ())
    }
}

fn parse_token(body: &[u8]) -> Result<TokenResponse, ProviderError> {
    let t: TokenResponse = serde_json::from_slice(body).map_err(|_| {
        ProviderError::Transport("the token answer is not RFC 6749 §5.1 JSON".into())
    })?;
    if t.access_token.is_empty() {
        return Err(ProviderError::Transport(
            "the token answer has an empty access_token".into(),
        ));
    }
    // RFC 6749 §7.1: only bearer tokens are understood by IMAP SASL.
    if let Some(tt) = &t.token_type {
        if !tt.eq_ignore_ascii_case("bearer") {
            return Err(ProviderError::Transport(format!(
                "token_type {:?} is not Bearer",
                sanitise(tt)
            )));
        }
    }
    Ok(t)
}

/// Turns an error answer into a [`ProviderError`], keeping only the
/// `error` code and a truncated `error_description`.
pub fn classify(status: StatusCode, retry_after: Option<Duration>, body: &[u8]) -> ProviderError {
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let detail = match &parsed {
        Some(e) => match &e.error_description {
            Some(d) => format!("{} ({})", sanitise(&e.error), sanitise(d)),
            None => sanitise(&e.error),
        },
        None => format!("HTTP {}", status.as_u16()),
    };
    let code = parsed.as_ref().map(|e| e.error.as_str()).unwrap_or("");
    match code {
        "invalid_grant" => ProviderError::InvalidGrant(detail),
        "authorization_pending" => ProviderError::Pending,
        "slow_down" => ProviderError::SlowDown,
        // Microsoft's device flow says `authorization_declined`.
        "access_denied" | "authorization_declined" => ProviderError::AccessDenied,
        "expired_token" => ProviderError::ExpiredToken,
        "temporarily_unavailable" => ProviderError::Throttled {
            retry_after,
            detail,
        },
        _ if status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::SERVICE_UNAVAILABLE =>
        {
            ProviderError::Throttled {
                retry_after,
                detail,
            }
        }
        _ => ProviderError::Refused(format!("HTTP {}: {detail}", status.as_u16())),
    }
}

/// The poll interval to honour, from the answer (bounded).
pub fn poll_interval(auth: &DeviceAuthorization) -> Duration {
    auth.interval
        .map_or(DEFAULT_POLL_INTERVAL, Duration::from_secs)
        .clamp(Duration::from_secs(1), MAX_POLL_INTERVAL)
}

async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if out.len() + chunk.len() > MAX_BODY {
            return Err(format!("answer longer than {MAX_BODY} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// reqwest errors can carry the URL (with query parameters); keep only the
/// host and the kind.
fn transport_text(url: &str, e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "connection failed".to_string()
    } else {
        // Not String::truncate: a byte index inside a UTF-8 sequence
        // panics. sanitise cuts on characters and drops control characters.
        sanitise(&e.without_url().to_string())
    };
    format!("{}: {kind}", host_of(url))
}

/// `host[:port]` of a URL, for messages.
pub fn host_of(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| {
            u.host_str()
                .map(|h| u.port().map_or(h.to_string(), |p| format!("{h}:{p}")))
        })
        .unwrap_or_else(|| "provider".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_only_code_and_truncated_description() {
        let body = br#"{"error":"invalid_grant","error_description":"Token has been expired or revoked.","refresh_token":"SHOULD-NOT-APPEAR"}"#;
        let e = classify(StatusCode::BAD_REQUEST, None, body);
        match &e {
            ProviderError::InvalidGrant(d) => {
                assert_eq!(d, "invalid_grant (Token has been expired or revoked.)")
            }
            other => panic!("{other:?}"),
        }
        assert!(!e.to_string().contains("SHOULD-NOT"));
        let long = format!(
            r#"{{"error":"invalid_client","error_description":"{}\u0007\r\nx"}}"#,
            "a".repeat(500)
        );
        let e = classify(StatusCode::UNAUTHORIZED, None, long.as_bytes()).to_string();
        assert!(
            e.len() < 400 && !e.contains('\u{7}') && !e.contains('\n'),
            "{e}"
        );
        // Non-JSON bodies are not echoed at all.
        let e = classify(
            StatusCode::BAD_GATEWAY,
            None,
            b"<html>access_token=abc</html>",
        );
        assert_eq!(e, ProviderError::Refused("HTTP 502: HTTP 502".into()));
    }

    #[test]
    fn throttling_signals() {
        let e = classify(
            StatusCode::TOO_MANY_REQUESTS,
            Some(Duration::from_secs(7)),
            b"",
        );
        assert!(
            matches!(e, ProviderError::Throttled { retry_after: Some(d), .. } if d.as_secs() == 7)
        );
        assert!(matches!(
            classify(StatusCode::SERVICE_UNAVAILABLE, None, b"{}"),
            ProviderError::Throttled { .. }
        ));
        assert_eq!(
            classify(StatusCode::BAD_REQUEST, None, br#"{"error":"slow_down"}"#),
            ProviderError::SlowDown
        );
        assert_eq!(
            classify(
                StatusCode::BAD_REQUEST,
                None,
                br#"{"error":"authorization_declined"}"#
            ),
            ProviderError::AccessDenied
        );
        assert_eq!(
            classify(
                StatusCode::BAD_REQUEST,
                None,
                br#"{"error":"authorization_pending"}"#
            ),
            ProviderError::Pending
        );
    }

    #[test]
    fn token_answers_and_debug_redaction() {
        let t = parse_token(br#"{"access_token":"AT-SECRET","expires_in":3599,"token_type":"Bearer","refresh_token":"RT-SECRET"}"#).unwrap();
        assert_eq!(t.expires_in, Some(3599));
        assert_eq!(t.lifetime(), 3599);
        let huge =
            parse_token(br#"{"access_token":"x","expires_in":18446744073709551615}"#).unwrap();
        assert_eq!(huge.lifetime(), MAX_EXPIRES_IN);
        let zero = parse_token(br#"{"access_token":"x","expires_in":0}"#).unwrap();
        assert_eq!(zero.lifetime(), 1);
        assert_eq!(
            parse_token(br#"{"access_token":"x"}"#).unwrap().lifetime(),
            DEFAULT_EXPIRES_IN
        );
        let d = format!("{t:?}");
        assert!(!d.contains("SECRET") && d.contains("rotated: true"), "{d}");
        assert!(parse_token(br#"{"access_token":"x","token_type":"mac"}"#).is_err());
        assert!(parse_token(br#"{"access_token":""}"#).is_err());
        let g: DeviceAuthorization = serde_json::from_slice(br#"{"device_code":"d","user_code":"ABCD-EFGH","verification_url":"https://www.google.com/device","expires_in":1800,"interval":5}"#).unwrap();
        assert_eq!(g.verification_uri, "https://www.google.com/device");
        assert_eq!(poll_interval(&g), Duration::from_secs(5));
        assert!(!format!("{g:?}").contains("ABCD"));
    }
}
