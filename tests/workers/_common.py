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
