//! What the probe and the test login found, as report lines, and what
//! popbridge will do about what is missing.

use super::*;

/// The `tls` and `certificate` lines. `failed`: rustls's verdict when the
/// certificate did not verify (then `p` is the accept-any connection).
pub(super) fn report_tls(
    report: &mut RouteReport,
    imap: &ImapConfig,
    ca_file: &str,
    p: &Probe,
    failed: Option<&String>,
) {
    let name = match &imap.tls {
        UpstreamTlsSetup::None => {
            report.push(
                "tls",
                Status::Warn,
                "none (upstream.tls = \"none\"): passwords travel in plaintext to the IMAP server",
            );
            return;
        }
        UpstreamTlsSetup::Implicit(_, n) | UpstreamTlsSetup::StartTls(_, n) => {
            n.to_str().to_string()
        }
    };
    let Some(tls) = &p.tls else {
        if let Some(why) = failed {
            report.push("certificate", Status::Fail, why.clone());
        }
        return;
    };
    report.push_data(
        "tls",
        Status::Ok,
        format!("{}, {}", tls.version, tls.cipher),
        serde_json::json!({ "version": tls.version, "cipher": tls.cipher }),
    );
    let roots = if ca_file.is_empty() {
        "the system's CA certificates".to_string()
    } else {
        format!("upstream.ca_file {ca_file}")
    };
    let leaf = tls.chain.first().and_then(|d| cert_facts(d));
    let days = leaf
        .as_ref()
        .map(|c| (c.not_after_unix - crate::clock::now_unix() as i64).div_euclid(86_400));
    let expiry = match (&leaf, days) {
        (Some(c), Some(d)) => format!(
            "expires {} ({d} days)",
            crate::cli::oauth::format_time(c.not_after_unix.max(0) as u64)
        ),
        _ => "expiry unknown".to_string(),
    };
    let names = leaf
        .as_ref()
        .map(|c| c.names.join(", "))
        .unwrap_or_default();
    let data = serde_json::json!({
        "verified": failed.is_none(),
        "error": failed,
        "name_checked": name,
        "trusted_roots": roots,
        "chain_length": tls.chain.len(),
        "subject": leaf.as_ref().map(|c| c.subject.clone()),
        "issuer": leaf.as_ref().map(|c| c.issuer.clone()),
        "names": leaf.as_ref().map(|c| c.names.clone()),
        "not_after_unix": leaf.as_ref().map(|c| c.not_after_unix),
        "days_left": days,
    });
    match failed {
        Some(why) => report.push_data(
            "certificate",
            Status::Fail,
            format!(
                "NOT trusted: {why}; name checked {name:?} against {roots}; certificate for [{names}], {expiry}; popbridge refuses this server"
            ),
            data,
        ),
        None => {
            let status = match days {
                Some(d) if d < EXPIRY_WARNING_DAYS => Status::Warn,
                _ => Status::Ok,
            };
            report.push_data(
                "certificate",
                status,
                format!(
                    "valid for {name:?} (chain of {} verified against {roots}), {expiry}",
                    tls.chain.len()
                ),
                data,
            );
        }
    }
}

