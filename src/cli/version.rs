//! What `popbridge --version` says: the version, the git commit the binary
//! was built from ("unknown" for a build outside a git checkout, e.g. from
//! a source tarball), the enabled cargo features and the target. `-V` says
//! the version alone. The facts come from `build.rs`.

/// `-V`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `--version` (clap puts the program name in front).
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ncommit: ",
    env!("POPBRIDGE_GIT_COMMIT"),
    "\nfeatures: ",
    env!("POPBRIDGE_FEATURES"),
    "\ntarget: ",
    env!("POPBRIDGE_TARGET"),
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_version_names_commit_features_and_target() {
        let lines: Vec<&str> = LONG_VERSION.lines().collect();
        assert_eq!(lines[0], VERSION);
        let commit = lines[1].strip_prefix("commit: ").unwrap();
        assert!(
            commit == "unknown" || commit.chars().all(|c| c.is_ascii_hexdigit()),
            "{commit}"
        );
        assert!(lines[2].starts_with("features: "), "{}", lines[2]);
        assert!(lines[3].starts_with("target: "), "{}", lines[3]);
    }
}
