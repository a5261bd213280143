"""The analysis pipeline: load -> graph -> per-op rules -> composed bound -> Report.

Used by the public façade (:mod:`lipcheck.api`), by ``normalize`` and by the command line;
each step lives in its own module (``formats``, ``graph``, ``rules``, ``bound``, ``report``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import snorm, spectral
from .aliases import ProgressFn, Shape
from .errors import UsageError
from .options import DEFAULTS, Options
from .report import ModelInfo, NetworkResult, Report

if TYPE_CHECKING:
    from .bound import Composition
    from .distributed import Spread
    from .formats import Loaded
    from .graph import Graph
    from .heads import Heads
    from .interval import Domain

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def make_settings(options: Options = DEFAULTS) -> spectral.Settings:
    """The numerics' settings for validated options (the device resolved: auto takes the
    GPU when torch sees one; cuda without one is refused)."""
    try:
        resolved = spectral.resolve_device(options.device)
    except ValueError as exc:
        raise UsageError(str(exc), param="device") from None
    return spectral.Settings(tol=options.tol, max_iters=options.max_iters, seed=options.seed,
                             device=resolved, dtype=TORCH_DTYPES[options.dtype], method=options.method,
                             certify=options.certify, failure_probability=options.failure_probability)


def settings_dict(s: spectral.Settings) -> dict[str, Any]:
    return {"tol": s.tol, "max_iters": s.max_iters, "seed": s.seed, "device": s.device,
            "dtype": str(s.dtype).replace("torch.", ""), "method": s.method, "certify": s.certify,
            "failure_probability": s.failure_probability}


def sha256_of(path: Path) -> str:
    """The file's sha256; for a model folder, of its files' names and contents in order."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@dataclass
class Analysis:
    """A report with what produced it: the loaded model and, for a graph, the graph and
    the per-op outcomes (what ``normalize`` needs to rewrite weights and re-compose)."""

    report: Report
    loaded: Loaded
    graph: Graph | None = None
    composition: Composition | None = None


def run_analysis(source: str | Path | torch.nn.Module, input_shape: Shape | None,
                 settings: spectral.Settings, *, trust: bool = False,
                 progress: ProgressFn | None = None, architecture: str | None = None,
                 empirical: bool = False, per_head: bool = False, spread: Spread | None = None,
                 start: str | None = None, domain: Domain | None = None) -> Analysis:
    """``empirical``: also search for a lower bound by running the model (lipcheck.lower).
    ``per_head``: rows per attention head of q/k/v/o (a model folder whose config.json gives
    the head counts). ``spread``: share a weight-only input's tensors out between processes
    (lipcheck.distributed); a model with a graph is analysed by rank 0 alone (the other ranks
    get ``distributed.NotMine``). ``start`` (--from): the node, layer or value the network
    bound starts at, all that is not computed from it held fixed (a graph model only).
    ``domain`` (--input-range / --input-radius): the inputs local constants hold for (a graph
    model only; lipcheck.interval)."""
    if input_shape is not None and (not input_shape or any(d <= 0 for d in input_shape)):
        raise UsageError(f"{{param}} must be positive dims, batch first, got {input_shape}", param="input_shape")
    if isinstance(source, torch.nn.Module):
        from .formats import Kind
        from .formats.module_export import from_module

        loaded: Loaded = from_module(source, Kind.MODULE, input_shape)
        info = ModelInfo(path="<in-memory>", sha256="", format=loaded.format.value)
    else:
        from .formats import load

        path = Path(source)
        loaded = load(path, trust=trust, input_shape=input_shape, architecture=architecture)
        info = ModelInfo(path=str(path), sha256=sha256_of(path), format=loaded.format.value)
    info.input_shape = list(input_shape) if input_shape else None
    heads = None
    if per_head:
        from .heads import Heads

        heads = Heads.from_config(loaded.config) if loaded.config else None
        if heads is None or loaded.tensors is None:
            raise UsageError("{param} needs a model folder whose config.json gives num_attention_heads "
                             "(and hidden_size or head_dim)", param="per_head")
    if spread is not None and loaded.onnx_model is not None:
        from .distributed import GRAPH_NOTE, NotMine

        if not spread.leader:
            raise NotMine(info.path)
        loaded.notes.append(GRAPH_NOTE)
    if start is not None and loaded.onnx_model is None:
        raise UsageError("{param} needs a model with a graph (ONNX, or a module traced with --input-shape); "
                         f"{info.path} has weights only", param="start")
    if domain is not None and loaded.onnx_model is None:
        raise UsageError("{param} needs a model with a graph (ONNX, or a module traced with --input-shape); "
                         f"{info.path} has weights only", param="input_range")
    analysis = analyze_loaded(loaded, info, settings, progress, heads, spread, start, domain)
    if empirical:
        from .lower import attach

        attach(analysis, source, settings.seed, domain)
    return analysis


