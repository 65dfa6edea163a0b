//! Tests against a scripted in-process IMAP server: what popbridge writes is
//! recorded line by line, and the server answers exactly as scripted.

use super::*;
use std::time::Duration;

use crate::config::NoUidplus;
use crate::pop3::command::Secret;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// One step of the server's script.
pub(crate) enum Step {
    /// Write these bytes.
    Send(&'static str),
    /// Write these bytes (built at run time).
    SendOwned(String),
    /// Read one line (to LF) and record it.
    Read,
    /// Read exactly this many octets (a literal) and record them.
    Literal(usize),
}
use Step::*;

/// Starts a server that plays `script` on one connection; the handle
/// gives back what was read. The server ends at the script's end or at
/// the client's EOF.
pub(crate) async fn serve(script: Vec<Step>) -> (String, tokio::task::JoinHandle<Vec<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        let (r, mut w) = sock.into_split();
        let mut r = BufReader::new(r);
        let mut got = Vec::new();
        for step in script {
            match step {
                Send(s) => {
                    if w.write_all(s.as_bytes()).await.is_err() {
                        break;
                    }
                }
                SendOwned(s) => {
                    if w.write_all(s.as_bytes()).await.is_err() {
                        break;
                    }
                }
                Read => {
                    let mut line = Vec::new();
                    if r.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                        break;
                    }
                    got.push(line);
                }
                Literal(n) => {
                    let mut buf = vec![0; n];
                    if r.read_exact(&mut buf).await.is_err() {
                        break;
                    }
                    got.push(buf);
                }
            }
        }
        // Hold the connection until the client is done with it.
        let mut rest = Vec::new();
        let _ = r.read_to_end(&mut rest).await;
        if !rest.is_empty() {
            got.push(rest);
        }
        got
    });
    (addr, handle)
}

pub(crate) fn config(address: String) -> ImapConfig {
    ImapConfig {
        address,
        mailbox: "INBOX".into(),
        connect_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(3),
        no_uidplus: NoUidplus::Refuse,
        tls: UpstreamTlsSetup::None,
        cache: None,
        login_mechanism: crate::config::LoginMechanism::Auto,
        send_client_id: false,
        reuse_xuidl: false,
    }
}

/// A SELECT answer for a mailbox of `exists` messages.
pub(crate) const SELECT_EMPTY: &str = "* 0 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n\
    * OK [UIDNEXT 1] n\r\npb3 OK [READ-WRITE] selected\r\n\
    pb4 OK searched\r\n";

pub(crate) async fn login(
    addr: String,
    user: &str,
    pass: &[u8],
) -> Result<(ImapConn, Snapshot), UpstreamError> {
    let pass = Secret::new(pass.to_vec());
    ImapConnector::new(config(addr))
        .login(Credentials::Password { user, pass: &pass }, None, None)
        .await
}

fn text(lines: &[Vec<u8>]) -> Vec<String> {
    lines
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect()
}

/// RFC 3501 §4.3: a quoted string holds 7-bit characters only, so a
/// non-ASCII password goes to LOGIN as a literal (§4.3, after the
/// server's continuation, §7.5), never raw inside quotes.
#[tokio::test]
async fn login_sends_non_ascii_credentials_as_literals() {
    let pass = "pä\"ss\\wörd".as_bytes();
    let (addr, server) = serve(vec![
        Send("* OK [CAPABILITY IMAP4rev1] ready\r\n"),
        Read, // pb1 LOGIN "alice" {n}
        Send("+ go on\r\n"),
        Literal(pass.len()),
        Read, // CRLF ending the command
        Send("pb1 OK logged in\r\n"),
        Read, // CAPABILITY
        Read, // SELECT
        Read, // UID SEARCH KEYWORD
        Send("* CAPABILITY IMAP4rev1 UIDPLUS\r\npb2 OK done\r\n"),
        Send(SELECT_EMPTY),
    ])
    .await;
    let r = login(addr, "alice", pass).await;
    let (conn, snap) = r.expect("login");
    assert!(snap.messages.is_empty());
    drop(conn);
    let got = server.await.unwrap();
    assert_eq!(
        got[0],
        format!("pb1 LOGIN \"alice\" {{{}}}\r\n", pass.len()).into_bytes()
    );
    assert_eq!(got[1], pass);
    assert_eq!(got[2], b"\r\n");
    assert_eq!(
        text(&got[3..5]),
        ["pb2 CAPABILITY\r\n", "pb3 SELECT \"INBOX\"\r\n"]
    );
}

