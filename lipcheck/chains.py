"""A compositional bound tighter than the product on chains Linear -> activation -> Linear ...

ECLipsE and ECLipsE-Fast (Xu & Sivaranjani, NeurIPS 2024, "ECLipsE: Efficient Compositional
Lipschitz Constant Estimation for Deep Neural Networks"): sequential certificates, used inside
the graph composition for maximal chain segments (residual branches, Add, Concat and pooling
keep their rules).

The chain: z_1 = x, v_i = W_i z_i + b_i, z_{i+1} = phi_i(v_i) (i < l), y = W_l z_l + b_l, each
phi_i elementwise and slope-restricted in [a_i, b_i]: for two inputs, every output difference
is Delta z = D Delta v with D diagonal, entries in [a_i, b_i] (mean value theorem), so per
neuron j, with m = (a + b) / 2 and p = a b,
2 m Delta v_j Delta z_j - Delta z_j^2 - p Delta v_j^2 >= 0 (biases cancel in differences).

Invariant (the certificate): u_i^T X_{i-1} u_i >= u_{i+1}^T X_i u_{i+1} for the differences
u_i = Delta z_i, starting from X_0 = I (so |Delta x|^2 >= u_l^T X_{l-1} u_l). One layer, with
u = u_i, W = W_i, z = u_{i+1}, and a multiplier lam_j >= 0 per neuron (Lambda = diag(lam),
the S-procedure):
u^T X u - z^T X' z >= u^T X u - z^T X' z - sum_j lam_j (2 m z_j (W u)_j - z_j^2 - p (W u)_j^2)
    = [u; z]^T [[X + p W^T Lambda W, -m W^T Lambda], [-m Lambda W, Lambda - X']] [u; z],
which is >= 0 when M = X + p W^T Lambda W > 0 and (Schur complement)
X' <= Lambda - m^2 Lambda K Lambda with K = W M^{-1} W^T. We take X' = that minus MARGIN
Lambda (room for float64 rounding). Finally |W_l u_l|^2 <= lambda_max(W_l X_{l-1}^{-1} W_l^T)
u_l^T X_{l-1} u_l, so L^2 = lambda_max(W_l X_{l-1}^{-1} W_l^T), raised by MARGIN.

Any positive multipliers that pass the checks give a valid bound; the choice only decides how
tight. ECLipsE-Fast takes one lam per layer in closed form, lam = 1 / (2 m^2 lambda_max(K)) with
p = 0 (X' then has eigenvalues in [lam/2, lam]), halved for p < 0 until M and X' pass. ECLipsE
solves a small SDP per layer; here the per-neuron multipliers are instead optimised by Adam
on log L^2 through the whole recursion (autograd), from ECLipsE-Fast's, within a flop budget
that does not depend on the machine, and the result is re-certified from scratch: every M and
X' checked positive definite by Cholesky with a conditioning guard (GUARD), so that the float64
rounding stays inside MARGIN. The smaller of the two certified values is used. On a trained
32-64-64-10 ReLU MLP this lands within 0.5% of LipSDP-Neuron (benchmarks/RESULTS.md).

Scaling one W_i by t > 0 scales the result by t exactly (each X_j after it scales by 1/t^2),
as it does the function's constant: so normalize's rescaling of a layer rescales the chain's
factor by the same t (``Outcome.folds``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .graph import Graph, Node
from .rules import Context, Outcome
from .rules.elementwise import activation_slopes
from .rules.linear import batchnorm_scale

MARGIN = 1e-7  # relative room for rounding, kept below X' and added to the result
# Conditioning guard: every M and X' must keep GUARD of the scale it is measured against
# (X' - GUARD Lambda and M - GUARD X positive definite, checked by Cholesky). It bounds the
# relative error of the float64 products and triangular solves by about n u / GUARD (1e-8 at
# width 1024), which MARGIN covers.
GUARD = 1e-5
# Each layer costs a few width³ factorisations: above this width (about 1 s at 1024 on 2 CPU
# cores) the chain keeps the product, and its last row says so.
MAX_WIDTH = 1024
MAX_HALVINGS = 40
# Per-neuron multipliers: Adam on log Lambda, as many steps as this many flops allow (so the
# result does not depend on the machine's speed; under 1 s on 2 CPU cores for the whole
# network, shared by its chains), at most MAX_STEPS, stopping early once STALL steps gain less
# than a relative 1e-4.
OPT_FLOPS = 1e10
MAX_STEPS = 300
MIN_STEPS = 20
STALL = 25
LEARNING_RATE = 0.1


def slope_range(node: Node) -> tuple[float, float] | None:
    """[a, b] with a <= f'(x) <= b for all x (difference quotients too), or None: the
    activation table's slope range (``rules.elementwise.ACTIVATION_FACTS``)."""
    if node.domain:
        return None
    return activation_slopes(node)


