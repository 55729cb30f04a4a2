#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with `nvcc -c` (no torch needed: the kernels are plain CUDA C++).
# CI runs this on machines without a GPU. Exits non-zero if any file fails to compile.
#
#   bash scripts/check_cuda_compile.sh               # default archs: sm_80 sm_90
#   HL_CUDA_ARCHS="75 80 90" bash scripts/check_cuda_compile.sh
#   HL_CUDA_STDS="c++17" bash scripts/check_cuda_compile.sh   # default: c++17 and c++20 (torch
#                                                              # 2.13's extensions build as C++20)
#   NVCC=/path/to/nvcc bash scripts/check_cuda_compile.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ]; then
  for c in /usr/local/cuda/bin/nvcc /usr/local/bin/nvcc; do [ -x "$c" ] && NVCC="$c" && break; done
fi
[ -n "$NVCC" ] && [ -x "$NVCC" ] || { echo "check_cuda_compile: nvcc not found (set NVCC=...)" >&2; exit 2; }

ARCHS="${HL_CUDA_ARCHS:-80 90}"
STDS="${HL_CUDA_STDS:-c++17 c++20}"
GENCODE=()
for a in $ARCHS; do GENCODE+=(-gencode "arch=compute_${a},code=sm_${a}"); done

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

shopt -s nullglob
files=("$ROOT"/csrc/cuda/*.cu)
[ ${#files[@]} -gt 0 ] || { echo "check_cuda_compile: no .cu files under csrc/cuda" >&2; exit 2; }

echo "check_cuda_compile: $("$NVCC" --version | tail -1), archs: $ARCHS, standards: $STDS" >&2
fail=0
for std in $STDS; do
for f in "${files[@]}"; do
  name="$(basename "$f" .cu)"
  # The same flags torch's CUDAExtension adds that matter for the source (no implicit half
  # conversions/operators), plus warnings as errors for the host side.
  if "$NVCC" -c "$f" -o "$TMP/$name.$std.o" -std="$std" -O3 "${GENCODE[@]}" \
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
       -Xcompiler -Wall -Werror=all-warnings -I"$ROOT/csrc/cuda"; then
    echo "  ok    $f ($std)" >&2
  else
    echo "  FAIL  $f ($std)" >&2
    fail=1
  fi
done
done
exit $fail
