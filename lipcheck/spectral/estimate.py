"""Estimates of the largest singular value: thick-restart Lanczos (the default) or plain
power iteration, on matrices, convolutions and linear maps given as functions.

Every value returned is ||A x|| (Lanczos) or ||AᵀA x|| / ||A x|| (power) for a unit x:
a *lower* bound on sigma_max, close to it only once converged. Certified upper bounds
are in :mod:`lipcheck.spectral.certify`.

The loops run in the settings' dtype (float32 by default), but that last value is taken in
float64 on the operator's own weights (``exact``): a float32 product rounds each of its
sums, which was seen to put ||A x|| up to 4e-6 relative *above* sigma_max (1x1 convs on
a 28x28 feature map), above the float64 certificate. In float64 the rounding is ~1e-15,
far inside the certificate's margins, so the estimate is a lower bound in fact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .maps import LinearMap, Shape, conv_adjoint, conv_forward, matrix_batch
from .settings import Settings, one_thread
from .symbol import symbol_start

# Krylov subspace size before a thick restart: bounds the basis memory at LANCZOS_BASIS
# vectors of the input's size.
LANCZOS_BASIS = 32
LANCZOS_CHECK_GPU = 8  # steps between convergence checks (host reads) on a GPU
LANCZOS_KEEP = 10  # Ritz vectors kept at a restart
DGKS_ETA = 0.7071  # a reorthogonalisation pass is repeated when it leaves less than this of w
LANCZOS_MIN_GAP_STEPS = 20  # basis size before the Ritz gap is trusted for the error estimate

# x -> (A x, AᵀA x): all the loops need of an operator A
Gram = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# The loops receive the operator twice: ``gram`` in the settings' dtype for the iteration, and
# ``exact``, the same operator in float64 on the original weights, for the value returned (None
# when the loop already runs in float64).


@dataclass(frozen=True)
class Estimate:
    """A Lanczos or power-iteration estimate of the largest singular value (a lower bound)."""

    sigma: float
    iterations: int
    converged: bool


def start_vector(shape: Shape, settings: Settings) -> torch.Tensor:
    """A seeded unit start vector, drawn on the CPU so every device starts alike."""
    gen = torch.Generator().manual_seed(settings.seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x.to(device=settings.device, dtype=settings.dtype)
    return x / torch.linalg.vector_norm(x)


# --------------------------------------------------------------------------- power iteration


def _power_loop(gram: Gram, x: torch.Tensor, settings: Settings, exact: Gram | None = None) -> Estimate:
    """Power iteration on AᵀA, given ``gram(x) = (A x, Aᵀ A x)``.

    Invariant: ``x`` has unit norm. With y = A x and z = Aᵀ y, ||z|| / ||y|| is a
    Rayleigh-type estimate that is >= ||A x|| and <= sigma_max(A), so each step's
    value is a valid lower bound. The value returned is that quotient at the last x,
    through ``exact`` when given.
    """
    prev = 0.0
    sigma = 0.0
    for it in range(1, settings.max_iters + 1):
        y, z = gram(x)
        ny = torch.linalg.vector_norm(y)
        nz = torch.linalg.vector_norm(z)
        # One host sync per iteration: the convergence test needs the value.
        ny_f, nz_f = float(ny), float(nz)
        if ny_f == 0.0 or nz_f == 0.0:
            return Estimate(0.0, it, True)
        if not math.isfinite(nz_f):
            return Estimate(math.nan, it, False)
        sigma = nz_f / ny_f
        if abs(sigma - prev) <= settings.tol * sigma:
            return Estimate(_power_value(x, exact) if exact else sigma, it, True)
        prev = sigma
        x = z / nz
    # x is one step past sigma here: its quotient is at least as large (the ratios
    # xᵀM^(j+1)x / xᵀM^j x of a positive semi-definite M never decrease with j)
    return Estimate(_power_value(x, exact) if exact else sigma, settings.max_iters, False)


def _power_value(x: torch.Tensor, exact: Gram) -> float:
    """||AᵀA x|| / ||A x|| in float64 (the quotient does not depend on the norm of x)."""
    y, z = exact(x.to(torch.float64))
    ny = float(torch.linalg.vector_norm(y))
    return float(torch.linalg.vector_norm(z)) / ny if ny > 0 else 0.0


def _iterate(gram: Gram, x: torch.Tensor, settings: Settings, exact: Gram) -> Estimate:
    """The estimate by the settings' method, from the unit start vector ``x``."""
    final = exact if x.dtype != torch.float64 else None
    if settings.method == "power":
        return _power_loop(gram, x, settings, final)
    return _lanczos_loop(gram, x, settings, final)


# --------------------------------------------------------------------------- Lanczos


