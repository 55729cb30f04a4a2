"""Run a worker script under a real ``horovodrun`` and collect each rank's pickled result."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"


def horovodrun() -> str:
    exe = Path(sys.executable).with_name("horovodrun")
    return str(exe) if exe.exists() else (shutil.which("horovodrun") or "horovodrun")


def run_horovod(worker: str, np: int, controller: str, payload, timeout: float = 300,
                extra_args: tuple = ()) -> list:
    """Runs ``workers/<worker>.py`` on ``np`` local ranks with ``controller`` ('mpi' or 'gloo').

    The payload is pickled to a file the worker reads; each rank pickles its result to
    ``<out>/rank<r>.pkl``. Raises with the job's output if the job fails or times out.
    """
    assert controller in ("mpi", "gloo")
    with tempfile.TemporaryDirectory(prefix="hl-test-") as tmp:
        with open(os.path.join(tmp, "payload.pkl"), "wb") as f:
            pickle.dump(payload, f)
        if controller == "mpi" and not any(str(a).startswith("--mpi-args") for a in extra_args):
            # idle MPI ranks busy-poll: with more ranks than cores (CI: 2) a launch takes up to
            # 4x longer without yielding (measured 110 s vs 30 s). A speed setting only.
            extra_args = (*extra_args, "--mpi-args=--mca mpi_yield_when_idle 1")
        cmd = [horovodrun(), "-np", str(np), "-H", f"localhost:{np}", f"--{controller}",
               *extra_args, sys.executable, str(WORKERS / f"{worker}.py"), tmp]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("HOROVOD_LOCAL_TEST", "1")
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"horovodrun timed out after {timeout}s: {' '.join(cmd)}\n"
                                 f"{(e.stdout or '')[-4000:]}\n{(e.stderr or '')[-4000:]}")
        if proc.returncode != 0:
            raise AssertionError(f"horovodrun failed ({proc.returncode}): {' '.join(cmd)}\n"
                                 f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
        results = []
        for r in range(np):
            with open(os.path.join(tmp, f"rank{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
