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
``DistributedOptimizer`` does not allreduce on Keras 3 (see ``KERAS_BASELINE``).

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
"""
from __future__ import annotations

import argparse
import atexit
import copy
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------------
# Methods and modes
# ------------------------------------------------------------------------------------------------
# label -> spec. "kind": horovod | local; "period": int | "adaptive" | "never";
# "inner": default (the task's) | adaalter; "algorithm": local_sgd | slowmo.
METHODS = {
    "Horovod": {"kind": "horovod"},
    "local SGD H=1": {"kind": "local", "period": 1},
    "local SGD H=4": {"kind": "local", "period": 4},
    "local SGD H=8": {"kind": "local", "period": 8},
    "local SGD H=16": {"kind": "local", "period": 16},
    "ADPSGD": {"kind": "local", "period": "adaptive"},
    "Local AdaAlter H=1": {"kind": "local", "period": 1, "inner": "adaalter"},
    "Local AdaAlter H=4": {"kind": "local", "period": 4, "inner": "adaalter"},
    "Local AdaAlter H=8": {"kind": "local", "period": 8, "inner": "adaalter"},
    "SlowMo H=8": {"kind": "local", "period": 8, "algorithm": "slowmo"},
    "no-comm (H=inf)": {"kind": "local", "period": "never"},
}

# Per task: model/data settings and optimizer hyper-parameters (the same for every method).
TASK_SETTINGS = {
    "digits": {
        "task_kwargs": {"hidden": 1024, "hidden2": 512, "batch": 32},
        "inner": "sgd", "lr": 0.05, "momentum": 0.9, "lr_warmup_steps": 0,
    },
    "charlm": {
        "task_kwargs": {"emb": 64, "hidden": 384, "seq": 64, "batch": 16},
        "inner": "adagrad", "lr": 0.05, "lr_warmup_steps": 30,
        # Local AdaAlter: eps is the per-step placeholder for g^2, b0^2 the initial denominator.
        "adaalter_eps": 1e-3, "adaalter_b0sq": 1e-6,
    },
}
# The same digits classifier in Keras 3: the torch task's data, split, batches per rank and
# initial weights; the same SGD+momentum hyper-parameters (Keras' momentum form v = m v - lr g
# equals torch's for a constant lr).
TASK_SETTINGS["digits_keras"] = {**TASK_SETTINGS["digits"], "framework": "keras",
                                 "base_task": "digits"}
SLOWMO = {"slowmo_lr": 1.0, "slowmo_momentum": 0.5}
ADPSGD_INITIAL_PERIOD = 4
ADPSGD_SAMPLING_FRACTION = 0.2  # K_s = 0.2 * total steps (paper: 0.2-0.25)

MODES = {
    "smoke": {
        "rate": "none",
        "tasks": {"digits": {"steps": 16, "eval_every": 8,
                             "methods": ["Horovod", "local SGD H=4"]},
                  "digits_keras": {"steps": 16, "eval_every": 8,
                                   "methods": ["Horovod", "local SGD H=8"]}},
    },
    "quick": {
        "rate": "1gbit",
        "tasks": {
            "digits": {"steps": 300, "eval_every": 25, "extend": 0.25,
                       "methods": ["Horovod", "local SGD H=8", "ADPSGD", "no-comm (H=inf)"]},
            # One more launch (TensorFlow's start-up is ~10 s): keep it to 3 methods.
            "digits_keras": {"steps": 300, "eval_every": 25, "extend": 0.25,
                             "methods": ["Horovod", "local SGD H=8", "no-comm (H=inf)"]},
            "charlm": {"steps": 160, "eval_every": 20, "extend": 0.25,
                       "methods": ["Horovod", "local SGD H=8", "Local AdaAlter H=4",
                                   "no-comm (H=inf)"]},
        },
    },
    "full": {
        "rate": "1gbit",
        "tasks": {
            "digits": {"steps": 600, "eval_every": 40, "extend": 0.3,
                       "methods": ["Horovod", "local SGD H=1", "local SGD H=4", "local SGD H=8",
                                   "local SGD H=16", "ADPSGD", "SlowMo H=8", "no-comm (H=inf)"]},
            "digits_keras": {"steps": 600, "eval_every": 40, "extend": 0.3,
                             "methods": ["Horovod", "local SGD H=1", "local SGD H=4",
                                         "local SGD H=8", "local SGD H=16", "ADPSGD",
                                         "SlowMo H=8", "no-comm (H=inf)"]},
            "charlm": {"steps": 300, "eval_every": 30, "extend": 0.3,
                       "methods": ["Horovod", "local SGD H=1", "local SGD H=4", "local SGD H=8",
                                   "local SGD H=16", "ADPSGD", "Local AdaAlter H=1",
                                   "Local AdaAlter H=4", "Local AdaAlter H=8", "SlowMo H=8",
                                   "no-comm (H=inf)"]},
        },
    },
}


# ================================================================================================
# Worker: runs under horovodrun, one process per rank
# ================================================================================================
# One training loop for every framework (the same timing, evaluation, time-to-target and
# record-keeping rules for the torch and Keras tasks); a per-framework "run" object builds the
# model and optimizer of one method and does its steps, syncs and evaluations.
class _TorchRun:
    """One method of a torch task: ``hvd.DistributedOptimizer`` or our
    ``horovod_local.torch.DistributedLocalOptimizer``."""

    def __init__(self, w: _TorchWorker, spec: dict, steps: int) -> None:
        import torch

        hvd, hl, hlt, task, settings = w.hvd, w.hl, w.hlt, w.task, w.settings
        self.w, self.spec = w, spec
        self.model = model = task.build_model(seed=w.seed)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        self.eval_model = copy.deepcopy(model)
        self.inner, use_sched = w.make_inner(spec, model.parameters())
        self.grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.n_params = w.n_params(model)
        if spec["kind"] == "horovod":
            self.opt = hvd.DistributedOptimizer(self.inner,
                                                named_parameters=model.named_parameters(),
                                                op=hvd.Average)
        else:
            kw = dict(SLOWMO, algorithm="slowmo") if spec.get("algorithm") == "slowmo" else {}
            self.opt = hlt.DistributedLocalOptimizer(self.inner, model.named_parameters(),
                                                     period=_make_period(hl, spec, steps), **kw)
        self.sched = None
        if use_sched and settings["lr_warmup_steps"] > 0:
            wu = settings["lr_warmup_steps"]
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt,
                                                           lambda t: min(1.0, (t + 1) / wu))
        self.batches = task.train_batches(w.rank, w.size, seed=w.seed)

    def train_step(self):
        """One step; returns (loss tensor, seconds in Horovod's gradient allreduce)."""
        opt, comm = self.opt, 0.0
        opt.zero_grad()
        loss = self.w.task.loss(self.model, next(self.batches))
        loss.backward()
        if self.spec["kind"] == "horovod":
            t0 = time.perf_counter()
            opt.synchronize()
            comm = time.perf_counter() - t0
            with opt.skip_synchronize():
                opt.step()
        else:
            opt.step()
        if self.sched is not None:
            self.sched.step()
        return loss.detach(), comm

    def sync_stats(self):
        return self.opt.sync_stats()

    def sync_count(self) -> int:
        return self.opt.sync_stats().syncs

    def synchronize(self) -> None:
        self.opt.synchronize()

    def evaluate(self, need_avg: bool) -> float:
        """Held-out metric of the ranks' average model; each rank scores half the set."""
        import torch

        hvd, task = self.w.hvd, self.w.task
        m = self.model
        if need_avg:
            flat = torch.nn.utils.parameters_to_vector(m.parameters()).detach().clone()
            hvd.allreduce_(flat, op=hvd.Average, name="bench.eval_avg")
            torch.nn.utils.vector_to_parameters(flat, self.eval_model.parameters())
            m = self.eval_model
        m.eval()
        sums = torch.tensor(task.eval_sums(m, self.w.rank, self.w.size), dtype=torch.float64)
        m.train()
        hvd.allreduce_(sums, op=hvd.Sum, name="bench.eval_sums")
        return float(task.metric_from_sums(sums.tolist()))


def _make_period(hl, spec: dict, steps: int):
    """The ``period`` argument of our wrappers for a method spec (same for both front ends)."""
    p = spec["period"]
    if p == "adaptive":
        return hl.Adaptive(initial_period=ADPSGD_INITIAL_PERIOD,
                           sampling_steps=max(1, int(ADPSGD_SAMPLING_FRACTION * steps)))
    if p == "never":
        return hl.Never()
    return int(p)


class _TorchWorker:
    framework = "torch"
    Run = _TorchRun

    def __init__(self, cfg: dict) -> None:
        import torch

        torch.set_num_threads(1)
        import horovod.torch as hvd

        import horovod_local as hl
        import horovod_local.torch as hlt
        from examples.tasks import make_task, n_params

        hvd.init()
        self.hvd, self.hl, self.hlt, self.n_params = hvd, hl, hlt, n_params
        self.rank, self.size, self.seed = hvd.rank(), hvd.size(), cfg["seed"]
        self.settings = TASK_SETTINGS[cfg["task"]]
        self.task = make_task(cfg["task"], **self.settings["task_kwargs"])
        self.backend = hlt.backend_info()
        self.baseline = "hvd.DistributedOptimizer (horovod.torch): gradient allreduce every step"

    def make_inner(self, spec: dict, params):
        import torch

        settings, lr = self.settings, self.settings["lr"]
        if spec.get("inner") == "adaalter":
            return self.hlt.LocalAdaAlter(params, lr=lr, eps=settings["adaalter_eps"],
                                          initial_accumulator_value=settings["adaalter_b0sq"],
                                          lr_warmup_steps=settings["lr_warmup_steps"]), False
        if settings["inner"] == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=settings["momentum"]), True
        if settings["inner"] == "adagrad":
            return torch.optim.Adagrad(params, lr=lr), True
        raise ValueError(settings["inner"])

    def barrier(self) -> None:
        import torch

        self.hvd.allreduce(torch.zeros(1), name="bench.barrier", op=self.hvd.Sum)

    def allreduce_max(self, x: float) -> float:
        import torch

        c = torch.tensor([x], dtype=torch.float64)
        self.hvd.allreduce_(c, op=self.hvd.Max, name="bench.comm_max")
        return float(c[0])


