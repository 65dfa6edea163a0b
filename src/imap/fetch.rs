//! Streaming one message: RETR is one `UID FETCH uid (UID BODY.PEEK[])`
//! whose body literal goes from the socket to the sink in pieces as it
//! arrives (no whole-response buffering, no re-reads upstream); TOP fetches
//! a prefix, and the rest only if it needs more.
//!
//! The server's bytes are the truth: a body whose length differs from the
//! snapshot's RFC822.SIZE is still delivered whole (a warning, and the
//! mailbox's cached listing is dropped). The one exception is a short body
//! that differs: servers answer a FETCH of a message another session
//! expunged with a placeholder (Courier) or with the old bytes, so such a
//! body is held (bounded by [`HOLD_MAX`]) until NOOP and `UID SEARCH` say
//! whether the message still exists.

use async_imap::imap_proto::{AttributeValue, MailboxDatum, Response, Status};
use tracing::{debug, warn};

use super::cache::ListingKey;
use super::conn::{outcome_text, tagged_status, Ahead, ImapConn};
use super::wire::{parse_response, Frame, Parsed};
use super::{BodySink, FetchEnd, FetchError, Flow, UpstreamError};

/// Octets of the first request for TOP, which usually needs only the header
/// and a few lines: `TOP n 0` of a 30 MB message costs one small fetch.
pub const TOP_CHUNK: u64 = 32 * 1024;

/// A body whose length is not the one expected, and at most this long, is
/// held until the server says whether the message still exists (Courier's
/// placeholder for an expunged message is 129 octets). Longer bodies that
/// differ are real messages whose size changed (an mbox server rewriting
/// `Status:`, a server re-serialising): they stream.
pub const HOLD_MAX: u64 = 64 * 1024;

/// How one `UID FETCH` of a body ended.
enum Got {
    /// A body of `len` octets went to the sink (all of it, or until the
    /// sink said stop).
    Body { len: u64, stopped: bool },
    /// The server says the message is gone (no body, `BODY[] NIL`,
    /// `[EXPUNGEISSUED]`, or a held body of a message no longer there).
    Gone,
}

impl ImapConn {
    pub(super) async fn fetch_inner<S: BodySink>(
        &mut self,
        uid: u32,
        size: u64,
        prefix_only: bool,
        sink: &mut S,
    ) -> Result<FetchEnd, FetchError> {
        let r = self.fetch_message(uid, size, prefix_only, sink).await;
        // The hint was for this fetch only.
        self.next = None;
        r
    }

    async fn fetch_message<S: BodySink>(
        &mut self,
        uid: u32,
        size: u64,
        prefix_only: bool,
        sink: &mut S,
    ) -> Result<FetchEnd, FetchError> {
        if !prefix_only {
            return match self.fetch_body(uid, None, size, sink).await? {
                Got::Gone => Ok(FetchEnd::Gone),
                Got::Body { len, .. } => {
                    if len != size {
                        self.size_changed(uid, size, len);
                    }
                    Ok(FetchEnd::Complete)
                }
            };
        }
        // TOP: a prefix, then (only if the sink wants more and there is
        // more) the rest in one go.
        match self
            .fetch_body(uid, Some((0, TOP_CHUNK)), size.min(TOP_CHUNK), sink)
            .await?
        {
            Got::Gone => Ok(FetchEnd::Gone),
            Got::Body { stopped: true, .. } => Ok(FetchEnd::Complete),
            Got::Body { len, .. } if len < TOP_CHUNK => Ok(FetchEnd::Complete),
            Got::Body { len, .. } => {
                // RFC 3501 §6.4.5: a partial fetch past the end returns what
                // there is. Ask for twice what the snapshot says is left (a
                // size that grew is still read whole), within u32.
                let rest = (size.saturating_sub(len) * 2 + HOLD_MAX).min(u64::from(u32::MAX) - len);
                match self
                    .fetch_body(uid, Some((len, rest)), u64::MAX, sink)
                    .await?
                {
                    Got::Gone => Err(UpstreamError::VanishedMidStream { uid }.into()),
                    Got::Body { .. } => Ok(FetchEnd::Complete),
                }
            }
        }
    }

