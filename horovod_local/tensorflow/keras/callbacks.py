"""Keras 3 callbacks for horovod-local (and the Horovod Keras callbacks that do not work on
Keras 3).

Ranks may have different numbers of batches per epoch. The collective callbacks here
(``BroadcastGlobalVariablesCallback``, ``FinalSyncCallback``, ``MetricAverageCallback``) therefore
end every epoch with ``optimizer.join()``: the first of them that Keras calls at an epoch's end
joins (a rank whose batches are done serves the other ranks' sync rounds until every rank has
joined), the others see that the epoch is joined. The join runs at the earliest of: the end of
the epoch's last batch (when Keras knows the number of batches: arrays, datasets of known
length, ``steps_per_epoch``), the start of the validation, ``on_epoch_end``. So the join comes
before any other epoch-end collective (metric averaging, the user's own), whatever the order of
the callbacks, and validation, checkpoints and the averaged metrics all see the same model on
every rank. Put these callbacks first in ``callbacks=[...]`` (broadcast, final sync, metric
averaging, then the rest), so that later callbacks see the averaged metrics. See docs/KERAS.md,
"Uneven data and epoch ends"."""
from __future__ import annotations

import math
import sys
import warnings
from typing import Optional

import keras
import tensorflow as tf

from horovod_local.tensorflow import collectives as fs
from horovod_local.tensorflow.collectives import _hvd
from horovod_local.tensorflow.keras.optimizer import DistributedLocalOptimizer

__all__ = ["BroadcastGlobalVariablesCallback", "MetricAverageCallback", "FinalSyncCallback",
           "LearningRateWarmupCallback", "SyncStatsLogger", "find_local_optimizer", "join_epoch"]

# dtypes Horovod can broadcast (Keras' SeedGenerator states are uint32: they stay per rank, so
# dropout masks differ across ranks, as each rank's data does)
_BROADCASTABLE = {"float16", "float32", "float64", "int32", "int64", "uint8", "int8", "bool"}


def find_local_optimizer(optimizer) -> Optional[DistributedLocalOptimizer]:
    """The DistributedLocalOptimizer in ``optimizer`` (itself, or inside a LossScaleOptimizer)."""
    seen = 0
    while optimizer is not None and seen < 4:
        if isinstance(optimizer, DistributedLocalOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)
        seen += 1
    return None


# The epoch-end join, shared by the collective callbacks through the optimizer: the first of
# them to reach an epoch's end joins and records (epoch, iterations); the others skip.
_EPOCH_JOINED = "epoch_joined"


def _local_opt(model) -> Optional[DistributedLocalOptimizer]:
    opt = getattr(model, "optimizer", None)
    local = find_local_optimizer(opt) if opt is not None else None
    return local if local is not None and local.built else None


def _iterations(opt: DistributedLocalOptimizer) -> int:
    return int(opt.iterations.numpy())


def _join(opt: DistributedLocalOptimizer, epoch) -> None:
    """``opt.join()``, recorded as this epoch's join (``epoch=None``: the end of training).
    Skipped during warm-up: every rank takes every warm-up step (gradient rounds), so replicas
    are identical and the ranks are in step; a sync round there would count as a round."""
    it = _iterations(opt)
    if it >= opt._hl_warmup_steps:
        opt.join()
    opt._hl_fns[_EPOCH_JOINED] = (epoch, it)


def join_epoch(model, epoch: int) -> None:
    """Run epoch ``epoch``'s ``optimizer.join()`` now, unless it already ran (the collective
    callbacks call this; a second call for the same epoch with no step since does nothing).
    A callback of yours that communicates at an epoch's end calls it first, so that no rank is
    still in a train step of that epoch, whatever the callbacks' order. A no-op without a
    built DistributedLocalOptimizer. Collective (every rank, at the same epoch's end)."""
    opt = _local_opt(model)
    if opt is not None and opt._hl_fns.get(_EPOCH_JOINED) != (epoch, _iterations(opt)):
        _join(opt, epoch)


