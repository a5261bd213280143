"""Composition of per-op constants into a bound on the whole network.

L(v) bounds the Lipschitz constant from the network input to value v:
L(input) = 1, L(constant) = 0, and for each op L(out) = combine(factor_i * L(in_i)),
where combine is a sum (Add, Gemm with a data bias) or the l2 rule (Concat).
Sequential ops multiply, so on a chain the bound is the product of the per-op
constants. An op without a finite bound makes L(out) infinite, and so the network
bound, with the reason kept.

A Concat (and the network's outputs, taken together) whose inputs are functions of
disjoint parts of one value is block-diagonal there: its L is the max of the inputs'
rather than the root of their sum of squares (see ``_blocks``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .aliases import ProgressFn
from .graph import Graph, Node
from .interval import Boxes
from .report import LayerRow, NetworkResult, SkippedOp
from .rules import RULES, Context, Outcome


@dataclass
class Composition:
    rows: list[LayerRow] = field(default_factory=list)
    skipped: list[SkippedOp] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    network: NetworkResult | None = None
    steps: list[tuple[Node, Outcome]] = field(default_factory=list)


def _combine(kind: str, terms: list[float]) -> float:
    if any(math.isnan(t) for t in terms):
        return math.nan
    if kind == "l2":
        return math.sqrt(sum(t * t for t in terms))
    return sum(terms)


def _term(f: float, l_in: float) -> float:
    # 0 * inf: an input that is ignored (factor 0) contributes nothing.
    return 0.0 if f == 0.0 or l_in == 0.0 else f * l_in


def _apply(outcome: Outcome, factors: dict[int, float], lip: dict[str, float],
           inputs: list[str], parts: dict[str, Part] | None = None) -> float:
    used = [outcome.sources.get(pos, inputs[pos]) for pos in factors]
    terms = [_term(f, lip.get(v, 0.0)) for f, v in zip(factors.values(), used)]
    if outcome.combine == "concat":
        return _blocks(terms, used, parts or {})
    return _combine(outcome.combine, terms)


def compose(graph: Graph, ctx: Context, progress: ProgressFn | None = None) -> Composition:
    """Run every op's rule, then propagate the bounds through the graph."""
    result = Composition()
    reason_nodes: list[str] = []  # the node each of result.reasons is about
    total = len(graph.nodes)
    for i, node in enumerate(graph.nodes):
        if progress is not None:
            progress(i, total, node.name)
        data = [k for k, v in enumerate(node.inputs) if v and v not in graph.static]
        if not data or all(o in graph.static for o in node.outputs if o):
            continue  # a constant or shape computation (Shape of an activation too): L = 0
        handler = RULES.get(node.op) if node.domain == "" else None
        if handler is None:
            where = f"domain '{node.domain}'" if node.domain else "lipcheck"
            reason = f"op {node.op} is not supported by {where}"
            result.skipped.append(SkippedOp(node.name, node.op, reason))
            result.reasons.append(f"{node.name}: {reason}")
            reason_nodes.append(node.name)
            outcome = Outcome(factors={}, unbounded=reason)
        else:
            outcome = handler(ctx, node, data)
            if outcome.unbounded is not None:
                result.reasons.append(f"{node.name} ({node.op}): {outcome.unbounded}")
                reason_nodes.append(node.name)
                if outcome.row is None and not outcome.extra_rows:
                    result.skipped.append(SkippedOp(node.name, node.op, outcome.unbounded))
        result.steps.append((node, outcome))
    if progress is not None:
        progress(total, total, "")

    from .fold import fold_affine

    folded = fold_affine(ctx, graph, result.steps)
    from .merge import merge_linear

    merged = merge_linear(ctx, graph, result.steps)
    from .chains import apply_chains

    chained = apply_chains(ctx, result.steps)
    parts = value_parts(graph, result.steps)
    cert, est = propagate(graph, result.steps, parts=parts, start=ctx.start)
    absorbed = {name for _, outcome in result.steps for name in outcome.absorbs}
    before = set()  # --from: ops whose outputs do not depend on the start value
    if ctx.start is not None:
        after = downstream(graph, ctx.start)
        before = {node.name for node, _ in result.steps if not any(o in after for o in node.outputs if o)}
        result.reasons += [f"{node.name}: {outcome.unbounded}" for node, outcome in result.steps
                           if outcome.unbounded is not None and outcome.unbounded.startswith(FROM_INSIDE)]
        reason_nodes += [node.name for node, outcome in result.steps
                         if outcome.unbounded is not None and outcome.unbounded.startswith(FROM_INSIDE)]
    # An op that turned out to be part of a recognised activation (the comparison inside
    # torch's Softplus) neither blocks the bound nor counts as skipped; with --from, neither
    # does an op before the start.
    result.reasons = [r for r, name in zip(result.reasons, reason_nodes) if name not in absorbed | before]
    result.skipped = [s for s in result.skipped if s.name not in absorbed]
    for node, outcome in result.steps:
        if outcome.row is not None and node.name not in absorbed:
            outcome.row.bound = None if node.name in before else cert[node.outputs[0]]
            if outcome.combine == "concat":
                outcome.row.note = _concat_note(graph, node, outcome, cert, parts)
            if outcome.unbounded is not None:
                outcome.row.note = outcome.unbounded
            result.rows.append(outcome.row)
        result.rows.extend(outcome.extra_rows)
        if math.isnan(cert[node.outputs[0]]) and not any("not finite" in r for r in result.reasons):
            result.reasons.append(f"{node.name}: weights with NaN or Inf make the bound not finite")
    # union bound over the probabilistic per-op bounds (all rows: those off the output's path
    # only make the sum larger)
    deltas = [r.failure_probability for r in result.rows
              if r.upper_kind == "probabilistic" and r.failure_probability is not None and r.name not in before]
    result.network = _network(graph, cert, est, result.reasons, parts, deltas)
    if ctx.start is not None:
        result.network.start = ctx.start
        result.network.reason += f" (from {ctx.start}: what comes before it held fixed)"
    if result.network.bounded and (folded or merged or chained):
        result.network.composition = "+".join(
            label for used, label in ((folded, "folded"), (merged, "merged"),
                                      (chained, "eclipse" if "eclipse" in chained else "eclipse-fast")) if used)
        if chained:
            optimised = chained.count("eclipse")
            result.network.reason += (f" (ECLipsE on {len(chained)} Linear/activation chain(s): {optimised} with "
                                      f"optimised per-neuron multipliers, {len(chained) - optimised} with "
                                      f"ECLipsE-Fast's)")
        if folded:
            result.network.reason += f" (BatchNorm/per-channel scales folded into {len(folded)} linear op(s))"
        if merged:
            result.network.reason += f" ({len(merged)} pair(s) of consecutive linear ops measured as one)"
    if ctx.boxes is not None:
        _on_domain(result, ctx.boxes, absorbed | before)
    return result


