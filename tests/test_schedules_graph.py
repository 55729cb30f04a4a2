"""The schedules' rules are written once (pure functions over an ops namespace): the Python
methods and the TF graph (``GraphSchedule``) must make the same decisions and hold bit-identical
state for the same inputs; and every schedule's config must round-trip. No horovodrun."""
from __future__ import annotations

import json
import math
import random
from typing import Any, Callable, Optional

import keras
import numpy as np
import pytest
import tensorflow as tf

import horovod_local.schedules as core
from horovod_local.schedules import (Adaptive, Constant, Increasing, Never, PeriodSchedule,
                                     TimeBudget)
from horovod_local.tensorflow.graph_schedule import GraphSchedule, schedule_from_config, \
    schedule_to_config

_PY_FUNC_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}


def _add_variable(name: str, dtype: str, value: Any) -> tf.Variable:
    return tf.Variable(value, dtype=dtype, name=name)


@keras.saving.register_keras_serializable(package="hl_test")
def cycle_period(s: int) -> int:
    return (2, 5, 3)[s % 3]


class Legacy(PeriodSchedule):
    """A user subclass written against the Python methods only (with extra Python state)."""

    def __init__(self, base: int = 2) -> None:
        super().__init__()
        self.base = base
        self.bonus = 0

    @property
    def period(self) -> float:
        return self.base + self.bonus

    def should_sync(self, local_steps: int, seconds_since_sync: float) -> bool:
        return local_steps >= self.period or (local_steps >= 1 and seconds_since_sync > 0.9)

    def on_sync(self, *, step: int, lr: float, local_steps: int,
                deviation: Optional[float] = None) -> None:
        super().on_sync(step=step, lr=lr, local_steps=local_steps)
        self.bonus = (self.bonus + local_steps) % 3

    def state_dict(self) -> dict:
        return {**super().state_dict(), "bonus": self.bonus}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.bonus = int(state["bonus"])

    def get_config(self) -> dict:
        return {"base": self.base}


@keras.saving.register_keras_serializable(package="hl_test")
class Alternating(PeriodSchedule):
    """A user subclass written against the pure interface: periods a, b, a, b, ...; a float
    state scalar (the mean round length) to check float64 state too."""

    def __init__(self, a: int = 2, b: int = 4) -> None:
        super().__init__()
        self.a, self.b = a, b

    def initial_state(self) -> dict:
        return {**super().initial_state(), "mean_steps": ("float64", 0.0)}

    def period_of(self, state: dict, ops: Any) -> Any:
        return ops.where(state["rounds"] % 2 == 0, self.a, self.b)

    def on_sync_pure(self, state: dict, *, step: Any, lr: Any, local_steps: Any,
                     deviation: Any, ops: Any) -> dict:
        new = super().on_sync_pure(state, step=step, lr=lr, local_steps=local_steps,
                                   deviation=deviation, ops=ops)
        n = ops.to_float(state["rounds"])
        mean = (state["mean_steps"] * n + ops.to_float(local_steps)) / (n + 1.0)
        return {**new, "mean_steps": mean}

    def get_config(self) -> dict:
        return {"a": self.a, "b": self.b}


SCHEDULES: dict[str, Callable[[], PeriodSchedule]] = {
    "constant": lambda: Constant(3),
    "never": lambda: Never(),
    "increasing": lambda: Increasing(initial_period=1, factor=2, rounds_per_stage=2),
    "increasing_max": lambda: Increasing(initial_period=2, factor=3, rounds_per_stage=1,
                                         max_period=20),
    "increasing_factor1": lambda: Increasing(initial_period=3, factor=1),
    "increasing_huge": lambda: Increasing(initial_period=5, factor=10 ** 6),
    "increasing_fn": lambda: Increasing(period_fn=cycle_period),
    "adaptive": lambda: Adaptive(initial_period=3, sampling_steps=30, min_period=1,
                                 max_period=6),
    "adaptive_uncapped": lambda: Adaptive(initial_period=2, sampling_steps=12, lower=0.9,
                                          upper=1.1),
    "time_budget": lambda: TimeBudget(seconds=0.5, min_steps=2),
    "legacy": lambda: Legacy(),
    "alternating": lambda: Alternating(),
}
PURE = {"constant", "never", "increasing", "increasing_max", "increasing_factor1",
        "increasing_huge", "adaptive", "adaptive_uncapped", "time_budget", "alternating"}


