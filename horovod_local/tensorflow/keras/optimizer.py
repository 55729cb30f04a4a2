"""``DistributedLocalOptimizer`` for Keras 3: local steps, and periodic fused parameter syncs
inside the compiled train step."""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional, Union

import keras
import tensorflow as tf
from keras import initializers
from keras.saving import deserialize_keras_object, serialize_keras_object

from horovod_local.core.config import SyncConfig, _compression_mode
from horovod_local.core.groups import local_process_set as _local_process_set
from horovod_local.core.ops import ParamSlot
from horovod_local.core.pipeline import RoundPipeline
from horovod_local.replicas import Entry, check_fingerprints
from horovod_local.schedules import PeriodSchedule
from horovod_local.stats import SyncStats
from horovod_local.tensorflow.collectives import allgather_object, variable_path
from horovod_local.tensorflow.graph_schedule import GraphSchedule, schedule_from_config, \
    schedule_to_config
from horovod_local.tensorflow.keras import _compat
from horovod_local.tensorflow.keras.adaalter import LocalAdaAlter
from horovod_local.tensorflow.ops import TensorSlot, TFOps

__all__ = ["DistributedLocalOptimizer", "OVERLAP_UNAVAILABLE"]

OVERLAP_UNAVAILABLE = (
    "overlap=True is not available in the Keras front end: Horovod's TensorFlow collectives "
    "(HorovodAllreduce / HorovodAllgather) are asynchronous kernels whose result is produced "
    "within the same graph execution (no handle, no separate wait op), so a round's sum cannot "
    "stay in flight from one compiled train step into the next; only a round run from Python "
    "on another thread, outside the train step, overlaps (docs/KERAS.md, 'Overlapped rounds: "
    "not available in Keras, because ...'). Use the PyTorch front end "
    "(horovod_local.torch.DistributedLocalOptimizer(..., overlap=True)), or compression='fp16' "
    "/ 'int8' to make the blocking rounds cheaper.")


def _dtype_name(dtype) -> str:
    return tf.as_dtype(dtype).name


def _data_dependencies(grads: list) -> list:
    """Tensors computed from the batch (the gradients; an ``IndexedSlices``' values)."""
    return [g.values if isinstance(g, tf.IndexedSlices) else g for g in grads if g is not None]


def _check_not_xla() -> None:
    """Horovod's collectives have no XLA kernels (Keras' jit_compile='auto' enables XLA on
    GPU machines): fail with the fix instead of an obscure XLA error."""
    if _compat.in_xla_context():
        raise RuntimeError("horovod_local: the train step is XLA-compiled, but Horovod's "
                           "collectives have no XLA kernels. Compile the model with "
                           "model.compile(..., jit_compile=False) (Keras' 'auto' enables XLA on "
                           "GPU machines), or call apply_gradients outside jit_compile=True "
                           "functions.")


class _VariableCounters:
    """The pipeline's counters (``SyncStats`` fields) over the optimizer's variables;
    ``local=True``: a two-level local round's (``syncs``, ``bytes_sent``, ``local_steps`` are
    the local rounds' own variables)."""

    _NAMES = {"local_steps": "_hl_local_steps", "syncs": "_hl_syncs",
              "bytes_sent": "_hl_bytes_sent", "sync_seconds": "_hl_sync_seconds",
              "last_deviation": "_hl_last_deviation", "skipped_rounds": "_hl_skipped"}
    # a local round counts in its own variables; its round numbers come from local_syncs
    _LOCAL_NAMES = {**_NAMES, "syncs": "_hl_local_syncs", "bytes_sent": "_hl_local_bytes_sent",
                    "local_steps": "_hl_local_round_steps"}

    def __init__(self, opt: "DistributedLocalOptimizer", local: bool = False) -> None:
        self._opt = opt
        self._names = self._LOCAL_NAMES if local else self._NAMES
        self.ops: Optional[TFOps] = None  # (a compressed round's writes wait for its checks)

    def _gated(self) -> list:
        return self.ops._gated() if self.ops is not None else []

    def _var(self, name: str):
        return getattr(self._opt, self._names[name])

    def get(self, name: str) -> tf.Tensor:
        v = self._var(name)
        if v is None:  # skipped_rounds exists under nonfinite='skip' only
            return tf.constant(0, tf.int64)
        return tf.convert_to_tensor(v)

    def add(self, name: str, value) -> None:
        v = self._var(name)
        with tf.control_dependencies(self._gated()):
            v.assign_add(tf.cast(value, v.dtype))

    def set(self, name: str, value) -> None:
        v = self._var(name)
        with tf.control_dependencies(self._gated()):
            v.assign(tf.cast(value, v.dtype))


class _GraphScheduleHook:
    """The pipeline's view of the schedule: its in-graph form (``GraphSchedule``)."""

    def __init__(self, opt: "DistributedLocalOptimizer") -> None:
        self._opt = opt
        self.needs_deviation = opt._hl_gs.needs_deviation

    def on_sync(self, *, step, lr, local_steps, deviation) -> None:
        opt = self._opt
        pipe = opt._hl_fns.get("pipeline")
        # (a compressed round's schedule update waits for its checks, as its other writes)
        with tf.control_dependencies(pipe.ops._gated() if pipe is not None else []):
            opt._hl_gs.on_sync(step=step, lr=lr, local_steps=local_steps, deviation=deviation)


