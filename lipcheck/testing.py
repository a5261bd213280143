"""Seeded, deterministic model builders used by lipcheck's tests and sample files, and the
textbook power iteration that lipcheck's engine is measured against (:func:`plain_power`).

Every ``make_<name>(seed)`` builder returns ``(module, input_shape)`` where the module is
in eval mode and ``input_shape`` starts with a batch dimension of 1.  Models are kept
deliberately small so that exact (Jacobian-based) reference computations stay cheap.

This module depends only on :mod:`torch`; it must not import other lipcheck modules so
that pickled sample models (``torch.save(model)``) can be unpickled with nothing but
``lipcheck.testing`` importable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = [
    "BUILDERS",
    "Attention",
    "ConcatNet",
    "PowerEstimate",
    "RecurrentHead",
    "ResidualBlock",
    "conv_layer_cases",
    "explicit_matrix",
    "make_activation_net",
    "make_attention",
    "make_cnn",
    "make_concat_net",
    "make_conv_zoo",
    "make_gru",
    "make_lstm",
    "make_mlp",
    "make_pool_net",
    "make_resnet",
    "plain_power",
    "randomize_batchnorm",
    "seeded",
]

Shape = tuple[int, ...]
Built = tuple[nn.Module, Shape]


def seeded(seed: int) -> None:
    """Seed torch's global RNG (``torch.manual_seed``)."""
    torch.manual_seed(seed)


def randomize_batchnorm(module: nn.Module) -> nn.Module:
    """Give every BatchNorm in ``module`` non-trivial statistics and affine parameters.

    Uses the global torch RNG (seed it first).  ``running_var`` is drawn from [0.5, 2],
    ``weight`` from [-1.5, 1.5], ``bias`` and ``running_mean`` from [-0.5, 0.5].
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                if m.running_mean is not None and m.running_var is not None:
                    m.running_mean.copy_(torch.empty(n).uniform_(-0.5, 0.5))
                    m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0))
                if m.weight is not None and m.bias is not None:
                    m.weight.copy_(torch.empty(n).uniform_(-1.5, 1.5))
                    m.bias.copy_(torch.empty(n).uniform_(-0.5, 0.5))
    return module


# --------------------------------------------------------------------------- MLP / CNN


def make_mlp(seed: int = 0) -> Built:
    """Linear(16,32)-ReLU-Linear(32,32)-Tanh-Linear(32,10); input (1, 16)."""
    seeded(seed)
    model = nn.Sequential(
        nn.Linear(16, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.Tanh(),
        nn.Linear(32, 10),
    )
    return model.eval(), (1, 16)


def make_cnn(seed: int = 0) -> Built:
    """Conv-BN-ReLU-Conv(stride 2)-BN-ReLU-Flatten-Linear; input (1, 3, 16, 16)."""
    seeded(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    )
    randomize_batchnorm(model)
    return model.eval(), (1, 3, 16, 16)


# --------------------------------------------------------------------------- ResNet


class ResidualBlock(nn.Module):
    """Basic residual block: ``relu(shortcut(x) + bn(conv(relu(bn(conv(x))))))``.

    With ``stride != 1`` or a channel change the shortcut is a 1x1 conv + BatchNorm.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(self.shortcut(x) + out)


