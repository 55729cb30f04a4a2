"""PyTorch's post-local SGD == ours with ``warmup_steps = W + 1``, ``period = H`` (plain SGD).

PyTorch's recipe (``DistributedDataParallel`` + ``post_localSGD_hook`` with
``PostLocalSGDState(start_localSGD_iter=W)`` + ``PostLocalSGDOptimizer(optim,
PeriodicModelAverager(period=H, warmup_steps=W))``) allreduces gradients in steps 1..W and
averages the parameters after steps W+1, W+1+H, W+1+2H, ...: its averager's counter is 0 at the
first ``step()`` and averages when ``counter >= W and (counter - W) % H == 0``
(torch/distributed/algorithms/model_averaging/averagers.py), and the hook's counter allreduces
gradients while ``iter < start_localSGD_iter``
(torch/distributed/algorithms/ddp_comm_hooks/post_localSGD_hook.py). Step W+1 is a local step
followed at once by a parameter average; with plain SGD from identical parameters that is
``mean_i(x - lr g_i) = x - lr mean_i(g_i)``, a gradient-averaged step. So ours with
``warmup_steps = W + 1`` (gradient averaging in steps 1..W+1) and ``period = H`` (syncs after
W+1+H, W+1+2H, ...) takes the same steps. With momentum the parameters after step W+1 still
agree but the momentum buffers do not (PyTorch's stay per rank); the exact mapping for any
inner optimizer is ours with ``warmup_steps = W``, ``period = H`` and one explicit
``opt.average_parameters()`` after step W+1 (``state_policy='keep'``). docs/MIGRATION.md.

Both sides run 2 CPU ranks in float64 on tests/fixtures.py's model and per-rank data from the
same initial weights: PyTorch's under ``torch.multiprocessing`` spawn with Gloo
(tests/workers/postlocal_ddp.py), ours under ``horovodrun -np 2 --gloo``
(tests/workers/postlocal_ours.py). The parameters are compared after *every* step (and differ
by float64 rounding only: the gradient mean and the parameter mean round differently); naive
mappings are checked to differ, so the comparison can tell.
"""
from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from harness import ROOT, WORKERS, run_horovod

STEPS = 23  # ends mid-round: the last steps are local steps
LR = 0.05
TOL = 1e-12  # float64; measured differences are ~1e-16 (docs/MIGRATION.md)

# (id, W, H, momentum, PyTorch's local-step gradient handling)
TORCH_CONFIGS = [
    dict(id="w5h4", W=5, H=4, momentum=0.0, post_local_gradient_allreduce=False,
         subgroup_size=None),
    dict(id="w5h4_subgroup1", W=5, H=4, momentum=0.0, post_local_gradient_allreduce=True,
         subgroup_size=1),
    dict(id="w0h3", W=0, H=3, momentum=0.0, post_local_gradient_allreduce=False,
         subgroup_size=None),
    dict(id="w7h5_momentum", W=7, H=5, momentum=0.9, post_local_gradient_allreduce=False,
         subgroup_size=None),
]

# ours: (id, compared against, warmup_steps, period, momentum, explicit averages, must match)
OUR_CONFIGS = [
    ("w5h4", "w5h4", 6, 4, 0.0, [], True),
    ("w5h4", "w5h4_subgroup1", 6, 4, 0.0, [], True),
    ("w0h3", "w0h3", 1, 3, 0.0, [], True),
    ("w7h5_momentum_explicit", "w7h5_momentum", 7, 5, 0.9, [8], True),
    # naive mappings: must NOT match (the comparison is sensitive)
    ("w5h4_naive_W", "w5h4", 5, 4, 0.0, [], False),
    ("w5h4_W_plus_H_minus_1", "w5h4", 8, 4, 0.0, [], False),
    ("w7h5_momentum_W_plus_1", "w7h5_momentum", 8, 5, 0.9, [], False),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torch_post_local() -> list[dict]:
    configs = [dict(c, steps=STEPS, lr=LR) for c in TORCH_CONFIGS]
    with tempfile.TemporaryDirectory(prefix="hl-postlocal-") as tmp:
        with open(os.path.join(tmp, "payload.pkl"), "wb") as f:
            pickle.dump({"port": free_port(), "world_size": 2, "configs": configs}, f)
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, str(WORKERS / "postlocal_ddp.py"), tmp], env=env,
                              capture_output=True, text=True, timeout=180,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        out = []
        for r in range(2):
            with open(os.path.join(tmp, f"rank{r}.pkl"), "rb") as f:
                out.append(pickle.load(f))
        return out


@pytest.fixture(scope="module")
def results():
    theirs = run_torch_post_local()
    payload = [dict(id=i, warmup_steps=w, period=h, momentum=m, average_after=avg, steps=STEPS,
                    lr=LR) for i, _, w, h, m, avg, _ in OUR_CONFIGS]
    payload = list({c["id"]: c for c in payload}.values())  # "w5h4" is compared twice
    ours = run_horovod("postlocal_ours", 2, "gloo", payload, timeout=180)
    return theirs, ours


@pytest.mark.parametrize("ours_id,theirs_id,warmup,period,momentum,average_after,match",
                         OUR_CONFIGS, ids=[f"{c[0]}-vs-{c[1]}" for c in OUR_CONFIGS])
def test_trajectories(results, ours_id, theirs_id, warmup, period, momentum, average_after,
                      match):
    theirs, ours = results
    for r in range(2):
        a = theirs[r][theirs_id]
        b = ours[r][ours_id]["params"]
        assert a.shape == b.shape == (STEPS, 28)
        diff = np.abs(a - b).max(axis=1)  # per step
        if match:
            assert diff.max() <= TOL, (
                f"rank {r}: first step differing by > {TOL}: "
                f"{int(np.argmax(diff > TOL)) + 1}, max diff {diff.max():.3g}")
        else:
            assert diff.max() > 1e-4, f"rank {r}: a naive mapping matched ({diff.max():.3g})"


def test_sync_steps_as_derived(results):
    """Where the ranks agree (right after a sync) on both sides: PyTorch after steps 1..W+1 and
    W+1+kH; ours the same with ``warmup_steps = W + 1`` (and ours counts the syncs)."""
    theirs, ours = results
    for cfg in TORCH_CONFIGS:
        if cfg["momentum"]:
            continue
        W, H = cfg["W"], cfg["H"]
        expected = [t for t in range(1, STEPS + 1) if t <= W + 1 or (t - W - 1) % H == 0]
        same = [t for t in range(1, STEPS + 1)
                if np.array_equal(theirs[0][cfg["id"]][t - 1], theirs[1][cfg["id"]][t - 1])]
        assert same == expected, (cfg["id"], same)
    st = ours[0]["w5h4"]["stats"]
    assert st["warmup_steps_done"] == 6 and st["syncs"] == (STEPS - 6) // 4
