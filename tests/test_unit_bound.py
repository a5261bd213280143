"""lipcheck.bound.propagate and network_bound on small hand-built graphs: each op's
outcome is written by hand, so the expected L of every value is arithmetic done here.

L(input) = 1, a value no op produced (a constant) has L = 0; sequential ops multiply,
``sum`` combines add (Add), ``l2`` combines take sqrt of the sum of squares (Concat)."""

from __future__ import annotations

import math

import pytest

from lipcheck.bound import network_bound, propagate
from lipcheck.graph import Graph, Node
from lipcheck.rules import Outcome

Step = tuple[Node, Outcome]


def op(name: str, inputs: list[str], outputs: list[str], outcome: Outcome) -> Step:
    return Node(index=0, name=name, op="Op", domain="", inputs=inputs, outputs=outputs, attrs={}), outcome


def graph(steps: list[Step], outputs: list[str], inputs: tuple[str, ...] = ("x",)) -> Graph:
    return Graph(nodes=[n for n, _ in steps], inputs=list(inputs), outputs=outputs)


def test_a_chain_multiplies() -> None:
    steps = [op("A", ["x"], ["h"], Outcome(factors={0: 2.0}, est_factors={0: 1.5})),
             op("B", ["h"], ["y"], Outcome(factors={0: 3.0}, est_factors={0: 2.5}))]
    cert, est = propagate(graph(steps, ["y"]), steps)
    assert (cert["x"], cert["h"], cert["y"]) == (1.0, 2.0, 6.0)
    assert (est["h"], est["y"]) == (1.5, 3.75)


def test_estimates_default_to_the_certified_factors() -> None:
    steps = [op("A", ["x"], ["y"], Outcome(factors={0: 2.0}))]
    cert, est = propagate(graph(steps, ["y"]), steps)
    assert cert["y"] == est["y"] == 2.0


def test_a_residual_sum_adds_the_branches() -> None:
    # y = B(A(x)) + x: L = 2 * 3 + 1
    steps = [op("A", ["x"], ["h"], Outcome(factors={0: 2.0})),
             op("B", ["h"], ["g"], Outcome(factors={0: 3.0})),
             op("Add", ["g", "x"], ["y"], Outcome(factors={0: 1.0, 1: 1.0}))]
    assert propagate(graph(steps, ["y"]), steps)[0]["y"] == 7.0


def test_a_concatenation_is_the_l2_of_its_parts() -> None:
    steps = [op("A", ["x"], ["a"], Outcome(factors={0: 3.0})),
             op("B", ["x"], ["b"], Outcome(factors={0: 4.0})),
             op("Cat", ["a", "b"], ["y"], Outcome(factors={0: 1.0, 1: 1.0}, combine="l2"))]
    assert propagate(graph(steps, ["y"]), steps)[0]["y"] == 5.0


def test_a_constant_input_contributes_nothing() -> None:
    # y = A(x) + c with c an initializer: L(c) = 0
    steps = [op("A", ["x"], ["h"], Outcome(factors={0: 2.0})),
             op("Add", ["h", "c"], ["y"], Outcome(factors={0: 1.0, 1: 1.0}))]
    assert propagate(graph(steps, ["y"]), steps)[0]["y"] == 2.0


def test_an_unbounded_op_makes_everything_after_it_infinite() -> None:
    steps = [op("A", ["x"], ["h"], Outcome(factors={}, unbounded="a product of two activations")),
             op("B", ["h"], ["y"], Outcome(factors={0: 0.5}))]
    cert, est = propagate(graph(steps, ["y"]), steps)
    assert cert["h"] == cert["y"] == est["y"] == math.inf


def test_an_ignored_infinite_input_costs_nothing() -> None:
    # factor 0 times L = inf is 0, not NaN: the op does not depend on that input
    steps = [op("A", ["x"], ["h"], Outcome(factors={}, unbounded="unsupported")),
             op("Where", ["h", "x"], ["y"], Outcome(factors={0: 0.0, 1: 1.5}))]
    assert propagate(graph(steps, ["y"]), steps)[0]["y"] == 1.5


def test_a_nan_factor_poisons_the_sum() -> None:
    steps = [op("A", ["x"], ["h"], Outcome(factors={0: math.nan})),
             op("Add", ["h", "x"], ["y"], Outcome(factors={0: 1.0, 1: 1.0}))]
    cert, _ = propagate(graph(steps, ["y"]), steps)
    assert math.isnan(cert["h"]) and math.isnan(cert["y"])


def test_multipliers_rescale_named_ops() -> None:
    steps = [op("A", ["x"], ["h"], Outcome(factors={0: 2.0}, est_factors={0: 1.0})),
             op("B", ["h"], ["y"], Outcome(factors={0: 3.0}))]
    cert, est = propagate(graph(steps, ["y"]), steps, multipliers={"A": 0.25})
    assert (cert["h"], cert["y"]) == (0.5, 1.5)
    assert (est["h"], est["y"]) == (0.25, 0.75)


def test_a_source_redirects_the_factor_past_fused_ops() -> None:
    # a conv measured together with its Pad: its factor multiplies L(before the pad)
    steps = [op("Pad", ["x"], ["p"], Outcome(factors={0: 10.0})),
             op("Conv", ["p"], ["y"], Outcome(factors={0: 2.0}, sources={0: "x"}))]
    assert propagate(graph(steps, ["y"]), steps)[0]["y"] == 2.0


def test_every_output_of_an_op_gets_its_bound() -> None:
    steps = [op("Split", ["x"], ["a", "", "b"], Outcome(factors={0: 1.0}))]
    cert, _ = propagate(graph(steps, ["a", "b"]), steps)
    assert cert["a"] == cert["b"] == 1.0 and "" not in cert


def test_two_inputs_each_start_at_one() -> None:
    steps = [op("Add", ["x", "z"], ["y"], Outcome(factors={0: 2.0, 1: 3.0}))]
    assert propagate(graph(steps, ["y"], inputs=("x", "z")), steps)[0]["y"] == 5.0


def test_network_bound_of_several_outputs_is_their_l2() -> None:
    steps = [op("A", ["x"], ["y1"], Outcome(factors={0: 3.0})),
             op("B", ["x"], ["y2"], Outcome(factors={0: 4.0}))]
    g = graph(steps, ["y1", "y2"])
    assert network_bound(g, steps, {}) == 5.0
    # halving B: sqrt(3^2 + 2^2)
    assert network_bound(g, steps, {"B": 0.5}) == pytest.approx(math.sqrt(13.0), rel=1e-15)
