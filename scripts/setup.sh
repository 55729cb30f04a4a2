#!/usr/bin/env bash
# Idempotent set-up for horovod-local on a fresh Debian machine (Python 3.11, no GPU).
#
#   bash scripts/setup.sh            # creates ./.venv and installs everything
#
# Steps: Debian packages (OpenMPI) -> venv with torch 2.13 CPU, tensorflow-cpu 2.21, mpi4py,
# test tools -> Horovod 0.28.1 built from its sdist with the three fixes documented in
# shared/HOROVOD_BUILD.md (wheel cached outside the checkout, so a second run or a fresh clone
# on the same machine takes seconds) -> horovod-local itself (editable, with its C++ extension)
# -> `horovodrun --check-build`.
#
# Each step that fails stops the script with the step's name and what to try; a venv whose
# set-up did not complete is not marked ready, and the next run repairs it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HOROVOD_LOCAL_VENV:-$ROOT/.venv}"
CACHE="${HOROVOD_LOCAL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/horovod-local}"
PYTHON="${PYTHON:-python3}"

HOROVOD_VERSION=0.28.1
TORCH_VERSION=2.13.0
TF_VERSION=2.21.0

STEP=""
step() { STEP="$1"; echo "[setup] $1" >&2; }
trap 'rc=$?; if [ $rc -ne 0 ]; then echo "[setup] FAILED at step: $STEP (exit $rc). Fix the error above and re-run bash scripts/setup.sh; it resumes where it can." >&2; fi' EXIT

# Everything the project installs is pinned here; the marker file records it, so a change
# to this list (or a half-finished run) makes the next run redo the pip step.
PIP_REQS=(
  "torch==$TORCH_VERSION"          # the CPU wheel on disk (/opt/wheels); never a CUDA build
  "tensorflow-cpu==$TF_VERSION"    # Keras 3
  "tf-keras==$TF_VERSION"          # Horovod's TF build was observed with it present
  "mpi4py>=4,<5"
  "numpy<3" "packaging" "wheel" "setuptools<81" "ninja"
  "pytest>=8" "pytest-timeout" "hypothesis"
  "matplotlib" "scikit-learn" "psutil" "cloudpickle" "pyyaml"
)
STAMP="$(printf '%s\n' "${PIP_REQS[@]}" "$HOROVOD_VERSION" | sha1sum | cut -c1-12)"

# --- 1. Debian packages ---------------------------------------------------------------
step "Debian packages (openmpi-bin libopenmpi-dev iproute2 openssh)"
need_apt=()
# openssh-server/-client: the multi-host test bed (scripts/hosts.sh) runs an sshd per host
for pkg in openmpi-bin libopenmpi-dev iproute2 cmake openssh-server openssh-client; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
command -v mpirun >/dev/null || { echo "mpirun not on PATH after installing openmpi-bin" >&2; exit 1; }

# --- 2. virtual environment -------------------------------------------------------------
step "virtual environment at $VENV"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
# pip, minus the machine-config noise about local index folders that lack a package.
pip_q() {
  "$PY" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v 'is ignored: it is neither' || true; }
  return "${PIPESTATUS[0]}"
}
PIP=(pip_q)
export TF_CPP_MIN_LOG_LEVEL=3
if [ "$(cat "$VENV/.hl-reqs" 2>/dev/null)" != "$STAMP" ]; then
  step "Python packages (torch $TORCH_VERSION CPU, tensorflow-cpu $TF_VERSION, mpi4py, test tools)"
  rm -f "$VENV/.hl-ready"
  "${PIP[@]}" install --upgrade pip
  "${PIP[@]}" install "${PIP_REQS[@]}"
  # pip's cmake 4.x rejects Gloo's cmake_minimum_required (HOROVOD_BUILD.md fix 1): make sure
  # no dependency pulled it in, so the system cmake 3.25 is used.
  "${PIP[@]}" uninstall -y cmake >/dev/null 2>&1 || true
  "$PY" - <<PYEOF
import torch, tensorflow as tf
assert torch.__version__.startswith("$TORCH_VERSION"), torch.__version__
assert not torch.version.cuda, "a CUDA build of torch was installed; expected the CPU wheel"
assert tf.__version__ == "$TF_VERSION", tf.__version__
PYEOF
  echo "$STAMP" > "$VENV/.hl-reqs"
fi

