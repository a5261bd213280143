"""Interval bound propagation: a box holding every value each node can take on a domain.

``--input-range LO,HI`` (one range for every input element, or ``LO,HI;LO,HI;...`` one per
channel, axis 1) and ``--input-radius R`` (an L2 ball around the range's middle, or around
0) declare the inputs the user cares about. ``propagate`` carries a box [lo, hi] through
the graph op by op, in float64, each box widened outward by a relative 1e-12 for the
rounding of its own computation. The rules then turn boxes into *local* constants, valid
for inputs in the domain only, for what has no global one: products and quotients of
activations, attention's MatMul of two activations, exp/log/sqrt/pow, and normalisation
by a variance that the box bounds away from 0 (lipcheck.rules).

The rules per op (``x`` the data input's box, c = (lo + hi) / 2, r = (hi - lo) / 2):

- nondecreasing in every data input (ReLU, sigmoid, reshapes, selections, pooling, sums,
  reductions, concatenation, ...): the op applied to the lower ends and to the upper ends;
- linear with constant weights (Gemm, MatMul, Conv, ConvTranspose): centre c W + b, radius
  r |W| (Rump's midpoint-radius product; also for MatMul of two boxes, with the radius
  |Ac| Br + Ar |Bc| + Ar Br);
- Mul, Div (a divisor box holding 0 leaves the value without a box), Sub, Neg, Abs, Pow;
- GELU, HardSwish, Mish: decreasing, then increasing: the ends, and the minimum if the box
  reaches it;
- Softmax: p_i in [e^lo_i / (e^lo_i + sum_j!=i e^hi_j), e^hi_i / (e^hi_i + sum_j!=i e^lo_j)];
- LayerNorm / RMSNorm: |y - beta| <= |gamma| |x_i - mean| / sqrt(min var + eps), the
  smallest variance on the box computed exactly (``min_variance``);
- Where: the hull of both branches (whatever the condition).

A value whose box cannot be computed (an op without a rule here, a divisor that may be 0)
has none, and ``why`` says so; a box with an infinite width or a NaN is an overflow, named
by its node, and leaves the value without a box too. A rule needing a missing box keeps
the op unbounded with that reason, never a number.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .errors import UsageError
from .graph import Graph, Node, evaluate

Box = tuple[np.ndarray, np.ndarray]

# outward widening per op, relative to the magnitude of the value (float64 rounding of one
# op's arithmetic is a few units of 1e-16 times the sum of magnitudes, far below this)
WIDEN = 1e-12
# boxes are refused past this many elements per value (a 1x3x1024x1024 image's first conv
# output has 67 million): memory, not soundness
MAX_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class Domain:
    """The inputs a local bound holds for. ``ranges``: one (lo, hi) for every element, or one
    per channel (axis 1); ``radius``: an L2 ball of that radius around the ranges' middle
    (around 0 without ranges), intersected with the ranges when both are given."""

    ranges: tuple[tuple[float, float], ...] | None = None
    radius: float | None = None

    def __post_init__(self) -> None:
        if self.ranges is None and self.radius is None:
            raise UsageError("an input domain needs {param} or --input-radius", param="input_range")
        if self.radius is not None and not (self.radius > 0 and math.isfinite(self.radius)):
            raise UsageError(f"{{param}} must be a positive number, got {self.radius:g}", param="input_radius")

    def describe(self) -> str:
        parts = []
        if self.ranges is not None:
            if len(self.ranges) == 1:
                lo, hi = self.ranges[0]
                parts.append(f"every input element in [{lo:g}, {hi:g}]")
            else:
                text = ", ".join(f"[{lo:g}, {hi:g}]" for lo, hi in self.ranges)
                parts.append(f"input channel k (axis 1) in range k of {text}")
        if self.radius is not None:
            centre = "the ranges' middle" if self.ranges is not None else "0"
            parts.append(f"inputs within L2 distance {self.radius:g} of {centre}")
        return "; ".join(parts)

    def box(self, shape: tuple[int, ...]) -> Box:
        """The input's box: the ranges (broadcast over one value of ``shape``) intersected
        with the ball's bounding box."""
        if self.ranges is None:
            lo, hi = np.full(shape, -math.inf), np.full(shape, math.inf)
        elif len(self.ranges) == 1:
            lo, hi = np.full(shape, self.ranges[0][0]), np.full(shape, self.ranges[0][1])
        else:
            if len(shape) < 2 or shape[1] != len(self.ranges):
                raise UsageError(f"{{param}} gives {len(self.ranges)} per-channel ranges but the input has "
                                 f"shape {list(shape)}, with {shape[1] if len(shape) > 1 else 'no'} channels on axis 1",
                                 param="input_range")
            per = np.array(self.ranges, dtype=np.float64)
            view = (1, len(self.ranges)) + (1,) * (len(shape) - 2)
            lo = np.broadcast_to(per[:, 0].reshape(view), shape).copy()
            hi = np.broadcast_to(per[:, 1].reshape(view), shape).copy()
        if self.radius is not None:
            centre = self.centre(shape)
            lo, hi = np.maximum(lo, centre - self.radius), np.minimum(hi, centre + self.radius)
        return lo, hi

    def centre(self, shape: tuple[int, ...]) -> np.ndarray:
        """The ball's centre (the ranges' middle, or 0)."""
        if self.ranges is None:
            return np.zeros(shape)
        if len(self.ranges) == 1:
            return np.full(shape, (self.ranges[0][0] + self.ranges[0][1]) / 2)
        per = np.array([(lo + hi) / 2 for lo, hi in self.ranges])
        return np.broadcast_to(per.reshape((1, len(per)) + (1,) * (len(shape) - 2)), shape).copy()


