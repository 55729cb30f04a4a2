#!/usr/bin/env bash
# GPU check of the fused kernels, for a machine with an NVIDIA GPU, its own PyTorch (CUDA build)
# and a CUDA toolkit, without Horovod, the project's venv or internet:
#
#   1. builds horovod_local._C with CUDA in place, like scripts/setup.sh does (setup.py, same
#      flags), with the `python` on PATH (or $PYTHON), for this GPU's architecture only
#      (TORCH_CUDA_ARCH_LIST, unless set);
#   2. runs the CUDA kernel tests: `pytest tests/test_kernels*.py -k cuda` with
#      HOROVOD_LOCAL_REQUIRE_EXT=1 (a missing CUDA build fails instead of skipping), or, when
#      `python -m pytest` is not available, the same tests through a minimal built-in runner;
#   3. runs benchmarks/bench_pack.py --device cuda.
#
# Results go to $OUT (or a new temporary directory): build.log, tests.log, bench_pack_cuda.txt,
# bench_pack_cuda.json, summary.txt. Exit status: 0 all passed; 1 a step failed; 2 no usable
# python/torch; 3 no CUDA GPU visible to torch; 4 no CUDA toolkit (nvcc).
#
#   bash scripts/device_check.sh
#   OUT=/tmp/out PYTHON=python3 MAX_JOBS=16 bash scripts/device_check.sh
#   HL_CHECK_SKIP_BENCH=1 bash scripts/device_check.sh      # build + tests only
#   HL_CHECK_SELFTEST_K=numpy bash scripts/device_check.sh  # no GPU needed: only runs the
#       built-in runner on the tests matching that keyword (checks the runner itself) and exits
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${OUT:-}"
if [ -z "$OUT_DIR" ]; then OUT_DIR="$(mktemp -d /tmp/hl_device_check.XXXXXX)"; fi
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

say() { echo "[device_check] $*" | tee -a "$SUMMARY" >&2; }
with_timeout() {  # with_timeout SECONDS cmd...
  local s="$1"; shift
  if command -v timeout >/dev/null 2>&1; then timeout "$s" "$@"; else "$@"; fi
}

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python python3; do command -v "$c" >/dev/null 2>&1 && PY="$c" && break; done
fi
[ -n "$PY" ] || { say "FAIL: no python on PATH (set PYTHON=...)"; exit 2; }
export PYTHONPATH="$ROOT:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HOROVOD_LOCAL_REQUIRE_EXT=1

# --- the built-in test runner (used when pytest is missing) -----------------------------------
# Enough of pytest's API for tests/test_kernels*.py: mark.parametrize (stacked, ids, param with
# marks), mark.skipif, skip, fail, raises(match=), approx; tests needing fixtures are skipped.
cat > "$TMP/plain_runner.py" <<'PYEOF'
import importlib, math, re, sys, traceback, types


class Skipped(Exception):
    pass


class _Mark:
    def __init__(self, name, args, kwargs):
        self.name, self.args, self.kwargs = name, args, kwargs

    def __call__(self, f):
        f.__dict__.setdefault("_hl_marks", []).append(self)  # innermost decorator first
        return f


class _MarkGen:
    def __getattr__(self, name):
        return lambda *a, **k: _Mark(name, a, k)


class _Param:
    def __init__(self, values, marks=(), id=None):
        self.values = values
        self.marks = list(marks) if isinstance(marks, (list, tuple)) else [marks]
        self.id = id


def param(*values, marks=(), id=None):
    return _Param(values, marks, id)


def skip(msg="", **_):
    raise Skipped(msg)


def fail(msg="", **_):
    raise AssertionError(msg)


class raises:
    def __init__(self, exc, match=None):
        self.exc, self.match, self.value = exc, match, None

    def __enter__(self):
        return self

    def __exit__(self, t, v, tb):
        if t is None:
            raise AssertionError(f"DID NOT RAISE {self.exc}")
        if not issubclass(t, self.exc):
            return False
        if self.match is not None and not re.search(self.match, str(v)):
            raise AssertionError(f"{str(v)!r} does not match {self.match!r}")
        self.value = v
        return True


class approx:
    def __init__(self, expected, rel=None, abs=None):
        self.expected = expected
        self.rel = 1e-6 if rel is None else rel
        self.abs = 1e-12 if abs is None else abs

    def __eq__(self, other):
        if math.isnan(other) or math.isnan(self.expected):
            return False
        return math.fabs(other - self.expected) <= max(self.rel * math.fabs(self.expected),
                                                       self.abs)

    def __repr__(self):
        return f"approx({self.expected!r}, rel={self.rel}, abs={self.abs})"


