"""Period schedules (``horovod_local.schedules``) driven from inside a TensorFlow graph.

The schedule's state lives in variables (so it is saved with the optimizer and broadcast with
it); what happens per step and per sync is:

=============  ==============================  ==============================================
schedule       per step: should the rank sync  per sync (on_sync)
=============  ==============================  ==============================================
Constant       ``local_steps >= period``       nothing (period is constant)
Never          never (no sync op is built)     (explicit ``synchronize()`` / ``join()`` only)
Increasing     ``local_steps >= period``       ``period = table[min(rounds // R, E)]``; the table
                                               holds ``Increasing.period_for_round`` of each
                                               stage, computed by schedules.py at build time
               (``period_fn`` given)           ``period = period_fn(rounds)`` via tf.py_function
Adaptive       ``local_steps >= period``       ``Adaptive.on_sync`` of schedules.py, run by
                                               tf.py_function on (period, C2, samples)
TimeBudget     ``local_steps >= min_steps`` and  ``period = local_steps`` (rounds' length)
               ``tf.timestamp() - start >= s``
other          ``schedule.should_sync`` via      ``schedule.on_sync`` via tf.py_function
(user class)   tf.py_function (one Python call
               per step; state stays in Python)
=============  ==============================  ==============================================

Why these choices: the per-step decision runs every batch, so it must be a graph op (the
comparisons above are the whole of ``should_sync`` for our schedules, so porting them is
trivial). The per-sync decisions run once per round, where a Python call is negligible next
to the allreduce; running ``Adaptive.on_sync`` itself keeps ADPSGD's rules in one place
(``schedules.py``) for both front ends.
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from horovod_local.schedules import Adaptive, Constant, Increasing, Never, PeriodSchedule, \
    TimeBudget

__all__ = ["GraphSchedule", "schedule_to_config", "schedule_from_config"]

_I64_SAFE = 2 ** 53  # periods beyond this are "never" in practice (and exact in float64)


class GraphSchedule:
    """Adapter owning the schedule's variables. ``add_variable(name, dtype, value)`` creates one
    optimizer variable (the optimizer passes its own ``add_variable``)."""

    def __init__(self, schedule: PeriodSchedule) -> None:
        self.schedule = schedule
        t = type(schedule)
        if t is Constant or t is Never:
            self.kind = "period"
        elif t is Increasing:
            self.kind = "increasing_fn" if schedule.period_fn is not None else "increasing"
        elif t is Adaptive:
            self.kind = "adaptive"
        elif t is TimeBudget:
            self.kind = "time"
        else:
            self.kind = "python"
        self.never = t is Never
        self.needs_deviation = bool(schedule.needs_deviation)
        self.period = None  # float64 variable: the period in force (nan / inf allowed)
        self.c2 = None
        self.samples = None
        self._table = None

    # ---- construction --------------------------------------------------------------------
    def build(self, add_variable) -> None:
        s = self.schedule
        start = float(s.period) if self.kind != "time" else math.nan
        self.period = add_variable("hl_period", "float64", start)
        if self.kind == "adaptive":
            self.c2 = add_variable("hl_adpsgd_c2", "float64", float(s.c2))
            self.samples = add_variable("hl_adpsgd_samples", "int64", int(s.samples))
        if self.kind == "increasing":
            self._table = self._stage_table(s)

    @staticmethod
    def _stage_table(s: Increasing) -> list[int]:
        """Period of each stage e (rounds e*R .. e*R+R-1) until it stops changing (the cap, or
        factor 1) or passes 2**53 (beyond any run's length)."""
        table = [s.period_for_round(0)]
        while s.factor > 1 and len(table) < 64:
            nxt = s.period_for_round(len(table) * s.rounds_per_stage)
            if nxt == table[-1]:
                break
            table.append(nxt)
            if nxt >= _I64_SAFE:
                break
        return table

    # ---- per step ----------------------------------------------------------------------------
    @property
    def can_sync(self) -> bool:
        """False for Never: then no sync op is built into the train step at all."""
        return not self.never

    def should_sync(self, local_steps: tf.Tensor, seconds_since_sync: tf.Tensor) -> tf.Tensor:
        """Bool tensor, evaluated after each local step (``local_steps`` already counts it)."""
        if self.kind == "time":
            s = self.schedule
            return tf.logical_and(local_steps >= s.min_steps, seconds_since_sync >= s.seconds)
        if self.kind == "python":
            out = tf.numpy_function(
                lambda ls, sec: np.bool_(self.schedule.should_sync(int(ls), float(sec))),
                [local_steps, seconds_since_sync], tf.bool, stateful=True)
            return tf.reshape(out, [])
        return tf.cast(local_steps, tf.float64) >= self.period

    # ---- per sync ----------------------------------------------------------------------------
    def on_sync(self, *, rounds: tf.Tensor, step: tf.Tensor, lr: tf.Tensor,
                local_steps: tf.Tensor, deviation) -> list:
        """Ops updating the schedule after a round (``rounds``: rounds completed before it)."""
        new_rounds = rounds + 1
        if self.kind == "period":
            return []
        if self.kind == "increasing":
            r = self.schedule.rounds_per_stage
            idx = tf.minimum(new_rounds // r, len(self._table) - 1)
            table = tf.constant(self._table, dtype=tf.float64)
            return [self.period.assign(tf.gather(table, idx))]
        if self.kind == "increasing_fn":
            p = tf.numpy_function(
                lambda k: np.float64(self.schedule.period_for_round(int(k))),
                [new_rounds], tf.float64, stateful=True)
            return [self.period.assign(tf.reshape(p, []))]
        if self.kind == "time":
            return [self.period.assign(tf.cast(local_steps, tf.float64))]
        if self.kind == "adaptive":
            def adaptive(rounds_, period_, c2_, samples_, step_, lr_, local_, dev_):
                s = self.schedule
                s.load_state_dict({"rounds": int(rounds_), "period": int(period_),
                                   "c2": float(c2_), "samples": int(samples_)})
                s.on_sync(step=int(step_), lr=float(lr_), local_steps=int(local_),
                          deviation=float(dev_))
                return np.float64(s.period), np.float64(s.c2), np.int64(s.samples)

            p, c2, n = tf.numpy_function(
                adaptive, [rounds, self.period, self.c2, self.samples, step,
                           tf.cast(lr, tf.float64), local_steps, deviation],
                [tf.float64, tf.float64, tf.int64], stateful=True)
            return [self.period.assign(tf.reshape(p, [])), self.c2.assign(tf.reshape(c2, [])),
                    self.samples.assign(tf.reshape(n, []))]
        # any other PeriodSchedule: its own Python state and rules

        def python_on_sync(step_, lr_, local_, dev_):
            s = self.schedule
            s.on_sync(step=int(step_), lr=float(lr_), local_steps=int(local_),
                      deviation=float(dev_) if s.needs_deviation else None)
            return np.float64(s.period)

        dev = deviation if deviation is not None else tf.constant(math.nan, tf.float64)
        p = tf.numpy_function(python_on_sync, [step, tf.cast(lr, tf.float64), local_steps, dev],
                              tf.float64, stateful=True)
        return [self.period.assign(tf.reshape(p, []))]

    # ---- reading the state back into the Python object ---------------------------------------
    def refresh_python(self, rounds: int) -> PeriodSchedule:
        """Load the variables' state into the Python schedule object and return it."""
        s = self.schedule
        if self.kind == "python" or self.period is None:
            return s
        state = {"rounds": int(rounds)}
        if self.kind == "adaptive":
            state.update(period=int(self.period.numpy()), c2=float(self.c2.numpy()),
                         samples=int(self.samples.numpy()))
        elif self.kind == "time":
            p = float(self.period.numpy())
            state.update(last_round_steps=0 if math.isnan(p) else int(p))
        s.load_state_dict(state)
        return s


# ---- (de)serialisation of schedules for Keras get_config / from_config -----------------------
def schedule_to_config(schedule: PeriodSchedule) -> dict:
    t = type(schedule)
    if t in (Constant, Never, Adaptive, TimeBudget):
        return schedule.describe()
    if t is Increasing:
        d = schedule.describe()
        if schedule.period_fn is not None:
            from keras.saving import serialize_keras_object

            d["period_fn"] = serialize_keras_object(schedule.period_fn)
        return d
    from keras.saving import serialize_keras_object

    try:
        return {"schedule": "custom", "object": serialize_keras_object(schedule)}
    except Exception as e:  # pragma: no cover - depends on the user's class
        raise ValueError(f"horovod_local: cannot serialise the custom schedule {schedule!r}; give "
                         f"it get_config/from_config and register it with "
                         f"keras.saving.register_keras_serializable") from e


def schedule_from_config(cfg) -> PeriodSchedule:
    if not isinstance(cfg, dict):  # an int period, or None / inf
        from horovod_local.schedules import make_schedule

        return make_schedule(cfg)
    cfg = dict(cfg)
    kind = cfg.pop("schedule")
    if kind == "Constant":
        return Constant(cfg["period"])
    if kind == "Never":
        return Never()
    if kind == "Increasing":
        fn = cfg.pop("period_fn", None)
        if fn is not None:
            from keras.saving import deserialize_keras_object

            fn = deserialize_keras_object(fn)
        return Increasing(period_fn=fn, **cfg)
    if kind == "Adaptive":
        return Adaptive(**cfg)
    if kind == "TimeBudget":
        return TimeBudget(**cfg)
    if kind == "custom":
        from keras.saving import deserialize_keras_object

        return deserialize_keras_object(cfg["object"])
    raise ValueError(f"horovod_local: unknown schedule config {cfg!r}")
