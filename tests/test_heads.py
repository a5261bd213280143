"""Per-head rows (--per-head) of a transformer checkpoint folder, against float64 SVDs of the
head blocks sliced in the test: rows for q, columns for o, grouped-query k/v heads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import Cli
from safetensors.torch import save_file

from lipcheck import api
from lipcheck.errors import UsageError

D, HEADS, KV, HD = 32, 4, 2, 8


def _folder(tmp_path: Path, config: dict | None) -> tuple[Path, dict[str, torch.Tensor]]:  # type: ignore[type-arg]
    g = torch.Generator().manual_seed(3)
    attn = "model.layers.0.self_attn"
    tensors = {f"{attn}.q_proj.weight": torch.randn(HEADS * HD, D, generator=g),
               f"{attn}.k_proj.weight": torch.randn(KV * HD, D, generator=g),
               f"{attn}.v_proj.weight": torch.randn(KV * HD, D, generator=g),
               f"{attn}.o_proj.weight": torch.randn(D, HEADS * HD, generator=g),
               "model.layers.0.mlp.up_proj.weight": torch.randn(64, D, generator=g)}
    tensors[f"{attn}.q_proj.weight"][HD:2 * HD] *= 4  # head 1 of q stands out
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder, tensors


def test_head_rows_are_the_norms_of_the_head_blocks(tmp_path: Path) -> None:
    folder, tensors = _folder(tmp_path, {"model_type": "llama", "hidden_size": D, "num_attention_heads": HEADS,
                                         "num_key_value_heads": KV})
    report = api.analyze(folder, per_head=True)
    rows = {r.name: r for r in report.layers}
    attn = "model.layers.0.self_attn"
    for role, count in (("q", HEADS), ("k", KV), ("v", KV), ("o", HEADS)):
        w = tensors[f"{attn}.{role}_proj.weight"].double()
        for h in range(count):
            block = w[:, h * HD:(h + 1) * HD] if role == "o" else w[h * HD:(h + 1) * HD]
            exact = torch.linalg.matrix_norm(block, ord=2).item()
            row = rows[f"{attn}.{role}_proj[h{h}]"]
            assert row.kind == "head" and row.role == role and row.block == 0
            assert row.sigma <= exact * (1 + 1e-6) and row.sigma == pytest.approx(exact, rel=1e-5)
            assert row.sigma_upper >= exact * (1 - 1e-12)
        assert f"{attn}.{role}_proj[h{count}]" not in rows
        # each head's sigma is at most its matrix's
        largest_head = max(rows[f"{attn}.{role}_proj[h{h}]"].sigma for h in range(count))
        assert largest_head <= rows[f"{attn}.{role}_proj"].sigma_upper
    assert max(range(HEADS), key=lambda h: rows[f"{attn}.q_proj[h{h}]"].sigma) == 1
    assert not any(name.startswith("model.layers.0.mlp.up_proj[") for name in rows)
    assert any("per-head rows: 4 query heads, 2 key/value heads of dimension 8" in n for n in report.notes)
    # without --per-head, no head rows
    assert not any(r.kind == "head" for r in api.analyze(folder).layers)


def test_per_head_needs_the_heads(tmp_path: Path, cli: Cli) -> None:
    folder, _ = _folder(tmp_path, None)
    with pytest.raises(UsageError, match="per_head needs a model folder whose config.json"):
        api.analyze(folder, per_head=True)
    code, out, err = cli("inspect", folder, "--per-head", "-f", "json")
    assert code == 2 and out == "" and "--per-head needs a model folder" in err
    (folder / "config.json").write_text(json.dumps({"hidden_size": D, "num_attention_heads": 5}))
    code, out, err = cli("inspect", folder, "--per-head", "-f", "json")
    assert code == 2 and "--per-head" in err  # 32 is not a multiple of 5 heads


def test_shapes_that_do_not_fit_get_no_head_rows(tmp_path: Path) -> None:
    folder, _ = _folder(tmp_path, {"head_dim": 8, "num_attention_heads": 2})  # q has 4 heads of 8
    report = api.analyze(folder, per_head=True)
    assert not any(r.name.startswith("model.layers.0.self_attn.q_proj[") for r in report.layers)
    assert any("shape or layout" in n and "do not fit them" in n and "q_proj" in n for n in report.notes)


def test_heatmap_shows_whole_matrices_not_heads(tmp_path: Path, cli: Cli) -> None:
    folder, tensors = _folder(tmp_path, {"hidden_size": D, "num_attention_heads": HEADS, "num_key_value_heads": KV})
    code, out, err = cli("inspect", folder, "--per-head", "-f", "json")
    assert code == 0, err
    doc = json.loads(out)
    q = next(r for r in doc["layers"] if r["name"] == "model.layers.0.self_attn.q_proj")
    code, page, err = cli("inspect", folder, "--per-head", "-f", "html")
    assert code == 0, err
    # the q cell of block 0 carries the matrix's sigma (its tooltip), not the last head's
    assert f"<title>q, block 0: sigma {q['sigma']:.6g}</title>" in page
