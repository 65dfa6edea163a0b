//! The deployment files in `deploy/` agree with each other and with the
//! binary: every YAML file parses; the Kubernetes ports, probes, Services and
//! the ConfigMap's `popbridge.toml` name the same ports; that configuration
//! (and the container image's and compose's) passes `--check-config`; the
//! shutdown grace periods exceed the drain timeout; the systemd unit, the
//! Dockerfile and the Kubernetes Deployment use the same binary and config
//! paths; the Dockerfile's ports are the ones the README and compose use;
//! and the image's HEALTHCHECK command works.
//!
//! No container runtime or cluster is needed: the files are parsed here and
//! the configurations are checked by the real `popbridge` binary.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::cli::{clear_popbridge_env, BinRun};
use crate::common::ports::ClosedPort;
use popbridge::config::Config;
use serde::Deserialize;
use serde_yaml::Value;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_popbridge");

/// A `--check-config` or `--probe` run must finish long before this.
const RUN_TIMEOUT: Duration = Duration::from_secs(20);

/// `lifecycle.drain_timeout_secs` when a configuration does not set it.
const DEFAULT_DRAIN_SECS: u64 = 30;

/// The Kubernetes Deployment, ConfigMap, Secret and container names.
const APP: &str = "popbridge";
const CONFIGMAP: &str = "popbridge-config";
const TLS_SECRET: &str = "popbridge-tls";

// ---------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------

fn deploy_path(rel: &str) -> PathBuf {
    Path::new(DEPLOY).join(rel)
}

fn read(rel: &str) -> String {
    let p = deploy_path(rel);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Every document of a (possibly multi-document) YAML file; empty documents
/// are skipped.
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// The only document of a YAML file under `deploy/`.
fn yaml_doc(rel: &str) -> Value {
    let mut docs = yaml_docs(&deploy_path(rel));
    assert_eq!(docs.len(), 1, "deploy/{rel}: expected one YAML document");
    docs.remove(0)
}

/// Files under `dir` (recursively) whose name ends with one of `exts`.
fn files_with(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            out.extend(files_with(&p, exts));
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| exts.contains(&e))
        {
            out.push(p);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// YAML values
// ---------------------------------------------------------------------------

/// The value at a dotted path (`spec.template.spec`, `ports.0`); keys that
/// contain dots must be looked up with `Value::get` instead.
fn get<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |cur, key| match cur {
        Value::Sequence(s) => key.parse::<usize>().ok().and_then(|i| s.get(i)),
        _ => cur.get(key),
    })
}

fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    get(v, path).unwrap_or_else(|| {
        panic!(
            "no {path} in\n{}",
            serde_yaml::to_string(v).unwrap_or_default()
        )
    })
}

fn str_at<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string: {:?}", at(v, path)))
}

fn u64_at(v: &Value, path: &str) -> u64 {
    at(v, path)
        .as_u64()
        .unwrap_or_else(|| panic!("{path} is not a number: {:?}", at(v, path)))
}

fn seq_at<'a>(v: &'a Value, path: &str) -> &'a [Value] {
    at(v, path)
        .as_sequence()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("{path} is not a list: {:?}", at(v, path)))
}

fn bool_at(v: &Value, path: &str) -> bool {
    at(v, path)
        .as_bool()
        .unwrap_or_else(|| panic!("{path} is not a boolean: {:?}", at(v, path)))
}

fn strings(v: &[Value]) -> Vec<String> {
    v.iter()
        .map(|s| {
            s.as_str()
                .unwrap_or_else(|| panic!("not a string: {s:?}"))
                .to_string()
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------

/// The objects in `deploy/kubernetes/*.yaml` (without kustomization.yaml).
struct K8s {
    objects: Vec<(PathBuf, Value)>,
}

impl K8s {
    fn load() -> K8s {
        let mut objects = Vec::new();
        for file in files_with(&deploy_path("kubernetes"), &["yaml", "yml"]) {
            if file.file_name().is_some_and(|n| n == "kustomization.yaml") {
                continue;
            }
            for doc in yaml_docs(&file) {
                objects.push((file.clone(), doc));
            }
        }
        K8s { objects }
    }

    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.objects
            .iter()
            .map(|(_, o)| o)
            .filter(|o| get(o, "kind").and_then(Value::as_str) == Some(kind))
            .collect()
    }

    /// The Services in front of popbridge's pods (not the ExternalName
    /// alias for Redis, which selects no pods).
    fn pod_services(&self) -> Vec<&Value> {
        self.of_kind("Service")
            .into_iter()
            .filter(|s| get(s, "spec.type").and_then(Value::as_str) != Some("ExternalName"))
            .collect()
    }

    fn find(&self, kind: &str, name: &str) -> &Value {
        let found: Vec<_> = self
            .of_kind(kind)
            .into_iter()
            .filter(|o| str_at(o, "metadata.name") == name)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "expected exactly one {kind} {name:?} in deploy/kubernetes"
        );
        found[0]
    }

    fn deployment(&self) -> &Value {
        self.find("Deployment", APP)
    }

    fn pod_spec(&self) -> &Value {
        at(self.deployment(), "spec.template.spec")
    }

    fn container(&self) -> &Value {
        seq_at(self.pod_spec(), "containers")
            .iter()
            .find(|c| str_at(c, "name") == APP)
            .expect("a container named popbridge in the Deployment")
    }

    /// The ConfigMap's popbridge.toml, as text.
    fn config_text(&self) -> String {
        let cm = self.find("ConfigMap", CONFIGMAP);
        at(cm, "data")
            .get("popbridge.toml")
            .and_then(Value::as_str)
            .expect("ConfigMap popbridge-config has data.popbridge.toml")
            .to_string()
    }

    fn config(&self) -> toml::Table {
        parse_toml(&self.config_text(), "the ConfigMap's popbridge.toml")
    }
}

/// Named container ports: name -> number (all TCP).
fn container_ports(container: &Value) -> BTreeMap<String, u16> {
    let mut ports = BTreeMap::new();
    for p in seq_at(container, "ports") {
        let name = str_at(p, "name").to_string();
        let number = u16::try_from(u64_at(p, "containerPort")).expect("port number");
        let protocol = get(p, "protocol").and_then(Value::as_str).unwrap_or("TCP");
        assert_eq!(protocol, "TCP", "container port {name}");
        assert!(
            ports.insert(name.clone(), number).is_none(),
            "container port name {name} used twice"
        );
    }
    ports
}

/// A port reference (a number or a container port name) as a number that
/// the container declares.
fn resolve_port(container: &Value, port: &Value) -> u16 {
    let ports = container_ports(container);
    match port {
        Value::String(name) => *ports
            .get(name)
            .unwrap_or_else(|| panic!("no container port named {name:?}; have {ports:?}")),
        Value::Number(n) => {
            let n = u16::try_from(n.as_u64().expect("port number")).expect("port number");
            assert!(
                ports.values().any(|&p| p == n),
                "port {n} is not a container port ({ports:?})"
            );
            n
        }
        other => panic!("not a port: {other:?}"),
    }
}

/// The volume and the path inside it that provide `file` in the container
/// (the mount with the longest matching mountPath wins, as in the kernel).
fn volume_for<'a>(pod: &'a Value, container: &Value, file: &str) -> (&'a Value, String) {
    let mount = seq_at(container, "volumeMounts")
        .iter()
        .filter(|m| {
            let dir = str_at(m, "mountPath").trim_end_matches('/');
            file.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
        })
        .max_by_key(|m| str_at(m, "mountPath").len())
        .unwrap_or_else(|| panic!("no volumeMount provides {file}"));
    assert!(
        get(mount, "subPath").is_none(),
        "{file}: a subPath mount never sees ConfigMap or Secret updates"
    );
    let dir = str_at(mount, "mountPath").trim_end_matches('/');
    let rel = file[dir.len() + 1..].to_string();
    let name = str_at(mount, "name");
    let volume = seq_at(pod, "volumes")
        .iter()
        .find(|v| str_at(v, "name") == name)
        .unwrap_or_else(|| panic!("no volume named {name}"));
    (volume, rel)
}

/// The key of a ConfigMap or Secret volume source that appears at `rel`.
fn key_at(source: &Value, rel: &str) -> String {
    match get(source, "items") {
        Some(items) => items
            .as_sequence()
            .expect("items is a list")
            .iter()
            .find(|i| str_at(i, "path") == rel)
            .map(|i| str_at(i, "key").to_string())
            .unwrap_or_else(|| panic!("no item with path {rel} in {source:?}")),
        None => rel.to_string(),
    }
}

// ---------------------------------------------------------------------------
// TOML
// ---------------------------------------------------------------------------

fn parse_toml(text: &str, what: &str) -> toml::Table {
    text.parse()
        .unwrap_or_else(|e| panic!("{what} is not TOML: {e}"))
}

