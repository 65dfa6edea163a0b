//! QUIT's commit: `\Seen`, then removing exactly the DELE'd messages as
//! the delete policy says.

use async_imap::imap_proto::{MailboxDatum, Response};
use tracing::warn;

use super::conn::ImapConn;
use super::syntax::{messages, quote_mailbox, uid_sets};
use super::{CommitReport, DeleteAction, UpstreamError};
use crate::config::NoUidplus;

/// The private keyword QUIT sets together with `\Deleted` (one STORE) on
/// the messages it is about to expunge. If the connection breaks before
/// `UID EXPUNGE` runs, those messages (and only they) keep `\Deleted`, and
/// an IMAP client's EXPUNGE would remove them although the POP3 client
/// was told QUIT failed; the next login of the account finds them by this
/// keyword and takes both flags back. Used where the mailbox's
/// PERMANENTFLAGS allow it; elsewhere `\Deleted` is set alone, as before.
pub const EXPUNGING_KEYWORD: &str = "$PopbridgeExpunge";

impl ImapConn {
    /// The flags QUIT sets on messages it is about to expunge.
    fn expunge_flags(&self) -> String {
        if self.marks_expunging {
            format!("{EXPUNGING_KEYWORD} \\Deleted")
        } else {
            "\\Deleted".to_string()
        }
    }

    /// Removes `\Deleted` and [`EXPUNGING_KEYWORD`] from `uids`: what QUIT
    /// set and did not expunge (a message another client had flagged
    /// `\Deleted` loses the flag too; that keeps mail, never loses it).
    pub(super) async fn take_back_deleted(&mut self, uids: &[u32]) -> Result<(), UpstreamError> {
        let flags = self.expunge_flags();
        self.store(uids, "-FLAGS.SILENT", &flags).await
    }

    pub(super) async fn commit_inner(
        &mut self,
        delete: &[u32],
        seen: &[u32],
        action: &DeleteAction,
    ) -> Result<CommitReport, UpstreamError> {
        self.store(seen, "+FLAGS.SILENT", "\\Seen").await?;
        if delete.is_empty() {
            return Ok(CommitReport::default());
        }
        match action {
            DeleteAction::Expunge => {}
            DeleteAction::Keep => {
                return Ok(CommitReport {
                    summary: Some(format!(
                        "{} kept on the server as configured.",
                        messages(delete.len())
                    )),
                    ..CommitReport::default()
                })
            }
            DeleteAction::Keyword(keyword) => {
                self.store(delete, "+FLAGS.SILENT", keyword).await?;
                return Ok(CommitReport {
                    summary: Some(format!(
                        "{} hidden from POP3, kept on the server.",
                        messages(delete.len())
                    )),
                    ..CommitReport::default()
                });
            }
            DeleteAction::Move { mailbox, create } => {
                return self.move_to(delete, mailbox, *create).await
            }
        }
        if !self.uidplus {
            match self.config.no_uidplus {
                NoUidplus::Refuse => {
                    return Ok(CommitReport {
                        not_removed: delete.to_vec(),
                        reason: Some(
                            "Mail server lacks UIDPLUS; nothing was deleted (see no_uidplus)."
                                .into(),
                        ),
                        summary: None,
                    });
                }
                NoUidplus::ExpungeIfAlone => return self.expunge_if_alone(delete).await,
            }
        }
        self.expunge_exactly(delete).await?;
        let report = self.verify_removed(delete, None).await?;
        self.keep_what_stayed(&report).await;
        Ok(report)
    }

    /// Messages still there after an expunge keep no flag of popbridge's:
    /// QUIT answers -ERR for them, so an IMAP client's EXPUNGE must not
    /// remove them later.
    async fn keep_what_stayed(&mut self, report: &CommitReport) {
        if report.not_removed.is_empty() {
            return;
        }
        if let Err(e) = self.take_back_deleted(&report.not_removed).await {
            warn!(error = %e, "could not take \\Deleted back from messages that stayed");
        }
    }

    /// Flags `uids` `\Deleted` and removes exactly them with `UID EXPUNGE`
    /// (RFC 4315 §2.1: others flagged `\Deleted` stay). When the server
    /// refuses a step (NO/BAD, the connection still in step), our
    /// `\Deleted` is taken back before the error is returned: QUIT answers
    /// -ERR, and another client's EXPUNGE must not remove these messages
    /// later. (A message another client had flagged `\Deleted` loses the
    /// flag too; that keeps mail, never loses it.)
    async fn expunge_exactly(&mut self, uids: &[u32]) -> Result<(), UpstreamError> {
        let flags = self.expunge_flags();
        let r = async {
            self.store(uids, "+FLAGS.SILENT", &flags).await?;
            for set in uid_sets(uids) {
                self.exec(&format!("UID EXPUNGE {set}"), "UID EXPUNGE", |_| {})
                    .await?;
            }
            Ok::<(), UpstreamError>(())
        }
        .await;
        if let Err(e) = &r {
            if !e.is_fatal() {
                if let Err(undo) = self.take_back_deleted(uids).await {
                    warn!(error = %undo, "could not take \\Deleted back after a failed expunge");
                    if undo.is_fatal() {
                        self.poisoned = true;
                    }
                }
            }
        }
        r
    }

