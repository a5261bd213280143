"""Spectral normalization: rescale layers to a target norm, write the model back in its own
format, then re-inspect the written file to prove the result.

Which number is normalized: each layer's *certified* constant (``sigma_upper``: for a
convolution, the operator norm at the model's input size), so after dividing by it the
layer's true norm is at most the target. Dividing by ``sigma_matrix`` (what
``torch.nn.utils.spectral_norm`` does) would not bound a convolution's norm.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import ops, spectral
from .aliases import ProgressFn
from .errors import InputError, UsageError
from .files import check_output_path
from .formats import Kind
from .pipeline import Analysis, run_analysis, sha256_of
from .report import Report, RowKind
from .rewrite import Rewrite

# The budget search aims this much below the budget, so re-measured certificates (which
# may differ from the first run in their last digits) still land under it.
BUDGET_MARGIN = 1e-3
# The start of a skip reason for a selected layer whose weight cannot be rewritten: normalize
# refuses to write when such a layer is above its target.
CANNOT = "cannot be rewritten:"


@dataclass
class LayerChange:
    name: str
    op: str
    weight: str | None
    before: float | None  # certified constant before
    target: float | None
    scale: float | None  # factor applied to the weight (None: untouched)
    skipped: str | None = None
    after_sigma: float | None = None
    after_upper: float | None = None
    ok: bool | None = None
    after_name: str | None = None  # the layer's name in the output, when it differs
    # How the layer's weight is rewritten: "scale" (the stored weight times scale),
    # "divide-u" (a spectrally normalized weight: its stored u divided by scale, see
    # lipcheck.snorm), "mul-node" (a weight computed in an ONNX graph: a Mul by scale
    # inserted before the layer reads it).
    rewrite: str | None = None
    node: tuple[int, int] | None = field(default=None, repr=False)  # "mul-node": (node index, input)
    estimate: float | None = field(default=None, repr=False)  # the row's sigma before (a lower estimate)


@dataclass
class NormalizeResult:
    before: Report
    after: Report | None
    changes: list[LayerChange]
    output: str
    budget: float | None
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        from .report import json_safe

        return json_safe({
            "before": self.before.to_dict(),
            "after": self.after.to_dict() if self.after else None,
            "output": self.output,
            "budget": self.budget,
            "layers": [{k: v for k, v in asdict(c).items() if k not in ("node", "estimate")} for c in self.changes],
            "ok": self.ok,
            "failures": list(self.failures),
        })


def _selected(name: str, layers: list[str] | None, exclude: list[str] | None) -> bool:
    if layers and not any(fnmatch.fnmatchcase(name, p) for p in layers):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude))


@dataclass(frozen=True)
class WeightRef:
    """Where a layer's weight is rewritten: ``key`` is the tensor (or, for "mul-node", the
    computed value) and ``how`` one of LayerChange.rewrite's values."""

    key: str | None
    how: str | None = None
    why: str | None = None  # why it cannot be rewritten
    node: int | None = None  # for "mul-node": the reading node's index and input slot
    slot: int | None = None


def _graph_weights(analysis: Analysis) -> dict[str, WeightRef]:
    """Row name -> where its weight is rewritten. A stored weight read by one layer is
    scaled in place; a shared one, or one the graph computes (a spectral norm exported as
    nodes), gets a Mul before the reading layer in an ONNX file. A torch model's computed
    weight is found among its spectrally normalized parameters when written."""
    graph = analysis.graph
    assert graph is not None
    onnx_file = analysis.loaded.format is Kind.ONNX
    uses: dict[str, int] = {}
    slots: dict[str, tuple[Any, int | None, str | None]] = {}
    for node in graph.nodes:
        if node.op not in ops.RESCALABLE:
            continue
        slot = ops.weight_input(node, graph.static)
        src = graph.origin.get(node.inputs[slot]) if slot is not None else None
        if src is not None:
            uses[src] = uses.get(src, 0) + 1
        slots[node.name] = (node, slot, src)
    found: dict[str, WeightRef] = {}
    for name, (node, slot, src) in slots.items():
        if src is not None and uses[src] == 1:
            found[name] = WeightRef(src, "scale")
        elif slot is None or node.inputs[slot] not in graph.static:
            found[name] = WeightRef(None, why="its weight is not a constant of the graph")
        elif onnx_file:
            found[name] = WeightRef(node.inputs[slot], "mul-node", node=node.index, slot=slot)
        elif src is not None:
            found[name] = WeightRef(src, why=f"its weight '{src}' is shared by {uses[src]} layers")
        else:
            found[name] = WeightRef(name, "divide-u")
    return found


