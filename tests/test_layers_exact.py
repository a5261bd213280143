"""Per-layer numbers checked against exact answers computed independently here.

Every reference value is computed from first principles in this file (explicit
Jacobian matrices, ``torch.linalg.matrix_norm(ord=2)``, an explicit DFT in numpy,
brute-force copy counts), never from lipcheck's own earlier output.

Conventions used throughout:

* ``sigma`` is a power-iteration estimate: a lower bound on the exact norm, and
  within ``REL`` of it when run in float64 with ``tol=1e-10``;
* ``sigma_upper`` is a certificate: never below the exact norm (up to float64
  rounding, ``CERT_SLACK``).
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import exact_norm, jacobian_matrix, orthonormal, randn
from torch import nn

import lipcheck
from lipcheck import spectral
from lipcheck import testing as lt

REL = 1e-4  # estimate vs exact, relative
CERT_SLACK = 1e-9  # certificates may undershoot the exact value by float64 rounding only
SAFETY = 1 + 1e-6  # spectral.CERT_SAFETY, restated so a change to it is noticed
ANALYZE = dict(dtype="float64", tol=1e-10, device="cpu", seed=0)
SET64 = spectral.Settings(tol=1e-10, max_iters=2000, seed=0, device="cpu", dtype=torch.float64)


# --------------------------------------------------------------------------- helpers


def bias_free(module: nn.Module) -> nn.Module:
    """A float64 copy of ``module`` with every bias zeroed (so it is linear)."""
    m = copy.deepcopy(module).double().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    return m


def module_norm(module: nn.Module, shape: tuple[int, ...]) -> float:
    """Exact spectral norm of the bias-free module on inputs of ``shape``."""
    return exact_norm(jacobian_matrix(bias_free(module), shape))


def analyze(model: nn.Module, shape: tuple[int, ...]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lipcheck.analyze(model, shape, **ANALYZE)


def rows_of(rep, *ops: str, kind: str | None = None):
    return [r for r in rep.layers if r.op in ops and (kind is None or r.kind == kind)]


def assert_estimate(sigma: float | None, exact: float, rel: float = REL) -> None:
    assert sigma is not None
    assert sigma == pytest.approx(exact, rel=rel, abs=1e-300), (sigma, exact)
    # power iteration converges from below
    assert sigma <= exact * (1 + CERT_SLACK) + 1e-300, (sigma, exact)


def assert_certificate(upper: float | None, exact: float) -> None:
    assert upper is not None
    assert upper >= exact * (1 - CERT_SLACK), (upper, exact)


def assert_matches_multiset(values: list[float], exacts: list[float], rel: float = REL) -> None:
    """Compare two lists of norms as multisets (sorted), each pair within ``rel``."""
    assert len(values) == len(exacts), (values, exacts)
    for v, e in zip(sorted(values), sorted(exacts)):
        assert v == pytest.approx(e, rel=rel), (sorted(values), sorted(exacts))


# --------------------------------------------------------------------------- 1. matrices


def _known_matrices() -> list[tuple[str, torch.Tensor, float]]:
    """(id, W, exact sigma_max) with sigma_max known in closed form."""
    cases: list[tuple[str, torch.Tensor, float]] = []
    d = torch.tensor([0.3, -2.5, 1.7, 2.0, -0.1], dtype=torch.float64)
    cases.append(("diag5", torch.diag(d), 2.5))
    rect = torch.zeros(7, 4, dtype=torch.float64)
    rect[:4, :4] = torch.diag(torch.tensor([1.0, -4.0, 3.5, 0.25], dtype=torch.float64))
    cases.append(("diag_tall", rect, 4.0))
    cases.append(("diag_wide", rect.T.contiguous(), 4.0))
    cases.append(("scalar", torch.tensor([[-3.25]], dtype=torch.float64), 3.25))
    # U diag(s) V^T with orthonormal U, V: singular values are exactly s
    for i, (m, n, s) in enumerate([
        (6, 6, [3.0, 2.0, 1.5, 1.0, 0.5, 0.1]),
        (10, 4, [0.7, 0.6, 0.2, 0.05]),
        (4, 10, [5.0, 1.0, 1.0, 0.0]),
        (8, 8, [2.0, 2.0, 2.0, 1.0, 0.5, 0.5, 0.1, 0.0]),  # repeated top singular value
        (12, 9, [1e-3, 9e-4, 1e-5]),  # rank 3, tiny scale
    ]):
        r = len(s)
        u, v = orthonormal(m, r, seed=10 + i), orthonormal(n, r, seed=20 + i)
        w = u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T
        cases.append((f"orth_diag_{m}x{n}_{i}", w, max(s)))
    # rank one: u v^T has norm |u| |v|
    u, v = randn(9, 1, seed=3), randn(1, 5, seed=4)
    cases.append(("rank_one", u @ v, float(u.norm() * v.norm())))
    return cases


KNOWN = _known_matrices()
RANDOM_SHAPES = [(1, 1), (1, 7), (7, 1), (5, 5), (20, 7), (7, 20), (3, 100), (64, 64), (48, 30)]


@pytest.mark.parametrize("case", KNOWN, ids=[c[0] for c in KNOWN])
def test_matrix_estimate_known(case):
    _, w, exact = case
    assert exact_norm(w) == pytest.approx(exact, rel=1e-12)  # the construction itself
    est = spectral.matrix_estimate(w, SET64)
    assert est.converged
    assert_estimate(est.sigma, exact, rel=1e-8)


@pytest.mark.parametrize("case", KNOWN, ids=[c[0] for c in KNOWN])
def test_gram_upper_bound_known(case):
    _, w, exact = case
    for estimate in (0.0, spectral.matrix_estimate(w, SET64).sigma):
        cert = spectral.gram_upper_bound(w, estimate)
        assert cert.value >= exact * (1 - 1e-12), (estimate, cert.value, exact)
        assert cert.value <= exact * (1 + 2e-3), (estimate, cert.value, exact)


@pytest.mark.parametrize("shape", RANDOM_SHAPES, ids=[f"{a}x{b}" for a, b in RANDOM_SHAPES])
def test_matrix_estimate_random(shape):
    w = randn(*shape, seed=sum(shape))
    exact = exact_norm(w)
    est = spectral.matrix_estimate(w, SET64)
    assert_estimate(est.sigma, exact)


@pytest.mark.parametrize("shape", RANDOM_SHAPES, ids=[f"{a}x{b}" for a, b in RANDOM_SHAPES])
def test_gram_upper_bound_random(shape):
    w = randn(*shape, seed=sum(shape))
    exact = exact_norm(w)
    for estimate in (0.0, spectral.matrix_estimate(w, SET64).sigma):
        cert = spectral.gram_upper_bound(w, estimate)
        assert cert.value >= exact * (1 - 1e-12), (estimate, cert.value, exact)
        assert cert.value <= exact * (1 + 2e-3), (estimate, cert.value, exact)


def test_matrix_estimate_float32_default_tol():
    w = randn(20, 12, seed=5)
    settings = spectral.Settings(seed=0, device="cpu", dtype=torch.float32)
    sigma = spectral.matrix_estimate(w, settings).sigma
    assert sigma == pytest.approx(exact_norm(w), rel=REL)


def test_batched_matrices_take_the_max():
    w = randn(4, 6, 5, seed=7)
    w[2] *= 3.0  # make one member clearly the largest
    exact = exact_norm(w)  # max over the batch
    assert_estimate(spectral.matrix_estimate(w, SET64).sigma, exact)
    cert = spectral.gram_upper_bound(w)
    assert exact * (1 - 1e-12) <= cert.value <= exact * (1 + 2e-3)


SCALES = [
    (torch.float64, 1e-20), (torch.float64, 1e20), (torch.float64, 1e-100), (torch.float64, 1e100),
    (torch.float32, 1e-6), (torch.float32, 1e6), (torch.float32, 1e-12), (torch.float32, 1e10),
]


@pytest.mark.parametrize("dtype,scale", SCALES, ids=[f"{str(d)[6:]}-{s:g}" for d, s in SCALES])
def test_scale_invariance(dtype, scale):
    """sigma(c W) = c sigma(W) for any finite scale the dtype can hold: the estimate of a
    non-zero finite matrix must be neither 0 nor NaN (entries, sigma and sigma**2 all fit)."""
    w = randn(9, 6, seed=11)
    exact = exact_norm(w) * scale
    settings = spectral.Settings(tol=1e-10 if dtype == torch.float64 else 1e-7, max_iters=2000,
                                 seed=0, device="cpu", dtype=dtype)
    est = spectral.matrix_estimate(w * scale, settings)
    assert est.sigma == pytest.approx(exact, rel=REL), (est, exact)
    cert = spectral.gram_upper_bound(w * scale)
    assert exact * (1 - 1e-12) <= cert.value <= exact * (1 + 2e-3)


def test_zero_matrix():
    w = torch.zeros(5, 3, dtype=torch.float64)
    assert spectral.matrix_estimate(w, SET64).sigma == 0.0
    assert spectral.gram_upper_bound(w).value == 0.0


@pytest.mark.parametrize("shape", [(1, 12), (3, 4), (2, 3, 2)])
def test_operator_estimate_of_explicit_matrix(shape):
    n = math.prod(shape)
    w = randn(n + 3, n, seed=n)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return w.to(x.dtype) @ x.reshape(-1)

    assert_estimate(spectral.operator_estimate(fn, shape, SET64).sigma, exact_norm(w))


# --------------------------------------------------------------------------- 2. conv layers

CONV_CASES = lt.conv_layer_cases()
CONV_BY_NAME = {name: (module, shape) for name, module, shape in CONV_CASES}
CONV_IDS = [name for name, _, _ in CONV_CASES]


@functools.cache
def conv_case(name: str):
    """(the single conv row, exact norm of the bias-free module, report)."""
    module, shape = CONV_BY_NAME[name]
    rep = analyze(module, shape)
    rows = rows_of(rep, "Conv", "ConvTranspose")
    assert len(rows) == 1, [(r.name, r.op) for r in rep.layers]
    return rows[0], module_norm(module, shape), rep


def spectral_norm_matrix(module: nn.Module) -> torch.Tensor:
    """The matrix torch.nn.utils.spectral_norm normalises by: dim 0 for Conv,
    dim 1 for ConvTranspose, moved to the front, the rest flattened."""
    w = module.weight.detach().to(torch.float64)
    dim = 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
    w = w.movedim(dim, 0)
    return w.reshape(w.shape[0], -1)


def pad_copies(mode: str, size: int, pad: int) -> int:
    """Brute-force max copy count of one input along one axis (numpy's pad modes)."""
    src = np.pad(np.arange(size), (pad, pad), mode=mode)
    return int(np.bincount(src, minlength=size).max())


@pytest.mark.parametrize("name", CONV_IDS)
def test_conv_sigma_is_exact_norm(name):
    row, exact, _ = conv_case(name)
    assert_estimate(row.sigma, exact)


@pytest.mark.parametrize("name", CONV_IDS)
def test_conv_sigma_upper_is_certified(name):
    row, exact, rep = conv_case(name)
    assert_certificate(row.sigma_upper, exact)
    assert_certificate(row.lipschitz, exact)
    # a single conv layer is a linear map: the network bound must hold too
    assert rep.network.bounded
    assert_certificate(rep.network.lipschitz_bound, exact)


@pytest.mark.parametrize("name", CONV_IDS)
def test_conv_sigma_matrix_is_reshaped_weight_norm(name):
    row, _, _ = conv_case(name)
    module, _ = CONV_BY_NAME[name]
    assert row.sigma_matrix == pytest.approx(exact_norm(spectral_norm_matrix(module)), rel=REL)


@pytest.mark.parametrize("name", CONV_IDS)
def test_conv_reshape_upper_bound_holds(name):
    """sqrt(taps) * min(||wide||, ||tall||) bounds any zero-padded conv (and, being
    an adjoint, any conv transpose); other padding modes add sqrt(copy count)."""
    module, shape = CONV_BY_NAME[name]
    exact = module_norm(module, shape)
    cert = spectral.conv_reshape_upper_bound(module.weight.detach(), module.groups)
    mode = getattr(module, "padding_mode", "zeros")
    mult = 1
    if mode != "zeros":
        np_mode = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}[mode]
        for size, pad in zip(shape[2:], module.padding):
            mult *= pad_copies(np_mode, size, pad)
    assert_certificate(cert.value * math.sqrt(mult), exact)


