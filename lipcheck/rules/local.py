"""Local constants on a declared input domain (``--input-range``, ``--input-radius``).

Ops with no global Lipschitz constant have one on a bounded set. With the box of every
value (lipcheck.interval), for x and y in the domain:

- a * b: |a(x) b(x) - a(y) b(y)| <= |b(x)| |a(x) - a(y)| + |a(y)| |b(x) - b(y)|, so the
  factors are max|b| on a (the l2 norm of max|b| over the outputs one entry of a reaches,
  when a is broadcast) and max|a| on b, summed;
- a / b, with the divisor's box away from 0: d(a/b) = da / b - a db / b^2;
- A @ B (attention scores, probabilities times values): dA B + A dB, with |B_j|_2 of each
  batch entry bounded by the Frobenius and Schur norms of max|B_j| (|Bx| <= max|B| |x|
  entrywise);
- exp, log, sqrt, 1/x, x^p: max |f'| on the box (the box is convex, so the mean value
  theorem holds along the segment between any two of its points);
- x / |x| (LpNormalization, p = 2): 1 / min |x|;
- LayerNorm / RMSNorm: max|gamma| / sqrt(min var + eps), the smallest variance (mean
  square) of a row in the box computed exactly (``interval.min_variance``); tighter than
  the global 1/sqrt(eps) wherever the box keeps rows from being constant.

Each returns an Outcome with ``local=True`` (the network bound then says it holds on the
domain only), or None when there is no domain, so the caller keeps its global answer.
"""

from __future__ import annotations

import math

import numpy as np

from ..graph import Node
from ..interval import Box, mag, matrix_norm_bound, mig, min_mean_square, min_variance, product_factor
from ..report import LayerRow, RowKind
from . import Context, Outcome, unbounded

HINT = " (declare an input domain with --input-range or --input-radius for a local bound)"
LOCAL = "local on the input domain"


def _row(ctx: Context, node: Node, value: float, method: str, note: str,
         kind: RowKind = RowKind.PRODUCT) -> LayerRow:
    dims = ctx.graph.shape(node.inputs[0])
    return LayerRow(name=node.name, op=node.op, kind=kind,
                    input_shape=list(dims) if dims is not None else None, sigma=value, sigma_upper=value,
                    upper_method=method, lipschitz=value, note=f"{LOCAL}: {note}")


def _needed(ctx: Context, node: Node, positions: list[int], reason: str) -> list[Box] | Outcome:
    """The boxes of ``positions`` (constants are their own box), or the unbounded outcome
    saying why there are none."""
    assert ctx.boxes is not None
    out = []
    for k in positions:
        name = node.inputs[k]
        c = ctx.graph.const(name) if name in ctx.graph.static else None
        if c is not None:
            v = c.astype(np.float64)
            out.append((v, v))
            continue
        box = ctx.boxes.get(name)
        if box is None:
            return unbounded(f"{reason}; on the input domain: {ctx.boxes.why(name)}")
        out.append(box)
    return out


def product(ctx: Context, node: Node, data: list[int], reason: str) -> Outcome:
    """Mul of two activations."""
    if ctx.boxes is None:
        return unbounded(reason + HINT)
    boxes = _needed(ctx, node, [0, 1], reason)
    if isinstance(boxes, Outcome):
        return boxes
    shapes = [b[0].shape for b in boxes]
    out_shape = np.broadcast_shapes(*shapes)
    factors = {k: product_factor(mag(boxes[1 - k]), shapes[k], out_shape) for k in data}
    text = ", ".join(f"{f:.4g} on input {k}" for k, f in factors.items())
    row = _row(ctx, node, max(factors.values()), "max|other factor| on the box",
               f"d(ab) = b da + a db: {text}, summed")
    return Outcome(factors=factors, row=row, local=True)


def quotient(ctx: Context, node: Node, data: list[int], reason: str) -> Outcome:
    """Div with the divisor an activation."""
    if ctx.boxes is None:
        return unbounded(reason + HINT)
    boxes = _needed(ctx, node, [0, 1], reason)
    if isinstance(boxes, Outcome):
        return boxes
    (a, b) = boxes
    low = mig(b)
    if not bool(np.all(low > 0)):
        return unbounded(f"{reason}; on the input domain the divisor's interval holds 0")
    inv = 1.0 / low
    shapes = [a[0].shape, b[0].shape]
    out_shape = np.broadcast_shapes(*shapes)
    factors = {}
    if 0 in data:
        factors[0] = product_factor(inv, shapes[0], out_shape)
    factors[1] = product_factor(np.broadcast_to(mag(a), out_shape) * np.broadcast_to(inv, out_shape) ** 2,
                                shapes[1], out_shape)
    text = ", ".join(f"{f:.4g} on input {k}" for k, f in factors.items())
    row = _row(ctx, node, max(factors.values()), "max|1/b|, max|a/b^2| on the box",
               f"d(a/b) = da/b - a db/b^2: {text}, summed")
    return Outcome(factors=factors, row=row, local=True)