/// The `greeting`, `starttls`, `capabilities` and `sasl` lines.
pub(super) fn report_session(
    report: &mut RouteReport,
    config: &Config,
    route: &EffectiveRoute,
    p: &Probe,
    verified: bool,
) {
    let Some(greeting) = &p.greeting else {
        return;
    };
    let unverified = if verified {
        ""
    } else {
        " (read over an unverified connection)"
    };
    report.push("greeting", Status::Ok, format!("{greeting}{unverified}"));
    if let Some(plain) = &p.plain_caps {
        let offered = has(plain, "STARTTLS");
        // STARTTLS configured but not offered is the `starttls` failure
        // reported after the probe.
        let line = match (route.upstream.tls, offered) {
            (UpstreamTls::Starttls, true) => Some((Status::Ok, "offered, used")),
            (UpstreamTls::Starttls, false) => None,
            (_, true) => Some((Status::Info, "offered, not used (upstream.tls = \"none\")")),
            (_, false) => Some((Status::Info, "not offered")),
        };
        if let Some((status, detail)) = line {
            report.push_data(
                "starttls",
                status,
                detail,
                serde_json::json!({ "offered": offered }),
            );
        }
    } else if route.upstream.tls == UpstreamTls::Implicit {
        report.push("starttls", Status::Info, "not used (implicit TLS)");
    }
    let Some(caps) = &p.caps else {
        return;
    };
    report.push_data(
        "capabilities",
        Status::Ok,
        format!("before login: {}{unverified}", caps.join(" ")),
        serde_json::json!({ "before_login": caps }),
    );
    let mechanisms = auth_mechanisms(caps);
    let offered = |m: &str| mechanisms.iter().any(|x| x.eq_ignore_ascii_case(m));
    let listed = if mechanisms.is_empty() {
        "none".to_string()
    } else {
        mechanisms.join(" ")
    };
    let (status, detail) = match route.upstream.auth {
        UpstreamAuth::Oauth2 => match config.oauth.provider(&route.upstream.oauth_provider) {
            Ok(provider) => {
                let m = provider.sasl.mechanism.name();
                if offered(m) {
                    (
                        Status::Ok,
                        format!("offered: {listed}; popbridge will use AUTHENTICATE {m} (provider {})", provider.name),
                    )
                } else {
                    (
                        Status::Fail,
                        format!(
                            "offered: {listed}; provider {} needs AUTH={m}: popbridge cannot log in",
                            provider.name
                        ),
                    )
                }
            }
            Err(e) => (Status::Fail, e.to_string()),
        },
        UpstreamAuth::Passthrough => match route.upstream.login_mechanism {
            LoginMechanism::Auto if offered("PLAIN") => (
                Status::Ok,
                format!("offered: {listed}; popbridge will use AUTHENTICATE PLAIN"),
            ),
            LoginMechanism::Auto | LoginMechanism::Login if has(caps, "LOGINDISABLED") => (
                Status::Fail,
                format!(
                    "offered: {listed}; the server refuses LOGIN (LOGINDISABLED) and popbridge has no other way in"
                ),
            ),
            LoginMechanism::Auto => (
                Status::Ok,
                format!("offered: {listed}; no AUTH=PLAIN, so popbridge will use LOGIN"),
            ),
            LoginMechanism::Plain if offered("PLAIN") => (
                Status::Ok,
                format!("offered: {listed}; AUTHENTICATE PLAIN (login_mechanism = \"plain\")"),
            ),
            LoginMechanism::Plain => (
                Status::Warn,
                format!(
                    "offered: {listed}; AUTH=PLAIN not announced, popbridge sends AUTHENTICATE PLAIN anyway (login_mechanism = \"plain\")"
                ),
            ),
            LoginMechanism::Login => (
                Status::Ok,
                format!("offered: {listed}; LOGIN (login_mechanism = \"login\")"),
            ),
        },
    };
    report.push_data(
        "sasl",
        status,
        detail,
        serde_json::json!({ "mechanisms": mechanisms }),
    );
}

/// popbridge's own login and SELECT with the test credentials, the message
/// count and message 1's UIDL. Returns the capabilities after login.
pub(super) async fn test_login_select(
    report: &mut RouteReport,
    config: &Config,
    route: &EffectiveRoute,
    imap: &ImapConfig,
    login: &TestLogin,
) -> Option<Vec<String>> {
    // The session view a POP3 login of this user gets (per-device names,
    // hidden messages), as in the proxy.
    let view = match crate::bridge::policy::session_view(&route.policy, &login.user) {
        Ok(v) => v,
        Err(why) => {
            report.push("login", Status::Fail, format!("{}: {why}", login.user));
            return None;
        }
    };
    let user = route.upstream.login.apply(&view.account).to_string();
    let connector = ImapConnector::new(imap.clone());
    let started = Instant::now();
    let result = connector
        .login(
            Credentials::Password {
                user: &user,
                pass: &login.pass,
            },
            view.hide.as_deref(),
            None,
        )
        .await;
    let (conn, snap) = match result {
        Ok(x) => x,
        Err(e) => {
            let check = match &e {
                UpstreamError::No { command, .. } | UpstreamError::Bad { command, .. }
                    if *command == "SELECT" =>
                {
                    "select"
                }
                _ => "login",
            };
            report.push(check, Status::Fail, format!("as {user}: {e}"));
            return None;
        }
    };
    report.push_data(
        "login",
        Status::Ok,
        format!("as {user} in {}", millis(started.elapsed())),
        serde_json::json!({ "user": user, "ms": ms(started.elapsed()) }),
    );
    let caps = conn.capabilities().to_vec();
    report.push_data(
        "capabilities",
        Status::Ok,
        format!("after login: {}", caps.join(" ")),
        serde_json::json!({ "after_login": caps }),
    );
    let count = snap.messages.len();
    let octets: u64 = snap.messages.iter().map(|&(_, s)| s).sum();
    report.push_data(
        "select",
        Status::Ok,
        format!(
            "{}: {count} message{}, {octets} octets (UIDVALIDITY {})",
            route.upstream.mailbox,
            if count == 1 { "" } else { "s" },
            snap.uidvalidity
        ),
        serde_json::json!({ "messages": count, "octets": octets, "uidvalidity": snap.uidvalidity }),
    );
    report_uidl(report, config, route, &user, snap);
    conn.logout().await;
    Some(caps)
}

