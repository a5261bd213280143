"""The HTML report: one self-contained file (nothing fetched), charts with titles, axes and
legends, and tables carrying the JSON report's numbers."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lipcheck.cli import run

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.cells: list[str] = []
        self._in_td = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self._in_td = tag == "td"

    def handle_data(self, data: str) -> None:
        if self._in_td:
            self.cells.append(data)


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = run(args + ["--no-progress"])
    return code, capsys.readouterr().out


def test_inspect_html_is_self_contained_and_carries_the_json_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    code, page = _run(["inspect", str(SAMPLES / "resnet.onnx"), "--format", "html"], capsys)
    assert code == 0 and page.startswith("<!DOCTYPE html>")
    assert not re.search(r"(src|href)=\"https?:", page) and "<script" not in page
    parsed = _Collect()
    parsed.feed(page)
    assert parsed.tags.count("svg") >= 2  # per-layer sigma and the bound along the graph
    for text in ("per-layer spectral norm", "sigma (log scale)", "layer, in graph order",
                 "certified upper bound", "network bound along the graph"):
        assert text in page
    _, doc_text = _run(["inspect", str(SAMPLES / "resnet.onnx"), "--format", "json"], capsys)
    doc = json.loads(doc_text)
    for row in doc["layers"]:
        assert row["name"] in parsed.cells
        for key in ("sigma", "sigma_upper", "bound"):
            if row[key] is not None:
                assert f"{row[key]:.6g}" in parsed.cells


def test_check_and_diff_html(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, page = _run(["check", str(SAMPLES / "cnn.onnx"), "--max-lipschitz", "0.5", "--format", "html"], capsys)
    assert code == 1 and 'class="fail">FAIL' in page
    out = tmp_path / "scaled.onnx"
    assert run(["normalize", str(SAMPLES / "cnn.onnx"), "-o", str(out), "--target", "2", "--no-progress"]) == 0
    capsys.readouterr()
    code, page = _run(["diff", str(SAMPLES / "cnn.onnx"), str(out), "--format", "html"], capsys)
    assert code == 0 and "before and after" in page and "▲" in page  # some layers grew to 2


def test_markdown_file_gets_its_chart_beside_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import xml.etree.ElementTree as ET

    report = tmp_path / "report.md"
    code, _ = _run(["inspect", str(SAMPLES / "cnn.onnx"), "--format", "markdown", "-o", str(report)], capsys)
    assert code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "report.svg"]
    assert "](report.svg)" in report.read_text()
    svg = ET.fromstring((tmp_path / "report.svg").read_text())  # a standalone, well-formed SVG file
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    _, doc_text = _run(["inspect", str(SAMPLES / "cnn.onnx"), "--format", "json"], capsys)
    upper = [r for r in json.loads(doc_text)["layers"] if r["sigma_upper"] is not None]
    # one upper-bound mark per layer with a finite bound, named by the layer in its tooltip
    ns = "{http://www.w3.org/2000/svg}"
    lines = [e for e in svg.iter(ns + "line") if e.find(ns + "title") is not None]
    assert len(lines) == len(upper)

    several = tmp_path / "two" / "r.md"
    several.parent.mkdir()
    code, _ = _run(["inspect", str(SAMPLES / "cnn.onnx"), str(SAMPLES / "mlp.onnx"), "--format", "markdown",
                    "-o", str(several)], capsys)
    assert code == 0 and sorted(p.name for p in several.parent.iterdir()) == ["r-1.svg", "r-2.svg", "r.md"]
    text = several.read_text()
    assert "](r-1.svg)" in text and "](r-2.svg)" in text

    diff_md = tmp_path / "diff" / "d.md"
    diff_md.parent.mkdir()
    code, _ = _run(["diff", str(SAMPLES / "cnn.onnx"), str(SAMPLES / "cnn.onnx"), "--format", "markdown",
                    "-o", str(diff_md)], capsys)
    assert code == 0 and "](d.svg)" in diff_md.read_text() and (diff_md.parent / "d.svg").is_file()


def test_markdown_on_stdout_links_no_chart(capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _run(["inspect", str(SAMPLES / "cnn.onnx"), "--format", "markdown"], capsys)
    assert code == 0 and ".svg" not in text


def test_experts_chart_and_empty_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    experts = torch.randn(4, 12, 8, generator=g, dtype=torch.float64)
    experts[2] *= 5  # the outlier expert
    path = tmp_path / "moe.safetensors"
    save_file({"model.layers.0.mlp.experts.down_proj": experts.float().contiguous(),
               "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g)}, str(path))
    code, page = _run(["inspect", str(path), "--format", "html"], capsys)
    assert code == 0 and "experts: sigma_upper of each expert, per tensor" in page
    exact = torch.linalg.matrix_norm(experts.float().double(), ord=2)
    tips = re.findall(r"<title>model\.layers\.0\.mlp\.experts\.down_proj\[(\d)\]: ([0-9.e+-]+)</title></circle>", page)
    assert sorted(int(e) for e, _ in tips) == [0, 1, 2, 3]
    for e, value in tips:  # each expert's dot is its certified bound: at or above the exact norm
        assert float(value) >= exact[int(e)].item() * (1 - 1e-5)
    assert "median" in page
    # a weights-only report has rms_to_rms and role; a graph model's table leaves them out
    assert "<th>rms_to_rms</th>" in page
    code, graph_page = _run(["inspect", str(SAMPLES / "cnn.onnx"), "--format", "html"], capsys)
    assert code == 0 and "<th>rms_to_rms</th>" not in graph_page and "<th>sigma_upper</th>" in graph_page
