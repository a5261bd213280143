"""The command line: output formats, exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from conftest import SAMPLES, Cli
from onnx import TensorProto, helper, numpy_helper


@pytest.mark.e2e
def test_help_and_version_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from lipcheck.cli import run\n"
        "assert run(['--help']) == 0\n"
        "assert run(['inspect', '--help']) == 0\n"
        "assert run(['--version']) == 0\n"
        "heavy = [m for m in ('torch', 'onnx', 'onnx2torch', 'pandas') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "inspect" in proc.stdout and "lipcheck 0." in proc.stdout


@pytest.mark.e2e
def test_module_entry_point() -> None:
    proc = subprocess.run([sys.executable, "-m", "lipcheck", "--version"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("lipcheck ")


def test_table_output(cli: Cli) -> None:
    code, out, err = cli("inspect", SAMPLES / "resnet.onnx", "--device", "cpu")
    assert code == 0, err
    assert "network Lipschitz bound (certified)" in out
    assert "BatchNormalization" in out and "Add" in out


def test_json_document(cli: Cli) -> None:
    code, out, err = cli("inspect", SAMPLES / "cnn.onnx", "--format", "json", "--seed", "3")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema_version"] == "1"
    assert doc["model"]["format"] == "onnx" and len(doc["model"]["sha256"]) == 64
    assert doc["settings"] == {"tol": 1e-6, "max_iters": 1000, "seed": 3, "device": "cpu",
                               "dtype": "float32", "method": "lanczos", "certify": "auto",
                               "failure_probability": 1e-9}
    layer_keys = {"name", "op", "input_shape", "sigma", "sigma_matrix", "sigma_upper",
                  "iterations", "converged"}
    assert all(layer_keys <= set(row) for row in doc["layers"])
    net = doc["network"]
    assert net["bounded"] is True and net["lipschitz_bound"] > 0 and net["reason"]
    assert doc["skipped"] == []
    convs = [r for r in doc["layers"] if r["op"] == "Conv"]
    assert len(convs) == 2 and all(r["sigma_matrix"] is not None for r in convs)


def test_csv_to_file(tmp_path: Path, cli: Cli) -> None:
    target = tmp_path / "report.csv"
    code, out, err = cli("inspect", SAMPLES / "mlp.onnx", "-f", "csv", "-o", target)
    assert code == 0, err
    assert out == ""
    frame = pd.read_csv(target)
    assert list(frame["op"]) == ["Gemm", "Relu", "Gemm", "Tanh", "Gemm"]
    for column in ("name", "sigma", "sigma_matrix", "sigma_upper", "iterations", "converged"):
        assert column in frame.columns
    assert [p.name for p in tmp_path.iterdir()] == ["report.csv"]


def test_state_dict_has_no_network_bound(cli: Cli) -> None:
    code, out, err = cli("inspect", SAMPLES / "mlp.state_dict.pt", "-f", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["network"]["bounded"] is False and doc["network"]["lipschitz_bound"] is None
    assert "no graph" in doc["network"]["reason"]
    assert [r["name"] for r in doc["layers"]] == ["0", "2", "4"]


def test_torchscript_needs_input_shape_for_a_bound(cli: Cli) -> None:
    code, out, _ = cli("inspect", SAMPLES / "mlp.ts.pt", "-f", "json")
    assert code == 0 and json.loads(out)["network"]["bounded"] is False
    # tracing the graph runs the archive's code: refused without --trust
    code, out, err = cli("inspect", SAMPLES / "mlp.ts.pt", "-f", "json", "--input-shape", "1,16")
    assert code == 2 and "--trust" in err and out == ""
    code, out, _ = cli("inspect", SAMPLES / "mlp.ts.pt", "-f", "json", "--input-shape", "1,16", "--trust")
    assert code == 0 and json.loads(out)["network"]["bounded"] is True


def test_pickle_needs_trust(cli: Cli) -> None:
    code, out, err = cli("inspect", SAMPLES / "mlp.pickle.pt", "--input-shape", "1,16")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "--trust" in err
    code, out, err = cli("inspect", SAMPLES / "mlp.pickle.pt", "--input-shape", "1,16", "--trust", "-f", "json")
    assert code == 0, err
    assert json.loads(out)["network"]["bounded"] is True


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["inspect", "no/such/model.onnx"], "does not exist"),
        (["inspect", SAMPLES / "mlp.onnx", "--tol", "2"], "--tol"),
        (["inspect", SAMPLES / "mlp.onnx", "--max-iters", "0"], "--max-iters"),
        (["inspect", SAMPLES / "mlp.onnx", "--input-shape", "1,a"], "--input-shape"),
        (["inspect", SAMPLES / "mlp.onnx", "--input-shape", "1,3,8,8"], "--input-shape"),
        (["inspect", SAMPLES / "mlp.onnx", "--format", "yaml"], "yaml"),
        (["inspect", SAMPLES / "mlp.onnx", "-o", "no/such/dir/r.json", "-f", "json"], "does not exist"),
        (["inspect", SAMPLES], "directory"),
        (["inspect"], "Missing argument"),
    ],
)
def test_bad_usage_is_one_line_exit_2(args: list[object], fragment: str, cli: Cli) -> None:
    code, out, err = cli(*args)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("lipcheck: error:"), err
    assert fragment in err


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, b"not a model at all", b"PK\x03\x04junk"])
def test_broken_files_exit_2(tmp_path: Path, content: bytes, cli: Cli) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    code, out, err = cli("inspect", path, "-f", "json")
    assert code == 2 and out == "" and err.count("\n") == 1


def test_report_never_overwrites_the_model(tmp_path: Path, cli: Cli) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes((SAMPLES / "mlp.onnx").read_bytes())
    code, _, err = cli("inspect", model, "-f", "json", "-o", model)
    assert code == 2 and "model file" in err
    assert model.read_bytes() == (SAMPLES / "mlp.onnx").read_bytes()


# --------------------------------------------------------------------------- ONNX graphs


def _gemm_graph(nodes: list[onnx.NodeProto], inits: list[TensorProto], out_dim: int,
                opset: int = 17, domains: tuple[str, ...] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_dim])], inits,
    )
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=imports)


def test_weights_in_constant_nodes(tmp_path: Path, cli: Cli) -> None:
    w = np.diag([3.0, -5.0, 2.0, 1.0]).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["y"]),
    ]
    path = tmp_path / "const.onnx"
    onnx.save(_gemm_graph(nodes, [], 4), path)
    code, out, err = cli("inspect", path, "-f", "json", "--dtype", "float64", "--tol", "1e-12")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["layers"][0]["sigma"] == pytest.approx(5.0, rel=1e-9)
    assert 5.0 <= doc["network"]["lipschitz_bound"] <= 5.0 * (1 + 2e-4)


def test_unsupported_ops_are_skipped_with_reason(tmp_path: Path, cli: Cli) -> None:
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(4, 4)).astype(np.float32)
    w2 = rng.normal(size=(3, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1),
        helper.make_node("Mystery", ["h"], ["g"], domain="com.example"),
        helper.make_node("Gemm", ["g", "w2"], ["y"], transB=1),
    ]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    path = tmp_path / "custom.onnx"
    onnx.save(_gemm_graph(nodes, inits, 3, domains=("com.example",)), path)
    code, out, err = cli("inspect", path, "-f", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert [r["name"] for r in doc["layers"]] == ["w1", "w2"]
    for row, w in zip(doc["layers"], (w1, w2)):
        assert row["sigma"] == pytest.approx(float(np.linalg.norm(w, 2)), rel=1e-4)
    assert doc["skipped"][0]["op"] == "Mystery" and "com.example" in doc["skipped"][0]["reason"]
    assert doc["network"]["bounded"] is False and doc["network"]["lipschitz_bound"] is None
    assert "Mystery" in doc["network"]["reason"]


def test_if_node_is_skipped_but_layers_still_measured(tmp_path: Path, cli: Cli) -> None:
    w = np.diag([2.0, 1.0, 1.0, 1.0]).astype(np.float32)
    branch = lambda name: helper.make_graph(  # noqa: E731
        [helper.make_node("Identity", ["h"], [f"{name}_out"])], name, [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1, 4])],
    )
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["h"]),
        helper.make_node("ReduceSum", ["h"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["y"], then_branch=branch("a"), else_branch=branch("b")),
    ]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(0), "zero")]
    path = tmp_path / "if.onnx"
    onnx.save(_gemm_graph(nodes, inits, 4), path)
    code, out, err = cli("inspect", path, "-f", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["layers"][0]["sigma"] == pytest.approx(2.0, rel=1e-5)
    assert doc["network"]["bounded"] is False


def test_external_data_inside_folder(tmp_path: Path, cli: Cli) -> None:
    model = onnx.load(SAMPLES / "mlp.onnx")
    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    code, out, err = cli("inspect", tmp_path / "ext.onnx", "-f", "json")
    assert code == 0, err
    _, ref, _ = cli("inspect", SAMPLES / "mlp.onnx", "-f", "json")
    assert json.loads(out)["layers"] == json.loads(ref)["layers"]


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "link.bin", "missing.bin"])
def test_external_data_outside_folder_is_refused(tmp_path: Path, location: str, cli: Cli) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    model = onnx.load(SAMPLES / "mlp.onnx")
    onnx.save(model, folder / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    (tmp_path / "outside.bin").write_bytes((folder / "weights.bin").read_bytes())
    (folder / "link.bin").symlink_to(tmp_path / "outside.bin")
    loaded = onnx.load(folder / "ext.onnx", load_external_data=False)
    for init in loaded.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(loaded, folder / "ext.onnx")
    code, out, err = cli("inspect", folder / "ext.onnx", "-f", "json")
    assert code == 2 and out == "" and err.count("\n") == 1


def test_external_data_length_beyond_file_is_refused(tmp_path: Path, cli: Cli) -> None:
    model = onnx.load(SAMPLES / "mlp.onnx")
    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    data = (tmp_path / "weights.bin").read_bytes()
    (tmp_path / "weights.bin").write_bytes(data[: len(data) // 2])
    code, _, err = cli("inspect", tmp_path / "ext.onnx")
    assert code == 2 and "beyond" in err


def test_lstm_rows_and_unbounded_network(tmp_path: Path, cli: Cli) -> None:
    import torch

    from lipcheck.testing import make_lstm

    model, shape = make_lstm()
    path = tmp_path / "lstm.onnx"
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(shape),), buffer, dynamo=False, opset_version=17)
    path.write_bytes(buffer.getvalue())
    code, out, err = cli("inspect", path, "-f", "json")
    assert code == 0, err
    doc = json.loads(out)
    gates = [r for r in doc["layers"] if r["kind"] == "recurrent"]
    assert len(gates) == 8  # 4 gates x (W, R)
    assert doc["network"]["bounded"] is False and "LSTM" in doc["network"]["reason"]


@pytest.mark.e2e
def test_torch_export_archive_needs_trust(tmp_path: Path, cli: Cli) -> None:
    import torch

    from lipcheck.testing import make_cnn

    model, shape = make_cnn()
    path = tmp_path / "cnn.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(shape),)), path)
    code, out, err = cli("inspect", path)
    assert code == 2 and "--trust" in err and out == ""
    code, out, err = cli("inspect", path, "--trust", "-f", "json")
    assert code == 0, err
    doc = json.loads(out)
    _, ref, _ = cli("inspect", SAMPLES / "cnn.onnx", "-f", "json")
    ref_doc = json.loads(ref)
    assert doc["model"]["input_shape"] == [1, 3, 16, 16]
    assert doc["network"]["lipschitz_bound"] == pytest.approx(ref_doc["network"]["lipschitz_bound"], rel=1e-9)


def _exact_layer_norms(path: Path) -> dict[str, float]:
    """Each Conv/Gemm of an ONNX file as its explicit matrix on its real input size, by
    autograd in float64, and that matrix's largest singular value (SVD)."""
    import torch
    import torch.nn.functional as F
    from conftest import exact_norm, jacobian_matrix

    from lipcheck.graph import build_graph

    model = onnx.load(path)
    graph = build_graph(model, None)
    out: dict[str, float] = {}
    for node in graph.nodes:
        if node.op == "Conv":
            w = torch.from_numpy(graph.const(node.inputs[1]).astype(np.float64))
            shape = tuple(graph.known_shape(node.inputs[0]))
            pads = [int(p) for p in node.attrs.get("pads", [0] * 4)]

            def conv(x: torch.Tensor, w: torch.Tensor = w, pads: list[int] = pads, node=node) -> torch.Tensor:  # type: ignore[no-untyped-def]
                x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
                return F.conv2d(x, w, stride=list(node.attrs.get("strides", [1, 1])),
                                dilation=list(node.attrs.get("dilations", [1, 1])),
                                groups=int(node.attrs.get("group", 1)))

            out[node.name] = exact_norm(jacobian_matrix(conv, shape))
        elif node.op == "Gemm":
            w = torch.from_numpy(graph.const(node.inputs[1]).astype(np.float64))
            out[node.name] = exact_norm(w) * abs(float(node.attrs.get("alpha", 1.0)))
    return out


