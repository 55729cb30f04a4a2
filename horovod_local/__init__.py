"""horovod-local: communication-efficient distributed training on top of Horovod.

Workers take local optimizer steps and average their models every few steps (local SGD,
ADPSGD, Local AdaAlter, SlowMo), in one fused allreduce. The framework front ends are
:mod:`horovod_local.torch` and :mod:`horovod_local.tensorflow.keras`; this package holds the
framework-free core they share: period schedules, algorithm settings and sync statistics.
"""
__version__ = "0.1.0"

from horovod_local.schedules import (  # noqa: E402,F401
    Adaptive,
    Constant,
    Increasing,
    Never,
    PeriodSchedule,
    TimeBudget,
    make_schedule,
)
from horovod_local.stats import SyncStats  # noqa: E402,F401
