"""Elastic worker: trains two wrapped models (local SGD, SlowMo) under ``@hvd.elastic.run`` with
``LocalTorchState`` while workers come and go, and records every sync round (with every rank's
pre-sync parameters, allgathered) so the test can redo its arithmetic in NumPy.

Payload: ``hosts_file`` (what the discovery script prints); ``steps`` (total steps);
``changes``: a list of ``{"at": step, "size": n, "hosts": text}``: after step ``at``, if the world
has ``n`` ranks, rank 0 writes ``text`` to the hosts file and every rank commits until Horovod
reports the change (so the change lands after exactly that step, however slow the machine);
``crash``: ``{"before": step, "host": name}``: the worker on that host exits with status 1 before
that step; ``restore_check_at``: a step after which commit / steps / restore() is checked.
Each surviving rank writes ``rank<r>.pkl``; workers that were removed or crashed write nothing.
"""
from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import numpy as np  # noqa: E402
import torch  # noqa: E402

import fixtures  # noqa: E402
from _common import load_payload, main_guard, save_result, wait_for_host_change  # noqa: E402
from torch_local import Linear  # noqa: E402

PERIOD = {"local_sgd": 4, "slowmo": 3}
LR = 0.05
WAIT_ROUNDS = 600  # commits (0.2 s apart) to wait for Horovod to report a change; ranks agree on it


def flat(tensors) -> np.ndarray:
    return np.concatenate([t.detach().reshape(-1).double().numpy() for t in tensors])


def gather(row: np.ndarray, name: str) -> np.ndarray:
    """Every rank's ``row`` in rank order, shape (size, len(row)). An explicit name: Horovod's
    automatic names count calls, and a worker added later has made fewer."""
    import horovod.torch as hvd

    return hvd.allgather(torch.from_numpy(row)[None], name=name).numpy()


def instrument(name: str, opt, log: dict) -> None:
    """Record each sync round's inputs and result, and each replica check (test-only hooks as
    instance attributes, which shadow the wrapper's methods)."""
    import horovod.torch as hvd

    sync_round, check = opt._hl_sync_round, opt._hl_check_replicas

    def recording_sync_round(joined: bool, explicit: bool = False) -> int:
        pre = flat(opt._hl_params())
        rec: dict[str, Any] = {"opt": name, "step": opt._hl_stats.steps, "size": opt._hl_size,
                               "hvd_size": hvd.size(), "rank": hvd.rank(), "pre": pre,
                               "all_pre": gather(pre, f"elastic_test.pre.{name}")}
        if opt._hl_anchors is not None:
            rec.update(x0=flat(opt._hl_anchors), u=flat(opt._hl_momenta),
                       lr=opt.param_groups[0]["lr"])
        n = sync_round(joined, explicit)
        rec["post"] = flat(opt._hl_params())
        if opt._hl_anchors is not None:
            rec["x0_after"] = flat(opt._hl_anchors)
        log["syncs"].append(rec)
        return n

    def recording_check() -> None:
        log["checks"].append((name, opt._hl_size))
        check()

    opt._hl_sync_round = recording_sync_round
    opt._hl_check_replicas = recording_check


