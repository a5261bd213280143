"""Human output: the rich table and the progress bar. The only module that uses rich."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .writers import fmt


def _iters(iterations: int | None, converged: bool | None) -> str:
    if iterations is None:
        return "-"
    if iterations == 0:
        return "exact"
    return f"{iterations}" + ("" if converged else "!")


def shorten(name: str, width: int) -> str:
    """``name`` in at most ``width`` characters, its middle replaced by an ellipsis: the
    start and the end of a module path are the parts that tell layers apart."""
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return name[:head] + "…" + name[len(name) - (width - 1 - head):]


COLUMNS = ("layer", "op", "input", "sigma est", "sigma_mat", "sigma_up", "iters", "bound", "sigma_up (log)")
ORDER = (0, 1, 2, 3, 4, 5, 8, 6, 7)  # the bar column sits beside the number it draws
# Room a layer name gets before a column is given up for it: module paths up to this long
# read whole (``encoder.layers.11.self_attn.out_proj``, ``model.layers.31.self_attn.o_proj``).
NAME_ROOM = 36
PROBABILISTIC_MARK = "†"  # after a probabilistic sigma_upper; the summary gives its δ


def _upper(r: dict[str, Any]) -> str:
    text = fmt(r["sigma_upper"])
    return text + PROBABILISTIC_MARK if r.get("upper_kind") == "probabilistic" else text


def _network_kind(n: dict[str, Any]) -> str:
    """How the network bound holds: certified, or probabilistic with its failure probability."""
    if n.get("certified", True) or n.get("failure_probability") is None:
        return "certified"
    return f"probabilistic, fails with probability <= {n['failure_probability']:.3g}"


BAR_WIDTH = 10  # characters of the bar column, each eight steps of a block
BAR_BLOCKS = " ▏▎▍▌▋▊▉█"
BAR_MIN_WIDTH = 100  # terminals narrower than this get no bar column


def bars(values: list[float | None], width: int = BAR_WIDTH) -> list[str]:
    """Each value as a bar of block characters on a log scale: the largest value fills the
    width, and the scale spans the whole decades between the smallest positive value and
    the largest (at least one), so a bar's length reads as log10(value / largest). Values
    without a positive finite number get no bar."""
    good = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    if not good:
        return ["" for _ in values]
    top, low = max(good), min(good)
    span = max(1, math.ceil(math.log10(top / low) - 1e-12))
    out = []
    for v in values:
        if v is None or not math.isfinite(v) or v <= 0:
            out.append("")
            continue
        eighths = max(1, round((1 + math.log10(v / top) / span) * width * 8))
        full, part = divmod(eighths, 8)
        out.append(("█" * full + (BAR_BLOCKS[part] if part else "")).ljust(width))
    return out


def _cells(doc: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in doc["layers"]:
        # A spectrally normalized weight is marked where the eye reads the op (the JSON's
        # spectral_norm field names the API).
        op = f"{r['op']}+SN" if r.get("spectral_norm") else r["op"]
        rows.append([r["name"], op, fmt(r["input_shape"] or None), fmt(r["sigma"]), fmt(r["sigma_matrix"]),
                     _upper(r), _iters(r["iterations"], r["converged"]), fmt(r["bound"])])
    # The bar column (index 8, shown after sigma_up) when the width allows: sigma_up, or the
    # estimate where there is no upper bound, relative to the largest.
    values = [r["sigma_upper"] if r["sigma_upper"] is not None else r["sigma"] for r in doc["layers"]]
    for row, bar in zip(rows, bars(values)):
        row.append(bar)
    return rows


class LayerTable:
    """The per-layer table of one report, sized when rendered: columns with nothing in them
    are left out, and on a narrow terminal long layer names are shortened in the middle, so
    the layer column always stays."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc

    def __rich_console__(self, console: Console, options: Any) -> Any:
        model = self.doc["model"]
        # The title goes on a line of its own: a table's title wraps at the table's width.
        yield Text(f"lipcheck: {model['path']}  [{model['format']}]")
        yield table(self.doc, max_width=options.max_width, title=False)


