"""Self-contained HTML reports with charts: inline SVG and CSS, no script and nothing fetched,
so the file reads offline as a CI artifact. Rendered from the same JSON documents as every
other format, so the tables carry exactly the JSON's numbers.

Charts are hand-written SVG (no plotting dependency): per-layer sigma estimate and
certificate on a log scale, the network bound along the graph, a role x block heatmap for
transformer checkpoints, and before/after per layer for a diff. Hovering a mark shows its
layer and values (SVG ``<title>``).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from . import __version__

WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 900, 300, 70, 20, 30, 60
COLORS = {"estimate": "#1f77b4", "upper": "#d62728", "bound": "#2ca02c", "a": "#7f7f7f", "b": "#ff7f0e",
          "unbounded": "#9467bd"}
CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}h1{font-size:1.4em}
h2{font-size:1.15em;margin-top:2em}table{border-collapse:collapse;font-size:.85em;margin:1em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:nth-child(-n+3),th:nth-child(-n+3){text-align:left}
td:last-child,th:last-child{text-align:left;min-width:12em}.note{color:#555;font-size:.9em}.fail{color:#b00;font-weight:bold}.pass{color:#070}
svg text{font-size:11px;font-family:system-ui,sans-serif}"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.6g}"
    return _esc(value)


def _positive(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v) and v > 0]


class _LogAxis:
    """Maps positive values to a y pixel on a log scale spanning the data (whole decades)."""

    def __init__(self, values: Sequence[float]) -> None:
        lo = math.floor(math.log10(min(values))) if values else 0
        hi = math.ceil(math.log10(max(values))) if values else 1
        self.lo, self.hi = lo, hi if hi > lo else lo + 1

    def y(self, v: float) -> float:
        frac = (math.log10(v) - self.lo) / (self.hi - self.lo)
        return TOP + (HEIGHT - TOP - BOTTOM) * (1 - frac)

    def ticks(self) -> str:
        out = []
        for d in range(self.lo, self.hi + 1):
            y = self.y(10.0**d)
            out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                       f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">1e{d}</text>')
        return "".join(out)


def _frame(title: str, xlabel: str, ylabel: str, body: str, legend: Sequence[tuple[str, str]]) -> str:
    items = "".join(
        f'<rect x="{LEFT + 10 + i * 190}" y="{HEIGHT - 18}" width="10" height="10" fill="{color}"/>'
        f'<text x="{LEFT + 24 + i * 190}" y="{HEIGHT - 9}">{_esc(label)}</text>'
        for i, (label, color) in enumerate(legend))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" role="img" '
            f'aria-label="{_esc(title)}"><title>{_esc(title)}</title>'
            f'<text x="{LEFT}" y="16" font-weight="bold">{_esc(title)}</text>{body}'
            f'<line x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - RIGHT}" y2="{HEIGHT - BOTTOM}" stroke="#333"/>'
            f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{HEIGHT - BOTTOM}" stroke="#333"/>'
            f'<text x="{(LEFT + WIDTH) / 2}" y="{HEIGHT - BOTTOM + 22}" text-anchor="middle">{_esc(xlabel)}</text>'
            f'<text transform="translate(14,{(TOP + HEIGHT - BOTTOM) / 2}) rotate(-90)" text-anchor="middle">'
            f'{_esc(ylabel)}</text>{items}</svg>')


def _x(i: int, n: int) -> float:
    return LEFT + (WIDTH - LEFT - RIGHT) * (i + 0.5) / max(n, 1)


def _upper_label(layers: list[dict[str, Any]]) -> str:
    """The legend names the kind of upper bound the chart shows."""
    kinds = {r.get("upper_kind") for r in layers if r.get("sigma_upper") is not None}
    if "probabilistic" in kinds:
        return "upper bound (some probabilistic)" if "certified" in kinds else "probabilistic upper bound"
    return "certified upper bound"


def sigma_chart(layers: list[dict[str, Any]]) -> str:
    """Estimate and certificate per layer, in graph order; layers without a number marked."""
    n = len(layers)
    axis = _LogAxis(_positive([r.get("sigma") for r in layers] + [r.get("sigma_upper") for r in layers]))
    marks = [axis.ticks()]
    for i, r in enumerate(layers):
        x, est, up = _x(i, n), r.get("sigma"), r.get("sigma_upper")
        tip = f"{r['name']} ({r['op']}): sigma {_num(est)}, sigma_upper {_num(up)}"
        if up is not None and math.isfinite(up) and up > 0:
            marks.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{axis.y(up):.1f}" y2="{HEIGHT - BOTTOM}" '
                         f'stroke="{COLORS["upper"]}" stroke-width="2"><title>{_esc(tip)}</title></line>')
        if est is not None and math.isfinite(est) and est > 0:
            marks.append(f'<circle cx="{x:.1f}" cy="{axis.y(est):.1f}" r="3" fill="{COLORS["estimate"]}">'
                         f'<title>{_esc(tip)}</title></circle>')
        if r.get("kind") != "combine" and (up is None or not math.isfinite(up)):
            why = r.get("note") or "no finite bound"
            marks.append(f'<text x="{x:.1f}" y="{TOP + 10}" text-anchor="middle" fill="{COLORS["unbounded"]}">×'
                         f'<title>{_esc(r["name"])}: {_esc(why)}</title></text>')
    return _frame("per-layer spectral norm", "layer, in graph order", "sigma (log scale)", "".join(marks),
                  [("estimate (lower bound)", COLORS["estimate"]), (_upper_label(layers), COLORS["upper"]),
                   ("× no finite number (hover: why)", COLORS["unbounded"])])


def bound_chart(layers: list[dict[str, Any]]) -> str | None:
    """The certified bound from the input to each op, along the graph."""
    points = [(i, r) for i, r in enumerate(layers) if r.get("bound") is not None and math.isfinite(r["bound"])
              and r["bound"] > 0]
    if not points:
        return None
    axis = _LogAxis([r["bound"] for _, r in points])
    path = " ".join(f"{'M' if k == 0 else 'L'}{_x(i, len(layers)):.1f},{axis.y(r['bound']):.1f}"
                    for k, (i, r) in enumerate(points))
    dots = "".join(f'<circle cx="{_x(i, len(layers)):.1f}" cy="{axis.y(r["bound"]):.1f}" r="2.5" '
                   f'fill="{COLORS["bound"]}"><title>{_esc(r["name"])}: bound {_num(r["bound"])}</title></circle>'
                   for i, r in points)
    return _frame("network bound along the graph", "layer, in graph order", "bound from the input (log scale)",
                  axis.ticks() + f'<path d="{path}" fill="none" stroke="{COLORS["bound"]}"/>' + dots,
                  [("certified bound up to this op", COLORS["bound"])])


def heatmap(layers: list[dict[str, Any]], field: str) -> str | None:
    """role x block grid of ``field`` for transformer checkpoints (darker = larger)."""
    cells = {(r["role"], r["block"]): r[field] for r in layers  # whole matrices: not their head rows
             if r.get("role") and r.get("block") is not None and r.get(field) is not None
             and r.get("kind") != "head"}
    if not cells:
        return None
    roles = sorted({k[0] for k in cells})
    blocks = sorted({k[1] for k in cells})
    values = list(cells.values())
    lo, hi = min(values), max(values)
    w, h = max(6.0, (WIDTH - LEFT - RIGHT) / len(blocks)), 18
    rects = []
    for j, role in enumerate(roles):
        rects.append(f'<text x="{LEFT - 6}" y="{TOP + j * h + 13}" text-anchor="end">{_esc(role)}</text>')
        for i, block in enumerate(blocks):
            if (role, block) not in cells:
                continue
            v = cells[(role, block)]
            shade = 0.15 + 0.85 * ((v - lo) / (hi - lo) if hi > lo else 1.0)
            rects.append(f'<rect x="{LEFT + i * w:.1f}" y="{TOP + j * h}" width="{w:.1f}" height="{h - 1}" '
                         f'fill="{COLORS["upper"]}" fill-opacity="{shade:.2f}"><title>{_esc(role)}, block {block}: '
                         f'{field} {_num(v)}</title></rect>')
    height = TOP + len(roles) * h + 40
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" role="img" '
            f'aria-label="{field} by role and block"><text x="{LEFT}" y="16" font-weight="bold">{_esc(field)} by role '
            f'and block (lighter {_num(lo)}, darker {_num(hi)})</text>{"".join(rects)}'
            f'<text x="{(LEFT + WIDTH) / 2}" y="{height - 8}" text-anchor="middle">block index '
            f'{blocks[0]}..{blocks[-1]}</text></svg>')


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_num(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{_esc(title)}</h1>{body}"
            f'<p class="note">lipcheck {_esc(__version__)}</p></body></html>\n')


LAYER_COLUMNS = ("name", "op", "kind", "sigma", "sigma_upper", "sigma_matrix", "bound", "rms_to_rms", "block",
                 "role", "note")


def experts_chart(layers: list[dict[str, Any]]) -> str | None:
    """Fused expert tensors (rows ``<tensor>[e]``): each tensor's experts as a column of dots,
    with the median marked, so an outlier expert stands out."""
    import re
    import statistics

    groups: dict[str, list[tuple[int, float]]] = {}
    for r in layers:
        m = re.fullmatch(r"(.+)\[(\d+)\]", r["name"])
        value = r.get("sigma_upper") if r.get("sigma_upper") is not None else r.get("sigma")
        if m and value is not None and math.isfinite(value) and value > 0:
            groups.setdefault(m.group(1), []).append((int(m.group(2)), value))
    if not groups:
        return None
    axis = _LogAxis([v for g in groups.values() for _, v in g])
    n, marks = len(groups), [axis.ticks()]
    for i, (tensor, experts) in enumerate(groups.items()):
        x = _x(i, n)
        median = statistics.median(v for _, v in experts)
        for e, v in experts:
            marks.append(f'<circle cx="{x:.1f}" cy="{axis.y(v):.1f}" r="2.5" fill="{COLORS["upper"]}" '
                         f'fill-opacity="0.6"><title>{_esc(tensor)}[{e}]: {_num(v)}</title></circle>')
        marks.append(f'<line x1="{x - 8:.1f}" x2="{x + 8:.1f}" y1="{axis.y(median):.1f}" y2="{axis.y(median):.1f}" '
                     f'stroke="{COLORS["estimate"]}" stroke-width="2"><title>{_esc(tensor)}: median {_num(median)} '
                     f'of {len(experts)} experts</title></line>')
    return _frame("experts: sigma_upper of each expert, per tensor", "expert tensor, in order",
                  "sigma_upper (log scale)", "".join(marks),
                  [("one expert", COLORS["upper"]), ("median over the experts", COLORS["estimate"])])


def report_section(doc: dict[str, Any]) -> str:
    net = doc["network"]
    from .writers import network_kind

    headline = (f"network Lipschitz bound ({_esc(network_kind(net))}): <b>{_num(net['lipschitz_bound'])}</b>"
                if net["bounded"] else f"no network bound: {_esc(net['reason'])}")
    if net["bounded"] and net.get("composition") not in (None, "graph-product"):
        headline += f"; composition: {_esc(net['composition'])}"
    if net.get("start"):
        headline += f"<br>from {_esc(net['start'])} (--from): everything not computed from it held fixed"
    if net.get("domain"):
        headline += f"<br>local bound: it holds for inputs in the declared domain only ({_esc(net['domain'])})"
    probabilistic = [r for r in doc["layers"] if r.get("upper_kind") == "probabilistic"]
    if probabilistic:
        deltas = sorted({r.get("failure_probability") or 0.0 for r in probabilistic})
        headline += (f"<br>{len(probabilistic)} layer(s) have a probabilistic sigma_upper (random-start "
                     f"Lanczos): each fails with probability at most δ={_esc(', '.join(f'{d:.3g}' for d in deltas))}"
                     "; rerun with --certify exact for certified bounds")
    parts = [f"<h2>{_esc(doc['model']['path'])} [{_esc(doc['model']['format'])}]</h2><p>{headline}</p>",
             sigma_chart(doc["layers"])]
    for chart in (bound_chart(doc["layers"]), heatmap(doc["layers"], "sigma"),
                  heatmap(doc["layers"], "rms_to_rms"), experts_chart(doc["layers"])):
        if chart:
            parts.append(chart)
    # columns the JSON has no value in for any layer (rms_to_rms of a graph model...) are left out
    columns = [c for c in LAYER_COLUMNS if c in ("name", "op", "kind") or any(r.get(c) is not None
                                                                             for r in doc["layers"])]
    parts.append(_table(columns, [[r.get(c) for c in columns] for r in doc["layers"]]))
    if doc.get("skipped"):
        parts.append("<p>Skipped:</p>" + _table(("name", "op", "reason"),
                                                [[s["name"], s["op"], s["reason"]] for s in doc["skipped"]]))
    if doc.get("notes"):
        parts.append("".join(f'<p class="note">{_esc(n)}</p>' for n in doc["notes"]))
    return "".join(parts)


def inspect_html(docs: list[dict[str, Any]]) -> str:
    return _page("lipcheck inspect", "".join(report_section(d) for d in docs))


def check_html(docs: list[dict[str, Any]], results: list[Any]) -> str:
    rows = [[r.model, r.rule, "pass" if r.passed else "FAIL", r.value, r.limit, r.message] for r in results]
    table = _table(("model", "rule", "result", "value", "limit", "detail"), rows)
    table = table.replace("<td>FAIL</td>", '<td class="fail">FAIL</td>').replace("<td>pass</td>",
                                                                                 '<td class="pass">pass</td>')
    return _page("lipcheck check", table + "".join(report_section(d) for d in docs))


def diff_chart(layers: list[dict[str, Any]]) -> str | None:
    """Certified sigma per layer before (a) and after (b); layers that grew are marked."""
    values = _positive([r.get("sigma_upper_a") for r in layers] + [r.get("sigma_upper_b") for r in layers])
    if not values:
        return None
    axis = _LogAxis(values)
    n, marks = len(layers), [axis.ticks()]
    for i, r in enumerate(layers):
        x, a, b = _x(i, n), r.get("sigma_upper_a"), r.get("sigma_upper_b")
        grew = a is not None and b is not None and b > a
        tip = f"{r['name']}: {_num(a)} -> {_num(b)}"
        for value, key, dx in ((a, "a", -2), (b, "b", 2)):
            if value is not None and math.isfinite(value) and value > 0:
                radius = 4 if grew and key == "b" else 3
                marks.append(f'<circle cx="{x + dx:.1f}" cy="{axis.y(value):.1f}" r="{radius}" '
                             f'fill="{COLORS[key]}"><title>{_esc(tip)}</title></circle>')
        if grew:
            marks.append(f'<text x="{x:.1f}" y="{TOP + 10}" text-anchor="middle" fill="{COLORS["b"]}">▲'
                         f'<title>{_esc(tip)}</title></text>')
    return _frame("upper bound on sigma per layer, before and after", "layer", "sigma_upper (log scale)",
                  "".join(marks),
                  [("A (before)", COLORS["a"]), ("B (after)", COLORS["b"]), ("▲ grew", COLORS["b"])])


def diff_html(doc: dict[str, Any]) -> str:
    net = doc["network"]
    parts = [f"<p>{_esc(doc['a']['path'])} → {_esc(doc['b']['path'])}: network bound "
             f"{_num(net['lipschitz_bound_a'])} → {_num(net['lipschitz_bound_b'])}</p>"]
    chart = diff_chart(doc["layers"])
    if chart:
        parts.append(chart)
    parts.append(_table(("layer", "op", "sigma_upper A", "sigma_upper B", "change"),
                        [[r["name"], r["op"], r["sigma_upper_a"], r["sigma_upper_b"], r["change"]]
                         for r in doc["layers"]]))
    if doc.get("updates"):
        parts.append("<h2>update norms: sigma(W_B - W_A)</h2>" + _table(
            ("matrix", "delta_sigma", "delta_sigma_upper", "relative", "delta_rms_to_rms"),
            [[u["name"], u["delta_sigma"], u["delta_sigma_upper"], u["relative"], u["delta_rms_to_rms"]]
             for u in doc["updates"]]))
    for key in ("new", "vanished"):
        if doc.get(key):
            parts.append(f"<p>{key}: " + ", ".join(_esc(r["name"]) for r in doc[key]) + "</p>")
    return _page("lipcheck diff", "".join(parts))


def markdown_charts(kind: str, docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(alt text, standalone SVG) per chart a Markdown report links to: the per-layer sigma
    chart of each model (inspect, check), or the before/after chart of a diff."""
    if kind == "diff":
        chart = diff_chart(docs[0]["layers"])
        return [] if chart is None else [(f"sigma_upper per layer, {docs[0]['a']['path']} -> {docs[0]['b']['path']}",
                                          chart)]
    return [(f"per-layer spectral norm of {doc['model']['path']}", sigma_chart(doc["layers"]))
            for doc in docs if doc["layers"]]
