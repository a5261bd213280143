"""Options are checked once, in the library's words; the command line shows its flags."""

from __future__ import annotations

from pathlib import Path

import pytest

import lipcheck
from lipcheck.cli import run
from lipcheck.errors import UsageError
from lipcheck.options import DEFAULTS, Options

MLP = Path(__file__).resolve().parent.parent / "samples" / "mlp.onnx"


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"tol": 2.0}, "tol"), ({"tol": 0.0}, "tol"), ({"max_iters": 0}, "max_iters"),
    ({"dtype": "float16"}, "dtype"), ({"method": "svd"}, "method"), ({"device": "tpu"}, "device"),
])
def test_library_errors_name_the_parameter(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(UsageError) as info:
        lipcheck.analyze(MLP, **kwargs)  # type: ignore[arg-type]
    assert info.value.message.startswith(f"{param} must")
    assert "--" not in info.value.message
    assert info.value.for_cli().startswith("--" + param.replace("_", "-") + " must")


def test_cli_shows_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["inspect", str(MLP), "--tol", "2", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == "lipcheck: error: --tol must be between 0 and 1 (exclusive), got 2.0"


def test_a_parameter_whose_flag_differs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    sd = tmp_path / "sd.pt"
    torch.save({"w": torch.ones(2, 2)}, sd)
    with pytest.raises(UsageError, match="^architecture must look like"):
        lipcheck.analyze(sd, architecture="no-colon", trust=True)
    assert run(["inspect", str(sd), "--model", "no-colon", "--trust", "--no-progress"]) == 2
    assert "--model must look like" in capsys.readouterr().err


def test_defaults_are_valid_and_declared_once() -> None:
    assert Options() == DEFAULTS
    assert DEFAULTS.tol == 1e-6 and DEFAULTS.max_iters == 1000 and DEFAULTS.method == "lanczos"
