"""The normalize table names the kind of each upper bound (certified, or probabilistic marked †)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console

from lipcheck import api
from lipcheck.render import normalize_summary, normalize_table

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Matrices wide enough for a probabilistic bound to be tight (small ones fall back to the
    exact certificate)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(), torch.nn.Linear(300, 250)).eval()
    path = tmp_path_factory.mktemp("wide") / "wide.onnx"
    torch.onnx.export(model, (torch.zeros(1, 64),), str(path), dynamo=False, opset_version=17)
    return path


def _text(result: api.NormalizeResult) -> str:
    console = Console(width=220, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(normalize_table(result))
    console.print(normalize_summary(result))
    return console.export_text()


@pytest.mark.e2e  # a whole normalize/diff/check workflow
def test_probabilistic_bounds_are_marked(wide: Path, tmp_path: Path) -> None:
    result = api.normalize(wide, tmp_path / "out.onnx", target=1.0, certify="probabilistic")
    assert result.ok
    kinds = {r.upper_kind for r in result.before.layers if r.op in ("Gemm", "MatMul")}
    assert "probabilistic" in kinds
    text = _text(result)
    assert "cert." not in text and "before (upper)" in text
    assert "†" in text and "probabilistic upper bound" in text


def test_certified_bounds_carry_no_mark(tmp_path: Path) -> None:
    result = api.normalize(SAMPLES / "mlp.onnx", tmp_path / "out.onnx", target=1.0, certify="exact")
    assert result.ok
    text = _text(result)
    assert "†" not in text and "probabilistic" not in text
