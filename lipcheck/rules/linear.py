"""Rules for ops with weights: Gemm/MatMul, Conv/ConvTranspose, BatchNorm, recurrent layers."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import spectral
from ..graph import Node
from ..report import LayerRow, RowKind
from . import Context, Outcome, rule, unbounded


def _shape_list(ctx: Context, value: str) -> list[int | None] | None:
    dims = ctx.graph.shape(value)
    return list(dims) if dims is not None else None


def _matrix_row(ctx: Context, node: Node, weight: np.ndarray, data_in: str, scale: float) -> LayerRow:
    """Estimate + upper bound for x -> scale * W x (any batch of matrices): the Cholesky
    certificate, or a probabilistic Krylov bound per ``settings.certify`` (``dense_bound``)."""
    # certificates run where the estimates do (float64 on the GPU when there is one)
    w = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float64)).to(ctx.settings.device)
    bound = spectral.dense_bound(w, ctx.settings)
    est, cert = bound.estimate, bound.upper
    upper = cert.value * scale
    return LayerRow(
        name=node.name, op=node.op, kind=RowKind.LINEAR, input_shape=_shape_list(ctx, data_in),
        sigma=est.sigma * scale, sigma_upper=upper, upper_method=cert.method, lipschitz=upper,
        iterations=est.iterations, converged=est.converged,
        note=None if math.isfinite(upper) else "weight has NaN or Inf",
        upper_kind=bound.kind, failure_probability=bound.failure_probability,
    )


def _linear_outcome(row: LayerRow, position: int, note: str | None = None) -> Outcome:
    if note:
        row.note = note
    lip = row.lipschitz if row.lipschitz is not None else math.nan
    est = row.sigma if row.sigma is not None else lip
    return Outcome(factors={position: lip}, est_factors={position: est}, row=row)


@rule("Gemm")
def gemm(ctx: Context, node: Node, data: list[int]) -> Outcome:
    """Y = alpha * A' B' + beta * C; the linear part in the data operand is |alpha| * W."""
    alpha = float(node.attrs.get("alpha", 1.0))
    beta = float(node.attrs.get("beta", 1.0))
    if 0 in data and 1 in data:
        return unbounded("Gemm of two activations is not globally Lipschitz")
    g = ctx.graph
    out: Outcome
    if 0 in data:
        w = g.const(node.inputs[1])
        if w is None:
            return unbounded("Gemm weight is not a known constant")
        if node.attrs.get("transB", 0):
            w = w.T
        # x (1 x k) @ W (k x n): the map on x has the singular values of W.
        out = _linear_outcome(_matrix_row(ctx, node, w.T, node.inputs[0], abs(alpha)), 0)
    elif 1 in data:
        w = g.const(node.inputs[0])
        if w is None:
            return unbounded("Gemm weight is not a known constant")
        if node.attrs.get("transA", 0):
            w = w.T
        out = _linear_outcome(_matrix_row(ctx, node, w, node.inputs[1], abs(alpha)), 1)
    else:
        out = Outcome(factors={})
    if 2 in data:
        factor = abs(beta) * _broadcast(ctx, node.inputs[2], node.outputs[0])
        out.factors[2] = factor
        if out.est_factors is not None:
            out.est_factors[2] = factor
    return out


def _broadcast(ctx: Context, inp: str, out: str) -> float:
    from .elementwise import broadcast_factor

    f = broadcast_factor(ctx.graph, inp, out)
    return math.inf if f is None else f


@rule("MatMul")
def matmul(ctx: Context, node: Node, data: list[int]) -> Outcome:
    if len(data) == 2:
        from . import local

        return local.matmul(ctx, node, data,
                            "MatMul of two activations (e.g. attention scores) is not globally Lipschitz")
    g = ctx.graph
    pos = data[0]
    w = g.const(node.inputs[1 - pos])
    if w is None:
        return unbounded("MatMul operand is not a known constant")
    if w.ndim == 1:
        w = w.reshape(-1, 1) if pos == 0 else w.reshape(1, -1)
    # x @ W acts on rows with the singular values of W; W @ x likewise on columns.
    mat = np.swapaxes(w, -1, -2) if pos == 0 else w
    row = _matrix_row(ctx, node, mat, node.inputs[pos], 1.0)
    xs = g.known_shape(node.inputs[pos])
    note = None
    if w.ndim > 2 and xs is not None and np.prod(w.shape[:-2]) > 1:
        # A batch of different weights applied to broadcast copies of x: bound each
        # copy by the largest sigma, then sqrt(#copies) for the replication.
        copies = float(np.prod(w.shape[:-2])) / max(1, math.prod(xs[:-2]))
        if copies > 1:
            row.lipschitz = (row.lipschitz or 0.0) * math.sqrt(copies)
            note = f"weight batch broadcast over the input: x sqrt({int(copies)})"
    return _linear_outcome(row, pos, note)


# --------------------------------------------------------------------------- convolution


def _conv_pads(node: Node, spatial: tuple[int, ...] | None, kernel: tuple[int, ...],
               strides: list[int], dilations: list[int]) -> list[tuple[int, int]] | None:
    d = len(kernel)
    auto = node.attrs.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        p = list(node.attrs.get("pads", [0] * 2 * d))
        return [(int(p[i]), int(p[i + d])) for i in range(d)]
    if auto == "VALID":
        return [(0, 0)] * d
    if spatial is None:
        return None
    pads = []
    for i in range(d):
        k_eff = (kernel[i] - 1) * dilations[i] + 1
        out = -(-spatial[i] // strides[i])
        total = max((out - 1) * strides[i] + k_eff - spatial[i], 0)
        small, big = total // 2, total - total // 2
        pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
    return pads


# Ops that only copy, drop or rearrange values (a constant operand only shifts them).
SELECTION_OPS = {"Slice", "Concat", "Pad", "Identity", "Split", "Gather", "Transpose", "Reshape",
                 "Squeeze", "Unsqueeze", "Flatten", "Tile", "Expand"}
MAX_SELECTION_ELEMENTS = 1 << 26


@dataclass
class Selection:
    """The conv's input as a selection S of an earlier value x: conv_in = S(x) + const.

    ``index`` has the conv input's shape; entry j is the flat index of the x entry copied
    there, or -1 where the linear part is zero (zero padding, constants). Exporters write
    padding this way (reflect as Pad, circular as Slice + Concat), and folding it into the
    conv gives the norm of the padded convolution, as torch's padding_mode means it.
    """

    source: str
    source_shape: tuple[int, ...]
    index: torch.Tensor
    multiplicity: int
    nodes: list[Node]


def _selection_into(ctx: Context, value: str) -> Selection | None:
    g = ctx.graph
    nodes: dict[int, Node] = {}
    sources: set[str] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        producer = g.producer.get(v)
        if v in g.static:
            continue
        if producer is None or producer.op not in SELECTION_OPS or producer.domain:
            sources.add(v)
            continue
        if producer.index not in nodes:
            nodes[producer.index] = producer
            stack.extend(i for i in producer.inputs if i)
    if not nodes or len(sources) != 1:
        return None
    source = sources.pop()
    src_shape, out_shape = g.known_shape(source), g.known_shape(value)
    if src_shape is None or math.prod(src_shape) > MAX_SELECTION_ELEMENTS:
        return None
    statics = {i for n in nodes.values() for i in n.inputs if i and i in g.static}
    if any(g.const(i) is None for i in statics):
        return None
    coded = _run_selection(g, sorted(nodes.values(), key=lambda n: n.index), source, src_shape,
                           value, statics)
    if coded is None or (out_shape is not None and tuple(coded.shape) != out_shape):
        return None
    g.shapes[value] = tuple(coded.shape)  # shape inference may not have seen through the pads
    lin = np.rint(coded).astype(np.int64)
    if not np.array_equal(lin, coded) or lin.min() < 0 or lin.max() > math.prod(src_shape):
        return None  # not a pure copy of x's entries
    index = torch.from_numpy(lin - 1)
    copies = torch.bincount(index[index >= 0].reshape(-1), minlength=1)
    return Selection(source, src_shape, index, int(copies.max()) if copies.numel() else 0,
                     sorted(nodes.values(), key=lambda n: n.index))


def _run_selection(g, nodes, source, src_shape, value, statics):  # type: ignore[no-untyped-def]
    """Evaluate the selection subgraph on x = 1..N and on x = 0 (reference runtime); the
    difference is the linear part, exactly, since it only copies values."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    def as64(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a

    protos = []
    for n in nodes:
        proto = helper.make_node(n.op, n.inputs, n.outputs)
        proto.attribute.extend(n.attr_protos)
        protos.append(proto)
    graph = helper.make_graph(
        protos, "selection",
        [helper.make_tensor_value_info(source, onnx.TensorProto.DOUBLE, src_shape)],
        [helper.make_empty_tensor_value_info(value)],
        [numpy_helper.from_array(as64(g.const(i)), i) for i in sorted(statics)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(g.opset, 13))])
    try:
        run = ReferenceEvaluator(model)
        n = math.prod(src_shape)
        coded = run.run(None, {source: np.arange(1, n + 1, dtype=np.float64).reshape(src_shape)})[0]
        zero = run.run(None, {source: np.zeros(src_shape, dtype=np.float64)})[0]
    except Exception:  # noqa: BLE001 - a subgraph we cannot evaluate is simply not folded
        return None
    return np.asarray(coded, dtype=np.float64) - np.asarray(zero, dtype=np.float64)