class Driver:
    """A schedule in the graph: variables, and its ops traced once in tf.functions."""

    def __init__(self, schedule: PeriodSchedule) -> None:
        self.gs = gs = GraphSchedule(schedule)
        gs.build(_add_variable)
        spec = [tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.float64)]
        self.should = tf.function(lambda ls, sec: gs.should_sync(ls, sec), input_signature=spec)

        def sync(step: tf.Tensor, lr: tf.Tensor, ls: tf.Tensor, dev: tf.Tensor) -> tf.Tensor:
            gs.on_sync(rounds=tf.constant(-1, tf.int64), step=step, lr=lr, local_steps=ls,
                       deviation=dev if gs.needs_deviation else None)
            return tf.constant(0)

        self.sync = tf.function(sync, input_signature=[
            tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.float64),
            tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.float64)])

    def state(self) -> dict:
        return {k: v.numpy().item() for k, v in self.gs.state.items()}

    def op_types(self) -> set[str]:
        out = set()
        for fn in (self.should.get_concrete_function(), self.sync.get_concrete_function()):
            out |= {op.type for op in fn.graph.get_operations()}
        return out


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _drive(name: str, seed: int, steps: int = 160) -> tuple[PeriodSchedule, Driver, list]:
    """The same random inputs to the Python object and the graph; decisions, periods and state
    compared after every step / sync. Returns the Python periods after each sync."""
    rng = random.Random(seed)
    py, d = SCHEDULES[name](), Driver(SCHEDULES[name]())
    periods, local, since = [], 0, 0.0
    assert d.state() == py.state_dict()
    for step in range(1, steps + 1):
        local += 1
        since += rng.uniform(0.0, 0.3)
        want = py.should_sync(local, since)
        got = bool(d.should(tf.constant(local, tf.int64), tf.constant(since, tf.float64)))
        assert got == want, (name, step, local, since)
        if want or rng.random() < 0.05:  # also explicit synchronize() rounds
            lr = rng.uniform(0.01, 0.3)
            # ~1 during ADPSGD's sampling, then spread over both thresholds
            dev = lr * (rng.uniform(0.8, 1.2) if step <= 30 else rng.uniform(0.2, 2.0))
            py.on_sync(step=step, lr=lr, local_steps=local,
                       deviation=dev if py.needs_deviation else None)
            d.sync(tf.constant(step, tf.int64), tf.constant(lr, tf.float64),
                   tf.constant(local, tf.int64), tf.constant(dev, tf.float64))
            got_state, want_state = d.state(), py.state_dict()
            assert got_state == want_state, (name, step, got_state, want_state)
            if "c2" in want_state:  # bit-identical, not approximately
                assert float(got_state["c2"]).hex() == float(want_state["c2"]).hex()
            assert _same(float(d.gs.period.numpy()), float(py.period)), (name, step)
            periods.append(py.period)
            local, since = 0, 0.0
    return py, d, periods


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_python_and_graph_agree(name: str) -> None:
    for seed in range(2):
        py, d, periods = _drive(name, seed)
        assert py.rounds == len(periods) > 0
        # the graph's state read back into a fresh Python object is the Python path's
        back = d.gs.refresh_python(py.rounds)
        assert back.state_dict() == py.state_dict()
        assert _same(float(back.period), float(py.period))
        # pure schedules run as graph ops; the others call Python
        assert d.gs.pure == (name in PURE)
        assert bool(d.op_types() & _PY_FUNC_OPS) == (name not in PURE)


def test_adaptive_crosses_both_thresholds() -> None:
    for name in ("adaptive", "adaptive_uncapped"):
        _, _, periods = _drive(name, seed=3, steps=300)
        steps = np.diff(np.array(periods, dtype=np.int64))
        assert (steps > 0).any() and (steps < 0).any(), (name, periods)


