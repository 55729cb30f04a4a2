"""One class per algorithm and per state policy: what each puts into a round's buffers
(``plan``) and what it does when the sum comes back (``unpack``, then ``after``), written once
against :class:`~horovod_local.core.ops.SyncOps`.

A round combines exactly one :class:`Algorithm` (what happens to the parameters), one
:class:`StatePolicy` (the inner optimizer's state) and, for Local AdaAlter, an
:class:`AdaAlterDenominators`. Adding an algorithm: one subclass here (plus, at most, one fused
unpack op per backend) and one line in :func:`components_for`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from horovod_local.core.config import SyncConfig
from horovod_local.core.ops import Bucket, ParamSlot, SyncOps

__all__ = ["Algorithm", "ModelAverage", "SlowMo", "OuterOptimizer", "StatePolicy", "KeepState",
           "ResetState", "AverageState", "AdaAlterDenominators", "components_for"]


class Component:
    """Base of everything that takes part in a round. Every hook is optional."""

    def plan(self, ops: SyncOps, slot: ParamSlot, bucket_for: Callable[[Any], Bucket],
             label: Callable[[str], str]) -> None:
        """Add what this component sends (and keeps parallel to the parameters) for ``slot``."""

    def check(self, ops: SyncOps, buckets: Sequence[Bucket]) -> list:
        """Checks before anything is written back; returns tokens (see ``SyncOps.check``)."""
        return []

    def unpack(self, ops: SyncOps, bucket: Bucket, buf: Any, scale: float, offset: int,
               need_deviation: bool) -> Optional[Any]:
        """Write this component's section back; may return the deviation sum."""
        return None

    def after(self, ops: SyncOps, slots: Sequence[ParamSlot], carry: bool = False) -> None:
        """Once every bucket is unpacked (``carry``: in an overlapped round, before
        :meth:`carry`)."""

    def complete(self, ops: SyncOps, bucket: Bucket, buf: Any, scale: float,
                 offset: int) -> None:
        """Overlapped rounds, phase 1 (before ``after``): what must read the sum before the
        carry pass overwrites it (the pseudo-gradient)."""

    def carry(self, ops: SyncOps, bucket: Bucket, buf: Any, scale: float, offset: int) -> Any:
        """Overlapped rounds, phase 2: write the average plus the local progress made while
        the round travelled (``x = avg + (x - sent)``), and pack the next send into this
        section in the same pass; returns the section's guard (None: nothing travels)."""
        return None

    def restore(self, ops: SyncOps, slots: Sequence[ParamSlot]) -> None:
        """A dropped round (``nonfinite='skip'``): forget what may hold the NaN."""


# ---- algorithms: the parameters' section ----------------------------------------------------
class Algorithm(Component):
    """Plans every parameter into its dtype's bucket (the first section)."""

    def plan(self, ops, slot, bucket_for, label):
        b = bucket_for(slot.value)
        b.add(b.params, slot.value, label(slot.name), ops.numel(slot.value))
        b.sent.append(slot.sent)
        if slot.residual is not None:
            b.residuals.append(slot.residual)
        self.plan_parallel(b, slot)

    def plan_parallel(self, bucket: Bucket, slot: ParamSlot) -> None:
        """What stays home, parallel to the parameter (anchors, momenta...)."""

    # compressed syncs: the buffer holds a delta from the common point c (the anchor)
    def apply_delta(self, ops: SyncOps, bucket: Bucket, buf: Any, scale: float) -> None:
        """A blocking compressed round: ``x_avg = c + delta``, then the algorithm."""
        raise NotImplementedError

    def complete_delta(self, ops: SyncOps, bucket: Bucket, buf: Any, scale: float) -> None:
        """An overlapped compressed round's completion, before ``after`` and the carry."""
        raise NotImplementedError


