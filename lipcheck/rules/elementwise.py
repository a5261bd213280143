"""Rules for element-wise activations, arithmetic, and ops that only move values."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..graph import Graph, Node
from ..report import LayerRow, RowKind
from . import Context, Outcome, local, rule, unbounded

# sup |f'| of element-wise activations (values computed on a fine grid in float64
# and rounded up in the last digit, so they stay upper bounds).
GELU_LIP = 1.1291  # max of Phi(x) + x phi(x) = 1.12890 (tanh approximation: 1.12899)
SILU_LIP = 1.0999  # max of sigma(x)(1 + x(1 - sigma(x))) = 1.09984
MISH_LIP = 1.0886  # 1.08850
SELU_ALPHA, SELU_GAMMA = 1.6732632423543772, 1.0507009873554805


GELU_MIN_SLOPE = -0.12901  # min of Phi(x) + x phi(x) = -0.128904 (tanh form: -0.128993)


@dataclass(frozen=True)
class Activation:
    """What lipcheck knows of one element-wise activation.

    ``constant(attrs, node, graph)``: sup |f'| (None: no finite constant with these
    attributes, e.g. a jump). ``slopes(attrs)``: [a, b] with a <= f'(x) <= b everywhere
    (difference quotients too), for the chain certificate (``lipcheck.chains``); None when
    not known. A new activation is one entry here and one test.
    """

    constant: Callable[[dict[str, Any], Node, Graph], float | None]
    slopes: Callable[[dict[str, Any]], tuple[float, float] | None] | None = None


def _const(value: float | None) -> Callable[[dict[str, Any], Node, Graph], float | None]:
    return lambda attrs, node, graph: value


def _slopes(a: float, b: float) -> Callable[[dict[str, Any]], tuple[float, float]]:
    return lambda attrs: (a, b)


def _leaky_slopes(attrs: dict[str, Any]) -> tuple[float, float]:
    alpha = float(attrs.get("alpha", 0.01))
    return min(alpha, 1.0), max(alpha, 1.0)


def _elu_slopes(attrs: dict[str, Any]) -> tuple[float, float]:
    """ELU: 1 for x > 0, alpha e^x (between 0 and alpha) below."""
    alpha = float(attrs.get("alpha", 1.0))
    return min(0.0, alpha), max(1.0, alpha)


def _celu_slopes(attrs: dict[str, Any]) -> tuple[float, float] | None:
    """CELU: 1 for x > 0, e^(x / alpha) in (0, 1] below (alpha > 0)."""
    return (0.0, 1.0) if float(attrs.get("alpha", 1.0)) > 0 else None


def _selu_slopes(attrs: dict[str, Any]) -> tuple[float, float] | None:
    """SELU: gamma for x > 0, gamma alpha e^x below."""
    gamma, alpha = float(attrs.get("gamma", SELU_GAMMA)), float(attrs.get("alpha", SELU_ALPHA))
    ends = (0.0, gamma, gamma * alpha)
    return min(ends), max(ends)


def _hardsigmoid_slopes(attrs: dict[str, Any]) -> tuple[float, float]:
    """max(0, min(1, alpha x + beta)): slope alpha on the ramp, 0 outside it."""
    alpha = float(attrs.get("alpha", 0.2))
    return min(0.0, alpha), max(0.0, alpha)


def _swish_slopes(attrs: dict[str, Any]) -> tuple[float, float] | None:
    """x sigmoid(alpha x) at alpha = +-1: the SiLU's range (x sigmoid(-x) has the derivative
    SiLU'(-x))."""
    return PRODUCT_SLOPES["SiLU"] if abs(float(attrs.get("alpha", 1.0))) == 1.0 else None


def _swish(attrs: dict[str, Any], node: Node, graph: Graph) -> float | None:
    return SILU_LIP if abs(float(attrs.get("alpha", 1.0))) == 1.0 else None


def _prelu(attrs: dict[str, Any], node: Node, graph: Graph) -> float | None:
    slope = graph.const(node.inputs[1])
    if slope is None:
        return None
    return max(1.0, float(np.abs(slope).max())) if slope.size else 1.0


