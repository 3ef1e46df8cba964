"""Run as a script by test_lightning_ddp: Lightning's own `strategy="ddp"` launcher starts a
second process that re-runs this file, so it cannot run inside pytest."""

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_lightning import MLP, data  # noqa: E402

from hardbatch.integrations.lightning import HardbatchCallback  # noqa: E402

torch.set_num_threads(1)
hb = HardbatchCallback({"score_precision": "fp32"}, data(512), batch_size=32)
trainer = pl.Trainer(max_epochs=2, strategy="ddp", devices=2, accelerator="cpu", callbacks=[hb],
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False)
trainer.fit(MLP(), train_dataloaders=hb.loader)
s = hb.last_summary
# One write(2) of a short line to the shared pipe: the two ranks' lines cannot interleave
# (print's separate writes of text and newline did: "...0.958704rank 1 of 2: ...").
line = (f"rank {trainer.global_rank} of {trainer.world_size}: steps {hb.state_dict()['step']} "
        f"kept {s['samp_perc']:.6f} share {s['loss_perc']:.6f}\n")
sys.stdout.flush()
os.write(sys.stdout.fileno(), line.encode())
