"""Untrusted and broken model files: nothing runs, one clear line, nothing written.

Every file of the hostile corpus (the ``corpus`` package beside this file) goes through
``lipcheck inspect``: the exit code and message class are the expected ones, the
payloads' marker file never appears, stderr holds one ``lipcheck: error:`` line (and,
under ``python -m lipcheck``, no traceback), stdout is empty on error, and the corpus
folder is left exactly as it was. Then the odd but valid weights are checked row by row,
and ``inspect -o`` is checked never to write the input, through hard links, symlinks or
its temp file.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import corpus
import pytest
from conftest import SAMPLES, Cli, CliResult

import lipcheck
from lipcheck.errors import InputError, UnsupportedInputError, UntrustedInputError

CASES = {c.name: c for c in corpus.CASES}
# The built corpus: its folder, each case's file, and the folder's listing before any test.
Hostile = tuple[Path, dict[str, Path], set[str]]
ERROR_CLASS = {"untrusted": UntrustedInputError, "unsupported": UnsupportedInputError, "broken": InputError}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Hostile:
    folder = tmp_path_factory.mktemp("hostile")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = corpus.build_corpus(folder)
    return folder, paths, corpus.listing(folder)


def inspect(cli: Cli, *args: object) -> CliResult:
    return cli("inspect", *args, "--device", "cpu")


def assert_one_line_error(out: str, err: str) -> None:
    assert out == "", out
    assert err.count("\n") == 1 and err.startswith("lipcheck: error: "), err


@pytest.mark.parametrize("name", list(CASES))
def test_inspect_answers(name: str, hostile: Hostile, cli: Cli) -> None:
    folder, paths, before = hostile
    case = CASES[name]
    report = folder / "report.json"
    code, out, err = inspect(cli, paths[name], "-f", "json", *case.args)
    assert code == case.exit_code, err
    if code == 0:
        doc = json.loads(out)
        assert case.fragment in out, doc
    else:
        assert_one_line_error(out, err)
        assert case.fragment in err, err
        if case.kind == "untrusted":
            assert "--trust" in err
        # The same failure with -o: no report, no temp file.
        code_o, out_o, err_o = inspect(cli, paths[name], "-f", "json", "-o", report, *case.args)
        assert (code_o, err_o) == (code, err)
        assert not report.exists()
    assert not (folder / corpus.MARKER_NAME).exists(), "a payload ran"
    assert corpus.listing(folder) == before


@pytest.mark.parametrize("name", [c.name for c in corpus.CASES if c.kind != "ok"])
def test_error_class(name: str, hostile: Hostile) -> None:
    folder, paths, _ = hostile
    case = CASES[name]
    with pytest.raises(InputError) as info:
        lipcheck.analyze(paths[name], device="cpu")
    expected = ERROR_CLASS[case.kind]
    assert isinstance(info.value, expected), (type(info.value), info.value)
    if expected is InputError:
        assert not isinstance(info.value, (UntrustedInputError, UnsupportedInputError)), info.value
    assert not (folder / corpus.MARKER_NAME).exists()


SUBPROCESS_CASES = ["zip_reduce_system.pt", "legacy_reduce.pt", "raw_pickle_protocol0.pt",
                    "legacy_numel_4g.pt", "st_named.pt"]


@pytest.mark.e2e
@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_python_m_lipcheck(name: str, hostile: Hostile) -> None:
    folder, paths, before = hostile
    case = CASES[name]
    env = {k: v for k, v in os.environ.items() if k != "LIPCHECK_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "lipcheck", "inspect", str(paths[name]), "-f", "json",
                           "--device", "cpu", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == case.exit_code, proc.stderr
    assert "Traceback" not in proc.stderr
    if case.exit_code:
        assert_one_line_error(proc.stdout, proc.stderr)
        assert case.fragment in proc.stderr
    else:
        assert json.loads(proc.stdout)["model"]["format"] == "safetensors"
    assert not (folder / corpus.MARKER_NAME).exists()
    assert corpus.listing(folder) == before


# --------------------------------------------------------------------------- trust


def test_torchscript_weights_are_read_without_running_its_code(hostile: Hostile, cli: Cli) -> None:
    """torch.jit.load would run the archive's __setstate__ (it creates the marker with
    torch.from_file); the per-tensor path reads the weights without it, even with --trust."""
    folder, paths, _ = hostile
    for extra in ([], ["--trust"]):
        code, out, err = inspect(cli, paths["torchscript_setstate.pt"], "-f", "json", *extra)
        assert code == 0, err
        rows = json.loads(out)["layers"]
        assert [r["sigma"] for r in rows] == [pytest.approx(3.0, rel=1e-5)]
        assert not (folder / corpus.MARKER_NAME).exists()


def test_torchscript_graph_needs_trust(tmp_path: Path, cli: Cli) -> None:
    marker = tmp_path / corpus.MARKER_NAME
    path = corpus.build_case(tmp_path, CASES["torchscript_setstate.pt"])
    code, out, err = inspect(cli, path, "--input-shape", "1,2")
    assert not marker.exists(), "torch.jit.load ran the archive's __setstate__"
    assert code == 2 and "--trust" in err


def test_trust_opens_a_pickled_module(hostile: Hostile, cli: Cli) -> None:
    _, paths, _ = hostile
    code, out, err = inspect(cli, paths["pickled_module.pt"], "-f", "json", "--trust")
    assert code == 0, err
    assert json.loads(out)["model"]["format"] == "pickled-module"


def test_raw_pickle_with_trust(tmp_path: Path, cli: Cli) -> None:
    import pickle

    import torch

    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps({"fc.weight": torch.diag(torch.tensor([5.0, 1.0]))}, protocol=4))
    code, _, err = inspect(cli, path)
    assert code == 2 and "--trust" in err
    code, out, err = inspect(cli, path, "-f", "json", "--trust")
    assert code == 0, err
    assert json.loads(out)["layers"][0]["sigma"] == pytest.approx(5.0, rel=1e-5)


def test_torch_allow_list_is_never_applied(tmp_path: Path) -> None:
    """A refusal leaves torch's safe-globals list as it was (nothing added from its hints)."""
    import torch

    path = corpus.build_case(tmp_path, CASES["ckpt_namespace.pt"])
    before = list(torch.serialization.get_safe_globals())
    for _ in range(2):
        with pytest.raises(UntrustedInputError, match="argparse.Namespace"):
            lipcheck.analyze(path, device="cpu")
    assert list(torch.serialization.get_safe_globals()) == before


