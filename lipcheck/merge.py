"""Consecutive linear maps measured as one: Gemm/MatMul -> (bias) -> Gemm/MatMul, and 1x1 Conv
-> 1x1 Conv, with eval BatchNorms or per-channel constant Muls between them.

Two matrix products with nothing but constant shifts and per-channel scales between them are,
on differences, x -> W2 diag(s) W1 x: the shifts cancel, and a product applied along the last
axis of a tensor of tokens is block-diagonal over the tokens, so its constant is the norm of
the one matrix. The same holds for two 1x1 convolutions with one group (a MobileNet block's
projection followed by the next block's expansion): each applies its (out, in) matrix at every
pixel (strides only drop pixels, padding only adds pixels whose differences are 0), so the pair
is W2 diag(s) W1 at every kept pixel, of norm ||W2 diag(s) W1||. The norm of the product can be
far below the product of the norms (a rank-deficient W1 meeting W2's small directions; a
factorised layer), so the pair is measured as one operator.

As with folding (:mod:`lipcheck.fold`): the first op keeps its row and constant; the second's
factor becomes ||W2 diag(s) W1||, taken from the first op's input (``Outcome.sources``), and
names the first op and the scales in ``Outcome.folds`` (rescaling W1 by t rescales the merged
factor by t, as normalize assumes). The merged norm always gets the deterministic certificate
(float64 Gram + Cholesky), so a merge never turns a certified bound into a probabilistic one;
it is used only when tighter than the product of the constants it replaces, and only when the
product costs at most MAX_FLOPS to form and certify.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from . import spectral
from .chains import data_inputs, is_shift, linear_weight, only_consumer
from .fold import channel_scale
from .graph import Graph, Node
from .rules import Context, Outcome

MAX_FLOPS = 2e9  # forming W2 W1 and certifying it: about a second on 2 CPU cores


def pointwise_weight(ctx: Context, node: Node, data: list[int]) -> np.ndarray | None:
    """The (out, in) matrix of a 1x1 Conv with one group whose only data input is X."""
    if node.op != "Conv" or data != [0] or int(node.attrs.get("group", 1)) != 1:
        return None
    w = ctx.graph.const(node.inputs[1])
    if w is None or w.ndim < 3 or any(d != 1 for d in w.shape[2:]):
        return None
    return w.reshape(w.shape[0], w.shape[1]).astype(np.float64)


def _weight(ctx: Context, node: Node, data: list[int]) -> np.ndarray | None:
    return pointwise_weight(ctx, node, data) if node.op == "Conv" else linear_weight(ctx, node, data)


def _path_factor(first: Node, first_out: Outcome, between: list[Node], outcome_of: dict[str, Outcome],
                 data1: list[int]) -> float:
    """The constant from the first op's input to the last op between the pair, as the
    composition would take it today: each op's factor times the constant of the value it is
    measured from (a BatchNorm already folded into the first op is measured from that op's
    input, so the pair is not counted twice)."""
    lip = {first.inputs[data1[0]]: 1.0, first.outputs[0]: first_out.factors[0]}
    for node in between:
        out = outcome_of[node.name]
        value = max((factor * lip.get(out.sources.get(pos, node.inputs[pos]), math.inf)
                     for pos, factor in out.factors.items() if factor), default=0.0)
        lip[node.outputs[0]] = value
    return lip[(between[-1] if between else first).outputs[0]]


def merge_linear(ctx: Context, graph: Graph, steps: list[tuple[Node, Outcome]]) -> list[str]:
    """Replace, in ``steps``, the outcome of each second op of a mergeable pair by the pair's
    (see the module docstring). Returns the names of the second ops."""
    index = {node.name: k for k, (node, _) in enumerate(steps)}
    outcome_of = {node.name: outcome for node, outcome in steps}
    merged: list[str] = []
    for first, first_out in list(steps):
        if first.op not in ("Gemm", "MatMul", "Conv") or first_out.unbounded is not None or first_out.sources:
            continue
        data1 = data_inputs(graph, first)
        w1 = _weight(ctx, first, data1)
        if w1 is None or set(first_out.factors) != {0}:
            continue
        end = first
        nxt = only_consumer(graph, end.outputs[0])
        if nxt is not None and first.op != "Conv" and is_shift(graph, nxt, end.outputs[0]):
            end, nxt = nxt, only_consumer(graph, nxt.outputs[0])
        between: list[Node] = [end] if end is not first else []
        scale = np.ones(w1.shape[0])
        # channel scales act on axis 1: the features of a conv's output, and of a Gemm/MatMul
        # output only when it is 2-D (in a (batch, tokens, features) tensor axis 1 is the tokens)
        per_feature = first.op == "Conv" or len(graph.known_shape(first.outputs[0]) or ()) == 2
        while per_feature and nxt is not None and nxt.op not in ("Gemm", "MatMul", "Conv"):
            found = channel_scale(ctx, nxt)
            out = outcome_of.get(nxt.name)
            if found is None or out is None or out.unbounded is not None or found[1].size != scale.size \
                    or nxt.inputs[found[0]] != end.outputs[0]:
                break
            scale = scale * found[1]
            between.append(nxt)
            end, nxt = nxt, only_consumer(graph, nxt.outputs[0])
        if nxt is None or nxt.op not in ("Gemm", "MatMul", "Conv") or nxt.op != first.op and "Conv" in (
                nxt.op, first.op) or nxt.name not in index:
            continue
        if ctx.start is not None and any(ctx.start in n.outputs for n in (first, *between)):
            continue  # --from between the two
        second, second_out = steps[index[nxt.name]]
        if second_out.unbounded is not None or second_out.sources or set(second_out.factors) != {0}:
            continue
        w2 = _weight(ctx, second, data_inputs(graph, second))
        if w2 is None or w2.shape[1] != w1.shape[0] or second.inputs[data_inputs(graph, second)[0]] != end.outputs[0]:
            continue
        m, k, n = w2.shape[0], w1.shape[0], w1.shape[1]
        if m * k * n + min(m, n) ** 3 > MAX_FLOPS:
            continue
        product = torch.from_numpy(w2 * scale[None, :]).double() @ torch.from_numpy(w1).double()
        bound = spectral.dense_bound(product, replace(ctx.settings, certify="exact"))
        value = bound.upper.value
        replaced = _path_factor(first, first_out, between, outcome_of, data1) * second_out.factors[0]
        if not (math.isfinite(value) and value < replaced):
            continue
        est = min(bound.estimate.sigma, value)
        if second_out.row is not None:
            via = f" through {', '.join(b.name for b in between)}" if between else ""
            text = (f"merged with {first.name} before it{via}: the bound uses the norm of the product, "
                    f"{value:.6g} from {first.name}'s input, in place of {replaced:.6g}")
            second_out.row.note = f"{second_out.row.note}; {text}" if second_out.row.note else text
        steps[index[second.name]] = (second, Outcome(
            factors={0: value}, est_factors={0: est}, combine=second_out.combine, row=second_out.row,
            extra_rows=second_out.extra_rows, sources={0: first.inputs[data1[0]]}, absorbs=second_out.absorbs,
            folds=[first.name, *(b.name for b in between), *second_out.folds]))
        merged.append(second.name)
    return merged
