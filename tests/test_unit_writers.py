"""lipcheck.writers on hand-written documents: the exact text of each format, written out
here, and the machine formats read back with the standard library."""

from __future__ import annotations

import csv
import io
import json
import math
import xml.etree.ElementTree as ET
from dataclasses import asdict
from typing import Any

import pytest

from lipcheck import __version__, writers
from lipcheck.diff import diff
from lipcheck.gate import RuleResult
from lipcheck.report import LAYER_FIELDS, LayerRow


def layer(name: str, op: str, **values: Any) -> dict[str, Any]:
    return asdict(LayerRow(name=name, op=op, kind="linear", **values))


def report(path: str, layers: list[dict[str, Any]], bound: float | None = 1.5,
           reason: str = "certified: composed from per-layer upper bounds",
           skipped: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"schema_version": "1", "model": {"path": path, "sha256": "0" * 64, "format": "onnx"},
            "layers": layers, "skipped": skipped or [],
            "network": {"lipschitz_bound": bound, "lipschitz_estimate": bound, "bounded": bound is not None,
                        "certified": bound is not None, "reason": reason}}


FC = layer("fc", "Gemm", input_shape=[1, 4], sigma=1.4999, sigma_upper=1.5, bound=1.5, iterations=7,
           converged=True)
DOC = report("m.onnx", [FC])


# --------------------------------------------------------------------------- numbers and JSON


@pytest.mark.parametrize(("value", "text"), [
    (None, "-"), (True, "yes"), (False, "no"), (1.23456789, "1.23457"), (1e-7, "1e-07"), (2.0, "2"),
    (math.nan, "nan"), (math.inf, "inf"), (-math.inf, "inf"), ([1, None, 16], "1x?x16"), (7, "7"), ("Conv", "Conv"),
])
def test_fmt(value: Any, text: str) -> None:
    assert writers.fmt(value) == text


def test_dumps_sorts_keys_indents_and_ends_with_a_newline() -> None:
    assert writers.dumps({"b": 1, "a": [1.5, None]}) == '{\n  "a": [\n    1.5,\n    null\n  ],\n  "b": 1\n}\n'


def test_dumps_refuses_nan() -> None:
    with pytest.raises(ValueError):
        writers.dumps({"x": math.nan})


def test_bundle_keeps_one_report_and_wraps_several() -> None:
    assert writers.bundle([DOC]) is DOC
    two = writers.bundle([DOC, DOC])
    assert two == {"schema_version": "1", "lipcheck_version": __version__, "reports": [DOC, DOC]}


# --------------------------------------------------------------------------- inspect


def test_inspect_markdown_text() -> None:
    assert writers.inspect_markdown([DOC]) == (
        "### lipcheck: `m.onnx`\n"
        "\n"
        "Network Lipschitz bound: **1.5** (certified)\n"
        "\n"
        "| layer | op | input | sigma (est.) | sigma_matrix | sigma_upper | bound |\n"
        "|---|---|---|---|---|---|---|\n"
        "| fc | Gemm | 1x4 | 1.4999 | - | 1.5 | 1.5 |\n"
    )


def test_inspect_markdown_unbounded_escapes_pipes_and_lists_skipped_ops() -> None:
    doc = report("m.onnx", [FC], bound=None, reason="unbounded: op A|B",
                 skipped=[{"name": "n1", "op": "Mystery", "reason": "not supported\nby lipcheck"}])
    text = writers.inspect_markdown([doc])
    assert "Network Lipschitz bound: **unbounded**: unbounded: op A\\|B\n" in text
    assert text.endswith("\nSkipped: `n1` (Mystery): not supported by lipcheck\n")


def test_inspect_csv_has_every_layer_field_and_the_model() -> None:
    text = writers.inspect_csv([DOC, report("n.onnx", [layer("a", "Conv"), layer("b", "Relu")])])
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["model", *LAYER_FIELDS]
    assert [(r["model"], r["name"]) for r in rows] == [("m.onnx", "fc"), ("n.onnx", "a"), ("n.onnx", "b")]
    assert rows[0]["input_shape"] == "1x4" and rows[1]["input_shape"] == ""
    assert float(rows[0]["sigma"]) == 1.4999 and rows[0]["converged"] == "True" and rows[1]["sigma"] == ""
    assert text.count("\r") == 0 and text.endswith("\n")


def test_inspect_junit_one_passing_case_per_model() -> None:
    unbounded = report("u.onnx", [FC], bound=None, reason="unbounded: lstm (LSTM)")
    root = ET.fromstring(writers.inspect_junit([DOC, unbounded]))
    assert (root.tag, root.get("tests"), root.get("failures")) == ("testsuites", "2", "0")
    outs = [(s.get("name"), c.get("name"), c.findtext("system-out")) for s in root for c in s]
    assert outs == [("m.onnx", "inspect", "network bound 1.5 (certified)"),
                    ("u.onnx", "inspect", "unbounded: lstm (LSTM)")]


# --------------------------------------------------------------------------- check

RESULTS = [
    RuleResult("m.onnx", "max-lipschitz", True, 1.5, 2.0, "network bound 1.5 <= 2"),
    RuleResult("n.onnx", "max-layer-sigma", False, 3.0, 2.0, "layer conv: sigma 3 > 2", "conv"),
]


