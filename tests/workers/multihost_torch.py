"""tests/workers/torch_local.py's config runner, plus where this rank ran: its network
namespace (``ip netns identify``) and the address of its ``hl0`` (scripts/hosts.sh)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch  # noqa: E402

from _common import load_payload, main_guard, save_result  # noqa: E402
from torch_local import run_config  # noqa: E402


def where() -> dict:
    ns = subprocess.run(["ip", "netns", "identify", str(os.getpid())], capture_output=True,
                        text=True, timeout=10).stdout.strip()
    addr = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", "hl0"], capture_output=True,
                          text=True, timeout=10).stdout.split()
    ip = addr[3].split("/")[0] if len(addr) > 3 else ""
    return {"netns": ns, "hl0": ip, "hostname": socket.gethostname()}


def main():
    import horovod.torch as hvd

    out_dir, configs = load_payload()
    hvd.init(process_sets="dynamic")  # two-level averaging groups the ranks by host itself
    torch.set_default_dtype(torch.float64)
    results = {cfg["id"]: run_config(cfg) for cfg in configs}
    results["_where"] = dict(where(), rank=hvd.rank(), local_rank=hvd.local_rank(),
                             size=hvd.size(), local_size=hvd.local_size(),
                             cross_size=hvd.cross_size())
    save_result(out_dir, hvd.rank(), results)


if __name__ == "__main__":
    main_guard(main)
