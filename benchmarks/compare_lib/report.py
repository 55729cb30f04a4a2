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
        parts += [table_md(t), ""]
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
        fig.suptitle(f"{t['task']}: {t['metric_name']} of the averaged model, {t['size']} ranks, "
                     f"loopback {rate}")
        fig.tight_layout()
        f = out / f"{t['task']}_metric.png"
        fig.savefig(f, dpi=90)
        plt.close(fig)
        files.append(f.name)

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


def summary_lines(results: dict) -> list[str]:
    rate = results["bandwidth_cap"]["requested_rate"] if results["bandwidth_cap"]["applied"] \
        else "uncapped"
    out = []
    for t in results["tasks"]:
        runs = {r["method"]: r for r in t["runs"]}
        hv = runs.get("Horovod")
        if not hv:
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