def table(doc: dict[str, Any], max_width: int | None = None, title: bool = True) -> Table:
    """The per-layer table of one report (its JSON document)."""
    model = doc["model"]
    cells = _cells(doc)
    keep = [0, 1] + [c for c in range(2, 8) if any(row[c] != "-" for row in cells)]
    # Titles are markup to rich: a file name or the '[onnx]' tag would be read as a style.
    t = Table(title=escape(f"lipcheck: {model['path']}  [{model['format']}]") if title else None,
              title_justify="left")
    name_width = None
    if max_width is not None:
        # Each column takes its widest cell plus padding and a border (the first one also the
        # table's left edge). On a narrow terminal the least needed columns go first, until
        # the names get the room they need (up to NAME_ROOM), so that no number is ever cut
        # short and the layer column stays; names still too long lose their middle.
        def width(c: int) -> int:
            return max([len(COLUMNS[c])] + [len(row[c]) for row in cells]) + 3

        def room() -> int:
            return max_width - sum(width(c) for c in keep[1:]) - 4

        wanted = min(max((len(row[0]) for row in cells), default=0), NAME_ROOM)
        for drop in (2, 6, 4):  # input, iters, sigma_mat
            if drop in keep and room() < wanted:
                keep.remove(drop)
        if max_width >= BAR_MIN_WIDTH and any(row[8].strip() for row in cells):
            keep.append(8)
            if room() < wanted:
                keep.remove(8)
        name_width = max(12, room())
    keep.sort(key=ORDER.index)
    for c in keep:
        t.add_column(COLUMNS[c], justify="left" if c < 3 or c == 8 else "right", no_wrap=True,
                     min_width=min(12, name_width or 12) if c == 0 else None)
    for row in cells:
        name = shorten(row[0], name_width) if name_width else row[0]
        t.add_row(*[escape(name if c == 0 else row[c]) for c in keep])
    return t


def summary(doc: dict[str, Any]) -> Text:
    n = doc["network"]
    text = Text()
    if n["bounded"]:
        text.append(f"network Lipschitz bound ({_network_kind(n)}): ", style="bold")
        text.append(fmt(n["lipschitz_bound"]), style="bold green" if _network_kind(n) == "certified" else "bold yellow")
        text.append(f"   composed from the estimates: {fmt(n['lipschitz_estimate'])}\n")
        if n.get("composition") not in (None, "graph-product"):
            text.append(f"composition: {n['composition']}\n")
    else:
        text.append("network Lipschitz bound: ", style="bold")
        text.append("none", style="bold red")
        text.append(f" - {n['reason']}\n")
    if n.get("start"):
        text.append(f"from {n['start']} (--from): everything not computed from it held fixed\n")
    if n.get("domain"):
        text.append(f"local bound: it holds for inputs in the declared domain only ({n['domain']})\n",
                    style="bold yellow")
    if n.get("lipschitz_lower") is not None:
        text.append("empirical lower bound (a real input's secant): ", style="bold")
        text.append(fmt(n["lipschitz_lower"]))
        if n["bounded"] and n["lipschitz_bound"]:
            text.append(f"   certified / lower = {n['lipschitz_bound'] / n['lipschitz_lower']:.4g}")
        text.append("\n")
    unconverged = [r["name"] for r in doc["layers"] if r["converged"] is False]
    if unconverged:
        text.append(f"{len(unconverged)} estimate(s) marked ! did not converge within max_iters "
                    "(their sigma is a lower bound; sigma_upper still holds)\n", style="yellow")
    probabilistic = [r for r in doc["layers"] if r.get("upper_kind") == "probabilistic"]
    if not probabilistic:
        text.append("sigma est: Krylov/power-iteration estimate (a lower bound); sigma_up: certified upper "
                    "bound; sigma_mat: norm of the reshaped conv weight; bound: certified bound from "
                    "the input to that layer\n", style="dim")
    else:
        text.append("sigma est: Krylov/power-iteration estimate (a lower bound); sigma_up: upper bound, "
                    f"certified unless marked {PROBABILISTIC_MARK}; sigma_mat: norm of the reshaped conv weight; "
                    "bound: upper bound from the input to that layer (probabilistic from the first "
                    f"{PROBABILISTIC_MARK} layer on)\n", style="dim")
        deltas = sorted({r.get("failure_probability") or 0.0 for r in probabilistic})
        text.append(f"{PROBABILISTIC_MARK} probabilistic upper bound ({len(probabilistic)} layer(s)): from a "
                    "random-start Lanczos run (Kuczyński & Woźniakowski 1992), it fails with probability "
                    f"at most δ={', '.join(f'{d:.3g}' for d in deltas)} per layer; the bounds built on it "
                    "are probabilistic too (--certify exact for certified ones)\n", style="yellow")
    if doc.get("logit_bounds"):
        text.append(_logit_summary(doc["logit_bounds"]))
    for s in doc["skipped"]:
        text.append(f"skipped {s['name']} ({s['op']}): {s['reason']}\n", style="yellow")
    for note in doc["notes"]:
        text.append(f"note: {note}\n")
    return text


