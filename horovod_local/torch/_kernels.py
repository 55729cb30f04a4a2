"""Fused pack / unpack kernels of one sync round (the API the optimizer calls).

A sync packs many tensors into one flat buffer per dtype, allreduces it (op=Sum) once, and
unpacks it with the algorithm's math fused into the unpack pass. Every function takes a list of
tensors whose flattened (row-major) contents occupy consecutive segments of ``buf`` starting at
element ``offset``; all tensors of a call share ``buf``'s dtype and device, except the SlowMo /
outer-optimizer state (``anchors``, ``momenta``, ``grads``), which is float32 for 16-bit and
float32 parameters and float64 for float64 parameters.

Two implementations, chosen automatically at import:

- ``"cpp"``: the extension ``horovod_local._C`` (C++ with ``at::parallel_for`` on CPU; one
  multi-tensor CUDA launch per call on GPU when it was built with CUDA, else the fallback serves
  CUDA tensors);
- ``"python"``: plain PyTorch ops (this file), used when the extension is not importable.

``HOROVOD_LOCAL_BACKEND=python`` forces the fallback; ``=cpp`` requires the extension (importing
this module raises ImportError without it). ``BACKEND`` and ``backend_info()`` report the choice.

Exact arithmetic (both implementations; ``acc`` = float32 for float16/bfloat16/float32 buffers,
float64 for float64 ones; every operation is rounded separately, in this order, never fused into
an FMA; 16-bit values are rounded once, on store, to nearest even):

- ``pack``: ``buf_seg = t``; returns ``max |t|`` over all tensors (NaN if any element is
  non-finite), an exact value of the buffer's dtype
- ``x_avg = acc(buf_seg) * acc(scale)``
- ``unpack_average``: ``t = T(x_avg)``
- ``unpack_average_deviation``: as above; returns ``sum((float64(T(x_avg)) - float64(t_old))**2)``
- ``unpack_slowmo``: ``u = acc(beta) * u; u = u + (x0 - x_avg) / acc(lr); x0 = x0 - acc(alpha*lr) * u;
  param = T(x0)`` (``alpha * lr`` is computed in float64, then rounded to acc); returns the deviation
  of ``T(x_avg)`` from the old param
- ``unpack_pseudo_grad``: ``grad = x0 - x_avg``; params are only read (deviation as above)
- ``unpack_adaalter``: ``accumulator = denominator = T(x_avg)``

float32 / float64 results of the two implementations are bit-identical, 16-bit ones equal (both
compute in float32 and round once). The deviation sums agree to float64 rounding only (the
summation order differs: the C++ kernels add fixed blocks in order, so their result does not
depend on the number of threads).

Non-contiguous tensors are accepted everywhere except ``buf`` (which must be contiguous): they
are processed through a contiguous copy that is written back (the extension) or written through
their strides (the fallback). Bad arguments raise TypeError (wrong dtype, not a tensor) or
ValueError (device mismatch, buffer too small, list lengths or numels that do not match, zero
learning rate) naming the function, the argument and the tensor index, before anything is written.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Optional, Sequence

import torch

__all__ = [
    "BACKEND",
    "SUPPORTED_DTYPES",
    "backend_info",
    "state_dtype",
    "pack",
    "unpack_average",
    "unpack_average_deviation",
    "unpack_slowmo",
    "unpack_pseudo_grad",
    "unpack_adaalter",
]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of SlowMo / outer-optimizer state (anchors, momenta, grads) for params of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Argument checks of the fallback (the extension performs the same checks in C++).

def _dtype_name(dtype) -> str:
    return str(dtype)


def _as_list(fn: str, arg: str, tensors) -> list:
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"horovod_local.{fn}: {arg} must be a list of tensors, got one tensor")
    try:
        return list(tensors)
    except TypeError:
        raise TypeError(f"horovod_local.{fn}: {arg} must be a list of tensors, got "
                        f"{type(tensors).__name__}") from None


def _check_buf(fn: str, buf, offset: int) -> None:
    if not isinstance(buf, torch.Tensor):
        raise TypeError(f"horovod_local.{fn}: buf must be a torch.Tensor, got {type(buf).__name__}")
    if buf.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"horovod_local.{fn}: buf has dtype {_dtype_name(buf.dtype)}; supported: "
                        "torch.float32, torch.float64, torch.float16, torch.bfloat16")
    if not buf.is_contiguous():
        raise ValueError(f"horovod_local.{fn}: buf must be contiguous (it is written/read as one "
                         "flat buffer)")
    if offset < 0:
        raise ValueError(f"horovod_local.{fn}: offset must be >= 0, got {offset}")


def _check_tensor(fn: str, arg: str, j: int, t, want: torch.dtype, buf: torch.Tensor,
                  numel: Optional[int] = None, ref: str = "params") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"horovod_local.{fn}: {arg}[{j}] is not a tensor "
                        f"({type(t).__name__})")
    if t.dtype != want:
        why = (" (the dtype of buf)" if want == buf.dtype else
               " (float32 state for 16-bit/float32 params, float64 for float64 params)")
        raise TypeError(f"horovod_local.{fn}: {arg}[{j}] has dtype {_dtype_name(t.dtype)}, "
                        f"expected {_dtype_name(want)}{why}")
    if t.device != buf.device:
        raise ValueError(f"horovod_local.{fn}: {arg}[{j}] is on {t.device} but buf is on "
                         f"{buf.device}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"horovod_local.{fn}: {arg}[{j}] has {t.numel()} elements (shape "
                         f"{list(t.shape)}) but {ref}[{j}] has {numel}")


def _check_len(fn: str, arg: str, got: int, want: int, ref: str = "params") -> None:
    if got != want:
        raise ValueError(f"horovod_local.{fn}: {arg} has {got} entries but {ref} has {want}")


def _check_capacity(fn: str, buf: torch.Tensor, offset: int, total: int) -> None:
    n = buf.numel()
    if offset + total > n:
        raise ValueError(f"horovod_local.{fn}: buffer too small: offset {offset} + total numel "
                         f"{total} = {offset + total} elements, but buf has {n}")


def _check_lr(fn: str, j: int, lr: float) -> None:
    if not math.isfinite(lr) or lr == 0.0:
        raise ValueError(f"horovod_local.{fn}: lrs[{j}] = {lr}; SlowMo divides by the learning "
                         "rate, which must be finite and non-zero")


def _checked_segments(fn: str, buf, tensors, offset: int) -> list:
    """The checks of a call whose ``tensors`` all share ``buf``'s dtype and fill consecutive
    segments from ``offset``; returns ``tensors`` as a list."""
    tensors = _as_list(fn, "tensors", tensors)
    _check_buf(fn, buf, offset)
    for j, t in enumerate(tensors):
        _check_tensor(fn, "tensors", j, t, buf.dtype, buf)
    _check_capacity(fn, buf, offset, sum(t.numel() for t in tensors))
    return tensors


def _segments(buf: torch.Tensor, tensors: list, offset: int) -> list:
    """Views of buf's segments, shaped like the tensors (after the capacity check)."""
    flat = buf.view(-1)
    out, o = [], offset
    for t in tensors:
        n = t.numel()
        out.append(flat.narrow(0, o, n).view(t.shape))
        o += n
    return out


