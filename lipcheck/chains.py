"""A compositional bound tighter than the product on chains Linear -> activation -> Linear ...

ECLipsE-Fast (Xu & Sivaranjani, NeurIPS 2024, "ECLipsE: Efficient Compositional Lipschitz
Constant Estimation for Deep Neural Networks"), a closed-form sequential certificate, used
inside the graph composition for maximal chain segments (residual branches, Add, Concat and
pooling keep their rules).

The chain: z_1 = x, v_i = W_i z_i + b_i, z_{i+1} = phi_i(v_i) (i < l), y = W_l z_l + b_l, each
phi_i elementwise and slope-restricted in [a_i, b_i]: for two inputs, every output difference
is Delta z = D Delta v with D diagonal, entries in [a_i, b_i] (mean value theorem), so
(Delta z - a Delta v)(b Delta v - Delta z) >= 0 per neuron, i.e. with m = (a + b) / 2 and
p = a b, 2 m Delta v Delta z - Delta z^2 - p Delta v^2 >= 0 (biases cancel in differences).

Invariant (the certificate): u_i^T X_{i-1} u_i >= u_{i+1}^T X_i u_{i+1} for the differences
u_i = Delta z_i, starting from X_0 = I (so |Delta x|^2 >= u_l^T X_{l-1} u_l). One layer, with
u = u_i, W = W_i, z = u_{i+1}, and a multiplier lam >= 0 on the constraint (S-procedure):
u^T X u - z^T X' z >= u^T X u - z^T X' z - lam (2 m z^T W u - |z|^2 - p |W u|^2)
                  = [u; z]^T [[X + lam p W^T W, -lam m W^T], [-lam m W, lam I - X']] [u; z],
which is >= 0 when M = X + lam p W^T W > 0 and (Schur complement)
X' <= lam I - lam^2 m^2 W M^{-1} W^T. We take X' = that minus a tiny multiple of lam I (room
for float64 rounding), and lam = 1 / (2 m^2 lambda_max(W M^{-1} W^T)) as ECLipsE-Fast does
(with p = 0, M = X, and X' then has eigenvalues in [lam/2, lam], so it stays positive
definite); for p < 0 lam is halved until M and X' are positive definite (checked by
Cholesky). Finally |W_l u_l|^2 <= lambda_max(W_l^T W_l X_{l-1}^{-1}) u_l^T X_{l-1} u_l, so
L^2 = lambda_max(C^{-1} W_l^T W_l C^{-T}) with X_{l-1} = C C^T, taken as |W_l C^{-T}|_2^2
(the top eigenvalue of a float64 Gram matrix, raised by a relative 1e-9).

Scaling one W_i by t > 0 scales the result by t exactly (each X_j after it scales by 1/t^2),
as it does the function's constant: so normalize's rescaling of a layer rescales the chain's
factor by the same t (``Outcome.folds``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .graph import Graph, Node
from .rules import Context, Outcome
from .rules.elementwise import activation_slopes

MARGIN = 1e-9  # relative room for rounding, kept below X' and added to the result
# Each layer costs a few width³ factorisations: above this width (about 1 s at 1024 on 2 CPU
# cores) the chain keeps the product, and its last row says so.
MAX_WIDTH = 1024
MAX_HALVINGS = 40


def slope_range(node: Node) -> tuple[float, float] | None:
    """[a, b] with a <= f'(x) <= b for all x (difference quotients too), or None: the
    activation table's slope range (``rules.elementwise.ACTIVATION_FACTS``)."""
    if node.domain:
        return None
    return activation_slopes(node)


def _chol(mat: np.ndarray) -> np.ndarray | None:
    try:
        return np.linalg.cholesky((mat + mat.T) / 2)
    except np.linalg.LinAlgError:
        return None


