//! `upstream.send_client_id`: the IMAP server learns the POP3 client's
//! address through IMAP ID (RFC 2971), so its own logs and per-address
//! limits see the real client, not popbridge.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::{Dovecot, DovecotOptions, Popbridge};

fn config(dir: &std::path::Path, send_client_id: bool) -> String {
    let path = dir.join("popbridge.toml");
    std::fs::write(
        &path,
        format!(
            "[listen]\nproxy_protocol = true\nproxy_trusted = [\"127.0.0.1/32\"]\n\
             [upstream]\nsend_client_id = {send_client_id}\n\
             [auth]\nallow_plaintext = true\n"
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

/// Logs in through popbridge as if from `client` (a PROXY v1 header).
fn login_from(port: u16, client: &str) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let (ip, cport) = client.rsplit_once(':').unwrap();
    write!(
        s,
        "PROXY TCP4 {ip} 127.0.0.1 {cport} 110\r\nUSER alice\r\nPASS secret\r\nQUIT\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.contains("+OK Logged in."), "{reply}");
}

fn wait_for(dovecot: &Dovecot, needle: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if dovecot.log().contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn the_imap_server_sees_the_pop3_clients_address() {
    let dovecot = Dovecot::start_with(DovecotOptions {
        extra_conf: "login_trusted_networks = 127.0.0.0/8\n".into(),
        ..DovecotOptions::default()
    });
    let dir = tempfile::tempdir().unwrap();

    let with_id = Popbridge::start(dovecot.imap_port, &["--config", &config(dir.path(), true)]);
    login_from(with_id.port, "192.0.2.44:41000");
    assert!(
        wait_for(&dovecot, "rip=192.0.2.44"),
        "Dovecot did not log the client's address:\n{}",
        dovecot.log()
    );
    drop(with_id);

    // Off (the default): Dovecot sees popbridge's own address.
    let without = Popbridge::start(dovecot.imap_port, &["--config", &config(dir.path(), false)]);
    login_from(without.port, "192.0.2.55:42000");
    // Wait for Dovecot's line for that second login, then look at it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let logins = loop {
        let logins: Vec<String> = dovecot
            .log()
            .lines()
            .filter(|l| l.contains("imap-login: Info: Login: user=<alice>"))
            .map(str::to_string)
            .collect();
        if logins.len() >= 2 || Instant::now() > deadline {
            break logins;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(logins.len(), 2, "{}", dovecot.log());
    assert!(logins[0].contains("rip=192.0.2.44"), "{}", logins[0]);
    assert!(logins[1].contains("rip=127.0.0.1"), "{}", logins[1]);
}
