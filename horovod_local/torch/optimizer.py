"""``DistributedLocalOptimizer``: Horovod's DistributedOptimizer, but local steps + periodic syncs."""
from __future__ import annotations

import contextlib
import copy
import os
import time
import warnings
from typing import Any, Callable, Iterable, Optional, Union

import torch

from horovod_local.core.config import SyncConfig, _compression_mode
from horovod_local.core.groups import local_process_set
from horovod_local.core.ops import ParamSlot
from horovod_local.core.pipeline import InFlight, RoundPipeline
from horovod_local.peer_failure import start_heartbeat
from horovod_local.replicas import check_fingerprints
from horovod_local.schedules import PeriodSchedule
from horovod_local.stats import SyncStats
from horovod_local.torch._kernels import state_dtype
from horovod_local.torch.adaalter import LocalAdaAlter
from horovod_local.torch.ops import FLOAT_DTYPES, TorchOps, _hvd, allgather_object

__all__ = ["DistributedLocalOptimizer"]

class _StatsCounters:
    """The pipeline's counters over a ``SyncStats`` (plain attributes); ``names`` maps a
    pipeline counter to another field (the local rounds' own counters)."""

    def __init__(self, opt: "_DistributedLocalOptimizer", names: Optional[dict] = None) -> None:
        self._opt, self._names = opt, names or {}

    def get(self, name: str) -> Any:
        return getattr(self._opt._hl_stats, self._names.get(name, name))

    def add(self, name: str, value: Any) -> None:
        st, name = self._opt._hl_stats, self._names.get(name, name)
        setattr(st, name, getattr(st, name) + value)

    def set(self, name: str, value: Any) -> None:
        setattr(self._opt._hl_stats, self._names.get(name, name), value)


# a local round counts in its own fields; its round numbers come from local_syncs
_LOCAL_COUNTERS = {"syncs": "local_syncs", "bytes_sent": "local_bytes_sent",
                   "local_steps": "local_round_steps"}


class _ScheduleHook:
    """The pipeline's view of the schedule; keeps ``SyncStats.period`` current."""

    def __init__(self, opt: "_DistributedLocalOptimizer") -> None:
        self._opt = opt
        self.needs_deviation = opt._hl_schedule.needs_deviation

    def on_sync(self, *, step, lr, local_steps, deviation) -> None:
        sched = self._opt._hl_schedule
        sched.on_sync(step=step, lr=lr, local_steps=local_steps, deviation=deviation)
        self._opt._hl_stats.period = sched.period