/// A string key such as `listen.address`, if set.
fn toml_str<'a>(t: &'a toml::Table, key: &str) -> Option<&'a str> {
    let (section, name) = key.split_once('.').expect("section.key");
    t.get(section)?.get(name)?.as_str()
}

/// The port of a `listen.address`-style key; it must be set.
fn toml_port(t: &toml::Table, key: &str) -> u16 {
    let a = toml_str(t, key).unwrap_or_else(|| panic!("{key} is not set"));
    a.parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("{key} = {a:?}: {e}"))
        .port()
}

/// Every listening address the configuration enables: key -> address.
fn toml_listeners(t: &toml::Table) -> BTreeMap<&'static str, SocketAddr> {
    ["listen.address", "listen.tls_address", "admin.address"]
        .into_iter()
        .filter_map(|k| match toml_str(t, k) {
            None | Some("") if k == "listen.address" => Some((k, "0.0.0.0:110".parse().unwrap())),
            None | Some("") => None,
            Some(a) => Some((
                k,
                a.parse()
                    .unwrap_or_else(|e| panic!("{k} = {a:?} is not an address: {e}")),
            )),
        })
        .collect()
}

fn drain_secs(t: &toml::Table) -> u64 {
    t.get("lifecycle")
        .and_then(|l| l.get("drain_timeout_secs"))
        .map(|v| {
            u64::try_from(
                v.as_integer()
                    .expect("lifecycle.drain_timeout_secs is an integer"),
            )
            .expect("non-negative drain timeout")
        })
        .unwrap_or(DEFAULT_DRAIN_SECS)
}

// ---------------------------------------------------------------------------
// Dockerfile, systemd unit, README
// ---------------------------------------------------------------------------

/// The Dockerfile's instructions as (KEYWORD, arguments), continuation lines
/// joined and comments dropped.
fn dockerfile() -> Vec<(String, String)> {
    let text = read("Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (kw, rest) = current
                    .split_once(char::is_whitespace)
                    .unwrap_or((&current, ""));
                out.push((kw.to_uppercase(), rest.trim().to_string()));
                current.clear();
            }
        }
    }
    assert!(current.is_empty(), "Dockerfile ends inside a continuation");
    out
}

/// The arguments of the instructions named `kw` in the final stage.
fn final_stage(kw: &str) -> Vec<String> {
    let all = dockerfile();
    let last_from = all
        .iter()
        .rposition(|(k, _)| k == "FROM")
        .expect("a FROM instruction");
    all[last_from..]
        .iter()
        .filter(|(k, _)| k == kw)
        .map(|(_, rest)| rest.clone())
        .collect()
}

/// The single instruction `kw` of the final stage.
fn final_one(kw: &str) -> String {
    let mut v = final_stage(kw);
    assert_eq!(
        v.len(),
        1,
        "expected one {kw} in the Dockerfile's final stage"
    );
    v.remove(0)
}

/// A JSON exec-form argument list (`["a", "b"]`); JSON is YAML.
fn exec_form(args: &str, what: &str) -> Vec<String> {
    serde_yaml::from_str::<Vec<String>>(args)
        .unwrap_or_else(|e| panic!("{what} must be in exec form [\"...\"]: {args}: {e}"))
}

fn dockerfile_entrypoint() -> Vec<String> {
    exec_form(&final_one("ENTRYPOINT"), "ENTRYPOINT")
}

fn dockerfile_cmd() -> Vec<String> {
    exec_form(&final_one("CMD"), "CMD")
}

/// The path after `--config` in an argument list.
fn config_arg(args: &[String]) -> String {
    let i = args
        .iter()
        .position(|a| a == "--config")
        .unwrap_or_else(|| panic!("no --config in {args:?}"));
    args.get(i + 1).expect("a path after --config").clone()
}

fn dockerfile_exposed() -> BTreeSet<u16> {
    final_stage("EXPOSE")
        .iter()
        .flat_map(|rest| rest.split_whitespace())
        .map(|p| {
            let p = p.strip_suffix("/tcp").unwrap_or(p);
            p.parse::<u16>()
                .unwrap_or_else(|e| panic!("EXPOSE {p}: {e} (only TCP ports expected)"))
        })
        .collect()
}

/// The repository file the Dockerfile installs as `dest`.
fn dockerfile_copy_source(dest: &str) -> PathBuf {
    let copies = final_stage("COPY");
    let args: Vec<&str> = copies
        .iter()
        .map(|c| c.split_whitespace().collect::<Vec<_>>())
        .find(|a| a.last() == Some(&dest))
        .unwrap_or_else(|| panic!("no COPY to {dest} in the final stage"));
    assert!(
        !args.iter().any(|a| a.starts_with("--from")),
        "{dest} should come from the repository"
    );
    assert_eq!(args.len(), 2, "COPY to {dest}: one source expected");
    Path::new(REPO).join(args[0])
}

/// uid of the final stage's USER (must be numeric).
fn dockerfile_uid() -> u64 {
    let user = final_one("USER");
    let uid = user.split(':').next().unwrap_or_default();
    uid.parse()
        .unwrap_or_else(|_| panic!("USER {user}: give a numeric uid so runAsNonRoot can check it"))
}

/// `[Section]` -> key -> values (a key may repeat) of a systemd unit.
fn systemd_unit(rel: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut unit: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut section = String::new();
    for line in read(rel).lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        assert!(
            !line.ends_with('\\'),
            "{rel}: keep each setting on one line: {line}"
        );
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{rel}: not key=value: {line}"));
        unit.entry(section.clone())
            .or_default()
            .entry(key.trim().to_string())
            .or_default()
            .push(value.trim().to_string());
    }
    unit
}

/// A systemd time span in seconds ("45", "45s", "1min 30s", "2m").
fn systemd_secs(v: &str) -> u64 {
    let mut total = 0;
    for part in v.split_whitespace() {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        let n: u64 = digits.parse().unwrap_or_else(|_| panic!("time span {v:?}"));
        total += match &part[digits.len()..] {
            "" | "s" | "sec" => n,
            "m" | "min" => n * 60,
            other => panic!("time span {v:?}: unit {other:?}"),
        };
    }
    total
}

/// A compose duration in seconds ("45s", "1m30s").
fn compose_secs(v: &str) -> u64 {
    let mut total = 0;
    let mut n = String::new();
    for c in v.chars() {
        if c.is_ascii_digit() {
            n.push(c);
            continue;
        }
        let value: u64 = n.parse().unwrap_or_else(|_| panic!("duration {v:?}"));
        total += match c {
            's' => value,
            'm' => value * 60,
            'h' => value * 3600,
            _ => panic!("duration {v:?}"),
        };
        n.clear();
    }
    assert!(n.is_empty(), "duration {v:?} needs a unit");
    total
}

/// The rows of the table under `## Ports` in deploy/README.md, cells with
/// backticks removed.
fn readme_ports_table() -> Vec<Vec<String>> {
    let readme = read("README.md");
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Ports"))
        .expect("deploy/README.md has a \"## Ports\" section");
    let rows: Vec<Vec<String>> = section
        .lines()
        .filter(|l| l.trim_start().starts_with('|'))
        .map(|l| {
            l.trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.replace('`', "").trim().to_string())
                .collect()
        })
        .collect();
    assert!(rows.len() > 2, "the Ports table has no rows");
    assert!(
        rows[1]
            .iter()
            .all(|c| c.chars().all(|ch| "-: ".contains(ch))),
        "the second line of the Ports table is the separator"
    );
    rows[2..].to_vec()
}

/// The first number in a table cell.
fn first_number(cell: &str) -> u16 {
    let digits: String = cell
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no port number in README cell {cell:?}"))
}

// ---------------------------------------------------------------------------
// Running popbridge
// ---------------------------------------------------------------------------

