"""The explicit adjoint of a convolution (spectral.maps.conv_adjoint) against the definition
<A x, y> = <x, Aᵀ y> and against autograd's input gradient, in float64, over strides,
dilations, groups, asymmetric pads, output paddings, 1-D/2-D/3-D, and transposed convs; and
the conv estimate that uses it against the explicit matrix's SVD."""

from __future__ import annotations

import itertools

import pytest
import torch

from lipcheck.spectral import Settings, conv_estimate, conv_forward
from lipcheck.spectral.maps import conv_adjoint
from lipcheck.testing import explicit_matrix

CASES = [
    # (dims, in_ch, out_ch, groups, kernel, stride, dilation, pads, spatial, transposed, output_padding)
    (2, 3, 4, 1, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), (7, 6), False, None),
    (2, 4, 6, 2, (3, 2), (2, 3), (1, 1), ((0, 2), (1, 0)), (9, 8), False, None),
    (2, 6, 6, 6, (5, 5), (2, 2), (1, 1), ((2, 2), (2, 2)), (11, 10), False, None),  # depthwise, strided
    (2, 4, 4, 4, (3, 3), (1, 1), (2, 2), ((2, 2), (2, 2)), (8, 8), False, None),  # depthwise, dilated
    (2, 2, 3, 1, (3, 3), (3, 2), (2, 1), ((1, 0), (0, 1)), (10, 7), False, None),  # stride > 1 with dilation
    (1, 3, 5, 1, (4,), (3,), (1,), ((2, 1),), (13,), False, None),
    (3, 2, 2, 2, (3, 2, 3), (2, 1, 2), (1, 1, 1), ((1, 1), (0, 1), (1, 0)), (5, 4, 6), False, None),
    (2, 3, 4, 1, (3, 3), (2, 2), (1, 1), ((1, 1), (1, 1)), (5, 6), True, (1, 0)),
    (2, 4, 4, 2, (4, 4), (2, 2), (1, 1), ((1, 2), (0, 1)), (4, 5), True, (0, 1)),
    (1, 2, 3, 1, (3,), (2,), (3,), ((0, 0),), (6,), True, (2,)),  # output padding >= stride (dilation 3)
]


def _setup(case: tuple) -> tuple:
    dims, cin, cout, groups, kernel, stride, dilation, pads, spatial, transposed, opad = case
    gen = torch.Generator().manual_seed(CASES.index(case))
    shape = (cin, cout // groups) if transposed else (cout, cin // groups)
    weight = torch.randn(*shape, *kernel, generator=gen, dtype=torch.float64)
    fn = conv_forward(weight, stride=stride, dilation=dilation, groups=groups, pads=pads,
                      transposed=transposed, output_padding=opad)
    adjoint = conv_adjoint(weight, spatial, stride=stride, dilation=dilation, groups=groups, pads=pads,
                           transposed=transposed)
    x = torch.randn(1, cin, *spatial, generator=gen, dtype=torch.float64)
    return fn, adjoint, x, gen


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_adjoint_is_the_transpose(case: tuple) -> None:
    fn, adjoint, x, gen = _setup(case)
    assert adjoint is not None
    y = fn(x)
    v = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    back = adjoint(v)
    assert back.shape == x.shape
    # <A x, v> = <x, Aᵀ v>
    assert float((y * v).sum()) == pytest.approx(float((x * back).sum()), rel=1e-12, abs=1e-12)
    # the same as autograd's vector-Jacobian product
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(xr), xr, grad_outputs=v)
    torch.testing.assert_close(back, grad, rtol=1e-12, atol=1e-12)


def test_adjoint_of_every_basis_vector() -> None:
    """The explicit matrix: column j is A e_j, and the adjoint's rows reproduce its transpose."""
    fn, adjoint, x, _ = _setup(CASES[2])
    assert adjoint is not None
    cols = explicit_matrix(fn, tuple(x.shape))
    rows = explicit_matrix(adjoint, tuple(fn(x).shape))
    torch.testing.assert_close(rows.T, cols, rtol=0, atol=1e-13)


def test_kernel_that_does_not_fit_has_no_adjoint() -> None:
    weight = torch.ones(1, 1, 5, 5, dtype=torch.float64)
    assert conv_adjoint(weight, (3, 3), stride=(1, 1), dilation=(1, 1), groups=1, pads=((0, 0), (0, 0))) is None


@pytest.mark.parametrize("stride,groups", list(itertools.product([1, 2], [1, 4])))
def test_conv_estimate_matches_the_explicit_matrix(stride: int, groups: int) -> None:
    """The estimate that iterates the conv with its explicit adjoint: the SVD of the conv's matrix."""
    gen = torch.Generator().manual_seed(7 + stride + groups)
    weight = torch.randn(4, 4 // groups, 3, 3, generator=gen, dtype=torch.float64)
    spatial = (6, 5)
    pads = ((1, 1), (1, 0))
    fn = conv_forward(weight, stride=(stride, stride), dilation=(1, 1), groups=groups, pads=pads)
    exact = float(torch.linalg.matrix_norm(explicit_matrix(fn, (1, 4, *spatial)), 2))
    est = conv_estimate(weight.float(), (1, 4, *spatial), stride=(stride, stride), dilation=(1, 1), groups=groups,
                        pads=pads, settings=Settings(tol=1e-9, max_iters=2000))
    assert est.converged
    assert est.sigma == pytest.approx(exact, rel=1e-6)
