"""Facts about ONNX ops that several modules need, in one place.

Which input of an op holds its weight, which weights ``normalize`` may rescale, and which
row kinds a gate looks at. The Lipschitz rules themselves live in :mod:`lipcheck.rules`.
"""

from __future__ import annotations

from typing import Protocol

from .report import RowKind

# Op -> the input that holds its weight. None: the constant operand of a product (input 1,
# else input 0), as exporters put ``x @ W`` and ``W @ x`` both as MatMul/Gemm.
WEIGHT_INPUT: dict[str, int | None] = {
    "Conv": 1, "ConvTranspose": 1, "BatchNormalization": 1, "PRelu": 1,
    "LSTM": 1, "GRU": 1, "RNN": 1,
    "Gemm": None, "MatMul": None,
}
# Ops whose weight scales their output linearly, so normalize can rescale them.
RESCALABLE = frozenset({"Conv", "ConvTranspose", "BatchNormalization", "Gemm", "MatMul"})
# Row kinds that carry a weight: what gates check and baselines compare.
GATED_KINDS = frozenset({RowKind.LINEAR, RowKind.CONV, RowKind.DIAGONAL, RowKind.RECURRENT})


class _Node(Protocol):
    op: str
    inputs: list[str]


def weight_input(node: _Node, static: set[str] | frozenset[str]) -> int | None:
    """The position of the node's weight input, or None (no weight, or a product of two
    values that depend on the network input). ``static``: values that do not."""
    if node.op not in WEIGHT_INPUT:
        return None
    slot = WEIGHT_INPUT[node.op]
    if slot is not None:
        return slot if slot < len(node.inputs) else None
    consts = [k for k in (1, 0) if k < len(node.inputs) and node.inputs[k] in static]
    return consts[0] if consts else None
