#!/usr/bin/env bash
# Builds the Debian package: target/debian/popbridge_<version>-1_<arch>.deb.
#
#   scripts/build-deb.sh [--binary PATH] [--fast]
#
# 1. cargo build --release of the binary; or, with --binary PATH, that
#    binary instead (the package test passes its debug build, so the suite
#    needs no release build: cargo-deb is then pointed at a private target
#    directory, target/deb-assets/target/release/, holding a copy of it);
# 2. the binary writes its man pages and bash, zsh and fish completions
#    from its own clap definitions (`popbridge generate-assets`) into
#    target/deb-assets/;
# 3. the conffile /etc/popbridge/popbridge.toml: config/popbridge.example.toml
#    with data.dir = "/var/lib/popbridge" and the admin listener on
#    127.0.0.1:9110; every other key at its (safe) default;
# 4. the systemd unit: deploy/systemd/popbridge.service with the binary at
#    /usr/bin/popbridge (a package's path) instead of /usr/local/bin, and
#    deploy/systemd/popbridge-sysusers.conf as popbridge.conf;
# 5. cargo deb --no-build (metadata in Cargo.toml, [package.metadata.deb];
#    maintainer scripts in deploy/debian/). --fast: lighter compression.
#
# Needs cargo-deb (`cargo install cargo-deb --locked`;
# scripts/install-test-deps.sh installs it). The git commit in
# `popbridge --version` comes from the checkout, or POPBRIDGE_GIT_COMMIT
# when building from a tarball.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

binary=""
deb_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        --fast) deb_args+=(--fast); shift ;;
        *) echo "build-deb: unknown argument $1" >&2; exit 2 ;;
    esac
done

assets=target/deb-assets
rm -rf "$assets"
mkdir -p "$assets/systemd"
if [ -z "$binary" ]; then
    cargo build --locked --release --bin popbridge
    bin="${CARGO_TARGET_DIR:-target}/release/popbridge"
else
    [ -x "$binary" ] || { echo "build-deb: $binary is not an executable" >&2; exit 1; }
    mkdir -p "$assets/target/release"
    cp "$binary" "$assets/target/release/popbridge"
    export CARGO_TARGET_DIR="$PWD/$assets/target"
    bin="$assets/target/release/popbridge"
fi
"$bin" generate-assets "$assets"

# The conffile: two keys differ from the example.
awk '
    /^\[/ { section = $0 }
    section == "[data]" && $0 == "# dir = \"/var/lib/popbridge\"" {
        print "dir = \"/var/lib/popbridge\""; data = 1; next
    }
    section == "[admin]" && $0 == "address = \"\"" {
        print "address = \"127.0.0.1:9110\""; admin = 1; next
    }
    { print }
    END { if (!data || !admin) exit 1 }
' config/popbridge.example.toml > "$assets/popbridge.toml.body" || {
    echo "build-deb: config/popbridge.example.toml no longer has the [data] dir or [admin] address line this script sets" >&2
    exit 1
}
{
    echo "# /etc/popbridge/popbridge.toml, installed by the popbridge Debian package"
    echo "# (a conffile: your changes survive upgrades). It is the example"
    echo "# configuration with data.dir = /var/lib/popbridge and the admin listener"
    echo "# on 127.0.0.1:9110 (/metrics, /healthz, /readyz). Set [upstream] and [tls],"
    echo "# check with popbridge --check-config --config /etc/popbridge/popbridge.toml"
    echo "# and popbridge --config /etc/popbridge/popbridge.toml doctor, then"
    echo "# systemctl enable --now popbridge."
    echo "#"
    cat "$assets/popbridge.toml.body"
} > "$assets/popbridge.toml"
rm "$assets/popbridge.toml.body"

cp deploy/systemd/popbridge-sysusers.conf "$assets/popbridge.conf"
sed 's#^ExecStart=/usr/local/bin/popbridge #ExecStart=/usr/bin/popbridge #' \
    deploy/systemd/popbridge.service > "$assets/systemd/popbridge.service"
grep -q '^ExecStart=/usr/bin/popbridge ' "$assets/systemd/popbridge.service" || {
    echo "build-deb: deploy/systemd/popbridge.service has no ExecStart=/usr/local/bin/popbridge line" >&2
    exit 1
}

mkdir -p target/debian
cargo deb --no-build --locked --strip --output target/debian "${deb_args[@]}"
