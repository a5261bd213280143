"""LayerNorm / RMSNorm (and Group/InstanceNorm) with eps > 0: a global bound max|gamma|/sqrt(eps),
in every form torch's exporters write (LayerNormalization; the legacy exporter's decomposition
at opset < 17; RMSNorm as Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul or Div(1, Sqrt)), checked
against Jacobians at random and at near-constant (adversarial) inputs."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import exact_norm, jacobian_at
from torch import nn

import lipcheck


class LlamaRMS(nn.Module):
    """RMSNorm as LLaMA-style code writes it (rsqrt of the mean square)."""

    def __init__(self, n: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(v + self.eps))


class DivRMS(LlamaRMS):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.empty(p.shape).uniform_(-2.0, 2.0, generator=gen) if "weight" in name
                    else torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def _export(model: nn.Module, shape: tuple[int, ...], path: Path, dynamo: bool, opset: int | None) -> Path:
    kw = {} if opset is None else {"opset_version": opset}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(shape),), str(path), dynamo=dynamo, **kw)
    return path


def _gamma_over_sqrt_eps(model: nn.Module, eps: float) -> float:
    gamma = max(float(p.detach().abs().max()) for n, p in model.named_parameters() if "weight" in n)
    return gamma / float(np.sqrt(np.float32(eps)))


def _jacobian_norms(model: nn.Module, shape: tuple[int, ...], seed: int) -> tuple[float, float]:
    """(max over random points, max over near-constant points) of the exact Jacobian norm."""
    m = copy.deepcopy(model).double()
    if isinstance(m, nn.RMSNorm) and m.eps is None:
        m.eps = float(torch.finfo(torch.float32).eps)  # what the float32 model (and its export) adds
    gen = torch.Generator().manual_seed(seed)
    randoms = [exact_norm(jacobian_at(m, torch.randn(shape, generator=gen, dtype=torch.float64) * s))
               for s in (0.01, 0.1, 1.0, 10.0) for _ in range(5)]
    near = []
    for scale in (0.0, 1e-6, 1e-4, 1e-3):
        base = torch.randn(shape[:-1] + (1,), generator=gen, dtype=torch.float64)
        noise = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        near.append(exact_norm(jacobian_at(m, base.expand(shape) + noise)))
        near.append(exact_norm(jacobian_at(m, noise)))  # RMSNorm: near zero
    return max(randoms), max(near)


CASES = [
    # (id, factory, eps, exporter, opset, op that must be gone)
    ("layernorm-legacy", lambda: nn.LayerNorm(16, eps=1e-5), 1e-5, False, None),
    ("layernorm-legacy-opset13", lambda: nn.LayerNorm(16, eps=1e-3), 1e-3, False, 13),
    ("layernorm-dynamo", lambda: nn.LayerNorm(16, eps=1e-5), 1e-5, True, None),
    ("rmsnorm-dynamo", lambda: nn.RMSNorm(16, eps=1e-6), 1e-6, True, None),
    ("rmsnorm-default-eps-dynamo", lambda: nn.RMSNorm(16), float(torch.finfo(torch.float32).eps), True, None),
    ("llama-rms-legacy", lambda: LlamaRMS(16, 1e-6), 1e-6, False, None),
    ("llama-rms-dynamo", lambda: LlamaRMS(16, 1e-6), 1e-6, True, None),
    ("div-rms-legacy", lambda: DivRMS(16, 1e-4), 1e-4, False, None),
    ("groupnorm-dynamo", lambda: nn.GroupNorm(2, 4, eps=1e-5), 1e-5, True, None),
    ("instancenorm-legacy", lambda: nn.InstanceNorm1d(4, eps=1e-5, affine=True), 1e-5, False, None),
]


# the default-eps RMSNorm export is the rmsnorm-dynamo graph with another eps: the e2e layer
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.e2e) if c[0] == "rmsnorm-default-eps-dynamo"
                                  else c for c in CASES], ids=[c[0] for c in CASES])
def test_normalization_bound_holds_and_is_reached(case, tmp_path):
    name, factory, eps, dynamo, opset = case
    model = _randomize(factory(), seed=len(name))
    shape = (1, 4, 16) if "norm-" in name and name.split("-")[0] in ("groupnorm", "instancenorm") else (2, 16)
    path = _export(model, shape, tmp_path / f"{name}.onnx", dynamo, opset)
    rep = lipcheck.analyze(path, device="cpu")
    assert rep.network.bounded, rep.network.reason
    bound = rep.network.lipschitz_bound
    expected = _gamma_over_sqrt_eps(model, eps)
    # with a bias Add after, the bound is the same; without gamma (RMS patterns) it is 1/sqrt(eps) x max|gamma|
    assert bound == pytest.approx(expected, rel=1e-6)
    rand, near = _jacobian_norms(model, shape, seed=1)
    assert rand <= bound * (1 + 1e-9)
    assert near <= bound * (1 + 1e-9)
    # the global constant is reached near constant inputs: the bound is not absurdly loose there
    assert near >= 0.5 * bound
    assert any("near-constant" in (r.note or "") for r in rep.layers)


def test_layernorm_inside_an_mlp_gets_a_number():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = lipcheck.analyze(model, (1, 8), device="cpu")
    assert rep.network.bounded
    rand, near = _jacobian_norms(model, (1, 8), seed=2)
    assert max(rand, near) <= rep.network.lipschitz_bound


def test_layernorm_eps_zero_and_input_scale_stay_unbounded(tmp_path):
    from onnx import TensorProto, helper, save

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    scale = helper.make_tensor("s", TensorProto.FLOAT, [4], [1.0, 2.0, 1.0, 1.0])
    for eps, inputs, why in ((0.0, ["x", "s"], "epsilon"), (1e-5, ["x", "x"], "depends on the input")):
        node = helper.make_node("LayerNormalization", inputs, ["y"], epsilon=eps)
        model = helper.make_model(helper.make_graph([node], "g", [x], [y], [scale]),
                                  opset_imports=[helper.make_opsetid("", 17)])
        path = tmp_path / "ln.onnx"
        save(model, path)
        rep = lipcheck.analyze(path, device="cpu")
        assert not rep.network.bounded and why in rep.network.reason
