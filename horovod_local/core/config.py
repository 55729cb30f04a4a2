"""``SyncConfig``: the sync arguments of ``DistributedLocalOptimizer``, validated once for both
front ends (``ValueError`` naming the argument), and the configuration part of the replica
fingerprint."""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

from horovod_local.schedules import PeriodSchedule, make_schedule

__all__ = ["SyncConfig", "STATE_POLICIES", "ALGORITHMS", "NONFINITE_POLICIES", "_compression_mode"]

STATE_POLICIES = ("keep", "reset", "average")
ALGORITHMS = ("local_sgd", "slowmo")
NONFINITE_POLICIES = ("raise", "skip")


@dataclass(frozen=True)
class SyncConfig:
    """What every rank's wrapper is configured with. Build it with :meth:`from_arguments`.

    Attributes:
        schedule: the period schedule (its own state lives in it, not in the config).
        warmup_steps: steps with a per-step gradient allreduce before local steps start.
        state_policy: ``'keep'`` | ``'reset'`` | ``'average'`` (the inner optimizer's state at
            a sync).
        algorithm: ``'local_sgd'`` or ``'slowmo'`` as the user gave it.
        slowmo_lr, slowmo_momentum: SlowMo's alpha and beta.
        outer: a description of the outer optimizer (None without one): the front end's
            object or factory is kept by the front end.
        nonfinite: ``'raise'`` | ``'skip'``.
        adaalter: the inner optimizer is Local AdaAlter (its denominators sync too).
        local_period: two-level averaging: the ranks of a group (host) average every this
            many local steps, all ranks on the schedule; None: flat.
        overlap: a round's sum travels while the next local steps run (one-round-delayed
            averaging).
        compression: None, ``'fp16'`` or ``'int8'``: syncs send each rank's change since the
            last common point, quantised, with error feedback.
    """

    schedule: PeriodSchedule
    warmup_steps: int = 0
    state_policy: str = "keep"
    algorithm: str = "local_sgd"
    slowmo_lr: float = 1.0
    slowmo_momentum: float = 0.5
    outer: Any = None
    nonfinite: str = "raise"
    adaalter: bool = False
    local_period: Optional[int] = None
    overlap: bool = False
    compression: Optional[str] = None

    @classmethod
    def from_arguments(cls, period: Union[int, float, PeriodSchedule, None], warmup_steps: Any,
                       state_policy: Any, algorithm: Any, slowmo_lr: Any, slowmo_momentum: Any,
                       outer: Any = None, nonfinite: Any = "raise",
                       adaalter: bool = False, local_period: Any = None,
                       overlap: Any = False, compression: Any = None) -> "SyncConfig":
        """Check the user's arguments (each ``ValueError`` names its argument)."""
        schedule = make_schedule(period)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) \
                or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if state_policy not in STATE_POLICIES:
            raise ValueError(f"state_policy must be one of {STATE_POLICIES}, got "
                             f"{state_policy!r}")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        for name, v in (("slowmo_lr", slowmo_lr), ("slowmo_momentum", slowmo_momentum)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if not slowmo_lr > 0:
            raise ValueError(f"slowmo_lr must be > 0, got {slowmo_lr!r}")
        if not 0 <= slowmo_momentum < 1:
            raise ValueError(f"slowmo_momentum must be in [0, 1), got {slowmo_momentum!r}")
        if outer is not None and algorithm != "local_sgd":
            raise ValueError("pass either algorithm='slowmo' or outer_optimizer, not both")
        if algorithm != "slowmo" and (slowmo_lr, slowmo_momentum) != (1.0, 0.5):
            warnings.warn(f"slowmo_lr={slowmo_lr!r} / slowmo_momentum={slowmo_momentum!r} have "
                          f"no effect without algorithm='slowmo'", UserWarning, stacklevel=3)
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if adaalter and state_policy == "reset":
            raise ValueError("state_policy='reset' does not apply to LocalAdaAlter: its "
                             "accumulators are always averaged at syncs (AdaAlter's own rule); "
                             "use 'keep'")
        if local_period is not None:
            if isinstance(local_period, bool) or not isinstance(local_period, numbers.Integral) \
                    or local_period < 1:
                raise ValueError(f"local_period must be an integer >= 1 or None, got "
                                 f"{local_period!r}")
            if schedule.uses_clock:
                raise ValueError(
                    "local_period does not work with a TimeBudget schedule: each rank's own clock "
                    "would decide whether a round is global, so the ranks of a host could "
                    "disagree on whether a round is local or global, and those never pair up "
                    "(a hang). Use a step-based schedule (an int, Constant, Increasing, "
                    "Adaptive)")
            local_period = int(local_period)
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap must be True or False, got {overlap!r}")
        if overlap:
            why = None
            if adaalter:
                why = ("LocalAdaAlter: its denominators must be refreshed from the same round's "
                       "averaged accumulators before the next local step; a delayed refresh is "
                       "another algorithm")
            elif nonfinite == "skip":
                why = ("nonfinite='skip': a dropped round would have to undo the local progress "
                       "made while it travelled; use nonfinite='raise'")
            if why:
                raise ValueError(f"overlap=True does not work with {why}")
        if compression not in (None, "fp16", "int8"):
            raise ValueError(f"compression must be None, 'fp16' or 'int8', got {compression!r}")
        if compression:
            why = None
            if state_policy == "average":
                why = ("state_policy='average': only parameter changes are compressed; use "
                       "'keep' or 'reset'")
            elif adaalter:
                why = ("LocalAdaAlter: its accumulators are averaged uncompressed at every "
                       "sync; only parameter changes are compressed")
            elif nonfinite == "skip":
                why = "nonfinite='skip' (a dropped round would have to undo the residual)"
            if why:
                raise ValueError(f"compression={compression!r} does not work with {why}")
        return cls(schedule, int(warmup_steps), state_policy, algorithm, float(slowmo_lr),
                   float(slowmo_momentum), outer, nonfinite, bool(adaalter), local_period, overlap,
                   compression)

    @property
    def has_outer(self) -> bool:
        return self.outer is not None

    @property
    def needs_anchors(self) -> bool:
        """SlowMo and outer optimizers keep an anchor x0 per parameter; compression keeps the
        common point c."""
        return self.algorithm == "slowmo" or self.has_outer or self.compression is not None

    @property
    def anchors_role(self) -> str:
        """What the anchors are, for messages (the ranks' same-start check)."""
        return ("compression (the common point c)" if self.compression else
                "SlowMo (the slow model x0)" if self.algorithm == "slowmo" else
                "the outer optimizer (the anchor x0)")

    @property
    def needs_deviation(self) -> bool:
        return bool(self.schedule.needs_deviation)

    def fingerprint(self, inner_name: str, outer_description: Optional[Any],
                    tensor_kind: str, tensors: list[tuple[str, tuple, str]]) -> list:
        """What every rank must agree on (``horovod_local.replicas``): this configuration, the
        inner optimizer's class, the outer optimizer's description, then each synced tensor's
        (name, shape, dtype) in buffer order, as ``(kind, name, value)`` entries."""
        fp = [("config", "schedule", self.schedule.describe()),
              ("config", "warmup_steps", self.warmup_steps),
              ("config", "state_policy", self.state_policy),
              ("config", "algorithm", "outer" if self.has_outer else self.algorithm),
              ("config", "slowmo", (self.slowmo_lr, self.slowmo_momentum)),
              ("config", "inner optimizer", inner_name),
              ("config", "outer optimizer", outer_description),
              ("config", "nonfinite", self.nonfinite),
              ("config", "local_period", self.local_period),
              ("config", "overlap", True if self.overlap else None),  # old checkpoints: None
              ("config", "compression", self.compression),
              ("config", f"number of synced {tensor_kind}s", len(tensors))]
        fp += [(tensor_kind, name, (tuple(shape), dtype)) for name, shape, dtype in tensors]
        return fp


def _compression_mode(compression: Any) -> Optional[str]:
    """``compression=`` of either front end -> ``SyncConfig.compression``: None /
    ``hvd.Compression.none`` -> None; ``'fp16'`` / ``hvd.Compression.fp16`` -> 'fp16';
    ``'int8'``; anything else raises naming it. Framework-free: Horovod's compressor classes
    (``horovod.torch`` or ``horovod.tensorflow``) are recognised by their class name."""
    if compression is None or isinstance(compression, str):
        if compression in (None, "none"):
            return None
        if compression == "bf16":
            raise ValueError("compression='bf16': Horovod 0.28 cannot carry bfloat16 (it "
                             "would travel as float32 and save nothing); use 'fp16' or 'int8'")
        if compression not in ("fp16", "int8"):
            raise ValueError(f"compression must be None, 'fp16', 'int8' or "
                             f"hvd.Compression.none/fp16, got {compression!r}")
        return compression
    name = getattr(compression, "__name__", type(compression).__name__)
    if name == "NoneCompressor":
        return None
    if name == "FP16Compressor":
        return "fp16"
    raise ValueError(f"compression={name}: only hvd.Compression.none / hvd.Compression.fp16 "
                     f"(or 'fp16' / 'int8') apply to parameter syncs")
