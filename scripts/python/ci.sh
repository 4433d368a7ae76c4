#!/usr/bin/env bash
# The Python package in CI: a venv (.venv-py) with the pinned torch, transformers, maturin
# and pytest, installed from a wheel cache outside the checkout (downloaded once: torch's
# wheels are some GB); then the package built by maturin through pip, then pytest. Any
# failure, a skipped test (python/tests/conftest.py) or no test at all (pytest's exit
# code 5) fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
wheels="${DOTS_MOE_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/dots-moe/wheels}"
mkdir -p "$wheels"
if [ ! -x .venv-py/bin/python ]; then
    python3 -m venv .venv-py
fi
export PATH="$PWD/.venv-py/bin:$PATH" # maturin, for the build without isolation
pip=(.venv-py/bin/pip --disable-pip-version-check)
# Fetches only what the cache lacks, then installs from the cache alone.
"${pip[@]}" download --quiet -r python/requirements-ci.txt -d "$wheels"
"${pip[@]}" install --quiet --no-index --find-links "$wheels" -r python/requirements-ci.txt
"${pip[@]}" install --quiet --no-build-isolation --no-deps --force-reinstall ./python
.venv-py/bin/python -m pytest python/tests -q -p no:cacheprovider
