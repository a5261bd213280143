"""The fast engine: Cholesky-verified certificates, thick-restart Lanczos, 1x1 conv norms.

Every reference is computed here from first principles: ``torch.linalg.matrix_norm(ord=2)``
/ ``eigvalsh`` on explicit matrices, the explicit matrix of each convolution (its Jacobian,
``conftest.jacobian_matrix``). None comes from lipcheck's own earlier output.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import exact_norm, jacobian_matrix, randn, with_singular_values

from lipcheck import spectral

SAFETY = 1 + 1e-6  # spectral.CERT_SAFETY, restated so a change to it is noticed
# a certificate proven at (1 + CERT_GAP) x the max, plus rounding margins far below 1e-9
TIGHT = SAFETY * (1 + spectral.CERT_GAP) * (1 + 1e-9)


# --------------------------------------------------------------------------- certificates

BATCHES = [
    ("real-tall", lambda: randn(5, 40, 12, seed=1)),
    ("real-wide", lambda: randn(3, 9, 30, seed=2)),
    ("complex", lambda: torch.complex(randn(7, 16, 16, seed=3), randn(7, 16, 16, seed=4))),
    ("one-dominant", lambda: torch.cat([randn(6, 10, 10, seed=5), 3 * randn(1, 10, 10, seed=6)])),
    ("near-degenerate", lambda: with_singular_values([2.0, 2.0 - 1e-9, 1.9, 0.3], 20, 15, seed=7)[None]),
    ("rank-one", lambda: (randn(12, 1, seed=8) @ randn(1, 9, seed=9))[None]),
]


@pytest.mark.parametrize("case", BATCHES, ids=[c[0] for c in BATCHES])
@pytest.mark.parametrize("hint", ["none", "exact", "half"])
def test_sigma_max_bound_is_certified_and_tight(case, hint):
    mats = case[1]()
    exact = exact_norm(mats)
    estimate = {"none": 0.0, "exact": exact, "half": exact / 2}[hint]
    acc = spectral.SigmaMaxBound(estimate)
    acc.add(mats)
    assert exact <= acc.value() <= exact * TIGHT, (acc.value(), exact)


def test_sigma_max_bound_over_several_batches_and_scales():
    """The max over batches fed one by one, each with its own scale."""
    parts = [randn(4, 8, 8, seed=10) * 1e-30, randn(2, 8, 5, seed=11) * 1e30, randn(3, 6, 6, seed=12)]
    acc = spectral.SigmaMaxBound()
    for p in parts:
        acc.add(p)
    exact = max(exact_norm(p) for p in parts)
    assert exact <= acc.value() <= exact * TIGHT


def test_an_estimate_above_the_truth_cannot_lower_the_certificate():
    """The caller's estimate is only the first candidate; a wrong (too high) one gives a
    valid but loose bound, never a smaller one."""
    mats = randn(3, 10, 10, seed=13)
    exact = exact_norm(mats)
    acc = spectral.SigmaMaxBound(2 * exact)
    acc.add(mats)
    assert acc.value() >= 2 * exact


@pytest.mark.parametrize("patch", [{"CERT_POWER_STEPS": 0}, {"CERT_MAX_ROUNDS": 0}, {"CERT_EIG_BATCH": 1}])
def test_sigma_max_bound_fallback_paths(monkeypatch, patch):
    """No power steps (every candidate fails, the exact-eigenvalue rounds decide), no rounds
    (eigvalsh + Gram iteration fallback), one eigenvalue per round: all still certified."""
    for name, value in patch.items():
        monkeypatch.setattr(spectral.certify, name, value)
    mats = torch.cat([randn(20, 12, 12, seed=14), 1.5 * randn(2, 12, 12, seed=15)])
    exact = exact_norm(mats)
    acc = spectral.SigmaMaxBound()
    acc.add(mats)
    slack = TIGHT if patch.get("CERT_MAX_ROUNDS", 1) else SAFETY * (1 + 1e-3)
    assert exact <= acc.value() <= exact * slack


def test_gram_upper_bound_of_zero_and_empty():
    assert spectral.gram_upper_bound(torch.zeros(4, 3)).value == 0.0
    assert spectral.gram_upper_bound(torch.zeros(0, 3)).value == 0.0


def conv_matrix(weight: torch.Tensor, shape: tuple[int, ...], stride, padding, dilation, groups) -> torch.Tensor:
    conv = (F.conv1d, F.conv2d, F.conv3d)[weight.ndim - 3]
    return jacobian_matrix(
        lambda x: conv(x, weight, stride=stride, padding=padding, dilation=dilation, groups=groups), shape)


CONVS = [
    # (kernel, in_channels, out_channels, spatial, stride, padding, dilation, groups)
    ((3,), 2, 3, (9,), (2,), (1,), (1,), 1),
    ((3,), 2, 3, (10,), (3,), (2,), (1,), 1),
    ((4,), 3, 2, (11,), (2,), (1,), (2,), 1),
    ((3, 3), 2, 4, (7, 6), (2, 2), (1, 1), (1, 1), 1),
    ((3, 3), 4, 4, (6, 6), (1, 1), (1, 1), (2, 2), 2),
    ((5, 5), 3, 2, (9, 9), (3, 2), (2, 1), (1, 1), 1),
    ((7, 7), 1, 2, (4, 4), (2, 2), (3, 3), (1, 1), 1),  # kernel wider than the input
    ((3, 3), 2, 2, (1, 1), (1, 1), (1, 1), (1, 1), 1),  # one output, the kernel's centre tap
    ((2, 3, 2), 2, 2, (4, 5, 3), (2, 1, 2), (1, 1, 0), (1, 1, 1), 1),
]


@pytest.mark.parametrize("case", CONVS, ids=[f"k{c[0]}-s{c[4]}-p{c[5]}-d{c[6]}-g{c[7]}" for c in CONVS])
def test_strided_conv_certificate_on_the_smallest_grid(case):
    """The certificate on a grid of ceil(padded length / stride) is never below the
    explicit matrix's norm, strided, dilated, grouped, with kernels wider than the input."""
    kernel, cin, cout, spatial, stride, padding, dilation, groups = case
    weight = randn(cout, cin // groups, *kernel, seed=sum(kernel) + cin)
    shape = (1, cin, *spatial)
    exact = float(torch.linalg.matrix_norm(conv_matrix(weight, shape, stride, padding, dilation, groups), ord=2))
    padded = [spatial[i] + 2 * padding[i] for i in range(len(spatial))]
    cert = spectral.strided_conv_upper_bound(weight, padded, stride, dilation, groups)
    assert cert.value >= exact * (1 - 1e-12)
    if exact > 0 and all(s == 1 for s in stride) and min(spatial) >= 4:
        assert cert.value <= exact * 1.6  # the circular norm of a stride-1 conv on a small grid


# --------------------------------------------------------------------------- estimates

SET = dict(max_iters=5000, seed=0, device="cpu", dtype=torch.float64)


@pytest.mark.parametrize("tol", [1e-4, 1e-6, 1e-9])
def test_lanczos_on_a_clustered_spectrum(tol):
    """Top singular values 1e-7 apart and a slowly decaying tail: the estimate is a lower
    bound within max(tol, cluster width) of the exact value (a stopping test on the change
    between steps stops far earlier on such spectra). Below the cluster's width no Krylov
    method can tell its members apart from a few products, so 1e-9 only asks for that."""
    svals = [1.0 - 1e-7 * i for i in range(6)] + [0.999 - 0.002 * i for i in range(120)]
    w = with_singular_values(svals, 300, 200, seed=20)
    est = spectral.matrix_estimate(w, spectral.Settings(tol=tol, **SET))
    assert est.converged
    assert 1.0 * (1 - max(tol, 6e-7)) <= est.sigma <= 1.0 * (1 + 1e-12), est


def test_lanczos_thick_restart(monkeypatch):
    """A basis of 8 vectors (restarts every few steps) still converges on a hard spectrum."""
    monkeypatch.setattr(spectral.estimate, "LANCZOS_BASIS", 8)
    monkeypatch.setattr(spectral.estimate, "LANCZOS_KEEP", 3)
    svals = [1.0] + [0.999 - 0.001 * i for i in range(150)]
    w = with_singular_values(svals, 200, 180, seed=21)
    est = spectral.matrix_estimate(w, spectral.Settings(tol=1e-8, **SET))
    assert est.converged and est.iterations > 8
    assert 1 - 1e-8 <= est.sigma <= 1 + 1e-12, est


def test_lanczos_gives_up_honestly():
    svals = [1.0] + [0.9999 - 1e-5 * i for i in range(100)]
    w = with_singular_values(svals, 150, 150, seed=22)
    est = spectral.matrix_estimate(w, spectral.Settings(tol=1e-12, max_iters=3, seed=0, device="cpu",
                                                        dtype=torch.float64))
    assert not est.converged and est.iterations == 3
    assert est.sigma <= 1 + 1e-12


ONE_BY_ONE = [
    # (in, out, spatial, stride, padding, groups)
    (3, 5, (6, 6), (1, 1), (0, 0), 1),
    (4, 6, (7, 5), (2, 3), (1, 0), 2),
    (2, 3, (5,), (2,), (2,), 1),
    (2, 2, (1,), (3,), (1,), 1),  # the only output reads padding: the zero map
    (2, 2, (1, 1), (1, 1), (1, 1), 1),  # padding all round, the centre output still reads the input
]


@pytest.mark.parametrize("case", ONE_BY_ONE, ids=[f"{c[2]}-s{c[3]}-p{c[4]}-g{c[5]}" for c in ONE_BY_ONE])
def test_one_by_one_conv_norm_is_the_matrix_norm(case):
    cin, cout, spatial, stride, padding, groups = case
    d = len(spatial)
    weight = randn(cout, cin // groups, *([1] * d), seed=cin * 10 + cout)
    shape = (1, cin, *spatial)
    mat = conv_matrix(weight, shape, stride, padding, (1,) * d, groups)
    exact = float(torch.linalg.matrix_norm(mat, ord=2)) if mat.numel() else 0.0
    est = spectral.conv_estimate(weight, shape, stride=stride, dilation=(1,) * d, groups=groups,
                                 pads=[(p, p) for p in padding], settings=spectral.Settings(tol=1e-10, **SET))
    assert est.converged
    assert est.sigma == pytest.approx(exact, rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("stride,padding", list(itertools.product([(1, 1), (2, 1)], [(0, 0), (1, 2)])))
def test_conv_estimate_of_a_3x3_conv(stride, padding):
    weight = randn(4, 3, 3, 3, seed=30)
    shape = (1, 3, 7, 6)
    exact = float(torch.linalg.matrix_norm(conv_matrix(weight, shape, stride, padding, (1, 1), 1), ord=2))
    est = spectral.conv_estimate(weight, shape, stride=stride, dilation=(1, 1), groups=1,
                                 pads=[(p, p) for p in padding], settings=spectral.Settings(tol=1e-10, **SET))
    assert est.converged
    assert exact * (1 - 1e-9) <= est.sigma <= exact * (1 + 1e-12)
