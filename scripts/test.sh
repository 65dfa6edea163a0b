#!/usr/bin/env bash
# The whole test suite: installs Dovecot and the POP3 clients the tests use
# (apt-get, only when missing), then runs unit and integration tests, which
# start their own Dovecot instances on random loopback ports. The benchmark
# is only compiled here (it takes minutes: run it with `cargo bench`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
cargo build --locked --benches
cargo test --locked --lib --bins --tests "$@"
