"""Certified upper bounds on the largest singular value, all computed in float64.

A certificate holds whatever the spectrum looks like: Cholesky-verified candidates for
matrices and for the per-frequency matrices of a circular convolution (Sedghi et al. 2019),
a polyphase kernel for strided convolutions, a size-independent bound from the reshaped
kernel, and the Schur test for maps with non-negative entries.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .estimate import Estimate, matrix_estimate, start_vector, top_converged
from .maps import LinearMap, Shape, conv_group_matrices, conv_out_len, matrix_batch
from .settings import Settings, one_thread

# Certificates are computed in float64. Rounding in a float64 matmul/FFT chain of
# the sizes seen in networks is below 1e-9 relative; this factor covers it with room.
CERT_SAFETY = 1.0 + 1e-6
UNIT_ROUNDOFF = torch.finfo(torch.float64).eps / 2  # u in the rounding margins below

# A certificate is proven at (1 + CERT_GAP) times the best lower bound found, so it is that
# tight (plus rounding margins); see SigmaMaxBound.
CERT_GAP = 1e-7
CERT_MAX_ROUNDS = 8  # Cholesky rounds before the exact-eigenvalue / Gram-iteration fallback
CERT_EIG_BATCH = 4  # exact top eigenvalues computed per failed round
CERT_POWER_STEPS = 8  # batched power steps for the first candidate
FREQ_CHUNK_BYTES = 1 << 23  # kernel-DFT matrices held at once by the FFT certificate (about 6x this is scratch)
GRAM_MAX_STEPS = 14  # squarings of the Gram-iteration fallback
# Convs whose per-group explicit matrices are this small are measured exactly
# (conv_explicit_bounds): the Gram side, the flops of all groups, the bytes of one batch.
EXPLICIT_MAX_SIDE = 1024
EXPLICIT_MAX_FLOPS = 3e9
EXPLICIT_CHUNK_BYTES = 1 << 25


@dataclass(frozen=True)
class Certificate:
    """A proven upper bound on the largest singular value, and how it was obtained."""

    value: float
    method: str


# --------------------------------------------------------------------------- batches of matrices


class SigmaMaxBound:
    """A certified upper bound on the max of sigma_max over matrices fed in batches.

    A candidate t is proven an upper bound on lambda_max(AᴴA) for a batch of matrices by
    Cholesky factorisations of t I - AᴴA (one per matrix, float64): a Hermitian matrix with
    a Cholesky factor is positive definite, so every eigenvalue of AᴴA is below t. The
    candidate starts at (1 + CERT_GAP)² times the best lower bound known (the caller's
    estimate, batched power-iteration Rayleigh quotients); a matrix whose factorisation
    fails gets its exact top eigenvalue (``eigvalsh``, a few matrices at a time, largest
    Rayleigh quotient first), t is raised and only the failed matrices are checked again.
    Since t only grows, a matrix verified once stays verified. The result is
    within CERT_GAP (plus the rounding margin) of the true max.

    Cost per n x n Gram matrix: one product (m n² multiply-adds) and one factorisation
    (n³/3), against several n³ squarings for Gram iteration to the same tightness.

    Rounding: the computed Gram matrix differs from AᴴA by at most 2(m+2)u·tr(AᴴA) in
    norm (``add``; ``add_gram`` callers pass their own bound), and a successful
    floating-point Cholesky of t I - G proves t I - G + E positive definite with
    ||E|| <= 2(n+2)u·(n t + tr(G)) (Demmel's backward error, bounded by the trace of the
    factored matrix). Both are added to t before the square root; they are around 1e-10
    relative for network-sized layers, and CERT_SAFETY covers the rounding of the
    matrices' own entries (kernel DFT).
    """

    def __init__(self, estimate: float = 0.0) -> None:
        est = estimate if math.isfinite(estimate) and estimate > 0 else 0.0
        self._t = (est * (1 + CERT_GAP)) ** 2  # the candidate for lambda_max, unscaled
        self._margin = 0.0

    def add(self, mats: torch.Tensor) -> None:
        a = mats.to(torch.complex128 if mats.is_complex() else torch.float64)
        if a.shape[-2] < a.shape[-1]:
            a = a.mH  # the Gram matrix of the smaller side
        if a.numel() == 0:
            return
        lo, hi = torch.aminmax(torch.view_as_real(a) if a.is_complex() else a)  # max |entry|, no |a| copy
        scale = max(-float(lo), float(hi))
        if scale == 0.0:
            return
        a = a / scale  # entries <= 1: no overflow in the products; undone below
        g = a.mH @ a
        tr_max = float(torch.diagonal(g, dim1=-2, dim2=-1).real.sum(-1).max())
        self.add_gram(g, 2 * (a.shape[-2] + 2) * UNIT_ROUNDOFF * tr_max, scale**2)

    def add_gram(self, g: torch.Tensor, gram_error: float = 0.0, unit: float = 1.0) -> None:
        """Hermitian positive semi-definite ``g`` (B, n, n), in units of ``unit``, computed
        to within ``gram_error`` (spectral norm, same units) of the true Gram matrices."""
        if g.numel() == 0:
            return
        n = g.shape[-1]
        t = self._t / unit
        low = _rayleigh_lower_bounds(g)
        t = max(t, float(low.max()) * (1 + CERT_GAP) ** 2)
        pending = torch.arange(g.shape[0], device=g.device)
        for _ in range(CERT_MAX_ROUNDS):
            shifted = (g if pending.numel() == g.shape[0] else g[pending]).neg()
            shifted.diagonal(dim1=-2, dim2=-1).add_(t)
            info = torch.linalg.cholesky_ex(shifted).info
            del shifted
            failed = pending[info != 0]
            if failed.numel() == 0:
                break
            # exact top eigenvalues of the failed matrices with the largest lower bounds
            worst = failed[torch.argsort(low[failed], descending=True)[:CERT_EIG_BATCH]]
            top = torch.linalg.eigvalsh(g[worst])[:, -1]
            t = max(t, float(top.max()) * (1 + CERT_GAP) ** 2)
            pending = failed
        else:
            # not verified in CERT_MAX_ROUNDS rounds (pathological rounding): exact
            # eigenvalues of what is left, then Gram iteration on G as the final word
            t = max(t, float(torch.linalg.eigvalsh(g[pending])[:, -1].max()))
            t = max(t, _gram_iteration_bound(g[pending]))
        tr_max = float(torch.diagonal(g, dim1=-2, dim2=-1).real.sum(-1).max())
        margin = gram_error + 2 * (n + 2) * UNIT_ROUNDOFF * (n * t + tr_max)
        self._t = t * unit
        self._margin = max(self._margin, margin * unit)

    def value(self) -> float:
        return math.sqrt(self._t + self._margin) * CERT_SAFETY


def _rayleigh_lower_bounds(g: torch.Tensor) -> torch.Tensor:
    """Rayleigh quotients xᴴGx for unit x after CERT_POWER_STEPS batched power steps: each
    is a lower bound on lambda_max of its Hermitian G (seeded start, the same for every
    matrix)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((g.shape[-1], 1), generator=gen, dtype=torch.float64)
    x = (x / torch.linalg.vector_norm(x)).to(device=g.device, dtype=g.dtype)  # unit, even after 0 steps
    x = x.expand(g.shape[0], -1, -1)
    for _ in range(CERT_POWER_STEPS):
        x = g @ x
        x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp_min(1e-300)
    return (x.mH @ (g @ x)).real.reshape(-1).clamp_min(0.0)


