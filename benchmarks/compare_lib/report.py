"""Derived numbers (speed-ups, time to target, equal-time metric), the markdown tables, the plots
and the summary lines of a comparison's results."""
from __future__ import annotations

from pathlib import Path

from .config import ADPSGD_SAMPLING_FRACTION


def time_to_target(curve, target, higher):
    """First (wall s, step) at which the curve reaches ``target``, else None."""
    for step, wall, metric in curve:
        if (metric >= target) if higher else (metric <= target):
            return wall, step
    return None


def curve_at(curve, wall):
    """The metric of ``curve`` at training time ``wall`` (linear between evaluations; the final
    value after its end)."""
    for (s0, w0, m0), (s1, w1, m1) in zip(curve, curve[1:]):
        if w0 <= wall <= w1:
            return m0 + (m1 - m0) * ((wall - w0) / (w1 - w0) if w1 > w0 else 1.0)
    return curve[-1][2] if wall > curve[-1][1] else curve[0][2]


def derive(task_res: dict) -> None:
    runs = task_res["runs"]
    hv = next((r for r in runs if r["spec"]["kind"] == "horovod"), None)
    higher = task_res["higher_is_better"]
    for r in runs:
        r["speedup_vs_horovod"] = (r["throughput_samples_s"] / hv["throughput_samples_s"]
                                   if hv else None)
        r["bytes_ratio_vs_horovod"] = r["bytes_sent"] / hv["bytes_sent"] if hv else None
        if hv:
            tt = time_to_target(r["curve"], hv["final_metric"], higher)
            r["target_metric"] = hv["final_metric"]
            r["time_to_target_s"] = tt[0] if tt else None
            r["step_to_target"] = tt[1] if tt else None
            # Equal-time comparison: where Horovod's own curve was after this method's wall time.
            r["horovod_metric_at_same_time"] = curve_at(
                hv["curve"], r.get("rep0_train_wall_s", r["train_wall_s"]))
    if hv and hv.get("time_to_target_s"):
        for r in runs:
            r["time_to_target_speedup"] = (hv["time_to_target_s"] / r["time_to_target_s"]
                                           if r.get("time_to_target_s") else None)


EQUAL_TIME_FRACTIONS = (0.25, 0.5, 1.0)


def derive_two_host(task_res: dict, rate_bits: float | None) -> None:
    """Two hosts: per run, the bytes that must cross the inter-host link (each direction), the
    bytes/bandwidth bound on throughput, the share of the no-comm bound, and every method's
    metric at one equal wall time ``T_eq`` (the fastest syncing method's training time)."""
    runs = task_res["runs"]
    nc = next((r for r in runs if r["spec"].get("period") == "never"), None)
    syncing = [r for r in runs if r["spec"].get("period") != "never"]
    # curves are the first repeat's: so is T (with --repeats the wall s columns are medians)
    t_eq = min((r.get("rep0_train_wall_s", r["train_wall_s"]) for r in syncing), default=None)
    task_res["equal_time_s"] = t_eq
    for r in runs:
        # Any allreduce between two hosts must carry at least one payload each way (a host
        # needs the other host's partial sum of every element): global rounds x payload bytes.
        # Local rounds stay inside a host. Horovod: gradient bytes every step.
        payload = r["grad_bytes"] if r["spec"]["kind"] == "horovod" else \
            r["bytes_sent"] / max(1, r["syncs"])
        r["link_bytes_each_way"] = r["syncs"] * payload
        r["link_bound_s"] = r["link_bytes_each_way"] * 8 / rate_bits if rate_bits else 0.0
        r["nocomm_ratio"] = (r["throughput_samples_s"] / nc["throughput_samples_s"]
                             if nc else None)
        if nc:
            bound_wall = nc["train_wall_s"] + r["link_bound_s"]
            r["bound_throughput_samples_s"] = r["samples"] / bound_wall
            r["bound_ratio"] = r["throughput_samples_s"] / r["bound_throughput_samples_s"]
        st = r.get("sync_stats") or {}
        r["local_syncs"] = st.get("local_syncs", 0)
        r["metric_at_equal_time"] = curve_at(r["curve"], t_eq) if t_eq else None
        # the same read earlier too: a saturating metric (digits) differs early, not at T
        r["metric_at_equal_times"] = ([[f * t_eq, curve_at(r["curve"], f * t_eq)]
                                       for f in EQUAL_TIME_FRACTIONS] if t_eq else None)