/// The UIDL message 1 gets, by the session's precedence: a valid X-UIDL
/// header (`reuse_xuidl`) > the imported map (`uidl_map`) > `uidl_format`
/// (as `bridge::login` applies them).
pub(super) fn report_uidl(
    report: &mut RouteReport,
    config: &Config,
    route: &EffectiveRoute,
    account: &str,
    snap: crate::imap::Snapshot,
) {
    let format = match crate::pop3::uidl::UidlFormat::parse(&route.pop3.uidl_format) {
        Ok(f) => f,
        Err(e) => {
            report.push("uidl", Status::Fail, e.to_string());
            return;
        }
    };
    let xuidl = snap.xuidl;
    let mut maildrop = Maildrop::new(snap.uidvalidity, snap.messages);
    let mut overrides = std::collections::HashMap::new();
    let mut source = format!("uidl_format {:?}", route.pop3.uidl_format);
    if route.pop3.uidl_map {
        let store = crate::migrate::runtime::MapStore::new(Path::new(&config.data.dir));
        let key = crate::migrate::store::MapKey::new(
            &route.upstream.address,
            account,
            &route.upstream.mailbox,
        );
        let uids: Vec<u32> = maildrop.visible().map(|(_, e)| e.uid).collect();
        match store.lookup(&key, maildrop.uidvalidity, uids.into_iter()) {
            Ok(crate::migrate::runtime::Lookup::Overrides(o)) => overrides = o,
            Ok(crate::migrate::runtime::Lookup::None) => {
                source.push_str("; no imported map for this account")
            }
            Ok(crate::migrate::runtime::Lookup::StaleUidvalidity { .. }) => {
                source.push_str("; the imported map is for another UIDVALIDITY and is ignored")
            }
            Err(e) => source.push_str(&format!("; the imported map is unusable: {e}")),
        }
    }
    let from_map: std::collections::HashSet<u32> = overrides.keys().copied().collect();
    let from_header: std::collections::HashSet<u32> = xuidl.keys().copied().collect();
    overrides.extend(xuidl);
    maildrop.set_uidls(overrides, &format);
    let Some(first) = MsgNum::new(1).and_then(|n| maildrop.get(n).ok()) else {
        report.push(
            "uidl",
            Status::Info,
            format!("the mailbox is empty: no message 1 ({source})"),
        );
        return;
    };
    let uidl = maildrop.uidl(first, &format);
    let from = if from_header.contains(&first.uid) {
        "its X-UIDL header".to_string()
    } else if from_map.contains(&first.uid) {
        "the imported map".to_string()
    } else {
        source
    };
    report.push_data(
        "uidl",
        Status::Ok,
        format!(
            "message 1 (UID {}, {} octets): {uidl} (from {from})",
            first.uid, first.size
        ),
        serde_json::json!({ "uid": first.uid, "size": first.size, "uidl": uidl }),
    );
}