def _tensor_weights(analysis: Analysis) -> dict[str, WeightRef]:
    from . import snorm

    tensors = analysis.loaded.tensors or {}
    sn = {w.layer: w for w in snorm.find(tensors).values()}
    out = {}
    for row in analysis.report.layers:
        if row.name in sn:
            out[row.name] = WeightRef(sn[row.name].u, "divide-u")
            continue
        key = f"{row.name}.weight" if f"{row.name}.weight" in tensors else row.name
        if key not in tensors and row.name.endswith("]"):
            from .formats.safetensors_write import split_key

            base, index = split_key(row.name)  # one expert of a fused [E, out, in] tensor
            if index is not None and base in tensors:
                out[row.name] = WeightRef(row.name, "scale")
                continue
        out[row.name] = WeightRef(key, "scale") if key in tensors else WeightRef(None, why="no tensor of that name")
    return out


def plan(analysis: Analysis, *, target: float | None, clip: bool, budget: float | None,
         layers: list[str] | None = None, exclude: list[str] | None = None) -> list[LayerChange]:
    """Per-layer scale factors. With a budget, every selected layer gets the same target t,
    the largest for which the re-composed certified network bound stays within the budget
    (times 1 - BUDGET_MARGIN); with --target as well, t is at most that target."""
    report = analysis.report
    weights = _graph_weights(analysis) if analysis.graph is not None else _tensor_weights(analysis)
    changes: list[LayerChange] = []
    for row in report.layers:
        if row.name not in weights:
            continue
        ref = weights[row.name]
        change = LayerChange(row.name, row.op, ref.key, row.lipschitz, None, None, rewrite=ref.how,
                             node=(ref.node, ref.slot) if ref.node is not None and ref.slot is not None else None,
                             estimate=row.sigma)
        if not _selected(row.name, layers, exclude):
            change.skipped = "not selected"
        elif row.kind == RowKind.EMBEDDING and not layers:
            change.skipped = "not selected: an embedding (a lookup table, not a linear map); select it with --layers"
        elif ref.why:
            change.skipped = f"{CANNOT} {ref.why}"
        elif row.lipschitz is None or not math.isfinite(row.lipschitz):
            change.skipped = "weight has NaN or Inf"
        elif row.lipschitz == 0.0:
            change.skipped = "all-zero weight: nothing to normalize"
        changes.append(change)
    active = [c for c in changes if c.skipped is None]
    if budget is not None:
        if analysis.graph is None:
            raise UsageError("{param} needs a network bound, and this model has no graph: "
                             + analysis.report.network.reason, param="budget")
        level = _budget_level(analysis, active, budget * (1 - BUDGET_MARGIN), clip)
        target = level if target is None else min(target, level)
    if target is None:
        target = 1.0
    for c in active:
        assert c.before is not None
        c.target = target
        if clip and c.before <= target:
            c.skipped = "already at or below the target (--clip)"
            continue
        c.scale = target / c.before
    for c in changes:
        if c.skipped and c.skipped.startswith(CANNOT):
            c.target = target
    return changes


