//! Whole POP3 sessions through the server and the connection driver, over
//! loopback TCP, against an in-process mailbox ([`crate::imap::fake`]):
//! the exact bytes a client sees and what reaches the mailbox.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::bridge::pool::{Pool, Reuse};
use crate::bridge::routing::{Route, RouteAuth, Router};
use crate::bridge::shared_throttle::Throttle;
use crate::bridge::throttle::ThrottleConfig;
use crate::config::{LoginName, Policy, RouteIndex};
use crate::imap::fake::FakeConnector;
use crate::pop3::session::Profile;

/// Starts a server on 127.0.0.1:0 in front of `up`; returns its port and
/// the sender that starts its shutdown.
async fn start(up: &FakeConnector) -> (u16, tokio::sync::oneshot::Sender<()>) {
    let route = Route {
        name: "default".into(),
        pool_scope: "default".into(),
        connector: Arc::new(up.clone()),
        login: LoginName::Full,
        auth: RouteAuth::Passthrough,
        profile: Profile::default(),
        policy: Policy::default(),
        lock_scope: "fake/INBOX".into(),
        account_scope: "fake".into(),
        uidl_map: None,
        reuse: Reuse {
            idle: Duration::ZERO,
            per_account: 0,
        },
    };
    let mut index = RouteIndex::default();
    index.add(0, &[], &[], true);
    let shared = Shared {
        settings: Arc::new(ServerSettings {
            session: SessionConfig {
                stls_available: false,
                plaintext_ok: false,
            },
            greeting: "popbridge ready.".into(),
            idle_timeout: Duration::from_secs(600),
            login_timeout: Duration::from_secs(60),
            max_sessions: 10,
            max_sessions_per_ip: 10,
            plaintext_networks: Vec::new(),
            loopback_is_secure: true,
            stls: true,
            proxy_protocol: false,
            proxy_trusted: Vec::new(),
        }),
        bridge: Bridge {
            router: Router::new(vec![route], index),
            throttle: Throttle::local(ThrottleConfig {
                failure_delay: Duration::from_millis(1),
                max_failures_per_ip: 20,
                max_failures_per_user: 10,
                window: Duration::from_secs(60),
                max_entries: 100,
                ipv6_prefix_len: 64,
            }),
            oauth: None,
            pool: Arc::new(Pool::new(0).unwrap()),
        },
        tls: None,
        #[cfg(feature = "legacy-tls")]
        legacy_tls: None,
    };
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    let server = Server::new(shared);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve(
        vec![Listener {
            socket,
            implicit_tls: false,
            engine: TlsEngine::Rustls,
        }],
        async {
            let _ = stopped.await;
        },
        Duration::from_secs(1),
    ));
    (port, stop)
}

/// A client that reads what the server sends, line by line.
struct Client {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Client {
    async fn connect(port: u16) -> Client {
        let (r, w) = TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap()
            .into_split();
        let mut c = Client {
            r: BufReader::new(r),
            w,
        };
        assert_eq!(c.line().await, "+OK popbridge ready.\r\n");
        c
    }

    async fn line(&mut self) -> String {
        let mut s = String::new();
        self.r.read_line(&mut s).await.unwrap();
        s
    }

    /// Sends `cmd` and reads a one-line answer.
    async fn cmd(&mut self, cmd: &str) -> String {
        self.w
            .write_all(format!("{cmd}\r\n").as_bytes())
            .await
            .unwrap();
        self.line().await
    }

    /// Sends `cmd` and reads a multi-line answer to its terminating dot.
    async fn multi(&mut self, cmd: &str) -> String {
        let mut all = self.cmd(cmd).await;
        loop {
            let l = self.line().await;
            all.push_str(&l);
            if l == ".\r\n" || l.is_empty() {
                return all;
            }
        }
    }
}

#[tokio::test]
async fn a_session_reads_deletes_and_commits_only_at_quit() {
    let up = FakeConnector::new(
        &[("alice", "pw")],
        &[b"Subject: a\r\n\r\n.dot\r\n", b"Subject: b\r\n\r\nbody\r\n"],
    );
    let (port, _stop) = start(&up).await;
    let mut c = Client::connect(port).await;
    assert_eq!(c.cmd("USER alice").await, "+OK\r\n");
    assert_eq!(c.cmd("PASS pw").await, "+OK Logged in.\r\n");
    assert_eq!(c.cmd("STAT").await, "+OK 2 40\r\n");
    assert_eq!(
        c.multi("LIST").await,
        "+OK 2 messages:\r\n1 20\r\n2 20\r\n.\r\n"
    );
    assert_eq!(
        c.multi("UIDL").await,
        "+OK\r\n1 0000000100000007\r\n2 0000000200000007\r\n.\r\n"
    );
    // RFC 1939 §3: a line starting with "." is dot-stuffed.
    assert_eq!(
        c.multi("RETR 1").await,
        "+OK 20 octets\r\nSubject: a\r\n\r\n..dot\r\n.\r\n"
    );
    assert_eq!(c.cmd("DELE 1").await, "+OK Marked to be deleted.\r\n");
    assert_eq!(up.uids(), [1, 2], "DELE only marks");
    assert_eq!(
        c.cmd("QUIT").await,
        "+OK Logging out, messages deleted.\r\n"
    );
    let mut rest = Vec::new();
    c.r.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    assert_eq!(up.uids(), [2]);
    assert!(up.state().messages[&2].flags.is_empty(), "2 was not read");
}

/// RFC 1939 §6: a session that ends without QUIT removes nothing, and its
/// upstream session is logged out.
#[tokio::test]
async fn a_dropped_session_deletes_nothing() {
    let up = FakeConnector::new(&[("alice", "pw")], &[b"x\r\n"]);
    let (port, _stop) = start(&up).await;
    let mut c = Client::connect(port).await;
    c.cmd("USER alice").await;
    assert_eq!(c.cmd("PASS pw").await, "+OK Logged in.\r\n");
    assert_eq!(c.cmd("DELE 1").await, "+OK Marked to be deleted.\r\n");
    drop(c);
    for _ in 0..200 {
        if up.state().logouts == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(up.state().logouts, 1);
    assert_eq!(up.uids(), [1]);
}

/// A message expunged by someone else between login and RETR: -ERR, and the
/// session goes on.
#[tokio::test]
async fn a_message_gone_meanwhile_is_an_error_not_the_end() {
    let up = FakeConnector::new(&[("alice", "pw")], &[b"x\r\n", b"y\r\n"]);
    let (port, _stop) = start(&up).await;
    let mut c = Client::connect(port).await;
    c.cmd("USER alice").await;
    c.cmd("PASS pw").await;
    up.state().messages.remove(&1);
    assert!(c.cmd("RETR 1").await.starts_with("-ERR "));
    assert_eq!(c.multi("RETR 2").await, "+OK 3 octets\r\ny\r\n.\r\n");
    assert_eq!(c.cmd("QUIT").await, "+OK Logging out.\r\n");
}
