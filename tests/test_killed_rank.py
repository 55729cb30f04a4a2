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


# MPI (mpirun) names the killed rank. Under Gloo, Horovod's launcher names the first process to
# exit; a survivor's failed sync first watches the other ranks' heartbeats for 3 s, so the killed
# rank is reliably first.
# A rank that leaves with status 0 (no join()) is not a failure to the launcher: then the
# survivors' own error names it as finished, not lost (its last heartbeat says it exited
# normally: horovod_local.peer_failure), and says what to do.
FINISHED = "rank(s) [2] of [0, 1, 2] finished (their process exited normally)"
FORGOT = "Most likely a rank finished its data without join()"


@pytest.mark.parametrize("controller,how,needles", [
    ("gloo", "kill", ["Process name: 2\nExit code: 137"]),
    ("gloo", "exit", [FINISHED, "must call join()"]),  # by the survivor whose sync broke first (the other is then
    #                             terminated by the launcher, maybe before it can say so)
    ("mpi", "kill", ["process rank 2"]),
    # no process dies: rank 2 waits in an evaluation allreduce, the others in a sync round;
    # the round's watchdog (HOROVOD_LOCAL_ROUND_TIMEOUT, 8 s here) ends them, saying why
    ("gloo", "forgot_join", [FORGOT]), ("mpi", "forgot_join", [FORGOT])])
def test_lost_rank_ends_job_quickly_and_is_named(controller, how, needles):
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "payload.pkl"), "wb") as f:
            pickle.dump({"victim": 2, "how": how}, f)
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        if how == "forgot_join":
            env["HOROVOD_LOCAL_ROUND_TIMEOUT"] = "8"
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
    for needle in needles:
        assert needle in out, (needle, out[-3000:])
