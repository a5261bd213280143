"""Interval bound propagation and local constants on a declared input domain.

The boxes are checked against the values the graph really computes at points of the domain
(corners and insides), the smallest variance against a case with a known answer and against
samples, and every local network bound against the largest Jacobian norm that projected
gradient ascent finds inside the domain (a true lower bound on the local constant)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from torch import nn

import lipcheck
from lipcheck.errors import UsageError
from lipcheck.graph import build_graph
from lipcheck.interval import Domain, min_mean_square, min_variance, parse_range, propagate

# --------------------------------------------------------------------------- models


class SqueezeExcite(nn.Module):
    """conv, ReLU, then features times a sigmoid gate computed from their mean."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.head = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(h.mean((2, 3), keepdim=True)))))
        return self.head((h * gate).flatten(1))


class LayerNormMLP(nn.Module):
    """A LayerNorm whose input rows the bias keeps far from constant on [-1, 1]^6."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(6, 16)
        self.ln = nn.LayerNorm(16)
        self.l2 = nn.Linear(16, 3)
        with torch.no_grad():
            self.l1.weight.mul_(0.3)
            self.l1.bias.copy_(torch.linspace(-3, 3, 16))
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.ln(self.l1(x))))


class Attention(nn.Module):
    """One two-head self-attention block (the scores and the mixing are products)."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h, dh = self.heads, d // self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, dh).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
        return self.o((p @ v).transpose(1, 2).reshape(b, t, d))


class Exp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)


class ExpChain(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(torch.exp(torch.exp(x)))


def _model(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def _onnx(module: nn.Module, shape: tuple[int, ...], opset: int = 17) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(module, (torch.randn(*shape),), buf, dynamo=False, opset_version=opset)
    return onnx.load_from_string(buf.getvalue())


# --------------------------------------------------------------------------- the domain


def test_ranges_parse_and_refuse() -> None:
    assert parse_range("0,1") == ((0.0, 1.0),)
    assert parse_range("-1, 2; 0,0.5") == ((-1.0, 2.0), (0.0, 0.5))
    for bad, match in (("2,1", "LO > HI"), ("a,1", "numbers"), ("1", "LO,HI"), ("0,inf", "finite"),
                       ("0,1;3", "LO,HI")):
        with pytest.raises(UsageError, match=match):
            parse_range(bad)
    with pytest.raises(UsageError, match="positive"):
        Domain(None, 0.0)
    with pytest.raises(UsageError, match="positive"):
        Domain(None, -2.0)


def test_per_channel_box_and_its_shape() -> None:
    d = Domain(((0, 1), (-1, 1), (2, 3)), None)
    lo, hi = d.box((1, 3, 2, 2))
    assert lo[0, :, 0, 0].tolist() == [0, -1, 2] and hi[0, :, 1, 1].tolist() == [1, 1, 3]
    with pytest.raises(UsageError, match="3 per-channel ranges but the input has shape \\[1, 4, 2, 2\\]"):
        d.box((1, 4, 2, 2))
    # a ball around the ranges' middle, intersected with them
    lo, hi = Domain(((0, 10),), 1.0).box((1, 4))
    assert np.allclose(lo, 4) and np.allclose(hi, 6)


# --------------------------------------------------------------------------- the smallest variance


def test_min_variance_known_answer() -> None:
    # [0, 1] and [3, 4]: closest at 1 and 3, variance 1; overlapping intervals: 0
    got = min_variance(np.array([[0.0, 3.0], [0.0, 0.5]]), np.array([[1.0, 4.0], [1.0, 2.0]]))
    assert got[0] == pytest.approx(1.0, rel=1e-9) and got[0] <= 1.0
    assert got[1] == 0.0
    assert min_mean_square(np.array([[1.0, -3.0, -1.0]]), np.array([[2.0, -2.0, 1.0]]))[0] == \
        pytest.approx((1 + 4 + 0) / 3, rel=1e-9)


def test_min_variance_is_below_every_sample_and_reached() -> None:
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 9):
        lo = rng.normal(size=(50, n)) * 3
        hi = lo + rng.exponential(size=(50, n))
        got = min_variance(lo, hi)
        pts = lo[None] + (hi - lo)[None] * rng.random((4000, 50, n))
        corners = np.where(rng.random((2000, 50, n)) < 0.5, lo[None], hi[None])
        sampled = np.concatenate([pts, corners]).var(axis=-1).min(axis=0)
        assert np.all(got <= sampled * (1 + 1e-12) + 1e-15)
        # reached: the minimiser clips a common centre to every interval
        c = np.array([_argmin_centre(lo[i], hi[i]) for i in range(50)])
        best = np.clip(c[:, None], lo, hi).var(axis=-1)
        assert np.allclose(got, best, rtol=1e-7, atol=1e-12)


def _argmin_centre(lo: np.ndarray, hi: np.ndarray) -> float:
    cs = np.linspace(lo.min(), hi.max(), 20001)
    f = (np.maximum(cs[:, None] - hi, 0) ** 2 + np.maximum(lo - cs[:, None], 0) ** 2).sum(axis=1)
    k = int(f.argmin())
    a, b = cs[max(k - 1, 0)], cs[min(k + 1, len(cs) - 1)]
    for _ in range(100):  # golden-section refinement of a convex function
        m1, m2 = a + (b - a) * 0.382, a + (b - a) * 0.618
        f1 = ((np.maximum(m1 - hi, 0) ** 2 + np.maximum(lo - m1, 0) ** 2).sum())
        f2 = ((np.maximum(m2 - hi, 0) ** 2 + np.maximum(lo - m2, 0) ** 2).sum())
        a, b = (a, m2) if f1 < f2 else (m1, b)
    return (a + b) / 2


# --------------------------------------------------------------------------- boxes hold the values


def _all_values(model: onnx.ModelProto) -> tuple[ReferenceEvaluator, list[str]]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = [o for n in m.graph.node for o in n.output if o]
    del m.graph.output[:]
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in names)
    return ReferenceEvaluator(m), names