def test_increasing_cap_and_stage_table() -> None:
    s = Increasing(initial_period=5, factor=10 ** 6)
    assert [s.period_for_round(r) for r in range(4)] == [5, 5 * 10 ** 6, 5 * 10 ** 12, 2 ** 53]
    assert s.period_for_round(10 ** 6) == 2 ** 53  # capped: never again in practice
    d = Driver(Increasing(initial_period=5, factor=10 ** 6))
    for _ in range(5):
        d.sync(tf.constant(1, tf.int64), tf.constant(0.1, tf.float64),
               tf.constant(1, tf.int64), tf.constant(0.0, tf.float64))
    assert d.gs.period.numpy() == 2.0 ** 53
    assert [Increasing(2, 3, 1, max_period=20).period_for_round(r) for r in range(5)] == \
        [2, 6, 18, 20, 20]


def test_interface_flags_and_variables() -> None:
    flags = {n: (GraphSchedule(m()).can_sync, GraphSchedule(m()).uses_clock,
                 GraphSchedule(m()).needs_deviation) for n, m in SCHEDULES.items()}
    assert flags["never"] == (False, False, False)
    assert flags["time_budget"] == (True, True, False)
    assert flags["legacy"][1] is True  # unknown Python should_sync: assume it reads the clock
    assert flags["increasing_fn"] == (True, False, False)
    assert flags["adaptive"] == (True, False, True)
    assert flags["constant"] == flags["alternating"] == (True, False, False)
    kinds = {n: GraphSchedule(m()).kind for n, m in SCHEDULES.items()}  # deprecated
    assert kinds["time_budget"] == "time" and kinds["legacy"] == "python"
    assert kinds["constant"] == kinds["adaptive"] == "period"

    d = Driver(Adaptive())
    assert d.gs.period.dtype == tf.float64 and d.gs.period.name.startswith("hl_period")
    assert {k: v.dtype for k, v in d.gs.state.items()} == {
        "rounds": tf.int64, "period": tf.int64, "c2": tf.float64, "samples": tf.int64}
    assert all(v.name.startswith(f"hl_schedule_{k}") for k, v in d.gs.state.items())
    assert math.isnan(Driver(TimeBudget(1.0)).gs.period.numpy())
    assert Driver(Never()).gs.period.numpy() == math.inf
    # the Python state (e.g. loaded before the optimizer is built) is where the graph starts
    s = Adaptive()
    s.load_state_dict({"rounds": 7, "period": 5, "c2": 0.25, "samples": 3})
    d = Driver(s)
    assert d.state() == s.state_dict() and d.gs.period.numpy() == 5.0


def test_never_counts_explicit_rounds() -> None:
    d = Driver(Never())
    assert not bool(d.should(tf.constant(10 ** 9, tf.int64), tf.constant(1e9, tf.float64)))
    d.sync(tf.constant(3, tf.int64), tf.constant(0.1, tf.float64), tf.constant(3, tf.int64),
           tf.constant(0.0, tf.float64))
    assert d.state() == {"rounds": 1} and d.gs.period.numpy() == math.inf


def test_adaptive_bad_inputs_fail_in_both_paths() -> None:
    with pytest.raises(ValueError, match="positive learning rate"):
        Adaptive().on_sync(step=1, lr=0.0, local_steps=1, deviation=1.0)
    with pytest.raises(ValueError, match="deviation"):
        Adaptive().on_sync(step=1, lr=0.1, local_steps=1)
    d = Driver(Adaptive())
    with pytest.raises(tf.errors.InvalidArgumentError, match="positive learning rate"):
        d.sync(tf.constant(1, tf.int64), tf.constant(0.0, tf.float64), tf.constant(1, tf.int64),
               tf.constant(1.0, tf.float64))
    assert d.state()["samples"] == 0  # nothing was written
    with pytest.raises(ValueError, match="deviation"):
        d.gs.on_sync(rounds=0, step=1, lr=0.1, local_steps=1, deviation=None)


