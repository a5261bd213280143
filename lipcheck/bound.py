"""Composition of per-op constants into a bound on the whole network.

L(v) bounds the Lipschitz constant from the network input to value v:
L(input) = 1, L(constant) = 0, and for each op L(out) = combine(factor_i * L(in_i)),
where combine is a sum (Add, Gemm with a data bias) or the l2 rule (Concat).
Sequential ops multiply, so on a chain the bound is the product of the per-op
constants. An op without a finite bound makes L(out) infinite, and so the network
bound, with the reason kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .aliases import ProgressFn
from .graph import Graph, Node
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


def _apply(outcome: Outcome, factors: dict[int, float], lip: dict[str, float],
           inputs: list[str]) -> float:
    terms = []
    for pos, f in factors.items():
        l_in = lip.get(outcome.sources.get(pos, inputs[pos]), 0.0)
        # 0 * inf: an input that is ignored (factor 0) contributes nothing.
        terms.append(0.0 if f == 0.0 or l_in == 0.0 else f * l_in)
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

    cert, est = propagate(graph, result.steps)
    absorbed = {name for _, outcome in result.steps for name in outcome.absorbs}
    # An op that turned out to be part of a recognised activation (the comparison inside
    # torch's Softplus) neither blocks the bound nor counts as skipped.
    result.reasons = [r for r, name in zip(result.reasons, reason_nodes) if name not in absorbed]
    result.skipped = [s for s in result.skipped if s.name not in absorbed]
    for node, outcome in result.steps:
        if outcome.row is not None and node.name not in absorbed:
            outcome.row.bound = cert[node.outputs[0]]
            if outcome.unbounded is not None:
                outcome.row.note = outcome.unbounded
            result.rows.append(outcome.row)
        result.rows.extend(outcome.extra_rows)
        if math.isnan(cert[node.outputs[0]]) and not any("not finite" in r for r in result.reasons):
            result.reasons.append(f"{node.name}: weights with NaN or Inf make the bound not finite")
    result.network = _network(graph, cert, est, result.reasons)
    return result


def propagate(graph: Graph, steps: list[tuple[Node, Outcome]],
              multipliers: dict[str, float] | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """L of every value, certified and estimated; ``multipliers`` scales an op's constants
    by name (what rescaling that op's weight by the same factor does to them)."""
    cert: dict[str, float] = {name: 1.0 for name in graph.inputs}
    est: dict[str, float] = dict(cert)
    for node, outcome in steps:
        if outcome.unbounded is not None:
            l_cert = l_est = math.inf
        else:
            m = (multipliers or {}).get(node.name, 1.0)
            l_cert = m * _apply(outcome, outcome.factors, cert, node.inputs)
            l_est = m * _apply(outcome, outcome.est_factors or outcome.factors, est, node.inputs)
        for out in node.outputs:
            if out:
                cert[out], est[out] = l_cert, l_est
    return cert, est


def network_bound(graph: Graph, steps: list[tuple[Node, Outcome]],
                  multipliers: dict[str, float]) -> float:
    """The certified network bound with some ops' constants rescaled (no rule re-run)."""
    cert, _ = propagate(graph, steps, multipliers)
    return _combine("l2", [cert.get(o, 0.0) for o in graph.outputs if o])


def _network(graph: Graph, cert: dict[str, float], est: dict[str, float],
             reasons: list[str]) -> NetworkResult:
    """Several outputs: the map to their concatenation, sqrt of the sum of squares."""
    outs = [o for o in graph.outputs if o]
    l_cert = _combine("l2", [cert.get(o, 0.0) for o in outs])
    l_est = _combine("l2", [est.get(o, 0.0) for o in outs])
    if math.isfinite(l_cert):
        return NetworkResult(
            lipschitz_bound=l_cert, lipschitz_estimate=l_est, bounded=True, certified=True,
            reason="certified: composed from per-layer upper bounds",
        )
    relevant = [r for r in reasons] or ["an op on the path to the output has no finite bound"]
    reason = "; ".join(relevant[:3]) + (f"; and {len(relevant) - 3} more" if len(relevant) > 3 else "")
    if math.isnan(l_cert):
        reason = "not finite: " + reason
    else:
        reason = "unbounded: " + reason
    return NetworkResult(lipschitz_bound=None, lipschitz_estimate=None, bounded=False,
                         certified=False, reason=reason)