@pytest.mark.parametrize("cls,shape", [(SqueezeExcite, (1, 3, 6, 6)), (LayerNormMLP, (1, 6)),
                                       (Attention, (1, 4, 8))], ids=["se", "layernorm", "attention"])
def test_boxes_hold_every_value_on_the_domain(cls: type[nn.Module], shape: tuple[int, ...]) -> None:
    model = _onnx(_model(cls), shape)
    graph = build_graph(model, shape)
    boxes = propagate(graph, Domain(((-1.0, 2.0),), None))
    assert boxes.overflow is None and not boxes.missing
    run, names = _all_values(model)
    rng = np.random.default_rng(1)
    checked = 0
    for k in range(40):
        x = rng.uniform(-1, 2, shape) if k % 2 else np.where(rng.random(shape) < 0.5, -1.0, 2.0)
        outs = run.run(None, {model.graph.input[0].name: x.astype(np.float32)})
        for name, value in zip(names, outs):
            if name not in boxes.values:
                continue
            lo, hi = boxes.values[name]
            v = np.asarray(value, dtype=np.float64)
            slack = 1e-5 * (1 + np.abs(v))  # the model runs in float32; the boxes are for exact arithmetic
            assert np.all(v >= lo - slack) and np.all(v <= hi + slack), name
            checked += 1
    assert checked > 100


