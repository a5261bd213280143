"""The parametrization ``lipcheck normalize --mode parametrize`` registers after torch's own
spectral_norm, so training can continue with spectral normalization.

A file written in this mode holds ``{"format": "lipcheck-parametrized", "layers": {module
path: Scale factor}, "state_dict": ...}``: tensors only, so ``torch.load(path,
weights_only=True)`` reads it without lipcheck. :func:`load` puts it back into a fresh
instance of the same architecture, parametrizations included.
"""

from __future__ import annotations

import torch
from torch import nn


class Scale(nn.Module):
    """weight -> factor * weight.

    torch.nn.utils.parametrizations.spectral_norm divides a weight by the norm of its
    reshaped matrix, which is a convolution's Lipschitz constant only by accident. This
    constant factor, fixed when the file is written, turns that into the layer's true
    operator norm at the model's input size (target * sigma_matrix / sigma_operator).
    """

    def __init__(self, factor: float) -> None:
        super().__init__()
        if not factor > 0:
            raise ValueError(f"Scale factor must be positive, got {factor}")
        self.register_buffer("factor", torch.tensor(float(factor), dtype=torch.float64))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.get_buffer("factor").to(weight.dtype)


FORMAT = "lipcheck-parametrized"


def apply(module: nn.Module, layers: dict[str, float]) -> nn.Module:
    """Register spectral_norm and then Scale(factor) on ``weight`` of each named submodule."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import spectral_norm

    for path, factor in layers.items():
        sub = module.get_submodule(path)
        spectral_norm(sub)
        parametrize.register_parametrization(sub, "weight", Scale(factor))
    return module


def load(module: nn.Module, path: str) -> nn.Module:
    """Load a ``--mode parametrize`` file into a fresh instance of the same architecture.

    torch pickles parametrized modules only through their state_dict, so the file holds
    the state_dict plus which layers carry the parametrizations; this re-creates them and
    loads the weights, spectral_norm's u/v vectors and the Scale factors.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lipcheck --mode parametrize file")
    apply(module, {k: 1.0 for k in checkpoint["layers"]})
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()