def _chol(mat: torch.Tensor) -> torch.Tensor | None:
    c, info = torch.linalg.cholesky_ex((mat + mat.T) / 2)
    return None if int(info) else c


def _whiten(c: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """C^{-1} rhs for a lower-triangular C."""
    return torch.linalg.solve_triangular(c, rhs, upper=False)


def _k_matrix(x: torch.Tensor | None, gram: torch.Tensor, w: torch.Tensor, p: float, lam: torch.Tensor,
              guard: float) -> torch.Tensor | None:
    """K = W M^{-1} W^T with M = X + p W^T Lambda W (X = I where x is None; gram = W W^T), or
    None when M (less its guard) is not positive definite."""
    if x is None and p == 0:
        return gram
    if x is None:
        # W (I + p W^T L W)^{-1} W^T = G - p G S N^{-1} S G, N = I + p S G S, S = L^{1/2}
        # (Woodbury); M and N share their eigenvalues other than 1, so M - guard I > 0 iff
        # N - guard I > 0.
        s = lam.sqrt()
        eye = torch.eye(len(gram), dtype=gram.dtype)
        n_mat = eye + p * s[:, None] * gram * s[None, :]
        c = _chol(n_mat)
        if c is None or (guard and _chol(n_mat - guard * eye) is None):
            return None
        b = _whiten(c, s[:, None] * gram)
        return gram - p * b.T @ b
    m_mat = x if p == 0 else x + p * (w.T * lam) @ w
    c = _chol(m_mat)
    if c is None or (guard and p != 0 and _chol(m_mat - guard * x) is None):
        return None
    b = _whiten(c, w.T)
    return b.T @ b


def _next_x(k: torch.Tensor, m: float, lam: torch.Tensor, margin: float, guard: float) -> torch.Tensor | None:
    """X' = (1 - margin) Lambda - m^2 Lambda K Lambda, or None when X' - guard Lambda is not
    positive definite."""
    x = (1 - margin) * torch.diag(lam) - (m * m) * lam[:, None] * k * lam[None, :]
    x = (x + x.T) / 2
    if _chol(x - guard * torch.diag(lam) if guard else x) is None:
        return None
    return x


def _last(x: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor | None:
    """lambda_max(W X^{-1} W^T) = |W C^{-T}|_2^2 (X = C C^T), as the top eigenvalue of the
    smaller Gram matrix."""
    if x is None:
        b = w.T
    else:
        c = _chol(x)
        if c is None:
            return None
        b = _whiten(c, w.T)
    gram = b.T @ b if b.shape[1] <= b.shape[0] else b @ b.T
    return torch.linalg.eigvalsh((gram + gram.T) / 2)[-1]


def _prepare(weights: Sequence[np.ndarray], slopes: Sequence[tuple[float, float]]) \
        -> tuple[list[torch.Tensor], torch.Tensor] | None:
    if len(weights) < 2 or len(slopes) != len(weights) - 1 or not all(np.isfinite(w).all() for w in weights):
        return None  # NaN/Inf weights: the product says "not finite"
    if any((a + b) / 2 <= 0 for a, b in slopes):
        return None
    ws = [torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64)) for w in weights]
    return ws, ws[0] @ ws[0].T


