//! The Debian package: `scripts/build-deb.sh` builds it (from the debug
//! binary this test run already has, so the suite needs no release build),
//! `dpkg -i` installs it on this machine, and the installed files work:
//! `popbridge --version`, `--check-config` of the conffile
//! /etc/popbridge/popbridge.toml, `man -l` of the man pages, the bash
//! completion, `systemd-analyze verify` of the unit where systemd is
//! installed, and the group from the sysusers file. `dpkg --purge` removes
//! it again and the test checks that nothing of it is left (the group
//! popbridge-tls, which Debian packages leave behind by convention, is
//! removed here when this test created it).
//!
//! Needs root (dpkg); skipped with a message otherwise, and when a
//! popbridge package is already installed (an administrator's, which this
//! test must not replace).

use std::path::Path;
use std::process::{Command, Output};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Files the package installs that must be gone after the purge.
const INSTALLED: &[&str] = &[
    "/usr/bin/popbridge",
    "/etc/popbridge/popbridge.toml",
    "/usr/lib/systemd/system/popbridge.service",
    "/usr/lib/sysusers.d/popbridge.conf",
    "/usr/share/man/man1/popbridge.1.gz",
    "/usr/share/man/man1/popbridge-doctor.1.gz",
    "/usr/share/bash-completion/completions/popbridge",
    "/usr/share/zsh/vendor-completions/_popbridge",
    "/usr/share/fish/vendor_completions.d/popbridge.fish",
    "/usr/share/doc/popbridge/examples/popbridge.example.toml",
    "/usr/share/doc/popbridge/monitoring/popbridge-alerts.yml",
    "/usr/share/doc/popbridge/monitoring/popbridge-dashboard.json",
];

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn is_root() -> bool {
    run(Command::new("id").arg("-u")).stdout == b"0\n"
}

fn package_installed() -> bool {
    run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "popbridge"]))
        .stdout
        .starts_with(b"install ok")
}

fn group_exists(name: &str) -> bool {
    run(Command::new("getent").args(["group", name]))
        .status
        .success()
}

/// Purges the package (and the group when this test made it) even when an
/// assertion fails half-way.
struct Cleanup {
    remove_group: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if package_installed() {
            let _ = run(Command::new("dpkg").args(["--purge", "popbridge"]));
        }
        if self.remove_group && group_exists("popbridge-tls") {
            let _ = run(Command::new("groupdel").arg("popbridge-tls"));
        }
    }
}

