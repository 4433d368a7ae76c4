#!/usr/bin/env bash
# Builds everything the GPU host runs into gpu-bin/ (git-ignored), on a build machine with
# a Rust toolchain (no GPU needed):
#   gpu-bin/tests/<name>   the GPU test binaries (tests/cuda_*.rs and tests/backend_*.rs)
#   gpu-bin/dots-moe       the CLI: `doctor`, `kernels` and the timings (`kernels --time`)
#   gpu-bin/run.sh         the one command to run there: bash gpu-bin/run.sh
# Kernel sources are embedded in the binaries (include_str!); nothing reads this checkout.
# Copy the whole repository (or just gpu-bin/) to the GPU host.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=gpu-bin
rm -rf "$out/tests" "$out/results"
mkdir -p "$out/tests"

tests=$(ls tests/cuda_*.rs tests/backend_*.rs | xargs -n1 basename | sed 's/\.rs$//' | grep -v '^cuda_emulated$')
args=()
for t in $tests; do args+=(--test "$t"); done

# The test executables, found through cargo's JSON messages (their file names carry hashes).
cargo test --release --no-run "${args[@]}" --message-format=json 2>/dev/null |
    python3 -c '
import json, shutil, sys
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["target"]["kind"] == ["test"]:
        shutil.copy2(msg["executable"], "gpu-bin/tests/" + msg["target"]["name"])
        print("test binary:", msg["target"]["name"])
'
cargo build --release --bin dots-moe
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
cp "$target_dir/release/dots-moe" "$out/dots-moe"
cp scripts/gpu/run.sh "$out/run.sh"
chmod +x "$out/run.sh"
for t in $tests; do
    [ -x "$out/tests/$t" ] || { echo "missing test binary $t" >&2; exit 1; }
done
# Debug info off (symbols stay, for backtraces): the folder must travel to the GPU host.
strip --strip-debug "$out"/tests/* "$out/dots-moe"
du -sh "$out"
echo "on the GPU host: bash $out/run.sh"