class ModelAverage(Algorithm):
    """Local SGD: every parameter becomes the average ``x_avg``."""

    def unpack(self, ops, bucket, buf, scale, offset, need_deviation):
        if need_deviation:
            return ops.unpack_average_deviation(buf, bucket.params, scale, offset)
        ops.unpack_average(buf, bucket.params, scale, offset)
        return None

    def carry(self, ops, bucket, buf, scale, offset):
        return ops.overlap_average_pack(buf, bucket.params, bucket.sent, scale, offset)

    def plan_parallel(self, bucket, slot):
        if slot.anchor is not None:  # compression: the common point c
            bucket.anchors.append(slot.anchor)

    def apply_delta(self, ops, bucket, buf, scale):
        ops.unpack_delta_average(buf, bucket.params, bucket.anchors, scale, 0)

    def complete_delta(self, ops, bucket, buf, scale):
        ops.add_delta(bucket.anchors, buf, scale, 0)


class _Anchored(Algorithm):
    """Overlapped rounds of an algorithm with anchors: the outer step on the delayed
    pseudo-gradient ``x0 - avg(sent)``, then ``x = x0 + (x - sent)`` packed in one pass."""

    def complete(self, ops, bucket, buf, scale, offset):
        ops.unpack_pseudo_grad(buf, bucket.params, bucket.anchors, bucket.grads, scale, offset)

    def carry(self, ops, bucket, buf, scale, offset):
        return ops.carry_pack(bucket.anchors, bucket.params, bucket.sent, buf, offset)

    def complete_delta(self, ops, bucket, buf, scale):
        ops.delta_pseudo_grad(buf, bucket.anchors, bucket.grads, scale, 0)

    def apply_delta(self, ops, bucket, buf, scale):
        self.complete_delta(ops, bucket, buf, scale)


class SlowMo(_Anchored):
    """SlowMo (Wang et al. 2020): ``u = beta u + (x0 - x_avg) / lr; x0 -= alpha lr u; x = x0``
    (``alpha * lr`` in float64, then rounded; see SEMANTICS.md)."""

    def __init__(self, alpha: float, beta: float) -> None:
        self.alpha, self.beta = float(alpha), float(beta)

    def plan_parallel(self, bucket, slot):
        bucket.anchors.append(slot.anchor)
        bucket.momenta.append(slot.momentum)
        bucket.lrs.append(slot.lr)
        bucket.grads.append(slot.pseudo_grad)  # overlapped rounds only (else None)

    def check(self, ops, buckets):
        lrs = [lr for b in buckets for lr in b.lrs]
        if not lrs:
            return []
        ok = ops.all_true([lr > 0 for lr in lrs])
        return [ops.check(ok, ValueError, lambda: ops.message(
            ["SlowMo divides the pseudo-gradient by the lr; got lr=", lrs[0]]))]

    def unpack(self, ops, bucket, buf, scale, offset, need_deviation):
        return ops.unpack_slowmo(buf, bucket.params, bucket.anchors, bucket.momenta, scale,
                                 bucket.lrs, self.alpha, self.beta, offset)

    def complete(self, ops, bucket, buf, scale, offset):
        super().complete(ops, bucket, buf, scale, offset)
        ops.slowmo_step(bucket.anchors, bucket.momenta, bucket.grads, bucket.lrs, self.alpha,
                        self.beta)

    def complete_delta(self, ops, bucket, buf, scale):
        super().complete_delta(ops, bucket, buf, scale)
        ops.slowmo_step(bucket.anchors, bucket.momenta, bucket.grads, bucket.lrs, self.alpha,
                        self.beta)

    def apply_delta(self, ops, bucket, buf, scale):
        self.complete_delta(ops, bucket, buf, scale)
        ops.copy(bucket.params, bucket.anchors)  # x = T(x0)


