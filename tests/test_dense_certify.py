"""Probabilistic upper bounds of dense matrices (``--certify``): the Kuczyński-Woźniakowski
failure probability against hand-computed values, the bound against exact float64 norms over
many seeded trials (random, low-rank, clustered and adversarial spectra), the choice of kind,
how the kind reaches the network bound, the gate and every output format."""

from __future__ import annotations

import json
import math
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

import lipcheck
from lipcheck import spectral
from lipcheck.gate import evaluate
from lipcheck.render import report_renderables
from lipcheck.spectral.certify import (
    PROB_MAX_SLACK,
    PROB_SLACK,
    dense_bound,
    krylov_upper_bound,
    lanczos_epsilon,
    lanczos_failure_probability,
    lanczos_steps_for,
    prefer_probabilistic,
)
from lipcheck.writers import inspect_csv, inspect_junit, inspect_markdown

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
SCHEMA = json.loads(files("lipcheck").joinpath("schema.json").read_text())


def exact_norm(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.to(torch.float64), ord=2))


# --------------------------------------------------------------------------- the formula


def test_failure_probability_hand_computed() -> None:
    # 1.648 * sqrt(100) * exp(-sqrt(0.04) * (2*10 - 1)) = 16.48 * exp(-3.8) = 16.48 * 0.0223707719
    assert lanczos_failure_probability(10, 100, 0.04) == pytest.approx(0.368670321, rel=1e-8)
    # 1.648 * 64 * exp(-0.5 * 99) = 105.472 * 3.0988191e-22
    assert lanczos_failure_probability(50, 4096, 0.25) == pytest.approx(3.26838e-20, rel=1e-5)
    assert lanczos_failure_probability(1, 10_000, 0.01) == 1.0  # capped: proves nothing


def test_epsilon_hand_computed_and_inverse() -> None:
    # ln(1.648 * 64 / 1e-9) = ln(1.05472e11) = 25.381711; / (2*91 - 1) = 0.1402304; squared
    assert lanczos_epsilon(91, 4096, 1e-9) == pytest.approx(0.019664566, rel=1e-6)
    for k, n, delta in ((5, 10, 0.1), (91, 4096, 1e-9), (300, 50_000, 1e-12)):
        eps = lanczos_epsilon(k, n, delta)
        assert lanczos_failure_probability(k, n, eps) == pytest.approx(delta, rel=1e-9)


def test_steps_for_the_slack() -> None:
    for n, delta in ((64, 1e-9), (4096, 1e-9), (4096, 1e-3)):
        k = lanczos_steps_for(n, delta)
        assert 1 / math.sqrt(1 - lanczos_epsilon(k, n, delta)) <= 1 + PROB_SLACK
        assert k == 1 or 1 / math.sqrt(1 - lanczos_epsilon(k - 1, n, delta)) > 1 + PROB_SLACK


def test_bad_arguments_refused() -> None:
    with pytest.raises(ValueError):
        lanczos_epsilon(0, 10, 1e-9)
    with pytest.raises(ValueError):
        lanczos_failure_probability(3, 10, 1.5)
    with pytest.raises(ValueError):
        spectral.Settings(certify="maybe")
    with pytest.raises(ValueError):
        spectral.Settings(failure_probability=0.0)


# --------------------------------------------------------------------------- soundness


