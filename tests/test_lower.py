"""The empirical lower bound (lipcheck.lower, ``--empirical``): a true lower bound, never above
the certified one, exact on linear maps, and a model that cannot be run only gets a note."""

from __future__ import annotations

import json
import warnings

import onnx
import pytest
import torch
from conftest import exact_norm, fit_to_sine, jacobian_at
from onnx import TensorProto, helper
from torch import nn

import lipcheck
import lipcheck.testing as lt
from lipcheck.lower import _flat_output, empirical_lower, search

ANALYZE = {"device": "cpu", "tol": 1e-9}


def analyze(model: nn.Module, shape: tuple[int, ...], **kw):  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lipcheck.analyze(model, shape, **ANALYZE, **kw)


def _trained_mlp(seed: int) -> nn.Module:
    """A 20-64-64-5 ReLU MLP fitted a few hundred steps on seeded synthetic data."""
    lt.seeded(seed)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    return fit_to_sine(model, 20, 5, scale=3.0, steps=200)


def test_linear_map_lower_bound_is_its_norm():
    """On a linear map every Jacobian is W: the lower bound is ||W|| (to the secant's rounding)."""
    lt.seeded(0)
    model = nn.Sequential(nn.Linear(12, 9, bias=True), nn.Linear(9, 7)).eval()
    exact = exact_norm((model[1].weight @ model[0].weight).detach())
    found = empirical_lower(model, (1, 12), seed=3)
    assert found.value is not None
    assert found.value == pytest.approx(exact, rel=1e-6)
    assert found.value <= exact * (1 + 1e-9)
    assert "seed 3" in found.note


@pytest.mark.parametrize("case", ["mlp", "trained", pytest.param("cnn", marks=pytest.mark.e2e)])
def test_empirical_never_exceeds_the_certified_bound(case):
    if case == "mlp":
        model, shape = lt.make_mlp(1)
    elif case == "trained":
        model, shape = _trained_mlp(2), (1, 20)
    else:
        model, shape = lt.make_cnn(3)
    rep = analyze(model, shape, empirical=True)
    lower, upper = rep.network.lipschitz_lower, rep.network.lipschitz_bound
    assert lower is not None and upper is not None
    assert 0 < lower <= upper
    assert any("certified upper / lower" in n for n in rep.notes)


def test_lower_bound_is_at_least_the_jacobians_at_its_seeded_points():
    """The search keeps the best secant: at least what the exact Jacobian gives at the best
    point it returns (secant at a differentiable point of a ReLU net, on its linear region)."""
    model = _trained_mlp(4).double()
    f = _flat_output(model)
    value, _, x = search(f, (1, 20), seed=0)
    at_x = exact_norm(jacobian_at(f, x))
    assert value == pytest.approx(at_x, rel=1e-6)
    # and a random point is typically no better than the search
    gen = torch.Generator().manual_seed(11)
    randoms = [exact_norm(jacobian_at(f, torch.randn(1, 20, generator=gen, dtype=torch.float64)))
               for _ in range(20)]
    assert value >= max(randoms) * 0.999


def test_model_that_cannot_be_run_gets_a_note(tmp_path):
    """An op onnx2torch has no converter for: no lower bound, a note why, the bound stands."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [float(i % 5) for i in range(16)])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Softsign", ["h"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "softsign.onnx"
    onnx.save(model, path)
    rep = lipcheck.analyze(path, device="cpu", empirical=True)
    assert rep.network.bounded
    if rep.network.lipschitz_lower is None:
        assert any(n.startswith("no lower bound:") for n in rep.notes), rep.notes
    else:  # a newer onnx2torch converts it: then it must be sound
        assert rep.network.lipschitz_lower <= rep.network.lipschitz_bound


@pytest.mark.e2e  # the whole --empirical workflow through the CLI
def test_cli_empirical_json_and_table(cli, samples):
    code, out, err = cli("inspect", samples / "mlp.onnx", "--empirical", "-f", "json", "--device", "cpu")
    assert code == 0, err
    doc = json.loads(out)
    net = doc["network"]
    assert 0 < net["lipschitz_lower"] <= net["lipschitz_bound"]
    assert any("certified upper / lower" in n and "seed 0" in n for n in doc["notes"])
    code, out, err = cli("inspect", samples / "mlp.onnx", "--empirical", "--device", "cpu")
    assert code == 0, err
    assert "empirical lower bound" in out and "certified / lower" in out
    code, out, err = cli("inspect", samples / "mlp.onnx", "--empirical", "-f", "markdown", "--device", "cpu")
    assert "empirical lower bound" in out
