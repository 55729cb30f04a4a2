"""Two-level averaging (``local_period``, ``local_process_set``) in the Keras front end, under real
horovodrun: 4 ranks in two groups [[0, 1], [2, 3]] (explicit process sets registered at
``hvd.init``), Gloo and MPI, float64 models, against the PyTorch front end running the same
configs (tests/workers/torch_local.py) and against the NumPy reference (tests/reference.py,
``simulate(..., groups=, local_period=)``) when it has two levels.

Configs (docs/SEMANTICS.md, "Two-level averaging"):
* plain SGD, 4 warm-up steps, then ``local_period=1``, ``period=4``: the group averages after
  every local step, all ranks every 4; the run ends mid-round (the two groups differ, the ranks
  of a group do not);
* SGD momentum + SlowMo, ``local_period=2``, ``period=4``, a different number of steps per rank
  and ``join`` (Keras: ``FinalSyncCallback``, the callbacks' epoch-end join; PyTorch: ``join()``):
  the two-level join loop, in which a joined rank follows its group's local rounds and the global
  rounds they call for;
* Adam with ``state_policy='average'``, ``local_period=2``, ``period=5``: local rounds that do
  not line up with the global ones (the global round resets the local count), Adam's m and v
  averaged at both levels; ends mid-round (every rank differs).
* SGD momentum, ``local_period=2``, ``period=4``, ``compression='int8'``: the global rounds
  send int8 deltas from the common point (by allgather over all ranks), the local rounds plain
  float64 averages within the group (docs/SEMANTICS.md, "Compressed syncs" with two levels).

Tolerance as in tests/test_frontends_agree.py (float64: ``1e-12`` of the tensor's scale; the
front ends evaluate the same formulas in different orders, measured ~1e-15) and
tests/test_keras_optimizer.py (the reference: ``rtol=1e-6``). One launch per front end and
controller, all configs in it (4 TF ranks on a 2-core machine: the launches dominate).

In-process tests (no horovodrun): argument validation (``TimeBudget`` refused, ``local_period``
checked, ``local_process_set`` without ``local_period`` refused) and, with one rank, the counters
in ``sync_stats()`` and their save / load with the optimizer's variables.
"""
from __future__ import annotations

import functools
import inspect

import numpy as np
import pytest

import fixtures
from harness import run_horovod
from reference import simulate

N = 4
GROUPS = [[0, 1], [2, 3]]
RTOL_TORCH = 1e-12  # float64 (tests/test_frontends_agree.py)
RTOL_REF = 1e-6  # tests/test_keras_optimizer.py

F32_09 = float(np.float32(0.9))  # what Keras makes of momentum=0.9
SGD = {"name": "sgd", "lr": 0.05}
SGD_M = {"name": "sgd", "lr": 0.05, "momentum": F32_09}
ADAM = {"name": "adam", "lr": 0.01, "betas": (0.875, 1.0 - 2.0 ** -10), "eps": 0.0}
const = lambda h: {"kind": "constant", "period": h}  # noqa: E731

# The join config last: a rank's exit shuts Horovod down on every rank, so each worker's last
# collective must be one every rank is in (a join's last global round), not a group's local round
# (the other group may be done and exiting; tests/workers/torch_local.py has no final barrier).
CONFIGS = [
    dict(id="two_level_sgd_L1_H4_warmup", inner=SGD, warmup_steps=4, schedule=const(4),
         local_period=1, steps=30),
    dict(id="two_level_adam_average_L2_H5", inner=ADAM, schedule=const(5),
         state_policy="average", local_period=2, steps=33),
    dict(id="two_level_int8_sgdm_L2_H4", inner=SGD_M, schedule=const(4), local_period=2,
         compression="int8", steps=30),
    dict(id="two_level_slowmo_L2_H4_uneven_join", inner=SGD_M, schedule=const(4),
         state_policy="reset", algorithm={"name": "slowmo", "alpha": 1.0, "beta": 0.7},
         local_period=2, steps=[23, 18, 21, 26], join=True),
]
CONFIGS = [dict(c, groups=GROUPS, dtype="float64") for c in CONFIGS]
CONTROLLERS = ["gloo", "mpi"]
MPI_ARGS = ("--mpi-args=--mca mpi_yield_when_idle 1",)

# the NumPy reference's two-level extension (being written): compared with once it is there
_REF_PARAMS = inspect.signature(simulate).parameters
HAS_REFERENCE = "local_period" in _REF_PARAMS and "groups" in _REF_PARAMS


def _extra(controller: str) -> tuple:
    return MPI_ARGS if controller == "mpi" else ()


