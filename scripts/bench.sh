#!/usr/bin/env bash
# The POP3 benchmark: Dovecot's own POP3 server against popbridge in front of
# the same Dovecot's IMAP, on loopback (see docs/BENCHMARKS.md). Installs
# Dovecot when missing, raises the open-files limit, and keeps a copy of the
# report in target/bench/.
#
# Usage: scripts/bench.sh [--quick] [--reps N] [--scenario NAME[,NAME...]]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh >&2
# popbridge and Dovecot inherit this; 2,000 idle sessions need ~4,000 files.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
mkdir -p target/bench
out="target/bench/pop3_bench-$(date -u +%Y%m%dT%H%M%SZ).md"
cargo bench --bench pop3_bench -- "$@" | tee "$out"
echo "report saved to $out" >&2
