"""The bar of issue 11, as a user meets it: from a folder with its own `trainer.py` and
`services/` package, the own-loop example and `hardbatch train` both run on Ray."""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    """A user's project: names hardbatch must not claim, and a copy of the example."""
    (tmp_path / "trainer.py").write_text('MINE = "the user\'s own trainer module"\n')
    (tmp_path / "services").mkdir()
    (tmp_path / "services" / "__init__.py").write_text('"""The user\'s own services."""\n')
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "ray_own_loop.py", tmp_path / "examples")
    return tmp_path


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HARDBATCH_CACHE": str(cwd / "cache"), "HOME": str(cwd)}
    env.pop("HARDBATCH_REDIS_URL", None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_own_ray_train_loop_example_runs_from_a_users_folder(user_dir):
    out = _run([sys.executable, "examples/ray_own_loop.py"], user_dir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    m = re.search(r"final accuracy (\S+) \(kept (\d+)% of the scored examples, filtered "
                  r"(\d+)% of the last epoch's steps; (\d+) of (\d+) rounds planned by the "
                  r"service\)", out.stdout)
    assert m, out.stdout[-2000:]
    assert float(m[1]) > 0.25  # ten classes: chance is 0.1
    # The filter kept a part on the steps it ran; the cost model ran the others in full.
    assert 0 < int(m[2]) < 100 if int(m[3]) > 0 else int(m[2]) == 100
    # Every round came from the service's plans: Ray's prepare_data_loader kept our sampler.
    assert m[4] == m[5] != "0"


def test_hardbatch_train_runs_from_a_users_folder_without_ray_noise(user_dir):
    exe = str(Path(sys.executable).parent / "hardbatch")
    out = _run([exe, "train", "--epochs", "1", "--num-samples", "4000", "--width", "16",
                "--batch-size", "128", "--out", "run"], user_dir)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "final accuracy" in out.stdout and "hardest samples" in out.stdout
    assert (user_dir / "run" / "metrics.json").exists()
    # What a person sees is the bar, the tables and the hardest samples, not Ray's lines
    # repeated every second.
    assert "Failed to query Ray Train Controller" not in text
    lines = [ln for ln in re.split(r"[\r\n]", text) if ln.strip() and "run hb-" not in ln]
    repeated = [ln for ln, n in collections.Counter(lines).items() if n > 2]
    assert not repeated, repeated
