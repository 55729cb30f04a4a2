"""Helpers shared by the worker scripts (run inside horovodrun)."""
from __future__ import annotations

import os
import pickle
import sys
import traceback


def load_payload():
    out_dir = sys.argv[1]
    with open(os.path.join(out_dir, "payload.pkl"), "rb") as f:
        return out_dir, pickle.load(f)


def save_result(out_dir: str, rank: int, result) -> None:
    tmp = os.path.join(out_dir, f".rank{rank}.pkl")
    with open(tmp, "wb") as f:
        pickle.dump(result, f)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.pkl"))


def main_guard(fn) -> None:
    try:
        fn()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # never leave the other ranks waiting in a collective


def init_horovod(hvd, configs) -> dict:
    """``hvd.init()`` for a worker's configs: the two-level groups named in them (lists of
    ranks) registered as process sets at init, as a user would; else dynamic process sets when
    HL_DYNAMIC is set. ``hvd``: horovod.torch or horovod.tensorflow. Returns {group (tuple of
    ranks): process set}."""
    groups = sorted({tuple(g) for cfg in configs for g in (cfg.get("groups") or [])})
    if not groups:
        hvd.init(process_sets="dynamic" if os.environ.get("HL_DYNAMIC") else None)
        return {}
    sets = {g: hvd.ProcessSet(list(g)) for g in groups}
    hvd.init(process_sets=list(sets.values()))
    return sets


def group_set(sets: dict, hvd, groups):
    """The process set of this rank's group among ``groups`` (None without groups)."""
    if not groups:
        return None
    return sets.get(next(tuple(g) for g in groups if hvd.rank() in g))


def wait_for_host_change(state, rounds: int) -> None:
    """Commit ``state`` every 0.2 s until Horovod reports a host change (``commit()`` raises
    HostsUpdatedInterrupt on every rank once it saw one); RuntimeError after ``rounds``."""
    import time

    for _ in range(rounds):
        state.commit()
        time.sleep(0.2)
    raise RuntimeError(f"Horovod reported no host change within {rounds} commits")
