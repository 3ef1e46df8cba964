"""The runtime cost model inside `Worker.select`: steps timed between select calls (sleeps
stand in for the scoring forward and the training step), the filter turned off where scoring
does not pay and kept where it does, its state across a checkpoint, and every rank of a
2-process gloo group taking the same mode on every step with one collective per step."""

from __future__ import annotations

import io
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hardbatch.sampler.cost_model import CostModelConfig, Mode
from hardbatch.trainer.step_costs import StepCosts
from torch.utils.data import TensorDataset

from hardbatch import Worker, WorkerConfig

N, BS = 64 * 200, 64
# Off by default. fp32: auto would time its first scoring in both precisions (more calls).
ON = WorkerConfig(cost_model=True, score_precision="fp32")
FLAT = torch.ones(N)  # the filter keeps ~90% of every batch
PEAKED = torch.where(torch.arange(N) % 16 == 0, 100.0, 0.01)  # ~4 of 64 carry ~99%


def dataset() -> TensorDataset:
    return TensorDataset(torch.arange(N, dtype=torch.float32)[:, None])


def run(hb: Worker, steps: int, losses: torch.Tensor, score_s: float, full_train_s: float,
        epoch: int = 0) -> tuple[list[Mode], int]:
    """`steps` steps of a loop whose scoring forward takes `score_s` and whose training step
    takes `full_train_s` times the kept share; the mode of each step and the scoring calls."""
    modes, calls = [], 0

    def score(ids: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        time.sleep(score_s)
        return losses[ids]

    batches = iter(hb.batches(epoch))
    for _ in range(steps):
        ids, _ = next(batches)
        keep = hb.select(ids, lambda ids=ids: score(ids))
        kept = ids[keep]
        modes.append(Mode.FULL if isinstance(keep, slice) else Mode.FILTER)
        time.sleep(full_train_s * len(kept) / len(ids))
        hb.loss(losses[kept].clone().requires_grad_())
    return modes, calls


def test_filter_turns_off_where_scoring_costs_more_than_it_saves():
    with Worker(ON, dataset(), batch_size=BS) as hb:
        modes, calls = run(hb, 100, FLAT, score_s=0.02, full_train_s=0.005)
        stats = hb.summary()
        model = hb.state_dict()["cost_model"]["model"]
    # Warm-up (full steps, then filtered ones), then full steps only: no probe before 200.
    assert modes[0] is Mode.FULL and Mode.FILTER in modes[:40]
    assert set(modes[50:]) == {Mode.FULL}
    assert calls == modes.count(Mode.FILTER) < 30
    assert stats["filter_steps"] == modes.count(Mode.FILTER) / 100
    assert stats["cost_switches"] == 1 and stats["predicted_ratio"] > 1
    assert stats["samp_perc"] > 0.9  # full steps train on (and count) the whole batch
    # Full steps still tell the model what the filter would keep (0.9 of identical losses).
    assert abs(model["estimates"]["kept_frac"] - 0.9) < 0.02


def test_filter_stays_on_where_it_pays():
    with Worker(ON, dataset(), batch_size=BS) as hb:
        modes, calls = run(hb, 60, PEAKED, score_s=0.0, full_train_s=0.01)
        stats = hb.summary()
    assert modes[:5] == [Mode.FULL] * 5  # measured first
    assert set(modes[25:]) == {Mode.FILTER}
    assert calls == modes.count(Mode.FILTER) and stats["cost_switches"] == 0
    assert stats["predicted_ratio"] < 0.5 and stats["samp_perc"] < 0.5


def test_cost_model_off_filters_every_step():
    with Worker(WorkerConfig(cost_model=False, filter_gate=False, score_precision="fp32"),
                dataset(), batch_size=BS) as hb:
        modes, calls = run(hb, 40, FLAT, score_s=0.01, full_train_s=0.001)
        stats = hb.summary()
        assert "cost_model" not in hb.state_dict()
    assert modes == [Mode.FILTER] * 40 and calls == 40
    assert stats["filter_steps"] == 1.0 and stats["cost_switches"] == 0
    assert "predicted_ratio" not in stats


def test_checkpoint_continues_the_mode_and_an_old_state_starts_afresh():
    with Worker(ON, dataset(), batch_size=BS) as hb:
        modes, _ = run(hb, 40, PEAKED, score_s=0.0, full_train_s=0.01)
        assert modes[-1] is Mode.FILTER
        buf = io.BytesIO()
        torch.save(hb.state_dict(), buf)  # as the built-in loop checkpoints it
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    with Worker(ON, dataset(), batch_size=BS) as again:
        again.load_state_dict(state)
        assert run(again, 3, PEAKED, 0.0, 0.01, epoch=1)[0] == [Mode.FILTER] * 3
        assert again.state_dict()["cost_model"]["model"]["estimates"]["filter_steps"] > 20
    old = {k: v for k, v in state.items() if k != "cost_model"}
    with Worker(ON, dataset(), batch_size=BS) as fresh:
        fresh.load_state_dict(old)
        assert run(fresh, 3, PEAKED, 0.0, 0.01, epoch=1)[0] == [Mode.FULL] * 3
        assert fresh.step == state["step"] + 3


def test_no_step_is_measured_across_an_interruption():
    costs = StepCosts()
    costs.begin(epoch=0)
    costs.scored(0.5)
    costs.kept(0.25)
    time.sleep(0.01)
    assert costs.begin(epoch=0) is Mode.FULL
    step_s, score_s, kept, kept_known, measured = costs.pending()
    assert step_s >= 0.01 and (score_s, kept, kept_known, measured) == (0.5, 0.25, 1.0, 1.0)
    costs.interrupt()  # an evaluation, a summary
    costs.begin(epoch=0)
    assert costs.pending() == [0.0] * 5
    costs.begin(epoch=0)
    assert costs.pending()[4] == 1.0
    costs.begin(epoch=1)  # the loader's start-up, the end-of-epoch evaluation
    assert costs.pending() == [0.0] * 5


def test_a_step_far_slower_than_its_mode_is_dropped_until_the_pace_lasts():
    costs = StepCosts(CostModelConfig(warmup_steps=50))  # full steps throughout
    seen = []
    for step, step_s in enumerate([0.01] * 8 + [1.0] + [0.01] * 3 + [0.5] * 12):
        costs.begin(epoch=0)
        before = costs.model.summary()["full_steps"]
        costs.settle(step, [step_s, 0.0, 0.9, 1.0, 1.0], world_size=1)
        seen.append(costs.model.summary()["full_steps"] > before)
    assert seen[8] is False and all(seen[:8]) and all(seen[9:12])  # an evaluation in between
    assert seen[12] is False and all(seen[-4:])  # a lasting change of pace is taken


def _rank(rank: int, port: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    reduces = 0
    all_reduce = dist.all_reduce

    def counting(*args, **kwargs):
        nonlocal reduces
        reduces += 1
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counting
    # Alone, rank 0 would filter (cheap scoring, few kept); rank 1 would not (slow scoring,
    # flat losses). Reduced over both, scoring costs more than it saves.
    hb = Worker(ON, dataset(), batch_size=BS)
    modes, _ = run(hb, 60, PEAKED if rank == 0 else FLAT, score_s=0.0 if rank == 0 else 0.04,
                   full_train_s=0.01)
    in_steps = reduces
    q.put((rank, [m.value for m in modes], in_steps, hb.summary(),
           hb.state_dict()["cost_model"]["model"]))
    hb.close()
    dist.destroy_process_group()


def test_ranks_with_different_costs_take_the_same_mode_every_step():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, port, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    out = {r: rest for r, *rest in (q.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    (modes0, reduces0, stats0, model0), (modes1, reduces1, stats1, model1) = out[0], out[1]
    assert modes0 == modes1
    # Both ranks fed their model the same reduced numbers: the mean scoring time of the two
    # (rank 1 alone scores for 0.04 s or more).
    assert model0 == model1 and 0.015 < model0["estimates"]["score_s"] < 0.04
    assert "filter" in modes0 and modes0[-20:] == ["full"] * 20
    # one collective per step, and one at the round's start: the ranks agree on its length
    # (the summary came after)
    assert reduces0 == reduces1 == 61
    assert stats0["cost_switches"] == stats1["cost_switches"] == 1
