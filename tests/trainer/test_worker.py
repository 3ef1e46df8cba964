"""The public worker API in one process: batches, selection, the normalized (weighted) loss,
reporting, state, and the plans of a real service behind it."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
from hardbatch.trainer.reporter import LossReporter
from hardbatch.trainer.task import iter_batches
from torch.utils.data import Dataset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from hardbatch import Driver, PlanConfig, Worker, WorkerConfig

# The filter on every step, from the first (the cost model measures full steps first; the
# gate turns it off for a round after one of flat losses).
FILTERING = WorkerConfig(cost_model=False, filter_gate=False)


class Recorder:
    def __init__(self):
        self.calls = []

    def report(self, ids, losses, kept, step, epoch):
        self.calls.append((ids.copy(), losses.copy(), kept.copy(), step, epoch))


class Squares(Dataset):
    """A map-style dataset that is not a TensorDataset (the DataLoader path)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.tensor([float(i)]), i % 3


def data(n: int = 100):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_batches_cover_every_sample_once_per_epoch_with_ids_matching_the_data():
    ds = data(100)
    with Worker(None, ds, batch_size=32) as hb:
        assert (hb.rank, hb.world_size) == (0, 1)
        epochs = []
        for epoch in (0, 1):
            batches = list(hb.batches(epoch))
            assert len(batches) == hb.steps_per_epoch == len(hb.loader) == 4
            assert [len(ids) for ids, _ in batches] == [32, 32, 32, 4]
            for ids, (x, y) in batches:
                assert torch.equal(x, ds.tensors[0][ids]) and torch.equal(y, ds.tensors[1][ids])
            epochs.append(torch.cat([ids for ids, _ in batches]))
            assert sorted(epochs[-1].tolist()) == list(range(100))
        assert not torch.equal(epochs[0], epochs[1])  # a new shuffle each epoch
    # Any map-style dataset works too, with the ids its items came from.
    with Worker(None, Squares(50), batch_size=16) as hb:
        for ids, (x, y) in hb.batches(0):
            assert torch.equal(x[:, 0], ids.float()) and torch.equal(y, ids % 3)


def test_loader_sampler_is_a_distributed_sampler_so_ray_keeps_it():
    with Worker(None, data(), batch_size=10) as hb:
        assert isinstance(hb.loader.sampler, DistributedSampler)
        hb.loader.sampler.set_epoch(3)  # Ray's idiom picks the round
        assert hb.epoch == 3
        assert [ids.tolist() for ids, _ in hb.loader] == [ids.tolist() for ids, _ in
                                                           hb.batches(3)]


def test_select_and_loss_train_on_the_hardest_and_report_every_scored_example():
    rec = Recorder()
    ds = data(64)
    model = torch.nn.Linear(4, 3)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    config = WorkerConfig(min_loss_perc=0.5, score_precision="fp32", cost_model=False,
                          filter_gate=False)
    with Worker(config, ds, batch_size=64, reporter=rec) as hb:
        ((ids, (x, y)),) = list(hb.batches(0))
        keep = hb.select(ids, lambda: loss_fn(model(x), y))
        kept_losses = loss_fn(model(x[keep]), y[keep])
        loss = hb.loss(kept_losses)
        scored = loss_fn(model(x), y).detach()
        assert len(keep) < 64 and float(scored[keep].sum()) >= 0.5 * float(scored.sum())
        torch.testing.assert_close(loss, kept_losses.sum() / len(keep))
        loss.backward()
        (r_ids, r_losses, r_kept, step, epoch) = rec.calls[0]
        assert np.array_equal(r_ids, ids.numpy()) and (step, epoch) == (1, 0)
        np.testing.assert_allclose(r_losses, scored.numpy(), rtol=1e-5)
        assert r_kept.sum() == len(keep) and r_kept[keep.numpy()].all()
        stats = hb.summary()
        assert stats["samp_perc"] == len(keep) / 64 and stats["steps"] == 1
        assert stats["loss_perc"] >= 0.5 and stats["train_loss"] == pytest.approx(
            float(scored.mean()), rel=1e-5)


