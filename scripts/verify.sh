#!/usr/bin/env bash
# Set up (idempotent) and run the main job: sp-core verify on its embedded default checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/sp-core verify "$@"
