"""Robustness gates: rules a report must satisfy for a release to pass.

Pure data in, data out: the CLI turns failed rules into exit code 1. Values are the
certified numbers by default (``--bound certified``); ``estimate`` uses the Lanczos/power
estimates instead (lower bounds: a gate on them can pass a model whose true constant is
above the limit, which the rule's message says).

Every verdict on upper bounds says which kind it compared: "certified" (holds whatever the
spectrum) or "probabilistic (δ=...)" (a Krylov bound from a random start that fails with
probability at most δ; for a verdict over several layers, δ is the sum over the
probabilistic ones, a union bound). ``require_certified`` fails any such verdict that rests
on a probabilistic bound.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError
from .ops import GATED_KINDS


@dataclass
class RuleResult:
    model: str
    rule: str
    passed: bool
    value: float | None
    limit: float | None
    message: str
    layer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        from .report import json_safe

        return json_safe(asdict(self))


def parse_increase(text: str) -> float:
    """'10%' -> 0.10, '0.1' -> 0.1."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise UsageError(f"{{param}} must be like 10% or 0.1, got '{text}'", param="max_increase") from None
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"{{param}} must be a non-negative amount, got '{text}'", param="max_increase")
    return value


def over_by(value: float, limit: float) -> str:
    """How far value is over limit, absolute and relative: a gate message's tail."""
    if limit > 0:
        return f"{value - limit:.6g} over ({(value / limit - 1) * 100:.2f}%)"
    return f"{value - limit:.6g} over"


def _network_value(doc: dict[str, Any], bound: str) -> float | None:
    net = doc["network"]
    return net.get("lipschitz_bound") if bound == "certified" else net.get("lipschitz_estimate")


def _network_delta(doc: dict[str, Any]) -> float | None:
    """The failure probability of the network bound: None when it is certified."""
    net = doc["network"]
    if net.get("certified", True) or net.get("lipschitz_bound") is None:
        return None
    return net.get("failure_probability")


def _row_delta(row: dict[str, Any]) -> float | None:
    """A probabilistic upper bound's failure probability; None when certified (reports from
    before probabilistic bounds carry no ``upper_kind``: theirs were all certified)."""
    if row.get("upper_kind") == "probabilistic":
        return float(row.get("failure_probability") or 0.0)
    return None


def _kind(deltas: list[float | None]) -> tuple[str, float | None]:
    """The kind of a verdict resting on upper bounds with these failure probabilities."""
    probs = [d for d in deltas if d is not None]
    if not probs:
        return "certified", None
    total = min(1.0, sum(probs))
    return f"probabilistic (δ={total:.3g})", total


def _layer_value(row: dict[str, Any], bound: str) -> float | None:
    if bound == "certified":
        return row.get("sigma_upper")
    return row.get("sigma") if row.get("sigma") is not None else row.get("sigma_upper")


def evaluate(doc: dict[str, Any], *, max_lipschitz: float | None = None,
             max_layer_sigma: float | None = None, baseline: dict[str, Any] | None = None,
             max_increase: float | None = None, bound: str = "certified",
             allow_unmatched: bool = False, require_certified: bool = False) -> list[RuleResult]:
    """Every rule's verdict for one inspect report (as its JSON document).

    Against a baseline, layers are matched by name; a weighted layer present on one side
    only fails the ``baseline-match`` rule unless ``allow_unmatched`` (a baseline of another
    model, or of another export of it, must not pass by comparing nothing).

    With ``bound="certified"`` each verdict's message ends with the kind of upper bound it
    compared; ``require_certified`` fails a verdict that compared a probabilistic one."""
    if bound not in ("certified", "estimate"):
        raise UsageError(f"{{param}} must be certified or estimate, got {bound}", param="bound")
    model = doc["model"]["path"]
    results: list[RuleResult] = []
    deltas: dict[int, list[float | None]] = {}  # id(result) -> the bounds it compared
    layers = [r for r in doc["layers"] if r.get("kind") in GATED_KINDS]
    if not layers:
        results.append(RuleResult(model, "analysed", False, None, None,
                                  "no layer with weights was analysed: a gate that measured nothing fails"))
    if max_lipschitz is not None:
        value = _network_value(doc, bound)
        if value is not None:
            deltas[len(results)] = [_network_delta(doc)]
        if value is None:
            results.append(RuleResult(model, "max-lipschitz", False, None, max_lipschitz,
                                      f"no network bound: {doc['network']['reason']}"))
        elif value > max_lipschitz:
            results.append(RuleResult(model, "max-lipschitz", False, value, max_lipschitz,
                                      f"network bound {value:.6g} > {max_lipschitz:.6g}: "
                                      f"{over_by(value, max_lipschitz)}"))
        else:
            results.append(RuleResult(model, "max-lipschitz", True, value, max_lipschitz,
                                      f"network bound {value:.6g} <= {max_lipschitz:.6g}"))
        if value is not None and doc["network"].get("domain"):
            results[-1].message += (" (a local bound: for inputs in the declared domain only, "
                                    f"{doc['network']['domain']})")
    if max_layer_sigma is not None:
        worst: tuple[float, str] | None = None
        failed = False
        for row in layers:
            value = _layer_value(row, bound)
            if value is None or not math.isfinite(value):
                failed = True
                results.append(RuleResult(model, "max-layer-sigma", False, None, max_layer_sigma,
                                          f"layer {row['name']}: no finite sigma ({row.get('note')})",
                                          row["name"]))
            elif value > max_layer_sigma:
                failed = True
                deltas[len(results)] = [_row_delta(row)]
                results.append(RuleResult(model, "max-layer-sigma", False, value, max_layer_sigma,
                                          f"layer {row['name']}: sigma {value:.6g} > {max_layer_sigma:.6g}: "
                                          f"{over_by(value, max_layer_sigma)}", row["name"]))
            elif worst is None or value > worst[0]:
                worst = (value, row["name"])
        if not failed and layers:
            assert worst is not None
            deltas[len(results)] = [_row_delta(row) for row in layers]
            results.append(RuleResult(model, "max-layer-sigma", True, worst[0], max_layer_sigma,
                                      f"largest layer sigma {worst[0]:.6g} ({worst[1]}) <= "
                                      f"{max_layer_sigma:.6g}"))
    if baseline is not None:
        for r, used in _against_baseline(doc, baseline, max_increase or 0.0, bound, allow_unmatched):
            if used is not None:
                deltas[len(results)] = used
            results.append(r)
    if bound == "certified":
        for i, used in deltas.items():
            _state_kind(results[i], used, require_certified)
    if bound == "estimate":
        for r in results:
            r.message += " [estimate: a lower bound, not a guarantee]"
    return results


