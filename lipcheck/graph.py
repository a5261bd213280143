"""An ONNX model as lipcheck sees it: nodes, constant values, shapes and layer names.

Every model format ends up here: ONNX files directly, torch models after an
in-memory export. The graph knows which values are constants (initializers,
``Constant`` nodes and whatever folds from them), which are shapes only, and the
static shape of each value where ONNX shape inference or the user supplied one.
"""

from __future__ import annotations

import ast
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import ops
from .errors import InputError, UsageError

Dims = tuple[int | None, ...]

# Ops whose output depends only on the *shape* of their input, not its values.
SHAPE_ONLY_OPS = {"Shape", "Size"}
# Ops never folded even with constant inputs (random, or carrying subgraphs).
NO_FOLD_OPS = {
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
    "Bernoulli", "If", "Loop", "Scan",
}
# Folding evaluates with the onnx reference runtime; skip outputs larger than this.
MAX_FOLD_ELEMENTS = 1 << 24


@dataclass
class Node:
    index: int
    name: str
    op: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    has_subgraph: bool = False
    attr_protos: list[onnx.AttributeProto] = field(default_factory=list)
    onnx_name: str = ""  # the node's name in the file (``name`` is lipcheck's display name)
    scope: str | None = None  # the torch module path the exporter recorded (see module_path)


@dataclass
class Graph:
    nodes: list[Node]
    inputs: list[str]
    outputs: list[str]
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    # Values that do not depend on the network input's values (constants and shapes).
    static: set[str] = field(default_factory=set)
    shapes: dict[str, Dims] = field(default_factory=dict)
    # For a weight: the initializer or Constant-node output it was read from, through
    # Identity/Cast/Transpose/Reshape (so scaling that source scales the weight).
    origin: dict[str, str] = field(default_factory=dict)
    producer: dict[str, Node] = field(default_factory=dict)
    consumers: dict[str, list[Node]] = field(default_factory=dict)
    opset: int = 0

    def shape(self, value: str) -> Dims | None:
        return self.shapes.get(value)

    def known_shape(self, value: str) -> tuple[int, ...] | None:
        """The shape with every dim known, else None."""
        dims = self.shapes.get(value)
        if dims is None or any(d is None for d in dims):
            return None
        return tuple(int(d) for d in dims)  # type: ignore[arg-type]

    def const(self, value: str) -> np.ndarray | None:
        return self.consts.get(value) if value else None


def _attr_value(attr: onnx.AttributeProto) -> Any:
    if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        return None
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8", "replace") for v in value]
    return value


def _dims_of(value_info: onnx.ValueInfoProto) -> Dims | None:
    t = value_info.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    return tuple(
        d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim
    )


def _set_input_shape(model: onnx.ModelProto, name: str, dims: tuple[int, ...]) -> None:
    for inp in model.graph.input:
        if inp.name != name:
            continue
        shape = inp.type.tensor_type.shape
        if len(shape.dim) not in (0, len(dims)):
            raise UsageError(
                f"{{param}} has {len(dims)} dims but the model input '{name}' has "
                f"{len(shape.dim)}",
                param="input_shape",
            )
        del shape.dim[:]
        for d in dims:
            shape.dim.add().dim_value = d
        return


# Initializers up to this many elements go into the copy shape inference sees (shape and index
# tensors are among them); larger ones, weights, are described there by name, type and shape only.
SHAPE_CONST_LIMIT = 1 << 12


