"""Tests for the seeded model builders in lipcheck.testing and samples/make_samples.py."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLES

from lipcheck import testing as lt

SAMPLE_SCRIPT = SAMPLES / "make_samples.py"
SAMPLE_MODELS = {"mlp": lt.make_mlp, "cnn": lt.make_cnn, "resnet": lt.make_resnet}
SAMPLE_SUFFIXES = (".onnx", ".ts.pt", ".state_dict.pt", ".pickle.pt")

CONV_CASES = lt.conv_layer_cases()


def _forward(model: torch.nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(123))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(x)


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# --------------------------------------------------------------------------- builders


@pytest.mark.parametrize("name", sorted(lt.BUILDERS))
def test_builder_forward_finite(name: str) -> None:
    model, shape = lt.BUILDERS[name]()
    assert not model.training
    assert shape[0] == 1
    assert sum(p.numel() for p in model.parameters()) <= 100_000
    y = _forward(model, shape)
    assert y.shape[0] == 1
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(lt.BUILDERS))
def test_builder_deterministic(name: str) -> None:
    a, shape_a = lt.BUILDERS[name](7)
    b, shape_b = lt.BUILDERS[name](7)
    assert shape_a == shape_b
    _assert_same_state(a, b)
    c, _ = lt.BUILDERS[name](8)
    sa, sc = a.state_dict(), c.state_dict()
    assert any(sa[k].is_floating_point() and not torch.equal(sa[k], sc[k]) for k in sa), (
        "different seeds should give different weights"
    )


def test_builders_default_seed_is_zero() -> None:
    for builder in lt.BUILDERS.values():
        _assert_same_state(builder()[0], builder(0)[0])


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_batchnorm_is_not_identity(name: str) -> None:
    model, _ = lt.BUILDERS[name]()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert bn.running_var is not None and bn.running_mean is not None
        assert (bn.running_var >= 0.5).all() and (bn.running_var <= 2.0).all()
        assert (bn.weight.abs() <= 1.5).all()
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))


# --------------------------------------------------------------------------- conv zoo


def test_conv_cases_unique_names_and_coverage() -> None:
    names = [name for name, _, _ in CONV_CASES]
    assert len(names) == len(set(names))
    types = {type(m) for _, m, _ in CONV_CASES}
    nn = torch.nn
    assert {
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
    } <= types
    modes = {m.padding_mode for _, m, _ in CONV_CASES if isinstance(m, nn.Conv2d)}
    assert {"zeros", "reflect", "replicate", "circular"} <= modes
    assert any(m.padding == "same" for _, m, _ in CONV_CASES)
    assert any(max(m.stride) == 2 for _, m, _ in CONV_CASES)
    assert any(max(m.dilation) == 2 for _, m, _ in CONV_CASES)
    assert any(m.groups == 2 for _, m, _ in CONV_CASES)
    assert any(m.groups == m.in_channels > 1 for _, m, _ in CONV_CASES)  # depthwise
    assert any(len(set(m.kernel_size)) > 1 for _, m, _ in CONV_CASES)  # asymmetric kernel
    assert any(
        isinstance(m, nn.modules.conv._ConvTransposeNd) and max(m.output_padding) == 1
        for _, m, _ in CONV_CASES
    )
    assert any(
        isinstance(m, nn.modules.conv._ConvTransposeNd) and m.groups == 2 for _, m, _ in CONV_CASES
    )
    assert set(lt.make_conv_zoo()) == set(names)


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_case_forward_small(case: tuple[str, torch.nn.Module, tuple[int, ...]]) -> None:
    _, module, shape = case
    assert not module.training
    y = _forward(module, shape)
    assert torch.isfinite(y).all()
    # explicit Jacobian must stay cheap
    assert int(np.prod(shape)) * y.numel() <= 200_000


def test_conv_cases_deterministic() -> None:
    pairs = zip(lt.conv_layer_cases(3), lt.conv_layer_cases(3), strict=True)
    for (na, a, sa), (nb, b, sb) in pairs:
        assert na == nb and sa == sb
        _assert_same_state(a, b)


# --------------------------------------------------------------------------- samples


@pytest.fixture(scope="module")
def generated_samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the samples script into a temporary directory (leaves samples/ untouched)."""
    out = tmp_path_factory.mktemp("samples")
    proc = subprocess.run(
        [sys.executable, str(SAMPLE_SCRIPT), str(out)],
        capture_output=True,
        text=True,
        cwd=str(out),  # the script must locate the repo root itself
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for name in SAMPLE_MODELS:
        for suffix in SAMPLE_SUFFIXES:
            assert f"{name}{suffix}" in proc.stdout
    return out


def _check_onnx_matches_torch(path: Path, name: str) -> None:
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    if name in ("cnn", "resnet"):
        assert any(n.op_type == "BatchNormalization" for n in proto.graph.node)

    model, shape = SAMPLE_MODELS[name](0)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        expected = model(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(["output"], {"input": x.numpy()})
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(SAMPLE_MODELS))
def test_generated_onnx_valid_and_matches_torch(generated_samples: Path, name: str) -> None:
    _check_onnx_matches_torch(generated_samples / f"{name}.onnx", name)


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(SAMPLE_MODELS))
def test_generated_torch_formats_load(generated_samples: Path, name: str) -> None:
    model, shape = SAMPLE_MODELS[name](0)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x)

    sd = torch.load(generated_samples / f"{name}.state_dict.pt", weights_only=True)
    fresh, _ = SAMPLE_MODELS[name](1)
    fresh.load_state_dict(sd)
    _assert_same_state(fresh, model)

    pickled = torch.load(generated_samples / f"{name}.pickle.pt", weights_only=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.load(str(generated_samples / f"{name}.ts.pt"))
    with torch.no_grad():
        torch.testing.assert_close(pickled.eval()(x), expected)
        torch.testing.assert_close(traced(x), expected)


@pytest.mark.e2e
def test_generated_samples_are_small(generated_samples: Path) -> None:
    total = sum(p.stat().st_size for p in generated_samples.iterdir())
    assert total < 2 * 1024 * 1024


@pytest.mark.parametrize("name", sorted(SAMPLE_MODELS))
def test_committed_onnx_samples(name: str) -> None:
    _check_onnx_matches_torch(SAMPLES / f"{name}.onnx", name)
