//! An in-process mailbox behind [`Connector`] and [`Upstream`], so the
//! bridge's and the server's logic get fast unit tests beside the
//! integration tests against real IMAP servers. It keeps what a test needs
//! to look at afterwards: the messages, their flags and keywords, and every
//! login attempt.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{
    BodySink, CommitReport, Connector, Credentials, DeleteAction, FetchEnd, FetchError, Flow,
    Snapshot, Upstream, UpstreamError,
};

/// One stored message.
#[derive(Debug, Clone, Default)]
pub struct FakeMessage {
    pub body: Vec<u8>,
    /// Flags and keywords (`\Seen`, `$POP3Deleted`, ...).
    pub flags: BTreeSet<String>,
}

/// The mailbox and the server's memory, shared by every session.
#[derive(Debug, Default)]
pub struct FakeState {
    pub uidvalidity: u32,
    pub next_uid: u32,
    pub messages: BTreeMap<u32, FakeMessage>,
    /// Login name → password.
    pub users: HashMap<String, String>,
    /// Every login attempt's user name, in order.
    pub logins: Vec<String>,
    /// The next login fails with this (then the error is gone).
    pub fail_next_login: Option<UpstreamError>,
    /// Sessions logged out politely.
    pub logouts: usize,
}

/// A connector to the fake mailbox.
#[derive(Debug, Clone, Default)]
pub struct FakeConnector {
    pub state: Arc<Mutex<FakeState>>,
}

impl FakeConnector {
    /// A mailbox with `users` (login, password) and these messages, UIDs
    /// from 1.
    pub fn new(users: &[(&str, &str)], messages: &[&[u8]]) -> Self {
        let c = FakeConnector::default();
        {
            let mut s = c.state();
            s.uidvalidity = 7;
            s.next_uid = 1;
            for (u, p) in users {
                s.users.insert(u.to_string(), p.to_string());
            }
        }
        for m in messages {
            c.deliver(m);
        }
        c
    }

    /// The shared state (poisoning ignored: tests only).
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a message; returns its UID.
    pub fn deliver(&self, body: &[u8]) -> u32 {
        let mut s = self.state();
        let uid = s.next_uid;
        s.next_uid += 1;
        s.messages.insert(
            uid,
            FakeMessage {
                body: body.to_vec(),
                flags: BTreeSet::new(),
            },
        );
        uid
    }

    /// The UIDs in the mailbox now.
    pub fn uids(&self) -> Vec<u32> {
        self.state().messages.keys().copied().collect()
    }
}

/// One session on the fake mailbox.
#[derive(Debug)]
pub struct FakeConn {
    state: Arc<Mutex<FakeState>>,
    hide: Option<String>,
    uidvalidity: u32,
}

impl Connector for FakeConnector {
    type Conn = FakeConn;

    async fn login(
        &self,
        credentials: Credentials<'_>,
        hide_keyword: Option<&str>,
        _client: Option<std::net::SocketAddr>,
    ) -> Result<(FakeConn, Snapshot), UpstreamError> {
        let mut s = self.state();
        s.logins.push(credentials.user().to_string());
        if let Some(e) = s.fail_next_login.take() {
            return Err(e);
        }
        let ok = match credentials {
            Credentials::Password { user, pass } => s
                .users
                .get(user)
                .is_some_and(|p| p.as_bytes() == pass.expose()),
            Credentials::Bearer { .. } => false,
        };
        if !ok {
            return Err(UpstreamError::AuthFailed(
                "[AUTHENTICATIONFAILED] no".into(),
            ));
        }
        let snapshot = snapshot(&s, hide_keyword);
        Ok((
            FakeConn {
                state: self.state.clone(),
                hide: hide_keyword.map(str::to_string),
                uidvalidity: s.uidvalidity,
            },
            snapshot,
        ))
    }
}

/// The mailbox as a session that hides `hide` sees it.
fn snapshot(s: &FakeState, hide: Option<&str>) -> Snapshot {
    Snapshot {
        uidvalidity: s.uidvalidity,
        messages: s
            .messages
            .iter()
            .filter(|(_, m)| hide.is_none_or(|k| !m.flags.contains(k)))
            .map(|(uid, m)| (*uid, m.body.len() as u64))
            .collect(),
        xuidl: HashMap::new(),
    }
}

impl FakeConn {
    fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Octets handed to the sink at a time, so bodies arrive in several chunks.
const FAKE_CHUNK: usize = 7;

impl Upstream for FakeConn {
    async fn fetch<S: BodySink>(
        &mut self,
        uid: u32,
        _size: u64,
        _prefix_only: bool,
        sink: &mut S,
    ) -> Result<FetchEnd, FetchError> {
        let Some(body) = self.state().messages.get(&uid).map(|m| m.body.clone()) else {
            return Ok(FetchEnd::Gone);
        };
        if body.is_empty() {
            sink.chunk(&[]).await.map_err(FetchError::Sink)?;
        }
        for piece in body.chunks(FAKE_CHUNK) {
            if sink.chunk(piece).await.map_err(FetchError::Sink)? == Flow::Stop {
                break;
            }
        }
        Ok(FetchEnd::Complete)
    }

    async fn commit(
        &mut self,
        delete: &[u32],
        seen: &[u32],
        action: &DeleteAction,
    ) -> Result<CommitReport, UpstreamError> {
        let mut s = self.state();
        for uid in seen {
            if let Some(m) = s.messages.get_mut(uid) {
                m.flags.insert("\\Seen".into());
            }
        }
        match action {
            // Moved messages leave this mailbox like expunged ones.
            DeleteAction::Expunge | DeleteAction::Move { .. } => {
                for uid in delete {
                    s.messages.remove(uid);
                }
            }
            DeleteAction::Keyword(k) => {
                for uid in delete {
                    if let Some(m) = s.messages.get_mut(uid) {
                        m.flags.insert(k.clone());
                    }
                }
            }
            DeleteAction::Keep => {}
        }
        Ok(CommitReport::default())
    }

    async fn logout(self) {
        self.state().logouts += 1;
    }

    async fn refresh(&mut self) -> Result<Option<Snapshot>, UpstreamError> {
        let s = self.state();
        Ok((s.uidvalidity == self.uidvalidity).then(|| snapshot(&s, self.hide.as_deref())))
    }

    fn reusable(&self) -> bool {
        true
    }
}
