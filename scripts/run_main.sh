#!/usr/bin/env bash
# The README's first command: set-up (idempotent), then the main job's quick comparison of
# horovod-local's local methods against Horovod's per-step allreduce on 2 ranks, with the
# loopback capped at 1 Gbit (~3-4 min on 2 cores).
#
#   bash scripts/run_main.sh                  # quick; results in results/
#   bash scripts/run_main.sh --full           # all methods, all three tasks (~10-15 min)
#   bash scripts/run_main.sh --rate 10gbit --out results/10g
#   bash scripts/run_main.sh --two-host       # 2 hosts x 2 ranks (scripts/hosts.sh's test bed,
#                                             # up and down by itself), inter-host link 1 Gbit:
#                                             # Horovod (+ HOROVOD_HIERARCHICAL_ALLREDUCE=1),
#                                             # local SGD H=8, two-level H=8 L=1, no-comm
#
# Extra arguments go to benchmarks/compare.py (see --help). The bandwidth cap needs root and
# `tc`; without them the runs are uncapped and the results say so.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
mode=(--quick)
args=()
for a in "$@"; do
  case "$a" in --full|--smoke|--quick|--overlap-compression) mode=() ;; esac
  case "$a" in --two-host) args+=(--hosts 2x2) ;; *) args+=("$a") ;; esac
done
set -- ${args[@]+"${args[@]}"}
out="results"
prev=""
for a in "$@"; do
  [ "$prev" = "--out" ] && out="$a"
  case "$a" in --out=*) out="${a#--out=}" ;; esac
  prev="$a"
done
rc=0
.venv/bin/python benchmarks/compare.py "${mode[@]}" "$@" || rc=$?
echo
case "$out" in /*) ;; *) out="$ROOT/$out" ;; esac
echo "[run_main] results: $out/ (results.md, results.json, *.png, logs/)"
exit $rc
