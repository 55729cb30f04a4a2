"""Two "hosts" (network namespaces with their own sshd, a tc-capped link between them; see
scripts/hosts.sh) and a real ``horovodrun -np 4 -H hostA:2,hostB:2`` launched from hostA over
ssh, as on a cluster: DistributedLocalOptimizer's result equals the NumPy reference for 4
workers, and the ranks really ran on two hosts. Gloo and Open MPI.

Failures across the hosts (tests/workers/multihost_failure.py, one launch per controller shared
by the replica check and the killed rank, one more for the clean exit; 15-25 s each on an idle
2-core machine, up to 60 s on a busy one):
- the replica check: a rank on hostB built with another period, another on hostB with another
  layer shape: every rank, on both hosts, raises the ValueError naming the difference (Gloo, MPI);
- a rank on hostB SIGKILLs itself right after a sync: the job on hostA names it within 60 s.
  Gloo: horovodrun (on hostA) names "Process name: 2" 0.3-1.5 s after the kill: ssh
  returns at once when the remote rank dies, and the launcher then terminates the survivors,
  before their 3 s heartbeat watch could end (docs/SEMANTICS.md, "A lost rank"). MPI: mpirun
  (on hostA) says "process rank 2 ... on node hostB exited on signal 9", 2-3 s after;
- a rank on hostB leaves with status 0 without join(): a survivor's error names it as
  *finished* about 3 s later: its last heartbeat crossed to the rendezvous store on hostA (Gloo).
Elastic across the hosts (tests/workers/multihost_elastic.py, Gloo, 35-80 s): hostB removed,
added again and removed again by the discovery script; after every reset the replicas are
identical and have the new size. It cannot start on hostA alone (see
test_elastic_cannot_start_on_the_launcher_host_alone and docs/SEMANTICS.md, "Across hosts").

Needs root, iproute2 (ip netns, tc), unshare and openssh-server: without them every test here
is skipped, saying what is missing (`pytest -ra` lists the reason)."""
from __future__ import annotations

import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

from harness import ROOT, WORKERS, horovodrun
from reference import simulate

HOSTS_SH = ROOT / "scripts" / "hosts.sh"
PREFIX = f"hlmh{os.getpid() % 100000}"  # unique per pytest process: concurrent runs coexist
SGD = {"name": "sgd", "lr": 0.05}
SGD_M = {"name": "sgd", "lr": 0.05, "momentum": 0.9}
# Open MPI: its out-of-band channel on the hosts' link too; idle ranks yield (2 cores)
MPI_ARGS = "--mpi-args=--mca oob_tcp_if_include hl0 --mca mpi_yield_when_idle 1"
CONFIGS = [
    dict(id="local_sgd_H4", inner=SGD, schedule={"kind": "constant", "period": 4}, steps=40),
    dict(id="momentum_average_H4", inner=SGD_M, schedule={"kind": "constant", "period": 4},
         state_policy="average", steps=40),
    # two-level: groups found from the host names (one per namespace host), every step inside
    # a host, every 4 across; and the inter-host round overlapped and int8-compressed
    dict(id="two_level_by_host_L1_H4", inner=SGD_M, schedule={"kind": "constant", "period": 4},
         local_period=1, steps=26),
    dict(id="overlap_int8_H4", inner=SGD_M, schedule={"kind": "constant", "period": 4},
         overlap=True, compression="int8", final_sync=True, steps=26),
]
HOST_GROUPS = [[0, 1], [2, 3]]  # -H hostA:2,hostB:2


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
    if not missing:  # root, but maybe not allowed to make namespaces (a container without
        try:         # CAP_SYS_ADMIN): `ip netns add` would fail the same way
            probe = subprocess.run(["unshare", "--net", "--uts", "true"], capture_output=True,
                                   text=True, timeout=10, stdin=subprocess.DEVNULL)
            if probe.returncode != 0:
                missing.append(f"network namespaces (unshare --net: {probe.stderr.strip()})")
        except subprocess.TimeoutExpired:
            missing.append("network namespaces (unshare --net timed out)")
    return missing


