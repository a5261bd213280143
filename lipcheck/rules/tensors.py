"""Per-tensor rules: the numbers of weights that come without a graph (a state_dict,
safetensors, TorchScript read without running it). A 2-D tensor is a linear map, a 3-5-D
one a conv kernel (its input size unknown: a size-independent certificate), a BatchNorm
weight beside its running_var a diagonal map; spectrally normalized parameters are
replaced by the weight the layer really uses (see :mod:`lipcheck.snorm`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from .. import names, snorm, spectral
from ..aliases import ProgressFn
from ..formats.checkpoint_folder import header_of, read_float64, shape_of
from ..heads import Heads
from ..report import LayerRow, RowKind, SkippedOp

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


class _EffectiveWeights(Mapping[str, torch.Tensor]):
    """A view of ``base`` in which each spectrally normalized parameter is replaced, in its
    place and under ``<layer>.weight``, by the weight the layer really uses (computed when
    asked for), and its u and v are left out. Nothing is read until a tensor is asked for."""

    def __init__(self, base: Mapping[str, torch.Tensor], found: dict[str, snorm.SNWeight]) -> None:
        self.base = base
        self.vectors = {k for sn in found.values() for k in (sn.u, sn.v)}
        self.computed = {(sn.layer + ".weight" if sn.layer != "weight" else "weight"): sn
                         for sn in found.values()}
        self.order = [next((n for n, sn in self.computed.items() if sn.original == k), k)
                      for k in base if k not in self.vectors]

    def __getitem__(self, key: str) -> torch.Tensor:
        sn = self.computed.get(key)
        if sn is None:
            if key in self.vectors:
                raise KeyError(key)
            return self.base[key]
        return snorm.effective_weight(self.base[sn.original], self.base[sn.u], self.base[sn.v])[0]

    def header(self, key: str) -> torch.Tensor:
        sn = self.computed.get(key)
        return header_of(self.base, sn.original if sn is not None else key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)

    def __contains__(self, key: object) -> bool:
        return key in self.computed or (key in self.base and key not in self.vectors)


def _sn_notes(tensors: Mapping[str, torch.Tensor], found: dict[str, snorm.SNWeight],
              skipped: list[SkippedOp]) -> dict[str, tuple[str, str, int]]:
    """Per effective-weight key: the SN style, a description, and the dim SN reshapes along
    (1 for a ConvTranspose). Parameters whose u, v do not fit are listed under skipped."""
    notes: dict[str, tuple[str, str, int]] = {}
    for sn in found.values():
        try:
            _, sigma_uv, dim = snorm.effective_weight(tensors[sn.original], tensors[sn.u], tensors[sn.v])
        except (ValueError, RuntimeError) as exc:
            skipped.append(SkippedOp(sn.original, "tensor", f"spectral-norm vectors do not fit the weight: {exc}"))
            continue
        name = sn.layer + ".weight" if sn.layer != "weight" else "weight"
        notes[name] = (sn.style, snorm.describe(sn, sigma_uv), dim)
    return notes


def _matrix_stats(row: LayerRow, w: torch.Tensor, fan_in: int, fan_out: int) -> None:
    """The row's RMS-to-RMS norm and stable rank, from its estimate and the matrix."""
    if row.sigma is not None and math.isfinite(row.sigma) and row.sigma > 0:
        row.rms_to_rms = row.sigma * math.sqrt(fan_in / fan_out)
        row.stable_rank = float(torch.linalg.vector_norm(w)) ** 2 / row.sigma**2


