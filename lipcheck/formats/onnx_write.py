"""Writing an ONNX model back with rescaled weights (normalize's ONNX writer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..files import atomic_write
from ..rewrite import Rewrite


def save_scaled(model: Any, output: Path, rewrite: Rewrite) -> None:
    """Write ``model`` to ``output`` (atomically) with ``rewrite`` applied."""
    scaled = scaled_model(model, rewrite)
    atomic_write(output, scaled.SerializeToString())


def scaled_model(model: Any, rewrite: Rewrite) -> Any:
    """A copy of ``model`` with the stored weights (initializers or Constant nodes) scaled
    and the Mul nodes inserted."""
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    _insert_muls(out, rewrite.muls)
    todo = dict(rewrite.scales)
    for i, init in enumerate(out.graph.initializer):
        if init.name in todo:
            arr = numpy_helper.to_array(init)
            new = (arr.astype(np.float64) * todo.pop(init.name)).astype(arr.dtype)
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(new, init.name))
    for node in out.graph.node:
        if node.op_type == "Constant" and node.output[0] in todo:
            for attr in node.attribute:
                if attr.name == "value":
                    arr = numpy_helper.to_array(attr.t)
                    new = (arr.astype(np.float64) * todo.pop(node.output[0])).astype(arr.dtype)
                    attr.t.CopyFrom(numpy_helper.from_array(new, attr.t.name))
    if todo:
        raise InputError(f"weights not found in the ONNX model: {', '.join(sorted(todo))}")
    return out


def _insert_muls(model: Any, muls: dict[tuple[int, int], float]) -> None:
    """A weight the graph computes (a spectral norm exported as nodes, or a tensor several
    layers share) is scaled for one layer by a Mul between it and that layer: the layer
    then computes with exactly factor x its old weight, and nothing else changes."""
    from onnx import helper, numpy_helper

    taken = {v for n in model.graph.node for v in (*n.input, *n.output)}
    taken |= {t.name for t in model.graph.initializer}
    new_nodes = []
    for (index, slot), factor in sorted(muls.items()):
        node = model.graph.node[index]
        value = node.input[slot]
        dtype = _value_dtype(model, value)
        base = f"lipcheck_scale_{index}_{slot}"
        k = 0
        while f"{base}_{k}" in taken or f"{base}_{k}_out" in taken:
            k += 1
        const, scaled = f"{base}_{k}", f"{base}_{k}_out"
        taken |= {const, scaled}
        model.graph.initializer.append(numpy_helper.from_array(np.array(factor, dtype=dtype), const))
        new_nodes.append((index, helper.make_node("Mul", [value, const], [scaled], name=f"{base}_{k}/Mul")))
        node.input[slot] = scaled
    # Each Mul goes right before the node that reads it, so the graph stays topologically sorted.
    for index, mul in sorted(new_nodes, key=lambda t: -t[0]):
        model.graph.node.insert(index, mul)


def _value_dtype(model: Any, value: str) -> Any:
    """The numpy dtype of a float value in the graph (the weight's), float32 if unknown."""
    from onnx import helper

    for vi in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        if vi.name == value and vi.type.tensor_type.elem_type:
            return helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    for t in model.graph.initializer:
        if t.name == value:
            return helper.tensor_dtype_to_np_dtype(t.data_type)
    return np.float32
