"""Summary statistics, the paired TFP-vs-random comparison, the Markdown tables and the PNG of
``train_effect``."""

from __future__ import annotations

import math

import numpy as np

#: Metrics where lower is better (every other metric is an exact-match share: higher is better).
LOWER_IS_BETTER = ("loss",)


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


def mean_std(values: list) -> dict:
    """``{"mean", "std" (sample standard deviation, ddof 1; 0.0 for one value), "n", "values"}``."""
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "n": int(arr.size), "values": arr.tolist()}


def summarize(runs: list) -> dict:
    """Per metric, :func:`mean_std` over the runs (each run: ``{"seed", "metrics": {...}}``)."""
    metrics = sorted({m for r in runs for m in r["metrics"]})
    return {m: mean_std([r["metrics"][m] for r in runs if m in r["metrics"]]) for m in metrics}


def paired(tfp_runs: list, random_runs: list) -> dict:
    """Per metric, the per-seed differences TFP minus random over the seeds both have.

    Returns:
        ``{metric: {"mean", "std", "n", "values", "seeds", "tfp_better" (seeds where TFP is better: lower
        loss, higher exact match), "t" (mean / (std / sqrt(n)); None when std is 0 or n < 2)}}``.
    """
    by_seed_random = {r["seed"]: r["metrics"] for r in random_runs}
    common = [r for r in tfp_runs if r["seed"] in by_seed_random]
    out = {}
    if not common:
        return out
    for metric in common[0]["metrics"]:
        diffs = [r["metrics"][metric] - by_seed_random[r["seed"]][metric] for r in common]
        stats = mean_std(diffs)
        better = [d < 0 if lower_is_better(metric) else d > 0 for d in diffs]
        stats["seeds"] = [r["seed"] for r in common]
        stats["tfp_better"] = int(sum(better))
        spread = stats["std"] / math.sqrt(stats["n"])
        stats["t"] = stats["mean"] / spread if stats["n"] > 1 and stats["std"] > 0 else None
        out[metric] = stats
    return out


def paired_comparisons(conditions: dict) -> dict:
    """``{"tfp+X vs random+X": paired(...)}`` for every pair of conditions that differ only in the order."""
    out = {}
    for name, cond in conditions.items():
        spec = cond["condition"]
        if spec["order"] != "tfp":
            continue
        for other_name, other in conditions.items():
            o = other["condition"]
            same_mode = (o["attention"], o["strategy"]) == (spec["attention"], spec["strategy"])
            if o["order"] == "random" and same_mode:
                out[f"{name} vs {other_name}"] = paired(cond["runs"], other["runs"])
    return out


def _fmt(stats: dict, metric: str) -> str:
    digits = 3 if lower_is_better(metric) else 3
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown_tables(results: dict) -> str:
    """One Markdown table per task: conditions x metrics (mean ± std over seeds), then the paired
    differences."""
    lines = []
    for task_name, task in results["tasks"].items():
        conditions = task["conditions"]
        metrics = sorted({m for c in conditions.values() for m in c["summary"]})
        metrics.sort(key=lambda m: (not lower_is_better(m), m))
        seeds = max(c["summary"][metrics[0]]["n"] for c in conditions.values()) if metrics else 0
        lines.append(f"**{task_name}** (mean ± std over {seeds} seeds)\n")
        lines.append("| condition | " + " | ".join(metrics) + " |")
        lines.append("|---|" + "---|" * len(metrics))
        for name, c in conditions.items():
            cells = [_fmt(c["summary"][m], m) if m in c["summary"] else "-" for m in metrics]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        for pair, diffs in task.get("paired", {}).items():
            cells = [
                f"{d['mean']:+.3f} ± {d['std']:.3f} ({d['tfp_better']}/{d['n']})" if (d := diffs.get(m))
                else "-"
                for m in metrics
            ]
            lines.append(f"| {pair} (TFP better in k/n seeds) | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    if width <= 1 or values.size < width:
        return values
    kernel = np.ones(width) / width
    return np.convolve(values, kernel, mode="valid")


def plot(results: dict, path) -> None:
    """A PNG: per task, training-loss curves (mean over seeds, moving average), held-out loss during training,
    and the final exact-match metrics (mean ± std) per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    fig, axes = plt.subplots(len(tasks), 3, figsize=(16, 4.2 * len(tasks)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (task_name, task) in enumerate(tasks.items()):
        ax_train, ax_eval, ax_bars = axes[row]
        names = list(task["conditions"])
        for k, name in enumerate(names):
            runs = task["conditions"][name]["runs"]
            if not runs:
                continue
            color = colors[k % len(colors)]
            curves = np.array([r["train_loss"] for r in runs])
            width = max(1, curves.shape[1] // 25)
            mean = _smooth(curves.mean(0), width)
            ax_train.plot(np.arange(mean.size) + width, mean, color=color, label=name)
            steps = [s for s, _ in runs[0]["eval_curve"]]
            evals = np.array([[v for _, v in r["eval_curve"]] for r in runs])
            ax_eval.errorbar(steps, evals.mean(0), yerr=evals.std(0, ddof=1) if len(runs) > 1 else None,
                             color=color, marker="o", capsize=3, label=name)
        ax_train.set(title=f"{task_name}: training loss (moving average, mean over seeds)", xlabel="step",
                     ylabel="loss per response token")
        ax_eval.set(title=f"{task_name}: held-out loss, each sample alone", xlabel="step", ylabel="loss")
        ax_train.legend(fontsize=8)
        ax_eval.legend(fontsize=8)
        metrics = sorted(
            {m for c in task["conditions"].values() for m in c["summary"] if not lower_is_better(m)}
        )
        width = 0.8 / max(1, len(names))
        for k, name in enumerate(names):
            summary = task["conditions"][name]["summary"]
            means = [summary[m]["mean"] if m in summary else np.nan for m in metrics]
            stds = [summary[m]["std"] if m in summary else 0 for m in metrics]
            ax_bars.bar(np.arange(len(metrics)) + k * width, means, width, yerr=stds, capsize=3,
                        color=colors[k % len(colors)], label=name)
        ax_bars.set_xticks(np.arange(len(metrics)) + width * (len(names) - 1) / 2, metrics, fontsize=8)
        ax_bars.set(title=f"{task_name}: exact match (mean ± std over seeds)", ylim=(0, 1))
        ax_bars.legend(fontsize=8)
    env = results["environment"]
    fig.suptitle(f"train_effect: {env['device']}, commit {env['git_commit'][:12]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
