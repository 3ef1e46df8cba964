from __future__ import annotations

import dataclasses

import pytest
import torch
from hardbatch.trainer.train import TrainConfig, fit
from hardbatch.trainer.worker import local_plan

SMALL = TrainConfig(num_samples=1200, epochs=2, batch_size=100, width=16, progress=False,
                    threads=1)


def test_local_plan_is_a_seeded_permutation():
    a = local_plan(1000, 128, seed=1, epoch=0)
    assert len(a) == 8 and len(a[-1]) == 1000 - 7 * 128
    assert sorted(torch.cat(a).tolist()) == list(range(1000))
    assert all(torch.equal(x, y) for x, y in zip(a, local_plan(1000, 128, 1, 0), strict=True))
    assert not torch.equal(a[0], local_plan(1000, 128, 1, 1)[0])


def test_runs_are_reproducible_on_cpu():
    # The cost model and score_precision=auto decide from measured times: the deterministic
    # schedule is without them.
    det = dataclasses.replace(SMALL, cost_model=False, device="cpu", score_precision="fp32",
                              step_curve=False)
    a, b = fit(det), fit(det)
    assert [e["val_loss"] for e in a.evals] == [e["val_loss"] for e in b.evals]
    assert [e["samp_perc"] for e in a.epochs] == [e["samp_perc"] for e in b.epochs]


class Recorder:
    def __init__(self):
        self.calls = []

    def report(self, ids, losses, kept, step, epoch):
        self.calls.append((ids.copy(), losses.copy(), kept.copy(), step, epoch))


def test_filter_keeps_step_count_and_lr_schedule_and_reports_every_scored_example():
    rec = Recorder()
    eval_steps: dict[bool, list[int]] = {}
    for filt in (False, True):
        # No gate: 12 steps of a tiny model leave round 0's losses flat, and it would turn
        # the filter off for round 1.
        cfg = dataclasses.replace(SMALL, filter=filt, filter_gate=False)
        r = fit(cfg, reporter=rec if filt else None)
        assert len(r.epochs) == 2 and r.evals[-1]["step"] == 24  # 12 steps per epoch, both ways
        eval_steps[filt] = [e["step"] for e in r.evals]
        assert set(r.epochs[0]) >= {"train_loss", "val_loss", "val_accuracy", "samp_perc",
                                    "loss_perc", "epoch_time_s", "train_time_s"}
        if filt:
            assert 0 < r.epochs[-1]["samp_perc"] < 1
            assert r.epochs[-1]["loss_perc"] >= 0.9
        else:
            assert r.epochs[-1]["samp_perc"] == 1.0
    assert eval_steps[False] == eval_steps[True]
    # every sample of every epoch was reported once per epoch, with its kept flag
    assert len(rec.calls) == 24
    for epoch in (0, 1):
        ids = torch.cat([torch.from_numpy(c[0]) for c in rec.calls if c[4] == epoch])
        assert sorted(ids.tolist()) == list(range(1200))
    ids, losses, kept, step, _ = rec.calls[0]
    assert ids.dtype.kind == "i" and losses.dtype.name == "float32" and kept.dtype == bool
    assert len(ids) == len(losses) == len(kept) == 100 and step == 1 and kept.any()


@pytest.mark.parametrize("task", ["tests.trainer.custom_task:make",
                                  "tests.trainer.custom_task:make_dict_model"])
def test_user_task_with_object_or_dict_outputs_trains(task):
    cfg = dataclasses.replace(SMALL, task=task, num_samples=512, batch_size=64, width=8,
                              epochs=3, lr=0.05)
    r = fit(cfg)
    assert r.final_accuracy > 0.5  # three classes; chance is ~1/3
    assert r.epochs[-1]["samp_perc"] < 1.0


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"batch_size": -1}, {"min_loss_perc": 1.2},
                                 {"lr": 0.0}, {"device": "tpu"}, {"score_precision": "fp8"}])
def test_bad_config_is_rejected(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_evals_per_epoch_gives_finer_curves():
    r = fit(dataclasses.replace(SMALL, evals_per_epoch=3))
    assert [e["step"] for e in r.evals] == [4, 8, 12, 16, 20, 24]
    assert r.time_to_accuracy(0.0) == r.evals[0]["train_time_s"]
    assert r.time_to_accuracy(1.01) is None


def test_bf16_training_trains_and_differs_from_fp32():
    fp32 = fit(SMALL)
    bf16 = fit(dataclasses.replace(SMALL, precision="bf16"))
    assert bf16.config["precision"] == "bf16"
    assert bf16.final_accuracy > 0.2  # ten classes: it learned
    assert bf16.evals[-1]["val_loss"] < bf16.evals[0]["val_loss"] * 1.05
    assert [e["val_loss"] for e in bf16.evals] != [e["val_loss"] for e in fp32.evals]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal off CUDA")
def test_fp16_needs_cuda_and_says_so():
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        fit(dataclasses.replace(SMALL, precision="fp16"))
    with pytest.raises(ValueError, match="precision must be"):
        TrainConfig(precision="fp8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a gradient scaler is CUDA")
def test_fp16_trains_on_cuda_with_a_scaler():
    r = fit(dataclasses.replace(SMALL, precision="fp16", device="cuda"))
    assert r.final_accuracy > 0.2


def test_per_position_outputs_get_per_element_accuracy():
    cfg = dataclasses.replace(SMALL, task="sequence", num_samples=400, width=8, epochs=1,
                              batch_size=100)
    r = fit(cfg)
    assert 0.0 < r.final_accuracy <= 1.0  # per position, not positions per sample
    assert r.epochs[-1]["samp_perc"] <= 1.0
