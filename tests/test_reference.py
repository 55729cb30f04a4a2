"""Tests of the NumPy reference simulator against closed forms written out independently here."""
from __future__ import annotations

import math

import numpy as np
import pytest

try:
    from . import fixtures
    from .reference import simulate
except ImportError:
    import fixtures  # type: ignore[no-redef]
    from reference import simulate  # type: ignore[no-redef]

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
