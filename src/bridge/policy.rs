//! What DELE means on a shared mailbox: the operator's delete policy, and
//! the per-device variant where several devices share one account.

use serde::{Deserialize, Serialize};

/// Dovecot's `pop3_deleted_flag` is commonly set to this keyword.
pub const DEFAULT_DELETED_KEYWORD: &str = "$POP3Deleted";

/// Prefix of the keyword that hides a message from one device
/// (`$POP3Del-scanner`).
pub const DEVICE_KEYWORD_PREFIX: &str = "$POP3Del-";

/// RFC 3501 §9 `atom`: no specials. Keywords and device tags must be atoms
/// so they travel unquoted and can never become IMAP syntax.
pub const MAX_DEVICE_LEN: usize = 32;

/// The operator's choice, per route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeletePolicy {
    /// `\Deleted` and `UID EXPUNGE` of exactly the marked messages.
    #[default]
    Expunge,
    /// Set a keyword; POP3 sessions stop listing those messages, IMAP users
    /// still see them (Dovecot's `pop3_delete_type = flag`).
    Flag,
    /// Move the messages to another mailbox.
    Move,
    /// Accept DELE and QUIT, change nothing ("leave mail on server").
    Keep,
    /// Hide the messages from the device that deleted them only (a keyword
    /// per device); other devices and IMAP users keep seeing them.
    PerDevice,
}

/// What QUIT does with the marked messages, for one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteAction {
    Expunge,
    /// Add this keyword.
    Keyword(String),
    /// Move to this mailbox, creating it first if `create`.
    Move {
        mailbox: String,
        create: bool,
    },
    Keep,
}

/// A route's settings for shared mailboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub delete: DeletePolicy,
    /// The keyword of the `flag` policy.
    pub keyword: String,
    /// The target of the `move` policy.
    pub move_to: String,
    /// Create `move_to` at QUIT when it does not exist.
    pub create_move_target: bool,
    /// Between account and device in a login (`alice+scanner`), for
    /// `per-device`.
    pub device_separator: String,
    /// One POP3 session per account and mailbox at a time (in this process).
    pub lock: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            delete: DeletePolicy::Expunge,
            keyword: DEFAULT_DELETED_KEYWORD.into(),
            move_to: "Trash".into(),
            create_move_target: false,
            device_separator: "+".into(),
            lock: false,
        }
    }
}

/// What one session's login means under a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    /// The account to log in as (the device tag removed).
    pub account: String,
    /// The device, for `per-device`.
    pub device: Option<String>,
    /// What QUIT does with DELE'd messages.
    pub action: DeleteAction,
    /// Messages carrying this keyword are not listed.
    pub hide: Option<String>,
}

impl Policy {
    /// The view for `login`, or why it is refused (an unusable device tag).
    pub fn view(&self, login: &str) -> Result<SessionView, &'static str> {
        let plain = |action, hide| SessionView {
            account: login.to_string(),
            device: None,
            action,
            hide,
        };
        Ok(match self.delete {
            DeletePolicy::Expunge => plain(DeleteAction::Expunge, None),
            DeletePolicy::Keep => plain(DeleteAction::Keep, None),
            DeletePolicy::Flag => plain(
                DeleteAction::Keyword(self.keyword.clone()),
                Some(self.keyword.clone()),
            ),
            DeletePolicy::Move => plain(
                DeleteAction::Move {
                    mailbox: self.move_to.clone(),
                    create: self.create_move_target,
                },
                None,
            ),
            DeletePolicy::PerDevice => {
                let (account, device) = split_device(login, &self.device_separator);
                // A login without a device tag is the device "default".
                let device = device.unwrap_or("default");
                if !valid_device(device) {
                    return Err("Invalid device name: use letters, digits, '-', '_' or '.'.");
                }
                let keyword = device_keyword(device);
                SessionView {
                    account,
                    device: Some(device.to_string()),
                    action: DeleteAction::Keyword(keyword.clone()),
                    hide: Some(keyword),
                }
            }
        })
    }
}

/// True for an IMAP atom made of letters, digits and `$ - _ .` (a strict
/// subset of RFC 3501's atom-char, so it is safe everywhere).
pub fn is_safe_atom(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'$' | b'-' | b'_' | b'.'))
}

/// Splits a login such as `alice+scanner@example.org` at `separator` into
/// the account (`alice@example.org`) and the device (`scanner`). Without a
/// separator in the local part the device is `None`.
pub fn split_device<'a>(login: &'a str, separator: &str) -> (String, Option<&'a str>) {
    if separator.is_empty() {
        return (login.to_string(), None);
    }
    let (local, domain) = match login.rsplit_once('@') {
        Some((l, d)) => (l, Some(d)),
        None => (login, None),
    };
    let Some((account, device)) = local.split_once(separator) else {
        return (login.to_string(), None);
    };
    let account = match domain {
        Some(d) => format!("{account}@{d}"),
        None => account.to_string(),
    };
    (account, Some(device))
}

/// The keyword that hides messages from `device`.
pub fn device_keyword(device: &str) -> String {
    format!("{DEVICE_KEYWORD_PREFIX}{device}")
}

/// A device tag is usable when it makes a safe keyword.
pub fn valid_device(device: &str) -> bool {
    device.len() <= MAX_DEVICE_LEN && is_safe_atom(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_split_from_logins() {
        assert_eq!(
            split_device("alice+scanner@example.org", "+"),
            ("alice@example.org".into(), Some("scanner"))
        );
        assert_eq!(
            split_device("alice+printer", "+"),
            ("alice".into(), Some("printer"))
        );
        assert_eq!(
            split_device("alice@example.org", "+"),
            ("alice@example.org".into(), None)
        );
        assert_eq!(split_device("a+b+c@x", "+"), ("a@x".into(), Some("b+c")));
        assert_eq!(split_device("alice+x", ""), ("alice+x".into(), None));
        assert!(valid_device("scanner-2"));
        assert!(!valid_device("b+c"));
        assert!(!valid_device("a b"));
        assert!(!valid_device(""));
        assert!(!valid_device(&"x".repeat(40)));
        assert_eq!(device_keyword("scanner"), "$POP3Del-scanner");
    }

    #[test]
    fn views_per_policy() {
        let p = |delete| Policy {
            delete,
            ..Policy::default()
        };
        assert_eq!(
            p(DeletePolicy::Expunge).view("a@x").unwrap().action,
            DeleteAction::Expunge
        );
        let v = p(DeletePolicy::Flag).view("a@x").unwrap();
        assert_eq!(v.hide.as_deref(), Some("$POP3Deleted"));
        let v = p(DeletePolicy::PerDevice).view("alice+scan@x").unwrap();
        assert_eq!(
            (v.account.as_str(), v.device.as_deref()),
            ("alice@x", Some("scan"))
        );
        assert_eq!(v.action, DeleteAction::Keyword("$POP3Del-scan".into()));
        let v = p(DeletePolicy::PerDevice).view("alice@x").unwrap();
        assert_eq!(v.device.as_deref(), Some("default"));
        assert!(p(DeletePolicy::PerDevice).view("alice+a)b@x").is_err());
    }

    #[test]
    fn keywords_are_safe_atoms() {
        assert!(is_safe_atom("$POP3Deleted"));
        assert!(!is_safe_atom("\\Deleted"));
        assert!(!is_safe_atom("a)b"));
        assert!(!is_safe_atom("{5}"));
    }
}
