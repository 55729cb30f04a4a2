"""PyTorch's own post-local SGD on 2 CPU ranks (Gloo), for tests/test_postlocal_equivalence.py.

    python tests/workers/postlocal_ddp.py <dir>      # <dir>/payload.pkl -> <dir>/rank<r>.pkl

The documented recipe: ``DistributedDataParallel`` with the ``post_localSGD_hook``
(``PostLocalSGDState(process_group=None, subgroup=..., start_localSGD_iter=W)``) and
``PostLocalSGDOptimizer(optim, averager=PeriodicModelAverager(period=H, warmup_steps=W))``.
Model, data and initial weights: tests/fixtures.py (float64), as tests/workers/torch_local.py.

Payload: ``{"port": int, "world_size": 2, "configs": [cfg, ...]}``, each cfg ``{"id", "W", "H",
"steps", "lr", "momentum", "post_local_gradient_allreduce": bool, "subgroup_size": int | None}``.
``subgroup_size=None`` with ``post_local_gradient_allreduce=True`` is PyTorch's default, which
calls ``dist.new_subgroups()``; that needs CUDA (ValueError on a CPU-only machine), so the test
passes ``subgroup_size=1`` (one rank per "node") or turns the local gradient allreduce off.
Each rank saves ``{id: array [steps, n_params]}``: its flat parameters after every step.
"""
from __future__ import annotations

import os
import pickle
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import fixtures  # noqa: E402
from _common import save_result  # noqa: E402
from torch_local import Linear  # noqa: E402


def run_config(cfg: dict, rank: int, subgroups: dict) -> np.ndarray:
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
        PostLocalSGDState, post_localSGD_hook)
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    module = Linear(torch.float64)  # the same initial weights on every rank (and as ours)
    model = torch.nn.parallel.DistributedDataParallel(module)
    size = cfg.get("subgroup_size")
    subgroup = subgroups[size] if size is not None else None
    state = PostLocalSGDState(process_group=None, subgroup=subgroup,
                              start_localSGD_iter=cfg["W"],
                              post_local_gradient_allreduce=cfg["post_local_gradient_allreduce"])
    model.register_comm_hook(state, post_localSGD_hook)
    opt = PostLocalSGDOptimizer(
        optim=torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"]),
        averager=PeriodicModelAverager(period=cfg["H"], warmup_steps=cfg["W"]))
    rows = []
    for t in range(1, cfg["steps"] + 1):
        x, y = (torch.tensor(a) for a in fixtures.make_batch(rank, t))
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum() / x.shape[0]
        loss.backward()
        opt.step()
        rows.append(np.concatenate([p.detach().reshape(-1).numpy().copy()
                                    for p in module.parameters()]))
    return np.stack(rows)


def worker(rank: int, out_dir: str, payload: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(payload["port"]))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=payload["world_size"])
    try:
        sizes = {c["subgroup_size"] for c in payload["configs"]
                 if c.get("subgroup_size") is not None}
        # new_subgroups is collective: every rank creates every subgroup, in the same order
        subgroups = {s: dist.new_subgroups(group_size=s)[0] for s in sorted(sizes)}
        result = {cfg["id"]: run_config(cfg, rank, subgroups) for cfg in payload["configs"]}
        save_result(out_dir, rank, result)
    finally:
        dist.destroy_process_group()


def main() -> None:
    out_dir = sys.argv[1]
    with open(os.path.join(out_dir, "payload.pkl"), "rb") as f:
        payload = pickle.load(f)
    mp.spawn(worker, args=(out_dir, payload), nprocs=payload["world_size"], join=True)


if __name__ == "__main__":
    main()
