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

Overlapped rounds and compressed syncs (docs/SEMANTICS.md, the last two sections). ``T`` is the
params' dtype (all params of a call share it), ``acc = state_dtype(T)``; ``sent`` (s),
``anchors`` (c), ``bases`` and ``residuals`` (e) are acc tensors; a *guard* is, like ``pack``'s,
``max |v|`` over the values written to the buffer, NaN if any is NaN or Inf:

- ``overlap_average_pack`` (buf of dtype T): ``a = acc(buf_seg) * acc(scale); x = T(a + (acc(x) -
  s)); s = acc(x); buf_seg = x``; returns the guard
- ``carry_pack`` (buf of dtype T): ``x = T(base + (acc(x) - s)); s = acc(x); buf_seg = x``;
  returns the guard
- ``pack_delta_fp16`` (float16 buf): ``d = (acc(x) - c) + e; q = float16(d); e = d - acc(q);
  buf_seg = q``; returns the guard (an overflow to ±Inf gives NaN)
- ``quantize_int8`` (int8 ``q``, acc ``scales``): each tensor is cut into blocks of
  ``INT8_BLOCK = 256`` consecutive elements (the last may be shorter; blocks never span tensors;
  block ``b`` of the call has its scale at ``scales[s_offset + b]``). Per block: ``d = (acc(x) -
  c) + e``; ``amax = max |d|``; if some d is NaN/Inf: ``scale = NaN, q = 0``; elif ``amax == 0``:
  ``scale = 0, q = 0``; else ``r = acc(127) / amax; q = clamp(rne(d * r), -127, 127)`` (``rne``:
  round half to even; ``q = 0`` where ``d * r`` is NaN, i.e. ``d = 0`` with ``r = Inf``, which
  an ``amax`` below ``127 / max_finite(acc)`` gives), ``scale = amax / acc(127)``; then
  ``e = d - acc(q) * scale``
- ``dequantize_int8_mean`` (``q_all`` int8 [n, Q], ``scales_all`` acc [n, S], ``out`` acc, the
  block layout given by ``numels``): ``v = acc(q_0[k]) * s_0[b]; v = v + acc(q_r[k]) * s_r[b]``
  for r = 1 .. n-1 in order; ``out[k] = v * acc(inv_n)``
- ``unpack_delta_average`` (buf float16 or acc): ``δ = acc(buf_seg) * acc(scale); c = c + δ;
  x = T(c)``
- ``overlap_delta_pack_fp16`` (float16 buf): ``δ = acc(buf_seg) * acc(scale); c = c + δ;
  x = T(c + (acc(x) - s)); d = (acc(x) - c) + e; q = float16(d); e = d - acc(q); s = acc(x);
  buf_seg = q``; returns the guard

``float16(d)`` of a float64 ``d`` is rounded once, directly (torch's own float64 -> float16 cast
goes through float32 and can round twice; the fallback avoids it). The results of these ops are
bit-identical between the implementations for every dtype (NaN payloads aside); the guard is
exact.

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
    "INT8_BLOCK",
    "int8_num_blocks",
    "overlap_average_pack",
    "carry_pack",
    "pack_delta_fp16",
    "quantize_int8",
    "dequantize_int8_mean",
    "unpack_delta_average",
    "overlap_delta_pack_fp16",
]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

#: Elements per int8 quantisation block (one scale each); blocks never span tensors.
INT8_BLOCK = 256


