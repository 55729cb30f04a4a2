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
