"""Drop-in fidelity of the PyTorch wrapper under real horovodrun (n = 2, 3; Gloo and MPI): AMP
with overflows on one rank, Horovod's clipping idiom and arguments, lazily created optimizer
state, bf16 / 0-dim / empty parameters, checkpoints of other configurations, a one-rank
average_parameters(), hvd.broadcast_optimizer_state. Numbers are checked against the NumPy
reference (tests/reference.py: ``skip_steps``, ``no_grad``), against Horovod's own
DistributedOptimizer, or against an exact computation in the test. One launch per
(n, controller) runs every scenario (tests/workers/torch_dropin.py)."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from harness import run_horovod
from reference import simulate

SGD = {"name": "sgd", "lr": 0.05}
SGD_M = {"name": "sgd", "lr": 0.05, "momentum": 0.9}
ADAM = {"name": "adam", "lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8}
const = lambda h: {"kind": "constant", "period": h}  # noqa: E731


def _scenarios(n: int) -> list[dict]:
    last = n - 1
    return [
        dict(id="amp_local", scenario="amp", inner=SGD_M, schedule=const(4), steps=20,
             inject={last: [7]}),
        dict(id="amp_warmup", scenario="amp", inner=SGD, warmup_steps=6, schedule=const(3),
             steps=20, inject={0: [3]}),
        # scale 2**10: overflow halves it, gradients are unscaled exactly (powers of two)
        dict(id="amp_horovod_idiom", scenario="amp", inner=SGD_M, warmup_steps=6,
             schedule=const(3), steps=20, inject={0: [3], last: [11]}, idiom="horovod",
             init_scale=1024.0),
        dict(id="clip_warmup_ours", scenario="clip", kind="ours", inner=SGD, warmup_steps=30,
             schedule=const(math.inf), steps=30, max_norm=0.05),
        dict(id="clip_warmup_horovod", scenario="clip", kind="baseline", inner=SGD, steps=30,
             max_norm=0.05),
        dict(id="clip_local_idiom", scenario="clip", kind="ours", inner=SGD_M, schedule=const(4),
             steps=14, max_norm=0.05, record_at=14),
        dict(id="clip_local_plain", scenario="clip", kind="plain", inner=SGD_M, schedule=const(4),
             steps=14, max_norm=0.05, record_at=14),
        dict(id="horovod_arguments", scenario="horovod_arguments"),
        dict(id="backward_passes", scenario="backward_passes"),
        dict(id="sparse_warmup", scenario="sparse_warmup"),
        dict(id="lazy_state_momentum", scenario="lazy_state", inner=SGD_M, schedule=const(4),
             state_policy="average", steps=22, no_grad={1: ["bias"]}),
        dict(id="lazy_state_adam", scenario="lazy_state", inner=ADAM, schedule=const(3),
             state_policy="average", steps=19, no_grad={last: ["weight"]}),
        dict(id="dtypes", scenario="dtypes"),
        dict(id="dtype_matrix", scenario="dtype_matrix"),
        dict(id="checkpoints", scenario="checkpoints"),
        dict(id="broadcast_state", scenario="broadcast_state", inner=SGD_M, schedule=const(4)),
        # last: it leaves the ranks with an error (the same on every rank)
        dict(id="one_rank_average", scenario="one_rank_average", inner=SGD, schedule=const(4)),
    ]


JOBS = [(2, "gloo"), (2, "mpi"), (3, "gloo"), (3, "mpi")]
MPI_ARGS = ("--mpi-args=--mca mpi_yield_when_idle 1",)  # 3 MPI ranks on 2 cores: speed only


@functools.lru_cache(maxsize=None)
def job(n: int, controller: str) -> tuple:
    extra = MPI_ARGS if controller == "mpi" else ()
    # a hang (the bug this file guards against) ends as a timeout, not a stuck suite
    return tuple(run_horovod("torch_dropin", n, controller, _scenarios(n), timeout=240,
                             extra_args=extra))


def _cfg(n: int, cid: str) -> dict:
    return next(c for c in _scenarios(n) if c["id"] == cid)


def _reference(n: int, cfg: dict, **kw) -> dict:
    keys = ("warmup_steps", "state_policy")
    return simulate(n, cfg["steps"], inner=cfg["inner"], schedule=cfg["schedule"],
                    **{k: cfg[k] for k in keys if k in cfg}, **kw)


def _close(got: dict, want: dict, what: str, rtol: float = 1e-10) -> None:
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=1e-13,
                                   err_msg=f"{what}: {name}")


CASES = [pytest.param(n, c, id=f"np{n}-{c}") for n, c in JOBS]


@pytest.mark.parametrize("n,controller", CASES)
@pytest.mark.parametrize("cid", ["amp_local", "amp_warmup", "amp_horovod_idiom"])
def test_amp_overflow_on_one_rank_matches_reference(n, controller, cid):
    """GradScaler skips the overflowing rank's step without a hang: the step counts on every
    rank, local phase: only that rank skips; warm-up: no rank steps (SEMANTICS.md)."""
    cfg = _cfg(n, cid)
    skips = {r: list(ts) for r, ts in cfg["inject"].items()}
    want = _reference(n, cfg, skip_steps=skips)
    for r, res in enumerate(job(n, controller)):
        got = res[cid]
        assert got["steps"] == cfg["steps"]
        _close(got["params"], want["params"][r], f"{cid} rank {r}")
        # each rank's scaler halves its scale once per overflow it saw: its own in the local
        # phase; in warm-up its own (plain recipe: checked before the average) or everyone's
        # (Horovod's recipe: unscale_ after synchronize() sees the averaged Inf)
        seen = sum(1 for rr, ts in skips.items() for t in ts
                   if rr == r or (t <= cfg.get("warmup_steps", 0) and cfg.get("idiom")))
        assert got["scales"][-1] == cfg.get("init_scale", 1.0) * 0.5 ** seen, got["scales"]
    # not vacuous: a run without the skips differs
    plain = _reference(n, cfg)
    assert max(np.abs(plain["params"][0][k] - want["params"][0][k]).max()
               for k in plain["params"][0]) > 1e-6


@pytest.mark.parametrize("n,controller", CASES)
def test_clipping_idiom_in_warmup_equals_horovod(n, controller):
    """Horovod's idiom verbatim (synchronize, clip_grad_norm_, skip_synchronize, step) during
    warm-up gives what it gives with Horovod's DistributedOptimizer."""
    res = job(n, controller)
    for r in range(n):
        _close(res[r]["clip_warmup_ours"]["params"], res[r]["clip_warmup_horovod"]["params"],
               f"rank {r}", rtol=1e-12)
    # the clipping was active: unclipped synchronous SGD ends elsewhere
    sync = simulate(n, 30, inner=SGD, warmup_steps=30, schedule=const(math.inf))
    assert max(np.abs(sync["params"][0][k] - res[0]["clip_warmup_ours"]["params"][k]).max()
               for k in sync["params"][0]) > 1e-4


