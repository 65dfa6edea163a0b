//! Build facts for `popbridge --version`: the git commit the binary was
//! built from, and the enabled cargo features.
//!
//! The commit comes from `POPBRIDGE_GIT_COMMIT` when set (a packager
//! building from a tarball who knows it), else from `git rev-parse HEAD`
//! when the source is a git checkout, else it is "unknown": a build without
//! git or without `.git` (the Debian package built from a source tarball)
//! still succeeds.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=POPBRIDGE_GIT_COMMIT");
    let commit = match std::env::var("POPBRIDGE_GIT_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_string(),
        _ => {
            // Rebuild when HEAD moves: HEAD itself (a branch switch) and the
            // ref it points to (a commit). In a worktree these live under
            // the worktree's own git dir and the common dir.
            if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
                let dir = PathBuf::from(dir);
                println!("cargo:rerun-if-changed={}", dir.join("HEAD").display());
                if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
                    let common = git(&["rev-parse", "--git-common-dir"])
                        .map(PathBuf::from)
                        .unwrap_or(dir.clone());
                    println!("cargo:rerun-if-changed={}", common.join(&r).display());
                    println!(
                        "cargo:rerun-if-changed={}",
                        common.join("packed-refs").display()
                    );
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env=POPBRIDGE_GIT_COMMIT={commit}");

    // Cargo tells a build script each enabled feature as CARGO_FEATURE_<NAME>
    // (upper case, '-' as '_').
    let mut features: Vec<String> = std::env::vars()
        .filter_map(|(k, _)| k.strip_prefix("CARGO_FEATURE_").map(str::to_string))
        .map(|f| f.to_lowercase().replace('_', "-"))
        .collect();
    features.sort();
    let features = if features.is_empty() {
        "none".to_string()
    } else {
        features.join(", ")
    };
    println!("cargo:rustc-env=POPBRIDGE_FEATURES={features}");
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=POPBRIDGE_TARGET={target}");
}
