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
