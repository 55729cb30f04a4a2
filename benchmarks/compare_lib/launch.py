"""Launching one task's ranks under horovodrun (inside the cap's network namespace, if any),
the machine's description, and merging a task's repeats into one entry per method."""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from .config import METHODS, ROOT

ENTRY = Path(__file__).resolve().parent.parent / "compare.py"  # each rank runs it with --worker


def machine_info() -> dict:
    info = {"hostname": platform.node(), "platform": platform.platform(),
            "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
    except Exception:
        pass
    # Imported here: the driver needs none of them but their versions (a failure is recorded).
    try:
        import torch
        info["torch"] = torch.__version__
        import horovod
        info["horovod"] = horovod.__version__
        sys.path.insert(0, str(ROOT))
        import horovod_local
        import horovod_local.torch as hlt
        info["horovod_local"] = horovod_local.__version__
        info["horovod_local_backend"] = hlt.backend_info()
    except Exception as e:  # pragma: no cover
        info["import_error"] = repr(e)
    for dist in ("tensorflow", "keras"):  # versions only: importing TF here would cost ~5 s
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    info["loadavg_start"] = list(os.getloadavg())
    return info


def horovodrun_exe() -> str:
    exe = Path(sys.executable).with_name("horovodrun")
    return str(exe) if exe.exists() else (shutil.which("horovodrun") or "horovodrun")


_CHILD: list = []  # the running horovodrun, for kill_children()


def method_groups(methods: list[str]) -> list[tuple[dict, list[str]]]:
    """The methods split by what their ranks need at ``hvd.init()``: the environment
    (``METHODS[m]["env"]``) and, for two-level averaging, one process set per host. One
    horovodrun launch per group, in the order of first appearance; without such methods one
    group (one launch, as always). Returns [(launch settings, methods)]."""
    groups: list[tuple[dict, list[str]]] = []
    for m in methods:
        key = {"env": METHODS[m].get("env", {}),
               "host_process_sets": METHODS[m].get("local_period") is not None}
        for g_key, g_methods in groups:
            if g_key == key:
                g_methods.append(m)
                break
        else:
            groups.append((key, [m]))
    return groups


def launch_task(task: str, tcfg: dict, args, cap, out: Path) -> dict | None:
    """Runs every method of ``task``: one horovodrun launch per method group (see
    ``method_groups``), the runs merged into one result in the order of ``tcfg["methods"]``.
    ``cap`` is a ``BandwidthCap`` (ranks on this machine) or a ``hosts.TwoHostBed``.

    ``--repeats N`` with one group: the worker repeats the methods (as always). With several
    groups: N rounds of launches, every other round in reverse group and method order, each
    launch running its methods once, so that the medians of methods in different launches are
    taken over the same periods of the machine's load."""
    groups = method_groups(tcfg["methods"])
    rounds = args.repeats if len(groups) > 1 else 1
    launches, runs, complete, launched = [], [], True, 0
    for rep in range(rounds):
        order = list(enumerate(groups)) if rep % 2 == 0 else list(enumerate(groups))[::-1]
        for gi, (gkey, gmethods) in order:
            ms = gmethods if rep % 2 == 0 else gmethods[::-1]
            suffix = ("" if gi == 0 else f".{gi}") + (f".r{rep}" if rep else "")
            res = _launch_group(task, {**tcfg, "methods": ms}, args, cap, out, gkey, suffix,
                                repeats=args.repeats if rounds == 1 else 1)
            launched += 1
            if res is None:
                complete = False
                continue
            for r in res["runs"]:
                r["repeat"] = r.get("repeat", 0) + rep
            if not runs:
                base = res
            runs += res["runs"]
            complete = complete and res["complete"]
            launches.append({"methods": ms, **gkey, "round": rep,
                             "launcher_wall_s": res["launcher_wall_s"],
                             "returncode": res["returncode"],
                             "worker_startup_s": res.get("worker_startup_s")})
    if not runs:
        return None
    merged = base
    merged.update(runs=runs, complete=complete and len(launches) == launched, launches=launches,
                  launcher_wall_s=sum(x["launcher_wall_s"] for x in launches),
                  returncode=next((x["returncode"] for x in launches if x["returncode"]), 0))
    if rounds > 1:
        merge_repeats(merged)
    order = {m: i for i, m in enumerate(tcfg["methods"])}
    merged["runs"].sort(key=lambda r: order.get(r["method"], len(order)))
    return merged


def _launch_group(task: str, tcfg: dict, args, cap, out: Path, gkey: dict,
                  suffix: str, repeats: int) -> dict | None:
    genv = gkey["env"]
    run_dir = out / "logs"
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path = run_dir / f"{task}{suffix}.result.json"
    if result_path.exists():
        result_path.unlink()
    cfg = {"task": task, "steps": tcfg["steps"], "eval_every": tcfg["eval_every"],
           "methods": tcfg["methods"], "seed": args.seed, "result_path": str(result_path),
           "extend": tcfg.get("extend", 0.0) if args.extend is None else args.extend,
           "repeats": repeats}
    if gkey["host_process_sets"]:
        # horovodrun fills -H in order: ranks [0, K) on the first host, [K, 2K) on the second
        # (the worker checks this against the ranks' host names)
        per_host = getattr(cap, "per_host", None) or args.np
        cfg["host_process_sets"] = [list(range(i, i + per_host))
                                    for i in range(0, args.np, per_host)]
    cfg_path = run_dir / f"{task}{suffix}.config.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(x for x in [str(ROOT), env.get("PYTHONPATH")] if x))
    two_host = hasattr(cap, "horovodrun_hosts")
    if two_host:
        # Launched from hostA over ssh (scripts/hosts.sh's bed); the ranks' traffic to the other
        # host leaves by hl0, to their own host it stays on that host's loopback / shared memory.
        controller = getattr(args, "controller", "gloo")
        np_ = cap.np
        hosts = ["-H", cap.horovodrun_hosts(), f"--{controller}", "--network-interface", "hl0"]
        if controller == "mpi":
            # (horovodrun adds btl_tcp_if_include hl0 itself.) 2K ranks on few cores: waiting
            # MPI ranks must yield the CPU, not spin.
            hosts.append("--mpi-args=--mca oob_tcp_if_include hl0 --mca mpi_yield_when_idle 1")
        env.update(cap.env())
    else:
        np_ = args.np
        hosts = ["-H", f"localhost:{np_}", "--gloo", "--network-interfaces", "lo"]
        env.update(HOROVOD_GLOO_IFACE="lo")
    env.update(genv)
    cmd = [*cap.prefix(), horovodrun_exe(), "-np", str(np_), *hosts,
           sys.executable, str(ENTRY), "--worker", str(cfg_path)]
    log_path = run_dir / f"{task}{suffix}.log"
    print(f"[compare] {task}: {len(tcfg['methods'])} methods x {tcfg['steps']} steps on "
          f"{np_} ranks" + (f" ({cap.horovodrun_hosts()}, {controller})" if two_host else "")
          + (f" with {' '.join(f'{k}={v}' for k, v in genv.items())}" if genv else "")
          + f"; log: {log_path}", flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(f"{k}={shlex.quote(v)}" for k, v in genv.items())
                  + (" " if genv else "") + " ".join(shlex.quote(c) for c in cmd) + "\n")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, bufsize=1,
                                start_new_session=True, cwd=str(ROOT))
        _CHILD.append(proc)
        try:
            for line in proc.stdout:
                log.write(line)
                m = re.search(r"(PROGRESS|DONE) (.*)$", line)
                if m:
                    print(("  " if m.group(1) == "PROGRESS" else "  => ") + m.group(2),
                          flush=True)
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc = -9
        finally:
            _CHILD.remove(proc)
    wall = time.time() - t0
    if rc != 0:
        tail = log_path.read_text().splitlines()[-25:]
        print(f"[compare] {task}: horovodrun exited with {rc}; last lines of {log_path}:\n  "
              + "\n  ".join(tail), flush=True)
    if not result_path.exists():
        return None
    res = json.loads(result_path.read_text())
    res["launcher_wall_s"] = wall
    res["returncode"] = rc
    res["complete"] = rc == 0 and len(res["runs"]) == len(tcfg["methods"]) * repeats
    merge_repeats(res)
    return res


