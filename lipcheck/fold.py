"""Folding per-channel affine maps into the linear op before them (or, where there is none,
after them).

An eval BatchNorm (or a Mul by a per-channel constant) right after a Conv, Gemm or MatMul
multiplies that op's output channels by s: together they are x -> diag(s) A x (+ a
constant). The norm of that product can be much smaller than ||diag(s)|| ||A|| (the
largest scale may sit on a channel A barely reaches), so the pair is measured as one
operator, with the folded weight diag(s) W (a conv on its real input size, through the
conv rule itself).

Where the constant goes: the linear op keeps its own row and constant (its output is still
bounded by them); the scaling op's factor becomes the folded norm, taken from the linear
op's input (``Outcome.sources``), so L(after the pair) = ||diag(s) A|| L(before the pair).
Its row keeps its own sigma and lipschitz (what normalize rescales and checks) and says in
its note that the bound uses the pair's constant. A fold is used only when it is tighter
than the product of the two constants, and only when the linear op's output feeds nothing
else (a branch off it would need A's constant alone, which the linear op's row still
supplies).
"""

from __future__ import annotations

import math

import numpy as np

from .graph import Graph, Node
from .rules import Context, Outcome
from .rules.linear import batchnorm_scale, fold_input_scale, fold_scale

LINEAR_OPS = frozenset({"Conv", "Gemm", "MatMul"})


def channel_scale(ctx: Context, node: Node) -> tuple[int, np.ndarray] | None:
    """(the data input's position, the per-channel factor) of a BatchNorm or of a Mul by a
    constant that varies along axis 1 only and does not broadcast the data."""
    g = ctx.graph
    if node.op == "BatchNormalization":
        s = batchnorm_scale(ctx, node)
        return None if s is None else (0, s)
    if node.op != "Mul" or len(node.inputs) != 2:
        return None
    consts = [g.const(v) for v in node.inputs]
    if (consts[0] is None) == (consts[1] is None):
        return None
    pos = 0 if consts[1] is not None else 1
    c = consts[1 - pos]
    x_shape, out_shape = g.known_shape(node.inputs[pos]), g.known_shape(node.outputs[0])
    if c is None or x_shape is None or x_shape != out_shape or len(x_shape) < 2 or c.ndim > len(x_shape):
        return None
    aligned = (1,) * (len(x_shape) - c.ndim) + tuple(c.shape)
    if any(d != 1 for k, d in enumerate(aligned) if k != 1) or not np.issubdtype(c.dtype, np.number):
        return None
    s = np.broadcast_to(c.astype(np.float64).reshape(-1), (x_shape[1],)).copy()
    return (pos, s) if np.isfinite(s).all() else None


def fold_affine(ctx: Context, graph: Graph, steps: list[tuple[Node, Outcome]]) -> list[str]:
    """Replace, in ``steps``, the outcome of each foldable scaling op by the folded pair's
    (see the module docstring). Returns the names of the linear ops folded into."""
    outcome_of = {node.name: outcome for node, outcome in steps}
    absorbed = {name for _, outcome in steps for name in outcome.absorbs}
    folded_into: list[str] = []
    for k, (node, outcome) in enumerate(steps):
        if outcome.unbounded is not None or node.domain or node.name in absorbed:
            continue
        found = channel_scale(ctx, node)
        if found is None:
            continue
        pos, s = found
        x = node.inputs[pos]
        producer = graph.producer.get(x)
        if producer is None or producer.op not in LINEAR_OPS or producer.domain \
                or producer.name not in outcome_of or x in graph.outputs or x == ctx.start:
            continue  # (--from between the two: the pair cannot be measured as one)
        before = outcome_of[producer.name]
        if before.unbounded is not None or set(before.factors) != {0} or before.combine != "sum" \
                or len(graph.consumers.get(x, [])) != 1 or pos not in outcome.factors:
            continue
        data = [i for i, v in enumerate(producer.inputs) if v and v not in graph.static]
        pair = fold_scale(ctx, producer, data, s)
        if _use_pair(steps, k, pos, pair, (before.factors[0], outcome.factors[pos]), producer.name,
                     producer.inputs[0]):
            outcome_of[node.name] = steps[k][1]
            folded_into.append(producer.name)
    return folded_into + _fold_forward(ctx, graph, steps)


def _use_pair(steps: list[tuple[Node, Outcome]], k: int, pos: int, pair: Outcome | None,
              separate: tuple[float, float], partner: str, source: str) -> bool:
    """Give steps[k] the pair's constant at input ``pos`` when it is finite and below the
    product of the two ``separate`` constants (in path order), measured from the value the
    pair's measurement names (a pad it absorbed) or else ``source``; its row keeps its own
    numbers and says what the bound used. ``partner``: the other op of the pair (in
    ``Outcome.folds``). Returns whether it did."""
    if pair is None or set(pair.factors) != {0} or not math.isfinite(pair.factors[0]):
        return False
    node, outcome = steps[k]
    value = pair.factors[0]
    if not value < separate[0] * separate[1]:
        return False
    if outcome.row is not None:
        text = (f"folded with {partner} before it: the bound uses the norm of the pair, {value:.6g} from "
                f"{partner}'s input, in place of {separate[0]:.6g} x "
                f"{separate[1]:.6g}")
        outcome.row.note = f"{outcome.row.note}; {text}" if outcome.row.note else text
    steps[k] = (node, Outcome(
        factors={pos: value}, est_factors={pos: (pair.est_factors or pair.factors)[0]}, combine=outcome.combine,
        row=outcome.row, extra_rows=outcome.extra_rows, sources={pos: pair.sources.get(0, source)},
        absorbs=outcome.absorbs,
        folds=[partner, *outcome.folds],
    ))
    return True


def _fold_forward(ctx: Context, graph: Graph, steps: list[tuple[Node, Outcome]]) -> list[str]:
    """A scaling op that was not folded into the op before it, read only by a linear op (a
    BatchNorm on a network's input before its first conv; BatchNorm1d between a ReLU and a
    Linear): the pair x -> A diag(s) x measured as one, as the linear op's factor from the
    scaling op's input. Returns the names of the linear ops folded into."""
    index = {node.name: k for k, (node, _) in enumerate(steps)}
    absorbed = {name for _, outcome in steps for name in outcome.absorbs}
    folded_into: list[str] = []
    for node, outcome in list(steps):
        if outcome.unbounded is not None or node.domain or node.name in absorbed or outcome.sources:
            continue
        found = channel_scale(ctx, node)
        if found is None:
            continue
        pos, s = found
        y = node.outputs[0]
        users = graph.consumers.get(y, [])
        if len(users) != 1 or y in graph.outputs or y == ctx.start or pos not in outcome.factors:
            continue
        consumer = users[0]
        if consumer.op not in LINEAR_OPS or consumer.domain or consumer.name not in index:
            continue
        after = steps[index[consumer.name]][1]
        data = [i for i, v in enumerate(consumer.inputs) if v and v not in graph.static]
        if after.unbounded is not None or after.sources or set(after.factors) != {0} or after.combine != "sum" \
                or data != [0] or consumer.inputs[0] != y:
            continue
        pair = fold_input_scale(ctx, consumer, data, s)
        if _use_pair(steps, index[consumer.name], 0, pair, (outcome.factors[pos], after.factors[0]), node.name,
                     node.inputs[pos]):
            folded_into.append(consumer.name)
    return folded_into
