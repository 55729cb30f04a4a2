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
from compare_lib.config import METHODS, MODES, TASK_SETTINGS
from compare_lib.launch import kill_children, launch_task, machine_info
from compare_lib.report import derive, make_plots, summary_lines, write_markdown
from compare_lib.worker import worker_main


def driver_main(args) -> int:
    mode = "smoke" if args.smoke else ("full" if args.full else "quick")
    mcfg = copy.deepcopy(MODES[mode])
    rate = args.rate if args.rate is not None else mcfg["rate"]
    rate_tc, rate_bits = parse_rate(rate)
    tasks = mcfg["tasks"]
    if args.tasks:
        want = [x.strip() for x in args.tasks.split(",") if x.strip()]
        unknown = [x for x in want if x not in TASK_SETTINGS]
        if unknown:
            raise SystemExit(f"--tasks: unknown {unknown}; choose from {list(TASK_SETTINGS)}")
        full = MODES["full"]["tasks"]
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    cap = BandwidthCap(rate_tc, rate_bits, args.isolation)
    remove_on_exit(cap, stop_runs=kill_children)

    t_all = time.time()
    results = {"mode": mode, "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
               "command": " ".join(shlex.quote(a) for a in sys.argv),
               "cwd": os.getcwd(), "np": args.np, "seed": args.seed,
               "machine": machine_info(), "tasks": []}
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the default: ~3-4 min, 3-4 methods/task")
    g.add_argument("--full", action="store_true", help="all methods, all tasks, longer")
    g.add_argument("--smoke", action="store_true",
                   help="under a minute: digits (torch) and digits_keras, 2 methods each, "
                        "uncapped")
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
    ap.add_argument("--np", type=int, default=2, help="ranks (default 2)")
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
