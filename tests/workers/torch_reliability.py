"""Reliability scenarios on every rank: mismatched replicas, NaN at a sync, exact resume."""
from __future__ import annotations

import copy
import io
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch  # noqa: E402

import fixtures  # noqa: E402
from _common import load_payload, main_guard, save_result  # noqa: E402
from torch_local import Linear, make_inner, wrapper_kwargs  # noqa: E402


def build(cfg: dict):
    import horovod_local.torch as hlt

    model = Linear()
    inner = make_inner(cfg["inner"], model)
    return model, hlt.DistributedLocalOptimizer(inner, model.named_parameters(),
                                                **wrapper_kwargs(cfg))


def train(model, opt, rank, first, last, nan_at=None):
    for t in range(first, last + 1):
        x, y = (torch.tensor(a) for a in fixtures.make_batch(rank, t))
        opt.zero_grad()
        (0.5 * ((model(x) - y) ** 2).sum() / x.shape[0]).backward()
        if nan_at == t:
            model.weight.grad[0, 0] = float("nan")
        opt.step()


def resume(cfg: dict, rank: int) -> dict:
    """Uninterrupted run vs a run stopped at `stop` (mid-round), saved, rebuilt and resumed."""
    steps, stop = cfg["steps"], cfg["stop"]
    model, opt = build(cfg)
    train(model, opt, rank, 1, stop)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, rank, stop + 1, steps)
    straight = {n: p.detach().clone() for n, p in model.named_parameters()}
    straight_stats = opt.sync_stats()

    model2, opt2 = build(cfg)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    train(model2, opt2, rank, stop + 1, steps)
    return {"straight": {n: p.numpy() for n, p in straight.items()},
            "resumed": {n: p.detach().numpy().copy() for n, p in model2.named_parameters()},
            "syncs": (straight_stats.syncs, opt2.sync_stats().syncs),
            "schedule": (copy.deepcopy(opt.schedule.state_dict()), opt2.schedule.state_dict())}


def expect_error(fn) -> str:
    try:
        fn()
    except (ValueError, FloatingPointError, RuntimeError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def main():
    import horovod.torch as hvd
    import horovod_local.torch as hlt

    out_dir, payload = load_payload()
    hvd.init()
    torch.set_default_dtype(torch.float64)
    rank = hvd.rank()
    res = {}
    base = {"inner": {"name": "sgd", "lr": 0.05}, "schedule": {"kind": "constant", "period": 4}}

    # 1. ranks built differently: a shape, then the period
    def shape_mismatch():
        model = torch.nn.Linear(6 if rank == 0 else 5, 4)
        hlt.DistributedLocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                      model.named_parameters(), period=4)
    res["shape_mismatch"] = expect_error(shape_mismatch)

    def period_mismatch():
        model = torch.nn.Linear(6, 4)
        hlt.DistributedLocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                      model.named_parameters(), period=4 + (rank == 1))
    res["period_mismatch"] = expect_error(period_mismatch)

    def outer_sgd(p):
        return torch.optim.SGD(p, lr=0.7)

    def outer_nesterov(p):
        return torch.optim.SGD(p, lr=0.7, momentum=0.9, nesterov=True)

    def outer_mismatch():  # rank 1 passes another outer-optimizer factory
        model = torch.nn.Linear(6, 4)
        hlt.DistributedLocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                      model.named_parameters(), period=4,
                                      outer_optimizer=outer_nesterov if rank == 1 else outer_sgd)
    res["outer_mismatch"] = expect_error(outer_mismatch)

    # 2. a NaN on one rank reaches the sync at step 8: every rank raises, nothing written back
    model, opt = build(base)
    res["nan"] = expect_error(lambda: train(model, opt, rank, 1, 8, nan_at=7 if rank == 1 else None))
    # the healthy ranks never received the NaN (the sum was not written back)
    res["nan_kept_out"] = rank == 1 or all(bool(torch.isfinite(p).all())
                                           for p in model.parameters())

    # 2b. nonfinite='skip': the round is dropped, every rank returns to the last good average
    # (the sync after step 4) and training goes on; the next rounds are finite again
    import warnings

    model, opt = build(dict(base, nonfinite="skip"))
    train(model, opt, rank, 1, 4)
    good = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, rank, 5, 8, nan_at=7 if rank == 1 else None)
    res["skip_restored"] = all(bool(torch.equal(good[n], p)) for n, p in model.named_parameters())
    res["skip_warned"] = any("Skipping this round" in str(w.message) for w in caught)
    train(model, opt, rank, 9, 12)
    res["skip_after"] = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    res["skip_stats"] = opt.sync_stats().as_dict()

    # 2c. a rank joins while the others are still in warm-up: same buffer sizes and names, so
    # only the control element tells a gradient round from a sync round; every rank must raise
    model, opt = build(dict(base, warmup_steps=5))
    res["round_kinds"] = expect_error(opt.join if rank == 0 else
                                      (lambda: train(model, opt, rank, 1, 1)))

    # 3. exact resume mid-round, every algorithm
    for cfg in payload["resume"]:
        res["resume_" + cfg["id"]] = resume(cfg, rank)

    # 4. a frozen parameter is neither stepped nor synced; a parameter without a gradient in a
    # step is skipped by the inner optimizer but still averaged at the sync
    model = Linear()
    model.bias.requires_grad_(False)
    bias0 = model.bias.detach().clone()
    opt = hlt.DistributedLocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                        model.named_parameters(), period=3)
    train(model, opt, rank, 1, 9)
    res["frozen"] = {"bias_unchanged": bool(torch.equal(model.bias, bias0)),
                     "weight": model.weight.detach().numpy().copy(),
                     "synced_bytes_per_round": opt.sync_stats().bytes_sent // 3}
    save_result(out_dir, rank, res)


if __name__ == "__main__":
    main_guard(main)
