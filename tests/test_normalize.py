"""lipcheck normalize: rewrites in every format, the proof by re-inspection, and safety."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import SAMPLES, Cli
from torch import nn

from lipcheck.testing import make_cnn, make_mlp


def normalize_json(args: list[object], tmp_path: Path, cli: Cli) -> dict:
    report = tmp_path / "report.json"
    code, _, err = cli("normalize", *args, "--report", report)
    assert code == 0, err
    return json.loads(report.read_text())


def test_onnx_round_trip_and_proof(tmp_path: Path, cli: Cli) -> None:
    out = tmp_path / "cnn.norm.onnx"
    doc = normalize_json([SAMPLES / "cnn.onnx", "-o", out], tmp_path, cli)
    assert doc["ok"] and doc["failures"] == []
    rescaled = [c for c in doc["layers"] if c["scale"] is not None]
    assert {c["op"] for c in rescaled} == {"Conv", "BatchNormalization", "Gemm"}
    for c in rescaled:
        # every rewritten layer re-measured at the target: the estimate at most T, the
        # certificate (and the estimate, once converged) close to it
        assert c["after_sigma"] <= 1.0 * (1 + 1e-6)
        assert c["after_upper"] == pytest.approx(1.0, rel=2e-4)
        assert c["after_sigma"] == pytest.approx(1.0, rel=0.05)
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    original = onnx.load(SAMPLES / "cnn.onnx")
    assert [n.op_type for n in model.graph.node] == [n.op_type for n in original.graph.node]
    assert model.opset_import == original.opset_import
    x = np.random.default_rng(0).normal(size=(1, 3, 16, 16)).astype(np.float32)
    y = ort.InferenceSession(str(out)).run(None, {"input": x})[0]
    assert np.isfinite(y).all()


def test_linear_chain_output_scales_by_product(tmp_path: Path, cli: Cli) -> None:
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Linear(6, 8, bias=False), nn.Linear(8, 5, bias=False),
                          nn.Linear(5, 3, bias=False)).eval()
    path, out = tmp_path / "chain.ts.pt", tmp_path / "chain.norm.ts.pt"
    torch.jit.save(torch.jit.trace(chain, torch.zeros(1, 6)), path)
    doc = normalize_json([path, "-o", out, "--input-shape", "1,6", "--target", "0.5", "--trust"],
                         tmp_path, cli)
    product = math.prod(c["scale"] for c in doc["layers"])
    baked = torch.jit.load(str(out))
    x = torch.randn(4, 6)
    torch.testing.assert_close(baked(x), chain(x) * product, rtol=1e-5, atol=1e-6)
    assert doc["after"]["network"]["lipschitz_bound"] <= 0.5**3 * (1 + 1e-3)


def test_budget_is_met(tmp_path: Path, cli: Cli) -> None:
    out = tmp_path / "resnet.budget.onnx"
    doc = normalize_json([SAMPLES / "resnet.onnx", "-o", out, "--budget", "1.5"], tmp_path, cli)
    assert doc["after"]["network"]["lipschitz_bound"] <= 1.5
    assert doc["after"]["network"]["lipschitz_bound"] >= 1.5 * 0.99  # the budget is used, not wasted
    targets = {c["target"] for c in doc["layers"] if c["scale"] is not None}
    assert len(targets) == 1  # one level spread evenly over the layers


def test_clip_leaves_small_layers_bit_identical(tmp_path: Path, cli: Cli) -> None:
    out = tmp_path / "mlp.clip.onnx"
    doc = normalize_json([SAMPLES / "mlp.onnx", "-o", out, "--clip", "--target", "1.0"], tmp_path, cli)
    before = {t.name: t for t in onnx.load(SAMPLES / "mlp.onnx").graph.initializer}
    after = {t.name: t for t in onnx.load(out).graph.initializer}
    for c in doc["layers"]:
        weight = c["weight"]
        if c["before"] <= 1.0:
            assert c["scale"] is None and "clip" in c["skipped"]
            assert after[weight].SerializeToString() == before[weight].SerializeToString()
        else:
            assert c["scale"] < 1 and after[weight].SerializeToString() != before[weight].SerializeToString()
    for name in before:  # biases untouched
        if name.endswith(".bias"):
            assert after[name].SerializeToString() == before[name].SerializeToString()


def test_layer_selection(tmp_path: Path, cli: Cli) -> None:
    out = tmp_path / "sel.onnx"
    doc = normalize_json([SAMPLES / "resnet.onnx", "-o", out, "--layers", "4.*", "--exclude", "*bn*"],
                         tmp_path, cli)
    changed = {c["name"] for c in doc["layers"] if c["scale"] is not None}
    assert changed == {"4.conv1", "4.conv2", "4.shortcut.0", "4.shortcut.1"}
    code, _, err = cli("normalize", SAMPLES / "mlp.onnx", "-o", tmp_path / "x.onnx", "--layers", "nope*")
    assert code == 2 and "matches no layer" in err and not (tmp_path / "x.onnx").exists()


def test_checkpoint_keeps_every_other_entry(tmp_path: Path, cli: Cli) -> None:
    model, _ = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    ckpt = {"epoch": 7, "config": {"lr": 0.1, "layers": [16, 32, 10]},
            "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict()}
    path, out = tmp_path / "ckpt.pt", tmp_path / "ckpt.norm.pt"
    torch.save(ckpt, path)
    doc = normalize_json([path, "-o", out], tmp_path, cli)
    assert doc["after"]["model"]["format"] == "state_dict"
    new = torch.load(out, weights_only=True)
    assert new["epoch"] == 7 and new["config"] == ckpt["config"]
    assert set(new["state_dict"]) == set(ckpt["state_dict"])
    opt_old, opt_new = ckpt["optimizer"], new["optimizer"]
    assert opt_new["param_groups"] == opt_old["param_groups"]
    for k, v in opt_old["state"].items():
        torch.testing.assert_close(opt_new["state"][k]["momentum_buffer"], v["momentum_buffer"])
    for key, value in ckpt["state_dict"].items():
        if key.endswith("bias"):
            assert torch.equal(new["state_dict"][key], value)
        else:
            w = new["state_dict"][key].double()
            assert float(torch.linalg.matrix_norm(w, 2)) <= 1 + 1e-6
            assert float(torch.linalg.matrix_norm(w, 2)) == pytest.approx(1.0, rel=1e-3)
    plain = nn.Sequential(*[m for m in make_mlp()[0]])
    plain.load_state_dict({k[len("module."):]: v for k, v in new["state_dict"].items()})


def test_pickled_module_needs_trust_and_round_trips(tmp_path: Path, cli: Cli) -> None:
    out = tmp_path / "cnn.norm.pickle.pt"
    code, _, err = cli("normalize", SAMPLES / "cnn.pickle.pt", "-o", out, "--input-shape", "1,3,16,16")
    assert code == 2 and "--trust" in err and not out.exists()
    doc = normalize_json([SAMPLES / "cnn.pickle.pt", "-o", out, "--input-shape", "1,3,16,16", "--trust"],
                         tmp_path, cli)
    assert doc["after"]["network"]["lipschitz_bound"] <= 1 + 1e-3
    module = torch.load(out, weights_only=False)
    assert isinstance(module, nn.Module)
    model, shape = make_cnn()
    assert module(torch.randn(shape)).shape == model(torch.randn(shape)).shape


def test_torchscript_without_shape_uses_per_tensor_numbers(tmp_path: Path, cli: Cli) -> None:
    out = tmp_path / "mlp.norm.ts.pt"
    # writing TorchScript back needs torch.jit.load, which runs code from the file
    code, _, err = cli("normalize", SAMPLES / "mlp.ts.pt", "-o", out)
    assert code == 2 and "--trust" in err and not out.exists()
    doc = normalize_json([SAMPLES / "mlp.ts.pt", "-o", out, "--trust"], tmp_path, cli)
    assert doc["after"]["model"]["format"] == "torchscript"
    module = torch.jit.load(str(out))
    for name, p in module.named_parameters():
        if name.endswith("weight"):
            assert float(torch.linalg.matrix_norm(p.double(), 2)) <= 1 + 1e-6


def test_same_input_and_seed_give_identical_bytes(tmp_path: Path, cli: Cli) -> None:
    for name in ("mlp.onnx", "mlp.state_dict.pt", "mlp.ts.pt"):
        a, b = tmp_path / f"a-{name}", tmp_path / f"b-{name}"
        assert cli("normalize", SAMPLES / name, "-o", a, "--trust")[0] == 0
        assert cli("normalize", SAMPLES / name, "-o", b, "--trust")[0] == 0
        assert a.read_bytes() == b.read_bytes(), name


def test_zero_weights_are_skipped(tmp_path: Path, cli: Cli) -> None:
    model, _ = make_mlp()
    with torch.no_grad():
        model[2].weight.zero_()
    path, out = tmp_path / "zero.pt", tmp_path / "zero.norm.pt"
    torch.save(model.state_dict(), path)
    doc = normalize_json([path, "-o", out], tmp_path, cli)
    zero = next(c for c in doc["layers"] if c["name"] == "2")
    assert zero["scale"] is None and "zero" in zero["skipped"]
    assert torch.equal(torch.load(out, weights_only=True)["2.weight"], torch.zeros(32, 32))


@pytest.mark.parametrize("extra, fragment", [
    (["--target", "0"], "--target"),
    (["--target", "-1"], "--target"),
    (["--target", "nan"], "--target"),
    (["--budget", "0"], "--budget"),
])
def test_bad_values_write_nothing(tmp_path: Path, extra: list[str], fragment: str, cli: Cli) -> None:
    out = tmp_path / "out.onnx"
    code, stdout, err = cli("normalize", SAMPLES / "mlp.onnx", "-o", out, *extra)
    assert code == 2 and stdout == "" and err.count("\n") == 1 and fragment in err
    assert list(tmp_path.iterdir()) == []


def test_output_safety(tmp_path: Path, cli: Cli) -> None:
    model = tmp_path / "m.onnx"
    shutil.copy(SAMPLES / "mlp.onnx", model)
    original = model.read_bytes()
    code, _, err = cli("normalize", model, "-o", model)
    assert code == 2 and "--in-place" in err and model.read_bytes() == original
    link = tmp_path / "hard.onnx"
    link.hardlink_to(model)
    code, _, err = cli("normalize", model, "-o", link, "--force")
    assert code == 2 and "--in-place" in err and model.read_bytes() == original
    link.unlink()
    existing = tmp_path / "existing.onnx"
    existing.write_bytes(b"keep me")
    code, _, err = cli("normalize", model, "-o", existing)
    assert code == 2 and "--force" in err and existing.read_bytes() == b"keep me"
    code, _, err = cli("normalize", model, "-o", tmp_path / "missing" / "x.onnx")
    assert code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.onnx", "m.onnx"]
    code, _, err = cli("normalize", model, "-o", existing, "--force")
    assert code == 0, err
    code, _, err = cli("normalize", model, "-o", model, "--in-place")
    assert code == 0, err
    assert model.read_bytes() != original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.onnx", "m.onnx"]


def test_unreachable_budget_is_refused(tmp_path: Path, cli: Cli) -> None:
    out = tmp_path / "r.onnx"
    # the residual skip path around 3.conv1 keeps a floor under the bound
    code, _, err = cli("normalize", SAMPLES / "resnet.onnx", "-o", out, "--budget", "0.01", "--layers", "3.conv1")
    assert code == 2 and "cannot be reached" in err and not out.exists()
    code, _, err = cli("normalize", SAMPLES / "mlp.state_dict.pt", "-o", out, "--budget", "1")
    assert code == 2 and "no graph" in err and not out.exists()


def test_parametrize_onnx_to_pt(tmp_path: Path, cli: Cli) -> None:
    import onnx2torch

    import lipcheck.parametrize as lp

    out = tmp_path / "cnn.param.pt"
    doc = normalize_json([SAMPLES / "cnn.onnx", "-o", out, "--mode", "parametrize"], tmp_path, cli)
    assert doc["ok"] and doc["after"]["network"]["lipschitz_bound"] <= 1 + 1e-3
    assert all(c["ok"] for c in doc["layers"] if c["scale"] is not None)
    model = lp.load(onnx2torch.convert(onnx.load(SAMPLES / "cnn.onnx")), str(out))
    from torch.nn.utils import parametrize

    assert parametrize.is_parametrized(model.get_submodule("0/Conv"), "weight")
    x = torch.randn(1, 3, 16, 16)
    y = ort.InferenceSession(str(SAMPLES / "cnn.onnx")).run(None, {"input": x.numpy()})[0]
    assert model(x).shape == y.shape
    # training continues: spectral_norm keeps the layer normalized as weights move
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.randn(4, 3, 16, 16)).square().sum().backward()
    optimizer.step()


def test_parametrize_pickled_module(tmp_path: Path, cli: Cli) -> None:
    import lipcheck.parametrize as lp

    out = tmp_path / "mlp.param.pt"
    doc = normalize_json([SAMPLES / "mlp.pickle.pt", "-o", out, "--mode", "parametrize", "--trust",
                          "--input-shape", "1,16", "--target", "2"], tmp_path, cli)
    assert doc["ok"]
    model = lp.load(make_mlp()[0], str(out))
    for index in (0, 2, 4):
        w = model[index].weight.detach().double()
        assert float(torch.linalg.matrix_norm(w, 2)) == pytest.approx(2.0, rel=1e-3)


def test_parametrize_refuses_formats_without_modules(tmp_path: Path, cli: Cli) -> None:
    out = tmp_path / "x.pt"
    code, _, err = cli("normalize", SAMPLES / "mlp.state_dict.pt", "-o", out, "--mode", "parametrize")
    assert code == 2 and "--mode bake" in err and not out.exists()


def test_mixed_prefix_checkpoint_keeps_its_names(tmp_path: Path, cli: Cli) -> None:
    """Only a prefix every key carries is dropped; the rewrite finds the same names."""
    state = make_mlp()[0].state_dict()
    mixed = {(f"module.{k}" if k.startswith("0.") else k): v for k, v in state.items()}
    path, out = tmp_path / "mixed.pt", tmp_path / "mixed.norm.pt"
    torch.save(mixed, path)
    doc = normalize_json([path, "-o", out], tmp_path, cli)
    assert {c["name"] for c in doc["layers"] if c["scale"] is not None} == {"module.0", "2", "4"}
    new = torch.load(out, weights_only=True)
    assert set(new) == set(mixed)
    for key in ("module.0.weight", "2.weight", "4.weight"):
        assert float(torch.linalg.matrix_norm(new[key].double(), 2)) <= 1 + 1e-6
