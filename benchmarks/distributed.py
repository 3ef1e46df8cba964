"""`hardbatch bench distributed`: plain 2-worker DDP vs the full hardbatch system.

Both runs train the same model on Ray Train workers of one local cluster, same seed, epochs
and per-worker batch. `plain` shuffles locally and trains on every example; `hardbatch` takes
its batches from the sampler service (a share of the data per round, biased toward hard
examples), filters them locally and streams every loss to the store. The figure of merit is
the training wall time to first reach plain's final validation accuracy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hardbatch.trainer.distributed import JobConfig
from hardbatch.trainer.driver import ray_init
from hardbatch.trainer.launch import launch
from hardbatch.trainer.plots import plot_runs

from benchmarks.filter import print_table, summarize

FULL = dict(num_samples=50_000, epochs=12, batch_size=256, width=128, evals_per_epoch=2)
QUICK = dict(num_samples=4_000, epochs=2, batch_size=128, width=16, evals_per_epoch=1)
HARDBATCH = dict(filter=True, min_loss_perc=0.9, min_samples_perc=0.2, plans="service",
                 plan_fraction=0.6, alpha=1.0, lam=0.2)


def run(quick: bool, out: Path) -> dict[str, Any]:
    import ray

    base = JobConfig(**(QUICK if quick else FULL), workers=2, progress=False,  # type: ignore[arg-type]
                     storage=str((out / "ray").resolve()))
    started = ray_init("")
    try:
        plain = launch(dataclasses.replace(base, filter=False, plans="local")).result
        hard = launch(dataclasses.replace(base, **HARDBATCH)).result  # type: ignore[arg-type]
    finally:
        if started:
            ray.shutdown()
    target = plain.final_accuracy
    result: dict[str, Any] = {
        "task": base.task, "workers": base.workers, "num_samples": base.num_samples,
        "epochs": base.epochs, "batch_size": base.batch_size, "width": base.width,
        "seed": base.seed, "hardbatch_config": HARDBATCH, "target_accuracy": target,
        "plain": summarize(plain, target), "hardbatch": summarize(hard, target),
        "quick": quick,
    }
    t_plain = result["plain"]["time_to_target_s"]
    t_hard = result["hardbatch"]["time_to_target_s"]
    result["speedup"] = t_plain / t_hard if t_hard else None
    result["accuracy_gap_points"] = 100 * (hard.final_accuracy - plain.final_accuracy)
    result["plots"] = [str(p) for p in plot_runs({"plain DDP": plain, "hardbatch": hard}, out,
                                                   "distributed")]
    print_table(result, names=("plain", "hardbatch"))
    return result
