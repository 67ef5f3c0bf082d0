#!/usr/bin/env bash
# One-command set-up: .venv (Python 3.11) with pinned, mutually compatible versions.
# Idempotent: a stamp of the pinned inputs skips the work when nothing changed.
# torch comes from pip (it finds the CPU wheel wherever pip is configured to look); everything else from uv,
# which resolves and installs in parallel (~3x faster than pip here) and is held to the same constraints,
# torch==2.13.0 among them, so it keeps the installed torch and never pulls a CUDA build.
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
UV_DIR="$VENV/.uv"  # uv itself, outside the environment's site-packages
uv() {
  "$UV_DIR/bin/uv" pip "$@" --python "$VENV/bin/python" --quiet --compile-bytecode -c scripts/constraints.txt
}
echo "setup: [1/4] torch 2.13.0 (CPU wheel) and uv"
pip install -q -c scripts/constraints.txt "torch==2.13.0"
[ -x "$UV_DIR/bin/uv" ] || pip install -q --target "$UV_DIR" "uv==0.13.8"
echo "setup: [2/4] sglang (no CUDA dependencies)"
uv install --no-deps "sglang==0.5.23"  # its pinned CUDA wheels are not wanted on CPU
echo "setup: [3/4] megatron-core, sglang's CPU dependencies, test tools"
uv install "megatron-core==0.16.1" -r scripts/requirements-sglang-cpu.txt \
  pytest hypothesis pytest-timeout safetensors transformers
echo "setup: [4/4] sp-core (editable, byte-compiled)"
uv install --no-deps --no-build-isolation -e .
# uv compiles what it installs into the environment, not an editable install's own tree: compiled here, so
# that a first `sp-core verify` does not compile it in every rank and engine worker (or at all where
# PYTHONDONTWRITEBYTECODE is set)
"$VENV/bin/python" -m compileall -q -j 0 sp_core adapters >/dev/null
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
torch = md.version("torch")
cuda = sorted(d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].lower().startswith("nvidia-"))
assert torch.startswith("2.13.0") and not cuda, f"setup: torch {torch}, CUDA packages {cuda}: expected the CPU torch 2.13.0"
PY
echo "$want" > "$STAMP"
echo "setup: done ($("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
