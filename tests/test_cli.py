"""The console script lists the planned subcommands and fails clearly on bad input."""

from __future__ import annotations

import subprocess
import sys

from fedspine_jax.cli import COMMANDS, main


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "fedspine_jax.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for name in ("simulate", "compare", "sweep", "server", "device", "export", "infer", "report"):
        assert name in out
    assert set(COMMANDS) >= {"simulate", "compare", "sweep", "server", "device", "export",
                             "infer", "report"}


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: fedspine" in capsys.readouterr().out
