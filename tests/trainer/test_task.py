from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hardbatch.trainer import tabular_task
from hardbatch.trainer.task import Task, TaskArgs, count_correct, load_task, logits_of


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


@pytest.mark.parametrize("name", ["mnist1d", "tabular", "sequence", "images"])
def test_short_names_resolve_to_builtin_tasks_that_train_offline(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HARDBATCH_CACHE", str(tmp_path))
    task = load_task(name)(TaskArgs(num_samples=300, width=8, seed=0))
    assert task.num_samples == 300 and task.noisy_ids is None
    assert task.metric == ("val_loss" if name == "sequence" else "accuracy")
    x, y = task.train[0]
    right, made = count_correct(task.logits(task.model(x[None])), y[None])
    assert made == y.numel() and 0 <= right <= made


def test_tabular_data_are_deterministic_per_data_seed_and_balanced():
    a = tabular_task.make_arrays(2000, 500, seed=42)
    b = tabular_task.make_arrays(2000, 500, seed=42)
    c = tabular_task.make_arrays(2000, 500, seed=43)
    assert np.array_equal(a["x"], b["x"]) and np.array_equal(a["y"], b["y"])
    assert not np.array_equal(a["y"], c["y"])
    shares = np.bincount(a["y"], minlength=tabular_task.CLASSES) / len(a["y"])
    assert shares.min() > 0.1  # no class dominates the table
    assert abs(float(a["x"][:, :tabular_task.NUMERIC].mean())) < 1e-3  # standardized on train


@pytest.mark.parametrize("name", ["mnist1d", "tabular"])
def test_noise_flips_that_share_of_training_labels_and_leaves_validation_clean(
        name, tmp_path, monkeypatch):
    monkeypatch.setenv("HARDBATCH_CACHE", str(tmp_path))
    make = load_task(name)
    clean = make(TaskArgs(num_samples=1000, width=8))
    noisy = make(TaskArgs(num_samples=1000, width=8, extra={"noise": "0.2"}))
    y_clean, y_noisy = clean.train.tensors[1].numpy(), noisy.train.tensors[1].numpy()
    changed = np.flatnonzero(y_clean != y_noisy)
    assert noisy.noisy_ids is not None and len(noisy.noisy_ids) == 200
    assert np.array_equal(changed, noisy.noisy_ids)  # every listed label changed, no other did
    assert torch.equal(clean.val.tensors[1], noisy.val.tensors[1])
    assert torch.equal(clean.train.tensors[0], noisy.train.tensors[0])


@pytest.mark.parametrize("name, extra, match", [
    ("tabular", {"noise": "1.5"}, "noise must be in"),
    ("mnist1d", {"noise": "lots"}, "noise must be a number"),
    ("sequence", {"noise": "0.1"}, "does not take noise"),
    ("tabular", {"nosie": "0.1"}, "does not take nosie"),
])
def test_bad_task_arguments_are_refused_clearly(name, extra, match, tmp_path, monkeypatch):
    monkeypatch.setenv("HARDBATCH_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=match):
        load_task(name)(TaskArgs(num_samples=200, width=8, extra=extra))


def test_count_correct_scores_each_element_in_either_layout():
    y = torch.tensor([[0, 1, 2], [2, 2, 0]])
    onehot = torch.nn.functional.one_hot(y, 4).float()  # (B, T, C): classes last
    assert count_correct(onehot, y) == (6, 6)
    assert count_correct(onehot.transpose(1, 2), y) == (6, 6)  # (B, C, T) as cross_entropy
    assert count_correct(torch.eye(3)[[0, 1, 1]], torch.tensor([0, 1, 2])) == (2, 3)
    with pytest.raises(ValueError, match="do not fit"):
        count_correct(torch.zeros(2, 5), torch.zeros(2, 3, dtype=torch.long))


def test_a_task_metric_must_be_known():
    with pytest.raises(ValueError, match="metric must be one of"):
        Task(model=torch.nn.Linear(1, 1), train=[], val=[], metric="f1")  # type: ignore[arg-type]


def test_skipped_slots_are_dropped_unloaded():
    from hardbatch.trainer.task import IdCollate, IdDataset

    class Loud(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            assert i >= 0, "a skipped slot was loaded"
            return torch.tensor([float(i)])

    tensors = torch.utils.data.TensorDataset(torch.arange(10.0)[:, None])
    for ds in (Loud(), tensors):
        ids, batch = IdCollate()(IdDataset(ds).__getitems__([3, -1, 8, -1]))
        assert ids.tolist() == [3, 8]
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        assert x[:, 0].tolist() == [3.0, 8.0]
