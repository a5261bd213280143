"""Chain certificates through activations recognised from several ops (SiLU = x * sigmoid(x),
Mish = x * tanh(softplus(x))): slope ranges with a negative lower end, the certificate between
the Jacobian norms ascent finds and the product of the layers' constants."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import fit_to_sine
from torch import nn

import lipcheck


def _sigma(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.detach().double(), 2))


@pytest.mark.parametrize("act", [nn.SiLU, nn.Mish])
@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.e2e)])  # dynamo: e2e
def test_chain_through_a_product_activation(tmp_path: Path, act: type[nn.Module], dynamo: bool) -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(12, 32), act(), nn.Linear(32, 32), act(), nn.Linear(32, 4))
    model = fit_to_sine(model, 12, 4, scale=2.0, steps=150)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.zeros(1, 12),), str(path), dynamo=dynamo,
                      **({} if dynamo else {"opset_version": 17}))
    rep = lipcheck.analyze(path)
    assert rep.network.composition is not None and "eclipse" in rep.network.composition, rep.network.reason
    bound = rep.network.lipschitz_bound
    assert bound is not None
    lip = 1.0999 if act is nn.SiLU else 1.0886
    ws = [m.weight for m in model if isinstance(m, nn.Linear)]
    product = _sigma(ws[0]) * _sigma(ws[1]) * _sigma(ws[2]) * lip * lip
    assert bound < product
    # never below a real Jacobian's norm: gradient ascent on it from several starts
    f = model.double()
    best = 0.0
    for seed in range(4):
        x = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=0.05)
        for _ in range(60):
            jac = torch.autograd.functional.jacobian(f, x, create_graph=True)
            value = torch.linalg.matrix_norm(jac, 2)
            best = max(best, float(value.detach()))
            opt.zero_grad()
            (-value).backward()
            opt.step()
    model.float()
    assert best <= bound


@pytest.mark.parametrize("name", ["SiLU", "Mish"])
def test_product_slope_ranges_hold_and_are_tight(name: str) -> None:
    """Every difference quotient of the function lies in the range; the range is within 0.1 %
    of the extreme slopes (float64 grid)."""
    from lipcheck.rules.elementwise import PRODUCT_SLOPES

    lo, hi = PRODUCT_SLOPES[name]
    fn = nn.functional.silu if name == "SiLU" else nn.functional.mish
    x = torch.linspace(-30, 30, 600001, dtype=torch.float64)
    y = fn(x)
    quotients = (y[1:] - y[:-1]) / (x[1:] - x[:-1])
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200000, generator=g, dtype=torch.float64) * 6
    b = torch.randn(200000, generator=g, dtype=torch.float64) * 6
    far = (fn(a) - fn(b)) / (a - b)
    for q in (quotients, far):
        assert lo <= float(q.min()) and float(q.max()) <= hi
    assert float(quotients.min()) <= lo * (1 - 1e-3) and float(quotients.max()) >= hi * (1 - 1e-3)
