"""The analysis pipeline: load -> graph -> per-op rules -> composed bound -> Report."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import snorm, spectral
from .errors import UsageError
from .report import LayerRow, ModelInfo, NetworkResult, Report, SkippedOp

DTYPES = {"float32": torch.float32, "float64": torch.float64}
ProgressFn = Callable[[int, int, str], None]


def make_settings(tol: float = 1e-6, max_iters: int = 1000, seed: int = 0, device: str = "auto",
                  dtype: str = "float32", method: str = "lanczos") -> spectral.Settings:
    if not (0 < tol < 1):
        raise UsageError(f"--tol must be between 0 and 1 (exclusive), got {tol}")
    if max_iters < 1:
        raise UsageError(f"--max-iters must be at least 1, got {max_iters}")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    if method not in spectral.METHODS:
        raise UsageError(f"--method must be one of {', '.join(spectral.METHODS)}, got {method}")
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {device}")
    try:
        resolved = spectral.resolve_device(device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return spectral.Settings(tol=tol, max_iters=max_iters, seed=seed, device=resolved,
                             dtype=DTYPES[dtype], method=method)


def settings_dict(s: spectral.Settings) -> dict[str, Any]:
    return {"tol": s.tol, "max_iters": s.max_iters, "seed": s.seed, "device": s.device,
            "dtype": str(s.dtype).replace("torch.", ""), "method": s.method}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def analyze(
    source: str | Path | torch.nn.Module,
    input_shape: tuple[int, ...] | None = None,
    *,
    tol: float = 1e-6,
    max_iters: int = 1000,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "float32",
    method: str = "lanczos",
    trust: bool = False,
    progress: ProgressFn | None = None,
    architecture: str | None = None,
) -> Report:
    """Analyse a model file or an in-memory ``nn.Module`` and return its Report.

    A module needs ``input_shape`` (batch first) to be traced; without it, and for
    a bare state_dict, only per-tensor numbers are reported and no network bound.
    ``architecture`` (``"package.module:factory"``, needs ``trust``) builds the network a
    state_dict or safetensors file belongs to, so it is analysed as a graph at ``input_shape``.
    """
    settings = make_settings(tol, max_iters, seed, device, dtype, method)
    return run_analysis(source, input_shape, settings, trust=trust, progress=progress,
                        architecture=architecture).report


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
    input_shape: tuple[int, ...] | None = None,
    tol: float = 1e-6,
    max_iters: int = 1000,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "float32",
    method: str = "lanczos",
    trust: bool = False,
    architecture: str | None = None,
) -> Any:
    """Write a spectrally normalized copy of ``source`` to ``output`` and re-inspect it.

    Returns a ``NormalizeResult`` (``.ok``, ``.failures``, ``.to_dict()``: exactly the
    ``--report`` JSON). See ``lipcheck normalize --help`` for the options.
    """
    from .normalization import normalize as run_normalize

    settings = make_settings(tol, max_iters, seed, device, dtype, method)
    return run_normalize(source, output, target=target, clip=clip, budget=budget, layers=layers,
                         exclude=exclude, in_place=in_place, force=force, input_shape=input_shape,
                         settings=settings, trust=trust, mode=mode, architecture=architecture)


@dataclass
class Analysis:
    """A report with what produced it: the loaded model and, for a graph, the graph and
    the per-op outcomes (what ``normalize`` needs to rewrite weights and re-compose)."""

    report: Report
    loaded: Any
    graph: Any = None
    composition: Any = None


def run_analysis(source: str | Path | torch.nn.Module, input_shape: tuple[int, ...] | None,
                 settings: spectral.Settings, *, trust: bool = False,
                 progress: ProgressFn | None = None, architecture: str | None = None) -> Analysis:
    from .formats import Loaded

    if input_shape is not None and (not input_shape or any(d <= 0 for d in input_shape)):
        raise UsageError(f"input shape must be positive dims, batch first, got {input_shape}")
    if isinstance(source, torch.nn.Module):
        from .formats.torch_format import _from_module

        loaded: Loaded = _from_module(source, "module", input_shape, scripted=False)
        info = ModelInfo(path="<in-memory>", sha256="", format=loaded.format)
    else:
        from .formats import load

        path = Path(source)
        loaded = load(path, trust=trust, input_shape=input_shape, architecture=architecture)
        info = ModelInfo(path=str(path), sha256=sha256_of(path), format=loaded.format)
    info.input_shape = list(input_shape) if input_shape else None
    return analyze_loaded(loaded, info, settings, progress)


def analyze_loaded(loaded: Any, info: ModelInfo, settings: spectral.Settings,
                   progress: ProgressFn | None = None) -> Analysis:
    if loaded.onnx_model is not None:
        from .bound import compose
        from .graph import build_graph
        from .rules import Context

        graph = build_graph(loaded.onnx_model, loaded.input_shape)
        if info.input_shape is None and graph.inputs:
            dims = graph.known_shape(graph.inputs[0])
            info.input_shape = list(dims) if dims else None
        with torch.no_grad():
            comp = compose(graph, Context(graph=graph, settings=settings), progress)
        assert comp.network is not None
        notes = list(loaded.notes)
        if len(graph.inputs) > 1:
            notes.append(f"the model has {len(graph.inputs)} data inputs; the bound is with "
                         "respect to all of them concatenated")
        snorm.mark_graph_rows(graph, comp.rows)
        report = Report(model=info, settings=settings_dict(settings), layers=comp.rows,
                        network=comp.network, skipped=comp.skipped, notes=notes)
        return Analysis(report, loaded, graph, comp)
    notes = list(loaded.notes)
    rows, skipped = tensor_rows(loaded.tensors or {}, settings, notes, progress)
    network = NetworkResult(lipschitz_bound=None, lipschitz_estimate=None, bounded=False,
                            certified=False, reason=loaded.why_no_graph)
    report = Report(model=info, settings=settings_dict(settings), layers=rows, network=network,
                    skipped=skipped, notes=notes)
    return Analysis(report, loaded)


PASSIVE_LEAVES = {"bias", "running_mean", "num_batches_tracked"}


def _float_weight(t: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """The tensor as float64 values, or None and why it cannot be analysed. float16 and
    bfloat16 widen exactly; quantized tensors are dequantized with their own scale."""
    if t.device.type == "meta":
        return None, "meta tensor: it has a shape but no values"
    if t.is_quantized:
        return t.dequantize().to(torch.float64), "dequantized"
    if t.layout != torch.strided:
        return None, f"{str(t.layout).replace('torch.', '')} tensor: only dense weights are analysed"
    if t.is_complex():
        return None, f"{t.dtype} tensor: complex weights are not analysed"
    if not t.is_floating_point():
        return None, (f"{t.dtype} tensor: not a float weight (integer weights carry no scale "
                      "to dequantize them with)")
    return t.detach().to(torch.float64), ""


def _effective_weights(tensors: dict[str, torch.Tensor], skipped: list[SkippedOp]
                       ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, str, int]], int]:
    """The tensors with each spectrally normalized parameter replaced by the weight the
    layer really uses (under ``<layer>.weight``, in the original's place), its u and v
    dropped; per new key the SN style, a description and the dim SN reshapes along (1 for
    a ConvTranspose); how many u/v tensors were dropped."""
    found = snorm.find(tensors)
    if not found:
        return tensors, {}, 0
    vectors = {k for sn in found.values() for k in (sn.u, sn.v)}
    out: dict[str, torch.Tensor] = {}
    notes: dict[str, tuple[str, str, int]] = {}
    for key, t in tensors.items():
        if key in vectors:
            continue
        sn = found.get(key)
        if sn is None:
            out[key] = t
            continue
        try:
            w, sigma_uv, dim = snorm.effective_weight(t, tensors[sn.u], tensors[sn.v])
        except (ValueError, RuntimeError) as exc:
            skipped.append(SkippedOp(key, "tensor", f"spectral-norm vectors do not fit the weight: {exc}"))
            continue
        name = sn.layer + ".weight" if sn.layer != "weight" else "weight"
        out[name] = w
        notes[name] = (sn.style, snorm.describe(sn, sigma_uv), dim)
    return out, notes, len(vectors)


def tensor_rows(tensors: dict[str, torch.Tensor], settings: spectral.Settings, notes: list[str],
                progress: ProgressFn | None = None) -> tuple[list[LayerRow], list[SkippedOp]]:
    """Per-tensor numbers for weights without a graph: 2-D = a linear layer, 3-5-D = a
    conv kernel (reshaped norm and a size-independent certified bound), BatchNorm from
    its weight and running_var. Every other tensor is either passive (biases, BatchNorm
    statistics: counted in a note) or listed under skipped with the reason."""
    rows: list[LayerRow] = []
    skipped: list[SkippedOp] = []
    passive = 0  # biases and BatchNorm statistics: no effect on a Lipschitz constant
    tensors, sn_notes, sn_vectors = _effective_weights(tensors, skipped)
    names = list(tensors)
    for i, key in enumerate(names):
        if progress is not None:
            progress(i, len(names), key)
        t = tensors[key]
        layer, _, leaf = key.rpartition(".")
        layer = layer or key
        bn_weight = tensors.get(f"{layer}.weight")
        bn_stat = (leaf == "running_var" and isinstance(bn_weight, torch.Tensor)
                   and bn_weight.ndim == 1 and bn_weight.shape == t.shape)
        if leaf in PASSIVE_LEAVES or leaf.startswith("bias_") or bn_stat:
            passive += 1
            continue
        w, how = _float_weight(t)
        if w is None:
            skipped.append(SkippedOp(key, "tensor", how))
            continue
        var_t = tensors.get(f"{layer}.running_var")
        if leaf == "weight" and t.ndim == 1 and isinstance(var_t, torch.Tensor) and var_t.shape == t.shape:
            var, _ = _float_weight(var_t)
            if var is None:
                var = torch.full_like(w, math.nan)
            value = float((w.abs() / torch.sqrt(var + 1e-5)).max()) if w.numel() else 0.0
            rows.append(LayerRow(name=layer, op="BatchNorm", kind="diagonal", sigma=value,
                                 sigma_upper=value, upper_method="exact (eps=1e-5)",
                                 lipschitz=value, iterations=0, converged=True))
        elif 2 <= t.ndim <= 5 and w.numel() == 0:
            # A map from or to an empty space is the zero map: norm 0, exactly.
            rows.append(LayerRow(name=key if leaf != "weight" else layer,
                                 op="Linear" if t.ndim == 2 else f"Conv{t.ndim - 2}d",
                                 kind="linear" if t.ndim == 2 else "conv", sigma=0.0,
                                 sigma_upper=0.0, upper_method="exact (empty)", lipschitz=0.0,
                                 iterations=0, converged=True, note=f"0-size weight {list(t.shape)}"))
        elif t.ndim == 2:
            est = spectral.matrix_estimate(w, settings)
            cert = spectral.gram_upper_bound(w, est.sigma)
            rows.append(LayerRow(name=key if leaf != "weight" else layer, op="Linear",
                                 kind="linear", sigma=est.sigma, sigma_upper=cert.value,
                                 upper_method=cert.method, lipschitz=cert.value,
                                 iterations=est.iterations, converged=est.converged))
            if key in sn_notes:
                rows[-1].sigma_matrix = est.sigma  # a matrix's reshaped norm is its norm
        elif 3 <= t.ndim <= 5:
            # A spectrally normalized ConvTranspose (SN reshapes it along dim 1) is reported
            # with SN's own reshape; the certificate is the same for a conv and its adjoint.
            transposed = key in sn_notes and sn_notes[key][2] == 1
            reshaped = snorm.as_matrix(w, 1) if transposed else w.reshape(w.shape[0], -1)
            est = spectral.matrix_estimate(reshaped, settings)
            cert = spectral.conv_reshape_upper_bound(w, 1)
            rows.append(LayerRow(
                name=key if leaf != "weight" else layer,
                op=f"Conv{'Transpose' if transposed else ''}{t.ndim - 2}d", kind="conv",
                sigma_matrix=est.sigma, sigma_upper=cert.value, upper_method=cert.method,
                lipschitz=cert.value, iterations=est.iterations, converged=est.converged,
                note="no graph: input size unknown; sigma_upper holds for any input size, "
                     "stride, dilation and groups with zero padding",
            ))
        else:
            skipped.append(SkippedOp(key, "tensor", f"{t.ndim}-D tensor: not a layer weight lipcheck knows"))
            continue
        if how:
            rows[-1].note = f"{how} ({t.dtype}); " + (rows[-1].note or "")
            rows[-1].note = rows[-1].note.rstrip("; ")
        if key in sn_notes:
            style, text, _ = sn_notes[key]
            rows[-1].spectral_norm = style
            rows[-1].note = f"{text}; {rows[-1].note}" if rows[-1].note else text
    if progress is not None:
        progress(len(names), len(names), "")
    if passive:
        notes.append(f"{passive} bias / BatchNorm statistics tensors: they do not change a "
                     "Lipschitz constant")
    if sn_vectors:
        notes.append(f"{len(sn_notes)} spectrally normalized weights: each row is the weight the layer "
                     f"uses in eval mode (W_orig / u.W_orig v, from the {sn_vectors} stored u, v vectors)")
    for row in rows:
        if row.lipschitz is not None and not math.isfinite(row.lipschitz):
            row.note = "weight has NaN or Inf"
    return rows, skipped