def _matrix_row(name: str, key: str, w: torch.Tensor, settings: spectral.Settings) -> LayerRow:
    """A stored matrix: its sigma, certificate, RMS-to-RMS norm and stable rank, and for a
    transformer checkpoint its block and role (see :mod:`lipcheck.names`)."""
    parsed = names.parse(key)
    bound = spectral.dense_bound(w, settings)
    est, cert = bound.estimate, bound.upper
    fan_out, fan_in = (w.shape[1], w.shape[0]) if parsed.in_first else (w.shape[0], w.shape[1])
    embedding = parsed.role == "embed"
    row = LayerRow(name=name, op="Embedding" if embedding else "Linear",
                   kind=RowKind.EMBEDDING if embedding else RowKind.LINEAR, sigma=est.sigma, sigma_upper=cert.value,
                   upper_method=cert.method, lipschitz=cert.value, iterations=est.iterations,
                   converged=est.converged, block=parsed.block, role=parsed.role,
                   upper_kind=bound.kind, failure_probability=bound.failure_probability)
    _matrix_stats(row, w, fan_in, fan_out)
    if embedding:
        row.note = "a lookup table: its sigma is reported, but it is not part of a Lipschitz chain"
    elif parsed.in_first:
        row.note = "stored as [in, out] (GPT-2 Conv1D)"
    return row


HEAD_ROLES = ("q", "k", "v", "o", "qkv")


# Fused q/k/v projections whose rows are [q heads; k heads; v heads]. GPT-NeoX's
# query_key_value interleaves q, k, v per head (and Falcon groups them): no head rows for it.
FUSED_CONTIGUOUS = ("qkv_proj", "c_attn", "Wqkv")


def _head_rows(matrix: LayerRow, key: str, w: torch.Tensor, heads: Heads,
               settings: spectral.Settings) -> list[LayerRow] | None:
    """One row per attention head of a q/k/v/o projection, or of each of q, k and v of a fused
    qkv one (named ``<matrix>[q.h3]``); None: its shape or layout does not fit."""
    assert matrix.role is not None
    parsed = names.parse(key)
    stored = w.T if parsed.in_first else w
    if matrix.role == "qkv":
        leaf = key.removesuffix(".weight").rpartition(".")[2]
        fused = heads.split_fused(stored) if leaf in FUSED_CONTIGUOUS else None
        if fused is None:
            return None
        parts = [(role, block, f"{role}.h{h}", f"{role} head {h}: rows of the fused matrix")
                 for role, h, block in fused]
    else:
        blocks = heads.split(matrix.role, stored)
        if blocks is None:
            return None
        what = "columns" if matrix.role == "o" else "rows"
        parts = [(matrix.role, block, f"h{h}",
                  f"head {h} of {len(blocks)}: {what} {h * heads.head_dim}..{(h + 1) * heads.head_dim - 1}")
                 for h, block in enumerate(blocks)]
    out = []
    for role, block, tag, note in parts:
        bound = spectral.dense_bound(block.contiguous(), settings)
        est, cert = bound.estimate, bound.upper
        row = LayerRow(name=f"{matrix.name}[{tag}]", op="Linear", kind=RowKind.HEAD, sigma=est.sigma,
                       sigma_upper=cert.value, upper_method=cert.method, lipschitz=cert.value,
                       iterations=est.iterations, converged=est.converged, block=matrix.block,
                       role=role, upper_kind=bound.kind, failure_probability=bound.failure_probability,
                       note=note)
        _matrix_stats(row, block, fan_in=block.shape[1], fan_out=block.shape[0])
        out.append(row)
    return out


