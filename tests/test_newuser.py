"""What a new user sees first: bare `lipcheck`, a missing file or a mistyped option (answered
before torch is imported), and the help texts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLES, Cli

HEAVY = ("torch", "onnx", "onnx2torch", "pandas", "numpy", "rich")


def test_bare_lipcheck_prints_the_whole_help_and_exits_2(cli: Cli) -> None:
    """As click answers a group called without a command: the help on stderr, exit 2."""
    code, out, err = cli()
    assert code == 2 and out == ""
    assert err.startswith("Usage: lipcheck [OPTIONS] COMMAND [ARGS]...\n") and err.count("\n") > 10
    for command in ("inspect", "check", "diff", "schema", "normalize"):
        assert re.search(rf"^  {command} ", err, re.M)
    assert "Exit codes:" in err
    code, out, _ = cli("--help")
    assert code == 0 and out == err  # the same text --help prints


@pytest.mark.e2e
def test_missing_file_is_answered_before_torch_is_imported(tmp_path: Path) -> None:
    """`python -m lipcheck inspect does-not-exist.onnx`: exit 2, one line, and -X importtime
    shows that none of the heavy modules was imported."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "lipcheck", "inspect", "does-not-exist.onnx"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    said = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert said == ["lipcheck: error: does-not-exist.onnx does not exist"]
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in done.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "lipcheck" in imported  # the parse worked: the CLI itself was imported
    assert not imported & set(HEAVY), imported & set(HEAVY)


BAD_ARGUMENTS = [
    (["inspect", "missing.onnx"], "missing.onnx does not exist"),
    (["inspect", "{mlp}", "--input-shape", "1,a"], "--input-shape must be integers"),
    (["inspect", "{mlp}", "--tol", "5"], "--tol must be between 0 and 1"),
    (["inspect", "{mlp}", "-o", "no/such/folder/r.json", "-f", "json"], "folder no/such/folder does not exist"),
    (["inspect", "{mlp}", "--model", "no-colon"], "--model must look like package.module:factory"),
    (["inspect", "{mlp}", "--model", "missing.py:build"], "--model: missing.py is not a file"),
    (["check", "{mlp}", "--max-lipschitz", "0"], "--max-lipschitz must be a positive number"),
    (["check", "{mlp}", "--baseline", "missing.json"], "--baseline missing.json does not exist"),
    (["diff", "{mlp}", "missing.onnx"], "missing.onnx does not exist"),
    (["diff", "{mlp}", "{mlp}", "--input-shape", "0"], "--input-shape must be positive integers"),
    (["normalize", "{mlp}", "-o", "{cnn}"], "exists; pass --force to replace it"),
    (["normalize", "{mlp}", "-o", "{mlp}"], "refusing to overwrite the input"),
    (["normalize", "{mlp}", "-o", "out.onnx", "--target", "-1"], "--target must be a positive number"),
    (["normalize", "{mlp}", "-o", "out.onnx", "--budget", "0"], "--budget must be a positive number"),
    (["normalize", "{mlp}", "-o", "no/such/folder/out.onnx"], "folder no/such/folder does not exist"),
    (["normalize", "{mlp}", "-o", "out.onnx", "--report", "no/such/folder/r.json"], "folder no/such/folder"),
]


@pytest.mark.e2e
def test_bad_arguments_are_answered_before_torch_is_imported(tmp_path: Path) -> None:
    """Every mistake the command line can see by itself costs no torch import: one process
    runs them all in turn, then says which heavy modules it holds."""
    paths = {"mlp": str(SAMPLES / "mlp.onnx"), "cnn": str(SAMPLES / "cnn.onnx")}
    argvs = [[a.format(**paths) for a in args] for args, _ in BAD_ARGUMENTS]
    code = ("import json, sys; from lipcheck.cli import run\n"
            "codes = [run(argv) for argv in json.loads(sys.argv[1])]\n"
            f"print(json.dumps([codes, [m for m in {HEAVY!r} if m in sys.modules]]))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    codes, heavy = json.loads(done.stdout)
    lines = done.stderr.splitlines()
    assert heavy == [] and codes == [2] * len(BAD_ARGUMENTS) and len(lines) == len(BAD_ARGUMENTS)
    for line, (_, fragment) in zip(lines, BAD_ARGUMENTS):
        assert line.startswith("lipcheck: error: ") and fragment in line, (line, fragment)
    assert not list(tmp_path.iterdir())  # nothing written


def test_an_unreadable_input_is_refused_by_name(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """click's Path type checks readability while parsing (as root, every file is readable,
    hence os.access stood in)."""
    import os

    real = os.access
    model = SAMPLES / "mlp.onnx"
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == model else real(p, mode, **kw))
    code, out, err = cli("inspect", model)
    assert code == 2 and out == ""
    assert err == f"lipcheck: error: Invalid value for 'MODEL': path '{model}' is not readable.\n"


def _help(cli: Cli, *command: str) -> str:
    code, out, err = cli(*command, "--help")
    assert code == 0 and err == ""
    return out


def test_help_names_arguments_as_click_does(cli: Cli) -> None:
    usages = {c: _help(cli, c).splitlines()[0] for c in ("inspect", "check", "diff", "normalize", "schema")}
    assert usages == {
        "inspect": "Usage: lipcheck inspect [OPTIONS] MODEL...",
        "check": "Usage: lipcheck check [OPTIONS] MODEL...",
        "diff": "Usage: lipcheck diff [OPTIONS] A B",
        "normalize": "Usage: lipcheck normalize [OPTIONS] MODEL",
        "schema": "Usage: lipcheck schema [OPTIONS]",
    }
    for command in usages:
        text = _help(cli, command)
        for label in ("<list[", "<path>", "<float>", "<int>", "<str>"):  # typer's type labels
            assert label not in text, (command, label)
        assert "{" not in text.splitlines()[0]
    assert re.search(r"^Arguments:\n  MODEL\.\.\.  Models, each a", _help(cli, "inspect"), re.M)


def test_help_says_what_each_input_kind_gets(cli: Cli) -> None:
    text = " ".join(_help(cli, "inspect").split())
    for words in (".safetensors", "Hugging Face model folder", "--input-shape N,C,H,W",
                  "ONNX: overrides the input size stored in the model",
                  "TorchScript: the model is traced at this size", "needs --trust",
                  "state_dicts and safetensors files hold no network: they need --model",
                  "--model PACKAGE.MODULE:FACTORY", "--tol FLOAT", "--max-iters N"):
        assert words in text, words


def test_help_says_what_parametrize_writes(cli: Cli) -> None:
    text = " ".join(_help(cli, "normalize").split())
    for words in ("parametrizations.spectral_norm", "lipcheck.parametrize.Scale",
                  "torch.save({format, layers, state_dict})", "not a pickled module",
                  "lipcheck.parametrize.load(model, FILE)", "--layers GLOB", "-o, --output FILE"):
        assert words in text, words


def test_the_readme_says_what_the_help_says() -> None:
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert '{"format": "lipcheck-parametrized", "layers": {...}, "state_dict": ...}' in readme
    assert "lipcheck.parametrize.load(model," in readme
    assert "exits 2" in readme and "without a command" in readme