# --------------------------------------------------------------------------- 3. FFT


def circular_conv_singular_values_numpy(w: np.ndarray, grid: tuple[int, ...],
                                        dilation: tuple[int, ...], groups: int) -> np.ndarray:
    """All singular values of the circular convolution on ``grid`` by an explicit DFT.

    y_o[n] = sum_{c,t} w[o,c,t] x_c[n + d*t mod N] is diagonalised by the DFT: at
    frequency f its (out x in) block is M(f)[o,c] = sum_t w[o,c,t] exp(2 pi i <f, d*t / N>).
    Grouped convs have block-diagonal M(f).
    """
    rows, cols_g = w.shape[:2]
    kernel = w.shape[2:]
    rows_g = rows // groups
    svals = []
    for freq in itertools.product(*[range(n) for n in grid]):
        m = np.zeros((rows, cols_g * groups), dtype=np.complex128)
        for tap in itertools.product(*[range(k) for k in kernel]):
            phase = sum(freq[i] * dilation[i] * tap[i] / grid[i] for i in range(len(grid)))
            coeff = np.exp(2j * np.pi * phase)
            for g in range(groups):
                r = slice(g * rows_g, (g + 1) * rows_g)
                c = slice(g * cols_g, (g + 1) * cols_g)
                m[r, c] += coeff * w[(r, slice(None), *tap)]
        svals.append(np.linalg.svd(m, compute_uv=False))
    return np.sort(np.concatenate(svals))


