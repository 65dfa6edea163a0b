//! The internal date a copied message gets: when the old server received
//! it, read from the newest (topmost) `Received:` field's date, else from
//! `Date:`, else none (the IMAP server then uses the time of the APPEND).

use super::hash::fields;

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// An IMAP `date-time` (RFC 3501 §9), quoted, for APPEND: from the topmost
/// `Received:` (RFC 5321 §4.4: its date follows the last ";"), else `Date:`.
pub fn internal_date(header: &[u8]) -> Option<String> {
    let fields = fields(header);
    let received = fields
        .iter()
        .find(|(n, _)| n == "received")
        .and_then(|(_, v)| v.rsplit_once(';'))
        .and_then(|(_, d)| imap_date_time(d));
    received.or_else(|| {
        fields
            .iter()
            .find(|(n, _)| n == "date")
            .and_then(|(_, v)| imap_date_time(v))
    })
}

/// RFC 5322 §3.3 `date-time` (with the obsolete forms of §4.3: two-digit
/// years, zone names, comments) → `"dd-Mon-yyyy hh:mm:ss +zzzz"`.
pub fn imap_date_time(text: &str) -> Option<String> {
    // Comments, e.g. "(UTC)", are dropped; commas separate the weekday.
    let mut clean = String::with_capacity(text.len());
    let mut depth = 0u32;
    for c in text.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => clean.push(' '),
            _ if depth == 0 => clean.push(c),
            _ => {}
        }
    }
    let mut tokens: Vec<&str> = clean.split_whitespace().collect();
    if tokens
        .first()
        .is_some_and(|t| t.chars().all(|c| c.is_ascii_alphabetic()))
    {
        tokens.remove(0); // day of week
    }
    let [day, month, year, time, rest @ ..] = tokens.as_slice() else {
        return None;
    };
    let day: u32 = day.parse().ok().filter(|d| (1..=31).contains(d))?;
    let month = MONTHS.iter().position(|m| m.eq_ignore_ascii_case(month))?;
    let year: u32 = match (year.len(), year.parse::<u32>().ok()?) {
        // RFC 5322 §4.3: 00-49 → 2000-2049, 50-99 → 1950-1999.
        (2, y) if y < 50 => 2000 + y,
        (2, y) => 1900 + y,
        (3, y) => 1900 + y,
        (4, y) => y,
        _ => return None,
    };
    let mut hms = time.split(':');
    let h: u32 = hms.next()?.parse().ok().filter(|&h| h < 24)?;
    let m: u32 = hms.next()?.parse().ok().filter(|&m| m < 60)?;
    let s: u32 = match hms.next() {
        Some(s) => s.parse().ok().filter(|&s| s <= 60)?,
        None => 0,
    };
    let zone = match rest.first().copied().unwrap_or("-0000") {
        z if (z.starts_with('+') || z.starts_with('-'))
            && z.len() == 5
            && z[1..].bytes().all(|b| b.is_ascii_digit()) =>
        {
            z.to_string()
        }
        z => match z.to_ascii_uppercase().as_str() {
            "UT" | "UTC" | "GMT" | "Z" => "+0000".into(),
            "EDT" => "-0400".into(),
            "EST" | "CDT" => "-0500".into(),
            "CST" | "MDT" => "-0600".into(),
            "MST" | "PDT" => "-0700".into(),
            "PST" => "-0800".into(),
            // RFC 5322 §4.3: other (military) zones mean "unknown": -0000.
            _ => "+0000".into(),
        },
    };
    let zone = if zone == "-0000" {
        "+0000".into()
    } else {
        zone
    };
    Some(format!(
        "\"{day:02}-{}-{year:04} {h:02}:{m:02}:{s:02} {zone}\"",
        MONTHS[month]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_in_common_forms() {
        assert_eq!(
            imap_date_time("Mon, 1 Jan 2024 12:05:00 +0100").unwrap(),
            "\"01-Jan-2024 12:05:00 +0100\""
        );
        assert_eq!(
            imap_date_time(" 7 feb 99 23:59 GMT (comment)").unwrap(),
            "\"07-Feb-1999 23:59:00 +0000\""
        );
        assert_eq!(
            imap_date_time("Tue, 3 Dec 2024 01:02:03 -0000").unwrap(),
            "\"03-Dec-2024 01:02:03 +0000\""
        );
        assert_eq!(
            imap_date_time("3 Dec 2024 01:02:03 PST").unwrap(),
            "\"03-Dec-2024 01:02:03 -0800\""
        );
        for bad in [
            "",
            "yesterday",
            "32 Jan 2024 00:00",
            "1 Foo 2024 00:00",
            "1 Jan 2024 25:00",
        ] {
            assert!(imap_date_time(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn newest_received_then_date() {
        let h = b"Received: from a by b; Tue, 2 Jan 2024 10:00:00 +0000\r\n\
                  Received: from c by a;\r\n Mon, 1 Jan 2024 09:00:00 +0000\r\n\
                  Date: Sun, 31 Dec 2023 08:00:00 +0000\r\n\r\n";
        assert_eq!(internal_date(h).unwrap(), "\"02-Jan-2024 10:00:00 +0000\"");
        let h =
            b"Received: garbage without a date\r\nDate: Sun, 31 Dec 2023 08:00:00 +0000\r\n\r\n";
        assert_eq!(internal_date(h).unwrap(), "\"31-Dec-2023 08:00:00 +0000\"");
        assert!(internal_date(b"Subject: none\r\n\r\n").is_none());
    }
}