/// Runs the binary without any inherited `POPBRIDGE_*` or `RUST_LOG`
/// variable, plus `env`; kills it after [`RUN_TIMEOUT`].
fn popbridge(args: &[&str], env: &[(&str, &str)]) -> BinRun {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    clear_popbridge_env(&mut cmd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run popbridge");
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for popbridge") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("popbridge {args:?} still running after {RUN_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("read stdout");
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    BinRun {
        code: status.code(),
        stdout,
        stderr,
    }
}

/// Writes `text` to `dir/popbridge.toml` with the TLS files it names
/// (`tls.cert_file`, `tls.key_file`, `upstream.ca_file`) replaced by a fresh
/// test certificate and key in `dir`, and returns the file's path.
fn with_test_certs(text: &str, dir: &Path) -> PathBuf {
    let mut table = parse_toml(text, "configuration");
    let certified =
        rcgen::generate_simple_self_signed(vec!["pop.example.org".to_string()]).expect("rcgen");
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    fs::write(&cert, certified.cert.pem()).expect("write certificate");
    fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");
    for (section, name, file) in [
        ("tls", "cert_file", &cert),
        ("tls", "key_file", &key),
        ("upstream", "ca_file", &cert),
    ] {
        if let Some(t) = table.get_mut(section).and_then(toml::Value::as_table_mut) {
            if t.get(name)
                .and_then(toml::Value::as_str)
                .is_some_and(|v| !v.is_empty())
            {
                t.insert(
                    name.to_string(),
                    toml::Value::String(file.display().to_string()),
                );
            }
        }
    }
    let path = dir.join("popbridge.toml");
    fs::write(&path, toml::to_string(&table).expect("serialise TOML")).expect("write config");
    path
}

/// The configuration parses with popbridge's own (strict) schema, validates
/// in-process, and passes `popbridge --check-config` (TLS files replaced by
/// test ones).
fn assert_config_valid(text: &str, what: &str) {
    let parsed = Config::from_toml(text)
        .unwrap_or_else(|e| panic!("{what} does not parse as a popbridge configuration: {e}"));
    let dir = tempfile::tempdir().expect("temp dir");
    let file = with_test_certs(text, dir.path());
    let rewritten = Config::from_file(&file).expect("the rewritten configuration parses");
    rewritten
        .validate()
        .unwrap_or_else(|e| panic!("{what} is invalid: {e}"));
    let tls_set = !parsed.tls.cert_file.is_empty();
    assert_eq!(
        tls_set,
        !rewritten.tls.cert_file.is_empty(),
        "{what}: the rewrite changed which TLS files are set"
    );
    let run = popbridge(
        &[
            "--check-config",
            "--config",
            file.to_str().expect("UTF-8 path"),
        ],
        &[],
    );
    assert_eq!(
        run.code,
        Some(0),
        "{what}: popbridge --check-config refused it\n{}",
        run.describe()
    );
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn every_yaml_file_parses() {
    let files = files_with(Path::new(DEPLOY), &["yaml", "yml"]);
    assert!(files.len() >= 8, "YAML files under deploy/: {files:?}");
    for file in &files {
        let docs = yaml_docs(file);
        assert!(!docs.is_empty(), "{} is empty", file.display());
        let in_k8s = file.parent() == Some(deploy_path("kubernetes").as_path());
        for doc in &docs {
            assert!(
                doc.is_mapping(),
                "{}: a document is not a mapping",
                file.display()
            );
            if !in_k8s {
                continue;
            }
            assert!(!str_at(doc, "apiVersion").is_empty(), "{}", file.display());
            let kind = str_at(doc, "kind");
            if kind == "Kustomization" {
                continue;
            }
            assert!(!str_at(doc, "metadata.name").is_empty());
            assert_eq!(
                get(doc, "metadata.labels")
                    .and_then(|l| l.get("app.kubernetes.io/name"))
                    .and_then(Value::as_str),
                Some(APP),
                "{}: {kind} lacks the label app.kubernetes.io/name: popbridge",
                file.display()
            );
        }
    }
}

#[test]
fn kubernetes_ports_probes_and_services_agree() {
    let k = K8s::load();
    let config = k.config();
    let listeners = toml_listeners(&config);
    for (key, addr) in &listeners {
        assert!(
            addr.ip().is_unspecified(),
            "{key} = {addr}: in a pod, listen on all addresses so the pod IP reaches it"
        );
    }
    let pop3 = toml_port(&config, "listen.address");
    let pop3s = toml_port(&config, "listen.tls_address");
    let admin = toml_port(&config, "admin.address");
    for p in [pop3, pop3s] {
        assert!(
            p >= 1024,
            "port {p}: the container is not root and has no capabilities; listen above 1023 \
             and let the Service map 110/995"
        );
    }

    let c = k.container();
    let expected: BTreeMap<String, u16> = [("pop3", pop3), ("pop3s", pop3s), ("admin", admin)]
        .into_iter()
        .map(|(n, p)| (n.to_string(), p))
        .collect();
    assert_eq!(
        container_ports(c),
        expected,
        "Deployment container ports vs the ConfigMap's listen addresses"
    );

    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get_ = at(c, &format!("{probe}.httpGet"));
        assert_eq!(str_at(get_, "path"), path, "{probe} path");
        assert_eq!(
            resolve_port(c, at(get_, "port")),
            admin,
            "{probe} must probe admin.address"
        );
        if let Some(scheme) = get(get_, "scheme") {
            assert_eq!(scheme.as_str(), Some("HTTP"), "{probe} scheme");
        }
    }
    if let Some(startup) = get(c, "startupProbe.httpGet") {
        assert_eq!(resolve_port(c, at(startup, "port")), admin);
    }

    // Every Service: target ports exist; the admin port only on ClusterIP.
    let mut published: BTreeMap<u16, u16> = BTreeMap::new();
    let services = k.pod_services();
    assert!(!services.is_empty());
    for svc in &services {
        let name = str_at(svc, "metadata.name");
        let ty = get(svc, "spec.type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP");
        for p in seq_at(svc, "spec.ports") {
            let port = u16::try_from(u64_at(p, "port")).expect("service port");
            let protocol = get(p, "protocol").and_then(Value::as_str).unwrap_or("TCP");
            assert_eq!(protocol, "TCP", "Service {name} port {port}");
            let target = resolve_port(c, get(p, "targetPort").unwrap_or(at(p, "port")));
            if target == admin {
                assert_eq!(
                    ty, "ClusterIP",
                    "Service {name} publishes the admin port: only a ClusterIP Service may"
                );
            }
            assert!(
                published.insert(port, target).is_none(),
                "Service port {port} defined twice"
            );
        }
    }
    let main = k.find("Service", APP);
    let main_ports: BTreeMap<u16, u16> = seq_at(main, "spec.ports")
        .iter()
        .map(|p| {
            let port = u16::try_from(u64_at(p, "port")).unwrap();
            (
                port,
                resolve_port(c, get(p, "targetPort").unwrap_or(at(p, "port"))),
            )
        })
        .collect();
    assert_eq!(
        main_ports,
        BTreeMap::from([(110, pop3), (995, pop3s)]),
        "Service popbridge: 110 -> listen.address, 995 -> listen.tls_address"
    );
    assert_eq!(
        published.get(&admin),
        Some(&admin),
        "a ClusterIP Service publishes the admin port {admin}"
    );

    // The README's table says the same.
    for row in readme_ports_table() {
        let key = row.get(3).expect("a config key column");
        let image_port = first_number(&row[0]);
        let pod_port = first_number(&row[1]);
        let service_port = first_number(&row[2]);
        assert_eq!(
            toml_port(&config, key),
            pod_port,
            "README row {row:?}: the ConfigMap's {key}"
        );
        assert_eq!(
            published.get(&service_port),
            Some(&pod_port),
            "README row {row:?}: Service port {service_port} -> {pod_port}"
        );
        assert!(
            dockerfile_exposed().contains(&image_port),
            "README row {row:?}"
        );
    }

    // The Prometheus scrape annotation names the admin port.
    if let Some(p) = get(k.deployment(), "spec.template.metadata.annotations")
        .and_then(|a| a.get("prometheus.io/port"))
    {
        assert_eq!(p.as_str(), Some(admin.to_string().as_str()));
    }
}

#[test]
fn kubernetes_configmap_is_a_valid_popbridge_toml() {
    let k = K8s::load();
    let text = k.config_text();
    assert_config_valid(&text, "the ConfigMap's popbridge.toml");
    let config = Config::from_toml(&text).expect("parses");
    assert_eq!(config.upstream.address, "imap.example.org:993");
    assert_eq!(
        config.upstream.tls,
        popbridge::config::UpstreamTls::Implicit,
        "port 993 is IMAPS"
    );
    assert!(
        !config.auth.allow_plaintext,
        "plaintext logins must stay off in the Kubernetes configuration"
    );
}

#[test]
fn kubernetes_mounts_config_and_tls_where_popbridge_reads_them() {
    let k = K8s::load();
    let pod = k.pod_spec();
    let c = k.container();
    let config = k.config();

    // The config file: the Deployment's --config, the image's CMD and the
    // systemd unit name the same path, and the ConfigMap provides it.
    let args = strings(seq_at(c, "args"));
    let config_path = config_arg(&args);
    assert_eq!(config_path, config_arg(&dockerfile_cmd()), "image CMD");
    if let Some(command) = get(c, "command") {
        assert_eq!(
            strings(command.as_sequence().expect("command is a list")),
            dockerfile_entrypoint()
        );
    }
    let (volume, rel) = volume_for(pod, c, &config_path);
    assert_eq!(
        get(volume, "configMap.name").and_then(Value::as_str),
        Some(CONFIGMAP),
        "{config_path} comes from the ConfigMap"
    );
    assert_eq!(key_at(at(volume, "configMap"), &rel), "popbridge.toml");

    // The TLS pair: what [tls] names is the Secret's tls.crt and tls.key.
    let secret = k.find("Secret", TLS_SECRET);
    assert_eq!(str_at(secret, "type"), "kubernetes.io/tls");
    for (key, secret_key) in [("tls.cert_file", "tls.crt"), ("tls.key_file", "tls.key")] {
        let file = toml_str(&config, key).unwrap_or_else(|| panic!("{key} is set"));
        let (volume, rel) = volume_for(pod, c, file);
        let source = at(volume, "secret");
        assert_eq!(str_at(source, "secretName"), TLS_SECRET, "{key} = {file}");
        assert_eq!(key_at(source, &rel), secret_key, "{key} = {file}");
        let mode = get(source, "defaultMode")
            .and_then(Value::as_u64)
            .unwrap_or(0o644);
        assert_eq!(mode & 0o007, 0, "{file} must not be world-readable");
        let in_secret = ["data", "stringData"]
            .iter()
            .any(|d| get(secret, d).and_then(|m| m.get(secret_key)).is_some());
        assert!(in_secret, "the example Secret has {secret_key}");
    }
    let placeholder = serde_yaml::to_string(secret).expect("serialise");
    assert!(
        placeholder.contains("PLACEHOLDER")
            && read("kubernetes/secret.yaml").contains("EXAMPLE ONLY"),
        "the example Secret is clearly marked as placeholder data"
    );

    // Mounts are read-only; nothing in the pod needs to write.
    for m in seq_at(c, "volumeMounts") {
        assert!(bool_at(m, "readOnly"), "{m:?} must be readOnly");
    }
}

#[test]
fn kubernetes_pod_is_locked_down() {
    let k = K8s::load();
    let pod = k.pod_spec();
    let c = k.container();
    assert!(bool_at(pod, "securityContext.runAsNonRoot"));
    assert_eq!(
        str_at(pod, "securityContext.seccompProfile.type"),
        "RuntimeDefault"
    );
    let uid = get(c, "securityContext.runAsUser")
        .or_else(|| get(pod, "securityContext.runAsUser"))
        .and_then(Value::as_u64)
        .expect("runAsUser");
    assert_ne!(uid, 0);
    assert_eq!(uid, dockerfile_uid(), "runAsUser is the image's USER");
    assert!(!bool_at(c, "securityContext.allowPrivilegeEscalation"));
    assert!(bool_at(c, "securityContext.readOnlyRootFilesystem"));
    if let Some(p) = get(c, "securityContext.privileged") {
        assert_eq!(p.as_bool(), Some(false));
    }
    assert_eq!(
        strings(seq_at(c, "securityContext.capabilities.drop")),
        ["ALL"]
    );
    assert!(get(c, "securityContext.capabilities.add").is_none());
    assert_eq!(
        get(pod, "automountServiceAccountToken").and_then(Value::as_bool),
        Some(false),
        "popbridge never talks to the Kubernetes API"
    );
    for r in [
        "requests.cpu",
        "requests.memory",
        "limits.cpu",
        "limits.memory",
    ] {
        assert!(get(at(c, "resources"), r).is_some(), "resources.{r} is set");
    }
    assert!(
        get(pod, "hostNetwork").is_none() && get(pod, "sysctls").is_none(),
        "no host network or sysctls: the container listens above 1023"
    );
}

#[test]
fn kubernetes_selectors_and_scaling_fit_together() {
    let k = K8s::load();
    let d = k.deployment();
    let pod_labels = at(d, "spec.template.metadata.labels")
        .as_mapping()
        .expect("pod labels");
    let matches = |selector: &Value, what: &str| {
        let selector = selector.as_mapping().expect("a selector mapping");
        assert!(!selector.is_empty(), "{what}: empty selector");
        for (key, value) in selector {
            assert_eq!(
                pod_labels.get(key),
                Some(value),
                "{what}: selector {key:?} does not match the pod labels"
            );
        }
    };
    matches(at(d, "spec.selector.matchLabels"), "Deployment");
    for svc in k.pod_services() {
        matches(at(svc, "spec.selector"), str_at(svc, "metadata.name"));
    }
    let pdb = k.find("PodDisruptionBudget", APP);
    assert_eq!(str_at(pdb, "apiVersion"), "policy/v1");
    matches(at(pdb, "spec.selector.matchLabels"), "PodDisruptionBudget");
    let min_available = u64_at(pdb, "spec.minAvailable");
    assert_eq!(min_available, 1);

    let hpa = k.find("HorizontalPodAutoscaler", APP);
    assert_eq!(str_at(hpa, "apiVersion"), "autoscaling/v2");
    assert_eq!(str_at(hpa, "spec.scaleTargetRef.kind"), "Deployment");
    assert_eq!(str_at(hpa, "spec.scaleTargetRef.name"), APP);
    let min = u64_at(hpa, "spec.minReplicas");
    assert!(
        min > min_available,
        "minReplicas {min} must exceed the PDB's minAvailable, or drains block"
    );
    assert!(u64_at(hpa, "spec.maxReplicas") >= min);
    let metric = seq_at(hpa, "spec.metrics")
        .iter()
        .find(|m| get(m, "resource.name").and_then(Value::as_str) == Some("cpu"))
        .expect("a CPU metric");
    assert_eq!(str_at(metric, "type"), "Resource");
    assert!(
        get(at(k.container(), "resources.requests"), "cpu").is_some(),
        "CPU utilisation is relative to the CPU request"
    );
    assert!(
        get(d, "spec.replicas").is_none(),
        "the HPA owns the replica count; `replicas` in the Deployment fights it on every apply"
    );
}

#[test]
fn kustomization_lists_everything_but_the_placeholder_secret() {
    let kz = yaml_doc("kubernetes/kustomization.yaml");
    assert_eq!(str_at(&kz, "kind"), "Kustomization");
    let listed: BTreeSet<String> = strings(seq_at(&kz, "resources")).into_iter().collect();
    let present: BTreeSet<String> = files_with(&deploy_path("kubernetes"), &["yaml", "yml"])
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|n| n != "kustomization.yaml" && n != "secret.yaml")
        .collect();
    assert_eq!(listed, present);
}

#[test]
fn shutdown_grace_periods_exceed_the_drain_timeout() {
    // Kubernetes: preStop sleep + drain must end before SIGKILL.
    let k = K8s::load();
    let config = k.config();
    assert!(
        config
            .get("lifecycle")
            .and_then(|l| l.get("drain_timeout_secs"))
            .is_some(),
        "the ConfigMap sets lifecycle.drain_timeout_secs explicitly"
    );
    let drain = drain_secs(&config);
    let grace = u64_at(k.pod_spec(), "terminationGracePeriodSeconds");
    let pre_stop = get(k.container(), "lifecycle.preStop.sleep.seconds")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    assert!(
        grace > drain + pre_stop,
        "terminationGracePeriodSeconds {grace} <= preStop {pre_stop} + drain {drain}"
    );

    // systemd: TimeoutStopSec covers the default and the shipped configs.
    let unit = systemd_unit("systemd/popbridge.service");
    let stop = systemd_secs(&unit["Service"]["TimeoutStopSec"][0]);
    let image_config = parse_toml(
        &fs::read_to_string(dockerfile_copy_source("/etc/popbridge/popbridge.toml")).unwrap(),
        "image config",
    );
    for d in [DEFAULT_DRAIN_SECS, drain, drain_secs(&image_config)] {
        assert!(stop > d, "TimeoutStopSec {stop} <= drain timeout {d}");
    }

    // compose: stop_grace_period beats its config's drain timeout.
    let compose = yaml_doc("compose.yaml");
    let grace = compose_secs(str_at(&compose, "services.popbridge.stop_grace_period"));
    let drain = drain_secs(&parse_toml(&read(&compose_config_rel(&compose)), "compose"));
    assert!(
        grace > drain,
        "stop_grace_period {grace}s <= drain {drain}s"
    );
}

#[test]
fn systemd_unit_is_hardened_and_matches_the_image() {
    let unit = systemd_unit("systemd/popbridge.service");
    let service = &unit["Service"];
    let one = |key: &str| -> &str {
        let v = service
            .get(key)
            .unwrap_or_else(|| panic!("[Service] {key}= is missing"));
        assert_eq!(v.len(), 1, "{key}= given more than once");
        &v[0]
    };
    let exec: Vec<String> = one("ExecStart")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(exec[0], dockerfile_entrypoint()[0], "binary path");
    assert_eq!(exec[1..], dockerfile_cmd()[..], "arguments = image CMD");
    let k = K8s::load();
    assert_eq!(
        config_arg(&exec),
        config_arg(&strings(seq_at(k.container(), "args"))),
        "the Kubernetes ConfigMap lands where the unit reads its config"
    );
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one("KillSignal"), "SIGTERM");
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("LimitNOFILE", "65536"),
        ("RestartPreventExitStatus", "2"),
    ] {
        assert_eq!(one(key), value, "{key}=");
    }
    let families: BTreeSet<&str> = one("RestrictAddressFamilies").split_whitespace().collect();
    assert!(families.contains("AF_INET") && families.contains("AF_INET6"));
    assert!(!families.contains("AF_PACKET") && !families.contains("AF_NETLINK"));
    assert!(service["SystemCallFilter"].contains(&"@system-service".to_string()));
    assert_eq!(unit["Install"]["WantedBy"], ["multi-user.target"]);

    // Supplementary groups are created by the shipped sysusers.d file.
    let sysusers = read("systemd/popbridge-sysusers.conf");
    let groups: BTreeSet<&str> = sysusers
        .lines()
        .filter_map(|l| l.strip_prefix("g "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for g in service
        .get("SupplementaryGroups")
        .into_iter()
        .flatten()
        .flat_map(|v| v.split_whitespace())
    {
        assert!(
            groups.contains(g),
            "group {g} is not in popbridge-sysusers.conf"
        );
    }

    // systemd itself finds no unknown or invalid settings (when installed).
    if Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        let dir = tempfile::tempdir().expect("temp dir");
        let unit_path = dir.path().join("popbridge.service");
        fs::write(
            &unit_path,
            read("systemd/popbridge.service").replace(&exec[0], BIN),
        )
        .unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit_path)
            .output()
            .expect("run systemd-analyze");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let ours: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("popbridge.service"))
            .collect();
        assert!(
            out.status.success() && ours.is_empty(),
            "systemd-analyze verify:\n{text}"
        );
    } else {
        eprintln!("systemd-analyze not found; unit syntax not verified");
    }
}

