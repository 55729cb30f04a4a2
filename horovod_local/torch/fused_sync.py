"""One sync round: pack everything into one buffer per dtype, ONE allreduce each, fused unpack.

The pipeline (``FusedSync.run``) is a sequence of small steps: plan the buckets, pack, allreduce
(op=Sum), check the control element and finiteness (from a guard element the pack computed),
unpack with the algorithm's math fused in
(``horovod_local.torch._kernels``: C++/CUDA, or a PyTorch fallback).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from horovod_local.torch import _kernels as K

from horovod_local.sync_protocol import (
    GRADIENT_ROUND, ROUND_KIND_MISMATCH, SYNC_NAME, control_bucket_index, round_kinds_agree)

__all__ = ["GRADIENT_ROUND", "Bucket", "FusedSync", "check_round_kinds"]


def check_round_kinds(control_sum: float, n: int, gradient_round: bool) -> None:
    if not round_kinds_agree(control_sum, n, gradient_round):
        raise RuntimeError(ROUND_KIND_MISMATCH)


@dataclass
class Bucket:
    """The tensors of one dtype that travel in one buffer, by role, in buffer order."""

    dtype: torch.dtype
    params: list = field(default_factory=list)  # parameters (or gradients in warm-up)
    names: list = field(default_factory=list)
    anchors: list = field(default_factory=list)  # SlowMo / outer x0, parallel to params
    momenta: list = field(default_factory=list)  # SlowMo u
    grads: list = field(default_factory=list)  # outer-optimizer pseudo-gradients
    lrs: list = field(default_factory=list)  # per-parameter lr (SlowMo)
    states: list = field(default_factory=list)  # inner-optimizer state tensors to average
    accumulators: list = field(default_factory=list)  # AdaAlter A2
    denominators: list = field(default_factory=list)  # AdaAlter B2
    has_control: bool = False

    def data_numel(self) -> int:
        return sum(t.numel() for t in self.params + self.states + self.accumulators)

    def numel(self) -> int:
        """Buffer length: the data, the control element (if this bucket has it), the guard."""
        return self.data_numel() + int(self.has_control) + 1


class FusedSync:
    """Packs, allreduces and unpacks buckets; owns the reusable flat buffers."""

    def __init__(self, process_set) -> None:
        self.process_set = process_set
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def _buffer(self, dtype: torch.dtype, numel: int, device: torch.device) -> torch.Tensor:
        buf = self._buffers.get(dtype)
        if buf is None or buf.numel() != numel or buf.device != device:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[dtype] = buf
        return buf

    @staticmethod
    def assign_control(buckets: list[Bucket]) -> None:
        i = control_bucket_index([str(b.dtype).replace("torch.", "") for b in buckets])
        buckets[i].has_control = True

    def pack(self, b: Bucket, control: float = 0.0) -> torch.Tensor:
        """The bucket's buffer: [params | states | accumulators | control? | guard]."""
        device = b.params[0].device if b.params else (b.states + b.accumulators)[0].device
        buf = self._buffer(b.dtype, b.numel(), device)
        off, guard = 0, 0.0
        for group in (b.params, b.states, b.accumulators):
            g = K.pack(group, buf, off)
            guard = g if math.isnan(g) else max(guard, g)
            off += sum(t.numel() for t in group)
        if b.has_control:
            buf[off] = control
        buf[-1] = guard  # exact: the guard is |x| of one element of this dtype (or NaN)
        return buf

    def allreduce(self, buckets: list[Bucket], control: float = 0.0) -> tuple[list[torch.Tensor], float, int]:
        """Pack and sum over ranks. Returns (buffers, summed control, bytes sent)."""
        import horovod.torch as hvd

        bufs, handles, nbytes = [], [], 0
        for b in buckets:
            buf = self.pack(b, control)
            bufs.append(buf)
            nbytes += buf.numel() * buf.element_size()
            handles.append(hvd.allreduce_async_(buf, name=SYNC_NAME.format(str(b.dtype)[6:]),
                                                op=hvd.Sum, process_set=self.process_set))
        for h in handles:
            hvd.synchronize(h)
        summed_control = 0.0
        for b, buf in zip(buckets, bufs):
            if b.has_control:
                summed_control = float(buf[-2])
        return bufs, summed_control, nbytes

    @staticmethod
    def check_finite(buckets: list[Bucket], bufs: list[torch.Tensor], step: int) -> None:
        """Raise if the sum holds NaN/Inf (then some rank sent one, or the sum overflowed); all
        ranks see the same sum, so all raise together, before anything is written back.

        The fast path reads one element per bucket: the summed guard ``G = sum_r max|x_r|``
        bounds every summed element, ``|sum_r x_r| <= G``, so a finite ``G`` well inside the
        dtype's range proves the whole buffer finite (the margin covers the different rounding
        orders of the allreduce). Only otherwise is the buffer searched, tensor by tensor.
        """
        for b, buf in zip(buckets, bufs):
            guard = float(buf[-1])
            if math.isfinite(guard) and guard <= torch.finfo(b.dtype).max / 2:
                continue
            data = buf[: b.data_numel()]
            if bool(torch.isfinite(data).all()):
                continue  # a large but finite sum (e.g. float16 near its range): go on
            off = 0
            for name, t in zip(b.names, b.params):
                seg = data[off: off + t.numel()]
                if not bool(torch.isfinite(seg).all()):
                    raise FloatingPointError(
                        f"horovod_local: non-finite values in the sync at step {step}: the sum over "
                        f"ranks of {name!r} contains NaN/Inf, so at least one rank diverged. "
                        f"Nothing was written back.")
                off += t.numel()
            raise FloatingPointError(
                f"horovod_local: non-finite values in the sync at step {step} in optimizer state "
                f"({b.dtype}); at least one rank diverged. Nothing was written back.")

    @staticmethod
    def unpack_gradients(buckets: list[Bucket], bufs: list[torch.Tensor], n: int) -> None:
        for b, buf in zip(buckets, bufs):
            K.unpack_average(buf, b.params, 1.0 / n, 0)

    @staticmethod
    def unpack(buckets: list[Bucket], bufs: list[torch.Tensor], n: int, algorithm: str,
               slowmo_lr: float, slowmo_momentum: float, need_deviation: bool) -> float:
        """Write the round's result back; returns sum ||x_avg - x_i||^2 over parameters
        (measured by the local-SGD path only if ``need_deviation``; SlowMo/outer always)."""
        scale = 1.0 / n
        deviation = 0.0
        for b, buf in zip(buckets, bufs):
            off = 0
            if algorithm == "local_sgd" and need_deviation:
                deviation += K.unpack_average_deviation(buf, b.params, scale, off)
            elif algorithm == "local_sgd":
                K.unpack_average(buf, b.params, scale, off)
            elif algorithm == "slowmo":
                deviation += K.unpack_slowmo(buf, b.params, b.anchors, b.momenta, scale, b.lrs,
                                             slowmo_lr, slowmo_momentum, off)
            elif algorithm == "outer":
                deviation += K.unpack_pseudo_grad(buf, b.params, b.anchors, b.grads, scale, off)
            else:  # pragma: no cover - validated at construction
                raise AssertionError(algorithm)
            off += sum(t.numel() for t in b.params)
            if b.states:
                K.unpack_average(buf, b.states, scale, off)
                off += sum(t.numel() for t in b.states)
            if b.accumulators:
                K.unpack_adaalter(buf, b.accumulators, b.denominators, scale, off)
        return deviation
