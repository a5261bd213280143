"""Spectral norms: power-iteration estimates and certified upper bounds.

Everything here is pure numerics on torch tensors: no printing, no I/O.

Two kinds of number come out of this module and must never be confused:

* an **estimate** (``Estimate.sigma``) from power iteration. Power iteration
  converges from below, so the estimate is a *lower* bound on the largest
  singular value, and only close to it once converged;
* a **certificate** (``Certificate.value``), an upper bound that holds whatever
  the spectrum looks like (Cholesky-verified candidates, circular-convolution FFT, Schur test).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
FREQ_CHUNK_BYTES = 1 << 25  # kernel-DFT matrices held at once by the FFT certificate
GRAM_MAX_STEPS = 14  # squarings of the Gram-iteration fallback

Shape = tuple[int, ...]
LinearMap = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Estimate:
    """A power-iteration estimate of the largest singular value (a lower bound)."""

    sigma: float
    iterations: int
    converged: bool


@dataclass(frozen=True)
class Certificate:
    """A proven upper bound on the largest singular value, and how it was obtained."""

    value: float
    method: str


METHODS = ("lanczos", "power")
# Krylov subspace size before a thick restart: bounds the basis memory at LANCZOS_BASIS
# vectors of the input's size.
LANCZOS_BASIS = 32
LANCZOS_CHECK_GPU = 8  # steps between convergence checks (host reads) on a GPU
LANCZOS_KEEP = 10  # Ritz vectors kept at a restart
DGKS_ETA = 0.7071  # a reorthogonalisation pass is repeated when it leaves less than this of w
LANCZOS_MIN_GAP_STEPS = 20  # basis size before the Ritz gap is trusted for the error estimate


@dataclass(frozen=True)
class Settings:
    """Numerical settings shared by every estimate of one run."""

    tol: float = 1e-6
    max_iters: int = 1000
    seed: int = 0
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    method: str = "lanczos"  # or "power", the plain reference method

    def __post_init__(self) -> None:
        if not (0 < self.tol < 1):
            raise ValueError(f"tol must be in (0, 1), got {self.tol}")
        if self.max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {self.max_iters}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")


def resolve_device(name: str) -> str:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is refused."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    return name


def start_vector(shape: Shape, settings: Settings) -> torch.Tensor:
    """A seeded unit start vector, drawn on the CPU so every device starts alike."""
    gen = torch.Generator().manual_seed(settings.seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x.to(device=settings.device, dtype=settings.dtype)
    return x / torch.linalg.vector_norm(x)


def _power_loop(
    gram: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    settings: Settings,
) -> Estimate:
    """Power iteration on AᵀA, given ``gram(x) = (A x, Aᵀ A x)``.

    Invariant: ``x`` has unit norm. With y = A x and z = Aᵀ y, ||z|| / ||y|| is a
    Rayleigh-type estimate that is >= ||A x|| and <= sigma_max(A), so each step's
    value is a valid lower bound.
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
            return Estimate(sigma, it, True)
        prev = sigma
        x = z / nz
    return Estimate(sigma, settings.max_iters, False)


def _iterate(gram: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor,
             settings: Settings) -> Estimate:
    if settings.method == "power":
        return _power_loop(gram, x, settings)
    return _lanczos_loop(gram, x, settings)


