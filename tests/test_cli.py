"""The command line and the quickstart preview."""

from __future__ import annotations

import subprocess
import sys

from posttrain.cli import main
from posttrain.demo import grpo_table_demo


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "posttrain", "--help"], capture_output=True,
                         text=True, check=True)
    assert "quickstart" in out.stdout


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: posttrain" in capsys.readouterr().out


def test_grpo_table_demo_learns():
    # The policy starts with most mass on a wrong answer; GRPO must move it to the right one.
    result = grpo_table_demo(steps=20, seed=1)
    assert result.accuracy[0] < 0.3
    assert result.accuracy[-1] > 0.9
    assert result.reward[-1] > result.reward[0] + 0.5


def test_quickstart_runs(capsys):
    assert main(["quickstart", "--steps", "10"]) == 0
    out = capsys.readouterr().out
    assert "preview" in out and "P(right answer)" in out
