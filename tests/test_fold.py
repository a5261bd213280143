"""Folding BatchNorm / per-channel scales into the linear op before them (lipcheck.fold):
the folded bound equals the product of the exact norms of the folded operators, computed
here from explicit matrices in float64."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from conftest import exact_norm, jacobian_matrix
from torch import nn

import lipcheck
import lipcheck.testing as lt

ANALYZE = {"device": "cpu", "tol": 1e-9, "max_iters": 3000}


def analyze(model: nn.Module, shape: tuple[int, ...]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lipcheck.analyze(model, shape, **ANALYZE)


class Scale(nn.Module):
    """Multiply channels (axis 1) by a constant."""

    def __init__(self, s: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("s", s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


def _linear_part(module: nn.Module) -> nn.Module:
    """The module with every bias and BN shift removed (its linear part, float64)."""
    m = copy.deepcopy(module).double().eval()
    for sub in m.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            assert sub.running_mean is not None
            sub.running_mean.zero_()
            sub.bias.data.zero_()
        elif getattr(sub, "bias", None) is not None and isinstance(sub.bias, nn.Parameter):
            sub.bias.data.zero_()
    return m


def _norm(module: nn.Module, shape: tuple[int, ...]) -> float:
    return exact_norm(jacobian_matrix(_linear_part(module), shape))


def _bn(n: int, two_d: bool = True) -> nn.Module:
    bn = nn.BatchNorm2d(n) if two_d else nn.BatchNorm1d(n)
    return lt.randomize_batchnorm(bn)


@pytest.mark.parametrize("padding", [0, 1])
def test_conv_bn_relu_conv_bn_linear(padding):
    lt.seeded(3)
    conv1, bn1 = nn.Conv2d(3, 6, 3, padding=padding), _bn(6)
    conv2, bn2 = nn.Conv2d(6, 5, 3, padding=padding, stride=2), _bn(5)
    spatial = 9
    s1 = spatial + 2 * padding - 2
    s2 = (s1 + 2 * padding - 3) // 2 + 1
    head = nn.Linear(5 * s2 * s2, 4)
    model = nn.Sequential(conv1, bn1, nn.ReLU(), conv2, bn2, nn.ReLU(), nn.Flatten(), head).eval()
    shape = (1, 3, spatial, spatial)
    rep = analyze(model, shape)
    # exact norms of the folded operators on their real input sizes
    pair1 = _norm(nn.Sequential(conv1, bn1), shape)
    pair2 = _norm(nn.Sequential(conv2, bn2), (1, 6, s1, s1))
    head_norm = exact_norm(head.weight.detach().double())
    expected = pair1 * pair2 * head_norm
    assert rep.network.composition == "folded"
    # the estimates compose to the product of the folded operators' exact norms, and the
    # certificate lies above it (zero-padded convs are certified through a circular embedding)
    assert rep.network.lipschitz_estimate == pytest.approx(expected, rel=1e-6)
    assert rep.network.lipschitz_bound >= expected * (1 - 1e-9)
    # tighter than the product of the separate constants (certified and exact)
    product = math.prod(r.lipschitz for r in rep.layers if r.lipschitz is not None)
    assert rep.network.lipschitz_bound < product
    separate = _norm(conv1, shape) * _norm(bn1, (1, 6, s1, s1)) * _norm(conv2, (1, 6, s1, s1)) \
        * _norm(bn2, (1, 5, s2, s2)) * head_norm
    assert expected < separate
    # each row keeps its own constant; the BN row says what the bound used
    bn_rows = [r for r in rep.layers if r.op == "BatchNormalization"]
    assert len(bn_rows) == 2 and all("folded with" in (r.note or "") for r in bn_rows)
    assert bn_rows[0].bound is not None and bn_rows[0].bound >= pair1 * (1 - 1e-9)
    conv_rows = [r for r in rep.layers if r.op == "Conv"]
    assert conv_rows[0].sigma == pytest.approx(_norm(conv1, shape), rel=1e-6)


class Abs(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()


def test_linear_bn_and_channel_mul():
    lt.seeded(5)
    lin1, bn = nn.Linear(7, 6), _bn(6, two_d=False)
    lin2 = nn.Linear(6, 5)
    s = torch.tensor([3.0, 0.1, -0.2, 0.05, 0.3, 0.2])
    # |x| between (Lipschitz 1, no slope range): no chain certificate, only the two folds
    model = nn.Sequential(lin1, bn, Abs(), lin2, Scale(s[:5]), nn.ReLU()).eval()
    rep = analyze(model, (2, 7))
    expected = _norm(nn.Sequential(lin1, bn), (1, 7)) * _norm(nn.Sequential(lin2, Scale(s[:5])), (1, 6))
    assert rep.network.composition == "folded"
    assert rep.network.lipschitz_estimate == pytest.approx(expected, rel=1e-6)
    # matrices: the Gram certificate is close
    assert rep.network.lipschitz_bound == pytest.approx(expected, rel=1e-5)
    assert rep.network.lipschitz_bound >= expected * (1 - 1e-9)


def test_branch_off_the_conv_is_not_folded():
    """The conv's output also feeds a residual branch: folding would be wrong there."""
    lt.seeded(7)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), _bn(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    net = Net().eval()
    rep = analyze(net, (1, 3, 5, 5))
    assert rep.network.composition == "graph-product"
    conv_norm = _norm(net.conv, (1, 3, 5, 5))
    assert rep.network.lipschitz_bound >= _norm(net, (1, 3, 5, 5)) * (1 - 1e-9)
    assert rep.network.lipschitz_bound >= conv_norm


def test_fold_keeps_normalize_budget_consistent():
    """Rescaling the conv rescales the folded factor too (bound.network_bound)."""
    from lipcheck.bound import network_bound
    from lipcheck.options import Options
    from lipcheck.pipeline import make_settings, run_analysis

    lt.seeded(9)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), _bn(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        an = run_analysis(model, (1, 2, 5, 5), make_settings(Options(device="cpu", tol=1e-9)))
    assert an.graph is not None and an.composition is not None
    base = network_bound(an.graph, an.composition.steps, {})
    conv_name = next(r.name for r in an.report.layers if r.op == "Conv")
    assert network_bound(an.graph, an.composition.steps, {conv_name: 0.5}) == pytest.approx(base * 0.5)
    assert base == pytest.approx(an.report.network.lipschitz_bound)


def test_batchnorm_before_the_first_conv_folds_forward():
    """An input BatchNorm (``data_bn``) then a 3x3 conv, nothing before it to fold into: the pair
    counts with the exact norm of conv o diag(s) on the real input size (explicit matrix), far
    below max|s| times the conv's norm."""
    lt.seeded(11)
    bn, conv = _bn(3), nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([4.0, 0.05, 0.1]))
        conv.weight[:, 0] *= 0.05  # the large scale meets the conv's weak input channel
    model = nn.Sequential(bn, conv, nn.ReLU()).eval()
    shape = (1, 3, 6, 6)
    rep = analyze(model, shape)
    pair = _norm(nn.Sequential(bn, conv), shape)
    assert rep.network.composition == "folded"
    assert rep.network.lipschitz_estimate == pytest.approx(pair, rel=1e-6)
    assert rep.network.lipschitz_bound >= pair * (1 - 1e-9)
    assert pair < 0.5 * _norm(bn, shape) * _norm(conv, shape)
    conv_row = next(r for r in rep.layers if r.op == "Conv")
    assert "folded with" in (conv_row.note or "") and conv_row.sigma == pytest.approx(_norm(conv, shape), rel=1e-6)


def test_batchnorm_between_activation_and_linear_folds_forward():
    """Linear -> |x| -> BatchNorm1d -> Linear (no chain: |x| has no slope range): the second
    pair counts with the exact ||W2 diag(s)||."""
    lt.seeded(12)
    lin1, bn, lin2 = nn.Linear(5, 6), _bn(6, two_d=False), nn.Linear(6, 3)
    model = nn.Sequential(lin1, Abs(), bn, lin2).eval()
    rep = analyze(model, (2, 5))
    expected = _norm(lin1, (1, 5)) * _norm(nn.Sequential(bn, lin2), (1, 6))
    assert rep.network.composition == "folded"
    assert rep.network.lipschitz_bound == pytest.approx(expected, rel=1e-5)
    assert rep.network.lipschitz_bound >= expected * (1 - 1e-9)