/// The repository-relative path (under deploy/) of the config file compose
/// mounts over the image's.
fn compose_config_rel(compose: &Value) -> String {
    let target = config_arg(&dockerfile_cmd());
    seq_at(compose, "services.popbridge.volumes")
        .iter()
        .filter_map(Value::as_str)
        .find_map(|v| {
            let mut parts = v.split(':');
            let source = parts.next()?;
            (parts.next()? == target).then(|| source.trim_start_matches("./").to_string())
        })
        .unwrap_or_else(|| panic!("compose mounts no file at {target}"))
}

#[test]
fn dockerfile_ports_match_the_readme_and_compose() {
    let exposed = dockerfile_exposed();
    assert_eq!(
        exposed,
        BTreeSet::from([110, 995, 9110]),
        "EXPOSE: POP3, POP3S, admin"
    );
    let readme: BTreeSet<u16> = readme_ports_table()
        .iter()
        .map(|row| first_number(&row[0]))
        .collect();
    assert_eq!(readme, exposed, "deploy/README.md's Ports table vs EXPOSE");

    let compose = yaml_doc("compose.yaml");
    let service = at(&compose, "services.popbridge");
    assert_eq!(str_at(service, "build.context"), "..");
    let dockerfile =
        deploy_path(str_at(service, "build.context")).join(str_at(service, "build.dockerfile"));
    assert_eq!(
        dockerfile
            .canonicalize()
            .expect("compose's Dockerfile exists"),
        deploy_path("Dockerfile").canonicalize().unwrap()
    );
    let published: BTreeSet<u16> = seq_at(service, "ports")
        .iter()
        .map(|p| {
            let p = p.as_str().expect("ports as \"host:container\" strings");
            let container = p.rsplit(':').next().unwrap();
            let container = container.strip_suffix("/tcp").unwrap_or(container);
            container.parse().unwrap_or_else(|_| panic!("port {p}"))
        })
        .collect();
    assert!(
        published.is_subset(&exposed),
        "compose publishes {published:?}, the image exposes {exposed:?}"
    );
    let config = parse_toml(&read(&compose_config_rel(&compose)), "compose config");
    let listening: BTreeSet<u16> = toml_listeners(&config).values().map(|a| a.port()).collect();
    assert_eq!(
        listening, published,
        "compose publishes exactly the ports its popbridge.toml listens on"
    );

    // The image's default configuration listens on exposed ports only.
    let image = parse_toml(
        &fs::read_to_string(dockerfile_copy_source("/etc/popbridge/popbridge.toml")).unwrap(),
        "image config",
    );
    for (key, addr) in toml_listeners(&image) {
        assert!(
            exposed.contains(&addr.port()),
            "{key} = {addr} is not EXPOSEd"
        );
    }
}