def _on_domain(result: Composition, boxes: Boxes, ignored: set[str]) -> None:
    """With a declared input domain: a bound that used a local constant holds on that domain
    only, and says so (``network.domain``, the composition, the reason); one that did not is
    global, and the reason says the domain was not needed."""
    assert result.network is not None
    net = result.network
    local = [node.name for node, outcome in result.steps if outcome.local and node.name not in ignored]
    where = boxes.domain.describe()
    for _, outcome in result.steps:
        if outcome.local and outcome.row is not None and outcome.row.note:
            outcome.row.note += f" ({where})"
    if net.bounded and local:
        net.domain = where
        net.composition = f"{net.composition or 'graph-product'}+local"
        names = ", ".join(local[:3]) + (f" and {len(local) - 3} more" if len(local) > 3 else "")
        net.reason += (f" (local: holds only for inputs in the declared domain, {where}; "
                       f"{len(local)} op(s) bounded on it by interval propagation: {names})")
    elif net.bounded:
        net.reason += f" (global: no op needed the declared input domain, {where})"
    elif boxes.overflow is not None and any("interval overflow" in r for r in result.reasons):
        net.reason = net.reason.replace("unbounded: ", f"unbounded (interval overflow at {boxes.overflow}): ", 1)


FROM_INSIDE = "--from starts inside"