# --- 3. Horovod, built once and cached ------------------------------------------------------
# The wheel links against this exact torch / TF / Python, so they are part of its cache key.
PYTAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
HVD_KEY="horovod-$HOROVOD_VERSION-torch$TORCH_VERSION-tf$TF_VERSION-$PYTAG"
HVD_DIR="$CACHE/$HVD_KEY"
if ! "$PY" -c "import horovod, sys; sys.exit(horovod.__version__ != '$HOROVOD_VERSION')" 2>/dev/null; then
  if ! ls "$HVD_DIR"/horovod-*.whl >/dev/null 2>&1; then
    step "building Horovod $HOROVOD_VERSION from its sdist (about 5-10 min on 2 cores, once)"
    work="$(mktemp -d)"
    "${PIP[@]}" download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
    tar -xzf "$work"/horovod-"$HOROVOD_VERSION".tar.gz -C "$work"
    src="$work/horovod-$HOROVOD_VERSION"
    # Fix 2: Horovod 0.28.1 compiles its PyTorch target as C++14, but PyTorch 2.x and TF's abseil
    # require C++17 (fixed upstream after 0.28.1, never released).
    for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
      grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f" || { echo "patch target not found in $f" >&2; exit 1; }
      sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
    done
    # Fix 3: xla_mpi_ops.cc includes highwayhash/farmhash headers TF 2.21 no longer ships. It
    # only serves HOROVOD_ENABLE_XLA_OPS (jit_compile), which we do not use: drop that source.
    f="$src/horovod/tensorflow/CMakeLists.txt"
    grep -q 'xla_mpi_ops.cc' "$f" || { echo "patch target xla_mpi_ops.cc not found in $f" >&2; exit 1; }
    sed -i '/xla_mpi_ops.cc/d' "$f"
    # Fix 1: if a pip cmake 4.x is found anyway, let it accept Gloo's old minimum version.
    export CMAKE_POLICY_VERSION_MINIMUM=3.5
    (cd "$src" && HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 \
       HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MXNET=1 \
       MAKEFLAGS="-j$(nproc)" \
       "$PY" -m pip wheel --no-build-isolation --no-deps --no-cache-dir -w "$work/dist" . \
       > "$work/build.log" 2>&1) || { tail -40 "$work/build.log" >&2; echo "Horovod build log: $work/build.log" >&2; exit 1; }
    mkdir -p "$HVD_DIR"
    cp "$work"/dist/horovod-*.whl "$HVD_DIR"/
    rm -rf "$work"
  fi
  step "installing cached Horovod wheel from $HVD_DIR"
  rm -f "$VENV/.hl-ready"
  "${PIP[@]}" install --no-deps --force-reinstall "$HVD_DIR"/horovod-*.whl
  "${PIP[@]}" install cloudpickle psutil pyyaml packaging  # horovod's runtime deps
fi

# --- 4. horovod-local itself -----------------------------------------------------------------
# Rebuilt only when setup.py or csrc/ changed (pip would recompile the extension every time).
EXT_STAMP="$(cd "$ROOT" && cat setup.py $(find csrc -type f | sort) | sha1sum | cut -c1-12)"
if [ "$(cat "$VENV/.hl-ext" 2>/dev/null)" != "$EXT_STAMP:$ROOT" ] || \
   ! "$PY" -c "import torch, horovod_local._C" 2>/dev/null; then
  step "horovod-local (editable install, C++ extension)"
  rm -f "$VENV/.hl-ready"
  "${PIP[@]}" install --no-build-isolation --no-deps -e "$ROOT" >/dev/null
  echo "$EXT_STAMP:$ROOT" > "$VENV/.hl-ext"
fi

# --- 5. verify --------------------------------------------------------------------------------
# The full check (it imports TensorFlow several times, ~20 s) runs whenever anything above was
# (re)installed; a venv already verified gets a 2-second import check.
if [ ! -f "$VENV/.hl-ready" ]; then
  step "verifying: horovodrun --check-build"
  check="$("$VENV/bin/horovodrun" --check-build)"
  for want in "\[X\] PyTorch" "\[X\] TensorFlow" "\[X\] MPI" "\[X\] Gloo"; do
    grep -q "$want" <<<"$check" || { echo "$check" >&2; echo "Horovod lacks: $want" >&2; exit 1; }
  done
else
  step "verifying (venv verified before): horovod.torch imports with MPI and Gloo"
  "$PY" -c "import horovod.torch as h, sys; sys.exit(not (h.mpi_built() and h.gloo_built()))"
fi
"$PY" -c "import horovod_local, horovod_local.torch; print('[setup] horovod_local', horovod_local.__version__, 'fused sync backend:', horovod_local.torch.backend_info())" >&2
touch "$VENV/.hl-ready"
STEP="done"
echo "[setup] ready: $VENV" >&2