def certify(weights: Sequence[np.ndarray], slopes: Sequence[tuple[float, float]],
            multipliers: Sequence[np.ndarray]) -> float | None:
    """The certified bound for the given per-neuron multipliers (multipliers[i] has one
    positive entry per output of weights[i], i < l): the recursion with MARGIN and GUARD, every
    M and X' checked positive definite by Cholesky; None when a check fails."""
    prep = _prepare(weights, slopes)
    return None if prep is None else _certify(*prep, slopes, multipliers)


def _certify(ws: list[torch.Tensor], gram: torch.Tensor, slopes: Sequence[tuple[float, float]],
             multipliers: Sequence[np.ndarray]) -> float | None:
    """:func:`certify` on weights already prepared (float64 tensors and W_1 W_1^T)."""
    if len(multipliers) != len(slopes):
        return None
    x: torch.Tensor | None = None
    with torch.no_grad():
        for w, (a, b), mult in zip(ws[:-1], slopes, multipliers):
            lam = torch.from_numpy(np.asarray(mult, dtype=np.float64))
            if lam.shape != (w.shape[0],) or not bool((lam > 0).all()) or not bool(torch.isfinite(lam).all()):
                return None
            k = _k_matrix(x, gram, w, a * b, lam, GUARD)
            x = None if k is None else _next_x(k, (a + b) / 2, lam, MARGIN, GUARD)
            if x is None:
                return None
        top = _last(x, ws[-1])
    if top is None or not float(top) >= 0:
        return None
    value = math.sqrt(float(top)) * (1 + MARGIN)
    return value if math.isfinite(value) else None


def _fast_multipliers(ws: list[torch.Tensor], gram: torch.Tensor,
                      slopes: Sequence[tuple[float, float]]) -> list[np.ndarray] | None:
    """ECLipsE-Fast's scalar multiplier per layer, lam = 1 / (2 m^2 lambda_max(W X^{-1} W^T)),
    halved until M and X' pass their checks (p < 0)."""
    x: torch.Tensor | None = None
    out = []
    with torch.no_grad():
        for w, (a, b) in zip(ws[:-1], slopes):
            m, p = (a + b) / 2, a * b
            one = torch.ones(w.shape[0], dtype=torch.float64)
            k0 = _k_matrix(x, gram, w, 0.0, one, GUARD)
            if k0 is None:
                return None
            mu = float(torch.linalg.eigvalsh(k0)[-1])
            if not mu > 0.0:
                return None  # a zero layer: the product (0) is as good
            lam = 1.0 / (2 * m * m * mu)
            for _ in range(MAX_HALVINGS):
                k = k0 if p == 0 else _k_matrix(x, gram, w, p, lam * one, GUARD)
                nxt = None if k is None else _next_x(k, m, lam * one, MARGIN, GUARD)
                if nxt is not None:
                    break
                lam /= 2
            else:
                return None
            x = nxt
            out.append(np.full(w.shape[0], lam))
    return out


def eclipse_fast(weights: Sequence[np.ndarray], slopes: Sequence[tuple[float, float]]) -> float | None:
    """The ECLipsE-Fast bound of y = W_l phi_{l-1}(... phi_1(W_1 x)) with phi_i slope-restricted
    in slopes[i] (len(slopes) == len(weights) - 1; weights W_i as (out, in) arrays). None when
    the recursion breaks down (then the caller keeps the product)."""
    prep = _prepare(weights, slopes)
    if prep is None:
        return None
    mults = _fast_multipliers(*prep, slopes)
    return None if mults is None else _certify(*prep, slopes, mults)


