"""The transformers integration in one process: the loss `HardbatchTrainer` backpropagates is
`Worker.loss` of the same plan batch, ids and kept set (importance weights from a real service
included), for a `PreTrainedModel` built in code with dict batches; a model or batch without a
per-example loss fails before training; evaluation keeps the model's own loss."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.modeling_outputs import BaseModelOutput

from hardbatch import Worker
from hardbatch.integrations import take
from hardbatch.integrations.transformers import IDS, HardbatchTrainer, logits_loss

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "transformers_ray.py"
spec = importlib.util.spec_from_file_location("transformers_ray_example", EXAMPLE)
ex = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ex)  # the tiny model and token data of the example, without Ray


def args(tmp_path, epochs: int = 2, **kw) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), num_train_epochs=epochs,
                             learning_rate=1e-2, per_device_train_batch_size=32,
                             save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True, seed=0, **kw)


def model():
    torch.manual_seed(0)
    return ex.TinyClassifier(ex.TinyConfig())


class Checked(HardbatchTrainer):
    """At each training loss, the same step through a `Worker` of the same config: same
    plan batch (ids and data), same kept set, same loss."""

    def __init__(self, *a, recorder, **kw):
        super().__init__(*a, reporter=recorder, **kw)
        self.recorder, self.steps, self.batches = recorder, 0, None
        self.ref = Worker(self.hardbatch_config, self.train_dataset, self._train_batch_size,
                          reporter=type(recorder)(), collate_fn=self.data_collator)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        got = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if IDS not in inputs:
            return got
        epoch = self.worker.epoch
        if self.batches is None or self.batches[0] != epoch:
            self.batches = epoch, iter(self.ref.batches(epoch))
        ids, batch = next(self.batches[1])
        keep = self.ref.select(ids, lambda: logits_loss(model(**batch), batch))
        kept = take(batch, keep, len(ids))
        want = self.ref.loss(logits_loss(model(**kept), kept))
        got_ids, _, got_kept, _, _ = self.recorder.calls[-1]
        assert got_ids.tolist() == ids.tolist() == inputs[IDS].tolist()
        assert sorted(got_kept.nonzero()[0].tolist()) == sorted(keep.tolist())
        torch.testing.assert_close(got.detach(), want.detach())
        self.steps += 1
        return got


def test_the_loss_the_trainer_backpropagates_is_the_worker_loss(transformers_run,
                                                                 recorder_class, tmp_path):
    n, rec = 256, recorder_class()
    trainer = Checked(model=model(), args=args(tmp_path), train_dataset=ex.token_data(n, 0),
                      hardbatch=transformers_run.worker_config, recorder=rec)
    trainer.train()
    assert trainer.steps == 2 * (n // 2) // 32 == len(rec.calls)  # 2 rounds of half the data
    weights = trainer.ref.sampler.current.weights  # the plans did weigh examples differently
    assert weights is not None and float(torch.cat(weights).std()) > 0
    kept = [e["hardbatch_kept"] for e in trainer.state.log_history if "hardbatch_kept" in e]
    assert len(kept) == 2 and all(0 < k < 1 for k in kept)
    assert trainer.worker is None  # closed at the end of training
    trainer.ref.close()


def test_training_learns_and_evaluation_uses_the_models_own_loss(tmp_path):
    trainer = HardbatchTrainer(model=model(), args=args(tmp_path, epochs=3, eval_strategy="epoch"),
                               train_dataset=ex.token_data(1000, 0),
                               eval_dataset=ex.token_data(300, 1, noise=0.0),
                               compute_metrics=ex.accuracy)
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] > 0.5  # 4 classes: chance is 0.25
    assert metrics["eval_loss"] > 0


class NoLogits(ex.TinyClassifier):
    def forward(self, input_ids, attention_mask=None, labels=None):
        out = super().forward(input_ids, attention_mask, labels)
        return BaseModelOutput(last_hidden_state=out.logits)


def mean_loss(outputs, inputs):
    return logits_loss(outputs, inputs).mean()


@pytest.mark.parametrize("make, kw, message", [
    (lambda: NoLogits(ex.TinyConfig()), {}, "needs outputs.logits"),
    (model, {"per_sample_loss": mean_loss}, "one loss per example"),
])
def test_no_per_example_loss_fails_before_the_first_step(tmp_path, make, kw, message):
    steps = []

    class Count(TrainerCallback):
        def on_step_begin(self, *a, **k):
            steps.append(1)

    trainer = HardbatchTrainer(model=make(), args=args(tmp_path),
                               train_dataset=ex.token_data(64, 0), callbacks=[Count()], **kw)
    with pytest.raises(TypeError, match=message):
        trainer.train()
    assert not steps


def test_a_loss_that_is_not_a_function_is_refused(tmp_path):
    with pytest.raises(TypeError, match="per_sample_loss must be a function"):
        HardbatchTrainer(model=model(), args=args(tmp_path), train_dataset=ex.token_data(8, 0),
                         per_sample_loss="cross_entropy")


def test_logits_loss_ignores_masked_positions_and_handles_regression():
    logits = torch.zeros(2, 3, 4)
    labels = torch.tensor([[1, -100, -100], [0, 1, 2]])
    torch.testing.assert_close(logits_loss({"logits": logits}, {"labels": labels}),
                               torch.log(torch.tensor([4.0, 4.0])))
    reg = logits_loss({"logits": torch.tensor([[1.0], [3.0]])},
                      {"labels": torch.tensor([0.0, 1.0])})
    torch.testing.assert_close(reg, torch.tensor([1.0, 4.0]))


def test_packed_rounds_take_fewer_steps_and_the_schedule_still_ends(packed_run, tmp_path):
    data = ex.token_data(256, seed=0)
    t = HardbatchTrainer(model=model(), args=args(tmp_path, epochs=3, lr_scheduler_type="linear"),
                         train_dataset=data, hardbatch=packed_run.worker_config)
    t.train()
    full = 3 * (256 // 32)
    assert t.state.max_steps == full  # the run sized as full epochs
    assert 0 < t.state.global_step < full  # packed rounds: fewer steps
    assert t.lr_scheduler.last_epoch == full  # and the schedule ran to its end: LR 0
    assert t.lr_scheduler.get_last_lr()[0] == 0.0