def parse_range(text: str) -> tuple[tuple[float, float], ...]:
    """``LO,HI`` or ``LO,HI;LO,HI;...`` (one per channel) as pairs; a malformed range, one
    with LO > HI or a non-finite end is a usage error."""
    pairs = []
    for part in text.split(";"):
        ends = [e.strip() for e in part.split(",")]
        if len(ends) != 2:
            raise UsageError(f"{{param}} takes LO,HI (or LO,HI;LO,HI;... one per channel), got {text!r}",
                             param="input_range")
        try:
            lo, hi = float(ends[0]), float(ends[1])
        except ValueError:
            raise UsageError(f"{{param}} takes numbers LO,HI, got {part.strip()!r}", param="input_range") from None
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise UsageError(f"{{param}} ends must be finite, got {part.strip()!r}", param="input_range")
        if lo > hi:
            raise UsageError(f"{{param}} has LO > HI: {part.strip()!r}", param="input_range")
        pairs.append((lo, hi))
    return tuple(pairs)


@dataclass
class Boxes:
    """The box of every value that has one, and why the others have none."""

    domain: Domain
    values: dict[str, Box] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    # the first node whose box overflowed (None: none did)
    overflow: str | None = None

    def get(self, value: str) -> Box | None:
        return self.values.get(value)

    def why(self, value: str) -> str:
        return self.missing.get(value, f"no interval for {value}")

    def max_abs(self, value: str) -> np.ndarray | None:
        box = self.get(value)
        return None if box is None else np.maximum(np.abs(box[0]), np.abs(box[1]))


# --------------------------------------------------------------------------- helpers


def _widen(lo: np.ndarray, hi: np.ndarray) -> Box:
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        pad = WIDEN * np.maximum(np.abs(lo), np.abs(hi)) + 1e-300
        pad = np.where(np.isfinite(pad), pad, 0.0)
        return lo - pad, hi + pad


def mag(box: Box) -> np.ndarray:
    """max |x| over the box, elementwise."""
    return np.maximum(np.abs(box[0]), np.abs(box[1]))


def mig(box: Box) -> np.ndarray:
    """min |x| over the box, elementwise (0 where the box holds 0)."""
    lo, hi = box
    return np.where(lo > 0, lo, np.where(hi < 0, -hi, 0.0))


