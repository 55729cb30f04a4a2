"""Rank 2 of 3 is killed (SIGKILL) mid-training, or leaves with exit status 0 (payload how='exit'),
or its data ends and it evaluates (an allreduce) without join() (how='forgot_join'); the others
are blocked in a sync round."""
from __future__ import annotations

import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch  # noqa: E402

import fixtures  # noqa: E402
from _common import load_payload, main_guard  # noqa: E402
from torch_local import Linear  # noqa: E402


def main():
    import horovod.torch as hvd
    import horovod_local.torch as hlt

    out_dir, payload = load_payload()
    hvd.init()
    torch.set_default_dtype(torch.float64)
    model = Linear()
    opt = hlt.DistributedLocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                        model.named_parameters(), period=2)
    for t in range(1, 10_000):
        if hvd.rank() == payload["victim"] and t == 5:
            with open(os.path.join(out_dir, "killed_at"), "w") as f:
                f.write(repr(__import__("time").time()))
            if payload.get("how") == "forgot_join":  # its data ended: it evaluates, no join()
                print(f"rank {hvd.rank()}: evaluating without join() at step {t}", flush=True)
                hvd.allreduce(torch.tensor([1.0]), name="metric")  # never met: the others sync
                return
            if payload.get("how", "kill") == "exit":  # a clean exit without join(): status 0
                print(f"rank {hvd.rank()}: leaving (exit 0) at step {t}", flush=True)
                return  # the script ends normally (atexit handlers run), as a user's would
            print(f"rank {hvd.rank()}: killing myself at step {t}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = (torch.tensor(a) for a in fixtures.make_batch(hvd.rank(), t))
        opt.zero_grad()
        (0.5 * ((model(x) - y) ** 2).sum()).backward()
        opt.step()


if __name__ == "__main__":
    main_guard(main)
