"""Soundness of the certified network bound against exact local Jacobian norms.

For a Lipschitz map f, ||J_f(x)||_2 <= Lip(f) at every point where f is differentiable, so
the certified ``network.lipschitz_bound`` must dominate the spectral norm of the model's
Jacobian at any input. The Jacobians are computed exactly (autograd on a float64 copy of
the model, flattened to (out_numel, in_numel), matrix 2-norm) at seeded inputs: plain
normal draws, draws scaled by 10 (saturating activations, other ReLU patterns), and
points placed next to ReLU kinks (many first-layer pre-activations set to +-1e-7).

Also checked: the estimate never exceeds the certificate, plain chains compose as the
product of their rows' constants, and models that cannot be bounded (attention, LSTM,
GRU) say why while still reporting finite per-weight sigmas.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import SAMPLES, exact_norm, jacobian_at
from torch import nn

import lipcheck
from lipcheck import testing as lt

SAMPLE_BUILDERS = {"mlp": lt.make_mlp, "cnn": lt.make_cnn, "resnet": lt.make_resnet}

SOUND_RTOL = 1e-6  # bound >= max ||J|| * (1 - SOUND_RTOL)
CHAIN_RTOL = 1e-9
N_NORMAL, N_SCALED, N_KINK = 16, 8, 8  # 32 inputs per nonlinear model
KINKY = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh)

# Single conv layers with the configurations most likely to go wrong in a certificate.
CONV_SUBSET = [
    "conv1d_stride2",
    "conv2d_stride2",
    "conv2d_dilation2",
    "conv2d_groups2",
    "conv2d_depthwise",
    "conv2d_pad_reflect",
    "conv2d_pad_replicate",
    "conv2d_pad_circular",
    "conv2d_pad_same_even_kernel",
    "conv3d_stride2",
    "convtranspose1d_stride2_outpad1",
    "convtranspose2d_stride2_outpad1",
    "convtranspose2d_groups2",
]


# --------------------------------------------------------------------------- extra nets


def make_strided_net(seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """Strided convs (stride 2 with padding, stride 3 without), ReLUs, then a Linear."""
    lt.seeded(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1),  # 11 -> 6
        nn.ReLU(),
        nn.Conv2d(6, 4, 2, stride=3),  # 6 -> 2
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 5),
    )
    return model.eval(), (1, 3, 11, 11)


def make_reflect_net(seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """Reflect-padded convs (padding 1 and 2) with a ReLU and a Tanh, then a Linear."""
    lt.seeded(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"),  # 7 -> 7
        nn.ReLU(),
        nn.Conv2d(4, 3, 5, padding=2, padding_mode="reflect"),  # 7 -> 7
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 7 * 7, 6),
    )
    return model.eval(), (1, 2, 7, 7)


class ReflectResBlock(nn.Module):
    """CycleGAN-style residual block: x + conv(relu(conv(x))), both convs reflect-padded;
    the residual Add is the graph output."""

    def __init__(self, ch: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, padding_mode="reflect")
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu(self.conv1(x)))


def make_reflect_resblock(seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    lt.seeded(seed)
    return ReflectResBlock().eval(), (1, 3, 6, 6)


BOUNDED_BUILDERS = {
    "mlp": lt.make_mlp,
    "cnn": lt.make_cnn,
    "resnet": lt.make_resnet,
    "pool_net": lt.make_pool_net,
    "concat_net": lt.make_concat_net,
    "activation_net": lt.make_activation_net,
    "strided_net": make_strided_net,
    "reflect_net": make_reflect_net,
    "reflect_resblock": make_reflect_resblock,
}
CHAINS = ["mlp", "cnn", "activation_net", "strided_net", "reflect_net"]
UNBOUNDED = ["attention", "lstm", "gru"]


# --------------------------------------------------------------------------- helpers


def _analyze(source, shape=None):  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lipcheck.analyze(source, shape, device="cpu")


def _first_kink_module(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, KINKY)), None)


def _near_kink(model64: nn.Module, x0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Move x0 so that half of the (affine) inputs of the first piecewise-linear
    activation sit at +-1e-7, i.e. right next to a kink but on a known side."""
    act = _first_kink_module(model64)
    assert act is not None
    captured: list[torch.Tensor] = []

    def pre_activation(x: torch.Tensor) -> torch.Tensor:
        captured.clear()
        handle = act.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
        try:
            model64(x)
        finally:
            handle.remove()
        return captured[0].reshape(-1)

    z = pre_activation(x0)
    jac = torch.autograd.functional.jacobian(pre_activation, x0, vectorize=True)
    jac = jac.reshape(z.numel(), x0.numel())
    k = max(1, min(z.numel(), x0.numel()) // 2)
    rows = torch.randperm(z.numel(), generator=gen)[:k]
    signs = torch.randint(0, 2, (k,), generator=gen, dtype=torch.float64) * 2 - 1
    target = signs * 1e-7
    dx = torch.linalg.pinv(jac[rows]) @ (target - z[rows].detach())
    x = (x0.reshape(-1) + dx).reshape(x0.shape).detach()
    # The pre-activation is affine in x here, so the step lands (up to rounding).
    z_new = pre_activation(x).detach()
    assert int((z_new[rows].abs() < 1e-5).sum()) >= k // 2, "failed to place input near kinks"
    return x


def _inputs(model64: nn.Module, shape: tuple[int, ...], seed: int, kinks: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(N_NORMAL)]
    n_scaled = N_SCALED + (0 if kinks else N_KINK)
    xs += [10 * torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(n_scaled)]
    if kinks:
        for _ in range(N_KINK):
            xs.append(_near_kink(model64, torch.randn(shape, generator=gen, dtype=torch.float64), gen))
    assert len(xs) >= 32
    return xs


def _max_jacobian_norm(model: nn.Module, shape: tuple[int, ...], seed: int = 1234) -> float:
    model64 = copy.deepcopy(model).double().eval()
    kinks = _first_kink_module(model64) is not None
    return max(exact_norm(jacobian_at(model64, x)) for x in _inputs(model64, shape, seed, kinks))


def _assert_sound(rep, max_jac: float) -> None:  # type: ignore[no-untyped-def]
    net = rep.network
    assert net.bounded and net.certified, net.reason
    assert net.lipschitz_bound is not None and math.isfinite(net.lipschitz_bound)
    assert net.lipschitz_bound >= max_jac * (1 - SOUND_RTOL), (
        f"certified bound {net.lipschitz_bound!r} is below a local Jacobian norm {max_jac!r}"
    )
    assert net.lipschitz_estimate is not None
    assert net.lipschitz_estimate <= net.lipschitz_bound, (net.lipschitz_estimate, net.lipschitz_bound)


# --------------------------------------------------------------------------- soundness


@pytest.fixture(scope="module")
def builder_reports() -> dict[str, tuple[nn.Module, tuple[int, ...], object]]:
    out = {}
    for name, builder in BOUNDED_BUILDERS.items():
        model, shape = builder(0)
        out[name] = (model, shape, _analyze(model, shape))
    return out


@pytest.mark.parametrize("name", sorted(SAMPLE_BUILDERS))
def test_sample_onnx_bound_dominates_jacobian(name: str) -> None:
    import onnxruntime as ort

    path = SAMPLES / f"{name}.onnx"
    model, shape = SAMPLE_BUILDERS[name](0)
    # The reference Jacobian comes from the builder's module: check the file is that model.
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y_onnx,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        y_torch = model(x).numpy()
    np.testing.assert_allclose(y_onnx, y_torch, rtol=1e-4, atol=1e-5)

    rep = _analyze(path)
    _assert_sound(rep, _max_jacobian_norm(model, shape))


@pytest.mark.parametrize("name", list(BOUNDED_BUILDERS))
def test_builder_bound_dominates_jacobian(name: str, builder_reports) -> None:  # type: ignore[no-untyped-def]
    model, shape, rep = builder_reports[name]
    _assert_sound(rep, _max_jacobian_norm(model, shape))


def test_near_kink_inputs_are_near_kinks() -> None:
    """The kink-placement helper really produces pre-activations at +-1e-7."""
    model, shape = lt.make_mlp(0)
    model64 = copy.deepcopy(model).double()
    gen = torch.Generator().manual_seed(0)
    x = _near_kink(model64, torch.randn(shape, generator=gen, dtype=torch.float64), gen)
    pre = model64[0](x).reshape(-1)
    assert int((pre.abs() < 1e-6).sum()) >= 8


CONV_CASES = {name: (m, s) for name, m, s in lt.conv_layer_cases(0)}


@pytest.mark.parametrize("name", CONV_SUBSET)
def test_single_conv_bound_dominates_jacobian(name: str) -> None:
    module, shape = CONV_CASES[name]
    rep = _analyze(module, shape)
    max_jac = _max_jacobian_norm(module, shape)
    _assert_sound(rep, max_jac)
    # A single linear layer: the Jacobian is the operator itself, so max_jac is its exact
    # norm. The conv row alone carries the network bound (its operator is the whole layer,
    # padding included), so its power-iteration sigma (a lower bound) must stay below that
    # norm and its certificate above it.
    conv_rows = [r for r in rep.layers if r.kind == "conv"]
    assert len(conv_rows) == 1
    row = conv_rows[0]
    assert row.lipschitz == row.bound, (row.name, row.lipschitz, row.bound)
    assert row.bound == pytest.approx(rep.network.lipschitz_bound, rel=1e-12), (row.name, row.bound, rep.network)
    assert row.sigma is not None and row.sigma <= max_jac * (1 + 1e-4), (row.name, row.sigma, max_jac)
    assert row.sigma_upper is not None and row.sigma_upper >= max_jac * (1 - SOUND_RTOL)


@pytest.mark.parametrize("name", list(BOUNDED_BUILDERS))
def test_conv_rows_analysed_at_their_real_input_size(name: str, builder_reports) -> None:  # type: ignore[no-untyped-def]
    """With the input shape given, every conv's input size follows from the graph, so
    each conv row gets a power-iteration sigma and a size-specific certificate rather than
    the size-independent fallback meant for a missing --input-shape."""
    _, _, rep = builder_reports[name]
    for row in rep.layers:
        if row.kind != "conv":
            continue
        assert row.input_shape is not None and None not in row.input_shape, (row.name, row.input_shape)
        assert row.sigma is not None, (row.name, row.note)
        assert row.upper_method != "reshape-sqrt-taps", (row.name, row.upper_method, row.note)


# --------------------------------------------------------------------------- chains


@pytest.mark.parametrize("name", CHAINS)
def test_chain_bound_is_product_of_rows(name: str, builder_reports) -> None:  # type: ignore[no-untyped-def]
    _, _, rep = builder_reports[name]
    rows = [r for r in rep.layers if r.kind != "combine"]
    assert rows
    running = 1.0
    for row in rows:
        assert row.lipschitz is not None and math.isfinite(row.lipschitz), row
        running *= row.lipschitz
        if "folded with" in (row.note or "") or "ECLipsE" in (row.note or ""):
            # a BatchNorm folded into the conv before it: the pair's norm, at most the product
            assert row.bound is not None and row.bound <= running * (1 + CHAIN_RTOL), row
            running = row.bound
            continue
        assert row.bound == pytest.approx(running, rel=CHAIN_RTOL), (
            f"row {row.name} ({row.op}): bound {row.bound!r} is not the running product {running!r}"
        )
    assert rep.network.lipschitz_bound == pytest.approx(running, rel=CHAIN_RTOL)


@pytest.mark.parametrize("name", CHAINS)
def test_chain_rows_certify_their_estimates(name: str, builder_reports) -> None:  # type: ignore[no-untyped-def]
    _, _, rep = builder_reports[name]
    for row in rep.layers:
        if row.sigma is not None and row.sigma_upper is not None:
            assert row.sigma <= row.sigma_upper * (1 + 1e-12), row
        if row.sigma_upper is not None:
            assert row.lipschitz == row.sigma_upper, row


# --------------------------------------------------------------------------- unbounded


@pytest.fixture(scope="module")
def unbounded_reports() -> dict[str, tuple[nn.Module, object]]:
    out = {}
    for name in UNBOUNDED:
        model, shape = lt.BUILDERS[name](0)
        out[name] = (model, _analyze(model, shape))
    return out


def _sigma_max(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.detach().double(), ord=2))


