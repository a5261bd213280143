"""--per-head on fused q/k/v projections (Phi-3 qkv_proj with grouped-query heads, GPT-2's
transposed c_attn with biases and LayerNorm): head rows against float64 SVDs of the slices,
and the logit bound against its formula and gradient ascent through a real LayerNorm."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

import lipcheck

D, H, KV, DH = 32, 4, 2, 8


def _save(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, object]) -> Path:
    path.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


def _norm(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.double(), 2))


def test_phi3_qkv_proj_heads(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn((H + 2 * KV) * DH, D, generator=g) / math.sqrt(D)
    t = {"model.layers.0.self_attn.qkv_proj.weight": qkv,
         "model.layers.0.self_attn.o_proj.weight": torch.randn(D, H * DH, generator=g),
         "model.layers.0.input_layernorm.weight": 0.5 + torch.rand(D, generator=g)}
    folder = _save(tmp_path / "phi", t, {"model_type": "phi3", "num_attention_heads": H,
                                         "num_key_value_heads": KV, "hidden_size": D})
    doc = lipcheck.analyze(folder, per_head=True).to_dict()
    rows = {r["name"]: r for r in doc["layers"]}
    base = "model.layers.0.self_attn.qkv_proj"
    slices = {f"q.h{h}": qkv[h * DH:(h + 1) * DH] for h in range(H)}
    slices |= {f"k.h{h}": qkv[(H + h) * DH:(H + h + 1) * DH] for h in range(KV)}
    slices |= {f"v.h{h}": qkv[(H + KV + h) * DH:(H + KV + h + 1) * DH] for h in range(KV)}
    for tag, block in slices.items():
        r = rows[f"{base}[{tag}]"]
        exact = _norm(block)
        assert r["kind"] == "head" and r["role"] == tag[0] and r["block"] == 0
        assert r["sigma"] <= exact * (1 + 1e-6) and r["sigma_upper"] >= exact * (1 - 1e-12)
        assert abs(r["sigma"] - exact) <= 1e-5 * exact
    # the logit bound pairs query head h with key head h // 2, from the fused rows
    gamma = float(t["model.layers.0.input_layernorm.weight"].abs().max())
    for b in doc["logit_bounds"]:
        formula = (_norm(slices[f"q.h{b['head']}"]) * _norm(slices[f"k.h{b['head'] // 2}"])
                   * D * gamma**2 / math.sqrt(DH))
        assert b["kv_head"] == b["head"] // 2
        assert formula * (1 - 1e-12) <= b["bound"] <= formula * (1 + 1e-5)
    assert len(doc["logit_bounds"]) == H


def _gpt2(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"h.0.attn.c_attn.weight": torch.randn(D, 3 * D, generator=g) / math.sqrt(D),  # Conv1D: [in, out]
            "h.0.attn.c_attn.bias": torch.randn(3 * D, generator=g),
            "h.0.attn.c_proj.weight": torch.randn(D, D, generator=g),
            "h.0.ln_1.weight": 0.5 + torch.rand(D, generator=g),
            "h.0.ln_1.bias": 0.3 * torch.randn(D, generator=g)}


def test_gpt2_c_attn_heads_and_logit_bound(tmp_path: Path) -> None:
    t = _gpt2(1)
    folder = _save(tmp_path / "gpt2", t, {"model_type": "gpt2", "n_head": H, "n_embd": D})
    doc = lipcheck.analyze(folder, per_head=True).to_dict()
    rows = {r["name"]: r for r in doc["layers"]}
    w = t["h.0.attn.c_attn.weight"].T  # [3D, in]
    for role, offset in (("q", 0), ("k", D), ("v", 2 * D)):
        for h in range(H):
            exact = _norm(w[offset + h * DH:offset + (h + 1) * DH])
            r = rows[f"h.0.attn.c_attn[{role}.h{h}]"]
            assert r["sigma_upper"] >= exact * (1 - 1e-12) and abs(r["sigma"] - exact) <= 1e-5 * exact
    gamma, beta, bias = t["h.0.ln_1.weight"].double(), t["h.0.ln_1.bias"].double(), t["h.0.attn.c_attn.bias"].double()
    radius = float(gamma.abs().max()) * math.sqrt(D) + float(beta.norm())
    bounds = {b["head"]: b for b in doc["logit_bounds"]}
    assert sorted(bounds) == list(range(H))
    for h, b in bounds.items():
        q = _norm(w[h * DH:(h + 1) * DH]) * radius + float(bias[h * DH:(h + 1) * DH].norm())
        k = _norm(w[D + h * DH:D + (h + 1) * DH]) * radius + float(bias[D + h * DH:D + (h + 1) * DH].norm())
        assert q * k / math.sqrt(DH) * (1 - 1e-12) <= b["bound"] <= q * k / math.sqrt(DH) * (1 + 1e-5)
    # gradient ascent through a real LayerNorm (eps 1e-5) stays below head 1's bound
    wd = w.double()
    best = 0.0
    for seed in range(4):
        x = torch.randn(2, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=0.05)
        for _ in range(250):
            y = torch.nn.functional.layer_norm(x, (D,), gamma, beta, eps=1e-5)
            qkv = y @ wd.T + bias
            value = (qkv[0, DH:2 * DH] @ qkv[1, D + DH:D + 2 * DH]).abs() / math.sqrt(DH)
            best = max(best, float(value.detach()))
            opt.zero_grad()
            (-value).backward()
            opt.step()
    assert best <= bounds[1]["bound"]


def test_neox_interleaved_layout_gets_no_head_rows(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    t = {"gpt_neox.layers.0.attention.query_key_value.weight": torch.randn(3 * D, D, generator=g)}
    folder = _save(tmp_path / "neox", t, {"model_type": "gpt_neox", "num_attention_heads": H, "hidden_size": D})
    doc = lipcheck.analyze(folder, per_head=True).to_dict()
    assert not any(r["kind"] == "head" for r in doc["layers"])
    assert any("query_key_value" in n and "do not fit" in n for n in doc["notes"])
