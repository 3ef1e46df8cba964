"""`hardbatch bench frontier`: does hardbatch train faster than the best plain training a user
could run instead?

Plain training at several epoch budgets, each in fp32 and in mixed precision for the whole
step (bf16 autocast, or fp16 with a scaler on GPUs without bf16) where the hardware runs it
fast, traces the plain frontier: the least training time to reach each validation target.
hardbatch in the configuration a user gets by default (`JobConfig()`), and ablations of it,
trace theirs: `uniform` is the same with uniform plans of the same size (`alpha=0`), `half`
the same with plans over half the data, hard-biased, without importance weights
(`plan_fraction=0.5, beta=0`: the service decides which half is scored and trained at all),
`half_weighted` the same with the importance weights that make the plans unbiased (`beta=1`),
`half_uniform` uniform plans over half the data (what the hard bias is measured against),
`half_uncertain` half plans that rank by uncertainty instead of loss (`priority="uncertain"`:
confidently wrong samples, often flipped labels, rank low),
`cost_model` the same with the timed cost model on (`cost_model=True`: full steps where
scoring does not pay, from measured step times), `no_gate` the same without the kept-share
gate (`filter_gate=False`: the filter on every step, flat losses or not), `no_guard` the
same without the service's noise guard (`guard=False`:
what keeping suspected label errors out of training buys), `steps40` plans over 40% of the
data that keep an epoch's steps (`keep_steps=True`: each step scores 40% of a batch, the
samples the service picks, hard-biased, no weights) and `steps40_uniform` the same with
uniform plans (its same-size control), `fixed_size` the default before plan sizes adapted
(`size_factor=0`: plans over all the data, which the service only orders, with weights),
`unpacked` the default before plans were packed (`packed=False`: every epoch keeps its steps
and each batch shrinks to what the plan trains), `no_filter` packed plans without the in-batch
loss filter (`filter=False`: what the filter adds on top of the plans), `no_curve` the same
without the step-cost curve's say (`step_curve=False`: the kept-share gate alone decides; the
default since the MNIST-1D frontier of d4c075a) and `curve` with it (`step_curve=True`);
steps40 arms train as many epochs as plain (the same steps), the other plan-fraction arms
`passes / plan_fraction` epochs.
An ablation identical to the default is not trained again: it shares the default's runs, and
the JSON says so.

Every config runs for several seeds (model init and data order), seed-major, rotating through
all configs within a seed so that drift on a shared machine hits every arm. For each target,
from the plain frontier's best median accuracy down one point (for tasks judged by validation
loss: from its best median loss up 2%), a config's time is the training time by which half of
its seeds reached it; an arm's time is its best config's. speedup = plain / hardbatch.
Training time excludes validation, Redis/service/Ray startup and worker-group setup.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hardbatch.trainer.distributed import JobConfig
from hardbatch.trainer.task import BUILTIN_TASKS, Task, TaskArgs, load_task

from benchmarks import frontier_stats as st
from benchmarks.frontier_runners import LocalRunner, RayRunner

# What each ablation changes in hardbatch's default config.
# The plan-fraction arms keep size_factor 0 (plans of a fixed share), as they were measured.
FIXED = {"size_factor": 0.0}
ABLATIONS: dict[str, dict[str, Any]] = {
    "uniform": {"alpha": 0.0},
    "half": {**FIXED, "plan_fraction": 0.5, "beta": 0.0},
    "half_weighted": {**FIXED, "plan_fraction": 0.5, "beta": 1.0},
    "half_uniform": {**FIXED, "plan_fraction": 0.5, "beta": 0.0, "alpha": 0.0},
    "half_uncertain": {**FIXED, "plan_fraction": 0.5, "beta": 0.0, "priority": "uncertain"},
    "cost_model": {"cost_model": True},
    "no_gate": {"filter_gate": False},
    "no_guard": {"guard": False},
    "steps40": {**FIXED, "plan_fraction": 0.4, "keep_steps": True, "beta": 0.0},
    "steps40_uniform": {**FIXED, "plan_fraction": 0.4, "keep_steps": True, "beta": 0.0,
                        "alpha": 0.0},
    "fixed_size": {**FIXED, "beta": 1.0},
    "unpacked": {"packed": False},
    "no_filter": {"filter": False},
    "no_curve": {"step_curve": False},
    "curve": {"step_curve": True},
}
ARMS = ("plain", "hardbatch", *ABLATIONS)
# Each arm with a composition against its same-size uniform control.
CONTROLS = {"hardbatch": "uniform", "half": "half_uniform", "half_weighted": "half_uniform",
            "half_uncertain": "half_uniform", "steps40": "steps40_uniform"}
# The service's default cap on one listing (Settings.max_limit): precision is measured on the
# most certain suspects up to it; `listed_total` says how many the service flagged in all.
SUSPECT_LIMIT = 10_000


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes and budgets of one benchmark run.

    Budgets count passes over the data: a run whose plans cover a share `f` of the data per
    epoch trains `passes / f` epochs, so a hardbatch arm skipping half the data each epoch gets
    the same data budget as plain training, not half of it.
    """

    num_samples: int
    width: int
    batch_size: int
    plain_budgets: tuple[int, ...]
    hardbatch_budgets: tuple[int, ...]
    evals_per_run: int  # about this many validation passes per run, whatever its budget
    # Learning rates, as factors of the default, that plain and hardbatch both train at:
    # each side is scored at its best config per target.
    lr_factors: tuple[float, ...] = (0.5, 1.0, 2.0)