def test_filter_off_trains_on_the_whole_batch_without_a_scoring_forward():
    rec = Recorder()
    with Worker(WorkerConfig(filter=False), data(40), batch_size=40, reporter=rec) as hb:
        ((ids, (x, y)),) = list(hb.batches(0))
        keep = hb.select(ids, lambda: pytest.fail("no scoring forward with the filter off"))
        assert keep == slice(None)
        losses = torch.rand(40)
        torch.testing.assert_close(hb.loss(losses), losses.mean())
        assert rec.calls[0][2].all() and np.allclose(rec.calls[0][1], losses.numpy())


def test_nan_raises_and_misuse_is_refused():
    with Worker(FILTERING, data(8), batch_size=8) as hb:
        ids = torch.arange(8)
        with pytest.raises(ValueError, match="NaN or inf"):
            hb.select(ids, torch.tensor([1.0, float("nan"), 1, 1, 1, 1, 1, 1]))
        with pytest.raises(RuntimeError, match="select"):
            hb.loss(torch.ones(2))
        with pytest.raises(ValueError, match="8 ids"):
            hb.select(ids, torch.ones(5))
        keep = hb.select(ids, torch.arange(8.0))
        with pytest.raises(ValueError, match="kept"):
            hb.loss(torch.ones(len(keep) + 1))
    with pytest.raises(ValueError, match="unknown worker config keys"):
        Worker({"min_loss": 0.5}, data(8), batch_size=8)
    with pytest.raises(ValueError, match="min_loss_perc"):
        WorkerConfig(min_loss_perc=2.0)


@pytest.mark.parametrize("config", [WorkerConfig(score_precision="fp32"),  # gate: full first
                                    WorkerConfig(filter=False)])
def test_a_nan_on_a_full_step_raises_before_backward(config):
    with Worker(config, data(8), batch_size=8) as hb:
        ids = torch.arange(8)
        assert hb.select(ids, torch.ones(8)) == slice(None)
        with pytest.raises(ValueError, match="NaN or inf loss at step 1 on 1 rank"):
            hb.loss(torch.tensor([1.0, float("nan"), 1, 1, 1, 1, 1, 1]))
    keep_going = dataclasses.replace(config, nonfinite="keep")
    with Worker(keep_going, data(8), batch_size=8) as hb:
        hb.select(torch.arange(8), torch.ones(8))
        assert hb.loss(torch.full((8,), float("inf"))).isinf()


def test_state_dict_continues_step_numbers():
    rec = Recorder()
    with Worker(FILTERING, data(20), batch_size=10, reporter=rec) as hb:
        for ids, (x, _) in hb.batches(0):
            keep = hb.select(ids, x.abs().sum(1))
            hb.loss(torch.ones(len(keep)))
        state = hb.state_dict()
    assert state["step"] == 2 and state["epoch"] == 0
    with Worker(FILTERING, data(20), batch_size=10, reporter=rec) as again:
        again.load_state_dict(state)
        ids, (x, _) = next(iter(again.batches(1)))
        keep = again.select(ids, x.abs().sum(1))
        again.loss(torch.ones(len(keep)))
        assert rec.calls[-1][3:] == (3, 1)


def test_the_gate_filters_only_where_the_kept_share_says_it_pays():
    flat = torch.ones(16)  # the filter keeps (or would keep) 15 of 16, and stays there
    peaked = torch.full((16,), 0.01)
    peaked[0] = 100.0  # one sample carries the loss: 1 of 16
    scorings = []

    def run_round(hb, epoch, losses):
        for ids, _ in hb.batches(epoch):
            keep = hb.select(ids, lambda: scorings.append(epoch) or losses)
            hb.loss(losses[keep])
        return hb.summary()

    # 4 batches a round: each is a stretch of its own (8 a round at most). The kept share
    # alone decides (the step-cost curve is the next test's).
    config = WorkerConfig(score_precision="fp32", step_curve=False)
    with Worker(config, data(64), batch_size=16) as hb:
        zero = run_round(hb, 0, flat)  # starts with full steps; flat: stays there
        assert zero["filter_steps"] == 0.0 and zero["samp_perc"] == 1.0
        state = hb.state_dict()
        one = run_round(hb, 1, peaked)  # a full step finds 1 of 16 would do: filters from
        assert one["filter_steps"] == 0.75 and one["cost_switches"] == 1  # the next batch
        assert one["samp_perc"] == pytest.approx((16 + 3) / 64)
        two = run_round(hb, 2, flat)  # one filtered batch keeps 15 of 16: full again
        assert two["filter_steps"] == 0.25 and two["cost_switches"] == 1
    assert scorings == [1, 1, 1, 2]
    # A checkpoint decides alike.
    with Worker(config, data(64), batch_size=16) as again:
        again.load_state_dict(state)
        assert run_round(again, 1, peaked)["filter_steps"] == 0.75
    # Gate off: the filter on every step, flat losses or not.
    with Worker(WorkerConfig(score_precision="fp32", filter_gate=False), data(64),
                batch_size=16) as hb:
        assert run_round(hb, 0, flat)["filter_steps"] == 1.0


