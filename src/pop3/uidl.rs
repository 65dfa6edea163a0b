//! UIDL strings from IMAP UID and UIDVALIDITY.
//!
//! A message's (UIDVALIDITY, UID) pair never changes while it exists (RFC 3501
//! §2.3.1.1), so a UIDL built from it is stable across sessions and devices.
//! Templates use Dovecot's `pop3_uidl_format` syntax so an operator can copy
//! the setting of the POP3 server popbridge replaces. Hex digits are
//! lower-case, as Dovecot prints them.

use std::fmt::Write as _;

/// RFC 1939 §7: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
pub const MAX_UIDL_LEN: usize = 70;

/// Dovecot's default `pop3_uidl_format`.
pub const DOVECOT_FORMAT: &str = "%08Xu%08Xv";

/// Why there is no `courier` preset (there was one, `%v-%u`, until issue
/// 18): Courier's own POP3 server (courier-pop) serves UIDLs such as
/// `UID12-1796201933` from counters of its own, not from the IMAP UID and
/// UIDVALIDITY, so no template reproduces them, and a wrong one makes every
/// client download everything again.
pub const COURIER_REMOVED: &str = "there is no \"courier\" preset: Courier's own POP3 server \
     serves UIDLs from its own counters (like UID12-1796201933), which no template over the \
     IMAP UID and UIDVALIDITY reproduces. Migrate Courier users with `popbridge migrate capture` \
     (mail already moved; serve with uidl_map = true) or `popbridge migrate copy` (serve with \
     reuse_xuidl = true), and keep the default uidl_format";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    Uid,
    UidValidity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Radix {
    Decimal,
    /// Dovecot's `X` modifier. Despite the capital letter, Dovecot 2.3 prints
    /// lower-case hex digits (measured: `%08Xu%08Xv` gives
    /// `000000016b07998f`), and clients remember those exact strings.
    Hex,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Var {
        var: Var,
        width: usize,
        radix: Radix,
    },
}

/// A parsed UIDL template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidlFormat {
    pieces: Vec<Piece>,
    source: String,
}

/// Why a template was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UidlFormatError {
    #[error("uidl_format {0:?}: unknown variable or preset (use %u and %v, e.g. \"%08Xu%08Xv\", or a preset: dovecot, cyrus, uw)")]
    UnknownVariable(String),
    /// The `courier` preset is gone: see [`COURIER_REMOVED`].
    #[error("uidl_format {0:?}: {COURIER_REMOVED}")]
    Courier(String),
    #[error("uidl_format {0:?} does not contain the UID (%u): UIDLs would not be unique")]
    NoUid(String),
    #[error("uidl_format {0:?} contains a character outside 0x21-0x7E (RFC 1939 §7)")]
    BadCharacter(String),
    #[error("uidl_format {0:?} can produce UIDLs longer than 70 characters (RFC 1939 §7)")]
    TooLong(String),
}

impl UidlFormat {
    /// Parses a preset name or a template such as `%08Xu%08Xv`.
    ///
    /// Presets: `dovecot` (`%08Xu%08Xv`), `cyrus` (`%v.%u`), `uw`
    /// (`%08Xv%08Xu`). `courier` is refused ([`COURIER_REMOVED`]).
    pub fn parse(spec: &str) -> Result<Self, UidlFormatError> {
        let template = match spec.to_ascii_lowercase().as_str() {
            "dovecot" => DOVECOT_FORMAT,
            "cyrus" => "%v.%u",
            "courier" => return Err(UidlFormatError::Courier(spec.to_string())),
            "uw" => "%08Xv%08Xu",
            _ => spec,
        };
        let bad = || UidlFormatError::UnknownVariable(spec.to_string());
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut chars = template.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                if !(c.is_ascii() && (0x21..=0x7e).contains(&(c as u32))) {
                    return Err(UidlFormatError::BadCharacter(spec.to_string()));
                }
                literal.push(c);
                continue;
            }
            if chars.peek() == Some(&'%') {
                chars.next();
                literal.push('%');
                continue;
            }
            let mut width = 0usize;
            while let Some(d) = chars.peek().and_then(|c| c.to_digit(10)) {
                chars.next();
                width = width
                    .checked_mul(10)
                    .and_then(|w| w.checked_add(d as usize))
                    .ok_or_else(bad)?;
            }
            if width > MAX_UIDL_LEN {
                return Err(UidlFormatError::TooLong(spec.to_string()));
            }
            let radix = match chars.peek() {
                Some('X' | 'x') => {
                    chars.next();
                    Radix::Hex
                }
                _ => Radix::Decimal,
            };
            let var = match chars.next() {
                Some('u') => Var::Uid,
                Some('v') => Var::UidValidity,
                _ => return Err(bad()),
            };
            if !literal.is_empty() {
                pieces.push(Piece::Literal(std::mem::take(&mut literal)));
            }
            pieces.push(Piece::Var { var, width, radix });
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        if !pieces
            .iter()
            .any(|p| matches!(p, Piece::Var { var: Var::Uid, .. }))
        {
            return Err(UidlFormatError::NoUid(spec.to_string()));
        }
        let fmt = Self {
            pieces,
            source: spec.to_string(),
        };
        // The longest output: both variables at u32::MAX.
        if fmt.render(u32::MAX, u32::MAX).len() > MAX_UIDL_LEN {
            return Err(UidlFormatError::TooLong(spec.to_string()));
        }
        Ok(fmt)
    }

    /// The UIDL of message `uid` in a mailbox with `uidvalidity`.
    pub fn render(&self, uid: u32, uidvalidity: u32) -> String {
        let mut s = String::with_capacity(24);
        for p in &self.pieces {
            match p {
                Piece::Literal(l) => s.push_str(l),
                Piece::Var { var, width, radix } => {
                    let v = match var {
                        Var::Uid => uid,
                        Var::UidValidity => uidvalidity,
                    };
                    let w = *width;
                    // Writing to a String cannot fail.
                    let _ = match radix {
                        Radix::Decimal => write!(s, "{v:0w$}"),
                        Radix::Hex => write!(s, "{v:0w$x}"),
                    };
                }
            }
        }
        s
    }

    /// The template as configured.
    pub fn source(&self) -> &str {
        &self.source
    }
}