def make_resnet(seed: int = 0) -> Built:
    """Tiny ResNet: stem, identity block (8ch), downsampling block (16ch), GAP, Linear.

    Input (1, 3, 16, 16); output (1, 10).
    """
    seeded(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        ResidualBlock(8, 8, stride=1),
        ResidualBlock(8, 16, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    randomize_batchnorm(model)
    return model.eval(), (1, 3, 16, 16)


# --------------------------------------------------------------------------- conv zoo


def conv_layer_cases(seed: int = 0) -> list[tuple[str, nn.Module, Shape]]:
    """Single convolution layers covering the configurations lipcheck must handle.

    Returns ``[(name, module, input_shape), ...]``; all modules are in eval mode and small
    enough that their explicit Jacobian matrix is cheap to build.
    """
    seeded(seed)
    specs: list[tuple[str, Callable[[], nn.Module], Shape]] = [
        ("conv1d", lambda: nn.Conv1d(3, 4, 3, padding=1), (1, 3, 8)),
        ("conv1d_stride2", lambda: nn.Conv1d(3, 4, 3, stride=2), (1, 3, 8)),
        ("conv2d", lambda: nn.Conv2d(3, 4, 3, padding=1), (1, 3, 6, 6)),
        ("conv2d_nopad", lambda: nn.Conv2d(3, 4, 3), (1, 3, 6, 6)),
        ("conv2d_stride2", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (1, 3, 8, 8)),
        ("conv2d_dilation2", lambda: nn.Conv2d(3, 4, 3, dilation=2, padding=2), (1, 3, 7, 7)),
        ("conv2d_groups2", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (1, 4, 6, 6)),
        ("conv2d_depthwise", lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (1, 4, 6, 6)),
        (
            "conv2d_pad_zeros",
            lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="zeros"),
            (1, 2, 6, 6),
        ),
        (
            "conv2d_pad_reflect",
            lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
            (1, 2, 6, 6),
        ),
        (
            "conv2d_pad_replicate",
            lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="replicate"),
            (1, 2, 6, 6),
        ),
        (
            "conv2d_pad_circular",
            lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
            (1, 2, 6, 6),
        ),
        ("conv2d_pad_same", lambda: nn.Conv2d(3, 4, 3, padding="same"), (1, 3, 6, 6)),
        # even kernel + 'same' => asymmetric implicit padding (torch warns about a copy)
        ("conv2d_pad_same_even_kernel", lambda: nn.Conv2d(2, 3, 4, padding="same"), (1, 2, 6, 6)),
        ("conv2d_kernel2x3", lambda: nn.Conv2d(3, 4, (2, 3), padding=(0, 1)), (1, 3, 6, 7)),
        ("conv2d_no_bias", lambda: nn.Conv2d(3, 4, 3, padding=1, bias=False), (1, 3, 6, 6)),
        ("conv3d", lambda: nn.Conv3d(2, 3, 3, padding=1), (1, 2, 4, 4, 4)),
        ("conv3d_stride2", lambda: nn.Conv3d(2, 3, 3, stride=2, padding=1), (1, 2, 5, 5, 5)),
        ("convtranspose1d", lambda: nn.ConvTranspose1d(3, 4, 3, padding=1), (1, 3, 8)),
        (
            "convtranspose1d_stride2_outpad1",
            lambda: nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1, output_padding=1),
            (1, 3, 6),
        ),
        ("convtranspose2d", lambda: nn.ConvTranspose2d(3, 4, 3, padding=1), (1, 3, 6, 6)),
        (
            "convtranspose2d_stride2_outpad1",
            lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
            (1, 3, 4, 4),
        ),
        (
            "convtranspose2d_groups2",
            lambda: nn.ConvTranspose2d(4, 6, 3, padding=1, groups=2),
            (1, 4, 5, 5),
        ),
        ("convtranspose3d", lambda: nn.ConvTranspose3d(2, 3, 3, padding=1), (1, 2, 3, 3, 3)),
        (
            "convtranspose3d_stride2_outpad1",
            lambda: nn.ConvTranspose3d(2, 2, 3, stride=2, padding=1, output_padding=1),
            (1, 2, 3, 3, 3),
        ),
    ]
    return [(name, factory().eval(), shape) for name, factory, shape in specs]


def make_conv_zoo(seed: int = 0) -> dict[str, Built]:
    """Dict view of :func:`conv_layer_cases`: ``{name: (module, input_shape)}``."""
    return {name: (m, shape) for name, m, shape in conv_layer_cases(seed)}


# --------------------------------------------------------------------------- attention / RNN


