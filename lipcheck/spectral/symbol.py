"""A start vector for the Lanczos estimate of a convolution, from its kernel's symbol.

The top of a convolution's spectrum on a large feature map is a dense cluster: the operator
is close to a circular convolution, whose singular values are those of the per-frequency
matrices K(ω) = Σ_t W_t e^{iω·dil·t} sampled at every frequency of the map, so hundreds of
them lie within 1e-4 of the top when the map is 100x100 (a 3->16 channel stride-2 conv on
224x224 took 306 Lanczos steps from a random start). A start vector that already lies in
that cluster converges in a few tens: the plane wave at the frequency where K is largest,
along its top right singular vector, under a smooth window that keeps it inside the map.

For a strided conv (stride s per axis), output frequency θ gathers the input frequencies
ω_k = (θ + 2πk)/s, k = 0..s-1 per axis (aliasing): y(q) = e^{iθq} Σ_k K(ω_k) u_k for the input
Σ_k u_k e^{iω_k(p + b)} (b the leading padding), so the matrix at θ is [K(ω_1) ... K(ω_S)],
per group. Its top is found on a grid of output frequencies, refined once around the best.

This only chooses where the iteration starts: the estimate is still ||A x|| for the vector
Lanczos ends on (a lower bound) and the certificate is computed on its own, so a poor start
costs steps, never correctness. A seeded random vector (weight SYMBOL_MIX) is mixed in so
that no eigenvector is missing from the start.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

SYMBOL_GRID = 32  # output frequencies per axis on the coarse grid, at most
SYMBOL_REFINE = 7  # points per axis of the refinement grid, one coarse cell either side
SYMBOL_MAX_FLOPS = 1e8  # symbol matrices and their SVDs above this: the random start is used
SYMBOL_MIX = 0.1  # relative weight of the seeded random vector in the start


def _aliased_symbols(weight: torch.Tensor, thetas: Sequence[torch.Tensor], stride: Sequence[int],
                     dilation: Sequence[int]) -> torch.Tensor:
    """[K(ω_k)]_k for the output frequencies of the tensor-product grid ``thetas`` (one 1-D
    tensor per axis): shape (F, groups, rows, cols * S), columns channel-major then alias."""
    groups, rows, cols = weight.shape[:3]
    d = weight.ndim - 3
    khat = weight.to(torch.complex128)
    for i in range(d):
        k = torch.arange(stride[i], dtype=torch.float64)
        omegas = (thetas[i][:, None] + 2 * math.pi * k[None, :]) / stride[i]  # (G_i, s_i)
        taps = torch.arange(weight.shape[3 + i], dtype=torch.float64) * dilation[i]
        phase = torch.exp(1j * omegas[..., None] * taps)  # (G_i, s_i, k_i)
        # contract the first remaining tap axis (always axis 3); (G_i, s_i) go to the end
        khat = torch.tensordot(khat, phase, dims=([3], [2]))
    # (groups, rows, cols, G_1, s_1, ..., G_d, s_d) -> (G_1..G_d, groups, rows, cols, s_1..s_d)
    grid_axes = [3 + 2 * i for i in range(d)]
    alias_axes = [4 + 2 * i for i in range(d)]
    khat = khat.permute(*grid_axes, 0, 1, 2, *alias_axes)
    return khat.reshape(-1, groups, rows, cols * math.prod(stride))


def symbol_start(weight: torch.Tensor, spatial: Sequence[int], *, stride: Sequence[int],
                 dilation: Sequence[int], groups: int, pads: Sequence[tuple[int, int]],
                 random: torch.Tensor) -> torch.Tensor | None:
    """A unit start vector of shape ``random.shape`` (batch 1, channels, *spatial) for the
    conv's Lanczos run, or None where the symbol costs more than SYMBOL_MAX_FLOPS to search.
    ``random`` is the seeded unit random start, mixed in with weight SYMBOL_MIX."""
    d = weight.ndim - 2
    out_ch, cols = weight.shape[:2]
    rows = out_ch // groups
    if tuple(random.shape) != (1, groups * cols, *spatial) or random.numel() == 0:
        return None
    phases = math.prod(stride)
    # K(θ) is a trigonometric polynomial whose degree per axis is the kernel's span: a grid of
    # about four points per degree shows its peaks, the refinement finds the top within one
    grid = [min(SYMBOL_GRID, max(1, -(-n // s)), max(8, 4 * (dl * (k - 1) + 1)))
            for n, s, dl, k in zip(spatial, stride, dilation, weight.shape[2:])]
    width = cols * phases
    # per frequency: the symbol's entries and an SVD (complex flops counted 8 per multiply-add).
    # Wide convs (ResNet's 64-512 channels) cost more to search than the steps they would save
    per_freq = 8 * rows * width * (4 * min(rows, width) + math.prod(weight.shape[2:]))
    if (math.prod(grid) + SYMBOL_REFINE**d) * groups * per_freq > SYMBOL_MAX_FLOPS:
        return None
    w = weight.detach().to(device="cpu", dtype=torch.float64).reshape(groups, rows, cols, *weight.shape[2:])
    thetas = [2 * math.pi * torch.arange(g, dtype=torch.float64) / g for g in grid]
    top = torch.linalg.svdvals(_aliased_symbols(w, thetas, stride, dilation))[..., 0]  # (F, groups)
    best = int(torch.argmax(top))
    index = [int(i) for i in torch.unravel_index(torch.tensor(best // groups), tuple(grid))]
    # refine around the best coarse frequency: one cell either side, per axis
    fine_thetas = [thetas[i][index[i]] + (2 * math.pi / grid[i]) * torch.linspace(-1, 1, SYMBOL_REFINE,
                                                                                 dtype=torch.float64)
                   for i in range(d)]
    mats = _aliased_symbols(w, fine_thetas, stride, dilation)
    top = torch.linalg.svdvals(mats)[..., 0]
    best = int(torch.argmax(top))
    f, g = divmod(best, groups)
    _, _, vh = torch.linalg.svd(mats[f, g])
    v = vh[0].conj().reshape(cols, *stride)  # channel, then the aliases per axis
    theta = [float(fine_thetas[i][int(j)])
             for i, j in enumerate(torch.unravel_index(torch.tensor(f), (SYMBOL_REFINE,) * d))]
    # x(p) = Re Σ_k v_k e^{iω_k (p + b)}, ω_k = (θ + 2πk)/s, under a sine window per axis
    wave = torch.zeros((cols, *spatial), dtype=torch.complex128)
    coords = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) + pads[i][0] for i, n in enumerate(spatial)],
                            indexing="ij")
    for alias in itertools.product(*[range(s) for s in stride]):
        angle = torch.zeros(tuple(spatial), dtype=torch.float64)
        for i in range(d):
            angle = angle + (theta[i] + 2 * math.pi * alias[i]) / stride[i] * coords[i]
        wave += v[(slice(None), *alias)].reshape(cols, *[1] * d) * torch.exp(1j * angle)
    window = torch.ones(tuple(spatial), dtype=torch.float64)
    for i, n in enumerate(spatial):
        shape = [1] * d
        shape[i] = n
        window = window * torch.sin(math.pi * (torch.arange(n, dtype=torch.float64) + 0.5) / n).reshape(shape)
    x = torch.zeros((groups * cols, *spatial), dtype=torch.float64)
    x[g * cols : (g + 1) * cols] = wave.real * window
    norm = float(torch.linalg.vector_norm(x))
    if not norm > 0 or not math.isfinite(norm):
        return None
    start = (x / norm).reshape(random.shape).to(device=random.device, dtype=random.dtype)
    start = start + SYMBOL_MIX * random
    return start / torch.linalg.vector_norm(start)

