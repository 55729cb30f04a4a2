"""The PyTorch backend of the sync pipeline (:class:`horovod_local.core.ops.SyncOps`): eager
ops on the C++/CUDA kernels or their PyTorch fallback (``_kernels``), Horovod collectives, and
Python control flow (a failed check raises).

Buffer layout per dtype: ``[params | states | accumulators | control? | guard]``. The guard is
the sending rank's ``max |x|`` over what it packed (NaN if any element is NaN/Inf), computed by
the pack in its copy pass. After the Sum the summed guard ``G = sum_r max|x_r|`` bounds every
summed element, so a finite ``G`` well inside the dtype's range proves the whole buffer finite
from one read (the margin covers the allreduce's rounding orders); only otherwise is it
searched.
"""
from __future__ import annotations

import contextlib
import math
import os
import pickle
import sys
import threading
import time
import warnings
from typing import Any, Iterator, Optional, Sequence

import torch

from horovod_local.core import protocol
from horovod_local.core.ops import Bucket, SyncOps
from horovod_local.peer_failure import reporting_lost_ranks
from horovod_local.torch import _kernels as K

__all__ = ["TorchOps", "allgather_object", "FLOAT_DTYPES"]


def _hvd():
    """``horovod.torch``, imported on first use: the kernels, the core and the docs import this
    package without starting Horovod."""
    import horovod.torch as hvd

    return hvd

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_NAMES = {d: str(d).replace("torch.", "") for d in FLOAT_DTYPES}


