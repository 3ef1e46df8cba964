"""ruff and mypy are part of the test suite, with the config in pyproject.toml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The installed layout: hardbatch.<name> is the top-level folder <name> (pyproject package-dir).
MAPPED = ("sampler", "trainer", "services")


def run(*cmd: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def test_ruff():
    out = run(str(BIN / "ruff"), "check", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_bans_the_old_top_level_names(tmp_path):
    (tmp_path / "old.py").write_text("import trainer.train\nfrom services.store import X\n")
    out = run(str(BIN / "ruff"), "check", "--config", str(ROOT / "pyproject.toml"),
              "--output-format", "concise", str(tmp_path / "old.py"))
    assert out.stdout.count("TID251") == 2, out.stdout


def test_mypy(tmp_path):
    # mypy cannot follow setuptools' package-dir mapping, so it checks a symlinked view of the
    # installed layout.
    view = tmp_path / "hardbatch"
    view.mkdir()
    for entry in (ROOT / "hardbatch").iterdir():
        if entry.name != "__pycache__":
            os.symlink(entry, view / entry.name)
    for name in MAPPED:
        os.symlink(ROOT / name, view / name)
    os.symlink(ROOT / "benchmarks", tmp_path / "benchmarks")
    out = run(str(BIN / "mypy"), "--config-file", str(ROOT / "pyproject.toml"),
              "-p", "hardbatch", "-p", "benchmarks", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
