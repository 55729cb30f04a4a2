"""Tests of the NumPy reference simulator against closed forms written out independently here."""
from __future__ import annotations

import math

import numpy as np
import pytest

try:
    from . import fixtures
    from .reference import (dequantize_int8, dequantize_int8_mean, quantize_fp16,
                            quantize_int8, simulate, sum_fp16)
except ImportError:
    import fixtures  # type: ignore[no-redef]
    from reference import (dequantize_int8, dequantize_int8_mean,  # type: ignore[no-redef]
                           quantize_fp16, quantize_int8, simulate, sum_fp16)

Params = dict[str, np.ndarray]
SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.0}


# ---------------------------------------------------------------- independent helpers
def grad(rank: int, t: int, p: Params) -> Params:
    """Gradient of rank's batch t at p."""
    x, y = fixtures.make_batch(rank, t)
    return fixtures.loss_and_grads(p, x, y)[1]


def x0() -> Params:
    return {k: v.copy() for k, v in fixtures.init_params().items()}


def avg(ps: list[Params]) -> Params:
    return {k: np.mean([p[k] for p in ps], axis=0) for k in ps[0]}


def close(a: Params, b: Params, rtol: float = 1e-10) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-12)


def same_everywhere(res: dict) -> None:
    for p in res["params"][1:]:
        close(p, res["params"][0], rtol=1e-13)


# ---------------------------------------------------------------- local SGD
def test_h1_plain_sgd_is_synchronous_sgd() -> None:
    n, T, lr = 3, 7, 0.05
    res = simulate(n, T, inner=SGD, schedule={"kind": "constant", "period": 1})
    x = x0()
    for t in range(1, T + 1):
        g = avg([grad(i, t, x) for i in range(n)])
        x = {k: x[k] - lr * g[k] for k in x}
    for p in res["params"]:
        close(p, x)
    assert res["syncs"] == T and res["sync_steps"] == list(range(1, T + 1))
    assert res["periods"] == [1] * T


def _local_sgd_by_hand(n: int, T: int, H: int, lr: float) -> list[Params]:
    xs = [x0() for _ in range(n)]
    for t in range(1, T + 1):
        xs = [{k: xs[i][k] - lr * grad(i, t, xs[i])[k] for k in xs[i]} for i in range(n)]
        if t % H == 0:
            a = avg(xs)
            xs = [dict(a) for _ in range(n)]
    return xs


def test_local_sgd_h3_and_slowmo_beta0_alpha1() -> None:
    n, T, H = 2, 7, 3
    want = _local_sgd_by_hand(n, T, H, SGD["lr"])
    sched = {"kind": "constant", "period": H}
    a = simulate(n, T, inner=SGD, schedule=sched)
    b = simulate(n, T, inner=SGD, schedule=sched,
                 algorithm={"name": "slowmo", "alpha": 1.0, "beta": 0.0})
    for i in range(n):
        close(a["params"][i], want[i])
        close(b["params"][i], want[i])
    assert a["sync_steps"] == [3, 6] and b["sync_steps"] == [3, 6]
    # replicas differ after the unsynced step 7
    assert not np.allclose(a["params"][0]["weight"], a["params"][1]["weight"])
    # losses: rank 0 step 1 is the loss at init
    xb, yb = fixtures.make_batch(0, 1)
    assert a["losses"][0][0] == pytest.approx(fixtures.loss_and_grads(x0(), xb, yb)[0])
    assert len(a["losses"][1]) == T


def test_one_shot_averaging_final_sync() -> None:
    n, T = 3, 5
    res = simulate(n, T, inner=SGD, schedule={"kind": "constant", "period": math.inf},
                   final_sync=True)
    want = avg(_local_sgd_by_hand(n, T, 10**9, SGD["lr"]))
    for p in res["params"]:
        close(p, want)
    assert res["syncs"] == 1 and res["periods"] == [math.inf]


# ---------------------------------------------------------------- SlowMo / outer optimizer
def test_slowmo_period1_is_heavy_ball() -> None:
    n, T, lr, alpha, beta = 3, 6, 0.1, 0.8, 0.6
    res = simulate(n, T, inner={"name": "sgd", "lr": lr, "momentum": 0.0},
                   schedule={"kind": "constant", "period": 1},
                   algorithm={"name": "slowmo", "alpha": alpha, "beta": beta})
    x = x0()
    buf = {k: np.zeros_like(v) for k, v in x.items()}
    for t in range(1, T + 1):
        g = avg([grad(i, t, x) for i in range(n)])
        buf = {k: beta * buf[k] + g[k] for k in x}
        x = {k: x[k] - alpha * lr * buf[k] for k in x}
    for p in res["params"]:
        close(p, x)
    close(res["u"][0], buf)


def test_slowmo_with_warmup_written_out() -> None:
    n, T, W, tau, lr, alpha, beta = 2, 9, 2, 3, 0.05, 0.9, 0.7
    res = simulate(n, T, inner={"name": "sgd", "lr": lr, "momentum": 0.0}, warmup_steps=W,
                   schedule={"kind": "constant", "period": tau},
                   algorithm={"name": "slowmo", "alpha": alpha, "beta": beta})
    x = x0()
    for t in range(1, W + 1):
        g = avg([grad(i, t, x) for i in range(n)])
        x = {k: x[k] - lr * g[k] for k in x}
    anchor = dict(x)
    u = {k: np.zeros_like(v) for k, v in x.items()}
    xs = [dict(x) for _ in range(n)]
    for t in range(W + 1, T + 1):
        xs = [{k: xs[i][k] - lr * grad(i, t, xs[i])[k] for k in x} for i in range(n)]
        if (t - W) % tau == 0:
            xa = avg(xs)
            u = {k: beta * u[k] + (anchor[k] - xa[k]) / lr for k in x}
            anchor = {k: anchor[k] - alpha * lr * u[k] for k in x}
            xs = [dict(anchor) for _ in range(n)]
    for i in range(n):
        close(res["params"][i], xs[i])
        close(res["x0"][i], anchor)
        close(res["u"][i], u)
    assert res["sync_steps"] == [5, 8]


def test_outer_sgd_equals_slowmo_at_constant_lr() -> None:
    n, T, H, lr, alpha, beta = 3, 8, 2, 0.05, 0.7, 0.9
    inner = {"name": "sgd", "lr": lr, "momentum": 0.5}
    sched = {"kind": "constant", "period": H}
    a = simulate(n, T, inner=inner, schedule=sched,
                 algorithm={"name": "slowmo", "alpha": alpha, "beta": beta})
    b = simulate(n, T, inner=inner, schedule=sched,
                 algorithm={"name": "outer_sgd", "lr": alpha, "momentum": beta,
                            "nesterov": False})
    for i in range(n):
        close(a["params"][i], b["params"][i], rtol=1e-9)
        close({k: lr * v for k, v in a["u"][i].items()}, b["outer_buf"][i], rtol=1e-9)


def test_outer_nesterov_written_out() -> None:
    n, T, H, lr, olr, mom = 2, 6, 2, 0.05, 0.7, 0.9
    res = simulate(n, T, inner=SGD, schedule={"kind": "constant", "period": H},
                   algorithm={"name": "outer_sgd", "lr": olr, "momentum": mom, "nesterov": True})
    anchor = x0()
    buf: Params | None = None
    xs = [x0() for _ in range(n)]
    for t in range(1, T + 1):
        xs = [{k: xs[i][k] - lr * grad(i, t, xs[i])[k] for k in anchor} for i in range(n)]
        if t % H == 0:
            g = {k: anchor[k] - avg(xs)[k] for k in anchor}
            buf = dict(g) if buf is None else {k: mom * buf[k] + g[k] for k in g}
            anchor = {k: anchor[k] - olr * (g[k] + mom * buf[k]) for k in g}
            xs = [dict(anchor) for _ in range(n)]
    for p in res["params"]:
        close(p, anchor)


# ---------------------------------------------------------------- AdaAlter
def test_adaalter_alone_textbook() -> None:
    T, lr, eps, b0sq, wu = 6, 0.3, 0.5, 0.3, 4
    res = simulate(1, T, inner={"name": "adaalter", "lr": lr, "eps": eps,
                                "initial_accumulator_value": b0sq, "lr_warmup_steps": wu},
                   schedule={"kind": "constant", "period": 1})
    x = x0()
    B2 = {k: np.full_like(v, b0sq) for k, v in x.items()}
    A2 = {k: v.copy() for k, v in B2.items()}
    for t in range(1, T + 1):
        g = grad(0, t, x)
        eta = lr * min(1.0, t / wu)
        x = {k: x[k] - eta * g[k] / np.sqrt(B2[k] + eps * eps) for k in x}
        A2 = {k: A2[k] + g[k] ** 2 for k in x}
        B2 = dict(A2)
    close(res["params"][0], x)
    close(res["B2"][0], B2)


def test_adaalter_n2_h3_algorithm3() -> None:
    n, T, H, lr, eps, b0sq, wu = 2, 7, 3, 0.2, 1.0, 1.0, 3
    res = simulate(n, T, inner={"name": "adaalter", "lr": lr, "eps": eps,
                                "initial_accumulator_value": b0sq, "lr_warmup_steps": wu},
                   schedule={"kind": "constant", "period": H})
    xs = [x0() for _ in range(n)]
    B2 = {k: np.full_like(v, b0sq) for k, v in xs[0].items()}
    A2 = [dict(B2) for _ in range(n)]
    for t in range(1, T + 1):
        tp = ((t - 1) % H) + 1
        eta = lr * min(1.0, t / wu)
        for i in range(n):
            g = grad(i, t, xs[i])
            xs[i] = {k: xs[i][k] - eta * g[k] / np.sqrt(B2[k] + tp * eps ** 2) for k in g}
            A2[i] = {k: A2[i][k] + g[k] * g[k] for k in g}
        if t % H == 0:
            xa = avg(xs)
            xs = [dict(xa) for _ in range(n)]
            B2 = avg(A2)
            A2 = [dict(B2) for _ in range(n)]
    for i in range(n):
        close(res["params"][i], xs[i])
        close(res["A2"][i], A2[i])
        close(res["B2"][i], B2)


# ---------------------------------------------------------------- Adam and state policies
def _adam(x: Params, g: Params, m: Params, v: Params, t: int, lr: float,
          b1: float, b2: float, eps: float) -> tuple[Params, Params, Params]:
    m = {k: b1 * m[k] + (1 - b1) * g[k] for k in x}
    v = {k: b2 * v[k] + (1 - b2) * g[k] ** 2 for k in x}
    mh = {k: m[k] / (1 - b1 ** t) for k in x}
    vh = {k: v[k] / (1 - b2 ** t) for k in x}
    return {k: x[k] - lr * mh[k] / (np.sqrt(vh[k]) + eps) for k in x}, m, v


def test_adam_reset_policy_written_out() -> None:
    n, T, H, lr, b1, b2, eps = 2, 7, 2, 0.01, 0.8, 0.95, 1e-6
    res = simulate(n, T, inner={"name": "adam", "lr": lr, "betas": (b1, b2), "eps": eps},
                   schedule={"kind": "constant", "period": H}, state_policy="reset")
    xs = [x0() for _ in range(n)]
    ms = [{k: np.zeros_like(v) for k, v in xs[0].items()} for _ in range(n)]
    vs = [dict(m) for m in ms]
    for t in range(1, T + 1):
        for i in range(n):
            xs[i], ms[i], vs[i] = _adam(xs[i], grad(i, t, xs[i]), ms[i], vs[i], t,
                                        lr, b1, b2, eps)
        if t % H == 0:
            xa = avg(xs)
            xs = [dict(xa) for _ in range(n)]
            ms = [{k: np.zeros_like(v) for k, v in xa.items()} for _ in range(n)]
            vs = [dict(m) for m in ms]
    for i in range(n):
        close(res["params"][i], xs[i])
        close({k: res["opt_state"][i]["exp_avg"][k] for k in xs[i]}, ms[i])
        assert res["opt_state"][i]["step"] == T


