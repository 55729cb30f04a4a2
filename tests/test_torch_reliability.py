"""Issue 7 behaviours under real horovodrun: clear errors instead of hangs or corruption,
and checkpoint/resume that is bit-identical to an uninterrupted run."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from harness import run_horovod
from test_torch_optimizer import ADAALTER, ADAM, SGD, SGD_M, const

RESUME = [
    dict(id="local_sgd_momentum", inner=SGD_M, schedule=const(4), steps=30, stop=13),
    dict(id="warmup_stop_inside_warmup", inner=SGD_M, warmup_steps=10, schedule=const(4),
         steps=30, stop=7),
    dict(id="adpsgd", inner=SGD, schedule={"kind": "adaptive", "initial_period": 2,
         "sampling_steps": 8, "lower": 0.7, "upper": 1.3, "min_period": 1, "max_period": 6},
         steps=40, stop=23),
    dict(id="increasing", inner=SGD, schedule={"kind": "increasing", "initial_period": 1,
         "factor": 2, "rounds_per_stage": 2, "max_period": 8}, steps=30, stop=11),
    dict(id="adaalter", inner=ADAALTER, schedule=const(4), steps=30, stop=14),
    dict(id="slowmo", inner=SGD_M, schedule=const(5), state_policy="average",
         algorithm={"name": "slowmo", "alpha": 1.0, "beta": 0.7}, steps=30, stop=12),
    dict(id="outer_nesterov_adam", inner=ADAM, schedule=const(5),
         algorithm={"name": "outer_sgd", "lr": 0.7, "momentum": 0.9, "nesterov": True},
         steps=30, stop=17),
]
JOBS = [(2, "gloo"), (3, "mpi")]


@functools.lru_cache(maxsize=None)
def job(n, controller):
    return tuple(run_horovod("torch_reliability", n, controller, {"resume": RESUME}))


@pytest.mark.parametrize("n,controller", JOBS)
def test_mismatched_replicas_fail_on_every_rank(n, controller):
    for r, res in enumerate(job(n, controller)):
        assert res["shape_mismatch"].startswith("ValueError"), res["shape_mismatch"]
        assert "'weight'" in res["shape_mismatch"] and "rank 1" in res["shape_mismatch"]
        assert res["period_mismatch"].startswith("ValueError"), res["period_mismatch"]
        assert "schedule" in res["period_mismatch"] and "'period': 5" in res["period_mismatch"]
        assert res["outer_mismatch"].startswith("ValueError"), res["outer_mismatch"]
        assert "outer optimizer" in res["outer_mismatch"] and "outer_nesterov" in \
            res["outer_mismatch"]


@pytest.mark.parametrize("n,controller", JOBS)
def test_nan_at_sync_raises_everywhere_and_writes_nothing(n, controller):
    for res in job(n, controller):
        assert res["nan"].startswith("FloatingPointError"), res["nan"]
        assert "step 8" in res["nan"] and "'weight'" in res["nan"]
        assert res["nan_kept_out"]


@pytest.mark.parametrize("n,controller", JOBS)
def test_join_during_warmup_fails_on_every_rank(n, controller):
    for res in job(n, controller):
        assert res["round_kinds"].startswith("RuntimeError"), res["round_kinds"]
        assert "different kinds of rounds" in res["round_kinds"]


@pytest.mark.parametrize("n,controller", JOBS)
def test_nonfinite_skip_restores_last_good_average_and_continues(n, controller):
    ranks = job(n, controller)
    for res in ranks:
        assert res["skip_restored"] and res["skip_warned"]
        assert res["skip_stats"]["skipped_rounds"] == 1 and res["skip_stats"]["syncs"] == 2
        for name, v in res["skip_after"].items():
            assert np.isfinite(v).all()
            np.testing.assert_array_equal(v, ranks[0]["skip_after"][name])


@pytest.mark.parametrize("n,controller", JOBS)
@pytest.mark.parametrize("cfg", RESUME, ids=[c["id"] for c in RESUME])
def test_resume_mid_round_is_bit_identical(n, controller, cfg):
    for r, res in enumerate(job(n, controller)):
        got = res["resume_" + cfg["id"]]
        for name in got["straight"]:
            np.testing.assert_array_equal(got["resumed"][name], got["straight"][name],
                                          err_msg=f"rank {r} {name}")
        assert got["syncs"][0] == got["syncs"][1]
        assert got["schedule"][0] == got["schedule"][1]
    # ranks differ mid-round, so the checkpoint held per-rank state that mattered
    assert job(n, controller)[0]["resume_" + cfg["id"]]["syncs"][0] >= 2


@pytest.mark.parametrize("n,controller", JOBS)
def test_frozen_parameter_is_not_synced(n, controller):
    ranks = job(n, controller)
    for res in ranks:
        assert res["frozen"]["bias_unchanged"]
        np.testing.assert_array_equal(res["frozen"]["weight"], ranks[0]["frozen"]["weight"])
        # only the 4x6 float64 weight (+ 3 control elements: joined, round number, explicit;
        # + the guard) travels
        assert res["frozen"]["synced_bytes_per_round"] == (24 + 3 + 1) * 8