class Attention(nn.Module):
    """Single-head self-attention with explicit q/k/v/o ``nn.Linear`` projections."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.dim = dim
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.dim), -1)
        return self.o(attn @ v)


def make_attention(seed: int = 0) -> Built:
    """Tiny self-attention block (dim 8, sequence length 4); input (1, 4, 8)."""
    seeded(seed)
    return Attention(8).eval(), (1, 4, 8)


class RecurrentHead(nn.Module):
    """``nn.LSTM``/``nn.GRU`` (batch_first) followed by a Linear on every output step."""

    def __init__(self, cell: str, input_size: int = 8, hidden: int = 16, out: int = 4) -> None:
        super().__init__()
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn_cls(input_size, hidden, batch_first=True)
        self.head = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = self.rnn(x)
        return self.head(output)


def make_lstm(seed: int = 0) -> Built:
    """LSTM(8,16,batch_first) -> Linear(16,4) on the output sequence; input (1, 5, 8)."""
    seeded(seed)
    return RecurrentHead("lstm").eval(), (1, 5, 8)


def make_gru(seed: int = 0) -> Built:
    """GRU(8,16,batch_first) -> Linear(16,4) on the output sequence; input (1, 5, 8)."""
    seeded(seed)
    return RecurrentHead("gru").eval(), (1, 5, 8)


# --------------------------------------------------------------------------- misc nets


def make_pool_net(seed: int = 0) -> Built:
    """Conv-ReLU-MaxPool(3,2,1)-Conv-AvgPool(2)-Flatten-Linear; input (1, 3, 16, 16)."""
    seeded(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),  # 16 -> 8
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AvgPool2d(2),  # 8 -> 4
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    return model.eval(), (1, 3, 16, 16)


class ConcatNet(nn.Module):
    """Two conv branches (3x3 and 1x1) concatenated on channels, then a 3x3 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.branch_a = nn.Conv2d(3, 4, 3, padding=1)
        self.branch_b = nn.Conv2d(3, 4, 1)
        self.relu = nn.ReLU()
        self.merge = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        return self.merge(self.relu(y))


def make_concat_net(seed: int = 0) -> Built:
    """Channel-concatenation network (see :class:`ConcatNet`); input (1, 3, 8, 8)."""
    seeded(seed)
    return ConcatNet().eval(), (1, 3, 8, 8)


def make_activation_net(seed: int = 0) -> Built:
    """Linear layers separated by many different activations; input (1, 8), output (1, 4).

    Activations, in order: LeakyReLU(0.2), ELU(1.5), Sigmoid, GELU, SiLU, Softplus,
    Hardswish, Hardtanh, ReLU6.
    """
    seeded(seed)
    activations: list[nn.Module] = [
        nn.LeakyReLU(0.2),
        nn.ELU(alpha=1.5),
        nn.Sigmoid(),
        nn.GELU(),
        nn.SiLU(),
        nn.Softplus(),
        nn.Hardswish(),
        nn.Hardtanh(),
        nn.ReLU6(),
    ]
    layers: list[nn.Module] = [nn.Linear(8, 16)]
    for i, act in enumerate(activations):
        out_features = 4 if i == len(activations) - 1 else 16
        layers += [act, nn.Linear(16, out_features)]
    return nn.Sequential(*layers).eval(), (1, 8)


#: Name -> builder for every single-model builder (the conv zoo is separate).
BUILDERS: dict[str, Callable[[int], Built]] = {
    "mlp": make_mlp,
    "cnn": make_cnn,
    "resnet": make_resnet,
    "attention": make_attention,
    "lstm": make_lstm,
    "gru": make_gru,
    "pool_net": make_pool_net,
    "concat_net": make_concat_net,
    "activation_net": make_activation_net,
}


# --------------------------------------------------------------------------- reference method


class PowerEstimate(NamedTuple):
    """What :func:`plain_power` found: ||A x|| at its last unit iterate, the steps it took,
    and whether its stopping test was met before ``max_iters``."""

    sigma: float
    iterations: int
    converged: bool