def worker_main(cfg_path: str) -> None:
    t_proc = time.perf_counter()
    import numpy as np

    sys.path.insert(0, str(ROOT))
    cfg = json.loads(Path(cfg_path).read_text())
    tname = cfg["task"]
    fw = TASK_SETTINGS[tname].get("framework", "torch")
    w = _KerasWorker(cfg) if fw == "keras" else _TorchWorker(cfg)
    rank, size, task, settings = w.rank, w.size, w.task, w.settings
    steps, eval_every = cfg["steps"], cfg["eval_every"]
    out = {"task": tname, "framework": w.framework, "baseline": w.baseline,
           "metric_name": task.metric_name, "metric_short": task.metric_short,
           "higher_is_better": task.higher_is_better, "task_config": task.config(),
           "settings": settings, "size": size, "steps": steps, "eval_every": eval_every,
           "backend": w.backend, "runs": [],
           # imports, hvd.init(), the task's data (not in any run's times)
           "worker_startup_s": time.perf_counter() - t_proc}

    def progress(label, step, metric, samples_per_s, eta_s, task_eta_s):
        if rank == 0:
            print(f"PROGRESS [{tname}] {label:<20s} step {step:>4d}/{steps}  "
                  f"{task.metric_short} {metric:8.4f}  {samples_per_s:7.1f} samples/s  "
                  f"ETA {eta_s:5.0f}s (task ~{task_eta_s:4.0f}s)", flush=True)

    def reached(metric, tgt):
        return metric >= tgt if task.higher_is_better else metric <= tgt

    labels = cfg["methods"]
    sec_per_step_est = None
    target = None  # the Horovod baseline's final metric, once it has run
    # Repeats (timing only): repeat 0 runs the methods in the given order (Horovod first: its
    # final metric is the time-to-target goal), later repeats alternate reversed / given order,
    # so that slow phases of other work on the machine do not always hit the same method.
    schedule = [(rep, lab) for rep in range(cfg.get("repeats", 1))
                for lab in (labels if rep % 2 == 0 else labels[::-1])]
    for mi, (rep, label) in enumerate(schedule):
        spec = METHODS[label]
        local = spec["kind"] == "local"
        t_setup = time.perf_counter()
        r = w.Run(w, spec, steps)  # model, optimizer (Keras: and the traced step functions)
        setup_s = time.perf_counter() - t_setup
        curve, period_curve, losses = [], [], []
        comm_s = 0.0  # Horovod only: time in its gradient allreduce
        metric0 = r.evaluate(need_avg=False)
        curve.append([0, 0.0, metric0])
        if spec.get("period") == "adaptive":
            period_curve.append([0, ADPSGD_INITIAL_PERIOD])
        # Time to target: methods after the baseline may go on past `steps` (constant lr) until
        # they reach the baseline's final metric, at most `extend` x steps more. Every number in
        # the table is taken at `steps` (equal steps); only the curve goes further.
        extendable = (rep == 0 and target is not None and local
                      and spec.get("period") != "never" and cfg["extend"] > 0)
        max_steps = steps + int(math.ceil(cfg["extend"] * steps)) if extendable else steps
        last_syncs = 0
        train_s = eval_s = cpu_s = 0.0
        main = None
        w.barrier()
        t_start = time.perf_counter()
        t_seg, c_seg = t_start, time.process_time()
        for step in range(1, max_steps + 1):
            loss, dt = r.train_step()
            comm_s += dt
            if step <= steps:
                losses.append(float(loss))
            if spec.get("period") == "adaptive" and r.sync_count() != last_syncs:
                st = r.sync_stats()
                last_syncs = st.syncs
                period_curve.append([step, float(st.period)])
            if step == steps and local and r.sync_stats().local_steps > 0:
                r.synchronize()  # every method ends averaged (no-comm: its one sync)
            if step % eval_every == 0 or step == steps or step == max_steps:
                w.barrier()  # the slower rank's time counts as training time
                now = time.perf_counter()
                train_s += now - t_seg
                cpu_s += time.process_time() - c_seg
                need_avg = local and r.sync_stats().local_steps > 0
                metric = r.evaluate(need_avg)
                curve.append([step, train_s, metric])
                if step == steps:
                    main = {"train_s": train_s, "cpu_s": cpu_s, "metric": metric,
                            "comm_s": comm_s, "stats": r.sync_stats() if local else None}
                sps = step * task.samples_per_step() * size / train_s
                if step <= steps:
                    eta = (steps - step) * train_s / step
                    if sec_per_step_est is None or mi == 0:
                        sec_per_step_est = train_s / step
                    task_eta = eta + sum(steps * sec_per_step_est * 0.8
                                         for _ in schedule[mi + 1:])
                    progress(label, step, metric, sps, eta, task_eta)
                elif rank == 0:
                    print(f"PROGRESS [{tname}] {label:<20s} step {step:>4d}/{steps}+ (going on "
                          f"to Horovod's {target:.4f}, at most {max_steps})  "
                          f"{task.metric_short} {metric:8.4f}", flush=True)
                t_seg, c_seg = time.perf_counter(), time.process_time()
                eval_s += t_seg - now
                if step >= steps and (step == max_steps or reached(metric, target)):
                    break
        total_s = time.perf_counter() - t_start
        train_s = main["train_s"]
        samples = steps * task.samples_per_step() * size
        run = {"method": label, "repeat": rep, "spec": spec, "n_params": r.n_params,
               "grad_bytes": r.grad_bytes, "steps": steps, "samples": samples,
               "steps_run": step, "final_metric": main["metric"], "initial_metric": metric0,
               "train_wall_s": train_s, "eval_wall_s": eval_s, "total_wall_s": total_s,
               "setup_wall_s": setup_s,
               "throughput_samples_s": samples / train_s,
               # CPU time of rank 0's process (all its threads) over the same training segments:
               # wall - cpu shows waiting (communication, the other rank, or other work on the
               # machine taking the cores).
               "cpu_s_rank0": main["cpu_s"],
               "final_train_loss": float(np.mean(losses[-max(1, eval_every):])),
               "curve": curve, "period_curve": period_curve,
               # 1-min load average at the end: our 2 ranks alone make ~2; more = other work
               # on the machine competed for the cores during this run.
               "loadavg_1min_end": os.getloadavg()[0]}
        if spec["kind"] == "horovod":
            # Not counted by a library: gradient bytes x steps, what the allreduces carried.
            run.update(syncs=steps, bytes_sent=r.grad_bytes * steps,
                       bytes_per_step_allreduce=r.grad_bytes * steps, comm_s=main["comm_s"],
                       sync_stats=None)
            if rep == 0:
                target = main["metric"]
        else:
            st = main["stats"]
            run.update(syncs=st.syncs, bytes_sent=st.bytes_sent,
                       bytes_per_step_allreduce=st.bytes_per_step_allreduce,
                       comm_s=st.sync_seconds, sync_stats=st.as_dict())
        # The other ranks' view of communication time (rank 0 reports the max too).
        run["comm_s_max_over_ranks"] = w.allreduce_max(run["comm_s"])
        run["comm_fraction"] = run["comm_s"] / train_s
        out["runs"].append(run)
        if rank == 0:
            tag = f" (repeat {rep})" if rep else ""
            print(f"DONE [{tname}] {label}{tag}: {task.metric_short} {run['final_metric']:.4f}  "
                  f"train {train_s:.1f}s  {run['throughput_samples_s']:.1f} samples/s  "
                  f"syncs {run['syncs']}  MB {run['bytes_sent'] / 1e6:.1f}  "
                  f"comm {run['comm_s']:.1f}s"
                  + (f"  (went on to step {run['steps_run']} for the time to target)"
                     if run["steps_run"] > steps else ""), flush=True)
            tmp = Path(cfg["result_path"] + ".tmp")
            tmp.write_text(json.dumps(out, indent=1))
            tmp.replace(cfg["result_path"])
        del r
    w.barrier()