@pytest.mark.parametrize("sample", ["cnn.onnx", pytest.param("resnet.onnx", marks=pytest.mark.e2e)])
def test_lanczos_meets_exact_norms_in_fewer_iterations_than_power(sample: str) -> None:
    import lipcheck

    exact = _exact_layer_norms(SAMPLES / sample)
    common = dict(tol=1e-8, max_iters=20000, device="cpu", dtype="float64")
    power = lipcheck.analyze(SAMPLES / sample, method="power", **common)
    krylov = lipcheck.analyze(SAMPLES / sample, method="lanczos", **common)
    assert [r.name for r in power.layers] == [r.name for r in krylov.layers]
    checked = 0
    for k in krylov.layers:
        if k.name in exact and k.kind in ("conv", "gemm", "linear"):
            checked += 1
            # an estimate is the norm of the operator on a unit vector: never above the exact
            # norm; close below it (cnn's first conv has its top two singular values 3.5e-6
            # apart, which both methods stop inside of, at tol=1e-8: the known limit of a
            # value-change stopping rule on a near-double top singular value)
            assert exact[k.name] * (1 - 1e-5) <= k.sigma <= exact[k.name] * (1 + 1e-12), k.name
            assert exact[k.name] <= k.sigma_upper * (1 + 1e-12), k.name
    assert checked >= 3
    iters = lambda rep: sum(r.iterations or 0 for r in rep.layers)  # noqa: E731
    assert iters(krylov) * 3 < iters(power)