#[test]
fn dockerfile_default_config_and_healthcheck_agree() {
    assert_eq!(dockerfile_entrypoint(), ["/usr/local/bin/popbridge"]);
    assert_eq!(
        dockerfile_cmd(),
        ["--config", "/etc/popbridge/popbridge.toml"]
    );
    let source = dockerfile_copy_source("/etc/popbridge/popbridge.toml");
    let text = fs::read_to_string(&source).expect("the image's default config");
    assert_config_valid(&text, "the image's default popbridge.toml");
    assert!(
        dockerfile_copy_source("/etc/popbridge/popbridge.example.toml")
            .ends_with("config/popbridge.example.toml")
    );

    let table = parse_toml(&text, "image config");
    let admin = toml_port(&table, "admin.address");
    let check = healthcheck_argv();
    assert_eq!(
        check[0],
        dockerfile_entrypoint()[0],
        "HEALTHCHECK runs popbridge"
    );
    let url = check.last().unwrap();
    assert_eq!(
        url,
        &format!("http://127.0.0.1:{admin}/healthz"),
        "HEALTHCHECK probes the image config's admin.address"
    );
}

/// The exec-form command of the Dockerfile's HEALTHCHECK.
fn healthcheck_argv() -> Vec<String> {
    let hc = final_one("HEALTHCHECK");
    let (_, cmd) = hc.split_once("CMD ").expect("HEALTHCHECK ... CMD [...]");
    exec_form(cmd.trim(), "HEALTHCHECK CMD")
}

#[test]
fn compose_config_passes_check_config() {
    let compose = yaml_doc("compose.yaml");
    let rel = compose_config_rel(&compose);
    let text = read(&rel);
    assert_config_valid(&text, "compose's popbridge.toml");
    // Its upstream is compose's Dovecot, on the port Dovecot listens on.
    let config = Config::from_toml(&text).expect("parses");
    let (host, port) = config.upstream.address.rsplit_once(':').unwrap();
    assert!(
        get(&compose, "services")
            .and_then(|s| s.get(host))
            .is_some(),
        "upstream {host} is a compose service"
    );
    let context = str_at(&compose, &format!("services.{host}.build.context"));
    let dovecot = fs::read_to_string(deploy_path(context).join("dovecot.conf"))
        .expect("dovecot.conf next to Dovecot's Dockerfile");
    assert!(
        dovecot.contains(&format!("port = {port}")),
        "Dovecot listens on {port}"
    );
}

/// An HTTP server on 127.0.0.1 that answers one request with `status`;
/// returns its port and the request it receives.
fn one_shot_http(status: &'static str) -> (u16, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 65536 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let body = "ok\n";
        let _ = write!(
            s,
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = tx.send(String::from_utf8_lossy(&request).into_owned());
    });
    (port, rx)
}

/// The Dockerfile's HEALTHCHECK, pointed at `port` instead of 9110.
fn healthcheck_against(port: u16) -> Vec<String> {
    let mut argv = healthcheck_argv();
    let url = argv.last_mut().unwrap();
    let rest = url
        .strip_prefix("http://")
        .expect("an http:// URL")
        .to_string();
    let path = &rest[rest.find('/').expect("a path")..];
    *url = format!("http://127.0.0.1:{port}{path}");
    argv
}

/// The image's HEALTHCHECK runs `popbridge --probe URL`: exit 0 on a 2xx
/// answer, 1 (what Docker calls unhealthy) otherwise, without reading any
/// configuration.
#[test]
fn healthcheck_command_reports_health() {
    let (port, request) = one_shot_http("200 OK");
    let argv = healthcheck_against(port);
    let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
    // A config file that does not exist must not matter to the probe.
    let run = popbridge(
        &args,
        &[("POPBRIDGE_CONFIG", "/nonexistent/popbridge.toml")],
    );
    assert_eq!(
        run.code,
        Some(0),
        "probe of a healthy server\n{}",
        run.describe()
    );
    let request = request
        .recv_timeout(Duration::from_secs(5))
        .expect("the probe sent a request");
    assert!(
        request.starts_with("GET /healthz HTTP/1."),
        "request: {request:?}"
    );

    let (port, _request) = one_shot_http("503 Service Unavailable");
    let argv = healthcheck_against(port);
    let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
    let run = popbridge(&args, &[]);
    assert_eq!(
        run.code,
        Some(1),
        "probe of an unhealthy server\n{}",
        run.describe()
    );

    let closed = ClosedPort::new();
    let argv = healthcheck_against(closed.port());
    let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
    let run = popbridge(&args, &[]);
    assert_eq!(run.code, Some(1), "probe of nothing\n{}", run.describe());
}

