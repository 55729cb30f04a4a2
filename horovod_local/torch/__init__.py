"""PyTorch front end of horovod-local.

Example::

    import horovod.torch as hvd
    import horovod_local.torch as hl
    hvd.init()
    opt = hl.DistributedLocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       model.named_parameters(), period=8)
    hl.broadcast_parameters(model.state_dict(), root_rank=0)
"""
from typing import Any

from horovod_local.schedules import (  # noqa: F401
    Adaptive,
    Constant,
    Increasing,
    Never,
    PeriodSchedule,
    TimeBudget,
)
from horovod_local.stats import SyncStats  # noqa: F401
from horovod_local.torch._kernels import backend_info  # noqa: F401
from horovod_local.torch.adaalter import LocalAdaAlter  # noqa: F401
from horovod_local.torch.optimizer import DistributedLocalOptimizer  # noqa: F401


def __getattr__(name: str) -> Any:
    # Lazy: importing horovod.torch (and its elastic machinery) only when elastic is used.
    if name in ("LocalTorchState", "elastic"):
        import importlib

        elastic = importlib.import_module("horovod_local.torch.elastic")
        return elastic if name == "elastic" else elastic.LocalTorchState
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def broadcast_parameters(params, root_rank: int = 0, process_set=None) -> None:
    """Horovod's ``broadcast_parameters`` (re-exported so one import serves)."""
    import horovod.torch as hvd

    kw = {} if process_set is None else {"process_set": process_set}
    hvd.broadcast_parameters(params, root_rank=root_rank, **kw)
