"""Spectrally normalized weights as torch stores them, and the weight the layer really uses.

torch keeps a spectrally normalized parameter ``<p>`` of a module in one of two layouts:

* ``torch.nn.utils.spectral_norm``: ``<p>_orig``, ``<p>_u``, ``<p>_v``;
* ``torch.nn.utils.parametrizations.spectral_norm``: ``parametrizations.<p>.original``,
  ``parametrizations.<p>.0._u``, ``parametrizations.<p>.0._v``.

In eval mode both compute the weight the layer multiplies by as

    W = W_orig / sigma_uv,    sigma_uv = u . (W_mat v)

where W_mat is W_orig with dimension ``dim`` moved first and the rest flattened
(``dim`` = 1 for ConvTranspose, 0 otherwise) and u, v are the stored vectors, used as
they are (eval mode runs no power iteration). Invariant after each training forward:
``u = normalize(W_mat v)``, which tells the two possible ``dim`` apart when their shapes
agree. sigma_uv is the norm of the *reshaped* weight (what SN divides by), not the
operator norm of a convolution (pytorch issue 99149): a SN conv's true norm is often
well above 1.

Scaling W_orig does not change W (the division cancels it); dividing u by s multiplies
W by s, in eval mode, while keeping every key and shape, so the file still loads with
``load_state_dict(strict=True)``. A training step renormalises u and so drops the factor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import ops

OLD_STYLE = "torch.nn.utils.spectral_norm"
NEW_STYLE = "torch.nn.utils.parametrizations.spectral_norm"
_OLD = re.compile(r"^(?P<base>(?:(?P<module>.*)\.)?(?P<param>[^.]+))_orig$")
_NEW = re.compile(r"^(?:(?P<module>.*)\.)?parametrizations\.(?P<param>[^.]+)\.original$")


@dataclass(frozen=True)
class SNWeight:
    """One spectrally normalized parameter: where its three tensors are stored."""

    layer: str  # the module path a report names the layer by ('main.0')
    style: str  # OLD_STYLE or NEW_STYLE
    original: str
    u: str
    v: str

    @property
    def keys(self) -> tuple[str, str, str]:
        return self.original, self.u, self.v


def _layer(module: str | None, param: str) -> str:
    """The row name: the module path for a ``weight``, as for a plain layer."""
    if param == "weight":
        return module or "weight"
    return f"{module}.{param}" if module else param


def find(tensors: Mapping[str, object]) -> dict[str, SNWeight]:
    """Every spectrally normalized parameter among ``tensors`` (keyed by its W_orig key);
    a key is only taken for one when its u and v are stored beside it."""
    found: dict[str, SNWeight] = {}
    for key in tensors:
        m = _NEW.match(key)
        if m:
            prefix = key[: -len("original")]
            u, v = f"{prefix}0._u", f"{prefix}0._v"
            style = NEW_STYLE
        else:
            m = _OLD.match(key)
            if not m:
                continue
            u, v = f"{m['base']}_u", f"{m['base']}_v"
            style = OLD_STYLE
        if isinstance(tensors.get(u), torch.Tensor) and isinstance(tensors.get(v), torch.Tensor):
            found[key] = SNWeight(_layer(m["module"], m["param"]), style, key, u, v)
    return found


def style_of(key: str) -> str | None:
    """The SN layout a stored tensor's name belongs to, from the name alone."""
    if _NEW.match(key):
        return NEW_STYLE
    if _OLD.match(key):
        return OLD_STYLE
    return None


def mark_graph_rows(graph: Any, rows: list[Any]) -> None:
    """Mark the rows of a graph whose weight the graph computes from a spectrally normalized
    parameter (W_orig divided by u.W_orig v, as the TorchScript-based exporter writes it)."""
    by_name = {n.name: n for n in graph.nodes}
    for row in rows:
        node = by_name.get(row.name)
        slot = ops.weight_input(node, graph.static) if node is not None else None
        if node is None or slot is None or row.kind not in ("linear", "conv"):
            continue
        value, divided = node.inputs[slot], False
        for _ in range(16):  # a short chain of reshapes, casts and the division
            if value in graph.origin:
                if divided and style_of(graph.origin[value]):
                    row.spectral_norm = style_of(graph.origin[value])
                break
            producer = graph.producer.get(value)
            if producer is None or producer.op not in ("Div", "Identity", "Cast", "Reshape", "Transpose"):
                break
            divided = divided or producer.op == "Div"
            value = producer.inputs[0]


def as_matrix(w: torch.Tensor, dim: int) -> torch.Tensor:
    if dim != 0:
        w = w.permute(dim, *[d for d in range(w.dim()) if d != dim])
    return w.reshape(w.shape[0], -1)


def effective_weight(orig: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """(W, sigma_uv, dim): the weight the layer multiplies by in eval mode, computed with
    torch's own operations in the stored dtype (so it is the exact tensor torch uses).

    Raises ValueError when u and v do not fit W_orig for either possible ``dim``."""
    if orig.dim() < 1 or u.dim() != 1 or v.dim() != 1:
        raise ValueError(f"weight {list(orig.shape)} with u {list(u.shape)} and v {list(v.shape)}")
    dims = [d for d in (0, 1) if d < orig.dim() and orig.shape[d] == u.numel()
            and orig.numel() == u.numel() * v.numel()]
    if not dims:
        raise ValueError(f"u has {u.numel()} and v {v.numel()} entries, which fit neither dim 0 "
                         f"nor dim 1 of a weight of shape {list(orig.shape)}")
    u, v = u.to(orig.dtype), v.to(orig.dtype)

    def misfit(d: int) -> float:
        # torch's invariant u = normalize(W_mat v): the true dim fits it, the other does not.
        wv = (as_matrix(orig, d).double() @ v.double())
        return float(torch.linalg.vector_norm(wv / wv.norm().clamp_min(1e-300) - u.double() / u.double().norm()))

    dim = min(dims, key=misfit) if len(dims) > 1 else dims[0]
    with torch.no_grad():
        sigma = torch.dot(u, torch.mv(as_matrix(orig, dim), v))
        return orig / sigma, float(sigma), dim


def describe(sn: SNWeight, sigma_uv: float) -> str:
    return (f"spectrally normalized ({sn.style}): the layer uses W_orig / {sigma_uv:.6g} "
            "(u.W_orig v from the stored u, v); sigma_matrix is that weight's reshaped norm")