@pytest.fixture(scope="module")
def hosts(request):
    missing = _missing()
    if missing:
        pytest.skip("the multi-host test bed needs " + ", ".join(missing))
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
        extra = [MPI_ARGS] if controller == "mpi" else []
        # the launcher runs on hostA, the first node: it starts hostA's ranks itself (their
        # address is local) and hostB's over ssh
        cmd = ["bash", str(HOSTS_SH), "exec", "hostA", horovodrun(), "-np", "4",
               "-H", "hostA:2,hostB:2", f"--{controller}", "--network-interface", "hl0", *extra,
               sys.executable, str(WORKERS / "multihost_torch.py"), tmp]
        try:
            proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            _kill_leftovers()
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
        kw = {k: cfg[k] for k in ("state_policy", "local_period", "overlap", "compression",
                                  "final_sync") if k in cfg}
        if "local_period" in cfg:
            kw["groups"] = HOST_GROUPS
        ref = simulate(4, cfg["steps"], inner=cfg["inner"], schedule=cfg["schedule"], **kw)
        assert ref["syncs"] >= 1
        for r in range(4):
            got = ranks[r][cfg["id"]]
            for name in ref["params"][r]:
                np.testing.assert_allclose(got["params"][name], ref["params"][r][name],
                                           rtol=1e-6, atol=1e-12,
                                           err_msg=f"{controller} {cfg['id']} rank {r}: {name}")
            assert got["stats"]["syncs"] == ref["syncs_per_rank"][r]
            # the worker records a round when it completes (overlap: one boundary later)
            done = [t for t in ref["complete_steps"] if t is not None]
            assert got["sync_steps"] == done[: len(got["sync_steps"])]
            if "local_period" in cfg:
                assert got["stats"]["local_syncs"] == ref["local_syncs"][r] > ref["syncs"]


# --------------------------------------------------------------------------------------------
# Failures across the hosts (workers/multihost_failure.py) and elastic (multihost_elastic.py)
# --------------------------------------------------------------------------------------------
NAMED_WITHIN_S = 60  # the requirement: a lost rank is named within 60 s of its death
HOST_OF = ["hostA", "hostA", "hostB", "hostB"]  # -H hostA:2,hostB:2
# Rank 2 (hostB) builds its wrapper with period 3, rank 3 (hostB) its layer with 3 outputs;
# then rank 2 kills itself at the start of step 9, right after the sync at step 8 (period 4).
KILL_PAYLOAD = {"replica": [{"id": "period", "rank": 2, "period": 3},
                            {"id": "shape", "rank": 3, "out": 3}],
                "fail": {"victim": 2, "at": 9, "how": "kill"}}
# Rank 3 (hostB) leaves with status 0 at step 9 without join(); the others sync at step 12.
EXIT_PAYLOAD = {"fail": {"victim": 3, "at": 9, "how": "exit"}}
PERIOD_DIFF = (r"ranks disagree on config 'schedule': rank 0 has \{[^}]*'period': 4\}, "
               r"rank 2 has \{[^}]*'period': 3\}")
SHAPE_DIFF = (r"ranks disagree on parameter 'weight': rank 0 has \(\(4, 6\), [^)]*\), "
              r"rank 3 has \(\(3, 6\), [^)]*\)")


def _tail(lines: list, n: int = 6000) -> str:
    return "\n".join(line for _, line in lines)[-n:]


