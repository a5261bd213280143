"""Bare state_dicts and input sizes: ``--input-shape`` without an architecture is an error,
and ``--model file.py:factory --trust`` analyses the weights as the network they belong
to, with conv norms at the real input size (checked against explicit matrices)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import lipcheck
from lipcheck.cli import run

FACTORY = '''
import torch.nn as nn

def build():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2, padding=1),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3))

def wrong():
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1))

def not_a_module():
    return 42
'''
SHAPE = "1,3,8,8"


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    factory = tmp_path / "arch.py"
    factory.write_text(FACTORY)
    namespace: dict[str, object] = {}
    exec(compile(FACTORY, str(factory), "exec"), namespace)
    torch.manual_seed(0)
    model = namespace["build"]()  # type: ignore[operator]
    sd = tmp_path / "weights.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, sd)
    return {"factory": factory, "sd": sd}


def _explicit_conv_norm(weight: torch.Tensor, stride: int, shape: tuple[int, ...]) -> float:
    n = int(np.prod(shape))
    cols = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    out = torch.nn.functional.conv2d(cols, weight.double(), None, stride, 1)
    return float(torch.linalg.matrix_norm(out.reshape(n, -1).T, 2))


def test_input_shape_on_a_state_dict_is_an_error(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code = run(["inspect", str(files["sd"]), "--input-shape", SHAPE, "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "--model" in err and "--input-shape" in err


def test_model_needs_trust(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code = run(["inspect", str(files["sd"]), "--input-shape", SHAPE, "--model", f"{files['factory']}:build",
                "--no-progress"])
    _, err = capsys.readouterr()
    assert code == 2 and "--trust" in err


@pytest.mark.parametrize(("factory", "fragment"), [
    ("wrong", "do not fit it"), ("not_a_module", "not a torch.nn.Module"), ("missing", "no callable"),
])
def test_bad_factories_are_one_line_errors(files: dict[str, Path], factory: str, fragment: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code = run(["inspect", str(files["sd"]), "--input-shape", SHAPE, "--model", f"{files['factory']}:{factory}",
                "--trust", "--no-progress"])
    _, err = capsys.readouterr()
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1


def test_model_gives_true_conv_norms_and_a_network_bound(files: dict[str, Path]) -> None:
    bare = {r.name: r for r in lipcheck.analyze(files["sd"]).layers}
    report = lipcheck.analyze(files["sd"], (1, 3, 8, 8), trust=True, architecture=f"{files['factory']}:build")
    rows = {r.name: r for r in report.layers}
    state = torch.load(files["sd"], weights_only=True)["state_dict"]
    for name, stride, shape in (("0", 1, (3, 8, 8)), ("2", 2, (6, 8, 8))):
        exact = _explicit_conv_norm(state[f"{name}.weight"], stride, shape)
        assert rows[name].sigma == pytest.approx(exact, rel=1e-4)
        assert exact <= rows[name].sigma_upper * (1 + 1e-9) <= bare[name].sigma_upper
    assert report.network.bounded and report.network.lipschitz_bound is not None
    assert "size-independent" not in (rows["0"].note or "")


def test_normalize_with_model_rewrites_the_state_dict(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    spec = f"{files['factory']}:build"
    result = lipcheck.normalize(files["sd"], out, target=1.0, input_shape=(1, 3, 8, 8), trust=True,
                                architecture=spec)
    assert result.ok, result.failures
    written = torch.load(out, weights_only=True)
    assert written["epoch"] == 3 and set(written["state_dict"]) == set(torch.load(files["sd"])["state_dict"])
    for name, stride, shape in (("0", 1, (3, 8, 8)), ("2", 2, (6, 8, 8))):
        exact = _explicit_conv_norm(written["state_dict"][f"{name}.weight"], stride, shape)
        assert 0.9 <= exact <= 1.0 + 1e-6  # by the real-size certificate, not the loose reshape bound