# ---- Keras 3 (TensorFlow) -----------------------------------------------------------------------
# The baseline is a per-step allreduce of every gradient with horovod.tensorflow.allreduce
# (op=Average) in a custom train step: what hvd.DistributedGradientTape does. Horovod's own Keras
# integration cannot be used on Keras 3 (Horovod 0.28.1, TF 2.21 / Keras 3.15):
# horovod.tensorflow.keras.DistributedOptimizer wraps a Keras 3 optimizer without error but never
# allreduces (Keras 3's apply_gradients bypasses the methods it overrides: the ranks silently
# train apart), and hvd.DistributedGradientTape fails on Keras 3 variables ('Variable' object
# has no attribute 'ref').
KERAS_BASELINE = ("per-step gradient allreduce: horovod.tensorflow.allreduce(op=Average) of every "
                  "gradient in a custom train step (horovod.tensorflow.keras.DistributedOptimizer "
                  "does not allreduce on Keras 3, hvd.DistributedGradientTape fails on Keras 3 "
                  "variables)")


class _KerasRun:
    """One method of a Keras task: the per-step gradient allreduce baseline or our
    ``horovod_local.tensorflow.keras.DistributedLocalOptimizer``, in a custom loop of
    ``tf.function`` steps (``optimizer.apply_gradients`` inside; the sync is in that graph)."""

    def __init__(self, w: _KerasWorker, spec: dict, steps: int) -> None:
        tf, keras, hvd, hlk = w.tf, w.keras, w.hvd, w.hlk
        settings = w.settings
        self.w, self.spec = w, spec
        self.model = w.build_model()
        tvars = self.model.trainable_variables
        hlk.broadcast_variables(tvars, root_rank=0)  # as the torch runs (identical already)
        self.grad_bytes = sum(int(v.numpy().nbytes) for v in tvars)
        self.n_params = sum(int(math.prod(v.shape)) for v in tvars)
        if settings["lr_warmup_steps"] or settings["inner"] != "sgd":
            raise ValueError("the Keras task supports the SGD(+momentum) inner optimizer only")
        inner = keras.optimizers.SGD(learning_rate=settings["lr"], momentum=settings["momentum"])
        if spec["kind"] == "horovod":
            self.opt = inner
        else:
            kw = dict(SLOWMO, algorithm="slowmo") if spec.get("algorithm") == "slowmo" else {}
            self.opt = hlk.DistributedLocalOptimizer(
                inner, period=_make_period(hlk, spec, steps), **kw)
        self.opt.build(tvars)
        model, opt = self.model, self.opt
        loss_obj = keras.losses.SparseCategoricalCrossentropy(from_logits=True)  # batch mean

        @tf.function(jit_compile=False)  # Horovod ops have no XLA kernels
        def grads_fn(x, y):
            with tf.GradientTape() as tape:
                loss = loss_obj(y, model(x, training=True))
            return loss, tape.gradient(loss, tvars)

        @tf.function(jit_compile=False)
        def allreduce_fn(grads):
            return [hvd.allreduce(g, op=hvd.Average, name=f"bench.grad.{i}")
                    for i, g in enumerate(grads)]

        @tf.function(jit_compile=False)
        def apply_fn(grads):
            opt.apply_gradients(zip(grads, tvars))

        # Trace before the timed region (tracing takes seconds; it must not count as training
        # time): get_concrete_function traces without running a step.
        b = w.task.batch
        grads_fn.get_concrete_function(tf.TensorSpec([b, w.x_dim], tf.float32),
                                       tf.TensorSpec([b], tf.int64))
        gspecs = [tf.TensorSpec(v.shape, v.dtype) for v in tvars]
        apply_fn.get_concrete_function(gspecs)
        self.sync_fn = None
        if spec["kind"] == "horovod":
            allreduce_fn.get_concrete_function(gspecs)
        else:
            self.sync_fn = tf.function(opt.synchronize, jit_compile=False)
            self.sync_fn.get_concrete_function()
        self.grads_fn, self.allreduce_fn, self.apply_fn = grads_fn, allreduce_fn, apply_fn
        self._warm_up(spec)
        self.batches = w.task.train_batches(w.rank, w.size, seed=w.seed)  # the torch task's

    def _warm_up(self, spec: dict) -> None:
        """Real steps through every path (a sync included), then every model and optimizer
        variable restored: the timed run starts from scratch. TF instantiates a traced function
        at its first call and Horovod negotiates a new tensor name at its first allreduce:
        0.1-1.5 s here, once per process in a real job, but a large part of a short run."""
        p = spec.get("period")
        n = 2 if spec["kind"] == "horovod" else (
            ADPSGD_INITIAL_PERIOD if p == "adaptive" else 1 if p == "never" else int(p))
        variables = list({id(v): v for v in [*self.model.variables,
                                             *self.opt.variables]}.values())
        saved = [v.numpy() for v in variables]
        self.batches = self.w.task.train_batches(self.w.rank, self.w.size, seed=self.w.seed + 1)
        for _ in range(n):
            self.train_step()
        if self.sync_fn is not None:
            self.sync_fn()
        for v, x in zip(variables, saved):
            v.assign(x)
        if spec["kind"] == "local":
            st = self.opt.sync_stats()
            assert st.steps == st.syncs == st.bytes_sent == 0, st  # nothing left of the warm-up

    def train_step(self):
        """One step; returns (loss tensor, seconds in the baseline's gradient allreduce)."""
        tf = self.w.tf
        x, y = next(self.batches)
        loss, grads = self.grads_fn(tf.constant(x.numpy()), tf.constant(y.numpy()))
        comm = 0.0
        if self.spec["kind"] == "horovod":
            t0 = time.perf_counter()
            grads = self.allreduce_fn(grads)  # returns once the allreduce is done (CPU)
            comm = time.perf_counter() - t0
        self.apply_fn(grads)
        return loss, comm

    def sync_stats(self):
        return self.opt.sync_stats()

    def sync_count(self) -> int:
        # Read per step (ADPSGD's period curve) inside the timed region: one counter variable
        # (~0.05 ms) instead of sync_stats()'s nine (~0.5 ms, 5% of an ADPSGD step here).
        return int(self.opt._hl_syncs.numpy())

    def synchronize(self) -> None:
        self.sync_fn()  # opt.synchronize(), traced in __init__

    def evaluate(self, need_avg: bool) -> float:
        """Held-out metric of the ranks' average model; each rank scores half the set."""
        w = self.w
        tf, hvd = w.tf, w.hvd
        tvars = self.model.trainable_variables
        vals = [tf.convert_to_tensor(v) for v in tvars]
        if need_avg:
            flat = tf.concat([tf.reshape(v, [-1]) for v in vals], 0)
            flat = hvd.allreduce(flat, op=hvd.Average, name="bench.eval_avg")
            sizes = [int(math.prod(v.shape)) for v in tvars]
            vals = [tf.reshape(p, v.shape) for p, v in zip(tf.split(flat, sizes), tvars)]
        for ev, v in zip(w.eval_model.trainable_variables, vals):
            ev.assign(v)
        x, y = w.x_eval[w.rank::w.size], w.y_eval[w.rank::w.size]
        pred = w.eval_model(x, training=False).numpy().argmax(axis=1)
        sums = tf.constant([float((pred == y).sum()), float(len(y))], tf.float64)
        sums = hvd.allreduce(sums, op=hvd.Sum, name="bench.eval_sums")
        return float(w.task.metric_from_sums(sums.numpy().tolist()))


