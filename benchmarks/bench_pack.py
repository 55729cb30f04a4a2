"""Single-process benchmark of the fused-sync pack/unpack kernels.

For each workload (a) 160 tensors / 25M float32 params and (b) 50 tensors / 1M params, times
(median of --repeats runs after --warmup):

- memcpy:        ``buf.copy_(src)`` of the same bytes: one read + one write pass, the
                 memory-bandwidth bound of one pack or one unpack;
- pack, unpack_average, and pack + unpack_average, with the extension ("cpp") and the PyTorch
  fallback ("python");
- unpack_average_deviation and unpack_slowmo (extension and fallback), for reference;
- the overlapped / compressed ops (``--ops compress``): overlap_average_pack, carry_pack,
  pack_delta_fp16, quantize_int8, dequantize_int8_mean (4 ranks), unpack_delta_average (float16
  and float32 buffer), overlap_delta_pack_fp16, each with the bytes it reads + writes, its GB/s
  and the ratio of its time to a memcpy of the same bytes (a copy of half of them: one read and
  one write of as many bytes in all).

Ratios are to memcpy (pack, unpack) and to 2 x memcpy (pack + unpack). Writes JSON to
benchmarks/results/pack_<date>.json and prints a table.

    .venv/bin/python benchmarks/bench_pack.py [--device cpu|cuda] [--repeats 10] [--quick]
                                              [--ops all|base|compress] [--no-python]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time

import torch

from horovod_local.torch import _kernels as K


def sizes_for(n_tensors: int, total: int, seed: int) -> list:
    """n_tensors sizes summing to `total`: log-uniform, like a CNN/transformer's layers
    (a few big matrices, many small biases/norms)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.rand(n_tensors, generator=g, dtype=torch.float64) * 9.0)  # 1 .. e^9
    s = torch.floor(w / w.sum() * total).long().clamp_min(1)
    s[int(torch.argmax(s))] += total - int(s.sum())
    return [int(x) for x in s]


