"""Golden reports: every bundled sample in every output format, compared byte for byte.

After an intended change to a report (layer names, a table column, a new JSON field),
regenerate every file with one command, from the repository root:

    python -m pytest tests/test_golden.py -q --overwrite-golden

(``LIPCHECK_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py -q`` does the same), then
read ``git diff tests/golden/`` before committing it: each changed number, name or column
must be one you meant. Files no test writes any more are listed by
``test_no_stray_golden_files``; delete them.

The commands run in-process from the repository root on relative paths, so no absolute
path reaches a file. Two things are masked because they move without the report changing:
the lipcheck version (a release bump) and, in the rich table only, the blanks rich pads each
line with. Nothing else varies between runs or between 1 and 2 torch threads (checked when
these files were made), so the rest is compared exactly. The table is rendered at the fixed
140 columns the CLI uses for anything that is not a terminal.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import GOLDEN, ROOT, Cli

import lipcheck

VERSION = re.compile(r"(?<![\w.])" + re.escape(lipcheck.__version__) + r"(?![\w.])")
FORMATS = {"json": "json", "csv": "csv", "table": "txt", "junit": "xml", "markdown": "md"}

# (golden stem, arguments, exit code): paths relative to the repository root.
INSPECT = [
    (f"{name}.inspect", ["inspect", f"samples/{name}", *extra], 0)
    for name, extra in [
        ("mlp.onnx", []), ("cnn.onnx", []), ("resnet.onnx", []),
        ("mlp.state_dict.pt", []), ("cnn.state_dict.pt", []), ("resnet.state_dict.pt", []),
        ("mlp.ts.pt", []), ("resnet.ts.pt", []),
        ("cnn.pickle.pt", ["--trust", "--input-shape", "1,3,16,16"]),
    ]
]
OTHERS = [
    # two models, both rules, passes and failures side by side
    ("mlp+cnn.check", ["check", "samples/mlp.onnx", "samples/cnn.onnx", "--max-lipschitz", "1.5",
                       "--max-layer-sigma", "1.4"], 1),
    ("cnn-resnet.diff", ["diff", "samples/cnn.onnx", "samples/resnet.onnx"], 0),
]
CASES = [(stem, args, code, fmt) for stem, args, code in INSPECT + OTHERS for fmt in FORMATS]


def golden_path(stem: str, fmt: str) -> Path:
    return GOLDEN / f"{stem}.{FORMATS[fmt]}"


def masked(text: str, fmt: str) -> str:
    text = VERSION.sub("X", text)
    if fmt == "table":
        text = "".join(line.rstrip() + "\n" for line in text.splitlines())
    return text


@pytest.fixture
def at_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    # a forced colour or terminal would give rich escape codes or the terminal's width
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(("stem", "args", "code", "fmt"), CASES, ids=[f"{c[0]}.{c[3]}" for c in CASES])
def test_golden(stem: str, args: list[str], code: int, fmt: str, cli: Cli, at_root: None,
                overwrite_golden: bool) -> None:
    got_code, out, err = cli(*args, "-f", fmt)
    assert got_code == code, err
    text = masked(out, fmt)
    path = golden_path(stem, fmt)
    if overwrite_golden:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path.name} is missing: python -m pytest tests/test_golden.py --overwrite-golden"
    assert text == path.read_text(encoding="utf-8"), (
        f"{path.name} differs; if the change is intended: python -m pytest tests/test_golden.py --overwrite-golden")


def test_no_stray_golden_files() -> None:
    expected = {golden_path(stem, fmt).name for stem, _, _, fmt in CASES}
    assert sorted(p.name for p in GOLDEN.iterdir() if p.name not in expected) == []


# --------------------------------------------------------------------------- invariants
# A regenerated file must still make sense: the formats agree with the JSON, and the
# numbers obey what the bound means.


def _golden_json(stem: str) -> dict:  # type: ignore[type-arg]
    return json.loads(golden_path(stem, "json").read_text(encoding="utf-8"))


INSPECT_STEMS = [stem for stem, _, _ in INSPECT]


@pytest.mark.parametrize("stem", INSPECT_STEMS)
def test_every_format_lists_the_json_layers(stem: str) -> None:
    doc = _golden_json(stem)
    names = [r["name"] for r in doc["layers"]]
    with open(golden_path(stem, "csv"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == names
    assert [r["op"] for r in rows] == [r["op"] for r in doc["layers"]]
    for row, layer in zip(rows, doc["layers"]):
        for key in ("sigma", "sigma_upper", "bound"):
            want = layer[key]
            assert (row[key] == "") if want is None else (float(row[key]) == want), (stem, layer["name"], key)
    table = golden_path(stem, "table").read_text(encoding="utf-8")
    markdown = golden_path(stem, "markdown").read_text(encoding="utf-8")
    for name in names:
        assert f"│ {name} " in table and f"| {name} |" in markdown, (stem, name)
    suite = ET.parse(golden_path(stem, "junit")).getroot().find("testsuite")
    assert suite is not None and suite.get("name") == doc["model"]["path"] == f"samples/{stem.removesuffix('.inspect')}"


@pytest.mark.parametrize("stem", INSPECT_STEMS)
def test_estimates_sit_below_certificates(stem: str) -> None:
    doc = _golden_json(stem)
    for row in doc["layers"]:
        if row["sigma"] is not None and row["sigma_upper"] is not None:
            assert row["sigma"] <= row["sigma_upper"], row
    net = doc["network"]
    if net["bounded"]:
        assert net["lipschitz_estimate"] <= net["lipschitz_bound"]


@pytest.mark.parametrize("stem", ["mlp.onnx.inspect", "cnn.onnx.inspect", "cnn.pickle.pt.inspect"])
def test_chain_bounds_are_running_products(stem: str) -> None:
    """On a chain, L(after row k) = product of the first k rows' constants (ops without a
    row, like Flatten, have constant 1), and the last is the network bound."""
    doc = _golden_json(stem)
    product = 1.0
    for row in doc["layers"]:
        product *= row["lipschitz"]
        if "folded with" in (row["note"] or "") or "ECLipsE" in (row["note"] or ""):
            # a BatchNorm folded into the conv before it: the pair's norm, at most the product
            assert row["bound"] <= product * (1 + 1e-12), row["name"]
            product = row["bound"]
            continue
        assert row["bound"] == pytest.approx(product, rel=1e-12), row["name"]
    assert doc["network"]["lipschitz_bound"] == pytest.approx(product, rel=1e-12)


@pytest.mark.parametrize("stem", ["mlp.state_dict.pt.inspect", "cnn.state_dict.pt.inspect",
                                  "resnet.state_dict.pt.inspect"])
def test_state_dict_rows_have_the_onnx_numbers(stem: str) -> None:
    """The same weights give the same sigma with or without a graph (rows matched by name)."""
    doc = _golden_json(stem)
    onnx_rows = {r["name"]: r for r in _golden_json(stem.replace(".state_dict.pt", ".onnx"))["layers"]}
    assert doc["network"]["bounded"] is False and doc["network"]["lipschitz_bound"] is None
    matched = [r for r in doc["layers"] if r["name"] in onnx_rows]
    assert matched, "no state_dict row matches an ONNX row by name"
    for row in matched:
        if row["kind"] == "linear":
            assert row["sigma_upper"] == pytest.approx(onnx_rows[row["name"]]["sigma_upper"], rel=1e-6), row["name"]


def test_check_golden_agrees_with_the_inspect_goldens() -> None:
    doc = _golden_json("mlp+cnn.check")
    assert doc["passed"] is False
    bounds = {r["model"]["path"]: r["network"]["lipschitz_bound"] for r in doc["reports"]}
    for result in doc["results"]:
        if result["rule"] == "max-lipschitz":
            assert result["value"] == bounds[result["model"]]
            assert result["passed"] == (result["value"] <= 1.5)
    junit = ET.parse(golden_path("mlp+cnn.check", "junit")).getroot()
    assert int(junit.get("failures", "0")) == sum(not r["passed"] for r in doc["results"])


def test_diff_golden_changes_are_ratios() -> None:
    doc = _golden_json("cnn-resnet.diff")
    for row in doc["layers"]:
        a, b = row["sigma_upper_a"], row["sigma_upper_b"]
        if a and b is not None and math.isfinite(a) and math.isfinite(b):
            assert row["change"] == pytest.approx(b / a - 1, rel=1e-12, abs=1e-15), row["name"]
    net = doc["network"]
    assert net["change"] == pytest.approx(net["lipschitz_bound_b"] / net["lipschitz_bound_a"] - 1, rel=1e-12)
    csv_rows = list(csv.DictReader(io.StringIO(golden_path("cnn-resnet.diff", "csv").read_text(encoding="utf-8"))))
    assert [r["name"] for r in csv_rows if r["status"] == "both"] == [r["name"] for r in doc["layers"]]
    assert [r["name"] for r in csv_rows if r["status"] == "new"] == [r["name"] for r in doc["new"]]
