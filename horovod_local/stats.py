"""Sync statistics a training loop can log (``optimizer.sync_stats()``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class SyncStats:
    """Counters of one rank's wrapper since construction (or since the loaded checkpoint).

    Attributes:
        steps: optimizer steps taken (warm-up and local).
        warmup_steps_done: of those, steps with a per-step gradient allreduce.
        syncs: parameter sync rounds performed.
        period: the period currently in force (``inf`` for ``Never``, ``nan`` before the first
            time-budget round).
        local_steps: local steps since the last sync.
        bytes_sent: payload bytes this rank handed to allreduce (buffers, both warm-up
            gradients and syncs), for comparison with ``bytes_per_step_allreduce``.
        bytes_per_step_allreduce: what Horovod's DistributedOptimizer would have handed to
            allreduce for the same steps (gradient bytes every step).
        sync_seconds: wall time spent in sync rounds and warm-up allreduces (pack, allreduce,
            unpack).
        last_deviation: the ADPSGD statistic S of the last round (``nan`` if not measured).
        skipped_rounds: rounds dropped because some rank sent NaN/Inf (``nonfinite='skip'``).
        local_syncs: two-level averaging: local rounds (inside a group / host) performed.
        local_bytes_sent: payload bytes of those local rounds (not in ``bytes_sent``).
        local_round_steps: two-level averaging: local steps since the last round of either
            level.
    """

    steps: int = 0
    warmup_steps_done: int = 0
    syncs: int = 0
    period: float = float("nan")
    local_steps: int = 0
    bytes_sent: int = 0
    bytes_per_step_allreduce: int = 0
    sync_seconds: float = 0.0
    last_deviation: float = float("nan")
    skipped_rounds: int = 0
    local_syncs: int = 0
    local_bytes_sent: int = 0
    local_round_steps: int = 0

    @property
    def communication_ratio(self) -> float:
        """bytes_sent / bytes_per_step_allreduce (< 1 means less traffic than Horovod)."""
        return self.bytes_sent / self.bytes_per_step_allreduce if self.bytes_per_step_allreduce \
            else float("nan")

    def as_dict(self) -> dict:
        return {**asdict(self), "communication_ratio": self.communication_ratio}
