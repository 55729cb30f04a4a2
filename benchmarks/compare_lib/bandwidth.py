"""The loopback bandwidth cap (``tc ... tbf``; Gloo talks TCP over ``lo``), on a private network
namespace's ``lo`` or the host's, and its removal: explicit, at exit and on SIGINT/SIGTERM/SIGHUP."""
from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def parse_rate(rate: str):
    """'1gbit' -> (tc string, bits/s); 'none' -> (None, None)."""
    if rate in (None, "", "none", "off"):
        return None, None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)bit", rate.strip().lower())
    if not m:
        raise SystemExit(f"--rate: expected e.g. 1gbit, 500mbit, 10gbit or none; got {rate!r}")
    bits = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    return rate.strip().lower(), bits


class BandwidthCap:
    """Puts ``tbf rate R burst B latency 50ms`` on a loopback and always takes it off again.

    Preferred: the ``lo`` of a private network namespace made for this run (the ranks run in it,
    nothing else on the machine is throttled). Fallback: the host's ``lo`` (only if its root
    qdisc is the default one: someone else's qdisc is left alone). Otherwise: uncapped."""

    def __init__(self, rate: str | None, rate_bits: float | None, isolation: str):
        self.rate, self.rate_bits, self.isolation = rate, rate_bits, isolation
        self.netns: str | None = None
        self.host_qdisc_ours = False
        self.status = {"requested_rate": rate or "none", "applied": False, "where": None,
                       "command": None, "message": ""}

    # -- helpers --
    def _tc_cmd(self) -> list[str]:
        # tbf's burst must cover rate/HZ; 256kb per Gbit (the documented 1gbit setting).
        burst_kb = max(256, int(round(256 * self.rate_bits / 1e9)))
        return ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", self.rate,
                "burst", f"{burst_kb}kb", "latency", "50ms"]

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    @staticmethod
    def _stale_netns_cleanup():
        r = _run(["ip", "netns", "list"])
        for line in r.stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            m = re.fullmatch(r"hl-bench-(\d+)", name)
            if m and not Path(f"/proc/{m.group(1)}").exists():
                _run(["ip", "netns", "del", name])

    def apply(self) -> dict:
        if self.rate is None:
            self.status["message"] = "uncapped (--rate none)"
            return self.status
        problems = []
        if os.geteuid() != 0:
            problems.append("not root")
        if not shutil.which("tc"):
            problems.append("`tc` not found (Debian: apt-get install iproute2)")
        if problems:
            return self._uncapped("; ".join(problems))
        if self.isolation in ("auto", "netns") and shutil.which("ip"):
            self._stale_netns_cleanup()
            name = f"hl-bench-{os.getpid()}"
            r = _run(["ip", "netns", "add", name])
            if r.returncode == 0:
                self.netns = name
                steps = [["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                         ["ip", "netns", "exec", name, *self._tc_cmd()]]
                err = None
                for c in steps:
                    r = _run(c)
                    if r.returncode != 0:
                        err = f"{' '.join(c)}: {r.stderr.strip()}"
                        break
                if err is None:
                    self.status.update(applied=True, where=f"lo of network namespace {name}",
                                       command=" ".join(self._tc_cmd()),
                                       message=f"capped at {self.rate} on the lo of a private "
                                               f"network namespace ({name})")
                    return self.status
                self.remove()
                problems.append(f"network namespace: {err}")
            else:
                problems.append(f"ip netns add failed: {r.stderr.strip()}")
            if self.isolation == "netns":
                return self._uncapped("; ".join(problems))
        # Host lo.
        cur = _run(["tc", "qdisc", "show", "dev", "lo"]).stdout.strip()
        root_lines = [ln for ln in cur.splitlines() if " root " in ln]
        if any(not ln.startswith("qdisc noqueue") for ln in root_lines):
            return self._uncapped("; ".join(problems + [
                f"a qdisc is already on the host's lo ({root_lines[0]}); it is someone else's "
                f"and is left alone (the runs see whatever it imposes)"]))
        r = _run(self._tc_cmd())
        if r.returncode != 0:
            return self._uncapped("; ".join(problems + [f"tc failed: {r.stderr.strip()}"]))
        self.host_qdisc_ours = True
        self.status.update(applied=True, where="host lo", command=" ".join(self._tc_cmd()),
                           message=f"capped at {self.rate} on the host's lo (all loopback "
                                   f"traffic on this machine is throttled while it runs)"
                                   + (f"; {'; '.join(problems)}" if problems else ""))
        return self.status

    def _uncapped(self, why: str) -> dict:
        self.status.update(applied=False, message=f"NOT capped ({why}); running uncapped")
        print(f"[compare] WARNING: bandwidth cap {self.rate} NOT applied: {why}. "
              f"Running uncapped; results.json records this.", flush=True)
        return self.status

    def remove(self) -> None:
        if self.netns:
            name, self.netns = self.netns, None
            _run(["ip", "netns", "exec", name, "tc", "qdisc", "del", "dev", "lo", "root"])
            _run(["ip", "netns", "del", name])
        if self.host_qdisc_ours:
            self.host_qdisc_ours = False
            cur = _run(["tc", "qdisc", "show", "dev", "lo"]).stdout
            if "tbf" in cur:
                r = _run(["tc", "qdisc", "del", "dev", "lo", "root"])
                if r.returncode != 0:
                    print(f"[compare] WARNING: could not remove the qdisc on lo: {r.stderr}. "
                          f"Remove it with: tc qdisc del dev lo root", flush=True)


def remove_on_exit(cap: BandwidthCap, stop_runs) -> None:
    """Takes ``cap`` off at interpreter exit and on SIGINT/SIGTERM/SIGHUP, calling ``stop_runs()``
    first (the ranks run inside the namespace that goes away)."""

    def cleanup(*_):
        stop_runs()
        cap.remove()

    atexit.register(cleanup)

    def on_signal(signum, frame):
        print(f"\n[compare] signal {signum}: stopping the runs and removing the bandwidth cap",
              flush=True)
        cleanup()
        sys.exit(128 + signum)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