/// ASCII credentials stay quoted, with `"` and `\` escaped.
#[tokio::test]
async fn login_quotes_ascii_credentials() {
    let (addr, server) = serve(vec![
        Send("* OK [CAPABILITY IMAP4rev1] ready\r\n"),
        Read,
        Send("pb1 OK logged in\r\n"),
        Read,
        Read,
        Read, // UID SEARCH KEYWORD
        Send("* CAPABILITY IMAP4rev1\r\npb2 OK done\r\n"),
        Send(SELECT_EMPTY),
    ])
    .await;
    login(addr, "al\"ice", b"p\\w").await.expect("login");
    let got = server.await.unwrap();
    assert_eq!(text(&got[..1]), ["pb1 LOGIN \"al\\\"ice\" \"p\\\\w\"\r\n"]);
}

/// A server that refuses the literal (tagged NO instead of `+`) fails
/// the login, and the password never goes out.
#[tokio::test]
async fn login_literal_refused_before_the_password() {
    let (addr, server) = serve(vec![
        Send("* OK [CAPABILITY IMAP4rev1] ready\r\n"),
        Read,
        Send("pb1 NO [AUTHENTICATIONFAILED] no\r\n"),
    ])
    .await;
    let r = login(addr, "alice", "wörd".as_bytes()).await;
    assert!(matches!(r, Err(UpstreamError::AuthFailed(_))), "{r:?}");
    let got = server.await.unwrap();
    let secret = "wörd".as_bytes();
    assert!(!got.concat().windows(secret.len()).any(|w| w == secret));
}

/// An untagged BYE during LOGIN is the server's answer (Gmail throttles
/// this way), not an anonymous lost connection.
#[tokio::test]
async fn bye_during_login_is_reported() {
    let (addr, _server) = serve(vec![
        Send("* OK [CAPABILITY IMAP4rev1] ready\r\n"),
        Read,
        Send("* BYE [UNAVAILABLE] Too many simultaneous connections\r\n"),
    ])
    .await;
    let r = login(addr, "alice", b"pw").await;
    assert!(matches!(r, Err(UpstreamError::Throttled(_))), "{r:?}");
}

/// The login and snapshot of a mailbox holding UID 10 of `size` octets;
/// the session's next tag is pb6.
fn one_message(size: u64) -> Vec<Step> {
    vec![
        Send("* OK [CAPABILITY IMAP4rev1] ready\r\n"),
        Read,
        Send("pb1 OK logged in\r\n"),
        Read,
        Read,
        Read, // UID SEARCH KEYWORD
        Send("* CAPABILITY IMAP4rev1 UIDPLUS\r\npb2 OK done\r\n"),
        Send(
            "* 1 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n* OK [UIDNEXT 11] n\r\n\
             pb3 OK [READ-WRITE] selected\r\n",
        ),
        Send("pb4 OK searched\r\n"),
        Read,
        SendOwned(format!(
            "* 1 FETCH (UID 10 RFC822.SIZE {size})\r\npb5 OK done\r\n"
        )),
    ]
}

/// A fetch's result when the sink never fails (as [`Collect`]): the
/// upstream's side of it.
fn upstream_side(r: Result<FetchEnd, FetchError>) -> Result<FetchEnd, UpstreamError> {
    r.map_err(|e| match e {
        FetchError::Upstream(e) => e,
        FetchError::Sink(e) => panic!("the test sink failed: {e}"),
    })
}