    /// `UID STORE <uids> <op> (<flags>)`, split into sets of bounded length.
    async fn store(&mut self, uids: &[u32], op: &str, flags: &str) -> Result<(), UpstreamError> {
        for set in uid_sets(uids) {
            self.exec(
                &format!("UID STORE {set} {op} ({flags})"),
                "UID STORE",
                |_| {},
            )
            .await?;
        }
        Ok(())
    }

    /// The `move` policy: `UID MOVE` (RFC 6851) where offered, otherwise
    /// `UID COPY`, `\Deleted` and `UID EXPUNGE` of exactly these UIDs (which
    /// needs UIDPLUS; never a plain EXPUNGE). A missing target is created
    /// when allowed, otherwise nothing is moved and QUIT answers -ERR.
    async fn move_to(
        &mut self,
        uids: &[u32],
        mailbox: &str,
        create: bool,
    ) -> Result<CommitReport, UpstreamError> {
        let target = quote_mailbox(mailbox)?;
        let refuse = |why: String| CommitReport {
            not_removed: uids.to_vec(),
            reason: Some(why),
            summary: None,
        };
        if !self.has_move && !self.uidplus {
            return Ok(refuse(
                "Mail server offers neither MOVE nor UIDPLUS; nothing was moved.".into(),
            ));
        }
        let verb = if self.has_move {
            "UID MOVE"
        } else {
            "UID COPY"
        };
        let sets = uid_sets(uids);
        let mut created = false;
        let mut i = 0;
        while i < sets.len() {
            match self
                .exec(&format!("{verb} {} {target}", sets[i]), verb, |_| {})
                .await
            {
                Ok(_) => i += 1,
                Err(UpstreamError::No { text, .. })
                    if text.to_ascii_uppercase().contains("TRYCREATE") =>
                {
                    if !create || created {
                        return Ok(refuse(format!(
                            "Mailbox {mailbox:?} does not exist; nothing was moved."
                        )));
                    }
                    self.exec(&format!("CREATE {target}"), "CREATE", |_| {})
                        .await?;
                    created = true;
                }
                Err(e) => return Err(e),
            }
        }
        if !self.has_move {
            self.expunge_exactly(uids).await?;
        }
        let mut report = self.verify_removed(uids, None).await?;
        if !self.has_move {
            self.keep_what_stayed(&report).await;
        }
        if report.not_removed.is_empty() {
            report.summary = Some(format!("{} moved to {mailbox}.", messages(uids.len())));
        }
        Ok(report)
    }

    /// UIDs flagged `\Deleted` that are not ours. NOOP first: a server
    /// answers SEARCH from the session's last view of the mailbox, which
    /// lacks flags other sessions set since (measured on Dovecot: another
    /// session's `\Deleted` was invisible to SEARCH until a NOOP).
    async fn others_deleted(&mut self, ours: &[u32]) -> Result<Vec<u32>, UpstreamError> {
        self.exec("NOOP", "NOOP", |_| {}).await?;
        let mut others = Vec::new();
        self.exec("UID SEARCH DELETED", "UID SEARCH", |r| {
            if let Response::MailboxData(MailboxDatum::Search(v)) = r {
                others.extend(v.iter().copied().filter(|u| ours.binary_search(u).is_err()));
            }
        })
        .await?;
        Ok(others)
    }

    /// Without UIDPLUS: EXPUNGE only when no other message is flagged
    /// `\Deleted`, checked before and again after flagging ours. Between
    /// the last check and the EXPUNGE another client could still flag one.
    async fn expunge_if_alone(&mut self, delete: &[u32]) -> Result<CommitReport, UpstreamError> {
        let refused = || {
            CommitReport {
            summary: None,
            not_removed: delete.to_vec(),
            reason: Some("Other messages are flagged \\Deleted and the mail server lacks UIDPLUS; nothing was deleted.".into()),
        }
        };
        if !self.others_deleted(delete).await?.is_empty() {
            return Ok(refused());
        }
        let flags = self.expunge_flags();
        self.store(delete, "+FLAGS.SILENT", &flags).await?;
        if !self.others_deleted(delete).await?.is_empty() {
            self.take_back_deleted(delete).await?;
            return Ok(refused());
        }
        self.exec("EXPUNGE", "EXPUNGE", |_| {}).await?;
        let report = self.verify_removed(delete, None).await?;
        self.keep_what_stayed(&report).await;
        Ok(report)
    }

    /// Checks that none of `delete` still exists.
    async fn verify_removed(
        &mut self,
        delete: &[u32],
        reason: Option<String>,
    ) -> Result<CommitReport, UpstreamError> {
        let mut left = Vec::new();
        for set in uid_sets(delete) {
            self.exec(&format!("UID SEARCH UID {set}"), "UID SEARCH", |r| {
                if let Response::MailboxData(MailboxDatum::Search(v)) = r {
                    left.extend(
                        v.iter()
                            .copied()
                            .filter(|u| delete.binary_search(u).is_ok()),
                    );
                }
            })
            .await?;
        }
        left.sort_unstable();
        left.dedup();
        let reason = if left.is_empty() {
            reason
        } else {
            warn!(
                count = left.len(),
                "messages still present after UID EXPUNGE"
            );
            Some(format!("{} messages could not be deleted.", left.len()))
        };
        Ok(CommitReport {
            not_removed: left,
            reason,
            summary: None,
        })
    }
}
