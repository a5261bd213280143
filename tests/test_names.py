"""Layer identity across exporters: the same weights give the same layer names (module
paths) whether they arrive as a legacy ONNX export, a dynamo ONNX export, TorchScript or a
state_dict, and a baseline gate compares what it claims to compare."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

import lipcheck
from lipcheck.cli import run
from lipcheck.graph import module_path

GATED = ("linear", "conv")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.relu(self.bn1(self.conv1(x)))


class Encoder(nn.Module):
    """A ModuleList that is not itself called: the legacy exporter writes its children's
    scopes relative to the encoder ('layers.0'), the dynamo exporter as full paths."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = nn.Sequential(Block(), Block())
        self.encoder = Encoder()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.layer1(self.stem(x))))


EXPECTED = ["stem", "layer1.0.conv1", "layer1.1.conv1", "encoder.layers.0.conv1",
            "encoder.layers.1.conv1", "head.1"]


def _trained_net() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
            # Distinct BatchNorms, as after training (equal ones are merged by the dynamo
            # exporter into one initializer).
            bn.weight.uniform_(0.5, 1.5)
            bn.running_var.uniform_(0.5, 2.0)
    return net


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("names")
    net, x = _trained_net(), torch.zeros(1, 3, 6, 6)
    files = {name: folder / name for name in ("legacy.onnx", "dynamo.onnx", "model.ts.pt", "sd.pt")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(files["legacy.onnx"]), dynamo=False)  # folds BatchNorm
        torch.onnx.export(net, (x,), str(files["dynamo.onnx"]), dynamo=True, verbose=False)
        torch.jit.save(torch.jit.trace(net, x), str(files["model.ts.pt"]))
    torch.save(net.state_dict(), files["sd.pt"])
    return files


def _names(path: Path, **kw: object) -> list[str]:
    report = lipcheck.analyze(path, **kw)  # type: ignore[arg-type]
    return [r.name for r in report.layers if r.kind in GATED]


def test_exporters_hide_the_module_path_in_different_places(exports: dict[str, Path]) -> None:
    """The premise: neither ONNX file names its conv weights after the modules."""
    legacy = onnx.load(str(exports["legacy.onnx"]))
    assert any(i.name.startswith("onnx::") for i in legacy.graph.initializer)
    dynamo = onnx.load(str(exports["dynamo.onnx"]))
    keys = {p.key for n in dynamo.graph.node for p in n.metadata_props}
    assert "pkg.torch.onnx.name_scopes" in keys


@pytest.mark.parametrize("name", ["legacy.onnx", "dynamo.onnx", "model.ts.pt", "sd.pt"])
def test_same_names_in_every_format(exports: dict[str, Path], name: str) -> None:
    assert _names(exports[name]) == EXPECTED


def test_traced_torchscript_has_the_same_names(exports: dict[str, Path]) -> None:
    names = _names(exports["model.ts.pt"], input_shape=(1, 3, 6, 6), trust=True)
    assert names == EXPECTED


def test_weightless_ops_named_by_module_in_both_exporters(exports: dict[str, Path]) -> None:
    legacy = [r.name for r in lipcheck.analyze(exports["legacy.onnx"]).layers]
    dynamo = [r.name for r in lipcheck.analyze(exports["dynamo.onnx"]).layers]
    for name in ("layer1.0.relu", "encoder.layers.1.relu", "layer1.1", "encoder.layers.0"):
        assert name in legacy and name in dynamo
    assert not any(n.startswith(("val_", "onnx::", "node_")) for n in legacy + dynamo)
    assert not any("layer1.layer1" in n for n in legacy + dynamo)


@pytest.mark.parametrize(("node_name", "op", "path"), [
    ("/layer1/layer1.0/conv1/Conv", "Conv", "layer1.0.conv1"),
    ("/encoder/layers.0/attn/proj/MatMul", "MatMul", "encoder.layers.0.attn.proj"),
    ("/fc/Gemm_3", "Gemm", "fc"),
    ("/Relu", "Relu", ""),
    ("Conv_12", "Conv", None),        # not an exporter scope
    ("/a//Conv", "Conv", None),
    ("/a/b/Relu", "Conv", None),      # the last part is not the op
])
def test_module_path_from_legacy_node_names(node_name: str, op: str, path: str | None) -> None:
    node = onnx.helper.make_node(op, ["x"], ["y"], name=node_name)
    assert module_path(node) == path


def test_module_path_from_dynamo_metadata() -> None:
    node = onnx.helper.make_node("Conv", ["x"], ["y"], name="node_Conv_17")
    prop = node.metadata_props.add()
    prop.key, prop.value = "pkg.torch.onnx.name_scopes", "['', 'layer1', 'layer1.0', 'layer1.0.bn1', 'bn']"
    assert module_path(node) == "layer1.0.bn1"
    prop.value = "not a list ["
    assert module_path(node) is None


def _inspect_json(path: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["inspect", str(path), "--format", "json", "-o", str(out), "--no-progress"]) == 0
    capsys.readouterr()


def test_baseline_from_other_exporter_compares_every_layer(
        exports: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base.json"
    _inspect_json(exports["legacy.onnx"], base, capsys)
    code = run(["check", str(exports["dynamo.onnx"]), "--baseline", str(base), "--max-increase", "1%",
                "--format", "json", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    match = [r for r in json.loads(out)["results"] if r["rule"] == "baseline-match"]
    assert match and match[0]["passed"] and match[0]["value"] == len(EXPECTED) == match[0]["limit"]
    assert f"{len(EXPECTED)} of {len(EXPECTED)} layers matched" in match[0]["message"]


def test_unmatched_layer_fails_the_gate(
        exports: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base.json"
    _inspect_json(exports["legacy.onnx"], base, capsys)
    doc = json.loads(base.read_text())
    renamed = next(r for r in doc["layers"] if r["name"] == "head.1")
    renamed["name"] = "classifier"
    base.write_text(json.dumps(doc))
    code = run(["check", str(exports["legacy.onnx"]), "--baseline", str(base), "--no-progress"])
    _, err = capsys.readouterr()
    assert code == 1
    lines = [ln for ln in err.splitlines() if "baseline-match" in ln]
    assert len(lines) == 1
    assert "head.1" in lines[0] and "classifier" in lines[0] and "5 of 7 layers" in lines[0]
    code = run(["check", str(exports["legacy.onnx"]), "--baseline", str(base), "--allow-unmatched",
                "--no-progress"])
    _, err = capsys.readouterr()
    assert code == 0, err


def test_state_dict_baseline_reports_the_batchnorms_it_cannot_match(
        exports: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A legacy export folds each BatchNorm into its conv: against a state_dict baseline
    the BatchNorm rows have no counterpart, and the gate says so instead of passing."""
    base = tmp_path / "base.json"
    _inspect_json(exports["sd.pt"], base, capsys)
    code = run(["check", str(exports["legacy.onnx"]), "--baseline", str(base), "--max-increase", "1000%",
                "--no-progress"])
    _, err = capsys.readouterr()
    assert code == 1
    assert "missing from the model: layer1.0.bn1" in err
