"""Single-process API tests: argument validation, drop-in behaviour, LocalAdaAlter alone, and
a hypothesis fuzz of the public constructors (only the documented errors may come out)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import horovod_local as hl
import horovod_local.torch as hlt
from reference import simulate
import fixtures


@pytest.fixture(scope="module", autouse=True)
def hvd_single():
    import horovod.torch as hvd

    hvd.init()
    yield hvd


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))


def _wrap(model=None, **kw):
    model = model or _model()
    return hlt.DistributedLocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                         model.named_parameters(), **kw)


@pytest.mark.parametrize("kw,needle", [
    (dict(period=0), "period"), (dict(period=-3), "period"), (dict(period=2.5), "period"),
    (dict(period="8"), "period"), (dict(period=True), "period"),
    (dict(warmup_steps=-1), "warmup_steps"), (dict(warmup_steps=1.5), "warmup_steps"),
    (dict(state_policy="zero"), "state_policy"), (dict(algorithm="diloco"), "algorithm"),
    (dict(slowmo_lr=0.0), "slowmo_lr"), (dict(slowmo_momentum=1.0), "slowmo_momentum"),
    (dict(slowmo_lr=float("nan")), "slowmo_lr"),
    (dict(outer_optimizer=3), "outer_optimizer"), (dict(nonfinite="ignore"), "nonfinite"),
    (dict(algorithm="slowmo", outer_optimizer=lambda p: torch.optim.SGD(p, lr=1)), "either"),
])
def test_bad_arguments_raise_value_error_naming_them(kw, needle):
    with pytest.raises(ValueError, match=needle):
        _wrap(**kw)


def test_named_parameters_validated_like_horovod():
    model = _model()
    named = list(model.named_parameters())
    opt = lambda: torch.optim.SGD(model.parameters(), lr=0.1)  # noqa: E731
    with pytest.raises(ValueError, match="duplicate"):
        hlt.DistributedLocalOptimizer(opt(), [("a", p) for _, p in named])
    with pytest.raises(ValueError, match="not named"):
        hlt.DistributedLocalOptimizer(opt(), named[:2])
    stray = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="not in the optimizer"):
        hlt.DistributedLocalOptimizer(opt(), named + [("stray", stray)])
    with pytest.raises(ValueError, match="tuples"):
        hlt.DistributedLocalOptimizer(opt(), [p for _, p in named])
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        hlt.DistributedLocalOptimizer(model, named)
    wrapped = hlt.DistributedLocalOptimizer(opt(), named)
    with pytest.raises(ValueError, match="already"):
        hlt.DistributedLocalOptimizer(wrapped, named)


def test_adaalter_rejects_reset_policy():
    model = _model()
    with pytest.raises(ValueError, match="state_policy"):
        hlt.DistributedLocalOptimizer(hlt.LocalAdaAlter(model.parameters()), state_policy="reset")


def test_drop_in_isinstance_param_groups_scheduler_state_dict():
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = hlt.DistributedLocalOptimizer(inner, model.named_parameters(), period=2)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups is inner.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
    stats = opt.sync_stats()
    assert (stats.steps, stats.syncs, stats.local_steps) == (3, 1, 1)
    sd = opt.state_dict()
    model2 = _model()
    opt2 = hlt.DistributedLocalOptimizer(torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9),
                                         model2.named_parameters(), period=2)
    opt2.load_state_dict(sd)
    assert opt2.sync_stats().steps == 3 and opt2.sync_stats().syncs == 1
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
    for p, q in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(p["momentum_buffer"], q["momentum_buffer"])


def test_local_adaalter_alone_equals_reference_single_worker():
    init = fixtures.init_params()
    w = torch.nn.Parameter(torch.tensor(init["weight"]))
    b = torch.nn.Parameter(torch.tensor(init["bias"]))
    opt = hlt.LocalAdaAlter([w, b], lr=0.3, eps=0.5, initial_accumulator_value=2.0,
                            lr_warmup_steps=5)
    for t in range(1, 21):
        x, y = (torch.tensor(a) for a in fixtures.make_batch(0, t))
        opt.zero_grad()
        (0.5 * ((x @ w.T + b - y) ** 2).sum() / x.shape[0]).backward()
        opt.step()
    ref = simulate(1, 20, inner={"name": "adaalter", "lr": 0.3, "eps": 0.5,
                                 "initial_accumulator_value": 2.0, "lr_warmup_steps": 5},
                   schedule={"kind": "constant", "period": 1})
    np.testing.assert_allclose(w.detach().numpy(), ref["params"][0]["weight"], rtol=1e-10)
    np.testing.assert_allclose(b.detach().numpy(), ref["params"][0]["bias"], rtol=1e-10)


@pytest.mark.parametrize("bad", [dict(lr=0), dict(eps=-1), dict(initial_accumulator_value=0),
                                 dict(lr_warmup_steps=-2)])
def test_local_adaalter_bad_arguments(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        hlt.LocalAdaAlter([torch.nn.Parameter(torch.zeros(1))], **bad)


def test_schedules_validate_and_describe():
    with pytest.raises(ValueError, match="initial_period"):
        hl.Increasing(initial_period=0)
    with pytest.raises(ValueError, match="upper"):
        hl.Adaptive(lower=1.5, upper=1.2)
    with pytest.raises(ValueError, match="seconds"):
        hl.TimeBudget(0)
    with pytest.raises(ValueError, match="period_fn"):
        hl.Increasing(period_fn=lambda s: 0).period_for_round(0)
    assert hl.make_schedule(math.inf).period == math.inf
    assert hl.make_schedule(8.0).period == 8
    s = hl.Adaptive(initial_period=3, sampling_steps=2, max_period=4)
    s.on_sync(step=1, lr=0.1, local_steps=3, deviation=1.0)  # sampling: C2 = 10
    s.on_sync(step=3, lr=0.1, local_steps=3, deviation=0.1)  # 0.1 < 0.7*0.1*10: p + 1
    s.on_sync(step=6, lr=0.1, local_steps=4, deviation=0.1)  # capped at max_period
    assert (s.period, s.c2) == (4, pytest.approx(10.0))
    s.on_sync(step=9, lr=0.1, local_steps=4, deviation=5.0)  # 5 > 1.3*0.1*10: p - 1
    assert s.period == 3
    s2 = hl.Adaptive(initial_period=3, sampling_steps=2, max_period=4)
    s2.load_state_dict(s.state_dict())
    assert s2.state_dict() == s.state_dict()


_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 50),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3))


@settings(max_examples=150, deadline=None)
@given(period=_values, warmup=_values, policy=st.one_of(_values, st.sampled_from(
    ["keep", "reset", "average"])), algorithm=st.one_of(_values, st.sampled_from(
    ["local_sgd", "slowmo"])), slr=_values, smom=_values)
def test_fuzz_wrapper_constructor(period, warmup, policy, algorithm, slr, smom):
    kw = dict(period=period, warmup_steps=warmup, state_policy=policy, algorithm=algorithm,
              slowmo_lr=slr, slowmo_momentum=smom)
    kw = {k: v for k, v in kw.items() if v is not None}
    try:
        opt = _wrap(**kw)
    except ValueError:
        return
    # accepted arguments give a working optimizer
    opt.zero_grad()
    list(opt.param_groups[0]["params"])[0].grad = torch.ones(3, 4)
    opt.step()


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(["Constant", "Increasing", "Adaptive", "TimeBudget"]),
       a=_values, b=_values, c=_values)
def test_fuzz_schedules(kind, a, b, c):
    args = [v for v in (a, b, c) if v is not None]
    try:
        s = getattr(hl, kind)(*args)
    except (ValueError, TypeError) as e:
        assert isinstance(e, ValueError) or "positional argument" in str(e)
        return
    for step in range(1, 6):
        s.should_sync(step, 0.01 * step)
        s.on_sync(step=step, lr=0.1, local_steps=step, deviation=0.5)
    assert s.period >= 1 or math.isnan(s.period)
    s.load_state_dict(s.state_dict())


def test_sparse_gradient_in_warmup_names_the_parameter():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = hlt.DistributedLocalOptimizer(torch.optim.SGD(emb.parameters(), lr=0.1),
                                        emb.named_parameters(), period=2, warmup_steps=1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="'weight' has a sparse gradient"):
        opt.step()


def test_sparse_gradients_in_local_steps_are_the_inner_optimizers_business():
    """After warm-up the inner optimizer takes sparse gradients as it always does; syncs average
    the (dense) parameters."""
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = hlt.DistributedLocalOptimizer(torch.optim.SGD(emb.parameters(), lr=0.1),
                                        emb.named_parameters(), period=2)
    before = emb.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        emb(torch.tensor([1, 2])).sum().backward()
        opt.step()
    assert opt.sync_stats().syncs == 1
    changed = (emb.weight.detach() != before).any(dim=1)
    assert changed.tolist() == [False, True, True] + [False] * 7


def test_parameter_without_gradient():
    """Warm-up: a missing gradient is allreduced as zeros (as Horovod does), so an SGD step
    leaves it unchanged; local steps: the inner optimizer skips it; syncs still average it."""
    model = _model()
    opt = hlt.DistributedLocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                        model.named_parameters(), period=1, warmup_steps=1)
    second = [p.detach().clone() for p in model[1].parameters()]
    for _ in range(3):
        opt.zero_grad()
        model[0](torch.ones(2, 4)).sum().backward()  # model[1] gets no gradient
        opt.step()
    for p, q in zip(model[1].parameters(), second):
        assert torch.equal(p.detach(), q)
    assert opt.sync_stats().syncs == 2 and opt.sync_stats().warmup_steps_done == 1
