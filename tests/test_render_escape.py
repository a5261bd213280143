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


def _doc() -> dict[str, object]:
    layer = {"name": "encoder.layers.11.self_attn.out_proj", "op": "Gemm", "kind": "linear",
             "input_shape": [1, 3, 224, 224], "sigma": 1.23456, "sigma_matrix": None, "sigma_upper": 1.23457,
             "iterations": 20, "converged": True, "bound": 12.3456}
    return {"model": {"path": "m.onnx", "format": "onnx"}, "layers": [layer, {**layer, "name": "fc"}]}


@pytest.mark.parametrize("width", [80, 200])
def test_layer_column_stays_at_any_width(width: int) -> None:
    import io

    from rich.console import Console

    from lipcheck.render import LayerTable

    buf = io.StringIO()
    Console(file=buf, width=width).print(LayerTable(_doc()))
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= width
    assert "layer" in text and "fc" in text
    for number in ("1.23456", "1.23457", "12.3456"):  # numbers are never cut
        assert number in text
    if width == 200:
        assert "encoder.layers.11.self_attn.out_proj" in text
    else:
        assert "encoder.layers.11.self_attn.out_proj" in text or "…" in text


def test_shorten_keeps_both_ends() -> None:
    from lipcheck.render import shorten

    assert shorten("encoder.layers.11.self_attn.out_proj", 16) == "encoder…out_proj"
    assert shorten("fc", 16) == "fc"