def test_shape_of_an_activation_is_not_an_op_to_skip(tmp_path: Path, cli: Cli) -> None:
    """Shape(x) feeds a Reshape: it does not depend on x's values, so nothing is skipped."""
    w = np.eye(4, dtype=np.float32) * 3
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Shape", ["h"], ["s"]),
        helper.make_node("Reshape", ["h", "s"], ["y"]),
    ]
    path = tmp_path / "shape.onnx"
    onnx.save(_gemm_graph(nodes, [numpy_helper.from_array(w, "w")], 4), path)
    code, out, err = cli("inspect", path, "-f", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["skipped"] == [] and doc["network"]["bounded"] is True
    assert doc["network"]["lipschitz_bound"] == pytest.approx(3.0, rel=1e-4)


def test_output_path_check_is_one_function_without_torch(tmp_path: Path) -> None:
    """The CLI and lipcheck.normalization share lipcheck.files.check_output_path."""
    import pytest as _pytest

    from lipcheck import files, normalization
    from lipcheck.errors import UsageError

    assert normalization.check_output_path is files.check_output_path
    src = tmp_path / "m.onnx"
    src.write_bytes(b"x")
    files.check_output_path(src, tmp_path / "new.onnx", in_place=False, force=False)
    files.check_output_path(src, src, in_place=True, force=False)
    with _pytest.raises(UsageError, match="refusing to overwrite the input"):
        files.check_output_path(src, src, in_place=False, force=False)
    other = tmp_path / "o.onnx"
    other.write_bytes(b"y")
    with _pytest.raises(UsageError, match="pass --force"):
        files.check_output_path(src, other, in_place=False, force=False)
    files.check_output_path(src, other, in_place=False, force=True)
    with _pytest.raises(UsageError, match="does not exist"):
        files.check_output_path(src, tmp_path / "missing" / "x.onnx", in_place=False, force=False)
    folder = tmp_path / "model"
    folder.mkdir()
    with _pytest.raises(UsageError, match="into itself"):
        files.check_output_path(folder, folder / "out", in_place=False, force=False)