def _step_flops(weights: Sequence[np.ndarray]) -> float:
    """Flops of one optimisation step (forward and backward, about 3x the forward): the first
    layer's W W^T is computed once; each later layer factors and solves at its input width."""
    total = 0.0
    for w in weights[1:]:
        n_out, n_in = w.shape
        total += n_in ** 3 / 3 + n_in * n_in * n_out + n_in * n_out * n_out
    return 3 * total


def _objective(ws: list[torch.Tensor], gram: torch.Tensor, slopes: Sequence[tuple[float, float]],
               thetas: list[torch.Tensor]) -> torch.Tensor | None:
    """log L^2 for multipliers exp(theta) (no margin, no guard: the optimiser's view; the
    result is certified separately)."""
    x: torch.Tensor | None = None
    for w, (a, b), theta in zip(ws[:-1], slopes, thetas):
        lam = theta.exp()
        k = _k_matrix(x, gram, w, a * b, lam, 0.0)
        x = None if k is None else _next_x(k, (a + b) / 2, lam, 0.0, 0.0)
        if x is None:
            return None
    top = _last(x, ws[-1])
    return None if top is None or not float(top.detach()) > 0 else top.log()


def optimise_multipliers(weights: Sequence[np.ndarray], slopes: Sequence[tuple[float, float]],
                         start: Sequence[np.ndarray], steps: int) -> tuple[list[np.ndarray], int]:
    """Per-neuron multipliers (ECLipsE's diagonal Lambda_i, here chosen by Adam on log L^2
    through the whole recursion, from ``start``): the best point seen and the steps taken. A
    step into a region where the recursion breaks down is undone and the rate halved."""
    best_value, best = math.inf, [np.asarray(s, dtype=np.float64) for s in start]
    history: list[float] = []
    taken = 0
    # autograd even when the caller runs lipcheck under torch.no_grad() or inference_mode():
    # every tensor of the optimisation is made inside this block
    with torch.inference_mode(False), torch.enable_grad():
        prep = _prepare(weights, slopes)
        assert prep is not None
        ws, gram = prep
        thetas = [torch.tensor(np.log(s), dtype=torch.float64, requires_grad=True) for s in start]
        opt = torch.optim.Adam(thetas, lr=LEARNING_RATE)
        saved = [t.detach().clone() for t in thetas]
        while taken < steps:
            taken += 1
            opt.zero_grad()
            value = _objective(ws, gram, slopes, thetas)
            if value is None or not math.isfinite(float(value.detach())):
                with torch.no_grad():
                    for t, s in zip(thetas, saved):
                        t.copy_(s)
                for group in opt.param_groups:
                    group["lr"] *= 0.5
                continue
            if float(value.detach()) < best_value:
                best_value, best = float(value.detach()), [t.detach().exp().numpy().copy() for t in thetas]
            history.append(best_value)
            if len(history) > STALL and history[-STALL - 1] - best_value < 1e-4:
                break  # log L^2: a relative gain under 1e-4 over the last STALL steps
            value.backward()
            saved = [t.detach().clone() for t in thetas]
            opt.step()
    return best, taken


