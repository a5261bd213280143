"""The fused attention kernels written out (lipcheck.formats.fused) compute what torch's own
kernels compute, masks included, in float64."""

from __future__ import annotations

import pytest
import torch
from conftest import randn
from torch import nn

from lipcheck.formats import fused

BATCH, SEQ, EMBED, HEADS = 2, 5, 8, 2


def _projections() -> list[torch.Tensor]:
    return [randn(3 * EMBED, EMBED, seed=1), randn(3 * EMBED, seed=2), randn(EMBED, EMBED, seed=3),
            randn(EMBED, seed=4)]


def _masks() -> list[tuple[int | None, torch.Tensor | None]]:
    causal = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)
    padding = torch.tensor([[False] * (SEQ - 2) + [True] * 2, [False] * SEQ])
    merged = torch.rand(BATCH, HEADS, SEQ, SEQ, generator=torch.Generator().manual_seed(5)) > 0.6
    merged[..., 0] = False  # no row left without a key
    additive = torch.zeros(SEQ, SEQ, dtype=torch.float64).masked_fill(causal, float("-inf"))
    return [(None, None), (0, causal), (1, padding), (2, merged), (0, additive)]


@pytest.mark.parametrize("mask_type, mask", _masks(), ids=["none", "attn", "padding", "merged", "additive"])
@pytest.mark.parametrize("average", [True, False])
def test_multi_head_attention_matches_the_native_kernel(mask_type: int | None, mask: torch.Tensor | None,
                                                        average: bool) -> None:
    x = randn(BATCH, SEQ, EMBED, seed=0)
    args = (x, x, x, EMBED, HEADS, *_projections(), mask, True, average, mask_type)
    want_out, want_weights = torch._native_multi_head_attention(*args)
    out, weights = fused.native_multi_head_attention(*args)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weights, want_weights, rtol=1e-12, atol=1e-12)


def test_cross_attention_projects_query_key_and_value_apart() -> None:
    query, memory = randn(BATCH, SEQ, EMBED, seed=0), randn(BATCH, SEQ, EMBED, seed=9)
    args = (query, memory, memory, EMBED, HEADS, *_projections(), None, True, True, None)
    want_out, want_weights = torch._native_multi_head_attention(*args)
    out, weights = fused.native_multi_head_attention(*args)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weights, want_weights, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_matches_the_module_and_the_native_kernel(norm_first: bool, activation: str) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(EMBED, HEADS, 16, batch_first=True, norm_first=norm_first,
                                       activation=activation, dtype=torch.float64).eval()
    x = randn(BATCH, SEQ, EMBED, seed=0)
    attn = layer.self_attn
    args = (x, EMBED, HEADS, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
            activation == "gelu", norm_first, layer.norm1.eps, layer.norm1.weight, layer.norm1.bias,
            layer.norm2.weight, layer.norm2.bias, layer.linear1.weight, layer.linear1.bias,
            layer.linear2.weight, layer.linear2.bias, None, None)
    with torch.no_grad():
        got = fused.transformer_encoder_layer_fwd(*args)
        native = torch._transformer_encoder_layer_fwd(*args)
    slow = layer(x).detach()  # grad enabled and weights that need it: the module's slow path
    torch.testing.assert_close(got, native, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, slow, rtol=1e-12, atol=1e-12)


def test_an_unknown_mask_type_is_refused() -> None:
    x = randn(BATCH, SEQ, EMBED, seed=0)
    with pytest.raises(NotImplementedError, match="mask of type 3"):
        fused.native_multi_head_attention(x, x, x, EMBED, HEADS, *_projections(),
                                          torch.zeros(SEQ, SEQ, dtype=torch.bool), True, True, 3)