#[test]
fn debian_package_installs_works_and_purges_cleanly() {
    if !is_root() {
        eprintln!("package test SKIPPED: dpkg -i needs root (CI runs as root)");
        return;
    }
    if run(Command::new("dpkg").arg("--version")).status.code() != Some(0) {
        eprintln!("package test SKIPPED: no dpkg on this machine");
        return;
    }
    if package_installed() {
        eprintln!(
            "package test SKIPPED: a popbridge package is installed already; not replacing it"
        );
        return;
    }
    let leftovers: Vec<&&str> = INSTALLED.iter().filter(|p| Path::new(p).exists()).collect();
    assert!(
        leftovers.is_empty(),
        "files of a popbridge install exist without the package: {leftovers:?}"
    );
    let etc_existed = Path::new("/etc/popbridge").exists();
    let _cleanup = Cleanup {
        remove_group: !group_exists("popbridge-tls"),
    };

    // Build. --fast: light compression of the (large) debug binary.
    ok(Command::new(Path::new(ROOT).join("scripts/build-deb.sh"))
        .args(["--binary", env!("CARGO_BIN_EXE_popbridge"), "--fast"])
        .current_dir(ROOT));
    let version = env!("CARGO_PKG_VERSION");
    let deb = Path::new(ROOT).join(format!("target/debian/popbridge_{version}-1_amd64.deb"));
    let deb = if deb.exists() {
        deb
    } else {
        // Another architecture: the only popbridge_*.deb there.
        std::fs::read_dir(Path::new(ROOT).join("target/debian"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.starts_with(&format!("popbridge_{version}-1_")) && name.ends_with(".deb")
            })
            .expect("the package in target/debian")
    };
    let contents = ok(Command::new("dpkg").arg("-c").arg(&deb));
    for path in INSTALLED {
        assert!(
            contents.contains(&format!(".{path}\n")),
            "{path} not in the package:\n{contents}"
        );
    }
    let control = ok(Command::new("dpkg-deb").arg("-I").arg(&deb));
    assert!(control.contains("Section: mail"), "{control}");

    // Install.
    ok(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(package_installed());
    let conffiles = ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "popbridge"]));
    assert!(
        conffiles.contains("/etc/popbridge/popbridge.toml"),
        "the configuration is a conffile: {conffiles}"
    );
    let v = ok(Command::new("/usr/bin/popbridge").arg("--version"));
    assert!(
        v.starts_with(&format!("popbridge {version}\ncommit: ")),
        "{v}"
    );
    let check = ok(Command::new("/usr/bin/popbridge").args([
        "--check-config",
        "--config",
        "/etc/popbridge/popbridge.toml",
    ]));
    assert!(check.contains("configuration OK"), "{check}");
    let conf = std::fs::read_to_string("/etc/popbridge/popbridge.toml").unwrap();
    assert!(
        conf.contains("\ndir = \"/var/lib/popbridge\"\n"),
        "data.dir is set"
    );
    assert!(
        conf.contains("\naddress = \"127.0.0.1:9110\"\n"),
        "the admin listener is on loopback"
    );
    assert!(
        conf.contains("\nallow_plaintext = false\n"),
        "safe defaults"
    );
    for page in ["popbridge.1.gz", "popbridge-doctor.1.gz"] {
        let text = ok(Command::new("man")
            .arg("-l")
            .arg(format!("/usr/share/man/man1/{page}"))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80"));
        assert!(text.contains("NAME"), "{page}: {text}");
        assert!(text.contains("popbridge"), "{page}: {text}");
    }
    let doctor = ok(Command::new("man")
        .args(["-l", "/usr/share/man/man1/popbridge-doctor.1.gz"])
        .env("MANPAGER", "cat"));
    assert!(doctor.contains("--credentials"), "{doctor}");
    ok(Command::new("bash").args([
        "-c",
        "source /usr/share/bash-completion/completions/popbridge && complete -p popbridge",
    ]));
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/popbridge.service").unwrap();
    assert!(
        unit.contains("\nExecStart=/usr/bin/popbridge --config /etc/popbridge/popbridge.toml\n"),
        "{unit}"
    );
    if run(Command::new("systemd-analyze").arg("--version"))
        .status
        .success()
    {
        ok(Command::new("systemd-analyze")
            .args(["verify", "/usr/lib/systemd/system/popbridge.service"]));
    } else {
        eprintln!("package test: systemd-analyze missing, unit not verified");
    }
    assert!(
        group_exists("popbridge-tls"),
        "sysusers made the TLS key group"
    );
    // Not enabled, not started: the administrator configures it first.
    assert!(
        !Path::new("/etc/systemd/system/multi-user.target.wants/popbridge.service").exists(),
        "the unit must not be enabled on install"
    );

    // Purge: nothing of it stays.
    ok(Command::new("dpkg").args(["--purge", "popbridge"]));
    assert!(!package_installed());
    let left: Vec<&&str> = INSTALLED.iter().filter(|p| Path::new(p).exists()).collect();
    assert!(left.is_empty(), "left after dpkg --purge: {left:?}");
    if !etc_existed {
        assert!(!Path::new("/etc/popbridge").exists(), "/etc/popbridge left");
    }
    for state in [
        "/var/lib/systemd/deb-systemd-helper-enabled/popbridge.service.dsh-also",
        "/var/lib/systemd/deb-systemd-helper-masked/popbridge.service",
    ] {
        assert!(!Path::new(state).exists(), "{state} left");
    }
}