# --------------------------------------------------------------------------- odd weights


def _doc(path: Path, cli: Cli) -> dict:  # type: ignore[type-arg]
    code, out, err = inspect(cli, path, "-f", "json")
    assert code == 0, err
    return json.loads(out)


def test_odd_weights_are_analysed_or_skipped_never_dropped(
        hostile: Hostile, cli: Cli) -> None:
    _, paths, _ = hostile
    doc = _doc(paths["odd_weights.pt"], cli)
    rows = {r["name"]: r for r in doc["layers"]}
    skipped = {s["name"]: s["reason"] for s in doc["skipped"]}
    for key in corpus.ODD_KEYS:
        layer = key.rpartition(".")[0] or key
        assert (layer in rows) != (key in skipped), (key, sorted(rows), sorted(skipped))
    # NaN / Inf: reported per layer, numbers null in JSON, the note says why.
    for name in ("nan", "inf"):
        assert rows[name]["sigma_upper"] is None and "NaN or Inf" in rows[name]["note"]
    # Low precision is widened (float32 or better): exact norms of diagonal matrices.
    assert rows["half"]["sigma"] == pytest.approx(3.0, rel=1e-6)
    assert rows["bf16"]["sigma"] == pytest.approx(2.0, rel=1e-6)
    assert rows["f8"]["sigma"] == pytest.approx(1.0, rel=1e-6)
    assert rows["quant"]["sigma"] == pytest.approx(4.0, rel=1e-6) and "dequantized" in rows["quant"]["note"]
    assert rows["empty"]["sigma_upper"] == 0.0 and rows["zero_conv"]["sigma_upper"] == 0.0
    assert rows["conv3d"]["op"] == "Conv3d" and math.isfinite(rows["conv3d"]["sigma_upper"])
    assert "int8" in skipped["int8.weight"] and "sparse" in skipped["sparse.weight"]
    assert "complex" in skipped["complex.weight"] and "6-D" in skipped["six_d.weight"]
    assert "0-D" in skipped["scalar"] and "1-D" in skipped["norm.weight"]


def test_odd_safetensors_match_their_values(hostile: Hostile, cli: Cli) -> None:
    _, paths, _ = hostile
    doc = _doc(paths["odd_weights.safetensors"], cli)
    assert doc["model"]["format"] == "safetensors"
    rows = {r["name"]: r for r in doc["layers"]}
    assert rows["half"]["sigma"] == pytest.approx(3.0, rel=1e-6)
    assert rows["bf16"]["sigma"] == pytest.approx(2.0, rel=1e-6)
    assert rows["nan"]["sigma_upper"] is None
    assert rows["conv"]["op"] == "Conv2d"
    assert {s["name"] for s in doc["skipped"]} == {"int8.weight", "scalar"}