def timeit(fn, sync, repeats: int, warmup: int, setup=None) -> tuple:
    """(median, min) wall time of fn(); setup() (untimed) runs before each call."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    sync()
    ts = []
    for _ in range(repeats):
        if setup is not None:
            setup()
            sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts)


def bench_workload(name, n_tensors, total, device, repeats, warmup, with_python, ops="all"):
    dt = torch.float32
    sizes = sizes_for(n_tensors, total, seed=n_tensors)
    params = [torch.randn(n, dtype=dt, device=device) for n in sizes]
    anchors = [p + 0.01 * torch.randn_like(p) for p in params]
    momenta = [torch.zeros_like(p) for p in params]
    saved = [t.clone() for t in params + anchors + momenta]
    buf = torch.empty(total, dtype=dt, device=device)
    src = torch.randn(total, dtype=dt, device=device)

    def restore():  # SlowMo changes params/anchors/momenta: start every run from the same state
        for t, s in zip(params + anchors + momenta, saved):
            t.copy_(s)

    # The unpacks see an allreduced sum over n = 4 ranks that all hold `params` (4 * p, exact),
    # so with scale 1/4 the values stay the same from run to run (no drift into subnormals).
    
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    nbytes = total * 4
    res = {"workload": name, "tensors": n_tensors, "params": total, "bytes": nbytes,
           "device": device, "repeats": repeats, "times_s": {}, "min_times_s": {}}
    T = _Times(res["times_s"], res["min_times_s"])
    T["memcpy"] = timeit(lambda: buf.copy_(src), sync, repeats, warmup)

    impls = []
    cpp = K._cpp if K._cpp is not None else K._load_extension()[0]
    if cpp is not None and (device == "cpu" or cpp.with_cuda):
        impls.append(("cpp", cpp))
    if with_python:
        impls.append(("python", K._python))
    scale = 0.25
    lrs = [0.1] * len(params)
    for iname, impl in (impls if ops in ("all", "base") else []):
        T[f"{iname}.pack"] = timeit(lambda: impl.pack(params, buf, 0), sync, repeats, warmup)
        # pack + unpack with n = 1 (scale 1): the values round-trip unchanged
        T[f"{iname}.pack+unpack_average"] = timeit(
            lambda: (impl.pack(params, buf, 0), impl.unpack_average(buf, params, 1.0, 0)),
            sync, repeats, warmup)
        impl.pack(params, buf, 0)
        buf.mul_(4.0)
        T[f"{iname}.unpack_average"] = timeit(
            lambda: impl.unpack_average(buf, params, scale, 0), sync, repeats, warmup)
        T[f"{iname}.unpack_average_deviation"] = timeit(
            lambda: impl.unpack_average_deviation(buf, params, scale, 0), sync, repeats, warmup)
        T[f"{iname}.unpack_slowmo"] = timeit(
            lambda: impl.unpack_slowmo(buf, params, anchors, momenta, scale, lrs, 1.0, 0.7, 0),
            sync, repeats, warmup, setup=restore)
        restore()
    del saved, anchors, momenta
    moved = {}  # op -> bytes read + written
    if ops in ("all", "compress"):
        moved = bench_compress(T, params, impls, device, sync, repeats, warmup)
    for key in ("times_s", "min_times_s"):
        tt = res[key]
        m = tt["memcpy"]
        res["ratios" if key == "times_s" else "min_ratios"] = {
            k: (v / (2 * m) if k.endswith("pack+unpack_average") else v / m)
            for k, v in tt.items() if k != "memcpy" and not k.startswith("memcpy[")}
    res["memcpy_GBps"] = 2 * nbytes / res["times_s"]["memcpy"] / 1e9  # read + write
    # the compressed / overlapped ops: GB/s of their traffic, and time / memcpy of the same bytes
    res["bytes_moved"], res["GBps"] = {}, {}
    for k in list(res["times_s"]):
        op = k.split(".", 1)[-1]
        if op not in moved:
            continue
        b = moved[op]
        res["bytes_moved"][k] = b
        res["GBps"][k] = b / res["times_s"][k] / 1e9
        for key, rkey in (("times_s", "ratios"), ("min_times_s", "min_ratios")):
            res[rkey][k] = res[key][k] / res[key][f"memcpy[{b}]"]
    return res


N_RANKS = 4  # dequantize_int8_mean: the allgathered payloads of 4 ranks


def bench_compress(T, params, impls, device, sync, repeats, warmup) -> dict:
    """Times the overlapped / compressed ops on `params` (float32) into T; returns the bytes each
    op reads + writes (by op name), after timing a memcpy of those bytes (memcpy[<bytes>])."""
    acc = torch.float32
    numels = [p.numel() for p in params]
    total = sum(numels)
    nb = K.int8_num_blocks(numels)
    g = torch.Generator(device=device).manual_seed(0)
    # Inputs chosen so that repeated calls stay put (no drift into subnormals or overflow):
    # sent = x and buf = x make the overlapped packs fixed points; the residuals stay below
    # half a quantisation step.
    x = [p.clone() for p in params]
    sent = [p.to(acc) for p in x]
    bases = [s.clone() for s in sent]
    anchors = [p + 0.01 * torch.randn(p.shape, generator=g, device=device) for p in x]
    residuals = [torch.zeros_like(a) for a in anchors]
    buf = torch.cat([p.reshape(-1) for p in x])
    hbuf = (0.004 * torch.randn(total, generator=g, device=device)).half()
    abuf = hbuf.float()
    q = torch.zeros(total, dtype=torch.int8, device=device)
    scales = torch.zeros(nb, dtype=acc, device=device)
    q_all = torch.randint(-127, 128, (N_RANKS, total), generator=g, device=device,
                          dtype=torch.int8)
    s_all = 1e-4 * torch.rand(N_RANKS, nb, generator=g, device=device)
    out = torch.zeros(total, dtype=acc, device=device)
    e4, e2 = 4 * total, 2 * total  # bytes of one float32 / float16 pass
    moved = {
        "overlap_average_pack": 2 * e4 + 2 * e4 + 2 * e4,      # buf, params, sent: r + w
        "carry_pack": e4 + 2 * e4 + 2 * e4 + e4,              # base r, params + sent r/w, buf w
        "pack_delta_fp16": e4 + e4 + 2 * e4 + e2,             # x, c r; e r/w; buf w
        "quantize_int8": e4 + e4 + 2 * e4 + total + 4 * nb,   # x, c r; e r/w; q, scales w
        "dequantize_int8_mean": N_RANKS * (total + 4 * nb) + e4,  # q_all, scales_all r; out w
        "unpack_delta_average[f16]": e2 + 2 * e4 + e4,        # buf r; c r/w; x w
        "unpack_delta_average[f32]": e4 + 2 * e4 + e4,
        "overlap_delta_pack_fp16": 2 * e2 + 4 * (2 * e4),     # buf; x, c, s, e: r + w
    }
    # memcpy of the same bytes: a copy of half of them (one read + one write)
    most = max(moved.values()) // 2
    src = torch.randint(0, 255, (most,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for b in sorted(set(moved.values())):
        T[f"memcpy[{b}]"] = timeit(lambda: dst[: b // 2].copy_(src[: b // 2]), sync, repeats,
                                   warmup)
    del src, dst
    for iname, impl in impls:
        runs = {
            "overlap_average_pack": lambda: impl.overlap_average_pack(buf, x, sent, 1.0, 0),
            "carry_pack": lambda: impl.carry_pack(bases, x, sent, buf, 0),
            "pack_delta_fp16": lambda: impl.pack_delta_fp16(x, anchors, residuals, hbuf, 0),
            "quantize_int8": lambda: impl.quantize_int8(x, anchors, residuals, q, scales, 0, 0),
            "dequantize_int8_mean": lambda: impl.dequantize_int8_mean(
                q_all, s_all, out, 1.0 / N_RANKS, numels, 0, 0, 0),
            "unpack_delta_average[f16]": lambda: impl.unpack_delta_average(hbuf, x, anchors,
                                                                           0.25, 0),
            "unpack_delta_average[f32]": lambda: impl.unpack_delta_average(abuf, x, anchors,
                                                                           0.25, 0),
            "overlap_delta_pack_fp16": lambda: impl.overlap_delta_pack_fp16(
                hbuf, x, anchors, sent, residuals, 0.25, 0),
        }
        for op, fn in runs.items():
            T[f"{iname}.{op}"] = timeit(fn, sync, repeats, warmup)
    return moved


class _Times:
    """T[name] = (median, min) stores both."""

    def __init__(self, med: dict, mins: dict) -> None:
        self.med, self.mins = med, mins

    def __setitem__(self, k, v) -> None:
        self.med[k], self.mins[k] = v


def print_table(results) -> None:
    print(f"{'workload':<22} {'what':<40} {'median ms':>10} {'ratio':>7} {'min ms':>9} "
          f"{'ratio':>7} {'GB/s':>7}")
    for r in results:
        wl = f"{r['workload']} ({r['tensors']} t, {r['params'] / 1e6:g}M)"
        for k, v in r["times_s"].items():
            if k.startswith("memcpy["):
                continue
            vmin = r["min_times_s"][k]
            gbps = r.get("GBps", {}).get(k)
            if k == "memcpy":
                name, ratio, rmin = "memcpy: buf.copy_(src)", 1.0, 1.0
                gbps = r["memcpy_GBps"]
            else:
                name, ratio, rmin = k, r["ratios"][k], r["min_ratios"][k]
                if k.endswith("pack+unpack_average"):
                    name += " [/2x]"
                elif gbps is not None:
                    name += f" [{r['bytes_moved'][k] / r['params']:.4g} B/el]"
            gb = f"{gbps:>7.2f}" if gbps is not None else f"{'':>7}"
            print(f"{wl:<22} {name:<40} {v * 1e3:>10.3f} {ratio:>7.2f} {vmin * 1e3:>9.3f} "
                  f"{rmin:>7.2f} {gb}")
            wl = ""
    print("ratio = time / memcpy time of the same bytes; [/2x]: / (2 x memcpy), the two-pass "
          "bound; [B/el]: bytes read + written per element (the op's traffic; its ratio is to "
          "a memcpy moving as many bytes); GB/s = that traffic / time")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1/10 of the sizes (smoke test)")
    ap.add_argument("--no-python", action="store_true", help="skip the fallback")
    ap.add_argument("--ops", default="all", choices=["all", "base", "compress"],
                    help="base: pack/unpack ops; compress: the overlapped/compressed ops")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = ap.parse_args(argv)
    if args.repeats < 10 and not args.quick:
        ap.error("--repeats must be >= 10 (median of >= 10 runs)")
    div = 10 if args.quick else 1
    workloads = [("a", 160, 25_000_000 // div), ("b", 50, 1_000_000 // div)]
    results = [bench_workload(n, t, p, args.device, args.repeats, args.warmup, not args.no_python,
                              args.ops)
               for n, t, p in workloads]
    meta = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "backend_info": K.backend_info(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "repeats": args.repeats,
        "ops": args.ops,
        "warmup": args.warmup,
        "statistic": "median (times_s, ratios) and min (min_times_s, min_ratios)",
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"pack_{_dt.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"# {meta['backend_info']}; torch {meta['torch']}, {meta['threads']} threads, "
          f"median of {args.repeats} after {args.warmup} warm-up; device {args.device}")
    print_table(results)
    print(f"# written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
