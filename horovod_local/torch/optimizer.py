"""``DistributedLocalOptimizer``: Horovod's DistributedOptimizer, but local steps + periodic syncs."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Optional, Union

import torch

from horovod_local.config import NONFINITE_POLICIES, validate_sync_arguments
from horovod_local.peer_failure import reporting_lost_ranks, start_heartbeat
from horovod_local.schedules import PeriodSchedule, make_schedule
from horovod_local.stats import SyncStats
from horovod_local.sync_protocol import DEVIATION_NAME
from horovod_local.torch.adaalter import LocalAdaAlter
from horovod_local.torch.fused_sync import GRADIENT_ROUND, Bucket, FusedSync, check_round_kinds

__all__ = ["DistributedLocalOptimizer"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _DistributedLocalOptimizer(torch.optim.Optimizer):
    """Methods mixed into a run-time subclass of the user's optimizer class (as Horovod does),
    so ``isinstance``, ``param_groups``, lr schedulers and ``state_dict`` keep working."""

    # ---- construction ---------------------------------------------------------------------
    def _hl_setup(self, named_parameters, period, warmup_steps, state_policy, algorithm,
                  slowmo_lr, slowmo_momentum, outer_optimizer, process_set,
                  nonfinite="raise") -> None:
        import horovod.torch as hvd

        if not hvd.is_initialized():
            raise RuntimeError("horovod_local: call hvd.init() before DistributedLocalOptimizer")
        self._hl_process_set = process_set if process_set is not None else hvd.global_process_set
        if not self._hl_process_set.included():
            raise ValueError(f"process_set: this rank ({hvd.rank()}) is not a member of "
                             f"{self._hl_process_set!r}")
        self._hl_size = self._hl_process_set.size()
        start_heartbeat(hvd.rank(), hvd.size())  # so a failed sync can name a lost rank
        self._hl_schedule: PeriodSchedule = make_schedule(period)
        self._hl_warmup_steps = warmup_steps
        self._hl_state_policy = state_policy
        self._hl_algorithm = "outer" if outer_optimizer is not None else algorithm
        self._hl_slowmo_lr = slowmo_lr
        self._hl_slowmo_momentum = slowmo_momentum
        self._hl_outer_factory = outer_optimizer
        self._hl_outer: Optional[torch.optim.Optimizer] = None
        self._hl_names = _parameter_names(self, named_parameters)
        self._hl_adaalter = isinstance(self, LocalAdaAlter)
        if self._hl_adaalter:
            if state_policy == "reset":
                raise ValueError("state_policy='reset' does not apply to LocalAdaAlter: its "
                                 "accumulators are always averaged at syncs (AdaAlter's own "
                                 "rule); use 'keep'")
            self._auto_refresh = False  # we refresh B2 at our syncs
        self._hl_sync = FusedSync(self._hl_process_set)
        self._hl_anchors: Optional[list[torch.Tensor]] = None  # SlowMo / outer x0
        self._hl_momenta: Optional[list[torch.Tensor]] = None  # SlowMo u
        self._hl_stats = SyncStats(period=self._hl_schedule.period)
        self._hl_round_start: Optional[float] = None
        self._hl_nonfinite = nonfinite
        self._hl_last_good: Optional[list[torch.Tensor]] = None  # nonfinite='skip' only
        import os

        # Elastic: a worker added later builds this while the others are in a reset, so a
        # collective here would pair with nothing; LocalTorchState.sync() checks instead.
        if os.environ.get("HOROVOD_ELASTIC") != "1":
            self._hl_check_replicas()

    def _hl_fingerprint(self) -> list:
        """What every rank must agree on: synced tensors and the sync configuration."""
        fp = [("config", "schedule", self._hl_schedule.describe()),
              ("config", "warmup_steps", self._hl_warmup_steps),
              ("config", "state_policy", self._hl_state_policy),
              ("config", "algorithm", self._hl_algorithm),
              ("config", "slowmo", (self._hl_slowmo_lr, self._hl_slowmo_momentum)),
              ("config", "inner optimizer", type(self).__name__),
              # the factory only (its optimizer is made at the first round): as in Keras
              ("config", "outer optimizer", None if self._hl_outer_factory is None else
               "factory " + getattr(self._hl_outer_factory, "__qualname__",
                                    type(self._hl_outer_factory).__name__)),
              ("config", "nonfinite", self._hl_nonfinite),
              ("config", "number of synced parameters", len(self._hl_params()))]
        fp += [("parameter", self._hl_names[p], (tuple(p.shape), str(p.dtype)))
               for p in self._hl_params()]
        return fp

    def _hl_check_replicas(self) -> None:
        """Fail on every rank, naming the first difference, if ranks were built differently
        (instead of a hang or a silent average of unrelated tensors at the first sync)."""

        from horovod_local.replicas import check_fingerprints

        if self._hl_size == 1:
            return
        mine = self._hl_fingerprint()
        everyone = _allgather_object(mine, "horovod_local.fingerprint", self._hl_process_set)
        check_fingerprints(everyone)  # same list on every rank: every rank raises the same

    # ---- what is synced -------------------------------------------------------------------
    def _hl_params(self) -> list[torch.Tensor]:
        """Trainable parameters in a rank-independent order (param_groups order)."""
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _hl_lr_of(self) -> dict:
        return {p: g["lr"] for g in self.param_groups for p in g["params"]}

    def _hl_state_tensors(self, p: torch.Tensor) -> list[torch.Tensor]:
        """The inner optimizer's floating state of ``p`` that a state policy acts on: tensors of
        the parameter's shape (momentum, moments), not scalar counters nor AdaAlter's A2/B2."""
        out = []
        for key, v in sorted(self.state.get(p, {}).items()):
            if key in ("accumulator", "denominator") and self._hl_adaalter:
                continue
            if torch.is_tensor(v) and v.dtype in _FLOAT_DTYPES and v.shape == p.shape:
                out.append(v)
        return out

    def _hl_buckets(self, gradients: bool = False) -> list[Bucket]:
        params = self._hl_params()
        buckets: dict[torch.dtype, Bucket] = {}
        lr_of = self._hl_lr_of()

        def bucket(dtype):
            if dtype not in _FLOAT_DTYPES:
                raise TypeError(f"horovod_local syncs floating-point tensors only, got {dtype}")
            return buckets.setdefault(dtype, Bucket(dtype))

        if gradients:
            for p in params:
                if p.grad is None:  # as Horovod: a missing gradient is allreduced as zeros
                    p.grad = torch.zeros_like(p)
                if p.grad.is_sparse:
                    raise ValueError(f"parameter {self._hl_names[p]!r} has a sparse gradient; "
                                     f"horovod_local supports dense gradients only")
                b = bucket(p.grad.dtype)
                b.params.append(p.grad)
                b.names.append(self._hl_names[p])
        else:
            accum = dict(zip(params, self.accumulator_pairs(params))) if self._hl_adaalter else {}
            for i, p in enumerate(params):
                b = bucket(p.dtype)
                b.params.append(p.data)
                b.names.append(self._hl_names[p])
                if self._hl_anchors is not None:
                    b.anchors.append(self._hl_anchors[i])
                    b.lrs.append(lr_of[p])
                    if self._hl_momenta is not None:
                        b.momenta.append(self._hl_momenta[i])
                    else:
                        if self._hl_anchors[i].grad is None:
                            self._hl_anchors[i].grad = torch.zeros_like(self._hl_anchors[i])
                        b.grads.append(self._hl_anchors[i].grad)
                if self._hl_state_policy == "average":
                    for s in self._hl_state_tensors(p):
                        bucket(s.dtype).states.append(s)
                if p in accum:
                    a2, b2 = accum[p]
                    ab = bucket(a2.dtype)
                    ab.accumulators.append(a2)
                    ab.denominators.append(b2)
        out = list(buckets.values())
        FusedSync.assign_control(out)
        return out

    # ---- schedule decisions ---------------------------------------------------------------
    def _should_allreduce_gradients(self) -> bool:
        return self._hl_stats.steps < self._hl_warmup_steps

    def _should_sync(self) -> bool:
        elapsed = time.perf_counter() - self._hl_round_start
        return self._hl_schedule.should_sync(self._hl_stats.local_steps, elapsed)

    def _needs_anchors(self) -> bool:
        return self._hl_algorithm in ("slowmo", "outer") and self._hl_anchors is None

    # ---- the step ---------------------------------------------------------------------------
    def step(self, closure: Optional[Callable[[], float]] = None):
        if self._should_allreduce_gradients():
            if self._hl_allreduce_gradients():
                loss = super(self.__class__, self).step(closure)
            else:  # nonfinite='skip': a rank sent NaN/Inf gradients; nobody takes this step
                loss = None
            self._hl_stats.steps += 1
            self._hl_stats.warmup_steps_done += 1
            self._hl_stats.bytes_per_step_allreduce += self._hl_grad_bytes()
            if self._hl_adaalter:
                self.refresh_denominators()  # replicas are identical: the local refresh is the sync
            return loss
        if self._needs_anchors():
            self._hl_make_anchors()
        if self._hl_round_start is None:
            self._hl_round_start = time.perf_counter()
            self._hl_remember_good()
        loss = super(self.__class__, self).step(closure)
        self._hl_stats.steps += 1
        self._hl_stats.local_steps += 1
        self._hl_stats.bytes_per_step_allreduce += self._hl_grad_bytes()
        if self._should_sync():
            self._hl_sync_round(joined=False)
        return loss

    def _hl_grad_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self._hl_params())

    @torch.no_grad()
    def _hl_allreduce_gradients(self) -> bool:
        """Average the gradients; False if the round was skipped (non-finite, policy 'skip')."""
        t0 = time.perf_counter()
        buckets = self._hl_buckets(gradients=True)
        step = self._hl_stats.steps + 1
        with self._hl_naming_lost_ranks(f"the gradient allreduce at step {step}"):
            bufs, control, nbytes = self._hl_sync.allreduce(buckets, control=GRADIENT_ROUND)
        self._hl_stats.bytes_sent += nbytes
        check_round_kinds(control, self._hl_size, gradient_round=True)
        if not self._hl_finite_or_skip(buckets, bufs, step):
            return False
        FusedSync.unpack_gradients(buckets, bufs, self._hl_size)
        self._hl_stats.sync_seconds += time.perf_counter() - t0
        return True

    def _hl_finite_or_skip(self, buckets, bufs, step: int) -> bool:
        """True if the summed buffers are finite. Otherwise raise (nonfinite='raise') or warn and
        return False ('skip'). Every rank sees the same sum, so every rank decides the same."""
        try:
            FusedSync.check_finite(buckets, bufs, step)
            return True
        except FloatingPointError as err:
            if self._hl_nonfinite == "raise":
                raise
            import warnings

            warnings.warn(f"{err} Skipping this round (nonfinite='skip'): the model goes back to "
                          f"the last good average.", RuntimeWarning, stacklevel=4)
            self._hl_stats.skipped_rounds += 1
            return False

    @torch.no_grad()
    def _hl_remember_good(self) -> None:
        if self._hl_nonfinite == "skip":
            params = self._hl_params()
            if self._hl_last_good is None:
                self._hl_last_good = [p.detach().clone() for p in params]
            else:
                for g, p in zip(self._hl_last_good, params):
                    g.copy_(p)

    @torch.no_grad()
    def _hl_restore_good(self) -> None:
        """After a skipped round: the last good average, and no state that may hold the NaN."""
        for p, g in zip(self._hl_params(), self._hl_last_good):
            p.copy_(g)
            for s in self._hl_state_tensors(p):
                s.zero_()
        if self._hl_adaalter:
            for a2, b2 in self.accumulator_pairs(self._hl_params()):
                a2.copy_(b2)  # B2 is the last shared (good) denominator
            self.reset_local_steps()

    @torch.no_grad()
    def _hl_make_anchors(self) -> None:
        params = self._hl_params()
        # x0 in fp32 (fp64 for fp64 parameters), as SlowMo keeps its slow model.
        wide = [torch.float64 if p.dtype == torch.float64 else torch.float32 for p in params]
        self._hl_anchors = [p.detach().to(dt, copy=True) for p, dt in zip(params, wide)]
        if self._hl_algorithm == "slowmo":
            self._hl_momenta = [torch.zeros_like(a) for a in self._hl_anchors]
        else:
            self._hl_outer = self._hl_outer_factory(self._hl_anchors)
            if not isinstance(self._hl_outer, torch.optim.Optimizer):
                raise TypeError(f"outer_optimizer must return a torch.optim.Optimizer over the "
                                f"anchors it is given, got {type(self._hl_outer).__name__}")

    # ---- the sync round -----------------------------------------------------------------------
    @torch.no_grad()
    def _hl_sync_round(self, joined: bool) -> int:
        """One round; returns how many ranks have joined (summed control element)."""
        t0 = time.perf_counter()
        step = self._hl_stats.steps
        if self._needs_anchors():
            self._hl_make_anchors()
        if self._hl_last_good is None:
            self._hl_remember_good()  # synchronize() before any local step
        buckets = self._hl_buckets()
        with self._hl_naming_lost_ranks(f"the sync round at step {step}"):
            bufs, n_joined, nbytes = self._hl_sync.allreduce(buckets,
                                                             control=1.0 if joined else 0.0)
        check_round_kinds(n_joined, self._hl_size, gradient_round=False)
        if not self._hl_finite_or_skip(buckets, bufs, step):
            self._hl_restore_good()
            self._hl_stats.local_steps = 0
            self._hl_stats.bytes_sent += nbytes
            self._hl_round_start = time.perf_counter()
            return int(round(n_joined))
        if self._hl_algorithm == "slowmo":
            for lr in (lr for b in buckets for lr in b.lrs):
                if not lr > 0:
                    raise ValueError(f"SlowMo divides the pseudo-gradient by the lr; got lr={lr!r}")
        deviation = FusedSync.unpack(buckets, bufs, self._hl_size, self._hl_algorithm,
                                     self._hl_slowmo_lr, self._hl_slowmo_momentum,
                                     self._hl_schedule.needs_deviation)
        if self._hl_algorithm == "outer":
            self._hl_outer.step()
            for p, a in zip(self._hl_params(), self._hl_anchors):
                p.copy_(a)
        if self._hl_state_policy == "reset":
            for p in self._hl_params():
                for s in self._hl_state_tensors(p):
                    s.zero_()
        if self._hl_adaalter:
            self.reset_local_steps()
        if self._hl_schedule.needs_deviation:
            deviation = self._hl_mean_scalar(deviation)
            self._hl_stats.last_deviation = deviation
        self._hl_schedule.on_sync(step=step, lr=self.param_groups[0]["lr"],
                                  local_steps=self._hl_stats.local_steps,
                                  deviation=deviation if self._hl_schedule.needs_deviation else None)
        st = self._hl_stats
        st.syncs += 1
        st.local_steps = 0
        st.period = self._hl_schedule.period
        st.bytes_sent += nbytes
        st.sync_seconds += time.perf_counter() - t0
        self._hl_round_start = time.perf_counter()
        self._hl_remember_good()
        return int(round(n_joined))

    def _hl_mean_scalar(self, value: float) -> float:
        import horovod.torch as hvd

        t = torch.tensor([value], dtype=torch.float64)
        with self._hl_naming_lost_ranks("the deviation allreduce"):
            hvd.allreduce_(t, name=DEVIATION_NAME, op=hvd.Sum,
                           process_set=self._hl_process_set)
        return float(t[0]) / self._hl_size

    def _hl_naming_lost_ranks(self, what: str):
        """Around a collective: a failure caused by a lost rank names it (Gloo launcher)."""
        import horovod.torch as hvd

        ps = self._hl_process_set
        ranks = list(ps.ranks) if getattr(ps, "ranks", None) else list(range(hvd.size()))
        return reporting_lost_ranks(hvd.rank(), ranks, what)

    # ---- public API ---------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Average the model (and synced state) over the ranks now. Collective: every rank of
        the process set must call it. Used with ``period=math.inf`` and at the end of training.

        Note: unlike ``hvd.DistributedOptimizer.synchronize()`` (which waits for gradient
        allreduces), this is a parameter sync round.
        """
        if self._should_allreduce_gradients():
            raise RuntimeError("horovod_local: synchronize() during warm-up; replicas are "
                               "already identical while gradients are allreduced every step")
        self._hl_sync_round(joined=False)

    def join(self) -> None:
        """This rank has no more data this epoch: keep serving other ranks' sync rounds until all
        ranks have joined, then every rank holds the same averaged model. Collective over the
        epoch: every rank calls it once when its data ends, whatever its step count (time-budget
        rounds, uneven shards). After it, training can go on (the next epoch)."""
        while self._hl_sync_round(joined=True) < self._hl_size:
            pass

    def sync_stats(self) -> SyncStats:
        """A copy of this rank's sync statistics (syncs, period, bytes, time in sync)."""
        import copy

        return copy.copy(self._hl_stats)

    @property
    def schedule(self) -> PeriodSchedule:
        return self._hl_schedule

    def broadcast_state(self, root_rank: int = 0) -> None:
        """Make every rank's parameters and full wrapper state (inner optimizer state, counters,
        schedule, SlowMo/outer state) equal to ``root_rank``'s. Collective."""
        import horovod.torch as hvd

        state = self.state_dict() if hvd.rank() == root_rank else None
        state = hvd.broadcast_object(state, root_rank=root_rank, name="horovod_local.state",
                                     process_set=self._hl_process_set)
        self.load_state_dict(state)
        with torch.no_grad():
            for i, p in enumerate(self._hl_params()):
                hvd.broadcast_(p.data, root_rank=root_rank, name=f"horovod_local.param.{i}",
                               process_set=self._hl_process_set)

    @torch.no_grad()
    def _hl_on_reset(self, root_rank: int = 0, process_set: Any = None) -> None:
        """Elastic membership change (Horovod re-initialised with ranks added or removed):
        adopt the new process set and size, check the replicas, make every rank equal to
        ``root_rank`` (:meth:`broadcast_state`) and start a fresh round from those parameters.
        Collective; :class:`horovod_local.torch.elastic.LocalTorchState` calls it in ``sync()``.

        Args:
            root_rank: the rank whose parameters and state every rank takes.
            process_set: the process set to sync over from now on (default: the global one;
                Horovod's elastic re-init registers no other, so a custom one must be re-added).
        """
        import horovod.torch as hvd

        ps = process_set if process_set is not None else hvd.global_process_set
        if ps.size() is None or not ps.included():
            raise ValueError(f"horovod_local: after the reset this rank ({hvd.rank()}) is not in an "
                             f"initialised process set {ps}; pass one registered after the reset")
        # every average divides by the cached size, and the buffers belong to the old set
        self._hl_process_set, self._hl_size = ps, ps.size()
        self._hl_sync = FusedSync(ps)
        self._hl_check_replicas()
        self.broadcast_state(root_rank)
        # Fresh round: replicas are identical now, so the round position and x0 restart here.
        self._hl_stats.local_steps = 0
        self._hl_round_start = None
        if self._hl_anchors is not None:  # in place: the outer optimizer's state refers to them
            for a, p in zip(self._hl_anchors, self._hl_params()):
                a.copy_(p)
        if self._hl_last_good is not None:
            self._hl_remember_good()

    def state_dict(self) -> dict:
        sd = super(self.__class__, self).state_dict()
        st = self._hl_stats
        sd["horovod_local"] = {
            "stats": st.as_dict(),
            "schedule": self._hl_schedule.state_dict(),
            "anchors": None if self._hl_anchors is None else [a.clone() for a in self._hl_anchors],
            "momenta": None if self._hl_momenta is None else [m.clone() for m in self._hl_momenta],
            "outer": None if self._hl_outer is None else self._hl_outer.state_dict(),
            "last_good": None if self._hl_last_good is None
            else [g.clone() for g in self._hl_last_good],
            "seconds_into_round": (time.perf_counter() - self._hl_round_start)
            if self._hl_round_start is not None else None,
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop("horovod_local", None)
        super(self.__class__, self).load_state_dict(state_dict)
        if ours is None:
            return
        st = {k: v for k, v in ours["stats"].items() if k != "communication_ratio"}
        self._hl_stats = SyncStats(**st)
        self._hl_schedule.load_state_dict(ours["schedule"])
        params = self._hl_params()
        if ours["anchors"] is not None:
            self._hl_anchors = [a.to(p.device).clone() for a, p in zip(ours["anchors"], params)]
            if ours["momenta"] is not None:
                self._hl_momenta = [m.to(p.device).clone() for m, p in zip(ours["momenta"], params)]
            else:
                self._hl_outer = self._hl_outer_factory(self._hl_anchors)
                self._hl_outer.load_state_dict(ours["outer"])
        if ours.get("last_good") is not None:
            self._hl_last_good = [g.to(p.device).clone() for g, p in zip(ours["last_good"], params)]
        if ours["seconds_into_round"] is not None:
            self._hl_round_start = time.perf_counter() - ours["seconds_into_round"]


def _allgather_object(obj: Any, name: str, process_set) -> list:
    """``hvd.allgather_object`` within a process set (Horovod 0.28's takes none)."""
    import pickle

    import horovod.torch as hvd

    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    sizes = hvd.allgather(torch.tensor([data.numel()]), name=name + ".sizes",
                          process_set=process_set)
    blob = hvd.allgather(data, name=name, process_set=process_set)
    out, off = [], 0
    for n in sizes.tolist():
        out.append(pickle.loads(blob[off: off + n].numpy().tobytes()))
        off += n
    return out


def _parameter_names(opt: torch.optim.Optimizer, named_parameters) -> dict:
    """param -> name, validated as Horovod does (names unique, every optimizer param named)."""
    opt_params = [p for g in opt.param_groups for p in g["params"]]
    if named_parameters is None:
        return {p: f"param.{gi}.{pi}" for gi, g in enumerate(opt.param_groups)
                for pi, p in enumerate(g["params"])}
    named_parameters = list(named_parameters)
    if any(not (isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)) for x in
           named_parameters):
        raise ValueError("named_parameters should be a sequence of (name, parameter) tuples, "
                         "usually model.named_parameters()")
    names = [n for n, _ in named_parameters]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ValueError(f"named_parameters contains duplicate names: {dups}")
    named = {p: n for n, p in named_parameters}
    opt_set = set(opt_params)
    stray = [n for n, p in named_parameters if p not in opt_set]
    if stray:
        raise ValueError(f"named_parameters contains parameters not in the optimizer: {stray}")
    unnamed = [i for i, p in enumerate(opt_params) if p not in named]
    if unnamed:
        raise ValueError(f"named_parameters was specified, but {len(unnamed)} of the optimizer's "
                         f"parameters are not named (positions {unnamed[:10]})")
    return named


def DistributedLocalOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Optional[Iterable[tuple[str, torch.Tensor]]] = None,
    *,
    period: Union[int, float, PeriodSchedule, None] = 8,
    warmup_steps: int = 0,
    state_policy: str = "keep",
    algorithm: str = "local_sgd",
    slowmo_lr: float = 1.0,
    slowmo_momentum: float = 0.5,
    outer_optimizer: Optional[Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = None,
    process_set: Any = None,
    nonfinite: str = "raise",
) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` for local SGD: local steps, and a parameter average every ``period``.

    A drop-in for ``hvd.DistributedOptimizer``: the same ``zero_grad() / backward() / step()``
    loop; the returned object is an instance of the optimizer's own class (``isinstance``,
    ``param_groups``, lr schedulers and ``state_dict`` keep working). Each sync averages the
    parameters (and any state the algorithm needs) in one allreduce per dtype.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (the inner optimizer); its state is kept.
        named_parameters: ``model.named_parameters()``; names appear in error messages.
            Validated as Horovod does.
        period: local steps between syncs (int >= 1), ``math.inf`` for no automatic sync
            (call :meth:`synchronize`), or a schedule: ``Constant``, ``Increasing``,
            ``Adaptive`` (ADPSGD), ``TimeBudget``, ``Never`` from :mod:`horovod_local`.
        warmup_steps: steps at the start that allreduce gradients every step, exactly like
            ``hvd.DistributedOptimizer`` (post-local SGD).
        state_policy: what happens to the inner optimizer's state (momentum, Adam moments) at a
            sync: ``'keep'`` (default), ``'reset'`` (zeroed) or ``'average'`` (averaged in the
            same buffer).
        algorithm: ``'local_sgd'`` (model averaging) or ``'slowmo'`` (slow momentum on top).
        slowmo_lr, slowmo_momentum: SlowMo's alpha and beta (paper: 1.0 and 0.4-0.8).
        outer_optimizer: ``factory(anchors) -> torch.optim.Optimizer``, applied at each sync to
            the pseudo-gradient ``x0 - x_avg`` (DiLoCo: ``lambda p: torch.optim.SGD(p, lr=0.7,
            momentum=0.9, nesterov=True)``). Replaces ``algorithm``.
        process_set: a Horovod process set (default: all ranks).
        nonfinite: what a sync does when some rank sends NaN/Inf: ``'raise'`` (default;
            ``FloatingPointError`` on every rank naming the step and tensor, nothing written
            back) or ``'skip'`` (warn, and every rank returns to the last good average; costs a
            copy of the parameters).

    Example::

        import horovod.torch as hvd, torch, horovod_local.torch as hl
        hvd.init()
        model = torch.nn.Linear(10, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1 * hvd.size(), momentum=0.9)
        opt = hl.DistributedLocalOptimizer(opt, model.named_parameters(), period=8,
                                           warmup_steps=100)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        for x, y in loader:
            opt.zero_grad(); torch.nn.functional.mse_loss(model(x), y).backward(); opt.step()
        opt.synchronize()   # every rank ends with the same model
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if "_hl_process_set" in optimizer.__dict__:
        raise ValueError("optimizer is already a DistributedLocalOptimizer")
    validate_sync_arguments(period, warmup_steps, state_policy, algorithm, slowmo_lr,
                            slowmo_momentum)
    if outer_optimizer is not None and not callable(outer_optimizer):
        raise ValueError("outer_optimizer must be a callable anchors -> torch.optim.Optimizer")
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    if outer_optimizer is not None and algorithm != "local_sgd":
        raise ValueError("pass either algorithm='slowmo' or outer_optimizer, not both")

    members = {k: v for k, v in _DistributedLocalOptimizer.__dict__.items()
               if k not in ("__dict__", "__weakref__")}
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), members)
    wrapped = cls.__new__(cls)
    wrapped.__dict__.update(optimizer.__dict__)  # same param_groups, state and hooks
    wrapped._hl_setup(named_parameters, period, int(warmup_steps), state_policy, algorithm,
                      float(slowmo_lr), float(slowmo_momentum), outer_optimizer, process_set,
                      nonfinite)
    return wrapped
