"""Every `hardbatch` subcommand answers --help, and the train command runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hardbatch.cli import main


def all_commands():
    return sorted(main.commands)


@pytest.mark.parametrize("name", all_commands())
def test_every_subcommand_has_help(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(main.commands[name].help or "") > 10


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "hardbatch"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout


def test_local_train_command_streams_losses_and_writes_metrics_and_plots(tmp_path, redis_url):
    result = CliRunner().invoke(main, [
        "train", "--local", "--num-samples", "800", "--epochs", "2", "--width", "8",
        "--batch-size", "100", "--no-progress", "--out", str(tmp_path), "--redis", redis_url,
        "--run", "cli-local"])
    assert result.exit_code == 0, result.output
    assert "val acc" in result.output and "final accuracy" in result.output
    assert "1,600 of 1,600 records delivered, 0 rejected" in result.output
    assert "hardest samples of run cli-local" in result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 2
    assert {p.name for p in tmp_path.glob("*.png")} == {
        "train_accuracy.png", "train_loss.png", "train_kept.png"}


# --alpha and --lam out of the service's bounds are refused here, before Redis, the service or
# the run are brought up (they used to fail only then).
@pytest.mark.parametrize("args", [["--epochs", "0"], ["--task-arg", "novalue"],
                                  ["--task", "nope"], ["--alpha", "17"], ["--lam", "1.5"],
                                  ["--alpha", "nan"], ["--optimizer", "rmsprop"],
                                  ["--schedule", "step"], ["--grad-clip", "-1"]])
def test_train_command_rejects_bad_arguments_with_a_usage_error(args, tmp_path):
    result = CliRunner().invoke(main, ["train", "--no-progress", "--out", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert "Error" in result.output
