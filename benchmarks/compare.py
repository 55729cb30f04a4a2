#!/usr/bin/env python
"""End-to-end comparison: horovod-local's local methods vs Horovod's per-step allreduce.

One invocation trains, on 2 ranks (``horovodrun -np 2 --gloo``, one launch per task running
every method in turn), the tasks of ``examples/tasks.py`` with:

* ``Horovod``: ``hvd.DistributedOptimizer`` (gradient allreduce every step);
* local SGD ``H=1/4/8/16``, ADPSGD (``horovod_local.Adaptive``), Local AdaAlter ``H=1/4/8``
  (language model only), SlowMo ``H=8``: ``horovod_local.torch.DistributedLocalOptimizer``;
* ``no-comm``: ``period=Never()`` with one ``synchronize()`` at the end (the bound).

Task ``digits_keras`` is the same digits classifier (the torch task's data split, batches and
initial weights, same hyper-parameters) in Keras 3, in a custom loop of ``tf.function`` steps:
ours is ``horovod_local.tensorflow.keras.DistributedLocalOptimizer``; its "Horovod" baseline is
a per-step ``horovod.tensorflow.allreduce`` of every gradient, because Horovod's Keras
``DistributedOptimizer`` does not allreduce on Keras 3 (see ``compare_lib/keras_worker.py``).

Same steps, batch per rank, lr and initial model for every method. Loopback bandwidth is capped
with ``tc ... tbf`` (Gloo talks TCP over ``lo``). By default the cap is put on the ``lo`` of a
private network namespace created for the run (so nothing else on the machine is throttled);
if that is not possible it goes on the host's ``lo``; if neither is possible (not root, no ``tc``,
someone else's qdisc already on ``lo``) the runs are uncapped and the results say so. The cap
is always removed (try/finally, atexit, SIGINT/SIGTERM/SIGHUP handlers).

Usage::

    .venv/bin/python benchmarks/compare.py --quick            # ~3-4 min, the README command
    .venv/bin/python benchmarks/compare.py --full --rate 1gbit --out results/full
    .venv/bin/python benchmarks/compare.py --smoke --rate none # < 1 min; used by the tests

Every number in the table is taken at the same step count for every method. For the
time-to-target column only, local methods may go on (``--extend``, a fraction of the steps)
until they reach Horovod's final metric. ``--repeats N`` runs every method N times in
alternating order and reports median timings (the machine may be shared).

Outputs in ``--out`` (default ``results/``): ``results.json`` (every run, every metric, the
machine, date, command, rate), ``results.md`` (the table), ``<task>_metric.png`` (held-out metric
vs wall time and vs steps), ``throughput_vs_H.png``, ``adpsgd_period.png``, ``logs/``.

This file parses the arguments and drives the runs; the parts are in ``compare_lib/`` (see its
``__init__``). horovodrun starts every rank as ``compare.py --worker CONFIG``.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

from compare_lib.bandwidth import BandwidthCap, parse_rate, remove_on_exit
from compare_lib.config import HOST_MODES, METHODS, MODES, TASK_SETTINGS, TWO_HOST_METHODS
from compare_lib.hosts import TwoHostBed, parse_hosts
from compare_lib.launch import kill_children, launch_task, machine_info
from compare_lib.report import derive, derive_two_host, make_plots, summary_lines, write_markdown
from compare_lib.worker import worker_main


def driver_main(args) -> int:
    mode = ("smoke" if args.smoke else "full" if args.full
            else "overlap_compression" if args.overlap_compression else "quick")
    per_host = parse_hosts(args.hosts) if args.hosts else None
    if per_host and mode == "overlap_compression":
        raise SystemExit("--overlap-compression runs on one host; drop --hosts "
                         "(or pass --hosts with --methods)")
    mcfg = copy.deepcopy(HOST_MODES[mode] if per_host else MODES[mode])
    rate = args.rate if args.rate is not None else mcfg["rate"]
    rate_tc, rate_bits = parse_rate(rate)
    tasks = mcfg["tasks"]
    if args.tasks:
        want = [x.strip() for x in args.tasks.split(",") if x.strip()]
        unknown = [x for x in want if x not in TASK_SETTINGS]
        if unknown:
            raise SystemExit(f"--tasks: unknown {unknown}; choose from {list(TASK_SETTINGS)}")
        full = MODES["full"]["tasks"]
        if per_host:  # every task with the two-host methods; digits/charlm as HOST_MODES has them
            full = {**{k: {**v, "methods": list(TWO_HOST_METHODS)} for k, v in full.items()},
                    **HOST_MODES["full"]["tasks"]}
        tasks = {k: tasks.get(k, full[k]) for k in want}
    for k, v in tasks.items():
        if args.steps:
            v["steps"] = args.steps
        if args.eval_every:
            v["eval_every"] = args.eval_every
        if args.methods:
            ms = [x.strip() for x in args.methods.split(";") if x.strip()]
            bad = [x for x in ms if x not in METHODS]
            if bad:
                raise SystemExit(f"--methods: unknown {bad}; choose from {list(METHODS)}")
            v["methods"] = [m for m in ms if k == "charlm" or "AdaAlter" not in m]
    skipped = drop_unavailable(tasks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if per_host:
        cap = TwoHostBed(rate_tc, rate_bits, per_host)
        args.np = cap.np
        os.environ["HOROVOD_TIMELINE"] = "DYNAMIC"  # which allreduce ran (see allreduce_ops)
    else:
        cap = BandwidthCap(rate_tc, rate_bits, args.isolation)
    remove_on_exit(cap, stop_runs=kill_children)

    t_all = time.time()
    results = {"mode": mode, "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
               "command": " ".join(shlex.quote(a) for a in sys.argv),
               "cwd": os.getcwd(), "np": args.np, "seed": args.seed,
               "machine": machine_info(), "tasks": [], "skipped_methods": skipped}
    if per_host:
        results.update(hosts=cap.horovodrun_hosts(), controller=args.controller)
    try:
        results["bandwidth_cap"] = cap.apply()
        print(f"[compare] mode {mode}; bandwidth: {cap.status['message']}", flush=True)
        for task, tcfg in tasks.items():
            res = launch_task(task, tcfg, args, cap, out)
            if res is None:
                results["tasks"].append({"task": task, "failed": True, "runs": [],
                                         "complete": False})
                continue
            results["tasks"].append(res)
    finally:
        cap.remove()
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["total_wall_s"] = time.time() - t_all
    ok_tasks = [t for t in results["tasks"] if t.get("runs")]
    for t in ok_tasks:
        derive(t)
        if per_host:
            derive_two_host(t, rate_bits)
    results["tasks"] = ok_tasks + [t for t in results["tasks"] if not t.get("runs")]
    results["summary"] = summary_lines({**results, "tasks": ok_tasks})
    md = write_markdown({**results, "tasks": ok_tasks}, out / "results.md")
    try:
        results["plots"] = make_plots({**results, "tasks": ok_tasks}, out)
    except Exception as e:  # plots must not lose the numbers
        results["plots"] = []
        print(f"[compare] plotting failed: {e!r}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n" + md)
    for line in results["summary"]:
        print(line)
    failed = [t["task"] for t in results["tasks"] if not t.get("complete", False)]
    print(f"\n[compare] done in {results['total_wall_s']:.0f}s; results: {out.resolve()}/"
          f"results.{{json,md}}, plots: {', '.join(results['plots'])}"
          + (f"; FAILED/INCOMPLETE: {failed}" if failed else ""), flush=True)
    return 1 if failed else 0


def drop_unavailable(tasks: dict) -> list[str]:
    """Leaves out the methods this checkout or front end cannot run, saying so: two-level
    averaging (``local_period``) needs a horovod_local.torch that has it, and the torch tasks."""
    import inspect

    try:
        import horovod_local.torch as hlt
        has_two_level = "local_period" in inspect.signature(
            hlt.DistributedLocalOptimizer).parameters
    except Exception as e:  # pragma: no cover
        has_two_level = False
        print(f"[compare] cannot import horovod_local.torch: {e!r}", flush=True)
    keras_compression = _keras_takes_compression()
    skipped = []
    for k, v in tasks.items():
        keep = []
        for m in v["methods"]:
            why = None
            if "local_period" in METHODS[m]:
                if TASK_SETTINGS[k].get("framework", "torch") != "torch":
                    why = "two-level averaging is run for the torch tasks only"
                elif not has_two_level:
                    why = ("horovod_local.torch.DistributedLocalOptimizer has no local_period "
                           "argument in this checkout")
            if why is None and TASK_SETTINGS[k].get("framework", "torch") == "keras":
                if METHODS[m].get("overlap"):
                    why = ("overlap=True is not available in the Keras front end (Horovod's "
                           "TensorFlow collectives cannot stay in flight across compiled train "
                           "steps; docs/KERAS.md)")
                elif METHODS[m].get("compression") and not keras_compression:
                    why = ("horovod_local.tensorflow.keras.DistributedLocalOptimizer takes no "
                           "compression= in this checkout")
            if why:
                skipped.append(f"{k}: {m}: {why}")
                print(f"[compare] WARNING: skipping {m} on {k}: {why}", flush=True)
            else:
                keep.append(m)
        v["methods"] = keep
    return skipped


def _keras_takes_compression() -> bool:
    """Whether the Keras wrapper has a ``compression`` argument, read from its source (importing
    TensorFlow in the driver would cost ~5-10 s)."""
    import ast

    from compare_lib.config import ROOT

    src = ROOT / "horovod_local" / "tensorflow" / "keras" / "optimizer.py"
    try:
        tree = ast.parse(src.read_text())
    except (OSError, SyntaxError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "DistributedLocalOptimizer":
            for f in node.body:
                if isinstance(f, ast.FunctionDef) and f.name == "__init__":
                    a = f.args
                    return "compression" in {x.arg for x in [*a.args, *a.kwonlyargs]}
    return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the default: ~3-4 min, 3-4 methods/task")
    g.add_argument("--full", action="store_true", help="all methods, all tasks, longer")
    g.add_argument("--smoke", action="store_true",
                   help="under a minute: digits (torch) and digits_keras, 2 methods each, "
                        "uncapped")
    g.add_argument("--overlap-compression", action="store_true",
                   help="overlapped rounds and compressed syncs: Horovod, local SGD H=8, H=8 "
                        "overlap / fp16 / int8 / overlap+int8, no-comm, on digits, charlm and "
                        "digits_keras (Keras: no overlap; compression only if its wrapper has "
                        "it), quick mode's steps, no time-to-target extension (~6-8 min)")
    ap.add_argument("--rate", default=None,
                    help="loopback cap: 1gbit (default; smoke: none), 10gbit, 500mbit, none")
    ap.add_argument("--out", default="results", help="output folder (default results/)")
    ap.add_argument("--tasks", default=None, help="comma list from: digits, digits_keras, charlm")
    ap.add_argument("--steps", type=int, default=None, help="override the steps of every task")
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--methods", default=None,
                    help="';'-separated method labels, e.g. 'Horovod;local SGD H=8'")
    ap.add_argument("--extend", type=float, default=None,
                    help="local methods may run up to this fraction more steps to reach "
                         "Horovod's final metric (time to target; the table stays at equal "
                         "steps). Default: 0.3 (--full), 0.25 (--quick), 0 (--smoke)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every method this many times (alternating order) and report the "
                         "median wall time / throughput / comm time; curves and metrics come "
                         "from the first repeat")
    ap.add_argument("--np", type=int, default=2, help="ranks (default 2; --hosts sets it)")
    ap.add_argument("--hosts", default=None, metavar="2xK",
                    help="two hosts x K ranks on scripts/hosts.sh's test bed (network "
                         "namespaces with sshd, brought up for the run and always torn down): "
                         "--rate caps the inter-host link (default 1gbit), intra-host traffic "
                         "is uncapped; methods: Horovod, Horovod with "
                         "HOROVOD_HIERARCHICAL_ALLREDUCE=1, local SGD H=8, two-level H=8 L=1, "
                         "no-comm. Needs root, iproute2, openssh-server")
    ap.add_argument("--controller", choices=["gloo", "mpi"], default="gloo",
                    help="with --hosts: horovodrun's controller (default gloo)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--isolation", choices=["auto", "netns", "host"], default="auto",
                    help="where the cap goes: a private network namespace's lo (auto tries it "
                         "first) or the host's lo")
    ap.add_argument("--timeout", type=float, default=3600, help="per-task launch timeout (s)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        try:
            worker_main(args.worker)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)  # never leave the other rank waiting in a collective
        return 0
    return driver_main(args)


if __name__ == "__main__":
    sys.exit(main())
