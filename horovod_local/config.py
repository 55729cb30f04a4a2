"""Validation of the sync arguments both front ends share (one place for the rules and
messages: ``ValueError`` naming the argument)."""
from __future__ import annotations

import math
import numbers
from typing import Any, Union

from horovod_local.schedules import PeriodSchedule, make_schedule

STATE_POLICIES = ("keep", "reset", "average")
ALGORITHMS = ("local_sgd", "slowmo")
NONFINITE_POLICIES = ("raise", "skip")


def validate_sync_arguments(period: Union[int, float, PeriodSchedule, None], warmup_steps: Any,
                            state_policy: Any, algorithm: Any, slowmo_lr: Any,
                            slowmo_momentum: Any) -> PeriodSchedule:
    """Check the arguments of ``DistributedLocalOptimizer``; returns the period's schedule."""
    schedule = make_schedule(period)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) \
            or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if state_policy not in STATE_POLICIES:
        raise ValueError(f"state_policy must be one of {STATE_POLICIES}, got {state_policy!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    for name, v in (("slowmo_lr", slowmo_lr), ("slowmo_momentum", slowmo_momentum)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not slowmo_lr > 0:
        raise ValueError(f"slowmo_lr must be > 0, got {slowmo_lr!r}")
    if not 0 <= slowmo_momentum < 1:
        raise ValueError(f"slowmo_momentum must be in [0, 1), got {slowmo_momentum!r}")
    return schedule