def test_python_fallback_follows_restored_variables() -> None:
    """A not graph-pure schedule's state is mirrored in variables: assigning them (a restore,
    a broadcast) is what its Python methods see next."""
    for make, state in ((Legacy, {"rounds": 4, "bonus": 2}),
                        (lambda: Increasing(period_fn=cycle_period), {"rounds": 4})):
        d = Driver(make())
        for k, v in state.items():
            d.gs.state[k].assign(v)
        ref = make()
        ref.load_state_dict(state)
        for ls in range(1, 7):
            assert bool(d.should(tf.constant(ls, tf.int64), tf.constant(0.0, tf.float64))) \
                == ref.should_sync(ls, 0.0)
        assert d.gs.refresh_python().state_dict() == ref.state_dict()


def test_graph_path_exact_for_float32_lr() -> None:
    """The Keras optimizer's lr is float32; both paths see the same float64 value of it."""
    lr32 = np.float32(0.0123)
    py, d = Adaptive(sampling_steps=5), Driver(Adaptive(sampling_steps=5))
    for step, dev in enumerate([0.3, 0.7, 0.11, 0.05, 0.9, 0.001, 2.0], start=1):
        py.on_sync(step=step, lr=float(lr32), local_steps=4, deviation=dev)
        d.gs.on_sync(step=tf.constant(step, tf.int64), lr=tf.constant(lr32),
                     local_steps=tf.constant(4, tf.int64), deviation=tf.constant(dev, tf.float64))
        assert d.state() == py.state_dict()


# ---- configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_config_round_trip_keras(name: str) -> None:
    s = SCHEDULES[name]()
    if name == "legacy":  # not registered with Keras: a ValueError saying what to do
        with pytest.raises(ValueError, match="register_keras_serializable"):
            schedule_from_config(schedule_to_config(s))
        return
    cfg = schedule_to_config(s)
    cfg = json.loads(json.dumps(cfg))  # plain data
    back = schedule_from_config(cfg)
    assert type(back) is type(s) and back.describe() == s.describe()
    assert schedule_to_config(back) == cfg
    if name != "alternating" and "period_fn" not in cfg:
        assert cfg == s.describe()  # the format of earlier versions
    if name == "increasing_fn":
        assert [back.period_for_round(r) for r in range(6)] == [2, 5, 3, 2, 5, 3]


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_config_round_trip_core(name: str) -> None:
    registry: dict[str, Any] = {}

    def ser(obj: Any) -> dict:
        registry[type(obj).__name__ if isinstance(obj, PeriodSchedule) else obj.__name__] = obj
        if isinstance(obj, PeriodSchedule):
            return {"class": type(obj).__name__, "config": obj.get_config()}
        return {"fn": obj.__name__}

    def de(cfg: dict) -> Any:
        if "class" in cfg:
            return registry[cfg["class"]].from_config(cfg["config"])
        return registry[cfg["fn"]]

    s = SCHEDULES[name]()
    plain = name in PURE and name != "alternating"
    if not plain:
        with pytest.raises(ValueError, match="serialize"):
            core.schedule_to_config(s)
    else:
        assert core.schedule_from_config(core.schedule_to_config(s)).describe() == s.describe()
    cfg = core.schedule_to_config(s, serialize=ser)
    back = core.schedule_from_config(cfg, deserialize=de)
    assert type(back) is type(s) and back.describe() == s.describe()
    assert back.get_config() == s.get_config()


def test_config_errors_and_plain_periods() -> None:
    assert isinstance(core.schedule_from_config(4), Constant)
    assert isinstance(core.schedule_from_config(None), Never)
    assert isinstance(schedule_from_config(math.inf), Never)
    with pytest.raises(ValueError, match="unknown schedule"):
        core.schedule_from_config({"schedule": "Sometimes"})
    with pytest.raises(ValueError, match="bad arguments"):
        core.schedule_from_config({"schedule": "Constant", "periodd": 3})
    with pytest.raises(ValueError, match="deserialize"):
        core.schedule_from_config({"schedule": "custom", "object": {}})
    with pytest.raises(ValueError, match="schedule"):
        core.schedule_to_config(3)  # type: ignore[arg-type]
    assert Adaptive.from_config(Adaptive(5, 7).get_config()).describe() == \
        Adaptive(5, 7).describe()
