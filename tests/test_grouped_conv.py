"""Grouped and depthwise convolutions against the norm of their explicit matrix, built here
column by column from unit inputs and measured by float64 SVD: estimate <= exact <= upper."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from lipcheck import spectral
from lipcheck.api import analyze

CASES = [
    # (channels in, out, groups, kernel, spatial, stride, padding, dilation)
    (6, 6, 6, 3, 7, 1, 1, 1),  # depthwise 3x3, 'same'
    (8, 8, 8, 3, 9, 2, 1, 1),  # depthwise, stride 2
    (4, 8, 4, 3, 6, 1, 1, 1),  # depthwise, channel multiplier 2
    (6, 6, 6, 5, 8, 1, 2, 1),  # depthwise 5x5
    (6, 6, 6, 3, 9, 1, 2, 2),  # depthwise, dilation 2
    (8, 6, 2, 3, 6, 1, 1, 1),  # 2 groups
    (9, 6, 3, 3, 7, 2, 0, 1),  # 3 groups, stride 2, no padding
    (8, 8, 4, 3, 5, 1, 1, 2),  # 4 groups, dilation 2
    (4, 4, 1, 3, 5, 1, 1, 1),  # plain conv, small map
]


def conv_matrix_norm(w: torch.Tensor, size: int, stride: int, padding: int, dilation: int, groups: int) -> float:
    cin = w.shape[1] * groups
    n = cin * size * size
    eye = torch.eye(n, dtype=torch.float64).reshape(n, cin, size, size)
    cols = F.conv2d(eye, w, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return float(torch.linalg.matrix_norm(cols.reshape(n, -1).T, ord=2))


def _weight(cin, cout, groups, k, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((cout, cin // groups, k, k), generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_explicit_bounds_bracket_exact(case):
    cin, cout, groups, k, size, stride, pad, dil = case
    w = _weight(cin, cout, groups, k, seed=sum(case))
    exact = conv_matrix_norm(w, size, stride, pad, dil, groups)
    got = spectral.conv_explicit_bounds(w, [size, size], [stride] * 2, [dil] * 2, groups, [(pad, pad)] * 2)
    assert got is not None
    est, cert = got
    assert est.sigma <= exact * (1 + 1e-12), (est, exact)
    assert est.sigma >= exact * (1 - 1e-9), (est, exact)
    assert exact <= cert.value <= exact * (1 + 1e-5), (cert, exact)


def test_block_matrices_are_the_operator():
    """Each block returned is the conv's matrix restricted to one group."""
    w = _weight(6, 4, 2, 3, seed=3)
    blocks = list(spectral.conv_group_matrices(w, [5, 5], stride=[2, 2], dilation=[1, 1], groups=2,
                                               pads=[(1, 1), (1, 1)], chunk=1))
    assert len(blocks) == 2
    eye = torch.eye(75, dtype=torch.float64).reshape(75, 3, 5, 5)
    for g, block in enumerate(blocks):
        ref = F.conv2d(eye, w[2 * g : 2 * g + 2], stride=2, padding=1).reshape(75, -1).T
        torch.testing.assert_close(block[0], ref, rtol=0, atol=1e-12)


def test_large_blocks_decline():
    w = _weight(64, 64, 1, 3, seed=5)
    assert spectral.conv_explicit_bounds(w, [32, 32], [1, 1], [1, 1], 1, [(1, 1)] * 2) is None


def _depthwise_model(path, channels, size, k, stride, pad, dil, groups, cout, seed):
    w = _weight(channels, cout, groups, k, seed).numpy().astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=groups, strides=[stride] * 2,
                            pads=[pad] * 4, dilations=[dil] * 2, kernel_shape=[k, k])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                        [1, channels, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return torch.from_numpy(w.astype(np.float64))


@pytest.mark.parametrize("case", [
    (16, 14, 3, 1, 1, 1, 16, 16),  # depthwise on a small map: exact
    (8, 12, 3, 2, 1, 1, 8, 8),  # depthwise stride 2
    (12, 10, 3, 1, 2, 2, 4, 12),  # 4 groups, dilation
    pytest.param((4, 40, 3, 1, 1, 1, 4, 4), marks=pytest.mark.e2e),  # larger map: too big to build, iterated
], ids=str)
def test_analyze_grouped_rows(tmp_path, case):
    channels, size, k, stride, pad, dil, groups, cout = case
    path = tmp_path / "m.onnx"
    w = _depthwise_model(str(path), channels, size, k, stride, pad, dil, groups, cout, seed=size)
    if channels * size * size <= 1500:  # the whole operator's matrix
        exact = conv_matrix_norm(w, size, stride, pad, dil, groups)
    else:  # block-diagonal: the max over single-group convs (the whole matrix is checked above)
        exact = max(conv_matrix_norm(w[g * (cout // groups) : (g + 1) * (cout // groups)], size, stride,
                                     pad, dil, 1) for g in range(groups))
    row = next(r for r in analyze(str(path)).layers if r.op == "Conv")
    assert row.sigma <= exact * (1 + 1e-9), (row.sigma, exact)
    assert row.sigma >= exact * (1 - 1e-3), (row.sigma, exact)
    assert exact <= row.sigma_upper, (row.sigma_upper, exact)
    assert math.isfinite(row.sigma_upper)
    if row.upper_method == "explicit":
        assert row.sigma_upper <= exact * (1 + 1e-5)