@pytest.mark.parametrize("name", UNBOUNDED)
def test_unbounded_models_report_reason_and_finite_sigmas(name: str, unbounded_reports) -> None:  # type: ignore[no-untyped-def]
    _, rep = unbounded_reports[name]
    net = rep.network
    assert net.bounded is False
    assert net.certified is False
    assert net.lipschitz_bound is None
    assert isinstance(net.reason, str) and net.reason.strip()
    weight_rows = [r for r in rep.layers if r.kind in ("linear", "conv", "recurrent")]
    assert weight_rows
    for row in weight_rows:
        assert row.sigma is not None and math.isfinite(row.sigma) and row.sigma > 0, row
        assert row.sigma_upper is not None and math.isfinite(row.sigma_upper), row
        assert row.sigma <= row.sigma_upper * (1 + 1e-12), row


def test_attention_projection_sigmas_match_weights(unbounded_reports) -> None:  # type: ignore[no-untyped-def]
    model, rep = unbounded_reports["attention"]
    rows = {r.name: r for r in rep.layers}
    for proj in ("q", "k", "v", "o"):
        assert proj in rows, sorted(rows)
        exact = _sigma_max(getattr(model, proj).weight)
        assert rows[proj].sigma == pytest.approx(exact, rel=1e-5)
        assert rows[proj].sigma_upper >= exact * (1 - SOUND_RTOL)