def _mul(a: Box, b: Box) -> Box:
    with np.errstate(invalid="ignore", over="ignore"):
        p = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
    return _widen(np.minimum.reduce(p), np.maximum.reduce(p))


def _reciprocal(b: Box) -> Box | None:
    lo, hi = b
    if not bool(np.all((lo > 0) | (hi < 0))):
        return None
    with np.errstate(divide="ignore", over="ignore"):
        return _widen(1.0 / hi, 1.0 / lo)


def _matmul(a: Box, b: Box) -> Box:
    """Midpoint-radius interval matrix product (Rump 1999)."""
    ac, ar = (a[0] + a[1]) / 2, (a[1] - a[0]) / 2
    bc, br = (b[0] + b[1]) / 2, (b[1] - b[0]) / 2
    with np.errstate(invalid="ignore", over="ignore"):
        c = np.matmul(ac, bc)
        r = np.matmul(np.abs(ac), br) + np.matmul(ar, np.abs(bc)) + np.matmul(ar, br)
        # rounding of the centre product: n * eps * |a||b|, covered by a relative term on |ac||bc|
        n = ac.shape[-1] if ac.ndim else 1
        r = r + (n + 2) * 2.3e-16 * np.matmul(np.abs(ac), np.abs(bc))
    return _widen(c - r, c + r)


def _reduce_groups(x: np.ndarray, axis: int) -> np.ndarray:
    """``x`` with the axes from ``axis`` on flattened into one last axis."""
    axis %= x.ndim
    return x.reshape(x.shape[:axis] + (-1,))


