"""Runs a list of optimizer configs on this rank; config format = tests/reference.py's, plus
an optional ``dtype`` ("float64" by default, or "float32"): the model's and the data's dtype."""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch  # noqa: E402

import fixtures  # noqa: E402
from _common import group_set, init_horovod, load_payload, main_guard, save_result  # noqa: E402


class Linear(torch.nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float64):
        super().__init__()
        init = fixtures.init_params()
        self.weight = torch.nn.Parameter(torch.tensor(init["weight"], dtype=dtype))
        self.bias = torch.nn.Parameter(torch.tensor(init["bias"], dtype=dtype))

    def forward(self, x):
        return x @ self.weight.T + self.bias


def make_inner(spec: dict, model: torch.nn.Module):
    import horovod_local.torch as hlt

    params = model.parameters()
    if "group_lr_scale" in spec:  # one group per tensor, as tests/reference.py
        scale = spec["group_lr_scale"]
        params = [{"params": [p], "lr": spec["lr"] * scale.get(n, 1.0)}
                  for n, p in model.named_parameters()]

    if spec["name"] == "sgd":
        return torch.optim.SGD(params, lr=spec["lr"], momentum=spec.get("momentum", 0.0))
    if spec["name"] == "adam":
        return torch.optim.Adam(params, lr=spec["lr"], betas=tuple(spec["betas"]), eps=spec["eps"])
    if spec["name"] == "adaalter":
        return hlt.LocalAdaAlter(params, lr=spec["lr"], eps=spec["eps"],
                                 initial_accumulator_value=spec["initial_accumulator_value"],
                                 lr_warmup_steps=spec.get("lr_warmup_steps", 0))
    raise ValueError(spec["name"])


def wrapper_kwargs(cfg: dict) -> dict:
    """DistributedLocalOptimizer's keyword arguments for a config in the reference's format."""
    kw = dict(period=fixtures.schedule_from_spec(cfg["schedule"]),
              warmup_steps=cfg.get("warmup_steps", 0), state_policy=cfg.get("state_policy", "keep"),
              nonfinite=cfg.get("nonfinite", "raise"))
    if cfg.get("overlap"):
        kw["overlap"] = True
    if cfg.get("compression"):
        kw["compression"] = cfg["compression"]
    if cfg.get("local_period") is not None:
        kw["local_period"] = cfg["local_period"]
        import horovod.torch as hvd

        kw["local_process_set"] = group_set(_GROUP_SETS, hvd, cfg.get("groups"))
    alg = cfg.get("algorithm") or {"name": "local_sgd"}
    if alg["name"] == "slowmo":
        kw.update(algorithm="slowmo", slowmo_lr=alg["alpha"], slowmo_momentum=alg["beta"])
    elif alg["name"] == "outer_sgd":
        kw["outer_optimizer"] = lambda p: torch.optim.SGD(
            p, lr=alg["lr"], momentum=alg["momentum"], nesterov=alg["nesterov"])
    return kw


_GROUP_SETS: dict = {}  # two-level groups (tuple of ranks) -> Horovod process set




def _build(cfg: dict):
    import horovod.torch as hvd
    import horovod_local.torch as hlt

    dtype = getattr(torch, cfg.get("dtype", "float64"))  # model and data dtype
    model = Linear(dtype)
    inner = make_inner(cfg["inner"], model)
    if cfg.get("baseline") == "horovod":
        opt = hvd.DistributedOptimizer(inner, named_parameters=model.named_parameters(),
                                       op=hvd.Average)
    else:
        opt = hlt.DistributedLocalOptimizer(inner, model.named_parameters(),
                                            **wrapper_kwargs(cfg))
    lr_fn = cfg["inner"].get("lr_schedule")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_fn) if lr_fn else None
    return model, opt, sched, dtype


def _finish(cfg: dict, opt) -> None:
    if hasattr(opt, "sync_stats"):
        if cfg.get("join"):
            opt.join()  # join rounds are not recorded: the reference replays them itself
        elif cfg.get("final_sync"):
            opt.average_parameters()


def _params(model) -> dict:
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


def run_config(cfg: dict) -> dict:
    import copy

    import horovod.torch as hvd

    rank, size = hvd.rank(), hvd.size()
    model, opt, sched, dtype = _build(cfg)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    steps = cfg["steps"] if isinstance(cfg["steps"], int) else cfg["steps"][rank]
    sleep = cfg.get("sleep_per_step", [0.0] * size)[rank]
    resume_at, snapshot = cfg.get("resume_at"), None
    rounds, sync_steps, periods, losses, boundaries = [], [], [], [], []

    def one_step(model, opt, sched, t):
        x, y = (torch.tensor(a, dtype=dtype) for a in fixtures.make_batch(rank, t))
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum() / x.shape[0]
        loss.backward()
        opt.step()
        if sched:
            sched.step()
        return loss

    for t in range(1, steps + 1):
        x, y = (torch.tensor(a, dtype=dtype) for a in fixtures.make_batch(rank, t))
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum() / x.shape[0]
        loss.backward()
        if sleep:
            time.sleep(sleep)
        if hasattr(opt, "sync_stats"):
            before = opt.sync_stats()
            period_before = opt.schedule.period
        opt.step()
        if sched:
            sched.step()
        losses.append(float(loss))
        if hasattr(opt, "sync_stats") and opt.sync_stats().syncs > before.syncs:
            rounds.append(before.local_steps + 1)
            sync_steps.append(t)
            periods.append(period_before)
        if hasattr(opt, "sync_stats") and opt.sync_stats().local_steps == 0 \
                and t > cfg.get("warmup_steps", 0):  # a round started here (overlap: too)
            boundaries.append(before.local_steps + 1)
        if t == resume_at:  # a checkpoint (with an overlapped round in flight, say)
            snapshot = copy.deepcopy((model.state_dict(), opt.state_dict(),
                                      sched.state_dict() if sched else None))
    _finish(cfg, opt)
    out = {"params": _params(model), "losses": losses, "rounds": rounds,
           "sync_steps": sync_steps, "periods": periods, "boundaries": boundaries}
    if hasattr(opt, "sync_stats"):
        out["stats"] = opt.sync_stats().as_dict()
        out["schedule_state"] = opt.schedule.state_dict()
    if snapshot is not None:  # resume from the checkpoint in a fresh model and optimizer
        model, opt, sched, _ = _build(cfg)
        model.load_state_dict(snapshot[0])
        opt.load_state_dict(snapshot[1])
        if sched:
            sched.load_state_dict(snapshot[2])
        for t in range(resume_at + 1, steps + 1):
            one_step(model, opt, sched, t)
        _finish(cfg, opt)
        out["resumed_params"] = _params(model)
        out["resumed_stats"] = opt.sync_stats().as_dict()
    return out


def main():
    import horovod.torch as hvd

    out_dir, configs = load_payload()
    _GROUP_SETS.update(init_horovod(hvd, configs))
    torch.set_default_dtype(torch.float64)
    results = {cfg["id"]: run_config(cfg) for cfg in configs}
    # a rank that exits shuts Horovod down everywhere: wait until every rank is done (a group
    # may still be in its last local rounds)
    hvd.allreduce(torch.zeros(1), name="torch_local.done")
    save_result(out_dir, hvd.rank(), results)


if __name__ == "__main__":
    main_guard(main)
