"""What normalize changes in a model file, in terms every format's writer understands.

Plain data: the writers (:mod:`lipcheck.formats.onnx_write`, :mod:`lipcheck.formats.torch_write`)
apply it to the file they write.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError


@dataclass
class Rewrite:
    """What normalize changes in the written file: stored tensors multiplied by a factor;
    spectrally normalized layers whose effective weight grows by a factor (their stored u
    is divided by it, see :mod:`lipcheck.snorm`); in an ONNX graph, (node, input) pairs
    that get a Mul by a factor in front."""

    scales: dict[str, float] = field(default_factory=dict)  # stored tensor -> factor
    sn_layers: dict[str, float] = field(default_factory=dict)  # SN layer path -> factor on W
    muls: dict[tuple[int, int], float] = field(default_factory=dict)  # (node, input) -> Mul factor
    # stored matrix (or one expert of a fused tensor, "name[e]") -> the norm it must have at
    # most *as stored*, after rounding to its dtype (the safetensors writer re-measures it)
    caps: dict[str, float] = field(default_factory=dict)
    # stored matrix -> a lower estimate of its norm before scaling (the certificate's first candidate)
    estimates: dict[str, float] = field(default_factory=dict)

    def tensor_scales(self, tensors: Mapping[str, Any]) -> dict[str, float]:
        """Stored tensor -> factor, the spectrally normalized layers resolved against the
        writer's tensors: W = W_orig / u.W_orig v grows by s when u is divided by s."""
        from . import snorm

        out = dict(self.scales)
        if not self.sn_layers:
            return out
        by_u = {w.u: w for w in snorm.find(tensors).values()}
        by_layer = {w.layer: w for w in by_u.values()}
        for key, s in self.sn_layers.items():
            sn = by_u.get(key) or by_layer.get(key)
            if sn is None:
                raise InputError(f"layer {key}: its weight is computed in the model and is not a torch "
                                 "spectral norm lipcheck can rewrite; exclude it with --exclude")
            out[sn.u] = 1.0 / s
        return out