class _KerasWorker:
    """The digits task (``examples.tasks.Digits``: its data split, standardisation, per-rank
    batches and torch initial weights, copied into the same Keras MLP) trained with Keras 3."""

    framework = "keras"
    Run = _KerasRun

    def __init__(self, cfg: dict) -> None:
        import tensorflow as tf

        # CPU only and 1 compute thread per rank, as the torch runs.
        tf.config.set_visible_devices([], "GPU")
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        import horovod.tensorflow as hvd
        import keras
        import torch  # the task's data and initial weights come from the torch task

        import horovod_local
        from examples.tasks import make_task
        from horovod_local.tensorflow import keras as hlk

        torch.set_num_threads(1)

        hvd.init()
        self.tf, self.keras, self.hvd, self.hlk = tf, keras, hvd, hlk
        self.rank, self.size, self.seed = hvd.rank(), hvd.size(), cfg["seed"]
        self.settings = settings = TASK_SETTINGS[cfg["task"]]
        self.task = task = make_task(settings["base_task"], **settings["task_kwargs"])
        self.x_dim = int(task.Xtr.shape[1])
        self.x_eval, self.y_eval = task.Xte.numpy(), task.yte.numpy()
        self.backend = (f"keras {keras.__version__}, tensorflow {tf.__version__}: in-graph fused "
                        f"sync (tf.concat + one horovod.tensorflow allreduce per dtype), "
                        f"horovod_local {horovod_local.__version__}")
        self.baseline = KERAS_BASELINE
        self.eval_model = self.build_model()  # holds the averaged weights for evaluation

    def build_model(self):
        """The task's MLP in Keras, with the torch model's initial weights (same seed): every
        method, in both frameworks, starts from the same point."""
        keras = self.keras
        tmodel = self.task.build_model(seed=self.seed)
        linears = [m for m in tmodel if hasattr(m, "weight")]
        layers = [keras.Input((self.x_dim,))]
        for i, lin in enumerate(linears):
            last = i == len(linears) - 1
            layers.append(keras.layers.Dense(lin.out_features,
                                             activation=None if last else "relu"))
        model = keras.Sequential(layers)
        for dense, lin in zip(model.layers, linears):
            # torch Linear keeps (out, in); a Keras Dense kernel is (in, out)
            dense.set_weights([lin.weight.detach().numpy().T, lin.bias.detach().numpy()])
        return model

    def barrier(self) -> None:
        self.hvd.allreduce(self.tf.zeros([1]), name="bench.barrier", op=self.hvd.Sum)

    def allreduce_max(self, x: float) -> float:
        c = self.hvd.allreduce(self.tf.constant([x], self.tf.float64), op=self.hvd.Max,
                               name="bench.comm_max")
        return float(c.numpy()[0])