/// Collects what a fetch delivers.
#[derive(Default)]
pub(crate) struct Collect(pub Vec<u8>);

impl BodySink for Collect {
    async fn chunk(&mut self, data: &[u8]) -> std::io::Result<Flow> {
        self.0.extend_from_slice(data);
        Ok(Flow::Continue)
    }
}

async fn fetch_with(
    script: Vec<Step>,
    size: u64,
) -> (
    ImapConn,
    Result<FetchEnd, UpstreamError>,
    Vec<u8>,
    tokio::task::JoinHandle<Vec<Vec<u8>>>,
) {
    let mut all = one_message(size);
    all.extend(script);
    let (addr, server) = serve(all).await;
    let (mut conn, snap) = login(addr, "alice", b"pw").await.expect("login");
    assert_eq!(snap.messages, vec![(10, size)]);
    let mut sink = Collect::default();
    let r = upstream_side(conn.fetch(10, size, false, &mut sink).await);
    (conn, r, sink.0, server)
}

/// UID FETCH answered OK without an item: the message was expunged by
/// someone else; nothing was delivered.
#[tokio::test]
async fn fetch_with_no_item_is_gone() {
    let (_c, r, got, _s) = fetch_with(vec![Read, Send("pb6 OK done\r\n")], 5).await;
    assert!(matches!(r, Ok(FetchEnd::Gone)), "{r:?}");
    assert!(got.is_empty());
}

/// Dovecot's answer for a message expunged meanwhile: BODY[] NIL.
#[tokio::test]
async fn fetch_body_nil_is_gone() {
    let (_c, r, got, _s) = fetch_with(
        vec![
            Read,
            Send("* 1 FETCH (UID 10 BODY[]<0> NIL)\r\n* 1 EXPUNGE\r\npb6 OK [EXPUNGEISSUED] x\r\n"),
        ],
        5,
    )
    .await;
    assert!(matches!(r, Ok(FetchEnd::Gone)), "{r:?}");
    assert!(got.is_empty());
}

/// RETR is one `UID FETCH (UID BODY.PEEK[])`, whatever the size, and the
/// body arrives whole, in pieces as the socket delivers it.
#[tokio::test]
async fn fetch_is_one_uid_fetch_streamed() {
    let body = "a".repeat(300 * 1024);
    let size = body.len() as u64;
    let (c, r, got, server) = fetch_with(
        vec![
            Read,
            SendOwned(format!(
                "* 1 FETCH (UID 10 BODY[] {{{size}}}\r\n{body} FLAGS (\\Seen))\r\npb6 OK done\r\n"
            )),
        ],
        size,
    )
    .await;
    assert!(matches!(r, Ok(FetchEnd::Complete)), "{r:?}");
    assert_eq!(got, body.into_bytes());
    drop(c);
    let lines = server.await.unwrap();
    assert_eq!(
        text(&lines[5..]),
        ["pb6 UID FETCH 10 (UID BODY.PEEK[])\r\n"]
    );
}

/// A NO after the body: an error (never a Complete the server did not
/// confirm); the connection stays in step.
#[tokio::test]
async fn fetch_no_after_the_body_is_an_error() {
    let (mut c, r, _got, _s) = fetch_with(
        vec![
            Read,
            Send("* 1 FETCH (UID 10 BODY[] {5}\r\nabcde)\r\npb6 NO [SERVERBUG] broken\r\n"),
            Read,
            Send("pb7 OK noop\r\n"),
        ],
        5,
    )
    .await;
    assert!(matches!(r, Err(UpstreamError::No { .. })), "{r:?}");
    c.exec("NOOP", "NOOP", |_| {}).await.expect("in step");
}