class TorchOps(SyncOps):
    """Eager PyTorch ops over one Horovod process set; owns the reusable flat buffers."""

    quote_names = True

    def __init__(self, process_set: Any) -> None:
        self.process_set = process_set
        self._size = process_set.size() if process_set is not None else 1  # fixed per set
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    # ---- tensors ------------------------------------------------------------------------------
    def dtype_of(self, t):
        name = _DTYPE_NAMES.get(t.dtype)
        if name is None:
            raise TypeError(f"horovod_local syncs floating-point tensors only, got {t.dtype}")
        return t.dtype, name

    def numel(self, t):
        return t.numel()

    def size(self):
        return self._size

    def now(self):
        return time.perf_counter()

    # ---- buffers --------------------------------------------------------------------------------
    def _buffer(self, dtype: torch.dtype, numel: int, device: torch.device,
                key: Any = None) -> torch.Tensor:
        key = dtype if key is None else key
        buf = self._buffers.get(key)
        if buf is None or buf.numel() != numel or buf.device != device or buf.dtype != dtype:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf

    def pack(self, bucket: Bucket, control: Sequence[Any]) -> torch.Tensor:
        tensors = [t for sec in bucket.sections() for t in sec]
        n = bucket.data_numel()
        buf = self._buffer(bucket.dtype, n + bucket.control_numel() + 1, tensors[0].device)
        guard = K.pack(tensors, buf, 0)  # one pass: copy + max |x|
        if bucket.has_control:
            for i, c in enumerate(control):
                buf[n + i] = c
        buf[-1] = guard  # exact: |x| of one element of this dtype (or NaN)
        return buf

    def _start_sums(self, buckets, bufs) -> tuple[list, list]:
        """One summing ``allreduce_async_`` per buffer: (handles, wire tensors). Horovod 0.28's
        torch ops have no bfloat16: such a buffer travels as float32 (exact), summed there and
        rounded once on the way back (:meth:`_wait_sums`)."""
        hvd = _hvd()
        wire = [buf.float() if buf.dtype == torch.bfloat16 else buf for buf in bufs]
        handles = [hvd.allreduce_async_(w, name=protocol.SYNC_NAME.format(b.dtype_name),
                                        op=hvd.Sum, process_set=self.process_set)
                   for b, w in zip(buckets, wire)]
        return handles, wire

    @staticmethod
    def _wait_sums(handles, bufs, wire) -> list:
        hvd = _hvd()
        for h in handles:
            hvd.synchronize(h)
        for buf, w in zip(bufs, wire):
            if w is not buf:
                buf.copy_(w)
        return list(bufs)

    def allreduce_sum(self, buckets, bufs, what, step):
        hvd = _hvd()
        with self.naming_lost_ranks(f"the {what} at step {step}"), \
                round_watchdog(f"the {what} at step {step}", hvd.rank(), self.ranks()):
            handles, wire = self._start_sums(buckets, bufs)
            return self._wait_sums(handles, bufs, wire)

    def allreduce_start(self, buckets, bufs, what, step):
        with self.naming_lost_ranks(f"the start of the {what} at step {step}"):
            handles, wire = self._start_sums(buckets, bufs)
        return handles, list(bufs), wire, what, step

    def allreduce_finish(self, handle):
        hvd = _hvd()
        handles, bufs, wire, what, step = handle
        with self.naming_lost_ranks(f"the {what} started at step {step}"), \
                round_watchdog(f"the {what} started at step {step}", hvd.rank(), self.ranks()):
            return self._wait_sums(handles, bufs, wire)

    def finish_pack(self, bucket, buf, guard, control):
        n = bucket.data_numel()
        if bucket.has_control:
            for i, c in enumerate(control):
                buf[n + i] = c
        if guard is not None:
            g = max(guard, default=0.0) if all(math.isfinite(x) for x in guard) else math.nan
            buf[-1] = g

    def overlap_average_pack(self, buf, tensors, sent, scale, offset):
        return K.overlap_average_pack(buf, tensors, sent, scale, offset)

    def carry_pack(self, bases, tensors, sent, buf, offset):
        return K.carry_pack(bases, tensors, sent, buf, offset)

    def overlap_deviation(self, buf, tensors, sent, scale, offset):
        total, off = 0.0, offset
        acc = K.state_dtype(buf.dtype)
        inv = torch.tensor(scale, dtype=acc)
        for t, s in zip(tensors, sent):
            k = t.numel()
            avg = (buf[off: off + k].to(acc) * inv).to(t.dtype)
            total += float(((avg.double() - s.reshape(-1).double()) ** 2).sum())
            off += k
        return total

    # ---- compressed syncs ----------------------------------------------------------------------
    # fp16: the bucket's float16 buffer [q | control | guard], summed by an allreduce.
    # int8: one uint8 payload per rank [scales (acc) | control (3 x float32, 16 bytes) | q],
    # allgathered; the mean delta is rebuilt in an acc buffer [delta | control sums | guard].
    def _int8_layout(self, bucket: Bucket) -> tuple[int, int, int, torch.dtype]:
        acc = K.state_dtype(bucket.dtype)
        nb = K.int8_num_blocks(bucket.sizes)
        s_bytes = nb * torch.finfo(acc).bits // 8
        return nb, s_bytes, s_bytes + 16 + bucket.data_numel(), acc

    def compress(self, mode, bucket, control):
        params, n = bucket.params, bucket.data_numel()
        dev = params[0].device
        if mode == "fp16":
            buf = self._buffer(torch.float16, n + bucket.control_numel() + 1, dev,
                               key=("fp16", bucket.dtype_name))
            guard = K.pack_delta_fp16(params, bucket.anchors, bucket.residuals, buf, 0)
            self.finish_pack(bucket, buf, [guard], control)
            return buf
        nb, s_bytes, total, acc = self._int8_layout(bucket)
        buf = self._buffer(torch.uint8, total, dev, key=("int8", bucket.dtype_name))
        K.quantize_int8(params, bucket.anchors, bucket.residuals,
                        buf[s_bytes + 16:].view(torch.int8), buf[:s_bytes].view(acc), 0, 0)
        ctrl = buf[s_bytes: s_bytes + 12].view(torch.float32)
        ctrl.copy_(torch.tensor(list(control) if bucket.has_control else [0.0] * 3,
                                dtype=torch.float32))
        return buf

    def compressed_start(self, mode, buckets, wire, what, step):
        hvd = _hvd()
        with self.naming_lost_ranks(f"the start of the {what} at step {step}"):
            if mode == "fp16":
                handles = [hvd.allreduce_async_(
                    w, name=protocol.SYNC_NAME.format(b.dtype_name + ".fp16"), op=hvd.Sum,
                    process_set=self.process_set) for b, w in zip(buckets, wire)]
            else:
                handles = [hvd.allgather_async(
                    w, name=protocol.SYNC_NAME.format(b.dtype_name + ".int8"),
                    process_set=self.process_set) for b, w in zip(buckets, wire)]
        return mode, buckets, list(wire), handles, what, step

    def compressed_finish(self, handle):
        hvd = _hvd()
        mode, buckets, wire, handles, what, step = handle
        with self.naming_lost_ranks(f"the {what} started at step {step}"), \
                round_watchdog(f"the {what} started at step {step}", hvd.rank(), self.ranks()):
            outs = [hvd.synchronize(h) for h in handles]
        n = self.size()
        if mode == "fp16":
            return list(wire)
        summed = []
        for b, g in zip(buckets, outs):
            nb, s_bytes, total, acc = self._int8_layout(b)
            g = g.view(n, total)
            k = b.data_numel()
            out = torch.empty(k + b.control_numel() + 1, dtype=acc, device=g.device)
            K.dequantize_int8_mean(g[:, s_bytes + 16:].contiguous().view(torch.int8),
                                   g[:, :s_bytes].contiguous().view(acc), out, 1.0 / n,
                                   b.sizes, 0, 0, 0)
            if b.has_control:
                ctrl = g[:, s_bytes: s_bytes + 12].contiguous().view(torch.float32)
                out[k: k + 3] = ctrl.double().sum(0).to(acc)
            delta = out[:k]
            out[-1] = delta.abs().max() if k and bool(torch.isfinite(delta).all()) else (
                0.0 if not k else math.nan)
            summed.append(out)
        return summed

    def unpack_delta_average(self, buf, tensors, anchors, scale, offset):
        K.unpack_delta_average(buf, tensors, anchors, scale, offset)

    def _x_avg(self, buf, c, scale, off):
        k = c.numel()
        d = buf[off: off + k].to(c.dtype) * torch.tensor(scale, dtype=c.dtype)
        return c + d.view_as(c)  # each op rounded in acc, as the kernels

    def add_delta(self, anchors, buf, scale, offset):
        off = offset
        for c in anchors:
            c.copy_(self._x_avg(buf, c, scale, off))
            off += c.numel()

    def delta_pseudo_grad(self, buf, anchors, grads, scale, offset):
        off = offset
        for c, g in zip(anchors, grads):
            g.copy_(c - self._x_avg(buf, c, scale, off))
            off += c.numel()

    def delta_deviation(self, buf, tensors, anchors, scale, offset):
        total, off = 0.0, offset
        for t, c in zip(tensors, anchors):
            avg = self._x_avg(buf, c, scale, off)
            if t.dtype != c.dtype and t.dtype in FLOAT_DTYPES:  # T(x_avg) for 16-bit params
                avg = avg.to(t.dtype)
            total += float(((avg.double() - t.double()) ** 2).sum())
            off += c.numel()
        return total

    def carry(self, bases, tensors, sent):
        for b, t, s in zip(bases, tensors, sent):
            x = (b + (t.to(s.dtype) - s)).to(t.dtype)
            t.copy_(x)
            s.copy_(x)

    def overlap_delta_send_fp16(self, bucket, summed, scale):
        return K.overlap_delta_pack_fp16(summed, bucket.params, bucket.anchors, bucket.sent,
                                         bucket.residuals, scale, 0)

    def slowmo_step(self, anchors, momenta, grads, lrs, alpha, beta):
        for x0, u, g, lr in zip(anchors, momenta, grads, lrs):
            # unpack_slowmo's order and roundings: u = acc(beta)*u; u = u + g/acc(lr);
            # x0 = x0 - acc(alpha*lr)*u (alpha*lr in float64, then rounded)
            u.mul_(torch.tensor(beta, dtype=u.dtype))
            u.add_(g / torch.tensor(float(lr), dtype=u.dtype))
            x0.sub_(torch.tensor(alpha * float(lr), dtype=x0.dtype) * u)

    def nbytes(self, buf):
        return buf.numel() * (4 if buf.dtype == torch.bfloat16 else buf.element_size())


    def elements(self, buf, index, count):
        return buf[index: index + count].tolist()  # one read for the control elements

    def proves_finite(self, bucket, buf):
        guard = float(buf[-1])
        return math.isfinite(guard) and guard <= torch.finfo(buf.dtype).max / 2

    def locate_nonfinite(self, bucket, buf):
        data = buf[: bucket.control_index() + bucket.control_numel()]
        if bool(torch.isfinite(data).all()):
            return -1  # a large but finite sum (e.g. float16 near its range)
        off = 0
        for i, k in enumerate(bucket.sizes + [bucket.control_numel()]):
            if not bool(torch.isfinite(data[off: off + k]).all()):
                return i
            off += k
        return -1  # pragma: no cover - the whole-buffer check found one

    # ---- fused unpacks ----------------------------------------------------------------------------
    def unpack_average(self, buf, tensors, scale, offset):
        K.unpack_average(buf, tensors, scale, offset)

    def unpack_average_deviation(self, buf, tensors, scale, offset):
        return K.unpack_average_deviation(buf, tensors, scale, offset)

    def unpack_slowmo(self, buf, params, anchors, momenta, scale, lrs, alpha, beta, offset):
        return K.unpack_slowmo(buf, params, anchors, momenta, scale, lrs, alpha, beta, offset)

    def unpack_pseudo_grad(self, buf, params, anchors, grads, scale, offset):
        return K.unpack_pseudo_grad(buf, params, anchors, grads, scale, offset)

    def unpack_adaalter(self, buf, accumulators, denominators, scale, offset):
        K.unpack_adaalter(buf, accumulators, denominators, scale, offset)

    # ---- state ------------------------------------------------------------------------------------
    def zero(self, tensors):
        for t in tensors:
            t.zero_()

    def copy(self, dst, src):
        for d, s in zip(dst, src):
            d.copy_(s)

    def mean_scalar(self, value):
        hvd = _hvd()
        t = torch.tensor([float(value)], dtype=torch.float64)
        with self.naming_lost_ranks("the deviation allreduce"):
            hvd.allreduce_(t, name=protocol.DEVIATION_NAME, op=hvd.Sum,
                           process_set=self.process_set)
        return float(t[0]) / self.size()

    # ---- control flow -------------------------------------------------------------------------------
    def cond(self, pred, then_fn, else_fn):
        return then_fn() if pred else else_fn()

    def all_true(self, preds):
        return all(bool(p) for p in preds)

    def any_true(self, preds):
        return any(bool(p) for p in preds)

    def logical_not(self, pred):
        return not pred

    def true(self):
        return True

    def false(self):
        return False

    def scalar(self, value):
        return float(value)

    def to_float(self, value):
        return float(value)

    def check(self, pred, error, message):
        if not pred:
            raise error(message())
        return None

    def after(self, tokens, fn):
        return fn()

    def message(self, parts):
        return "".join(str(p) for p in parts)

    def pick(self, labels, index):
        return labels[max(int(index), 0)]

    def warn(self, message, suffix):
        warnings.warn(message + suffix, RuntimeWarning, stacklevel=6)
        return None

    # ---- Horovod ------------------------------------------------------------------------------------
    def ranks(self) -> list[int]:
        hvd = _hvd()
        ps = self.process_set
        return list(ps.ranks) if getattr(ps, "ranks", None) else list(range(hvd.size()))

    def naming_lost_ranks(self, what: str):
        """Around a collective: a failure caused by a lost rank names it (Gloo launcher)."""
        hvd = _hvd()
        return reporting_lost_ranks(hvd.rank(), self.ranks(), what)