@functools.lru_cache(maxsize=None)
def _launch(worker: str, controller: str):
    """One launch per worker and controller; a failed launch is remembered (its error is
    raised by every test that needs it, not relaunched by each)."""
    try:
        return tuple(run_horovod(worker, N, controller, CONFIGS, timeout=300,
                                 extra_args=_extra(controller)))
    except AssertionError as e:
        return e


def _job(worker: str, controller: str) -> tuple:
    out = _launch(worker, controller)
    if isinstance(out, AssertionError):
        raise out
    return out


def keras_job(controller: str) -> tuple:
    return _job("keras_local", controller)


def torch_job(controller: str) -> tuple:
    return _job("torch_local", controller)


def _scaled_diff(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def _assert_close(got: dict, want: dict, rtol: float, what: str) -> float:
    """Per tensor ``|got - want| <= rtol * |want| + rtol * max|want|``; returns the largest
    ``max|got - want| / max|want|``."""
    worst = 0.0
    for name in want:
        g, w = np.asarray(got[name], np.float64), np.asarray(want[name], np.float64)
        assert g.shape == w.shape, what
        d = _scaled_diff(g, w)
        worst = max(worst, d)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max(),
                                   err_msg=f"{what}: parameter {name}: max|diff| / max = {d:.3g}")
    return worst


def _steps(cfg: dict, rank: int) -> int:
    return cfg["steps"] if isinstance(cfg["steps"], int) else cfg["steps"][rank]


def _cases():
    return [pytest.param(c, cfg, id=f"{cfg['id']}-np{N}-{c}")
            for c in CONTROLLERS for cfg in CONFIGS]


@pytest.mark.parametrize("controller,cfg", _cases())
def test_keras_agrees_with_torch(controller, cfg):
    kj, tj = keras_job(controller), torch_job(controller)
    init = fixtures.init_params()
    keras_res = [kj[r][cfg["id"]] for r in range(N)]
    torch_res = [tj[r][cfg["id"]] for r in range(N)]
    worst = 0.0
    for r in range(N):
        k, t = keras_res[r], torch_res[r]
        # the same rounds of both levels happened
        for key in ("steps", "syncs", "local_steps", "local_syncs", "local_round_steps"):
            assert k["stats"][key] == t["stats"][key], f"rank {r}: stats[{key!r}]"
        assert k["stats"]["steps"] == _steps(cfg, r)
        if not cfg.get("join"):  # (the torch worker does not record join rounds either)
            assert k["sync_steps"] == t["sync_steps"], f"rank {r}: global round steps differ"
        # not vacuous: both levels ran, the local rounds sent bytes, the model moved
        assert k["stats"]["syncs"] >= 3 and k["stats"]["local_syncs"] > k["stats"]["syncs"]
        assert k["stats"]["local_bytes_sent"] > 0 and k["stats"]["bytes_sent"] > 0
        for name in init:
            assert np.abs(k["params"][name] - init[name]).max() > 1e-2, f"rank {r} {name}"
        worst = max(worst, _assert_close(k["params"], t["params"], RTOL_TORCH,
                                         f"{cfg['id']} {controller} rank {r} keras vs torch"))
    print(f"\n{cfg['id']} {controller}: max|keras - torch| / max|torch| = {worst:.3g}")


def _drift(res: list, a: int, b: int) -> float:
    return max(_scaled_diff(res[a]["params"][k], res[b]["params"][k]) for k in ("weight", "bias"))


@pytest.mark.parametrize("controller", CONTROLLERS)
def test_groups_and_levels(controller):
    """Where each run ends: the ranks of a group equal after a local round, the groups apart
    until a global round; every rank equal after the join."""
    kj = keras_job(controller)
    res = {cfg["id"]: [kj[r][cfg["id"]] for r in range(N)] for cfg in CONFIGS}
    sgd = res["two_level_sgd_L1_H4_warmup"]  # 4 + 26 steps: a local round after each local
    assert _drift(sgd, 0, 1) == 0.0 and _drift(sgd, 2, 3) == 0.0  # step, a global one every 4
    assert _drift(sgd, 0, 2) > 1e-6
    assert [r["stats"]["local_syncs"] for r in sgd] == [26] * N
    assert [r["stats"]["syncs"] for r in sgd] == [6] * N
    assert [r["stats"]["warmup_steps_done"] for r in sgd] == [4] * N
    assert all(r["stats"]["local_steps"] == 2 and r["stats"]["local_round_steps"] == 0
               for r in sgd)
    joined = res["two_level_slowmo_L2_H4_uneven_join"]
    for r in range(1, N):
        assert _drift(joined, 0, r) == 0.0, f"rank {r} differs from rank 0 after the join"
    assert len({r["stats"]["syncs"] for r in joined}) == 1  # every rank in every global round
    for g in GROUPS:
        assert len({joined[r]["stats"]["local_syncs"] for r in g}) == 1
    adam = res["two_level_adam_average_L2_H5"]  # step 33: one step after a local round
    assert all(_drift(adam, a, b) > 1e-9 for a in range(N) for b in range(a + 1, N))
    # H=5, L=2: locals at 2, 4, 5 (with the global), 7, 9, 10, ... -> 3 per 5 steps + 32
    assert [r["stats"]["syncs"] for r in adam] == [6] * N
    assert [r["stats"]["local_syncs"] for r in adam] == [19] * N
    assert all(r["stats"]["local_steps"] == 3 and r["stats"]["local_round_steps"] == 1
               for r in adam)


