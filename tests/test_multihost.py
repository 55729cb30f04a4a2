"""Two "hosts" (network namespaces with their own sshd, a tc-capped link between them; see
scripts/hosts.sh) and a real ``horovodrun -np 4 -H hostA:2,hostB:2`` launched from hostA over
ssh, as on a cluster: DistributedLocalOptimizer's result equals the NumPy reference for 4
workers, and the ranks really ran on two hosts. Gloo and Open MPI.

Needs root, iproute2 (ip netns, tc) and openssh-server: without them the test FAILS with the
reason (CI is root), it does not skip."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from harness import ROOT, WORKERS, horovodrun
from reference import simulate

HOSTS_SH = ROOT / "scripts" / "hosts.sh"
PREFIX = f"hlmh{os.getpid() % 100000}"  # unique per pytest process: concurrent runs coexist
SGD = {"name": "sgd", "lr": 0.05}
SGD_M = {"name": "sgd", "lr": 0.05, "momentum": 0.9}
CONFIGS = [
    dict(id="local_sgd_H4", inner=SGD, schedule={"kind": "constant", "period": 4}, steps=40),
    dict(id="momentum_average_H4", inner=SGD_M, schedule={"kind": "constant", "period": 4},
         state_policy="average", steps=40),
]


def _env() -> dict:
    env = dict(os.environ, HL_HOSTS_PREFIX=PREFIX)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HOROVOD_LOCAL_TEST", "1")
    return env


def _hosts(cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(HOSTS_SH), cmd], env=_env(), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _missing() -> list[str]:
    missing = [] if os.geteuid() == 0 else [f"root (uid is {os.geteuid()})"]
    missing += [t for t in ("ip", "tc", "ssh", "ssh-keygen", "unshare") if not shutil.which(t)]
    if not os.access("/usr/sbin/sshd", os.X_OK):
        missing.append("/usr/sbin/sshd (apt-get install openssh-server)")
    return missing


@pytest.fixture(scope="module")
def hosts(request):
    missing = _missing()
    if missing:
        pytest.fail("the multi-host test bed needs " + ", ".join(missing), pytrace=False)
    request.addfinalizer(lambda: _hosts("down"))  # also after a failed up
    t0 = time.monotonic()
    up = _hosts("up")
    assert up.returncode == 0, f"scripts/hosts.sh up failed:\n{up.stdout}\n{up.stderr}"
    status = _hosts("status")
    assert status.returncode == 0, f"scripts/hosts.sh status:\n{status.stdout}\n{status.stderr}"
    assert "tbf" in status.stdout, status.stdout  # the inter-host link is capped
    print(f"test bed up in {time.monotonic() - t0:.1f} s\n{status.stdout}")
    return {"hostA": f"{PREFIX}-a", "hostB": f"{PREFIX}-b"}


def _run_job(controller: str, timeout: float = 150) -> list:
    with tempfile.TemporaryDirectory(prefix="hl-multihost-") as tmp:  # /tmp: shared by the hosts
        os.chmod(tmp, 0o755)
        with open(os.path.join(tmp, "payload.pkl"), "wb") as f:
            pickle.dump(CONFIGS, f)
        extra = ["--mpi-args=--mca oob_tcp_if_include hl0 --mca mpi_yield_when_idle 1"] \
            if controller == "mpi" else []
        # the launcher runs on hostA, the first node; hostA's own ranks are reached over ssh too
        cmd = ["bash", str(HOSTS_SH), "exec", "hostA", horovodrun(), "-np", "4",
               "-H", "hostA:2,hostB:2", f"--{controller}", "--network-interface", "hl0", *extra,
               sys.executable, str(WORKERS / "multihost_torch.py"), tmp]
        try:
            proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"horovodrun timed out after {timeout}s: {' '.join(cmd)}\n"
                                 f"{(e.stdout or '')[-4000:]}\n{(e.stderr or '')[-4000:]}")
        assert proc.returncode == 0, (f"horovodrun failed ({proc.returncode}): {' '.join(cmd)}\n"
                                      f"--- stdout\n{proc.stdout[-6000:]}\n"
                                      f"--- stderr\n{proc.stderr[-6000:]}")
        results = []
        for r in range(4):
            with open(os.path.join(tmp, f"rank{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_two_hosts_two_ranks_each(hosts, controller):
    ranks = _run_job(controller)
    # where the ranks ran: ranks 0,1 on hostA, 2,3 on hostB (Horovod fills -H in order)
    where = [r["_where"] for r in ranks]
    want_host = ["hostA", "hostA", "hostB", "hostB"]
    assert [w["netns"] for w in where] == [hosts[h] for h in want_host], where
    assert [w["hl0"] for w in where] == ["10.77.0.1"] * 2 + ["10.77.0.2"] * 2, where
    assert [w["hostname"] for w in where] == want_host, where
    assert all((w["size"], w["local_size"], w["cross_size"]) == (4, 2, 2) for w in where), where
    for cfg in CONFIGS:
        ref = simulate(4, cfg["steps"], inner=cfg["inner"], schedule=cfg["schedule"],
                       state_policy=cfg.get("state_policy", "keep"))
        assert ref["syncs"] >= 1
        for r in range(4):
            got = ranks[r][cfg["id"]]
            for name in ref["params"][r]:
                np.testing.assert_allclose(got["params"][name], ref["params"][r][name],
                                           rtol=1e-6, atol=1e-12,
                                           err_msg=f"{controller} {cfg['id']} rank {r}: {name}")
            assert got["stats"]["syncs"] == ref["syncs"]
            assert got["sync_steps"] == ref["sync_steps"][: len(got["sync_steps"])]