def explicit_matrix(fn: Callable[[torch.Tensor], torch.Tensor], shape: Shape) -> torch.Tensor:
    """The matrix of the linear map ``fn`` on inputs of ``shape`` (batch 1 first), float64:
    column j is fn(e_j), all basis vectors applied at once as one batch."""
    n = math.prod(shape[1:])
    out = fn(torch.eye(n, dtype=torch.float64).reshape(n, *shape[1:]))
    return out.reshape(n, -1).T


def plain_power(gram: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor,
                tol: float, max_iters: int = 5000, target: float | None = None) -> PowerEstimate:
    """Textbook power iteration on AᵀA: the reference lipcheck's estimates are measured against.

    ``gram(x)`` returns ``(A x, Aᵀ A x)`` and ``x`` is a unit start vector. Each step takes
    sigma = ||A x|| for the unit iterate x (a lower bound on the largest singular value) and
    moves to x <- AᵀA x / ||AᵀA x||. It stops when sigma changes by less than ``tol``
    relative to itself, which on clustered spectra leaves it 10-100x ``tol`` short of the
    norm; or, given the true norm as ``target`` (an oracle no real run has), as soon as
    sigma is within ``tol`` of it: the fewest steps power iteration could take to that
    accuracy. One host sync per step (the value is read back).
    """
    prev = 0.0
    sigma = 0.0
    for it in range(1, max_iters + 1):
        y, z = gram(x)
        sigma = float(torch.linalg.vector_norm(y))
        if sigma == 0.0:
            return PowerEstimate(0.0, it, True)
        if target is not None:
            if sigma >= target * (1 - tol):
                return PowerEstimate(sigma, it, True)
        elif abs(sigma - prev) < tol * sigma:
            return PowerEstimate(sigma, it, True)
        prev = sigma
        x = z / torch.linalg.vector_norm(z)
    return PowerEstimate(sigma, max_iters, False)


def lipsdp_neuron(weights: list[Any]) -> float:
    """LipSDP-Neuron (Fazlyab et al. 2019) of a ReLU MLP (slopes [0, 1]): sqrt(rho) of the
    smallest rho for which the SDP is feasible, with weights as float64 (out, in) numpy arrays.
    A reference for tests and benchmarks: needs cvxpy (the ``bench`` extra), imported here."""
    import cvxpy as cp
    import numpy as np

    ws = list(weights)
    if ws[0].shape[1] > ws[0].shape[0]:
        # f(x) = g(Q^T x) with Q an orthonormal basis of W_0's row space (W_0 = (W_0 Q) Q^T):
        # Q^T maps the unit ball onto the unit ball, so f and g have the same constant, and the
        # LMI's input block shrinks from the input width to the first layer's (784 -> 64 on an
        # MNIST MLP: the solve drops from many minutes to seconds)
        q, _ = np.linalg.qr(ws[0].T)
        ws[0] = ws[0] @ q
    d0, hid = ws[0].shape[1], [w.shape[0] for w in ws[:-1]]
    n, big = sum(hid), ws[0].shape[1] + sum(hid)
    a_mat, b_mat = np.zeros((n, big)), np.zeros((n, big))
    r = c = 0
    for w in ws[:-1]:
        a_mat[r:r + w.shape[0], c:c + w.shape[1]] = w
        b_mat[r:r + w.shape[0], d0 + r:d0 + r + w.shape[0]] = np.eye(w.shape[0])
        c, r = c + w.shape[1], r + w.shape[0]
    lam, rho = cp.Variable(n, nonneg=True), cp.Variable(nonneg=True)
    last = np.zeros((big, big))
    last[big - ws[-1].shape[1]:, big - ws[-1].shape[1]:] = ws[-1].T @ ws[-1]
    e0 = np.zeros((big, big))
    e0[:d0, :d0] = np.eye(d0)
    t = cp.diag(lam)
    lmi = a_mat.T @ t @ b_mat + b_mat.T @ t @ a_mat - 2 * b_mat.T @ t @ b_mat - rho * e0 + last
    cp.Problem(cp.Minimize(rho), [(lmi + lmi.T) / 2 << 0]).solve()
    value = rho.value
    if value is None:
        raise RuntimeError("the LipSDP problem was not solved")
    return math.sqrt(float(value))
