"""Rules for pooling, reductions, padding and resizing."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .. import spectral
from ..graph import Node
from ..report import LayerRow, RowKind
from . import Context, Outcome, rule, unbounded


def _overlap(kernel: list[int], strides: list[int], dilations: list[int]) -> int:
    """Max number of pooling windows that contain one input position."""
    m = 1
    for k, s, d in zip(kernel, strides, dilations):
        m *= max(1, min(k, -(-((k - 1) * d + 1) // s)))
    return m


def _pool_attrs(node: Node) -> tuple[list[int], list[int], list[int], list[tuple[int, int]]]:
    kernel = [int(v) for v in node.attrs["kernel_shape"]]
    d = len(kernel)
    strides = [int(v) for v in node.attrs.get("strides", [1] * d)]
    dilations = [int(v) for v in node.attrs.get("dilations", [1] * d)]
    p = [int(v) for v in node.attrs.get("pads", [0] * 2 * d)]
    return kernel, strides, dilations, [(p[i], p[i + d]) for i in range(d)]


def _linear_row(ctx: Context, node: Node, fn: spectral.LinearMap, shape: tuple[int, ...],
                kind: RowKind = RowKind.POOL) -> Outcome:
    """A linear op with non-negative entries: power iteration + Schur certificate."""
    est = spectral.operator_estimate(fn, shape, ctx.settings)
    cert = spectral.schur_upper_bound(fn, shape)
    upper = max(cert.value, est.sigma) if math.isfinite(est.sigma) else cert.value
    row = LayerRow(
        name=node.name, op=node.op, kind=kind, input_shape=list(shape), sigma=est.sigma,
        sigma_upper=upper, upper_method=cert.method, lipschitz=upper,
        iterations=est.iterations, converged=est.converged,
    )
    return Outcome(factors={0: upper}, est_factors={0: est.sigma}, row=row)


def _formula_row(ctx: Context, node: Node, value: float, method: str, note: str | None = None) -> Outcome:
    dims = ctx.graph.shape(node.inputs[0])
    row = LayerRow(
        name=node.name, op=node.op, kind=RowKind.POOL, input_shape=list(dims) if dims is not None else None,
        sigma_upper=value, upper_method=method, lipschitz=value, note=note,
    )
    return Outcome(factors={0: value}, row=row)


@rule("MaxPool", "LpPool")
def max_pool(ctx: Context, node: Node, data: list[int]) -> Outcome:
    """A window's max (or its p-norm, p >= 2) is 1-Lipschitz in the l2 norm of the window;
    a position lies in at most m windows, so ||dy||^2 <= m ||dx||^2 and L = sqrt(m)."""
    if node.op == "LpPool" and float(node.attrs.get("p", 2)) < 2:
        return unbounded("LpPool with p < 2 is not bounded by lipcheck")
    kernel, strides, dilations, _ = _pool_attrs(node)
    m = _overlap(kernel, strides, dilations)
    return _formula_row(ctx, node, math.sqrt(m), "sqrt(window overlap)",
                        note=f"windows overlap at most {m} times")


@rule("AveragePool")
def average_pool(ctx: Context, node: Node, data: list[int]) -> Outcome:
    kernel, strides, dilations, pads = _pool_attrs(node)
    shape = ctx.graph.known_shape(node.inputs[0])
    include_pad = bool(node.attrs.get("count_include_pad", 0))
    d = len(kernel)
    if shape is None or node.attrs.get("ceil_mode", 0) or any(v != 1 for v in dilations) \
            or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "", "VALID"):
        # Schur by hand: rows sum to 1, an input is in <= m windows each weighing it by
        # 1/k when every window counts k values (pads counted, or no pads and no ceil_mode),
        # else by at most 1 (a partial window may hold a single value).
        m = _overlap(kernel, strides, dilations)
        k = math.prod(kernel)
        full = not node.attrs.get("ceil_mode", 0) and (include_pad or not any(b or e for b, e in pads))
        value = math.sqrt(m / k) if full else math.sqrt(m)
        return _formula_row(ctx, node, value, "schur (formula)")
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[d - 1]
    padder = spectral.pad_forward(pads)
    k_total = math.prod(kernel)
    ones = torch.ones((1, 1, *shape[2:]), dtype=torch.float64)
    counts = pool(padder(ones), kernel, strides) * k_total
    divisor = counts if not include_pad else torch.full_like(counts, float(k_total))

    def fn(x: torch.Tensor) -> torch.Tensor:
        s = pool(padder(x), kernel, strides) * k_total
        return s / divisor.to(device=x.device, dtype=x.dtype)

    return _linear_row(ctx, node, fn, shape)


@rule("GlobalAveragePool", "ReduceMean", "ReduceSum")
def reduce_mean(ctx: Context, node: Node, data: list[int]) -> Outcome:
    if data != [0]:
        return unbounded(f"{node.op} axes depend on the input values")
    shape = ctx.graph.known_shape(node.inputs[0])
    if node.op == "GlobalAveragePool":
        axes = list(range(2, len(shape))) if shape is not None else None
    else:
        axes_v = node.attrs.get("axes")
        if axes_v is None and len(node.inputs) > 1 and node.inputs[1]:
            c = ctx.graph.const(node.inputs[1])
            axes_v = None if c is None else [int(v) for v in c.reshape(-1)]
        if axes_v is None and shape is not None:
            axes_v = [] if node.attrs.get("noop_with_empty_axes", 0) else list(range(len(shape)))
        axes = None if axes_v is None or shape is None else [a % len(shape) for a in axes_v]
    if shape is None or axes is None:
        return unbounded(f"{node.op}: input shape unknown, reduction size cannot be bounded")
    n = math.prod(shape[a] for a in axes) if axes else 1
    # Mean over n values: the map has norm exactly 1/sqrt(n); a sum sqrt(n).
    value = math.sqrt(n) if node.op == "ReduceSum" else 1 / math.sqrt(n)
    row = LayerRow(
        name=node.name, op=node.op, kind=RowKind.POOL, input_shape=list(shape), sigma=value,
        sigma_upper=value, upper_method="exact", lipschitz=value, iterations=0, converged=True,
    )
    return Outcome(factors={0: value}, row=row)


@rule("Pad")
def pad(ctx: Context, node: Node, data: list[int]) -> Outcome:
    """A padding map has one 1 per row: norm sqrt(max copies of one input)."""
    g = ctx.graph
    if data != [0]:
        return unbounded("Pad amounts depend on the input values")
    mode = str(node.attrs.get("mode", "constant"))
    pads = node.attrs.get("pads")
    if pads is None and len(node.inputs) > 1:
        c = g.const(node.inputs[1])
        pads = None if c is None else [int(v) for v in c.reshape(-1)]
    shape = g.known_shape(node.inputs[0])
    if pads is None:
        return unbounded("Pad amounts unknown")
    rank = len(pads) // 2
    axes = list(range(rank))
    if len(node.inputs) > 3 and node.inputs[3]:
        c = g.const(node.inputs[3])
        if c is None:
            return unbounded("Pad axes unknown")
        axes = [int(a) for a in c.reshape(-1)]
    mult = 1
    for j, axis in enumerate(axes):
        size = shape[axis] if shape is not None else None
        mult *= spectral.pad_multiplicity(mode, size, pads[j], pads[j + rank])
    if mode == "constant":
        return Outcome(factors={0: 1.0})  # zero padding is an isometric embedding
    return _formula_row(ctx, node, math.sqrt(mult), "exact (copy count)")


@rule("Resize", "Upsample")
def resize(ctx: Context, node: Node, data: list[int]) -> Outcome:
    """Nearest-neighbour resize copies each input to at most prod(ceil(scale) + 1) outputs."""
    if data != [0]:
        return unbounded(f"{node.op} scales or sizes depend on the input values")
    mode = str(node.attrs.get("mode", "nearest"))
    if mode != "nearest":
        return unbounded(f"{node.op} mode '{mode}' is not supported yet")
    a, b = ctx.graph.known_shape(node.inputs[0]), ctx.graph.known_shape(node.outputs[0])
    if a is None or b is None:
        return unbounded(f"{node.op}: shapes unknown")
    if math.prod(a) == 0:
        return Outcome(factors={0: 0.0})  # a map from an empty tensor is the zero map
    mult = 1
    for x, y in zip(a, b):
        scale = y / x
        mult *= int(scale) if float(scale).is_integer() else int(np.ceil(scale)) + 1
    return _formula_row(ctx, node, math.sqrt(mult), "copy count")
