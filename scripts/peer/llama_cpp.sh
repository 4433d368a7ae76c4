#!/usr/bin/env bash
# dots-moe beside llama.cpp on the CPU, same checkpoint, same threads (reports/cpu/llama-cpp.md).
#
#   scripts/peer/llama_cpp.sh [CHECKPOINT_DIR] [ROUNDS]
#
# 1. The checkpoint: scripts/golden/synthetic_checkpoint.py --layers 3 --dense 1 (real
#    widths, about 12 GB of bf16), written if absent, with the real Qwen-family tokenizer of
#    tests/fixtures/model_tokenizer beside it.
# 2. llama.cpp from the PyPI sdist llama_cpp_python==0.3.36 (pip download --no-binary
#    llama_cpp_python --no-deps; its vendored tree), built native
#    for the CPU only: cmake -DGGML_NATIVE=ON -DLLAMA_CURL=OFF, target llama-bench.
# 3. The checkpoint converted to a bf16 GGUF by that tree's convert_hf_to_gguf.py. The
#    converter rejects `"scoring_func": "noaux_tc"` (the synthetic and the real dots.llm1
#    config both carry it: sigmoid scores, top-k chosen with the correction bias). It is
#    given a copy of the directory (the weights linked, not copied) whose config.json says
#    "sigmoid" instead: the same router for llama.cpp's dots1 graph, which always adds the
#    correction bias (exp_probs_b) when choosing. The copy also gets a tokenizer_config.json
#    naming PreTrainedTokenizerFast (transformers has no tokenizer class for Dots1Config).
# 4. ROUNDS rounds, alternating: llama-bench -t 2 -p 64,256 -n 32, then dots-moe generate on
#    64 and 256 random prompt tokens (32 new tokens for the 64-token prompt). Before and after
#    each program: the load average and this machine's bandwidth (dots-moe bench --floor-only).
#
# Everything lands in $WORK (default /tmp/dots-peer); the log is $WORK/results.txt.
# Environment: PYTHON (default .venv-golden/bin/python, made from
# scripts/golden/requirements.txt if absent), THREADS (2), PRECISION (bf16), WARM (0: the
# page cache is emptied before each program where permitted; 1: each program runs once
# unrecorded first instead).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
ckpt=${1:-/tmp/dots1-synthetic-3layer}
rounds=${2:-3}
work=${WORK:-/tmp/dots-peer}
threads=${THREADS:-2}
precision=${PRECISION:-bf16}
python=${PYTHON:-$root/.venv-golden/bin/python}
version=0.3.36
mkdir -p "$work"
log="$work/results.txt"

if [ ! -x "$python" ]; then
    python3 -m venv "$(dirname "$(dirname "$python")")"
    "$python" -m pip install --quiet -r scripts/golden/requirements.txt
fi

# 1. The checkpoint and its tokenizer.
if [ ! -f "$ckpt/config.json" ]; then
    "$python" scripts/golden/synthetic_checkpoint.py "$ckpt" --layers 3 --dense 1
fi
if [ ! -f "$ckpt/tokenizer.json" ]; then
    gzip -dc tests/fixtures/model_tokenizer/qwen_tokenizer.json.gz > "$ckpt/tokenizer.json"
fi

# 2. llama.cpp from the sdist.
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
bench="$src/build/bin/llama-bench"
if [ ! -x "$bench" ]; then
    if [ ! -f "$work/llama_cpp_python-$version.tar.gz" ]; then
        # Only this package from source: `--no-binary :all:` would also build its build-time
        # dependencies from source (cmake itself, for the metadata step: over 20 minutes here).
        "$python" -m pip download --quiet --no-binary llama_cpp_python --no-deps "llama_cpp_python==$version" -d "$work"
    fi
    tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
    cmake=$(command -v cmake || true)
    if [ -z "$cmake" ]; then
        "$python" -m pip install --quiet cmake
        cmake="$(dirname "$python")/cmake"
    fi
    "$cmake" -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
    "$cmake" --build "$src/build" --target llama-bench -j "$(nproc)"
fi

