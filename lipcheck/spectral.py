"""Spectral norms: power-iteration estimates and certified upper bounds.

Everything here is pure numerics on torch tensors: no printing, no I/O.

Two kinds of number come out of this module and must never be confused:

* an **estimate** (``Estimate.sigma``) from power iteration. Power iteration
  converges from below, so the estimate is a *lower* bound on the largest
  singular value, and only close to it once converged;
* a **certificate** (``Certificate.value``), an upper bound that holds whatever
  the spectrum looks like (Gram iteration, circular-convolution FFT, Schur test).
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

# Gram iteration stops once its bound is within this factor of the estimate,
# or after GRAM_MAX_STEPS squarings (the overshoot is at most rank**(1/2**(t+1))).
GRAM_TARGET_GAP = 1e-4
GRAM_MAX_STEPS = 14

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
# Krylov subspace size before an explicit restart from the current Ritz vector: bounds the
# basis memory at LANCZOS_BASIS vectors of the input's size.
LANCZOS_BASIS = 48


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
    """Lanczos on AᵀA with full reorthogonalisation and explicit restarts.

    The largest Ritz value of the Krylov space {x, AᵀAx, ...} converges to sigma_max² far
    faster than power iteration (which only keeps the last vector): the error falls like
    a Chebyshev polynomial in the spectral gap rather than a power of it. Each step costs
    one application of AᵀA, as a power step does, so ``iterations`` compare directly.
    The value returned is ||A y|| for the unit Ritz vector y: a lower bound on sigma_max,
    like the power estimate.
    Convergence: the same test as power iteration, the relative change of sigma between
    steps below ``tol``.
    """
    shape = x.shape
    q = x.reshape(-1) / torch.linalg.vector_norm(x)
    basis_size = min(LANCZOS_BASIS, settings.max_iters)
    basis = torch.zeros((basis_size, q.numel()), dtype=q.dtype, device=q.device)
    prev = 0.0
    used = 0
    alphas: list[float] = []
    betas: list[float] = []
    while True:
        k = 0
        alphas.clear()
        betas.clear()
        while k < basis_size:
            basis[k] = q
            _, z = gram(q.reshape(shape))
            w = z.reshape(-1)
            used += 1
            alpha = float(torch.dot(q, w))
            # full reorthogonalisation (twice: 'twice is enough', Parlett) keeps the basis
            # orthonormal in float32, so no spurious copies of converged Ritz values appear
            for _ in range(2):
                w = w - basis[: k + 1].T @ (basis[: k + 1] @ w)
            beta = float(torch.linalg.vector_norm(w))
            alphas.append(alpha)
            k += 1
            if not math.isfinite(alpha) or not math.isfinite(beta):
                return Estimate(math.nan, used, False)
            t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
            if betas:
                off = torch.tensor(betas, dtype=torch.float64)
                t = t + torch.diag(off, 1) + torch.diag(off, -1)
            evals, evecs = torch.linalg.eigh(t)
            theta = max(float(evals[-1]), 0.0)
            sigma = math.sqrt(theta)
            small = beta <= 1e-12 * max(theta, 1e-300) ** 0.5 * max(sigma, 1.0)
            done = abs(sigma - prev) <= settings.tol * sigma or small or theta == 0.0
            prev = sigma
            if done or used >= settings.max_iters or k == basis_size:
                # Ritz vector y = Q s, normalised; report ||A y|| (a true lower bound)
                s = evecs[:, -1].to(dtype=basis.dtype, device=basis.device)
                y = s @ basis[:k]
                y = y / torch.linalg.vector_norm(y)
                ay, _ = gram(y.reshape(shape))
                value = float(torch.linalg.vector_norm(ay))
                if done or used >= settings.max_iters:
                    return Estimate(value, used, bool(done))
                q = y  # restart from the Ritz vector
                break
            betas.append(beta)
            q = w / beta


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


# --------------------------------------------------------------------------- certificates


def gram_upper_bound(weight: torch.Tensor, estimate: float = 0.0) -> Certificate:
    """Certified sigma_max of a matrix (or max over a batch) by Gram iteration.

    Delattre, Barthélemy, Araujo, Allauzen, "Efficient Bound of Lipschitz Constant
    for Convolutional Layers by Gram Iteration", ICML 2023. With G_0 = W and
    G_{t+1} = G_tᴴ G_t, sigma_max(W) = sigma_max(G_t)^(1/2^t) <= ||G_t||_F^(1/2^t).
    Each G_t is renormalised to unit Frobenius norm and the scale kept as a log.
    """
    w = weight.detach().to(dtype=torch.float64)
    if w.numel() == 0:  # before the reshape: -1 is ambiguous for 0 elements
        return Certificate(0.0, "gram")
    if w.ndim == 2:
        w = w.unsqueeze(0)
    w = w.reshape(-1, w.shape[-2], w.shape[-1])
    if not bool(torch.isfinite(w).all()):
        return Certificate(math.nan, "gram")
    return Certificate(batched_gram_bound(w, estimate) * CERT_SAFETY, "gram")


def conv_fft_upper_bound(
    weight: torch.Tensor, grid: Sequence[int], dilation: Sequence[int], groups: int,
    estimate: float = 0.0,
) -> Certificate:
    """Exact norm of the circular convolution on ``grid`` with this kernel.

    Sedghi, Gupta, Long, "The Singular Values of Convolutional Layers", ICLR 2019:
    a circular convolution is block-diagonalised by the DFT, so its norm is the
    max over frequencies of sigma_max of the (out x in) matrix of kernel DFTs.
    A zero-padded (strided) convolution on an input whose padded length plus the
    kernel extent fits in ``grid`` is that circular convolution restricted to an
    embedded input and followed by a selection of outputs, so this bounds it.
    ``weight`` is (rows, cols/groups, *kernel); groups are taken as blocks of rows.
    """
    w = weight.detach().to(dtype=torch.float64)
    rows, cols_g = w.shape[0], w.shape[1]
    k = w.shape[2:]
    d = len(k)
    if w.numel() == 0:
        return Certificate(0.0, "fft")
    if not bool(torch.isfinite(w).all()):
        return Certificate(math.nan, "fft")
    padded = torch.zeros((rows, cols_g, *grid), dtype=torch.float64, device=w.device)
    index = [slice(None), slice(None)] + [
        slice(0, (k[i] - 1) * dilation[i] + 1, dilation[i]) for i in range(d)
    ]
    padded[tuple(index)] = w
    spec = torch.fft.rfftn(padded, dim=tuple(range(2, 2 + d)))
    # (rows, cols_g, *freqs) -> (freqs * groups, rows_g, cols_g)
    spec = spec.reshape(groups, rows // groups, cols_g, -1).permute(3, 0, 1, 2)
    spec = spec.reshape(-1, rows // groups, cols_g)
    return Certificate(batched_gram_bound(spec, estimate) * CERT_SAFETY, "fft")


def batched_gram_bound(mats: torch.Tensor, estimate: float = 0.0) -> float:
    """Certified max over a batch of sigma_max, by Gram iteration on each matrix.

    LAPACK SVDs of hundreds of 512x512 complex matrices take minutes on a laptop CPU; a
    few batched matmuls do not. ``target`` is a lower bound on the max (the caller's
    estimate, raised at each step by a Rayleigh quotient read off the current Gram power).
    A matrix whose Gram bound falls below target * (1 + gap) cannot hold the max above
    that and leaves the batch, so only the top few matrices keep squaring.
    """
    a = mats.to(torch.complex128 if mats.is_complex() else torch.float64)
    if a.shape[-2] < a.shape[-1]:
        a = a.mH
    if a.numel() == 0:
        return 0.0
    h = a
    log_scale = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    target = estimate
    finished = 0.0
    for t in range(GRAM_MAX_STEPS + 1):
        f = torch.linalg.matrix_norm(h, "fro").real.to(torch.float64)
        nonzero = f > 0
        if not bool(nonzero.all()):
            a, h, f, log_scale = a[nonzero], h[nonzero], f[nonzero], log_scale[nonzero]
        if h.shape[0] == 0:
            return finished
        h = h / f.to(h.dtype)[:, None, None]
        log_scale = log_scale + torch.log(f)
        bound = torch.exp(log_scale / 2**t)
        if t >= 1:
            # h is proportional to (AᴴA)^(2^(t-1)): its largest column points near the top
            # right singular vector, and ||A v|| / ||v|| is a lower bound on sigma_max.
            cols = torch.linalg.vector_norm(h, dim=-2)
            v = torch.gather(h, 2, cols.argmax(-1)[:, None, None].expand(-1, h.shape[-2], 1))
            rq = torch.linalg.vector_norm(a @ v, dim=(-2, -1)) / torch.linalg.vector_norm(v, dim=(-2, -1))
            target = max(target, float(rq.real.max()))
        done = bound <= target * (1 + GRAM_TARGET_GAP)
        if bool(done.any()):
            finished = max(finished, float(bound[done].max()))
        if bool(done.all()) or t == GRAM_MAX_STEPS:
            return max(finished, float(bound.max()))
        keep = ~done
        if not bool(keep.all()):
            a, h, log_scale = a[keep], h[keep], log_scale[keep]
        h = h.mH @ h
        log_scale = log_scale * 2
    return finished


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
        out[(slice(None), slice(None), r_flat, *q)] = weight[(slice(None), slice(None), *tap)]
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
    grid = [-(-lengths[i] // stride[i]) + (q_ext[i] - 1) * dil[i] for i in range(d)]
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