def circular_conv_fn(weight: torch.Tensor, dilation: tuple[int, ...], groups: int):
    d = weight.ndim - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    flat: list[int] = []
    for i in reversed(range(d)):
        p = dilation[i] * (weight.shape[2 + i] - 1) // 2
        flat += [p, p]

    def fn(x: torch.Tensor) -> torch.Tensor:
        return conv(F.pad(x, flat, mode="circular"), weight, dilation=dilation, groups=groups)

    return fn


FFT_CASES = [
    # (id, out, in_per_group, kernel, grid, dilation, groups)
    ("2d_k3_n6", 3, 2, (3, 3), (6, 6), (1, 1), 1),
    ("2d_k5_n7", 2, 3, (5, 5), (7, 7), (1, 1), 1),
    ("2d_k3_n5x8", 4, 2, (3, 3), (5, 8), (1, 1), 1),
    ("2d_k1_n4", 3, 5, (1, 1), (4, 4), (1, 1), 1),
    ("2d_k3_dil2_n7", 2, 2, (3, 3), (7, 7), (2, 2), 1),
    ("2d_k3_groups2_n5", 4, 2, (3, 3), (5, 5), (1, 1), 2),
    ("1d_k3_n9", 3, 2, (3,), (9,), (1,), 1),
    ("3d_k3_n4", 2, 2, (3, 3, 3), (4, 4, 4), (1, 1, 1), 1),
]