def test_safetensors_rows_equal_state_dict_rows(tmp_path: Path, cli: Cli) -> None:
    import torch

    sd = torch.load(SAMPLES / "cnn.state_dict.pt", weights_only=True)
    arrays = {k: v.numpy() for k, v in sd.items()}
    path = tmp_path / "cnn.safetensors"
    path.write_bytes(corpus.safetensors_bytes(arrays))
    ours = _doc(path, cli)
    ref = _doc(SAMPLES / "cnn.state_dict.pt", cli)
    assert ours["layers"] == ref["layers"]
    assert ours["skipped"] == ref["skipped"]


def test_nan_weight_makes_the_graph_bound_not_finite(hostile: Hostile, cli: Cli) -> None:
    _, paths, _ = hostile
    for name in ("onnx_nan_weight.onnx", "onnx_inf_weight.onnx"):
        net = _doc(paths[name], cli)["network"]
        assert net["lipschitz_bound"] is None and net["bounded"] is False
        assert "not finite" in net["reason"]


def test_checkpoint_odd_keys(hostile: Hostile, cli: Cli) -> None:
    _, paths, _ = hostile
    names = [r["name"] for r in _doc(paths["odd_checkpoint.pt"], cli)["layers"]]
    assert names == ["int_keys.0", "int_keys.1", "layers.0", "layers.1.w"]


# --------------------------------------------------------------------------- inspect -o


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    model = tmp_path / "model.onnx"
    model.write_bytes((SAMPLES / "mlp.onnx").read_bytes())
    return model


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "lipcheck-tmp" in p.name or p.name.startswith(".report"))


@pytest.mark.parametrize("how", ["same", "hardlink", "symlink", "input_via_symlink"])
def test_output_never_writes_the_input(how: str, model_copy: Path, cli: Cli) -> None:
    folder = model_copy.parent
    original = model_copy.read_bytes()
    source, target = model_copy, model_copy
    if how == "hardlink":
        target = folder / "report.json"
        os.link(model_copy, target)
    elif how == "symlink":
        target = folder / "report.json"
        target.symlink_to(model_copy)
    elif how == "input_via_symlink":
        source = folder / "link.onnx"
        source.symlink_to(model_copy)
    code, out, err = inspect(cli, source, "-f", "json", "-o", target)
    assert code == 2, err
    assert_one_line_error(out, err)
    assert model_copy.read_bytes() == original
    assert _leftovers(folder) == []
    if how == "symlink":
        assert target.is_symlink()


def test_output_symlink_to_another_file_is_not_followed(model_copy: Path, cli: Cli) -> None:
    folder = model_copy.parent
    victim = folder / "victim.txt"
    victim.write_text("keep me")
    target = folder / "report.json"
    target.symlink_to(victim)
    code, out, err = inspect(cli, model_copy, "-f", "json", "-o", target)
    assert victim.read_text() == "keep me"
    if code == 0:  # replaced the link itself with the report
        assert not target.is_symlink() and json.loads(target.read_text())["layers"]
    else:
        assert_one_line_error(out, err)
    assert _leftovers(folder) == []


def test_output_temp_file_is_not_a_planted_symlink(model_copy: Path, cli: Cli) -> None:
    folder = model_copy.parent
    original = model_copy.read_bytes()
    target = folder / "report.json"
    (folder / f".{target.name}.lipcheck-tmp-{os.getpid()}").symlink_to(model_copy)
    inspect(cli, model_copy, "-f", "json", "-o", target)
    assert model_copy.read_bytes() == original


def test_output_replaces_atomically(model_copy: Path, cli: Cli) -> None:
    folder = model_copy.parent
    target = folder / "report.json"
    target.write_text("old report")
    old_inode = target.stat().st_ino
    code, _, err = inspect(cli, model_copy, "-f", "json", "-o", target)
    assert code == 0, err
    assert json.loads(target.read_text())["layers"]
    assert target.stat().st_ino != old_inode  # a new file renamed over the old one
    assert _leftovers(folder) == []


def test_output_failure_leaves_nothing(model_copy: Path, monkeypatch: pytest.MonkeyPatch, cli: Cli) -> None:
    folder = model_copy.parent
    target = folder / "report.json"
    target.write_text("old report")

    def failing_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    code, out, err = inspect(cli, model_copy, "-f", "json", "-o", target)
    assert code == 2
    assert_one_line_error(out, err)
    assert target.read_text() == "old report"
    assert _leftovers(folder) == []


def test_output_into_a_directory_leaves_nothing(model_copy: Path, cli: Cli) -> None:
    folder = model_copy.parent
    target = folder / "report.json"
    target.mkdir()
    code, out, err = inspect(cli, model_copy, "-f", "json", "-o", target)
    assert code == 2
    assert_one_line_error(out, err)
    assert target.is_dir() and not any(target.iterdir())
    assert _leftovers(folder) == []
