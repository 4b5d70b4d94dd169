#!/usr/bin/env bash
# Builds the pinned environment that benchmarks/peers/kvpress/run.py runs in: NVIDIA kvpress with
# the transformers it supports (>=4.56,<5.3), apart from the project's .venv (transformers 5.23).
# Idempotent: a stamp file newer than requirements.txt means the environment is ready.
#   benchmarks/peers/kvpress/setup.sh                 # CPU torch
#   TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128" benchmarks/peers/kvpress/setup.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${KVPRESS_VENV:-$HERE/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_INDEX="${TORCH_INDEX:-}"
STAMP="$VENV/.kvpress-installed"
REQUIREMENTS="$HERE/requirements.txt"

if [[ -f "$STAMP" && "$STAMP" -nt "$REQUIREMENTS" ]]; then
    echo "kvpress environment ready: $VENV"
    exit 0
fi

start=$(date +%s)
echo "creating virtual environment $VENV (with $PYTHON)"
"$PYTHON" -m venv "$VENV"
# torch first and pinned, so that no other requirement pulls a different (CUDA) build.
torch_pin="$(grep -E '^torch==' "$REQUIREMENTS")"
echo "installing $torch_pin ${TORCH_INDEX}"
"$VENV/bin/python" -m pip install -q "$torch_pin" $TORCH_INDEX
echo "installing kvpress and its pinned dependencies from $REQUIREMENTS"
"$VENV/bin/python" -m pip install -q -r "$REQUIREMENTS"
"$VENV/bin/python" -c 'import kvpress, transformers, torch; print("kvpress environment: transformers", transformers.__version__, "torch", torch.__version__)'
touch "$STAMP"
echo "kvpress environment ready: $VENV ($(( $(date +%s) - start )) s)"
