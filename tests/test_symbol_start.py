"""The symbol start of a conv's Lanczos run (spectral.symbol): the aliased symbol against the
explicit matrix of a circular strided conv, the start against the top of the spectrum, and
the estimates that use it against explicit matrices' SVDs."""

from __future__ import annotations

import math

import pytest
import torch

from lipcheck.spectral import Settings, conv_estimate, conv_forward, start_vector
from lipcheck.spectral import symbol as sym
from lipcheck.testing import explicit_matrix


@pytest.mark.parametrize("stride,dilation,groups", [((1, 1), (1, 1), 1), ((2, 2), (1, 1), 1), ((2, 1), (1, 2), 2),
                                                    ((3, 2), (1, 1), 4)])
def test_aliased_symbol_gives_the_circular_strided_conv(stride: tuple[int, int], dilation: tuple[int, int],
                                                        groups: int) -> None:
    """A circular conv read every s-th position, on an input of s*G per axis, has the singular
    values of [K(ω_1) ... K(ω_S)] / sqrt(S) over the G output frequencies per axis."""
    gen = torch.Generator().manual_seed(sum(stride) + groups)
    w = torch.randn(4, 8 // groups, 3, 2, generator=gen, dtype=torch.float64)
    grid = (5, 4)
    size = tuple(g * s for g, s in zip(grid, stride))

    def circular(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 4, *grid, dtype=torch.float64)
        rows = 4 // groups
        for t0 in range(3):
            for t1 in range(2):
                shifted = torch.roll(x, shifts=(-t0 * dilation[0], -t1 * dilation[1]), dims=(2, 3))
                sub = shifted[:, :, :: stride[0], :: stride[1]]
                for g in range(groups):
                    out[:, g * rows : (g + 1) * rows] += torch.einsum(
                        "oc,bchw->bohw", w[g * rows : (g + 1) * rows, :, t0, t1],
                        sub[:, g * (8 // groups) : (g + 1) * (8 // groups)])
        return out

    exact = torch.linalg.svdvals(explicit_matrix(circular, (1, 8, *size)))
    thetas = [2 * math.pi * torch.arange(g, dtype=torch.float64) / g for g in grid]
    mats = sym._aliased_symbols(w.reshape(groups, 4 // groups, 8 // groups, 3, 2), thetas, stride, dilation)
    values = torch.linalg.svdvals(mats).flatten() / math.sqrt(math.prod(stride))
    top = torch.sort(values, descending=True).values[: len(exact)]
    torch.testing.assert_close(top, exact[: len(top)], rtol=1e-10, atol=1e-10)


def test_start_lies_in_the_top_of_the_spectrum() -> None:
    """On a 64x64 map the start (without the random part) already has ||A x|| within 2 % of
    sigma_max, where a random start has about half of it."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(8, 3, 3, 3, generator=gen, dtype=torch.float64)
    pads = ((1, 1), (1, 1))
    shape = (1, 3, 64, 64)
    fn = conv_forward(w, stride=(2, 2), dilation=(1, 1), groups=1, pads=pads)
    settings = Settings(dtype=torch.float64)
    rand = start_vector(shape, settings)
    x = sym.symbol_start(w, shape[2:], stride=(2, 2), dilation=(1, 1), groups=1, pads=pads, random=0 * rand)
    assert x is not None and float(torch.linalg.vector_norm(x)) == pytest.approx(1.0)
    est = conv_estimate(w, shape, stride=(2, 2), dilation=(1, 1), groups=1, pads=pads,
                        settings=Settings(dtype=torch.float64, tol=1e-10))
    assert float(torch.linalg.vector_norm(fn(x))) >= 0.98 * est.sigma
    assert float(torch.linalg.vector_norm(fn(rand))) <= 0.7 * est.sigma


CONVS = [
    # (in, out, groups, kernel, stride, dilation, pads, spatial)
    (3, 8, 1, (3, 3), (2, 2), (1, 1), ((1, 1), (1, 1)), (15, 14)),
    (6, 6, 6, (5, 5), (2, 2), (1, 1), ((2, 2), (2, 2)), (13, 12)),  # depthwise, strided
    (4, 4, 4, (3, 3), (1, 1), (2, 2), ((2, 1), (0, 2)), (12, 11)),  # depthwise, dilated, uneven pads
    (4, 6, 2, (3, 2), (1, 2), (1, 1), ((1, 0), (1, 1)), (10, 12)),
    (2, 3, 1, (5,), (3,), (1,), ((2, 1),), (40,)),
    (2, 2, 2, (3, 3, 3), (2, 1, 1), (1, 1, 1), ((1, 1), (1, 1), (0, 1)), (6, 5, 5)),
]


@pytest.mark.parametrize("case", CONVS, ids=[f"conv{i}" for i in range(len(CONVS))])
def test_estimate_from_the_symbol_start_is_the_norm(case: tuple) -> None:
    cin, cout, groups, kernel, stride, dilation, pads, spatial = case
    gen = torch.Generator().manual_seed(CONVS.index(case))
    w = torch.randn(cout, cin // groups, *kernel, generator=gen).double()  # float32 values: the run's own
    shape = (1, cin, *spatial)
    assert sym.symbol_start(w, spatial, stride=stride, dilation=dilation, groups=groups, pads=pads,
                            random=start_vector(shape, Settings())) is not None  # the symbol start is used
    fn = conv_forward(w, stride=stride, dilation=dilation, groups=groups, pads=pads)
    exact = float(torch.linalg.matrix_norm(explicit_matrix(fn, shape), 2))
    est = conv_estimate(w.float(), shape, stride=stride, dilation=dilation, groups=groups, pads=pads,
                        settings=Settings(tol=1e-9, max_iters=3000))
    assert est.converged
    assert est.sigma == pytest.approx(exact, rel=1e-6)
    assert est.sigma <= exact * (1 + 1e-9)


def test_few_channels_on_a_large_map_take_few_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3->16 stride-2 conv on 160x160 (the first conv of a mobile network): a dense top
    cluster that a random start needs hundreds of steps into (273 here), the symbol start
    fewer than half (108; 20 against 306 on MobileNetV3-small's own first conv at 224x224).
    Both agree."""
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(16, 3, 3, 3, generator=gen) / math.sqrt(27)
    args = dict(stride=(2, 2), dilation=(1, 1), groups=1, pads=((1, 1), (1, 1)), settings=Settings())
    warm = conv_estimate(w, (1, 3, 160, 160), **args)  # type: ignore[arg-type]
    from lipcheck.spectral import estimate

    monkeypatch.setattr(estimate, "symbol_start", lambda *a, **k: None)
    cold = conv_estimate(w, (1, 3, 160, 160), **args)  # type: ignore[arg-type]
    assert warm.converged and cold.converged
    assert warm.iterations * 2 < cold.iterations
    assert warm.sigma == pytest.approx(cold.sigma, rel=2e-6)


def test_too_costly_symbols_fall_back_to_the_random_start() -> None:
    w = torch.randn(256, 256, 3, 3)
    assert sym.symbol_start(w, (56, 56), stride=(1, 1), dilation=(1, 1), groups=1, pads=((1, 1), (1, 1)),
                            random=torch.zeros(1, 256, 56, 56)) is None