def test_momentum_average_policy_h1_is_sync_momentum_sgd() -> None:
    n, T, lr, mom = 3, 6, 0.05, 0.9
    res = simulate(n, T, inner={"name": "sgd", "lr": lr, "momentum": mom},
                   schedule={"kind": "constant", "period": 1}, state_policy="average")
    x = x0()
    buf: Params | None = None
    for t in range(1, T + 1):
        g = avg([grad(i, t, x) for i in range(n)])
        buf = dict(g) if buf is None else {k: mom * buf[k] + g[k] for k in g}
        x = {k: x[k] - lr * buf[k] for k in x}
    for i in range(n):
        close(res["params"][i], x)
        close(res["opt_state"][i]["momentum_buffer"], buf)


def test_momentum_reset_policy_n1_h1_is_plain_sgd() -> None:
    T, lr = 5, 0.05
    res = simulate(1, T, inner={"name": "sgd", "lr": lr, "momentum": 0.9},
                   schedule={"kind": "constant", "period": 1}, state_policy="reset")
    close(res["params"][0], _local_sgd_by_hand(1, T, 1, lr)[0])


# ---------------------------------------------------------------- warm-up, schedules, lr
def test_warmup_keeps_replicas_identical() -> None:
    n, W, lr, mom = 3, 4, 0.05, 0.5
    res = simulate(n, W, inner={"name": "sgd", "lr": lr, "momentum": mom}, warmup_steps=W,
                   schedule={"kind": "constant", "period": math.inf})
    same_everywhere(res)
    x = x0()
    buf: Params | None = None
    for t in range(1, W + 1):
        g = avg([grad(i, t, x) for i in range(n)])
        buf = dict(g) if buf is None else {k: mom * buf[k] + g[k] for k in g}
        x = {k: x[k] - lr * buf[k] for k in x}
    close(res["params"][0], x)
    assert res["syncs"] == 0
    res2 = simulate(n, 9, inner=SGD, warmup_steps=3, schedule={"kind": "constant", "period": 2})
    assert res2["sync_steps"] == [5, 7, 9]


def test_increasing_schedule() -> None:
    res = simulate(2, 20, inner=SGD, warmup_steps=1,
                   schedule={"kind": "increasing", "initial_period": 1, "factor": 2,
                             "rounds_per_stage": 2, "max_period": 4})
    assert res["periods"] == [1, 1, 2, 2, 4, 4, 4]
    assert res["sync_steps"] == [2, 3, 5, 7, 11, 15, 19]
    res2 = simulate(2, 10, inner=SGD, schedule={"kind": "increasing", "fn": lambda s: s + 1})
    assert res2["sync_steps"] == [1, 3, 6, 10]


def test_lr_schedule_lambda_semantics() -> None:
    T, lr = 6, 0.1
    res = simulate(1, T, inner={"name": "sgd", "lr": lr, "momentum": 0.0,
                                "lr_schedule": lambda k: 0.8 ** k},
                   schedule={"kind": "constant", "period": 1})
    x = x0()
    for t in range(1, T + 1):
        g = grad(0, t, x)
        x = {k: x[k] - lr * 0.8 ** (t - 1) * g[k] for k in x}
    close(res["params"][0], x)
    np.testing.assert_allclose(res["lrs"], [lr * 0.8 ** (t - 1) for t in range(1, T + 1)])


def test_recorded_rounds() -> None:
    n, lr = 2, SGD["lr"]
    a = simulate(n, 6, inner=SGD, schedule={"kind": "rounds"}, rounds=[[2, 2, 2]] * n)
    b = _local_sgd_by_hand(n, 6, 2, lr)
    for i in range(n):
        close(a["params"][i], b[i])
    # rank 0 takes 1 then 3 local steps, rank 1 takes 3 then 1
    res = simulate(n, 4, inner=SGD, schedule={"kind": "rounds"}, rounds=[[1, 3], [3, 1]])
    p0, p1 = x0(), x0()
    p0 = {k: p0[k] - lr * grad(0, 1, p0)[k] for k in p0}
    for t in (1, 2, 3):
        p1 = {k: p1[k] - lr * grad(1, t, p1)[k] for k in p1}
    p0 = p1 = avg([p0, p1])
    for t in (2, 3, 4):
        p0 = {k: p0[k] - lr * grad(0, t, p0)[k] for k in p0}
    p1 = {k: p1[k] - lr * grad(1, 4, p1)[k] for k in p1}
    want = avg([p0, p1])
    for p in res["params"]:
        close(p, want)
    assert res["sync_steps_per_rank"] == [[1, 4], [3, 4]]


# ---------------------------------------------------------------- ADPSGD
def test_adpsgd_first_s_by_hand() -> None:
    n, lr = 2, 0.05
    res = simulate(n, 1, inner=SGD, schedule={"kind": "adaptive", "initial_period": 1,
                                              "sampling_steps": 10, "lower": 0.7,
                                              "upper": 1.3, "min_period": 1,
                                              "max_period": None})
    g = [grad(i, 1, x0()) for i in range(n)]
    gb = avg(g)
    S = sum(lr ** 2 * float(np.sum((gb[k] - gi[k]) ** 2)) for gi in g for k in gb) / n
    assert res["S"][0] == pytest.approx(S, rel=1e-10)
    assert res["C2"] == pytest.approx(S / lr, rel=1e-10)


def _replay(res: dict, Ks: int, p0: int, lo: float, hi: float) -> None:
    """Replay ADPSGD's rule on the reported S and lr; check periods and sync steps."""
    p, C2, m, t = p0, 0.0, 0, 0
    for k, (S, lr) in enumerate(zip(res["S"], res["lrs"])):
        t += p
        assert res["periods"][k] == p and res["sync_steps"][k] == t
        if t <= Ks:
            C2 = (C2 * m + S / lr) / (m + 1)
            m += 1
        elif S < lo * lr * C2:
            p += 1
        elif S > hi * lr * C2:
            p = max(1, p - 1)
    assert res["C2"] == pytest.approx(C2, rel=1e-12) and res["period"] == p


def test_adpsgd_period_grows_when_lr_drops() -> None:
    Ks = 8
    res = simulate(2, 60, inner={"name": "sgd", "lr": 0.05, "momentum": 0.0,
                                 "lr_schedule": lambda k: 1.0 if k < Ks else 0.1},
                   schedule={"kind": "adaptive", "initial_period": 2, "sampling_steps": Ks,
                             "lower": 0.7, "upper": 1.3, "min_period": 1, "max_period": None})
    _replay(res, Ks, 2, 0.7, 1.3)
    assert res["C2"] == pytest.approx(np.mean(np.array(res["S"][:4]) / 0.05), rel=1e-12)
    # S ~ lr^2 drops faster than the threshold ~ lr: p grows by one at the first decisions
    assert res["periods"][4:7] == [2, 3, 4]
    assert res["period"] > 4


def test_adpsgd_period_shrinks_when_lr_rises() -> None:
    Ks = 8
    res = simulate(3, 40, inner={"name": "sgd", "lr": 0.01, "momentum": 0.0,
                                 "lr_schedule": lambda k: 1.0 if k < Ks else 10.0},
                   schedule={"kind": "adaptive", "initial_period": 4, "sampling_steps": Ks,
                             "lower": 0.7, "upper": 1.3, "min_period": 1, "max_period": None})
    _replay(res, Ks, 4, 0.7, 1.3)
    # S ~ lr^2 outgrows the threshold ~ lr: p shrinks at the first decisions
    assert res["periods"][2:5] == [4, 3, 2]


# ---------------------------------------------------------------- uneven steps / join
def test_uneven_steps_join_written_out() -> None:
    lr = SGD["lr"]
    res = simulate(2, [3, 5], inner=SGD, schedule={"kind": "constant", "period": 2})
    sgd = lambda i, t, p: {k: p[k] - lr * grad(i, t, p)[k] for k in p}  # noqa: E731
    p0 = sgd(0, 2, sgd(0, 1, x0()))
    p1 = sgd(1, 2, sgd(1, 1, x0()))
    a = avg([p0, p1])                                 # round 1 (both at step 2)
    p0 = sgd(0, 3, a)                                 # rank 0 out of data: join
    p1 = sgd(1, 4, sgd(1, 3, a))
    a = avg([p0, p1])                                 # round 2 (rank 1's sync at 4)
    p1 = sgd(1, 5, a)                                 # rank 1 joins after step 5
    want = avg([a, p1])                               # round 3: everyone joined
    for p in res["params"]:
        close(p, want)
    assert res["syncs"] == 3 and res["joined"] == [0, 1, 2]
    assert res["sync_steps_per_rank"] == [[2, 3, 3], [2, 4, 5]]