ACTIVATION_FACTS: dict[str, Activation] = {
    "Relu": Activation(_const(1.0), _slopes(0.0, 1.0)),
    "Tanh": Activation(_const(1.0), _slopes(0.0, 1.0)),
    "Softplus": Activation(_const(1.0), _slopes(0.0, 1.0)),
    "Softsign": Activation(_const(1.0), _slopes(0.0, 1.0)),
    "Abs": Activation(_const(1.0)),
    "Neg": Activation(_const(1.0)),
    "Celu": Activation(_const(1.0), _celu_slopes),
    "Clip": Activation(_const(1.0), _slopes(0.0, 1.0)),
    # Sign and ThresholdedRelu jump (at 0, at alpha): not continuous, so no finite constant.
    "Sign": Activation(_const(None)),
    "ThresholdedRelu": Activation(_const(None)),
    "LeakyRelu": Activation(lambda a, n, g: max(1.0, abs(float(a.get("alpha", 0.01)))), _leaky_slopes),
    "Elu": Activation(lambda a, n, g: max(1.0, abs(float(a.get("alpha", 1.0)))), _elu_slopes),
    "Selu": Activation(lambda a, n, g: float(a.get("gamma", SELU_GAMMA)) * max(1.0, float(a.get("alpha", SELU_ALPHA))),
                       _selu_slopes),
    "Erf": Activation(_const(2 / math.sqrt(math.pi)), _slopes(0.0, 2 / math.sqrt(math.pi))),
    "Sigmoid": Activation(_const(0.25), _slopes(0.0, 0.25)),
    "HardSigmoid": Activation(lambda a, n, g: abs(float(a.get("alpha", 0.2))), _hardsigmoid_slopes),
    "HardSwish": Activation(_const(1.5), _slopes(-0.5, 1.5)),  # x * hardsigmoid(x): slope 2x/6 + 1/2 on [-3, 3]
    "Gelu": Activation(_const(GELU_LIP), _slopes(GELU_MIN_SLOPE, GELU_LIP)),
    "Mish": Activation(_const(MISH_LIP), _slopes(-0.1126, MISH_LIP)),
    "Swish": Activation(_swish, _swish_slopes),
    "PRelu": Activation(_prelu),
    # Softmax is 1/2-Lipschitz in l2 and 1 is the safe choice (DESIGN.md); LogSoftmax =
    # x - logsumexp(x) has Jacobian I - 1 p^T of norm <= 2.
    "Softmax": Activation(_const(1.0)),
    "LogSoftmax": Activation(_const(2.0)),
}
ACTIVATIONS = list(ACTIVATION_FACTS)


def activation_slopes(node: Node) -> tuple[float, float] | None:
    """[a, b] bounding the slopes of the activation ``node`` (None: not known)."""
    facts = ACTIVATION_FACTS.get(node.op)
    return facts.slopes(node.attrs) if facts is not None and facts.slopes is not None else None


def _row(ctx: Context, node: Node, kind: RowKind, value: float, method: str, note: str | None = None,
         data_in: str | None = None) -> LayerRow:
    dims = ctx.graph.shape(data_in or node.inputs[0])
    return LayerRow(
        name=node.name, op=node.op, kind=kind, input_shape=list(dims) if dims is not None else None,
        sigma=value, sigma_upper=value, upper_method=method, lipschitz=value, note=note,
    )


@rule(*ACTIVATIONS)
def activation(ctx: Context, node: Node, data: list[int]) -> Outcome:
    if data != [0]:
        return unbounded(f"{node.op} parameter depends on the input")
    if node.op == "Softmax":
        on_domain = local.softmax(ctx, node)
        if on_domain is not None:
            return on_domain
    value = ACTIVATION_FACTS[node.op].constant(node.attrs, node, ctx.graph)
    if value is None:
        why = "not continuous (a jump)" if node.op in ("Sign", "ThresholdedRelu") else \
            "no known Lipschitz constant with these attributes"
        return unbounded(f"{node.op}: {why}")
    return Outcome(factors={0: value}, row=_row(ctx, node, RowKind.ACTIVATION, value, "sup |f'|"))


# --------------------------------------------------------------------------- data movement

# ONNX TensorProto element types that hold real numbers (FLOAT, FLOAT16, DOUBLE, BFLOAT16,
# the FLOAT8 kinds, FLOAT4E2M1): a Cast to them only rounds to the nearest representable
# value, which the bound treats as the identity, as it does every floating-point op.
FLOAT_TYPES = frozenset({1, 10, 11, 16, 17, 18, 19, 20, 23})

# Ops that permute, copy out or select values without repeating any: norm <= 1.
MOVERS = {
    "Identity": 0, "Dropout": 0, "Flatten": 0, "Reshape": 0, "Transpose": 0, "Squeeze": 0,
    "Unsqueeze": 0, "Slice": 0, "Split": 0, "Cast": 0, "DepthToSpace": 0, "SpaceToDepth": 0,
    "CastLike": 0, "ReduceMax": 0, "ReduceMin": 0, "GlobalMaxPool": 0,
}


@rule(*MOVERS)
def mover(ctx: Context, node: Node, data: list[int]) -> Outcome:
    """Reshapes and selections. ReduceMax/ReduceMin/GlobalMaxPool: |max a - max b| <=
    max |a - b| <= ||a - b||_2 over each disjoint group, so also 1."""
    if data != [0]:
        return unbounded(f"{node.op} shape or index input depends on the input values")
    if node.op == "Cast" and int(node.attrs.get("to", 1)) not in FLOAT_TYPES:
        return unbounded("Cast to an integer or bool type rounds: not continuous")
    if node.op == "CastLike" and len(node.inputs) > 1:
        target = ctx.graph.const(node.inputs[1])
        if target is not None and target.dtype.kind not in "fc":
            return unbounded("CastLike to an integer or bool type rounds: not continuous")
    if node.op == "Dropout" and len(node.inputs) > 2 and node.inputs[2]:
        mode = ctx.graph.const(node.inputs[2])  # a bool of any one-element shape
        if mode is None or mode.size != 1 or bool(mode.reshape(-1)[0]):
            return unbounded("Dropout in training mode (or with an unreadable mode) is random")
    return Outcome(factors={0: 1.0})