@pytest.mark.parametrize("b, filters", [(0.0, False), (1e-3, True)])
def test_the_step_cost_curve_of_round_0_keeps_the_filter_off_where_shrinking_cannot_pay(
        b, filters):
    from hardbatch.sampler.cost_model import StepCurve

    peaked = torch.full((16,), 0.01)
    peaked[0] = 100.0  # 1 of 16 carries the loss: the kept share says filter
    config = WorkerConfig(score_precision="fp32", step_curve=True)
    with Worker(config, data(128), batch_size=16) as hb:
        for ids, _ in hb.batches(0):
            keep = hb.select(ids, peaked)
            hb.loss(peaked[keep])
        assert hb.curve.steps == 4  # measured in round 0: the 8 steps less 3 of warm-up and
        # the last, which ends at the next round's first select
        assert hb.summary()["filter_steps"] > 0  # round 0: the kept share alone
        # What round 0 measured, made exact: a step of n samples costs 0.01 + b n seconds and
        # scoring 1 ms; b = 0 (a GPU's small model) never pays for a shrunk batch.
        hb.curve = StepCurve()
        for n in (1, 4, 16, 16):
            hb.curve.add(n, 0.01 + b * n, score_s=0.001)
        for ids, _ in hb.batches(1):
            keep = hb.select(ids, peaked)
            hb.loss(peaked[keep])
        one = hb.summary()
        assert (one["filter_steps"] > 0) == filters
        assert hb.state_dict()["filter_gate"]["shrink_below"] == (
            0.0 if b == 0 else pytest.approx(1 - 0.001 / (b * 16)))
        assert one["step_cost"]["steps"] == 4 and one["step_cost"]["b"] == pytest.approx(b)


@pytest.mark.parametrize("slow", ["bf16", "fp32"])
def test_score_precision_auto_on_a_cpu_scores_in_bf16_only_where_that_is_faster(slow):
    seen = []

    def score():
        bf16 = torch.is_autocast_enabled("cpu")
        if bf16 == (slow == "bf16"):
            time.sleep(0.005)
        seen.append(bf16)
        return torch.ones(8)

    with Worker(WorkerConfig(score_precision="auto", filter_gate=False), data(16),
                batch_size=8, device="cpu") as hb:
        for ids, _ in hb.batches(0):
            hb.loss(torch.ones(len(hb.select(ids, score))))
    probe, used = seen[:-2], seen[-2:]  # the first batch times both, then two real scorings
    assert probe.count(True) == probe.count(False)
    assert used == [slow == "fp32"] * 2


def test_iter_batches_is_lazy_for_any_dataset():
    read = []

    def plan():
        for b in range(10):
            read.append(b)
            yield torch.arange(b * 5, b * 5 + 5)

    batches = iter_batches(Squares(50), plan())
    for b in range(3):
        ids, _ = next(batches)
        assert ids.tolist() == list(range(b * 5, b * 5 + 5))
        assert read == list(range(b + 1))  # not the whole plan up front