def _kill_leftovers() -> None:
    """After a timed-out launch: SIGKILL every process in the hosts' namespaces but the sshds
    (horovodrun's workers run in sessions of their own, out of reach of the launch's kill)."""
    keep = set()
    for ns in (f"{PREFIX}-a", f"{PREFIX}-b"):
        try:
            with open(f"/tmp/hl-hosts-{PREFIX}/sshd-{ns}.pid") as f:
                keep.add(int(f.read().strip()))
        except (OSError, ValueError):
            pass
    for ns in (f"{PREFIX}-a", f"{PREFIX}-b"):
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                              timeout=10).stdout.split()
        for pid in {int(p) for p in pids} - keep:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _launch(args: list, timeout: float) -> tuple[int, list]:
    """Runs ``args`` on hostA (the launcher's node), stdout and stderr merged. Returns the exit
    status and the output as ``(time.time() when read, line)`` pairs, so that the test can tell
    when something was said. After ``timeout`` s it kills the launch (its session) and fails
    with the output so far, leaving the hosts' sshds alone."""
    cmd = ["bash", str(HOSTS_SH), "exec", "hostA", *map(str, args)]
    proc = subprocess.Popen(cmd, env=dict(_env(), PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, errors="replace",
                            start_new_session=True)
    lines: list = []

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _kill_leftovers()
        proc.wait(timeout=30)
        reader.join(timeout=5)
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{_tail(lines)}")
    reader.join(timeout=10)
    return rc, lines


def _failure_job(controller: str, payload: dict, timeout: float = 150) -> dict:
    """One ``horovodrun -np 4 -H hostA:2,hostB:2`` of workers/multihost_failure.py: its exit
    status, timed output and the files the ranks wrote (name -> unpickled)."""
    with tempfile.TemporaryDirectory(prefix="hl-multihost-") as tmp:  # /tmp: shared by the hosts
        os.chmod(tmp, 0o755)
        with open(os.path.join(tmp, "payload.pkl"), "wb") as f:
            pickle.dump(payload, f)
        extra = [MPI_ARGS] if controller == "mpi" else []
        t0 = time.monotonic()
        rc, lines = _launch([horovodrun(), "-np", "4", "-H", "hostA:2,hostB:2",
                             f"--{controller}", "--network-interface", "hl0", *extra,
                             sys.executable, WORKERS / "multihost_failure.py", tmp], timeout)
        files = {}
        for name in os.listdir(tmp):
            if name != "payload.pkl" and not name.startswith("."):
                with open(os.path.join(tmp, name), "rb") as f:
                    files[name] = pickle.load(f)
    return {"rc": rc, "lines": lines, "files": files, "wall": time.monotonic() - t0}


_JOBS: dict = {}


def _kill_job(controller: str) -> dict:
    """The replica-check + killed-rank launch, shared by two tests (run once per controller;
    a failure to launch is re-raised for the second test too, not run again)."""
    if controller not in _JOBS:
        try:
            _JOBS[controller] = _failure_job(controller, KILL_PAYLOAD)
        except AssertionError as e:
            _JOBS[controller] = e
    if isinstance(_JOBS[controller], AssertionError):
        raise _JOBS[controller]
    return _JOBS[controller]


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_replica_check_fails_every_rank_on_both_hosts(hosts, controller):
    """Ranks on hostB built differently: every rank (hostA's too) raises the ValueError naming
    the first difference, then the job goes on (no hang: the check is one allgather)."""
    job = _kill_job(controller)
    for r in range(4):
        got = job["files"].get(f"replica{r}.pkl")
        assert got is not None, f"rank {r} wrote no replica check result\n{_tail(job['lines'])}"
        assert got["_host"] == HOST_OF[r]
        for case, diff in (("period", PERIOD_DIFF), ("shape", SHAPE_DIFF)):
            err = got[case]["error"]
            assert err is not None, f"{controller} rank {r}: no ValueError for another {case}"
            assert err.startswith("horovod_local: ") and re.search(diff, err), (r, case, err)
    # ...and the same message on every rank
    assert len({repr(job["files"][f"replica{r}.pkl"]["period"]) for r in range(4)}) == 1
    assert len({repr(job["files"][f"replica{r}.pkl"]["shape"]) for r in range(4)}) == 1


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_rank_killed_on_hostB_is_named_on_hostA_within_60s(hosts, controller):
    """Rank 2 (hostB) SIGKILLs itself right after a sync; the others are then stuck in the next
    round. The launcher on hostA must name rank 2 within 60 s. Gloo: horovodrun's "first
    process to exit non-zero" (ssh returns 255 when the remote rank is killed by a signal; the
    survivors' heartbeat watch keeps them from exiting first). MPI: mpirun's own report."""
    job = _kill_job(controller)
    lines, out = job["lines"], _tail(job["lines"], 10**9)
    assert job["rc"] != 0, out[-4000:]
    killed = job["files"].get("killed_at")
    assert killed is not None, f"the victim never got to its kill\n{out[-4000:]}"
    assert killed["host"] == "hostB" and killed["syncs"] >= 1, killed
    if controller == "gloo":
        at = next((i for i, (_, line) in enumerate(lines[:-1])
                   if line == "Process name: 2" and re.fullmatch(r"Exit code: (255|137)",
                                                                 lines[i + 1][1])), None)
        assert at is not None, f"horovodrun did not name process 2 first\n{out[-4000:]}"
        assert "The first process to do so was:" in lines[at - 1][1], lines[at - 1]
        assert "Terminating remaining workers after failure of Process 2." in out
    else:
        at = next((i for i, (_, line) in enumerate(lines) if re.search(
            r"mpirun noticed that process rank 2 with PID \d+ on node hostB exited on signal 9 "
            r"\(Killed\)", line)), None)
        assert at is not None, f"mpirun did not name rank 2 on hostB\n{out[-4000:]}"
    named_after = lines[at][0] - killed["time"]
    print(f"{controller}: rank 2 (hostB) named {named_after:.2f} s after its kill "
          f"(launch {job['wall']:.1f} s): {lines[at][1]!r}")
    assert 0 <= named_after < NAMED_WITHIN_S, named_after


def test_rank_on_hostB_leaving_without_join_is_named_finished(hosts):
    """Rank 3 (hostB) leaves with status 0 without join() while the others train on: the
    launcher says nothing (status 0), a survivor's sync error names rank 3 as finished, from the
    last heartbeat rank 3 wrote into the rendezvous store on hostA. Gloo only (no store under
    mpirun)."""
    job = _failure_job("gloo", EXIT_PAYLOAD)
    lines, out = job["lines"], _tail(job["lines"], 10**9)
    assert job["rc"] != 0, out[-4000:]
    left = job["files"].get("killed_at")
    assert left is not None and left["host"] == "hostB" and left["syncs"] >= 1, left
    finished = re.compile(r"^\[(\d)\]<stderr>:horovod_local: the sync round at step 12 failed "
                          r"on rank \1: rank\(s\) \[3\] of \[0, 1, 2, 3\] finished \(their "
                          r"process exited normally\) while this rank was still training: a "
                          r"rank whose data ends must call join\(\)")
    named = [(t, int(m.group(1))) for t, line in lines if (m := finished.search(line))]
    assert named, f"no survivor named rank 3 as finished\n{out[-4000:]}"
    for r in range(3):  # what each survivor caught (a survivor may be terminated before)
        failed = job["files"].get(f"failed{r}.pkl")
        if failed is not None:
            assert failed["host"] == HOST_OF[r] and "rank(s) [3] of [0, 1, 2, 3] finished" \
                in failed["message"], failed
    named_after = named[0][0] - left["time"]
    by = sorted({f"{r} ({HOST_OF[r]})" for _, r in named})
    print(f"gloo: rank 3 (hostB) named finished {named_after:.2f} s after it left, by rank(s) "
          f"{', '.join(by)} (launch {job['wall']:.1f} s)")
    assert 0 <= named_after < NAMED_WITHIN_S, named_after


# Elastic: the discovery script prints the hosts file; it starts with both hosts (on hostA
# alone it cannot start, see the next test), then rank 0 rewrites it after steps 5, 10, 15.
ELASTIC_A, ELASTIC_AB = "hostA:2\n", "hostA:2\nhostB:2\n"
ELASTIC = {"steps": 20, "changes": [{"at": 5, "size": 4, "hosts": ELASTIC_A},     # remove hostB
                                    {"at": 10, "size": 2, "hosts": ELASTIC_AB},   # add it back
                                    {"at": 15, "size": 4, "hosts": ELASTIC_A}]}   # remove again
# (step, world size, the ranks' hosts) at each entry into the train function. Which host gets
# ranks 0-1 at the start is Horovod's choice (a set's order: either); after that the oldest
# host keeps the low ranks, so hostA's once hostB was removed
ELASTIC_ENTRIES = [(0, 4, ["hostA", "hostA", "hostB", "hostB"]), (5, 2, HOST_OF[:2]),
                   (10, 4, HOST_OF), (15, 2, HOST_OF[:2])]
# period 4, each reset starts a fresh round: (step, world size, the wrapper's n)
ELASTIC_SYNCS = [(4, 4, 4), (9, 2, 2), (14, 4, 4), (19, 2, 2)]


def _elastic_job(hosts_text: str, payload: dict, timeout: float, extra=()) -> dict:
    with tempfile.TemporaryDirectory(prefix="hl-multihost-elastic-") as tmp:
        os.chmod(tmp, 0o755)
        hosts_file, discover = os.path.join(tmp, "hosts"), os.path.join(tmp, "discover.sh")
        with open(hosts_file, "w") as f:
            f.write(hosts_text)
        with open(discover, "w") as f:
            f.write(f"#!/bin/sh\ncat '{hosts_file}'\n")
        os.chmod(discover, 0o755)
        with open(os.path.join(tmp, "payload.pkl"), "wb") as f:
            pickle.dump(dict(payload, hosts_file=hosts_file), f)
        t0 = time.monotonic()
        rc, lines = _launch([horovodrun(), "--gloo", "-np", "2", "--min-np", "2", "--max-np", "4",
                             "--host-discovery-script", discover, "--network-interface", "hl0",
                             *extra, sys.executable, WORKERS / "multihost_elastic.py", tmp],
                            timeout)
        files = {}
        for name in os.listdir(tmp):
            if name.startswith("rank") and name.endswith(".pkl"):
                with open(os.path.join(tmp, name), "rb") as f:
                    files[name] = pickle.load(f)
    return {"rc": rc, "lines": lines, "files": files, "wall": time.monotonic() - t0}


def test_elastic_removes_and_adds_hostB_with_local_torch_state(hosts):
    # --log-level INFO: the driver's log (resets, recorded failures, blacklisting) in the output
    job = _elastic_job(ELASTIC_AB, ELASTIC, timeout=240,
                       extra=("--elastic-timeout", "60", "--log-level", "INFO"))
    out = _tail(job["lines"], 10**9)
    assert job["rc"] == 0, f"elastic job failed ({job['rc']})\n{out[-6000:]}"
    # hostB's workers left through Horovod's removal (twice), not through a failure
    assert "hostB[0] has been removed from elastic job" in out, out[-4000:]
    assert sorted(job["files"]) == ["rank0.pkl", "rank1.pkl"], sorted(job["files"])
    ranks = [job["files"]["rank0.pkl"], job["files"]["rank1.pkl"]]
    for r, res in enumerate(ranks):
        assert (res["rank"], res["size"], res["host"], res["born_size"], res["born_host"]) == \
            (r, 2, "hostA", 4, "hostA")
        entries = res["entries"]
        got = [(e["step"], e["hvd_size"], e["hosts"] if e["step"] else sorted(e["hosts"]))
               for e in entries]
        assert got == ELASTIC_ENTRIES, out[-6000:]
        for e in entries:  # what sync() left after each reset: the new n, a fresh round,
            assert e["opt_size"] == e["hvd_size"] and e["local_steps"] == 0, e  # equal replicas
            rows = e["all_params"]
            assert rows.shape[0] == e["hvd_size"], e["step"]
            for row in rows[1:]:
                np.testing.assert_array_equal(row, rows[0], err_msg=f"step {e['step']}")
        assert res["syncs"] == ELASTIC_SYNCS
        np.testing.assert_array_equal(res["final"], ranks[0]["final"])
    # before each change (step 1 of a round) the replicas differed: the equal rows above are
    # sync()'s doing, not a coincidence
    for res in ranks:
        assert [b["step"] for b in res["before"]] == [5, 10, 15]
        for b in res["before"]:
            assert np.abs(b["all_params"] - b["all_params"][0]).max() > 1e-6, b["step"]
    times = [e["time"] for e in ranks[0]["entries"]]
    print(f"elastic: job {job['wall']:.1f} s; train entries at +"
          + ", +".join(f"{t - times[0]:.1f}" for t in times) + " s")


def test_elastic_cannot_start_on_the_launcher_host_alone(hosts):
    """Horovod 0.28.1: an elastic job whose first discovery lists only the launcher's own host
    takes the local path to choose the network interface: with --network-interface hl0 it looks
    for an hl0 holding 127.0.0.1 and fails; without, it waits for two hosts. So hostB cannot be
    *first* added to a job started on hostA alone (docs/SEMANTICS.md, "Across hosts")."""
    job = _elastic_job(ELASTIC_A, dict(ELASTIC, changes=[]), timeout=90,
                       extra=("--elastic-timeout", "10"))
    out = _tail(job["lines"], 10**9)
    assert job["rc"] != 0 and "No interface is found for address 127.0.0.1." in out, out[-4000:]
    assert not job["files"]
