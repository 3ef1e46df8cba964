"""Every `hardbatch` subcommand answers --help, and the train command runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from hardbatch.trainer.streaming import hardest_table
from hardbatch.trainer.train import RunResult

from hardbatch.cli import main
from hardbatch.cli.train import print_summary


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


def test_tables_never_print_negative_zero(capsys):
    # Where it comes from: cross entropy of a sample predicted with certainty is -0.0.
    certain = float(F.cross_entropy(torch.tensor([[0.0, -200.0]]), torch.tensor([0]),
                                    reduction="none")[0])
    assert str(certain) == "-0.0"
    table = hardest_table([{"id": 1, "ema": certain, "last_loss": -1e-9, "seen": 1, "kept": 0}])
    assert "-0.0000" not in table and table.count("0.0000") == 2
    epoch = {"epoch": 1, "train_loss": certain, "val_loss": -0.0, "val_accuracy": 1.0,
             "samp_perc": 0.5, "loss_perc": 0.9, "train_time_s": 1.0}
    print_summary(RunResult(config={}, epochs=[epoch]))
    out = capsys.readouterr().out
    assert "-0.0000" not in out and out.count("0.0000") == 2