@rule("Gather")
def gather(ctx: Context, node: Node, data: list[int]) -> Outcome:
    """Gathering with constant indices copies each element at most m times: sqrt(m)."""
    if data != [0]:
        return unbounded("Gather indices depend on the input")
    idx = ctx.graph.const(node.inputs[1])
    shape = ctx.graph.known_shape(node.inputs[0])
    if idx is None or shape is None:
        return unbounded("Gather indices or input shape unknown")
    axis = int(node.attrs.get("axis", 0)) % len(shape)
    flat = np.where(idx < 0, idx + shape[axis], idx).reshape(-1)
    mult = int(np.bincount(flat.astype(np.int64)).max()) if flat.size else 0
    return Outcome(factors={0: math.sqrt(mult)})


@rule("Expand", "Tile")
def replicate(ctx: Context, node: Node, data: list[int]) -> Outcome:
    """Each element copied numel(out)/numel(in) times: norm sqrt of that ratio."""
    if data != [0]:
        return unbounded(f"{node.op} shape input depends on the input values")
    f = broadcast_factor(ctx.graph, node.inputs[0], node.outputs[0])
    if f is None:
        return unbounded(f"{node.op}: shapes unknown, the replication factor cannot be bounded")
    return Outcome(factors={0: f})


# --------------------------------------------------------------------------- arithmetic


def broadcast_factor(graph: Graph, inp: str, out: str) -> float | None:
    """sqrt(numel(out) / numel(in)): broadcasting repeats each element that often."""
    a, b = graph.known_shape(inp), graph.known_shape(out)
    if a is not None and b is not None:
        na, nb = math.prod(a), math.prod(b)
        return math.sqrt(nb / na) if na else 0.0
    sa, sb = graph.shape(inp), graph.shape(out)
    if sa is not None and sb is not None and len(sa) == len(sb):
        if all(x == y and x is not None for x, y in zip(sa, sb) if x is not None or y is not None):
            return 1.0
    return None


def _factors(ctx: Context, node: Node, data: list[int], scale: dict[int, float] | None = None) -> Outcome:
    factors = {}
    for i in data:
        f = broadcast_factor(ctx.graph, node.inputs[i], node.outputs[0])
        if f is None:
            return unbounded(f"{node.op}: input shapes unknown, broadcasting cannot be bounded")
        factors[i] = f * (scale or {}).get(i, 1.0)
    return Outcome(factors=factors)


@rule("Add", "Sub", "Sum", "Mean")
def add(ctx: Context, node: Node, data: list[int]) -> Outcome:
    """L(a + b) <= L_a + L_b; a constant operand adds nothing."""
    scale = {i: 1.0 / len(node.inputs) for i in data} if node.op == "Mean" else None
    out = _factors(ctx, node, data, scale)
    if out.unbounded is None and len(data) > 1:
        out.row = LayerRow(name=node.name, op=node.op, kind=RowKind.COMBINE, note="L = sum of input bounds")
    return out


@rule("Max", "Min")
def elementwise_max(ctx: Context, node: Node, data: list[int]) -> Outcome:
    """|max(a,b) - max(a',b')| <= max(|da|, |db|) <= sqrt(da^2 + db^2) per element."""
    out = _factors(ctx, node, data)
    out.combine = "l2"
    return out


@rule("Concat")
def concat(ctx: Context, node: Node, data: list[int]) -> Outcome:
    """L(concat(a, b)) <= sqrt(L_a^2 + L_b^2), and max(L_a, L_b) when a and b are functions
    of disjoint parts of one value (a channel split, then concat): ``combine="concat"`` lets
    the composition find out which (lipcheck.bound, "disjoint parts")."""
    out = Outcome(factors={i: 1.0 for i in data}, combine="concat")
    if len(data) > 1:
        out.row = LayerRow(name=node.name, op=node.op, kind=RowKind.COMBINE,
                           note="L = sqrt of the sum of squared input bounds")
    return out


def _same_source(graph: Graph, value: str, op: str, x: str) -> bool:
    node = graph.producer.get(value)
    return node is not None and node.op == op and node.inputs[0] == x


# (x, the nodes that compute the product from x besides the Mul itself, the product's
# Lipschitz constant as a function of x, and its slope range [min f', max f'] or None)
Match = tuple[str, list[Node], float, tuple[float, float] | None]