def _matrices() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1234)
    out: list[tuple[str, torch.Tensor]] = []
    for m, n in ((120, 80), (80, 120), (200, 200), (300, 40)):
        out.append((f"gauss{m}x{n}", torch.randn(m, n, generator=gen, dtype=torch.float64)))
    for r in (1, 3, 12):
        u = torch.randn(150, r, generator=gen, dtype=torch.float64)
        v = torch.randn(r, 110, generator=gen, dtype=torch.float64)
        out.append((f"rank{r}", u @ v))
    q1, _ = torch.linalg.qr(torch.randn(160, 160, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(160, 160, generator=gen, dtype=torch.float64))
    # a tight cluster at the top, and the hard case of the theorem: one top value just above
    # a wall of 159 nearly equal ones (a random start has ~1/sqrt(n) of its mass on it)
    cluster = torch.cat([torch.full((20,), 1.0), torch.full((20,), 1 - 1e-6), torch.linspace(0.5, 0.0, 120)])
    wall = torch.cat([torch.tensor([1.0]), torch.full((159,), 0.97)])
    for name, s in (("cluster", cluster), ("wall", wall)):
        out.append((name, q1 @ torch.diag(s.to(torch.float64)) @ q2.T))
    out.append(("batch", torch.randn(3, 90, 70, generator=gen, dtype=torch.float64)))
    return out


@pytest.mark.parametrize("name,w", _matrices(), ids=[n for n, _ in _matrices()])
def test_probabilistic_bound_is_above_the_exact_norm_in_every_trial(name: str, w: torch.Tensor) -> None:
    exact = max(exact_norm(m) for m in spectral.matrix_batch(w))
    for seed in range(12):
        settings = spectral.Settings(certify="probabilistic", seed=seed)
        bound = krylov_upper_bound(w, settings)
        assert bound is not None and bound.kind == "probabilistic"
        assert bound.failure_probability == 1e-9
        assert bound.upper.value >= exact, (name, seed)
        # the estimate is a lower bound, and the bound as tight as the slack asks (or, when
        # the whole space is spanned before that, as the largest slack accepted)
        assert bound.estimate.sigma <= exact * (1 + 1e-12)
        n = min(w.shape[-2:])
        slack = PROB_SLACK if lanczos_steps_for(n, 1e-9 / len(spectral.matrix_batch(w))) <= n else PROB_MAX_SLACK
        assert bound.upper.value <= bound.estimate.sigma * (1 + slack) * (1 + 1e-6)


def test_estimate_converges_to_the_norm() -> None:
    w = torch.randn(200, 150, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    bound = krylov_upper_bound(w, spectral.Settings(certify="probabilistic"))
    assert bound is not None and bound.estimate.converged
    assert bound.estimate.sigma == pytest.approx(exact_norm(w), rel=1e-6)


def test_tiny_matrices_fall_back_to_the_exact_certificate() -> None:
    # 3 Krylov steps cannot prove anything at δ = 1e-9: the deterministic certificate instead
    w = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    settings = spectral.Settings(certify="probabilistic")
    assert krylov_upper_bound(w, settings) is None
    bound = dense_bound(w, settings)
    assert bound.kind == "certified" and bound.failure_probability is None
    assert exact_norm(w) <= bound.upper.value <= exact_norm(w) * (1 + 1e-5)


def test_zero_and_non_finite() -> None:
    settings = spectral.Settings(certify="probabilistic")
    zero = krylov_upper_bound(torch.zeros(50, 40), settings)
    assert zero is not None and zero.upper.value == 0.0
    bad = torch.randn(50, 40)
    bad[3, 4] = math.nan
    nan = krylov_upper_bound(bad, settings)
    assert nan is not None and math.isnan(nan.upper.value)


# --------------------------------------------------------------------------- the kind chosen


def test_exact_mode_is_todays_certificate() -> None:
    w = torch.randn(300, 260, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    settings = spectral.Settings(certify="exact")
    bound = dense_bound(w, settings)
    est = spectral.matrix_estimate(w, settings)
    assert bound.kind == "certified" and bound.failure_probability is None
    assert bound.estimate == est
    assert bound.upper == spectral.gram_upper_bound(w, est.sigma)


def test_auto_cost_model() -> None:
    assert prefer_probabilistic((4096, 4096), 1e-9)
    assert not prefer_probabilistic((4096, 784), 1e-9)
    assert not prefer_probabilistic((1000, 4096), 1e-9)
    assert not prefer_probabilistic((1024, 1024), 1e-9)
    assert not prefer_probabilistic((64,), 1e-9)


@pytest.fixture(scope="module")
def wide_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLP whose hidden matrices are large enough for a probabilistic bound to be tight
    (the samples' 32-wide layers are not: they fall back to the exact certificate)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(), torch.nn.Linear(300, 250),
                                torch.nn.Tanh(), torch.nn.Linear(250, 10)).eval()
    path = tmp_path_factory.mktemp("dense") / "wide.onnx"
    torch.onnx.export(model, (torch.zeros(1, 64),), str(path), dynamo=False, opset_version=17)
    return path


_CACHE: dict[tuple[str, tuple[tuple[str, Any], ...]], dict[str, Any]] = {}


def _analyze(path: Path, **kwargs: Any) -> dict[str, Any]:
    key = (str(path), tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        _CACHE[key] = lipcheck.analyze(path, device="cpu", **kwargs).to_dict()
    return _CACHE[key]


def test_certify_exact_is_certified_everywhere(wide_mlp: Path) -> None:
    doc = _analyze(wide_mlp, certify="exact")
    assert doc["settings"]["certify"] == "exact"
    assert all(r["upper_kind"] == "certified" for r in doc["layers"] if r["sigma_upper"] is not None)
    assert doc["network"]["certified"] and doc["network"]["failure_probability"] is None
    jsonschema.validate(doc, SCHEMA)
    # small matrices: auto certifies exactly, with the same numbers
    auto = _analyze(SAMPLES / "mlp.onnx")
    exact = _analyze(SAMPLES / "mlp.onnx", certify="exact")
    assert auto["layers"] == exact["layers"] and auto["network"] == exact["network"]
    # and today's numbers: the estimate and its Cholesky certificate
    for r in doc["layers"]:
        if r["op"] == "Gemm":
            assert r["upper_method"] == "cholesky"
            assert r["sigma"] <= r["sigma_upper"] <= r["sigma"] * (1 + 1e-5)


def test_certify_probabilistic_through_the_network(wide_mlp: Path) -> None:
    exact = _analyze(wide_mlp, certify="exact")
    doc = _analyze(wide_mlp, certify="probabilistic", failure_probability=1e-6)
    jsonschema.validate(doc, SCHEMA)
    prob = [r for r in doc["layers"] if r["upper_kind"] == "probabilistic"]
    assert len(prob) == 2 and all(r["op"] in ("Gemm", "MatMul") and r["failure_probability"] == 1e-6 for r in prob)
    net = doc["network"]
    assert not net["certified"] and net["bounded"]
    assert net["failure_probability"] == pytest.approx(1e-6 * len(prob))
    assert net["reason"].startswith("probabilistic:") and f"{1e-6 * len(prob):.3g}" in net["reason"]
    # the same layers, bounds at least the exact norms the certified run proves to within 1e-6
    by_name = {r["name"]: r for r in exact["layers"]}
    for r in prob:
        assert r["sigma_upper"] >= by_name[r["name"]]["sigma"]
        assert r["sigma_upper"] <= by_name[r["name"]]["sigma_upper"] * (1 + PROB_SLACK) * (1 + 1e-6)
    assert net["lipschitz_bound"] >= exact["network"]["lipschitz_estimate"]


def test_the_kind_in_every_output(wide_mlp: Path) -> None:
    doc = _analyze(wide_mlp, certify="probabilistic")
    md = inspect_markdown([doc])
    assert "† probabilistic upper bound" in md and "δ=1e-09" in md and "(probabilistic (δ=" in md
    assert "(probabilistic (δ=" in inspect_junit([doc])
    from rich.console import Console

    console = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    for part in report_renderables(doc):
        console.print(part)
    text = console.export_text()
    assert "†" in text and "probabilistic, fails with probability <=" in text and "δ=1e-09" in text
    csv_text = inspect_csv([doc])
    assert "upper_kind" in csv_text.splitlines()[0] and "probabilistic" in csv_text
    from lipcheck.html_report import report_section

    assert "probabilistic (δ=" in report_section(doc)


# --------------------------------------------------------------------------- the gate


def test_gate_names_the_kind_and_can_require_certified(wide_mlp: Path) -> None:
    prob = _analyze(wide_mlp, certify="probabilistic")
    cert = _analyze(wide_mlp, certify="exact")
    delta = prob["network"]["failure_probability"]
    for r in evaluate(prob, max_lipschitz=100.0, max_layer_sigma=100.0):
        assert r.passed and f"[probabilistic (δ={delta:.3g})]" in r.message
    for r in evaluate(cert, max_lipschitz=100.0, max_layer_sigma=100.0):
        assert r.passed and r.message.endswith("[certified]")
    strict = evaluate(prob, max_lipschitz=100.0, max_layer_sigma=100.0, require_certified=True)
    assert strict and all(not r.passed and "--require-certified" in r.message for r in strict)
    assert all(r.passed for r in evaluate(cert, max_lipschitz=100.0, require_certified=True))
    base = evaluate(prob, baseline=cert, max_increase=0.05, require_certified=True)
    assert [r.rule for r in base if not r.passed] == ["baseline-network", "baseline-layer"]


# --------------------------------------------------------------------------- command line, stored weights


@pytest.mark.e2e  # a whole normalize/diff/check workflow
def test_cli_certify_and_require_certified(cli: Any, wide_mlp: Path) -> None:
    code, out, err = cli("check", wide_mlp, "--max-lipschitz", "100", "--certify", "probabilistic",
                         "--require-certified", "--no-progress")
    assert code == 1
    assert "[probabilistic (δ=2e-09)]" in err and "--require-certified needs a certified bound" in err
    code, out, err = cli("check", wide_mlp, "--max-lipschitz", "100", "--certify", "exact",
                         "--require-certified", "--no-progress", "-f", "json")
    assert code == 0, err
    doc = json.loads(out)
    jsonschema.validate(doc, SCHEMA)
    assert doc["results"][0]["message"].endswith("[certified]")
    code, out, err = cli("inspect", wide_mlp, "--certify", "probabilistic", "--failure-probability", "1e-4",
                         "-f", "json")
    assert code == 0, err
    net = json.loads(out)["network"]
    assert net["failure_probability"] == pytest.approx(2e-4) and not net["certified"]


@pytest.mark.parametrize("args", [("--failure-probability", "0"), ("--failure-probability", "1"),
                                  ("--certify", "sometimes")])
def test_cli_refuses_bad_certify_options(cli: Any, args: tuple[str, str]) -> None:
    code, out, err = cli("inspect", SAMPLES / "mlp.onnx", *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1


def test_stored_matrices_carry_the_kind() -> None:
    from lipcheck.rules.tensors import tensor_rows

    w = torch.randn(400, 300, generator=torch.Generator().manual_seed(9))
    settings = spectral.Settings(certify="probabilistic", failure_probability=1e-7)
    rows, _ = tensor_rows({"layer.weight": w}, settings, [])
    (row,) = rows
    assert row.upper_kind == "probabilistic" and row.failure_probability == 1e-7
    assert row.sigma_upper is not None and row.sigma_upper >= exact_norm(w)
    rows, _ = tensor_rows({"layer.weight": w}, spectral.Settings(certify="exact"), [])
    assert rows[0].upper_kind == "certified" and rows[0].failure_probability is None


@pytest.mark.parametrize("name,w", [m for m in _matrices() if m[0] in ("rank1", "rank3", "wall", "gauss200x200")],
                         ids=["gauss200x200", "rank1", "rank3", "wall"])
def test_the_device_loop_without_host_reads(name: str, w: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's schedule (breakdowns handled on the device between checks), run on the CPU:
    the same soundness and tightness."""
    from lipcheck.spectral import certify

    host = krylov_upper_bound(w, spectral.Settings(certify="probabilistic"))
    monkeypatch.setattr(certify, "_host_reads", lambda device: False)
    exact = exact_norm(w)
    for seed in range(4):
        bound = krylov_upper_bound(w, spectral.Settings(certify="probabilistic", seed=seed))
        assert bound is not None and exact <= bound.upper.value <= exact * (1 + PROB_MAX_SLACK)
        assert bound.estimate.sigma == pytest.approx(exact, rel=1e-9)
    assert host is not None and host.estimate.sigma == pytest.approx(exact, rel=1e-9)


@pytest.mark.e2e  # a whole normalize/diff/check workflow
def test_normalize_and_diff_take_the_certify_options(cli: Any, wide_mlp: Path, tmp_path: Path) -> None:
    out = tmp_path / "normalized.onnx"
    code, text, err = cli("normalize", wide_mlp, "-o", out, "--target", "0.5", "--certify", "probabilistic",
                          "--failure-probability", "1e-6", "--no-progress")
    assert code == 0, err
    assert "network bound (probabilistic" in text
    after = lipcheck.analyze(out, device="cpu", certify="exact").to_dict()
    # certified afterwards: every rescaled layer is at its target up to the bound's slack
    for r in after["layers"]:
        if r["op"] == "Gemm":
            assert r["sigma_upper"] <= 0.5 * (1 + 1e-6)
    code, text, err = cli("diff", wide_mlp, out, "--certify", "probabilistic", "-f", "json", "--no-progress")
    assert code == 0, err
    assert json.loads(text)["a"]
