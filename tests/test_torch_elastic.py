"""Elastic training under a real ``horovodrun --gloo`` with a host discovery script whose answer
changes during the run: ``LocalTorchState`` carries the wrapper through added, crashed and
removed workers, and every sync round after a change averages over the new number of ranks.

One job (60-90 s on a busy 2-core machine; about 30 s of it is Gloo noticing the crash, see
docs/SEMANTICS.md), five membership changes:

==========  ==========================================  =====================================
after step  hosts file / event                          world
==========  ==========================================  =====================================
0           ``localhost:2``                             2
5           ``localhost:2`` + ``127.0.0.1:1``           3 (a worker added on a second name)
10          the ``127.0.0.1`` worker exits 1 before 11  2 (HorovodInternalError -> restore)
15          ``localhost:3`` + ``127.0.0.1:1``           3 (a worker added on localhost)
20          ``localhost:2`` + ``127.0.0.1:1``           2 (that worker removed by discovery)
==========  ==========================================  =====================================

Why a second host name: Horovod blacklists the whole *host* of a worker that exits non-zero; on
a single ``localhost`` that is every slot, and the job stops ("blacklisted slots count == 3 ->
stop running", rc 1; seen here). ``127.0.0.1`` resolves to this machine, so Horovod starts it
locally, and only that name is blacklisted.
"""
from __future__ import annotations

import functools
import os
import pickle
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from harness import ROOT, WORKERS, horovodrun

STEPS = 28
CHANGES = [
    {"at": 5, "size": 2, "hosts": "localhost:2\n127.0.0.1:1\n"},
    {"at": 15, "size": 2, "hosts": "localhost:3\n127.0.0.1:1\n"},
    {"at": 20, "size": 3, "hosts": "localhost:2\n127.0.0.1:1\n"},
]
CRASH = {"before": 11, "host": "127.0.0.1"}
RESTORE_CHECK_AT = 22
# (step the train function was (re-)entered at, world size then)
ENTRIES = [(0, 2), (5, 3), (10, 2), (15, 3), (20, 2)]
# Each change starts a fresh round (local_sgd period 4, SlowMo period 3). The restore check
# after step 22 takes steps 23-26, rolls back and takes them again; the last entry of each list
# is the final synchronize(). A failed round (SlowMo at 11, the crash) is not recorded.
SYNC_STEPS = {"local_sgd": [4, 9, 14, 19, 24, 24, 28, 28],
              "slowmo": [3, 8, 13, 18, 23, 26, 23, 26, 28]}
SLOWMO_ALPHA, SLOWMO_BETA = 1.0, 0.5  # as in workers/torch_elastic.py