def test_softmax_box_holds_samples() -> None:
    from lipcheck.interval import _softmax

    rng = np.random.default_rng(2)
    lo = rng.normal(size=(30, 5)) * 4
    hi = lo + rng.exponential(size=(30, 5)) * 2
    plo, phi = _softmax((lo, hi), 1, False)
    for _ in range(300):
        x = np.where(rng.random(lo.shape) < 0.5, lo, hi) if _ % 2 else lo + (hi - lo) * rng.random(lo.shape)
        p = np.exp(x - x.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        assert np.all(p >= plo - 1e-15) and np.all(p <= phi + 1e-15)


def test_ball_tightens_the_first_layer() -> None:
    """On an L2 ball, the first linear layer's output is within R |row| of its centre: a box
    no wider than interval arithmetic's on the ball's bounding box, and holding points of
    the sphere."""
    torch.manual_seed(3)
    lin = nn.Sequential(nn.Linear(10, 4), Exp()).eval()  # exp: an op whose rule reads boxes
    model = _onnx(lin, (1, 10))
    graph = build_graph(model, (1, 10))
    ball = propagate(graph, Domain(None, 0.5))
    cube = propagate(graph, Domain(((-0.5, 0.5),), None))
    first = graph.nodes[0].outputs[0]
    width_ball = ball.values[first][1] - ball.values[first][0]
    width_cube = cube.values[first][1] - cube.values[first][0]
    assert np.all(width_ball <= width_cube) and width_ball.sum() < 0.7 * width_cube.sum()
    w = lin[0].weight.detach().double().numpy()
    expected = 2 * 0.5 * np.linalg.norm(w, axis=1)
    assert np.allclose(width_ball[0], expected, rtol=1e-9)
    rng = np.random.default_rng(0)
    for _ in range(200):
        x = rng.normal(size=10)
        x *= 0.5 / np.linalg.norm(x)
        y = w @ x + lin[0].bias.detach().double().numpy()
        assert np.all(y >= ball.values[first][0][0] - 1e-12) and np.all(y <= ball.values[first][1][0] + 1e-12)


# --------------------------------------------------------------------------- local bounds vs ascent


def ascent(module: nn.Module, shape: tuple[int, ...], lo: float, hi: float, *, starts: int = 6,
           steps: int = 40, seed: int = 0) -> float:
    """The largest spectral norm of a Jacobian that projected gradient ascent finds inside
    the box [lo, hi]^n (float64): a lower bound on the constant on that box."""
    f = _float64(module)
    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    for s in range(starts):
        x = lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)
        if s % 2:
            x = torch.where(x > (lo + hi) / 2, hi, lo).to(torch.float64)
        step = 0.1 * (hi - lo)
        for _ in range(steps):
            x = x.detach().requires_grad_(True)
            jac = torch.autograd.functional.jacobian(f, x, create_graph=True)
            out = jac.numel() // x.numel()
            value = torch.linalg.matrix_norm(jac.reshape(out, -1), 2)
            best = max(best, float(value))
            (grad,) = torch.autograd.grad(value, x)
            x = (x + step * torch.sign(grad)).clamp(lo, hi)
            step *= 0.93
    return best


def _float64(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module).double().eval()


@pytest.mark.e2e
@pytest.mark.parametrize("cls,shape", [(SqueezeExcite, (1, 3, 6, 6)), (LayerNormMLP, (1, 6)),
                                       (Attention, (1, 4, 8))], ids=["se", "layernorm", "attention"])
def test_local_bound_is_above_projected_ascent(cls: type[nn.Module], shape: tuple[int, ...]) -> None:
    module = _model(cls)
    report = lipcheck.analyze(module, shape, input_range="-1,1", empirical=True)
    net = report.network
    assert net.bounded and net.lipschitz_bound is not None
    assert net.domain == "every input element in [-1, 1]" and net.composition is not None
    assert net.composition.endswith("+local")
    found = ascent(module, shape, -1.0, 1.0)
    assert found > 0 and net.lipschitz_bound >= found
    # --empirical searched inside the domain: a lower bound of the local constant too
    assert net.lipschitz_lower is not None and net.lipschitz_lower <= net.lipschitz_bound
    assert any("inside the declared domain" in n for n in report.notes)


def test_without_a_domain_these_stay_unbounded_and_say_how() -> None:
    for cls, shape in ((SqueezeExcite, (1, 3, 6, 6)), (Attention, (1, 4, 8))):
        report = lipcheck.analyze(_model(cls), shape)
        assert not report.network.bounded and report.network.domain is None
        assert "--input-range" in report.network.reason


def test_layernorm_local_constant_is_the_box_variance() -> None:
    module = _model(LayerNormMLP)
    glob = lipcheck.analyze(module, (1, 6))
    loc = lipcheck.analyze(module, (1, 6), input_range=(-1, 1))
    row = next(r for r in loc.layers if r.op == "LayerNormalization")
    assert glob.network.lipschitz_bound is not None and loc.network.lipschitz_bound is not None
    assert loc.network.lipschitz_bound < glob.network.lipschitz_bound / 10
    # the constant: max|gamma| / sqrt(min var + eps), the variance of the l1 output's box
    w, b = module.l1.weight.detach().double().numpy(), module.l1.bias.detach().double().numpy()
    radius = np.abs(w).sum(axis=1)
    low = min_variance((b - radius)[None], (b + radius)[None])[0]
    gamma = float(module.ln.weight.detach().abs().max())
    assert row.lipschitz == pytest.approx(gamma / math.sqrt(low + float(np.float32(1e-5))), rel=1e-6)
    assert row.note is not None and "local on the input domain" in row.note


