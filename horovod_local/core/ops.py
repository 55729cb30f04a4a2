"""The op interface of a sync round: what a front end supplies so the core can run it.

The core (:mod:`.algorithms`, :mod:`.pipeline`) writes every algorithm once against
:class:`SyncOps`; the PyTorch front end implements it with the C++/CUDA kernels or their
PyTorch fallback (eager: Python scalars, exceptions), the TensorFlow front end with TF ops
inside a ``tf.function`` (graph: tensors, ``tf.cond``, asserts). So the core never branches on
the framework: a value it gets back ("bool-like", "scalar") is a Python value in one and a
tensor in the other, and control flow goes through :meth:`SyncOps.cond`.

The fused unpacks and their exact arithmetic are specified in ``horovod_local.torch._kernels``
(module docstring); every backend follows that specification.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from horovod_local.core import protocol

__all__ = ["Bucket", "ParamSlot", "SyncOps", "Counters"]


@dataclass
class ParamSlot:
    """One synced parameter and the tensors kept for it (backend tensors or variables), as the
    front end found them. The core decides which of them travel and what happens to them."""

    name: str
    value: Any  # the parameter (written in place), or a gradient in a warm-up round
    lr: Any = None  # its group's learning rate (SlowMo)
    anchor: Any = None  # SlowMo / outer x0
    momentum: Any = None  # SlowMo u
    pseudo_grad: Any = None  # where the outer optimizer reads its gradient (x0.grad)
    states: Sequence[Any] = ()  # the inner optimizer's state of the parameter's shape
    state_names: Sequence[str] = ()
    accumulator: Any = None  # Local AdaAlter A2
    denominator: Any = None  # Local AdaAlter B2
    last_good: Any = None  # nonfinite='skip': the last good average
    sent: Any = None  # overlap=True: what this rank sent in the round in flight (acc dtype)
    states_sent: Sequence[Any] = ()  # overlap=True, state_policy='average': the same for states
    residual: Any = None  # compression: this rank's error-feedback residual e (acc dtype)


@dataclass
class Bucket:
    """The tensors of one dtype that travel in one buffer, by section, in buffer order:
    ``[params | states | accumulators | control elements? | backend extras (torch: guard)]``.
    ``anchors``, ``momenta``, ``grads``, ``lrs`` run parallel to ``params`` and stay home."""

    dtype: Any
    dtype_name: str
    params: list = field(default_factory=list)
    anchors: list = field(default_factory=list)
    momenta: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    states: list = field(default_factory=list)
    accumulators: list = field(default_factory=list)
    denominators: list = field(default_factory=list)
    sent: list = field(default_factory=list)  # overlap: parallel to params
    state_sent: list = field(default_factory=list)  # overlap: parallel to states
    residuals: list = field(default_factory=list)  # compression: parallel to params
    labels: list = field(default_factory=list)  # what each travelling tensor is, buffer order
    sizes: list = field(default_factory=list)  # numel of each travelling tensor, buffer order
    has_control: bool = False

    def sections(self) -> list[list]:
        return [self.params, self.states, self.accumulators]

    def add(self, section: list, tensor: Any, label: str, numel: int) -> None:
        """Append ``tensor`` to ``section``. Sections fill in order (params, then states, then
        accumulators), which the plan guarantees by adding all params first."""
        section.append(tensor)
        self.labels.append(label)
        self.sizes.append(int(numel))

    def section_numel(self, section: list) -> int:
        start = sum(len(s) for s in self.sections()[: self._index(section)])
        return sum(self.sizes[start: start + len(section)])

    def _index(self, section: list) -> int:
        for i, s in enumerate(self.sections()):
            if s is section:
                return i
        raise ValueError("not a section of this bucket")

    def data_numel(self) -> int:
        return sum(self.sizes)

    def control_index(self) -> int:
        """Where the control element sits (right after the data); the round number follows."""
        return self.data_numel()

    def control_numel(self) -> int:
        return protocol.CONTROL_ELEMENTS if self.has_control else 0


class Counters(Protocol):
    """A front end's round counters (``SyncStats`` fields): Python attributes in PyTorch,
    variables in Keras. Names: steps, local_steps, syncs, bytes_sent, sync_seconds,
    last_deviation, skipped_rounds, ..."""

    def get(self, name: str) -> Any: ...

    def add(self, name: str, value: Any) -> None: ...

    def set(self, name: str, value: Any) -> None: ...


class SyncOps:
    """The operations a backend supplies. Every method is small; see each docstring."""

    #: wrap tensor names in quotes in messages (TF's assert would escape the quotes)
    quote_names: bool = True

    # ---- tensors ----------------------------------------------------------------------------
    def dtype_of(self, t: Any) -> tuple[Any, str]:
        """(backend dtype, its name such as 'float32'); TypeError for non-floating tensors."""
        raise NotImplementedError

    def numel(self, t: Any) -> int:
        raise NotImplementedError

    def size(self) -> int:
        """Ranks in the process set (n)."""
        raise NotImplementedError

    def now(self) -> Any:
        """Wall clock in seconds (float64)."""
        raise NotImplementedError

    # ---- a round's buffers ------------------------------------------------------------------
    def pack(self, bucket: Bucket, control: Sequence[Any]) -> Any:
        """The bucket's flat buffer: its sections in order, the control elements (joined or
        round kind, round number, explicit) if the bucket has them, then whatever the backend
        appends to prove finiteness cheaply."""
        raise NotImplementedError

    def allreduce_sum(self, buckets: Sequence[Bucket], bufs: Sequence[Any], what: str,
                      step: Any) -> list:
        """One summing allreduce per buffer, named by the wire protocol; ``what`` and ``step``
        describe the round for error messages (a lost rank)."""
        raise NotImplementedError

    def nbytes(self, buf: Any) -> int:
        """Bytes a packed buffer puts on the wire (Python int)."""
        raise NotImplementedError

    # ---- overlapped rounds (eager backends only) ----------------------------------------------
    def allreduce_start(self, buckets: Sequence[Bucket], bufs: Sequence[Any], what: str,
                        step: Any) -> Any:
        """Start the sums of :meth:`allreduce_sum` without waiting; returns a handle."""
        raise NotImplementedError("this backend cannot keep a round in flight (overlap=True)")

    def allreduce_finish(self, handle: Any) -> list:
        """Wait for :meth:`allreduce_start`'s sums; returns the summed buffers."""
        raise NotImplementedError

    def finish_pack(self, bucket: Bucket, buf: Any, guard: Any, control: Sequence[Any]) -> None:
        """After the carry ops wrote a bucket's sections: the control elements and the
        backend's extras (``guard``: the max of what the carry ops returned)."""
        raise NotImplementedError

    def overlap_average_pack(self, buf: Any, tensors: list, sent: list, scale: float,
                             offset: int) -> Any:
        raise NotImplementedError

    def carry_pack(self, bases: list, tensors: list, sent: list, buf: Any, offset: int) -> Any:
        raise NotImplementedError

    def overlap_deviation(self, buf: Any, tensors: list, sent: list, scale: float,
                          offset: int) -> Any:
        """``sum((float64(T(buf * scale)) - float64(sent))**2)`` over a section."""
        raise NotImplementedError

    # ---- compressed syncs (eager backends only) ------------------------------------------------
    def compress(self, mode: str, bucket: Bucket, control: Sequence[Any]) -> Any:
        """This rank's compressed send of ``bucket`` (``d = (x - c) + e`` quantised, ``e``
        updated; ``mode`` 'fp16' | 'int8'), with the control elements."""
        raise NotImplementedError("this backend has no compressed syncs")

    def compressed_start(self, mode: str, buckets: Sequence[Bucket], wire: Sequence[Any],
                         what: str, step: Any) -> Any:
        """Start the collectives of compressed sends (fp16: sum; int8: allgather)."""
        raise NotImplementedError

    def compressed_finish(self, handle: Any) -> list:
        """Wait; returns per bucket a buffer laid out as a summed one: ``[delta | control sums |
        guard]``, the delta summed (fp16) or already the mean (int8; the pipeline's
        ``_delta_scale`` turns either into the mean)."""
        raise NotImplementedError

    def unpack_delta_average(self, buf: Any, tensors: list, anchors: list, scale: float,
                             offset: int) -> None:
        """``c = c + acc(buf) * scale; x = T(c)``."""
        raise NotImplementedError

    def add_delta(self, anchors: list, buf: Any, scale: float, offset: int) -> None:
        """``c = c + acc(buf) * scale``."""
        raise NotImplementedError

    def delta_pseudo_grad(self, buf: Any, anchors: list, grads: list, scale: float,
                          offset: int) -> None:
        """``g = x0 - (x0 + acc(buf) * scale)`` (the pseudo-gradient of ``x_avg = c + delta``)."""
        raise NotImplementedError

    def delta_deviation(self, buf: Any, tensors: list, anchors: list, scale: float,
                        offset: int) -> Any:
        """``sum((float64(T(c + acc(buf) * scale)) - float64(t))**2)``."""
        raise NotImplementedError

    def carry(self, bases: list, tensors: list, sent: list) -> None:
        """``x = T(base + (acc(x) - s)); s = acc(x)`` (``carry_pack`` without a send)."""
        raise NotImplementedError

    def overlap_delta_send_fp16(self, bucket: Bucket, summed: Any, scale: float) -> Any:
        """Overlapped fp16 model averaging, fused: complete the round in ``summed`` and write
        the next send into it; returns the guard."""
        raise NotImplementedError

    def slowmo_step(self, anchors: list, momenta: list, grads: list, lrs: list, alpha: float,
                    beta: float) -> None:
        """``u = beta*u + g/lr; x0 = x0 - (alpha*lr)*u`` (``unpack_slowmo``'s arithmetic,
        from a pseudo-gradient ``g = x0 - x_avg`` already computed)."""
        raise NotImplementedError

    def elements(self, buf: Any, index: int, count: int) -> list:
        """``count`` consecutive elements of a summed buffer from ``index`` (the control
        elements), as float64 scalars."""
        raise NotImplementedError

    def proves_finite(self, bucket: Bucket, buf: Any) -> Any:
        """Cheap proof that a summed buffer is finite (bool-like); False means "search"."""
        raise NotImplementedError

    def locate_nonfinite(self, bucket: Bucket, buf: Any) -> Any:
        """Index (into ``bucket.labels``, then the control elements) of the first segment
        holding NaN/Inf, or -1 if all are finite."""
        raise NotImplementedError

    # ---- the fused unpacks (specified in horovod_local.torch._kernels) ------------------------
    def unpack_average(self, buf: Any, tensors: list, scale: float, offset: int) -> None:
        raise NotImplementedError

    def unpack_average_deviation(self, buf: Any, tensors: list, scale: float,
                                 offset: int) -> Any:
        raise NotImplementedError

    def unpack_slowmo(self, buf: Any, params: list, anchors: list, momenta: list, scale: float,
                      lrs: list, alpha: float, beta: float, offset: int) -> Any:
        raise NotImplementedError

    def unpack_pseudo_grad(self, buf: Any, params: list, anchors: list, grads: list,
                           scale: float, offset: int) -> Any:
        raise NotImplementedError

    def unpack_adaalter(self, buf: Any, accumulators: list, denominators: list, scale: float,
                        offset: int) -> None:
        raise NotImplementedError

    # ---- state --------------------------------------------------------------------------------
    def zero(self, tensors: Sequence[Any]) -> None:
        raise NotImplementedError

    def copy(self, dst: Sequence[Any], src: Sequence[Any]) -> None:
        """``dst[i] = src[i]`` (cast to dst's dtype), in place."""
        raise NotImplementedError

    def mean_scalar(self, value: Any) -> Any:
        """Mean over the ranks of one float64 scalar (ADPSGD's S)."""
        raise NotImplementedError

    # ---- control flow and errors ----------------------------------------------------------------
    def cond(self, pred: Any, then_fn: Callable[[], Any], else_fn: Callable[[], Any]) -> Any:
        raise NotImplementedError

    def all_true(self, preds: Sequence[Any]) -> Any:
        raise NotImplementedError

    def any_true(self, preds: Sequence[Any]) -> Any:
        raise NotImplementedError

    def logical_not(self, pred: Any) -> Any:
        raise NotImplementedError

    def true(self) -> Any:
        raise NotImplementedError

    def false(self) -> Any:
        raise NotImplementedError

    def scalar(self, value: float) -> Any:
        """A float64 scalar constant (what both branches of a cond return)."""
        raise NotImplementedError

    def to_float(self, value: Any) -> Any:
        """A scalar (e.g. an integer counter) as a float64 scalar."""
        raise NotImplementedError

    def check(self, pred: Any, error: type, message: Callable[[], Any]) -> Any:
        """Fail with ``error(message())`` unless ``pred``; returns a token to run after."""
        raise NotImplementedError

    def after(self, tokens: Sequence[Any], fn: Callable[[], Any]) -> Any:
        """Run ``fn`` once ``tokens`` (checks) have passed."""
        raise NotImplementedError

    def message(self, parts: Sequence[Any]) -> Any:
        """Join strings and scalars (a step counter) into one message."""
        raise NotImplementedError

    def pick(self, labels: Sequence[str], index: Any) -> Any:
        """``labels[index]`` (index from :meth:`locate_nonfinite`, clamped at 0)."""
        raise NotImplementedError

    def warn(self, message: Any, suffix: str) -> Any:
        """A RuntimeWarning ``message + suffix`` (on the rare failure path)."""
        raise NotImplementedError