def two_host_table_md(task_res: dict) -> str:
    short = task_res["metric_short"]
    t_eq = task_res.get("equal_time_s")
    lines = [f"| method | allreduce run | final {short} (equal steps) | wall s | samples/s | "
             f"vs Horovod | vs no-comm | vs link bound | global syncs | local rounds | "
             f"link MB each way | comm s | comm % | {short} at "
             + " / ".join(f"{f * (t_eq or 0):.1f}" for f in EQUAL_TIME_FRACTIONS)
             + " s (equal wall time) | load |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def x(v, pct=False):
        return "" if v is None else (f"{100 * v:.0f}%" if pct else f"{v:.2f}x")

    for r in task_res["runs"]:
        ops = ", ".join(r.get("allreduce_ops") or []) or \
            ("ours (one fused allreduce per round)" if r["spec"]["kind"] == "local" else "?")
        hm = r.get("metric_at_equal_times")
        lines.append(
            f"| {r['method']} | {ops} | {fmt_metric(r['final_metric'], short)} | "
            f"{r['train_wall_s']:.1f} | {r['throughput_samples_s']:.0f} | "
            f"{x(r.get('speedup_vs_horovod'))} | {x(r.get('nocomm_ratio'), True)} | "
            f"{x(r.get('bound_ratio'), True)} | {r['syncs']} | {r.get('local_syncs', 0)} | "
            f"{r['link_bytes_each_way'] / 1e6:.1f} | {r['comm_s']:.1f} | "
            f"{100 * r['comm_fraction']:.0f}% | "
            f"{'' if hm is None else ' / '.join(fmt_metric(m, short) for _, m in hm)} | "
            f"{r.get('loadavg_1min_end', float('nan')):.1f} |")
    return "\n".join(lines)


TWO_HOST_NOTES = " ".join([
    "Two hosts: allreduce run = the op Horovod's timeline shows for a gradient-sized",
    "allreduce at the start of the run (HOROVOD_TIMELINE=DYNAMIC; a hierarchical allreduce",
    "would show as *HIERARCHICAL_ALLREDUCE); vs no-comm = this throughput / the no-comm run's",
    "(the compute bound); vs link bound = this throughput / samples over (no-comm wall s +",
    "link MB each way x 8 / rate), where link MB each way = global rounds x payload (the least",
    "any allreduce between two hosts must carry each way: each host needs the other's partial",
    "sum of every element; Horovod: gradient bytes every step; local rounds stay in a host);",
    "a flat ring over 2x2 ranks carries 1.5x that; comm s = time in sync rounds (ours: both",
    "levels) or in Horovod's synchronize(); metric at T/4 / T/2 / T = each curve read at the",
    "same training times (equal wall time; linear between evaluations, the final value after",
    "a run's end), T = the fastest syncing method's wall s; load = 1-min",
    "load average at the run's end (the 4 ranks alone make about 4 on 2 cores)."])


def oc_table_md(task_res: dict) -> str:
    """Overlapped / compressed syncs (compare.py --overlap-compression, or any run with such a
    method): throughput against Horovod's per-step allreduce and the no-comm bound, bytes against
    flat local SGD H=8's, and the final metric against H=8's."""
    runs = task_res["runs"]
    short = task_res["metric_short"]
    hv = next((r for r in runs if r["spec"]["kind"] == "horovod"), None)
    nc = next((r for r in runs if r["spec"].get("period") == "never"), None)
    h8 = next((r for r in runs if r["method"] == "local SGD H=8"), None)
    lines = [f"| method | samples/s | vs Horovod | vs no-comm | syncs | MB sent/rank | "
             f"MB vs H=8 | comm s | final {short} | {short} - H=8's |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ratio(a, b, fmt="{:.2f}x"):
        return fmt.format(a / b) if b else ""

    for r in runs:
        lines.append(
            f"| {r['method']} | {r['throughput_samples_s']:.0f} | "
            f"{ratio(r['throughput_samples_s'], hv and hv['throughput_samples_s'])} | "
            f"{ratio(r['throughput_samples_s'], nc and nc['throughput_samples_s'])} | "
            f"{r['syncs']} | {r['bytes_sent'] / 1e6:.1f} | "
            f"{ratio(r['bytes_sent'], h8 and h8['bytes_sent'], '{:.3f}')} | "
            f"{r['comm_s']:.1f} | {fmt_metric(r['final_metric'], short)} | "
            + (f"{r['final_metric'] - h8['final_metric']:+.4f}" if h8 else "") + " |")
    return "\n".join(lines)


def fmt_metric(v, short):
    return f"{v:.4f}" if short == "acc" else f"{v:.3f}"


def table_md(task_res: dict) -> str:
    short = task_res["metric_short"]
    lines = [f"| method | final {short} | wall s | samples/s | speedup vs Horovod | syncs | "
             f"MB sent | comm s | comm % | time to Horovod's final {short} (s) | "
             f"Horovod's {short} at this wall time | load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in task_res["runs"]:
        sp = r.get("speedup_vs_horovod")
        tt = r.get("time_to_target_s")
        tts = r.get("time_to_target_speedup")
        hm = r.get("horovod_metric_at_same_time")
        ext = r.get("steps_run", r["steps"]) > r["steps"]
        if "target_metric" not in r:
            tt_s = "n/a (no Horovod run)"
        elif tt is None:
            tt_s = "not reached" + (f" in {r['steps_run']} steps" if ext else "")
        else:
            extra = [f"{tts:.2f}x"] if tts else []
            if r.get("step_to_target", 0) > r["steps"]:
                extra.append(f"step {r['step_to_target']}")
            tt_s = f"{tt:.1f}" + (f" ({', '.join(extra)})" if extra else "")
        lines.append(
            f"| {r['method']} | {fmt_metric(r['final_metric'], short)} | "
            f"{r['train_wall_s']:.1f} | {r['throughput_samples_s']:.0f} | "
            f"{'' if sp is None else f'{sp:.2f}x'} | {r['syncs']} | "
            f"{r['bytes_sent'] / 1e6:.1f} | {r['comm_s']:.1f} | "
            f"{100 * r['comm_fraction']:.0f}% | {tt_s} | "
            f"{'' if hm is None else fmt_metric(hm, short)} | "
            f"{r.get('loadavg_1min_end', float('nan')):.1f} |")
    return "\n".join(lines)


def write_markdown(results: dict, path: Path) -> str:
    cap = results["bandwidth_cap"]
    parts = [f"# horovod-local vs Horovod: {results['mode']} run",
             "",
             f"- date: {results['date']}",
             f"- command: `{results['command']}`",
             f"- bandwidth: {cap['message']}",
             f"- machine: {results['machine'].get('cpu_model', '?')}, "
             f"{results['machine'].get('cpus')} CPUs; torch {results['machine'].get('torch')}, "
             f"tensorflow {results['machine'].get('tensorflow')}, keras "
             f"{results['machine'].get('keras')}, "
             f"horovod {results['machine'].get('horovod')}; horovod-local backend (torch): "
             f"{results['machine'].get('horovod_local_backend')}",
             f"- load average at start / end: {results['machine'].get('loadavg_start')} / "
             f"{results['machine'].get('loadavg_end')}",
             ""]
    if results.get("hosts"):
        parts[-1:] = [f"- hosts: `horovodrun -np {results['np']} -H {results['hosts']} "
                      f"--{results['controller']} --network-interface hl0` launched on hostA "
                      f"(scripts/hosts.sh's test bed)", ""]
    for line in results.get("skipped_methods") or []:
        parts[-1:] = [f"- not run: {line}", ""]
    for t in results["tasks"]:
        tc = t["task_config"]
        nparams = t["runs"][0]["n_params"] if t["runs"] else "?"
        fw = t.get("framework", "torch")
        parts += [f"## {t['task']}: {t['metric_name']} ({t['size']} ranks, {t['steps']} steps, "
                  f"batch {tc.get('batch_per_rank')}/rank, {nparams} parameters"
                  + (", Keras 3" if fw == "keras" else "") + ")", ""]
        if fw == "keras":
            parts += [f"Keras 3 custom loop (`tf.function` steps); ours: "
                      f"`horovod_local.tensorflow.keras.DistributedLocalOptimizer`; \"Horovod\" "
                      f"here: {t.get('baseline')}. Same data, batches, initial weights and "
                      f"hyper-parameters as the torch `digits` task.", ""]
        if t.get("repeats", 1) > 1:
            parts += [f"Timing columns (wall s, samples/s, speedup, comm s, comm %, load) are the "
                      f"median of {t['repeats']} repeats run in alternating order; metrics, "
                      f"curves and the time-to-target columns come from the first repeat.", ""]
        if not t.get("complete", True):
            parts += ["**Incomplete: the launch failed part-way; see logs/.**", ""]
        if "equal_time_s" in t:
            parts += [two_host_table_md(t), ""]
        else:
            parts += [table_md(t), ""]
        if any(r["spec"].get("overlap") or r["spec"].get("compression") for r in t["runs"]):
            parts += ["Overlapped rounds and compressed syncs (MB sent/rank: what this rank "
                      "handed to the collective: fp16 2 bytes an element by allreduce, int8 1 "
                      "byte an element + a 4-byte scale per 256 by allgather; the final "
                      "average_parameters() included):", "", oc_table_md(t), ""]
    if any("equal_time_s" in t for t in results["tasks"]):
        parts += [TWO_HOST_NOTES, ""]
    parts += [" ".join([
        "wall s = training time on rank 0 between a start barrier and the end (evaluation",
        "excluded; the final sync included); samples/s = samples over both ranks / wall s;",
        "MB sent = payload bytes this rank handed to allreduce (Horovod: gradient bytes x",
        "steps); comm s = time in sync rounds (Horovod: inside optimizer.synchronize(); Keras",
        "task: inside the gradient allreduce), which",
        "includes waiting for the slower rank; time to target = training time until the first",
        "evaluation at or better than Horovod's final metric (x: Horovod's time / this; local",
        "methods may go on past the equal-step budget for this column only, up to the step",
        "shown); Horovod's metric at this wall time = Horovod's curve read at this method's",
        "wall s (equal-time comparison); load = 1-min load average at the end of the run (the",
        "2 ranks alone make about 2; more means other work on the machine competed for its",
        "cores)."]), ""]
    text = "\n".join(parts)
    path.write_text(text)
    return text


def make_plots(results: dict, out: Path) -> list[str]:
    # Imported here: a missing or broken matplotlib must only cost the plots (see driver_main).
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    files = []
    rate = results["bandwidth_cap"]["requested_rate"] if results["bandwidth_cap"]["applied"] \
        else "uncapped"
    where = (f"2 hosts ({results['hosts']}, {results.get('controller', 'gloo')}), inter-host "
             f"link {rate}" if results.get("hosts")
             else f"loopback {rate}")
    styles = {}

    def style(label):
        if label not in styles:
            if label == "Horovod":
                styles[label] = dict(color="black", lw=2.2, ls="-")
            elif label.startswith("no-comm"):
                styles[label] = dict(color="grey", lw=1.6, ls=":")
            else:
                cmap = plt.get_cmap("tab10")
                styles[label] = dict(color=cmap(len(styles) % 10), lw=1.5,
                                     ls="--" if "AdaAlter" in label else "-")
        return styles[label]

    for t in results["tasks"]:
        fig, axes = plt.subplots(1, 2, figsize=(13.5, 4.6))
        for r in t["runs"]:
            c = r["curve"]
            axes[0].plot([x[1] for x in c], [x[2] for x in c], marker="o", ms=3,
                         label=r["method"], **style(r["method"]))
            axes[1].plot([x[0] for x in c], [x[2] for x in c], marker="o", ms=3,
                         label=r["method"], **style(r["method"]))
        axes[1].axvline(t["steps"], color="grey", lw=0.8, ls="--")
        axes[1].annotate("equal-step budget (table) \nextra steps: time to target ",
                         (t["steps"], 0.6 if t["higher_is_better"] else 0.42),
                         xycoords=("data", "axes fraction"), fontsize=7,
                         va="bottom", ha="right", color="grey")
        axes[0].set_xlabel("training wall time (s, evaluation excluded)")
        axes[1].set_xlabel("step (per rank)")
        for ax in axes:
            ax.set_ylabel(t["metric_name"])
            ax.grid(alpha=0.3)
            if not t["higher_is_better"]:
                vals = [x[2] for r in t["runs"] for x in r["curve"][1:]]
                if vals:
                    lo_, hi_ = min(vals), max(vals)
                    ax.set_ylim(lo_ - 0.05 * (hi_ - lo_), min(hi_, lo_ * 3) * 1.02)
            else:
                vals = [x[2] for r in t["runs"] for x in r["curve"][1:]]
                if vals:
                    ax.set_ylim(max(0.0, min(vals) - 0.02), min(1.0, max(vals) + 0.01))
        axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
        if t.get("equal_time_s"):
            axes[0].axvline(t["equal_time_s"], color="grey", lw=0.8, ls="--")
        fig.suptitle(f"{t['task']}: {t['metric_name']} of the averaged model, {t['size']} ranks, "
                     f"{where}")
        fig.tight_layout()
        f = out / f"{t['task']}_metric.png"
        fig.savefig(f, dpi=90)
        plt.close(fig)
        files.append(f.name)

    if results.get("hosts"):
        files.append(two_host_plot(results, out, where))
        return files

    # Throughput vs H (local SGD), with Horovod and no-comm as references.
    ncol = max(1, len(results["tasks"]))
    fig, axes = plt.subplots(1, ncol, figsize=(6 * ncol, 4.2), squeeze=False)
    for ax, t in zip(axes[0], results["tasks"]):
        hs, tp = [], []
        ada_h, ada_tp = [], []
        for r in t["runs"]:
            p = r["spec"].get("period")
            if r["spec"]["kind"] == "local" and isinstance(p, int):
                if r["spec"].get("inner") == "adaalter":
                    ada_h.append(p); ada_tp.append(r["throughput_samples_s"])
                elif r["spec"].get("algorithm") != "slowmo":
                    hs.append(p); tp.append(r["throughput_samples_s"])
        if hs:
            o = sorted(range(len(hs)), key=lambda i: hs[i])
            ax.plot([hs[i] for i in o], [tp[i] for i in o], "o-", label="local SGD (period H)")
        if ada_h:
            o = sorted(range(len(ada_h)), key=lambda i: ada_h[i])
            ax.plot([ada_h[i] for i in o], [ada_tp[i] for i in o], "s--",
                    label="Local AdaAlter (period H)")
        for r in t["runs"]:
            if r["spec"]["kind"] == "horovod":
                ax.axhline(r["throughput_samples_s"], color="black", lw=1.5,
                           label="Horovod (allreduce every step)")
            elif r["spec"].get("period") == "never":
                ax.axhline(r["throughput_samples_s"], color="grey", ls=":", lw=1.5,
                           label="no communication (H=inf)")
            elif r["spec"].get("period") == "adaptive":
                ax.axhline(r["throughput_samples_s"], color="tab:green", ls="-.", lw=1.2,
                           label="ADPSGD (adaptive H)")
            elif r["spec"].get("algorithm") == "slowmo":
                ax.plot([r["spec"]["period"]], [r["throughput_samples_s"]], "^", color="tab:red",
                        label="SlowMo")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8, 16])
        ax.set_xticklabels(["1", "2", "4", "8", "16"])
        ax.set_xlim(0.8, 20)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("averaging period H (local steps per sync)")
        ax.set_ylabel("throughput (samples/s, both ranks)")
        ax.set_title(f"{t['task']} (loopback {rate})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    f = out / "throughput_vs_H.png"
    fig.savefig(f, dpi=90)
    plt.close(fig)
    files.append(f.name)

    # ADPSGD period over steps.
    ad = [(t, r) for t in results["tasks"] for r in t["runs"] if r["period_curve"]]
    if ad:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for t, r in ad:
            pc = r["period_curve"] + [[r["steps"], r["period_curve"][-1][1]]]
            ax.step([x[0] for x in pc], [x[1] for x in pc], where="post", label=t["task"])
            ks = max(1, int(ADPSGD_SAMPLING_FRACTION * r["steps"]))
            ax.axvline(ks, ls=":", lw=1, color=ax.lines[-1].get_color())
        ax.set_xlabel("step (per rank); dotted: end of the sampling phase K_s")
        ax.set_ylabel("ADPSGD period H (local steps per sync)")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("ADPSGD: period over training")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        f = out / "adpsgd_period.png"
        fig.savefig(f, dpi=90)
        plt.close(fig)
        files.append(f.name)
    return files


def two_host_plot(results: dict, out: Path, where: str) -> str:
    """Per task: throughput of every method (bars) with its bytes/bandwidth bound (markers)."""
    import matplotlib.pyplot as plt

    tasks = [t for t in results["tasks"] if t.get("equal_time_s") is not None]
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(6.5 * max(1, len(tasks)), 4.4),
                             squeeze=False)
    for ax, t in zip(axes[0], tasks):
        runs = t["runs"]
        xs = range(len(runs))
        ax.bar(xs, [r["throughput_samples_s"] for r in runs], color="tab:blue",
               label="measured")
        bx = [i for i, r in zip(xs, runs) if r.get("bound_throughput_samples_s")]
        ax.plot(bx, [runs[i]["bound_throughput_samples_s"] for i in bx], "k_", ms=28, mew=2,
                label="bytes/bandwidth bound")
        for i, r in zip(xs, runs):
            ax.annotate(fmt_metric(r["final_metric"], t["metric_short"]),
                        (i, r["throughput_samples_s"]), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["method"].replace(" ", "\n", 1) for r in runs], fontsize=8)
        ax.set_ylabel("throughput (samples/s, all ranks)")
        ax.set_title(f"{t['task']}, {t['steps']} steps (labels: final {t['metric_short']})",
                     fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(where)
    fig.tight_layout()
    f = out / "two_host_throughput.png"
    fig.savefig(f, dpi=90)
    plt.close(fig)
    return f.name


def summary_lines(results: dict) -> list[str]:
    rate = results["bandwidth_cap"]["requested_rate"] if results["bandwidth_cap"]["applied"] \
        else "uncapped"
    out = []
    for t in results["tasks"]:
        runs = {r["method"]: r for r in t["runs"]}
        hv = runs.get("Horovod")
        if not hv:
            continue
        if "equal_time_s" in t:
            out += _two_host_summary(t, runs, hv, rate)
            continue
        for label in ("local SGD H=8", "Local AdaAlter H=4", "local SGD H=4"):
            r = runs.get(label)
            if r:
                short = t["metric_short"]
                tt = r.get("time_to_target_s")
                reach = (f"reaches Horovod's final {short} after {tt:.1f}s vs Horovod's "
                         f"{hv['time_to_target_s']:.1f}s" if tt is not None else
                         f"does not reach Horovod's final {short} in {r['steps']} steps")
                out.append(f"[{t['task']}] {label}: {r['speedup_vs_horovod']:.2f}x Horovod's "
                           f"throughput at {rate}, {t['metric_name']} "
                           f"{fmt_metric(r['final_metric'], short)} vs "
                           f"{fmt_metric(hv['final_metric'], short)}, "
                           f"{100 * r['bytes_ratio_vs_horovod']:.1f}% of its bytes; {reach}")
                break
    return out


def _two_host_summary(t: dict, runs: dict, hv: dict, rate: str) -> list[str]:
    short, higher = t["metric_short"], t["higher_is_better"]
    out = []
    hh = runs.get("Horovod hierarchical")
    if hh:
        out.append(f"[{t['task']}] HOROVOD_HIERARCHICAL_ALLREDUCE=1: allreduce "
                   f"{', '.join(hh.get('allreduce_ops') or ['?'])} (without: "
                   f"{', '.join(hv.get('allreduce_ops') or ['?'])}), "
                   f"{hh['speedup_vs_horovod']:.2f}x Horovod's throughput")
    flat, two = runs.get("local SGD H=8"), runs.get("two-level H=8 L=1")
    for r in (flat, two):
        if r:
            out.append(f"[{t['task']}] {r['method']}: {r['speedup_vs_horovod']:.2f}x Horovod's "
                       f"throughput (2 hosts, {rate}), {short} "
                       f"{fmt_metric(r['final_metric'], short)} vs Horovod's "
                       f"{fmt_metric(hv['final_metric'], short)} at equal steps; "
                       f"{100 * r['nocomm_ratio']:.0f}% of no-comm, "
                       f"{100 * r['bound_ratio']:.0f}% of the bytes/bandwidth bound"
                       if r.get("nocomm_ratio") is not None else
                       f"[{t['task']}] {r['method']}: {r['speedup_vs_horovod']:.2f}x Horovod's "
                       f"throughput")
    if flat and two and t.get("equal_time_s"):
        for (tt, a), (_, b), (_, h) in zip(two["metric_at_equal_times"],
                                           flat["metric_at_equal_times"],
                                           hv["metric_at_equal_times"]):
            verdict = ("two-level better" if ((a > b) if higher else (a < b)) else
                       "equal" if a == b else "two-level not better")
            out.append(f"[{t['task']}] at equal wall time {tt:.1f}s: two-level "
                       f"{fmt_metric(a, short)} vs flat H=8 {fmt_metric(b, short)} vs Horovod "
                       f"{fmt_metric(h, short)} ({verdict})")
    return out