def eclipse(weights: Sequence[np.ndarray], slopes: Sequence[tuple[float, float]],
            budget: float | None = None) -> tuple[float, str] | None:
    """The chain's certified bound and how it was found: ECLipsE-Fast's closed-form multipliers,
    then per-neuron multipliers optimised from them where ``budget`` flops (OPT_FLOPS by
    default) allow MIN_STEPS steps; the smaller certified value. None when even ECLipsE-Fast
    breaks down."""
    budget = OPT_FLOPS if budget is None else budget
    prep = _prepare(weights, slopes)
    if prep is None:
        return None
    mults = _fast_multipliers(*prep, slopes)
    fast = None if mults is None else _certify(*prep, slopes, mults)
    if fast is None or mults is None:
        return None
    steps = min(MAX_STEPS, int(budget / max(_step_flops(weights), 1.0)))
    if steps < MIN_STEPS:
        return fast, f"ECLipsE-Fast (per-neuron multipliers not tried: {MIN_STEPS} steps would cost more " \
                     f"than this chain's {budget:.1e} flops)"
    try:
        best, taken = optimise_multipliers(weights, slopes, mults, steps)
    except (RuntimeError, torch.linalg.LinAlgError) as exc:  # an optional tightening never ends the run
        return fast, f"ECLipsE-Fast (the per-neuron optimisation failed: {exc})"
    value = _certify(*prep, slopes, best)
    if value is None or not value < fast:
        return fast, "ECLipsE-Fast"
    return value, f"ECLipsE with per-neuron multipliers ({taken} steps from ECLipsE-Fast's, {fast:.6g})"


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
            # constant scalings before the activation fold into the last weight's rows, those
            # after it into the next weight's columns (exact: the same function)
            pre, c_pre, value = _scalings(ctx, end.outputs[0], weights[-1].shape[0])
            nxt = only_consumer(g, value)
            absorbed: list[str] = []
            if nxt is None:  # x * g(x) (SiLU, Mish, GELU): x feeds the product and the branch g
                nxt, absorbed = _product_activation(g, outcome_of, by_name, value)
            if nxt is None or outcome_of.get(nxt.name) is None or outcome_of[nxt.name].unbounded is not None:
                break
            slope = outcome_of[nxt.name].slopes if absorbed else slope_range(nxt)
            if slope is None or (not absorbed and data_inputs(g, nxt) != [0]):
                break
            post, c_post, value = _scalings(ctx, nxt.outputs[0], weights[-1].shape[0])
            lin = only_consumer(g, value)
            w_next = linear_weight(ctx, lin, data_inputs(g, lin)) if lin is not None else None
            if lin is None or w_next is None or w_next.shape[1] != weights[-1].shape[0] \
                    or outcome_of.get(lin.name) is None or outcome_of[lin.name].unbounded is not None \
                    or any(outcome_of.get(n.name) is None or outcome_of[n.name].unbounded is not None
                           for n in pre + post):
                break
            nodes += [*pre, nxt, *post, lin]
            used.update(absorbed)
            if pre:
                weights[-1] = c_pre[:, None] * weights[-1]
            weights.append(c_post[None, :] * w_next if post else w_next)
            slopes.append(slope)
            end = lin
            last_linear = len(nodes)
        nodes = nodes[:last_linear]
        if len(weights) >= 2:
            chains.append((nodes, weights, slopes))
            used.update(n.name for n in nodes)
    return chains


def _scalings(ctx: Context, value: str, width: int) -> tuple[list[Node], np.ndarray, str]:
    """The ops that scale each feature by a constant (Mul/Div by one number or one per
    feature on the last axis; an eval BatchNorm of a 2-D value, its shift cancelling in
    differences) that follow ``value``, each the only reader of the one before: (the nodes,
    the product of their factors per feature as a float64 vector of ``width``, the value
    after them)."""
    graph = ctx.graph
    nodes: list[Node] = []
    scale = np.ones(width)
    while True:
        node = only_consumer(graph, value)
        shape = graph.known_shape(value)
        if node is None or node.domain or shape is None or shape != graph.known_shape(node.outputs[0]):
            return nodes, scale, value
        if node.op == "BatchNormalization":
            s = batchnorm_scale(ctx, node) if node.inputs[0] == value and len(shape) == 2 else None
            if s is None or s.size != width or data_inputs(graph, node) != [0]:
                return nodes, scale, value
            factor = s
        else:
            if node.op not in ("Mul", "Div") or len(node.inputs) != 2 \
                    or data_inputs(graph, node) != [node.inputs.index(value)] \
                    or (node.op == "Div" and node.inputs[0] != value):
                return nodes, scale, value
            c = graph.const(node.inputs[1] if node.inputs[0] == value else node.inputs[0])
            if c is None or not np.issubdtype(c.dtype, np.floating) or not (
                    c.size == 1 or (c.shape[-1] == width and c.size == width)):
                return nodes, scale, value
            factor = np.asarray(c, dtype=np.float64).reshape(-1)
            if node.op == "Div":
                if not np.all(factor != 0):
                    return nodes, scale, value
                factor = 1.0 / factor
        if not np.all(np.isfinite(factor)):
            return nodes, scale, value
        scale = scale * factor
        nodes.append(node)
        value = node.outputs[0]