class _DistributedLocalOptimizer(torch.optim.Optimizer):
    """Methods mixed into a run-time subclass of the user's optimizer class (as Horovod does),
    so ``isinstance``, ``param_groups``, lr schedulers and ``state_dict`` keep working. The sync
    itself is :class:`horovod_local.core.pipeline.RoundPipeline`; this class finds the tensors
    (:meth:`_hl_slots`) and decides when."""

    # ---- construction ---------------------------------------------------------------------
    def _hl_setup(self, named_parameters, config: SyncConfig, outer_optimizer,
                  process_set, local_process_set: Any = None) -> None:
        hvd = _hvd()
        if not hvd.is_initialized():
            raise RuntimeError("horovod_local: call hvd.init() before DistributedLocalOptimizer")
        ps = process_set if process_set is not None else hvd.global_process_set
        if not ps.included():
            raise ValueError(f"process_set: this rank ({hvd.rank()}) is not a member of {ps!r}")
        start_heartbeat(hvd.rank(), hvd.size())  # so a failed sync can name a lost rank
        self._hl_config = config
        self._hl_schedule: PeriodSchedule = config.schedule
        self._hl_outer_factory = outer_optimizer
        self._hl_outer: Optional[torch.optim.Optimizer] = None
        self._hl_names = _parameter_names(self, named_parameters)
        if config.adaalter:
            self._auto_refresh = False  # we refresh B2 at our syncs
        self._hl_anchors: Optional[list[torch.Tensor]] = None  # SlowMo / outer x0
        self._hl_momenta: Optional[list[torch.Tensor]] = None  # SlowMo u
        self._hl_last_good: Optional[list[torch.Tensor]] = None  # nonfinite='skip' only
        self._hl_sent: Optional[list[torch.Tensor]] = None  # overlap: what the round in flight sent
        self._hl_residuals: Optional[list[torch.Tensor]] = None  # compression: error feedback e
        self._hl_state_sent: dict = {}  # overlap + state_policy='average': (param, key) -> sent
        self._hl_stats = SyncStats(period=self._hl_schedule.period)
        self._hl_round_start: Optional[float] = None
        self._hl_grads_averaged: Optional[bool] = None  # synchronize() in warm-up: its result
        self._hl_should_synchronize = True  # False inside skip_synchronize()
        self._hl_state_settled = False  # every rank has state for every parameter
        self._hl_local_given = local_process_set
        self._hl_use_process_set(ps)
        # Elastic: a worker added later builds this while the others are in a reset, so a
        # collective here would pair with nothing; LocalTorchState.sync() checks instead.
        if os.environ.get("HOROVOD_ELASTIC") != "1":
            self._hl_check_replicas()

    def _hl_use_process_set(self, ps: Any) -> None:
        self._hl_process_set, self._hl_size = ps, ps.size()
        self._hl_ops = TorchOps(ps)
        self._hl_pipeline = RoundPipeline(
            self._hl_config, self._hl_ops, _StatsCounters(self),
            outer_step=lambda anchors, grads: self._hl_outer.step(),
            reset_adaalter=self.reset_local_steps if self._hl_config.adaalter else None)
        self._hl_local_pipeline: Optional[RoundPipeline] = None
        if self._hl_config.local_period is not None:
            local_ps, self._hl_groups = local_process_set(
                _hvd(), ps, self._hl_local_given,
                lambda obj: allgather_object(obj, "horovod_local.groups", ps))
            self._hl_local_size = local_ps.size()
            self._hl_local_pipeline = RoundPipeline.for_groups(
                self._hl_config, TorchOps(local_ps), _StatsCounters(self, _LOCAL_COUNTERS))

    def _hl_fingerprint(self) -> list:
        """What every rank must agree on: the sync configuration and the synced tensors."""
        factory = self._hl_outer_factory
        # the factory only (its optimizer is made at the first round): as in Keras
        outer = None if factory is None else \
            "factory " + getattr(factory, "__qualname__", type(factory).__name__)
        return self._hl_config.fingerprint(
            type(self).__name__, outer, "parameter",
            [(self._hl_names[p], tuple(p.shape), str(p.dtype)) for p in self._hl_params()])

    def _hl_check_replicas(self) -> None:
        """Fail on every rank, naming the first difference, if ranks were built differently
        (instead of a hang or a silent average of unrelated tensors at the first sync)."""
        if self._hl_size == 1:
            return
        everyone = allgather_object(self._hl_fingerprint(), "horovod_local.fingerprint",
                                    self._hl_process_set)
        check_fingerprints(everyone)  # same list on every rank: every rank raises the same

    # ---- what is synced -------------------------------------------------------------------
    def _hl_params(self) -> list[torch.Tensor]:
        """Trainable parameters in a rank-independent order (param_groups order)."""
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _hl_state_tensors(self, p: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The inner optimizer's floating state of ``p`` that a state policy acts on: tensors of
        the parameter's shape (momentum, moments), not scalar counters nor AdaAlter's A2/B2."""
        out = []
        for key, v in sorted(self.state.get(p, {}).items()):
            if key in ("accumulator", "denominator") and self._hl_config.adaalter:
                continue
            if key == "step":  # a counter, whatever its shape (a 0-dim parameter's matches)
                continue
            if torch.is_tensor(v) and v.dtype in FLOAT_DTYPES and v.shape == p.shape:
                out.append((key, v))
        return out

    def _hl_slots(self) -> list[ParamSlot]:
        """Every synced parameter with the tensors kept for it, for one round. (Per round:
        lrs and lazily created state change; kept cheap, it runs on every sync.)"""
        cfg = self._hl_config
        # the inner state is acted on only by 'average' / 'reset' and a dropped round
        want_states = cfg.state_policy != "keep" or cfg.nonfinite == "skip"
        anchors, momenta, good = self._hl_anchors, self._hl_momenta, self._hl_last_good
        sent = self._hl_sent
        names = self._hl_names
        slots, i = [], 0
        for g in self.param_groups:
            lr = g["lr"]
            for p in g["params"]:
                if not p.requires_grad:
                    continue
                states = self._hl_state_tensors(p) if want_states else ()
                anchor = anchors[i] if anchors is not None else None
                slots.append(ParamSlot(
                    name=names[p], value=p.data, lr=lr, anchor=anchor,
                    momentum=momenta[i] if momenta is not None else None,
                    pseudo_grad=anchor.grad if anchor is not None else None,
                    states=[v for _, v in states],
                    state_names=[f"{names[p]}.{k}" for k, _ in states],
                    last_good=good[i] if good is not None else None,
                    sent=sent[i] if sent is not None else None,
                    residual=self._hl_residuals[i] if self._hl_residuals is not None else None,
                    states_sent=[self._hl_state_sent_of(i, k, v) for k, v in states]
                    if sent is not None and cfg.state_policy == "average" else ()))
                i += 1
        if cfg.adaalter:
            for slot, (a2, b2) in zip(slots, self.accumulator_pairs(self._hl_params())):
                slot.accumulator, slot.denominator = a2, b2
        return slots

    def _hl_state_sent_of(self, i: int, key: str, state: torch.Tensor) -> torch.Tensor:
        """overlap + state_policy='average': the sent copy of a state tensor (acc dtype)."""
        t = self._hl_state_sent.get((i, key))
        if t is None or t.shape != state.shape or t.device != state.device:
            t = self._hl_state_sent[(i, key)] = torch.zeros_like(
                state, dtype=state_dtype(state.dtype))
        return t

    def _hl_gradient_slots(self) -> list[ParamSlot]:
        out = []
        for p in self._hl_params():
            if p.grad is None:  # as Horovod: a missing gradient is allreduced as zeros
                p.grad = torch.zeros_like(p)
            if p.grad.is_sparse:
                if not self._hl_sparse_as_dense:
                    raise ValueError(f"parameter {self._hl_names[p]!r} has a sparse gradient; "
                                     f"warm-up allreduces dense gradients only (pass "
                                     f"sparse_as_dense=True, as with Horovod)")
                p.grad = p.grad.to_dense()
            out.append(ParamSlot(name=self._hl_names[p], value=p.grad))
        return out

    # ---- schedule decisions ---------------------------------------------------------------
    def _should_allreduce_gradients(self) -> bool:
        return self._hl_stats.steps < self._hl_config.warmup_steps

    def _should_sync(self) -> bool:
        elapsed = time.perf_counter() - self._hl_round_start
        return self._hl_schedule.should_sync(self._hl_stats.local_steps, elapsed)

    def _should_local_sync(self) -> bool:
        return self._hl_stats.local_round_steps >= self._hl_config.local_period

    def _should_make_anchors(self) -> bool:
        return self._hl_config.needs_anchors and self._hl_anchors is None

    # ---- the step ---------------------------------------------------------------------------
    # GradScaler calls step() even when this rank's gradients overflowed, handing over its
    # scale and found_inf, so that a skipped step still counts and ranks' rounds stay aligned.
    _step_supports_amp_scaling = True

    def step(self, closure: Optional[Callable[[], float]] = None):
        st = self._hl_stats
        overflow = self._hl_unscale_amp()
        if self._should_allreduce_gradients():
            ok, self._hl_grads_averaged = self._hl_grads_averaged, None
            if ok is None:
                if not self._hl_should_synchronize:
                    raise RuntimeError(
                        "horovod_local: step() inside skip_synchronize() in a warm-up step "
                        "without synchronize() first: the gradients were not averaged. Call "
                        "optimizer.synchronize() before the with block (Horovod's idiom).")
                ok = self._hl_average_gradients(quiet=overflow is not None)
            elif not ok and overflow is None:  # synchronize() found NaN/Inf, no GradScaler
                self._hl_nonfinite_after_synchronize()
            # not ok: a rank sent NaN/Inf (AMP overflow or nonfinite='skip'): no rank steps
            loss = super(self.__class__, self).step(closure) if ok else None
            st.steps += 1
            st.warmup_steps_done += 1
            st.bytes_per_step_allreduce += self._hl_grad_bytes()
            if self._hl_config.adaalter:
                self.refresh_denominators()  # replicas are identical: the local refresh is the sync
            return loss
        self._hl_maybe_start_round()
        # an AMP overflow on this rank: no inner step here, but the step counts
        loss = None if overflow else super(self.__class__, self).step(closure)
        st.steps += 1
        st.local_steps += 1
        st.bytes_per_step_allreduce += self._hl_grad_bytes()
        due = self._should_sync()
        if self._hl_local_pipeline is not None:
            st.local_round_steps += 1
            if due or self._should_local_sync():
                local = self._hl_local_round(joined=False, wants_global=due)
                due = local.wants_global > 0.5  # the group's decision (the same on its ranks)
        if due:
            if self._hl_config.overlap:
                self._hl_overlapped_round()
            else:
                self._hl_sync_round(joined=False)
        return loss

    @torch.no_grad()
    def _hl_unscale_amp(self) -> Optional[bool]:
        """Under ``GradScaler.step``: unscale the gradients (unless ``unscale_`` ran) and return
        whether they overflowed on this rank; None outside a scaler."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            return None
        scale = getattr(self, "grad_scale", None)
        if scale is not None:
            inv = scale.double().reciprocal().float()  # as GradScaler.unscale_
            for p in self._hl_params():
                if p.grad is not None:
                    p.grad.mul_(inv.to(p.grad.device))
        # handled here: the inner step must see neither (torch's optimizers would use or
        # refuse them); the scaler deletes both attributes after step()
        self.grad_scale = self.found_inf = None
        return bool(found_inf.item() > 0)

    @torch.no_grad()
    def _hl_average_gradients(self, quiet: bool = False) -> bool:
        """Warm-up: average the gradients now; False if the sum is non-finite and the step
        must be skipped on every rank. ``quiet``: a non-finite sum is not an error (a
        GradScaler's overflow, or a decision left to step())."""
        return self._hl_pipeline.gradient_round(self._hl_gradient_slots(),
                                                self._hl_stats.steps + 1,
                                                nonfinite="quiet" if quiet else None)

    def _hl_nonfinite_after_synchronize(self) -> None:
        msg = (f"horovod_local: non-finite values (NaN/Inf) in the gradients averaged by "
               f"synchronize() for step {self._hl_stats.steps + 1}, so at least one rank "
               f"diverged.")
        if self._hl_config.nonfinite == "raise":
            raise FloatingPointError(msg)
        warnings.warn(msg + " Skipping this step (nonfinite='skip').", RuntimeWarning,
                      stacklevel=3)
        self._hl_stats.skipped_rounds += 1

    def _hl_grad_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self._hl_params())

    @torch.no_grad()
    def _hl_maybe_start_round(self) -> None:
        """Before a round's first local step (or a sync before any): make the anchors x0 and the
        last good copy the first time, start the round's clock."""
        if self._should_make_anchors():
            self._hl_make_anchors()
        if self._hl_config.nonfinite == "skip" and self._hl_last_good is None:
            self._hl_last_good = [p.detach().clone() for p in self._hl_params()]
        if self._hl_round_start is None:
            self._hl_round_start = time.perf_counter()
        if self._hl_config.overlap and self._hl_sent is None:
            self._hl_sent = [torch.zeros_like(p, dtype=state_dtype(p.dtype))
                             for p in self._hl_params()]

    def _hl_check_same_start(self, params: list) -> None:
        """The anchors x0 / common point c are taken from each rank's own parameters: they
        must be equal on every rank (the user broadcast them), or SlowMo / outer / compression
        would silently keep different models. One small allgather, once."""
        if self._hl_size == 1:
            return
        mine = [repr(float(sum(p.double().sum() for p in params))),  # repr: NaN == NaN
                repr(float(sum((p.double() ** 2).sum() for p in params)))]
        everyone = allgather_object(mine, "horovod_local.same_start", self._hl_process_set)
        differ = [i for i, v in enumerate(everyone) if v != everyone[0]]
        if differ:
            raise ValueError(
                f"horovod_local: the parameters differ between ranks at the first local step "
                f"(rank(s) {differ} vs the first), but {self._hl_config.anchors_role} starts from "
                f"them on every rank. Broadcast them before training: "
                f"hvd.broadcast_parameters(model.state_dict(), root_rank=0)")

    @torch.no_grad()
    def _hl_make_anchors(self) -> None:
        params = self._hl_params()
        self._hl_check_same_start(params)
        # x0 in fp32 (fp64 for fp64 parameters), as SlowMo keeps its slow model.
        self._hl_anchors = [p.detach().to(state_dtype(p.dtype), copy=True) for p in params]
        cfg = self._hl_config
        if cfg.compression:  # the anchors are the common point c; e starts at zero
            self._hl_residuals = [torch.zeros_like(a) for a in self._hl_anchors]
        if cfg.algorithm == "slowmo":
            self._hl_momenta = [torch.zeros_like(a) for a in self._hl_anchors]
            self._hl_slowmo_scratch()
        elif cfg.has_outer:
            self._hl_make_outer()

    def _hl_slowmo_scratch(self) -> None:
        """SlowMo with overlap or compression: the pseudo-gradient goes here before the
        SlowMo step (the fused blocking unpack needs none)."""
        if self._hl_config.overlap or self._hl_config.compression:
            for a in self._hl_anchors:
                a.grad = torch.zeros_like(a)

    def _hl_make_outer(self) -> None:
        for a in self._hl_anchors:  # where the fused unpack writes the pseudo-gradient
            a.grad = torch.zeros_like(a)
        self._hl_outer = self._hl_outer_factory(self._hl_anchors)
        if not isinstance(self._hl_outer, torch.optim.Optimizer):
            raise TypeError(f"outer_optimizer must return a torch.optim.Optimizer over the "
                            f"anchors it is given, got {type(self._hl_outer).__name__}")

    def _hl_maybe_agree_on_state(self) -> None:
        """``state_policy='average'``: inner state that some ranks created lazily and others
        not (a parameter without a gradient there) is created as zeros where it is missing,
        from the lowest rank that has it (SEMANTICS.md), so every rank packs the same layout.
        One small allgather per sync until every rank has state for every parameter."""
        if self._hl_config.state_policy != "average" or self._hl_state_settled \
                or self._hl_size == 1:
            return
        params = self._hl_params()
        mine = [_describe_state(self.state.get(p)) for p in params]
        everyone = allgather_object(mine, "horovod_local.state_layout", self._hl_process_set)
        for i, p in enumerate(params):
            if mine[i] is None:
                first = next((fp[i] for fp in everyone if fp[i] is not None), None)
                if first is not None:
                    self.state[p] = _zeros_like_state(first, p.device)
        self._hl_state_settled = all(fp[i] is not None for fp in everyone
                                     for i in range(len(params)))

    # ---- the sync round -----------------------------------------------------------------------
    @torch.no_grad()
    def _hl_sync_round(self, joined: bool, explicit: bool = False) -> int:
        """One round; returns how many ranks have joined (summed control element).
        ``explicit``: an ``average_parameters()`` round (every rank must be in one)."""
        self._hl_maybe_start_round()
        self._hl_maybe_agree_on_state()
        pipe = self._hl_pipeline
        result = (pipe.compressed_round if self._hl_config.compression else pipe.sync_round)(
            self._hl_slots(), joined=1.0 if joined else 0.0, step=self._hl_stats.steps,
            lr=self.param_groups[0]["lr"], schedule=_ScheduleHook(self), explicit=explicit)
        self._hl_round_start = time.perf_counter()
        self._hl_stats.local_round_steps = 0
        return int(round(result.joined))

    @torch.no_grad()
    def _hl_overlapped_round(self, start: bool = True) -> None:
        """overlap=True: complete the round in flight and start the next (``start``)."""
        self._hl_maybe_start_round()
        self._hl_maybe_agree_on_state()
        self._hl_pipeline.overlapped_round(
            self._hl_slots(), step=self._hl_stats.steps, lr=self.param_groups[0]["lr"],
            schedule=_ScheduleHook(self), start=start)
        if start:
            self._hl_round_start = time.perf_counter()

    def _hl_complete_in_flight(self) -> None:
        """Before a blocking round (join, average_parameters): complete the overlapped round
        in flight, so that no round is lost."""
        if self._hl_pipeline.in_flight is not None:
            self._hl_overlapped_round(start=False)

    @torch.no_grad()
    def _hl_local_round(self, joined: bool, wants_global: bool):
        """Two-level averaging: one local round over this rank's group."""
        self._hl_maybe_start_round()
        self._hl_maybe_agree_on_state()
        return self._hl_local_pipeline.local_round(
            self._hl_slots(), joined=1.0 if joined else 0.0,
            wants_global=1.0 if wants_global else 0.0, step=self._hl_stats.steps)

    # ---- public API ---------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Horovod's meaning: in a warm-up step, average the gradients now (so that, e.g.,
        ``clip_grad_norm_`` sees the averaged gradients; the next ``step()`` does not average
        them again); in a local step, nothing (no gradient allreduce is pending). Not a
        parameter sync: that is :meth:`average_parameters`.

        Horovod's clipping idiom works verbatim::

            loss.backward()
            optimizer.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            with optimizer.skip_synchronize():
                optimizer.step()
        """
        if self._should_allreduce_gradients() and self._hl_grads_averaged is None:
            # the non-finite decision waits for step(): under a GradScaler it is no error
            self._hl_grads_averaged = self._hl_average_gradients(quiet=True)

    @contextlib.contextmanager
    def skip_synchronize(self):
        """Horovod's: ``step()`` inside does not average the gradients (call
        :meth:`synchronize` first in warm-up steps; local steps average nothing anyway)."""
        self._hl_should_synchronize = False
        try:
            yield
        finally:
            self._hl_should_synchronize = True

    def average_parameters(self) -> None:
        """Average the model (and synced state) over the ranks now: one sync round.
        Collective: every rank of the process set must call it. Used with
        ``period=math.inf`` and at the end of training (with ``overlap=True`` it first
        completes the round in flight)."""
        if self._should_allreduce_gradients():
            raise RuntimeError("horovod_local: average_parameters() during warm-up; replicas "
                               "are already identical while gradients are allreduced every step")
        self._hl_complete_in_flight()
        self._hl_sync_round(joined=False, explicit=True)

    def join(self) -> None:
        """This rank has no more data this epoch: keep serving other ranks' sync rounds until all
        ranks have joined, then every rank holds the same averaged model. Collective over the
        epoch: every rank calls it once when its data ends, whatever its step count (time-budget
        rounds, uneven shards). After it, training can go on (the next epoch)."""
        self._hl_complete_in_flight()
        if self._hl_local_pipeline is None:
            while self._hl_sync_round(joined=True) < self._hl_size:
                pass
            return
        # two levels: follow the group's local rounds (and the global rounds they call for)
        # until the whole group has joined, then global rounds only (SEMANTICS.md)
        group_joined = False
        while True:
            if not group_joined:
                local = self._hl_local_round(joined=True, wants_global=False)
                group_joined = int(round(local.joined)) >= self._hl_local_size
                if local.wants_global < 0.5 and not group_joined:
                    continue
            if self._hl_sync_round(joined=True) >= self._hl_size:
                return

    def sync_stats(self) -> SyncStats:
        """A copy of this rank's sync statistics (syncs, period, bytes, time in sync)."""
        return copy.copy(self._hl_stats)

    @property
    def schedule(self) -> PeriodSchedule:
        return self._hl_schedule

    def broadcast_state(self, root_rank: int = 0) -> None:
        """Make every rank's parameters and full wrapper state (inner optimizer state, counters,
        schedule, SlowMo/outer state) equal to ``root_rank``'s. Collective."""
        hvd = _hvd()
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
        hvd = _hvd()
        ps = process_set if process_set is not None else hvd.global_process_set
        if ps.size() is None or not ps.included():
            raise ValueError(f"horovod_local: after the reset this rank ({hvd.rank()}) is not in an "
                             f"initialised process set {ps}; pass one registered after the reset")
        if self._hl_local_given is not None:
            raise ValueError("horovod_local: an elastic reset with local_process_set: Horovod's "
                             "reset re-initialises without process sets. Leave "
                             "local_process_set unset (one group per host, rebuilt at each "
                             "reset from dynamic process sets)")
        # every average divides by the cached size, and the buffers belong to the old set
        self._hl_use_process_set(ps)
        self._hl_check_replicas()
        self.broadcast_state(root_rank)
        # Fresh round: replicas are identical now, so the round position and x0 restart here.
        self._hl_stats.local_steps = self._hl_stats.local_round_steps = 0
        self._hl_round_start = None
        if self._hl_anchors is not None:  # in place: the outer optimizer's state refers to them
            for a, p in zip(self._hl_anchors, self._hl_params()):
                a.copy_(p)
        if self._hl_residuals is not None:  # a fresh common point: nothing left untransmitted
            for e in self._hl_residuals:
                e.zero_()
        if self._hl_last_good is not None:
            self._hl_pipeline.remember_good(self._hl_slots())

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
            "config": self._hl_config_description(),
            "in_flight": self._hl_in_flight_state(),
            "residuals": None if self._hl_residuals is None
            else [e.clone() for e in self._hl_residuals],
        }
        return sd

    def _hl_in_flight_state(self) -> Optional[dict]:
        """overlap=True: the round in flight, waited for (not applied), so that a resume
        completes it at the next boundary exactly as this run would (SEMANTICS.md)."""
        fl = self._hl_pipeline.settle()
        if fl is None:
            return None
        return {"summed": [b.clone() for b in fl.summed], "control": fl.control,
                "modulus": fl.modulus, "step": fl.step, "layout": fl.layout,
                "sent": [t.clone() for t in self._hl_sent],
                "state_sent": {k: t.clone() for k, t in self._hl_state_sent.items()}}

    def _hl_config_description(self) -> dict:
        """What a checkpoint must agree on to be loaded here (the fingerprint's configuration)."""
        return {name: value for kind, name, value in self._hl_fingerprint() if kind == "config"}

    def _hl_check_loadable(self, ours: dict) -> None:
        """A checkpoint of another configuration fails here, naming what differs, instead of
        a TypeError / KeyError now or a failure at a later sync."""
        saved = ours.get("config")
        if saved is None:  # a checkpoint written before configurations were saved
            return
        mine = self._hl_config_description()
        diff = [f"{k}: checkpoint {saved.get(k)!r}, this optimizer {mine.get(k)!r}"
                for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)]
        if diff:
            raise ValueError("horovod_local: load_state_dict of a checkpoint written by a "
                             "differently configured DistributedLocalOptimizer: "
                             + "; ".join(diff))

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop("horovod_local", None)
        if ours is not None:
            self._hl_check_loadable(ours)  # before anything is loaded
        super(self.__class__, self).load_state_dict(state_dict)
        if ours is None:
            return
        self._hl_state_settled = False  # the loaded inner state may lack entries
        st = {k: v for k, v in ours["stats"].items() if k != "communication_ratio"}
        self._hl_stats = SyncStats(**st)
        self._hl_schedule.load_state_dict(ours["schedule"])
        params = self._hl_params()
        if ours["anchors"] is not None:
            self._hl_anchors = [a.to(p.device).clone() for a, p in zip(ours["anchors"], params)]
            if ours["momenta"] is not None:
                self._hl_momenta = [m.to(p.device).clone() for m, p in zip(ours["momenta"], params)]
                self._hl_slowmo_scratch()
            elif ours["outer"] is not None:
                self._hl_make_outer()
                self._hl_outer.load_state_dict(ours["outer"])
        if ours.get("residuals") is not None:
            self._hl_residuals = [e.to(p.device).clone() for e, p in zip(ours["residuals"], params)]
        if ours.get("last_good") is not None:
            self._hl_last_good = [g.to(p.device).clone() for g, p in zip(ours["last_good"], params)]
        if ours["seconds_into_round"] is not None:
            self._hl_round_start = time.perf_counter() - ours["seconds_into_round"]
        fl = ours.get("in_flight")
        self._hl_pipeline.in_flight = None
        if fl is not None:
            self._hl_sent = [t.to(p.device).clone() for t, p in zip(fl["sent"], params)]
            self._hl_state_sent = {k: t.to(params[k[0]].device).clone()
                                   for k, t in fl["state_sent"].items()}
            self._hl_pipeline.in_flight = InFlight(
                None, [b.to(params[0].device).clone() for b in fl["summed"]],
                tuple(fl["control"]), fl["modulus"], fl["step"], fl["layout"])