    /// One `UID FETCH` of message `uid`'s body, or of `range` (origin,
    /// length) of it, into `sink`. `expected` is the length the snapshot
    /// promises (`u64::MAX`: any). Reads to the tagged reply whatever
    /// happens, so the connection stays in step unless the server broke it.
    async fn fetch_body<S: BodySink>(
        &mut self,
        uid: u32,
        range: Option<(u64, u64)>,
        expected: u64,
        sink: &mut S,
    ) -> Result<Got, FetchError> {
        let section = match range {
            None => "BODY.PEEK[]".to_string(),
            Some((origin, len)) => format!("BODY.PEEK[]<{origin}.{len}>"),
        };
        let first = range.is_none_or(|(origin, _)| origin == 0);
        // Asked for ahead, while the previous body went out?
        let tag = match self.ahead.take() {
            Some(a) if a.uid == uid && a.range == range && !a.dropped && !a.done => a.tag,
            other => {
                self.ahead = other;
                self.settle().await?;
                let cmd = format!("UID FETCH {uid} (UID {section})");
                self.wire.send(&cmd, "UID FETCH").await?
            }
        };
        self.wire.stream_bodies(true);
        let r = self
            .read_body(&tag, uid, range, expected, first, sink)
            .await;
        self.wire.stream_bodies(false);
        let read = r?;
        if let Some(e) = read.sink_error {
            return Err(FetchError::Sink(e));
        }
        if let Some(held) = read.held {
            // A short body of the wrong length: deliver it only if the
            // message still exists.
            if !self.still_exists(uid).await? {
                debug!(
                    uid,
                    octets = held.len(),
                    "held body of a message no longer there"
                );
                return Ok(Got::Gone);
            }
            let stopped = sink.chunk(&held).await.map_err(FetchError::Sink)? == Flow::Stop;
            return Ok(Got::Body {
                len: held.len() as u64,
                stopped,
            });
        }
        match read.len {
            Some(len) if !read.nil => Ok(Got::Body {
                len,
                stopped: read.stopped,
            }),
            _ => Ok(Got::Gone),
        }
    }

    /// Reads the responses to one body fetch (tag `tag`) to its tagged
    /// reply, streaming the body to `sink` or holding it.
    #[allow(clippy::too_many_arguments)]
    async fn read_body<S: BodySink>(
        &mut self,
        tag: &str,
        uid: u32,
        range: Option<(u64, u64)>,
        expected: u64,
        first: bool,
        sink: &mut S,
    ) -> Result<BodyRead, FetchError> {
        let mut r = BodyRead::default();
        loop {
            match self.wire.next("UID FETCH").await? {
                Frame::BodyStart { len } => {
                    if r.len.is_some() {
                        // Another body after ours: the one asked for ahead,
                        // answered before our tagged reply. Dropped as it
                        // arrives (memory stays bounded) and asked for again
                        // when the client wants it.
                        match self.ahead.as_mut() {
                            Some(a) if r.dropping == 0 => {
                                a.dropped = true;
                                r.dropping = len;
                                continue;
                            }
                            _ => {
                                return Err(UpstreamError::Protocol(
                                    "two message bodies in one fetch".into(),
                                )
                                .into())
                            }
                        }
                    }
                    r.len = Some(len);
                    if first && len != expected && len <= HOLD_MAX {
                        // Bounded: at most HOLD_MAX octets, however many
                        // arrive (the framer hands out exactly `len`).
                        r.held = Some(Vec::with_capacity(len as usize));
                    } else if len == 0 {
                        r.deliver(sink, &[]).await;
                    }
                    // The next message's FETCH goes out now, while this
                    // body streams: the server answers it after this one
                    // (RFC 3501 §5.5), and its round trip is hidden behind
                    // this body. Its answer waits in the socket until this
                    // fetch's tagged reply is read.
                    self.send_ahead(range, len).await?;
                }
                Frame::BodyPiece(piece) => {
                    if r.dropping > 0 {
                        r.dropping -= piece.len() as u64;
                        continue;
                    }
                    match r.held.as_mut() {
                        Some(held) => held.extend_from_slice(piece),
                        None => r.deliver(sink, piece).await,
                    }
                }
                Frame::Response(bytes) => {
                    let response = match parse_response(bytes) {
                        Parsed::Known(response) => response,
                        Parsed::Unknown(_) => continue,
                    };
                    match response {
                        Response::Fetch(_, attrs) => {
                            let ours = attrs
                                .iter()
                                .any(|a| matches!(a, AttributeValue::Uid(u) if *u == uid));
                            let body = attrs
                                .iter()
                                .find(|a| matches!(a, AttributeValue::BodySection { .. }));
                            let ahead = self.ahead.as_mut().filter(|a| {
                                attrs
                                    .iter()
                                    .any(|x| matches!(x, AttributeValue::Uid(u) if *u == a.uid))
                            });
                            if let Some(a) = ahead {
                                // The one asked for ahead (its body, if it
                                // had one, was dropped above); `NIL` means
                                // it is gone: ask again to find out.
                                a.dropped |= body.is_some();
                                continue;
                            }
                            match (ours, body) {
                                // `BODY[] NIL`: Dovecot's answer for a message
                                // expunged by another session.
                                (true, Some(AttributeValue::BodySection { data: None, .. })) => {
                                    r.nil = true
                                }
                                // A body went out under another message's
                                // UID: never complete that message.
                                (false, Some(_)) => {
                                    return Err(UpstreamError::Protocol(format!(
                                        "a message body for another UID than {uid}"
                                    ))
                                    .into())
                                }
                                _ => {}
                            }
                        }
                        Response::Done {
                            tag: t,
                            status,
                            outcome,
                        } if t.0 == tag => {
                            let text = outcome_text(&outcome.code, &outcome.information);
                            if text.contains("EXPUNGEISSUED") && r.len.is_none() {
                                r.nil = true;
                            }
                            tagged_status(&status, text, "UID FETCH")?;
                            if r.len.is_some_and(|len| r.delivered + held(&r) != len) {
                                return Err(UpstreamError::Protocol(
                                    "message body shorter than announced".into(),
                                )
                                .into());
                            }
                            return Ok(r);
                        }
                        Response::Done { tag: t, .. }
                            if self.ahead.as_ref().is_some_and(|a| a.tag == t.0) =>
                        {
                            if let Some(a) = self.ahead.as_mut() {
                                a.done = true;
                            }
                        }
                        Response::Done { tag: t, .. } => {
                            return Err(UpstreamError::Protocol(format!(
                                "reply to unknown tag {}",
                                t.0
                            ))
                            .into())
                        }
                        Response::Data {
                            status: Status::Bye,
                            outcome,
                        } => debug!(text = ?outcome.information, "server said BYE"),
                        _ => {}
                    }
                }
            }
        }
    }

