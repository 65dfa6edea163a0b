//! Holds the code to the layering in the crate docs (`# Layout`): every
//! `crate::<module>` path in a source file must name its own top-level
//! module or one below it, so the data path stays readable from the folder
//! names and no import cycle can come back.

use std::path::{Path, PathBuf};

/// Top-level modules and their layer: a module may use modules of a lower
/// layer, never of its own layer (but itself) or a higher one.
const LAYERS: &[(&str, u8)] = &[
    ("clock", 0),
    ("config", 0),
    ("metrics", 0),
    ("pop3", 0),
    ("tls", 0),
    ("cluster", 1),
    ("imap", 1),
    ("migrate", 2),
    ("oauth", 2),
    ("bridge", 3),
    ("server", 4),
    ("app", 5),
    ("cli", 6),
];

/// Files outside the layers: the crate root and this test.
const EXEMPT: &[&str] = &["lib.rs", "main.rs", "layering.rs"];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|&(_, l)| l)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level modules a line's code (not its comments) names with
/// `crate::`.
fn crate_paths(line: &str) -> Vec<&str> {
    let code = line.split("//").next().unwrap_or("");
    code.match_indices("crate::")
        .filter(|(i, _)| {
            // `popbridge::...` or `$crate::` are not this crate's paths.
            !code[..*i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == '$')
        })
        .map(|(i, m)| {
            let rest = &code[i + m.len()..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
}

/// Every import against the layering, as `file:line: a -> b`.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut found = Vec::new();
    for file in files {
        let rel = file.strip_prefix(src).unwrap_or(&file);
        let rel_str = rel.to_string_lossy().replace('\\', "/");
        if EXEMPT.contains(&rel_str.as_str()) {
            continue;
        }
        let top = rel_str
            .split('/')
            .next()
            .unwrap_or("")
            .trim_end_matches(".rs")
            .to_string();
        let Some(own) = layer(&top) else {
            found.push(format!("{rel_str}: module {top:?} has no layer in LAYERS"));
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for (n, line) in text.lines().enumerate() {
            for used in crate_paths(line) {
                if used == top {
                    continue;
                }
                match layer(used) {
                    Some(l) if l < own => {}
                    _ => found.push(format!("{rel_str}:{}: {top} -> {used}", n + 1)),
                }
            }
        }
    }
    found
}

#[test]
fn modules_import_only_the_layers_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&src);
    assert!(
        found.is_empty(),
        "imports against the layering:\n{}",
        found.join("\n")
    );
}

#[test]
fn every_top_level_module_has_a_layer() {
    let lib = include_str!("lib.rs");
    for line in lib.lines() {
        if let Some(m) = line.strip_prefix("pub mod ") {
            let m = m.trim_end_matches(';');
            assert!(layer(m).is_some(), "pub mod {m} has no layer in LAYERS");
        }
    }
}

/// The check itself can fail: an upward import is reported.
#[test]
fn an_upward_import_is_found() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let pop3 = dir.path().join("pop3");
    std::fs::create_dir(&pop3).unwrap_or_else(|e| panic!("mkdir: {e}"));
    std::fs::write(
        pop3.join("x.rs"),
        "use crate::bridge::Bridge; // a leaf reaching up\n// use crate::server in a comment\n",
    )
    .unwrap_or_else(|e| panic!("write: {e}"));
    std::fs::write(
        dir.path().join("imap.rs"),
        "use crate::pop3::X;\nfn f() { crate::metrics::m(); popbridge::app::x(); }\n",
    )
    .unwrap_or_else(|e| panic!("write: {e}"));
    assert_eq!(violations(dir.path()), vec!["pop3/x.rs:1: pop3 -> bridge"]);
}