def _lanczos_loop(gram: Gram, x: torch.Tensor, settings: Settings, exact: Gram | None = None) -> Estimate:
    """Thick-restart Lanczos on AᵀA, with full reorthogonalisation.

    The largest Ritz value of the Krylov space {x, AᵀAx, ...} converges to sigma_max² far
    faster than power iteration (which only keeps the last vector): the error falls like
    a Chebyshev polynomial in the spectral gap rather than a power of it. Each step costs
    one application of AᵀA, as a power step does, so ``iterations`` compare directly.
    The value returned is ||A y|| for the unit Ritz vector y (through ``exact`` when
    given): a lower bound on sigma_max, like the power estimate.

    Invariant: the rows of ``basis[:k]`` are orthonormal and ``proj[:k, :k]`` is
    H = QᵀAᵀAQ on them. The convergence test is ``_ritz_pairs``, the restart
    ``_thick_restart``. On a GPU the scalars are read back every LANCZOS_CHECK_GPU steps,
    not every step, so the device is not stalled by host syncs.
    """
    shape = x.shape
    n = x.numel()
    q = x.reshape(-1) / torch.linalg.vector_norm(x)
    size = max(2, min(LANCZOS_BASIS, settings.max_iters))
    keep = min(LANCZOS_KEEP, size - 1)
    basis = torch.empty((size, n), dtype=q.dtype, device=q.device)
    proj = torch.zeros((size, size), dtype=torch.float64, device=q.device)
    check = 1 if q.device.type == "cpu" else LANCZOS_CHECK_GPU
    tiny = torch.finfo(q.dtype).tiny
    basis[0] = q
    k = 0  # vectors in the basis whose product has been taken
    used = 0
    since = 0  # steps since the last convergence check
    while True:
        _, z = gram(basis[k].reshape(shape))
        used += 1
        w, col = _reorthogonalise(basis, k, z.reshape(-1), host_reads=check == 1)
        proj[: k + 1, k] = col
        proj[k, : k + 1] = col
        beta = torch.linalg.vector_norm(w)
        k += 1
        since += 1
        full = k == size
        if since >= check or full or used >= settings.max_iters:
            since = 0
            ritz = _ritz_pairs(proj[:k, :k], beta, settings.tol)
            if ritz is None:
                return Estimate(math.nan, used, False)
            if ritz.converged or used >= settings.max_iters:
                # Ritz vector y = Q s, normalised; report ||A y|| (a true lower bound)
                y = ritz.vectors[:, -1].to(dtype=basis.dtype, device=basis.device) @ basis[:k]
                if exact is not None:
                    y = y.to(torch.float64)
                y = y / torch.linalg.vector_norm(y)
                ay, _ = (exact or gram)(y.reshape(shape))
                return Estimate(float(torch.linalg.vector_norm(ay)), used, ritz.converged)
            if full:
                k = _thick_restart(basis, proj, ritz, keep)
        basis[k] = w / beta.clamp_min(tiny)