/// A tagged reply to a tag we never sent: out of step, so the
/// connection is never used again.
#[tokio::test]
async fn fetch_reply_to_another_tag_poisons() {
    let (mut c, r, _got, _s) =
        fetch_with(vec![Read, Send("pb5 OK late\r\npb6 OK done\r\n")], 5).await;
    assert!(matches!(r, Err(UpstreamError::Protocol(_))), "{r:?}");
    let r = upstream_side(c.fetch(10, 5, false, &mut Collect::default()).await);
    assert!(matches!(r, Err(UpstreamError::Poisoned)), "{r:?}");
    let r = c.commit(&[10], &[], &DeleteAction::Expunge).await;
    assert!(matches!(r, Err(UpstreamError::Poisoned)), "{r:?}");
}

/// A timeout leaves a reply unread: the connection is not reused.
#[tokio::test]
async fn fetch_timeout_poisons() {
    let (mut c, r, _got, _s) = fetch_with(vec![Read], 5).await;
    assert!(matches!(r, Err(UpstreamError::Timeout(_))), "{r:?}");
    let r = c.commit(&[10], &[], &DeleteAction::Expunge).await;
    assert!(matches!(r, Err(UpstreamError::Poisoned)), "{r:?}");
}

/// The connection cut inside the literal: an error after whatever was
/// delivered, never Complete.
#[tokio::test]
async fn fetch_cut_mid_literal_is_an_error() {
    let mut all = one_message(100);
    all.extend([Read, Send("* 1 FETCH (UID 10 BODY[]<0> {100}\r\nabc")]);
    let (addr, server) = serve(all).await;
    let (mut conn, _) = login(addr, "alice", b"pw").await.expect("login");
    let mut sink = Collect::default();
    let fetch = conn.fetch(10, 100, false, &mut sink);
    // The server closes once the script is played.
    let abort = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        server.abort();
    };
    let (r, _) = tokio::join!(fetch, abort);
    assert!(r.is_err(), "{r:?}");
}

/// A body whose length differs from RFC822.SIZE is the server's truth:
/// short ones are checked first (NOOP, then UID SEARCH: the message still
/// exists), then delivered whole.
#[tokio::test]
async fn fetch_of_another_size_is_delivered_whole_when_the_message_exists() {
    let (c, r, got, server) = fetch_with(
        vec![
            Read,
            Send("* 1 FETCH (UID 10 BODY[] {6}\r\nabcdef)\r\npb6 OK done\r\n"),
            Read,
            Send("pb7 OK noop\r\n"),
            Read,
            Send("* SEARCH 10\r\npb8 OK searched\r\n"),
        ],
        5,
    )
    .await;
    assert!(matches!(r, Ok(FetchEnd::Complete)), "{r:?}");
    assert_eq!(got, b"abcdef");
    drop(c);
    let lines = server.await.unwrap();
    assert_eq!(
        text(&lines[6..]),
        ["pb7 NOOP\r\n", "pb8 UID SEARCH UID 10\r\n"]
    );
}

/// Courier answers a FETCH of a message another session expunged with OK
/// and a short placeholder: the message is gone, and the placeholder never
/// reaches the client.
#[tokio::test]
async fn a_placeholder_for_an_expunged_message_is_gone() {
    let placeholder =
        "Subject: message unavailable\r\n\r\nThis message is no longer available.\r\n";
    let (_c, r, got, _s) = fetch_with(
        vec![
            Read,
            SendOwned(format!(
                "* 1 FETCH (UID 10 BODY[] {{{}}}\r\n{placeholder})\r\npb6 OK done\r\n",
                placeholder.len()
            )),
            Read,
            Send("* 1 EXPUNGE\r\npb7 OK noop\r\n"),
            Read,
            Send("* SEARCH\r\npb8 OK searched\r\n"),
        ],
        2000,
    )
    .await;
    assert!(matches!(r, Ok(FetchEnd::Gone)), "{r:?}");
    assert!(got.is_empty());
}

/// A long body of another size streams as it arrives, without a check.
#[tokio::test]
async fn a_long_body_of_another_size_streams() {
    let body = "b".repeat(HOLD_MAX as usize + 10);
    let (_c, r, got, _s) = fetch_with(
        vec![
            Read,
            SendOwned(format!(
                "* 1 FETCH (UID 10 BODY[] {{{}}}\r\n{body})\r\npb6 OK done\r\n",
                body.len()
            )),
        ],
        78,
    )
    .await;
    assert!(matches!(r, Ok(FetchEnd::Complete)), "{r:?}");
    assert_eq!(got.len(), body.len());
}

