#!/usr/bin/env bash
# The GPU suite, on the GPU host (no Rust toolchain needed): bash gpu-bin/run.sh
#
# Runs, from the binaries scripts/gpu/build.sh put next to this script:
#   nvidia-smi (card, driver, compute capability), dots-moe doctor, every GPU test binary
#   with the GPU and NVRTC required (a missing GPU fails instead of skipping), the kernels'
#   resource report for the device, and the kernel timings; then prints the results table
#   last. Every output is kept in gpu-bin/results/. Exits non-zero if anything failed.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
results="$here/results"
rm -rf "$results"
mkdir -p "$results"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export DOTS_MOE_REQUIRE_GPU=1 DOTS_MOE_REQUIRE_NVRTC=1
export RUST_BACKTRACE=1

nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv | tee "$results/nvidia-smi.csv"
"$here/dots-moe" doctor 2>&1 | tee "$results/doctor.txt"

rows=()
failed=0
for test in "$here"/tests/*; do
    name=$(basename "$test")
    start=$(date +%s)
    if timeout 900 "$test" > "$results/$name.log" 2>&1; then status=ok; else status=FAILED; failed=1; fi
    secs=$(( $(date +%s) - start ))
    summary=$(grep -E '^test result:' "$results/$name.log" | tail -1 | sed 's/^test result: //; s/; finished.*//')
    skipped=$(grep -c 'skipped' "$results/$name.log" || true)
    rows+=("$(printf '%-22s %-7s %5ss  skips:%-3s %s' "$name" "$status" "$secs" "$skipped" "${summary:-no summary, see $name.log}")")
    echo "${rows[-1]}"
done

"$here/dots-moe" kernels > "$results/kernels.txt" 2>&1 || failed=1
if ! "$here/dots-moe" kernels --time --tokens 1,16,256,4096 --iterations 200 > "$results/timing.txt" 2>&1; then
    failed=1
fi
# The whole MoE layer at real dots.llm1 shapes, graph-replayed, beside the H200 floor.
if ! "$here/dots-moe" bench --backend cuda --tokens 1,16,64,256,1024,4096,16384 --json > "$results/layer.json" 2> "$results/layer.err"; then
    failed=1
fi

echo
echo "==================== dots-moe GPU results ($(date -u +%Y-%m-%dT%H:%MZ)) ===================="
cat "$results/nvidia-smi.csv"
echo "--- tests (logs in $results)"
printf '%s\n' "${rows[@]}"
echo "--- kernels (ptxas, device arch)"
grep -E '^(NVRTC|moe_)' "$results/kernels.txt" | awk '{ if ($1 == "NVRTC") print; else printf "%-28s %3s regs  spills %s/%s B\n", $1, $2, $5, $6 }'
echo "--- timings"
if grep -q '^MoE kernels on' "$results/timing.txt"; then
    sed -n '/^MoE kernels on/,$p' "$results/timing.txt"
else
    cat "$results/timing.txt"
fi
echo "--- whole layer (dots-moe bench --backend cuda; floor = 4.3 TB/s, 790 TFLOP/s)"
python3 - "$results/layer.json" <<'PY' || cat "$results/layer.err"
import json, sys
for r in json.load(open(sys.argv[1])):
    print(f"{r['tokens']:>6} tokens  {r['median_us']:>10.1f} us  {r['gb_per_s']:>8.1f} GB/s  "
          f"{r['tflop_per_s']:>7.1f} TFLOP/s  floor {r['floor_us']:>9.1f} us  floor/time {r['floor_ratio']:.2f}")
PY
[ "$failed" = 0 ] && echo "ALL OK" || echo "SOMETHING FAILED (see above and $results)"
exit "$failed"