@keras.saving.register_keras_serializable(package="horovod_local")
class DistributedLocalOptimizer(keras.optimizers.Optimizer):
    """Wrap a Keras 3 optimizer for local SGD: local steps, and a parameter average every
    ``period`` steps, inside the compiled train step.

    A replacement for Horovod's Keras ``DistributedOptimizer`` (which does not work on Keras 3):
    ``model.compile(optimizer=DistributedLocalOptimizer(keras.optimizers.SGD(0.1), period=8))``
    and ``model.fit(...)``; or ``optimizer.apply_gradients(...)`` in a custom loop. Each step
    runs the inner optimizer on this rank's gradients; after warm-up, every ``period`` local
    steps the parameters (and the state the algorithm needs) are averaged over the ranks in one
    allreduce per dtype, inside the same ``tf.function`` (``tf.cond`` on step counters kept in
    variables; no Python round trip per batch).

    Args:
        optimizer: the inner ``keras.optimizers.Optimizer`` (SGD, Adam, ...,
            :class:`LocalAdaAlter`). Its ``learning_rate`` is the wrapper's.
        period: local steps between syncs (int >= 1), ``math.inf`` for none (call
            :meth:`average_parameters` / use ``FinalSyncCallback``), or a schedule from
            :mod:`horovod_local`: ``Constant``, ``Increasing``, ``Adaptive`` (ADPSGD),
            ``TimeBudget``, ``Never``.
        warmup_steps: first steps that average gradients every step (exactly Horovod's
            ``DistributedOptimizer``), before local steps start.
        state_policy: what a sync does to the inner optimizer's slot variables of the
            parameters' shape (SGD momentum, Adam m and v, ...): ``'keep'``, ``'reset'``
            (zero them) or ``'average'`` (average them in the same buffer).
        algorithm: ``'local_sgd'`` (model averaging) or ``'slowmo'`` (slow momentum).
        slowmo_lr, slowmo_momentum: SlowMo's alpha and beta.
        outer_optimizer: a Keras optimizer applied at each sync to the pseudo-gradient
            ``x0 - x_avg`` of the anchors ``x0`` (DiLoCo:
            ``keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True)``), or a factory
            ``anchors -> optimizer`` (as in the PyTorch front end). Replaces ``algorithm``.
        process_set: a ``horovod.tensorflow`` process set (default: all ranks). Not saved by
            ``model.save``; a loaded model uses the global process set.
        nonfinite: what a sync (or warm-up gradient allreduce) does when some rank sends
            NaN/Inf: ``'raise'`` (default; ``tf.errors.InvalidArgumentError`` on every rank
            naming the step and the tensor, nothing written back) or ``'skip'`` (warn; every
            rank returns to the last good average, or skips the warm-up step; the round counts
            in ``sync_stats().skipped_rounds``; costs a copy of the parameters).
        local_period: two-level averaging (e.g. ``period=8, local_period=1``): the ranks of a
            host also average every ``local_period`` local steps, over the fast intra-host
            link; all ranks average on ``period``'s schedule (SlowMo / outer / AdaAlter state
            only there). Needs a step-based schedule (not ``TimeBudget``). Default None: flat.
            Saved by ``model.save``.
        local_process_set: the group of this rank for ``local_period`` (a
            ``horovod.tensorflow`` process set registered at ``hvd.init(process_sets=[...])``;
            the sets must partition the ranks). Default: one group per host, added as process
            sets at the first train step (or ``average_parameters()`` / ``join()`` / the
            broadcast callback, whichever comes first), which needs
            ``hvd.init(process_sets="dynamic")``. Not saved by ``model.save`` (a loaded model
            groups by host).
        compression: compressed syncs (docs/SEMANTICS.md, "Compressed syncs"): ``'fp16'``
            (or ``hvd.Compression.fp16``; a float16 allreduce) or ``'int8'`` (blocks of 256
            with a scale each; an allgather): each rank sends its change since the last common
            point ``c`` (kept in the anchors), with error feedback (a residual per variable,
            saved with the optimizer). Default None (``hvd.Compression.none``): the parameters
            travel in their own dtype. Not with ``state_policy='average'``, LocalAdaAlter or
            ``nonfinite='skip'``. With ``local_period``, only global rounds are compressed.
            Saved by ``model.save``.
        overlap: not available in Keras (``ValueError``): Horovod's TensorFlow ops cannot keep
            a collective in flight across compiled train steps (docs/KERAS.md, "Overlapped
            rounds"); use the PyTorch front end for ``overlap=True``.
        name: the optimizer's name.

    Before the first step (or ``average_parameters()`` / ``join()`` / the broadcast callback) the
    ranks compare their variables (paths, shapes, dtypes) and sync configuration in one small
    allgather, and all raise ``ValueError`` naming the first difference.

    Example::

        import horovod.tensorflow as hvd, keras
        from horovod_local.tensorflow import keras as hlk
        hvd.init()
        opt = hlk.DistributedLocalOptimizer(keras.optimizers.SGD(0.05, momentum=0.9),
                                            period=8, warmup_steps=100)
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, callbacks=[hlk.BroadcastGlobalVariablesCallback(0),
                                   hlk.FinalSyncCallback()])
    """

    def __init__(self, optimizer, period: Union[int, float, PeriodSchedule, None] = 8,
                 warmup_steps: int = 0, state_policy: str = "keep",
                 algorithm: str = "local_sgd", slowmo_lr: float = 1.0,
                 slowmo_momentum: float = 0.5, outer_optimizer: Any = None,
                 process_set: Any = None, nonfinite: str = "raise",
                 local_period: Optional[int] = None, local_process_set: Any = None,
                 compression: Any = None, overlap: bool = False,
                 name: Optional[str] = None, **kwargs) -> None:
        if kwargs:
            raise ValueError(f"DistributedLocalOptimizer does not take {sorted(kwargs)}; set "
                             f"such options on the inner optimizer")
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"optimizer must be a keras.optimizers.Optimizer (Keras 3), got "
                            f"{type(optimizer).__name__}")
        _compat.verify()  # the Keras private APIs this wrapper uses are still there
        if isinstance(optimizer, DistributedLocalOptimizer):
            raise ValueError("optimizer is already a DistributedLocalOptimizer")
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError("a LossScaleOptimizer cannot be wrapped: its per-rank skipped steps "
                             "would desynchronise the ranks' step counters")
        if optimizer.gradient_accumulation_steps:
            raise ValueError("inner optimizers with gradient_accumulation_steps are not "
                             "supported (the step counters would count micro-steps)")
        if outer_optimizer is not None and not (
                isinstance(outer_optimizer, keras.optimizers.Optimizer) or callable(outer_optimizer)):
            raise ValueError("outer_optimizer must be a keras optimizer or a callable "
                             "anchors -> keras optimizer")
        if overlap is not False:
            raise ValueError(OVERLAP_UNAVAILABLE)
        config = SyncConfig.from_arguments(period, warmup_steps, state_policy, algorithm,
                                           slowmo_lr, slowmo_momentum, outer=outer_optimizer,
                                           nonfinite=nonfinite,
                                           adaalter=isinstance(optimizer, LocalAdaAlter),
                                           local_period=local_period,
                                           compression=_compression_mode(compression))
        if local_process_set is not None and local_period is None:
            raise ValueError("local_process_set is only used with local_period (two-level "
                             "averaging); pass local_period too, or drop it")

        super().__init__(learning_rate=0.0, name=name or f"distributed_local_{optimizer.name}")
        self.inner_optimizer = optimizer
        self._hl_schedule = config.schedule
        self._hl_gs = GraphSchedule(config.schedule)
        self._hl_outer_arg = outer_optimizer
        self._hl_outer = outer_optimizer if isinstance(outer_optimizer,
                                                       keras.optimizers.Optimizer) else None
        self._hl_process_set_arg = process_set
        if config.adaalter:
            optimizer._auto_refresh = False  # refreshed at our syncs / warm-up steps
        # tf.functions and the process set, kept out of Keras/TF tracking
        object.__setattr__(self, "_hl_fns", {})
        object.__setattr__(self, "_hl_config", config)
        object.__setattr__(self, "_hl_local_given", local_process_set)

    @property
    def _hl_warmup_steps(self) -> int:
        return self._hl_config.warmup_steps

    # ---- delegation to the inner optimizer -------------------------------------------------
    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        self.inner_optimizer.learning_rate = value

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def __getattr__(self, name):
        # hyper-parameters of the inner optimizer (momentum, beta_1, ...); only reached when
        # normal lookup fails
        if name.startswith("_") or name == "inner_optimizer":
            raise AttributeError(name)
        inner = self.__dict__.get("inner_optimizer")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    # ---- variables ------------------------------------------------------------------------
    @property
    def variables(self):
        out = _compat.own_variables(self) + self.inner_optimizer.variables
        if self._hl_outer is not None:
            out += self._hl_outer.variables
        return out

    def _hl_saved_variables(self) -> list:
        skip = {id(v) for v in self._hl_unsaved()}
        return [v for v in self.variables if id(v) not in skip]

    def _hl_unsaved(self) -> list:
        rs = getattr(self, "_hl_round_start", None)
        return [rs] if rs is not None else []

    def save_own_variables(self, store):
        for i, v in enumerate(self._hl_saved_variables()):
            store[str(i)] = v.numpy()

    def load_own_variables(self, store):
        vs = self._hl_saved_variables()
        if len(store.keys()) != len(vs):
            warnings.warn(f"Skipping variable loading for optimizer '{self.name}': it has "
                          f"{len(vs)} variables, the saved one {len(store.keys())}", stacklevel=2)
            return
        for i, v in enumerate(vs):
            v.assign(store[str(i)])

    def _hl_var(self, name, dtype, value, shape=()):
        return self.add_variable(shape=shape, dtype=dtype,
                                 initializer=initializers.Constant(value), name=name)

    def build(self, var_list):
        if self.built:
            return
        var_list = list(var_list)
        if keras.config.dtype_policy().name == "mixed_float16":
            warnings.warn("horovod_local: with the mixed_float16 policy Keras wraps the optimizer "
                          "in a LossScaleOptimizer, which skips steps per rank on non-finite "
                          "gradients and so desynchronises the ranks' step counters (a hang or "
                          "an error at the next sync). Use mixed_bfloat16 or float32.",
                          stacklevel=2)
        if not self.inner_optimizer.built:
            self.inner_optimizer.build(var_list)
        super().build(var_list)
        with keras.name_scope(self.name, caller=self):
            self._hl_local_steps = self._hl_var("hl_local_steps", "int64", 0)
            self._hl_syncs = self._hl_var("hl_syncs", "int64", 0)
            self._hl_warmup_done = self._hl_var("hl_warmup_steps_done", "int64", 0)
            self._hl_bytes_sent = self._hl_var("hl_bytes_sent", "int64", 0)
            self._hl_bytes_per_step = self._hl_var("hl_bytes_per_step_allreduce", "int64", 0)
            self._hl_sync_seconds = self._hl_var("hl_sync_seconds", "float64", 0.0)
            self._hl_last_deviation = self._hl_var("hl_last_deviation", "float64", math.nan)
            # two-level averaging only (a flat optimizer keeps its saved variables' layout)
            self._hl_local_syncs = self._hl_local_bytes_sent = None
            self._hl_local_round_steps = None
            if self._hl_config.local_period is not None:
                self._hl_local_syncs = self._hl_var("hl_local_syncs", "int64", 0)
                self._hl_local_bytes_sent = self._hl_var("hl_local_bytes_sent", "int64", 0)
                self._hl_local_round_steps = self._hl_var("hl_local_round_steps", "int64", 0)
            self._hl_gs.build(lambda nm, dt, val: self._hl_var(nm, dt, val))
            anchors = momenta = None
            self._hl_anchors_set = None
            if self._hl_config.needs_anchors:
                self._hl_anchors_set = self._hl_var("hl_anchors_set", "int64", 0)
                anchors = []
                for v in var_list:
                    dt = "float64" if _dtype_name(v.dtype) == "float64" else "float32"
                    anchors.append(self._hl_var(f"{self._hl_path(v)}_hl_anchor", dt, 0.0,
                                                shape=v.shape))
                if self._hl_config.algorithm == "slowmo":
                    momenta = [self._hl_var(f"{self._hl_path(v)}_hl_slow_momentum",
                                            _dtype_name(a.dtype), 0.0, shape=a.shape)
                               for v, a in zip(var_list, anchors)]
            self._hl_anchors = anchors
            self._hl_momenta = momenta
            # compression: each rank's error-feedback residual e (acc dtype, zeros at first)
            self._hl_residuals = None
            if self._hl_config.compression is not None:
                self._hl_residuals = [
                    self._hl_var(f"{self._hl_path(v)}_hl_residual", _dtype_name(a.dtype), 0.0,
                                 shape=a.shape) for v, a in zip(var_list, anchors)]
            # nonfinite='skip': the last good average (parameters after the last sync, or at
            # the first local step) to return to when a round is dropped
            self._hl_last_good = self._hl_good_set = self._hl_skipped = None
            if self._hl_config.nonfinite == "skip":
                self._hl_skipped = self._hl_var("hl_skipped_rounds", "int64", 0)
                self._hl_good_set = self._hl_var("hl_last_good_set", "int64", 0)
                self._hl_last_good = [
                    self._hl_var(f"{self._hl_path(v)}_hl_last_good", _dtype_name(v.dtype), 0.0,
                                 shape=v.shape) for v in var_list]
            # not saved: the wall-clock start of the current round (TimeBudget)
            self._hl_round_start = self._hl_var("hl_round_start", "float64", -1.0)
        if self._hl_config.has_outer:
            if self._hl_outer is None:
                outer = self._hl_outer_arg(list(anchors))
                if not isinstance(outer, keras.optimizers.Optimizer):
                    raise TypeError(f"outer_optimizer must return a keras optimizer over the "
                                    f"anchors it is given, got {type(outer).__name__}")
                self._hl_outer = outer
            self._hl_outer.build(list(anchors))
        # not an attribute Keras tracks: these are the inner optimizer's variables
        object.__setattr__(self, "_hl_slots_of",
                           _compat.slot_variables(self.inner_optimizer, var_list))

    @staticmethod
    def _hl_path(v) -> str:
        return (v.path if hasattr(v, "path") else v.name).replace("/", "_").replace(":", "_")

    # ---- Horovod ---------------------------------------------------------------------------
    def _hl_ps(self):
        ps = self._hl_fns.get("process_set")
        if ps is None:
            import horovod.tensorflow as hvd

            if not hvd.is_initialized():
                raise RuntimeError("horovod_local: call horovod.tensorflow.init() before "
                                   "training with DistributedLocalOptimizer")
            ps = self._hl_process_set_arg if self._hl_process_set_arg is not None \
                else hvd.global_process_set
            if not ps.included():
                raise ValueError(f"process_set: this rank ({hvd.rank()}) is not a member of {ps!r}")
            self._hl_fns["process_set"] = ps
        return ps

    def _hl_size(self) -> int:
        return self._hl_ps().size()

    def _hl_fn(self, key: str, fn: Callable):
        f = self._hl_fns.get(key)
        if f is None:
            f = tf.function(fn, autograph=False)
            self._hl_fns[key] = f
        return f

    # ---- replicas must match ---------------------------------------------------------------
    def _hl_fingerprint(self) -> list[Entry]:
        """What every rank must agree on: the synced variables and the sync configuration."""
        outer_desc: Any = None
        arg = self._hl_outer_arg
        if isinstance(arg, keras.optimizers.Optimizer):
            # its hyper-parameters move the shared anchors: compare them (a user-made optimizer
            # was created eagerly, so its config, lr variable included, is readable here)
            outer_desc = (type(arg).__name__,
                          {k: v for k, v in arg.get_config().items() if k != "name"})
        elif arg is not None:
            # a factory's optimizer may have been created while the train step was traced: its
            # lr variable is not initialised before the step runs, so compare the class only
            outer_desc = ("factory " + getattr(arg, "__qualname__", type(arg).__name__),
                          type(self._hl_outer).__name__)
        return self._hl_config.fingerprint(
            type(self.inner_optimizer).__name__, outer_desc, "variable",
            [(variable_path(v), tuple(int(d) for d in v.shape), _dtype_name(v.dtype))
             for v in _compat.trainable_variables(self)])

    def _hl_check_replicas(self) -> None:
        """Fail on every rank, naming the first difference, if ranks were built differently
        (instead of a hang, a shape error or a silent average of unrelated tensors at the first
        sync). Once per optimizer, eagerly (lifted out of a trace with ``tf.init_scope``).

        Not in ``build``: Keras also builds the optimizer in ``load_model`` and
        ``compile_from_config``, which a single rank may call (e.g. to evaluate), and a
        collective there would hang. The first step, ``average_parameters()``, ``join()`` and the
        broadcast callback are points every rank reaches together."""
        if self._hl_fns.get("replicas_checked"):
            return
        ps = self._hl_ps()
        if ps.size() > 1:
            with tf.init_scope():
                everyone = allgather_object(self._hl_fingerprint(),
                                               "horovod_local.fingerprint", ps)
            check_fingerprints(everyone, hint=(
                "Every rank must build the same model (same variable paths, shapes, dtypes, "
                "order) and the same DistributedLocalOptimizer arguments."))
        if self._hl_config.local_period is not None:
            self._hl_build_groups()
        self._hl_fns["replicas_checked"] = True

    def _hl_build_groups(self) -> None:
        """Two-level averaging: this rank's group's process set (given, checked to partition
        the ranks; or one per host, added with ``hvd.add_process_set``) and the local rounds'
        pipeline over it. Collective over the process set, eager (lifted out of a trace), at
        the same point as the replica check: before the first graph use."""
        if "local_pipeline" in self._hl_fns:
            return
        import horovod.tensorflow as hvd

        ps = self._hl_ps()
        with tf.init_scope():
            local_ps, groups = _local_process_set(
                hvd, ps, self._hl_local_given,
                lambda obj: allgather_object(obj, "horovod_local.groups", ps))
        self._hl_fns["local_process_set"] = local_ps
        self._hl_fns["groups"] = groups
        self._hl_fns["local_pipeline"] = RoundPipeline.for_groups(
            self._hl_config, TFOps(local_ps), _VariableCounters(self, local=True))

    def _hl_local_pipeline(self) -> RoundPipeline:
        if "local_pipeline" not in self._hl_fns:
            self._hl_build_groups()
        return self._hl_fns["local_pipeline"]

    @property
    def groups(self) -> Optional[list]:
        """Two-level averaging: the groups of ranks (lists of ranks, in order of their lowest
        rank), once known (the first train step); None for a flat optimizer or before."""
        return self._hl_fns.get("groups")

    # ---- the step --------------------------------------------------------------------------
    def _hl_current_lr(self) -> tf.Tensor:
        lr = self.inner_optimizer.learning_rate
        return tf.identity(tf.convert_to_tensor(lr))

    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        if len(grads) == 0:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError("When passing `grads` without `variables`, the optimizer must "
                                 "already be built on a list of variables.")
            trainable_variables = _compat.trainable_variables(self)
        else:
            trainable_variables = list(trainable_variables)
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(trainable_variables)
                self.built = True
            _compat.check_variables_known(self, trainable_variables)
        self._hl_check_replicas()
        _check_not_xla()
        with keras.name_scope(self.name, caller=self):
            self._hl_apply(grads, trainable_variables)

    def _hl_apply(self, grads: list, tvars: list) -> None:
        """The train step, as a pipeline of small in-graph steps (each a ``tf.cond`` on the
        step counters): warm-up gradient round, round start, inner step, counters, sync."""
        lr = self._hl_current_lr()  # the lr this step uses (read before the inner step)
        step = tf.convert_to_tensor(_compat.iterations(self))
        W = self._hl_warmup_steps
        in_warmup = step < W if W > 0 else None  # None: no warm-up, every step is local
        grads, take_step = self._hl_maybe_average_gradients(grads, tvars, step, in_warmup)
        # Everything below waits for this batch's gradients. At the end of an input of unknown
        # length Keras calls the train step once more on the exhausted iterator; the call fails
        # at the batch, but ops that do not depend on it could still run: the counters would
        # count a step that was not taken (Keras' own optimizers do), moving this rank's
        # schedule and warm-up end.
        with tf.control_dependencies(_data_dependencies(grads)):
            self._hl_maybe_start_round(in_warmup)
            self._hl_inner_step(grads, tvars, take_step)
            self._hl_count_step(in_warmup)
            self._hl_maybe_sync(in_warmup, lr)

    @staticmethod
    def _hl_when(pred: tf.Tensor, in_warmup, fn: Callable, default) -> None:
        """``fn()`` if ``pred`` and this is a local (not a warm-up) step."""
        if in_warmup is not None:
            pred = tf.logical_and(pred, tf.logical_not(in_warmup))
        tf.cond(pred, fn, lambda: default)

    def _hl_maybe_average_gradients(self, grads: list, tvars: list, step, in_warmup):
        """Warm-up steps: the gradients averaged over the ranks; and, under
        ``nonfinite='skip'``, whether the step may be taken (None: always)."""
        if in_warmup is None:
            return grads, None
        skip = self._hl_config.nonfinite == "skip"
        idx = tuple(i for i, g in enumerate(grads) if g is not None)
        dense = [tf.convert_to_tensor(grads[i]) for i in idx]
        order = tuple(_compat.variable_index(self, tvars[i]) for i in idx)
        avg_fn = self._hl_fn("grads", self._hl_average_gradients)
        # in skip mode the averaged list ends with the round's "all finite" flag
        new = tf.cond(in_warmup, lambda: avg_fn(dense, step, order),
                      lambda: list(dense) + ([tf.constant(True)] if skip else []))
        take_step = None
        if skip:
            new, take_step = new[:-1], new[-1]
        grads = list(grads)
        for i, g in zip(idx, new):
            grads[i] = g
        return grads, take_step

    def _hl_maybe_start_round(self, in_warmup) -> None:
        """At the first local step: the last good copy, the anchors x0, the round clock."""
        zero = tf.constant(0, tf.int64)
        if self._hl_last_good is not None:
            self._hl_when(self._hl_good_set < 1, in_warmup, self._hl_remember_good, zero)
        if self._hl_anchors is not None:
            self._hl_when(self._hl_anchors_set < 1, in_warmup, self._hl_init_anchors, zero)
        if self._hl_gs.uses_clock:
            self._hl_when(self._hl_round_start < 0, in_warmup, self._hl_start_round,
                          tf.constant(0.0, tf.float64))

    def _hl_inner_step(self, grads: list, tvars: list, take_step) -> None:
        if take_step is None:
            self.inner_optimizer.apply(grads, tvars)
            return

        def inner_step():  # a dropped warm-up round: no rank takes this step (as in PyTorch)
            self.inner_optimizer.apply(grads, tvars)
            return tf.constant(0, tf.int64)

        tf.cond(take_step, inner_step, lambda: tf.constant(0, tf.int64))

    def _hl_count_step(self, in_warmup) -> None:
        _compat.iterations(self).assign_add(1)
        self._hl_bytes_per_step.assign_add(self._hl_param_bytes())
        two_level = self._hl_local_round_steps is not None
        if in_warmup is None:
            self._hl_local_steps.assign_add(1)
            if two_level:
                self._hl_local_round_steps.assign_add(1)
            return
        local_inc = tf.where(in_warmup, tf.constant(0, tf.int64), tf.constant(1, tf.int64))
        self._hl_warmup_done.assign_add(1 - local_inc)
        self._hl_local_steps.assign_add(local_inc)
        if two_level:
            self._hl_local_round_steps.assign_add(local_inc)
        if self._hl_config.adaalter:  # replicas are identical: the local refresh is the sync
            tf.cond(in_warmup, self.inner_optimizer.refresh_denominators,
                    lambda: tf.constant(0.0, tf.float64))

    def _hl_maybe_sync(self, in_warmup, lr) -> None:
        if self._hl_config.local_period is not None:
            self._hl_maybe_two_level_sync(in_warmup, lr)
            return
        gs = self._hl_gs
        if not gs.can_sync:  # Never: no sync op in the train step at all
            return
        since = tf.timestamp() - self._hl_round_start if gs.uses_clock \
            else tf.constant(0.0, tf.float64)
        should = gs.should_sync(tf.convert_to_tensor(self._hl_local_steps), since)
        sync_fn = self._hl_fn("sync", self._hl_sync_round)
        self._hl_when(should, in_warmup, lambda: sync_fn(tf.constant(0.0, tf.float64), lr),
                      tf.constant(0.0, tf.float64))

    def _hl_maybe_two_level_sync(self, in_warmup, lr) -> None:
        """Two-level averaging (SEMANTICS.md): after a local step, a local round if the
        schedule says so (``due``) or ``local_period`` local steps have passed since the last
        round of either level; then a global round iff some rank of the group wanted one (the
        summed wants-global element: the same decision on every rank of the group)."""
        gs = self._hl_gs
        zero = tf.constant(0.0, tf.float64)
        if gs.can_sync:  # (TimeBudget is refused with local_period: no clock here)
            due = gs.should_sync(tf.convert_to_tensor(self._hl_local_steps),
                                 tf.constant(0.0, tf.float64))
        else:  # Never: local rounds only
            due = tf.constant(False)
        local_due = self._hl_local_round_steps >= self._hl_config.local_period
        local_fn = self._hl_fn("local", self._hl_local_round)
        sync_fn = self._hl_fn("sync", self._hl_sync_round)

        def rounds():
            _, wants = local_fn(zero, tf.cast(due, tf.float64), lr)
            return tf.cond(wants > 0.5, lambda: sync_fn(zero, lr), lambda: zero)

        self._hl_when(tf.logical_or(due, local_due), in_warmup, rounds, zero)

    def _hl_param_bytes(self) -> int:
        return sum(int(math.prod(v.shape)) * tf.as_dtype(v.dtype).size
                   for v in _compat.trainable_variables(self))

    def _hl_average_gradients(self, grads: list, step, order: tuple) -> list:
        """Warm-up: the gradients averaged over the ranks (the core's gradient round); in
        ``nonfinite='skip'`` mode followed by the round's "take the step" flag."""
        tvars = _compat.trainable_variables(self)
        slots = [ParamSlot("gradient of " + variable_path(tvars[order[k]]),
                           TensorSlot(tf.convert_to_tensor(g))) for k, g in enumerate(grads)]
        ok = self._hl_pipeline().gradient_round(slots, step + 1)
        out = [s.value.value() for s in slots]
        return out + [ok] if self._hl_config.nonfinite == "skip" else out

    def _hl_remember_good(self) -> tf.Tensor:
        for v, g in zip(_compat.trainable_variables(self), self._hl_last_good):
            g.assign(tf.convert_to_tensor(v))
        self._hl_good_set.assign(1)
        return tf.constant(0, tf.int64)

    def _hl_start_round(self):
        self._hl_round_start.assign(tf.timestamp())
        return tf.constant(0.0, tf.float64)

    def _hl_init_anchors(self):
        """x0 = the parameters, at the first local step (before it is taken)."""
        for v, a in zip(_compat.trainable_variables(self), self._hl_anchors):
            a.assign(tf.cast(tf.convert_to_tensor(v), a.dtype))
        self._hl_anchors_set.assign(1)
        return tf.constant(0, tf.int64)

    def _hl_check_same_start(self):
        """At the first global round: the anchors (x0, or compression's common point c) were
        taken from each rank's own variables, so they must be equal on every rank, or SlowMo /
        the outer optimizer / compression would keep different models silently. Not at the
        first local step: a lazily built model is broadcast after the first batch (the
        broadcast callback, as Horovod's), and the broadcast covers the anchors. One small
        allgather of two integer checksums of the anchors' bits (integer sums do not depend on
        the reduction order, so equal anchors give equal sums on any device); then
        ``hl_anchors_set = 2``."""
        import horovod.tensorflow as hvd

        s1 = s2 = tf.constant(0, tf.int64)
        for a in self._hl_anchors:
            bits = tf.cast(tf.reshape(tf.bitcast(tf.convert_to_tensor(a), tf.int32), [-1]),
                           tf.int64)
            s1 += tf.reduce_sum(bits)
            s2 += tf.reduce_sum(tf.bitwise.bitwise_and(bits, 0xFFFF)
                                * tf.bitwise.right_shift(bits, 16))
        everyone = hvd.allgather(tf.stack([s1, s2])[None], name="horovod_local.same_start",
                                 process_set=self._hl_ps(), ignore_name_scope=True)
        same = tf.reduce_all(tf.equal(everyone, everyone[:1]), axis=1)
        differ = tf.strings.reduce_join(
            tf.strings.as_string(tf.where(tf.logical_not(same))[:, 0]), separator=", ")
        message = tf.strings.join([
            "horovod_local: the variables differ between ranks at the first sync round "
            "(rank(s) [", differ, "] vs the first), but ", self._hl_config.anchors_role,
            " starts from them on every "
            "rank. Broadcast them before training: hlk.BroadcastGlobalVariablesCallback(0) "
            "first in model.fit's callbacks, or hvd.broadcast_variables(model.variables, "
            "root_rank=0)"])
        with tf.control_dependencies([tf.debugging.Assert(tf.reduce_all(same), [message])]):
            self._hl_anchors_set.assign(2)
        return tf.constant(0, tf.int64)

    # ---- the sync round --------------------------------------------------------------------
    def _hl_pipeline(self) -> RoundPipeline:
        pipe = self._hl_fns.get("pipeline")
        if pipe is None:
            cfg = self._hl_config
            ops, counters = TFOps(self._hl_ps()), _VariableCounters(self)
            counters.ops = ops
            pipe = RoundPipeline(
                cfg, ops, counters,
                outer_step=lambda anchors, grads: self._hl_outer.apply(
                    [g.value() for g in grads], anchors),
                reset_adaalter=self.inner_optimizer.reset_local_steps if cfg.adaalter else None)
            self._hl_fns["pipeline"] = pipe
        return pipe

    def _hl_slots(self, lr: tf.Tensor) -> list[ParamSlot]:
        """Every trainable variable with what is kept for it, for one round."""
        pairs = self.inner_optimizer.accumulator_pairs() if self._hl_config.adaalter else None
        slots = []
        for i, v in enumerate(_compat.trainable_variables(self)):
            anchor = self._hl_anchors[i] if self._hl_anchors is not None else None
            states = self._hl_slots_of[i] if self._hl_slots_of else []
            slots.append(ParamSlot(
                name=variable_path(v), value=v, lr=lr, anchor=anchor,
                momentum=self._hl_momenta[i] if self._hl_momenta is not None else None,
                pseudo_grad=TensorSlot.like(anchor) if anchor is not None else None,
                states=states, state_names=[variable_path(x) for x in states],
                accumulator=pairs[i][0] if pairs else None,
                denominator=pairs[i][1] if pairs else None,
                last_good=self._hl_last_good[i] if self._hl_last_good is not None else None,
                residual=self._hl_residuals[i] if self._hl_residuals is not None else None))
        return slots

    def _hl_sync_round(self, joined: tf.Tensor, lr: tf.Tensor, explicit: bool = False
                       ) -> tf.Tensor:
        """One round (all ranks enter it once); returns how many ranks have joined.
        ``explicit``: an ``average_parameters()`` round (every rank that has not joined must be
        in one: a rank calling it alone fails on every rank instead of meeting a scheduled
        round)."""
        checked = []
        if self._hl_anchors is not None:
            tf.cond(self._hl_anchors_set < 1, self._hl_init_anchors,
                    lambda: tf.constant(0, tf.int64))
            if self._hl_size() > 1:  # (the round waits for it: no collective after a failure)
                checked.append(tf.cond(self._hl_anchors_set < 2, self._hl_check_same_start,
                                       lambda: tf.constant(0, tf.int64)))
        if self._hl_last_good is not None:  # average_parameters() before any local step
            tf.cond(self._hl_good_set < 1, self._hl_remember_good,
                    lambda: tf.constant(0, tf.int64))
        pipe = self._hl_pipeline()
        with tf.control_dependencies(checked):
            result = (pipe.compressed_round if self._hl_config.compression
                      else pipe.sync_round)(
                self._hl_slots(lr), joined=joined,
                step=tf.convert_to_tensor(_compat.iterations(self)), lr=lr,
                schedule=_GraphScheduleHook(self), explicit=explicit)
        self._hl_round_start.assign(tf.timestamp())
        if self._hl_local_round_steps is not None:  # a global round is a round of either level
            self._hl_local_round_steps.assign(0)
        return result.joined

    def _hl_local_round(self, joined: tf.Tensor, wants_global: tf.Tensor, lr: tf.Tensor
                        ) -> tuple[tf.Tensor, tf.Tensor]:
        """Two-level averaging: one local round over this rank's group; returns the group's
        summed control elements (how many of its ranks have joined, how many want a global
        round next)."""
        if self._hl_anchors is not None:
            tf.cond(self._hl_anchors_set < 1, self._hl_init_anchors,
                    lambda: tf.constant(0, tf.int64))
        if self._hl_last_good is not None:
            tf.cond(self._hl_good_set < 1, self._hl_remember_good,
                    lambda: tf.constant(0, tf.int64))
        result = self._hl_local_pipeline().local_round(
            self._hl_slots(lr), joined=joined, wants_global=wants_global,
            step=tf.convert_to_tensor(_compat.iterations(self)))
        return result.joined, result.wants_global

    # ---- public API ------------------------------------------------------------------------
    def _hl_require_built(self, what: str) -> None:
        if not self.built:
            raise RuntimeError(f"horovod_local: {what}() before the optimizer was built (call "
                               f"optimizer.build(model.trainable_variables) or train first)")

    def average_parameters(self) -> None:
        """Average the model (and synced state) over the ranks now: one sync round. Collective:
        every rank of the process set calls it (ranks that have joined serve it); a rank calling
        it while another is in a scheduled round fails on every rank
        (``tf.errors.InvalidArgumentError`` naming it). Used with ``period=math.inf`` and at the
        end of training. Callable eagerly or inside a ``tf.function``. With ``local_period``:
        one flat global round (no local round before it)."""
        self._hl_require_built("average_parameters")
        self._hl_check_replicas()
        if tf.executing_eagerly() and \
                int(_compat.iterations(self).numpy()) < self._hl_warmup_steps:
            raise RuntimeError("horovod_local: average_parameters() during warm-up; replicas are "
                               "already identical while gradients are allreduced every step")
        fn = self._hl_fn("sync_explicit",
                         lambda joined, lr: self._hl_sync_round(joined, lr, explicit=True))
        fn(tf.constant(0.0, tf.float64), self._hl_current_lr())

    def synchronize(self) -> None:
        """Deprecated alias of :meth:`average_parameters` (warns, then averages). The PyTorch
        front end's ``synchronize()`` has Horovod's meaning (finish the gradient allreduces), so
        the parameter average has its own name in both front ends."""
        warnings.warn("DistributedLocalOptimizer.synchronize() is deprecated: call "
                      "average_parameters() (the same parameter average). synchronize() has "
                      "Horovod's meaning in the PyTorch front end.", DeprecationWarning,
                      stacklevel=2)
        self.average_parameters()

    def join(self) -> None:
        """This rank has no more data: keep serving the other ranks' sync rounds until every
        rank has joined; then all ranks hold the same averaged model. Collective over the epoch
        (every rank calls it once its data ends). Eager only. In ``model.fit`` this package's
        callbacks call it at every epoch's end (see ``FinalSyncCallback``); in a custom loop,
        call it when this rank's data ends, before any other collective. With
        ``local_period``: the two-level join (docs/SEMANTICS.md): the rank follows its group's
        local rounds, and the global rounds they call for, until its whole group has joined,
        then global rounds only."""
        self._hl_require_built("join")
        if not tf.executing_eagerly():
            raise RuntimeError("horovod_local: join() loops in Python; call it eagerly")
        self._hl_check_replicas()
        n = self._hl_size()
        fn = self._hl_fn("sync", self._hl_sync_round)
        one = tf.constant(1.0, tf.float64)
        if self._hl_config.local_period is None:
            while True:
                joined = fn(one, self._hl_current_lr())
                if int(round(float(joined))) >= n:
                    break
            return
        # two levels: follow the group's local rounds (and the global rounds they call for)
        # until the whole group has joined, then global rounds only (SEMANTICS.md)
        local_fn = self._hl_fn("local", self._hl_local_round)
        m = self._hl_fns["local_process_set"].size()
        group_joined = False
        while True:
            if not group_joined:
                joined, wants = local_fn(one, tf.constant(0.0, tf.float64),
                                         self._hl_current_lr())
                group_joined = int(round(float(joined))) >= m
                if float(wants) < 0.5 and not group_joined:
                    continue
            if int(round(float(fn(one, self._hl_current_lr())))) >= n:
                return

    def sync_stats(self) -> SyncStats:
        """This rank's sync statistics (syncs, period, bytes, time in sync), read from the
        optimizer's variables."""
        if not self.built:
            return SyncStats(period=self._hl_schedule.period)
        return SyncStats(
            steps=int(_compat.iterations(self).numpy()),
            warmup_steps_done=int(self._hl_warmup_done.numpy()),
            syncs=int(self._hl_syncs.numpy()),
            period=float(self._hl_gs.period.numpy()),
            local_steps=int(self._hl_local_steps.numpy()),
            bytes_sent=int(self._hl_bytes_sent.numpy()),
            bytes_per_step_allreduce=int(self._hl_bytes_per_step.numpy()),
            sync_seconds=float(self._hl_sync_seconds.numpy()),
            last_deviation=float(self._hl_last_deviation.numpy()),
            skipped_rounds=0 if self._hl_skipped is None else int(self._hl_skipped.numpy()),
            local_syncs=self._hl_read_int(self._hl_local_syncs),
            local_bytes_sent=self._hl_read_int(self._hl_local_bytes_sent),
            local_round_steps=self._hl_read_int(self._hl_local_round_steps))

    @staticmethod
    def _hl_read_int(v) -> int:
        return 0 if v is None else int(v.numpy())

    @property
    def schedule(self) -> PeriodSchedule:
        """The period schedule, with its state (rounds, ADPSGD's period / C2 / samples) read
        from the optimizer's variables."""
        if not self.built:
            return self._hl_schedule
        return self._hl_gs.refresh_python()

    @property
    def outer_optimizer(self):
        """The outer optimizer (built at the first ``build``), or None."""
        return self._hl_outer

    @property
    def anchors(self):
        """SlowMo / outer-optimizer anchors x0, or compression's common point c (one variable
        per trainable variable), or None."""
        return self._hl_anchors

    @property
    def residuals(self):
        """Compression: this rank's error-feedback residuals e (one variable per trainable
        variable, saved with the optimizer), or None."""
        return getattr(self, "_hl_residuals", None)

    # ---- serialisation ---------------------------------------------------------------------
    def get_config(self):
        outer = None
        if self._hl_outer is not None:
            outer = serialize_keras_object(self._hl_outer)
        elif self._hl_outer_arg is not None:
            outer = serialize_keras_object(self._hl_outer_arg)  # a registered factory
        return {
            "name": self.name,
            "optimizer": serialize_keras_object(self.inner_optimizer),
            "period": schedule_to_config(self._hl_schedule),
            "warmup_steps": self._hl_warmup_steps,
            "state_policy": self._hl_config.state_policy,
            "algorithm": self._hl_config.algorithm,
            "slowmo_lr": self._hl_config.slowmo_lr,
            "slowmo_momentum": self._hl_config.slowmo_momentum,
            "outer_optimizer": outer,
            "nonfinite": self._hl_config.nonfinite,
            "local_period": self._hl_config.local_period,
            "compression": self._hl_config.compression,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["optimizer"] = deserialize_keras_object(config["optimizer"],
                                                       custom_objects=custom_objects)
        config["period"] = schedule_from_config(config["period"])
        if config.get("outer_optimizer") is not None:
            config["outer_optimizer"] = deserialize_keras_object(config["outer_optimizer"],
                                                                 custom_objects=custom_objects)
        return cls(**config)