def _solve_lower(c: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """C^{-1} rhs for a lower-triangular C (a triangular solve: a third of a general one)."""
    import torch

    return torch.linalg.solve_triangular(torch.from_numpy(c), torch.from_numpy(np.ascontiguousarray(rhs)),
                                         upper=False).numpy()


def _lmax_whitened(w: np.ndarray, c: np.ndarray) -> float:
    """lambda_max(W (C C^T)^{-1} W^T) = |W C^{-T}|_2^2, as the top eigenvalue of the smaller
    Gram matrix of B = C^{-1} W^T (float64 eigvalsh: error about n u of the value, far inside
    MARGIN)."""
    b = _solve_lower(c, w.T)
    gram = b.T @ b if b.shape[1] <= b.shape[0] else b @ b.T
    return float(np.linalg.eigvalsh((gram + gram.T) / 2)[-1])


def eclipse_fast(weights: Sequence[np.ndarray], slopes: Sequence[tuple[float, float]]) -> float | None:
    """The ECLipsE-Fast bound of y = W_l phi_{l-1}(... phi_1(W_1 x)) with phi_i slope-restricted
    in slopes[i] (len(slopes) == len(weights) - 1; weights W_i as (out, in) float64 arrays).
    None when the recursion breaks down (then the caller keeps the product)."""
    if len(weights) < 2 or len(slopes) != len(weights) - 1 or not all(np.isfinite(w).all() for w in weights):
        return None  # NaN/Inf weights: the product says "not finite"
    x_prev = np.eye(weights[0].shape[1])
    for w, (a, b) in zip(weights[:-1], slopes):
        m, p = (a + b) / 2, a * b
        if m <= 0:
            return None
        c = _chol(x_prev)
        if c is None:
            return None
        mu = _lmax_whitened(w, c)
        if not mu > 0.0:
            return None  # a zero layer: the product (0) is as good
        lam = 1.0 / (2 * m * m * mu)
        for _ in range(MAX_HALVINGS):
            cm = _chol(x_prev + lam * p * (w.T @ w)) if p != 0 else c
            if cm is not None:
                b_mat = _solve_lower(cm, w.T)  # C_M^{-1} W^T
                k = b_mat.T @ b_mat  # W M^{-1} W^T
                x_next = lam * (1 - MARGIN) * np.eye(w.shape[0]) - lam * lam * m * m * k
                if _chol(x_next) is not None:
                    break
            lam /= 2
        else:
            return None
        x_prev = (x_next + x_next.T) / 2
    c = _chol(x_prev)
    if c is None:
        return None
    value = math.sqrt(_lmax_whitened(weights[-1], c)) * (1 + MARGIN)
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------- chains in a graph


def linear_weight(ctx: Context, node: Node, data: list[int]) -> np.ndarray | None:
    """The (out, in) matrix of a Gemm (data operand A, no data C) or a MatMul x @ W (W 2-D)."""
    g = ctx.graph
    if node.op == "Gemm" and data == [0] and not node.attrs.get("transA", 0):
        w = g.const(node.inputs[1])
        if w is None or w.ndim != 2:
            return None
        mat = w if node.attrs.get("transB", 0) else w.T
        return abs(float(node.attrs.get("alpha", 1.0))) * _wide(mat)
    if node.op == "MatMul" and data == [0]:
        w = g.const(node.inputs[1])
        if w is None or w.ndim != 2:
            return None
        return _wide(w.T)
    return None


def _wide(mat: np.ndarray) -> np.ndarray:
    """float64 for the certificate; a matrix wider than MAX_WIDTH is never used by it (kept as
    stored, no copy)."""
    return mat if max(mat.shape) > MAX_WIDTH else mat.astype(np.float64)


def data_inputs(graph: Graph, node: Node) -> list[int]:
    return [k for k, v in enumerate(node.inputs) if v and v not in graph.static]


def only_consumer(graph: Graph, value: str) -> Node | None:
    users = graph.consumers.get(value, [])
    if len(users) != 1 or value in graph.outputs:
        return None
    return users[0]


def is_shift(graph: Graph, node: Node, value: str) -> bool:
    """Add/Sub of a constant to ``value`` (a bias) that does not broadcast ``value``."""
    if node.op not in ("Add", "Sub") or node.domain or len(node.inputs) != 2:
        return False
    data = data_inputs(graph, node)
    if len(data) != 1 or node.inputs[data[0]] != value or (node.op == "Sub" and data[0] != 0):
        return False
    return graph.known_shape(value) is not None and graph.known_shape(value) == graph.known_shape(node.outputs[0])


def find_chains(ctx: Context, steps: list[tuple[Node, Outcome]]) -> list[tuple[list[Node], list[np.ndarray],
                                                                              list[tuple[float, float]]]]:
    """Maximal chains linear (+ bias) -> activation -> linear (+ bias) ... -> linear, each value
    inside read only by the next op. Returns (the nodes, in order; weights; slopes)."""
    g = ctx.graph
    outcome_of = {node.name: outcome for node, outcome in steps}
    by_name = {node.name: node for node, _ in steps}
    used: set[str] = set()
    chains = []
    for node, outcome in steps:
        if node.name in used or outcome.unbounded is not None:
            continue
        w = linear_weight(ctx, node, data_inputs(g, node))
        if w is None:
            continue
        nodes, weights, slopes = [node], [w], []
        end = node  # the last linear op (or its bias) in the chain so far
        last_linear = 1  # len(nodes) up to and including the last linear op and its bias
        while True:
            nxt = only_consumer(g, end.outputs[0])
            if nxt is not None and is_shift(g, nxt, end.outputs[0]) and end.op in ("Gemm", "MatMul"):
                nodes.append(nxt)
                end = nxt
                last_linear = len(nodes)
                nxt = only_consumer(g, end.outputs[0])
            absorbed: list[str] = []
            if nxt is None:  # x * g(x) (SiLU, Mish): x feeds the product and the branch g
                nxt, absorbed = _product_activation(g, outcome_of, by_name, end.outputs[0])
            if nxt is None or outcome_of.get(nxt.name) is None or outcome_of[nxt.name].unbounded is not None:
                break
            slope = outcome_of[nxt.name].slopes if absorbed else slope_range(nxt)
            if slope is None or (not absorbed and data_inputs(g, nxt) != [0]):
                break
            lin = only_consumer(g, nxt.outputs[0])
            w_next = linear_weight(ctx, lin, data_inputs(g, lin)) if lin is not None else None
            if lin is None or w_next is None or w_next.shape[1] != weights[-1].shape[0] \
                    or outcome_of.get(lin.name) is None or outcome_of[lin.name].unbounded is not None:
                break
            nodes += [nxt, lin]
            used.update(absorbed)
            weights.append(w_next)
            slopes.append(slope)
            end = lin
            last_linear = len(nodes)
        nodes = nodes[:last_linear]
        if len(weights) >= 2:
            chains.append((nodes, weights, slopes))
            used.update(n.name for n in nodes)
    return chains


def _product_activation(graph: Graph, outcome_of: dict[str, Outcome], by_name: dict[str, Node],
                        value: str) -> tuple[Node | None, list[str]]:
    """The op of a recognised x * g(x) activation of ``value`` when every reader of ``value`` is
    that op or part of its g (its ``absorbs``), and nothing else reads g's values, with its
    slope range known; else (None, [])."""
    users = graph.consumers.get(value, [])
    if value in graph.outputs:
        return None, []
    for node in users:
        out = outcome_of.get(node.name)
        if out is None or out.slopes is None or value not in out.sources.values():
            continue
        inside = set(out.absorbs)
        branch = [by_name[name] for name in inside if name in by_name]
        if all(u is node or u.name in inside for u in users) and all(
                c is node or c.name in inside for n in branch for o in n.outputs if o
                for c in graph.consumers.get(o, [])):
            return node, list(out.absorbs)
    return None, []


def apply_chains(ctx: Context, steps: list[tuple[Node, Outcome]]) -> int:
    """Replace the outcome of each chain's last op by the chain's ECLipsE-Fast factor, measured
    from the chain's input, where it beats the product of the chain's constants. Returns how
    many chains were used."""
    index = {node.name: k for k, (node, _) in enumerate(steps)}
    count = 0
    for nodes, weights, slopes in find_chains(ctx, steps):
        outcomes = [steps[index[n.name]][1] for n in nodes]
        product = math.prod(max(o.factors.values()) if o.factors else 1.0 for o in outcomes)
        estimate = math.prod(max((o.est_factors or o.factors).values()) if o.factors else 1.0 for o in outcomes)
        last, out = nodes[-1], outcomes[-1]
        if ctx.start is not None and any(ctx.start in n.outputs for n in nodes[:-1]):
            continue  # --from inside the chain: measured from the chain's input, it cannot start there
        width = max(max(w.shape) for w in weights)
        if width > MAX_WIDTH:
            if out.row is not None:
                text = (f"ECLipsE-Fast not tried on the chain {nodes[0].name} -> {last.name}: width {width} > "
                        f"{MAX_WIDTH} (its cost grows as width³); the bound uses the product")
                out.row.note = f"{out.row.note}; {text}" if out.row.note else text
            continue
        value = eclipse_fast(weights, slopes)
        if value is None or not value < product:
            continue
        first = nodes[0]
        source = first.inputs[data_inputs(ctx.graph, first)[0]]
        pos = data_inputs(ctx.graph, last)[0]
        if out.row is not None:
            text = (f"ECLipsE-Fast over the chain {first.name} -> {last.name} ({len(weights)} linear layers): "
                    f"the bound uses {value:.6g} from {first.name}'s input, in place of the product {product:.6g}")
            out.row.note = f"{out.row.note}; {text}" if out.row.note else text
        steps[index[last.name]] = (last, Outcome(
            factors={pos: value}, est_factors={pos: min(value, estimate)}, combine=out.combine, row=out.row,
            extra_rows=out.extra_rows, sources={pos: source}, absorbs=out.absorbs,
            folds=[n.name for n in nodes[:-1]] + out.folds,
        ))
        count += 1
    return count
