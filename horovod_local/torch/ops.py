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
    def _buffer(self, dtype: torch.dtype, numel: int, device: torch.device) -> torch.Tensor:
        buf = self._buffers.get(dtype)
        if buf is None or buf.numel() != numel or buf.device != device:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[dtype] = buf
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

    def allreduce_sum(self, buckets, bufs, what, step):
        hvd = _hvd()
        # Horovod 0.28's torch ops have no bfloat16: such a buffer travels as float32 (exact),
        # summed there and rounded once on the way back
        wire = [buf.float() if buf.dtype == torch.bfloat16 else buf for buf in bufs]
        with self.naming_lost_ranks(f"the {what} at step {step}"), \
                round_watchdog(f"the {what} at step {step}", hvd.rank(), self.ranks()):
            handles = [hvd.allreduce_async_(w, name=protocol.SYNC_NAME.format(b.dtype_name),
                                            op=hvd.Sum, process_set=self.process_set)
                       for b, w in zip(buckets, wire)]
            for h in handles:
                hvd.synchronize(h)
        for buf, w in zip(bufs, wire):
            if w is not buf:
                buf.copy_(w)
        return list(bufs)

    def nbytes(self, buf):
        return buf.numel() * (4 if buf.dtype == torch.bfloat16 else buf.element_size())

    def elements(self, buf, index, count):
        return buf[index: index + count].tolist()  # one read for the control elements

    def proves_finite(self, bucket, buf):
        guard = float(buf[-1])
        return math.isfinite(guard) and guard <= torch.finfo(bucket.dtype).max / 2

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
