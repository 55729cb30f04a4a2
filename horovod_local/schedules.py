"""Period schedules: when a rank takes part in the next sync round.

A schedule is asked after every local step (``should_sync``) and told about every finished
round (``on_sync``). It is framework-free and deterministic given what it is told, so its state
(``state_dict``) is part of an exact resume. Exact rules: ``docs/SEMANTICS.md``.

Each schedule writes its rules once, as pure functions of its state (a few named int64 /
float64 scalars) over a small namespace of elementwise ops (:class:`ScheduleOps`):

* ``initial_state() -> {name: (dtype, value)}``, dtype ``"int64"`` or ``"float64"``;
* ``period_of(state, ops)``: the period in force (a number; ``inf`` = none, ``nan`` = unknown);
* ``should_sync_pure(state, local_steps, seconds_since_sync, ops)``: bool-like;
* ``on_sync_pure(state, *, step, lr, local_steps, deviation, ops)``: the new state (a new dict;
  the argument is never mutated).

The Python methods (``should_sync``, ``on_sync``, ``period``, ``state_dict``,
``load_state_dict``) run these with :data:`PY_OPS` on plain numbers (PyTorch front end); the
Keras front end runs the same functions with TensorFlow ops on variables
(``horovod_local.tensorflow.graph_schedule``). A schedule whose rules cannot be written that way
(``graph_pure`` is False: ``Increasing(period_fn=...)``, or a subclass overriding the Python
methods) is run there through its Python methods instead.

Example::

    >>> from horovod_local.schedules import Increasing
    >>> s = Increasing(initial_period=2, factor=2, rounds_per_stage=2)
    >>> [s.period_for_round(r) for r in range(6)]
    [2, 2, 4, 4, 8, 8]
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, Optional, Protocol, Union

__all__ = [
    "PeriodSchedule", "Constant", "Never", "Increasing", "Adaptive", "TimeBudget", "make_schedule",
    "ScheduleOps", "PythonOps", "PY_OPS", "schedule_to_config", "schedule_from_config",
]

Number = Union[int, float]
#: a Python number (``PY_OPS``) or a framework's scalar tensor (e.g. the TF ops)
Scalar = Any
#: a schedule's state: name -> scalar
State = dict[str, Scalar]
#: ``initial_state()``: name -> (dtype name, initial value)
StateSpec = dict[str, tuple[str, Number]]

STATE_DTYPES = ("int64", "float64")

#: periods of ``Increasing`` are capped here: exact in float64 and int64, and no run takes
#: 2**53 local steps, so the cap means "never again" in practice
PERIOD_CAP = 2 ** 53


def _check_int(name: str, value: Any, minimum: int = 1, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_float(name: str, value: Any, minimum: float = 0.0, strict: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or (value <= minimum if strict else value < minimum):
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {op} {minimum}, got {value!r}")
    return float(value)


# ---- the ops the pure rules may use -----------------------------------------------------------
class ScheduleOps(Protocol):
    """Elementwise ops on scalars. Besides these, the pure rules use only Python's arithmetic
    (``+ - * / //``) and comparison operators, which tensors implement as well; no ``if`` on
    state or inputs (a graph cannot branch in Python), only on the configuration."""

    def where(self, cond: Scalar, a: Scalar, b: Scalar) -> Scalar: ...

    def minimum(self, a: Scalar, b: Scalar) -> Scalar: ...

    def maximum(self, a: Scalar, b: Scalar) -> Scalar: ...

    def logical_and(self, a: Scalar, b: Scalar) -> Scalar: ...

    def logical_or(self, a: Scalar, b: Scalar) -> Scalar: ...

    def logical_not(self, a: Scalar) -> Scalar: ...

    def to_float(self, x: Scalar) -> Scalar:
        """float64."""

    def to_int(self, x: Scalar) -> Scalar:
        """int64, truncating toward zero."""

    def lookup(self, table: tuple[int, ...], index: Scalar) -> Scalar:
        """``table[index]`` (int64) for a constant table of ints."""

    def check(self, ok: Scalar, message: str, value: Scalar) -> Scalar:
        """``value``, failing with ``message + repr(value)`` unless ``ok``."""


class PythonOps:
    """:class:`ScheduleOps` on plain Python numbers (the Python methods of every schedule)."""

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        return a if cond else b

    @staticmethod
    def minimum(a: Any, b: Any) -> Any:
        return b if b < a else a

    @staticmethod
    def maximum(a: Any, b: Any) -> Any:
        return b if b > a else a

    @staticmethod
    def logical_and(a: Any, b: Any) -> bool:
        return bool(a) and bool(b)

    @staticmethod
    def logical_or(a: Any, b: Any) -> bool:
        return bool(a) or bool(b)

    @staticmethod
    def logical_not(a: Any) -> bool:
        return not a

    @staticmethod
    def to_float(x: Any) -> float:
        return float(x)

    @staticmethod
    def to_int(x: Any) -> int:
        return int(x)

    @staticmethod
    def lookup(table: tuple[int, ...], index: Any) -> int:
        return table[int(index)]

    @staticmethod
    def check(ok: Any, message: str, value: Any) -> Any:
        if not ok:
            raise ValueError(f"{message}{value!r}")
        return value


PY_OPS = PythonOps()

# the Python methods; a subclass overriding any of them has rules the pure functions don't hold
_PYTHON_METHODS = ("should_sync", "on_sync", "period", "state_dict", "load_state_dict")


def _cast_state(name: str, dtype: str, value: Any) -> Number:
    if dtype == "int64":
        return int(value)
    if dtype == "float64":
        return float(value)
    raise ValueError(f"initial_state: {name!r} has dtype {dtype!r}, not one of {STATE_DTYPES}")


class PeriodSchedule:
    """Base class. A schedule implements the pure rules (``initial_state``, ``period_of``,
    ``should_sync_pure``, ``on_sync_pure``; see the module docstring) and inherits the Python
    methods. Set ``uses_clock = True`` if ``should_sync_pure`` reads ``seconds_since_sync``.

    A subclass may instead override the Python methods (``period``, ``should_sync``,
    ``on_sync``, ``state_dict``, ``load_state_dict``) as before; it is then not ``graph_pure``
    and the Keras front end calls those methods from the graph (one Python call per step).
    """

    #: whether :meth:`on_sync` needs the ADPSGD deviation statistic S (costs a scalar allreduce)
    needs_deviation: bool = False
    #: False when ``should_sync`` is never True (no automatic sync op needs building)
    can_sync: bool = True

    def __init__(self) -> None:
        # the state is made from initial_state() on first use: subclasses set the configuration
        # it depends on after calling this
        self.__dict__.pop("_hl_state", None)

    # ---- the rules, written once -------------------------------------------------------------
    def initial_state(self) -> StateSpec:
        """The state's scalars: name -> (``"int64"`` | ``"float64"``, initial value)."""
        return {"rounds": ("int64", 0)}  # sync rounds completed after warm-up

    def period_of(self, state: State, ops: ScheduleOps) -> Scalar:
        """The period (local steps per round) in force in ``state``."""
        if type(self).period is not PeriodSchedule.period:
            return self.period  # a subclass written against the Python property (not pure)
        raise NotImplementedError(f"{type(self).__name__} must implement period_of")

    def should_sync_pure(self, state: State, local_steps: Scalar, seconds_since_sync: Scalar,
                         ops: ScheduleOps) -> Scalar:
        """Whether to sync after a local step (``local_steps`` already counts it)."""
        return ops.to_float(local_steps) >= ops.to_float(self.period_of(state, ops))

    def on_sync_pure(self, state: State, *, step: Scalar, lr: Scalar, local_steps: Scalar,
                     deviation: Optional[Scalar], ops: ScheduleOps) -> State:
        """The state after a finished round (a new dict; ``state`` is left as it is)."""
        return {**state, "rounds": state["rounds"] + 1}

    # ---- what the graph path needs to know ---------------------------------------------------
    @property
    def graph_pure(self) -> bool:
        """True when the pure functions are the whole rules (so they can run in a graph)."""
        cls = type(self)
        return all(getattr(cls, m) is getattr(PeriodSchedule, m) for m in _PYTHON_METHODS)

    @property
    def uses_clock(self) -> bool:
        """Whether ``should_sync`` reads ``seconds_since_sync``. Assumed True for a subclass with
        its own ``should_sync`` / ``should_sync_pure`` unless it says otherwise."""
        cls = type(self)
        return cls.should_sync is not PeriodSchedule.should_sync \
            or cls.should_sync_pure is not PeriodSchedule.should_sync_pure

    # ---- the Python methods: the pure rules on Python numbers --------------------------------
    @property
    def _state(self) -> State:
        st = self.__dict__.get("_hl_state")
        if st is None:
            st = {k: _cast_state(k, dt, v) for k, (dt, v) in self.initial_state().items()}
            self.__dict__["_hl_state"] = st
        return st

    def _set_state(self, values: State) -> None:
        spec = self.initial_state()
        if set(values) != set(spec):
            raise ValueError(f"state must have the keys {sorted(spec)}, got {sorted(values)}")
        self.__dict__["_hl_state"] = {k: _cast_state(k, dt, values[k])
                                      for k, (dt, _) in spec.items()}

    @property
    def rounds(self) -> int:
        """Sync rounds completed after warm-up."""
        return int(self._state["rounds"])

    @rounds.setter
    def rounds(self, value: int) -> None:
        self._state["rounds"] = int(value)

    @property
    def period(self) -> Number:
        """The period (local steps per round) currently in force; ``inf`` if there is none."""
        return self.period_of(self._state, PY_OPS)

    def should_sync(self, local_steps: int, seconds_since_sync: float) -> bool:
        return bool(self.should_sync_pure(self._state, local_steps, seconds_since_sync, PY_OPS))

    def on_sync(self, *, step: int, lr: float, local_steps: int,
                deviation: Optional[float] = None) -> None:
        """Called once per finished round: the global step, the lr, the round's local steps and
        (if ``needs_deviation``) the ADPSGD statistic S."""
        self._set_state(self.on_sync_pure(dict(self._state), step=step, lr=lr,
                                          local_steps=local_steps, deviation=deviation,
                                          ops=PY_OPS))

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self._set_state({k: state[k] for k in self.initial_state()})

    # ---- configuration -----------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments (user callables as given); :meth:`from_config` inverts
        it. Not the state."""
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PeriodSchedule:
        return cls(**config)

    def describe(self) -> dict:
        """The configuration (not the state), callables by name; ranks must agree on it."""
        return {"schedule": type(self).__name__,
                **{k: getattr(v, "__qualname__", repr(v)) if callable(v) else v
                   for k, v in self.get_config().items()}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "schedule")
        return f"{type(self).__name__}({args})"


class Constant(PeriodSchedule):
    """Sync every ``period`` local steps (local SGD / PR-SGD Alg. 1).

    Args:
        period: local steps between syncs, an integer >= 1. ``period=1`` with plain SGD is
            synchronous data-parallel SGD.
    """

    def __init__(self, period: int) -> None:
        super().__init__()
        self._period = _check_int("period", period)

    def period_of(self, state: State, ops: ScheduleOps) -> Scalar:
        return self._period

    def get_config(self) -> dict[str, Any]:
        return {"period": self._period}


class Never(PeriodSchedule):
    """H = infinity: no automatic sync; call ``synchronize()`` (one-shot averaging)."""

    can_sync = False
    uses_clock = False

    def period_of(self, state: State, ops: ScheduleOps) -> Scalar:
        return math.inf

    def should_sync_pure(self, state: State, local_steps: Scalar, seconds_since_sync: Scalar,
                         ops: ScheduleOps) -> Scalar:
        return False


@functools.lru_cache(maxsize=64)
def _stage_table(initial_period: int, factor: int, max_period: Optional[int]) -> tuple[int, ...]:
    """Period of stage e = 0, 1, ... (``initial_period * factor**e`` capped at ``max_period``
    and at PERIOD_CAP) until it stops changing; at most 54 entries since factor >= 2 there."""
    cap = PERIOD_CAP if max_period is None else min(max_period, PERIOD_CAP)
    table = [min(initial_period, cap)]
    while factor > 1 and table[-1] < cap:
        table.append(min(table[-1] * factor, cap))  # exact ints: no pow, no overflow
    return tuple(table)


class Increasing(PeriodSchedule):
    """Growing periods (PR-SGD Alg. 2, Stich's doubling trick).

    Round ``s`` has period ``initial_period * factor ** (s // rounds_per_stage)``, capped at
    ``max_period`` (and at 2**53, i.e. never again); or ``period_fn(s)`` if given.

    Args:
        initial_period: period of the first round (integer >= 1).
        factor: growth factor per stage (integer >= 1).
        rounds_per_stage: rounds between two growths (integer >= 1).
        max_period: optional cap (integer >= initial_period).
        period_fn: optional callable ``s -> H_s`` (positive int) replacing the formula. It runs
            in Python, so the Keras front end calls it from the graph (``graph_pure`` False).

    Example::

        >>> Increasing(initial_period=4, factor=2, rounds_per_stage=10, max_period=64)
        Increasing(initial_period=4, factor=2, rounds_per_stage=10, max_period=64)
    """

    def __init__(self, initial_period: int = 1, factor: int = 2, rounds_per_stage: int = 1,
                 max_period: Optional[int] = None,
                 period_fn: Optional[Callable[[int], int]] = None) -> None:
        super().__init__()
        self.initial_period = _check_int("initial_period", initial_period)
        self.factor = _check_int("factor", factor)
        self.rounds_per_stage = _check_int("rounds_per_stage", rounds_per_stage)
        self.max_period = _check_int("max_period", max_period, minimum=self.initial_period,
                                     allow_none=True)
        if period_fn is not None and not callable(period_fn):
            raise ValueError(f"period_fn must be callable, got {period_fn!r}")
        self.period_fn = period_fn

    @property
    def graph_pure(self) -> bool:
        return self.period_fn is None and super().graph_pure

    def period_of(self, state: State, ops: ScheduleOps) -> Scalar:
        if self.period_fn is not None:  # Python only (not graph_pure)
            s = int(state["rounds"])
            return _check_int(f"period_fn({s})", self.period_fn(s))
        # a table of the stages' periods, not factor**stage: exact, and no int64 overflow in
        # a graph
        table = _stage_table(self.initial_period, self.factor, self.max_period)
        stage = ops.minimum(state["rounds"] // self.rounds_per_stage, len(table) - 1)
        return ops.lookup(table, stage)

    def period_for_round(self, s: int) -> int:
        """The period of round ``s`` (s = 0, 1, ...)."""
        return int(self.period_of({"rounds": s}, PY_OPS))

    def get_config(self) -> dict[str, Any]:
        d: dict[str, Any] = {"initial_period": self.initial_period, "factor": self.factor,
                             "rounds_per_stage": self.rounds_per_stage,
                             "max_period": self.max_period}
        if self.period_fn is not None:
            d["period_fn"] = self.period_fn
        return d


class Adaptive(PeriodSchedule):
    """ADPSGD (Jiang & Agrawal, Alg. 2): the period follows the replicas' spread.

    At each sync the ranks' mean squared distance to the average, ``S``, is compared with
    ``lr * C2``, where ``C2`` is the mean of ``S / lr`` over the syncs of the first
    ``sampling_steps`` steps. Below ``lower * lr * C2`` the period grows by one, above
    ``upper * lr * C2`` it shrinks by one.

    Args:
        initial_period: starting period p (paper: 4).
        sampling_steps: the sampling horizon K_s in global steps (paper: 0.2-0.25 of all steps).
        lower, upper: the thresholds (paper: 0.7, 1.3); 0 < lower <= upper.
        min_period, max_period: bounds on p.

    Example::

        >>> Adaptive(initial_period=4, sampling_steps=200)
        Adaptive(initial_period=4, sampling_steps=200, lower=0.7, upper=1.3, min_period=1, max_period=None)
    """

    needs_deviation = True

    def __init__(self, initial_period: int = 4, sampling_steps: int = 100, lower: float = 0.7,
                 upper: float = 1.3, min_period: int = 1, max_period: Optional[int] = None) -> None:
        super().__init__()
        self.initial_period = _check_int("initial_period", initial_period)
        self.sampling_steps = _check_int("sampling_steps", sampling_steps, minimum=0)
        self.lower = _check_float("lower", lower)
        self.upper = _check_float("upper", upper)
        if self.upper < self.lower:
            raise ValueError(f"upper must be >= lower, got lower={lower!r}, upper={upper!r}")
        self.min_period = _check_int("min_period", min_period)
        self.max_period = _check_int("max_period", max_period, minimum=self.min_period,
                                     allow_none=True)
        if self.initial_period < self.min_period or (
                self.max_period is not None and self.initial_period > self.max_period):
            raise ValueError(f"initial_period={initial_period!r} is outside "
                             f"[min_period, max_period] = [{min_period!r}, {max_period!r}]")

    def initial_state(self) -> StateSpec:
        return {**super().initial_state(), "period": ("int64", self.initial_period),
                "c2": ("float64", 0.0), "samples": ("int64", 0)}

    def period_of(self, state: State, ops: ScheduleOps) -> Scalar:
        return state["period"]

    def on_sync_pure(self, state: State, *, step: Scalar, lr: Scalar, local_steps: Scalar,
                     deviation: Optional[Scalar], ops: ScheduleOps) -> State:
        if deviation is None:
            raise ValueError("Adaptive.on_sync needs the deviation statistic S")
        lr = ops.check(lr > 0, "ADPSGD needs a positive learning rate, got lr=", lr)
        new = super().on_sync_pure(state, step=step, lr=lr, local_steps=local_steps,
                                   deviation=deviation, ops=ops)
        p, c2, n = state["period"], state["c2"], state["samples"]
        # the three exclusive cases of the paper's if / elif / elif
        sampling = step <= self.sampling_steps
        grow = ops.logical_and(ops.logical_not(sampling), deviation < self.lower * lr * c2)
        shrink = ops.logical_and(ops.logical_not(ops.logical_or(sampling, grow)),
                                 deviation > self.upper * lr * c2)
        # float64 in this exact order in both paths, so C2 is bit-identical between them
        sampled_c2 = (c2 * ops.to_float(n) + deviation / lr) / ops.to_float(n + 1)
        grown = p + 1 if self.max_period is None else ops.minimum(p + 1, self.max_period)
        shrunk = ops.maximum(p - 1, self.min_period)
        return {**new, "period": ops.where(grow, grown, ops.where(shrink, shrunk, p)),
                "c2": ops.where(sampling, sampled_c2, c2),
                "samples": ops.where(sampling, n + 1, n)}

    @property
    def c2(self) -> float:
        """C2, the mean of S / lr over the sampling syncs."""
        return float(self._state["c2"])

    @property
    def samples(self) -> int:
        return int(self._state["samples"])

    def get_config(self) -> dict[str, Any]:
        return {"initial_period": self.initial_period, "sampling_steps": self.sampling_steps,
                "lower": self.lower, "upper": self.upper, "min_period": self.min_period,
                "max_period": self.max_period}


class TimeBudget(PeriodSchedule):
    """Time-based rounds for heterogeneous workers (PR-SGD Alg. 3).

    Each rank syncs once its own wall-clock time since the last sync reaches ``seconds``, so
    fast ranks take more local steps per round. Every rank still enters each round once; at the
    end of an epoch with uneven step counts call ``optimizer.join()``.

    Args:
        seconds: the budget per round (> 0).
        min_steps: local steps a rank takes at least before it may sync (default 1).
    """

    uses_clock = True

    def __init__(self, seconds: float, min_steps: int = 1) -> None:
        super().__init__()
        self.seconds = _check_float("seconds", seconds)
        self.min_steps = _check_int("min_steps", min_steps)

    def initial_state(self) -> StateSpec:
        return {**super().initial_state(), "last_round_steps": ("int64", 0)}

    def period_of(self, state: State, ops: ScheduleOps) -> Scalar:
        # the last round's length; nan before the first round
        return ops.where(state["rounds"] > 0, ops.to_float(state["last_round_steps"]), math.nan)

    def should_sync_pure(self, state: State, local_steps: Scalar, seconds_since_sync: Scalar,
                         ops: ScheduleOps) -> Scalar:
        return ops.logical_and(local_steps >= self.min_steps, seconds_since_sync >= self.seconds)

    def on_sync_pure(self, state: State, *, step: Scalar, lr: Scalar, local_steps: Scalar,
                     deviation: Optional[Scalar], ops: ScheduleOps) -> State:
        new = super().on_sync_pure(state, step=step, lr=lr, local_steps=local_steps,
                                   deviation=deviation, ops=ops)
        return {**new, "last_round_steps": ops.to_int(local_steps)}

    @property
    def last_round_steps(self) -> int:
        return int(self._state["last_round_steps"])

    def get_config(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "min_steps": self.min_steps}


def make_schedule(period: Union[int, float, PeriodSchedule, None]) -> PeriodSchedule:
    """``period`` as the user gave it -> a schedule: an int H -> :class:`Constant`,
    ``math.inf`` -> :class:`Never`, a :class:`PeriodSchedule` -> itself (``None`` is refused:
    it read as "no sync ever", silently)."""
    if isinstance(period, PeriodSchedule):
        return period
    if period is None:
        raise ValueError("period=None: pass period=math.inf (or horovod_local.Never()) for no "
                         "automatic sync, or an integer number of local steps")
    if isinstance(period, float) and period == math.inf:
        return Never()
    if isinstance(period, float) and period.is_integer() and period >= 1:
        period = int(period)
    if isinstance(period, bool) or not isinstance(period, numbers.Integral) or period < 1:
        raise ValueError(f"period must be an integer >= 1, math.inf, or a PeriodSchedule "
                         f"(Constant, Increasing, Adaptive, TimeBudget, Never); got {period!r}")
    return Constant(int(period))


# ---- (de)serialisation ----------------------------------------------------------------------
_BUILTIN: dict[str, type[PeriodSchedule]] = {
    c.__name__: c for c in (Constant, Never, Increasing, Adaptive, TimeBudget)}


def schedule_to_config(schedule: PeriodSchedule,
                       serialize: Optional[Callable[[Any], Any]] = None) -> dict:
    """A built-in schedule -> ``{"schedule": name, **get_config()}``, any other ->
    ``{"schedule": "custom", "object": serialize(schedule)}``. ``serialize`` encodes what is not
    plain data (user callables, custom classes), e.g. ``keras.saving.serialize_keras_object``;
    without it such a schedule is a ValueError."""
    if not isinstance(schedule, PeriodSchedule):
        raise ValueError(f"schedule must be a PeriodSchedule, got {schedule!r}")
    name = type(schedule).__name__
    if _BUILTIN.get(name) is not type(schedule):
        if serialize is None:
            raise ValueError(f"serialize is needed for the custom schedule {schedule!r}")
        try:
            return {"schedule": "custom", "object": serialize(schedule)}
        except Exception as e:  # depends on the user's class
            raise ValueError(f"cannot serialise the custom schedule {schedule!r}; give it "
                             f"get_config/from_config and register it with the serializer "
                             f"(Keras: keras.saving.register_keras_serializable)") from e
    cfg: dict[str, Any] = {"schedule": name}
    for k, v in schedule.get_config().items():
        if callable(v):
            if serialize is None:
                raise ValueError(f"serialize is needed for {name}'s {k}={v!r}")
            v = serialize(v)
        cfg[k] = v
    return cfg


def schedule_from_config(cfg: Any,
                         deserialize: Optional[Callable[[Any], Any]] = None) -> PeriodSchedule:
    """Inverse of :func:`schedule_to_config` (``deserialize`` inverts its ``serialize``); an int
    period, ``math.inf`` or None as :func:`make_schedule` takes them."""
    if cfg is None:  # a stored config (never a user's argument: make_schedule refuses None)
        return Never()
    if not isinstance(cfg, dict):
        return make_schedule(cfg)
    cfg = dict(cfg)
    kind = cfg.pop("schedule", None)
    if kind == "custom":
        if deserialize is None:
            raise ValueError(f"deserialize is needed for the custom schedule config {cfg!r}")
        try:
            obj = deserialize(cfg["object"])
        except Exception as e:  # e.g. the class is not registered with the serializer
            raise ValueError(f"cannot deserialise the custom schedule {cfg['object']!r}: {e}; "
                             f"register its class with the serializer (Keras: "
                             f"keras.saving.register_keras_serializable)") from e
        if not isinstance(obj, PeriodSchedule):
            raise ValueError(f"cfg: the custom schedule deserialised to {obj!r}, not a "
                             f"PeriodSchedule")
        return obj
    cls = _BUILTIN.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"cfg: unknown schedule {kind!r} in {cfg!r}")
    for k, v in cfg.items():
        if v is not None and not isinstance(v, numbers.Number) and not callable(v):
            if deserialize is None:  # an encoded callable (period_fn)
                raise ValueError(f"deserialize is needed for {kind}'s {k}={v!r}")
            cfg[k] = deserialize(v)
    try:
        return cls.from_config(cfg)
    except TypeError as e:  # unknown / missing arguments
        raise ValueError(f"cfg: bad arguments for {kind}: {e}") from e