def _silu_input(graph: Graph, a: str, b: str) -> Match | None:
    """x * sigmoid(x)."""
    for x, other in ((a, b), (b, a)):
        if _same_source(graph, other, "Sigmoid", x):
            return x, [graph.producer[other]], SILU_LIP, PRODUCT_SLOPES["SiLU"]
    return None


def _mish_input(graph: Graph, a: str, b: str) -> Match | None:
    """x * tanh(softplus(x))."""
    for x, other in ((a, b), (b, a)):
        tanh = graph.producer.get(other)
        if tanh is not None and tanh.op == "Tanh" and _same_source(graph, tanh.inputs[0], "Softplus", x):
            return x, [graph.producer[tanh.inputs[0]], tanh], MISH_LIP, PRODUCT_SLOPES["Mish"]
    return None


def _scalar(c: np.ndarray | None) -> float | None:
    """The value of a constant holding one number, whatever its shape ((), (1,), (1, 1, 1)):
    numpy 2 refuses float() on arrays with dimensions. None for anything else (several
    values, no values, not a number): a matcher then declines rather than guess."""
    if c is None or c.size != 1 or not np.issubdtype(c.dtype, np.number) or np.iscomplexobj(c):
        return None
    value = float(c.reshape(-1)[0])
    return value if math.isfinite(value) else None


MAX_SCALINGS = 3  # Mul/Div by one-number constants followed back from a value


def _unscaled(graph: Graph, value: str) -> tuple[str, float, list[Node]]:
    """``value`` as c * v for a one-number constant c, followed back through Mul and Div by
    such constants: (v, c, the Mul/Div nodes). (value, 1.0, []) when there are none."""
    scale, nodes = 1.0, []
    for _ in range(MAX_SCALINGS):
        node = graph.producer.get(value)
        if node is None or node.op not in ("Mul", "Div") or node.domain or len(node.inputs) != 2:
            break
        consts = [_scalar(graph.const(i)) for i in node.inputs]
        if node.op == "Div":
            if consts[0] is not None or not consts[1]:
                break
            scale, value = scale / consts[1], node.inputs[0]
        else:
            pos = 1 if consts[1] is not None else 0 if consts[0] is not None else None
            if pos is None or consts[1 - pos] is not None:
                break
            c = consts[pos]
            assert c is not None
            scale, value = scale * c, node.inputs[1 - pos]
        nodes.append(node)
    return value, scale, nodes


def _erf_gelu_input(graph: Graph, a: str, b: str) -> Match | None:
    """(p x) * (q (1 + erf(x / sqrt 2))) = 2 p q GELU(x), GELU(x) = x Phi(x), with p, q
    one-number constants (Mul or Div): torch's legacy exporter writes p = q = 1 and a 0.5
    Mul after, the dynamo exporter q = 0.5, others p = 0.5. Constant 2 |p q| sup |GELU'|."""
    for left, right in ((a, b), (b, a)):
        x, p, p_nodes = _unscaled(graph, left)
        for erf, outer, q in _scaled_one_plus(graph, right, "Erf"):
            inner, c, c_nodes = _unscaled(graph, erf.inputs[0])
            if inner == x and c_nodes and abs(c - 1 / math.sqrt(2)) < 1e-4 and p * q != 0:
                return _gelu_match(x, [*p_nodes, *c_nodes, *outer], 2 * p * q)
    return None


def _scaled_one_plus(graph: Graph, value: str, op: str) -> list[tuple[Node, list[Node], float]]:
    """``value`` as q (1 + f) with f the output of an ``op`` node and q a one-number constant:
    (the ``op`` node, it with the Add and the scaling nodes, q) for each way it reads so."""
    one_f, q, q_nodes = _unscaled(graph, value)
    add = graph.producer.get(one_f)
    if add is None or add.op != "Add" or len(add.inputs) != 2:
        return []
    found = []
    for k in (0, 1):
        f = graph.producer.get(add.inputs[k])
        if _scalar(graph.const(add.inputs[1 - k])) == 1.0 and f is not None and f.op == op:
            found.append((f, [f, add, *q_nodes], q))
    return found


def _gelu_match(x: str, branch: list[Node], scale: float) -> Match:
    """scale * GELU(x) (either form): constant |scale| GELU_LIP, slopes scale * [GELU_MIN_SLOPE,
    GELU_LIP] in order."""
    ends = (scale * GELU_MIN_SLOPE, scale * GELU_LIP)
    return x, branch, abs(scale) * GELU_LIP, (min(ends), max(ends))


def _cube_of(graph: Graph, value: str) -> tuple[str, list[Node]] | None:
    """``value`` as x^3: Pow(x, 3), or Mul(x, Mul(x, x)) in either order. (x, the nodes)."""
    node = graph.producer.get(value)
    if node is None or node.domain or len(node.inputs) != 2:
        return None
    if node.op == "Pow" and _scalar(graph.const(node.inputs[1])) == 3.0:
        return node.inputs[0], [node]
    if node.op != "Mul":
        return None
    for k in (0, 1):
        square = graph.producer.get(node.inputs[1 - k])
        x = node.inputs[k]
        if square is not None and square.op == "Mul" and not square.domain and list(square.inputs) == [x, x]:
            return x, [square, node]
    return None


