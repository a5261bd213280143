"""The per-head attention-logit bound of ``--per-head``: at least the exact formula from float64
SVDs of the head blocks, never below the largest |q_i.k_j|/sqrt(d_head) that gradient ascent
finds through a real RMSNorm (and rotary embedding), and attained on a rank-one construction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import save_file

import lipcheck
from lipcheck.heads import Heads, logit_bounds

D, H, KV, DH = 32, 4, 2, 8
EPS = 1e-6
SCHEMA = json.loads((Path(lipcheck.__file__).parent / "schema.json").read_text())


def _folder(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_attention_heads": H,
                                                  "num_key_value_heads": KV, "hidden_size": D}))
    return path


def _llama(seed: int, bias: bool = False, qk_norm: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {}
    for i in range(2):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = torch.randn(H * DH, D, generator=g) / math.sqrt(D)
        t[p + "self_attn.k_proj.weight"] = torch.randn(KV * DH, D, generator=g) / math.sqrt(D)
        t[p + "self_attn.v_proj.weight"] = torch.randn(KV * DH, D, generator=g) / math.sqrt(D)
        t[p + "self_attn.o_proj.weight"] = torch.randn(D, H * DH, generator=g) / math.sqrt(D)
        t[p + "input_layernorm.weight"] = 0.5 + torch.rand(D, generator=g)
        t[p + "post_attention_layernorm.weight"] = torch.ones(D)
        if bias:
            t[p + "self_attn.q_proj.bias"] = torch.randn(H * DH, generator=g)
            t[p + "self_attn.k_proj.bias"] = torch.randn(KV * DH, generator=g)
        if qk_norm:
            t[p + "self_attn.q_norm.weight"] = 0.5 + torch.rand(DH, generator=g)
            t[p + "self_attn.k_norm.weight"] = 0.5 + torch.rand(DH, generator=g)
    return t


def _rms(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    return gamma * x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS)


def _rope(v: torch.Tensor, pos: int) -> torch.Tensor:
    half = v.shape[-1] // 2
    freq = pos / (10000 ** (torch.arange(half, dtype=torch.float64) / half))
    c, s = torch.cos(freq), torch.sin(freq)
    a, b = v[..., :half], v[..., half:]
    return torch.cat([a * c - b * s, a * s + b * c], -1)


def _ascent(t: dict[str, torch.Tensor], block: int, head: int, qk_norm: bool = False,
            starts: int = 4, steps: int = 250, positions: tuple[int, int] = (3, 11)) -> float:
    """The largest |q_i.k_j|/sqrt(d_head) found by Adam over the two tokens' inputs (at these
    rotary positions)."""
    p = f"model.layers.{block}."
    f64 = {k: v.double() for k, v in t.items() if k.startswith(p)}
    group = H // KV
    wq = f64[p + "self_attn.q_proj.weight"][head * DH:(head + 1) * DH]
    wk = f64[p + "self_attn.k_proj.weight"][(head // group) * DH:(head // group + 1) * DH]
    bq = f64.get(p + "self_attn.q_proj.bias")
    bk = f64.get(p + "self_attn.k_proj.bias")
    bq = bq[head * DH:(head + 1) * DH] if bq is not None else 0.0
    bk = bk[(head // group) * DH:(head // group + 1) * DH] if bk is not None else 0.0
    gamma = f64[p + "input_layernorm.weight"]
    best = 0.0
    for seed in range(starts):
        gen = torch.Generator().manual_seed(100 + seed)
        x = torch.randn(2, D, generator=gen, dtype=torch.float64).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=0.05)
        for _ in range(steps):
            y = _rms(x, gamma)
            q, k = y[0] @ wq.T + bq, y[1] @ wk.T + bk
            if qk_norm:
                q, k = _rms(q, f64[p + "self_attn.q_norm.weight"]), _rms(k, f64[p + "self_attn.k_norm.weight"])
            value = (_rope(q, positions[0]) @ _rope(k, positions[1])).abs() / math.sqrt(DH)
            best = max(best, float(value.detach()))
            opt.zero_grad()
            (-value).backward()
            opt.step()
    return best


def _bounds(folder: Path) -> dict[tuple[int, int], dict[str, object]]:
    doc = lipcheck.analyze(folder, per_head=True).to_dict()
    jsonschema.validate(doc, SCHEMA)
    return {(b["block"], b["head"]): b for b in doc["logit_bounds"]}


def test_bound_is_the_formula_on_exact_norms_and_above_ascent(tmp_path: Path) -> None:
    t = _llama(0)
    bounds = _bounds(_folder(tmp_path / "m", t))
    assert sorted(bounds) == [(b, h) for b in range(2) for h in range(H)]
    for (block, head), b in bounds.items():
        p = f"model.layers.{block}."
        q = t[p + "self_attn.q_proj.weight"].double()[head * DH:(head + 1) * DH]
        k = t[p + "self_attn.k_proj.weight"].double()[(head // 2) * DH:(head // 2 + 1) * DH]
        gamma = t[p + "input_layernorm.weight"].double()
        exact = (float(torch.linalg.matrix_norm(q, 2)) * float(torch.linalg.matrix_norm(k, 2))
                 * D * float(gamma.abs().max()) ** 2 / math.sqrt(DH))
        assert b["kv_head"] == head // 2 and b["method"] == "input-norm" and b["upper_kind"] == "certified"
        assert exact * (1 - 1e-12) <= b["bound"] <= exact * (1 + 1e-5)  # two certificates, each ~1e-6 above
    for block, head in ((0, 0), (1, 3)):
        assert _ascent(t, block, head) <= bounds[(block, head)]["bound"]


def test_bound_is_attained_on_a_rank_one_construction(tmp_path: Path) -> None:
    """W_Q^h = W_K^h = u v^T and a constant gamma: q.k reaches d.c^2.|u|^2.|v|^2 at x along v
    (two tokens at the same rotary position; elsewhere the rotation between them lowers it)."""
    t = _llama(1)
    g = torch.Generator().manual_seed(7)
    u, v = torch.randn(DH, 1, generator=g), torch.randn(1, D, generator=g)
    for name in ("q_proj", "k_proj"):
        w = t[f"model.layers.0.self_attn.{name}.weight"]
        w[0:DH] = u @ v
    t["model.layers.0.input_layernorm.weight"] = torch.full((D,), 1.3)
    bound = _bounds(_folder(tmp_path / "m", t))[(0, 0)]["bound"]
    found = _ascent(t, 0, 0, positions=(5, 5))
    assert found <= bound
    assert found >= 0.99 * bound  # the bound is tight here: nothing absurdly loose


def test_biases_are_counted(tmp_path: Path) -> None:
    t = _llama(2, bias=True)
    bounds = _bounds(_folder(tmp_path / "m", t))
    bias_free = _bounds(_folder(tmp_path / "n", {k: v for k, v in t.items() if not k.endswith(".bias")}))
    for key, b in bounds.items():
        assert b["bound"] > bias_free[key]["bound"]
    assert _ascent(t, 0, 1) <= bounds[(0, 1)]["bound"]


def test_qk_norm_bound(tmp_path: Path) -> None:
    t = _llama(3, qk_norm=True)
    bounds = _bounds(_folder(tmp_path / "m", t))
    for (block, _), b in bounds.items():
        p = f"model.layers.{block}.self_attn."
        expected = (float(t[p + "q_norm.weight"].abs().max()) * float(t[p + "k_norm.weight"].abs().max())
                    * math.sqrt(DH))
        assert b["method"] == "qk-norm" and b["bound"] == pytest.approx(expected, rel=1e-12)
    assert _ascent(t, 1, 2, qk_norm=True) <= bounds[(1, 2)]["bound"]


def test_no_bound_without_the_input_norm(tmp_path: Path) -> None:
    t = {k: v for k, v in _llama(4).items() if "input_layernorm" not in k}
    doc = lipcheck.analyze(_folder(tmp_path / "m", t), per_head=True).to_dict()
    assert "logit_bounds" not in doc
    assert any(n.startswith("no logit bound for block(s) 0, 1") for n in doc["notes"])


def test_without_per_head_the_report_is_unchanged(tmp_path: Path) -> None:
    doc = lipcheck.analyze(_folder(tmp_path / "m", _llama(5))).to_dict()
    assert "logit_bounds" not in doc


def test_grouping_needs_whole_groups() -> None:
    heads = Heads(heads=6, kv_heads=4, head_dim=8)  # 6 query heads cannot share 4 kv heads evenly
    assert logit_bounds([], {}, heads) == ([], [])
