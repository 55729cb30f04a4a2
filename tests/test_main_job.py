"""Smoke test of the main job's driver (benchmarks/compare.py) under a real horovodrun:
``--smoke`` = digits (torch: Horovod's DistributedOptimizer vs local SGD H=4) and digits_keras
(Keras 3: per-step gradient allreduce vs our Keras wrapper, H=8), 16 steps each, uncapped."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_compare_smoke(tmp_path):
    out = tmp_path / "res"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--smoke",
                           "--out", str(out)], cwd=str(ROOT), env=env, capture_output=True,
                          text=True, timeout=420, stdin=subprocess.DEVNULL)  # 2 launches
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for name in ("results.json", "results.md", "digits_metric.png", "digits_keras_metric.png",
                 "throughput_vs_H.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert res["bandwidth_cap"]["applied"] is False  # smoke runs uncapped
    tasks = {t["task"]: t for t in res["tasks"]}
    assert sorted(tasks) == ["digits", "digits_keras"]
    task = tasks["digits"]
    assert task["complete"]
    runs = {r["method"]: r for r in task["runs"]}
    hv, h4 = runs["Horovod"], runs["local SGD H=4"]
    steps = task["steps"]
    for r in (hv, h4):
        assert r["steps"] == steps
        assert math.isfinite(r["final_metric"]) and 0.0 <= r["final_metric"] <= 1.0
        assert r["final_metric"] > 0.5, r["final_metric"]  # 16 steps already learn digits
        assert r["train_wall_s"] > 0 and r["throughput_samples_s"] > 0
        assert len(r["curve"]) == steps // task["eval_every"] + 1
        assert r["comm_s"] >= 0 and r["comm_fraction"] <= 1.0
    assert hv["syncs"] == steps and hv["bytes_sent"] == hv["grad_bytes"] * steps
    assert h4["syncs"] == steps // 4
    assert h4["bytes_sent"] < hv["bytes_sent"]
    # one sync = parameters + 3 control elements (joined, round number, explicit) + the guard,
    # 4 bytes each (float32)
    assert h4["bytes_sent"] == h4["syncs"] * (h4["grad_bytes"] + 16)
    assert h4["sync_stats"]["bytes_per_step_allreduce"] == hv["bytes_sent"]
    assert "| Horovod |" in (out / "results.md").read_text()
    assert "Horovod's throughput" in proc.stdout

    # Keras 3: the same classifier, in one launch for both methods.
    kt = tasks["digits_keras"]
    assert kt["complete"] and kt["framework"] == "keras"
    assert "horovod.tensorflow.allreduce" in kt["baseline"]
    runs = {r["method"]: r for r in kt["runs"]}
    khv, k8 = runs["Horovod"], runs["local SGD H=8"]
    ksteps = kt["steps"]
    for r in (khv, k8):
        assert r["steps"] == ksteps and r["n_params"] == hv["n_params"]
        assert r["grad_bytes"] == hv["grad_bytes"]  # float32, same shapes as the torch MLP
        # the torch model's initial weights, copied: the same starting accuracy (up to a
        # near-tie flipped by float rounding)
        assert abs(r["initial_metric"] - hv["initial_metric"]) <= 0.01
        assert math.isfinite(r["final_metric"]) and r["final_metric"] > 0.5, r["final_metric"]
        assert r["train_wall_s"] > 0 and r["throughput_samples_s"] > 0
        assert len(r["curve"]) == ksteps // kt["eval_every"] + 1
        assert r["comm_s"] >= 0 and r["comm_fraction"] <= 1.0
    # same data, batches, start and SGD+momentum as torch: the same accuracy up to rounding
    # (at most a few of the 360 held-out images)
    assert abs(khv["final_metric"] - hv["final_metric"]) <= 0.02
    assert khv["syncs"] == ksteps and khv["bytes_sent"] == khv["grad_bytes"] * ksteps
    assert k8["syncs"] == ksteps // 8 < khv["syncs"]
    # one sync = the parameters + a few protocol elements: 1/8 of an allreduce every step
    assert 0 <= k8["bytes_sent"] / k8["syncs"] - k8["grad_bytes"] <= 64
    assert abs(k8["bytes_sent"] / khv["bytes_sent"] - 1 / 8) < 1e-3
    assert k8["sync_stats"]["bytes_per_step_allreduce"] == khv["bytes_sent"]
    assert "## digits_keras" in (out / "results.md").read_text()
    assert "[digits_keras] local SGD H=8:" in proc.stdout


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("tc") or not shutil.which("ip"),
                    reason="needs root, tc and ip")
def test_bandwidth_cap_netns_is_removed():
    """The cap goes on a private namespace's lo (never the host's) and is always taken off."""
    import compare

    host_before = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True,
                                 text=True).stdout
    cap = compare.BandwidthCap("1gbit", 1e9, "netns")
    try:
        st = cap.apply()
        if not st["applied"]:
            pytest.skip(f"network namespaces unavailable here: {st['message']}")
        name = cap.netns
        shown = subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "show", "dev", "lo"],
                               capture_output=True, text=True).stdout
        assert "tbf" in shown and "1Gbit" in shown
        assert cap.prefix() == ["ip", "netns", "exec", name]
    finally:
        cap.remove()
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                      text=True).stdout
    assert subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True,
                          text=True).stdout == host_before


def test_parse_rate():
    import compare

    assert compare.parse_rate("none") == (None, None)
    assert compare.parse_rate("1gbit") == ("1gbit", 1e9)
    assert compare.parse_rate("500mbit") == ("500mbit", 5e8)
    with pytest.raises(SystemExit):
        compare.parse_rate("fast")


def test_two_host_mode_parts():
    """--hosts 2xK: the argument, one launch per hvd.init() configuration (Horovod with
    HOROVOD_HIERARCHICAL_ALLREDUCE=1 and two-level averaging each in their own), and the
    two-host numbers (bytes each way over the link, bounds, equal-time readout) from a result.
    The runs themselves need the test bed and several launches (minutes): see BENCHMARKS.md."""
    from compare_lib.config import HOST_MODES, METHODS, TWO_HOST_METHODS
    from compare_lib.hosts import parse_hosts
    from compare_lib.launch import method_groups
    from compare_lib.report import derive, derive_two_host, two_host_table_md

    assert parse_hosts("2x2") == 2 and parse_hosts("2x1") == 1
    for bad in ("3x2", "2x0", "2", "x2"):
        with pytest.raises(SystemExit):
            parse_hosts(bad)
    assert HOST_MODES["quick"]["tasks"]["digits"]["methods"] == TWO_HOST_METHODS
    groups = method_groups(TWO_HOST_METHODS)
    assert [m for _, m in groups] == [["Horovod", "local SGD H=8", "no-comm (H=inf)"],
                                      ["Horovod hierarchical"], ["two-level H=8 L=1"]]
    assert groups[1][0]["env"] == {"HOROVOD_HIERARCHICAL_ALLREDUCE": "1"}
    assert [g["host_process_sets"] for g, _ in groups] == [False, False, True]
    assert [m for _, m in method_groups(["Horovod", "local SGD H=8"])] == \
        [["Horovod", "local SGD H=8"]]  # single-host modes: one launch, as before

    B = 1000

    def run(method, syncs, wall, curve, bytes_sent=None):
        return {"method": method, "spec": METHODS[method], "grad_bytes": B, "samples": 100,
                "syncs": syncs, "bytes_sent": bytes_sent if bytes_sent is not None else
                syncs * (B + 16), "train_wall_s": wall, "throughput_samples_s": 100 / wall,
                "final_metric": curve[-1][2], "curve": curve, "comm_s": 0.0,
                "comm_fraction": 0.0, "steps": 8, "loadavg_1min_end": 4.0,
                "sync_stats": {"local_syncs": 8} if "two-level" in method else None}

    task = {"higher_is_better": True, "metric_short": "acc", "runs": [
        run("Horovod", 8, 4.0, [[0, 0.0, 0.1], [8, 4.0, 0.9]], bytes_sent=8 * B),
        run("local SGD H=8", 1, 2.0, [[0, 0.0, 0.1], [8, 2.0, 0.8]]),
        run("two-level H=8 L=1", 1, 2.5, [[0, 0.0, 0.1], [8, 2.5, 0.85]]),
        run("no-comm (H=inf)", 1, 1.0, [[0, 0.0, 0.1], [8, 1.0, 0.7]])]}
    derive(task)
    derive_two_host(task, rate_bits=8e3)  # 1000 bytes/s
    hv, flat, two, nc = task["runs"]
    assert task["equal_time_s"] == 2.0  # the fastest syncing method
    assert hv["link_bytes_each_way"] == 8 * B and flat["link_bytes_each_way"] == B + 16
    assert hv["link_bound_s"] == 8.0 and hv["bound_throughput_samples_s"] == 100 / 9.0
    assert nc["nocomm_ratio"] == 1.0 and two["local_syncs"] == 8
    assert [m for _, m in two["metric_at_equal_times"]] == pytest.approx([0.25, 0.4, 0.7])
    assert flat["metric_at_equal_times"][-1][1] == 0.8
    table = two_host_table_md(task)
    assert "| two-level H=8 L=1 |" in table and "0.2500 / 0.4000 / 0.7000" in table
