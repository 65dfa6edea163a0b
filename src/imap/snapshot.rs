//! SELECT and the snapshot a POP3 session works on, through the listing
//! cache.

use async_imap::imap_proto::{
    AttributeValue, Capability, MailboxDatum, Response, ResponseCode, Status,
};
use tracing::{debug, warn};

use super::cache::{self, Listing, ListingKey, Plan};
use super::commit::EXPUNGING_KEYWORD;
use super::conn::ImapConn;
use super::syntax::{quote_mailbox, x_uidl};
use super::{Snapshot, UpstreamError};
use crate::metrics::metrics;

/// A capability as the server wrote it (`IMAP4rev1`, `AUTH=PLAIN`, `UIDPLUS`).
pub fn capability_name(c: &Capability<'_>) -> String {
    match c {
        Capability::Imap4rev1 => "IMAP4rev1".to_string(),
        Capability::Auth(m) => format!("AUTH={m}"),
        Capability::Atom(a) => a.to_string(),
    }
}

impl ImapConn {
    /// CAPABILITY (pipelined with SELECT), then the snapshot.
    pub(super) async fn select_and_snapshot(&mut self) -> Result<Snapshot, UpstreamError> {
        self.settle().await?;
        let mailbox = quote_mailbox(&self.config.mailbox)?;
        // The capabilities may change at login, so ask again.
        let cap_tag = self.wire.send("CAPABILITY", "CAPABILITY").await?;
        let select_tag = self
            .wire
            .send(&format!("SELECT {mailbox}"), "SELECT")
            .await?;
        // Messages a QUIT flagged \Deleted and never expunged (the
        // connection broke in between): asked in the same round trip.
        let abandoned_tag = self
            .wire
            .send(
                &format!("UID SEARCH KEYWORD {EXPUNGING_KEYWORD}"),
                "UID SEARCH",
            )
            .await?;
        let mut uidplus = false;
        let mut has_move = false;
        let mut names = Vec::new();
        self.wire
            .finish(&cap_tag, "CAPABILITY", |r| {
                if let Response::Capabilities(caps) = r {
                    names = caps.iter().map(capability_name).collect();
                    has_move = caps.iter().any(
                        |c| matches!(c, Capability::Atom(a) if a.eq_ignore_ascii_case("MOVE")),
                    );
                    uidplus = caps.iter().any(
                        |c| matches!(c, Capability::Atom(a) if a.eq_ignore_ascii_case("UIDPLUS")),
                    );
                }
            })
            .await?;
        self.uidplus = uidplus;
        self.has_move = has_move;
        self.capabilities = names;

        let mut exists = None;
        let mut uidvalidity = None;
        let mut uidnext = None;
        let mut marks = false;
        self.wire
            .finish(&select_tag, "SELECT", |r| match r {
                Response::MailboxData(MailboxDatum::Exists(n)) => exists = Some(*n),
                Response::Data {
                    status: Status::Ok,
                    outcome,
                } => match &outcome.code {
                    Some(ResponseCode::UidValidity(v)) => uidvalidity = Some(*v),
                    Some(ResponseCode::UidNext(n)) => uidnext = Some(*n),
                    Some(ResponseCode::PermanentFlags(flags)) => {
                        marks = flags.iter().any(|f| {
                            f.as_ref() == "\\*" || f.eq_ignore_ascii_case(EXPUNGING_KEYWORD)
                        })
                    }
                    _ => {}
                },
                _ => {}
            })
            .await?;
        self.marks_expunging = marks;
        let mut abandoned = Vec::new();
        let searched = self
            .wire
            .finish(&abandoned_tag, "UID SEARCH", |r| {
                if let Response::MailboxData(MailboxDatum::Search(v)) = r {
                    abandoned.extend_from_slice(v);
                }
            })
            .await;
        match searched {
            Ok(_) => {}
            // A server that cannot search by keyword has none of ours.
            Err(e) if !e.is_fatal() => {
                debug!(error = %e, "search for interrupted expunges refused");
                abandoned.clear();
            }
            Err(e) => return Err(e),
        }
        let (Some(exists), Some(uidvalidity)) = (exists, uidvalidity) else {
            return Err(UpstreamError::Protocol(
                "SELECT without EXISTS or UIDVALIDITY".into(),
            ));
        };
        if !abandoned.is_empty() {
            abandoned.sort_unstable();
            abandoned.dedup();
            self.take_back_deleted(&abandoned).await?;
            warn!(
                messages = abandoned.len(),
                "took back \\Deleted that an interrupted QUIT had set (its UID EXPUNGE never ran)"
            );
        }

        let key = self.config.cache.as_ref().map(|_| ListingKey {
            upstream: self.config.address.as_str().into(),
            account: self.account.clone(),
            mailbox: self.config.mailbox.clone(),
        });
        let cached = match (&self.config.cache, &key) {
            (Some(cache), Some(key)) => cache.get(key),
            _ => None,
        };
        let want_xuidl = self.config.reuse_xuidl;
        // A listing cached without X-UIDLs cannot serve a route that wants them.
        let cached = cached.filter(|c| !want_xuidl || c.xuidl.is_some());
        let plan = cache::plan(cached.as_deref(), uidvalidity, uidnext, exists);
        let items = if want_xuidl {
            "(UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (X-UIDL)])"
        } else {
            "(UID RFC822.SIZE)"
        };
        let mut xuidl = std::collections::HashMap::new();
        let messages = match (&plan, &cached) {
            (Plan::Reuse, Some(c)) => {
                if let Some(x) = &c.xuidl {
                    xuidl = (**x).clone();
                }
                Some(c.messages.to_vec())
            }
            (Plan::FetchFrom(from), Some(c)) => {
                let (new, new_x) = self.list(&format!("UID FETCH {from}:* {items}")).await?;
                let merged = cache::merge(c, new, exists);
                if merged.is_some() {
                    if let Some(x) = &c.xuidl {
                        xuidl = (**x).clone();
                    }
                    xuidl.extend(new_x);
                }
                merged
            }
            _ => None,
        };
        // How the listing was obtained, for the log: "cached", "new only",
        // "full" (a FetchFrom whose count did not add up ends as "full").
        let mut listing = if plan == Plan::Reuse {
            "cached"
        } else {
            "new only"
        };
        let messages = match messages {
            Some(m) => {
                let counters = metrics();
                if plan == Plan::Reuse {
                    counters.cache_hits.inc();
                } else {
                    counters.cache_partial.inc();
                }
                m
            }
            // `FETCH 1:*` on an empty mailbox is a BAD in Dovecot: skip it.
            None if exists == 0 => {
                listing = "empty";
                Vec::new()
            }
            None => {
                listing = "full";
                if self.config.cache.is_some() {
                    metrics().cache_misses.inc();
                }
                let (mut m, x) = self.list(&format!("UID FETCH 1:* {items}")).await?;
                xuidl = x;
                m.sort_unstable_by_key(|x| x.0);
                m.dedup_by_key(|x| x.0);
                m
            }
        };
        if let (Some(cache), Some(key)) = (&self.config.cache, key) {
            let listing = Listing {
                uidvalidity,
                uidnext: cache::next_uid(uidnext, &messages),
                messages: std::sync::Arc::new(messages.clone()),
                xuidl: want_xuidl.then(|| std::sync::Arc::new(xuidl.clone())),
            };
            if cached.as_deref() != Some(&listing) {
                cache.insert(key, listing);
            }
        }
        // Hidden messages stay in the cached listing (it describes the
        // mailbox); flags change, so they are asked for at every login.
        let mut messages = messages;
        if let Some(keyword) = self.hide_keyword.clone() {
            if !messages.is_empty() {
                let mut hidden = Vec::new();
                self.exec(
                    &format!("UID SEARCH KEYWORD {keyword}"),
                    "UID SEARCH",
                    |r| {
                        if let Response::MailboxData(MailboxDatum::Search(v)) = r {
                            hidden.extend_from_slice(v);
                        }
                    },
                )
                .await?;
                hidden.sort_unstable();
                messages.retain(|m| hidden.binary_search(&m.0).is_err());
            }
        }
        self.uidvalidity = Some(uidvalidity);
        debug!(
            exists,
            uidvalidity,
            listed = messages.len(),
            uidplus,
            listing,
            "snapshot taken"
        );
        Ok(Snapshot {
            uidvalidity,
            messages,
            xuidl,
        })
    }

    /// Runs a `UID FETCH ... (UID RFC822.SIZE [X-UIDL header])` and
    /// collects (UID, size) and any valid X-UIDL values.
    async fn list(
        &mut self,
        cmd: &str,
    ) -> Result<(Vec<(u32, u64)>, std::collections::HashMap<u32, String>), UpstreamError> {
        let mut messages = Vec::new();
        let mut xuidl = std::collections::HashMap::new();
        self.exec(cmd, "UID FETCH", |r| {
            if let Response::Fetch(_, attrs) = r {
                let mut uid = None;
                let mut size = None;
                let mut header = None;
                for a in attrs {
                    match a {
                        AttributeValue::Uid(u) => uid = Some(*u),
                        AttributeValue::Rfc822Size(s) => size = Some(u64::from(*s)),
                        AttributeValue::BodySection { data: Some(d), .. } => header = x_uidl(d),
                        _ => {}
                    }
                }
                // Unsolicited FETCH (flag changes) carry no size: skip them.
                if let (Some(u), Some(s)) = (uid, size) {
                    messages.push((u, s));
                    if let Some(h) = header {
                        xuidl.insert(u, h);
                    }
                }
            }
        })
        .await?;
        Ok((messages, xuidl))
    }
}
