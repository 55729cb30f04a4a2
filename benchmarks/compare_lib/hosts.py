"""Two hosts for the main job (``compare.py --hosts 2xK``): scripts/hosts.sh's test bed (network
namespaces hostA 10.77.0.1 and hostB 10.77.0.2, an sshd each, their link capped with
``tc ... tbf`` at ``--rate``; a host's own ranks talk over its uncapped loopback), brought up for
the run and always torn down (explicitly, at exit and on SIGINT/SIGTERM/SIGHUP, via
``bandwidth.remove_on_exit``). Same interface as ``bandwidth.BandwidthCap``: ``apply()`` ->
status, ``remove()``, ``prefix()`` (what the launcher's command starts with), plus what
horovodrun needs to place K ranks on each host."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from .config import ROOT

HOSTS_SH = ROOT / "scripts" / "hosts.sh"
HOST_NAMES = ("hostA", "hostB")  # what hosts.sh makes; it makes exactly two
IFACE = "hl0"


def parse_hosts(spec: str) -> int:
    """'2x2' -> 2 (ranks per host). hosts.sh's bed has two hosts."""
    m = re.fullmatch(r"\s*2\s*x\s*(\d+)\s*", spec or "")
    if not m or int(m.group(1)) < 1:
        raise SystemExit(f"--hosts: expected 2xK (two hosts, K ranks each, e.g. 2x2); got "
                         f"{spec!r} (scripts/hosts.sh's test bed has two hosts)")
    return int(m.group(1))


class TwoHostBed:
    """``scripts/hosts.sh up`` with this run's own prefix (so a concurrent test bed is left
    alone) and the link rate; ``remove()`` = ``hosts.sh down`` (kills whatever still runs in the
    namespaces). ``rate`` None (``--rate none``): the bed's tbf qdiscs are deleted after ``up``
    (an uncapped veth)."""

    def __init__(self, rate: str | None, rate_bits: float | None, per_host: int) -> None:
        self.rate, self.rate_bits, self.per_host = rate, rate_bits, per_host
        self.prefix_name = f"hlcmp{os.getpid() % 100000}"
        self.up_done = False
        self.status = {"requested_rate": rate or "none", "applied": False,
                       "where": None, "command": None, "message": "", "two_host": True,
                       "hosts": [f"{h}:{per_host}" for h in HOST_NAMES],
                       "hosts_prefix": self.prefix_name}

    # -- what the launcher uses --
    def env(self) -> dict:
        return {"HL_HOSTS_PREFIX": self.prefix_name, "HL_HOSTS_RATE": self.rate or "1gbit"}

    def prefix(self) -> list[str]:
        # the launcher runs on the first host, as on a cluster; hostA's ranks are reached by ssh
        return ["bash", str(HOSTS_SH), "exec", HOST_NAMES[0]]

    def horovodrun_hosts(self) -> str:
        return ",".join(f"{h}:{self.per_host}" for h in HOST_NAMES)

    @property
    def np(self) -> int:
        return len(HOST_NAMES) * self.per_host

    # -- up / down --
    def _hosts(self, cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(HOSTS_SH), cmd], env={**os.environ, **self.env()},
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def apply(self) -> dict:
        missing = [] if os.geteuid() == 0 else [f"root (uid is {os.geteuid()})"]
        missing += [t for t in ("ip", "tc", "ssh", "ssh-keygen", "unshare") if not shutil.which(t)]
        if not os.access("/usr/sbin/sshd", os.X_OK):
            missing.append("/usr/sbin/sshd (apt-get install openssh-server)")
        if missing:
            raise SystemExit("--hosts: the two-host test bed (scripts/hosts.sh) needs "
                             + ", ".join(missing))
        self.up_done = True  # from here on remove() runs hosts.sh down, even after a failed up
        r = self._hosts("up")
        if r.returncode != 0:
            raise SystemExit(f"--hosts: scripts/hosts.sh up failed:\n{r.stdout}{r.stderr}")
        where = (f"inter-host veths of the test bed ({self.prefix_name}-a/-b, both ends of both "
                 f"veths); intra-host traffic on each host's own loopback, uncapped")
        if self.rate is None:
            for ns, dev in ((f"{self.prefix_name}-a", IFACE), (f"{self.prefix_name}-b", IFACE),
                            (f"{self.prefix_name}-br", "a0"), (f"{self.prefix_name}-br", "b0")):
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev,
                                "root"], capture_output=True, text=True)
            self.status.update(where=where, message="two hosts, inter-host link uncapped "
                                                    "(--rate none)")
        else:
            self.status.update(applied=True, where=where,
                               command=f"HL_HOSTS_RATE={self.rate} scripts/hosts.sh up (tc qdisc "
                                       f"... tbf rate {self.rate} burst 256kb latency 50ms)",
                               message=f"two hosts x {self.per_host} ranks (scripts/hosts.sh); "
                                       f"inter-host link capped at {self.rate} each way, "
                                       f"intra-host uncapped")
        st = self._hosts("status", timeout=60)
        self.status["bed_status"] = st.stdout
        if st.returncode != 0:
            raise SystemExit(f"--hosts: scripts/hosts.sh status failed:\n{st.stdout}{st.stderr}")
        return self.status

    def remove(self) -> None:
        if self.up_done:
            self.up_done = False
            try:
                r = self._hosts("down", timeout=60)
                if r.returncode != 0:
                    print(f"[compare] WARNING: scripts/hosts.sh down failed ({r.stderr.strip()}); "
                          f"run: HL_HOSTS_PREFIX={self.prefix_name} bash scripts/hosts.sh down",
                          flush=True)
            except Exception as e:  # pragma: no cover
                print(f"[compare] WARNING: scripts/hosts.sh down: {e!r}; run: "
                      f"HL_HOSTS_PREFIX={self.prefix_name} bash scripts/hosts.sh down",
                      flush=True)


def bed_is_gone(prefix: str) -> bool:
    """True when no namespace of the bed ``prefix`` is left (for the tests)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = {ln.split()[0] for ln in out.splitlines() if ln.split()}
    return not any(n.startswith(prefix + "-") for n in names) and \
        not Path(f"/tmp/hl-hosts-{prefix}").exists()