def _refuse_unwritable(changes: list[LayerChange]) -> None:
    """Nothing is written while a selected layer above its target cannot be rewritten:
    a success message would be a lie about it."""
    stuck = [c for c in changes if c.skipped and c.skipped.startswith(CANNOT) and c.target is not None
             and (c.before is None or not c.before <= c.target)]
    if stuck:
        shown = "; ".join(f"{c.name} ({(c.skipped or '')[len(CANNOT):].strip()})" for c in stuck[:5])
        more = f" and {len(stuck) - 5} more" if len(stuck) > 5 else ""
        raise UsageError(f"cannot normalize {len(stuck)} selected layer(s) above the target: {shown}{more}; "
                         "nothing was written (leave them out with --exclude)")


def _scales_at(active: list[LayerChange], t: float, clip: bool) -> dict[str, float]:
    out = {}
    for c in active:
        assert c.before is not None
        if not (clip and c.before <= t):
            out[c.name] = t / c.before
    return out


def _budget_level(analysis: Analysis, active: list[LayerChange], budget: float, clip: bool) -> float:
    from .bound import network_bound

    assert analysis.graph is not None and analysis.composition is not None  # a graph was analysed
    graph, steps = analysis.graph, analysis.composition.steps

    def bound_at(t: float) -> float:
        return network_bound(graph, steps, _scales_at(active, t, clip))

    if not active:
        raise UsageError("{param}: no layer is selected for rescaling", param="budget")
    if not math.isfinite(bound_at(1.0)):
        raise UsageError(f"{{param}}: the network bound is not finite ({analysis.report.network.reason})",
                         param="budget")
    lo, hi = 1e-12, max(c.before or 0.0 for c in active) * 2
    if bound_at(hi) <= budget:
        return hi
    if bound_at(lo) > budget:
        raise UsageError(
            f"{{param}} {budget:.6g} cannot be reached by rescaling the selected layers: paths "
            f"that avoid them already give {bound_at(lo):.6g}",
            param="budget",
        )
    for _ in range(200):  # bisection in log space down to ~1e-12 relative
        mid = math.sqrt(lo * hi)
        if bound_at(mid) <= budget:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-12:
            break
    return lo


# --------------------------------------------------------------------------- writers


def _rewrite_of(changes: list[LayerChange]) -> Rewrite:
    """The file changes that carry out the planned scale factors."""
    out = Rewrite()
    for c in changes:
        if c.scale is None or not c.weight:
            continue
        if c.rewrite == "divide-u":
            out.sn_layers[c.weight] = c.scale
        elif c.rewrite == "mul-node":
            assert c.node is not None
            out.muls[c.node] = c.scale
        else:
            out.scales[c.weight] = c.scale
            if c.target is not None:
                out.caps[c.weight] = c.target
            if c.estimate is not None:
                out.estimates[c.weight] = c.estimate
    return out


def _source_module(analysis: Analysis, source: Path, trust: bool) -> nn.Module:
    """A fresh nn.Module of the input: the trusted pickle, or onnx2torch's conversion."""
    fmt = analysis.loaded.format
    if fmt is Kind.ONNX:
        import onnx2torch

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return onnx2torch.convert(analysis.loaded.onnx_model)
        except Exception as exc:  # noqa: BLE001 - onnx2torch fails on If, GRU, custom ops, ...
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise InputError(f"onnx2torch cannot convert this model ({type(exc).__name__}: {first}); "
                             "use --mode bake") from None
    if fmt in (Kind.PICKLED_MODULE, Kind.CHECKPOINT_MODULE):
        from .formats.state_dicts import find_module
        from .formats.torch_pickle import torch_load

        obj = torch_load(source, trust)
        module = obj if isinstance(obj, nn.Module) else find_module(obj)
        assert module is not None
        return module
    raise UsageError(f"{{param}} parametrize needs an nn.Module (a pickled module with --trust, or an ONNX "
                     f"model onnx2torch converts); a {fmt.value} input has none: use --mode bake", param="mode")