@pytest.mark.parametrize("n,controller", CASES)
def test_synchronize_in_local_steps_is_not_a_parameter_sync(n, controller):
    """After warm-up, synchronize() / skip_synchronize() change nothing: bit-identical to a
    plain clip + step, and ranks still differ mid-round."""
    res = job(n, controller)
    for r in range(n):
        for k, v in res[r]["clip_local_plain"]["params"].items():
            np.testing.assert_array_equal(res[r]["clip_local_idiom"]["params"][k], v)
    assert not np.allclose(res[0]["clip_local_idiom"]["record"]["weight"],
                           res[1]["clip_local_idiom"]["record"]["weight"])


@pytest.mark.parametrize("n,controller", CASES[:1])
def test_horovod_arguments_work_or_say_why(n, controller):
    got = job(n, controller)[0]["horovod_arguments"]
    for ok in ("compression_none", "compression_fp16", "op_average", "bpps_2", "predivide_1",
               "groups", "sparse_as_dense"):
        assert got[ok] == "no error", (ok, got[ok])
    assert got["compression_fp16_mode"] == "fp16"  # Horovod's fp16 compressor: fp16 syncs
    for bad, needle in [("compression_bf16", "cannot carry bfloat16"),
                        ("op_sum", "only hvd.Average applies"),
                        ("op_adasum", "only hvd.Average applies"),
                        ("bpps_0", "backward_passes_per_step"),
                        ("predivide_2", "gradient_predivide_factor"),
                        ("period_none", "period=None: pass period=math.inf"),
                        ("outer_class", "got the class SGD"),
                        ("wrap_horovod", "is a horovod.torch.DistributedOptimizer"),
                        ("wrap_twice", "already a DistributedLocalOptimizer"),
                        ("unnamed", "position 2 (shape (3, 2))"),
                        ("unbroadcast_slowmo", "SlowMo (the slow model x0)"),
                        ("unbroadcast_int8", "hvd.broadcast_parameters")]:
        assert got[bad].startswith("ValueError") and needle in got[bad], (bad, got[bad])
    assert any("no effect without algorithm='slowmo'" in w
               for w in got["slowmo_lr_without_slowmo"])


@pytest.mark.parametrize("n,controller", CASES[:2])
def test_backward_passes_per_step_accumulates_into_one_step(n, controller):
    for res in job(n, controller):
        _close(res["backward_passes"]["two_passes"], res["backward_passes"]["summed_loss"],
               "two backward passes vs the summed loss", rtol=1e-14)


@pytest.mark.parametrize("n,controller", CASES)
def test_sparse_as_dense_in_warmup(n, controller):
    res = job(n, controller)
    for r in range(n):
        assert res[r]["sparse_warmup"][True]["error"] == "no error"
        err = res[r]["sparse_warmup"][False]["error"]
        assert err.startswith("ValueError") and "sparse_as_dense=True" in err, err
        np.testing.assert_array_equal(res[r]["sparse_warmup"][True]["weight"],
                                      res[0]["sparse_warmup"][True]["weight"])