// ---------------------------------------------------------------------------
// Data directory, OAuth2 key and token store
// ---------------------------------------------------------------------------

/// The image's `data.dir` (/var/lib/popbridge).
fn image_config() -> toml::Table {
    parse_toml(
        &fs::read_to_string(dockerfile_copy_source("/etc/popbridge/popbridge.toml")).unwrap(),
        "image config",
    )
}

fn data_dir(t: &toml::Table, what: &str) -> String {
    let d = toml_str(t, "data.dir").unwrap_or_default();
    assert!(
        d.starts_with('/'),
        "{what}: data.dir must be an absolute path, is {d:?}"
    );
    d.to_string()
}

/// `dir` is `path` or one of its parents.
fn covers(dir: &str, path: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    path == dir || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

#[test]
fn image_creates_data_dir_owned_by_its_user_without_a_volume() {
    let dir = data_dir(&image_config(), "the image's popbridge.toml");
    let uid = dockerfile_uid();
    let copy = final_stage("COPY")
        .into_iter()
        .find(|c| c.split_whitespace().last() == Some(dir.as_str()))
        .unwrap_or_else(|| panic!("no COPY creates {dir} in the final stage"));
    let chown = copy
        .split_whitespace()
        .find_map(|a| a.strip_prefix("--chown="))
        .unwrap_or_else(|| panic!("COPY to {dir} without --chown: root would own it"));
    let owner: u64 = chown
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("--chown={chown}: numeric uid expected"));
    assert_eq!(owner, uid, "{dir} belongs to the image's USER");
    // A VOLUME would give each `docker run` / `compose run` its own
    // anonymous volume and drop what a derived image copies into it.
    for v in final_stage("VOLUME") {
        assert!(
            !v.contains(dir.as_str()),
            "VOLUME {v}: see the Dockerfile's comment on data.dir"
        );
    }
    assert!(
        read("README.md").contains(&dir),
        "deploy/README.md documents {dir}"
    );
}

#[test]
fn compose_keeps_data_dir_on_a_named_volume() {
    let compose = yaml_doc("compose.yaml");
    let config = parse_toml(&read(&compose_config_rel(&compose)), "compose");
    let dir = data_dir(&config, "compose's popbridge.toml");
    let mounts: Vec<(String, String)> = seq_at(&compose, "services.popbridge.volumes")
        .iter()
        .filter_map(Value::as_str)
        .map(|v| {
            let mut p = v.split(':');
            (
                p.next().unwrap().to_string(),
                p.next().unwrap_or("").to_string(),
            )
        })
        .collect();
    let (source, _) = mounts
        .iter()
        .find(|(_, target)| target.trim_end_matches('/') == dir)
        .unwrap_or_else(|| panic!("compose mounts nothing at data.dir {dir}: {mounts:?}"));
    assert!(
        !source.starts_with('.') && !source.starts_with('/'),
        "{dir} comes from a named volume, not a bind mount ({source})"
    );
    assert!(
        get(&compose, "volumes")
            .and_then(|v| v.get(source.as_str()))
            .is_some(),
        "volume {source} is declared under the top-level volumes:"
    );
    // The image's data.dir, so a new volume is initialised with its owner.
    assert_eq!(dir, data_dir(&image_config(), "image"));
}

/// What is wrong with the token store set-up of a Kubernetes Deployment.
fn k8s_store_problems(k: &K8s, config: &toml::Table) -> Vec<String> {
    let mut problems = Vec::new();
    let pod = k.pod_spec();
    let c = k.container();
    let dir = toml_str(config, "data.dir").unwrap_or_default().to_string();
    if dir.is_empty() {
        problems.push("data.dir is not set".to_string());
        return problems;
    }
    let store = toml_str(config, "oauth.store").unwrap_or("file");
    let mounts = get(c, "volumeMounts")
        .and_then(Value::as_sequence)
        .cloned()
        .unwrap_or_default();
    let volumes = get(pod, "volumes")
        .and_then(Value::as_sequence)
        .cloned()
        .unwrap_or_default();
    let volume = |name: &str| volumes.iter().find(|v| str_at(v, "name") == name).cloned();
    // The mount that holds data.dir itself (or a parent of it).
    let data_mount = mounts
        .iter()
        .filter(|m| covers(str_at(m, "mountPath"), &dir))
        .max_by_key(|m| str_at(m, "mountPath").len());
    for m in &mounts {
        let v = volume(str_at(m, "name"));
        let path = str_at(m, "mountPath");
        if v.as_ref().is_some_and(|v| get(v, "emptyDir").is_some())
            && (covers(path, &dir) || covers(&dir, path))
        {
            problems.push(format!(
                "an emptyDir at {path} loses tokens and hides the image's uidl-maps under {dir}"
            ));
        }
    }
    let hpa = k
        .of_kind("HorizontalPodAutoscaler")
        .into_iter()
        .any(|h| str_at(h, "spec.scaleTargetRef.name") == APP);
    match store {
        "file" => {
            if get(k.deployment(), "spec.replicas").and_then(Value::as_u64) != Some(1) || hpa {
                problems.push(
                    "oauth.store = \"file\" needs replicas: 1 and no HorizontalPodAutoscaler"
                        .into(),
                );
            }
            if get(k.deployment(), "spec.strategy.type").and_then(Value::as_str) != Some("Recreate")
            {
                problems.push(
                    "oauth.store = \"file\" on a ReadWriteOnce volume needs strategy Recreate"
                        .into(),
                );
            }
            match data_mount {
                None => problems.push(format!("nothing is mounted at data.dir {dir}")),
                Some(m) => {
                    if get(m, "readOnly").and_then(Value::as_bool) == Some(true) {
                        problems.push(format!("{dir} is mounted read-only"));
                    }
                    let pvc = volume(str_at(m, "name"))
                        .and_then(|v| get(&v, "persistentVolumeClaim").cloned());
                    if pvc.is_none() {
                        problems.push(format!("{dir} is not a PersistentVolumeClaim"));
                    }
                }
            }
        }
        "redis" => {
            if toml_str(config, "oauth.redis_url")
                .unwrap_or_default()
                .is_empty()
            {
                problems.push("oauth.store = \"redis\" without oauth.redis_url".into());
            }
            if let Some(m) = data_mount {
                if get(m, "readOnly").and_then(Value::as_bool) != Some(true) {
                    problems.push(format!(
                        "{dir} is writable, but with the Redis store replicas only read it"
                    ));
                }
            }
        }
        other => problems.push(format!("unknown oauth.store {other:?}")),
    }
    problems
}

#[test]
fn kubernetes_token_store_fits_the_replica_count() {
    let k = K8s::load();
    let config = k.config();
    assert_eq!(
        k8s_store_problems(&k, &config),
        Vec::<String>::new(),
        "deploy/kubernetes"
    );
    // Several replicas (the HPA) share tokens only through Redis.
    assert_eq!(toml_str(&config, "oauth.store"), Some("redis"));
    assert_eq!(
        data_dir(&config, "the ConfigMap"),
        data_dir(&image_config(), "image"),
        "the ConfigMap's data.dir is the image's directory (where uidl-maps layers land)"
    );

    // The same files with the file store must be refused: the check can fail.
    let mut as_file = config.clone();
    as_file["oauth"]
        .as_table_mut()
        .unwrap()
        .insert("store".into(), toml::Value::String("file".into()));
    let problems = k8s_store_problems(&k, &as_file);
    assert!(
        problems.iter().any(|p| p.contains("replicas: 1"))
            && problems
                .iter()
                .any(|p| p.contains("nothing is mounted at data.dir")),
        "{problems:?}"
    );

    // redis_url names the Service in redis.yaml, on its port.
    let url = toml_str(&config, "oauth.redis_url").unwrap();
    let rest = url.strip_prefix("redis://").expect("redis://");
    let hostport = rest.split('/').next().unwrap();
    let (host, port) = hostport.rsplit_once(':').expect("host:port");
    let svc = k.find("Service", host);
    assert_eq!(str_at(svc, "spec.type"), "ExternalName");
    assert!(
        seq_at(svc, "spec.ports")
            .iter()
            .any(|p| u64_at(p, "port").to_string() == port),
        "Service {host} has port {port}"
    );
}

