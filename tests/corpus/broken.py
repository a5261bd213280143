"""Broken files: empty, random, truncated, forged sizes and offsets, damaged ONNX and
ONNX external data that points outside its folder."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .forge import (
    FOUR_FLOATS,
    SAMPLES,
    external_model,
    forge_zip_member_size,
    gemm_model,
    one_tensor,
    quiet_save,
    torch_legacy,
    torch_zip,
)
from .registry import CASES, Case, case


@case("empty.onnx", "broken", "empty")
def _empty(p: Path, marker: Path) -> None:
    p.write_bytes(b"")


@case("random.onnx", "broken", "not a model file")
def _random(p: Path, marker: Path) -> None:
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())


@case("random.pt", "broken", "")
def _random_pt(p: Path, marker: Path) -> None:
    p.write_bytes(np.random.default_rng(2).integers(0, 256, 1000, dtype=np.uint8).tobytes())


@case("zeros.pt", "broken", "")
def _zeros(p: Path, marker: Path) -> None:
    p.write_bytes(b"\x00" * 256)


@case("text.onnx", "broken", "")
def _text(p: Path, marker: Path) -> None:
    p.write_text("this is not a model\n" * 20)


@case("pickle_garbage.pt", "broken", "pickle")
def _pickle_garbage(p: Path, marker: Path) -> None:
    p.write_bytes(b"\x80\x04\xff\xfe garbage that is not a pickle")


@case("directory.onnx", "broken", "directory")
def _directory(p: Path, marker: Path) -> None:
    p.mkdir()


@case("fifo.onnx", "broken", "regular file")
def _fifo(p: Path, marker: Path) -> None:
    os.mkfifo(p)


@case("truncated_zip.pt", "broken", "zip")
def _trunc_zip(p: Path, marker: Path) -> None:
    data = (SAMPLES / "cnn.state_dict.pt").read_bytes()
    p.write_bytes(data[: len(data) // 2])


@case("truncated_zip_tail.pt", "broken", "")
def _trunc_zip_tail(p: Path, marker: Path) -> None:
    data = (SAMPLES / "mlp.state_dict.pt").read_bytes()
    p.write_bytes(data[:-30])


@case("truncated_protobuf.onnx", "broken", "")
def _trunc_onnx(p: Path, marker: Path) -> None:
    data = (SAMPLES / "cnn.onnx").read_bytes()
    p.write_bytes(data[: len(data) // 2])


@case("truncated_torchscript.pt", "broken", "zip")
def _trunc_ts(p: Path, marker: Path) -> None:
    data = (SAMPLES / "mlp.ts.pt").read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])


@case("zip_no_data_record.pt", "broken", "data/0")
def _no_record(p: Path, marker: Path) -> None:
    torch_zip(p, one_tensor(), {})


@case("zip_storage_short.pt", "broken", "")
def _short(p: Path, marker: Path) -> None:
    torch_zip(p, one_tensor(), {"0": FOUR_FLOATS[:8]})


@case("zip_shape_beyond_storage.pt", "broken", "")
def _shape_big(p: Path, marker: Path) -> None:
    torch_zip(p, one_tensor(4, [100000, 100000]), {"0": FOUR_FLOATS})


@case("zip_numel_beyond_file.pt", "broken", "")
def _numel_big(p: Path, marker: Path) -> None:
    torch_zip(p, one_tensor(10**12, [10**6, 10**6]), {"0": FOUR_FLOATS})


@case("zip_offset_beyond_storage.pt", "broken", "")
def _offset_big(p: Path, marker: Path) -> None:
    torch_zip(p, one_tensor(4, [2, 2], offset=10**15), {"0": FOUR_FLOATS})


@case("zip_negative_shape.pt", "broken", "")
def _neg_shape(p: Path, marker: Path) -> None:
    torch_zip(p, one_tensor(4, [-2, 2]), {"0": FOUR_FLOATS})


@case("zip_forged_member_size.pt", "broken", "forged")
def _forged_member(p: Path, marker: Path) -> None:
    torch_zip(p, one_tensor(10**9, [10**9]), {"0": FOUR_FLOATS})
    forge_zip_member_size(p, "archive/data/0", 4 * 10**9)


@case("zip_future_version.pt", "broken", "zip")
def _future_version(p: Path, marker: Path) -> None:
    data = bytearray((SAMPLES / "mlp.state_dict.pt").read_bytes())
    data[data.find(b"PK\x01\x02") + 6] = 0x9A  # "version needed to extract": 15.4
    p.write_bytes(bytes(data))


@case("legacy_numel_beyond_file.pt", "broken", "declares")
def _legacy_numel(p: Path, marker: Path) -> None:
    torch_legacy(p, one_tensor(10**12, [2, 2], legacy=True), [("0", 10**12, FOUR_FLOATS)])


@case("legacy_numel_4g.pt", "broken", "declares")
def _legacy_numel_4g(p: Path, marker: Path) -> None:
    torch_legacy(p, one_tensor(4 * 10**9, [2, 2], legacy=True), [("0", 4 * 10**9, FOUR_FLOATS)])


@case("legacy_storage_short.pt", "broken", "")
def _legacy_short(p: Path, marker: Path) -> None:
    torch_legacy(p, one_tensor(4, [2, 2], legacy=True), [("0", 4, FOUR_FLOATS[:8])])


@case("legacy_truncated.pt", "broken", "")
def _legacy_trunc(p: Path, marker: Path) -> None:
    buf = io.BytesIO()
    quiet_save({"w": torch.ones(8, 8)}, buf, _use_new_zipfile_serialization=False)
    p.write_bytes(buf.getvalue()[:-100])


@case("onnx_dims_beyond_data.onnx", "broken", "needs")
def _onnx_forged(p: Path, marker: Path) -> None:
    model = gemm_model([np.eye(4, dtype=np.float32)])
    init = model.graph.initializer[0]
    del init.dims[:]
    init.dims.extend([100000, 100000])
    onnx.save(model, p)


@case("onnx_constant_dims_beyond_data.onnx", "broken", "needs")
def _onnx_const_forged(p: Path, marker: Path) -> None:
    value = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    del value.dims[:]
    value.dims.extend([65536, 65536, 16])
    nodes = [helper.make_node("Constant", [], ["w"], value=value),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), p)


@case("onnx_negative_dims.onnx", "broken", "negative")
def _onnx_neg(p: Path, marker: Path) -> None:
    model = gemm_model([np.eye(4, dtype=np.float32)])
    model.graph.initializer[0].dims[0] = -4
    onnx.save(model, p)


@case("onnx_unknown_dtype.onnx", "broken", "data type")
def _onnx_dtype(p: Path, marker: Path) -> None:
    model = gemm_model([np.eye(4, dtype=np.float32)])
    model.graph.initializer[0].data_type = 97
    onnx.save(model, p)


@case("onnx_no_nodes.onnx", "broken", "no nodes")
def _onnx_empty_graph(p: Path, marker: Path) -> None:
    graph = helper.make_graph([], "g", [], [])
    onnx.save(helper.make_model(graph), p)


def _ext(patch: Callable[[dict[str, str]], None], setup: Callable[[Path], None] | None = None
         ) -> Callable[[Path, Path], Path]:
    def build(p: Path, marker: Path) -> Path:
        return external_model(p.parent, p.stem, patch, setup)

    return build


def _set(**values: str) -> Callable[[dict[str, str]], None]:
    return lambda entries: entries.update(values)


EXTERNAL_CASES = [
    ("ext_absolute", "relative", _set(location="/etc/passwd"), None),
    ("ext_dotdot", "'..'", _set(location="../outside.bin"), None),
    ("ext_symlink", "symlink", _set(location="link.bin"),
     lambda d: (d / "link.bin").symlink_to(d / "ext_symlink.bin")),
    ("ext_symlinked_dir", "symlink", _set(location="sub/ext_symlinked_dir.bin"),
     lambda d: (d / "sub").symlink_to(d)),
    ("ext_missing", "not found", _set(location="missing.bin"), None),
    ("ext_directory", "regular file", _set(location="adir"), lambda d: (d / "adir").mkdir()),
    ("ext_offset_beyond", "beyond", _set(offset="999999999"), None),
    ("ext_bad_offset", "integer", _set(offset="12abc"), None),
    ("ext_negative_length", "integer", _set(length="-16"), None),
    ("ext_length_mismatch", "does not match", lambda e: e.update(length=str(int(e.get("length", "0")) - 4)),
     None),
    ("ext_overlap", "overlap", _set(offset="0"), None),
    ("ext_nul", "usable", _set(location="a\x00b.bin"), None),
]
for _stem, _fragment, _patch, _setup in EXTERNAL_CASES:
    CASES.append(Case(f"{_stem}.onnx", "broken", _fragment, _ext(_patch, _setup)))