class OuterOptimizer(_Anchored):
    """Any outer optimizer on the pseudo-gradient ``x0 - x_avg`` (DiLoCo): the fused unpack
    writes the gradient next to each anchor, ``step()`` runs the front end's optimizer over the
    anchors, and every parameter becomes its anchor."""

    def __init__(self, step: Callable[[list, list], None]) -> None:
        self.step = step  # step(anchors, grads): the front end's outer optimizer

    def plan_parallel(self, bucket, slot):
        bucket.anchors.append(slot.anchor)
        bucket.grads.append(slot.pseudo_grad)

    def unpack(self, ops, bucket, buf, scale, offset, need_deviation):
        return ops.unpack_pseudo_grad(buf, bucket.params, bucket.anchors, bucket.grads, scale,
                                      offset)

    def after(self, ops, slots, carry=False):
        self.step([s.anchor for s in slots], [s.pseudo_grad for s in slots])
        if not carry:  # overlapped: the carry pass writes x = x0 + (x - sent)
            ops.copy([s.value for s in slots], [s.anchor for s in slots])


# ---- inner optimizer state policies: the second section ---------------------------------------
class StatePolicy(Component):
    """What a sync does to the inner optimizer's state tensors of the parameters' shape."""

    def restore(self, ops, slots):
        ops.zero([s for slot in slots for s in slot.states])


class KeepState(StatePolicy):
    """``'keep'``: local state is left as it is."""


class ResetState(StatePolicy):
    """``'reset'``: zeroed at every sync."""

    def after(self, ops, slots, carry=False):
        ops.zero([s for slot in slots for s in slot.states])


class AverageState(StatePolicy):
    """``'average'``: averaged over the ranks in the same buffers."""

    def plan(self, ops, slot, bucket_for, label):
        for s, name in zip(slot.states, slot.state_names):
            b = bucket_for(s)
            b.add(b.states, s, f"inner optimizer state {label(name)}", ops.numel(s))
        for s, sent in zip(slot.states, slot.states_sent):
            bucket_for(s).state_sent.append(sent)

    def unpack(self, ops, bucket, buf, scale, offset, need_deviation):
        if bucket.states:
            ops.unpack_average(buf, bucket.states, scale, offset)
        return None

    def carry(self, ops, bucket, buf, scale, offset):
        if not bucket.states:
            return None
        return ops.overlap_average_pack(buf, bucket.states, bucket.state_sent, scale, offset)


# ---- Local AdaAlter: the third section ----------------------------------------------------------
class AdaAlterDenominators(Component):
    """Local AdaAlter: at a sync ``B2 = mean_i A2_i; A2 = B2; t' = 0``."""

    def __init__(self, reset_local_steps: Callable[[], Any]) -> None:
        self.reset_local_steps = reset_local_steps  # the inner optimizer's t' = 0

    def plan(self, ops, slot, bucket_for, label):
        b = bucket_for(slot.accumulator)
        b.add(b.accumulators, slot.accumulator, f"AdaAlter accumulator of {label(slot.name)}",
              ops.numel(slot.accumulator))
        b.denominators.append(slot.denominator)

    def unpack(self, ops, bucket, buf, scale, offset, need_deviation):
        if bucket.accumulators:
            ops.unpack_adaalter(buf, bucket.accumulators, bucket.denominators, scale, offset)
        return None

    def after(self, ops, slots, carry=False):
        self.reset_local_steps()

    def restore(self, ops, slots):
        # B2 is the last shared (good) denominator
        ops.copy([s.accumulator for s in slots], [s.denominator for s in slots])
        self.reset_local_steps()


def components_for(config: SyncConfig, outer_step: Optional[Callable[[list, list], None]] = None,
                   reset_adaalter: Optional[Callable[[], Any]] = None) -> list[Component]:
    """The round's components in buffer order: algorithm, state policy, AdaAlter."""
    if config.has_outer:
        if outer_step is None:
            raise ValueError("an outer optimizer needs the front end's outer step")
        algorithm: Algorithm = OuterOptimizer(outer_step)
    elif config.algorithm == "slowmo":
        algorithm = SlowMo(config.slowmo_lr, config.slowmo_momentum)
    else:
        algorithm = ModelAverage()
    policy = {"keep": KeepState, "reset": ResetState, "average": AverageState}[
        config.state_policy]()
    out: list[Component] = [algorithm, policy]
    if config.adaalter:
        if reset_adaalter is None:
            raise ValueError("Local AdaAlter needs the front end's reset_local_steps")
        out.append(AdaAlterDenominators(reset_adaalter))
    return out
