"""lipcheck.gate on hand-written report documents: each rule's verdict, value, limit and
message, with the expected numbers worked out in the test."""

from __future__ import annotations

import math
from typing import Any

import pytest

from lipcheck.errors import UsageError
from lipcheck.gate import RuleResult, evaluate, parse_increase

ESTIMATE_NOTE = " [estimate: a lower bound, not a guarantee]"


def row(name: str, upper: float | None, sigma: float | None = None, kind: str = "linear",
        note: str | None = None) -> dict[str, Any]:
    return {"name": name, "op": "Gemm", "kind": kind, "sigma": sigma, "sigma_upper": upper, "note": note}


def report(layers: list[dict[str, Any]], bound: float | None = 2.0, estimate: float | None = None,
           reason: str = "certified: composed from per-layer upper bounds") -> dict[str, Any]:
    return {
        "model": {"path": "m.onnx"},
        "layers": layers,
        "network": {"lipschitz_bound": bound, "lipschitz_estimate": estimate, "bounded": bound is not None,
                    "reason": reason},
    }


ONE_LAYER = [row("fc", 1.0)]


# --------------------------------------------------------------------------- max-lipschitz


def test_network_under_the_limit_passes() -> None:
    assert evaluate(report(ONE_LAYER, bound=2.0), max_lipschitz=3.0) == [
        RuleResult("m.onnx", "max-lipschitz", True, 2.0, 3.0, "network bound 2 <= 3 [certified]")]


def test_network_at_the_limit_passes() -> None:
    (result,) = evaluate(report(ONE_LAYER, bound=3.0), max_lipschitz=3.0)
    assert result.passed


def test_network_over_the_limit_says_by_how_much() -> None:
    # 2 - 1.6 = 0.4 over, 2 / 1.6 = 1.25: 25% over
    assert evaluate(report(ONE_LAYER, bound=2.0), max_lipschitz=1.6) == [
        RuleResult("m.onnx", "max-lipschitz", False, 2.0, 1.6, "network bound 2 > 1.6: 0.4 over (25.00%) [certified]")]


def test_no_network_bound_fails_with_the_reason() -> None:
    doc = report(ONE_LAYER, bound=None, reason="unbounded: attn (MatMul): a product of two activations")
    assert evaluate(doc, max_lipschitz=1e9) == [
        RuleResult("m.onnx", "max-lipschitz", False, None, 1e9,
                   "no network bound: unbounded: attn (MatMul): a product of two activations")]


def test_estimate_mode_reads_the_estimate_and_says_so() -> None:
    doc = report(ONE_LAYER, bound=2.0, estimate=1.2)
    assert evaluate(doc, max_lipschitz=1.5, bound="estimate") == [
        RuleResult("m.onnx", "max-lipschitz", True, 1.2, 1.5, "network bound 1.2 <= 1.5" + ESTIMATE_NOTE)]


def test_unknown_bound_kind_is_refused_naming_the_parameter() -> None:
    with pytest.raises(UsageError) as info:
        evaluate(report(ONE_LAYER), max_lipschitz=1.0, bound="guess")
    assert info.value.param == "bound" and "guess" in str(info.value)


# --------------------------------------------------------------------------- max-layer-sigma


def test_each_layer_over_the_limit_is_one_failure() -> None:
    layers = [row("a", 0.9), row("b", 1.5, kind="conv"), row("act", 7.0, kind="activation"),
              row("d", 1.2, kind="diagonal")]
    assert evaluate(report(layers), max_layer_sigma=1.0) == [
        RuleResult("m.onnx", "max-layer-sigma", False, 1.5, 1.0,
                   "layer b: sigma 1.5 > 1: 0.5 over (50.00%) [certified]", "b"),
        RuleResult("m.onnx", "max-layer-sigma", False, 1.2, 1.0,
                   "layer d: sigma 1.2 > 1: 0.2 over (20.00%) [certified]", "d"),
    ]


def test_passing_layers_report_the_largest() -> None:
    # activations are not gated: the 7.0 does not count
    layers = [row("a", 0.9), row("b", 0.95, kind="conv"), row("act", 7.0, kind="activation"),
              row("lstm.W", 0.5, kind="recurrent")]
    assert evaluate(report(layers), max_layer_sigma=1.0) == [
        RuleResult("m.onnx", "max-layer-sigma", True, 0.95, 1.0, "largest layer sigma 0.95 (b) <= 1 [certified]")]


@pytest.mark.parametrize("upper", [None, math.inf, math.nan])
def test_a_layer_without_a_finite_sigma_fails(upper: float | None) -> None:
    doc = report([row("w", upper, note="weights with NaN or Inf"), row("ok", 0.5)])
    assert evaluate(doc, max_layer_sigma=1.0) == [
        RuleResult("m.onnx", "max-layer-sigma", False, None, 1.0, "layer w: no finite sigma (weights with NaN or Inf)",
                   "w")]


def test_a_zero_limit_gives_no_percentage() -> None:
    (result,) = evaluate(report([row("a", 0.5)]), max_layer_sigma=0.0)
    assert result.message == "layer a: sigma 0.5 > 0: 0.5 over [certified]"


