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

from .bandwidth import BandwidthCap
from .config import ROOT

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


def launch_task(task: str, tcfg: dict, args, cap: BandwidthCap, out: Path) -> dict | None:
    run_dir = out / "logs"
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path = run_dir / f"{task}.result.json"
    if result_path.exists():
        result_path.unlink()
    cfg = {"task": task, "steps": tcfg["steps"], "eval_every": tcfg["eval_every"],
           "methods": tcfg["methods"], "seed": args.seed, "result_path": str(result_path),
           "extend": tcfg.get("extend", 0.0) if args.extend is None else args.extend,
           "repeats": args.repeats}
    cfg_path = run_dir / f"{task}.config.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    cmd = [*cap.prefix(), horovodrun_exe(), "-np", str(args.np), "-H", f"localhost:{args.np}",
           "--gloo", "--network-interfaces", "lo",
           sys.executable, str(ENTRY), "--worker", str(cfg_path)]
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONUNBUFFERED="1", HOROVOD_GLOO_IFACE="lo",
               PYTHONPATH=os.pathsep.join(x for x in [str(ROOT), env.get("PYTHONPATH")] if x))
    log_path = run_dir / f"{task}.log"
    print(f"[compare] {task}: {len(tcfg['methods'])} methods x {tcfg['steps']} steps on "
          f"{args.np} ranks; log: {log_path}", flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
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
    res["complete"] = rc == 0 and len(res["runs"]) == len(tcfg["methods"]) * args.repeats
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