@pytest.mark.skipif(not HAS_REFERENCE, reason="tests/reference.py has no two-level "
                    "simulate(..., groups=, local_period=) yet")
@pytest.mark.parametrize("controller,cfg", _cases())
def test_keras_matches_reference(controller, cfg):
    kj = keras_job(controller)
    kw = {k: cfg[k] for k in ("warmup_steps", "state_policy", "algorithm", "join",
                              "compression") if k in cfg}
    ref = simulate(N, cfg["steps"], inner=cfg["inner"], schedule=cfg["schedule"],
                   groups=cfg["groups"], local_period=cfg["local_period"], **kw)
    worst = 0.0
    for r in range(N):
        got = kj[r][cfg["id"]]
        worst = max(worst, _assert_close(got["params"], ref["params"][r], RTOL_REF,
                                         f"{cfg['id']} {controller} rank {r} keras vs reference"))
        assert got["stats"]["syncs"] == ref["syncs"]
    if cfg.get("compression"):  # not vacuous: the same run without compression differs
        kw.pop("compression")
        plain = simulate(N, cfg["steps"], inner=cfg["inner"], schedule=cfg["schedule"],
                         groups=cfg["groups"], local_period=cfg["local_period"], **kw)
        assert max(_scaled_diff(plain["params"][0][k], ref["params"][0][k])
                   for k in ref["params"][0]) > 1e-6
    print(f"\n{cfg['id']} {controller}: max|keras - reference| / max|reference| = {worst:.3g}")


# ---- in one process ---------------------------------------------------------------------------
def test_arguments_are_checked():
    import keras

    import horovod_local as hl
    from horovod_local.tensorflow.keras import DistributedLocalOptimizer

    def make(**kw):
        return DistributedLocalOptimizer(keras.optimizers.SGD(0.1), **kw)

    with pytest.raises(ValueError, match="local_period does not work with a TimeBudget"):
        make(period=hl.TimeBudget(1.0), local_period=2)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="local_period must be an integer"):
            make(period=4, local_period=bad)
    with pytest.raises(ValueError, match="local_process_set is only used with local_period"):
        make(period=4, local_process_set=object())
    opt = make(period=8, local_period=2)
    assert opt.get_config()["local_period"] == 2
    assert DistributedLocalOptimizer.from_config(opt.get_config())._hl_config.local_period == 2
    assert make(period=8).get_config()["local_period"] is None


def test_one_rank_counters_and_save_load(tmp_path):
    """One rank (its host's only one: the group is the process set itself, no process set
    added): L=2, H=5 over 12 steps -> locals at 2, 4, 5, 7, 9, 10, 12, globals at 5, 10;
    the counters survive model.save / load_model."""
    import horovod.tensorflow as hvd
    import keras

    from horovod_local.tensorflow.keras import DistributedLocalOptimizer

    hvd.init()
    assert hvd.size() == 1
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    opt = DistributedLocalOptimizer(keras.optimizers.SGD(0.05), period=5, local_period=2)
    model.compile(optimizer=opt, loss="mse", jit_compile=False)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(96, 6)), rng.normal(size=(96, 4))
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    st = opt.sync_stats()
    assert (st.steps, st.syncs, st.local_syncs, st.local_steps, st.local_round_steps) == \
        (12, 2, 7, 2, 0)
    assert st.local_bytes_sent > 0 and opt.groups == [[0]]
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    lst = loaded.optimizer.sync_stats()
    assert (lst.local_syncs, lst.local_bytes_sent, lst.local_round_steps) == \
        (st.local_syncs, st.local_bytes_sent, st.local_round_steps)
    assert loaded.optimizer._hl_config.local_period == 2
