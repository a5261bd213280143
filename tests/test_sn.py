"""Spectrally normalized models (torch.nn.utils.spectral_norm and the parametrizations
version): rows describe the weight the layer really uses, and normalize changes what the
model computes. References come from torch itself (the module's own eval-mode weight) and
from explicit matrices, never from lipcheck's earlier output."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import spectral_norm as old_sn
from torch.nn.utils.parametrizations import spectral_norm as new_sn

import lipcheck
from lipcheck import snorm
from lipcheck.cli import run

STYLES = {"old": (old_sn, snorm.OLD_STYLE), "new": (new_sn, snorm.NEW_STYLE)}
X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def make_discriminator(sn: Callable[[nn.Module], nn.Module], seed: int = 0) -> nn.Sequential:
    """A DCGAN-style net, trained a little: a parameter step after the last power
    iteration leaves the stored u, v a step behind, as in every real checkpoint."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        sn(nn.Conv2d(3, 8, 3, padding=1)), nn.LeakyReLU(0.2),
        sn(nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),
        nn.Flatten(), sn(nn.Linear(8 * 16 * 16, 1)),
    )
    m.train()
    for _ in range(3):
        m(torch.randn(2, 3, 8, 8))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    m.eval()
    m(X[:1])  # the old API computes .weight in its forward pre-hook
    return m


def reshaped(m: nn.Sequential, i: int) -> torch.Tensor:
    """The effective weight as SN reshapes it (dim 1 for ConvTranspose)."""
    w = m[i].weight.detach().double()
    if isinstance(m[i], nn.ConvTranspose2d):
        w = w.transpose(0, 1)
    return w.reshape(w.shape[0], -1)


def two_norm(a: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a.double(), 2))


@pytest.fixture(params=sorted(STYLES))
def style(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_state_dict_rows_are_the_effective_weights(style: str, tmp_path: Path) -> None:
    sn, name = STYLES[style]
    m = make_discriminator(sn)
    path = tmp_path / "d.pt"
    torch.save({"model": m.state_dict(), "epoch": 7}, path)
    report = lipcheck.analyze(path)
    rows = {r.name: r for r in report.layers}
    assert list(rows) == ["0", "2", "5"]  # module paths, not '0.weight_orig'
    assert [rows[k].op for k in rows] == ["Conv2d", "ConvTranspose2d", "Linear"]
    for i in (0, 2, 5):
        row = rows[str(i)]
        assert row.spectral_norm == name and "spectrally normalized" in (row.note or "")
        assert row.sigma_matrix == pytest.approx(two_norm(reshaped(m, i)), rel=1e-6)
    # Before: the raw weight_orig was reported; the effective weight differs from it.
    raw = m[5].parametrizations.weight.original if style == "new" else m[5].weight_orig
    assert abs(two_norm(raw.detach()) - rows["5"].sigma) > 0.05 * rows["5"].sigma
    assert rows["5"].sigma == pytest.approx(two_norm(m[5].weight.detach()), rel=1e-6)
    assert rows["5"].sigma_upper >= two_norm(m[5].weight.detach())


def test_effective_weight_is_torchs_own_tensor(style: str) -> None:
    sn, _ = STYLES[style]
    m = make_discriminator(sn)
    state = m.state_dict()
    found = snorm.find(state)
    assert sorted(w.layer for w in found.values()) == ["0", "2", "5"]
    for w in found.values():
        eff, _, dim = snorm.effective_weight(state[w.original], state[w.u], state[w.v])
        layer = m[int(w.layer)]
        assert torch.equal(eff, layer.weight.detach())
        assert dim == (1 if isinstance(layer, nn.ConvTranspose2d) else 0)


def test_mismatched_vectors_are_refused_not_guessed() -> None:
    with pytest.raises(ValueError, match="fit neither"):
        snorm.effective_weight(torch.ones(4, 6), torch.ones(5), torch.ones(6))


def test_normalize_state_dict_changes_what_the_model_computes(style: str, tmp_path: Path) -> None:
    sn, _ = STYLES[style]
    m = make_discriminator(sn)
    src, out = tmp_path / "d.pt", tmp_path / "out.pt"
    torch.save(m.state_dict(), src)
    result = lipcheck.normalize(src, out, target=0.5)
    assert result.ok, result.failures
    assert {c.rewrite for c in result.changes} == {"divide-u"}
    fresh = make_discriminator(sn, seed=5)
    fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)  # same keys, same shapes
    fresh.eval()
    with torch.no_grad():
        before, after = m(X), fresh(X)
    assert not torch.allclose(before, after)
    # The Linear's effective weight now has norm exactly the target; the convs' certified
    # size-independent bounds are at the target, so their reshaped norms are below it.
    assert two_norm(fresh[5].weight.detach()) == pytest.approx(0.5, rel=1e-5)
    for i in (0, 2):
        assert two_norm(reshaped(fresh, i)) <= 0.5 * (1 + 1e-6)
    # The output is a scaled copy: the last layer's weight changed by exactly its factor.
    factor = {c.name: c.scale for c in result.changes}["5"]
    assert torch.allclose(fresh[5].weight, m[5].weight * factor, rtol=1e-5)