# ---------------------------------------------------------------------------------------------
# The PyTorch fallback. Each operation below is a separate torch op (separately rounded), in the
# order of the module docstring; division by the learning rate uses a 0-dim tensor on the
# device, because CUDA torch turns division by a Python scalar into a multiplication by its
# reciprocal, which would not match the kernels.

class _PythonBackend:
    name = "python"

    @staticmethod
    @torch.no_grad()
    def pack(tensors, buf, offset=0):
        fn = "pack"
        tensors = _checked_segments(fn, buf, tensors, offset)
        for seg, t in zip(_segments(buf, tensors, offset), tensors):
            if t.numel():
                seg.copy_(t)
        total = sum(t.numel() for t in tensors)
        if total == 0:
            return 0.0
        # max |x| = max(-min, max): one fast reduction, no |x| temporary; NaN/Inf propagate
        lo, hi = torch.aminmax(buf[offset: offset + total])
        guard = max(-float(lo), float(hi)) if not torch.isnan(hi) else math.nan
        return guard if math.isfinite(guard) else math.nan

    @staticmethod
    @torch.no_grad()
    def unpack_average(buf, tensors, scale, offset=0):
        fn = "unpack_average"
        tensors = _checked_segments(fn, buf, tensors, offset)
        scale = float(scale)
        for seg, t in zip(_segments(buf, tensors, offset), tensors):
            if t.numel():
                t.copy_(seg * scale)

    @staticmethod
    @torch.no_grad()
    def unpack_average_deviation(buf, tensors, scale, offset=0):
        fn = "unpack_average_deviation"
        tensors = _checked_segments(fn, buf, tensors, offset)
        scale = float(scale)
        dev = torch.zeros((), dtype=torch.float64, device=buf.device)
        for seg, t in zip(_segments(buf, tensors, offset), tensors):
            if t.numel():
                new = seg * scale
                dev += torch.sum(torch.square(new.double() - t.double()))
                t.copy_(new)
        return float(dev)

    @staticmethod
    @torch.no_grad()
    def unpack_slowmo(buf, params, anchors, momenta, scale, lrs, alpha, beta, offset=0):
        fn = "unpack_slowmo"
        params = _as_list(fn, "params", params)
        anchors = _as_list(fn, "anchors", anchors)
        momenta = _as_list(fn, "momenta", momenta)
        lrs = _lr_list(fn, lrs, len(params))
        _check_buf(fn, buf, offset)
        _check_len(fn, "anchors", len(anchors), len(params))
        _check_len(fn, "momenta", len(momenta), len(params))
        _check_len(fn, "lrs", len(lrs), len(params))
        sdt = state_dtype(buf.dtype)
        for j, p in enumerate(params):
            _check_lr(fn, j, lrs[j])
            _check_tensor(fn, "params", j, p, buf.dtype, buf)
            _check_tensor(fn, "anchors", j, anchors[j], sdt, buf, p.numel())
            _check_tensor(fn, "momenta", j, momenta[j], sdt, buf, p.numel())
        _check_capacity(fn, buf, offset, sum(p.numel() for p in params))
        scale, alpha, beta = float(scale), float(alpha), float(beta)
        dev = torch.zeros((), dtype=torch.float64, device=buf.device)
        lr_tensors: dict = {}
        for j, (seg, p) in enumerate(zip(_segments(buf, params, offset), params)):
            if not p.numel():
                continue
            x0, u, lr = anchors[j], momenta[j], lrs[j]
            lr_t = lr_tensors.get(lr)
            if lr_t is None:
                lr_t = lr_tensors[lr] = torch.full((), lr, dtype=sdt, device=buf.device)
            x = seg.to(sdt) * scale
            dev += torch.sum(torch.square(x.to(p.dtype).double() - p.double()))
            u.mul_(beta)
            g = torch.sub(x0, x.reshape(x0.shape))
            g.div_(lr_t)
            u.add_(g.reshape(u.shape))
            x0.sub_((u * (alpha * lr)).reshape(x0.shape))
            p.copy_(x0.reshape(p.shape))
        return float(dev)

    @staticmethod
    @torch.no_grad()
    def unpack_pseudo_grad(buf, params, anchors, grads, scale, offset=0):
        fn = "unpack_pseudo_grad"
        params = _as_list(fn, "params", params)
        anchors = _as_list(fn, "anchors", anchors)
        grads = _as_list(fn, "grads", grads)
        _check_buf(fn, buf, offset)
        _check_len(fn, "anchors", len(anchors), len(params))
        _check_len(fn, "grads", len(grads), len(params))
        sdt = state_dtype(buf.dtype)
        for j, p in enumerate(params):
            _check_tensor(fn, "params", j, p, buf.dtype, buf)
            _check_tensor(fn, "anchors", j, anchors[j], sdt, buf, p.numel())
            _check_tensor(fn, "grads", j, grads[j], sdt, buf, p.numel())
        _check_capacity(fn, buf, offset, sum(p.numel() for p in params))
        scale = float(scale)
        dev = torch.zeros((), dtype=torch.float64, device=buf.device)
        for j, (seg, p) in enumerate(zip(_segments(buf, params, offset), params)):
            if not p.numel():
                continue
            x = seg.to(sdt) * scale
            dev += torch.sum(torch.square(x.to(p.dtype).double() - p.double()))
            g = grads[j]
            g.copy_(torch.sub(anchors[j].reshape(p.shape), x).view(g.shape))
        return float(dev)

    @staticmethod
    @torch.no_grad()
    def unpack_adaalter(buf, accumulators, denominators, scale, offset=0):
        fn = "unpack_adaalter"
        accumulators = _as_list(fn, "accumulators", accumulators)
        denominators = _as_list(fn, "denominators", denominators)
        _check_buf(fn, buf, offset)
        _check_len(fn, "denominators", len(denominators), len(accumulators), ref="accumulators")
        for j, a in enumerate(accumulators):
            _check_tensor(fn, "accumulators", j, a, buf.dtype, buf)
            _check_tensor(fn, "denominators", j, denominators[j], buf.dtype, buf, a.numel(),
                          ref="accumulators")
        _check_capacity(fn, buf, offset, sum(a.numel() for a in accumulators))
        scale = float(scale)
        for j, (seg, a) in enumerate(zip(_segments(buf, accumulators, offset), accumulators)):
            if not a.numel():
                continue
            v = seg * scale
            a.copy_(v)
            b = denominators[j]
            b.copy_(v.view(b.shape))


