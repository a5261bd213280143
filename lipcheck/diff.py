"""Differences between two inspect reports: per layer, the network, new and vanished layers."""

from __future__ import annotations

import math
from typing import Any


def _rel(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return None
    if a == 0:
        return None if b == 0 else math.inf
    return b / a - 1


def diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """A JSON-ready document; ``change`` is relative (b / a - 1) on the certified value."""
    rows_a = {r["name"]: r for r in a["layers"]}
    rows_b = {r["name"]: r for r in b["layers"]}
    layers = []
    for name in [n for n in rows_a if n in rows_b]:
        ra, rb = rows_a[name], rows_b[name]
        change = _rel(ra.get("sigma_upper"), rb.get("sigma_upper"))
        layers.append({
            "name": name, "op": rb["op"],
            "sigma_a": ra.get("sigma"), "sigma_b": rb.get("sigma"),
            "sigma_upper_a": ra.get("sigma_upper"), "sigma_upper_b": rb.get("sigma_upper"),
            "change": change,
            "changed": ra.get("sigma_upper") != rb.get("sigma_upper") or ra.get("sigma") != rb.get("sigma"),
        })
    net_a, net_b = a["network"], b["network"]
    return {
        "schema_version": a.get("schema_version", "1"),
        "a": {"path": a["model"]["path"], "sha256": a["model"]["sha256"]},
        "b": {"path": b["model"]["path"], "sha256": b["model"]["sha256"]},
        "network": {
            "lipschitz_bound_a": net_a.get("lipschitz_bound"),
            "lipschitz_bound_b": net_b.get("lipschitz_bound"),
            "change": _rel(net_a.get("lipschitz_bound"), net_b.get("lipschitz_bound")),
            "bounded_a": net_a["bounded"], "bounded_b": net_b["bounded"],
        },
        "layers": layers,
        "new": [{"name": n, "op": rows_b[n]["op"]} for n in rows_b if n not in rows_a],
        "vanished": [{"name": n, "op": rows_a[n]["op"]} for n in rows_a if n not in rows_b],
    }
