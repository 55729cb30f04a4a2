"""Keras 3 DistributedLocalOptimizer under real horovodrun (model.fit, float64) against the
independent NumPy n-worker reference (tests/reference.py).

Apples-to-apples notes:
* Keras casts Python-float hyper-parameters with ``ops.cast(x, dtype)``, which goes through
  float32 even for float64 variables (SGD's momentum 0.9 becomes float32(0.9)); the configs
  below use float32-representable values so that Keras and the reference use the same numbers.
* Keras Adam puts epsilon outside the bias correction (``sqrt(v) + eps`` vs torch's
  ``sqrt(v) / sqrt(1 - beta2**t) + eps``): with ``eps = 0`` the two are the same formula, so the
  Adam configs use ``eps = 0`` (the gradients of the linear model are never exactly zero).
* Keras SGD momentum (``v = m v - lr g; w += v``) and Nesterov (``w += m v - lr g``) equal
  torch's for a constant lr, so the DiLoCo outer optimizer (SGD, Nesterov) is compared as is;
  configs with a changing lr (lr schedule, lr warm-up callback) use plain SGD.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest

import fixtures
import reference
from harness import run_horovod
from reference import simulate

F32_09 = float(np.float32(0.9))  # what Keras makes of momentum=0.9
SGD = {"name": "sgd", "lr": 0.05}
SGD_M = {"name": "sgd", "lr": 0.05, "momentum": F32_09}
ADAM = {"name": "adam", "lr": 0.01, "betas": (0.875, 1.0 - 2.0 ** -10), "eps": 0.0}
ADAALTER = {"name": "adaalter", "lr": 0.3, "eps": 1.0, "initial_accumulator_value": 1.0,
            "lr_warmup_steps": 10}
const = lambda h: {"kind": "constant", "period": h}  # noqa: E731
ADPSGD = {"kind": "adaptive", "initial_period": 2, "sampling_steps": 20, "lower": 0.7,
          "upper": 1.3, "min_period": 1, "max_period": 10}

# compared with the reference on every job
CONFIGS = [
    dict(id="local_sgd_H4", inner=SGD, schedule=const(4), steps=60),
    dict(id="local_sgd_H1", inner=SGD, schedule=const(1), steps=50),
    dict(id="warmup_then_H5_momentum", inner=SGD_M, warmup_steps=12, schedule=const(5), steps=62),
    dict(id="increasing", inner=SGD, schedule={"kind": "increasing", "initial_period": 2,
         "factor": 2, "rounds_per_stage": 3, "max_period": 16}, steps=70),
    # momentum 0.5: the period moves both ways for n = 2 and n = 3 (not vacuous)
    dict(id="adpsgd", inner={**SGD, "momentum": 0.5}, schedule=ADPSGD, steps=90),
    dict(id="state_reset_momentum", inner=SGD_M, schedule=const(4), state_policy="reset", steps=52),
    dict(id="state_average_momentum", inner=SGD_M, schedule=const(4), state_policy="average",
         steps=52),
    dict(id="state_average_adam", inner=ADAM, schedule=const(3), state_policy="average", steps=51),
    dict(id="state_reset_adam", inner=ADAM, schedule=const(3), state_policy="reset", steps=51),
    dict(id="adaalter_H4", inner=ADAALTER, schedule=const(4), steps=60),
    dict(id="adaalter_warmup_H3", inner=ADAALTER, warmup_steps=6, schedule=const(3), steps=54),
    dict(id="slowmo", inner=SGD_M, schedule=const(6), state_policy="reset",
         algorithm={"name": "slowmo", "alpha": 1.0, "beta": 0.7}, steps=60),
    dict(id="slowmo_lr_schedule", inner={**SGD, "lr_schedule": fixtures.step_decay},
         schedule=const(5), algorithm={"name": "slowmo", "alpha": 0.8, "beta": 0.5}, steps=60),
    dict(id="diloco_outer_nesterov", inner=ADAM, schedule=const(5),
         algorithm={"name": "outer_sgd", "lr": 0.7, "momentum": F32_09, "nesterov": True},
         steps=60),
    dict(id="ctl_H4_average_final_sync", kind="ctl", inner=SGD_M, schedule=const(4),
         state_policy="average", steps=50, final_sync=True),
]
# H=1 local SGD must equal synchronous data-parallel SGD: every step a warm-up step.
SYNC_SGD = dict(id="sync_sgd_all_warmup", inner=SGD, warmup_steps=50, schedule=const(math.inf),
                steps=50)
# plain SGD: with a changing lr (the warm-up), Keras' momentum (lr inside the velocity) is not
# torch's (lr outside the buffer), which the reference implements
CALLBACKS = dict(id="callbacks", kind="callbacks", inner=SGD, schedule=const(4),
                 steps_per_epoch=11, epochs=2, lr_warmup_batches=8)
# Exact resume: stopped after `steps` (between two syncs), model.save, keras.models.load_model,
# `more_steps` more; bit-identical to one uninterrupted run. One per algorithm / state policy.
SAVE_LOAD = dict(id="save_load", kind="save_load", inner=ADAM, schedule=ADPSGD,
                 algorithm={"name": "outer_sgd", "lr": 0.7, "momentum": F32_09,
                            "nesterov": True}, outer_factory=True, steps=13, more_steps=9)
RESUME = [
    SAVE_LOAD,
    dict(id="resume_keep_momentum", kind="save_load", inner=SGD_M, schedule=const(4), steps=13,
         more_steps=11),
    dict(id="resume_reset_adam", kind="save_load", inner=ADAM, schedule=const(3),
         state_policy="reset", steps=14, more_steps=10),
    dict(id="resume_average_momentum_warmup", kind="save_load", inner=SGD_M, warmup_steps=5,
         schedule=const(4), state_policy="average", steps=11, more_steps=11),
    dict(id="resume_adaalter", kind="save_load", inner=ADAALTER, schedule=const(4), steps=14,
         more_steps=10),
    dict(id="resume_slowmo", kind="save_load", inner=SGD_M, schedule=const(5),
         state_policy="average", algorithm={"name": "slowmo", "alpha": 1.0, "beta": 0.7},
         steps=12, more_steps=12),
    dict(id="resume_adpsgd", kind="save_load", inner={**SGD, "momentum": 0.5},
         schedule={**ADPSGD, "sampling_steps": 8, "max_period": 6}, steps=23, more_steps=15),
]
RELIABILITY = dict(id="reliability", kind="reliability",
                   mismatches=["shape", "path", "dtype", "period", "warmup_steps", "state_policy",
                               "inner", "outer", "ctl"])
TIME_BUDGET = dict(id="time_budget_join", kind="time_budget", inner=SGD,
                   schedule={"kind": "time_budget", "seconds": 0.03}, steps=40)
# A different number of batches per rank in every epoch (rank r: batches[r]), validation data,
# the three collective callbacks (and a user collective at epoch end): no hang, one join per
# epoch, identical replicas after every epoch (tests/workers/keras_local.py, run_uneven).
UNEVEN = dict(id="uneven_epochs", kind="uneven", inner=SGD, schedule=const(4),
              batches=[10, 13, 11], epochs=2, val_first=101, val_batches=2)

# (n, controller) -> configs. Each job is one horovodrun (one TF start-up) running its list;
# (2, gloo) runs everything, the other two a cross-section (time on a 2-core machine).
FULL = CONFIGS + [SYNC_SGD, CALLBACKS, RELIABILITY] + RESUME + [UNEVEN]


def _pick(*ids):
    return [c for c in CONFIGS + [SYNC_SGD, CALLBACKS, TIME_BUDGET, RELIABILITY] + RESUME
            + [UNEVEN] if c["id"] in ids]


JOBS = {
    (2, "gloo"): FULL,
    (2, "mpi"): _pick("local_sgd_H4", "local_sgd_H1", "warmup_then_H5_momentum", "adpsgd",
                      "state_average_adam", "adaalter_warmup_H3", "diloco_outer_nesterov",
                      "ctl_H4_average_final_sync", "sync_sgd_all_warmup", "time_budget_join",
                      "resume_reset_adam"),
    (3, "gloo"): _pick("local_sgd_H4", "increasing", "adpsgd", "state_reset_momentum",
                       "state_average_adam", "adaalter_H4", "slowmo", "diloco_outer_nesterov",
                       "callbacks", "reliability", "resume_adaalter", "resume_slowmo"),
    (3, "mpi"): _pick("uneven_epochs"),  # small: one fit per variant
}
TIMEOUT = {(3, "mpi"): 300}  # a hang fails the job after this many seconds (default 600)


def _payload(n: int, controller: str) -> list[dict]:
    out = []
    for c in JOBS[(n, controller)]:
        if c["id"] == "time_budget_join":
            c = dict(c, sleep_per_step=[0.002 * (1 + 4 * r) for r in range(n)])
        out.append(c)
    return out


@functools.lru_cache(maxsize=None)
def job(n: int, controller: str) -> tuple:
    return tuple(run_horovod("keras_local", n, controller, _payload(n, controller),
                             timeout=TIMEOUT.get((n, controller), 600)))


def _reference(cfg: dict, n: int) -> dict:
    kw = {k: cfg[k] for k in ("warmup_steps", "state_policy", "algorithm", "final_sync")
          if k in cfg}
    return simulate(n, cfg["steps"], inner=cfg["inner"], schedule=cfg["schedule"], **kw)


def _per_epoch_reference(monkeypatch, n: int, epochs: int, steps: list, inner: dict,
                         schedule: dict, continuous_data: bool) -> list:
    """The reference for ``model.fit`` with a join at every epoch's end: one ``simulate(...,
    join=True)`` per epoch, each starting from the previous epoch's joined model (patched in
    as the fixtures' initial parameters). Rank r takes ``steps[r]`` steps per epoch, on its
    batches 1.. again each epoch, or (``continuous_data``) continuing where the last epoch
    stopped, with ``inner["lr_schedule"]`` continuing too. Returns one result per epoch."""
    make_batch, start, out = reference.fixtures.make_batch, fixtures.init_params(), []
    for e in range(epochs):
        off = [e * s if continuous_data else 0 for s in steps]
        monkeypatch.setattr(reference.fixtures, "init_params",
                            lambda p=start: {k: v.copy() for k, v in p.items()})
        monkeypatch.setattr(reference.fixtures, "make_batch",
                            lambda r, t, off=off: make_batch(r, t + off[r]))
        spec = dict(inner)
        if "lr_schedule" in inner:
            spec["lr_schedule"] = lambda t, f=inner["lr_schedule"], o=off[0]: f(t + o)
        out.append(simulate(n, list(steps), inner=spec, schedule=schedule, join=True))
        start = out[-1]["params"][0]
    monkeypatch.undo()
    return out


def _assert_params_close(got: dict, want: dict, what: str) -> None:
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-12,
                                   err_msg=f"{what}: parameter {name}")


def _cases(ids=None):
    out = []
    for (n, c), cfgs in JOBS.items():
        for cfg in cfgs:
            if (ids is None and cfg in CONFIGS) or (ids is not None and cfg["id"] in ids):
                out.append(pytest.param(n, c, cfg, id=f"{cfg['id']}-np{n}-{c}"))
    return out


@pytest.mark.parametrize("n,controller,cfg", _cases())
def test_matches_reference(n, controller, cfg):
    ranks = job(n, controller)
    ref = _reference(cfg, n)
    for r in range(n):
        got = ranks[r][cfg["id"]]
        _assert_params_close(got["params"], ref["params"][r], f"{cfg['id']} rank {r}")
        assert got["stats"]["syncs"] == ref["syncs"]
        assert got["sync_steps"] == ref["sync_steps"][: len(got["sync_steps"])]
    assert ref["syncs"] >= 1


@pytest.mark.parametrize("n,controller", [k for k, v in JOBS.items()
                                          if any(c["id"] == "adpsgd" for c in v)])
def test_adpsgd_period_trajectory(n, controller):
    cfg = next(c for c in CONFIGS if c["id"] == "adpsgd")
    ref = _reference(cfg, n)
    for r in range(n):
        got = job(n, controller)[r]["adpsgd"]
        assert got["periods"] == ref["periods"]
        assert got["schedule_state"]["c2"] == pytest.approx(ref["C2"], rel=1e-9)
        assert got["schedule_state"]["period"] == ref["period"]
        assert got["stats"]["last_deviation"] == pytest.approx(ref["S"][-1], rel=1e-6)
    assert len(set(ref["periods"])) > 1, "the period never changed: the test would be vacuous"


@pytest.mark.parametrize("n,controller", [(2, "gloo"), (2, "mpi")])
def test_h1_equals_synchronous_sgd(n, controller):
    ranks = job(n, controller)
    ref = _reference(SYNC_SGD, n)
    for r in range(n):
        _assert_params_close(ranks[r]["sync_sgd_all_warmup"]["params"], ref["params"][r],
                             f"all-warm-up vs reference, rank {r}")
        _assert_params_close(ranks[r]["local_sgd_H1"]["params"],
                             ranks[r]["sync_sgd_all_warmup"]["params"],
                             f"H=1 vs sync SGD, rank {r}")
        st = ranks[r]["sync_sgd_all_warmup"]["stats"]
        assert st["warmup_steps_done"] == 50 and st["syncs"] == 0
        # gradients + 3 control elements (round kind, round number, explicit), float64
        assert st["bytes_sent"] == 50 * ((4 * 6 + 4) + 3) * 8


def test_bytes_and_traffic_ratio():
    got = job(2, "gloo")[0]["local_sgd_H4"]["stats"]
    param_bytes = (4 * 6 + 4) * 8
    control = 3 * 8  # round kind / joined, round number, explicit round (float64)
    assert got["bytes_sent"] == 15 * (param_bytes + control)
    assert got["bytes_per_step_allreduce"] == 60 * param_bytes
    assert got["communication_ratio"] == pytest.approx(15 * (224 + control) / (60 * 224))


@pytest.mark.parametrize("n,controller", [k for k in JOBS if any(c["id"] == "callbacks"
                                                                  for c in JOBS[k])])
def test_callbacks(n, controller, monkeypatch):
    cfg = CALLBACKS
    ranks = [job(n, controller)[r]["callbacks"] for r in range(n)]
    init = fixtures.init_params()
    # broadcast at train begin: every rank holds rank 0's (unperturbed) start
    for r in range(n):
        for k in init:
            np.testing.assert_array_equal(ranks[r]["begin"][k], init[k])
    # a join at every epoch's end (the last batch's end: Keras knows the batches): identical
    # models on every rank, equal to the reference joining at each epoch's end
    spe, steps = cfg["steps_per_epoch"], cfg["steps_per_epoch"] * cfg["epochs"]
    N, lr = cfg["lr_warmup_batches"], cfg["inner"]["lr"]
    mult = lambda b: (1.0 / n * ((b + 1) * (n - 1) / N + 1.0)) if b < N else 1.0  # noqa: E731
    refs = _per_epoch_reference(monkeypatch, n, cfg["epochs"], [spe] * n,
                                {**cfg["inner"], "lr_schedule": mult}, cfg["schedule"],
                                continuous_data=True)
    for r in range(n):
        for k in init:
            np.testing.assert_array_equal(ranks[r]["params"][k], ranks[0]["params"][k])
        _assert_params_close(ranks[r]["params"], refs[-1]["params"][r], f"callbacks rank {r}")
        # Horovod's warm-up formula, batch by batch, then the full lr
        np.testing.assert_allclose(ranks[r]["lrs"], [lr * mult(b) for b in range(steps)],
                                   rtol=1e-12)
    per_epoch = [ref["syncs"] for ref in refs]
    assert per_epoch == [spe // 4 + 1] * cfg["epochs"]  # scheduled rounds + the epoch's join
    assert ranks[0]["stats"]["syncs"] == sum(per_epoch)  # no train-end join: none needed
    # metric averaging: the logs after MetricAverageCallback are the mean of the ranks' logs
    for e in range(cfg["epochs"]):
        for key in ("loss", "mae"):
            raw = [ranks[r]["raw"][e][key] for r in range(n)]
            assert len(set(raw)) == n, "per-rank metrics should differ (different data)"
            for r in range(n):
                assert ranks[r]["avg"][e][key] == pytest.approx(np.mean(raw), rel=1e-12)
                assert ranks[r]["history"][key][e] == pytest.approx(np.mean(raw), rel=1e-12)
        assert ranks[0]["history"]["hl_syncs"][e] == sum(per_epoch[: e + 1])


def _uneven_cases():
    return [pytest.param(n, c, id=f"np{n}-{c}") for (n, c), cfgs in JOBS.items()
            if UNEVEN in cfgs]


@pytest.mark.parametrize("n,controller", _uneven_cases())
def test_uneven_batches_per_rank_join_every_epoch(n, controller, monkeypatch):
    """model.fit with a different number of batches per rank in every epoch, validation data,
    BroadcastGlobalVariablesCallback / FinalSyncCallback / MetricAverageCallback and a user
    callback allreducing at epoch end (listed first): the job ends (no hang: job() fails after
    its timeout), one join per epoch, every rank holds the same model after each epoch, equal
    to the reference joining at each epoch's end; validation measures the joined model."""
    cfg = UNEVEN
    got = [job(n, controller)[r]["uneven_epochs"] for r in range(n)]
    steps = [cfg["batches"][r % len(cfg["batches"])] for r in range(n)]
    assert len(set(steps)) > 1, "the batches per rank must differ (else the test is vacuous)"
    refs = _per_epoch_reference(monkeypatch, n, cfg["epochs"], steps, cfg["inner"],
                                cfg["schedule"], continuous_data=False)
    H = cfg["schedule"]["period"]
    per_epoch = [ref["syncs"] for ref in refs]
    # the scheduled rounds of the rank with the most batches, and the round everyone joins
    assert per_epoch == [max(steps) // H + 1] * cfg["epochs"]
    syncs_after = list(np.cumsum(per_epoch))
    val = [_val_data(r, cfg["val_first"], cfg["val_batches"]) for r in range(n)]
    for variant in ("known", "unknown"):
        for r in range(n):
            g = got[r][variant]
            what = f"{variant} rank {r}"
            assert g["batches"] == steps[r]
            assert g["stats"]["steps"] == steps[r] * cfg["epochs"], what
            assert g["stats"]["syncs"] == syncs_after[-1], what  # no train-end join needed
            assert g["epoch_syncs"] == syncs_after, what
            for e in range(cfg["epochs"]):
                for k in g["epoch_params"][e]:  # identical replicas after every epoch's join
                    np.testing.assert_array_equal(g["epoch_params"][e][k],
                                                  got[0][variant]["epoch_params"][e][k])
                _assert_params_close(g["epoch_params"][e], refs[e]["params"][r],
                                     f"{what} epoch {e}")
            for k in g["params"]:
                np.testing.assert_array_equal(g["params"][k], got[0][variant]["params"][k])
                # both ways of joining (last batch / validation / on_epoch_end) agree
                np.testing.assert_allclose(g["params"][k], got[r]["known"]["params"][k],
                                           rtol=1e-12)
            # validation ran on the joined model: val_loss = the loss of the epoch's model
            for e, logs in enumerate(g["raw"]):
                if "val_loss" in logs:
                    loss, _ = fixtures.loss_and_grads(g["epoch_params"][e], *val[r])
                    assert logs["val_loss"] == pytest.approx(loss, rel=1e-9), what
            assert sum("val_loss" in logs for logs in g["raw"]) == \
                (cfg["epochs"] if variant == "known" else cfg["epochs"] // 2)
        # averaged metrics (training and validation) are the mean of the ranks' own
        for e in range(cfg["epochs"]):
            for key in got[0][variant]["raw"][e]:
                raw = [got[r][variant]["raw"][e][key] for r in range(n)]
                for r in range(n):
                    assert got[r][variant]["avg"][e][key] == pytest.approx(np.mean(raw),
                                                                           rel=1e-12)
    # the user's own epoch-end allreduce, listed before ours, met on every rank
    for r in range(n):
        assert got[r]["known"]["user"] == [n * (n + 1) / 2] * cfg["epochs"]
    # not vacuous: training moved the weights, and the ranks' own data pulled them apart
    # before each join (the reference's deviation at the joins)
    init = fixtures.init_params()
    assert not np.allclose(got[0]["known"]["params"]["weight"], init["weight"])
    assert all(ref["S"][-1] > 0 for ref in refs)


def _val_data(rank: int, first: int, count: int) -> tuple:
    xs, ys = zip(*(fixtures.make_batch(rank, t) for t in range(first, first + count)))
    return np.concatenate(xs), np.concatenate(ys)


def _resume_cases():
    return [pytest.param(n, c, cfg, id=f"{cfg['id']}-np{n}-{c}")
            for (n, c), cfgs in JOBS.items() for cfg in cfgs if cfg in RESUME]


@pytest.mark.parametrize("n,controller,cfg", _resume_cases())
def test_save_load_resume_mid_round_is_bit_identical(n, controller, cfg):
    same = ("steps", "syncs", "period", "local_steps", "bytes_sent", "skipped_rounds")
    for r in range(n):
        got = job(n, controller)[r][cfg["id"]]
        assert got["type"] == "DistributedLocalOptimizer"
        assert got["config_equal"]
        assert got["n_vars"][0] == got["n_vars"][1]
        for a, b in zip(got["opt_vars"], got["loaded_opt_vars"]):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(got["weights"], got["loaded_weights"]):
            np.testing.assert_array_equal(a, b)
        assert {k: got["stats"][k] for k in same} == {k: got["loaded_stats"][k] for k in same}
        # stopped between two syncs, after at least one: ranks differed in the checkpoint
        assert got["stats"]["local_steps"] > 0 and got["stats"]["syncs"] >= 1
        # the loaded model (and the stopped original) go on exactly as the uninterrupted run
        for name in got["straight"]:
            np.testing.assert_array_equal(got["loaded_continued"][name], got["straight"][name],
                                          err_msg=f"{cfg['id']} rank {r} {name}: resumed")
            np.testing.assert_array_equal(got["continued"][name], got["straight"][name],
                                          err_msg=f"{cfg['id']} rank {r} {name}: continued")
        a, b = got["continued_stats"]
        assert {k: a[k] for k in same} == {k: b[k] for k in same}
        assert {k: got["straight_stats"][k] for k in same} == {k: b[k] for k in same}
        assert got["schedules"][0] == got["schedules"][1]
        assert b["syncs"] >= 2
    first = job(n, controller)[0][cfg["id"]]
    if cfg["id"] == "save_load":
        assert first["inner_type"] == "Adam"


def _reliability_cases():
    return [pytest.param(n, c, id=f"np{n}-{c}") for (n, c), cfgs in JOBS.items()
            if RELIABILITY in cfgs]


@pytest.mark.parametrize("n,controller", _reliability_cases())
@pytest.mark.parametrize("what,needle", [
    ("shape", "variable 'sequential/linear/kernel': rank 0 has ((6, 4), 'float64'), rank 1 has "
              "((6, 3), 'float64')"),
    ("path", "rank 1 has variable 'sequential/linear2/kernel'"),
    ("dtype", "variable 'sequential/linear/kernel': rank 0 has ((6, 4), 'float64'), rank 1 has "
              "((6, 4), 'float32')"),
    ("period", "config 'schedule'"),
    ("warmup_steps", "config 'warmup_steps': rank 0 has 0, rank 1 has 2"),
    ("state_policy", "config 'state_policy': rank 0 has 'keep', rank 1 has 'average'"),
    ("inner", "config 'inner optimizer': rank 0 has 'SGD', rank 1 has 'Adam'"),
    ("outer", "config 'outer optimizer'"),
    ("ctl", "'period': 5"),
])
def test_mismatched_replicas_fail_on_every_rank(n, controller, what, needle):
    """Ranks built differently: a ValueError on every rank naming the first difference, when
    the first train step is traced (model.fit, or a custom loop), or in the broadcast callback."""
    for r, res in enumerate(job(n, controller)):
        err = res["reliability"]["mismatch_" + what]
        # (tf.function prefixes the message of an error raised while tracing with the user code)
        assert err.startswith("ValueError: "), f"rank {r}: {err}"
        assert "horovod_local: ranks disagree" in err and needle in err, f"rank {r}: {err}"
    if what in ("period", "ctl"):
        assert "'period': 5" in err


@pytest.mark.parametrize("n,controller", _reliability_cases())
def test_nan_raises_on_every_rank_naming_step_and_tensor(n, controller):
    for r, res in enumerate(job(n, controller)):
        got = res["reliability"]
        err = got["nan_sync"]["error"]
        assert err.startswith("InvalidArgumentError"), f"rank {r}: {err}"
        assert "non-finite values (NaN/Inf) in the sync at step 8: the sum over ranks of " \
               "sequential/linear/kernel contains NaN/Inf" in err, err
        if r != 1:  # the healthy ranks never received the NaN: nothing was written back
            for v in got["nan_sync"]["params"].values():
                assert np.isfinite(v).all()
        err = got["nan_warmup"]["error"]
        assert "in the warm-up gradient allreduce at step 3: the sum over ranks of gradient of " \
               "sequential/linear/kernel" in err, f"rank {r}: {err}"


@pytest.mark.parametrize("n,controller", _reliability_cases())
def test_nonfinite_skip_restores_last_good_average_and_continues(n, controller):
    ranks = [job(n, controller)[r]["reliability"] for r in range(n)]
    for r, got in enumerate(ranks):
        for key in ("skip_sync", "skip_warmup"):
            run = got[key]
            assert run["error"] == "no error", run["error"]
            assert run["stats"]["skipped_rounds"] == 1 and run["stats"]["syncs"] == 2
            assert any("Skipping this" in w for w in run["warnings"]), run["warnings"]
            for name, v in run["params"].items():  # synced at step 12: one finite model
                assert np.isfinite(v).all()
                np.testing.assert_array_equal(v, ranks[0][key]["params"][name])
        sync, warm = got["skip_sync"], got["skip_warmup"]
        assert any("in the sync at step 8: the sum over ranks of sequential/linear/kernel" in w
                   for w in sync["warnings"]), sync["warnings"]
        for name in sync["params"]:
            # the round at step 8 was dropped: every rank is back at the average of step 4
            np.testing.assert_array_equal(sync["seen"][8][name], sync["seen"][4][name])
            # no rank took warm-up step 2
            np.testing.assert_array_equal(warm["seen"][2][name], warm["seen"][1][name])


@pytest.mark.parametrize("n,controller", _reliability_cases())
def test_different_start_fails_on_every_rank(n, controller):
    """Compression's common point c and SlowMo's x0 are taken from each rank's variables: ranks
    that were not broadcast fail at the first sync round, on every rank, naming the ranks and
    the fix (before, each kept its own model silently); a lazily built model broadcast after
    the first batch by the callback (its anchors with it) trains on to one model."""
    ranks = [job(n, controller)[r]["reliability"] for r in range(n)]
    others = ", ".join(str(r) for r in range(1, n))
    for r, got in enumerate(ranks):
        for key, user in (("start_int8", "compression (the common point c)"),
                          ("start_lazy_slowmo", "SlowMo (the slow model x0)")):
            err = got[key]["error"]
            assert err.startswith("InvalidArgumentError"), f"rank {r} {key}: {err}"
            assert (f"the variables differ between ranks at the first sync round (rank(s) "
                    f"[{others}] vs the first), but {user} starts from them") in err, err
            assert "BroadcastGlobalVariablesCallback(0)" in err, err
        ok = got["start_lazy_slowmo_broadcast"]
        assert ok["error"] == "no error", f"rank {r}: {ok['error']}"
        for name, v in ok["params"].items():
            np.testing.assert_array_equal(v, ranks[0]["start_lazy_slowmo_broadcast"]["params"][name])


@pytest.mark.parametrize("n,controller", _reliability_cases())
def test_average_parameters_alone_fails_on_every_rank(n, controller):
    """Some ranks call average_parameters() while rank 1 is in its scheduled sync: the round
    carries the explicit-round flag, so every rank fails naming it (not a silent average)."""
    for r, res in enumerate(job(n, controller)):
        err = res["reliability"]["average_parameters_alone"]
        assert err.startswith("InvalidArgumentError"), f"rank {r}: {err}"
        assert "some called average_parameters() while others are in a scheduled round" in err, \
            f"rank {r}: {err}"


def test_time_budget_rounds_and_join():
    """Ranks with different step times take different numbers of local steps per round; the
    final join (FinalSyncCallback) drains the rounds; the reference replays the rounds."""
    n = 2
    got = [job(n, "mpi")[r]["time_budget_join"] for r in range(n)]
    assert len({g["stats"]["syncs"] for g in got}) == 1
    assert got[0]["stats"]["syncs"] >= 2
    ref = simulate(n, [TIME_BUDGET["steps"]] * n, inner=TIME_BUDGET["inner"],
                   schedule={"kind": "rounds"}, rounds=[g["rounds"] for g in got], join=True)
    for r in range(n):
        _assert_params_close(got[r]["params"], ref["params"][r], f"time budget rank {r}")
        _assert_params_close(got[r]["params"], got[0]["params"], "ranks differ after join")


def test_ctl_traced_once():
    got = job(2, "gloo")[0]["ctl_H4_average_final_sync"]
    assert got["traces"] == 1  # the sync lives inside the one compiled step