@pytest.mark.parametrize("case", FFT_CASES, ids=[c[0] for c in FFT_CASES])
def test_circular_conv_singular_values_match_dft(case):
    _, out, cin_g, kernel, grid, dilation, groups = case
    w = randn(out, cin_g, *kernel, seed=len(grid) * 100 + out)
    ref = circular_conv_singular_values_numpy(w.numpy(), grid, dilation, groups)
    fn = circular_conv_fn(w, dilation, groups)
    mat = jacobian_matrix(fn, (1, cin_g * groups, *grid))
    svals = torch.linalg.svdvals(mat).numpy()
    # the DFT blocks hold every singular value of the explicit matrix (plus zeros when
    # the matrix is wide): compare the largest min(rows, cols) of both
    n = min(mat.shape)
    np.testing.assert_allclose(np.sort(svals)[-n:], ref[-n:], rtol=1e-9, atol=1e-12)

    # the certificate is never below the exact norm
    exact = float(ref.max())
    cert = spectral.conv_fft_upper_bound(w, grid=grid, dilation=dilation, groups=groups)
    assert_certificate(cert.value, exact)


@pytest.mark.parametrize("case", FFT_CASES, ids=[c[0] for c in FFT_CASES])
def test_conv_fft_upper_bound_is_exact(case):
    """On its own grid the FFT bound is the circular conv's norm, up to the certificate's
    candidate gap (CERT_GAP) and CERT_SAFETY."""
    _, out, cin_g, kernel, grid, dilation, groups = case
    w = randn(out, cin_g, *kernel, seed=len(grid) * 100 + out)
    exact = float(circular_conv_singular_values_numpy(w.numpy(), grid, dilation, groups).max())
    cert = spectral.conv_fft_upper_bound(w, grid=grid, dilation=dilation, groups=groups)
    slack = SAFETY * (1 + spectral.CERT_GAP) * (1 + 1e-9)
    assert exact * (1 - 1e-9) <= cert.value <= exact * slack, (cert.value, exact)


