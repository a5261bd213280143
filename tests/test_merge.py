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
