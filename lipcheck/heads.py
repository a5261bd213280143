"""Attention heads of a transformer checkpoint: which rows (q, k, v) or columns (o) of a
projection belong to which head, from the model's ``config.json``.

Per-head rows answer "which head grew": head h of W_Q is rows h*d_head .. (h+1)*d_head of the
[out, in] matrix, the same for W_K and W_V with the key/value head count (grouped-query
attention shares each of those among several query heads), and head h of W_O is the same
range of its columns. A head's sigma is at most its matrix's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

ROLES = ("q", "k", "v", "o")


@dataclass(frozen=True)
class Heads:
    heads: int  # query heads (num_attention_heads)
    kv_heads: int  # key/value heads (num_key_value_heads; = heads without grouped-query attention)
    head_dim: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Heads | None:
        """From a Hugging Face config (num_attention_heads, num_key_value_heads, head_dim or
        hidden_size); None when it does not say how many heads there are."""
        heads = config.get("num_attention_heads", config.get("n_head"))  # GPT-2: n_head, n_embd
        if not isinstance(heads, int) or heads <= 0:
            return None
        kv = config.get("num_key_value_heads", heads)
        kv = kv if isinstance(kv, int) and kv > 0 else heads
        dim = config.get("head_dim")
        if not isinstance(dim, int) or dim <= 0:
            hidden = config.get("hidden_size", config.get("n_embd"))
            if not isinstance(hidden, int) or hidden % heads:
                return None
            dim = hidden // heads
        return cls(heads, kv, dim)

    def split_fused(self, w: torch.Tensor) -> list[tuple[str, int, torch.Tensor]] | None:
        """A fused [q; k; v] projection ([out, in], q's heads then k's then v's rows, as Phi-3's
        qkv_proj, GPT-2's c_attn and MPT's Wqkv store them): (role, head, block) per head, or
        None when its rows do not fit the head counts."""
        d = self.head_dim
        if w.shape[0] != (self.heads + 2 * self.kv_heads) * d:
            return None
        out = [("q", h, w[h * d:(h + 1) * d]) for h in range(self.heads)]
        k0 = self.heads * d
        out += [("k", h, w[k0 + h * d:k0 + (h + 1) * d]) for h in range(self.kv_heads)]
        v0 = k0 + self.kv_heads * d
        out += [("v", h, w[v0 + h * d:v0 + (h + 1) * d]) for h in range(self.kv_heads)]
        return out

    def split(self, role: str, w: torch.Tensor) -> list[torch.Tensor] | None:
        """The per-head blocks of an [out, in] projection of ``role``, or None when its shape
        does not fit the head counts (the caller says so)."""
        if role == "o":
            if w.shape[1] != self.heads * self.head_dim:
                return None
            return [w[:, h * self.head_dim:(h + 1) * self.head_dim] for h in range(self.heads)]
        count = self.heads if role == "q" else self.kv_heads
        if w.shape[0] != count * self.head_dim:
            return None
        return [w[h * self.head_dim:(h + 1) * self.head_dim] for h in range(count)]


# --------------------------------------------------------------------------- attention logits
#
# For a pre-norm block whose q and k projections read the output of the block's input norm
# (RMSNorm or LayerNorm, weight γ, bias β: zero for RMSNorm):
#
#   the normalized vector x̂ = x / sqrt(mean(x²) + ε) (LayerNorm: x - mean(x) first) has
#   ‖x̂‖² = d·mean(x²) / (mean(x²) + ε) ≤ d, so the norm's output y = γ ⊙ x̂ + β has
#   ‖y‖ ≤ r = max|γ|·√d + ‖β‖ for every input, whatever its scale;
#   q = W_Q^h y + b_Q^h has ‖q‖ ≤ σ(W_Q^h)·r + ‖b_Q^h‖, k likewise with the head's key/value
#   group; rotary embeddings rotate q and k per position (orthogonal), which keeps their norms;
#   so by Cauchy–Schwarz |q_i·k_j| / √d_head ≤ ‖q_i‖·‖k_j‖ / √d_head.
#
# Bias-free, this is σ(W_Q^h)·σ(W_K^h)·d·max|γ|² / √d_head. With QK-norm (Qwen3's q_norm and
# k_norm: an RMSNorm over each head's q and k, after the projections), ‖q‖ ≤ max|γ_q|·√d_head
# and ‖k‖ ≤ max|γ_k|·√d_head, so the bound is max|γ_q|·max|γ_k|·√d_head, whatever the weights.
# σ(W) is the row's upper bound (certified, or probabilistic when the row's is).

HEAD_TAG = re.compile(r"\[(?:[qkv]\.)?h(\d+)\]$")  # a head row's name: <matrix>[h3] or <fused>[k.h1]
INPUT_NORMS = ("input_layernorm", "ln_1", "attention_norm", "self_attn_layer_norm", "norm1", "ln_attn")
ASSUMPTIONS = ("logit bounds |q_i.k_j|/sqrt(d_head) per head: pre-norm blocks whose q and k read the "
               "block's input norm ({norms}); the bound holds for every input, sequence length and "
               "position (rotary embeddings keep norms); with QK-norm it is max|g_q| max|g_k| sqrt(d_head)")


@dataclass
class LogitBound:
    """A bound on one head's attention logits |q_i·k_j|/√d_head, from the weights alone."""

    block: int
    head: int
    kv_head: int
    bound: float
    method: str  # "input-norm" or "qk-norm"
    upper_kind: str  # of the sigma upper bounds it is built on: certified or probabilistic
    failure_probability: float | None = None