def test_the_next_round_is_composed_from_all_of_this_rounds_losses(redis_url):
    # An adaptive size (factor 1, floor 5%): round 1 trains the share of samples carrying 90%
    # of round 0's losses. Ids below 100 carry 96% of them.
    plan = PlanConfig(size_factor=1.0, beta=0.0)
    with Driver(2000, rounds=2, redis=redis_url, run="worker-after", plan=plan,
                ray_address=None, worker=FILTERING) as d, \
            Worker(d.worker_config, Squares(2000), batch_size=100) as hb:
        assert hb._plans.after_losses
        for ids, _ in hb.batches(0):
            losses = torch.where(ids < 100, 5.0, 0.01)
            keep = hb.select(ids, losses)
            hb.loss(losses[keep])
        # No wait here: the worker sends the round's last losses at once and the service
        # waits until it has all 2000 before it composes round 1.
        trained = torch.cat([ids for ids, _ in hb.batches(1)])
        trained = trained[trained >= 0]
        assert len(trained) == 100, len(trained)  # the floor: 5% of 2000
        assert (trained < 100).float().mean() > 0.5  # the hard ones, from every loss of round 0
        assert d.info()["records"] == 2000


def test_workers_apply_plan_weights_whenever_the_noise_guard_can_zero_one(redis_url):
    # beta = 0 carries no importance weights, but a suspect's weight 0 must still apply:
    # otherwise the filter would keep training on suspected label errors.
    cases = [(PlanConfig(beta=0.0), True), (PlanConfig(beta=0.0, suspect_factor=0.0), False),
             (PlanConfig(beta=0.5, suspect_factor=0.0), True)]
    for k, (plan, applied) in enumerate(cases):
        with Driver(2000, rounds=2, redis=redis_url, run=f"worker-wflag-{k}", plan=plan,
                    ray_address=None) as d:
            assert d.worker_config["importance_weights"] is applied, plan


def test_importance_weights_of_the_plan_scale_each_kept_loss(redis_url):
    n, bs = 2000, 100
    plan = PlanConfig(alpha=2.0, lam=0.1, beta=1.0)
    # Half the data a round: inclusion probabilities, and so weights, differ by hardness.
    with Driver(n, rounds=2, redis=redis_url, run="worker-weights", plan=plan,
                ray_address=None, worker=WorkerConfig(plan_fraction=0.5, cost_model=False)
                ) as d:
        # Some history first, so the service's priorities (and weights) differ per sample.
        rep = LossReporter(d.redis_url, d.run, rank=0)
        rep.report(np.arange(n), np.linspace(0.01, 3.0, n, dtype=np.float32),
                   np.ones(n, dtype=bool), 1, 0)
        assert rep.close(30).ok
        # Rounds lean on the priorities of the last refresh, not on the table: wait for both.
        deadline = time.monotonic() + 30
        while (d.info().get("priorities_records") or 0) < n:
            assert time.monotonic() < deadline, d.info()
            time.sleep(0.1)
        assert d.worker_config["importance_weights"]
        with Worker(d.worker_config, data(n), batch_size=bs) as hb:
            ids, (x, _) = next(iter(hb.batches(0)))
            scored = x.abs().sum(1)
            keep = hb.select(ids, scored)
            loss = hb.loss(scored[keep])
        with d.client() as client:
            p = client.plan(d.run, rank=0, world_size=1, round=0, batches=n // 2 // bs,
                            batch_size=bs, with_weights=True)
    w = dict(zip(p.ids.ravel().tolist(), p.weights.ravel().tolist(), strict=True))
    kept_w = torch.tensor([w[i] for i in ids[keep].tolist()])
    assert kept_w.min() < 0.99 * kept_w.max()  # the weights do differ
    torch.testing.assert_close(loss, (kept_w * scored[keep]).sum() / kept_w.sum())


def test_weight_zero_is_never_trained_and_weights_normalize_the_loss():
    from hardbatch.trainer.plan_source import Round

    n, bs = 8, 8
    ds = TensorDataset(torch.arange(n, dtype=torch.float32)[:, None], torch.zeros(n))
    ids = torch.arange(n)
    # The plan flags sample 7 (the hardest) as a suspect: weight 0.
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5, 2.0, 1.5, 0.0])
    rec = Recorder()
    cfg = WorkerConfig(importance_weights=True, min_loss_perc=0.9, cost_model=False,
                       filter_gate=False)
    with Worker(cfg, ds, batch_size=bs, reporter=rec) as hb:
        hb.sampler._rounds = lambda e: Round([ids], [weights])
        got_ids, (x, _) = next(iter(hb.batches(0)))
        scored = x[:, 0] + 1.0  # losses 1..8: the filter keeps the top ids 7, 6, 5, 4, ...
        keep = hb.select(got_ids, scored)
        # Ranked by w * l (7 has none): 5 (12), 6 (10.5), 3 (4), 2 (3), 4 (2.5) carry 90%.
        assert 7 not in got_ids[keep].tolist()
        assert got_ids[keep][:3].tolist() == [5, 6, 3]
        loss = hb.loss(scored[keep])
    w = weights[got_ids[keep]]
    torch.testing.assert_close(loss, (w * scored[keep]).sum() / w.sum())
    (_, losses, kept, _, _), = rec.calls
    assert len(losses) == n and not kept[7]  # scored and reported, not trained


