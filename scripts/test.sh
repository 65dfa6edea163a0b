#!/usr/bin/env bash
# The whole test suite: installs Dovecot and the POP3 clients the tests use
# (apt-get, only when missing), then runs unit and integration tests, which
# start their own Dovecot instances on random loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
cargo test --locked --all-targets "$@"