def test_estimate_mode_reads_sigma_then_falls_back_to_the_certificate() -> None:
    layers = [row("a", 1.3, sigma=0.9), row("b", 1.1, sigma=None)]
    assert evaluate(report(layers), max_layer_sigma=1.0, bound="estimate") == [
        RuleResult("m.onnx", "max-layer-sigma", False, 1.1, 1.0,
                   "layer b: sigma 1.1 > 1: 0.1 over (10.00%)" + ESTIMATE_NOTE, "b")]


def test_a_report_without_weighted_layers_fails_even_with_no_rule() -> None:
    doc = report([row("relu", 1.0, kind="activation")])
    assert evaluate(doc) == [RuleResult("m.onnx", "analysed", False, None, None,
                                        "no layer with weights was analysed: a gate that measured nothing fails")]
    rules = [r.rule for r in evaluate(doc, max_lipschitz=5.0, max_layer_sigma=5.0)]
    assert rules == ["analysed", "max-lipschitz"]  # nothing to report per layer


# --------------------------------------------------------------------------- baseline

BASE = report([row("a", 1.0), row("b", 2.0)], bound=2.0)


def test_baseline_growth_within_the_allowance_passes() -> None:
    new = report([row("a", 1.05), row("b", 2.1)], bound=2.15)
    results = evaluate(new, baseline=BASE, max_increase=0.1)
    assert [(r.rule, r.passed) for r in results] == [
        ("baseline-match", True), ("baseline-network", True), ("baseline-layer", True)]
    assert (results[0].value, results[0].limit) == (2, 2)
    assert results[0].message == "2 of 2 layers matched the baseline by name"
    assert results[1].value == 2.15 and results[1].limit == pytest.approx(2.2, rel=1e-15)
    assert results[1].message == "network bound 2.15 vs baseline 2 (limit 2.2) [certified]"
    assert results[2].message == "no layer grew more than 10% over the baseline [certified]"


def test_baseline_growth_beyond_the_allowance_fails_per_layer() -> None:
    # limits: network 2 * 1.1 = 2.2, layer b 2 * 1.1 = 2.2, layer a 1 * 1.1 = 1.1
    new = report([row("a", 1.05), row("b", 2.5)], bound=2.4)
    _, network, layer = evaluate(new, baseline=BASE, max_increase=0.1)
    assert not network.passed and network.value == 2.4
    # 2.4 - 2.2 = 0.2 over; 2.4 / 2.2 = 1.0909...
    assert network.message == "network bound 2.4 vs baseline 2 (limit 2.2): 0.2 over (9.09%) [certified]"
    assert (layer.rule, layer.passed, layer.layer, layer.value) == ("baseline-layer", False, "b", 2.5)
    # 2.5 - 2.2 = 0.3 over; 2.5 / 2.2 = 1.13636...
    assert layer.message == "layer b: sigma 2.5 vs baseline 2 (limit 2.2): 0.3 over (13.64%) [certified]"


def test_no_allowance_means_no_growth() -> None:
    new = report([row("a", 1.0), row("b", 2.0 + 1e-9)], bound=2.0)
    results = evaluate(new, baseline=BASE)
    assert [(r.rule, r.passed, r.layer) for r in results] == [
        ("baseline-match", True, None), ("baseline-network", True, None), ("baseline-layer", False, "b")]


def test_losing_the_network_bound_fails() -> None:
    new = report([row("a", 1.0), row("b", 2.0)], bound=None, reason="unbounded: x (If)")
    network = evaluate(new, baseline=BASE, max_increase=0.5)[1]
    assert network.rule == "baseline-network" and not network.passed and network.value is None
    assert network.message == "baseline had a network bound 2, now none: unbounded: x (If)"


def test_unmatched_layers_fail_unless_allowed() -> None:
    new = report([row("a", 1.0), row("c", 0.5)], bound=2.0)
    match = evaluate(new, baseline=BASE)[0]
    assert (match.rule, match.passed, match.value, match.limit) == ("baseline-match", False, 1, 3)
    assert match.message == ("1 of 3 layers matched the baseline by name; not in the baseline: c; "
                             "missing from the model: b (pass --allow-unmatched to compare only the matched layers)")
    allowed = evaluate(new, baseline=BASE, allow_unmatched=True)[0]
    assert allowed.passed and allowed.message.endswith("missing from the model: b (allowed by --allow-unmatched)")


def test_nothing_matched_fails_even_when_allowed() -> None:
    new = report([row("x", 1.0)], bound=2.0)
    match = evaluate(new, baseline=BASE, allow_unmatched=True)[0]
    assert not match.passed and match.value == 0


def test_long_lists_of_unmatched_names_are_cut() -> None:
    new = report([row(n, 1.0) for n in "cdefghi"], bound=2.0)
    match = evaluate(new, baseline=BASE)[0]
    assert "not in the baseline: c, d, e, f, g and 2 more;" in match.message


# --------------------------------------------------------------------------- --max-increase


@pytest.mark.parametrize(("text", "value"), [("10%", 0.1), ("0.25", 0.25), (" 0 ", 0.0), ("150%", 1.5)])
def test_parse_increase(text: str, value: float) -> None:
    assert parse_increase(text) == pytest.approx(value, rel=1e-15)


@pytest.mark.parametrize("text", ["ten", "-1", "-5%", "nan", "inf", "%"])
def test_parse_increase_refuses(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_increase(text)
    assert info.value.param == "max_increase"