def test_check_document_fails_when_any_rule_fails() -> None:
    doc = writers.check_document([DOC], RESULTS)
    assert doc["passed"] is False and doc["reports"] == [DOC] and doc["lipcheck_version"] == __version__
    assert doc["results"][1] == {"model": "n.onnx", "rule": "max-layer-sigma", "passed": False, "value": 3.0,
                                 "limit": 2.0, "message": "layer conv: sigma 3 > 2", "layer": "conv"}
    assert writers.check_document([DOC], RESULTS[:1])["passed"] is True


def test_check_markdown_text() -> None:
    assert writers.check_markdown(RESULTS) == (
        "### lipcheck gate: FAILED\n"
        "\n"
        "| model | rule | result | value | limit | detail |\n"
        "|---|---|---|---|---|---|\n"
        "| m.onnx | max-lipschitz | pass | 1.5 | 2 | network bound 1.5 <= 2 |\n"
        "| n.onnx | max-layer-sigma | FAIL | 3 | 2 | layer conv: sigma 3 > 2 |\n"
    )
    assert writers.check_markdown(RESULTS[:1]).startswith("### lipcheck gate: passed\n")


def test_check_csv_columns() -> None:
    rows = list(csv.DictReader(io.StringIO(writers.check_csv(RESULTS))))
    assert list(rows[0]) == ["model", "rule", "layer", "passed", "value", "limit", "message"]
    assert [(r["rule"], r["layer"], r["passed"]) for r in rows] == [
        ("max-lipschitz", "", "True"), ("max-layer-sigma", "conv", "False")]


def test_check_junit_a_suite_per_model_a_case_per_rule() -> None:
    root = ET.fromstring(writers.check_junit(RESULTS))
    assert (root.get("tests"), root.get("failures")) == ("2", "1")
    m, n = root.findall("testsuite")
    assert (m.get("name"), m.get("failures"), n.get("name"), n.get("failures")) == ("m.onnx", "0", "n.onnx", "1")
    case = n.find("testcase")
    assert case is not None and case.get("name") == "max-layer-sigma[conv]"
    failure = case.find("failure")
    assert failure is not None and failure.get("message") == "layer conv: sigma 3 > 2"


# --------------------------------------------------------------------------- diff

A = report("a.onnx", [layer("fc", "Gemm", sigma_upper=2.0), layer("w", "Gemm", sigma_upper=0.0),
                      layer("gone", "Conv", sigma_upper=1.0)], bound=4.0)
B = report("b.onnx", [layer("fc", "Gemm", sigma_upper=3.0), layer("w", "Gemm", sigma_upper=1.0),
                      layer("new", "Conv", sigma_upper=1.0)], bound=3.0)
DIFF = diff(A, B)


def test_diff_markdown_text() -> None:
    assert writers.diff_markdown(DIFF) == (
        "### lipcheck diff: `a.onnx` → `b.onnx`\n"
        "\n"
        "Network bound: 4 → 3 (-25.00%)\n"
        "\n"
        "| layer | op | sigma_upper A | sigma_upper B | change |\n"
        "|---|---|---|---|---|\n"
        "| fc | Gemm | 2 | 3 | +50.00% |\n"
        "| w | Gemm | 0 | 1 | inf |\n"
        "\n"
        "\n"
        "New layers: `new`\n"
        "\n"
        "\n"
        "Vanished layers: `gone`\n"
    )


def test_diff_csv_marks_each_row() -> None:
    rows = list(csv.DictReader(io.StringIO(writers.diff_csv(DIFF))))
    assert list(rows[0]) == [*writers.DIFF_COLUMNS, "status"]
    assert [(r["name"], r["status"]) for r in rows] == [("fc", "both"), ("w", "both"), ("new", "new"),
                                                        ("gone", "vanished")]
    assert float(rows[0]["change"]) == 0.5 and rows[1]["change"] == "inf"


def test_diff_junit_a_case_per_shared_layer() -> None:
    root = ET.fromstring(writers.diff_junit(DIFF))
    (suite,) = root.findall("testsuite")
    assert suite.get("name") == "a.onnx -> b.onnx" and root.get("failures") == "0"
    assert [(c.get("name"), c.findtext("system-out")) for c in suite] == [("fc", "2 -> 3 (+50.00%)"),
                                                                         ("w", "0 -> 1 (inf)")]


def test_every_writer_output_is_valid_in_its_format() -> None:
    """JSON parses to what went in; XML parses; nothing ends without a newline."""
    doc = json.loads(writers.dumps(writers.bundle([DOC, DOC])))
    assert doc["reports"] == [DOC, DOC]
    texts = [writers.inspect_csv([DOC]), writers.inspect_markdown([DOC]), writers.inspect_junit([DOC]),
             writers.check_csv(RESULTS), writers.check_markdown(RESULTS), writers.check_junit(RESULTS),
             writers.diff_csv(DIFF), writers.diff_markdown(DIFF), writers.diff_junit(DIFF)]
    assert all(t.endswith("\n") for t in texts)


def test_writer_registry_covers_every_format_and_kind_and_refuses_unknown() -> None:
    import pytest

    from lipcheck import writers

    for fmt in ("json", "csv", "markdown", "junit", "html"):
        for kind in ("inspect", "check", "diff"):
            assert (fmt, kind) in writers.WRITERS
    with pytest.raises(ValueError, match="no yaml writer for inspect"):
        writers.write("yaml", "inspect", [])
    doc = {"a": {"path": "a.pt"}, "b": {"path": "b.pt"}, "layers": []}
    assert writers.write("json", "diff", doc) == writers.dumps(doc)