def _lanczos_loop(
    gram: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    settings: Settings,
) -> Estimate:
    """Thick-restart Lanczos on AᵀA, with full reorthogonalisation.

    The largest Ritz value of the Krylov space {x, AᵀAx, ...} converges to sigma_max² far
    faster than power iteration (which only keeps the last vector): the error falls like
    a Chebyshev polynomial in the spectral gap rather than a power of it. Each step costs
    one application of AᵀA, as a power step does, so ``iterations`` compare directly.
    The value returned is ||A y|| for the unit Ritz vector y: a lower bound on sigma_max,
    like the power estimate.

    The projected matrix H = QᵀAᵀAQ is filled from the reorthogonalisation coefficients, so
    a restart can keep the top LANCZOS_KEEP Ritz vectors (Wu and Simon's thick restart):
    the clustered top of a convolution's spectrum keeps converging across restarts instead
    of starting over from one vector.

    Convergence: the top Ritz pair (theta, y) has residual ||AᵀA y - theta y|| =
    beta |s_k| (read off H, no extra product); theta is within that residual of an
    eigenvalue, and within residual² / gap when the rest of the spectrum is a gap away
    (Kato-Temple; the gap is read off the next Ritz value once the space holds
    LANCZOS_MIN_GAP_STEPS vectors). The loop stops when that error is below 2 tol theta,
    i.e. tol relative in sigma. On a GPU the scalars are read back every
    LANCZOS_CHECK_GPU steps, not every step, so the device is not stalled by host syncs.
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
        w = z.reshape(-1)
        used += 1
        # Full reorthogonalisation keeps the basis orthonormal in float32; the coefficients
        # are column k of H. The two newest vectors carry almost all of AᵀA q_k (the Lanczos
        # recurrence), so they go first and cheaply; one pass over the whole basis then removes
        # what rounding left, and a second pass runs only when that pass cancelled much of w
        # (Daniel-Gragg-Kaufman-Stewart). On large inputs these passes, not the products, would
        # otherwise dominate: each streams the whole basis from memory.
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
            # a host read on the CPU only; a GPU always takes the second pass instead of syncing
            if check == 1 and float(torch.linalg.vector_norm(w)) > DGKS_ETA * float(before):
                break
        col = col.to(torch.float64)
        proj[: k + 1, k] = col
        proj[k, : k + 1] = col
        beta = torch.linalg.vector_norm(w)
        k += 1
        since += 1
        full = k == size
        if since >= check or full or used >= settings.max_iters:
            since = 0
            hk = proj[:k, :k].to("cpu")
            beta_f = float(beta)
            if not (bool(torch.isfinite(hk).all()) and math.isfinite(beta_f)):
                return Estimate(math.nan, used, False)
            evals, evecs = torch.linalg.eigh((hk + hk.T) / 2)
            theta = max(float(evals[-1]), 0.0)
            residual = beta_f * abs(float(evecs[-1, -1]))
            gap = theta - float(evals[-2]) if k >= LANCZOS_MIN_GAP_STEPS else 0.0
            # Kato-Temple only once the top pair is resolved from the next Ritz value
            err = residual**2 / gap if 0 < residual < gap else residual
            done = theta == 0.0 or err <= 2 * settings.tol * theta
            if done or used >= settings.max_iters:
                # Ritz vector y = Q s, normalised; report ||A y|| (a true lower bound)
                y = evecs[:, -1].to(dtype=basis.dtype, device=basis.device) @ basis[:k]
                y = y / torch.linalg.vector_norm(y)
                ay, _ = gram(y.reshape(shape))
                return Estimate(float(torch.linalg.vector_norm(ay)), used, bool(done))
            if full:
                # thick restart: the top `keep` Ritz vectors, then the residual direction
                s_top = evecs[:, -keep:]
                ritz = s_top.T.to(dtype=basis.dtype, device=basis.device) @ basis[:k]
                basis[:keep] = ritz
                proj.zero_()
                proj[:keep, :keep] = torch.diag(evals[-keep:]).to(proj.device)
                k = keep
        basis[k] = w / beta.clamp_min(tiny)


def matrix_estimate(weight: torch.Tensor, settings: Settings) -> Estimate:
    """Largest singular value of a 2-D matrix (or the max over a batch of them)."""
    w = weight.to(device=settings.device, dtype=settings.dtype)
    if w.numel() == 0:  # before the reshape: -1 is ambiguous for 0 elements
        return Estimate(0.0, 0, True)
    if w.ndim == 2:
        w = w.unsqueeze(0)
    w = w.reshape(-1, w.shape[-2], w.shape[-1])
    # Iterate on W / max|W|: |AᵀAx| grows like sigma^2 and would leave float32 range.
    # One pass: NaN and Inf carry through the max, so it doubles as the finiteness check.
    scale = float(w.abs().amax())
    if not math.isfinite(scale):
        return Estimate(math.nan, 0, False)
    if scale == 0.0:
        return Estimate(0.0, 1, True)
    w = w / scale
    best = Estimate(0.0, 0, True)
    for mat in w:

        def gram(x: torch.Tensor, m: torch.Tensor = mat) -> tuple[torch.Tensor, torch.Tensor]:
            y = m @ x
            return y, m.T @ y

        est = _iterate(gram, start_vector((mat.shape[1],), settings), settings)
        if est.sigma > best.sigma or best.iterations == 0:
            best = Estimate(est.sigma, max(est.iterations, best.iterations), est.converged)
    return Estimate(best.sigma * scale, best.iterations, best.converged)


def operator_estimate(fn: LinearMap, input_shape: Shape, settings: Settings) -> Estimate:
    """Largest singular value of a linear map given only as a function.

    The adjoint comes from autograd: for linear f, the vector-Jacobian product of
    y = f(x) with cotangent y is exactly Aᵀ A x.
    """

    def gram(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            y = fn(xr)
            (z,) = torch.autograd.grad(y, xr, grad_outputs=y.detach())
        return y.detach(), z

    return _iterate(gram, start_vector(input_shape, settings), settings)


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
    convolution is iterated as the linear map it is.
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
    # iterate on W / max|W|: |AᵀAx| grows like sigma² and would leave float32 range
    scale = float(w.abs().max()) if w.numel() else 0.0
    if not math.isfinite(scale):
        return Estimate(math.nan, 0, False)
    if scale == 0.0:
        return Estimate(0.0, 1, True)
    w_run = (w / scale).to(device=settings.device, dtype=settings.dtype)
    fn = conv_forward(w_run, stride=stride, dilation=dilation, groups=groups, pads=pads, transposed=transposed,
                      output_padding=output_padding)
    if wrap is not None:
        fn = wrap(fn)
    est = operator_estimate(fn, input_shape, settings)
    return Estimate(est.sigma * scale, est.iterations, est.converged)


# --------------------------------------------------------------------------- certificates


def gram_upper_bound(weight: torch.Tensor, estimate: float = 0.0) -> Certificate:
    """Certified sigma_max of a matrix (or the max over a batch of them).

    ``estimate`` (a lower bound, e.g. the power/Lanczos estimate) is the first candidate
    bound tried; see ``SigmaMaxBound`` for how a candidate is proven.
    """
    w = weight.detach().to(dtype=torch.float64)
    if w.numel() == 0:  # before the reshape: -1 is ambiguous for 0 elements
        return Certificate(0.0, "cholesky")
    if w.ndim == 2:
        w = w.unsqueeze(0)
    w = w.reshape(-1, w.shape[-2], w.shape[-1])
    if not bool(torch.isfinite(w).all()):
        return Certificate(math.nan, "cholesky")
    acc = SigmaMaxBound(estimate)
    acc.add(w)
    return Certificate(acc.value(), "cholesky")


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

    The Gram matrices are built without forming A(w): A(w)ᴴA(w) = sum over tap pairs of
    K_tᵀK_t' exp(-i w.(p_t' - p_t)), so the T(T+1)/2 real products K_tᵀK_t' are summed per
    offset once, and each frequency's Gram matrix is a short sum of those (chunked, so
    memory stays bounded on large grids). A real kernel's spectrum is conjugate-symmetric:
    only the half-spectrum is visited.
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
    offsets: dict[tuple[int, ...], int] = {}
    blocks: list[torch.Tensor] = []

    def accumulate(delta: tuple[int, ...], block: torch.Tensor) -> None:
        if delta in offsets:
            blocks[offsets[delta]] += block
        else:
            offsets[delta] = len(blocks)
            blocks.append(block.clone())

    for i in range(len(taps)):
        prods = kern[:, i].transpose(-2, -1).unsqueeze(1) @ kern[:, i:]  # (groups, T-i, n, n)
        for j in range(i, len(taps)):
            delta = tuple(pos[j][e] - pos[i][e] for e in range(d))
            block = prods[:, j - i]
            accumulate(delta, block)
            if j != i:
                accumulate(tuple(-v for v in delta), block.transpose(-2, -1))
    gram_by_offset = torch.stack(blocks).reshape(len(blocks), -1)  # (NΔ, groups*n*n), real
    deltas = torch.tensor(list(offsets), dtype=torch.float64, device=w.device).reshape(-1, d)
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
        scale = float((torch.view_as_real(a) if a.is_complex() else a).abs().amax())
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


def _rayleigh_lower_bounds(g: torch.Tensor, steps: int = CERT_POWER_STEPS) -> torch.Tensor:
    """Rayleigh quotients xᴴGx / xᴴx after a few batched power steps: each is a lower
    bound on lambda_max of its Hermitian G (seeded start, the same for every matrix)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((g.shape[-1], 1), generator=gen, dtype=torch.float64).to(device=g.device, dtype=g.dtype)
    x = x.expand(g.shape[0], -1, -1)
    for _ in range(steps):
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