@functools.lru_cache(maxsize=None)
def job() -> tuple:
    """Run the job once; the ranks' results (the two survivors: ranks 0 and 1)."""
    with tempfile.TemporaryDirectory(prefix="hl-elastic-") as tmp:
        hosts = os.path.join(tmp, "hosts")
        with open(hosts, "w") as f:
            f.write("localhost:2\n")
        discover = os.path.join(tmp, "discover.sh")
        with open(discover, "w") as f:
            f.write(f"#!/bin/sh\ncat '{hosts}'\n")
        os.chmod(discover, 0o755)
        with open(os.path.join(tmp, "payload.pkl"), "wb") as f:
            pickle.dump({"hosts_file": hosts, "steps": STEPS, "changes": CHANGES,
                         "crash": CRASH, "restore_check_at": RESTORE_CHECK_AT}, f)
        # --network-interface: else an elastic job wants 2 real hosts to find a common NIC
        cmd = [horovodrun(), "--gloo", "-np", "2", "--min-np", "2", "--max-np", "3",
               "--host-discovery-script", discover, "--network-interface", "lo",
               "--elastic-timeout", "180",
               sys.executable, str(WORKERS / "torch_elastic.py"), tmp]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get(
            "PYTHONPATH", "")]), OMP_NUM_THREADS="1", HOROVOD_LOCAL_TEST="1")
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"elastic job timed out: {e.stdout!s:.4000}\n{e.stderr!s:.4000}")
        out = f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        assert proc.returncode == 0, f"elastic job failed ({proc.returncode})\n{out}"
        results = []
        for r in range(2):
            with open(os.path.join(tmp, f"rank{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        assert not os.path.exists(os.path.join(tmp, "rank2.pkl")), "a third rank finished"
        return tuple(results)


def test_job_survives_every_change_trains_on_and_exits_zero():
    ranks = job()  # asserts exit status 0
    for r, res in enumerate(ranks):
        assert res["rank"] == r and res["size"] == 2 and res["born_size"] == 2
        assert [(e["step"], e["hvd_size"]) for e in res["entries"]] == ENTRIES
        for name in ("local_sgd", "slowmo"):
            assert res["stats"][name]["steps"] == STEPS
            np.testing.assert_array_equal(res["final"][name], ranks[0]["final"][name])
    # training moved the model after the last change (the final average is not the start)
    last = ranks[0]["entries"][-1]["local_sgd_params"]
    assert np.abs(ranks[0]["final"]["local_sgd"] - last).max() > 1e-3


def test_after_each_change_every_rank_is_identical_and_starts_a_fresh_round():
    for res in job():
        for e in res["entries"]:
            rows = e["all_params"]  # every rank's parameters, allgathered right after sync()
            assert rows.shape[0] == e["hvd_size"], e["step"]
            for row in rows[1:]:
                np.testing.assert_array_equal(row, rows[0], err_msg=f"step {e['step']}")
            for name in ("local_sgd", "slowmo"):
                assert e[f"{name}_size"] == e["hvd_size"], (name, e["step"])
                assert e[f"{name}_local_steps"] == 0, (name, e["step"])
            if e["step"] > 0:  # SlowMo's x0 restarts at the broadcast parameters
                np.testing.assert_array_equal(e["slowmo_x0"], e["slowmo_params"])
        # the replica check ran at every size the job had (3 included), for both wrappers
        for name in ("local_sgd", "slowmo"):
            assert [n for o, n in res["checks"] if o == name] == [n for _, n in ENTRIES]


def test_schedule_restarts_at_each_change():
    for res in job():
        for name, steps in SYNC_STEPS.items():
            assert [s["step"] for s in res["syncs"] if s["opt"] == name] == steps, name


def test_local_sgd_sync_averages_over_the_current_number_of_ranks():
    for res in job():
        records = [s for s in res["syncs"] if s["opt"] == "local_sgd"]
        assert {s["size"] for s in records} == {2, 3}
        for s in records:
            pre = s["all_pre"]  # every rank's parameters just before the round, by allgather
            assert pre.shape[0] == s["size"] == s["hvd_size"], s["step"]
            np.testing.assert_array_equal(pre[s["rank"]], s["pre"])
            np.testing.assert_allclose(s["post"], pre.mean(axis=0), rtol=1e-12, atol=1e-14,
                                       err_msg=f"step {s['step']}, {s['size']} ranks")
            if s["size"] == 3:  # the stale size would be far off
                assert np.abs(s["post"] - pre.sum(axis=0) / 2).max() > 0.1


def test_slowmo_sync_uses_the_current_number_of_ranks():
    for res in job():
        records = [s for s in res["syncs"] if s["opt"] == "slowmo"]
        assert {s["size"] for s in records} == {2, 3}
        for s in records:
            pre = s["all_pre"]
            assert pre.shape[0] == s["size"] == s["hvd_size"], s["step"]
            u = SLOWMO_BETA * s["u"] + (s["x0"] - pre.mean(axis=0)) / s["lr"]
            x0 = s["x0"] - SLOWMO_ALPHA * s["lr"] * u
            np.testing.assert_allclose(s["post"], x0, rtol=1e-10, atol=1e-12,
                                       err_msg=f"step {s['step']}, {s['size']} ranks")
            np.testing.assert_allclose(s["x0_after"], x0, rtol=1e-10, atol=1e-12)


def test_crash_rolls_back_to_the_last_commit_of_rank_0():
    """The crash broke SlowMo's round in step 11 (after local_sgd's local step 11): restore()
    went back to the commit after step 10 and sync() spread rank 0's, so everyone resumed from
    rank 0's committed parameters, although rank 1's own differed (mid-round)."""
    rank0, rank1 = job()
    entry = next(e for e in rank0["entries"] if e["step"] == CRASH["before"] - 1)
    for row in entry["all_params"]:
        np.testing.assert_array_equal(row, rank0["committed"][10])
    assert not np.array_equal(rank1["committed"][10], rank0["committed"][10])


def test_restore_rolls_back_wrapper_and_inner_state():
    for res in job():
        got = res["restore"]
        assert got["moved"] == {"local_sgd": True, "slowmo": True}
        assert got["syncs_moved"] == {"local_sgd": 1, "slowmo": 2}
        assert got["back"] == {"local_sgd": (True, True, True), "slowmo": (True, True, True)}
        assert got["momentum_back"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