def _lr_list(fn: str, lrs, n: int) -> list:
    if isinstance(lrs, numbers.Real):
        return [float(lrs)] * n
    if isinstance(lrs, torch.Tensor):
        raise TypeError(f"horovod_local.{fn}: lrs must be a float or a list of floats, "
                        "got a tensor")
    return [float(x) for x in lrs]


# ---------------------------------------------------------------------------------------------
# The extension.

class _CppBackend:
    name = "cpp"

    def __init__(self, module) -> None:
        self._C = module
        self.with_cuda = bool(getattr(module, "with_cuda", False))

    def pack(self, tensors, buf, offset=0):
        return self._C.pack(_as_list("pack", "tensors", tensors), buf, offset)

    def unpack_average(self, buf, tensors, scale, offset=0):
        self._C.unpack_average(buf, _as_list("unpack_average", "tensors", tensors), scale,
                               offset)

    def unpack_average_deviation(self, buf, tensors, scale, offset=0):
        fn = "unpack_average_deviation"
        return self._C.unpack_average_deviation(buf, _as_list(fn, "tensors", tensors), scale,
                                                offset)

    def unpack_slowmo(self, buf, params, anchors, momenta, scale, lrs, alpha, beta, offset=0):
        fn = "unpack_slowmo"
        params = _as_list(fn, "params", params)
        return self._C.unpack_slowmo(buf, params, _as_list(fn, "anchors", anchors),
                                     _as_list(fn, "momenta", momenta), scale,
                                     _lr_list(fn, lrs, len(params)), alpha, beta, offset)

    def unpack_pseudo_grad(self, buf, params, anchors, grads, scale, offset=0):
        fn = "unpack_pseudo_grad"
        return self._C.unpack_pseudo_grad(buf, _as_list(fn, "params", params),
                                          _as_list(fn, "anchors", anchors),
                                          _as_list(fn, "grads", grads), scale, offset)

    def unpack_adaalter(self, buf, accumulators, denominators, scale, offset=0):
        fn = "unpack_adaalter"
        self._C.unpack_adaalter(buf, _as_list(fn, "accumulators", accumulators),
                                _as_list(fn, "denominators", denominators), scale, offset)


