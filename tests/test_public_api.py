"""The public surface (`hardbatch.__all__`) and the rooms of the package.

Rooms depend one way: sampler (pure) <- services <- trainer <- hardbatch (public API, CLI). An
import the other way is an import cycle between packages waiting to happen, and would put the
training side into the service's image.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import hardbatch

ROOT = Path(__file__).resolve().parents[1]
ROOMS = {"sampler": "sampler", "services": "services", "trainer": "trainer", "hardbatch": "api"}
MAY_IMPORT = {
    "sampler": set(),
    "services": {"sampler"},
    "trainer": {"sampler", "services"},
    "api": {"sampler", "services", "trainer"},
}


def _room_of_module(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "hardbatch":
        return None
    if len(parts) > 1 and parts[1] in ("sampler", "services", "trainer"):
        return parts[1]
    return "api"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (functions, TYPE_CHECKING blocks)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _wrong_imports(root: Path) -> list[str]:
    wrong = []
    for folder, room in ROOMS.items():
        for path in (root / folder).rglob("*.py"):
            for name in _imports(path):
                other = _room_of_module(name)
                if other not in (None, room) and other not in MAY_IMPORT[room]:
                    wrong.append(f"{path.relative_to(root)} ({room}) imports {name} ({other})")
    return wrong


def test_rooms_import_only_downward():
    wrong = _wrong_imports(ROOT)
    assert not wrong, "\n".join(wrong)


def test_the_room_test_sees_an_upward_import(tmp_path):
    (tmp_path / "services").mkdir()
    (tmp_path / "services" / "bad.py").write_text(
        "def f():\n    from hardbatch.trainer.train import fit\n")
    (tmp_path / "sampler").mkdir()
    (tmp_path / "sampler" / "bad.py").write_text("import hardbatch\n")
    assert len(_wrong_imports(tmp_path)) == 2


def test_the_service_side_loads_without_the_training_side():
    code = ("import sys, hardbatch.services.main, hardbatch.services.client;"
            "print(sorted(m for m in sys.modules if m.startswith('hardbatch.trainer')"
            " or m == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", hardbatch.__all__)
def test_every_public_name_resolves_and_is_documented(name):
    value = getattr(hardbatch, name)
    assert value is getattr(importlib.import_module(hardbatch._MODULE_OF[name]), name)
    assert len(value.__doc__ or "") > 40, f"{name} needs a docstring"
    assert name in dir(hardbatch)


def test_public_names_are_all_exported_and_unknown_ones_fail():
    assert set(hardbatch.__all__) == set(hardbatch._MODULE_OF)
    with pytest.raises(AttributeError):
        hardbatch.Nope  # noqa: B018


@pytest.mark.parametrize("module", ["hardbatch", "hardbatch.trainer.worker",
                                    "hardbatch.sampler.filter"])
def test_examples_in_the_public_docs_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