shim = types.ModuleType("pytest")
shim.mark, shim.param, shim.skip, shim.fail = _MarkGen(), param, skip, fail
shim.raises, shim.approx, shim.Skipped = raises, approx, Skipped
sys.modules["pytest"] = shim


def _idpart(value, ids, argname, i):
    if callable(ids):
        r = ids(value)
        if r is not None:
            return str(r)
    elif ids is not None:
        return str(ids[i])
    if isinstance(value, (str, int, float, bool)) or value is None:
        return str(value)
    return f"{argname}{i}"


def expand(func):
    """[(id, kwargs, skip_reason)] for one test function."""
    cases = [("", {}, None)]
    for m in func.__dict__.get("_hl_marks", []):  # innermost first, like pytest's ids
        if m.name != "parametrize":
            continue
        names = [n.strip() for n in m.args[0].split(",")] if isinstance(m.args[0], str) \
            else list(m.args[0])
        ids = m.kwargs.get("ids")
        new = []
        for cid, kw, why in cases:
            for i, v in enumerate(m.args[1]):
                marks = []
                if isinstance(v, _Param):
                    marks, pid, v = v.marks, v.id, (v.values if len(names) > 1 else v.values[0])
                else:
                    pid = None
                vals = list(v) if len(names) > 1 else [v]
                part = pid or "-".join(_idpart(x, ids, n, i) for x, n in zip(vals, names))
                w = why
                for mk in marks:
                    if mk.name == "skipif" and mk.args and mk.args[0]:
                        w = w or mk.kwargs.get("reason", "skipif")
                new.append((f"{cid}-{part}" if cid else part, {**kw, **dict(zip(names, vals))},
                            w))
        cases = new
    return cases


def main(argv):
    keyword = argv[1].lower()
    files = argv[2:]
    passed = failed = skipped = 0
    for path in files:
        modname = path.rsplit("/", 1)[-1][:-3]
        try:
            mod = importlib.import_module(modname)
        except Exception:
            print(f"ERROR importing {path}:\n{traceback.format_exc()}")
            failed += 1
            continue
        for name, func in list(vars(mod).items()):
            if not name.startswith("test_") or not callable(func):
                continue
            why_f = None
            for m in func.__dict__.get("_hl_marks", []):
                if m.name == "skipif" and m.args and m.args[0]:
                    why_f = m.kwargs.get("reason", "skipif")
            argnames = func.__code__.co_varnames[:func.__code__.co_argcount]
            for cid, kw, why in expand(func):
                node = f"{path}::{name}" + (f"[{cid}]" if cid else "")
                if keyword and keyword not in node.lower():
                    continue
                missing = [a for a in argnames if a not in kw]
                why = why_f or why or (f"needs fixtures {missing}" if missing else None)
                if why:
                    skipped += 1
                    print(f"SKIPPED {node}: {why}")
                    continue
                try:
                    func(**kw)
                except Skipped as e:
                    skipped += 1
                    print(f"SKIPPED {node}: {e}")
                except Exception:
                    failed += 1
                    print(f"FAILED {node}\n{traceback.format_exc()}")
                else:
                    passed += 1
                    print(f"PASSED {node}")
    print(f"== plain runner: {passed} passed, {failed} failed, {skipped} skipped "
          f"(keyword {keyword!r})")
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
PYEOF

TEST_FILES=(tests/test_kernels.py tests/test_kernels_compress.py)

run_tests() {  # run_tests KEYWORD LOG
  local k="$1" log="$2"
  if [ -z "${HL_CHECK_FORCE_PLAIN:-}" ] && "$PY" -m pytest --version >/dev/null 2>&1; then
    say "tests: $PY -m pytest ${TEST_FILES[*]} -k $k"
    with_timeout 600 "$PY" -m pytest -q -rs -p no:cacheprovider "${TEST_FILES[@]}" -k "$k" \
      > "$log" 2>&1
  else
    say "tests: pytest not available (or HL_CHECK_FORCE_PLAIN): the built-in runner, -k $k"
    with_timeout 600 "$PY" "$TMP/plain_runner.py" "$k" "${TEST_FILES[@]}" > "$log" 2>&1
  fi
}

