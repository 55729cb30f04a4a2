"""horovod-local's side of tests/test_postlocal_equivalence.py (run under ``horovodrun``).

Payload: a list of configs ``{"id", "warmup_steps", "period", "steps", "lr", "momentum",
"average_after": [steps]}``: plain ``torch.optim.SGD`` wrapped with
``DistributedLocalOptimizer(period=..., warmup_steps=..., state_policy="keep")`` on the
tests/fixtures.py model and data (float64); ``average_after`` lists steps after which the loop
also calls ``opt.average_parameters()``. Each rank saves ``{id: {"params": array [steps,
n_params] (flat parameters after every step), "stats": sync_stats dict}}``.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import numpy as np  # noqa: E402
import torch  # noqa: E402

import fixtures  # noqa: E402
from _common import load_payload, main_guard, save_result  # noqa: E402
from torch_local import Linear  # noqa: E402


def run_config(cfg: dict) -> dict:
    import horovod.torch as hvd
    import horovod_local.torch as hl

    rank = hvd.rank()
    model = Linear(torch.float64)
    opt = hl.DistributedLocalOptimizer(
        torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"]),
        model.named_parameters(), period=cfg["period"], warmup_steps=cfg["warmup_steps"],
        state_policy="keep")
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    rows = []
    for t in range(1, cfg["steps"] + 1):
        x, y = (torch.tensor(a) for a in fixtures.make_batch(rank, t))
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum() / x.shape[0]
        loss.backward()
        opt.step()
        if t in cfg.get("average_after", ()):
            opt.average_parameters()
        rows.append(np.concatenate([p.detach().reshape(-1).numpy().copy()
                                    for p in model.parameters()]))
    return {"params": np.stack(rows), "stats": opt.sync_stats().as_dict()}


def main() -> None:
    import horovod.torch as hvd

    out_dir, configs = load_payload()
    hvd.init()
    save_result(out_dir, hvd.rank(), {cfg["id"]: run_config(cfg) for cfg in configs})


if __name__ == "__main__":
    main_guard(main)