@pytest.mark.e2e
def test_decomposed_layernorm_is_tightened_too(tmp_path: Path) -> None:
    """The legacy exporter at opset 16 writes LayerNorm as ReduceMean/Sub/Pow/Sqrt/Div."""
    module = _model(LayerNormMLP)
    model = _onnx(module, (1, 6), opset=16)
    assert not any(n.op_type == "LayerNormalization" for n in model.graph.node)
    path = tmp_path / "ln16.onnx"
    onnx.save(model, path)
    report = lipcheck.analyze(path, input_range="-1,1")
    assert report.network.composition is not None and "local" in report.network.composition
    assert report.network.lipschitz_bound is not None
    assert report.network.lipschitz_bound >= ascent(module, (1, 6), -1.0, 1.0)
    glob = lipcheck.analyze(path)
    assert glob.network.lipschitz_bound is not None
    assert report.network.lipschitz_bound < glob.network.lipschitz_bound / 10


def test_a_domain_no_op_needs_leaves_the_bound_global() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    plain = lipcheck.analyze(mlp, (1, 4))
    ranged = lipcheck.analyze(mlp, (1, 4), input_range="0,1")
    assert ranged.network.domain is None
    assert ranged.network.lipschitz_bound == plain.network.lipschitz_bound
    assert "global: no op needed the declared input domain" in ranged.network.reason
    # and no box was computed: no rule would read one
    graph = build_graph(_onnx(mlp, (1, 4)), (1, 4))
    assert propagate(graph, Domain(((0.0, 1.0),), None)).values == {}


def test_overflow_is_named_never_a_number() -> None:
    report = lipcheck.analyze(_model(ExpChain), (1, 3), input_range="0,10")
    net = report.network
    assert not net.bounded and net.lipschitz_bound is None
    assert net.reason.startswith("unbounded (interval overflow at ")
    # a small domain: all three exps have local constants, and the bound is the product of
    # their largest slopes, exp(e^(e^1)) * exp(e^1) * e^1 (up to rounding)
    small = lipcheck.analyze(_model(ExpChain), (1, 3), input_range="0,1").network
    e = math.e
    expected = math.exp(math.exp(e)) * math.exp(e) * e
    assert small.lipschitz_bound is not None and small.lipschitz_bound >= expected
    assert small.lipschitz_bound == pytest.approx(expected, rel=1e-9)


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def se_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("se") / "se.onnx"
    onnx.save(_onnx(_model(SqueezeExcite), (1, 3, 6, 6)), path)
    return path


def test_bad_domains_exit_2_and_write_nothing(se_file: Path, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    from conftest import SAMPLES

    out = tmp_path / "r.json"
    for args, expected in ((["--input-range", "1,0"], "--input-range has LO > HI"),
                           (["--input-radius", "0"], "--input-radius must be a positive number"),
                           (["--input-radius", "-3"], "--input-radius must be a positive number"),
                           (["--input-range", "0,1;0,1"], "2 per-channel ranges but the input has shape"),
                           (["--input-range", "x"], "--input-range takes LO,HI")):
        code, stdout, err = cli("inspect", se_file, *args, "-f", "json", "-o", out)
        assert code == 2, (args, err)
        assert stdout == "" and len(err.strip().splitlines()) == 1 and expected in err, err
        assert not out.exists()
    code, _, err = cli("inspect", SAMPLES / "mlp.state_dict.pt", "--input-range", "0,1")
    assert code == 2 and "--input-range needs a model with a graph" in err


def test_every_output_names_the_domain(se_file: Path, cli) -> None:  # type: ignore[no-untyped-def]
    for fmt, expected in (("table", "declared domain only"), ("markdown", "**local**"),
                          ("html", "declared domain only"), ("csv", "local on the input domain"),
                          ("json", '"domain": "input channel k (axis 1) in range k of [0, 1], [0, 1], [0, 1]"')):
        code, out, err = cli("inspect", se_file, "--input-range", "0,1;0,1;0,1", "-f", fmt)
        assert code == 0, err
        assert expected in out, fmt
    code, out, err = cli("check", se_file, "--input-range", "0,1", "--max-lipschitz", "1000", "-f", "json")
    assert code == 0, err
    message = json.loads(out)["results"][0]["message"]
    assert "a local bound: for inputs in the declared domain only" in message


def test_check_without_the_domain_fails_the_gate(se_file: Path, cli) -> None:  # type: ignore[no-untyped-def]
    code, _, err = cli("check", se_file, "--max-lipschitz", "1000")
    assert code == 1 and "product of two activations" in err
