#!/usr/bin/env bash
# Builds every cargo-fuzz target on stable Rust and runs each for a bounded time, from the
# committed seeds; any crash, oracle failure, timeout or over-large allocation fails.
#
#   bash scripts/fuzz/ci.sh                      # every target, FUZZ_SECONDS each
#   FUZZ_SECONDS=60 bash scripts/fuzz/ci.sh route permute
#
# Environment:
#   FUZZ_SECONDS      seconds per target (default 15)
#   FUZZ_TARGET_DIR   cargo target dir of the fuzz build (default: a cache outside the
#                     checkout, so a second CI run on the same machine rebuilds only
#                     this crate; `fuzz/target` when that cannot be created)
#   FUZZ_STATS        file to append "target runs seconds" lines to (optional)
# Findings land in fuzz/artifacts/<target>/ (git-ignored); see fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

CARGO_FUZZ_VERSION=0.13.2
seconds=${FUZZ_SECONDS:-15}

if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

target_dir=${FUZZ_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dots-moe/fuzz-target}
mkdir -p "$target_dir" 2>/dev/null || target_dir=fuzz/target

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

# Stable Rust: `-s none` (no sanitizer) needs no nightly flag. The build is release
# mode with debug assertions and overflow checks, as cargo-fuzz does by default.
echo "fuzz: building ${#targets[@]} targets (target dir $target_dir)"
start=$(date +%s)
cargo fuzz build -s none --target-dir "$target_dir"
echo "fuzz: built in $(($(date +%s) - start)) s"

work=$(mktemp -d)
trap 'rm -rf "$work" "${TMPDIR:-/tmp}"/dots-moe-fuzz-checkpoint-*' EXIT

failed=()
for t in "${targets[@]}"; do
    # New inputs go to a scratch corpus (first directory); the committed seeds
    # (fuzz/corpus/$t) are read, never written.
    mkdir -p "$work/$t" "fuzz/corpus/$t" "fuzz/artifacts/$t"
    log="$work/$t.log"
    # The outer `timeout`: without a sanitizer runtime, libFuzzer's own per-input timeout
    # handler allocates in a signal handler and can deadlock; a hang must still end (124).
    set +e
    timeout --kill-after=10 $((seconds + 120)) \
        cargo fuzz run -s none --target-dir "$target_dir" "$t" "$work/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -max_len=16384 \
        -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    echo "fuzz: $t: ${runs:-?} runs in $seconds s, exit $rc"
    if [ -n "${FUZZ_STATS:-}" ]; then
        echo "$t ${runs:-0} $seconds $rc" >>"$FUZZ_STATS"
    fi
    if [ $rc -ne 0 ]; then
        failed+=("$t")
        tail -60 "$log"
    fi
done

if [ ${#failed[@]} -ne 0 ]; then
    echo "fuzz: FAILED: ${failed[*]} (inputs in fuzz/artifacts/)"
    exit 1
fi
echo "fuzz: all ${#targets[@]} targets ran clean"