def test_skipped_slots_are_never_loaded_scored_or_reported_and_the_steps_stay():
    from hardbatch.trainer.plan_source import Round

    n, bs = 12, 4
    ds = TensorDataset(torch.arange(n, dtype=torch.float32)[:, None], torch.zeros(n))
    batches = list(torch.arange(n).reshape(3, bs))
    # An adaptive plan: 1-2 ids of each batch trained, the rest marked -1 (skip).
    weights = [torch.tensor([1.0, -1.0, -1.0, -1.0]), torch.tensor([-1.0, 1.0, 1.0, -1.0]),
               torch.tensor([-1.0, -1.0, -1.0, 1.0])]
    rec = Recorder()
    cfg = WorkerConfig(importance_weights=True, cost_model=False)
    with Worker(cfg, ds, batch_size=bs, reporter=rec) as hb:
        hb.sampler._rounds = lambda e: Round(batches, weights)
        seen = []
        for ids, (x, _) in hb.batches(0):
            assert x[:, 0].tolist() == ids.tolist()  # the items are the ids' own
            seen.append(ids.tolist())
            keep = hb.select(ids, x[:, 0] + 1.0)
            hb.loss(x[keep, 0] + 1.0)
        assert hb.step == 3 and hb.steps_per_epoch == 3
        summary = hb.summary()
        assert summary["scored_perc"] == pytest.approx(4 / 12)
        assert summary["scored"] == 4  # counted by the worker, whatever the store got
    assert seen == [[0], [5, 6], [11]]
    assert [c[0].tolist() for c in rec.calls] == seen  # only what was scored is reported


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
def test_a_packed_round_trains_fewer_full_batches_and_the_schedule_still_decays_fully():
    from hardbatch.trainer.plan_source import Round

    n, bs, epochs = 40, 4, 3
    ds = TensorDataset(torch.arange(n, dtype=torch.float32)[:, None], torch.zeros(n))
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = WorkerConfig(importance_weights=True, filter=False)
    with Worker(cfg, ds, batch_size=bs) as hb:
        full = hb.steps_per_epoch
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=epochs * full)
        plain = torch.optim.lr_scheduler.OneCycleLR(
            torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1), max_lr=0.1,
            total_steps=epochs * full)
        # Round 0 full (10 batches), then packed: 3 batches, the last one short (2 of 4).
        packed = ([torch.arange(i, i + 4) for i in range(0, 12, 4)],
                  [torch.ones(4), torch.ones(4), torch.tensor([1.0, 1.0, -1.0, -1.0])])
        hb.sampler._rounds = lambda e: (Round(list(torch.arange(n).reshape(10, bs))) if e == 0
                                        else Round(*packed))
        lengths, progress = [], []
        for epoch in range(epochs):
            batches = hb.batches(epoch)
            lengths.append(len(batches))
            sizes = []
            for ids, (x, _) in batches:
                sizes.append(len(ids))
                keep = hb.select(ids, x[:, 0])
                hb.loss(model(x[keep])[:, 0]).backward()
                opt.step()
                hb.schedule_step(sched)
                if epoch == 0:
                    plain.step()
                    assert sched.last_epoch == plain.last_epoch  # full rounds: one per step
                progress.append(hb.progress(epochs))
            if epoch:
                assert sizes == [4, 4, 2]
        assert lengths == [10, 3, 3] and hb.step == 16
        # Three packed steps cover a whole epoch of the schedule: it ends where plain's does.
        assert progress[-1] == pytest.approx(1.0)
        assert progress == sorted(progress)
        assert sched.last_epoch == epochs * full - 1
        while plain.last_epoch < epochs * full - 1:
            plain.step()
        assert sched.get_last_lr() == pytest.approx(plain.get_last_lr())
