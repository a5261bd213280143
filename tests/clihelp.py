"""Kept for test files that still write ``from clihelp import run_cli``: new tests take
the ``cli`` fixture from conftest.py instead."""

from __future__ import annotations

from conftest import CliResult, run_cli

__all__ = ["CliResult", "run_cli"]