def _tanh_gelu_input(graph: Graph, a: str, b: str) -> Match | None:
    """(p x) * (q (1 + tanh(c (x + k x^3)))) = 2 p q GELU_tanh(x), with c = sqrt(2 / pi) and
    k = 0.044715 (torch's legacy export of GELU(approximate="tanh"), also written as
    c x + c k x^3): sup |GELU_tanh'| = 1.12899 and min -0.128993 lie inside the erf form's
    GELU_LIP and GELU_MIN_SLOPE."""
    for left, right in ((a, b), (b, a)):
        x, p, p_nodes = _unscaled(graph, left)
        for tanh, outer, q in _scaled_one_plus(graph, right, "Tanh"):
            inner, c, c_nodes = _unscaled(graph, tanh.inputs[0])
            poly = graph.producer.get(inner)
            if poly is None or poly.op != "Add" or len(poly.inputs) != 2 or p * q == 0 \
                    or abs(c - math.sqrt(2 / math.pi)) > 1e-4 * math.sqrt(2 / math.pi):
                continue
            for i in (0, 1):
                cube, k, k_nodes = _unscaled(graph, poly.inputs[1 - i])
                found = _cube_of(graph, cube)
                if poly.inputs[i] == x and found is not None and found[0] == x and abs(k - 0.044715) <= 1e-6:
                    return _gelu_match(x, [*p_nodes, *found[1], *k_nodes, poly, *c_nodes, *outer], 2 * p * q)
    return None


# Slope ranges [min f', max f'] of the product activations recognised at scale 1 (float64
# grid of 4e6 points on [-20, 20], rounded outward): SiLU [-0.099839, 1.099839], Mish
# [-0.112526, 1.088498]. Difference quotients lie in the same range (mean value theorem).
PRODUCT_SLOPES = {"SiLU": (-0.0999, SILU_LIP), "Mish": (-0.1126, MISH_LIP)}  # Mish: as the op's
# x * g(x) products that are one smooth activation: (recogniser, name).
PRODUCT_ACTIVATIONS = (
    (_silu_input, "SiLU"),
    (_mish_input, "Mish"),
    (_erf_gelu_input, "GELU (erf form)"),
    (_tanh_gelu_input, "GELU (tanh form)"),
)


@rule("Mul")
def mul(ctx: Context, node: Node, data: list[int]) -> Outcome:
    g = ctx.graph
    if len(data) == 2:
        a, b = node.inputs
        for k in (0, 1):
            found = _rms_reciprocal(g, node.inputs[1 - k], node.inputs[k], node)
            if found is not None:
                return _normalisation_outcome(ctx, node, k, found, "LayerNorm" if found[3] else "RMSNorm")
        for find, name in PRODUCT_ACTIVATIONS:
            match = find(g, a, b)
            if match is None:
                continue
            x, branch, value, slopes = match
            row = _row(ctx, node, RowKind.ACTIVATION, value, "sup |f'|", note=f"recognised {name}", data_in=x)
            # The whole product is bounded through x (the input on x's side, or x itself
            # when that input is a constant times x); the other input adds nothing, and
            # the ops in between are part of this activation rather than layers of their own.
            pos = next(k for k in (0, 1) if node.inputs[k] == x or _unscaled(g, node.inputs[k])[0] == x)
            return Outcome(factors={pos: value, 1 - pos: 0.0}, row=row, sources={pos: x},
                           absorbs=[n.name for n in branch], slopes=slopes)
        return local.product(ctx, node, data, "product of two activations is not globally Lipschitz")
    pos = data[0]
    c = g.const(node.inputs[1 - pos])
    if c is None:
        return unbounded("Mul by a value that is not a known constant")
    value = float(np.abs(c).max()) if c.size else 0.0
    out = _factors(ctx, node, data, {pos: value})
    if out.unbounded is None:
        out.row = _row(ctx, node, RowKind.DIAGONAL, out.factors[pos], "exact", data_in=node.inputs[pos])
    return out


@rule("Div")
def div(ctx: Context, node: Node, data: list[int]) -> Outcome:
    if 1 in data:
        found = _rms_denominator(ctx.graph, node.inputs[1], node.inputs[0], node) if 0 in data else None
        if found is None:
            return local.quotient(ctx, node, data, "division by an activation is not globally Lipschitz")
        return _normalisation_outcome(ctx, node, 0, found, "LayerNorm" if found[3] else "RMSNorm")
    c = ctx.graph.const(node.inputs[1])
    if c is None:
        return unbounded("Div by a value that is not a known constant")
    with np.errstate(divide="ignore"):
        value = float(np.abs(1.0 / c.astype(np.float64)).max()) if c.size else 0.0
    if not math.isfinite(value):
        return unbounded("division by zero constant")
    out = _factors(ctx, node, [0], {0: value})
    if out.unbounded is None:
        out.row = _row(ctx, node, RowKind.DIAGONAL, out.factors[0], "exact")
    return out