    /// This fetch's body has started (`len` octets announced for a request
    /// for `range`): when it is the message's last (the whole message, or a
    /// prefix that comes short) and the client already asked for another
    /// message, the FETCH for that one goes out now, so its answer follows
    /// this one's without a round trip in between.
    async fn send_ahead(
        &mut self,
        range: Option<(u64, u64)>,
        len: u64,
    ) -> Result<(), UpstreamError> {
        let last = range.is_none_or(|(_, asked)| len < asked);
        if !last || self.ahead.is_some() {
            return Ok(());
        }
        let Some(next) = self.next.take() else {
            return Ok(());
        };
        let range = next.prefix_only.then_some((0, TOP_CHUNK));
        let section = match range {
            None => "BODY.PEEK[]".to_string(),
            Some((origin, len)) => format!("BODY.PEEK[]<{origin}.{len}>"),
        };
        let tag = self
            .wire
            .send(
                &format!("UID FETCH {} (UID {section})", next.uid),
                "UID FETCH",
            )
            .await?;
        self.ahead = Some(Ahead {
            uid: next.uid,
            range,
            tag,
            dropped: false,
            done: false,
        });
        Ok(())
    }

    /// NOOP (so the server tells what other sessions expunged), then
    /// `UID SEARCH UID uid`: whether message `uid` is still there.
    async fn still_exists(&mut self, uid: u32) -> Result<bool, UpstreamError> {
        self.exec("NOOP", "NOOP", |_| {}).await?;
        let mut found = false;
        self.exec(&format!("UID SEARCH UID {uid}"), "UID SEARCH", |r| {
            if let Response::MailboxData(MailboxDatum::Search(v)) = r {
                found |= v.contains(&uid);
            }
        })
        .await?;
        Ok(found)
    }

    /// The server's body differs from the snapshot's size: it was delivered
    /// as it is; the cached listing of this mailbox is out of date.
    fn size_changed(&self, uid: u32, expected: u64, got: u64) {
        warn!(
            uid,
            expected, got, "message size differs from the listing; delivered as the server sent it"
        );
        if let Some(cache) = &self.config.cache {
            cache.remove(&ListingKey {
                upstream: self.config.address.as_str().into(),
                account: self.account.clone(),
                mailbox: self.config.mailbox.clone(),
            });
        }
    }
}

/// What reading one body fetch saw.
#[derive(Default)]
struct BodyRead {
    /// The body literal's announced (and, at the end, received) length.
    len: Option<u64>,
    /// Octets handed to the sink (or dropped after it said stop).
    delivered: u64,
    /// The sink wants no more (TOP).
    stopped: bool,
    /// The sink failed: the rest is read and dropped, then the fetch fails.
    sink_error: Option<std::io::Error>,
    /// A short body of the wrong length, held until the message is known to
    /// exist.
    held: Option<Vec<u8>>,
    /// The server said the message is gone.
    nil: bool,
    /// Octets still to drop of a body asked for ahead that arrived early.
    dropping: u64,
}

impl BodyRead {
    /// Hands `piece` to the sink, unless it stopped or failed.
    async fn deliver<S: BodySink>(&mut self, sink: &mut S, piece: &[u8]) {
        self.delivered += piece.len() as u64;
        if self.stopped || self.sink_error.is_some() {
            return;
        }
        match sink.chunk(piece).await {
            Ok(Flow::Continue) => {}
            Ok(Flow::Stop) => self.stopped = true,
            Err(e) => self.sink_error = Some(e),
        }
    }
}

/// Octets held back so far.
fn held(r: &BodyRead) -> u64 {
    r.held.as_ref().map_or(0, |h| h.len() as u64)
}
