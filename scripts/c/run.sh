#!/usr/bin/env bash
# Builds the C ABI (static and shared library), compiles the C examples against the
# generated header with `cc`, and runs them: examples/c/moe.c (checked against its own
# computation, linked statically) and examples/c/bad_input.c (error codes, linked to the
# shared library). Any failure exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p dots-moe-capi
lib="${CARGO_TARGET_DIR:-target}/release"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
flags=(-std=c11 -O2 -Wall -Wextra -Werror -Iinclude)
cc "${flags[@]}" examples/c/moe.c "$lib/libdots_moe_c.a" -lpthread -ldl -lm -o "$out/moe"
cc "${flags[@]}" examples/c/bad_input.c -L"$lib" -ldots_moe_c -Wl,-rpath,"$(cd "$lib" && pwd)" -lm -o "$out/bad_input"
"$out/moe"
"$out/bad_input"