/// What popbridge will do about what the server has or lacks, with this
/// route's settings. `after`: the capabilities after login, when known.
pub(super) fn consequences(
    report: &mut RouteReport,
    route: &EffectiveRoute,
    before: &[String],
    after: Option<&[String]>,
) {
    let caps = after.unwrap_or(before);
    let known = after.is_some();
    let policy = route.policy.delete;
    let policy_name = match policy {
        DeletePolicy::Expunge => "expunge",
        DeletePolicy::Flag => "flag",
        DeletePolicy::Move => "move",
        DeletePolicy::Keep => "keep",
        DeletePolicy::PerDevice => "per-device",
    };
    let uidplus = has(caps, "UIDPLUS");
    let has_move = has(caps, "MOVE");
    let (status, detail) = if uidplus {
        (
            Status::Ok,
            "UIDPLUS: QUIT removes exactly the DELE'd messages (UID EXPUNGE)".to_string(),
        )
    } else if !known {
        (
            Status::Info,
            "UIDPLUS not announced before login (servers often announce it only after): give test credentials to know".to_string(),
        )
    } else {
        match (policy, route.upstream.no_uidplus, has_move) {
            (DeletePolicy::Expunge, NoUidplus::Refuse, _) => (
                Status::Fail,
                "no UIDPLUS: QUIT will refuse deletions (no_uidplus = \"refuse\"); set no_uidplus = \"expunge-if-alone\" or another delete_policy".to_string(),
            ),
            (DeletePolicy::Expunge, NoUidplus::ExpungeIfAlone, _) => (
                Status::Warn,
                "no UIDPLUS: QUIT flags the messages and expunges only when no other message is flagged \\Deleted (no_uidplus = \"expunge-if-alone\")".to_string(),
            ),
            (DeletePolicy::Move, _, true) => (
                Status::Ok,
                "no UIDPLUS: not needed, MOVE moves the DELE'd messages (delete_policy = \"move\")".to_string(),
            ),
            (DeletePolicy::Move, _, false) => (
                Status::Fail,
                "neither UIDPLUS nor MOVE: QUIT will refuse to move deleted messages (delete_policy = \"move\")".to_string(),
            ),
            _ => (
                Status::Info,
                format!("no UIDPLUS: not needed (delete_policy = \"{policy_name}\" expunges nothing)"),
            ),
        }
    };
    report.push_data(
        "uidplus",
        status,
        detail,
        serde_json::json!({ "offered": uidplus, "known": known }),
    );
    if policy == DeletePolicy::Move {
        let (status, detail) = match (has_move, uidplus, known) {
            (true, _, _) => (Status::Ok, "MOVE: QUIT moves with UID MOVE".to_string()),
            (false, true, _) => (
                Status::Ok,
                "no MOVE: QUIT copies, flags and expunges exactly those messages (UID COPY + UID EXPUNGE)".to_string(),
            ),
            (false, false, true) => (Status::Info, "no MOVE (see uidplus)".to_string()),
            (false, false, false) => (
                Status::Info,
                "MOVE not announced before login: give test credentials to know".to_string(),
            ),
        };
        report.push_data(
            "move",
            status,
            detail,
            serde_json::json!({ "offered": has_move }),
        );
    } else {
        report.push_data(
            "move",
            Status::Info,
            format!(
                "{} (used only with delete_policy = \"move\")",
                if has_move { "offered" } else { "not offered" }
            ),
            serde_json::json!({ "offered": has_move }),
        );
    }
    let literal_plus = has(caps, "LITERAL+") || has(caps, "LITERAL-");
    report.push_data(
        "literal+",
        Status::Info,
        format!(
            "{}: popbridge does not need it (LOGIN waits for the server's + before a literal)",
            if literal_plus {
                "offered"
            } else {
                "not offered"
            }
        ),
        serde_json::json!({ "offered": literal_plus }),
    );
    let id = has(caps, "ID") || has(before, "ID");
    let (status, detail) = match (route.upstream.send_client_id, id) {
        (true, true) => (
            Status::Ok,
            "offered: popbridge tells the server each client's address (send_client_id = true)"
                .to_string(),
        ),
        (true, false) => (
            Status::Warn,
            "not offered: the server will not learn client addresses, its logs and penalties see popbridge (send_client_id = true)".to_string(),
        ),
        (false, offered) => (
            Status::Info,
            format!(
                "{}: not used (send_client_id = false)",
                if offered { "offered" } else { "not offered" }
            ),
        ),
    };
    report.push_data("id", status, detail, serde_json::json!({ "offered": id }));
}
