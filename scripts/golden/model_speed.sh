#!/usr/bin/env bash
# Measures the CPU model on a synthetic checkpoint of real width (reports/model.md):
# prefill and decode tokens/s and peak memory of `dots-moe generate`, RUNS times.
#   [PRECISION=bf16|f32] scripts/golden/model_speed.sh [CHECKPOINT_DIR] [RUNS]
# The checkpoint (about 12 GB: 1 dense + 2 MoE layers) is written first if absent; that
# needs numpy (the .venv-golden of requirements.txt has it).
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-/tmp/dots1-synthetic-3layer}
runs=${2:-3}
python=${PYTHON:-.venv-golden/bin/python}
if [ ! -f "$dir/config.json" ]; then
    "$python" scripts/golden/synthetic_checkpoint.py "$dir" --layers 3 --dense 1
fi
cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-target}/release/dots-moe
prompt=$(python3 -c "import random; random.seed(1); print(','.join(str(random.randrange(152064)) for _ in range(128)))")
for i in $(seq "$runs"); do
    /usr/bin/time -v "$bin" generate --model "$dir" --tokens "$prompt" --max-new-tokens 64 \
        --precision "${PRECISION:-bf16}" 2>&1 >/dev/null \
        | grep -E "^loaded|^prefill|Maximum resident" | sed "s/^/run $i: /"
done