impl Default for UidlFormat {
    fn default() -> Self {
        // The default template is known to be valid.
        Self::parse(DOVECOT_FORMAT).unwrap_or_else(|_| unreachable!())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dovecot_default() {
        let f = UidlFormat::default();
        assert_eq!(f.render(1, 1700000000), "000000016553f100");
        assert_eq!(f.render(0xABCDEF, 0x12), "00abcdef00000012");
        assert_eq!(
            UidlFormat::parse("dovecot").unwrap().render(5, 6),
            "0000000500000006"
        );
    }

    #[test]
    fn presets_and_templates() {
        assert_eq!(
            UidlFormat::parse("cyrus").unwrap().render(7, 1234),
            "1234.7"
        );
        assert_eq!(
            UidlFormat::parse("uw").unwrap().render(7, 0x1234),
            "0000123400000007"
        );
        assert_eq!(
            UidlFormat::parse("%v.%u").unwrap().render(7, 1234),
            "1234.7"
        );
        assert_eq!(
            UidlFormat::parse("u%xu-%%").unwrap().render(255, 1),
            "uff-%"
        );
        assert_eq!(UidlFormat::parse("%5u").unwrap().render(42, 1), "00042");
    }

    #[test]
    fn the_courier_preset_is_refused_with_the_way_to_migrate() {
        for spec in ["courier", "Courier"] {
            let e = UidlFormat::parse(spec).unwrap_err();
            assert_eq!(e, UidlFormatError::Courier(spec.into()));
            let text = e.to_string();
            for part in ["UID12-1796201933", "migrate capture", "migrate copy"] {
                assert!(text.contains(part), "{text}");
            }
        }
        // A template of that shape is still the operator's to choose.
        assert_eq!(
            UidlFormat::parse("%v-%u").unwrap().render(7, 1234),
            "1234-7"
        );
    }

    #[test]
    fn bad_templates_are_refused() {
        assert!(matches!(
            UidlFormat::parse("%v"),
            Err(UidlFormatError::NoUid(_))
        ));
        assert!(matches!(
            UidlFormat::parse("%m"),
            Err(UidlFormatError::UnknownVariable(_))
        ));
        assert!(matches!(
            UidlFormat::parse("%"),
            Err(UidlFormatError::UnknownVariable(_))
        ));
        assert!(matches!(
            UidlFormat::parse("a b%u"),
            Err(UidlFormatError::BadCharacter(_))
        ));
        assert!(matches!(
            UidlFormat::parse("%80u"),
            Err(UidlFormatError::TooLong(_))
        ));
        assert!(matches!(
            UidlFormat::parse("%99999999999999999999999u"),
            Err(UidlFormatError::UnknownVariable(_))
        ));
        assert!(matches!(
            UidlFormat::parse("%999999999999u"),
            Err(UidlFormatError::TooLong(_))
        ));
    }

    #[test]
    fn fixed_width_or_separator_keeps_uidls_distinct() {
        // "1"+"23" and "12"+"3" must not collide.
        for spec in ["dovecot", "cyrus", "uw"] {
            let f = UidlFormat::parse(spec).unwrap();
            assert_ne!(f.render(23, 1), f.render(3, 12), "{spec}");
        }
    }
}