@pytest.mark.parametrize("n", [5, 6, 8])
def test_circular_conv_module_analysed_exactly(n):
    """A Conv2d with circular padding (k-1)/2 is a circular conv: its row is its norm."""
    lt.seeded(3)
    module = nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", bias=False).eval()
    w = module.weight.detach().to(torch.float64)
    exact = float(circular_conv_singular_values_numpy(w.numpy(), (n, n), (1, 1), 1).max())
    assert module_norm(module, (1, 2, n, n)) == pytest.approx(exact, rel=1e-9)
    rep = analyze(module, (1, 2, n, n))
    assert_certificate(rep.network.lipschitz_bound, exact)
    (row,) = rows_of(rep, "Conv")
    assert_certificate(row.sigma_upper, exact)
    assert_estimate(row.sigma, exact)


# --------------------------------------------------------------------------- 4. linear layers


def _linear_rows(rep):
    return rows_of(rep, "Gemm", "MatMul", kind="linear")


def test_mlp_linear_rows():
    model, shape = lt.make_mlp()
    rep = analyze(model, shape)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    exacts = [exact_norm(m.weight.detach()) for m in linears]
    rows = _linear_rows(rep)
    assert_matches_multiset([r.sigma for r in rows], exacts)
    for r, e in zip(sorted(rows, key=lambda r: r.sigma), sorted(exacts)):
        assert_estimate(r.sigma, e)
        assert e * (1 - 1e-12) <= r.sigma_upper <= e * (1 + 2e-3)


def test_mlp_linear_rows_default_float32():
    model, shape = lt.make_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = lipcheck.analyze(model, shape, device="cpu")
    exacts = [exact_norm(m.weight.detach()) for m in model.modules() if isinstance(m, nn.Linear)]
    rows = _linear_rows(rep)
    assert_matches_multiset([r.sigma for r in rows], exacts)
    assert_matches_multiset([r.sigma_upper for r in rows], exacts, rel=2e-3)
    for r, e in zip(sorted(rows, key=lambda r: r.sigma_upper), sorted(exacts)):
        assert_certificate(r.sigma_upper, e)


LINEAR_MODELS = [
    ("gemm", lambda: nn.Sequential(nn.Linear(7, 5)), (1, 7)),
    ("no_bias", lambda: nn.Sequential(nn.Linear(7, 5, bias=False)), (1, 7)),
    ("seq_input", lambda: nn.Sequential(nn.Linear(8, 6)), (1, 4, 8)),
    ("to_scalar", lambda: nn.Sequential(nn.Linear(9, 1)), (1, 9)),
    ("from_scalar", lambda: nn.Sequential(nn.Linear(1, 6)), (1, 1)),
    ("wide", lambda: nn.Sequential(nn.Linear(40, 3)), (1, 40)),
]