def min_variance(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """A lower bound, per row (last axis), on the smallest population variance of a vector
    in the box [lo, hi]: min over c of mean(dist(c, [lo_i, hi_i])^2), a convex function of
    c whose minimiser is bracketed by bisection on its derivative; the value at the bracket's
    middle less |f'| times the bracket's width is below the minimum (convexity)."""
    n = lo.shape[-1]
    a = lo.min(axis=-1, keepdims=True)
    b = hi.max(axis=-1, keepdims=True)

    def slope(c: np.ndarray) -> np.ndarray:
        return (np.maximum(c - hi, 0.0) - np.maximum(lo - c, 0.0)).sum(axis=-1, keepdims=True) * (2.0 / n)

    for _ in range(80):
        mid = (a + b) / 2
        up = slope(mid) > 0
        b = np.where(up, mid, b)
        a = np.where(up, a, mid)
    c = (a + b) / 2
    f = (np.maximum(c - hi, 0.0) ** 2 + np.maximum(lo - c, 0.0) ** 2).sum(axis=-1, keepdims=True) / n
    low = f - np.abs(slope(c)) * (b - a)
    return np.maximum(low * (1 - 1e-12), 0.0)[..., 0]


def min_mean_square(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The smallest mean(x^2) over the box, per row (last axis)."""
    return (mig((lo, hi)) ** 2).mean(axis=-1) * (1 - 1e-12)


# --------------------------------------------------------------------------- op rules

# nondecreasing in each data input (the others constant): the op of the lower ends and of
# the upper ends; the value per op: which input positions may carry data (None: any)
MONOTONE: dict[str, tuple[int, ...] | None] = {
    "Identity": None, "Dropout": (0,), "Flatten": (0,), "Reshape": (0,), "Transpose": (0,),
    "Squeeze": (0,), "Unsqueeze": (0,), "Slice": (0,), "Split": (0,), "Concat": None,
    "Gather": (0,), "GatherElements": (0,), "GatherND": (0,), "Expand": (0,), "Tile": (0,),
    "Pad": (0,), "DepthToSpace": (0,), "SpaceToDepth": (0,), "Cast": (0,), "CastLike": (0,),
    "Add": None, "Sum": None, "Mean": None, "Max": None, "Min": None, "Clip": None,
    "Relu": (0,), "Sigmoid": (0,), "Tanh": (0,), "Softplus": (0,), "Softsign": (0,),
    "Elu": (0,), "Celu": (0,), "Selu": (0,), "Erf": (0,), "Exp": (0,), "Log": (0,),
    "Sqrt": (0,), "Atan": (0,), "Asinh": (0,), "Sinh": (0,), "ThresholdedRelu": (0,),
    "Floor": (0,), "Ceil": (0,), "Round": (0,), "Sign": (0,), "CumSum": (0,), "Trilu": (0,),
    "MaxPool": (0,), "AveragePool": (0,), "GlobalAveragePool": (0,), "GlobalMaxPool": (0,),
    "ReduceMean": (0,), "ReduceSum": (0,), "ReduceMax": (0,), "ReduceMin": (0,),
}

# decreasing, then increasing: (an interval holding the minimiser, a value at most the minimum)
DIPS: dict[str, tuple[float, float, float]] = {
    "Gelu": (-0.76, -0.74, -0.17),          # min -0.16997 at -0.7518 (erf and tanh forms)
    "HardSwish": (-1.5, -1.5, -0.375),       # x relu6(x + 3) / 6: min -3/8 at -3/2
    "Mish": (-1.20, -1.18, -0.3089),         # min -0.30884 at -1.1924
}

Rule = Callable[[Graph, Node, list[Box | None], int], list[Box] | None]


def _run(graph: Graph, node: Node, inputs: list[np.ndarray | None]) -> list[np.ndarray] | None:
    out = evaluate(node, inputs, limit=MAX_ELEMENTS, opset=graph.opset or 21)
    return None if out is None else [np.asarray(v, dtype=np.float64) for v in out]


def _monotone(graph: Graph, node: Node, boxes: list[Box | None], opset: int) -> list[Box] | None:
    los = [None if b is None else b[0] for b in boxes]
    his = [None if b is None else b[1] for b in boxes]
    if node.op in ("Cast", "CastLike"):  # keep float64 (a cast to a float type only rounds)
        return [_widen(*boxes[0])] if boxes[0] is not None else None
    lo, hi = _run(graph, node, los), _run(graph, node, his)
    if lo is None or hi is None:
        return None
    return [_widen(np.minimum(a, b), np.maximum(a, b)) for a, b in zip(lo, hi)]


def _linear(graph: Graph, node: Node, boxes: list[Box | None]) -> list[Box] | None:
    """Gemm / Conv / ConvTranspose with a constant weight and bias, data at position 0:
    centre op(c) + b, radius |op|(r) (the op with |W|, its sign taken off for Gemm's alpha),
    plus the centre's rounding, bounded by a relative 1e-13 of |op|(|c|) (float64 sums of
    up to ~1e5 terms)."""
    x, w = boxes[0], boxes[1]
    if x is None or w is None:
        return None
    c, r = (x[0] + x[1]) / 2, (x[1] - x[0]) / 2
    consts = [None if b is None else b[0] for b in boxes]
    centre = _run(graph, node, [c, *consts[1:]])
    radius = _run(graph, node, [r + 1e-13 * np.abs(c), np.abs(w[0])])
    if centre is None or radius is None:
        return None
    rad = np.abs(radius[0])
    return [_widen(centre[0] - rad, centre[0] + rad)]


def _softmax(x: Box, axis: int, log: bool) -> Box:
    lo, hi = x
    m = hi.max(axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        e_lo, e_hi = np.exp(lo - m), np.exp(hi - m)
        s_hi = e_hi.sum(axis=axis, keepdims=True)
        s_lo = e_lo.sum(axis=axis, keepdims=True)
        n = lo.shape[axis]
        # others' sum: all of them, upper; all less oneself (less its rounding), lower
        others_lo = np.maximum(s_lo - e_lo - (n + 1) * 2.3e-16 * s_lo, 0.0)
        p_lo = e_lo / (e_lo + s_hi)
        p_hi = e_hi / (e_hi + others_lo)
        p_hi = np.where(np.isfinite(p_hi), np.minimum(p_hi, 1.0), 1.0)
        p_lo = np.where(np.isfinite(p_lo), p_lo, 0.0)
        if log:
            return _widen(np.log(p_lo), np.log(p_hi))
    return _widen(p_lo, np.minimum(p_hi, 1.0))


def _normalised_magnitude(x: Box, axis: int, centred: bool, eps: float) -> np.ndarray:
    """A bound on |x_i - mean| / sqrt(var + eps) (LayerNorm) or |x_i| / sqrt(ms + eps)
    (RMSNorm), per element, with the groups the axes from ``axis`` on."""
    lo, hi = x
    shape = lo.shape
    glo, ghi = _reduce_groups(lo, axis), _reduce_groups(hi, axis)
    n = glo.shape[-1]
    if centred:
        mean_lo = glo.mean(axis=-1, keepdims=True)
        mean_hi = ghi.mean(axis=-1, keepdims=True)
        dev = np.maximum(ghi - mean_lo, mean_hi - glo)
        low = min_variance(glo, ghi)[..., None]
        cap = math.sqrt(max(n - 1, 0))
    else:
        dev = mag((glo, ghi))
        low = min_mean_square(glo, ghi)[..., None]
        cap = math.sqrt(n)
    with np.errstate(divide="ignore"):
        out = np.minimum(dev * (1 + 1e-12) / np.sqrt(low + eps), cap)
    return out.reshape(shape)


def _norm_op(graph: Graph, node: Node, boxes: list[Box | None]) -> list[Box] | None:
    x = boxes[0]
    assert x is not None
    rank = x[0].ndim
    eps = float(np.float32(node.attrs.get("epsilon", 1e-5)))
    if node.op in ("LayerNormalization", "RMSNormalization"):
        axis = int(node.attrs.get("axis", -1)) % rank
        u = _normalised_magnitude(x, axis, node.op == "LayerNormalization", eps)
    else:  # Group/InstanceNormalization: |x_hat| <= sqrt(n - 1) for a group of n entries
        shape = x[0].shape
        groups = int(node.attrs.get("num_groups") or shape[1]) if node.op == "GroupNormalization" else shape[1]
        n = math.prod(shape[1:]) // max(groups, 1)
        u = np.full(shape, math.sqrt(max(n - 1, 0)))
    scale = boxes[1] if len(boxes) > 1 else None
    bias = boxes[2] if len(boxes) > 2 else None
    if scale is None:
        return None
    shape = x[0].shape
    if node.op in ("LayerNormalization", "RMSNormalization"):
        g = np.broadcast_to(mag(scale), shape)
        b = np.broadcast_to(bias[0], shape) if bias is not None else 0.0
    else:  # per channel
        view = (1, -1) + (1,) * (len(shape) - 2)
        if node.op == "GroupNormalization" and mag(scale).size != shape[1]:
            return None
        g = np.broadcast_to(mag(scale).reshape(view), shape)
        b = np.broadcast_to(bias[0].reshape(view), shape) if bias is not None else 0.0
    span = g * u
    return [_widen(b - span, b + span)]  # not the mean / inverse deviation outputs


def _abs(x: Box) -> Box:
    return _widen(mig(x), mag(x))


def _pow(x: Box, p: float) -> Box | None:
    lo, hi = x
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if float(p).is_integer():
            k = int(p)
            if k == 0:
                return np.ones_like(lo), np.ones_like(hi)
            if k > 0 and k % 2 == 0:
                a = _abs(x)
                return _widen(a[0] ** k, a[1] ** k)
            if k > 0:
                return _widen(lo ** k, hi ** k)
            r = _reciprocal(x)
            return None if r is None else _pow(r, -k)
        if not bool(np.all(lo >= 0)):
            return None
        if p > 0:
            return _widen(lo ** p, hi ** p)
        if not bool(np.all(lo > 0)):
            return None
        return _widen(hi ** p, lo ** p)


def _dip(graph: Graph, node: Node, x: Box, opset: int) -> list[Box] | None:
    out = _monotone(graph, node, [x], opset)  # the ends (min/max of f(lo), f(hi))
    if out is None:
        return None
    a, b, fmin = DIPS[node.op]
    reaches = (x[0] <= b) & (x[1] >= a)
    lo = np.where(reaches, np.minimum(out[0][0], fmin), out[0][0])
    return [(lo, out[0][1])]


def _rule(graph: Graph, node: Node, boxes: list[Box | None], data: list[int]) -> list[Box] | None:
    op = node.op
    opset = graph.opset or 21
    if op in MONOTONE:
        allowed = MONOTONE[op]
        if allowed is not None and any(k not in allowed for k in data):
            return None
        return _monotone(graph, node, boxes, opset)
    if op in ("LeakyRelu", "HardSigmoid", "PRelu"):
        # monotone with a nonnegative slope parameter
        if op == "LeakyRelu" and float(node.attrs.get("alpha", 0.01)) < 0:
            return None
        if op == "HardSigmoid" and float(node.attrs.get("alpha", 0.2)) < 0:
            return None
        if op == "PRelu" and (1 in data or boxes[1] is None or bool(np.any(boxes[1][0] < 0))):
            return None
        return _monotone(graph, node, boxes, opset)
    if op in DIPS:
        return _dip(graph, node, boxes[0], opset) if data == [0] else None  # type: ignore[arg-type]
    if op in ("Gemm", "Conv", "ConvTranspose"):
        # linear in the data input (transA and alpha included); the weight must be constant
        return _linear(graph, node, boxes) if data == [0] else None
    if op == "MatMul":
        a, b = boxes
        if a is None or b is None:
            return None
        return [_matmul(a, b)]
    if op == "Mul":
        a, b = boxes
        return None if a is None or b is None else [_mul(a, b)]
    if op == "Div":
        a, b = boxes
        if a is None or b is None:
            return None
        r = _reciprocal(b)
        return None if r is None else [_mul(a, r)]
    if op == "Reciprocal":
        r = _reciprocal(boxes[0])  # type: ignore[arg-type]
        return None if r is None else [r]
    if op == "Sub":
        a, b = boxes
        if a is None or b is None:
            return None
        return [_widen(a[0] - b[1], a[1] - b[0])]
    if op == "Neg":
        x = boxes[0]
        return None if x is None else [(-x[1], -x[0])]
    if op == "Abs":
        return [_abs(boxes[0])]  # type: ignore[arg-type]
    if op == "Pow":
        e = boxes[1]
        if 1 in data or e is None or e[0].size != 1:
            return None
        out = _pow(boxes[0], float(e[0].reshape(-1)[0]))  # type: ignore[arg-type]
        return None if out is None else [out]
    if op in ("Softmax", "LogSoftmax"):
        x = boxes[0]
        assert x is not None
        axis = int(node.attrs.get("axis", -1 if opset >= 13 else 1))
        if opset < 13:
            return None
        return [_softmax(x, axis % x[0].ndim, op == "LogSoftmax")]
    if op in ("LayerNormalization", "RMSNormalization", "GroupNormalization", "InstanceNormalization"):
        if data != [0]:
            return None
        return _norm_op(graph, node, boxes)
    if op == "BatchNormalization":
        if data != [0] or any(b is None for b in boxes[1:5]):
            return None
        x = boxes[0]
        assert x is not None
        scale, bias, mean, var = (b[0] for b in boxes[1:5])  # type: ignore[index]
        eps = float(np.float32(node.attrs.get("epsilon", 1e-5)))
        view = (1, -1) + (1,) * (x[0].ndim - 2)
        s = (scale / np.sqrt(var + eps)).reshape(view)
        shifted = (x[0] - mean.reshape(view), x[1] - mean.reshape(view))
        y = _mul(shifted, (s, s))
        return [_widen(y[0] + bias.reshape(view), y[1] + bias.reshape(view))]  # not the statistics
    if op == "Where":
        bx, by = boxes[1], boxes[2]
        if bx is None or by is None:
            return None
        cond = boxes[0]
        if 0 not in data and cond is not None:
            return _monotone(graph, node, boxes, opset)
        both = np.broadcast_shapes(bx[0].shape, by[0].shape, cond[0].shape if cond is not None else ())
        return [(np.broadcast_to(np.minimum(bx[0], by[0]), both).copy(),
                 np.broadcast_to(np.maximum(bx[1], by[1]), both).copy())]
    if op in ("Greater", "Less", "Equal", "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or", "Xor",
              "IsNaN", "IsInf"):
        known = graph.known_shape(node.outputs[0])
        if known is None:
            return None
        return [(np.zeros(known), np.ones(known))]
    if op in ("ReduceL2", "ReduceSumSquare", "ReduceL1"):
        x = boxes[0]
        if data != [0] or x is None:
            return None
        a = _abs(x)
        return _monotone(graph, node, [a, *boxes[1:]], opset)
    if op in ("Sin", "Cos"):
        shape = boxes[0][0].shape  # type: ignore[index]
        return [(np.full(shape, -1.0), np.full(shape, 1.0))]
    return None


def _bad(box: Box) -> str | None:
    lo, hi = box
    if bool(np.isnan(lo).any() or np.isnan(hi).any()):
        return "not a number"
    with np.errstate(invalid="ignore"):
        wide = ~(hi - lo < math.inf) & (lo != hi)
    if bool(wide.any()) or bool((lo > hi).any()):
        return "infinite"
    return None


# ops whose rules can use a box (lipcheck.rules.local): the boxes of their inputs and outputs
# are kept, the others dropped once their last reader has run
USERS = frozenset({"Mul", "Div", "MatMul", "Softmax", "Exp", "Log", "Sqrt", "Reciprocal", "Pow",
                   "LpNormalization", "LayerNormalization", "RMSNormalization",
                   "ReduceMean"})  # a decomposed LayerNorm's source is read by its ReduceMean


def propagate(graph: Graph, domain: Domain) -> Boxes:
    """A box for every value the graph computes from its data inputs on ``domain`` that a
    rule may read (the inputs and outputs of ``USERS``; nothing is propagated when the graph
    has none of them)."""
    boxes = Boxes(domain)
    keep = {v for n in graph.nodes if n.op in USERS and not n.domain for v in (*n.inputs, *n.outputs) if v}
    if not keep:
        return boxes
    last_reader: dict[str, int] = {}
    for i, n in enumerate(graph.nodes):
        for v in n.inputs:
            if v:
                last_reader[v] = i
    dies: dict[int, list[str]] = {}
    for v, i in last_reader.items():
        if v not in keep and v not in graph.outputs:
            dies.setdefault(i, []).append(v)
    shapes = {}
    for name in graph.inputs:
        shape = graph.known_shape(name)
        if shape is None:
            raise UsageError(f"{{param}} needs the shape of input {name!r}; pass --input-shape",
                             param="input_range")
        shapes[name] = shape
    for name, shape in shapes.items():
        boxes.values[name] = domain.box(shape)
    ball_inputs = set(graph.inputs) if domain.radius is not None and len(graph.inputs) == 1 else set()
    for i, node in enumerate(graph.nodes):
        for v in dies.get(i - 1, ()):  # free what no later node reads and no rule needs (memory)
            boxes.values.pop(v, None)
        data = [k for k, v in enumerate(node.inputs) if v and v not in graph.static]
        if not data or all(o in graph.static for o in node.outputs if o):
            continue
        needed = [k for k in data if not (node.op == "Where" and k == 0)]  # Where: the hull of its branches
        absent = next((node.inputs[k] for k in needed if node.inputs[k] not in boxes.values), None)
        if absent is not None:
            why = boxes.why(absent)
            for out in node.outputs:
                if out:
                    boxes.missing[out] = why
            continue
        ins: list[Box | None] = []
        for k, v in enumerate(node.inputs):
            if not v:
                ins.append(None)
            elif k in data:
                ins.append(boxes.values.get(v))
            else:
                c = graph.const(v)
                ins.append(None if c is None else (c.astype(np.float64) if c.dtype.kind in "fc" else c,) * 2)
        try:
            with np.errstate(all="ignore"):
                outs = None if node.domain else _rule(graph, node, ins, data)
                if outs is not None and ball_inputs and node.inputs[0] in ball_inputs:
                    outs = _ball_tighten(graph, node, ins, domain, outs)
        except (ValueError, TypeError, IndexError, ZeroDivisionError, MemoryError):
            outs = None
        if outs is None:
            why = f"no interval for {node.name} ({node.op} on these inputs)"
            for out in node.outputs:
                if out:
                    boxes.missing[out] = why
            continue
        for out, box in zip(node.outputs, outs):
            if not out:
                continue
            bad = _bad(box)
            if bad is not None:
                if boxes.overflow is None:
                    boxes.overflow = node.name
                word = "overflow" if bad == "infinite" else "leaves the op's domain (NaN)"
                boxes.missing[out] = f"interval {word} at {node.name}"
                continue
            boxes.values[out] = box
    return boxes


def _ball_tighten(graph: Graph, node: Node, ins: list[Box | None], domain: Domain,
                  outs: list[Box]) -> list[Box]:
    """A linear op reading the network input on an L2 ball of radius R around c0: its output
    i lies within R * ||row i|| of the op at c0 (Cauchy-Schwarz), the row norms being the
    op applied to the squared weights on ones."""
    if node.op not in ("Gemm", "Conv", "MatMul") or domain.radius is None:
        return outs
    if node.op == "MatMul" and ins[1] is not None and bool(np.any(ins[1][0] != ins[1][1])):
        return outs
    x = ins[0]
    w = ins[1]
    if x is None or w is None:
        return outs
    shape = x[0].shape
    c0 = domain.centre(shape)
    consts = [None if b is None else b[0] for b in ins]
    centre = _run(graph, node, [c0, *consts[1:]])
    sq = _run(graph, node, [np.ones(shape), w[0] ** 2])
    if centre is None or sq is None:
        return outs
    rad = domain.radius * np.sqrt(np.abs(sq[0])) * (1 + 1e-12)
    lo, hi = _widen(centre[0] - rad, centre[0] + rad)
    return [(np.maximum(outs[0][0], lo), np.minimum(outs[0][1], hi))]


# --------------------------------------------------------------------------- local constants


def product_factor(other_mag: np.ndarray, own_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> float:
    """The norm of d -> m * broadcast(d) (``m`` = ``other_mag`` broadcast to ``out_shape``,
    d of ``own_shape``): each entry of d reaches a disjoint set of outputs, so the map's norm
    is the largest l2 norm of m over one entry's set."""
    m = np.broadcast_to(other_mag, out_shape)
    own = (1,) * (len(out_shape) - len(own_shape)) + tuple(own_shape)
    axes = tuple(k for k, (a, b) in enumerate(zip(own, out_shape)) if a == 1 and b != 1)
    sq = (m.astype(np.float64) ** 2).sum(axis=axes) if axes else m.astype(np.float64) ** 2
    return float(np.sqrt(sq.max()) * (1 + 1e-12)) if sq.size else 0.0


def matrix_norm_bound(m: np.ndarray) -> np.ndarray:
    """Upper bounds on the spectral norms of the nonnegative matrices ``m[..., :, :]``:
    min(Frobenius, sqrt(max row sum * max column sum))."""
    fro = np.sqrt((m ** 2).sum(axis=(-2, -1)))
    schur = np.sqrt(m.sum(axis=-1).max(axis=-1) * m.sum(axis=-2).max(axis=-1))
    return np.minimum(fro, schur) * (1 + 1e-12)


def parse_domain(input_range: str | None, input_radius: float | None) -> Domain | None:
    """The domain the command line declares (None: none)."""
    if input_range is None and input_radius is None:
        return None
    ranges = parse_range(input_range) if input_range is not None else None
    return Domain(ranges, input_radius)

