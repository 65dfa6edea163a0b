//! What DELE means on a shared mailbox: the operator's delete policy, and
//! the per-device variant where several devices share one account.

use crate::config::is_safe_atom;
pub use crate::config::{DeletePolicy, Policy};
use crate::imap::DeleteAction;

/// Prefix of the keyword that hides a message from one device
/// (`$POP3Del-scanner`).
pub const DEVICE_KEYWORD_PREFIX: &str = "$POP3Del-";

/// Device tags are at most this long (they become keywords, which must be
/// atoms: RFC 3501 §9, no specials).
pub const MAX_DEVICE_LEN: usize = 32;

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

/// The view of `login` under a route's policy, or why it is refused (an
/// unusable device tag).
pub fn session_view(policy: &Policy, login: &str) -> Result<SessionView, &'static str> {
    let plain = |action, hide| SessionView {
        account: login.to_string(),
        device: None,
        action,
        hide,
    };
    Ok(match policy.delete {
        DeletePolicy::Expunge => plain(DeleteAction::Expunge, None),
        DeletePolicy::Keep => plain(DeleteAction::Keep, None),
        DeletePolicy::Flag => plain(
            DeleteAction::Keyword(policy.keyword.clone()),
            Some(policy.keyword.clone()),
        ),
        DeletePolicy::Move => plain(
            DeleteAction::Move {
                mailbox: policy.move_to.clone(),
                create: policy.create_move_target,
            },
            None,
        ),
        DeletePolicy::PerDevice => {
            let (account, device) = split_device(login, &policy.device_separator);
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
            session_view(&p(DeletePolicy::Expunge), "a@x")
                .unwrap()
                .action,
            DeleteAction::Expunge
        );
        let v = session_view(&p(DeletePolicy::Flag), "a@x").unwrap();
        assert_eq!(v.hide.as_deref(), Some("$POP3Deleted"));
        let v = session_view(&p(DeletePolicy::PerDevice), "alice+scan@x").unwrap();
        assert_eq!(
            (v.account.as_str(), v.device.as_deref()),
            ("alice@x", Some("scan"))
        );
        assert_eq!(v.action, DeleteAction::Keyword("$POP3Del-scan".into()));
        let v = session_view(&p(DeletePolicy::PerDevice), "alice@x").unwrap();
        assert_eq!(v.device.as_deref(), Some("default"));
        assert!(session_view(&p(DeletePolicy::PerDevice), "alice+a)b@x").is_err());
    }

    #[test]
    fn keywords_are_safe_atoms() {
        assert!(is_safe_atom("$POP3Deleted"));
        assert!(!is_safe_atom("\\Deleted"));
        assert!(!is_safe_atom("a)b"));
        assert!(!is_safe_atom("{5}"));
    }
}
