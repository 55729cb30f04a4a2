"""Time of one sync on 2 ranks: our fused path vs the alternatives, side by side in one run.

    .venv/bin/python benchmarks/bench_sync.py            # launches horovodrun (gloo, then mpi)
    .venv/bin/python benchmarks/bench_sync.py --rate 10gbit --controllers gloo
                                  # Gloo over a tc-capped loopback (compare.py's BandwidthCap)

Two local ranks normally talk through shared memory (MPI) or an uncapped loopback (Gloo), where
the allreduce itself costs only a few memory passes; ``--rate`` runs the ranks in a private network
namespace whose ``lo`` is capped (root and ``tc`` needed), so the floor is a network transfer
as on a cluster. Gloo only then: Open MPI's local ranks use shared memory whatever the cap, and
horovodrun already passes its own ``--mca btl`` (a second one is refused).

Methods (all average the same tensors over the ranks):
  (a) fused    horovod_local's sync: pack -> ONE allreduce per dtype -> fused unpack
  (b) pertensor  hvd.allreduce_async_ per tensor (op=Average) + synchronize
  (c) grouped  hvd.grouped_allreduce_ (op=Average)
  (d) cat      torch.cat + one allreduce + copy back (PyTorch's model averager's method)
  (e) floor    a bare allreduce of an already packed buffer of the same bytes
  (f) fp16     (a) with compression='fp16' (2 bytes an element: delta + error feedback)
  (g) int8     (a) with compression='int8' (1 byte an element + block scales, by allgather)
  (o) overlap  overlap=True: the time a training step is BLOCKED at a round boundary
               (complete the round in flight + start the next), with the previous round given
               time to travel (a sleep of 3x the last (e), standing in for local steps)
  (p) previous (``--against REV``) (a) with the package as of git revision REV, imported in the
               same processes as ``horovod_local_prev`` and timed interleaved with (a)
Results: benchmarks/results/sync_<date>.json and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {  # name -> (number of tensors, total float32 parameters)
    "160x25M": (160, 25_000_000),
    "50x1M": (50, 1_000_000),
}


def _shapes(n_tensors: int, total: int) -> list[int]:
    # uneven sizes, as in real models (a few big matrices, many small vectors)
    import numpy as np

    rng = np.random.default_rng(0)
    w = rng.pareto(1.2, n_tensors) + 0.01
    sizes = np.maximum(1, (w / w.sum() * total).astype(int))
    sizes[0] += total - sizes.sum()
    return [int(s) for s in sizes]


def _previous_package(rev: str, dest: Path) -> None:
    """``horovod_local`` as of ``rev``, renamed ``horovod_local_prev`` under ``dest`` (its own
    imports rewritten; the built CPU extension copied in: csrc/cpu must be unchanged since ``rev``)."""
    import shutil

    diff = subprocess.run(["git", "diff", "--stat", rev, "--", "csrc/cpu"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    if diff.strip():
        raise SystemExit(f"[bench_sync] csrc/cpu changed since {rev}: the built extension would "
                         f"not be that revision's")
    archive = subprocess.run(["git", "archive", rev, "horovod_local"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    pkg = dest / "horovod_local_prev"
    (dest / "horovod_local").rename(pkg)
    for f in pkg.rglob("*.py"):
        f.write_text(f.read_text().replace("horovod_local", "horovod_local_prev"))
    for so in (ROOT / "horovod_local").glob("_C*.so"):
        shutil.copy(so, pkg / so.name)


def worker(out: str, repeats: int, prev: str = "") -> None:
    import torch
    import horovod.torch as hvd
    import horovod_local.torch as hlt

    if prev:
        sys.path.insert(0, prev)
        import horovod_local_prev.torch as hlt_prev

    hvd.init()
    torch.set_num_threads(1)
    rows = []
    for model_name, (n_tensors, total) in MODELS.items():
        params = [torch.nn.Parameter(torch.randn(s) * (hvd.rank() + 1)) for s in _shapes(n_tensors, total)]
        opt = hlt.DistributedLocalOptimizer(torch.optim.SGD(params, lr=0.1), period=1_000_000)
        # + our 3 control elements and the guard; real values (torch.empty may hold denormals or NaN,
        # whose arithmetic in the summing allreduce is slower)
        packed = torch.randn(total + 4)
        if prev:
            opt_prev = hlt_prev.DistributedLocalOptimizer(torch.optim.SGD(params, lr=0.1),
                                                          period=1_000_000)
        opts = {mode: hlt.DistributedLocalOptimizer(torch.optim.SGD(params, lr=0.1),
                                                    period=1_000_000, compression=mode)
                for mode in ("fp16", "int8")}
        opt_ov = hlt.DistributedLocalOptimizer(torch.optim.SGD(params, lr=0.1), period=1_000_000,
                                               overlap=True)
        opt_ov._hl_overlapped_round()  # the first round in flight
        last_floor = [0.1]

        def fp16():
            opts["fp16"].average_parameters()

        def int8():
            opts["int8"].average_parameters()

        def overlap():  # the boundary only: the round in flight had time to arrive
            opt_ov._hl_overlapped_round()

        def fused():
            opt.average_parameters()

        def previous():  # before average_parameters() existed, synchronize() was the average
            opt_prev.synchronize()

        def pertensor():
            hs = [hvd.allreduce_async_(p.data, name=f"pt.{i}", op=hvd.Average) for i, p in enumerate(params)]
            for h in hs:
                hvd.synchronize(h)

        def grouped():
            hvd.grouped_allreduce_([p.data for p in params], name="grouped", op=hvd.Average)

        def cat():
            flat = torch.cat([p.data.view(-1) for p in params])
            hvd.allreduce_(flat, name="cat", op=hvd.Average)
            off = 0
            for p in params:
                p.data.copy_(flat[off: off + p.numel()].view_as(p))
                off += p.numel()

        def floor():
            t0 = time.perf_counter()
            hvd.allreduce_(packed, name="floor", op=hvd.Sum)
            last_floor[0] = time.perf_counter() - t0

        methods = {"a_fused": fused, "b_pertensor": pertensor, "c_grouped": grouped,
                   "d_cat": cat, "e_floor": floor, "f_fp16": fp16, "g_int8": int8,
                   "o_overlap_blocked": overlap}
        if prev:
            methods["p_previous"] = previous
        times = {k: [] for k in methods}
        for rep in range(repeats + 2):  # interleaved, so drift hits every method alike
            # rotated, so that none always follows the same one (under a tc cap the token
            # bucket refills in the gaps: the method after a light one would start with credit)
            order = list(methods.items())
            order = order[rep % len(order):] + order[:rep % len(order)]
            for name, fn in order:
                if name == "o_overlap_blocked":  # local steps stand-in: the round travels
                    time.sleep(3 * last_floor[0])
                hvd.allreduce(torch.zeros(1), name="barrier")
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                if rep >= 2:
                    times[name].append(dt)
        # every rank's slowest view counts (a sync ends when the last rank has it)
        med = {k: statistics.median(v) for k, v in times.items()}
        med = {k: float(hvd.allreduce(torch.tensor([v]), name=f"max.{k}", op=hvd.Max)[0])
               for k, v in med.items()}
        opt_ov.average_parameters()  # no round left in flight
        rows.append({"model": model_name, "tensors": n_tensors, "params": total,
                     "bytes": 4 * total, "median_s": med, "repeats": repeats,
                     "bytes_per_round": {m: o.sync_stats().bytes_sent / max(o.sync_stats().syncs, 1)
                                         for m, o in opts.items()},
                     "backend": hlt.backend_info(),
                     "backend_previous": hlt_prev.backend_info() if prev else None})
    if hvd.rank() == 0:
        with open(out, "w") as f:
            json.dump(rows, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--controllers", default="gloo,mpi")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rate", default="none", help="cap loopback bandwidth, e.g. 10gbit, 1gbit")
    ap.add_argument("--against", default="", metavar="REV",
                    help="also time (a) as of git revision REV, interleaved in the same run")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--prev-path", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.repeats, args.prev_path)
    prev_dir = tempfile.TemporaryDirectory(prefix="hl-prev-") if args.against else None
    if prev_dir is not None:
        _previous_package(args.against, Path(prev_dir.name))
    results = {"date": str(date.today()), "machine": f"{platform.node()} {os.cpu_count()} cores",
               "command": " ".join([Path(sys.executable).name] + sys.argv), "runs": {},
               "against": args.against or None}
    exe = Path(sys.executable).with_name("horovodrun")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compare import BandwidthCap, parse_rate

    rate_tc, rate_bits = parse_rate(args.rate)
    cap = BandwidthCap(rate_tc, rate_bits, "auto")
    try:
        results["bandwidth_cap"] = cap.apply() if rate_tc else {"applied": False,
                                                                "message": "uncapped"}
        print(f"[bench_sync] bandwidth: {results['bandwidth_cap']['message']}", flush=True)
        if rate_tc and not results["bandwidth_cap"].get("applied"):
            raise SystemExit("[bench_sync] the cap could not be applied; not measuring")
        for c in args.controllers.split(","):
            if rate_tc and c != "gloo":
                print(f"[bench_sync] {c}: skipped under a cap (local MPI ranks use shared "
                      f"memory, not the capped loopback)", flush=True)
                continue
            with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
                           TF_CPP_MIN_LOG_LEVEL="3")
                cmd = [*cap.prefix(), str(exe), "-np", "2", "-H", "localhost:2", f"--{c}",
                       sys.executable, __file__, "--worker", tmp.name, "--repeats",
                       str(args.repeats)] + (["--prev-path", prev_dir.name] if prev_dir else [])
                print(f"[bench_sync] {c}: {' '.join(cmd)}", flush=True)
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
                results["runs"][c] = json.load(open(tmp.name))
    finally:
        cap.remove()
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"_{rate_tc}" if rate_tc else ""
    out = out_dir / f"sync_{date.today()}{tag}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"\nbackend: {results['runs'][next(iter(results['runs']))][0]['backend']}")
    print("| controller | model | (a) fused ms | (b) per-tensor ms | (c) grouped ms | (d) cat ms | "
          "(e) floor ms | a/e | b/a | c/a | d/a |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c, rows in results["runs"].items():
        for r in rows:
            m = r["median_s"]
            ms = lambda k: f"{1e3 * m[k]:.1f}"  # noqa: E731
            print(f"| {c} | {r['model']} | {ms('a_fused')} | {ms('b_pertensor')} | "
                  f"{ms('c_grouped')} | {ms('d_cat')} | {ms('e_floor')} | "
                  f"{m['a_fused'] / m['e_floor']:.2f} | {m['b_pertensor'] / m['a_fused']:.2f} | "
                  f"{m['c_grouped'] / m['a_fused']:.2f} | {m['d_cat'] / m['a_fused']:.2f} |")
    print("\nCompressed and overlapped rounds (same run):")
    print("| controller | model | (e) floor ms | (f) fp16 ms | f/e | (g) int8 ms | g/e | "
          "bytes a/f/g per round | (o) blocked ms | o/e |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c, rows in results["runs"].items():
        for r in rows:
            m, b = r["median_s"], r["bytes_per_round"]
            print(f"| {c} | {r['model']} | {1e3 * m['e_floor']:.1f} | {1e3 * m['f_fp16']:.1f} | "
                  f"{m['f_fp16'] / m['e_floor']:.2f} | {1e3 * m['g_int8']:.1f} | "
                  f"{m['g_int8'] / m['e_floor']:.2f} | {r['bytes'] / 1e6:.0f} / "
                  f"{b['fp16'] / 1e6:.0f} / {b['int8'] / 1e6:.0f} MB | "
                  f"{1e3 * m['o_overlap_blocked']:.1f} | "
                  f"{m['o_overlap_blocked'] / m['e_floor']:.2f} |")
    if prev_dir is not None:
        print(f"\n(p) = (a) as of {args.against}:")
        print("| controller | model | (a) ms | (p) ms | a/p |")
        print("|---|---|---|---|---|")
        for c, rows in results["runs"].items():
            for r in rows:
                m = r["median_s"]
                print(f"| {c} | {r['model']} | {1e3 * m['a_fused']:.1f} | "
                      f"{1e3 * m['p_previous']:.1f} | {m['a_fused'] / m['p_previous']:.3f} |")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
