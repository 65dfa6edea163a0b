//! What can go wrong talking to the IMAP server.
//!
//! Upstream wording (an IMAP server's NO text, an I/O error) is for the log
//! only: the POP3 client sees the fixed texts the bridge chooses, with
//! RFC 3206 response codes.

use std::io;

/// Something went wrong talking to the IMAP server.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("connection closed by the server")]
    ConnectionLost,
    #[error("server greeting refused the session: {0}")]
    Greeting(String),
    #[error("authentication refused: {0}")]
    AuthFailed(String),
    /// The IMAP server refused an OAuth2 access token. `status` is the
    /// provider's error status from the SASL error challenge (RFC 7628
    /// §3.2.2), when it sent one; never the token.
    #[error("access token refused (status {}): {text}", status.as_deref().unwrap_or("none"))]
    TokenRejected {
        status: Option<String>,
        text: String,
    },
    /// The IMAP server throttles the account (Gmail's `[THROTTLED]`,
    /// connection limits, RFC 5530 `[UNAVAILABLE]`).
    #[error("throttled by the mail server: {0}")]
    Throttled(String),
    #[error("server answered NO to {command}: {text}")]
    No { command: &'static str, text: String },
    #[error("server answered BAD to {command}: {text}")]
    Bad { command: &'static str, text: String },
    #[error("unexpected response: {0}")]
    Protocol(String),
    #[error("message UID {uid} size changed: expected {expected} octets, got {got}")]
    SizeMismatch { uid: u32, expected: u64, got: u64 },
    #[error("message UID {uid} disappeared while it was being sent")]
    VanishedMidStream { uid: u32 },
    #[error("{0}")]
    Unsupported(String),
    #[error("connection unusable after an earlier error")]
    Poisoned,
    #[error("TLS: {0}")]
    Tls(String),
}

impl UpstreamError {
    /// True when the upstream connection can no longer be used: every later
    /// command on it would fail or, worse, read the wrong reply.
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            UpstreamError::No { .. }
                | UpstreamError::Bad { .. }
                | UpstreamError::AuthFailed(_)
                | UpstreamError::TokenRejected { .. }
                | UpstreamError::Throttled(_)
                | UpstreamError::Unsupported(_)
        )
    }

    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::Io(_) => "io",
            UpstreamError::ConnectionLost => "connection_lost",
            UpstreamError::Greeting(_) => "greeting",
            UpstreamError::AuthFailed(_) => "auth_failed",
            UpstreamError::TokenRejected { .. } => "token_rejected",
            UpstreamError::Throttled(_) => "throttled",
            UpstreamError::No { .. } => "no",
            UpstreamError::Bad { .. } => "bad",
            UpstreamError::Protocol(_) => "protocol",
            UpstreamError::SizeMismatch { .. } => "size_mismatch",
            UpstreamError::VanishedMidStream { .. } => "vanished",
            UpstreamError::Unsupported(_) => "unsupported",
            UpstreamError::Poisoned => "poisoned",
            UpstreamError::Tls(_) => "tls",
        }
    }
}
