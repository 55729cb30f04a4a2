"""Elastic training across the hosts of scripts/hosts.sh (tests/test_multihost.py): a
``DistributedLocalOptimizer`` (local SGD, period 4, SGD with momentum) under
``@hvd.elastic.run`` with ``LocalTorchState`` while the discovery script first adds hostB and
then removes it again.

Payload: ``hosts_file`` (what the discovery script prints), ``steps``, ``changes``: a list of
``{"at": step, "size": n, "hosts": text}``: after step ``at``, if the world has ``n`` ranks,
rank 0 writes ``text`` to the hosts file and every rank commits until Horovod reports the
change. At every entry into the train function (start and after each reset) every rank records
what ``sync()`` left: the world size, the wrapper's size, its round position and every rank's
parameters and host name (allgathered); and every rank's parameters at each change, before
it. Ranks alive at the end write ``rank<r>.pkl``.
"""
from __future__ import annotations

import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import numpy as np  # noqa: E402
import torch  # noqa: E402

import fixtures  # noqa: E402
from _common import load_payload, main_guard, save_result, wait_for_host_change  # noqa: E402
from torch_local import Linear  # noqa: E402

WAIT_ROUNDS = 300  # commits 0.2 s apart while waiting for Horovod to report a change


def flat(tensors) -> np.ndarray:
    return np.concatenate([t.detach().reshape(-1).double().numpy() for t in tensors])


def main() -> None:
    import horovod.torch as hvd
    import horovod_local.torch as hlt

    out_dir, payload = load_payload()
    hvd.init()
    torch.set_default_dtype(torch.float64)
    log: dict = {"entries": [], "syncs": [], "before": [], "born_size": hvd.size(),
                 "born_host": socket.gethostname()}
    model = Linear()
    opt = hlt.DistributedLocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.05,
                                                        momentum=0.9),
                                        model.named_parameters(), period=4)
    state = hlt.LocalTorchState(model, opt, step=0)

    @hvd.elastic.run
    def train(state) -> None:
        params = flat(opt._hl_params())
        log["entries"].append({
            "step": state.step, "rank": hvd.rank(), "hvd_size": hvd.size(),
            "opt_size": opt._hl_size, "local_steps": opt.sync_stats().local_steps,
            "all_params": hvd.allgather(torch.from_numpy(params)[None],
                                        name="multihost_elastic.entry").numpy(),
            "hosts": hvd.allgather_object(socket.gethostname(), name="multihost_elastic.hosts"),
            "time": time.time()})
        while state.step < payload["steps"]:
            t = state.step + 1
            x, y = (torch.tensor(a) for a in fixtures.make_batch(hvd.rank(), t))
            opt.zero_grad()
            (0.5 * ((model(x) - y) ** 2).sum() / x.shape[0]).backward()
            syncs = opt.sync_stats().syncs
            opt.step()
            if opt.sync_stats().syncs > syncs:
                log["syncs"].append((t, hvd.size(), opt._hl_size))
            state.step = t
            change = next((c for c in payload["changes"]
                           if c["at"] == t and c["size"] == hvd.size()), None)
            if change is not None:  # mid-round (step 1 of a round): the replicas differ
                log["before"].append({"step": t, "all_params": hvd.allgather(
                    torch.from_numpy(flat(opt._hl_params()))[None],
                    name="multihost_elastic.before").numpy()})
                if hvd.rank() == 0:  # atomically: discovery must never read a partial file
                    tmp = payload["hosts_file"] + ".tmp"
                    with open(tmp, "w") as f:
                        f.write(change["hosts"])
                    os.replace(tmp, payload["hosts_file"])
                wait_for_host_change(state, WAIT_ROUNDS)
            state.commit()

    train(state)
    opt.average_parameters()
    log["final"] = flat(opt._hl_params())
    log["rank"], log["size"], log["host"] = hvd.rank(), hvd.size(), socket.gethostname()
    save_result(out_dir, hvd.rank(), log)


if __name__ == "__main__":
    main_guard(main)
