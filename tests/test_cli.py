"""The command line: help and usage errors."""

from __future__ import annotations

import subprocess
import sys

from posttrain.cli import main


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "posttrain", "--help"], capture_output=True,
                         text=True, check=True)
    assert "quickstart" in out.stdout


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: posttrain" in capsys.readouterr().out
