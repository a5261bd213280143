"""The composite GitHub Action: every input it uses is declared, and its gate step, run as
GitHub would run it, writes the reports, the job summary and the verdict."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"


@pytest.fixture(scope="module")
def action() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "action.yml").read_text())


def test_inputs_used_are_declared(action: dict) -> None:  # type: ignore[type-arg]
    used = set(re.findall(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}", (ROOT / "action.yml").read_text()))
    assert used and used <= set(action["inputs"])
    example = yaml.safe_load((ROOT / "docs" / "examples" / "lipcheck-action.yml").read_text())
    step = next(s for s in example["jobs"]["lipcheck"]["steps"] if "with" in s)
    assert set(step["with"]) <= set(action["inputs"])


def _gate(action: dict, tmp_path: Path, **inputs: str) -> tuple[int, Path]:  # type: ignore[type-arg]
    step = next(s for s in action["runs"]["steps"] if s.get("id") == "gate")
    values = {k: str(v.get("default", "")) for k, v in action["inputs"].items()}
    values.update(inputs)
    env = dict(os.environ)
    for key, expr in step["env"].items():
        name = re.fullmatch(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}", expr).group(1)  # type: ignore[union-attr]
        env[key] = values[name]
    env["GITHUB_STEP_SUMMARY"] = str(tmp_path / "summary.md")
    env["GITHUB_OUTPUT"] = str(tmp_path / "output.txt")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    assert shutil.which("lipcheck", path=env["PATH"])
    done = subprocess.run(["bash", "-c", step["run"]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    return done.returncode, tmp_path / "lipcheck-reports"


@pytest.mark.e2e
def test_failing_gate_writes_reports_summary_and_verdict(action: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    shutil.copy(SAMPLES / "mlp.onnx", tmp_path / "mlp.onnx")
    code, reports = _gate(action, tmp_path, models="mlp.onnx", **{"max-lipschitz": "0.001"})
    assert code == 0  # the verdict is the last step's, from the status file
    assert (reports / "status").read_text().strip() == "1"
    assert {p.name for p in reports.iterdir()} >= {"lipcheck.xml", "lipcheck.html", "lipcheck.md"}
    assert "max-lipschitz" in (tmp_path / "summary.md").read_text()
    assert "passed=false" in (tmp_path / "output.txt").read_text()


@pytest.mark.e2e
def test_bad_input_stops_the_gate(action: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    code, _ = _gate(action, tmp_path, models="missing.onnx", **{"max-lipschitz": "1"})
    assert code == 2
