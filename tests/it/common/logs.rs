//! Waiting for popbridge's log: a line that shows up some number of times,
//! and the "session ended" line of one particular session.
//!
//! Every wait is bounded and panics with what it saw, so a test that waits
//! for a line fails loudly instead of hanging.

use std::thread;
use std::time::{Duration, Instant};

use super::Popbridge;

/// Upper bound of [`wait_for_log`].
pub const LOG_POLL_LIMIT: Duration = Duration::from_secs(20);

/// Upper bound of [`wait_session_ended`]: a session's last upstream step
/// (its LOGOUT) may wait for a slow Dovecot on the shared 2-core machine.
pub const SESSION_END_LIMIT: Duration = Duration::from_secs(30);

/// How often the log file is read again.
const LOG_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `log()` until `needle` occurs at least `count` times; panics with
/// the log after [`LOG_POLL_LIMIT`]. Returns the log.
pub fn wait_for_log(log: impl Fn() -> String, needle: &str, count: usize) -> String {
    let deadline = Instant::now() + LOG_POLL_LIMIT;
    loop {
        let text = log();
        if text.matches(needle).count() >= count {
            return text;
        }
        if Instant::now() >= deadline {
            panic!(
                "log never showed {needle:?} {count} time(s) within {LOG_POLL_LIMIT:?}:\n{text}"
            );
        }
        thread::sleep(LOG_POLL_INTERVAL);
    }
}

/// `text` contains `addr` not followed by another digit ("…:4000" must not
/// match "…:40001").
pub fn has_addr(text: &str, addr: &str) -> bool {
    text.match_indices(addr)
        .any(|(i, m)| !text[i + m.len()..].starts_with(|c: char| c.is_ascii_digit()))
}

/// Waits (bounded by [`SESSION_END_LIMIT`]) until popbridge logged
/// "session ended" on a line carrying `addr` (a bare `ip:port`, or with its
/// field name such as `peer=ip:port`); returns that line. Every upstream
/// effect of a session (its LOGOUT included) happens before that line.
pub fn wait_session_ended(pb: &Popbridge, addr: &str) -> String {
    let deadline = Instant::now() + SESSION_END_LIMIT;
    loop {
        if let Some(l) = pb
            .log()
            .lines()
            .find(|l| l.contains("session ended") && has_addr(l, addr))
        {
            return l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "popbridge did not log \"session ended\" for {addr} within {SESSION_END_LIMIT:?}"
        );
        thread::sleep(LOG_POLL_INTERVAL);
    }
}