def _product_activation(graph: Graph, outcome_of: dict[str, Outcome], by_name: dict[str, Node],
                        value: str) -> tuple[Node | None, list[str]]:
    """The op of a recognised x * g(x) activation of ``value`` when every reader of ``value`` is
    that op or part of its g (its ``absorbs``), and nothing else reads g's values, with its
    slope range known; else (None, [])."""
    users = graph.consumers.get(value, [])
    if value in graph.outputs:
        return None, []
    # the op may read value itself (x * sigmoid(x)) or a scaled copy from its branch
    # (0.5 x * (1 + tanh(...))): the candidates are the readers and their readers
    candidates = list({n.name: n for n in [*users, *(c for u in users for o in u.outputs if o
                                                     for c in graph.consumers.get(o, []))]}.values())
    for node in candidates:
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


def apply_chains(ctx: Context, steps: list[tuple[Node, Outcome]]) -> list[str]:
    """Replace the outcome of each chain's last op by the chain's ECLipsE factor, measured from
    the chain's input, where it beats the product of the chain's constants. Returns, per chain
    used, "eclipse" (optimised per-neuron multipliers) or "eclipse-fast"."""
    index = {node.name: k for k, (node, _) in enumerate(steps)}
    used: list[str] = []
    chains = find_chains(ctx, steps)
    # the optimisation's flop budget is for the whole network, shared evenly by its chains
    # (a transformer's twelve MLP blocks do not take twelve times as long as one MLP)
    budget = OPT_FLOPS / max(1, len(chains))
    for nodes, weights, slopes in chains:
        outcomes = [steps[index[n.name]][1] for n in nodes]
        product = math.prod(max(o.factors.values()) if o.factors else 1.0 for o in outcomes)
        estimate = math.prod(max((o.est_factors or o.factors).values()) if o.factors else 1.0 for o in outcomes)
        last, out = nodes[-1], outcomes[-1]
        if ctx.start is not None and any(ctx.start in n.outputs for n in nodes[:-1]):
            continue  # --from inside the chain: measured from the chain's input, it cannot start there
        width = max(max(w.shape) for w in weights)
        if width > MAX_WIDTH:
            if out.row is not None:
                text = (f"ECLipsE not tried on the chain {nodes[0].name} -> {last.name}: width {width} > "
                        f"{MAX_WIDTH} (its cost grows as width³); the bound uses the product")
                out.row.note = f"{out.row.note}; {text}" if out.row.note else text
            continue
        found = eclipse(weights, slopes, budget)
        if found is None or not found[0] < product:
            continue
        value, method = found
        first = nodes[0]
        source = first.inputs[data_inputs(ctx.graph, first)[0]]
        pos = data_inputs(ctx.graph, last)[0]
        if out.row is not None:
            text = (f"{method} over the chain {first.name} -> {last.name} ({len(weights)} linear layers): "
                    f"the bound uses {value:.6g} from {first.name}'s input, in place of the product {product:.6g}")
            out.row.note = f"{out.row.note}; {text}" if out.row.note else text
        steps[index[last.name]] = (last, Outcome(
            factors={pos: value}, est_factors={pos: min(value, estimate)}, combine=out.combine, row=out.row,
            extra_rows=out.extra_rows, sources={pos: source}, absorbs=out.absorbs,
            folds=[n.name for n in nodes[:-1]] + out.folds,
        ))
        used.append("eclipse-fast" if method.startswith("ECLipsE-Fast") else "eclipse")
    return used
