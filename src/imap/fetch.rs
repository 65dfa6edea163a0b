//! Streaming one message (RETR, TOP).

use async_imap::imap_proto::{AttributeValue, RequestId, Response, Status};
use tokio::time::timeout;
use tracing::debug;

use super::conn::{outcome_text, ImapConn};
use super::{BodySink, FetchEnd, FetchError, Flow, UpstreamError};

/// Octets asked for per `BODY.PEEK[]<offset.length>` when streaming RETR.
/// async-imap buffers each response whole, so this bounds per-session memory
/// (with [`RETR_WINDOW`] chunks in flight) however large the message.
pub const RETR_CHUNK: u64 = 256 * 1024;

/// Chunk requests kept in flight during RETR, so the next chunk is on its way
/// while the current one is written to the client.
pub const RETR_WINDOW: usize = 2;

/// Octets of the first request for TOP, which usually needs only the header
/// and a few lines: `TOP n 0` of a 30 MB message costs one small fetch.
pub const TOP_CHUNK: u64 = 32 * 1024;

impl ImapConn {
    pub(super) async fn fetch_inner<S: BodySink>(
        &mut self,
        uid: u32,
        size: u64,
        prefix_only: bool,
        sink: &mut S,
    ) -> Result<FetchEnd, FetchError> {
        // TOP starts small and one request at a time (the header is usually
        // in the first chunk), then grows to RETR's pace, since clients such
        // as fetchmail download whole messages with `TOP n 99999999`.
        let mut chunk = if prefix_only { TOP_CHUNK } else { RETR_CHUNK };
        // Ask for one octet more than the snapshot's size, so a message that
        // is longer than announced is noticed rather than cut short.
        let end = size + 1;
        let mut next_offset = 0u64;
        // Requests sent and not yet answered: (tag, offset, length, data seen).
        let mut in_flight: Vec<(RequestId, u64, u64, bool)> = Vec::new();
        // Dovecot answers pipelined FETCHes out of order: chunks that arrive
        // early wait here (at most `window - 1` of them).
        let mut early: std::collections::BTreeMap<u64, Vec<u8>> = Default::default();
        let mut delivered = 0u64;
        let mut stopped = false;
        let mut failure: Option<FetchError> = None;
        let mut gone = false;

        loop {
            let window = if prefix_only && delivered == 0 {
                1
            } else {
                RETR_WINDOW
            };
            while failure.is_none()
                && !stopped
                && !gone
                && in_flight.len() < window
                && next_offset < end
            {
                let len = chunk.min(end - next_offset);
                chunk = (chunk * 2).min(RETR_CHUNK);
                let cmd = format!("UID FETCH {uid} (UID BODY.PEEK[]<{next_offset}.{len}>)");
                let tag = self.send(&cmd, "UID FETCH").await?;
                in_flight.push((tag, next_offset, len, false));
                next_offset += len;
            }
            if in_flight.is_empty() {
                break;
            }
            let resp = next_response!(self, "UID FETCH")?;
            match resp.parsed() {
                Response::Done {
                    tag,
                    status,
                    outcome,
                } => {
                    let Some(i) = in_flight.iter().position(|f| f.0 == *tag) else {
                        return Err(UpstreamError::Protocol(format!(
                            "reply to unknown tag {}",
                            tag.0
                        ))
                        .into());
                    };
                    let (_, _, _, seen) = in_flight.remove(i);
                    let text = outcome_text(&outcome.code, &outcome.information);
                    if text.contains("EXPUNGEISSUED") {
                        gone = true;
                    }
                    match status {
                        Status::Ok if !seen => gone = true, // no item for our UID
                        Status::Ok => {}
                        Status::No => {
                            failure.get_or_insert(FetchError::Upstream(UpstreamError::No {
                                command: "UID FETCH",
                                text,
                            }));
                        }
                        _ => {
                            failure.get_or_insert(FetchError::Upstream(UpstreamError::Bad {
                                command: "UID FETCH",
                                text,
                            }));
                        }
                    }
                }
                Response::Fetch(_, attrs)
                    if attrs
                        .iter()
                        .any(|a| matches!(a, AttributeValue::Uid(u) if *u == uid)) =>
                {
                    for a in attrs {
                        let AttributeValue::BodySection { data, index, .. } = a else {
                            continue;
                        };
                        let offset = index.map(u64::from).unwrap_or(0);
                        let Some(req) = in_flight.iter_mut().find(|f| f.1 == offset && !f.3) else {
                            failure.get_or_insert(FetchError::Upstream(UpstreamError::Protocol(
                                format!("unrequested body offset {offset}"),
                            )));
                            continue;
                        };
                        req.3 = true;
                        let len = req.2;
                        let Some(data) = data else {
                            // `BODY[] NIL`: Dovecot's answer for a message
                            // expunged by another session.
                            gone = true;
                            continue;
                        };
                        let n = data.len() as u64;
                        if offset + n > size || (n < len && offset + n < size) {
                            // Longer than RFC822.SIZE, or shorter.
                            failure.get_or_insert(FetchError::Upstream(
                                UpstreamError::SizeMismatch {
                                    uid,
                                    expected: size,
                                    got: offset + n,
                                },
                            ));
                            continue;
                        }
                        if failure.is_some() || stopped || gone {
                            continue;
                        }
                        if offset != delivered {
                            early.insert(offset, data.to_vec());
                            continue;
                        }
                        let mut flow = sink.chunk(data).await;
                        delivered += n;
                        while let (Ok(Flow::Continue), Some(next)) =
                            (&flow, early.remove(&delivered))
                        {
                            flow = sink.chunk(&next).await;
                            delivered += next.len() as u64;
                        }
                        match flow {
                            Ok(Flow::Continue) => {}
                            Ok(Flow::Stop) => stopped = true,
                            // The client is gone; finish reading so the
                            // connection stays in step, then fail.
                            Err(e) => {
                                failure.get_or_insert(FetchError::Sink(e));
                            }
                        }
                    }
                }
                Response::Data {
                    status: Status::Bye,
                    outcome,
                } => {
                    debug!(text = ?outcome.information, "server said BYE");
                }
                _ => {}
            }
        }
        if gone && failure.is_none() && delivered > 0 && !stopped {
            failure = Some(UpstreamError::VanishedMidStream { uid }.into());
        }
        if let Some(f) = failure {
            return Err(f);
        }
        if gone && !stopped {
            return Ok(FetchEnd::Gone);
        }
        if !stopped && delivered != size {
            return Err(UpstreamError::SizeMismatch {
                uid,
                expected: size,
                got: delivered,
            }
            .into());
        }
        Ok(FetchEnd::Complete)
    }
}
