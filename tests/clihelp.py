"""Run the CLI in-process for tests: exit code, stdout and stderr."""

from __future__ import annotations

import pytest

from lipcheck.cli import run


def run_cli(args: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = run([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err
