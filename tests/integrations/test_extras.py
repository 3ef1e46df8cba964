"""The integrations are optional extras: the core never imports Lightning or transformers,
and the examples of both train 2 Ray workers with hardbatch on and print their final metric."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = ("lightning", "pytorch_lightning", "transformers", "accelerate")


def test_the_core_does_not_import_the_extras():
    import hardbatch.trainer

    trainer_modules = [f"hardbatch.trainer.{m.name}"
                       for m in pkgutil.iter_modules(hardbatch.trainer.__path__)]
    assert "hardbatch.trainer.worker" in trainer_modules
    code = (f"import sys, importlib, hardbatch\n"
            f"for m in {trainer_modules!r}: importlib.import_module(m)\n"
            f"for name in hardbatch.__all__: getattr(hardbatch, name)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {EXTRAS!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_extras_are_declared_and_installed_by_setup():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^lightning = \["lightning>=', pyproject, re.M)
    assert re.search(r'^transformers = \["transformers>=', pyproject, re.M)
    assert "pip install -e '.[dev,lightning,transformers]'" in (
        ROOT / "scripts" / "setup.sh").read_text()


@pytest.mark.parametrize("module", ["hardbatch.integrations", "hardbatch.integrations.lightning",
                                    "hardbatch.integrations.transformers"])
def test_the_examples_in_the_integration_docs_run(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.slow
@pytest.mark.parametrize("example, metric", [("lightning_ray.py", "val_acc"),
                                             ("transformers_ray.py", "eval_accuracy")])
def test_the_example_trains_two_ray_workers(example, metric):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / example), "--epochs", "2",
                          "--workers", "2"], capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    found = re.search(rf"^final {metric} (\d\.\d+)$", out.stdout, re.M)
    assert found, out.stdout[-3000:]
    assert float(found.group(1)) > 0.25  # better than chance (10 and 4 classes)
    assert re.search(r"store holds [1-9]\d* loss records", out.stdout)  # losses streamed
