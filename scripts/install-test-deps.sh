#!/usr/bin/env bash
# Install what the integration tests need: Dovecot (IMAP + POP3), curl,
# fetchmail, mpop, getmail6, python3 and redis-server (the shared OAuth2
# token store's backend). Idempotent: does nothing when all present.
set -euo pipefail

have_all=1
for tool in dovecot doveadm curl fetchmail mpop getmail python3 redis-server; do
    if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
        have_all=0
        break
    fi
done
if [ "$have_all" -eq 1 ]; then
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

as_root apt-get update
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y \
    dovecot-core dovecot-imapd dovecot-pop3d curl fetchmail mpop getmail6 python3 \
    redis-server