UNBOUNDED_OPS = {
    "LpNormalization": "normalisation by an input-dependent scale is not globally Lipschitz",
    "MeanVarianceNormalization": "normalisation by an input-dependent scale is not globally Lipschitz",
    "Exp": "exp is not globally Lipschitz",
    "Log": "log is not globally Lipschitz",
    "Sqrt": "sqrt is not Lipschitz at 0",
    "Reciprocal": "1/x is not globally Lipschitz",
    "Pow": "pow is not globally Lipschitz",
    "Floor": "floor is not continuous",
    "Ceil": "ceil is not continuous",
    "Round": "round is not continuous",
    "ArgMax": "argmax is not continuous",
    "ArgMin": "argmin is not continuous",
    "TopK": "TopK indices are not continuous",
    "Einsum": "Einsum of activations is not supported",
    "If": "control flow (If) is not analysed",
    "Loop": "control flow (Loop) is not analysed",
    "Scan": "control flow (Scan) is not analysed",
    "Where": "Where with an input-dependent condition is not continuous",
    "Equal": "comparison is not continuous",
    "Greater": "comparison is not continuous",
    "Less": "comparison is not continuous",
}


def _softplus_where(graph: Graph, node: Node) -> tuple[str, list[Node], float, float] | None:
    """torch's dynamo export of Softplus(beta, threshold): Where(Greater(z, threshold), x,
    g(z)) with z = beta x and g(z) = Softplus(z) / beta (z = x, g = Softplus for beta 1).
    Returns (x, the branch nodes, beta, threshold)."""
    if len(node.inputs) != 3:
        return None
    cond, x, other = node.inputs
    greater = graph.producer.get(cond)
    if greater is None or greater.op != "Greater" or len(greater.inputs) != 2:
        return None
    z, threshold = greater.inputs[0], _scalar(graph.const(greater.inputs[1]))
    if threshold is None:
        return None
    if z == x:
        soft = graph.producer.get(other)
        if soft is not None and soft.op == "Softplus" and soft.inputs[0] == x:
            return x, [greater, soft], 1.0, threshold
        return None
    scale, div = graph.producer.get(z), graph.producer.get(other)
    if scale is None or div is None or scale.op != "Mul" or div.op != "Div" or scale.inputs[0] != x:
        return None
    beta, beta2 = _scalar(graph.const(scale.inputs[1])), _scalar(graph.const(div.inputs[1]))
    soft = graph.producer.get(div.inputs[0])
    if beta is None or beta != beta2 or not beta > 0 or soft is None or soft.op != "Softplus" \
            or soft.inputs[0] != z:
        return None
    return x, [scale, greater, soft, div], beta, threshold


@rule(*UNBOUNDED_OPS)
def not_lipschitz(ctx: Context, node: Node, data: list[int]) -> Outcome:
    if node.op == "Where" and data and 0 not in data:
        return _factors(ctx, node, data)
    if node.op == "Where":
        match = _softplus_where(ctx.graph, node)
        if match is not None:
            x, branch, beta, threshold = match
            # sup |f'| = 1 on both sides (sigmoid(beta x) <= 1, and the identity). At the
            # switch x = threshold / beta the function jumps by softplus(-threshold) / beta
            # (2.1e-9 for torch's default threshold 20), and a function with a jump has no
            # Lipschitz constant. A jump below float32's resolution of the value there
            # (eps32 * max(1, |x|)) is one no float32 evaluation can show: that one is
            # treated as continuous, and a larger one makes the op unbounded.
            jump = float(np.logaddexp(0.0, -threshold)) / beta
            switch = threshold / beta
            resolution = float(np.finfo(np.float32).eps) * max(1.0, abs(switch))
            label = f"Softplus(beta={beta:g}, threshold={threshold:g})"
            if not jump <= resolution:
                return unbounded(f"{label} as torch's dynamo exporter writes it jumps by {jump:.2g} at "
                                 f"x = {switch:g}: not continuous")
            row = _row(ctx, node, RowKind.ACTIVATION, 1.0, "sup |f'|", data_in=x,
                       note=f"recognised {label} as torch's dynamo exporter writes it; its jump of "
                            f"{jump:.2g} at x = {switch:g} is below float32 resolution there")
            pos = node.inputs.index(x)
            # slopes: sigmoid(beta x) in (0, 1) below the switch, 1 above it
            return Outcome(factors={k: (1.0 if k == pos else 0.0) for k in range(3)}, row=row,
                           absorbs=[n.name for n in branch], sources={pos: x}, slopes=(0.0, 1.0))
    if node.op in LOCAL_OPS:
        return local.elementwise(ctx, node, data, UNBOUNDED_OPS[node.op])
    return unbounded(UNBOUNDED_OPS[node.op])


