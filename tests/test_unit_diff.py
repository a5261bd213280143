"""lipcheck.diff on two hand-written reports: layers matched by name, relative changes
b / a - 1 worked out here, new and vanished layers in their reports' order."""

from __future__ import annotations

import math
from typing import Any

import pytest

from lipcheck.diff import diff


def row(name: str, upper: float | None, sigma: float | None = None, op: str = "Gemm") -> dict[str, Any]:
    return {"name": name, "op": op, "sigma": sigma, "sigma_upper": upper}


def report(path: str, layers: list[dict[str, Any]], bound: float | None) -> dict[str, Any]:
    return {"schema_version": "1", "model": {"path": path, "sha256": path * 2}, "layers": layers,
            "network": {"lipschitz_bound": bound, "bounded": bound is not None}}


A = report("a.onnx", [row("fc1", 2.0, 1.9), row("gone", 1.0, op="Conv"), row("fc2", 1.0, 0.99),
                      row("act", 1.0, 1.0, op="Relu")], bound=4.0)
B = report("b.onnx", [row("fresh", 0.5, op="Conv"), row("fc2", 1.0, 0.99), row("fc1", 3.0, 2.9),
                      row("act", 1.0, 1.0, op="Relu")], bound=3.0)


def test_rows_present_in_both_follow_a_and_carry_their_change() -> None:
    doc = diff(A, B)
    assert [r["name"] for r in doc["layers"]] == ["fc1", "fc2", "act"]
    fc1, fc2, act = doc["layers"]
    assert fc1 == {"name": "fc1", "op": "Gemm", "sigma_a": 1.9, "sigma_b": 2.9, "sigma_upper_a": 2.0,
                   "sigma_upper_b": 3.0, "change": 0.5, "changed": True}  # 3 / 2 - 1
    assert fc2["change"] == 0.0 and fc2["changed"] is False
    assert act["op"] == "Relu" and act["changed"] is False


def test_new_and_vanished_layers_in_order() -> None:
    doc = diff(A, B)
    assert doc["new"] == [{"name": "fresh", "op": "Conv"}]
    assert doc["vanished"] == [{"name": "gone", "op": "Conv"}]


def test_network_change_and_identity() -> None:
    doc = diff(A, B)
    assert doc["network"] == {"lipschitz_bound_a": 4.0, "lipschitz_bound_b": 3.0, "change": -0.25,
                              "bounded_a": True, "bounded_b": True}
    assert doc["a"] == {"path": "a.onnx", "sha256": "a.onnxa.onnx"}
    assert doc["b"]["path"] == "b.onnx" and doc["schema_version"] == "1"


def test_a_report_against_itself_changes_nothing() -> None:
    doc = diff(A, A)
    assert all(r["change"] == 0.0 and r["changed"] is False for r in doc["layers"])
    assert doc["new"] == doc["vanished"] == [] and doc["network"]["change"] == 0.0


def test_a_changed_estimate_alone_is_a_change() -> None:
    a = report("a", [row("w", 1.0, 0.9)], 1.0)
    b = report("b", [row("w", 1.0, 0.95)], 1.0)
    (layer,) = diff(a, b)["layers"]
    assert layer["change"] == 0.0 and layer["changed"] is True


@pytest.mark.parametrize(("upper_a", "upper_b", "change"), [
    (0.0, 0.0, None),          # nothing to compare
    (0.0, 1.0, math.inf),      # from nothing to something
    (None, 1.0, None),         # a had no certificate
    (1.0, math.nan, None),     # not finite
    (4.0, 1.0, -0.75),
])
def test_edge_changes(upper_a: float | None, upper_b: float | None, change: float | None) -> None:
    (layer,) = diff(report("a", [row("w", upper_a)], None), report("b", [row("w", upper_b)], None))["layers"]
    assert layer["change"] == change


def test_unbounded_network_has_no_change() -> None:
    doc = diff(report("a", [], 2.0), report("b", [], None))
    assert doc["network"]["change"] is None and doc["network"]["bounded_b"] is False
