"""Plots of training runs: accuracy and validation loss against wall time, kept fraction."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from hardbatch.trainer.train import RunResult  # noqa: E402


def plot_runs(runs: dict[str, RunResult], out: Path, stem: str = "curves") -> list[Path]:
    """Writes `stem_accuracy.png`, `stem_val_loss.png` and `stem_kept.png` under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key, label in (("val_accuracy", "validation accuracy"), ("val_loss", "validation loss")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, run in runs.items():
            ax.plot([e["train_time_s"] for e in run.evals], [e[key] for e in run.evals],
                    marker=".", label=name)
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel(label)
        if key == "val_loss":
            ax.set_yscale("log")
        else:
            best = max(run.final_accuracy for run in runs.values())
            ax.set_ylim(max(0.0, best - 0.1), min(1.0, best + 0.01))
        written.append(_save(fig, ax, out / f"{stem}_{key.removeprefix('val_')}.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in runs.items():
        ax.plot([e["epoch"] for e in run.epochs], [e["samp_perc"] for e in run.epochs],
                marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("kept fraction of each batch")
    ax.set_ylim(0, 1.05)
    return [*written, _save(fig, ax, out / f"{stem}_kept.png")]


def _save(fig: plt.Figure, ax: plt.Axes, path: Path) -> Path:
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
