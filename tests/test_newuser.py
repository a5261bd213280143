"""What a new user sees first: bare `lipcheck`, a missing file, the help texts."""

from __future__ import annotations

import subprocess
import sys

from lipcheck.cli import run


def test_bare_lipcheck_prints_the_help(capsys) -> None:  # type: ignore[no-untyped-def]
    assert run([]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("Usage: lipcheck") and out.count("\n") > 5
    assert "inspect" in out and "normalize" in out


def test_missing_file_is_reported_before_torch_is_imported() -> None:
    code = ("import sys; from lipcheck.cli import run; rc = run(['inspect', 'no-such-model.onnx']); "
            "print(rc, 'torch' in sys.modules, 'onnx' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False", "False"]
    assert done.stderr.strip() == "lipcheck: error: no-such-model.onnx does not exist"


def test_bad_options_are_refused_before_torch_is_imported() -> None:
    code = ("import sys; from lipcheck.cli import run; rc = run(['inspect', '.', '--tol', '5']); "
            "print(rc, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"] and "--tol must be" in done.stderr


def test_help_names_every_input_kind_and_what_parametrize_writes(capsys) -> None:  # type: ignore[no-untyped-def]
    assert run(["inspect", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for word in ("safetensors", "Hugging Face model folder", "MODEL", "N,C,H,W", "--model"):
        assert word in text
    assert run(["normalize", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "lipcheck.parametrize.load" in text and "pickled nn.Module" not in text
