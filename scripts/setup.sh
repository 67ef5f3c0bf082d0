#!/usr/bin/env bash
# One-command set-up: .venv (Python 3.11) with pinned, mutually compatible versions.
# Idempotent: a stamp of the pinned inputs skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${SP_CORE_PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
VENV=.venv
STAMP="$VENV/.sp-core-setup"
want="$(cat scripts/setup.sh scripts/constraints.txt scripts/requirements-sglang-cpu.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() {  # pip's notes about this machine's empty local indexes are noise; errors still fail the step
  "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
C="-c scripts/constraints.txt"
echo "setup: [1/5] pip + torch 2.13.0 (CPU wheel)"
pip install -q --upgrade pip
pip install -q $C "torch==2.13.0"
echo "setup: [2/5] megatron-core"
pip install -q $C "megatron-core==0.16.1"
echo "setup: [3/5] sglang (no CUDA dependencies)"
pip install -q $C --no-deps "sglang==0.5.23"  # its pinned CUDA wheels are not wanted on CPU
pip install -q --no-warn-conflicts $C -r scripts/requirements-sglang-cpu.txt
echo "setup: [4/5] test tools"
pip install -q $C pytest hypothesis pytest-timeout safetensors transformers
echo "setup: [5/5] sp-core (editable)"
pip install -q $C --no-deps --no-build-isolation -e .
echo "$want" > "$STAMP"
echo "setup: done ($("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