class _JoinsAtEpochEnd(keras.callbacks.Callback):
    """Base of the collective callbacks (every rank must list them): at each epoch's end, the
    first of them that Keras calls runs ``join()`` (see the module docstring). Subclasses call
    ``super()`` first in the hooks they override."""

    _hl_epoch = 0
    _hl_fitting = False

    def on_train_begin(self, logs=None):
        self._hl_fitting, self._hl_epoch = True, 0
        opt = _local_opt(self.model)
        if opt is not None:  # a new fit: no epoch joined yet
            opt._hl_fns.pop(_EPOCH_JOINED, None)

    def on_epoch_begin(self, epoch, logs=None):
        self._hl_epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        steps = (self.params or {}).get("steps")
        if steps and batch + 1 >= steps:  # this rank's last batch of the epoch
            join_epoch(self.model, self._hl_epoch)

    def on_test_begin(self, logs=None):
        if self._hl_fitting:  # fit's validation: on the joined model
            join_epoch(self.model, self._hl_epoch)

    def on_epoch_end(self, epoch, logs=None):
        join_epoch(self.model, epoch)

    def on_train_end(self, logs=None):
        self._hl_fitting = False


class BroadcastGlobalVariablesCallback(_JoinsAtEpochEnd):
    """At the start of training, set every rank's model and optimizer variables to
    ``root_rank``'s (one fused broadcast per dtype), so that all replicas start from the same
    point. The Keras 3 counterpart of Horovod's callback of the same name. Joins at every
    epoch's end (module docstring)."""

    def __init__(self, root_rank: int = 0, process_set=None) -> None:
        super().__init__()
        self.root_rank = root_rank
        self.process_set = process_set
        self.broadcast_done = False

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        # Keras 3 on TensorFlow builds the model and optimizer lazily, in the first traced train
        # step. If the model is built, build the optimizer now and broadcast before the first
        # step; otherwise broadcast after the first batch, as Horovod's callback does.
        if self.model.built and self.model.trainable_variables:
            self._broadcast()

    def on_train_batch_end(self, batch, logs=None):
        if not self.broadcast_done:
            self._broadcast()
        super().on_train_batch_end(batch, logs)

    def _broadcast(self):
        if self.broadcast_done:
            return
        variables = list(self.model.variables)
        opt = self.model.optimizer
        if opt is not None:
            if not opt.built:
                opt.build(self.model.trainable_variables)
            local = find_local_optimizer(opt)
            if local is not None:  # ranks built differently: a clear error, not a broadcast's
                local._hl_check_replicas()
            variables += list(opt.variables)
        seen, unique = set(), []
        for v in variables:
            if id(v) not in seen and tf.as_dtype(v.dtype).name in _BROADCASTABLE:
                seen.add(id(v))
                unique.append(v)
        fs.broadcast_variables(unique, root_rank=self.root_rank, process_set=self.process_set)
        self.broadcast_done = True


class MetricAverageCallback(_JoinsAtEpochEnd):
    """At the end of each epoch, replace every metric in ``logs`` by its mean over the ranks
    (one allreduce for all of them), after the epoch's join (module docstring). Place it before
    callbacks that read the metrics."""

    def __init__(self, process_set=None) -> None:
        super().__init__()
        self.process_set = process_set

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)  # the join first: no rank is still in a train step
        if not logs:
            return
        keys = sorted(k for k, v in logs.items() if _is_number(v))
        means = fs.allreduce_mean_values([float(logs[k]) for k in keys],
                                         process_set=self.process_set)
        for k, m in zip(keys, means):
            logs[k] = m


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


class FinalSyncCallback(_JoinsAtEpochEnd):
    """Every rank ends each epoch, and training, with the same averaged model (save it on any
    rank): ``optimizer.join()`` at every epoch's end (module docstring: the first of this
    package's collective callbacks that Keras calls joins) and, if a step was taken since, at
    the end of training. Ranks may have different numbers of batches per epoch.

    Args:
        every_epoch: kept for compatibility; the join runs at every epoch's end either way
            (a rank whose data ends first must serve the others' sync rounds before any
            epoch-end collective). ``False`` warns that it has no effect.
    """

    def __init__(self, every_epoch: bool = True) -> None:
        super().__init__()
        if not every_epoch:
            warnings.warn("FinalSyncCallback(every_epoch=False) has no effect: the collective "
                          "callbacks join at every epoch's end, so that ranks with different "
                          "numbers of batches meet before any epoch-end collective",
                          DeprecationWarning, stacklevel=2)
        self.every_epoch = True

    def _opt(self) -> DistributedLocalOptimizer:
        opt = find_local_optimizer(self.model.optimizer)
        if opt is None:
            raise ValueError("FinalSyncCallback needs a model compiled with a "
                             "DistributedLocalOptimizer")
        return opt

    def on_train_begin(self, logs=None):
        self._opt()
        super().on_train_begin(logs)

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        opt = self._opt()
        if not opt.built:
            return
        last = opt._hl_fns.get(_EPOCH_JOINED)
        if last is None or last[1] != _iterations(opt):  # steps since the last epoch's join
            _join(opt, None)


