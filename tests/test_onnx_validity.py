"""ONNX input the standard forbids is refused (exit 2, one line), and external data
reached through a hard link needs --trust."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lipcheck.cli import run


def _model(op: str = "Relu", domain: str = "") -> onnx.ModelProto:
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32) * 2, "w")
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="fc"),
             helper.make_node(op, ["h"], ["y"], name="act", domain=domain)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    imports = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=imports)


def _inspect(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    code = run(["inspect", str(path), "--no-progress", "--format", "json", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_unknown_default_domain_op_is_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_model("FooBar"), str(path))
    code, out, err = _inspect(path, capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "FooBar" in err and "'act'" in err


def test_custom_domain_op_is_skipped_with_a_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_model("FooBar", domain="com.example"), str(path))
    code, out, _ = _inspect(path, capsys)
    assert code == 0 and "not supported" in out


def _external_model(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save_model(_model(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    return path


def test_external_data_with_a_foreign_key_is_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _external_model(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    entry = model.graph.initializer[0].external_data.add()
    entry.key, entry.value = "basepath", "/etc"
    path.write_bytes(model.SerializeToString())
    code, out, err = _inspect(path, capsys)
    assert code == 2 and out == "" and "'basepath'" in err


def test_hard_linked_external_data_needs_trust(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _external_model(tmp_path)
    os.link(tmp_path / "m.onnx.data", tmp_path / "other-name")
    out_model = tmp_path / "out.onnx"
    code = run(["normalize", str(path), "-o", str(out_model), "--no-progress"])
    _, err = capsys.readouterr()
    assert code == 2 and "hard links" in err and "'m.onnx.data'" in err and len(err.strip().splitlines()) == 1
    assert not out_model.exists() and not (tmp_path / "out.onnx.data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "other-name"]
    code, out, _ = _inspect(path, capsys, "--trust")
    assert code == 0 and out.startswith("{")
    code = run(["normalize", str(path), "-o", str(out_model), "--no-progress", "--trust"])
    capsys.readouterr()
    assert code == 0 and out_model.exists() and (tmp_path / "out.onnx.data").exists()