/// A body under another UID than the one asked for never completes.
#[tokio::test]
async fn a_body_for_another_uid_is_an_error() {
    let (_c, r, _got, _s) = fetch_with(
        vec![
            Read,
            Send("* 1 FETCH (BODY[] {5}\r\nabcde UID 11)\r\npb6 OK done\r\n"),
        ],
        5,
    )
    .await;
    assert!(matches!(r, Err(UpstreamError::Protocol(_))), "{r:?}");
}

/// A server that announces a 500 MB body and sends nothing more: the
/// session waits (inactivity timeout) without reserving the announced size,
/// then fails; nothing was completed.
#[tokio::test]
async fn an_announced_huge_body_reserves_nothing() {
    let (_c, r, got, _s) = fetch_with(
        vec![Read, Send("* 1 FETCH (UID 1 BODY[]<0> {500000000}\r\n")],
        5,
    )
    .await;
    assert!(matches!(r, Err(UpstreamError::Timeout(_))), "{r:?}");
    assert!(got.is_empty());
}

/// One response line longer than [`MAX_RESPONSE`] ends the session instead
/// of growing a buffer without bound.
#[tokio::test]
async fn oversized_response_is_refused() {
    let n = MAX_RESPONSE + 1024;
    let huge = format!("* OK {}\r\npb6 OK done\r\n", "a".repeat(n));
    let (_c, r, got, _s) = fetch_with(vec![Read, SendOwned(huge)], 5).await;
    assert!(got.is_empty());
    assert!(matches!(r, Err(UpstreamError::Protocol(_))), "{r:?}");
}

/// Mailutils imap4d ends its tagged reply to AUTHENTICATE with a bare LF,
/// and sends untagged responses outside RFC 3501: neither ends the session.
#[tokio::test]
async fn bare_lf_and_unknown_responses_are_tolerated() {
    let (addr, _server) = serve(vec![
        Send("* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\n"),
        Read,
        Send("+ \n"),
        Read,
        Send("* X-VENDOR something odd\npb1 OK authentication successful\n"),
        Read,
        Read,
        Read, // UID SEARCH KEYWORD
        Send("* CAPABILITY IMAP4rev1 UIDPLUS\npb2 OK done\n"),
        Send("* 0 EXISTS\n* OK [UIDVALIDITY 7] v\n* OK [UIDNEXT 1] n\npb3 OK [READ-WRITE] selected\n"),
        Send("pb4 OK searched\n"),
    ])
    .await;
    let (_conn, snap) = login(addr, "alice", b"pw").await.expect("login");
    assert!(snap.messages.is_empty());
}

/// Many responses that are each small add up to more than the limit
/// without tripping it (the count is per response).
#[tokio::test]
async fn many_small_responses_are_fine() {
    let line = format!("* OK {}\r\n", "x".repeat(1000));
    let many = line.repeat(MAX_RESPONSE / 1000 + 100);
    let (addr, _server) = serve(vec![
        Send("* OK [CAPABILITY IMAP4rev1] ready\r\n"),
        Read,
        Send("pb1 OK logged in\r\n"),
        Read,
        Read,
        SendOwned(many),
        Send("* CAPABILITY IMAP4rev1\r\npb2 OK done\r\n"),
        Send(SELECT_EMPTY),
    ])
    .await;
    login(addr, "alice", b"pw").await.expect("login");
}

