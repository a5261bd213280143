"""Machine and review formats for every reporting command: JSON, CSV, Markdown, JUnit XML.

Each writer takes plain JSON-ready documents (``Report.to_dict()``, gate results, a diff)
and returns text; nothing here prints. Output is deterministic: sorted JSON keys, no
timestamps unless asked for.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from typing import Any

from .report import LAYER_FIELDS, SCHEMA_VERSION


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf"
        return f"{value:.6g}"
    if isinstance(value, list):
        return "x".join("?" if d is None else str(d) for d in value)
    return str(value)


def dumps(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"


def bundle(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """One report stays as it is; several go under ``reports``."""
    if len(docs) == 1:
        return docs[0]
    from . import __version__

    return {"schema_version": SCHEMA_VERSION, "lipcheck_version": __version__, "reports": docs}


# --------------------------------------------------------------------------- inspect


def inspect_csv(docs: list[dict[str, Any]]) -> str:
    import pandas as pd

    rows = []
    for doc in docs:
        for row in doc["layers"]:
            flat = {"model": doc["model"]["path"], **row}
            flat["input_shape"] = fmt(row["input_shape"]) if row["input_shape"] else ""
            rows.append(flat)
    frame = pd.DataFrame(rows, columns=["model", *LAYER_FIELDS])
    return str(frame.to_csv(index=False, lineterminator="\n"))


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_md_escape(fmt(v)) for v in row) + " |")
    return "\n".join(lines) + "\n"


def network_kind(net: dict[str, Any]) -> str:
    """How a network bound holds, in words: "certified" or "probabilistic (δ=...)"."""
    if net.get("certified", True) or net.get("failure_probability") is None:
        return "certified"
    return f"probabilistic (δ={net['failure_probability']:.3g})"


def _upper_cell(r: dict[str, Any]) -> str:
    """sigma_upper, marked † when probabilistic (the footnote gives δ)."""
    return fmt(r["sigma_upper"]) + ("†" if r.get("upper_kind") == "probabilistic" else "")


def inspect_markdown(docs: list[dict[str, Any]]) -> str:
    out = []
    for doc in docs:
        net = doc["network"]
        bound = f"**{fmt(net['lipschitz_bound'])}** ({network_kind(net)})" if net["bounded"] else \
            f"**unbounded**: {_md_escape(net['reason'])}"
        if net.get("lipschitz_lower") is not None:
            bound += f"; empirical lower bound {fmt(net['lipschitz_lower'])}"
            if net["bounded"] and net["lipschitz_bound"]:
                bound += f" (certified / lower = {net['lipschitz_bound'] / net['lipschitz_lower']:.4g})"
        if net["bounded"] and net.get("composition") not in (None, "graph-product"):
            bound += f"; composition: {net['composition']}"
        if net.get("start"):
            bound += f"; from `{_md_escape(net['start'])}` (--from)"
        if net.get("domain"):
            bound += f"; **local**: for inputs in the declared domain only ({_md_escape(net['domain'])})"
        out.append(f"### lipcheck: `{doc['model']['path']}`\n\nNetwork Lipschitz bound: {bound}\n")
        out.append(_md_table(
            ["layer", "op", "input", "sigma (est.)", "sigma_matrix", "sigma_upper", "bound"],
            [[r["name"], r["op"], r["input_shape"], r["sigma"], r["sigma_matrix"], _upper_cell(r), r["bound"]]
             for r in doc["layers"]],
        ))
        probabilistic = [r for r in doc["layers"] if r.get("upper_kind") == "probabilistic"]
        if probabilistic:
            deltas = sorted({r.get("failure_probability") or 0.0 for r in probabilistic})
            out.append(f"\n† probabilistic upper bound ({len(probabilistic)} layer(s)): fails with probability "
                       f"at most δ={', '.join(f'{d:.3g}' for d in deltas)} per layer (random-start Lanczos, "
                       "Kuczyński & Woźniakowski 1992); rerun with `--certify exact` for certified bounds.\n")
        if doc["skipped"]:
            out.append("\nSkipped: " + "; ".join(f"`{s['name']}` ({s['op']}): {_md_escape(s['reason'])}"
                                                  for s in doc["skipped"]) + "\n")
    return "\n".join(out)


# A JUnit test case: (name, failure message or None when it passed, detail text).
Case = tuple[str, str | None, str]


def _junit(suites: Sequence[tuple[str, Sequence[Case]]]) -> str:
    """suites: (suite name, its cases)."""
    root = ET.Element("testsuites", name="lipcheck")
    total = failures = 0
    for suite_name, cases in suites:
        suite = ET.SubElement(root, "testsuite", name=suite_name, tests=str(len(cases)),
                              failures=str(sum(1 for c in cases if c[1] is not None)), errors="0")
        for case_name, failure, detail in cases:
            case = ET.SubElement(suite, "testcase", classname=suite_name, name=case_name)
            if failure is not None:
                ET.SubElement(case, "failure", message=failure).text = detail
            else:
                ET.SubElement(case, "system-out").text = detail
            total += 1
            failures += failure is not None
    root.set("tests", str(total))
    root.set("failures", str(failures))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def inspect_junit(docs: list[dict[str, Any]]) -> str:
    """One test case per model: it passes when a report was produced; the network bound
    (or why there is none) is its output."""
    suites = []
    for doc in docs:
        net = doc["network"]
        detail = (f"network bound {fmt(net['lipschitz_bound'])} ({network_kind(net)})" if net["bounded"]
                  else net["reason"])
        suites.append((doc["model"]["path"], [("inspect", None, detail)]))
    return _junit(suites)


# --------------------------------------------------------------------------- check


def check_document(docs: list[dict[str, Any]], results: list[Any]) -> dict[str, Any]:
    from . import __version__

    return {
        "schema_version": SCHEMA_VERSION, "lipcheck_version": __version__,
        "passed": all(r.passed for r in results),
        "results": [r.to_dict() for r in results],
        "reports": docs,
    }


def check_csv(results: list[Any]) -> str:
    import pandas as pd

    columns = ["model", "rule", "layer", "passed", "value", "limit", "message"]
    frame = pd.DataFrame([r.to_dict() for r in results], columns=columns)
    return str(frame.to_csv(index=False, lineterminator="\n"))


def check_markdown(results: list[Any]) -> str:
    verdict = "passed" if all(r.passed for r in results) else "FAILED"
    head = f"### lipcheck gate: {verdict}\n\n"
    return head + _md_table(["model", "rule", "result", "value", "limit", "detail"],
                            [[r.model, r.rule, "pass" if r.passed else "FAIL", r.value, r.limit, r.message]
                             for r in results])


def check_junit(results: list[Any]) -> str:
    by_model: dict[str, list[tuple[str, str | None, str]]] = {}
    for r in results:
        name = r.rule if r.layer is None else f"{r.rule}[{r.layer}]"
        by_model.setdefault(r.model, []).append((name, None if r.passed else r.message, r.message))
    return _junit(list(by_model.items()))


# --------------------------------------------------------------------------- diff

DIFF_COLUMNS = ["name", "op", "sigma_a", "sigma_b", "sigma_upper_a", "sigma_upper_b", "change", "changed"]


def diff_csv(doc: dict[str, Any]) -> str:
    import pandas as pd

    rows = [dict(r, status="both") for r in doc["layers"]]
    rows += [dict(r, status="new") for r in doc["new"]] + [dict(r, status="vanished") for r in doc["vanished"]]
    return str(pd.DataFrame(rows, columns=[*DIFF_COLUMNS, "status"]).to_csv(index=False, lineterminator="\n"))


def _pct(change: float | None) -> str:
    if change is None:
        return "-"
    return "inf" if math.isinf(change) else f"{change * 100:+.2f}%"


def diff_markdown(doc: dict[str, Any]) -> str:
    net = doc["network"]
    out = [f"### lipcheck diff: `{doc['a']['path']}` → `{doc['b']['path']}`\n",
           f"Network bound: {fmt(net['lipschitz_bound_a'])} → {fmt(net['lipschitz_bound_b'])} "
           f"({_pct(net['change'])})\n",
           _md_table(["layer", "op", "sigma_upper A", "sigma_upper B", "change"],
                     [[r["name"], r["op"], r["sigma_upper_a"], r["sigma_upper_b"], _pct(r["change"])]
                      for r in doc["layers"]])]
    if doc["new"]:
        out.append("\nNew layers: " + ", ".join(f"`{r['name']}`" for r in doc["new"]) + "\n")
    if doc["vanished"]:
        out.append("\nVanished layers: " + ", ".join(f"`{r['name']}`" for r in doc["vanished"]) + "\n")
    return "\n".join(out)


def diff_junit(doc: dict[str, Any]) -> str:
    cases = [(r["name"], None, f"{fmt(r['sigma_upper_a'])} -> {fmt(r['sigma_upper_b'])} ({_pct(r['change'])})")
             for r in doc["layers"]]
    return _junit([(f"{doc['a']['path']} -> {doc['b']['path']}", cases)])


# --------------------------------------------------------------------------- registry
# One entry per (output format, document kind). Arguments by kind:
#   "inspect": (docs,)   "check": (docs, results)   "diff": (doc,)
# The HTML writers live in html_report.py and are imported only when asked for.


def _html() -> Any:
    from . import html_report

    return html_report


WRITERS: dict[tuple[str, str], Callable[..., str]] = {
    ("json", "inspect"): lambda docs: dumps(bundle(docs)),
    ("csv", "inspect"): inspect_csv,
    ("markdown", "inspect"): inspect_markdown,
    ("junit", "inspect"): inspect_junit,
    ("html", "inspect"): lambda docs: _html().inspect_html(docs),
    ("json", "check"): lambda docs, results: dumps(check_document(docs, results)),
    ("csv", "check"): lambda docs, results: check_csv(results),
    ("markdown", "check"): lambda docs, results: check_markdown(results),
    ("junit", "check"): lambda docs, results: check_junit(results),
    ("html", "check"): lambda docs, results: _html().check_html(docs, results),
    ("json", "diff"): dumps,
    ("csv", "diff"): diff_csv,
    ("markdown", "diff"): diff_markdown,
    ("junit", "diff"): diff_junit,
    ("html", "diff"): lambda doc: _html().diff_html(doc),
}


def write(fmt: str, kind: str, *args: Any) -> str:
    """The text of document kind ``kind`` ("inspect", "check", "diff") in output format ``fmt``."""
    try:
        writer = WRITERS[(str(getattr(fmt, "value", fmt)), kind)]
    except KeyError:
        raise ValueError(f"no {fmt!s} writer for {kind} reports") from None
    return writer(*args)
