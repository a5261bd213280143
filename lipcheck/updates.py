"""Update norms between two checkpoints of one model: per matrix, the spectral norm of the
change W_B - W_A (what Muon/μP users track for every step), with its certificate.

Both files are read one tensor pair at a time (model folders, shards, state_dicts,
safetensors); matrices present in both with the same shape are compared, in float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from . import names, spectral
from .aliases import ProgressFn


def _matrices(key: str, t: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The matrices a stored tensor holds, under the names the report's rows use."""
    name = key[: -len(".weight")] if key.endswith(".weight") else key
    if t.ndim == 2:
        yield name, t
    elif t.ndim == 3 and "experts" in key.split("."):
        for e in range(t.shape[0]):
            yield f"{key}[{e}]", t[e]


def update_norms(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], settings: spectral.Settings,
                 progress: ProgressFn | None = None) -> list[dict[str, Any]]:
    """Per matrix in both: ``delta_sigma`` (estimate of sigma(W_B - W_A)), its certified
    ``delta_sigma_upper``, ``sigma_a``, ``relative`` = delta_sigma / sigma_a and
    ``delta_rms_to_rms`` = delta_sigma * sqrt(fan_in / fan_out)."""
    out: list[dict[str, Any]] = []
    keys = [k for k in a if k in b]
    for i, key in enumerate(keys):
        if progress is not None:
            progress(i, len(keys), key)
        ta, tb = a[key], b[key]
        if ta.shape != tb.shape or not (ta.is_floating_point() and tb.is_floating_point()):
            continue
        parsed = names.parse(key)
        for name, wa in _matrices(key, ta):
            wb = dict(_matrices(key, tb))[name]
            wa64, delta = wa.detach().double(), wb.detach().double() - wa.detach().double()
            est = spectral.matrix_estimate(delta, settings)
            cert = spectral.gram_upper_bound(delta, est.sigma)
            base = spectral.matrix_estimate(wa64, settings).sigma
            fan_out, fan_in = (delta.shape[1], delta.shape[0]) if parsed.in_first else delta.shape
            out.append({
                "name": name, "block": parsed.block, "role": parsed.role,
                "delta_sigma": est.sigma, "delta_sigma_upper": cert.value, "sigma_a": base,
                "relative": est.sigma / base if base else None,
                "delta_rms_to_rms": est.sigma * math.sqrt(fan_in / fan_out) if est.sigma is not None else None,
            })
    if progress is not None:
        progress(len(keys), len(keys), "")
    return out


def weights_of(path: Path, trust: bool) -> Mapping[str, torch.Tensor] | None:
    """The stored weights of a file or folder that has no graph, else None."""
    from .formats import load

    loaded = load(path, trust=trust)
    return loaded.tensors if loaded.onnx_model is None else None