def _legacy_onnx(m: nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (X[:1],), str(path), dynamo=False, input_names=["x"])


def _conv_operator_norm(layer: nn.Module, shape: tuple[int, ...]) -> float:
    """The norm of the explicit matrix of the layer's linear part on its real input size
    (``shape`` without the batch dim), built column by column from unit inputs."""
    w = layer.weight.detach().double()
    n = int(np.prod(shape))
    cols = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    fn = torch.nn.functional.conv2d if isinstance(layer, nn.Conv2d) else torch.nn.functional.conv_transpose2d
    mat = fn(cols, w, None, layer.stride, layer.padding).reshape(n, -1).T
    return two_norm(mat)


def test_legacy_onnx_export_rows_and_normalize(tmp_path: Path) -> None:
    import onnxruntime as ort

    m = make_discriminator(old_sn)
    src, out = tmp_path / "d.onnx", tmp_path / "out.onnx"
    _legacy_onnx(m, src)
    rows = {r.name: r for r in lipcheck.analyze(src).layers if r.kind in ("conv", "linear")}
    assert list(rows) == ["0", "2", "5"]
    assert all(r.spectral_norm == snorm.OLD_STYLE for r in rows.values())
    for name, shape in (("0", (3, 8, 8)), ("2", (8, 8, 8))):
        exact = _conv_operator_norm(m[int(name)], shape)
        # The estimate is a lower bound (Lanczos on a clustered spectrum may stop on a
        # singular value just below the top one), the certificate an upper bound.
        assert rows[name].sigma <= exact * (1 + 1e-6) <= rows[name].sigma_upper * (1 + 1e-6)
        assert rows[name].sigma == pytest.approx(exact, rel=1e-3)
    assert rows["5"].sigma == pytest.approx(two_norm(m[5].weight.detach()), rel=1e-5)
    # The true norm of a SN conv is not its reshaped norm (pytorch issue 99149).
    assert rows["0"].sigma > 1.2 * rows["0"].sigma_matrix

    result = lipcheck.normalize(src, out, target=0.5)
    assert result.ok, result.failures
    assert {c.rewrite for c in result.changes if c.scale} == {"mul-node"}
    feed = {"x": X[:1].numpy()}
    a = ort.InferenceSession(str(src)).run(None, feed)[0]
    b = ort.InferenceSession(str(out)).run(None, feed)[0]
    assert not np.allclose(a, b)
    after = {r.name: r for r in lipcheck.analyze(out).layers}
    for name in ("0", "2", "5"):
        assert after[name].sigma_upper <= 0.5 * (1 + 1e-5)
        # normalize divides by the certificate, which a conv's FFT bound puts a little above
        # the true norm: the true norm lands at or just below the target.
        assert 0.45 <= after[name].sigma <= 0.5 * (1 + 1e-6)


def test_torchscript_normalize_scales_the_stored_u(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = make_discriminator(old_sn)
    src, out = tmp_path / "d.ts.pt", tmp_path / "out.ts.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(m, X[:1]), str(src))
    rows = {r.name: r for r in lipcheck.analyze(src).layers}
    assert rows["5"].sigma == pytest.approx(two_norm(m[5].weight.detach()), rel=1e-6)
    assert run(["normalize", str(src), "-o", str(out), "--target", "0.5", "--trust", "--no-progress"]) == 0, \
        capsys.readouterr().err
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        written = torch.jit.load(str(out))
    with torch.no_grad():
        assert not torch.allclose(written(X), m(X))
    # The written module computes with the scaled effective weight: check the Linear's norm
    # through the module itself (its output is affine in the flattened input).
    fresh = make_discriminator(old_sn, seed=3)
    fresh.load_state_dict(written.state_dict(), strict=True)
    fresh.eval()
    fresh(X[:1])
    assert two_norm(fresh[5].weight.detach()) == pytest.approx(0.5, rel=1e-5)
    with torch.no_grad():
        assert torch.allclose(fresh(X), written(X), atol=1e-5)


class Tied(nn.Module):
    """Two layers reading one weight: rescaling one would rescale the other."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_unwritable_selected_layer_is_refused_and_nothing_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    src, out = tmp_path / "tied.pt", tmp_path / "out.pt"
    torch.save(Tied(), src)
    code = run(["normalize", str(src), "-o", str(out), "--target", "0.01", "--trust",
                "--input-shape", "1,6", "--no-progress"])
    _, err = capsys.readouterr()
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "shared by 2 layers" in err and "nothing was written" in err
    assert not out.exists()