@pytest.mark.parametrize("case", LINEAR_MODELS, ids=[c[0] for c in LINEAR_MODELS])
def test_single_linear(case):
    _, factory, shape = case
    lt.seeded(1)
    model = factory().eval()
    exact = exact_norm(model[0].weight.detach())
    # the module's own Jacobian has the same norm (copies over a sequence: block diagonal)
    assert module_norm(model, shape) == pytest.approx(exact, rel=1e-10)
    rep = analyze(model, shape)
    (row,) = _linear_rows(rep)
    assert_estimate(row.sigma, exact)
    assert exact * (1 - 1e-12) <= row.sigma_upper <= exact * (1 + 2e-3)
    assert rep.network.bounded and rep.network.certified
    assert exact * (1 - 1e-12) <= rep.network.lipschitz_bound <= exact * (1 + 2e-3)


def test_attention_projection_rows():
    model, shape = lt.make_attention()
    rep = analyze(model, shape)
    exacts = {n: exact_norm(getattr(model, n).weight.detach()) for n in "qkvo"}
    rows = _linear_rows(rep)
    assert len(rows) == 4, [(r.name, r.op) for r in rows]
    assert_matches_multiset([r.sigma for r in rows], list(exacts.values()))
    for r in rows:
        e = min(exacts.values(), key=lambda v: abs(v - r.sigma))
        assert_estimate(r.sigma, e)
        assert_certificate(r.sigma_upper, e)
    # q k^T is a product of two activations: dot-product attention is not globally Lipschitz
    assert not rep.network.bounded


# torch gate order within weight_ih_l0 / weight_hh_l0, by ONNX gate letter
LSTM_GATES = {"i": 0, "f": 1, "c": 2, "o": 3}  # torch: i, f, g(=c), o
GRU_GATES = {"r": 0, "z": 1, "h": 2}  # torch: r, z, n(=h)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_recurrent_gate_rows(cell):
    model, shape = (lt.make_lstm if cell == "lstm" else lt.make_gru)()
    rnn = model.rnn
    gates = LSTM_GATES if cell == "lstm" else GRU_GATES
    hidden = rnn.hidden_size
    rep = analyze(model, shape)
    rows = [r for r in rep.layers if r.kind == "recurrent"]
    assert len(rows) == 2 * len(gates), [r.name for r in rows]
    seen = set()
    for r in rows:
        _, label, direction, gate = r.name.rsplit(".", 3)
        assert direction == "dir0"
        mats = {"W": rnn.weight_ih_l0, "R": rnn.weight_hh_l0}[label].detach()
        g = gates[gate]
        exact = exact_norm(mats[g * hidden : (g + 1) * hidden])
        assert_estimate(r.sigma, exact)
        assert exact * (1 - 1e-12) <= r.sigma_upper <= exact * (1 + 2e-3)
        seen.add((label, gate))
    assert seen == {(lab, g) for lab in "WR" for g in gates}
    # the Linear head after the recurrent layer
    (head,) = _linear_rows(rep)
    assert_estimate(head.sigma, exact_norm(model.head.weight.detach()))


def _bn_exact(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """max |gamma / sqrt(var + eps)|, with eps as the float32 the model computes with
    (and ONNX stores: its epsilon attribute is a float32)."""
    gamma = bn.weight.detach().to(torch.float64)
    var = bn.running_var.to(torch.float64)
    eps = float(np.float32(bn.eps))
    return float((gamma.abs() / torch.sqrt(var + eps)).max())


BN_MODELS = [
    ("bn2d_first", lambda: nn.Sequential(nn.BatchNorm2d(3, eps=1e-3), nn.Conv2d(3, 4, 3)), (1, 3, 5, 5)),
    ("bn1d_after_linear", lambda: nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)), (1, 6)),
    ("bn2d_alone", lambda: nn.Sequential(nn.BatchNorm2d(4, eps=0.1)), (1, 4, 3, 3)),
]


