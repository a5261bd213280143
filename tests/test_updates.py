"""Update norms: sigma(W_B - W_A) per matrix between two checkpoints, checked against float64
``matrix_norm(ord=2)`` of the exact difference of the stored values."""

from __future__ import annotations

import json
import math
from importlib.resources import files
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import save_file

from lipcheck.cli import run


def _checkpoint(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 24, generator=g),
        "model.layers.0.mlp.experts.down_proj": torch.randn(3, 24, 16, generator=g),
        "model.norm.weight": torch.ones(16),
    }


def test_delta_sigma_is_the_norm_of_the_difference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _checkpoint(0)
    step = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(9)) for k, v in a.items()}
    for name, tensors in (("a", a), ("b", step)):
        (tmp_path / name).mkdir()
        save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(tmp_path / name / "model.safetensors"))
    assert run(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--format", "json", "--no-progress"]) == 0
    doc = json.loads(capsys.readouterr().out)
    jsonschema.validate(doc, json.loads(files("lipcheck").joinpath("schema.json").read_text()))
    updates = {u["name"]: u for u in doc["updates"]}
    stored_a = {k: v.to(torch.bfloat16).double() for k, v in a.items()}
    stored_b = {k: v.to(torch.bfloat16).double() for k, v in step.items()}
    q = "model.layers.0.self_attn.q_proj.weight"
    exact = float(torch.linalg.matrix_norm(stored_b[q] - stored_a[q], 2))
    row = updates["model.layers.0.self_attn.q_proj"]
    assert row["delta_sigma"] == pytest.approx(exact, rel=1e-6)
    assert exact <= row["delta_sigma_upper"] * (1 + 1e-9)
    assert row["relative"] == pytest.approx(exact / float(torch.linalg.matrix_norm(stored_a[q], 2)), rel=1e-5)
    assert row["delta_rms_to_rms"] == pytest.approx(row["delta_sigma"] * math.sqrt(24 / 16), rel=1e-12)
    assert row["role"] == "q" and row["block"] == 0
    e = "model.layers.0.mlp.experts.down_proj"
    for i in range(3):
        exact = float(torch.linalg.matrix_norm(stored_b[e][i] - stored_a[e][i], 2))
        assert updates[f"{e}[{i}]"]["delta_sigma"] == pytest.approx(exact, rel=1e-6)
    assert "model.norm" not in updates  # not a matrix