def resolve_start(graph: Graph, name: str) -> str:
    """The value ``--from NAME`` starts at: a node's (the report's layer name's) first output,
    or a value of the graph by its own name."""
    node = next((n for n in graph.nodes if n.name == name), None)
    if node is not None and node.outputs and node.outputs[0]:
        return node.outputs[0]
    values = set(graph.producer) | set(graph.inputs)
    if name in values and name not in graph.static:
        return name
    import difflib

    close = difflib.get_close_matches(name, [n.name for n in graph.nodes] + sorted(values), n=3, cutoff=0.5)
    hint = f"; close names: {', '.join(close)}" if close else "; the report's layer names are node names"
    raise UsageError(f"{{param}} {name!r} names no node, layer or value of the graph{hint}", param="start")


def _estimates_within_certificates(rows: list[Any]) -> None:
    """An estimate is a lower bound on the norm and the certificate an upper one, so an fp32
    estimate above its float64 certificate is rounding (about 1e-5 relative at most): it is
    lowered to the certificate, and the row says so, rather than shown as a contradiction."""
    for row in rows:
        if row.sigma is not None and row.sigma_upper is not None and row.sigma > row.sigma_upper:
            text = (f"estimate {row.sigma:.9g} was above the certificate (float32 rounding): "
                    "shown as the certificate")
            row.note = f"{row.note}; {text}" if row.note else text
            row.sigma = row.sigma_upper
        if row.sigma_upper is not None and row.upper_kind is None:
            row.upper_kind = "certified"


def analyze_loaded(loaded: Any, info: ModelInfo, settings: spectral.Settings,
                   progress: ProgressFn | None = None, heads: Heads | None = None,
                   spread: Spread | None = None, start: str | None = None,
                   domain: Domain | None = None) -> Analysis:
    if loaded.onnx_model is not None:
        from .bound import compose
        from .graph import build_graph
        from .rules import Context

        graph = build_graph(loaded.onnx_model, loaded.input_shape)
        if info.input_shape is None and graph.inputs:
            dims = graph.known_shape(graph.inputs[0])
            info.input_shape = list(dims) if dims else None
        begin = resolve_start(graph, start) if start is not None else None
        boxes = None
        if domain is not None:
            from .interval import propagate

            boxes = propagate(graph, domain)
        with torch.no_grad():
            comp = compose(graph, Context(graph=graph, settings=settings, start=begin, boxes=boxes), progress)
        assert comp.network is not None
        notes = list(loaded.notes)
        if len(graph.inputs) > 1:
            notes.append(f"the model has {len(graph.inputs)} data inputs; the bound is with "
                         "respect to all of them concatenated")
        snorm.mark_graph_rows(graph, comp.rows)
        _estimates_within_certificates(comp.rows)
        report = Report(model=info, settings=settings_dict(settings), layers=comp.rows,
                        network=comp.network, skipped=comp.skipped, notes=notes)
        return Analysis(report, loaded, graph, comp)
    notes = list(loaded.notes)
    from .rules.tensors import tensor_rows

    rows, skipped = tensor_rows(loaded.tensors or {}, settings, notes, progress, heads, spread)
    _estimates_within_certificates(rows)
    logits: list[Any] = []
    if heads is not None:
        from .heads import logit_bounds

        logits, logit_notes = logit_bounds(rows, loaded.tensors or {}, heads)
        notes.extend(logit_notes)
    network = NetworkResult(lipschitz_bound=None, lipschitz_estimate=None, bounded=False,
                            certified=False, reason=loaded.why_no_graph)
    report = Report(model=info, settings=settings_dict(settings), layers=rows, network=network,
                    skipped=skipped, notes=notes, logit_bounds=logits)
    return Analysis(report, loaded)


