"""The inspect table at a fixed terminal width (80 and 200 columns): the layer column always
stays, long module paths lose their middle, numbers are never cut; rich markup in file names,
titles, layer names and gate messages is shown literally, never read as a style."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SAMPLES, Cli
from onnx import TensorProto, helper, numpy_helper

LONG = "encoder.layers.11.self_attn.out_proj"  # 36 characters
LONGER = "model.encoder.layers.11.self_attention.output.dense"  # 51
BRACKETS = "blocks.2.mlp[fc]"
NAMES = [LONG, LONGER, BRACKETS, "head"]


def gemm_chain(path: Path, names: list[str]) -> Path:
    """A chain of 8x8 Gemms whose weights are named ``<name>.weight`` (rows are named by them)."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i, name in enumerate(names):
        inits.append(numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"{name}.weight"))
        nodes.append(helper.make_node("Gemm", [x, f"{name}.weight"], [f"h{i}"], transB=1))
        x = f"h{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def table_rows(text: str) -> dict[str, list[str]]:
    """The body rows of the rendered table, by their first cell."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            rows[cells[0]] = cells
    return rows


@pytest.mark.parametrize("width", [80, 200])
def test_inspect_table_at_a_fixed_width(width: int, tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a short path: the title is one line
    model = gemm_chain(Path("model[onnx].onnx"), NAMES)
    code, out, _ = cli("inspect", model, "--no-progress", "-f", "json")
    assert code == 0
    doc = json.loads(out)
    monkeypatch.setenv("COLUMNS", str(width))  # a pipe takes $COLUMNS, as a terminal would
    code, out, err = cli("inspect", model, "--no-progress")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "lipcheck: model[onnx].onnx  [onnx]"  # markup in the path and the tag, literal
    table = [line for line in lines if line[:1] in "┏┃┡│└"]
    assert all(len(line) <= width for line in table)
    assert table[1].split("┃")[1].strip() == "layer"
    rows = table_rows(out)
    assert len(rows) == len(NAMES)
    for r in doc["layers"]:  # every number in full: sigma est, sigma_up, bound
        cells = next(cells for cells in rows.values() if cells[-1] == f"{r['bound']:.6g}")
        assert f"{r['sigma']:.6g}" in cells and f"{r['sigma_upper']:.6g}" in cells
    shown = set(rows)
    assert {LONG, BRACKETS, "head"} <= shown  # at 80 columns too: a column gave way for them
    if width == 200:
        assert LONGER in shown and "iters" in table[1]
        assert "sigma_up (log)" in table[1]  # the bar column, where the width allows
        largest = max(r["sigma_upper"] for r in doc["layers"])
        header = [c.strip() for c in table[1].strip("┃").split("┃")]
        up, bar = header.index("sigma_up"), header.index("sigma_up (log)")
        assert bar == up + 1
        widest = next(cells for cells in rows.values() if cells[up] == f"{largest:.6g}")
        assert widest[bar] == "█" * 10
    else:
        (short,) = shown - {LONG, BRACKETS, "head"}
        assert len(short) == len(LONG) and short.count("…") == 1
        head, tail = short.split("…")
        assert LONGER.startswith(head) and LONGER.endswith(tail) and len(head) >= 15 and len(tail) >= 15
        assert "iters" not in table[1] and "sigma_up (log)" not in table[1]


def test_markup_in_gate_messages_is_literal(tmp_path: Path, cli: Cli) -> None:
    model = gemm_chain(tmp_path / "m[red].onnx", [BRACKETS])
    code, out, _ = cli("check", model, "--max-layer-sigma", "0.1", "--no-progress")
    assert code == 1
    assert "m[red].onnx" in out and f"layer {BRACKETS}: sigma" in " ".join(out.split())


def test_brackets_in_file_name_and_format_tag_survive(tmp_path: Path, cli: Cli) -> None:
    model = tmp_path / "m[bold].onnx"
    shutil.copy(SAMPLES / "mlp.onnx", model)
    code, out, _ = cli("inspect", model, "--no-progress")
    assert code == 0 and "m[bold].onnx" in out and "[onnx]" in out


def test_shorten_keeps_both_ends() -> None:
    from lipcheck.render import shorten

    assert shorten("encoder.layers.11.self_attn.out_proj", 16) == "encoder…out_proj"
    assert shorten("fc", 16) == "fc"


def test_bars_are_log_scaled_to_the_largest() -> None:
    from lipcheck.render import bars

    # 1000 spans three decades: 100 is two thirds of the width, 10 one third, 1 one eighth
    got = bars([1000.0, 100.0, 10.0, 1.0, None, 0.0, float("inf")], width=3)
    assert got == ["███", "██ ", "█  ", "▏  ", "", "", ""]
    assert bars([2.0, 2.0], width=4) == ["████", "████"]
    assert bars([None, None]) == ["", ""]
