"""`hardbatch bench filter`: plain vs filtered training of the same task, side by side.

Both runs share the task, data, seed, epochs and LR schedule; the filtered one trains each step
on the examples carrying 90% of the batch loss. The figure of merit is the training wall time
each needs to first reach the plain run's final validation accuracy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hardbatch.trainer.plots import plot_runs
from hardbatch.trainer.train import RunResult, TrainConfig, fit

FULL = dict(num_samples=50_000, epochs=12, batch_size=256, width=128, evals_per_epoch=2)
QUICK = dict(num_samples=4_000, epochs=3, batch_size=128, width=32, evals_per_epoch=1)
# Keeping at least 20% of each batch costs little (the scoring forward dominates) and keeps the
# gradient from resting on a handful of examples late in training, when <5% carry 90% of the loss.
FILTER = dict(min_loss_perc=0.9, min_samples_perc=0.2)


def summarize(run: RunResult, target: float) -> dict[str, Any]:
    return {
        "final_accuracy": run.final_accuracy,
        "final_val_loss": run.final_val_loss,
        "train_time_s": run.train_time_s,
        "time_to_target_s": run.time_to_accuracy(target),
        "final_kept_fraction": run.epochs[-1]["samp_perc"],
        "epochs": run.epochs,
        "evals": run.evals,
    }


def compare(base: TrainConfig, out: Path, stem: str = "filter") -> dict[str, Any]:
    """Trains `base` plain and filtered and returns the comparison (also plotted under out)."""
    plain = fit(dataclasses.replace(base, filter=False))
    filtered = fit(dataclasses.replace(base, filter=True))
    target = plain.final_accuracy
    result: dict[str, Any] = {
        "task": base.task, "num_samples": base.num_samples, "epochs": base.epochs,
        "batch_size": base.batch_size, "width": base.width, "lr": base.lr, "seed": base.seed,
        "min_loss_perc": base.min_loss_perc, "min_samples_perc": base.min_samples_perc,
        "score_precision": base.score_precision,
        "target_accuracy": target,
        "plain": summarize(plain, target),
        "filtered": summarize(filtered, target),
    }
    t_plain = result["plain"]["time_to_target_s"]
    t_filt = result["filtered"]["time_to_target_s"]
    result["speedup"] = t_plain / t_filt if t_filt else None
    result["accuracy_gap_points"] = 100 * (filtered.final_accuracy - plain.final_accuracy)
    result["plots"] = [str(p) for p in plot_runs({"plain": plain, "filtered": filtered}, out,
                                                   stem)]
    return result


def print_table(r: dict[str, Any], names: tuple[str, str] = ("plain", "filtered")) -> None:
    def fmt(t: float | None) -> str:
        return "never" if t is None else f"{t:.1f}"

    print(f"\n{r['task']}  samples={r['num_samples']} epochs={r['epochs']} "
          f"batch={r['batch_size']} width={r['width']} seed={r['seed']}")
    print(f"{'run':<10}{'final acc':>10}{'val loss':>10}{'train s':>9}{'to target s':>13}"
          f"{'kept':>7}")
    for name in names:
        s = r[name]
        print(f"{name:<10}{100 * s['final_accuracy']:>9.2f}%{s['final_val_loss']:>10.4f}"
              f"{s['train_time_s']:>9.1f}{fmt(s['time_to_target_s']):>13}"
              f"{s['final_kept_fraction']:>7.2f}")
    speedup = "n/a (target not reached)" if r["speedup"] is None else f"{r['speedup']:.2f}x"
    print(f"target {100 * r['target_accuracy']:.2f}%  speedup to target: {speedup}  "
          f"accuracy gap: {r['accuracy_gap_points']:+.2f} points\n")


def run(quick: bool, out: Path) -> dict[str, Any]:
    base = TrainConfig(**(QUICK if quick else FULL), **FILTER, progress=False)  # type: ignore[arg-type]
    result = compare(base, out)
    result["quick"] = quick
    print_table(result)
    return result