def main() -> None:
    import horovod.torch as hvd
    import horovod_local.torch as hlt

    out_dir, payload = load_payload()
    hvd.init()
    torch.set_default_dtype(torch.float64)
    born_size = hvd.size()
    log: dict[str, Any] = {"syncs": [], "checks": [], "entries": [], "committed": {},
                           "born_size": born_size}

    models = {"local_sgd": Linear(), "slowmo": Linear()}
    opts = {
        "local_sgd": hlt.DistributedLocalOptimizer(
            torch.optim.SGD(models["local_sgd"].parameters(), lr=LR, momentum=0.9),
            models["local_sgd"].named_parameters(), period=PERIOD["local_sgd"]),
        "slowmo": hlt.DistributedLocalOptimizer(
            torch.optim.SGD(models["slowmo"].parameters(), lr=LR),
            models["slowmo"].named_parameters(), period=PERIOD["slowmo"], algorithm="slowmo",
            slowmo_lr=1.0, slowmo_momentum=0.5),
    }
    for name, opt in opts.items():
        instrument(name, opt, log)
    state = hlt.LocalTorchState(models["local_sgd"], opts["local_sgd"],
                                slowmo_model=models["slowmo"], slowmo_optimizer=opts["slowmo"],
                                step=0)

    def one_step(t: int) -> None:
        x, y = (torch.tensor(a) for a in fixtures.make_batch(hvd.rank(), t))
        for name, model in models.items():
            opts[name].zero_grad()
            (0.5 * ((model(x) - y) ** 2).sum() / x.shape[0]).backward()
            opts[name].step()

    @hvd.elastic.run
    def train(state) -> None:
        # what sync() left: every rank equal, a fresh round, anchors = parameters
        log["entries"].append({
            "step": state.step, "rank": hvd.rank(), "hvd_size": hvd.size(),
            "all_params": gather(np.concatenate([flat(o._hl_params()) for o in opts.values()]),
                                 "elastic_test.entry"),
            **{f"{n}_size": o._hl_size for n, o in opts.items()},
            **{f"{n}_local_steps": o.sync_stats().local_steps for n, o in opts.items()},
            **{f"{n}_params": flat(o._hl_params()) for n, o in opts.items()},
            "slowmo_x0": None if opts["slowmo"]._hl_anchors is None
            else flat(opts["slowmo"]._hl_anchors)})
        while state.step < payload["steps"]:
            t = state.step + 1
            crash = payload.get("crash")
            if crash and crash["before"] == t and crash["host"] == os.environ["HOROVOD_HOSTNAME"]:
                os._exit(1)  # the others' next collective fails: HorovodInternalError, restore()
            one_step(t)
            state.step = t
            change = next((c for c in payload["changes"]
                           if c["at"] == t and c["size"] == hvd.size()), None)
            if change is not None:
                if hvd.rank() == 0:
                    with open(payload["hosts_file"], "w") as f:
                        f.write(change["hosts"])
                wait_for_host_change(state, WAIT_ROUNDS)
            state.commit()
            log["committed"][t] = np.concatenate([flat(o._hl_params()) for o in opts.values()])
            if t == payload.get("restore_check_at"):
                log["restore"] = restore_check(state, opts, models, one_step, t)

    train(state)
    for opt in opts.values():
        opt.average_parameters()
    log["final"] = {n: flat(o._hl_params()) for n, o in opts.items()}
    log["stats"] = {n: o.sync_stats().as_dict() for n, o in opts.items()}
    log["rank"], log["size"] = hvd.rank(), hvd.size()
    save_result(out_dir, hvd.rank(), log)


def restore_check(state, opts, models, one_step, t: int) -> dict:
    """commit(), take steps (with a sync), restore(): everything is back at the commit."""
    before = {n: (flat(o._hl_params()), o.sync_stats().as_dict(),
                  dict(o.schedule.state_dict())) for n, o in opts.items()}
    momentum = opts["local_sgd"].state[next(iter(models["local_sgd"].parameters()))]
    momentum = momentum["momentum_buffer"].clone()
    for k in range(1, 5):  # both periods (4, 3) end a round in here
        one_step(t + k)
    moved = {n: not np.array_equal(before[n][0], flat(o._hl_params())) for n, o in opts.items()}
    syncs_moved = {n: o.sync_stats().syncs - before[n][1]["syncs"] for n, o in opts.items()}
    state.restore()
    back = {n: (np.array_equal(before[n][0], flat(o._hl_params())),
                repr(o.sync_stats().as_dict()) == repr(before[n][1]),  # NaN-safe
                o.schedule.state_dict() == before[n][2]) for n, o in opts.items()}
    m_back = opts["local_sgd"].state[next(iter(models["local_sgd"].parameters()))]
    return {"moved": moved, "syncs_moved": syncs_moved, "back": back,
            "momentum_back": bool(torch.equal(m_back["momentum_buffer"], momentum))}


if __name__ == "__main__":
    main_guard(main)
