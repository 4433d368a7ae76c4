#!/usr/bin/env bash
# Builds the CPU emulator of the dots-moe kernels (a logic check without a GPU) into
# gpu-bin/emu, and prints the path. Then: DOTS_MOE_EMULATOR=gpu-bin/emu cargo test --test cuda_emulated
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
out="$root/gpu-bin"
mkdir -p "$out"
{
    echo '#include "cuda_shim.h"'
    for f in common route permute combine; do
        echo "#line 1 \"$f.cu\""
        sed 's/extern __shared__ __align__(16) unsigned char smem\[\];/unsigned char* smem = emu::dynamic_smem;/' "$root/cuda/$f.cu"
    done
} > "$out/kernels_emu.inc"
g++ -std=c++20 -O1 -g -pthread -fno-strict-aliasing -ffp-contract=off -fsanitize=address \
    -I "$here" -I "$out" "$here/emu.cpp" -o "$out/emu"
echo "$out/emu"