def _module_paths(analysis: Analysis, module: nn.Module, changes: list[LayerChange]) -> dict[str, str]:
    """Row name -> submodule path. A torch model's rows are named after its modules; for an
    ONNX model, onnx2torch names each module after its node."""
    if analysis.loaded.format is Kind.ONNX:
        assert analysis.graph is not None
        nodes = {n.name: n.onnx_name.lstrip("/") for n in analysis.graph.nodes}
        candidates = {c.name: nodes.get(c.name, "") for c in changes}
    else:
        candidates = {c.name: c.weight[: -len(".weight")] for c in changes
                      if c.weight and c.weight.endswith(".weight")}
    paths = {}
    for name, path in candidates.items():
        try:
            module.get_submodule(path)
        except AttributeError:
            continue
        if path:
            paths[name] = path
    return paths


def _write_parametrized(analysis: Analysis, source: Path, output: Path, changes: list[LayerChange],
                        trust: bool, seed: int) -> Callable[[], nn.Module]:
    """Write the parametrized model's state_dict (torch pickles parametrized modules no other
    way) with the layer list; return how to rebuild the model from the written file."""
    from . import parametrize

    module = _source_module(analysis, source, trust)
    paths = _module_paths(analysis, module, changes)
    for c in changes:
        if c.scale is not None and c.name not in paths:
            c.scale, c.skipped = None, f"{CANNOT} no matching module to parametrize"
        elif c.scale is not None and analysis.loaded.format is Kind.ONNX:
            c.after_name = paths[c.name]  # onnx2torch's module name becomes the weight's name
    _refuse_unwritable(changes)
    layers = _parametrize(module, changes, paths, seed)
    payload = {"format": parametrize.FORMAT, "layers": layers, "state_dict": module.state_dict()}
    from .formats.torch_write import save_object

    save_object(output, payload)

    def rebuild() -> nn.Module:
        """The written file loaded into a fresh copy of the model, its parametrized weights
        then fixed as plain tensors: exactly what the model computes in eval mode (and what
        the ONNX exporter, which lacks spectral_norm's vdot, can trace)."""
        from torch.nn.utils import parametrize as P

        rebuilt = parametrize.load(_source_module(analysis, source, trust), str(output))
        for sub in rebuilt.modules():
            if P.is_parametrized(sub, "weight"):
                P.remove_parametrizations(sub, "weight", leave_parametrized=True)
        return rebuilt

    return rebuild


def _write(analysis: Analysis, source: Path, output: Path, rewrite: Rewrite, trust: bool) -> None:
    from .formats import save_scaled

    save_scaled(analysis.loaded, source, output, rewrite, trust=trust)


PARAMETRIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d)


def _parametrize(module: nn.Module, changes: list[LayerChange], modules: dict[str, str],
                 seed: int) -> dict[str, float]:
    """Register torch's spectral_norm on each rescaled Linear/Conv, then a constant Scale so
    that, at the current weights, the layer's operator norm is its target. BatchNorm (which
    has no torch parametrization) and weights that are not a module's ``weight`` are baked."""
    from torch.nn.utils import parametrize as P
    from torch.nn.utils.parametrizations import spectral_norm

    from .parametrize import Scale

    torch.manual_seed(seed)  # spectral_norm draws its u, v vectors at random
    baked: dict[str, float] = {}
    layers: dict[str, float] = {}
    for c in changes:
        if c.scale is None or c.weight is None:
            continue
        path = modules[c.name]  # every rescaled layer has a module (see _write_parametrized)
        sub = module.get_submodule(path)
        if isinstance(sub, PARAMETRIZABLE) and not P.is_parametrized(sub, "weight"):
            original = sub.weight.detach().clone()
            spectral_norm(sub)
            sub.eval()
            with torch.no_grad():
                current = sub.weight  # original / sigma_matrix estimate (eval: u, v frozen)
                ratio = float(torch.linalg.vector_norm(original.double()) /
                              torch.linalg.vector_norm(current.double()))
            P.register_parametrization(sub, "weight", Scale(c.scale * ratio))
            layers[path] = c.scale * ratio
        else:
            baked[f"{path}.weight"] = c.scale
    if baked:
        from .formats.torch_write import scale_module

        scale_module(module, Rewrite(scales=baked))
    return layers