if [ -n "${HL_CHECK_SELFTEST_K:-}" ]; then
  HL_CHECK_FORCE_PLAIN=1 run_tests "$HL_CHECK_SELFTEST_K" "$OUT_DIR/selftest.log"
  rc=$?
  tail -1 "$OUT_DIR/selftest.log" | tee -a "$SUMMARY" >&2
  say "selftest of the built-in runner: rc=$rc; log: $OUT_DIR/selftest.log"
  exit $rc
fi

# --- 0. what is there ---------------------------------------------------------------------------
probe="$("$PY" - <<'PYEOF' 2>&1
import sys
try:
    import torch
except Exception as e:
    print(f"NO_TORCH {type(e).__name__}: {e}")
    sys.exit(0)
from torch.utils import cpp_extension as ce
ok = torch.cuda.is_available()
line = f"torch {torch.__version__}, built with CUDA {torch.version.cuda}, CUDA_HOME {ce.CUDA_HOME}"
if ok:
    cap = torch.cuda.get_device_capability(0)
    line += f", {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)} (sm_{cap[0]}{cap[1]})"
    print(f"GPU {cap[0]}.{cap[1]} {'TOOLKIT' if ce.CUDA_HOME else 'NO_TOOLKIT'} | {line}")
else:
    print(f"NO_GPU | {line}")
PYEOF
)"
case "$probe" in
  NO_TORCH*) say "FAIL: $PY cannot import torch (${probe#NO_TORCH })"; exit 2 ;;
  NO_GPU*) say "FAIL: no CUDA GPU: torch.cuda.is_available() is False (${probe#*| });" \
                 "this check needs a machine with an NVIDIA GPU"; exit 3 ;;
  GPU*) ;;
  *) say "FAIL: probing torch failed: $probe"; exit 2 ;;
esac
say "${probe#*| }"
ARCH="$(echo "$probe" | awk '{print $2}')"
if echo "$probe" | grep -q NO_TOOLKIT; then
  say "FAIL: no CUDA toolkit found (torch.utils.cpp_extension.CUDA_HOME is None): set CUDA_HOME"
  exit 4
fi

fail=0
# --- 1. build -----------------------------------------------------------------------------------
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}"
say "build: $PY setup.py build_ext --inplace (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
t0=$(date +%s)
if with_timeout 600 "$PY" setup.py build_ext --inplace > "$OUT_DIR/build.log" 2>&1; then
  say "build: ok in $(( $(date +%s) - t0 )) s"
else
  say "build: FAILED (rc $?) after $(( $(date +%s) - t0 )) s; tail of $OUT_DIR/build.log:"
  tail -30 "$OUT_DIR/build.log" | tee -a "$SUMMARY" >&2
  exit 1
fi
info="$("$PY" -c "import torch; from horovod_local import _C; from horovod_local.torch import _kernels as K; print(int(_C.with_cuda), K.backend_info())" 2>&1)"
say "extension: ${info#* }"
if [ "${info%% *}" != "1" ]; then
  say "FAIL: horovod_local._C was not built with CUDA (see $OUT_DIR/build.log)"
  exit 1
fi

# --- 2. CUDA tests ------------------------------------------------------------------------------
t0=$(date +%s)
run_tests cuda "$OUT_DIR/tests.log"
rc=$?
tail -3 "$OUT_DIR/tests.log" | tee -a "$SUMMARY" >&2
if [ $rc -eq 0 ]; then
  say "tests: ok in $(( $(date +%s) - t0 )) s"
else
  say "tests: FAILED (rc $rc); log: $OUT_DIR/tests.log"
  grep -E "^(FAILED|ERROR)" "$OUT_DIR/tests.log" | head -20 | tee -a "$SUMMARY" >&2
  fail=1
fi

# --- 3. benchmark -------------------------------------------------------------------------------
if [ -z "${HL_CHECK_SKIP_BENCH:-}" ]; then
  t0=$(date +%s)
  if with_timeout 420 "$PY" benchmarks/bench_pack.py --device cuda \
       --out "$OUT_DIR/bench_pack_cuda.json" > "$OUT_DIR/bench_pack_cuda.txt" 2>&1; then
    say "bench: ok in $(( $(date +%s) - t0 )) s: $OUT_DIR/bench_pack_cuda.txt"
  else
    say "bench: FAILED; tail of $OUT_DIR/bench_pack_cuda.txt:"
    tail -20 "$OUT_DIR/bench_pack_cuda.txt" | tee -a "$SUMMARY" >&2
    fail=1
  fi
fi

say "results in $OUT_DIR; $([ $fail -eq 0 ] && echo ALL OK || echo SOME STEP FAILED)"
exit $fail
