"""Modules traced inside lipcheck: parametrized spectral norm (aten::vdot) exports, and a
module the TorchScript-based exporter cannot translate goes through the dynamo exporter;
when every step fails, the error names each one."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import lipcheck
from lipcheck.cli import run


def test_parametrized_spectral_norm_torchscript_is_traced(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 2))
    model.train()
    model(torch.randn(4, 8))
    with torch.no_grad():
        model[0].parametrizations.weight.original.add_(0.1)  # u, v a step behind
    model.eval()
    path = tmp_path / "sn.ts.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, torch.zeros(1, 8)), str(path))
    rows = {r.name: r for r in lipcheck.analyze(path, (1, 8), trust=True).layers}
    effective = model[0].weight.detach().double()  # W_orig / u.(W_orig v), torch's own
    assert rows["0"].sigma == pytest.approx(float(torch.linalg.matrix_norm(effective, 2)), rel=1e-5)


def test_attention_module_rows_are_reported(tmp_path: Path) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    path = tmp_path / "enc.pt"
    torch.save(layer, path)
    report = lipcheck.analyze(path, (1, 4, 16), trust=True)
    assert not report.network.bounded  # attention is not globally Lipschitz
    names = {r.name for r in report.layers if r.kind == "linear"}
    assert {"self_attn.out_proj", "linear1", "linear2"} <= names
    exact = float(torch.linalg.matrix_norm(layer.linear1.weight.detach().double(), 2))
    row = next(r for r in report.layers if r.name == "linear1")
    assert row.sigma == pytest.approx(exact, rel=1e-5)


def test_every_failed_step_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    path = tmp_path / "enc.ts.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(layer, torch.zeros(1, 4, 16), check_trace=False), str(path))
    code = run(["inspect", str(path), "--input-shape", "1,4,16", "--trust", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "TorchScript-based exporter (opset 17)" in err and "dynamo exporter" in err
