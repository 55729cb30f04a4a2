"""Single-process benchmark of the fused-sync pack/unpack kernels.

For each workload (a) 160 tensors / 25M float32 params and (b) 50 tensors / 1M params, times
(median of --repeats runs after --warmup):

- memcpy:        ``buf.copy_(src)`` of the same bytes: one read + one write pass, the
                 memory-bandwidth bound of one pack or one unpack;
- pack, unpack_average, and pack + unpack_average, with the extension ("cpp") and the PyTorch
  fallback ("python");
- unpack_average_deviation and unpack_slowmo (extension and fallback), for reference.

Ratios are to memcpy (pack, unpack) and to 2 x memcpy (pack + unpack). Writes JSON to
benchmarks/results/pack_<date>.json and prints a table.

    .venv/bin/python benchmarks/bench_pack.py [--device cpu|cuda] [--repeats 10] [--quick]
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


def bench_workload(name, n_tensors, total, device, repeats, warmup, with_python):
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
    for iname, impl in impls:
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
    for key in ("times_s", "min_times_s"):
        tt = res[key]
        m = tt["memcpy"]
        res["ratios" if key == "times_s" else "min_ratios"] = {
            k: (v / (2 * m) if k.endswith("pack+unpack_average") else v / m)
            for k, v in tt.items() if k != "memcpy"}
    res["memcpy_GBps"] = 2 * nbytes / res["times_s"]["memcpy"] / 1e9  # read + write
    return res


class _Times:
    """T[name] = (median, min) stores both."""

    def __init__(self, med: dict, mins: dict) -> None:
        self.med, self.mins = med, mins

    def __setitem__(self, k, v) -> None:
        self.med[k], self.mins[k] = v


def print_table(results) -> None:
    print(f"{'workload':<22} {'what':<32} {'median ms':>10} {'ratio':>7} {'min ms':>9} {'ratio':>7}")
    for r in results:
        wl = f"{r['workload']} ({r['tensors']} t, {r['params'] / 1e6:g}M)"
        for k, v in r["times_s"].items():
            vmin = r["min_times_s"][k]
            if k == "memcpy":
                name, ratio, rmin = "memcpy: buf.copy_(src)", 1.0, 1.0
            else:
                name, ratio, rmin = k, r["ratios"][k], r["min_ratios"][k]
                if k.endswith("pack+unpack_average"):
                    name += " [/2x]"
            print(f"{wl:<22} {name:<32} {v * 1e3:>10.3f} {ratio:>7.2f} {vmin * 1e3:>9.3f} {rmin:>7.2f}")
            wl = ""
    print("ratio = time / memcpy time of the same bytes; [/2x]: / (2 x memcpy), the two-pass bound")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1/10 of the sizes (smoke test)")
    ap.add_argument("--no-python", action="store_true", help="skip the fallback")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = ap.parse_args(argv)
    if args.repeats < 10 and not args.quick:
        ap.error("--repeats must be >= 10 (median of >= 10 runs)")
    div = 10 if args.quick else 1
    workloads = [("a", 160, 25_000_000 // div), ("b", 50, 1_000_000 // div)]
    results = [bench_workload(n, t, p, args.device, args.repeats, args.warmup, not args.no_python)
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
