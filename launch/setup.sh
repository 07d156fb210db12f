#!/usr/bin/env bash
# Create .venv and install medcare_dist with the given extras (default: none).
# On a machine without CUDA the CPU build of torch is installed first: a bare `torch`
# requirement would otherwise pull a multi-GB CUDA build.
#   bash launch/setup.sh [extras]      e.g. bash launch/setup.sh test,mpi
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then pip install --quiet "torch>=2.4,<2.15"; else pip install --quiet torch==2.13.0; fi
fi
pip install --quiet -e ".${extras:+[$extras]}"