# ops with a local constant on a declared input domain (lipcheck.rules.local)
LOCAL_OPS = {"Exp", "Log", "Sqrt", "Reciprocal", "Pow", "LpNormalization"}


# --------------------------------------------------------------------------- normalisation
#
# LayerNorm and RMSNorm with eps > 0 are globally Lipschitz, with constant at most
# max|gamma| / sqrt(eps); per normalised group of n entries (the map is block-diagonal over
# groups, so the max over groups is the bound):
#
# RMSNorm  y = x / r, r = sqrt(|x|^2 / n + eps):  dy/dx = (1/r) (I - x x^T / (n r^2)). The
#   matrix in brackets has eigenvalue 1 - |x|^2 / (n r^2) = eps / r^2 in (0, 1] along x and
#   1 on x's orthogonal complement, so |dy/dx| <= 1/r <= 1/sqrt(eps).
# LayerNorm  y = RMSNorm(P x) with P = I - 1 1^T / n (centering, an orthogonal projection
#   of norm 1; var(x) = |P x|^2 / n): |dy/dx| <= 1/sqrt(eps) |P| = 1/sqrt(eps). Then the
#   affine gamma * y + beta multiplies by max |gamma|.
#
# The bound is reached only where the group is (nearly) constant, var -> 0: it is sound but
# loose for typical inputs (the rows say so). A scale gamma that depends on the input, or
# eps = 0, is not globally Lipschitz.

LOOSE = "global bound max|gamma| / sqrt(eps), reached only on near-constant inputs (loose)"


def _axes(graph: Graph, node: Node, rank: int | None) -> tuple[int, ...] | None:
    """The axes a ReduceMean with keepdims=1 reduces (sorted, non-negative), or None."""
    if node.op != "ReduceMean" or node.domain or int(node.attrs.get("keepdims", 1)) != 1 or rank is None:
        return None
    if "axes" in node.attrs:
        given = [int(a) for a in node.attrs["axes"]]
    elif len(node.inputs) > 1 and node.inputs[1]:
        c = graph.const(node.inputs[1])
        if c is None:
            return None
        given = [int(a) for a in c.reshape(-1)]
    else:
        given = list(range(rank))  # no axes: all of them (noop_with_empty_axes unset)
    if int(node.attrs.get("noop_with_empty_axes", 0)) and not given:
        return None
    if any(not -rank <= a < rank for a in given):
        return None
    return tuple(sorted({a % rank for a in given}))


def _private(graph: Graph, nodes: list[Node], user: Node) -> bool:
    """Every output of ``nodes`` is read only by ``nodes`` and ``user`` (and is no graph output)."""
    inside = {n.index for n in nodes} | {user.index}
    return all(out not in graph.outputs and all(c.index in inside for c in graph.consumers.get(out, []))
               for n in nodes for out in n.outputs if out)


# (the value the constant is measured from, the nodes inside the pattern, eps, centred)
NormMatch = tuple[str, list[Node], float, bool]


def _rms_denominator(graph: Graph, denominator: str, d: str, user: Node,
                     outer: tuple[Node, ...] = ()) -> NormMatch | None:
    """denominator = Sqrt(Add(ReduceMean(Pow(d, 2)), eps)) with eps > 0 a one-number constant
    (keepdims). When d = Sub(x, ReduceMean(x)) over the same axes, the match starts at x
    (LayerNorm), else at d (RMSNorm)."""
    sqrt = graph.producer.get(denominator)
    if sqrt is None or sqrt.op != "Sqrt" or sqrt.domain:
        return None
    add = graph.producer.get(sqrt.inputs[0])
    if add is None or add.op != "Add" or len(add.inputs) != 2:
        return None
    for k in (0, 1):
        eps = _scalar(graph.const(add.inputs[1 - k]))
        mean = graph.producer.get(add.inputs[k])
        if eps is None or not eps > 0 or mean is None:
            continue
        pow_ = graph.producer.get(mean.inputs[0]) if mean.inputs else None
        if pow_ is None or pow_.op != "Pow" or pow_.inputs[0] != d or _scalar(graph.const(pow_.inputs[1])) != 2.0:
            continue
        shape = graph.shape(d)
        axes = _axes(graph, mean, len(shape) if shape is not None else None)
        if axes is None:
            continue
        nodes = [pow_, mean, add, sqrt]
        centre = graph.producer.get(d)
        if centre is not None and centre.op == "Sub" and len(centre.inputs) == 2:
            x = centre.inputs[0]
            mu = graph.producer.get(centre.inputs[1])
            if mu is not None and mu.inputs and mu.inputs[0] == x and _axes(graph, mu, len(shape or ())) == axes \
                    and _private(graph, [centre, mu, *nodes, *outer], user):
                return x, [centre, mu, *nodes], eps, True
        return (d, nodes, eps, False) if _private(graph, [*nodes, *outer], user) else None
    return None