def _circular_pads(sel: Selection, d: int) -> list[tuple[int, int]] | None:
    """The pads, when the selection is exactly circular padding of x's spatial axes."""
    src, out = sel.source_shape, tuple(sel.index.shape)
    if len(src) != d + 2 or len(out) != d + 2 or src[:2] != out[:2]:
        return None
    totals = [out[2 + i] - src[2 + i] for i in range(d)]
    if any(t < 0 or t > src[2 + i] for i, t in enumerate(totals)):
        return None
    coded = torch.arange(math.prod(src), dtype=torch.float64).reshape(src)
    for begins in itertools.product(*[range(t + 1) for t in totals]):
        pads = [(b, t - b) for b, t in zip(begins, totals)]
        wrapped = spectral.pad_forward(pads, "wrap")(coded).to(torch.int64)
        if torch.equal(wrapped, sel.index):
            return pads
    return None


@rule("Conv", "ConvTranspose")
def conv(ctx: Context, node: Node, data: list[int]) -> Outcome:
    return measure_conv(ctx, node, data)


def measure_conv(ctx: Context, node: Node, data: list[int], weight_override: np.ndarray | None = None) -> Outcome:
    """The conv rule; ``weight_override``: measure the conv as if its weight were that array
    (a BatchNorm folded into it, see ``fold_scale``)."""
    if data != [0]:
        return unbounded(f"{node.op} weight depends on the input")
    g = ctx.graph
    w_np = g.const(node.inputs[1]) if weight_override is None else weight_override
    if w_np is None:
        return unbounded(f"{node.op} weight is not a known constant")
    transposed = node.op == "ConvTranspose"
    weight = torch.from_numpy(np.ascontiguousarray(w_np, dtype=np.float64))
    d = weight.ndim - 2
    kernel = tuple(weight.shape[2:])
    groups = int(node.attrs.get("group", 1))
    strides = [int(v) for v in node.attrs.get("strides", [1] * d)]
    dilations = [int(v) for v in node.attrs.get("dilations", [1] * d)]

    sel = None if transposed else _selection_into(ctx, node.inputs[0])
    in_value = sel.source if sel else node.inputs[0]
    conv_in = g.known_shape(node.inputs[0])
    spatial = conv_in[2:] if conv_in is not None and len(conv_in) == d + 2 else None

    # sigma_matrix: the reshaped weight torch.nn.utils.spectral_norm normalises by
    # (dim 0 for Conv, dim 1 for ConvTranspose).
    mat = weight.transpose(0, 1) if transposed else weight
    sm = spectral.matrix_estimate(mat.reshape(mat.shape[0], -1), ctx.settings)
    row = LayerRow(name=node.name, op=node.op, kind=RowKind.CONV,
                   input_shape=_shape_list(ctx, in_value), sigma_matrix=sm.sigma)
    sources = {0: sel.source} if sel else {}
    # The padding ops are part of this conv's row when nothing else reads them.
    absorbs = [n.name for n in _private(ctx, sel.nodes, node)] if sel else []
    if sel:
        row.note = f"includes the padding/selection before it (copies <= {sel.multiplicity})"
    if not bool(torch.isfinite(weight).all()):
        row.note = "weight has NaN or Inf"
        return Outcome(factors={0: math.nan}, row=row)

    if transposed:
        conv_pads = _conv_transpose_pads(node, g, spatial, kernel, strides, dilations)
    else:
        conv_pads = _conv_pads(node, spatial, kernel, strides, dilations)
    if spatial is None or conv_pads is None:
        cert = spectral.conv_reshape_upper_bound(weight, groups)
        row.sigma_upper = row.lipschitz = cert.value
        row.upper_method = cert.method
        row.note = "input size unknown: size-independent upper bound, no estimate (pass --input-shape)"
        return Outcome(factors={0: cert.value}, row=row)

    if not transposed and sel is None and any(k > 1 for k in kernel):
        # small per-group blocks (depthwise convs on small feature maps): exact, no iteration
        explicit = spectral.conv_explicit_bounds(weight.to(ctx.settings.device), spatial, strides, dilations,
                                                 groups, conv_pads)
        if explicit is not None:
            exact, cert = explicit
            row.sigma, row.iterations, row.converged = exact.sigma, exact.iterations, exact.converged
            row.sigma_upper = row.lipschitz = cert.value
            row.upper_method = cert.method
            return Outcome(factors={0: cert.value}, est_factors={0: exact.sigma}, row=row, sources=sources,
                           absorbs=absorbs)

    est_shape = (1, weight.shape[0] if transposed else weight.shape[1] * groups, *spatial)
    wrap = None
    if sel:
        def wrap(fn: spectral.LinearMap) -> spectral.LinearMap:
            return _through_selection(sel, fn, ctx)

        est_shape = (1, *sel.source_shape[1:])
    opad = [int(v) for v in node.attrs.get("output_padding", [0] * d)] if transposed else None
    est = spectral.conv_estimate(weight, est_shape, stride=strides, dilation=dilations, groups=groups,
                                 pads=conv_pads, settings=ctx.settings, transposed=transposed,
                                 output_padding=opad, wrap=wrap)
    sigma = est.sigma
    cert = _conv_certificate(weight.to(ctx.settings.device), spatial, kernel, strides, dilations, groups, conv_pads,
                             transposed, node, sigma, sel)
    row.sigma, row.iterations, row.converged = sigma, est.iterations, est.converged
    row.sigma_upper = row.lipschitz = cert.value
    row.upper_method = cert.method
    return Outcome(factors={0: cert.value}, est_factors={0: sigma}, row=row, sources=sources,
                   absorbs=absorbs)