def _describe_state(state: Optional[dict]) -> Optional[dict]:
    """A parameter's inner state as a picklable layout: tensors by (shape, dtype, device
    type), other values as they are; None if it has none."""
    if not state:
        return None
    return {k: ("tensor", tuple(v.shape), str(v.dtype).replace("torch.", ""), v.device.type)
            if torch.is_tensor(v) else ("value", v) for k, v in state.items()}


def _zeros_like_state(layout: dict, device: torch.device) -> dict:
    out = {}
    for k, d in layout.items():
        if d[0] == "tensor":
            _, shape, dtype, dev_type = d
            out[k] = torch.zeros(shape, dtype=getattr(torch, dtype),
                                 device=device if dev_type == device.type else dev_type)
        else:
            out[k] = copy.deepcopy(d[1])
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
        where = ", ".join(f"position {i} (shape {tuple(opt_params[i].shape)})"
                          for i in unnamed[:10])
        raise ValueError(f"named_parameters was specified, but {len(unnamed)} of the optimizer's "
                         f"parameters are not named: {where}. Pass the named_parameters() of "
                         f"every module whose parameters the optimizer holds")
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
    local_period: Optional[int] = None,
    local_process_set: Any = None,
    overlap: bool = False,
    compression: Any = None,
    op: Any = None,
    backward_passes_per_step: int = 1,
    gradient_predivide_factor: float = 1.0,
    sparse_as_dense: bool = False,
    groups: Any = None,
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
            (call :meth:`average_parameters`), or a schedule: ``Constant``, ``Increasing``,
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
        local_period: two-level averaging (e.g. ``period=8, local_period=1``): the ranks of a
            host also average every ``local_period`` local steps, over the fast intra-host
            link; all ranks average on ``period``'s schedule (SlowMo / outer / AdaAlter state
            only there). Needs a step-based schedule (not ``TimeBudget``). Default None: flat.
        local_process_set: the group of this rank for ``local_period`` (a Horovod process set
            registered at ``hvd.init(process_sets=[...])``; the sets must partition the ranks).
            Default: one group per host, added as process sets here, which needs
            ``hvd.init(process_sets="dynamic")``.
        overlap: hide the sync behind local steps: a round's sum is started at its boundary
            and applied at the next one, with the local progress made meanwhile carried over
            (``x = avg(sent) + (x - sent)``; SlowMo / outer: the outer step on the delayed
            pseudo-gradient). Call :meth:`join` or :meth:`average_parameters` at the end of
            training: they complete the round in flight and leave identical replicas.

    Horovod's ``DistributedOptimizer`` arguments, so that a swap needs no other change:

        compression: None / ``hvd.Compression.none``: full-precision syncs; ``'fp16'`` /
            ``hvd.Compression.fp16`` or ``'int8'``: each sync sends this rank's change since
            the last common point, quantised, with error feedback (SEMANTICS.md, "Compressed
            syncs"); warm-up gradient rounds stay uncompressed. ``'bf16'`` raises (Horovod
            0.28 cannot carry bfloat16).
        op: ``hvd.Average`` (or None): a sync is an average. ``hvd.Sum`` / ``hvd.Adasum``
            raise ``ValueError`` (a sum of models, or Adasum's gradient combination, is no
            model average).
        backward_passes_per_step: as in Horovod, the user calls ``backward()`` this many times
            per ``step()``; the gradients accumulate in ``.grad`` into one local step (or one
            warm-up allreduce). Only validated here: nothing else changes.
        gradient_predivide_factor: 1.0 only (Horovod's split of the averaging factor before
            and after the sum; our sums are exact averages in the tensors' dtype).
        sparse_as_dense: convert sparse gradients to dense before a warm-up allreduce
            (without it a sparse gradient in warm-up raises ``ValueError``; local steps hand
            sparse gradients to the inner optimizer as they are).
        groups: accepted and ignored: every sync packs all tensors of a dtype into one buffer
            already, which is what Horovod's grouping asks for.

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
        opt.average_parameters()   # every rank ends with the same model
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if "_hl_process_set" in optimizer.__dict__:
        raise ValueError("optimizer is already a DistributedLocalOptimizer")
    if _is_horovod_distributed(optimizer):
        raise ValueError("optimizer is a horovod.torch.DistributedOptimizer: wrap the plain "
                         "torch optimizer instead (DistributedLocalOptimizer replaces Horovod's, "
                         "it does not go on top of it)")
    if isinstance(outer_optimizer, type):
        raise ValueError(f"outer_optimizer must be a factory anchors -> optimizer, e.g. "
                         f"lambda p: torch.optim.SGD(p, lr=0.7, momentum=0.9, nesterov=True); "
                         f"got the class {outer_optimizer.__name__}, which would run with its "
                         f"default hyper-parameters")
    if outer_optimizer is not None and not callable(outer_optimizer):
        raise ValueError("outer_optimizer must be a callable anchors -> torch.optim.Optimizer")
    _check_horovod_arguments(compression, op, backward_passes_per_step,
                             gradient_predivide_factor, groups)
    config = SyncConfig.from_arguments(period, warmup_steps, state_policy, algorithm, slowmo_lr,
                                       slowmo_momentum, outer=outer_optimizer,
                                       nonfinite=nonfinite,
                                       adaalter=isinstance(optimizer, LocalAdaAlter),
                                       local_period=local_period, overlap=overlap,
                                       compression=_compression_mode(compression))
    if local_process_set is not None and local_period is None:
        raise ValueError("local_process_set is only used with local_period (two-level "
                         "averaging); pass local_period too, or drop it")

    members = {k: v for k, v in _DistributedLocalOptimizer.__dict__.items()
               if k not in ("__dict__", "__weakref__")}
    # Horovod's module name: hvd.broadcast_optimizer_state initialises empty state with
    # super(cls, opt).step() (the inner step) for optimizers of that module, instead of a
    # wrapper step() (which would count a step, or enter a collective on one rank).
    members["__module__"] = _HOROVOD_OPTIMIZER_MODULE
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), members)
    wrapped = cls.__new__(cls)
    wrapped.__dict__.update(optimizer.__dict__)  # same param_groups, state and hooks
    wrapped._hl_sparse_as_dense = bool(sparse_as_dense)
    wrapped._hl_setup(named_parameters, config, outer_optimizer, process_set, local_process_set)
    return wrapped


