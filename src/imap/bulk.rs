//! For `popbridge migrate`: headers or whole messages of many messages in
//! few commands, and APPEND.

use async_imap::imap_proto::{AttributeValue, Response};

use super::conn::ImapConn;
use super::syntax::{quote_mailbox, uid_sets};
use super::UpstreamError;

/// The longest literal `for_each_header` and `for_each_message` take
/// whole: a header (`popbridge migrate` hashes at most 1 MiB of one) or a
/// message of a batch (at most 1 MiB by RFC822.SIZE there; twice that
/// allows a size that is off). The framer's default bound on a buffered
/// literal is smaller; a literal over this ends the session.
pub const MAX_BULK_LITERAL: usize = 2 * 1024 * 1024;

impl ImapConn {
    /// `UID FETCH <uids> (UID RFC822.SIZE BODY.PEEK[HEADER])`, in sets of
    /// bounded length, calling `each(uid, size, header)` per message as it
    /// arrives (nothing is collected here).
    pub async fn for_each_header(
        &mut self,
        uids: &[u32],
        each: impl FnMut(u32, u64, &[u8]) + Send,
    ) -> Result<(), UpstreamError> {
        self.for_each_section(uids, "HEADER", each).await
    }

    /// `UID FETCH <uids> (UID RFC822.SIZE BODY.PEEK[])`: whole messages,
    /// `each(uid, size, message)` per message as it arrives. Each message is
    /// one response, so this is for messages well under [`super::MAX_RESPONSE`]
    /// (larger ones go through [`super::Upstream::fetch`], in chunks); the
    /// caller bounds how many octets one call asks for.
    pub async fn for_each_message(
        &mut self,
        uids: &[u32],
        each: impl FnMut(u32, u64, &[u8]) + Send,
    ) -> Result<(), UpstreamError> {
        self.for_each_section(uids, "", each).await
    }

    async fn for_each_section(
        &mut self,
        uids: &[u32],
        section: &str,
        mut each: impl FnMut(u32, u64, &[u8]) + Send,
    ) -> Result<(), UpstreamError> {
        self.ensure_usable()?;
        self.wire.max_literal(Some(MAX_BULK_LITERAL));
        let r = self.sections(uids, section, &mut each).await;
        self.wire.max_literal(None);
        r
    }

    async fn sections(
        &mut self,
        uids: &[u32],
        section: &str,
        each: &mut (impl FnMut(u32, u64, &[u8]) + Send),
    ) -> Result<(), UpstreamError> {
        for set in uid_sets(uids) {
            let cmd = format!("UID FETCH {set} (UID RFC822.SIZE BODY.PEEK[{section}])");
            let r = self
                .exec(&cmd, "UID FETCH", |r| {
                    if let Response::Fetch(_, attrs) = r {
                        let (mut uid, mut size, mut header) = (None, None, None);
                        for a in attrs {
                            match a {
                                AttributeValue::Uid(u) => uid = Some(*u),
                                AttributeValue::Rfc822Size(n) => size = Some(u64::from(*n)),
                                AttributeValue::BodySection { data: Some(d), .. } => {
                                    header = Some(d.as_ref())
                                }
                                _ => {}
                            }
                        }
                        if let (Some(u), Some(n), Some(h)) = (uid, size, header) {
                            each(u, n, h);
                        }
                    }
                })
                .await;
            self.note(r)?;
        }
        Ok(())
    }

    /// APPENDs `message` to the mailbox this connection serves (RFC 3501
    /// §6.3.11), with optional flags (`(\\Seen)`) and internal date
    /// (`"01-Jan-2024 12:00:00 +0000"`), through the checked loop so a
    /// refusal keeps the server's words (`[OVERQUOTA] ...`). The literal is
    /// sent after the server's continuation; the time allowed for it grows
    /// with the size (the command timeout plus a second per MiB).
    pub async fn append(
        &mut self,
        message: &[u8],
        flags: Option<&str>,
        internal_date: Option<&str>,
    ) -> Result<(), UpstreamError> {
        self.ensure_usable()?;
        let r = self.append_inner(message, flags, internal_date).await;
        self.note(r)
    }

    async fn append_inner(
        &mut self,
        message: &[u8],
        flags: Option<&str>,
        internal_date: Option<&str>,
    ) -> Result<(), UpstreamError> {
        let mut cmd = format!("APPEND {}", quote_mailbox(&self.config.mailbox)?);
        for extra in [flags, internal_date].into_iter().flatten() {
            cmd.push(' ');
            cmd.push_str(extra);
        }
        cmd.push_str(&format!(" {{{}}}", message.len()));
        self.settle().await?;
        let tag = self.wire.send(&cmd, "APPEND").await?;
        // RFC 3501 §7.5: the literal goes after the server's `+`. A refusal
        // before it (quota, no such mailbox) keeps the server's words.
        self.wire.continuation(&tag, "APPEND").await?;
        self.wire.write_long(message, "APPEND").await?;
        self.wire.write(b"\r\n", "APPEND").await?;
        self.wire.finish(&tag, "APPEND", |_| {}).await.map(|_| ())
    }
}
