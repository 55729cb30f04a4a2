#!/usr/bin/env bash
# The project's test command (README, CI): set-up (idempotent) + the whole test suite.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
echo "[test] compiling every CUDA source with nvcc (no GPU needed)"
bash scripts/check_cuda_compile.sh
echo "[test] pytest"
exec .venv/bin/python -m pytest tests -q -ra "$@"
