"""The frontier benchmark's plots: time to target per arm, and the best runs' curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"plain": "black", "hardbatch": "darkred", "uniform": "tab:blue",
          "half": "tab:green", "cost_model": "tab:orange",
          "half_weighted": "tab:purple", "half_uniform": "tab:cyan",
          "half_uncertain": "tab:brown", "no_gate": "gold", "no_guard": "tab:olive",
          "steps40": "tab:pink", "steps40_uniform": "tab:gray", "fixed_size": "tab:red"}


def drawn_arms(result: dict[str, Any]) -> dict[str, str]:
    """Arm -> legend label; an ablation identical to the default is drawn once, as it."""
    same = [a for a, v in result["ablations"].items() if v["same_as_default"]]
    labels = {arm: arm.replace("_", " ") for arm in result["arms"] if arm not in same}
    if same:
        labels["hardbatch"] += " (= " + ", ".join(a.replace("_", " ") for a in same) + ")"
    return labels


def plot_frontiers(result: dict[str, Any], out: Path) -> Path:
    """Time to target against the target, one line per arm (the best config's half-time over
    seeds) with a band from its fastest to its slowest seed."""
    accuracy = result["metric"] == "accuracy"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, label in drawn_arms(result).items():
        xs, med, lo, hi = [], [], [], []
        for t in result["targets"]:
            best = t["best_config"].get(arm)
            if best is None:
                continue
            times = [s for s in best["per_seed"] if s is not None]
            xs.append(100 * t["target"] if accuracy else t["target"])
            med.append(best["half_time"])
            lo.append(min(times))
            hi.append(max(times))
        if xs:
            ax.plot(xs, med, marker="o", color=COLORS.get(arm), label=label)
            ax.fill_between(xs, lo, hi, color=COLORS.get(arm), alpha=0.15)
    ax.set_xlabel("target validation accuracy (%)" if accuracy else "target validation loss")
    ax.set_ylabel("training seconds to reach it")
    ax.set_title(f"{result['task_name']}: best time to target "
                 f"({result['workers']} worker(s), {result['seeds']} seeds)")
    if not accuracy:
        ax.invert_xaxis()  # harder targets to the right, as for accuracy
    return _save(fig, ax, out / "frontier.png")


def plot_best_curves(result: dict[str, Any], out: Path) -> list[Path]:
    """Validation accuracy and loss against training time for each arm's best config: the
    median over seeds at each eval, with a band from min to max."""
    written = []
    for key, label in (("val_accuracy", "validation accuracy"), ("val_loss", "validation loss")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        finals = []
        for arm, label in drawn_arms(result).items():
            config = result["best_configs"][arm]
            curves = [r["evals"] for r in result["runs"] if r["config"] == config]
            n = min(len(c) for c in curves)
            t = np.median([[e["train_time_s"] for e in c[:n]] for c in curves], axis=0)
            v = np.array([[e[key] for e in c[:n]] for c in curves])
            ax.plot(t, np.median(v, axis=0), marker=".", color=COLORS.get(arm),
                    label=f"{label}: {config}")
            ax.fill_between(t, v.min(axis=0), v.max(axis=0), color=COLORS.get(arm), alpha=0.15)
            finals.append(float(np.median(v[:, -1])))
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel(label)
        if key == "val_loss":
            ax.set_yscale("log")
        else:
            best = max(finals)
            ax.set_ylim(max(0.0, best - 0.05), min(1.0, best + 0.005))
        written.append(_save(fig, ax, out / f"frontier_{key.removeprefix('val_')}.png"))
    return written


def _save(fig: plt.Figure, ax: plt.Axes, path: Path) -> Path:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