# ================================================================================================
# Driver: bandwidth cap, launching, aggregation, table, plots
# ================================================================================================
def _run(cmd, check=False):
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def parse_rate(rate: str):
    """'1gbit' -> (tc string, bits/s); 'none' -> (None, None)."""
    if rate in (None, "", "none", "off"):
        return None, None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)bit", rate.strip().lower())
    if not m:
        raise SystemExit(f"--rate: expected e.g. 1gbit, 500mbit, 10gbit or none; got {rate!r}")
    bits = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    return rate.strip().lower(), bits


class BandwidthCap:
    """Puts ``tbf rate R burst B latency 50ms`` on a loopback and always takes it off again.

    Preferred: the ``lo`` of a private network namespace made for this run (the ranks run in it,
    nothing else on the machine is throttled). Fallback: the host's ``lo`` (only if its root
    qdisc is the default one: someone else's qdisc is left alone). Otherwise: uncapped."""

    def __init__(self, rate: str | None, rate_bits: float | None, isolation: str):
        self.rate, self.rate_bits, self.isolation = rate, rate_bits, isolation
        self.netns: str | None = None
        self.host_qdisc_ours = False
        self.status = {"requested_rate": rate or "none", "applied": False, "where": None,
                       "command": None, "message": ""}

    # -- helpers --
    def _tc_cmd(self) -> list[str]:
        # tbf's burst must cover rate/HZ; 256kb per Gbit (the documented 1gbit setting).
        burst_kb = max(256, int(round(256 * self.rate_bits / 1e9)))
        return ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", self.rate,
                "burst", f"{burst_kb}kb", "latency", "50ms"]

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    @staticmethod
    def _stale_netns_cleanup():
        r = _run(["ip", "netns", "list"])
        for line in r.stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            m = re.fullmatch(r"hl-bench-(\d+)", name)
            if m and not Path(f"/proc/{m.group(1)}").exists():
                _run(["ip", "netns", "del", name])

    def apply(self) -> dict:
        if self.rate is None:
            self.status["message"] = "uncapped (--rate none)"
            return self.status
        problems = []
        if os.geteuid() != 0:
            problems.append("not root")
        if not shutil.which("tc"):
            problems.append("`tc` not found (Debian: apt-get install iproute2)")
        if problems:
            return self._uncapped("; ".join(problems))
        if self.isolation in ("auto", "netns") and shutil.which("ip"):
            self._stale_netns_cleanup()
            name = f"hl-bench-{os.getpid()}"
            r = _run(["ip", "netns", "add", name])
            if r.returncode == 0:
                self.netns = name
                steps = [["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                         ["ip", "netns", "exec", name, *self._tc_cmd()]]
                err = None
                for c in steps:
                    r = _run(c)
                    if r.returncode != 0:
                        err = f"{' '.join(c)}: {r.stderr.strip()}"
                        break
                if err is None:
                    self.status.update(applied=True, where=f"lo of network namespace {name}",
                                       command=" ".join(self._tc_cmd()),
                                       message=f"capped at {self.rate} on the lo of a private "
                                               f"network namespace ({name})")
                    return self.status
                self.remove()
                problems.append(f"network namespace: {err}")
            else:
                problems.append(f"ip netns add failed: {r.stderr.strip()}")
            if self.isolation == "netns":
                return self._uncapped("; ".join(problems))
        # Host lo.
        cur = _run(["tc", "qdisc", "show", "dev", "lo"]).stdout.strip()
        root_lines = [ln for ln in cur.splitlines() if " root " in ln]
        if any(not ln.startswith("qdisc noqueue") for ln in root_lines):
            return self._uncapped("; ".join(problems + [
                f"a qdisc is already on the host's lo ({root_lines[0]}); it is someone else's "
                f"and is left alone (the runs see whatever it imposes)"]))
        r = _run(self._tc_cmd())
        if r.returncode != 0:
            return self._uncapped("; ".join(problems + [f"tc failed: {r.stderr.strip()}"]))
        self.host_qdisc_ours = True
        self.status.update(applied=True, where="host lo", command=" ".join(self._tc_cmd()),
                           message=f"capped at {self.rate} on the host's lo (all loopback "
                                   f"traffic on this machine is throttled while it runs)"
                                   + (f"; {'; '.join(problems)}" if problems else ""))
        return self.status

    def _uncapped(self, why: str) -> dict:
        self.status.update(applied=False, message=f"NOT capped ({why}); running uncapped")
        print(f"[compare] WARNING: bandwidth cap {self.rate} NOT applied: {why}. "
              f"Running uncapped; results.json records this.", flush=True)
        return self.status

    def remove(self) -> None:
        if self.netns:
            name, self.netns = self.netns, None
            _run(["ip", "netns", "exec", name, "tc", "qdisc", "del", "dev", "lo", "root"])
            _run(["ip", "netns", "del", name])
        if self.host_qdisc_ours:
            self.host_qdisc_ours = False
            cur = _run(["tc", "qdisc", "show", "dev", "lo"]).stdout
            if "tbf" in cur:
                r = _run(["tc", "qdisc", "del", "dev", "lo", "root"])
                if r.returncode != 0:
                    print(f"[compare] WARNING: could not remove the qdisc on lo: {r.stderr}. "
                          f"Remove it with: tc qdisc del dev lo root", flush=True)


def machine_info() -> dict:
    info = {"hostname": platform.node(), "platform": platform.platform(),
            "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        for line in _run(["lscpu"]).stdout.splitlines():
            if line.startswith("Model name:"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
    except Exception:
        pass
    try:
        import torch
        info["torch"] = torch.__version__
        import horovod
        info["horovod"] = horovod.__version__
        sys.path.insert(0, str(ROOT))
        import horovod_local
        import horovod_local.torch as hlt
        info["horovod_local"] = horovod_local.__version__
        info["horovod_local_backend"] = hlt.backend_info()
    except Exception as e:  # pragma: no cover
        info["import_error"] = repr(e)
    from importlib import metadata

    for dist in ("tensorflow", "keras"):  # versions only: importing TF here would cost ~5 s
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    info["loadavg_start"] = list(os.getloadavg())
    return info


def horovodrun_exe() -> str:
    exe = Path(sys.executable).with_name("horovodrun")
    return str(exe) if exe.exists() else (shutil.which("horovodrun") or "horovodrun")


_CHILD: list = []


def launch_task(task: str, tcfg: dict, args, cap: BandwidthCap, out: Path) -> dict | None:
    run_dir = out / "logs"
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path = run_dir / f"{task}.result.json"
    if result_path.exists():
        result_path.unlink()
    cfg = {"task": task, "steps": tcfg["steps"], "eval_every": tcfg["eval_every"],
           "methods": tcfg["methods"], "seed": args.seed, "result_path": str(result_path),
           "extend": tcfg.get("extend", 0.0) if args.extend is None else args.extend,
           "repeats": args.repeats}
    cfg_path = run_dir / f"{task}.config.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    cmd = [*cap.prefix(), horovodrun_exe(), "-np", str(args.np), "-H", f"localhost:{args.np}",
           "--gloo", "--network-interfaces", "lo",
           sys.executable, str(Path(__file__).resolve()), "--worker", str(cfg_path)]
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONUNBUFFERED="1", HOROVOD_GLOO_IFACE="lo",
               PYTHONPATH=os.pathsep.join(x for x in [str(ROOT), env.get("PYTHONPATH")] if x))
    log_path = run_dir / f"{task}.log"
    print(f"[compare] {task}: {len(tcfg['methods'])} methods x {tcfg['steps']} steps on "
          f"{args.np} ranks; log: {log_path}", flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, bufsize=1,
                                start_new_session=True, cwd=str(ROOT))
        _CHILD.append(proc)
        try:
            for line in proc.stdout:
                log.write(line)
                m = re.search(r"(PROGRESS|DONE) (.*)$", line)
                if m:
                    print(("  " if m.group(1) == "PROGRESS" else "  => ") + m.group(2),
                          flush=True)
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc = -9
        finally:
            _CHILD.remove(proc)
    wall = time.time() - t0
    if rc != 0:
        tail = log_path.read_text().splitlines()[-25:]
        print(f"[compare] {task}: horovodrun exited with {rc}; last lines of {log_path}:\n  "
              + "\n  ".join(tail), flush=True)
    if not result_path.exists():
        return None
    res = json.loads(result_path.read_text())
    res["launcher_wall_s"] = wall
    res["returncode"] = rc
    res["complete"] = rc == 0 and len(res["runs"]) == len(tcfg["methods"]) * args.repeats
    merge_repeats(res)
    return res


def merge_repeats(res: dict) -> None:
    """One entry per method: repeat 0's run (curves, metrics, bytes); with repeats, its timing
    fields become the median over the repeats and every repeat's timing is kept."""
    import statistics

    by = {}
    for r in res["runs"]:
        by.setdefault(r["method"], []).append(r)
    merged = []
    for label, rs in by.items():
        rs.sort(key=lambda r: r.get("repeat", 0))
        first = dict(rs[0])
        if len(rs) > 1:
            first["repeats"] = [{k: r[k] for k in ("repeat", "train_wall_s",
                                                  "throughput_samples_s", "comm_s",
                                                  "cpu_s_rank0", "loadavg_1min_end",
                                                  "final_metric")} for r in rs]
            first["rep0_train_wall_s"] = first["train_wall_s"]
            for k in ("train_wall_s", "comm_s", "cpu_s_rank0", "loadavg_1min_end"):
                first[k] = statistics.median(r[k] for r in rs)
            first["throughput_samples_s"] = first["samples"] / first["train_wall_s"]
            first["comm_fraction"] = first["comm_s"] / first["train_wall_s"]
        merged.append(first)
    res["runs"] = merged
    res["repeats"] = max((len(v) for v in by.values()), default=1)


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---- derived numbers, table, plots ----------------------------------------------------------
def time_to_target(curve, target, higher):
    """First (wall s, step) at which the curve reaches ``target``, else None."""
    for step, wall, metric in curve:
        if (metric >= target) if higher else (metric <= target):
            return wall, step
    return None


def curve_at(curve, wall):
    """The metric of ``curve`` at training time ``wall`` (linear between evaluations; the final
    value after its end)."""
    for (s0, w0, m0), (s1, w1, m1) in zip(curve, curve[1:]):
        if w0 <= wall <= w1:
            return m0 + (m1 - m0) * ((wall - w0) / (w1 - w0) if w1 > w0 else 1.0)
    return curve[-1][2] if wall > curve[-1][1] else curve[0][2]


def derive(task_res: dict) -> None:
    runs = task_res["runs"]
    hv = next((r for r in runs if r["spec"]["kind"] == "horovod"), None)
    higher = task_res["higher_is_better"]
    for r in runs:
        r["speedup_vs_horovod"] = (r["throughput_samples_s"] / hv["throughput_samples_s"]
                                   if hv else None)
        r["bytes_ratio_vs_horovod"] = r["bytes_sent"] / hv["bytes_sent"] if hv else None
        if hv:
            tt = time_to_target(r["curve"], hv["final_metric"], higher)
            r["target_metric"] = hv["final_metric"]
            r["time_to_target_s"] = tt[0] if tt else None
            r["step_to_target"] = tt[1] if tt else None
            # Equal-time comparison: where Horovod's own curve was after this method's wall time.
            r["horovod_metric_at_same_time"] = curve_at(
                hv["curve"], r.get("rep0_train_wall_s", r["train_wall_s"]))
    if hv and hv.get("time_to_target_s"):
        for r in runs:
            r["time_to_target_speedup"] = (hv["time_to_target_s"] / r["time_to_target_s"]
                                           if r.get("time_to_target_s") else None)


def fmt_metric(v, short):
    return f"{v:.4f}" if short == "acc" else f"{v:.3f}"


def table_md(task_res: dict) -> str:
    short = task_res["metric_short"]
    lines = [f"| method | final {short} | wall s | samples/s | speedup vs Horovod | syncs | "
             f"MB sent | comm s | comm % | time to Horovod's final {short} (s) | "
             f"Horovod's {short} at this wall time | load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in task_res["runs"]:
        sp = r.get("speedup_vs_horovod")
        tt = r.get("time_to_target_s")
        tts = r.get("time_to_target_speedup")
        hm = r.get("horovod_metric_at_same_time")
        ext = r.get("steps_run", r["steps"]) > r["steps"]
        if "target_metric" not in r:
            tt_s = "n/a (no Horovod run)"
        elif tt is None:
            tt_s = "not reached" + (f" in {r['steps_run']} steps" if ext else "")
        else:
            extra = [f"{tts:.2f}x"] if tts else []
            if r.get("step_to_target", 0) > r["steps"]:
                extra.append(f"step {r['step_to_target']}")
            tt_s = f"{tt:.1f}" + (f" ({', '.join(extra)})" if extra else "")
        lines.append(
            f"| {r['method']} | {fmt_metric(r['final_metric'], short)} | "
            f"{r['train_wall_s']:.1f} | {r['throughput_samples_s']:.0f} | "
            f"{'' if sp is None else f'{sp:.2f}x'} | {r['syncs']} | "
            f"{r['bytes_sent'] / 1e6:.1f} | {r['comm_s']:.1f} | "
            f"{100 * r['comm_fraction']:.0f}% | {tt_s} | "
            f"{'' if hm is None else fmt_metric(hm, short)} | "
            f"{r.get('loadavg_1min_end', float('nan')):.1f} |")
    return "\n".join(lines)


def write_markdown(results: dict, path: Path) -> str:
    cap = results["bandwidth_cap"]
    parts = [f"# horovod-local vs Horovod: {results['mode']} run",
             "",
             f"- date: {results['date']}",
             f"- command: `{results['command']}`",
             f"- bandwidth: {cap['message']}",
             f"- machine: {results['machine'].get('cpu_model', '?')}, "
             f"{results['machine'].get('cpus')} CPUs; torch {results['machine'].get('torch')}, "
             f"tensorflow {results['machine'].get('tensorflow')}, keras "
             f"{results['machine'].get('keras')}, "
             f"horovod {results['machine'].get('horovod')}; horovod-local backend (torch): "
             f"{results['machine'].get('horovod_local_backend')}",
             f"- load average at start / end: {results['machine'].get('loadavg_start')} / "
             f"{results['machine'].get('loadavg_end')}",
             ""]
    for t in results["tasks"]:
        tc = t["task_config"]
        nparams = t["runs"][0]["n_params"] if t["runs"] else "?"
        fw = t.get("framework", "torch")
        parts += [f"## {t['task']}: {t['metric_name']} ({t['size']} ranks, {t['steps']} steps, "
                  f"batch {tc.get('batch_per_rank')}/rank, {nparams} parameters"
                  + (", Keras 3" if fw == "keras" else "") + ")", ""]
        if fw == "keras":
            parts += [f"Keras 3 custom loop (`tf.function` steps); ours: "
                      f"`horovod_local.tensorflow.keras.DistributedLocalOptimizer`; \"Horovod\" "
                      f"here: {t.get('baseline')}. Same data, batches, initial weights and "
                      f"hyper-parameters as the torch `digits` task.", ""]
        if t.get("repeats", 1) > 1:
            parts += [f"Timing columns (wall s, samples/s, speedup, comm s, comm %, load) are the "
                      f"median of {t['repeats']} repeats run in alternating order; metrics, "
                      f"curves and the time-to-target columns come from the first repeat.", ""]
        if not t.get("complete", True):
            parts += ["**Incomplete: the launch failed part-way; see logs/.**", ""]
        parts += [table_md(t), ""]
    parts += [" ".join([
        "wall s = training time on rank 0 between a start barrier and the end (evaluation",
        "excluded; the final sync included); samples/s = samples over both ranks / wall s;",
        "MB sent = payload bytes this rank handed to allreduce (Horovod: gradient bytes x",
        "steps); comm s = time in sync rounds (Horovod: inside optimizer.synchronize(); Keras",
        "task: inside the gradient allreduce), which",
        "includes waiting for the slower rank; time to target = training time until the first",
        "evaluation at or better than Horovod's final metric (x: Horovod's time / this; local",
        "methods may go on past the equal-step budget for this column only, up to the step",
        "shown); Horovod's metric at this wall time = Horovod's curve read at this method's",
        "wall s (equal-time comparison); load = 1-min load average at the end of the run (the",
        "2 ranks alone make about 2; more means other work on the machine competed for its",
        "cores)."]), ""]
    text = "\n".join(parts)
    path.write_text(text)
    return text


def make_plots(results: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.ticker  # noqa: F401
    import matplotlib.pyplot as plt

    files = []
    rate = results["bandwidth_cap"]["requested_rate"] if results["bandwidth_cap"]["applied"] \
        else "uncapped"
    styles = {}

    def style(label):
        if label not in styles:
            if label == "Horovod":
                styles[label] = dict(color="black", lw=2.2, ls="-")
            elif label.startswith("no-comm"):
                styles[label] = dict(color="grey", lw=1.6, ls=":")
            else:
                cmap = plt.get_cmap("tab10")
                styles[label] = dict(color=cmap(len(styles) % 10), lw=1.5,
                                     ls="--" if "AdaAlter" in label else "-")
        return styles[label]

    for t in results["tasks"]:
        fig, axes = plt.subplots(1, 2, figsize=(13.5, 4.6))
        for r in t["runs"]:
            c = r["curve"]
            axes[0].plot([x[1] for x in c], [x[2] for x in c], marker="o", ms=3,
                         label=r["method"], **style(r["method"]))
            axes[1].plot([x[0] for x in c], [x[2] for x in c], marker="o", ms=3,
                         label=r["method"], **style(r["method"]))
        axes[1].axvline(t["steps"], color="grey", lw=0.8, ls="--")
        axes[1].annotate("equal-step budget (table) \nextra steps: time to target ",
                         (t["steps"], 0.6 if t["higher_is_better"] else 0.42),
                         xycoords=("data", "axes fraction"), fontsize=7,
                         va="bottom", ha="right", color="grey")
        axes[0].set_xlabel("training wall time (s, evaluation excluded)")
        axes[1].set_xlabel("step (per rank)")
        for ax in axes:
            ax.set_ylabel(t["metric_name"])
            ax.grid(alpha=0.3)
            if not t["higher_is_better"]:
                vals = [x[2] for r in t["runs"] for x in r["curve"][1:]]
                if vals:
                    lo_, hi_ = min(vals), max(vals)
                    ax.set_ylim(lo_ - 0.05 * (hi_ - lo_), min(hi_, lo_ * 3) * 1.02)
            else:
                vals = [x[2] for r in t["runs"] for x in r["curve"][1:]]
                if vals:
                    ax.set_ylim(max(0.0, min(vals) - 0.02), min(1.0, max(vals) + 0.01))
        axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
        fig.suptitle(f"{t['task']}: {t['metric_name']} of the averaged model, {t['size']} ranks, "
                     f"loopback {rate}")
        fig.tight_layout()
        f = out / f"{t['task']}_metric.png"
        fig.savefig(f, dpi=90)
        plt.close(fig)
        files.append(f.name)

    # Throughput vs H (local SGD), with Horovod and no-comm as references.
    ncol = max(1, len(results["tasks"]))
    fig, axes = plt.subplots(1, ncol, figsize=(6 * ncol, 4.2), squeeze=False)
    for ax, t in zip(axes[0], results["tasks"]):
        hs, tp = [], []
        ada_h, ada_tp = [], []
        for r in t["runs"]:
            p = r["spec"].get("period")
            if r["spec"]["kind"] == "local" and isinstance(p, int):
                if r["spec"].get("inner") == "adaalter":
                    ada_h.append(p); ada_tp.append(r["throughput_samples_s"])
                elif r["spec"].get("algorithm") != "slowmo":
                    hs.append(p); tp.append(r["throughput_samples_s"])
        if hs:
            o = sorted(range(len(hs)), key=lambda i: hs[i])
            ax.plot([hs[i] for i in o], [tp[i] for i in o], "o-", label="local SGD (period H)")
        if ada_h:
            o = sorted(range(len(ada_h)), key=lambda i: ada_h[i])
            ax.plot([ada_h[i] for i in o], [ada_tp[i] for i in o], "s--",
                    label="Local AdaAlter (period H)")
        for r in t["runs"]:
            if r["spec"]["kind"] == "horovod":
                ax.axhline(r["throughput_samples_s"], color="black", lw=1.5,
                           label="Horovod (allreduce every step)")
            elif r["spec"].get("period") == "never":
                ax.axhline(r["throughput_samples_s"], color="grey", ls=":", lw=1.5,
                           label="no communication (H=inf)")
            elif r["spec"].get("period") == "adaptive":
                ax.axhline(r["throughput_samples_s"], color="tab:green", ls="-.", lw=1.2,
                           label="ADPSGD (adaptive H)")
            elif r["spec"].get("algorithm") == "slowmo":
                ax.plot([r["spec"]["period"]], [r["throughput_samples_s"]], "^", color="tab:red",
                        label="SlowMo")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8, 16])
        ax.set_xticklabels(["1", "2", "4", "8", "16"])
        ax.set_xlim(0.8, 20)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("averaging period H (local steps per sync)")
        ax.set_ylabel("throughput (samples/s, both ranks)")
        ax.set_title(f"{t['task']} (loopback {rate})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    f = out / "throughput_vs_H.png"
    fig.savefig(f, dpi=90)
    plt.close(fig)
    files.append(f.name)

    # ADPSGD period over steps.
    ad = [(t, r) for t in results["tasks"] for r in t["runs"] if r["period_curve"]]
    if ad:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for t, r in ad:
            pc = r["period_curve"] + [[r["steps"], r["period_curve"][-1][1]]]
            ax.step([x[0] for x in pc], [x[1] for x in pc], where="post", label=t["task"])
            ks = max(1, int(ADPSGD_SAMPLING_FRACTION * r["steps"]))
            ax.axvline(ks, ls=":", lw=1, color=ax.lines[-1].get_color())
        ax.set_xlabel("step (per rank); dotted: end of the sampling phase K_s")
        ax.set_ylabel("ADPSGD period H (local steps per sync)")
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title("ADPSGD: period over training")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        f = out / "adpsgd_period.png"
        fig.savefig(f, dpi=90)
        plt.close(fig)
        files.append(f.name)
    return files


def summary_lines(results: dict) -> list[str]:
    rate = results["bandwidth_cap"]["requested_rate"] if results["bandwidth_cap"]["applied"] \
        else "uncapped"
    out = []
    for t in results["tasks"]:
        runs = {r["method"]: r for r in t["runs"]}
        hv = runs.get("Horovod")
        if not hv:
            continue
        for label in ("local SGD H=8", "Local AdaAlter H=4", "local SGD H=4"):
            r = runs.get(label)
            if r:
                short = t["metric_short"]
                tt = r.get("time_to_target_s")
                reach = (f"reaches Horovod's final {short} after {tt:.1f}s vs Horovod's "
                         f"{hv['time_to_target_s']:.1f}s" if tt is not None else
                         f"does not reach Horovod's final {short} in {r['steps']} steps")
                out.append(f"[{t['task']}] {label}: {r['speedup_vs_horovod']:.2f}x Horovod's "
                           f"throughput at {rate}, {t['metric_name']} "
                           f"{fmt_metric(r['final_metric'], short)} vs "
                           f"{fmt_metric(hv['final_metric'], short)}, "
                           f"{100 * r['bytes_ratio_vs_horovod']:.1f}% of its bytes; {reach}")
                break
    return out


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

    def cleanup(*_):
        for p in list(_CHILD):
            _kill(p)
        cap.remove()

    atexit.register(cleanup)

    def on_signal(signum, frame):
        print(f"\n[compare] signal {signum}: stopping the runs and removing the bandwidth cap",
              flush=True)
        cleanup()
        sys.exit(128 + signum)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

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
            import traceback
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)  # never leave the other rank waiting in a collective
        return 0
    return driver_main(args)


if __name__ == "__main__":
    sys.exit(main())
