from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from hardbatch.trainer import images_task
from hardbatch.trainer.task import TaskArgs, count_correct, load_task
from hardbatch.trainer.train import TrainConfig, fit


def test_images_data_are_deterministic_per_data_seed_balanced_and_standardized():
    a = images_task.make_arrays(2000, 500, seed=42)
    b = images_task.make_arrays(2000, 500, seed=42)
    c = images_task.make_arrays(2000, 500, seed=43)
    assert np.array_equal(a["x"], b["x"]) and np.array_equal(a["y"], b["y"])
    assert not np.array_equal(a["x"], c["x"])
    size = images_task.SIZE
    assert a["x"].shape == (2000, 1, size, size) and a["x_val"].shape == (500, 1, size, size)
    assert a["x"].dtype == np.float32 and a["y"].dtype == np.int64
    shares = np.bincount(a["y"], minlength=images_task.CLASSES) / len(a["y"])
    assert shares.min() > 0.08  # about balanced: 10% each
    assert abs(float(a["x"].mean())) < 1e-3 and abs(float(a["x"].std()) - 1) < 1e-3


def test_strokes_are_drawn_where_they_are_placed():
    # One bright horizontal stroke at the centre: brightest in the middle rows, fading along.
    stroke = np.array([[[0.0, 0.0, 0.0, 0.4, 0.1, 1.0]]])
    img = images_task._render(stroke).reshape(images_task.SIZE, images_task.SIZE)
    mid = images_task.SIZE // 2
    # The four middle pixels are each half a pixel (1/16) off the centre along both axes.
    peak = np.exp(-0.5 * ((1 / 16 / 0.4) ** 2 + (1 / 16 / 0.1) ** 2))
    assert img.max() == pytest.approx(peak, rel=1e-5)
    assert img[mid, mid] == pytest.approx(peak, rel=1e-5)
    assert img[mid - 1, mid - 1] == pytest.approx(peak, rel=1e-5)
    assert img[mid, 0] > img[0, mid]  # elongated along x, narrow along y


def test_short_name_gives_an_image_task_judged_by_accuracy():
    task = load_task("images")(TaskArgs(num_samples=300, width=8, seed=0))
    assert task.num_samples == 300 and len(task.val) == 100 and task.noisy_ids is None
    assert task.metric == "accuracy" and task.num_classes == images_task.CLASSES
    x, y = task.train[0]
    assert tuple(x.shape) == (1, images_task.SIZE, images_task.SIZE)
    out = task.logits(task.model(x[None]))
    assert tuple(out.shape) == (1, images_task.CLASSES)
    right, made = count_correct(out, y[None])
    assert made == 1 and 0 <= right <= 1
    again = load_task("images")(TaskArgs(num_samples=300, width=8, seed=1))
    assert torch.equal(again.train.tensors[0], task.train.tensors[0])  # data do not follow seed


def test_model_has_no_batch_statistics():
    # The filter scores in train mode: a sample's output must not depend on its batch.
    task = images_task.make(TaskArgs(num_samples=200, width=8))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                   for m in task.model.modules())
    x = task.train.tensors[0][:16]
    task.model.train()
    with torch.no_grad():
        assert torch.allclose(task.model(x)[:4], task.model(x[:4]), atol=1e-5)


def test_noise_flips_that_share_of_training_labels_and_leaves_validation_clean():
    clean = images_task.make(TaskArgs(num_samples=1000, width=8))
    noisy = images_task.make(TaskArgs(num_samples=1000, width=8, extra={"noise": "0.2"}))
    y_clean, y_noisy = clean.train.tensors[1].numpy(), noisy.train.tensors[1].numpy()
    changed = np.flatnonzero(y_clean != y_noisy)
    assert noisy.noisy_ids is not None and len(noisy.noisy_ids) == 200
    assert np.array_equal(changed, noisy.noisy_ids)  # every listed label changed, no other did
    assert torch.equal(clean.val.tensors[1], noisy.val.tensors[1])
    assert torch.equal(clean.train.tensors[0], noisy.train.tensors[0])


@pytest.mark.parametrize("extra, match", [
    ({"noise": "1.5"}, "noise must be in"),
    ({"noise": "lots"}, "noise must be a number"),
    ({"nosie": "0.1"}, "does not take nosie"),
])
def test_bad_task_arguments_are_refused_clearly(extra, match):
    with pytest.raises(ValueError, match=match):
        images_task.make(TaskArgs(num_samples=200, width=8, extra=extra))
    with pytest.raises(ValueError, match="must be >= 1"):
        images_task.make(TaskArgs(num_samples=0))


def test_a_short_training_run_learns_far_above_chance():
    cfg = TrainConfig(task="images", num_samples=3000, epochs=3, batch_size=100, width=16,
                      progress=False, threads=1)
    r = fit(cfg)
    assert r.final_accuracy > 0.35  # chance is 0.1


def test_docstring_example_runs():
    result = doctest.testmod(images_task, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
