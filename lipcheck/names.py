"""What a transformer checkpoint's parameter names say: the block a matrix belongs to and
its role (q, k, v, o, gate, up, down, embed, lm_head, norm, ...), and how it is laid out.

Covers the common families: Llama, Mistral, Qwen2/3 and their MoE variants, Mixtral,
Phi-3 (fused qkv and gate_up), GPT-2 (``Conv1D``: weights stored as [in, out]) and BERT.
A name it does not know gets no role, never a wrong one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")

# (pattern on the name without its ".weight", role), first match wins.
_ROLES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"(^|\.)lm_head$", "lm_head"),
    (r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|"
     r"embed_positions|tok_embeddings)$", "embed"),
    (r"(^|\.)(q_proj|query|wq)$", "q"),
    (r"(^|\.)(k_proj|key|wk)$", "k"),
    (r"(^|\.)(v_proj|value|wv)$", "v"),
    (r"(^|\.)(qkv_proj|c_attn|query_key_value|Wqkv)$", "qkv"),
    (r"(^|\.)(o_proj|wo|out_proj|dense_proj)$", "o"),
    (r"\.attn\.c_proj$", "o"),                      # GPT-2
    (r"\.attention\.output\.dense$", "o"),          # BERT
    (r"(^|\.)(gate_up_proj)$", "gate_up"),
    (r"(^|\.)(gate_proj|w1)$", "gate"),
    (r"(^|\.)(up_proj|w3|c_fc)$", "up"),
    (r"\.intermediate\.dense$", "up"),              # BERT
    (r"(^|\.)(down_proj|w2)$", "down"),
    (r"\.mlp\.c_proj$", "down"),                    # GPT-2
    (r"\.output\.dense$", "down"),                  # BERT (after attention.output.dense)
    (r"(^|\.)(block_sparse_moe\.gate|mlp\.gate|router)$", "router"),
    (r"(norm|ln_\d|ln_f|layernorm|LayerNorm)$", "norm"),
))
# GPT-2's Conv1D keeps its weight as [in, out]: x @ W.
_TRANSPOSED = re.compile(r"(^|\.)(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$")
_SUFFIXES = (".weight", ".kernel")


@dataclass(frozen=True)
class ParamName:
    block: int | None
    role: str | None
    expert: int | None
    in_first: bool  # stored as [in, out] (GPT-2 Conv1D) rather than torch's [out, in]


def parse(name: str) -> ParamName:
    stem = name
    for suffix in _SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    block = _BLOCK.search(name)
    expert = _EXPERT.search(name)
    role = next((r for pattern, r in _ROLES if pattern.search(stem)), None)
    return ParamName(int(block.group(1)) if block else None, role,
                     int(expert.group(1)) if expert else None, bool(_TRANSPOSED.search(stem)))


def natural_key(name: str) -> list[int | str]:
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