def int8_num_blocks(numels) -> int:
    """Number of int8 blocks (= scales) of tensors with these numels."""
    return sum((int(n) + INT8_BLOCK - 1) // INT8_BLOCK for n in numels)


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


_STATE_NOTE = " (float32 state for 16-bit/float32 params, float64 for float64 params)"
_FIRST_NOTE = " (the dtype of params[0])"


def _check_tensor(fn: str, arg: str, j: int, t, want: torch.dtype, buf: torch.Tensor,
                  numel: Optional[int] = None, ref: str = "params", note: Optional[str] = None,
                  bufname: str = "buf") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"horovod_local.{fn}: {arg}[{j}] is not a tensor "
                        f"({type(t).__name__})")
    if t.dtype != want:
        why = note if note is not None else (
            " (the dtype of buf)" if want == buf.dtype else _STATE_NOTE)
        raise TypeError(f"horovod_local.{fn}: {arg}[{j}] has dtype {_dtype_name(t.dtype)}, "
                        f"expected {_dtype_name(want)}{why}")
    if t.device != buf.device:
        raise ValueError(f"horovod_local.{fn}: {arg}[{j}] is on {t.device} but {bufname} is on "
                         f"{buf.device}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"horovod_local.{fn}: {arg}[{j}] has {t.numel()} elements (shape "
                         f"{list(t.shape)}) but {ref}[{j}] has {numel}")


def _check_len(fn: str, arg: str, got: int, want: int, ref: str = "params") -> None:
    if got != want:
        raise ValueError(f"horovod_local.{fn}: {arg} has {got} entries but {ref} has {want}")


def _checked_lists(fn: str, buf, offset: int, half: bool = False, **named) -> list:
    """The list arguments ``named`` (in argument order, one of them ``params``) of an op over
    ``buf``, as lists, after the extension's checks in its order: each is a list, ``buf`` (with
    ``half``: float16), then every other list has one entry per param."""
    lists = [_as_list(fn, name, v) for name, v in named.items()]
    _check_buf(fn, buf, offset)
    if half:
        _check_half_buf(fn, buf)
    n = len(lists[list(named).index("params")])
    for name, ts in zip(named, lists):
        if name != "params":
            _check_len(fn, name, len(ts), n)
    return lists


def _check_aligned(fn: str, buf: torch.Tensor, params: list, pdt, lists, sdt,
                   pnote: Optional[str] = None, snote: Optional[str] = None,
                   bufname: str = "buf") -> None:
    """params[j] (dtype ``pdt``) and, for each ``(name, tensors)`` of ``lists``, ``tensors[j]``
    (dtype ``sdt``, as many elements as params[j]): the checks of an op whose state lists run
    alongside its params (their lengths are checked by the caller, first)."""
    for j, p in enumerate(params):
        _check_tensor(fn, "params", j, p, pdt, buf, note=pnote, bufname=bufname)
        for name, ts in lists:
            _check_tensor(fn, name, j, ts[j], sdt, buf, p.numel(), note=snote, bufname=bufname)


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
        params, anchors, grads = _checked_lists(fn, buf, offset, params=params,
                                                anchors=anchors, grads=grads)
        sdt = state_dtype(buf.dtype)
        _check_aligned(fn, buf, params, buf.dtype, (("anchors", anchors), ("grads", grads)), sdt)
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

    # -- overlapped rounds and compressed syncs ------------------------------------------------

    @staticmethod
    @torch.no_grad()
    def overlap_average_pack(buf, params, sent, scale, offset=0):
        fn = "overlap_average_pack"
        params, sent = _checked_lists(fn, buf, offset, params=params, sent=sent)
        sdt = state_dtype(buf.dtype)
        _check_aligned(fn, buf, params, buf.dtype, (("sent", sent),), sdt)
        total = _total(params)
        _check_capacity(fn, buf, offset, total)
        scale = float(scale)
        for seg, p, s in zip(_flat_segments(buf, params, offset), params, sent):
            if not p.numel():
                continue
            a = seg.to(sdt) * scale
            x = (a + (_flat(p).to(sdt) - _flat(s))).to(p.dtype)
            _write(s, x.to(sdt))
            _write(p, x)
            seg.copy_(x)
        return _guard(buf, offset, total)

    @staticmethod
    @torch.no_grad()
    def carry_pack(bases, params, sent, buf, offset=0):
        fn = "carry_pack"
        bases, params, sent = _checked_lists(fn, buf, offset, bases=bases, params=params,
                                             sent=sent)
        sdt = state_dtype(buf.dtype)
        _check_aligned(fn, buf, params, buf.dtype, (("bases", bases), ("sent", sent)), sdt)
        total = _total(params)
        _check_capacity(fn, buf, offset, total)
        for seg, p, b, s in zip(_flat_segments(buf, params, offset), params, bases, sent):
            if not p.numel():
                continue
            x = (_flat(b) + (_flat(p).to(sdt) - _flat(s))).to(p.dtype)
            _write(s, x.to(sdt))
            _write(p, x)
            seg.copy_(x)
        return _guard(buf, offset, total)

    @staticmethod
    @torch.no_grad()
    def pack_delta_fp16(params, anchors, residuals, buf, offset=0):
        fn = "pack_delta_fp16"
        params, anchors, residuals = _checked_lists(fn, buf, offset, half=True, params=params,
                                                    anchors=anchors, residuals=residuals)
        pdt = _params_dtype(fn, params)
        sdt = state_dtype(pdt) if pdt is not None else None
        _check_aligned(fn, buf, params, pdt, (("anchors", anchors), ("residuals", residuals)),
                       sdt, _FIRST_NOTE, _STATE_NOTE)
        total = _total(params)
        _check_capacity(fn, buf, offset, total)
        for seg, p, c, e in zip(_flat_segments(buf, params, offset), params, anchors, residuals):
            if not p.numel():
                continue
            d = (_flat(p).to(sdt) - _flat(c)) + _flat(e)
            q = _to_half(d)
            _write(e, d - q.to(sdt))
            seg.copy_(q)
        return _guard(buf, offset, total)

    @staticmethod
    @torch.no_grad()
    def quantize_int8(params, anchors, residuals, q, scales, q_offset=0, s_offset=0):
        fn = "quantize_int8"
        params = _as_list(fn, "params", params)
        anchors = _as_list(fn, "anchors", anchors)
        residuals = _as_list(fn, "residuals", residuals)
        _check_flat(fn, "q", q, "q_offset", q_offset, None)
        if q.dtype != torch.int8:
            raise TypeError(f"horovod_local.{fn}: q has dtype {_dtype_name(q.dtype)}, expected "
                            "torch.int8")
        _check_flat(fn, "scales", scales, "s_offset", s_offset, (q, "q"))
        _check_len(fn, "anchors", len(anchors), len(params))
        _check_len(fn, "residuals", len(residuals), len(params))
        pdt = _params_dtype(fn, params)
        sdt = state_dtype(pdt) if pdt is not None else scales.dtype
        if scales.dtype != sdt or sdt not in (torch.float32, torch.float64):
            want = "torch.float64" if sdt == torch.float64 else "torch.float32"
            raise TypeError(f"horovod_local.{fn}: scales has dtype {_dtype_name(scales.dtype)}, "
                            f"expected {want}{_STATE_NOTE}")
        _check_aligned(fn, q, params, pdt, (("anchors", anchors), ("residuals", residuals)),
                       sdt, _FIRST_NOTE, _STATE_NOTE, bufname="q")
        total = _total(params)
        nblocks = int8_num_blocks(p.numel() for p in params)
        _check_room(fn, "q", q.numel(), "q_offset", q_offset, total, "total numel")
        _check_room(fn, "scales", scales.numel(), "s_offset", s_offset, nblocks, "blocks")
        if total == 0:
            return
        qf, sf = q.view(-1), scales.view(-1)
        c127 = torch.full((), 127.0, dtype=sdt, device=q.device)
        qo, so = q_offset, s_offset
        for p, c, e in zip(params, anchors, residuals):
            n = p.numel()
            if not n:
                continue
            nb = (n + INT8_BLOCK - 1) // INT8_BLOCK
            d = (_flat(p).to(sdt) - _flat(c)) + _flat(e)
            db = torch.nn.functional.pad(d, (0, nb * INT8_BLOCK - n)).view(nb, INT8_BLOCK)
            bad = ~torch.isfinite(db).all(dim=1)
            amax = db.abs().amax(dim=1)
            zero = amax == 0
            skip = bad | zero
            amax = torch.where(skip, torch.ones_like(amax), amax)
            r = c127 / amax
            v = torch.round(db * r[:, None])
            v = torch.where(torch.isnan(v), torch.zeros_like(v), v).clamp_(-127.0, 127.0)
            v = torch.where(skip[:, None], torch.zeros_like(v), v)
            sc = torch.where(bad, torch.full_like(amax, math.nan),
                             torch.where(zero, torch.zeros_like(amax), amax / c127))
            qi = v.to(torch.int8)
            e_new = db - qi.to(sdt) * sc[:, None]
            qf.narrow(0, qo, n).copy_(qi.view(-1)[:n])
            sf.narrow(0, so, nb).copy_(sc)
            _write(e, e_new.view(-1)[:n])
            qo += n
            so += nb

    @staticmethod
    @torch.no_grad()
    def dequantize_int8_mean(q_all, scales_all, out, inv_n, numels, q_offset=0, s_offset=0,
                             offset=0):
        fn = "dequantize_int8_mean"
        numels = _numel_list(fn, numels)
        _check_flat(fn, "out", out, "offset", offset, None)
        if out.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"horovod_local.{fn}: out has dtype {_dtype_name(out.dtype)}; "
                            "supported: torch.float32, torch.float64")
        _check_flat(fn, "q_all", q_all, "q_offset", q_offset, (out, "out"))
        if q_all.dtype != torch.int8:
            raise TypeError(f"horovod_local.{fn}: q_all has dtype {_dtype_name(q_all.dtype)}, "
                            "expected torch.int8")
        _check_flat(fn, "scales_all", scales_all, "s_offset", s_offset, (out, "out"))
        if scales_all.dtype != out.dtype:
            raise TypeError(f"horovod_local.{fn}: scales_all has dtype "
                            f"{_dtype_name(scales_all.dtype)}, expected "
                            f"{_dtype_name(out.dtype)} (the dtype of out)")
        if q_all.dim() != 2:
            raise ValueError(f"horovod_local.{fn}: q_all must be 2-D [ranks, elements], got "
                             f"shape {list(q_all.shape)}")
        if scales_all.dim() != 2:
            raise ValueError(f"horovod_local.{fn}: scales_all must be 2-D [ranks, blocks], got "
                             f"shape {list(scales_all.shape)}")
        nranks = q_all.shape[0]
        if nranks < 1:
            raise ValueError(f"horovod_local.{fn}: q_all has no rows (ranks)")
        if scales_all.shape[0] != nranks:
            raise ValueError(f"horovod_local.{fn}: scales_all has {scales_all.shape[0]} rows but "
                             f"q_all has {nranks}")
        for j, n in enumerate(numels):
            if n < 0:
                raise ValueError(f"horovod_local.{fn}: numels[{j}] = {n} must be >= 0")
        total = sum(numels)
        nblocks = int8_num_blocks(numels)
        _check_room(fn, "q_all", q_all.shape[1], "q_offset", q_offset, total, "total numel")
        _check_room(fn, "scales_all", scales_all.shape[1], "s_offset", s_offset, nblocks,
                    "blocks")
        _check_room(fn, "out", out.numel(), "offset", offset, total, "total numel")
        if total == 0:
            return
        adt, dev = out.dtype, out.device
        # the block of each element: the tensor's first block + local index // INT8_BLOCK
        idx, first = [], 0
        for n in numels:
            if n:
                idx.append(first + torch.arange(n, device=dev) // INT8_BLOCK)
                first += (n + INT8_BLOCK - 1) // INT8_BLOCK
        idx = torch.cat(idx)
        qs = q_all[:, q_offset: q_offset + total]
        ss = scales_all[:, s_offset: s_offset + nblocks]
        v = qs[0].to(adt) * ss[0][idx]
        for r in range(1, nranks):
            v = v + qs[r].to(adt) * ss[r][idx]
        out.view(-1).narrow(0, offset, total).copy_(v * float(inv_n))

    @staticmethod
    @torch.no_grad()
    def unpack_delta_average(buf, params, anchors, scale, offset=0):
        fn = "unpack_delta_average"
        params, anchors = _checked_lists(fn, buf, offset, params=params, anchors=anchors)
        pdt = _params_dtype(fn, params)
        sdt = state_dtype(pdt) if pdt is not None else None
        if pdt is not None and buf.dtype not in (torch.float16, sdt):
            raise TypeError(f"horovod_local.{fn}: buf has dtype {_dtype_name(buf.dtype)}, "
                            f"expected torch.float16 or {_dtype_name(sdt)} (the state dtype "
                            f"of params of {_dtype_name(pdt)})")
        _check_aligned(fn, buf, params, pdt, (("anchors", anchors),), sdt, _FIRST_NOTE,
                       _STATE_NOTE)
        total = _total(params)
        _check_capacity(fn, buf, offset, total)
        scale = float(scale)
        for seg, p, c in zip(_flat_segments(buf, params, offset), params, anchors):
            if not p.numel():
                continue
            cn = _flat(c) + seg.to(sdt) * scale
            _write(c, cn)
            _write(p, cn.to(p.dtype))

    @staticmethod
    @torch.no_grad()
    def overlap_delta_pack_fp16(buf, params, anchors, sent, residuals, scale, offset=0):
        fn = "overlap_delta_pack_fp16"
        params, anchors, sent, residuals = _checked_lists(
            fn, buf, offset, half=True, params=params, anchors=anchors, sent=sent,
            residuals=residuals)
        pdt = _params_dtype(fn, params)
        sdt = state_dtype(pdt) if pdt is not None else None
        _check_aligned(fn, buf, params, pdt,
                       (("anchors", anchors), ("sent", sent), ("residuals", residuals)), sdt,
                       _FIRST_NOTE, _STATE_NOTE)
        total = _total(params)
        _check_capacity(fn, buf, offset, total)
        scale = float(scale)
        for seg, p, c, s, e in zip(_flat_segments(buf, params, offset), params, anchors, sent,
                                   residuals):
            if not p.numel():
                continue
            cn = _flat(c) + seg.to(sdt) * scale
            x = (cn + (_flat(p).to(sdt) - _flat(s))).to(p.dtype)
            xa = x.to(sdt)
            d = (xa - cn) + _flat(e)
            q = _to_half(d)
            _write(e, d - q.to(sdt))
            _write(s, xa)
            _write(c, cn)
            _write(p, x)
            seg.copy_(q)
        return _guard(buf, offset, total)


# Helpers of the overlapped / compressed fallbacks.

def _total(tensors) -> int:
    return sum(t.numel() for t in tensors)


def _flat_segments(buf: torch.Tensor, tensors: list, offset: int) -> list:
    """1-D views of buf's segments (after the capacity check)."""
    flat = buf.view(-1)
    out, o = [], offset
    for t in tensors:
        n = t.numel()
        out.append(flat.narrow(0, o, n))
        o += n
    return out


def _flat(t: torch.Tensor) -> torch.Tensor:
    """t's elements in row-major order, 1-D (a view when t is contiguous, else a copy)."""
    return t.reshape(-1)


def _write(t: torch.Tensor, v: torch.Tensor) -> None:
    """t[...] = v (1-D, row-major), through t's strides."""
    t.copy_(v.view(t.shape))


def _guard(buf: torch.Tensor, offset: int, total: int) -> float:
    """max |v| over buf[offset: offset + total], NaN if any is NaN/Inf (0.0 for nothing)."""
    if total == 0:
        return 0.0
    lo, hi = torch.aminmax(buf.view(-1)[offset: offset + total])
    guard = max(-float(lo), float(hi)) if not torch.isnan(hi) else math.nan
    return guard if math.isfinite(guard) else math.nan


def _to_half(d: torch.Tensor) -> torch.Tensor:
    """float16(d), rounded once to nearest even, also for float64 d (torch's cast goes through
    float32: it rounds twice). float64: round to float32 with round-to-odd (exact, or the
    neighbour with an odd last bit), then to float16 (nearest even): the correct rounding."""
    if d.dtype != torch.float64:
        return d.to(torch.float16)
    f = d.to(torch.float32)
    fd = f.to(torch.float64)
    u = f.view(torch.int32)
    fix = (fd != d) & ~torch.isnan(d) & ((u & 1) == 0)
    u = torch.where(fix, torch.where(fd.abs() < d.abs(), u | 1, u - 1), u)
    return u.view(torch.float32).to(torch.float16)


def _params_dtype(fn: str, params: list):
    """T of a call whose buffer does not fix it: the dtype of params[0] (None without params)."""
    if not params:
        return None
    p = params[0]
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"horovod_local.{fn}: params[0] is not a tensor ({type(p).__name__})")
    if p.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"horovod_local.{fn}: params[0] has dtype {_dtype_name(p.dtype)}; "
                        "supported: torch.float32, torch.float64, torch.float16, torch.bfloat16")
    return p.dtype


