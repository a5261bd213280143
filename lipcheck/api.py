"""The public Python API: ``lipcheck.analyze`` and ``lipcheck.normalize``.

A façade over :mod:`lipcheck.pipeline` (load -> graph -> rules -> bound -> report) and
:mod:`lipcheck.normalization`; errors name the parameters (``tol``, ``input_shape``), not
the command line's flags.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .aliases import ProgressFn, Shape
from .options import DEFAULTS, Options

if TYPE_CHECKING:
    import torch

    from .interval import Domain
    from .normalization import NormalizeResult
    from .report import Report


def analyze(
    source: str | Path | torch.nn.Module,
    input_shape: Shape | None = None,
    *,
    tol: float = DEFAULTS.tol,
    max_iters: int = DEFAULTS.max_iters,
    seed: int = DEFAULTS.seed,
    device: str = DEFAULTS.device,
    dtype: str = DEFAULTS.dtype,
    method: str = DEFAULTS.method,
    certify: str = DEFAULTS.certify,
    failure_probability: float = DEFAULTS.failure_probability,
    trust: bool = False,
    progress: ProgressFn | None = None,
    architecture: str | None = None,
    empirical: bool = False,
    per_head: bool = False,
    start: str | None = None,
    input_range: str | Sequence[float] | Sequence[Sequence[float]] | None = None,
    input_radius: float | None = None,
) -> Report:
    """Analyse a model file or an in-memory ``nn.Module`` and return its Report.

    A module needs ``input_shape`` (batch first) to be traced; without it, and for
    a bare state_dict, only per-tensor numbers are reported and no network bound.
    ``architecture`` (``"package.module:factory"``, needs ``trust``) builds the network a
    state_dict or safetensors file belongs to, so it is analysed as a graph at ``input_shape``.
    ``certify``: "exact" (deterministic upper bounds), "probabilistic" or "auto" (the default:
    exact where cheap); a probabilistic row fails with probability ``failure_probability``.
    ``empirical``: also run the model to find a lower bound (``network.lipschitz_lower``).
    ``per_head``: for a model folder whose config.json gives the heads, one row per attention
    head of each q/k/v/o projection (kind ``head``).
    ``start``: the node, layer or value the network bound starts at (``--from``; e.g. the
    embedding's output), all that is not computed from it held fixed.
    ``input_range`` (``"0,1"``, ``(0, 1)`` or one pair per channel) and ``input_radius`` (an
    L2 ball around the range's middle, or 0): the input domain; ops with no global constant
    (products, attention, exp, normalisation by a variance the domain keeps from 0) get a
    local one there, and the network bound then holds on that domain only
    (``network.domain``).
    """
    import torch

    from .pipeline import make_settings, run_analysis

    domain = _domain(input_range, input_radius)
    settings = make_settings(Options(tol, max_iters, seed, device, dtype, method, certify, failure_probability))
    # adjoints and the chain optimisation use autograd: a caller's inference_mode() is lifted
    # for the analysis (tensors made inside it could not be recorded)
    with torch.inference_mode(False):
        return run_analysis(source, input_shape, settings, trust=trust, progress=progress,
                            architecture=architecture, empirical=empirical, per_head=per_head, start=start,
                            domain=domain).report


def _domain(input_range: str | Sequence[float] | Sequence[Sequence[float]] | None,
            input_radius: float | None) -> Domain | None:
    """The domain ``analyze`` was given: a range as the command line writes it, one pair, or
    one pair per channel; and a radius."""
    from .interval import parse_domain

    if input_range is None or isinstance(input_range, str):
        return parse_domain(input_range, input_radius)
    items: list[Any] = list(input_range)
    if items and all(isinstance(v, Sequence) for v in items):
        text = ";".join(",".join(repr(float(v)) for v in pair) for pair in items)
    else:
        text = ",".join(repr(float(v)) for v in items)
    return parse_domain(text, input_radius)


def normalize(
    source: str | Path,
    output: str | Path,
    *,
    target: float | None = None,
    clip: bool = False,
    budget: float | None = None,
    layers: list[str] | None = None,
    exclude: list[str] | None = None,
    mode: str = "bake",
    in_place: bool = False,
    force: bool = False,
    input_shape: Shape | None = None,
    tol: float = DEFAULTS.tol,
    max_iters: int = DEFAULTS.max_iters,
    seed: int = DEFAULTS.seed,
    device: str = DEFAULTS.device,
    dtype: str = DEFAULTS.dtype,
    method: str = DEFAULTS.method,
    certify: str = DEFAULTS.certify,
    failure_probability: float = DEFAULTS.failure_probability,
    trust: bool = False,
    architecture: str | None = None,
) -> NormalizeResult:
    """Write a spectrally normalized copy of ``source`` to ``output`` and re-inspect it.

    Returns a ``NormalizeResult`` (``.ok``, ``.failures``, ``.to_dict()``: exactly the
    ``--report`` JSON). See ``lipcheck normalize --help`` for the options.
    """
    import torch

    from .normalization import normalize as run_normalize
    from .pipeline import make_settings

    settings = make_settings(Options(tol, max_iters, seed, device, dtype, method, certify, failure_probability))
    with torch.inference_mode(False):  # as in analyze
        return run_normalize(source, output, target=target, clip=clip, budget=budget, layers=layers,
                             exclude=exclude, in_place=in_place, force=force, input_shape=input_shape,
                             settings=settings, trust=trust, mode=mode, architecture=architecture)