def _block_keys(keys: list[str]) -> dict[int, dict[str, str]]:
    """block -> {"q", "k", "norm", "q_norm", "k_norm"}: the keys of its weights."""
    from . import names

    found: dict[int, dict[str, str]] = {}
    for key in keys:
        if not key.endswith(".weight"):
            continue
        parsed = names.parse(key)
        if parsed.block is None or parsed.expert is not None:
            continue
        stem = key[: -len(".weight")]
        leaf = stem.rpartition(".")[2]
        slot = parsed.role if parsed.role in ("q", "k", "qkv") else None
        if leaf in INPUT_NORMS:
            slot = "norm"
        elif leaf in ("q_norm", "k_norm", "q_layernorm", "k_layernorm"):
            slot = leaf[0] + "_norm"
        if slot is not None:
            found.setdefault(parsed.block, {})[slot] = key
    return found


def _vector(tensors: Any, key: str) -> torch.Tensor | None:
    try:
        t = tensors[key]
    except KeyError:
        return None
    if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim == 1):
        return None
    return t.detach().to(torch.float64)


def logit_bounds(rows: list[Any], tensors: Any, heads: Heads) -> tuple[list[LogitBound], list[str]]:
    """Per block and query head, a bound on the attention logits (see above), and notes on the
    blocks it does not apply to. ``rows``: the report's rows, head rows included."""
    by_matrix: dict[tuple[int, str], dict[int, Any]] = {}
    for r in rows:
        found = HEAD_TAG.search(r.name) if r.kind == "head" else None
        if found and r.role in ("q", "k") and r.block is not None:
            by_matrix.setdefault((r.block, r.role), {})[int(found.group(1))] = r
    group = heads.heads // heads.kv_heads if heads.kv_heads and heads.heads % heads.kv_heads == 0 else None
    out: list[LogitBound] = []
    missing: list[str] = []
    root_d = math.sqrt(heads.head_dim)
    for block, keys in sorted(_block_keys(list(tensors)).items()):
        fused = "qkv" in keys and ("q" not in keys or "k" not in keys)
        if not fused and ("q" not in keys or "k" not in keys) or group is None:
            continue
        q_norm = _vector(tensors, keys["q_norm"]) if "q_norm" in keys else None
        k_norm = _vector(tensors, keys["k_norm"]) if "k_norm" in keys else None
        if q_norm is not None and k_norm is not None:
            value = float(q_norm.abs().max()) * float(k_norm.abs().max()) * root_d
            out += [LogitBound(block, h, h // group, value, "qk-norm", "certified") for h in range(heads.heads)]
            continue
        gamma = _vector(tensors, keys["norm"]) if "norm" in keys else None
        q_rows, k_rows = by_matrix.get((block, "q"), {}), by_matrix.get((block, "k"), {})
        if gamma is None or len(q_rows) != heads.heads or len(k_rows) != heads.kv_heads:
            missing.append(str(block))
            continue
        beta = _vector(tensors, keys["norm"][: -len(".weight")] + ".bias")
        radius = float(gamma.abs().max()) * math.sqrt(gamma.numel()) + (float(beta.norm()) if beta is not None else 0.0)
        if fused:  # one bias [q; k; v]: k's part starts after the query heads'
            bias = _vector(tensors, keys["qkv"][: -len(".weight")] + ".bias")
            biases, k_offset = {"q": bias, "k": bias}, heads.heads * heads.head_dim
        else:
            biases = {role: _vector(tensors, keys[role][: -len(".weight")] + ".bias") for role in ("q", "k")}
            k_offset = 0
        for h in range(heads.heads):
            q, k = q_rows[h], k_rows[h // group]
            if q.sigma_upper is None or k.sigma_upper is None:
                continue
            q_len = q.sigma_upper * radius + _bias_norm(biases["q"], h * heads.head_dim, heads.head_dim)
            k_len = k.sigma_upper * radius + _bias_norm(biases["k"], k_offset + (h // group) * heads.head_dim,
                                                         heads.head_dim)
            kinds = {q.upper_kind, k.upper_kind}
            probabilistic = "probabilistic" in kinds
            delta = sum(r.failure_probability or 0.0 for r in (q, k)) if probabilistic else None
            out.append(LogitBound(block, h, h // group, q_len * k_len / root_d, "input-norm",
                                  "probabilistic" if probabilistic else "certified", delta))
    notes = []
    if out:
        notes.append(ASSUMPTIONS.format(norms=", ".join(INPUT_NORMS)))
    if missing:
        notes.append(f"no logit bound for block(s) {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}: "
                     "their input norm weight or q/k head rows were not found")
    return out, notes


def _bias_norm(bias: torch.Tensor | None, start: int, head_dim: int) -> float:
    if bias is None:
        return 0.0
    part = bias[start:start + head_dim]
    return float(part.norm()) if part.numel() == head_dim else math.inf
