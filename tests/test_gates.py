"""CI gates: check, diff, every report format, the JSON Schema, the API, the example files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pandas as pd
import pytest
import torch
from conftest import ROOT, SAMPLES, Cli

import lipcheck

SCHEMA = json.loads((ROOT / "lipcheck" / "schema.json").read_text())


def validate(doc: object) -> None:
    jsonschema.validate(doc, SCHEMA)


# --------------------------------------------------------------------------- check


def test_check_passes(cli: Cli) -> None:
    code, out, err = cli("check", SAMPLES / "cnn.onnx", "--max-lipschitz", "100", "--max-layer-sigma", "10",
                         "-f", "json")
    assert code == 0, err
    doc = json.loads(out)
    validate(doc)
    assert doc["passed"] is True and {r["rule"] for r in doc["results"]} == {"max-lipschitz", "max-layer-sigma"}


def test_check_failure_names_rule_and_numbers(cli: Cli) -> None:
    code, out, err = cli("check", SAMPLES / "cnn.onnx", "--max-lipschitz", "0.5")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1
    bound = lipcheck.analyze(SAMPLES / "cnn.onnx").network.lipschitz_bound
    assert "max-lipschitz" in lines[0] and f"{bound:.6g}" in lines[0] and "0.5" in lines[0]
    assert f"{(bound / 0.5 - 1) * 100:.2f}%" in lines[0]


def test_layer_rule_one_line_per_layer(cli: Cli) -> None:
    doc = lipcheck.analyze(SAMPLES / "resnet.onnx").to_dict()
    over = [r for r in doc["layers"] if r["kind"] in ("linear", "conv", "diagonal") and r["sigma_upper"] > 1.2]
    code, _, err = cli("check", SAMPLES / "resnet.onnx", "--max-layer-sigma", "1.2")
    assert code == 1
    assert len(err.strip().splitlines()) == len(over) > 1
    for row in over:
        assert f"layer {row['name']}: sigma {row['sigma_upper']:.6g} > 1.2" in err


def test_unbounded_model_fails_max_lipschitz(tmp_path: Path, cli: Cli) -> None:
    from lipcheck.testing import make_attention

    model, shape = make_attention()
    path = tmp_path / "attn.ts.pt"
    torch.jit.save(torch.jit.trace(model, torch.zeros(shape)), path)
    code, _, err = cli("check", path, "--input-shape", ",".join(map(str, shape)), "--max-lipschitz", "1e9", "--trust")
    assert code == 1 and "no network bound" in err and "MatMul" in err


def test_gate_that_analysed_nothing_fails(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "empty.pt"
    torch.save({"step": torch.tensor(3)}, path)
    code, _, err = cli("check", path, "--max-layer-sigma", "10")
    assert code == 1 and "analysed" in err


@pytest.mark.parametrize("args, fragment", [
    (["check", SAMPLES / "mlp.onnx"], "at least one rule"),
    (["check", SAMPLES / "mlp.onnx", "--max-lipschitz", "-1"], "--max-lipschitz"),
    (["check", SAMPLES / "mlp.onnx", "--baseline", "missing.json"], "--baseline"),
    (["check", SAMPLES / "mlp.onnx", "--baseline", SAMPLES / "mlp.onnx", "--max-increase", "ten"], "--max-increase"),
    (["check", SAMPLES / "mlp.onnx", "--max-lipschitz", "2", "--bound", "guess"], "--bound"),
    (["check", "missing.onnx", "--max-lipschitz", "2"], "does not exist"),
])
def test_check_usage_errors(args: list[object], fragment: str, cli: Cli) -> None:
    code, out, err = cli(*args)
    assert code == 2 and out == "" and err.count("\n") == 1 and fragment in err


def test_baseline_regression(tmp_path: Path, cli: Cli) -> None:
    base = tmp_path / "base.json"
    assert cli("inspect", SAMPLES / "mlp.onnx", "-f", "json", "-o", base)[0] == 0
    code, _, err = cli("check", SAMPLES / "mlp.onnx", "--baseline", base, "--max-increase", "10%")
    assert code == 0, err
    # a model whose layers grew: scale the first weight by 1.5
    import onnx
    from onnx import numpy_helper

    model = onnx.load(SAMPLES / "mlp.onnx")
    for i, init in enumerate(model.graph.initializer):
        if init.name == "0.weight":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    grown = tmp_path / "mlp.onnx"
    onnx.save(model, grown)
    code, _, err = cli("check", grown, "--baseline", base, "--max-increase", "10%")
    assert code == 1
    assert "baseline-network" in err and "baseline-layer" in err and "layer 0:" in err
    code, _, err = cli("check", grown, "--baseline", base, "--max-increase", "60%")
    assert code == 0, err


def test_estimate_bound_is_labelled(cli: Cli) -> None:
    code, out, _ = cli("check", SAMPLES / "mlp.onnx", "--max-lipschitz", "5", "--bound", "estimate", "-f", "json")
    assert code == 0
    assert all("not a guarantee" in r["message"] for r in json.loads(out)["results"])


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("command", [["inspect"], ["check", "--max-lipschitz", "10"]])
def test_every_format(command: list[str], tmp_path: Path, cli: Cli) -> None:
    models = [SAMPLES / "mlp.onnx", SAMPLES / "cnn.onnx"]
    outputs = {}
    for fmt in ("table", "json", "csv", "markdown", "junit"):
        target = tmp_path / f"out.{fmt}"
        code, out, err = cli(command[0], *models, *command[1:], "-f", fmt, "-o", target)
        assert code == 0, err
        assert out == ""
        outputs[fmt] = target.read_text()
    validate(json.loads(outputs["json"]))
    frame = pd.read_csv(tmp_path / "out.csv")
    assert set(frame["model"]) == {str(m) for m in models}
    root = ET.fromstring(outputs["junit"])
    assert root.tag == "testsuites" and len(root.findall("testsuite")) == 2
    assert int(root.get("failures")) == 0
    assert outputs["markdown"].count("|---|") >= 1
    assert "mlp.onnx" in outputs["table"] and "cnn.onnx" in outputs["table"]


def test_junit_has_a_case_per_model_and_rule(cli: Cli) -> None:
    # bounds: resnet 0.615 (folded), mlp 0.574 (ECLipsE)
    code, out, _ = cli("check", SAMPLES / "mlp.onnx", SAMPLES / "resnet.onnx", "--max-lipschitz", "0.6",
                       "--max-layer-sigma", "10", "-f", "junit")
    assert code == 1
    root = ET.fromstring(out)
    cases = {(s.get("name"), c.get("name")): c for s in root.findall("testsuite") for c in s.findall("testcase")}
    assert {name for _, name in cases} == {"max-lipschitz", "max-layer-sigma"}
    assert cases[(str(SAMPLES / "mlp.onnx"), "max-lipschitz")].find("failure") is None
    assert cases[(str(SAMPLES / "resnet.onnx"), "max-lipschitz")].find("failure") is not None


def test_schema_command_prints_the_packaged_schema(cli: Cli) -> None:
    code, out, _ = cli("schema")
    assert code == 0 and json.loads(out) == SCHEMA
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_json_is_byte_identical(cli: Cli) -> None:
    runs = [cli("inspect", SAMPLES / "resnet.onnx", "-f", "json")[1] for _ in range(2)]
    assert runs[0] == runs[1]


# --------------------------------------------------------------------------- diff


@pytest.mark.e2e
def test_diff_model_against_its_normalized_copy(tmp_path: Path, cli: Cli) -> None:
    normalized = tmp_path / "cnn.sn.onnx"
    assert cli("normalize", SAMPLES / "cnn.onnx", "-o", normalized)[0] == 0
    report_a = tmp_path / "a.json"
    assert cli("inspect", SAMPLES / "cnn.onnx", "-f", "json", "-o", report_a)[0] == 0
    code, out, err = cli("diff", report_a, normalized, "-f", "json")
    assert code == 0, err
    doc = json.loads(out)
    validate(doc)
    changed = {r["name"] for r in doc["layers"] if r["changed"]}
    weighted = {r["name"] for r in json.loads(report_a.read_text())["layers"]
                if r["kind"] in ("linear", "conv", "diagonal")}
    assert weighted <= changed
    assert doc["new"] == [] and doc["vanished"] == []
    assert doc["network"]["change"] < 0
    for fmt in ("csv", "markdown", "junit", "table"):
        code, out, err = cli("diff", report_a, normalized, "-f", fmt)
        assert code == 0 and out, (fmt, err)


def test_diff_new_and_vanished_layers(cli: Cli) -> None:
    code, out, _ = cli("diff", SAMPLES / "cnn.onnx", SAMPLES / "resnet.onnx", "-f", "json")
    assert code == 0
    doc = json.loads(out)
    names_a = [r.name for r in lipcheck.analyze(SAMPLES / "cnn.onnx").layers]
    names_b = [r.name for r in lipcheck.analyze(SAMPLES / "resnet.onnx").layers]
    assert [r["name"] for r in doc["new"]] == [n for n in names_b if n not in names_a]
    assert [r["name"] for r in doc["vanished"]] == [n for n in names_a if n not in names_b]
    assert {"3.conv1", "4.shortcut.0"} <= {r["name"] for r in doc["new"]}
    assert [r["name"] for r in doc["layers"]] == [n for n in names_a if n in names_b]


# --------------------------------------------------------------------------- API


def test_analyze_in_memory_equals_torchscript_file(tmp_path: Path) -> None:
    from lipcheck.testing import make_resnet

    model, shape = make_resnet()
    path = tmp_path / "resnet.ts.pt"
    torch.jit.save(torch.jit.trace(model, torch.zeros(shape)), path)
    in_memory = lipcheck.analyze(model, shape).to_dict()
    from_file = lipcheck.analyze(path, shape, trust=True).to_dict()
    assert in_memory["layers"] == from_file["layers"]
    assert in_memory["network"] == from_file["network"]
    validate(in_memory)


def test_analyze_in_memory_touches_no_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lipcheck.testing import make_mlp

    monkeypatch.chdir(tmp_path)
    model, shape = make_mlp()
    report = lipcheck.analyze(model, shape)
    assert report.network.bounded and list(tmp_path.iterdir()) == []


def test_normalize_api_report_matches_schema(tmp_path: Path) -> None:
    result = lipcheck.normalize(SAMPLES / "mlp.onnx", tmp_path / "out.onnx", target=0.5)
    assert result.ok
    validate(result.to_dict())


# --------------------------------------------------------------------------- example files


def _run_lines(path: Path, prefix: str) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        match = re.match(rf"\s*-?\s*{prefix}\s*(lipcheck .*)$", line)
        if match:
            lines.append(match.group(1))
    return lines


@pytest.mark.e2e
def test_github_workflow_commands_run(tmp_path: Path) -> None:
    commands = _run_lines(ROOT / "docs" / "examples" / "github-workflow.yml", "run:")
    assert len(commands) == 2
    env = dict(os.environ, RUNNER_TEMP=str(tmp_path))
    for command in commands:
        proc = subprocess.run(["bash", "-c", command.replace("lipcheck ", f"{sys.executable} -m lipcheck ", 1)],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, (command, proc.stderr)
    assert ET.parse(tmp_path / "lipcheck-junit.xml").getroot().tag == "testsuites"
    assert "Network Lipschitz bound" in (tmp_path / "lipcheck.md").read_text()


@pytest.mark.e2e
def test_pre_commit_hook_command_runs(tmp_path: Path) -> None:
    config = (ROOT / "docs" / "examples" / "pre-commit-config.yaml").read_text()
    entry = re.search(r"entry:\s*(lipcheck .*)", config).group(1)
    shutil.copy(SAMPLES / "mlp.onnx", tmp_path / "mlp.onnx")
    # pre-commit appends the staged files to the entry
    argv = entry.split()[1:] + [str(tmp_path / "mlp.onnx")]
    proc = subprocess.run([sys.executable, "-m", "lipcheck", *argv], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    hook = (ROOT / ".pre-commit-hooks.yaml").read_text()
    assert "entry: lipcheck check --no-progress" in hook
