"""Elastic training (``hvd.elastic.run``) with a ``DistributedLocalOptimizer``.

Horovod's ``hvd.elastic.TorchState`` cannot carry the wrapper: its optimizer handler
(``broadcast_optimizer_state``) calls ``optimizer.step()`` on a worker whose state is still
empty (a local step, or a sync round the other ranks never enter), it never tells the wrapper
that the world size changed (the wrapper caches it and divides every average by it), and after a
pure removal it skips ``sync()`` because data-parallel replicas are identical, which local-SGD
replicas are not between syncs. :class:`LocalTorchState` fixes those three points and is
otherwise ``TorchState``.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from horovod.common.elastic import ObjectState
from horovod.common.exceptions import HostsUpdatedInterrupt
from horovod.torch.elastic.state import StateHandler, TorchState, _get_handlers
from horovod.torch.functions import broadcast_object
from horovod.torch.mpi_ops import rank

__all__ = ["LocalTorchState"]


def _is_local_optimizer(value: Any) -> bool:
    # the wrapper is a run-time subclass of the user's class: recognise it by its own state
    return isinstance(value, torch.optim.Optimizer) and "_hl_process_set" in vars(value)


class _LocalOptimizerHandler(StateHandler):
    """Commit / roll back / sync one ``DistributedLocalOptimizer``: its whole ``state_dict()``
    (inner optimizer state + wrapper state), then a fresh round after each sync."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if optimizer._hl_process_set.process_set_id != 0:
            # Horovod's reset re-runs hvd.init() without process sets: this one would be gone
            raise ValueError("LocalTorchState supports wrappers over the global process set only: "
                             "Horovod's elastic reset re-initialises without other process sets")
        super().__init__(optimizer)
        self._saved: dict = copy.deepcopy(optimizer.state_dict())

    def save(self) -> None:
        self._saved = copy.deepcopy(self.value.state_dict())

    def restore(self) -> None:
        # a copy: load_state_dict keeps the tensors it is given, and later steps update them in
        # place, which would corrupt the commit for a second restore
        self.value.load_state_dict(copy.deepcopy(self._saved))

    def sync(self) -> None:
        self.value._hl_on_reset(root_rank=0)

    def set_value(self, value: Any) -> None:  # ``state.optimizer = ...``
        if not _is_local_optimizer(value):
            raise TypeError("this attribute held a DistributedLocalOptimizer; assign another one "
                            f"(got {type(value).__name__}) or build a new LocalTorchState")
        self.__init__(value)  # the same checks as at construction, and a save()


class LocalTorchState(TorchState):
    """State of a PyTorch training process with ``DistributedLocalOptimizer`` wrappers, for
    ``@hvd.elastic.run`` (a drop-in for ``hvd.elastic.TorchState``).

    ``commit()`` saves the model, every optimizer (for a wrapper: the inner optimizer's state
    and the wrapper's schedule, round position, SlowMo/outer anchors and state, statistics) and
    the plain attributes, then checks for host changes. ``restore()`` rolls all of them back to
    the last commit (Horovod calls it after a failed collective). ``sync()`` (Horovod calls it
    when ``train`` starts and after every reset) makes every rank equal to rank 0; for a wrapper
    it first adopts the new world size and checks the replicas' configuration, and afterwards
    starts a fresh round from the broadcast parameters (``local_steps = 0``, anchors = those
    parameters). Unlike ``TorchState``, ``sync()`` also runs after a removal of workers: between
    syncs local-SGD replicas differ. See docs/SEMANTICS.md, "Elastic training".

    Args:
        model: optional ``torch.nn.Module``; its ``state_dict`` is saved and broadcast.
        optimizer: optional optimizer: a ``DistributedLocalOptimizer`` or any other one.
        kwargs: more models, optimizers, ``ElasticSampler``\\ s, or plain picklable attributes
            (``epoch``, ``batch``) exposed as attributes of the state and broadcast from rank 0.

    Example (``python train.py`` runs it on one process; under ``horovodrun --gloo -np 2
    --min-np 1 --max-np 4 --host-discovery-script ./hosts.sh python train.py`` workers may come
    and go)::

        import horovod.torch as hvd, torch, horovod_local.torch as hl
        hvd.init()
        torch.manual_seed(0)
        model = torch.nn.Linear(10, 1)
        opt = hl.DistributedLocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                           model.named_parameters(), period=4)
        state = hl.LocalTorchState(model, opt, epoch=0, batch=0)

        @hvd.elastic.run
        def train(state):
            for state.epoch in range(state.epoch, 3):
                for state.batch in range(state.batch, 32):
                    x = torch.randn(16, 10)
                    opt.zero_grad()
                    torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
                    opt.step()
                    if opt.sync_stats().local_steps == 0:   # replicas agree: a good commit
                        state.commit()
                state.batch = 0
            opt.average_parameters()

        train(state)
    """

    def __init__(self, model: Optional[torch.nn.Module] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None, **kwargs: Any) -> None:
        kwargs.update(model=model, optimizer=optimizer)
        ours = {k: _LocalOptimizerHandler(v) for k, v in kwargs.items() if _is_local_optimizer(v)}
        theirs, plain = _get_handlers({k: v for k, v in kwargs.items() if k not in ours})
        # wrappers first: their replica check runs before any broadcast, so ranks built
        # differently fail with the check's message instead of a broadcast shape error
        self._handlers = {**ours, **theirs}
        for name, handler in self._handlers.items():
            setattr(self, name, handler.value)
        ObjectState.__init__(self, bcast_object=broadcast_object, get_rank=rank, **plain)

    def check_host_updates(self) -> None:
        try:
            super().check_host_updates()
        except HostsUpdatedInterrupt as interrupt:
            # Horovod skips sync() after a pure removal (replicas assumed identical); ours differ
            # mid-round and the wrappers must learn the new size, so always sync.
            interrupt.skip_sync = False
            raise
