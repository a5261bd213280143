"""Odd but valid weights: NaN, Inf, empty, low precision, quantized, sparse, complex,
high-rank tensors, checkpoints with unusual keys, ONNX weights of odd dtypes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .forge import (
    bf16,
    gemm_model,
    quiet_save,
    safetensors_bytes,
)
from .registry import case

ODD_KEYS = ("nan.weight", "inf.weight", "empty.weight", "scalar", "norm.weight", "conv3d.weight",
            "half.weight", "bf16.weight", "int8.weight", "quant.weight", "sparse.weight",
            "complex.weight", "six_d.weight", "bn.weight", "bn.running_var", "f8.weight", "zero_conv.weight")


def odd_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "nan.weight": torch.tensor([[1.0, float("nan")], [0.0, 1.0]]),
        "inf.weight": torch.full((2, 2, 3, 3), float("inf")),
        "empty.weight": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
        "norm.weight": torch.ones(4),
        "conv3d.weight": torch.randn(2, 3, 2, 2, 2, generator=g),
        "half.weight": torch.diag(torch.tensor([3.0, 1.0])).half(),
        "bf16.weight": torch.diag(torch.tensor([2.0, 1.0])).bfloat16(),
        "int8.weight": torch.ones(3, 3, dtype=torch.int8),
        "quant.weight": torch.quantize_per_tensor(torch.diag(torch.tensor([4.0, 1.0])), 0.5, 0, torch.qint8),
        "sparse.weight": torch.eye(3).to_sparse(),
        "complex.weight": torch.eye(2, dtype=torch.complex64),
        "six_d.weight": torch.ones(1, 1, 1, 1, 1, 1),
        "bn.weight": torch.ones(4),
        "bn.running_var": torch.ones(3),  # does not match bn.weight: not a BatchNorm pair
        "f8.weight": torch.eye(2).to(torch.float8_e4m3fn),
        "zero_conv.weight": torch.zeros(0, 3, 3, 3),
    }


@case("odd_weights.pt", "ok", '"nan"')
def _odd(p: Path, marker: Path) -> None:
    quiet_save(odd_state_dict(), p)


@case("odd_weights_legacy.pt", "ok", '"bf16"')
def _odd_legacy(p: Path, marker: Path) -> None:
    # The legacy format cannot hold sparse, quantized or float8 tensors.
    sd = {k: v for k, v in odd_state_dict().items() if k not in ("sparse.weight", "quant.weight", "f8.weight")}
    quiet_save(sd, p, _use_new_zipfile_serialization=False)


@case("odd_weights.safetensors", "ok", '"half"')
def _odd_st(p: Path, marker: Path) -> None:
    p.write_bytes(safetensors_bytes({
        "half.weight": np.diag([3.0, 1.0]).astype(np.float16),
        "bf16.weight": ("BF16", [2, 2], bf16([2.0, 0.0, 0.0, 1.0])),
        "int8.weight": np.ones((2, 2), np.int8),
        "nan.weight": np.array([[np.nan, 1.0]], np.float32),
        "empty.weight": np.zeros((0, 3), np.float32),
        "scalar": np.array(1.5, np.float64),
        "conv.weight": np.ones((2, 1, 3, 3), np.float32),
    }))


@case("odd_checkpoint.pt", "ok", "int_keys")
def _odd_ckpt(p: Path, marker: Path) -> None:
    quiet_save({"epoch": 3, "int_keys": {0: torch.eye(2), 1: torch.eye(3)},
                "layers": [torch.eye(2), {"w": torch.eye(4)}], "name": "x"}, p)


@case("bare_tensor.pt", "ok", '"tensor"')
def _bare_tensor(p: Path, marker: Path) -> None:
    quiet_save(torch.diag(torch.tensor([2.0, 1.0])), p)


@case("onnx_nan_weight.onnx", "ok", "not finite")
def _onnx_nan(p: Path, marker: Path) -> None:
    w = np.eye(4, dtype=np.float32)
    w[1, 2] = np.nan
    onnx.save(gemm_model([w, np.eye(4, dtype=np.float32)]), p)


@case("onnx_inf_weight.onnx", "ok", "not finite")
def _onnx_inf(p: Path, marker: Path) -> None:
    w = np.eye(4, dtype=np.float32)
    w[0, 0] = np.inf
    onnx.save(gemm_model([np.eye(4, dtype=np.float32), w]), p)


@case("onnx_float16.onnx", "ok", '"Gemm"')
def _onnx_f16(p: Path, marker: Path) -> None:
    w = np.diag([3.0, 1.0, 1.0, 1.0]).astype(np.float16)
    nodes = [helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16),
             helper.make_node("Gemm", ["xh", "w"], ["yh"], transB=1, name="gemm"),
             helper.make_node("Cast", ["yh"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), p)


@case("onnx_int8_dequantize.onnx", "ok", '"layers"')
def _onnx_int8(p: Path, marker: Path) -> None:
    wq = np.diag([100, 50, 20, 10]).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "scale", "zp"], ["w"], name="dq"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")]
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(np.float32(0.1), "scale"),
             numpy_helper.from_array(np.int8(0), "zp")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), p)


@case("onnx_zero_size.onnx", "ok", '"layers"')
def _onnx_zero(p: Path, marker: Path) -> None:
    onnx.save(gemm_model([np.zeros((0, 4), np.float32)]), p)
