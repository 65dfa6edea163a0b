#!/usr/bin/env bash
# Fuzz popbridge's sans-I/O POP3 core with libFuzzer, each target for a
# bounded time.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to $FUZZ_SECONDS, else 60. Targets (in
# fuzz/fuzz_targets/) default to all: command_parser, message_encoder,
# uidl_store, imap_reader (the IMAP response framer, imap::wire),
# proxy_header (the PROXY protocol header, parsed with ppp).
# For each target it prints the executions, the coverage (libFuzzer's cov/ft)
# and whether a crash was found (then the input file, in hex, and how to
# reproduce it). Exits 1 if any target crashed, 2 if nothing could be built.
#
# Corpora grow in fuzz/corpus/<target> (seeded from fuzz/seeds/<target>),
# crashes land in fuzz/artifacts/<target>/; fuzz/target, fuzz/corpus and
# fuzz/artifacts are git-ignored. Set FUZZ_JOBS=N to run N workers per target
# (libFuzzer -fork), FUZZ_ARGS for extra libFuzzer flags (with FUZZ_JOBS > 1,
# FUZZ_ARGS=-ignore_crashes=1 goes on after a crash, saving each one), and
# POPBRIDGE_FUZZ_KEEP_CRLF=1 to keep command_parser from splitting a CRLF
# across reads (hides the known LineDecoder CR/LF-split bug, see the target).
#
# What works on a machine with only stable Rust (1.95, no nightly):
# - cargo-fuzz is installed with `cargo install cargo-fuzz --locked`
#   (crates.io); its nightly-only flags (-Zsanitizer=address, -Cpasses=...)
#   are accepted by stable rustc with RUSTC_BOOTSTRAP=1, which this script
#   exports. `cargo fuzz build` / `cargo fuzz run` then work as on nightly,
#   debug assertions on (the first build takes about 3 minutes on 2 cores).
#   The sanitizer is FUZZ_SANITIZER, default none: the fuzzed code (the
#   popbridge library) has no `unsafe`, and AddressSanitizer made
#   command_parser about 7 times slower here; FUZZ_SANITIZER=address works.
# - Fallback, used only if cargo-fuzz cannot be installed or cannot build:
#   a plain `cargo build --release --target <host>` of fuzz/ with RUSTFLAGS
#   for SanitizerCoverage (sancov-module, inline 8-bit counters, PC table,
#   trace-compares) and --cfg fuzzing, no ASan; the libFuzzer binary is then
#   run directly with -max_total_time. (--target keeps RUSTFLAGS off build
#   scripts and proc macros.) FUZZ_MODE=plain forces this path.
set -euo pipefail
cd "$(dirname "$0")/.."
# The braces make bash read the whole script before running it, so editing
# it during a run does not derail the run.
{

seconds="${FUZZ_SECONDS:-60}"
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then
    seconds="$1"
    shift
fi
if [ $# -gt 0 ]; then
    targets=("$@")
else
    targets=(command_parser message_encoder uidl_store imap_reader proxy_header)
fi
jobs="${FUZZ_JOBS:-1}"
sanitizer="${FUZZ_SANITIZER:-none}"
extra_args=(${FUZZ_ARGS:-})

export RUSTC_BOOTSTRAP=1
export PATH="$HOME/.cargo/bin:$PATH"
host=$(rustc -vV | sed -n 's/^host: //p')

mode="${FUZZ_MODE:-cargo-fuzz}" # FUZZ_MODE=plain forces the fallback
if [ "$mode" = cargo-fuzz ] && ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    if ! cargo install cargo-fuzz --locked; then
        echo "fuzz: cargo-fuzz could not be installed; falling back to a plain cargo build"
        mode=plain
    fi
fi

if [ "$mode" = cargo-fuzz ]; then
    echo "fuzz: building with cargo fuzz (RUSTC_BOOTSTRAP=1)"
    if ! cargo fuzz build --fuzz-dir fuzz -s "$sanitizer"; then
        echo "fuzz: cargo fuzz build failed; falling back to a plain cargo build"
        mode=plain
    fi
fi
if [ "$mode" = plain ]; then
    echo "fuzz: building with cargo build + SanitizerCoverage RUSTFLAGS"
    if ! RUSTFLAGS="--cfg fuzzing -Cdebug-assertions -Coverflow-checks \
            -Cpasses=sancov-module \
            -Cllvm-args=-sanitizer-coverage-level=4 \
            -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
            -Cllvm-args=-sanitizer-coverage-pc-table \
            -Cllvm-args=-sanitizer-coverage-trace-compares" \
        cargo build --manifest-path fuzz/Cargo.toml --release --target "$host" \
            --target-dir fuzz/target/plain; then
        echo "fuzz: the fuzz targets could not be built" >&2
        exit 2
    fi
fi

if [ "$mode" = cargo-fuzz ]; then
    bindir="fuzz/target/$host/release"
else
    bindir="fuzz/target/plain/$host/release"
fi

# Prints one crashing input: why it fails (re-run alone), its hex, and how
# to reproduce it.
show_crash() {
    local t="$1" unit="$2" size why
    size=$(wc -c <"$unit")
    why=$("$bindir/$t" "$unit" 2>&1 | grep -A1 -E "panicked at|ERROR: AddressSanitizer" \
        | grep -v -E "^--$" | head -2 | cut -c1-300 | tr '\n' ' ' || true)
    echo "fuzz:   $unit ($size bytes): ${why:-see log}"
    head -c 512 "$unit" | od -An -tx1 -v | tr -d ' \n' | fold -w 128 | sed 's/^/fuzz:     /' || true
    echo
    [ "$size" -le 512 ] || echo "fuzz:     (first 512 bytes; minimize: $bindir/$t -minimize_crash=1 -runs=20000 -exact_artifact_path=$unit.min $unit)"
    echo "fuzz:     reproduce: $bindir/$t $unit"
}

logs=$(mktemp -d /tmp/popbridge-fuzz.XXXXXX)
crashed=()
summary=()
for t in "${targets[@]}"; do
    corpus="fuzz/corpus/$t"
    artifacts="fuzz/artifacts/$t"
    mkdir -p "$corpus" "$artifacts"
    seeds=()
    [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
    log="$logs/$t.log"
    stamp="$logs/$t.start"
    touch "$stamp"
    sleep 1 # so that -newer sees files written in the run's first second
    args=(-max_total_time="$seconds" -print_final_stats=1 "${extra_args[@]}")
    # With FUZZ_JOBS > 1, libFuzzer's fork mode; add -ignore_crashes=1 to
    # FUZZ_ARGS to go on fuzzing after a crash (each one is still saved).
    [ "$jobs" -gt 1 ] && args+=(-fork="$jobs")
    echo "fuzz: running $t for ${seconds}s (log: $log)"
    rc=0
    if [ "$mode" = cargo-fuzz ]; then
        cargo fuzz run --fuzz-dir fuzz -s "$sanitizer" "$t" "$corpus" "${seeds[@]}" -- \
            "${args[@]}" >"$log" 2>&1 || rc=$?
    else
        "$bindir/$t" -artifact_prefix="$artifacts/" \
            "${args[@]}" "$corpus" "${seeds[@]}" >"$log" 2>&1 || rc=$?
    fi
    # "Done N runs" on a clean finish; the last status line otherwise
    # (fork mode prints "#N: cov: ...").
    execs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -1)
    [ -n "$execs" ] || execs=$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#' || true)
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1 || true)
    units=()
    while IFS= read -r f; do units+=("$f"); done < <(find "$artifacts" -type f \
        \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) \
        -newer "$stamp" | sort)
    if [ "$rc" -ne 0 ] || [ ${#units[@]} -gt 0 ]; then
        crashed+=("$t")
        line="$t: CRASH: ${#units[@]} failing input(s) in ${execs:-?} executions, ${cov:-no coverage line} (exit $rc)"
        echo "fuzz: $line"
        if [ ${#units[@]} -eq 0 ]; then
            tail -20 "$log" | sed 's/^/fuzz:   /'
        fi
        # The first few, smallest first.
        for u in $(ls -S -r "${units[@]}" 2>/dev/null | head -5 || true); do
            show_crash "$t" "$u"
        done
    else
        line="$t: no crash, ${execs:-?} executions in ${seconds}s, ${cov:-no coverage line}, corpus $(ls "$corpus" | wc -l) inputs"
        echo "fuzz: $line"
    fi
    summary+=("$line")
done

echo "fuzz: summary ($mode)"
printf 'fuzz:   %s\n' "${summary[@]}"
if [ ${#crashed[@]} -gt 0 ]; then
    echo "fuzz: crashes in: ${crashed[*]}" >&2
    exit 1
fi
exit 0
}