/// UID EXPUNGE refused after our `\Deleted` was set: QUIT fails, and
/// the flag is taken back, so no other client's EXPUNGE removes mail
/// the POP3 client was told was not deleted.
#[tokio::test]
async fn refused_uid_expunge_takes_the_deleted_flag_back() {
    let mut all = one_message(5);
    all.extend([
        Read,
        Send("pb6 OK stored\r\n"),
        Read,
        Send("pb7 NO [SERVERBUG] cannot expunge\r\n"),
        Read,
        Send("pb8 OK stored\r\n"),
    ]);
    let (addr, server) = serve(all).await;
    let (mut conn, _) = login(addr, "alice", b"pw").await.expect("login");
    let r = conn.commit(&[10], &[], &DeleteAction::Expunge).await;
    assert!(matches!(r, Err(UpstreamError::No { .. })), "{r:?}");
    drop(conn);
    let lines = server.await.unwrap();
    assert_eq!(
        text(&lines[5..8]),
        [
            "pb6 UID STORE 10 +FLAGS.SILENT (\\Deleted)\r\n",
            "pb7 UID EXPUNGE 10\r\n",
            "pb8 UID STORE 10 -FLAGS.SILENT (\\Deleted)\r\n",
        ]
    );
}

/// The happy path: STORE, UID EXPUNGE of exactly our UIDs, then the
/// check that they are gone; one still there is reported.
#[tokio::test]
async fn commit_reports_what_uid_expunge_left() {
    let mut all = one_message(5);
    all.extend([
        Read,
        Send("pb6 OK stored\r\n"),
        Read,
        Send("pb7 OK expunged\r\n"),
        Read,
        Send("* SEARCH 10\r\npb8 OK searched\r\n"),
    ]);
    let (addr, server) = serve(all).await;
    let (mut conn, _) = login(addr, "alice", b"pw").await.expect("login");
    let r = conn
        .commit(&[10], &[], &DeleteAction::Expunge)
        .await
        .expect("commit");
    assert_eq!(r.not_removed, vec![10]);
    drop(conn);
    let lines = server.await.unwrap();
    assert_eq!(
        text(&lines[5..8]),
        [
            "pb6 UID STORE 10 +FLAGS.SILENT (\\Deleted)\r\n",
            "pb7 UID EXPUNGE 10\r\n",
            "pb8 UID SEARCH UID 10\r\n",
        ]
    );
}

/// The login and snapshot of a mailbox holding UIDs 10 and 11 of 5 octets
/// each; the session's next tag is pb6.
fn two_messages() -> Vec<Step> {
    vec![
        Send("* OK [CAPABILITY IMAP4rev1] ready\r\n"),
        Read,
        Send("pb1 OK logged in\r\n"),
        Read,
        Read,
        Read, // UID SEARCH KEYWORD
        Send("* CAPABILITY IMAP4rev1 UIDPLUS\r\npb2 OK done\r\n"),
        Send(
            "* 2 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n* OK [UIDNEXT 12] n\r\n\
             pb3 OK [READ-WRITE] selected\r\n",
        ),
        Send("pb4 OK searched\r\n"),
        Read,
        Send("* 1 FETCH (UID 10 RFC822.SIZE 5)\r\n* 2 FETCH (UID 11 RFC822.SIZE 5)\r\npb5 OK done\r\n"),
    ]
}

/// With the next message announced (a pipelining client), its FETCH goes
/// out as soon as the current body is in, and the next fetch reads that
/// answer instead of asking again.
#[tokio::test]
async fn the_next_fetch_goes_out_while_the_current_body_is_read() {
    let mut all = two_messages();
    all.extend([
        Read,
        Send("* 1 FETCH (UID 10 BODY[] {5}\r\naaaaa)\r\n"),
        Read,
        Send("pb6 OK done\r\n* 2 FETCH (UID 11 BODY[] {5}\r\nbbbbb)\r\npb7 OK done\r\n"),
    ]);
    let (addr, server) = serve(all).await;
    let (mut conn, _) = login(addr, "alice", b"pw").await.expect("login");
    let mut first = Collect::default();
    conn.fetch_next(Some(NextFetch {
        uid: 11,
        prefix_only: false,
    }));
    let r = upstream_side(conn.fetch(10, 5, false, &mut first).await);
    assert!(matches!(r, Ok(FetchEnd::Complete)), "{r:?}");
    let mut second = Collect::default();
    let r = upstream_side(conn.fetch(11, 5, false, &mut second).await);
    assert!(matches!(r, Ok(FetchEnd::Complete)), "{r:?}");
    assert_eq!((first.0, second.0), (b"aaaaa".to_vec(), b"bbbbb".to_vec()));
    assert!(conn.reusable());
    drop(conn);
    let lines = server.await.unwrap();
    assert_eq!(
        text(&lines[5..]),
        [
            "pb6 UID FETCH 10 (UID BODY.PEEK[])\r\n",
            "pb7 UID FETCH 11 (UID BODY.PEEK[])\r\n"
        ]
    );
}

