#!/usr/bin/env bash
# The whole test suite: installs Dovecot and the POP3 clients the tests use
# (apt-get, only when missing), then runs unit and integration tests, which
# start their own Dovecot instances on loopback ports. The benchmark
# is only compiled here (it takes minutes: run it with `cargo bench`).
# Without arguments a second pass builds the optional `legacy-tls` feature
# (the OpenSSL listener for TLS 1.0/1.1 devices) and runs its tests; with
# arguments (a test filter) only the first pass runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
cargo build --locked --benches
# The integration tests (one crate, tests/it) mostly wait on the servers they
# start, so more test threads than cores pay off: on a 2-core machine the
# integration tests take about a third of the time with 8 threads as with
# the default of one per core. RUST_TEST_THREADS or `-- --test-threads N`
# overrides this.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-8}"
cargo test --locked --lib --bins --tests "$@"
if [ "$#" -eq 0 ]; then
    # The legacy-tls feature: its unit tests and tests/it/legacy_tls.rs
    # (openssl s_client -tls1, PHP's imap extension).
    cargo test --locked --features legacy-tls --lib --test it -- legacy_tls
fi