def normalize(
    source: str | Path,
    output: str | Path,
    *,
    target: float | None = None,
    clip: bool = False,
    budget: float | None = None,
    layers: list[str] | None = None,
    exclude: list[str] | None = None,
    in_place: bool = False,
    force: bool = False,
    input_shape: tuple[int, ...] | None = None,
    settings: spectral.Settings | None = None,
    trust: bool = False,
    mode: str = "bake",
    progress: ProgressFn | None = None,
    architecture: str | None = None,
) -> NormalizeResult:
    """Rescale the selected layers of ``source`` to ``target`` (or within ``budget``), write
    the result to ``output`` in the same format, re-inspect it and report before/after."""
    if target is not None and not (math.isfinite(target) and target > 0):
        raise UsageError(f"{{param}} must be a positive number, got {target}", param="target")
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise UsageError(f"{{param}} must be a positive number, got {budget}", param="budget")
    source, output = Path(source), Path(output)
    settings = settings or spectral.Settings()
    if mode not in ("bake", "parametrize"):
        raise UsageError(f"{{param}} must be bake or parametrize, got {mode}", param="mode")
    if not source.exists():
        raise InputError(f"{source} does not exist")
    check_output_path(source, output, in_place=in_place, force=force)
    before = run_analysis(source, input_shape, settings, trust=trust, progress=progress,
                          architecture=architecture)
    changes = plan(before, target=target, clip=clip, budget=budget, layers=layers, exclude=exclude)
    scales = _rewrite_of(changes)
    if layers and not any(c.skipped != "not selected" for c in changes):
        raise UsageError(f"{{param}} {' '.join(layers)} matches no layer (see `lipcheck inspect` for names)",
                         param="layers")
    _refuse_unwritable(changes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.save's deprecation notice is not ours to show
        if mode == "parametrize":
            rebuild = _write_parametrized(before, source, output, changes, trust, settings.seed)
        else:
            _write(before, source, output, scales, trust)
    if mode == "parametrize":
        # The proof loads the written file into a fresh copy of the architecture.
        shape = input_shape or tuple(int(d) for d in before.report.model.input_shape or ())
        after = run_analysis(rebuild(), shape or None, settings, progress=progress)
        after.report.model.path, after.report.model.format = str(output), Kind.PARAMETRIZED.value
        after.report.model.sha256 = sha256_of(output)
    else:
        after = run_analysis(output, input_shape, settings, trust=trust, progress=progress,
                             architecture=architecture)
    result = NormalizeResult(before.report, after.report, changes, str(output), budget)
    _verify(result, settings)
    return result


def _verify(result: NormalizeResult, settings: spectral.Settings) -> None:
    """The proof, on the written file: every selected layer with a target (rescaled, or
    left alone by --clip) re-measured at or below it, and the network bound within the
    budget."""
    assert result.after is not None
    after_rows = {r.name: r for r in result.after.layers}
    for c in result.changes:
        row = after_rows.get(c.after_name or c.name)
        if row is None:
            if c.scale is not None:
                c.ok = False
                result.failures.append(f"layer {c.name} was rescaled but is not found on re-inspection")
            continue
        c.after_sigma, c.after_upper = row.sigma, row.sigma_upper
        if c.target is None:
            continue
        # The estimate is a lower bound and must not exceed the target beyond the iteration
        # tolerance; without an estimate (a conv with no input size) the certificate, re-run
        # with its own stopping gap, must not either.
        value: float | None
        if row.sigma is not None:
            value, slack = row.sigma, settings.tol
        else:
            value, slack = row.sigma_upper, 4 * spectral.CERT_GAP
        c.ok = value is not None and value <= c.target * (1 + slack)
        if not c.ok:
            result.failures.append(f"layer {c.name}: sigma {value} is above its target {c.target:.6g}")
    bound = result.after.network.lipschitz_bound
    if result.budget is not None and (bound is None or bound > result.budget):
        result.failures.append(f"network bound {bound} is above the budget {result.budget:.6g}")
