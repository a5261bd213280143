"""Consecutive linear maps measured as one: the bound of Linear -> Linear is the exact norm of
W2 W1 (float64 SVD in the test), below the product of the norms; rows keep their own numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lipcheck


def _model(seed: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        # W2 reads mostly the directions W1 barely writes: ||W2 W1|| << ||W2|| ||W1||
        u, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
        w1 = u[:, :16] @ torch.diag(torch.linspace(3, 0.1, 16)) @ torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
        w2 = torch.randn(8, 16, generator=g) @ u[:, 16:].T + 0.05 * torch.randn(8, 32, generator=g)
        m[0].weight.copy_(w1)
        m[1].weight.copy_(w2)
    return m


def _sigma(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.detach().double(), 2))


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.e2e)])  # dynamo: e2e
def test_pair_is_measured_as_one(tmp_path: Path, dynamo: bool) -> None:
    m = _model(0)
    path = tmp_path / "m.onnx"
    torch.onnx.export(m, (torch.zeros(1, 16),), str(path), dynamo=dynamo, **({} if dynamo else {"opset_version": 17}))
    rep = lipcheck.analyze(path)
    w1, w2, w3 = (m[i].weight for i in (0, 1, 3))
    merged = _sigma(w2.double() @ w1.double())
    assert merged < 0.5 * _sigma(w1) * _sigma(w2)
    assert "merged" in (rep.network.composition or "")
    bound = rep.network.lipschitz_bound
    assert bound is not None
    # the network: the merged pair, ReLU (1), the last layer (a chain certificate may do better)
    assert bound <= merged * _sigma(w3) * (1 + 1e-5)
    # and never below the Jacobian norm (ReLU active everywhere at a point with positive pre-activations)
    f = m.double()
    x = torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    largest = max(_sigma(torch.autograd.functional.jacobian(f, x + 0.5 * torch.randn(16, dtype=torch.float64)))
                  for _ in range(30))
    m.float()
    assert largest <= bound
    # the rows keep their own norms
    mats = [r for r in rep.layers if r.op in ("Gemm", "MatMul")]
    assert len(mats) == 3
    assert mats[0].sigma_upper >= _sigma(w1) * (1 - 1e-12) and mats[1].sigma_upper >= _sigma(w2) * (1 - 1e-12)
    assert any("merged with" in (r.note or "") for r in mats)


def test_not_merged_across_from(tmp_path: Path) -> None:
    m = _model(1)
    path = tmp_path / "m.onnx"
    torch.onnx.export(m, (torch.zeros(1, 16),), str(path), dynamo=False, opset_version=17)
    first = next(r.name for r in lipcheck.analyze(path).layers if r.op == "Gemm")
    rep = lipcheck.analyze(path, start=first)
    assert rep.network.bounded and "merged" not in (rep.network.composition or "")


class _Pointwise(nn.Module):
    """A MobileNet-style projection (1x1 conv, BatchNorm, no activation) followed by the next
    block's expansion (1x1 conv, stride 2), with a per-channel constant Mul between, then a
    ReLU and a 3x3 conv (not mergeable: its kernel is not 1x1)."""

    def __init__(self) -> None:
        super().__init__()
        self.project, self.bn = nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.expand, self.tail = nn.Conv2d(4, 8, 1, stride=2), nn.Conv2d(8, 3, 3, padding=1)
        self.register_buffer("c", torch.linspace(0.5, 2.0, 4).reshape(1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(torch.relu(self.expand(self.bn(self.project(x)) * self.c)))


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.e2e)])  # dynamo: e2e
def test_pointwise_convs_merge_through_batchnorm_and_scales(tmp_path: Path, dynamo: bool) -> None:
    """1x1 conv -> BatchNorm -> Mul(c) -> 1x1 conv: the pair's constant is the exact
    ||W2 diag(c s) W1|| (float64 SVD here; the legacy exporter folds the BatchNorm into the
    first conv, the dynamo exporter keeps it), and the network bound is that times the 3x3
    conv's norm on its real input."""
    torch.manual_seed(3)
    m = _Pointwise().eval()
    with torch.no_grad():
        m.bn.running_var.uniform_(0.2, 3.0)
        m.bn.weight.uniform_(0.5, 2.0)
    path = tmp_path / "pw.onnx"
    torch.onnx.export(m, (torch.zeros(1, 8, 6, 6),), str(path), dynamo=dynamo,
                      **({} if dynamo else {"opset_version": 17}))
    rep = lipcheck.analyze(path)
    assert rep.network.composition is not None and "merged" in rep.network.composition, rep.network.reason
    s = (m.bn.weight / torch.sqrt(m.bn.running_var + m.bn.eps)).detach().double() * m.c.reshape(-1).double()
    w1, w2 = m.project.weight.detach().double()[:, :, 0, 0], m.expand.weight.detach().double()[:, :, 0, 0]
    pair = _sigma(w2 @ torch.diag(s) @ w1)
    assert pair < 0.9 * _sigma(w2) * _sigma(torch.diag(s) @ w1)  # the merge is what makes it tighter
    # the tail: a 3x3 conv on 8x3x3 (stride 2 left 3x3), its exact norm from its explicit matrix
    eye = torch.eye(8 * 3 * 3, dtype=torch.float64).reshape(-1, 8, 3, 3)
    tail = m.tail.double()
    with torch.no_grad():
        mat = (tail(eye) - tail(torch.zeros(1, 8, 3, 3, dtype=torch.float64))).reshape(8 * 3 * 3, -1).T
    expected = pair * float(torch.linalg.matrix_norm(mat, 2))
    assert rep.network.lipschitz_bound == pytest.approx(expected, rel=1e-5)
    assert rep.network.lipschitz_bound >= expected * (1 - 1e-9)
    note = next(r.note for r in rep.layers if r.note and "merged with" in r.note)
    assert "from" in note


def test_no_merge_through_a_scale_of_tokens(tmp_path: Path) -> None:
    """MatMul on (batch, tokens, features) -> Mul by a constant along axis 1 (the tokens, here
    as many as the features) -> MatMul: not a per-feature scale, so no merge; the bound stays
    the product and is above the exact constant max_t |c_t| ||W2 W1||."""

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 4, bias=False), nn.Linear(4, 3, bias=False)
            self.register_buffer("c", torch.tensor([0.1, 3.0, 0.2, 0.5]).reshape(1, 4, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x) * self.c)

    torch.manual_seed(5)
    m = Tokens().eval()
    path = tmp_path / "tokens.onnx"
    torch.onnx.export(m, (torch.zeros(1, 4, 6),), str(path), dynamo=False, opset_version=17)
    rep = lipcheck.analyze(path)
    assert "merged" not in (rep.network.composition or "")
    exact = 3.0 * _sigma(m.b.weight.double() @ m.a.weight.double())
    assert rep.network.lipschitz_bound >= exact * (1 - 1e-9)
