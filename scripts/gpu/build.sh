#!/usr/bin/env bash
# Builds what the GPU host runs into gpu-bin/ (git-ignored), here, on a machine with a Rust
# toolchain and NVRTC (no GPU needed):
#   gpu-bin/tests/<name>      the GPU test binaries only (tests/cuda_*.rs, tests/backend_*.rs,
#                             without the CPU-only *_static and *_emulated suites)
#   gpu-bin/dots-moe          the CLI: doctor, kernels --time, bench --backend cuda
#   gpu-bin/kernel-cache/     every kernel file compiled for sm_90a by NVRTC, keyed by NVRTC
#                             version, program text, arch and options (DOTS_MOE_KERNEL_CACHE):
#                             the binaries load these cubins and compile nothing there
#   gpu-bin/GLIBC_REQUIRED    the newest glibc symbol version the binaries need
# Then checks that the folder stays under the GPU host's limit (56 MiB; it travels with
# `carry: ["gpu-bin"]`), packing the binaries into gpu-bin/bundle.tar.xz when stripping
# alone is not enough (scripts/gpu/device.sh unpacks it there).
#
# On the GPU host, from the repository root: bash scripts/gpu/device.sh
#
# Needs NVRTC on the library path for the cache (as .ci/run sets it up):
#   python3 -m venv .venv-cuda && .venv-cuda/bin/pip install nvidia-cuda-nvrtc==13.0.88
# (found there automatically when LD_LIBRARY_PATH does not have it).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=gpu-bin
limit_mib=56
rm -rf "$out"
mkdir -p "$out/tests" "$out/kernel-cache"

if [ -d .venv-cuda ]; then
    site=$(.venv-cuda/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    export LD_LIBRARY_PATH="$site/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

# The GPU suites: every CUDA/backend test file except those that never touch a device.
tests=$(ls tests/cuda_*.rs tests/backend_*.rs | xargs -n1 basename | sed 's/\.rs$//' |
    grep -v -E '_(static|emulated)$')
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
'
cargo build --release --bin dots-moe
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
cp "$target_dir/release/dots-moe" "$out/dots-moe"
for t in $tests; do
    [ -x "$out/tests/$t" ] || { echo "build.sh: missing test binary $t" >&2; exit 1; }
done
echo "GPU test binaries: $(echo $tests | tr '\n' ' ')"

# Symbols stay (readable backtraces); debug info goes.
strip --strip-debug "$out"/tests/* "$out/dots-moe"

# The cubin cache for the H200 (sm_90a): `kernels` compiles every kernel file for the arch.
DOTS_MOE_KERNEL_CACHE="$PWD/$out/kernel-cache" "$out/dots-moe" kernels --arch sm_90a > "$out/kernel-cache/kernels.txt"
cubins=$(ls "$out"/kernel-cache/*.cubin 2>/dev/null | wc -l)
[ "$cubins" -gt 0 ] || { echo "build.sh: no cubin was cached (is NVRTC on the library path?)" >&2; exit 1; }
echo "cubin cache: $cubins kernel files for sm_90a ($(head -n 1 "$out/kernel-cache/kernels.txt"))"

# The glibc the binaries need: the GPU host must have this version or newer.
glibc=$(for f in "$out"/tests/* "$out/dots-moe"; do objdump -T "$f"; done |
    grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -t. -k1,1n -k2,2n -k3,3n | uniq | tail -n 1)
echo "$glibc" > "$out/GLIBC_REQUIRED"
echo "glibc needed: $glibc or newer (this machine: $(getconf GNU_LIBC_VERSION))"

size_kib() { du -sk "$1" | cut -f1; }
if [ "$(size_kib "$out")" -gt $((limit_mib * 1024)) ]; then
    # Too big to travel as it is: pack the binaries (xz shrinks them about 4x).
    tar -C "$out" -cJf "$out/bundle.tar.xz" tests dots-moe
    rm -rf "$out/tests" "$out/dots-moe"
    echo "packed the binaries into $out/bundle.tar.xz"
fi
size=$(size_kib "$out")
if [ "$size" -gt $((limit_mib * 1024)) ]; then
    echo "build.sh: $out is $((size / 1024)) MiB, over the GPU host's ${limit_mib} MiB" >&2
    exit 1
fi
echo "$out: $((size / 1024)) MiB (limit ${limit_mib} MiB)"
echo "on the GPU host: bash scripts/gpu/device.sh   (carry: gpu-bin)"
