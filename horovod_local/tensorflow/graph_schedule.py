"""Period schedules (``horovod_local.schedules``) driven from inside a TensorFlow graph.

Every schedule writes its rules once, as pure functions of a few int64 / float64 scalars
(``initial_state``, ``period_of``, ``should_sync_pure``, ``on_sync_pure``; see
``horovod_local.schedules``). :class:`GraphSchedule` holds one optimizer variable per scalar
(``hl_schedule_<name>``, so the state is saved and broadcast with the optimizer) plus
``hl_period`` (float64: the period in force, for statistics), and runs those same functions
with :data:`TF_OPS`: the per-step decision and the per-sync update are graph ops, and the
Python (PyTorch) and graph paths agree exactly (same float64 operations in the same order).

A schedule that is not ``graph_pure`` (``Increasing(period_fn=...)``, a subclass overriding
the Python methods) is run through its Python ``should_sync`` / ``on_sync`` by
``tf.numpy_function``: one Python call per step and per sync. Its ``state_dict`` is mirrored
into variables when it holds only numbers, so it is saved with the optimizer too.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional

import numpy as np
import tensorflow as tf

from horovod_local import schedules as _core
from horovod_local.schedules import STATE_DTYPES, PeriodSchedule

__all__ = ["GraphSchedule", "TensorFlowOps", "TF_OPS", "schedule_to_config",
           "schedule_from_config"]

#: ``add_variable(name, dtype, value)`` -> a scalar variable (the optimizer's own)
AddVariable = Callable[[str, str, Any], Any]


def _tensor(x: Any, like: Optional[tf.Tensor] = None) -> tf.Tensor:
    """``x`` as a tensor; a Python number takes ``like``'s dtype, else int64 / float64 (not
    TF's int32 / float32 defaults)."""
    if tf.is_tensor(x):
        return x
    if like is not None:
        return tf.convert_to_tensor(x, like.dtype)
    if isinstance(x, (bool, np.bool_)):
        return tf.constant(bool(x))
    if isinstance(x, numbers.Integral):
        return tf.constant(int(x), tf.int64)
    return tf.constant(x, tf.float64)


def _pair(a: Any, b: Any) -> tuple[tf.Tensor, tf.Tensor]:
    if tf.is_tensor(a):
        return a, _tensor(b, a)
    if tf.is_tensor(b):
        return _tensor(a, b), b
    if isinstance(a, float) or isinstance(b, float):
        return tf.constant(a, tf.float64), tf.constant(b, tf.float64)
    return _tensor(a), _tensor(b)


def _bool(x: Any) -> tf.Tensor:
    return tf.cast(_tensor(x), tf.bool)


class TensorFlowOps:
    """:class:`horovod_local.schedules.ScheduleOps` with TensorFlow ops on scalar tensors."""

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> tf.Tensor:
        return tf.where(_bool(cond), *_pair(a, b))

    @staticmethod
    def minimum(a: Any, b: Any) -> tf.Tensor:
        return tf.minimum(*_pair(a, b))

    @staticmethod
    def maximum(a: Any, b: Any) -> tf.Tensor:
        return tf.maximum(*_pair(a, b))

    @staticmethod
    def logical_and(a: Any, b: Any) -> tf.Tensor:
        return tf.logical_and(_bool(a), _bool(b))

    @staticmethod
    def logical_or(a: Any, b: Any) -> tf.Tensor:
        return tf.logical_or(_bool(a), _bool(b))

    @staticmethod
    def logical_not(a: Any) -> tf.Tensor:
        return tf.logical_not(_bool(a))

    @staticmethod
    def to_float(x: Any) -> tf.Tensor:
        return tf.cast(_tensor(x), tf.float64)

    @staticmethod
    def to_int(x: Any) -> tf.Tensor:
        return tf.cast(_tensor(x), tf.int64)

    @staticmethod
    def lookup(table: tuple[int, ...], index: Any) -> tf.Tensor:
        return tf.gather(tf.constant(table, tf.int64), tf.cast(_tensor(index), tf.int64))

    @staticmethod
    def check(ok: Any, message: str, value: Any) -> tf.Tensor:
        # the assert is a dependency of the value, so it runs wherever the value is used
        value = _tensor(value)
        with tf.control_dependencies([tf.debugging.Assert(_bool(ok), [message, value])]):
            return tf.identity(value)