def _rms_reciprocal(graph: Graph, value: str, d: str, user: Node) -> NormMatch | None:
    """value = Reciprocal(denominator) or Div(1, denominator), see ``_rms_denominator``."""
    node = graph.producer.get(value)
    if node is None or node.domain:
        return None
    if node.op == "Reciprocal":
        inner = node.inputs[0]
    elif node.op == "Div" and len(node.inputs) == 2 and _scalar(graph.const(node.inputs[0])) == 1.0:
        inner = node.inputs[1]
    else:
        return None
    found = _rms_denominator(graph, inner, d, user, (node,))
    if found is None:
        return None
    x, nodes, eps, centred = found
    return x, [*nodes, node], eps, centred


def _on_domain(ctx: Context, source: str, axes: tuple[int, ...] | None, centred: bool, eps: float,
               gamma: float, global_value: float) -> tuple[float, str] | None:
    """The local constant gamma / sqrt(min var + eps) on the declared domain, with its note,
    when there is one and it is below the global ``global_value``."""
    found = local.normalisation(ctx, source, axes, centred, eps)
    if found is None or not found[0] * gamma < global_value:
        return None
    what = "variance" if centred else "mean square"
    return found[0] * gamma, (f"{local.LOCAL}: max|gamma| / sqrt(min {what} + eps), the smallest {what} of a "
                              f"normalised group on the box being {found[1]:.4g}")


def _normalisation_outcome(ctx: Context, node: Node, pos: int, found: NormMatch, name: str) -> Outcome:
    x, nodes, eps, centred = found
    value = 1.0 / math.sqrt(eps)
    method = "1/sqrt(eps)"
    note = (f"recognised {name} (eps={eps:g}) without its scale: 1/sqrt(eps), reached only on "
            "near-constant inputs (loose)")
    shape = ctx.graph.shape(x)
    mean = next((n for n in nodes if n.op == "ReduceMean" and n.inputs[0] not in (x,)), None)
    axes = _axes(ctx.graph, mean, len(shape)) if mean is not None and shape is not None else None
    tighter = _on_domain(ctx, x, axes, centred, eps, 1.0, value)
    if tighter is not None:
        value, note = tighter[0], f"recognised {name} (eps={eps:g}) without its scale; {tighter[1]}"
        method = "1/sqrt(min var + eps)"
    row = _row(ctx, node, RowKind.NORMALIZATION, value, method, data_in=x, note=note)
    factors = {k: (value if k == pos else 0.0) for k in range(len(node.inputs))}
    return Outcome(factors=factors, row=row, sources={pos: x}, absorbs=[n.name for n in nodes],
                   local=tighter is not None)


@rule("LayerNormalization", "RMSNormalization", "GroupNormalization", "InstanceNormalization")
def normalization(ctx: Context, node: Node, data: list[int]) -> Outcome:
    """LayerNormalization (opset 17), RMSNormalization (opset 23), GroupNormalization and
    InstanceNormalization: max|scale| / sqrt(eps) (see the comment above: each normalises
    groups of entries by their own standard deviation, then scales by constants)."""
    if data != [0]:
        return unbounded(f"{node.op} scale or bias depends on the input: not globally Lipschitz")
    if any(out and ctx.graph.consumers.get(out) or out in ctx.graph.outputs for out in node.outputs[1:]):
        return unbounded(f"{node.op}'s mean / inverse standard deviation outputs are used: not bounded")
    eps = float(node.attrs.get("epsilon", 1e-5))
    if not eps > 0:
        return unbounded(f"{node.op} with epsilon {eps:g} is not globally Lipschitz")
    scale = ctx.graph.const(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None
    if scale is None:
        return unbounded(f"{node.op} scale is not a known constant")
    gamma = float(np.abs(scale.astype(np.float64)).max()) if scale.size else 0.0
    # eps is stored as a float32 attribute: the runtime adds that float32 value
    value = gamma / math.sqrt(float(np.float32(eps)))
    shape = ctx.graph.shape(node.inputs[0])
    tighter = None
    if node.op in ("LayerNormalization", "RMSNormalization") and shape is not None:
        axis = int(node.attrs.get("axis", -1)) % len(shape)
        tighter = _on_domain(ctx, node.inputs[0], tuple(range(axis, len(shape))),
                             node.op == "LayerNormalization", float(np.float32(eps)), gamma, value)
    if tighter is not None:
        row = _row(ctx, node, RowKind.NORMALIZATION, tighter[0], "max|gamma|/sqrt(min var + eps)", note=tighter[1])
        return Outcome(factors={0: tighter[0]}, row=row, local=True)
    row = _row(ctx, node, RowKind.NORMALIZATION, value, "max|gamma|/sqrt(eps)", note=LOOSE)
    return Outcome(factors={0: value}, row=row)