PIPE_WIDTH = 140


def make_console(file: object | None = None) -> Console:
    """A terminal keeps its own width; a pipe or file gets $COLUMNS when it is set (as rich
    does for a terminal), else a fixed 140 columns."""
    if file is None and Console().is_terminal:
        return Console()
    columns = os.environ.get("COLUMNS", "")
    width = int(columns) if columns.isdigit() and int(columns) > 0 else PIPE_WIDTH
    return Console(file=file, width=width)  # type: ignore[arg-type]


def report_renderables(doc: dict[str, Any]) -> list[Any]:
    return [LayerTable(doc), summary(doc)]


@contextmanager
def progress_bar(enabled: bool) -> Iterator[object]:
    """Yields a progress callback (or None): a bar on stderr while layers are analysed."""
    if not enabled:
        yield None
        return
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[layer]}"), console=console,
                  transient=True) as bar:
        task = bar.add_task("analysing", total=None, layer="")

        def update(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, layer=name[:40])

        yield update


def _logit_summary(bounds: list[dict[str, Any]]) -> str:
    """One line: the largest logit bound of each block's heads (the JSON has every head)."""
    worst: dict[int, dict[str, Any]] = {}
    for b in bounds:
        if b["bound"] is not None and (b["block"] not in worst or b["bound"] > worst[b["block"]]["bound"]):
            worst[b["block"]] = b
    parts = [f"{k}: {fmt(v['bound'])} (h{v['head']}){PROBABILISTIC_MARK if v['upper_kind'] == 'probabilistic' else ''}"
             for k, v in sorted(worst.items())]
    return "attention logit bound |q.k|/sqrt(d_head), largest head per block: " + ", ".join(parts) + "\n"


def normalize_table(result: Any) -> Table:
    """Before/after per layer for ``lipcheck normalize``."""
    t = Table(title=escape(f"lipcheck normalize: {result.before.model.path} -> {result.output}"),
              title_justify="left")
    # The upper bounds are certified unless their row says probabilistic: mark those as inspect does.
    before_kind = {r.name: r.upper_kind for r in result.before.layers}
    after_kind = {r.name: r.upper_kind for r in result.after.layers} if result.after else {}

    def upper(value: float | None, kind: str | None) -> str:
        return fmt(value) + (PROBABILISTIC_MARK if kind == "probabilistic" and value is not None else "")

    for col, right in (("layer", False), ("op", False), ("before (upper)", True), ("target", True),
                       ("scale", True), ("after sigma", True), ("after upper", True), ("", False)):
        t.add_column(col, justify="right" if right else "left", no_wrap=col != "layer")
    for c in result.changes:
        status = "ok" if c.ok else ("FAIL" if c.ok is False else (c.skipped or ""))
        t.add_row(escape(c.name), escape(c.op), upper(c.before, before_kind.get(c.name)), fmt(c.target),
                  fmt(c.scale), fmt(c.after_sigma), upper(c.after_upper, after_kind.get(c.after_name or c.name)),
                  escape(status))
    return t


