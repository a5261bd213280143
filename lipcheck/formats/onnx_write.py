"""Writing an ONNX model back with rescaled weights (normalize's ONNX writer).

A model whose weights live in external data files (``model.onnx`` + ``model.onnx.data``,
what torch's dynamo exporter writes, and the only way past protobuf's 2 GB limit) is
written the same way: the graph with its external references to ``<output>.data``, the
tensors in their original order, each at an offset aligned to ALIGNMENT, streamed one at
a time from the loaded model, so the weights are never held twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import InputError
from ..files import atomic_write, atomic_writer
from ..rewrite import Rewrite

# Offsets of tensors in a written external data file are multiples of this (a page), so a
# reader can memory-map each tensor.
ALIGNMENT = 4096


def save_scaled(model: Any, output: Path, rewrite: Rewrite, source: Path) -> None:
    """Write ``model`` (loaded from ``source``) to ``output`` with ``rewrite`` applied,
    atomically; external data stays external (see the module's docstring)."""
    on_disk = onnx.load_model_from_string(source.read_bytes())  # the graph; external data not read
    if not any(_is_external(t) for _, t in _tensors(on_disk.graph)):
        atomic_write(output, scaled_model(model, rewrite).SerializeToString())
        return
    _save_external(on_disk, model, output, rewrite, source)


def _is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def _tensors(graph: Any) -> Iterator[tuple[str, TensorProto]]:
    """Every tensor of a graph in a fixed order, with the name normalize's scales use for
    it (an initializer's name; a Constant's output): initializers, then node attributes,
    subgraphs included."""
    for t in graph.initializer:
        yield t.name, t
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                key = node.output[0] if node.op_type == "Constant" and node.output else attr.t.name
                yield key, attr.t
            for t in attr.tensors:
                yield t.name, t
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _data_names(on_disk: Any, source: Path, output: Path) -> dict[str, str]:
    """Source data file -> output data file. A file named after the model follows the
    output's name (``a.onnx.data`` -> ``b.onnx.data``); any other keeps its name unless it
    would be the input's own file (same folder), never overwritten."""
    out: dict[str, str] = {}
    for _, t in _tensors(on_disk.graph):
        if not _is_external(t):
            continue
        location = next(e.value for e in t.external_data if e.key == "location")
        if location in out:
            continue
        if location.startswith(source.name):
            name = output.name + location[len(source.name):]
        elif location.startswith(source.stem):
            name = output.stem + location[len(source.stem):]
        else:
            name = location
        same = (output.parent / name).resolve() == (source.parent / location).resolve()
        out[location] = f"{output.name}.data" if same or name == output.name else name
    return out


def _save_external(on_disk: Any, model: Any, output: Path, rewrite: Rewrite, source: Path) -> None:
    names = _data_names(on_disk, source, output)
    loaded = [t for _, t in _tensors(model.graph)]
    disk = list(_tensors(on_disk.graph))
    if [t.name for t in loaded] != [t.name for _, t in disk]:
        raise InputError(f"{source} changed while lipcheck read it; run again")
    scales = dict(rewrite.scales)
    missing = sorted(set(scales) - {key for key, _ in disk})
    if missing:
        raise InputError(f"weights not found in the ONNX model: {', '.join(missing)}")
    # Each external tensor's place in the source (file, offset) orders the writing.
    external = sorted((_info(d)["location"], int(_info(d).get("offset", "0") or 0), i)
                      for i, (_, d) in enumerate(disk) if _is_external(d))
    with contextlib.ExitStack() as stack:
        files: dict[str, tuple[BinaryIO, list[int]]] = {}
        for location, _, i in external:
            target = names[location]
            if target not in files:
                files[target] = (stack.enter_context(atomic_writer(output.parent / target)), [0])
            fh, end = files[target]
            (key, d), src = disk[i], loaded[i]
            factor = scales.get(key)
            data = _scaled_bytes(src, factor) if factor is not None else src.raw_data
            offset = -(-end[0] // ALIGNMENT) * ALIGNMENT
            fh.write(b"\0" * (offset - end[0]))
            fh.write(data)
            end[0] = offset + len(data)
            del d.external_data[:]
            for k, value in (("location", target), ("offset", str(offset)), ("length", str(len(data)))):
                entry = d.external_data.add()
                entry.key, entry.value = k, value
        for key, d in disk:  # small tensors kept inside the model file
            factor = scales.get(key)
            if not _is_external(d) and factor is not None:
                d.CopyFrom(numpy_helper.from_array(_scaled_array(d, factor), d.name))
        _insert_muls(on_disk, rewrite.muls)
        with atomic_writer(output) as fh:
            fh.write(on_disk.SerializeToString())


def _info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _scaled_array(t: TensorProto, factor: float) -> np.ndarray:
    arr = numpy_helper.to_array(t)
    return (arr.astype(np.float64) * factor).astype(arr.dtype)


def _scaled_bytes(t: TensorProto, factor: float) -> bytes:
    return numpy_helper.from_array(_scaled_array(t, factor), t.name).raw_data


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
