"""The wheel installs one namespace, `hardbatch`, mapped from the top-level folders."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"hardbatch": "hardbatch", "sampler": "hardbatch/sampler",
          "trainer": "hardbatch/trainer", "services": "hardbatch/services"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy: an in-tree build leaves build/lib behind, whose stale files would
    # end up in later wheels.
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in MAPPED:
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(src)], check=True, capture_output=True)
    (path,) = out.glob("hardbatch-*.whl")
    return path


def test_wheel_holds_only_the_hardbatch_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"hardbatch", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1]
                    + ".dist-info"}
    # Every module of the mapped folders is in it, under its hardbatch.* name.
    for folder, dest in MAPPED.items():
        for py in (ROOT / folder).rglob("*.py"):
            assert f"{dest}/{py.relative_to(ROOT / folder)}" in names, py
    assert not any(n.startswith("hardbatch/benchmarks") for n in names)


def test_installed_wheel_imports_hardbatch_but_not_the_old_names(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    assert sorted(p.name for p in target.iterdir() if p.name != "bin") == [
        "hardbatch", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"]
    code = (
        "import importlib.util, sys; sys.path.insert(0, sys.argv[1]);"
        "import hardbatch.sampler.filter, hardbatch.trainer.task, hardbatch.services.store;"
        "assert hardbatch.sampler.filter.__file__.startswith(sys.argv[1]);"
        "print([importlib.util.find_spec(m) for m in ('trainer', 'services', 'sampler')])"
    )
    # -I: no user site, no cwd on the path (the checkout's folders would shadow the test).
    out = subprocess.run([sys.executable, "-I", "-c", code, str(target)], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[None, None, None]"
