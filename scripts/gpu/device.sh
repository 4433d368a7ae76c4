#!/usr/bin/env bash
# The one command to run on the GPU host, from the repository root, after
# scripts/gpu/build.sh here (the device tool: command `bash scripts/gpu/device.sh`,
# carry ["gpu-bin"], timeout_s about 480). No Rust toolchain is needed there.
#
# What it does, each step under its own timeout and the whole within DEVICE_BUDGET_S
# (default 400 s, under the 7 minutes one lease command may take with its start):
#   1. env.txt: the card (nvidia-smi: name, driver, compute capability, clocks), glibc, where
#      libcuda and libnvrtc are found (/usr/local/cuda first, then python3's nvidia/cu13/lib),
#      `dots-moe doctor` (kernels from the cubin cache, occupancy per kernel);
#   2. every GPU test binary, one test thread, --nocapture, the GPU required (the suites of
#      both expert kernel generations once per generation, the second last);
#   3. timings: `bench --backend cuda --gemm --kernels gen1,gen2,direct` (the layer and GEMM 1/2 apart,
#      beside the floor, both generations of the Hopper expert kernels side by side)
#      into layer.json, the same with programmatic dependent launch at T = 1, 16, 256 into
#      layer-pdl.json, `kernels --time` into kernels.txt, the PyTorch peer into peer.txt.
# Files written into $OUT (or ./gpu-results without it), at most 8:
#   summary.txt  one line per step: status, seconds, result (also printed last)
#   env.txt  layer.json  layer-pdl.json  kernels.txt  peer.txt  logs.tar.gz (every step's full log)
# Exits 0 only if every step passed. Without a GPU it stops after the probe, says so in
# summary.txt, and exits 1. DOTS_MOE_GPU_BIN names another binaries folder (the dry-run
# check uses it to run the script's logic on stand-in binaries).
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
out="${OUT:-$root/gpu-results}"
mkdir -p "$out"
budget="${DEVICE_BUDGET_S:-400}"
started=$(date +%s)
logs="$(mktemp -d)"
summary="$out/summary.txt"
: > "$summary"
failed=0

now() { date +%s; }
elapsed() { echo $(( $(now) - started )); }
line() { printf '%-28s %-8s %5ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$summary"; }

# finish: pack the logs, print the failing steps' tails and the summary last, and exit.
finish() {
    tar -C "$logs" -czf "$out/logs.tar.gz" . 2>/dev/null
    rm -rf "$logs"
    echo
    echo "==================== dots-moe device run: $(date -u +%Y-%m-%dT%H:%MZ), $(elapsed) s ===================="
    [ -f "$out/env.txt" ] && grep -E '^(gpu|driver|glibc|libcuda|libnvrtc|cubin)' "$out/env.txt"
    for json in layer layer-pdl; do
        [ -s "$out/$json.json" ] || continue
        echo "--- $json.json (bench --backend cuda; floor: 4.3 TB/s, 790 TFLOP/s)"
        python3 - "$out/$json.json" <<'PY' 2>/dev/null || true
import json, sys
for r in json.load(open(sys.argv[1])):
    print(f"{r['backend']:<20} T {r['tokens']:>6}  {r['median_us']:>10.1f} us  {r['gb_per_s']:>8.1f} GB/s  "
          f"{r['tflop_per_s']:>7.1f} TFLOP/s  floor {r['floor_us']:>9.1f} us  floor/time {r['floor_ratio']:.2f}")
PY
    done
    echo "--- summary ($out: $(ls "$out" | wc -l) files)"
    cat "$summary"
    exit "$1"
}

# step NAME CAP_SECONDS DEADLINE COMMAND...: runs COMMAND under
# timeout(min(CAP, DEADLINE - now - RESERVE)), its output in $logs/NAME.log; one summary
# line. RESERVE (seconds, default 0) is kept for the steps after it in the same phase, so
# that one hanging binary cannot take the others' time. STEP_OUTPUT names the file the
# command writes its result to (for the summary line when its log is empty).
step() {
    local name="$1" cap="$2" deadline="$3"
    shift 3
    local left=$(( deadline - $(now) - ${RESERVE:-0} ))
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt 5 ]; then
        line "$name" SKIPPED 0 "no time left in the ${budget} s budget"
        failed=1
        return 1
    fi
    local t0 rc
    t0=$(now)
    timeout --kill-after=5 "$limit" "$@" > "$logs/$name.log" 2>&1
    rc=$?
    local secs=$(( $(now) - t0 ))
    local result
    result=$(grep -E '^test result:' "$logs/$name.log" | tail -n 1 | sed 's/^test result: //; s/; finished.*//')
    [ -n "$result" ] || result=$(grep -v '^\s*$' "$logs/$name.log" | tail -n 1 | cut -c1-110)
    if [ -z "$result" ] && [ -n "${STEP_OUTPUT:-}" ]; then
        result="wrote $(basename "$STEP_OUTPUT") ($(wc -l < "$STEP_OUTPUT" 2>/dev/null || echo 0) lines)"
    fi
    if [ "$rc" -eq 0 ]; then
        line "$name" ok "$secs" "$result"
    else
        [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && result="timed out after ${limit} s; $result"
        line "$name" FAILED "$secs" "exit $rc: $result"
        failed=1
        # The failing tests' names and messages, where the output tail will show them.
        { grep -E '^(test .* FAILED|---- |thread .* panicked|error)' "$logs/$name.log" | head -n 12
          tail -n 6 "$logs/$name.log"; } | sed "s/^/    $name| /"
    fi
    return "$rc"
}

# ---- 1. the binaries and the environment
. "$root/scripts/gpu/host_env.sh"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -srm)"
    echo "glibc: $(getconf GNU_LIBC_VERSION 2>/dev/null) (the binaries need $(cat "${DOTS_MOE_GPU_BIN:-$root/gpu-bin}/GLIBC_REQUIRED" 2>/dev/null || echo '?'))"
    if command -v nvidia-smi > /dev/null; then
        echo "gpu: $(nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader 2>&1 | head -n 1)"
        echo "driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1 | head -n 1)"
        echo "clocks (sm, max sm, mem, max mem): $(nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem --format=csv,noheader 2>&1 | head -n 1)"
        echo "power, temperature: $(nvidia-smi --query-gpu=power.draw,power.limit,temperature.gpu --format=csv,noheader 2>&1 | head -n 1)"
    else
        echo "gpu: none (no nvidia-smi)"
    fi
} > "$out/env.txt"