/// Names of environment variables whose value is a secret.
const SECRET_VARS: &[&str] = &[
    "POPBRIDGE_OAUTH_KEY",
    "POPBRIDGE_OAUTH_REDIS_PASSWORD",
    "POPBRIDGE_DEVICE_PASSWORD",
    "POPBRIDGE_NEW_PASSWORD",
    "POPBRIDGE_OLD_PASSWORD",
];

fn is_secret_var(name: &str) -> bool {
    SECRET_VARS.contains(&name) || name.starts_with("POPBRIDGE_OAUTH_CLIENT_SECRET_")
}

#[test]
fn no_secret_value_is_written_inline() {
    // compose: secrets are files; no secret variable carries a value.
    let compose = yaml_doc("compose.yaml");
    for (name, service) in at(&compose, "services").as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        match get(service, "environment") {
            None => {}
            Some(Value::Mapping(m)) => {
                for (k, v) in m {
                    let k = k.as_str().unwrap();
                    assert!(
                        !is_secret_var(k) || v.is_null(),
                        "compose service {name}: {k} has an inline value"
                    );
                }
            }
            Some(Value::Sequence(s)) => {
                for e in strings(s) {
                    let var = e.split('=').next().unwrap();
                    assert!(
                        !(is_secret_var(var) && e.contains('=')),
                        "compose service {name}: {var} has an inline value"
                    );
                }
            }
            Some(other) => panic!("environment of {name}: {other:?}"),
        }
    }
    let secrets = at(&compose, "secrets")
        .as_mapping()
        .expect("top-level secrets");
    for (name, s) in secrets {
        assert!(
            get(s, "file").is_some() && get(s, "content").is_none(),
            "compose secret {name:?} must come from a file"
        );
    }
    let config = parse_toml(&read(&compose_config_rel(&compose)), "compose");
    let key = toml_str(&config, "oauth.key_file").unwrap_or_default();
    let served: Vec<String> = seq_at(&compose, "services.popbridge.secrets")
        .iter()
        .map(|s| {
            s.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| str_at(s, "source").to_string())
        })
        .collect();
    assert!(
        served.iter().any(|s| key == format!("/run/secrets/{s}")),
        "compose's oauth.key_file {key:?} is one of popbridge's secrets {served:?}"
    );
    for s in &served {
        let file = str_at(&compose, &format!("secrets.{s}.file"));
        let ignore =
            fs::read_to_string(deploy_path("compose/secrets/.gitignore")).unwrap_or_default();
        assert!(
            file.starts_with("./compose/secrets/") && ignore.lines().any(|l| l.trim() == "*"),
            "secret {s} ({file}) lives in compose/secrets/, which git ignores"
        );
    }

    // Dockerfile: no ENV or ARG with a secret.
    for kw in ["ENV", "ARG"] {
        for line in final_stage(kw) {
            for var in SECRET_VARS {
                assert!(!line.contains(var), "Dockerfile {kw} {line}");
            }
        }
    }

    // Kubernetes: secret variables only through valueFrom; the key and the
    // Redis password are files from a Secret volume.
    let k = K8s::load();
    let c = k.container();
    for e in get(c, "env")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
    {
        let name = str_at(e, "name");
        assert!(
            !is_secret_var(name) || get(e, "value").is_none(),
            "Deployment env {name} has an inline value"
        );
    }
    let config = k.config();
    for key in ["oauth.key_file", "oauth.redis_password_file"] {
        let file = toml_str(&config, key).unwrap_or_else(|| panic!("the ConfigMap sets {key}"));
        let (volume, rel) = volume_for(k.pod_spec(), c, file);
        let source =
            get(volume, "secret").unwrap_or_else(|| panic!("{key} = {file}: not a Secret"));
        let name = str_at(source, "secretName");
        let secret = k.find("Secret", name);
        let secret_key = key_at(source, &rel);
        let in_secret = ["data", "stringData"].iter().any(|d| {
            get(secret, d)
                .and_then(|m| m.get(secret_key.as_str()))
                .is_some()
        });
        assert!(in_secret, "the example Secret {name} has {secret_key}");
        let mode = get(source, "defaultMode")
            .and_then(Value::as_u64)
            .unwrap_or(0o644);
        assert_eq!(mode & 0o007, 0, "{file} must not be world-readable");
        assert!(
            serde_yaml::to_string(secret)
                .unwrap()
                .contains("PLACEHOLDER"),
            "Secret {name} in secret.yaml holds placeholders only"
        );
    }
    // Nothing but secret.yaml holds Secret objects.
    for (file, o) in &k.objects {
        if str_at(o, "kind") == "Secret" {
            assert!(file.ends_with("secret.yaml"), "{}", file.display());
        }
    }
}

/// Runs `popbridge oauth generate-key` and returns the key it printed.
fn generate_key() -> String {
    let run = popbridge(&["oauth", "generate-key"], &[]);
    assert_eq!(run.code, Some(0), "oauth generate-key\n{}", run.describe());
    let key = run.stdout.trim().to_string();
    assert!(!key.is_empty(), "generate-key printed nothing");
    key
}

/// `config` with its default route switched to OAuth2 (a generic provider
/// on loopback) and the key, data dir and Redis password moved into `dir`.
/// Returns the rewritten file and whether the key goes by environment.
fn with_oauth_route(text: &str, dir: &Path, key: &str) -> (PathBuf, bool) {
    let mut table = parse_toml(text, "configuration");
    let up = table
        .entry("upstream")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .unwrap();
    up.insert("auth".into(), "oauth2".into());
    up.insert("oauth_provider".into(), "deploytest".into());
    let data = dir.join("data");
    fs::create_dir(&data).unwrap();
    table
        .entry("data")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .unwrap()
        .insert("dir".into(), data.display().to_string().into());
    let oauth = table
        .get_mut("oauth")
        .and_then(toml::Value::as_table_mut)
        .expect("the shipped configuration has an [oauth] section");
    let key_by_env = oauth
        .get("key_file")
        .and_then(toml::Value::as_str)
        .unwrap_or_default()
        .is_empty();
    if !key_by_env {
        let key_file = dir.join("oauth.key");
        crate::common::write_private(&key_file, format!("{key}\n"));
        oauth.insert("key_file".into(), key_file.display().to_string().into());
    }
    if oauth
        .get("redis_password_file")
        .and_then(toml::Value::as_str)
        .is_some_and(|v| !v.is_empty())
    {
        let pw = dir.join("redis-password");
        fs::write(&pw, "not-a-real-password\n").unwrap();
        oauth.insert(
            "redis_password_file".into(),
            pw.display().to_string().into(),
        );
    }
    let mut provider = toml::Table::new();
    provider.insert("name".into(), "deploytest".into());
    provider.insert("preset".into(), "generic".into());
    provider.insert("client_id".into(), "popbridge-deploy-test".into());
    provider.insert("token_url".into(), "http://127.0.0.1:9/token".into());
    provider.insert(
        "device_authorization_url".into(),
        "http://127.0.0.1:9/device".into(),
    );
    oauth.insert(
        "providers".into(),
        toml::Value::Array(vec![toml::Value::Table(provider)]),
    );
    let text = toml::to_string(&table).unwrap();
    (with_test_certs(&text, dir), key_by_env)
}

/// Every shipped configuration, with an OAuth2 route added, passes
/// `--check-config` once its key exists (from `popbridge oauth
/// generate-key`), and is refused without it.
#[test]
fn shipped_configs_accept_an_oauth_route_with_a_generated_key() {
    let compose = yaml_doc("compose.yaml");
    let shipped = [
        (
            "the image's popbridge.toml",
            fs::read_to_string(dockerfile_copy_source("/etc/popbridge/popbridge.toml")).unwrap(),
        ),
        (
            "compose's popbridge.toml",
            read(&compose_config_rel(&compose)),
        ),
        ("the ConfigMap's popbridge.toml", K8s::load().config_text()),
    ];
    let key = generate_key();
    for (what, text) in shipped {
        let dir = tempfile::tempdir().unwrap();
        let (file, key_by_env) = with_oauth_route(&text, dir.path(), &key);
        let path = file.to_str().unwrap();
        let env: Vec<(&str, &str)> = if key_by_env {
            vec![("POPBRIDGE_OAUTH_KEY", key.as_str())]
        } else {
            vec![]
        };
        let run = popbridge(&["--check-config", "--config", path], &env);
        assert_eq!(
            run.code,
            Some(0),
            "{what} with an oauth2 route\n{}",
            run.describe()
        );
        assert!(
            !run.stdout.contains(&key) && !run.stderr.contains(&key),
            "{what}: the key was printed"
        );

        // Without the key (no variable, or no key file): refused, naming
        // where it should be.
        let key_place = if key_by_env {
            "POPBRIDGE_OAUTH_KEY"
        } else {
            fs::remove_file(dir.path().join("oauth.key")).unwrap();
            "oauth.key_file"
        };
        let run = popbridge(&["--check-config", "--config", path], &[]);
        assert_eq!(
            run.code,
            Some(2),
            "{what} without a key\n{}",
            run.describe()
        );
        assert!(run.stderr.contains(key_place), "{}", run.describe());
    }
}