@pytest.mark.parametrize("case", BN_MODELS, ids=[c[0] for c in BN_MODELS])
def test_batchnorm_rows_exact(case):
    _, factory, shape = case
    lt.seeded(2)
    model = lt.randomize_batchnorm(factory()).eval()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    rep = analyze(model, shape)
    rows = rows_of(rep, "BatchNormalization")
    assert len(rows) == len(bns)
    for r, bn in zip(rows, bns):
        exact = _bn_exact(bn)
        assert r.sigma == pytest.approx(exact, rel=1e-12)
        assert r.sigma_upper == pytest.approx(exact, rel=1e-12)
    if len(bns) == 1 and len(list(model.children())) == 1:
        # BN alone: a diagonal map, its Jacobian norm is the same number
        # (the float64 module adds eps unrounded: agree to float32 precision of eps)
        assert module_norm(model, shape) == pytest.approx(_bn_exact(bns[0]), rel=1e-8)


def test_cnn_batchnorm_rows_exact():
    model, shape = lt.make_cnn()
    rep = analyze(model, shape)
    exacts = [_bn_exact(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for r in rows_of(rep, "BatchNormalization"):
        assert any(r.sigma == pytest.approx(e, rel=1e-12) for e in exacts), (r.sigma, exacts)


LINEAR_CHAINS = [
    ("linear_linear", lambda: nn.Sequential(nn.Linear(6, 9), nn.Linear(9, 4)), (1, 6)),
    ("conv_bn_conv", lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3),
                                           nn.Conv2d(3, 2, 3, stride=2)), (1, 2, 6, 6)),
]


@pytest.mark.parametrize("case", LINEAR_CHAINS, ids=[c[0] for c in LINEAR_CHAINS])
def test_network_bound_of_linear_chain(case):
    """Without activations the whole network is one affine map: the certified network
    bound must be at least that map's exact norm."""
    _, factory, shape = case
    lt.seeded(4)
    model = lt.randomize_batchnorm(factory()).eval()
    exact = module_norm(model, shape)
    rep = analyze(model, shape)
    assert rep.network.bounded and rep.network.certified
    assert_certificate(rep.network.lipschitz_bound, exact)


# --------------------------------------------------------------------------- 5. pads and pools


@pytest.mark.parametrize("mode", ["reflect", "edge", "wrap"])
def test_pad_multiplicity_brute_force(mode):
    for size in range(1, 8):
        for begin, end in itertools.product(range(0, 9), repeat=2):
            src = np.pad(np.arange(size), (begin, end), mode=mode)
            brute = int(np.bincount(src, minlength=size).max())
            got = spectral.pad_multiplicity(mode, size, begin, end)
            assert got == brute, (mode, size, begin, end, got, brute)
            # unknown size: must bound every size
            assert spectral.pad_multiplicity(mode, None, begin, end) >= brute


def test_pad_multiplicity_constant_is_one():
    for size, begin, end in itertools.product([None, 1, 3, 6], range(4), range(4)):
        assert spectral.pad_multiplicity("constant", size, begin, end) == 1


@pytest.mark.parametrize("mode", ["reflect", "edge", "wrap"])
def test_pad_operator_norm_is_sqrt_multiplicity(mode):
    """||P|| = sqrt(prod over axes of the max copy count), checked on explicit matrices."""
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    for (h, w), (pt, pb, pl, pr) in itertools.product(
        [(3, 4), (5, 5), (2, 6)], [(1, 0, 0, 1), (2, 1, 1, 2), (0, 2, 2, 0), (1, 1, 1, 1)]
    ):
        if torch_mode == "reflect" and max(pt, pb) >= h or torch_mode == "reflect" and max(pl, pr) >= w:
            continue
        if torch_mode == "circular" and (max(pt, pb) > h or max(pl, pr) > w):
            continue

        def fn(x: torch.Tensor, flat=(pl, pr, pt, pb)) -> torch.Tensor:
            return F.pad(x, flat, mode=torch_mode)

        exact = exact_norm(jacobian_matrix(fn, (1, 1, h, w)))
        mult = spectral.pad_multiplicity(mode, h, pt, pb) * spectral.pad_multiplicity(mode, w, pl, pr)
        assert math.sqrt(mult) == pytest.approx(exact, rel=1e-12), (mode, h, w, pt, pb, pl, pr)
        # the padding map lipcheck itself builds
        pad_fn = spectral.pad_forward([(pt, pb), (pl, pr)], mode)
        assert exact_norm(jacobian_matrix(pad_fn, (1, 1, h, w))) == pytest.approx(exact, rel=1e-12)