def _experts_summary(key: str, rows: list[LayerRow]) -> str:
    values = sorted((r.sigma, i) for i, r in enumerate(rows) if r.sigma is not None)
    if not values:
        return f"{key}: {len(rows)} experts, no finite sigma"
    median = values[len(values) // 2][0] if len(values) % 2 else (
        values[len(values) // 2 - 1][0] + values[len(values) // 2][0]) / 2
    return (f"{key}: {len(rows)} experts ([E, out, in]); sigma max {values[-1][0]:.6g} (expert "
            f"{values[-1][1]}), median {median:.6g}, min {values[0][0]:.6g} (expert {values[0][1]})")


@dataclass
class KeyRows:
    """What one tensor contributes to the report: its rows, or why it was skipped, or that it
    is passive (a bias, a BatchNorm statistic); ``note`` and ``misfit`` feed the notes."""

    rows: list[LayerRow] = field(default_factory=list)
    skipped: list[SkippedOp] = field(default_factory=list)
    note: str | None = None
    passive: bool = False
    misfit: bool = False  # a projection whose shape does not fit the head counts


# Runs ``work`` on each key (in a distributed run: this process's share of them) and returns
# every key's result in key order; see lipcheck.distributed.
SpreadFn = Callable[[list[str], Callable[[str], KeyRows], Mapping[str, torch.Tensor]], list[KeyRows]]


def tensor_rows(tensors: Mapping[str, torch.Tensor], settings: spectral.Settings, notes: list[str],
                progress: ProgressFn | None = None,
                heads: Heads | None = None, spread: SpreadFn | None = None) -> tuple[list[LayerRow], list[SkippedOp]]:
    """Per-tensor numbers for weights without a graph: 2-D = a linear layer, 3-5-D = a
    conv kernel (reshaped norm and a size-independent certified bound), BatchNorm from
    its weight and running_var. Every other tensor is either passive (biases, BatchNorm
    statistics: counted in a note) or listed under skipped with the reason. ``tensors`` may
    read each tensor from disk when asked for: one is held at a time. With ``heads``, the
    q/k/v/o projections also get one row per attention head (``<name>[h3]``, kind "head").
    ``spread``: shares the tensors out between processes (lipcheck.distributed); the rows are
    the same, in the same order, as without it."""
    rows: list[LayerRow] = []
    misfit: list[str] = []
    skipped: list[SkippedOp] = []
    found = snorm.find(tensors)
    sn_notes = _sn_notes(tensors, found, skipped)
    sn_vectors = 2 * len(found)
    if found:
        tensors = _EffectiveWeights(tensors, {k: sn for k, sn in found.items()
                                              if (sn.layer + ".weight" if sn.layer != "weight" else "weight")
                                              in sn_notes})
    keys = list(tensors)
    done = 0

    def work(key: str) -> KeyRows:
        nonlocal done
        if progress is not None:
            progress(done, len(keys), key)
        done += 1
        return _key_rows(tensors, key, settings, heads, sn_notes)

    results = [work(key) for key in keys] if spread is None else spread(keys, work, tensors)
    passive = 0
    for key, result in zip(keys, results):
        rows.extend(result.rows)
        skipped.extend(result.skipped)
        passive += result.passive
        if result.note:
            notes.append(result.note)
        if result.misfit:
            misfit.append(key)
    if progress is not None:
        progress(len(keys), len(keys), "")
    if heads is not None:
        notes.append(f"per-head rows: {heads.heads} query heads, {heads.kv_heads} key/value heads of "
                     f"dimension {heads.head_dim} (config.json)"
                     + (f"; projections whose shape or layout (GPT-NeoX's per-head interleaved "
                        f"query_key_value) do not fit them, so no head rows: {', '.join(misfit[:5])}"
                        + (f" and {len(misfit) - 5} more" if len(misfit) > 5 else "") if misfit else ""))
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


def _key_rows(tensors: Mapping[str, torch.Tensor], key: str, settings: spectral.Settings,
              heads: Heads | None, sn_notes: dict[str, tuple[str, str, int]]) -> KeyRows:
    """The rows of one tensor (``tensors`` gives its neighbours: a BatchNorm weight's
    running_var)."""
    out = KeyRows()
    rows, skipped = out.rows, out.skipped
    # a file that can widen a matrix to float64 chunk by chunk saves holding both copies whole
    wide = read_float64(tensors, key) if len(shape_of(tensors, key)) >= 2 else None
    t = wide if wide is not None else tensors[key]
    layer, _, leaf = key.rpartition(".")
    layer = layer or key
    bn_weight = tensors.get(f"{layer}.weight") if leaf == "running_var" else None
    bn_stat = (isinstance(bn_weight, torch.Tensor) and bn_weight.ndim == 1 and bn_weight.shape == t.shape)
    if leaf in PASSIVE_LEAVES or leaf.startswith("bias_") or bn_stat:
        return KeyRows(passive=True)
    head_rows: list[LayerRow] | None = None
    w, how = _float_weight(t)
    if w is None:
        return KeyRows(skipped=[SkippedOp(key, "tensor", how)])
    stored_dtype = t.dtype
    del t  # only the float64 copy is used from here: the stored one is not held (peak memory)
    var_t = tensors.get(f"{layer}.running_var") if leaf == "weight" and w.ndim == 1 else None
    if leaf == "weight" and w.ndim == 1 and isinstance(var_t, torch.Tensor) and var_t.shape == w.shape:
        var, _ = _float_weight(var_t)
        if var is None:
            var = torch.full_like(w, math.nan)
        value = float((w.abs() / torch.sqrt(var + 1e-5)).max()) if w.numel() else 0.0
        rows.append(LayerRow(name=layer, op="BatchNorm", kind=RowKind.DIAGONAL, sigma=value,
                             sigma_upper=value, upper_method="exact (eps=1e-5)",
                             lipschitz=value, iterations=0, converged=True))
    elif 2 <= w.ndim <= 5 and w.numel() == 0:
        # A map from or to an empty space is the zero map: norm 0, exactly.
        rows.append(LayerRow(name=key if leaf != "weight" else layer,
                             op="Linear" if w.ndim == 2 else f"Conv{w.ndim - 2}d",
                             kind=RowKind.LINEAR if w.ndim == 2 else RowKind.CONV, sigma=0.0,
                             sigma_upper=0.0, upper_method="exact (empty)", lipschitz=0.0,
                             iterations=0, converged=True, note=f"0-size weight {list(w.shape)}"))
    elif w.ndim == 2:
        rows.append(_matrix_row(key if leaf != "weight" else layer, key, w, settings))
        if key in sn_notes:
            rows[-1].sigma_matrix = rows[-1].sigma  # a matrix's reshaped norm is its norm
        if heads is not None and rows[-1].role in HEAD_ROLES:
            head_rows = _head_rows(rows[-1], key, w, heads, settings)
            if head_rows is None:
                out.misfit = True
    elif w.ndim == 3 and "experts" in key.split("."):
        expert_rows = [_matrix_row(f"{key}[{e}]", key, w[e], settings) for e in range(w.shape[0])]
        rows.extend(expert_rows)
        out.note = _experts_summary(key, expert_rows)
        return out
    elif 3 <= w.ndim <= 5:
        # A spectrally normalized ConvTranspose (SN reshapes it along dim 1) is reported
        # with SN's own reshape; the certificate is the same for a conv and its adjoint.
        transposed = key in sn_notes and sn_notes[key][2] == 1
        reshaped = snorm.as_matrix(w, 1) if transposed else w.reshape(w.shape[0], -1)
        est = spectral.matrix_estimate(reshaped, settings)
        cert = spectral.conv_reshape_upper_bound(w, 1)
        rows.append(LayerRow(
            name=key if leaf != "weight" else layer,
            op=f"Conv{'Transpose' if transposed else ''}{w.ndim - 2}d", kind=RowKind.CONV,
            sigma_matrix=est.sigma, sigma_upper=cert.value, upper_method=cert.method,
            lipschitz=cert.value, iterations=est.iterations, converged=est.converged,
            note="no graph: input size unknown; sigma_upper holds for any input size, "
                 "stride, dilation and groups with zero padding",
        ))
    elif w.ndim == 1 and names.parse(key).role == "norm":
        skipped.append(SkippedOp(key, "tensor", "1-D tensor, the scale of a normalization (LayerNorm/RMSNorm "
                                                "gamma): not a linear map on its own"))
        return out
    else:
        skipped.append(SkippedOp(key, "tensor", f"{w.ndim}-D tensor: not a layer weight lipcheck knows"))
        return out
    if how:
        rows[-1].note = f"{how} ({stored_dtype}); " + (rows[-1].note or "")
        rows[-1].note = rows[-1].note.rstrip("; ")
    if key in sn_notes:
        style, text, _ = sn_notes[key]
        rows[-1].spectral_norm = style
        rows[-1].note = f"{text}; {rows[-1].note}" if rows[-1].note else text
    rows.extend(head_rows or [])  # after the matrix's own row and its notes
    return out
