"""normalize on ONNX models with external data: the layout is kept (a data file named after
the output, the tensors in their order, offsets aligned), the input is never touched, and a
model over protobuf's 2 GB limit is written tensor by tensor."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lipcheck
from lipcheck.formats.onnx_write import ALIGNMENT


def _mlp_graph(extra: list[TensorProto] | None = None) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 8)).astype(np.float32)
    w2 = rng.standard_normal((4, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), *(extra or [])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path)).run(None, {"x": x})[0]


def _external(path: Path) -> list[tuple[str, dict[str, str]]]:
    model = onnx.load(str(path), load_external_data=False)
    return [(t.name, {e.key: e.value for e in t.external_data}) for t in model.graph.initializer]


def test_external_data_stays_external(tmp_path: Path) -> None:
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save_model(_mlp_graph(), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    before = {p.name: _sha(p) for p in tmp_path.iterdir()}
    result = lipcheck.normalize(src, out, target=1.0)
    assert result.ok, result.failures
    assert {p.name: _sha(p) for p in (src, tmp_path / "m.onnx.data")} == before  # input untouched
    layout = _external(out)
    assert [name for name, _ in layout] == ["w1", "w2"]
    assert all(info["location"] == "out.onnx.data" for _, info in layout)
    offsets = [int(info["offset"]) for _, info in layout]
    assert offsets == sorted(offsets) and all(o % ALIGNMENT == 0 for o in offsets)
    assert out.stat().st_size < 1024  # the weights are not inside the model file
    # ReLU is positively homogeneous: the output scales by the product of the factors.
    x = np.random.default_rng(1).standard_normal((1, 8)).astype(np.float32)
    factors = {c.name: c.scale for c in result.changes}
    np.testing.assert_allclose(_run(out, x), _run(src, x) * factors["w1"] * factors["w2"], rtol=1e-5)


@pytest.mark.slow
def test_rewrite_over_two_gigabytes(tmp_path: Path) -> None:
    """A model whose external data is over 2 GB (a large tensor the layers do not read,
    stored sparsely, beside two small weights): protobuf cannot serialise it in memory."""
    big_elems = 540_000_000  # 2.16 GB of float32
    data = tmp_path / "big.onnx.data"
    model = _mlp_graph()
    small = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    big = TensorProto(name="table", data_type=TensorProto.FLOAT, dims=[big_elems])
    model.graph.initializer.append(big)
    offset = 0
    with data.open("wb") as fh:
        fh.truncate(big_elems * 4)  # a sparse file of zeros
        offset = big_elems * 4
        for t in model.graph.initializer:
            if t.name == "table":
                where, length = 0, big_elems * 4
            else:
                raw = small[t.name].tobytes()
                where, length = offset, len(raw)
                fh.seek(offset)
                fh.write(raw)
                offset += len(raw)
                t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", str(where)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
    src, out = tmp_path / "big.onnx", tmp_path / "out.onnx"
    src.write_bytes(model.SerializeToString())
    assert os.path.getsize(data) > 2**31
    del small
    result = lipcheck.normalize(src, out, target=1.0)
    assert result.ok, result.failures
    layout = dict(_external(out))
    assert layout["table"]["offset"] == "0" and int(layout["table"]["length"]) == big_elems * 4
    assert int(layout["w1"]["offset"]) % ALIGNMENT == 0
    assert os.path.getsize(tmp_path / "out.onnx.data") > 2**31
    x = np.random.default_rng(1).standard_normal((1, 8)).astype(np.float32)
    factors = {c.name: c.scale for c in result.changes}
    np.testing.assert_allclose(_run(out, x), _run(src, x) * factors["w1"] * factors["w2"], rtol=1e-5)