AVG_POOLS = [
    # (id, pool fn kwargs, dims, input spatial)
    ("k2s2", dict(kernel_size=2, stride=2), 2, (6, 6)),
    ("k3s1", dict(kernel_size=3, stride=1), 2, (6, 5)),
    ("k3s2p1", dict(kernel_size=3, stride=2, padding=1), 2, (6, 6)),
    ("k3s2p1_nocount", dict(kernel_size=3, stride=2, padding=1, count_include_pad=False), 2, (6, 6)),
    ("k3s1p1_nocount", dict(kernel_size=3, stride=1, padding=1, count_include_pad=False), 2, (5, 5)),
    ("k2s2_ceil", dict(kernel_size=2, stride=2, ceil_mode=True), 2, (5, 5)),
    ("k3s2_ceil_p1", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), 2, (6, 6)),
    ("1d_k4s3", dict(kernel_size=4, stride=3), 1, (11,)),
    ("3d_k2s1", dict(kernel_size=2, stride=1), 3, (3, 4, 3)),
]
AVG_IDS = [c[0] for c in AVG_POOLS]


def _avg_pool_fn(kwargs, dims):
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]
    return lambda x: pool(x, **kwargs)


@pytest.mark.parametrize("case", AVG_POOLS, ids=AVG_IDS)
def test_schur_bounds_avg_pool(case):
    _, kwargs, dims, spatial = case
    shape = (1, 2, *spatial)
    fn = _avg_pool_fn(kwargs, dims)
    exact = exact_norm(jacobian_matrix(fn, shape))
    cert = spectral.schur_upper_bound(fn, shape)
    assert cert.value >= exact * (1 - 1e-12), (cert.value, exact)


@pytest.mark.parametrize("k", [2, 3])
def test_schur_is_tight_for_disjoint_windows(k):
    """Non-overlapping full windows: every row and column sum is constant, Schur is exact."""
    shape = (1, 1, 3 * k, 2 * k)
    fn = _avg_pool_fn(dict(kernel_size=k, stride=k), 2)
    exact = exact_norm(jacobian_matrix(fn, shape))
    assert exact == pytest.approx(1 / k, rel=1e-12)  # (1/k^2) * sqrt(k^2) per output
    cert = spectral.schur_upper_bound(fn, shape)
    assert exact * (1 - 1e-12) <= cert.value <= exact * SAFETY * (1 + 1e-12)


_AVG_MODULES = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


@pytest.mark.parametrize("case", AVG_POOLS, ids=AVG_IDS)
def test_average_pool_row(case):
    """The AveragePool row of an analysed model is certified (and exact when estimated)."""
    _, kwargs, dims, spatial = case
    shape = (1, 2, *spatial)
    model = nn.Sequential(_AVG_MODULES[dims](**kwargs)).eval()
    exact = module_norm(model, shape)
    rep = analyze(model, shape)
    (row,) = rows_of(rep, "AveragePool")
    assert_certificate(row.sigma_upper, exact)
    if row.sigma is not None:
        assert_estimate(row.sigma, exact)
    assert rep.network.bounded
    assert_certificate(rep.network.lipschitz_bound, exact)


def test_global_average_pool_exact():
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1)).eval()
    shape = (1, 3, 4, 5)
    exact = module_norm(model, shape)
    assert exact == pytest.approx(1 / math.sqrt(20), rel=1e-12)
    rep = analyze(model, shape)
    (row,) = rows_of(rep, "GlobalAveragePool", "ReduceMean")
    assert row.sigma == pytest.approx(exact, rel=1e-12)
    assert row.sigma_upper == pytest.approx(exact, rel=1e-12)