def _private(ctx: Context, nodes: list[Node], conv: Node) -> list[Node]:
    inside = {n.index for n in nodes} | {conv.index}
    return [n for n in nodes
            if all(c.index in inside for out in n.outputs for c in ctx.graph.consumers.get(out, []))]


def _through_selection(sel: Selection, fn: spectral.LinearMap, ctx: Context) -> spectral.LinearMap:
    flat = sel.index.reshape(-1)
    keep = (flat >= 0).to(device=ctx.settings.device, dtype=ctx.settings.dtype)
    gather = flat.clamp_min(0).to(ctx.settings.device)
    shape = tuple(sel.index.shape)
    return lambda x: fn((x.reshape(-1)[gather] * keep).reshape(shape))


def _conv_transpose_pads(node: Node, g, spatial, kernel, strides, dilations):  # type: ignore[no-untyped-def]
    d = len(kernel)
    auto = node.attrs.get("auto_pad", "NOTSET")
    opad = [int(v) for v in node.attrs.get("output_padding", [0] * d)]
    out_shape = node.attrs.get("output_shape")
    if auto in ("NOTSET", "") and out_shape is None:
        p = list(node.attrs.get("pads", [0] * 2 * d))
        return [(int(p[i]), int(p[i + d])) for i in range(d)]
    if auto == "VALID":
        return [(0, 0)] * d
    if spatial is None:
        return None
    target = list(out_shape)[-d:] if out_shape is not None else [spatial[i] * strides[i] for i in range(d)]
    pads = []
    for i in range(d):
        k_eff = (kernel[i] - 1) * dilations[i] + 1
        total = max(strides[i] * (spatial[i] - 1) + opad[i] + k_eff - int(target[i]), 0)
        small, big = total // 2, total - total // 2
        pads.append((big, small) if auto == "SAME_LOWER" else (small, big))
    return pads


