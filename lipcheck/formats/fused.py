"""torch's fused attention kernels written out in the ops they fuse, for the ONNX export.

In eval mode, with no gradient needed, ``nn.MultiheadAttention`` and
``nn.TransformerEncoderLayer`` run one fused kernel each
(``aten::_native_multi_head_attention``, ``aten::_transformer_encoder_layer_fwd``). A model
traced that way (``with torch.no_grad(): torch.jit.trace(...)``) stores those kernels, and
neither ONNX exporter translates them. Decomposed into linear, softmax and layer_norm they
export like the slow path, with every projection a layer of its own.

The functions follow ``aten/src/ATen/native/transformers/attention.cpp`` and
``transformer.cpp``: attention is softmax(q k^T / sqrt(head_dim)) v per head; a mask of any
dtype marks with its non-zero entries the positions left out (the kernel turns it into a
bool mask); dropout is absent (these kernels run only in eval).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _mask(mask: Tensor, mask_type: int | None, batch: int, heads: int, tgt: int, src: int) -> Tensor:
    """The left-out positions as a bool (batch, heads, tgt, src) mask.

    mask_type: 0 an attention mask (tgt, src), 1 a key padding mask (batch, src), 2 a merged
    mask already (batch, heads, tgt, src), as ``MultiheadAttention.merge_masks`` makes them."""
    left_out = mask if mask.dtype == torch.bool else mask != 0
    if mask_type == 1:
        left_out = left_out.reshape(batch, 1, 1, src)
    elif mask_type == 0:
        left_out = left_out.reshape(1, 1, tgt, src)
    elif mask_type != 2:
        raise NotImplementedError(f"attention mask of type {mask_type}")
    return left_out.expand(batch, heads, tgt, src)


def attention(query: Tensor, key: Tensor, value: Tensor, embed_dim: int, num_heads: int, qkv_weight: Tensor,
              qkv_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor, mask: Tensor | None = None,
              mask_type: int | None = None) -> tuple[Tensor, Tensor]:
    """Batch-first multi-head attention; returns the output and the per-head weights."""
    batch, tgt, _ = query.shape
    src = key.shape[1]
    head_dim = embed_dim // num_heads
    if query is key and key is value:
        # One projection by the packed (3E, E) weight, as the slow path does for self-attention.
        q, k, v = F.linear(query, qkv_weight, qkv_bias).chunk(3, dim=-1)
    else:
        wq, wk, wv = qkv_weight.chunk(3)
        bq, bk, bv = qkv_bias.chunk(3)
        q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
    q = q.reshape(batch, tgt, num_heads, head_dim).transpose(1, 2)
    k = k.reshape(batch, src, num_heads, head_dim).transpose(1, 2)
    v = v.reshape(batch, src, num_heads, head_dim).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
    if mask is not None:
        scores = scores.masked_fill(_mask(mask, mask_type, batch, num_heads, tgt, src), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, tgt, embed_dim)
    return F.linear(out, proj_weight, proj_bias), weights


def native_multi_head_attention(query: Tensor, key: Tensor, value: Tensor, embed_dim: int, num_head: int,
                                qkv_weight: Tensor, qkv_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor,
                                mask: Tensor | None = None, need_weights: bool = True,
                                average_attn_weights: bool = True,
                                mask_type: int | None = None) -> tuple[Tensor, Tensor]:
    """``aten::_native_multi_head_attention``."""
    out, weights = attention(query, key, value, embed_dim, num_head, qkv_weight, qkv_bias, proj_weight,
                             proj_bias, mask, mask_type)
    if not need_weights:
        return out, out.new_empty(0)
    return out, weights.mean(dim=1) if average_attn_weights else weights


def transformer_encoder_layer_fwd(src: Tensor, embed_dim: int, num_heads: int, qkv_weight: Tensor,
                                  qkv_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor, use_gelu: bool,
                                  norm_first: bool, eps: float, norm_weight_1: Tensor, norm_bias_1: Tensor,
                                  norm_weight_2: Tensor, norm_bias_2: Tensor, ffn_weight_1: Tensor,
                                  ffn_bias_1: Tensor, ffn_weight_2: Tensor, ffn_bias_2: Tensor,
                                  mask: Tensor | None = None, mask_type: int | None = None) -> Tensor:
    """``aten::_transformer_encoder_layer_fwd``: attention and feed-forward blocks, each with a
    residual and a layer norm (before the block with ``norm_first``, after it without)."""

    def attend(x: Tensor) -> Tensor:
        return attention(x, x, x, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias,
                         mask, mask_type)[0]

    def feed_forward(x: Tensor) -> Tensor:
        hidden = F.linear(x, ffn_weight_1, ffn_bias_1)
        return F.linear(F.gelu(hidden) if use_gelu else F.relu(hidden), ffn_weight_2, ffn_bias_2)

    def norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return F.layer_norm(x, (embed_dim,), weight, bias, eps)

    x = src
    if norm_first:
        x = x + attend(norm(x, norm_weight_1, norm_bias_1))
        return x + feed_forward(norm(x, norm_weight_2, norm_bias_2))
    x = norm(x + attend(x), norm_weight_1, norm_bias_1)
    return norm(x + feed_forward(x), norm_weight_2, norm_bias_2)


def table() -> dict[Any, Any]:
    """The decompositions, keyed by the op overloads ``ExportedProgram.run_decompositions`` takes."""
    aten = torch.ops.aten
    return {
        aten._native_multi_head_attention.default: native_multi_head_attention,
        aten._transformer_encoder_layer_fwd.default: transformer_encoder_layer_fwd,
    }
