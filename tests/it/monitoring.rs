//! deploy/monitoring: the Prometheus alert rules pass `promtool check
//! rules` and their unit tests (`promtool test rules`, Debian's
//! `prometheus` package), the Grafana dashboard is well-formed, and every
//! metric name the rules and the dashboard use exists in a live `/metrics`
//! scrape of popbridge after a few sessions. The OAuth2 series appear only
//! on OAuth2 routes: `oauth::metrics_count_refreshes_cache_hits_and_reenrolments_by_provider_only`
//! checks those names in its own scrape with [`assert_scraped`].

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::ports::ClosedPort;
use crate::common::{text_message, Dovecot, DovecotOptions, Pop3, Popbridge};

const MONITORING: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/monitoring");
/// Metric names with this prefix exist only where a route uses OAuth2.
pub const OAUTH_PREFIX: &str = "popbridge_oauth_";

fn monitoring(file: &str) -> PathBuf {
    Path::new(MONITORING).join(file)
}

/// `popbridge_...` names in `text`.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("popbridge_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // Not part of a longer word (a label value or another name).
        let before = rest[..i].chars().next_back();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// The PromQL of every rule in popbridge-alerts.yml.
fn rule_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(monitoring("popbridge-alerts.yml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut out = Vec::new();
    for group in doc["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            out.push(rule["expr"].as_str().expect("expr").to_string());
        }
    }
    out
}

/// Every query string of the dashboard (panel targets and variables).
fn dashboard_queries() -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone())
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let text = std::fs::read_to_string(monitoring("popbridge-dashboard.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    walk(&doc, &mut out);
    out
}

/// The metric names the rules and the dashboard use.
pub fn used_names() -> BTreeSet<String> {
    rule_exprs()
        .iter()
        .chain(dashboard_queries().iter())
        .flat_map(|q| names_in(q))
        .collect()
}

/// The sample names of a Prometheus text exposition.
fn scraped_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// Every name in `names` is a sample of `scrape`.
pub fn assert_scraped(scrape: &str, names: impl IntoIterator<Item = String>) {
    let scraped = scraped_names(scrape);
    let missing: Vec<String> = names.into_iter().filter(|n| !scraped.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "used by deploy/monitoring but not in the scrape: {missing:?}\n--- scrape ---\n{scrape}"
    );
}

fn promtool() -> &'static str {
    let ok = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "promtool is missing: scripts/install-test-deps.sh installs it (Debian's prometheus package)"
    );
    "promtool"
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let promtool = promtool();
    for args in [
        vec!["check", "rules", "popbridge-alerts.yml"],
        vec!["test", "rules", "popbridge-alerts.test.yml"],
    ] {
        let out = Command::new(promtool)
            .args(&args)
            .current_dir(MONITORING)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The alerts the README and the issue name are there.
    let text = std::fs::read_to_string(monitoring("popbridge-alerts.yml")).unwrap();
    for alert in [
        "PopbridgeUpstreamLoginFailures",
        "PopbridgeLoginFailuresRising",
        "PopbridgeUpstreamUnreachable",
        "PopbridgeSessionsNearLimit",
        "PopbridgeConnectionsRefused",
        "PopbridgeOauthReenrolmentNeeded",
    ] {
        assert!(text.contains(&format!("alert: {alert}\n")), "{alert}");
    }
}

#[test]
fn the_dashboard_is_well_formed() {
    let text = std::fs::read_to_string(monitoring("popbridge-dashboard.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["uid"], "popbridge");
    let panels = doc["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate id: {p}");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            assert!(expr.contains("instance=~\"$instance\""), "{expr}");
        }
    }
    assert!(panels.len() >= 15, "{} panels", panels.len());
}

/// One HTTP GET: the body of a 200 answer.
fn get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

