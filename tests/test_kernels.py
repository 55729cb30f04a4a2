"""Fused pack/unpack kernels (horovod_local.torch._kernels): extension vs PyTorch fallback.

- float32/float64 results (and the float32 SlowMo state of 16-bit params) must be bit-identical
  between the C++/CUDA extension and the fallback; 16-bit results equal to dtype rounding;
  deviation sums equal to float64 rounding (the summation order differs).
- One case per function is checked against an independent NumPy formula.
- Extension-vs-fallback comparisons are skipped when the extension is not built, unless
  HOROVOD_LOCAL_REQUIRE_EXT=1 (then they fail).
- The CUDA variants run when torch.cuda.is_available().
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
import zlib

import numpy as np
import pytest
import torch

from horovod_local.torch import _kernels as K
from kernel_backends import _CPP, _CPP_ERROR, DEVICES, HAS_CUDA, REQUIRE_EXT, cpp_backend

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
FNS = ["pack", "unpack_average", "unpack_average_deviation", "unpack_slowmo",
       "unpack_pseudo_grad", "unpack_adaalter"]
SCALE = 1.0 / 3.0
ALPHA, BETA = 0.9, 0.7


# ---------------------------------------------------------------------------------------------
# Inputs. A "layout" is a list of (shape, kind); kind: "c" contiguous, "t" transposed view,
# "s" column slice of a wider tensor, "k" strided 1-D slice. build() is deterministic in `seed`,
# so two calls give identical, independent inputs (same values, same strides).

def _layout(name: str) -> list:
    if name == "odd":
        return [((1,), "c"), ((7,), "c"), ((1023,), "c"), ((100003,), "c")]
    if name == "empty":
        return [((0,), "c"), ((3,), "c"), ((0, 5), "c"), ((4,), "c"), ((0,), "c")]
    if name == "many":
        rng = np.random.default_rng(7)
        out = []
        for i in range(300):
            n = int(rng.integers(1, 200))
            out.append((((n,) if i % 3 else (n % 13 + 1, 3)), "c"))
        return out
    if name == "mixed":
        return [((3, 4), "c"), ((17,), "c"), ((2, 3, 5), "c"), ((1,), "c"), ((64, 33), "c"),
                ((5, 1, 2), "c")]
    if name == "noncontig":
        return [((6, 5), "t"), ((9,), "s"), ((4,), "c"), ((33,), "k"), ((7, 130), "t"),
                ((1,), "s"), ((2000,), "k"), ((0,), "s")]
    raise KeyError(name)


LAYOUTS = ["odd", "empty", "many", "mixed", "noncontig"]


def _make(g: torch.Generator, shape, kind: str, dtype, device, lo=-2.0, hi=2.0):
    def rnd(*s):
        return (torch.rand(*s, generator=g) * (hi - lo) + lo).to(dtype)
    if kind == "c":
        t = rnd(*shape)
    elif kind == "t":
        t = rnd(*reversed(shape)).t()
    elif kind == "s":
        t = rnd(*shape, 3)[..., 1]
    elif kind == "k":
        t = rnd(shape[0] * 2 + 1)[1::2]
    else:
        raise KeyError(kind)
    if device != "cpu":
        t = t.to(device)
        if kind != "c":  # .to() makes slices contiguous: rebuild the view on the device
            t = _noncontig_like(t, kind)
    return t


def _noncontig_like(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "t":
        base = t.t().contiguous()
        return base.t()
    if kind == "s":
        base = torch.zeros(*t.shape, 3, dtype=t.dtype, device=t.device)
        base[..., 1] = t
        return base[..., 1]
    base = torch.zeros(t.shape[0] * 2 + 1, dtype=t.dtype, device=t.device)
    base[1::2] = t
    return base[1::2]


def build(fn: str, layout: str, dtype, device: str, seed: int = 0, offset: int = 5):
    """(args tuple for the function, list of tensors to compare afterwards)."""
    g = torch.Generator().manual_seed(seed)
    spec = _layout(layout)
    sdt = K.state_dtype(dtype)
    params = [_make(g, s, k, dtype, device) for s, k in spec]
    total = sum(p.numel() for p in params)
    # the allreduced sum, with garbage around the segments (offset in front, 3 behind)
    buf = _make(g, (offset + total + 3,), "c", dtype, device, -6.0, 6.0)
    if fn == "pack":
        return (params, buf, offset), [buf] + params
    if fn in ("unpack_average", "unpack_average_deviation"):
        return (buf, params, SCALE, offset), [buf] + params
    if fn == "unpack_slowmo":
        anchors = [_make(g, s, k, sdt, device) for s, k in spec]
        momenta = [_make(g, s, k, sdt, device, -0.5, 0.5) for s, k in spec]
        lrs = [0.05 * (1 + (j % 4)) for j in range(len(spec))]
        return ((buf, params, anchors, momenta, SCALE, lrs, ALPHA, BETA, offset),
                [buf] + params + anchors + momenta)
    if fn == "unpack_pseudo_grad":
        anchors = [_make(g, s, k, sdt, device) for s, k in spec]
        grads = [_make(g, s, k, sdt, device) for s, k in spec]
        return (buf, params, anchors, grads, SCALE, offset), [buf] + params + anchors + grads
    if fn == "unpack_adaalter":
        dens = [_make(g, s, k, dtype, device) for s, k in spec]
        return (buf, params, dens, SCALE, offset), [buf] + params + dens
    raise KeyError(fn)


def assert_same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), what
    if torch.equal(a, b):
        return
    if a.dtype in (torch.float16, torch.bfloat16):
        # equal to dtype rounding (one ulp); in practice identical
        torch.testing.assert_close(a.float().cpu(), b.float().cpu(), rtol=torch.finfo(a.dtype).eps,
                                   atol=0.0, msg=lambda m: f"{what}: {m}")
    else:
        if not torch.equal(a.cpu(), b.cpu()):
            diff = (a.double() - b.double()).abs().max().item()
            raise AssertionError(f"{what}: not bit-identical (max abs diff {diff:g})")


def assert_dev_close(a, b, what="deviation"):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    assert isinstance(a, float) and isinstance(b, float), what
    assert a == pytest.approx(b, rel=1e-9, abs=1e-300), f"{what}: {a!r} vs {b!r}"


def run(impl, fn, args):
    return getattr(impl, fn)(*args)


# ---------------------------------------------------------------------------------------------
# Extension vs fallback.

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("fn", FNS)
def test_extension_matches_fallback(fn, dtype, layout, device):
    cpp = cpp_backend(device)
    seed = zlib.crc32(f"{fn}/{layout}".encode()) % 1000
    args_c, outs_c = build(fn, layout, dtype, device, seed=seed)
    args_p, outs_p = build(fn, layout, dtype, device, seed=seed)
    written = [] if fn == "pack" else list(args_c[3] if fn == "unpack_pseudo_grad" else args_c[1])
    before = [t.clone() for t in written]
    rc = run(cpp, fn, args_c)
    rp = run(K._python, fn, args_p)
    assert_dev_close(rc, rp)
    for j, (a, b) in enumerate(zip(outs_c, outs_p)):
        assert_same(a, b, f"{fn}/{layout}/{dtype}: output tensor {j}")
    # the outputs actually changed (guards against a no-op on both sides)
    if fn != "pack" and layout != "empty":
        assert any(not torch.equal(a, b) for a, b in zip(written, before) if a.numel())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", FNS)
def test_public_api_dispatch(fn, device):
    """The public functions give the same results as the backend they report."""
    args_a, outs_a = build(fn, "mixed", torch.float32, device, seed=3)
    args_b, outs_b = build(fn, "mixed", torch.float32, device, seed=3)
    ra = getattr(K, fn)(*args_a)
    rb = run(K._for(args_b[1] if fn == "pack" else args_b[0]), fn, args_b)
    if fn in ("unpack_average", "unpack_adaalter"):
        assert ra is None
    else:
        assert isinstance(ra, float)
    assert_dev_close(ra, rb)
    for a, b in zip(outs_a, outs_b):
        assert_same(a, b, fn)


@pytest.mark.parametrize("impl", ["cpp", "python"])
@pytest.mark.parametrize("fn", FNS)
def test_offset_and_untouched_buffer(impl, fn):
    """Segments start at `offset`; pack writes only the segments, the unpacks never write buf."""
    backend = cpp_backend() if impl == "cpp" else K._python
    args, _ = build(fn, "mixed", torch.float64, "cpu", seed=11, offset=17)
    buf = args[1] if fn == "pack" else args[0]
    before = buf.clone()
    run(backend, fn, args)
    total = sum(t.numel() for t in (args[0] if fn == "pack" else args[1]))
    assert torch.equal(buf[:17], before[:17])
    assert torch.equal(buf[17 + total:], before[17 + total:])
    if fn == "pack":
        flat = torch.cat([t.reshape(-1) for t in args[0]])
        assert torch.equal(buf[17:17 + total], flat)
    else:
        assert torch.equal(buf, before)


@pytest.mark.parametrize("impl", ["cpp", "python"])
def test_pack_then_unpack_roundtrip(impl):
    backend = cpp_backend() if impl == "cpp" else K._python
    g = torch.Generator().manual_seed(1)
    src = [torch.randn(5, 7, generator=g).t(), torch.randn(0), torch.randn(13, generator=g)]
    dst = [torch.zeros(5, 7).t(), torch.zeros(0), torch.zeros(13)]
    buf = torch.full((60,), -1.0)
    backend.pack(src, buf, 2)
    backend.unpack_average(buf, dst, 1.0, 2)
    for s, d in zip(src, dst):
        assert torch.equal(s, d)
    assert torch.equal(buf[:2], torch.full((2,), -1.0))
    assert torch.equal(buf[50:], torch.full((10,), -1.0))


def test_deviation_independent_of_threads():
    cpp = cpp_backend()
    old = torch.get_num_threads()
    results = []
    try:
        for nt in (1, max(2, old)):
            torch.set_num_threads(nt)
            args, _ = build("unpack_average_deviation", "odd", torch.float32, "cpu", seed=5)
            results.append(cpp.unpack_average_deviation(*args))
    finally:
        torch.set_num_threads(old)
    assert results[0] == results[1]


@pytest.mark.parametrize("impl", ["cpp", "python"])
def test_params_requiring_grad(impl):
    """Leaf parameters (requires_grad) and views of them can be written."""
    backend = cpp_backend() if impl == "cpp" else K._python
    base = torch.nn.Parameter(torch.randn(4, 6))
    p2 = torch.nn.Parameter(torch.randn(5))
    buf = torch.randn(29)
    anchors = [torch.randn(6, 4), torch.randn(5)]
    momenta = [torch.zeros(6, 4), torch.zeros(5)]
    v0 = p2._version
    dev = backend.unpack_slowmo(buf, [base.t(), p2], anchors, momenta, 0.5, [0.1, 0.1], 1.0,
                                0.5, 0)
    assert dev > 0
    assert torch.equal(base.detach().t(), anchors[0])
    assert torch.equal(p2.detach(), anchors[1])
    assert p2._version > v0  # in-place writes are visible to autograd
    assert base.requires_grad and p2.requires_grad


# ---------------------------------------------------------------------------------------------
# Against independent NumPy formulas (float32/float16 arithmetic in NumPy rounds each operation,
# like the kernels, so the comparison is exact except for the deviation sums).

def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _impls():
    out = [pytest.param("python")]
    out.append(pytest.param("cpp"))
    return out


def _backend(name):
    return cpp_backend() if name == "cpp" else K._python


@pytest.mark.parametrize("impl", _impls())
def test_numpy_pack(impl):
    b = _backend(impl)
    rng = np.random.default_rng(0)
    arrs = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    ts = [torch.from_numpy(arrs[0]).t(), torch.from_numpy(arrs[1])]  # first one transposed
    buf = torch.zeros(30)
    b.pack(ts, buf, 4)
    want = np.zeros(30, np.float32)
    want[4:4 + 12] = arrs[0].T.reshape(-1)  # row-major flattening of the (4, 3) view
    want[16:21] = arrs[1]
    np.testing.assert_array_equal(_np(buf), want)


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_pack_guard(impl, dtype):
    """pack returns max |x| over everything it packed (exact), computed in the copy pass; NaN if
    any element is NaN or Inf, wherever it sits (block edges, the tail, a strided view)."""
    b = _backend(impl)
    rng = np.random.default_rng(5)
    sizes = [40000, 0, 16384 + 3, 7, 3 * 16384]  # crosses the C++ kernel's 16384-element blocks
    arrs = [rng.standard_normal(n) * 4 for n in sizes]
    ts = [torch.from_numpy(a).to(dtype) for a in arrs]
    ts[3] = torch.from_numpy(rng.standard_normal((7, 2))).to(dtype).t()[0]  # strided
    buf = torch.zeros(sum(t.numel() for t in ts) + 2, dtype=dtype)
    want = max(float(t.abs().max()) for t in ts if t.numel())
    assert b.pack(ts, buf, 1) == want
    assert b.pack([torch.zeros(0, dtype=dtype)], buf, 1) == 0.0
    for j, pos in [(0, 0), (0, 16383), (2, 16384 + 2), (3, 1), (4, 3 * 16384 - 1)]:
        for bad in (float("nan"), float("inf"), float("-inf")):
            ts_bad = [t.clone() for t in ts]
            ts_bad[j].view(-1)[pos] = bad
            assert math.isnan(b.pack(ts_bad, buf, 1)), (j, pos, bad)
            assert torch.equal(buf[1: 1 + ts_bad[j].numel()].isnan(), ts_bad[0].isnan()) \
                if j == 0 else True  # the copy itself is unaffected by the guard


@pytest.mark.parametrize("impl", _impls())
def test_numpy_unpack_average(impl):
    b = _backend(impl)
    rng = np.random.default_rng(1)
    bufn = rng.standard_normal(40).astype(np.float16)
    ts = [torch.zeros(3, 5, dtype=torch.float16), torch.zeros(7, dtype=torch.float16)]
    b.unpack_average(torch.from_numpy(bufn), ts, SCALE, 3)
    x = (bufn.astype(np.float32) * np.float32(SCALE)).astype(np.float16)
    np.testing.assert_array_equal(_np(ts[0]).reshape(-1), x[3:18])
    np.testing.assert_array_equal(_np(ts[1]), x[18:25])


@pytest.mark.parametrize("impl", _impls())
def test_numpy_unpack_average_deviation(impl):
    b = _backend(impl)
    rng = np.random.default_rng(2)
    bufn = rng.standard_normal(50).astype(np.float32)
    olds = [rng.standard_normal((4, 4)).astype(np.float32), rng.standard_normal(9).astype(np.float32)]
    ts = [torch.from_numpy(o.copy()) for o in olds]
    dev = b.unpack_average_deviation(torch.from_numpy(bufn), ts, SCALE, 1)
    x = bufn * np.float32(SCALE)
    new0, new1 = x[1:17].reshape(4, 4), x[17:26]
    np.testing.assert_array_equal(_np(ts[0]), new0)
    np.testing.assert_array_equal(_np(ts[1]), new1)
    want = sum(float(np.sum((n.astype(np.float64) - o.astype(np.float64)) ** 2))
               for n, o in zip((new0, new1), olds))
    assert dev == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("pdt", [np.float32, np.float64])
@pytest.mark.parametrize("impl", _impls())
def test_numpy_unpack_slowmo(impl, pdt):
    b = _backend(impl)
    rng = np.random.default_rng(3)
    n0, n1 = 6, 11
    bufn = rng.standard_normal(n0 + n1 + 2).astype(pdt)
    ps = [rng.standard_normal(n0).astype(pdt), rng.standard_normal(n1).astype(pdt)]
    x0s = [rng.standard_normal(n0).astype(pdt), rng.standard_normal(n1).astype(pdt)]
    us = [rng.standard_normal(n0).astype(pdt), rng.standard_normal(n1).astype(pdt)]
    lrs = [0.1, 0.03]
    tp = [torch.from_numpy(a.copy()) for a in ps]
    tx = [torch.from_numpy(a.copy()) for a in x0s]
    tu = [torch.from_numpy(a.copy()) for a in us]
    dev = b.unpack_slowmo(torch.from_numpy(bufn), tp, tx, tu, SCALE, lrs, ALPHA, BETA, 2)
    want_dev, off = 0.0, 2
    for j, n in enumerate((n0, n1)):
        x = bufn[off:off + n] * pdt(SCALE)
        want_dev += float(np.sum((x.astype(np.float64) - ps[j].astype(np.float64)) ** 2))
        u = pdt(BETA) * us[j]
        u = u + (x0s[j] - x) / pdt(lrs[j])
        x0 = x0s[j] - pdt(ALPHA * lrs[j]) * u
        np.testing.assert_array_equal(_np(tu[j]), u)
        np.testing.assert_array_equal(_np(tx[j]), x0)
        np.testing.assert_array_equal(_np(tp[j]), x0)
        off += n
    assert dev == pytest.approx(want_dev, rel=1e-12)


@pytest.mark.parametrize("impl", _impls())
def test_numpy_unpack_slowmo_bf16_params(impl):
    """16-bit params with float32 state: state exact, params = x0 rounded to bfloat16."""
    b = _backend(impl)
    rng = np.random.default_rng(4)
    bufn = rng.standard_normal(20).astype(np.float32)
    buf = torch.from_numpy(bufn).to(torch.bfloat16)
    p = torch.from_numpy(rng.standard_normal(20).astype(np.float32)).to(torch.bfloat16)
    x0n = rng.standard_normal(20).astype(np.float32)
    un = rng.standard_normal(20).astype(np.float32)
    tx, tu, pold = torch.from_numpy(x0n.copy()), torch.from_numpy(un.copy()), p.clone()
    dev = b.unpack_slowmo(buf, [p], [tx], [tu], 0.25, [0.2], ALPHA, BETA, 0)
    x = _np(buf.float()) * np.float32(0.25)
    u = np.float32(BETA) * un + (x0n - x) / np.float32(0.2)
    x0 = x0n - np.float32(ALPHA * 0.2) * u
    np.testing.assert_array_equal(_np(tu), u)
    np.testing.assert_array_equal(_np(tx), x0)
    assert torch.equal(p, torch.from_numpy(x0).to(torch.bfloat16))
    xr = torch.from_numpy(x).to(torch.bfloat16).double()
    assert dev == pytest.approx(float(((xr - pold.double()) ** 2).sum()), rel=1e-12)


@pytest.mark.parametrize("impl", _impls())
def test_numpy_unpack_pseudo_grad(impl):
    b = _backend(impl)
    rng = np.random.default_rng(5)
    bufn = rng.standard_normal(12).astype(np.float32)
    pn = rng.standard_normal((2, 5)).astype(np.float32)
    x0n = rng.standard_normal((2, 5)).astype(np.float32)
    p, x0, g = torch.from_numpy(pn.copy()), torch.from_numpy(x0n.copy()), torch.zeros(2, 5)
    dev = b.unpack_pseudo_grad(torch.from_numpy(bufn), [p], [x0], [g], SCALE, 2)
    x = (bufn[2:12] * np.float32(SCALE)).reshape(2, 5)
    np.testing.assert_array_equal(_np(g), x0n - x)
    np.testing.assert_array_equal(_np(p), pn)      # params are only read
    np.testing.assert_array_equal(_np(x0), x0n)    # anchors too
    assert dev == pytest.approx(float(np.sum((x.astype(np.float64) - pn) ** 2)), rel=1e-12)


@pytest.mark.parametrize("impl", _impls())
def test_numpy_unpack_adaalter(impl):
    b = _backend(impl)
    rng = np.random.default_rng(6)
    bufn = rng.random(30)
    a2 = [torch.zeros(3, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)]
    b2 = [torch.ones(3, 3, dtype=torch.float64), torch.ones(4, dtype=torch.float64)]
    b.unpack_adaalter(torch.from_numpy(bufn), a2, b2, 0.125, 10)
    x = bufn * 0.125
    for t in (a2[0], b2[0]):
        np.testing.assert_array_equal(_np(t).reshape(-1), x[10:19])
    for t in (a2[1], b2[1]):
        np.testing.assert_array_equal(_np(t), x[19:23])


# ---------------------------------------------------------------------------------------------
# Bad inputs: clear errors, raised before anything is written.

def _bad_cases():
    f32, f64, f16 = torch.float32, torch.float64, torch.float16
    z = torch.zeros
    meta = torch.zeros(3, device="meta")
    return {
        "dtype_mismatch": (lambda: ("pack", ([z(3), z(3, dtype=f64)], z(10))),
                           TypeError, "tensors[1] has dtype torch.float64"),
        "buffer_too_small": (lambda: ("unpack_average", (z(10), [z(4), z(5)], 0.5, 2)),
                             ValueError, "buffer too small"),
        "device_mismatch": (lambda: ("unpack_average", (z(10), [z(2), meta], 0.5, 0)),
                            ValueError, "tensors[1] is on meta"),
        "negative_offset": (lambda: ("pack", ([z(3)], z(10), -1)), ValueError, "offset"),
        "buf_not_contiguous": (lambda: ("pack", ([z(3)], z(10, 2)[:, 0])), ValueError,
                               "contiguous"),
        "buf_int": (lambda: ("pack", ([z(3, dtype=torch.int32)], z(10, dtype=torch.int32))),
                    TypeError, "dtype torch.int32"),
        "anchor_dtype": (lambda: ("unpack_slowmo", (z(10, dtype=f16), [z(3, dtype=f16)],
                                                    [z(3, dtype=f16)], [z(3)], 0.5, [0.1], 1.0,
                                                    0.5, 0)),
                         TypeError, "anchors[0] has dtype torch.float16, expected torch.float32"),
        "momenta_numel": (lambda: ("unpack_slowmo", (z(10), [z(3), z(2)], [z(3), z(2)],
                                                     [z(3), z(4)], 0.5, [0.1, 0.1], 1.0, 0.5, 0)),
                          ValueError, "momenta[1] has 4 elements"),
        "lrs_length": (lambda: ("unpack_slowmo", (z(10), [z(3)], [z(3)], [z(3)], 0.5, [0.1, 0.2],
                                                  1.0, 0.5, 0)),
                       ValueError, "lrs has 2 entries"),
        "lr_zero": (lambda: ("unpack_slowmo", (z(10), [z(3)], [z(3)], [z(3)], 0.5, [0.0],
                                               1.0, 0.5, 0)),
                    ValueError, "lrs[0]"),
        "grads_length": (lambda: ("unpack_pseudo_grad", (z(10), [z(3)], [z(3)], [], 0.5, 0)),
                         ValueError, "grads has 0 entries"),
        "grads_dtype": (lambda: ("unpack_pseudo_grad", (z(10, dtype=f64), [z(3, dtype=f64)],
                                                        [z(3, dtype=f64)], [z(3)], 0.5, 0)),
                        TypeError, "grads[0] has dtype torch.float32"),
        "denominator_numel": (lambda: ("unpack_adaalter", (z(10), [z(3)], [z(4)], 0.5, 0)),
                              ValueError, "denominators[0] has 4 elements"),
        "deviation_dtype": (lambda: ("unpack_average_deviation", (z(10, dtype=f64), [z(3)],
                                                                  0.5, 0)),
                            TypeError, "tensors[0] has dtype torch.float32"),
        "single_tensor": (lambda: ("pack", (z(3), z(10))), TypeError, "list of tensors"),
    }


@pytest.mark.parametrize("impl", ["cpp", "python", "public"])
@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_bad_inputs(case, impl):
    make, exc, text = _bad_cases()[case]
    fn, args = make()
    target = {"cpp": lambda: cpp_backend(), "python": lambda: K._python, "public": lambda: K}[impl]()
    with pytest.raises(exc, match=text.replace("[", r"\[").replace("]", r"\]")) as info:
        getattr(target, fn)(*args)
    assert f"horovod_local.{fn}" in str(info.value)


@pytest.mark.parametrize("impl", ["cpp", "python"])
def test_error_before_any_write(impl):
    backend = cpp_backend() if impl == "cpp" else K._python
    good = torch.ones(4)
    with pytest.raises(TypeError):
        backend.unpack_average(torch.full((10,), 7.0), [good, torch.ones(2, dtype=torch.float64)],
                               1.0, 0)
    assert torch.equal(good, torch.ones(4))
    with pytest.raises(ValueError):
        backend.unpack_average(torch.full((6,), 7.0), [good, torch.ones(3)], 1.0, 0)
    assert torch.equal(good, torch.ones(4))


# ---------------------------------------------------------------------------------------------
# Backend selection.

def _fresh_kernels(monkeypatch, backend_env, hide_ext=False):
    """A fresh copy of the _kernels module, imported under another name with the given env."""
    if backend_env is None:
        monkeypatch.delenv("HOROVOD_LOCAL_BACKEND", raising=False)
    else:
        monkeypatch.setenv("HOROVOD_LOCAL_BACKEND", backend_env)
    if hide_ext:
        import horovod_local
        monkeypatch.setitem(sys.modules, "horovod_local._C", None)  # import raises ImportError
        monkeypatch.delattr(horovod_local, "_C", raising=False)
    spec = importlib.util.spec_from_file_location("_hl_kernels_copy", K.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_backend_reporting():
    assert K.BACKEND in ("cpp", "python")
    info = K.backend_info()
    if K.BACKEND == "cpp":
        assert info.startswith("cpp extension horovod_local._C (CPU, ")
        assert "threads" in info
    else:
        assert info.startswith("python fallback: ")
    if REQUIRE_EXT:
        assert _CPP is not None, _CPP_ERROR
        if os.environ.get("HOROVOD_LOCAL_BACKEND", "auto") != "python":
            assert K.BACKEND == "cpp"


def test_backend_env_python(monkeypatch):
    mod = _fresh_kernels(monkeypatch, "python")
    assert mod.BACKEND == "python"
    assert mod.backend_info() == "python fallback: forced by HOROVOD_LOCAL_BACKEND=python"
    buf = torch.zeros(4)
    mod.pack([torch.ones(4)], buf)
    assert torch.equal(buf, torch.ones(4))


def test_backend_env_cpp(monkeypatch):
    if _CPP is not None:
        assert _fresh_kernels(monkeypatch, "cpp").BACKEND == "cpp"
    with pytest.raises(ImportError, match="HOROVOD_LOCAL_BACKEND=cpp"):
        _fresh_kernels(monkeypatch, "cpp", hide_ext=True)


def test_backend_auto_without_extension(monkeypatch):
    mod = _fresh_kernels(monkeypatch, None, hide_ext=True)
    assert mod.BACKEND == "python"
    info = mod.backend_info()
    assert info.startswith("python fallback: ") and "horovod_local._C" in info, info


def test_backend_env_invalid(monkeypatch):
    with pytest.raises(ValueError, match="HOROVOD_LOCAL_BACKEND"):
        _fresh_kernels(monkeypatch, "fortran")


# ---------------------------------------------------------------------------------------------
# CUDA: the same comparisons run on the GPU through DEVICES above; here, GPU vs CPU results.

@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("fn", FNS)
def test_cuda_matches_cpu(fn, dtype):
    args_g, outs_g = build(fn, "noncontig", dtype, "cuda", seed=21)
    args_c, outs_c = build(fn, "noncontig", dtype, "cpu", seed=21)
    rg = getattr(K, fn)(*args_g)
    rc = getattr(K, fn)(*args_c)
    assert_dev_close(rg, rc)
    for j, (a, b) in enumerate(zip(outs_g, outs_c)):
        assert_same(a.cpu(), b, f"{fn}/{dtype}: cuda vs cpu, output tensor {j}")


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_device_mismatch():
    with pytest.raises(ValueError, match=r"tensors\[0\] is on cpu"):
        K.unpack_average(torch.zeros(4, device="cuda"), [torch.zeros(4)], 1.0, 0)
