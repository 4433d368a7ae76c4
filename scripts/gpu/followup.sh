#!/usr/bin/env bash
# The one follow-up on the GPU host after scripts/gpu/device.sh, while the machine is still
# warm (the device tool keeps it about 30 s): from the repository root, carry ["gpu-bin"],
# a timeout_s of about 120. Writes into $OUT (or ./gpu-results without it) and prints the
# report's tail last.
#
#   bash scripts/gpu/followup.sh sanitize BINARY [FILTER] [TOOL] [GENERATION]
#       compute-sanitizer --tool TOOL (memcheck by default; racecheck, synccheck, initcheck)
#       on gpu-bin/tests/BINARY with one test thread, only the tests matching FILTER, and
#       DOTS_MOE_TEST_KERNELS=GENERATION (gen1, gen2 or all, as device.sh ran it)
#       -> sanitize.txt
#   bash scripts/gpu/followup.sh ncu KERNELS [TOKENS] [SET]
#       ncu --clock-control none on the kernels whose names match the regex KERNELS, one
#       launch each, in `dots-moe bench --backend cuda --kernels SET` (gen2 by default) at
#       TOKENS tokens (4096 by default): speed of light, memory workload, occupancy
#       -> ncu.txt
# Each run is bounded (FOLLOWUP_TIMEOUT_S, default 100 s), so the report comes back.
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
out="${OUT:-$root/gpu-results}"
mkdir -p "$out"
limit="${FOLLOWUP_TIMEOUT_S:-100}"
. "$root/scripts/gpu/host_env.sh"

usage() { sed -n '2,20p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
case "$1" in
    sanitize)
        binary="$2" filter="${3:-}" tool="${4:-memcheck}" generation="${5:-all}"
        report="$out/sanitize.txt"
        [ -x "$bin/tests/$binary" ] || { echo "no test binary $bin/tests/$binary" | tee "$report"; exit 1; }
        {
            echo "compute-sanitizer --tool $tool $binary ${filter:-(all tests)} (DOTS_MOE_TEST_KERNELS=$generation)"
            DOTS_MOE_TEST_KERNELS="$generation" timeout --kill-after=5 "$limit" compute-sanitizer --tool "$tool" \
                --print-limit 20 --error-exitcode 99 "$bin/tests/$binary" --test-threads=1 --nocapture $filter 2>&1
            echo "exit $?"
        } > "$report"
        ;;
    ncu)
        kernels="$2" tokens="${3:-4096}" set="${4:-gen2}"
        report="$out/ncu.txt"
        {
            echo "ncu --clock-control none -k regex:$kernels, bench --kernels $set --tokens $tokens"
            timeout --kill-after=5 "$limit" ncu --clock-control none --kernel-name "regex:$kernels" --launch-count 1 \
                --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
                "$bin/dots-moe" bench --backend cuda --kernels "$set" --tokens "$tokens" --seconds 0.1 2>&1
            echo "exit $?"
        } > "$report"
        ;;
    *) usage ;;
esac
tail -c 11000 "$report"
