from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hardbatch.trainer.task import TaskArgs, load_task, logits_of


def test_logits_of_understands_common_model_outputs():
    t = torch.randn(2, 3)
    assert logits_of(t) is t
    assert logits_of((t, "aux")) is t
    assert logits_of({"logits": t, "loss": None}) is t
    assert logits_of(SimpleNamespace(logits=t)) is t
    with pytest.raises(TypeError, match="cannot find logits"):
        logits_of({"scores": t})


@pytest.mark.parametrize("path", ["nocolon", "no.such.module:make",
                                  "hardbatch.trainer.task:nothing", ":make",
                                  "hardbatch.trainer.task:"])
def test_load_task_rejects_bad_paths_clearly(path):
    with pytest.raises(ValueError):
        load_task(path)


def test_builtin_task_is_generated_offline_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HARDBATCH_CACHE", str(tmp_path))
    make = load_task("hardbatch.trainer.mnist1d_task:make")
    task = make(TaskArgs(num_samples=600, width=8, seed=3))
    assert task.num_samples == 600 and len(task.val) == 120
    x, y = task.train[0]
    assert x.shape == (40,) and 0 <= int(y) < 10
    assert list(tmp_path.glob("mnist1d-600-120-42.npz"))
    again = make(TaskArgs(num_samples=600, width=8, seed=4))
    assert torch.equal(again.train.tensors[0], task.train.tensors[0])  # data do not follow seed
    with pytest.raises(ValueError):
        make(TaskArgs(num_samples=0))
