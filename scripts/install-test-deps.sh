#!/usr/bin/env bash
# Install what the integration tests need: Dovecot (IMAP + POP3), curl,
# fetchmail, mpop, getmail6, python3 and redis-server (the shared OAuth2
# token store's and the cluster state's backend), haproxy (the cluster test's load balancer), and the other IMAP upstreams of
# tests/common/servers: GNU Mailutils imap4d (installed), Cyrus IMAP 3.6 and
# Courier-IMAP 5.0 with their POP3 servers. Cyrus's and Courier's server
# packages conflict with Dovecot's, so they are unpacked (apt-get download +
# dpkg -x) under /opt/popbridge-test instead of installed; their support
# packages (cyrus-common, sasl2-bin, courier-base, courier-authdaemon, ...)
# are installed. Dovecot stays installed and working. For deploy/monitoring:
# promtool (Debian's prometheus package; its service is not started). For the
# Debian package test: cargo-deb (`cargo install cargo-deb --locked`, a few
# minutes once; kept in ~/.cargo/bin), man-db (`man -l`) and systemd
# (`systemd-analyze verify`).
#
# Idempotent: does nothing when everything is present and the unpacked
# servers match the installed support packages' versions. Needs root (or
# sudo). Services that packages would start on install are not started.
set -euo pipefail

OPT=/opt/popbridge-test
# Server packages that conflict with dovecot-imapd/dovecot-pop3d, unpacked
# into $OPT/<family>; they must match their installed support packages
# (cyrus-imapd depends on cyrus-common (= same version), courier-imap on
# courier-base (= same version)).
UNPACKED_CYRUS="cyrus-imapd cyrus-pop3d"
UNPACKED_COURIER="courier-imap courier-pop"

# What the unpacked binaries need at run time, plus the helpers the harness
# calls (unshare and mount come with util-linux/mount, always present).
PACKAGES=(
    dovecot-core dovecot-imapd dovecot-pop3d curl fetchmail mpop getmail6 python3
    redis-server haproxy
    cyrus-common cyrus-admin sasl2-bin libsasl2-modules libwrap0
    courier-base courier-authdaemon courier-authlib-userdb
    gamin libgamin0 libidn12 libgdbm6 libcourier-unicode4
    mailutils-imap4d openssl
    prometheus man-db systemd
    # The legacy-tls listener's tests (cargo feature legacy-tls): OpenSSL's
    # headers to build it, PHP's IMAP extension (c-client) as an old client.
    libssl-dev pkg-config php-cli php-imap
)

# Version of an installed package ("" if not installed).
installed_version() {
    { dpkg-query -W -f='${db:Status-Abbrev} ${Version}\n' "$1" 2>/dev/null || true; } \
        | awk '$1 == "ii" { print $2 }'
}

# The stamp an unpacked family records: its support package's version.
family_stamp() {
    case "$1" in
        cyrus) installed_version cyrus-common ;;
        courier) installed_version courier-base ;;
    esac
}

unpacked_ok() {
    local family=$1 want
    want=$(family_stamp "$family")
    [ -n "$want" ] && [ -f "$OPT/$family/.unpacked" ] \
        && [ "$(cat "$OPT/$family/.unpacked")" = "$want" ]
}

# cargo-deb builds the Debian package (tests/it/package.rs). From crates.io,
# pinned by its own lock file; installed once per machine.
export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo deb --version >/dev/null 2>&1; then
    echo "install-test-deps: installing cargo-deb (cargo install cargo-deb --locked)"
    cargo install cargo-deb --locked
fi

have_all=1
for tool in dovecot doveadm curl fetchmail mpop getmail python3 redis-server \
    saslpasswd2 couriertcpd makeuserdb imap4d openssl unshare promtool man systemd-analyze \
    php pkg-config haproxy; do
    if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
        have_all=0
        break
    fi
done
for file in /usr/lib/cyrus/bin/master /usr/lib/cyrus/bin/ctl_cyrusdb \
    /usr/lib/courier/courier-authlib/authdaemond /usr/lib/courier-authlib/libauthuserdb.so.0 \
    /usr/libexec/gam_server /etc/courier \
    "$OPT/cyrus/usr/lib/cyrus/bin/imapd" "$OPT/cyrus/usr/lib/cyrus/bin/pop3d" \
    "$OPT/courier/usr/bin/imapd" "$OPT/courier/usr/lib/courier/courier/imaplogin" \
    "$OPT/courier/usr/lib/courier/courier/courierpop3login" \
    "$OPT/courier/usr/lib/courier/courier/courierpop3d" \
    /usr/include/openssl/ssl.h; do
    [ -e "$file" ] || have_all=0
done
# PHP without its IMAP extension is not enough.
if [ "$have_all" -eq 1 ] && ! php -r 'exit(function_exists("imap_open") ? 0 : 1);' 2>/dev/null; then
    have_all=0
fi
if [ "$have_all" -eq 1 ] && unpacked_ok cyrus && unpacked_ok courier; then
    echo "install-test-deps: everything is already installed"
    exit 0
fi

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    else
        sudo "$@"
    fi
}

# Keep packages from starting their services (a system-wide authdaemond,
# exim, a Cyrus master on port 143) when nothing else prevents it; a
# policy-rc.d that is already there (as in containers) is left alone.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
    trap 'as_root rm -f "$policy"' EXIT
fi

as_root apt-get update
# Refuse anything that would remove a package (Dovecot above all).
removals=$(as_root env DEBIAN_FRONTEND=noninteractive apt-get install -s -y \
    --no-install-recommends "${PACKAGES[@]}" | awk '/^Remv / { print $2 }')
if [ -n "$removals" ]; then
    echo "install-test-deps: installing would remove: $removals; refusing" >&2
    exit 1
fi
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    "${PACKAGES[@]}"

# Unpack the conflicting server packages. apt-get download takes the
# candidate versions, the ones just installed for the support packages (the
# stamp records the support package's version, so an upgrade of it brings a
# new unpack).
unpack_family() {
    local family=$1 packages=$2 version tmp pkg
    version=$(family_stamp "$family")
    if unpacked_ok "$family"; then
        return
    fi
    tmp=$(mktemp -d)
    # apt's download sandbox user must be able to write there.
    chmod 755 "$tmp"
    for pkg in $packages; do
        (cd "$tmp" && as_root apt-get download -o APT::Sandbox::User=root "$pkg")
    done
    as_root rm -rf "$OPT/$family"
    as_root mkdir -p "$OPT/$family"
    for deb in "$tmp"/*.deb; do
        as_root dpkg -x "$deb" "$OPT/$family"
    done
    as_root sh -c "echo '$version' > '$OPT/$family/.unpacked'"
    rm -rf "$tmp"
    echo "install-test-deps: unpacked $packages $version into $OPT/$family"
}
unpack_family cyrus "$UNPACKED_CYRUS"
unpack_family courier "$UNPACKED_COURIER"

# Dovecot must still be there and working.
dovecot --version >/dev/null