def _gram_iteration_bound(mats: torch.Tensor) -> float:
    """Certified max over a batch of sigma_max by Gram iteration (the fallback).

    Delattre, Barthélemy, Araujo, Allauzen, "Efficient Bound of Lipschitz Constant for
    Convolutional Layers by Gram Iteration", ICML 2023. With G_0 = W and G_{t+1} = G_tᴴ G_t,
    sigma_max(W) = sigma_max(G_t)^(1/2^t) <= ||G_t||_F^(1/2^t); each G_t is renormalised to
    unit Frobenius norm and the scale kept as a log.
    """
    h = mats
    log_scale = torch.zeros(h.shape[0], dtype=torch.float64, device=h.device)
    bound = torch.zeros(h.shape[0], dtype=torch.float64, device=h.device)
    for t in range(GRAM_MAX_STEPS + 1):
        f = torch.linalg.matrix_norm(h, "fro").real.to(torch.float64).clamp_min(1e-300)
        h = h / f.to(h.dtype)[:, None, None]
        log_scale = log_scale + torch.log(f)
        bound = torch.exp(log_scale / 2**t)
        if t < GRAM_MAX_STEPS:
            h = h.mH @ h
            log_scale = log_scale * 2
    return float(bound.max()) if bound.numel() else 0.0


def gram_upper_bound(weight: torch.Tensor, estimate: float = 0.0) -> Certificate:
    """Certified sigma_max of a matrix (or the max over a batch of them).

    ``estimate`` (a lower bound, e.g. the Lanczos or power estimate) is the first candidate
    bound tried; see ``SigmaMaxBound`` for how a candidate is proven.
    """
    w = weight.detach().to(dtype=torch.float64)
    if w.numel() == 0:  # before the reshape: -1 is ambiguous for 0 elements
        return Certificate(0.0, "cholesky")
    w = matrix_batch(w)
    if not bool(torch.isfinite(w).all()):
        return Certificate(math.nan, "cholesky")
    acc = SigmaMaxBound(estimate)
    acc.add(w)
    return Certificate(acc.value(), "cholesky")


# --------------------------------------------------------------------------- convolutions


