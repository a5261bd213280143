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


def _is_matrix(key: str, t: torch.Tensor) -> bool:
    """``t``: the tensor or its header (shape and dtype only)."""
    return t.is_floating_point() and (t.ndim == 2 or (t.ndim == 3 and "experts" in key.split(".")))


def update_rules(model: str, baseline: str, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                 updates: list[dict[str, Any]], *, max_delta_sigma: float | None,
                 max_relative_delta: float | None, allow_unmatched: bool = False) -> list[Any]:
    """Gate verdicts (:class:`lipcheck.gate.RuleResult`) on the update norms of ``b`` (the
    model) against ``a`` (the baseline checkpoint).

    Both rules use upper bounds, so a pass is a guarantee: ``delta_sigma_upper`` is the
    Cholesky certificate of sigma(W_B - W_A) (certified), and the relative change is
    ``delta_sigma_upper / sigma_a`` with ``sigma_a`` the Lanczos/power estimate of
    sigma(W_A), a lower bound, so the quotient is at least the true ratio."""
    from .formats.checkpoint_folder import header_of
    from .gate import RuleResult, name_list, over_by

    out: list[RuleResult] = []
    # headers only: update_norms has already read the tensors once
    only_new = [k for k in b if k not in a and _is_matrix(k, header_of(b, k))]
    only_old = [k for k in a if k not in b and _is_matrix(k, header_of(a, k))]
    reshaped = [k for k in b if k in a and _is_matrix(k, header_of(b, k))
                and header_of(a, k).shape != header_of(b, k).shape]
    text = f"{len(updates)} matrices compared with the baseline checkpoint {baseline}"
    parts = ([f"not in the baseline: {name_list(only_new)}"] if only_new else []) + (
        [f"missing from the model: {name_list(only_old)}"] if only_old else []) + (
        [f"shape changed: {name_list(reshaped)}"] if reshaped else [])
    if not updates:
        out.append(RuleResult(model, "update-match", False, 0, None,
                              f"no matrix to compare with the baseline checkpoint {baseline}"
                              + (f"; {'; '.join(parts)}" if parts else "")))
        return out
    if parts:
        extra = " (allowed by --allow-unmatched)" if allow_unmatched else \
            " (pass --allow-unmatched to gate only the matrices on both sides)"
        out.append(RuleResult(model, "update-match", allow_unmatched, len(updates), None,
                              f"{text}; {'; '.join(parts)}{extra}"))
    else:
        out.append(RuleResult(model, "update-match", True, len(updates), None, text))
    rules: list[tuple[str, float, str]] = []
    if max_delta_sigma is not None:
        rules.append(("max-delta-sigma", max_delta_sigma, "sigma(W - W_baseline)"))
    if max_relative_delta is not None:
        rules.append(("max-relative-delta", max_relative_delta, "sigma(W - W_baseline) / sigma(W_baseline)"))
    for rule, limit, what in rules:
        worst: tuple[float, str] | None = None
        failed = False
        for u in updates:
            upper = u.get("delta_sigma_upper")
            if rule == "max-relative-delta":
                base = u.get("sigma_a")
                if upper is not None and base == 0:
                    value: float | None = 0.0 if upper == 0 else math.inf
                else:
                    value = upper / base if upper is not None and base else None
            else:
                value = upper
            if value is None or math.isnan(value):
                failed = True
                out.append(RuleResult(model, rule, False, None, limit,
                                      f"matrix {u['name']}: no finite update norm (NaN or Inf in a weight)",
                                      u["name"]))
            elif value > limit:
                failed = True
                out.append(RuleResult(model, rule, False, value, limit,
                                      f"matrix {u['name']}: the certified upper bound {value:.6g} on {what} "
                                      f"is above {limit:.6g}: {over_by(value, limit)} [certified]", u["name"]))
            elif worst is None or value > worst[0]:
                worst = (value, u["name"])
        if not failed and worst is not None:
            out.append(RuleResult(model, rule, True, worst[0], limit,
                                  f"largest certified upper bound on {what}: {worst[0]:.6g} ({worst[1]}) "
                                  f"<= {limit:.6g} [certified]"))
    return out