/// A server that answers the FETCH sent ahead before the current one's
/// tagged reply: that body is dropped (memory stays bounded) and fetched
/// again when asked for; the current message is unharmed.
#[tokio::test]
async fn an_early_answer_to_the_fetch_sent_ahead_is_dropped_and_fetched_again() {
    let mut all = two_messages();
    all.extend([
        Read,
        Send("* 1 FETCH (UID 10 BODY[] {5}\r\naaaaa)\r\n"),
        Read,
        Send("* 2 FETCH (UID 11 BODY[] {5}\r\nbbbbb)\r\npb7 OK done\r\npb6 OK done\r\n"),
        Read,
        Send("* 2 FETCH (UID 11 BODY[] {5}\r\nbbbbb)\r\npb8 OK done\r\n"),
    ]);
    let (addr, server) = serve(all).await;
    let (mut conn, _) = login(addr, "alice", b"pw").await.expect("login");
    let mut first = Collect::default();
    conn.fetch_next(Some(NextFetch {
        uid: 11,
        prefix_only: false,
    }));
    let r = upstream_side(conn.fetch(10, 5, false, &mut first).await);
    assert!(matches!(r, Ok(FetchEnd::Complete)), "{r:?}");
    let mut second = Collect::default();
    let r = upstream_side(conn.fetch(11, 5, false, &mut second).await);
    assert!(matches!(r, Ok(FetchEnd::Complete)), "{r:?}");
    assert_eq!((first.0, second.0), (b"aaaaa".to_vec(), b"bbbbb".to_vec()));
    drop(conn);
    let lines = server.await.unwrap();
    assert_eq!(
        text(&lines[7..]),
        ["pb8 UID FETCH 11 (UID BODY.PEEK[])\r\n"]
    );
}

/// A FETCH sent ahead that the client then does not use is read to its
/// end before the next command (here QUIT's commit), whose responses are
/// then its own.
#[tokio::test]
async fn an_unused_fetch_sent_ahead_is_read_before_the_next_command() {
    let mut all = two_messages();
    all.extend([
        Read,
        Send("* 1 FETCH (UID 10 BODY[] {5}\r\naaaaa)\r\n"),
        Read,
        Send("pb6 OK done\r\n* 2 FETCH (UID 11 BODY[] {5}\r\nbbbbb)\r\npb7 OK done\r\n"),
        Read,
        Send("pb8 OK stored\r\n"),
    ]);
    let (addr, server) = serve(all).await;
    let (mut conn, _) = login(addr, "alice", b"pw").await.expect("login");
    conn.fetch_next(Some(NextFetch {
        uid: 11,
        prefix_only: false,
    }));
    let r = upstream_side(conn.fetch(10, 5, false, &mut Collect::default()).await);
    assert!(matches!(r, Ok(FetchEnd::Complete)), "{r:?}");
    assert!(!conn.reusable(), "an answer is still on its way");
    let r = conn.commit(&[], &[10], &DeleteAction::Expunge).await;
    assert!(r.is_ok(), "{r:?}");
    assert!(conn.reusable());
    drop(conn);
    let lines = server.await.unwrap();
    assert_eq!(
        text(&lines[7..]),
        ["pb8 UID STORE 10 +FLAGS.SILENT (\\Seen)\r\n"]
    );
}
