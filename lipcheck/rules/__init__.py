"""Per-op Lipschitz rules: one small function per ONNX op type, found by name.

A rule receives the node and which of its inputs carry data (depend on the
network input) and returns an ``Outcome``: the constant by which each data input
is multiplied, how several inputs combine, and the row to report. What it cannot
bound it says so (``unbounded``), and ops without a rule are reported as skipped.
Adding an op is adding one function here and one test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..graph import Graph, Node
from ..interval import Boxes
from ..report import LayerRow
from ..spectral import Settings

# "sum" (Add: L_a + L_b), "l2" (sqrt(L_a² + L_b²)) or "concat" (the output is the inputs side
# by side: l2, or their max where they read disjoint parts of one value; see lipcheck.bound)
CombineKind = str


@dataclass
class Outcome:
    """What one op does to the Lipschitz constants of its data inputs."""

    # data input position -> certified multiplier (upper bound on the op's constant)
    factors: dict[int, float]
    # the same with estimates in place of certificates (may be lower than factors)
    est_factors: dict[int, float] | None = None
    combine: CombineKind = "sum"
    row: LayerRow | None = None
    extra_rows: list[LayerRow] = field(default_factory=list)
    unbounded: str | None = None
    # data input position -> the value whose bound the factor multiplies, when the op
    # was measured together with ops before it (a conv with its padding)
    sources: dict[int, str] = field(default_factory=dict)
    # names of earlier ops that turned out to be internal parts of this one (the g(x) of
    # an x * g(x) activation): their rows are folded into this op's row
    absorbs: list[str] = field(default_factory=list)
    # names of earlier ops whose weights this op's factor includes (a BatchNorm folded into
    # the conv before it): rescaling one of them rescales this factor too
    folds: list[str] = field(default_factory=list)
    # for an activation recognised from several ops (x * sigmoid(x)): the range [a, b] of its
    # slopes as a function of its source value (chain certificates use it; None: not one)
    slopes: tuple[float, float] | None = None
    # the factors hold on the declared input domain only (lipcheck.rules.local)
    local: bool = False


@dataclass
class Context:
    graph: Graph
    settings: Settings
    fused: dict[str, Node] = field(default_factory=dict)  # Pad nodes folded into a conv
    # --from: the value the network bound starts at (None: the network input)
    start: str | None = None
    # with --input-range / --input-radius: the box of every value on that domain
    boxes: Boxes | None = None


Rule = Callable[[Context, Node, list[int]], Outcome]
RULES: dict[str, Rule] = {}


def rule(*ops: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn

    return register


def unbounded(reason: str, row: LayerRow | None = None) -> Outcome:
    return Outcome(factors={}, row=row, unbounded=reason)


def _load_all() -> None:
    from . import elementwise, linear, pooling  # noqa: F401  (registration side effects)


_load_all()