ROUND_TIMEOUT_ENV = "HOROVOD_LOCAL_ROUND_TIMEOUT"
DEFAULT_ROUND_TIMEOUT = 900.0


class _Watchdog:
    """One daemon thread per process that fires when a round has been waiting too long
    (a thread started per round would cost more than a small sync's bookkeeping)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._deadline: Optional[float] = None
        self._what = ""
        threading.Thread(target=self._run, name="horovod_local-watchdog", daemon=True).start()

    def arm(self, timeout: float, what: str) -> None:
        with self._cond:
            self._deadline, self._what = time.monotonic() + timeout, what
            self._cond.notify()

    def disarm(self) -> None:
        self._deadline = None  # a plain store: the thread re-reads it under the lock

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._deadline is None:
                    self._cond.wait()
                wait = self._deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(min(wait, 1.0))
                    continue
                what = self._what
            print(what, file=sys.stderr, flush=True)
            os._exit(1)  # the main thread is inside Horovod's wait: no exception can reach it


_watchdog: Optional[_Watchdog] = None


@contextlib.contextmanager
def round_watchdog(what: str, rank: int, ranks: list) -> Iterator[None]:
    """Never a silent hang: if a round's allreduce has not completed after
    ``HOROVOD_LOCAL_ROUND_TIMEOUT`` seconds (default 900; 0: off), say why it most likely
    waits and end this process, so that the launcher ends the job. A peer that finished its data
    without join() and went on to another collective (an evaluation allreduce) never enters the
    round; Horovod itself would only warn, forever."""
    global _watchdog
    timeout = float(os.environ.get(ROUND_TIMEOUT_ENV, DEFAULT_ROUND_TIMEOUT))
    if timeout <= 0:
        yield
        return
    if _watchdog is None:
        _watchdog = _Watchdog()
    _watchdog.arm(timeout, (
        f"horovod_local: {what} on rank {rank} has waited {timeout:.0f} s for the other ranks "
        f"of {sorted(ranks)}. Most likely a rank finished its data without join() and is in "
        f"another collective (e.g. an evaluation allreduce), or a rank called "
        f"average_parameters() alone: call join() on every rank when its data ends. Ending "
        f"this process so that the job does not hang ({ROUND_TIMEOUT_ENV}={timeout:g}; 0 turns "
        f"this off)."))
    try:
        yield
    finally:
        _watchdog.disarm()


def allgather_object(obj: Any, name: str, process_set: Any) -> list:
    """``hvd.allgather_object`` within a process set (Horovod 0.28's takes none)."""
    hvd = _hvd()
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    sizes = hvd.allgather(torch.tensor([data.numel()]), name=name + ".sizes",
                          process_set=process_set)
    blob = hvd.allgather(data, name=name, process_set=process_set)
    out, off = [], 0
    for n in sizes.tolist():
        out.append(pickle.loads(blob[off: off + n].numpy().tobytes()))
        off += n
    return out