_HOROVOD_OPTIMIZER_MODULE = "horovod.torch.optimizer"


def _is_horovod_distributed(optimizer: torch.optim.Optimizer) -> bool:
    # Horovod copies its mixin's methods into a run-time subclass (no common base class)
    return type(optimizer).__module__ == _HOROVOD_OPTIMIZER_MODULE and \
        hasattr(type(optimizer), "_allreduce_grad_async")


def _check_horovod_arguments(compression: Any, op: Any, backward_passes_per_step: Any,
                             gradient_predivide_factor: Any, groups: Any) -> None:
    """Horovod's DistributedOptimizer arguments: accept what has a meaning here (docstring of
    DistributedLocalOptimizer), refuse the rest naming the argument and why."""
    compression = _compression_mode(compression)
    if op is not None:
        hvd = _hvd()
        if op != hvd.Average:
            raise ValueError(f"op={op!r}: a sync averages the models over the ranks; only "
                             f"hvd.Average applies (hvd.Sum would add models, hvd.Adasum "
                             f"combines gradients)")
    if isinstance(backward_passes_per_step, bool) or not isinstance(
            backward_passes_per_step, int) or backward_passes_per_step < 1:
        raise ValueError(f"backward_passes_per_step must be an integer >= 1, got "
                         f"{backward_passes_per_step!r}")
    if gradient_predivide_factor != 1.0:
        raise ValueError(f"gradient_predivide_factor={gradient_predivide_factor!r}: only 1.0 "
                         f"applies (syncs average exactly: sum, then times 1/n)")
    del groups  # accepted: every sync already packs each dtype into one buffer
