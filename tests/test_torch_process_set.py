"""process_set= confines syncs to a Horovod process set; broadcast_state copies everything."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from harness import run_horovod
from reference import simulate
from test_torch_optimizer import SGD, const


@functools.lru_cache(maxsize=None)
def job(controller):
    return run_horovod("torch_process_set", 3, controller, {})


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_process_set_pair_matches_two_worker_reference(controller):
    ranks = job(controller)
    ref = simulate(2, 30, inner=SGD, schedule=const(3))
    for r in (0, 1):
        for name, want in ref["params"][r].items():
            np.testing.assert_allclose(ranks[r]["pair_params"][name], want, rtol=1e-6)
        assert ranks[r]["pair_syncs"] == 10
    assert ranks[2]["outsider"].startswith("ValueError") and "process_set" in ranks[2]["outsider"]


def _flatten(sd):
    if isinstance(sd, dict):
        return {f"{k}.{kk}": vv for k, v in sd.items() for kk, vv in _flatten(v).items()} \
            if sd else {"": None}
    if isinstance(sd, (list, tuple)):
        return {f"{i}.{kk}": vv for i, v in enumerate(sd) for kk, vv in _flatten(v).items()}
    return {"": sd}


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_broadcast_state_copies_params_and_full_state(controller):
    ranks = job(controller)
    assert not np.array_equal(ranks[0]["before"]["weight"], ranks[1]["before"]["weight"])
    src = _flatten(ranks[1]["before_state"])
    for r in range(3):
        for name in ranks[1]["before"]:
            np.testing.assert_array_equal(ranks[r]["after"][name], ranks[1]["before"][name])
        got = _flatten(ranks[r]["after_state"])
        for key, v in src.items():
            if "seconds_into_round" in key or "sync_seconds" in key:
                continue
            if torch.is_tensor(v):
                assert torch.equal(got[key], v), key
            else:
                assert got[key] == v or (v != v and got[key] != got[key]), key