#[test]
fn every_metric_of_the_rules_and_dashboard_is_in_a_live_scrape() {
    let dovecot = Dovecot::start_with(DovecotOptions::default());
    for i in 1..=2 {
        dovecot.deliver(
            "alice",
            &text_message(
                "alice@example.org",
                &format!("scrape {i}"),
                &format!("<scrape-{i}@monitoring.test>"),
                [format!("body {i}")],
            ),
        );
    }
    let dead = ClosedPort::new();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("popbridge.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\naddress = \"127.0.0.1:0\"\n\n\
             [auth]\nfailure_delay_ms = 50\n\n\
             [limits]\nmax_sessions_per_ip = 3\n\n\
             [[routes]]\nname = \"dead\"\ndomains = [\"dead.example\"]\n\
             address = \"127.0.0.1:{}\"\ntls = \"none\"\n",
            dead.port()
        ),
    )
    .unwrap();
    let pb = Popbridge::start(dovecot.imap_port, &["--config", config.to_str().unwrap()]);
    let admin = pb.admin_port();

    // A session that reads and deletes; one served from the listing cache;
    // a wrong password; a login whose IMAP server is down; a connection
    // over limits.max_sessions_per_ip.
    let mut p = Pop3::connect(pb.port);
    p.login("alice", "secret");
    assert!(!p.retr(1).is_empty());
    assert!(p.cmd("DELE 1").starts_with("+OK"));
    p.quit();
    let mut p = Pop3::connect(pb.port);
    p.login("alice", "secret");
    p.quit();
    let mut p = Pop3::connect(pb.port);
    assert!(p.cmd("USER alice").starts_with("+OK"));
    assert!(p.cmd("PASS wrong").starts_with("-ERR"));
    assert!(p.cmd("USER alice@dead.example").starts_with("+OK"));
    assert!(p.cmd("PASS secret").starts_with("-ERR [SYS/TEMP]"));
    p.quit();
    // Once every session has ended, three open connections from 127.0.0.1
    // and a fourth is one too many.
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(admin, "/metrics")
        .lines()
        .filter(|l| l.starts_with("popbridge_sessions_active"))
        .any(|l| !l.ends_with(" 0"))
    {
        assert!(Instant::now() < deadline, "sessions still open");
        std::thread::sleep(Duration::from_millis(100));
    }
    let held: Vec<Pop3> = (0..3).map(|_| Pop3::connect(pb.port)).collect();
    let mut extra = TcpStream::connect((Ipv4Addr::LOCALHOST, pb.port)).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut refusal = String::new();
    let _ = extra.read_to_string(&mut refusal);
    assert!(refusal.starts_with("-ERR [SYS/TEMP]"), "{refusal:?}");
    drop(held);

    let used = used_names();
    assert!(used.len() >= 15, "{used:?}");
    let (oauth, here): (Vec<String>, Vec<String>) =
        used.into_iter().partition(|n| n.starts_with(OAUTH_PREFIX));
    assert!(!oauth.is_empty(), "the OAuth2 panels and alerts");
    // Counters of ended sessions land as the sessions end: poll.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let scrape = get(admin, "/metrics");
        let scraped = scraped_names(&scrape);
        if here.iter().all(|n| scraped.contains(n)) || Instant::now() > deadline {
            assert_scraped(&scrape, here.clone());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn names_are_found_in_queries() {
    let q = r#"sum by (le) (rate(popbridge_upstream_login_seconds_bucket{instance=~"$instance"}[5m])) / popbridge_auth_total"#;
    assert_eq!(
        names_in(q).into_iter().collect::<Vec<_>>(),
        vec![
            "popbridge_auth_total",
            "popbridge_upstream_login_seconds_bucket"
        ]
    );
    let scrape = "# TYPE popbridge_auth counter\npopbridge_auth_total{outcome=\"ok\"} 1\npopbridge_stls_total 0\n";
    assert_eq!(
        scraped_names(scrape).into_iter().collect::<Vec<_>>(),
        vec!["popbridge_auth_total", "popbridge_stls_total"]
    );
}