def _state_kind(result: RuleResult, used: list[float | None], require_certified: bool) -> None:
    """Name the kind of upper bound a verdict compared; fail it under --require-certified
    when that kind is probabilistic."""
    kind, delta = _kind(used)
    result.message += f" [{kind}]"
    if require_certified and delta is not None and result.passed:
        result.passed = False
        result.message += (": --require-certified needs a certified bound "
                           "(rerun with --certify exact)")


def name_list(names: list[str], limit: int = 5) -> str:
    """The first few names, and how many more."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _match(doc: dict[str, Any], base: dict[str, Any], allow_unmatched: bool) -> RuleResult:
    """How many weighted layers the baseline comparison covers, and which it cannot."""
    new = [r["name"] for r in doc["layers"] if r.get("kind") in GATED_KINDS]
    old = [r["name"] for r in base["layers"] if r.get("kind") in GATED_KINDS]
    only_new = [n for n in new if n not in set(old)]
    only_old = [n for n in old if n not in set(new)]
    compared = len(new) - len(only_new)
    total = compared + len(only_new) + len(only_old)
    text = f"{compared} of {total} layers matched the baseline by name"
    if not only_new and not only_old:
        return RuleResult(doc["model"]["path"], "baseline-match", compared > 0, compared, total,
                          text if compared else "no layer to compare with the baseline")
    parts = ([f"not in the baseline: {name_list(only_new)}"] if only_new else []) + (
        [f"missing from the model: {name_list(only_old)}"] if only_old else [])
    text = f"{text}; {'; '.join(parts)}"
    if allow_unmatched:
        return RuleResult(doc["model"]["path"], "baseline-match", compared > 0, compared, total,
                          text + " (allowed by --allow-unmatched)")
    return RuleResult(doc["model"]["path"], "baseline-match", False, compared, total,
                      text + " (pass --allow-unmatched to compare only the matched layers)")


def _against_baseline(doc: dict[str, Any], base: dict[str, Any], inc: float, bound: str,
                      allow_unmatched: bool = False) -> list[tuple[RuleResult, list[float | None] | None]]:
    """The baseline verdicts, each with the failure probabilities of the new upper bounds it
    compared (None: it compared no bound)."""
    model = doc["model"]["path"]
    out: list[tuple[RuleResult, list[float | None] | None]] = [(_match(doc, base, allow_unmatched), None)]
    new, old = _network_value(doc, bound), _network_value(base, bound)
    if old is not None:
        limit = old * (1 + inc)
        if new is None:
            out.append((RuleResult(model, "baseline-network", False, None, limit,
                                   f"baseline had a network bound {old:.6g}, now none: {doc['network']['reason']}"),
                        None))
        else:
            ok = new <= limit
            out.append((RuleResult(model, "baseline-network", ok, new, limit,
                                   f"network bound {new:.6g} vs baseline {old:.6g} (limit {limit:.6g})"
                                   + ("" if ok else f": {over_by(new, limit)}")), [_network_delta(doc)]))
    base_rows = {r["name"]: r for r in base["layers"] if r.get("kind") in GATED_KINDS}
    compared: list[float | None] = []
    for row in doc["layers"]:
        if row.get("kind") not in GATED_KINDS or row["name"] not in base_rows:
            continue
        new_v, old_v = _layer_value(row, bound), _layer_value(base_rows[row["name"]], bound)
        if new_v is None or old_v is None:
            continue
        limit = old_v * (1 + inc)
        compared.append(_row_delta(row))
        if new_v > limit:
            out.append((RuleResult(model, "baseline-layer", False, new_v, limit,
                                   f"layer {row['name']}: sigma {new_v:.6g} vs baseline {old_v:.6g} "
                                   f"(limit {limit:.6g}): {over_by(new_v, limit)}", row["name"]), [_row_delta(row)]))
    if not any(r.rule == "baseline-layer" for r, _ in out):
        out.append((RuleResult(model, "baseline-layer", True, None, None,
                               f"no layer grew more than {inc * 100:.4g}% over the baseline"), compared))
    return out


def load_baseline(path: Path, model_path: str) -> dict[str, Any]:
    """The report for ``model_path`` inside a baseline JSON (one report, or several)."""
    import json

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{{param}} {path} is not a readable lipcheck JSON report: {exc}", param="baseline") from None
    reports = doc.get("reports", [doc]) if isinstance(doc, dict) else []
    reports = [r for r in reports if isinstance(r, dict) and "layers" in r and "network" in r]
    if not reports:
        raise UsageError(f"{{param}} {path} holds no lipcheck report", param="baseline")
    if len(reports) == 1:
        return reports[0]
    name = Path(model_path).name
    for r in reports:
        if Path(r["model"]["path"]).name == name:
            return r
    raise UsageError(f"{{param}} {path} has no report for {name}", param="baseline")
