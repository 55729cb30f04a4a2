"""Compressed syncs (``compression='fp16' | 'int8'``) in the Keras front end, under real
horovodrun (Gloo and MPI, n = 2 and 3, float64 models), against the NumPy reference
(tests/reference.py, ``simulate(..., compression=)``, written from docs/SEMANTICS.md alone) and
against the PyTorch front end running the same configs (tests/workers/torch_local.py).

Configs (docs/SEMANTICS.md, "Compressed syncs"): fp16 and int8 with local SGD (SGD momentum),
SlowMo (+ ``state_policy='reset'``), an outer optimizer (DiLoCo: Adam inside, Nesterov SGD
outside), ADPSGD after warm-up, and a different number of steps per rank with the epoch-end
join (``FinalSyncCallback``); an exact resume through ``model.save`` / ``load_model`` with the
residuals saved (n = 2). One launch per (n, controller) per front end runs every config; the
n = 2 launches also run the probe behind ``overlap=True``'s refusal (docs/KERAS.md,
"Overlapped rounds").

Tolerances. int8: the exchange is an allgather, dequantised and averaged in rank order on every
rank: the same arithmetic as the reference and the PyTorch kernels (``rtol=1e-9``; measured
exact or float64 rounding). fp16 with n = 2: a float16 sum of two values is the same in any
order (as int8). fp16 with n = 3: Horovod's ring adds an element's three float16 values in an
order that depends on where the element sits in the buffer, not in the reference's rank order;
each round's mean delta may then differ by a float16 rounding of the summed delta (|delta| <
0.5 here: ``2**-12`` a round), which error feedback does not see
(tests/test_torch_rounds.py::test_compressed_matches_reference). Keras against PyTorch:
``1e-12`` of the tensor's scale (tests/test_frontends_agree.py), except fp16 with n = 3: Keras'
kernel is the transpose of torch's weight, so an element sits elsewhere in the buffer and its
float16 values are added in another order (then the reference's tolerance).

In-process tests: the refusals (shared with PyTorch through ``SyncConfig`` and
``_compression_mode``), ``overlap=True`` refused with the reason, ``get_config``, and a
one-rank run whose residuals and anchors survive ``model.save`` / ``load_model``.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from harness import run_horovod
from reference import simulate

F32_09 = float(np.float32(0.9))  # what Keras makes of momentum=0.9
SGD_M = {"name": "sgd", "lr": 0.05, "momentum": F32_09}
ADAM = {"name": "adam", "lr": 0.01, "betas": (0.875, 1.0 - 2.0 ** -10), "eps": 0.0}
const = lambda h: {"kind": "constant", "period": h}  # noqa: E731
ADPSGD = {"kind": "adaptive", "initial_period": 2, "sampling_steps": 12, "lower": 0.7,
          "upper": 1.3, "min_period": 1, "max_period": 8}
SLOWMO = {"name": "slowmo", "alpha": 1.0, "beta": 0.5}
OUTER = {"name": "outer_sgd", "lr": 0.7, "momentum": F32_09, "nesterov": True}

CONFIGS = [
    dict(id="fp16_sgdm_H4", inner=SGD_M, schedule=const(4), steps=30, compression="fp16",
         final_sync=True),
    dict(id="int8_sgdm_H4", inner=SGD_M, schedule=const(4), steps=30, compression="int8",
         final_sync=True),
    dict(id="int8_slowmo_reset_H5", inner=SGD_M, schedule=const(5), steps=30,
         compression="int8", state_policy="reset", algorithm=SLOWMO, final_sync=True),
    dict(id="fp16_outer_adam_H5", inner=ADAM, schedule=const(5), steps=30, compression="fp16",
         algorithm=OUTER, final_sync=True),
    dict(id="int8_adpsgd_warmup", inner=SGD_M, warmup_steps=4, schedule=ADPSGD, steps=44,
         compression="int8", final_sync=True),
]
# per-rank steps (n entries) are filled in per job; the join is the callbacks' epoch-end one
UNEVEN = [
    dict(id="int8_join_uneven", inner=SGD_M, schedule=const(4), compression="int8", join=True),
    dict(id="fp16_slowmo_join_uneven", inner=SGD_M, schedule=const(3), compression="fp16",
         algorithm=SLOWMO, join=True),
]
# an exact resume: stopped between two syncs, model.save, load_model, trained on (anchors c,
# SlowMo's momenta and the residuals e saved with the optimizer)
SAVE_LOAD = [
    dict(id="int8_slowmo_save_load", kind="save_load", inner=SGD_M, schedule=const(3),
         steps=10, more_steps=8, compression="int8", algorithm=SLOWMO),
]
JOBS = [(2, "gloo"), (2, "mpi"), (3, "gloo")]  # (3, "mpi"): covered by the PyTorch rounds test (CI time)
# the PyTorch front end on the same configs: one job (n = 3: the float16 sums of three)
TORCH_JOBS = [(3, "gloo")]
MPI_ARGS = ("--mpi-args=--mca mpi_yield_when_idle 1",)


def _uneven(n: int) -> list[dict]:
    return [dict(c, steps=[19 + 4 * r for r in range(n)][::-1 if i % 2 else 1])
            for i, c in enumerate(UNEVEN)]


# Why overlap=True is refused in Keras (docs/KERAS.md, "Overlapped rounds"): rank 1 enters each
# collective DELAY seconds late; rank 0 times four ways of keeping it in flight (n = 2 jobs)
DELAY = 1.0
PROBE = dict(id="overlap_probe", kind="overlap_probe", delay=DELAY)


def _payload(n: int, keras: bool = True) -> list[dict]:
    # the join configs last: a rank's exit must follow a collective every rank is in
    extra = SAVE_LOAD + [PROBE] if keras and n == 2 else []  # (per-rank logic: n = 2 shows it)
    return CONFIGS + extra + _uneven(n)


def _cfg(n: int, cfg_id: str) -> dict:
    return next(c for c in _payload(n) if c["id"] == cfg_id)


@functools.lru_cache(maxsize=None)
def _launch(worker: str, n: int, controller: str):
    """One launch per worker, n and controller; a failed launch is remembered (its error is
    raised by every test that needs it, not relaunched by each)."""
    try:
        return tuple(run_horovod(worker, n, controller,
                                 _payload(n, keras=worker == "keras_local"),
                                 timeout=300, extra_args=MPI_ARGS if controller == "mpi" else ()))
    except AssertionError as e:
        return e


def _job(worker: str, n: int, controller: str) -> tuple:
    out = _launch(worker, n, controller)
    if isinstance(out, AssertionError):
        raise out
    return out


def _reference(cfg: dict, n: int, **override) -> dict:
    kw = {k: cfg[k] for k in ("warmup_steps", "state_policy", "algorithm", "final_sync",
                              "join", "compression") if k in cfg}
    kw.update(override)
    return simulate(n, cfg["steps"], inner=cfg["inner"], schedule=cfg["schedule"], **kw)


def _scaled_diff(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def _ref_atol(cfg: dict, n: int, ref: dict) -> float:
    if cfg["compression"] == "fp16" and n > 2:
        return 2 ** -12 * max(ref["syncs_per_rank"])
    return 1e-12


FIT_IDS = [c["id"] for c in CONFIGS] + [c["id"] for c in UNEVEN]


@pytest.mark.parametrize("n,controller", JOBS)
@pytest.mark.parametrize("cfg_id", FIT_IDS)
def test_keras_compressed_matches_reference(n, controller, cfg_id):
    cfg = _cfg(n, cfg_id)
    ranks = _job("keras_local", n, controller)
    ref = _reference(cfg, n)
    atol = _ref_atol(cfg, n, ref)
    worst = 0.0
    for r in range(n):
        got = ranks[r][cfg_id]
        for name, want in ref["params"][r].items():
            worst = max(worst, _scaled_diff(got["params"][name], want))
            np.testing.assert_allclose(got["params"][name], want, rtol=1e-9, atol=atol,
                                       err_msg=f"{cfg_id} n={n} {controller} rank {r}: {name}")
        assert got["stats"]["syncs"] == ref["syncs_per_rank"][r], f"rank {r}: syncs"
        steps = cfg["steps"] if isinstance(cfg["steps"], int) else cfg["steps"][r]
        assert got["stats"]["steps"] == steps
    # every run ends with a blocking round (average_parameters or the join): one model
    for r in range(1, n):
        for name in ref["params"][0]:
            np.testing.assert_array_equal(ranks[r][cfg_id]["params"][name],
                                          ranks[0][cfg_id]["params"][name])
    # what travels: 2 bytes an element (fp16) or 1 + the scales (int8), not 8 (float64 model)
    numel = sum(v.size for v in ref["params"][0].values())
    st = ranks[0][cfg_id]["stats"]
    if not cfg.get("warmup_steps"):  # (warm-up gradient rounds travel uncompressed)
        per_round = st["bytes_sent"] / st["syncs"]
        if cfg["compression"] == "fp16":
            assert per_round == 2 * (numel + 3 + 1), per_round  # q, control, guard
        else:  # scales (float64, one a block of 256) + 16 control bytes + q
            assert per_round == 8 * 2 + 16 + numel, per_round
    # not vacuous: the uncompressed run differs
    plain = _reference(cfg, n, compression=None)
    assert np.abs(plain["params"][0]["weight"] - ref["params"][0]["weight"]).max() > 1e-9
    print(f"\n{cfg_id} n={n} {controller}: max|keras - reference| / max = {worst:.3g} "
          f"(syncs {ref['syncs']})")


@pytest.mark.parametrize("n,controller", TORCH_JOBS)
@pytest.mark.parametrize("cfg_id", FIT_IDS)
def test_keras_compressed_agrees_with_torch(n, controller, cfg_id):
    kj, tj = _job("keras_local", n, controller), _job("torch_local", n, controller)
    # int8, or fp16 on 2 ranks: the same arithmetic (1e-12 of the tensor's scale). fp16 on 3+
    # ranks: Keras' kernel is the transpose of torch's weight, so an element sits elsewhere in
    # the buffer and Horovod's ring adds its three float16 values in another order: a float16
    # rounding of the summed delta a round, as against the reference
    fp16_order = _cfg(n, cfg_id)["compression"] == "fp16" and n > 2
    worst = 0.0
    for r in range(n):
        k, t = kj[r][cfg_id], tj[r][cfg_id]
        for key in ("steps", "syncs", "local_steps"):
            assert k["stats"][key] == t["stats"][key], f"rank {r}: stats[{key!r}]"
        # the same payloads (fp16: [q | control | guard], int8: [scales | control | q]); only
        # PyTorch's float64 warm-up gradient buffers end with a guard element (8 bytes)
        guard = 8 * t["stats"]["warmup_steps_done"]
        assert k["stats"]["bytes_sent"] + guard == t["stats"]["bytes_sent"]
        for name, want in t["params"].items():
            d = _scaled_diff(k["params"][name], want)
            worst = max(worst, d)
            if fp16_order:
                np.testing.assert_allclose(k["params"][name], want, rtol=1e-9,
                                           atol=2 ** -12 * t["stats"]["syncs"],
                                           err_msg=f"{cfg_id} rank {r} {name}: keras vs torch")
            else:
                assert d <= 1e-12, f"{cfg_id} rank {r} {name}: keras vs torch {d:.3g}"
    print(f"\n{cfg_id} n={n} {controller}: max|keras - torch| / max|torch| = {worst:.3g}")


@pytest.mark.parametrize("n,controller", [j for j in JOBS if j[0] == 2])
@pytest.mark.parametrize("cfg_id", [c["id"] for c in SAVE_LOAD])
def test_keras_compressed_save_load_resumes_exactly(n, controller, cfg_id):
    ranks = _job("keras_local", n, controller)
    cfg = _cfg(n, cfg_id)
    for r in range(n):
        got = ranks[r][cfg_id]
        assert got["config_equal"] and got["n_vars"][0] == got["n_vars"][1]
        for a, b in zip(got["opt_vars"], got["loaded_opt_vars"]):
            np.testing.assert_array_equal(a, b)
        # the residuals were saved and are not zero (a rank's own quantisation error)
        residuals = got["residuals"]
        assert residuals and all(np.abs(e).max() > 0 for e in residuals)
        for name, want in got["continued"].items():
            np.testing.assert_array_equal(got["loaded_continued"][name], want)
            np.testing.assert_array_equal(got["straight"][name], want)
        a, b = got["continued_stats"]
        for key in ("steps", "syncs", "bytes_sent", "local_steps", "period"):
            assert a[key] == b[key], key
    # the uninterrupted run is the reference's
    steps = cfg["steps"] + cfg["more_steps"]
    ref = _reference(dict(cfg, steps=steps), n)
    atol = _ref_atol(cfg, n, ref)
    for r in range(n):
        for name, want in ref["params"][r].items():
            np.testing.assert_allclose(ranks[r][cfg_id]["straight"][name], want, rtol=1e-9,
                                       atol=atol)


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_horovod_tf_cannot_keep_a_round_in_flight(controller):
    """The evidence behind ``overlap=True``'s ValueError (docs/KERAS.md): rank 1 is DELAY
    seconds late to each collective; what rank 0 sees."""
    got = _job("keras_local", 2, controller)[0]["overlap_probe"]
    # Horovod's ops are not stateful: a collective whose result is unused is pruned from the
    # graph (never sent), so "start it and return" starts nothing
    assert got["stateful"] == {"HorovodAllreduce": False}, got["stateful"]
    assert got["A_call_s"] < DELAY / 2, got
    # used (written to a variable, as a round must be): the graph execution waits for it
    assert got["B_call_s"] > 0.8 * DELAY, got
    # asynchronous eager execution returns at once, but the next train step queues behind it
    assert got["C_call_s"] < DELAY / 2 and got["C_first_step_s"] > 0.8 * DELAY, got
    # a Python thread does keep it in flight while the main thread trains
    assert got["D_round_s"] > 0.8 * DELAY and got["D_steps_during_round"] >= 10, got
    print(f"\noverlap probe ({controller}, peer {DELAY} s late): " + ", ".join(
        f"{k}={v:.3g}" for k, v in got.items() if isinstance(v, (int, float))))


# ---- in one process ---------------------------------------------------------------------------
def _make(**kw):
    import keras

    from horovod_local.tensorflow.keras import DistributedLocalOptimizer

    return DistributedLocalOptimizer(keras.optimizers.SGD(0.1), period=4, **kw)


def test_compression_arguments():
    import horovod.tensorflow as hvd
    import keras

    from horovod_local.tensorflow.keras import DistributedLocalOptimizer, LocalAdaAlter

    assert _make(compression="fp16")._hl_config.compression == "fp16"
    assert _make(compression=hvd.Compression.fp16)._hl_config.compression == "fp16"
    assert _make(compression=hvd.Compression.none)._hl_config.compression is None
    assert _make(compression="int8")._hl_config.compression == "int8"
    with pytest.raises(ValueError, match="bfloat16"):
        _make(compression="bf16")
    with pytest.raises(ValueError, match="compression must be"):
        _make(compression="int4")
    with pytest.raises(ValueError, match="state_policy='average'"):
        _make(compression="int8", state_policy="average")
    with pytest.raises(ValueError, match="nonfinite='skip'"):
        _make(compression="fp16", nonfinite="skip")
    with pytest.raises(ValueError, match="LocalAdaAlter"):
        DistributedLocalOptimizer(LocalAdaAlter(0.1), period=4, compression="int8")
    opt = _make(compression="int8", algorithm="slowmo")
    assert opt.get_config()["compression"] == "int8"
    again = DistributedLocalOptimizer.from_config(opt.get_config())
    assert again._hl_config.compression == "int8" and again._hl_config.algorithm == "slowmo"
    # a config saved before compression existed loads as uncompressed
    old = _make().get_config()
    del old["compression"]
    assert DistributedLocalOptimizer.from_config(old)._hl_config.compression is None
    assert keras  # (imported for the optimizer classes)


def test_overlap_is_refused_with_the_reason():
    for kw in (dict(overlap=True), dict(overlap=True, compression="int8")):
        with pytest.raises(ValueError, match="overlap=True is not available in the Keras") as e:
            _make(**kw)
        assert "PyTorch front end" in str(e.value) and "docs/KERAS.md" in str(e.value)
    assert _make(overlap=False)._hl_config.overlap is False


def test_one_rank_residuals_saved(tmp_path):
    """One rank: c follows the average, the residuals are the quantisation error of the last
    send (nonzero), and model.save / load_model restores them with the anchors."""
    import horovod.tensorflow as hvd
    import keras

    from horovod_local.tensorflow.keras import DistributedLocalOptimizer

    hvd.init()
    assert hvd.size() == 1
    for mode in ("fp16", "int8"):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
        # int8 with two levels (one rank: its host's group is the process set itself): the
        # local rounds are plain, only the global ones compressed (and counted in bytes_sent)
        two_level = dict(local_period=2) if mode == "int8" else {}
        opt = DistributedLocalOptimizer(keras.optimizers.SGD(0.05), period=5, compression=mode,
                                        **two_level)
        model.compile(optimizer=opt, loss="mse", jit_compile=False)
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(96, 6)), rng.normal(size=(96, 4))
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)  # 12 steps, 2 syncs
        st = opt.sync_stats()
        assert (st.steps, st.syncs) == (12, 2)
        assert st.local_syncs == (7 if two_level else 0)  # locals at 2, 4, 5, 7, 9, 10, 12
        assert st.bytes_sent == 2 * (2 * (28 + 4) if mode == "fp16" else 2 * 4 + 16 + 28)
        res = [e.numpy() for e in opt.residuals]
        assert all(np.abs(e).max() > 0 for e in res)
        # one rank: after a round x = c + delta, where delta = D(Q(x - c + e))
        path = str(tmp_path / f"m_{mode}.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        lopt = loaded.optimizer
        assert lopt._hl_config.compression == mode
        for a, b in zip(res, lopt.residuals):
            np.testing.assert_array_equal(a, b.numpy())
        for a, b in zip(opt.anchors, lopt.anchors):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        keras.backend.clear_session()


def test_one_rank_nonfinite_round_writes_nothing_back():
    """A NaN reaching a compressed round fails it (InvalidArgumentError naming the step) and
    the common point c is not written: the checks gate every write after the exchange."""
    import horovod.tensorflow as hvd
    import keras
    import tensorflow as tf

    from horovod_local.tensorflow.keras import DistributedLocalOptimizer

    hvd.init()
    for mode in ("fp16", "int8"):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
        opt = DistributedLocalOptimizer(keras.optimizers.SGD(0.05), period=5, compression=mode)
        model.compile(optimizer=opt, loss="mse", jit_compile=False)
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 4))
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)  # 5 steps, 1 sync
        c = [a.numpy().copy() for a in opt.anchors]
        x[3 * 8, 0] = np.nan  # step 9's batch: the round after step 10 sums a NaN
        with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite values"):
            model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        assert opt.sync_stats().syncs == 1
        for a, b in zip(c, opt.anchors):
            np.testing.assert_array_equal(a, b.numpy())
        keras.backend.clear_session()


def test_graph_arithmetic_matches_the_kernels():
    """The in-graph compression ops (inside a tf.function, after Grappler) are bit-identical
    to horovod_local.torch._kernels: float16 rounding (once, also from float64, ties and
    subnormals), int8 quantisation with error feedback (blocks of 256, an all-zero block), the
    rank-order dequantised mean."""
    import tensorflow as tf
    import torch

    from horovod_local.tensorflow import ops as O
    from horovod_local.torch import _kernels as K

    rng = np.random.default_rng(0)
    h = rng.normal(0, 1, 4000).astype(np.float16).astype(np.float64)
    mid = (h + np.nextafter(h.astype(np.float16), np.float16(np.inf)).astype(np.float64)) / 2
    for dt in (np.float64, np.float32):
        vals = np.concatenate([rng.normal(0, s, 4000) for s in (1e-7, 1e-5, 1e-2, 1, 6e4)]
                              + [mid, mid * (1 + 1e-12), mid * (1 - 1e-12)]).astype(dt)
        want = K._to_half(torch.tensor(vals)).numpy().view(np.uint16)
        got = tf.function(O.to_half)(tf.constant(vals)).numpy().view(np.uint16)
        assert np.array_equal(got, want), dt
    sizes = [600, 3, 257]  # whole blocks, a short last block; one tensor's block all zero
    for dt in (torch.float64, torch.float32):
        p = [torch.tensor(rng.normal(0, 1, k) * s, dtype=dt) for k, s in zip(sizes, (1e-3, 1, 10))]
        c = [torch.tensor(rng.normal(0, 1, k), dtype=dt) for k in sizes]
        e = [torch.tensor(rng.normal(0, 1e-3, k), dtype=dt) for k in sizes]
        c[1], e[1] = p[1].clone(), torch.zeros(3, dtype=dt)
        q = torch.zeros(sum(sizes), dtype=torch.int8)
        sc = torch.zeros(K.int8_num_blocks(sizes), dtype=dt)
        e_k = [t.clone() for t in e]
        K.quantize_int8(p, c, e_k, q, sc)
        quant = tf.function(O.quantize_int8)
        out = [quant(tf.constant(a.numpy()) - tf.constant(b.numpy()), tf.constant(r.numpy()))
               for a, b, r in zip(p, c, e)]
        assert np.array_equal(np.concatenate([o[0].numpy() for o in out]), q.numpy())
        assert np.array_equal(np.concatenate([o[1].numpy() for o in out]), sc.numpy())
        for o, r in zip(out, e_k):
            assert np.array_equal(o[2].numpy(), r.numpy())
        n = 3
        qa = torch.randint(-127, 128, (n, sum(sizes)), dtype=torch.int8)
        sa = torch.tensor(rng.random((n, K.int8_num_blocks(sizes))), dtype=dt)
        want = torch.zeros(sum(sizes), dtype=dt)
        K.dequantize_int8_mean(qa, sa, want, 1.0 / n, sizes)
        got = tf.function(lambda a, b: O.dequantize_int8_mean(a, b, sizes, 1.0 / n))(
            tf.constant(qa.numpy()), tf.constant(sa.numpy()))
        assert np.array_equal(got.numpy(), want.numpy())
