"""Rich markup in file names and titles is shown literally, never read as a style."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lipcheck.cli import run

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def test_brackets_in_file_name_and_format_tag_survive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "m[bold].onnx"
    shutil.copy(SAMPLES / "mlp.onnx", model)
    assert run(["inspect", str(model), "--no-progress"]) == 0
    out, _ = capsys.readouterr()
    assert "m[bold].onnx" in out and "[onnx]" in out