# torch stacks gate blocks as LSTM (i, f, g, o) and GRU (r, z, n); ONNX names them
# LSTM i, o, f, c and GRU z, r, h.
TORCH_GATE_BLOCK = {
    "lstm": {"i": 0, "f": 1, "c": 2, "o": 3},
    "gru": {"r": 0, "z": 1, "h": 2},
}


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_recurrent_gate_sigmas_match_weights(name: str, unbounded_reports) -> None:  # type: ignore[no-untyped-def]
    model, rep = unbounded_reports[name]
    rnn = model.rnn
    hidden = rnn.hidden_size
    rec = [r for r in rep.layers if r.kind == "recurrent"]
    assert len(rec) == 2 * len(TORCH_GATE_BLOCK[name])
    for row in rec:
        label, gate = row.name.split(".")[-3], row.name.split(".")[-1]
        weight = rnn.weight_ih_l0 if label == "W" else rnn.weight_hh_l0
        block = TORCH_GATE_BLOCK[name][gate]
        exact = _sigma_max(weight[block * hidden : (block + 1) * hidden])
        assert row.sigma == pytest.approx(exact, rel=1e-5), row.name
        assert row.sigma_upper >= exact * (1 - SOUND_RTOL), row.name
    head = [r for r in rep.layers if r.name == "head"]
    assert len(head) == 1
    assert head[0].sigma == pytest.approx(_sigma_max(model.head.weight), rel=1e-5)