def matmul(ctx: Context, node: Node, data: list[int], reason: str) -> Outcome:
    """MatMul of two activations (attention's q k^T and p v)."""
    if ctx.boxes is None:
        return unbounded(reason + HINT)
    boxes = _needed(ctx, node, [0, 1], reason)
    if isinstance(boxes, Outcome):
        return boxes
    a, b = boxes
    if a[0].ndim < 2 or b[0].ndim < 2:
        return unbounded(f"{reason}; a 1-D operand has no local rule")
    batch = np.broadcast_shapes(a[0].shape[:-2], b[0].shape[:-2])
    # |A_j|_2 and |B_j|_2 of every batch entry, over the output's batch shape
    norm_a = np.broadcast_to(_operand_norm(ctx, node.inputs[0], a), batch)
    norm_b = np.broadcast_to(_operand_norm(ctx, node.inputs[1], b), batch)
    factors = {}
    if 0 in data:
        factors[0] = product_factor(norm_b, a[0].shape[:-2], batch)
    if 1 in data:
        factors[1] = product_factor(norm_a, b[0].shape[:-2], batch)
    text = ", ".join(f"{f:.4g} on input {k}" for k, f in factors.items())
    row = _row(ctx, node, max(factors.values()), "max |other operand|_2 on the box",
               f"d(AB) = dA B + A dB with |B|_2, |A|_2 bounded by min(Frobenius, Schur) of their "
               f"largest magnitudes: {text}, summed")
    return Outcome(factors=factors, row=row, local=True)


def _operand_norm(ctx: Context, value: str, box: Box) -> np.ndarray:
    """Bounds on |M_j|_2 for the matrices M_j of ``value`` in ``box``: min(Frobenius, Schur)
    of their largest magnitudes; for a softmax over the last axis (attention probabilities),
    whose rows sum to 1 exactly, sqrt(max column sum), from |M|_2^2 <= |M|_1 |M|_inf."""
    m = mag(box)
    bound = matrix_norm_bound(m)
    if softmax_rows(ctx, value):
        bound = np.minimum(bound, np.sqrt(m.sum(axis=-2).max(axis=-1)) * (1 + 1e-12))
    return bound


def softmax_rows(ctx: Context, value: str) -> bool:
    """``value`` is a Softmax over its last axis (opset 13 on: that axis alone)."""
    node = ctx.graph.producer.get(value)
    shape = ctx.graph.shape(value)
    if node is None or node.op != "Softmax" or node.domain or shape is None or ctx.graph.opset < 13:
        return False
    return int(node.attrs.get("axis", -1)) % len(shape) == len(shape) - 1


def softmax(ctx: Context, node: Node) -> Outcome | None:
    """Softmax on the domain: its Jacobian diag(p) - p p^T is symmetric positive semidefinite
    with v^T J v = Var_p(v) <= sum_i p_i v_i^2 <= max_i p_i for a unit v, and <= 1/2 by
    Popoviciu's inequality (a variable with values in [min v, max v], max v - min v <= sqrt(2),
    has variance at most 2/4); so |J| <= min(1/2, max p), the largest probability taken from
    the output's box. None without a domain, a box or an axis known to be one."""
    if ctx.boxes is None or not softmax_rows(ctx, node.outputs[0]):
        return None
    box = ctx.boxes.get(node.outputs[0])
    if box is None:
        return None
    value = min(0.5, float(box[1].max())) * (1 + 1e-12)
    row = _row(ctx, node, value, "min(1/2, max p) on the box",
               "|diag(p) - p p^T| <= min(1/2, max p) (Popoviciu)", RowKind.ACTIVATION)
    return Outcome(factors={0: value}, row=row, local=True)