def _conv_certificate(weight, spatial, kernel, strides, dilations, groups, conv_pads,  # type: ignore[no-untyped-def]
                      transposed, node, estimate, sel) -> spectral.Certificate:
    """A certified bound on the conv at this input size; ``estimate`` (a lower bound on its
    norm, from Lanczos or power iteration) is only the first candidate the certificate tries."""
    estimate = estimate if math.isfinite(estimate) else 0.0
    d = len(kernel)
    k_eff = [(kernel[i] - 1) * dilations[i] + 1 for i in range(d)]
    if transposed:
        # ConvTranspose is the adjoint of the strided conv with the same weight, run on
        # its full (uncropped) output; cropping the pads only removes outputs.
        opad = [int(v) for v in node.attrs.get("output_padding", [0] * d)]
        full = [(spatial[i] - 1) * strides[i] + k_eff[i] + opad[i] for i in range(d)]
        return spectral.strided_conv_upper_bound(weight, full, strides, dilations, groups, estimate)
    if sel is not None and all(b == 0 and e == 0 for b, e in conv_pads):
        wrap = _circular_pads(sel, d)
        if wrap is not None and all(wrap[i][0] + wrap[i][1] == k_eff[i] - 1 for i in range(d)):
            # circular padding by the kernel extent: a circular conv on x's grid (subsampled
            # when strided, which only drops outputs)
            cert = spectral.conv_fft_upper_bound(weight, list(sel.source_shape[2:]), dilations, groups, estimate)
            return spectral.Certificate(cert.value, "fft-circular")
    if all(k == 1 for k in kernel) and sel is None:
        # A 1x1 conv applies the same (block-diagonal) matrix at every position.
        w = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1])
        return spectral.gram_upper_bound(w, estimate)
    padded = [spatial[i] + conv_pads[i][0] + conv_pads[i][1] for i in range(d)]
    copies = sel.multiplicity if sel is not None else 1
    cert = spectral.strided_conv_upper_bound(weight, padded, strides, dilations, groups,
                                             estimate / math.sqrt(copies) if copies else 0.0)
    if copies <= 1:
        return cert
    # S copies each x entry at most `copies` times: ||S|| = sqrt(copies).
    return spectral.Certificate(cert.value * math.sqrt(copies), f"{cert.method} x sqrt(copies)")