# Where host_env.sh found libcuda and libnvrtc.
echo "libcuda: ${libcuda:-not found by ldconfig}" >> "$out/env.txt"
if [ -n "$nvrtc_dir" ]; then
    echo "libnvrtc: $nvrtc_dir/libnvrtc.so.13" >> "$out/env.txt"
else
    echo "libnvrtc: not found (the cubin cache must serve every kernel)" >> "$out/env.txt"
fi
echo "cubin cache: $(ls "$DOTS_MOE_KERNEL_CACHE"/*.cubin 2>/dev/null | wc -l) files in $DOTS_MOE_KERNEL_CACHE" >> "$out/env.txt"

if [ ! -x "$bin/dots-moe" ]; then
    line "binaries" FAILED 0 "no $bin/dots-moe: run scripts/gpu/build.sh first and carry gpu-bin"
    finish 1
fi
probe_deadline=$(( started + 60 ))
step doctor 45 "$probe_deadline" "$bin/dots-moe" doctor
{ echo; echo "--- dots-moe doctor"; cat "$logs/doctor.log"; } >> "$out/env.txt"
if ! grep -q '^device 0:' "$logs/doctor.log"; then
    reason=$(grep -E '^(GPU driver library|devices)' "$logs/doctor.log" | tr '\n' ' ')
    line "gpu" FAILED "$(elapsed)" "NO GPU FOUND: ${reason:-dots-moe doctor lists no device}"
    finish 1
fi

# ---- 2. the GPU tests: smallest first; the phase ends early enough for the timings. The
# suites that run both generations of the expert kernels (cuda_expert_gemm, cuda_layer) run
# once per generation (DOTS_MOE_TEST_KERNELS): a fault of the unproven second generation
# spoils the CUDA context of its process only, so the first generation's results stand.
tests_deadline=$(( started + budget * 55 / 100 ))
binaries=$(ls -S -r "$bin"/tests/)
both=$(for t in $binaries; do case "$t" in cuda_expert_gemm|cuda_layer) echo "$t";; esac; done)
remaining=$(( $(echo "$binaries" | wc -w) + $(echo "$both" | wc -w) ))
for t in $binaries; do
    remaining=$(( remaining - 1 ))
    name="test:$t" generation=all
    case " $(echo $both) " in *" $t "*) name="test:$t[gen1]" generation=gen1;; esac
    # Each run after this one keeps at least 15 s (the smallest binary first).
    DOTS_MOE_TEST_KERNELS=$generation RESERVE=$(( remaining * 15 )) step "$name" 150 "$tests_deadline" \
        "$bin/tests/$t" --test-threads=1 --nocapture
done
for t in $both; do
    remaining=$(( remaining - 1 ))
    DOTS_MOE_TEST_KERNELS=gen2 RESERVE=$(( remaining * 15 )) step "test:$t[gen2]" 150 "$tests_deadline" \
        "$bin/tests/$t" --test-threads=1 --nocapture
done

# ---- 3. the timings
deadline=$(( started + budget ))
STEP_OUTPUT="$out/layer.json" RESERVE=40 step bench 120 "$deadline" sh -c "'$bin/dots-moe' bench --backend cuda --gemm --kernels gen1,gen2,direct --json --seconds 1 \
    --tokens 1,16,64,256,1024,4096,16384 > '$out/layer.json'"
# The same layers with programmatic dependent launch (DOTS_MOE_PDL=1), at the batch sizes
# where launch latency counts.
STEP_OUTPUT="$out/layer-pdl.json" RESERVE=30 DOTS_MOE_PDL=1 step bench-pdl 45 "$deadline" sh -c "'$bin/dots-moe' bench --backend cuda \
    --kernels gen1,gen2,direct --json --seconds 1 --tokens 1,16,256 > '$out/layer-pdl.json'"
STEP_OUTPUT="$out/kernels.txt" RESERVE=20 step kernels-time 30 "$deadline" sh -c "'$bin/dots-moe' kernels --time --tokens 1,16,256,4096 --iterations 100 > '$out/kernels.txt'"
if [ -n "${DOTS_MOE_TORCH_PEER:-}" ] || python3 -c 'import torch; assert torch.cuda.is_available()' 2> /dev/null; then
    STEP_OUTPUT="$out/peer.txt" step torch-peer 50 "$deadline" sh -c "PYTHONUNBUFFERED=1 ${DOTS_MOE_TORCH_PEER:-python3 scripts/peer/torch_moe_gpu.py} \
        --tokens 1,16,64,256,1024,4096,16384 --reps 20 > '$out/peer.txt'"
else
    line torch-peer SKIPPED 0 "no python3 with a CUDA torch"
fi
finish "$failed"
