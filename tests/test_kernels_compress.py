"""Kernels of overlapped rounds and compressed syncs (horovod_local.torch._kernels):
overlap_average_pack, carry_pack, pack_delta_fp16, quantize_int8, dequantize_int8_mean,
unpack_delta_average, overlap_delta_pack_fp16.

- The extension (C++ on CPU, CUDA on GPU) vs the PyTorch fallback: bit for bit for every dtype
  (NaN compared as NaN, whatever its payload; +0 and -0 are told apart).
- The fallback and the extension vs independent NumPy implementations written from the formulas
  of docs/SEMANTICS.md (each NumPy operation on float32/float64 arrays with float32/float64
  scalars rounds once, like the kernels).
- int8 details: round half to even, amax == 0 blocks, NaN/Inf in a block, an amax so small that
  127 / amax overflows, tensors of 0, 1, 255, 256, 257, 1000 elements, non-contiguous params.
- Argument errors (TypeError/ValueError naming the function, argument and index) before any
  write.
- CUDA vs CPU (skipped without a GPU).
Extension comparisons skip when the extension is not built, unless HOROVOD_LOCAL_REQUIRE_EXT=1.
"""
from __future__ import annotations

import math
import re
import zlib

import numpy as np
import pytest
import torch

from horovod_local.torch import _kernels as K
from kernel_backends import DEVICES, HAS_CUDA, backend, cpp_backend

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OPS = ["overlap_average_pack", "carry_pack", "pack_delta_fp16", "quantize_int8",
       "dequantize_int8_mean", "unpack_delta_average_f16", "unpack_delta_average_acc",
       "overlap_delta_pack_fp16"]
SIZES = [0, 1, 255, 256, 257, 1000]
SCALE = 1.0 / 3.0
B = K.INT8_BLOCK


# ---------------------------------------------------------------------------------------------
# Comparisons.

_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
           torch.bfloat16: torch.int16}


