"""Two-level averaging (n = 4 in two groups) and overlapped rounds (n = 2, 3) under real
horovodrun (Gloo and MPI), against the NumPy reference (tests/reference.py), which was written
from docs/SEMANTICS.md alone. One launch per (n, controller) runs every config."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from harness import run_horovod
from reference import simulate
from test_torch_optimizer import ADAALTER, ADAM, SGD, SGD_M, const

GROUPS = [[0, 1], [2, 3]]
ADPSGD = {"kind": "adaptive", "initial_period": 2, "sampling_steps": 12, "lower": 0.7,
          "upper": 1.3, "min_period": 1, "max_period": 8}
INCREASING = {"kind": "increasing", "initial_period": 2, "factor": 2, "rounds_per_stage": 2,
              "max_period": 8}
TWO_LEVEL = [
    dict(id="tl_sgd_L1_H4", inner=SGD, schedule=const(4), local_period=1, steps=30),
    dict(id="tl_slowmo_L2_H4", inner=SGD_M, schedule=const(4), local_period=2, steps=30,
         algorithm={"name": "slowmo", "alpha": 1.0, "beta": 0.5}),
    dict(id="tl_adam_average_L2_H6", inner=ADAM, schedule=const(6), local_period=2, steps=30,
         state_policy="average"),
    # L does not divide H: local rounds every 4 steps since the last round of either level
    dict(id="tl_outer_L4_H6", inner=SGD_M, schedule=const(6), local_period=4, steps=31,
         algorithm={"name": "outer_sgd", "lr": 0.7, "momentum": 0.9, "nesterov": True}),
    dict(id="tl_adpsgd_L1", inner=SGD_M, schedule=ADPSGD, local_period=1, steps=40),
    dict(id="tl_adaalter_L2_H4_warmup", inner=ADAALTER, warmup_steps=4, schedule=const(4),
         local_period=2, steps=30),
    dict(id="tl_increasing_reset_L1", inner=SGD_M, schedule=INCREASING, local_period=1,
         state_policy="reset", steps=33),
    dict(id="tl_join_uneven", inner=SGD_M, schedule=const(4), local_period=2,
         steps=[20, 27, 23, 17], join=True),
    # the inter-host level compressed (local rounds plain) and overlapped
    dict(id="tl_int8_L1_H4", inner=SGD_M, schedule=const(4), local_period=1, steps=30,
         compression="int8"),
    dict(id="tl_overlap_L1_H4", inner=SGD_M, schedule=const(4), local_period=1, steps=30,
         overlap=True),
    dict(id="tl_overlap_int8_slowmo_L2_H4", inner=SGD_M, schedule=const(4), local_period=2,
         steps=30, overlap=True, compression="int8",
         algorithm={"name": "slowmo", "alpha": 1.0, "beta": 0.5}),
    dict(id="tl_overlap_join_uneven", inner=SGD_M, schedule=const(4), local_period=1,
         steps=[20, 27, 23, 17], join=True, overlap=True),
]
OVERLAP = [
    dict(id="ov_sgd_H4", inner=SGD, schedule=const(4), steps=30, final_sync=True),
    dict(id="ov_momentum_average_H4", inner=SGD_M, schedule=const(4), steps=30,
         state_policy="average", final_sync=True),
    dict(id="ov_adam_reset_H3", inner=ADAM, schedule=const(3), steps=31, state_policy="reset",
         final_sync=True),
    dict(id="ov_slowmo_H5", inner=SGD_M, schedule=const(5), steps=32, final_sync=True,
         algorithm={"name": "slowmo", "alpha": 0.8, "beta": 0.6}),
    dict(id="ov_outer_nesterov_H4", inner=ADAM, schedule=const(4), steps=30, final_sync=True,
         algorithm={"name": "outer_sgd", "lr": 0.7, "momentum": 0.9, "nesterov": True}),
    dict(id="ov_adpsgd", inner=SGD_M, schedule=ADPSGD, steps=44, final_sync=True),
    dict(id="ov_increasing_warmup", inner=SGD_M, warmup_steps=5, schedule=INCREASING, steps=40,
         final_sync=True),
    # a checkpoint taken at step 10 with the round started at step 8 in flight
    dict(id="ov_resume_mid_flight", inner=SGD_M, schedule=const(4), steps=22, final_sync=True,
         state_policy="average", resume_at=10),
    dict(id="ov_slowmo_resume", inner=SGD_M, schedule=const(3), steps=20, final_sync=True,
         algorithm={"name": "slowmo", "alpha": 1.0, "beta": 0.5}, resume_at=7),
]
OVERLAP_UNEVEN = dict(id="ov_join_uneven", inner=SGD_M, schedule=const(4), join=True)
# compressed syncs (and with overlap); fp16 sums may round in another order than the
# reference's rank order (to float16's rounding), int8 exchanges are exact
COMPRESSED = [
    dict(id="fp16_H4", inner=SGD_M, schedule=const(4), steps=30, compression="fp16",
         final_sync=True),
    dict(id="int8_H4", inner=SGD_M, schedule=const(4), steps=30, compression="int8",
         final_sync=True),
    dict(id="int8_slowmo_reset", inner=SGD_M, schedule=const(5), steps=30, compression="int8",
         final_sync=True, state_policy="reset",
         algorithm={"name": "slowmo", "alpha": 1.0, "beta": 0.5}),
    dict(id="fp16_outer_adam", inner=ADAM, schedule=const(5), steps=30, compression="fp16",
         final_sync=True, algorithm={"name": "outer_sgd", "lr": 0.7, "momentum": 0.9,
                                     "nesterov": True}),
    dict(id="int8_adpsgd_warmup", inner=SGD_M, warmup_steps=4, schedule=ADPSGD, steps=44,
         compression="int8", final_sync=True),
    dict(id="fp16_overlap", inner=SGD_M, schedule=const(4), steps=30, compression="fp16",
         overlap=True, final_sync=True),
    dict(id="int8_overlap", inner=SGD_M, schedule=const(4), steps=30, compression="int8",
         overlap=True, final_sync=True),
    dict(id="int8_overlap_slowmo", inner=SGD_M, schedule=const(4), steps=30,
         compression="int8", overlap=True, final_sync=True,
         algorithm={"name": "slowmo", "alpha": 1.0, "beta": 0.5}),
    dict(id="fp16_overlap_resume", inner=SGD_M, schedule=const(4), steps=22, compression="fp16",
         overlap=True, final_sync=True, resume_at=10),
    dict(id="int8_resume", inner=SGD_M, schedule=const(4), steps=22, compression="int8",
         final_sync=True, resume_at=9),
]
COMPRESSED_UNEVEN = dict(id="int8_join_uneven", inner=SGD_M, schedule=const(4), join=True,
                         compression="int8")


# heterogeneous ranks on a time budget, overlapped: the reference replays the recorded rounds
OVERLAP_BUDGET = dict(id="ov_time_budget_join", inner=SGD_M, join=True,
                      schedule={"kind": "time_budget", "seconds": 0.03})


def _overlap_payload(n: int) -> list[dict]:
    return [dict(c, overlap=True) for c in OVERLAP] + \
        [dict(OVERLAP_UNEVEN, overlap=True, steps=[25 + 6 * r for r in range(n)])] + \
        [dict(OVERLAP_BUDGET, overlap=True, steps=[40 - 8 * r for r in range(n)],
              sleep_per_step=[0.001 * (1 + 3 * r) for r in range(n)])] + \
        COMPRESSED + [dict(COMPRESSED_UNEVEN, steps=[20 + 5 * r for r in range(n)])]


@functools.lru_cache(maxsize=None)
def two_level_job(controller: str) -> tuple:
    return tuple(run_horovod("torch_local", 4, controller,
                             [dict(c, groups=GROUPS) for c in TWO_LEVEL]))


@functools.lru_cache(maxsize=None)
def overlap_job(n: int, controller: str) -> tuple:
    return tuple(run_horovod("torch_local", n, controller, _overlap_payload(n)))


def _reference(cfg: dict, n: int) -> dict:
    kw = {k: cfg[k] for k in ("warmup_steps", "state_policy", "algorithm", "final_sync",
                              "join", "local_period", "groups", "overlap", "compression")
          if k in cfg}
    return simulate(n, cfg["steps"], inner=cfg["inner"], schedule=cfg["schedule"], **kw)


def _close(got: dict, want: dict, what: str, rtol: float = 1e-9) -> None:
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=1e-12,
                                   err_msg=f"{what}: parameter {name}")


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
@pytest.mark.parametrize("cfg", TWO_LEVEL, ids=[c["id"] for c in TWO_LEVEL])
def test_two_level_matches_reference(controller, cfg):
    cfg = dict(cfg, groups=GROUPS)
    ranks = two_level_job(controller)
    ref = _reference(cfg, 4)
    for r in range(4):
        got = ranks[r][cfg["id"]]
        _close(got["params"], ref["params"][r], f"{cfg['id']} rank {r}")
        assert got["stats"]["syncs"] == ref["syncs_per_rank"][r]
        assert got["stats"]["local_syncs"] == ref["local_syncs"][r]
    assert ref["syncs"] >= 1 and min(ref["local_syncs"]) > ref["syncs"]
    # not vacuous: between global rounds the groups differ, within a group ranks agree
    if not cfg.get("join"):
        last = ranks[0][cfg["id"]]["stats"]["local_round_steps"]
        if last == 0 and ref["sync_steps"][-1] != cfg["steps"]:  # ended on a local round
            np.testing.assert_array_equal(ranks[0][cfg["id"]]["params"]["bias"],
                                          ranks[1][cfg["id"]]["params"]["bias"])
            assert not np.array_equal(ranks[0][cfg["id"]]["params"]["bias"],
                                      ranks[2][cfg["id"]]["params"]["bias"])


def test_two_level_is_not_flat():
    """Local rounds change the result (against the same run without them)."""
    cfg = dict(TWO_LEVEL[0], groups=GROUPS)
    flat = {k: v for k, v in cfg.items() if k not in ("local_period", "groups")}
    a, b = _reference(cfg, 4)["params"][0], _reference(flat, 4)["params"][0]
    assert np.abs(a["weight"] - b["weight"]).max() > 1e-4


@pytest.mark.parametrize("n,controller", [(2, "gloo"), (2, "mpi"), (3, "gloo"), (3, "mpi")])
@pytest.mark.parametrize("cfg_id", [c["id"] for c in OVERLAP] + [OVERLAP_UNEVEN["id"]])
def test_overlap_matches_reference(n, controller, cfg_id):
    cfg = next(c for c in _overlap_payload(n) if c["id"] == cfg_id)
    ranks = overlap_job(n, controller)
    ref = _reference(cfg, n)
    for r in range(n):
        got = ranks[r][cfg_id]
        _close(got["params"], ref["params"][r], f"{cfg_id} rank {r}")
        assert got["stats"]["syncs"] == ref["syncs_per_rank"][r]
    # every run ends with a completing blocking round: identical replicas
    for r in range(1, n):
        np.testing.assert_array_equal(ranks[r][cfg_id]["params"]["weight"],
                                      ranks[0][cfg_id]["params"]["weight"])
    blocking = simulate(n, cfg["steps"], inner=cfg["inner"], schedule=cfg["schedule"],
                        **{k: cfg[k] for k in ("warmup_steps", "state_policy", "algorithm",
                                               "final_sync", "join") if k in cfg})
    assert np.abs(blocking["params"][0]["weight"] - ref["params"][0]["weight"]).max() > 1e-6, \
        "overlap made no difference: the test would be vacuous"


@pytest.mark.parametrize("n,controller", [(2, "gloo"), (2, "mpi"), (3, "gloo"), (3, "mpi")])
@pytest.mark.parametrize("cfg_id", [c["id"] for c in COMPRESSED] + [COMPRESSED_UNEVEN["id"]])
def test_compressed_matches_reference(n, controller, cfg_id):
    cfg = next(c for c in _overlap_payload(n) if c["id"] == cfg_id)
    ranks = overlap_job(n, controller)
    ref = _reference(cfg, n)
    fp16 = cfg["compression"] == "fp16"
    # a float16 sum of 2 values is the same in any order (exact comparison); with 3 ranks
    # Horovod may add in another order than the reference: each round may then differ by a
    # float16 rounding of the summed delta (|delta| < 0.5 here: 2**-12 a round), which error
    # feedback does not see
    atol = 2 ** -12 * ref["syncs"] if fp16 and n > 2 else 1e-12
    for r in range(n):
        got = ranks[r][cfg_id]
        for name in ref["params"][r]:
            np.testing.assert_allclose(got["params"][name], ref["params"][r][name],
                                       rtol=1e-9, atol=atol,
                                       err_msg=f"{cfg_id} rank {r}: parameter {name}")
        assert got["stats"]["syncs"] == ref["syncs_per_rank"][r]
    # what travels: 2 bytes an element (fp16), 1 + scales (int8), not 8 (float64 model)
    numel = sum(v.size for v in ref["params"][0].values())
    st = ranks[0][cfg_id]["stats"]
    if not cfg.get("warmup_steps"):  # (warm-up gradient rounds travel uncompressed)
        per_round = st["bytes_sent"] / st["syncs"]
        assert per_round < (2 * numel + 16 if fp16 else numel + 64), per_round
    plain = simulate(n, cfg["steps"], inner=cfg["inner"], schedule=cfg["schedule"],
                     **{k: cfg[k] for k in ("warmup_steps", "state_policy", "algorithm",
                                            "final_sync", "join", "overlap") if k in cfg})
    assert np.abs(plain["params"][0]["weight"] - ref["params"][0]["weight"]).max() > 1e-9, \
        "compression made no difference: the test would be vacuous"


@pytest.mark.parametrize("n,controller", [(2, "gloo"), (3, "mpi")])
@pytest.mark.parametrize("cfg_id", ["ov_resume_mid_flight", "ov_slowmo_resume",
                                    "fp16_overlap_resume", "int8_resume"])
def test_overlap_resume_mid_flight_is_bit_identical(n, controller, cfg_id):
    ranks = overlap_job(n, controller)
    for r in range(n):
        got = ranks[r][cfg_id]
        for name, want in got["params"].items():
            np.testing.assert_array_equal(got["resumed_params"][name], want)
        assert got["resumed_stats"]["syncs"] == got["stats"]["syncs"]


def test_overlap_and_two_level_refusals():
    import horovod_local as hl
    from horovod_local.core.config import SyncConfig

    args = (8, 0, "keep", "local_sgd", 1.0, 0.5)
    with pytest.raises(ValueError, match="LocalAdaAlter"):
        SyncConfig.from_arguments(*args, adaalter=True, overlap=True)
    with pytest.raises(ValueError, match="nonfinite='skip'"):
        SyncConfig.from_arguments(*args, nonfinite="skip", overlap=True)
    with pytest.raises(ValueError, match="state_policy='average'"):
        SyncConfig.from_arguments(8, 0, "average", "local_sgd", 1.0, 0.5, compression="int8")
    with pytest.raises(ValueError, match="LocalAdaAlter"):
        SyncConfig.from_arguments(*args, adaalter=True, compression="fp16")
    with pytest.raises(ValueError, match="compression must be"):
        SyncConfig.from_arguments(*args, compression="int4")
    from horovod_local.torch.optimizer import _compression_mode
    with pytest.raises(ValueError, match="bfloat16"):
        _compression_mode("bf16")
    assert _compression_mode(None) is None and _compression_mode("fp16") == "fp16"
    with pytest.raises(ValueError, match="overlap must be"):
        SyncConfig.from_arguments(*args, overlap=1)
    with pytest.raises(ValueError, match="TimeBudget"):
        SyncConfig.from_arguments(hl.TimeBudget(1.0), *args[1:], local_period=2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="local_period"):
            SyncConfig.from_arguments(*args, local_period=bad)
    assert math.isfinite(SyncConfig.from_arguments(*args, local_period=3).local_period)


@pytest.mark.parametrize("n,controller", [(2, "gloo"), (3, "mpi")])
def test_overlap_time_budget_replays_in_reference(n, controller):
    """TimeBudget with overlap: ranks take different numbers of steps per round; the reference
    replaying each rank's recorded round lengths (overlapped) gives the same models."""
    ranks = overlap_job(n, controller)
    got = [ranks[r]["ov_time_budget_join"] for r in range(n)]
    assert len({g["stats"]["syncs"] for g in got}) == 1 and got[0]["stats"]["syncs"] >= 2
    ref = simulate(n, [40 - 8 * r for r in range(n)], inner=SGD_M, schedule={"kind": "rounds"},
                   rounds=[g["boundaries"] for g in got], overlap=True, join=True)
    for r in range(n):
        _close(got[r]["params"], ref["params"][r], f"time budget, overlap, rank {r}")
        np.testing.assert_array_equal(got[r]["params"]["weight"], got[0]["params"]["weight"])