def merge_repeats(res: dict) -> None:
    """One entry per method: repeat 0's run (curves, metrics, bytes); with repeats, its timing
    fields become the median over the repeats and every repeat's timing is kept."""
    by = {}
    for r in res["runs"]:
        by.setdefault(r["method"], []).append(r)
    merged = []
    for rs in by.values():
        rs.sort(key=lambda r: r.get("repeat", 0))
        first = dict(rs[0])
        if len(rs) > 1:
            first["repeats"] = [{k: r[k] for k in ("repeat", "train_wall_s",
                                                  "throughput_samples_s", "comm_s",
                                                  "cpu_s_rank0", "loadavg_1min_end",
                                                  "final_metric")} for r in rs]
            first["rep0_train_wall_s"] = first["train_wall_s"]
            for k in ("train_wall_s", "comm_s", "cpu_s_rank0", "loadavg_1min_end"):
                first[k] = statistics.median(r[k] for r in rs)
            first["throughput_samples_s"] = first["samples"] / first["train_wall_s"]
            first["comm_fraction"] = first["comm_s"] / first["train_wall_s"]
        merged.append(first)
    res["runs"] = merged
    res["repeats"] = max((len(v) for v in by.values()), default=1)


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_children() -> None:
    """Stops the running launch, if any (on exit or a signal)."""
    for p in list(_CHILD):
        _kill(p)