@pytest.mark.parametrize("n,controller", CASES)
@pytest.mark.parametrize("cid", ["lazy_state_momentum", "lazy_state_adam"])
def test_state_missing_on_some_ranks_is_created_as_zeros(n, controller, cid):
    """state_policy='average' with a parameter without a gradient on one rank: no Horovod shape
    error; the state missing there is created as zeros and averaged (reference ``no_grad``)."""
    cfg = _cfg(n, cid)
    want = _reference(n, cfg, no_grad=cfg["no_grad"])
    key = "momentum_buffer" if cfg["inner"]["name"] == "sgd" else "exp_avg"
    for r, res in enumerate(job(n, controller)):
        got = res[cid]
        assert got["syncs"] >= 4
        _close(got["params"], want["params"][r], f"{cid} rank {r}")
        ref_state = want["opt_state"][r][key]
        for name, arr in ref_state.items():
            np.testing.assert_allclose(got["state"][name][key], arr, rtol=1e-10, atol=1e-13,
                                       err_msg=f"{cid} rank {r} {key} of {name}")


@pytest.mark.parametrize("n,controller", CASES)
def test_bf16_zero_dim_and_empty_parameters(n, controller):
    res = job(n, controller)
    for r in range(n):
        got = res[r]["dtypes"]
        assert got["bf16_error"] == "no error", got["bf16_error"]
        assert got["odd_error"] == "no error", got["odd_error"]
        for k, pre in got["bf16_pre"].items():
            # the buffer travels as float32 (exact for these bf16 values; the sum of n of them
            # too), the sum comes back rounded to bfloat16 (as a bfloat16 allreduce's would),
            # then times float32(1/n), rounded once more (the kernels' arithmetic)
            s = torch.tensor(pre, dtype=torch.float32).sum(0).to(torch.bfloat16).float()
            want = (s * torch.tensor(1.0 / n, dtype=torch.float32)).to(torch.bfloat16).float()
            np.testing.assert_array_equal(got["bf16_post"][k], want.numpy(), err_msg=k)
        for k in ("scale", "w"):  # averaged moments: the same on every rank after the sync
            for s in ("exp_avg", "exp_avg_sq"):
                np.testing.assert_array_equal(got["odd_state"][k][s],
                                              res[0]["dtypes"]["odd_state"][k][s])
            np.testing.assert_array_equal(got["odd_params"][k], res[0]["dtypes"]["odd_params"][k])
    assert not np.array_equal(res[0]["dtypes"]["bf16_pre"]["weight"][0],
                              res[0]["dtypes"]["bf16_pre"]["weight"][1])  # ranks differed


@pytest.mark.parametrize("n,controller", CASES)
def test_mixed_dtypes_in_every_algorithm_and_policy(n, controller):
    """bfloat16, float16, 0-dim and empty parameters with SlowMo / DiLoCo / local SGD, SGD
    momentum / Adam / Local AdaAlter, keep / reset / average: no error, one model at the end."""
    res = job(n, controller)
    assert len(res[0]["dtype_matrix"]) == 24
    for r in range(n):
        for key, got in res[r]["dtype_matrix"].items():
            assert got["error"] == "no error", (key, got["error"])
            for name, v in got["params"].items():
                np.testing.assert_array_equal(v, res[0]["dtype_matrix"][key]["params"][name],
                                              err_msg=f"{key} {name}")
                assert np.isfinite(v).all(), (key, name)


@pytest.mark.parametrize("n,controller", CASES[:1])
def test_checkpoint_of_another_configuration_is_refused_naming_the_difference(n, controller):
    got = job(n, controller)[0]["checkpoints"]
    assert got["same"] == "no error"
    for name, needle in [("diloco_into_slowmo", "algorithm: checkpoint 'outer'"),
                         ("slowmo_into_diloco", "algorithm: checkpoint 'slowmo'"),
                         ("constant_into_adaptive", "schedule: checkpoint")]:
        assert got[name].startswith("ValueError") and needle in got[name], (name, got[name])


@pytest.mark.parametrize("n,controller", CASES)
def test_broadcast_optimizer_state_takes_no_wrapper_step(n, controller):
    for res in job(n, controller):
        got = res["broadcast_state"]
        assert (got["steps"], got["local_steps"], got["syncs"]) == (0, 0, 0), got
        assert got["has_state"] and got["params_unchanged"], got


@pytest.mark.parametrize("n,controller", CASES)
def test_one_rank_average_parameters_is_named_not_absorbed(n, controller):
    for r, res in enumerate(job(n, controller)):
        err = res["one_rank_average"]["error"]
        assert err.startswith("RuntimeError") and "different kinds of sync rounds" in err, \
            (r, err)