def _load_extension():
    """(backend or None, reason text)."""
    try:
        from horovod_local import _C  # noqa: WPS433 - the compiled extension
    except Exception as e:  # ImportError, or an undefined symbol from a torch mismatch
        return None, f"{type(e).__name__}: {e}"
    return _CppBackend(_C), ""


_python = _PythonBackend()
_cpp: Optional[_CppBackend] = None
_CPP_ERROR = ""

_requested = os.environ.get("HOROVOD_LOCAL_BACKEND", "auto").strip().lower() or "auto"
if _requested not in ("auto", "cpp", "python"):
    raise ValueError(f"HOROVOD_LOCAL_BACKEND={_requested!r}: expected 'cpp', 'python' or unset")

if _requested == "python":
    _CPP_ERROR = "forced by HOROVOD_LOCAL_BACKEND=python"
else:
    _cpp, _CPP_ERROR = _load_extension()
    if _cpp is None and _requested == "cpp":
        raise ImportError("HOROVOD_LOCAL_BACKEND=cpp but the extension horovod_local._C is not "
                          f"importable ({_CPP_ERROR}); build it with `pip install "
                          "--no-build-isolation --no-deps -e .`")

_impl = _cpp if _cpp is not None else _python
#: "cpp" when the extension serves the calls, "python" for the PyTorch fallback.
BACKEND: str = _impl.name