class LearningRateWarmupCallback(keras.callbacks.Callback):
    """Horovod's linear learning-rate warm-up: over the first ``warmup_epochs`` epochs (or
    ``warmup_steps`` batches), the lr rises from about ``initial_lr / size`` to ``initial_lr``::

        lr(b) = initial_lr / size * ((b + 1) * (size - 1) / N + 1),   b = 0 .. N - 1

    with ``b`` the batch index since training started and ``N`` the warm-up length in batches
    (``warmup_epochs * steps_per_epoch``), exactly Horovod's formula. The lr is set before each
    batch; after the warm-up it stays at ``initial_lr``. (Horovod's momentum correction is not
    applied.)

    Args:
        initial_lr: the lr after warm-up (e.g. ``base_lr * hvd.size()``).
        warmup_epochs: warm-up length in epochs (fractional epochs via steps_per_epoch).
        steps_per_epoch: batches per epoch; default: taken from ``model.fit``'s parameters.
        warmup_steps: warm-up length in batches instead of epochs.
        verbose: print the lr reached at the end of the warm-up on rank 0.
    """

    def __init__(self, initial_lr: float, warmup_epochs: float = 5,
                 steps_per_epoch: Optional[int] = None, warmup_steps: Optional[int] = None,
                 verbose: int = 0) -> None:
        super().__init__()
        self.initial_lr = float(initial_lr)
        self.warmup_epochs = warmup_epochs
        self.steps_per_epoch = steps_per_epoch
        self.warmup_steps = warmup_steps
        self.verbose = verbose
        self._batch = 0
        self._n = None

    def multiplier(self, b: int, n_batches: int, size: int) -> float:
        return 1.0 / size * ((b + 1) * (size - 1) / n_batches + 1.0)

    def on_train_begin(self, logs=None):
        if self.warmup_steps is not None:
            self._n = int(self.warmup_steps)
        else:
            spe = self.steps_per_epoch or (self.params or {}).get("steps")
            if not spe:
                raise ValueError("LearningRateWarmupCallback: pass steps_per_epoch (it could "
                                 "not be read from model.fit's parameters)")
            self._n = max(1, int(round(self.warmup_epochs * spe)))

    def on_train_batch_begin(self, batch, logs=None):
        if self._batch < self._n:
            size = _hvd().size()
            lr = self.initial_lr * self.multiplier(self._batch, self._n, size)
            self.model.optimizer.learning_rate = lr
            if self._batch == self._n - 1 and self.verbose and _hvd().rank() == 0:
                print(f"\nLearningRateWarmupCallback: warm-up done, lr = {lr:g}", file=sys.stdout)
        self._batch += 1


class SyncStatsLogger(keras.callbacks.Callback):
    """Adds the sync statistics to the epoch logs (``hl_syncs``, ``hl_period``,
    ``hl_bytes_sent``, ``hl_communication_ratio``, ``hl_sync_seconds``) and, with
    ``verbose=1``, prints them on rank 0 at the end of each epoch. Not collective (it may be
    given to some ranks only); list it after the collective callbacks so that, with an input
    of unknown length, its numbers include the epoch's join round."""

    def __init__(self, verbose: int = 1) -> None:
        super().__init__()
        self.verbose = verbose

    def on_epoch_end(self, epoch, logs=None):
        opt = find_local_optimizer(self.model.optimizer)
        if opt is None:
            return
        st = opt.sync_stats()
        values = {"hl_syncs": st.syncs, "hl_period": st.period, "hl_bytes_sent": st.bytes_sent,
                  "hl_communication_ratio": st.communication_ratio,
                  "hl_sync_seconds": st.sync_seconds}
        if logs is not None:
            logs.update(values)
        if self.verbose and _hvd().rank() == 0:
            ratio = st.communication_ratio
            print(f"[horovod_local] epoch {epoch + 1}: syncs={st.syncs} period={st.period:g} "
                  f"steps={st.steps} bytes_sent={st.bytes_sent} "
                  f"vs_allreduce_every_step={'%.3f' % ratio if not math.isnan(ratio) else 'n/a'} "
                  f"sync_seconds={st.sync_seconds:.3f}", file=sys.stdout, flush=True)