TF_OPS = TensorFlowOps()


def _python_period(schedule: PeriodSchedule) -> float:
    try:
        return float(schedule.period)
    except NotImplementedError:  # a subclass deciding in should_sync alone
        return math.nan


def _mirrorable(state: dict) -> dict[str, str]:
    """The dtypes to mirror a Python schedule's ``state_dict`` in, or {} when it holds anything
    but int / float scalars (then its state stays in Python only)."""
    out: dict[str, str] = {}
    for k, v in state.items():
        if not isinstance(k, str) or not k.isidentifier():
            return {}
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
            return {}
        out[k] = "int64" if isinstance(v, numbers.Integral) else "float64"
    return out


class GraphSchedule:
    """Runs a schedule's rules in a graph, on variables it creates in :meth:`build`.

    Attributes (after :meth:`build`): ``period``, the float64 variable ``hl_period`` holding the
    period in force; ``state``, name -> the variable ``hl_schedule_<name>``.
    """

    def __init__(self, schedule: PeriodSchedule) -> None:
        if not isinstance(schedule, PeriodSchedule):
            raise ValueError(f"schedule must be a PeriodSchedule, got {schedule!r}")
        self.schedule = schedule
        #: False: the schedule's Python methods run through tf.numpy_function
        self.pure = bool(schedule.graph_pure)
        self.needs_deviation = bool(schedule.needs_deviation)
        #: True when should_sync reads seconds_since_sync (the optimizer then measures it)
        self.uses_clock = bool(schedule.uses_clock)
        self.period: Any = None
        self.state: dict[str, Any] = {}
        self._dtypes: dict[str, str] = {}
        self._mirror: Optional[tuple] = None  # state values the Python object last agreed with

    @property
    def can_sync(self) -> bool:
        """False for Never: then no sync op is built into the train step at all."""
        return bool(self.schedule.can_sync)

    @property
    def kind(self) -> str:
        """Deprecated: use :attr:`uses_clock` / :attr:`pure`. "time" when the schedule reads the
        clock, "python" when it runs in Python, else "period"."""
        if not self.pure:
            return "python"
        return "time" if self.uses_clock else "period"

    # ---- construction --------------------------------------------------------------------
    def build(self, add_variable: AddVariable) -> None:
        """Create ``hl_period`` and one variable per state scalar, holding the schedule's
        current state (it may have been loaded before the build)."""
        s = self.schedule
        values = s.state_dict()
        if self.pure:
            self._dtypes = {k: dt for k, (dt, _) in s.initial_state().items()}
            for k, dt in self._dtypes.items():
                if dt not in STATE_DTYPES or not k.isidentifier():
                    raise ValueError(f"{type(s).__name__}.initial_state: {k!r} must be an "
                                     f"identifier with a dtype in {STATE_DTYPES}, got {dt!r}")
        else:
            self._dtypes = _mirrorable(values)
        self.period = add_variable("hl_period", "float64", _python_period(s))
        self.state = {k: add_variable(f"hl_schedule_{k}", dt, values[k])
                      for k, dt in self._dtypes.items()}
        self._mirror = tuple(values[k] for k in self._dtypes)

    def _read(self) -> dict[str, tf.Tensor]:
        return {k: tf.convert_to_tensor(v) for k, v in self.state.items()}

    # ---- per step ----------------------------------------------------------------------------
    def should_sync(self, local_steps: Any, seconds_since_sync: Any) -> tf.Tensor:
        """Bool tensor, evaluated after each local step (``local_steps`` already counts it)."""
        ls = tf.cast(local_steps, tf.int64)
        sec = tf.cast(seconds_since_sync, tf.float64)
        if self.pure:
            out = self.schedule.should_sync_pure(self._read(), ls, sec, TF_OPS)
            return tf.reshape(_bool(out), [])
        out = tf.numpy_function(self._py_should_sync, [ls, sec, *self._read().values()],
                                tf.bool, stateful=True)
        return tf.reshape(out, [])

    # ---- per sync ----------------------------------------------------------------------------
    def on_sync(self, *, rounds: Any = None, step: Any, lr: Any, local_steps: Any,
                deviation: Any = None) -> list:
        """Ops updating the schedule after a round. ``rounds`` (rounds completed before it) is
        ignored: the state counts its rounds itself (``hl_schedule_rounds``)."""
        del rounds
        step = tf.cast(step, tf.int64)
        lr = tf.cast(lr, tf.float64)
        ls = tf.cast(local_steps, tf.int64)
        dev = None if deviation is None else tf.cast(deviation, tf.float64)
        if self.needs_deviation and dev is None:
            raise ValueError(f"deviation is needed by {self.schedule!r}")
        if self.pure:
            s = self.schedule
            new = s.on_sync_pure(self._read(), step=step, lr=lr, local_steps=ls, deviation=dev,
                                 ops=TF_OPS)
            if set(new) != set(self._dtypes):
                raise ValueError(f"{type(s).__name__}.on_sync_pure must return the keys "
                                 f"{sorted(self._dtypes)}, got {sorted(new)}")
            period = tf.cast(_tensor(s.period_of(new, TF_OPS)), tf.float64)
            values = [tf.cast(_tensor(new[k]), dt) for k, dt in self._dtypes.items()]
        else:
            dev_in = dev if dev is not None else tf.constant(math.nan, tf.float64)
            out = tf.numpy_function(
                self._py_on_sync, [step, lr, ls, dev_in, *self._read().values()],
                [tf.float64] + [tf.as_dtype(dt) for dt in self._dtypes.values()], stateful=True)
            period, values = out[0], out[1:]
        # every new value first (and so any check in the rules), then the writes: a failed
        # check leaves the whole state as it was
        with tf.control_dependencies([period, *values]):
            ops = [self.period.assign(tf.reshape(period, []))]
            ops += [v.assign(tf.reshape(x, [])) for v, x in zip(self.state.values(), values)]
        return ops

    # ---- the Python fallback (not graph_pure) ------------------------------------------------
    def _py_load(self, vals: tuple) -> None:
        """Bring the Python object to the variables' state when they differ (a restore, a
        broadcast)."""
        vals = tuple(np.asarray(v).item() for v in vals)
        if self._dtypes and vals != self._mirror:
            self.schedule.load_state_dict(dict(zip(self._dtypes, vals)))
            self._mirror = vals

    def _py_should_sync(self, ls: np.ndarray, sec: np.ndarray, *vals: np.ndarray) -> np.bool_:
        self._py_load(vals)
        return np.bool_(self.schedule.should_sync(int(ls), float(sec)))

    def _py_on_sync(self, step: np.ndarray, lr: np.ndarray, ls: np.ndarray, dev: np.ndarray,
                    *vals: np.ndarray) -> tuple:
        self._py_load(vals)
        s = self.schedule
        s.on_sync(step=int(step), lr=float(lr), local_steps=int(ls),
                  deviation=float(dev) if s.needs_deviation else None)
        state = s.state_dict()
        if set(state) != set(self._dtypes) and self._dtypes:
            raise ValueError(f"{type(s).__name__}.state_dict changed its keys from "
                             f"{sorted(self._dtypes)} to {sorted(state)}")
        out = [np.asarray(state[k], dtype=dt) for k, dt in self._dtypes.items()]
        self._mirror = tuple(x.item() for x in out)
        return (np.float64(_python_period(s)), *out)

    # ---- reading the state back into the Python object ---------------------------------------
    def refresh_python(self, rounds: Optional[int] = None) -> PeriodSchedule:
        """Load the variables' state into the Python schedule object and return it. ``rounds``
        is ignored (the state holds its own count)."""
        del rounds
        if self.state:
            vals = {k: np.asarray(v.numpy()).item() for k, v in self.state.items()}
            self.schedule.load_state_dict(vals)
            self._mirror = tuple(vals.values())
        return self.schedule


# ---- (de)serialisation for Keras get_config / from_config: the core's, with Keras' encoders ---
def schedule_to_config(schedule: PeriodSchedule) -> dict:
    from keras.saving import serialize_keras_object

    return _core.schedule_to_config(schedule, serialize=serialize_keras_object)


def schedule_from_config(cfg: Any) -> PeriodSchedule:
    from keras.saving import deserialize_keras_object

    return _core.schedule_from_config(cfg, deserialize=deserialize_keras_object)
