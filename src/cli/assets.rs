//! `popbridge generate-assets DIR` (hidden): the man pages and shell
//! completions, made from this binary's own clap definitions, for the
//! Debian package (`scripts/build-deb.sh`).
//!
//! Why the binary writes them rather than `build.rs`: the command line is
//! built on the library's own types (the configuration's enums, the
//! subcommands' argument structs), which a build script cannot compile
//! without compiling the crate; and a page made by the very binary that
//! ships can never describe other flags than it has.
//!
//! Writes `DIR/man/popbridge.1` and one page per visible subcommand
//! (`popbridge-doctor.1`, `popbridge-oauth-add.1`, ...), and
//! `DIR/completions/popbridge.bash`, `_popbridge` (zsh) and
//! `popbridge.fish`.

use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

/// Writes the man pages and completions under `dir`.
pub fn write(dir: &Path) -> std::io::Result<()> {
    let man = dir.join("man");
    std::fs::create_dir_all(&man)?;
    clap_mangen::generate_to(super::Args::command(), &man)?;
    let completions = dir.join("completions");
    std::fs::create_dir_all(&completions)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut cmd = super::Args::command();
        clap_complete::generate_to(shell, &mut cmd, "popbridge", &completions)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn pages_and_completions_for_every_visible_command() {
        let dir = tempfile::tempdir().unwrap();
        super::write(dir.path()).unwrap();
        let man = std::fs::read_to_string(dir.path().join("man/popbridge.1")).unwrap();
        assert!(man.contains(".TH popbridge 1"), "{man}");
        assert!(man.contains("check\\-config"), "flags are on the page");
        for page in [
            "popbridge-doctor.1",
            "popbridge-oauth-add.1",
            "popbridge-migrate.1",
        ] {
            assert!(dir.path().join("man").join(page).is_file(), "{page}");
        }
        // The hidden command itself is not documented.
        assert!(!dir.path().join("man/popbridge-generate-assets.1").exists());
        for file in ["popbridge.bash", "_popbridge", "popbridge.fish"] {
            let text = std::fs::read_to_string(dir.path().join("completions").join(file)).unwrap();
            assert!(text.contains("doctor"), "{file}");
        }
    }
}