# Built-in tasks at sizes that finish 3 seeds in about half an hour on the 2-core development
# machine (an AMD EPYC without AVX-512: the width-128 CNN costs ~10x what it did on the AMX
# machine of the first measurements, so MNIST-1D runs at width 32); a user's own task gets
# JobConfig's sizes.
# hardbatch gets plain's budgets: with 4 passes its shortest, plain's 2-pass schedule alone
# decided the loosest targets (on the sequence task, 0.79x there at 10cd115).
# Budgets run to 24 passes so that plain's best accuracy is a plateau, not the grid's edge.
BUDGETS = (2, 4, 7, 12, 24)
FULL = {
    "mnist1d": Scale(50_000, 32, 256, BUDGETS, BUDGETS, 12),
    "tabular": Scale(50_000, 128, 256, BUDGETS, BUDGETS, 12),
    "sequence": Scale(20_000, 32, 256, BUDGETS, BUDGETS, 12),
    # Held out of all tuning (docs/tuned-constants.md); a pass costs ~17 s at width 32 here,
    # so its grid is smaller.
    "images": Scale(50_000, 32, 256, (2, 4, 8), (2, 4, 8), 12),
}
QUICK = Scale(2_000, 16, 128, (1, 2, 4), (2, 4), 4, (1.0, 2.0))
QUICK_SEEDS, FULL_SEEDS = 2, 3


def default_scale(quick: bool, task: str) -> Scale:
    if quick:
        return QUICK
    if task in FULL:
        return FULL[task]
    d = JobConfig()
    budgets = tuple(sorted({2, 4, 7, d.epochs, 2 * d.epochs}))
    return Scale(d.num_samples, d.width, d.batch_size, budgets, budgets, 12)


def plain_precisions(device: torch.device) -> tuple[list[str], str]:
    """The precisions plain training runs in here, and why: fp32, and the mixed precision a
    user would pick where the hardware runs it natively (bf16 on AMX/AVX512-BF16 CPUs)."""
    if device.type == "cuda":
        mixed = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return ["fp32", mixed], f"fp32 and {mixed} autocast on {torch.cuda.get_device_name()}"
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return ["fp32", "bf16"], "fp32 and bf16 autocast (this CPU runs bf16 natively)"
    return ["fp32"], ("fp32 only: this CPU has no native bf16 (AVX512-BF16/AMX), so bf16 "
                      "autocast runs many times slower than fp32 and no user would pick it")


def arm_jobs(base: JobConfig) -> dict[str, JobConfig]:
    """Every arm, from hardbatch's defaults; each ablation overrides only what it ablates."""
    # Plain trains every example of every pass: its epochs are passes.
    plain = dataclasses.replace(base, plans="local", filter=False, plan_fraction=1.0)
    return {"plain": plain, "hardbatch": base,
            **{arm: dataclasses.replace(base, **o) for arm, o in ABLATIONS.items()}}


