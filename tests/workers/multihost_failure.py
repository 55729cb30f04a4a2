"""Failures across the hosts of scripts/hosts.sh (tests/test_multihost.py), one job per call:

1. the replica check (payload ``replica``: a list of cases ``{"id", "rank", "period"|"out"}``):
   every rank builds a wrapper; rank ``rank`` (on hostB) builds it with another ``period`` or
   another layer shape (``out`` outputs). Every rank must raise ``ValueError``; each writes
   what it got (message, rank, host) to ``replica<r>.pkl`` before going on;
2. then training with a matching wrapper (``period`` 4): at step ``at`` (right after the sync at
   step ``at - 1``) rank ``victim`` (on hostB) either kills itself (``how='kill'``, SIGKILL) or
   leaves normally without ``join()`` (``how='exit'``); the others are then stuck in the next
   sync round. The victim writes ``killed_at`` (its ``time.time()``) first; a survivor that gets
   ``HorovodInternalError`` writes ``failed<r>.pkl`` (message, ``time.time()``, host).
"""
from __future__ import annotations

import os
import pickle
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch  # noqa: E402

import fixtures  # noqa: E402
from _common import load_payload, main_guard, save_result  # noqa: E402
from torch_local import Linear  # noqa: E402

PERIOD = 4


def write(out_dir: str, name: str, value) -> None:
    tmp = os.path.join(out_dir, f".{name}")
    with open(tmp, "wb") as f:
        pickle.dump(value, f)
    os.replace(tmp, os.path.join(out_dir, name))


def replica_cases(out_dir: str, cases: list) -> None:
    import horovod.torch as hvd
    import horovod_local.torch as hlt

    got = {}
    for case in cases:
        mine = hvd.rank() == case["rank"]
        model = Linear()
        if mine and "out" in case:  # another layer shape on this rank only
            model.weight = torch.nn.Parameter(torch.zeros(case["out"], model.weight.shape[1],
                                                          dtype=torch.float64))
            model.bias = torch.nn.Parameter(torch.zeros(case["out"], dtype=torch.float64))
        period = case.get("period", PERIOD) if mine else PERIOD
        try:
            hlt.DistributedLocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                          model.named_parameters(), period=period)
            got[case["id"]] = {"error": None}
        except ValueError as e:
            got[case["id"]] = {"error": str(e)}
    got["_host"] = socket.gethostname()
    write(out_dir, f"replica{hvd.rank()}.pkl", got)


def main():
    import horovod.torch as hvd
    import horovod_local.torch as hlt
    from horovod.common.exceptions import HorovodInternalError

    out_dir, payload = load_payload()
    hvd.init()
    torch.set_default_dtype(torch.float64)
    if payload.get("replica"):
        replica_cases(out_dir, payload["replica"])
    fail = payload.get("fail")
    if not fail:
        save_result(out_dir, hvd.rank(), {"host": socket.gethostname()})
        return
    model = Linear()
    opt = hlt.DistributedLocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                        model.named_parameters(), period=PERIOD)
    try:
        for t in range(1, 10_000):
            if hvd.rank() == fail["victim"] and t == fail["at"]:
                assert opt.sync_stats().local_steps == 0  # right after a sync
                write(out_dir, "killed_at", {"time": time.time(), "host": socket.gethostname(),
                                             "syncs": opt.sync_stats().syncs})
                if fail["how"] == "exit":  # a clean exit without join(): status 0
                    print(f"rank {hvd.rank()}: leaving (exit 0) at step {t}", flush=True)
                    return
                print(f"rank {hvd.rank()}: killing myself at step {t}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            x, y = (torch.tensor(a) for a in fixtures.make_batch(hvd.rank(), t))
            opt.zero_grad()
            (0.5 * ((model(x) - y) ** 2).sum()).backward()
            opt.step()
    except HorovodInternalError as e:
        write(out_dir, f"failed{hvd.rank()}.pkl",
              {"time": time.time(), "message": str(e), "host": socket.gethostname()})
        raise


if __name__ == "__main__":
    main_guard(main)