# --------------------------------------------------------------------------- BatchNorm


@rule("BatchNormalization")
def batchnorm(ctx: Context, node: Node, data: list[int]) -> Outcome:
    """Eval-mode BN is diagonal: L = max |gamma / sqrt(running_var + eps)|, exactly."""
    if data != [0]:
        return unbounded("BatchNormalization parameters depend on the input")
    if node.attrs.get("training_mode", 0):
        return unbounded("BatchNormalization in training mode normalises by batch statistics")
    g = ctx.graph
    scale, var = g.const(node.inputs[1]), g.const(node.inputs[4])
    if scale is None or var is None:
        return unbounded("BatchNormalization scale or variance is not a known constant")
    eps = float(node.attrs.get("epsilon", 1e-5))
    with np.errstate(all="ignore"):
        diag = np.abs(scale.astype(np.float64)) / np.sqrt(var.astype(np.float64) + eps)
    value = float(diag.max()) if diag.size else 0.0
    if not np.isfinite(diag).all():
        value = math.nan
    row = LayerRow(
        name=node.name, op=node.op, kind=RowKind.DIAGONAL, input_shape=_shape_list(ctx, node.inputs[0]),
        sigma=value, sigma_upper=value, upper_method="exact", lipschitz=value,
        iterations=0, converged=True,
    )
    return Outcome(factors={0: value}, row=row)


def batchnorm_scale(ctx: Context, node: Node) -> np.ndarray | None:
    """The per-channel factor gamma / sqrt(running_var + eps) of an eval BatchNorm (float64),
    or None when it is not one with known constants."""
    if node.op != "BatchNormalization" or node.attrs.get("training_mode", 0) or len(node.inputs) < 5:
        return None
    scale, var = ctx.graph.const(node.inputs[1]), ctx.graph.const(node.inputs[4])
    if scale is None or var is None:
        return None
    eps = float(node.attrs.get("epsilon", 1e-5))
    with np.errstate(all="ignore"):
        s = scale.astype(np.float64).reshape(-1) / np.sqrt(var.astype(np.float64).reshape(-1) + eps)
    return s if np.isfinite(s).all() else None