def conv_fft_upper_bound(
    weight: torch.Tensor, grid: Sequence[int], dilation: Sequence[int], groups: int,
    estimate: float = 0.0,
) -> Certificate:
    """Exact norm of the circular convolution on ``grid`` with this kernel (certified).

    Sedghi, Gupta, Long, "The Singular Values of Convolutional Layers", ICLR 2019:
    a circular convolution is block-diagonalised by the DFT, so its norm is the
    max over frequencies w of sigma_max(A(w)), A(w) = sum_t K_t exp(-i w.p_t) the (out x in)
    matrix of kernel DFTs (K_t the tap at offset p_t). A zero-padded (strided) convolution
    whose padded input fits in ``grid`` without any tap wrapping around is that circular
    convolution restricted to an embedded input and followed by a selection of outputs, so
    this bounds it. ``weight`` is (rows, cols/groups, *kernel); groups are blocks of rows.

    Each frequency's Gram matrix is a short sum of the per-offset tap products of
    ``_tap_pair_grams``, formed in chunks of frequencies (memory stays bounded on large
    grids). A real kernel's spectrum is conjugate-symmetric: only the half-spectrum is visited.
    """
    w = weight.detach().to(dtype=torch.float64)
    rows, cols_g = w.shape[0], w.shape[1]
    k = w.shape[2:]
    d = len(k)
    if w.numel() == 0:
        return Certificate(0.0, "fft")
    if not bool(torch.isfinite(w).all()):
        return Certificate(math.nan, "fft")
    scale = float(w.abs().amax())
    if scale == 0.0:
        return Certificate(0.0, "fft")
    taps = list(itertools.product(*[range(n) for n in k]))
    pos = [tuple(t[i] * dilation[i] for i in range(d)) for t in taps]
    rows_g = rows // groups
    # (groups, T, rows_g, cols_g), scaled to max |entry| = 1
    kern = (w / scale).reshape(groups, rows_g, cols_g, len(taps)).permute(0, 3, 1, 2)
    if rows_g < cols_g:  # the Gram matrix of the smaller side: A Aᴴ = sum K_t K_t'ᵀ e^(-i w.(p_t - p_t'))
        kern = kern.transpose(-2, -1)
        pos = [tuple(-v for v in p) for p in pos]
    n = kern.shape[-1]
    deltas, gram_by_offset = _tap_pair_grams(kern, pos)
    # rounding of the tap products and of the sums over offsets, per Gram entry at most
    # (rows_g + 2 T^2) u |K|ᵀ|K| summed over pairs: in norm <= that times (sum_t ||K_t||_F)^2
    tap_fro = torch.linalg.matrix_norm(kern, "fro").sum(dim=1).max()
    gram_error = 2 * (kern.shape[-2] + 2 * len(taps) ** 2 + 4) * UNIT_ROUNDOFF * float(tap_fro) ** 2

    axes = [torch.arange(g, dtype=torch.float64, device=w.device) for g in grid[:-1]]
    axes.append(torch.arange(grid[-1] // 2 + 1, dtype=torch.float64, device=w.device))
    freqs = torch.cartesian_prod(*axes).reshape(-1, d)  # (F, d)
    inv_n = torch.tensor([1.0 / g for g in grid], dtype=torch.float64, device=w.device)
    acc = SigmaMaxBound(estimate / scale)
    chunk = max(1, FREQ_CHUNK_BYTES // (groups * n * n * 16))
    for start in range(0, freqs.shape[0], chunk):
        phase = -2.0 * math.pi * freqs[start : start + chunk] @ (deltas * inv_n).T  # (Fc, NΔ)
        g = torch.complex(torch.cos(phase) @ gram_by_offset, torch.sin(phase) @ gram_by_offset)
        acc.add_gram(g.reshape(-1, n, n), gram_error)
    return Certificate(acc.value() * scale, "fft")


def _tap_pair_grams(kern: torch.Tensor, pos: Sequence[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The real tap products of A(w)ᴴA(w), summed per tap offset: (offsets (NΔ, d), float64;
    their summed products (NΔ, groups * n * n)) for ``kern`` (groups, T, m, n) with taps at ``pos``.

    A(w)ᴴA(w) = sum over tap pairs of K_tᵀK_t' exp(-i w.(p_t' - p_t)), so the T(T+1)/2
    products K_tᵀK_t' are formed once (the pair (t', t) is the transpose of (t, t')) and
    each frequency's Gram matrix is then the phase-weighted sum of these blocks.
    """
    d = len(pos[0])
    offsets: dict[tuple[int, ...], int] = {}
    blocks: list[torch.Tensor] = []

    def accumulate(delta: tuple[int, ...], block: torch.Tensor) -> None:
        if delta in offsets:
            blocks[offsets[delta]] += block
        else:
            offsets[delta] = len(blocks)
            blocks.append(block.clone())

    for i in range(len(pos)):
        prods = kern[:, i].transpose(-2, -1).unsqueeze(1) @ kern[:, i:]  # (groups, T-i, n, n)
        for j in range(i, len(pos)):
            delta = tuple(pos[j][e] - pos[i][e] for e in range(d))
            block = prods[:, j - i]
            accumulate(delta, block)
            if j != i:
                accumulate(tuple(-v for v in delta), block.transpose(-2, -1))
    gram_by_offset = torch.stack(blocks).reshape(len(blocks), -1)  # (NΔ, groups*n*n), real
    deltas = torch.tensor(list(offsets), dtype=torch.float64, device=kern.device).reshape(-1, d)
    return deltas, gram_by_offset


def polyphase_kernel(weight: torch.Tensor, stride: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """The stride-1 kernel equivalent to a strided, dilated one on phase-split input.

    With tap offset d*t = s*q + r, y[i] = sum_t W_t x[s*i + d*t] = sum_q K'_q x_r[i + q], where
    x_r[m] = x[s*m + r] are the s**D phases of x stacked as input channels (an isometric
    rearrangement). Returns K' of shape (rows, cols * prod(s), *q_extent), channel-major.
    """
    rows, cols = weight.shape[0], weight.shape[1]
    k = weight.shape[2:]
    d = len(k)
    q_ext = [((k[i] - 1) * dilation[i]) // stride[i] + 1 for i in range(d)]
    phases = math.prod(stride)
    out = torch.zeros((rows, cols, phases, *q_ext), dtype=weight.dtype, device=weight.device)
    for tap in itertools.product(*[range(n) for n in k]):
        pos = [tap[i] * dilation[i] for i in range(d)]
        q = [pos[i] // stride[i] for i in range(d)]
        r = [pos[i] % stride[i] for i in range(d)]
        r_flat = 0
        for i in range(d):
            r_flat = r_flat * stride[i] + r[i]
        out[(slice(None), slice(None), r_flat, *q)] = weight[(slice(None), slice(None), *tap)]  # type: ignore[index]
    return out.reshape(rows, cols * phases, *q_ext)


def strided_conv_upper_bound(
    weight: torch.Tensor, lengths: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
    groups: int, estimate: float = 0.0,
) -> Certificate:
    """Certified norm of a (strided, dilated, grouped) convolution of an input whose padded
    length is ``lengths``: the polyphase kernel's circular-convolution norm on a grid large
    enough that nothing wraps around (tight for strides > 1, unlike bounding the stride-1
    conv and dropping the subsampling)."""
    k = weight.shape[2:]
    d = len(k)
    if all(s == 1 for s in stride):
        kernel, dil = weight, list(dilation)
    else:
        kernel, dil = polyphase_kernel(weight.to(torch.float64), stride, dilation), [1] * d
    q_ext = kernel.shape[2:]
    # Output i reads phase positions i + q <= ceil(L / s) - 1 (every tap of a valid output lies
    # inside the padded input), so a grid of ceil(L / s) never wraps a non-zero tap around;
    # the kernel extent is the floor for inputs too short to give any output.
    grid = [max(-(-lengths[i] // stride[i]), (q_ext[i] - 1) * dil[i] + 1) for i in range(d)]
    cert = conv_fft_upper_bound(kernel, grid, dil, groups, estimate)
    return Certificate(cert.value, "fft" if all(s == 1 for s in stride) else "fft-polyphase")


def conv_reshape_upper_bound(weight: torch.Tensor, groups: int) -> Certificate:
    """Input-size-independent bound for a convolution (zero padding, any stride).

    y = sum_t K_t S_t x with T kernel taps and shifts S_t of norm <= 1, so
    ||A|| <= sqrt(T) * min(||[K_1 ... K_T]||, ||[K_1; ...; K_T]||), per group.
    """
    w = weight.detach().to(dtype=torch.float64)
    rows, cols_g = w.shape[0], w.shape[1]
    taps = math.prod(w.shape[2:])
    wg = w.reshape(groups, rows // groups, cols_g, taps)
    wide = wg.permute(0, 1, 3, 2).reshape(groups, rows // groups, taps * cols_g)
    tall = wg.permute(0, 3, 1, 2).reshape(groups, taps * (rows // groups), cols_g)
    best = min(gram_upper_bound(wide).value, gram_upper_bound(tall).value)
    return Certificate(math.sqrt(taps) * best, "reshape-sqrt-taps")


def conv_explicit_bounds(
    weight: torch.Tensor, spatial: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
    groups: int, pads: Sequence[tuple[int, int]],
) -> tuple[Estimate, Certificate] | None:
    """The norm of a (grouped, strided, dilated) zero-padded conv on an input of size
    ``spatial`` from its explicit matrices, when they are small; None when they are not.

    A grouped conv is block-diagonal, so its norm is the max over groups of each block's
    norm: each block (a depthwise conv's is a single-channel conv on one feature map) is
    built explicitly (``conv_group_matrices``) and its Gram matrix of the smaller side
    diagonalised (float64 ``eigvalsh``). The estimate is the top eigenvalue less its rounding
    margin (a lower bound on the true norm), the certificate that value proven by Cholesky
    (``SigmaMaxBound``): both are exact to about 1e-7, where the FFT certificate of a small
    feature map can be several times the true norm. Used only when every group is cheap
    (EXPLICIT_MAX_SIDE, EXPLICIT_MAX_FLOPS, EXPLICIT_CHUNK_BYTES).
    """
    w = weight.detach().to(torch.float64)
    d = w.ndim - 2
    if w.numel() == 0 or not bool(torch.isfinite(w).all()):
        return None
    out = [conv_out_len(spatial[i], pads[i], w.shape[2 + i], stride[i], dilation[i]) for i in range(d)]
    n_in = w.shape[1] * math.prod(spatial)
    n_out = (w.shape[0] // groups) * math.prod(out)
    side = min(n_in, n_out)
    group_bytes = 8 * n_in * (n_in + n_out)
    if side == 0 or side > EXPLICIT_MAX_SIDE or group_bytes > EXPLICIT_CHUNK_BYTES:
        return None
    if groups * (n_in * n_out * side + 10 * side**3) > EXPLICIT_MAX_FLOPS:
        return None
    lower = 0.0
    upper = 0.0
    for mats in conv_group_matrices(w, spatial, stride=stride, dilation=dilation, groups=groups, pads=pads,
                                    chunk=max(1, EXPLICIT_CHUNK_BYTES // group_bytes)):
        scale = float(mats.abs().amax())
        if scale == 0.0:
            continue
        a = mats / scale
        g = a @ a.mT if a.shape[-2] < a.shape[-1] else a.mT @ a
        tr_max = float(torch.diagonal(g, dim1=-2, dim2=-1).sum(-1).max())
        top = float(torch.linalg.eigvalsh(g)[:, -1].max())
        # the Gram matrix's rounding (2(m+2)u tr) and eigvalsh's backward error (a small
        # multiple of n u ||G||, ||G|| <= tr) taken off: what is left is below lambda_max
        margin = 8 * (a.shape[-2] + a.shape[-1] + 2) * UNIT_ROUNDOFF * tr_max
        chunk_lower = math.sqrt(max(top - margin, 0.0)) * scale
        lower = max(lower, chunk_lower)
        upper = max(upper, gram_upper_bound(mats, chunk_lower).value)
    return Estimate(lower, 1, True), Certificate(upper, "explicit")


# --------------------------------------------------------------------------- non-negative maps


def schur_upper_bound(fn: LinearMap, input_shape: Shape) -> Certificate:
    """Schur test for a linear map with non-negative entries (pools, pads, slices).

    ||A||_2 <= sqrt(||A||_1 ||A||_inf) = sqrt(max(Aᵀ 1) * max(A 1)); both column and
    row sums are read off by applying the map and its adjoint to all-ones vectors.
    """
    with torch.enable_grad():
        ones = torch.ones(input_shape, dtype=torch.float64, requires_grad=True)
        out = fn(ones)
        (col,) = torch.autograd.grad(out, ones, grad_outputs=torch.ones_like(out))
    row_max = float(out.detach().abs().max()) if out.numel() else 0.0
    col_max = float(col.abs().max()) if col.numel() else 0.0
    return Certificate(math.sqrt(row_max * col_max) * CERT_SAFETY, "schur")


# --------------------------------------------------------------------------- probabilistic (dense)
#
# Kuczyński & Woźniakowski, "Estimating the largest eigenvalue by the power and Lanczos
# algorithms with a random start", SIAM J. Matrix Anal. Appl. 13(4), 1992, Theorem 4.2:
# for any symmetric positive semi-definite n x n matrix A and a start vector b uniform on
# the unit sphere, the largest Ritz value λ_k of the k-dimensional Krylov space
# span{b, Ab, ..., A^(k-1) b} satisfies
#
#     P{ λ_k < (1 - ε) λ_max(A) } <= 1.648 sqrt(n) exp(-sqrt(ε) (2k - 1)).
#
# (The paper counts k matrix-vector products; taking k as the dimension of the space, one
# less than the products it would allow, only makes δ larger.) With A = WᵀW (the smaller
# side), σ_max(W) <= sqrt(λ_k / (1 - ε)) except with probability δ(k, n, ε). (The paper's
# bound for the power method decays like (1 - ε)^k rather than exp(-sqrt(ε) k) and is not
# used.) The probability is over the start vector: ``start_vector`` draws a seeded Gaussian
# and normalises it, which is uniform on the sphere. A fixed seed makes runs reproducible;
# the guarantee then reads "for weights chosen without knowledge of the seed" (an adversary
# who knows --seed could build a matrix this start misses).
#
# Block starts. With b independent uniform start vectors X = [x_1 .. x_b], the block Krylov
# space span{X, AX, ..., A^(k-1) X} contains each K_k(A, x_i), so its top Ritz value is at
# least each column's λ_k^(i). It can fall below (1 - ε) λ_max only if every column's does,
# and the columns are independent: the probability is at most δ(k, n, ε)^b. So a block of
# b = KRYLOV_BLOCK columns needs the single-vector δ only at δ^(1/b) (0.075 for 1e-9 and
# b = 8): about a third of the steps, and each step reads W once for all b columns (a
# matrix-block product costs about 1.5 matrix-vector products on a CPU, not b). This is what
# the CPU path runs; a GPU runs the single-vector loop, which never reads back between checks.
KW_CONSTANT = 1.648
KRYLOV_BLOCK = 8  # start vectors of the block Krylov run on a CPU
BLOCK_MIN_SIDE = 512  # below this the single-vector run (which may fill the space) is used
REORTH_RATIO = 1e-4  # R of a new block with a diagonal entry below this (relative): one more pass
PROB_SLACK = 0.01  # steps are taken until the bound is within 1 % of the estimate
PROB_MAX_SLACK = 0.05  # a bound looser than this (a short Krylov space) falls back to exact
PROB_MAX_STEPS = 512  # Krylov basis cap (vectors of the smaller side, float64)
PROB_CHECK = 8  # steps between Ritz checks
BREAKDOWN = 1e-8  # a residual this small against the step's projection: the Krylov space closed
FUSED_BLOCK_BYTES = 1 << 20  # rows of W per block of the fused WᵀW x on a CPU (cache-sized)
FUSED_MIN_BYTES = 1 << 24  # below this W stays in cache anyway: two plain products
BLOCK_FUSED_BYTES = 1 << 21  # rows (or columns) of W per block of the block run's fused product
# auto: the exact certificate (Gram m n² + Cholesky n³/3, BLAS-3) is chosen while it costs
# less than the Krylov run (2 m n flops per step, memory-bound): measured on 2 CPU cores, a
# float64 matrix-vector flop costs about this many BLAS-3 flops (1.3 s for 100 Lanczos
# steps vs 1.5 s for the 4096² Gram product).
MATVEC_FLOP_COST = 16.0
# a block step costs about this many single-vector steps on 2 CPU cores: the product with
# KRYLOV_BLOCK rows about 1.5 (2048² float64: 3.9 ms against 2.5 ms; 4096²: 15.6 against
# 10.2), and the estimate's tolerance takes about 1.5x the steps the bound needs (measured:
# exact and block-probabilistic cost the same at 1024², the block run is 2.6x faster at 4096²)
BLOCK_STEP_COST = 2.5


def lanczos_failure_probability(k: int, n: int, eps: float) -> float:
    """δ(k, n, ε) = 1.648 sqrt(n) exp(-sqrt(ε)(2k - 1)) (Kuczyński & Woźniakowski 1992,
    Theorem 4.2), capped at 1: the probability that k Lanczos steps from a uniform random
    start leave the top Ritz value below (1 - ε) λ_max of an n x n PSD matrix."""
    if k < 1 or n < 1 or not (0 <= eps <= 1):
        raise ValueError(f"need k, n >= 1 and 0 <= eps <= 1, got k={k}, n={n}, eps={eps}")
    return min(1.0, KW_CONSTANT * math.sqrt(n) * math.exp(-math.sqrt(eps) * (2 * k - 1)))


def lanczos_epsilon(k: int, n: int, delta: float) -> float:
    """The smallest ε with δ(k, n, ε) <= ``delta``: (ln(1.648 sqrt(n) / δ) / (2k - 1))².
    A value >= 1 means k steps prove nothing at that δ."""
    if k < 1 or n < 1 or not (0 < delta < 1):
        raise ValueError(f"need k, n >= 1 and 0 < delta < 1, got k={k}, n={n}, delta={delta}")
    log_ratio = math.log(KW_CONSTANT * math.sqrt(n) / delta)
    return (max(log_ratio, 0.0) / (2 * k - 1)) ** 2


def lanczos_steps_for(n: int, delta: float, slack: float = PROB_SLACK) -> int:
    """Krylov dimension k at which sqrt(1 / (1 - ε(k))) <= 1 + ``slack``."""
    eps = 1.0 - 1.0 / (1.0 + slack) ** 2
    log_ratio = max(math.log(KW_CONSTANT * math.sqrt(n) / delta), 0.0)
    return max(1, math.ceil((log_ratio / math.sqrt(eps) + 1) / 2))


@dataclass(frozen=True)
class DenseBound:
    """What a dense matrix (or batch) gets: the estimate (a lower bound) and an upper bound
    of ``kind`` "certified" or "probabilistic" (failing with probability at most
    ``failure_probability`` over the random start)."""

    estimate: Estimate
    upper: Certificate
    kind: str
    failure_probability: float | None = None


def prefer_probabilistic(shape: Sequence[int], delta: float) -> bool:
    """The cost model of ``certify="auto"``: the probabilistic bound when its Krylov run
    (k steps of 2 m n flops, weighted MATVEC_FLOP_COST) is cheaper than the Gram product and
    Cholesky factorisation of the exact certificate (m n² + n³/3, n the smaller side)."""
    if len(shape) < 2:
        return False
    m, n = max(shape[-2], shape[-1]), min(shape[-2], shape[-1])
    delta_each = delta / max(1, math.prod(shape[:-2]))
    if n >= BLOCK_MIN_SIDE:  # the CPU's block run: k block steps of about BLOCK_STEP_COST products
        k = lanczos_steps_for(n, delta_each ** (1.0 / KRYLOV_BLOCK))
        return MATVEC_FLOP_COST * BLOCK_STEP_COST * 2.0 * k * m * n < m * n * n + n**3 / 3.0
    k = lanczos_steps_for(n, delta_each)
    return MATVEC_FLOP_COST * 2.0 * k * m * n < m * n * n + n**3 / 3.0


def dense_bound(weight: torch.Tensor, settings: Settings) -> DenseBound:
    """Estimate and upper bound of a matrix (or the max over a batch), by ``settings.certify``:
    "exact" the Lanczos/power estimate and the Cholesky certificate seeded with it;
    "probabilistic" one float64 Krylov run giving both (``krylov_upper_bound``); "auto" the
    latter where ``prefer_probabilistic`` says so. A probabilistic run that cannot reach
    PROB_MAX_SLACK (its Krylov space closed early: low rank) falls back to the exact path.
    """
    w = weight.detach()
    if w.numel() > 0 and (settings.certify == "probabilistic" or (
            settings.certify == "auto" and prefer_probabilistic(w.shape, settings.failure_probability))):
        prob = krylov_upper_bound(w, settings)
        if prob is not None:
            return prob
    est = matrix_estimate(w, settings)
    return DenseBound(est, gram_upper_bound(w, est.sigma), "certified")


def krylov_upper_bound(weight: torch.Tensor, settings: Settings) -> DenseBound | None:
    """Probabilistic upper bound (and estimate) of sigma_max of a matrix or a batch by plain
    Lanczos on WᵀW (the smaller side) from the uniform random start of ``start_vector``.

    The failure probability δ = ``settings.failure_probability`` is split evenly over the
    batch (a union bound; the matrices may share the start vector). Steps are taken until
    ε(k) (``lanczos_epsilon``) puts the bound within PROB_SLACK of the estimate and the
    estimate has converged to ``settings.tol``, or PROB_MAX_STEPS / the matrix's size are
    reached. Returns None when the bound stays looser than PROB_MAX_SLACK (the caller then
    certifies exactly).

    Rounding: the theorem is about exact arithmetic. The run is in float64 with full
    reorthogonalisation (two classical Gram-Schmidt passes per step), so the basis is
    orthonormal to working precision and the computed Lanczos relation holds with a residual
    of order k·n·u·||A|| (Paige's analysis of Lanczos with reorthogonalisation); the computed
    top Ritz value is taken to be within η = 4 (k + 2)(n + 2) u λ̂/(1 - ε) of the exact
    arithmetic one, and η is added before dividing by (1 - ε), then CERT_SAFETY applied. This
    is a modelling of rounding, not a proof; η is ~1e-10 relative at n = 4096, k = 100,
    far below the slack ε leaves. λ̂ is the larger of the top Ritz value and ||W y||² for the
    unit Ritz vector y recomputed in float64 (the estimate reported, a true lower bound).
    """
    w64 = weight.detach().to(device=settings.device, dtype=torch.float64)
    if w64.numel() == 0:
        return DenseBound(Estimate(0.0, 0, True), Certificate(0.0, "cholesky"), "certified")
    mats = matrix_batch(w64)
    lo, hi = torch.aminmax(mats)  # no |W| copy: a 4096² float64 abs() alone costs ~0.1 s
    scale = max(-float(lo), float(hi))
    if not math.isfinite(scale):
        return DenseBound(Estimate(math.nan, 0, False), Certificate(math.nan, "cholesky"), "certified")
    if scale == 0.0:
        return DenseBound(Estimate(0.0, 1, True), Certificate(0.0, "cholesky"), "certified")
    # float64 only needs rescaling where products could overflow or underflow
    if 1e-100 < scale < 1e100:
        scale = 1.0
    else:
        mats = mats / scale
    delta_each = settings.failure_probability / mats.shape[0]
    best_est, best_upper, steps, converged = 0.0, 0.0, 0, True
    block = mats.device.type == "cpu" and min(mats.shape[-2:]) >= BLOCK_MIN_SIDE
    for mat in mats:
        one = _block_krylov_one(mat, settings, delta_each) if block else _krylov_one(mat, settings, delta_each)
        if one is None:
            return None
        est, upper, k, conv = one
        steps = max(steps, k)
        if est >= best_est:
            best_est, converged = est, conv
        best_upper = max(best_upper, upper)
    return DenseBound(Estimate(best_est * scale, steps, converged),
                      Certificate(best_upper * scale, "lanczos-probabilistic"), "probabilistic",
                      settings.failure_probability)


def _krylov_one(w: torch.Tensor, settings: Settings, delta: float) -> tuple[float, float, int, bool] | None:
    """(estimate, probabilistic upper bound, Krylov dimension, converged) of one float64
    matrix with entries of moderate size (no overflow in its products); None when the bound
    cannot be made PROB_MAX_SLACK tight."""
    tall = w.shape[0] >= w.shape[1]
    n = w.shape[1] if tall else w.shape[0]

    rows = max(1, FUSED_BLOCK_BYTES // (8 * w.shape[1]))
    fused = tall and w.device.type == "cpu" and w.numel() * 8 > FUSED_MIN_BYTES and rows < w.shape[0]

    def op(x: torch.Tensor) -> torch.Tensor:
        if fused:
            # WᵀW x = Σ_i W_iᵀ (W_i x) over blocks of rows: each block is read from memory once
            # and used twice while in cache (a third less time than two passes over W on a CPU)
            z = torch.zeros_like(x)
            for i in range(0, w.shape[0], rows):
                block = w[i : i + rows]
                z.addmv_(block.T, block @ x)
            return z
        return w.T @ (w @ x) if tall else w @ (w.T @ x)

    # the theorem needs b uniform on the sphere: a normalised Gaussian, drawn in float64
    b = start_vector((n,), replace(settings, dtype=torch.float64))
    want = lanczos_steps_for(n, delta)
    cap = min(n, max(PROB_MAX_STEPS, want))
    basis = torch.empty((cap, n), dtype=torch.float64, device=w.device)
    proj = torch.zeros((cap, cap), dtype=torch.float64, device=w.device)
    basis[0] = b
    k = 0
    host = _host_reads(w.device)
    gen = torch.Generator(device=w.device).manual_seed(settings.seed + 1)
    while True:
        z = op(basis[k])
        col, z = _orthogonalise(basis[: k + 1], z)
        proj[: k + 1, k] = col  # column k of H = QᵀAQ (the whole column, not just β, α)
        proj[k, : k + 1] = col
        beta_t = torch.linalg.vector_norm(z)
        broke_t = beta_t <= BREAKDOWN * torch.linalg.vector_norm(col)
        k += 1
        check = not (k % PROB_CHECK and k < cap and k != want)
        if not check and not host:
            # no host read between checks on a GPU: the breakdown test is taken on the device
            basis[k] = torch.where(broke_t, _fresh_direction(basis[:k], gen), z / beta_t.clamp_min(1e-300))
            continue
        broke = bool(broke_t)
        if not check and not broke:
            basis[k] = z / beta_t
            continue
        beta = float(beta_t)
        with one_thread():
            evals, evecs = torch.linalg.eigh(proj[:k, :k].cpu())
        theta = max(float(evals[-1]), 0.0)
        residual = 0.0 if broke else beta * abs(float(evecs[-1, -1]))
        converged = top_converged(evals, residual, settings.tol)
        if (k >= want and converged) or k >= cap:
            break
        # After a breakdown the Krylov space is invariant (to rounding): it equals the Krylov
        # space of every larger dimension, so any space containing it has a top Ritz value at
        # least the exact λ_k' the theorem speaks of. A fresh direction (seeded, orthogonalised)
        # continues the run; rounding noise divided by a tiny β would not stay orthogonal.
        basis[k] = _fresh_direction(basis[:k], gen) if broke else z / beta
    eps = lanczos_epsilon(k, n, delta)
    if eps >= 1 or 1 / math.sqrt(1 - eps) - 1 > PROB_MAX_SLACK:
        return None
    est, upper = _ritz_bound(w, tall, evecs[:, -1].to(dtype=torch.float64, device=w.device) @ basis[:k],
                             theta, k, n, eps)
    return est, upper, k, converged


def _block_krylov_one(w: torch.Tensor, settings: Settings, delta: float,
                      width: int = KRYLOV_BLOCK) -> tuple[float, float, int, bool] | None:
    """As :func:`_krylov_one`, from ``width`` independent uniform start vectors (see "Block
    starts" above): the failure probability of k block steps is δ(k, n, ε)^width. Returns
    (estimate, probabilistic upper bound, block steps, converged) or None."""
    tall = w.shape[0] >= w.shape[1]
    n = w.shape[1] if tall else w.shape[0]
    width = min(width, n)

    fused = w.device.type == "cpu" and w.numel() * 8 > FUSED_MIN_BYTES
    chunk = max(1, BLOCK_FUSED_BYTES // (8 * (w.shape[1] if tall else w.shape[0])))

    def op(x: torch.Tensor) -> torch.Tensor:
        """A x for the rows of x (A = WᵀW or WWᵀ, the smaller side). On a CPU, for a W larger
        than the cache: Σ_i (x W_iᵀ) W_i over blocks W_i of rows (WᵀW) or columns (WWᵀ) of
        about BLOCK_FUSED_BYTES, each block used twice while in cache."""
        if not fused:
            return (x @ w.T) @ w if tall else (x @ w) @ w.T
        z = torch.zeros_like(x)
        for i in range(0, w.shape[0] if tall else w.shape[1], chunk):
            if tall:
                part = w[i : i + chunk]
                z.addmm_(x @ part.T, part)
            else:
                part = w[:, i : i + chunk]
                z.addmm_(x @ part, part.T)
        return z

    # independent uniform starts: normalised rows of one seeded Gaussian draw (float64)
    gen0 = torch.Generator().manual_seed(settings.seed)
    starts = torch.randn((width, n), generator=gen0, dtype=torch.float64).to(w.device)
    starts = starts / torch.linalg.vector_norm(starts, dim=1, keepdim=True)
    per_column = delta ** (1.0 / width)
    want = lanczos_steps_for(n, per_column)
    cap_blocks = max(1, min(n // width, max(PROB_MAX_STEPS // width, want)))
    size = cap_blocks * width
    basis = torch.empty((size, n), dtype=torch.float64, device=w.device)
    proj = torch.zeros((size, size), dtype=torch.float64, device=w.device)
    gen = torch.Generator(device=w.device).manual_seed(settings.seed + 1)
    # the starts' span, orthonormal (the span, not the vectors, is what the theorem needs)
    q, r = torch.linalg.qr(starts.T)
    basis[:width] = q.T
    if bool((r.diagonal().abs() <= BREAKDOWN).any()):
        return None  # width random vectors in n >= width dimensions are independent: a bug
    k = 0
    theta, evecs, converged = 0.0, torch.empty(0), False
    while True:
        lo, hi = k * width, (k + 1) * width
        z = op(basis[lo:hi])  # (width, n)
        h = basis[:hi] @ z.T
        z = z - h.T @ basis[:hi]
        h2 = basis[:hi] @ z.T
        z = z - h2.T @ basis[:hi]
        col = h + h2  # rows :hi of the column block lo:hi of H = QᵀAQ
        proj[:hi, lo:hi] = col
        proj[lo:hi, :hi] = col.T
        k += 1
        # the next block: the remainder's orthonormal basis; R couples it to this block
        q, r = torch.linalg.qr(z.T)
        if k >= want or k >= cap_blocks:  # Ritz checks: none before the bound can hold (no stop there)
            with one_thread():
                evals, vecs = torch.linalg.eigh(proj[:hi, :hi])
            theta = max(float(evals[-1]), 0.0)
            evecs = vecs
            residual = float(torch.linalg.vector_norm(r @ vecs[lo:hi, -1]))
            converged = top_converged(evals, residual, settings.tol)
            if (k >= want and converged) or k >= cap_blocks:
                break
        diag = r.diagonal().abs()
        scale = max(float(torch.linalg.matrix_norm(col, 2)), 1e-300)
        if float(diag.min()) > REORTH_RATIO * scale:
            # R well conditioned: Q = Z R⁻¹ inherits Z's orthogonality to the basis (two
            # Gram-Schmidt passes) up to rounding times cond(R); no third pass needed
            basis[hi : hi + width] = q.T
            continue
        nxt = q.T.clone()
        for i in torch.nonzero(diag <= BREAKDOWN * scale).flatten().tolist():
            # the space closed along this direction (invariant to rounding): any space
            # containing it keeps the guarantee; a fresh seeded direction continues the run
            nxt[i] = _fresh_direction(torch.cat([basis[:hi], nxt[:i]]), gen)
        # an ill-conditioned R lets rounding back into span(basis): one more pass, then QR
        _, nxt = _orthogonalise_rows(basis[:hi], nxt)
        nq, _ = torch.linalg.qr(nxt.T)
        basis[hi : hi + width] = nq.T
    eps = lanczos_epsilon(k, n, per_column)
    if eps >= 1 or 1 / math.sqrt(1 - eps) - 1 > PROB_MAX_SLACK:
        return None
    dim = k * width
    est, upper = _ritz_bound(w, tall, evecs[:, -1] @ basis[:dim], theta, dim, n, eps)
    return est, upper, k, converged


def _ritz_bound(w: torch.Tensor, tall: bool, y: torch.Tensor, theta: float, dim: int, n: int,
                eps: float) -> tuple[float, float]:
    """(estimate, probabilistic upper bound) from the top Ritz value ``theta`` of a Krylov space
    of dimension ``dim`` and its Ritz vector ``y`` (unnormalised): the estimate is ||W y|| in
    float64 for the unit y (a true lower bound), and the bound sqrt((λ + η) / (1 - ε)) with
    λ the larger of the two and η the rounding allowance (see krylov_upper_bound)."""
    y = y / torch.linalg.vector_norm(y)
    est = float(torch.linalg.vector_norm(w @ y if tall else w.T @ y))
    lam = max(theta, est * est)
    eta = 4 * (dim + 2) * (n + 2) * UNIT_ROUNDOFF * lam / (1 - eps)
    return est, math.sqrt((lam + eta) / (1 - eps)) * CERT_SAFETY


def _orthogonalise_rows(basis: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_orthogonalise` for the rows of ``z`` at once (two block Gram-Schmidt passes)."""
    h = basis @ z.T
    z = z - h.T @ basis
    h2 = basis @ z.T
    return h + h2, z - h2.T @ basis


def _host_reads(device: torch.device) -> bool:
    """Whether the Krylov loop may read scalars back every step (the CPU: they are free there);
    on a GPU it reads them only at its checks, every PROB_CHECK steps."""
    return device.type == "cpu"


def _fresh_direction(basis: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A seeded random unit vector orthogonal to the rows of ``basis``."""
    r = torch.randn(basis.shape[1], generator=gen, dtype=torch.float64, device=basis.device)
    _, r = _orthogonalise(basis, r)
    return r / torch.linalg.vector_norm(r)


def _orthogonalise(basis: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients of ``z`` on the orthonormal rows of ``basis`` and the remainder: two
    classical Gram-Schmidt passes (the second removes what rounding left in the first), so
    the basis stays orthonormal to ~u while the remainder is not tiny against z."""
    h = basis @ z
    z = z - basis.T @ h
    h2 = basis @ z
    return h + h2, z - basis.T @ h2