def _check_half_buf(fn: str, buf: torch.Tensor) -> None:
    if buf.dtype != torch.float16:
        raise TypeError(f"horovod_local.{fn}: buf has dtype {_dtype_name(buf.dtype)}, expected "
                        "torch.float16")


def _check_flat(fn: str, arg: str, t, offname: str, off: int, ref) -> None:
    """A flat buffer other than buf (q, scales, out, q_all, scales_all); ``ref``: (tensor, name)
    whose device it must share, or None (then cpu or cuda)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"horovod_local.{fn}: {arg} must be a torch.Tensor, got "
                        f"{type(t).__name__}")
    if not t.is_contiguous():
        raise ValueError(f"horovod_local.{fn}: {arg} must be contiguous (it is written/read as "
                         "one flat buffer)")
    if off < 0:
        raise ValueError(f"horovod_local.{fn}: {offname} must be >= 0, got {off}")
    if ref is not None and t.device != ref[0].device:
        raise ValueError(f"horovod_local.{fn}: {arg} is on {t.device} but {ref[1]} is on "
                         f"{ref[0].device}")


def _check_room(fn: str, arg: str, have: int, offname: str, off: int, need: int,
                what: str) -> None:
    if off + need > have:
        raise ValueError(f"horovod_local.{fn}: buffer {arg} too small: {offname} {off} + {need} "
                         f"{what} = {off + need} elements, but {arg} has {have}")


def _numel_list(fn: str, numels) -> list:
    if isinstance(numels, torch.Tensor):
        numels = numels.tolist()
    try:
        return [int(n) for n in numels]
    except TypeError:
        raise TypeError(f"horovod_local.{fn}: numels must be a list of ints, got "
                        f"{type(numels).__name__}") from None


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

    def overlap_average_pack(self, buf, params, sent, scale, offset=0):
        fn = "overlap_average_pack"
        return self._C.overlap_average_pack(buf, _as_list(fn, "params", params),
                                            _as_list(fn, "sent", sent), scale, offset)

    def carry_pack(self, bases, params, sent, buf, offset=0):
        fn = "carry_pack"
        return self._C.carry_pack(_as_list(fn, "bases", bases), _as_list(fn, "params", params),
                                  _as_list(fn, "sent", sent), buf, offset)

    def pack_delta_fp16(self, params, anchors, residuals, buf, offset=0):
        fn = "pack_delta_fp16"
        return self._C.pack_delta_fp16(_as_list(fn, "params", params),
                                       _as_list(fn, "anchors", anchors),
                                       _as_list(fn, "residuals", residuals), buf, offset)

    def quantize_int8(self, params, anchors, residuals, q, scales, q_offset=0, s_offset=0):
        fn = "quantize_int8"
        self._C.quantize_int8(_as_list(fn, "params", params), _as_list(fn, "anchors", anchors),
                              _as_list(fn, "residuals", residuals), q, scales, q_offset,
                              s_offset)

    def dequantize_int8_mean(self, q_all, scales_all, out, inv_n, numels, q_offset=0,
                             s_offset=0, offset=0):
        fn = "dequantize_int8_mean"
        self._C.dequantize_int8_mean(q_all, scales_all, out, inv_n, _numel_list(fn, numels),
                                     q_offset, s_offset, offset)

    def unpack_delta_average(self, buf, params, anchors, scale, offset=0):
        fn = "unpack_delta_average"
        self._C.unpack_delta_average(buf, _as_list(fn, "params", params),
                                     _as_list(fn, "anchors", anchors), scale, offset)

    def overlap_delta_pack_fp16(self, buf, params, anchors, sent, residuals, scale, offset=0):
        fn = "overlap_delta_pack_fp16"
        return self._C.overlap_delta_pack_fp16(buf, _as_list(fn, "params", params),
                                               _as_list(fn, "anchors", anchors),
                                               _as_list(fn, "sent", sent),
                                               _as_list(fn, "residuals", residuals), scale,
                                               offset)


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


# Overlapped rounds (docs/SEMANTICS.md "Overlapped rounds").

def overlap_average_pack(buf: torch.Tensor, params: Sequence[torch.Tensor],
                         sent: Sequence[torch.Tensor], scale: float, offset: int = 0) -> float:
    """Complete the round in flight and pack the next one, in one pass over ``buf``::

        a = acc(buf_seg) * scale          # the average of what was sent (buf: the summed round)
        x = T(a + (acc(x) - s))           # plus the local progress made while it travelled
        s = acc(x); buf_seg = x           # the next round's send

    ``buf`` and ``params`` have dtype T; ``sent`` (s): ``state_dtype(T)``. Returns the guard of
    what was packed (max |x|, NaN if any element is non-finite), like :func:`pack`.
    """
    return float(_for(buf).overlap_average_pack(buf, params, sent, float(scale), int(offset)))


def carry_pack(bases: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
               sent: Sequence[torch.Tensor], buf: torch.Tensor, offset: int = 0) -> float:
    """``x = T(base + (acc(x) - s)); s = acc(x); buf_seg = x`` (e.g. base = SlowMo's new x0).

    ``bases`` and ``sent``: ``state_dtype(T)``, T = buf's dtype. Returns the guard (max |x|).
    """
    return float(_for(buf).carry_pack(bases, params, sent, buf, int(offset)))


# Compressed syncs (docs/SEMANTICS.md "Compressed syncs").

def pack_delta_fp16(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor],
                    residuals: Sequence[torch.Tensor], buf: torch.Tensor,
                    offset: int = 0) -> float:
    """fp16 send with error feedback: ``d = (acc(x) - c) + e; q = float16(d); e = d - acc(q);
    buf_seg = q``. ``buf``: float16; ``anchors`` (c), ``residuals`` (e): ``state_dtype(T)``.

    Returns the guard max |q| (NaN if any q is NaN or ±Inf, e.g. d beyond float16's range).
    """
    return float(_for(buf).pack_delta_fp16(params, anchors, residuals, buf, int(offset)))


def quantize_int8(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor],
                  residuals: Sequence[torch.Tensor], q: torch.Tensor, scales: torch.Tensor,
                  q_offset: int = 0, s_offset: int = 0) -> None:
    """Blockwise int8 send with error feedback (blocks of :data:`INT8_BLOCK` elements of one
    tensor; see the module docstring for the exact arithmetic).

    ``q``: contiguous int8, tensor j at ``q[q_offset + start_j:]``; ``scales``: contiguous
    ``state_dtype(T)``, one per block from ``scales[s_offset]`` (:func:`int8_num_blocks` of the
    numels); ``residuals`` are updated, ``params`` and ``anchors`` only read.
    """
    _for(q).quantize_int8(params, anchors, residuals, q, scales, int(q_offset), int(s_offset))


def dequantize_int8_mean(q_all: torch.Tensor, scales_all: torch.Tensor, out: torch.Tensor,
                         inv_n: float, numels: Sequence[int], q_offset: int = 0,
                         s_offset: int = 0, offset: int = 0) -> None:
    """The mean of the ranks' int8 sends (the allgathered ``q_all`` int8 [n, Q] and
    ``scales_all`` [n, S], acc dtype) into ``out`` (acc, 1 value an element)::

        v = acc(q_0[k]) * s_0[b];  v = v + acc(q_r[k]) * s_r[b]  (r = 1 .. n-1, in order)
        out[offset + k] = v * acc(inv_n)

    ``numels``: the numels of the tensors that were quantised (they fix the blocks ``b``);
    element k of the call is at ``q_all[:, q_offset + k]``, its block's scale at
    ``scales_all[:, s_offset + b]``.
    """
    _for(out).dequantize_int8_mean(q_all, scales_all, out, float(inv_n), numels, int(q_offset),
                                   int(s_offset), int(offset))


def unpack_delta_average(buf: torch.Tensor, params: Sequence[torch.Tensor],
                         anchors: Sequence[torch.Tensor], scale: float, offset: int = 0) -> None:
    """Apply an averaged delta: ``c = c + acc(buf_seg) * scale; x = T(c)``.

    ``buf``: float16 (the summed fp16 deltas, ``scale = 1/n``) or ``state_dtype(T)`` (the output
    of :func:`dequantize_int8_mean`, ``scale = 1.0``); ``anchors`` (c): ``state_dtype(T)``.
    """
    _for(buf).unpack_delta_average(buf, params, anchors, float(scale), int(offset))


def overlap_delta_pack_fp16(buf: torch.Tensor, params: Sequence[torch.Tensor],
                            anchors: Sequence[torch.Tensor], sent: Sequence[torch.Tensor],
                            residuals: Sequence[torch.Tensor], scale: float,
                            offset: int = 0) -> float:
    """Overlapped fp16 round: complete the round in flight and send the next, in one pass::

        c = c + acc(buf_seg) * scale;  x = T(c + (acc(x) - s))
        d = (acc(x) - c) + e;  q = float16(d);  e = d - acc(q);  s = acc(x);  buf_seg = q

    ``buf``: float16; ``anchors``, ``sent``, ``residuals``: ``state_dtype(T)``. Returns the
    guard max |q| (NaN if any is non-finite).
    """
    return float(_for(buf).overlap_delta_pack_fp16(buf, params, anchors, sent, residuals,
                                                   float(scale), int(offset)))