def normalize_summary(result: Any) -> Text:
    text = Text()
    before, after = result.before.network, result.after.network if result.after else None
    kind = "certified" if before.certified and (after is None or after.certified or not after.bounded) else (
        "probabilistic: see the reports' failure_probability")
    text.append(f"network bound ({kind}): ", style="bold")
    text.append(f"{fmt(before.lipschitz_bound)} -> {fmt(after.lipschitz_bound if after else None)}")
    if result.budget is not None:
        text.append(f"   budget {fmt(result.budget)}")
    text.append("\n")
    rows = result.before.layers + (result.after.layers if result.after else [])
    if any(r.upper_kind == "probabilistic" for r in rows):
        text.append(f"{PROBABILISTIC_MARK} probabilistic upper bound: from a random-start Lanczos run, it fails "
                    "with probability at most the row's failure_probability (--certify exact for certified "
                    "ones); other upper bounds are certified\n", style="yellow")
    if after is not None and not after.bounded:
        text.append(f"no network bound: {after.reason}\n", style="yellow")
    for failure in result.failures:
        text.append(f"FAILED: {failure}\n", style="bold red")
    if result.ok:
        text.append(f"wrote {result.output}; re-inspection confirms every rescaled layer is at or "
                    "below its target\n", style="green")
    return text


def check_table(results: list[Any]) -> Table:
    t = Table(title="lipcheck check", title_justify="left")
    for col in ("model", "rule", "result", "value", "limit", "detail"):
        t.add_column(col, overflow="fold")
    for r in results:
        t.add_row(escape(r.model), escape(r.rule), "[green]pass[/]" if r.passed else "[bold red]FAIL[/]",
                  fmt(r.value), fmt(r.limit), escape(r.message))
    return t


def diff_table(doc: dict[str, Any]) -> Table | Group:
    net = doc["network"]
    t = Table(title=escape(f"lipcheck diff: {doc['a']['path']} -> {doc['b']['path']}   network bound "
                           f"{fmt(net['lipschitz_bound_a'])} -> {fmt(net['lipschitz_bound_b'])}"),
              title_justify="left")
    for col in ("layer", "op", "sigma_upper A", "sigma_upper B", "change"):
        t.add_column(col, justify="left" if col in ("layer", "op") else "right")
    for r in doc["layers"]:
        change = "-" if r["change"] is None else f"{r['change'] * 100:+.2f}%"
        t.add_row(escape(r["name"]), escape(r["op"]), fmt(r["sigma_upper_a"]), fmt(r["sigma_upper_b"]), change)
    for r in doc["new"]:
        t.add_row(escape(r["name"]), escape(r["op"]), "-", "new", "")
    for r in doc["vanished"]:
        t.add_row(escape(r["name"]), escape(r["op"]), "vanished", "-", "")
    if not doc.get("updates"):
        return t
    u = Table(title="update norms: sigma(W_B - W_A) per matrix", title_justify="left")
    for col in ("matrix", "delta sigma", "delta sigma_up", "relative", "delta rms->rms"):
        u.add_column(col, justify="left" if col == "matrix" else "right", no_wrap=col != "matrix")
    for r in doc["updates"]:
        rel = "-" if r["relative"] is None else f"{r['relative'] * 100:.3g}%"
        u.add_row(escape(r["name"]), fmt(r["delta_sigma"]), fmt(r["delta_sigma_upper"]), rel,
                  fmt(r["delta_rms_to_rms"]))
    return Group(t, u)
