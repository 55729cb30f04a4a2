"""Process sets and broadcast_state: ranks {0, 1} sync among themselves; rank 2 is outside."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch  # noqa: E402

from _common import load_payload, main_guard, save_result  # noqa: E402
from torch_reliability import expect_error, train  # noqa: E402
from torch_local import Linear  # noqa: E402


def main():
    import horovod.torch as hvd
    import horovod_local.torch as hlt

    out_dir, payload = load_payload()
    pair = hvd.ProcessSet([0, 1])
    hvd.init(process_sets=[pair])
    torch.set_default_dtype(torch.float64)
    rank, res = hvd.rank(), {}

    model = Linear()
    make = lambda ps: hlt.DistributedLocalOptimizer(  # noqa: E731
        torch.optim.SGD(model.parameters(), lr=0.05), model.named_parameters(), period=3,
        process_set=ps)
    if rank in (0, 1):
        opt = make(pair)
        train(model, opt, rank, 1, 30)
        res["pair_params"] = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
        res["pair_syncs"] = opt.sync_stats().syncs
    else:
        res["outsider"] = expect_error(lambda: make(pair))

    # broadcast_state: mid-round SlowMo state differs per rank; afterwards all equal rank 1's
    model = Linear()
    opt = hlt.DistributedLocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                        model.named_parameters(), period=4, algorithm="slowmo",
                                        slowmo_momentum=0.5)
    train(model, opt, rank, 1, 6)
    res["before"] = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    res["before_state"] = opt.state_dict()
    opt.broadcast_state(root_rank=1)
    res["after"] = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    res["after_state"] = opt.state_dict()
    save_result(out_dir, rank, res)


if __name__ == "__main__":
    main_guard(main)
