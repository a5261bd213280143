"""Consecutive linear maps measured as one: Gemm/MatMul -> (bias) -> Gemm/MatMul.

Two matrix products with nothing but a constant shift between them are, on differences,
x -> W2 W1 x: the shift cancels, and a product applied along the last axis of a tensor of
tokens is block-diagonal over the tokens, so its constant is the norm of the one matrix. The
norm of the product can be far below the product of the norms (a rank-deficient W1 meeting
W2's small directions; a factorised layer), so the pair is measured as one operator.

As with folding (:mod:`lipcheck.fold`): the first op keeps its row and constant; the second's
factor becomes ||W2 W1||, taken from the first op's input (``Outcome.sources``), and names
the first op in ``Outcome.folds`` (rescaling W1 by t rescales the merged factor by t, as
normalize assumes). The merged norm always gets the deterministic certificate (float64
Gram + Cholesky), so a merge never turns a certified bound into a probabilistic one; it is
used only when tighter than the product of the two constants, and only when the product
costs at most MAX_FLOPS to form and certify.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from . import spectral
from .chains import data_inputs, is_shift, linear_weight, only_consumer
from .graph import Graph, Node
from .rules import Context, Outcome

MAX_FLOPS = 2e9  # forming W2 W1 and certifying it: about a second on 2 CPU cores


def merge_linear(ctx: Context, graph: Graph, steps: list[tuple[Node, Outcome]]) -> list[str]:
    """Replace, in ``steps``, the outcome of each second op of a mergeable pair by the pair's
    (see the module docstring). Returns the names of the second ops."""
    index = {node.name: k for k, (node, _) in enumerate(steps)}
    merged: list[str] = []
    for first, first_out in list(steps):
        if first.op not in ("Gemm", "MatMul") or first_out.unbounded is not None or first_out.sources:
            continue
        data1 = data_inputs(graph, first)
        w1 = linear_weight(ctx, first, data1)
        if w1 is None or set(first_out.factors) != {0}:
            continue
        end = first
        nxt = only_consumer(graph, end.outputs[0])
        if nxt is not None and is_shift(graph, nxt, end.outputs[0]):
            end, nxt = nxt, only_consumer(graph, nxt.outputs[0])
        if nxt is None or nxt.op not in ("Gemm", "MatMul") or nxt.name not in index:
            continue
        if ctx.start is not None and any(ctx.start in n.outputs for n in (first, end)):
            continue  # --from between the two
        second, second_out = steps[index[nxt.name]]
        if second_out.unbounded is not None or second_out.sources or set(second_out.factors) != {0}:
            continue
        w2 = linear_weight(ctx, second, data_inputs(graph, second))
        if w2 is None or w2.shape[1] != w1.shape[0]:
            continue
        m, k, n = w2.shape[0], w1.shape[0], w1.shape[1]
        if m * k * n + min(m, n) ** 3 > MAX_FLOPS:
            continue
        product = torch.from_numpy(w2).double() @ torch.from_numpy(w1).double()
        bound = spectral.dense_bound(product, replace(ctx.settings, certify="exact"))
        value = bound.upper.value
        if not (math.isfinite(value) and value < first_out.factors[0] * second_out.factors[0]):
            continue
        est = min(bound.estimate.sigma, value)
        if second_out.row is not None:
            text = (f"merged with {first.name} before it: the bound uses the norm of the product, "
                    f"{value:.6g} from {first.name}'s input, in place of {first_out.factors[0]:.6g} x "
                    f"{second_out.factors[0]:.6g}")
            second_out.row.note = f"{second_out.row.note}; {text}" if second_out.row.note else text
        steps[index[second.name]] = (second, Outcome(
            factors={0: value}, est_factors={0: est}, combine=second_out.combine, row=second_out.row,
            extra_rows=second_out.extra_rows, sources={0: first.inputs[data1[0]]}, absorbs=second_out.absorbs,
            folds=[first.name, *second_out.folds]))
        merged.append(second.name)
    return merged