def pad_multiplicity(mode: str, size: int | None, begin: int, end: int) -> int:
    """Max number of output positions one input position is copied to, along one axis.

    A padding map P has one 1 per row, so PᵀP is diagonal with these counts and
    ||P|| = sqrt(max count) exactly (product over axes for separable pads).
    """
    begin, end = max(begin, 0), max(end, 0)
    if mode == "constant" or (begin == 0 and end == 0):
        return 1
    if size is None:
        return 1 + begin + end
    idx = torch.arange(-begin, size + end)
    if mode == "reflect":
        period = 2 * (size - 1) if size > 1 else 1
        src = torch.remainder(idx, period)
        src = torch.where(src >= size, period - src, src)
    elif mode == "edge":
        src = idx.clamp(0, size - 1)
    elif mode == "wrap":
        src = torch.remainder(idx, size)
    else:
        raise ValueError(f"unknown padding mode {mode!r}")
    return int(torch.bincount(src, minlength=size).max())


TORCH_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def pad_forward(pads: Sequence[tuple[int, int]], mode: str = "constant") -> LinearMap:
    """Padding of the trailing len(pads) axes, ONNX mode names (constant value 0)."""
    flat: list[int] = []
    for b, e in reversed(list(pads)):  # F.pad wants the last axis first
        flat += [b, e]
    torch_mode = TORCH_PAD_MODES[mode]
    if not any(flat):
        return lambda x: x
    if torch_mode == "constant":
        return lambda x: F.pad(x, flat)
    return lambda x: F.pad(x, flat, mode=torch_mode)


def conv_forward(
    weight: torch.Tensor,
    *,
    stride: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    pads: Sequence[tuple[int, int]],
    pad_mode: str = "constant",
    transposed: bool = False,
    output_padding: Sequence[int] | None = None,
) -> LinearMap:
    """The bias-free convolution as a function of its input (batch 1 first).

    For a transposed conv, ``pads`` crop the full output (ONNX semantics)."""
    d = weight.ndim - 2
    if transposed:
        conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[d - 1]
        opad = tuple(output_padding or [0] * d)

        def apply_t(x: torch.Tensor) -> torch.Tensor:
            y = conv_t(x, weight.to(device=x.device, dtype=x.dtype), stride=tuple(stride), dilation=tuple(dilation),
                       groups=groups, output_padding=opad)
            index = [slice(None), slice(None)] + [
                slice(b, y.shape[2 + i] - e) for i, (b, e) in enumerate(pads)
            ]
            return y[tuple(index)]

        return apply_t

    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    padder = pad_forward(pads, pad_mode)

    def apply(x: torch.Tensor) -> torch.Tensor:
        w = weight.to(device=x.device, dtype=x.dtype)
        return conv(padder(x), w, stride=tuple(stride), dilation=tuple(dilation), groups=groups)

    return apply
