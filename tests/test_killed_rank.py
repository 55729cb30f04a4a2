"""A rank killed (SIGKILL) during training: the job must end non-zero within 60 s on every
rank instead of the survivors hanging in a sync round, and say which process failed."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import time

import pytest

from harness import ROOT, WORKERS, horovodrun


# MPI names the killed rank. Horovod's Gloo launcher names the FIRST process that exited, which
# can be a survivor whose sync broke on the lost connection (observed: "Process name: 0, exit
# code 1"), so with Gloo only a failed-process report is guaranteed; naming the lost rank
# there is an open item of the reliability issue.
@pytest.mark.parametrize("controller,needle", [
    ("gloo", "Horovod detected that one or more processes exited with non-zero status"),
    ("mpi", "process rank 2")])
def test_killed_rank_ends_job_quickly_and_names_it(controller, needle):
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "payload.pkl"), "wb") as f:
            pickle.dump({"victim": 2}, f)
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        proc = subprocess.run([horovodrun(), "-np", "3", "-H", "localhost:3", f"--{controller}",
                               sys.executable, str(WORKERS / "torch_killed.py"), tmp],
                              env=env, capture_output=True, text=True, timeout=240,
                              stdin=subprocess.DEVNULL)
        ended = time.time()
        with open(os.path.join(tmp, "killed_at")) as f:
            killed = float(f.read())
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert ended - killed < 60, f"job took {ended - killed:.0f}s to end after the kill"
    assert needle in out, out[-3000:]
