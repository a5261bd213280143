"""Attention heads of a transformer checkpoint: which rows (q, k, v) or columns (o) of a
projection belong to which head, from the model's ``config.json``.

Per-head rows answer "which head grew": head h of W_Q is rows h*d_head .. (h+1)*d_head of the
[out, in] matrix, the same for W_K and W_V with the key/value head count (grouped-query
attention shares each of those among several query heads), and head h of W_O is the same
range of its columns. A head's sigma is at most its matrix's.
"""

from __future__ import annotations

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
        heads = config.get("num_attention_heads")
        if not isinstance(heads, int) or heads <= 0:
            return None
        kv = config.get("num_key_value_heads", heads)
        kv = kv if isinstance(kv, int) and kv > 0 else heads
        dim = config.get("head_dim")
        if not isinstance(dim, int) or dim <= 0:
            hidden = config.get("hidden_size")
            if not isinstance(hidden, int) or hidden % heads:
                return None
            dim = hidden // heads
        return cls(heads, kv, dim)

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