def assert_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Same dtype, shape, strides and bits (any NaN equals any NaN)."""
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert a.stride() == b.stride(), f"{what}: strides {a.stride()} vs {b.stride()}"
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    if not a.is_floating_point():
        assert torch.equal(a, b), f"{what}: differs"
        return
    na, nb = torch.isnan(a), torch.isnan(b)
    assert torch.equal(na, nb), f"{what}: NaN at different places"
    ia, ib = a.view(_INT_OF[a.dtype])[~na], b.view(_INT_OF[b.dtype])[~nb]
    if not torch.equal(ia, ib):
        bad = (ia != ib).nonzero()[0].item()
        av, bv = a[~na][bad].item(), b[~nb][bad].item()
        raise AssertionError(f"{what}: not bit-identical ({int((ia != ib).sum())} elements; "
                             f"first {av!r} vs {bv!r})")


def assert_guard(a, b, what="guard") -> None:
    if a is None or b is None:
        assert a is None and b is None, what
        return
    assert isinstance(a, float) and isinstance(b, float), what
    assert (math.isnan(a) and math.isnan(b)) or a == b, f"{what}: {a!r} vs {b!r}"


# ---------------------------------------------------------------------------------------------
# Inputs, built on the CPU (deterministic in seed) and moved with their strides.

def _layout(name: str) -> list:
    if name in ("sizes", "special"):
        return [((n,), "c") for n in SIZES]
    if name == "noncontig":
        return [((6, 5), "t"), ((9,), "s"), ((300,), "k"), ((7, 130), "t"), ((0,), "s"),
                ((1,), "c"), ((2, 200), "c")]
    raise KeyError(name)


def _make(g, shape, kind, dtype, lo=-2.0, hi=2.0):
    def rnd(*s):
        return (torch.rand(*s, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)
    if kind == "c":
        return rnd(*shape)
    if kind == "t":
        return rnd(*reversed(shape)).t()
    if kind == "s":
        return rnd(*shape, 3)[..., 1]
    if kind == "k":
        return rnd(shape[0] * 2 + 1)[1::2]
    raise KeyError(kind)


def _like(g, t, dtype, lo, hi):
    """A tensor with t's shape and strides, random values."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=dtype)
    out.copy_((torch.rand(t.shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype))
    return out


def _near(g, t, base, dtype, eps):
    """base + eps * noise, with t's strides."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=dtype)
    noise = torch.rand(t.shape, generator=g, dtype=torch.float64) * 2 - 1
    out.copy_(base.to(dtype) + (noise * eps).to(dtype))
    return out


def _special(params, anchors, residuals) -> None:
    """Ties, an amax == 0 block, NaN and Inf blocks (contiguous "special" layout)."""
    by_n = {p.numel(): j for j, p in enumerate(params)}
    j = by_n[255]  # ties: c = 0, e = 0, x = [127, .5, 1.5, 2.5, -.5, -2.5, 3.5, ...]: r = 1
    vals = [127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -3.5, 126.5, -126.5, 0.0, -0.0]
    params[j][:len(vals)] = torch.tensor(vals, dtype=torch.float64).to(params[j].dtype)
    params[j][len(vals):] = 0.25
    anchors[j].zero_()
    residuals[j].zero_()
    j = by_n[1000]  # block 1 exactly zero; NaN in block 2; -Inf in block 3
    anchors[j][256:512] = params[j][256:512].to(anchors[j].dtype)
    residuals[j][256:512] = 0.0
    params[j][600] = math.nan
    params[j][900] = -math.inf
    j = by_n[257]  # +Inf alone in the last (1-element) block
    params[j][256] = math.inf
    j = by_n[1]  # float64: d = 1 + 2^-11 + 2^-40 rounds to float16 1 + 2^-10, not 1 (twice)
    params[j][0] = 1 + 2 ** -11 + 2 ** -40
    anchors[j].zero_()
    residuals[j].zero_()


def inputs(op: str, layout: str, dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sdt = K.state_dtype(dtype)
    spec = _layout(layout)
    params = [_make(g, s, k, dtype) for s, k in spec]
    anchors = [_near(g, p, p.to(sdt), sdt, 0.01) for p in params]
    residuals = [_like(g, p, sdt, -1e-3, 1e-3) for p in params]
    sent = [_near(g, p, p.to(sdt), sdt, 0.05) for p in params]
    bases = [_like(g, p, sdt, -2.0, 2.0) for p in params]
    if layout == "special":
        _special(params, anchors, residuals)
    total = sum(p.numel() for p in params)
    numels = [p.numel() for p in params]
    nb = K.int8_num_blocks(numels)
    d = dict(params=params, anchors=anchors, residuals=residuals, sent=sent, bases=bases,
             numels=numels, offset=5, q_offset=3, s_offset=2, scale=SCALE)
    if op in ("overlap_average_pack", "carry_pack"):
        d["buf"] = _make(g, (5 + total + 3,), "c", dtype, -6.0, 6.0)
    elif op in ("pack_delta_fp16", "overlap_delta_pack_fp16", "unpack_delta_average_f16"):
        d["buf"] = _make(g, (5 + total + 3,), "c", torch.float16, -0.05, 0.05)
    elif op == "unpack_delta_average_acc":
        d["buf"] = _make(g, (5 + total + 3,), "c", sdt, -0.05, 0.05)
        d["scale"] = 1.0
    elif op == "quantize_int8":
        d["q"] = torch.full((3 + total + 2,), 99, dtype=torch.int8)
        d["scales"] = torch.full((2 + nb + 1,), 7.0, dtype=sdt)
    elif op == "dequantize_int8_mean":
        n = 3
        d["q_all"] = torch.randint(-127, 128, (n, 3 + total + 2), generator=g,
                                   dtype=torch.int8)
        sc = torch.rand(n, 2 + nb + 1, generator=g, dtype=torch.float64).to(sdt) * 0.02
        if nb > 3:
            sc[1, 2 + 1] = 0.0
            sc[2, 2 + 3] = math.nan if layout == "special" else sc[2, 2 + 3]
        d["scales_all"] = sc
        d["out"] = torch.full((5 + total + 1,), -1.0, dtype=sdt)
        d["scale"] = 1.0 / n
    return d


def to_device(d: dict, device: str) -> dict:
    def mv(t):
        if isinstance(t, torch.Tensor):
            return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype,
                                       device=device).copy_(t)
        if isinstance(t, list) and t and isinstance(t[0], torch.Tensor):
            return [mv(x) for x in t]
        return t
    return {k: mv(v) for k, v in d.items()}


def outputs(op: str, d: dict) -> list:
    """The tensors op writes (first) and reads."""
    p, c, e, s = d["params"], d["anchors"], d["residuals"], d["sent"]
    return {
        "overlap_average_pack": lambda: [d["buf"]] + p + s,
        "carry_pack": lambda: [d["buf"]] + p + s + d["bases"],
        "pack_delta_fp16": lambda: [d["buf"]] + e + p + c,
        "quantize_int8": lambda: [d["q"], d["scales"]] + e + p + c,
        "dequantize_int8_mean": lambda: [d["out"], d["q_all"], d["scales_all"]],
        "unpack_delta_average_f16": lambda: p + c + [d["buf"]],
        "unpack_delta_average_acc": lambda: p + c + [d["buf"]],
        "overlap_delta_pack_fp16": lambda: [d["buf"]] + p + c + s + e,
    }[op]()


def call(impl, op: str, d: dict):
    """Runs op on impl (a backend or the module); returns (result, outputs(op, d))."""
    p, c, e, s = d["params"], d["anchors"], d["residuals"], d["sent"]
    if op == "overlap_average_pack":
        r = impl.overlap_average_pack(d["buf"], p, s, d["scale"], d["offset"])
    elif op == "carry_pack":
        r = impl.carry_pack(d["bases"], p, s, d["buf"], d["offset"])
    elif op == "pack_delta_fp16":
        r = impl.pack_delta_fp16(p, c, e, d["buf"], d["offset"])
    elif op == "quantize_int8":
        r = impl.quantize_int8(p, c, e, d["q"], d["scales"], d["q_offset"], d["s_offset"])
    elif op == "dequantize_int8_mean":
        r = impl.dequantize_int8_mean(d["q_all"], d["scales_all"], d["out"], d["scale"],
                                      d["numels"], d["q_offset"], d["s_offset"], d["offset"])
    elif op.startswith("unpack_delta_average"):
        r = impl.unpack_delta_average(d["buf"], p, c, d["scale"], d["offset"])
    elif op == "overlap_delta_pack_fp16":
        r = impl.overlap_delta_pack_fp16(d["buf"], p, c, s, e, d["scale"], d["offset"])
    else:
        raise KeyError(op)
    return r, outputs(op, d)


_GUARDED = ("overlap_average_pack", "carry_pack", "pack_delta_fp16", "overlap_delta_pack_fp16")


# ---------------------------------------------------------------------------------------------
# Extension vs fallback.

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["sizes", "noncontig", "special"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("op", OPS)
def test_extension_matches_fallback(op, dtype, layout, device):
    cpp = cpp_backend(device)
    seed = zlib.crc32(f"{op}/{layout}".encode()) % 1000
    dc = to_device(inputs(op, layout, dtype, seed), device)
    dp = to_device(inputs(op, layout, dtype, seed), device)
    before = [t.clone() for t in outputs(op, inputs(op, layout, dtype, seed))]
    rc, oc = call(cpp, op, dc)
    rp, op_ = call(K._python, op, dp)
    assert_guard(rc, rp)
    assert (rc is None) == (op not in _GUARDED)
    for j, (a, b) in enumerate(zip(oc, op_)):
        assert_bits(a, b, f"{op}/{layout}/{dtype}/{device}: output tensor {j}")
    # something was written (guards against a no-op on both sides)
    assert not torch.equal(oc[0].cpu(), before[0].cpu()) or op.startswith("unpack")
    if op.startswith("unpack"):
        assert any(not torch.equal(a.cpu(), b) for a, b in zip(oc, before) if a.numel())



@pytest.mark.parametrize("op", OPS)
def test_public_api_dispatch(op):
    da, db = inputs(op, "sizes", torch.float32, 3), inputs(op, "sizes", torch.float32, 3)
    ra, oa = call(K, op, da)
    first = da.get("buf", da.get("q", da.get("out")))
    rb, ob = call(K._for(first), op, db)
    assert (ra is None) == (op not in _GUARDED)
    assert_guard(ra, rb)
    for a, b in zip(oa, ob):
        assert_bits(a, b, op)


@pytest.mark.parametrize("impl", ["cpp", "python"])
@pytest.mark.parametrize("op", OPS)
def test_only_the_segments_are_written(impl, op):
    """Nothing outside [offset, offset + total) of a buffer is touched; read-only inputs stay."""
    d = inputs(op, "sizes", torch.float64, 4)
    total = sum(d["numels"])
    nb = K.int8_num_blocks(d["numels"])
    keep = {k: (v.clone() if isinstance(v, torch.Tensor) else [t.clone() for t in v])
            for k, v in d.items() if k in ("buf", "q", "scales", "out", "q_all", "scales_all",
                                           "anchors", "bases", "params")}
    call(backend(impl), op, d)
    ranges = {"buf": (5, total), "q": (3, total), "scales": (2, nb), "out": (5, total)}
    for k, (o, n) in ranges.items():
        if k in d:
            assert torch.equal(d[k][:o], keep[k][:o]), k
            assert torch.equal(d[k][o + n:], keep[k][o + n:]), k
    if op.startswith("unpack"):
        assert torch.equal(d["buf"], keep["buf"])
    if op in ("pack_delta_fp16", "quantize_int8", "carry_pack"):
        ro = {"pack_delta_fp16": ["params", "anchors"], "quantize_int8": ["params", "anchors"],
              "carry_pack": ["bases"]}[op]
        for k in ro:
            for a, b in zip(d[k], keep[k]):
                assert torch.equal(a, b), k
    if op == "dequantize_int8_mean":
        assert torch.equal(d["q_all"], keep["q_all"])
        assert torch.equal(d["scales_all"], keep["scales_all"])


# ---------------------------------------------------------------------------------------------
# Independent NumPy implementations (lists of 1-D arrays in the acc dtype; params hold values
# of T). Every operation on float32 (float64) arrays and scalars rounds once to float32
# (float64), like the kernels; np.rint rounds half to even; astype(np.float16) rounds once,
# also from float64.

_NP_ACC = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float32,
           torch.bfloat16: np.float32}


def np_T(v: np.ndarray, dtype) -> np.ndarray:
    """v rounded to T (nearest even), held in the acc dtype."""
    if dtype in (torch.float32, torch.float64):
        return v
    if dtype == torch.float16:
        return v.astype(np.float16).astype(np.float32)
    u = v.astype(np.float32).view(np.uint32).astype(np.uint64)
    r = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(v), np.float32(np.nan), r)


def np_acc(ts) -> list:
    return [t.detach().reshape(-1).to(K.state_dtype(t.dtype)).numpy().copy() for t in ts]


def np_guard(vals) -> float:
    v = np.concatenate([np.asarray(x, dtype=np.float64) for x in vals]) if vals else np.zeros(0)
    if v.size == 0:
        return 0.0
    return float(np.max(np.abs(v))) if np.all(np.isfinite(v)) else math.nan


def np_overlap_average_pack(buf, xs, ss, scale, offset, dtype):
    A = _NP_ACC[dtype]
    o, outx, bufo = offset, [], buf.copy()
    for x, s in zip(xs, ss):
        n = x.size
        a = buf[o:o + n].astype(A) * A(scale)
        nx = np_T(a + (x - s), dtype)
        outx.append(nx)
        bufo[o:o + n] = nx
        o += n
    return bufo, outx, [x.copy() for x in outx], np_guard(outx)


def np_carry_pack(bases, xs, ss, buf, offset, dtype):
    o, outx, bufo = offset, [], buf.copy()
    for b, x, s in zip(bases, xs, ss):
        nx = np_T(b + (x - s), dtype)
        outx.append(nx)
        bufo[o:o + x.size] = nx
        o += x.size
    return bufo, outx, [x.copy() for x in outx], np_guard(outx)


@np.errstate(all="ignore")
def np_pack_delta_fp16(xs, cs, es, buf, offset):
    o, bufo, eo, qs = offset, buf.copy(), [], []
    for x, c, e in zip(xs, cs, es):
        d = (x - c) + e
        q = d.astype(np.float16)
        eo.append(d - q.astype(d.dtype))
        bufo[o:o + x.size] = q
        qs.append(q)
        o += x.size
    return bufo, eo, np_guard(qs)


def np_quantize(xs, cs, es, A):
    """(q per tensor, scales (all blocks), new residuals)."""
    qs, scs, eo = [], [], []
    with np.errstate(all="ignore"):
        for x, c, e in zip(xs, cs, es):
            d = (x - c) + e
            q = np.zeros(x.size, np.int8)
            en = np.zeros(x.size, A)
            for b0 in range(0, x.size, B):
                db = d[b0:b0 + B]
                qb = np.zeros(db.size, np.int8)
                if not np.all(np.isfinite(db)):
                    sc = A(np.nan)
                else:
                    amax = np.max(np.abs(db))
                    if amax == A(0):
                        sc = A(0)
                    else:
                        r = A(127) / amax
                        v = np.rint(db * r)
                        v[np.isnan(v)] = 0
                        qb = np.clip(v, -127, 127).astype(np.int8)
                        sc = amax / A(127)
                q[b0:b0 + B] = qb
                en[b0:b0 + B] = db - qb.astype(A) * sc
                scs.append(sc)
            qs.append(q)
            eo.append(en)
    return qs, np.array(scs, dtype=A), eo


def np_dequant_mean(q_all, s_all, inv_n, numels, qo, so, A):
    out, b = [], 0
    with np.errstate(all="ignore"):
        for n in numels:
            k = np.arange(n)
            blk = so + b + k // B
            v = q_all[0, qo + k].astype(A) * s_all[0, blk]
            for r in range(1, q_all.shape[0]):
                v = v + q_all[r, qo + k].astype(A) * s_all[r, blk]
            out.append(v * A(inv_n))
            qo += n
            b += (n + B - 1) // B
    return np.concatenate(out) if out else np.zeros(0, A)


def np_unpack_delta_average(buf, xs, cs, scale, offset, dtype):
    A = _NP_ACC[dtype]
    o, xo, co = offset, [], []
    for c in cs:
        n = c.size
        nc = c + buf[o:o + n].astype(A) * A(scale)
        co.append(nc)
        xo.append(np_T(nc, dtype))
        o += n
    return xo, co


@np.errstate(all="ignore")
def np_overlap_delta_pack_fp16(buf, xs, cs, ss, es, scale, offset, dtype):
    A = _NP_ACC[dtype]
    o, bufo = offset, buf.copy()
    xo, co, so, eo, qs = [], [], [], [], []
    for x, c, s, e in zip(xs, cs, ss, es):
        n = x.size
        nc = c + buf[o:o + n].astype(A) * A(scale)
        nx = np_T(nc + (x - s), dtype)
        d = (nx - nc) + e
        q = d.astype(np.float16)
        eo.append(d - q.astype(A))
        so.append(nx.copy())
        co.append(nc)
        xo.append(nx)
        bufo[o:o + n] = q
        qs.append(q)
        o += n
    return bufo, xo, co, so, eo, np_guard(qs)


def np_same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    if got.dtype.kind != "f":
        np.testing.assert_array_equal(got, want, err_msg=what)
        return
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} vs {want.dtype}"
    ng, nw = np.isnan(got), np.isnan(want)
    np.testing.assert_array_equal(ng, nw, err_msg=f"{what}: NaN positions")
    iv = {2: np.int16, 4: np.int32, 8: np.int64}[got.dtype.itemsize]
    np.testing.assert_array_equal(got[~ng].view(iv), want[~nw].view(iv), err_msg=what)


def _bufnp(t: torch.Tensor) -> np.ndarray:
    """A buffer as NumPy (bfloat16 buffers as float32 holding their values)."""
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()


@pytest.mark.parametrize("impl", ["python", "cpp"])
@pytest.mark.parametrize("layout", ["sizes", "special"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("op", OPS)
def test_numpy_reference(op, dtype, layout, impl):
    be = backend(impl)
    d = inputs(op, layout, dtype, seed=zlib.crc32(op.encode()) % 997)
    A = _NP_ACC[dtype]
    xs, cs, es, ss = np_acc(d["params"]), np_acc(d["anchors"]), np_acc(d["residuals"]), \
        np_acc(d["sent"])
    bases = np_acc(d["bases"])
    buf = _bufnp(d["buf"]) if "buf" in d else None
    off, scale = d["offset"], d["scale"]
    got, _ = call(be, op, d)
    tag = f"{op}/{dtype}/{layout}/{impl}"

    def xs_now(key):
        return np_acc(d[key])

    if op in ("overlap_average_pack", "carry_pack"):
        wbuf, wx, ws, wg = (np_overlap_average_pack(buf, xs, ss, scale, off, dtype)
                            if op == "overlap_average_pack"
                            else np_carry_pack(bases, xs, ss, buf, off, dtype))
        np_same(_bufnp(d["buf"]), wbuf.astype(_bufnp(d["buf"]).dtype), tag + " buf")
        for a, b in zip(xs_now("params"), wx):
            np_same(a, b, tag + " params")
        for a, b in zip(xs_now("sent"), ws):
            np_same(a, b, tag + " sent")
        assert_guard(got, wg)
    elif op == "pack_delta_fp16":
        wbuf, we, wg = np_pack_delta_fp16(xs, cs, es, buf, off)
        np_same(d["buf"].numpy(), wbuf, tag + " buf")
        for a, b in zip(xs_now("residuals"), we):
            np_same(a, b, tag + " residuals")
        assert_guard(got, wg)
    elif op == "quantize_int8":
        wq, wsc, we = np_quantize(xs, cs, es, A)
        total = sum(d["numels"])
        np_same(d["q"][3:3 + total].numpy(), np.concatenate(wq), tag + " q")
        np_same(d["scales"][2:2 + wsc.size].numpy(), wsc, tag + " scales")
        for a, b in zip(xs_now("residuals"), we):
            np_same(a, b, tag + " residuals")
        assert got is None
    elif op == "dequantize_int8_mean":
        total = sum(d["numels"])
        want = np_dequant_mean(d["q_all"].numpy(), d["scales_all"].numpy(), scale, d["numels"],
                               d["q_offset"], d["s_offset"], A)
        np_same(d["out"][5:5 + total].numpy(), want, tag + " out")
    elif op.startswith("unpack_delta_average"):
        wx, wc = np_unpack_delta_average(buf, xs, cs, scale, off, dtype)
        for a, b in zip(xs_now("params"), wx):
            np_same(a, b, tag + " params")
        for a, b in zip(xs_now("anchors"), wc):
            np_same(a, b, tag + " anchors")
    elif op == "overlap_delta_pack_fp16":
        wbuf, wx, wc, ws, we, wg = np_overlap_delta_pack_fp16(buf, xs, cs, ss, es, scale, off,
                                                              dtype)
        np_same(d["buf"].numpy(), wbuf, tag + " buf")
        for key, want in (("params", wx), ("anchors", wc), ("sent", ws), ("residuals", we)):
            for a, b in zip(xs_now(key), want):
                np_same(a, b, f"{tag} {key}")
        assert_guard(got, wg)


# ---------------------------------------------------------------------------------------------
# int8 and fp16 details.

def _q1(impl, d_vals, dtype=torch.float32):
    """Quantises one tensor whose d = d_vals (x = d, c = 0, e = 0); (q, scales, e)."""
    sdt = K.state_dtype(dtype)
    x = torch.tensor(d_vals, dtype=torch.float64).to(dtype)
    c, e = torch.zeros_like(x, dtype=sdt), torch.zeros_like(x, dtype=sdt)
    q = torch.zeros(x.numel(), dtype=torch.int8)
    sc = torch.zeros(K.int8_num_blocks([x.numel()]), dtype=sdt)
    backend(impl).quantize_int8([x], [c], [e], q, sc)
    return q, sc, e


@pytest.mark.parametrize("impl", ["python", "cpp"])
def test_int8_round_half_to_even(impl):
    # amax = 127 -> r = 1: d * r are exact halves
    q, sc, e = _q1(impl, [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -126.5, 0.0])
    assert q.tolist() == [127, 0, 2, 2, 0, -2, -2, 4, 126, -126, 0]
    assert sc.tolist() == [1.0]
    assert e.tolist() == [0.0, 0.5, -0.5, 0.5, -0.5, 0.5, -0.5, -0.5, 0.5, -0.5, 0.0]
    # amax = 254 -> r = 0.5 (exact): odd d give halves
    q, sc, _ = _q1(impl, [254.0, 1.0, 3.0, 5.0, -1.0, -3.0])
    assert q.tolist() == [127, 0, 2, 2, 0, -2]
    assert sc.tolist() == [2.0]


@pytest.mark.parametrize("impl", ["python", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_int8_blocks_zero_nan_inf(impl, dtype):
    vals = np.linspace(-1, 1, 4 * B + 7)
    vals[B:2 * B] = 0.0                 # block 1: amax == 0
    vals[2 * B + 5] = math.nan          # block 2: NaN
    vals[3 * B + 9] = math.inf          # block 3: Inf
    vals[4 * B + 2] = -math.inf         # block 4 (7 elements): -Inf
    q, sc, e = _q1(impl, vals.tolist(), dtype)
    sc = sc.tolist()
    assert sc[0] == pytest.approx(1.0 / 127.0) and sc[1] == 0.0
    assert all(math.isnan(v) for v in sc[2:])
    assert q[:B].abs().max() == 127 and torch.all(q[B:] == 0)
    assert torch.all(e[B:2 * B] == 0) and torch.all(torch.isnan(e[2 * B:]))
    assert torch.all(torch.isfinite(e[:B]))


@pytest.mark.parametrize("impl", ["python", "cpp"])
def test_int8_tiny_amax(impl):
    """127 / amax overflows to Inf for amax < 127 / FLT_MAX: q = 0 for d = 0 (0 * Inf is NaN),
    ±127 otherwise; the residual keeps the error."""
    tiny = 1e-40  # subnormal float32
    q, sc, e = _q1(impl, [0.0, tiny, -tiny, tiny / 2])
    assert q.tolist() == [0, 127, -127, 127]
    assert sc.item() == np.float32(tiny) / np.float32(127)
    wq, wsc, we = np_quantize([np.array([0.0, tiny, -tiny, tiny / 2], np.float32)],
                              [np.zeros(4, np.float32)], [np.zeros(4, np.float32)], np.float32)
    np_same(q.numpy(), wq[0], "q")
    np_same(sc.numpy(), wsc, "scale")
    np_same(e.numpy(), we[0], "e")


@pytest.mark.parametrize("impl", ["python", "cpp"])
def test_int8_roundtrip(impl):
    """quantize -> dequantize (n = 1) -> unpack_delta_average: c + D(q), and e + D(q) = d."""
    be = backend(impl)
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(n, generator=g) for n in (1000, 3, 256)]
    cs = [x + 0.01 * torch.randn(x.shape, generator=g) for x in xs]
    es = [torch.zeros_like(x) for x in xs]
    c0 = [c.clone() for c in cs]
    x0 = [x.clone() for x in xs]
    numels = [x.numel() for x in xs]
    q = torch.zeros(sum(numels), dtype=torch.int8)
    sc = torch.zeros(K.int8_num_blocks(numels))
    be.quantize_int8(xs, cs, es, q, sc)
    out = torch.zeros(sum(numels))
    be.dequantize_int8_mean(q[None], sc[None], out, 1.0, numels)
    be.unpack_delta_average(out, xs, cs, 1.0)
    o, blk = 0, 0
    for x, x_old, c, c_old, e in zip(xs, x0, cs, c0, es):
        n = x.numel()
        dq = out[o:o + n]
        assert torch.equal(c, c_old + dq) and torch.equal(x, c)
        d = x_old - c_old  # the residual was zero
        torch.testing.assert_close(e + dq, d, rtol=0, atol=1e-7)
        # the error is at most half a quantisation step (plus rounding) per element
        for b0 in range(0, n, B):
            step = float(sc[blk])
            assert float(e[b0:b0 + B].abs().max()) <= step * 0.5 * (1 + 1e-5)
            blk += 1
        o += n


@pytest.mark.parametrize("impl", ["python", "cpp"])
def test_fp16_from_float64_rounds_once(impl):
    """float16 of a float64 d is the correctly rounded value, not float16(float32(d))."""
    vals = [1 + 2 ** -11 + 2 ** -40, -(1 + 2 ** -11 + 2 ** -40), 1 + 2 ** -11, 3 + 2 ** -10,
            2 ** -25 + 2 ** -60, 65519.99, 65520.0, 1e-300]
    x = torch.tensor(vals, dtype=torch.float64)
    c, e = torch.zeros_like(x), torch.zeros_like(x)
    buf = torch.zeros(len(vals), dtype=torch.float16)
    guard = backend(impl).pack_delta_fp16([x], [c], [e], buf)
    with np.errstate(all="ignore"):
        want = np.array(vals, np.float64).astype(np.float16)
    np_same(buf.numpy(), want, "fp16")
    assert buf[0].item() == 1 + 2 ** -10 and buf[2].item() == 1.0
    assert math.isinf(buf[6].item()) and math.isnan(guard)  # 65520 rounds to Inf
    np_same(e.numpy(), np.array(vals) - want.astype(np.float64), "residual")


@pytest.mark.parametrize("impl", ["python", "cpp"])
def test_guard_values(impl):
    be = backend(impl)
    x = [torch.tensor([1.0, -3.5, 2.0]), torch.tensor([0.25])]
    s = [t.clone() for t in x]
    buf = torch.tensor([0.0, 3.0, -12.0, 6.0, 0.75])  # scale 1/3: a = [1, -4, 2, .25]
    assert be.overlap_average_pack(buf, x, s, 1.0 / 3.0, 1) == 4.0
    buf = torch.zeros(4)
    assert be.carry_pack([torch.tensor([1.0, 5.0, -7.0]), torch.tensor([2.0])],
                         x, s, buf) == 7.0
    assert be.carry_pack([], [], [], buf) == 0.0
    hb = torch.zeros(4, dtype=torch.float16)
    assert be.pack_delta_fp16(x, [torch.zeros(3), torch.zeros(1)],
                              [torch.zeros(3), torch.zeros(1)], hb) == 7.0
    x[0][1] = math.inf
    assert math.isnan(be.pack_delta_fp16(x, [torch.zeros(3), torch.zeros(1)],
                                         [torch.zeros(3), torch.zeros(1)], hb))


def test_int8_num_blocks():
    assert K.int8_num_blocks([]) == 0
    assert K.int8_num_blocks([0, 1, 255, 256, 257, 1000]) == 0 + 1 + 1 + 1 + 2 + 4


# ---------------------------------------------------------------------------------------------
# Bad arguments.

def _bad_cases():
    f32, f64, f16, i8 = torch.float32, torch.float64, torch.float16, torch.int8
    z = torch.zeros
    meta = torch.zeros(3, device="meta")
    return {
        "oap_sent_dtype": (lambda: ("overlap_average_pack", (z(10, dtype=f16), [z(3, dtype=f16)],
                                                             [z(3, dtype=f16)], 0.5, 0)),
                           TypeError, "sent[0] has dtype torch.float16, expected torch.float32"),
        "oap_sent_numel": (lambda: ("overlap_average_pack", (z(10), [z(3), z(2)], [z(3), z(4)],
                                                             0.5, 0)),
                           ValueError, "sent[1] has 4 elements"),
        "oap_too_small": (lambda: ("overlap_average_pack", (z(4), [z(3)], [z(3)], 0.5, 2)),
                          ValueError, "buffer too small"),
        "carry_bases_len": (lambda: ("carry_pack", ([z(3)], [z(3), z(1)], [z(3), z(1)], z(10),
                                                    0)),
                            ValueError, "bases has 1 entries but params has 2"),
        "carry_params_dtype": (lambda: ("carry_pack", ([z(3, dtype=f64)], [z(3)],
                                                       [z(3, dtype=f64)], z(10, dtype=f64), 0)),
                               TypeError, "params[0] has dtype torch.float32, expected "
                                          "torch.float64"),
        "delta_buf_dtype": (lambda: ("pack_delta_fp16", ([z(3)], [z(3)], [z(3)], z(10), 0)),
                            TypeError, "buf has dtype torch.float32, expected torch.float16"),
        "delta_params_mixed": (lambda: ("pack_delta_fp16", ([z(3), z(2, dtype=f64)],
                                                            [z(3), z(2)], [z(3), z(2)],
                                                            z(10, dtype=f16), 0)),
                               TypeError, "params[1] has dtype torch.float64, expected "
                                          "torch.float32 (the dtype of params[0])"),
        "delta_params_int": (lambda: ("pack_delta_fp16", ([z(3, dtype=torch.int32)], [z(3)],
                                                          [z(3)], z(10, dtype=f16), 0)),
                             TypeError, "params[0] has dtype torch.int32"),
        "delta_residual_dtype": (lambda: ("pack_delta_fp16", ([z(3, dtype=f64)],
                                                              [z(3, dtype=f64)], [z(3)],
                                                              z(10, dtype=f16), 0)),
                                 TypeError, "residuals[0] has dtype torch.float32, expected "
                                            "torch.float64"),
        "delta_device": (lambda: ("pack_delta_fp16", ([z(3), meta], [z(3), z(3)], [z(3), z(3)],
                                                      z(10, dtype=f16), 0)),
                         ValueError, "params[1] is on meta but buf is on cpu"),
        "q_dtype": (lambda: ("quantize_int8", ([z(3)], [z(3)], [z(3)], z(3), z(1))),
                    TypeError, "q has dtype torch.float32, expected torch.int8"),
        "q_not_contiguous": (lambda: ("quantize_int8", ([z(3)], [z(3)], [z(3)],
                                                        z(6, 2, dtype=i8)[:, 0], z(1))),
                             ValueError, "q must be contiguous"),
        "q_offset_negative": (lambda: ("quantize_int8", ([z(3)], [z(3)], [z(3)], z(3, dtype=i8),
                                                         z(1), -1, 0)),
                              ValueError, "q_offset must be >= 0"),
        "scales_dtype": (lambda: ("quantize_int8", ([z(3)], [z(3)], [z(3)], z(3, dtype=i8),
                                                    z(1, dtype=f64))),
                         TypeError, "scales has dtype torch.float64, expected torch.float32"),
        "scales_too_small": (lambda: ("quantize_int8", ([z(300), z(3)], [z(300), z(3)],
                                                        [z(300), z(3)], z(303, dtype=i8), z(3),
                                                        0, 1)),
                             ValueError, "buffer scales too small: s_offset 1 + 3 blocks"),
        "q_too_small": (lambda: ("quantize_int8", ([z(300)], [z(300)], [z(300)],
                                                   z(300, dtype=i8), z(2), 1, 0)),
                        ValueError, "buffer q too small: q_offset 1 + 300 total numel"),
        "q_anchor_numel": (lambda: ("quantize_int8", ([z(3)], [z(4)], [z(3)], z(3, dtype=i8),
                                                      z(1))),
                           ValueError, "anchors[0] has 4 elements"),
        "q_residuals_len": (lambda: ("quantize_int8", ([z(3)], [z(3)], [], z(3, dtype=i8),
                                                       z(1))),
                            ValueError, "residuals has 0 entries but params has 1"),
        "deq_out_dtype": (lambda: ("dequantize_int8_mean", (z(2, 3, dtype=i8), z(2, 1), z(3, dtype=f16),
                                                            0.5, [3])),
                          TypeError, "out has dtype torch.float16"),
        "deq_q_dtype": (lambda: ("dequantize_int8_mean", (z(2, 3), z(2, 1), z(3), 0.5, [3])),
                        TypeError, "q_all has dtype torch.float32, expected torch.int8"),
        "deq_scales_dtype": (lambda: ("dequantize_int8_mean", (z(2, 3, dtype=i8),
                                                               z(2, 1, dtype=f64), z(3), 0.5,
                                                               [3])),
                             TypeError, "scales_all has dtype torch.float64, expected "
                                        "torch.float32 (the dtype of out)"),
        "deq_q_1d": (lambda: ("dequantize_int8_mean", (z(3, dtype=i8), z(2, 1), z(3), 0.5, [3])),
                     ValueError, "q_all must be 2-D"),
        "deq_rows": (lambda: ("dequantize_int8_mean", (z(2, 3, dtype=i8), z(3, 1), z(3), 0.5,
                                                       [3])),
                     ValueError, "scales_all has 3 rows but q_all has 2"),
        "deq_no_rows": (lambda: ("dequantize_int8_mean", (z(0, 3, dtype=i8), z(0, 1), z(3), 0.5,
                                                          [3])),
                        ValueError, "q_all has no rows"),
        "deq_numel_negative": (lambda: ("dequantize_int8_mean", (z(2, 3, dtype=i8), z(2, 1),
                                                                 z(3), 0.5, [3, -1])),
                               ValueError, "numels[1] = -1 must be >= 0"),
        "deq_out_small": (lambda: ("dequantize_int8_mean", (z(2, 300, dtype=i8), z(2, 2), z(299),
                                                            0.5, [300])),
                          ValueError, "buffer out too small"),
        "deq_scales_small": (lambda: ("dequantize_int8_mean", (z(2, 300, dtype=i8), z(2, 1),
                                                               z(300), 0.5, [300])),
                             ValueError, "buffer scales_all too small"),
        "deq_device": (lambda: ("dequantize_int8_mean", (z(2, 3, dtype=i8), z(2, 1, device="meta"),
                                                         z(3), 0.5, [3])),
                       ValueError, "scales_all is on meta but out is on cpu"),
        "uda_buf_dtype": (lambda: ("unpack_delta_average", (z(10, dtype=f64), [z(3)], [z(3)],
                                                            0.5, 0)),
                          TypeError, "buf has dtype torch.float64, expected torch.float16 or "
                                     "torch.float32"),
        "uda_bf16_buf": (lambda: ("unpack_delta_average", (z(10, dtype=torch.bfloat16),
                                                           [z(3, dtype=torch.bfloat16)], [z(3)],
                                                           0.5, 0)),
                         TypeError, "buf has dtype torch.bfloat16"),
        "uda_anchor_dtype": (lambda: ("unpack_delta_average", (z(10, dtype=f16), [z(3, dtype=f16)],
                                                               [z(3, dtype=f16)], 0.5, 0)),
                             TypeError, "anchors[0] has dtype torch.float16, expected "
                                        "torch.float32"),
        "odp_sent_len": (lambda: ("overlap_delta_pack_fp16", (z(10, dtype=f16), [z(3)], [z(3)],
                                                              [], [z(3)], 0.5, 0)),
                         ValueError, "sent has 0 entries but params has 1"),
        "odp_residual_numel": (lambda: ("overlap_delta_pack_fp16", (z(10, dtype=f16), [z(3)],
                                                                    [z(3)], [z(3)], [z(2)], 0.5,
                                                                    0)),
                               ValueError, "residuals[0] has 2 elements"),
        "odp_buf_dtype": (lambda: ("overlap_delta_pack_fp16", (z(10), [z(3)], [z(3)], [z(3)],
                                                               [z(3)], 0.5, 0)),
                          TypeError, "buf has dtype torch.float32, expected torch.float16"),
        "odp_single_tensor": (lambda: ("overlap_delta_pack_fp16", (z(10, dtype=f16), z(3),
                                                                   [z(3)], [z(3)], [z(3)], 0.5,
                                                                   0)),
                              TypeError, "list of tensors"),
    }


@pytest.mark.parametrize("impl", ["cpp", "python", "public"])
@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_bad_inputs(case, impl):
    make, exc, pattern = _bad_cases()[case]
    fn, args = make()
    target = {"cpp": lambda: cpp_backend(), "python": lambda: K._python,
              "public": lambda: K}[impl]()
    with pytest.raises(exc, match=re.escape(pattern)) as info:
        getattr(target, fn)(*args)
    assert f"horovod_local.{fn}" in str(info.value)


@pytest.mark.parametrize("impl", ["cpp", "python"])
def test_error_before_any_write(impl):
    be = backend(impl)
    x, s = [torch.ones(4), torch.ones(2)], [torch.full((4,), 0.5), torch.ones(3)]
    buf = torch.full((10,), 7.0)
    with pytest.raises(ValueError, match=r"sent\[1\] has 3 elements"):
        be.overlap_average_pack(buf, x, s, 1.0, 0)
    assert torch.equal(x[0], torch.ones(4)) and torch.equal(s[0], torch.full((4,), 0.5))
    assert torch.equal(buf, torch.full((10,), 7.0))
    e = [torch.full((4,), 0.25), torch.full((2,), 0.25)]
    q = torch.full((6,), 5, dtype=torch.int8)
    with pytest.raises(ValueError, match="buffer scales too small"):
        be.quantize_int8(x, [torch.zeros(4), torch.zeros(2)], e, q, torch.zeros(1))
    assert torch.equal(e[0], torch.full((4,), 0.25)) and torch.equal(q, torch.full((6,), 5,
                                                                                    dtype=torch.int8))


# ---------------------------------------------------------------------------------------------
# CUDA vs CPU (through the public API: the extension's CUDA kernels when built with CUDA).

@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("layout", ["noncontig", "special"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("op", OPS)
def test_cuda_matches_cpu(op, dtype, layout):
    seed = zlib.crc32(f"cuda/{op}".encode()) % 1000
    dg = to_device(inputs(op, layout, dtype, seed), "cuda")
    dc = inputs(op, layout, dtype, seed)
    rg, og = call(K, op, dg)
    rc, oc = call(K, op, dc)
    assert_guard(rg, rc)
    for j, (a, b) in enumerate(zip(og, oc)):
        assert_bits(a.cpu(), b, f"{op}/{dtype}/{layout}: cuda vs cpu, output tensor {j}")


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_large_multi_tensor():
    """Many tensors across several CUDA chunks and int8 warps: CUDA vs CPU, bit for bit."""
    g = torch.Generator().manual_seed(5)
    sizes = [int(n) for n in torch.randint(0, 5000, (60,), generator=g)] + [70000]
    xs = [torch.randn(n, generator=g) for n in sizes]
    cs = [x + 0.01 * torch.randn(x.shape, generator=g) for x in xs]
    es = [1e-3 * torch.randn(x.shape, generator=g) for x in xs]
    nb, total = K.int8_num_blocks(sizes), sum(sizes)
    res = {}
    for dev in ("cpu", "cuda"):
        x, c, e = ([t.to(dev) for t in ts] for ts in (xs, cs, es))
        q = torch.zeros(total, dtype=torch.int8, device=dev)
        sc = torch.zeros(nb, device=dev)
        K.quantize_int8(x, c, e, q, sc)
        out = torch.zeros(total, device=dev)
        K.dequantize_int8_mean(torch.stack([q, q.flip(0)]), torch.stack([sc, sc * 0.5]), out,
                               0.5, sizes)
        hb = torch.zeros(total, dtype=torch.float16, device=dev)
        guard = K.pack_delta_fp16(x, c, e, hb)
        res[dev] = [q, sc, out, hb] + e, guard
    assert res["cpu"][1] == res["cuda"][1]
    for j, (a, b) in enumerate(zip(res["cuda"][0], res["cpu"][0])):
        assert_bits(a.cpu(), b, f"tensor {j}")