#[test]
fn systemd_unit_provides_state_dir_and_key_credential() {
    let unit = systemd_unit("systemd/popbridge.service");
    let service = &unit["Service"];
    let one = |key: &str| -> String {
        let v = service
            .get(key)
            .unwrap_or_else(|| panic!("[Service] {key}= is missing"));
        assert_eq!(v.len(), 1, "{key}= given more than once");
        v[0].clone()
    };
    // StateDirectory=popbridge is /var/lib/popbridge, the image's data.dir,
    // so one popbridge.toml [data] section fits both.
    let state = one("StateDirectory");
    assert_eq!(
        format!("/var/lib/{state}"),
        data_dir(&image_config(), "image"),
        "StateDirectory= vs the image's data.dir"
    );
    assert_eq!(one("StateDirectoryMode"), "0700");
    // The key as a credential; popbridge does not expand
    // ${CREDENTIALS_DIRECTORY}, so the docs give the literal path.
    let cred = one("LoadCredential");
    let (id, _source) = cred.split_once(':').expect("LoadCredential=ID:SOURCE");
    let path = format!("/run/credentials/popbridge.service/{id}");
    let text = read("systemd/popbridge.service");
    assert!(
        text.contains(&format!("key_file = \"{path}\"")),
        "the unit documents key_file = {path:?}"
    );
    assert!(
        read("README.md").contains(&path),
        "deploy/README.md documents {path}"
    );
    assert!(
        !service.contains_key("Environment")
            || !service["Environment"]
                .iter()
                .any(|e| SECRET_VARS.iter().any(|v| e.contains(v))),
        "no secret in Environment="
    );
    // The named user that maintenance commands share (README).
    assert_eq!(one("User"), "popbridge");
    assert!(
        read("README.md").contains("-p User=popbridge -p DynamicUser=yes"),
        "deploy/README.md shows how to run the maintenance commands as the service's user"
    );
}

/// The README's maintenance examples name the config path each platform
/// uses and every maintenance command.
#[test]
fn readme_shows_the_maintenance_commands_per_platform() {
    let readme = read("README.md");
    let config = config_arg(&dockerfile_cmd());
    for (section, runner) in [
        ("Container image", "docker run"),
        ("Try it locally: compose", "docker compose"),
        ("Kubernetes", "kubectl"),
        ("systemd", "systemd-run"),
    ] {
        let text = readme
            .split("\n## ")
            .find(|s| s.starts_with(section))
            .unwrap_or_else(|| panic!("deploy/README.md has no \"## {section}\""));
        for cmd in ["oauth add", "device add", "migrate"] {
            assert!(
                text.contains(cmd),
                "\"## {section}\" shows `popbridge {cmd}`"
            );
        }
        assert!(text.contains(runner), "\"## {section}\" uses {runner}");
        assert!(
            text.contains(&format!("--config {config}")),
            "\"## {section}\" passes --config {config}"
        );
    }
}

// ---------------------------------------------------------------------------
// The admin listener's exposure
// ---------------------------------------------------------------------------

/// The `docker run` commands shown in `text` (shell lines, with `#` comment
/// markers and backslash continuations removed), as argument lists.
fn docker_run_commands(text: &str) -> Vec<Vec<String>> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let l = line.trim_start();
        let l = l.strip_prefix('#').unwrap_or(l).trim();
        match l.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(l);
                joined.push(std::mem::take(&mut current));
            }
        }
    }
    joined
        .iter()
        .filter_map(|c| c.find("docker run").map(|i| &c[i..]))
        .map(|c| {
            c.split_whitespace()
                .map(|w| {
                    w.trim_matches(|ch| ch == '`' || ch == '(' || ch == ')')
                        .to_string()
                })
                .collect()
        })
        .collect()
}

/// The `-p`/`--publish` values of a `docker run` argument list.
fn published(args: &[String]) -> Vec<String> {
    args.windows(2)
        .filter(|w| w[0] == "-p" || w[0] == "--publish")
        .map(|w| w[1].clone())
        .chain(
            args.iter()
                .filter_map(|a| a.strip_prefix("--publish="))
                .map(str::to_string),
        )
        .collect()
}

/// The admin endpoints have no authentication. The image binds them to the
/// container's loopback (its HEALTHCHECK runs inside the container), every
/// Docker example that publishes them does so on the host's loopback only
/// (and turns them on for the container's network with POPBRIDGE_ADMIN,
/// or the publication would reach nothing), compose publishes them on the
/// host's loopback; Kubernetes keeps them on the pod's address, where the
/// kubelet probes and Prometheus scrapes.
#[test]
fn admin_endpoints_stay_on_loopback_outside_kubernetes() {
    let image = image_config();
    let admin = toml_listeners(&image)["admin.address"];
    assert!(
        admin.ip().is_loopback(),
        "the image's admin.address is {admin}: the container's loopback only"
    );
    let admin_port = admin.port().to_string();

    let mut runs = 0;
    for (what, text) in [
        ("deploy/Dockerfile", read("Dockerfile")),
        ("deploy/README.md", read("README.md")),
        (
            "README.md",
            fs::read_to_string(Path::new(REPO).join("README.md")).unwrap(),
        ),
        ("deploy/compose.yaml", read("compose.yaml")),
    ] {
        for args in docker_run_commands(&text) {
            let admin_published: Vec<String> = published(&args)
                .into_iter()
                .filter(|p| p.rsplit(':').next() == Some(admin_port.as_str()))
                .collect();
            for p in &admin_published {
                runs += 1;
                assert!(
                    p.starts_with("127.0.0.1:"),
                    "{what}: `{}` publishes the admin port as {p}, not on the host's loopback",
                    args.join(" ")
                );
                assert!(
                    args.iter()
                        .any(|a| a.contains(&format!("POPBRIDGE_ADMIN=0.0.0.0:{admin_port}"))),
                    "{what}: `{}` publishes the admin port but leaves it on the container's loopback (add -e POPBRIDGE_ADMIN=0.0.0.0:{admin_port})",
                    args.join(" ")
                );
            }
        }
    }
    assert!(
        runs > 0,
        "no example shows how to reach the admin endpoints"
    );

    let compose = yaml_doc("compose.yaml");
    let compose_config = parse_toml(&read(&compose_config_rel(&compose)), "compose config");
    let compose_admin = toml_listeners(&compose_config)["admin.address"].port();
    for p in seq_at(&compose, "services.popbridge.ports") {
        let p = p.as_str().expect("ports as strings");
        if p.rsplit(':').next() == Some(compose_admin.to_string().as_str()) {
            assert!(
                p.starts_with("127.0.0.1:"),
                "compose publishes the admin port as {p}"
            );
        }
    }

    // Kubernetes: the kubelet's probes and Prometheus reach the pod's IP.
    let k = K8s::load();
    let k8s_admin = toml_listeners(&k.config())["admin.address"];
    assert!(
        k8s_admin.ip().is_unspecified(),
        "the ConfigMap's admin.address {k8s_admin} must listen on the pod's address"
    );
}

/// `--admin` / `POPBRIDGE_ADMIN` set admin.address over the file, like the
/// other listener flags (the image's examples depend on it).
#[test]
fn admin_address_can_be_set_by_flag_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("popbridge.toml");
    fs::write(
        &file,
        "[upstream]\ntls = \"none\"\n[admin]\naddress = \"127.0.0.1:9110\"\n",
    )
    .unwrap();
    let config = file.to_str().unwrap();
    let ok = popbridge(&["--check-config", "--config", config], &[]);
    assert_eq!(ok.code, Some(0), "{}", ok.describe());
    for (args, env) in [
        (vec!["--admin", "nowhere"], vec![]),
        (vec![], vec![("POPBRIDGE_ADMIN", "nowhere")]),
    ] {
        let mut a = vec!["--check-config", "--config", config];
        a.extend(args);
        let r = popbridge(&a, &env);
        assert_eq!(r.code, Some(2), "{}", r.describe());
        assert!(r.stderr.contains("admin.address"), "{}", r.describe());
    }
    let r = popbridge(
        &[
            "--check-config",
            "--config",
            config,
            "--admin",
            "127.0.0.1:9111",
        ],
        &[("POPBRIDGE_ADMIN", "nowhere")],
    );
    assert_eq!(
        r.code,
        Some(0),
        "the flag wins over the variable\n{}",
        r.describe()
    );
}
