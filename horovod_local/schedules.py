"""Period schedules: when a rank takes part in the next sync round.

A schedule is asked after every local step (``should_sync``) and told about every finished
round (``on_sync``). It is framework-free and deterministic given what it is told, so its state
(``state_dict``) is part of an exact resume. Exact rules: ``docs/SEMANTICS.md``.

Example::

    >>> from horovod_local.schedules import Increasing
    >>> s = Increasing(initial_period=2, factor=2, rounds_per_stage=2)
    >>> [s.period_for_round(r) for r in range(6)]
    [2, 2, 4, 4, 8, 8]
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional, Union

__all__ = [
    "PeriodSchedule", "Constant", "Never", "Increasing", "Adaptive", "TimeBudget", "make_schedule",
]


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


class PeriodSchedule:
    """Base class. Subclasses implement :meth:`should_sync` and, if they adapt, :meth:`on_sync`."""

    #: whether :meth:`on_sync` needs the ADPSGD deviation statistic S (costs a scalar allreduce)
    needs_deviation: bool = False

    def __init__(self) -> None:
        self.rounds = 0  # sync rounds completed after warm-up

    @property
    def period(self) -> float:
        """The period (local steps per round) currently in force; ``inf`` if there is none."""
        raise NotImplementedError

    def should_sync(self, local_steps: int, seconds_since_sync: float) -> bool:
        return local_steps >= self.period

    def on_sync(self, *, step: int, lr: float, local_steps: int,
                deviation: Optional[float] = None) -> None:
        """Called once per finished round: the global step, the lr, the round's local steps and
        (if ``needs_deviation``) the ADPSGD statistic S."""
        self.rounds += 1

    def describe(self) -> dict:
        """The configuration (not the state); ranks must agree on it."""
        return {"schedule": type(self).__name__}

    def state_dict(self) -> dict:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        self.rounds = int(state["rounds"])

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

    @property
    def period(self) -> float:
        return self._period

    def describe(self) -> dict:
        return {"schedule": "Constant", "period": self._period}


class Never(PeriodSchedule):
    """H = infinity: no automatic sync; call ``synchronize()`` (one-shot averaging)."""

    @property
    def period(self) -> float:
        return math.inf

    def should_sync(self, local_steps: int, seconds_since_sync: float) -> bool:
        return False


class Increasing(PeriodSchedule):
    """Growing periods (PR-SGD Alg. 2, Stich's doubling trick).

    Round ``s`` has period ``initial_period * factor ** (s // rounds_per_stage)``, capped at
    ``max_period``; or ``period_fn(s)`` if given.

    Args:
        initial_period: period of the first round (integer >= 1).
        factor: growth factor per stage (integer >= 1).
        rounds_per_stage: rounds between two growths (integer >= 1).
        max_period: optional cap (integer >= initial_period).
        period_fn: optional callable ``s -> H_s`` (positive int) replacing the formula.

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

    def period_for_round(self, s: int) -> int:
        if self.period_fn is not None:
            h = self.period_fn(s)
            return _check_int(f"period_fn({s})", h)
        h = self.initial_period * self.factor ** (s // self.rounds_per_stage)
        return h if self.max_period is None else min(h, self.max_period)

    @property
    def period(self) -> float:
        return self.period_for_round(self.rounds)

    def describe(self) -> dict:
        d = {"schedule": "Increasing", "initial_period": self.initial_period, "factor": self.factor,
             "rounds_per_stage": self.rounds_per_stage, "max_period": self.max_period}
        if self.period_fn is not None:
            d["period_fn"] = getattr(self.period_fn, "__qualname__", repr(self.period_fn))
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
        self._period = self.initial_period
        self.c2 = 0.0
        self.samples = 0

    @property
    def period(self) -> float:
        return self._period

    def on_sync(self, *, step: int, lr: float, local_steps: int,
                deviation: Optional[float] = None) -> None:
        super().on_sync(step=step, lr=lr, local_steps=local_steps)
        if deviation is None:
            raise ValueError("Adaptive.on_sync needs the deviation statistic S")
        if not lr > 0:
            raise ValueError(f"ADPSGD needs a positive learning rate, got lr={lr!r}")
        if step <= self.sampling_steps:
            self.c2 = (self.c2 * self.samples + deviation / lr) / (self.samples + 1)
            self.samples += 1
        elif deviation < self.lower * lr * self.c2:
            self._period += 1
            if self.max_period is not None:
                self._period = min(self._period, self.max_period)
        elif deviation > self.upper * lr * self.c2:
            self._period = max(self.min_period, self._period - 1)

    def describe(self) -> dict:
        return {"schedule": "Adaptive", "initial_period": self.initial_period,
                "sampling_steps": self.sampling_steps, "lower": self.lower, "upper": self.upper,
                "min_period": self.min_period, "max_period": self.max_period}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "period": self._period, "c2": self.c2,
                "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._period, self.c2, self.samples = int(state["period"]), float(state["c2"]), \
            int(state["samples"])


class TimeBudget(PeriodSchedule):
    """Time-based rounds for heterogeneous workers (PR-SGD Alg. 3).

    Each rank syncs once its own wall-clock time since the last sync reaches ``seconds``, so
    fast ranks take more local steps per round. Every rank still enters each round once; at the
    end of an epoch with uneven step counts call ``optimizer.join()``.

    Args:
        seconds: the budget per round (> 0).
        min_steps: local steps a rank takes at least before it may sync (default 1).
    """

    def __init__(self, seconds: float, min_steps: int = 1) -> None:
        super().__init__()
        self.seconds = _check_float("seconds", seconds)
        self.min_steps = _check_int("min_steps", min_steps)
        self.last_round_steps = 0

    @property
    def period(self) -> float:
        return float(self.last_round_steps) if self.rounds else math.nan

    def should_sync(self, local_steps: int, seconds_since_sync: float) -> bool:
        return local_steps >= self.min_steps and seconds_since_sync >= self.seconds

    def on_sync(self, *, step: int, lr: float, local_steps: int,
                deviation: Optional[float] = None) -> None:
        super().on_sync(step=step, lr=lr, local_steps=local_steps)
        self.last_round_steps = local_steps

    def describe(self) -> dict:
        return {"schedule": "TimeBudget", "seconds": self.seconds, "min_steps": self.min_steps}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "last_round_steps": self.last_round_steps}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.last_round_steps = int(state["last_round_steps"])


def make_schedule(period: Union[int, float, PeriodSchedule, None]) -> PeriodSchedule:
    """``period`` as the user gave it -> a schedule: an int H -> :class:`Constant`,
    ``math.inf`` or ``None`` -> :class:`Never`, a :class:`PeriodSchedule` -> itself."""
    if isinstance(period, PeriodSchedule):
        return period
    if period is None or (isinstance(period, float) and period == math.inf):
        return Never()
    if isinstance(period, float) and period.is_integer() and period >= 1:
        period = int(period)
    if isinstance(period, bool) or not isinstance(period, numbers.Integral) or period < 1:
        raise ValueError(f"period must be an integer >= 1, math.inf, or a PeriodSchedule "
                         f"(Constant, Increasing, Adaptive, TimeBudget, Never); got {period!r}")
    return Constant(int(period))