# 3. The bf16 GGUF, converted from a copy of the directory whose config says "sigmoid".
gguf="$work/$(basename "$ckpt")-bf16.gguf"
if [ ! -f "$gguf" ]; then
    shadow="$work/$(basename "$ckpt")-for-converter"
    rm -rf "$shadow"
    mkdir -p "$shadow"
    for f in "$ckpt"/*; do
        [ "$(basename "$f")" = config.json ] || ln -s "$f" "$shadow/"
    done
    "$python" - "$ckpt/config.json" "$shadow/config.json" <<'EOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
if cfg.get("scoring_func") == "noaux_tc":
    cfg["scoring_func"] = "sigmoid"
json.dump(cfg, open(sys.argv[2], "w"), indent=2)
EOF
    # transformers' AutoTokenizer knows no tokenizer class for Dots1Config: name one.
    if [ ! -e "$ckpt/tokenizer_config.json" ]; then
        echo '{"tokenizer_class": "PreTrainedTokenizerFast"}' > "$shadow/tokenizer_config.json"
    fi
    "$python" -m pip install --quiet "$src/gguf-py"
    "$python" "$src/convert_hf_to_gguf.py" "$shadow" --outtype bf16 --outfile "$gguf"
fi

# 4. The runs, alternating.
cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-target}/release/dots-moe
ids() { python3 -c "import random; random.seed($2); print(','.join(str(random.randrange(152064)) for _ in range($1)))"; }
p64=$(ids 64 1)
p256=$(ids 256 2)
state() {
    echo "[$1] $(date -u +%H:%M:%S) load average: $(cut -d' ' -f1-3 /proc/loadavg); $("$bin" bench --floor-only)"
}
# Each program starts with the page cache emptied where this user may (root): the two
# 12 GB files do not fit together in a 24 GB machine, and a program started while the
# kernel is still reclaiming the other's pages pays for it in its first pass (measured:
# dots-moe's 64-token prefill 0.71 s right after llama-bench, 0.48 s on its own).
# WARM=1 instead runs each program once unrecorded right before its recorded run (same
# arguments), with the page cache left as it is: both measured warm.
drop_caches() {
    sync
    if [ "${WARM:-0}" = 1 ]; then
        echo "[page cache kept before $1: WARM=1, an unrecorded warm-up run first]"
    elif [ -w /proc/sys/vm/drop_caches ]; then
        echo 3 > /proc/sys/vm/drop_caches && echo "[page cache dropped before $1]"
    else
        echo "[page cache NOT dropped before $1: /proc/sys/vm/drop_caches is not writable]"
    fi
}
{
    echo "# $(date -u) $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
    echo "# checkpoint $ckpt, gguf $gguf, threads $threads, dots-moe --precision $precision, $("$bin" doctor 2>/dev/null | grep '^CPU kernels' || echo 'CPU kernels: unknown')"
} >> "$log"
for round in $(seq "$rounds"); do
    {
        echo "## round $round"
        drop_caches llama.cpp
        state "before llama.cpp"
        if [ "${WARM:-0}" = 1 ]; then
            "$bench" -m "$gguf" -t "$threads" -p 64,256 -n 32 -r 1 -o md >/dev/null 2>&1
        fi
        "$bench" -m "$gguf" -t "$threads" -p 64,256 -n 32 -r 3 -o md 2>/dev/null
        state "after llama.cpp"
        for prompt in p64 p256; do
            new=1
            [ "$prompt" = p64 ] && new=32
            drop_caches "dots-moe $prompt"
            if [ "${WARM:-0}" = 1 ]; then
                RAYON_NUM_THREADS=$threads "$bin" generate --model "$ckpt" --tokens "${!prompt}" \
                    --max-new-tokens "$new" --precision "$precision" >/dev/null 2>&1
            fi
            state "before dots-moe $prompt"
            RAYON_NUM_THREADS=$threads /usr/bin/time -v "$bin" generate --model "$ckpt" --tokens "${!prompt}" \
                --max-new-tokens "$new" --precision "$precision" 2>&1 >/dev/null \
                | grep -E "^prefill|Maximum resident" | sed "s/^/dots-moe $prompt: /"
            state "after dots-moe $prompt"
        done
    } 2>&1 | tee -a "$log"
done
