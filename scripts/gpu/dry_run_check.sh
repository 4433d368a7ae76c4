#!/usr/bin/env bash
# Checks scripts/gpu/device.sh on a machine without a GPU (CI):
# 1. after scripts/gpu/build.sh, `OUT=<empty folder> bash scripts/gpu/device.sh` must end
#    within 90 s, exit non-zero, leave a summary.txt that says plainly that no GPU was found,
#    and at most 8 files, at most 2 folders deep (what the GPU host returns);
# 2. on stand-in binaries that claim a GPU (a passing, a failing and a hanging test binary,
#    a suite run once per kernel generation, a bench that prints JSON), with a 120 s
#    budget: every step gets a summary line, the hanging one is cut by its timeout, the
#    suite runs twice and each run is told its generation, the whole run stays within the
#    budget, the failure's message reaches the output, and still at most 8 files come back.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$(mktemp -d)
t0=$(date +%s)
set +e
OUT="$out" timeout 120 bash scripts/gpu/device.sh > "$out.log" 2>&1
rc=$?
set -e
secs=$(( $(date +%s) - t0 ))
fail() { echo "device.sh dry run: $*" >&2; cat "$out.log" >&2; exit 1; }
[ "$rc" -ne 0 ] || fail "exited 0 without a GPU"
[ "$rc" -ne 124 ] || fail "did not finish within 120 s"
[ "$secs" -lt 90 ] || fail "took ${secs} s (limit 90 s)"
[ -f "$out/summary.txt" ] || fail "no summary.txt"
grep -q 'NO GPU FOUND' "$out/summary.txt" || fail "summary.txt does not say that no GPU was found"
files=$(find "$out" -type f | wc -l)
[ "$files" -le 8 ] || fail "$files files in \$OUT (at most 8 come back)"
deep=$(find "$out" -mindepth 3 -type f | wc -l)
[ "$deep" -eq 0 ] || fail "$deep files deeper than 2 folders"
tail -n 1 "$out.log" | grep -q . || fail "printed nothing"
grep -q -- '--- summary' "$out.log" || fail "the summary is not printed last"
echo "device.sh dry run: exit $rc after ${secs} s, $files files: $(tail -n 1 "$out/summary.txt")"
rm -rf "$out" "$out.log"

# 2. The script's logic on stand-ins.
fake=$(mktemp -d)
out=$(mktemp -d)
mkdir -p "$fake/tests" "$fake/kernel-cache"
cat > "$fake/dots-moe" <<'SH'
#!/usr/bin/env bash
case "$1" in
    doctor) echo "device 0: Stand-in GPU, compute capability 9.0 (target sm_90a)";;
    bench) echo '[{"backend": "cuda", "tokens": 1, "median_us": 70.0, "gb_per_s": 4000.0, "tflop_per_s": 0.1, "floor_us": 65.0, "floor_ratio": 0.93}]';;
    kernels) echo "route 1 2.0 us";;
esac
SH
printf '#!/usr/bin/env bash
echo "test a ... ok"
echo "test result: ok. 3 passed; 0 failed; 0 ignored"
' > "$fake/tests/a_pass"
printf '#!/usr/bin/env bash
echo "test b ... FAILED"
echo "thread b panicked at planted failure"
echo "test result: FAILED. 0 passed; 1 failed"
exit 101
' > "$fake/tests/b_fail"
printf '#!/usr/bin/env bash
exec sleep 1000
' > "$fake/tests/c_hang"
# A suite of both kernel generations: run once per generation, told which by the script.
printf '#!/usr/bin/env bash
echo "test layer ... ok"
echo "test result: ok. 2 passed; 0 failed; 0 ignored; generation $DOTS_MOE_TEST_KERNELS"
' > "$fake/tests/cuda_layer"
chmod +x "$fake/dots-moe" "$fake"/tests/*
t0=$(date +%s)
set +e
OUT="$out" DOTS_MOE_GPU_BIN="$fake" DEVICE_BUDGET_S=120 DOTS_MOE_TORCH_PEER="echo peer" \
    timeout 150 bash scripts/gpu/device.sh > "$out.log" 2>&1
rc=$?
set -e
secs=$(( $(date +%s) - t0 ))
[ "$rc" -eq 1 ] || fail "stand-ins: exit $rc, expected 1 (one test fails)"
[ "$secs" -le 130 ] || fail "stand-ins: took ${secs} s with a 120 s budget"
for name in doctor test:a_pass test:b_fail test:c_hang 'test:cuda_layer\[gen1\]' 'test:cuda_layer\[gen2\]' \
    bench bench-pdl kernels-time torch-peer; do
    grep -q "^$name " "$out/summary.txt" || fail "stand-ins: no summary line for $name"
done
grep -q '^test:cuda_layer\[gen1\] .*generation gen1' "$out/summary.txt" || fail "stand-ins: gen1 run not told its generation"
grep -q '^test:cuda_layer\[gen2\] .*generation gen2' "$out/summary.txt" || fail "stand-ins: gen2 run not told its generation"
grep -q '^test:a_pass .* ok .*3 passed' "$out/summary.txt" || fail "stand-ins: the passing binary's result is missing"
grep -q '^test:c_hang .*timed out' "$out/summary.txt" || fail "stand-ins: the hanging binary was not timed out"
grep -q 'planted failure' "$out.log" || fail "stand-ins: the failing test's message is not in the output"
[ -s "$out/layer.json" ] || fail "stand-ins: no layer.json"
grep -q 'floor/time 0.93' "$out.log" || fail "stand-ins: the layer table is not printed"
[ "$(tail -n 1 "$out.log" | cut -c1-12)" = "$(tail -n 1 "$out/summary.txt" | cut -c1-12)" ] ||
    fail "stand-ins: the summary is not printed last"
files=$(find "$out" -type f | wc -l)
[ "$files" -le 8 ] || fail "stand-ins: $files files in \$OUT"
echo "device.sh on stand-ins: exit $rc after ${secs} s (budget 120 s), $files files, every step summarised"
rm -rf "$fake" "$out" "$out.log"