def _shape_skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference without the weights' bytes: each large
    initializer becomes a typed graph input of the same shape. Shape inference serialises
    the model it is given, so a full copy would hold the weights two or three more times."""
    sk = onnx.ModelProto()
    sk.ir_version = model.ir_version
    sk.opset_import.extend(model.opset_import)
    sk.functions.extend(model.functions)
    g = sk.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    g.sparse_initializer.extend(model.graph.sparse_initializer)
    inputs = {i.name for i in g.input}
    for t in model.graph.initializer:
        if math.prod(t.dims) <= SHAPE_CONST_LIMIT:
            g.initializer.add().CopyFrom(t)
        elif t.name not in inputs:
            vi = g.input.add()
            vi.name = t.name
            vi.type.tensor_type.elem_type = t.data_type
            vi.type.tensor_type.shape.SetInParent()
            for d in t.dims:
                vi.type.tensor_type.shape.dim.add().dim_value = d
    return sk


def build_graph(model: onnx.ModelProto, input_shape: tuple[int, ...] | None = None) -> Graph:
    """Turn a loaded ONNX model (external data already in memory) into a Graph."""
    source = model
    model = _shape_skeleton(source)
    init_names = {t.name for t in source.graph.initializer}
    data_inputs = [i.name for i in model.graph.input if i.name not in init_names]
    if input_shape is not None:
        if not data_inputs:
            raise UsageError("{param} was given but the model has no data input", param="input_shape")
        _set_input_shape(model, data_inputs[0], input_shape)
    else:
        # A symbolic batch dimension is the only unknown lipcheck fills in itself:
        # the norms of per-sample maps do not depend on the batch size.
        for inp in model.graph.input:
            if inp.name in data_inputs:
                dims = inp.type.tensor_type.shape.dim
                if dims and not dims[0].HasField("dim_value"):
                    dims[0].dim_value = 1

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; shapes stay unknown
        inferred = model

    graph = Graph(nodes=[], inputs=data_inputs, outputs=[o.name for o in model.graph.output])
    graph.opset = opset
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(
        inferred.graph.output
    ):
        dims = _dims_of(vi)
        if dims is not None:
            graph.shapes[vi.name] = dims

    for init in source.graph.initializer:
        try:
            arr = numpy_helper.to_array(init)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"initializer '{init.name}' cannot be read: {exc}") from exc
        graph.consts[init.name] = arr
        graph.static.add(init.name)
        graph.origin[init.name] = init.name
        graph.shapes[init.name] = tuple(arr.shape)

    used: Counter[str] = Counter()
    for index, proto in enumerate(model.graph.node):
        attrs = {a.name: _attr_value(a) for a in proto.attribute}
        has_sub = any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in proto.attribute
        )
        node = Node(
            index=index,
            name=proto.name or f"{proto.op_type}_{index}",
            op=proto.op_type,
            domain=proto.domain if proto.domain not in ("", "ai.onnx") else "",
            inputs=list(proto.input),
            outputs=list(proto.output),
            attrs=attrs,
            has_subgraph=has_sub,
            attr_protos=list(proto.attribute),
            onnx_name=proto.name,
            scope=module_path(proto),
        )
        graph.nodes.append(node)
        for out in node.outputs:
            graph.producer[out] = node
        for inp in node.inputs:
            if inp:
                graph.consumers.setdefault(inp, []).append(node)
        _fold(graph, node)
    for _ in range(MAX_REFINE_ROUNDS):
        if not _refine_shapes(graph, model):
            break
    _name_layers(graph, used)
    return graph


MAX_REFINE_ROUNDS = 3
MAX_REFINE_CONST = 1 << 16


def _refine_shapes(graph: Graph, model: onnx.ModelProto) -> bool:
    """Shape inference cannot see through values computed at run time (pads or shapes
    built from Shape ops). Once those are folded, run it again on a copy of the model in
    which they are initializers, then fold again. Returns True when shapes were learned."""
    missing = [v for n in graph.nodes for v in n.outputs
               if v and v not in graph.static and graph.known_shape(v) is None]
    if not missing:
        return False
    folded = {v for n in graph.nodes for v in n.outputs
              if v in graph.consts and graph.consts[v].size <= MAX_REFINE_CONST}
    variant = onnx.ModelProto()
    variant.CopyFrom(model)
    del variant.graph.value_info[:]
    kept = [n for n in variant.graph.node if not (n.output and all(o in folded for o in n.output))]
    del variant.graph.node[:]
    variant.graph.node.extend(kept)
    have = {t.name for t in variant.graph.initializer}
    for name in sorted(folded - have):
        variant.graph.initializer.append(numpy_helper.from_array(graph.consts[name], name))
    for inp in variant.graph.input:
        dims = graph.known_shape(inp.name)
        if inp.name in graph.inputs and dims is not None:
            _set_input_shape(variant, inp.name, dims)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inferred = onnx.shape_inference.infer_shapes(variant, data_prop=True)
    except Exception:  # noqa: BLE001 - best effort, as in the first pass
        return False
    learned = False
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        found = _dims_of(vi)
        if found is not None and None not in found and graph.known_shape(vi.name) is None:
            graph.shapes[vi.name] = found
            learned = True
    if learned:
        for node in graph.nodes:
            if node.op in SHAPE_ONLY_OPS and node.outputs[0] not in graph.consts:
                _fold(graph, node)
            elif node.outputs and node.outputs[0] in graph.static and node.outputs[0] not in graph.consts:
                _fold(graph, node)
    return learned


def _fold(graph: Graph, node: Node) -> None:
    """Mark the node's outputs static when they cannot depend on input values,
    and compute their values when that is cheap."""
    data = [i for i in node.inputs if i]
    if node.op in SHAPE_ONLY_OPS and node.domain == "":
        for out in node.outputs:
            graph.static.add(out)
        dims = graph.known_shape(data[0]) if data else None
        if dims is not None:
            if node.op == "Size":
                graph.consts[node.outputs[0]] = np.array(int(np.prod(dims)), dtype=np.int64)
            else:
                start = int(node.attrs.get("start", 0))
                end = node.attrs.get("end")
                sl = dims[start:] if end is None else dims[start : int(end)]
                graph.consts[node.outputs[0]] = np.array(sl, dtype=np.int64)
        return
    if node.op in NO_FOLD_OPS or node.has_subgraph or node.domain != "":
        return
    if not all(i in graph.static for i in data):
        return
    for out in node.outputs:
        graph.static.add(out)
    if not all(i in graph.consts for i in data):
        return
    if _fold_too_big(graph, node):
        return
    values = evaluate(node, [graph.consts[i] if i else None for i in node.inputs])
    if values is None:
        return
    for out, val in zip(node.outputs, values):
        if out:
            graph.consts[out] = val
            graph.shapes[out] = tuple(val.shape)
    if node.op == "Constant":
        graph.origin[node.outputs[0]] = node.outputs[0]
    # Ops through which a weight keeps its identity: rescaling the source rescales the value.
    if node.op in ("Identity", "Cast", "Transpose", "Reshape") and data:
        src = graph.origin.get(data[0])
        if src is not None:
            graph.origin[node.outputs[0]] = src


def _fold_too_big(graph: Graph, node: Node) -> bool:
    """True when folding would build an output over MAX_FOLD_ELEMENTS. The reference
    runtime allocates the whole output first, and ConstantOfShape, Expand, Tile or Range
    turn a few bytes of a (hostile) file into gigabytes."""
    for out in node.outputs:
        dims = graph.known_shape(out) if out else None
        if dims is not None and math.prod(dims) > MAX_FOLD_ELEMENTS:
            return True
    args = [graph.consts[i] if i else np.empty(0) for i in node.inputs]
    try:
        if node.op == "ConstantOfShape":
            size = math.prod([int(d) for d in args[0].reshape(-1)])
        elif node.op == "Expand":
            size = math.prod(np.broadcast_shapes(args[0].shape, tuple(int(d) for d in args[1].reshape(-1))))
        elif node.op == "Tile":
            size = math.prod([int(d) * int(r) for d, r in zip(args[0].shape, args[1].reshape(-1))])
        elif node.op == "Range":
            start, limit, delta = (float(a.reshape(-1)[0]) for a in args[:3])
            size = math.ceil((limit - start) / delta) if delta else 0
        else:
            return False
    except (TypeError, ValueError, IndexError, AttributeError, OverflowError):
        return True  # malformed: leave it unfolded
    return size > MAX_FOLD_ELEMENTS


def evaluate(node: Node, inputs: list[np.ndarray | None],
             limit: int = MAX_FOLD_ELEMENTS, opset: int = 21) -> list[np.ndarray] | None:
    """Evaluate one node on constant inputs with the onnx reference runtime (None: it cannot
    be, or an input or output has more than ``limit`` elements). ``opset``: the version
    the node's attributes follow."""
    if node.op == "Identity":
        return [inputs[0]] if inputs[0] is not None else None
    if any(i is not None and i.size > limit for i in inputs):
        return None
    from onnx.reference import ReferenceEvaluator

    names = [f"i{k}" if v is not None else "" for k, v in enumerate(inputs)]
    proto = helper.make_node(node.op, names, [f"o{k}" for k in range(len(node.outputs))])
    proto.attribute.extend(node.attr_protos)
    try:
        g = helper.make_graph(
            [proto],
            "fold",
            [
                helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                for n, v in zip(names, inputs)
                if v is not None
            ],
            [helper.make_empty_tensor_value_info(f"o{k}") for k in range(len(node.outputs))],
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = ReferenceEvaluator(m).run(
                None, {n: v for n, v in zip(names, inputs) if v is not None}
            )
    except Exception:  # noqa: BLE001 - a value we cannot fold stays unknown
        return None
    result = [np.asarray(v) for v in out]
    if any(v.size > limit for v in result):
        return None
    return result


# Suffixes of a stored weight's name that a layer's name drops: a plain parameter, and the
# two ways torch keeps a spectrally normalized one (``torch.nn.utils.spectral_norm`` and
# ``torch.nn.utils.parametrizations.spectral_norm``).
WEIGHT_SUFFIXES = (".parametrizations.weight.original", ".weight_orig", ".weight")
# torch's dynamo exporter records each node's module scopes here, outermost first, the
# last entry being the FX node itself: ['', 'layer1', 'layer1.0', 'layer1.0.conv1', 'conv2d'].
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def module_path(proto: onnx.NodeProto) -> str | None:
    """The torch module path (``layer1.0.conv1``) an exporter recorded for a node, '' for
    an op of the root module, None when the node carries none.

    The dynamo exporter stores the scopes in metadata. The TorchScript-based exporter names
    nodes ``/<scope>/<scope>/<Op>[_n]``, where a scope is either a child's name relative to
    the enclosing one (``/encoder/layers.0/attn``) or already the full path
    (``/layer1/layer1.0/conv1``); both spell the same path once joined.
    """
    for prop in proto.metadata_props:
        if prop.key == NAME_SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                return None
            if isinstance(scopes, list) and all(isinstance(x, str) for x in scopes):
                return scopes[-2] if len(scopes) >= 2 else ""
            return None
    parts = proto.name.split("/")
    if not proto.name.startswith("/") or not re.fullmatch(rf"{re.escape(proto.op_type)}(_\d+)?", parts[-1]):
        return None
    path = ""
    for part in parts[1:-1]:
        if not part:
            return None
        path = part if not path or part.startswith(path + ".") else f"{path}.{part}"
    return path


def _weight_name(graph: Graph, node: Node, uses: Counter[str]) -> str | None:
    """The module path of a stored weight read only by this node, from the weight's own
    name (``layer1.0.conv1.weight``); None when the name was made up by an exporter
    (``onnx::Conv_196``, ``val_105``) or the tensor is shared (the dynamo exporter merges
    equal initializers, so a shared name may belong to another layer)."""
    src = _stored_weight(graph, node)
    if not src or uses[src] > 1:
        return None
    for suffix in WEIGHT_SUFFIXES:
        if src.endswith(suffix) and len(src) > len(suffix):
            return src[: -len(suffix)]
    return None


def _stored_weight(graph: Graph, node: Node) -> str | None:
    """The stored tensor a weight op reads, whatever it is called."""
    slot = ops.weight_input(node, graph.static)
    return graph.origin.get(node.inputs[slot]) if slot is not None else None


def _name_layers(graph: Graph, used: Counter[str]) -> None:
    """Readable, unique names that do not depend on the exporter: a layer is named by the
    torch module it came from (``layer1.0.conv1``), as a state_dict key names it.

    Ops with a weight take the weight's parameter path when the exporter kept it, else the
    module scope the exporter recorded (node names or dynamo metadata), else the stored
    tensor's name. Then the other ops on the data path take their module scope ('3' for a
    block's residual Add; the op type for a root-level op), or scope.Op when that is taken;
    constant and shape computations keep their node names."""
    names: dict[int, str] = {}
    uses: Counter[str] = Counter()
    for node in graph.nodes:
        src = _stored_weight(graph, node)
        if src:
            uses[src] += 1
    for node in graph.nodes:
        slot = ops.weight_input(node, graph.static)
        if slot is None or node.inputs[slot] not in graph.static:
            continue  # no weight, or one computed from the input (attention's MatMul)
        src = graph.origin.get(node.inputs[slot])
        name = _weight_name(graph, node, uses) or node.scope or (
            src[: -len(".weight")] if src and src.endswith(".weight") else src)
        if name:
            names[node.index] = name
    taken = set(names.values())
    for node in graph.nodes:
        if node.index in names:
            continue
        on_path = any(o not in graph.static for o in node.outputs if o)
        if on_path and node.scope is not None:
            name = node.scope or node.op
        else:
            name = node.name.lstrip("/") if on_path else node.name
        name = name or f"{node.op}_{node.index}"
        if on_path and name in taken and name != node.op:
            name = f"{name}.{node.op}"
        names[node.index] = name
        taken.add(name)
    for node in graph.nodes:
        name = names[node.index]
        used[name] += 1
        node.name = name if used[name] == 1 else f"{name}#{used[name]}"
