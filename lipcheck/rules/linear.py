"""Rules for ops with weights: Gemm/MatMul, Conv/ConvTranspose, BatchNorm, recurrent layers."""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import spectral
from ..graph import Node
from ..report import LayerRow
from . import Context, Outcome, rule, unbounded


def _shape_list(ctx: Context, value: str) -> list[int | None] | None:
    dims = ctx.graph.shape(value)
    return list(dims) if dims is not None else None


def _matrix_row(ctx: Context, node: Node, weight: np.ndarray, data_in: str, scale: float) -> LayerRow:
    """Estimate + Gram certificate for x -> scale * W x (any batch of matrices)."""
    w = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float64))
    est = spectral.matrix_estimate(w, ctx.settings)
    cert = spectral.gram_upper_bound(w, est.sigma)
    upper = cert.value * scale
    return LayerRow(
        name=node.name, op=node.op, kind="linear", input_shape=_shape_list(ctx, data_in),
        sigma=est.sigma * scale, sigma_upper=upper, upper_method=cert.method, lipschitz=upper,
        iterations=est.iterations, converged=est.converged,
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
        return unbounded(
            "MatMul of two activations (e.g. attention scores) is not globally Lipschitz"
        )
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
        copies = np.prod(w.shape[:-2]) / max(1, np.prod(xs[:-2]))
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


def _fused_pad(ctx: Context, node: Node) -> tuple[str, list[tuple[int, int]], str] | None:
    """A Pad feeding only this conv and padding only spatial axes becomes part of it,
    so the conv row is the norm of the padded convolution (as torch's padding_mode)."""
    g = ctx.graph
    src = g.producer.get(node.inputs[0])
    if src is None or src.op != "Pad" or len(g.consumers.get(src.outputs[0], [])) != 1:
        return None
    mode = src.attrs.get("mode", "constant")
    pads = src.attrs.get("pads")
    if pads is None and len(src.inputs) > 1:
        pads_arr = g.const(src.inputs[1])
        pads = None if pads_arr is None else [int(v) for v in pads_arr.reshape(-1)]
    if pads is None or (len(src.inputs) > 3 and src.inputs[3]):
        return None  # unknown pads, or an axes input
    rank = len(pads) // 2
    if rank < 3 or any(pads[i] or pads[i + rank] for i in range(2)):
        return None
    if any(v < 0 for v in pads):
        return None
    spatial = [(pads[i], pads[i + rank]) for i in range(2, rank)]
    return src.inputs[0], spatial, str(mode)


@rule("Conv", "ConvTranspose")
def conv(ctx: Context, node: Node, data: list[int]) -> Outcome:
    if data != [0]:
        return unbounded(f"{node.op} weight depends on the input")
    g = ctx.graph
    w_np = g.const(node.inputs[1])
    if w_np is None:
        return unbounded(f"{node.op} weight is not a known constant")
    transposed = node.op == "ConvTranspose"
    weight = torch.from_numpy(np.ascontiguousarray(w_np, dtype=np.float64))
    d = weight.ndim - 2
    kernel = tuple(weight.shape[2:])
    groups = int(node.attrs.get("group", 1))
    strides = [int(v) for v in node.attrs.get("strides", [1] * d)]
    dilations = [int(v) for v in node.attrs.get("dilations", [1] * d)]

    fused = None if transposed else _fused_pad(ctx, node)
    in_value = fused[0] if fused else node.inputs[0]
    in_shape = g.known_shape(in_value)
    spatial = in_shape[2:] if in_shape is not None and len(in_shape) == d + 2 else None
    pre_pads = fused[1] if fused else [(0, 0)] * d
    pad_mode = fused[2] if fused else "constant"
    padded = (
        tuple(spatial[i] + pre_pads[i][0] + pre_pads[i][1] for i in range(d)) if spatial else None
    )

    # sigma_matrix: the reshaped weight torch.nn.utils.spectral_norm normalises by
    # (dim 0 for Conv, dim 1 for ConvTranspose).
    mat = weight.transpose(0, 1) if transposed else weight
    sm = spectral.matrix_estimate(mat.reshape(mat.shape[0], -1), ctx.settings)

    row = LayerRow(
        name=node.name, op=node.op, kind="conv",
        input_shape=_shape_list(ctx, in_value), sigma_matrix=sm.sigma,
    )
    if fused:
        row.note = f"includes the preceding {pad_mode} Pad"
    if not bool(torch.isfinite(weight).all()):
        row.note = "weight has NaN or Inf"
        return Outcome(factors={0: math.nan}, row=row)

    if transposed:
        conv_pads = _conv_transpose_pads(node, g, spatial, kernel, strides, dilations)
    else:
        conv_pads = _conv_pads(node, padded, kernel, strides, dilations)
    if spatial is None or conv_pads is None:
        cert = spectral.conv_reshape_upper_bound(
            weight, groups if not transposed else groups
        )
        pad_norm = math.prod(
            spectral.pad_multiplicity(pad_mode, None, b, e) for b, e in pre_pads
        ) ** 0.5
        upper = cert.value * pad_norm
        row.sigma_upper = row.lipschitz = upper
        row.upper_method = cert.method
        row.note = "input size unknown: size-independent upper bound, no estimate (pass --input-shape)"
        return Outcome(factors={0: upper}, est_factors={0: upper}, row=row)

    all_pads = [(pre_pads[i][0], pre_pads[i][1]) for i in range(d)]
    w_run = weight.to(device=ctx.settings.device, dtype=ctx.settings.dtype)
    if transposed:
        opad = [int(v) for v in node.attrs.get("output_padding", [0] * d)]
        fn = spectral.conv_forward(
            w_run, stride=strides, dilation=dilations, groups=groups, pads=conv_pads,
            transposed=True, output_padding=opad,
        )
    else:
        merged = [(pre_pads[i][0] + conv_pads[i][0], pre_pads[i][1] + conv_pads[i][1]) for i in range(d)]
        if pad_mode == "constant":
            fn = spectral.conv_forward(w_run, stride=strides, dilation=dilations, groups=groups, pads=merged)
        else:
            fn = _padded_conv(w_run, strides, dilations, groups, all_pads, pad_mode, conv_pads)
    c_in = in_shape[1] if in_shape else weight.shape[1] * groups
    est = spectral.operator_estimate(fn, (1, c_in, *spatial), ctx.settings)
    cert = _conv_certificate(weight, spatial, kernel, strides, dilations, groups, all_pads,
                             pad_mode, conv_pads, transposed, node)
    row.sigma, row.iterations, row.converged = est.sigma, est.iterations, est.converged
    row.sigma_upper = row.lipschitz = cert.value
    row.upper_method = cert.method
    return Outcome(factors={0: cert.value}, est_factors={0: est.sigma}, row=row)


def _padded_conv(weight: torch.Tensor, strides: list[int], dilations: list[int], groups: int,
                 pre_pads: list[tuple[int, int]], mode: str,
                 conv_pads: list[tuple[int, int]]) -> spectral.LinearMap:
    """A reflect/edge/wrap Pad followed by a (possibly zero-padded) conv."""
    padder = spectral.pad_forward(pre_pads, mode)
    conv_fn = spectral.conv_forward(weight, stride=strides, dilation=dilations, groups=groups, pads=conv_pads)
    return lambda x: conv_fn(padder(x))


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


def _conv_certificate(weight, spatial, kernel, strides, dilations, groups, pre_pads, mode,  # type: ignore[no-untyped-def]
                      conv_pads, transposed, node) -> spectral.Certificate:
    d = len(kernel)
    if all(k == 1 for k in kernel) and mode == "constant":
        # A 1x1 conv applies the same (block-diagonal) matrix at every position.
        w = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1])
        return spectral.gram_upper_bound(w)
    k_eff = [(kernel[i] - 1) * dilations[i] + 1 for i in range(d)]
    if transposed:
        # ConvTranspose is the adjoint of the strided conv with the same weight, run on
        # its full (uncropped) output; cropping the pads only removes outputs.
        opad = [int(v) for v in node.attrs.get("output_padding", [0] * d)]
        full = [(spatial[i] - 1) * strides[i] + k_eff[i] + opad[i] for i in range(d)]
        return spectral.strided_conv_upper_bound(weight, full, strides, dilations, groups)
    if mode == "wrap" and all(pre_pads[i][0] + pre_pads[i][1] == k_eff[i] - 1 for i in range(d)) \
            and all(b == 0 and e == 0 for b, e in conv_pads):
        # circular padding by exactly the kernel extent: a circular conv on the input grid
        # (subsampled when strided, which only removes outputs)
        cert = spectral.conv_fft_upper_bound(weight, list(spatial), dilations, groups)
        return spectral.Certificate(cert.value, "fft-circular")
    padded = [spatial[i] + pre_pads[i][0] + pre_pads[i][1] + conv_pads[i][0] + conv_pads[i][1]
              for i in range(d)]
    cert = spectral.strided_conv_upper_bound(weight, padded, strides, dilations, groups)
    if mode == "constant":
        return cert
    mult = math.prod(
        spectral.pad_multiplicity(mode, spatial[i], pre_pads[i][0], pre_pads[i][1]) for i in range(d)
    )
    return spectral.Certificate(cert.value * math.sqrt(mult), f"{cert.method} x {mode}-pad")


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
        name=node.name, op=node.op, kind="diagonal", input_shape=_shape_list(ctx, node.inputs[0]),
        sigma=value, sigma_upper=value, upper_method="exact", lipschitz=value,
        iterations=0, converged=True,
    )
    return Outcome(factors={0: value}, row=row)


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
                r.kind = "recurrent"
                rows.append(r)
    return Outcome(
        factors={}, extra_rows=rows,
        unbounded=f"{node.op}: a Lipschitz bound over sequences is out of scope (per-gate sigmas reported)",
    )