def downstream(graph: Graph, start: str) -> set[str]:
    """The values computed from ``start`` (not ``start`` itself)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for node in graph.consumers.get(todo.pop(), []):
            for out in node.outputs:
                if out and out not in seen:
                    seen.add(out)
                    todo.append(out)
    return seen


def propagate(graph: Graph, steps: list[tuple[Node, Outcome]],
              multipliers: dict[str, float] | None = None,
              parts: dict[str, Part] | None = None,
              start: str | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """L of every value, certified and estimated; ``multipliers`` scales an op's constants
    by name (what rescaling that op's weight by the same factor does to them). ``parts``:
    what ``value_parts`` returns for these steps (computed when not given).

    ``start`` (--from): L from that value instead of the network input, everything not
    computed from it held fixed: L(start) = 1 and every value that does not depend on it has
    L = 0 (a constant, as a function of the start). An op measured together with ops before
    the start (a fused pad, a folded BatchNorm, a chain certificate from an earlier input)
    cannot be split there: its output is unbounded, and the reason says where to start."""
    if parts is None:
        parts = value_parts(graph, steps)
    cert: dict[str, float] = {name: (0.0 if start is not None else 1.0) for name in graph.inputs}
    after: set[str] = set()
    if start is not None:
        cert[start] = 1.0
        after = downstream(graph, start)
    est: dict[str, float] = dict(cert)
    for node, outcome in steps:
        if start is not None and not any(o in after for o in node.outputs if o):
            for out in node.outputs:  # before the start, or beside it: constant from it
                if out and out != start:
                    cert[out] = est[out] = 0.0
            continue
        inside = [src for src in outcome.sources.values() if src != start and src not in after and
                  any(v == start or v in after for v in node.inputs)] if start is not None else []
        if inside:
            outcome.unbounded = (f"{FROM_INSIDE} what this op was measured with (from {inside[0]}); "
                                 f"start at {inside[0]} or before it")
        if outcome.unbounded is not None:
            l_cert = l_est = math.inf
        else:
            # a folded factor includes the weights of the ops folded into it
            m = math.prod((multipliers or {}).get(name, 1.0) for name in (node.name, *outcome.folds))
            l_cert = m * _apply(outcome, outcome.factors, cert, node.inputs, parts)
            l_est = m * _apply(outcome, outcome.est_factors or outcome.factors, est, node.inputs, parts)
        for out in node.outputs:
            if out:
                cert[out], est[out] = l_cert, l_est
    return cert, est


def network_bound(graph: Graph, steps: list[tuple[Node, Outcome]],
                  multipliers: dict[str, float], parts: dict[str, Part] | None = None) -> float:
    """The certified network bound with some ops' constants rescaled (no rule re-run)."""
    if parts is None:
        parts = value_parts(graph, steps)
    cert, _ = propagate(graph, steps, multipliers, parts)
    return _outputs_bound(graph, cert, parts)


def _outputs_bound(graph: Graph, lip: dict[str, float], parts: dict[str, Part]) -> float:
    """Several outputs: the map to their concatenation (block-diagonal where they are
    functions of disjoint parts of one value, as for a Concat)."""
    outs = [o for o in graph.outputs if o]
    return _blocks([lip.get(o, 0.0) for o in outs], outs, parts)


def _network(graph: Graph, cert: dict[str, float], est: dict[str, float],
             reasons: list[str], parts: dict[str, Part], deltas: Sequence[float] = ()) -> NetworkResult:
    """The network's bound; ``deltas``: the failure probabilities of the probabilistic per-op
    bounds it is composed from (the bound then fails with probability at most their sum)."""
    l_cert = _outputs_bound(graph, cert, parts)
    l_est = _outputs_bound(graph, est, parts)
    if math.isfinite(l_cert) and deltas:
        delta = min(1.0, math.fsum(deltas))
        return NetworkResult(
            lipschitz_bound=l_cert, lipschitz_estimate=l_est, bounded=True, certified=False,
            reason=f"probabilistic: composed from per-layer upper bounds, {len(deltas)} of them "
                   f"probabilistic; fails with probability at most {delta:.3g} (union bound)",
            composition="graph-product", failure_probability=delta,
        )
    if math.isfinite(l_cert):
        return NetworkResult(
            lipschitz_bound=l_cert, lipschitz_estimate=l_est, bounded=True, certified=True,
            reason="certified: composed from per-layer upper bounds", composition="graph-product",
        )
    relevant = [r for r in reasons] or ["an op on the path to the output has no finite bound"]
    reason = "; ".join(relevant[:3]) + (f"; and {len(relevant) - 3} more" if len(relevant) > 3 else "")
    if math.isnan(l_cert):
        reason = "not finite: " + reason
    else:
        reason = "unbounded: " + reason
    return NetworkResult(lipschitz_bound=None, lipschitz_estimate=None, bounded=False,
                         certified=False, reason=reason)


# --------------------------------------------------------------------------- disjoint parts
#
# Why a Concat of branches that read disjoint slices of one value costs the max of the
# branches' constants, not the root of the sum of their squares.
#
# Say a_k = g_k(P_k s) for k = 1..n, where s is one value, P_k picks the entries S_k of s
# (no entry twice) and the sets S_k are pairwise disjoint. Then for two network inputs
# x, x' and Δ the difference of whatever follows them,
#
#     |Δ concat(a_1..a_n)|² = Σ_k |Δ a_k|² <= Σ_k c_k² |Δ s[S_k]|² <= max_k c_k² |Δ s|²
#                           <= (max_k c_k)² L(s)² |Δ x|²,
#
# with c_k a Lipschitz constant of g_k (disjointness gives Σ_k |Δ s[S_k]|² <= |Δ s|²). So
# L(concat) = max_k c_k L(s). Propagation already holds c_k L(s): when every value a_k is
# computed from goes back to s and nothing else (a_k "has s as its source"), L(a_k) is
# c_k L(s) with c_k what propagating from L(s) = 1 would give (each op's L is a
# combination of factor * L(input), homogeneous of degree 1 in L(s)), and that c_k is a
# Lipschitz constant of a_k as a function of s[S_k] because each factor is one for its op.
# Hence L(concat) = max_k L(a_k). Inputs of other sources, or whose entries overlap, fall
# in other groups, and the groups combine with the l2 rule (each group is one block of the
# output): sqrt(Σ_groups (max_{k in group} L(a_k))²). The same holds for a network's
# several outputs, and for its several inputs taken as one vector (the INPUTS source).
#
# ``value_parts`` finds, for every value v, the source s and the entries S_v it reads:
# - a network input is entry k of INPUTS;
# - Slice, Split and Gather of a value u start a new source u, with S the entries picked;
#   they, Transpose, reshapes and Concat of such pure selections (every entry a copy of one
#   entry of s, none twice, factor 1 so L = L(s)) carry an index map back to s, so a
#   selection of a selection still refers to the first source;
# - any other op: the union of its data inputs' parts, when they all have one source (and
#   the values its rule measured it from, if any, are that source or of it); else none.
# A value without a part is only ever combined with the plain l2 rule, which is always sound.

INPUTS = ""  # the source of the network inputs taken together (no value is named '')
MAX_PART_ELEMENTS = 1 << 22  # values larger than this do not become sources of parts
# All index maps and masks together hold at most this many entries (1-byte masks, 4-byte
# indices: a few hundred MB at worst); past it, values get no new parts (the l2 rule).
MAX_PART_ENTRIES = 1 << 26
SUBSET_OPS = frozenset({"Slice", "Split", "Gather"})
RESHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
SAME_OPS = frozenset({"Identity", "Cast", "CastLike", "Dropout"})


@dataclass
class Part:
    """A value depends on the network input only through the entries ``mask`` (a bool per
    flat entry) of ``source``. ``index``: for a pure selection of source, the flat source
    index each entry is a copy of (-1: a constant entry)."""

    source: str
    mask: np.ndarray
    index: np.ndarray | None = None


@dataclass
class _Group:
    source: str | None  # None: a value without a part, alone in its group
    covered: np.ndarray | None
    term: float
    members: int = 1


def _groups(terms: list[float], values: list[str], parts: dict[str, Part]) -> list[_Group]:
    """Greedy: each term joins the first group of its source whose entries it does not
    overlap, else opens a new one."""
    groups: list[_Group] = []
    for t, v in zip(terms, values):
        if t == 0.0:
            continue
        part = parts.get(v)
        if part is None:
            groups.append(_Group(None, None, t))
            continue
        for g in groups:
            if g.source == part.source and g.covered is not None and not np.any(g.covered & part.mask):
                g.covered, g.term, g.members = g.covered | part.mask, max(g.term, t), g.members + 1
                break
        else:
            groups.append(_Group(part.source, part.mask, t))
    return groups


def _blocks(terms: list[float], values: list[str], parts: dict[str, Part]) -> float:
    """The l2 rule over groups of inputs that read disjoint parts of one source, each group
    counting with the max of its members' terms (see the comment above)."""
    if any(math.isnan(t) for t in terms):
        return math.nan
    return _combine("l2", [g.term for g in _groups(terms, values, parts)])


def _concat_note(graph: Graph, node: Node, outcome: Outcome, lip: dict[str, float],
                 parts: dict[str, Part]) -> str:
    used = [outcome.sources.get(pos, node.inputs[pos]) for pos in outcome.factors]
    terms = [_term(f, lip.get(v, 0.0)) for f, v in zip(outcome.factors.values(), used)]
    groups = _groups(terms, used, parts)
    joined = [g for g in groups if g.members > 1]
    if not joined:
        return "L = sqrt of the sum of squared input bounds"
    named = sorted({"the network inputs" if g.source == INPUTS else
                    f"'{graph.producer[g.source].name if g.source in graph.producer else g.source}'"
                    for g in joined})
    note = f"L = max of the input bounds that read disjoint parts of {', '.join(named)} (block-diagonal)"
    return note if len(groups) == 1 else note + "; the rest combine as the root of the sum of squares"


def value_parts(graph: Graph, steps: list[tuple[Node, Outcome]]) -> dict[str, Part]:
    """For every value that has one, the source it is a function of and the entries it reads
    (see the comment above)."""
    parts: dict[str, Part] = {}
    room = [MAX_PART_ENTRIES]  # entries left to allocate
    for k, name in enumerate(graph.inputs):
        mask = np.zeros(len(graph.inputs), dtype=bool)
        mask[k] = True
        parts[name] = Part(INPUTS, mask)
    for node, outcome in steps:
        found = _selected(graph, node, outcome, parts) if room[0] > 0 else None
        if found is None:
            found = [_union(graph, node, outcome, parts, room)] * len(node.outputs)
        else:
            room[0] -= sum(p.mask.size + (p.index.size if p.index is not None else 0)
                           for p in found if p is not None)
        for out, part in zip(node.outputs, found):
            if out and part is not None:
                parts[out] = part
    return parts


def _union(graph: Graph, node: Node, outcome: Outcome, parts: dict[str, Part],
           room: list[int]) -> Part | None:
    """What the op's outputs read: the union of what its data inputs read, when they have
    one source. A rule may measure its op from an earlier value w (a conv together with the
    Slice before it: the factor is the norm of conv o Slice and multiplies L(w)); then w must
    be that source, or a value of the same source, for L(out) to stay (constant) * L(source)."""
    if node.has_subgraph or node.domain:
        return None  # a subgraph may read outer values that are not among the node's inputs
    found = [parts.get(v) for v in node.inputs if v and v not in graph.static]
    known = [p for p in found if p is not None]
    if not known or len(known) != len(found) or len({p.source for p in known}) != 1:
        return None
    source = known[0].source
    for w in outcome.sources.values():
        measured_from = parts.get(w)
        if w != source and (measured_from is None or measured_from.source != source):
            return None
    masks = list({id(p.mask): p.mask for p in known}.values())
    if len(masks) == 1:
        return Part(source, masks[0])
    room[0] -= masks[0].size
    return Part(source, np.logical_or.reduce(masks)) if room[0] > 0 else None


def _selected(graph: Graph, node: Node, outcome: Outcome,
              parts: dict[str, Part]) -> list[Part | None] | None:
    """The parts of a pure selection's outputs, with their index maps; None when the node is
    not one (or its indices cannot be worked out)."""
    if node.domain or outcome.unbounded is not None or outcome.sources \
            or any(f != 1.0 for f in outcome.factors.values()):
        return None
    try:
        if node.op == "Concat":
            return _concat_index(graph, node, parts)
        if node.op not in SUBSET_OPS | RESHAPE_OPS | SAME_OPS | {"Transpose"} or set(outcome.factors) != {0}:
            return None
        data = node.inputs[0]
        part = parts.get(data)
        shape = graph.known_shape(data)
        if part is not None and part.index is not None:
            source, size, index = part.source, part.mask.size, part.index
        elif node.op in SUBSET_OPS and shape is not None and math.prod(shape) <= MAX_PART_ELEMENTS:
            source, size = data, math.prod(shape)
            index = np.arange(size, dtype=np.int32).reshape(shape)  # size < 2^31
        else:
            return None
        moved = _move(graph, node, index)
        if moved is None:
            return None
        out = [_pure(graph, name, source, size, idx) if idx is not None else None
               for name, idx in zip(node.outputs, moved)]
    except (ValueError, IndexError, TypeError, OverflowError, KeyError):
        return None  # attributes or constants that do not make sense: not a selection
    return None if any(p is None and idx is not None for p, idx in zip(out, moved)) else out


def _pure(graph: Graph, name: str, source: str, size: int, index: np.ndarray) -> Part | None:
    """A pure selection's part, or None when ``index`` disagrees with the value's known
    shape or copies an entry twice."""
    known = graph.known_shape(name) if name else None
    if known is not None and tuple(index.shape) != known:
        return None
    hit = index[index >= 0]
    mask = np.zeros(size, dtype=bool)
    mask[hit] = True
    # A copy: a view would keep the whole index array it was cut from alive.
    return Part(source, mask, index.copy()) if np.count_nonzero(mask) == hit.size else None


def _ints(graph: Graph, node: Node, k: int) -> list[int] | None:
    c = graph.const(node.inputs[k]) if k < len(node.inputs) and node.inputs[k] else None
    return None if c is None else [int(v) for v in c.reshape(-1)]


def _axis(value: int, ndim: int) -> int:
    if not -ndim <= value < ndim:
        raise ValueError(f"axis {value} for rank {ndim}")
    return value % ndim


def _onnx_slice(start: int, end: int, step: int, dim: int) -> slice:
    """ONNX Slice's clamping (negative indices count from the end; with a negative step the
    end may be -1, before the first entry) as a Python slice."""
    if step == 0:
        raise ValueError("Slice step 0")
    start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
    if step > 0:
        return slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return slice(start, None if end < 0 else end, step)


def _move(graph: Graph, node: Node, index: np.ndarray) -> list[np.ndarray | None] | None:
    """What the selection op does to an array of source indices: its output(s)."""
    op, attrs = node.op, node.attrs
    if op in SAME_OPS:
        return [index] + [None] * (len(node.outputs) - 1)  # Dropout's mask is no selection
    if op in RESHAPE_OPS:  # row-major, like every ONNX reshape
        shape = graph.known_shape(node.outputs[0])
        return None if shape is None or math.prod(shape) != index.size else [index.reshape(shape)]
    if op == "Transpose":
        perm = attrs.get("perm")
        return [np.transpose(index, list(reversed(range(index.ndim))) if perm is None else [int(p) for p in perm])]
    if op == "Gather":
        return _gather(graph, node, index)
    if op == "Split":
        return _split(graph, node, index)
    if op == "Slice":
        return _slice(graph, node, index)
    return None


def _gather(graph: Graph, node: Node, index: np.ndarray) -> list[np.ndarray | None] | None:
    picks = graph.const(node.inputs[1])
    axis = _axis(int(node.attrs.get("axis", 0)), index.ndim)
    if picks is None or not np.issubdtype(picks.dtype, np.integer):
        return None
    dim = index.shape[axis]
    if picks.size and (picks.min() < -dim or picks.max() >= dim):
        return None
    return [np.take(index, np.where(picks < 0, picks + dim, picks).astype(np.intp), axis=axis)]


def _split(graph: Graph, node: Node, index: np.ndarray) -> list[np.ndarray | None] | None:
    axis = _axis(int(node.attrs.get("axis", 0)), index.ndim)
    dim, n = index.shape[axis], len(node.outputs)
    if len(node.inputs) > 1 and node.inputs[1]:
        sizes = _ints(graph, node, 1)
    else:
        given = node.attrs.get("split")  # opset < 13
        sizes = None if given is None else [int(v) for v in given]
    if sizes is None:
        if len(node.inputs) > 1 and node.inputs[1]:
            return None  # sizes computed at run time
        chunk = -(-dim // n)  # equal parts; with num_outputs (opset 18) the last may be smaller
        sizes = [chunk] * (n - 1) + [dim - chunk * (n - 1)]
    if len(sizes) != n or sum(sizes) != dim or min(sizes) < 0:
        return None
    return list(np.split(index, np.cumsum(sizes)[:-1], axis=axis))


def _slice(graph: Graph, node: Node, index: np.ndarray) -> list[np.ndarray | None] | None:
    attrs = node.attrs
    steps: list[int] | None = None
    if "starts" in attrs:  # opset < 10
        starts, ends = [int(v) for v in attrs["starts"]], [int(v) for v in attrs["ends"]]
        given = attrs.get("axes")
        axes = None if given is None else [int(v) for v in given]
    else:
        got_starts, got_ends, axes, steps = (_ints(graph, node, k) for k in (1, 2, 3, 4))
        if got_starts is None or got_ends is None or any(
                k < len(node.inputs) and node.inputs[k] and v is None for k, v in ((3, axes), (4, steps))):
            return None
        starts, ends = got_starts, got_ends
    axes = list(range(len(starts))) if axes is None else [_axis(a, index.ndim) for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    if not len(starts) == len(ends) == len(axes) == len(steps) or len(set(axes)) != len(axes):
        return None
    picks = [slice(None)] * index.ndim
    for a, b, e, st in zip(axes, starts, ends, steps):
        picks[a] = _onnx_slice(b, e, st, index.shape[a])
    return [index[tuple(picks)]]


def _concat_index(graph: Graph, node: Node, parts: dict[str, Part]) -> list[Part | None] | None:
    """Concat of pure selections of one source (and constants) is one too."""
    pieces, source, size = [], None, 0
    for v in node.inputs:
        if not v:
            continue
        if v in graph.static:
            shape = graph.known_shape(v)
            if shape is None:
                return None
            pieces.append(np.full(shape, -1, dtype=np.int32))
            continue
        part = parts.get(v)
        if part is None or part.index is None or source not in (None, part.source):
            return None
        source, size = part.source, part.mask.size
        pieces.append(part.index)
    if source is None:
        return None
    axis = _axis(int(node.attrs["axis"]), pieces[0].ndim)
    found = _pure(graph, node.outputs[0], source, size, np.concatenate(pieces, axis=axis))
    return None if found is None else [found]