def schedule(arms: dict[str, JobConfig], scale: Scale, seeds: list[int],
             precisions: list[str], workers: int = 1) -> list[dict[str, Any]]:
    """Every (config, seed) to train: seed-major; within a seed all configs, arms interleaved
    budget by budget and learning rate by learning rate, starting one place later for each
    seed. With several workers plain DDP also trains at one process's global batch (each
    worker `batch_size / workers`: the same steps as one process), besides `batch_size` per
    worker (half the steps), as a user could pick either."""
    configs: list[dict[str, Any]] = []
    plain = [("plain", p) for p in precisions]
    plain_batches = [None] + ([max(1, scale.batch_size // workers)] if workers > 1 else [])
    # Ablations isolate one component at the default learning rate (where it is in the grid):
    # the grid is for the two sides of the headline comparison, plain and hardbatch.
    ablation_factors = [1.0] if 1.0 in scale.lr_factors else list(scale.lr_factors)
    for passes in sorted(set(scale.plain_budgets) | set(scale.hardbatch_budgets)):
        for factor in scale.lr_factors:
            for arm, precision in (plain[0], ("hardbatch", None), *plain[1:],
                                   *((a, None) for a in ABLATIONS if a in arms)):
                budgets = scale.plain_budgets if arm == "plain" else scale.hardbatch_budgets
                if passes not in budgets or (arm != "hardbatch" and arm != "plain"
                                             and arms[arm] == arms["hardbatch"]):
                    continue
                if arm not in ("plain", "hardbatch") and factor not in ablation_factors:
                    continue
                precision = precision or arms[arm].precision
                # keep_steps arms train an epoch's full steps on smaller batches: same steps.
                epochs = (passes if arm == "plain" or arms[arm].keep_steps
                          else epochs_for(passes, arms[arm].plan_fraction))
                lr = arms[arm].lr * factor
                for batch in plain_batches if arm == "plain" else [None]:
                    name = f"{arm}/{precision}/{epochs}ep/lr{lr:g}" + (
                        f"/b{batch}" if batch else "")
                    configs.append({"config": name, "arm": arm, "precision": precision,
                                    "epochs": epochs, "passes": passes, "lr": lr,
                                    **({"batch_size": batch} if batch else {})})
    plan = []
    for i, seed in enumerate(seeds):
        k = i % len(configs)
        plan += [{**c, "seed": seed} for c in configs[k:] + configs[:k]]
    return plan


def epochs_for(passes: int, plan_fraction: float) -> int:
    """Epochs that give `passes` passes over the data with plans over `plan_fraction` of it.

    Example:
        >>> epochs_for(7, 1.0), epochs_for(7, 0.5), epochs_for(4, 0.3)
        (7, 14, 13)
    """
    return max(1, round(passes / plan_fraction))


def job_for(arms: dict[str, JobConfig], item: dict[str, Any], scale: Scale) -> JobConfig:
    job = arms[item["arm"]]
    return dataclasses.replace(
        job, epochs=item["epochs"], seed=item["seed"], precision=item["precision"],
        lr=item.get("lr", job.lr), batch_size=item.get("batch_size", job.batch_size),
        evals_per_epoch=max(1, round(scale.evals_per_run / item["epochs"])))


def run_record(trained: Any, job: JobConfig) -> dict[str, Any]:
    """What a run trained: its learning rate and batch, steps per epoch, samples trained (the
    examples its steps trained on, over all ranks) and its fitted step-cost curve (`time(n)
    = a + b n`, n samples in a training step; from the worker's first round)."""
    epochs = trained.epochs
    return {"lr_used": job.lr, "batch_size_used": job.batch_size,
            "steps_per_epoch": [e.get("steps") for e in epochs],
            "samples_trained": sum(e.get("trained", 0.0) for e in epochs),
            "step_cost": epochs[-1].get("step_cost") if epochs else None}


def machine_info() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except OSError:
        commit = ""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "git_commit": commit, "load_average_start": list(os.getloadavg())}


def run(quick: bool, out: Path, task: str = "mnist1d", task_args: dict[str, str] | None = None,
        workers: int = 1, seeds: int | None = None, threads: int = 1,
        ablations: list[str] | None = None, budgets: list[int] | None = None,
        lr_factors: list[float] | None = None) -> dict[str, Any]:
    """Trains every config for every seed and writes the frontier (see the module doc).

    Args:
        quick: CI-sized data, model, budgets and seeds.
        out: folder for plots (and the JSON, written by the caller).
        task: a built-in task's short name or a dotted task path.
        task_args: `--task-arg` pairs, e.g. {"noise": "0.2"}.
        workers: 1 trains in this process; more trains on that many Ray Train workers.
        seeds: seeds per config (default 3, quick 2).
        threads: torch threads per training process (1: a 2-core machine keeps a core for the
            service, Redis and the loss reporter, and timings on a shared machine stay stable).
        ablations: the ablation arms to train (default: all of `ABLATIONS`); the others are
            left out of the tables and get no speedup figures.
        budgets: passes over the data each arm trains for (default: the task's, up to 24).
        lr_factors: learning rates, as factors of the default, for every arm (default 0.5, 1,
            2).
    """
    n_seeds = seeds if seeds is not None else (QUICK_SEEDS if quick else FULL_SEEDS)
    if n_seeds < 1 or workers < 1 or threads < 0:
        raise ValueError("need seeds >= 1, workers >= 1 and threads >= 0")
    chosen = list(ABLATIONS) if ablations is None else list(ablations)
    if unknown := set(chosen) - set(ABLATIONS):
        raise ValueError(f"unknown ablations {sorted(unknown)}; choose from {list(ABLATIONS)}")
    scale = default_scale(quick, task)
    if budgets:
        scale = dataclasses.replace(scale, plain_budgets=tuple(sorted(budgets)),
                                    hardbatch_budgets=tuple(sorted(budgets)))
    if lr_factors:
        scale = dataclasses.replace(scale, lr_factors=tuple(lr_factors))
    if min(scale.plain_budgets) < 1 or min(scale.lr_factors) <= 0:
        raise ValueError("budgets must be >= 1 pass and learning-rate factors > 0")
    task_args = dict(task_args or {})
    base = dataclasses.replace(
        JobConfig(), task=BUILTIN_TASKS.get(task, task), task_args=task_args,
        num_samples=scale.num_samples, width=scale.width, batch_size=scale.batch_size,
        workers=workers, threads=threads, progress=False)
    probe: Task = load_task(base.task)(TaskArgs(base.num_samples, base.width, 0, task_args))
    arms = {a: j for a, j in arm_jobs(base).items() if a in ("plain", "hardbatch", *chosen)}
    precisions, precision_note = plain_precisions(base.resolved_device())
    plan = schedule(arms, scale, list(range(n_seeds)), precisions, workers)
    started, info = time.perf_counter(), machine_info()
    runs, suspects = [], []
    runner = LocalRunner(out) if workers == 1 else RayRunner(out)
    with runner:
        for k, item in enumerate(plan, start=1):
            job = job_for(arms, item, scale)
            trained, run_name = runner.train(job, probe.num_samples)
            runs.append({**item, "run": run_name, "train_time_s": trained.train_time_s,
                         "evals": trained.evals, "epoch_metrics": trained.epochs,
                         **run_record(trained, job)})
            last = trained.evals[-1]
            print(f"[{k}/{len(plan)}] {item['config']} seed {item['seed']}: "
                  f"acc {100 * last['val_accuracy']:.2f}% loss {last['val_loss']:.4f} "
                  f"in {trained.train_time_s:.1f}s (kept {trained.epochs[-1]['samp_perc']:.2f})",
                  flush=True)
            noisy = probe.noisy_ids
            if run_name is not None and noisy is not None \
                    and item["arm"] == "hardbatch" and item["lr"] == base.lr \
                    and item["passes"] == max(scale.hardbatch_budgets):
                runner.settle(run_name)
                # Every suspect the service lists (the listing's cap is far above any
                # flipped-label count of the built-in tasks).
                listing = runner.client.suspects(run_name, limit=SUSPECT_LIMIT)
                listed = [int(x["id"]) for x in listing["samples"]]
                hits = int(np.isin(listed, noisy).sum())
                suspects.append({"run": run_name, "seed": item["seed"], "listed": len(listed),
                                 "listed_total": listing["total"],
                                 "flipped_listed": hits,
                                 "precision": hits / len(listed) if listed else None})
    result = analyze(runs, probe.metric, arms)
    result.update(
        task=base.task, task_name=task, task_args=task_args, workers=workers, seeds=n_seeds,
        quick=quick, threads=threads, num_samples=scale.num_samples, width=scale.width,
        batch_size=scale.batch_size, budgets_in="passes over the data",
        lr_factors=list(scale.lr_factors),
        plain_budgets=list(scale.plain_budgets), hardbatch_budgets=list(scale.hardbatch_budgets),
        plain_precisions=precisions, precision_note=precision_note,
        hardbatch_config={k: v for k, v in dataclasses.asdict(base).items()
                          if k not in ("task", "task_args", "run", "address", "service",
                                       "redis", "storage", "progress", "epochs", "seed")},
        ablations={arm: {"overrides": overrides, "same_as_default": arms[arm] == arms["hardbatch"]}
                   for arm, overrides in ABLATIONS.items() if arm in arms},
        **suspect_summary(probe, suspects),
        machine={**info, "load_average_end": list(os.getloadavg())},
        wall_time_s=time.perf_counter() - started,
        runs=runs,
    )
    from benchmarks.frontier_plots import plot_best_curves, plot_frontiers

    result["plots"] = [str(p) for p in [plot_frontiers(result, out),
                                        *plot_best_curves(result, out)]]
    print_table(result)
    return result


def _curves(runs: list[dict[str, Any]], names: list[str], shared: set[str]
            ) -> dict[str, dict[str, list[Any]]]:
    """Each arm's configs' curves (one per run, in run order); the arms in `shared` are the
    default's config and share its runs."""
    curves: dict[str, dict[str, list[Any]]] = {arm: {} for arm in names}
    for r in runs:
        curves[r["arm"]].setdefault(r["config"], []).append(r["evals"])
    for arm in shared:
        curves[arm] = curves["hardbatch"]
    return curves


def _arms(arms: dict[str, JobConfig]) -> tuple[list[str], set[str]]:
    """The arms in table order, and the ablations identical to the default."""
    return ([arm for arm in ARMS if arm in arms],
            {a for a in ABLATIONS if a in arms and arms[a] == arms["hardbatch"]})


def _rows(names: list[str], curves: dict[str, dict[str, list[Any]]], metric: str
          ) -> tuple[str, float, list[dict[str, Any]]]:
    """The plain frontier's best config and median, and per target each arm's time."""
    plain_best = st.best_config(curves["plain"], metric)
    best = statistics.median(st.final(c, metric) for c in curves["plain"][plain_best])
    rows = []
    for target in st.targets_from(best, metric):
        row: dict[str, Any] = {"target": target, "best_config": {}}
        for arm in names:
            t, name, per_seed = st.fastest(curves[arm], target, metric)
            row[f"{arm}_time_s"] = t
            row["best_config"][arm] = (None if name is None else
                                       {"config": name, "half_time": t, "per_seed": per_seed})
        row["speedup"] = st.ratio(row["plain_time_s"], row["hardbatch_time_s"])
        row["speedup_vs_uniform"] = st.ratio(row.get("uniform_time_s"), row["hardbatch_time_s"])
        rows.append(row)
    return plain_best, best, rows


def _headline(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    return {"speedup_at_best": rows[0]["speedup"],
            "min_speedup_within_1pt": st.min_speedup([r["speedup"] for r in rows]),
            "speedup_vs_uniform_at_best": rows[0]["speedup_vs_uniform"]}


def seed_spread(runs: list[dict[str, Any]], metric: str, names: list[str], shared: set[str]
                ) -> dict[str, Any]:
    """How much the headline speedups move with the seeds: the whole analysis again on every
    resample of the seeds with replacement (one resample applies to every config, as the seeds
    were run interleaved), and each figure's 10th and 90th percentile over the resamples.
    hardbatch never reaching a target counts as speedup 0; its uniform control never reaching
    one that hardbatch reaches, as infinite (written as None: JSON has no infinity)."""
    seeds = sorted({r["seed"] for r in runs})
    by_seed: dict[int, list[dict[str, Any]]] = {s: [] for s in seeds}
    for r in runs:
        by_seed[r["seed"]].append(r)
    figures: dict[str, list[float]] = {"speedup_at_best": [], "min_speedup_within_1pt": []}
    resamples = st.seed_resamples(len(seeds))
    for picks in resamples:
        curves = _curves([r for i in picks for r in by_seed[seeds[i]]], names, shared)
        rows = _rows(names, curves, metric)[2]
        headline = _headline(rows)
        for key in ("speedup_at_best", "min_speedup_within_1pt"):
            figures[key].append(headline[key] or 0.0)
        if "uniform" in names:  # None there is either side never getting there: tell them apart
            hb, uniform = rows[0]["hardbatch_time_s"], rows[0]["uniform_time_s"]
            figures.setdefault("speedup_vs_uniform_at_best", []).append(
                0.0 if hb is None else math.inf if uniform is None else uniform / hb)
    return {"resamples": len(resamples),
            **{key: {k: None if math.isinf(v) else v for k, v in st.percentiles(values).items()}
               for key, values in figures.items()}}


def analyze(runs: list[dict[str, Any]], metric: str, arms: dict[str, JobConfig]) -> dict[str, Any]:
    """The frontier from the runs: per-config summaries, targets, speedups."""
    names, shared = _arms(arms)
    curves = _curves(runs, names, shared)
    kept: dict[str, list[float]] = {}
    meta: dict[str, dict[str, Any]] = {}
    for r in runs:
        kept.setdefault(r["config"], []).append(r["epoch_metrics"][-1]["samp_perc"])
        meta[r["config"]] = {k: r[k] for k in ("arm", "precision", "epochs", "passes", "lr",
                                               "batch_size") if k in r}
    plain_best, best, rows = _rows(names, curves, metric)
    targets = [r["target"] for r in rows]
    best_configs = {arm: st.best_config(curves[arm], metric) for arm in names}
    hb_best = best_configs["hardbatch"]

    def median_of(arm: str, config: str, key: str) -> float:
        return statistics.median(c[-1][key] for c in curves[arm][config])

    return {
        "metric": metric, "arms": names,
        "configs": {name: {**meta[name], **st.summarize_config(
            curves[m["arm"]][name], kept[name], targets, metric)} for name, m in meta.items()},
        "best_configs": best_configs,
        "plain_best_config": plain_best,
        "plain_best_metric": best,
        "plain_best_accuracy": median_of("plain", plain_best, "val_accuracy"),
        "plain_best_val_loss": median_of("plain", plain_best, "val_loss"),
        "hardbatch_best_accuracy": median_of("hardbatch", hb_best, "val_accuracy"),
        "hardbatch_val_loss": median_of("hardbatch", hb_best, "val_loss"),
        "targets": rows,
        **_headline(rows),
        "seed_spread": seed_spread(runs, metric, names, shared),
        "composition": [st.versus(rows, a, c) for a, c in CONTROLS.items()
                        if a in names and c in names],
        "target_window": ("accuracy: best median down 1 point" if metric == "accuracy"
                          else "val loss: best median up 2%"),
    }


def suspect_summary(task: Task, suspects: list[dict[str, Any]]) -> dict[str, Any]:
    if task.noisy_ids is None:
        return {"suspect_precision": None, "suspect_note": "no training labels were flipped"}
    values = [s["precision"] for s in suspects if s["precision"] is not None]
    note = ("median over seeds of GET /v1/runs/{run}/suspects at the end of the longest "
            "hardbatch run" if values else
            "the service listed no suspects (too few scorings per sample for its guard)")
    return {"suspect_precision": statistics.median(values) if values else None,
            "suspect_note": note,
            "suspects": suspects, "flipped_labels": len(task.noisy_ids)}


def print_table(r: dict[str, Any]) -> None:
    acc = r["metric"] == "accuracy"

    def fmt(t: float | None) -> str:
        return "never" if t is None else f"{t:.1f}"

    def fmt_x(s: float | None) -> str:
        return "-" if s is None else f"{s:.2f}x"

    print(f"\n{r['task_name']} ({r['task']}) {r['task_args'] or ''}: {r['workers']} worker(s), "
          f"{r['seeds']} seeds, {r['num_samples']} samples, judged by {r['metric']}")
    print(f"{'config':<26}{'final acc':>22}{'val loss':>10}{'train s':>9}{'kept':>6}")
    for name, c in sorted(r["configs"].items(), key=lambda kv: (r["arms"].index(kv[1]["arm"]),
                                                                 kv[1]["precision"],
                                                                 kv[1]["epochs"])):
        a = c["final_accuracy"]
        print(f"{name:<26}{100 * a['median']:>8.2f}% [{100 * a['min']:.2f}-{100 * a['max']:.2f}]"
              f"{c['final_val_loss']['median']:>10.4f}{c['train_time_s']['median']:>9.1f}"
              f"{c['final_kept_fraction']['median']:>6.2f}")
    print(f"\n{'target':>9}" + "".join(f"{a.replace('_', '-') + ' s':>{len(a) + 4}}"
                                       for a in r["arms"]) + f"{'speedup':>9}")
    for t in r["targets"]:
        target = f"{100 * t['target']:.2f}%" if acc else f"{t['target']:.4f}"
        print(f"{target:>9}" + "".join(f"{fmt(t[a + '_time_s']):>{len(a) + 4}}"
                                       for a in r["arms"])
              + f"{fmt_x(t['speedup']):>9}")
    print(f"\nspeedup at the best plain median ({r['plain_best_config']}): "
          f"{fmt_x(r['speedup_at_best'])}; least within the window: "
          f"{fmt_x(r['min_speedup_within_1pt'])}; vs uniform plans at best: "
          f"{fmt_x(r['speedup_vs_uniform_at_best'])}")
    sp = r["seed_spread"]

    def fmt_p(key: str) -> str:
        if key not in sp:
            return "-"
        lo, hi = (sp[key][p] for p in ("p10", "p90"))
        return (f"{lo:.2f}x-" if lo is not None else "control never-") + (
            f"{hi:.2f}x" if hi is not None else "control never")

    print(f"over {sp['resamples']} resamples of the seeds (10th-90th percentile): at best "
          f"{fmt_p('speedup_at_best')}; least {fmt_p('min_speedup_within_1pt')}; vs uniform "
          f"{fmt_p('speedup_vs_uniform_at_best')}")
    for v in r["composition"]:
        print(f"{v['arm']} vs {v['control']} (same-size uniform plans): median "
              f"{fmt_x(v['median'])} over the targets both reach; {v['only_arm']} reached by "
              f"{v['arm']} only, {v['only_control']} by {v['control']} only")
    print(f"plain best: {100 * r['plain_best_accuracy']:.2f}% / val loss "
          f"{r['plain_best_val_loss']:.4f}; hardbatch best ({r['best_configs']['hardbatch']}): "
          f"{100 * r['hardbatch_best_accuracy']:.2f}% / val loss {r['hardbatch_val_loss']:.4f}")
    if r["suspect_precision"] is not None or r["task_args"].get("noise"):
        print(f"suspect precision: {r['suspect_precision']} ({r['suspect_note']})")
    print(f"wall time {r['wall_time_s'] / 60:.1f} min\n")


def respread(result: dict[str, Any]) -> dict[str, Any]:
    """`seed_spread` for a `frontier.json` written before it was part of the result."""
    names = result["arms"]
    shared = {a for a, v in result["ablations"].items() if v["same_as_default"]}
    return seed_spread(result["runs"], result["metric"], names, shared)


if __name__ == "__main__":  # python -m benchmarks.frontier FRONTIER.json ...: the seed spread
    import json
    import sys

    for path in sys.argv[1:]:
        spread = respread(json.loads(Path(path).read_text()))
        print(path, json.dumps(spread))
