"""The per-rank training loop, run under horovodrun (``compare.py --worker CONFIG``): one loop for
every framework (the same timing, evaluation, time-to-target and record-keeping rules for the
torch and Keras tasks); a per-framework "run" object (``torch_worker``, ``keras_worker``) builds
the model and optimizer of one method and does its steps, syncs and evaluations."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from .config import ADPSGD_INITIAL_PERIOD, METHODS, ROOT, TASK_SETTINGS


def worker_main(cfg_path: str) -> None:
    """Trains the methods of the task in ``cfg_path`` in turn; rank 0 rewrites the task's result
    file (``result_path``) after every run."""
    t_proc = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    cfg = json.loads(Path(cfg_path).read_text())
    tname = cfg["task"]
    # Imported here, not at the top: a torch task's ranks must not import TensorFlow (~5 s).
    if TASK_SETTINGS[tname].get("framework", "torch") == "keras":
        from .keras_worker import KerasWorker as Worker
    else:
        from .torch_worker import TorchWorker as Worker
    w = Worker(cfg)
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
            # overlap: a round may be in flight and the replicas differ even right after a
            # boundary (x = avg(sent) + local progress): always end with average_parameters(),
            # which completes the round in flight, then makes the replicas identical.
            overlap = bool(spec.get("overlap"))
            if step == steps and local and (overlap or r.sync_stats().local_steps > 0):
                r.synchronize()  # every method ends averaged (no-comm: its one sync)
            if step % eval_every == 0 or step == steps or step == max_steps:
                w.barrier()  # the slower rank's time counts as training time
                now = time.perf_counter()
                train_s += now - t_seg
                cpu_s += time.process_time() - c_seg
                need_avg = local and (overlap or r.sync_stats().local_steps > 0)
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
        if getattr(r, "allreduce_ops", None):
            run["allreduce_ops"] = r.allreduce_ops  # Horovod's timeline: which allreduce ran
        if spec["kind"] == "horovod" and spec.get("env"):
            run["env"] = spec["env"]
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