def _slope(node: Node, box: Box, ctx: Context) -> tuple[float, str] | str:
    """max |f'| of an element-wise op on ``box``, and how; or why there is none."""
    lo, hi = box
    op = node.op
    if op == "Exp":
        return float(np.exp(hi.max())) * (1 + 1e-12), "exp(max x)"
    if op in ("Log", "Sqrt"):
        low = float(lo.min())
        if not low > 0:
            return f"{op.lower()} on a box reaching {low:g} <= 0"
        value = 1.0 / low if op == "Log" else 0.5 / math.sqrt(low)
        return value * (1 + 1e-12), f"{'1/min x' if op == 'Log' else '1/(2 sqrt(min x))'}"
    if op == "Reciprocal":
        low = float(mig(box).min())
        if not low > 0:
            return "1/x on a box holding 0"
        return (1.0 / low ** 2) * (1 + 1e-12), "1/min x^2"
    if op == "Pow":
        e = ctx.graph.const(node.inputs[1])
        if e is None or e.size != 1:
            return "Pow exponent is not a known constant number"
        p = float(e.reshape(-1)[0])
        if p == 0 or p == 1:
            return abs(p), "exponent 0 or 1"
        if p > 1:
            return abs(p) * float(mag(box).max()) ** (p - 1) * (1 + 1e-12), "|p| max|x|^(p-1)"
        low = float(mig(box).min())
        if not low > 0 or (not p.is_integer() and float(lo.min()) < 0):
            return f"x^{p:g} on a box reaching 0 (or negative values)"
        return abs(p) * low ** (p - 1) * (1 + 1e-12), "|p| min|x|^(p-1)"
    return f"{op} has no local rule"


def elementwise(ctx: Context, node: Node, data: list[int], reason: str) -> Outcome:
    """Exp, Log, Sqrt, Reciprocal, Pow (constant exponent), LpNormalization (p = 2)."""
    if ctx.boxes is None:
        return unbounded(reason + HINT)
    if data != [0]:
        return unbounded(f"{reason}; the exponent depends on the input")
    boxes = _needed(ctx, node, [0], reason)
    if isinstance(boxes, Outcome):
        return boxes
    box = boxes[0]
    if node.op == "LpNormalization":
        if int(node.attrs.get("p", 2)) != 2:
            return unbounded(f"{reason}; only p = 2 has a local rule")
        axis = int(node.attrs.get("axis", -1)) % box[0].ndim
        low = float((np.moveaxis(mig(box), axis, -1) ** 2).sum(axis=-1).min())
        if not low > 0:
            return unbounded(f"{reason}; on the input domain a row can be 0")
        value = (1.0 / math.sqrt(low)) * (1 + 1e-12)
        return Outcome(factors={0: value}, local=True,
                       row=_row(ctx, node, value, "1/min |x|", "d(x/|x|) = (I - u u^T)/|x|",
                                    RowKind.NORMALIZATION))
    with np.errstate(over="ignore"):
        found = _slope(node, box, ctx)
    if isinstance(found, str):
        return unbounded(f"{reason}; on the input domain: {found}")
    value, how = found
    if not math.isfinite(value):
        return unbounded(f"{reason}; on the input domain: interval overflow at {node.name} (its slope)")
    return Outcome(factors={0: value}, local=True, row=_row(ctx, node, value, how, f"sup |f'| on the box: {how}",
                                                                  RowKind.ACTIVATION))


def _rows(box: Box, axes: tuple[int, ...]) -> Box:
    """The box with ``axes`` moved last and flattened into one (one row per group)."""
    rest = [k for k in range(box[0].ndim) if k not in axes]
    order = rest + list(axes)
    n = math.prod(box[0].shape[k] for k in axes)
    return (np.transpose(box[0], order).reshape(-1, n), np.transpose(box[1], order).reshape(-1, n))


def normalisation(ctx: Context, source: str, axes: tuple[int, ...] | None, centred: bool,
                  eps: float) -> tuple[float, float] | None:
    """1 / sqrt(min var + eps) (``centred``) or 1 / sqrt(min mean square + eps), the
    normalised groups being ``source``'s entries along ``axes``; with the smallest variance
    (mean square). None without a domain, a box or known axes."""
    if ctx.boxes is None:
        return None
    box = ctx.boxes.get(source)
    if box is None or axes is None:
        return None
    lo, hi = _rows(box, axes)
    low = float((min_variance(lo, hi) if centred else min_mean_square(lo, hi)).min())
    return (1.0 / math.sqrt(low + eps)) * (1 + 1e-12), low
