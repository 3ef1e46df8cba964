"""The Lightning integration in one process: the loss it backpropagates is `Worker.loss` of
the same plan batch, ids and kept set (importance weights from a real service included); a
module without a per-example loss fails at setup."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from hardbatch import Worker
from hardbatch.integrations import take
from hardbatch.integrations.lightning import HardbatchCallback


class MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 3))

    def per_sample_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self.net(x), y, reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class MeanLoss(MLP):
    def per_sample_loss(self, batch):
        return super().per_sample_loss(batch).mean()  # the batch mean: no use to the filter


class NoHook(MLP):
    per_sample_loss = None  # type: ignore[assignment]


def data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def trainer(*callbacks: pl.Callback, epochs: int = 2) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, callbacks=list(callbacks), accelerator="cpu",
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)


class AgainstTheWorker(pl.Callback):
    """At each backward, the same step through a `Worker` of the same config: same plan
    batch (ids and data), same kept set, same loss."""

    def __init__(self, config, dataset, batch_size, recorder) -> None:
        self.ref = Worker(config, dataset, batch_size, reporter=type(recorder)())
        self.recorder, self.steps = recorder, 0

    def on_train_epoch_start(self, trainer, pl_module):
        self.batches = iter(self.ref.batches(trainer.current_epoch))

    def on_before_backward(self, trainer, pl_module, loss):
        ids, batch = next(self.batches)
        keep = self.ref.select(ids, lambda: pl_module.per_sample_loss(batch))
        want = self.ref.loss(pl_module.per_sample_loss(take(batch, keep, len(ids))))
        got_ids, _, got_kept, _, _ = self.recorder.calls[-1]
        assert got_ids.tolist() == ids.tolist()
        assert sorted(got_kept.nonzero()[0].tolist()) == sorted(keep.tolist())
        torch.testing.assert_close(loss.detach(), want.detach())
        self.steps += 1


def test_the_loss_lightning_backpropagates_is_the_worker_loss(lightning_run, recorder_class):
    n, bs = 256, 32
    config, rec = lightning_run.worker_config, recorder_class()
    hb = HardbatchCallback(config, data(n), batch_size=bs, reporter=rec)
    check = AgainstTheWorker(config, data(n), bs, rec)
    trainer(hb, check).fit(MLP(), train_dataloaders=hb.loader)
    assert check.steps == 2 * (n // 2) // bs == len(rec.calls)  # 2 rounds of half the data
    weights = check.ref.sampler.current.weights  # the plans did weigh examples differently
    assert weights is not None and float(torch.cat(weights).std()) > 0
    assert 0 < hb.last_summary["samp_perc"] < 1
    check.ref.close()


def test_training_step_is_the_modules_own_again_after_fit():
    model, hb = MLP(), HardbatchCallback(None, data(64), batch_size=16)
    trainer(hb, epochs=1).fit(model, train_dataloaders=hb.loader)
    assert "training_step" not in model.__dict__ and hb.worker is None
    assert hb.state_dict()["step"] == 4


@pytest.mark.parametrize("module, message", [(NoHook, "has no per_sample_loss"),
                                             (MeanLoss, "one loss per example")])
def test_a_module_without_per_example_losses_fails_at_setup(module, message):
    hb = HardbatchCallback(None, data(64), batch_size=16)
    steps = []

    class Count(pl.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    with pytest.raises(TypeError, match=message):
        trainer(hb, Count()).fit(module(), train_dataloaders=hb.loader)
    assert not steps


def test_another_train_loader_is_refused_before_training():
    hb = HardbatchCallback(None, data(64), batch_size=16)
    with pytest.raises(ValueError, match="callback.loader"):
        trainer(hb).fit(MLP(), train_dataloaders=torch.utils.data.DataLoader(data(64)))


def test_the_loader_needs_its_callback_in_the_trainer():
    hb = HardbatchCallback(None, data(64), batch_size=16)
    with pytest.raises(RuntimeError, match="callbacks=\\[hb\\]"):
        trainer().fit(MLP(), train_dataloaders=hb.loader)


@pytest.mark.slow
def test_lightning_ddp_ranks_take_equal_steps_and_share_one_kept_fraction():
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("lightning_ddp.py")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, cwd=script.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = sorted(re.findall(r"^rank (\d) of 2: (.*)$", out.stdout, re.M))
    assert [r for r, _ in lines] == ["0", "1"], out.stdout
    assert lines[0][1] == lines[1][1]  # the same summary, reduced over both ranks
    assert "steps 16 " in lines[0][1]  # 512 examples, 2 ranks of 32, 2 epochs


class OneCycleMLP(MLP):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.5)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.5, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_packed_rounds_take_fewer_steps_and_the_schedule_still_ends(packed_run):
    n, bs, epochs = 256, 32, 3
    hb = HardbatchCallback(packed_run.worker_config, data(n), batch_size=bs)
    t = trainer(hb, epochs=epochs)
    t.fit(OneCycleMLP(), train_dataloaders=hb.loader)
    sched = t.lr_scheduler_configs[0].scheduler
    assert sched.total_steps == epochs * (n // bs)  # the run sized as full epochs
    assert 0 < t.global_step < epochs * (n // bs)  # packed rounds: fewer steps
    assert sched.last_epoch == sched.total_steps - 1  # and the schedule ran to its end