def fold_scale(ctx: Context, producer: Node, data: list[int], channel_scale: np.ndarray) -> Outcome | None:
    """The outcome of ``producer`` (a Conv, or a Gemm/MatMul with a 2-D output) followed by a
    multiplication of its output channels (axis 1) by ``channel_scale``: the linear map
    x -> diag(s) A x measured as one operator (estimate and certificate of the folded weight,
    conv on its real input size), so its constant is the norm of the product rather than the
    product of the norms. None when the shapes do not line up or the op is not one of these."""
    g = ctx.graph
    s = channel_scale.astype(np.float64).reshape(-1)
    out_shape = g.known_shape(producer.outputs[0])
    if out_shape is None or len(out_shape) < 2 or out_shape[1] != s.size:
        return None
    if producer.op == "Conv" and data == [0]:
        w = g.const(producer.inputs[1])
        if w is None or w.shape[0] != s.size:
            return None
        folded = w.astype(np.float64) * s.reshape((-1,) + (1,) * (w.ndim - 1))
        return measure_conv(ctx, producer, data, weight_override=folded)
    if len(out_shape) != 2:
        return None
    if producer.op == "Gemm" and data == [0]:
        w = g.const(producer.inputs[1])
        if w is None or w.ndim != 2:
            return None
        mat = (w.T if producer.attrs.get("transB", 0) else w).T.astype(np.float64)  # (n, k): x -> W x
        alpha = abs(float(producer.attrs.get("alpha", 1.0)))
        if mat.shape[0] != s.size:
            return None
        return _linear_outcome(_matrix_row(ctx, producer, s[:, None] * mat, producer.inputs[0], alpha), 0)
    if producer.op == "MatMul" and data == [0]:
        w = g.const(producer.inputs[1])
        if w is None or w.ndim != 2 or w.shape[1] != s.size:
            return None
        return _linear_outcome(_matrix_row(ctx, producer, s[:, None] * w.T.astype(np.float64),
                                           producer.inputs[0], 1.0), 0)
    return None


def fold_input_scale(ctx: Context, consumer: Node, data: list[int], channel_scale: np.ndarray) -> Outcome | None:
    """The outcome of ``consumer`` (a Conv with one group, or a Gemm/MatMul with a 2-D input)
    after a multiplication of its input channels (axis 1) by ``channel_scale``: the linear map
    x -> A diag(s) x measured as one operator (conv on its real input size). None when the
    shapes do not line up or the op is not one of these."""
    g = ctx.graph
    s = channel_scale.astype(np.float64).reshape(-1)
    in_shape = g.known_shape(consumer.inputs[0])
    if data != [0] or in_shape is None or len(in_shape) < 2 or in_shape[1] != s.size:
        return None
    w = g.const(consumer.inputs[1])
    if w is None:
        return None
    if consumer.op == "Conv":
        if int(consumer.attrs.get("group", 1)) != 1 or w.ndim < 3 or w.shape[1] != s.size:
            return None
        folded = w.astype(np.float64) * s.reshape((1, -1) + (1,) * (w.ndim - 2))
        return measure_conv(ctx, consumer, data, weight_override=folded)
    if len(in_shape) != 2 or w.ndim != 2:
        return None
    if consumer.op == "Gemm" and not consumer.attrs.get("transA", 0):
        mat = (w if consumer.attrs.get("transB", 0) else w.T).astype(np.float64)  # (n, k): x -> W x
        alpha = abs(float(consumer.attrs.get("alpha", 1.0)))
    elif consumer.op == "MatMul":
        mat, alpha = w.T.astype(np.float64), 1.0
    else:
        return None
    if mat.shape[1] != s.size:
        return None
    return _linear_outcome(_matrix_row(ctx, consumer, mat * s[None, :], consumer.inputs[0], alpha), 0)


# --------------------------------------------------------------------------- recurrent

GATES = {"LSTM": "iofc", "GRU": "zrh", "RNN": "h"}


@rule("LSTM", "GRU", "RNN")
def recurrent(ctx: Context, node: Node, data: list[int]) -> Outcome:
    """Each gate's input (W) and recurrent (R) matrix gets its own row; a bound over
    sequences is out of scope, so the network bound becomes unbounded."""
    g = ctx.graph
    gates = GATES[node.op]
    rows = []
    for slot, label in ((1, "W"), (2, "R")):
        mats = g.const(node.inputs[slot]) if slot < len(node.inputs) else None
        if mats is None:
            continue
        dirs, gh, _ = mats.shape
        hidden = gh // len(gates)
        for di in range(dirs):
            for gi, gate in enumerate(gates):
                m = mats[di, gi * hidden : (gi + 1) * hidden]
                r = _matrix_row(ctx, node, m, node.inputs[0], 1.0)
                r.name = f"{node.name}.{label}.dir{di}.{gate}"
                r.kind = RowKind.RECURRENT
                rows.append(r)
    return Outcome(
        factors={}, extra_rows=rows,
        unbounded=f"{node.op}: a Lipschitz bound over sequences is out of scope (per-gate sigmas reported)",
    )