@pytest.mark.parametrize("algorithm,inner", [
    (None, {"name": "adam", "lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-8}),
    ({"name": "slowmo", "alpha": 1.0, "beta": 0.5}, {"name": "sgd", "lr": 0.05, "momentum": 0.9}),
    (None, {"name": "adaalter", "lr": 0.1, "eps": 1.0, "initial_accumulator_value": 1.0,
            "lr_warmup_steps": 0}),
])
def test_uneven_steps_end_identical(algorithm: dict | None, inner: dict) -> None:
    res = simulate(3, [7, 4, 10], inner=inner, warmup_steps=2, algorithm=algorithm,
                   schedule={"kind": "constant", "period": 3})
    same_everywhere(res)
    assert res["steps"] == [7, 4, 10] and res["joined"][-1] == 3


def test_uneven_never_is_one_shot_average() -> None:
    res = simulate(2, [3, 6], inner=SGD, schedule={"kind": "constant", "period": math.inf})
    want = avg([_local_sgd_by_hand(1, 3, 10**9, SGD["lr"])[0],
                _local_sgd_by_hand(2, 6, 10**9, SGD["lr"])[1]])
    for p in res["params"]:
        close(p, want)
    assert res["syncs"] == 1


def test_rejects_undefined_inputs() -> None:
    with pytest.raises(ValueError):
        simulate(2, [3, 4], inner=SGD, schedule={"kind": "constant", "period": 2}, join=False)
    with pytest.raises(ValueError):
        simulate(2, 4, inner={"name": "adaalter", "lr": 0.1}, state_policy="reset",
                 schedule={"kind": "constant", "period": 2})


# ---------------------------------------------------------------- AMP skips (skip_steps)
MOM = {"name": "sgd", "lr": 0.05, "momentum": 0.9}


def _sgd(i: int, t: int, p: Params, lr: float = SGD["lr"]) -> Params:
    return {k: p[k] - lr * grad(i, t, p)[k] for k in p}


def test_local_skip_freezes_that_rank_only_and_sync_stays() -> None:
    n, H = 2, 3
    sched = {"kind": "constant", "period": H}
    before = simulate(n, 1, inner=SGD, schedule=sched)
    after = simulate(n, 2, inner=SGD, schedule=sched, skip_steps={1: [2]})
    close(after["params"][1], before["params"][1], rtol=0)          # rank 1 did not move
    assert not np.allclose(after["params"][0]["weight"], before["params"][0]["weight"])
    assert after["skipped_steps"] == [[], [2]]
    # the loss of the skipped step is the loss of its batch before the (skipped) step
    xb, yb = fixtures.make_batch(1, 2)
    assert after["losses"][1][1] == pytest.approx(
        fixtures.loss_and_grads(before["params"][1], xb, yb)[0], rel=1e-14)
    # over two rounds: the sync still happens after step 3 and 6, written out by hand
    res = simulate(n, 6, inner=SGD, schedule=sched, skip_steps={1: [2], 0: [6]})
    plain = simulate(n, 6, inner=SGD, schedule=sched)
    assert res["sync_steps"] == plain["sync_steps"] == [3, 6] and res["steps"] == [6, 6]
    xs = [x0() for _ in range(n)]
    for t in range(1, 7):
        xs = [xs[i] if (i, t) in ((1, 2), (0, 6)) else _sgd(i, t, xs[i]) for i in range(n)]
        if t % H == 0:
            xs = [avg(xs)] * n
    for i in range(n):
        close(res["params"][i], xs[i])
    assert not np.allclose(res["params"][0]["weight"], plain["params"][0]["weight"])


def test_local_skip_keeps_inner_state_and_counters() -> None:
    # Adam: the skipped step neither moves the moments nor advances the step count
    adam = {"name": "adam", "lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-6}
    sched = {"kind": "constant", "period": 4}
    a = simulate(2, 2, inner=adam, schedule=sched)
    b = simulate(2, 3, inner=adam, schedule=sched, skip_steps={0: [3]})
    assert b["opt_state"][0]["step"] == 2 and b["opt_state"][1]["step"] == 3
    assert b["opt_state"][0]["state_step"] == {"weight": 2, "bias": 2}
    close(b["opt_state"][0]["exp_avg"], a["opt_state"][0]["exp_avg"], rtol=0)
    close(b["params"][0], a["params"][0], rtol=0)
    # skipped steps count toward the warm-up / period: no sync moves
    c = simulate(2, 9, inner=adam, warmup_steps=1, schedule=sched, skip_steps={0: [5], 1: [5]})
    assert c["sync_steps"] == [5, 9]


def test_local_skip_adaalter_written_out() -> None:
    """A skipped local step leaves A2, t' and AdaAlter's own step count (lr warm-up) alone."""
    n, T, H, lr, eps, b0sq, wu = 2, 6, 3, 0.2, 0.7, 1.0, 4
    res = simulate(n, T, inner={"name": "adaalter", "lr": lr, "eps": eps,
                                "initial_accumulator_value": b0sq, "lr_warmup_steps": wu},
                   schedule={"kind": "constant", "period": H}, skip_steps={1: [1, 5]})
    xs = [x0() for _ in range(n)]
    B2 = {k: np.full_like(v, b0sq) for k, v in xs[0].items()}
    A2 = [dict(B2) for _ in range(n)]
    tp, own = [0] * n, [0] * n
    for t in range(1, T + 1):
        for i in range(n):
            if i == 1 and t in (1, 5):
                continue
            own[i] += 1
            tp[i] += 1
            g = grad(i, t, xs[i])
            eta = lr * min(1.0, own[i] / wu)
            xs[i] = {k: xs[i][k] - eta * g[k] / np.sqrt(B2[k] + tp[i] * eps ** 2) for k in g}
            A2[i] = {k: A2[i][k] + g[k] * g[k] for k in g}
        if t % H == 0:
            xs = [avg(xs)] * n
            B2 = avg(A2)
            A2 = [dict(B2)] * n
            tp = [0] * n
    for i in range(n):
        close(res["params"][i], xs[i])
        close(res["B2"][i], B2)
    assert res["opt_state"][1]["step"] == 4 and res["skipped_steps"][1] == [1, 5]


def test_warmup_skip_on_one_rank_stops_every_rank() -> None:
    n, W = 3, 3
    sched = {"kind": "constant", "period": 2}
    before = simulate(n, 1, inner=MOM, warmup_steps=1, schedule=sched)
    after = simulate(n, 2, inner=MOM, warmup_steps=2, schedule=sched, skip_steps={2: [2]})
    for i in range(n):
        close(after["params"][i], before["params"][i], rtol=0)
        close(after["opt_state"][i]["momentum_buffer"],
              before["opt_state"][i]["momentum_buffer"], rtol=0)
        assert after["opt_state"][i]["step"] == 1
    assert after["skipped_steps"] == [[2]] * n
    # the skipped warm-up step counts: local steps start at W + 1, syncs at W + 2, W + 4
    res = simulate(n, 7, inner=MOM, warmup_steps=W, schedule=sched, skip_steps={2: [2]})
    assert res["sync_steps"] == [5, 7]
    x, buf = x0(), None
    for t in (1, 3):
        g = avg([grad(i, t, x) for i in range(n)])
        buf = dict(g) if buf is None else {k: 0.9 * buf[k] + g[k] for k in g}
        x = {k: x[k] - 0.05 * buf[k] for k in x}
    xs, bufs = [dict(x) for _ in range(n)], [dict(buf) for _ in range(n)]
    for t in range(W + 1, 8):
        for i in range(n):
            g = grad(i, t, xs[i])
            bufs[i] = {k: 0.9 * bufs[i][k] + g[k] for k in g}
            xs[i] = {k: xs[i][k] - 0.05 * bufs[i][k] for k in g}
        if (t - W) % 2 == 0:
            xs = [avg(xs)] * n
    for i in range(n):
        close(res["params"][i], xs[i])


def test_skip_steps_lr_schedule_follows_the_global_step() -> None:
    """LambdaLR is stepped once per step() call, skipped or not: step t uses lr * f(t - 1)."""
    f = lambda k: 0.5 ** k  # noqa: E731
    res = simulate(1, 4, inner={"name": "sgd", "lr": 0.1, "momentum": 0.0, "lr_schedule": f},
                   schedule={"kind": "constant", "period": 1}, skip_steps={0: [2]})
    x = x0()
    for t in (1, 3, 4):
        x = _sgd(0, t, x, lr=0.1 * f(t - 1))
    close(res["params"][0], x)
    # AdaAlter: the group lr follows the global step, its lr warm-up its own step count
    ada = simulate(1, 4, inner={"name": "adaalter", "lr": 0.3, "eps": 1.0,
                                "initial_accumulator_value": 1.0, "lr_warmup_steps": 4,
                                "lr_schedule": f},
                   schedule={"kind": "constant", "period": 1}, skip_steps={0: [2]})
    x, B2 = x0(), {k: np.ones_like(v) for k, v in x0().items()}
    for own, t in enumerate((1, 3, 4), start=1):
        g = grad(0, t, x)
        eta = 0.3 * f(t - 1) * min(1.0, own / 4)
        x = {k: x[k] - eta * g[k] / np.sqrt(B2[k] + 1.0) for k in x}
        B2 = {k: B2[k] + g[k] * g[k] for k in x}
    close(ada["params"][0], x)
    close(ada["B2"][0], B2)


# ---------------------------------------------------------------- parameters without a gradient
def test_no_grad_average_creates_zero_momentum_then_averages() -> None:
    n, H, lr, mom = 2, 3, 0.05, 0.9
    res = simulate(n, 6, inner={"name": "sgd", "lr": lr, "momentum": mom},
                   schedule={"kind": "constant", "period": H}, state_policy="average",
                   no_grad={1: ["bias"]})
    first = simulate(n, 3, inner={"name": "sgd", "lr": lr, "momentum": mom},
                     schedule={"kind": "constant", "period": H}, state_policy="average",
                     no_grad={1: ["bias"]})
    xs = [x0() for _ in range(n)]
    bufs: list[Params] = [{}, {}]
    for t in range(1, 7):
        for i in range(n):
            g = grad(i, t, xs[i])
            for k in g:
                if i == 1 and k == "bias":
                    continue  # .grad is None: no update, no state
                bufs[i][k] = g[k].copy() if k not in bufs[i] else mom * bufs[i][k] + g[k]
                xs[i] = dict(xs[i], **{k: xs[i][k] - lr * bufs[i][k]})
        if t % H == 0:
            if t == H:  # the first sync: rank 1's bias buffer is created as zeros
                assert "bias" not in bufs[1]
                bufs[1]["bias"] = np.zeros_like(bufs[0]["bias"])
                want_bias_buf = bufs[0]["bias"] / 2
            xs = [avg(xs)] * n
            b = avg(bufs)
            bufs = [dict(b), dict(b)]
            if t == H:
                close(first["opt_state"][1]["momentum_buffer"], bufs[1])
                np.testing.assert_allclose(first["opt_state"][1]["momentum_buffer"]["bias"],
                                           want_bias_buf, rtol=1e-12)
    for i in range(n):
        close(res["params"][i], xs[i])
        close(res["opt_state"][i]["momentum_buffer"], bufs[i])
    # not vacuous: differs from every rank having the gradient
    full = simulate(n, 6, inner={"name": "sgd", "lr": lr, "momentum": mom},
                    schedule={"kind": "constant", "period": H}, state_policy="average")
    assert not np.allclose(full["params"][0]["bias"], res["params"][0]["bias"])


def test_no_grad_adam_average_state_step_zero_keep_and_reset_no_state() -> None:
    adam = {"name": "adam", "lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-6}
    sched = {"kind": "constant", "period": 2}
    avg_ = simulate(2, 4, inner=adam, schedule=sched, state_policy="average",
                    no_grad={1: ["bias"]})
    st0, st1 = avg_["opt_state"]
    assert st1["state_step"] == {"weight": 4, "bias": 0} and st0["state_step"]["bias"] == 4
    close(st1["exp_avg"], st0["exp_avg"], rtol=0)  # averaged: identical on both ranks
    for policy in ("keep", "reset"):
        r = simulate(2, 4, inner=adam, schedule=sched, state_policy=policy,
                     no_grad={1: ["bias"]})
        assert set(r["opt_state"][1]["exp_avg"]) == {"weight"}
        assert set(r["opt_state"][0]["exp_avg"]) == {"weight", "bias"}
    reset = simulate(2, 4, inner=adam, schedule=sched, state_policy="reset",
                     no_grad={1: ["bias"]})
    assert not reset["opt_state"][0]["exp_avg"]["bias"].any()


def test_no_grad_keep_leaves_bias_alone_between_syncs() -> None:
    n, H = 2, 3
    sched = {"kind": "constant", "period": H}
    for t_end in (1, 2):
        res = simulate(n, t_end, inner=MOM, schedule=sched, no_grad={1: ["bias"]})
        np.testing.assert_array_equal(res["params"][1]["bias"], x0()["bias"])
        assert not np.allclose(res["params"][1]["weight"], x0()["weight"])
        assert not np.allclose(res["params"][0]["bias"], x0()["bias"])
        assert "bias" not in res["opt_state"][1]["momentum_buffer"]
    # parameters are averaged at the sync regardless of gradients; then frozen again
    s3 = simulate(n, 3, inner=MOM, schedule=sched, no_grad={1: ["bias"]})
    s5 = simulate(n, 5, inner=MOM, schedule=sched, no_grad={1: ["bias"]})
    same_everywhere(s3)
    np.testing.assert_array_equal(s5["params"][1]["bias"], s3["params"][1]["bias"])
    assert not np.allclose(s5["params"][0]["bias"], s3["params"][0]["bias"])


def test_no_grad_in_warmup_averages_zeros() -> None:
    n, W, lr = 3, 2, 0.05
    res = simulate(n, W, inner=SGD, warmup_steps=W, schedule={"kind": "constant", "period": 2},
                   no_grad={2: ["bias"]})
    x = x0()
    for t in range(1, W + 1):
        gs = [grad(i, t, x) for i in range(n)]
        gs[2] = dict(gs[2], bias=np.zeros_like(gs[2]["bias"]))
        g = avg(gs)
        x = {k: x[k] - lr * g[k] for k in x}
    same_everywhere(res)
    close(res["params"][0], x)
    # no_grad_in_warmup=False: warm-up gradients are computed normally
    off = simulate(n, W, inner=SGD, warmup_steps=W, schedule={"kind": "constant", "period": 2},
                   no_grad={2: ["bias"]}, no_grad_in_warmup=False)
    plain = simulate(n, W, inner=SGD, warmup_steps=W, schedule={"kind": "constant", "period": 2})
    close(off["params"][0], plain["params"][0], rtol=0)
    assert not np.allclose(res["params"][0]["bias"], plain["params"][0]["bias"])


def test_no_grad_adaalter_a2_stays_and_is_averaged() -> None:
    n, H, b0sq = 2, 2, 0.5
    res = simulate(n, 2, inner={"name": "adaalter", "lr": 0.1, "eps": 1.0,
                                "initial_accumulator_value": b0sq},
                   schedule={"kind": "constant", "period": H}, no_grad={0: ["bias"]})
    xs = [x0() for _ in range(n)]
    A2 = [{k: np.full_like(v, b0sq) for k, v in xs[0].items()} for _ in range(n)]
    for t in (1, 2):
        for i in range(n):
            g = grad(i, t, xs[i])
            for k in g:
                if i == 0 and k == "bias":
                    continue
                xs[i][k] = xs[i][k] - 0.1 * g[k] / np.sqrt(b0sq + t * 1.0)
                A2[i][k] = A2[i][k] + g[k] * g[k]
    B2 = avg(A2)
    for i in range(n):
        close(res["params"][i], avg(xs))
        close(res["B2"][i], B2)


# ---------------------------------------------------------------- both options off
@pytest.mark.parametrize("cfg", [
    dict(n=3, steps=9, inner=MOM, warmup_steps=2, schedule={"kind": "constant", "period": 3},
         state_policy="average"),
    dict(n=2, steps=[5, 8], inner={"name": "adam", "lr": 0.01}, schedule={
        "kind": "constant", "period": 2}, state_policy="reset",
         algorithm={"name": "slowmo", "alpha": 0.8, "beta": 0.5}),
    dict(n=2, steps=7, inner={"name": "adaalter", "lr": 0.2, "lr_warmup_steps": 3},
         warmup_steps=1, schedule={"kind": "adaptive", "initial_period": 2,
                                   "sampling_steps": 4}, final_sync=True),
])
def test_options_off_are_the_old_path(cfg: dict) -> None:
    cfg = dict(cfg)
    n, steps = cfg.pop("n"), cfg.pop("steps")
    base = simulate(n, steps, **cfg)
    for kw in (dict(skip_steps=None, no_grad=None), dict(skip_steps={}, no_grad={}),
               dict(skip_steps={0: []}, no_grad={1: []}, no_grad_in_warmup=False)):
        other = simulate(n, steps, **cfg, **kw)
        for i in range(n):
            close(other["params"][i], base["params"][i], rtol=0)
            for key in ("momentum_buffer", "exp_avg", "A2", "B2"):
                if key in base["opt_state"][i]:
                    close(other["opt_state"][i][key], base["opt_state"][i][key], rtol=0)
        assert other["sync_steps"] == base["sync_steps"] and other["S"] == base["S"]
        assert other["losses"] == base["losses"]
        assert other["skipped_steps"] == [[]] * n


def test_rejects_bad_skip_and_no_grad() -> None:
    sched = {"kind": "constant", "period": 2}
    for kw in (dict(skip_steps={2: [1]}), dict(skip_steps={0: [5]}), dict(skip_steps={0: [0]}),
               dict(no_grad={0: ["nope"]}), dict(no_grad={-1: ["bias"]})):
        with pytest.raises(ValueError):
            simulate(2, 4, inner=SGD, schedule=sched, **kw)


# ================================================================ two-level averaging
def _c(h: float) -> dict:
    return {"kind": "constant", "period": h}


def _spread(res: dict) -> float:
    return max(float(np.max(np.abs(p[k] - res["params"][0][k])))
               for p in res["params"] for k in p)


def test_two_level_one_group_is_flat_averaging_every_L() -> None:
    n, T, L = 3, 7, 2
    # global schedule Never: the local rounds of the one group are plain averages every L
    res = simulate(n, T, inner=SGD, schedule=_c(math.inf), local_period=L)
    want = _local_sgd_by_hand(n, T, L, SGD["lr"])
    for i in range(n):
        close(res["params"][i], want[i])
    assert res["syncs"] == 0 and res["groups"] == [[0, 1, 2]]
    assert res["local_syncs"] == [3] * n and res["local_sync_steps"] == [[2, 4, 6]] * n
    # SlowMo globally every 4 steps, local averages every 2: the global round works on the
    # (already identical) group mean; local rounds do no SlowMo step
    lr, alpha, beta = SGD["lr"], 0.8, 0.5
    res = simulate(n, 9, inner=SGD, schedule=_c(4), local_period=L,
                   algorithm={"name": "slowmo", "alpha": alpha, "beta": beta})
    xs = [x0() for _ in range(n)]
    anc, u = x0(), {k: np.zeros_like(v) for k, v in x0().items()}
    for t in range(1, 10):
        xs = [_sgd(i, t, xs[i]) for i in range(n)]
        if t % L == 0:
            xs = [avg(xs)] * n
        if t % 4 == 0:
            xa = avg(xs)
            u = {k: beta * u[k] + (anc[k] - xa[k]) / lr for k in u}
            anc = {k: anc[k] - alpha * lr * u[k] for k in anc}
            xs = [dict(anc)] * n
    for i in range(n):
        close(res["params"][i], xs[i])
        close(res["x0"][i], anc)
    assert res["sync_steps"] == [4, 8] and res["local_syncs"] == [4] * n


@pytest.mark.parametrize("steps", [9, [5, 9, 7]])
def test_two_level_singleton_groups_and_no_local_period_are_flat(steps) -> None:
    cfg = dict(inner=MOM, schedule=_c(3), warmup_steps=1, state_policy="average",
               algorithm={"name": "slowmo", "alpha": 0.8, "beta": 0.5}, final_sync=True)
    flat = simulate(3, steps, **cfg)
    single = simulate(3, steps, **cfg, groups=[[2], [0], [1]], local_period=2)
    ignored = simulate(3, steps, **cfg, groups=[[0, 1], [2]])  # local_period=None: flat
    for other in (single, ignored):
        for i in range(3):
            close(other["params"][i], flat["params"][i], rtol=0)
            close(other["opt_state"][i]["momentum_buffer"],
                  flat["opt_state"][i]["momentum_buffer"], rtol=0)
        assert other["S"] == flat["S"] and other["sync_steps_per_rank"] == flat[
            "sync_steps_per_rank"]
    assert ignored["local_syncs"] == [0, 0, 0] and ignored["groups"] is None
    assert single["groups"] == [[2], [0], [1]]
    if steps == 9:  # warm-up 1: local rounds after steps 3 (L), 4 (+ global), 6, 7 (+ global),
        # 9; the final global round (average_parameters()) has no local round before it
        assert single["local_sync_steps"] == [[3, 4, 6, 7, 9]] * 3
        assert single["sync_steps"] == [4, 7, 9]


@pytest.mark.parametrize("overlap", [False, True])
def test_two_level_final_sync_is_one_flat_round_without_local_round(overlap: bool) -> None:
    # unequal groups, so a local round before the final flat round would change the mean
    # (mean of group means != mean); L = 2, H = 4, T = 5: step 5 ends with no round
    n, G, L, H, T = 3, [[0, 1], [2]], 2, 4, 5
    res = simulate(n, T, inner=SGD, schedule=_c(H), groups=G, local_period=L, overlap=overlap,
                   final_sync=True)
    xs = [x0() for _ in range(n)]
    s = a = None
    for t in range(1, T + 1):
        xs = [_sgd(i, t, xs[i]) for i in range(n)]
        if t % L == 0:
            for g in G:
                m = avg([xs[i] for i in g])
                for i in g:
                    xs[i] = dict(m)
        if t % H == 0:
            if overlap:
                s, a = [dict(x) for x in xs], avg(xs)
            else:
                xs = [avg(xs)] * n
    if overlap:                                   # complete the round in flight
        xs = [{k: a[k] + (xs[i][k] - s[i][k]) for k in a} for i in range(n)]
    want = avg(xs)                                # then one flat round, no local round
    for p in res["params"]:
        close(p, want, rtol=1e-12)
    assert res["local_sync_steps"] == [[2, 4]] * n and res["sync_steps"] == [4, 5]
    grouped = avg([avg(xs[:2]), xs[2]])           # what a local round first would give
    assert not np.allclose(grouped["weight"], want["weight"], rtol=1e-8, atol=0)


def test_two_level_L1_two_groups_written_out() -> None:
    n, T, H = 4, 7, 3
    G = [[0, 1], [2, 3]]
    res = simulate(n, T, inner=SGD, schedule={"kind": "adaptive", "initial_period": H,
                                              "sampling_steps": 100},
                   groups=G, local_period=1)
    xs = [x0() for _ in range(n)]
    S_want = []
    for t in range(1, T + 1):
        xs = [_sgd(i, t, xs[i]) for i in range(n)]
        for g in G:                                   # local round after every step
            m = avg([xs[i] for i in g])
            for i in g:
                xs[i] = dict(m)
        if t % H == 0:                                # global round on the group means
            a = avg(xs)
            S_want.append(sum(float(np.sum((a[k] - x[k]) ** 2)) for x in xs for k in x) / n)
            xs = [dict(a) for _ in range(n)]
    for i in range(n):
        close(res["params"][i], xs[i])
    assert res["sync_steps"] == [3, 6] and res["local_syncs"] == [T] * n
    np.testing.assert_allclose(res["S"], S_want, rtol=1e-10)
    assert S_want[0] > 0
    # after a local round: identical within a group, not across; after a global: identical
    r1 = simulate(n, 1, inner=SGD, schedule=_c(H), groups=G, local_period=1)
    close(r1["params"][1], r1["params"][0], rtol=0)
    close(r1["params"][3], r1["params"][2], rtol=0)
    assert not np.allclose(r1["params"][0]["weight"], r1["params"][2]["weight"])
    r3 = simulate(n, 3, inner=SGD, schedule=_c(H), groups=G, local_period=1)
    same_everywhere(r3)


def test_two_level_average_state_in_local_rounds_written_out() -> None:
    n, T, H, L, lr, mom = 4, 5, 4, 2, 0.05, 0.9
    G = [[0, 1], [2, 3]]
    res = simulate(n, T, inner=MOM, schedule=_c(H), groups=G, local_period=L,
                   state_policy="average")
    xs = [x0() for _ in range(n)]
    bufs: list = [None] * n
    for t in range(1, T + 1):
        for i in range(n):
            g = grad(i, t, xs[i])
            bufs[i] = dict(g) if bufs[i] is None else {k: mom * bufs[i][k] + g[k] for k in g}
            xs[i] = {k: xs[i][k] - lr * bufs[i][k] for k in g}
        if t % L == 0:                                  # local rounds: params and buffers
            for grp in G:
                mx, mb = avg([xs[i] for i in grp]), avg([bufs[i] for i in grp])
                for i in grp:
                    xs[i], bufs[i] = dict(mx), dict(mb)
        if t % H == 0:
            mx, mb = avg(xs), avg(bufs)
            xs, bufs = [dict(mx)] * n, [dict(mb)] * n
    for i in range(n):
        close(res["params"][i], xs[i])
        close(res["opt_state"][i]["momentum_buffer"], bufs[i])
    assert res["sync_steps"] == [4] and res["local_sync_steps"][0] == [2, 4]
    # right after a local round: buffers identical within a group, not across groups
    r2 = simulate(n, 2, inner=MOM, schedule=_c(H), groups=G, local_period=L,
                  state_policy="average")
    close(r2["opt_state"][1]["momentum_buffer"], r2["opt_state"][0]["momentum_buffer"], rtol=0)
    assert not np.allclose(r2["opt_state"][0]["momentum_buffer"]["bias"],
                           r2["opt_state"][2]["momentum_buffer"]["bias"])


def test_two_level_uneven_join_written_out() -> None:
    # groups {0,1} and {2}; L = 1, no scheduled global round: every round before the end is
    # local; rank 0 joins after step 2 and sends (1, 0) until rank 1 joins after step 4
    res = simulate(3, [2, 4, 3], inner=SGD, schedule=_c(math.inf), groups=[[0, 1], [2]],
                   local_period=1)
    a = avg([_sgd(0, 1, x0()), _sgd(1, 1, x0())])
    a = avg([_sgd(0, 2, a), _sgd(1, 2, a)])           # rank 0 joins with this
    a = avg([a, _sgd(1, 3, a)])
    a = avg([a, _sgd(1, 4, a)])                       # then rank 1 joins: J == 2, global
    z = _sgd(2, 3, _sgd(2, 2, _sgd(2, 1, x0())))
    want = avg([a, a, z])
    for p in res["params"]:
        close(p, want)
    assert res["syncs"] == 1 and res["joined"] == [3]
    assert res["local_syncs"] == [5, 5, 4]
    assert res["local_sync_steps"] == [[1, 2, 2, 2, 2], [1, 2, 3, 4, 4], [1, 2, 3, 3]]


def test_two_level_uneven_join_protocol_sequence() -> None:
    # traced by hand from the protocol (W > 0 or J == m -> global; joined ranks loop)
    res = simulate(4, [7, 9, 5, 12], inner=MOM, schedule=_c(3), groups=[[0, 1], [2, 3]],
                   local_period=2)
    same_everywhere(res)
    assert res["joined"] == [0, 1, 2, 3, 4]
    assert res["sync_steps_per_rank"] == [[3, 6, 7, 7, 7], [3, 6, 9, 9, 9],
                                          [3, 5, 5, 5, 5], [3, 6, 9, 12, 12]]
    assert res["local_syncs"] == [7, 7, 9, 9]
    # with one warm-up step: group {0, 1} enters its next global round only once both joined
    res = simulate(4, [7, 9, 5, 12], inner=MOM, schedule=_c(3), groups=[[0, 1], [2, 3]],
                   local_period=2, warmup_steps=1)
    same_everywhere(res)
    assert res["joined"] == [0, 1, 3, 4]
    assert res["sync_steps_per_rank"] == [[4, 7, 7, 7], [4, 7, 9, 9],
                                          [4, 5, 5, 5], [4, 7, 10, 12]]
    assert res["local_syncs"] == [6, 6, 8, 8]


def test_two_level_refusals() -> None:
    for sched, kw in (({"kind": "time_budget", "seconds": 1.0}, {}),
                      ({"kind": "rounds"}, dict(rounds=[[2], [2]]))):
        with pytest.raises(ValueError, match="TimeBudget"):
            simulate(2, 4, inner=SGD, schedule=sched, local_period=1, **kw)
    with pytest.raises(ValueError, match="AdaAlter"):
        simulate(2, 4, inner={"name": "adaalter", "lr": 0.1}, schedule=_c(2), local_period=1,
                 overlap=True)
    for bad in ([[0], [0, 1]], [[0]], [[0, 1], []], [[0, 2]]):
        with pytest.raises(ValueError, match="partition"):
            simulate(2, 4, inner=SGD, schedule=_c(2), local_period=1, groups=bad)
    with pytest.raises(ValueError):
        simulate(2, 4, inner=SGD, schedule=_c(2), local_period=0)


# ================================================================ overlapped rounds
def _overlap_by_hand(n: int, T: int, H: int, lr: float = SGD["lr"], final: bool = False):
    """One-round-delayed averaging written out: (params, s, pending avg, S list)."""
    xs = [x0() for _ in range(n)]
    s: list | None = None
    pending: Params | None = None
    Ss = []
    for t in range(1, T + 1):
        xs = [_sgd(i, t, xs[i], lr) for i in range(n)]
        if t % H == 0:
            if s is not None:
                xs = [{k: pending[k] + (xs[i][k] - s[i][k]) for k in xs[i]} for i in range(n)]
            s = [dict(x) for x in xs]
            pending = avg(s)
            Ss.append(sum(float(np.sum((pending[k] - x[k]) ** 2)) for x in s for k in x) / n)
    if final:
        if s is not None:
            xs = [{k: pending[k] + (xs[i][k] - s[i][k]) for k in xs[i]} for i in range(n)]
        xs = [avg(xs)] * n
    return xs, s, pending, Ss


def test_overlap_n1_is_plain_local_steps() -> None:
    T = 7
    res = simulate(1, T, inner=SGD, schedule=_c(2), overlap=True)
    close(res["params"][0], _local_sgd_by_hand(1, T, 10**9, SGD["lr"])[0], rtol=1e-12)
    assert res["syncs"] == 2 and res["sync_steps"] == [2, 4, 6]
    assert res["complete_steps"] == [4, 6, None]
    fl = res["in_flight"][0]
    assert fl["pending"] and fl["round"] == 2
    close(fl["s"], _local_sgd_by_hand(1, 6, 10**9, SGD["lr"])[0], rtol=1e-12)


def test_overlap_written_out_and_differs_from_blocking() -> None:
    n, T, H = 2, 7, 2
    res = simulate(n, T, inner=SGD, schedule=_c(H), overlap=True)
    xs, s, pending, Ss = _overlap_by_hand(n, T, H)
    for i in range(n):
        close(res["params"][i], xs[i])
        close(res["in_flight"][i]["s"], s[i])
        close(res["in_flight"][i]["avg"], pending)
        close(res["in_flight"][i]["sum"], {k: 2 * pending[k] for k in pending})
    np.testing.assert_allclose(res["S"], Ss, rtol=1e-10)
    assert res["syncs"] == 2 and res["syncs_per_rank"] == [2, 2]
    blocking = simulate(n, T, inner=SGD, schedule=_c(H))
    assert not np.allclose(blocking["params"][0]["weight"], res["params"][0]["weight"])
    # final sync: the round in flight completes, then one blocking round: identical replicas
    fin = simulate(n, T, inner=SGD, schedule=_c(H), overlap=True, final_sync=True)
    want = _overlap_by_hand(n, T, H, final=True)[0]
    same_everywhere(fin)
    close(fin["params"][0], want[0])
    assert fin["syncs"] == 4 and fin["complete_steps"] == [4, 6, 7, 7]
    assert not fin["in_flight"][0]["pending"]


def test_overlap_mid_flight_snapshot_resumes() -> None:
    """in_flight holds what state_dict() stores mid-round; continuing from it by hand gives
    the longer run (the next boundary completes the stored round)."""
    n, H = 3, 2
    sched = _c(H)
    r4 = simulate(n, 4, inner=SGD, schedule=sched, overlap=True)
    r5 = simulate(n, 5, inner=SGD, schedule=sched, overlap=True)
    r6 = simulate(n, 6, inner=SGD, schedule=sched, overlap=True)
    for i in range(n):
        fl = r5["in_flight"][i]
        assert fl["pending"] and fl["round"] == 1
        close(fl["s"], r4["params"][i], rtol=0)  # sent at the boundary, right after completing
        close(fl["sum"], {k: sum(r4["params"][j][k] for j in range(n)) for k in fl["s"]})
        x6 = _sgd(i, 6, r5["params"][i])
        close(r6["params"][i], {k: fl["avg"][k] + (x6[k] - fl["s"][k]) for k in x6},
              rtol=1e-14)


def test_overlap_slowmo_delayed_written_out() -> None:
    n, T, H, lr, alpha, beta = 2, 7, 2, SGD["lr"], 0.8, 0.5
    res = simulate(n, T, inner=SGD, schedule=_c(H), overlap=True,
                   algorithm={"name": "slowmo", "alpha": alpha, "beta": beta})
    xs = [x0() for _ in range(n)]
    anc, u = x0(), {k: np.zeros_like(v) for k, v in x0().items()}
    s = a = None
    for t in range(1, T + 1):
        xs = [_sgd(i, t, xs[i]) for i in range(n)]
        if t % H == 0:
            if s is not None:
                u = {k: beta * u[k] + (anc[k] - a[k]) / lr for k in u}
                anc = {k: anc[k] - alpha * lr * u[k] for k in anc}
                xs = [{k: anc[k] + (xs[i][k] - s[i][k]) for k in anc} for i in range(n)]
            s = [dict(x) for x in xs]
            a = avg(s)
    for i in range(n):
        close(res["params"][i], xs[i])
        close(res["x0"][i], anc)
        close(res["u"][i], u)
    # outer SGD with SGD(alpha, beta) = SlowMo (constant lr), delayed variant too
    out = simulate(n, T, inner=SGD, schedule=_c(H), overlap=True,
                   algorithm={"name": "outer_sgd", "lr": alpha, "momentum": beta})
    for i in range(n):
        close(out["params"][i], xs[i], rtol=1e-9)


def test_overlap_state_policies_written_out() -> None:
    n, T, H, lr, mom = 2, 4, 2, 0.05, 0.9
    inner = {"name": "sgd", "lr": lr, "momentum": mom}

    def run_by_hand(policy: str):
        xs, bufs = [x0() for _ in range(n)], [None] * n
        s = sb = None
        for t in range(1, T + 1):
            for i in range(n):
                g = grad(i, t, xs[i])
                bufs[i] = dict(g) if bufs[i] is None else {k: mom * bufs[i][k] + g[k] for k in g}
                xs[i] = {k: xs[i][k] - lr * bufs[i][k] for k in g}
            if t % H == 0:
                if s is not None:
                    a, ab = avg(s), avg(sb)
                    xs = [{k: a[k] + (xs[i][k] - s[i][k]) for k in a} for i in range(n)]
                    if policy == "average":
                        bufs = [{k: ab[k] + (bufs[i][k] - sb[i][k]) for k in a}
                                for i in range(n)]
                    elif policy == "reset":
                        bufs = [{k: np.zeros_like(v) for k, v in b.items()} for b in bufs]
                s, sb = [dict(x) for x in xs], [dict(b) for b in bufs]
        return xs, bufs

    for policy in ("keep", "reset", "average"):
        res = simulate(n, T, inner=inner, schedule=_c(H), overlap=True, state_policy=policy)
        xs, bufs = run_by_hand(policy)
        for i in range(n):
            close(res["params"][i], xs[i])
            close(res["opt_state"][i]["momentum_buffer"], bufs[i])
        if policy == "reset":
            assert not any(v.any() for v in res["opt_state"][0]["momentum_buffer"].values())
        if policy == "average":  # the state was sent too
            assert set(res["in_flight"][0]["s_state"]) == {("weight", "momentum_buffer"),
                                                           ("bias", "momentum_buffer")}
    keep = simulate(n, T, inner=inner, schedule=_c(H), overlap=True, state_policy="keep")
    assert keep["payload_bytes"] == [2 * 8 * 28] * n
    av = simulate(n, T, inner=inner, schedule=_c(H), overlap=True, state_policy="average")
    assert av["payload_bytes"] == [2 * 8 * 56] * n


def test_overlap_adpsgd_updates_at_completion() -> None:
    Ks, p0 = 8, 2
    f = lambda k: 1.0 if k < Ks else 0.1  # noqa: E731
    res = simulate(2, 60, inner={"name": "sgd", "lr": 0.05, "momentum": 0.0, "lr_schedule": f},
                   overlap=True, schedule={"kind": "adaptive", "initial_period": p0,
                                           "sampling_steps": Ks})
    p, C2, m, t, prev = p0, 0.0, 0, 0, None
    for k, S in enumerate(res["S"]):
        t += p                                    # boundary k
        assert res["sync_steps"][k] == t and res["periods"][k] == p
        if prev is not None:                      # completion of round k-1 at step t
            lr = 0.05 * f(t - 1)
            if t <= Ks:
                C2 = (C2 * m + prev / lr) / (m + 1)
                m += 1
            elif prev < 0.7 * lr * C2:
                p += 1
            elif prev > 1.3 * lr * C2:
                p = max(1, p - 1)
        prev = S
    assert res["C2"] == pytest.approx(C2, rel=1e-12) and res["period"] == p
    assert m == 3  # rounds 0..2 completed at steps 4, 6, 8 (<= Ks); the one started at 8 not
    blocking = simulate(2, 60, inner={"name": "sgd", "lr": 0.05, "momentum": 0.0,
                                      "lr_schedule": f},
                        schedule={"kind": "adaptive", "initial_period": p0,
                                  "sampling_steps": Ks})
    assert blocking["sync_steps"] != res["sync_steps"]


def test_overlap_increasing_boundaries_are_the_flat_ones() -> None:
    sched = {"kind": "increasing", "initial_period": 1, "factor": 2, "rounds_per_stage": 2,
             "max_period": 4}
    a = simulate(2, 20, inner=SGD, warmup_steps=1, schedule=sched, overlap=True)
    assert a["sync_steps"] == [2, 3, 5, 7, 11, 15, 19]
    assert a["syncs"] == 6


@pytest.mark.parametrize("algorithm", [None, {"name": "slowmo", "alpha": 1.0, "beta": 0.5}])
def test_overlap_uneven_join_identical(algorithm) -> None:
    res = simulate(3, [7, 4, 10], inner=MOM, warmup_steps=2, algorithm=algorithm,
                   schedule=_c(2), overlap=True, state_policy="average")
    same_everywhere(res)
    assert res["joined"][-1] == 3 and not any(f["pending"] for f in res["in_flight"])
    assert res["syncs_per_rank"] == [len(res["S"])] * 3


def test_overlap_join_written_out() -> None:
    # steps [3, 6], H = 2: rank 0 joins after step 3 (completes round 0, then blocking rounds);
    # rank 1 completes each round at its next boundary
    res = simulate(2, [3, 6], inner=SGD, schedule=_c(2), overlap=True)
    p0 = _sgd(0, 2, _sgd(0, 1, x0()))
    p1 = _sgd(1, 2, _sgd(1, 1, x0()))
    s0, s1 = p0, p1
    a0 = avg([s0, s1])                                          # round 0 (both overlapped)
    p0 = _sgd(0, 3, p0)
    p0 = {k: a0[k] + (p0[k] - s0[k]) for k in a0}               # rank 0: join completes 0
    p1 = _sgd(1, 4, _sgd(1, 3, p1))
    p1 = {k: a0[k] + (p1[k] - s1[k]) for k in a0}               # rank 1: boundary 4
    s1 = p1
    a1 = avg([p0, s1])                                          # round 1
    p0 = a1                                                     # blocking for rank 0
    p1 = _sgd(1, 6, _sgd(1, 5, p1))
    p1 = {k: a1[k] + (p1[k] - s1[k]) for k in a1}               # boundary 6
    s1 = p1
    a2 = avg([p0, s1])                                          # round 2
    p0 = a2
    # rank 1 joins: completes round 2 (no progress since), blocking round 3
    p1 = {k: a2[k] + (p1[k] - s1[k]) for k in a2}
    want = avg([p0, p1])
    for p in res["params"]:
        close(p, want)
    assert res["joined"] == [0, 1, 1, 2] and res["sync_steps_per_rank"] == [[2, 3, 3, 3],
                                                                            [2, 4, 6, 6]]


def test_overlap_refusals() -> None:
    with pytest.raises(ValueError, match="AdaAlter"):
        simulate(2, 4, inner={"name": "adaalter", "lr": 0.1}, schedule=_c(2), overlap=True)
    with pytest.raises(ValueError, match="skip"):
        simulate(2, 4, inner=SGD, schedule=_c(2), overlap=True, nonfinite="skip")
    with pytest.raises(NotImplementedError):
        simulate(2, 4, inner=SGD, schedule=_c(2), nonfinite="skip")


# ================================================================ compressed syncs
def test_fp16_quantizer_and_sum() -> None:
    # exactly representable values: no error, and the sum of representable values whose
    # partial sums are representable is exact -> delta equals the uncompressed mean
    rng = np.random.default_rng(0)
    ds = [rng.integers(-300, 300, size=(4, 6)) * 2.0 ** -9 for _ in range(3)]
    qs = [quantize_fp16(d) for d in ds]
    for d, q in zip(ds, qs):
        assert q.dtype == np.float16
        np.testing.assert_array_equal(q.astype(np.float64), d)
    delta = sum_fp16(qs).astype(np.float64) * (1.0 / 3)
    np.testing.assert_array_equal(delta, (ds[0] + ds[1] + ds[2]) * (1.0 / 3))
    # round to nearest even, from float64 in one rounding; overflow to inf
    q = quantize_fp16(np.array([1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -11 + 2.0 ** -40,
                                65519.0, 65520.0, -7e4]))
    np.testing.assert_array_equal(q.astype(np.float64)[:5],
                                  [1.0, 1 + 2.0 ** -9, 1 + 2.0 ** -10, 65504.0, np.inf])
    assert q[5] == -np.inf
    # the sum rounds to float16 after each addition, in rank order
    s = sum_fp16([np.array([2048.0], np.float16), np.array([1.0], np.float16),
                  np.array([1.0], np.float16)])
    assert s.dtype == np.float16 and float(s[0]) == 2048.0        # exact sum: 2050
    s = sum_fp16([np.array([1.0], np.float16), np.array([1.0], np.float16),
                  np.array([2048.0], np.float16)])
    assert float(s[0]) == 2050.0


def test_int8_quantizer_properties() -> None:
    rng = np.random.default_rng(1)
    d = rng.normal(0.0, 1.0, size=600) * np.repeat([1e-3, 1.0, 50.0], [256, 256, 88])
    d[300:320] = 0.0
    q, sc = quantize_int8(d)
    assert q.dtype == np.int8 and q.shape == d.shape and sc.shape == (3,)
    assert q.min() >= -127 and q.max() <= 127
    e = d - dequantize_int8(q, sc)
    for b in range(3):
        blk = slice(256 * b, 256 * (b + 1))
        amax = np.max(np.abs(d[blk]))
        assert sc[b] == amax / 127.0
        assert np.all(np.abs(e[blk]) <= sc[b] / 2 * (1 + 1e-12))
        assert np.max(np.abs(q[blk])) == 127                     # the block max hits +-127
    # round half to even: amax = 127 -> r = 1, so q = rint(d)
    q2, sc2 = quantize_int8(np.array([127.0, 2.5, 3.5, -2.5, 0.5, -0.49]))
    np.testing.assert_array_equal(q2, [127, 2, 4, -2, 0, 0])
    assert sc2[0] == 1.0
    # an all-zero block: scale 0, q 0; row-major blocks of a 2-D tensor, last one shorter
    z = np.zeros((3, 100))
    z[2, 90] = -4.0
    q3, sc3 = quantize_int8(z)
    assert sc3.tolist() == [0.0, 4.0 / 127.0] and q3[2, 90] == -127
    assert not q3[:2].any() and np.count_nonzero(q3) == 1
    # blocks never span tensors: per-tensor calls, the big tensor does not set the small scale
    qa, sa = quantize_int8(np.full(300, 100.0))
    qb, sb = quantize_int8(np.full(10, 0.01))
    assert sa.shape == (2,) and sb.shape == (1,) and sb[0] == 0.01 / 127.0
    np.testing.assert_array_equal(qb, 127)
    # mean of the gathered payloads in rank order
    ds = [rng.normal(size=300) for _ in range(3)]
    pl = [quantize_int8(x) for x in ds]
    want = ((dequantize_int8(*pl[0]) + dequantize_int8(*pl[1])) + dequantize_int8(*pl[2])) / 3
    np.testing.assert_allclose(dequantize_int8_mean([p[0] for p in pl], [p[1] for p in pl], 3),
                               want, rtol=1e-15)
    with pytest.raises(FloatingPointError):
        quantize_int8(np.array([1.0, np.nan]))


def _int8_by_hand(d: np.ndarray) -> np.ndarray:
    """D(Q(d)) written independently: pad to whole blocks, per-block scale."""
    flat = d.ravel()
    pad = -flat.size % 256
    blocks = np.concatenate([flat, np.zeros(pad)]).reshape(-1, 256)
    amax = np.max(np.abs(blocks), axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(amax > 0, np.clip(np.rint(blocks * (127.0 / amax)), -127, 127), 0.0)
    return (q * (amax / 127.0)).ravel()[:flat.size].reshape(d.shape)


@pytest.mark.parametrize("comp", ["fp16", "int8"])
def test_compression_written_out(comp: str) -> None:
    n, T, H = 3, 6, 2
    res = simulate(n, T, inner=SGD, schedule=_c(H), compression=comp)
    xs = [x0() for _ in range(n)]
    c = x0()
    e = [{k: np.zeros_like(v) for k, v in c.items()} for _ in range(n)]
    S_want = []
    for t in range(1, T + 1):
        xs = [_sgd(i, t, xs[i]) for i in range(n)]
        if t % H == 0:
            sent = []
            for i in range(n):
                d = {k: (xs[i][k] - c[k]) + e[i][k] for k in c}
                if comp == "fp16":
                    dq = {k: d[k].astype(np.float16) for k in d}
                else:
                    dq = {k: _int8_by_hand(d[k]) for k in d}
                e[i] = {k: d[k] - dq[k].astype(np.float64) for k in d}
                sent.append(dq)
            if comp == "fp16":
                tot = {k: ((sent[0][k].astype(np.float64) + sent[1][k]).astype(np.float16)
                           .astype(np.float64) + sent[2][k]).astype(np.float16) for k in c}
                delta = {k: tot[k].astype(np.float64) * (1.0 / n) for k in c}
            else:
                delta = {k: (sent[0][k] + sent[1][k] + sent[2][k]) * (1.0 / n) for k in c}
            c = {k: c[k] + delta[k] for k in c}
            # ADPSGD's S: x_avg = c + delta against the ranks' own parameters
            S_want.append(sum(float(np.sum((c[k] - x[k]) ** 2)) for x in xs for k in c) / n)
            xs = [dict(c) for _ in range(n)]
    for i in range(n):
        close(res["params"][i], xs[i], rtol=1e-15)
        close(res["anchor_c"][i], c, rtol=1e-15)
        close(res["residual"][i], e[i], rtol=1e-9)
    np.testing.assert_allclose(res["S"], S_want, rtol=1e-12)
    assert any(np.abs(v).max() > 0 for v in res["residual"][0].values())
    plain = simulate(n, T, inner=SGD, schedule=_c(H))
    err = max(float(np.max(np.abs(res["params"][0][k] - plain["params"][0][k]))) for k in c)
    assert 0 < err < (1e-3 if comp == "fp16" else 1e-2)
    per_round = 2 * 28 if comp == "fp16" else 28 + 4 * 2  # weight 24, bias 4: one block each
    assert res["payload_bytes"] == [per_round * 3] * n
    assert plain["payload_bytes"] == [8 * 28 * 3] * n


@pytest.mark.parametrize("comp", ["fp16", "int8"])
@pytest.mark.parametrize("overlap", [False, True])
def test_error_feedback_telescopes(comp: str, overlap: bool) -> None:
    """sum over rounds of the decoded sends + the final residual == the sum over rounds of
    each rank's change since the common point; the common point moves by the mean sends."""
    n = 3
    res = simulate(n, [9, 7, 8], inner=MOM, warmup_steps=1, schedule=_c(2), compression=comp,
                   overlap=overlap, final_sync=True)
    same_everywhere(res)
    rounds = len(res["S"])
    assert all(len(snd) == rounds for snd in res["sends"])
    for i in range(n):
        for k in ("weight", "bias"):
            dec = sum(snd["decoded"][k] for snd in res["sends"][i])
            prog = sum(snd["progress"][k] for snd in res["sends"][i])
            np.testing.assert_allclose(dec + res["residual"][i][k], prog, rtol=1e-12,
                                       atol=1e-15)
            # not vacuous: the quantizer lost something in some round (the join / final
            # rounds resend the residual, d = e_i, and may drain it to exactly 0)
            assert max(float(np.abs(snd["d"][k] - snd["decoded"][k]).max())
                       for snd in res["sends"][i]) > 0
    c0 = simulate(n, 1, inner=MOM, warmup_steps=1, schedule=_c(2))["params"][0]
    for k in ("weight", "bias"):
        moved = sum(sum(res["sends"][i][r]["decoded"][k] for i in range(n)) / n
                    for r in range(rounds))
        gap = np.abs(res["anchor_c"][0][k] - (c0[k] + moved))
        if comp == "int8":  # the dequantized sum is exact up to float64 rounding
            assert gap.max() <= 1e-14
        else:
            # the float16 allreduce rounds each partial sum (n - 1 additions a round); that
            # rounding is not fed back: c moves by fp16sum / n, not by the mean of the sends
            bound = sum((n - 1) * 2.0 ** -11 * sum(np.abs(res["sends"][i][r]["decoded"][k])
                                                   for i in range(n)) / n + 2.0 ** -24
                        for r in range(rounds))
            assert np.all(gap <= bound) and gap.max() > 1e-8
        np.testing.assert_array_equal(res["anchor_c"][0][k], res["params"][0][k])


def test_compression_slowmo_one_round_written_out() -> None:
    n, lr, alpha, beta = 2, SGD["lr"], 0.8, 0.5
    res = simulate(n, 2, inner=SGD, schedule=_c(2), compression="fp16",
                   algorithm={"name": "slowmo", "alpha": alpha, "beta": beta})
    xs = [_sgd(i, 2, _sgd(i, 1, x0())) for i in range(n)]
    anc = x0()
    q = [{k: (xs[i][k] - anc[k]).astype(np.float16) for k in anc} for i in range(n)]
    delta = {k: (q[0][k].astype(np.float64) + q[1][k]).astype(np.float16).astype(np.float64)
             * 0.5 for k in anc}
    xa = {k: anc[k] + delta[k] for k in anc}
    u = {k: (anc[k] - xa[k]) / lr for k in anc}
    new = {k: anc[k] - alpha * lr * u[k] for k in anc}
    for i in range(n):
        close(res["params"][i], new, rtol=1e-15)
        close(res["x0"][i], new, rtol=0)
        close(res["anchor_c"][i], res["x0"][i], rtol=0)


def test_compression_overlap_written_out() -> None:
    n, T, H = 2, 5, 2
    res = simulate(n, T, inner=SGD, schedule=_c(H), compression="fp16", overlap=True)
    xs = [x0() for _ in range(n)]
    c = x0()
    e = [{k: np.zeros_like(v) for k, v in c.items()} for _ in range(n)]
    s = delta = None
    for t in range(1, T + 1):
        xs = [_sgd(i, t, xs[i]) for i in range(n)]
        if t % H == 0:
            if s is not None:
                c = {k: c[k] + delta[k] for k in c}
                xs = [{k: c[k] + (xs[i][k] - s[i][k]) for k in c} for i in range(n)]
            s = [dict(x) for x in xs]
            q = []
            for i in range(n):
                d = {k: (xs[i][k] - c[k]) + e[i][k] for k in c}
                q.append({k: d[k].astype(np.float16) for k in d})
                e[i] = {k: d[k] - q[i][k].astype(np.float64) for k in d}
            tot = {k: (q[0][k].astype(np.float64) + q[1][k]).astype(np.float16) for k in c}
            delta = {k: tot[k].astype(np.float64) * 0.5 for k in c}
    for i in range(n):
        close(res["params"][i], xs[i], rtol=1e-15)
        close(res["anchor_c"][i], c, rtol=0)
        close(res["residual"][i], e[i], rtol=1e-9)
        fl = res["in_flight"][i]
        assert fl["pending"] and fl["sum"]["weight"].dtype == np.float16
        close(fl["avg"], delta, rtol=0)
        close(fl["s"], s[i], rtol=0)


def test_compression_two_level_residual_changes_only_at_global_rounds() -> None:
    G = [[0, 1], [2, 3]]
    kw = dict(inner=SGD, schedule=_c(2), groups=G, local_period=1, compression="int8")
    r2, r3, r4 = (simulate(4, T, **kw) for T in (2, 3, 4))
    for i in range(4):
        close(r3["residual"][i], r2["residual"][i], rtol=0)     # step 3: local round only
        close(r3["anchor_c"][i], r2["anchor_c"][i], rtol=0)
    close(r3["params"][0], r3["params"][1], rtol=0)
    assert not np.allclose(r3["params"][0]["weight"], r3["params"][2]["weight"])
    same_everywhere(r4)
    assert not np.array_equal(r4["residual"][0]["weight"], r2["residual"][0]["weight"])
    assert r4["local_syncs"] == [4] * 4 and r4["syncs"] == 2


def test_compression_fp16_overflow_raises() -> None:
    with pytest.raises(FloatingPointError):
        simulate(2, 1, inner={"name": "sgd", "lr": 1e6, "momentum": 0.0}, schedule=_c(1),
                 compression="fp16")


def test_compression_refusals() -> None:
    for kw in (dict(state_policy="average"), dict(inner={"name": "adaalter", "lr": 0.1}),
               dict(compression="bf16"), dict(compression="topk"), dict(nonfinite="skip")):
        kw = dict(dict(inner=SGD, compression="int8"), **kw)
        with pytest.raises(ValueError):
            simulate(2, 4, schedule=_c(2), **kw)


@pytest.mark.parametrize("comp", ["fp16", "int8"])
def test_compression_uneven_join_overlap_outer(comp: str) -> None:
    res = simulate(3, [5, 9, 7], inner=MOM, schedule=_c(2), compression=comp, overlap=True,
                   state_policy="reset",
                   algorithm={"name": "outer_sgd", "lr": 0.7, "momentum": 0.9,
                              "nesterov": True})
    same_everywhere(res)
    close(res["anchor_c"][0], res["x0"][0], rtol=0)
    close(res["params"][0], res["x0"][0], rtol=0)
    assert res["joined"][-1] == 3


# ================================================================ overlap with two levels
# (overlap=True with local_period: global rounds overlapped, local rounds blocking)
def _group_mean(xs: list, G: list[list[int]]) -> list:
    xs = list(xs)
    for g in G:
        m = avg([xs[i] for i in g])
        for i in g:
            xs[i] = dict(m)
    return xs


@pytest.mark.parametrize("L,H", [(1, 1), (1, 3), (2, 2), (2, 3)])
def test_two_level_overlap_one_group_is_blocking_averaging_every_L(L: int, H: int) -> None:
    """One group of all ranks: the local round before each global round already makes every
    x_i equal, so every s_i of the round in flight is the same and a = s_i (up to rounding):
    the completion x_i = a + (x_i - s_i) changes nothing. The run is blocking model averaging
    at every round of either level (L = 1: synchronous SGD; L = H: flat blocking local SGD with
    period H), NOT flat overlap (whose ranks keep their own progress past each completion)."""
    n, T = 3, 7

    def blocking_by_hand(T: int) -> list[Params]:
        xs, since = [x0() for _ in range(n)], 0
        for t in range(1, T + 1):
            xs, since = [_sgd(i, t, xs[i]) for i in range(n)], since + 1
            if since == L or t % H == 0:       # a local round (the global one adds nothing)
                xs, since = [avg(xs)] * n, 0
        return xs

    res = simulate(n, T, inner=SGD, schedule=_c(H), local_period=L, overlap=True)
    want = blocking_by_hand(T)
    for i in range(n):
        close(res["params"][i], want[i], rtol=1e-12)
    if L == H:
        for i in range(n):
            close(res["params"][i], _local_sgd_by_hand(n, T, L, SGD["lr"])[i], rtol=1e-12)
    assert res["groups"] == [[0, 1, 2]]
    assert res["sync_steps"] == list(range(H, T + 1, H))
    assert res["complete_steps"] == list(range(2 * H, T + 1, H)) + [None]
    fl = res["in_flight"][0]
    assert fl["pending"] and fl["round"] == T // H - 1
    # what travels is the (corrected) group mean at the last global boundary
    close(fl["s"], blocking_by_hand(H * (T // H))[0], rtol=1e-12)
    flat_ov = simulate(n, T, inner=SGD, schedule=_c(L), overlap=True)
    assert not np.allclose(flat_ov["params"][0]["weight"], res["params"][0]["weight"],
                           rtol=1e-6, atol=0)


def test_two_level_overlap_one_group_slowmo_is_delayed_outer_step() -> None:
    """One group of all ranks, SlowMo: local rounds make the replicas equal; the outer step is
    the delayed one, from a = s (the mean sent one global round earlier), x = x0 + (x - s)."""
    n, T, L, H, lr, alpha, beta = 2, 9, 2, 4, SGD["lr"], 0.8, 0.5
    res = simulate(n, T, inner=SGD, schedule=_c(H), local_period=L, overlap=True,
                   algorithm={"name": "slowmo", "alpha": alpha, "beta": beta})
    xs = [x0() for _ in range(n)]
    anc, u = x0(), {k: np.zeros_like(v) for k, v in x0().items()}
    s = None
    for t in range(1, T + 1):
        xs = [_sgd(i, t, xs[i]) for i in range(n)]
        if t % L == 0:
            xs = [avg(xs)] * n
        if t % H == 0:
            if s is not None:
                u = {k: beta * u[k] + (anc[k] - s[k]) / lr for k in u}
                anc = {k: anc[k] - alpha * lr * u[k] for k in anc}
                xs = [{k: anc[k] + (xs[i][k] - s[k]) for k in anc} for i in range(n)]
            s = dict(xs[0])
    for i in range(n):
        close(res["params"][i], xs[i], rtol=1e-12)
        close(res["x0"][i], anc, rtol=1e-12)
    assert res["syncs"] == 1 and res["in_flight"][0]["pending"]
    blocking = simulate(n, T, inner=SGD, schedule=_c(H), local_period=L,
                        algorithm={"name": "slowmo", "alpha": alpha, "beta": beta})
    assert not np.allclose(blocking["params"][0]["weight"], res["params"][0]["weight"],
                           rtol=1e-6, atol=0)


@pytest.mark.parametrize("cfg", [
    dict(steps=9, inner=MOM, schedule=_c(3), warmup_steps=1, state_policy="average",
         algorithm={"name": "slowmo", "alpha": 0.8, "beta": 0.5}, final_sync=True),
    dict(steps=[5, 9, 7], inner=MOM, schedule=_c(2), state_policy="average"),
    dict(steps=[7, 4, 10], inner=MOM, schedule={"kind": "adaptive", "initial_period": 2,
                                                "sampling_steps": 4}, state_policy="reset"),
    dict(steps=[5, 9, 7], inner=MOM, schedule=_c(2), state_policy="reset", compression="int8",
         algorithm={"name": "outer_sgd", "lr": 0.7, "momentum": 0.9, "nesterov": True}),
    dict(steps=8, inner=SGD, schedule={"kind": "increasing", "initial_period": 1},
         compression="fp16", final_sync=True),
])
def test_two_level_overlap_singleton_groups_are_flat_overlap(cfg: dict) -> None:
    cfg = dict(cfg)
    steps = cfg.pop("steps")
    flat = simulate(3, steps, **cfg, overlap=True)
    single = simulate(3, steps, **cfg, overlap=True, groups=[[1], [2], [0]], local_period=2)
    for i in range(3):
        close(single["params"][i], flat["params"][i], rtol=0)
        for key in ("momentum_buffer", "x0", "residual", "anchor_c"):
            a = flat["opt_state"][i].get(key) if key == "momentum_buffer" else (
                flat[key][i] if flat[key] is not None else None)
            b = single["opt_state"][i].get(key) if key == "momentum_buffer" else (
                single[key][i] if single[key] is not None else None)
            assert (a is None) == (b is None)
            if a is not None:
                close(b, a, rtol=0)
        fa, fb = flat["in_flight"][i], single["in_flight"][i]
        assert fa["pending"] == fb["pending"] and fa["round"] == fb["round"]
        if fa["pending"]:
            close(fb["s"], fa["s"], rtol=0)
    for key in ("S", "sync_steps_per_rank", "periods_per_rank", "complete_steps", "lrs",
                "syncs_per_rank", "period_per_rank", "C2_per_rank"):
        assert single[key] == flat[key], key
    if isinstance(steps, list):  # (with even steps the flat log counts ranks out of data
        assert single["joined"] == flat["joined"]  # as joined in the final round; two-level not)
    assert flat["local_syncs"] == [0] * 3 and min(single["local_syncs"]) > 0


def test_two_level_overlap_L1_two_groups_written_out() -> None:
    """n = 4, groups {0, 1} and {2, 3}, L = 1, H = 2, plain SGD: x after every step (every
    step ends with a local round; steps 2, 4, 6 with a global one, overlapped)."""
    n, T, H = 4, 6, 2
    G = [[0, 1], [2, 3]]
    xs = [x0() for _ in range(n)]
    s: list | None = None
    a: Params | None = None
    for t in range(1, T + 1):
        xs = [_sgd(i, t, xs[i]) for i in range(n)]
        xs = _group_mean(xs, G)                           # the local round (blocking)
        if t % H == 0:                                    # then the global round
            if s is not None:                             # complete the one in flight
                xs = [{k: a[k] + (xs[i][k] - s[i][k]) for k in a} for i in range(n)]
            s = [dict(x) for x in xs]                     # send the corrected x_i
            a = avg(s)
        res = simulate(n, t, inner=SGD, schedule=_c(H), groups=G, local_period=1,
                       overlap=True)
        for i in range(n):
            close(res["params"][i], xs[i], rtol=1e-12)
        assert res["local_syncs"] == [t] * n and res["syncs"] == max(0, t // H - 1)
        if s is not None:
            for i in range(n):
                fl = res["in_flight"][i]
                assert fl["pending"] and fl["round"] == t // H - 1
                close(fl["s"], s[i], rtol=1e-12)
                close(fl["avg"], a, rtol=1e-12)
        # within a group identical (a local round ended the step), across groups not
        close(res["params"][1], res["params"][0], rtol=0)
        close(res["params"][3], res["params"][2], rtol=0)
        assert not np.allclose(res["params"][0]["weight"], res["params"][2]["weight"])
    assert res["complete_steps"] == [4, 6, None] and res["sync_steps"] == [2, 4, 6]
    blocking = simulate(n, T, inner=SGD, schedule=_c(H), groups=G, local_period=1)
    assert not np.allclose(blocking["params"][0]["weight"], res["params"][0]["weight"],
                           rtol=1e-6, atol=0)


def test_two_level_overlap_join_written_out() -> None:
    """groups {0, 1} and {2}, L = 1, H = 3, steps [4, 6, 6]. Rank 0 joins after step 4: it
    completes global round 0 at once, so its groupmate averages with the COMPLETED x_0 in the
    local rounds after steps 5 and 6 (and takes step 6 from there); rank 0 takes part blocking
    in global round 1, ranks 1 and 2 overlapped; then ranks 1 and 2 join (completing round 1
    with no progress since) and the last global round is blocking for all."""
    G = [[0, 1], [2]]
    res = simulate(3, [4, 6, 6], inner=SGD, schedule=_c(3), groups=G, local_period=1,
                   overlap=True)
    xs = [x0() for _ in range(3)]
    for t in (1, 2, 3):
        xs = _group_mean([_sgd(i, t, xs[i]) for i in range(3)], G)
    s = [dict(x) for x in xs]                               # global round 0, overlapped
    a0 = avg(s)

    xs = _group_mean([_sgd(i, 4, xs[i]) for i in range(3)], G)   # step 4 + local round

    def rest(x_0: Params) -> Params:
        y = [x_0, xs[1], xs[2]]
        for t in (5, 6):                                    # rank 0 sends (1, 0)
            y = _group_mean([y[0]] + [_sgd(i, t, y[i]) for i in (1, 2)], G)
        c1 = {k: a0[k] + (y[1][k] - s[1][k]) for k in a0}  # ranks 1, 2 complete round 0
        c2 = {k: a0[k] + (y[2][k] - s[2][k]) for k in a0}
        c0 = (y[0] if x_0 is not xs[0]                    # rank 0 blocking, no flight
              else {k: a0[k] + (y[0][k] - s[0][k]) for k in a0})
        return avg([c0, c1, c2])                            # global round 1

    a1 = rest({k: a0[k] + (xs[0][k] - s[0][k]) for k in a0})  # rank 0 joins: completes 0
    for p in res["params"]:
        close(p, a1, rtol=1e-12)
    assert res["joined"] == [0, 1, 3]
    assert res["sync_steps_per_rank"] == [[3, 4, 4], [3, 6, 6], [3, 6, 6]]
    assert res["local_sync_steps"] == [[1, 2, 3, 4, 4, 4, 4], [1, 2, 3, 4, 5, 6, 6],
                                       [1, 2, 3, 4, 5, 6, 6]]
    assert not any(f["pending"] for f in res["in_flight"])
    assert res["syncs_per_rank"] == [3, 3, 3]
    # had rank 0 sent its uncompleted x_0 into the local rounds (completing it only at the
    # global round), the result would differ: rank 1's steps 5 and 6 start elsewhere
    bad = rest(xs[0])
    assert not np.allclose(bad["weight"], a1["weight"], rtol=1e-8, atol=0)


@pytest.mark.parametrize("kw", [
    dict(inner=MOM, state_policy="average"),
    dict(inner=MOM, state_policy="reset", warmup_steps=1,
         algorithm={"name": "slowmo", "alpha": 0.8, "beta": 0.5}),
    dict(inner=MOM, algorithm={"name": "outer_sgd", "lr": 0.7, "momentum": 0.9,
                               "nesterov": True}, final_sync=True),
    dict(inner=SGD, schedule={"kind": "adaptive", "initial_period": 2, "sampling_steps": 5}),
])
def test_two_level_overlap_uneven_join_ends_identical(kw: dict) -> None:
    kw = dict(dict(schedule=_c(3)), **kw)
    res = simulate(4, [7, 9, 5, 12], groups=[[0, 1], [2, 3]], local_period=2, overlap=True,
                   **kw)
    same_everywhere(res)
    assert res["joined"][-1] == 4 and all(j < 4 for j in res["joined"][:-1 - bool(
        kw.get("final_sync"))])
    assert not any(f["pending"] for f in res["in_flight"])
    assert res["syncs_per_rank"] == [len(res["S"])] * 4
    assert res["steps"] == [7, 9, 5, 12]
    if res["x0"] is not None:
        close(res["x0"][0], res["params"][0], rtol=0)


def test_two_level_overlap_fp16_written_out() -> None:
    """Compression composes as in flat overlap: local rounds plain group means, global rounds
    send d = (x_i - c) + e_i after completing the one in flight (c = c + delta,
    x_i = c + (x_i - s_i)); fp16 sum in rank order."""
    n, T, H = 4, 5, 2
    G = [[0, 1], [2, 3]]
    res = simulate(n, T, inner=SGD, schedule=_c(H), groups=G, local_period=1, overlap=True,
                   compression="fp16")
    xs = [x0() for _ in range(n)]
    c = x0()
    e = [{k: np.zeros_like(v) for k, v in c.items()} for _ in range(n)]
    s = delta = None
    for t in range(1, T + 1):
        xs = _group_mean([_sgd(i, t, xs[i]) for i in range(n)], G)
        if t % H == 0:
            if s is not None:
                c = {k: c[k] + delta[k] for k in c}
                xs = [{k: c[k] + (xs[i][k] - s[i][k]) for k in c} for i in range(n)]
            s = [dict(x) for x in xs]
            q = []
            for i in range(n):
                d = {k: (xs[i][k] - c[k]) + e[i][k] for k in c}
                q.append({k: d[k].astype(np.float16) for k in d})
                e[i] = {k: d[k] - q[i][k].astype(np.float64) for k in d}
            tot = {}
            for k in c:
                acc = q[0][k]
                for j in range(1, n):
                    acc = (acc.astype(np.float64) + q[j][k].astype(np.float64)).astype(
                        np.float16)
                tot[k] = acc
            delta = {k: tot[k].astype(np.float64) * (1.0 / n) for k in c}
    for i in range(n):
        close(res["params"][i], xs[i], rtol=1e-15)
        close(res["anchor_c"][i], c, rtol=0)
        close(res["residual"][i], e[i], rtol=1e-9)
        fl = res["in_flight"][i]
        assert fl["pending"] and fl["sum"]["weight"].dtype == np.float16
        close(fl["avg"], delta, rtol=0)
    assert any(np.abs(v).max() > 0 for v in res["residual"][0].values())


@pytest.mark.parametrize("comp", ["fp16", "int8"])
def test_two_level_overlap_compression_keeps_c_equal(comp: str) -> None:
    G = [[0, 1], [2, 3]]
    kw = dict(inner=MOM, schedule=_c(2), groups=G, local_period=1, overlap=True,
              compression=comp)
    runs = {T: simulate(4, T, **kw) for T in range(1, 8)}
    for T, res in runs.items():
        for i in range(1, 4):
            close(res["anchor_c"][i], res["anchor_c"][0], rtol=0)
        if T % 2 == 1 and T > 1:   # a step with a local round only: c and e_i unchanged
            for i in range(4):
                close(res["residual"][i], runs[T - 1]["residual"][i], rtol=0)
                close(res["anchor_c"][i], runs[T - 1]["anchor_c"][i], rtol=0)
    # c moves at the completions (steps 4, 6), e_i at every global round (2, 4, 6)
    assert not np.array_equal(runs[4]["anchor_c"][0]["weight"], runs[2]["anchor_c"][0]["weight"])
    assert np.array_equal(runs[2]["anchor_c"][0]["weight"], runs[1]["anchor_c"][0]["weight"])
    assert not np.array_equal(runs[4]["residual"][0]["weight"], runs[2]["residual"][0]["weight"])
    # uneven steps with join, SlowMo: c (the anchor) equal everywhere, replicas identical
    res = simulate(4, [7, 9, 5, 12], **dict(kw, schedule=_c(3), local_period=2),
                   algorithm={"name": "slowmo", "alpha": 0.8, "beta": 0.5})
    same_everywhere(res)
    for i in range(4):
        close(res["anchor_c"][i], res["anchor_c"][0], rtol=0)
    close(res["anchor_c"][0], res["x0"][0], rtol=0)
    assert res["joined"][-1] == 4 and not any(f["pending"] for f in res["in_flight"])
