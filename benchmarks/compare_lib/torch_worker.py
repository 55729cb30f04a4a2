"""The torch front end of the per-rank loop (``worker.worker_main``): Horovod's
``hvd.DistributedOptimizer`` or our ``horovod_local.torch.DistributedLocalOptimizer``."""
from __future__ import annotations

import copy
import time

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
        else:
            kw = dict(SLOWMO, algorithm="slowmo") if spec.get("algorithm") == "slowmo" else {}
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

    def barrier(self) -> None:
        hvd.allreduce(torch.zeros(1), name="bench.barrier", op=hvd.Sum)

    def allreduce_max(self, x: float) -> float:
        c = torch.tensor([x], dtype=torch.float64)
        hvd.allreduce_(c, op=hvd.Max, name="bench.comm_max")
        return float(c[0])
