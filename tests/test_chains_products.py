"""Chain certificates through activations recognised from several ops (SiLU = x * sigmoid(x),
Mish = x * tanh(softplus(x))): slope ranges with a negative lower end, the certificate between
the Jacobian norms ascent finds and the product of the layers' constants."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def _quotients(fn: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Difference quotients of fn on a float64 grid of [-30, 30] and between far random pairs."""
    x = torch.linspace(-30, 30, 600001, dtype=torch.float64)
    y = fn(x)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200000, generator=g, dtype=torch.float64) * 6
    b = torch.randn(200000, generator=g, dtype=torch.float64) * 6
    return (y[1:] - y[:-1]) / (x[1:] - x[:-1]), (fn(a) - fn(b)) / (a - b)


@pytest.mark.parametrize("name", ["SiLU", "Mish"])
def test_product_slope_ranges_hold_and_are_tight(name: str) -> None:
    """Every difference quotient of the function lies in the range; the range is within 0.1 %
    of the extreme slopes (float64 grid)."""
    from lipcheck.rules.elementwise import PRODUCT_SLOPES

    lo, hi = PRODUCT_SLOPES[name]
    quotients, far = _quotients(nn.functional.silu if name == "SiLU" else nn.functional.mish)
    for q in (quotients, far):
        assert lo <= float(q.min()) and float(q.max()) <= hi
    assert float(quotients.min()) <= lo * (1 - 1e-3) and float(quotients.max()) >= hi * (1 - 1e-3)


class NewGELU(nn.Module):
    """GPT-2's hand-written tanh GELU (Hugging Face ``NewGELUActivation``): 0.5 x (1 +
    tanh(sqrt(2/pi) (x + 0.044715 x^3))), exported with Pow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))


ACTS = {
    "gelu-erf": lambda: nn.GELU(),
    "gelu-tanh": lambda: nn.GELU(approximate="tanh"),
    "gpt2-newgelu": NewGELU,
    "elu": lambda: nn.ELU(0.7),
    "softplus": lambda: nn.Softplus(),
    "selu": lambda: nn.SELU(),
}


# two exports each (dynamo takes a second): one activation in the fast layer, the rest e2e
@pytest.mark.parametrize("name", [n if n == "gelu-tanh" else pytest.param(n, marks=pytest.mark.e2e) for n in ACTS])
def test_every_exporter_gives_the_same_chain(tmp_path: Path, name: str) -> None:
    """The legacy exporter writes GELU as Div/Erf/Add/Mul/Mul(0.5) or Mul/Mul/Mul/Add/Mul/Tanh/
    Add/Mul/Mul(0.5), the dynamo exporter Softplus as Where(Greater(x, 20), x, Softplus(x)): each
    is recognised with its slope range and the scale after it folded into the next weight, so
    both files get the same ECLipsE chain bound, which lies between a real Jacobian's norm and
    the product of the layers' constants."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(6, 16), ACTS[name](), nn.Linear(16, 16), ACTS[name](), nn.Linear(16, 3)).eval()
    bounds = []
    for dynamo in (False, True):
        path = tmp_path / f"m{int(dynamo)}.onnx"
        torch.onnx.export(model, (torch.zeros(1, 6),), str(path), dynamo=dynamo,
                          **({} if dynamo else {"opset_version": 17}))
        rep = lipcheck.analyze(path)
        assert rep.network.composition is not None and "eclipse" in rep.network.composition, rep.network.reason
        bounds.append(rep.network.lipschitz_bound)
    assert bounds[0] == pytest.approx(bounds[1], rel=1e-9)
    rows = {r.op: r.lipschitz for r in rep.layers if r.kind == "activation"}
    ws = [m.weight for m in model if isinstance(m, nn.Linear)]
    product = _sigma(ws[0]) * _sigma(ws[1]) * _sigma(ws[2]) * max(rows.values()) ** 2
    assert bounds[0] < product
    f = model.double()
    lower = max(float(torch.linalg.matrix_norm(torch.autograd.functional.jacobian(
        f, torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(s))), 2)) for s in range(30))
    assert lower <= bounds[0]


def test_tanh_gelu_inside_the_erf_forms_slopes() -> None:
    """The tanh form's difference quotients lie in [GELU_MIN_SLOPE, GELU_LIP], the range the
    recogniser gives it (float64 grid and far pairs)."""
    from lipcheck.rules.elementwise import GELU_LIP, GELU_MIN_SLOPE

    for q in _quotients(lambda x: nn.functional.gelu(x, approximate="tanh")):
        assert GELU_MIN_SLOPE <= float(q.min()) and float(q.max()) <= GELU_LIP


def test_scalings_between_layers_fold_into_the_weights(tmp_path: Path) -> None:
    """Linear -> x 3 -> ReLU -> x c (one per feature) -> Linear: the chain is ECLipsE of
    [3 W1, W2 diag(c)], the same function's weights."""
    from lipcheck.chains import eclipse

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 2)
            self.register_buffer("c", torch.linspace(-2.0, 3.0, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x) * 3.0) * self.c)

    torch.manual_seed(2)
    model = Scaled().eval()
    path = tmp_path / "s.onnx"
    torch.onnx.export(model, (torch.zeros(1, 5),), str(path), dynamo=False, opset_version=17)
    rep = lipcheck.analyze(path)
    w1 = 3.0 * model.a.weight.detach().double().numpy()
    w2 = model.b.weight.detach().double().numpy() * model.c.double().numpy()[None, :]
    expected = eclipse([w1, w2], [(0.0, 1.0)])
    assert expected is not None and rep.network.composition is not None and "eclipse" in rep.network.composition
    assert rep.network.lipschitz_bound == pytest.approx(expected[0], rel=1e-9)


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.e2e)])  # dynamo: e2e
def test_batchnorm_after_the_activation_folds_into_the_next_weight(tmp_path: Path, dynamo: bool) -> None:
    """Linear -> ReLU -> BatchNorm1d -> Linear ... (a tabular MLP's order): the eval BatchNorm is
    x -> s x + t per feature, so the chain is ECLipsE of [W1, W2 diag(s1), W3 diag(s2)] (signs
    of gamma included), the same function's weights."""
    from lipcheck.chains import eclipse

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.BatchNorm1d(12), nn.Linear(12, 10), nn.ReLU(),
                      nn.BatchNorm1d(10), nn.Linear(10, 3)).eval()
    with torch.no_grad():
        for bn in (m[2], m[5]):
            bn.running_var.uniform_(0.1, 4.0)
            bn.weight.uniform_(-2, 2)
    path = tmp_path / "bn.onnx"
    torch.onnx.export(m, (torch.zeros(2, 6),), str(path), dynamo=dynamo, **({} if dynamo else {"opset_version": 17}))
    rep = lipcheck.analyze(path)
    scales = [(bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double().numpy() for bn in (m[2], m[5])]
    ws = [m[0].weight.detach().double().numpy(), m[3].weight.detach().double().numpy() * scales[0][None, :],
          m[6].weight.detach().double().numpy() * scales[1][None, :]]
    expected = eclipse(ws, [(0.0, 1.0)] * 2)
    assert expected is not None and "eclipse" in (rep.network.composition or ""), rep.network.reason
    assert rep.network.lipschitz_bound == pytest.approx(expected[0], rel=1e-5)  # float32 weights in the file