def backend_info() -> str:
    """Which implementation serves the fused sync, and why."""
    if _cpp is None:
        return f"python fallback: {_CPP_ERROR}"
    try:
        detail = _cpp._C.info()
    except Exception:  # pragma: no cover - an old build without info()
        detail = f"CPU, {torch.get_num_threads()} threads"
    if not _cpp.with_cuda:
        detail += " (python fallback for CUDA tensors)"
    return f"cpp extension horovod_local._C ({detail})"


def _for(buf):
    """The implementation serving tensors on buf's device."""
    if _impl is _cpp and isinstance(buf, torch.Tensor):
        kind = buf.device.type
        if kind == "cpu" or (kind == "cuda" and _cpp.with_cuda):
            return _cpp
        return _python
    return _impl if isinstance(buf, torch.Tensor) else _python  # _python raises the TypeError


# ---------------------------------------------------------------------------------------------
# The API.

def pack(tensors: Sequence[torch.Tensor], buf: torch.Tensor, offset: int = 0) -> float:
    """Copy each tensor (flattened, row-major) into consecutive segments of ``buf`` from ``offset``.

    Returns the *guard* of what was packed, computed in the same pass: ``max |x|`` over every
    element (0.0 for no elements), or NaN if any element is NaN or Inf. The sum of the ranks'
    guards bounds every element of the summed buffer, which is how a sync proves its result
    finite without another pass (``FusedSync.check_finite``).
    """
    return float(_for(buf).pack(tensors, buf, int(offset)))


def unpack_average(buf: torch.Tensor, tensors: Sequence[torch.Tensor], scale: float,
                   offset: int = 0) -> None:
    """``t = buf_seg * scale`` for each tensor."""
    _for(buf).unpack_average(buf, tensors, float(scale), int(offset))


def unpack_average_deviation(buf: torch.Tensor, tensors: Sequence[torch.Tensor], scale: float,
                             offset: int = 0) -> float:
    """``t = buf_seg * scale``; returns ``sum((new - old)**2)`` over all elements, in float64."""
    return float(_for(buf).unpack_average_deviation(buf, tensors, float(scale), int(offset)))


def unpack_slowmo(buf: torch.Tensor, params: Sequence[torch.Tensor],
                  anchors: Sequence[torch.Tensor], momenta: Sequence[torch.Tensor], scale: float,
                  lrs, alpha: float, beta: float, offset: int = 0) -> float:
    """SlowMo's outer step fused into the unpack, per tensor j with ``lr = lrs[j]``::

        x_avg = buf_seg * scale
        u     = beta * u + (x0 - x_avg) / lr
        x0    = x0 - alpha * lr * u
        param = x0

    ``anchors`` (x0) and ``momenta`` (u): float32 (float64 for float64 params), same numel as the
    params. ``lrs``: one float per param, or one float for all. Returns the deviation
    ``sum((x_avg - param_old)**2)`` (x_avg rounded to the param dtype) in float64.
    """
    return float(_for(buf).unpack_slowmo(buf, params, anchors, momenta, float(scale), lrs,
                                         float(alpha), float(beta), int(offset)))


def unpack_pseudo_grad(buf: torch.Tensor, params: Sequence[torch.Tensor],
                       anchors: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                       scale: float, offset: int = 0) -> float:
    """``grads[j] = anchors[j] - buf_seg * scale`` (the outer optimizer's pseudo-gradient).

    ``params`` are only read: returns the deviation ``sum((x_avg - param)**2)`` in float64.
    """
    return float(_for(buf).unpack_pseudo_grad(buf, params, anchors, grads, float(scale),
                                              int(offset)))


def unpack_adaalter(buf: torch.Tensor, accumulators: Sequence[torch.Tensor],
                    denominators: Sequence[torch.Tensor], scale: float, offset: int = 0) -> None:
    """Local AdaAlter's sync: ``accumulators[j] = denominators[j] = buf_seg * scale`` (A2 = B2)."""
    _for(buf).unpack_adaalter(buf, accumulators, denominators, float(scale), int(offset))