def _reorthogonalise(basis: torch.Tensor, k: int, w: torch.Tensor,
                     host_reads: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` = AᵀA q_k made orthogonal to ``basis[:k + 1]``, and the coefficients removed
    (column k of H, float64).

    Full reorthogonalisation keeps the basis orthonormal in float32. The two newest vectors
    carry almost all of AᵀA q_k (the Lanczos recurrence), so they go first and cheaply; one
    pass over the whole basis then removes what rounding left, and a second pass runs only
    when that pass cancelled much of w (Daniel-Gragg-Kaufman-Stewart). On large inputs these
    passes, not the products, would otherwise dominate: each streams the whole basis from
    memory. The DGKS test is a host read, so it is made only when ``host_reads`` (the CPU);
    a GPU always takes the second pass instead of syncing.
    """
    lo = max(k - 1, 0)
    col = torch.zeros(k + 1, dtype=w.dtype, device=w.device)
    h = basis[lo : k + 1] @ w
    w = torch.addmv(w, basis[lo : k + 1].T, h, alpha=-1)
    col[lo:] += h
    passes = 0
    while passes < 2:
        before = torch.linalg.vector_norm(w)
        h = basis[: k + 1] @ w
        w = torch.addmv(w, basis[: k + 1].T, h, alpha=-1)
        col += h
        passes += 1
        if host_reads and float(torch.linalg.vector_norm(w)) > DGKS_ETA * float(before):
            break
    return w, col.to(torch.float64)


class _RitzPairs(NamedTuple):
    values: torch.Tensor  # ascending eigenvalues of H (float64, CPU)
    vectors: torch.Tensor  # their eigenvectors, columns in the same order
    converged: bool  # the top value is within the tolerance of an eigenvalue of AᵀA


def _ritz_pairs(h: torch.Tensor, beta: torch.Tensor, tol: float) -> _RitzPairs | None:
    """The Ritz pairs of the projected matrix ``h`` and whether the top one has converged;
    None when ``h`` or the residual norm ``beta`` is not finite.

    The top Ritz pair (theta, y) has residual ||AᵀA y - theta y|| = beta |s_k| (read off H,
    no extra product); theta is within that residual of an eigenvalue, and within
    residual² / gap when the rest of the spectrum is a gap away (Kato-Temple; the gap is
    read off the next Ritz value once the space holds LANCZOS_MIN_GAP_STEPS vectors).
    Converged means that error is below 2 tol theta, i.e. tol relative in sigma.
    """
    hk = h.to("cpu")
    beta_f = float(beta)
    if not (bool(torch.isfinite(hk).all()) and math.isfinite(beta_f)):
        return None
    with one_thread():
        evals, evecs = torch.linalg.eigh((hk + hk.T) / 2)
    residual = beta_f * abs(float(evecs[-1, -1]))
    return _RitzPairs(evals, evecs, top_converged(evals, residual, tol))


def top_converged(evals: torch.Tensor, residual: float, tol: float) -> bool:
    """Whether the top Ritz value (last of the ascending ``evals`` of a projected AᵀA) is within
    ``tol`` relative in sigma of a singular value, given the residual norm of its Ritz pair:
    the error is at most the residual, and at most residual² / gap (Kato-Temple) while the
    residual is below the gap to the next Ritz value, read only once the space holds
    LANCZOS_MIN_GAP_STEPS vectors. The test is error <= 2 tol theta."""
    theta = max(float(evals[-1]), 0.0)
    gap = theta - float(evals[-2]) if evals.numel() >= LANCZOS_MIN_GAP_STEPS else 0.0
    err = residual**2 / gap if 0 < residual < gap else residual
    return theta == 0.0 or err <= 2 * tol * theta


def _thick_restart(basis: torch.Tensor, proj: torch.Tensor, ritz: _RitzPairs, keep: int) -> int:
    """Keep the top ``keep`` Ritz vectors as the new basis (Wu and Simon's thick restart);
    returns the new basis size. The residual direction becomes the next vector.

    H on the kept vectors is diagonal with their Ritz values, so the clustered top of a
    convolution's spectrum keeps converging across restarts instead of starting over from
    one vector.
    """
    k = ritz.vectors.shape[0]
    s_top = ritz.vectors[:, -keep:]
    kept = s_top.T.to(dtype=basis.dtype, device=basis.device) @ basis[:k]
    basis[:keep] = kept
    proj.zero_()
    proj[:keep, :keep] = torch.diag(ritz.values[-keep:]).to(proj.device)
    return keep


# --------------------------------------------------------------------------- what is estimated


def _normalised_batch(w: torch.Tensor) -> tuple[torch.Tensor, float] | Estimate:
    """``w`` as a batch of matrices (B, m, n) divided by max|w|, and that max; or, when
    there is nothing to iterate, the Estimate itself: 0 for an empty or all-zero ``w``,
    NaN (not converged) for one holding NaN or Inf.

    The loops iterate on W / max|W| because |AᵀAx| grows like sigma² and would leave
    float32's range. One pass: NaN and Inf carry through the max, so it doubles as the
    finiteness check.
    """
    if w.numel() == 0:  # before the reshape: -1 is ambiguous for 0 elements
        return Estimate(0.0, 0, True)
    batch = matrix_batch(w)
    scale = float(batch.abs().amax())
    if not math.isfinite(scale):
        return Estimate(math.nan, 0, False)
    if scale == 0.0:
        return Estimate(0.0, 1, True)
    return batch / scale, scale


def matrix_estimate(weight: torch.Tensor, settings: Settings) -> Estimate:
    """Largest singular value of a 2-D matrix (or the max over a batch of them)."""
    prepared = _normalised_batch(weight.to(device=settings.device, dtype=settings.dtype))
    if isinstance(prepared, Estimate):
        return prepared
    w, scale = prepared
    originals = matrix_batch(weight.detach())  # for ``exact``, one matrix in float64 at a time
    best = Estimate(0.0, 0, True)
    for mat, original in zip(w, originals):

        def gram(x: torch.Tensor, m: torch.Tensor = mat) -> tuple[torch.Tensor, torch.Tensor]:
            y = m @ x
            return y, m.T @ y

        def exact(x: torch.Tensor, m: torch.Tensor = original) -> tuple[torch.Tensor, torch.Tensor]:
            m64 = m.to(device=x.device, dtype=torch.float64)
            y = (m64 @ x) / scale
            return y, (m64.T @ y) / scale

        est = _iterate(gram, start_vector((mat.shape[1],), settings), settings, exact)
        if est.sigma > best.sigma or best.iterations == 0:
            best = Estimate(est.sigma, max(est.iterations, best.iterations), est.converged)
    return Estimate(best.sigma * scale, best.iterations, best.converged)


def operator_estimate(fn: LinearMap, input_shape: Shape, settings: Settings,
                      fn64: LinearMap | None = None) -> Estimate:
    """Largest singular value of a linear map given only as a function.

    The adjoint comes from autograd: for linear f, the vector-Jacobian product of
    y = f(x) with cotangent y is exactly Aᵀ A x. The value returned is taken through
    ``fn64``, the same map computed in float64 from its original coefficients; by default
    ``fn`` itself, which must then compute in its input's dtype.
    """
    return _iterate(_autograd_gram(fn), start_vector(input_shape, settings), settings,
                    _autograd_gram(fn64 or fn))


def _autograd_gram(fn: LinearMap) -> Gram:
    def gram(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            y = fn(xr)
            (z,) = torch.autograd.grad(y, xr, grad_outputs=y.detach())
        return y.detach(), z

    return gram


def _pair_gram(fn: LinearMap, adjoint: LinearMap) -> Gram:
    """AᵀA x from the map and its adjoint: (A x, Aᵀ A x)."""

    def gram(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = fn(x)
        return y, adjoint(y)

    return gram


def conv_estimate(weight: torch.Tensor, input_shape: Shape, *, stride: Sequence[int], dilation: Sequence[int],
                  groups: int, pads: Sequence[tuple[int, int]], settings: Settings, transposed: bool = False,
                  output_padding: Sequence[int] | None = None,
                  wrap: Callable[[LinearMap], LinearMap] | None = None) -> Estimate:
    """Largest singular value of a bias-free, zero-padded (or transposed) convolution on
    ``input_shape``; ``wrap`` composes the conv with a map before it (a selection of its input).

    A plain 1x1 convolution applies the same (block-diagonal, per group) matrix at every output
    position, each reading its own input position: its operator norm is exactly that
    matrix's norm, found on the small matrix instead of the whole feature map. It is zero
    when no output reads a real input (padding and stride miss them all). Every other
    convolution is iterated as the linear map it is, with its explicit adjoint, from the
    kernel symbol's start (:mod:`.symbol`) where that is cheap to find.
    """
    w = weight.detach()
    if all(n == 1 for n in w.shape[2:]) and w.numel() > 0 and not transposed and wrap is None:
        reaches = True
        for i, length in enumerate(input_shape[2:]):
            begin, end = pads[i]
            out_len = (length + begin + end - 1) // stride[i] + 1
            # an output position j reads padded position s j; the real input is [begin, begin + length)
            first = -(-begin // stride[i])
            reaches = reaches and length > 0 and first < out_len and first * stride[i] < begin + length
        if not reaches:
            return Estimate(0.0, 0, True)
        rows = w.shape[0]
        mats = w.reshape(groups, rows // groups, w.shape[1])
        return matrix_estimate(mats, settings)
    # the kernel seen as one (out, in * taps) matrix: scaled as a whole, then given its shape back
    prepared = _normalised_batch(w.flatten(1))
    if isinstance(prepared, Estimate):
        return prepared
    unit, scale = prepared

    def conv(kernel: torch.Tensor) -> LinearMap:
        fn = conv_forward(kernel, stride=stride, dilation=dilation, groups=groups, pads=pads,
                          transposed=transposed, output_padding=output_padding)
        return wrap(fn) if wrap is not None else fn

    def gram(kernel: torch.Tensor) -> Gram:
        """AᵀA by the conv and its adjoint called directly; through autograd where a map is
        composed before the conv (``wrap``) or the conv has no explicit adjoint here."""
        adjoint = None if wrap is not None else conv_adjoint(
            kernel, input_shape[2:], stride=stride, dilation=dilation, groups=groups, pads=pads,
            transposed=transposed)
        return _autograd_gram(conv(kernel)) if adjoint is None else _pair_gram(conv(kernel), adjoint)

    unit_gram = gram(unit.reshape(w.shape).to(device=settings.device, dtype=settings.dtype))
    exact = unit_gram if settings.dtype == torch.float64 else gram(
        w.to(device=settings.device, dtype=torch.float64) / scale)
    start = start_vector(input_shape, settings)
    if wrap is None and not transposed and len(input_shape) == w.ndim:
        # the top of the spectrum is where the kernel's symbol is largest: start there
        warm = symbol_start(w, input_shape[2:], stride=stride, dilation=dilation, groups=groups, pads=pads,
                            random=start)
        start = start if warm is None else warm
    est = _iterate(unit_gram, start, settings, exact)
    return Estimate(est.sigma * scale, est.iterations, est.converged)
