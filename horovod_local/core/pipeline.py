"""One sync round, from plan to result, for both front ends.

``step()`` asks the schedule and calls :meth:`RoundPipeline.sync_round` (or, in warm-up,
:meth:`RoundPipeline.gradient_round`); the pipeline runs, top-down:

1. plan: every component (algorithm, state policy, AdaAlter) adds its tensors to one bucket per
   dtype; the control element goes to the widest dtype's bucket (``protocol``);
2. exchange: pack each bucket into one flat buffer, one summing allreduce per buffer;
3. verify: the control elements (ranks in the same kind of round, in the same round) and
   finiteness (a cheap proof
   from the backend, an exact search naming the tensor only when that fails). Verification
   returns what is wrong; the ``nonfinite`` policy decides: raise on every rank, or skip;
4. unpack: each component writes its section back with a fused op, then its ``after`` step
   (outer step, reset policy, AdaAlter's t' = 0);
5. schedule update (with ADPSGD's deviation, averaged over the ranks) and the counters.

Everything is written against :class:`~horovod_local.core.ops.SyncOps`, so the same code runs
eagerly (PyTorch) and inside a ``tf.function`` (TensorFlow).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

from horovod_local.core import protocol
from horovod_local.core.algorithms import (AverageState, Component, KeepState, ModelAverage,
                                           components_for)
from horovod_local.core.config import SyncConfig
from horovod_local.core.ops import Bucket, Counters, ParamSlot, SyncOps

__all__ = ["RoundPipeline", "ScheduleHook", "RoundResult", "LocalRoundResult",
           "local_components"]

_SKIP_SYNC = ": the model goes back to the last good average."


class ScheduleHook(Protocol):
    """The front end's view of the schedule at a round's end."""

    needs_deviation: bool

    def on_sync(self, *, step: Any, lr: Any, local_steps: Any, deviation: Any) -> None: ...


@dataclass
class RoundResult:
    """What a round returns: the summed control element (how many ranks have joined), and
    whether the round was written back (False: dropped under ``nonfinite='skip'``)."""

    joined: Any
    applied: Any


@dataclass
class LocalRoundResult:
    """A two-level local round's summed control elements over the group: how many of its
    ranks have joined (``joined``), how many want a global round next (``wants_global``)."""

    joined: Any
    wants_global: Any
    applied: Any


@dataclass
class InFlight:
    """An overlapped round on its way (``overlap=True``): the backend's handle, or, once
    settled (``state_dict()``, a loaded checkpoint), the summed buffers themselves."""

    handle: Any
    summed: Optional[list]
    control: tuple  # what this rank sent: (joined, round number, explicit)
    modulus: int
    step: Any
    layout: list  # (dtype name, sizes) per bucket: the completion must see the same layout


def _layout(buckets: Sequence[Bucket]) -> list:
    return [(b.dtype_name, list(b.sizes)) for b in buckets]


class _NoSchedule:
    needs_deviation = False

    def on_sync(self, **_: Any) -> None:
        pass


def local_components(config: SyncConfig) -> list[Component]:
    """A two-level local round: the parameters, and the inner state if it is averaged
    (SEMANTICS.md: no SlowMo / outer / AdaAlter / reset at this level)."""
    return [ModelAverage(), AverageState() if config.state_policy == "average" else KeepState()]


class RoundPipeline:
    """Runs rounds for one wrapper. ``components`` default to :func:`components_for`.

    Args:
        config: the wrapper's :class:`SyncConfig`.
        ops: the backend.
        counters: the wrapper's counters (``SyncStats`` fields).
        outer_step: ``step(anchors, grads)`` of the front end's outer optimizer (if any).
        reset_adaalter: the inner Local AdaAlter's ``reset_local_steps`` (if any).
    """

    def __init__(self, config: SyncConfig, ops: SyncOps, counters: Counters,
                 outer_step: Optional[Callable[[list, list], None]] = None,
                 reset_adaalter: Optional[Callable[[], Any]] = None) -> None:
        self.config, self.ops, self.counters = config, ops, counters
        self.components: list[Component] = components_for(config, outer_step, reset_adaalter)
        self.in_flight: Optional[InFlight] = None

    @classmethod
    def for_groups(cls, config: SyncConfig, ops: SyncOps, counters: Counters) -> "RoundPipeline":
        """The pipeline of two-level local rounds (``ops`` over the group's process set;
        ``counters`` mapping ``syncs``, ``bytes_sent``, ``local_steps`` to the local ones)."""
        pipe = cls.__new__(cls)
        pipe.config, pipe.ops, pipe.counters = config, ops, counters
        pipe.components = local_components(config)
        pipe.in_flight = None
        return pipe

    # ---- 1. plan ---------------------------------------------------------------------------
    def plan(self, slots: Sequence[ParamSlot], components: Optional[Sequence[Component]] = None
             ) -> list[Bucket]:
        """One bucket per dtype; sections fill in buffer order (component by component)."""
        ops, buckets = self.ops, {}

        def bucket_for(t: Any) -> Bucket:
            dtype, name = ops.dtype_of(t)
            if name not in buckets:
                buckets[name] = Bucket(dtype, name)
            return buckets[name]

        label = (lambda s: repr(s)) if ops.quote_names else (lambda s: s)
        for comp in (self.components if components is None else components):
            for slot in slots:
                comp.plan(ops, slot, bucket_for, label)
        out = list(buckets.values())
        if not out:
            raise TypeError("horovod_local: nothing to sync (no floating-point tensors)")
        out[protocol.control_bucket_index([b.dtype_name for b in out])].has_control = True
        return out

    # ---- 2. exchange -------------------------------------------------------------------------
    def exchange(self, buckets: Sequence[Bucket], control: Sequence[Any], what: str,
                 step: Any) -> tuple[list, list, int]:
        """Pack and sum over the ranks: (summed buffers, summed control elements, bytes
        sent). ``control``: this rank's (joined or round kind, round number, explicit)."""
        ops = self.ops
        bufs = [ops.pack(b, control) for b in buckets]
        summed = ops.allreduce_sum(buckets, bufs, what, step)
        b, s = next((b, s) for b, s in zip(buckets, summed) if b.has_control)
        ctrl = ops.elements(s, b.control_index(), len(control))
        nbytes = sum(ops.nbytes(buf) for buf in bufs)
        return summed, ctrl, nbytes

    # ---- 3. verify ---------------------------------------------------------------------------
    def check_round_kind(self, control_sum: Any, gradient_round: bool) -> Any:
        ok = protocol.round_kinds_agree(control_sum, self.ops.size(), gradient_round)
        return self.ops.check(ok, RuntimeError, lambda: self.ops.message(
            [protocol.ROUND_KIND_MISMATCH, " Summed control element: ", control_sum]))

    def round_number(self, buckets: Sequence[Bucket]) -> tuple[Any, int]:
        """(this rank's round number mod M, M): rounds entered before this one (syncs and
        dropped rounds; join rounds are syncs); M = 0 when the check is off."""
        b = next(b for b in buckets if b.has_control)
        wire = {"fp16": "float16", "int8": "float32"}.get(self.config.compression, b.dtype_name)
        m = protocol.round_modulus(wire, self.ops.size())
        if not m:
            return 0, 0
        rounds = self.counters.get("syncs") + self.counters.get("skipped_rounds")
        return self.ops.to_float(rounds % m), m

    def check_round_number(self, round_sum: Any, mine: Any, m: int) -> Any:
        if not m:
            return None
        n, ops = self.ops.size(), self.ops
        return ops.check(protocol.rounds_agree(round_sum, n, mine), RuntimeError,
                         lambda: ops.message(protocol.round_mismatch(mine, m, round_sum, n)))

    def verify_finite(self, buckets: Sequence[Bucket], summed: Sequence[Any], step: Any,
                      what: str, nonfinite: Optional[str] = None) -> Any:
        """Bool-like: every summed buffer is finite (the same on every rank). If not, raise
        naming the step and the first non-finite tensor (``nonfinite='raise'``), or warn and
        count a skipped round (``'skip'``) and return False, or just return False
        (``'quiet'``). ``nonfinite`` defaults to the configuration's."""
        ops = self.ops
        policy = nonfinite or self.config.nonfinite
        fast = ops.all_true([ops.proves_finite(b, s) for b, s in zip(buckets, summed)])
        if policy == "quiet":
            return ops.cond(fast, ops.true, lambda: ops.logical_not(ops.any_true(
                [ops.locate_nonfinite(b, s) >= 0 for b, s in zip(buckets, summed)])))

        def search() -> Any:
            msg, bad = None, None
            for b, s in zip(buckets, summed):
                idx = ops.locate_nonfinite(b, s)
                labels = list(b.labels) + ["the control elements"]
                m = ops.message([f"horovod_local: non-finite values (NaN/Inf) in the {what} at "
                                 "step ", step, ": the sum over ranks of ", ops.pick(labels, idx),
                                 " contains NaN/Inf, so at least one rank diverged. Nothing was "
                                 "written back."])
                b_bad = idx >= 0
                # the first bad bucket's message wins
                msg = m if msg is None else ops.cond(bad, lambda msg=msg: msg, lambda m=m: m)
                bad = b_bad if bad is None else ops.any_true([bad, b_bad])
            if policy == "raise":
                token = ops.check(ops.logical_not(bad), FloatingPointError, lambda: msg)
                return ops.after([token], lambda: ops.logical_not(bad))

            def report() -> Any:
                warned = ops.warn(msg, f" Skipping this {'round' if what == 'sync' else 'step'} "
                                       f"(nonfinite='skip')"
                                       + (_SKIP_SYNC if what == "sync" else "."))
                self.counters.add("skipped_rounds", 1)
                return ops.after([warned], ops.false)

            return ops.cond(bad, report, ops.true)

        return ops.cond(fast, ops.true, search)

    # ---- a warm-up round ---------------------------------------------------------------------
    def gradient_round(self, grads: Sequence[ParamSlot], step: Any,
                       nonfinite: Optional[str] = None) -> Any:
        """Average the gradients (``slot.value``) over the ranks, in place; returns bool-like
        "the step may be taken" (False: a rank sent NaN/Inf under ``nonfinite='skip'`` or
        ``'quiet'``: no rank takes this step). ``nonfinite`` overrides the configuration's
        (``'quiet'``: a GradScaler's overflow is no error)."""
        ops, t0 = self.ops, self.ops.now()
        buckets = self.plan(grads, [ModelAverage()])
        what = "warm-up gradient allreduce"
        summed, ctrl, nbytes = self.exchange(buckets, (protocol.GRADIENT_ROUND, 0, 0), what, step)
        self.counters.add("bytes_sent", nbytes)
        kind = self.check_round_kind(ctrl[0], gradient_round=True)
        ok = ops.after([kind], lambda: self.verify_finite(buckets, summed, step, what,
                                                          nonfinite))

        def apply() -> Any:
            # unconditionally: gradients are outputs, not state (a dropped step is not taken)
            for b, s in zip(buckets, summed):
                ops.unpack_average(s, b.params, 1.0 / ops.size(), 0)
            self.counters.add("sync_seconds", ops.now() - t0)
            return ok

        return ops.after([ok], apply)

    # ---- a sync round ------------------------------------------------------------------------
    def sync_round(self, slots: Sequence[ParamSlot], *, joined: Any, step: Any, lr: Any,
                   schedule: ScheduleHook, explicit: bool = False) -> RoundResult:
        """One round (every rank enters it once); ``joined``: this rank has joined (1.0 / 0.0);
        ``explicit``: an ``average_parameters()`` round (not scheduled, not a join round)."""
        ops, t0 = self.ops, self.ops.now()
        buckets = self.plan(slots)
        mine, m = self.round_number(buckets)
        summed, (ctrl, rounds, explicits), nbytes = self.exchange(
            buckets, (joined, mine, 1.0 if explicit else 0.0), "sync round", step)
        checks = self._round_checks(buckets, (ctrl, rounds, explicits), mine, m, explicit)
        ok = ops.after(checks, lambda: self.verify_finite(buckets, summed, step, "sync"))
        def apply() -> Any:
            return self._apply(slots, buckets, summed, step, lr, schedule, t0)

        if self.config.nonfinite == "raise":  # ok passed its check, or raised
            applied = ops.after([ok], apply)
        else:
            applied = ops.cond(ok, apply, lambda: self._drop(slots))
        self.counters.set("local_steps", 0)
        self.counters.add("bytes_sent", nbytes)
        return RoundResult(joined=ctrl, applied=applied)

    # ---- an overlapped round (overlap=True) --------------------------------------------------
    def overlapped_round(self, slots: Sequence[ParamSlot], *, step: Any, lr: Any,
                         schedule: ScheduleHook, start: bool = True) -> None:
        """A round boundary with ``overlap=True`` (SEMANTICS.md, "Overlapped rounds"): complete
        the round in flight, if any (checks, outer step, ``x = avg + (x - sent)``), pack the
        next send in the same pass, and (``start``) start its sum without waiting. With
        ``start=False`` (``join()``, ``average_parameters()``) only the completion runs."""
        ops, t0 = self.ops, self.ops.now()
        mode = self.config.compression
        buckets = self.plan(slots)
        prev, self.in_flight = self.in_flight, None
        if prev is None and not start:
            return
        fused = start and self._fused_fp16
        summed = None if prev is None else self._complete(prev, slots, buckets, step, lr,
                                                          schedule, fused)
        if not start:
            if mode is None:
                self._carry(buckets, summed)  # the next send is never started
            else:
                for b in buckets:
                    ops.carry(b.anchors, b.params, b.sent)
            self.counters.add("sync_seconds", ops.now() - t0)
            return
        if not schedule.needs_deviation:  # the flat case's boundaries (Increasing)
            schedule.on_sync(step=step, lr=lr, local_steps=self.counters.get("local_steps"),
                             deviation=None)
        mine, m = self.round_number(buckets)  # after the completion: it counts as a sync
        control = (0.0, mine, 0.0)
        if mode is None:
            if summed is None:
                bufs = [ops.pack(b, control) for b in buckets]
                for b in buckets:
                    ops.copy(b.sent + b.state_sent, b.params + b.states)
            else:
                bufs = summed
                for b, buf, g in zip(buckets, bufs, self._carry(buckets, bufs)):
                    ops.finish_pack(b, buf, g, control)
            handle = ops.allreduce_start(buckets, bufs, "overlapped sync round", step)
        else:
            bufs = self._delta_send(summed, buckets, control)
            handle = ops.compressed_start(mode, buckets, bufs, "overlapped sync round", step)
        self.in_flight = InFlight(handle, None, control, m, step, _layout(buckets))
        self.counters.set("local_steps", 0)
        self.counters.add("bytes_sent", sum(ops.nbytes(buf) for buf in bufs))
        self.counters.add("sync_seconds", ops.now() - t0)

    def settle(self) -> Optional[InFlight]:
        """Wait for the round in flight without applying it (``state_dict()``): afterwards it
        holds the summed buffers, which a checkpoint can store."""
        fl = self.in_flight
        if fl is not None and fl.summed is None:
            fl.summed, fl.handle = self._finish(fl.handle), None
        return fl

    def _complete(self, prev: InFlight, slots, buckets, step, lr, schedule,
                  fused: bool = False) -> list:
        """Phase 1 of a completion: wait, check, outer step; returns the summed buffers."""
        ops, n = self.ops, self.ops.size()
        summed = prev.summed if prev.summed is not None else self._finish(prev.handle)
        if _layout(buckets) != prev.layout:
            raise RuntimeError("horovod_local: the synced tensors changed while an overlapped "
                               "round was in flight (inner optimizer state created since?); "
                               "with overlap=True, create the optimizer state before the first "
                               "round (a first step) or use state_policy='keep'/'reset'")
        self._round_checks(buckets, self._control_sums(buckets, summed), prev.control[1],
                           prev.modulus, explicit=False)
        self.verify_finite(buckets, summed, prev.step, "sync")  # 'raise' (config refuses skip)
        mode = self.config.compression
        scale = self._delta_scale if mode else 1.0 / n
        need_dev = bool(schedule.needs_deviation)
        deviation = 0.0
        for bk, buf in zip(buckets, summed):
            if need_dev:
                deviation += (ops.delta_deviation(buf, bk.sent, bk.anchors, scale, 0) if mode
                              else ops.overlap_deviation(buf, bk.params, bk.sent, scale, 0))
            if mode:
                if not fused:  # else the fused carry-and-send completes it
                    self.components[0].complete_delta(ops, bk, buf, scale)
                continue
            offset = 0
            for comp, section in zip(self.components, bk.sections()):
                comp.complete(ops, bk, buf, scale, offset)
                offset += bk.section_numel(section)
        # ADPSGD updates at this completion; other schedules moved when the round started
        self._end_round(slots, step, lr, schedule, deviation, None, carry=True)
        return list(summed)

    @property
    def _fused_fp16(self) -> bool:
        """Overlapped fp16 model averaging: completion, carry and send in one kernel pass."""
        return self.config.compression == "fp16" and isinstance(self.components[0],
                                                                ModelAverage)

    def _finish(self, handle: Any) -> list:
        if self.config.compression is None:
            return self.ops.allreduce_finish(handle)
        return self.ops.compressed_finish(handle)

    @property
    def _delta_scale(self) -> float:
        """What turns a finished compressed exchange into the mean delta: the fp16 sum times
        1/n; the int8 exchange arrives as the mean."""
        return 1.0 / self.ops.size() if self.config.compression == "fp16" else 1.0

    def _delta_send(self, summed, buckets, control) -> list:
        """Overlapped compressed rounds, after the completion of the round in ``summed`` (None:
        the first round): ``x = T(c + (x - sent))``, then this round's compressed send
        (``sent = x``)."""
        ops, mode = self.ops, self.config.compression
        if summed is not None and self._fused_fp16:  # (_complete left c to this pass)
            for b, buf in zip(buckets, summed):
                ops.finish_pack(b, buf, [ops.overlap_delta_send_fp16(b, buf, self._delta_scale)],
                                control)
            return summed
        for b in buckets:
            if summed is None:
                ops.copy(b.sent, b.params)
            else:
                ops.carry(b.anchors, b.params, b.sent)
        return [ops.compress(mode, b, control) for b in buckets]

    # ---- a compressed blocking round ----------------------------------------------------------
    def compressed_round(self, slots: Sequence[ParamSlot], *, joined: Any, step: Any, lr: Any,
                         schedule: ScheduleHook, explicit: bool = False) -> RoundResult:
        """A blocking round with ``compression`` (SEMANTICS.md, "Compressed syncs"): each rank
        sends its change since the common point c with error feedback; ``x_avg = c + mean
        delta``, then the algorithm."""
        ops, t0, mode = self.ops, self.ops.now(), self.config.compression
        buckets = self.plan(slots)
        mine, m = self.round_number(buckets)
        control = (joined, mine, 1.0 if explicit else 0.0)
        wire = [ops.compress(mode, b, control) for b in buckets]
        nbytes = sum(ops.nbytes(w) for w in wire)
        summed = ops.compressed_finish(
            ops.compressed_start(mode, buckets, wire, "sync round", step))
        scale = self._delta_scale
        sums = self._control_sums(buckets, summed)
        self._round_checks(buckets, sums, mine, m, explicit)
        self.verify_finite(buckets, summed, step, "sync")  # 'raise' (config refuses skip)
        deviation = 0.0
        for bk, buf in zip(buckets, summed):
            if schedule.needs_deviation:
                deviation += ops.delta_deviation(buf, bk.params, bk.anchors, scale, 0)
            self.components[0].apply_delta(ops, bk, buf, scale)
        self._end_round(slots, step, lr, schedule, deviation, t0)
        self.counters.set("local_steps", 0)
        self.counters.add("bytes_sent", nbytes)
        return RoundResult(joined=sums[0], applied=ops.true())

    def _carry(self, buckets, bufs) -> list:
        """Phase 2: ``x = avg + (x - sent)`` (or ``x0 + (x - sent)``) and the next pack, one
        pass per section; returns each bucket's guard."""
        scale, guards = 1.0 / self.ops.size(), []
        for bk, buf in zip(buckets, bufs):
            offset, gs = 0, []
            for comp, section in zip(self.components, bk.sections()):
                g = comp.carry(self.ops, bk, buf, scale, offset)
                if g is not None:
                    gs.append(g)
                offset += bk.section_numel(section)
            guards.append(gs)
        return guards

    def local_round(self, slots: Sequence[ParamSlot], *, joined: Any, wants_global: Any,
                    step: Any) -> LocalRoundResult:
        """A two-level local round over the group (:meth:`for_groups`). Control elements:
        (joined, round number, wants a global round next); the sums decide, identically on the
        group's ranks, whether a global round follows (SEMANTICS.md, "Two-level averaging")."""
        ops, t0 = self.ops, self.ops.now()
        buckets = self.plan(slots)
        mine, m = self.round_number(buckets)
        summed, (ctrl, rounds, wants), nbytes = self.exchange(
            buckets, (joined, mine, wants_global), "local round", step)
        checks = [self.check_round_kind(ctrl, gradient_round=False),
                  self.check_round_number(rounds, mine, m)]
        ok = ops.after(checks, lambda: self.verify_finite(buckets, summed, step, "sync"))

        def apply() -> Any:
            return self._apply(slots, buckets, summed, step, None, _NoSchedule(), t0)

        if self.config.nonfinite == "raise":
            applied = ops.after([ok], apply)
        else:
            applied = ops.cond(ok, apply, lambda: self._drop(slots))
        self.counters.set("local_steps", 0)
        self.counters.add("bytes_sent", nbytes)
        return LocalRoundResult(joined=ctrl, wants_global=wants, applied=applied)

    def _round_checks(self, buckets, control_sums, mine, m, explicit: bool) -> list:
        """A sync round's checks of the summed control elements (same kind of round, same
        round number, all or none explicit) and the components' own; returns the tokens."""
        ops, n = self.ops, self.ops.size()
        ctrl, rounds, explicits = control_sums
        checks = [self.check_round_kind(ctrl, gradient_round=False),
                  self.check_round_number(rounds, mine, m),
                  ops.check(protocol.explicit_rounds_agree(explicits, ctrl, n, explicit),
                            RuntimeError, lambda: protocol.EXPLICIT_MISMATCH)]
        for comp in self.components:
            checks += comp.check(ops, buckets)
        return checks

    def _control_sums(self, buckets, summed) -> list:
        b = next(b for b in buckets if b.has_control)
        return self.ops.elements(summed[buckets.index(b)], b.control_index(), 3)

    def _end_round(self, slots, step, lr, schedule: ScheduleHook, deviation, t0,
                   carry: bool = False) -> None:
        """After the unpack: the components' after steps, the schedule update (with the
        deviation averaged over the ranks, if the schedule wants it) and the counters."""
        ops, need_dev = self.ops, bool(schedule.needs_deviation)
        for comp in self.components:
            comp.after(ops, slots, carry=carry)
        if need_dev:
            deviation = ops.mean_scalar(deviation)
            self.counters.set("last_deviation", deviation)
        if need_dev or not carry:  # overlapped: other schedules moved when the round started
            schedule.on_sync(step=step, lr=lr, local_steps=self.counters.get("local_steps"),
                             deviation=deviation if need_dev else None)
        self.counters.add("syncs", 1)
        if t0 is not None:  # (an overlapped round counts its time at its boundary)
            self.counters.add("sync_seconds", ops.now() - t0)

    def _apply(self, slots, buckets, summed, step, lr, schedule: ScheduleHook, t0) -> Any:
        """4.-5.: write the average back, run the components' after steps, update the schedule."""
        ops, cfg = self.ops, self.config
        need_dev = bool(schedule.needs_deviation)
        scale = 1.0 / ops.size()
        deviation = ops.scalar(0.0)
        for b, s in zip(buckets, summed):
            offset = 0
            for comp, section in zip(self.components, b.sections()):
                d = comp.unpack(ops, b, s, scale, offset, need_dev)
                if d is not None:
                    deviation = deviation + d
                offset += b.section_numel(section)
        self._end_round(slots, step, lr, schedule, deviation, t0)
        if cfg.nonfinite == "skip":
            ops.copy([sl.last_good for sl in slots], [sl.value for sl in slots])
        return ops.true()

    def _drop(self, slots) -> Any:
        """A round dropped under ``nonfinite='skip'``: every rank back to the last good average,
        and no state that may hold the NaN (SlowMo / outer state is untouched)."""
        ops = self.ops
        ops.copy([sl.value for sl in slots], [sl.last_good for sl in slots])
        for comp in self.components:
            comp.restore(ops, slots)
        return ops.false()

    def remember_good(self, slots: Sequence[ParamSlot]) -> None:
        """``nonfinite='skip'``: the parameters now are the last good average."""
        self.ops.copy([sl.last_good for sl in slots], [sl.value for sl in slots])
