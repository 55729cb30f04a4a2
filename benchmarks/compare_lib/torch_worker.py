"""The torch front end of the per-rank loop (``worker.worker_main``): Horovod's
``hvd.DistributedOptimizer`` or our ``horovod_local.torch.DistributedLocalOptimizer``."""
from __future__ import annotations

import copy
import os
import re
import socket
import tempfile
import time
from pathlib import Path

import horovod.torch as hvd
import torch

import horovod_local as hl
import horovod_local.torch as hlt
from examples.tasks import make_task, n_params

from .config import SLOWMO, TASK_SETTINGS, make_period


class TorchRun:
    """One method of a torch task: its model, optimizer, steps, syncs and evaluations."""

    def __init__(self, w: TorchWorker, spec: dict, steps: int) -> None:
        task, settings = w.task, w.settings
        self.w, self.spec = w, spec
        self.model = model = task.build_model(seed=w.seed)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        self.eval_model = copy.deepcopy(model)
        self.inner, use_sched = w.make_inner(spec, model.parameters())
        self.grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.n_params = n_params(model)
        if spec["kind"] == "horovod":
            self.opt = hvd.DistributedOptimizer(self.inner,
                                                named_parameters=model.named_parameters(),
                                                op=hvd.Average)
            # Which allreduce Horovod really runs (two hosts: whether HOROVOD_HIERARCHICAL_
            # ALLREDUCE took effect), from its timeline, before the timed run.
            self.allreduce_ops = w.allreduce_ops(self.grad_bytes // 4)
        else:
            kw = dict(SLOWMO, algorithm="slowmo") if spec.get("algorithm") == "slowmo" else {}
            if spec.get("local_period") is not None:  # two-level averaging
                kw["local_period"] = spec["local_period"]
                if w.local_process_set is not None:
                    kw["local_process_set"] = w.local_process_set
            if spec.get("overlap"):  # overlapped rounds (one-round-delayed averaging)
                kw["overlap"] = True
            if spec.get("compression"):  # compressed syncs: 'fp16' | 'int8'
                kw["compression"] = spec["compression"]
            self.opt = hlt.DistributedLocalOptimizer(self.inner, model.named_parameters(),
                                                     period=make_period(hl, spec, steps), **kw)
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
        self.opt.average_parameters()

    def evaluate(self, need_avg: bool) -> float:
        """Held-out metric of the ranks' average model; each rank scores half the set."""
        task = self.w.task
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


class TorchWorker:
    framework = "torch"
    Run = TorchRun

    def __init__(self, cfg: dict) -> None:
        torch.set_num_threads(1)
        self.local_process_set = None
        groups = cfg.get("host_process_sets")
        if groups:
            # Two-level averaging: one process set per host, registered at init (no dynamic
            # process sets: those cost a global negotiation every cycle of Horovod's loop).
            sets = [hvd.ProcessSet(g) for g in groups]
            hvd.init(process_sets=sets)
            self.local_process_set = next(ps for ps in sets if ps.included())
            hosts = hvd.allgather_object(socket.gethostname())
            for g in groups:
                if len({hosts[r] for r in g}) != 1 or any(
                        hosts[r] == hosts[g[0]] for r in range(len(hosts)) if r not in g):
                    raise RuntimeError(f"host_process_sets {groups} do not match where the "
                                       f"ranks run: {hosts}")
        else:
            hvd.init()
        self.rank, self.size, self.seed = hvd.rank(), hvd.size(), cfg["seed"]
        self.settings = TASK_SETTINGS[cfg["task"]]
        self.task = make_task(cfg["task"], **self.settings["task_kwargs"])
        self.backend = hlt.backend_info()
        self.baseline = "hvd.DistributedOptimizer (horovod.torch): gradient allreduce every step"

    def make_inner(self, spec: dict, params):
        """The inner optimizer of a method, and whether the task's lr warm-up applies to it."""
        settings, lr = self.settings, self.settings["lr"]
        if spec.get("inner") == "adaalter":
            return hlt.LocalAdaAlter(params, lr=lr, eps=settings["adaalter_eps"],
                                     initial_accumulator_value=settings["adaalter_b0sq"],
                                     lr_warmup_steps=settings["lr_warmup_steps"]), False
        if settings["inner"] == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=settings["momentum"]), True
        if settings["inner"] == "adagrad":
            return torch.optim.Adagrad(params, lr=lr), True
        raise ValueError(settings["inner"])

    def allreduce_ops(self, numel: int) -> list[str] | None:
        """The op names of one float32 allreduce of ``numel`` elements in Horovod's timeline
        (e.g. GLOO_ALLREDUCE, MPI_ALLREDUCE, NCCL_HIERARCHICAL_ALLREDUCE) on rank 0; None unless
        the ranks run with HOROVOD_TIMELINE=DYNAMIC (two-host mode sets it)."""
        if os.environ.get("HOROVOD_TIMELINE") != "DYNAMIC":
            return None
        fd, path = tempfile.mkstemp(prefix="hl-bench-timeline-", suffix=".json")
        os.close(fd)
        try:
            hvd.start_timeline(path, mark_cycles=False)
            hvd.allreduce(torch.zeros(numel), name="bench.probe_op", op=hvd.Average)
            hvd.stop_timeline()
            text = Path(path).read_text() if self.rank == 0 else ""
        finally:
            os.unlink(path)
        # the op that moved the data (e.g. GLOO_ALLREDUCE), not the phases every op has
        ops = set(re.findall(r'"name": "([A-Z_]+_ALLREDUCE)"', text)) - {"NEGOTIATE_ALLREDUCE"}
        return sorted(ops) or None

    def barrier(self) -> None:
        hvd.allreduce(torch.zeros(1), name="bench.barrier", op=hvd.Sum)

    def allreduce_max(self, x: float) -> float:
        c = torch.tensor([x], dtype=torch.float64)
        hvd.allreduce_(c, op=hvd.Max, name="bench.comm_max")
        return float(c[0])
